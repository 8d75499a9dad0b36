//! Spill files ("runs"): sorted keys as binary little-endian `i64`, written and read through
//! large buffers (one `write`/`read` system call per buffer, no per-key call).
//!
//! A [`SpillFile`] deletes its file when dropped, so a run disappears with whatever owns it (the
//! sorter, or the merge reading it) on every path: success, error, panic.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Result, SortError};

const KEY_BYTES: usize = std::mem::size_of::<i64>();

/// A run on disk, deleted on drop.
#[derive(Debug)]
pub(crate) struct SpillFile {
    path: PathBuf,
    /// Keys written (checked when read back).
    keys: u64,
}

impl SpillFile {
    pub(crate) fn keys(&self) -> u64 {
        self.keys
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot delete spill file {}: {e}", self.path.display()),
        }
    }
}

/// The keys as their bytes in memory (native endianness).
fn as_bytes(keys: &[i64]) -> &[u8] {
    // SAFETY: `i64` has no padding, so its bytes are initialized `u8`s; `u8` has alignment 1; the
    // byte length is the size of the slice, which already fits in `isize`; the borrow is tied to
    // `keys`.
    unsafe { std::slice::from_raw_parts(keys.as_ptr().cast::<u8>(), std::mem::size_of_val(keys)) }
}

/// The keys as mutable bytes in memory (native endianness).
fn as_bytes_mut(keys: &mut [i64]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; additionally every byte pattern is a valid `i64`, so any write
    // through the byte view leaves valid keys; the exclusive borrow is tied to `keys`.
    unsafe {
        std::slice::from_raw_parts_mut(keys.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(keys))
    }
}

/// Writes one run: keys pushed in sorted order, converted to little-endian a buffer at a time.
pub(crate) struct RunWriter {
    file: File,
    buf: Vec<i64>,
    cap: usize,
    /// Owns the file from its creation: dropping an unfinished writer deletes it.
    spill: SpillFile,
}

impl RunWriter {
    /// Creates `path` (which must not exist) with a buffer of `buffer_keys` keys.
    pub(crate) fn create(path: PathBuf, buffer_keys: usize) -> Result<RunWriter> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| SortError::io("create spill file", &path, e))?;
        let cap = buffer_keys.max(1);
        Ok(RunWriter {
            file,
            buf: Vec::with_capacity(cap),
            cap,
            spill: SpillFile { path, keys: 0 },
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.spill.path
    }

    /// Appends one key.
    #[inline]
    pub(crate) fn push(&mut self, key: i64) -> Result<()> {
        self.buf.push(key);
        if self.buf.len() == self.cap {
            self.flush_buf()?;
        }
        Ok(())
    }

    /// Appends keys in bulk.
    pub(crate) fn extend(&mut self, mut keys: &[i64]) -> Result<()> {
        while !keys.is_empty() {
            let n = keys.len().min(self.cap - self.buf.len());
            self.buf.extend_from_slice(&keys[..n]);
            keys = &keys[n..];
            if self.buf.len() == self.cap {
                self.flush_buf()?;
            }
        }
        Ok(())
    }

    fn flush_buf(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        // A no-op on little-endian targets (the compiler removes the loop).
        for k in self.buf.iter_mut() {
            *k = k.to_le();
        }
        self.file
            .write_all(as_bytes(&self.buf))
            .map_err(|e| SortError::io("write spill file", &self.spill.path, e))?;
        self.spill.keys += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Flushes and closes the file; returns the run.
    pub(crate) fn finish(mut self) -> Result<SpillFile> {
        self.flush_buf()?;
        Ok(self.spill)
    }
}

/// Reads one run back, a buffer at a time.
pub(crate) struct RunReader {
    file: File,
    spill: SpillFile,
    buf: Vec<i64>,
    pos: usize,
    len: usize,
    read: u64,
}

impl RunReader {
    /// Bytes of the read buffer for a run of `keys` keys with buffers of at most `buffer_keys`.
    pub(crate) fn buffer_bytes(keys: u64, buffer_keys: usize) -> u64 {
        keys.clamp(1, buffer_keys.max(1) as u64) * KEY_BYTES as u64
    }

    /// Opens `spill`; the reader owns it from now on (and deletes it when dropped).
    pub(crate) fn open(spill: SpillFile, buffer_keys: usize) -> Result<RunReader> {
        let file = File::open(&spill.path)
            .map_err(|e| SortError::io("open spill file", &spill.path, e))?;
        let keys = (Self::buffer_bytes(spill.keys, buffer_keys) / KEY_BYTES as u64) as usize;
        Ok(RunReader {
            file,
            spill,
            buf: vec![0; keys],
            pos: 0,
            len: 0,
            read: 0,
        })
    }

    /// The next key, `None` at the end of the run.
    #[inline]
    pub(crate) fn next_key(&mut self) -> Result<Option<i64>> {
        if self.pos == self.len && !self.refill()? {
            return Ok(None);
        }
        let key = self.buf[self.pos];
        self.pos += 1;
        Ok(Some(key))
    }

    /// Reads the next buffer; false at the end of the file.
    fn refill(&mut self) -> Result<bool> {
        let bytes = as_bytes_mut(&mut self.buf);
        let mut filled = 0;
        while filled < bytes.len() {
            match self.file.read(&mut bytes[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(SortError::io("read spill file", &self.spill.path, e)),
            }
        }
        if filled % KEY_BYTES != 0 {
            return Err(self.corrupt(format!("it ends inside a key ({filled} bytes read)")));
        }
        let n = filled / KEY_BYTES;
        for k in &mut self.buf[..n] {
            *k = i64::from_le(*k);
        }
        self.read += n as u64;
        if self.read > self.spill.keys || (n == 0 && self.read != self.spill.keys) {
            return Err(self.corrupt(format!(
                "{} keys read, {} were written",
                self.read, self.spill.keys
            )));
        }
        self.pos = 0;
        self.len = n;
        Ok(n > 0)
    }

    fn corrupt(&self, message: String) -> SortError {
        SortError::CorruptRun {
            path: self.spill.path.clone(),
            message,
        }
    }
}

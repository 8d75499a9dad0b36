//! # A spilling external sort of `i64` keys under a memory manager
//!
//! [`ExternalSorter`] is a native operator as a query engine would write one, in its own library:
//! it buffers its input in memory it gets from a pool of the task's memory manager (a
//! [`TaskPool`], reached through the engine ABI with `nativemem-client`), so the manager sees and
//! limits it; when memory runs short it writes the buffer to disk as a sorted *run* and frees the
//! memory; the output is a k-way merge of the in-memory buffer and every run.
//!
//! ```text
//!  insert(batch) ──▶ lease the manager (for the call)
//!                    tail chunk has room? ── yes ─▶ copy (under the state lock)
//!                         │ no
//!                         ▼
//!                 pool.allocate(1 MiB)      (no lock held: may call the JVM listener, and may
//!                         │ out of memory    spill this very sorter, on this thread)
//!                         ▼
//!          spill own buffer, retry ── buffer already empty ─▶ Err(OutOfMemory)
//!
//!  Spark / another consumer's grow ─▶ Spiller::spill ─▶ take the chunks (lock), sort + write a
//!  (inside a call on the manager)                       run, free the chunks (no lock held)
//!
//!  sorted() ─▶ sort each chunk ─▶ heap merge: chunks + runs ─▶ batches of up to N keys
//!  (each batch under a lease)     (chunks freed and files deleted as each source runs dry)
//! ```
//!
//! ## Memory
//! - The buffer is a list of fixed-size *chunks* (1 MiB by default), each one
//!   [`Pool::allocate`](nativemem_client::Pool::allocate) block holding `i64`s. A chunk is a
//!   small owning type over the block's [`Allocation`](nativemem_client::Allocation), which frees
//!   it through the table when dropped. 1 MiB keeps the number of allocations small (one per
//!   128 Ki keys) and sorting a chunk cache-friendly; chunks are sorted one by one and merged.
//! - Merge read buffers (one per run, [`SorterOptions::read_buffer_bytes`] at most) are charged
//!   through a [`Reservation`] of the same pool, shrunk as runs end.
//!   If that reservation is refused, the sorter makes room: smaller read buffers (down to
//!   64 KiB), then the in-memory keys written as one more run, then read buffers down to 8 KiB.
//! - Not charged: the spill write buffer ([`SorterOptions::write_buffer_bytes`], one per spill
//!   in progress: a fixed, small scratch) and the output batches handed to the caller.
//! - [`Accounting::Untracked`] takes chunks from the system allocator instead and registers no
//!   spiller: the same code without accounting, for benchmarks. Spills then happen only through
//!   [`SorterOptions::max_buffer_bytes`] (which works in both modes) or [`ExternalSorter::spill`].
//!
//! ## Concurrency and the lock rule
//! The sorter is `Send + Sync`. Its state (the chunk list, the runs, statistics) sits behind one
//! mutex, and **that mutex is never held while calling into the memory manager**: not around
//! [`Pool::allocate`](nativemem_client::Pool::allocate) (it may call the listener, i.e. the JVM,
//! and may spill this sorter), not around a chunk's drop (freeing may hand bytes back to the
//! listener), and not around taking or releasing a lease (releasing the last one may run a
//! deferred close of the manager).
//! Spark calls `spill` while holding its `TaskMemoryManager` monitor; a native thread holding
//! the sorter's mutex while blocked in a listener upcall on that monitor would deadlock with it.
//!
//! - **insert** copies into the tail chunk under the lock. When it needs a new chunk it
//!   releases the lock, allocates, copies into the new chunk, then locks again to append it. A
//!   spill running meanwhile (on another thread, or on this one from inside `allocate`) simply
//!   finds the chunks that were appended so far. If the allocation is refused while another
//!   thread's spill of this sorter is in flight, insert waits for that spill (on a condition
//!   variable, no lock held) and retries; insert is never called from inside an upcall, so the
//!   spilling thread cannot be waiting for it.
//! - **spill** (from any thread) takes the whole chunk list out under the lock and marks a spill
//!   in flight, then sorts and writes the run and frees the chunks with no lock held; inserts go
//!   on into new chunks meanwhile. It locks again only to add the run. A second spill while one
//!   is in flight returns 0 (it never waits: a spiller must not wait for other threads). If
//!   writing fails, the chunks are put back (no key is lost) and the error is returned.
//! - **sorted** and **drop** first unregister the spiller, mark the sorter finished (later spill
//!   calls return 0), and wait for a spill in flight on another thread to finish (it needs no
//!   lock the waiter holds, so this cannot deadlock), then take the chunks and runs out.
//!
//! Spill policy: a spill writes the whole buffer as one run whatever the target, so runs are as
//! long as memory allows and the merge fan-in stays small.
//!
//! The merge is single-pass: every run is open at once, each with a read buffer of 8 KiB to
//! 256 KiB. A sort whose runs need more read buffer than its pool allows at 8 KiB each (e.g.
//! more than 384 runs under a 3 MiB pool) fails with out-of-memory when `sorted` is called.
//!
//! ## Files
//! Runs are files `nativemem-sort-<pid>-<sorter>-<run>.run` under the spill directory (Spark's
//! local dirs), little-endian `i64`s written and read with large buffers. A run file is owned by
//! a value that deletes it when dropped: the sorter, then the merge once `sorted` is called. So
//! files go away when the merge finishes with them, when the output iterator or the sorter is
//! dropped part way, and on error or panic paths.
//!
//! ## Closing the manager under a sorter
//! Through the engine ABI the chunks' memory belongs to the task's manager: its close frees every
//! allocation still live (and reports it as a leak, unless the sorter was dropped first: an
//! operator that must outlive its caller's scope ties itself to the manager with
//! [`Lease::attach`](nativemem_client::Lease::attach), as the JNI layer does). So every call
//! that touches the keys of chunks holds a [`Lease`](nativemem_client::Lease) for its span
//! (`insert`, `spill`, `sorted`, each output batch): the manager's close waits for it and never
//! frees memory under it. A spill callback needs none: the manager calls spillers only from
//! inside a call on it and unregisters them before freeing anything. After a close every
//! operation fails with an error for which [`SortError::is_closed`] holds (taking the lease
//! fails, before any key is touched), and dropping the sorter is safe (the frees are refused as
//! stale and ignored).

use std::fmt;
use std::mem;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use nativemem_client::{BoxError, Code, Reservation, Spiller, SpillerRegistration, TaskPool};
use nativemem_core::human;
use parking_lot::{Condvar, Mutex};

use crate::chunk::{Chunk, ChunkSource};
use crate::error::{Result, SortError};
use crate::merge::{KeySource, Merger, SliceSource};
use crate::run::{RunReader, RunWriter, SpillFile};

const KEY_BYTES: usize = std::mem::size_of::<i64>();

/// Default chunk size: 1 MiB (131,072 keys).
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// Default number of keys per output batch: 64 Ki (512 KiB).
pub const DEFAULT_BATCH_KEYS: usize = 64 << 10;
/// Default write buffer of a spill: 1 MiB.
pub const DEFAULT_WRITE_BUFFER_BYTES: usize = 1 << 20;
/// Default read buffer per run during the merge: 256 KiB.
pub const DEFAULT_READ_BUFFER_BYTES: usize = 256 << 10;

/// Merge read buffers are first shrunk to this before the in-memory keys are spilled for room.
const COMFORTABLE_READ_BUFFER_BYTES: usize = 64 << 10;
/// The smallest merge read buffer per run.
const MIN_READ_BUFFER_BYTES: usize = 8 << 10;

/// Ids that keep the file names of sorters of one process apart.
static NEXT_SORTER_ID: AtomicU64 = AtomicU64::new(1);

/// Where the sorter's buffer memory comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Accounting {
    /// Chunks are allocated from the pool ([`Pool::allocate`](nativemem_client::Pool::allocate)):
    /// charged to it, limited, spillable by the manager.
    #[default]
    Pool,
    /// Chunks come from the system allocator; the manager sees nothing and no spiller is
    /// registered. For benchmarks comparing accounting on and off with the same code.
    Untracked,
}

/// Options of an [`ExternalSorter`]. All sizes are in bytes unless named `_keys`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SorterOptions {
    /// Size of one buffer chunk, a positive multiple of 8. Default 1 MiB.
    pub chunk_bytes: usize,
    /// Most keys per output batch, > 0. Default 64 Ki.
    pub batch_keys: usize,
    /// Write buffer of a spill, >= 8. Default 1 MiB.
    pub write_buffer_bytes: usize,
    /// Most read buffer per run during the merge, >= 8. Default 256 KiB.
    pub read_buffer_bytes: usize,
    /// Spill before the buffer would exceed this many bytes (>= `chunk_bytes`), whatever the
    /// pool allows. Default none: only the pool's limits and the manager decide.
    pub max_buffer_bytes: Option<u64>,
    /// Tracked through the pool (default) or untracked.
    pub accounting: Accounting,
}

impl Default for SorterOptions {
    fn default() -> Self {
        SorterOptions {
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            batch_keys: DEFAULT_BATCH_KEYS,
            write_buffer_bytes: DEFAULT_WRITE_BUFFER_BYTES,
            read_buffer_bytes: DEFAULT_READ_BUFFER_BYTES,
            max_buffer_bytes: None,
            accounting: Accounting::Pool,
        }
    }
}

impl SorterOptions {
    /// Returns a copy with the chunk size set, in bytes.
    pub fn with_chunk_bytes(mut self, bytes: usize) -> Self {
        self.chunk_bytes = bytes;
        self
    }

    /// Returns a copy with the output batch size set, in keys.
    pub fn with_batch_keys(mut self, keys: usize) -> Self {
        self.batch_keys = keys;
        self
    }

    /// Returns a copy with the spill write buffer set, in bytes.
    pub fn with_write_buffer_bytes(mut self, bytes: usize) -> Self {
        self.write_buffer_bytes = bytes;
        self
    }

    /// Returns a copy with the per-run merge read buffer set, in bytes.
    pub fn with_read_buffer_bytes(mut self, bytes: usize) -> Self {
        self.read_buffer_bytes = bytes;
        self
    }

    /// Returns a copy with the self-imposed buffer limit set, in bytes (`None` removes it).
    pub fn with_max_buffer_bytes(mut self, bytes: Option<u64>) -> Self {
        self.max_buffer_bytes = bytes;
        self
    }

    /// Returns a copy with the accounting mode set.
    pub fn with_accounting(mut self, accounting: Accounting) -> Self {
        self.accounting = accounting;
        self
    }

    /// Checks the values; on error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(SortError::InvalidArgument(msg));
        if self.chunk_bytes == 0 || self.chunk_bytes % KEY_BYTES != 0 {
            return bad(format!(
                "chunk_bytes must be a positive multiple of {KEY_BYTES}, got {}",
                self.chunk_bytes
            ));
        }
        if self.batch_keys == 0 {
            return bad("batch_keys must be > 0".to_string());
        }
        if self.write_buffer_bytes < KEY_BYTES || self.read_buffer_bytes < KEY_BYTES {
            return bad(format!(
                "write_buffer_bytes and read_buffer_bytes must be >= {KEY_BYTES}, got {} and {}",
                self.write_buffer_bytes, self.read_buffer_bytes
            ));
        }
        if let Some(max) = self.max_buffer_bytes {
            if max < self.chunk_bytes as u64 {
                return bad(format!(
                    "max_buffer_bytes ({max}) must be at least chunk_bytes ({})",
                    self.chunk_bytes
                ));
            }
        }
        Ok(())
    }
}

/// What a sorter did, for reports. Sizes in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SorterStats {
    /// Keys inserted.
    pub rows_inserted: u64,
    /// Keys handed out by the merge so far.
    pub rows_output: u64,
    /// Keys written to spill files.
    pub rows_spilled: u64,
    /// Bytes written to spill files.
    pub bytes_spilled: u64,
    /// Spill files written (one per spill).
    pub runs: u64,
    /// Time spent spilling: sorting, writing and freeing.
    pub spill_time: Duration,
    /// Bytes the sorter holds now (chunks and merge read buffers).
    pub memory_bytes: u64,
    /// The most bytes it held at once.
    pub peak_memory_bytes: u64,
}

impl fmt::Display for SorterStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rows {}, peak memory {}, spilled {} in {} runs ({:.3} s)",
            self.rows_inserted,
            human(self.peak_memory_bytes),
            human(self.bytes_spilled),
            self.runs,
            self.spill_time.as_secs_f64()
        )
    }
}

/// A spilling external sort of `i64` keys whose buffer is charged to a [`TaskPool`].
///
/// See the [module documentation](self) for the design, the memory it charges and the lock rule.
/// `Send + Sync`; [`insert`](Self::insert) takes `&self` (concurrent inserts are safe, the keys
/// of all of them are sorted together), [`sorted`](Self::sorted) consumes the sorter.
/// Dropping it frees its memory and deletes its spill files.
pub struct ExternalSorter {
    shared: Arc<Shared>,
    /// Keeps the spiller registered; `None` when untracked or once finishing.
    registration: Option<SpillerRegistration>,
}

impl fmt::Debug for ExternalSorter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExternalSorter")
            .field("name", &self.shared.name)
            .field("spill_dir", &self.shared.spill_dir)
            .field("stats", &self.stats())
            .finish()
    }
}

/// The part of a sorter its spiller and its output share.
struct Shared {
    name: String,
    /// `pool path/name`, for logs.
    label: String,
    spill_dir: PathBuf,
    file_prefix: String,
    options: SorterOptions,
    chunks: Arc<ChunkSource>,
    /// The pool, when tracked (merge read buffers are reserved from it).
    pool: Option<TaskPool>,
    state: Mutex<State>,
    /// Signalled when a spill in flight ends.
    spill_done: Condvar,
    next_run: AtomicU64,
    /// The error of the last spill callback of this sorter that failed, and the thread it ran
    /// on. The ABI passes a spiller's failure on as a bare `NM_ERR_SPILL`; an insert whose own
    /// allocation made this sorter spill (on the inserting thread) reports this error instead.
    /// Its own mutex, held only to store or take the value.
    failed_spill: Mutex<Option<(ThreadId, SortError)>>,
}

/// Guarded by `Shared::state`. Dropping chunks or runs while the guard is held is a bug (the lock
/// rule): they are always moved out and dropped after unlocking.
#[derive(Default)]
struct State {
    /// Buffered keys, unsorted.
    buffer: Vec<Chunk>,
    /// Runs written so far.
    runs: Vec<SpillFile>,
    /// The thread running a spill, which owns the chunks it took out of `buffer`.
    spilling: Option<ThreadId>,
    /// Set by `sorted` and drop: no more spills.
    finished: bool,
    /// Set when a spill panicked and lost keys.
    broken: Option<String>,
    rows_inserted: u64,
    rows_spilled: u64,
    runs_written: u64,
    spill_time: Duration,
}

/// What one call to `Shared::spill_buffer` did.
enum Spilled {
    /// Wrote a run and freed this many bytes.
    Freed(u64),
    /// Nothing to spill (empty buffer, or finished).
    Nothing,
    /// Another spill is in flight.
    InFlight,
}

impl ExternalSorter {
    /// Creates a sorter named `name` that buffers in `pool` and spills to files under
    /// `spill_dir` (created if missing). Registers its spiller on `pool` unless untracked.
    ///
    /// Errors: bad options ([`SortError::InvalidArgument`]), the spill directory
    /// ([`SortError::Io`]), the registration of the spiller (the manager is closed).
    pub fn new(
        pool: &TaskPool,
        name: impl Into<String>,
        spill_dir: impl Into<PathBuf>,
        options: SorterOptions,
    ) -> Result<ExternalSorter> {
        options.validate()?;
        let name = name.into();
        let spill_dir = spill_dir.into();
        std::fs::create_dir_all(&spill_dir)
            .map_err(|e| SortError::io("create spill directory", &spill_dir, e))?;
        let tracked = options.accounting == Accounting::Pool;
        let pool = tracked.then(|| pool.clone());
        let label = match &pool {
            Some(p) => format!("{}/{name}", p.path()),
            None => format!("untracked/{name}"),
        };
        // Relaxed: a unique id is all that is needed; nothing is published through it.
        let id = NEXT_SORTER_ID.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            file_prefix: format!("nativemem-sort-{}-{id}", std::process::id()),
            chunks: Arc::new(ChunkSource::new(pool.clone(), options.chunk_bytes)?),
            pool: pool.clone(),
            name,
            label,
            spill_dir,
            options,
            state: Mutex::new(State::default()),
            spill_done: Condvar::new(),
            next_run: AtomicU64::new(0),
            failed_spill: Mutex::new(None),
        });
        let registration = match pool {
            Some(p) => {
                let spiller = Arc::new(SorterSpiller::new(Arc::downgrade(&shared), p.manager()));
                Some(p.pool().register_spiller(&shared.name, spiller)?)
            }
            None => None,
        };
        Ok(ExternalSorter {
            shared,
            registration,
        })
    }

    /// The sorter's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The directory its spill files go to.
    pub fn spill_dir(&self) -> &Path {
        &self.shared.spill_dir
    }

    /// Its options.
    pub fn options(&self) -> &SorterOptions {
        &self.shared.options
    }

    /// A snapshot of its statistics.
    pub fn stats(&self) -> SorterStats {
        self.shared.stats(0)
    }

    /// Buffers `batch`. If a new chunk is refused for lack of memory, spills the buffer and
    /// tries again; if even an empty buffer cannot get one chunk, returns the out-of-memory
    /// error.
    ///
    /// On error a prefix of `batch` may have been buffered ([`SorterStats::rows_inserted`] counts
    /// every key buffered so far): the caller can retry with the rest or abandon the sort. Must
    /// not be called while holding a lock that a spill of this sorter's manager might need.
    pub fn insert(&self, batch: &[i64]) -> Result<()> {
        let shared = &*self.shared;
        // Held for the whole call (declared first, released last): the chunks' memory stays.
        let _lease = shared.chunks.lease()?;
        let mut rest = batch;
        loop {
            {
                let mut guard = shared.state.lock();
                let st = &mut *guard;
                st.check_usable(&shared.name)?;
                if let Some(tail) = st.buffer.last_mut().filter(|c| !c.is_full()) {
                    let n = tail.push_from(rest);
                    st.rows_inserted += n as u64;
                    rest = &rest[n..];
                }
            }
            if rest.is_empty() {
                return Ok(());
            }
            // No lock held: allocating may call the listener and spill this sorter.
            let mut chunk = shared.obtain_chunk()?;
            let n = chunk.push_from(rest);
            rest = &rest[n..];
            let mut st = shared.state.lock();
            if let Err(e) = st.check_usable(&shared.name) {
                drop(st);
                drop(chunk);
                return Err(e);
            }
            st.buffer.push(chunk);
            st.rows_inserted += n as u64;
        }
    }

    /// Writes the buffer as a sorted run now and frees it; returns the bytes freed (0 if the
    /// buffer was empty or another spill was in flight).
    pub fn spill(&self) -> Result<u64> {
        let _lease = self.shared.chunks.lease()?;
        match self.shared.spill_buffer()? {
            Spilled::Freed(bytes) => Ok(bytes),
            Spilled::Nothing | Spilled::InFlight => Ok(0),
        }
    }

    /// Finishes the input and returns the keys in ascending order, in batches of up to
    /// [`SorterOptions::batch_keys`]. An error while preparing the merge is the first item.
    ///
    /// The merge holds the in-memory chunks (sorted one by one) and a read buffer per run;
    /// chunks are freed and run files deleted as the merge consumes them, and whatever is left
    /// when the iterator is dropped.
    pub fn sorted(self) -> SortedBatches {
        let shared = self.shared.clone();
        match self.into_merge() {
            Ok(merge) => SortedBatches {
                shared,
                merge: Some(merge),
                error: None,
                failed: false,
                rows_output: 0,
            },
            Err(e) => SortedBatches {
                shared,
                merge: None,
                error: Some(e),
                failed: false,
                rows_output: 0,
            },
        }
    }

    fn into_merge(mut self) -> Result<Merger<Source>> {
        let shared = self.shared.clone();
        drop(self.registration.take());
        let (mut buffer, mut runs) = shared.finish()?;
        drop(self);
        // Held until the merge has read the first key of every source. On error, `buffer` and
        // `runs` (declared before it) are dropped after it is released: no lock is held then.
        let _lease = shared.chunks.lease()?;
        let (reservation, read_keys) = shared.reserve_merge_buffers(&mut buffer, &mut runs)?;
        for chunk in &mut buffer {
            chunk.as_mut_slice().sort_unstable();
        }
        let mut sources = Vec::with_capacity(buffer.len() + runs.len());
        sources.extend(
            buffer
                .into_iter()
                .map(|chunk| Source::Memory { chunk, pos: 0 }),
        );
        for run in runs {
            let bytes = RunReader::buffer_bytes(run.keys(), read_keys);
            let budget = ReadBudget::new(reservation.clone(), bytes, shared.chunks.clone());
            sources.push(Source::Run {
                reader: RunReader::open(run, read_keys)?,
                _budget: budget,
            });
        }
        // Whatever the reservation holds beyond the budgets (nothing, normally) goes back now.
        drop(reservation);
        Merger::new(sources)
    }
}

impl Drop for ExternalSorter {
    fn drop(&mut self) {
        drop(self.registration.take());
        // Whether or not the content was complete, what the sorter held is released.
        let (taken, _incomplete) = self.shared.finish_and_take();
        // Dropped here, with no lock held: frees the chunks, deletes the run files.
        drop(taken);
    }
}

impl Shared {
    fn stats(&self, rows_output: u64) -> SorterStats {
        let st = self.state.lock();
        SorterStats {
            rows_inserted: st.rows_inserted,
            rows_output,
            rows_spilled: st.rows_spilled,
            bytes_spilled: st.rows_spilled * KEY_BYTES as u64,
            runs: st.runs_written,
            spill_time: st.spill_time,
            memory_bytes: self.chunks.meter.held(),
            peak_memory_bytes: self.chunks.meter.peak(),
        }
    }

    /// Bytes a spill would free now.
    fn spillable_bytes(&self) -> u64 {
        let st = self.state.lock();
        if st.spilling.is_some() || st.finished || st.broken.is_some() {
            return 0;
        }
        st.buffer.len() as u64 * self.chunks.chunk_bytes()
    }

    /// A new chunk, spilling this sorter's buffer when memory is short. Call with no lock held.
    fn obtain_chunk(&self) -> Result<Chunk> {
        if let Some(max) = self.options.max_buffer_bytes {
            let buffered = self.state.lock().buffer.len() as u64 * self.chunks.chunk_bytes();
            if buffered + self.chunks.chunk_bytes() > max {
                self.make_room()?;
            }
        }
        loop {
            match self.chunks.allocate() {
                Ok(chunk) => return Ok(chunk),
                Err(e) if e.is_out_of_memory() => {
                    if !self.make_room()? {
                        return Err(e.into());
                    }
                }
                // Our own spill, run by this allocation on this thread, failed: say why.
                Err(e) if e.code == Code::Spill => {
                    return Err(self.own_failed_spill().unwrap_or(e.into()))
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The error of a spill callback of this sorter that failed on this thread, if any (taken).
    fn own_failed_spill(&self) -> Option<SortError> {
        let mut slot = self.failed_spill.lock();
        match &*slot {
            Some((thread, _)) if *thread == thread::current().id() => slot.take().map(|(_, e)| e),
            _ => None,
        }
    }

    /// Spills the buffer, or waits for a spill in flight on another thread; false if there was
    /// nothing to spill.
    fn make_room(&self) -> Result<bool> {
        match self.spill_buffer()? {
            Spilled::Freed(_) => Ok(true),
            Spilled::Nothing => Ok(false),
            Spilled::InFlight => {
                let mut st = self.state.lock();
                let me = thread::current().id();
                if st.spilling == Some(me) {
                    // Re-entered from our own spill: waiting would never end.
                    return Ok(false);
                }
                while st.spilling.is_some() {
                    self.spill_done.wait(&mut st);
                }
                Ok(true)
            }
        }
    }

    /// Takes the buffer out, writes it as one sorted run and frees it. See the module docs.
    /// Called with the manager pinned open: under a lease of the caller, or from the spiller
    /// (inside a call on the manager).
    fn spill_buffer(&self) -> Result<Spilled> {
        let mut chunks = {
            let mut st = self.state.lock();
            if st.spilling.is_some() {
                return Ok(Spilled::InFlight);
            }
            if st.finished || st.broken.is_some() || st.buffer.is_empty() {
                return Ok(Spilled::Nothing);
            }
            st.spilling = Some(thread::current().id());
            mem::take(&mut st.buffer)
        };
        // Declared after `chunks`, so on a panic it runs first (with the lock), then the chunks
        // are freed with no lock held.
        let in_flight = InFlight {
            shared: self,
            ended: false,
        };
        match self.spill_chunks(&mut chunks) {
            Ok((run, freed, elapsed)) => {
                in_flight.end(|st| {
                    st.record_spill(run.keys(), elapsed);
                    st.runs.push(run);
                });
                Ok(Spilled::Freed(freed))
            }
            Err(e) => {
                // Nothing is lost: the (now sorted) chunks go back into the buffer.
                in_flight.end(|st| st.buffer.append(&mut chunks));
                log::warn!("[{}] spill failed, buffer kept in memory: {e}", self.label);
                Err(e)
            }
        }
    }

    /// Sorts `chunks`, writes them as one run, and on success frees them (the vector is left
    /// empty). Returns the run, the bytes freed and the time taken. On error the chunks stay.
    fn spill_chunks(&self, chunks: &mut Vec<Chunk>) -> Result<(SpillFile, u64, Duration)> {
        let started = Instant::now();
        for chunk in chunks.iter_mut() {
            chunk.as_mut_slice().sort_unstable();
        }
        // Relaxed: only uniqueness of the number matters.
        let run_no = self.next_run.fetch_add(1, Ordering::Relaxed);
        let path = self
            .spill_dir
            .join(format!("{}-{run_no}.run", self.file_prefix));
        let mut writer = RunWriter::create(path, self.options.write_buffer_bytes / KEY_BYTES)?;
        if let [only] = chunks.as_slice() {
            writer.extend(only.as_slice())?;
        } else {
            let sources = chunks
                .iter()
                .map(|c| SliceSource::new(c.as_slice()))
                .collect();
            let mut merge = Merger::new(sources)?;
            while let Some(key) = merge.next_key()? {
                writer.push(key)?;
            }
        }
        let path = writer.path().to_path_buf();
        let run = writer.finish()?;
        let freed: u64 = chunks.drain(..).map(Chunk::release).sum();
        let elapsed = started.elapsed();
        log::debug!(
            "[{}] spilled {} ({} keys) to {} in {:.1} ms",
            self.label,
            human(freed),
            run.keys(),
            path.display(),
            elapsed.as_secs_f64() * 1e3
        );
        Ok((run, freed, elapsed))
    }

    /// Marks the sorter finished, waits for a spill in flight on another thread, and takes the
    /// buffer and the runs out. Fails if the sorter is broken, or if a spill of this thread is
    /// in flight (re-entered from it); what was taken is then dropped, with no lock held.
    fn finish(&self) -> Result<(Vec<Chunk>, Vec<SpillFile>)> {
        let (taken, problem) = self.finish_and_take();
        match problem {
            None => Ok(taken),
            Some(reason) => Err(SortError::Unusable {
                sorter: self.name.clone(),
                reason,
            }),
        }
    }

    /// As [`finish`](Self::finish), but hands back what it took whatever happened, with the
    /// reason the sorter's content is incomplete, if it is.
    #[allow(clippy::type_complexity)]
    fn finish_and_take(&self) -> ((Vec<Chunk>, Vec<SpillFile>), Option<String>) {
        let mut st = self.state.lock();
        st.finished = true;
        let me = thread::current().id();
        let mut problem = None;
        while let Some(spiller) = st.spilling {
            if spiller == me {
                problem = Some("its output was asked for from inside its own spill".to_string());
                break;
            }
            self.spill_done.wait(&mut st);
        }
        let taken = (mem::take(&mut st.buffer), mem::take(&mut st.runs));
        (taken, problem.or_else(|| st.broken.clone()))
    }

    /// Reserves the merge read buffers (one per run); returns the reservation (when tracked)
    /// and the read buffer size per run, in keys. When refused for lack of memory it makes room
    /// step by step, retrying after each: halve the read buffers down to 64 KiB, then write the
    /// in-memory keys as one more run (freeing their chunks), then halve the read buffers down to
    /// 8 KiB. Only then is the out-of-memory error returned.
    fn reserve_merge_buffers(
        &self,
        buffer: &mut Vec<Chunk>,
        runs: &mut Vec<SpillFile>,
    ) -> Result<(Option<Arc<Reservation>>, usize)> {
        let configured = self.options.read_buffer_bytes;
        let Some(pool) = &self.pool else {
            return Ok((None, configured / KEY_BYTES));
        };
        let comfortable = COMFORTABLE_READ_BUFFER_BYTES.min(configured);
        let floor = MIN_READ_BUFFER_BYTES.min(configured);
        let reservation = Arc::new(pool.pool().reservation(&format!("{}.merge", self.name))?);
        let mut read_bytes = configured;
        loop {
            let read_keys = read_bytes / KEY_BYTES;
            let need: u64 = runs
                .iter()
                .map(|r| RunReader::buffer_bytes(r.keys(), read_keys))
                .sum();
            let err = match reservation.try_grow(need) {
                Ok(()) => return Ok((Some(reservation), read_keys)),
                Err(e) if e.is_out_of_memory() => e,
                Err(e) => return Err(e.into()),
            };
            log::debug!(
                "[{}] no room for {} of merge read buffers ({} runs, {} each)",
                self.label,
                human(need),
                runs.len(),
                human(read_bytes as u64)
            );
            if read_bytes > comfortable {
                read_bytes = (read_bytes / 2).max(comfortable);
            } else if !buffer.is_empty() {
                let (run, _, elapsed) = self.spill_chunks(buffer)?;
                self.state.lock().record_spill(run.keys(), elapsed);
                runs.push(run);
            } else if read_bytes > floor {
                read_bytes = (read_bytes / 2).max(floor);
            } else {
                return Err(err.into());
            }
        }
    }
}

impl State {
    fn check_usable(&self, name: &str) -> Result<()> {
        let reason = if let Some(reason) = &self.broken {
            reason.clone()
        } else if self.finished {
            "its output was already taken".to_string()
        } else {
            return Ok(());
        };
        Err(SortError::Unusable {
            sorter: name.to_string(),
            reason,
        })
    }

    fn record_spill(&mut self, keys: u64, elapsed: Duration) {
        self.rows_spilled += keys;
        self.runs_written += 1;
        self.spill_time += elapsed;
    }
}

/// Marks the end of a spill in flight: clears `spilling` and wakes waiters. If dropped without
/// [`end`](Self::end) (a panic while spilling), the keys the spill took are lost, so the sorter
/// is marked broken.
struct InFlight<'a> {
    shared: &'a Shared,
    ended: bool,
}

impl InFlight<'_> {
    fn end(mut self, update: impl FnOnce(&mut State)) {
        {
            let mut st = self.shared.state.lock();
            update(&mut st);
            st.spilling = None;
        }
        self.shared.spill_done.notify_all();
        self.ended = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        {
            let mut st = self.shared.state.lock();
            st.spilling = None;
            st.broken = Some("a spill panicked and lost buffered keys".to_string());
        }
        self.shared.spill_done.notify_all();
    }
}

/// The spiller registered on the pool. Holds the sorter weakly: the manager must not keep the
/// sorter alive (an operator is dropped by its owner, or by the manager's close through an
/// attachment), and the sorter holds handles of the manager's objects.
///
/// The manager calls it only from inside a call on itself (a grow that found no room, Spark's
/// spill request), so the chunks' memory is alive while it runs without a lease of its own
/// (taking one could even fail while a close waits for that very call).
struct SorterSpiller {
    shared: Weak<Shared>,
    /// The manager it is registered with (tests count live spillers per manager).
    #[cfg(test)]
    manager: i64,
}

/// Spillers of sorters alive per manager handle, for tests: the ABI has no read-out of the
/// manager's spillers, but the client drops a spiller exactly when it is unregistered (by the
/// sorter or by the manager's close), so a live `SorterSpiller` is a registered one.
#[cfg(test)]
static LIVE_SPILLERS: std::sync::Mutex<std::collections::BTreeMap<i64, usize>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Registered spillers of sorters on the manager `manager` (tests).
#[cfg(test)]
pub(crate) fn registered_spillers(manager: i64) -> usize {
    let live = LIVE_SPILLERS.lock().unwrap_or_else(|e| e.into_inner());
    live.get(&manager).copied().unwrap_or(0)
}

#[cfg(test)]
impl SorterSpiller {
    fn new(shared: Weak<Shared>, manager: i64) -> SorterSpiller {
        let mut live = LIVE_SPILLERS.lock().unwrap_or_else(|e| e.into_inner());
        *live.entry(manager).or_insert(0) += 1;
        SorterSpiller { shared, manager }
    }
}

#[cfg(test)]
impl Drop for SorterSpiller {
    fn drop(&mut self) {
        let mut live = LIVE_SPILLERS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = live.get_mut(&self.manager) {
            *n -= 1;
        }
    }
}

#[cfg(not(test))]
impl SorterSpiller {
    fn new(shared: Weak<Shared>, _manager: i64) -> SorterSpiller {
        SorterSpiller { shared }
    }
}

impl Spiller for SorterSpiller {
    fn spillable_bytes(&self) -> u64 {
        self.shared.upgrade().map_or(0, |s| s.spillable_bytes())
    }

    fn spill(&self, _target: u64) -> std::result::Result<u64, BoxError> {
        let Some(shared) = self.shared.upgrade() else {
            return Ok(0);
        };
        match shared.spill_buffer() {
            Ok(Spilled::Freed(bytes)) => Ok(bytes),
            Ok(Spilled::Nothing | Spilled::InFlight) => Ok(0),
            // The manager reports it as a bare NM_ERR_SPILL to the request that needed the
            // memory; the error itself is kept for an insert of this sorter on this thread.
            Err(e) => {
                let text = e.to_string();
                *shared.failed_spill.lock() = Some((thread::current().id(), e));
                Err(text.into())
            }
        }
    }
}

/// Bytes of a merge read buffer: charged to the merge reservation (when tracked) and the meter
/// until the run is finished.
struct ReadBudget {
    reservation: Option<Arc<Reservation>>,
    bytes: u64,
    chunks: Arc<ChunkSource>,
}

impl ReadBudget {
    fn new(reservation: Option<Arc<Reservation>>, bytes: u64, chunks: Arc<ChunkSource>) -> Self {
        chunks.meter.add(bytes);
        ReadBudget {
            reservation,
            bytes,
            chunks,
        }
    }
}

impl Drop for ReadBudget {
    fn drop(&mut self) {
        self.chunks.meter.sub(self.bytes);
        if let Some(res) = &self.reservation {
            match res.shrink(self.bytes) {
                Ok(()) => {}
                // The manager closed first and released the reservation with it.
                Err(e) if matches!(e.code, Code::StaleHandle | Code::Closed) => {
                    log::debug!("releasing a merge read buffer after the manager closed: {e}")
                }
                Err(e) => log::warn!("releasing a merge read buffer: {e}"),
            }
        }
    }
}

/// One input of the final merge.
enum Source {
    /// A sorted chunk of the in-memory buffer, freed when exhausted.
    Memory { chunk: Chunk, pos: usize },
    /// A run on disk, deleted (and its read buffer released) when exhausted.
    Run {
        reader: RunReader,
        _budget: ReadBudget,
    },
}

impl KeySource for Source {
    #[inline]
    fn next_key(&mut self) -> Result<Option<i64>> {
        match self {
            Source::Memory { chunk, pos } => {
                let key = chunk.as_slice().get(*pos).copied();
                *pos += 1;
                Ok(key)
            }
            Source::Run { reader, .. } => reader.next_key(),
        }
    }
}

/// The sorted output of an [`ExternalSorter`]: an iterator of batches of ascending keys.
///
/// Pull-based: each [`next`](Iterator::next) (or [`next_batch_into`](Self::next_batch_into),
/// which reuses the caller's vector) merges one batch. After an error the iterator ends. Memory
/// and files are released as the merge goes and when it is dropped. `Send`.
pub struct SortedBatches {
    shared: Arc<Shared>,
    merge: Option<Merger<Source>>,
    /// An error from preparing the merge, returned by the first call.
    error: Option<SortError>,
    /// Set once a call failed: later calls fail too (never an early "end of output", which
    /// would silently drop the keys not yet returned).
    failed: bool,
    rows_output: u64,
}

impl fmt::Debug for SortedBatches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SortedBatches")
            .field("name", &self.shared.name)
            .field("done", &self.merge.is_none())
            .field("stats", &self.stats())
            .finish()
    }
}

impl SortedBatches {
    /// Statistics of the sorter, with the keys output so far.
    pub fn stats(&self) -> SorterStats {
        self.shared.stats(self.rows_output)
    }

    /// Clears `out` and fills it with the next batch (up to [`SorterOptions::batch_keys`] keys).
    /// Returns `Ok(false)`, with `out` empty, once every key was returned.
    pub fn next_batch_into(&mut self, out: &mut Vec<i64>) -> Result<bool> {
        out.clear();
        if let Some(e) = self.error.take() {
            self.failed = true;
            return Err(e);
        }
        if self.failed {
            return Err(SortError::Unusable {
                sorter: self.shared.name.clone(),
                reason: "its output failed earlier; the keys not yet returned are lost".to_string(),
            });
        }
        let Some(merge) = &mut self.merge else {
            return Ok(false);
        };
        // Held while the merge reads chunks (and frees those that run dry).
        let _lease = match self.shared.chunks.lease() {
            Ok(lease) => lease,
            Err(e) => {
                // The merge is dropped without reading it (dropping frees nothing under anyone).
                self.merge = None;
                self.failed = true;
                return Err(e);
            }
        };
        let max = self.shared.options.batch_keys;
        match merge.fill(out, max) {
            Ok(n) => {
                self.rows_output += n as u64;
                if n < max {
                    // Every source ran dry (and was dropped): nothing is left.
                    self.merge = None;
                }
                Ok(n > 0)
            }
            Err(e) => {
                out.clear();
                self.merge = None;
                self.failed = true;
                Err(e)
            }
        }
    }
}

impl Iterator for SortedBatches {
    type Item = Result<Vec<i64>>;

    fn next(&mut self) -> Option<Self::Item> {
        // Like other fallible iterators, it ends after returning an error.
        if self.failed || (self.merge.is_none() && self.error.is_none()) {
            return None;
        }
        let remaining = self.stats().rows_inserted.saturating_sub(self.rows_output);
        let cap = (remaining as usize).min(self.shared.options.batch_keys);
        let mut out = Vec::with_capacity(cap);
        match self.next_batch_into(&mut out) {
            Ok(true) => Some(Ok(out)),
            Ok(false) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

impl std::iter::FusedIterator for SortedBatches {}

/// Checks that the sorter's types stay usable from JNI (handles shared across threads).
#[allow(dead_code)]
fn assert_thread_safety() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<ExternalSorter>();
    send::<SortedBatches>();
    send_sync::<TaskPool>();
}

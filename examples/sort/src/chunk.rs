//! Fixed-size buffers of keys whose memory comes from a pool of the task's manager (or,
//! untracked, from the system allocator), and the meter of what a sorter holds.
//!
//! A [`Chunk`] owns one block of `chunk_bytes` bytes like a `Box<[MaybeUninit<i64>]>` would, with
//! a length: keys `0..len` are initialized. A tracked block is an [`Allocation`] of the pool
//! ([`Pool::allocate`](nativemem_client::Pool::allocate)); dropping the chunk drops it, which frees
//! it through the table so the pool's `used` goes down (untracked blocks are `dealloc`ated).
//! Dropping a chunk may therefore call the reservation listener (the manager hands surplus back to
//! the JVM): never drop one while holding a lock (the lock rule).
//!
//! **The memory of a tracked block belongs to the task's manager**: its close frees every
//! allocation still live. So keys in a chunk are only read or written while the manager is pinned
//! open: by a [`Lease`] taken for the call ([`ChunkSource::lease`]), or inside a spill callback
//! (the manager calls spillers only from inside a call on it, and unregisters them before its
//! close frees anything). Dropping a chunk after the close is harmless: the free is refused as
//! stale and ignored.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nativemem_client::{Allocation, Lease, TaskPool};

use crate::error::{Result, SortError};

/// Alignment of a chunk: a cache line, so sorting never splits a key across lines.
pub(crate) const CHUNK_ALIGN: usize = 64;

const KEY_BYTES: usize = std::mem::size_of::<i64>();

/// Bytes held by one sorter (chunks plus merge read buffers) now and at most.
///
/// Orderings: both counters are statistics read for reports; no other memory is published
/// through them, so `Relaxed` is enough (each RMW is still atomic on its own counter).
#[derive(Debug, Default)]
pub(crate) struct Meter {
    held: AtomicU64,
    peak: AtomicU64,
}

impl Meter {
    pub(crate) fn add(&self, bytes: u64) {
        let now = self.held.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    pub(crate) fn sub(&self, bytes: u64) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub(crate) fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    pub(crate) fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

/// Where a sorter's chunks come from, and its meter.
#[derive(Debug)]
pub(crate) struct ChunkSource {
    /// `Some`: allocations through the pool (tracked). `None`: the system allocator.
    pool: Option<TaskPool>,
    layout: Layout,
    pub(crate) meter: Meter,
}

impl ChunkSource {
    /// A source of chunks of `chunk_bytes` bytes (a positive multiple of 8).
    pub(crate) fn new(pool: Option<TaskPool>, chunk_bytes: usize) -> Result<ChunkSource> {
        if chunk_bytes == 0 || chunk_bytes % KEY_BYTES != 0 {
            return Err(SortError::InvalidArgument(format!(
                "chunk size must be a positive multiple of {KEY_BYTES} bytes, got {chunk_bytes}"
            )));
        }
        let layout = Layout::from_size_align(chunk_bytes, CHUNK_ALIGN).map_err(|_| {
            SortError::InvalidArgument(format!("chunk size {chunk_bytes} bytes is too large"))
        })?;
        Ok(ChunkSource {
            pool,
            layout,
            meter: Meter::default(),
        })
    }

    /// Bytes of one chunk.
    pub(crate) fn chunk_bytes(&self) -> u64 {
        self.layout.size() as u64
    }

    /// Pins the task's manager open for the span of a call that touches the keys of tracked
    /// chunks (`None` when untracked: nothing to pin). Fails once the manager is closing or
    /// closed ([`SortError::is_closed`]): its close frees the chunks' memory, so the sorter
    /// stops with a clear error instead. Take it with no lock held (releasing it may run a
    /// deferred close).
    pub(crate) fn lease(&self) -> Result<Option<Lease>> {
        match &self.pool {
            Some(pool) => Ok(Some(pool.lease()?)),
            None => Ok(None),
        }
    }

    /// Allocates one empty chunk. Through the pool, this may spill native consumers (this
    /// sorter included) and call the listener; the caller must hold no lock, and a lease (or be
    /// inside a call on the manager).
    pub(crate) fn allocate(self: &Arc<Self>) -> Result<Chunk, nativemem_client::Error> {
        let (raw, owner) = match &self.pool {
            Some(pool) => {
                let block = pool
                    .pool()
                    .allocate(self.layout.size(), self.layout.align())?;
                (block.as_ptr(), Some(block))
            }
            None => {
                // SAFETY: the layout has a non-zero size (checked in `new`) and a power-of-two
                // alignment (`Layout::from_size_align` succeeded).
                let raw = unsafe { std::alloc::alloc(self.layout) };
                // Untracked memory fails like a `Vec` would: there is no pool to report from.
                let raw = NonNull::new(raw)
                    .unwrap_or_else(|| std::alloc::handle_alloc_error(self.layout));
                (raw, None)
            }
        };
        self.meter.add(self.chunk_bytes());
        Ok(Chunk {
            ptr: raw.cast::<i64>(),
            len: 0,
            cap: self.layout.size() / KEY_BYTES,
            owner,
            source: self.clone(),
        })
    }

    /// Frees a block of this source: a tracked block by dropping its owning [`Allocation`]
    /// (which gives its bytes back to the pool; if the manager was closed first, its close freed
    /// the memory already and the drop does nothing), an untracked one with `dealloc`.
    fn free(&self, ptr: NonNull<i64>, owner: Option<Allocation>) {
        self.meter.sub(self.chunk_bytes());
        match owner {
            Some(block) => drop(block),
            None => {
                // SAFETY: the block was returned by `std::alloc::alloc(self.layout)` in
                // `allocate` (untracked) and its only owner, the chunk, is being dropped.
                unsafe { std::alloc::dealloc(ptr.as_ptr().cast::<u8>(), self.layout) };
            }
        }
    }
}

/// A fixed-capacity buffer of keys in one block of a [`ChunkSource`]. Freed on drop.
pub(crate) struct Chunk {
    /// Start of the block: `cap` keys, aligned to [`CHUNK_ALIGN`], the first `len` initialized.
    ptr: NonNull<i64>,
    len: usize,
    cap: usize,
    /// The owning allocation of a tracked block: the memory stays valid while it lives and the
    /// manager is open (see the module docs). `None` for untracked blocks.
    owner: Option<Allocation>,
    source: Arc<ChunkSource>,
}

// SAFETY: a chunk is the only owner of its block (no other pointer to it is kept anywhere but in
// the manager's allocation table, which never reads it), like a `Box<[i64]>`; moving it to another
// thread moves that ownership. `ChunkSource` is `Send + Sync` (a `TaskPool`, a `Layout`, atomics).
unsafe impl Send for Chunk {}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunk")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

impl Chunk {
    /// True when no more key fits.
    pub(crate) fn is_full(&self) -> bool {
        self.len == self.cap
    }

    /// The keys held. Only while the manager is pinned open (see the module docs).
    pub(crate) fn as_slice(&self) -> &[i64] {
        // SAFETY: `ptr` is valid for `cap` keys (one live block of `cap * 8` bytes, aligned to
        // 64 >= align_of::<i64>(), alive while the manager is pinned open, which every caller
        // guarantees: module docs), the first `len <= cap` are initialized, and `&self` rules out
        // a concurrent writer (the block has no other owner).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The keys held, mutably (to sort them in place). Only while the manager is pinned open.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [i64] {
        // SAFETY: as in `as_slice`; `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Copies as many keys of `src` as fit; returns how many were copied. Only while the
    /// manager is pinned open.
    pub(crate) fn push_from(&mut self, src: &[i64]) -> usize {
        let n = src.len().min(self.cap - self.len);
        // SAFETY: the destination `ptr + len .. ptr + len + n` lies inside the block (alive: the
        // caller pins the manager open) because `len + n <= cap`; the source is a valid slice of
        // at least `n` keys; the two cannot overlap because the block is owned by this chunk and
        // `src` is borrowed from elsewhere (a `&mut self` and a live `&[i64]` into the same block
        // cannot coexist).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(self.len), n);
        }
        self.len += n;
        n
    }

    /// Frees the block now; returns its size in bytes.
    pub(crate) fn release(self) -> u64 {
        let bytes = self.source.chunk_bytes();
        drop(self);
        bytes
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        let owner = self.owner.take();
        self.source.free(self.ptr, owner);
    }
}

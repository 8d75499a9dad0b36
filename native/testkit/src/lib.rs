//! # nativemem-testkit: what nativemem's tests share
//!
//! - [`CountingAllocator`]: `System` plus counts of the live blocks and bytes, so a test counts
//!   leaks instead of estimating them from RSS. A test binary that counts installs it as its
//!   global allocator and compares [`counts`] before and after N complete lives of what it
//!   tests; the test library (`nativemem-jni` with its `testing` feature) installs it too and
//!   reports the counts to Java (`NativeTesting.nativeHeapCounts`).
//! - [`layers`]: the check behind each crate's "imports point one way" test.
//!
//! Never a dependency of the product: only `[dev-dependencies]`, and an optional dependency of
//! `nativemem-jni` under its `testing` feature. No dependencies of its own.
//!
//! ## Modules, in layers
//! ```text
//!  module   holds                                       uses
//!  lib      CountingAllocator, HeapCounts, counts()     -
//!  layers   check(): crate paths below their module     -
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

pub mod layers;

/// A global allocator that counts: `System`, plus the blocks and bytes live now and allocated in
/// all. Install it with `#[global_allocator] static A: CountingAllocator = CountingAllocator;`
/// (one per binary or library). Only the allocations of the binary or library that installed it
/// pass here (in a JVM, the JVM and other native libraries have their own allocators), so after
/// N create → use → close cycles the live counts must be back to their baseline exactly.
///
/// Cost: four relaxed atomic adds per allocation and two per free, on one cache line.
#[derive(Clone, Copy, Debug, Default)]
pub struct CountingAllocator;

/// The counters, on their own cache line so they share it with nothing hot.
#[repr(align(64))]
struct Counters {
    /// Signed: a negative value would mean a free of a block this allocator never counted.
    live_blocks: AtomicI64,
    live_bytes: AtomicI64,
    allocations: AtomicU64,
    allocated_bytes: AtomicU64,
}

static COUNTERS: Counters = Counters {
    live_blocks: AtomicI64::new(0),
    live_bytes: AtomicI64::new(0),
    allocations: AtomicU64::new(0),
    allocated_bytes: AtomicU64::new(0),
};

/// A block size as a signed count (`Layout` sizes never exceed `isize::MAX`).
fn signed(size: usize) -> i64 {
    i64::try_from(size).unwrap_or(i64::MAX)
}

// Relaxed, every counter: each is a sum that no other memory access depends on. A test reads them
// after the work it measures, on the same thread or after joining the threads that did it (a
// join orders their increments before the read); a test library reads them between calls.
impl Counters {
    fn allocated(&self, size: usize) {
        self.live_blocks.fetch_add(1, Ordering::Relaxed);
        self.live_bytes.fetch_add(signed(size), Ordering::Relaxed);
        self.allocations.fetch_add(1, Ordering::Relaxed);
        self.allocated_bytes
            .fetch_add(size as u64, Ordering::Relaxed);
    }

    fn freed(&self, size: usize) {
        self.live_blocks.fetch_sub(1, Ordering::Relaxed);
        self.live_bytes.fetch_sub(signed(size), Ordering::Relaxed);
    }

    fn resized(&self, old_size: usize, new_size: usize) {
        // The same block, resized: live blocks unchanged; the new size counts as allocated.
        self.live_bytes
            .fetch_add(signed(new_size) - signed(old_size), Ordering::Relaxed);
        self.allocations.fetch_add(1, Ordering::Relaxed);
        self.allocated_bytes
            .fetch_add(new_size as u64, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so `System`'s
// guarantees (alignment, size, ownership of the returned blocks) hold as they are; the counting
// around the calls touches only atomics and never allocates (no re-entry into this allocator).
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` (non-zero size) is passed on unchanged.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            COUNTERS.allocated(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            COUNTERS.allocated(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller guarantees `ptr` was allocated by this allocator (so by `System`)
        // with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        COUNTERS.freed(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `ptr` came from this allocator (so from `System`) with
        // `layout`, and that `new_size` is valid for `layout.align()`.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            COUNTERS.resized(layout.size(), new_size);
        }
        new
    }
}

/// What [`CountingAllocator`] has counted so far in this binary (all zero if it is not the
/// global allocator).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapCounts {
    /// Blocks allocated and not freed yet.
    pub live_blocks: i64,
    /// Bytes of those blocks.
    pub live_bytes: i64,
    /// Allocations since the start (a reallocation counts as one allocation of its new size).
    pub allocations: u64,
    /// Bytes of those allocations.
    pub allocated_bytes: u64,
}

impl HeapCounts {
    /// `(live_blocks, live_bytes)`: what a leak check compares.
    pub fn live(&self) -> (i64, i64) {
        (self.live_blocks, self.live_bytes)
    }
}

/// The counts now. Reading them allocates nothing.
pub fn counts() -> HeapCounts {
    HeapCounts {
        live_blocks: COUNTERS.live_blocks.load(Ordering::Relaxed),
        live_bytes: COUNTERS.live_bytes.load(Ordering::Relaxed),
        allocations: COUNTERS.allocations.load(Ordering::Relaxed),
        allocated_bytes: COUNTERS.allocated_bytes.load(Ordering::Relaxed),
    }
}

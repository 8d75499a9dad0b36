//! # nativemem-track: charge what an engine allocates without asking
//!
//! The most common failure of native Spark engines is not a refused reservation but the executor
//! killed by YARN or Kubernetes for memory the engine allocated outside its pools: hash tables
//! in the standard collections, third-party crates, buffers nobody reserved. This crate makes
//! that memory visible and governed, the way Doris does with its allocator hook: a global
//! allocator charges every allocation of a thread bound to a task's pool to that pool.
//!
//! ```no_run
//! use nativemem_track::{TrackPool, TrackingAllocator};
//!
//! #[global_allocator]
//! static ALLOC: TrackingAllocator = TrackingAllocator::system(); // or ::new(MiMalloc)
//!
//! fn execute(pool: &nativemem_client::Pool) -> nativemem_client::Result<()> {
//!     let guard = pool.track_thread()?;           // this thread now charges `pool`
//!     let worker = guard.tracker().unwrap();      // ...and so may the threads it spawns
//!     std::thread::spawn(move || {
//!         let _g = worker.track_thread();
//!         let table: std::collections::HashMap<u64, u64> = (0..1_000_000).map(|i| (i, i)).collect();
//!         drop(table);
//!     }).join().unwrap();
//!     Ok(())
//! }
//! ```
//!
//! ## Model
//!
//! ```text
//!  thread bound to T (ThreadGuard)         Account of T (shared)               the task's pool
//!  ───────────────────────────────         ─────────────────────               ───────────────
//!  alloc(n) ─▶ header = T, delta += n
//!             delta > 1 MiB ? ──────────▶ unflushed += delta ─ push ───▶ reservation.force_grow
//!  free(own block) ─▶ delta -= n                                          (never calls Spark:
//!  free(T's block on another thread, ──▶ unflushed -= n ─ push past ───▶  over-commit counted,
//!       or after the scope)                             the threshold      paid by the next
//!                                                                          fallible grow)
//! ```
//!
//! - **What is charged**: every block allocated through [`TrackingAllocator`] by a thread while
//!   it is bound ([`Tracker::track_thread`], [`TrackPool::track_thread`]), header included (what
//!   the wrapped allocator was asked for). A block keeps its tracker for life: freed on another
//!   thread, or after the scope, it is credited to the pool it was charged to. An untracked block
//!   that a bound thread grows (`realloc`) is adopted. What is *not* charged: memory that does not
//!   go through Rust's global allocator (C/C++ libraries calling `malloc`, `mmap`, thread
//!   stacks), allocator fragmentation and metadata, and allocations of threads nobody bound. The
//!   executor gauges of the Java side (`ExecutorNativeMemoryStats`) show the rest as *untracked*.
//! - **Batching**: a thread sends its changes once they pass the tracker's threshold (1 MiB by
//!   default, as Doris), so a pool's `used` follows each bound thread within the threshold, plus
//!   at most one threshold of cross-thread frees per tracker. A guard's drop sends what is left,
//!   so after it the pool is exact.
//! - **Never fail, never call the JVM**: an allocator cannot refuse an allocation the engine did
//!   not prepare for, nor call Java from inside `malloc`. A flush is nativemem's forced grow
//!   (`reservation_force_grow` of the engine ABI, `Reservation::force_grow` of the core): what
//!   the task has not reserved from Spark is **over-commit**, shown in the usage report and the
//!   manager's stats, and the next fallible grow of the task (a reservation, an allocation, an
//!   operator asking before a big step) reserves it from Spark, or spills, or fails with the
//!   report. Frees are forced shrinks: the bytes stay reserved as cushion.
//! - **Re-entrancy**: a flush runs with tracking suspended on its thread (a thread-local flag):
//!   allocations nativemem makes meanwhile are not charged and cannot flush again (the `alloc`
//!   module's docs). [`untracked`] suspends tracking for engine code (e.g. a cache shared by all
//!   tasks).
//! - **Lifetime**: a tracker's bookkeeping (its account and reservation) lives while any handle,
//!   binding or tracked block does; after the task's manager closes, flushes are refused (counted
//!   in [`TrackerStats::refused`]) and frees are harmless.
//!
//! In an engine's own cdylib use `default-features = false` (the engine ABI client only). The
//! `core` feature also charges pools of `nativemem-core` directly.
//!
//! **Test binaries that link the provider statically** (`nativemem-provider`, in nativemem's
//! own tests) share this allocator with it: a flush from inside an allocation the provider makes
//! while holding one of its locks would wait for that lock. Bind threads around engine work, not
//! around calls into nativemem, there; a real engine loads the library as its own `.so`, whose
//! allocations never reach this allocator.

mod account;
mod alloc;
mod tracker;

pub use account::{Sink, TrackerStats};
pub use alloc::TrackingAllocator;
pub use tracker::{
    collect, untracked, ThreadGuard, TrackPool, Tracker, DEFAULT_CONSUMER, DEFAULT_FLUSH_THRESHOLD,
    MAX_FLUSH_THRESHOLD,
};

//! # nativemem-examples: an engine in its own library, under a task's nativemem manager
//!
//! Users judge a memory manager by an operator running under it. This crate holds one, built
//! the way a real engine (a DataFusion-based cdylib, Velox) would be: in **its own shared
//! library**, `libnativemem_examples.so`, which links nothing of nativemem but the engine ABI
//! (`include/nativemem.h`, through `nativemem-client`). The task's manager lives in
//! `libnativemem_jni.so`; Java hands this library the ABI table and the manager's handle as two
//! `long`s.
//!
//! ```text
//!  Java: NativeSorter              libnativemem_examples.so        libnativemem_jni.so
//!  ──────────────────              ────────────────────────        ───────────────────
//!  nativeCreate(                ─▶ Api::from_address; per call:
//!    NativeMemoryManager            lease ─────────────────────▶ acquire (close waits for it)
//!      .nativeApi(),                ExternalSorter
//!    manager.handle(), ...)           chunks: allocate ────────▶ pool "sort" of the task
//!  insert / nextBatch / close ─▶      spiller ◀──── spill ◀──── a grow that finds no room, Spark
//!  manager.close() ───────────────────────────────────────────▶ attached sorter dropped first
//! ```
//!
//! - [`ExternalSorter`]: a spilling external sort of 64-bit keys. Its buffer is memory
//!   allocated in 1 MiB chunks from a [`TaskPool`](nativemem_client::TaskPool) (a pool of the
//!   task's manager, leased per call), so the manager sees it, limits it and can ask for it
//!   back; it registers a
//!   [`Spiller`](nativemem_client::Spiller) that writes the buffer to a temp file as a sorted run
//!   and frees it, whether the request comes from its own thread (a pool limit hit while
//!   inserting) or from Spark on a JVM thread; its output is a pull-based k-way merge of the
//!   buffer and the runs, in batches.
//! - The JNI exports of `org.nativemem.examples.NativeSorter` (module `java`): a handle table of
//!   sorters, a lease per call, the sorter tied to its manager with
//!   [`Lease::attach`](nativemem_client::Lease::attach) so the manager's close drops it.
//!
//! Without a JVM (tests, `bench/sort_bench.rs`) the table comes from the provider linked into
//! the binary and the manager from [`Api::create_manager`](nativemem_client::Api::create_manager):
//!
//! ```
//! use nativemem_client::{sys, Api, ManagerOptions};
//! use nativemem_client::TaskPool;
//! use nativemem_examples::{ExternalSorter, SorterOptions};
//!
//! // Under Spark: Api::from_address(NativeMemoryManager.nativeApi()) and manager.handle().
//! // SAFETY: the provider's table is a static of the linked library.
//! let api = unsafe { Api::from_ptr(nativemem_provider::api(sys::NM_ABI_VERSION)) }?;
//! let manager = api.create_manager("task-0", ManagerOptions::default(), None)?;
//! let pool = TaskPool::open(api, manager.handle(), "sort", Some(3 << 20))?; // room for 3 chunks
//! let dir = std::env::temp_dir().join(format!("nativemem-doc-{}", std::process::id()));
//! let sorter = ExternalSorter::new(&pool, "sort", &dir, SorterOptions::default())?;
//! let keys: Vec<i64> = (0..1_000_000).rev().collect();
//! for batch in keys.chunks(4096) {
//!     sorter.insert(batch)?; // spills when the pool is full
//! }
//! assert!(sorter.stats().runs > 0);
//! let mut expected = 0;
//! for batch in sorter.sorted() {
//!     for key in batch? {
//!         assert_eq!(key, expected);
//!         expected += 1;
//!     }
//! }
//! // Nothing is held; the pool may keep slack of the default 1 MiB reservation quantum (at most
//! // two quanta; `ManagerOptions { reservation_quantum: 0, .. }` is exact accounting).
//! assert!(pool.stats()?.used <= 2 << 20);
//! drop(pool);
//! assert_eq!(manager.close()?.leaked_bytes, 0);
//! std::fs::remove_dir(&dir)?; // fails unless every run file was deleted
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! See the [`sort`] module for the design: what is charged, the concurrency model and the lock
//! rule, leases, and the spill files.

/// With the `tracking-allocator` feature (the library Gradle builds), every allocation of this
/// library goes through nativemem-track: threads bound to a task's pool charge it (see
/// `TrackedBuild` in module `java`); other threads pay only the header and a thread-local read.
#[cfg(feature = "tracking-allocator")]
#[global_allocator]
static ALLOC: nativemem_track::TrackingAllocator = nativemem_track::TrackingAllocator::system();

mod chunk;
mod error;
mod java;
mod merge;
mod run;
pub mod sort;

pub use error::{Result, SortError};
pub use sort::{
    Accounting, ExternalSorter, SortedBatches, SorterOptions, SorterStats, DEFAULT_BATCH_KEYS,
    DEFAULT_CHUNK_BYTES, DEFAULT_READ_BUFFER_BYTES, DEFAULT_WRITE_BUFFER_BYTES,
};

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

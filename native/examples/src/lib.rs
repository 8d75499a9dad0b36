//! # nativemem-examples: native operators living under a nativemem memory manager
//!
//! Users judge a memory manager by an operator running under it. This crate holds one: a
//! spilling external sort of 64-bit keys, [`ExternalSorter`], built only on the public API of
//! `nativemem-core`:
//!
//! - its buffer is memory [`Pool::allocate`](nativemem_core::Pool::allocate)d in 1 MiB chunks,
//!   so the task's manager sees it, limits it and can ask for it back;
//! - it registers a [`Spiller`](nativemem_core::Spiller) that writes the buffer to a temp file as
//!   a sorted run and frees it, whether the request comes from its own thread (a pool limit hit
//!   while inserting) or from Spark on a JVM thread;
//! - its output is a pull-based k-way merge of the buffer and the runs, in batches.
//!
//! ```
//! use std::sync::Arc;
//! use nativemem_core::{CapacityListener, MemoryConfig, MemoryManager};
//! use nativemem_examples::{ExternalSorter, SorterOptions};
//!
//! let manager = MemoryManager::new(
//!     "task-0",
//!     MemoryConfig::default(),
//!     Arc::new(CapacityListener::unlimited()),
//! )?;
//! let pool = manager.root().child("sort", Some(3 << 20))?; // room for 3 chunks
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
//! assert_eq!(pool.used(), 0);
//! assert!(manager.close()?.is_empty());
//! std::fs::remove_dir(&dir)?; // fails unless every run file was deleted
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! See the [`sort`] module for the design: what is charged, the concurrency model and the lock
//! rule, and the spill files.

mod chunk;
mod error;
mod merge;
mod run;
pub mod sort;

pub use error::{Result, SortError};
pub use sort::{
    Accounting, ExternalSorter, SortedBatches, SorterOptions, SorterStats, DEFAULT_BATCH_KEYS,
    DEFAULT_CHUNK_BYTES, DEFAULT_READ_BUFFER_BYTES, DEFAULT_WRITE_BUFFER_BYTES,
};

#[cfg(test)]
mod tests;

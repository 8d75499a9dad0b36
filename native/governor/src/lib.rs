//! # nativemem-governor: the executor's container, watched
//!
//! The most common failure of native Spark engines is the executor killed by the kernel (or YARN,
//! or Kubernetes) for exceeding its container. nativemem holds every task manager of the executor
//! in one process, so it can see the container fill and act before the kernel does. This crate is
//! that watcher, with no JNI and no knowledge of managers: it reads the container and decides;
//! the provider acts through [`Relief`] and consults [`Published::pressure`] on grows.
//!
//! ## Modules, in layers (each uses only those above it)
//!
//! ```text
//!  cgroup    where the memory cgroup is; its limit and statistics files (v1, v2)
//!  view      the binding limit and the anonymous usage against it; Probe
//!  levels    soft / hard pressure, hysteresis, adaptive sampling interval
//!  governor  one tick: sample, publish, relief ladder, forensics; the ticking thread
//! ```
//!
//! ## What is read
//!
//! The limit is the smallest headroom among the limits of the process's own memory cgroup and
//! its ancestors (v2 `memory.max` and `memory.high`; v1 `memory.limit_in_bytes` and
//! `hierarchical_memory_limit`) and an optional configured limit; each compared with the
//! anonymous memory of the cgroup it is set on (v2 `anon`, v1 `total_rss` of `memory.stat`), never
//! page cache. Without a memory cgroup the usage is the process's `RssAnon`. With no limit at all
//! there is nothing to govern. Every sample re-reads the files: limits can change at runtime.
//!
//! ## Cost
//!
//! A sample reads two or three small files (tens of microseconds); it runs every second while
//! usage is under half the limit and every 20 ms from the soft level up, sooner while usage grows
//! fast, and at once when the native memory reserved since the last sample crossed half the way
//! to the next level ([`Published::note_growth`], which the grow gate calls for every block
//! reserved from Spark). A grow from the cushion pays nothing; one that reserves a block pays a
//! relaxed load and a relaxed add.

pub mod cgroup;
pub mod governor;
pub mod levels;
pub mod view;

pub use cgroup::FsRoot;
pub use governor::{Governor, GovernorStats, GovernorThread, Published, Relief, Snapshot, Waker};
pub use levels::{InvalidThresholds, Pressure, Thresholds};
pub use view::{CgroupProbe, ContainerView, Probe, Source};

#[cfg(test)]
mod tests;

//! # nativemem-client: the engine ABI of nativemem as safe Rust types
//!
//! A Rust engine (a DataFusion-based cdylib, say) runs inside a Spark task whose memory manager
//! lives in *another* shared library, `libnativemem_jni`. The engine must not link a second copy
//! of nativemem (a second copy has its own, empty handle table); it reaches the task's manager
//! through the versioned C function table of `include/nativemem.h` (`nm_api`, mirrored by
//! [`nativemem_sys::NmApi`]). This crate wraps that table in RAII types, DataFusion style: every
//! fallible call returns [`Result`], every handle is closed or released on `Drop`.
//!
//! ## Model
//!
//! ```text
//!  Java:  long api    = NativeMemoryManager.nativeApi();   ──┐  two longs, passed to the engine
//!         long handle = manager.handle();                  ──┘  (e.g. as JNI arguments)
//!
//!  engine .so                                       libnativemem_jni.so
//!  ──────────                                       ───────────────────
//!  Api::from_address(api)   (checks version/size)
//!   └─ acquire(handle) ─▶ Lease ───── pins the manager: its close waits for the lease
//!        ├─ pool("engine/hash", limit) ─▶ Pool ──── a handle on one pool of the task's tree
//!        │    ├─ reservation("HashBuild[3]") ─▶ Reservation  try_grow / shrink / free, Drop closes
//!        │    ├─ allocate(size, align) ─▶ Allocation         memory charged to the pool, Drop frees
//!        │    └─ register_spiller(name, Arc<dyn Spiller>)    asked to free memory when a grow
//!        │                                                   (or Spark) finds no room
//!        ├─ stats() / usage_report()
//!        └─ attach(state) ─▶ Attachment   state dropped by the manager's close
//! ```
//!
//! - [`Api`] is `Copy`: the table lives as long as the process (the JVM never unloads the
//!   library). Check it once with [`Api::from_address`] / [`Api::from_ptr`].
//! - A [`Lease`] is for a span of work (one `execute`, one batch), not for the life of an
//!   object: the manager's close (at task end) waits for held leases, up to a time limit.
//!   [`Pool`]s, [`Reservation`]s, [`Allocation`]s and [`SpillerRegistration`]s do not need the
//!   lease once made.
//! - All types are `Send + Sync`; any thread may call, concurrently.
//! - When the task's manager closes, every handle of its objects becomes stale: calls fail with
//!   [`Code::StaleHandle`] or [`Code::Closed`], never crash, and `Drop`s that meet that ignore it
//!   (logged at debug). What was still held is freed by the close and reported as a leak. Memory
//!   of an [`Allocation`] must not be used after its manager closed.
//! - Callbacks ([`Spiller`], [`Listener`], the drop of attached state) run with no nativemem
//!   lock held and may call back into this crate; a panic in one is caught at the boundary.
//!
//! ## From a `jlong` to a reservation
//!
//! The lines an engine writes, here in the function its JNI export calls:
//!
//! ```no_run
//! use nativemem_client::{Api, Result};
//!
//! fn build_hash_table(api_address: i64, manager_handle: i64, bytes: u64) -> Result<()> {
//!     // SAFETY: `api_address` is what Java's NativeMemoryManager.nativeApi() returned.
//!     let api = unsafe { Api::from_address(api_address) }?;
//!     let lease = api.acquire(manager_handle)?; // the task's manager, pinned open
//!     let pool = lease.pool("engine/hash", None)?;
//!     let reservation = pool.reservation("HashBuild[3]")?;
//!     match reservation.try_grow(bytes) {
//!         Ok(()) => { /* build the table; `reservation` drops (releases) at the end */ }
//!         Err(e) if e.is_out_of_memory() => { /* spill and retry, or fail with `e` */ }
//!         Err(e) => return Err(e),
//!     }
//!     Ok(())
//! }
//! ```
//!
//! ## Without a JVM
//!
//! An engine's own tests get a manager with [`Api::create_manager`] (memory from a Rust
//! [`Listener`], or unlimited) and close it with [`OwnedManager::close`], which returns the leak
//! report. The table then comes from `nativemem_provider::api(NM_ABI_VERSION)` (the provider
//! linked into the test as a dev-dependency) or from the `nativemem_api` export of
//! `libnativemem_jni` (found with `dlsym`), passed to [`Api::from_ptr`].

//! ## For an engine's JNI exports
//!
//! - [`TaskPool`]: a pool an operator holds across calls, leasing the manager per call.
//! - With the `jni` feature, [`java`]: the export guard that turns errors and panics into Java
//!   exceptions (one table), argument helpers and the library's logging set-up.
//!
//! ## Modules, in layers
//!
//! Each module imports only modules above it in this list (`tests/layers.rs` checks it):
//!
//! | module      | holds                                                             |
//! |-------------|-------------------------------------------------------------------|
//! | `error`     | [`Error`], [`Code`], the one status → `Result` conversion          |
//! | `api`       | [`Api`] (the checked table), managers without a JVM, [`Listener`]  |
//! | `spill`     | [`Spiller`] and its registration                                   |
//! | `pool`      | [`Pool`], [`Reservation`], [`Allocation`]                          |
//! | `lease`     | [`Lease`] (and [`Api::acquire`]), [`Attachment`]                   |
//! | `task_pool` | [`TaskPool`]                                                       |
//! | `java`      | the JNI kit (feature `jni`)                                        |

mod api;
mod error;
#[cfg(feature = "jni")]
pub mod java;
mod lease;
mod pool;
mod spill;
mod task_pool;

pub use api::{
    Api, CloseReport, Listener, ManagerOptions, OwnedManager, DEFAULT_RESERVATION_QUANTUM,
};
pub use error::{BoxError, Code, Error, Result};
pub use lease::{Attachment, Lease, ManagerStats};
pub use pool::{Allocation, Pool, PoolStats, Reservation};
pub use spill::{Spiller, SpillerRegistration};
pub use task_pool::TaskPool;

/// Re-export of the raw ABI types (for [`Api::raw`] and the `as_raw` handles).
pub use nativemem_sys as sys;

/// Generation-checked handle tables for the engine's own objects (operators, streams) that Java
/// holds as a `long`: a closed or forged handle is an error, never a crash. Each library has its
/// own tables; this is code, not a second copy of nativemem's state.
pub use nativemem_handles as handles;

//! # nativemem-core: a per-task native memory manager
//!
//! A query engine running native operators inside a JVM (a Spark executor) allocates memory the
//! JVM cannot see. This crate makes that memory visible and governable, without a JVM: the
//! provider (`nativemem-provider`: handles and the engine ABI) and the Java layer over it
//! (`nativemem-jni`) connect it to Spark; engines can embed it directly.
//!
//! ## Model
//!
//! One [`MemoryManager`] per task attempt owns:
//! - a tree of [`Pool`]s (name, optional limit, `used`, `peak`); the root is the task and its
//!   limit is [`MemoryConfig::task_limit`];
//! - [`Reservation`]s: RAII, accounting-only claims on a pool (`try_grow` / `shrink` /
//!   `try_resize` / `free`, released on drop);
//! - allocations made with [`Pool::allocate`] (raw, C-style) from the task's own heap, so
//!   [`MemoryManager::close`] reports what an operator leaked ([`LeakReport`]) and the heap's
//!   destruction frees it (see `heap`: when the manager's last handle goes), and
//!   with [`Pool::allocate_owned`] ([`Allocation`], RAII: close releases its accounting but never
//!   frees memory its owner can still use);
//! - registered [`Spiller`]s, native consumers that can free memory on request;
//! - the *cushion*: bytes reserved from the [`ReservationListener`] (the JVM) but not yet used,
//!   i.e. `reserved - root.used` (not a counter of its own).
//!
//! ```text
//!  operator ──try_grow(n)──▶ Pool leaf ─▶ … ─▶ root      (1) charge every level (one RMW each,
//!                                                          a CAS loop where there is a limit);
//!                                                          roll back all on refusal
//!                               │
//!                               ▼
//!                   root.used <= reserved ?              (2) one load; if yes: done, no listener
//!                               │ no                         call (the fast path)
//!                               ▼
//!                listener.reserve(k * block)             (3) one JVM upcall per block (8 MiB),
//!                               │ granted < needed           Spark may spill others for it
//!                               ▼
//!             arbiter.on_short_grant(short), retry once  (3b) other tasks hand idle memory
//!                               │ still short                back to Spark (see [`Arbiter`])
//!                               ▼
//!                  spill native spillers, retry once     (4) smallest that covers, else largest
//!                               │ still short
//!                               ▼
//!                 roll back, OutOfMemory(usage report)
//!
//!  Spark needs memory ──▶ reclaim(n): hand back unused cushion, then spill, hand back the rest
//! ```
//!
//! ## Glossary
//!
//! The words the code, the C header and the Java classes use, each in one sense only.
//!
//! - **block** (`MemoryConfig::reservation_block`, `nm_manager_options.reservation_block`, Java's
//!   reservation block size; 8 MiB by default): the unit in which the manager asks the listener
//!   (Spark) for memory and gives it back. What is reserved from the listener is always a
//!   whole number of blocks, so a task makes one upcall per block, not one per grow.
//! - **cushion**: bytes reserved from the listener but not used by any consumer
//!   (`reserved - used`). Grows are served from it without an upcall. It is handed back when a
//!   release leaves more than two blocks of it (down to one block), when Spark asks (reclaim), or
//!   at close. What a refused grow was granted stays in it.
//! - **quantum** (`reservation_quantum`; 0 = exact accounting): the step in which a reservation
//!   (and a pool's allocations) charge their pools in quantum mode. A reservation's quantum grows
//!   with its size (from `q` up to `8 * q`).
//! - **slack**: what a reservation or a pool's allocations have charged to their pools beyond
//!   what they hold, in quantum mode (at most two quanta each, trimmed back to one by the shrink
//!   that makes more). Small grows and shrinks are served from it without touching the pools.
//!   Taken back from every reservation before a grow is refused, before anything is spilled, and
//!   when Spark reclaims. Pools' `used`/`peak` include it; consumers' sizes and reports do not.
//! - **claim**: (1) a reservation is a claim of bytes on a pool (accounting only, no memory;
//!   DataFusion's `MemoryReservation`), and (2) inside the budget, a give-back first *claims* the
//!   bytes on the root counter so no grow takes them while they go back to the listener. Keep
//!   "claim" for (2) and say "reservation" for (1) if one sense must go.
//! - **over-commit**: bytes charged by a forced grow (`force_grow`, `reservation_force_grow`, the
//!   tracking allocator) that the cushion did not cover: charged without asking Spark, shown in
//!   the stats and the usage report, and reserved from Spark by the next grow that needs an
//!   upcall (which pays it together with its own bytes, or spills, or fails).
//! - **spill vs reclaim**: *spill* (`MemoryManager::spill`, `manager_spill`) asks native spillers
//!   to free memory; the freed bytes stay reserved as cushion for the task's next grows.
//!   *Reclaim* (`MemoryManager::reclaim`, `manager_reclaim`, Spark's `MemoryConsumer.spill`)
//!   gives memory back to the listener: first the unused cushion, then spills for the rest and
//!   hands that back too; it returns the bytes Spark got back.
//!
//! ## Why atomics where
//! The grow/shrink fast path is lock-free: a charge is one RMW per pool level (a CAS loop where
//! the level has a limit, a `fetch_add` where it has none), one load of `reserved`, and one RMW on
//! the reservation's own size. There is no separate cushion counter: bytes handed back to the
//! listener are first *claimed* on the root counter like a grow, and unclaimed only after
//! `reserved` went down, so "my new root value <= reserved" is a sufficient check for a grow
//! whatever a concurrent release does (see `Budget::grow`, and the module docs of `budget` for
//! the memory orderings: every one is the weakest the protocol needs, with its reason beside it). A mutex would add a lock/unlock pair
//! and serialize the task's threads. Locks are used only off the fast path: the
//! pool tree's child lists (pool creation), the reservation registry (reservation creation and
//! drop) and the spiller registry (register, and copying the list at spill time). Allocations
//! take no lock of ours: the task's mimalloc heap, a header per block and one CAS per free
//! (see `heap`).
//!
//! ## Reservation quantum (the fast path)
//! With [`MemoryConfig::reservation_quantum`] `q > 0`, a reservation charges the pools in quanta
//! and keeps what it charged beyond what it holds as *slack*: a grow that fits is one RMW on the
//! reservation's own `size` and one load of its `charged` (both on its own 128-byte-aligned
//! state, no pool counter, no root), a shrink one CAS. A grow past the slack charges its need
//! rounded up to the reservation's quantum (which grows with it, up to `8 * q`); a shrink leaving
//! more than two quanta gives the excess back. Slack is *trimmed* (taken back from the pools)
//! before a grow is refused, before spillers run and on `reclaim`, so it never causes a refusal
//! or a spill exact accounting would not. A trim races a grow on the same reservation without a
//! lock: see edge 6 in the `budget` module docs. `Pool::allocate` charges through a slack of
//! the pool's own for its allocations, with the same protocol. Bound: a pool's `used` exceeds
//! what its consumers hold by at most two quanta per live reservation and per pool with
//! allocations (at or below it).
//!
//! A caller holding a reservation exclusively (`&mut`, as DataFusion's operators hold theirs)
//! can use [`Reservation::try_grow_exclusive`] / [`Reservation::shrink_exclusive`]: on the slack
//! they make no atomic read-modify-write and no fence instruction (one writer: a load, a plain
//! store, a load). The store-load ordering against a trim is paid by the trimming thread with
//! one `membarrier` system call per round of trims (the `barrier` module).
//!
//! ## Blocks and hysteresis
//! The listener is asked for whole blocks ([`MemoryConfig::reservation_block`], 8 MiB by default),
//! so a task growing by 1 GiB makes at most 128 upcalls instead of one per grow. Bytes go back to
//! the listener only when the unused cushion exceeds two blocks, and then down to one block: a
//! loop that grows and shrinks across a block boundary makes no upcalls after the first. Spark
//! asking for memory back ([`MemoryManager::reclaim`]) bypasses hysteresis and hands back exact
//! bytes, so a spill request is never answered with 0 because of rounding.
//!
//! ## The lock rule
//! **No lock of this crate is held while calling the listener or a spiller.** Spark calls a
//! consumer's `spill` while holding its `TaskMemoryManager` monitor; if a native thread held a
//! Rust lock while blocked in an upcall waiting for that monitor, and the spilling thread needed
//! the same Rust lock, the task would deadlock (Gluten shipped this ABBA deadlock). How it is
//! guaranteed: the only calls out are in `Budget::reserve_from_listener`,
//! `Budget::claim_and_give_back`, `Budget::remedy` (the [`Arbiter`], which may call other
//! managers and their listeners; never from inside a `reclaim`, see [`arbitration_allowed`]) and
//! `SpillerRegistry::spill`; the first three run with no lock taken on the path to them (the
//! fast-path state is atomics), and the third copies the spiller list under the registry lock and
//! drops the guard before calling any spiller. The test `spiller_reentering_the_manager_does_not_deadlock`
//! exercises the re-entrant path.
//!
//! ## Over-commit (forced grows)
//! Code that can neither fail nor call out — a global allocator charging what an engine's
//! threads allocate (`nativemem-track`) — uses [`Reservation::force_grow`]: it charges every pool
//! level with one RMW each, ignoring limits, and never calls the listener or a spiller. What the
//! cushion does not cover is *over-commit*: shown in [`ManagerStats::overcommitted`] and the usage
//! report, and **paid by the next fallible grow** of the task that reaches the listener, which
//! reserves the over-commit together with its own bytes (or spills, or fails with the report).
//! A pool pushed over its limit refuses grows until enough is released. While over-committed
//! there is no cushion, so nothing is handed back. [`Reservation::force_shrink`] releases
//! without an upcall (the bytes stay as cushion until the next release, a reclaim or close).
//!
//! ## Exactness
//! Every failing call leaves every counter as it was. Over-release is an error, never a panic and
//! never a negative counter. `reserved` changes only by what the listener granted or accepted back,
//! so after [`MemoryManager::close`] `reserved()` is 0 and the listener has received every byte it
//! granted (unless it failed to take them back, which is reported and retried).
//!
//! ## Modules, in layers
//! Every `use crate::…` of a module names a module below it, so the crate has no import cycle.
//! The test `module_imports_point_one_way` enforces the order below (a new module must be placed
//! in it). Where two handles refer to each other, the upward method is an inherent `impl` in the
//! higher module: `Reservation::pool` lives in `pool`, `Pool::manager` in `manager`.
//!
//! ```text
//!  layer       module       holds                                      uses (all below it)
//!  handles     manager      MemoryManager, ManagerStats, Pool::manager pool budget listener
//!                                                                      config report error
//!     │        pool         Pool, Allocation, Reservation::pool        reservation budget spill
//!     │                                                                tree error
//!     ▼        reservation  Reservation                                budget tree error units sync
//!  protocol    budget       reserved and cushion: grow, claim and      spill heap tree listener
//!     │                     give back, reclaim, close; consumers;      config report error
//!     │                     usage report                               units sync
//!     ▼        spill        Spiller, SpillerRegistry                   tree error sync
//!  registries  heap         the task's heap: blocks with headers       tree
//!     │        tree         PoolNode: charge/uncharge, limits, peaks   error sync
//!     ▼        listener     ReservationListener, CapacityListener      error sync
//!  leaves      config       MemoryConfig                               error
//!              error        MemoryError, OomReason, OutOfMemory        report units
//!              report       UsageReport, LeakReport                    units
//!              sync, units  loom-swappable primitives; human sizes     -
//! ```

mod barrier;
mod budget;
mod config;
mod error;
mod heap;
mod listener;
mod manager;
mod pool;
mod report;
mod reservation;
mod spill;
mod sync;
mod tree;
mod units;

pub use budget::MAX_REQUEST_BYTES;
pub use config::{
    MemoryConfig, DEFAULT_RESERVATION_BLOCK_BYTES, RECOMMENDED_RESERVATION_QUANTUM_BYTES,
};
pub use error::{ListenerError, MemoryError, OomReason, OutOfMemory, Result};
pub use heap::{live_task_heaps, purge_task_heaps};
pub use listener::{
    arbitration_allowed, Arbiter, CapacityListener, GrowGate, NoArbitration, ReservationListener,
};
pub use manager::{ManagerStats, MemoryManager};
pub use pool::{Allocation, Pool};
pub use report::{ConsumerUsage, Leak, LeakKind, LeakReport, PoolUsage, UsageReport};
pub use reservation::Reservation;
pub use spill::{Spiller, SpillerRegistration};
pub use units::{human, HumanBytes};

#[cfg(test)]
mod tests;

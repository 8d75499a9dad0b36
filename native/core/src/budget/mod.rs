//! The budget of one task: the bytes reserved from the listener, everything charged against
//! them, and the protocol that keeps the two consistent (grow, claim and give back, reclaim,
//! close), plus the registries that close and reports need (consumers, spillers, allocations).
//!
//! The public handles ([`Reservation`](crate::Reservation), [`Pool`](crate::Pool),
//! [`MemoryManager`](crate::MemoryManager)) hold an `Arc<Budget>` and call down into it. See the
//! crate docs for the design, the data flow and the lock rule.
//!
//! ## Files
//!
//! - `mod.rs`: the state ([`Budget`], [`ConsumerState`], counters), construction, read-outs
//!   and registries, and the ordering protocol below, which the other files cite by edge number;
//! - `grow.rs`: a fallible grow, the listener call, and the remedy ladder of a refused grow;
//! - `overcommit.rs`: forced charges that never fail or call out, and the over-commit they leave;
//! - `give_back.rs`: releases, the cushion, and handing bytes back to the listener under a claim;
//! - `reclaim.rs`: `reclaim` (the listener's owner wants memory back) and spilling;
//! - `slack.rs`: quantum mode, a reservation's or a pool's allocations' slack: cover, trim;
//! - `allocations.rs`: raw and owned allocations, tracked for close;
//! - `report.rs`: the usage report and the out-of-memory error;
//! - `close.rs`: close (and close on drop).
//!
//! # Orderings
//! The grow fast path is a handful of atomics, so each ordering is the weakest that the protocol
//! needs (on aarch64 an acquire or release costs a barrier-carrying instruction: `ldar`, `stlr`,
//! `ldadda`/`ldaddl`/`ldaddal` instead of `ldr`, `str`, `ldadd`). The protocol relies on four
//! happens-before edges and one total order; everything else (non-root pool levels, peaks,
//! counters, ids, read-outs, reports) publishes nothing and is `Relaxed`.
//!
//! 1. **Hand-back → grow.** A hand-back lowers `reserved` and only then un-claims the root with a
//!    `Release` RMW; every root RMW after which `reserved` is read (a grow's charge, a claim)
//!    acquires. So a grow whose root value no longer includes a claim also sees `reserved`
//!    without those bytes, and its `root <= reserved` check stays sound (`Budget::grow`).
//! 2. **Claim → refused grow.** A claim raises `claims` and then the root with a `Release` RMW; a
//!    grow refused at the root read the root with `Acquire`, so it sees the `claims` of every
//!    claim its value includes and can tell a claim from real usage.
//! 3. **Grant → hand-back.** A grow charges the root, then adds the listener's grant to
//!    `reserved` with `Release`. `cushion` reads `reserved` with `Acquire`, so a hand-back sized
//!    on a grant claims the root only after the charge that grant covers (its claim counts it);
//!    the claim's check reads `reserved` with `Acquire` too, so the listener has seen a grant
//!    before it sees an `unreserve` of those bytes.
//! 4. **Charge → uncharge.** A reservation's size is raised with `Release` after the pool charge
//!    and taken out (`shrink`, `free`, `close`) with `Acquire` before the uncharge, so no
//!    counter is uncharged ahead of its charge, even by another thread.
//! 5. **Close ↔ release (`SeqCst`).** `close` sets `closed` then reads the root; a release
//!    uncharges the root then reads `closed`. That is a store-buffering pair: only a single total
//!    order guarantees that one of them sees the other, so bytes released during a close are
//!    handed back by the releaser or by `close`. On aarch64 a `SeqCst` RMW is the same `ldaddal`/`casal`/`swpal` as `AcqRel`, and a
//!    `SeqCst` load is `ldar`, which is also what `Acquire` compiles to unless the target has
//!    RCpc (`ldapr`); so this costs nothing over acquire/release on the release path.
//!
//! 6. **Quantum mode: grow ↔ trim (`SeqCst`).** With a reservation quantum a grow first raises
//!    the reservation's `size`, then reads its `charged`, and is done if `size <= charged`
//!    (one RMW and one load, on the reservation's own cache line). A trim (taking slack back:
//!    a shrink past two quanta, `free`, `reclaim`, a grow refused elsewhere) lowers `charged`
//!    with a CAS, then re-reads `size`, and puts the bytes back if `size` is now above the new
//!    `charged`. Another store-buffering pair: in the single total order either the grow's load
//!    comes after the trim's CAS (it sees the lowered `charged` and covers itself on the slow
//!    path) or the trim's re-read comes after the grow's RMW (it sees the grow and puts the
//!    bytes back). So a trim never takes bytes a grow counted on. On x86 a `SeqCst` RMW is the
//!    `lock` instruction any RMW is and a `SeqCst` load a plain `mov`: the fast path pays
//!    nothing for it. `charged` only rises after the pool charge and only falls before the
//!    uncharge (edge 4 for quantum mode).
//!
//!    The exclusive path (`Reservation::try_grow_exclusive`, for a caller holding `&mut`) makes
//!    the same pair without the RMW: `size` has one writer, so the grow loads it, stores the new
//!    value and reads `charged` with `Relaxed` accesses separated by `barrier::light` (a
//!    compiler fence). The StoreLoad barrier that pair needs is paid by the other side: a trim
//!    that may run on another thread than the reservation's user (`trim_all`: before a refusal,
//!    before spilling, on `reclaim`) lowers every `charged`, then calls `barrier::heavy` (one
//!    `membarrier` system call for all of them), then re-reads the sizes. A trim by the
//!    reservation's own methods (`shrink`, `free`) needs no fence: `&mut` means no exclusive grow
//!    of that reservation runs meanwhile.
//!
//! No other decision reads two counters that other threads write without one of these edges,
//! so nothing else needs a single total order.

use crate::sync::{AtomicBool, AtomicU64, Ordering};
use std::collections::HashMap;
use std::sync::Arc;

use crate::sync::Mutex;

use crate::config::MemoryConfig;
use crate::error::{MemoryError, Result};
use crate::heap::TaskHeap;
use crate::listener::{Arbiter, GrowGate, ReservationListener};
use crate::spill::{Spiller, SpillerRegistration, SpillerRegistry};
use crate::tree::PoolNode;

mod allocations;
mod close;
mod give_back;
mod grow;
mod overcommit;
mod reclaim;
mod report;
mod slack;

#[cfg(test)]
pub(crate) use slack::quantum_for;
pub(crate) use slack::{Slack, SlackId, TrimMode};

/// Largest single request accepted, bytes (keeps every sum of counters far from overflow).
pub const MAX_REQUEST_BYTES: u64 = 1 << 62;

/// Counters behind `ManagerStats`. All `Relaxed`: statistics, read without any other counter.
#[derive(Default)]
struct Counters {
    spill_count: AtomicU64,
    spilled_bytes: AtomicU64,
    reserve_calls: AtomicU64,
    unreserve_calls: AtomicU64,
    /// Listener reservations the grow gate refused.
    gate_refusals: AtomicU64,
    /// Short grants the arbiter was asked about, and the bytes it freed elsewhere for them.
    arbitrations: AtomicU64,
    arbitrated_bytes: AtomicU64,
    /// Bytes of forced charges that the cushion did not cover when they were made (cumulative).
    overcommitted_total: AtomicU64,
    /// Highest over-commit seen (see `Budget::overcommitted`).
    overcommit_peak: AtomicU64,
    /// Bytes the task's spills wrote to disk, as its engine reported them.
    spill_written_bytes: AtomicU64,
}

/// A snapshot of [`Counters`] and the live allocation count, for `ManagerStats`.
pub(crate) struct CounterSnapshot {
    pub(crate) spill_count: u64,
    pub(crate) spilled_bytes: u64,
    pub(crate) reserve_calls: u64,
    pub(crate) unreserve_calls: u64,
    pub(crate) gate_refusals: u64,
    pub(crate) arbitrations: u64,
    pub(crate) arbitrated_bytes: u64,
    pub(crate) live_allocations: u64,
    pub(crate) overcommitted_total: u64,
    pub(crate) overcommit_peak: u64,
    pub(crate) spill_written_bytes: u64,
}

/// The part of a reservation the manager can see (for reports and for close).
///
/// Aligned to 128 bytes (two cache lines, the unit x86's adjacent-line prefetcher pulls in): the
/// reservation's hot counters share no line with another reservation's, so two threads growing
/// their own reservations never bounce a line between cores.
#[repr(align(128))]
pub(crate) struct ConsumerState {
    /// Bytes held. Changed only by RMWs so a concurrent close and shrink each release disjoint
    /// bytes, except on the exclusive path (quantum mode, `&mut`: one writer, plain stores; the
    /// pools carry `charged` there, which only RMWs change). Exact mode (`quantum == 0`): raised with `Release` after the pool charge and taken
    /// out with `Acquire` before the uncharge (edge 4 of the module docs). Quantum mode: raised
    /// with `SeqCst` *before* it is known to be covered (edge 6).
    pub(crate) size: AtomicU64,
    /// Quantum mode only (0 in exact mode): bytes charged to the pool tree for this reservation,
    /// `>= size` whenever no grow is in flight; `charged - size` is the slack. Raised (`SeqCst`)
    /// only after the pool charge and lowered (`SeqCst`) only before the uncharge (edge 4), and
    /// in a store-buffering pair with `size` (edge 6).
    pub(crate) charged: AtomicU64,
    /// Highest `size`; `Relaxed` (a statistic).
    pub(crate) peak: AtomicU64,
    /// The manager's [`MemoryConfig::reservation_quantum`] (copied: the fast path reads no other
    /// line).
    pub(crate) quantum: u64,
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) node: Arc<PoolNode>,
}

impl ConsumerState {
    /// Raises the peak to `now` (a statistic).
    #[inline]
    pub(crate) fn note_peak(&self, now: u64) {
        // Relaxed (both): the peak is a statistic; `fetch_max` keeps it monotonic.
        if now > self.peak.load(Ordering::Relaxed) {
            self.peak.fetch_max(now, Ordering::Relaxed);
        }
    }
}

/// The shared state of one manager (one task attempt). See the module docs.
pub(crate) struct Budget {
    pub(crate) name: String,
    config: MemoryConfig,
    listener: Arc<dyn ReservationListener>,
    /// Consulted before every listener reservation of a fallible grow (see [`GrowGate`]).
    gate: Option<Arc<dyn GrowGate>>,
    /// Asked when the listener grants a fallible grow less than it needs (see [`Arbiter`]).
    arbiter: Option<Arc<dyn Arbiter>>,
    /// Unique in the process: how an arbiter tells this manager from the others.
    id: u64,
    /// Listener `reserve` calls in flight. An arbiter skips a manager with one: its thread may
    /// hold its own `TaskMemoryManager` monitor while Spark makes it wait for memory.
    reserving: AtomicU64,
    root: Arc<PoolNode>,
    /// Bytes granted by the listener and not handed back. The cushion is `reserved - root.used`:
    /// there is no separate cushion counter, so a grow is one RMW on each pool level plus one
    /// load of `reserved` (see `grow` and `claim_and_give_back` for why that is race-free).
    reserved: AtomicU64,
    /// Bytes currently claimed on the root by threads handing surplus back (see
    /// `claim_and_give_back`); a grow refused at the root while claims are in flight retries.
    claims: AtomicU64,
    /// Spills in progress whose freed memory the caller wants for itself: a grow spilling to make
    /// room, or `reclaim` counting exactly what it hands back. While > 0, memory freed by spillers
    /// stays in the cushion instead of being handed back by hysteresis.
    held_spills: AtomicU64,
    /// Over-commit still owed, as far as forced charges know: raised by the part of a forced
    /// charge the cushion did not cover (`force_grow`), lowered when a grow's grant pays for it.
    /// A *hint*, never trusted alone: releases also cover over-commit without touching it, so
    /// every reader caps it by what is really uncovered now (`root.used - reserved`). It sizes
    /// the deficit of the next grow that calls the listener (which so pays the over-commit, or
    /// spills, or fails) and the `overcommitted` read-out.
    overcommit: AtomicU64,
    closed: AtomicBool,
    /// Next consumer id.
    ids: AtomicU64,
    consumers: Mutex<HashMap<u64, Arc<ConsumerState>>>,
    spillers: Arc<SpillerRegistry>,
    /// The task's heap: every `Pool::allocate` block (see `heap`). Destroyed when the budget
    /// drops (after `drop`'s close), freeing what leaked.
    heap: TaskHeap,
    counters: Counters,
}
impl Budget {
    /// A budget named `name` (the task, for reports) that reserves from `listener`.
    pub(crate) fn new(
        name: String,
        config: MemoryConfig,
        listener: Arc<dyn ReservationListener>,
        gate: Option<Arc<dyn GrowGate>>,
        arbiter: Option<Arc<dyn Arbiter>>,
    ) -> Result<Budget> {
        config.validate()?;
        /// Next manager id (process-wide).
        static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let root = PoolNode::new_root(config.task_limit);
        Ok(Budget {
            name,
            config,
            listener,
            gate,
            arbiter,
            // Relaxed: ids need only be unique.
            id: IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            reserving: AtomicU64::new(0),
            root,
            reserved: AtomicU64::new(0),
            claims: AtomicU64::new(0),
            held_spills: AtomicU64::new(0),
            overcommit: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            ids: AtomicU64::new(1),
            consumers: Mutex::new(HashMap::new()),
            spillers: Arc::new(SpillerRegistry::default()),
            heap: TaskHeap::new(),
            counters: Counters::default(),
        })
    }

    pub(crate) fn config(&self) -> &MemoryConfig {
        &self.config
    }

    /// The root of the pool tree (the task).
    pub(crate) fn root(&self) -> &Arc<PoolNode> {
        &self.root
    }

    /// Bytes reserved from the listener and not handed back (a read-out).
    pub(crate) fn reserved(&self) -> u64 {
        // Relaxed: a read-out; no decision of this crate is taken on it.
        self.reserved.load(Ordering::Relaxed)
    }

    /// The manager's process-wide id.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// True while a listener `reserve` call is in flight (a read-out for arbiters).
    pub(crate) fn is_reserving(&self) -> bool {
        // Relaxed: a hint; an arbiter racing a new reserve call is covered by its other rules.
        self.reserving.load(Ordering::Relaxed) > 0
    }

    /// True once `close` has started (a read-out).
    pub(crate) fn is_closed(&self) -> bool {
        // Relaxed: `close` sets the flag before doing its work, so the flag publishes nothing;
        // the one place that must not miss it (`release`) uses `SeqCst` (edge 5).
        self.closed.load(Ordering::Relaxed)
    }

    /// A snapshot of the counters.
    pub(crate) fn counters(&self) -> CounterSnapshot {
        let c = &self.counters;
        // Relaxed (all four): statistics (see `Counters`).
        CounterSnapshot {
            spill_count: c.spill_count.load(Ordering::Relaxed),
            spilled_bytes: c.spilled_bytes.load(Ordering::Relaxed),
            reserve_calls: c.reserve_calls.load(Ordering::Relaxed),
            unreserve_calls: c.unreserve_calls.load(Ordering::Relaxed),
            gate_refusals: c.gate_refusals.load(Ordering::Relaxed),
            arbitrations: c.arbitrations.load(Ordering::Relaxed),
            arbitrated_bytes: c.arbitrated_bytes.load(Ordering::Relaxed),
            live_allocations: self.live_allocations(),
            overcommitted_total: c.overcommitted_total.load(Ordering::Relaxed),
            overcommit_peak: c.overcommit_peak.load(Ordering::Relaxed),
            spill_written_bytes: c.spill_written_bytes.load(Ordering::Relaxed),
        }
    }

    /// Live blocks of `Pool::allocate` (raw and owned), summed over the pools.
    fn live_allocations(&self) -> u64 {
        self.sum_over_pools(|n| &n.alloc.count)
    }

    /// Bytes of live `Pool::allocate` blocks, summed over the pools.
    pub(crate) fn allocated_bytes(&self) -> u64 {
        self.sum_over_pools(|n| &n.alloc.size)
    }

    /// One counter of every pool's allocations, summed.
    fn sum_over_pools(&self, counter: impl Fn(&PoolNode) -> &AtomicU64) -> u64 {
        let mut nodes = Vec::new();
        self.root.walk(0, &mut nodes);
        // Relaxed: a read-out.
        nodes
            .iter()
            .map(|(_, n)| counter(n).load(Ordering::Relaxed))
            .sum()
    }

    /// Adds `bytes` an engine reported its spills wrote (saturating).
    pub(crate) fn note_spill_written(&self, bytes: u64) {
        // Relaxed: a statistic (see `Counters`).
        let c = &self.counters.spill_written_bytes;
        let mut now = c.load(Ordering::Relaxed);
        loop {
            match c.compare_exchange_weak(
                now,
                now.saturating_add(bytes),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(seen) => now = seen,
            }
        }
    }

    /// Number of registered spillers.
    pub(crate) fn spiller_count(&self) -> usize {
        self.spillers.len()
    }

    /// Registers a spiller of the pool `node`.
    pub(crate) fn register_spiller(
        &self,
        name: String,
        node: Arc<PoolNode>,
        spiller: Arc<dyn Spiller>,
    ) -> SpillerRegistration {
        self.spillers.register(name, node, spiller)
    }

    /// Registers a new, empty consumer (a reservation) of `node`; its name becomes `name#id`.
    pub(crate) fn register_consumer(&self, node: Arc<PoolNode>, name: &str) -> Arc<ConsumerState> {
        // Relaxed: ids need only be unique, which RMW atomicity alone guarantees.
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConsumerState {
            size: AtomicU64::new(0),
            charged: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            quantum: self.config.reservation_quantum,
            id,
            name: format!("{name}#{id}"),
            node,
        });
        self.consumers.lock().insert(id, state.clone());
        state
    }

    /// Forgets the consumer `id` (its reservation was dropped).
    pub(crate) fn unregister_consumer(&self, id: u64) {
        self.consumers.lock().remove(&id);
    }

    pub(super) fn check_open(&self) -> Result<()> {
        // Relaxed: a grow racing `close` may miss the flag whatever the ordering (close is meant
        // to run alone); what such a grow reserves is handed back when it is released (edge 5).
        if self.closed.load(Ordering::Relaxed) {
            return Err(MemoryError::Closed {
                manager: self.name.clone(),
            });
        }
        Ok(())
    }
}

/// Adds `n` to a statistics counter, stopping at `u64::MAX` instead of wrapping.
fn saturating_add(counter: &AtomicU64, n: u64) {
    // Relaxed (both): a statistic; the RMW alone keeps it exact.
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_add(n))
    });
}

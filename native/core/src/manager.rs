//! The public handle of one task's memory ([`MemoryManager`]) and its counters
//! ([`ManagerStats`]). The state and the protocol behind it live in `budget`; see the crate docs
//! for the design.

use std::sync::Arc;

use crate::budget::Budget;
use crate::config::MemoryConfig;
use crate::error::{MemoryError, Result};
use crate::listener::{Arbiter, GrowGate, ReservationListener};
use crate::pool::Pool;
use crate::report::{LeakReport, UsageReport};

/// A snapshot of a manager's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ManagerStats {
    /// Bytes used by the task now.
    pub used: u64,
    /// Peak of `used`.
    pub peak: u64,
    /// Bytes reserved from the listener now.
    pub reserved: u64,
    /// Spiller calls that freed memory.
    pub spill_count: u64,
    /// Bytes those spills freed.
    pub spilled_bytes: u64,
    /// Calls to `listener.reserve`.
    pub reserve_calls: u64,
    /// Calls to `listener.unreserve`.
    pub unreserve_calls: u64,
    /// Listener reservations refused by the manager's [`GrowGate`] (container pressure).
    pub gate_refusals: u64,
    /// Short grants of the listener reported to the manager's [`Arbiter`] (executor-wide
    /// arbitration), and the bytes other tasks handed back for them.
    pub arbitrations: u64,
    pub arbitrated_bytes: u64,
    /// Live allocations made through `Pool::allocate`.
    pub live_allocations: u64,
    /// Bytes of those allocations (what the pools were charged for them; each block also
    /// carries a 32-byte header in the task heap).
    pub allocated_bytes: u64,
    /// Over-commit now: bytes charged by forced grows ([`Reservation::force_grow`]) beyond what
    /// was reserved from the listener, not yet paid for by a grow or released.
    ///
    /// [`Reservation::force_grow`]: crate::Reservation::force_grow
    pub overcommitted: u64,
    /// Highest [`overcommitted`](Self::overcommitted) seen.
    pub overcommit_peak: u64,
    /// Bytes forced grows over-committed so far (cumulative).
    pub overcommitted_total: u64,
    /// Bytes the task's spills wrote (to disk or elsewhere), as its engine reported them with
    /// [`MemoryManager::note_spill_written`]; Spark's Spill (Disk) column shows them. Spillers
    /// report what they *freed* (`spilled_bytes`: Spill (Memory)); what they wrote is the
    /// engine's to say (compressed, encoded, or nothing written at all).
    pub spill_written_bytes: u64,
}

/// The memory manager of one task attempt. Cheap to clone (a shared handle); `Send + Sync`.
///
/// See the [crate documentation](crate) for the design, the data flow and the lock rule.
#[derive(Clone)]
pub struct MemoryManager {
    budget: Arc<Budget>,
}

impl std::fmt::Debug for MemoryManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryManager")
            .field("name", &self.budget.name)
            .field("used", &self.used())
            .field("reserved", &self.reserved())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl MemoryManager {
    /// Creates a manager named `name` (the task, for reports) that reserves from `listener`.
    pub fn new(
        name: impl Into<String>,
        config: MemoryConfig,
        listener: Arc<dyn ReservationListener>,
    ) -> Result<MemoryManager> {
        Self::with_gate(name, config, listener, None)
    }

    /// Like [`new`](Self::new), with a [`GrowGate`] every fallible grow passes before it asks
    /// `listener` for new memory (the container governor's seam).
    pub fn with_gate(
        name: impl Into<String>,
        config: MemoryConfig,
        listener: Arc<dyn ReservationListener>,
        gate: Option<Arc<dyn GrowGate>>,
    ) -> Result<MemoryManager> {
        Self::with_seams(name, config, listener, gate, None)
    }

    /// Like [`with_gate`](Self::with_gate), with an [`Arbiter`] told when the listener grants a
    /// fallible grow less than it needs (executor-wide arbitration; the provider's seam).
    pub fn with_seams(
        name: impl Into<String>,
        config: MemoryConfig,
        listener: Arc<dyn ReservationListener>,
        gate: Option<Arc<dyn GrowGate>>,
        arbiter: Option<Arc<dyn Arbiter>>,
    ) -> Result<MemoryManager> {
        Ok(MemoryManager {
            budget: Arc::new(Budget::new(name.into(), config, listener, gate, arbiter)?),
        })
    }

    /// The manager's id, unique in the process (what an [`Arbiter`] is told).
    pub fn id(&self) -> u64 {
        self.budget.id()
    }

    /// Idle bytes now: the unused cushion plus every slack (quantum mode), memory reserved from
    /// the listener that no consumer holds. A read-out.
    pub fn idle(&self) -> u64 {
        self.budget
            .cushion()
            .saturating_add(self.budget.slack_total())
    }

    /// True while a listener `reserve` call is in flight (a hint for arbiters: the task's thread
    /// may be waiting inside Spark, holding its `TaskMemoryManager` monitor).
    pub fn is_reserving(&self) -> bool {
        self.budget.is_reserving()
    }

    /// Hands idle memory back to the listener, up to `max` bytes: the unused cushion, then the
    /// slack of every reservation and pool (quantum mode); no spiller is asked. Returns the
    /// bytes handed back. What an arbiter asks of the executor's other tasks.
    pub fn release_idle(&self, max: u64) -> Result<u64> {
        self.budget.release_idle(max)
    }

    /// The manager's name.
    pub fn name(&self) -> &str {
        &self.budget.name
    }

    /// Its configuration.
    pub fn config(&self) -> &MemoryConfig {
        self.budget.config()
    }

    /// The root pool (the whole task; its limit is the task limit).
    pub fn root(&self) -> Pool {
        Pool {
            node: self.budget.root().clone(),
            budget: self.budget.clone(),
        }
    }

    /// Gets or creates the pool at `path` below the root, e.g. `sort/buffers` (a leading `root/`
    /// is accepted; `""` and `root` are the root). Pools created here have no limit.
    pub fn pool(&self, path: &str) -> Result<Pool> {
        let rel = path
            .strip_prefix("root")
            .filter(|r| r.is_empty() || r.starts_with('/'))
            .map(|r| r.trim_start_matches('/'))
            .unwrap_or(path);
        let mut pool = self.root();
        if rel.is_empty() {
            return Ok(pool);
        }
        if rel.split('/').any(str::is_empty) {
            return Err(MemoryError::InvalidArgument(format!(
                "pool path {path:?} has an empty element"
            )));
        }
        for part in rel.split('/') {
            pool = pool.child(part, None)?;
        }
        Ok(pool)
    }

    /// Bytes used by the task now (charged to the root pool).
    pub fn used(&self) -> u64 {
        self.budget.root().used()
    }

    /// Peak of [`used`](Self::used).
    pub fn peak(&self) -> u64 {
        self.budget.root().peak()
    }

    /// Bytes reserved from the listener and not handed back.
    pub fn reserved(&self) -> u64 {
        self.budget.reserved()
    }

    /// Reserves from the listener, now, the over-commit that forced grows
    /// ([`Reservation::force_grow`](crate::Reservation::force_grow)) left uncovered, whatever the
    /// task limit (the bytes are in use already): Spark's reservation then shows them at once,
    /// not only at the next grow that reaches the listener (which a task kept over its limit by
    /// the over-commit never makes). For code that forced a grow but may call out (DataFusion's
    /// infallible `grow`). Returns the bytes granted; what is not granted stays over-commit.
    pub fn cover_overcommit(&self) -> Result<u64> {
        self.budget.cover_overcommit()
    }

    /// Asks native spillers to free `target` bytes; returns the bytes they freed (each spiller's
    /// count capped at the spillable size it reported, see [`Spiller`](crate::Spiller)). The
    /// freed bytes stay reserved (in the cushion) unless hysteresis hands them back; use
    /// [`reclaim`](Self::reclaim) to give memory back to the listener.
    pub fn spill(&self, target: u64) -> Result<u64> {
        self.budget.spill_within(target, None)
    }

    /// Hands back to the listener up to `max` bytes of the unused cushion (no spiller is asked).
    /// Returns the bytes handed back.
    pub fn release_unused(&self, max: u64) -> Result<u64> {
        self.budget.release_unused(max)
    }

    /// What the listener's owner calls when it wants memory back (Spark's `spill`): first hands
    /// back unused cushion, then spills native consumers for the rest and hands that back too.
    /// Returns the bytes this call handed back to the listener (never 0 because of block
    /// rounding when there was something to give).
    pub fn reclaim(&self, target: u64) -> Result<u64> {
        self.budget.reclaim(target)
    }

    /// A snapshot of the pool tree and the largest consumers.
    pub fn usage_report(&self) -> UsageReport {
        self.budget.usage_report()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ManagerStats {
        let c = self.budget.counters();
        ManagerStats {
            used: self.used(),
            peak: self.peak(),
            reserved: self.reserved(),
            spill_count: c.spill_count,
            spilled_bytes: c.spilled_bytes,
            reserve_calls: c.reserve_calls,
            unreserve_calls: c.unreserve_calls,
            gate_refusals: c.gate_refusals,
            arbitrations: c.arbitrations,
            arbitrated_bytes: c.arbitrated_bytes,
            live_allocations: c.live_allocations,
            allocated_bytes: self.budget.allocated_bytes(),
            overcommitted: self.budget.overcommitted(),
            overcommit_peak: c.overcommit_peak,
            overcommitted_total: c.overcommitted_total,
            spill_written_bytes: c.spill_written_bytes,
        }
    }

    /// Counts `bytes` the task's spills wrote (spill files on disk), for
    /// [`ManagerStats::spill_written_bytes`] and Spark's Spill (Disk). Call it from a spiller, or
    /// once per spill file; any thread, never blocks, never fails. (Also on [`Pool`](crate::Pool),
    /// for code that holds a pool.)
    pub fn note_spill_written(&self, bytes: u64) {
        self.budget.note_spill_written(bytes);
    }

    /// Number of registered spillers.
    pub fn spiller_count(&self) -> usize {
        self.budget.spiller_count()
    }

    /// Closes the manager: reports and releases every live allocation (its memory is freed with
    /// the task's heap when the manager's last handle is dropped: see [`Pool::allocate`](crate::Pool::allocate)),
    /// empties every live reservation, forgets
    /// the spillers and hands every reserved byte back to the listener. Returns what had to be
    /// reclaimed (empty when the owners freed everything) and the bytes handed back. Idempotent:
    /// later calls return an empty report (and retry handing back bytes a failing listener
    /// kept, counted in [`LeakReport::returned_to_listener`]).
    ///
    /// After close every grow fails with [`MemoryError::Closed`]; shrinking and dropping
    /// reservations stays possible (they hold nothing) and whatever they still give back goes
    /// straight to the listener. Close is meant to run when no other thread uses the manager (the
    /// JNI layer guarantees this); if one does, its bytes are returned when it releases them.
    pub fn close(&self) -> Result<LeakReport> {
        self.budget.close()
    }

    /// True once [`close`](Self::close) has been called.
    pub fn is_closed(&self) -> bool {
        self.budget.is_closed()
    }
}

/// The upward link from a pool to its manager lives here, above both types, so that `pool`
/// does not import `manager` (module layering: see the crate docs).
impl Pool {
    /// The manager this pool belongs to.
    pub fn manager(&self) -> MemoryManager {
        MemoryManager {
            budget: self.budget.clone(),
        }
    }
}

//! The bridge to whoever owns the memory budget (in Spark: a `MemoryConsumer`).

use crate::sync::{AtomicU64, Ordering};

use crate::error::ListenerError;

/// Where the manager gets its budget from. In Spark this is a `MemoryConsumer` of the task's
/// `TaskMemoryManager`, reached through JNI.
///
/// The manager calls it rarely: it reserves whole blocks
/// ([`MemoryConfig::reservation_block`](crate::MemoryConfig)) and serves grows from that cushion,
/// and gives bytes back only when more than two blocks lie unused.
///
/// # Callback rules
/// - The manager never holds one of its locks while calling the listener, so the listener may
///   block, call into the JVM, and trigger a spill that re-enters the manager (on this or another
///   thread).
/// - `reserve(bytes)` returns the bytes granted, `<= bytes`; it may grant less (even 0). Granting
///   more is a contract violation: the manager keeps the grant (so it is given back later) and
///   fails the request with [`MemoryError::ListenerContract`](crate::MemoryError::ListenerContract).
/// - `unreserve(bytes)` gives back bytes previously granted. If it fails the manager keeps
///   counting the bytes as reserved and tries again at the next release or at close.
pub trait ReservationListener: Send + Sync {
    /// Asks for `bytes` more; returns bytes granted (`<= bytes`).
    fn reserve(&self, bytes: u64) -> Result<u64, ListenerError>;
    /// Gives back `bytes` previously granted.
    fn unreserve(&self, bytes: u64) -> Result<(), ListenerError>;
}

/// A check a fallible grow passes before it asks the listener for new memory: the seam through
/// which the executor's container governor (`nativemem-governor`, installed by the provider)
/// refuses new memory under hard container pressure.
///
/// A refusal is treated like a listener that granted nothing, with the gate's reason: the grow
/// takes slack back and spills native spillers for what it needs (memory already reserved is
/// used freely), and only if that is not enough fails with
/// [`OomReason::Gate`](crate::OomReason::Gate). Forced charges never consult the gate, and
/// grows served from the cushion never reach it. Called with no lock of the manager held; it
/// must be cheap (it runs before every listener call) and must not call into the manager.
pub trait GrowGate: Send + Sync {
    /// `Some(why)` refuses a reservation of `bytes` from the listener now; `None` lets it through.
    fn refuse(&self, bytes: u64) -> Option<String>;
}

/// The seam for "the listener granted less than asked": executor-wide arbitration. When a
/// fallible grow's listener reservation comes back short (after the grow took its own slack
/// back, and after the listener's owner, e.g. Spark, spilled what it could of this task), the
/// manager calls [`on_short_grant`](Arbiter::on_short_grant) once per grow; if it returns more
/// than 0 the grow asks the listener again before it spills the task's own native spillers or
/// fails. The provider's arbiter asks the executor's *other* managers to hand their idle cushion
/// and slack back to the listener's owner (Spark), so the retry finds them there.
///
/// # Callback rules
/// - Called with no lock of the manager held, on the growing thread; it must never wait for
///   another task's thread (it may call other managers, which call their own listeners).
/// - It must not grow or reclaim the requesting manager (`requester`, see
///   [`MemoryManager::id`](crate::MemoryManager::id)): skip it.
/// - A grow made while this thread arbitrates, or while it runs a `reclaim` of any manager
///   (the listener's owner asking for memory back: in Spark that call holds the task's
///   `TaskMemoryManager` monitor), is not arbitrated (see [`arbitration_allowed`]).
pub trait Arbiter: Send + Sync {
    /// The listener granted `short` bytes less than a grow of manager `requester` needed; frees
    /// what it can elsewhere and returns the bytes freed (0: nothing, the grow goes on down its
    /// remedy ladder).
    fn on_short_grant(&self, requester: u64, short: u64) -> u64;
}

std::thread_local! {
    /// Depth of arbitration or reclaim on this thread (see [`arbitration_allowed`]).
    static NO_ARBITRATION: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// False while this thread arbitrates or runs a manager's `reclaim`: a grow there must not
/// reach into other tasks. In Spark a `reclaim` runs inside `MemoryConsumer.spill`, under the
/// task's `TaskMemoryManager` monitor; arbitrating from there would call another task's listener
/// (its monitor) while holding one (two such tasks would deadlock). Nested arbitration is
/// refused for the same reason and to bound the recursion.
pub fn arbitration_allowed() -> bool {
    NO_ARBITRATION.with(|d| d.get() == 0)
}

/// Marks this thread as arbitrating (or reclaiming) until the guard drops (see
/// [`arbitration_allowed`]).
pub struct NoArbitration(());

impl NoArbitration {
    /// Enters the section.
    pub fn enter() -> NoArbitration {
        NO_ARBITRATION.with(|d| d.set(d.get() + 1));
        NoArbitration(())
    }
}

impl Drop for NoArbitration {
    fn drop(&mut self) {
        NO_ARBITRATION.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// A listener with a fixed capacity, for tests and for embedding without a JVM. Grants what it
/// has left; `u64::MAX` capacity means unlimited.
///
/// Its counters are single atomics that publish nothing, so every access is `Relaxed`: the
/// grant total stays exact by RMW atomicity alone, and the manager orders an `unreserve` after
/// the `reserve` that granted its bytes (release/acquire on its own `reserved`), so the load
/// below sees the grant by coherence. Readers (`reserved()`, the call counts) are read-outs; a
/// test reads them after joining the threads it checks, which orders them.
#[derive(Debug)]
pub struct CapacityListener {
    capacity: u64,
    reserved: AtomicU64,
    reserve_calls: AtomicU64,
    unreserve_calls: AtomicU64,
}

impl CapacityListener {
    /// A listener that grants up to `capacity` bytes in total.
    pub fn new(capacity: u64) -> Self {
        CapacityListener {
            capacity,
            reserved: AtomicU64::new(0),
            reserve_calls: AtomicU64::new(0),
            unreserve_calls: AtomicU64::new(0),
        }
    }

    /// A listener that grants everything.
    pub fn unlimited() -> Self {
        Self::new(u64::MAX)
    }

    /// Bytes currently granted and not given back.
    pub fn reserved(&self) -> u64 {
        // Relaxed: a read-out (see the type docs).
        self.reserved.load(Ordering::Relaxed)
    }

    /// Number of `reserve` calls so far.
    pub fn reserve_calls(&self) -> u64 {
        // Relaxed: a statistic.
        self.reserve_calls.load(Ordering::Relaxed)
    }

    /// Number of `unreserve` calls so far.
    pub fn unreserve_calls(&self) -> u64 {
        // Relaxed: a statistic.
        self.unreserve_calls.load(Ordering::Relaxed)
    }
}

impl ReservationListener for CapacityListener {
    fn reserve(&self, bytes: u64) -> Result<u64, ListenerError> {
        // Relaxed: a statistic.
        self.reserve_calls.fetch_add(1, Ordering::Relaxed);
        // Relaxed (load and CAS): a single counter kept within capacity by the CAS alone.
        let mut cur = self.reserved.load(Ordering::Relaxed);
        loop {
            let grant = bytes.min(self.capacity.saturating_sub(cur));
            match self.reserved.compare_exchange(
                cur,
                cur + grant,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(grant),
                Err(actual) => cur = actual,
            }
        }
    }

    fn unreserve(&self, bytes: u64) -> Result<(), ListenerError> {
        // Relaxed: a statistic.
        self.unreserve_calls.fetch_add(1, Ordering::Relaxed);
        // Relaxed (load and CAS): the grant of these bytes happens-before this call (type docs),
        // so even the first load sees it; the CAS alone keeps the counter from going negative.
        let mut cur = self.reserved.load(Ordering::Relaxed);
        loop {
            if bytes > cur {
                return Err(format!("unreserve of {bytes} bytes but only {cur} reserved").into());
            }
            match self.reserved.compare_exchange(
                cur,
                cur - bytes,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => cur = actual,
            }
        }
    }
}

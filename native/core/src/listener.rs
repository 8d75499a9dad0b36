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

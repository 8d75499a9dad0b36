//! The listener (the JVM side): failures, panics and over-grants surface as errors with exact
//! accounting; partial grants stay as cushion; `reclaim`.

use super::*;

struct FailingListener {
    fail_reserve: AtomicBool,
    fail_unreserve: AtomicBool,
    inner: CapacityListener,
}

impl ReservationListener for FailingListener {
    fn reserve(&self, bytes: u64) -> Result<u64, ListenerError> {
        if self.fail_reserve.load(Ordering::SeqCst) {
            return Err("java.lang.RuntimeException: boom".into());
        }
        self.inner.reserve(bytes)
    }
    fn unreserve(&self, bytes: u64) -> Result<(), ListenerError> {
        if self.fail_unreserve.load(Ordering::SeqCst) {
            return Err("unreserve boom".into());
        }
        self.inner.unreserve(bytes)
    }
}

#[test]
fn listener_failure_surfaces_and_accounting_stays_exact() {
    let l = Arc::new(FailingListener {
        fail_reserve: AtomicBool::new(true),
        fail_unreserve: AtomicBool::new(false),
        inner: CapacityListener::unlimited(),
    });
    let m = manager_with(l.clone(), exact());
    let r = m.root().reservation("op");
    let err = r.try_grow(MIB).unwrap_err();
    assert!(matches!(err, MemoryError::Listener { op: "reserve", .. }));
    assert!(err.to_string().contains("boom"));
    assert_eq!((r.size(), m.used(), m.reserved()), (0, 0, 0));
    l.fail_reserve.store(false, Ordering::SeqCst);
    r.try_grow(3 * BLOCK).unwrap();
    // Unreserve failing: the bytes stay reserved and are retried later.
    l.fail_unreserve.store(true, Ordering::SeqCst);
    let err = r.shrink(3 * BLOCK).unwrap_err();
    assert!(matches!(
        err,
        MemoryError::Listener {
            op: "unreserve",
            ..
        }
    ));
    assert_eq!((r.size(), m.used(), m.reserved()), (0, 0, 3 * BLOCK));
    assert!(m.close().is_err());
    assert_eq!(m.reserved(), 3 * BLOCK);
    l.fail_unreserve.store(false, Ordering::SeqCst);
    m.close().unwrap();
    assert_eq!((m.reserved(), l.inner.reserved()), (0, 0));
}

struct GreedyListener(AtomicU64);

impl ReservationListener for GreedyListener {
    fn reserve(&self, bytes: u64) -> Result<u64, ListenerError> {
        self.0.fetch_add(bytes * 2, Ordering::SeqCst);
        Ok(bytes * 2)
    }
    fn unreserve(&self, bytes: u64) -> Result<(), ListenerError> {
        self.0.fetch_sub(bytes, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn listener_granting_more_than_asked_is_an_error_but_the_grant_is_kept() {
    let l = Arc::new(GreedyListener(AtomicU64::new(0)));
    let m = manager_with(l.clone(), exact());
    let r = m.root().reservation("op");
    let err = r.try_grow(1).unwrap_err();
    assert!(matches!(err, MemoryError::ListenerContract(_)), "{err}");
    assert_eq!((r.size(), m.used()), (0, 0));
    assert_eq!(m.reserved(), l.0.load(Ordering::SeqCst));
    m.close().unwrap();
    assert_eq!((m.reserved(), l.0.load(Ordering::SeqCst)), (0, 0));
}

#[test]
fn reclaim_hands_back_cushion_first_then_spills() {
    let (m, l) = unlimited();
    let sp = HoldingSpiller::new(&m.root(), "sorter", 5 * MIB);
    let _reg = m.root().register_spiller("sorter", sp.clone());
    assert_eq!((m.used(), m.reserved()), (5 * MIB, BLOCK));
    // Phase 1 only: 1 MiB of the 3 MiB cushion, exact, no spill.
    assert_eq!(m.reclaim(MIB).unwrap(), MIB);
    assert_eq!(sp.calls.load(Ordering::SeqCst), 0);
    assert_eq!(m.reserved(), 7 * MIB);
    // Small requests are answered with exact bytes, never 0 because of rounding.
    assert_eq!(m.reclaim(1).unwrap(), 1);
    // Phase 2: the rest of the cushion, then the spiller.
    assert_eq!(m.reclaim(4 * MIB).unwrap(), 4 * MIB);
    assert_eq!(sp.calls.load(Ordering::SeqCst), 1);
    assert_eq!(m.used(), 0);
    assert_eq!(l.reserved(), m.reserved());
    assert_eq!(m.reclaim(u64::MAX).unwrap(), 3 * MIB - 1);
    assert_eq!((m.reserved(), l.reserved()), (0, 0));
}

#[test]
fn a_grow_refused_after_a_partial_grant_keeps_the_grant_as_cushion() {
    // Spark has 1.5 blocks for this task; the grow asks for 2.
    let l = Arc::new(CapacityListener::new(BLOCK + BLOCK / 2));
    let m = manager_with(l.clone(), exact());
    let r = m.pool("op").unwrap().reservation("r");
    let err = r.try_grow(2 * BLOCK).unwrap_err();
    assert!(matches!(err, MemoryError::OutOfMemory(_)), "{err}");
    // Nothing charged, the grant kept as cushion (below the hysteresis band), no unreserve.
    assert_eq!((r.size(), m.used()), (0, 0));
    assert_eq!(
        (m.reserved(), l.reserved()),
        (BLOCK + BLOCK / 2, BLOCK + BLOCK / 2)
    );
    assert_eq!((l.reserve_calls(), l.unreserve_calls()), (1, 0));
    // The next grow that fits uses it without an upcall.
    r.try_grow(BLOCK).unwrap();
    assert_eq!((m.used(), l.reserve_calls()), (BLOCK, 1));
    // Spark gets it back by asking, or at close.
    drop(r);
    assert_eq!(m.reclaim(u64::MAX).unwrap(), BLOCK + BLOCK / 2);
    assert_eq!((m.reserved(), l.reserved()), (0, 0));
    m.close().unwrap();
}

struct PanickyListener {
    panic_next: AtomicBool,
    inner: CapacityListener,
}

impl ReservationListener for PanickyListener {
    fn reserve(&self, bytes: u64) -> Result<u64, ListenerError> {
        if self.panic_next.swap(false, Ordering::SeqCst) {
            panic!("listener bug");
        }
        self.inner.reserve(bytes)
    }
    fn unreserve(&self, bytes: u64) -> Result<(), ListenerError> {
        if self.panic_next.swap(false, Ordering::SeqCst) {
            panic!("listener bug on unreserve");
        }
        self.inner.unreserve(bytes)
    }
}

#[test]
fn a_panicking_listener_is_an_error_and_accounting_stays_exact() {
    let l = Arc::new(PanickyListener {
        panic_next: AtomicBool::new(true),
        inner: CapacityListener::unlimited(),
    });
    let m = manager_with(l.clone(), exact());
    let r = m.root().reservation("op");
    let err = r.try_grow(MIB).unwrap_err();
    assert!(err.to_string().contains("panicked: listener bug"), "{err}");
    assert_eq!((r.size(), m.used(), m.reserved()), (0, 0, 0));
    r.try_grow(3 * BLOCK).unwrap();
    l.panic_next.store(true, Ordering::SeqCst);
    let err = r.shrink(3 * BLOCK).unwrap_err();
    assert!(
        err.to_string()
            .contains("panicked: listener bug on unreserve"),
        "{err}"
    );
    // The bytes stay reserved (the listener did not take them) and the claim was undone.
    assert_eq!((r.size(), m.used(), m.reserved()), (0, 0, 3 * BLOCK));
    m.close().unwrap();
    assert_eq!((m.reserved(), l.inner.reserved()), (0, 0));
}

//! Spilling native spillers when the listener or a pool limit refuses, and spillers that
//! misbehave (panic, over-report, re-enter the manager).

use super::*;

#[test]
fn refused_listener_triggers_a_native_spill_then_succeeds() {
    let (m, l) = capacity(16 * MIB);
    let sp = HoldingSpiller::new(&m.pool("sort").unwrap(), "sorter", 12 * MIB);
    let _reg = m
        .pool("sort")
        .unwrap()
        .register_spiller("sorter", sp.clone());
    let r = m.pool("join").unwrap().reservation("join");
    r.try_grow(10 * MIB).unwrap();
    assert_eq!(sp.calls.load(Ordering::SeqCst), 1);
    assert_eq!((m.used(), sp.res.size(), r.size()), (10 * MIB, 0, 10 * MIB));
    assert!(m.reserved() <= 16 * MIB);
    assert_eq!(l.reserved(), m.reserved());
    let s = m.stats();
    assert_eq!((s.spill_count, s.spilled_bytes), (1, 12 * MIB));
}

#[test]
fn memory_a_grow_spills_for_is_not_handed_back_before_the_retry() {
    let (m, l) = capacity(32 * MIB);
    let sp = HoldingSpiller::new(&m.pool("sort").unwrap(), "sorter", 30 * MIB);
    let _reg = m
        .pool("sort")
        .unwrap()
        .register_spiller("sorter", sp.clone());
    assert_eq!((m.reserved(), l.reserve_calls()), (32 * MIB, 1));
    let r = m.pool("join").unwrap().reservation("join");
    r.try_grow(20 * MIB).unwrap();
    // One refused reserve, then the spill's 30 MiB served the retry from the cushion: the
    // listener never took memory back in between, and the surplus (12 MiB) is within two blocks.
    assert_eq!((l.reserve_calls(), l.unreserve_calls()), (2, 0));
    assert_eq!((m.used(), m.reserved()), (20 * MIB, 32 * MIB));
    r.try_grow(MIB).unwrap();
    drop(r);
    assert_eq!(m.reserved(), BLOCK);
    assert_eq!(l.reserved(), m.reserved());
}

#[test]
fn refused_listener_without_spillers_is_out_of_memory_with_report() {
    let (m, l) = capacity(10 * MIB);
    let r = m.pool("sort").unwrap().reservation("sorter");
    r.try_grow(9 * MIB).unwrap();
    let err = r.try_grow(2 * MIB).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("Failed to reserve 2.0 MiB for consumer 'sorter#"),
        "{text}"
    );
    assert!(text.contains("the reservation listener granted"), "{text}");
    assert!(text.contains("Top consumers:\n  1. sorter#"), "{text}");
    assert_eq!((r.size(), m.used()), (9 * MIB, 9 * MIB));
    assert_eq!(l.reserved(), m.reserved());
    assert!(m.reserved() <= 10 * MIB);
}

#[test]
fn spill_picks_the_smallest_that_covers_else_the_largest() {
    let (m, _l) = unlimited();
    let p = m.pool("ops").unwrap();
    let small = HoldingSpiller::new(&p, "small", 2 * MIB);
    let mid = HoldingSpiller::new(&p, "mid", 5 * MIB);
    let big = HoldingSpiller::new(&p, "big", 9 * MIB);
    let _r: Vec<_> = [&small, &mid, &big]
        .iter()
        .map(|s| p.register_spiller("s", (*s).clone() as Arc<dyn Spiller>))
        .collect();
    assert_eq!(m.spill(4 * MIB).unwrap(), 5 * MIB);
    assert_eq!(
        [&small, &mid, &big].map(|s| s.calls.load(Ordering::SeqCst)),
        [0, 1, 0]
    );
    // Nothing covers 20 MiB: largest first, then the next largest.
    assert_eq!(m.spill(20 * MIB).unwrap(), 11 * MIB);
    assert_eq!(
        [&small, &mid, &big].map(|s| s.calls.load(Ordering::SeqCst)),
        [1, 1, 1]
    );
    assert_eq!(m.used(), 0);
}

#[test]
fn dropped_registration_unregisters_the_spiller() {
    let (m, _l) = unlimited();
    let sp = HoldingSpiller::new(&m.root(), "s", MIB);
    let reg = m.root().register_spiller("s", sp.clone());
    assert_eq!(m.spiller_count(), 1);
    drop(reg);
    assert_eq!(m.spiller_count(), 0);
    assert_eq!(m.spill(MIB).unwrap(), 0);
}

/// A grow refused by a pool limit even after spilling must not keep what the spill freed: beyond
/// the hysteresis band (two blocks) it goes back to the listener, as after a listener refusal.
#[test]
fn pool_limit_refusal_after_a_spill_hands_surplus_back() {
    let l = Arc::new(CapacityListener::unlimited());
    let m = manager_with(l.clone(), exact().with_reservation_block(MIB));
    let pool = m.root().child("engine", Some(4 * MIB)).unwrap();
    let spiller = HoldingSpiller::new(&pool, "buffers", 4 * MIB);
    let _registration = pool.register_spiller("buffers", spiller.clone());
    assert_eq!((m.used(), m.reserved()), (4 * MIB, 4 * MIB));
    let err = pool.reservation("big").try_grow(5 * MIB).unwrap_err();
    assert!(err.is_out_of_memory(), "{err}");
    assert_eq!(
        spiller.calls.load(Ordering::SeqCst),
        1,
        "spilled once first"
    );
    assert_eq!(m.used(), 0);
    assert!(
        m.reserved() <= 2 * MIB,
        "{} reserved after the refusal",
        m.reserved()
    );
    assert_eq!(l.reserved(), m.reserved());
    m.close().unwrap();
    assert_eq!(l.reserved(), 0);
}

/// A listener standing in for Spark: every reserve takes the "TaskMemoryManager monitor" and,
/// when the budget is short, calls back into the manager to spill (as Spark calls
/// `MemoryConsumer.spill` on our consumer) while holding it.
struct SparkLikeListener {
    monitor: parking_lot::ReentrantMutex<()>,
    budget: CapacityListener,
    manager: Mutex<Option<MemoryManager>>,
}

impl ReservationListener for SparkLikeListener {
    fn reserve(&self, bytes: u64) -> Result<u64, ListenerError> {
        let _monitor = self.monitor.lock();
        let mut got = self.budget.reserve(bytes)?;
        if got < bytes {
            let m = self.manager.lock().clone();
            if let Some(m) = m {
                m.reclaim(bytes - got).map_err(|e| e.to_string())?;
                got += self.budget.reserve(bytes - got)?;
            }
        }
        Ok(got)
    }
    fn unreserve(&self, bytes: u64) -> Result<(), ListenerError> {
        // Like Spark's `freeMemory`, which also synchronizes on the (re-entrant) monitor.
        let _monitor = self.monitor.lock();
        self.budget.unreserve(bytes)
    }
}

/// A spiller that frees its reservation by shrinking it through the manager (re-entering it).
struct ShrinkingSpiller {
    res: Reservation,
}

impl Spiller for ShrinkingSpiller {
    fn spillable_bytes(&self) -> u64 {
        self.res.size()
    }
    fn spill(&self, target: u64) -> Result<u64> {
        // The owner thread may shrink concurrently: retry with the size seen now.
        loop {
            let give = target.min(self.res.size());
            match self.res.shrink(give) {
                Ok(()) => return Ok(give),
                Err(MemoryError::InvalidArgument(_)) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[test]
fn spiller_reentering_the_manager_does_not_deadlock() {
    let l = Arc::new(SparkLikeListener {
        monitor: parking_lot::ReentrantMutex::new(()),
        budget: CapacityListener::new(48 * MIB),
        manager: Mutex::new(None),
    });
    let m = manager_with(l.clone(), exact().with_reservation_block(MIB));
    *l.manager.lock() = Some(m.clone());
    let pool = m.pool("sort").unwrap();
    let spillers: Vec<_> = (0..3)
        .map(|i| {
            let s = Arc::new(ShrinkingSpiller {
                res: pool.reservation(format!("sorter{i}")),
            });
            let reg = pool.register_spiller(format!("sorter{i}"), s.clone());
            (s, reg)
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    // Native threads growing (their spillers' reservations) and shrinking.
    for (i, (s, _)) in spillers.iter().enumerate() {
        let s = s.clone();
        let stop = stop.clone();
        let progress = progress.clone();
        handles.push(std::thread::spawn(move || {
            let mut n = i as u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let _ = s.res.try_grow((n % 7 + 1) * MIB);
                if n % 5 == 0 {
                    let _ = s.res.shrink(s.res.size() / 2);
                }
                progress.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    // "Spark" asking for memory back while holding its monitor.
    {
        let l = l.clone();
        let m = m.clone();
        let stop = stop.clone();
        let progress = progress.clone();
        handles.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let _monitor = l.monitor.lock();
                m.reclaim(4 * MIB).unwrap();
                drop(_monitor);
                progress.fetch_add(1, Ordering::SeqCst);
                std::thread::yield_now();
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut last = 0;
    let mut stalled_since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let p = progress.load(Ordering::SeqCst);
        if p != last {
            last = p;
            stalled_since = Instant::now();
        }
        assert!(
            stalled_since.elapsed() < Duration::from_secs(10),
            "no progress for 10 s: deadlock"
        );
    }
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        h.join().unwrap();
    }
    assert!(progress.load(Ordering::SeqCst) > 100);
    assert!(m.stats().spill_count > 0, "spills happened");
    drop(spillers);
    *l.manager.lock() = None;
    assert_eq!(m.used(), 0);
    m.close().unwrap();
    assert_eq!(l.budget.reserved(), 0);
}

struct PanickySpiller {
    res: Reservation,
    panics_left: AtomicU64,
}

impl Spiller for PanickySpiller {
    fn spillable_bytes(&self) -> u64 {
        self.res.size()
    }
    fn spill(&self, _target: u64) -> Result<u64> {
        if self.panics_left.load(Ordering::SeqCst) > 0 {
            self.panics_left.fetch_sub(1, Ordering::SeqCst);
            panic!("spiller bug");
        }
        Ok(self.res.free())
    }
}

#[test]
fn a_panicking_spiller_is_an_error_and_is_asked_again_later() {
    let (m, _l) = unlimited();
    let sp = Arc::new(PanickySpiller {
        res: m.root().reservation("s"),
        panics_left: AtomicU64::new(1),
    });
    sp.res.try_grow(MIB).unwrap();
    let _reg = m.root().register_spiller("s", sp.clone());
    let err = m.spill(MIB).unwrap_err();
    assert!(matches!(err, MemoryError::Spill { .. }), "{err}");
    assert!(err.to_string().contains("panicked: spiller bug"), "{err}");
    assert_eq!(m.used(), MIB);
    // Not left marked busy: the next spill asks it again.
    assert_eq!(m.spill(MIB).unwrap(), MIB);
    assert_eq!(m.used(), 0);
}

#[test]
fn dropping_a_registration_releases_the_spiller_outside_the_registry_lock() {
    // The registry holds the only reference to a spiller that owns its reservation: dropping the
    // registration drops the spiller, whose release calls the listener, which here spills the
    // same manager (as Spark does under its monitor). That needs the registry lock again.
    let l = Arc::new(SparkLikeListener {
        monitor: parking_lot::ReentrantMutex::new(()),
        budget: CapacityListener::new(u64::MAX),
        manager: Mutex::new(None),
    });
    struct ReclaimOnUnreserve(Arc<SparkLikeListener>);
    impl ReservationListener for ReclaimOnUnreserve {
        fn reserve(&self, bytes: u64) -> Result<u64, ListenerError> {
            self.0.reserve(bytes)
        }
        fn unreserve(&self, bytes: u64) -> Result<(), ListenerError> {
            let m = self.0.manager.lock().clone();
            if let Some(m) = m {
                m.spill(1).map_err(|e| e.to_string())?; // takes the registry lock
            }
            self.0.unreserve(bytes)
        }
    }
    let m = manager_with(
        Arc::new(ReclaimOnUnreserve(l.clone())),
        exact().with_reservation_block(MIB),
    );
    *l.manager.lock() = Some(m.clone());
    let res = m.root().reservation("owned");
    res.try_grow(4 * MIB).unwrap();
    let reg = m
        .root()
        .register_spiller("owned", Arc::new(ShrinkingSpiller { res }));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(reg);
        done_tx.send(()).unwrap();
    });
    done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("dropping the registration deadlocked");
    *l.manager.lock() = None;
    assert_eq!(m.used(), 0);
    m.close().unwrap();
}

/// A spiller whose `spill` claims more than it said it could free.
struct OverReportingSpiller {
    res: Reservation,
    reports: u64,
}

impl Spiller for OverReportingSpiller {
    fn spillable_bytes(&self) -> u64 {
        self.res.size()
    }
    fn spill(&self, _target: u64) -> Result<u64> {
        self.res.free();
        Ok(self.reports)
    }
}

#[test]
fn a_spiller_reporting_more_than_it_held_counts_as_its_spillable_size() {
    let (m, _l) = unlimited();
    let p = m.pool("ops").unwrap();
    let spillers: Vec<Arc<OverReportingSpiller>> = [MIB, 2 * MIB]
        .iter()
        .map(|&bytes| {
            let res = p.reservation("liar");
            res.try_grow(bytes).unwrap();
            Arc::new(OverReportingSpiller {
                res,
                reports: u64::MAX,
            })
        })
        .collect();
    let _regs: Vec<_> = spillers
        .iter()
        .map(|s| p.register_spiller("liar", s.clone() as Arc<dyn Spiller>))
        .collect();
    assert_eq!(m.used(), 3 * MIB);
    // Nothing covers 4 MiB: both are asked. Each says u64::MAX; each counts as what it held.
    assert_eq!(m.spill(4 * MIB).unwrap(), 3 * MIB);
    assert_eq!(m.used(), 0);
    let s = m.stats();
    assert_eq!((s.spill_count, s.spilled_bytes), (2, 3 * MIB));
    // A later round with nothing left to spill asks no one and counts nothing.
    assert_eq!(m.spill(MIB).unwrap(), 0);
    assert_eq!(m.stats().spilled_bytes, 3 * MIB);
}

#[test]
fn spill_counters_saturate_instead_of_wrapping() {
    // A spiller whose spillable size is huge (and honest about what it reports) twice: the
    // round's sum and the manager's counters stop at u64::MAX.
    struct Huge;
    impl Spiller for Huge {
        fn spillable_bytes(&self) -> u64 {
            u64::MAX
        }
        fn spill(&self, _target: u64) -> Result<u64> {
            Ok(u64::MAX)
        }
    }
    let (m, _l) = unlimited();
    let _a = m.root().register_spiller("a", Arc::new(Huge));
    assert_eq!(m.spill(u64::MAX).unwrap(), u64::MAX);
    assert_eq!(m.spill(u64::MAX).unwrap(), u64::MAX);
    let s = m.stats();
    assert_eq!((s.spill_count, s.spilled_bytes), (2, u64::MAX));
}

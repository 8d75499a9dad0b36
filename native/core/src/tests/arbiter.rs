//! The arbiter seam: a short grant of the listener is reported once per grow, before the task's
//! own spillers; what the arbiter frees elsewhere lets the retry succeed; pool limits, the gate
//! and grows inside a reclaim never reach it; `idle` and `release_idle` cover cushion and slack.

use super::*;

/// An arbiter that has `other` hand its idle memory back, counting its calls.
#[derive(Default)]
struct GiveBack {
    other: Mutex<Option<MemoryManager>>,
    calls: AtomicU64,
    asked: AtomicU64,
}

impl Arbiter for GiveBack {
    fn on_short_grant(&self, requester: u64, short: u64) -> u64 {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.asked.fetch_add(short, Ordering::SeqCst);
        let other = self.other.lock().clone();
        match other {
            Some(m) if m.id() != requester => m.release_idle(short).unwrap(),
            _ => 0,
        }
    }
}

/// Two managers on one 64 MiB listener; `b` has the arbiter, which asks `a`.
fn two_tasks(
    config_a: MemoryConfig,
) -> (
    MemoryManager,
    MemoryManager,
    Arc<CapacityListener>,
    Arc<GiveBack>,
) {
    let l = Arc::new(CapacityListener::new(64 * MIB));
    let arbiter = Arc::new(GiveBack::default());
    let a = MemoryManager::new("task-a", config_a, l.clone()).unwrap();
    let b = MemoryManager::with_seams(
        "task-b",
        MemoryConfig::default(),
        l.clone(),
        None,
        Some(arbiter.clone() as Arc<dyn Arbiter>),
    )
    .unwrap();
    *arbiter.other.lock() = Some(a.clone());
    (a, b, l, arbiter)
}

#[test]
fn a_short_grant_retries_after_the_arbiter_freed_memory_elsewhere() {
    let (a, b, l, arbiter) = two_tasks(MemoryConfig::default().with_reservation_block(32 * MIB));
    let held = a.root().reservation("a-op");
    held.try_grow(1).unwrap();
    assert_eq!(a.idle(), 32 * MIB - 1);
    // B's own spiller holds 8 MiB: arbitration comes before it.
    let spiller = HoldingSpiller::new(&b.root(), "b-spill", 8 * MIB);
    let _reg = b.root().register_spiller("b-spill", spiller.clone());
    assert_eq!(l.reserved(), 40 * MIB);

    let r = b.root().reservation("b-op");
    r.try_grow(40 * MIB).unwrap();
    assert_eq!(arbiter.calls.load(Ordering::SeqCst), 1);
    assert_eq!(arbiter.asked.load(Ordering::SeqCst), 16 * MIB);
    assert_eq!(spiller.calls.load(Ordering::SeqCst), 0, "not spilled");
    assert_eq!(a.reserved(), 16 * MIB);
    assert_eq!(b.reserved(), 48 * MIB);
    assert_eq!(l.reserved(), 64 * MIB);
    let s = b.stats();
    assert_eq!((s.arbitrations, s.arbitrated_bytes), (1, 16 * MIB));
}

#[test]
fn when_the_arbiter_frees_nothing_the_own_spillers_go_next() {
    let (a, b, l, arbiter) = two_tasks(MemoryConfig::default());
    let held = a.root().reservation("a-op");
    held.try_grow(48 * MIB).unwrap(); // no idle memory in a
    let spiller = HoldingSpiller::new(&b.root(), "b-spill", 8 * MIB);
    let _reg = b.root().register_spiller("b-spill", spiller.clone());
    assert_eq!(l.reserved(), 56 * MIB);

    let r = b.root().reservation("b-op");
    r.try_grow(12 * MIB).unwrap();
    assert_eq!(arbiter.calls.load(Ordering::SeqCst), 1);
    assert_eq!(spiller.calls.load(Ordering::SeqCst), 1);
    assert_eq!(b.used(), 12 * MIB);
    assert_eq!(b.stats().arbitrated_bytes, 0);
}

#[test]
fn pool_limits_never_reach_the_arbiter() {
    let (_a, b, _l, arbiter) = two_tasks(MemoryConfig::default());
    let pool = b.root().child("limited", Some(MIB)).unwrap();
    let r = pool.reservation("op");
    assert!(r.try_grow(2 * MIB).is_err());
    assert_eq!(arbiter.calls.load(Ordering::SeqCst), 0);
}

/// A spiller that grows another reservation of its manager while it spills (a spill writer).
struct GrowingSpiller {
    res: Reservation,
    buffer: Reservation,
}

impl Spiller for GrowingSpiller {
    fn spillable_bytes(&self) -> u64 {
        self.res.size()
    }
    fn spill(&self, _target: u64) -> Result<u64> {
        let _ = self.buffer.try_grow(64 * MIB);
        Ok(self.res.free())
    }
}

#[test]
fn a_grow_inside_a_reclaim_is_not_arbitrated() {
    let (_a, b, _l, arbiter) = two_tasks(MemoryConfig::default());
    let res = b.root().reservation("data");
    res.try_grow(8 * MIB).unwrap();
    let spiller = Arc::new(GrowingSpiller {
        res,
        buffer: b.root().reservation("writer"),
    });
    let _reg = b.root().register_spiller("writer", spiller.clone());
    b.reclaim(8 * MIB).unwrap();
    assert_eq!(arbiter.calls.load(Ordering::SeqCst), 0);
    assert!(arbitration_allowed());
}

#[test]
fn idle_and_release_idle_count_the_slack_too() {
    let l = Arc::new(CapacityListener::unlimited());
    let m = manager_with(
        l.clone(),
        MemoryConfig::default().with_reservation_quantum(MIB),
    );
    let r = m.root().reservation("op");
    r.try_grow(100).unwrap();
    let slack = MIB - 100;
    assert_eq!(m.used(), MIB, "the quantum is charged");
    assert_eq!(m.idle(), BLOCK - MIB + slack);
    assert_eq!(m.release_idle(u64::MAX).unwrap(), BLOCK - 100);
    assert_eq!(m.idle(), 0);
    assert_eq!(r.size(), 100);
    assert_eq!(l.reserved(), 100);
}

mod model {
    //! Random grows and shrinks of three tasks on one listener, each with an arbiter that has the
    //! two others hand their idle memory back: with arbitration the executor behaves like one
    //! budget. After every step: the listener's total is the sum of the managers' `reserved`,
    //! each task's use is covered, and a grow fails exactly when the tasks' use plus the grow
    //! exceeds the capacity (idle memory of other tasks never makes a grow fail).
    use super::*;
    use proptest::prelude::*;

    const CAPACITY: u64 = 30_000;
    const BLOCK: u64 = 4_000;

    /// Hands back the idle memory of every manager but the requester.
    #[derive(Default)]
    struct Others(Mutex<Vec<MemoryManager>>);

    impl Arbiter for Others {
        fn on_short_grant(&self, requester: u64, short: u64) -> u64 {
            let managers = self.0.lock().clone();
            let mut freed = 0;
            for m in managers.iter().filter(|m| m.id() != requester) {
                if freed >= short {
                    break;
                }
                freed += m.release_idle(short - freed).unwrap();
            }
            freed
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Grow(usize, u64),
        Shrink(usize, u64),
        ReleaseIdle(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0..3usize, 1..9_000u64).prop_map(|(t, b)| Op::Grow(t, b)),
            4 => (0..3usize, 0..9_000u64).prop_map(|(t, b)| Op::Shrink(t, b)),
            1 => (0..3usize).prop_map(Op::ReleaseIdle),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn with_arbitration_the_tasks_share_one_budget(ops in proptest::collection::vec(op(), 1..100)) {
            let l = Arc::new(CapacityListener::new(CAPACITY));
            let arbiter = Arc::new(Others::default());
            let managers: Vec<MemoryManager> = (0..3)
                .map(|i| {
                    MemoryManager::with_seams(
                        format!("task-{i}"),
                        // Exact accounting: the model compares every task's bytes exactly.
                        MemoryConfig::default()
                            .with_reservation_block(BLOCK)
                            .with_reservation_quantum(0),
                        l.clone(),
                        None,
                        Some(arbiter.clone() as Arc<dyn Arbiter>),
                    )
                    .unwrap()
                })
                .collect();
            *arbiter.0.lock() = managers.clone();
            let res: Vec<Reservation> = managers.iter().map(|m| m.root().reservation("op")).collect();
            let mut size = [0u64; 3];
            for op in ops {
                match op {
                    Op::Grow(t, b) => {
                        let fits = size.iter().sum::<u64>() + b <= CAPACITY;
                        let grown = res[t].try_grow(b);
                        prop_assert_eq!(grown.is_ok(), fits, "grow {} of task {}: {:?}", b, t, grown);
                        if fits {
                            size[t] += b;
                        }
                    }
                    Op::Shrink(t, b) => {
                        let b = b.min(size[t]);
                        res[t].shrink(b).unwrap();
                        size[t] -= b;
                    }
                    Op::ReleaseIdle(t) => {
                        managers[t].release_idle(u64::MAX).unwrap();
                        prop_assert_eq!(managers[t].idle(), 0);
                    }
                }
                let reserved: u64 = managers.iter().map(|m| m.reserved()).sum();
                prop_assert_eq!(l.reserved(), reserved);
                for (t, m) in managers.iter().enumerate() {
                    prop_assert_eq!(m.used(), size[t]);
                    prop_assert!(m.used() <= m.reserved());
                    prop_assert_eq!(m.idle(), m.reserved() - m.used());
                }
            }
            drop(res);
            // The arbiter holds the managers (and they it): break the cycle.
            arbiter.0.lock().clear();
            for m in &managers {
                m.close().unwrap();
            }
            prop_assert_eq!(l.reserved(), 0);
        }
    }
}

//! The cushion (`reserved - root.used`): grows inside it make no listener call, surplus goes
//! back with hysteresis, and grows racing each other or a hand-back stay covered.

use super::*;

#[test]
fn grows_inside_the_cushion_make_no_listener_call() {
    let (m, l) = unlimited();
    let r = m.root().reservation("op");
    r.try_grow(1).unwrap();
    assert_eq!((m.used(), m.reserved(), l.reserve_calls()), (1, BLOCK, 1));
    for _ in 0..1000 {
        r.try_grow(1024).unwrap();
    }
    assert_eq!(m.used(), 1 + 1000 * 1024);
    assert_eq!((m.reserved(), l.reserve_calls()), (BLOCK, 1));
    r.try_grow(BLOCK).unwrap();
    assert_eq!((m.reserved(), l.reserve_calls()), (2 * BLOCK, 2));
    assert_eq!(l.reserved(), m.reserved());
}

#[test]
fn one_gib_in_64_kib_grows_costs_at_most_128_upcalls() {
    let (m, l) = unlimited();
    let r = m.root().reservation("op");
    for _ in 0..(1 << 30) / (64 << 10) {
        r.try_grow(64 << 10).unwrap();
    }
    assert_eq!(m.used(), 1 << 30);
    assert!(l.reserve_calls() <= 128, "{} calls", l.reserve_calls());
}

#[test]
fn grow_shrink_loop_at_a_block_edge_makes_no_upcalls() {
    let (m, l) = unlimited();
    let r = m.root().reservation("op");
    r.try_grow(BLOCK).unwrap();
    let calls = (l.reserve_calls(), l.unreserve_calls());
    for _ in 0..10_000 {
        r.try_grow(4096).unwrap();
        r.shrink(4096).unwrap();
    }
    assert_eq!(
        (l.reserve_calls(), l.unreserve_calls()),
        (calls.0 + 1, calls.1),
        "only the first crossing reserves"
    );
}

#[test]
fn surplus_above_two_blocks_goes_back_down_to_one_block() {
    let (m, l) = unlimited();
    let r = m.root().reservation("op");
    r.try_grow(5 * BLOCK).unwrap();
    assert_eq!(m.reserved(), 5 * BLOCK);
    r.shrink(BLOCK).unwrap();
    r.shrink(BLOCK).unwrap();
    assert_eq!(m.reserved(), 5 * BLOCK, "two blocks of cushion are kept");
    r.shrink(MIB).unwrap();
    assert_eq!(m.used(), 3 * BLOCK - MIB);
    assert_eq!(
        m.reserved(),
        4 * BLOCK - MIB,
        "down to one block of cushion"
    );
    drop(r);
    assert_eq!((m.used(), m.reserved()), (0, BLOCK));
    assert_eq!(l.reserved(), BLOCK);
    m.close().unwrap();
    assert_eq!((m.reserved(), l.reserved()), (0, 0));
}

#[test]
fn concurrent_grows_and_shrinks_keep_counters_exact() {
    let (m, l) = capacity(64 * MIB);
    let pools: Vec<Pool> = (0..4)
        .map(|i| m.pool(&format!("op{i}/leaf")).unwrap())
        .collect();
    let threads = 4;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let pool = pools[t % pools.len()].clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let r = pool.reservation(format!("worker{t}"));
                let mut seed = t as u64 * 7919 + 1;
                let mut ok = 0u64;
                barrier.wait();
                for _ in 0..20_000 {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let bytes = (seed >> 33) % (2 * MIB);
                    if seed % 3 == 0 && r.size() >= bytes {
                        r.shrink(bytes).unwrap();
                    } else if r.try_grow(bytes).is_ok() {
                        ok += 1;
                    }
                    let ptr = pool.allocate(((seed >> 40) % 4096 + 1) as usize, 16);
                    if let Ok(p) = ptr {
                        pool.free(p).unwrap();
                    }
                }
                let held = r.size();
                assert_eq!(r.free(), held);
                ok
            })
        })
        .collect();
    let ok: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(ok > 0);
    assert_eq!(m.used(), 0);
    for p in &pools {
        assert_eq!(p.used(), 0);
    }
    // Peaks may include other threads' in-flight charges (at most 2 MiB per thread).
    assert!(
        m.peak() <= 64 * MIB + threads as u64 * 2 * MIB,
        "{}",
        m.peak()
    );
    assert_eq!(l.reserved(), m.reserved());
    assert!(m.reserved() <= 2 * BLOCK);
    m.close().unwrap();
    assert_eq!(l.reserved(), 0);
}

/// An interleaving the scheduler rarely produces, forced: grow A has charged the
/// root but not yet looked at `reserved` when grow B charges, finds no cushion and asks the
/// listener. B's grant must cover A's bytes too, or A takes the fast path on B's grant.
#[test]
fn a_grow_stopped_after_its_charge_is_covered_by_the_next_grant() {
    let block = 4;
    let l = Arc::new(CapacityListener::unlimited());
    let m = manager_with(l.clone(), exact().with_reservation_block(block));
    let (at_point_tx, at_point_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let a = m.root().reservation("a");
    let grow_a = std::thread::spawn(move || {
        let _hook = crate::sync::test_points::set(move |name| {
            if name == "grow:charged" {
                at_point_tx.send(()).unwrap();
                go_rx.recv().unwrap();
            }
        });
        a.try_grow(3).unwrap();
        a
    });
    at_point_rx.recv().unwrap();
    let b = m.root().reservation("b");
    b.try_grow(3).unwrap();
    go_tx.send(()).unwrap();
    let a = grow_a.join().unwrap();
    assert_eq!(m.used(), 6);
    assert!(
        m.reserved() >= m.used(),
        "used {} > reserved {}",
        m.used(),
        m.reserved()
    );
    assert_eq!(l.reserved(), m.reserved());
    drop((a, b));
    m.close().unwrap();
    assert_eq!(l.reserved(), 0);
}

/// A hand-back racing two grows, forced: the hand-back sizes the cushion (3), a grow uses it up,
/// the hand-back claims its bytes on the root, a second grow goes to the listener, and only then
/// does the claim compare with `reserved`. The second grant must cover the claim too, or the
/// hand-back gives away bytes that are in use.
#[test]
fn a_hand_back_racing_two_grows_never_gives_away_used_bytes() {
    let block = 4;
    let l = Arc::new(CapacityListener::unlimited());
    let m = manager_with(l.clone(), exact().with_reservation_block(block));
    let r1 = m.root().reservation("r1");
    r1.try_grow(1).unwrap(); // reserved 4: a cushion of 3
    let (at_tx, at_rx) = std::sync::mpsc::channel::<&'static str>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let m2 = m.clone();
    let hand_back = std::thread::spawn(move || {
        let _hook = crate::sync::test_points::set(move |name| {
            if name.starts_with("claim:") {
                at_tx.send(name).unwrap();
                go_rx.recv().unwrap();
            }
        });
        m2.release_unused(u64::MAX).unwrap()
    });
    assert_eq!(at_rx.recv().unwrap(), "claim:sized");
    let x = m.root().reservation("x");
    x.try_grow(3).unwrap(); // uses the cushion the hand-back sized
    go_tx.send(()).unwrap();
    assert_eq!(at_rx.recv().unwrap(), "claim:claimed");
    let y = m.root().reservation("y");
    y.try_grow(4).unwrap(); // to the listener, while the claim is on the root
    go_tx.send(()).unwrap();
    // If the hand-back's first claim was refused it tries again: let it through.
    while let Ok(name) = at_rx.recv_timeout(Duration::from_millis(200)) {
        let _ = name;
        go_tx.send(()).unwrap();
    }
    hand_back.join().unwrap();
    assert_eq!(m.used(), 8);
    assert!(
        m.reserved() >= m.used(),
        "used {} > reserved {}",
        m.used(),
        m.reserved()
    );
    assert_eq!(l.reserved(), m.reserved());
    drop((r1, x, y));
    m.close().unwrap();
    assert_eq!(l.reserved(), 0);
}

struct SlowUnreserve {
    inner: CapacityListener,
    in_unreserve: AtomicBool,
}

impl ReservationListener for SlowUnreserve {
    fn reserve(&self, bytes: u64) -> Result<u64, ListenerError> {
        self.inner.reserve(bytes)
    }
    fn unreserve(&self, bytes: u64) -> Result<(), ListenerError> {
        self.in_unreserve.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(200));
        self.in_unreserve.store(false, Ordering::SeqCst);
        self.inner.unreserve(bytes)
    }
}

#[test]
fn a_slow_hand_back_does_not_make_a_fitting_grow_fail_at_the_task_limit() {
    let l = Arc::new(SlowUnreserve {
        inner: CapacityListener::unlimited(),
        in_unreserve: AtomicBool::new(false),
    });
    let m = manager_with(l.clone(), exact().with_task_limit(Some(64 * MIB)));
    let keep = m.root().reservation("keep");
    keep.try_grow(40 * MIB).unwrap();
    let freed = m.root().reservation("freed");
    freed.try_grow(24 * MIB).unwrap();
    assert_eq!((m.used(), m.reserved()), (64 * MIB, 64 * MIB));
    // Freeing 24 MiB leaves 24 MiB of cushion: 16 MiB go back through the slow upcall, claimed on
    // the root for 200 ms.
    let t = std::thread::spawn(move || drop(freed));
    while !l.in_unreserve.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    let grow = m.root().reservation("grow");
    grow.try_grow(10 * MIB).unwrap(); // 40 + 10 <= 64: must not be refused because of the claim
    t.join().unwrap();
    assert_eq!(m.used(), 50 * MIB);
    drop((keep, grow));
    m.close().unwrap();
    assert_eq!(l.inner.reserved(), 0);
}

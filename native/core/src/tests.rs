//! Scenario tests of the manager: one scenario per test, totals asserted after each step.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::*;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 8 * MIB;

fn manager_with(listener: Arc<dyn ReservationListener>, config: MemoryConfig) -> MemoryManager {
    MemoryManager::new("task-1", config, listener).unwrap()
}

fn unlimited() -> (MemoryManager, Arc<CapacityListener>) {
    capacity(u64::MAX)
}

fn capacity(bytes: u64) -> (MemoryManager, Arc<CapacityListener>) {
    let l = Arc::new(CapacityListener::new(bytes));
    (manager_with(l.clone(), MemoryConfig::default()), l)
}

/// A spiller holding a reservation; `spill` frees all of it.
struct HoldingSpiller {
    res: Reservation,
    calls: AtomicU64,
}

impl HoldingSpiller {
    fn new(pool: &Pool, name: &str, bytes: u64) -> Arc<HoldingSpiller> {
        let res = pool.reservation(name);
        res.try_grow(bytes).unwrap();
        Arc::new(HoldingSpiller {
            res,
            calls: AtomicU64::new(0),
        })
    }
}

impl Spiller for HoldingSpiller {
    fn spillable_bytes(&self) -> u64 {
        self.res.size()
    }
    fn spill(&self, _target: u64) -> Result<u64> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(self.res.free())
    }
}

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
fn growing_a_leaf_charges_every_ancestor_and_tracks_peaks() {
    let (m, _l) = unlimited();
    let a = m.pool("a").unwrap();
    let b = a.child("b", None).unwrap();
    assert_eq!(b.path(), "root/a/b");
    let r = b.reservation("op");
    r.try_grow(100).unwrap();
    assert_eq!((b.used(), a.used(), m.used()), (100, 100, 100));
    r.shrink(60).unwrap();
    assert_eq!((b.used(), a.used(), m.used()), (40, 40, 40));
    assert_eq!(
        (b.peak(), a.peak(), m.peak(), r.peak()),
        (100, 100, 100, 100)
    );
    drop(r);
    assert_eq!((b.used(), a.used(), m.used()), (0, 0, 0));
}

#[test]
fn pool_limit_refusal_rolls_back_every_level() {
    let (m, l) = unlimited();
    let a = m.root().child("a", Some(1000)).unwrap();
    let b = a.child("b", None).unwrap();
    let other = a.child("other", None).unwrap().reservation("other");
    other.try_grow(600).unwrap();
    let r = b.reservation("op");
    let err = r.try_grow(500).unwrap_err();
    assert!(err.is_out_of_memory());
    let text = err.to_string();
    assert!(
        text.contains("Failed to reserve 500 B for consumer 'op#")
            && text.contains("in pool 'root/a/b'")
            && text.contains("pool 'root/a' would exceed its limit of 1000 B (used 600 B)"),
        "{text}"
    );
    assert_eq!((r.size(), b.used(), a.used(), m.used()), (0, 0, 600, 600));
    assert_eq!(b.peak(), 0, "a refused charge is not a peak");
    assert_eq!(l.reserve_calls(), 1);
    r.try_grow(400).unwrap();
    assert_eq!(a.used(), 1000);
}

#[test]
fn task_limit_is_enforced_by_the_root() {
    let l = Arc::new(CapacityListener::unlimited());
    let m = manager_with(
        l.clone(),
        MemoryConfig::default().with_task_limit(Some(10 * MIB)),
    );
    let r = m.pool("op").unwrap().reservation("op");
    r.try_grow(10 * MIB).unwrap();
    let err = r.try_grow(1).unwrap_err();
    assert!(err
        .to_string()
        .contains("pool 'root' would exceed its limit of 10.0 MiB"));
    assert_eq!(m.used(), 10 * MIB);
    // The reservation never asks beyond the limit even though blocks are 8 MiB.
    assert_eq!(m.reserved(), 10 * MIB);
}

#[test]
fn over_release_is_an_error_and_changes_nothing() {
    let (m, _l) = unlimited();
    let r = m.root().reservation("op");
    r.try_grow(100).unwrap();
    let err = r.shrink(101).unwrap_err();
    assert!(matches!(err, MemoryError::InvalidArgument(_)));
    assert!(
        err.to_string()
            .contains("by 101 B (101 bytes): it holds 100 B"),
        "{err}"
    );
    assert_eq!((r.size(), m.used()), (100, 100));
    r.try_resize(30).unwrap();
    assert_eq!((r.size(), m.used()), (30, 30));
    r.try_resize(70).unwrap();
    assert_eq!((r.size(), m.used()), (70, 70));
    assert_eq!(r.free(), 70);
    assert_eq!(r.free(), 0);
    assert!(r.shrink(1).is_err());
    assert_eq!(m.used(), 0);
}

#[test]
fn huge_requests_are_rejected_without_side_effects() {
    let (m, l) = unlimited();
    let r = m.root().reservation("op");
    let err = r.try_grow(u64::MAX).unwrap_err();
    assert!(matches!(err, MemoryError::InvalidArgument(_)));
    assert_eq!((m.used(), m.reserved(), l.reserve_calls()), (0, 0, 0));
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
    let m = manager_with(l.clone(), MemoryConfig::default());
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
    let m = manager_with(l.clone(), MemoryConfig::default());
    let r = m.root().reservation("op");
    let err = r.try_grow(1).unwrap_err();
    assert!(matches!(err, MemoryError::ListenerContract(_)), "{err}");
    assert_eq!((r.size(), m.used()), (0, 0));
    assert_eq!(m.reserved(), l.0.load(Ordering::SeqCst));
    m.close().unwrap();
    assert_eq!((m.reserved(), l.0.load(Ordering::SeqCst)), (0, 0));
}

#[test]
fn allocations_are_charged_and_freed() {
    let (m, _l) = unlimited();
    let p = m.pool("buf").unwrap();
    let a = p.allocate(1000, 64).unwrap();
    assert_eq!(a.as_ptr() as usize % 64, 0);
    // SAFETY: `a` points to 1000 writable bytes just allocated.
    unsafe { a.as_ptr().write_bytes(7, 1000) };
    let b = p.allocate(24, 8).unwrap();
    assert_eq!(
        (p.used(), m.used(), m.stats().live_allocations),
        (1024, 1024, 2)
    );
    assert_eq!(p.free(a).unwrap(), 1000);
    assert_eq!((p.used(), m.stats().live_allocations), (24, 1));
    assert!(matches!(
        p.free(a).unwrap_err(),
        MemoryError::UnknownAllocation { .. }
    ));
    assert_eq!(m.root().free(b).unwrap(), 24);
    assert_eq!(m.used(), 0);
}

#[test]
fn bad_allocation_arguments_are_errors() {
    let (m, _l) = unlimited();
    let p = m.root();
    assert!(matches!(
        p.allocate(0, 8),
        Err(MemoryError::InvalidArgument(_))
    ));
    assert!(matches!(
        p.allocate(8, 3),
        Err(MemoryError::InvalidArgument(_))
    ));
    assert!(matches!(
        p.allocate(usize::MAX, 8),
        Err(MemoryError::InvalidArgument(_))
    ));
    let foreign = Box::new(5u64);
    let ptr = std::ptr::NonNull::from(&*foreign).cast::<u8>();
    assert!(matches!(
        p.free(ptr),
        Err(MemoryError::UnknownAllocation { .. })
    ));
    assert_eq!(m.used(), 0);
}

#[test]
fn allocation_beyond_a_pool_limit_is_out_of_memory() {
    let (m, _l) = unlimited();
    let p = m.root().child("small", Some(4096)).unwrap();
    let a = p.allocate(4000, 8).unwrap();
    let err = p.allocate(100, 8).unwrap_err();
    assert!(err.to_string().contains("consumer 'allocations'"), "{err}");
    p.free(a).unwrap();
}

#[test]
fn close_reclaims_leaks_and_hands_back_every_byte() {
    let (m, l) = unlimited();
    let p = m.pool("sort").unwrap();
    let _a1 = p.allocate(1000, 8).unwrap();
    let _a2 = p.allocate(500, 8).unwrap();
    let r = m.pool("join").unwrap().reservation("hash");
    r.try_grow(3 * BLOCK).unwrap();
    let report = m.close().unwrap();
    assert_eq!(report.total_bytes(), 1500 + 3 * BLOCK);
    let text = report.to_string();
    assert!(
        text.contains("2 allocation(s) in root/sort: 1.5 KiB"),
        "{text}"
    );
    assert!(text.contains("reservation hash#"), "{text}");
    assert!(text.contains("in root/join: 24.0 MiB"), "{text}");
    assert_eq!((m.used(), m.reserved(), l.reserved()), (0, 0, 0));
    assert_eq!(m.stats().live_allocations, 0);
    assert_eq!(r.size(), 0);
    // Idempotent; the reservation is detached and its drop changes nothing.
    assert!(m.close().unwrap().is_empty());
    drop(r);
    assert_eq!((m.used(), l.reserved()), (0, 0));
}

#[test]
fn closed_manager_refuses_grows() {
    let (m, _l) = unlimited();
    let r = m.root().reservation("op");
    m.close().unwrap();
    assert!(m.is_closed());
    assert!(matches!(r.try_grow(1), Err(MemoryError::Closed { .. })));
    assert!(matches!(
        m.root().allocate(8, 8),
        Err(MemoryError::Closed { .. })
    ));
    assert_eq!(m.used(), 0);
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
fn usage_report_shows_the_tree_and_top_consumers() {
    let l = Arc::new(CapacityListener::unlimited());
    let m = manager_with(l, MemoryConfig::default().with_task_limit(Some(1 << 30)));
    let sort = m.root().child("sort", Some(512 * MIB)).unwrap();
    let r = sort.reservation("sorter");
    r.try_grow(3 * MIB / 2).unwrap();
    let a = m.pool("scan").unwrap().allocate(4096, 8).unwrap();
    let text = m.usage_report().to_string();
    let expected = "\
Native memory of 'task-1': used 1.5 MiB, peak 1.5 MiB, reserved 8.0 MiB, task limit 1.0 GiB, block 8.0 MiB, spills 0 (0 B)
Pools:
  root                       used    1.5 MiB  peak    1.5 MiB  limit 1.0 GiB
    sort                     used    1.5 MiB  peak    1.5 MiB  limit 512.0 MiB
    scan                     used    4.0 KiB  peak    4.0 KiB  limit none
Top consumers:
  1. sorter#1 in root/sort: used 1.5 MiB, peak 1.5 MiB
  2. allocations in root/scan: used 4.0 KiB, peak 4.0 KiB";
    assert_eq!(text, expected);
    m.root().free(a).unwrap();
}

#[test]
fn bad_config_and_pool_names_are_rejected() {
    let l = Arc::new(CapacityListener::unlimited());
    assert!(matches!(
        MemoryManager::new(
            "t",
            MemoryConfig::default().with_reservation_block(0),
            l.clone()
        ),
        Err(MemoryError::InvalidArgument(_))
    ));
    let m = manager_with(l, MemoryConfig::default());
    for bad in ["", "a/b", "x\n"] {
        assert!(m.root().child(bad, None).is_err(), "{bad:?}");
    }
    assert!(m.pool("a//b").is_err());
    let a = m.root().child("a", Some(10)).unwrap();
    assert!(m.root().child("a", Some(20)).is_err());
    assert_eq!(m.pool("root/a").unwrap().limit(), a.limit());
    assert_eq!(m.pool("root").unwrap().path(), "root");
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

/// A grow refused by a pool limit even after spilling must not keep what the spill freed: beyond
/// the hysteresis band (two blocks) it goes back to the listener, as after a listener refusal.
#[test]
fn pool_limit_refusal_after_a_spill_hands_surplus_back() {
    let l = Arc::new(CapacityListener::unlimited());
    let m = manager_with(
        l.clone(),
        MemoryConfig::default().with_reservation_block(MIB),
    );
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

/// An interleaving the scheduler rarely produces, forced: grow A has charged the
/// root but not yet looked at `reserved` when grow B charges, finds no cushion and asks the
/// listener. B's grant must cover A's bytes too, or A takes the fast path on B's grant.
#[test]
fn a_grow_stopped_after_its_charge_is_covered_by_the_next_grant() {
    let block = 4;
    let l = Arc::new(CapacityListener::unlimited());
    let m = manager_with(
        l.clone(),
        MemoryConfig::default().with_reservation_block(block),
    );
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
    let m = manager_with(
        l.clone(),
        MemoryConfig::default().with_reservation_block(block),
    );
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
    let m = manager_with(
        l.clone(),
        MemoryConfig::default().with_reservation_block(MIB),
    );
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

#[test]
fn a_grow_refused_after_a_partial_grant_keeps_the_grant_as_cushion() {
    // Spark has 1.5 blocks for this task; the grow asks for 2.
    let l = Arc::new(CapacityListener::new(BLOCK + BLOCK / 2));
    let m = manager_with(l.clone(), MemoryConfig::default());
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

#[test]
fn a_dropped_manager_frees_its_whole_pool_tree() {
    let (m, l) = unlimited();
    let leaf = m.pool("a/b/c/d").unwrap();
    let side = m.pool("a/x").unwrap().child("y", Some(MIB)).unwrap();
    let r = leaf.reservation("r");
    r.try_grow(10).unwrap();
    let nodes: Vec<std::sync::Weak<crate::tree::PoolNode>> = {
        let mut all = Vec::new();
        m.root().node.walk(0, &mut all);
        all.iter().map(|(_, n)| Arc::downgrade(n)).collect()
    };
    assert_eq!(nodes.len(), 7, "root, a, b, c, d, x, y");
    // Closing does not free the tree: handles may still read it.
    m.close().unwrap();
    assert_eq!(leaf.path(), "root/a/b/c/d");
    assert!(nodes.iter().all(|n| n.upgrade().is_some()));
    drop((m, side, r));
    // The leaf handle still holds the budget, so the tree is whole.
    assert!(nodes.iter().all(|n| n.upgrade().is_some()));
    drop(leaf);
    let alive = nodes.iter().filter(|n| n.upgrade().is_some()).count();
    assert_eq!(alive, 0, "pool nodes outlived their manager");
    assert_eq!(l.reserved(), 0);
}

#[test]
fn a_pool_tree_thousands_deep_is_freed_without_recursion() {
    let (m, _l) = unlimited();
    let mut pool = m.root();
    for _ in 0..5000 {
        pool = pool.child("p", None).unwrap();
    }
    let leaf = Arc::downgrade(&pool.node);
    let root = Arc::downgrade(&m.root().node);
    // Run on a small stack: a recursive drop of 5000 levels would overflow it.
    std::thread::Builder::new()
        .stack_size(64 * 1024)
        .spawn(move || drop((m, pool)))
        .unwrap()
        .join()
        .unwrap();
    assert!(leaf.upgrade().is_none() && root.upgrade().is_none());
}

mod quantum;

mod model {
    //! Random operation sequences against a simple model: after every step the pool counters,
    //! peaks, reservation sizes and listener totals must match it.
    use super::*;
    use proptest::prelude::*;

    pub(super) const BLOCK: u64 = 1000;
    pub(super) const CAPACITY: u64 = 20_000;
    // Pools: 0 root (limit 15_000), 1 root/a (limit 6_000), 2 root/a/b, 3 root/c.
    pub(super) const PARENT: [Option<usize>; 4] = [None, Some(0), Some(1), Some(0)];
    pub(super) const LIMIT: [Option<u64>; 4] = [Some(15_000), Some(6_000), None, None];
    // Reservations live in pools 2, 2, 3, 1.
    pub(super) const RES_POOL: [usize; 4] = [2, 2, 3, 1];

    #[derive(Clone, Debug)]
    enum Op {
        Grow(usize, u64),
        Shrink(usize, u64),
        Alloc(usize, u64),
        Free(usize),
        Reclaim(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..4usize, 0..5_000u64).prop_map(|(r, b)| Op::Grow(r, b)),
            3 => (0..4usize, 0..5_000u64).prop_map(|(r, b)| Op::Shrink(r, b)),
            2 => (0..4usize, 1..3_000u64).prop_map(|(p, b)| Op::Alloc(p, b)),
            2 => (0..8usize).prop_map(Op::Free),
            1 => (0..4_000u64).prop_map(Op::Reclaim),
        ]
    }

    pub(super) fn lineage(p: usize) -> Vec<usize> {
        std::iter::successors(Some(p), |&q| PARENT[q]).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn manager_matches_model(ops in proptest::collection::vec(op(), 1..120)) {
            let l = Arc::new(CapacityListener::new(CAPACITY));
            let m = MemoryManager::new(
                "model",
                MemoryConfig::default().with_reservation_block(BLOCK).with_task_limit(Some(15_000)),
                l.clone(),
            ).unwrap();
            let a = m.root().child("a", LIMIT[1]).unwrap();
            let pools = [m.root(), a.clone(), a.child("b", None).unwrap(), m.root().child("c", None).unwrap()];
            let res: Vec<Reservation> = RES_POOL.iter().map(|&p| pools[p].reservation("r")).collect();
            let mut allocs: Vec<(std::ptr::NonNull<u8>, usize, u64)> = Vec::new();
            let mut used = [0u64; 4];
            let mut peak = [0u64; 4];
            let mut size = [0u64; 4];

            let fits = |used: &[u64; 4], p: usize, b: u64| {
                lineage(p).iter().all(|&q| LIMIT[q].is_none_or(|lim| used[q] + b <= lim))
                    && used[0] + b <= CAPACITY
            };
            for op in ops {
                match op {
                    Op::Grow(r, b) => {
                        let p = RES_POOL[r];
                        let expect_ok = fits(&used, p, b);
                        prop_assert_eq!(res[r].try_grow(b).is_ok(), expect_ok, "{:?}", op);
                        if expect_ok {
                            size[r] += b;
                            for q in lineage(p) { used[q] += b; peak[q] = peak[q].max(used[q]); }
                        }
                    }
                    Op::Shrink(r, b) => {
                        let ok = b <= size[r];
                        prop_assert_eq!(res[r].shrink(b).is_ok(), ok);
                        if ok {
                            size[r] -= b;
                            for q in lineage(RES_POOL[r]) { used[q] -= b; }
                        }
                    }
                    Op::Alloc(p, b) => {
                        let expect_ok = fits(&used, p, b);
                        let got = pools[p].allocate(b as usize, 8);
                        prop_assert_eq!(got.is_ok(), expect_ok);
                        if let Ok(ptr) = got {
                            allocs.push((ptr, p, b));
                            for q in lineage(p) { used[q] += b; peak[q] = peak[q].max(used[q]); }
                        }
                    }
                    Op::Free(i) => {
                        if i < allocs.len() {
                            let (ptr, p, b) = allocs.swap_remove(i);
                            prop_assert_eq!(m.root().free(ptr).unwrap() as u64, b);
                            prop_assert!(m.root().free(ptr).is_err());
                            for q in lineage(p) { used[q] -= b; }
                        }
                    }
                    Op::Reclaim(t) => {
                        let cushion = m.reserved() - m.used();
                        prop_assert_eq!(m.reclaim(t).unwrap(), t.min(cushion));
                    }
                }
                for q in 0..4 {
                    prop_assert_eq!(pools[q].used(), used[q], "used of pool {}", q);
                    prop_assert_eq!(pools[q].peak(), peak[q], "peak of pool {}", q);
                }
                for r in 0..4 {
                    prop_assert_eq!(res[r].size(), size[r]);
                }
                prop_assert_eq!(l.reserved(), m.reserved());
                prop_assert!(m.reserved() >= m.used());
                prop_assert!(m.reserved() - m.used() <= 2 * BLOCK, "cushion {}", m.reserved() - m.used());
            }
            let leaked: u64 = allocs.iter().map(|a| a.2).sum::<u64>() + size.iter().sum::<u64>();
            let report = m.close().unwrap();
            prop_assert_eq!(report.total_bytes(), leaked);
            prop_assert_eq!((m.used(), m.reserved(), l.reserved()), (0, 0, 0));
        }
    }
}

mod quantum_model {
    //! The same random operation sequences in quantum mode: grows and refusals must match the
    //! exact model (slack never refuses a grow exact accounting allows), sizes are exact, and
    //! each pool runs ahead of what its consumers hold by at most two quanta per reservation
    //! (each reservation's quantum for what it holds).
    use super::model::{lineage, BLOCK, CAPACITY, LIMIT, RES_POOL};
    use super::*;
    use proptest::prelude::*;

    // The exact model's tree, limits, listener and reservations.
    const QUANTUM: u64 = 700; // not a divisor of the block: rounding is exercised

    #[derive(Clone, Debug)]
    enum Op {
        /// The flag: through the exclusive (`&mut`) path.
        Grow(usize, u64, bool),
        Shrink(usize, u64, bool),
        Free(usize),
        Alloc(usize, u64),
        FreeAlloc(usize),
        Reclaim(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0..4usize, 0..5_000u64, any::<bool>()).prop_map(|(r, b, x)| Op::Grow(r, b, x)),
            4 => (0..4usize, 0..5_000u64, any::<bool>()).prop_map(|(r, b, x)| Op::Shrink(r, b, x)),
            1 => (0..4usize).prop_map(Op::Free),
            2 => (0..4usize, 1..3_000u64).prop_map(|(p, b)| Op::Alloc(p, b)),
            2 => (0..8usize).prop_map(Op::FreeAlloc),
            1 => (0..4_000u64).prop_map(Op::Reclaim),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn quantum_manager_stays_within_its_bounds(ops in proptest::collection::vec(op(), 1..120)) {
            let l = Arc::new(CapacityListener::new(CAPACITY));
            let m = MemoryManager::new(
                "quantum-model",
                MemoryConfig::default()
                    .with_reservation_block(BLOCK)
                    .with_reservation_quantum(QUANTUM)
                    .with_task_limit(Some(15_000)),
                l.clone(),
            ).unwrap();
            let a = m.root().child("a", LIMIT[1]).unwrap();
            let pools = [m.root(), a.clone(), a.child("b", None).unwrap(), m.root().child("c", None).unwrap()];
            let mut res: Vec<Reservation> = RES_POOL.iter().map(|&p| pools[p].reservation("r")).collect();
            let mut allocs: Vec<(std::ptr::NonNull<u8>, usize, u64)> = Vec::new();
            let mut used = [0u64; 4]; // exact: what consumers hold
            let mut size = [0u64; 4];
            let fits = |used: &[u64; 4], p: usize, b: u64| {
                lineage(p).iter().all(|&q| LIMIT[q].is_none_or(|lim| used[q] + b <= lim))
                    && used[0] + b <= CAPACITY
            };
            for op in ops {
                match op {
                    Op::Grow(r, b, exclusive) => {
                        let p = RES_POOL[r];
                        let expect_ok = fits(&used, p, b);
                        let got = if exclusive { res[r].try_grow_exclusive(b) } else { res[r].try_grow(b) };
                        prop_assert_eq!(got.is_ok(), expect_ok, "{:?}", op);
                        if expect_ok {
                            size[r] += b;
                            for q in lineage(p) { used[q] += b; }
                        }
                    }
                    Op::Shrink(r, b, exclusive) => {
                        let ok = b <= size[r];
                        let got = if exclusive { res[r].shrink_exclusive(b) } else { res[r].shrink(b) };
                        prop_assert_eq!(got.is_ok(), ok);
                        if ok {
                            size[r] -= b;
                            for q in lineage(RES_POOL[r]) { used[q] -= b; }
                        }
                    }
                    Op::Free(r) => {
                        prop_assert_eq!(res[r].free(), size[r]);
                        for q in lineage(RES_POOL[r]) { used[q] -= size[r]; }
                        size[r] = 0;
                    }
                    Op::Alloc(p, b) => {
                        let expect_ok = fits(&used, p, b);
                        let got = pools[p].allocate(b as usize, 8);
                        prop_assert_eq!(got.is_ok(), expect_ok, "{:?}", op);
                        if let Ok(ptr) = got {
                            allocs.push((ptr, p, b));
                            for q in lineage(p) { used[q] += b; }
                        }
                    }
                    Op::FreeAlloc(i) => {
                        if i < allocs.len() {
                            let (ptr, p, b) = allocs.swap_remove(i);
                            prop_assert_eq!(m.root().free(ptr).unwrap() as u64, b);
                            for q in lineage(p) { used[q] -= b; }
                        }
                    }
                    Op::Reclaim(t) => {
                        // Slack is unused: Spark gets it along with the cushion.
                        let unused = m.reserved() - used[0];
                        prop_assert_eq!(m.reclaim(t).unwrap(), t.min(unused));
                    }
                }
                for q in 0..4 {
                    let (got, exact) = (pools[q].used(), used[q]);
                    // Two quanta of each reservation charging this pool (its quantum grows
                    // with what it holds), and two of each pool's allocations at or below it.
                    let alloc_bytes = |p: usize| allocs.iter().filter(|a| a.1 == p).map(|a| a.2).sum::<u64>();
                    let bound: u64 = (0..4)
                        .filter(|&r| lineage(RES_POOL[r]).contains(&q))
                        .map(|r| 2 * crate::budget::quantum_for(QUANTUM, size[r]))
                        .sum::<u64>()
                        + (0..4)
                            .filter(|&p| lineage(p).contains(&q))
                            .map(|p| 2 * crate::budget::quantum_for(QUANTUM, alloc_bytes(p)))
                            .sum::<u64>();
                    prop_assert!(got >= exact, "pool {}: {} < {}", q, got, exact);
                    prop_assert!(got - exact <= bound, "pool {}: {} over {} (bound {})", q, got, exact, bound);
                    prop_assert!(LIMIT[q].is_none_or(|lim| got <= lim));
                    prop_assert!(pools[q].peak() >= got);
                }
                for r in 0..4 {
                    prop_assert_eq!(res[r].size(), size[r]);
                }
                prop_assert_eq!(l.reserved(), m.reserved());
                prop_assert!(m.reserved() >= m.used());
                prop_assert!(m.reserved() - m.used() <= 2 * BLOCK, "cushion {}", m.reserved() - m.used());
            }
            let leaked: u64 = allocs.iter().map(|a| a.2).sum::<u64>() + size.iter().sum::<u64>();
            let report = m.close().unwrap();
            prop_assert_eq!(report.total_bytes(), leaked);
            prop_assert_eq!((m.used(), m.reserved(), l.reserved()), (0, 0, 0));
        }
    }
}

#[test]
fn owned_allocations_free_on_drop_and_survive_close() {
    let (m, l) = unlimited();
    let p = m.pool("buf").unwrap();
    let mut a = p.allocate_owned(4096, 64).unwrap();
    assert_eq!(a.len(), 4096);
    assert_eq!(a.as_ptr().as_ptr() as usize % 64, 0);
    a.as_uninit_mut().fill(std::mem::MaybeUninit::new(1));
    assert_eq!((p.used(), m.stats().live_allocations), (4096, 1));
    // A raw free of an owned block is refused: the owner frees it.
    assert!(matches!(
        p.free(a.as_ptr()),
        Err(MemoryError::InvalidArgument(_))
    ));
    assert_eq!(p.used(), 4096);
    drop(a);
    assert_eq!((p.used(), m.stats().live_allocations), (0, 0));

    let mut held = p.allocate_owned(1000, 8).unwrap();
    let report = m.close().unwrap();
    assert!(
        report
            .to_string()
            .contains("1 allocation(s) in root/buf still held by their owner"),
        "{report}"
    );
    assert_eq!((m.used(), l.reserved()), (0, 0));
    // Still valid memory after close; freed on drop without touching the accounting again.
    held.as_uninit_mut().fill(std::mem::MaybeUninit::new(2));
    drop(held);
    assert_eq!((m.used(), l.reserved()), (0, 0));
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
    let m = manager_with(l.clone(), MemoryConfig::default());
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
        MemoryConfig::default().with_reservation_block(MIB),
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
    let m = manager_with(
        l.clone(),
        MemoryConfig::default().with_task_limit(Some(64 * MIB)),
    );
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

/// The module layers, lowest first (see "Modules, in layers" in the crate docs), checked by
/// `nativemem_testkit::layers::check`: a module may name, in code, only `crate::<m>` for a module
/// `m` listed before it.
const LAYERS: [(&str, &str); 14] = [
    ("units", include_str!("units.rs")),
    ("sync", include_str!("sync.rs")),
    ("barrier", include_str!("barrier.rs")),
    ("report", include_str!("report.rs")),
    ("error", include_str!("error.rs")),
    ("config", include_str!("config.rs")),
    ("listener", include_str!("listener.rs")),
    ("tree", include_str!("tree.rs")),
    ("alloc", include_str!("alloc.rs")),
    ("spill", include_str!("spill.rs")),
    ("budget", include_str!("budget.rs")),
    ("reservation", include_str!("reservation.rs")),
    ("pool", include_str!("pool.rs")),
    ("manager", include_str!("manager.rs")),
];

#[test]
fn force_grow_inside_the_cushion_is_not_overcommit() {
    let (m, l) = unlimited();
    let r = m.root().reservation("op");
    r.try_grow(1).unwrap();
    assert_eq!((m.reserved(), l.reserve_calls()), (BLOCK, 1));
    let t = m.root().reservation("tracked");
    assert_eq!(t.force_grow(MIB).unwrap(), 0);
    assert_eq!((m.used(), t.size(), l.reserve_calls()), (1 + MIB, MIB, 1));
    let s = m.stats();
    assert_eq!((s.overcommitted, s.overcommitted_total), (0, 0));
    assert_eq!(t.force_shrink(MIB), MIB);
    assert_eq!((m.used(), t.size(), m.reserved()), (1, 0, BLOCK));
}

#[test]
fn force_grow_never_calls_the_listener_and_counts_overcommit() {
    let (m, l) = capacity(4 * BLOCK);
    let t = m.root().reservation("tracked");
    assert_eq!(t.force_grow(3 * MIB).unwrap(), 3 * MIB);
    assert_eq!((m.used(), m.reserved(), l.reserve_calls()), (3 * MIB, 0, 0));
    let s = m.stats();
    assert_eq!(
        (s.overcommitted, s.overcommit_peak, s.overcommitted_total),
        (3 * MIB, 3 * MIB, 3 * MIB)
    );
    let text = m.usage_report().to_string();
    assert!(
        text.contains("Over-committed: 3.0 MiB now, 3.0 MiB so far"),
        "{text}"
    );
    // Nothing is handed back while over-committed (there is no cushion).
    assert_eq!(m.release_unused(u64::MAX).unwrap(), 0);
}

#[test]
fn the_next_grow_pays_the_overcommit() {
    let (m, l) = capacity(4 * BLOCK);
    let t = m.root().reservation("tracked");
    t.force_grow(BLOCK + MIB).unwrap();
    let r = m.root().reservation("op");
    r.try_grow(1).unwrap();
    // One upcall for the over-commit and the grow together, in whole blocks.
    assert_eq!((l.reserve_calls(), m.reserved()), (1, 2 * BLOCK));
    assert_eq!(m.used(), BLOCK + MIB + 1);
    let s = m.stats();
    assert_eq!((s.overcommitted, s.overcommit_peak), (0, BLOCK + MIB));
    assert_eq!(l.reserved(), m.reserved());
}

#[test]
fn overcommit_the_listener_cannot_cover_makes_the_next_grow_fail_and_changes_nothing() {
    let (m, l) = capacity(BLOCK);
    let t = m.root().reservation("tracked");
    t.force_grow(2 * BLOCK).unwrap();
    let r = m.root().reservation("op");
    let err = r.try_grow(MIB).unwrap_err();
    assert!(err.to_string().contains("Over-committed"), "{err}");
    assert_eq!((r.size(), m.used()), (0, 2 * BLOCK));
    // What Spark granted stays reserved: it covers part of the over-commit.
    assert_eq!((m.reserved(), l.reserved()), (BLOCK, BLOCK));
    assert_eq!(m.stats().overcommitted, BLOCK);
    // Releasing the tracked bytes leaves them in the cushion; a normal release hands back.
    assert_eq!(t.force_shrink(2 * BLOCK), 2 * BLOCK);
    assert_eq!((m.used(), m.stats().overcommitted), (0, 0));
    r.try_grow(MIB).unwrap();
    r.shrink(MIB).unwrap();
    m.close().unwrap();
    assert_eq!((m.reserved(), l.reserved()), (0, 0));
}

#[test]
fn force_grow_may_exceed_a_pool_limit_and_then_grows_there_spill_or_fail() {
    let (m, _l) = unlimited();
    let p = m.root().child("p", Some(MIB)).unwrap();
    let t = p.reservation("tracked");
    t.force_grow(2 * MIB).unwrap();
    assert_eq!((p.used(), p.peak()), (2 * MIB, 2 * MIB));
    let r = p.reservation("op");
    assert!(r.try_grow(1).unwrap_err().is_out_of_memory());
    assert_eq!(t.force_shrink(MIB + 1), MIB + 1);
    r.try_grow(1).unwrap();
    assert_eq!(p.used(), MIB);
}

#[test]
fn force_shrink_saturates_and_is_zero_after_close() {
    let (m, l) = unlimited();
    let t = m.root().reservation("tracked");
    t.force_grow(100).unwrap();
    assert_eq!(t.force_shrink(150), 100);
    assert_eq!((t.size(), m.used()), (0, 0));
    t.force_grow(100).unwrap();
    let leaks = m.close().unwrap();
    assert_eq!(leaks.total_bytes(), 100);
    assert_eq!(t.force_shrink(100), 0);
    assert!(matches!(t.force_grow(1), Err(MemoryError::Closed { .. })));
    assert_eq!((m.used(), m.reserved(), l.reserved()), (0, 0, 0));
    assert!(t.force_grow(MAX_REQUEST_BYTES + 1).is_err());
}

#[test]
fn concurrent_forced_and_fallible_grows_keep_counters_exact() {
    let (m, l) = capacity(64 * BLOCK);
    let threads = 4;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let m = m.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let r = m.root().reservation(format!("t{i}"));
                barrier.wait();
                for n in 0..2000u64 {
                    let bytes = 4096 + (n % 7) * 1000;
                    if (n + i as u64) % 2 == 0 {
                        r.force_grow(bytes).unwrap();
                    } else {
                        r.try_grow(bytes).unwrap();
                    }
                    if n % 3 == 0 {
                        assert_eq!(r.force_shrink(bytes), bytes);
                    }
                }
                r.free();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(m.used(), 0);
    assert_eq!(m.stats().overcommitted, 0);
    m.close().unwrap();
    assert_eq!((m.reserved(), l.reserved()), (0, 0));
}

#[test]
fn module_imports_point_one_way() {
    let violations = nativemem_testkit::layers::check(include_str!("lib.rs"), &LAYERS);
    assert!(
        violations.is_empty(),
        "imports must point one way:\n{}",
        violations.join("\n")
    );
}

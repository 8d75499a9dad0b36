//! Forced grows: never refused and never calling out; what the cushion does not cover is
//! over-commit, paid by the next fallible grow.

use super::*;

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
fn cover_overcommit_reserves_it_from_the_listener_whatever_the_task_limit() {
    let l = Arc::new(CapacityListener::new(16 * BLOCK));
    let config = MemoryConfig::default()
        .with_reservation_block(BLOCK)
        .with_task_limit(Some(2 * BLOCK));
    let m = MemoryManager::new("t", config, l.clone()).unwrap();
    let r = m.root().reservation("op");
    r.try_grow(2 * BLOCK).unwrap();
    // Over the task limit: a fallible grow is refused there and never reaches the listener.
    assert!(r.try_grow(1).is_err());
    assert_eq!(r.force_grow(BLOCK + MIB).unwrap(), BLOCK + MIB);
    assert_eq!(
        (l.reserved(), m.stats().overcommitted),
        (2 * BLOCK, BLOCK + MIB)
    );
    assert_eq!(m.cover_overcommit().unwrap(), BLOCK + MIB);
    // Spark's side now shows what is used; nothing is over-committed.
    assert_eq!(
        (l.reserved(), m.reserved()),
        (3 * BLOCK + MIB, 3 * BLOCK + MIB)
    );
    let s = m.stats();
    assert_eq!((s.overcommitted, s.overcommit_peak), (0, BLOCK + MIB));
    assert_eq!(m.cover_overcommit().unwrap(), 0);
    // Released, it goes back to the listener (hysteresis keeps at most two blocks).
    r.shrink(3 * BLOCK + MIB).unwrap();
    assert!(l.reserved() <= 2 * BLOCK, "{}", l.reserved());
    m.close().unwrap();
    assert_eq!(l.reserved(), 0);
}

#[test]
fn cover_overcommit_keeps_what_the_listener_refuses_as_overcommit() {
    let (m, l) = capacity(BLOCK);
    let t = m.root().reservation("tracked");
    t.force_grow(2 * BLOCK).unwrap();
    assert_eq!(m.cover_overcommit().unwrap(), BLOCK);
    assert_eq!((l.reserved(), m.stats().overcommitted), (BLOCK, BLOCK));
}

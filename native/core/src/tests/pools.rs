//! The pool tree: every level charged, limits refused all or nothing, bad requests and
//! configurations rejected, the usage report.

use super::*;

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
    let m = manager_with(l.clone(), exact().with_task_limit(Some(10 * MIB)));
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
fn usage_report_shows_the_tree_and_top_consumers() {
    let l = Arc::new(CapacityListener::unlimited());
    let m = manager_with(l, exact().with_task_limit(Some(1 << 30)));
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
        MemoryManager::new("t", exact().with_reservation_block(0), l.clone()),
        Err(MemoryError::InvalidArgument(_))
    ));
    let m = manager_with(l, exact());
    for bad in ["", "a/b", "x\n"] {
        assert!(m.root().child(bad, None).is_err(), "{bad:?}");
    }
    assert!(m.pool("a//b").is_err());
    let a = m.root().child("a", Some(10)).unwrap();
    assert!(m.root().child("a", Some(20)).is_err());
    assert_eq!(m.pool("root/a").unwrap().limit(), a.limit());
    assert_eq!(m.pool("root").unwrap().path(), "root");
}

/// Stops the calling thread at the test point `point` (once) until the test lets it go; returns
/// the channels: "it is there" and "go on".
fn stop_at(
    point: &'static str,
) -> (
    impl Drop,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Sender<()>,
) {
    let (at_tx, at_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let mut stopped = false;
    let hook = crate::sync::test_points::set(move |name| {
        if name == point && !stopped {
            stopped = true;
            at_tx.send(()).unwrap();
            go_rx.recv().unwrap();
        }
    });
    (hook, at_rx, go_tx)
}

/// Forced: grow A has charged the pools and waits for the listener, which then refuses it;
/// meanwhile grow B of the same pool succeeds. A's bytes were never held: no pool's peak shows
/// them (a peak read from `used` when B completed would).
#[test]
fn a_grow_the_listener_refuses_never_shows_in_a_peak() {
    let l = Arc::new(CapacityListener::new(8));
    let m = manager_with(l.clone(), exact().with_reservation_block(4));
    let df = m.pool("df").unwrap();
    let r1 = df.reservation("r1");
    r1.try_grow(4).unwrap(); // reserved 4, no cushion left
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let a = df.reservation("a");
    let grow_a = std::thread::spawn(move || {
        let (hook, at, go) = stop_at("grow:charged");
        ready_tx.send((at, go)).unwrap();
        let result = a.try_grow(6); // charged: pools at 10, then the listener has 4 left
        drop(hook);
        (a, result)
    });
    let (at, go) = ready_rx.recv().unwrap();
    at.recv().unwrap();
    assert_eq!((df.used(), m.used()), (10, 10), "A is charged, in flight");
    let b = df.reservation("b");
    b.try_grow(1).unwrap(); // the listener grants a block: covers B, not A
    go.send(()).unwrap();
    let (a, result) = grow_a.join().unwrap();
    assert!(result.unwrap_err().is_out_of_memory());
    assert_eq!((a.size(), df.used(), m.used()), (0, 5, 5));
    assert_eq!(
        (df.peak(), m.peak()),
        (5, 5),
        "the refused grow is not a peak"
    );
    assert_eq!(l.reserved(), 8);
    drop((r1, a, b));
    m.close().unwrap();
    assert_eq!(l.reserved(), 0);
}

/// Forced: grow A has charged its pool and not yet the root, whose limit will refuse it;
/// meanwhile grow B of the same pool succeeds. The pool's peak never shows A's bytes, so it
/// never exceeds the root's.
#[test]
fn a_grow_a_parent_limit_refuses_never_shows_in_a_child_peak() {
    let l = Arc::new(CapacityListener::unlimited());
    let m = manager_with(l.clone(), exact().with_task_limit(Some(4)));
    let other = m.pool("other").unwrap().reservation("other");
    other.try_grow(3).unwrap();
    let df = m.pool("df").unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let a = df.reservation("a");
    let grow_a = std::thread::spawn(move || {
        let (hook, at, go) = stop_at("charge:level");
        ready_tx.send((at, go)).unwrap();
        let result = a.try_grow(4); // df charged, then the root (3 + 4 > 4) refuses
        drop(hook);
        (a, result)
    });
    let (at, go) = ready_rx.recv().unwrap();
    at.recv().unwrap();
    assert_eq!((df.used(), m.used()), (4, 3), "A has charged df only");
    let b = df.reservation("b");
    b.try_grow(1).unwrap();
    go.send(()).unwrap();
    let (a, result) = grow_a.join().unwrap();
    assert!(result.unwrap_err().is_out_of_memory());
    assert_eq!((a.size(), df.used(), m.used()), (0, 1, 4));
    assert_eq!((df.peak(), m.peak()), (1, 4));
    assert!(df.peak() <= m.peak());
    drop((other, a, b));
    m.close().unwrap();
    assert_eq!(l.reserved(), 0);
}

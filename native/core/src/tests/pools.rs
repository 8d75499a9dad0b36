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

//! Close and drop: leaks freed and reported, every byte handed back, the pool tree freed.

use super::*;

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

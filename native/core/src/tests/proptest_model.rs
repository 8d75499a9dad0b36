//! Random operation sequences against models, exact mode and quantum mode. The recorded
//! regressions are in `proptest-regressions/tests/proptest_model.txt` (named after this file).

use super::*;

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
                // The exact model: quantum 0, opt-in (the default is the 1 MiB quantum).
                MemoryConfig::default()
                    .with_reservation_quantum(0)
                    .with_reservation_block(BLOCK)
                    .with_task_limit(Some(15_000)),
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

//! The pool's own contract, one scenario per test, against the core backend: registration,
//! exact totals after every step, over-commit, fairness, limits.

use std::sync::Arc;

use datafusion_common::DataFusionError;
use datafusion_execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use nativemem_core::{CapacityListener, MemoryConfig, MemoryManager};
use nativemem_datafusion::{NativememPool, Policy};

const MIB: usize = 1 << 20;

/// Exact accounting (reservation quantum 0, opt-in: the default is the 1 MiB quantum). These
/// tests pin the manager's and pools' used to DataFusion's reservations after every step, which
/// is the pool's contract under test; the DataFusion queries (`queries.rs`) run on the default.
fn exact() -> MemoryConfig {
    MemoryConfig::default().with_reservation_quantum(0)
}

fn setup(limit: Option<u64>) -> (MemoryManager, Arc<CapacityListener>, Arc<dyn MemoryPool>) {
    let l = Arc::new(CapacityListener::unlimited());
    let config = exact()
        .with_reservation_block(MIB as u64)
        .with_task_limit(limit);
    let m = MemoryManager::new("task", config, l.clone()).unwrap();
    let pool: Arc<dyn MemoryPool> = Arc::new(NativememPool::new(m.pool("datafusion").unwrap()));
    (m, l, pool)
}

/// A spillable consumer (a sort) registered on `pool`.
fn spillable(name: &str, pool: &Arc<dyn MemoryPool>) -> MemoryReservation {
    MemoryConsumer::new(name)
        .with_can_spill(true)
        .register(pool)
}

/// Every byte is back: the manager holds nothing, closes without a leak, and Spark's reservation
/// (the listener's) is empty.
fn all_back(m: MemoryManager, l: &CapacityListener) {
    assert_eq!(m.used(), 0);
    assert!(m.close().unwrap().is_empty());
    assert_eq!(l.reserved(), 0);
}

#[test]
fn consumers_are_charged_by_name_and_give_everything_back() {
    let (m, l, pool) = setup(None);
    let sort = spillable("ExternalSorter[0]", &pool);
    sort.try_grow(3 * MIB).unwrap();
    assert_eq!((pool.reserved(), m.used() as usize), (3 * MIB, 3 * MIB));
    let report = m.usage_report().to_string();
    assert!(report.contains("ExternalSorter[0]"), "{report}");
    // A split reservation belongs to the same consumer.
    let half = sort.split(MIB);
    assert_eq!((sort.size(), half.size()), (2 * MIB, MIB));
    assert_eq!(m.used() as usize, 3 * MIB);
    drop(half);
    assert_eq!((pool.reserved(), m.used() as usize), (2 * MIB, 2 * MIB));
    sort.shrink(MIB);
    assert_eq!((pool.reserved(), m.used() as usize), (MIB, MIB));
    drop(sort);
    assert_eq!((pool.reserved(), m.used()), (0, 0));
    assert!(matches!(pool.memory_limit(), MemoryLimit::Unknown));
    assert!(m.close().unwrap().is_empty());
    assert_eq!(l.reserved(), 0);
}

#[test]
fn each_operators_peak_is_kept_after_it_unregisters() {
    let l = Arc::new(CapacityListener::unlimited());
    let m = MemoryManager::new(
        "task",
        exact().with_task_limit(Some(8 * MIB as u64)),
        l.clone(),
    )
    .unwrap();
    let native = Arc::new(NativememPool::new(m.pool("datafusion").unwrap()));
    let pool: Arc<dyn MemoryPool> = native.clone();
    let sort = spillable("ExternalSorter[0]", &pool);
    let agg = MemoryConsumer::new("GroupedHashAggregateStream[0]").register(&pool);
    sort.try_grow(3 * MIB).unwrap();
    let half = sort.split(MIB); // one consumer: its reservations' sum counts
    sort.try_grow(2 * MIB).unwrap(); // 5 MiB held by the sort at once
    drop(half);
    agg.try_grow(MIB).unwrap();
    assert!(agg.try_grow(8 * MIB).is_err(), "over the limit");
    assert_eq!(
        native.consumer_peaks(),
        vec![
            ("ExternalSorter[0]".to_string(), 5 * MIB as u64),
            ("GroupedHashAggregateStream[0]".to_string(), MIB as u64),
        ],
        "a refused grow is not a peak"
    );
    drop(sort); // unregistered: its peak stays
    drop(agg);
    let again = MemoryConsumer::new("GroupedHashAggregateStream[0]").register(&pool);
    again.try_grow(2 * MIB).unwrap();
    assert_eq!(
        native.consumer_peaks(),
        vec![
            ("ExternalSorter[0]".to_string(), 5 * MIB as u64),
            ("GroupedHashAggregateStream[0]".to_string(), 2 * MIB as u64),
        ]
    );
    drop(again);
    assert!(m.close().unwrap().is_empty());
    assert_eq!(l.reserved(), 0);
}

#[test]
fn limit_refuses_with_resources_exhausted_and_nativemem_report() {
    let (m, _l, pool) = setup(Some(4 * MIB as u64));
    assert!(matches!(pool.memory_limit(), MemoryLimit::Finite(l) if l == 4 * MIB));
    let r = MemoryConsumer::new("HashJoinInput").register(&pool);
    r.try_grow(3 * MIB).unwrap();
    let err = r.try_grow(2 * MIB).unwrap_err();
    let DataFusionError::ResourcesExhausted(text) = &err else {
        panic!("{err:?}")
    };
    assert!(text.contains("HashJoinInput"), "{text}");
    assert!(text.contains("Native memory of 'task'"), "{text}");
    // Nothing changed.
    assert_eq!(
        (r.size(), pool.reserved(), m.used() as usize),
        (3 * MIB, 3 * MIB, 3 * MIB)
    );
    drop(r);
    assert!(m.close().unwrap().is_empty());
}

/// Issue 26: what DataFusion takes through its infallible `grow` beyond what nativemem grants is
/// charged to nativemem at once (the task's usage, its report, what Spark is asked for next), and
/// while it keeps the task over its limit, the next `try_grow` of **any** consumer is refused.
#[test]
fn infallible_grow_over_the_limit_is_charged_at_once_and_refuses_every_consumer() {
    let (m, _l, pool) = setup(Some(4 * MIB as u64));
    let native = NativememPool::new(m.pool("datafusion").unwrap());
    let native = Arc::new(native);
    let dyn_pool: Arc<dyn MemoryPool> = native.clone();
    let join = MemoryConsumer::new("SortMergeJoinStream[0]").register(&dyn_pool);
    let sort = spillable("ExternalSorter[0]", &dyn_pool);
    join.grow(3 * MIB);
    join.grow(2 * MIB); // nativemem refuses: over-commit, charged all the same
    assert_eq!(join.size(), 5 * MIB);
    assert_eq!((native.reserved(), m.used() as usize), (5 * MIB, 5 * MIB));
    assert_eq!(
        (
            native.overcommit(),
            native.overcommit_peak(),
            native.uncharged()
        ),
        (2 * MIB as u64, 2 * MIB as u64, 0)
    );
    // The task's stats show it, and Spark's side reserved it at once although the task has a
    // limit (`cover_overcommit`): nothing is left uncovered.
    let stats = m.stats();
    assert_eq!(
        (
            stats.overcommitted_total,
            stats.overcommit_peak,
            stats.overcommitted
        ),
        (2 * MIB as u64, 2 * MIB as u64, 0),
        "{stats:?}"
    );
    assert_eq!(m.reserved() as usize, 5 * MIB);
    assert!(
        m.usage_report().to_string().contains("2.0 MiB so far"),
        "{}",
        m.usage_report()
    );
    assert!(
        native.report().contains("2.0 MiB over-committed"),
        "{}",
        native.report()
    );
    // Any consumer's next fallible grow is refused while the task is over its limit.
    assert!(sort.try_grow(1024).is_err());
    assert!(join.try_grow(1024).is_err());
    // Shrinks give the over-commit back first.
    join.shrink(2 * MIB);
    assert_eq!(native.overcommit(), 0);
    assert_eq!((native.reserved(), m.used() as usize), (3 * MIB, 3 * MIB));
    sort.try_grow(MIB).unwrap();
    assert_eq!((native.reserved(), m.used() as usize), (4 * MIB, 4 * MIB));
    drop((join, sort));
    assert_eq!((native.reserved(), m.used()), (0, 0));
    assert_eq!(native.overcommit_peak(), 2 * MIB as u64);
    drop(pool);
    drop(dyn_pool);
    drop(native);
    assert!(m.close().unwrap().is_empty());
}

#[test]
fn unspillable_memory_shrinks_the_spillable_share_but_never_below_what_is_left() {
    let (m, _l, pool) = setup(Some(8 * MIB as u64));
    let sort = spillable("ExternalSorter[0]", &pool);
    let merge = MemoryConsumer::new("ExternalSorterMerge[0]").register(&pool);
    // Unspillable memory is bounded by nativemem's limit only.
    merge.try_grow(6 * MIB).unwrap();
    // The spillable consumer gets all that is left: (8 - 6) / 1, FairSpillPool's share too
    // (kept while a consumer that cannot spill is registered).
    sort.try_grow(2 * MIB).unwrap();
    let err = sort.try_grow(1).unwrap_err();
    assert!(
        err.to_string()
            .contains("over FairSpillPool's share 2.0 MiB"),
        "{err}"
    );
    drop((sort, merge));
    assert_eq!(m.used(), 0);
    assert!(m.close().unwrap().is_empty());
}

#[test]
fn shares_count_consumers_not_reservations_and_idle_consumers_do_not_count() {
    let (m, _l, pool) = setup(Some(8 * MIB as u64));
    let a = spillable("ExternalSorter[0]", &pool);
    let b = spillable("ExternalSorter[1]", &pool);
    let _idle = spillable("ExternalSorter[2]", &pool);
    b.try_grow(2 * MIB).unwrap(); // two active spillable consumers: 4 MiB each (the idle one: 0)
    a.try_grow(3 * MIB).unwrap();
    // A's second reservation counts against A's share: 3 + 1 fits, 3 + 1 + 2 does not: the
    // reservation alone (3 MiB) is over FairSpillPool's share (8 MiB / 3 registered spillable
    // consumers) and A, holding memory through two reservations, may not leave less than that
    // share free.
    let a2 = a.new_empty();
    a2.try_grow(MIB).unwrap();
    let err = a2.try_grow(2 * MIB).unwrap_err();
    assert!(err.to_string().contains("ExternalSorter[0]"), "{err}");
    assert!(
        err.to_string()
            .contains("(spillable, merging, holding 4.0 MiB)"),
        "{err}"
    );
    assert_eq!(
        (a.size() + a2.size(), m.used() as usize),
        (4 * MIB, 6 * MIB)
    );
    // A's second reservation gives its memory back (after a refusal: A spilled, and counts as
    // merging from now on). With B active, A may not grow to 5 MiB...
    a2.free();
    let err = a.try_grow(2 * MIB).unwrap_err();
    assert!(err.to_string().contains("ExternalSorter[0]"), "{err}");
    // ... and B going idle makes A the only active one: its share is the whole limit.
    b.free();
    a.try_grow(2 * MIB).unwrap();
    assert_eq!(m.used() as usize, 5 * MIB);
    drop((a, a2, b));
    assert_eq!((pool.reserved(), m.used()), (0, 0));
    assert!(m.close().unwrap().is_empty());
}

/// Issue 26: a hash aggregation merging its spill files (DataFusion's `ReportError` phase) grows
/// its own reservation while a second one (`new_empty`, the merge's) holds most of what it has.
/// It is still marked spillable but a refusal cannot make it spill: it fails the query. Its
/// reservation is within FairSpillPool's share, and the task limit has room: granted.
#[test]
fn a_merging_aggregation_within_fair_spill_pools_share_is_not_refused_for_fairness() {
    let (m, _l, pool) = setup(Some(24 * MIB as u64));
    let consumers: Vec<_> = (0..4)
        .map(|i| {
            MemoryConsumer::new(format!("GroupedHashAggregateStream[{i}]"))
                .with_can_spill(true)
                .register(&pool)
        })
        .collect();
    let agg = &consumers[0];
    // Its merge took 11 MiB while the others held nothing (work-conserving), then its own
    // reservation 1 MiB.
    let merge = agg.new_empty();
    merge.try_grow(11 * MIB).unwrap();
    agg.try_grow(MIB).unwrap();
    // The other three grow under their shares: 23.4 MiB reserved, four active, shares 6 MiB.
    consumers[1].try_grow(5 * MIB).unwrap();
    consumers[2].try_grow(5 * MIB).unwrap();
    consumers[3].try_grow(7 * MIB / 5).unwrap();
    assert_eq!(pool.reserved(), 23 * MIB + 2 * MIB / 5);
    // It would hold 12.2 MiB, over its fair share 6.0 MiB, and leave less than the others are
    // owed free; but its reservation (1.2 MiB) is within FairSpillPool's 24 / 4 = 6 MiB and the
    // limit has room.
    agg.try_grow(MIB / 5).unwrap();
    assert_eq!(agg.size(), MIB + MIB / 5);
    assert_eq!(
        (pool.reserved(), m.used() as usize),
        (23 * MIB + 3 * MIB / 5, 23 * MIB + 3 * MIB / 5)
    );
    // The task limit still bounds it: refused by nativemem, not by fairness (the others gone, it
    // has no one to wait for).
    for c in &consumers[1..] {
        c.free();
    }
    let err = agg.try_grow(13 * MIB).unwrap_err();
    assert!(!err.to_string().contains("fair share"), "{err}");
    assert!(err.to_string().contains("Native memory of 'task'"), "{err}");
    drop((merge, consumers));
    assert_eq!((pool.reserved(), m.used()), (0, 0));
    assert!(m.close().unwrap().is_empty());
}

/// A consumer refused for fairness that grows again without having released anything did not
/// spill (it cannot): fairness does not refuse it again, the free room is its, until it
/// releases memory.
#[test]
fn a_consumer_that_could_not_spill_after_a_fairness_refusal_gets_the_free_room() {
    let (m, _l, pool) = setup(Some(8 * MIB as u64));
    let a = spillable("ExternalSorter[0]", &pool);
    let b = spillable("ExternalSorter[1]", &pool);
    b.try_grow(2 * MIB).unwrap();
    a.try_grow(4 * MIB).unwrap();
    // Over its share (4 MiB), leaving B less than it is owed: refused, so that it spills.
    let err = a.try_grow(MIB).unwrap_err();
    assert!(
        err.to_string().contains("over its fair share 4.0 MiB"),
        "{err}"
    );
    // It retries without having released anything: granted from the free room.
    a.try_grow(MIB).unwrap();
    a.try_grow(MIB).unwrap();
    assert_eq!((pool.reserved(), m.used() as usize), (8 * MIB, 8 * MIB));
    // Once it releases memory (it spilled), fairness applies again.
    a.shrink(3 * MIB);
    a.try_grow(MIB).unwrap(); // 4 MiB: its share
    let err = a.try_grow(MIB).unwrap_err();
    assert!(err.to_string().contains("share 4.0 MiB"), "{err}");
    drop((a, b));
    assert_eq!((pool.reserved(), m.used()), (0, 0));
    assert!(m.close().unwrap().is_empty());
}

/// Issue 26, the other half of a merging aggregation: after spilling, DataFusion's aggregation
/// merges its spill files (one `new_empty` reservation) and replays them into a table (another),
/// whose refusal is fatal. Alone in the pool, the merge would seat spill files until the limit;
/// it may not take the last FairSpillPool share, which the replay then finds.
#[test]
fn a_merge_of_a_consumer_that_spilled_leaves_fair_spill_pools_share_free() {
    let (m, _l, pool) = setup(Some(16 * MIB as u64));
    let consumers: Vec<_> = (0..4)
        .map(|i| {
            MemoryConsumer::new(format!("SingleHashAggregateStream[{i}]"))
                .with_can_spill(true)
                .register(&pool)
        })
        .collect();
    let agg = &consumers[0];
    // Alone, it takes 10 MiB; a grow past the limit is refused, and it spills everything.
    agg.try_grow(10 * MIB).unwrap();
    assert!(agg.try_grow(7 * MIB).is_err());
    agg.free();
    // The merge seats spill files, 1 MiB each, while it may: up to 16 - 16 / 4 MiB.
    let merge = agg.new_empty();
    let replay = agg.new_empty();
    while merge.try_grow(MIB).is_ok() {}
    assert_eq!(merge.size(), 12 * MIB);
    // The replay table grows within FairSpillPool's share: there is room for it.
    replay.try_grow(7 * MIB / 2).unwrap();
    assert_eq!(
        (pool.reserved(), m.used() as usize),
        (15 * MIB + MIB / 2, 15 * MIB + MIB / 2)
    );
    drop((merge, replay, consumers));
    assert_eq!((pool.reserved(), m.used()), (0, 0));
    assert!(m.close().unwrap().is_empty());
}

#[test]
fn greedy_policy_refuses_only_on_nativemem_limits() {
    let (m, _l, _) = setup(Some(8 * MIB as u64));
    let pool: Arc<dyn MemoryPool> = Arc::new(NativememPool::with_policy(
        m.pool("greedy").unwrap(),
        Policy::Greedy,
    ));
    let a = spillable("ExternalSorter[0]", &pool);
    let b = spillable("ExternalSorter[1]", &pool);
    b.try_grow(2 * MIB).unwrap();
    // Fair share would stop A at 4 MiB; first come, first served lets it take all that is left.
    a.try_grow(6 * MIB).unwrap();
    let err = b.try_grow(1).unwrap_err();
    assert!(!err.to_string().contains("fair share"), "{err}");
    assert!(err.to_string().contains("ExternalSorter[1]"), "{err}");
    assert_eq!(m.used() as usize, 8 * MIB);
    drop((a, b));
    drop(pool);
    assert_eq!(m.used(), 0);
    assert!(m.close().unwrap().is_empty());
}

#[test]
fn spill_requests_make_the_largest_spillable_consumers_spill_at_their_next_grow() {
    let l = Arc::new(CapacityListener::unlimited());
    let config = exact().with_reservation_block(MIB as u64);
    let m = MemoryManager::new("task", config, l.clone()).unwrap();
    let native = Arc::new(NativememPool::new(m.pool("datafusion").unwrap()));
    native.answer_spill_requests().unwrap();
    native.answer_spill_requests().unwrap(); // idempotent: one spiller
    assert_eq!(m.spiller_count(), 1);
    let pool: Arc<dyn MemoryPool> = native.clone();
    let big = spillable("ExternalSorter[0]", &pool);
    let small = spillable("ExternalSorter[1]", &pool);
    let merge = MemoryConsumer::new("ExternalSorterMerge[0]").register(&pool);
    big.try_grow(6 * MIB).unwrap();
    small.try_grow(2 * MIB).unwrap();
    merge.try_grow(MIB).unwrap();
    // Spark asks the task for 4 MiB: nativemem hands back its cushion (under a block), then asks
    // the pool for the rest, which picks the largest spillable consumer (6 MiB covers it) and
    // frees nothing synchronously.
    let given = m.reclaim(4 * MIB as u64).unwrap();
    assert!(given < MIB as u64, "{given}");
    let s = native.spill_requests();
    assert_eq!(
        (s.requests, s.requested_bytes, s.yields),
        (1, 4 * MIB as u64 - given, 0)
    );
    // The unspillable and the small one grow as usual; the big one is refused once.
    merge.try_grow(1024).unwrap();
    small.try_grow(1024).unwrap();
    let err = big.try_grow(1024).unwrap_err();
    assert!(
        matches!(err.find_root(), DataFusionError::ResourcesExhausted(_)),
        "{err}"
    );
    assert!(err.to_string().contains("asked for memory back"), "{err}");
    assert!(err.to_string().contains("ExternalSorter[0]"), "{err}");
    let s = native.spill_requests();
    assert_eq!((s.yields, s.yielded_bytes), (1, 6 * MIB as u64));
    // It spills (frees what it holds): the bytes go back to the listener beyond the hysteresis
    // (two blocks kept at most), and its retry goes through.
    let reserved_before = m.reserved();
    big.free();
    assert!(
        m.reserved() <= reserved_before - 4 * MIB as u64,
        "{}",
        m.reserved()
    );
    big.try_grow(1024).unwrap();
    drop((big, small, merge));
    drop(pool);
    drop(native); // unregisters the spiller
    assert_eq!(m.spiller_count(), 0);
    assert_eq!(m.used(), 0);
    assert!(m.close().unwrap().is_empty());
}

#[test]
fn an_unspillable_grow_finding_no_room_waits_for_the_asked_consumers_to_spill() {
    // The task's budget is 8 MiB: a sort holds 6, its merge 1; the merge needs 3 more. Its grow
    // finds no room, asks the pool for memory back (the sort is picked), and waits for the sort
    // to spill instead of failing the query.
    let l = Arc::new(CapacityListener::new(8 * MIB as u64));
    let config = exact().with_reservation_block(MIB as u64);
    let m = MemoryManager::new("task", config, l.clone()).unwrap();
    let native = Arc::new(NativememPool::with_policy(
        m.pool("datafusion").unwrap(),
        Policy::Greedy,
    ));
    native.answer_spill_requests().unwrap();
    let pool: Arc<dyn MemoryPool> = native.clone();
    let sort = spillable("ExternalSorter[0]", &pool);
    let merge = MemoryConsumer::new("ExternalSorterMerge[0]").register(&pool);
    sort.try_grow(6 * MIB).unwrap();
    merge.try_grow(MIB).unwrap();
    let sorter = std::thread::spawn(move || {
        // The sort keeps growing a little until it is refused (asked to give memory back), then
        // spills: frees what it holds, and its retry goes through.
        let started = std::time::Instant::now();
        while sort.try_grow(1024).is_ok() {
            sort.shrink(1024);
            assert!(started.elapsed().as_secs() < 5, "the sort was never asked");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        sort.free();
        sort.try_grow(1024).unwrap();
        sort
    });
    merge.try_grow(3 * MIB).unwrap();
    let sort = sorter.join().unwrap();
    let s = native.spill_requests();
    assert!(s.yields >= 1 && s.unspillable_waits >= 1, "{s:?}");
    assert_eq!(merge.size(), 4 * MIB);
    drop((sort, merge));
    drop(pool);
    drop(native);
    all_back(m, &l);
}

#[test]
fn an_unspillable_grow_fails_at_once_when_no_spillable_consumer_can_give_memory_back() {
    let l = Arc::new(CapacityListener::new(4 * MIB as u64));
    let config = exact().with_reservation_block(MIB as u64);
    let m = MemoryManager::new("task", config, l.clone()).unwrap();
    let native = Arc::new(NativememPool::new(m.pool("datafusion").unwrap()));
    native.answer_spill_requests().unwrap();
    let pool: Arc<dyn MemoryPool> = native.clone();
    let merge = MemoryConsumer::new("ExternalSorterMerge[0]").register(&pool);
    merge.try_grow(3 * MIB).unwrap();
    let started = std::time::Instant::now();
    let err = merge.try_grow(2 * MIB).unwrap_err();
    assert!(
        matches!(err.find_root(), DataFusionError::ResourcesExhausted(_)),
        "{err}"
    );
    assert!(started.elapsed().as_millis() < 1000, "waited for nothing");
    assert_eq!(native.spill_requests().unspillable_waits, 0);
    drop(merge);
    drop(pool);
    drop(native);
    assert!(m.close().unwrap().is_empty());
}

/// Issue 26: with two `NativememPool`s in one task, a merge in one whose grow finds no room
/// waits for the consumers nativemem's request picked in the other (the request asks every
/// pool's spiller), instead of failing.
#[test]
fn an_unspillable_grow_waits_for_the_consumers_asked_in_another_pool_of_the_task() {
    let l = Arc::new(CapacityListener::new(8 * MIB as u64));
    let config = exact().with_reservation_block(MIB as u64);
    let m = MemoryManager::new("task", config, l.clone()).unwrap();
    let sorts = Arc::new(NativememPool::with_policy(
        m.pool("query-1").unwrap(),
        Policy::Greedy,
    ));
    let merges = Arc::new(NativememPool::with_policy(
        m.pool("query-2").unwrap(),
        Policy::Greedy,
    ));
    sorts.answer_spill_requests().unwrap();
    merges.answer_spill_requests().unwrap();
    let sorts_pool: Arc<dyn MemoryPool> = sorts.clone();
    let merges_pool: Arc<dyn MemoryPool> = merges.clone();
    let sort = spillable("ExternalSorter[0]", &sorts_pool);
    let merge = MemoryConsumer::new("ExternalSorterMerge[0]").register(&merges_pool);
    sort.try_grow(6 * MIB).unwrap();
    merge.try_grow(MIB).unwrap();
    let sorter = std::thread::spawn(move || {
        // The sort keeps growing a little until it is refused (asked to give memory back), then
        // spills: frees what it holds, and its retry goes through.
        let started = std::time::Instant::now();
        while sort.try_grow(1024).is_ok() {
            sort.shrink(1024);
            assert!(started.elapsed().as_secs() < 5, "the sort was never asked");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        sort.free();
        sort.try_grow(1024).unwrap();
        sort
    });
    merge.try_grow(3 * MIB).unwrap();
    let sort = sorter.join().unwrap();
    assert!(
        sorts.spill_requests().yields >= 1,
        "{:?}",
        sorts.spill_requests()
    );
    assert!(merges.spill_requests().unspillable_waits >= 1);
    assert_eq!(merge.size(), 4 * MIB);
    drop((sort, merge));
    drop((sorts_pool, merges_pool, sorts, merges));
    all_back(m, &l);
}

/// Issue 26: with spill requests off (the default), a merge whose grow finds no room under the
/// task limit was refused at once while a spillable consumer of its pool held the memory (a
/// window query's sorts starved their merges). The pool asks that consumer itself, and the merge
/// waits for its spill.
#[test]
fn with_spill_requests_off_a_merge_finding_no_room_waits_for_a_sort_of_its_pool_to_spill() {
    let (m, l, pool) = setup(Some(8 * MIB as u64));
    let sort = spillable("ExternalSorter[0]", &pool);
    let merge = MemoryConsumer::new("ExternalSorterMerge[1]").register(&pool);
    sort.try_grow(6 * MIB).unwrap();
    merge.try_grow(MIB).unwrap();
    let sorter = std::thread::spawn(move || {
        // The sort keeps growing a little until it is refused (asked to give memory back), then
        // spills: frees what it holds, and its retry goes through.
        let started = std::time::Instant::now();
        while sort.try_grow(1024).is_ok() {
            sort.shrink(1024);
            assert!(started.elapsed().as_secs() < 5, "the sort was never asked");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        sort.free();
        sort.try_grow(1024).unwrap();
        sort
    });
    merge.try_grow(3 * MIB).unwrap();
    let sort = sorter.join().unwrap();
    assert_eq!(merge.size(), 4 * MIB);
    assert_eq!(m.used() as usize, 4 * MIB + 1024);
    drop((sort, merge));
    drop(pool);
    all_back(m, &l);
}

/// Issue 26, budget-only (no task limit: Spark's grants bound the task): a hash aggregation
/// replaying its spill files (a spillable consumer holding memory through two reservations,
/// which fails its query on a refusal) whose grow Spark refuses waits, like a merge, for a sort
/// of its pool asked to spill, instead of failing.
#[test]
fn a_merging_aggregation_refused_by_spark_waits_for_a_sort_of_its_pool_to_spill() {
    let l = Arc::new(CapacityListener::new(8 * MIB as u64));
    let config = exact().with_reservation_block(MIB as u64);
    let m = MemoryManager::new("task", config, l.clone()).unwrap();
    let pool: Arc<dyn MemoryPool> = Arc::new(NativememPool::new(m.pool("datafusion").unwrap()));
    let sort = spillable("ExternalSorter[0]", &pool);
    let agg = spillable("SingleHashAggregateStream[1]", &pool);
    let merge = agg.new_empty();
    let replay = agg.new_empty();
    merge.try_grow(2 * MIB).unwrap();
    replay.try_grow(MIB).unwrap();
    sort.try_grow(5 * MIB).unwrap();
    let sorter = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        while sort.try_grow(1024).is_ok() {
            sort.shrink(1024);
            assert!(started.elapsed().as_secs() < 5, "the sort was never asked");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        sort.free();
        sort.try_grow(1024).unwrap();
        sort
    });
    // Spark has nothing more to grant: the replay's grow waits for the sort's spill.
    replay.try_grow(2 * MIB).unwrap();
    let sort = sorter.join().unwrap();
    assert_eq!((merge.size(), replay.size()), (2 * MIB, 3 * MIB));
    drop((sort, merge, replay, agg));
    drop(pool);
    all_back(m, &l);
}

/// Issue 26, item 5: budget-only (no task limit), fairness divides what Spark's budget let the
/// pool hold. Before Spark refuses anything there is no limit to divide (first come, first
/// served, as Spark itself); once it refused a grow, the pool holds what the budget allows, and
/// a consumer over its share of that is refused for fairness (so it spills) while another active
/// one is under its share, where before only Spark's refusals applied.
#[test]
fn budget_only_fairness_divides_what_spark_let_the_pool_hold() {
    let l = Arc::new(CapacityListener::new(8 * MIB as u64));
    let config = exact().with_reservation_block(MIB as u64);
    let m = MemoryManager::new("task", config, l.clone()).unwrap();
    let native = Arc::new(NativememPool::new(m.pool("datafusion").unwrap()));
    let pool: Arc<dyn MemoryPool> = native.clone();
    assert!(matches!(pool.memory_limit(), MemoryLimit::Unknown));
    let a = spillable("ExternalSorter[0]", &pool);
    let b = spillable("ExternalSorter[1]", &pool);
    assert_eq!(native.budget_seen(), None);
    b.try_grow(MIB).unwrap();
    a.try_grow(7 * MIB).unwrap(); // no limit known yet: Spark grants it
    let err = a.try_grow(MIB).unwrap_err(); // Spark refuses: the budget is 8 MiB
    assert!(err.to_string().contains("listener"), "{err}");
    assert_eq!(native.budget_seen(), Some(8 * MIB as u64));
    // A spills (over its share: 4 MiB of 8, B active), then grows back to 5 MiB: over the share,
    // so A is refused for fairness with room left under the budget...
    a.shrink(4 * MIB);
    let err = a.try_grow(2 * MIB).unwrap_err().to_string();
    assert!(
        err.contains("share 4.0 MiB") && err.contains("limit 8.0 MiB"),
        "{err}"
    );
    assert_eq!(m.used() as usize, 4 * MIB);
    // ... and B grows to its share, which Spark grants.
    b.try_grow(3 * MIB).unwrap();
    assert_eq!(
        (a.size(), b.size(), m.used() as usize),
        (3 * MIB, 4 * MIB, 7 * MIB)
    );
    drop((a, b));
    drop(pool);
    drop(native);
    assert!(m.close().unwrap().is_empty());
    assert_eq!(l.reserved(), 0);
}

/// A late partition's consumers (registered, not grown yet) find FairSpillPool's share free: a
/// consumer over that floor may not take the last share of the limit while they have not
/// started (a late sort's merge reserves up front and cannot spill; issue 26's matrix).
#[test]
fn a_consumer_leaves_fair_spill_pools_share_free_for_consumers_not_started() {
    let (m, _l, pool) = setup(Some(8 * MIB as u64));
    let a = spillable("ExternalSorter[0]", &pool);
    let b = spillable("ExternalSorter[1]", &pool);
    let late = MemoryConsumer::new("ExternalSorterMerge[1]").register(&pool);
    // FairSpillPool's share: 4 MiB (8 MiB, two registered spillable consumers). A alone is
    // active (its share: the whole limit), but may not leave less than 4 MiB free while B and
    // the merge have not started.
    a.try_grow(4 * MIB).unwrap();
    let err = a.try_grow(MIB).unwrap_err();
    assert!(
        err.to_string().contains("consumers that have not started"),
        "{err}"
    );
    assert_eq!(m.used() as usize, 4 * MIB);
    // The late partition finds its room: its sort and its merge's up-front reservation.
    b.try_grow(MIB).unwrap();
    late.try_grow(2 * MIB).unwrap();
    assert_eq!(m.used() as usize, 7 * MIB);
    drop((a, b, late));
    drop(pool);
    assert!(m.close().unwrap().is_empty());
}

/// Issue 26: two `NativememPool`s of one task share its limit, and fairness divides it among the
/// consumers of both (each pool divided all of it among its own before, and one pool's sort held
/// the room the other pool's merge needed).
#[test]
fn fairness_divides_the_task_limit_among_the_consumers_of_every_pool_of_the_task() {
    let l = Arc::new(CapacityListener::unlimited());
    let config = exact()
        .with_reservation_block(MIB as u64)
        .with_task_limit(Some(8 * MIB as u64));
    let m = MemoryManager::new("task", config, l.clone()).unwrap();
    let a: Arc<dyn MemoryPool> = Arc::new(NativememPool::new(m.pool("query-1").unwrap()));
    let b: Arc<dyn MemoryPool> = Arc::new(NativememPool::new(m.pool("query-2").unwrap()));
    let sort_a = spillable("ExternalSorter[0]", &a);
    let sort_b = spillable("ExternalSorter[0]", &b);
    sort_a.try_grow(3 * MIB).unwrap();
    sort_b.try_grow(MIB).unwrap();
    // Alone in its pool, sort A's share would be the whole 8 MiB. With sort B counted, its share
    // is 4 MiB, and growing to 5 would leave B less than the 3 MiB it needs to reach its share.
    let e = sort_a.try_grow(2 * MIB).unwrap_err();
    assert!(
        matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)),
        "{e}"
    );
    assert!(e.to_string().contains("fair share 4.0 MiB"), "{e}");
    assert_eq!((sort_a.size(), m.used() as usize), (3 * MIB, 4 * MIB));
    // B grows to its share; then A, under its own share, may too.
    sort_b.try_grow(3 * MIB).unwrap();
    sort_a.try_grow(MIB).unwrap();
    assert_eq!(m.used() as usize, 8 * MIB);
    drop((sort_a, sort_b));
    drop((a, b));
    all_back(m, &l);
}

/// Issue 26: a consumer holding nothing is never refused for fairness (a refusal cannot make it
/// spill: a sort that has spilled everything fails its query when refused with nothing held),
/// even past FairSpillPool's share while a merge is registered.
#[test]
fn a_consumer_holding_nothing_is_never_refused_for_fairness() {
    let (m, l, pool) = setup(Some(8 * MIB as u64));
    let sort_x = spillable("ExternalSorter[0]", &pool);
    let sort_y = spillable("ExternalSorter[1]", &pool);
    let merge = MemoryConsumer::new("ExternalSorterMerge[0]").register(&pool);
    merge.try_grow(MIB).unwrap();
    sort_x.try_grow(2 * MIB).unwrap();
    // FairSpillPool's share is (8 - 1) / 2 = 3.5 MiB and a merge is registered: a sort holding
    // memory is capped there.
    let e = sort_x.try_grow(2 * MIB).unwrap_err();
    assert!(
        e.to_string().contains("FairSpillPool's share 3.5 MiB"),
        "{e}"
    );
    // Sort Y holds nothing: 4 MiB fit under the limit, and it gets them.
    sort_y.try_grow(4 * MIB).unwrap();
    assert_eq!(m.used() as usize, 7 * MIB);
    drop((sort_x, sort_y, merge));
    drop(pool);
    all_back(m, &l);
}

/// Issue 26: a merge waiting for a sort to spill waits off its tokio worker. Both operators run
/// as tasks of a runtime with one worker, as DataFusion runs them: had the merge's wait held the
/// worker, the sort could never run its next grow (the one refused so that it spills) and the
/// merge would fail after its 5 s bound.
#[test]
fn a_merge_waiting_for_a_sort_to_spill_leaves_its_tokio_worker_to_the_sort() {
    let (m, l, pool) = setup(Some(8 * MIB as u64));
    let sort = spillable("ExternalSorter[0]", &pool);
    let merge = MemoryConsumer::new("ExternalSorterMerge[1]").register(&pool);
    sort.try_grow(6 * MIB).unwrap();
    merge.try_grow(MIB).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let (sort, merge) = rt.block_on(async move {
        // The merge first: on the only worker, it finds no room and waits for the sort.
        let merging = tokio::spawn(async move { merge.try_grow(3 * MIB).map(|()| merge) });
        let sorter = tokio::spawn(async move {
            // Grows a little until refused (asked to give memory back), then spills.
            while sort.try_grow(1024).is_ok() {
                sort.shrink(1024);
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            sort.free();
            sort.try_grow(1024).unwrap();
            sort
        });
        let merge = merging.await.unwrap().expect("the merge got its memory");
        (sorter.await.unwrap(), merge)
    });
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "the merge ran out its wait: {:?}",
        started.elapsed()
    );
    assert_eq!(merge.size(), 4 * MIB);
    drop((sort, merge));
    drop(rt);
    drop(pool);
    all_back(m, &l);
}

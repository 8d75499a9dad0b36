//! Real DataFusion queries on data DataFusion generates (`generate_series`), each run twice:
//! unbounded, and under a nativemem task limit small enough that the operators must spill.
//! Results must be identical, DataFusion's spill metrics must show spills, the task's peak must
//! stay under the limit, and every counter must be 0 after the query and after the manager closes.
//!
//! Run optimised (scripts/test.sh does): `cargo test --profile datafusion -p nativemem-datafusion`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use datafusion::error::DataFusionError;
use datafusion::execution::memory_pool::MemoryPool;
use std::sync::atomic::{AtomicU64, Ordering};

use nativemem_core::{
    CapacityListener, ListenerError, MemoryConfig, MemoryManager, ReservationListener,
};
use nativemem_datafusion::{ClientPool, NativePool, NativememPool};
use support::{run_query, Run, COUNT_DISTINCT, MIB, SORT_MERGE_JOIN};

/// Runs `sql` on `pool`, time-bounded: DataFusion 55.2 can park every worker of a query that
/// repartitions under a memory limit, whatever the pool (apache/datafusion#24883, fixed after
/// 55.2); a hang fails the test, named, instead of hanging CI.
async fn run_on<P: NativePool>(
    pool: Arc<NativememPool<P>>,
    partitions: usize,
    sql: &str,
) -> Result<Run, DataFusionError> {
    match run_query(pool, partitions, sql, Duration::from_secs(180)).await {
        Ok(run) => Ok(run),
        Err(support::Failure::Query(e)) => Err(e),
        Err(support::Failure::Hung) => {
            panic!("query hung for 180 s (apache/datafusion#24883?): {sql}")
        }
    }
}

fn manager(limit: Option<u64>) -> (MemoryManager, Arc<CapacityListener>) {
    let listener = Arc::new(CapacityListener::unlimited());
    let config = MemoryConfig::default()
        .with_reservation_block(MIB)
        .with_task_limit(limit);
    let m = MemoryManager::new("df-task", config, listener.clone()).unwrap();
    (m, listener)
}

/// Runs `sql` with the core backend under `limit`, checking the accounting around it.
async fn run_core(
    limit: Option<u64>,
    partitions: usize,
    sql: &str,
) -> Result<Run, DataFusionError> {
    run_core_shared(limit, partitions, sql, 1)
        .await
        .map(|mut runs| runs.remove(0))
}

/// Runs `copies` copies of `sql` at once on one pool (the core backend) under `limit`, checking
/// the accounting around them; the first error if any failed.
async fn run_core_shared(
    limit: Option<u64>,
    partitions: usize,
    sql: &str,
    copies: usize,
) -> Result<Vec<Run>, DataFusionError> {
    let (m, listener) = manager(limit);
    let pool = Arc::new(NativememPool::new(m.pool("datafusion").unwrap()));
    let result: Result<Vec<Run>, DataFusionError> =
        futures::future::join_all((0..copies).map(|_| run_on(pool.clone(), partitions, sql)))
            .await
            .into_iter()
            .collect();
    if let Err(e) = &result {
        println!("query failed under {limit:?}: {e}");
        // A failed query's partition tasks are cancelled asynchronously: let them unwind.
        let started = std::time::Instant::now();
        while pool.consumer_count() > 0 && started.elapsed() < std::time::Duration::from_secs(10) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    // Every consumer gave its memory back, in DataFusion's view and in nativemem's.
    assert_eq!(pool.reserved(), 0, "{}", pool.report());
    assert_eq!(pool.consumer_count(), 0, "{}", pool.report());
    assert_eq!(pool.overcommit(), 0, "{}", pool.report());
    assert_eq!(m.used(), 0, "{}", m.usage_report());
    if let Some(limit) = limit {
        assert!(
            m.peak() <= limit,
            "peak {} over the limit {limit}",
            m.peak()
        );
    }
    let report = m.close().unwrap();
    assert!(report.is_empty(), "{report}");
    assert_eq!(listener.reserved(), 0);
    result
}

/// The query twice, unbounded and under `limit`: same result (in the same order when the query
/// orders it), and spills under the limit.
async fn same_result_and_spills(limit: u64, partitions: usize, sql: &str, ordered: bool) {
    let free = run_core(None, partitions, sql).await.unwrap();
    assert_eq!(free.spill_count, 0, "unbounded run spilled");
    let limited = run_core(Some(limit), partitions, sql).await.unwrap();
    println!(
        "{} MiB limit, {partitions} partition(s): {} rows, {} spills, {} spilled",
        limit / MIB,
        limited.digest.rows,
        limited.spill_count,
        limited.spilled_bytes
    );
    assert_eq!(
        limited.digest.rows, free.digest.rows,
        "row counts differ under the limit"
    );
    assert_eq!(
        limited.digest.unordered, free.digest.unordered,
        "results differ under the limit"
    );
    if ordered {
        assert_eq!(
            limited.digest.ordered, free.digest.ordered,
            "order differs under the limit"
        );
    }
    assert!(limited.spill_count > 0, "no spill under {limit} bytes");
}

const SORT: &str = "SELECT v FROM (SELECT (value * 7919) % 10000019 AS v FROM generate_series(1, 6000000)) ORDER BY v";
const GROUP_BY: &str = "SELECT value % 1000000 AS k, count(*) AS n, sum(value) AS s \
                        FROM generate_series(1, 3000000) GROUP BY value % 1000000";
const JOIN: &str = "SELECT count(*) AS n, sum(a.value + b.value) AS s FROM generate_series(1, 1000000) a \
                    JOIN (SELECT value * 2 AS value FROM generate_series(1, 1000000)) b ON a.value = b.value";
const MIXED: &str = "SELECT k, n, s FROM (SELECT value % 1000000 AS k, count(*) AS n, sum(value) AS s \
                     FROM generate_series(1, 4000000) GROUP BY value % 1000000) g \
                     JOIN (SELECT value AS id FROM generate_series(0, 999999, 5)) f ON g.k = f.id ORDER BY s, k";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_by_millions_of_rows_spills_under_the_limit() {
    same_result_and_spills(24 * MIB, 1, SORT, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_by_a_million_groups_spills_under_the_limit() {
    same_result_and_spills(24 * MIB, 1, GROUP_BY, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_join_gives_the_same_result_under_a_limit_it_fits() {
    // A hash join cannot spill: the limit leaves room for its build side; the result must match.
    let free = run_core(None, 2, JOIN).await.unwrap();
    let limited = run_core(Some(96 * MIB), 2, JOIN).await.unwrap();
    assert_eq!(limited.digest, free.digest);
    assert_eq!(limited.digest.rows, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_query_on_several_partitions_spills_under_the_limit() {
    same_result_and_spills(64 * MIB, 4, MIXED, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_limit_is_resources_exhausted_with_the_report() {
    let err = match run_core(Some(64 * 1024), 1, SORT).await {
        Ok(_) => panic!("a 64 KiB limit cannot sort millions of rows"),
        Err(e) => e,
    };
    let text = err.to_string();
    assert!(
        matches!(err.find_root(), DataFusionError::ResourcesExhausted(_)),
        "{err:?}"
    );
    assert!(text.contains("Native memory of 'df-task'"), "{text}");
    assert!(text.contains("datafusion"), "{text}");
}

/// Through the engine ABI: a manager made with the client (as Java would make it), the pool a
/// `ClientPool`. Same query, same result as through the core, and spills under the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_client_the_same_pool_spills_and_returns_everything() {
    use nativemem_client::{Api, ManagerOptions};
    let table = nativemem_provider::api(nativemem_client::sys::NM_ABI_VERSION);
    // SAFETY: the provider's table, a static of the linked library.
    let api = unsafe { Api::from_ptr(table) }.unwrap();
    let free = run_core(None, 1, SORT).await.unwrap();
    let mm = api
        .create_manager(
            "df-client",
            ManagerOptions {
                reservation_block: Some(MIB),
                task_limit: Some(24 * MIB),
                ..ManagerOptions::default()
            },
            None,
        )
        .unwrap();
    let pool = Arc::new(NativememPool::new(
        ClientPool::open(mm.acquire().unwrap(), "datafusion", None).unwrap(),
    ));
    assert_eq!(pool.native().limit(), Some(24 * MIB));
    let limited = run_on(pool.clone(), 1, SORT).await.unwrap();
    assert_eq!(limited.digest, free.digest);
    assert!(limited.spill_count > 0);
    assert_eq!(pool.reserved(), 0);
    let lease = mm.acquire().unwrap();
    let stats = lease.stats().unwrap();
    assert_eq!(stats.used, 0);
    assert!(stats.peak <= 24 * MIB, "{stats:?}");
    drop(lease);
    drop(pool); // releases the pool's lease
    let report = mm.close().unwrap();
    assert_eq!(report.leaked_bytes, 0, "{}", report.report);
}

/// Spark → DataFusion: with no limit at all (nothing would make the operators spill), another
/// thread keeps asking the task for memory back (as Spark does when another consumer of the task
/// needs it); the pool makes the sorts spill at their next grows. Same results, spills that only
/// the requests caused, and every counter 0 afterwards. (Sorts only: DataFusion's hash
/// aggregation treats a refused grow as fatal once it merges its own spill files; see the crate
/// docs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spill_requests_make_running_queries_spill_with_the_same_results() {
    for (sql, ordered, partitions) in [(SORT, true, 1), (SORT, true, 2)] {
        let free = run_core(None, partitions, sql).await.unwrap();
        let (m, listener) = manager(None);
        let pool = Arc::new(NativememPool::new(m.pool("datafusion").unwrap()));
        pool.answer_spill_requests().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let asker = {
            let (m, stop) = (m.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut given = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    given += m.reclaim(16 * MIB).unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                given
            })
        };
        let asked = run_on(pool.clone(), partitions, sql).await.unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let given = asker.join().unwrap();
        let s = pool.spill_requests();
        println!(
            "asked back: {} requests, {} yields ({} MiB held when refused), {} spills, {} MiB \
             handed back to the listener by the requests themselves",
            s.requests,
            s.yields,
            s.yielded_bytes / MIB,
            asked.spill_count,
            given / MIB
        );
        assert!(s.requests > 0 && s.yields > 0, "{s:?}");
        assert!(asked.spill_count > 0, "no spill although asked");
        assert_eq!(asked.digest.rows, free.digest.rows);
        assert_eq!(asked.digest.unordered, free.digest.unordered);
        if ordered {
            assert_eq!(asked.digest.ordered, free.digest.ordered);
        }
        assert_eq!((pool.reserved(), m.used()), (0, 0), "{}", pool.report());
        drop(pool);
        assert!(m.close().unwrap().is_empty());
        assert_eq!(listener.reserved(), 0);
    }
}

/// Issue 26: under `FairShare` (the default) a merging aggregation was refused for fairness with
/// room left under the limit, and the query failed now and then (two `COUNT(DISTINCT)` sharing
/// one pool: 6 runs in 10 at 24 MiB; DataFusion's `FairSpillPool` ran them all). Here two sharing
/// 16 MiB failed every run before the fix; they share 24 MiB here, the case (at 16 MiB the
/// pair still fails about 1 run in 6 when the test binary's other queries run beside it, with the pool full
/// of the two aggregations, not for fairness: a limit at the edge, not the bug). A few runs each, against the unbounded result. One partition per query: with two, DataFusion
/// 55.2's `RepartitionExec` can park every worker under a memory limit whatever the pool
/// (apache/datafusion#24883, fixed after 55.2); each run is time-bounded so that a hang fails the
/// test, named, instead of hanging CI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_distinct_group_by_under_tight_limits_never_fails_for_fairness() {
    let bounded = |limit: Option<u64>, copies: usize| async move {
        tokio::time::timeout(
            std::time::Duration::from_secs(120),
            run_core_shared(limit, 1, COUNT_DISTINCT, copies),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("{copies} COUNT(DISTINCT) under {limit:?} hung (apache/datafusion#24883?)")
        })
    };
    let free = bounded(None, 1).await.unwrap().remove(0);
    assert_eq!(free.digest.rows, 300_000);
    for (limit, copies) in [(16 * MIB, 1), (24 * MIB, 2)] {
        for run in 0..3 {
            let runs = bounded(Some(limit), copies).await.unwrap_or_else(|e| {
                panic!(
                    "run {run}, {copies} query(ies) under {} MiB: {e}",
                    limit / MIB
                )
            });
            for limited in runs {
                // Groups come in any order.
                assert_eq!(
                    (limited.digest.rows, limited.digest.unordered),
                    (free.digest.rows, free.digest.unordered),
                    "run {run} under {limit}"
                );
                assert!(limited.spill_count > 0, "no spill under {limit} bytes");
            }
        }
    }
}

/// A listener that grants everything and remembers the most it had granted at once (Spark's
/// side of the task).
#[derive(Default)]
struct PeakListener {
    reserved: AtomicU64,
    peak: AtomicU64,
}

impl ReservationListener for PeakListener {
    fn reserve(&self, bytes: u64) -> Result<u64, ListenerError> {
        // Relaxed (both): counters read after the query.
        let now = self.reserved.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
        Ok(bytes)
    }
    fn unreserve(&self, bytes: u64) -> Result<(), ListenerError> {
        // Relaxed: as above.
        self.reserved.fetch_sub(bytes, Ordering::Relaxed);
        Ok(())
    }
}

/// Issue 26: a sort-merge join that spills holds more than the limit through DataFusion's
/// infallible `grow` (the keys of its spilled batches, and the batches it reads back). nativemem
/// is charged for all of it at once: the task's peak covers what DataFusion held (before, it
/// saw at most the limit while DataFusion held twice that), and exceeds the limit by at most the
/// over-commit, which stays under what the join holds with no limit at all. Two partitions (a
/// sort-merge join needs them), time-bounded (apache/datafusion#24883).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sort_merge_join_over_commit_is_charged_and_bounded() {
    let bounded = |limit: Option<u64>| async move {
        let listener = Arc::new(PeakListener::default());
        let config = MemoryConfig::default()
            .with_reservation_block(MIB)
            .with_task_limit(limit);
        let m = MemoryManager::new("df-task", config, listener.clone()).unwrap();
        let pool = Arc::new(NativememPool::new(m.pool("datafusion").unwrap()));
        let run = run_on(pool.clone(), 2, SORT_MERGE_JOIN).await.unwrap();
        let stats = m.stats();
        let seen = (pool.peak_reserved(), pool.overcommit_peak(), m.peak());
        assert_eq!((pool.reserved(), pool.overcommit(), m.used()), (0, 0, 0));
        drop(pool);
        assert!(m.close().unwrap().is_empty());
        assert_eq!(listener.reserved.load(Ordering::Relaxed), 0);
        (run, seen, stats, listener.peak.load(Ordering::Relaxed))
    };
    let (free, (free_peak, _, _), _, _) = bounded(None).await;
    let limit = 24 * MIB;
    let (limited, (df_peak, overcommit_peak, task_peak), stats, spark_peak) =
        bounded(Some(limit)).await;
    println!(
        "unbounded peak {free_peak}, under {limit}: DataFusion peak {df_peak}, task peak \
         {task_peak}, over-commit peak {overcommit_peak}, Spark's reservation peak {spark_peak}, \
         task stats: over-commit {} so far, {} spills",
        stats.overcommitted_total, limited.spill_count
    );
    // The stats show it, and Spark's side reserved it although the task has a limit (the
    // over-commit is reserved from Spark as soon as it is forced): Spark's reservation went past
    // the limit, and covered the task's peak.
    assert!(stats.overcommitted_total > 0, "{stats:?}");
    assert!(
        spark_peak > limit && spark_peak >= task_peak,
        "Spark's reservation peaked at {spark_peak}: it did not show the over-commit (limit \
         {limit}, task peak {task_peak})"
    );
    assert_eq!(limited.digest, free.digest);
    assert!(limited.spill_count > 0, "no spill");
    assert!(
        overcommit_peak > 0,
        "the join did not over-commit: the test proves nothing"
    );
    // Visible: nativemem (so Spark's view of the task) saw everything DataFusion held.
    assert!(
        task_peak >= df_peak,
        "task peak {task_peak} < DataFusion's {df_peak}"
    );
    // Bounded: over the limit by at most the over-commit (plus the quantum of a reservation),
    // and the over-commit under what the join holds unbounded.
    assert!(
        task_peak <= limit + overcommit_peak + MIB,
        "task peak {task_peak} over {limit} + {overcommit_peak}"
    );
    assert!(
        overcommit_peak < free_peak,
        "over-commit {overcommit_peak} >= unbounded peak {free_peak}"
    );
}

/// The failure matrix's CI-sized subset (`scripts/bench.sh datafusion` runs all of it, N runs a
/// cell): one run a cell of the cells issue 26 was about, at 1/4 of each query's unbounded peak:
/// the window query budget-only (no task limit, Spark grants the limit; item 5) with spill
/// requests off and on, the sort with a task limit and requests on, two `COUNT(DISTINCT)`
/// sharing a pool budget-only (items 1 and 5), and two sorts on two pools of one task (item 3)
/// with a task limit and requests on. nativemem must not fail more
/// often than DataFusion's `FairSpillPool` on the same query and limit; results are checked
/// against the unbounded run and every byte must come back (`support::nativemem_run`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_matrix_subset_never_fails_more_than_fair_spill_pool() {
    use support::{matrix_row, unbounded, Mode, QUERIES};
    let cells: [(&str, &[(Mode, bool)]); 4] = [
        ("window", &[(Mode::Budget, false), (Mode::Budget, true)]),
        ("sort", &[(Mode::Limit, true)]),
        ("2x-count-distinct-one-pool", &[(Mode::Budget, false)]),
        ("2x-sort-two-pools-one-task", &[(Mode::Limit, true)]),
    ];
    for (name, modes) in cells {
        let q = QUERIES.iter().find(|q| q.name == name).unwrap();
        let (peak, expected) = unbounded(q).await;
        let limit = peak / 4;
        for (c, (mode, requests)) in matrix_row(q, limit, modes, 1, Some(expected))
            .await
            .into_iter()
            .zip(modes)
        {
            println!(
                "{name}, {mode:?}, spill requests {requests}, {} MiB (1/4 of {} MiB): {c:?}",
                limit / MIB,
                peak / MIB
            );
            assert!(
                c.met(),
                "{name}, {mode:?}, requests {requests}, {limit} bytes: nativemem failed more often \
                 than FairSpillPool: {c:?}"
            );
        }
    }
}

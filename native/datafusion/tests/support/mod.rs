//! The one query runner of this crate's query tests (`tests/queries.rs`) and of the failure
//! matrix (`examples/df_failures.rs`, printed by `scripts/bench.sh datafusion`), and the matrix
//! itself (issue 26): DataFusion queries on nativemem's pool and on DataFusion's
//! `FairSpillPool`, same queries, same limits, outcomes counted per cell.
//!
//! Included by path from both (`#[path = "../tests/support/mod.rs"]` in the example); each uses
//! part of it.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::execution::memory_pool::{FairSpillPool, MemoryPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::{collect, ExecutionPlan};
use datafusion::prelude::{SessionConfig, SessionContext};
use nativemem_core::{CapacityListener, MemoryConfig, MemoryManager};
use nativemem_datafusion::NativememPool;

pub const MIB: u64 = 1 << 20;

/// What a query produced, reduced so that two runs compare exactly: row count, and an
/// order-sensitive and an order-insensitive checksum of every Int64 cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    pub rows: usize,
    pub ordered: u64,
    pub unordered: u64,
}

pub fn digest(batches: &[RecordBatch]) -> Digest {
    let mut d = Digest {
        rows: 0,
        ordered: 0xcbf29ce484222325,
        unordered: 0,
    };
    for b in batches {
        d.rows += b.num_rows();
        // Every integer column as Int64 (ROW_NUMBER and its sums are unsigned).
        let columns: Vec<_> = b
            .columns()
            .iter()
            .map(|c| cast(c, &DataType::Int64).expect("an integer column"))
            .collect();
        for row in 0..b.num_rows() {
            let mut h: u64 = 0;
            for col in &columns {
                let v = if col.is_null(row) {
                    u64::MAX
                } else {
                    col.as_primitive::<Int64Type>().value(row) as u64
                };
                h = h.wrapping_mul(0x100000001b3).wrapping_add(v);
            }
            d.ordered = (d.ordered ^ h).wrapping_mul(0x100000001b3);
            d.unordered = d.unordered.wrapping_add(h.wrapping_mul(0x9e3779b97f4a7c15));
        }
    }
    d
}

/// Spill count and spilled bytes over the whole plan (DataFusion's metrics).
pub fn spills(plan: &Arc<dyn ExecutionPlan>) -> (usize, usize) {
    let (mut count, mut bytes) = (0, 0);
    if let Some(m) = plan.metrics() {
        count += m.spill_count().unwrap_or(0);
        bytes += m.spilled_bytes().unwrap_or(0);
    }
    for child in plan.children() {
        let (c, b) = spills(child);
        count += c;
        bytes += b;
    }
    (count, bytes)
}

pub struct Run {
    pub digest: Digest,
    pub spill_count: usize,
    pub spilled_bytes: usize,
}

/// Why a query did not return a result.
#[derive(Debug)]
pub enum Failure {
    /// It did not return within the time bound: DataFusion 55.2 can park every worker of a query
    /// that repartitions under a memory limit, whatever the pool (apache/datafusion#24883, fixed
    /// after 55.2).
    Hung,
    Query(DataFusionError),
}

impl Failure {
    /// A failure for lack of memory (DataFusion's `ResourcesExhausted`).
    pub fn is_resources_exhausted(&self) -> bool {
        matches!(self, Failure::Query(e) if matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)))
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Hung => f.write_str("hung (apache/datafusion#24883?)"),
            Failure::Query(e) => write!(f, "{e}"),
        }
    }
}

/// Runs `sql` (`SET ...; SET ...; SELECT ...`: the settings first) on `pool` with `partitions`
/// partitions, within `bound`. Sorts reserve 2 MiB per partition up front for their merge
/// (DataFusion's default is 10 MiB), which keeps small limits meaningful with several partitions.
pub async fn run_query(
    pool: Arc<dyn MemoryPool>,
    partitions: usize,
    sql: &str,
    bound: Duration,
) -> Result<Run, Failure> {
    let query = async {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(pool)
            .build_arc()?;
        let config = SessionConfig::new()
            .with_target_partitions(partitions)
            .with_batch_size(8192)
            .with_sort_spill_reservation_bytes(2 << 20);
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        let (settings, query) = sql.rsplit_once(';').unwrap_or(("", sql));
        for setting in settings.split(';').filter(|s| !s.trim().is_empty()) {
            ctx.sql(setting).await?.collect().await?;
        }
        let plan = ctx.sql(query).await?.create_physical_plan().await?;
        let batches = collect(plan.clone(), ctx.task_ctx()).await?;
        let (spill_count, spilled_bytes) = spills(&plan);
        Ok::<_, DataFusionError>(Run {
            digest: digest(&batches),
            spill_count,
            spilled_bytes,
        })
    };
    match tokio::time::timeout(bound, query).await {
        Err(_) => Err(Failure::Hung),
        Ok(r) => r.map_err(Failure::Query),
    }
}

// ---- the failure matrix ---------------------------------------------------------------------------

/// One query of the matrix: `copies` copies at once, each on `partitions` partitions, sharing one
/// pool (`two_pools`: each copy on its own pool, the pools of one task).
#[derive(Debug, Clone, Copy)]
pub struct Query {
    pub name: &'static str,
    pub copies: usize,
    pub two_pools: bool,
    pub partitions: usize,
    pub sql: &'static str,
    /// The result is ordered (compared in order).
    pub ordered: bool,
}

pub const SORT_3M: &str = "SELECT v FROM (SELECT (value * 7919) % 10000019 AS v FROM generate_series(1, 3000000)) ORDER BY v";

/// `COUNT(DISTINCT)` with `GROUP BY` over 300k groups (issue 26): the final aggregation spills
/// and then merges its spill files, when DataFusion treats any refused grow as fatal although it
/// still marks the consumer spillable.
pub const COUNT_DISTINCT: &str = "SELECT k, count(DISTINCT v) AS d, count(*) AS n \
    FROM (SELECT value % 300000 AS k, value % 7 AS v FROM generate_series(1, 1200000)) GROUP BY k";

pub const WINDOW: &str = "SELECT count(*) AS n, sum(rn) AS r, sum(s) AS s FROM (SELECT ROW_NUMBER() OVER \
    (PARTITION BY k ORDER BY v) AS rn, SUM(v) OVER (PARTITION BY k ORDER BY v) AS s \
    FROM (SELECT value % 1000 AS k, (value * 7919) % 1000003 AS v FROM generate_series(1, 3000000)))";

/// A sort-merge join whose buffered side holds 1M rows per key: it spills buffered batches and
/// keeps their join keys with DataFusion's infallible `grow` (and grows again when it reads them
/// back), past the limit.
pub const SORT_MERGE_JOIN: &str = "SET datafusion.optimizer.prefer_hash_join = false; \
    SET datafusion.optimizer.hash_join_single_partition_threshold = 0; \
    SET datafusion.optimizer.hash_join_single_partition_threshold_rows = 0; \
    SELECT count(*) AS n, sum(b.p) AS s FROM (SELECT value AS k FROM generate_series(1, 2)) a \
    JOIN (SELECT value % 2 + 1 AS k, value AS p FROM generate_series(1, 2000000)) b ON a.k = b.k";

const fn q(
    name: &'static str,
    copies: usize,
    two_pools: bool,
    partitions: usize,
    sql: &'static str,
    ordered: bool,
) -> Query {
    Query {
        name,
        copies,
        two_pools,
        partitions,
        sql,
        ordered,
    }
}

pub const QUERIES: [Query; 7] = [
    q("sort", 1, false, 2, SORT_3M, true),
    q(
        "group-by",
        1,
        false,
        2,
        "SELECT value % 1000000 AS k, count(*) AS n, sum(value) AS s FROM generate_series(1, 3000000) \
         GROUP BY value % 1000000",
        false,
    ),
    q("window", 1, false, 2, WINDOW, false),
    q("count-distinct", 1, false, 1, COUNT_DISTINCT, false),
    q("2x-count-distinct-one-pool", 2, false, 1, COUNT_DISTINCT, false),
    q("2x-sort-two-pools-one-task", 2, true, 2, SORT_3M, true),
    q("sort-merge-join", 1, false, 2, SORT_MERGE_JOIN, false),
];

/// How nativemem is bounded in a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A task limit (Spark unbounded).
    Limit,
    /// No task limit; Spark grants at most the limit (Spark's default: the budget only).
    Budget,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Limit => "limit",
            Mode::Budget => "budget",
        }
    }
}

/// How one run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// `ResourcesExhausted`: failed for lack of memory.
    Failed,
    /// Did not return within the bound (apache/datafusion#24883).
    Hung,
}

/// Per run: the time bound.
pub const BOUND: Duration = Duration::from_secs(60);

/// The copies of `q` at once, copy `i` on `pools[i % pools.len()]`; every result checked against
/// `expected` (a wrong result is a bug: panics).
async fn run_copies(q: &Query, pools: &[Arc<dyn MemoryPool>], expected: Option<Digest>) -> Outcome {
    let all = futures::future::join_all(
        (0..q.copies)
            .map(|i| run_query(pools[i % pools.len()].clone(), q.partitions, q.sql, BOUND)),
    )
    .await;
    let mut outcome = Outcome::Ok;
    for r in all {
        match r {
            Ok(run) => {
                if let Some(e) = expected {
                    let d = run.digest;
                    let same = if q.ordered {
                        d == e
                    } else {
                        (d.rows, d.unordered) == (e.rows, e.unordered)
                    };
                    assert!(same, "{}: result differs from the unbounded run", q.name);
                }
            }
            Err(Failure::Hung) => outcome = Outcome::Hung,
            Err(f) if f.is_resources_exhausted() => {
                if std::env::var_os("DF_BENCH_VERBOSE").is_some() {
                    eprintln!("{}: {}", q.name, f.to_string().replace('\n', " / "));
                }
                if outcome == Outcome::Ok {
                    outcome = Outcome::Failed;
                }
            }
            Err(f) => panic!("{}: query failed: {f}", q.name),
        }
    }
    outcome
}

/// The queries' peak and result with no limit at all (nativemem's task peak: every copy, every
/// pool of the task).
pub async fn unbounded(q: &Query) -> (u64, Digest) {
    let m = MemoryManager::new(
        "unbounded",
        MemoryConfig::default().with_reservation_block(MIB),
        Arc::new(CapacityListener::unlimited()),
    )
    .unwrap();
    let pools = nativemem_pools(q, &m, false);
    let all = futures::future::join_all(
        (0..q.copies)
            .map(|i| run_query(pools[i % pools.len()].clone(), q.partitions, q.sql, BOUND)),
    )
    .await;
    let digest = all
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|f| panic!("{} unbounded: {f}", q.name))
                .digest
        })
        .next()
        .unwrap();
    drop(pools);
    let peak = m.peak();
    m.close().unwrap();
    (peak, digest)
}

fn nativemem_pools(q: &Query, m: &MemoryManager, requests: bool) -> Vec<Arc<dyn MemoryPool>> {
    let n = if q.two_pools { q.copies } else { 1 };
    (0..n)
        .map(|i| {
            let pool = NativememPool::new(m.pool(&format!("datafusion{i}")).unwrap());
            if requests {
                pool.answer_spill_requests().unwrap();
            }
            Arc::new(pool) as Arc<dyn MemoryPool>
        })
        .collect()
}

/// One run of `q` on nativemem's pool(s) (`Policy::FairShare`, the default) bounded by `limit`
/// as `mode` says, spill requests answered or not. Afterwards every byte must be back (the
/// pools, the task, Spark's reservation): panics otherwise.
pub async fn nativemem_run(
    q: &Query,
    mode: Mode,
    requests: bool,
    limit: u64,
    expected: Option<Digest>,
) -> Outcome {
    let (listener, task_limit) = match mode {
        Mode::Limit => (CapacityListener::unlimited(), Some(limit)),
        Mode::Budget => (CapacityListener::new(limit), None),
    };
    let listener = Arc::new(listener);
    let config = MemoryConfig::default()
        .with_reservation_block(MIB)
        .with_task_limit(task_limit);
    let m = MemoryManager::new("matrix", config, listener.clone()).unwrap();
    let pools = nativemem_pools(q, &m, requests);
    let outcome = run_copies(q, &pools, expected).await;
    if outcome == Outcome::Failed {
        // A failed query's partition tasks are cancelled asynchronously: let them unwind.
        let started = std::time::Instant::now();
        while m.used() > 0 && started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    drop(pools);
    if outcome != Outcome::Hung {
        // A hung run's tasks may still hold reservations: close reports them.
        assert_eq!(
            m.used(),
            0,
            "{}: not released\n{}",
            q.name,
            m.usage_report()
        );
    }
    let report = m.close().unwrap();
    if outcome != Outcome::Hung {
        assert!(report.is_empty(), "{}: {report}", q.name);
        assert_eq!(
            listener.reserved(),
            0,
            "{}: Spark's reservation not released",
            q.name
        );
    }
    outcome
}

/// One run of `q` on DataFusion's `FairSpillPool` of `limit` (two pools in a task: one of half
/// the limit each, the static split DataFusion's pools allow).
pub async fn fair_spill_pool_run(q: &Query, limit: u64, expected: Option<Digest>) -> Outcome {
    let pools: Vec<Arc<dyn MemoryPool>> = if q.two_pools {
        (0..q.copies)
            .map(|_| Arc::new(FairSpillPool::new((limit / q.copies as u64) as usize)) as _)
            .collect()
    } else {
        vec![Arc::new(FairSpillPool::new(limit as usize))]
    };
    run_copies(q, &pools, expected).await
}

/// The nativemem configurations of a matrix row: (mode, spill requests answered).
pub const NATIVEMEM_MODES: [(Mode, bool); 4] = [
    (Mode::Limit, false),
    (Mode::Limit, true),
    (Mode::Budget, false),
    (Mode::Budget, true),
];

/// Failure counts of one cell: nativemem's and FairSpillPool's (failed, hung), of `runs` runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub nativemem_failed: usize,
    pub nativemem_hung: usize,
    pub fsp_failed: usize,
    pub fsp_hung: usize,
    pub runs: usize,
}

impl Counts {
    /// nativemem never fails (or hangs) more often than `FairSpillPool`.
    pub fn met(&self) -> bool {
        self.nativemem_failed + self.nativemem_hung <= self.fsp_failed + self.fsp_hung
    }
}

fn count(outcome: Outcome, failed: &mut usize, hung: &mut usize) {
    match outcome {
        Outcome::Ok => {}
        Outcome::Failed => *failed += 1,
        Outcome::Hung => *hung += 1,
    }
}

/// One row of the matrix: `q` under `limit`, `runs` rounds, each running `FairSpillPool` once and
/// nativemem once per `modes` entry in rotating order (no pool always runs on a warmer machine).
/// Returns a cell per mode; `FairSpillPool`'s counts are the same in each.
pub async fn matrix_row(
    q: &Query,
    limit: u64,
    modes: &[(Mode, bool)],
    runs: usize,
    expected: Option<Digest>,
) -> Vec<Counts> {
    let mut cells = vec![
        Counts {
            runs,
            ..Counts::default()
        };
        modes.len()
    ];
    let (mut ff, mut fh) = (0, 0);
    for round in 0..runs {
        let slots = modes.len() + 1;
        for i in 0..slots {
            match (round + i) % slots {
                0 => count(
                    fair_spill_pool_run(q, limit, expected).await,
                    &mut ff,
                    &mut fh,
                ),
                k => {
                    let (mode, requests) = modes[k - 1];
                    let c = &mut cells[k - 1];
                    let outcome = nativemem_run(q, mode, requests, limit, expected).await;
                    count(outcome, &mut c.nativemem_failed, &mut c.nativemem_hung);
                }
            }
        }
    }
    for c in &mut cells {
        (c.fsp_failed, c.fsp_hung) = (ff, fh);
    }
    cells
}

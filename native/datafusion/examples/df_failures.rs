//! How often DataFusion queries fail for lack of memory on nativemem's pool (`Policy::FairShare`,
//! the default) and on DataFusion's `FairSpillPool`, same queries, same limits, `runs` runs each
//! (issue 26: nativemem's count must never be above `FairSpillPool`'s). Each run is
//! time-bounded: a run that does not return within 60 s (DataFusion 55.2 can park every worker,
//! apache/datafusion#24883) counts as a hang, apart from failures. nativemem runs in two modes:
//! `limit` (a task limit, Spark unbounded) and `budget` (no task limit, Spark grants at most the
//! limit: Spark's default). Prints `FAILURES <query> <mode> <limit MiB> <nativemem failed>
//! <nativemem hung> <FairSpillPool failed> <FairSpillPool hung> <runs>` lines for
//! scripts/bench.sh.
//!
//!   cargo run --release -p nativemem-datafusion --example df_failures [runs]

use std::sync::Arc;
use std::time::Duration;

use datafusion::error::DataFusionError;
use datafusion::execution::memory_pool::{FairSpillPool, MemoryPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::collect;
use datafusion::prelude::{SessionConfig, SessionContext};
use nativemem_core::{CapacityListener, MemoryConfig, MemoryManager};
use nativemem_datafusion::NativememPool;

const MIB: u64 = 1 << 20;

/// `(name (no spaces), copies sharing the pool, partitions, sql)`.
const QUERIES: [(&str, usize, usize, &str); 6] = [
    (
        "sort",
        1,
        2,
        "SELECT v FROM (SELECT (value * 7919) % 10000019 AS v FROM generate_series(1, 3000000)) ORDER BY v",
    ),
    (
        "group-by",
        1,
        2,
        "SELECT value % 1000000 AS k, count(*) AS n, sum(value) AS s FROM generate_series(1, 3000000) \
         GROUP BY value % 1000000",
    ),
    (
        "window",
        1,
        2,
        "SELECT count(*) AS n, sum(rn) AS r, sum(s) AS s FROM (SELECT ROW_NUMBER() OVER \
         (PARTITION BY k ORDER BY v) AS rn, SUM(v) OVER (PARTITION BY k ORDER BY v) AS s \
         FROM (SELECT value % 1000 AS k, (value * 7919) % 1000003 AS v FROM generate_series(1, 3000000)))",
    ),
    ("count-distinct", 1, 1, COUNT_DISTINCT),
    ("2x-count-distinct-one-pool", 2, 1, COUNT_DISTINCT),
    (
        "sort-merge-join",
        1,
        2,
        "SET datafusion.optimizer.prefer_hash_join = false; \
         SET datafusion.optimizer.hash_join_single_partition_threshold = 0; \
         SET datafusion.optimizer.hash_join_single_partition_threshold_rows = 0; \
         SELECT count(*) AS n, sum(b.p) AS s FROM (SELECT value AS k FROM generate_series(1, 2)) a \
         JOIN (SELECT value % 2 + 1 AS k, value AS p FROM generate_series(1, 2000000)) b ON a.k = b.k",
    ),
];

const COUNT_DISTINCT: &str = "SELECT k, count(DISTINCT v) AS d, count(*) AS n \
    FROM (SELECT value % 300000 AS k, value % 7 AS v FROM generate_series(1, 1200000)) GROUP BY k";

const LIMITS_MIB: [u64; 2] = [16, 24];

enum Outcome {
    Ok,
    Failed,
    Hung,
}

async fn one_query(
    pool: Arc<dyn MemoryPool>,
    partitions: usize,
    sql: &str,
) -> Result<(), DataFusionError> {
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
    collect(plan, ctx.task_ctx()).await.map(|_| ())
}

/// `copies` copies of `sql` at once on `pool`.
async fn run(pool: Arc<dyn MemoryPool>, copies: usize, partitions: usize, sql: &str) -> Outcome {
    let all =
        futures::future::join_all((0..copies).map(|_| one_query(pool.clone(), partitions, sql)));
    match tokio::time::timeout(Duration::from_secs(60), all).await {
        Err(_) => Outcome::Hung,
        Ok(results) => match results.into_iter().find_map(Result::err) {
            None => Outcome::Ok,
            Some(e) if matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)) => {
                if std::env::var_os("DF_BENCH_VERBOSE").is_some() {
                    eprintln!("{}", e.to_string().lines().next().unwrap_or(""));
                }
                Outcome::Failed
            }
            Some(e) => panic!("query failed: {e}"),
        },
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    for (name, copies, partitions, sql) in QUERIES {
        for (mode, limit) in ["limit", "budget"]
            .into_iter()
            .flat_map(|mode| LIMITS_MIB.map(|l| (mode, l * MIB)))
        {
            // [nativemem failed, hung, FairSpillPool failed, hung]
            let mut counts = [0usize; 4];
            for round in 0..runs {
                // Alternating order: neither pool always runs on a warmer machine.
                for i in 0..2 {
                    let fsp = (round + i) % 2 == 1;
                    let outcome = if fsp {
                        let pool = Arc::new(FairSpillPool::new(limit as usize));
                        run(pool, copies, partitions, sql).await
                    } else {
                        let (l, task_limit) = if mode == "limit" {
                            (CapacityListener::unlimited(), Some(limit))
                        } else {
                            (CapacityListener::new(limit), None)
                        };
                        let l = Arc::new(l);
                        let config = MemoryConfig::default()
                            .with_reservation_block(MIB)
                            .with_task_limit(task_limit);
                        let m = MemoryManager::new("failures", config, l).unwrap();
                        let pool = Arc::new(NativememPool::new(m.pool("datafusion").unwrap()));
                        let outcome = run(pool, copies, partitions, sql).await;
                        // A hung run's tasks may still hold reservations: close reports them.
                        let _ = m.close();
                        outcome
                    };
                    let base = if fsp { 2 } else { 0 };
                    match outcome {
                        Outcome::Ok => {}
                        Outcome::Failed => counts[base] += 1,
                        Outcome::Hung => counts[base + 1] += 1,
                    }
                }
            }
            let [nf, nh, ff, fh] = counts;
            println!(
                "FAILURES {name} {mode} {} {nf} {nh} {ff} {fh} {runs}",
                limit / MIB
            );
        }
    }
}

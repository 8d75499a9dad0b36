//! DataFusion queries on nativemem's pool vs DataFusion's pools with the same limit and the same
//! policy (time, median of rounds in rotating order): `Policy::Greedy` vs `GreedyMemoryPool`
//! (the pool's own cost) and `Policy::FairShare` vs `FairSpillPool`; and the calls each design
//! makes across the boundary:
//! nativemem's listener calls (one per 1 MiB block to Spark) vs one call per `try_grow`, `grow`
//! and `shrink` (Comet's design: each is a JNI call into Spark). Prints `BENCH <key> <value>`
//! lines for scripts/bench.sh.
//!
//!   cargo run --release -p nativemem-datafusion --example df_bench [rounds]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use datafusion::error::DataFusionError;
use datafusion::execution::memory_pool::{
    FairSpillPool, GreedyMemoryPool, MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::{collect, ExecutionPlan};
use datafusion::prelude::{SessionConfig, SessionContext};
use nativemem_core::{CapacityListener, MemoryConfig, MemoryManager};
use nativemem_datafusion::{NativememPool, Policy};

const MIB: u64 = 1 << 20;
const LIMIT: u64 = 64 * MIB;

const QUERIES: [(&str, &str); 2] = [
    (
        "sort",
        "SELECT v FROM (SELECT (value * 7919) % 10000019 AS v FROM generate_series(1, 6000000)) ORDER BY v",
    ),
    (
        "agg",
        "SELECT value % 1000000 AS k, count(*) AS n, sum(value) AS s FROM generate_series(1, 3000000) \
         GROUP BY value % 1000000",
    ),
];

/// A pool that counts the calls a per-call bridge to Spark would make.
#[derive(Debug)]
struct Counting<P> {
    inner: P,
    calls: AtomicU64,
}

impl<P: MemoryPool> std::fmt::Display for Counting<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "counting({})", self.inner)
    }
}

impl<P: MemoryPool> MemoryPool for Counting<P> {
    fn name(&self) -> &str {
        "counting"
    }
    fn register(&self, c: &MemoryConsumer) {
        self.inner.register(c)
    }
    fn unregister(&self, c: &MemoryConsumer) {
        self.inner.unregister(c)
    }
    fn grow(&self, r: &MemoryReservation, n: usize) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.grow(r, n)
    }
    fn shrink(&self, r: &MemoryReservation, n: usize) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.shrink(r, n)
    }
    fn try_grow(&self, r: &MemoryReservation, n: usize) -> datafusion::error::Result<()> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.try_grow(r, n)
    }
    fn reserved(&self) -> usize {
        self.inner.reserved()
    }
    fn memory_limit(&self) -> MemoryLimit {
        self.inner.memory_limit()
    }
}

/// Milliseconds the query took, or `None` if it failed for lack of memory (a first-come pool can
/// starve a consumer that comes late: DataFusion's `GreedyMemoryPool` does at times here).
async fn time_query(pool: Arc<dyn MemoryPool>, sql: &str) -> Option<f64> {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(pool)
        .build_arc()
        .unwrap();
    let ctx =
        SessionContext::new_with_config_rt(SessionConfig::new().with_target_partitions(2), runtime);
    let started = Instant::now();
    let plan = ctx
        .sql(sql)
        .await
        .unwrap()
        .create_physical_plan()
        .await
        .unwrap();
    match collect(plan.clone(), ctx.task_ctx()).await {
        Ok(batches) => {
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            assert!(rows > 0);
            if std::env::var_os("DF_BENCH_VERBOSE").is_some() {
                eprintln!(
                    "{} ms, {} spills",
                    started.elapsed().as_millis(),
                    spills(&plan)
                );
            }
            Some(started.elapsed().as_secs_f64() * 1e3)
        }
        Err(e) if matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)) => None,
        Err(e) => panic!("query failed: {e}"),
    }
}

/// Spills over the whole plan (DataFusion's metrics).
fn spills(plan: &Arc<dyn ExecutionPlan>) -> usize {
    let own = plan.metrics().and_then(|m| m.spill_count()).unwrap_or(0);
    own + plan.children().into_iter().map(spills).sum::<usize>()
}

/// Median of the runs that succeeded (NaN if none did).
fn median(runs: Vec<Option<f64>>) -> f64 {
    let mut v: Vec<f64> = runs.into_iter().flatten().collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    for (name, sql) in QUERIES {
        // 0: nativemem greedy, 1: GreedyMemoryPool, 2: nativemem fair share, 3: FairSpillPool.
        let mut ms: [Vec<Option<f64>>; 4] = Default::default();
        let (mut listener_calls, mut per_call) = (0, 0);
        for round in 0..rounds {
            for i in 0..4 {
                let variant = (round + i) % 4;
                if std::env::var_os("DF_BENCH_VERBOSE").is_some() {
                    eprint!("{name} variant {variant}: ");
                }
                match variant {
                    0 | 2 => {
                        let policy = if variant == 0 {
                            Policy::Greedy
                        } else {
                            Policy::FairShare
                        };
                        let l = Arc::new(CapacityListener::unlimited());
                        let config = MemoryConfig::default()
                            .with_reservation_block(MIB)
                            .with_task_limit(Some(LIMIT));
                        let m = MemoryManager::new("bench", config, l.clone()).unwrap();
                        let pool = Arc::new(NativememPool::with_policy(
                            m.pool("datafusion").unwrap(),
                            policy,
                        ));
                        ms[variant].push(time_query(pool, sql).await);
                        m.close().unwrap();
                        if variant == 0 {
                            listener_calls = l.reserve_calls() + l.unreserve_calls();
                        }
                    }
                    1 => {
                        let pool = Arc::new(Counting {
                            inner: GreedyMemoryPool::new(LIMIT as usize),
                            calls: AtomicU64::new(0),
                        });
                        ms[1].push(time_query(pool.clone(), sql).await);
                        per_call = pool.calls.load(Ordering::Relaxed);
                    }
                    _ => {
                        let pool = Arc::new(FairSpillPool::new(LIMIT as usize));
                        ms[3].push(time_query(pool, sql).await);
                    }
                }
            }
        }
        let failed = ms
            .clone()
            .map(|runs| runs.iter().filter(|r| r.is_none()).count());
        let [nm_greedy, df_greedy, nm_fair, df_fair] = ms.map(median);
        for (variant, n) in ["nativemem", "greedy", "nativemem_fair", "fair"]
            .iter()
            .zip(failed)
        {
            println!("BENCH df_{name}_{variant}_failed {n}");
        }
        println!("BENCH df_{name}_nativemem_ms {nm_greedy:.1}");
        println!("BENCH df_{name}_greedy_ms {df_greedy:.1}");
        println!("BENCH df_{name}_nativemem_fair_ms {nm_fair:.1}");
        println!("BENCH df_{name}_fair_ms {df_fair:.1}");
        println!("BENCH df_{name}_listener_calls {listener_calls}");
        println!("BENCH df_{name}_per_call_calls {per_call}");
    }
    println!("BENCH df_limit_mib {}", LIMIT / MIB);
    println!("BENCH df_rounds {rounds}");
}

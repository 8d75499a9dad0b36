//! The failure matrix (issue 26): how often DataFusion queries fail for lack of memory on
//! nativemem's pool (`Policy::FairShare`, the default) and on DataFusion's `FairSpillPool`, same
//! queries, same limits, `runs` runs each; nativemem's count must never be above
//! `FairSpillPool`'s in any cell.
//!
//! - Queries: sort, GROUP BY, window, `COUNT(DISTINCT)`, two `COUNT(DISTINCT)` sharing one pool,
//!   two sorts on two pools of one task (`FairSpillPool`: one of half the limit each), a
//!   sort-merge join (`tests/support/mod.rs`, the runner `tests/queries.rs` uses too).
//! - Limits: 1/8, 1/4 and 1/2 of each query's unbounded peak (measured first, in the same run).
//! - nativemem with a task limit and budget-only (no task limit, Spark grants at most the limit:
//!   Spark's default), each with spill requests off and on.
//! - Each run is time-bounded (60 s): one that does not return (DataFusion 55.2 can park every
//!   worker, apache/datafusion#24883) counts as hung, apart; results are checked against the
//!   unbounded run, and every byte must be back afterwards (pools, task, Spark's reservation).
//!
//! Prints `PEAK <query> <unbounded bytes>` and `FAILURES <query> <limit|budget> <requests on|off>
//! <limit bytes> <1/8|1/4|1/2> <nativemem failed> <nativemem hung> <FairSpillPool failed>
//! <FairSpillPool hung> <runs>` lines for scripts/bench.sh. `DF_FAIL_QUERIES=window,sort` runs
//! only the queries named, `DF_FAIL_LIMITS=4,2` only those fractions of the peak (1/4, 1/2).
//!
//!   cargo run --release -p nativemem-datafusion --example df_failures [runs]

#[path = "../tests/support/mod.rs"]
mod support;

use support::{matrix_row, unbounded, NATIVEMEM_MODES, QUERIES};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let only = std::env::var("DF_FAIL_QUERIES").ok();
    let wanted = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|w| w == name))
    };
    let dens: Vec<u64> = std::env::var("DF_FAIL_LIMITS")
        .ok()
        .map(|l| l.split(',').filter_map(|d| d.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![8, 4, 2]);
    for q in QUERIES.iter().filter(|q| wanted(q.name)) {
        let (peak, expected) = unbounded(q).await;
        println!("PEAK {} {peak}", q.name);
        for &den in &dens {
            let limit = peak / den;
            let cells = matrix_row(q, limit, &NATIVEMEM_MODES, runs, Some(expected)).await;
            for ((mode, requests), c) in NATIVEMEM_MODES.iter().zip(cells) {
                println!(
                    "FAILURES {} {} {} {limit} 1/{den} {} {} {} {} {}",
                    q.name,
                    mode.name(),
                    if *requests { "on" } else { "off" },
                    c.nativemem_failed,
                    c.nativemem_hung,
                    c.fsp_failed,
                    c.fsp_hung,
                    c.runs
                );
            }
        }
    }
}

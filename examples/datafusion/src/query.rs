//! The queries the engine runs, and what a run reports: rows, a digest to compare runs, and
//! DataFusion's spill metrics.

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::Int64Type;
use datafusion::error::Result;
use datafusion::execution::memory_pool::MemoryPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::{execute_stream, ExecutionPlan};
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::StreamExt;

/// A query over data DataFusion generates (`generate_series(1, rows)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// `ORDER BY` of `rows` pseudo-random values (spills in the sort); the digest depends on the
    /// order.
    OrderBy,
    /// `GROUP BY` into `rows / 3` groups with `count` and `sum` (spills in the aggregation); the
    /// digest does not depend on the order.
    GroupBy,
}

impl Query {
    /// The query for Java's code (0: ORDER BY, 1: GROUP BY).
    pub fn from_code(code: i32) -> Option<Query> {
        match code {
            0 => Some(Query::OrderBy),
            1 => Some(Query::GroupBy),
            _ => None,
        }
    }

    fn sql(self, rows: u64) -> String {
        match self {
            Query::OrderBy => format!(
                "SELECT v FROM (SELECT (value * 7919) % 10000019 AS v \
                 FROM generate_series(1, {rows})) ORDER BY v"
            ),
            Query::GroupBy => {
                let groups = (rows / 3).max(1);
                format!(
                    "SELECT value % {groups} AS k, count(*) AS n, sum(value) AS s \
                     FROM generate_series(1, {rows}) GROUP BY value % {groups}"
                )
            }
        }
    }
}

/// What a finished query produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Rows returned.
    pub rows: u64,
    /// Order-sensitive (ORDER BY) or order-insensitive (GROUP BY) checksum of every cell.
    pub digest: u64,
    /// Spills over the whole plan (DataFusion's metrics).
    pub spill_count: u64,
    /// Bytes spilled over the whole plan (DataFusion's metrics).
    pub spilled_bytes: u64,
}

/// Runs `query` to the end on `pool` with `partitions` target partitions, folding the output
/// into an [`Outcome`] batch by batch (the result is never held whole).
pub async fn run(
    pool: Arc<dyn MemoryPool>,
    query: Query,
    rows: u64,
    partitions: usize,
) -> Result<Outcome> {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(pool)
        .build_arc()?;
    let config = SessionConfig::new()
        .with_target_partitions(partitions)
        // The sort's merge reserve: 2 MiB instead of 10, so small task budgets still sort.
        .with_sort_spill_reservation_bytes(2 << 20);
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    let plan = ctx
        .sql(&query.sql(rows))
        .await?
        .create_physical_plan()
        .await?;
    let mut stream = execute_stream(plan.clone(), ctx.task_ctx())?;
    let mut out = Outcome {
        digest: if query == Query::OrderBy {
            0xcbf2_9ce4_8422_2325
        } else {
            0
        },
        ..Outcome::default()
    };
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        out.rows += batch.num_rows() as u64;
        for row in 0..batch.num_rows() {
            let mut h: u64 = 0;
            for col in batch.columns() {
                let v = if col.is_null(row) {
                    u64::MAX
                } else {
                    col.as_primitive::<Int64Type>().value(row) as u64
                };
                h = h.wrapping_mul(0x0100_0000_01b3).wrapping_add(v);
            }
            out.digest = match query {
                Query::OrderBy => (out.digest ^ h).wrapping_mul(0x0100_0000_01b3),
                Query::GroupBy => out
                    .digest
                    .wrapping_add(h.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            };
        }
    }
    let (count, bytes) = spills(&plan);
    out.spill_count = count;
    out.spilled_bytes = bytes;
    Ok(out)
}

/// Spill count and bytes over the whole plan.
fn spills(plan: &Arc<dyn ExecutionPlan>) -> (u64, u64) {
    let (mut count, mut bytes) = plan
        .metrics()
        .map(|m| {
            (
                m.spill_count().unwrap_or(0) as u64,
                m.spilled_bytes().unwrap_or(0) as u64,
            )
        })
        .unwrap_or((0, 0));
    for child in plan.children() {
        let (c, b) = spills(child);
        count += c;
        bytes += b;
    }
    (count, bytes)
}

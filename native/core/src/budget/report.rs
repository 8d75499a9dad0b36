//! Read-outs for people: the usage report and the out-of-memory error that carries it.

use crate::sync::Ordering;

use super::Budget;
use crate::error::{MemoryError, OomReason, OutOfMemory};
use crate::report::{ConsumerUsage, PoolUsage, UsageReport};
use crate::tree::PoolNode;

impl Budget {
    pub(super) fn oom(
        &self,
        consumer: &str,
        node: &PoolNode,
        bytes: u64,
        reason: OomReason,
    ) -> MemoryError {
        let err = OutOfMemory {
            consumer: consumer.to_string(),
            pool: node.path.clone(),
            requested: bytes,
            reason,
            report: self.usage_report(),
        };
        // The caller gets the error (with the report); this is for tracing only.
        log::debug!("[{}] out of memory: {err}", self.name);
        err.into()
    }

    /// A snapshot of the pool tree and the largest consumers. Every read is `Relaxed`: a report
    /// is statistics, not a consistent cut (counters move while it is built).
    pub(crate) fn usage_report(&self) -> UsageReport {
        let mut nodes = Vec::new();
        self.root.walk(0, &mut nodes);
        let mut consumers: Vec<ConsumerUsage> = self
            .consumers
            .lock()
            .values()
            .map(|c| ConsumerUsage {
                name: c.name.clone(),
                pool: c.node.path.clone(),
                // Relaxed (both): report statistics (see above).
                used: c.size.load(Ordering::Relaxed),
                peak: c.peak.load(Ordering::Relaxed),
            })
            .collect();
        let pools: Vec<PoolUsage> = nodes
            .iter()
            .map(|(depth, n)| PoolUsage {
                path: n.path.clone(),
                depth: *depth,
                used: n.used(),
                peak: n.peak(),
                limit: n.limit,
                // Relaxed: report statistics (see above).
                allocated: n.alloc.size.load(Ordering::Relaxed),
            })
            .collect();
        consumers.extend(
            pools
                .iter()
                .filter(|p| p.allocated > 0)
                .map(|p| ConsumerUsage {
                    name: "allocations".to_string(),
                    pool: p.path.clone(),
                    used: p.allocated,
                    peak: p.allocated,
                }),
        );
        consumers.retain(|c| c.used > 0);
        consumers.sort_by(|a, b| b.used.cmp(&a.used).then_with(|| a.name.cmp(&b.name)));
        consumers.truncate(UsageReport::TOP_CONSUMERS);
        UsageReport {
            manager: self.name.clone(),
            used: self.root.used(),
            peak: self.root.peak(),
            reserved: self.reserved(),
            task_limit: self.config.task_limit,
            reservation_block: self.config.reservation_block,
            // Relaxed (both): report statistics (see above).
            spill_count: self.counters.spill_count.load(Ordering::Relaxed),
            spilled_bytes: self.counters.spilled_bytes.load(Ordering::Relaxed),
            spill_written_bytes: self.counters.spill_written_bytes.load(Ordering::Relaxed),
            overcommitted: self.overcommitted(),
            overcommitted_total: self.counters.overcommitted_total.load(Ordering::Relaxed),
            pools,
            top_consumers: consumers,
        }
    }
}

//! Close: free leaked allocations, uncharge what reservations still hold, hand everything back
//! (edge 5 of the module docs); and close on drop.

use crate::sync::Ordering;
use std::sync::Arc;

use super::{Budget, ConsumerState};
use crate::error::Result;
use crate::report::{LeakKind, LeakReport};

impl Budget {
    /// Closes: see `MemoryManager::close`.
    pub(crate) fn close(&self) -> Result<LeakReport> {
        let mut report = LeakReport {
            manager: self.name.clone(),
            ..LeakReport::default()
        };
        // SeqCst: edge 5 (the root read that must follow is in `cushion`, via `release_unused`).
        // Nothing else is published through the flag: close does its work after setting it.
        if self.closed.swap(true, Ordering::SeqCst) {
            // Already closed: only retry handing back what a failing listener kept.
            report.returned_to_listener = self.release_unused(u64::MAX)?;
            return Ok(report);
        }
        self.spillers.clear();
        // Allocations: each pool's live bytes and blocks (raw and owned) are counted on the pool,
        // so the report is exact without visiting the heap. Their accounting is released here;
        // the raw blocks' memory goes back when the heap is destroyed (the budget's drop), owned
        // blocks' when their `Allocation` drops (see `heap`).
        let quantum = self.config.reservation_quantum > 0;
        let mut nodes = Vec::new();
        self.root.walk(0, &mut nodes);
        for (_, n) in nodes {
            let a = &n.alloc;
            // SeqCst: edge 6 and edge 4, as for a reservation's counters below; in exact mode it
            // pairs with `alloc_release` (each byte uncharged once).
            let bytes = a.size.swap(0, Ordering::SeqCst);
            let charged = a.charged.swap(0, Ordering::SeqCst);
            let in_pools = if quantum { charged } else { bytes };
            if in_pools > 0 {
                n.uncharge(in_pools);
            }
            // Relaxed (all): report statistics (see `Budget::allocate`).
            let count = a.count.swap(0, Ordering::Relaxed);
            let owned = a.owned.swap(0, Ordering::Relaxed).min(bytes);
            let owned_count = a.owned_count.swap(0, Ordering::Relaxed).min(count);
            if owned_count > 0 {
                report.add_n(
                    LeakKind::HeldAllocation,
                    "allocations",
                    &n.path,
                    owned,
                    owned_count,
                );
            }
            if count > owned_count {
                report.add_n(
                    LeakKind::Allocation,
                    "allocations",
                    &n.path,
                    bytes - owned,
                    count - owned_count,
                );
            }
        }
        let consumers: Vec<Arc<ConsumerState>> = self.consumers.lock().values().cloned().collect();
        for c in consumers {
            // Acquire (exact mode) / SeqCst (quantum mode, edge 6): the pool charge behind these
            // bytes comes before the uncharge (edge 4).
            let bytes = c.size.swap(0, Ordering::SeqCst);
            // In quantum mode the pools carry `charged` (held + slack); 0 in exact mode.
            let charged = c.charged.swap(0, Ordering::SeqCst);
            let in_pools = if c.quantum == 0 { bytes } else { charged };
            if in_pools > 0 {
                c.node.uncharge(in_pools);
            }
            if bytes > 0 {
                report.add(LeakKind::Reservation, &c.name, &c.node.path, bytes);
            }
        }
        if !report.is_empty() {
            log::warn!("[{}] {report}", self.name);
        }
        report.returned_to_listener = self.release_unused(u64::MAX)?;
        Ok(report)
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        // Relaxed: `&mut self`; dropping the last `Arc` already ordered every other handle's
        // use before this point.
        if !self.closed.load(Ordering::Relaxed) {
            if let Err(e) = self.close() {
                log::error!("[{}] closing on drop: {e}", self.name);
            }
        }
        // The pool tree is a reference cycle (see `tree`): break it, or every pool below the
        // root outlives the manager. No block header is read after this: no handle is left to
        // free through, and the heap (a field) is destroyed right after, without reading them.
        self.root.dismantle();
    }
}

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
        let quantum = self.config.reservation_quantum > 0;
        for (addr, meta) in self.allocs.drain() {
            let size = meta.layout.size() as u64;
            if !quantum {
                // Quantum mode: the pools carry each pool's allocation `charged`, taken below.
                meta.node().uncharge(size);
            }
            if meta.owned {
                // Its `Allocation` value still owns the memory and frees it when dropped.
                report.add(
                    LeakKind::HeldAllocation,
                    "allocations",
                    &meta.node().path,
                    size,
                );
                continue;
            }
            // SAFETY: every unowned table entry is a live block from
            // `std::alloc::alloc(meta.layout)`; draining removed it, so no `free` can find and
            // free it again.
            unsafe { std::alloc::dealloc(addr as *mut u8, meta.layout) };
            report.add(LeakKind::Allocation, "allocations", &meta.node().path, size);
        }
        if quantum {
            let mut nodes = Vec::new();
            self.root.walk(0, &mut nodes);
            for (_, n) in nodes {
                // SeqCst: edge 6 and edge 4, as for a reservation's counters below.
                n.alloc.size.swap(0, Ordering::SeqCst);
                let charged = n.alloc.charged.swap(0, Ordering::SeqCst);
                if charged > 0 {
                    n.uncharge(charged);
                }
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
        // root outlives the manager. After the close: the allocation table is empty, so no entry
        // points to a node this frees.
        self.root.dismantle();
    }
}

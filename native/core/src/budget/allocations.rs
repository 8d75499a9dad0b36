//! Allocations made through a pool (raw, or owned by an `Allocation` value): charged like a grow
//! (on the pool's allocations' slack in quantum mode), counted per pool for close's report, and
//! made in the task's heap (`heap`), whose destruction frees what leaked.

use crate::sync::Ordering;
use std::ptr::NonNull;
use std::sync::Arc;

use super::{Budget, Slack, SlackId, TrimMode};
use crate::error::{MemoryError, OomReason, Result};
use crate::heap::{Refused, HEADER};
use crate::tree::PoolNode;

impl Budget {
    /// Charges an allocation of `bytes` to `node`. Exact mode: a grow of the pools. Quantum
    /// mode: a grow on the pool's allocations' slack (`PoolNode::alloc`), one RMW and one load
    /// on the pool's own allocation line when it fits, the protocol of a reservation's slack
    /// otherwise (`cover`, edge 6). The pool's allocations are shared by every thread allocating
    /// from it, so there is no exclusive path here.
    #[inline]
    fn alloc_charge(&self, node: &Arc<PoolNode>, bytes: u64) -> Result<()> {
        let a = &node.alloc;
        if self.config.reservation_quantum == 0 {
            self.grow(node, "allocations", bytes)?;
            // SeqCst: pairs with close's swap, which uncharges what it takes from here (so a
            // free racing close uncharges each byte once: see `alloc_release`).
            a.size.fetch_add(bytes, Ordering::SeqCst);
            return Ok(());
        }
        // SeqCst (both): edge 6, as in `Reservation::try_grow`.
        let now = a.size.fetch_add(bytes, Ordering::SeqCst) + bytes;
        if now <= a.charged.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.cover(
            Slack {
                size: &a.size,
                charged: &a.charged,
                node,
                consumer: "allocations",
                owner: SlackId::Allocations(Arc::as_ptr(node) as usize),
            },
            bytes,
        )
        .map(|_| ())
    }

    /// Takes back the bytes of a freed allocation (the counterpart of `alloc_charge`). Quantum
    /// mode: they become the pool's allocation slack; beyond two quanta it goes back to the pools
    /// (down to one quantum), as a reservation's shrink does.
    #[inline]
    fn alloc_release(&self, node: &PoolNode, bytes: u64) -> Result<()> {
        let a = &node.alloc;
        // Saturating: a racing `close` may have taken (and uncharged) the bytes. SeqCst on
        // success: as in `alloc_charge` (exact mode); edge 4 (the charge before the uncharge a
        // trim makes) and edge 6 (quantum mode). Relaxed on failure: the value only feeds the
        // next attempt.
        let prev = a
            .size
            .fetch_update(Ordering::SeqCst, Ordering::Relaxed, |cur| {
                Some(cur.saturating_sub(bytes))
            })
            .unwrap_or(0);
        if self.config.reservation_quantum == 0 {
            // Uncharge only what was still counted.
            let taken = prev.min(bytes);
            return if taken > 0 {
                self.release(node, taken)
            } else {
                Ok(())
            };
        }
        let left = prev.saturating_sub(bytes);
        self.trim_surplus(&a.size, &a.charged, node, left, TrimMode::Release)
    }

    /// Allocates a block of the task's heap charged to `node`; `owned` blocks belong to an
    /// [`Allocation`](crate::Allocation) value (see `heap`).
    #[inline]
    pub(crate) fn allocate(
        &self,
        node: &Arc<PoolNode>,
        size: usize,
        align: usize,
        owned: bool,
    ) -> Result<NonNull<u8>> {
        let too_big = size
            .checked_add(align)
            .and_then(|t| t.checked_add(HEADER))
            .is_none_or(|t| t > isize::MAX as usize);
        if !align.is_power_of_two() || too_big {
            return Err(MemoryError::InvalidArgument(format!(
                "cannot allocate {size} bytes aligned to {align}: alignment must be a power of two and the size fit in isize"
            )));
        }
        if size == 0 {
            return Err(MemoryError::InvalidArgument(
                "cannot allocate 0 bytes".to_string(),
            ));
        }
        self.alloc_charge(node, size as u64)?;
        let a = &node.alloc;
        // Relaxed (all): statistics for close's report and the stats; the bytes that matter for
        // accounting (`size`) went through `alloc_charge`.
        a.count.fetch_add(1, Ordering::Relaxed);
        if owned {
            a.owned.fetch_add(size as u64, Ordering::Relaxed);
            a.owned_count.fetch_add(1, Ordering::Relaxed);
        }
        let Some(ptr) = self.heap.alloc(Arc::as_ptr(node), size, align, owned) else {
            self.uncount(node, size as u64, owned);
            if let Err(e) = self.alloc_release(node, size as u64) {
                log::warn!("[{}] releasing a failed allocation: {e}", self.name);
            }
            return Err(self.oom("allocations", node, size as u64, OomReason::SystemAllocator));
        };
        Ok(ptr)
    }

    #[inline]
    fn uncount(&self, node: &PoolNode, bytes: u64, owned: bool) {
        let a = &node.alloc;
        // Relaxed, saturating (all): statistics (see `allocate`); a racing close may have zeroed
        // them.
        let dec = |c: &crate::sync::AtomicU64, by: u64| {
            let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(by))
            });
        };
        dec(&a.count, 1);
        if owned {
            dec(&a.owned, bytes);
            dec(&a.owned_count, 1);
        }
    }

    #[inline]
    pub(crate) fn free(&self, ptr: NonNull<u8>) -> Result<usize> {
        let addr = ptr.as_ptr() as usize;
        // After close every raw block is leaked and reported: its memory belongs to the heap,
        // which frees it when destroyed, so a late free is refused like any unknown pointer.
        if self.is_closed() {
            return Err(MemoryError::UnknownAllocation {
                addr,
                manager: self.name.clone(),
            });
        }
        let block = match self.heap.take(addr, false) {
            Ok(b) => b,
            Err(Refused::Owned) => {
                return Err(MemoryError::InvalidArgument(format!(
                    "pointer {addr:#x} belongs to an Allocation value, which frees it when dropped"
                )))
            }
            Err(Refused::Unknown | Refused::Freed) => {
                return Err(MemoryError::UnknownAllocation {
                    addr,
                    manager: self.name.clone(),
                })
            }
        };
        // SAFETY: the header names the node `allocate` charged, a node of this budget's tree,
        // which stays alive as long as the budget (taken apart only in `Budget::drop`).
        let node = unsafe { &*block.node };
        self.uncount(node, block.size, false);
        let released = self.alloc_release(node, block.size);
        self.heap.release_block(&block);
        released?;
        Ok(block.size as usize)
    }

    /// Frees the block of a dropped [`Allocation`](crate::Allocation). After close (which
    /// released its accounting) the accounting is left alone; the memory is freed either way.
    pub(crate) fn free_owned(&self, ptr: NonNull<u8>) {
        let addr = ptr.as_ptr() as usize;
        match self.heap.take(addr, true) {
            Ok(block) => {
                // SAFETY: as in `free`.
                let node = unsafe { &*block.node };
                self.uncount(node, block.size, true);
                if let Err(e) = self.alloc_release(node, block.size) {
                    log::warn!("[{}] freeing an allocation: {e}", self.name);
                }
                self.heap.release_block(&block);
            }
            Err(_) => log::error!(
                "[{}] an owned allocation at {addr:#x} has a damaged header; its memory stays with the heap",
                self.name
            ),
        }
    }
}

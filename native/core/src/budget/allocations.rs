//! Allocations made through a pool (raw, or owned by an `Allocation` value): charged like a grow
//! (on the pool's allocations' slack in quantum mode) and recorded so `close` can free leaks.

use crate::sync::Ordering;
use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::Arc;

use super::{Budget, Slack, SlackId, TrimMode};
use crate::alloc::{AllocMeta, Take};
use crate::error::{MemoryError, OomReason, Result};
use crate::tree::PoolNode;

impl Budget {
    /// Charges an allocation of `bytes` to `node`. Exact mode: a grow of the pools. Quantum
    /// mode: a grow on the pool's allocations' slack (`PoolNode::alloc`), one RMW and one load
    /// on the pool's own allocation line when it fits, the protocol of a reservation's slack
    /// otherwise (`cover`, edge 6). The pool's allocations are shared by every thread allocating
    /// from it, so there is no exclusive path here.
    #[inline]
    fn alloc_charge(&self, node: &Arc<PoolNode>, bytes: u64) -> Result<()> {
        if self.config.reservation_quantum == 0 {
            return self.grow(node, "allocations", bytes);
        }
        let a = &node.alloc;
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
        let q = self.config.reservation_quantum;
        if q == 0 {
            return self.release(node, bytes);
        }
        let a = &node.alloc;
        // SeqCst on success: edge 4 (the charge before the uncharge a trim makes) and edge 6.
        // Saturating: a racing `close` may have emptied it. Relaxed on failure: the value only
        // feeds the next attempt.
        let prev = a
            .size
            .fetch_update(Ordering::SeqCst, Ordering::Relaxed, |cur| {
                Some(cur.saturating_sub(bytes))
            })
            .unwrap_or(0);
        let left = prev.saturating_sub(bytes);
        self.trim_surplus(&a.size, &a.charged, node, left, TrimMode::Release)
    }

    /// Allocates and records a block charged to `node`; `owned` blocks belong to an
    /// [`Allocation`](crate::Allocation) value (see `AllocMeta::owned`).
    pub(crate) fn allocate(
        &self,
        node: &Arc<PoolNode>,
        size: usize,
        align: usize,
        owned: bool,
    ) -> Result<(NonNull<u8>, Layout)> {
        let layout = Layout::from_size_align(size, align).map_err(|_| {
            MemoryError::InvalidArgument(format!(
                "cannot allocate {size} bytes aligned to {align}: alignment must be a power of two and the size fit in isize"
            ))
        })?;
        if size == 0 {
            return Err(MemoryError::InvalidArgument(
                "cannot allocate 0 bytes".to_string(),
            ));
        }
        self.alloc_charge(node, size as u64)?;
        // SAFETY: `layout` has a non-zero size (checked above) and a valid power-of-two alignment
        // (checked by `Layout::from_size_align`).
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            if let Err(e) = self.alloc_release(node, size as u64) {
                log::warn!("[{}] releasing a failed allocation: {e}", self.name);
            }
            return Err(self.oom("allocations", node, size as u64, OomReason::SystemAllocator));
        };
        self.allocs
            .insert(ptr.as_ptr() as usize, AllocMeta::new(layout, node, owned));
        Ok((ptr, layout))
    }

    pub(crate) fn free(&self, ptr: NonNull<u8>) -> Result<usize> {
        let addr = ptr.as_ptr() as usize;
        let meta = match self.allocs.take_unowned(addr) {
            Take::Taken(meta) => meta,
            Take::Owned => {
                return Err(MemoryError::InvalidArgument(format!(
                    "pointer {addr:#x} belongs to an Allocation value, which frees it when dropped"
                )))
            }
            Take::Missing => {
                return Err(MemoryError::UnknownAllocation {
                    addr,
                    manager: self.name.clone(),
                })
            }
        };
        // SAFETY: the pointer was returned by `std::alloc::alloc(meta.layout)` in `allocate` and
        // was still in the live table, which we just removed it from, so it is freed exactly once.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), meta.layout) };
        let size = meta.layout.size() as u64;
        self.alloc_release(meta.node(), size)?;
        Ok(size as usize)
    }

    /// Frees the block of a dropped [`Allocation`](crate::Allocation). If `close` already
    /// released its accounting (the entry is gone), only the memory is freed.
    pub(crate) fn free_owned(&self, ptr: NonNull<u8>, layout: Layout) {
        let meta = self.allocs.remove(ptr.as_ptr() as usize);
        // SAFETY: `ptr` came from `std::alloc::alloc(layout)` in `allocate` and is owned by the
        // `Allocation` being dropped, the only code that frees owned blocks.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
        if let Some(meta) = meta {
            if let Err(e) = self.alloc_release(meta.node(), layout.size() as u64) {
                log::warn!("[{}] freeing an allocation: {e}", self.name);
            }
        }
    }
}

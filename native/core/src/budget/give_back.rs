//! Releases and the hand-back: what a release leaves in the cushion, and how surplus cushion goes
//! back to the listener under a claim on the root (edges 1 to 3 and 5 of the module docs).

use crate::sync::Ordering;

use super::Budget;
use crate::error::{MemoryError, Result};
use crate::tree::PoolNode;
use crate::units::human;

impl Budget {
    /// The unused part of `reserved` now (0 while in-flight grows exceed it).
    pub(crate) fn cushion(&self) -> u64 {
        // SeqCst: `close` reads the root here after setting `closed` (edge 5); elsewhere it is
        // as cheap as Acquire (`ldar` on aarch64), which edge 1 would need anyway.
        let used = self.root.used.load(Ordering::SeqCst);
        // Acquire: a hand-back sized on a grant comes after the charge it covers (edge 3).
        self.reserved.load(Ordering::Acquire).saturating_sub(used)
    }

    /// Returns `bytes` charged to `node`: uncharges the pools, which leaves the bytes in the
    /// cushion, and hands surplus back to the listener (hysteresis: only above two blocks, down
    /// to one).
    pub(crate) fn release(&self, node: &PoolNode, bytes: u64) -> Result<()> {
        let root_used = node.uncharge(bytes);
        // SeqCst: pairs with `close` (edge 5): the root uncharge above is SeqCst too.
        if self.closed.load(Ordering::SeqCst) {
            // After close nothing may stay reserved.
            return self.release_unused(u64::MAX).map(|_| ());
        }
        // Relaxed (both): only decide whether to try a hand-back, which re-reads and validates
        // everything (`cushion`, `claim_and_give_back`). `held_spills` is raised on the spilling
        // thread before the spiller runs, so a release the spiller makes (on that thread, or on
        // one it synchronizes with) sees it by coherence; any other release races it anyway.
        if self
            .reserved
            .load(Ordering::Relaxed)
            .saturating_sub(root_used)
            > self.high_water()
            && self.held_spills.load(Ordering::Relaxed) == 0
        {
            self.release_surplus()?;
        }
        Ok(())
    }

    fn high_water(&self) -> u64 {
        self.config.reservation_block.saturating_mul(2)
    }

    /// Hands back cushion above one block when it exceeds two blocks.
    pub(super) fn release_surplus(&self) -> Result<()> {
        loop {
            let cushion = self.cushion();
            if cushion <= self.high_water() {
                return Ok(());
            }
            if self.claim_and_give_back(cushion - self.config.reservation_block)? {
                return Ok(());
            }
        }
    }

    /// Hands back up to `max` bytes of the cushion; returns bytes handed back.
    pub(crate) fn release_unused(&self, max: u64) -> Result<u64> {
        loop {
            let give = self.cushion().min(max);
            if give == 0 {
                return Ok(0);
            }
            if self.claim_and_give_back(give)? {
                return Ok(give);
            }
        }
    }

    /// Hands `bytes` of the cushion back to the listener. First claims them on the root counter
    /// (bypassing limits) and checks they are really unused; returns `Ok(false)` if another
    /// thread took them meanwhile (the caller recomputes). The claim is dropped only after
    /// `reserved` went down, so a concurrent grow never counts these bytes as available. If the
    /// listener fails, the bytes stay reserved (back in the cushion) and the error is returned.
    fn claim_and_give_back(&self, bytes: u64) -> Result<bool> {
        let root = &self.root.used;
        crate::sync::test_point("claim:sized");
        // Relaxed: published by the Release of the root RMW just below (edge 2).
        self.claims.fetch_add(bytes, Ordering::Relaxed);
        // AcqRel: Release publishes the claim count to refused grows (edge 2); Acquire orders the
        // `reserved` read below after every hand-back this value no longer includes (edge 1).
        let claimed = root.fetch_add(bytes, Ordering::AcqRel) + bytes;
        crate::sync::test_point("claim:claimed");
        // Acquire: the listener has seen every grant counted here before this unreserve
        // (edge 3).
        let reserved = self.reserved.load(Ordering::Acquire);
        // The root as it is now, read after `reserved` (as in `grow`): a grant that `reserved`
        // includes may have been asked for a charge made after this claim, which the claim's
        // own value does not include; handing back against it would give away used bytes.
        // Acquire: sees the charge behind every grant the load above includes.
        let root_now = root.load(Ordering::Acquire).max(claimed);
        if root_now > reserved {
            // Relaxed (both): undoes this thread's own claim; nothing else changed to publish.
            root.fetch_sub(bytes, Ordering::Relaxed);
            self.claims.fetch_sub(bytes, Ordering::Relaxed);
            return Ok(false);
        }
        // Relaxed: a statistic.
        self.counters
            .unreserve_calls
            .fetch_add(1, Ordering::Relaxed);
        // No lock is held here (lock rule).
        let result = crate::error::contain(|| self.listener.unreserve(bytes));
        if result.is_ok() {
            // Release: a thread that acquires the lower `reserved` (edge 3 readers) also sees the
            // listener's side of the hand-back. (Edge 1 is carried by the root RMW below.)
            self.reserved.fetch_sub(bytes, Ordering::Release);
        }
        // Release: edge 1, the un-claim comes after `reserved` went down.
        root.fetch_sub(bytes, Ordering::Release);
        // Relaxed: a grow reads `claims` only after an Acquire read of the root (edge 2); a stale
        // higher count only makes a refused grow retry.
        self.claims.fetch_sub(bytes, Ordering::Relaxed);
        match result {
            Ok(()) => {
                log::trace!("[{}] unreserved {}", self.name, human(bytes));
                Ok(true)
            }
            Err(source) => Err(MemoryError::Listener {
                op: "unreserve",
                bytes,
                source,
            }),
        }
    }
}

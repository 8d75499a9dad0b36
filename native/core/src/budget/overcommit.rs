//! Forced charges: code that cannot fail or call out (a global allocator's flush) charges at
//! once, and what the cushion does not cover is over-commit, paid by the next fallible grow.

use crate::sync::Ordering;
use std::sync::Arc;

use super::{saturating_add, Budget, MAX_REQUEST_BYTES};
use crate::error::{MemoryError, Result};
use crate::tree::PoolNode;

impl Budget {
    /// Charges `bytes` to `node` (and ancestors) at once, whatever the limits and the cushion:
    /// never calls the listener or a spiller, takes no lock and never waits (a few atomics). What
    /// the cushion does not cover is **over-commit**: counted (`overcommitted`, the usage
    /// report), and paid by the next fallible grow of the task that reaches the listener (it
    /// reserves the over-commit with its own bytes, or spills, or fails); a pool pushed over its
    /// limit refuses grows until enough is released. Returns the over-committed part of `bytes`.
    ///
    /// For code that cannot fail or call out: a global allocator's flush (`nativemem-track`).
    /// Errors only if the manager is closed or `bytes` is above [`MAX_REQUEST_BYTES`] (nothing is
    /// charged then).
    pub(crate) fn force_grow(&self, node: &Arc<PoolNode>, bytes: u64) -> Result<u64> {
        if bytes > MAX_REQUEST_BYTES {
            return Err(MemoryError::InvalidArgument(format!(
                "forced charge of {bytes} bytes exceeds the maximum of {MAX_REQUEST_BYTES} bytes"
            )));
        }
        self.check_open()?;
        // The root as this charge left it (the RMW acquires), then `reserved` (Acquire), in that
        // order: a hand-back lowers `reserved` before it un-claims the root, so if this root value
        // is past the un-claim, the `reserved` read after it is past the lowering; read the other
        // way round, a racing hand-back could pair a `reserved` not yet lowered with a root
        // already un-claimed and under-count the over-commit. A grant that `reserved` includes
        // for a later grow's charge covers this charge too (that grow's root included it).
        let root_now = node.force_charge(bytes);
        let reserved = self.reserved.load(Ordering::Acquire);
        let uncovered = root_now.saturating_sub(reserved).min(bytes);
        if uncovered > 0 {
            // Relaxed (all): a hint and statistics (see `overcommit`, `Counters`).
            let owed = self.overcommit.fetch_add(uncovered, Ordering::Relaxed) + uncovered;
            saturating_add(&self.counters.overcommitted_total, uncovered);
            let now = owed.min(root_now.saturating_sub(reserved));
            self.counters
                .overcommit_peak
                .fetch_max(now, Ordering::Relaxed);
        }
        node.confirm(bytes);
        Ok(uncovered)
    }

    /// Reserves from the listener, now, the over-commit the reserve does not cover (whatever
    /// the task limit: the bytes are in use already), so that the listener's owner (Spark) sees
    /// it at once rather than at the next grow that reaches the listener, which a task held over
    /// its limit by the over-commit never makes. For code that forced a grow but may call out
    /// (DataFusion's infallible `grow`, `nativemem-datafusion`). Returns the bytes granted; what
    /// the listener does not grant stays over-commit. Calls the listener with no lock held.
    pub(crate) fn cover_overcommit(&self) -> Result<u64> {
        self.check_open()?;
        let owed = self.overcommitted();
        if owed == 0 {
            return Ok(0);
        }
        let (_, granted) = self.reserve_from_listener(owed)?;
        self.paid_overcommit(granted);
        Ok(granted)
    }

    /// Takes back `bytes` charged to `node` without calling the listener: the bytes go to the
    /// cushion, and are handed back by the next release that finds surplus, by Spark's reclaim
    /// or by `close`. The counterpart of `force_grow` for code that must not call out.
    ///
    /// If `close` runs concurrently the bytes may stay reserved in the closed manager until
    /// `close` is called again (it is idempotent and retries the hand-back); close is meant to
    /// run when no other thread uses the manager.
    pub(crate) fn release_quiet(&self, node: &PoolNode, bytes: u64) {
        node.uncharge(bytes);
    }

    /// Over-commit now: bytes charged by `force_grow` beyond the reserve and not yet paid for or
    /// released. Exact when no grow is in flight.
    pub(crate) fn overcommitted(&self) -> u64 {
        // Relaxed (all): a read-out (see `overcommit`).
        let uncovered = self
            .root
            .used
            .load(Ordering::Relaxed)
            .saturating_sub(self.reserved.load(Ordering::Relaxed));
        self.overcommit.load(Ordering::Relaxed).min(uncovered)
    }

    /// A grow's grant paid `bytes` of over-commit.
    pub(super) fn paid_overcommit(&self, bytes: u64) {
        // Relaxed: a hint (see `overcommit`); saturating, since releases may have covered part.
        let _ = self
            .overcommit
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(bytes))
            });
    }
}

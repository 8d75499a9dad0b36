//! Quantum mode: a reservation's (or a pool's allocations') `charged` runs ahead of its `size`;
//! the difference is slack. Covering a grow on it, and trimming it back (edge 6 of the module docs).

use crate::sync::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{Budget, ConsumerState};
use crate::error::Result;
use crate::tree::PoolNode;

/// Quantum mode: the quantum of a slack (a reservation's, a pool's allocations') holding `size`
/// bytes, with `q` configured. It grows with what is held, like Velox's (1, 4, 8 MiB): 1/16 of the
/// size rounded up to a power of two, between `q` and `8 * q`. So the slack (below two of its
/// quanta) stays under `max(2 * q, size / 4)` and never above `16 * q`, while a large reservation
/// growing in small steps charges its pools rarely.
pub(crate) fn quantum_for(q: u64, size: u64) -> u64 {
    (size / 16)
        .checked_next_power_of_two()
        .unwrap_or(u64::MAX)
        .clamp(q, q.saturating_mul(8))
}

/// How [`Budget::trim`] returns slack to the pools.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum TrimMode {
    /// Like a release: surplus cushion beyond the hysteresis band goes back to the listener.
    Release,
    /// The bytes stay in the cushion (for a grow that wants them, for `reclaim`, which hands
    /// back exactly, and for forced shrinks, which must not call out).
    Quiet,
}

impl Budget {
    /// Quantum mode, the slow path of a grow on slack (a reservation's, or a pool's allocations'):
    /// `size` was raised by `bytes` above `charged`. Takes the bytes back out (so reports and
    /// errors never show bytes in flight), charges the pools for the need rounded up to the
    /// quantum (the need alone if that does not fit), then grows on the new slack; on error
    /// nothing changes. Returns the size this grow left (for the peak).
    pub(crate) fn cover(&self, slack: Slack<'_>, bytes: u64) -> Result<u64> {
        let Slack { size, charged, .. } = slack;
        // SeqCst (all accesses below): edge 6, as in `Reservation::try_grow`.
        take_back(size, bytes);
        // Bounds the retries after a refusal (below): strictly decreasing.
        let mut refused_need = u64::MAX;
        loop {
            let have = charged.load(Ordering::SeqCst);
            let wanted = size.load(Ordering::SeqCst) + bytes;
            if wanted <= have {
                // Fits now (another thread charged, or the first try raced a shrink).
                let now = size.fetch_add(bytes, Ordering::SeqCst) + bytes;
                if now <= charged.load(Ordering::SeqCst) {
                    return Ok(now);
                }
                take_back(size, bytes);
                continue;
            }
            let need = wanted - have;
            let quantum = quantum_for(self.config.reservation_quantum, wanted);
            let rounded = wanted
                .div_ceil(quantum)
                .checked_mul(quantum)
                .map_or(need, |target| target - have);
            let charged_now = match self.grow_at_least(
                slack.node,
                slack.consumer,
                rounded,
                need,
                bytes,
                Some(slack.owner),
            ) {
                Ok(charged_now) => charged_now,
                Err(e) => {
                    // The refused charge may have spilled this very slack's owner (a sorter
                    // whose chunks are allocations of the pool it grows in): what it freed is
                    // now slack the pools still hold, which covers the grow or lowers its need,
                    // and exact accounting would have succeeded. Retry while the need shrinks
                    // (below every need seen at a refusal before, so this ends); otherwise the
                    // refusal stands (nothing changed).
                    let need_now = (size.load(Ordering::SeqCst) + bytes)
                        .saturating_sub(charged.load(Ordering::SeqCst));
                    if need_now < need.min(refused_need) {
                        refused_need = need_now;
                        continue;
                    }
                    // An earlier round may have charged for this grow, and other grows of the
                    // slack took part of it since: what the refused grow leaves above the
                    // slack's bound goes back as a free's would (quietly: no upcall on a refusal),
                    // or the pools would show it until the slack's next release.
                    let left = size.load(Ordering::SeqCst);
                    if let Err(trim) =
                        self.trim_surplus(size, charged, slack.node, left, TrimMode::Quiet)
                    {
                        log::warn!("[{}] trimming after a refused grow: {trim}", self.name);
                    }
                    return Err(e);
                }
            };
            crate::sync::test_point("cover:charged");
            // After the pool charge (edge 4).
            charged.fetch_add(charged_now, Ordering::SeqCst);
            crate::sync::test_point("cover:added");
        }
    }

    /// Quantum mode: takes `state`'s slack above `keep` bytes back from the pools (and, in
    /// [`TrimMode::Release`], hands surplus cushion back to the listener like any release).
    /// Returns the bytes taken. Never takes bytes a concurrent grow of the same reservation
    /// may have counted on (edge 6 of the module docs): it lowers `charged`, then re-reads
    /// `size`; if a grow raised `size` above the new `charged` meanwhile, the bytes are put back
    /// (the pools still hold them) and nothing is taken.
    pub(crate) fn trim(&self, state: &ConsumerState, keep: u64, mode: TrimMode) -> Result<u64> {
        self.trim_counters(&state.size, &state.charged, &state.node, keep, mode)
    }

    /// [`trim`](Self::trim) on any pair of slack counters (a reservation's, a pool's
    /// allocations'), charged to `node`.
    fn trim_counters(
        &self,
        size: &AtomicU64,
        charged: &AtomicU64,
        node: &PoolNode,
        keep: u64,
        mode: TrimMode,
    ) -> Result<u64> {
        let Some((was, floor)) = lower_charged(size, charged, keep) else {
            return Ok(0);
        };
        crate::sync::test_point("trim:lowered");
        let taken = settle_trim(size, charged, was, floor);
        if taken > 0 {
            match mode {
                TrimMode::Quiet => self.release_quiet(node, taken),
                TrimMode::Release => self.release(node, taken)?,
            }
        }
        Ok(taken)
    }

    /// Bytes of slack held now (quantum mode; 0 in exact mode): charged to the pools for
    /// reservations and pools' allocations beyond what they hold. A read-out (for arbiters and
    /// gauges): walks the registry under its lock, calls nothing.
    pub(crate) fn slack_total(&self) -> u64 {
        if self.config.reservation_quantum == 0 {
            return 0;
        }
        let consumers: u64 = self
            .consumers
            .lock()
            .values()
            // Relaxed (both): a read-out.
            .map(|c| {
                c.charged
                    .load(Ordering::Relaxed)
                    .saturating_sub(c.size.load(Ordering::Relaxed))
            })
            .sum();
        let mut nodes = Vec::new();
        self.root.walk(0, &mut nodes);
        let allocations: u64 = nodes
            .iter()
            // Relaxed (both): a read-out.
            .map(|(_, n)| {
                n.alloc
                    .charged
                    .load(Ordering::Relaxed)
                    .saturating_sub(n.alloc.size.load(Ordering::Relaxed))
            })
            .sum();
        consumers.saturating_add(allocations)
    }

    /// Takes every reservation's slack (but `skip`'s) back into the cushion (quantum mode; 0 in
    /// exact mode). Runs before a grow is refused or operators are spilled, and on `reclaim`.
    ///
    /// Unlike [`trim`](Self::trim), called by a reservation's own methods, this runs on another
    /// thread than the reservations' users, who may be on the exclusive path (plain stores, see
    /// `barrier`): so it lowers every `charged` first, then makes one heavy fence for them all,
    /// then re-reads each `size`.
    pub(super) fn trim_all(&self, skip: Option<SlackId>) -> u64 {
        if self.config.reservation_quantum == 0 {
            return 0;
        }
        // Copied under the registry lock, trimmed without it (the lock rule).
        let consumers: Vec<Arc<ConsumerState>> = self.consumers.lock().values().cloned().collect();
        let mut nodes = Vec::new();
        self.root.walk(0, &mut nodes);
        // Every reservation's slack (but `skip`'s), and every pool's allocations' slack.
        let lowered: Vec<(&AtomicU64, &AtomicU64, &PoolNode, u64, u64)> = consumers
            .iter()
            .filter(|c| skip != Some(SlackId::Reservation(c.id)))
            .map(|c| (&c.size, &c.charged, &*c.node))
            .chain(
                nodes
                    .iter()
                    .filter(|(_, n)| skip != Some(SlackId::Allocations(Arc::as_ptr(n) as usize)))
                    .map(|(_, n)| (&n.alloc.size, &n.alloc.charged, &**n)),
            )
            .filter_map(|(size, charged, node)| {
                lower_charged(size, charged, 0)
                    .map(|(was, floor)| (size, charged, node, was, floor))
            })
            .collect();
        if lowered.is_empty() {
            return 0;
        }
        crate::sync::test_point("trim_all:lowered");
        if !crate::barrier::heavy() {
            // Without the fence an exclusive grow may have counted on the old `charged`: put
            // everything back (the slack stays, nothing is lost).
            log::warn!("[{}] membarrier failed: slack not trimmed", self.name);
            for (_, charged, _, was, floor) in lowered {
                // SeqCst: edge 6, as in `settle_trim`.
                charged.fetch_add(was - floor, Ordering::SeqCst);
            }
            return 0;
        }
        lowered
            .into_iter()
            .map(|(size, charged, node, was, floor)| {
                let taken = settle_trim(size, charged, was, floor);
                if taken > 0 {
                    self.release_quiet(node, taken);
                }
                taken
            })
            .sum()
    }

    /// Quantum mode, after a shrink or free left `left` bytes held: slack above two quanta goes
    /// back to the pools, down to one quantum (the quantum of what is held, see `quantum_for`).
    #[inline]
    pub(crate) fn trim_surplus(
        &self,
        size: &AtomicU64,
        charged: &AtomicU64,
        node: &PoolNode,
        left: u64,
        mode: TrimMode,
    ) -> Result<()> {
        // Relaxed: only decides whether to try; the trim re-reads both counters with SeqCst.
        let slack = charged.load(Ordering::Relaxed).saturating_sub(left);
        if slack > self.config.reservation_quantum.saturating_mul(2) {
            return self.trim_to_quantum(size, charged, node, left, slack, mode);
        }
        Ok(())
    }

    /// The rare part of `trim_surplus`: slack above two of the base quanta.
    #[cold]
    fn trim_to_quantum(
        &self,
        size: &AtomicU64,
        charged: &AtomicU64,
        node: &PoolNode,
        left: u64,
        slack: u64,
        mode: TrimMode,
    ) -> Result<()> {
        let quantum = quantum_for(self.config.reservation_quantum, left);
        if slack > quantum.saturating_mul(2) {
            self.trim_counters(size, charged, node, quantum, mode)?;
        }
        Ok(())
    }
}

/// A trim's first step: lowers `state.charged` to `size + keep`. Returns the `charged` it
/// replaced and the floor it set, or `None` if there was nothing above the floor.
fn lower_charged(size: &AtomicU64, charged: &AtomicU64, keep: u64) -> Option<(u64, u64)> {
    loop {
        // SeqCst (all accesses here and in `settle_trim`): edge 6, a store-buffering pair with a
        // grow's `size` store and `charged` load; either the grow sees the lowered `charged`
        // (and covers itself) or the trim's re-read sees its `size`. (The exclusive path's grow
        // stores `size` plainly: its trimmers on other threads add a heavy fence, see `barrier`.)
        let was = charged.load(Ordering::SeqCst);
        let floor = size.load(Ordering::SeqCst).saturating_add(keep);
        if was <= floor {
            return None;
        }
        if charged
            .compare_exchange(was, floor, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return Some((was, floor));
        }
    }
}

/// A trim's last step: re-reads `size`; if a grow raced the lowering (and may have counted on
/// the old `charged`) puts the bytes back and returns 0, else returns the bytes taken, which the
/// caller releases to the pools.
fn settle_trim(size: &AtomicU64, charged: &AtomicU64, was: u64, floor: u64) -> u64 {
    if size.load(Ordering::SeqCst) > floor {
        charged.fetch_add(was - floor, Ordering::SeqCst);
        return 0;
    }
    was - floor
}

/// Takes back `bytes` a grow added to `size` and could not cover. Saturating: a `close` racing
/// the grow may have emptied the counter meanwhile (close is meant to run alone, but a race must
/// never wrap a counter).
fn take_back(size: &AtomicU64, bytes: u64) {
    // SeqCst: edge 6. Relaxed on failure: the value only feeds the next attempt.
    let _ = size.fetch_update(Ordering::SeqCst, Ordering::Relaxed, |cur| {
        Some(cur.saturating_sub(bytes))
    });
}

/// The counters a quantum-mode grow works on (a reservation's, or a pool's allocations'), with
/// what its pool charge needs.
pub(crate) struct Slack<'a> {
    pub(crate) size: &'a AtomicU64,
    pub(crate) charged: &'a AtomicU64,
    pub(crate) node: &'a Arc<PoolNode>,
    /// For errors and logs.
    pub(crate) consumer: &'a str,
    /// The slack growing, already counted in the need (it must not be taken back under it).
    pub(crate) owner: SlackId,
}

/// Which slack a quantum-mode grow is covering (see `Slack::owner`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum SlackId {
    /// A reservation, by consumer id.
    Reservation(u64),
    /// A pool's allocations, by the pool node's address (nodes live as long as the budget).
    Allocations(usize),
}

//! A fallible grow: charge the pools, check the cushion, ask the listener for the rest, and
//! when refused, climb the remedy ladder (see `Budget::remedy`) before giving up.
//!
//! Executor-wide arbitration is one rung of that ladder: a *short grant* of the listener (not a
//! pool limit, not the gate) is reported to the manager's [`Arbiter`](crate::Arbiter), which may
//! have other tasks hand idle memory back to the listener's owner; the grow then asks the
//! listener once more. It costs nothing on the fast path (a grow served from the cushion never
//! reaches the listener) and one branch on a full grant.

use crate::sync::Ordering;
use std::sync::Arc;

use super::{saturating_add, Budget, SlackId, MAX_REQUEST_BYTES};
use crate::error::{MemoryError, OomReason, Result};
use crate::tree::PoolNode;
use crate::units::human;

/// How often a grow refused at the root retries while surplus is being handed back (a claim
/// occupies the root for the length of one `unreserve` upcall). Small under loom, whose atomics
/// keep a short history.
const CLAIM_RETRIES: u32 = if cfg!(loom) { 2 } else { 1000 };

/// After [`CLAIM_RETRIES`] yields, a grow that a claim keeps out sleeps this long between tries
/// (an `unreserve` upcall into Spark can take milliseconds), up to [`CLAIM_WAIT_LIMIT`].
const CLAIM_SLEEP: std::time::Duration = std::time::Duration::from_micros(100);

/// How long a grow waits for in-flight claims before treating the root as full.
const CLAIM_WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Budget {
    /// Charges `bytes` to `node` (and ancestors) and makes sure they are covered by the reserved
    /// cushion. On error no pool counter changes; memory other spillers freed and a partial
    /// grant of the listener stay in the cushion (see `Reservation::try_grow`).
    ///
    /// Why one RMW per level plus a load of `reserved` is enough: every byte handed back to the
    /// listener is first *claimed* on the root counter (`claim_and_give_back`), exactly like a
    /// grow, and the claim is dropped only after `reserved` went down. So the root counter always
    /// includes every byte that is in use or about to leave `reserved`; a grow whose new root
    /// value is `<= reserved` (read after its own RMW) is covered whatever order a concurrent
    /// release runs in: the root RMW acquires what the hand-back released (edge 1 of the module
    /// docs), so the `reserved` it reads is never one the hand-back already lowered.
    pub(crate) fn grow(&self, node: &Arc<PoolNode>, consumer: &str, bytes: u64) -> Result<()> {
        self.grow_at_least(node, consumer, bytes, bytes, bytes, None)
            .map(|_| ())
    }

    /// Like [`grow`](Self::grow), for a reservation in quantum mode: charges `bytes` (its need
    /// rounded up to the quantum) if that fits as it is, else falls back to `min_bytes` (the
    /// need) before taking back slack, spilling or failing. Returns the bytes charged. `asked`
    /// is what the consumer asked for (for the error); `owner` is the growing slack (a
    /// reservation's or a pool's allocations'),
    /// whose slack is already counted in the need (and must not be taken back under it).
    pub(crate) fn grow_at_least(
        &self,
        node: &Arc<PoolNode>,
        consumer: &str,
        mut bytes: u64,
        min_bytes: u64,
        asked: u64,
        owner: Option<SlackId>,
    ) -> Result<u64> {
        if bytes > MAX_REQUEST_BYTES {
            return Err(MemoryError::InvalidArgument(format!(
                "request of {bytes} bytes for '{consumer}' exceeds the maximum of {MAX_REQUEST_BYTES} bytes"
            )));
        }
        self.check_open()?;
        let mut ladder = Ladder::default();
        let mut claim_retries = 0;
        let mut claim_wait: Option<std::time::Instant> = None;
        loop {
            // 1. Pool limits, leaf to root; all or nothing.
            let charged_root = match node.charge(bytes) {
                Ok(root) => root,
                Err(refusal) => {
                    let limit = refusal.node.limit.unwrap_or(u64::MAX);
                    // Bytes being handed back are claimed on the root (bypassing its limit) for
                    // the length of an `unreserve` upcall: they are not usage.
                    let claims = if refusal.node.is_root() {
                        // Relaxed: the refusal read the root with Acquire, which already orders
                        // this load after the claims its value includes (edge 2).
                        self.claims.load(Ordering::Relaxed)
                    } else {
                        0
                    };
                    let real_used = refusal.used.saturating_sub(claims);
                    if claims > 0
                        && real_used.saturating_add(bytes) <= limit
                        && self.wait_for_claims(&mut claim_retries, &mut claim_wait, true)
                    {
                        // Refused only because of a claim: wait for it, not a refusal.
                        continue;
                    }
                    let short = real_used.saturating_add(bytes).saturating_sub(limit);
                    let refused = Refused {
                        consumer,
                        node,
                        asked,
                        min_bytes,
                        owner,
                        short,
                        scope: Some(&refusal.node),
                        arbitrable: false,
                    };
                    self.remedy(&mut ladder, &mut bytes, refused, || OomReason::PoolLimit {
                        pool: refusal.node.path.clone(),
                        limit,
                        used: real_used,
                    })?;
                    continue;
                }
            };
            crate::sync::test_point("grow:charged");
            // 2. The cushion. The fast path ends here: no listener call.
            //
            // Compared: `reserved`, then the root *as it is now*, not the value this grow's own
            // charge returned. A grant raising `reserved` was asked for by a grow that charged
            // before asking; comparing it with a stale root value would let this grow take the
            // fast path on bytes granted to cover that other grow (two grows sharing one grant:
            // used > reserved). Read in this order, a `reserved` that includes a grant comes with
            // a root that includes the grant's charge.
            // Acquire: pairs with the grant's Release, so the root load below sees the charge of
            // every grant this value includes; and with a hand-back's Release (edge 1).
            let reserved = self.reserved.load(Ordering::Acquire);
            // Acquire: the charges behind the grants read above are visible (program order after
            // the Acquire above).
            //
            // And never below the value this grow's own charge returned: a hand-back may
            // un-claim its bytes between the two loads (after `reserved` was read without its
            // `unreserve`), which lowers the root; the charge's own value still counts that
            // claim, so it is the one to compare with the `reserved` read before the un-claim.
            // (The loom model `a_grow_on_slack_racing_a_reclaim_of_that_slack_is_always_covered`
            // runs this race.)
            let root_now = self.root.used.load(Ordering::Acquire).max(charged_root);
            if root_now <= reserved {
                self.grown(node, bytes, ladder.freed_room());
                return Ok(bytes);
            }
            // A hand-back in flight (a release's hysteresis, or an arbiter taking this task's
            // idle cushion for another task) counts its claimed bytes on the root until its
            // `unreserve` returns: what looks uncovered may be that claim, not usage. Wait for it
            // (yields only: this thread may hold the listener owner's lock that the hand-back's
            // `unreserve` waits for, e.g. a spiller writing inside Spark's `spill`) rather than
            // reserve again what is being handed back, and perhaps take from the listener the
            // bytes another task's arbitration just freed.
            // Relaxed: the root load above acquired the claim's Release RMW (edge 2), so a claim
            // it includes is seen; a stale count only costs a retry.
            if self.claims.load(Ordering::Relaxed) > 0
                && self.wait_for_claims(&mut claim_retries, &mut claim_wait, false)
            {
                node.rollback(bytes);
                continue;
            }
            // What is uncovered now, at most this grow's own bytes plus the over-commit still
            // owed: every other grow in flight covers its own (by this same check, or by its own
            // grant), and over-commit is paid by the next grow that reaches the listener (this
            // one), which so reserves it from Spark, or spills, or fails.
            // Relaxed: a hint, capped by what is really uncovered (see `overcommit`).
            let owed = self.overcommit.load(Ordering::Relaxed);
            let deficit = bytes.saturating_add(owed).min(root_now - reserved);
            // The gate (container pressure) may refuse new memory: then the listener is not
            // asked and the ladder below runs as for a listener that granted nothing.
            let gated = self.gate.as_ref().and_then(|g| g.refuse(deficit));
            let (requested, granted) = match &gated {
                Some(_) => {
                    // Relaxed: a statistic.
                    self.counters.gate_refusals.fetch_add(1, Ordering::Relaxed);
                    (deficit, 0)
                }
                None => match self.reserve_from_listener(deficit) {
                    Ok(r) => r,
                    Err(e) => {
                        node.rollback(bytes);
                        return Err(e);
                    }
                },
            };
            if granted >= deficit {
                if deficit > bytes {
                    self.paid_overcommit(deficit - bytes);
                }
                self.grown(node, bytes, ladder.freed_room());
                return Ok(bytes);
            }
            node.rollback(bytes);
            // (What was granted stays in the cushion for the retry.)
            let refused = Refused {
                consumer,
                node,
                asked,
                min_bytes,
                owner,
                short: deficit - granted,
                scope: None,
                arbitrable: gated.is_none(),
            };
            self.remedy(&mut ladder, &mut bytes, refused, || match gated {
                Some(reason) => OomReason::Gate { reason },
                None => OomReason::ListenerDenied { requested, granted },
            })?;
        }
    }

    /// The remedy ladder of a refused grow (refused by a pool limit, or by the listener), one
    /// rung per call, cheapest first:
    ///
    /// 1. drop the quantum's rounding: ask for the need alone;
    /// 2. take every other slack back into the cushion (quantum mode; once);
    /// 3. a short grant of the listener only: ask the [`Arbiter`](crate::Arbiter) (once) to have
    ///    the executor's other tasks hand idle memory back to the listener's owner, then ask the
    ///    listener again; not on a thread that arbitrates or reclaims already
    ///    ([`arbitration_allowed`](crate::arbitration_allowed));
    /// 4. spill native spillers for what is short, within the refusing pool (once); what they
    ///    free stays in the cushion for the retry;
    /// 5. give up: surplus that the trim or the spill left in the cushion goes back to the
    ///    listener, and the error is out of memory with `reason`.
    ///
    /// `Ok(())`: a rung freed something (or lowered the request), retry. The pool charge of the
    /// refused attempt must already be undone.
    fn remedy(
        &self,
        ladder: &mut Ladder,
        bytes: &mut u64,
        refused: Refused<'_>,
        reason: impl FnOnce() -> OomReason,
    ) -> Result<()> {
        if *bytes > refused.min_bytes {
            *bytes = refused.min_bytes;
            return Ok(());
        }
        if !ladder.trimmed {
            ladder.trimmed = true;
            if self.trim_all(refused.owner) > 0 {
                return Ok(());
            }
        }
        if refused.arbitrable && !ladder.arbitrated {
            ladder.arbitrated = true;
            if let Some(arbiter) = &self.arbiter {
                if crate::listener::arbitration_allowed() {
                    // Relaxed (both): statistics.
                    self.counters.arbitrations.fetch_add(1, Ordering::Relaxed);
                    // No lock is held here (lock rule); the guard keeps a grow that the
                    // arbitration causes on this thread from arbitrating again.
                    let freed = {
                        let _guard = crate::listener::NoArbitration::enter();
                        arbiter.on_short_grant(self.id(), refused.short)
                    };
                    saturating_add(&self.counters.arbitrated_bytes, freed);
                    if freed > 0 {
                        return Ok(());
                    }
                }
            }
        }
        if !ladder.spilled {
            ladder.spilled = true;
            if self.spill_held(refused.short, refused.scope)? > 0 {
                return Ok(());
            }
        }
        if let Err(e) = self.release_surplus() {
            log::warn!(
                "[{}] handing back surplus after a refused grow: {e}",
                self.name
            );
        }
        Err(self.oom(refused.consumer, refused.node, refused.asked, reason()))
    }

    /// One wait for claims in flight (yields, then, if `may_sleep`, short sleeps up to
    /// [`CLAIM_WAIT_LIMIT`]); false once the grow has waited long enough and should treat what
    /// it sees as real.
    fn wait_for_claims(
        &self,
        retries: &mut u32,
        since: &mut Option<std::time::Instant>,
        may_sleep: bool,
    ) -> bool {
        *retries += 1;
        if *retries <= CLAIM_RETRIES {
            crate::sync::yield_now();
            return true;
        }
        if may_sleep
            && !cfg!(loom)
            && since.get_or_insert_with(std::time::Instant::now).elapsed() < CLAIM_WAIT_LIMIT
        {
            std::thread::sleep(CLAIM_SLEEP);
            return true;
        }
        false
    }

    /// Bookkeeping after a successful grow of `bytes`: confirms them (what the pools hold, and
    /// their peaks), and if the grow spilled or took slack back, surplus that left beyond the
    /// hysteresis band goes back to the listener now.
    fn grown(&self, node: &PoolNode, bytes: u64, spilled: bool) {
        node.confirm(bytes);
        if spilled {
            if let Err(e) = self.release_surplus() {
                log::warn!("[{}] handing back surplus after a spill: {e}", self.name);
            }
        }
    }

    /// Asks the listener for `deficit` rounded up to whole blocks (capped by the task limit);
    /// records what it grants. Returns `(requested, granted)`.
    pub(super) fn reserve_from_listener(&self, deficit: u64) -> Result<(u64, u64)> {
        let block = self.config.reservation_block;
        let mut request = deficit.div_ceil(block).saturating_mul(block);
        if let Some(limit) = self.config.task_limit {
            // Relaxed: only sizes the request (concurrent grows race here whatever the ordering);
            // the root's limit is what enforces the task limit.
            let room = limit.saturating_sub(self.reserved.load(Ordering::Relaxed));
            request = request.min(room.max(deficit));
        }
        // Relaxed: a statistic.
        self.counters.reserve_calls.fetch_add(1, Ordering::Relaxed);
        // No lock is held here (lock rule): the listener may re-enter the manager.
        // Relaxed (both): a hint for arbiters (see `reserving`).
        self.reserving.fetch_add(1, Ordering::Relaxed);
        let result = crate::error::contain(|| self.listener.reserve(request));
        self.reserving.fetch_sub(1, Ordering::Relaxed);
        let granted = result.map_err(|source| MemoryError::Listener {
            op: "reserve",
            bytes: request,
            source,
        })?;
        if granted > 0 {
            // Release: publishes this grow's root charge and the listener's grant to whoever
            // reads the new `reserved` with Acquire before handing bytes back (edge 3).
            self.reserved.fetch_add(granted, Ordering::Release);
        }
        if granted > request {
            return Err(MemoryError::ListenerContract(format!(
                "asked for {request} bytes, granted {granted}; the grant is kept and will be given back"
            )));
        }
        log::trace!(
            "[{}] reserved {} (asked {})",
            self.name,
            human(granted),
            human(request)
        );
        Ok((request, granted))
    }
}

/// The rungs of the remedy ladder a grow has used (see `Budget::remedy`).
#[derive(Default)]
struct Ladder {
    /// Slack was taken back (rung 2).
    trimmed: bool,
    /// The arbiter was asked (rung 3).
    arbitrated: bool,
    /// Spillers were asked (rung 4).
    spilled: bool,
}

impl Ladder {
    /// True if a rung may have left surplus in the cushion, which a successful grow hands back.
    fn freed_room(&self) -> bool {
        self.trimmed || self.spilled
    }
}

/// What a refused grow attempt needs for the remedy ladder.
struct Refused<'a> {
    /// For the error.
    consumer: &'a str,
    node: &'a PoolNode,
    /// What the consumer asked for (for the error).
    asked: u64,
    /// The need without the quantum's rounding.
    min_bytes: u64,
    /// The growing slack, already counted in the need (not taken back under it).
    owner: Option<SlackId>,
    /// Bytes short: what a spill should free.
    short: u64,
    /// The refusing pool, whose subtree is spilled; `None`: the whole task.
    scope: Option<&'a PoolNode>,
    /// A short grant of the listener (not a pool limit, not the gate): other tasks' idle memory
    /// can help.
    arbitrable: bool,
}

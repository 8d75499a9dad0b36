//! The budget of one task: the bytes reserved from the listener, everything charged against
//! them, and the protocol that keeps the two consistent (grow, claim and give back, reclaim,
//! close), plus the registries that close and reports need (consumers, spillers, allocations).
//!
//! The public handles ([`Reservation`](crate::Reservation), [`Pool`](crate::Pool),
//! [`MemoryManager`](crate::MemoryManager)) hold an `Arc<Budget>` and call down into it. See the
//! crate docs for the design, the data flow and the lock rule.
//!
//! # Orderings
//! The grow fast path is a handful of atomics, so each ordering is the weakest that the protocol
//! needs (on aarch64 an acquire or release costs a barrier-carrying instruction: `ldar`, `stlr`,
//! `ldadda`/`ldaddl`/`ldaddal` instead of `ldr`, `str`, `ldadd`). The protocol relies on four
//! happens-before edges and one total order; everything else (non-root pool levels, peaks,
//! counters, ids, read-outs, reports) publishes nothing and is `Relaxed`.
//!
//! 1. **Hand-back → grow.** A hand-back lowers `reserved` and only then un-claims the root with a
//!    `Release` RMW; every root RMW after which `reserved` is read (a grow's charge, a claim)
//!    acquires. So a grow whose root value no longer includes a claim also sees `reserved`
//!    without those bytes, and its `root <= reserved` check stays sound (`Budget::grow`).
//! 2. **Claim → refused grow.** A claim raises `claims` and then the root with a `Release` RMW; a
//!    grow refused at the root read the root with `Acquire`, so it sees the `claims` of every
//!    claim its value includes and can tell a claim from real usage.
//! 3. **Grant → hand-back.** A grow charges the root, then adds the listener's grant to
//!    `reserved` with `Release`. `cushion` reads `reserved` with `Acquire`, so a hand-back sized
//!    on a grant claims the root only after the charge that grant covers (its claim counts it);
//!    the claim's check reads `reserved` with `Acquire` too, so the listener has seen a grant
//!    before it sees an `unreserve` of those bytes.
//! 4. **Charge → uncharge.** A reservation's size is raised with `Release` after the pool charge
//!    and taken out (`shrink`, `free`, `close`) with `Acquire` before the uncharge, so no
//!    counter is uncharged ahead of its charge, even by another thread.
//! 5. **Close ↔ release (`SeqCst`).** `close` sets `closed` then reads the root; a release
//!    uncharges the root then reads `closed`. That is a store-buffering pair: only a single total
//!    order guarantees that one of them sees the other, so bytes released during a close are
//!    handed back by the releaser or by `close`. On aarch64 a `SeqCst` RMW is the same `ldaddal`/`casal`/`swpal` as `AcqRel`, and a
//!    `SeqCst` load is `ldar`, which is also what `Acquire` compiles to unless the target has
//!    RCpc (`ldapr`); so this costs nothing over acquire/release on the release path.
//!
//! 6. **Quantum mode: grow ↔ trim (`SeqCst`).** With a reservation quantum a grow first raises
//!    the reservation's `size`, then reads its `charged`, and is done if `size <= charged`
//!    (one RMW and one load, on the reservation's own cache line). A trim (taking slack back:
//!    a shrink past two quanta, `free`, `reclaim`, a grow refused elsewhere) lowers `charged`
//!    with a CAS, then re-reads `size`, and puts the bytes back if `size` is now above the new
//!    `charged`. Another store-buffering pair: in the single total order either the grow's load
//!    comes after the trim's CAS (it sees the lowered `charged` and covers itself on the slow
//!    path) or the trim's re-read comes after the grow's RMW (it sees the grow and puts the
//!    bytes back). So a trim never takes bytes a grow counted on. On x86 a `SeqCst` RMW is the
//!    `lock` instruction any RMW is and a `SeqCst` load a plain `mov`: the fast path pays
//!    nothing for it. `charged` only rises after the pool charge and only falls before the
//!    uncharge (edge 4 for quantum mode).
//!
//!    The exclusive path (`Reservation::try_grow_exclusive`, for a caller holding `&mut`) makes
//!    the same pair without the RMW: `size` has one writer, so the grow loads it, stores the new
//!    value and reads `charged` with `Relaxed` accesses separated by `barrier::light` (a
//!    compiler fence). The StoreLoad barrier that pair needs is paid by the other side: a trim
//!    that may run on another thread than the reservation's user (`trim_all`: before a refusal,
//!    before spilling, on `reclaim`) lowers every `charged`, then calls `barrier::heavy` (one
//!    `membarrier` system call for all of them), then re-reads the sizes. A trim by the
//!    reservation's own methods (`shrink`, `free`) needs no fence: `&mut` means no exclusive grow
//!    of that reservation runs meanwhile.
//!
//! No other decision reads two counters that other threads write without one of these edges,
//! so nothing else needs a single total order.

use crate::sync::{AtomicBool, AtomicU64, Ordering};
use std::alloc::Layout;
use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::sync::Mutex;

use crate::alloc::{AllocMeta, AllocTable, Take};
use crate::config::MemoryConfig;
use crate::error::{MemoryError, OomReason, OutOfMemory, Result};
use crate::listener::ReservationListener;
use crate::report::{ConsumerUsage, LeakKind, LeakReport, PoolUsage, UsageReport};
use crate::spill::{Spiller, SpillerRegistration, SpillerRegistry};
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

/// Largest single request accepted, bytes (keeps every sum of counters far from overflow).
pub const MAX_REQUEST_BYTES: u64 = 1 << 62;

/// Counters behind `ManagerStats`. All `Relaxed`: statistics, read without any other counter.
#[derive(Default)]
struct Counters {
    spill_count: AtomicU64,
    spilled_bytes: AtomicU64,
    reserve_calls: AtomicU64,
    unreserve_calls: AtomicU64,
    /// Bytes of forced charges that the cushion did not cover when they were made (cumulative).
    overcommitted_total: AtomicU64,
    /// Highest over-commit seen (see `Budget::overcommitted`).
    overcommit_peak: AtomicU64,
}

/// A snapshot of [`Counters`] and the live allocation count, for `ManagerStats`.
pub(crate) struct CounterSnapshot {
    pub(crate) spill_count: u64,
    pub(crate) spilled_bytes: u64,
    pub(crate) reserve_calls: u64,
    pub(crate) unreserve_calls: u64,
    pub(crate) live_allocations: u64,
    pub(crate) overcommitted_total: u64,
    pub(crate) overcommit_peak: u64,
}

/// The part of a reservation the manager can see (for reports and for close).
///
/// Aligned to 128 bytes (two cache lines, the unit x86's adjacent-line prefetcher pulls in): the
/// reservation's hot counters share no line with another reservation's, so two threads growing
/// their own reservations never bounce a line between cores.
#[repr(align(128))]
pub(crate) struct ConsumerState {
    /// Bytes held. Changed only by RMWs so a concurrent close and shrink each release disjoint
    /// bytes, except on the exclusive path (quantum mode, `&mut`: one writer, plain stores; the
    /// pools carry `charged` there, which only RMWs change). Exact mode (`quantum == 0`): raised with `Release` after the pool charge and taken
    /// out with `Acquire` before the uncharge (edge 4 of the module docs). Quantum mode: raised
    /// with `SeqCst` *before* it is known to be covered (edge 6).
    pub(crate) size: AtomicU64,
    /// Quantum mode only (0 in exact mode): bytes charged to the pool tree for this reservation,
    /// `>= size` whenever no grow is in flight; `charged - size` is the slack. Raised (`SeqCst`)
    /// only after the pool charge and lowered (`SeqCst`) only before the uncharge (edge 4), and
    /// in a store-buffering pair with `size` (edge 6).
    pub(crate) charged: AtomicU64,
    /// Highest `size`; `Relaxed` (a statistic).
    pub(crate) peak: AtomicU64,
    /// The manager's [`MemoryConfig::reservation_quantum`] (copied: the fast path reads no other
    /// line).
    pub(crate) quantum: u64,
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) node: Arc<PoolNode>,
}

impl ConsumerState {
    /// Raises the peak to `now` (a statistic).
    #[inline]
    pub(crate) fn note_peak(&self, now: u64) {
        // Relaxed (both): the peak is a statistic; `fetch_max` keeps it monotonic.
        if now > self.peak.load(Ordering::Relaxed) {
            self.peak.fetch_max(now, Ordering::Relaxed);
        }
    }
}

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

/// The shared state of one manager (one task attempt). See the module docs.
pub(crate) struct Budget {
    pub(crate) name: String,
    config: MemoryConfig,
    listener: Arc<dyn ReservationListener>,
    root: Arc<PoolNode>,
    /// Bytes granted by the listener and not handed back. The cushion is `reserved - root.used`:
    /// there is no separate cushion counter, so a grow is one RMW on each pool level plus one
    /// load of `reserved` (see `grow` and `claim_and_give_back` for why that is race-free).
    reserved: AtomicU64,
    /// Bytes currently claimed on the root by threads handing surplus back (see
    /// `claim_and_give_back`); a grow refused at the root while claims are in flight retries.
    claims: AtomicU64,
    /// Spills in progress whose freed memory the caller wants for itself: a grow spilling to make
    /// room, or `reclaim` counting exactly what it hands back. While > 0, memory freed by spillers
    /// stays in the cushion instead of being handed back by hysteresis.
    held_spills: AtomicU64,
    /// Over-commit still owed, as far as forced charges know: raised by the part of a forced
    /// charge the cushion did not cover (`force_grow`), lowered when a grow's grant pays for it.
    /// A *hint*, never trusted alone: releases also cover over-commit without touching it, so
    /// every reader caps it by what is really uncovered now (`root.used - reserved`). It sizes
    /// the deficit of the next grow that calls the listener (which so pays the over-commit, or
    /// spills, or fails) and the `overcommitted` read-out.
    overcommit: AtomicU64,
    closed: AtomicBool,
    /// Next consumer id.
    ids: AtomicU64,
    consumers: Mutex<HashMap<u64, Arc<ConsumerState>>>,
    spillers: Arc<SpillerRegistry>,
    allocs: AllocTable,
    counters: Counters,
}

impl Budget {
    /// A budget named `name` (the task, for reports) that reserves from `listener`.
    pub(crate) fn new(
        name: String,
        config: MemoryConfig,
        listener: Arc<dyn ReservationListener>,
    ) -> Result<Budget> {
        config.validate()?;
        let root = PoolNode::new_root(config.task_limit);
        Ok(Budget {
            name,
            config,
            listener,
            root,
            reserved: AtomicU64::new(0),
            claims: AtomicU64::new(0),
            held_spills: AtomicU64::new(0),
            overcommit: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            ids: AtomicU64::new(1),
            consumers: Mutex::new(HashMap::new()),
            spillers: Arc::new(SpillerRegistry::default()),
            allocs: AllocTable::default(),
            counters: Counters::default(),
        })
    }

    pub(crate) fn config(&self) -> &MemoryConfig {
        &self.config
    }

    /// The root of the pool tree (the task).
    pub(crate) fn root(&self) -> &Arc<PoolNode> {
        &self.root
    }

    /// Bytes reserved from the listener and not handed back (a read-out).
    pub(crate) fn reserved(&self) -> u64 {
        // Relaxed: a read-out; no decision of this crate is taken on it.
        self.reserved.load(Ordering::Relaxed)
    }

    /// True once `close` has started (a read-out).
    pub(crate) fn is_closed(&self) -> bool {
        // Relaxed: `close` sets the flag before doing its work, so the flag publishes nothing;
        // the one place that must not miss it (`release`) uses `SeqCst` (edge 5).
        self.closed.load(Ordering::Relaxed)
    }

    /// A snapshot of the counters.
    pub(crate) fn counters(&self) -> CounterSnapshot {
        let c = &self.counters;
        // Relaxed (all four): statistics (see `Counters`).
        CounterSnapshot {
            spill_count: c.spill_count.load(Ordering::Relaxed),
            spilled_bytes: c.spilled_bytes.load(Ordering::Relaxed),
            reserve_calls: c.reserve_calls.load(Ordering::Relaxed),
            unreserve_calls: c.unreserve_calls.load(Ordering::Relaxed),
            live_allocations: self.allocs.len() as u64,
            overcommitted_total: c.overcommitted_total.load(Ordering::Relaxed),
            overcommit_peak: c.overcommit_peak.load(Ordering::Relaxed),
        }
    }

    /// Number of registered spillers.
    pub(crate) fn spiller_count(&self) -> usize {
        self.spillers.len()
    }

    /// Registers a spiller of the pool `node`.
    pub(crate) fn register_spiller(
        &self,
        name: String,
        node: Arc<PoolNode>,
        spiller: Arc<dyn Spiller>,
    ) -> SpillerRegistration {
        self.spillers.register(name, node, spiller)
    }

    /// Registers a new, empty consumer (a reservation) of `node`; its name becomes `name#id`.
    pub(crate) fn register_consumer(&self, node: Arc<PoolNode>, name: &str) -> Arc<ConsumerState> {
        // Relaxed: ids need only be unique, which RMW atomicity alone guarantees.
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConsumerState {
            size: AtomicU64::new(0),
            charged: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            quantum: self.config.reservation_quantum,
            id,
            name: format!("{name}#{id}"),
            node,
        });
        self.consumers.lock().insert(id, state.clone());
        state
    }

    /// Forgets the consumer `id` (its reservation was dropped).
    pub(crate) fn unregister_consumer(&self, id: u64) {
        self.consumers.lock().remove(&id);
    }

    /// What the listener's owner calls when it wants memory back (see `MemoryManager::reclaim`).
    pub(crate) fn reclaim(&self, target: u64) -> Result<u64> {
        let mut given = self.release_unused(target)?;
        let mut refilled = false;
        if given < target && self.trim_all(None) > 0 {
            // Reservations' slack is unused memory: it goes before any operator spills.
            refilled = true;
            given += self.release_unused(target - given)?;
        }
        if given < target {
            // What the spill frees stays in the cushion (no hysteresis hand-back on the way), so
            // the second release hands back exactly this call's bytes: the count reported to the
            // listener's owner never includes bytes other threads gave back meanwhile.
            refilled = true;
            self.spill_held(target - given, None)?;
            given += self.release_unused(target - given)?;
        }
        if refilled {
            // What the slack or the spill left beyond the hysteresis band goes back too.
            if let Err(e) = self.release_surplus() {
                log::warn!("[{}] handing back surplus after a reclaim: {e}", self.name);
            }
        }
        Ok(given)
    }

    fn check_open(&self) -> Result<()> {
        // Relaxed: a grow racing `close` may miss the flag whatever the ordering (close is meant
        // to run alone); what such a grow reserves is handed back when it is released (edge 5).
        if self.closed.load(Ordering::Relaxed) {
            return Err(MemoryError::Closed {
                manager: self.name.clone(),
            });
        }
        Ok(())
    }

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
        let mut spilled = false;
        // Reservations' slack (quantum mode) is taken back once, before anything is spilled.
        let mut trimmed = false;
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
                    if claims > 0 && real_used.saturating_add(bytes) <= limit {
                        // Refused only because of a claim: wait for it, not a refusal.
                        claim_retries += 1;
                        if claim_retries <= CLAIM_RETRIES {
                            crate::sync::yield_now();
                            continue;
                        }
                        if !cfg!(loom)
                            && claim_wait
                                .get_or_insert_with(std::time::Instant::now)
                                .elapsed()
                                < CLAIM_WAIT_LIMIT
                        {
                            std::thread::sleep(CLAIM_SLEEP);
                            continue;
                        }
                    }
                    if self.cheap_remedy(&mut bytes, min_bytes, &mut trimmed, owner) {
                        continue;
                    }
                    if !spilled {
                        spilled = true;
                        let need = real_used.saturating_add(bytes).saturating_sub(limit);
                        if self.spill_held(need, Some(&refusal.node))? > 0 {
                            continue;
                        }
                    }
                    if let Err(e) = self.release_surplus() {
                        // What a spill or a trim freed stayed in the cushion for the retry, which
                        // was refused again: beyond the hysteresis band it goes back to the
                        // listener.
                        log::warn!(
                            "[{}] handing back surplus after a refused grow: {e}",
                            self.name
                        );
                    }
                    return Err(self.oom(
                        consumer,
                        node,
                        asked,
                        OomReason::PoolLimit {
                            pool: refusal.node.path.clone(),
                            limit,
                            used: real_used,
                        },
                    ));
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
            // (Found by the loom model `a_grow_on_slack_racing_a_reclaim_of_that_slack_is_always_covered`.)
            let root_now = self.root.used.load(Ordering::Acquire).max(charged_root);
            if root_now <= reserved {
                self.grown(node, spilled || trimmed);
                return Ok(bytes);
            }
            // What is uncovered now, at most this grow's own bytes plus the over-commit still
            // owed: every other grow in flight covers its own (by this same check, or by its own
            // grant), and over-commit is paid by the next grow that reaches the listener (this
            // one), which so reserves it from Spark, or spills, or fails.
            // Relaxed: a hint, capped by what is really uncovered (see `overcommit`).
            let owed = self.overcommit.load(Ordering::Relaxed);
            let deficit = bytes.saturating_add(owed).min(root_now - reserved);
            let (requested, granted) = match self.reserve_from_listener(deficit) {
                Ok(r) => r,
                Err(e) => {
                    node.uncharge(bytes);
                    return Err(e);
                }
            };
            if granted >= deficit {
                if deficit > bytes {
                    self.paid_overcommit(deficit - bytes);
                }
                self.grown(node, spilled || trimmed);
                return Ok(bytes);
            }
            node.uncharge(bytes);
            // (What was granted stays in the cushion for the retry.)
            if self.cheap_remedy(&mut bytes, min_bytes, &mut trimmed, owner) {
                continue;
            }
            if !spilled {
                spilled = true;
                if self.spill_held(deficit - granted, None)? > 0 {
                    continue;
                }
            }
            if let Err(e) = self.release_surplus() {
                log::warn!(
                    "[{}] handing back surplus after a refused grow: {e}",
                    self.name
                );
            }
            return Err(self.oom(
                consumer,
                node,
                asked,
                OomReason::ListenerDenied { requested, granted },
            ));
        }
    }

    /// The first remedies of a refused grow, cheapest first: drop the quantum's rounding (ask for
    /// the need alone), then take every other reservation's slack back (once). True: retry.
    /// Spilling comes after these.
    fn cheap_remedy(
        &self,
        bytes: &mut u64,
        min_bytes: u64,
        trimmed: &mut bool,
        owner: Option<SlackId>,
    ) -> bool {
        if *bytes > min_bytes {
            *bytes = min_bytes;
            return true;
        }
        if !*trimmed {
            *trimmed = true;
            return self.trim_all(owner) > 0;
        }
        false
    }

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
        node.record_peaks();
        Ok(uncovered)
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
    fn paid_overcommit(&self, bytes: u64) {
        // Relaxed: a hint (see `overcommit`); saturating, since releases may have covered part.
        let _ = self
            .overcommit
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(bytes))
            });
    }

    /// Bookkeeping after a successful grow: peaks, and if the grow spilled or took slack back,
    /// surplus that left beyond the hysteresis band goes back to the listener now.
    fn grown(&self, node: &PoolNode, spilled: bool) {
        node.record_peaks();
        if spilled {
            if let Err(e) = self.release_surplus() {
                log::warn!("[{}] handing back surplus after a spill: {e}", self.name);
            }
        }
    }

    /// Asks the listener for `deficit` rounded up to whole blocks (capped by the task limit);
    /// records what it grants. Returns `(requested, granted)`.
    fn reserve_from_listener(&self, deficit: u64) -> Result<(u64, u64)> {
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
        let granted =
            crate::error::contain(|| self.listener.reserve(request)).map_err(|source| {
                MemoryError::Listener {
                    op: "reserve",
                    bytes: request,
                    source,
                }
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

    /// The unused part of `reserved` now (0 while in-flight grows exceed it).
    fn cushion(&self) -> u64 {
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

    /// Quantum mode, the slow path of a grow on slack (a reservation's, or a pool's allocations'):
    /// `size` was raised by `bytes` above `charged`. Takes the bytes back out (so reports and
    /// errors never show bytes in flight), charges the pools for the need rounded up to the
    /// quantum (the need alone if that does not fit), then grows on the new slack; on error
    /// nothing changes. Returns the size this grow left (for the peak).
    pub(crate) fn cover(&self, slack: Slack<'_>, bytes: u64) -> Result<u64> {
        let Slack { size, charged, .. } = slack;
        // SeqCst (all accesses below): edge 6, as in `Reservation::try_grow`.
        take_back(size, bytes);
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
            let charged_now = self.grow_at_least(
                slack.node,
                slack.consumer,
                rounded,
                need,
                bytes,
                Some(slack.owner),
            )?;
            crate::sync::test_point("cover:charged");
            // After the pool charge (edge 4).
            charged.fetch_add(charged_now, Ordering::SeqCst);
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

    /// Takes every reservation's slack (but `skip`'s) back into the cushion (quantum mode; 0 in
    /// exact mode). Runs before a grow is refused or operators are spilled, and on `reclaim`.
    ///
    /// Unlike [`trim`](Self::trim), called by a reservation's own methods, this runs on another
    /// thread than the reservations' users, who may be on the exclusive path (plain stores, see
    /// `barrier`): so it lowers every `charged` first, then makes one heavy fence for them all,
    /// then re-reads each `size`.
    fn trim_all(&self, skip: Option<SlackId>) -> u64 {
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

    fn high_water(&self) -> u64 {
        self.config.reservation_block.saturating_mul(2)
    }

    /// Hands back cushion above one block when it exceeds two blocks.
    fn release_surplus(&self) -> Result<()> {
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

    /// Spills keeping what is freed in the cushion for the caller (a grow's retry, or `reclaim`).
    fn spill_held(&self, target: u64, scope: Option<&PoolNode>) -> Result<u64> {
        // Relaxed (both): read only as a hint by `release` (see there); the releases it must
        // hold back happen after this increment on this thread or through the spiller's own
        // synchronization.
        self.held_spills.fetch_add(1, Ordering::Relaxed);
        let result = self.spill_within(target, scope);
        self.held_spills.fetch_sub(1, Ordering::Relaxed);
        result
    }

    pub(crate) fn spill_within(&self, target: u64, scope: Option<&PoolNode>) -> Result<u64> {
        if target == 0 {
            return Ok(0);
        }
        let outcome = self.spillers.spill(target, scope)?;
        if outcome.freed > 0 {
            // Relaxed (both): statistics. Saturating, like the spill round that produced them.
            saturating_add(&self.counters.spill_count, outcome.spills);
            saturating_add(&self.counters.spilled_bytes, outcome.freed);
            log::debug!(
                "[{}] spilled {} of {} asked",
                self.name,
                human(outcome.freed),
                human(target)
            );
        }
        Ok(outcome.freed)
    }

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

    fn oom(&self, consumer: &str, node: &PoolNode, bytes: u64, reason: OomReason) -> MemoryError {
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
        let allocated = self.allocs.bytes_by_pool();
        let pools: Vec<PoolUsage> = nodes
            .iter()
            .map(|(depth, n)| PoolUsage {
                path: n.path.clone(),
                depth: *depth,
                used: n.used(),
                peak: n.peak(),
                limit: n.limit,
                allocated: allocated
                    .get(&(Arc::as_ptr(n) as usize))
                    .copied()
                    .unwrap_or(0),
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
            overcommitted: self.overcommitted(),
            overcommitted_total: self.counters.overcommitted_total.load(Ordering::Relaxed),
            pools,
            top_consumers: consumers,
        }
    }

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

/// Adds `n` to a statistics counter, stopping at `u64::MAX` instead of wrapping.
fn saturating_add(counter: &AtomicU64, n: u64) {
    // Relaxed (both): a statistic; the RMW alone keeps it exact.
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_add(n))
    });
}

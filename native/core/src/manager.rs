//! The per-task memory manager: the cushion of reserved bytes, growth and release, spill
//! orchestration, allocation and close. See the crate docs for the design.

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
use crate::pool::{Pool, PoolNode};
use crate::report::{ConsumerUsage, LeakKind, LeakReport, PoolUsage, UsageReport};
use crate::reservation::ConsumerState;
use crate::spill::SpillerRegistry;
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

/// Counters behind [`ManagerStats`].
#[derive(Default)]
struct Counters {
    spill_count: AtomicU64,
    spilled_bytes: AtomicU64,
    reserve_calls: AtomicU64,
    unreserve_calls: AtomicU64,
}

/// A snapshot of a manager's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ManagerStats {
    /// Bytes used by the task now.
    pub used: u64,
    /// Peak of `used`.
    pub peak: u64,
    /// Bytes reserved from the listener now.
    pub reserved: u64,
    /// Spiller calls that freed memory.
    pub spill_count: u64,
    /// Bytes those spills freed.
    pub spilled_bytes: u64,
    /// Calls to `listener.reserve`.
    pub reserve_calls: u64,
    /// Calls to `listener.unreserve`.
    pub unreserve_calls: u64,
    /// Live allocations made through `Pool::allocate`.
    pub live_allocations: u64,
}

pub(crate) struct Inner {
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
    closed: AtomicBool,
    ids: AtomicU64,
    pub(crate) consumers: Mutex<HashMap<u64, Arc<ConsumerState>>>,
    pub(crate) spillers: SpillerRegistry,
    allocs: AllocTable,
    counters: Counters,
}

/// The memory manager of one task attempt. Cheap to clone (a shared handle); `Send + Sync`.
///
/// See the [crate documentation](crate) for the design, the data flow and the lock rule.
#[derive(Clone)]
pub struct MemoryManager {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryManager")
            .field("name", &self.inner.name)
            .field("used", &self.used())
            .field("reserved", &self.reserved())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl MemoryManager {
    /// Creates a manager named `name` (the task, for reports) that reserves from `listener`.
    pub fn new(
        name: impl Into<String>,
        config: MemoryConfig,
        listener: Arc<dyn ReservationListener>,
    ) -> Result<MemoryManager> {
        config.validate()?;
        let root = PoolNode::new_root(config.task_limit);
        Ok(MemoryManager {
            inner: Arc::new(Inner {
                name: name.into(),
                config,
                listener,
                root,
                reserved: AtomicU64::new(0),
                claims: AtomicU64::new(0),
                held_spills: AtomicU64::new(0),
                closed: AtomicBool::new(false),
                ids: AtomicU64::new(1),
                consumers: Mutex::new(HashMap::new()),
                spillers: SpillerRegistry::default(),
                allocs: AllocTable::default(),
                counters: Counters::default(),
            }),
        })
    }

    /// The manager's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Its configuration.
    pub fn config(&self) -> &MemoryConfig {
        &self.inner.config
    }

    /// The root pool (the whole task; its limit is the task limit).
    pub fn root(&self) -> Pool {
        Pool {
            node: self.inner.root.clone(),
            mgr: self.inner.clone(),
        }
    }

    /// Gets or creates the pool at `path` below the root, e.g. `sort/buffers` (a leading `root/`
    /// is accepted; `""` and `root` are the root). Pools created here have no limit.
    pub fn pool(&self, path: &str) -> Result<Pool> {
        let rel = path
            .strip_prefix("root")
            .filter(|r| r.is_empty() || r.starts_with('/'))
            .map(|r| r.trim_start_matches('/'))
            .unwrap_or(path);
        let mut pool = self.root();
        if rel.is_empty() {
            return Ok(pool);
        }
        if rel.split('/').any(str::is_empty) {
            return Err(MemoryError::InvalidArgument(format!(
                "pool path {path:?} has an empty element"
            )));
        }
        for part in rel.split('/') {
            pool = pool.child(part, None)?;
        }
        Ok(pool)
    }

    /// Bytes used by the task now (charged to the root pool).
    pub fn used(&self) -> u64 {
        self.inner.root.used.load(Ordering::Relaxed)
    }

    /// Peak of [`used`](Self::used).
    pub fn peak(&self) -> u64 {
        self.inner.root.peak.load(Ordering::Relaxed)
    }

    /// Bytes reserved from the listener and not handed back.
    pub fn reserved(&self) -> u64 {
        self.inner.reserved.load(Ordering::Acquire)
    }

    /// Asks native spillers to free `target` bytes; returns the bytes they freed. The freed bytes
    /// stay reserved (in the cushion) unless hysteresis hands them back; use
    /// [`reclaim`](Self::reclaim) to give memory back to the listener.
    pub fn spill(&self, target: u64) -> Result<u64> {
        self.inner.spill_within(target, None)
    }

    /// Hands back to the listener up to `max` bytes of the unused cushion (no spiller is asked).
    /// Returns the bytes handed back.
    pub fn release_unused(&self, max: u64) -> Result<u64> {
        self.inner.release_unused(max)
    }

    /// What the listener's owner calls when it wants memory back (Spark's `spill`): first hands
    /// back unused cushion, then spills native consumers for the rest and hands that back too.
    /// Returns the bytes this call handed back to the listener (never 0 because of block
    /// rounding when there was something to give).
    pub fn reclaim(&self, target: u64) -> Result<u64> {
        let inner = &self.inner;
        let mut given = inner.release_unused(target)?;
        if given < target {
            // What the spill frees stays in the cushion (no hysteresis hand-back on the way), so
            // the second release hands back exactly this call's bytes: the count reported to the
            // listener's owner never includes bytes other threads gave back meanwhile.
            inner.spill_held(target - given, None)?;
            given += inner.release_unused(target - given)?;
            if let Err(e) = inner.release_surplus() {
                log::warn!("[{}] handing back surplus after a reclaim: {e}", inner.name);
            }
        }
        Ok(given)
    }

    /// A snapshot of the pool tree and the largest consumers.
    pub fn usage_report(&self) -> UsageReport {
        self.inner.usage_report()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ManagerStats {
        let c = &self.inner.counters;
        ManagerStats {
            used: self.used(),
            peak: self.peak(),
            reserved: self.reserved(),
            spill_count: c.spill_count.load(Ordering::Relaxed),
            spilled_bytes: c.spilled_bytes.load(Ordering::Relaxed),
            reserve_calls: c.reserve_calls.load(Ordering::Relaxed),
            unreserve_calls: c.unreserve_calls.load(Ordering::Relaxed),
            live_allocations: self.inner.allocs.len() as u64,
        }
    }

    /// Number of registered spillers.
    pub fn spiller_count(&self) -> usize {
        self.inner.spillers.len()
    }

    /// Closes the manager: frees every live allocation, empties every live reservation, forgets
    /// the spillers and hands every reserved byte back to the listener. Returns what had to be
    /// reclaimed (empty when the owners freed everything). Idempotent: later calls return an
    /// empty report (and retry handing back bytes a failing listener kept).
    ///
    /// After close every grow fails with [`MemoryError::Closed`]; shrinking and dropping
    /// reservations stays possible (they hold nothing) and whatever they still give back goes
    /// straight to the listener. Close is meant to run when no other thread uses the manager (the
    /// JNI layer guarantees this); if one does, its bytes are returned when it releases them.
    pub fn close(&self) -> Result<LeakReport> {
        self.inner.close()
    }

    /// True once [`close`](Self::close) has been called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }
}

impl Inner {
    pub(crate) fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(MemoryError::Closed {
                manager: self.name.clone(),
            });
        }
        Ok(())
    }

    /// Charges `bytes` to `node` (and ancestors) and makes sure they are covered by the reserved
    /// cushion. On error nothing changes (apart from memory other spillers freed).
    ///
    /// Why one RMW per level plus a load of `reserved` is enough: every byte handed back to the
    /// listener is first *claimed* on the root counter (`claim_and_give_back`), exactly like a
    /// grow, and the claim is dropped only after `reserved` went down. So the root counter always
    /// includes every byte that is in use or about to leave `reserved`; a grow whose new root
    /// value is `<= reserved` (read after its own RMW) is covered whatever order a concurrent
    /// release runs in. `SeqCst` on both sides keeps the argument simple; on x86 it costs nothing
    /// more than `AcqRel` (RMWs are locked instructions, loads are plain moves).
    pub(crate) fn grow(&self, node: &Arc<PoolNode>, consumer: &str, bytes: u64) -> Result<()> {
        if bytes > MAX_REQUEST_BYTES {
            return Err(MemoryError::InvalidArgument(format!(
                "request of {bytes} bytes for '{consumer}' exceeds the maximum of {MAX_REQUEST_BYTES} bytes"
            )));
        }
        self.check_open()?;
        let mut spilled = false;
        let mut claim_retries = 0;
        let mut claim_wait: Option<std::time::Instant> = None;
        loop {
            // 1. Pool limits, leaf to root; all or nothing.
            let root_used = match node.charge(bytes) {
                Ok(root_used) => root_used,
                Err(refusal) => {
                    let limit = refusal.node.limit.unwrap_or(u64::MAX);
                    // Bytes being handed back are claimed on the root (bypassing its limit) for
                    // the length of an `unreserve` upcall: they are not usage.
                    let claims = if refusal.node.parent.is_none() {
                        self.claims.load(Ordering::SeqCst)
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
                    if !spilled {
                        spilled = true;
                        let need = real_used.saturating_add(bytes).saturating_sub(limit);
                        if self.spill_held(need, Some(&refusal.node))? > 0 {
                            continue;
                        }
                    }
                    return Err(self.oom(
                        consumer,
                        node,
                        bytes,
                        OomReason::PoolLimit {
                            pool: refusal.node.path.clone(),
                            limit,
                            used: real_used,
                        },
                    ));
                }
            };
            // 2. The cushion. The fast path ends here: no listener call.
            let reserved = self.reserved.load(Ordering::SeqCst);
            if root_used <= reserved {
                self.grown(node, spilled);
                return Ok(());
            }
            // What this call left uncovered (earlier deficits belong to other in-flight grows).
            let deficit = bytes.min(root_used - reserved);
            let (requested, granted) = match self.reserve_from_listener(deficit) {
                Ok(r) => r,
                Err(e) => {
                    node.uncharge(bytes);
                    return Err(e);
                }
            };
            if granted >= deficit {
                self.grown(node, spilled);
                return Ok(());
            }
            node.uncharge(bytes);
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
                bytes,
                OomReason::ListenerDenied { requested, granted },
            ));
        }
    }

    /// Bookkeeping after a successful grow: peaks, and if the grow spilled, surplus that the
    /// spill left beyond the hysteresis band goes back to the listener now.
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
            let room = limit.saturating_sub(self.reserved.load(Ordering::SeqCst));
            request = request.min(room.max(deficit));
        }
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
            self.reserved.fetch_add(granted, Ordering::SeqCst);
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
        let used = self.root.used.load(Ordering::SeqCst);
        self.reserved.load(Ordering::SeqCst).saturating_sub(used)
    }

    /// Returns `bytes` charged to `node`: uncharges the pools, which leaves the bytes in the
    /// cushion, and hands surplus back to the listener (hysteresis: only above two blocks, down
    /// to one).
    pub(crate) fn release(&self, node: &PoolNode, bytes: u64) -> Result<()> {
        let root_used = node.uncharge(bytes);
        if self.closed.load(Ordering::Acquire) {
            // After close nothing may stay reserved.
            return self.release_unused(u64::MAX).map(|_| ());
        }
        if self
            .reserved
            .load(Ordering::SeqCst)
            .saturating_sub(root_used)
            > self.high_water()
            && self.held_spills.load(Ordering::SeqCst) == 0
        {
            self.release_surplus()?;
        }
        Ok(())
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
        self.claims.fetch_add(bytes, Ordering::SeqCst);
        let claimed = root.fetch_add(bytes, Ordering::SeqCst) + bytes;
        if claimed > self.reserved.load(Ordering::SeqCst) {
            root.fetch_sub(bytes, Ordering::SeqCst);
            self.claims.fetch_sub(bytes, Ordering::SeqCst);
            return Ok(false);
        }
        self.counters
            .unreserve_calls
            .fetch_add(1, Ordering::Relaxed);
        // No lock is held here (lock rule).
        let result = crate::error::contain(|| self.listener.unreserve(bytes));
        if result.is_ok() {
            self.reserved.fetch_sub(bytes, Ordering::SeqCst);
        }
        root.fetch_sub(bytes, Ordering::SeqCst);
        self.claims.fetch_sub(bytes, Ordering::SeqCst);
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
        self.held_spills.fetch_add(1, Ordering::SeqCst);
        let result = self.spill_within(target, scope);
        self.held_spills.fetch_sub(1, Ordering::SeqCst);
        result
    }

    pub(crate) fn spill_within(&self, target: u64, scope: Option<&PoolNode>) -> Result<u64> {
        if target == 0 {
            return Ok(0);
        }
        let outcome = self.spillers.spill(target, scope)?;
        if outcome.freed > 0 {
            self.counters
                .spill_count
                .fetch_add(outcome.spills, Ordering::Relaxed);
            self.counters
                .spilled_bytes
                .fetch_add(outcome.freed, Ordering::Relaxed);
            log::debug!(
                "[{}] spilled {} of {} asked",
                self.name,
                human(outcome.freed),
                human(target)
            );
        }
        Ok(outcome.freed)
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
        self.grow(node, "allocations", size as u64)?;
        // SAFETY: `layout` has a non-zero size (checked above) and a valid power-of-two alignment
        // (checked by `Layout::from_size_align`).
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            if let Err(e) = self.release(node, size as u64) {
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
        self.release(meta.node(), size)?;
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
            if let Err(e) = self.release(meta.node(), layout.size() as u64) {
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

    fn usage_report(&self) -> UsageReport {
        let mut nodes = Vec::new();
        self.root.walk(0, &mut nodes);
        let mut consumers: Vec<ConsumerUsage> = self
            .consumers
            .lock()
            .values()
            .map(|c| ConsumerUsage {
                name: c.name.clone(),
                pool: c.node.path.clone(),
                used: c.size.load(Ordering::Acquire),
                peak: c.peak.load(Ordering::Relaxed),
            })
            .collect();
        let allocated = self.allocs.bytes_by_pool();
        let pools: Vec<PoolUsage> = nodes
            .iter()
            .map(|(depth, n)| PoolUsage {
                path: n.path.clone(),
                depth: *depth,
                used: n.used.load(Ordering::Relaxed),
                peak: n.peak.load(Ordering::Relaxed),
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
            used: self.root.used.load(Ordering::Relaxed),
            peak: self.root.peak.load(Ordering::Relaxed),
            reserved: self.reserved.load(Ordering::Acquire),
            task_limit: self.config.task_limit,
            reservation_block: self.config.reservation_block,
            spill_count: self.counters.spill_count.load(Ordering::Relaxed),
            spilled_bytes: self.counters.spilled_bytes.load(Ordering::Relaxed),
            pools,
            top_consumers: consumers,
        }
    }

    fn close(&self) -> Result<LeakReport> {
        let mut report = LeakReport {
            manager: self.name.clone(),
            leaks: Vec::new(),
        };
        if self.closed.swap(true, Ordering::AcqRel) {
            // Already closed: only retry handing back what a failing listener kept.
            self.release_unused(u64::MAX)?;
            return Ok(report);
        }
        self.spillers.clear();
        for (addr, meta) in self.allocs.drain() {
            let size = meta.layout.size() as u64;
            meta.node().uncharge(size);
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
        let consumers: Vec<Arc<ConsumerState>> = self.consumers.lock().values().cloned().collect();
        for c in consumers {
            let bytes = c.size.swap(0, Ordering::AcqRel);
            if bytes > 0 {
                c.node.uncharge(bytes);
                report.add(LeakKind::Reservation, &c.name, &c.node.path, bytes);
            }
        }
        if !report.is_empty() {
            log::warn!("[{}] {report}", self.name);
        }
        self.release_unused(u64::MAX)?;
        Ok(report)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.closed.load(Ordering::Acquire) {
            if let Err(e) = self.close() {
                log::error!("[{}] closing on drop: {e}", self.name);
            }
        }
    }
}

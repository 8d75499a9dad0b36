//! [`NativememPool`]: DataFusion's [`MemoryPool`] over a nativemem pool.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use datafusion_common::{DataFusionError, Result};
use datafusion_execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use nativemem_core::human;
use parking_lot::Mutex;

use crate::backend::{
    NativeError, NativePool, NativeReservation, SpillRegistration, SpillRequests,
};

/// How long a consumer that cannot spill (a merge) waits, after the task found no room, for the
/// spillable consumers asked to give memory back to do so (see [`NativememPool`]'s `try_grow`).
const UNSPILLABLE_WAIT: Duration = Duration::from_secs(5);

/// How often that wait looks whether the asked consumers released memory.
const UNSPILLABLE_RETRY: Duration = Duration::from_millis(2);

/// Runs `wait` (a bounded sleep-and-poll for other operators to spill) without holding a tokio
/// worker: on a worker of a multi-threaded runtime (where DataFusion runs its operators),
/// `block_in_place` first hands the worker's other tasks to another thread, so the operators the
/// wait is for keep running. Without it, with 2 workers, two waiting merges parked the very
/// operators that had to spill for them, and each wait ran out its bound (issue 26's matrix: runs
/// of two pools in a task past 60 s). Elsewhere (no runtime, a current-thread runtime, a
/// `LocalSet`, a blocking thread) the wait simply runs on this thread.
fn off_worker<T>(wait: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let multi_thread =
        Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
    if !multi_thread {
        return wait();
    }
    // `block_in_place` refuses (panics, before running anything) where blocking is not allowed
    // even on a multi-threaded runtime's thread (a `LocalSet` in its `block_on`): the wait then
    // runs here, as it would without a runtime.
    let mut wait = Some(wait);
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tokio::task::block_in_place(|| wait.take().map(|w| w()))
    }));
    match run {
        Ok(Some(out)) => out,
        Ok(None) => unreachable!("the wait runs once"),
        Err(panic) => match wait.take() {
            Some(w) => w(),
            None => std::panic::resume_unwind(panic),
        },
    }
}

/// One registered DataFusion consumer (one `MemoryConsumer` registration, which all its
/// reservations share: split and `new_empty` reservations count against the same consumer).
struct Consumer<R> {
    name: String,
    can_spill: bool,
    native: Arc<R>,
    /// Bytes DataFusion's infallible `grow` took that nativemem could not even force-charge (a
    /// closed manager): counted here (never lost) and charged to nativemem by the consumer's next
    /// grow or released by its shrinks first. 0 normally.
    overcommit: u64,
    /// Bytes DataFusion's infallible `grow` took that nativemem's `try_grow` refused, charged
    /// with nativemem's forced charge (crate docs, "Accounting"); released by its shrinks first.
    forced: u64,
    /// Bytes this consumer holds as DataFusion sees them (its reservations' sum).
    size: u64,
    /// The most `size` has been: the operator's peak memory.
    peak: u64,
    /// The task was asked for memory back and this consumer was picked: its next `try_grow` is
    /// refused so that it spills (see [`NativememPool::answer_spill_requests`]).
    asked: bool,
    /// Refused for a request and not grown since: not asked again until its next successful grow,
    /// so the grow an operator retries right after spilling is never refused by a request.
    yielded: bool,
    /// Refused for fairness and has released nothing since: if it grows again it could not
    /// spill, and fairness no longer refuses it (crate docs, "Fairness") until it releases.
    stuck: bool,
    /// A `try_grow` was refused (for fairness or by nativemem) and it has released nothing since.
    refused: bool,
    /// It released memory after a refusal: it spilled, and will merge its spill files.
    spilled: bool,
    /// At its last grow it held memory through another reservation too (a merge: see "Fairness").
    several: bool,
}

/// The consumer table and the spill-request counters: shared (weakly) with the spiller the pool
/// registers, which must not keep the pool alive.
struct Table<R> {
    consumers: Mutex<HashMap<usize, Consumer<R>>>,
    /// Sum of the consumers' sizes (DataFusion's view, over-commit included): changed only under
    /// `consumers`' lock, read without it (by the task's other pools too).
    reserved: AtomicU64,
    /// Budget-only mode (no pool or task limit): what the task's pools held when Spark last
    /// refused a grow of this pool, raised by every grow past it: the limit fairness works with
    /// when nativemem knows none (crate docs, "Fairness"). 0 until Spark first refuses.
    budget_seen: AtomicU64,
    requests: AtomicU64,
    requested_bytes: AtomicU64,
    yields: AtomicU64,
    yielded_bytes: AtomicU64,
    unspillable_waits: AtomicU64,
}

/// What the pool did for requests to give memory back ([`NativememPool::spill_requests`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpillRequestStats {
    /// Times nativemem asked the pool for memory (Spark asking the task, or a grow of the task
    /// finding no room).
    pub requests: u64,
    /// Bytes asked for, summed over the requests.
    pub requested_bytes: u64,
    /// `try_grow`s refused because their consumer had been asked to give memory back (each made
    /// the operator spill).
    pub yields: u64,
    /// Bytes the refused consumers held when refused (what their spills could give back).
    pub yielded_bytes: u64,
    /// Pauses of consumers that cannot spill (merges), waiting for asked consumers to spill
    /// instead of failing their query (2 ms each).
    pub unspillable_waits: u64,
}

/// What a waiting merge needs to know of a pool's consumer table (type-erased: the pools of one
/// task may have different backends).
trait Relief: Send + Sync {
    /// The bytes held by spillable consumers other than `me` that were asked to give memory back
    /// (they spill on their next `try_grow`, or are spilling now); `None` if there are none.
    fn pending(&self, me: usize) -> Option<u64>;
    /// Asks spillable consumers that are not merging to give `target` bytes back ([`pick`]);
    /// returns what the consumers asked hold.
    fn ask(&self, target: u64) -> u64;
    /// What fairness needs to know of this pool's consumers.
    fn census(&self) -> Census;
    /// Sum of the consumers' sizes (read without the table's lock).
    fn reserved(&self) -> u64;
    /// The pool's `budget_seen` (0 if none).
    fn budget_seen(&self) -> u64;
}

/// What fairness needs to know of the consumers of a task's other pools: fairness divides the
/// task's limit (or budget) among the spillable consumers of every `NativememPool` of the task,
/// not of one pool (crate docs, "Fairness"; issue 26: two pools in a task each divided the whole
/// limit among their own consumers).
#[derive(Debug, Default, Clone)]
struct Census {
    /// Bytes held by consumers that cannot spill.
    unspillable: u64,
    /// Spillable consumers registered.
    registered: u64,
    /// Sizes of the spillable consumers holding memory.
    active: Vec<u64>,
    /// A consumer registered that has not grown yet.
    fresh: bool,
    /// A consumer that cannot spill is registered (a sort's merge).
    merges: bool,
    /// Sum of the consumers' sizes.
    reserved: u64,
    /// The largest `budget_seen` of the pools counted.
    budget_seen: u64,
}

impl Census {
    fn add(&mut self, other: Census) {
        self.unspillable += other.unspillable;
        self.registered += other.registered;
        self.active.extend(other.active);
        self.fresh |= other.fresh;
        self.merges |= other.merges;
        self.reserved += other.reserved;
        self.budget_seen = self.budget_seen.max(other.budget_seen);
    }
}

impl<R: NativeReservation> Relief for Table<R> {
    fn pending(&self, me: usize) -> Option<u64> {
        let consumers = self.consumers.lock();
        consumers
            .iter()
            .filter(|(&id, c)| id != me && c.can_spill && c.size > 0 && (c.asked || c.yielded))
            .map(|(_, c)| c.size)
            .reduce(u64::saturating_add)
    }

    fn ask(&self, target: u64) -> u64 {
        pick(&mut self.consumers.lock(), target, true)
    }

    fn census(&self) -> Census {
        let consumers = self.consumers.lock();
        let mut census = Census {
            // Relaxed: a hint (see the field).
            budget_seen: self.budget_seen.load(Ordering::Relaxed),
            ..Census::default()
        };
        for c in consumers.values() {
            census.fresh |= c.peak == 0;
            census.reserved += c.size;
            if c.can_spill {
                census.registered += 1;
                if c.size > 0 {
                    census.active.push(c.size);
                }
            } else {
                census.merges = true;
                census.unspillable += c.size;
            }
        }
        census
    }

    fn reserved(&self) -> u64 {
        // Relaxed: a read-out (see the field).
        self.reserved.load(Ordering::Relaxed)
    }

    fn budget_seen(&self) -> u64 {
        // Relaxed: a hint (see the field).
        self.budget_seen.load(Ordering::Relaxed)
    }
}

/// The consumer tables of the live `NativememPool`s of one task ([`NativePool::task`]), shared by
/// those pools: a merge waiting for relief waits for the consumers asked in any pool of its task,
/// since nativemem's request asks the spillers of every pool of the task, and fairness divides
/// the task's limit among the consumers of all of them (issue 26). The lock is held only to copy
/// or edit the list, never while a table's lock is held, and never taken under one.
#[derive(Default)]
struct TaskPools {
    tables: Mutex<Vec<Weak<dyn Relief>>>,
}

impl TaskPools {
    /// The live tables of the task's pools other than `me`.
    fn others(&self, me: *const ()) -> Vec<Arc<dyn Relief>> {
        let tables = self.tables.lock();
        if tables.len() <= 1 {
            return Vec::new();
        }
        tables
            .iter()
            .filter(|t| t.as_ptr() as *const () != me)
            .filter_map(Weak::upgrade)
            .collect()
    }
}

/// Each task's [`TaskPools`], while a pool of the task lives. Locked when a pool is created or
/// dropped, never on a grow.
static TASKS: std::sync::LazyLock<Mutex<HashMap<u64, Weak<TaskPools>>>> =
    std::sync::LazyLock::new(|| Mutex::new(HashMap::new()));

/// The spiller's side: picks consumers to give memory back.
struct Requests<R>(Weak<Table<R>>);

impl<R: NativeReservation> SpillRequests for Requests<R> {
    fn spillable_bytes(&self) -> u64 {
        let Some(table) = self.0.upgrade() else {
            return 0;
        };
        let consumers = table.consumers.lock();
        consumers
            .values()
            .filter(|c| c.can_spill && !c.asked && !c.yielded && !c.several && !c.stuck)
            .map(|c| c.size.saturating_sub(c.overcommit))
            .sum()
    }

    fn request(&self, target: u64) -> u64 {
        let Some(table) = self.0.upgrade() else {
            return 0;
        };
        // Not the merging ones: for them a refusal is fatal (crate docs, "Spark asking").
        let _ = pick(&mut table.consumers.lock(), target, true);
        // Relaxed (both): statistics.
        table.requests.fetch_add(1, Ordering::Relaxed);
        table.requested_bytes.fetch_add(target, Ordering::Relaxed);
        // Nothing is freed now: the operators spill in their next try_grow, and what they free
        // goes back through their shrinks (to Spark when nativemem's cushion grows past its
        // hysteresis, see the crate docs).
        0
    }
}

/// Marks spillable consumers to be refused at their next `try_grow` (so that they spill), the
/// largest first, until what they hold covers `target`: the fewest operators disturbed (Spark's
/// order for its own consumers). With `skip_merging`, not the consumers seen merging (for which a
/// refusal is fatal).
fn pick<R>(consumers: &mut HashMap<usize, Consumer<R>>, target: u64, skip_merging: bool) -> u64 {
    let mut candidates: Vec<_> = consumers
        .values_mut()
        .filter(|c| c.can_spill && !c.asked && !c.yielded && c.size > 0)
        .filter(|c| !(skip_merging && (c.several || c.stuck)))
        .collect();
    candidates.sort_by_key(|c| std::cmp::Reverse(c.size));
    let mut covered = 0u64;
    for c in candidates {
        if covered >= target {
            break;
        }
        c.asked = true;
        covered = covered.saturating_add(c.size);
    }
    covered
}

/// Who spills when memory is short (see the crate docs, "Fairness").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Policy {
    /// With a known limit, a spillable consumer over its fair share is refused (so it spills)
    /// when growing would leave another active spillable consumer less than its share. The
    /// default: no consumer is starved by another's hoarding.
    #[default]
    FairShare,
    /// First come, first served, like DataFusion's `GreedyMemoryPool`: only nativemem's limits
    /// (and Spark's budget) refuse. Fewer spills when consumers do not compete; a consumer that
    /// comes late may find nothing left and fail.
    Greedy,
}

/// DataFusion's [`MemoryPool`] backed by a nativemem pool (see the crate docs for the design).
///
/// Install one per task (or per query): `RuntimeEnvBuilder::new().with_memory_pool(Arc::new(pool))`.
pub struct NativememPool<P: NativePool> {
    native: P,
    policy: Policy,
    table: Arc<Table<P::Reservation>>,
    /// The registered spiller, when the pool answers spill requests.
    spill_registration: Mutex<Option<SpillRegistration>>,
    /// The pools of this pool's task (`None` when the task is unknown).
    task_pools: Option<Arc<TaskPools>>,
    /// Peak of the table's `reserved`.
    peak: AtomicU64,
    /// Sum of the consumers' over-commit not charged to nativemem.
    overcommit: AtomicU64,
    /// Sum of the consumers' forced bytes, and its peak.
    forced: AtomicU64,
    forced_peak: AtomicU64,
    /// Peaks of unregistered consumers, by name (the largest registration of each name).
    finished_peaks: Mutex<HashMap<String, u64>>,
}

impl<P: NativePool> NativememPool<P> {
    /// A DataFusion pool charging `native`, with the default policy ([`Policy::FairShare`]).
    pub fn new(native: P) -> Self {
        Self::with_policy(native, Policy::default())
    }

    /// A DataFusion pool charging `native`, deciding who spills by `policy`.
    pub fn with_policy(native: P, policy: Policy) -> Self {
        let table = Arc::new(Table {
            consumers: Mutex::new(HashMap::new()),
            requests: AtomicU64::new(0),
            requested_bytes: AtomicU64::new(0),
            yields: AtomicU64::new(0),
            yielded_bytes: AtomicU64::new(0),
            unspillable_waits: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            budget_seen: AtomicU64::new(0),
        });
        let task_pools = native.task().map(|task| {
            let relief: Arc<dyn Relief> = table.clone();
            let weak = Arc::downgrade(&relief);
            drop(relief);
            let mut tasks = TASKS.lock();
            let shared = match tasks.get(&task).and_then(Weak::upgrade) {
                Some(shared) => shared,
                None => {
                    let shared = Arc::new(TaskPools::default());
                    tasks.insert(task, Arc::downgrade(&shared));
                    shared
                }
            };
            shared.tables.lock().push(weak);
            shared
        });
        NativememPool {
            native,
            policy,
            table,
            task_pools,
            spill_registration: Mutex::new(None),
            peak: AtomicU64::new(0),
            overcommit: AtomicU64::new(0),
            forced: AtomicU64::new(0),
            finished_peaks: Mutex::new(HashMap::new()),
            forced_peak: AtomicU64::new(0),
        }
    }

    /// Makes the pool answer nativemem's requests for memory: when Spark asks the task's manager
    /// for memory (another consumer of the task needs it), or a grow of the task finds no room,
    /// nativemem asks this pool after handing back its cushion; the pool picks spillable
    /// DataFusion consumers, largest first, until what they hold covers the request, and refuses
    /// each one's **next** `try_grow` so that the operator spills (DataFusion operators spill only
    /// when a grow is refused). The request itself returns at once with 0 bytes freed: the
    /// operators spill on their own threads, and the bytes they free go back to nativemem through
    /// their shrinks, and from there to Spark (the cushion's hysteresis hands back whatever
    /// exceeds two blocks). Never waits, so it cannot deadlock with the thread asking, whatever
    /// it holds (Spark's `TaskMemoryManager` monitor) or whichever thread runs the operator.
    /// Idempotent; unregistered when the pool drops.
    pub fn answer_spill_requests(&self) -> Result<(), NativeError> {
        let mut registration = self.spill_registration.lock();
        if registration.is_none() {
            let requests: Arc<dyn SpillRequests> = Arc::new(Requests(Arc::downgrade(&self.table)));
            *registration = Some(
                self.native
                    .register_spill_requests("datafusion", requests)?,
            );
        }
        Ok(())
    }

    /// What the pool did for requests to give memory back.
    pub fn spill_requests(&self) -> SpillRequestStats {
        let t = &self.table;
        // Relaxed (all): statistics.
        SpillRequestStats {
            requests: t.requests.load(Ordering::Relaxed),
            requested_bytes: t.requested_bytes.load(Ordering::Relaxed),
            yields: t.yields.load(Ordering::Relaxed),
            yielded_bytes: t.yielded_bytes.load(Ordering::Relaxed),
            unspillable_waits: t.unspillable_waits.load(Ordering::Relaxed),
        }
    }

    /// Peak of [`reserved`](MemoryPool::reserved) over the pool's life.
    pub fn peak_reserved(&self) -> u64 {
        // Relaxed: a read-out.
        self.peak.load(Ordering::Relaxed)
    }

    /// Each DataFusion consumer's peak (the most its reservations held at once, as DataFusion
    /// counts them), by consumer name: what an engine publishes as an operator's "peak memory"
    /// metric. Live and unregistered consumers alike; of several registrations with one name
    /// (an operator's partitions, each with its own pool, or re-registered), the largest.
    /// Sorted by peak, largest first.
    pub fn consumer_peaks(&self) -> Vec<(String, u64)> {
        let mut peaks = self.finished_peaks.lock().clone();
        for c in self.table.consumers.lock().values() {
            let p = peaks.entry(c.name.clone()).or_insert(0);
            *p = (*p).max(c.peak);
        }
        let mut out: Vec<(String, u64)> = peaks.into_iter().collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// Budget-only mode (no pool or task limit): the budget the task's pools have seen Spark
    /// give them, "what Spark granted plus what it could grant": what the `NativememPool`s of the
    /// task held when Spark last refused a grow of one of them, raised by every grow past that
    /// since. Fairness divides it as it divides a limit (crate docs, "Fairness"). `None` while
    /// Spark has refused nothing, or when nativemem has a limit (which fairness uses instead).
    pub fn budget_seen(&self) -> Option<u64> {
        if self.native.limit().is_some() {
            return None;
        }
        let others = self.others();
        Some(
            others
                .iter()
                .map(|t| t.budget_seen())
                .fold(Relief::budget_seen(&*self.table), u64::max),
        )
        .filter(|&b| b > 0)
    }

    /// The policy deciding who spills.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The nativemem pool.
    pub fn native(&self) -> &P {
        &self.native
    }

    /// Bytes DataFusion holds through infallible `grow`s that nativemem's `try_grow` refused
    /// (over-commit): charged to nativemem at once (so they count in the task's usage, its
    /// report and what Spark is asked for), or, if even that failed (a closed manager),
    /// [`uncharged`](Self::uncharged). 0 when no grow over-committed or all was released.
    pub fn overcommit(&self) -> u64 {
        // Relaxed (both): read-outs; the counters are only changed under the consumers' lock.
        self.forced.load(Ordering::Relaxed) + self.overcommit.load(Ordering::Relaxed)
    }

    /// The most [`overcommit`](Self::overcommit) was (charged part), over the pool's life.
    pub fn overcommit_peak(&self) -> u64 {
        // Relaxed: a read-out.
        self.forced_peak.load(Ordering::Relaxed)
    }

    /// The part of [`overcommit`](Self::overcommit) nativemem does not see (its forced charge
    /// failed: a closed manager); charged by the consumer's next `try_grow`. 0 normally.
    pub fn uncharged(&self) -> u64 {
        // Relaxed: a read-out.
        self.overcommit.load(Ordering::Relaxed)
    }

    /// Consumers registered now.
    pub fn consumer_count(&self) -> usize {
        self.table.consumers.lock().len()
    }

    /// nativemem's usage report followed by this pool's view: each DataFusion consumer's bytes,
    /// spillability and over-commit.
    pub fn report(&self) -> String {
        let mut out = self.native.usage_report();
        let consumers = self.table.consumers.lock();
        let mut rows: Vec<_> = consumers.values().collect();
        rows.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.name.cmp(&b.name)));
        out.push_str(&format!(
            "\nDataFusion consumers: {} registered, {} reserved, {} over-committed",
            rows.len(),
            human(Relief::reserved(&*self.table)),
            human(self.overcommit())
        ));
        for c in rows.iter().take(10) {
            out.push_str(&format!(
                "\n  {}{}: {}{}",
                c.name,
                if c.can_spill { " (spillable)" } else { "" },
                human(c.size),
                if c.overcommit + c.forced > 0 {
                    format!(", {} over-committed", human(c.overcommit + c.forced))
                } else {
                    String::new()
                }
            ));
        }
        out
    }

    /// The bytes held by spillable consumers other than `me` that were asked to give memory back
    /// (they spill on their next `try_grow`, or are spilling now), in every pool of the task (in
    /// this pool only when the task is unknown); `None` if there are none.
    fn relief_pending(&self, me: usize) -> Option<u64> {
        let others = self.others();
        std::iter::once(self.table.pending(me))
            .chain(others.iter().map(|t| t.pending(me)))
            .flatten()
            .reduce(u64::saturating_add)
    }

    /// The tables of the task's other live `NativememPool`s (none when the task is unknown).
    fn others(&self) -> Vec<Arc<dyn Relief>> {
        match &self.task_pools {
            Some(shared) => shared.others(Arc::as_ptr(&self.table) as *const ()),
            None => Vec::new(),
        }
    }

    /// What fairness needs of the task's other pools (each read under its own lock, one at a
    /// time, with no lock of this pool held: a snapshot, as fairness needs no more).
    fn others_census(&self) -> Census {
        let mut census = Census::default();
        for t in self.others() {
            census.add(t.census());
        }
        census
    }

    /// What the task's pools hold (this pool's and the others', read without locks).
    fn task_reserved(&self) -> u64 {
        self.others()
            .iter()
            .map(|t| t.reserved())
            .fold(Relief::reserved(&*self.table), u64::saturating_add)
    }

    /// The limit fairness divides: nativemem's (the pool's or the task's), else, budget-only,
    /// what Spark's budget let the task's pools hold when Spark last refused one of them, raised
    /// by every grow past it ([`budget_seen`](Self::budget_seen), `others` holding the task's
    /// other pools'); `None` before Spark refused anything.
    fn fairness_limit(&self, others: &Census) -> Option<u64> {
        self.native.limit().or_else(|| {
            // Relaxed: a hint (see the field).
            let own = self.table.budget_seen.load(Ordering::Relaxed);
            Some(own.max(others.budget_seen)).filter(|&b| b > 0)
        })
    }

    /// Spark's budget refused a grow of the pool (no nativemem limit): what the task's pools hold
    /// now is what the budget lets them hold, the limit fairness divides from now on.
    fn spark_refused(&self) {
        if self.native.limit().is_none() {
            let held = self.task_reserved();
            // Relaxed: a hint (see `budget_seen`).
            self.table.budget_seen.store(held.max(1), Ordering::Relaxed);
        }
    }

    /// Asks spillable consumers of the task that are not merging to give `target` bytes back for
    /// a consumer that cannot spill: this pool's first, then the task's other pools' (in this pool
    /// only when the task is unknown), until what they hold covers `target`.
    fn ask_task(&self, target: u64) {
        let mut covered = self.table.ask(target);
        for t in self.others() {
            if covered >= target {
                break;
            }
            covered = covered.saturating_add(t.ask(target - covered));
        }
    }

    /// The consumer's native reservation, and whether the fair-share policy lets it grow by
    /// `additional` (checked under the lock; nativemem's own limits are checked after, without it).
    fn admit(
        &self,
        reservation: &MemoryReservation,
        additional: u64,
    ) -> Result<(Arc<P::Reservation>, u64)> {
        let consumer = reservation.consumer();
        // Fairness spans the task's pools: their consumers, read before this pool's lock.
        let others = match self.policy {
            Policy::FairShare => self.others_census(),
            Policy::Greedy => Census::default(),
        };
        let mut consumers = self.table.consumers.lock();
        if let Some(me) = consumers.get_mut(&consumer.id()) {
            if me.asked && me.size == 0 {
                // It gave everything back meanwhile: nothing to spill, nothing to refuse.
                me.asked = false;
            } else if me.asked {
                // Asked to give memory back: this refusal makes the operator spill (once; its
                // retry after spilling goes through, and it is not asked again before).
                me.asked = false;
                me.yielded = true;
                me.refused = true;
                let held = me.size;
                // Relaxed (both): statistics.
                self.table.yields.fetch_add(1, Ordering::Relaxed);
                self.table.yielded_bytes.fetch_add(held, Ordering::Relaxed);
                return Err(DataFusionError::ResourcesExhausted(format!(
                    "Failed to allocate additional {} for {}#{}: the task was asked for memory \
                     back and this consumer holds {}; spill and retry\n{}",
                    human(additional),
                    consumer.name(),
                    consumer.id(),
                    human(held),
                    self.native.usage_report()
                )));
            }
        }
        if let Some(me) = consumers.get_mut(&consumer.id()) {
            me.several = me.size > reservation.size() as u64;
        }
        let Some(me) = consumers.get(&consumer.id()) else {
            return Err(DataFusionError::Internal(format!(
                "nativemem pool: consumer {}#{} grows without being registered",
                consumer.name(),
                consumer.id()
            )));
        };
        let limit = match self.policy {
            Policy::FairShare => self.fairness_limit(&others),
            Policy::Greedy => None,
        };
        let granted = (me.native.clone(), me.overcommit);
        let refusal = limit.and_then(|limit| {
            self.fair_share_refusal(
                &consumers,
                consumer.id(),
                me,
                reservation.size() as u64,
                additional,
                limit,
                &others,
            )
        });
        if let Some(refusal) = refusal {
            if let Some(me) = consumers.get_mut(&consumer.id()) {
                me.stuck = true;
                me.refused = true;
            }
            drop(consumers);
            return Err(DataFusionError::ResourcesExhausted(format!(
                "{refusal}\n{}",
                self.native.usage_report()
            )));
        }
        Ok(granted)
    }

    /// Fairness (see the crate docs): `Some(reason)` if the request is refused to make this
    /// consumer spill. `others`: the consumers of the task's other pools (fairness divides the
    /// task's limit among all of them).
    #[allow(clippy::too_many_arguments)]
    fn fair_share_refusal(
        &self,
        consumers: &HashMap<usize, Consumer<P::Reservation>>,
        id: usize,
        me: &Consumer<P::Reservation>,
        reservation_size: u64,
        additional: u64,
        limit: u64,
        others: &Census,
    ) -> Option<String> {
        if !me.can_spill {
            // Unspillable memory cannot be asked back: only nativemem's limits bound it.
            return None;
        }
        if me.size == 0 {
            // It holds nothing, so a refusal cannot make it spill: a sort that has spilled
            // everything (or not started) fails its query when refused with nothing in memory.
            // Free room is its (nativemem's limits still apply).
            return None;
        }
        // It holds memory through other reservations too, or it has spilled: it merges or will
        // merge (a hash aggregation's spill-file merge and its replay table are `new_empty`
        // reservations of its consumer).
        let merging = me.spilled || me.size > reservation_size;
        if me.stuck && !merging {
            // Refused for fairness and grows again without having released anything: the refusal
            // did not make it spill (it cannot), so refusing again would only fail its query.
            // Free room is its (nativemem's limits still apply).
            return None;
        }
        // One pass: unspillable bytes, the spillable consumers holding memory plus this one (an
        // idle registered sorter does not shrink a busy one's share), and every registered
        // spillable consumer (for FairSpillPool's share). The total is `reserved`, kept under the
        // same lock.
        // The task's other pools count as this pool's consumers do.
        let (mut unspillable, mut active, mut registered) = (
            others.unspillable,
            others.active.len() as u64,
            others.registered,
        );
        // Other consumers registered that have not grown yet: a partition starting late (its
        // sort, its merge's up-front reservation), not idle ones that worked and released.
        let mut fresh = others.fresh;
        // Consumers that cannot spill registered besides this one (a sort's merge): see below.
        let mut merges = others.merges;
        for (cid, c) in consumers {
            fresh |= *cid != id && c.peak == 0;
            merges |= *cid != id && !c.can_spill;
            if !c.can_spill {
                unspillable += c.size;
            } else {
                registered += 1;
                if c.size > 0 || *cid == id {
                    active += 1;
                }
            }
        }
        let active = active.max(1);
        // Relaxed: changed only under the consumers' lock, which the caller holds.
        let total = Relief::reserved(&*self.table).saturating_add(others.reserved);
        let available = limit.saturating_sub(unspillable);
        // The floor: never refuse for fairness what DataFusion's FairSpillPool would grant in the
        // same state, a reservation growing within `available / registered spillable consumers`
        // (it checks each reservation alone). A merging operator grows a second reservation while
        // its first holds what it can no longer spill (crate docs, "Fairness").
        let fsp_share = available / registered.max(1);
        if reservation_size.saturating_add(additional) <= fsp_share {
            return None;
        }
        // Over that floor, a reservation may take free memory but not the last FairSpillPool
        // share of it when:
        // - its consumer is merging: a merge would take all there is (DataFusion's multi-level
        //   merge seats as many spill files as memory allows), and the consumer's other
        //   reservation, whose refusal is fatal, would find none left. The merge, refused, seats
        //   fewer files.
        // - consumers registered have not started: DataFusion's FairSpillPool keeps their share
        //   for them, and a late partition's sort (or its merge's up-front reservation, which
        //   cannot spill) would otherwise find nothing and fail its query.
        let keep_free = (merging || fresh)
            && total.saturating_add(additional).saturating_add(fsp_share) > limit;
        // And while consumers that cannot spill are registered (each sort's merge), a spillable
        // reservation is capped at FairSpillPool's share, as DataFusion's FairSpillPool caps it,
        // so that they find room when they merge: a merge that finds none fails its query, and a
        // sort holding its batches once its input ended never grows again, so it can no longer
        // be asked to spill (issue 26's matrix: a window query's merge starved by the other
        // partition's sort holding 17 MiB of 34).
        let capped = merges && !merging;
        if keep_free || capped {
            let (what, why) = if merging {
                (
                    format!("spillable, merging, holding {}", human(me.size)),
                    "and leave less than that share free",
                )
            } else if keep_free && fresh {
                (
                    "spillable".to_string(),
                    "and leave less than that share free for consumers that have not started",
                )
            } else {
                (
                    "spillable".to_string(),
                    "kept while consumers that cannot spill are registered",
                )
            };
            return Some(format!(
                "Failed to allocate additional {} for {}#{id} ({what}): this reservation would \
                 hold {}, over FairSpillPool's share {} ({} left by unspillable consumers ({}) \
                 shared by {registered} registered spillable consumer(s)), {why} (limit {}, {} \
                 reserved)",
                human(additional),
                me.name,
                human(reservation_size.saturating_add(additional)),
                human(fsp_share),
                human(available),
                human(unspillable),
                human(limit),
                human(total),
            ));
        }
        let share = available / active;
        let wanted = me.size.saturating_add(additional);
        if wanted <= share {
            // Under its share a consumer is never refused by fairness.
            return None;
        }
        // Work-conserving: over its share a consumer may still take free memory, but not what the
        // other active spillable consumers need to reach their shares, up to one share (they grow
        // one at a time; keeping more free would leave memory unused for consumers that may never
        // ask, and refuse operators that cannot spill at that moment).
        let owed: u64 = consumers
            .iter()
            .filter(|(cid, c)| c.can_spill && c.size > 0 && **cid != id)
            .map(|(_, c)| c.size)
            .chain(others.active.iter().copied())
            .map(|size| share.saturating_sub(size))
            .sum::<u64>()
            .min(share);
        let short = total.saturating_add(additional).saturating_add(owed) > limit;
        short.then(|| {
            format!(
                "Failed to allocate additional {} for {}#{id} (spillable): it would hold {}, over its \
                 fair share {} ({} left by unspillable consumers ({}) shared by {active} active \
                 spillable consumer(s); limit {}, {} reserved, {} kept for consumers under their \
                 share); spill and retry",
                human(additional),
                me.name,
                human(wanted),
                human(share),
                human(available),
                human(unspillable),
                human(limit),
                human(total),
                human(owed)
            )
        })
    }

    /// Records a grow of `bytes` (`overcommit` of them not charged to nativemem, `forced` of
    /// them force-charged) that also charged `paid_back` bytes of the consumer's earlier
    /// over-commit to nativemem. Returns the bytes charged for over-commit that a concurrent
    /// shrink had meanwhile released (to be given back to nativemem by the caller).
    #[must_use]
    fn grown(&self, id: usize, bytes: u64, overcommit: u64, forced: u64, paid_back: u64) -> u64 {
        // Budget-only, a grant (over-commit is not one): what the task's other pools hold and
        // the budget they have seen, read before this pool's lock (never taken under it).
        let others = (self.native.limit().is_none() && forced == 0 && overcommit == 0).then(|| {
            self.others().iter().fold((0u64, 0u64), |(held, seen), t| {
                (held.saturating_add(t.reserved()), seen.max(t.budget_seen()))
            })
        });
        let mut consumers = self.table.consumers.lock();
        let Some(c) = consumers.get_mut(&id) else {
            // Unregistered meanwhile: its native reservation is gone with what it held.
            return 0;
        };
        let paid = paid_back.min(c.overcommit);
        c.size = c.size.saturating_add(bytes);
        c.peak = c.peak.max(c.size);
        c.yielded = false;
        c.overcommit = c.overcommit - paid + overcommit;
        c.forced += forced;
        // Relaxed (all): read-outs; the consistent values live under the lock, held here.
        let reserved = self.table.reserved.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(reserved, Ordering::Relaxed);
        // Spark granted past the budget the task's pools have seen: the budget is at least what
        // they hold now (budget-only; over-commit is not a grant).
        if let Some((others_held, others_seen)) = others {
            let seen = self
                .table
                .budget_seen
                .load(Ordering::Relaxed)
                .max(others_seen);
            let held = reserved.saturating_add(others_held);
            if seen > 0 && held > seen {
                self.table.budget_seen.fetch_max(held, Ordering::Relaxed);
            }
        }
        self.overcommit.fetch_add(overcommit, Ordering::Relaxed);
        self.overcommit.fetch_sub(paid, Ordering::Relaxed);
        if forced > 0 {
            let now = self.forced.fetch_add(forced, Ordering::Relaxed) + forced;
            self.forced_peak.fetch_max(now, Ordering::Relaxed);
        }
        paid_back - paid
    }
}

fn exhausted(e: NativeError, consumer: &MemoryConsumer, additional: u64) -> DataFusionError {
    if e.out_of_memory {
        DataFusionError::ResourcesExhausted(format!(
            "Failed to allocate additional {} for {}#{}: {}",
            human(additional),
            consumer.name(),
            consumer.id(),
            e.message
        ))
    } else {
        DataFusionError::External(Box::new(std::io::Error::other(format!(
            "nativemem: growing {}#{} by {} failed: {}",
            consumer.name(),
            consumer.id(),
            human(additional),
            e.message
        ))))
    }
}

impl<P: NativePool> MemoryPool for NativememPool<P> {
    fn name(&self) -> &str {
        "nativemem"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        let native = match self.native.new_reservation(consumer.name()) {
            Ok(r) => Arc::new(r),
            Err(e) => {
                // `register` cannot fail; the consumer's first grow reports it.
                log::warn!("nativemem pool: registering {}: {e}", consumer.name());
                return;
            }
        };
        self.table.consumers.lock().insert(
            consumer.id(),
            Consumer {
                name: consumer.name().to_string(),
                can_spill: consumer.can_spill(),
                native,
                overcommit: 0,
                size: 0,
                peak: 0,
                asked: false,
                yielded: false,
                forced: 0,
                stuck: false,
                refused: false,
                spilled: false,
                several: false,
            },
        );
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        let removed = {
            let mut consumers = self.table.consumers.lock();
            let removed = consumers.remove(&consumer.id());
            if let Some(c) = &removed {
                let mut done = self.finished_peaks.lock();
                let peak = done.entry(c.name.clone()).or_insert(0);
                *peak = (*peak).max(c.peak);
                // Relaxed (both): read-outs, changed only under this lock.
                self.table.reserved.fetch_sub(c.size, Ordering::Relaxed);
                self.overcommit.fetch_sub(c.overcommit, Ordering::Relaxed);
                self.forced.fetch_sub(c.forced, Ordering::Relaxed);
            }
            removed
        };
        // DataFusion frees a registration's reservations before unregistering it; whatever is
        // left goes back with the native reservation, dropped outside the lock (it may call the
        // listener).
        drop(removed);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        let consumer = reservation.consumer();
        let bytes = additional as u64;
        let native = self
            .table
            .consumers
            .lock()
            .get(&consumer.id())
            .map(|c| c.native.clone());
        // nativemem is asked as for a `try_grow` (it may reserve from Spark, or spill native
        // spillers); what it refuses is over-commit, charged at once all the same (a forced
        // charge: the task's usage, its report and the next request to Spark include it, and
        // while it keeps the task over its limit every fallible grow of the task is refused).
        let (overcommit, forced) = match native {
            Some(native) => match native.try_grow(bytes) {
                Ok(()) => (0, 0),
                Err(e) => match native.force_grow(bytes) {
                    Ok(over) => {
                        log::debug!(
                            "nativemem pool: infallible grow of {} by {additional} over-commits: {e}",
                            consumer.name()
                        );
                        // What the task's reserve did not cover: reserved from Spark now, so
                        // Spark's side shows it too, with a task limit as without (no lock held).
                        if over > 0 {
                            if let Err(e) = self.native.cover_overcommit() {
                                log::warn!("nativemem pool: reserving over-commit from Spark: {e}");
                            }
                        }
                        (0, bytes)
                    }
                    Err(f) => {
                        log::warn!(
                            "nativemem pool: infallible grow of {} by {additional} not charged: {f}",
                            consumer.name()
                        );
                        (bytes, 0)
                    }
                },
            },
            None => (bytes, 0),
        };
        let _ = self.grown(consumer.id(), bytes, overcommit, forced, 0);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        let consumer = reservation.consumer();
        let bytes = shrink as u64;
        // Over-commit goes first (it was never charged to nativemem); the rest is native.
        let (native, from_overcommit) = {
            let mut consumers = self.table.consumers.lock();
            match consumers.get_mut(&consumer.id()) {
                Some(c) => {
                    let bytes = bytes.min(c.size);
                    let from_overcommit = bytes.min(c.overcommit);
                    c.overcommit -= from_overcommit;
                    let from_forced = (bytes - from_overcommit).min(c.forced);
                    c.forced -= from_forced;
                    // Relaxed: a read-out, changed only under this lock.
                    self.forced.fetch_sub(from_forced, Ordering::Relaxed);
                    c.size -= bytes;
                    if bytes > 0 {
                        // It released memory (spilled, or output): fairness applies again.
                        c.stuck = false;
                        c.spilled |= c.refused;
                        c.refused = false;
                    }
                    // Relaxed (both): read-outs, changed only under this lock.
                    self.table.reserved.fetch_sub(bytes, Ordering::Relaxed);
                    self.overcommit
                        .fetch_sub(from_overcommit, Ordering::Relaxed);
                    (Some(c.native.clone()), from_overcommit)
                }
                None => (None, 0),
            }
        };
        if let Some(native) = native {
            let from_native = (bytes - from_overcommit).min(native.size());
            if from_native > 0 {
                if let Err(e) = native.shrink(from_native) {
                    log::warn!(
                        "nativemem pool: shrinking {} by {from_native}: {e}",
                        consumer.name()
                    );
                }
            }
        }
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let consumer = reservation.consumer();
        let bytes = additional as u64;
        let (native, owed) = self.admit(reservation, bytes)?;
        // Over-commit this consumer still owes is charged first: it makes this grow spill or
        // fail rather than letting the over-commit go on (no lock held: may call Spark, spill).
        let total = bytes.saturating_add(owed);
        let mut waiting: Option<Instant> = None;
        while let Err(e) = native.try_grow(total) {
            if e.out_of_memory && waiting.is_none() {
                self.spark_refused();
            }
            // A consumer that cannot spill (a sort's merge) fails its query on a refusal. If the
            // refusal asked spillable consumers to give memory back (answer_spill_requests),
            // their spills are on their way: wait for them, boundedly, instead of failing. No
            // lock is held while waiting, and the operators spill on their own threads. The grow
            // is retried only once they released something, so the wait does not turn into a
            // stream of requests asking ever more consumers to spill.
            let started = *waiting.get_or_insert_with(Instant::now);
            // A spillable consumer seen merging (memory in several reservations, or it grew
            // again after a fairness refusal without releasing anything) cannot spill either: a
            // hash aggregation replaying its spill files fails its query on a refusal. Nor can a
            // reservation holding nothing: a sort that has just spilled everything and retries
            // fails its query if refused again, while another consumer may hold all the room.
            let cannot_spill = !consumer.can_spill() || reservation.size() == 0 || {
                let consumers = self.table.consumers.lock();
                consumers
                    .get(&consumer.id())
                    .is_some_and(|c| c.several || c.stuck)
            };
            let mut relief = self.relief_pending(consumer.id());
            if relief.is_none() && cannot_spill {
                // No one was asked (spill requests off, or nativemem's request found no one in
                // this task), or those asked have spilled and retaken the room meanwhile: a merge
                // would fail its query while spillable consumers of the task hold the memory it
                // needs. Ask them here, as a request would (not the merging ones, for which a
                // refusal is fatal), and wait for them below; again after each round of spills,
                // within the wait's bound.
                self.ask_task(bytes);
                relief = self.relief_pending(consumer.id());
            }
            if !cannot_spill || started.elapsed() >= UNSPILLABLE_WAIT || relief.is_none() {
                if let Some(c) = self.table.consumers.lock().get_mut(&consumer.id()) {
                    c.refused = true;
                }
                return Err(exhausted(e, consumer, bytes));
            }
            off_worker(|| {
                while started.elapsed() < UNSPILLABLE_WAIT {
                    // Relaxed: a statistic.
                    self.table.unspillable_waits.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(UNSPILLABLE_RETRY);
                    match self.relief_pending(consumer.id()) {
                        Some(held) if Some(held) >= relief => {}
                        _ => break, // they released memory (or are done): retry the grow
                    }
                }
            });
        }
        let excess = self.grown(consumer.id(), bytes, 0, 0, owed);
        if excess > 0 {
            if let Err(e) = native.shrink(excess) {
                log::warn!(
                    "nativemem pool: giving back {excess} bytes of {}: {e}",
                    consumer.name()
                );
            }
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        // Relaxed: a read-out.
        Relief::reserved(&*self.table) as usize
    }

    fn memory_limit(&self) -> MemoryLimit {
        match self.native.limit() {
            Some(limit) => MemoryLimit::Finite(usize::try_from(limit).unwrap_or(usize::MAX)),
            // Spark's budget for the task is not fixed: it depends on the other tasks.
            None => MemoryLimit::Unknown,
        }
    }
}

impl<P: NativePool> fmt::Debug for NativememPool<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NativememPool")
            .field("consumers", &self.consumer_count())
            .field("reserved", &self.reserved())
            .field("overcommit", &self.overcommit())
            .field("limit", &self.native.limit())
            .finish()
    }
}

impl<P: NativePool> fmt::Display for NativememPool<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.report())
    }
}

impl<P: NativePool> Drop for NativememPool<P> {
    fn drop(&mut self) {
        let Some(shared) = self.task_pools.take() else {
            return;
        };
        // This pool's table is still alive here (held by `self`): drop its entry by identity,
        // and the dead entries of pools gone before.
        let me = Arc::as_ptr(&self.table) as *const ();
        shared
            .tables
            .lock()
            .retain(|t| t.strong_count() > 0 && t.as_ptr() as *const () != me);
        if let Some(task) = self.native.task() {
            // The task's last pool: forget the task (under the registry's lock, which a pool
            // being created holds while it joins the list, so none joins a list being dropped).
            let mut tasks = TASKS.lock();
            if Arc::strong_count(&shared) == 1 {
                tasks.remove(&task);
            }
        }
    }
}

//! # nativemem-datafusion: DataFusion's `MemoryPool` on a nativemem pool
//!
//! DataFusion operators (sorts, aggregations, joins) account their memory through the
//! [`MemoryPool`](datafusion_execution::memory_pool::MemoryPool) of their `RuntimeEnv`.
//! [`NativememPool`] is that pool for an engine running inside a Spark task: every DataFusion
//! consumer becomes a reservation of the task's nativemem pool, so DataFusion's memory counts in
//! the task's pool tree (limits, peaks, the usage report, leak checks at close) and in Spark's
//! execution memory (blocks from the task's `MemoryConsumer`), and a refused `try_grow` makes the
//! operator spill as DataFusion intends.
//!
//! ```text
//!  DataFusion operator                 NativememPool                      nativemem
//!  ───────────────────                 ─────────────                      ─────────
//!  MemoryConsumer::register ─────▶ one nativemem reservation per consumer, named as DataFusion
//!                                  names it (ExternalSorter[0], GroupedHashAggregateStream[1])
//!  reservation.try_grow(n) ──────▶ fair share check (lock held only for it)
//!                                  native.try_grow(n) (no lock) ───▶ pool limits, task limit,
//!                                                                     cushion → Spark (blocks),
//!                                  ResourcesExhausted(report) ◀──     native spillers
//!  reservation.grow(n) (infallible) ▶ native.try_grow(n), else native.force_grow(n): over-commit,
//!                                  charged at once
//!  shrink / free / drop ─────────▶ native.shrink (over-commit counted down first)
//! ```
//!
//! ## One adapter, two ways to reach nativemem
//! The pool is generic over [`NativePool`]: implemented for `nativemem_core::Pool` (feature
//! `core`: an engine that embeds nativemem, no JVM) and for [`ClientPool`] (feature `client`: an
//! engine in its own library reaching a manager Java created, through the engine ABI). Both are
//! on by default; an engine library enables only `client`.
//!
//! ```ignore
//! // In the engine's library, per task (or per query), from the two longs Java passed:
//! let api = unsafe { nativemem_client::Api::from_address(api_address) }?;
//! let pool = ClientPool::open(api.acquire(manager_handle)?, "datafusion", None)?
//!     .in_task(manager_handle);
//! let runtime = RuntimeEnvBuilder::new()
//!     .with_memory_pool(Arc::new(NativememPool::new(pool)))
//!     .build_arc()?;
//! let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), runtime);
//! ```
//!
//! ## Accounting
//! - `try_grow` charges nativemem (which may reserve a block from Spark, or spill native
//!   spillers) and, when refused, returns DataFusion's `ResourcesExhausted` carrying nativemem's
//!   message with the task's usage report, so the operator spills (or the query fails with the
//!   whole picture). Nothing is charged on error.
//! - `grow` is DataFusion's *infallible* grow: it is tried on nativemem like `try_grow`; what
//!   nativemem refuses is **over-commit**, charged to nativemem at once all the same (its forced
//!   charge, which never calls Spark or a spiller): the task's usage, peak, usage report and stats
//!   (`overcommitted`) include it, so nothing DataFusion holds is hidden from the task's
//!   accounting. Counted per consumer too ([`NativememPool::overcommit`],
//!   [`NativememPool::overcommit_peak`], [`NativememPool::report`]) and counted down first by the
//!   consumer's shrinks. DataFusion 55.2 grows infallibly in its sort-merge join (the join keys
//!   of each buffered batch it spills, and each batch it reads back) and nested-loop join.
//! - **The bound.** While over-commit keeps the task over its limit, every fallible grow of the
//!   task — of any consumer, not only the one that over-committed — is refused by nativemem's
//!   limit, so the other operators spill (or wait, or fail) instead of adding to it. So the
//!   task's usage never exceeds its limit by more than the over-commit outstanding:
//!   `used ≤ limit + overcommit()` at all times, and the over-commit itself is what DataFusion's
//!   infallible grows hold, no more (a sort-merge join spilling under 24 MiB: about 21 MiB, where
//!   it holds 65 MiB unbounded; `sort_merge_join_over_commit_is_charged_and_bounded`).
//! - **Spark sees it too.** Right after the forced charge the pool asks nativemem to reserve
//!   the uncovered over-commit from Spark ([`NativePool::cover_overcommit`], nativemem's
//!   `MemoryManager::cover_overcommit`), with a task limit as without: Spark's reservation for
//!   the task goes past the limit by what DataFusion holds past it, at once (a task held over its
//!   limit never makes the fallible grow that would otherwise pay it). What Spark does not grant
//!   stays over-commit, paid by the next grow that reaches Spark. The task's stats count it
//!   (`overcommit_peak`, `overcommitted_total`) and its usage report prints it ("Over-committed:
//!   … so far"). The [`ClientPool`] backend makes the same call through the engine ABI
//!   (`manager_cover_overcommit` on its lease of the task's manager).
//! - `reserved()` is what DataFusion holds (over-commit included); `memory_limit()` is
//!   `Finite(limit)` when the pool or the task has a limit, `Unknown` when only Spark's budget
//!   (which moves with the other tasks) bounds it.
//!
//! ## Fairness
//! With a limit `L` known, the pool decides *who* spills when memory is short, as DataFusion's
//! `FairSpillPool` intends, with the corrections DataFusion and Comet users asked for
//! (DataFusion #22036 and #25172, Comet #5214):
//! - **Shares count consumers, not reservations.** A consumer's share covers all its
//!   reservations together (split and `new_empty` reservations share its registration); only
//!   FairSpillPool's floor (below) looks at one reservation.
//! - **Idle consumers do not starve busy ones.** A spillable consumer's share is
//!   `(L − unspillable) / n`, where `n` counts the spillable consumers *holding memory* plus the
//!   one asking, not every registered one.
//! - **Work-conserving.** A consumer under its share is never refused by fairness. A spillable
//!   consumer over its share may take free memory, except what the other active spillable
//!   consumers still need to reach their shares, up to one share: it is refused (so it spills)
//!   when the grow would leave less than that free. A consumer under its share finds room to
//!   grow towards it, and no more memory is kept free for fairness' sake than one share.
//! - **The price.** Two consumers that both want everything each spill at about their share,
//!   where a first-come pool lets one run on to the limit while the other holds little; that can
//!   mean more spills (`scripts/bench.sh datafusion` measures both policies). An engine that
//!   prefers that may choose [`Policy::Greedy`] (`NativememPool::with_policy`), which refuses only
//!   on nativemem's limits — and can fail a consumer that comes late to a full pool.
//! - Unspillable consumers (they cannot give memory back) are bounded by nativemem's limits only.
//! - **Never refused for fairness when a refusal cannot make it spill.** DataFusion keeps some
//!   consumers marked spillable after they can no longer spill: a hash aggregation that spilled
//!   merges its spill files and replays them into a table, through two `new_empty` reservations
//!   of its consumer, and any refused grow then fails the query — with room left under the limit
//!   (issue 26: "it would hold 12.2 MiB, over its fair share 6.0 MiB" under 24 MiB; two
//!   `COUNT(DISTINCT)` sharing 16 MiB failed every run). DataFusion's `FairSpillPool` runs those
//!   queries because it judges each **reservation** against
//!   `fsp_share = (L − unspillable) / registered spillable consumers`. So, before the share:
//!   1. *FairSpillPool's floor*: a grow that FairSpillPool would grant in the same state (the
//!      growing reservation within `fsp_share`) is never refused for fairness. FairSpillPool
//!      counts every registered spillable consumer, so its share is never larger than ours.
//!   2. *Merges leave FairSpillPool's share free*: a consumer that is merging — it holds memory
//!      through another reservation too, or it has released memory after a refused grow (it
//!      spilled) — may grow a reservation past `fsp_share` only while that leaves `fsp_share`
//!      free. A merge would take all there is (DataFusion's multi-level merge seats as many
//!      spill files as memory allows; refused, it seats fewer), and the replay table, whose
//!      refusal is fatal, would find nothing left; with this rule it finds its floor.
//!   3. *A refusal that did not make it spill*: a consumer (not merging) refused for fairness
//!      that grows again without having released anything since could not spill; fairness no
//!      longer refuses it, the free room is its, until it releases memory.
//!   4. *Holding nothing*: a consumer that holds nothing is never refused for fairness (a
//!      refusal cannot make it spill: a sort that has spilled everything, or not started, fails
//!      its query when refused with nothing in memory).
//!
//!   nativemem's limits (the task limit, Spark's budget) still refuse when there is no room:
//!   fairness only decides who spills while there is. Rule 2 costs a consumer that spilled at
//!   most one `fsp_share` of room it could otherwise have taken when alone.
//!
//! - **Merges find room.** While a consumer that cannot spill is registered in the pool (each
//!   sort registers its merge's), a spillable reservation is capped at FairSpillPool's share, as
//!   FairSpillPool caps it: the work-conserving share above applies to plans without such
//!   consumers (aggregations). A merge grows while it runs and fails its query when refused, and
//!   a sort whose input has ended holds its batches without growing again, so a request can no
//!   longer make it spill: a window query's merge was starved by the other partition's sort
//!   holding 17 MiB of 34 (issue 26's matrix), which FairSpillPool's cap prevents.
//! - **Consumers that have not started find their floor.** A consumer over FairSpillPool's
//!   floor may not leave less than `fsp_share` free while other registered consumers have not
//!   grown yet (a late partition's sort, and its merge's up-front reservation, which cannot
//!   spill): FairSpillPool keeps their share by construction, and without this rule the first
//!   partition could take all the room and the late one fail (issue 26's matrix, sorts at 1/8 of
//!   their unbounded peak).
//!
//! - **Fairness spans the task.** The consumers counted are those of every `NativememPool` of
//!   the task (pools over one manager, or [`ClientPool`]s opened with [`ClientPool::in_task`]),
//!   not of one pool: two pools of a task share the task's limit, and each divided all of it
//!   among its own consumers before (issue 26: a sort of one pool held the room the other
//!   pool's merge needed). The other pools are read one at a time, each under its own lock and
//!   never under this pool's: a snapshot, which is all fairness needs.
//!
//! nativemem's limits and Spark's budget apply on top, to everyone.
//!
//! **Budget-only** (no pool or task limit: Spark's budget alone bounds the task, its default):
//! fairness over what Spark granted plus what it could grant. Until Spark refuses a grow of the
//! pool there is no limit to divide (first come, first served, as Spark itself serves its
//! consumers); once it refuses, what the task's pools hold then is the limit fairness divides,
//! raised by every grow Spark grants past it ([`NativememPool::budget_seen`]). A budget that shrinks
//! later is learned at the next refusal. (Issue 26, item 5: before, the window query of the
//! failure matrix failed budget-only where FairSpillPool did not.)
//!
//! ## Spark asking DataFusion for memory
//! DataFusion operators spill only when their own `try_grow` is refused; DataFusion has no hook to
//! ask them (DataFusion #21422), which is why Comet answers every Spark spill request with 0
//! (Comet #3873). With [`NativememPool::answer_spill_requests`] the pool registers a spiller with
//! nativemem, and a request to give memory back (Spark's `spill()` on the task's consumer, or a
//! grow of the task that finds no room) is answered like this:
//! 1. nativemem hands back its unused cushion at once (what Spark's `spill()` returns now);
//! 2. the pool picks spillable DataFusion consumers, largest first, until what they hold covers
//!    the rest, and refuses each one's **next** `try_grow`: the operator spills, then retries
//!    (the retry is never refused by a request, and a consumer is not asked again before it has
//!    grown);
//! 3. what the operators free goes back to nativemem through their shrinks, and nativemem hands
//!    it to Spark (its cushion keeps at most two blocks): Spark sees the memory released by the
//!    task's consumer moments later, and a `TaskMemoryManager` waiting for memory gets it then.
//!
//! A consumer that cannot spill (a sort's merge of its spill files, or a reservation that holds
//! nothing: a sort that has just spilled everything and retries) fails its query when a grow
//! is refused. When its grow finds no room and the request that refusal made picked spillable
//! consumers, it waits for them (up to 5 s, no lock held; it retries each time they have
//! released memory, so waiting never asks more consumers to spill) instead of failing: their
//! spills free the memory it needs. When no one was asked (spill requests off, the default, or
//! a request that found no one, or the consumers asked have spilled and taken the room back
//! meanwhile), the pool asks the task's spillable consumers itself, as a request would (its
//! own first, then those of the task's other `NativememPool`s; never one seen merging, for
//! which a refusal is fatal), and the merge waits for them, again after each round, within the
//! wait's bound: sorts do not starve merges in either mode. A spillable consumer seen merging (memory in
//! several reservations, or grown again after a fairness refusal without releasing anything: a
//! hash aggregation replaying its spill files) waits the same way, since it cannot spill either
//! — also in budget-only mode, when Spark refuses its grow. Only that consumer's thread waits. The wait spans every
//! `NativememPool` of the task (nativemem's request asks the spiller of each): pools over the
//! core backend know their task (the manager's id); a [`ClientPool`] knows it when opened with
//! [`ClientPool::in_task`].
//!
//! A request never waits for an operator, whatever thread asks: it cannot deadlock with the task
//! thread (which may hold Spark's `TaskMemoryManager` monitor, or run the operator itself). What
//! Spark's `spill()` returns is the cushion only; the rest follows asynchronously, within one
//! grow of each picked operator. Limits: sorts (`ExternalSorter`) handle a refused grow at every
//! point where they hold memory; DataFusion's hash aggregation, once it merges its own spill
//! files (its `ReportError` phase), treats any refused grow as fatal, as it would under a real
//! shortage. A request never picks a consumer seen merging (memory in several reservations, or
//! grown again after a fairness refusal without releasing anything), so it spares that phase
//! once seen; a request landing on an aggregation between its last spill and its merge's first
//! grow can still fail the query.
//!
//! ## Locks
//! The pool's lock guards its consumer table and is held only to read or update it: never while
//! calling nativemem (which may call Spark or a native spiller, which may call back into this
//! pool).

mod backend;
mod pool;

#[cfg(feature = "client")]
pub use backend::ClientPool;
pub use backend::{NativeError, NativePool, NativeReservation, SpillRegistration, SpillRequests};
pub use pool::{NativememPool, Policy, SpillRequestStats};

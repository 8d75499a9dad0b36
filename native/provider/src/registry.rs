//! The live managers and reservations of the process, and safe teardown under concurrency.
//!
//! The registry knows the core and the handle tables only: not the engine ABI (`abi`, which
//! builds on it), not Java. Whoever creates a manager passes its listener as
//! `Arc<dyn ReservationListener>` (the JNI crate a Java listener, `abi` a C one).
//!
//! # In-flight calls and close
//! Every call on a manager is counted while it runs, in one of two places:
//!
//! - **on the object** — the hot calls, on a reservation (Java's `NativeReservation`, the ABI's
//!   `reservation_*`) or a pool handle (`allocate`, `free`, `pool_stats`, ...): the call pins the
//!   object's slot in its handle table ([`nativemem_handles::HandleTable::pin`]), one
//!   read-modify-write on that slot's own cache line, then *reads* its manager's state word.
//!   Nothing process-wide and nothing of the manager is written, so the calls of two tasks, or of
//!   two threads of one task on their own objects, share no written cache line. The object's
//!   `Arc` is not cloned: the pin keeps it alive.
//! - **on the manager** — calls through [`enter_manager`] / [`with_manager`] (Java's read-outs,
//!   `create_reservation`) and the ABI's leases: the count in the manager's state word
//!   ([`ManagerCall`] and `Pin` are the guards). A lease is a count any thread may end.
//!
//! The manager's calls in flight are that count plus the pins of every object it owns
//! (`ManagerEntry::in_flight`). `destroy` (Java `close()`):
//!
//! 1. removes the handle from the table: later lookups fail as stale ([`Error::Handle`]: an
//!    `IllegalStateException` in Java, `NM_ERR_STALE_HANDLE` in C);
//! 2. sets `CLOSING`: calls that resolved a handle just before but have not been admitted yet
//!    are refused ([`Error::Closed`]);
//! 3. waits, up to the configured close timeout, for the calls in flight to return (it polls:
//!    a returning call signals nothing, so the hot path stays a pin and a release);
//! 4. sets `RUNNING` and checks again that nothing is in flight;
//! 5. then runs the close: drops what the manager owns in the order below, closes the core
//!    manager (frees leaked allocations, empties reservations, hands every reserved byte back
//!    through the listener) and forgets the handles of its reservations and pools.
//!
//! A pinned call increments its pin and then reads the state word; the close stores its flag and
//! then reads the pins. Both `SeqCst`: in the single order of those four accesses either the call
//! sees the flag or the close sees the pin (store buffering, Dekker), so no call is admitted
//! unseen. `tests/loom.rs` of nativemem-handles model-checks this protocol.
//!
//! **Memory is never freed under a running call.** If the wait times out, destroy marks the close
//! `DEFERRED` and fails ([`Error::CloseTimedOut`]); the last in-flight call to return runs the
//! close on its own thread. If destroy is called on a thread that is itself inside a call on the
//! same manager (a listener closing its manager from an upcall), waiting would deadlock, so the
//! close is deferred at once to when that outer call returns. Finding "the last call" without a
//! shared counter: a deferring close marks every object with pins `WATCH`
//! ([`nativemem_handles::HandleTable::watch`]), and every call admitted or refused while `CLOSING`
//! marks its own; the release that ends a watched object's pins reports it, and that thread
//! looks the manager up in `DEFERRED_CLOSES` (the list holds it alive, so a returning call never
//! touches a manager that may be gone) and runs the close if nothing is in flight any more. A
//! manager-level call sees `DEFERRED` in the result of its own decrement. `close_claimed` makes
//! the close run exactly once whoever gets there.
//!
//! **Giving back while close waits.** A call that only gives memory back (a reservation's
//! shrink, free, force-shrink or close, an allocation's free: [`Entry::GiveBack`]) is let in
//! while `CLOSING` is set *until `RUNNING` is*, i.e. while close is still waiting for other calls
//! or leases, so an engine cleaning up on another thread while close waits releases its bytes at
//! once (they are not reported as leaks) and nothing is freed under it: close sets `RUNNING`
//! only after seeing nothing in flight, and checks again after setting it, so a give-back
//! admitted just before is waited for. Once `RUNNING` is set the close owns the manager and
//! give-backs are refused too (their objects are being released by the close).
//!
//! # What a manager owns, and the order its close drops it in
//! A manager owns objects in other handle tables: its reservations (here), and the engine ABI's
//! pools, spillers and attached state (in `abi`). Each is recorded with its table, as an
//! [`OwnedTable`], and a [`CloseStage`] (`ManagerEntry::own`; `disown` when its user closes it
//! first), so this module drops them without knowing their types and `abi` depends on the
//! registry, never the reverse. The close drops, in this order:
//!
//! 1. [`CloseStage::Spillers`]: spiller registrations. Their drop callbacks run, and no spill can
//!    start after, so nothing below is spilled while it is being dropped.
//! 2. The manager's Rust attachments (`ManagerCall::attach`, test library only).
//! 3. [`CloseStage::State`]: state engines attached through the ABI (their drop callbacks run).
//! 4. The core close: frees what is left and reports it as leaked.
//! 5. [`CloseStage::AfterClose`]: the handles of reservations and pools. Their bytes were released
//!    (and reported) by the core close; from here they are stale.
//!
//! 1 to 3 run on the closing thread with calls on this manager still let in from it
//! (`CLOSING_HERE`), so memory a drop callback releases (a reservation closed, an allocation
//! freed) is given back, not reported as a leak. Objects are taken out of their tables first and
//! dropped with no lock of the registry held: a drop may call back into it.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nativemem_core::{LeakReport, MemoryConfig, MemoryManager, Reservation, ReservationListener};
use parking_lot::Mutex;

use crate::error::{panic_message, Error, Result};
use nativemem_handles::{kind, HandleError, HandleTable, Pinned};

/// Live memory managers.
static MANAGERS: HandleTable<ManagerEntry> = HandleTable::new(kind::MANAGER, "memory manager");
/// Live reservations made from Java or through the engine ABI.
static RESERVATIONS: HandleTable<ReservationEntry> =
    HandleTable::new(kind::RESERVATION, "reservation");

/// Default time `destroy` waits for in-flight calls.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

const CLOSING: u64 = 1 << 63;
const DEFERRED: u64 = 1 << 62;
/// The close owns the manager: give-backs are refused too.
const RUNNING: u64 = 1 << 61;
const COUNT_MASK: u64 = RUNNING - 1;

/// Managers whose close was deferred to their last call in flight (see the module docs). Holding
/// them here keeps them alive for the release that finds them by address; a close removes its
/// manager once it ran.
static DEFERRED_CLOSES: Mutex<Vec<Arc<ManagerEntry>>> = Mutex::new(Vec::new());

/// The manager state word on its own pair of cache lines: pinned calls on all of a manager's
/// objects read it, and nothing else on the line is written while calls run.
#[repr(align(128))]
struct StateWord(AtomicU64);

impl std::ops::Deref for StateWord {
    type Target = AtomicU64;
    fn deref(&self) -> &AtomicU64 {
        &self.0
    }
}

/// The managers one thread is inside a call of (entry addresses; a manager appears once per
/// nested call). Inline up to [`CallStack::INLINE`] nested calls, in `Cell`s of a thread-local
/// that has no destructor: recording a call is one thread-local access and two plain stores, with
/// no borrow flag and no lazy registration, and a thread that calls into the library (a Spark
/// task thread, an engine's worker) holds no heap memory of it between calls, so the library's
/// live bytes go back to their baseline when managers close, whatever threads remain. Deeper
/// nesting (spillers re-entering spillers) spills into [`IN_CALL_MORE`], a `Vec` emptied (and
/// given back) when the nesting unwinds.
struct CallStack {
    /// Entries recorded, inline and in `IN_CALL_MORE` (`len - INLINE` there once above INLINE).
    len: Cell<usize>,
    inline: [Cell<usize>; CallStack::INLINE],
}

impl CallStack {
    const INLINE: usize = 16;

    const fn new() -> CallStack {
        CallStack {
            len: Cell::new(0),
            inline: [const { Cell::new(0) }; CallStack::INLINE],
        }
    }

    #[inline]
    fn push(&self, entry: usize) {
        let len = self.len.get();
        if len < Self::INLINE {
            self.inline[len].set(entry);
        } else {
            let _ = IN_CALL_MORE.try_with(|m| {
                if let Ok(mut m) = m.try_borrow_mut() {
                    m.push(entry);
                }
            });
        }
        self.len.set(len + 1);
    }

    /// Removes one occurrence of `entry` (entries are only counted, so which one does not
    /// matter): the top one when calls end in order, as they do.
    #[inline]
    fn remove(&self, entry: usize) {
        let len = self.len.get();
        if len == 0 {
            return;
        }
        if len <= Self::INLINE && self.inline[len - 1].get() == entry {
            self.len.set(len - 1);
            return;
        }
        self.remove_slow(entry);
    }

    #[cold]
    fn remove_slow(&self, entry: usize) {
        let len = self.len.get();
        let inline_len = len.min(Self::INLINE);
        let _ = IN_CALL_MORE.try_with(|m| {
            let Ok(mut more) = m.try_borrow_mut() else {
                return;
            };
            // The top element of the whole stack, which fills the removed entry's place.
            let top = if len > Self::INLINE {
                more.pop()
            } else {
                Some(self.inline[len - 1].get())
            };
            let Some(top) = top else { return };
            if top != entry {
                if let Some(pos) = more.iter().rposition(|p| *p == entry) {
                    more[pos] = top;
                } else if let Some(pos) = self.inline[..inline_len]
                    .iter()
                    .rposition(|p| p.get() == entry)
                {
                    self.inline[pos].set(top);
                } else {
                    // Not recorded (a push lost to a thread-local being torn down): put the
                    // top back.
                    if len > Self::INLINE {
                        more.push(top);
                    }
                    return;
                }
            }
            if more.is_empty() && more.capacity() > 0 {
                *more = Vec::new(); // give the heap block back
            }
            self.len.set(len - 1);
        });
    }

    fn count(&self, entry: usize) -> usize {
        let len = self.len.get();
        let inline = self.inline[..len.min(Self::INLINE)]
            .iter()
            .filter(|p| p.get() == entry)
            .count();
        let more = if len > Self::INLINE {
            IN_CALL_MORE
                .try_with(|m| {
                    m.try_borrow()
                        .map(|m| m.iter().filter(|p| **p == entry).count())
                        .unwrap_or(0)
                })
                .unwrap_or(0)
        } else {
            0
        };
        inline + more
    }
}

thread_local! {
    /// Managers this thread is inside a call of. Lets `destroy` detect that it would wait for
    /// its own thread.
    static IN_CALL: CallStack = const { CallStack::new() };
    /// Nested calls beyond [`CallStack::INLINE`].
    static IN_CALL_MORE: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    /// The manager whose close is dropping its spillers and attached state on this thread (entry
    /// address, 0 if none). Calls on that manager from this thread are let in although it is
    /// closing: a drop callback may still close reservations and free allocations (not a leak).
    static CLOSING_HERE: Cell<usize> = const { Cell::new(0) };
}

/// Records a call on the manager `entry` on this thread.
#[inline]
fn record_call(entry: usize) {
    let _ = IN_CALL.try_with(|v| v.push(entry));
}

/// Forgets a call recorded by [`record_call`].
#[inline]
fn forget_call(entry: usize) {
    let _ = IN_CALL.try_with(|v| v.remove(entry));
}

/// A live manager as the binding holds it. Shared (`Arc`) by the table, by in-flight calls and by
/// its reservations' entries.
pub struct ManagerEntry {
    manager: MemoryManager,
    handle: AtomicI64,
    /// Manager-level calls in flight | CLOSING | DEFERRED | RUNNING. All accesses `SeqCst`: the
    /// close protocol relies on one total order of this word and the objects' pins (module docs).
    state: StateWord,
    close_claimed: AtomicBool,
    close_timeout: Duration,
    /// Handles of the objects this manager owns in other tables (reservations, and the engine
    /// ABI's pools, spillers and state), with the table and the stage of the close that drops
    /// them: close removes them, so they go stale with the manager.
    owned: Mutex<HashMap<i64, (CloseStage, &'static dyn OwnedTable)>>,
    attachments: Mutex<Vec<Box<dyn Any + Send>>>,
}

impl std::fmt::Debug for ManagerEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.load(Ordering::SeqCst);
        f.debug_struct("ManagerEntry")
            .field("name", &self.manager.name())
            .field("handle", &format_args!("{:#x}", self.handle()))
            .field("in_flight", &(state & COUNT_MASK))
            .field("closing", &(state & CLOSING != 0))
            .finish()
    }
}

impl ManagerEntry {
    /// The manager.
    pub fn manager(&self) -> &MemoryManager {
        &self.manager
    }

    /// The handle Java holds for it.
    pub fn handle(&self) -> i64 {
        self.handle.load(Ordering::Relaxed)
    }

    /// Calls in flight now: on the manager, and pinned on the objects it owns.
    pub fn in_flight(&self) -> u64 {
        let own = self.state.load(Ordering::SeqCst) & COUNT_MASK;
        let owned = self.owned.lock();
        own + owned
            .iter()
            .map(|(h, (_, table))| table.in_flight(*h))
            .sum::<u64>()
    }

    /// Nothing in flight: no manager-level call and no pin on an object it owns.
    fn drained(&self) -> bool {
        if self.state.load(Ordering::SeqCst) & COUNT_MASK != 0 {
            return false;
        }
        let owned = self.owned.lock();
        owned.iter().all(|(h, (_, table))| table.in_flight(*h) == 0)
    }

    /// Marks every object with calls in flight WATCH (a deferring close: see the module docs).
    fn watch_owned(&self) {
        let owned = self.owned.lock();
        for (h, (_, table)) in owned.iter() {
            table.watch(*h);
        }
    }

    fn closed_error(&self) -> Error {
        Error::Closed(format!(
            "memory manager '{}' (handle {:#018x}) is closed",
            self.manager.name(),
            self.handle() as u64
        ))
    }

    /// Counts a call in; refused once the manager is closing (except on the thread running its
    /// close, from a drop callback: see `CLOSING_HERE`). The pin may be dropped on any thread.
    pub(crate) fn pin(self: &Arc<Self>) -> Result<Pin> {
        self.pin_as(Entry::Work)
    }

    /// Counts a call of the kind `kind` in (see the module docs: a give-back is let in while
    /// close still waits for other calls).
    pub(crate) fn pin_as(self: &Arc<Self>, kind: Entry) -> Result<Pin> {
        let me = Arc::as_ptr(self) as usize;
        let mut cur = self.state.load(Ordering::SeqCst);
        loop {
            if cur & CLOSING != 0 {
                if CLOSING_HERE.try_with(Cell::get).ok() == Some(me) {
                    return Ok(Pin {
                        entry: self.clone(),
                        counted: false,
                    });
                }
                // A give-back while close still waits (not RUNNING: close has not started, and
                // checks again for calls in flight after setting it); anything else is refused.
                if kind != Entry::GiveBack || cur & RUNNING != 0 {
                    return Err(self.closed_error());
                }
            }
            if cur & COUNT_MASK == COUNT_MASK {
                return Err(Error::Other("too many calls in flight".into()));
            }
            match self
                .state
                .compare_exchange_weak(cur, cur + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        Ok(Pin {
            entry: self.clone(),
            counted: true,
        })
    }

    /// Counts a call in on this thread; refused once the manager is closing.
    pub fn enter(self: &Arc<Self>) -> Result<ManagerCall> {
        self.enter_as(Entry::Work)
    }

    /// Counts a call of the kind `kind` in on this thread (see [`Entry`]).
    pub(crate) fn enter_as(self: &Arc<Self>, kind: Entry) -> Result<ManagerCall> {
        let pin = self.pin_as(kind)?;
        let me = Arc::as_ptr(self) as usize;
        record_call(me);
        Ok(ManagerCall {
            pin,
            _not_send: PhantomData,
        })
    }

    /// Records that this manager owns the object `handle` of `table`: its close takes it out of
    /// the table and drops it at `stage`.
    pub(crate) fn own(&self, handle: i64, stage: CloseStage, table: &'static dyn OwnedTable) {
        self.owned.lock().insert(handle, (stage, table));
    }

    /// Forgets an owned handle (the object was closed by its user).
    pub(crate) fn disown(&self, handle: i64) {
        self.owned.lock().remove(&handle);
    }

    /// Ends a manager-level call; true if a deferred close is pending (the caller, which holds
    /// the entry's `Arc`, then runs [`finish_deferred`]).
    fn leave(&self) -> bool {
        let prev = self.state.fetch_sub(1, Ordering::SeqCst);
        prev & CLOSING != 0 && prev & DEFERRED != 0
    }

    fn calls_on_this_thread(&self) -> usize {
        let me = self as *const ManagerEntry as usize;
        IN_CALL.try_with(|v| v.count(me)).unwrap_or(0)
    }

    /// Waits until no call is in flight, sets `RUNNING`, and checks again (a give-back admitted
    /// before `RUNNING` is waited for); true once drained with `RUNNING` set, false if the
    /// deadline passes first. Polls, backing off from yields to 1 ms sleeps: a returning call
    /// signals nothing (see the module docs).
    fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut round = 0u32;
        loop {
            if self.drained() {
                if self.state.fetch_or(RUNNING, Ordering::SeqCst) & RUNNING != 0 {
                    return true;
                }
                // Just set: check again for a give-back admitted before it.
                continue;
            }
            if Instant::now() >= deadline {
                return false;
            }
            round += 1;
            if round < 16 {
                std::thread::yield_now();
            } else {
                let micros = 1u64 << (round - 16).min(10);
                std::thread::sleep(Duration::from_micros(micros).min(deadline - Instant::now()));
            }
        }
    }

    /// Runs the close if no other thread has claimed it. Returns `None` if another did.
    fn claim_and_close(&self) -> Option<Result<LeakReport>> {
        if self.close_claimed.swap(true, Ordering::SeqCst) {
            return None;
        }
        Some(self.finish_close())
    }

    /// A deferred close, if nothing is in flight any more: sets `RUNNING`, checks again, and
    /// runs the close unless another thread claimed it. `None` if it did not run here.
    fn close_if_drained(&self) -> Option<Result<LeakReport>> {
        if !self.drained() {
            return None;
        }
        if self.state.fetch_or(RUNNING, Ordering::SeqCst) & RUNNING == 0 && !self.drained() {
            // A give-back admitted just before RUNNING: its release (watched) comes back here.
            return None;
        }
        self.claim_and_close()
    }

    /// The close proper; runs exactly once, with no call in flight. The order is the one of the
    /// module docs ("What a manager owns, and the order its close drops it in").
    fn finish_close(&self) -> Result<LeakReport> {
        let me = self as *const ManagerEntry as usize;
        let previous = CLOSING_HERE.try_with(|c| c.replace(me)).unwrap_or(0);
        drop(self.take_owned(CloseStage::Spillers));
        let attachments = std::mem::take(&mut *self.attachments.lock());
        drop(attachments);
        drop(self.take_owned(CloseStage::State));
        let _ = CLOSING_HERE.try_with(|c| c.set(previous));
        let result = self.manager.close();
        drop(self.take_owned(CloseStage::AfterClose));
        Ok(result?)
    }

    /// Takes the objects owned at `stage` out of their tables and returns them, for the caller
    /// to drop with no lock of the registry held (their drops may call back into it).
    fn take_owned(&self, stage: CloseStage) -> Vec<Box<dyn Any>> {
        let mut taken: Vec<(i64, &'static dyn OwnedTable)> = Vec::new();
        self.owned.lock().retain(|handle, (s, table)| {
            let take = *s == stage;
            if take {
                taken.push((*handle, *table));
            }
            !take
        });
        taken
            .into_iter()
            .filter_map(|(h, table)| table.take(h))
            .collect()
    }
}

/// When a manager's close drops an object it owns (see the module docs for why this order).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CloseStage {
    /// First: spiller registrations (their drop callbacks run; no spill can start after).
    Spillers,
    /// After the manager's Rust attachments, before the core close: state an engine attached.
    State,
    /// After the core close: handles that only name what the core close already released
    /// (reservations, pools). Dropping them releases nothing more.
    AfterClose,
}

/// A table of objects a manager owns, outside this module (the engine ABI's pools, spillers and
/// attached state; the reservations' table here). The manager holds only handles into it, and
/// its close takes the objects out of it to drop them.
pub trait OwnedTable: Sync {
    /// Removes the object `handle` from the table and returns it, for the caller to drop outside
    /// any lock; `None` if it is gone already (its user closed it first).
    fn take(&self, handle: i64) -> Option<Box<dyn Any>>;

    /// Calls in flight pinning the object `handle` (also after its removal, until they end).
    fn in_flight(&self, handle: i64) -> u64;

    /// Marks the object `handle` so that the release ending its pins reports it (see the module
    /// docs); false if nothing pins it.
    fn watch(&self, handle: i64) -> bool;
}

impl<T: Send + Sync + 'static> OwnedTable for HandleTable<T> {
    fn take(&self, handle: i64) -> Option<Box<dyn Any>> {
        self.remove(handle)
            .ok()
            .map(|entry| Box::new(entry) as Box<dyn Any>)
    }

    fn in_flight(&self, handle: i64) -> u64 {
        HandleTable::in_flight(self, handle)
    }

    fn watch(&self, handle: i64) -> bool {
        HandleTable::watch(self, handle)
    }
}

/// What a call does to its manager, which decides whether a closing manager lets it in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Entry {
    /// New work (grows, new objects, spills, read-outs): refused once the manager is closing.
    Work,
    /// Only gives memory back (shrink, free, close of a reservation, free of an allocation):
    /// let in while close still waits for other calls (see the module docs).
    GiveBack,
}

/// Runs a deferred close of `entry` if nothing is in flight any more (see the module docs), and
/// forgets it in `DEFERRED_CLOSES` once it ran. Runs when a call returns, possibly while a panic
/// unwinds: a panic here would abort the process, so it is caught and logged.
fn finish_deferred(entry: &Arc<ManagerEntry>) {
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| entry.close_if_drained()));
    let ran = !matches!(outcome, Ok(None));
    match outcome {
        Ok(Some(Ok(report))) => log::info!(
            "[{}] deferred close done after the last in-flight call returned: {report}",
            entry.manager.name()
        ),
        Ok(Some(Err(e))) => log::error!("[{}] deferred close failed: {e}", entry.manager.name()),
        Ok(None) => {}
        Err(p) => log::error!(
            "[{}] deferred close panicked: {}",
            entry.manager.name(),
            panic_message(p.as_ref())
        ),
    }
    if ran {
        forget_deferred(entry);
    }
}

/// Drops `entry` from `DEFERRED_CLOSES` (the caller holds an `Arc` of it, so this drop is never
/// the last one, and no drop runs under the list's lock).
fn forget_deferred(entry: &Arc<ManagerEntry>) {
    let removed: Vec<Arc<ManagerEntry>> = {
        let mut list = DEFERRED_CLOSES.lock();
        let (gone, kept) = std::mem::take(&mut *list)
            .into_iter()
            .partition(|e| Arc::ptr_eq(e, entry));
        *list = kept;
        gone
    };
    drop(removed);
}

/// After the release of a watched object of the manager at `owner` (an address, never
/// dereferenced): if that manager's close is deferred, it is in `DEFERRED_CLOSES` (which keeps it
/// alive) and may be finished now.
fn after_watched_release(owner: usize) {
    let entry = DEFERRED_CLOSES
        .lock()
        .iter()
        .find(|e| Arc::as_ptr(e) as usize == owner)
        .cloned();
    if let Some(entry) = entry {
        finish_deferred(&entry);
    }
}

/// An object of a manager in one of the tables whose calls pin it (reservations here, pool
/// handles in `abi`): its owner is what a call on it is admitted by.
pub(crate) trait Owned: Send + Sync + 'static {
    /// The manager that owns the object.
    fn owner(&self) -> &Arc<ManagerEntry>;
}

/// A call in flight on an object (see the module docs: counted by the object's pin, admitted by
/// its manager's state). Derefs to the object. Drop it on the thread that made it.
pub(crate) struct ObjectCall<T: Owned> {
    pinned: ManuallyDrop<Pinned<'static, T>>,
    /// Address of the owner's entry: a lookup key after the pin is gone, never dereferenced then.
    owner: usize,
    _not_send: PhantomData<*const ()>,
}

impl<T: Owned> ObjectCall<T> {
    /// Pins the object `handle` of `table` and admits the call by its manager's state: refused
    /// once the manager is closing, except a give-back before `RUNNING` (and calls from the
    /// closing thread's drop callbacks).
    #[inline]
    pub(crate) fn enter(table: &'static HandleTable<T>, handle: i64, kind: Entry) -> Result<Self> {
        let mut pinned = match table.pin(handle) {
            Ok(p) => p,
            Err(e) => return Err(Self::refused(e)),
        };
        let me = Arc::as_ptr(pinned.owner()) as usize;
        // SeqCst, after the pin's SeqCst increment: see the module docs (Dekker).
        let state = pinned.owner().state.load(Ordering::SeqCst);
        if state & CLOSING != 0 {
            pinned = Self::admit_closing(pinned, me, state, kind)?;
        }
        record_call(me);
        Ok(ObjectCall {
            pinned: ManuallyDrop::new(pinned),
            owner: me,
            _not_send: PhantomData,
        })
    }

    /// Admission while the owner is closing (rare): `None` lets the call in, `Some` refuses it
    /// (the pin already released).
    #[cold]
    #[inline(never)]
    fn admit_closing(
        pinned: Pinned<'static, T>,
        me: usize,
        state: u64,
        kind: Entry,
    ) -> Result<Pinned<'static, T>> {
        // Whatever the answer, this release may be the one a deferred close waits for.
        pinned.watch();
        let here = CLOSING_HERE.try_with(Cell::get).ok() == Some(me);
        if !here && (kind != Entry::GiveBack || state & RUNNING != 0) {
            let err = pinned.owner().closed_error();
            if pinned.release() {
                after_watched_release(me);
            }
            return Err(err);
        }
        Ok(pinned)
    }

    /// A refused handle as the binding's error (out of line: the hot path only moves a pin).
    #[cold]
    #[inline(never)]
    fn refused(e: HandleError) -> Error {
        Error::Handle(e)
    }

    /// Removes the object from its table (its handle goes stale) while this call is in flight;
    /// returns whether other calls still had it pinned. It is dropped when the last call on it
    /// returns (this one at the latest), still counted in flight.
    pub(crate) fn unlink(&self, handle: i64) -> Result<bool> {
        let (value, others) = self.pinned.unlink(handle)?;
        drop(value);
        Ok(others)
    }
}

impl ObjectCall<ReservationEntry> {
    fn reservation_owner(&self) -> &Arc<ManagerEntry> {
        &self.pinned.owner
    }
}

impl<T: Owned> std::ops::Deref for ObjectCall<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.pinned
    }
}

impl<T: Owned> Drop for ObjectCall<T> {
    fn drop(&mut self) {
        forget_call(self.owner);
        // SAFETY: taken once, here; the field is not used after.
        let pinned = unsafe { ManuallyDrop::take(&mut self.pinned) };
        if pinned.release() {
            after_watched_release(self.owner);
        }
    }
}

/// After a removal from an owned table outside a call (`pool_close`, `spiller_unregister`,
/// `detach`): forgets the handle in its owner unless calls still pin it, and finishes a deferred
/// close if the removal's release was watched.
pub(crate) fn after_removal(owner: &Arc<ManagerEntry>, handle: i64, others: bool, watched: bool) {
    if !others {
        owner.disown(handle);
    }
    if watched && owner.state.load(Ordering::SeqCst) & DEFERRED != 0 {
        finish_deferred(owner);
    }
}

/// A counted call in flight on a manager that any thread may end (a lease of the engine ABI is
/// one). While it lives the manager cannot be closed under it.
pub(crate) struct Pin {
    entry: Arc<ManagerEntry>,
    /// False for calls let in during the close (see `CLOSING_HERE`): they count nothing.
    counted: bool,
}

impl Pin {
    pub(crate) fn entry(&self) -> &Arc<ManagerEntry> {
        &self.entry
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        if self.counted && self.entry.leave() {
            finish_deferred(&self.entry);
        }
    }
}

/// What [`destroy_manager`] did.
#[derive(Debug)]
pub enum CloseOutcome {
    /// Closed; what it had to reclaim.
    Closed(LeakReport),
    /// Called from inside a call on the same manager on this thread: the close runs when that
    /// call returns.
    Deferred {
        /// Calls in flight when destroy returned.
        in_flight: u64,
    },
}

/// A call in flight on a manager: while it lives, the manager cannot be closed under it. Drop it
/// on the thread that created it (it is neither `Send` nor `Sync`).
pub struct ManagerCall {
    pin: Pin,
    _not_send: PhantomData<*const ()>,
}

impl std::fmt::Debug for ManagerCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerCall")
            .field("entry", &self.pin.entry)
            .finish()
    }
}

impl ManagerCall {
    /// The manager.
    pub fn manager(&self) -> &MemoryManager {
        &self.pin.entry.manager
    }

    /// The entry (handle, state).
    pub fn entry(&self) -> &Arc<ManagerEntry> {
        &self.pin.entry
    }

    /// Ties `resource` to the manager's life: it is dropped when the manager closes, before the
    /// core manager is closed (so memory it releases in `Drop` is not reported as leaked), with
    /// no call in flight. Use it for operator state reachable only from native code, e.g. a
    /// spiller registration. (Engines in other libraries use the ABI's `attach`.)
    #[cfg(any(test, feature = "testing"))]
    pub fn attach(&self, resource: Box<dyn Any + Send>) {
        self.pin.entry.attachments.lock().push(resource);
    }
}

impl Drop for ManagerCall {
    fn drop(&mut self) {
        let me = Arc::as_ptr(&self.pin.entry) as usize;
        forget_call(me);
        // `self.pin` leaves after this.
    }
}

/// Creates a manager and returns its handle.
pub fn create_manager(
    name: String,
    config: MemoryConfig,
    listener: Arc<dyn ReservationListener>,
    close_timeout: Duration,
) -> Result<i64> {
    let manager = MemoryManager::with_seams(
        name,
        config,
        listener,
        Some(crate::container::gate()),
        Some(crate::arbiter::arbiter(visit_for_arbiter)),
    )?;
    let entry = Arc::new(ManagerEntry {
        manager,
        handle: AtomicI64::new(0),
        state: StateWord(AtomicU64::new(0)),
        close_claimed: AtomicBool::new(false),
        close_timeout,
        owned: Mutex::new(HashMap::new()),
        attachments: Mutex::new(Vec::new()),
    });
    let handle = MANAGERS.insert(entry.clone())?;
    entry.handle.store(handle, Ordering::Relaxed);
    crate::container::register(handle);
    Ok(handle)
}

/// How the arbiter (below this module) calls a manager: as an entered call, so a closing
/// manager refuses (skipped) and close waits for the call.
fn visit_for_arbiter(handle: i64, f: &mut dyn FnMut(&MemoryManager)) -> bool {
    match enter_manager(handle) {
        Ok(call) => {
            f(call.manager());
            true
        }
        Err(_) => false,
    }
}

/// The live manager named by `handle` (not entered).
pub(crate) fn manager_entry(handle: i64) -> Result<Arc<ManagerEntry>> {
    Ok(MANAGERS.get(handle)?)
}

/// Starts a call on the manager named by `handle`. Fails with `IllegalStateException` semantics
/// ([`Error::Handle`] / [`Error::Closed`]) for a destroyed, forged or closing manager.
pub fn enter_manager(handle: i64) -> Result<ManagerCall> {
    MANAGERS.get(handle)?.enter()
}

/// Runs `f` on the manager named by `handle`, counted as an in-flight call (the manager cannot be
/// closed while `f` runs). This is how other native code in this library (operators, their JNI
/// exports) reaches a manager whose handle Java gave them (`NativeMemoryManager.handle()`).
///
/// Native state that outlives the call (a reservation or allocation kept by a native thread, an
/// operator) must be tied to the manager with [`ManagerCall::attach`]: close drops attached state
/// first and then hands every byte back. A core `Reservation` kept elsewhere and dropped by a
/// native thread *while* the manager closes gives its bytes back only when that drop finishes,
/// possibly after `close` returned (the Spark plugin would count them as unreturned).
pub fn with_manager<R>(handle: i64, f: impl FnOnce(&MemoryManager) -> Result<R>) -> Result<R> {
    let call = enter_manager(handle)?;
    f(call.manager())
}

/// Destroys the manager named by `handle` (see the module docs). A second destroy of the same
/// handle fails as stale.
pub fn destroy_manager(handle: i64) -> Result<CloseOutcome> {
    let entry = MANAGERS.remove(handle)?;
    crate::container::unregister(handle);
    entry.state.fetch_or(CLOSING, Ordering::SeqCst);
    let own = entry.calls_on_this_thread();
    if own == 0 && entry.wait_drained(entry.close_timeout) {
        // Drained and RUNNING: no call can be admitted, nobody else claims.
        return match entry.claim_and_close() {
            Some(r) => r.map(CloseOutcome::Closed),
            None => Err(Error::Other("memory manager close claimed twice".into())),
        };
    }
    // Defer to the last call in flight (module docs): watch the objects with pins, flag, list,
    // then check once more (the last call may have returned before it could see any of it).
    entry.watch_owned();
    entry.state.fetch_or(DEFERRED, Ordering::SeqCst);
    DEFERRED_CLOSES.lock().push(entry.clone());
    if let Some(result) = entry.close_if_drained() {
        forget_deferred(&entry);
        return result.map(CloseOutcome::Closed);
    }
    let in_flight = entry.in_flight();
    if own > 0 {
        log::debug!(
            "[{}] close requested from inside a call on the same thread; deferred to its return",
            entry.manager.name()
        );
        return Ok(CloseOutcome::Deferred { in_flight });
    }
    log::warn!(
        "[{}] close timed out after {:?} waiting for {in_flight} in-flight call(s); the last one to return will close it",
        entry.manager.name(),
        entry.close_timeout
    );
    Err(Error::CloseTimedOut(format!(
        "closing memory manager '{}' timed out after {} ms: {in_flight} call(s) still in progress; \
         it is closed (no new calls are accepted) and its memory will be freed when they return",
        entry.manager.name(),
        entry.close_timeout.as_millis()
    )))
}

/// A Java-owned reservation (`NativeReservation`).
pub struct ReservationEntry {
    owner: Arc<ManagerEntry>,
    reservation: Reservation,
}

impl std::fmt::Debug for ReservationEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReservationEntry")
            .field("manager", &self.owner.manager.name())
            .field("reservation", &self.reservation)
            .finish()
    }
}

/// Creates a reservation of `bytes` in the pool at `pool_path` of the manager `handle`, for
/// `consumer`; returns its handle. On error nothing is held.
pub fn create_reservation(handle: i64, pool_path: &str, consumer: &str, bytes: u64) -> Result<i64> {
    let call = enter_manager(handle)?;
    let pool = call.manager().pool(pool_path)?;
    add_reservation(call.entry(), &pool, consumer, bytes)
}

/// Creates a reservation of `bytes` in `pool` (of the manager `owner`, which the caller has
/// entered) for `consumer`; returns its handle. On error nothing is held.
pub(crate) fn add_reservation(
    owner: &Arc<ManagerEntry>,
    pool: &nativemem_core::Pool,
    consumer: &str,
    bytes: u64,
) -> Result<i64> {
    let reservation = pool.reservation(consumer);
    reservation.try_grow(bytes)?;
    let entry = Arc::new(ReservationEntry {
        owner: owner.clone(),
        reservation,
    });
    // In flight, so the manager's close (which drains `owned`) cannot run between these.
    let rh = RESERVATIONS.insert(entry)?;
    owner.own(rh, CloseStage::AfterClose, &RESERVATIONS);
    Ok(rh)
}

/// Runs `f` on the reservation `handle`, counted as a call on its manager.
pub fn with_reservation<R>(handle: i64, f: impl FnOnce(&Reservation) -> Result<R>) -> Result<R> {
    with_reservation_as(handle, Entry::Work, f)
}

/// Runs `f` on the reservation `handle`, counted as a call of the kind `kind` on its manager:
/// [`Entry::GiveBack`] for calls that only release bytes (let in while close waits). The call
/// pins the reservation (module docs); if the reservation is released meanwhile, the end of the
/// last call on it drops it (which releases its bytes, possibly through the listener) while that
/// call still counts.
#[inline]
pub fn with_reservation_as<R>(
    handle: i64,
    kind: Entry,
    f: impl FnOnce(&Reservation) -> Result<R>,
) -> Result<R> {
    let call = ObjectCall::enter(&RESERVATIONS, handle, kind)?;
    f(&call.reservation)
}

/// Releases the reservation `handle` (Java `NativeReservation.close()`). A give-back: while its
/// manager's close waits for other calls it still releases at once; once the close runs, the
/// close releases it and this returns without error.
pub fn close_reservation(handle: i64) -> Result<()> {
    let call = match ObjectCall::enter(&RESERVATIONS, handle, Entry::GiveBack) {
        Ok(call) => call,
        Err(Error::Closed(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    // Kept to forget the handle after the reservation is gone (this call no longer pins it then).
    let owner = call.reservation_owner().clone();
    let others = call.unlink(handle)?;
    // Ends the call: the last pin drops the reservation, releasing its bytes, still in flight.
    drop(call);
    if !others {
        owner.disown(handle);
    }
    // Otherwise the handle stays in `owned` until the close: its pins are still in flight.
    Ok(())
}

impl Owned for ReservationEntry {
    fn owner(&self) -> &Arc<ManagerEntry> {
        &self.owner
    }
}

/// Live manager handles in the process.
pub fn live_managers() -> usize {
    MANAGERS.live()
}

/// Live reservation handles in the process.
pub fn live_reservations() -> usize {
    RESERVATIONS.live()
}

/// Calls in flight now on the manager named by `handle` (a diagnostic: it does not enter the
/// manager, so it works on a busy one).
pub fn in_flight(handle: i64) -> Result<u64> {
    Ok(MANAGERS.get(handle)?.in_flight())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nativemem_core::{CapacityListener, ListenerError};
    use std::sync::mpsc;

    fn new_manager(timeout: Duration) -> (i64, Arc<CapacityListener>) {
        let l = Arc::new(CapacityListener::unlimited());
        // Exact accounting (quantum 0, opt-in): these tests pin pools' used to the byte.
        let config = MemoryConfig::default().with_reservation_quantum(0);
        let h = create_manager("t".into(), config, l.clone(), timeout).unwrap();
        (h, l)
    }

    #[test]
    fn call_stack_counts_deep_and_out_of_order_calls_and_gives_its_heap_back() {
        // On a thread of its own: the thread-local starts empty.
        std::thread::spawn(|| {
            let deep = CallStack::INLINE + 5;
            for i in 0..deep {
                record_call(if i % 2 == 0 { 0xa0 } else { 0xb0 });
            }
            let count = |e| IN_CALL.with(|s| s.count(e));
            assert_eq!(count(0xa0), deep.div_ceil(2));
            assert_eq!(count(0xb0), deep / 2);
            assert!(IN_CALL_MORE.with(|m| m.borrow().len()) == 5);
            // Out of order: the oldest calls end first.
            for i in 0..deep {
                forget_call(if i % 2 == 0 { 0xa0 } else { 0xb0 });
                let left = deep - i - 1;
                assert_eq!(count(0xa0) + count(0xb0), left, "after {} ends", i + 1);
            }
            assert_eq!(IN_CALL.with(|s| s.len.get()), 0);
            assert_eq!(IN_CALL_MORE.with(|m| m.borrow().capacity()), 0);
            // Forgetting a call never recorded changes nothing.
            record_call(0xc0);
            forget_call(0xd0);
            assert_eq!(count(0xc0), 1);
            forget_call(0xc0);
            assert_eq!(count(0xc0), 0);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn destroy_closes_and_gives_everything_back() {
        let (h, l) = new_manager(DEFAULT_CLOSE_TIMEOUT);
        let r = create_reservation(h, "java/arrow", "buffers", 100).unwrap();
        assert_eq!(with_manager(h, |m| Ok(m.used())).unwrap(), 100);
        assert_eq!(l.reserved(), 8 << 20);
        let CloseOutcome::Closed(report) = destroy_manager(h).unwrap() else {
            panic!("not closed")
        };
        assert_eq!(
            report.total_bytes(),
            100,
            "open reservation reported: {report}"
        );
        assert_eq!(l.reserved(), 0);
        assert!(matches!(enter_manager(h), Err(Error::Handle(_))));
        assert!(matches!(
            with_reservation(r, |r| Ok(r.size())),
            Err(Error::Handle(_))
        ));
        assert!(matches!(destroy_manager(h), Err(Error::Handle(_))));
    }

    #[test]
    fn released_reservation_is_not_a_leak() {
        let (h, l) = new_manager(DEFAULT_CLOSE_TIMEOUT);
        let r = create_reservation(h, "a", "c", 10).unwrap();
        with_reservation(r, |res| Ok(res.try_grow(5)?)).unwrap();
        assert_eq!(with_reservation(r, |res| Ok(res.size())).unwrap(), 15);
        close_reservation(r).unwrap();
        assert!(matches!(close_reservation(r), Err(Error::Handle(_))));
        assert_eq!(with_manager(h, |m| Ok(m.used())).unwrap(), 0);
        let CloseOutcome::Closed(report) = destroy_manager(h).unwrap() else {
            panic!()
        };
        assert!(report.is_empty(), "{report}");
        assert_eq!(l.reserved(), 0);
    }

    #[test]
    fn close_waits_for_a_call_in_flight() {
        let (h, l) = new_manager(Duration::from_secs(10));
        let (entered_tx, entered_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            with_manager(h, |m| {
                let r = m.root().reservation("w");
                r.try_grow(1000)?;
                entered_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                // Still usable: close has not run under us.
                r.try_grow(1000)?;
                assert_eq!(m.used(), 2000);
                assert!(!m.is_closed());
                Ok(r.size())
            })
        });
        entered_rx.recv().unwrap();
        let closer = std::thread::spawn(move || destroy_manager(h));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!closer.is_finished(), "close must wait for the call");
        assert!(matches!(enter_manager(h), Err(Error::Handle(_))));
        go_tx.send(()).unwrap();
        assert_eq!(worker.join().unwrap().unwrap(), 2000);
        let out = closer.join().unwrap().unwrap();
        assert!(matches!(out, CloseOutcome::Closed(_)));
        assert_eq!(l.reserved(), 0);
    }

    #[test]
    fn entry_resolved_before_close_is_refused_after() {
        let (h, _l) = new_manager(DEFAULT_CLOSE_TIMEOUT);
        let entry = MANAGERS.get(h).unwrap();
        destroy_manager(h).unwrap();
        let err = entry.enter().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("memory manager 't' (handle {:#018x}) is closed", h as u64)
        );
    }

    #[test]
    fn timed_out_close_is_finished_by_the_last_call() {
        let (h, l) = new_manager(Duration::from_millis(50));
        let (entered_tx, entered_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            with_manager(h, |m| {
                let r = m.root().reservation("w");
                r.try_grow(1000)?;
                entered_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                assert!(!m.is_closed(), "closed under a running call");
                r.try_grow(1)?;
                Ok(())
            })
        });
        entered_rx.recv().unwrap();
        let entry = MANAGERS.get(h).unwrap();
        let err = destroy_manager(h).unwrap_err();
        assert!(
            err.to_string()
                .contains("timed out after 50 ms: 1 call(s) still in progress"),
            "{err}"
        );
        assert!(!entry.manager().is_closed());
        assert_eq!(l.reserved(), 8 << 20);
        go_tx.send(()).unwrap();
        worker.join().unwrap().unwrap();
        assert!(entry.manager().is_closed(), "the last call ran the close");
        assert_eq!(l.reserved(), 0);
    }

    #[test]
    fn destroy_from_inside_a_call_on_the_same_thread_defers() {
        let (h, l) = new_manager(Duration::from_secs(10));
        let started = Instant::now();
        let entry = MANAGERS.get(h).unwrap();
        with_manager(h, |m| {
            m.root().reservation("x").try_grow(5)?;
            let out = destroy_manager(h)?;
            assert!(
                matches!(out, CloseOutcome::Deferred { in_flight: 1 }),
                "{out:?}"
            );
            assert!(!m.is_closed());
            Ok(())
        })
        .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "waited for itself"
        );
        assert!(entry.manager().is_closed());
        assert_eq!(l.reserved(), 0);
    }

    #[test]
    fn attachments_are_dropped_before_the_core_close() {
        struct Holder {
            _reservation: Reservation,
        }
        let (h, l) = new_manager(DEFAULT_CLOSE_TIMEOUT);
        {
            let call = enter_manager(h).unwrap();
            let r = call.manager().pool("op").unwrap().reservation("held");
            r.try_grow(77).unwrap();
            call.attach(Box::new(Holder { _reservation: r }));
        }
        let CloseOutcome::Closed(report) = destroy_manager(h).unwrap() else {
            panic!()
        };
        assert!(
            report.is_empty(),
            "attachment released in Drop is no leak: {report}"
        );
        assert_eq!(l.reserved(), 0);
    }

    #[test]
    fn close_error_of_the_listener_is_returned() {
        struct KeepsBytes;
        impl ReservationListener for KeepsBytes {
            fn reserve(&self, b: u64) -> Result<u64, ListenerError> {
                Ok(b)
            }
            fn unreserve(&self, _: u64) -> Result<(), ListenerError> {
                Err("no".into())
            }
        }
        let h = create_manager(
            "k".into(),
            MemoryConfig::default(),
            Arc::new(KeepsBytes),
            DEFAULT_CLOSE_TIMEOUT,
        )
        .unwrap();
        with_manager(h, |m| Ok(m.root().reservation("r").try_grow(1)?)).unwrap();
        let err = destroy_manager(h).unwrap_err();
        assert!(err.to_string().contains("failed to unreserve"), "{err}");
        assert!(matches!(enter_manager(h), Err(Error::Handle(_))));
    }

    /// A call on reservation `r` on another thread, held inside the call until `go` is sent
    /// (returns once it is inside); then it grows `r` by `grow` and returns its size.
    fn hold_reservation_call(
        r: i64,
        grow: u64,
    ) -> (std::thread::JoinHandle<Result<u64>>, mpsc::Sender<()>) {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            with_reservation(r, |res| {
                entered_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                res.try_grow(grow)?;
                Ok(res.size())
            })
        });
        entered_rx.recv().unwrap();
        (worker, go_tx)
    }

    #[test]
    fn a_timed_out_close_is_finished_by_the_last_reservation_call() {
        let (h, l) = new_manager(Duration::from_millis(50));
        let r = create_reservation(h, "p", "c", 10).unwrap();
        let (worker, go_tx) = hold_reservation_call(r, 5);
        let entry = MANAGERS.get(h).unwrap();
        assert_eq!(
            entry.in_flight(),
            1,
            "the reservation's pin counts for its manager"
        );
        let err = destroy_manager(h).unwrap_err();
        assert!(
            err.to_string()
                .contains("timed out after 50 ms: 1 call(s) still in progress"),
            "{err}"
        );
        assert!(!entry.manager().is_closed(), "closed under a running call");
        // New work on the reservation is refused while the close is pending.
        assert!(matches!(
            with_reservation(r, |res| Ok(res.try_grow(1)?)),
            Err(Error::Closed(_))
        ));
        go_tx.send(()).unwrap();
        assert_eq!(worker.join().unwrap().unwrap(), 15);
        assert!(entry.manager().is_closed(), "the last call ran the close");
        assert_eq!(l.reserved(), 0);
        assert!(matches!(
            with_reservation(r, |res| Ok(res.size())),
            Err(Error::Handle(_))
        ));
    }

    #[test]
    fn close_waits_for_a_call_on_a_reservation_closed_meanwhile() {
        let (h, l) = new_manager(Duration::from_secs(10));
        let r = create_reservation(h, "p", "c", 100).unwrap();
        let (worker, go_tx) = hold_reservation_call(r, 1);
        // Closed by its user while a call on it runs: stale at once, dropped when the call ends.
        close_reservation(r).unwrap();
        assert!(matches!(close_reservation(r), Err(Error::Handle(_))));
        assert_eq!(with_manager(h, |m| Ok(m.used())).unwrap(), 100);
        let entry = MANAGERS.get(h).unwrap();
        let closer = std::thread::spawn(move || destroy_manager(h));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!closer.is_finished(), "close must wait for the call");
        assert!(!entry.manager().is_closed());
        go_tx.send(()).unwrap();
        assert_eq!(worker.join().unwrap().unwrap(), 101);
        let CloseOutcome::Closed(report) = closer.join().unwrap().unwrap() else {
            panic!("not closed")
        };
        assert!(
            report.is_empty(),
            "released by its last call, not leaked: {report}"
        );
        assert_eq!(l.reserved(), 0);
    }

    #[test]
    fn a_give_back_is_admitted_while_close_waits_and_refused_once_it_runs() {
        let (h, l) = new_manager(Duration::from_secs(10));
        let r = create_reservation(h, "p", "c", 100).unwrap();
        let (entered_tx, entered_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            with_manager(h, |_| {
                entered_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                Ok(())
            })
        });
        entered_rx.recv().unwrap();
        let closer = std::thread::spawn(move || destroy_manager(h));
        while with_reservation(r, |res| Ok(res.size())).is_ok() {
            std::thread::yield_now();
        }
        // CLOSING: new work refused, a give-back let in (released at once, no leak).
        assert!(matches!(
            with_reservation(r, |res| Ok(res.try_grow(1)?)),
            Err(Error::Closed(_))
        ));
        with_reservation_as(r, Entry::GiveBack, |res| Ok(res.shrink(40)?)).unwrap();
        close_reservation(r).unwrap();
        go_tx.send(()).unwrap();
        worker.join().unwrap().unwrap();
        let CloseOutcome::Closed(report) = closer.join().unwrap().unwrap() else {
            panic!("not closed")
        };
        assert!(report.is_empty(), "{report}");
        assert_eq!(l.reserved(), 0);
    }

    /// Close with no or a tiny timeout while threads grow, shrink, give back and close their own
    /// reservations: whether close finishes at once or is deferred, it runs exactly once, after
    /// the last call, and every byte goes back to the listener.
    #[test]
    fn deferred_closes_under_reservation_calls_always_finish() {
        for round in 0..40u64 {
            let (h, l) = new_manager(Duration::from_millis(round % 3));
            let entry = MANAGERS.get(h).unwrap();
            let workers: Vec<_> = (0..3)
                .map(|t| {
                    std::thread::spawn(move || {
                        let mut r = match create_reservation(h, &format!("w{t}"), "c", 0) {
                            Ok(r) => r,
                            Err(_) => return,
                        };
                        for i in 0u64.. {
                            let step = with_reservation(r, |res| {
                                res.try_grow(4096)?;
                                Ok(())
                            })
                            .and_then(|()| {
                                with_reservation_as(r, Entry::GiveBack, |res| Ok(res.shrink(2048)?))
                            })
                            .and_then(|()| {
                                if i % 7 == 6 {
                                    close_reservation(r)?;
                                    r = create_reservation(h, &format!("w{t}"), "c", 0)?;
                                }
                                Ok(())
                            });
                            match step {
                                Ok(()) => {}
                                Err(Error::Handle(_)) | Err(Error::Closed(_)) => return,
                                Err(e) => panic!("unexpected {e}"),
                            }
                        }
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_micros(200 + 100 * (round % 5)));
            match destroy_manager(h) {
                // Deferred in about a quarter of the rounds (timeout 0-2 ms).
                Ok(CloseOutcome::Closed(_)) | Err(Error::CloseTimedOut(_)) => {}
                other => panic!("round {round}: {other:?}"),
            }
            for w in workers {
                w.join().unwrap();
            }
            assert!(entry.manager().is_closed(), "round {round}: never closed");
            assert_eq!(l.reserved(), 0, "round {round}");
            assert_eq!(entry.in_flight(), 0);
        }
    }

    #[test]
    fn many_threads_and_concurrent_close_never_use_a_closed_manager() {
        for _ in 0..20 {
            let (h, l) = new_manager(Duration::from_secs(10));
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    std::thread::spawn(move || {
                        let mut ok = 0u64;
                        loop {
                            let r = with_manager(h, |m| {
                                assert!(!m.is_closed(), "call ran on a closed manager");
                                let r = m.root().reservation("w");
                                r.try_grow(3 << 20)?;
                                r.shrink(1 << 20)?;
                                Ok(())
                            });
                            match r {
                                Ok(()) => ok += 1,
                                Err(Error::Handle(_)) | Err(Error::Closed(_)) => return ok,
                                Err(e) => panic!("unexpected {e}"),
                            }
                        }
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(5));
            assert!(matches!(
                destroy_manager(h).unwrap(),
                CloseOutcome::Closed(_)
            ));
            for w in workers {
                w.join().unwrap();
            }
            assert_eq!(l.reserved(), 0);
        }
    }
}

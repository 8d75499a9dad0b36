//! The live managers and reservations of the process, and safe teardown under concurrency.
//!
//! The registry knows the core and the handle tables only: not the engine ABI (`abi`, which
//! builds on it), not Java. Whoever creates a manager passes its listener as
//! `Arc<dyn ReservationListener>` (the JNI crate a Java listener, `abi` a C one).
//!
//! # In-flight calls and close
//! Every call on a manager — from an export of this crate or from another crate through
//! [`enter_manager`] / [`with_manager`] — is counted while it runs ([`ManagerCall`] is the
//! guard). `destroy` (Java `close()`):
//!
//! 1. removes the handle from the table: later lookups fail as stale ([`Error::Handle`]: an
//!    `IllegalStateException` in Java, `NM_ERR_STALE_HANDLE` in C);
//! 2. sets `CLOSING`: calls that resolved the handle just before but have not entered yet are
//!    refused ([`Error::Closed`]);
//! 3. waits, up to the configured close timeout, for the calls in flight to return;
//! 4. then runs the close: drops what the manager owns in the order below, closes the core
//!    manager (frees leaked allocations, empties reservations, hands every reserved byte back
//!    through the listener) and forgets the handles of its reservations and pools.
//!
//! **Memory is never freed under a running call.** If the wait times out, destroy marks the close
//! `DEFERRED` and fails ([`Error::CloseTimedOut`]); the last in-flight call to return runs the
//! close on its own thread. If destroy is called on a thread that is itself inside a call on the
//! same manager (a listener closing its manager from an upcall), waiting would deadlock, so the
//! close is deferred at once to when that outer call returns.
//!
//! The counter and the two flags live in one atomic word, so "is a close pending" and "was I the
//! last call" are decided by the same read-modify-write: exactly one thread runs the close.
//! Entering is a compare-and-swap that refuses once `CLOSING` is set (new work: grows, new
//! objects, read-outs, spills), with one exception:
//!
//! **Giving back while close waits.** A call that only gives memory back (a reservation's
//! shrink, free, force-shrink or close, an allocation's free: [`Entry::GiveBack`]) is let in
//! while `CLOSING` is set *if the count is not zero*, i.e. while close is still waiting for
//! other calls or leases. The count being non-zero means close has not started (it starts only
//! once the count reached zero), and this call's own increment keeps it from starting until the
//! call returns, so an engine cleaning up on another thread while close waits releases its
//! bytes at once (they are not reported as leaks) and nothing is freed under it. Once the count
//! reached zero the close owns the manager and give-backs are refused too (their objects are
//! being released by the close). So after `CLOSING` the count can rise again only while it is
//! above zero; it still reaches zero exactly once.
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
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nativemem_core::{LeakReport, MemoryConfig, MemoryManager, Reservation, ReservationListener};
use parking_lot::{Condvar, Mutex};

use crate::error::{panic_message, Error, Result};
use nativemem_handles::{kind, HandleTable};

/// Live memory managers.
static MANAGERS: HandleTable<ManagerEntry> = HandleTable::new(kind::MANAGER, "memory manager");
/// Live reservations made from Java or through the engine ABI.
static RESERVATIONS: HandleTable<ReservationEntry> =
    HandleTable::new(kind::RESERVATION, "reservation");

/// Default time `destroy` waits for in-flight calls.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

const CLOSING: u64 = 1 << 63;
const DEFERRED: u64 = 1 << 62;
const COUNT_MASK: u64 = DEFERRED - 1;

/// The managers one thread is inside a call of (entry addresses; a manager appears once per
/// nested call). Inline up to [`CallStack::INLINE`] nested calls, so a thread that calls into the
/// library (a Spark task thread, an engine's worker) holds no heap memory of it between calls and
/// the library's live bytes go back to their baseline when managers close, whatever threads
/// remain; deeper nesting (spillers re-entering spillers) spills into a `Vec`.
struct CallStack {
    len: usize,
    inline: [usize; CallStack::INLINE],
    more: Vec<usize>,
}

impl CallStack {
    const INLINE: usize = 8;

    const fn new() -> CallStack {
        CallStack {
            len: 0,
            inline: [0; CallStack::INLINE],
            more: Vec::new(),
        }
    }

    fn push(&mut self, entry: usize) {
        if self.len < Self::INLINE {
            self.inline[self.len] = entry;
            self.len += 1;
        } else {
            self.more.push(entry);
        }
    }

    /// Removes the most recent occurrence of `entry`.
    fn remove(&mut self, entry: usize) {
        if let Some(pos) = self.more.iter().rposition(|p| *p == entry) {
            self.more.swap_remove(pos);
            if self.more.is_empty() {
                self.more = Vec::new(); // give the heap block back
            }
        } else if let Some(pos) = self.inline[..self.len].iter().rposition(|p| *p == entry) {
            self.inline[pos] = self.inline[self.len - 1];
            self.len -= 1;
        }
    }

    fn count(&self, entry: usize) -> usize {
        self.inline[..self.len]
            .iter()
            .chain(self.more.iter())
            .filter(|p| **p == entry)
            .count()
    }
}

thread_local! {
    /// Managers this thread is inside a call of. Lets `destroy` detect that it would wait for
    /// its own thread.
    static IN_CALL: RefCell<CallStack> = const { RefCell::new(CallStack::new()) };
    /// The manager whose close is dropping its spillers and attached state on this thread (entry
    /// address, 0 if none). Calls on that manager from this thread are let in although it is
    /// closing: a drop callback may still close reservations and free allocations (not a leak).
    static CLOSING_HERE: Cell<usize> = const { Cell::new(0) };
}

/// A live manager as the binding holds it. Shared (`Arc`) by the table, by in-flight calls and by
/// its reservations' entries.
pub struct ManagerEntry {
    manager: MemoryManager,
    handle: AtomicI64,
    /// In-flight count | CLOSING | DEFERRED. All accesses `SeqCst`: the close protocol relies on
    /// the single modification order of this word, and the cost is irrelevant next to a JNI call.
    state: AtomicU64,
    close_claimed: AtomicBool,
    drain_lock: Mutex<()>,
    drained: Condvar,
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

    /// Calls in flight now.
    pub fn in_flight(&self) -> u64 {
        self.state.load(Ordering::SeqCst) & COUNT_MASK
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
                // A give-back while close still waits (count > 0: close has not started and
                // cannot start before this call leaves); anything else is refused.
                if kind != Entry::GiveBack || cur & COUNT_MASK == 0 {
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
        let _ = IN_CALL.try_with(|v| {
            if let Ok(mut v) = v.try_borrow_mut() {
                v.push(me);
            }
        });
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

    fn leave(&self) {
        let prev = self.state.fetch_sub(1, Ordering::SeqCst);
        if prev & CLOSING != 0 && prev & COUNT_MASK == 1 {
            {
                let _guard = self.drain_lock.lock();
                self.drained.notify_all();
            }
            if prev & DEFERRED != 0 {
                self.run_deferred_close();
            }
        }
    }

    fn calls_on_this_thread(&self) -> usize {
        let me = self as *const ManagerEntry as usize;
        IN_CALL
            .try_with(|v| v.try_borrow().map(|v| v.count(me)))
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or(0)
    }

    /// Waits until no call is in flight or the deadline passes; true if drained.
    fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut guard = self.drain_lock.lock();
        while self.in_flight() != 0 {
            if self.drained.wait_until(&mut guard, deadline).timed_out() {
                return self.in_flight() == 0;
            }
        }
        true
    }

    /// Runs the close if no other thread has claimed it. Returns `None` if another did.
    fn claim_and_close(&self) -> Option<Result<LeakReport>> {
        if self.close_claimed.swap(true, Ordering::SeqCst) {
            return None;
        }
        Some(self.finish_close())
    }

    /// Runs in `ManagerCall::drop`, possibly while a panic unwinds: a panic here would abort the
    /// process, so it is caught and logged.
    fn run_deferred_close(&self) {
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.claim_and_close()));
        match outcome {
            Ok(Some(Ok(report))) => log::info!(
                "[{}] deferred close done after the last in-flight call returned: {report}",
                self.manager.name()
            ),
            Ok(Some(Err(e))) => log::error!("[{}] deferred close failed: {e}", self.manager.name()),
            Ok(None) => {}
            Err(p) => log::error!(
                "[{}] deferred close panicked: {}",
                self.manager.name(),
                panic_message(p.as_ref())
            ),
        }
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
}

impl<T: Send + Sync + 'static> OwnedTable for HandleTable<T> {
    fn take(&self, handle: i64) -> Option<Box<dyn Any>> {
        self.remove(handle)
            .ok()
            .map(|entry| Box::new(entry) as Box<dyn Any>)
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
        if self.counted {
            self.entry.leave();
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
        let _ = IN_CALL.try_with(|v| {
            if let Ok(mut v) = v.try_borrow_mut() {
                v.remove(me);
            }
        });
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
    let manager = MemoryManager::with_gate(name, config, listener, Some(crate::container::gate()))?;
    let entry = Arc::new(ManagerEntry {
        manager,
        handle: AtomicI64::new(0),
        state: AtomicU64::new(0),
        close_claimed: AtomicBool::new(false),
        drain_lock: Mutex::new(()),
        drained: Condvar::new(),
        close_timeout,
        owned: Mutex::new(HashMap::new()),
        attachments: Mutex::new(Vec::new()),
    });
    let handle = MANAGERS.insert(entry.clone())?;
    entry.handle.store(handle, Ordering::Relaxed);
    crate::container::register(handle);
    Ok(handle)
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
        // Drained and CLOSING: no call can start, nobody else claims.
        return match entry.claim_and_close() {
            Some(r) => r.map(CloseOutcome::Closed),
            None => Err(Error::Other("memory manager close claimed twice".into())),
        };
    }
    let prev = entry.state.fetch_or(DEFERRED, Ordering::SeqCst);
    let in_flight = prev & COUNT_MASK;
    if in_flight == 0 {
        // The last call returned between the wait and the flag: it did not see DEFERRED.
        return match entry.claim_and_close() {
            Some(r) => r.map(CloseOutcome::Closed),
            None => Err(Error::Other("memory manager close claimed twice".into())),
        };
    }
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
/// [`Entry::GiveBack`] for calls that only release bytes (let in while close waits).
pub fn with_reservation_as<R>(
    handle: i64,
    kind: Entry,
    f: impl FnOnce(&Reservation) -> Result<R>,
) -> Result<R> {
    let entry = RESERVATIONS.get(handle)?;
    let call = entry.owner.enter_as(kind)?;
    let result = f(&entry.reservation);
    // If the reservation was released meanwhile, this is the last reference: drop it (which
    // releases its bytes, possibly through the listener) while the call still counts.
    drop(entry);
    drop(call);
    result
}

/// Releases the reservation `handle` (Java `NativeReservation.close()`). A give-back: while its
/// manager's close waits for other calls it still releases at once; once the close runs, the
/// close releases it and this returns without error.
pub fn close_reservation(handle: i64) -> Result<()> {
    let entry = RESERVATIONS.get(handle)?;
    let Ok(call) = entry.owner.enter_as(Entry::GiveBack) else {
        return Ok(());
    };
    let removed = RESERVATIONS.remove(handle)?;
    entry.owner.disown(handle);
    drop(removed);
    drop(entry);
    drop(call);
    Ok(())
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
        let h = create_manager("t".into(), MemoryConfig::default(), l.clone(), timeout).unwrap();
        (h, l)
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

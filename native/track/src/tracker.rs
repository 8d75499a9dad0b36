//! Trackers (what a pool is charged through) and thread bindings.

use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use crate::account::{collect_retired, retire, Account, Sink, TrackerStats, REF};
use crate::alloc::{flush_local, Local, LOCAL};

/// Default flush threshold: a thread sends its batched changes once they pass 1 MiB (Doris).
pub const DEFAULT_FLUSH_THRESHOLD: u64 = 1 << 20;

/// Largest accepted flush threshold (keeps every sum of batches far from overflow).
pub const MAX_FLUSH_THRESHOLD: u64 = 1 << 40;

/// Consumer name of the reservation a tracker charges, in usage reports.
pub const DEFAULT_CONSUMER: &str = "untracked allocations";

/// What the threads bound to it allocate is charged to one pool (through a [`Sink`], a
/// reservation of that pool). Cheap to clone (`Send + Sync`); a clone is what a thread the engine
/// spawns for the task binds with.
///
/// The pool is charged while any block the tracker charged is live, even after every handle and
/// binding is gone; when the last one goes and the last block is freed, the reservation is
/// released and dropped.
pub struct Tracker {
    account: NonNull<Account>,
}

// SAFETY: the account is shared state made of atomics and a `Send + Sync` sink; a handle is a
// counted reference to it, like an `Arc`.
unsafe impl Send for Tracker {}
// SAFETY: as above; `&Tracker` only reads atomics and takes references.
unsafe impl Sync for Tracker {}

impl Tracker {
    /// A tracker charging `sink`, flushing per [`DEFAULT_FLUSH_THRESHOLD`].
    pub fn new(sink: impl Sink) -> Tracker {
        Tracker::with_threshold(sink, DEFAULT_FLUSH_THRESHOLD)
    }

    /// A tracker charging `sink`, each thread flushing once its batch passes `threshold` bytes
    /// (clamped to 1 ..= [`MAX_FLUSH_THRESHOLD`]; 1 flushes every allocation, for tests).
    pub fn with_threshold(sink: impl Sink, threshold: u64) -> Tracker {
        let threshold = threshold.clamp(1, MAX_FLUSH_THRESHOLD) as i64;
        // The account and the boxed sink are bookkeeping, not the engine's memory.
        let account = untracked(|| {
            collect_retired();
            Account::new(Box::new(sink), threshold)
        });
        Tracker {
            // SAFETY: `Account::new` returns a `Box::into_raw` pointer, never null.
            account: unsafe { NonNull::new_unchecked(account as *mut Account) },
        }
    }

    /// A tracker charging a new reservation of `pool` (engine ABI) named `consumer`.
    pub fn for_pool(
        pool: &nativemem_client::Pool,
        consumer: &str,
    ) -> nativemem_client::Result<Tracker> {
        let reservation = untracked(|| pool.reservation(consumer))?;
        Ok(Tracker::new(reservation))
    }

    /// A tracker charging a new reservation of a core `pool` named `consumer`.
    #[cfg(feature = "core")]
    pub fn for_core_pool(pool: &nativemem_core::Pool, consumer: &str) -> Tracker {
        Tracker::new(untracked(|| pool.reservation(consumer)))
    }

    fn account(&self) -> &Account {
        // SAFETY: this handle holds a reference, so the account is live.
        unsafe { self.account.as_ref() }
    }

    /// The flush threshold in bytes.
    pub fn threshold(&self) -> u64 {
        self.account().threshold as u64
    }

    /// Read-outs (a snapshot, not a consistent cut).
    pub fn stats(&self) -> TrackerStats {
        self.account().stats()
    }

    /// Binds the current thread: what it allocates until the guard drops is charged to this
    /// tracker's pool. Bindings nest (the previous one is restored when the guard drops) and
    /// must end in reverse order, like scopes. Memory allocated under the binding stays charged
    /// to this tracker whichever thread frees it, and whenever.
    pub fn track_thread(&self) -> ThreadGuard {
        ThreadGuard::bind(self)
    }

    /// Sends the current thread's batch (if it is bound to this tracker) and everything waiting
    /// to the pool now, so that the pool shows exactly what is live. Not needed for correctness.
    pub fn flush(&self) {
        let me = self.account.as_ptr() as *const Account;
        let _ = LOCAL.try_with(|l| {
            if l.account.get() == me {
                flush_local(l);
            }
        });
        untracked(|| self.account().push());
    }
}

impl Clone for Tracker {
    fn clone(&self) -> Tracker {
        self.account().acquire_ref();
        Tracker {
            account: self.account,
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        release_ref(self.account.as_ptr());
    }
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("threshold", &self.threshold())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Drops one reference of `account` outside the allocator; retires it if it was the last and
/// no tracked byte is live.
fn release_ref(account: *const Account) {
    untracked(|| {
        // SAFETY: the caller owns the reference being released, so the account is live.
        if unsafe { &*account }.add_state(-REF) {
            // SAFETY: this thread's RMW brought the state to 0; not in the allocator.
            unsafe { retire(account, true, false) };
        }
        collect_retired();
    })
}

/// A binding of the current thread to a [`Tracker`]; unbinds (restoring the previous binding)
/// when dropped. Not `Send`: it belongs to the thread it binds.
#[must_use = "the thread is unbound when the guard is dropped"]
pub struct ThreadGuard {
    /// The bound account (its reference is owned by the thread's binding); null if the thread's
    /// locals were unavailable (the thread is exiting) and nothing was bound.
    account: *const Account,
    /// The binding this one replaced (its reference moves back to the thread when this ends).
    prev: *const Account,
    _not_send: PhantomData<*const ()>,
}

impl ThreadGuard {
    fn bind(tracker: &Tracker) -> ThreadGuard {
        let account = tracker.account.as_ptr() as *const Account;
        let bound = LOCAL.try_with(|l| {
            untracked_in(l, collect_retired);
            // The batch so far belongs to the previous binding.
            flush_local(l);
            tracker.account().acquire_ref();
            l.bind(account, tracker.account().threshold)
        });
        match bound {
            Ok(prev) => ThreadGuard {
                account,
                prev,
                _not_send: PhantomData,
            },
            Err(_) => ThreadGuard {
                account: ptr::null(),
                prev: ptr::null(),
                _not_send: PhantomData,
            },
        }
    }

    /// A handle on the tracker this guard binds, to bind the threads the engine spawns for the
    /// same work (`None` if nothing was bound: the thread was exiting).
    pub fn tracker(&self) -> Option<Tracker> {
        let account = NonNull::new(self.account as *mut Account)?;
        // SAFETY: the binding holds a reference, so the account is live.
        unsafe { account.as_ref() }.acquire_ref();
        Some(Tracker { account })
    }

    /// Read-outs of the tracker this guard binds (zeros if nothing was bound).
    pub fn stats(&self) -> TrackerStats {
        if self.account.is_null() {
            return TrackerStats::default();
        }
        // SAFETY: the binding holds a reference.
        unsafe { &*self.account }.stats()
    }
}

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        if self.account.is_null() {
            return;
        }
        let restored = LOCAL.try_with(|l: &Local| {
            if l.account.get() != self.account {
                // Dropped out of order, while a binding made after it is active: that binding
                // will restore this one's account when it ends, so both references (this
                // binding's and the one it replaced) stay held: nothing dangles, the thread stays
                // charged to this tracker until it exits. Scoped use never gets here.
                return false;
            }
            flush_local(l);
            let limit = if self.prev.is_null() {
                0
            } else {
                // SAFETY: the restored binding owns a reference to `prev`.
                unsafe { &*self.prev }.threshold
            };
            l.bind(self.prev, limit);
            true
        });
        if restored == Ok(true) {
            release_ref(self.account);
        }
    }
}

/// Runs `f` with tracking suspended on this thread: what it allocates is not charged (frees of
/// tracked blocks are still credited). For bookkeeping that outlives a task, such as a cache
/// shared by all tasks.
pub fn untracked<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            let was = self.0;
            let _ = LOCAL.try_with(|l| l.set_busy(was));
        }
    }
    let was = LOCAL.try_with(|l| l.set_busy(true)).unwrap_or(true);
    let _restore = Restore(was);
    f()
}

fn untracked_in(l: &Local, f: impl FnOnce()) {
    let was = l.set_busy(true);
    f();
    l.set_busy(was);
}

/// Frees the bookkeeping of trackers whose last tracked block was freed inside the allocator
/// (their reservation is dropped here, outside it). Trackers and bindings do this when they are
/// created or dropped; call it from engine code at a task boundary to be prompt.
pub fn collect() {
    untracked(collect_retired);
}

/// `pool.track_thread()`: binds the current thread to a new tracker of the pool.
pub trait TrackPool {
    /// The pool's error type.
    type Error;

    /// A new tracker charging a reservation of this pool named [`DEFAULT_CONSUMER`].
    fn tracker(&self) -> Result<Tracker, Self::Error>;

    /// Binds the current thread to a new tracker of this pool (see [`Tracker::track_thread`]).
    /// Threads the engine spawns for the same work bind to the same tracker with
    /// [`ThreadGuard::tracker`] (a clone moved into the thread) and [`Tracker::track_thread`].
    fn track_thread(&self) -> Result<ThreadGuard, Self::Error> {
        Ok(self.tracker()?.track_thread())
    }
}

impl TrackPool for nativemem_client::Pool {
    type Error = nativemem_client::Error;
    fn tracker(&self) -> Result<Tracker, Self::Error> {
        Tracker::for_pool(self, DEFAULT_CONSUMER)
    }
}

#[cfg(feature = "core")]
impl TrackPool for nativemem_core::Pool {
    type Error = std::convert::Infallible;
    fn tracker(&self) -> Result<Tracker, Self::Error> {
        Ok(Tracker::for_core_pool(self, DEFAULT_CONSUMER))
    }
}

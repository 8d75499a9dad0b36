//! [`Lease`]: a manager pinned open for a span of work; [`Attachment`]: state tied to its life.

use std::ffi::{c_char, c_void};
use std::fmt;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::{Arc, Mutex, PoisonError};

use nativemem_sys as sys;

use crate::api::{c_string, handle_from_java, limit_to_c, panic_message, Api, OwnedManager};
use crate::error::{take_message, Result};
use crate::pool::{Pool, PoolHandle};

// Leases are made here, not in `api`, so that `api` stays below this module.
impl Api {
    /// Pins the manager `manager` (the `long` Java's `NativeMemoryManager.handle()` returns, or
    /// [`OwnedManager::handle`]) open for the life of the returned [`Lease`].
    ///
    /// Errors: [`Code::StaleHandle`] (closed), [`Code::InvalidHandle`] (0, forged, another
    /// kind), [`Code::Closed`] (closing).
    pub fn acquire(self, manager: i64) -> Result<Lease> {
        let manager = handle_from_java(manager);
        let mut lease: sys::nm_lease = 0;
        self.call(|err| {
            // SAFETY: the table refuses any bad handle by code; `lease` and `err` are valid for
            // writes during the call.
            unsafe { (self.raw().acquire)(manager, &mut lease, err) }
        })?;
        Ok(Lease::new(self, lease))
    }
}

impl OwnedManager {
    /// Pins the manager open ([`Api::acquire`] of this manager).
    pub fn acquire(&self) -> Result<Lease> {
        self.api().acquire(self.handle())
    }
}

/// A task's manager pinned open: while any lease is held, the manager's close waits for it
/// (bounded by the library's close timeout). Released on drop (errors logged) or with
/// [`release`](Lease::release).
///
/// Hold a lease for the span of work (an operator's `execute`, a batch), not for the life of an
/// object: the [`Pool`]s, reservations and allocations made through it do not need it and stay
/// valid after it is released, until the manager closes.
///
/// `Send + Sync`: any thread may use it, and release it.
pub struct Lease {
    api: Api,
    handle: sys::nm_lease,
}

/// Read-outs of a manager, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ManagerStats {
    /// Bytes charged to the task now.
    pub used: u64,
    /// Highest `used` so far.
    pub peak: u64,
    /// Bytes reserved from the listener (Spark): `used` plus the unused cushion.
    pub reserved: u64,
    /// Number of spill calls made to spillers.
    pub spill_count: u64,
    /// Bytes those spills freed.
    pub spilled_bytes: u64,
}

impl Lease {
    pub(crate) fn new(api: Api, handle: sys::nm_lease) -> Lease {
        Lease { api, handle }
    }

    /// The table this lease belongs to.
    pub fn api(&self) -> Api {
        self.api
    }

    /// The raw `nm_lease` handle (still owned by this value).
    pub fn as_raw(&self) -> sys::nm_lease {
        self.handle
    }

    /// Gives up ownership of the raw handle without releasing it: the caller must pass it to the
    /// table's `release` exactly once.
    pub fn into_raw(self) -> sys::nm_lease {
        ManuallyDrop::new(self).handle
    }

    /// Ends the lease now, reporting an error instead of logging it.
    pub fn release(self) -> Result<()> {
        let this = ManuallyDrop::new(self);
        this.release_inner()
    }

    fn release_inner(&self) -> Result<()> {
        self.api.call(|err| {
            // SAFETY: the table refuses bad handles by code; `err` is writable.
            unsafe { (self.api.raw().release)(self.handle, err) }
        })
    }

    /// Opens the pool at `path` below the task's root (`"engine/hash"`; `""` is the root),
    /// creating missing pools. `limit` (bytes) sets the limit of the last element when it is
    /// created; asking an existing pool for a different limit is [`Code::InvalidArgument`](crate::Code::InvalidArgument).
    pub fn pool(&self, path: &str, limit: Option<u64>) -> Result<Pool> {
        let path_c = c_string(path, "pool path")?;
        let limit = limit_to_c(limit, "pool limit")?;
        let mut pool: sys::nm_pool = 0;
        self.api.call(|err| {
            // SAFETY: `path_c` is a live C string; `pool` and `err` are writable.
            unsafe {
                (self.api.raw().pool_open)(self.handle, path_c.as_ptr(), limit, &mut pool, err)
            }
        })?;
        Ok(Pool::new(Arc::new(PoolHandle::new(self.api, pool, path))))
    }

    /// Read-outs of the manager.
    pub fn stats(&self) -> Result<ManagerStats> {
        let mut out = sys::NmManagerStats::default();
        self.api.call(|err| {
            // SAFETY: `out` and `err` are writable for the call.
            unsafe { (self.api.raw().manager_stats)(self.handle, &mut out, err) }
        })?;
        Ok(ManagerStats {
            used: out.used,
            peak: out.peak,
            reserved: out.reserved,
            spill_count: out.spill_count,
            spilled_bytes: out.spilled_bytes,
        })
    }

    /// The usage report: the pool tree with used / peak / limit and the consumers, as text.
    pub fn usage_report(&self) -> Result<String> {
        let mut report: *mut c_char = ptr::null_mut();
        self.api.call(|err| {
            // SAFETY: `report` and `err` are writable for the call.
            unsafe { (self.api.raw().usage_report)(self.handle, &mut report, err) }
        })?;
        // SAFETY: on success `report` is null or a string the table made for us to free.
        Ok(unsafe { take_message(self.api.raw(), report) }.unwrap_or_default())
    }

    /// Asks the manager's spillers to free `target` bytes (smallest that covers, else the
    /// largest); returns the bytes they freed. The memory stays reserved for the next grows.
    /// Runs spill callbacks on this thread: never call it from inside one.
    pub fn spill(&self, target: u64) -> Result<u64> {
        let mut freed = 0u64;
        self.api.call(|err| {
            // SAFETY: `freed` and `err` are writable for the call.
            unsafe { (self.api.raw().manager_spill)(self.handle, target, &mut freed, err) }
        })?;
        Ok(freed)
    }

    /// Gives up to `target` bytes back to the listener: unused cushion first, then spills for
    /// the rest. Returns the bytes handed to the listener (what Spark's spill request returns).
    /// For embedders playing Spark's role for a manager of their own ([`Api::create_manager`]).
    ///
    /// [`Api::create_manager`]: crate::Api::create_manager
    pub fn reclaim(&self, target: u64) -> Result<u64> {
        let mut returned = 0u64;
        self.api.call(|err| {
            // SAFETY: `returned` and `err` are writable for the call.
            unsafe { (self.api.raw().manager_reclaim)(self.handle, target, &mut returned, err) }
        })?;
        Ok(returned)
    }

    /// Reserves from the listener (Spark), now, the task's over-commit (what
    /// [`Reservation::force_grow`](crate::Reservation::force_grow) charged beyond the bytes
    /// reserved) that its reserve does not cover, whatever the task limit: Spark's reservation
    /// then shows those bytes at once instead of at the task's next grow that reaches Spark.
    /// Returns the bytes granted (0 when nothing is over-committed); what the listener does not
    /// grant stays over-commit. May call the JVM (never a spiller): not from a malloc hook.
    ///
    /// The table's `manager_cover_overcommit` ([`Api`] accepts only tables that have it).
    pub fn cover_overcommit(&self) -> Result<u64> {
        let mut granted = 0u64;
        self.api.call(|err| {
            // SAFETY: `granted` and `err` are writable for the call.
            unsafe { (self.api.raw().manager_cover_overcommit)(self.handle, &mut granted, err) }
        })?;
        Ok(granted)
    }

    /// Ties `value` to the manager's life: when the manager closes, `value` is dropped (on the
    /// closing thread, before the leak check, so reservations and allocations it releases are
    /// not leaks).
    ///
    /// The returned [`Attachment`] only names it: dropping the `Attachment` does **not** drop the
    /// value (the manager's close does); use [`Attachment::detach`] to drop it now or
    /// [`Attachment::take`] to get it back. The manager never hands the value out; to use the
    /// state while it is attached, attach an `Arc` and keep a clone.
    pub fn attach<T: Send + 'static>(&self, value: T) -> Result<Attachment<T>> {
        // The state is a shell the table owns one strong count of (released by
        // `attachment_drop`). A failed attach does not call drop (header), and we empty the
        // shell ourselves on failure: `value` is dropped exactly once either way.
        let shell: Arc<AttachShell<T>> = Arc::new(Mutex::new(Some(value)));
        let state = Arc::into_raw(Arc::clone(&shell)) as *mut c_void;
        let mut handle: sys::nm_state = 0;
        let result = self.api.call(|err| {
            // SAFETY: `state` stays valid until `attachment_drop::<T>` runs (it owns a count);
            // `handle` and `err` are writable.
            unsafe {
                (self.api.raw().attach)(
                    self.handle,
                    state,
                    Some(attachment_drop::<T>),
                    &mut handle,
                    err,
                )
            }
        });
        if let Err(e) = result {
            drop(take_shell(&shell));
            return Err(e);
        }
        Ok(Attachment {
            api: self.api,
            handle,
            state: state as usize,
            _value: PhantomData,
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Err(e) = self.release_inner() {
            log::warn!("releasing lease {:#x} on drop failed: {e}", self.handle);
        }
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("handle", &self.handle)
            .finish()
    }
}

type AttachShell<T> = Mutex<Option<T>>;

fn take_shell<T>(shell: &AttachShell<T>) -> Option<T> {
    // A poisoned lock only means a panic while moving the value out: the Option is valid.
    shell.lock().unwrap_or_else(PoisonError::into_inner).take()
}

/// The drop callback of [`Lease::attach`]: drops the value and the table's count of the shell.
unsafe extern "C" fn attachment_drop<T>(state: *mut c_void) {
    // SAFETY: `state` is the strong count `attach` leaked with Arc::into_raw for this T; the
    // table calls drop at most once.
    let shell = unsafe { Arc::from_raw(state as *const AttachShell<T>) };
    let outcome = catch_unwind(AssertUnwindSafe(move || {
        drop(take_shell(&shell));
        drop(shell);
    }));
    if let Err(panic) = outcome {
        log::error!(
            "dropping attached state panicked: {}",
            panic_message(&panic)
        );
    }
}

/// State tied to a manager by [`Lease::attach`].
///
/// Dropping this value does **not** drop the state: the manager's close does. Call
/// [`detach`](Attachment::detach) to drop it now, or [`take`](Attachment::take) to get it back.
pub struct Attachment<T> {
    api: Api,
    handle: sys::nm_state,
    /// The `*const AttachShell<T>` given to the table (as an address, so this is `Send + Sync`).
    state: usize,
    _value: PhantomData<fn() -> T>,
}

impl<T: Send + 'static> Attachment<T> {
    /// The raw `nm_state` handle.
    pub fn as_raw(&self) -> sys::nm_state {
        self.handle
    }

    /// Unties the state and drops it now (on this thread).
    /// [`Code::StaleHandle`](crate::Code::StaleHandle) if the manager already dropped it.
    pub fn detach(self) -> Result<()> {
        self.api.call(|err| {
            // SAFETY: the table refuses bad handles by code; `err` is writable.
            unsafe { (self.api.raw().detach)(self.handle, 1, err) }
        })
    }

    /// Unties the state and gives it back. [`Code::StaleHandle`](crate::Code::StaleHandle) if
    /// the manager already dropped it.
    pub fn take(self) -> Result<T> {
        self.api.call(|err| {
            // SAFETY: the table refuses bad handles by code; `err` is writable.
            unsafe { (self.api.raw().detach)(self.handle, 0, err) }
        })?;
        // SAFETY: detach without drop succeeded, so the table gave back the strong count that
        // `attach` leaked and will never call `attachment_drop` for it.
        let shell = unsafe { Arc::from_raw(self.state as *const AttachShell<T>) };
        let value = take_shell(&shell);
        value.ok_or_else(|| {
            crate::error::Error::new(
                crate::error::Code::StaleHandle,
                "attached state was already dropped",
            )
        })
    }
}

impl<T> fmt::Debug for Attachment<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attachment")
            .field("handle", &self.handle)
            .finish()
    }
}

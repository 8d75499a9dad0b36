//! [`Spiller`]: a native consumer that gives memory back when asked, and its registration.

use std::ffi::c_void;
use std::fmt;
use std::mem::{self, size_of, ManuallyDrop};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use nativemem_sys as sys;

use crate::api::{c_string, panic_message, Api};
use crate::error::BoxError;
use crate::error::Result;

/// A native consumer that can free memory when asked: by a grow of the same task that finds no
/// room, or by Spark asking the task for memory.
///
/// # Rules for implementations
/// - Called on any thread, with no nativemem lock held: `spill` may call back into nativemem
///   (shrink or free its own [`Reservation`](crate::Reservation)s, drop its
///   [`Allocation`](crate::Allocation)s, read stats). It must not wait for another thread that
///   may itself be waiting for memory.
/// - `spill` is never called twice at once for the same spiller.
/// - A panic is caught: in `spill` it fails the request that caused the spill
///   ([`Code::Spill`](crate::Code::Spill)); in `spillable_bytes` it counts as 0.
pub trait Spiller: Send + Sync {
    /// Bytes a spill could free now (0: do not ask). Cheap; may be called often.
    fn spillable_bytes(&self) -> u64;

    /// Frees at least `target` bytes if it can and returns the bytes freed. Only bytes really
    /// released (reservations shrunk, allocations freed) count for the accounting; the returned
    /// number is informative. An error fails the request that caused the spill.
    fn spill(&self, target: u64) -> std::result::Result<u64, BoxError>;
}

/// A registered [`Spiller`]; unregistered on drop (a spill running then finishes first; the
/// library then drops its `Arc` of the spiller). If the manager closed first, it already
/// unregistered it and the drop does nothing.
pub struct SpillerRegistration {
    api: Api,
    handle: sys::nm_spiller,
    name: String,
}

impl SpillerRegistration {
    /// The name given at registration.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The raw `nm_spiller` handle (still owned by this value).
    pub fn as_raw(&self) -> sys::nm_spiller {
        self.handle
    }

    /// Unregisters now, reporting an error instead of logging it.
    pub fn unregister(self) -> Result<()> {
        let mut this = ManuallyDrop::new(self);
        let result = this.unregister_inner();
        // Drop skipped: free the name (the rest is plain data).
        drop(mem::take(&mut this.name));
        result
    }

    fn unregister_inner(&self) -> Result<()> {
        self.api.call(|err| {
            // SAFETY: the table refuses bad handles by code; `err` is writable.
            unsafe { (self.api.raw().spiller_unregister)(self.handle, err) }
        })
    }
}

impl Drop for SpillerRegistration {
    fn drop(&mut self) {
        match self.unregister_inner() {
            Ok(()) => {}
            Err(e) if e.code.is_gone() => {
                log::debug!("spiller {:?}: gone at drop: {e}", self.name)
            }
            Err(e) => log::warn!("spiller {:?}: unregister on drop failed: {e}", self.name),
        }
    }
}

impl fmt::Debug for SpillerRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpillerRegistration")
            .field("name", &self.name)
            .field("handle", &self.handle)
            .finish()
    }
}

/// `ctx` of the vtable: a leaked `Box<Arc<dyn Spiller>>`.
type Ctx = Arc<dyn Spiller>;

pub(crate) fn register(
    api: Api,
    pool: sys::nm_pool,
    name: &str,
    spiller: Arc<dyn Spiller>,
) -> Result<SpillerRegistration> {
    let name_c = c_string(name, "spiller name")?;
    let ctx = Box::into_raw(Box::new(spiller));
    let vtable = sys::NmSpillerVtable {
        struct_size: size_of::<sys::NmSpillerVtable>() as u32,
        reserved0: 0,
        ctx: ctx.cast::<c_void>(),
        spillable_bytes: Some(spiller_spillable_bytes),
        spill: Some(spiller_spill),
        drop: Some(spiller_drop),
    };
    let mut handle: sys::nm_spiller = 0;
    let result = api.call(|err| {
        // SAFETY: `name_c` is a live C string, `vtable` a valid nm_spiller_vtable the table
        // copies, whose callbacks are sound for `ctx` until drop; `handle` and `err` writable.
        unsafe { (api.raw().spiller_register)(pool, name_c.as_ptr(), &vtable, &mut handle, err) }
    });
    if let Err(e) = result {
        // SAFETY: the header says a failed registration never calls drop(ctx): ctx is still ours,
        // reclaimed exactly once here.
        drop(unsafe { Box::from_raw(ctx) });
        return Err(e);
    }
    Ok(SpillerRegistration {
        api,
        handle,
        name: name.to_owned(),
    })
}

/// # Safety
/// `ctx` is the `Box<Ctx>` pointer `register` leaked, not yet dropped.
unsafe fn spiller<'a>(ctx: *mut c_void) -> &'a Ctx {
    // SAFETY: per the contract the table calls drop only after the last other callback returned.
    unsafe { &*(ctx as *const Ctx) }
}

unsafe extern "C" fn spiller_spillable_bytes(ctx: *mut c_void) -> u64 {
    // SAFETY: the table passes the ctx of our vtable, live until drop.
    let spiller = unsafe { spiller(ctx) };
    match catch_unwind(AssertUnwindSafe(|| spiller.spillable_bytes())) {
        Ok(bytes) => bytes,
        Err(panic) => {
            log::error!(
                "spiller panicked in spillable_bytes (counted as 0): {}",
                panic_message(&panic)
            );
            0
        }
    }
}

unsafe extern "C" fn spiller_spill(
    ctx: *mut c_void,
    target: u64,
    freed: *mut u64,
) -> sys::nm_status {
    // SAFETY: the table passes the ctx of our vtable, live until drop.
    let spiller = unsafe { spiller(ctx) };
    match catch_unwind(AssertUnwindSafe(|| spiller.spill(target))) {
        Ok(Ok(bytes)) => {
            if !freed.is_null() {
                // SAFETY: the table passes a writable u64.
                unsafe { freed.write(bytes) };
            }
            sys::NM_OK
        }
        Ok(Err(e)) => {
            log::warn!("spiller failed to spill {target} bytes: {e}");
            sys::NM_ERR_SPILL
        }
        Err(panic) => {
            log::error!(
                "spiller panicked spilling {target} bytes: {}",
                panic_message(&panic)
            );
            sys::NM_ERR_SPILL
        }
    }
}

unsafe extern "C" fn spiller_drop(ctx: *mut c_void) {
    // SAFETY: ctx is the Box `register` leaked; the table calls drop exactly once, last.
    let boxed = unsafe { Box::from_raw(ctx as *mut Ctx) };
    if let Err(panic) = catch_unwind(AssertUnwindSafe(move || drop(boxed))) {
        log::error!("dropping a spiller panicked: {}", panic_message(&panic));
    }
}

//! Helpers shared by the integration tests of the engine ABI: the table, the live heap of the
//! binary (a binary that counts installs `nativemem_testkit::CountingAllocator` as its global
//! allocator), and C-style callbacks (listener, spiller, attached state) whose Rust side counts
//! what happened to them.
#![allow(dead_code)]

use std::ffi::{c_char, c_void, CStr};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use nativemem_sys::*;

/// The provider's table (this crate's, the only copy in the binary).
pub fn api() -> &'static NmApi {
    let table = nativemem_provider::api(NM_ABI_VERSION);
    assert!(!table.is_null());
    // SAFETY: a pointer to the provider's static table, valid for the life of the process.
    unsafe { &*table }
}

/// Live (blocks, bytes) of the process, if the binary installed the counting allocator.
pub fn live() -> (i64, i64) {
    nativemem_testkit::counts().live()
}

// ---- status helpers ------------------------------------------------------------------------

/// A C string literal for the ABI.
#[macro_export]
macro_rules! cstr {
    ($s:literal) => {
        concat!($s, "\0").as_ptr().cast::<std::ffi::c_char>()
    };
}

/// Takes and frees the message of a failed call (empty if none was made).
pub fn take_message(err: *mut c_char) -> String {
    if err.is_null() {
        return String::new();
    }
    // SAFETY: a message the provider made; freed right after with its `free_message`.
    let text = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: as above, freed once.
    unsafe { (api().free_message)(err) };
    text
}

/// Asserts `NM_OK`, with the message otherwise.
pub fn ok(what: &str, status: nm_status, err: *mut c_char) {
    let text = take_message(err);
    assert_eq!(status, NM_OK, "{what}: {text}");
}

// ---- listener --------------------------------------------------------------------------------

/// A listener with a capacity (Spark's share, bytes): grants what is left, refuses to take back
/// more than it holds. Counts its calls and its drop.
pub struct TestListener {
    pub capacity: u64,
    pub held: AtomicU64,
    pub reserve_calls: AtomicU64,
    pub unreserve_errors: AtomicU64,
    pub drops: AtomicU64,
}

impl TestListener {
    pub fn new(capacity: u64) -> Arc<TestListener> {
        Arc::new(TestListener {
            capacity,
            held: AtomicU64::new(0),
            reserve_calls: AtomicU64::new(0),
            unreserve_errors: AtomicU64::new(0),
            drops: AtomicU64::new(0),
        })
    }

    pub fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    /// The vtable; its ctx holds one reference, given back by the provider's `drop`.
    pub fn vtable(self: &Arc<Self>) -> NmListener {
        NmListener {
            struct_size: std::mem::size_of::<NmListener>() as u32,
            reserved0: 0,
            ctx: Arc::into_raw(self.clone()) as *mut c_void,
            reserve: Some(listener_reserve),
            unreserve: Some(listener_unreserve),
            drop: Some(listener_drop),
        }
    }
}

/// # Safety
/// `ctx` is a `TestListener` reference made by `TestListener::vtable`.
unsafe fn listener<'a>(ctx: *mut c_void) -> &'a TestListener {
    // SAFETY: the caller's contract; the reference lives until `listener_drop`.
    unsafe { &*(ctx as *const TestListener) }
}

unsafe extern "C" fn listener_reserve(
    ctx: *mut c_void,
    bytes: u64,
    granted: *mut u64,
) -> nm_status {
    // SAFETY: ctx from `TestListener::vtable`.
    let l = unsafe { listener(ctx) };
    l.reserve_calls.fetch_add(1, Ordering::SeqCst);
    let mut g = 0;
    let _ = l
        .held
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
            g = bytes.min(l.capacity - held);
            Some(held + g)
        });
    // SAFETY: the provider passes a valid out pointer.
    unsafe { *granted = g };
    NM_OK
}

unsafe extern "C" fn listener_unreserve(ctx: *mut c_void, bytes: u64) -> nm_status {
    // SAFETY: ctx from `TestListener::vtable`.
    let l = unsafe { listener(ctx) };
    match l
        .held
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| h.checked_sub(bytes))
    {
        Ok(_) => NM_OK,
        Err(_) => {
            l.unreserve_errors.fetch_add(1, Ordering::SeqCst);
            NM_ERR_INVALID_ARGUMENT
        }
    }
}

unsafe extern "C" fn listener_drop(ctx: *mut c_void) {
    // SAFETY: ctx is the reference `TestListener::vtable` leaked; the provider drops it once.
    let l = unsafe { Arc::from_raw(ctx as *const TestListener) };
    l.drops.fetch_add(1, Ordering::SeqCst);
}

/// Creates a manager with `listener` (block in bytes), asserting success.
pub fn create(name: *const c_char, block: u64, listener: &Arc<TestListener>) -> nm_manager {
    let vt = listener.vtable();
    let mut m = 0;
    let mut err = ptr::null_mut();
    // SAFETY: valid arguments and out pointers.
    let status = unsafe { (api().manager_create)(name, block, -1, &vt, &mut m, &mut err) };
    ok("manager_create", status, err);
    m
}

/// Acquires a lease on `m` and opens the pool `name` (no limit) on it, asserting success.
pub fn lease_and_pool(m: nm_manager, name: *const c_char) -> (nm_lease, nm_pool) {
    let (mut lease, mut pool) = (0, 0);
    let mut err = ptr::null_mut();
    // SAFETY: valid arguments and out pointers; `name` is the caller's NUL-terminated string.
    unsafe {
        ok("acquire", (api().acquire)(m, &mut lease, &mut err), err);
        ok(
            "pool_open",
            (api().pool_open)(lease, name, -1, &mut pool, &mut err),
            err,
        );
    }
    (lease, pool)
}

// ---- spiller -----------------------------------------------------------------------------------

/// A spiller that frees one reservation of its own when asked, through the ABI (re-entering it:
/// `reservation_size` for its spillable bytes, `reservation_free` to spill). Counts spills and its
/// drop.
pub struct TestSpiller {
    /// The reservation it spills (0: none).
    pub reservation: AtomicU64,
    pub spills: AtomicU64,
    pub drops: AtomicU64,
}

impl TestSpiller {
    pub fn new(reservation: nm_reservation) -> Arc<TestSpiller> {
        Arc::new(TestSpiller {
            reservation: AtomicU64::new(reservation),
            spills: AtomicU64::new(0),
            drops: AtomicU64::new(0),
        })
    }

    /// The vtable; its ctx holds one reference, given back by `drop` (or by
    /// [`TestSpiller::reclaim_ctx`] if registration failed).
    pub fn vtable(self: &Arc<Self>) -> NmSpillerVtable {
        NmSpillerVtable {
            struct_size: std::mem::size_of::<NmSpillerVtable>() as u32,
            reserved0: 0,
            ctx: Arc::into_raw(self.clone()) as *mut c_void,
            spillable_bytes: Some(spiller_spillable),
            spill: Some(spiller_spill),
            drop: Some(spiller_drop),
        }
    }

    /// Gives back the reference a vtable's ctx holds when registration failed (ctx stays ours).
    ///
    /// # Safety
    /// `vt` came from [`TestSpiller::vtable`] and its ctx was not given to a successful
    /// registration.
    pub unsafe fn reclaim_ctx(vt: &NmSpillerVtable) {
        // SAFETY: the caller's contract: the reference `vtable` leaked, not owned by anyone else.
        drop(unsafe { Arc::from_raw(vt.ctx as *const TestSpiller) });
    }
}

unsafe extern "C" fn spiller_spillable(ctx: *mut c_void) -> u64 {
    // SAFETY: ctx from `TestSpiller::vtable`, alive until `spiller_drop`.
    let s = unsafe { &*(ctx as *const TestSpiller) };
    let r = s.reservation.load(Ordering::SeqCst);
    let mut size = 0;
    // SAFETY: re-entering the table from a callback (allowed: no nativemem lock is held).
    let status = unsafe { (api().reservation_size)(r, &mut size, ptr::null_mut()) };
    if status == NM_OK {
        size
    } else {
        0
    }
}

unsafe extern "C" fn spiller_spill(ctx: *mut c_void, _target: u64, freed: *mut u64) -> nm_status {
    // SAFETY: as in `spiller_spillable`.
    let s = unsafe { &*(ctx as *const TestSpiller) };
    s.spills.fetch_add(1, Ordering::SeqCst);
    let r = s.reservation.load(Ordering::SeqCst);
    let mut bytes = 0;
    // SAFETY: re-entering the table; valid out pointer.
    let status = unsafe { (api().reservation_free)(r, &mut bytes, ptr::null_mut()) };
    // SAFETY: the provider passes a valid out pointer.
    unsafe { *freed = if status == NM_OK { bytes } else { 0 } };
    NM_OK
}

unsafe extern "C" fn spiller_drop(ctx: *mut c_void) {
    // SAFETY: the reference `TestSpiller::vtable` leaked; the provider drops it once.
    let s = unsafe { Arc::from_raw(ctx as *const TestSpiller) };
    s.drops.fetch_add(1, Ordering::SeqCst);
}

// ---- attached state ------------------------------------------------------------------------

/// State attached with `attach`: counts how often its drop ran.
pub struct TestState {
    pub drops: AtomicU64,
}

impl TestState {
    pub fn new() -> Arc<TestState> {
        Arc::new(TestState {
            drops: AtomicU64::new(0),
        })
    }

    /// A reference for `attach` (given back by [`state_drop`], or by [`TestState::reclaim`]).
    pub fn raw(self: &Arc<Self>) -> *mut c_void {
        Arc::into_raw(self.clone()) as *mut c_void
    }

    /// Gives back a reference made by [`TestState::raw`] that no drop callback will take.
    ///
    /// # Safety
    /// `raw` came from [`TestState::raw`] and is owned by the caller.
    pub unsafe fn reclaim(raw: *mut c_void) {
        // SAFETY: the caller's contract.
        drop(unsafe { Arc::from_raw(raw as *const TestState) });
    }
}

/// The drop callback of a [`TestState`].
///
/// # Safety
/// `state` came from [`TestState::raw`]; the provider runs it once.
pub unsafe extern "C" fn state_drop(state: *mut c_void) {
    // SAFETY: the reference `TestState::raw` leaked.
    let s = unsafe { Arc::from_raw(state as *const TestState) };
    s.drops.fetch_add(1, Ordering::SeqCst);
}

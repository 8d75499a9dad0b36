//! The engine ABI: the `nm_api` table of `include/nativemem.h`, filled with this crate's
//! functions over the [`registry`]. It is how native code in *another* shared library (a Rust
//! engine through `nativemem-client`, a C/C++ engine through the header) reaches a manager Java
//! created in `libnativemem_jni.so`, which links this crate and exports the table.
//!
//! ```text
//!  engine .so                          this module                            registry / core
//!  ──────────                          ───────────                            ───────────────
//!  api = NativeMemoryManager.nativeApi()  (address of API, a static)
//!  api->acquire(handle, &lease) ──▶ MANAGERS.get ─▶ entry.pin() ─▶ LEASES ─▶ close waits for it
//!  api->pool_open(lease, path) ───▶ manager.pool(path) ─▶ POOLS (owned by the manager)
//!  api->reservation_try_grow(r) ─▶ RESERVATIONS.pin ─▶ owner's state read ─▶ Reservation::try_grow
//!  api->spiller_register(pool, vt) ▶ CSpiller (core Spiller over the vtable) ─▶ SPILLERS
//!  api->attach(lease, state, drop) ▶ STATES: dropped before the core close (registry docs)
//! ```
//!
//! # Rules every function follows
//! - Its body runs in [`run`]: `*err` is cleared, a panic is caught and becomes
//!   `NM_ERR_INTERNAL`, an error becomes its code ([`Error::status`]) and, if asked for, a
//!   message the caller frees with `free_message`. Nothing unwinds into C.
//! - Every object is a generation-checked handle in a [`HandleTable`]: a forged, stale or
//!   wrong-kind handle is an error code, never a dereference. Raw pointers are accepted only where
//!   the header says the caller owns them (`free`'s pointer is validated by the core's table).
//! - Work on a manager is a counted call: close waits for it and never frees memory under it.
//!   Calls on a reservation or a pool handle are counted by pinning that object's slot
//!   (`registry::ObjectCall`: no process-wide write, no write to the manager); a lease is a
//!   count on the manager that any thread may end, and a call on a lease is counted again on its
//!   own (see the registry's module docs).
//!
//! # Close, per function
//! Once a manager is closing (its close waits for calls in flight and leases held on other
//! threads), new work is refused with `NM_ERR_CLOSED` on every handle of it, leases included:
//! read-outs (`manager_stats`, `usage_report`, `pool_stats`, `reservation_size`), new objects
//! (`pool_open`, `reservation_new`, `spiller_register`, `attach`), grows (`reservation_try_grow`,
//! `_try_resize`, `_force_grow`, `allocate`), spills (`manager_spill`, `manager_reclaim`) and
//! `manager_cover_overcommit`.
//! `acquire` fails with `NM_ERR_STALE_HANDLE` (close removed the manager's handle first).
//! Calls that only give back stay allowed, so an engine can clean up on another thread while
//! close waits: `release` (it is what close waits for), `pool_close`, `spiller_unregister`,
//! `detach` (they touch no memory of the manager), and `reservation_shrink`, `_free`,
//! `_force_shrink`, `_close` and `free`, which enter as give-backs (`registry::Entry::GiveBack`:
//! let in while close still waits, so their bytes are released at once and are no leak).
//! Once the close has run, every handle of the manager is stale (`NM_ERR_STALE_HANDLE`); a
//! give-back that resolved its handle just before gets `NM_ERR_CLOSED` (`reservation_close`:
//! `NM_OK`, the close released it). `include/nativemem.h` carries the same table next to
//! `manager_close`; this crate's `tests/close_contract.rs` checks it function by function.
//! - No lock of this crate is held while a C callback runs (spiller, listener, drop): resolving a
//!   handle takes no lock (a pin of its slot), and the tables' allocation locks are released
//!   before any object is dropped.
//!
//! - Every object a manager owns is recorded with its table and close stage
//!   (`ManagerEntry::own`): spillers first, attached state before the core close, pools after
//!   it (see the registry's module docs for the order and why).
//!
//! Handles are `u64` in C and `i64` in the tables; a value above `i64::MAX` becomes negative
//! and is refused as a handle of the wrong kind.

use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{self, AssertUnwindSafe};
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use nativemem_core::{
    CapacityListener, ListenerError, MemoryConfig, MemoryError, Pool, ReservationListener, Spiller,
    SpillerRegistration,
};
use nativemem_sys::*;

use crate::error::{panic_message, Error, Result};
use crate::registry::{
    self, CloseOutcome, CloseStage, Entry, ManagerEntry, ObjectCall, Owned, Pin,
};
use nativemem_handles::{kind, HandleTable};

/// Leases.
static LEASES: HandleTable<LeaseEntry> = HandleTable::new(kind::LEASE, "lease");
/// Pool handles.
static POOLS: HandleTable<PoolEntry> = HandleTable::new(kind::POOL, "pool");
/// Registered spillers.
static SPILLERS: HandleTable<SpillerEntry> = HandleTable::new(kind::SPILLER, "spiller");
/// Attached engine state.
static STATES: HandleTable<StateEntry> = HandleTable::new(kind::STATE, "attached state");

/// Managers made with `manager_create`: the only ones `manager_close` may close (a manager Java
/// created is closed by its Java owner, whose `NativeMemoryManager` would otherwise go stale).
static EMBEDDED: parking_lot::Mutex<Vec<i64>> = parking_lot::Mutex::new(Vec::new());

/// Close timeout of managers made with `manager_create` (as for Java's default), and of those
/// made with `manager_create_with` whose options leave it at -1.
const EMBEDDED_CLOSE_TIMEOUT: Duration = registry::DEFAULT_CLOSE_TIMEOUT;

/// The table, a static: its address is valid for the life of the process.
static API: NmApi = NmApi {
    abi_version: NM_ABI_VERSION,
    struct_size: std::mem::size_of::<NmApi>() as u32,
    free_message: nm_free_message,
    acquire: nm_acquire,
    release: nm_release,
    manager_stats: nm_manager_stats,
    usage_report: nm_usage_report,
    pool_open: nm_pool_open,
    pool_close: nm_pool_close,
    pool_stats: nm_pool_stats,
    reservation_new: nm_reservation_new,
    reservation_try_grow: nm_reservation_try_grow,
    reservation_shrink: nm_reservation_shrink,
    reservation_try_resize: nm_reservation_try_resize,
    reservation_size: nm_reservation_size,
    reservation_free: nm_reservation_free,
    reservation_close: nm_reservation_close,
    allocate: nm_allocate,
    free: nm_free,
    spiller_register: nm_spiller_register,
    spiller_unregister: nm_spiller_unregister,
    attach: nm_attach,
    detach: nm_detach,
    manager_create: nm_manager_create,
    manager_close: nm_manager_close,
    manager_spill: nm_manager_spill,
    manager_reclaim: nm_manager_reclaim,
    reservation_force_grow: nm_reservation_force_grow,
    reservation_force_shrink: nm_reservation_force_shrink,
    manager_create_with: nm_manager_create_with,
    trim_hook_register: nm_trim_hook_register,
    trim_hook_unregister: nm_trim_hook_unregister,
    reservation_peak: nm_reservation_peak,
    pool_spill_written: nm_pool_spill_written,
    manager_cover_overcommit: nm_manager_cover_overcommit,
};

/// The table if this crate supports `min_version`, else null. `libnativemem_jni.so` exports it
/// as the C symbol `nativemem_api` (see `include/nativemem.h`); a Rust test that links this
/// crate calls it directly.
pub fn api(min_version: u32) -> *const NmApi {
    if min_version <= NM_ABI_VERSION {
        &API
    } else {
        ptr::null()
    }
}

// ---- the objects behind the handles ----------------------------------------------------------

/// A lease: a counted call on the manager, ended by `release` (or by nothing: see the header).
struct LeaseEntry {
    pin: Pin,
}

/// A pool handle.
struct PoolEntry {
    owner: Arc<ManagerEntry>,
    pool: Pool,
}

impl Owned for PoolEntry {
    fn owner(&self) -> &Arc<ManagerEntry> {
        &self.owner
    }
}

/// A registered spiller: unregistered (and its vtable's `drop` run, once no spill is running)
/// when the entry is dropped.
struct SpillerEntry {
    owner: Arc<ManagerEntry>,
    _registration: SpillerRegistration,
}

/// Engine state attached with `attach`; its `drop` runs when the entry is dropped, unless it was
/// detached without running it.
struct StateEntry {
    owner: std::sync::Weak<ManagerEntry>,
    state: *mut c_void,
    drop: Option<unsafe extern "C" fn(*mut c_void)>,
    run_drop: std::sync::atomic::AtomicBool,
}

// SAFETY: the header makes `state` the engine's to share: its drop callback may run on any thread
// (the manager's close runs on the thread that closes it), and nothing here dereferences it.
unsafe impl Send for StateEntry {}
// SAFETY: as above; the entry only holds the pointer and calls `drop` once (from `Drop`).
unsafe impl Sync for StateEntry {}

impl Drop for StateEntry {
    fn drop(&mut self) {
        if let (Some(drop_fn), true) = (
            self.drop,
            self.run_drop.load(std::sync::atomic::Ordering::Acquire),
        ) {
            // SAFETY: the engine registered `drop_fn` for `state` and the header promises it runs
            // once; this `Drop` runs once. A C function cannot unwind into us; a Rust one built
            // by nativemem-client catches its own panics.
            unsafe { drop_fn(self.state) };
        }
    }
}

/// A spiller implemented by a C vtable.
struct CSpiller {
    vtable: NmSpillerVtable,
    name: String,
    /// False if registration failed: then `drop(ctx)` must not run (ctx stays the caller's).
    armed: std::sync::atomic::AtomicBool,
}

// SAFETY: the header requires spiller callbacks to be callable from any thread, concurrently with
// other calls of the engine; `ctx` is only passed back to them.
unsafe impl Send for CSpiller {}
// SAFETY: as above.
unsafe impl Sync for CSpiller {}

impl Spiller for CSpiller {
    fn spillable_bytes(&self) -> u64 {
        match self.vtable.spillable_bytes {
            // SAFETY: a callback of the registered vtable with its own ctx (header contract).
            Some(f) => unsafe { f(self.vtable.ctx) },
            None => 0,
        }
    }

    fn spill(&self, target: u64) -> nativemem_core::Result<u64> {
        let Some(f) = self.vtable.spill else {
            return Ok(0);
        };
        let mut freed = 0u64;
        // SAFETY: a callback of the registered vtable with its own ctx and a valid out pointer.
        let status = unsafe { f(self.vtable.ctx, target, &mut freed) };
        if status == NM_OK {
            Ok(freed)
        } else {
            Err(MemoryError::Spill {
                spiller: self.name.clone(),
                source: format!("spill callback returned status {status}").into(),
            })
        }
    }
}

impl Drop for CSpiller {
    fn drop(&mut self) {
        if !self.armed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if let Some(f) = self.vtable.drop {
            // SAFETY: the core drops a spiller once, after its last call returned; the header
            // gives `drop(ctx)` exactly that meaning.
            unsafe { f(self.vtable.ctx) };
        }
    }
}

/// A listener implemented by a C vtable (managers made with `manager_create`).
struct CListener {
    vtable: NmListener,
    /// False until the manager exists: if creation fails, `drop(ctx)` must not run (ctx stays
    /// the caller's, as for every function that fails).
    armed: std::sync::atomic::AtomicBool,
}

// SAFETY: the header requires listener callbacks to be callable from any thread.
unsafe impl Send for CListener {}
// SAFETY: as above.
unsafe impl Sync for CListener {}

impl ReservationListener for CListener {
    fn reserve(&self, bytes: u64) -> std::result::Result<u64, ListenerError> {
        let Some(f) = self.vtable.reserve else {
            return Err("listener has no reserve callback".into());
        };
        let mut granted = 0u64;
        // SAFETY: a callback of the caller's listener with its ctx and a valid out pointer.
        match unsafe { f(self.vtable.ctx, bytes, &mut granted) } {
            NM_OK => Ok(granted),
            status => Err(format!("reserve callback returned status {status}").into()),
        }
    }

    fn unreserve(&self, bytes: u64) -> std::result::Result<(), ListenerError> {
        let Some(f) = self.vtable.unreserve else {
            return Err("listener has no unreserve callback".into());
        };
        // SAFETY: a callback of the caller's listener with its ctx.
        match unsafe { f(self.vtable.ctx, bytes) } {
            NM_OK => Ok(()),
            status => Err(format!("unreserve callback returned status {status}").into()),
        }
    }
}

impl Drop for CListener {
    fn drop(&mut self) {
        if !self.armed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if let Some(f) = self.vtable.drop {
            // SAFETY: the manager holding this listener is gone; called once (header contract).
            unsafe { f(self.vtable.ctx) };
        }
    }
}

// ---- the boundary: errors, arguments ---------------------------------------------------------

/// A message for C: owned by the caller, freed with `free_message`.
fn c_message(text: &str) -> *mut c_char {
    let text = text.replace('\0', "\\0");
    CString::new(text).map_or(ptr::null_mut(), CString::into_raw)
}

/// Runs a function body at the boundary (see the module docs).
fn run(err: Err, body: impl FnOnce() -> Result<()>) -> nm_status {
    if !err.is_null() {
        // SAFETY: a non-null `err` points to a `char *` the caller owns (header contract).
        unsafe { *err = ptr::null_mut() };
    }
    let (status, text) = match panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return NM_OK,
        Ok(Err(e)) => (e.status(), e.to_string()),
        Err(p) => (
            NM_ERR_INTERNAL,
            format!("native panic: {}", panic_message(p.as_ref())),
        ),
    };
    if !err.is_null() {
        // Building the message cannot panic in practice; if it did, the code still goes back.
        let message = panic::catch_unwind(|| c_message(&text)).unwrap_or(ptr::null_mut());
        // SAFETY: as above.
        unsafe { *err = message };
    }
    status
}

/// Writes `value` to an out parameter, refusing null.
fn put<T>(out: *mut T, name: &'static str, value: T) -> Result<()> {
    if out.is_null() {
        return Err(Error::NullArgument(name));
    }
    // SAFETY: non-null, and the header makes it a valid, writable `T` of the caller.
    unsafe { out.write(value) };
    Ok(())
}

/// Writes `value` to an optional out parameter (null: not wanted).
fn put_opt<T>(out: *mut T, value: T) {
    if !out.is_null() {
        // SAFETY: as in `put`.
        unsafe { out.write(value) };
    }
}

/// A UTF-8 C string argument.
fn str_arg<'a>(value: *const c_char, name: &'static str) -> Result<&'a str> {
    if value.is_null() {
        return Err(Error::NullArgument(name));
    }
    // SAFETY: non-null, and the header makes it a NUL-terminated string valid during the call.
    let s = unsafe { CStr::from_ptr(value) };
    s.to_str()
        .map_err(|_| Error::InvalidArgument(format!("{name} is not valid UTF-8")))
}

fn handle_arg(value: u64) -> i64 {
    // Handles are positive i64s; anything above i64::MAX turns negative and is refused.
    value as i64
}

fn to_handle(value: i64) -> u64 {
    value as u64
}

fn limit_arg(limit: i64) -> Result<Option<u64>> {
    match limit {
        -1 => Ok(None),
        v if v >= 0 => Ok(Some(v as u64)),
        v => Err(Error::InvalidArgument(format!(
            "limit must be >= 0 bytes or -1 for none, got {v}"
        ))),
    }
}

/// Reads a struct the caller passes in whose first field is its `u32 struct_size` (the caller's
/// `sizeof`): refuses null and a size below this version's, then copies the fields this version
/// knows (a newer caller's larger struct is fine: its extra fields are ignored).
///
/// # Safety
/// `value` is null or points to a readable struct of at least `struct_size` bytes whose first
/// field is `struct_size`.
unsafe fn read_versioned<T: Copy>(value: *const T, name: &'static str) -> Result<T> {
    if value.is_null() {
        return Err(Error::NullArgument(name));
    }
    // SAFETY: non-null, and (contract) its first field is a readable u32, read alone first.
    let size = unsafe { value.cast::<u32>().read_unaligned() };
    let needed = std::mem::size_of::<T>();
    if (size as usize) < needed {
        return Err(Error::InvalidArgument(format!(
            "{name}.struct_size is {size}; version {NM_ABI_VERSION} needs >= {needed}"
        )));
    }
    // SAFETY: at least a whole version-1 struct is readable (checked just above).
    Ok(unsafe { value.read_unaligned() })
}

/// Resolves a pool handle and enters its manager (new work: refused once it is closing).
fn with_pool<R>(pool: nm_pool, f: impl FnOnce(&PoolEntry) -> Result<R>) -> Result<R> {
    with_pool_as(pool, Entry::Work, f)
}

/// Resolves a pool handle and enters its manager as a call of the kind `kind`.
fn with_pool_as<R>(
    pool: nm_pool,
    kind: Entry,
    f: impl FnOnce(&PoolEntry) -> Result<R>,
) -> Result<R> {
    // Pins the pool handle, no `Arc` clone and no write to the manager (registry module docs).
    let call = ObjectCall::enter(&POOLS, handle_arg(pool), kind)?;
    f(&call)
}

/// Resolves a lease and enters its manager as a call of its own. The lease keeps the manager
/// from closing, but not from *closing*: once close started waiting for it, every call on it
/// but `release` is refused (`NM_ERR_CLOSED`), as on any other handle of the manager.
fn with_lease<R>(lease: nm_lease, f: impl FnOnce(&Arc<ManagerEntry>) -> Result<R>) -> Result<R> {
    let entry = LEASES.get(handle_arg(lease))?;
    let call = entry.pin.entry().enter()?;
    f(call.entry())
}

// ---- the functions of the table ------------------------------------------------------------------

unsafe extern "C" fn nm_free_message(message: *mut c_char) {
    if message.is_null() {
        return;
    }
    let _ = panic::catch_unwind(|| {
        // SAFETY: the header allows only messages this library returned (`CString::into_raw`).
        drop(unsafe { CString::from_raw(message) });
    });
}

unsafe extern "C" fn nm_acquire(manager: nm_manager, out: *mut nm_lease, err: Err) -> nm_status {
    run(err, || {
        if out.is_null() {
            return Err(Error::NullArgument("out"));
        }
        let entry = registry::manager_entry(handle_arg(manager))?;
        let pin = entry.pin()?;
        let lease = LEASES.insert(Arc::new(LeaseEntry { pin }))?;
        put(out, "out", to_handle(lease))
    })
}

unsafe extern "C" fn nm_release(lease: nm_lease, err: Err) -> nm_status {
    run(err, || {
        // The pin ends when the last user of the entry drops it (this thread, or a call still
        // running on the lease on another thread).
        drop(LEASES.remove(handle_arg(lease))?);
        Ok(())
    })
}

unsafe extern "C" fn nm_manager_stats(
    lease: nm_lease,
    out: *mut NmManagerStats,
    err: Err,
) -> nm_status {
    run(err, || {
        let stats = with_lease(lease, |e| Ok(e.manager().stats()))?;
        put(
            out,
            "out",
            NmManagerStats {
                used: stats.used,
                peak: stats.peak,
                reserved: stats.reserved,
                spill_count: stats.spill_count,
                spilled_bytes: stats.spilled_bytes,
            },
        )
    })
}

unsafe extern "C" fn nm_usage_report(
    lease: nm_lease,
    report: *mut *mut c_char,
    err: Err,
) -> nm_status {
    run(err, || {
        if report.is_null() {
            return Err(Error::NullArgument("report"));
        }
        let text = with_lease(lease, |e| Ok(e.manager().usage_report().to_string()))?;
        put(report, "report", c_message(&text))
    })
}

unsafe extern "C" fn nm_pool_open(
    lease: nm_lease,
    path: *const c_char,
    limit: i64,
    out: *mut nm_pool,
    err: Err,
) -> nm_status {
    run(err, || {
        if out.is_null() {
            return Err(Error::NullArgument("out"));
        }
        let path = str_arg(path, "path")?;
        let limit = limit_arg(limit)?;
        let handle = with_lease(lease, |owner| {
            let manager = owner.manager();
            let pool = match path.rsplit_once('/') {
                _ if limit.is_none() => manager.pool(path)?,
                Some((parent, name)) => manager.pool(parent)?.child(name, limit)?,
                None if path.is_empty() || path == "root" => {
                    return Err(Error::InvalidArgument(
                        "the root pool's limit is the task limit; open it with limit -1".into(),
                    ))
                }
                None => manager.root().child(path, limit)?,
            };
            let h = POOLS.insert(Arc::new(PoolEntry {
                owner: owner.clone(),
                pool,
            }))?;
            owner.own(h, CloseStage::AfterClose, &POOLS);
            Ok(h)
        })?;
        put(out, "out", to_handle(handle))
    })
}

unsafe extern "C" fn nm_pool_close(pool: nm_pool, err: Err) -> nm_status {
    run(err, || {
        let removed = POOLS.remove_counted(handle_arg(pool))?;
        registry::after_removal(
            &removed.value.owner,
            handle_arg(pool),
            removed.others_pinned,
            removed.watched,
        );
        Ok(())
    })
}

unsafe extern "C" fn nm_pool_stats(pool: nm_pool, out: *mut NmPoolStats, err: Err) -> nm_status {
    run(err, || {
        let stats = with_pool(pool, |p| {
            Ok(NmPoolStats {
                used: p.pool.used(),
                peak: p.pool.peak(),
                limit: p.pool.limit().map_or(-1, |l| l.min(i64::MAX as u64) as i64),
            })
        })?;
        put(out, "out", stats)
    })
}

unsafe extern "C" fn nm_reservation_new(
    pool: nm_pool,
    consumer: *const c_char,
    out: *mut nm_reservation,
    err: Err,
) -> nm_status {
    run(err, || {
        if out.is_null() {
            return Err(Error::NullArgument("out"));
        }
        let consumer = str_arg(consumer, "consumer")?;
        let h = with_pool(pool, |p| {
            registry::add_reservation(&p.owner, &p.pool, consumer, 0)
        })?;
        put(out, "out", to_handle(h))
    })
}

unsafe extern "C" fn nm_reservation_try_grow(r: nm_reservation, bytes: u64, err: Err) -> nm_status {
    run(err, || {
        registry::with_reservation(handle_arg(r), |res| Ok(res.try_grow(bytes)?))
    })
}

unsafe extern "C" fn nm_reservation_shrink(r: nm_reservation, bytes: u64, err: Err) -> nm_status {
    run(err, || {
        registry::with_reservation_as(handle_arg(r), Entry::GiveBack, |res| Ok(res.shrink(bytes)?))
    })
}

unsafe extern "C" fn nm_reservation_try_resize(
    r: nm_reservation,
    new_size: u64,
    err: Err,
) -> nm_status {
    run(err, || {
        registry::with_reservation(handle_arg(r), |res| Ok(res.try_resize(new_size)?))
    })
}

unsafe extern "C" fn nm_reservation_size(r: nm_reservation, out: *mut u64, err: Err) -> nm_status {
    run(err, || {
        let size = registry::with_reservation(handle_arg(r), |res| Ok(res.size()))?;
        put(out, "out", size)
    })
}

unsafe extern "C" fn nm_reservation_peak(r: nm_reservation, out: *mut u64, err: Err) -> nm_status {
    run(err, || {
        let peak = registry::with_reservation(handle_arg(r), |res| Ok(res.peak()))?;
        put(out, "out", peak)
    })
}

unsafe extern "C" fn nm_reservation_free(
    r: nm_reservation,
    freed: *mut u64,
    err: Err,
) -> nm_status {
    run(err, || {
        let bytes =
            registry::with_reservation_as(handle_arg(r), Entry::GiveBack, |res| Ok(res.free()))?;
        put_opt(freed, bytes);
        Ok(())
    })
}

/// A forced grow (`Reservation::force_grow`): never calls the listener or a spiller. Only the
/// handle lookup and the call count of the manager are done around it (no wait, no upcall).
unsafe extern "C" fn nm_reservation_force_grow(
    r: nm_reservation,
    bytes: u64,
    overcommitted: *mut u64,
    err: Err,
) -> nm_status {
    run(err, || {
        let over = registry::with_reservation(handle_arg(r), |res| Ok(res.force_grow(bytes)?))?;
        put_opt(overcommitted, over);
        Ok(())
    })
}

/// A shrink without upcall (`Reservation::force_shrink`).
unsafe extern "C" fn nm_reservation_force_shrink(
    r: nm_reservation,
    bytes: u64,
    released: *mut u64,
    err: Err,
) -> nm_status {
    run(err, || {
        let taken = registry::with_reservation_as(handle_arg(r), Entry::GiveBack, |res| {
            Ok(res.force_shrink(bytes))
        })?;
        put_opt(released, taken);
        Ok(())
    })
}

unsafe extern "C" fn nm_reservation_close(r: nm_reservation, err: Err) -> nm_status {
    run(err, || registry::close_reservation(handle_arg(r)))
}

unsafe extern "C" fn nm_allocate(
    pool: nm_pool,
    size: u64,
    align: u64,
    out: *mut *mut c_void,
    err: Err,
) -> nm_status {
    run(err, || {
        if out.is_null() {
            return Err(Error::NullArgument("out"));
        }
        put(out, "out", ptr::null_mut())?;
        let size = usize::try_from(size)
            .map_err(|_| Error::InvalidArgument(format!("size {size} does not fit in memory")))?;
        let align = match align {
            0 => 16,
            a => usize::try_from(a).map_err(|_| {
                Error::InvalidArgument(format!("alignment {a} does not fit in memory"))
            })?,
        };
        let p = with_pool(pool, |p| Ok(p.pool.allocate(size, align)?))?;
        put(out, "out", p.as_ptr().cast::<c_void>())
    })
}

unsafe extern "C" fn nm_free(pool: nm_pool, p: *mut c_void, size: *mut u64, err: Err) -> nm_status {
    run(err, || {
        let Some(nn) = ptr::NonNull::new(p.cast::<u8>()) else {
            return Err(Error::NullArgument("ptr"));
        };
        // The core checks the pointer lies in the task's heap before reading its header.
        let freed = with_pool_as(pool, Entry::GiveBack, |p| Ok(p.pool.free(nn)?))?;
        put_opt(size, freed as u64);
        Ok(())
    })
}

unsafe extern "C" fn nm_spiller_register(
    pool: nm_pool,
    name: *const c_char,
    vtable: *const NmSpillerVtable,
    out: *mut nm_spiller,
    err: Err,
) -> nm_status {
    run(err, || {
        if out.is_null() {
            return Err(Error::NullArgument("out"));
        }
        let name = str_arg(name, "name")?;
        // SAFETY: the header makes `vtable` null or a readable nm_spiller_vtable whose first
        // field is its struct_size.
        let vt = unsafe { read_versioned(vtable, "nm_spiller_vtable") }?;
        if vt.spillable_bytes.is_none() || vt.spill.is_none() {
            return Err(Error::InvalidArgument(
                "nm_spiller_vtable needs spillable_bytes and spill".into(),
            ));
        }
        let h = with_pool(pool, |p| {
            let spiller = Arc::new(CSpiller {
                vtable: vt,
                name: name.to_string(),
                armed: std::sync::atomic::AtomicBool::new(true),
            });
            let registration = p.pool.register_spiller(name, spiller.clone());
            let inserted = SPILLERS.insert(Arc::new(SpillerEntry {
                owner: p.owner.clone(),
                _registration: registration,
            }));
            match inserted {
                Ok(h) => {
                    p.owner.own(h, CloseStage::Spillers, &SPILLERS);
                    Ok(h)
                }
                Err(e) => {
                    // The registration was dropped with the entry; ctx stays the caller's.
                    spiller
                        .armed
                        .store(false, std::sync::atomic::Ordering::Release);
                    Err(e.into())
                }
            }
        })?;
        put(out, "out", to_handle(h))
    })
}

unsafe extern "C" fn nm_spiller_unregister(spiller: nm_spiller, err: Err) -> nm_status {
    run(err, || {
        let removed = SPILLERS.remove_counted(handle_arg(spiller))?;
        registry::after_removal(
            &removed.value.owner,
            handle_arg(spiller),
            removed.others_pinned,
            removed.watched,
        );
        let entry = removed.value;
        // Unregisters; `drop(ctx)` runs once no spill of it is running (the core drops the
        // spiller outside its lock).
        drop(entry);
        Ok(())
    })
}

unsafe extern "C" fn nm_attach(
    lease: nm_lease,
    state: *mut c_void,
    drop_fn: Option<unsafe extern "C" fn(*mut c_void)>,
    out: *mut nm_state,
    err: Err,
) -> nm_status {
    run(err, || {
        if out.is_null() {
            return Err(Error::NullArgument("out"));
        }
        let h = with_lease(lease, |owner| {
            // Armed only once inserted: on failure `drop(state)` must not run (it stays yours).
            let entry = Arc::new(StateEntry {
                owner: Arc::downgrade(owner),
                state,
                drop: drop_fn,
                run_drop: std::sync::atomic::AtomicBool::new(false),
            });
            let h = STATES.insert(entry.clone())?;
            entry
                .run_drop
                .store(true, std::sync::atomic::Ordering::Release);
            owner.own(h, CloseStage::State, &STATES);
            Ok(h)
        })?;
        put(out, "out", to_handle(h))
    })
}

unsafe extern "C" fn nm_detach(handle: nm_state, run_drop: i32, err: Err) -> nm_status {
    run(err, || {
        let removed = STATES.remove_counted(handle_arg(handle))?;
        if let Some(owner) = removed.value.owner.upgrade() {
            registry::after_removal(
                &owner,
                handle_arg(handle),
                removed.others_pinned,
                removed.watched,
            );
        }
        let entry = removed.value;
        entry
            .run_drop
            .store(run_drop != 0, std::sync::atomic::Ordering::Release);
        drop(entry);
        Ok(())
    })
}

unsafe extern "C" fn nm_manager_create(
    name: *const c_char,
    reservation_block: u64,
    task_limit: i64,
    listener: *const NmListener,
    out: *mut nm_manager,
    err: Err,
) -> nm_status {
    run(err, || {
        let options = NmManagerOptions {
            reservation_block,
            task_limit,
            ..NmManagerOptions::default()
        };
        // SAFETY: the caller's (header contract), passed on unchanged.
        unsafe { create_embedded(name, &options, listener, out) }
    })
}

unsafe extern "C" fn nm_manager_create_with(
    name: *const c_char,
    options: *const NmManagerOptions,
    listener: *const NmListener,
    out: *mut nm_manager,
    err: Err,
) -> nm_status {
    run(err, || {
        let options = if options.is_null() {
            NmManagerOptions::default()
        } else {
            // SAFETY: non-null here; the header makes it a readable nm_manager_options whose
            // first field is its struct_size. A struct_size below this version's is refused.
            unsafe { read_versioned(options, "nm_manager_options") }?
        };
        // SAFETY: the caller's (header contract), passed on unchanged.
        unsafe { create_embedded(name, &options, listener, out) }
    })
}

unsafe extern "C" fn nm_trim_hook_register(
    trim: Option<unsafe extern "C" fn(ctx: *mut c_void) -> u64>,
    ctx: *mut c_void,
    drop: Option<unsafe extern "C" fn(ctx: *mut c_void)>,
    out_id: *mut u64,
    err: Err,
) -> nm_status {
    run(err, || {
        let (Some(trim), false) = (trim, out_id.is_null()) else {
            return Err(Error::InvalidArgument(
                "trim_hook_register needs a trim function and an out_id".into(),
            ));
        };
        // SAFETY: the engine's functions and ctx, under the header's contract.
        let hook = unsafe { crate::governor::TrimHook::new(trim, ctx, drop) };
        let id = crate::governor::register_trim_hook(hook);
        // SAFETY: non-null, the caller's out parameter (header contract).
        unsafe { *out_id = id };
        Ok(())
    })
}

unsafe extern "C" fn nm_trim_hook_unregister(id: u64, err: Err) -> nm_status {
    run(err, || {
        if crate::governor::unregister_trim_hook(id) {
            Ok(())
        } else {
            Err(Error::Handle(nativemem_handles::HandleError::Unknown {
                handle: id as i64,
                kind: "trim hook",
            }))
        }
    })
}

/// The configuration and close timeout `options` ask for (0 / -1 fields: the defaults).
fn embedded_config(options: &NmManagerOptions) -> Result<(MemoryConfig, Duration)> {
    if options.reserved0 != 0 {
        return Err(Error::InvalidArgument(format!(
            "nm_manager_options.reserved0 must be 0, got {}",
            options.reserved0
        )));
    }
    let mut config = MemoryConfig::default()
        .with_task_limit(limit_arg(options.task_limit)?)
        .with_reservation_quantum(options.reservation_quantum);
    if options.reservation_block != 0 {
        config = config.with_reservation_block(options.reservation_block);
    }
    config.validate()?;
    let close_timeout = match options.close_timeout_millis {
        -1 => EMBEDDED_CLOSE_TIMEOUT,
        ms if ms >= 0 => Duration::from_millis(ms as u64),
        ms => {
            return Err(Error::InvalidArgument(format!(
                "close timeout must be >= 0 ms or -1 for the default, got {ms}"
            )))
        }
    };
    Ok((config, close_timeout))
}

/// `manager_create` and `manager_create_with`: a manager this table owns (see [`EMBEDDED`]).
///
/// # Safety
/// `name`, `listener` and `out` are the caller's arguments of those functions (header contract).
unsafe fn create_embedded(
    name: *const c_char,
    options: &NmManagerOptions,
    listener: *const NmListener,
    out: *mut nm_manager,
) -> Result<()> {
    if out.is_null() {
        return Err(Error::NullArgument("out"));
    }
    let name = str_arg(name, "name")?;
    let (config, close_timeout) = embedded_config(options)?;
    let mut c_listener: Option<Arc<CListener>> = None;
    let listener: Arc<dyn ReservationListener> = if listener.is_null() {
        Arc::new(CapacityListener::unlimited())
    } else {
        // SAFETY: non-null here; the header makes it a readable nm_listener whose first
        // field is its struct_size.
        let vtable = unsafe { read_versioned(listener, "nm_listener") }?;
        if vtable.reserve.is_none() || vtable.unreserve.is_none() {
            return Err(Error::InvalidArgument(
                "nm_listener needs reserve and unreserve".into(),
            ));
        }
        let l = Arc::new(CListener {
            vtable,
            armed: std::sync::atomic::AtomicBool::new(false),
        });
        c_listener = Some(l.clone());
        l
    };
    let h = registry::create_manager(name.to_string(), config, listener, close_timeout)?;
    if let Some(l) = c_listener {
        l.armed.store(true, std::sync::atomic::Ordering::Release);
    }
    EMBEDDED.lock().push(h);
    put(out, "out", to_handle(h))
}

unsafe extern "C" fn nm_manager_close(
    manager: nm_manager,
    leak_report: *mut *mut c_char,
    leaked_bytes: *mut u64,
    err: Err,
) -> nm_status {
    run(err, || {
        put_opt(leak_report, ptr::null_mut());
        put_opt(leaked_bytes, 0);
        let handle = handle_arg(manager);
        {
            let mut embedded = EMBEDDED.lock();
            match embedded.iter().position(|h| *h == handle) {
                Some(at) => {
                    embedded.swap_remove(at);
                }
                None => {
                    drop(embedded);
                    // Live but not ours to close: a manager Java created.
                    registry::manager_entry(handle)?;
                    return Err(Error::InvalidArgument(format!(
                        "manager {handle:#018x} was created by Java: its Java owner closes it \
                         (manager_close closes only managers made with manager_create)"
                    )));
                }
            }
        }
        match registry::destroy_manager(handle)? {
            CloseOutcome::Closed(report) => {
                put_opt(leaked_bytes, report.total_bytes());
                if !leak_report.is_null() {
                    put_opt(leak_report, c_message(&report.to_string()));
                }
                Ok(())
            }
            CloseOutcome::Deferred { in_flight } => Err(Error::CloseTimedOut(format!(
                "close deferred: called from inside a call on the same manager; it completes \
                 when the {in_flight} call(s) in progress return"
            ))),
        }
    })
}

unsafe extern "C" fn nm_manager_spill(
    lease: nm_lease,
    target: u64,
    freed: *mut u64,
    err: Err,
) -> nm_status {
    run(err, || {
        let bytes = with_lease(lease, |e| Ok(e.manager().spill(target)?))?;
        put_opt(freed, bytes);
        Ok(())
    })
}

unsafe extern "C" fn nm_pool_spill_written(pool: nm_pool, bytes: u64, err: Err) -> nm_status {
    run(err, || {
        with_pool(pool, |p| {
            p.pool.note_spill_written(bytes);
            Ok(())
        })
    })
}

unsafe extern "C" fn nm_manager_reclaim(
    lease: nm_lease,
    target: u64,
    returned: *mut u64,
    err: Err,
) -> nm_status {
    run(err, || {
        let bytes = with_lease(lease, |e| Ok(e.manager().reclaim(target)?))?;
        put_opt(returned, bytes);
        Ok(())
    })
}

unsafe extern "C" fn nm_manager_cover_overcommit(
    lease: nm_lease,
    granted: *mut u64,
    err: Err,
) -> nm_status {
    run(err, || {
        let bytes = with_lease(lease, |e| Ok(e.manager().cover_overcommit()?))?;
        put_opt(granted, bytes);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nativemem_core::CapacityListener;

    fn message(err: *mut c_char) -> String {
        assert!(!err.is_null());
        // SAFETY: a message this module made; freed right after.
        let text = unsafe { CStr::from_ptr(err) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: as above, freed once.
        unsafe { nm_free_message(err) };
        text
    }

    /// A manager made by Java (here: by the registry directly, as `nativeCreate` does) is closed
    /// by its Java owner only: `manager_close` refuses it and it stays usable.
    #[test]
    fn manager_close_refuses_a_manager_it_did_not_create() {
        let l = Arc::new(CapacityListener::unlimited());
        let h = registry::create_manager(
            "java-owned".into(),
            MemoryConfig::default(),
            l.clone(),
            registry::DEFAULT_CLOSE_TIMEOUT,
        )
        .unwrap();
        let mut err = ptr::null_mut();
        let mut leaked = 7u64;
        // SAFETY: valid out pointers.
        let status =
            unsafe { nm_manager_close(to_handle(h), ptr::null_mut(), &mut leaked, &mut err) };
        assert_eq!(status, NM_ERR_INVALID_ARGUMENT);
        assert!(message(err).contains("was created by Java"));
        let mut lease = 0;
        // SAFETY: valid out pointers.
        assert_eq!(
            unsafe { nm_acquire(to_handle(h), &mut lease, ptr::null_mut()) },
            NM_OK
        );
        // SAFETY: the lease just acquired.
        assert_eq!(unsafe { nm_release(lease, ptr::null_mut()) }, NM_OK);
        assert!(matches!(
            registry::destroy_manager(h).unwrap(),
            CloseOutcome::Closed(_)
        ));
        // Closed now: a stale handle, for manager_close too.
        // SAFETY: valid out pointers.
        let status = unsafe {
            nm_manager_close(
                to_handle(h),
                ptr::null_mut(),
                ptr::null_mut(),
                ptr::null_mut(),
            )
        };
        assert_eq!(status, NM_ERR_STALE_HANDLE);
    }
}

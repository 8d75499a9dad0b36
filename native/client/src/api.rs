//! [`Api`]: the table, checked once; managers without a JVM ([`Api::create_manager`]).

use std::ffi::{c_char, c_void, CString};
use std::fmt;
use std::mem::{self, size_of};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nativemem_sys as sys;
use sys::NmApi;

use crate::error::BoxError;
use crate::error::{check, take_message, Code, Error, Result};

/// The nativemem function table of the process, checked once: a `Copy` handle on a
/// `&'static NmApi`.
///
/// Get it from the address Java gives ([`Api::from_address`] with
/// `NativeMemoryManager.nativeApi()`), or from a pointer ([`Api::from_ptr`]). Every other type of
/// this crate carries a copy.
#[derive(Clone, Copy)]
pub struct Api {
    table: &'static NmApi,
}

impl Api {
    /// The table at `address`, the `long` Java's `NativeMemoryManager.nativeApi()` returns.
    ///
    /// Refuses 0 and a table older or smaller than this client was built for
    /// ([`Code::Unsupported`]).
    ///
    /// # Safety
    /// `address` is 0 or the address of an `nm_api` table that stays valid and unchanged for the
    /// life of the process (the JVM never unloads `libnativemem_jni`).
    pub unsafe fn from_address(address: i64) -> Result<Api> {
        if address == 0 {
            return Err(Error::new(
                Code::Unsupported,
                "nativemem table address is 0 (pass NativeMemoryManager.nativeApi())",
            ));
        }
        // A Java long carries the pointer bit for bit.
        let pointer = address as u64 as usize as *const NmApi;
        // SAFETY: forwarded from the caller.
        unsafe { Api::from_ptr(pointer) }
    }

    /// The table at `table` (e.g. what `nativemem_api(NM_ABI_VERSION)` returned).
    ///
    /// Refuses null and a table whose `abi_version` is older than [`sys::NM_ABI_VERSION`] or
    /// whose `struct_size` is smaller than this client's `NmApi` ([`Code::Unsupported`]); only
    /// the two header fields are read before the check.
    ///
    /// # Safety
    /// `table` is null or points to an `nm_api` table (at least its two header fields, and all of
    /// it if the check passes) that stays valid and unchanged for the life of the process.
    pub unsafe fn from_ptr(table: *const NmApi) -> Result<Api> {
        if table.is_null() {
            return Err(Error::new(
                Code::Unsupported,
                "nativemem table pointer is null (the library does not support this ABI version?)",
            ));
        }
        // SAFETY: the caller guarantees the two u32 header fields are readable; nothing past them
        // is read before the check says the table is large enough.
        let (abi_version, struct_size) = unsafe {
            (
                ptr::addr_of!((*table).abi_version).read(),
                ptr::addr_of!((*table).struct_size).read(),
            )
        };
        if !NmApi::check(abi_version, struct_size) {
            return Err(Error::new(
                Code::Unsupported,
                format!(
                    "nativemem table has abi_version {abi_version} and struct_size {struct_size} \
                     bytes; this client needs abi_version >= {} and struct_size >= {} bytes \
                     (library older than the client)",
                    sys::NM_ABI_VERSION,
                    size_of::<NmApi>()
                ),
            ));
        }
        // SAFETY: checked non-null and large enough; the caller guarantees it lives forever.
        Ok(Api {
            table: unsafe { &*table },
        })
    }

    /// The raw table, for calls this crate does not wrap (and tests of the ABI itself).
    pub fn raw(self) -> &'static NmApi {
        self.table
    }

    /// Calls one table function, passing it a non-null `err` out-parameter, and turns its status
    /// and message into a `Result`.
    pub(crate) fn call(self, f: impl FnOnce(sys::Err) -> sys::nm_status) -> Result<()> {
        let mut message: *mut c_char = ptr::null_mut();
        let status = f(&mut message);
        // SAFETY: `message` is null or what this table's function stored through `err`.
        unsafe { check(self.table, status, message) }
    }

    /// Creates a manager that is not Spark's: its memory comes from `listener` (`None`:
    /// unlimited). For an engine's own tests and for embedding without a JVM. Close it with
    /// [`OwnedManager::close`] (dropping it closes it too).
    pub fn create_manager(
        self,
        name: &str,
        options: ManagerOptions,
        listener: Option<Arc<dyn Listener>>,
    ) -> Result<OwnedManager> {
        let name_c = c_string(name, "manager name")?;
        let c_options = options.to_c()?;

        // The listener's ctx is a shell the table owns one strong count of (released by
        // `listener_drop`). The header does not say whether a failed manager_create calls drop,
        // so on failure we empty the shell ourselves: the listener is dropped either way, and if
        // the table did not call drop only the empty shell leaks.
        let shell = listener.map(|l| Arc::new(ListenerShell(Mutex::new(Some(l)))));
        let vtable = shell.as_ref().map(|shell| sys::NmListener {
            struct_size: size_of::<sys::NmListener>() as u32,
            reserved0: 0,
            ctx: Arc::into_raw(Arc::clone(shell)) as *mut c_void,
            reserve: Some(listener_reserve),
            unreserve: Some(listener_unreserve),
            drop: Some(listener_drop),
        });
        let vtable_ptr = vtable
            .as_ref()
            .map_or(ptr::null(), |v| v as *const sys::NmListener);

        let mut handle: sys::nm_manager = 0;
        let result = self.call(|err| {
            // SAFETY: `name_c` is a live C string, `c_options` a whole nm_manager_options of this
            // version (`Api` checked the table has the function), `vtable_ptr` null or a valid
            // nm_listener the table copies, whose callbacks are sound for the ctx shell; `handle`/`err` writable.
            unsafe {
                (self.table.manager_create_with)(
                    name_c.as_ptr(),
                    &c_options,
                    vtable_ptr,
                    &mut handle,
                    err,
                )
            }
        });
        if let Err(e) = result {
            if let Some(shell) = shell {
                shell.take();
            }
            return Err(e);
        }
        Ok(OwnedManager {
            api: self,
            handle,
            name: name.to_owned(),
        })
    }
}

impl fmt::Debug for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Api")
            .field("abi_version", &self.table.abi_version)
            .field("struct_size", &self.table.struct_size)
            .finish()
    }
}

/// A Java `long` handle as the C `uint64_t` it is (same 64 bits).
pub(crate) fn handle_from_java(handle: i64) -> u64 {
    u64::from_ne_bytes(handle.to_ne_bytes())
}

/// A C `uint64_t` handle as the Java `long` that carries it (same 64 bits).
pub(crate) fn handle_to_java(handle: u64) -> i64 {
    i64::from_ne_bytes(handle.to_ne_bytes())
}

/// A name or path as a C string; an interior NUL is [`Code::InvalidArgument`].
pub(crate) fn c_string(text: &str, what: &str) -> Result<CString> {
    CString::new(text)
        .map_err(|_| Error::invalid_argument(format!("{what} {text:?} contains a NUL byte")))
}

/// An optional byte limit as the ABI's `int64_t` (-1: none); above `i64::MAX` is refused.
pub(crate) fn limit_to_c(limit: Option<u64>, what: &str) -> Result<i64> {
    match limit {
        None => Ok(-1),
        Some(bytes) => i64::try_from(bytes).map_err(|_| {
            Error::invalid_argument(format!("{what} of {bytes} bytes exceeds i64::MAX"))
        }),
    }
}

/// Settings of a manager made with [`Api::create_manager`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManagerOptions {
    /// Bytes asked from the listener at a time; `None` (or `Some(0)`): the library's default
    /// (8 MiB).
    pub reservation_block: Option<u64>,
    /// Limit of the whole task in bytes; `None`: no limit.
    pub task_limit: Option<u64>,
    /// Per-reservation slack in bytes: a reservation charges its pools in multiples of it and
    /// serves small grows and shrinks from what it charged (pools' used and peak may run ahead of
    /// what consumers hold, by a bound). Default: [`DEFAULT_RESERVATION_QUANTUM`] (1 MiB, the
    /// fast path); 0 (opt-in): exact accounting.
    pub reservation_quantum: u64,
    /// How long [`OwnedManager::close`] waits for calls in flight and leases held elsewhere;
    /// `None`: the library's default (10 s). Whole milliseconds.
    pub close_timeout: Option<Duration>,
}

/// The reservation quantum of [`ManagerOptions::default`]: 1 MiB (the header's
/// `NM_DEFAULT_RESERVATION_QUANTUM`).
pub const DEFAULT_RESERVATION_QUANTUM: u64 = sys::NM_DEFAULT_RESERVATION_QUANTUM;

impl Default for ManagerOptions {
    /// The library's defaults: 8 MiB blocks, no task limit, the 1 MiB reservation quantum,
    /// a 10 s close timeout.
    fn default() -> Self {
        ManagerOptions {
            reservation_block: None,
            task_limit: None,
            reservation_quantum: DEFAULT_RESERVATION_QUANTUM,
            close_timeout: None,
        }
    }
}

impl ManagerOptions {
    /// The options as the ABI's `nm_manager_options`.
    fn to_c(self) -> Result<sys::NmManagerOptions> {
        let close_timeout_millis = match self.close_timeout {
            None => -1,
            Some(t) => i64::try_from(t.as_millis()).map_err(|_| {
                Error::invalid_argument(format!("close timeout {t:?} exceeds i64::MAX ms"))
            })?,
        };
        Ok(sys::NmManagerOptions {
            reservation_block: self.reservation_block.unwrap_or(0),
            task_limit: limit_to_c(self.task_limit, "task_limit")?,
            reservation_quantum: self.reservation_quantum,
            close_timeout_millis,
            ..sys::NmManagerOptions::default()
        })
    }
}

/// Where a manager made with [`Api::create_manager`] gets its memory (what Spark's
/// `MemoryConsumer` is for a manager made by Java).
///
/// Calls come in whole reservation blocks, from any thread that grows or closes, with no
/// nativemem lock held: a listener may call into nativemem, but must not wait for another thread
/// that may itself be waiting for memory. A panic is caught and reported as
/// [`Code::Listener`].
pub trait Listener: Send + Sync {
    /// Grants up to `bytes`; returns what it grants (values above `bytes` count as `bytes`). An
    /// error fails the request that needed the memory ([`Code::Listener`]).
    fn reserve(&self, bytes: u64) -> std::result::Result<u64, BoxError>;
    /// Takes `bytes` back. An error is reported and the bytes stay counted as reserved.
    fn unreserve(&self, bytes: u64) -> std::result::Result<(), BoxError>;
}

/// The listener's ctx: emptied by the drop callback (or by a failed create).
struct ListenerShell(Mutex<Option<Arc<dyn Listener>>>);

impl ListenerShell {
    fn get(&self) -> Option<Arc<dyn Listener>> {
        // A poisoned lock only means a panic while cloning or taking an Arc: the Option is valid.
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn take(&self) -> Option<Arc<dyn Listener>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// # Safety
/// `ctx` is the `Arc<ListenerShell>` pointer `create_manager` leaked, not yet dropped.
unsafe fn shell<'a>(ctx: *mut c_void) -> &'a ListenerShell {
    // SAFETY: per the contract the table keeps ctx alive until drop, after every other callback.
    unsafe { &*(ctx as *const ListenerShell) }
}

unsafe extern "C" fn listener_reserve(
    ctx: *mut c_void,
    bytes: u64,
    granted: *mut u64,
) -> sys::nm_status {
    // SAFETY: the table passes the ctx of our vtable, live until drop.
    let shell = unsafe { shell(ctx) };
    let outcome = catch_unwind(AssertUnwindSafe(|| match shell.get() {
        Some(listener) => listener.reserve(bytes),
        None => Err("listener already dropped".into()),
    }));
    match outcome {
        Ok(Ok(got)) => {
            if !granted.is_null() {
                // SAFETY: the table passes a writable u64.
                unsafe { granted.write(got.min(bytes)) };
            }
            sys::NM_OK
        }
        Ok(Err(e)) => {
            log::warn!("listener failed to reserve {bytes} bytes: {e}");
            sys::NM_ERR_LISTENER
        }
        Err(panic) => {
            log::error!(
                "listener panicked reserving {bytes} bytes: {}",
                panic_message(&panic)
            );
            sys::NM_ERR_LISTENER
        }
    }
}

unsafe extern "C" fn listener_unreserve(ctx: *mut c_void, bytes: u64) -> sys::nm_status {
    // SAFETY: the table passes the ctx of our vtable, live until drop.
    let shell = unsafe { shell(ctx) };
    let outcome = catch_unwind(AssertUnwindSafe(|| match shell.get() {
        Some(listener) => listener.unreserve(bytes),
        None => Err("listener already dropped".into()),
    }));
    match outcome {
        Ok(Ok(())) => sys::NM_OK,
        Ok(Err(e)) => {
            log::warn!("listener failed to take back {bytes} bytes: {e}");
            sys::NM_ERR_LISTENER
        }
        Err(panic) => {
            log::error!(
                "listener panicked taking back {bytes} bytes: {}",
                panic_message(&panic)
            );
            sys::NM_ERR_LISTENER
        }
    }
}

unsafe extern "C" fn listener_drop(ctx: *mut c_void) {
    // SAFETY: ctx is the strong count `create_manager` leaked with Arc::into_raw; the table calls
    // drop once, after the last reserve/unreserve.
    let shell = unsafe { Arc::from_raw(ctx as *const ListenerShell) };
    let outcome = catch_unwind(AssertUnwindSafe(move || {
        drop(shell.take());
        drop(shell);
    }));
    if let Err(panic) = outcome {
        log::error!("dropping a listener panicked: {}", panic_message(&panic));
    }
}

/// The text of a caught panic (`panic!` with a literal or a formatted message), for logs and
/// the exceptions of the JNI kit (`java`).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    }
}

/// A manager made with [`Api::create_manager`], owned by the caller.
///
/// [`close`](OwnedManager::close) it to get the leak report; dropping it closes it too and logs
/// what the close found. While leases are held (on any thread), close waits for them (bounded by
/// the library's close timeout).
pub struct OwnedManager {
    api: Api,
    handle: sys::nm_manager,
    name: String,
}

/// What [`OwnedManager::close`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CloseReport {
    /// Bytes still held by reservations and allocations at close (freed by the close). State
    /// attached with [`Lease::attach`] is dropped before this is measured, so what its drop
    /// released is not counted.
    pub leaked_bytes: u64,
    /// The library's leak report text (empty when it gave none).
    pub report: String,
}

impl OwnedManager {
    /// The manager's handle as Java would pass it (`long`).
    pub fn handle(&self) -> i64 {
        handle_to_java(self.handle)
    }

    /// The name given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The table this manager belongs to.
    pub fn api(&self) -> Api {
        self.api
    }

    /// Closes the manager: waits for leases and calls in flight (bounded), drops spillers and
    /// attached state, frees what was leaked and reports it, gives every reserved byte back to
    /// the listener. [`Code::Timeout`] if leases were still held at the time limit (memory is
    /// then freed when the last one is released).
    pub fn close(self) -> Result<CloseReport> {
        let mut this = mem::ManuallyDrop::new(self);
        let result = this.close_inner();
        // Drop skipped: free the name (the rest is plain data).
        drop(mem::take(&mut this.name));
        result
    }

    fn close_inner(&self) -> Result<CloseReport> {
        let mut report: *mut c_char = ptr::null_mut();
        let mut leaked: u64 = 0;
        let result = self.api.call(|err| {
            // SAFETY: the table refuses bad handles by code; the out-parameters are writable.
            unsafe { (self.api.table.manager_close)(self.handle, &mut report, &mut leaked, err) }
        });
        // SAFETY: `report` is null or a string the table returned for us to free.
        let report = unsafe { take_message(self.api.raw(), report) }.unwrap_or_default();
        result.map(|()| CloseReport {
            leaked_bytes: leaked,
            report,
        })
    }
}

impl Drop for OwnedManager {
    fn drop(&mut self) {
        match self.close_inner() {
            Ok(report) if report.leaked_bytes > 0 => log::warn!(
                "[{}] closed on drop with {} bytes leaked: {}",
                self.name,
                report.leaked_bytes,
                report.report
            ),
            Ok(_) => {}
            Err(e) => log::error!("[{}] close on drop failed: {e}", self.name),
        }
    }
}

impl fmt::Debug for OwnedManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedManager")
            .field("name", &self.name)
            .field("handle", &self.handle)
            .finish()
    }
}

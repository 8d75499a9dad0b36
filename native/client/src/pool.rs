//! [`Pool`], and what is charged to it: [`Reservation`] (accounting only) and [`Allocation`]
//! (memory).

use std::ffi::c_void;
use std::fmt;
use std::mem::{self, ManuallyDrop, MaybeUninit};
use std::ptr::{self, NonNull};
use std::slice;
use std::sync::Arc;

use nativemem_sys as sys;

use crate::api::{c_string, Api};
use crate::error::{Error, Result};
use crate::spill::{Spiller, SpillerRegistration};

/// The pool handle, shared by the [`Pool`] and its live [`Allocation`]s (a free names the pool),
/// closed when the last of them goes.
pub(crate) struct PoolHandle {
    api: Api,
    handle: sys::nm_pool,
    path: String,
}

impl PoolHandle {
    pub(crate) fn new(api: Api, handle: sys::nm_pool, path: &str) -> PoolHandle {
        PoolHandle {
            api,
            handle,
            path: path.to_owned(),
        }
    }
}

impl Drop for PoolHandle {
    fn drop(&mut self) {
        let result = self.api.call(|err| {
            // SAFETY: the table refuses bad handles by code; `err` is writable.
            unsafe { (self.api.raw().pool_close)(self.handle, err) }
        });
        match result {
            Ok(()) => {}
            // The manager closed first and closed the handle with it.
            Err(e) if e.code.is_gone() => {
                log::debug!("pool {:?}: handle gone at drop: {e}", self.path)
            }
            Err(e) => log::warn!("pool {:?}: closing the handle failed: {e}", self.path),
        }
    }
}

/// A handle on one pool of a task's tree: make reservations, allocations and spillers with it.
///
/// Dropping it closes the handle, not the pool (which stays in the tree until the manager
/// closes); reservations, allocations and spillers made through it stay valid. `Send + Sync`.
pub struct Pool {
    inner: Arc<PoolHandle>,
}

/// Read-outs of a pool, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes charged to the pool and its children now.
    pub used: u64,
    /// Highest `used` so far.
    pub peak: u64,
    /// The pool's limit, if it has one.
    pub limit: Option<u64>,
}

impl Pool {
    pub(crate) fn new(inner: Arc<PoolHandle>) -> Pool {
        Pool { inner }
    }

    fn api(&self) -> Api {
        self.inner.api
    }

    /// The path the pool was opened with.
    pub fn path(&self) -> &str {
        &self.inner.path
    }

    /// The raw `nm_pool` handle (still owned by this value).
    pub fn as_raw(&self) -> sys::nm_pool {
        self.inner.handle
    }

    /// used / peak / limit of the pool.
    pub fn stats(&self) -> Result<PoolStats> {
        let api = self.api();
        let mut out = sys::NmPoolStats::default();
        api.call(|err| {
            // SAFETY: `out` and `err` are writable for the call.
            unsafe { (api.raw().pool_stats)(self.inner.handle, &mut out, err) }
        })?;
        Ok(PoolStats {
            used: out.used,
            peak: out.peak,
            limit: u64::try_from(out.limit).ok(),
        })
    }

    /// Counts `bytes` the task's spills wrote (spill files) for this pool's manager: Spark's
    /// Spill (Disk) of the task. What spillers freed the manager counts itself. Call it from a
    /// spiller or once per spill file.
    pub fn note_spill_written(&self, bytes: u64) -> Result<()> {
        let api = self.api();
        api.call(|err| {
            // SAFETY: `err` is writable for the call.
            unsafe { (api.raw().pool_spill_written)(self.inner.handle, bytes, err) }
        })
    }

    /// A new, empty reservation of this pool for `consumer` (the name reports and
    /// out-of-memory errors show).
    pub fn reservation(&self, consumer: &str) -> Result<Reservation> {
        let api = self.api();
        let consumer_c = c_string(consumer, "consumer name")?;
        let mut handle: sys::nm_reservation = 0;
        api.call(|err| {
            // SAFETY: `consumer_c` is a live C string; `handle` and `err` are writable.
            unsafe {
                (api.raw().reservation_new)(
                    self.inner.handle,
                    consumer_c.as_ptr(),
                    &mut handle,
                    err,
                )
            }
        })?;
        Ok(Reservation {
            api,
            handle,
            consumer: consumer.to_owned(),
        })
    }

    /// Allocates `size` bytes (> 0), uninitialized, aligned to `align` (a power of two; 0 means
    /// 16), charged to this pool; may reserve from Spark and spill. Freed when the
    /// [`Allocation`] drops.
    pub fn allocate(&self, size: usize, align: usize) -> Result<Allocation> {
        let api = self.api();
        let mut out: *mut c_void = ptr::null_mut();
        api.call(|err| {
            // SAFETY: `out` and `err` are writable for the call.
            unsafe {
                (api.raw().allocate)(self.inner.handle, size as u64, align as u64, &mut out, err)
            }
        })?;
        let ptr = NonNull::new(out.cast::<u8>()).ok_or_else(|| {
            Error::new(
                crate::error::Code::Internal,
                format!("allocate of {size} bytes returned NM_OK and a null pointer"),
            )
        })?;
        Ok(Allocation {
            pool: Arc::clone(&self.inner),
            ptr,
            len: size,
        })
    }

    /// Registers `spiller` for the memory of this pool. Grows of the same task that find no
    /// room, and Spark asking the task for memory, may call it, on any thread. Unregistered when
    /// the [`SpillerRegistration`] drops (or when the manager closes).
    pub fn register_spiller(
        &self,
        name: &str,
        spiller: Arc<dyn Spiller>,
    ) -> Result<SpillerRegistration> {
        crate::spill::register(self.api(), self.inner.handle, name, spiller)
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("path", &self.inner.path)
            .field("handle", &self.inner.handle)
            .finish()
    }
}

/// An accounting-only claim on a pool (DataFusion style): what an operator holds. Released on
/// drop (the handle is closed, which gives every byte back).
///
/// Methods take `&self`: a reservation may be shared between threads (`Send + Sync`), e.g. by an
/// operator and its spiller. Every size is in bytes. Calls fail only with the table's errors; a
/// failing grow or shrink changes nothing.
pub struct Reservation {
    api: Api,
    handle: sys::nm_reservation,
    consumer: String,
}

impl Reservation {
    /// The consumer name given at creation.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The raw `nm_reservation` handle (still owned by this value).
    pub fn as_raw(&self) -> sys::nm_reservation {
        self.handle
    }

    /// Grows by `bytes`; may reserve from Spark and spill. On
    /// [`Code::OutOfMemory`](crate::Code::OutOfMemory) nothing changed.
    pub fn try_grow(&self, bytes: u64) -> Result<()> {
        self.api.call(|err| {
            // SAFETY: the table refuses bad handles by code; `err` is writable.
            unsafe { (self.api.raw().reservation_try_grow)(self.handle, bytes, err) }
        })
    }

    /// Shrinks by `bytes`; more than the size is
    /// [`Code::InvalidArgument`](crate::Code::InvalidArgument) and nothing changes.
    pub fn shrink(&self, bytes: u64) -> Result<()> {
        self.api.call(|err| {
            // SAFETY: the table refuses bad handles by code; `err` is writable.
            unsafe { (self.api.raw().reservation_shrink)(self.handle, bytes, err) }
        })
    }

    /// Sets the size to `new_size` (grows like [`try_grow`](Self::try_grow), shrinks like
    /// [`shrink`](Self::shrink)).
    pub fn try_resize(&self, new_size: u64) -> Result<()> {
        self.api.call(|err| {
            // SAFETY: the table refuses bad handles by code; `err` is writable.
            unsafe { (self.api.raw().reservation_try_resize)(self.handle, new_size, err) }
        })
    }

    /// Grows by `bytes` at once, whatever the limits and what was reserved from Spark: never
    /// calls the JVM or a spiller, never waits. Returns the over-committed part (not covered by
    /// the reserved cushion), which the task's next fallible grow pays (see
    /// `reservation_force_grow` in the header). For code that can neither fail nor call out, such
    /// as a global allocator's flush (`nativemem-track`); everything else uses
    /// [`try_grow`](Self::try_grow). Errors (nothing changes): stale handle, closed manager,
    /// `bytes` above 2^62.
    pub fn force_grow(&self, bytes: u64) -> Result<u64> {
        let mut over = 0u64;
        self.api.call(|err| {
            // SAFETY: the table refuses bad handles by code; `over` and `err` are writable.
            unsafe { (self.api.raw().reservation_force_grow)(self.handle, bytes, &mut over, err) }
        })?;
        Ok(over)
    }

    /// Shrinks by up to `bytes` (what it holds, if less) without calling the JVM; returns the
    /// bytes released (0 after the manager's close emptied it). The counterpart of
    /// [`force_grow`](Self::force_grow).
    pub fn force_shrink(&self, bytes: u64) -> Result<u64> {
        let mut released = 0u64;
        self.api.call(|err| {
            // SAFETY: the table refuses bad handles by code; `released` and `err` are writable.
            unsafe {
                (self.api.raw().reservation_force_shrink)(self.handle, bytes, &mut released, err)
            }
        })?;
        Ok(released)
    }

    /// The current size.
    pub fn size(&self) -> Result<u64> {
        let mut out = 0u64;
        self.api.call(|err| {
            // SAFETY: `out` and `err` are writable for the call.
            unsafe { (self.api.raw().reservation_size)(self.handle, &mut out, err) }
        })?;
        Ok(out)
    }

    /// The most bytes this reservation has held: its consumer's peak (an operator's "peak
    /// memory"; the pool's is [`Pool::stats`]'s `peak`).
    pub fn peak(&self) -> Result<u64> {
        let mut out = 0u64;
        self.api.call(|err| {
            // SAFETY: `out` and `err` are writable for the call.
            unsafe { (self.api.raw().reservation_peak)(self.handle, &mut out, err) }
        })?;
        Ok(out)
    }

    /// Releases every byte and returns how many; the reservation stays usable.
    pub fn free(&self) -> Result<u64> {
        let mut freed = 0u64;
        self.api.call(|err| {
            // SAFETY: `freed` and `err` are writable for the call.
            unsafe { (self.api.raw().reservation_free)(self.handle, &mut freed, err) }
        })?;
        Ok(freed)
    }

    /// Releases every byte and ends the handle now, reporting an error instead of logging it.
    pub fn close(self) -> Result<()> {
        let mut this = ManuallyDrop::new(self);
        let result = this.close_inner();
        // Drop skipped: free the name (the rest is plain data).
        drop(mem::take(&mut this.consumer));
        result
    }

    fn close_inner(&self) -> Result<()> {
        self.api.call(|err| {
            // SAFETY: the table refuses bad handles by code; `err` is writable.
            unsafe { (self.api.raw().reservation_close)(self.handle, err) }
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        match self.close_inner() {
            Ok(()) => {}
            // The manager closed first and released it (reported as a leak there).
            Err(e) if e.code.is_gone() => {
                log::debug!("reservation {:?}: gone at drop: {e}", self.consumer)
            }
            Err(e) => log::warn!("reservation {:?}: close on drop failed: {e}", self.consumer),
        }
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("consumer", &self.consumer)
            .field("handle", &self.handle)
            .finish()
    }
}

/// Memory charged to a pool, freed through the table when dropped. Uninitialized when made.
///
/// **Contract:** the memory belongs to the task's manager. When the manager closes, it frees
/// every allocation still live (and reports it as a leak); the memory must not be used after the
/// manager closed. Dropping an `Allocation` after that is harmless: the free is refused as
/// stale and ignored (logged at debug).
///
/// Keeps the pool handle it came from open. `Send + Sync` like a `Box<[MaybeUninit<u8>]>`.
pub struct Allocation {
    pool: Arc<PoolHandle>,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the allocation is memory owned uniquely by this value (like a Box); shared access only
// reads through `&self`, mutation needs `&mut self`. The table's free may be called from any
// thread.
unsafe impl Send for Allocation {}
// SAFETY: see Send: `&Allocation` gives read-only access.
unsafe impl Sync for Allocation {}

impl Allocation {
    /// Start of the memory.
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Size in bytes (as asked).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: the ABI refuses empty allocations.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memory, read-only (possibly uninitialized).
    pub fn as_uninit(&self) -> &[MaybeUninit<u8>] {
        // SAFETY: `ptr` is valid for `len` bytes until drop (or until the manager closes, which
        // the type's contract forbids using it after); MaybeUninit has no validity requirement.
        unsafe { slice::from_raw_parts(self.ptr.as_ptr().cast(), self.len) }
    }

    /// The memory, writable (possibly uninitialized).
    pub fn as_uninit_mut(&mut self) -> &mut [MaybeUninit<u8>] {
        // SAFETY: as in `as_uninit`, and `&mut self` makes this the only access.
        unsafe { slice::from_raw_parts_mut(self.ptr.as_ptr().cast(), self.len) }
    }

    /// Fills the memory with `byte` and returns it as an initialized slice.
    pub fn fill(&mut self, byte: u8) -> &mut [u8] {
        // SAFETY: valid for `len` bytes and uniquely borrowed (see `as_uninit_mut`); after the
        // write every byte is initialized.
        unsafe {
            ptr::write_bytes(self.ptr.as_ptr(), byte, self.len);
            slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len)
        }
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        let api = self.pool.api;
        let result = api.call(|err| {
            // SAFETY: `ptr` came from this pool's `allocate` and is freed once; a pointer the
            // manager no longer knows is refused by code, never freed twice.
            unsafe {
                (api.raw().free)(
                    self.pool.handle,
                    self.ptr.as_ptr().cast(),
                    ptr::null_mut(),
                    err,
                )
            }
        });
        match result {
            Ok(()) => {}
            // The manager closed first and freed it (reported as a leak there).
            Err(e) if e.code.is_gone() => log::debug!(
                "allocation of {} bytes in {:?}: gone at drop: {e}",
                self.len,
                self.pool.path
            ),
            Err(e) => log::warn!(
                "allocation of {} bytes in {:?}: free on drop failed: {e}",
                self.len,
                self.pool.path
            ),
        }
    }
}

impl fmt::Debug for Allocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Allocation")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("pool", &self.pool.path)
            .finish()
    }
}

//! The global allocator and the per-thread state it reads.
//!
//! # Block layout
//! Every block, tracked or not, carries a header of `max(16, align)` bytes in front of the
//! caller's pointer; its first word is the account the block is charged to (null: untracked).
//! `dealloc` and `realloc` get only the pointer and the layout, so the header is how a block
//! freed on another thread, or after its thread's scope ended, is credited to the account it
//! was charged to. The alternative, a side table keyed by address, costs a hash and a lock (or a
//! concurrent map) per allocation and per free; the header costs 16 bytes per block (25% of a
//! 64-byte block, 0.4% of 4 KiB; malloc's own rounding is of the same order) and one store.
//! What a pool is charged is what the wrapped allocator was asked for, header included, so the
//! counts follow the process's real use.
//!
//! # Per-thread batching
//! A thread bound to a tracker adds each block's size to a local delta (a `Cell`, no atomic) and
//! sends it to the account when it passes the tracker's threshold (1 MiB by default, as Doris
//! does), so the pool follows the thread within the threshold and the cost of an allocation is a
//! thread-local read, a compare and a store (see the bench row in `scripts/bench.sh`). A flush
//! sends whole multiples of the threshold and keeps the remainder in the batch, so a block of
//! about the threshold's size allocated and freed in a loop does not flush every time. A free of
//! a block of the thread's own account goes to the same delta; a free of another account's block
//! (another thread's, or after the scope) is applied to that account's shared counters.
//!
//! # Re-entrancy
//! A flush calls the sink (nativemem), which may allocate. While it runs the thread is *busy*:
//! allocations are untracked and frees update counters only, so the allocator never re-enters
//! the sink, never recurses and never waits for itself. [`untracked`](crate::untracked) sets the
//! same flag for engine code that must not be charged.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr;

use crate::account::{retire, Account};

/// Per-thread state. `const`-initialized `Cell`s with no destructor: reading it never allocates
/// or registers a destructor, so it is usable from the allocator on any thread.
pub(crate) struct Local {
    /// The account this thread is bound to (null: none). The binding owns one reference.
    pub(crate) account: Cell<*const Account>,
    /// `account` unless tracking is suspended (then null): the one field the fast path reads.
    active: Cell<*const Account>,
    /// Bytes allocated minus freed on this thread for `account`, not yet sent to it.
    pub(crate) delta: Cell<i64>,
    /// `account`'s threshold (cached: no dereference on the fast path).
    pub(crate) limit: Cell<i64>,
    /// True while tracking is suspended (a flush is calling the sink, or [`crate::untracked`]).
    busy: Cell<bool>,
}

impl Local {
    /// Suspends (`true`) or resumes tracking; returns the previous state.
    pub(crate) fn set_busy(&self, busy: bool) -> bool {
        let was = self.busy.replace(busy);
        self.active.set(if busy {
            ptr::null()
        } else {
            self.account.get()
        });
        was
    }

    /// Binds the thread to `account` (null: unbound) with its threshold; returns the previous
    /// binding. The caller has sent the local delta.
    pub(crate) fn bind(&self, account: *const Account, limit: i64) -> *const Account {
        let prev = self.account.replace(account);
        self.limit.set(limit);
        if !self.busy.get() {
            self.active.set(account);
        }
        prev
    }
}

thread_local! {
    pub(crate) static LOCAL: Local = const {
        Local {
            account: Cell::new(ptr::null()),
            active: Cell::new(ptr::null()),
            delta: Cell::new(0),
            limit: Cell::new(0),
            busy: Cell::new(false),
        }
    };
}

/// Sends this thread's whole local delta to its account (tracking suspended meanwhile).
pub(crate) fn flush_local(l: &Local) {
    send(l, l.delta.replace(0));
}

/// The fast path's flush, once the delta passed the threshold: sends the whole multiples of the
/// threshold and keeps the remainder (smaller than the threshold) in the batch. So a block of
/// about the threshold's size allocated and freed in a loop does not flush on every call, and
/// the pool still follows the thread within the threshold.
#[cold]
fn flush_excess(l: &Local) {
    let delta = l.delta.get();
    let keep = delta % l.limit.get().max(1);
    l.delta.set(keep);
    send(l, delta - keep);
}

fn send(l: &Local, delta: i64) {
    let account = l.account.get();
    if account.is_null() || delta == 0 {
        return;
    }
    let was_busy = l.set_busy(true);
    // SAFETY: the binding holds a reference, so the account is live; and the state cannot reach
    // 0 (that reference is in it).
    let a = unsafe { &*account };
    let _ = a.apply(delta, !was_busy);
    if !was_busy {
        a.push();
    }
    l.set_busy(was_busy);
}

/// Charges `bytes` of a new block on this thread; returns the account to write in its header
/// (null: the thread is not bound, or tracking is suspended).
#[inline]
fn charge_here(bytes: usize) -> *const Account {
    LOCAL
        .try_with(|l| {
            let account = l.active.get();
            if account.is_null() {
                return account;
            }
            let delta = l.delta.get() + bytes as i64;
            l.delta.set(delta);
            if delta > l.limit.get() {
                flush_excess(l);
            }
            account
        })
        .unwrap_or(ptr::null())
}

/// Adds `bytes` (signed) to the account of an existing block.
#[inline]
fn change(account: *const Account, bytes: i64) {
    let local = LOCAL
        .try_with(|l| {
            if l.active.get() != account {
                return false;
            }
            let delta = l.delta.get() + bytes;
            l.delta.set(delta);
            if delta.unsigned_abs() > l.limit.get() as u64 {
                flush_excess(l);
            }
            true
        })
        .unwrap_or(false);
    if !local {
        change_shared(account, bytes);
    }
}

/// A change to an account this thread is not bound to (or while suspended).
#[cold]
fn change_shared(account: *const Account, bytes: i64) {
    // Suspend tracking while the sink may be called; without thread-locals (thread exit), never
    // call it.
    let may_call = LOCAL.try_with(|l| !l.set_busy(true)).unwrap_or(false);
    // SAFETY: a block's header holds its account, and a live block counts in the account's
    // state, so the account is live until this block's bytes are taken out below.
    let a = unsafe { &*account };
    let last = a.apply(bytes, may_call);
    if last {
        // SAFETY: this thread's RMW brought the state to 0.
        unsafe { retire(account, may_call, true) };
    }
    if may_call {
        let _ = LOCAL.try_with(|l| l.set_busy(false));
    }
}

/// Header size in front of a block aligned to `align`: a multiple of the alignment, at least 16
/// (room for the account pointer, and malloc's own minimum alignment on 64-bit targets).
#[inline]
fn header(align: usize) -> usize {
    align.max(16)
}

/// The layout asked of the wrapped allocator for `layout`, and the header size.
#[inline]
fn outer(layout: Layout) -> Option<(Layout, usize)> {
    let h = header(layout.align());
    let size = layout.size().checked_add(h)?;
    // `Layout::from_size_align`'s checks, minus the power-of-two test: `h` is the larger of 16
    // and an alignment, both powers of two.
    if size > isize::MAX as usize - (h - 1) {
        return None;
    }
    // SAFETY: `h` is a non-zero power of two and `size` rounded up to it does not overflow isize
    // (checked just above).
    Some((unsafe { Layout::from_size_align_unchecked(size, h) }, h))
}

/// A global allocator that charges what threads bound to a [`Tracker`](crate::Tracker) allocate
/// to the tracker's pool, wrapping another allocator (the system's by default).
///
/// ```no_run
/// use nativemem_track::TrackingAllocator;
///
/// #[global_allocator]
/// static ALLOC: TrackingAllocator = TrackingAllocator::system();
/// ```
///
/// Threads that are not bound pay the header and one thread-local read per call. See the crate
/// docs for the model and `alloc`'s module docs for the block layout.
pub struct TrackingAllocator<A = System> {
    inner: A,
}

impl TrackingAllocator<System> {
    /// Wraps the system allocator.
    pub const fn system() -> Self {
        TrackingAllocator { inner: System }
    }
}

impl<A> TrackingAllocator<A> {
    /// Wraps `inner` (jemalloc, mimalloc, a counting allocator...).
    pub const fn new(inner: A) -> Self {
        TrackingAllocator { inner }
    }

    /// The wrapped allocator.
    pub fn inner(&self) -> &A {
        &self.inner
    }
}

// SAFETY: every block handed out is a block of `inner` of the outer layout (size + header,
// aligned to the header size, a multiple of the asked alignment), offset by the header, so it is
// aligned and sized as asked and freed/reallocated with the same outer layout. The bookkeeping
// never unwinds (no panicking operation on these paths) and never calls back into this
// allocator while it is being used (the busy flag).
unsafe impl<A: GlobalAlloc> GlobalAlloc for TrackingAllocator<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some((outer_layout, h)) = outer(layout) else {
            return ptr::null_mut();
        };
        // SAFETY: `outer_layout` has a non-zero size (it includes the header).
        let base = unsafe { self.inner.alloc(outer_layout) };
        if base.is_null() {
            return base;
        }
        let account = charge_here(outer_layout.size());
        // SAFETY: `base` is aligned to at least 16 and the block is at least `h >= 16` bytes
        // longer than asked, so the header word and the returned pointer are in the block.
        unsafe {
            base.cast::<*const Account>().write(account);
            base.add(h)
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let Some((outer_layout, h)) = outer(layout) else {
            return ptr::null_mut();
        };
        // SAFETY: as in `alloc`.
        let base = unsafe { self.inner.alloc_zeroed(outer_layout) };
        if base.is_null() {
            return base;
        }
        let account = charge_here(outer_layout.size());
        // SAFETY: as in `alloc`.
        unsafe {
            base.cast::<*const Account>().write(account);
            base.add(h)
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let h = header(layout.align());
        // SAFETY: `ptr` came from `alloc`/`realloc` with this `layout` (GlobalAlloc contract), so
        // the header is `h` bytes before it and the outer layout is valid.
        let (base, outer_layout, account) = unsafe {
            let base = ptr.sub(h);
            let outer_layout = Layout::from_size_align_unchecked(layout.size() + h, h);
            (base, outer_layout, base.cast::<*const Account>().read())
        };
        // SAFETY: `base` is a block of `inner` with `outer_layout` (see above).
        unsafe { self.inner.dealloc(base, outer_layout) };
        if !account.is_null() {
            change(account, -(outer_layout.size() as i64));
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let h = header(layout.align());
        let Some(new_outer) = new_size.checked_add(h) else {
            return ptr::null_mut();
        };
        if Layout::from_size_align(new_outer, h).is_err() {
            return ptr::null_mut();
        }
        // SAFETY: as in `dealloc`.
        let (base, old_outer) = unsafe {
            (
                ptr.sub(h),
                Layout::from_size_align_unchecked(layout.size() + h, h),
            )
        };
        // SAFETY: `base` is a block of `inner` with `old_outer`; `new_outer` is non-zero and,
        // rounded to `h`, does not overflow isize (checked above). On failure the old block is
        // untouched, and so is the accounting.
        let new_base = unsafe { self.inner.realloc(base, old_outer, new_outer) };
        if new_base.is_null() {
            return new_base;
        }
        // SAFETY: the header moved with the block (a realloc keeps the prefix).
        let account = unsafe { new_base.cast::<*const Account>().read() };
        if account.is_null() {
            // An untracked block grown on a bound thread is adopted: charged whole from now on.
            let adopted = charge_here(new_outer);
            if !adopted.is_null() {
                // SAFETY: the header word is in the block (see `alloc`).
                unsafe { new_base.cast::<*const Account>().write(adopted) };
            }
        } else {
            // A tracked block stays with its account, whichever thread resizes it.
            change(account, new_outer as i64 - old_outer.size() as i64);
        }
        // SAFETY: the block is `new_outer` bytes long.
        unsafe { new_base.add(h) }
    }
}

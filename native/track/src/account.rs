//! Accounts: what one [`Tracker`](crate::Tracker) charged, shared by every thread bound to it and
//! every block it tracks (each block's header points to its account).
//!
//! # Counters
//! - `state` packs the **references** (tracker handles and thread bindings, [`REF`] each) with
//!   the **live bytes** the threads have handed to the account (signed, low 48 bits' worth). The
//!   account is retired by the one RMW that brings it to 0: no handle or binding is left (so no
//!   thread can charge it again) and every byte it tracked has been freed. A single counter makes
//!   "last reference and last byte" one atomic event; two counters would need a store-buffering
//!   protocol (`SeqCst` on every free) to never retire twice or never.
//! - `unflushed`: bytes counted in `state` but not yet sent to the sink (cross-thread frees and
//!   thread flushes land here first); pushed to the sink when its magnitude passes the threshold.
//! - `sent`: bytes the sink holds for the account. Written only by the thread holding `flushing`
//!   (a try-lock: a thread that finds it taken leaves its bytes in `unflushed` for the next push,
//!   so no thread ever waits in the allocator). A credit never takes the sink below 0: bytes freed
//!   before their charge was sent (another thread's unflushed delta) stay in `unflushed` and net
//!   against that charge, so the sink never refuses a credit it would otherwise have had to
//!   saturate, and no byte is lost.
//!
//! Every thread applies a change to `unflushed` *before* `state`, and `state` is the last field
//! it touches: when `state` reaches 0 every change is in `unflushed` and no other thread will
//! touch the account again, so the retiring thread owns it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicPtr, AtomicU64, Ordering};

/// One reference (a tracker handle or a thread binding) in `Account::state`.
pub(crate) const REF: i64 = 1 << 48;

/// Where an account's bytes go: a reservation of a nativemem pool. Implemented for
/// [`nativemem_client::Reservation`] (an engine in its own library, over the engine ABI) and, with
/// the `core` feature, for [`nativemem_core::Reservation`].
///
/// Both methods are called from inside the global allocator (with tracking suspended on the
/// calling thread): they must not call the JVM or block on a lock the allocating code may hold.
/// Both of nativemem's forced calls qualify: a few atomics in the core, plus a handle lookup
/// through the engine ABI. A panic is caught (an allocator must not unwind): a charge that panics
/// counts as refused, a credit as releasing nothing.
pub trait Sink: Send + Sync + 'static {
    /// Charges `bytes` whatever the limits; returns the over-committed part, or `None` if the
    /// pool is gone (its manager closed): the bytes are then not charged.
    fn charge(&self, bytes: u64) -> Option<u64>;
    /// Releases up to `bytes`; returns the bytes released (0 when the pool is gone).
    fn credit(&self, bytes: u64) -> u64;
}

impl Sink for nativemem_client::Reservation {
    fn charge(&self, bytes: u64) -> Option<u64> {
        self.force_grow(bytes).ok()
    }
    fn credit(&self, bytes: u64) -> u64 {
        self.force_shrink(bytes).unwrap_or(0)
    }
}

#[cfg(feature = "core")]
impl Sink for nativemem_core::Reservation {
    fn charge(&self, bytes: u64) -> Option<u64> {
        self.force_grow(bytes).ok()
    }
    fn credit(&self, bytes: u64) -> u64 {
        self.force_shrink(bytes)
    }
}

/// Read-outs of a tracker (bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackerStats {
    /// Bytes of live tracked blocks as handed to the account so far: excludes what threads
    /// bound to it hold in their local batches (less than the flush threshold each).
    pub live: i64,
    /// Bytes the pool holds for this tracker now.
    pub charged: u64,
    /// Bytes waiting to be sent to the pool (cross-thread frees, contended flushes).
    pub unflushed: i64,
    /// Bytes charged beyond what the task had reserved (cumulative; the next fallible grow of
    /// the task pays for them).
    pub overcommitted: u64,
    /// Bytes the pool refused to take because its manager had closed (cumulative).
    pub refused: u64,
    /// Flushes that reached the pool.
    pub flushes: u64,
}

/// See the module docs.
pub(crate) struct Account {
    state: AtomicI64,
    unflushed: AtomicI64,
    sent: AtomicI64,
    flushing: AtomicBool,
    /// Flush threshold in bytes (> 0 .. i64::MAX / 4).
    pub(crate) threshold: i64,
    sink: Box<dyn Sink>,
    overcommitted: AtomicU64,
    refused: AtomicU64,
    flushes: AtomicU64,
    /// Link in the list of accounts retired inside the allocator (see [`retire`]).
    next: AtomicPtr<Account>,
}

/// Accounts whose last byte was freed inside the allocator: their sink (a reservation) is
/// dropped later, outside the allocator (dropping it may take locks the freeing code holds).
static RETIRED: AtomicPtr<Account> = AtomicPtr::new(ptr::null_mut());

impl Account {
    /// A new account holding one reference (the tracker handle that creates it).
    pub(crate) fn new(sink: Box<dyn Sink>, threshold: i64) -> *const Account {
        Box::into_raw(Box::new(Account {
            state: AtomicI64::new(REF),
            unflushed: AtomicI64::new(0),
            sent: AtomicI64::new(0),
            flushing: AtomicBool::new(false),
            threshold,
            sink,
            overcommitted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            next: AtomicPtr::new(ptr::null_mut()),
        }))
    }

    pub(crate) fn stats(&self) -> TrackerStats {
        // Relaxed (all): read-outs, not a consistent cut.
        let state = self.state.load(Ordering::Relaxed);
        TrackerStats {
            live: state - refs_of(state) * REF,
            charged: self.sent.load(Ordering::Relaxed).max(0) as u64,
            unflushed: self.unflushed.load(Ordering::Relaxed),
            overcommitted: self.overcommitted.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
        }
    }

    /// Sends `unflushed` to the sink, unless another thread is doing so (then its bytes wait
    /// for the next push). The caller has suspended tracking on its thread (the sink may
    /// allocate).
    pub(crate) fn push(&self) {
        // Acquire: sees `sent` as the previous pusher left it (its Release below).
        if self.flushing.swap(true, Ordering::Acquire) {
            return;
        }
        // Relaxed: `unflushed` is a single counter changed only by RMWs; its value is all that
        // is read from it.
        let u = self.unflushed.swap(0, Ordering::Relaxed);
        // Relaxed: written only under `flushing` (acquired above).
        let mut sent = self.sent.load(Ordering::Relaxed);
        let mut keep = 0;
        if u > 0 {
            let charged =
                catch_unwind(AssertUnwindSafe(|| self.sink.charge(u as u64))).unwrap_or(None);
            match charged {
                Some(over) => {
                    sent += u;
                    // Relaxed (both): statistics.
                    self.overcommitted.fetch_add(over, Ordering::Relaxed);
                    self.flushes.fetch_add(1, Ordering::Relaxed);
                }
                // The pool is gone: these bytes are not charged anywhere (and never credited,
                // see below: a later credit is capped by `sent`).
                None => {
                    self.refused.fetch_add(u as u64, Ordering::Relaxed);
                    keep = 0;
                }
            }
        } else if u < 0 {
            let want = (-u).min(sent);
            keep = u + want;
            if want > 0 {
                // What the sink released is not used: `sent` follows what was asked, so a pool
                // that lost bytes (its manager closed) is never credited twice.
                let _ = catch_unwind(AssertUnwindSafe(|| self.sink.credit(want as u64)));
                sent -= want;
                // Relaxed: a statistic.
                self.flushes.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sent.store(sent, Ordering::Relaxed);
        if keep != 0 {
            // Relaxed: as above.
            self.unflushed.fetch_add(keep, Ordering::Relaxed);
        }
        // Release: the next pusher sees `sent`.
        self.flushing.store(false, Ordering::Release);
    }

    /// Adds `bytes` (signed) to the account from any thread: to `unflushed` first (pushing it
    /// past the threshold if `may_call`), then to `state`. Returns true if this made `state` 0:
    /// the caller must then retire the account (see the module docs).
    pub(crate) fn apply(&self, bytes: i64, may_call: bool) -> bool {
        // Relaxed: a single counter (see `push`); publishes nothing.
        let u = self.unflushed.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if may_call && u.unsigned_abs() > self.threshold as u64 {
            self.push();
        }
        self.add_state(bytes)
    }

    /// Adds `delta` to `state`; true if it became 0.
    pub(crate) fn add_state(&self, delta: i64) -> bool {
        // AcqRel: the thread that brings the state to 0 acquires every other thread's changes
        // (released by its own RMW on `state`, always its last touch of the account).
        self.state.fetch_add(delta, Ordering::AcqRel) + delta == 0
    }

    /// Takes one more reference (a clone of a tracker handle, a thread binding). The caller
    /// holds one already, so the state cannot be 0 here.
    pub(crate) fn acquire_ref(&self) {
        // Relaxed: the caller's own reference keeps the account alive; like `Arc::clone`.
        self.state.fetch_add(REF, Ordering::Relaxed);
    }
}

fn refs_of(state: i64) -> i64 {
    // Live bytes stay within ±2^47 (128 TiB), so rounding to the nearest multiple of REF
    // recovers the reference count even while the live bytes are transiently negative.
    (state + REF / 2).div_euclid(REF)
}

/// Retires `account`, whose state just became 0 on this thread.
///
/// `may_call`: the thread may call the sink now (tracking is not suspended). `in_alloc`: called
/// from inside the allocator, where dropping the sink (which may take locks) must wait for
/// [`collect_retired`].
///
/// # Safety
/// `account` came from [`Account::new`] and its state became 0 by this thread's RMW: no other
/// thread will touch it again.
pub(crate) unsafe fn retire(account: *const Account, may_call: bool, in_alloc: bool) {
    // SAFETY: live until freed below (or by `collect_retired`), per the contract.
    let a = unsafe { &*account };
    if may_call {
        // Everything left goes to the pool now (the final credit), so it shows at once.
        wait_for_push(a);
        a.push();
    }
    if in_alloc || !may_call {
        let node = account as *mut Account;
        // Relaxed: a first guess for the CAS loop.
        let mut head = RETIRED.load(Ordering::Relaxed);
        loop {
            // Relaxed: published by the Release CAS below.
            a.next.store(head, Ordering::Relaxed);
            // Release: `collect_retired` (Acquire swap) sees the node's fields.
            match RETIRED.compare_exchange_weak(head, node, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }
    // SAFETY: as above; the caller may call out (not in the allocator).
    unsafe { free_account(account) };
}

/// Frees accounts retired inside the allocator: a final push, then the sink (a reservation) is
/// dropped. Called outside the allocator, with tracking suspended, by every tracker and
/// binding creation and drop; an engine may also call it (it is cheap when the list is empty).
pub(crate) fn collect_retired() {
    // Relaxed: nothing to publish when the list is empty; the Acquire swap below is the edge.
    if RETIRED.load(Ordering::Relaxed).is_null() {
        return;
    }
    // Acquire: sees the fields of every node pushed (their Release CAS).
    let mut node = RETIRED.swap(ptr::null_mut(), Ordering::Acquire);
    while !node.is_null() {
        // SAFETY: nodes on the list are retired accounts no other thread touches.
        let a = unsafe { &*node };
        // Relaxed: the swap above acquired it.
        let next = a.next.load(Ordering::Relaxed);
        wait_for_push(a);
        a.push();
        // SAFETY: taken off the list by the swap: freed exactly once.
        unsafe { free_account(node) };
        node = next;
    }
}

/// Waits for a push in progress on another thread (a few atomics or one ABI call long).
fn wait_for_push(a: &Account) {
    // Acquire: pairs with the pusher's Release.
    while a.flushing.load(Ordering::Acquire) {
        std::hint::spin_loop();
    }
}

/// # Safety
/// `account` came from [`Account::new`], is retired and is freed exactly once.
unsafe fn free_account(account: *const Account) {
    // SAFETY: per the contract, this is the last use of the box.
    drop(unsafe { Box::from_raw(account as *mut Account) });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_survive_negative_live_bytes() {
        assert_eq!(refs_of(REF), 1);
        assert_eq!(refs_of(3 * REF - 1000), 3);
        assert_eq!(refs_of(REF + 1000), 1);
        assert_eq!(refs_of(-1000), 0);
        assert_eq!(refs_of(0), 0);
    }
}

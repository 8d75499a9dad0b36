//! A bounded randomized test of the engine ABI: several threads drive the real `nm_api` table
//! with random sequences of calls over a shared set of handles: valid ones, stale ones (closed
//! by another thread or earlier), forged ones (random values, and random values with a real kind
//! tag) and wrong-kind ones (a pool handle passed as a reservation). Managers are created and
//! closed while other threads use them; leases are acquired and released on different threads;
//! spillers' callbacks re-enter the table (`reservation_size`, `reservation_free`); attached
//! state counts its drops.
//!
//! Afterwards: every manager is closed, every listener was repaid exactly (and dropped once),
//! every spiller's and attached state's drop ran exactly once, no call returned a status the
//! header does not document for it (a caught panic would be `NM_ERR_INTERNAL`), and the live
//! blocks and bytes of the process (a counting global allocator) are back to their baseline.
//!
//! Reproducible: the seed is printed (`NM_FUZZ_SEED=<seed>` replays the same per-thread
//! sequences; the interleaving differs). Duration: `NM_FUZZ_SECONDS` (default 6). One `#[test]`
//! in its own binary, for the allocation count.
//!
//! Steady state for the count: two kinds of storage stay once grown, and are capacity, not
//! leaks. The handle tables keep their slot storage: every shared list of handles below is capped
//! (adding to a full list first closes a random entry), so the live handles per table stay below
//! a bound, and the warm-up grows every table past it first. And `parking_lot`'s global table of
//! parked threads grows with the number of threads that have parked (it is never shrunk: 1 KiB
//! and a 32-byte header once more than two threads contend); the warm-up parks as many threads
//! at once as the fuzz runs, plus this one.

mod common;

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use nativemem_handles::kind;

#[global_allocator]
static ALLOCATOR: nativemem_testkit::CountingAllocator = nativemem_testkit::CountingAllocator;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const THREADS: usize = 4;

const CAP_MANAGERS: usize = 4;
const CAP_LEASES: usize = 12;
const CAP_POOLS: usize = 24;
const CAP_RESERVATIONS: usize = 48;
const CAP_SPILLERS: usize = 16;
const CAP_STATES: usize = 16;
const CAP_ALLOCS: usize = 48;
/// A thread releases a lease it acquired after this many of its own operations.
const LEASE_OPS: u64 = 24;

// ---- a small PRNG (no dependency): splitmix64 seeds, xorshift64* streams ---------------------

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut s = seed;
        Rng(splitmix64(&mut s) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// A size in bytes: mostly small, sometimes large, rarely absurd.
    fn bytes(&mut self) -> u64 {
        match self.below(100) {
            0..=59 => self.below(64 * KIB) + 1,
            60..=94 => self.below(4 * MIB),
            95..=98 => self.below(64 * MIB),
            _ => u64::MAX - self.below(3),
        }
    }
}

// ---- the shared handles --------------------------------------------------------------------

#[derive(Default)]
struct Shared {
    managers: Mutex<Vec<u64>>,
    leases: Mutex<Vec<u64>>,
    pools: Mutex<Vec<u64>>,
    reservations: Mutex<Vec<u64>>,
    spillers: Mutex<Vec<u64>>,
    /// Attached state: (handle, the pointer attached).
    states: Mutex<Vec<(u64, usize)>>,
    /// Allocations: (pool handle, pointer).
    allocs: Mutex<Vec<(u64, usize)>>,
    /// Everything whose drop must have run exactly once at the end.
    listeners: Mutex<Vec<Arc<TestListener>>>,
    all_spillers: Mutex<Vec<Arc<TestSpiller>>>,
    all_states: Mutex<Vec<Arc<TestState>>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Manager,
    Lease,
    Pool,
    Reservation,
    Spiller,
    State,
}

/// The handle kind tags of the provider's tables (see `nativemem-handles`).
const TAGS: [u8; 6] = [
    kind::MANAGER,
    kind::LEASE,
    kind::POOL,
    kind::RESERVATION,
    kind::SPILLER,
    kind::STATE,
];

impl Shared {
    fn list(&self, kind: Kind) -> Vec<u64> {
        match kind {
            Kind::Manager => self.managers.lock().unwrap().clone(),
            Kind::Lease => self.leases.lock().unwrap().clone(),
            Kind::Pool => self.pools.lock().unwrap().clone(),
            Kind::Reservation => self.reservations.lock().unwrap().clone(),
            Kind::Spiller => self.spillers.lock().unwrap().clone(),
            Kind::State => self.states.lock().unwrap().iter().map(|s| s.0).collect(),
        }
    }

    /// A handle to use where `kind` is expected: mostly one of that kind (live or stale),
    /// sometimes one of another kind, a random value, or a random value with a real tag.
    fn pick(&self, rng: &mut Rng, kind: Kind) -> u64 {
        let roll = rng.below(100);
        let from = if roll < 80 {
            kind
        } else if roll < 88 {
            [
                Kind::Manager,
                Kind::Lease,
                Kind::Pool,
                Kind::Reservation,
                Kind::Spiller,
                Kind::State,
            ][rng.below(6) as usize]
        } else if roll < 94 {
            return rng.next();
        } else {
            let tag = u64::from(TAGS[rng.below(6) as usize]);
            return (tag << 56) | (rng.below(1 << 16) << 24) | rng.below(64);
        };
        let list = self.list(from);
        if list.is_empty() {
            return rng.next() >> rng.below(64);
        }
        list[rng.below(list.len() as u64) as usize]
    }
}

/// Adds `value` to `list`; if the list was full, first takes a random entry out and returns it
/// (the caller closes it, outside the lock).
fn push<T>(list: &Mutex<Vec<T>>, value: T, cap: usize, rng: &mut Rng) -> Option<T> {
    let mut l = list.lock().unwrap();
    let evicted = if l.len() >= cap {
        let at = rng.below(l.len() as u64) as usize;
        Some(l.swap_remove(at))
    } else {
        None
    };
    l.push(value);
    evicted
}

// ---- statuses --------------------------------------------------------------------------------

/// Per-thread counts of the statuses returned, by code.
type Histogram = [u64; 12];

/// Records `status` of `function`, panicking on a code the header does not document for it.
fn record(hist: &mut Histogram, function: &str, status: nm_status) {
    let allowed = match status {
        NM_OK
        | NM_ERR_INVALID_ARGUMENT
        | NM_ERR_STALE_HANDLE
        | NM_ERR_INVALID_HANDLE
        | NM_ERR_CLOSED => true,
        NM_ERR_OUT_OF_MEMORY => matches!(
            function,
            "reservation_try_grow"
                | "reservation_try_resize"
                | "allocate"
                | "reservation_new"
                | "pool_open"
                | "acquire"
                | "attach"
                | "spiller_register"
                | "manager_create"
        ),
        NM_ERR_UNKNOWN_POINTER => function == "free",
        NM_ERR_TIMEOUT => function == "manager_close",
        _ => false,
    };
    assert!(
        allowed,
        "{function} returned the undocumented status {status}"
    );
    hist[status as usize] += 1;
}

/// An `err` argument: half the calls ask for the message (which is then freed).
struct ErrArg(*mut std::ffi::c_char, bool);

impl ErrArg {
    fn new(rng: &mut Rng) -> ErrArg {
        ErrArg(ptr::null_mut(), rng.chance(50))
    }
    fn ptr(&mut self) -> *mut *mut std::ffi::c_char {
        if self.1 {
            &mut self.0
        } else {
            ptr::null_mut()
        }
    }
}

impl Drop for ErrArg {
    fn drop(&mut self) {
        take_message(self.0);
    }
}

// ---- closing what a list evicts ----------------------------------------------------------------

fn close_manager(m: u64, hist: &mut Histogram, rng: &mut Rng) {
    let mut leaked = 0;
    let mut report = ptr::null_mut();
    let mut e = ErrArg::new(rng);
    let want_report = rng.chance(50);
    // SAFETY: valid (or NULL) out pointers.
    let status = unsafe {
        (api().manager_close)(
            m,
            if want_report {
                &mut report
            } else {
                ptr::null_mut()
            },
            &mut leaked,
            e.ptr(),
        )
    };
    take_message(report);
    record(hist, "manager_close", status);
}

fn release(l: u64, hist: &mut Histogram) {
    // SAFETY: a lease handle (any value is checked).
    record(hist, "release", unsafe {
        (api().release)(l, ptr::null_mut())
    });
}

fn close_pool(p: u64, hist: &mut Histogram) {
    // SAFETY: a pool handle (any value is checked).
    record(hist, "pool_close", unsafe {
        (api().pool_close)(p, ptr::null_mut())
    });
}

fn close_reservation(r: u64, hist: &mut Histogram) {
    // SAFETY: a reservation handle (any value is checked).
    record(hist, "reservation_close", unsafe {
        (api().reservation_close)(r, ptr::null_mut())
    });
}

fn unregister(s: u64, hist: &mut Histogram) {
    // SAFETY: a spiller handle (any value is checked).
    record(hist, "spiller_unregister", unsafe {
        (api().spiller_unregister)(s, ptr::null_mut())
    });
}

fn detach(state: (u64, usize), run_drop: bool, hist: &mut Histogram) {
    // SAFETY: a state handle (any value is checked).
    let status = unsafe { (api().detach)(state.0, i32::from(run_drop), ptr::null_mut()) };
    record(hist, "detach", status);
    if status == NM_OK && !run_drop {
        // Detached without its drop: the state is ours again; drop it as its owner.
        // SAFETY: the pointer attached with `state_drop`, now owned by this thread alone.
        unsafe { state_drop(state.1 as *mut c_void) };
    }
}

fn free_alloc(pool: u64, p: usize, hist: &mut Histogram) {
    let mut size = 0;
    // SAFETY: the table checks the pointer against its live allocations before touching it.
    let status = unsafe { (api().free)(pool, p as *mut c_void, &mut size, ptr::null_mut()) };
    record(hist, "free", status);
}

// ---- one thread --------------------------------------------------------------------------------

struct Worker<'a> {
    shared: &'a Shared,
    rng: Rng,
    hist: Histogram,
    ops: u64,
    /// Leases this thread acquired and has not released: (handle, op when acquired).
    own_leases: Vec<(u64, u64)>,
}

const PATHS: [&[u8]; 7] = [
    b"\0",
    b"scan\0",
    b"scan/arrow\0",
    b"join/build\0",
    b"join/build/hash\0",
    b"join/build/hash/probe\0",
    b"x/y\0",
];

impl Worker<'_> {
    fn release_own_leases(&mut self) {
        for (l, _) in std::mem::take(&mut self.own_leases) {
            release(l, &mut self.hist);
        }
    }

    fn step(&mut self) {
        self.ops += 1;
        // Leases are for a span of work: release the old ones.
        let now = self.ops;
        let (old, young): (Vec<_>, Vec<_>) = std::mem::take(&mut self.own_leases)
            .into_iter()
            .partition(|(_, at)| now - at > LEASE_OPS);
        self.own_leases = young;
        for (l, _) in old {
            release(l, &mut self.hist);
        }

        let a = api();
        let s = self.shared;
        let rng = &mut self.rng;
        let hist = &mut self.hist;
        let mut e = ErrArg::new(rng);
        match rng.below(100) {
            // Managers: create, close.
            0 => {
                let listener = TestListener::new(8 * MIB + rng.below(56 * MIB));
                let vt = listener.vtable();
                let block = [0, 64 * KIB, MIB][rng.below(3) as usize];
                let limit = if rng.chance(30) {
                    (16 * MIB + rng.below(32 * MIB)) as i64
                } else {
                    -1
                };
                let mut m = 0;
                // SAFETY: valid arguments and out pointer.
                let status = unsafe {
                    (a.manager_create)(cstr!("fuzz"), block, limit, &vt, &mut m, e.ptr())
                };
                record(hist, "manager_create", status);
                if status == NM_OK {
                    s.listeners.lock().unwrap().push(listener);
                    if let Some(evicted) = push(&s.managers, m, CAP_MANAGERS, rng) {
                        drop(e);
                        self.release_own_leases();
                        close_manager(evicted, &mut self.hist, &mut self.rng);
                    }
                } else {
                    // A failed create leaves ctx ours: give back the reference it holds.
                    // SAFETY: the reference `vtable` leaked, owned by nobody else.
                    drop(unsafe { Arc::from_raw(vt.ctx as *const TestListener) });
                }
            }
            1 if rng.chance(50) => {
                let m = s.pick(rng, Kind::Manager);
                drop(e);
                self.release_own_leases();
                close_manager(m, &mut self.hist, &mut self.rng);
            }
            // Leases.
            1..=11 => {
                let m = s.pick(rng, Kind::Manager);
                let mut l = 0;
                // SAFETY: valid out pointer.
                let status = unsafe { (a.acquire)(m, &mut l, e.ptr()) };
                record(hist, "acquire", status);
                if status == NM_OK {
                    self.own_leases.push((l, now));
                    if let Some(evicted) = push(&s.leases, l, CAP_LEASES, rng) {
                        release(evicted, hist);
                    }
                }
            }
            12..=15 => release(s.pick(rng, Kind::Lease), hist),
            16..=18 => {
                let l = s.pick(rng, Kind::Lease);
                let mut st = NmManagerStats::default();
                // SAFETY: valid out pointer.
                record(hist, "manager_stats", unsafe {
                    (a.manager_stats)(l, &mut st, e.ptr())
                });
                let mut report = ptr::null_mut();
                // SAFETY: valid out pointer; the report is freed.
                let status = unsafe { (a.usage_report)(l, &mut report, ptr::null_mut()) };
                take_message(report);
                record(hist, "usage_report", status);
            }
            // Pools.
            19..=26 => {
                let l = s.pick(rng, Kind::Lease);
                let path = PATHS[rng.below(PATHS.len() as u64) as usize];
                let limit = match rng.below(10) {
                    0 => (8 * MIB) as i64,
                    1 => -2,
                    _ => -1,
                };
                let mut p = 0;
                // SAFETY: a NUL-terminated path and a valid out pointer.
                let status =
                    unsafe { (a.pool_open)(l, path.as_ptr().cast(), limit, &mut p, e.ptr()) };
                record(hist, "pool_open", status);
                if status == NM_OK {
                    if let Some(evicted) = push(&s.pools, p, CAP_POOLS, rng) {
                        close_pool(evicted, hist);
                    }
                }
            }
            27..=28 => close_pool(s.pick(rng, Kind::Pool), hist),
            29..=30 => {
                let mut st = NmPoolStats::default();
                let p = s.pick(rng, Kind::Pool);
                // SAFETY: valid out pointer.
                record(hist, "pool_stats", unsafe {
                    (a.pool_stats)(p, &mut st, e.ptr())
                });
            }
            // Reservations.
            31..=36 => {
                let p = s.pick(rng, Kind::Pool);
                let mut r = 0;
                // SAFETY: valid arguments and out pointer.
                let status = unsafe { (a.reservation_new)(p, cstr!("r"), &mut r, e.ptr()) };
                record(hist, "reservation_new", status);
                if status == NM_OK {
                    if let Some(evicted) = push(&s.reservations, r, CAP_RESERVATIONS, rng) {
                        close_reservation(evicted, hist);
                    }
                }
            }
            37..=46 => {
                let r = s.pick(rng, Kind::Reservation);
                let bytes = rng.bytes();
                // SAFETY: a reservation handle (checked).
                let status = unsafe { (a.reservation_try_grow)(r, bytes, e.ptr()) };
                record(hist, "reservation_try_grow", status);
            }
            47..=51 => {
                let r = s.pick(rng, Kind::Reservation);
                let bytes = rng.bytes();
                // SAFETY: a reservation handle (checked).
                let status = unsafe { (a.reservation_shrink)(r, bytes, e.ptr()) };
                record(hist, "reservation_shrink", status);
            }
            52..=54 => {
                let r = s.pick(rng, Kind::Reservation);
                let bytes = rng.bytes();
                // SAFETY: a reservation handle (checked).
                let status = unsafe { (a.reservation_try_resize)(r, bytes, e.ptr()) };
                record(hist, "reservation_try_resize", status);
            }
            55..=56 => {
                let r = s.pick(rng, Kind::Reservation);
                let mut size = 0;
                // SAFETY: valid out pointer.
                let status = unsafe { (a.reservation_size)(r, &mut size, e.ptr()) };
                record(hist, "reservation_size", status);
                let mut freed = 0;
                // SAFETY: valid out pointer.
                let status = unsafe { (a.reservation_free)(r, &mut freed, ptr::null_mut()) };
                record(hist, "reservation_free", status);
            }
            57..=59 => {
                let r = s.pick(rng, Kind::Reservation);
                let bytes = rng.bytes();
                let mut over = 0;
                // SAFETY: valid out pointer.
                let status = unsafe { (a.reservation_force_grow)(r, bytes, &mut over, e.ptr()) };
                record(hist, "reservation_force_grow", status);
                let bytes = rng.bytes();
                let mut released = 0;
                // SAFETY: valid out pointer.
                let status = unsafe {
                    (a.reservation_force_shrink)(r, bytes, &mut released, ptr::null_mut())
                };
                record(hist, "reservation_force_shrink", status);
            }
            60..=61 => close_reservation(s.pick(rng, Kind::Reservation), hist),
            // Allocations.
            62..=68 => {
                let p = s.pick(rng, Kind::Pool);
                let size = if rng.chance(3) {
                    0
                } else {
                    rng.bytes().min(u64::MAX >> 1)
                };
                let size = if rng.chance(90) {
                    size.min(256 * KIB)
                } else {
                    size
                };
                let align = match rng.below(10) {
                    0 => 3,
                    1 => 4096,
                    _ => 1 << rng.below(7),
                };
                let mut out = ptr::null_mut();
                // SAFETY: valid out pointer.
                let status = unsafe { (a.allocate)(p, size, align, &mut out, e.ptr()) };
                record(hist, "allocate", status);
                if status == NM_OK {
                    if let Some((ep, eptr)) = push(&s.allocs, (p, out as usize), CAP_ALLOCS, rng) {
                        free_alloc(ep, eptr, hist);
                    }
                } else {
                    assert!(out.is_null(), "a failed allocate leaves *out NULL");
                }
            }
            69..=73 => {
                let taken = {
                    let mut l = s.allocs.lock().unwrap();
                    if l.is_empty() {
                        None
                    } else {
                        let at = rng.below(l.len() as u64) as usize;
                        Some(l.swap_remove(at))
                    }
                };
                match (taken, rng.below(10)) {
                    // A pointer with a pool handle of any kind (maybe of another manager).
                    (Some((_, p)), 0) => free_alloc(s.pick(rng, Kind::Pool), p, hist),
                    (Some((pool, p)), _) => free_alloc(pool, p, hist),
                    // A pointer nobody allocated (never dereferenced: looked up by address).
                    (None, _) => {
                        let p = (rng.next() as usize & !7) | 8;
                        free_alloc(s.pick(rng, Kind::Pool), p, hist);
                    }
                }
            }
            // Spillers, whose callbacks re-enter the table.
            74..=78 => {
                let p = s.pick(rng, Kind::Pool);
                let mut r = 0;
                // SAFETY: valid arguments and out pointer.
                let status =
                    unsafe { (a.reservation_new)(p, cstr!("spillable"), &mut r, ptr::null_mut()) };
                record(hist, "reservation_new", status);
                if status == NM_OK {
                    let bytes = rng.below(2 * MIB);
                    // SAFETY: the reservation just made.
                    let status = unsafe { (a.reservation_try_grow)(r, bytes, ptr::null_mut()) };
                    record(hist, "reservation_try_grow", status);
                    if let Some(evicted) = push(&s.reservations, r, CAP_RESERVATIONS, rng) {
                        close_reservation(evicted, hist);
                    }
                }
                let spiller = TestSpiller::new(r);
                let vt = spiller.vtable();
                let mut h = 0;
                let pool = if rng.chance(90) {
                    p
                } else {
                    s.pick(rng, Kind::Pool)
                };
                // SAFETY: valid arguments and out pointer.
                let status =
                    unsafe { (a.spiller_register)(pool, cstr!("s"), &vt, &mut h, e.ptr()) };
                record(hist, "spiller_register", status);
                if status == NM_OK {
                    s.all_spillers.lock().unwrap().push(spiller);
                    if let Some(evicted) = push(&s.spillers, h, CAP_SPILLERS, rng) {
                        unregister(evicted, hist);
                    }
                } else {
                    // SAFETY: a failed registration leaves ctx ours.
                    unsafe { TestSpiller::reclaim_ctx(&vt) };
                    assert_eq!(spiller.drops.load(Ordering::SeqCst), 0);
                }
            }
            79..=80 => unregister(s.pick(rng, Kind::Spiller), hist),
            81..=84 => {
                let l = s.pick(rng, Kind::Lease);
                let target = rng.bytes();
                let mut out = 0;
                let (name, status) = if rng.chance(50) {
                    // SAFETY: valid out pointer.
                    ("manager_spill", unsafe {
                        (a.manager_spill)(l, target, &mut out, e.ptr())
                    })
                } else {
                    // SAFETY: valid out pointer.
                    ("manager_reclaim", unsafe {
                        (a.manager_reclaim)(l, target, &mut out, e.ptr())
                    })
                };
                record(hist, name, status);
            }
            // Attached state.
            85..=89 => {
                let l = s.pick(rng, Kind::Lease);
                let state = TestState::new();
                let raw = state.raw();
                let mut h = 0;
                // SAFETY: valid arguments and out pointer.
                let status = unsafe { (a.attach)(l, raw, Some(state_drop), &mut h, e.ptr()) };
                record(hist, "attach", status);
                if status == NM_OK {
                    s.all_states.lock().unwrap().push(state);
                    if let Some(evicted) = push(&s.states, (h, raw as usize), CAP_STATES, rng) {
                        detach(evicted, true, hist);
                    }
                } else {
                    // SAFETY: a failed attach leaves the state ours.
                    unsafe { TestState::reclaim(raw) };
                    assert_eq!(state.drops.load(Ordering::SeqCst), 0);
                }
            }
            90..=92 => {
                let taken = {
                    let mut l = s.states.lock().unwrap();
                    if l.is_empty() {
                        None
                    } else {
                        let at = rng.below(l.len() as u64) as usize;
                        Some(l.swap_remove(at))
                    }
                };
                match taken {
                    Some(st) => detach(st, rng.chance(70), hist),
                    // A handle that names no state of ours (run_drop 1: never ours to drop).
                    None => detach((s.pick(rng, Kind::State), 0), true, hist),
                }
            }
            // Wrong-kind and forged handles everywhere else.
            _ => {
                let r = s.pick(rng, Kind::Pool);
                // SAFETY: a handle of the wrong kind (checked).
                let status = unsafe { (a.reservation_try_grow)(r, KIB, e.ptr()) };
                record(hist, "reservation_try_grow", status);
                let l = s.pick(rng, Kind::Reservation);
                let mut p = 0;
                // SAFETY: a handle of the wrong kind (checked).
                let status = unsafe { (a.pool_open)(l, cstr!("w"), -1, &mut p, ptr::null_mut()) };
                record(hist, "pool_open", status);
                if status == NM_OK {
                    close_pool(p, hist);
                }
            }
        }
    }
}

// ---- the test ------------------------------------------------------------------------------

/// Grows every handle table past what the fuzz can hold live at once, and runs a thread, so
/// the storage that stays (capacity) is there before the baseline.
fn warm_up() {
    let a = api();
    let mut hist = [0; 12];
    let listeners: Vec<_> = (0..2 * CAP_MANAGERS + THREADS)
        .map(|_| TestListener::new(u64::MAX / 4))
        .collect();
    let managers: Vec<u64> = listeners
        .iter()
        .map(|l| create(cstr!("warm"), MIB, l))
        .collect();
    let m = managers[0];
    let mut lease = 0;
    // SAFETY (all calls): valid arguments and out pointers.
    unsafe {
        ok(
            "acquire",
            (a.acquire)(m, &mut lease, ptr::null_mut()),
            ptr::null_mut(),
        );
        let mut leases = Vec::new();
        for _ in 0..2 * CAP_LEASES + THREADS {
            let mut l = 0;
            ok(
                "acquire",
                (a.acquire)(m, &mut l, ptr::null_mut()),
                ptr::null_mut(),
            );
            leases.push(l);
        }
        let mut pool = 0;
        ok(
            "pool_open",
            (a.pool_open)(lease, cstr!("w"), -1, &mut pool, ptr::null_mut()),
            ptr::null_mut(),
        );
        for _ in 0..2 * CAP_POOLS + THREADS {
            let mut p = 0;
            ok(
                "pool_open",
                (a.pool_open)(lease, cstr!("w"), -1, &mut p, ptr::null_mut()),
                ptr::null_mut(),
            );
        }
        // Spillers' reservations count too: twice the list of reservations plus the spillers.
        for _ in 0..2 * (CAP_RESERVATIONS + CAP_SPILLERS) + THREADS {
            let mut r = 0;
            ok(
                "reservation_new",
                (a.reservation_new)(pool, cstr!("w"), &mut r, ptr::null_mut()),
                ptr::null_mut(),
            );
        }
        let spiller = TestSpiller::new(0);
        for _ in 0..2 * CAP_SPILLERS + THREADS {
            let vt = spiller.vtable();
            let mut h = 0;
            ok(
                "spiller_register",
                (a.spiller_register)(pool, cstr!("w"), &vt, &mut h, ptr::null_mut()),
                ptr::null_mut(),
            );
        }
        let state = TestState::new();
        for _ in 0..2 * CAP_STATES + THREADS {
            let mut h = 0;
            ok(
                "attach",
                (a.attach)(
                    lease,
                    state.raw(),
                    Some(state_drop),
                    &mut h,
                    ptr::null_mut(),
                ),
                ptr::null_mut(),
            );
        }
        for l in leases {
            release(l, &mut hist);
        }
        release(lease, &mut hist);
    }
    for m in managers {
        close_manager(m, &mut hist, &mut Rng::new(1));
    }
    thread::spawn(|| {
        let listener = TestListener::new(MIB);
        close_manager(
            create(cstr!("t"), MIB, &listener),
            &mut [0; 12],
            &mut Rng::new(2),
        );
    })
    .join()
    .unwrap();
    park_threads_at_once();
}

/// Parks `THREADS` threads and this one at the same time on `parking_lot` primitives (what the
/// provider's locks and close wait use), so its global table of parked threads has the size the
/// fuzz needs before the baseline.
fn park_threads_at_once() {
    let gate = parking_lot::Mutex::new(());
    let idle = parking_lot::Condvar::new();
    let held = gate.lock();
    thread::scope(|scope| {
        for _ in 0..THREADS {
            scope.spawn(|| drop(gate.lock()));
        }
        // This thread parks too (a timed wait on a condvar of its own), while the others are
        // parked on the mutex it holds.
        let mine = parking_lot::Mutex::new(());
        let mut guard = mine.lock();
        for _ in 0..5 {
            idle.wait_for(&mut guard, Duration::from_millis(20));
        }
        drop(held);
    });
}

#[test]
fn random_calls_from_threads_keep_every_contract() {
    let seed = std::env::var("NM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5EED)
        });
    let seconds: f64 = std::env::var("NM_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6.0);
    println!(
        "fuzz_abi: seed {seed} (replay with NM_FUZZ_SEED={seed}), {seconds} s, {THREADS} threads"
    );

    warm_up();
    let before = live();

    let shared = Shared::default();
    let total_ops = AtomicU64::new(0);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut hist: Histogram = [0; 12];
    thread::scope(|scope| {
        let mut seeder = seed;
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                let thread_seed = splitmix64(&mut seeder);
                let shared = &shared;
                let total_ops = &total_ops;
                scope.spawn(move || {
                    let mut w = Worker {
                        shared,
                        rng: Rng::new(thread_seed),
                        hist: [0; 12],
                        ops: 0,
                        own_leases: Vec::new(),
                    };
                    while Instant::now() < deadline {
                        for _ in 0..64 {
                            w.step();
                        }
                    }
                    w.release_own_leases();
                    total_ops.fetch_add(w.ops, Ordering::SeqCst);
                    w.hist
                })
            })
            .collect();
        for w in workers {
            let h = w.join().expect("a fuzz thread panicked");
            for (t, v) in hist.iter_mut().zip(h) {
                *t += v;
            }
        }
    });
    let elapsed = started.elapsed();

    // Everything still open: leases released, managers closed (the close frees the rest).
    let leases = std::mem::take(&mut *shared.leases.lock().unwrap());
    for l in leases {
        release(l, &mut hist);
    }
    let managers = std::mem::take(&mut *shared.managers.lock().unwrap());
    let mut rng = Rng::new(seed);
    for m in managers {
        close_manager(m, &mut hist, &mut rng);
    }
    // Handles of closed managers: stale now, whatever they were.
    for p in std::mem::take(&mut *shared.pools.lock().unwrap()) {
        close_pool(p, &mut hist);
    }
    for (p, ptr) in std::mem::take(&mut *shared.allocs.lock().unwrap()) {
        free_alloc(p, ptr, &mut hist);
    }
    assert_eq!(
        hist[NM_ERR_TIMEOUT as usize], 0,
        "a close timed out: a lease was held too long"
    );

    let listeners = std::mem::take(&mut *shared.listeners.lock().unwrap());
    let spillers = std::mem::take(&mut *shared.all_spillers.lock().unwrap());
    let states = std::mem::take(&mut *shared.all_states.lock().unwrap());
    let managers_made = listeners.len();
    for l in &listeners {
        assert_eq!(l.held(), 0, "a listener was not repaid exactly");
        assert_eq!(
            l.unreserve_errors.load(Ordering::SeqCst),
            0,
            "more given back than granted"
        );
        assert_eq!(
            l.drops.load(Ordering::SeqCst),
            1,
            "a listener's drop did not run once"
        );
    }
    for s in &spillers {
        assert_eq!(
            s.drops.load(Ordering::SeqCst),
            1,
            "a spiller's drop did not run once"
        );
    }
    for s in &states {
        assert_eq!(
            s.drops.load(Ordering::SeqCst),
            1,
            "a state's drop did not run once"
        );
    }
    let (spiller_count, state_count) = (spillers.len(), states.len());
    let spills: u64 = spillers
        .iter()
        .map(|s| s.spills.load(Ordering::SeqCst))
        .sum();
    drop((listeners, spillers, states, shared));

    let after = live();
    let ops = total_ops.load(Ordering::SeqCst);
    println!(
        "fuzz_abi: seed {seed}: {ops} operations in {:.1} s on {THREADS} threads; {managers_made} \
         managers, {spiller_count} spillers ({spills} spill calls), {state_count} attached \
         states; statuses by code {hist:?}; live (blocks, bytes) {before:?} -> {after:?}",
        elapsed.as_secs_f64()
    );
    assert!(hist[NM_OK as usize] > 0 && hist[NM_ERR_STALE_HANDLE as usize] > 0);
    // A leak leaves more blocks than the baseline. Fewer is not a leak: the process-wide count
    // includes memory of this process the fuzz does not own (the test harness's output capture,
    // a warm-up object whose last reference went away during the run), seen now and then as a
    // few blocks less under load (e.g. (432, 89680) -> (429, 89544)).
    assert!(
        after.0 <= before.0 && after.1 <= before.1,
        "live (blocks, bytes) above the baseline: {before:?} -> {after:?} (seed {seed})"
    );
}

//! Leaks counted, not estimated: this test binary installs a counting global allocator (live
//! blocks and live bytes of the whole process, wrapping `System`) and checks that N complete
//! manager lives through the public core API give back every block and every byte.
//!
//! One `#[test]` in its own binary: the count is per process, so no other test's threads may
//! allocate while it runs (the harness's own bookkeeping happens before and after the test body).
//!
//! A manager's life here: pools at depth 1 to 4 (by path and by `Pool::child`, with limits),
//! reservations grown, shrunk, resized, freed and dropped, an exclusive grow, forced charges,
//! raw and owned allocations, a refused grow (its out-of-memory error carries a usage report),
//! spillers that free reservations when asked, a spill and a reclaim, a usage report, and a close
//! that finds a leaked reservation and a leaked allocation; in exact and in quantum mode.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use nativemem_core::{
    CapacityListener, MemoryConfig, MemoryError, MemoryManager, Reservation, Spiller,
};

/// Counts live blocks and bytes of the process.
struct Counting;

static BLOCKS: AtomicI64 = AtomicI64::new(0);
static BYTES: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call forwards to `System` with the caller's arguments, so `System`'s guarantees
// hold; the counters are plain atomics and allocate nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's (valid, non-zero-size) layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            // Relaxed (all counters): read only after the work, from the same thread or after a
            // join, which orders them.
            BLOCKS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            BLOCKS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator (so by `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        BLOCKS.fetch_sub(1, Ordering::Relaxed);
        BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's arguments.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn live() -> (i64, i64) {
    (
        BLOCKS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    )
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// A spiller that frees the reservations it holds when asked.
struct Holder {
    held: Mutex<Vec<Reservation>>,
}

impl Spiller for Holder {
    fn spillable_bytes(&self) -> u64 {
        self.held
            .lock()
            .unwrap()
            .iter()
            .map(Reservation::size)
            .sum()
    }

    fn spill(&self, _target: u64) -> nativemem_core::Result<u64> {
        let taken = std::mem::take(&mut *self.held.lock().unwrap());
        Ok(taken.iter().map(Reservation::free).sum())
    }
}

/// One manager's whole life; returns the bytes the close reported as leaked.
fn manager_life(i: u64, quantum: bool) -> u64 {
    let listener = Arc::new(CapacityListener::new(64 * MIB));
    let mut config = MemoryConfig::default()
        .with_reservation_block(MIB)
        .with_task_limit(Some(48 * MIB));
    if quantum {
        config = config.with_reservation_quantum(64 * KIB);
    }
    let m = MemoryManager::new(format!("leaks-{i}"), config, listener.clone()).unwrap();

    // Pools at depth 1..4, by path and by child, one with a limit.
    let a = m.pool("scan").unwrap();
    let ab = m.pool("scan/arrow").unwrap();
    let abc = ab.child("batches", Some(16 * MIB)).unwrap();
    let abcd = m.pool("root/scan/arrow/batches/dict").unwrap();
    assert_eq!(abcd.path(), "root/scan/arrow/batches/dict");
    let join = m.pool("join/build/hash").unwrap();

    // Reservations.
    let r1 = a.reservation("Scan[0]");
    r1.try_grow(3 * MIB + 17).unwrap();
    r1.shrink(MIB).unwrap();
    r1.try_resize(5 * MIB).unwrap();
    let mut r2 = abcd.reservation("Dict[1]");
    r2.try_grow_exclusive(100 * KIB).unwrap();
    r2.shrink_exclusive(40 * KIB).unwrap();
    let r3 = abc.reservation("Batches[2]");
    r3.try_grow(2 * MIB).unwrap();
    let over = r3.force_grow(MIB).unwrap();
    assert!(over <= MIB);
    r3.force_shrink(MIB);
    assert_eq!(r3.free(), 2 * MIB);
    // Refused by the pool limit: an out-of-memory error with the usage report.
    let err = r3.try_grow(17 * MIB).unwrap_err();
    assert!(matches!(err, MemoryError::OutOfMemory(_)), "{err}");
    let _ = err.to_string();
    assert!(r1.shrink(u64::MAX).is_err(), "over-release is an error");

    // Allocations: raw (freed, and one leaked to the close) and owned.
    let p = abc.allocate(4096, 64).unwrap();
    let leaked: NonNull<u8> = abcd.allocate(1000, 8).unwrap();
    let _ = leaked;
    let owned = ab.allocate_owned(8192, 16).unwrap();
    assert_eq!(abc.free(p).unwrap(), 4096);

    // Spillers holding reservations; a spill and a reclaim free them.
    let held = join.reservation("Hash[3]");
    held.try_grow(4 * MIB).unwrap();
    let spiller = Arc::new(Holder {
        held: Mutex::new(vec![held]),
    });
    let registration = join.register_spiller("hash", spiller.clone());
    let held2 = abc.reservation("Sort[4]");
    held2.try_grow(MIB).unwrap();
    let spiller2 = Arc::new(Holder {
        held: Mutex::new(vec![held2]),
    });
    let registration2 = abc.register_spiller("sort", spiller2);
    assert_eq!(m.spiller_count(), 2);
    assert_eq!(m.spill(MIB).unwrap(), MIB);
    assert!(m.reclaim(8 * MIB).unwrap() > 0);
    drop(registration);
    let _ = m.usage_report().to_string();
    let _ = m.stats();

    drop(owned);
    drop(r2);
    // r1 stays open and `leaked` stays allocated: the close reclaims and reports both;
    // `registration2` stays registered: the close forgets it.
    let report = m.close().unwrap();
    let _ = report.to_string();
    drop(registration2);
    drop(r1);
    drop((a, ab, abc, abcd, join));
    drop(m);
    assert_eq!(listener.reserved(), 0, "listener repaid");
    report.total_bytes()
}

#[test]
fn manager_lives_through_the_core_api_free_every_block() {
    // Warm-up: lazy statics of std and of this crate (the membarrier registration), the
    // thread's first allocations.
    manager_life(0, false);
    manager_life(0, true);
    let before = live();
    let mut leaked_reported = 0;
    const LIVES: u64 = 200;
    for i in 0..LIVES {
        leaked_reported += manager_life(i, i % 2 == 1);
    }
    let after = live();
    // The leaks the closes found and freed: r1 (5 MiB) and the raw block (1000 bytes).
    assert_eq!(leaked_reported, LIVES * (5 * MIB + 1000));
    assert_eq!(
        after,
        before,
        "live (blocks, bytes) after {LIVES} manager lives: {} blocks and {} bytes not freed \
         ({} bytes per manager)",
        after.0 - before.0,
        after.1 - before.1,
        (after.1 - before.1) / LIVES as i64
    );
}

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

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use nativemem_core::{
    CapacityListener, MemoryConfig, MemoryError, MemoryManager, Reservation, Spiller,
};

#[global_allocator]
static ALLOCATOR: nativemem_testkit::CountingAllocator = nativemem_testkit::CountingAllocator;

/// Live (blocks, bytes) of the process.
fn live() -> (i64, i64) {
    nativemem_testkit::counts().live()
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
    // Both modes explicitly: exact accounting (quantum 0, opt-in) and a quantum.
    let mut config = MemoryConfig::default()
        .with_reservation_quantum(0)
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

/// An owned allocation that outlives its manager's close and every other handle keeps the
/// task heap (and so its memory) alive; dropping it destroys the heap.
fn owned_allocation_outlives_its_manager(heaps_before: usize) {
    let listener = Arc::new(CapacityListener::new(64 * MIB));
    let m = MemoryManager::new("owner", MemoryConfig::default(), listener.clone()).unwrap();
    let pool = m.pool("op").unwrap();
    let mut owned = pool.allocate_owned(3000, 64).unwrap();
    let _raw = pool.allocate(100, 8).unwrap();
    assert_eq!(nativemem_core::live_task_heaps(), heaps_before + 1);
    let report = m.close().unwrap();
    assert_eq!(report.total_bytes(), 3100);
    drop((pool, m));
    assert_eq!(listener.reserved(), 0);
    assert_eq!(
        nativemem_core::live_task_heaps(),
        heaps_before + 1,
        "kept by the owner"
    );
    owned.as_uninit_mut().fill(std::mem::MaybeUninit::new(9));
    drop(owned);
    assert_eq!(
        nativemem_core::live_task_heaps(),
        heaps_before,
        "destroyed with the owner"
    );
}

#[test]
fn manager_lives_through_the_core_api_free_every_block() {
    owned_allocation_outlives_its_manager(nativemem_core::live_task_heaps());
    // Warm-up: lazy statics of std and of this crate (the membarrier registration), the
    // thread's first allocations.
    manager_life(0, false);
    manager_life(0, true);
    let before = live();
    let heaps_before = nativemem_core::live_task_heaps();
    let mut leaked_reported = 0;
    const LIVES: u64 = 200;
    for i in 0..LIVES {
        leaked_reported += manager_life(i, i % 2 == 1);
    }
    let after = live();
    // Allocations live in each manager's mimalloc heap, outside the global allocator counted
    // here: every heap was destroyed (with the leaked block in it) when its manager dropped.
    assert_eq!(
        nativemem_core::live_task_heaps(),
        heaps_before,
        "task heaps not destroyed"
    );
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

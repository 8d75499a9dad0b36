//! Leaks counted, not estimated, through the client's RAII types: this binary installs a
//! counting global allocator (live blocks and bytes of the process: the client and the provider
//! linked into it) and checks that N manager lives give back every block and every byte.
//!
//! One `#[test]` in its own binary: the count is per process, so no other test may run beside it.
//!
//! A life: `Api::create_manager` with a Rust listener → `acquire` → pools at depth 1 to 4 (one
//! with a limit) → reservations grown, shrunk, resized, freed, force-charged, dropped, one left
//! to the close → a refused grow (its error with the usage report) → allocations dropped, one
//! left to the close → spillers holding reservations (spilled by `Lease::spill`, one unregistered
//! by drop, one left to the close) → attached state (detached, taken back, left to the close) →
//! stats, usage report, reclaim → every handle dropped → `OwnedManager::close`.
//!
//! Steady state: the provider's handle tables keep their slot storage once grown (capacity, not a
//! leak); the warm-up lives reach that size, so the count after them is exact. Should anything
//! stay after a batch of lives all the same, a second batch must not grow it: a leak grows with
//! every life, state initialized once does not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nativemem_client::sys;
use nativemem_client::{Api, BoxError, Code, Listener, ManagerOptions, Reservation, Spiller};

#[global_allocator]
static ALLOCATOR: nativemem_testkit::CountingAllocator = nativemem_testkit::CountingAllocator;

/// Live (blocks, bytes) of the process.
fn live() -> (i64, i64) {
    nativemem_testkit::counts().live()
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn api() -> Api {
    let table = nativemem_provider::api(sys::NM_ABI_VERSION);
    // SAFETY: the provider's table is a static of the linked library.
    unsafe { Api::from_ptr(table) }.expect("the provider's table passes the check")
}

/// A listener with a capacity; refuses to take back more than it holds.
struct TestListener {
    capacity: u64,
    held: AtomicU64,
}

impl Listener for TestListener {
    fn reserve(&self, bytes: u64) -> Result<u64, BoxError> {
        let mut granted = 0;
        let _ = self
            .held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                granted = bytes.min(self.capacity - held);
                Some(held + granted)
            });
        Ok(granted)
    }

    fn unreserve(&self, bytes: u64) -> Result<(), BoxError> {
        self.held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| h.checked_sub(bytes))
            .map(|_| ())
            .map_err(|held| format!("{bytes} given back but {held} held").into())
    }
}

/// A spiller that frees the reservations it holds.
struct Holder {
    held: Mutex<Vec<Reservation>>,
}

impl Spiller for Holder {
    fn spillable_bytes(&self) -> u64 {
        let held = self.held.lock().unwrap();
        held.iter().map(|r| r.size().unwrap_or(0)).sum()
    }

    fn spill(&self, _target: u64) -> Result<u64, BoxError> {
        let held = self.held.lock().unwrap();
        let mut freed = 0;
        for r in held.iter() {
            freed += r.free()?;
        }
        Ok(freed)
    }
}

/// One manager's life (see the module docs); returns the bytes its close reported as leaked.
fn life() -> u64 {
    let listener = Arc::new(TestListener {
        capacity: 32 * MIB,
        held: AtomicU64::new(0),
    });
    let mm = api()
        .create_manager(
            "leaks",
            ManagerOptions {
                reservation_block: Some(MIB),
                task_limit: None,
                ..ManagerOptions::default()
            },
            Some(listener.clone() as Arc<dyn Listener>),
        )
        .unwrap();
    let lease = mm.acquire().unwrap();
    let scan = lease.pool("scan", None).unwrap();
    let arrow = lease.pool("scan/arrow", None).unwrap();
    let hash = lease.pool("join/build/hash", None).unwrap();
    let probe = lease.pool("join/build/hash/probe", Some(4 * MIB)).unwrap();
    assert_eq!(probe.stats().unwrap().limit, Some(4 * MIB));

    // Reservations.
    let r1 = scan.reservation("Scan[0]").unwrap();
    r1.try_grow(3 * MIB + 17).unwrap();
    r1.shrink(MIB).unwrap();
    r1.try_resize(2 * MIB).unwrap();
    assert_eq!(r1.free().unwrap(), 2 * MIB);
    r1.try_grow(5 * MIB).unwrap();
    let r2 = probe.reservation("Probe[1]").unwrap();
    r2.force_grow(MIB).unwrap();
    assert_eq!(r2.force_shrink(MIB).unwrap(), MIB);
    let err = r2.try_grow(5 * MIB).unwrap_err();
    assert_eq!(err.code, Code::OutOfMemory, "{err}");
    assert!(err.to_string().contains("probe"));
    drop(r2);

    // Allocations: one dropped, one left to the close.
    let mut block = arrow.allocate(4096, 64).unwrap();
    block.fill(7);
    drop(block);
    let kept = probe.allocate(1000, 8).unwrap();

    // Spillers holding reservations.
    let holder = |bytes| {
        let r = hash.reservation("Hash").unwrap();
        r.try_grow(bytes).unwrap();
        Arc::new(Holder {
            held: Mutex::new(vec![r]),
        })
    };
    let s1 = hash.register_spiller("a", holder(MIB)).unwrap();
    let s2 = hash.register_spiller("b", holder(2 * MIB)).unwrap();
    let s3 = hash.register_spiller("c", holder(MIB)).unwrap();
    assert!(lease.spill(MIB).unwrap() >= MIB);
    drop(s2);

    // Attached state.
    let a1 = lease.attach(vec![1u8; 100]).unwrap();
    let a2 = lease.attach(String::from("state")).unwrap();
    let _a3 = lease.attach(Arc::new(5u64)).unwrap();
    a1.detach().unwrap();
    assert_eq!(a2.take().unwrap(), "state");

    let stats = lease.stats().unwrap();
    assert!(stats.used >= 5 * MIB);
    assert!(lease
        .usage_report()
        .unwrap()
        .contains("root/join/build/hash/probe"));
    lease.reclaim(64 * MIB).unwrap();

    // Leave r1 (5 MiB) and `kept` to the close; `s1` and `s3` too (the close unregisters them).
    drop((scan, arrow, hash, probe));
    lease.release().unwrap();
    let report = mm.close().unwrap();
    assert!(report.report.contains("leaked"), "{}", report.report);
    // After close the handles are stale: the drops ignore it.
    drop((r1, kept, s1, s3));
    assert_eq!(
        listener.held.load(Ordering::SeqCst),
        0,
        "the listener got every byte back"
    );
    report.leaked_bytes
}

#[test]
fn manager_lives_through_the_client_free_every_block() {
    for _ in 0..3 {
        life();
    }
    const LIVES: u64 = 200;
    let batch = || {
        let mut leaked = 0;
        for _ in 0..LIVES {
            leaked += life();
        }
        // What each close found and freed: r1 (5 MiB) and the kept allocation (1000 bytes).
        assert_eq!(leaked, LIVES * (5 * MIB + 1000));
        live()
    };
    let before = live();
    let after = batch();
    if after == before {
        return;
    }
    // Something stayed. A leak grows with every life; process state initialized once (seen on
    // a loaded machine: a few blocks the first time a slow path runs) does not. So a second
    // batch must leave the count exactly where the first one did.
    let again = batch();
    assert_eq!(
        again,
        after,
        "live (blocks, bytes) after {LIVES} more manager lives through the client: {} blocks and \
         {} bytes not freed ({} bytes per manager); the first {LIVES} left {} blocks, {} bytes",
        again.0 - after.0,
        again.1 - after.1,
        (again.1 - after.1) / LIVES as i64,
        after.0 - before.0,
        after.1 - before.1
    );
    println!(
        "leaks: the first {LIVES} lives left {} blocks ({} bytes) that {LIVES} more did not grow: \
         state initialized once, not a leak",
        after.0 - before.0,
        after.1 - before.1
    );
}

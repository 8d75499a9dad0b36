//! The client over the real provider: `nativemem-provider`'s table (`nativemem_provider::api`),
//! managers made with `Api::create_manager` and a capacity-limited Rust listener. One scenario
//! per test; totals asserted after every step.

use std::mem::size_of;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use nativemem_client::sys::{self, NmApi};
use nativemem_client::{
    Allocation, Api, BoxError, Code, Listener, ManagerOptions, OwnedManager, Reservation, Spiller,
    DEFAULT_RESERVATION_QUANTUM,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

fn api() -> Api {
    let table = nativemem_provider::api(sys::NM_ABI_VERSION);
    // SAFETY: the provider's table is a static of the linked library.
    unsafe { Api::from_ptr(table) }.expect("the provider's table passes the check")
}

/// A listener with a fixed capacity (Spark's share of the task, in bytes): grants what is left,
/// refuses to take back more than it gave. Counters use SeqCst: tests read them across threads.
struct TestListener {
    capacity: u64,
    held: AtomicU64,
    reserve_calls: AtomicU64,
    fail: AtomicBool,
}

impl TestListener {
    fn new(capacity: u64) -> Arc<TestListener> {
        Arc::new(TestListener {
            capacity,
            held: AtomicU64::new(0),
            reserve_calls: AtomicU64::new(0),
            fail: AtomicBool::new(false),
        })
    }

    fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }
}

impl Listener for TestListener {
    fn reserve(&self, bytes: u64) -> Result<u64, BoxError> {
        self.reserve_calls.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err("test listener: Spark refused".into());
        }
        let mut granted = 0;
        self.held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                granted = bytes.min(self.capacity - held);
                Some(held + granted)
            })
            .unwrap();
        Ok(granted)
    }

    fn unreserve(&self, bytes: u64) -> Result<(), BoxError> {
        self.held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                held.checked_sub(bytes)
            })
            .map(|_| ())
            .map_err(|held| format!("test listener: {bytes} given back but {held} held").into())
    }
}

/// Exact accounting (quantum 0, opt-in: the default is the 1 MiB quantum). The scenarios pin
/// pools' and the task's used to the byte after every step, which is their point; the quantum
/// through the client has its own test (`the_default_quantum_charges_whole_quanta_and_reports_exactly`).
fn exact() -> ManagerOptions {
    ManagerOptions {
        reservation_quantum: 0,
        ..ManagerOptions::default()
    }
}

fn manager(name: &str, block: u64, capacity: u64) -> (OwnedManager, Arc<TestListener>) {
    manager_with(
        name,
        ManagerOptions {
            reservation_block: Some(block),
            task_limit: None,
            ..exact()
        },
        capacity,
    )
}

fn manager_with(
    name: &str,
    options: ManagerOptions,
    capacity: u64,
) -> (OwnedManager, Arc<TestListener>) {
    let listener = TestListener::new(capacity);
    let mm = api()
        .create_manager(name, options, Some(listener.clone() as Arc<dyn Listener>))
        .expect("create_manager");
    (mm, listener)
}

/// Closes, asserts no leak and that the listener got every byte back.
fn close_clean(mm: OwnedManager, listener: &TestListener) {
    let report = mm.close().expect("close");
    assert_eq!(report.leaked_bytes, 0, "unexpected leak: {}", report.report);
    assert_eq!(listener.held(), 0, "listener not paid back");
}

// ---- reservations ----------------------------------------------------------------------------

#[test]
fn reservation_grow_shrink_resize_free_and_drop_keep_exact_totals() {
    let (mm, listener) = manager("res", MIB, 64 * MIB);
    let lease = mm.acquire().unwrap();
    let pool = lease.pool("engine/hash", None).unwrap();
    let root = lease.pool("", None).unwrap();
    let r = pool.reservation("HashBuild[3]").unwrap();
    assert_eq!(r.consumer(), "HashBuild[3]");
    assert_eq!(r.size().unwrap(), 0);

    r.try_grow(1000).unwrap();
    assert_eq!(r.size().unwrap(), 1000);
    let p = pool.stats().unwrap();
    assert_eq!((p.used, p.peak, p.limit), (1000, 1000, None));
    assert_eq!(root.stats().unwrap().used, 1000);
    let m = lease.stats().unwrap();
    assert_eq!((m.used, m.peak, m.reserved), (1000, 1000, MIB));
    assert_eq!(listener.held(), MIB);

    r.shrink(400).unwrap();
    assert_eq!(r.size().unwrap(), 600);
    assert_eq!(pool.stats().unwrap().used, 600);

    let e = r.shrink(601).unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
    assert_eq!(r.size().unwrap(), 600);
    assert_eq!(pool.stats().unwrap().used, 600);
    assert_eq!(lease.stats().unwrap().used, 600);

    r.try_resize(5000).unwrap();
    assert_eq!(r.size().unwrap(), 5000);
    assert_eq!(pool.stats().unwrap().used, 5000);
    assert_eq!(pool.stats().unwrap().peak, 5000);

    r.try_resize(100).unwrap();
    assert_eq!(r.size().unwrap(), 100);
    assert_eq!(pool.stats().unwrap().used, 100);

    assert_eq!(r.free().unwrap(), 100);
    assert_eq!(r.size().unwrap(), 0);
    assert_eq!(pool.stats().unwrap().used, 0);

    r.try_grow(300).unwrap(); // still usable after free
    assert_eq!(lease.stats().unwrap().used, 300);
    // The consumer's peak (an operator's "peak memory"): the most it held, through the ABI.
    assert_eq!(r.peak().unwrap(), 5000);
    let e = r.try_grow(64 * MIB).unwrap_err(); // refused: the peak does not count it
    assert_eq!(e.code, Code::OutOfMemory, "{e}");
    assert_eq!(r.peak().unwrap(), 5000);
    let other = pool.reservation("Probe").unwrap();
    other.try_grow(10).unwrap();
    assert_eq!((other.peak().unwrap(), r.peak().unwrap()), (10, 5000));
    drop(other);

    drop(r);
    // What spills wrote: the engine's to say (Spark's Spill (Disk)); in the report.
    pool.note_spill_written(3 * MIB).unwrap();
    root.note_spill_written(MIB).unwrap(); // any pool of the task counts for its manager
    let report = lease.usage_report().unwrap();
    assert!(report.contains("Spill files written: 4.0 MiB"), "{report}");
    let p = pool.stats().unwrap();
    assert_eq!((p.used, p.peak), (0, 5000));
    let m = lease.stats().unwrap();
    assert_eq!((m.used, m.peak), (0, 5000));
    assert_eq!(m.reserved, listener.held());

    let raw = lease.pool("engine/other", None).unwrap();
    let r2 = raw.reservation("Closer").unwrap();
    r2.try_grow(700).unwrap();
    assert_eq!(lease.stats().unwrap().used, 700);
    r2.close().unwrap();
    assert_eq!(lease.stats().unwrap().used, 0);

    drop((pool, raw, root));
    lease.release().unwrap();
    close_clean(mm, &listener);
}

#[test]
fn forced_grow_and_shrink_never_ask_spark_and_the_next_grow_pays_the_overcommit() {
    let (mm, listener) = manager("forced", MIB, 8 * MIB);
    let lease = mm.acquire().unwrap();
    let pool = lease.pool("engine/untracked", None).unwrap();
    let t = pool.reservation("tracked").unwrap();

    // Nothing reserved yet: all of it is over-commit, and Spark was not asked.
    assert_eq!(t.force_grow(3 * MIB / 2).unwrap(), 3 * MIB / 2);
    assert_eq!(listener.reserve_calls.load(Ordering::SeqCst), 0);
    let m = lease.stats().unwrap();
    assert_eq!((m.used, m.reserved), (3 * MIB / 2, 0));
    let report = lease.usage_report().unwrap();
    assert!(report.contains("Over-committed: 1.5 MiB now"), "{report}");

    // The next fallible grow reserves its own bytes and the over-commit, in whole blocks.
    let r = pool.reservation("op").unwrap();
    r.try_grow(KIB).unwrap();
    assert_eq!(listener.reserve_calls.load(Ordering::SeqCst), 1);
    let m = lease.stats().unwrap();
    assert_eq!((m.used, m.reserved), (3 * MIB / 2 + KIB, 2 * MIB));
    assert!(!lease.usage_report().unwrap().contains("MiB now"));

    // A shrink without upcall saturates at the size; the bytes stay reserved as cushion.
    assert_eq!(t.force_shrink(2 * MIB).unwrap(), 3 * MIB / 2);
    assert_eq!(t.size().unwrap(), 0);
    let m = lease.stats().unwrap();
    assert_eq!((m.used, m.reserved), (KIB, 2 * MIB));

    // Over-commit Spark cannot cover makes the next grow fail; nothing changes.
    t.force_grow(9 * MIB).unwrap();
    let e = r.try_grow(KIB).unwrap_err();
    assert_eq!(e.code, Code::OutOfMemory, "{e}");
    assert_eq!(r.size().unwrap(), KIB);
    assert_eq!(t.force_shrink(9 * MIB).unwrap(), 9 * MIB);

    // Bad handles are codes, never crashes.
    let forged = api().raw();
    let mut out = 7u64;
    // SAFETY: a forged handle is refused by code; `out` is writable and err may be null.
    let status = unsafe { (forged.reservation_force_grow)(12345, 1, &mut out, ptr::null_mut()) };
    assert_ne!(status, sys::NM_OK);
    assert_eq!(out, 7);
    // SAFETY: as above.
    let status =
        unsafe { (forged.reservation_force_shrink)(0, 1, ptr::null_mut(), ptr::null_mut()) };
    assert_eq!(status, sys::NM_ERR_INVALID_HANDLE);

    drop((r, t, pool));
    lease.release().unwrap();
    close_clean(mm, &listener);
}

#[test]
fn pool_limit_is_reported_enforced_and_fixed_at_creation() {
    let (mm, listener) = manager("limits", MIB, 64 * MIB);
    let lease = mm.acquire().unwrap();
    let sort = lease.pool("engine/sort", Some(MIB)).unwrap();
    assert_eq!(sort.path(), "engine/sort");
    assert_eq!(sort.stats().unwrap().limit, Some(MIB));

    let r = sort.reservation("Sort[0]").unwrap();
    r.try_grow(MIB - 10).unwrap();
    let e = r.try_grow(11).unwrap_err();
    assert!(e.is_out_of_memory(), "{e}");
    assert_eq!(r.size().unwrap(), MIB - 10);
    assert_eq!(sort.stats().unwrap().used, MIB - 10);

    // The same pool, opened again without a limit, is the same node.
    let again = lease.pool("engine/sort", None).unwrap();
    assert_eq!(again.stats().unwrap().used, MIB - 10);
    let same = lease.pool("engine/sort", Some(MIB)).unwrap(); // the same limit is no change
    assert_eq!(same.stats().unwrap().used, MIB - 10);
    let e = lease.pool("engine/sort", Some(2 * MIB)).unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
    let e = lease.pool("engine/\0bad", None).unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
    let e = lease.pool("engine/huge", Some(u64::MAX)).unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");

    let report = lease.usage_report().unwrap();
    assert!(report.contains("sort"), "{report}");

    drop((r, sort, again, same));
    assert_eq!(lease.stats().unwrap().used, 0);
    drop(lease);
    close_clean(mm, &listener);
}

// ---- allocations -----------------------------------------------------------------------------

#[test]
fn allocation_is_charged_aligned_usable_and_freed() {
    let (mm, listener) = manager("alloc", MIB, 64 * MIB);
    let lease = mm.acquire().unwrap();
    let pool = lease.pool("engine/buffers", None).unwrap();

    let mut a = pool.allocate(1000, 64).unwrap();
    assert_eq!(a.len(), 1000);
    assert!(!a.is_empty());
    assert_eq!(a.as_ptr().as_ptr() as usize % 64, 0);
    assert_eq!(pool.stats().unwrap().used, 1000);
    assert_eq!(lease.stats().unwrap().used, 1000);

    let b = pool.allocate(3000, 4096).unwrap();
    assert_eq!(b.as_ptr().as_ptr() as usize % 4096, 0);
    let c = pool.allocate(24, 0).unwrap(); // 0: the default, 16
    assert_eq!(c.as_ptr().as_ptr() as usize % 16, 0);
    assert_eq!(pool.stats().unwrap().used, 4024);

    let bytes = a.fill(0xAB);
    bytes[999] = 7;
    assert!(a.as_uninit()[..999]
        .iter()
        .all(|x| unsafe { x.assume_init() } == 0xAB));
    // SAFETY: written just above.
    assert_eq!(unsafe { a.as_uninit()[999].assume_init() }, 7);
    a.as_uninit_mut()[0].write(1);

    let e = pool.allocate(0, 8).unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
    let e = pool.allocate(10, 3).unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
    assert_eq!(pool.stats().unwrap().used, 4024);

    drop(a);
    assert_eq!(pool.stats().unwrap().used, 3024);
    // The pool handle may go before its allocations: they keep it open.
    drop(pool);
    drop(b);
    drop(c);
    assert_eq!(lease.stats().unwrap().used, 0);
    assert_eq!(lease.stats().unwrap().peak, 4024);
    drop(lease);
    close_clean(mm, &listener);
}

// ---- out of memory ---------------------------------------------------------------------------

#[test]
fn out_of_memory_under_task_limit_names_the_consumer_and_changes_nothing() {
    let (mm, listener) = manager_with(
        "oom",
        ManagerOptions {
            reservation_block: Some(256 * KIB),
            task_limit: Some(MIB),
            ..exact()
        },
        64 * MIB,
    );
    let lease = mm.acquire().unwrap();
    let pool = lease.pool("engine/hash", None).unwrap();
    let r = pool.reservation("HashBuild[3]").unwrap();
    r.try_grow(768 * KIB).unwrap();
    let before = lease.stats().unwrap();
    let held = listener.held();
    assert_eq!(before.used, 768 * KIB);

    let e = r.try_grow(512 * KIB).unwrap_err();
    assert_eq!(e.code, Code::OutOfMemory);
    assert!(e.is_out_of_memory());
    assert!(e.message.contains("HashBuild[3]"), "{}", e.message);
    assert!(e.to_string().starts_with("NM_ERR_OUT_OF_MEMORY: "), "{e}");
    assert_eq!(r.size().unwrap(), 768 * KIB);
    assert_eq!(pool.stats().unwrap().used, 768 * KIB);
    let after = lease.stats().unwrap();
    assert_eq!(
        (after.used, after.peak, after.reserved),
        (before.used, before.peak, before.reserved)
    );
    assert_eq!(listener.held(), held);

    let e = pool.allocate(512 * 1024, 8).unwrap_err();
    assert_eq!(e.code, Code::OutOfMemory, "{e}");
    assert_eq!(lease.stats().unwrap().used, 768 * KIB);

    // What is left still fits.
    r.try_grow(256 * KIB).unwrap();
    assert_eq!(lease.stats().unwrap().used, MIB);

    drop((r, pool));
    drop(lease);
    close_clean(mm, &listener);
}

#[test]
fn listener_failure_surfaces_as_listener_error_and_changes_nothing() {
    let (mm, listener) = manager("listener-fails", MIB, 64 * MIB);
    let lease = mm.acquire().unwrap();
    let pool = lease.pool("engine", None).unwrap();
    let r = pool.reservation("Scan").unwrap();
    r.try_grow(100).unwrap();
    listener.fail.store(true, Ordering::SeqCst);
    let e = r.try_grow(2 * MIB).unwrap_err();
    assert_eq!(e.code, Code::Listener, "{e}");
    assert_eq!(r.size().unwrap(), 100);
    assert_eq!(lease.stats().unwrap().used, 100);
    assert_eq!(listener.held(), MIB);
    listener.fail.store(false, Ordering::SeqCst);
    r.try_grow(2 * MIB).unwrap();
    assert_eq!(lease.stats().unwrap().used, 2 * MIB + 100);
    drop((r, pool, lease));
    close_clean(mm, &listener);
}

// ---- spill -----------------------------------------------------------------------------------

/// Holds 1 MiB allocations; a spill drops them until the target is covered.
struct AllocSpiller {
    chunks: Mutex<Vec<Allocation>>,
    calls: AtomicU64,
}

impl Spiller for AllocSpiller {
    fn spillable_bytes(&self) -> u64 {
        self.chunks
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.len() as u64)
            .sum()
    }

    fn spill(&self, target: u64) -> Result<u64, BoxError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut chunks = self.chunks.lock().unwrap();
        let mut freed = 0;
        while freed < target {
            let Some(chunk) = chunks.pop() else { break };
            freed += chunk.len() as u64;
            drop(chunk); // frees through the table, from inside the spill
        }
        Ok(freed)
    }
}

#[test]
fn spiller_is_asked_when_a_grow_does_not_fit_and_the_grow_then_succeeds() {
    let (mm, listener) = manager("spill", MIB, 8 * MIB);
    let lease = mm.acquire().unwrap();
    let sort = lease.pool("engine/sort", None).unwrap();
    let chunks = (0..6)
        .map(|_| sort.allocate(MIB as usize, 64).unwrap())
        .collect::<Vec<_>>();
    let spiller = Arc::new(AllocSpiller {
        chunks: Mutex::new(chunks),
        calls: AtomicU64::new(0),
    });
    let registration = sort.register_spiller("Sort[0]", spiller.clone()).unwrap();
    assert_eq!(registration.name(), "Sort[0]");
    assert_eq!(lease.stats().unwrap().used, 6 * MIB);
    assert_eq!(listener.held(), 6 * MIB);

    let hash = lease.pool("engine/hash", None).unwrap();
    let r = hash.reservation("HashBuild[1]").unwrap();
    r.try_grow(4 * MIB).unwrap(); // 10 MiB > 8 MiB of Spark: 2 MiB must be spilled

    assert_eq!(spiller.calls.load(Ordering::SeqCst), 1);
    assert_eq!(spiller.spillable_bytes(), 4 * MIB);
    assert_eq!(sort.stats().unwrap().used, 4 * MIB);
    assert_eq!(hash.stats().unwrap().used, 4 * MIB);
    let m = lease.stats().unwrap();
    assert_eq!(m.used, 8 * MIB);
    assert_eq!(m.spill_count, 1);
    assert_eq!(m.spilled_bytes, 2 * MIB);
    assert_eq!(listener.held(), 8 * MIB);

    registration.unregister().unwrap();
    drop(r);
    spiller.chunks.lock().unwrap().clear();
    assert_eq!(lease.stats().unwrap().used, 0);
    drop((sort, hash, lease));
    close_clean(mm, &listener);
}

/// What Spark does through the task's MemoryConsumer, done by an embedder: `spill` frees memory
/// of the spillers and keeps it reserved; `reclaim` hands back the cushion, then spills for the
/// rest and hands that back too, returning exactly what the listener got back.
#[test]
fn spill_and_reclaim_take_memory_back_like_spark() {
    let (mm, listener) = manager("take-back", MIB, 64 * MIB);
    let lease = mm.acquire().unwrap();
    let sort = lease.pool("engine/sort", None).unwrap();
    let chunks = (0..6)
        .map(|_| sort.allocate(MIB as usize, 64).unwrap())
        .collect::<Vec<_>>();
    let spiller = Arc::new(AllocSpiller {
        chunks: Mutex::new(chunks),
        calls: AtomicU64::new(0),
    });
    let _registration = sort.register_spiller("Sort[0]", spiller.clone()).unwrap();
    assert_eq!(listener.held(), 6 * MIB);

    // spill: 2 MiB freed, still reserved (cushion).
    assert_eq!(lease.spill(2 * MIB).unwrap(), 2 * MIB);
    assert_eq!(sort.stats().unwrap().used, 4 * MIB);
    assert_eq!(lease.stats().unwrap().reserved, 6 * MIB);
    assert_eq!(listener.held(), 6 * MIB);

    // reclaim: the 2 MiB cushion first, then 1 MiB spilled, all handed back.
    assert_eq!(lease.reclaim(3 * MIB).unwrap(), 3 * MIB);
    assert_eq!(sort.stats().unwrap().used, 3 * MIB);
    assert_eq!(listener.held(), 3 * MIB);
    assert_eq!(lease.stats().unwrap().reserved, 3 * MIB);
    let m = lease.stats().unwrap();
    assert_eq!((m.spill_count, m.spilled_bytes), (2, 3 * MIB));

    // Nothing left to give: 0, not an error.
    spiller.chunks.lock().unwrap().clear();
    assert_eq!(lease.reclaim(0).unwrap(), 0);
    drop((sort, lease));
    close_clean(mm, &listener);
}

/// `Lease::cover_overcommit`: a forced grow past the task limit is reserved from the listener
/// at once (whatever the limit); with nothing over-committed it grants 0.
#[test]
fn cover_overcommit_reserves_a_forced_grow_past_the_limit_at_once() {
    let (mm, listener) = manager_with(
        "cover",
        ManagerOptions {
            reservation_block: Some(MIB),
            task_limit: Some(4 * MIB),
            ..exact()
        },
        64 * MIB,
    );
    let lease = mm.acquire().unwrap();
    assert_eq!(lease.cover_overcommit().unwrap(), 0);
    let r = lease
        .pool("engine", None)
        .unwrap()
        .reservation("op")
        .unwrap();
    assert_eq!(r.force_grow(10 * MIB).unwrap(), 10 * MIB);
    assert!(listener.held() < 10 * MIB);
    let granted = lease.cover_overcommit().unwrap();
    assert!(granted > 0);
    let m = lease.stats().unwrap();
    assert_eq!(m.used, 10 * MIB);
    assert!(m.reserved >= m.used, "{m:?}");
    assert_eq!(listener.held(), m.reserved);
    assert_eq!(lease.cover_overcommit().unwrap(), 0);
    drop(r);
    drop(lease);
    close_clean(mm, &listener);
}

/// Holds one reservation; a spill re-enters the table through the client: reads stats and the
/// usage report, then shrinks its own reservation.
struct ReentrantSpiller {
    pool: nativemem_client::Pool,
    reservation: Reservation,
    calls: AtomicU64,
    seen_used: AtomicU64,
}

impl Spiller for ReentrantSpiller {
    fn spillable_bytes(&self) -> u64 {
        self.reservation.size().unwrap_or(0)
    }

    fn spill(&self, target: u64) -> Result<u64, BoxError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.seen_used
            .store(self.pool.stats()?.used, Ordering::SeqCst);
        let size = self.reservation.size()?;
        let freed = target.min(size);
        self.reservation.shrink(freed)?;
        Ok(freed)
    }
}

#[test]
fn spiller_reentering_through_the_client_shrinks_its_own_reservation() {
    let (mm, listener) = manager("reenter", MIB, 8 * MIB);
    let lease = mm.acquire().unwrap();
    let agg = lease.pool("engine/agg", None).unwrap();
    let reservation = agg.reservation("HashAgg[2]").unwrap();
    reservation.try_grow(6 * MIB).unwrap();
    let spiller = Arc::new(ReentrantSpiller {
        pool: lease.pool("engine/agg", None).unwrap(),
        reservation,
        calls: AtomicU64::new(0),
        seen_used: AtomicU64::new(0),
    });
    let _registration = agg.register_spiller("HashAgg[2]", spiller.clone()).unwrap();

    let other = lease.pool("engine/join", None).unwrap();
    let r = other.reservation("Join[0]").unwrap();
    r.try_grow(3 * MIB).unwrap(); // 9 MiB > 8 MiB: 1 MiB spilled by shrinking

    assert_eq!(spiller.calls.load(Ordering::SeqCst), 1);
    assert_eq!(spiller.seen_used.load(Ordering::SeqCst), 6 * MIB);
    assert_eq!(spiller.reservation.size().unwrap(), 5 * MIB);
    assert_eq!(agg.stats().unwrap().used, 5 * MIB);
    assert_eq!(other.stats().unwrap().used, 3 * MIB);
    assert_eq!(lease.stats().unwrap().used, 8 * MIB);
    assert_eq!(listener.held(), 8 * MIB);

    drop(r);
    spiller.reservation.free().unwrap();
    assert_eq!(lease.stats().unwrap().used, 0);
    drop((agg, other, lease));
    close_clean(mm, &listener);
}

/// Frees the 1 MiB it holds but claims it freed 64 MiB.
struct BoastingSpiller {
    reservation: Reservation,
}

impl Spiller for BoastingSpiller {
    fn spillable_bytes(&self) -> u64 {
        self.reservation.size().unwrap_or(0)
    }

    fn spill(&self, _target: u64) -> Result<u64, BoxError> {
        self.reservation.free()?;
        Ok(64 * MIB)
    }
}

#[test]
fn spiller_returning_more_than_it_held_does_not_corrupt_accounting() {
    let (mm, listener) = manager("boast", MIB, 4 * MIB);
    let lease = mm.acquire().unwrap();
    let pool = lease.pool("engine/window", None).unwrap();
    let held = pool.reservation("Window[0]").unwrap();
    held.try_grow(MIB).unwrap();
    let spiller = Arc::new(BoastingSpiller { reservation: held });
    let _registration = pool.register_spiller("Window[0]", spiller.clone()).unwrap();

    let r = pool.reservation("Sort[1]").unwrap();
    r.try_grow(3 * MIB).unwrap();
    assert_eq!(lease.stats().unwrap().used, 4 * MIB);

    // Needs 3 MiB more than Spark has; the spiller frees its 1 MiB and claims 64 MiB: only the
    // real 1 MiB counts, so the grow still does not fit.
    let e = r.try_grow(3 * MIB).unwrap_err();
    assert_eq!(e.code, Code::OutOfMemory, "{e}");
    assert_eq!(spiller.reservation.size().unwrap(), 0);
    assert_eq!(r.size().unwrap(), 3 * MIB);
    assert_eq!(pool.stats().unwrap().used, 3 * MIB);
    assert_eq!(lease.stats().unwrap().used, 3 * MIB);

    // What the spill really freed is usable, no more.
    r.try_grow(MIB).unwrap();
    assert_eq!(lease.stats().unwrap().used, 4 * MIB);
    let e = r.try_grow(1).unwrap_err();
    assert_eq!(e.code, Code::OutOfMemory, "{e}");
    assert_eq!(listener.held(), 4 * MIB);

    drop(r);
    assert_eq!(lease.stats().unwrap().used, 0);
    drop((pool, lease));
    close_clean(mm, &listener);
}

struct PanickingSpiller {
    in_spillable: bool,
}

impl Spiller for PanickingSpiller {
    fn spillable_bytes(&self) -> u64 {
        if self.in_spillable {
            panic!("test: spillable_bytes panics");
        }
        MIB
    }

    fn spill(&self, _target: u64) -> Result<u64, BoxError> {
        panic!("test: spill panics");
    }
}

#[test]
fn panicking_spiller_fails_the_grow_cleanly() {
    let (mm, listener) = manager("panic", MIB, 2 * MIB);
    let lease = mm.acquire().unwrap();
    let pool = lease.pool("engine", None).unwrap();
    let r = pool.reservation("Probe").unwrap();
    r.try_grow(MIB).unwrap();
    let _registration = pool
        .register_spiller(
            "Bad",
            Arc::new(PanickingSpiller {
                in_spillable: false,
            }),
        )
        .unwrap();

    let e = r.try_grow(2 * MIB).unwrap_err();
    assert_eq!(e.code, Code::Spill, "{e}");
    assert_eq!(r.size().unwrap(), MIB);
    assert_eq!(lease.stats().unwrap().used, MIB);
    assert_eq!(listener.held(), 2 * MIB);

    // The manager keeps working.
    r.try_grow(MIB).unwrap();
    assert_eq!(lease.stats().unwrap().used, 2 * MIB);
    drop(r);
    drop((pool, lease));
    close_clean(mm, &listener);
}

#[test]
fn spillable_bytes_panicking_counts_as_zero_so_the_grow_is_out_of_memory() {
    let (mm, listener) = manager("panic-size", MIB, 2 * MIB);
    let lease = mm.acquire().unwrap();
    let pool = lease.pool("engine", None).unwrap();
    let r = pool.reservation("Probe").unwrap();
    r.try_grow(MIB).unwrap();
    let _registration = pool
        .register_spiller("Bad", Arc::new(PanickingSpiller { in_spillable: true }))
        .unwrap();

    let e = r.try_grow(2 * MIB).unwrap_err();
    assert_eq!(e.code, Code::OutOfMemory, "{e}");
    assert_eq!(r.size().unwrap(), MIB);
    assert_eq!(lease.stats().unwrap().used, MIB);
    assert_eq!(lease.stats().unwrap().spill_count, 0);
    drop((r, pool, lease));
    close_clean(mm, &listener);
}

#[test]
fn dropped_registration_is_no_longer_asked_and_its_spiller_is_dropped() {
    let (mm, listener) = manager("unregister", MIB, 2 * MIB);
    let lease = mm.acquire().unwrap();
    let pool = lease.pool("engine", None).unwrap();
    let spiller = Arc::new(AllocSpiller {
        chunks: Mutex::new(vec![pool.allocate(MIB as usize, 8).unwrap()]),
        calls: AtomicU64::new(0),
    });
    let registration = pool.register_spiller("Sort", spiller.clone()).unwrap();
    assert_eq!(Arc::strong_count(&spiller), 2);
    drop(registration);
    assert_eq!(
        Arc::strong_count(&spiller),
        1,
        "the library's Arc was dropped"
    );

    let r = pool.reservation("Probe").unwrap();
    let e = r.try_grow(2 * MIB).unwrap_err();
    assert_eq!(e.code, Code::OutOfMemory, "{e}");
    assert_eq!(spiller.calls.load(Ordering::SeqCst), 0);
    assert_eq!(lease.stats().unwrap().used, MIB);
    spiller.chunks.lock().unwrap().clear();
    drop((r, pool, lease));
    close_clean(mm, &listener);
}

// ---- attached state --------------------------------------------------------------------------

/// Engine state holding memory of the manager; records its drop.
struct EngineState {
    _reservation: Reservation,
    _buffer: Allocation,
    dropped: Arc<AtomicBool>,
}

impl Drop for EngineState {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

fn engine_state(pool: &nativemem_client::Pool, dropped: &Arc<AtomicBool>) -> EngineState {
    let reservation = pool.reservation("State").unwrap();
    reservation.try_grow(MIB).unwrap();
    EngineState {
        _reservation: reservation,
        _buffer: pool.allocate(4096, 64).unwrap(),
        dropped: dropped.clone(),
    }
}

#[test]
fn attached_state_is_dropped_at_close_and_what_it_releases_is_not_a_leak() {
    let (mm, listener) = manager("attach", MIB, 64 * MIB);
    let dropped = Arc::new(AtomicBool::new(false));
    {
        let lease = mm.acquire().unwrap();
        let pool = lease.pool("engine/state", None).unwrap();
        let attachment = lease.attach(engine_state(&pool, &dropped)).unwrap();
        // Dropping the handle (no Drop impl: it is only a name) leaves the state attached.
        #[allow(clippy::drop_non_drop)]
        drop(attachment);
        assert!(!dropped.load(Ordering::SeqCst));
        assert_eq!(lease.stats().unwrap().used, MIB + 4096);
    }
    let report = mm.close().unwrap();
    assert!(dropped.load(Ordering::SeqCst), "close dropped the state");
    assert_eq!(report.leaked_bytes, 0, "{}", report.report);
    assert_eq!(listener.held(), 0);
}

#[test]
fn detach_drops_the_state_now_and_take_gives_it_back() {
    let (mm, listener) = manager("detach", MIB, 64 * MIB);
    let lease = mm.acquire().unwrap();
    let pool = lease.pool("engine/state", None).unwrap();

    let dropped = Arc::new(AtomicBool::new(false));
    let attachment = lease.attach(engine_state(&pool, &dropped)).unwrap();
    assert_eq!(lease.stats().unwrap().used, MIB + 4096);
    attachment.detach().unwrap();
    assert!(dropped.load(Ordering::SeqCst));
    assert_eq!(lease.stats().unwrap().used, 0);

    let kept = Arc::new(AtomicBool::new(false));
    let attachment = lease.attach(engine_state(&pool, &kept)).unwrap();
    let state = attachment.take().unwrap();
    assert!(!kept.load(Ordering::SeqCst));
    assert_eq!(lease.stats().unwrap().used, MIB + 4096);
    drop(state);
    assert!(kept.load(Ordering::SeqCst));
    assert_eq!(lease.stats().unwrap().used, 0);

    drop((pool, lease));
    close_clean(mm, &listener);
}

// ---- leaks and close -------------------------------------------------------------------------

#[test]
fn leaked_allocation_and_reservation_are_reported_by_close_with_exact_bytes() {
    let (mm, listener) = manager("leaky", MIB, 64 * MIB);
    {
        let lease = mm.acquire().unwrap();
        let pool = lease.pool("engine/leaky", None).unwrap();
        let a = pool.allocate(3000, 8).unwrap();
        let r = pool.reservation("Forgotten[7]").unwrap();
        r.try_grow(5000).unwrap();
        let kept = pool.reservation("Returned").unwrap();
        kept.try_grow(100).unwrap();
        std::mem::forget(a);
        std::mem::forget(r);
        drop(kept);
        assert_eq!(lease.stats().unwrap().used, 8000);
    }
    let report = mm.close().unwrap();
    assert_eq!(report.leaked_bytes, 8000, "{}", report.report);
    assert!(report.report.contains("Forgotten[7]"), "{}", report.report);
    assert!(report.report.contains("leaky"), "{}", report.report);
    assert_eq!(listener.held(), 0, "close paid the listener back");
}

#[test]
fn objects_outliving_their_manager_fail_cleanly_and_drop_silently() {
    let (mm, listener) = manager("outlive", MIB, 64 * MIB);
    let handle = mm.handle();
    let lease = mm.acquire().unwrap();
    let pool = lease.pool("engine", None).unwrap();
    let r = pool.reservation("Late").unwrap();
    r.try_grow(100).unwrap();
    let a = pool.allocate(200, 8).unwrap();
    let registration = pool
        .register_spiller(
            "Late",
            Arc::new(AllocSpiller {
                chunks: Mutex::new(Vec::new()),
                calls: AtomicU64::new(0),
            }),
        )
        .unwrap();
    lease.release().unwrap();

    let report = mm.close().unwrap();
    assert_eq!(report.leaked_bytes, 300, "{}", report.report);
    assert_eq!(listener.held(), 0);

    let e = api().acquire(handle).unwrap_err();
    assert_eq!(e.code, Code::StaleHandle, "{e}");
    let e = r.try_grow(1).unwrap_err();
    assert!(matches!(e.code, Code::StaleHandle | Code::Closed), "{e}");
    let e = pool.stats().unwrap_err();
    assert!(matches!(e.code, Code::StaleHandle | Code::Closed), "{e}");
    let e = registration.unregister().unwrap_err();
    assert!(matches!(e.code, Code::StaleHandle | Code::Closed), "{e}");
    // Drops meet stale handles and ignore them.
    drop(a);
    drop(r);
    drop(pool);
}

#[test]
fn dropping_an_owned_manager_closes_it() {
    let listener = TestListener::new(64 * MIB);
    let mm = api()
        .create_manager(
            "dropped",
            ManagerOptions::default(),
            Some(listener.clone() as Arc<dyn Listener>),
        )
        .unwrap();
    let handle = mm.handle();
    {
        let lease = mm.acquire().unwrap();
        let r = lease.pool("x", None).unwrap().reservation("r").unwrap();
        r.try_grow(10).unwrap();
        assert_eq!(listener.held(), 8 * MIB, "default block");
    }
    assert_eq!(Arc::strong_count(&listener), 2);
    drop(mm);
    assert_eq!(listener.held(), 0);
    assert_eq!(
        Arc::strong_count(&listener),
        1,
        "the listener was dropped with the manager"
    );
    assert_eq!(api().acquire(handle).unwrap_err().code, Code::StaleHandle);
}

#[test]
fn unlimited_manager_without_listener() {
    let mm = api()
        .create_manager("unlimited", ManagerOptions::default(), None)
        .unwrap();
    let lease = mm.acquire().unwrap();
    let r = lease.pool("p", None).unwrap().reservation("big").unwrap();
    r.try_grow(1 << 40).unwrap();
    assert_eq!(lease.stats().unwrap().used, 1 << 40);
    drop(r);
    drop(lease);
    assert_eq!(mm.close().unwrap().leaked_bytes, 0);
}

#[test]
fn refused_create_drops_the_listener() {
    let listener = TestListener::new(MIB);
    let e = api()
        .create_manager(
            "bad\0name",
            ManagerOptions::default(),
            Some(listener.clone() as Arc<dyn Listener>),
        )
        .unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
    let e = api()
        .create_manager(
            "bad-block",
            ManagerOptions {
                reservation_block: Some(1 << 63),
                task_limit: None,
                ..ManagerOptions::default()
            },
            Some(listener.clone() as Arc<dyn Listener>),
        )
        .unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
    assert_eq!(
        Arc::strong_count(&listener),
        1,
        "no copy of the listener kept"
    );
}

// ---- handles ---------------------------------------------------------------------------------

#[test]
fn second_release_of_a_lease_is_a_stale_handle() {
    let (mm, listener) = manager("stale", MIB, MIB);
    let api = mm.api();
    let raw = mm.acquire().unwrap().into_raw();
    let mut err: *mut std::ffi::c_char = ptr::null_mut();
    // SAFETY: a lease handle of this table and a writable err pointer.
    let first = unsafe { (api.raw().release)(raw, &mut err) };
    assert_eq!(first, sys::NM_OK);
    assert!(err.is_null());
    // SAFETY: as above (the handle is stale now: the table must refuse it by code).
    let second = unsafe { (api.raw().release)(raw, &mut err) };
    assert_eq!(second, sys::NM_ERR_STALE_HANDLE);
    assert!(!err.is_null(), "a message is given when asked for");
    // SAFETY: the table's own message, freed once.
    unsafe { (api.raw().free_message)(err) };
    // With err NULL no message is made.
    // SAFETY: as above.
    assert_eq!(
        unsafe { (api.raw().release)(raw, ptr::null_mut()) },
        sys::NM_ERR_STALE_HANDLE
    );
    close_clean(mm, &listener);
}

#[test]
fn forged_handles_are_invalid() {
    let api = api();
    for forged in [12345_i64, 0, -1] {
        let e = api.acquire(forged).unwrap_err();
        assert_eq!(e.code, Code::InvalidHandle, "{forged}: {e}");
        assert!(!e.message.is_empty());
    }
    let mut stats = sys::NmPoolStats::default();
    // SAFETY: a made-up handle is refused by code; out-parameters are valid.
    let status = unsafe { (api.raw().pool_stats)(12345, &mut stats, ptr::null_mut()) };
    assert_eq!(status, sys::NM_ERR_INVALID_HANDLE);
    // A lease handle is not a manager handle.
    let (mm, listener) = manager("kinds", MIB, MIB);
    let lease = mm.acquire().unwrap();
    let as_manager = i64::try_from(lease.as_raw()).unwrap();
    assert_eq!(
        api.acquire(as_manager).unwrap_err().code,
        Code::InvalidHandle
    );
    drop(lease);
    close_clean(mm, &listener);
}

#[test]
fn acquire_after_close_is_a_stale_handle() {
    let (mm, listener) = manager("closed", MIB, MIB);
    let handle = mm.handle();
    drop(mm.acquire().unwrap());
    close_clean(mm, &listener);
    let e = api().acquire(handle).unwrap_err();
    assert_eq!(e.code, Code::StaleHandle, "{e}");
}

// ---- the table check -------------------------------------------------------------------------

/// A copy of the provider's table with other header fields, leaked so it is `'static`.
fn table_copy(abi_version: u32, struct_size: u32) -> *const NmApi {
    let table = nativemem_provider::api(sys::NM_ABI_VERSION);
    // SAFETY: the provider's table is valid; NmApi is plain data (numbers and fn pointers), so a
    // bitwise copy is a valid NmApi.
    let mut copy = unsafe { ptr::read(table) };
    copy.abi_version = abi_version;
    copy.struct_size = struct_size;
    Box::leak(Box::new(copy))
}

#[test]
fn from_ptr_refuses_old_or_small_tables() {
    let size = size_of::<NmApi>() as u32;

    // SAFETY: a valid, leaked copy of the table.
    let e = unsafe { Api::from_ptr(table_copy(0, size)) }.unwrap_err();
    assert_eq!(e.code, Code::Unsupported);
    assert!(e.message.contains("abi_version 0"), "{}", e.message);
    assert!(
        e.message
            .contains(&format!("abi_version >= {}", sys::NM_ABI_VERSION)),
        "{}",
        e.message
    );

    // SAFETY: as above (only the header is read: the size says it is too small).
    let e = unsafe { Api::from_ptr(table_copy(sys::NM_ABI_VERSION, size - 8)) }.unwrap_err();
    assert_eq!(e.code, Code::Unsupported);
    assert!(
        e.message.contains(&format!("struct_size {}", size - 8)),
        "{}",
        e.message
    );
    assert!(e.message.contains(&format!(">= {size}")), "{}", e.message);

    // SAFETY: null is refused before any read.
    let e = unsafe { Api::from_ptr(ptr::null()) }.unwrap_err();
    assert_eq!(e.code, Code::Unsupported);
    // SAFETY: 0 is refused before any read.
    let e = unsafe { Api::from_address(0) }.unwrap_err();
    assert_eq!(e.code, Code::Unsupported);

    // Newer and larger is fine (the table only grows at the end).
    // SAFETY: a valid, leaked copy; the fields past ours are never read.
    let newer = unsafe { Api::from_ptr(table_copy(sys::NM_ABI_VERSION + 1, size + 64)) };
    // (a struct_size larger than the copy is only a claim; this client never reads past its own)
    assert!(newer.is_ok());

    // The address Java gives works the same as the pointer.
    let table = nativemem_provider::api(sys::NM_ABI_VERSION);
    // SAFETY: the provider's static table.
    let api = unsafe { Api::from_address(table as usize as i64) }.unwrap();
    assert!(ptr::eq(api.raw(), table));
    assert!(nativemem_provider::api(sys::NM_ABI_VERSION + 1).is_null());
}

// ---- threads ---------------------------------------------------------------------------------

#[test]
fn many_threads_growing_and_shrinking_concurrently_end_at_zero() {
    const THREADS: usize = 8;
    const ROUNDS: u64 = 500;
    let (mm, listener) = manager("threads", 64 * KIB, 1 << 40);
    let lease = Arc::new(mm.acquire().unwrap());
    let pool = Arc::new(lease.pool("engine/shared", None).unwrap());
    let shared = Arc::new(pool.reservation("Shared").unwrap());
    let start = Arc::new(Barrier::new(THREADS));
    let workers = (0..THREADS)
        .map(|t| {
            let (lease, pool, shared, start) =
                (lease.clone(), pool.clone(), shared.clone(), start.clone());
            thread::spawn(move || {
                let own = pool.reservation(&format!("Worker[{t}]")).unwrap();
                start.wait();
                for i in 0..ROUNDS {
                    let bytes = 1 + (i * 7919 + t as u64 * 104_729) % (256 * KIB);
                    own.try_grow(bytes).unwrap();
                    shared.try_grow(bytes).unwrap();
                    if i % 3 == 0 {
                        let _buffer = pool.allocate(bytes as usize, 8).unwrap();
                    }
                    own.shrink(bytes).unwrap();
                    shared.shrink(bytes).unwrap();
                    if i % 50 == 0 {
                        lease.stats().unwrap();
                    }
                }
                assert_eq!(own.size().unwrap(), 0);
            })
        })
        .collect::<Vec<_>>();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(shared.size().unwrap(), 0);
    assert_eq!(pool.stats().unwrap().used, 0);
    let m = lease.stats().unwrap();
    assert_eq!(m.used, 0);
    assert!(m.peak > 0);
    assert_eq!(m.reserved, listener.held());
    drop((shared, pool));
    drop(Arc::into_inner(lease).unwrap());
    close_clean(mm, &listener);
}

#[test]
fn lease_held_on_another_thread_delays_close_until_released() {
    let (mm, listener) = manager("lease-wait", MIB, MIB);
    let lease = mm.acquire().unwrap();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (acquired_tx, acquired_rx) = mpsc::channel::<()>();
    let holder = thread::spawn(move || {
        acquired_tx.send(()).unwrap();
        release_rx.recv().unwrap();
        lease.release().unwrap();
    });
    acquired_rx.recv().unwrap();

    let closed = Arc::new(AtomicBool::new(false));
    let closer = {
        let closed = closed.clone();
        thread::spawn(move || {
            let report = mm.close();
            closed.store(true, Ordering::SeqCst);
            report
        })
    };
    thread::sleep(Duration::from_millis(300));
    assert!(
        !closed.load(Ordering::SeqCst),
        "close finished while a lease was held"
    );
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    let report = closer
        .join()
        .unwrap()
        .expect("close succeeds once the lease is released");
    assert!(closed.load(Ordering::SeqCst));
    assert_eq!(report.leaked_bytes, 0);
    assert_eq!(listener.held(), 0);
}

#[test]
fn every_handle_type_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Api>();
    check::<OwnedManager>();
    check::<nativemem_client::Lease>();
    check::<nativemem_client::Pool>();
    check::<Reservation>();
    check::<Allocation>();
    check::<nativemem_client::SpillerRegistration>();
    check::<nativemem_client::Attachment<Vec<u8>>>();
    check::<nativemem_client::Error>();
}

// ---- errors ----------------------------------------------------------------------------------

#[test]
fn codes_round_trip_and_display_names_the_code() {
    let all = [
        Code::InvalidArgument,
        Code::StaleHandle,
        Code::InvalidHandle,
        Code::Closed,
        Code::OutOfMemory,
        Code::UnknownPointer,
        Code::Listener,
        Code::Spill,
        Code::Unsupported,
        Code::Timeout,
        Code::Internal,
        Code::Other(99),
    ];
    for code in all {
        assert_eq!(Code::from_status(code.status()), code);
    }
    assert_eq!(
        Code::from_status(sys::NM_ERR_OUT_OF_MEMORY),
        Code::OutOfMemory
    );
    assert_eq!(Code::Other(99).to_string(), "NM_ERR(99)");
    let e = nativemem_client::Error::new(Code::Spill, "spiller X failed");
    assert_eq!(e.to_string(), "NM_ERR_SPILL: spiller X failed");
    assert!(!e.is_out_of_memory());
    let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(e);
    assert!(boxed.to_string().contains("spiller X"));
}

#[test]
fn the_default_quantum_charges_whole_quanta_and_reports_exactly() {
    assert_eq!(
        ManagerOptions::default().reservation_quantum,
        DEFAULT_RESERVATION_QUANTUM
    );
    assert_eq!(DEFAULT_RESERVATION_QUANTUM, MIB);
    let (mm, listener) = manager_with("quantum", ManagerOptions::default(), 64 * MIB);
    let lease = mm.acquire().unwrap();
    let pool = lease.pool("p", None).unwrap();
    let r = pool.reservation("r").unwrap();
    r.try_grow(1000).unwrap();
    // The consumer's size is exact; the pool holds a whole quantum (at most two per reservation).
    assert_eq!(r.size().unwrap(), 1000);
    assert_eq!(pool.stats().unwrap().used, MIB);
    r.shrink(1000).unwrap();
    assert_eq!(r.size().unwrap(), 0);
    assert!(pool.stats().unwrap().used <= 2 * MIB);
    drop((r, pool, lease));
    assert_eq!(mm.close().unwrap().leaked_bytes, 0);
    assert_eq!(listener.held(), 0);
}

//! The tracking allocator over the engine ABI (what an engine in its own library does): the
//! provider is `nativemem-provider`'s table, linked into this binary. Tracked work runs on threads
//! that call nothing of nativemem while bound (see the crate docs on test binaries that link the
//! library); the test thread reads the totals.

use std::sync::mpsc;
use std::thread;

use nativemem_client::{sys, Api, ManagerOptions};
use nativemem_track::{TrackPool, TrackingAllocator};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator::system();

const MIB: u64 = 1 << 20;

/// Exact accounting: the default is the 1 MiB reservation quantum, whose slack these pool
/// figures would include.
fn exact() -> ManagerOptions {
    ManagerOptions {
        reservation_quantum: 0,
        ..ManagerOptions::default()
    }
}

fn api() -> Api {
    let table = nativemem_provider::api(sys::NM_ABI_VERSION);
    // SAFETY: the provider's table is a static of the linked library.
    unsafe { Api::from_ptr(table) }.unwrap()
}

#[test]
fn an_engine_thread_charges_the_task_pool_through_the_abi() {
    let mm = api()
        // Exact accounting (quantum 0, opt-in): the pool's used is pinned to what was tracked.
        .create_manager("task-abi", exact(), None)
        .unwrap();
    let lease = mm.acquire().unwrap();
    let pool = lease.pool("engine/untracked", None).unwrap();
    let tracker = pool.tracker().unwrap();
    let (built_tx, built_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let worker = {
        let tracker = tracker.clone();
        thread::spawn(move || {
            let guard = tracker.track_thread();
            let tables: Vec<Vec<u64>> = (0..32).map(|i| vec![i; (MIB / 8) as usize]).collect();
            drop(guard); // sends the batch
            built_tx.send(()).unwrap();
            done_rx.recv().unwrap();
            drop(tables); // freed after the scope: credited
        })
    };
    built_rx.recv().unwrap();
    let used = pool.stats().unwrap().used;
    assert!((32 * MIB..33 * MIB).contains(&used), "pool used {used}");
    let report = lease.usage_report().unwrap();
    assert!(report.contains("untracked allocations"), "{report}");
    assert!(report.contains("Over-committed"), "{report}");
    done_tx.send(()).unwrap();
    worker.join().unwrap();
    tracker.flush();
    assert_eq!(pool.stats().unwrap().used, 0);
    assert!(tracker.stats().flushes >= 1);
    drop(tracker);
    nativemem_track::collect();
    drop(pool);
    lease.release().unwrap();
    let report = mm.close().unwrap();
    assert_eq!(report.leaked_bytes, 0, "{}", report.report);
}

#[test]
fn frees_after_the_manager_closed_are_harmless() {
    let mm = api()
        .create_manager("task-abi-closed", ManagerOptions::default(), None)
        .unwrap();
    let lease = mm.acquire().unwrap();
    let pool = lease.pool("engine", None).unwrap();
    let tracker = pool.tracker().unwrap();
    let t = tracker.clone();
    let kept = thread::spawn(move || {
        let _g = t.track_thread();
        vec![0u8; 4 * MIB as usize]
    })
    .join()
    .unwrap();
    drop(pool);
    lease.release().unwrap();
    let report = mm.close().unwrap();
    assert!(report.leaked_bytes >= 4 * MIB, "{}", report.report);
    // The pool is gone: later flushes are refused and counted, frees change nothing.
    let t = tracker.clone();
    thread::spawn(move || {
        let _g = t.track_thread();
        drop(vec![0u8; 2 * MIB as usize]);
    })
    .join()
    .unwrap();
    drop(kept);
    tracker.flush();
    assert!(tracker.stats().refused >= 2 * MIB, "{:?}", tracker.stats());
    drop(tracker);
    nativemem_track::collect();
}

//! Scenarios of the tracking allocator over nativemem-core pools: one scenario per test, the
//! pools' totals asserted after each step. The allocator is this binary's global allocator; each
//! test binds only threads it creates or its own, so tests may run in parallel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;

use nativemem_core::{CapacityListener, MemoryConfig, MemoryManager};
use nativemem_track::{untracked, Sink, TrackPool, Tracker, TrackingAllocator};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator::system();

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Header bytes in front of every block (alignment <= 16).
const HEADER: u64 = 16;

fn manager(capacity: u64) -> (MemoryManager, Arc<CapacityListener>) {
    let l = Arc::new(CapacityListener::new(capacity));
    // Exact accounting (quantum 0, opt-in: the default is the 1 MiB quantum): these scenarios
    // pin the pools' totals to the byte (blocks plus headers), which is their point.
    let config = MemoryConfig::default().with_reservation_quantum(0);
    let m = MemoryManager::new("task", config, l.clone()).unwrap();
    (m, l)
}

#[test]
fn blocks_freed_on_another_thread_are_credited_to_the_pool_they_were_charged_to() {
    let (m, _l) = manager(u64::MAX);
    let p1 = m.pool("producer").unwrap();
    let p2 = m.pool("consumer").unwrap();
    let t1 = Tracker::for_core_pool(&p1, "producer");
    let t2 = Tracker::for_core_pool(&p2, "consumer");
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let producer = thread::spawn(move || {
        let _g = t1.track_thread();
        for i in 0..16u8 {
            tx.send(vec![i; MIB as usize]).unwrap();
        }
        t1
    });
    let consumer = thread::spawn(move || {
        let _g = t2.track_thread();
        let mut sum = 0u64;
        for v in rx {
            sum += v[0] as u64;
            drop(v); // a block of the producer's pool, freed here
        }
        (t2, sum)
    });
    let t1 = producer.join().unwrap();
    let (t2, sum) = consumer.join().unwrap();
    assert_eq!(sum, (0..16).sum::<u64>());
    // The producer's binding sent everything when it ended; the consumer's frees went to the
    // producer's account (batched): flush what waits, and the producer's pool is back to 0.
    t1.flush();
    t2.flush();
    assert_eq!(p1.used(), 0, "{:?}", t1.stats());
    assert_eq!(
        p2.used(),
        0,
        "the consumer's pool was never charged for the producer's blocks"
    );
    assert!(p1.peak() >= 2 * MIB, "peak {}", p1.peak());
    drop((t1, t2));
    assert!(m.close().unwrap().is_empty());
}

#[test]
fn memory_freed_after_the_scope_is_credited_and_memory_allocated_after_it_is_not_charged() {
    let (m, _l) = manager(u64::MAX);
    let pool = m.pool("engine").unwrap();
    let tracker = Tracker::for_core_pool(&pool, "op");
    let kept = {
        let _g = tracker.track_thread();
        vec![1u8; 4 * MIB as usize]
    };
    // The binding ended: exact.
    assert_eq!(pool.used(), 4 * MIB + HEADER);
    let after = vec![2u8; 4 * MIB as usize]; // not bound: not charged
    assert_eq!(pool.used(), 4 * MIB + HEADER);
    drop(kept); // freed after the scope: credited (past the threshold: at once)
    assert_eq!(pool.used(), 0);
    drop(after);
    assert_eq!(pool.used(), 0);
    // Small blocks freed after the scope are batched in the account; a flush sends them.
    let small: Vec<Box<[u8; 100]>> = {
        let _g = tracker.track_thread();
        (0..1000).map(|_| Box::new([0u8; 100])).collect()
    };
    let charged = pool.used();
    assert!(charged >= 1000 * (100 + HEADER), "{charged}");
    drop(small);
    tracker.flush();
    assert_eq!(pool.used(), 0);
    drop(tracker);
    assert!(m.close().unwrap().is_empty());
}

#[test]
fn the_last_free_of_a_dropped_tracker_releases_its_reservation() {
    let (m, _l) = manager(u64::MAX);
    let pool = m.pool("engine").unwrap();
    let tracker = Tracker::for_core_pool(&pool, "short-lived");
    let kept: Vec<Vec<u8>> = {
        let _g = tracker.track_thread();
        (0..100).map(|_| vec![0u8; 1000]).collect()
    };
    drop(tracker); // no handle, no binding: the account lives while its blocks do
    let text = m.usage_report().to_string();
    assert!(text.contains("short-lived"), "{text}");
    drop(kept); // the last block: the account retires, the final credit is sent
    assert_eq!(pool.used(), 0);
    nativemem_track::collect(); // drops the reservation (deferred out of the allocator)
    let text = m.usage_report().to_string();
    assert!(!text.contains("short-lived"), "{text}");
    assert!(m.close().unwrap().is_empty());
}

#[test]
fn realloc_keeps_a_block_with_its_pool_and_adopts_untracked_blocks() {
    let (m, _l) = manager(u64::MAX);
    let p1 = m.pool("one").unwrap();
    let p2 = m.pool("two").unwrap();
    let t1 = Tracker::with_threshold(p1.reservation("one"), 1);
    let t2 = Tracker::with_threshold(p2.reservation("two"), 1);
    // Made untracked, grown on a bound thread: adopted, charged whole.
    let mut v: Vec<u8> = Vec::with_capacity(1000);
    {
        let _g = t1.track_thread();
        v.reserve_exact(2 * MIB as usize);
    }
    assert_eq!(p1.used(), v.capacity() as u64 + HEADER);
    // Grown on a thread bound to another pool: stays with its own.
    {
        let _g = t2.track_thread();
        v.reserve_exact(4 * MIB as usize);
    }
    assert_eq!(p1.used(), v.capacity() as u64 + HEADER);
    assert_eq!(p2.used(), 0);
    v.shrink_to(MIB as usize);
    assert_eq!(p1.used(), v.capacity() as u64 + HEADER);
    drop(v);
    assert_eq!((p1.used(), p2.used()), (0, 0));
    drop((t1, t2));
    assert!(m.close().unwrap().is_empty());
}

#[test]
fn bindings_nest_and_spawned_threads_share_a_tracker() {
    let (m, _l) = manager(u64::MAX);
    let outer = m.pool("outer").unwrap();
    let inner = m.pool("inner").unwrap();
    let g = outer.track_thread().unwrap();
    {
        let _i = inner.track_thread().unwrap();
        let v = vec![0u8; 2 * MIB as usize];
        // Within the threshold while bound (whole MiBs are sent, the rest is batched).
        assert_eq!((inner.used(), outer.used()), (2 * MIB, 0));
        std::mem::forget(v); // stays charged to `inner`: reported as leaked at close
    }
    assert_eq!((inner.used(), outer.used()), (2 * MIB + HEADER, 0));
    let t = g.tracker().unwrap();
    let barrier = Arc::new(Barrier::new(4));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let t = t.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                let _g = t.track_thread();
                let map: HashMap<u64, [u8; 48]> = (0..100_000).map(|k| (k, [0u8; 48])).collect();
                barrier.wait();
                map.len()
            })
        })
        .collect();
    let n: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(n, 400_000);
    drop(barrier); // allocated on this thread while bound to `outer`
                   // The maps were freed by their threads and their bindings ended; this thread's own batch
                   // (the barrier, the handles) is below the threshold.
    assert!(outer.used() <= MIB, "{:?}", t.stats());
    assert!(outer.peak() >= 4 * 100_000 * 56, "peak {}", outer.peak());
    drop((t, g));
    assert_eq!(outer.used(), 0);
    assert_eq!(inner.used(), 2 * MIB + HEADER);
    let leaks = m.close().unwrap();
    assert_eq!(leaks.total_bytes(), 2 * MIB + HEADER, "{leaks}");
}

#[test]
fn tracked_memory_beyond_the_reserve_is_overcommit_that_the_next_grow_pays_or_fails_on() {
    let (m, l) = manager(16 * MIB);
    let pool = m.pool("engine").unwrap();
    let tracker = Tracker::for_core_pool(&pool, "hash table");
    let guard = tracker.track_thread();
    let big = vec![7u8; 24 * MIB as usize];
    drop(guard);
    assert_eq!(
        l.reserve_calls(),
        0,
        "the allocator never calls the listener"
    );
    let s = m.stats();
    assert_eq!(s.overcommitted, 24 * MIB + HEADER);
    assert_eq!(tracker.stats().overcommitted, 24 * MIB + HEADER);
    let r = pool.reservation("operator");
    let err = r.try_grow(KIB).unwrap_err();
    assert!(err.is_out_of_memory());
    let text = err.to_string();
    assert!(text.contains("Over-committed: 8.0 MiB now"), "{text}");
    assert!(text.contains("hash table"), "{text}");
    drop(big);
    assert_eq!((pool.used(), m.stats().overcommitted), (0, 0));
    r.try_grow(KIB).unwrap();
    drop((r, tracker));
    assert!(m.close().unwrap().is_empty());
    assert_eq!(l.reserved(), 0);
}

/// A sink that allocates on every call (as a sink over the engine ABI does) and counts calls.
struct AllocatingSink {
    inner: nativemem_core::Reservation,
    calls: Arc<AtomicU64>,
}

impl Sink for AllocatingSink {
    fn charge(&self, bytes: u64) -> Option<u64> {
        let note = format!("charge {bytes}");
        self.calls
            .fetch_add(note.len().min(1) as u64, Ordering::SeqCst);
        self.inner.charge(bytes)
    }
    fn credit(&self, bytes: u64) -> u64 {
        let note: Vec<u8> = std::hint::black_box(Vec::with_capacity(64));
        self.calls
            .fetch_add(note.capacity().min(1) as u64, Ordering::SeqCst);
        self.inner.credit(bytes)
    }
}

#[test]
fn a_sink_that_allocates_does_not_re_enter_and_every_byte_is_counted() {
    let (m, _l) = manager(u64::MAX);
    let pool = m.pool("engine").unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    // Threshold 1: every allocation and free flushes, each flush allocates inside the sink.
    let tracker = Tracker::with_threshold(
        AllocatingSink {
            inner: pool.reservation("alloc-sink"),
            calls: calls.clone(),
        },
        1,
    );
    {
        let _g = tracker.track_thread();
        let mut v: Vec<Vec<u8>> = Vec::new();
        for i in 0..1000 {
            v.push(vec![0u8; i]);
        }
        assert!(pool.used() > 500_000, "{}", pool.used());
        drop(v);
        assert_eq!(pool.used(), 0);
    }
    assert!(calls.load(Ordering::SeqCst) >= 2000);
    drop(tracker);
    assert!(m.close().unwrap().is_empty());
}

#[test]
fn untracked_code_and_unbound_threads_are_not_charged() {
    let (m, _l) = manager(u64::MAX);
    let pool = m.pool("engine").unwrap();
    let tracker = Tracker::with_threshold(pool.reservation("op"), 1);
    let _g = tracker.track_thread();
    let cache = untracked(|| vec![0u8; 3 * MIB as usize]);
    assert_eq!(pool.used(), 0);
    let other = thread::spawn(|| vec![0u8; MIB as usize]).join().unwrap();
    assert_eq!(pool.used(), 0);
    drop((cache, other));
    assert_eq!(pool.used(), 0);
}

#[test]
fn over_aligned_blocks_are_aligned_and_charged() {
    #[repr(align(4096))]
    struct Page([u8; 4096]);
    let (m, _l) = manager(u64::MAX);
    let pool = m.pool("engine").unwrap();
    let tracker = Tracker::with_threshold(pool.reservation("pages"), 1);
    let _g = tracker.track_thread();
    let pages: Vec<Box<Page>> = (0..8).map(|_| Box::new(Page([1; 4096]))).collect();
    for p in &pages {
        assert_eq!(p.as_ref() as *const Page as usize % 4096, 0);
        assert_eq!(p.0[4095], 1);
    }
    let vec_bytes = pages.capacity() as u64 * 8 + HEADER;
    // An over-aligned block's header is one alignment unit.
    assert_eq!(pool.used(), vec_bytes + 8 * (4096 + 4096));
    drop(pages);
    assert_eq!(pool.used(), 0);
}

#[test]
fn closing_the_manager_under_live_tracked_memory_is_reported_and_later_frees_are_harmless() {
    let (m, l) = manager(u64::MAX);
    let pool = m.pool("engine").unwrap();
    let tracker = Tracker::for_core_pool(&pool, "leaky");
    let held = {
        let _g = tracker.track_thread();
        vec![0u8; 8 * MIB as usize]
    };
    let leaks = m.close().unwrap();
    assert_eq!(leaks.total_bytes(), 8 * MIB + HEADER, "{leaks}");
    assert_eq!((m.used(), m.reserved(), l.reserved()), (0, 0, 0));
    {
        let _g = tracker.track_thread();
        let late = vec![0u8; 2 * MIB as usize]; // refused by the closed pool: counted
        drop(late);
    }
    assert!(tracker.stats().refused >= 2 * MIB);
    drop(held);
    tracker.flush();
    assert_eq!((m.used(), m.reserved()), (0, 0));
}

/// A sink that panics: the allocator must neither unwind nor lose its own bookkeeping.
struct PanickingSink;

impl Sink for PanickingSink {
    fn charge(&self, _bytes: u64) -> Option<u64> {
        panic!("sink bug");
    }
    fn credit(&self, _bytes: u64) -> u64 {
        panic!("sink bug");
    }
}

#[test]
fn a_panicking_sink_is_contained_and_counted_as_refused() {
    let tracker = Tracker::with_threshold(PanickingSink, 1);
    let v = {
        let _g = tracker.track_thread();
        vec![0u8; 4096]
    };
    drop(v);
    tracker.flush();
    let s = tracker.stats();
    assert!(s.refused >= 4096, "{s:?}");
    assert_eq!(s.charged, 0);
}

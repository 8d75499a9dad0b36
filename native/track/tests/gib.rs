//! A task that builds a gibibyte of `Vec`s and a `HashMap` on a tracked thread, with no
//! reservation call: the pool's `used` follows what the thread really holds (measured by a
//! counting allocator under the tracking one) within the flush threshold at every step, is exact
//! when the binding ends, and Spark is asked only by the next fallible grow, which pays the
//! over-commit. Its own test binary: the counting allocator is process-wide.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;

use nativemem_core::{CapacityListener, MemoryConfig, MemoryManager};
use nativemem_track::{Tracker, TrackingAllocator};

/// Counts the bytes the *current thread* holds from the system allocator (what the tracking
/// allocator asked for: blocks plus headers), as an oracle independent of the tracker.
struct Counting;

thread_local! {
    static HELD: Cell<i64> = const { Cell::new(0) };
}

fn held() -> i64 {
    HELD.with(Cell::get)
}

fn count(bytes: i64) {
    let _ = HELD.try_with(|h| h.set(h.get() + bytes));
}

// SAFETY: forwards every call to `System` unchanged; the counting touches a thread-local only.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded.
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as i64));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

#[global_allocator]
static ALLOC: TrackingAllocator<Counting> = TrackingAllocator::new(Counting);

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[test]
fn a_gib_built_with_vecs_and_a_hash_map_shows_in_the_pool_within_the_flush_threshold() {
    let listener = Arc::new(CapacityListener::unlimited());
    // Exact accounting (quantum 0, opt-in): the test pins the pool to what the tracker flushed,
    // within its 1 MiB flush threshold; a quantum's slack (up to 16 MiB at this size) would hide it.
    let config = MemoryConfig::default().with_reservation_quantum(0);
    let m = MemoryManager::new("task-gib", config, listener.clone()).unwrap();
    let pool = m.pool("engine/hash").unwrap();
    let tracker = Tracker::for_core_pool(&pool, "hash build");
    let threshold = tracker.threshold() as i64;
    assert_eq!(threshold, MIB as i64);

    let guard = tracker.track_thread();
    let base = held();
    let check = |step: &str| {
        let holds = held() - base;
        let used = pool.used() as i64;
        assert!(
            (used - holds).abs() <= threshold,
            "{step}: pool used {used}, the thread holds {holds} (threshold {threshold})"
        );
    };

    // 13 vectors of 64 MiB (zeroed: the kernel maps the pages lazily, so this stays cheap).
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    for i in 0..13 {
        chunks.push(vec![0u8; 64 << 20]);
        check(&format!("chunk {i}"));
    }
    // A hash map of 4 Mi entries (~136 MiB after its last resize), grown insert by insert.
    let mut map: HashMap<u64, u64> = HashMap::new();
    for k in 0..(4u64 << 20) {
        map.insert(k, k ^ 0x5555);
        if k % (1 << 20) == 0 {
            check(&format!("map at {k} entries"));
        }
    }
    check("map built");
    // A million small strings: the per-thread batch at work (one flush per MiB, not per string).
    let strings: Vec<String> = (0..1_000_000).map(|i| format!("key-{i:026}")).collect();
    check("strings built");
    let peak = pool.used();
    assert!(peak >= GIB, "pool used {peak} after building > 1 GiB");
    assert_eq!(listener.reserve_calls(), 0, "no reservation call was made");
    let stats = m.stats();
    assert!(
        stats.overcommitted >= GIB - MIB,
        "all of it is over-commit: {stats:?}"
    );
    let flushes = tracker.stats().flushes;
    assert!(
        flushes < 2 * peak / MIB + 64,
        "{flushes} flushes for {peak} bytes: batched per MiB"
    );

    // The next fallible grow of the task pays the over-commit: one upcall, whole blocks.
    let r = m.root().reservation("operator");
    r.try_grow(MIB).unwrap();
    assert_eq!(listener.reserve_calls(), 1);
    assert!(m.reserved() >= m.used(), "{m:?}");
    assert_eq!(m.stats().overcommitted, 0);
    drop(r);

    drop(map);
    check("map dropped");
    drop(chunks);
    check("chunks dropped");
    drop(guard);
    // The binding ended: its batch was sent, the pool is exact.
    assert_eq!(pool.used() as i64, held() - base, "exact after the binding");
    // Freed after the scope: credited to the same pool.
    drop(strings);
    tracker.flush();
    assert_eq!(pool.used() as i64, (held() - base).max(0));
    drop(tracker);
    assert_eq!(pool.used(), 0, "every byte credited back");
    let leaks = m.close().unwrap();
    assert!(leaks.is_empty(), "{leaks}");
    assert_eq!((m.reserved(), listener.reserved()), (0, 0));
}

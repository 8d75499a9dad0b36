//! The tracking allocator's cost per allocation: `alloc` + `dealloc` of one block through
//! [`TrackingAllocator`] on a thread bound to a pool, against the wrapped allocator (the
//! system's) with the same layout, measured in the same run; and on a thread that is not bound.
//!
//! `scripts/bench.sh track` reads criterion's estimates and prints the ratios (target ≤ 1.2×).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use nativemem_core::{CapacityListener, MemoryConfig, MemoryManager};
use nativemem_track::{Tracker, TrackingAllocator};

static TRACKING: TrackingAllocator = TrackingAllocator::system();

fn alloc_free(c: &mut Criterion) {
    let m = MemoryManager::new(
        "bench",
        MemoryConfig::default(),
        Arc::new(CapacityListener::unlimited()),
    )
    .unwrap();
    let pool = m.pool("engine").unwrap();
    // Pre-reserve so the listener is out of the picture, as in steady state.
    let warm = pool.reservation("warm");
    warm.try_grow(8 << 20).unwrap();
    drop(warm);
    let tracker = Tracker::for_core_pool(&pool, "bench");
    let mut g = c.benchmark_group("track_alloc_free");
    for size in [64usize, 4 << 10, 64 << 10, 1 << 20] {
        let layout = Layout::from_size_align(size, 8).unwrap();
        g.bench_with_input(BenchmarkId::new("system", size), &size, |b, _| {
            b.iter(|| {
                // SAFETY: non-zero size, valid alignment; freed right after with the same layout.
                unsafe {
                    let p = System.alloc(layout);
                    black_box(p);
                    System.dealloc(p, layout);
                }
            })
        });
        // The wrapped allocator asked for what the tracking allocator asks it for (the block
        // plus its 16-byte header, aligned to 16): separates the allocator's own cost of the
        // larger size from the tracking's bookkeeping.
        let outer = Layout::from_size_align(size + 16, 16).unwrap();
        g.bench_with_input(
            BenchmarkId::new("system_with_header", size),
            &size,
            |b, _| {
                b.iter(|| {
                    // SAFETY: as above.
                    unsafe {
                        let p = System.alloc(outer);
                        black_box(p);
                        System.dealloc(p, outer);
                    }
                })
            },
        );
        g.bench_with_input(BenchmarkId::new("tracked", size), &size, |b, _| {
            let _guard = tracker.track_thread();
            b.iter(|| {
                // SAFETY: as above, through the tracking allocator.
                unsafe {
                    let p = TRACKING.alloc(layout);
                    black_box(p);
                    TRACKING.dealloc(p, layout);
                }
            })
        });
        g.bench_with_input(BenchmarkId::new("unbound", size), &size, |b, _| {
            b.iter(|| {
                // SAFETY: as above.
                unsafe {
                    let p = TRACKING.alloc(layout);
                    black_box(p);
                    TRACKING.dealloc(p, layout);
                }
            })
        });
    }
    g.finish();
    assert_eq!(pool.used(), 0, "every tracked byte was credited back");
}

fn config() -> Criterion {
    let quick = std::env::var_os("NATIVEMEM_BENCH_QUICK").is_some();
    let c = Criterion::default().without_plots();
    if quick {
        c.warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(300))
            .sample_size(10)
    } else {
        c.warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
    }
}

criterion_group! { name = benches; config = config(); targets = alloc_free }
criterion_main!(benches);

//! The tracking allocator's cost per allocation: `alloc` + `dealloc` of one block through
//! [`TrackingAllocator`] on a thread bound to a pool, against the wrapped allocator (the
//! system's) with the same layout; also the system allocator asked for what the tracking
//! allocator asks it for (block + 16-byte header) and a thread that is not bound.
//!
//! A plain harness rather than criterion: on a shared 2-vCPU machine the load moves by tens of
//! percent between two criterion benchmarks run seconds apart, which swamps a difference of a few
//! nanoseconds. Here every round measures the four variants back to back (alternating the order),
//! a few milliseconds each, and the figure is the median over rounds of the per-round ratio.
//!
//! Output, one line per size (what `scripts/bench.sh track` reads):
//! `BENCH track_alloc_free <size> <system ns> <system+header ns> <tracked ns> <unbound ns> <median tracked/system>`
//! Environment: `NATIVEMEM_BENCH_QUICK=1` for fewer rounds.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use nativemem_core::{CapacityListener, MemoryConfig, MemoryManager};
use nativemem_track::{Tracker, TrackingAllocator};

static TRACKING: TrackingAllocator = TrackingAllocator::system();

const ITERS: u32 = 100_000;

/// ns per alloc+free pair of `layout` through `a`.
fn pairs<A: GlobalAlloc>(a: &A, layout: Layout) -> f64 {
    let start = Instant::now();
    for _ in 0..ITERS {
        // SAFETY: non-zero size, valid alignment; freed right after with the same layout.
        unsafe {
            let p = a.alloc(layout);
            black_box(p);
            a.dealloc(p, layout);
        }
    }
    start.elapsed().as_nanos() as f64 / ITERS as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let rounds = if std::env::var_os("NATIVEMEM_BENCH_QUICK").is_some() {
        7
    } else {
        41
    };
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
    for size in [64usize, 4 << 10, 64 << 10, 1 << 20] {
        let layout = Layout::from_size_align(size, 8).unwrap();
        let outer = Layout::from_size_align(size + 16, 16).unwrap();
        let tracked = || {
            let _g = tracker.track_thread();
            pairs(&TRACKING, layout)
        };
        // Warm-up: every path once.
        pairs(&System, layout);
        pairs(&System, outer);
        tracked();
        pairs(&TRACKING, layout);
        let (mut sys, mut hdr, mut tr, mut ub, mut ratio) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            let (s, h, t, u);
            if round % 2 == 0 {
                s = pairs(&System, layout);
                h = pairs(&System, outer);
                t = tracked();
                u = pairs(&TRACKING, layout);
            } else {
                u = pairs(&TRACKING, layout);
                t = tracked();
                h = pairs(&System, outer);
                s = pairs(&System, layout);
            }
            sys.push(s);
            hdr.push(h);
            tr.push(t);
            ub.push(u);
            ratio.push(t / s);
        }
        println!(
            "BENCH track_alloc_free {size} {:.2} {:.2} {:.2} {:.2} {:.3}",
            median(&mut sys),
            median(&mut hdr),
            median(&mut tr),
            median(&mut ub),
            median(&mut ratio)
        );
    }
    assert_eq!(pool.used(), 0, "every tracked byte was credited back");
}

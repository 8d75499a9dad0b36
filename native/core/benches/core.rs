//! Core fast-path benchmarks. Every figure has a baseline measured in the same run:
//! - a grow+shrink pair against the floor of two atomic read-modify-write pairs, in exact mode
//!   (every grow charges every pool level) and with a reservation quantum (the fast path), on a
//!   shared reservation (`&self`: one RMW each way) and an exclusive one (`&mut`: none);
//! - the same pair on 1, 2 and 4 threads of one manager, each on its own reservation (time per
//!   pair per thread: wall time / pairs each thread made);
//! - `Pool::allocate` + `free` against `std::alloc::alloc` + `dealloc` of the same layout, exact
//!   and with a reservation quantum (allocations charged through the pool's allocation slack).
//!
//! `scripts/bench.sh` reads criterion's estimates and prints the ratios.

use std::alloc::Layout;
use std::hint::black_box;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use nativemem_core::{
    CapacityListener, MemoryConfig, MemoryManager, RECOMMENDED_RESERVATION_QUANTUM_BYTES,
};

fn manager() -> MemoryManager {
    manager_with(MemoryConfig::default())
}

fn manager_with(config: MemoryConfig) -> MemoryManager {
    MemoryManager::new("bench", config, Arc::new(CapacityListener::unlimited())).unwrap()
}

/// `threads` threads, each with its own reservation of its own pool on `m`, each making `iters`
/// grow+shrink pairs of 64 bytes (through the `_exclusive` methods if `exclusive`), started
/// together; returns the wall time.
fn pairs_on_threads(m: &MemoryManager, threads: usize, iters: u64, exclusive: bool) -> Duration {
    let barrier = Arc::new(std::sync::Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let mut r = m.pool(&format!("t{i}")).unwrap().reservation("bench");
            r.try_grow(1024).unwrap(); // charged once: the pairs below run on slack
            r.shrink(1024).unwrap();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..iters {
                    if exclusive {
                        r.try_grow_exclusive(black_box(64)).unwrap();
                        r.shrink_exclusive(black_box(64)).unwrap();
                    } else {
                        r.try_grow(black_box(64)).unwrap();
                        r.shrink(black_box(64)).unwrap();
                    }
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for h in handles {
        h.join().unwrap();
    }
    start.elapsed()
}

fn grow_shrink(c: &mut Criterion) {
    let mut g = c.benchmark_group("grow_shrink");
    // The floor: what two RMW pairs (pool counter + cushion) cost on this machine.
    let used = AtomicU64::new(0);
    let cushion = AtomicI64::new(1 << 30);
    g.bench_function("baseline_two_atomic_rmw_pairs", |b| {
        b.iter(|| {
            used.fetch_add(black_box(64), Ordering::Relaxed);
            cushion.fetch_sub(black_box(64), Ordering::AcqRel);
            used.fetch_sub(black_box(64), Ordering::Relaxed);
            cushion.fetch_add(black_box(64), Ordering::AcqRel);
        })
    });
    // The floor of a reservation's fast path: one RMW each way on one counter (a grow and a
    // shrink of the reservation's own size), as the quantum path does.
    let own = AtomicU64::new(1 << 30);
    g.bench_function("baseline_one_atomic_rmw_pair", |b| {
        b.iter(|| {
            own.fetch_add(black_box(64), Ordering::SeqCst);
            own.fetch_sub(black_box(64), Ordering::SeqCst);
        })
    });
    let m = manager();
    let one = m.root().child("op", None).unwrap();
    let r1 = one.reservation("bench");
    r1.try_grow(1 << 20).unwrap(); // the cushion now holds a block: no listener calls below
    g.bench_function("one_level_pool", |b| {
        b.iter(|| {
            r1.try_grow(black_box(64)).unwrap();
            r1.shrink(black_box(64)).unwrap();
        })
    });
    let three = m
        .pool("stage/operator")
        .unwrap()
        .child("buffers", Some(1 << 40))
        .unwrap();
    let r3 = three.reservation("bench");
    g.bench_function("three_level_pool_with_limit", |b| {
        b.iter(|| {
            r3.try_grow(black_box(64)).unwrap();
            r3.shrink(black_box(64)).unwrap();
        })
    });
    // Quantum mode (the fast path): the pair runs on the reservation's slack.
    let mq = manager_with(
        MemoryConfig::default().with_reservation_quantum(RECOMMENDED_RESERVATION_QUANTUM_BYTES),
    );
    let rq1 = mq.root().child("op", None).unwrap().reservation("bench");
    rq1.try_grow(1 << 20).unwrap();
    g.bench_function("quantum_one_level_pool", |b| {
        b.iter(|| {
            rq1.try_grow(black_box(64)).unwrap();
            rq1.shrink(black_box(64)).unwrap();
        })
    });
    let rq3 = mq
        .pool("stage/operator")
        .unwrap()
        .child("buffers", Some(1 << 40))
        .unwrap()
        .reservation("bench");
    rq3.try_grow(1 << 20).unwrap();
    g.bench_function("quantum_three_level_pool_with_limit", |b| {
        b.iter(|| {
            rq3.try_grow(black_box(64)).unwrap();
            rq3.shrink(black_box(64)).unwrap();
        })
    });
    // The exclusive path (`&mut`): no RMW, no fence instruction on the slack.
    let mut rx1 = mq.root().child("op-x", None).unwrap().reservation("bench");
    rx1.try_grow_exclusive(1 << 20).unwrap();
    g.bench_function("quantum_exclusive_one_level_pool", |b| {
        b.iter(|| {
            rx1.try_grow_exclusive(black_box(64)).unwrap();
            rx1.shrink_exclusive(black_box(64)).unwrap();
        })
    });
    for threads in [1usize, 2, 4] {
        g.bench_function(format!("quantum_threads_{threads}"), |b| {
            b.iter_custom(|iters| pairs_on_threads(&mq, threads, iters, false))
        });
        g.bench_function(format!("quantum_exclusive_threads_{threads}"), |b| {
            b.iter_custom(|iters| pairs_on_threads(&mq, threads, iters, true))
        });
        g.bench_function(format!("exact_threads_{threads}"), |b| {
            b.iter_custom(|iters| pairs_on_threads(&m, threads, iters, false))
        });
    }
    g.finish();
}

fn allocate_free(c: &mut Criterion) {
    let mut g = c.benchmark_group("allocate_free");
    let m = manager();
    let pool = m.pool("alloc").unwrap();
    // Pre-reserve so the listener is out of the picture, as in steady state.
    let warm = pool.reservation("warm");
    warm.try_grow(4 << 20).unwrap();
    drop(warm);
    // Quantum mode: allocations are charged through the pool's allocation slack.
    let mq = manager_with(
        MemoryConfig::default().with_reservation_quantum(RECOMMENDED_RESERVATION_QUANTUM_BYTES),
    );
    let qpool = mq.pool("alloc").unwrap();
    let warm = qpool.reservation("warm");
    warm.try_grow(4 << 20).unwrap();
    drop(warm);
    for size in [64usize, 4 << 10, 64 << 10, 1 << 20] {
        let layout = Layout::from_size_align(size, 16).unwrap();
        g.bench_with_input(BenchmarkId::new("system", size), &size, |b, _| {
            b.iter(|| {
                // SAFETY: non-zero size, valid alignment; freed right after with the same layout.
                unsafe {
                    let p = std::alloc::alloc(layout);
                    black_box(p);
                    std::alloc::dealloc(p, layout);
                }
            })
        });
        // The floor of any design whose record and accounting are shared by the task's threads:
        // the system allocator plus four uncontended atomic RMWs (record in and out, charge and
        // release), on two counters.
        let (bytes, records) = (AtomicU64::new(0), AtomicU64::new(0));
        g.bench_with_input(
            BenchmarkId::new("system_plus_four_rmw", size),
            &size,
            |b, &size| {
                b.iter(|| {
                    // SAFETY: as above.
                    unsafe {
                        bytes.fetch_add(size as u64, Ordering::SeqCst);
                        let p = std::alloc::alloc(layout);
                        records.fetch_add(1, Ordering::AcqRel);
                        black_box(p);
                        records.fetch_sub(1, Ordering::AcqRel);
                        std::alloc::dealloc(p, layout);
                        bytes.fetch_sub(size as u64, Ordering::SeqCst);
                    }
                })
            },
        );
        g.bench_with_input(BenchmarkId::new("nativemem", size), &size, |b, &size| {
            b.iter(|| {
                let p = pool.allocate(size, 16).unwrap();
                black_box(p);
                pool.free(p).unwrap();
            })
        });
        g.bench_with_input(
            BenchmarkId::new("nativemem_quantum", size),
            &size,
            |b, &size| {
                b.iter(|| {
                    let p = qpool.allocate(size, 16).unwrap();
                    black_box(p);
                    qpool.free(p).unwrap();
                })
            },
        );
    }
    g.finish();
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

criterion_group! { name = benches; config = config(); targets = grow_shrink, allocate_free }
criterion_main!(benches);

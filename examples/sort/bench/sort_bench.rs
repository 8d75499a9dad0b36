//! Times the external sort with accounting on and off.
//!
//! ```text
//! cargo run --release -p nativemem-examples --example sort_bench -- [KEYS] [BUFFER_MIB] [DIR]
//! ```
//!
//! Sorts `KEYS` pseudo-random keys (default 10,000,000) with a buffer limit of `BUFFER_MIB`
//! (default 16) in both modes: `Pool` (chunks allocated through a pool whose limit is the buffer
//! plus room for the merge read buffers) and `Untracked` (system allocator, same code, same
//! buffer limit). Spill files go under `DIR` (default: the system temp dir). Checks that the
//! output is sorted and complete and that the manager closes with no leak.
//!
//! The sorter reaches its manager through the engine ABI, as in a Spark task; without a JVM the
//! table comes from `nativemem-provider` linked into this binary (a dev-dependency) and the manager
//! from `Api::create_manager` (no listener: unlimited, like a task with memory to spare).

use std::time::Instant;

use nativemem_client::{sys, Api, ManagerOptions, TaskPool};
use nativemem_examples::{Accounting, ExternalSorter, SorterOptions};

const MIB: u64 = 1 << 20;
const BATCH_KEYS: usize = 64 << 10;

/// Deterministic pseudo-random keys (splitmix64), generated batch by batch.
struct Keys(u64);

impl Keys {
    fn fill(&mut self, out: &mut [i64]) {
        for k in out {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            *k = (z ^ (z >> 31)) as i64;
        }
    }
}

fn run(api: Api, keys: u64, buffer_mib: u64, dir: &std::path::Path, accounting: Accounting) {
    let manager = api
        .create_manager("bench", ManagerOptions::default(), None)
        .expect("manager");
    let pool =
        TaskPool::open(api, manager.handle(), "sort", Some((buffer_mib + 8) * MIB)).expect("pool");
    let options = SorterOptions::default()
        .with_accounting(accounting)
        .with_max_buffer_bytes(Some(buffer_mib * MIB));
    let sorter = ExternalSorter::new(&pool, "sort", dir, options).expect("sorter");

    let mut gen = Keys(2026);
    let mut batch = vec![0i64; BATCH_KEYS];
    let (mut sum_in, mut left) = (0i64, keys);
    let started = Instant::now();
    let mut generating = std::time::Duration::ZERO;
    while left > 0 {
        let n = left.min(BATCH_KEYS as u64) as usize;
        let t = Instant::now();
        gen.fill(&mut batch[..n]);
        generating += t.elapsed();
        sum_in = batch[..n].iter().fold(sum_in, |s, k| s.wrapping_add(*k));
        sorter.insert(&batch[..n]).expect("insert");
        left -= n as u64;
    }
    let inserted = started.elapsed() - generating;

    let merge_started = Instant::now();
    let mut out = sorter.sorted();
    let (mut count, mut sum_out, mut prev) = (0u64, 0i64, i64::MIN);
    while out.next_batch_into(&mut batch).expect("merge") {
        assert!(batch[0] >= prev, "batches out of order");
        assert!(batch.windows(2).all(|w| w[0] <= w[1]), "batch not sorted");
        prev = *batch.last().expect("non-empty batch");
        count += batch.len() as u64;
        sum_out = batch.iter().fold(sum_out, |s, k| s.wrapping_add(*k));
    }
    let merged = merge_started.elapsed();
    assert_eq!((count, sum_out), (keys, sum_in), "output incomplete");
    let stats = out.stats();
    drop(out);
    drop(pool);
    let leaks = manager.close().expect("close");
    println!(
        "{:<9} {} keys, buffer {} MiB: insert+spill {:.3} s, merge {:.3} s, total {:.3} s | {} | leaked: {} B",
        format!("{accounting:?}"),
        keys,
        buffer_mib,
        inserted.as_secs_f64(),
        merged.as_secs_f64(),
        (inserted + merged).as_secs_f64(),
        stats,
        leaks.leaked_bytes
    );
}

fn main() {
    // SAFETY: the provider's table is a static of the linked library.
    let api = unsafe { Api::from_ptr(nativemem_provider::api(sys::NM_ABI_VERSION)) }
        .expect("nativemem table");
    let mut args = std::env::args().skip(1);
    let keys: u64 = args.next().map_or(10_000_000, |a| a.parse().expect("KEYS"));
    let buffer_mib: u64 = args.next().map_or(16, |a| a.parse().expect("BUFFER_MIB"));
    let dir = args.next().map_or_else(std::env::temp_dir, Into::into);
    let dir = dir.join(format!("nativemem-sort-bench-{}", std::process::id()));
    // The first mode a process runs pays its cold start (page faults, malloc's dynamic mmap
    // threshold, a new spill directory); scripts/bench.sh alternates the order with this.
    let modes = match std::env::var("SORT_BENCH_ORDER").as_deref() {
        Ok("untracked-first") => [Accounting::Untracked, Accounting::Pool],
        _ => [Accounting::Pool, Accounting::Untracked],
    };
    for accounting in modes {
        run(api, keys, buffer_mib, &dir, accounting);
    }
    std::fs::remove_dir(&dir).expect("spill dir left non-empty");
}

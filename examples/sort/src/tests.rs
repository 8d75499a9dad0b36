//! Scenario tests of the external sort: one scenario per test, memory and files checked after.
//!
//! Managers come from the provider's table (`Api::create_manager`) over a test listener. Spark
//! asking the task for memory back has no engine-ABI function: those scenarios make the manager
//! spill through another consumer of the task (a `Competitor`) whose grow does not fit the task's
//! limits, on another thread or inside a listener upcall.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use nativemem_client::{BoxError, Listener, ManagerOptions, ManagerStats, OwnedManager, TaskPool};
use nativemem_core::human;
use parking_lot::Mutex;

use crate::sort::registered_spillers;
use crate::testing::{api, manager_with, Competitor, TestListener};
use crate::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Deterministic pseudo-random keys over the whole `i64` range (splitmix64).
fn random_keys(n: usize, seed: u64) -> Vec<i64> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) as i64
        })
        .collect()
}

/// Exact accounting (quantum 0, opt-in: the default is the 1 MiB quantum). The scenarios are
/// sized in 64 KiB chunks against pool and task limits of a few chunks (below one default
/// quantum), and check through the pools' used and peak that the sorter gives back every byte
/// and never holds more than it may. The default quantum is exercised by the crate's doc example
/// (`lib.rs`), the Spark jobs and `bench/sort_bench.rs`.
fn exact() -> ManagerOptions {
    ManagerOptions {
        reservation_quantum: 0,
        ..ManagerOptions::default()
    }
}

fn manager() -> (OwnedManager, Arc<TestListener>) {
    let listener = TestListener::unlimited();
    let m = manager_with("task-7", exact(), listener.clone());
    (m, listener)
}

/// The pool at `path` of `m` (created with `limit` if new).
fn pool(m: &OwnedManager, path: &str, limit: Option<u64>) -> TaskPool {
    TaskPool::open(api(), m.handle(), path, limit).unwrap()
}

fn used(pool: &TaskPool) -> u64 {
    pool.stats().unwrap().used
}

fn peak(pool: &TaskPool) -> u64 {
    pool.stats().unwrap().peak
}

/// The manager's read-outs, under a lease taken for the call.
fn task_stats(m: &OwnedManager) -> ManagerStats {
    m.acquire().unwrap().stats().unwrap()
}

/// Small chunks keep the tests fast while still making many chunks and runs.
fn small_chunks() -> SorterOptions {
    SorterOptions::default()
        .with_chunk_bytes(64 * KIB as usize)
        .with_batch_keys(10_000)
        .with_read_buffer_bytes(16 * KIB as usize)
        .with_write_buffer_bytes(32 * KIB as usize)
}

fn insert_all(sorter: &ExternalSorter, keys: &[i64], batch: usize) {
    for b in keys.chunks(batch) {
        sorter.insert(b).unwrap();
    }
}

fn drain(batches: SortedBatches) -> Vec<i64> {
    let mut out = Vec::new();
    for batch in batches {
        out.extend(batch.unwrap());
    }
    out
}

fn sorted_copy(keys: &[i64]) -> Vec<i64> {
    let mut v = keys.to_vec();
    v.sort_unstable();
    v
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// The manager gave everything back: nothing used, nothing live, no leak at close. (No
/// allocation is live when nothing is used: the ABI refuses empty allocations. After the close
/// the manager is gone: that it reserves nothing any more shows as the listener holding 0.)
fn assert_all_returned(m: OwnedManager, pool: &TaskPool, listener: &TestListener) {
    assert_eq!(used(pool), 0, "pool still charged");
    assert_eq!(task_stats(&m).used, 0, "task still charged");
    assert_eq!(
        registered_spillers(m.handle()),
        0,
        "spiller still registered"
    );
    let report = m.close().unwrap();
    assert_eq!(report.leaked_bytes, 0, "{}", report.report);
    assert_eq!(listener.reserved(), 0);
}

#[test]
fn small_inputs_sort_like_sort_unstable() {
    let (m, l) = manager();
    let pool = pool(&m, "sort", None);
    let dir = tempfile::tempdir().unwrap();
    // Sizes around the chunk boundary (8 Ki keys per 64 KiB chunk) and batch boundary (10,000).
    for (i, n) in [1usize, 2, 3, 17, 1000, 8191, 8192, 8193, 10_000, 20_001]
        .into_iter()
        .enumerate()
    {
        let mut input = random_keys(n, i as u64);
        input.extend([i64::MIN, i64::MAX, 0, -1]);
        let sorter = ExternalSorter::new(&pool, "sort", dir.path(), small_chunks()).unwrap();
        insert_all(&sorter, &input, 777);
        assert_eq!(sorter.stats().rows_inserted, input.len() as u64);
        assert_eq!(sorter.stats().runs, 0);
        let out = drain(sorter.sorted());
        assert_eq!(out, sorted_copy(&input), "n = {n}");
        assert_eq!(used(&pool), 0);
    }
    assert_eq!(files_in(dir.path()), 0);
    assert_all_returned(m, &pool, &l);
}

#[test]
fn empty_input_yields_no_batch() {
    let (m, l) = manager();
    let pool = pool(&m, "sort", None);
    let dir = tempfile::tempdir().unwrap();
    let sorter = ExternalSorter::new(&pool, "sort", dir.path(), small_chunks()).unwrap();
    sorter.insert(&[]).unwrap();
    assert_eq!(used(&pool), 0, "an empty batch allocates nothing");
    assert_eq!(sorter.spill().unwrap(), 0);
    let mut out = sorter.sorted();
    assert!(out.next().is_none());
    assert!(out.next().is_none());
    assert_eq!(out.stats().rows_output, 0);
    drop(out);
    assert_all_returned(m, &pool, &l);
}

#[test]
fn all_equal_keys_come_out_complete() {
    let (m, l) = manager();
    let pool = pool(&m, "sort", Some(3 * 64 * KIB));
    let dir = tempfile::tempdir().unwrap();
    let sorter = ExternalSorter::new(&pool, "sort", dir.path(), small_chunks()).unwrap();
    let input = vec![42i64; 100_000];
    insert_all(&sorter, &input, 4096);
    assert!(sorter.stats().runs > 0);
    let out = drain(sorter.sorted());
    assert_eq!(out, input);
    assert_all_returned(m, &pool, &l);
}

#[test]
fn batches_hold_at_most_batch_keys() {
    let (m, l) = manager();
    let pool = pool(&m, "sort", None);
    let dir = tempfile::tempdir().unwrap();
    let options = small_chunks().with_batch_keys(1000);
    let sorter = ExternalSorter::new(&pool, "sort", dir.path(), options).unwrap();
    let input = random_keys(10_500, 3);
    insert_all(&sorter, &input, 10_500);
    let sizes: Vec<usize> = sorter.sorted().map(|b| b.unwrap().len()).collect();
    assert_eq!(sizes.len(), 11);
    assert!(sizes[..10].iter().all(|&s| s == 1000));
    assert_eq!(sizes[10], 500);
    assert_all_returned(m, &pool, &l);
}

#[test]
fn forced_spills_under_a_three_chunk_pool_limit() {
    let (m, l) = manager();
    // Default options: 1 MiB chunks; the pool holds 3 of them.
    let pool = pool(&m, "sort", Some(3 * MIB));
    let dir = tempfile::tempdir().unwrap();
    let sorter = ExternalSorter::new(&pool, "sort", dir.path(), SorterOptions::default()).unwrap();
    let input = random_keys(1_000_000, 7); // 7.6 MiB of keys
    insert_all(&sorter, &input, 65_536);
    let stats = sorter.stats();
    assert!(stats.runs >= 2, "{stats}");
    assert_eq!(files_in(dir.path()) as u64, stats.runs);
    assert_eq!(stats.bytes_spilled, stats.rows_spilled * 8);
    assert!(stats.peak_memory_bytes <= 3 * MIB, "{stats}");
    assert!(peak(&pool) <= 3 * MIB);
    assert!(stats.spill_time.as_nanos() > 0);
    let mut out = sorter.sorted();
    let mut keys = Vec::new();
    let mut batch = Vec::new();
    while out.next_batch_into(&mut batch).unwrap() {
        keys.extend_from_slice(&batch);
    }
    assert_eq!(keys, sorted_copy(&input));
    assert_eq!(out.stats().rows_output, input.len() as u64);
    assert_eq!(files_in(dir.path()), 0, "runs deleted once merged");
    assert_eq!(used(&pool), 0, "chunks freed once merged");
    drop(out);
    assert!(task_stats(&m).spill_count > 0);
    assert_all_returned(m, &pool, &l);
}

#[test]
fn merge_buffers_that_do_not_fit_spill_the_buffer_first() {
    let (m, l) = manager();
    let pool = pool(&m, "sort", Some(3 * 64 * KIB));
    let dir = tempfile::tempdir().unwrap();
    let sorter = ExternalSorter::new(&pool, "sort", dir.path(), small_chunks()).unwrap();
    // Three pool-fulls: two runs on disk and a full in-memory buffer at the end.
    let input = random_keys(3 * 8192 * 2 + 3 * 8192, 11);
    insert_all(&sorter, &input, 8192);
    let runs_before = sorter.stats().runs;
    assert_eq!(used(&pool), 3 * 64 * KIB, "buffer fills the pool");
    let out = sorter.sorted();
    assert_eq!(
        out.stats().runs,
        runs_before + 1,
        "buffer written as one more run"
    );
    assert_eq!(drain(out), sorted_copy(&input));
    assert_all_returned(m, &pool, &l);
}

/// 3 chunks of 64 KiB; merge read buffers of 64 KiB at most.
fn many_runs_sorter(dir: &Path) -> (OwnedManager, Arc<TestListener>, TaskPool, ExternalSorter) {
    let (m, l) = manager();
    let pool = pool(&m, "sort", Some(3 * 64 * KIB));
    let options = small_chunks().with_read_buffer_bytes(64 * KIB as usize);
    let sorter = ExternalSorter::new(&pool, "sort", dir, options).unwrap();
    (m, l, pool, sorter)
}

#[test]
fn many_runs_shrink_the_merge_read_buffers_to_fit_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let (m, l, pool, sorter) = many_runs_sorter(dir.path());
    // 17 pool-fulls: 16 runs and a full buffer; 17 read buffers of 64 KiB would need 1 MiB.
    let input = random_keys(17 * 3 * 8192, 53);
    insert_all(&sorter, &input, 8192);
    assert_eq!(sorter.stats().runs, 16);
    let out = sorter.sorted();
    assert_eq!(out.stats().runs, 17, "buffer written as one more run");
    assert_eq!(used(&pool), 17 * 8 * KIB, "read buffers shrunk to 8 KiB");
    assert_eq!(drain(out), sorted_copy(&input));
    assert!(peak(&pool) <= 3 * 64 * KIB);
    assert_all_returned(m, &pool, &l);
}

#[test]
fn too_many_runs_for_the_pool_fail_the_merge_with_out_of_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (m, l, pool, sorter) = many_runs_sorter(dir.path());
    // 25 runs: even 8 KiB read buffers need 200 KiB, more than the pool's 192 KiB.
    insert_all(&sorter, &random_keys(25 * 3 * 8192, 59), 8192);
    let mut out = sorter.sorted();
    let err = out.next().unwrap().unwrap_err();
    assert!(err.is_out_of_memory(), "{err}");
    assert!(out.next().is_none());
    assert_eq!(files_in(dir.path()), 0);
    drop(out);
    assert_all_returned(m, &pool, &l);
}

#[test]
fn a_pool_smaller_than_one_chunk_fails_with_out_of_memory() {
    let (m, l) = manager();
    let pool = pool(&m, "sort", Some(32 * KIB));
    let dir = tempfile::tempdir().unwrap();
    let sorter = ExternalSorter::new(&pool, "sort", dir.path(), small_chunks()).unwrap();
    let err = sorter.insert(&[1, 2, 3]).unwrap_err();
    assert!(err.is_out_of_memory(), "{err}");
    assert!(err.to_string().contains("root/sort"), "{err}");
    assert_eq!(sorter.stats().rows_inserted, 0);
    assert_eq!(used(&pool), 0);
    drop(sorter);
    assert_all_returned(m, &pool, &l);
}

#[test]
fn a_failed_spill_keeps_the_keys_in_memory() {
    let (m, l) = manager();
    let pool = pool(&m, "sort", Some(3 * 64 * KIB));
    let dir = tempfile::tempdir().unwrap();
    let spill_dir = dir.path().join("spill");
    let sorter = ExternalSorter::new(&pool, "sort", &spill_dir, small_chunks()).unwrap();
    let input = random_keys(100_000, 5);
    std::fs::remove_dir(&spill_dir).unwrap();
    let mut failed = None;
    for b in input.chunks(1000) {
        if let Err(e) = sorter.insert(b) {
            failed = Some(e);
            break;
        }
    }
    let err = failed.expect("a spill into a missing directory fails");
    assert!(err.to_string().contains("create spill file"), "{err}");
    // Every key inserted so far is still there: resume after them.
    let done = sorter.stats().rows_inserted as usize;
    assert!(done >= 3 * 8192 - 1000, "{done}");
    std::fs::create_dir(&spill_dir).unwrap();
    insert_all(&sorter, &input[done..], 1000);
    assert!(sorter.stats().runs > 0);
    assert_eq!(drain(sorter.sorted()), sorted_copy(&input));
    assert_eq!(files_in(&spill_dir), 0);
    assert_all_returned(m, &pool, &l);
}

/// Clears the flag when dropped, so a helper thread looping on it stops even if the test panics
/// (a scope would otherwise wait for it forever).
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Inserts 250 fresh 1000-key batches while another thread spills; after the first 200 waits
/// until `spills()` shows that one landed, so at least one spill comes between inserts (more race
/// with them). Returns the keys inserted.
fn insert_racing_spills(sorter: &ExternalSorter, spills: impl Fn() -> u64) -> Vec<i64> {
    let mut input = Vec::new();
    for seed in 0..250 {
        if seed == 200 {
            let started = std::time::Instant::now();
            while spills() == 0 {
                assert!(started.elapsed().as_secs() < 60, "no spill landed");
                thread::yield_now();
            }
        }
        let batch = random_keys(1000, seed);
        sorter.insert(&batch).unwrap();
        input.extend(batch);
    }
    input
}

/// Another consumer of the task asks for `bytes` again and again on another thread while `insert`
/// runs on this one; returns what `insert` returned and how many of the asks were granted.
fn with_competitor_asking<T>(m: &OwnedManager, bytes: u64, insert: impl FnOnce() -> T) -> (T, u64) {
    let competitor = Competitor::new(m.handle());
    let inserting = AtomicBool::new(true);
    let granted = AtomicU64::new(0);
    let out = thread::scope(|s| {
        s.spawn(|| {
            while inserting.load(Ordering::SeqCst) {
                // Refused when the sorter has nothing to spill right now: asked again.
                if competitor.demand(bytes).is_ok() {
                    granted.fetch_add(1, Ordering::SeqCst);
                }
                thread::yield_now();
            }
        });
        let _stop = ClearOnDrop(&inserting);
        insert()
    });
    (out, granted.into_inner())
}

#[test]
fn spill_requested_by_another_thread_while_inserting() {
    // The task may use 2 MiB: once the sorter holds about 1 MiB, another consumer's 1 MiB makes
    // the manager spill it (on that consumer's thread, or on ours when we need the next chunk).
    let l = TestListener::unlimited();
    let options = ManagerOptions {
        reservation_block: None,
        task_limit: Some(2 * MIB),
        ..exact()
    };
    let m = manager_with("task-7", options, l.clone());
    let pool = pool(&m, "sort", None);
    let dir = tempfile::tempdir().unwrap();
    let sorter = ExternalSorter::new(&pool, "sort", dir.path(), small_chunks()).unwrap();
    let (input, granted) = with_competitor_asking(&m, MIB, || {
        insert_racing_spills(&sorter, || sorter.stats().runs)
    });
    let stats = sorter.stats();
    assert!(stats.runs > 0, "{stats}");
    assert!(granted > 0);
    // What the manager counts as spilled is what the sorter's spills freed.
    let task = task_stats(&m);
    assert!(task.spill_count > 0 && task.spilled_bytes > 0, "{task:?}");
    assert_eq!(task.spilled_bytes % (64 * KIB), 0, "whole chunks: {task:?}");
    assert_eq!(drain(sorter.sorted()), sorted_copy(&input));
    assert_eq!(files_in(dir.path()), 0);
    assert_all_returned(m, &pool, &l);
}

#[test]
fn reclaim_by_another_thread_while_inserting_hands_memory_back() {
    // Spark's share for the task is 2 MiB, reserved in 64 KiB blocks: another consumer's 1 MiB
    // makes the manager spill the sorter and hand surplus back to the listener.
    let l = TestListener::new(2 * MIB);
    let options = ManagerOptions {
        reservation_block: Some(64 * KIB),
        task_limit: None,
        ..exact()
    };
    let m = manager_with("task-7", options, l.clone());
    let pool = pool(&m, "sort", None);
    let dir = tempfile::tempdir().unwrap();
    let sorter = ExternalSorter::new(&pool, "sort", dir.path(), small_chunks()).unwrap();
    let (input, _granted) = with_competitor_asking(&m, MIB, || {
        insert_racing_spills(&sorter, || task_stats(&m).spill_count)
    });
    assert!(l.given_back() > 0);
    assert!(sorter.stats().runs > 0);
    assert_eq!(l.reserved(), task_stats(&m).reserved);
    assert_eq!(drain(sorter.sorted()), sorted_copy(&input));
    assert_all_returned(m, &pool, &l);
}

/// The task may use 4 MiB; the listener's spills ask for all but 512 KiB of it.
const UPCALL_TASK_LIMIT: u64 = 4 * MIB;
const UPCALL_DEMAND: u64 = UPCALL_TASK_LIMIT - 512 * KIB;

/// A listener that, like Spark's `TaskMemoryManager`, spills consumers of the same task while
/// serving a reservation: on another thread that it waits for, or on the calling thread. (Here
/// through another consumer whose grow does not fit beside the sorter's buffer.)
struct SpillingListener {
    inner: Arc<TestListener>,
    /// The other consumer and the manager's handle, once made.
    competitor: Mutex<Option<(Arc<Competitor>, i64)>>,
    on_other_thread: bool,
    /// Set while the competitor asks: its own grow calls this listener too.
    asking: AtomicBool,
    freed: AtomicU64,
}

impl Listener for SpillingListener {
    fn reserve(&self, bytes: u64) -> Result<u64, BoxError> {
        let competitor = self.competitor.lock().clone();
        if let Some((c, m)) = competitor {
            if !self.asking.swap(true, Ordering::SeqCst) {
                let spilled =
                    || -> Result<u64, BoxError> { Ok(api().acquire(m)?.stats()?.spilled_bytes) };
                let before = spilled()?;
                let asked = if self.on_other_thread {
                    thread::spawn(move || c.demand(UPCALL_DEMAND))
                        .join()
                        .unwrap()
                } else {
                    c.demand(UPCALL_DEMAND)
                };
                self.asking.store(false, Ordering::SeqCst);
                asked?;
                self.freed.fetch_add(spilled()? - before, Ordering::SeqCst);
            }
        }
        self.inner.reserve(bytes)
    }

    fn unreserve(&self, bytes: u64) -> Result<(), BoxError> {
        self.inner.unreserve(bytes)
    }
}

fn spill_inside_listener_upcalls(on_other_thread: bool) {
    let listener = Arc::new(SpillingListener {
        inner: TestListener::unlimited(),
        competitor: Mutex::new(None),
        on_other_thread,
        asking: AtomicBool::new(false),
        freed: AtomicU64::new(0),
    });
    let options = ManagerOptions {
        reservation_block: Some(64 * KIB),
        task_limit: Some(UPCALL_TASK_LIMIT),
        ..exact()
    };
    let m = manager_with("task-7", options, listener.clone());
    *listener.competitor.lock() = Some((Arc::new(Competitor::new(m.handle())), m.handle()));
    let pool = pool(&m, "sort", None);
    let dir = tempfile::tempdir().unwrap();
    let sorter = ExternalSorter::new(&pool, "sort", dir.path(), small_chunks()).unwrap();
    let input = random_keys(200_000, 19);
    insert_all(&sorter, &input, 5000);
    // Break the manager -> listener -> competitor cycle before checking.
    listener.competitor.lock().take();
    assert!(listener.freed.load(Ordering::SeqCst) > 0);
    assert!(sorter.stats().runs > 0);
    assert_eq!(drain(sorter.sorted()), sorted_copy(&input));
    assert_eq!(files_in(dir.path()), 0);
    assert_eq!(used(&pool), 0);
    assert_eq!(m.close().unwrap().leaked_bytes, 0);
    assert_eq!(listener.inner.reserved(), 0);
}

#[test]
fn spill_on_another_thread_inside_a_listener_upcall_does_not_deadlock() {
    spill_inside_listener_upcalls(true);
}

#[test]
fn reclaim_on_the_inserting_thread_inside_a_listener_upcall() {
    spill_inside_listener_upcalls(false);
}

#[test]
fn concurrent_inserts_are_all_sorted() {
    let (m, l) = manager();
    // Each of the 4 inserting threads may hold a chunk it is filling outside the buffer (not
    // spillable yet): with 4 chunks of room all could be held so, and the next one refused with
    // nothing to spill. One chunk more than the threads always leaves room to make progress.
    let pool = pool(&m, "sort", Some(5 * 64 * KIB));
    let dir = tempfile::tempdir().unwrap();
    let sorter = ExternalSorter::new(&pool, "sort", dir.path(), small_chunks()).unwrap();
    let inputs: Vec<Vec<i64>> = (0..4).map(|i| random_keys(50_000, 100 + i)).collect();
    thread::scope(|s| {
        for input in &inputs {
            let sorter = &sorter;
            s.spawn(move || insert_all(sorter, input, 777));
        }
    });
    assert!(sorter.stats().runs > 0);
    let all: Vec<i64> = inputs.concat();
    assert_eq!(drain(sorter.sorted()), sorted_copy(&all));
    assert_all_returned(m, &pool, &l);
}

#[test]
fn temp_files_are_removed_when_the_output_is_dropped_part_way() {
    let (m, l) = manager();
    let pool = pool(&m, "sort", Some(3 * 64 * KIB));
    let dir = tempfile::tempdir().unwrap();
    let sorter = ExternalSorter::new(&pool, "sort", dir.path(), small_chunks()).unwrap();
    insert_all(&sorter, &random_keys(100_000, 23), 4096);
    let runs = sorter.stats().runs;
    assert!(runs > 1);
    let mut out = sorter.sorted();
    let first = out.next().unwrap().unwrap();
    assert_eq!(first.len(), 10_000);
    assert!(files_in(dir.path()) > 0, "runs still being merged");
    assert!(used(&pool) > 0, "merge buffers and chunks held");
    drop(out);
    assert_eq!(files_in(dir.path()), 0);
    assert_all_returned(m, &pool, &l);
}

#[test]
fn temp_files_are_removed_when_the_sorter_is_dropped_unsorted() {
    let (m, l) = manager();
    let pool = pool(&m, "sort", Some(3 * 64 * KIB));
    let dir = tempfile::tempdir().unwrap();
    let sorter = ExternalSorter::new(&pool, "sort", dir.path(), small_chunks()).unwrap();
    insert_all(&sorter, &random_keys(100_000, 29), 4096);
    assert!(files_in(dir.path()) > 0);
    assert_eq!(registered_spillers(m.handle()), 1);
    drop(sorter);
    assert_eq!(files_in(dir.path()), 0);
    assert_all_returned(m, &pool, &l);
}

#[test]
fn a_truncated_run_is_reported_as_corrupt() {
    let (m, l) = manager();
    let pool = pool(&m, "sort", Some(3 * 64 * KIB));
    let dir = tempfile::tempdir().unwrap();
    let sorter = ExternalSorter::new(&pool, "sort", dir.path(), small_chunks()).unwrap();
    insert_all(&sorter, &random_keys(100_000, 31), 4096);
    let run = std::fs::read_dir(dir.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(run.path())
        .unwrap();
    file.set_len(8 * 1000 + 3).unwrap();
    let results: Vec<Result<Vec<i64>>> = sorter.sorted().collect();
    let err = results.last().unwrap().as_ref().unwrap_err();
    assert!(matches!(err, SortError::CorruptRun { .. }), "{err}");
    assert!(results[..results.len() - 1].iter().all(|r| r.is_ok()));
    assert_eq!(files_in(dir.path()), 0);
    assert_all_returned(m, &pool, &l);
}

#[test]
fn untracked_mode_charges_nothing_and_spills_by_its_own_limit() {
    let (m, l) = manager();
    let pool = pool(&m, "sort", None);
    let dir = tempfile::tempdir().unwrap();
    let options = small_chunks()
        .with_accounting(Accounting::Untracked)
        .with_max_buffer_bytes(Some(3 * 64 * KIB));
    let sorter = ExternalSorter::new(&pool, "sort", dir.path(), options).unwrap();
    assert_eq!(
        registered_spillers(m.handle()),
        0,
        "an untracked sorter registers no spiller"
    );
    let input = random_keys(100_000, 37);
    insert_all(&sorter, &input, 4096);
    let stats = sorter.stats();
    let task = task_stats(&m);
    assert_eq!((used(&pool), task.used, task.peak), (0, 0, 0));
    assert!(stats.runs > 0);
    assert!(stats.memory_bytes > 0 && stats.peak_memory_bytes <= 3 * 64 * KIB);
    assert_eq!(drain(sorter.sorted()), sorted_copy(&input));
    assert_eq!(files_in(dir.path()), 0);
    assert_all_returned(m, &pool, &l);
}

#[test]
fn max_buffer_bytes_spills_before_the_pool_limit() {
    let (m, l) = manager();
    let pool = pool(&m, "sort", None);
    let dir = tempfile::tempdir().unwrap();
    let options = small_chunks().with_max_buffer_bytes(Some(2 * 64 * KIB));
    let sorter = ExternalSorter::new(&pool, "sort", dir.path(), options).unwrap();
    let input = random_keys(50_000, 41);
    insert_all(&sorter, &input, 4096);
    assert!(sorter.stats().runs > 0);
    assert!(peak(&pool) <= 2 * 64 * KIB);
    assert_eq!(drain(sorter.sorted()), sorted_copy(&input));
    assert_all_returned(m, &pool, &l);
}

#[test]
fn a_closed_manager_fails_operations_and_drop_is_safe() {
    let (m, l) = manager();
    let pool = pool(&m, "sort", None);
    let dir = tempfile::tempdir().unwrap();
    let sorter = ExternalSorter::new(&pool, "sort", dir.path(), small_chunks()).unwrap();
    sorter.insert(&random_keys(10_000, 43)).unwrap();
    // The sorter is not attached to the manager: its two chunks are leaks, freed by the close.
    let report = m.close().unwrap();
    assert_eq!(report.leaked_bytes, 2 * 64 * KIB, "{}", report.report);
    let err = sorter.insert(&[1]).unwrap_err();
    assert!(err.is_closed(), "{err}");
    assert!(sorter.spill().is_err());
    let mut out = sorter.sorted();
    assert!(matches!(out.next(), Some(Err(ref e)) if e.is_closed()));
    assert!(out.next().is_none());
    drop(out);
    // The manager is gone; what it held went back to the listener.
    assert_eq!(l.reserved(), 0);
}

#[test]
fn output_that_failed_keeps_failing_instead_of_ending_early() {
    let (m, _l) = manager();
    let pool = pool(&m, "sort", None);
    let dir = tempfile::tempdir().unwrap();
    let options = small_chunks().with_batch_keys(1000);
    let sorter = ExternalSorter::new(&pool, "sort", dir.path(), options).unwrap();
    sorter.insert(&random_keys(10_000, 47)).unwrap();
    let mut out = sorter.sorted();
    let mut batch = Vec::new();
    assert!(out.next_batch_into(&mut batch).unwrap());
    m.close().unwrap();
    assert!(matches!(
        out.next_batch_into(&mut batch),
        Err(ref e) if e.is_closed()
    ));
    // A caller that catches the error and asks again must not see a clean end of output.
    let again = out.next_batch_into(&mut batch).unwrap_err();
    assert!(matches!(again, SortError::Unusable { .. }), "{again}");
    assert!(batch.is_empty());
}

#[test]
fn invalid_options_are_rejected() {
    let (m, _l) = manager();
    let pool = pool(&m, "", None);
    let dir = tempfile::tempdir().unwrap();
    let bad = [
        SorterOptions::default().with_chunk_bytes(0),
        SorterOptions::default().with_chunk_bytes(12),
        SorterOptions::default().with_batch_keys(0),
        SorterOptions::default().with_read_buffer_bytes(4),
        SorterOptions::default().with_write_buffer_bytes(0),
        SorterOptions::default().with_max_buffer_bytes(Some(1024)),
    ];
    for options in bad {
        let err = ExternalSorter::new(&pool, "sort", dir.path(), options.clone()).unwrap_err();
        assert!(
            matches!(err, SortError::InvalidArgument(_)),
            "{options:?}: {err}"
        );
    }
    assert_eq!(registered_spillers(m.handle()), 0);
}

#[test]
fn stats_display_in_human_units() {
    let stats = SorterStats {
        rows_inserted: 1_000_000,
        peak_memory_bytes: 3 * MIB,
        bytes_spilled: 8_000_000,
        runs: 3,
        spill_time: std::time::Duration::from_millis(250),
        ..SorterStats::default()
    };
    assert_eq!(
        stats.to_string(),
        format!(
            "rows 1000000, peak memory {}, spilled {} in 3 runs (0.250 s)",
            human(3 * MIB),
            human(8_000_000)
        )
    );
}

/// Timing run: `cargo test --release -p nativemem-examples -- --ignored --nocapture`.
#[test]
#[ignore]
fn ten_million_keys_with_forced_spills() {
    for accounting in [Accounting::Pool, Accounting::Untracked] {
        let (m, _l) = manager();
        // 16 MiB of buffer (forced spills: 80 MB of keys), room for the merge read buffers.
        let pool = pool(&m, "sort", Some(24 * MIB));
        let dir = tempfile::tempdir().unwrap();
        let options = SorterOptions::default()
            .with_accounting(accounting)
            .with_max_buffer_bytes(Some(16 * MIB));
        let input = random_keys(10_000_000, 47);
        let started = std::time::Instant::now();
        let sorter = ExternalSorter::new(&pool, "sort", dir.path(), options).unwrap();
        insert_all(&sorter, &input, 65_536);
        let inserted = started.elapsed();
        let mut out = sorter.sorted();
        let (mut n, mut prev, mut batch) = (0u64, i64::MIN, Vec::new());
        while out.next_batch_into(&mut batch).unwrap() {
            assert!(batch[0] >= prev && batch.windows(2).all(|w| w[0] <= w[1]));
            prev = *batch.last().unwrap();
            n += batch.len() as u64;
        }
        assert_eq!(n, input.len() as u64);
        println!(
            "{accounting:?}: 10M keys in {:.2} s (insert+spill {:.2} s): {}",
            started.elapsed().as_secs_f64(),
            inserted.as_secs_f64(),
            out.stats()
        );
    }
}

//! Leaks counted, not estimated, through the C ABI: this binary installs a counting global
//! allocator (live blocks and bytes of the process) and checks that N complete manager lives
//! driven through the `nm_api` table give back every block and every byte of the provider.
//!
//! One `#[test]` in its own binary: the count is per process, so no other test may run beside it.
//!
//! A life: `manager_create` (a C listener) → `acquire` → `pool_open` at depth 1 to 4 (one with a
//! limit) → reservations grown, shrunk, resized, freed, force-grown and -shrunk, closed → a grow
//! refused (its error message made and freed) → allocations made and freed → spillers that
//! re-enter the table, one spilled by `manager_spill`, one unregistered, one left to the close →
//! attached state, one detached, one dropped by the close → `manager_stats`, `usage_report`,
//! `manager_reclaim` → `pool_close` → `release` → `manager_close` (which finds a leaked
//! reservation and a leaked allocation; its report is freed). Every other life also closes while
//! another thread holds a lease (close waits, then the lease is released).
//!
//! Steady state: the handle tables keep their slot storage once grown (capacity, not a leak:
//! freed slots are reused), and a thread's first calls set up its thread-locals. The warm-up
//! runs both kinds of life first, so the tables have reached the size one life needs; the
//! assertion after that is exact.

mod common;

use std::ptr;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread;

use common::*;

#[global_allocator]
static ALLOCATOR: nativemem_testkit::CountingAllocator = nativemem_testkit::CountingAllocator;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Asserts `NM_OK` of an ABI call made with a message pointer.
macro_rules! call {
    ($what:literal, |$err:ident| $body:expr) => {{
        let mut $err = ptr::null_mut();
        // SAFETY: every call passes valid arguments and out pointers.
        let status = unsafe { $body };
        ok($what, status, $err);
    }};
}

/// One manager's life (see the module docs); returns the bytes its close reported as leaked.
fn life(threaded_close: bool) -> u64 {
    let a = api();
    let listener = TestListener::new(32 * MIB);
    let m = create(cstr!("leaks"), MIB, &listener);
    let mut lease = 0;
    call!("acquire", |e| (a.acquire)(m, &mut lease, &mut e));

    // Pools at depth 1..4; the last with a limit.
    let mut pools = Vec::new();
    for (path, limit) in [
        (cstr!("scan"), -1),
        (cstr!("scan/arrow"), -1),
        (cstr!("join/build/hash"), -1),
        (cstr!("join/build/hash/probe"), (4 * MIB) as i64),
    ] {
        let mut p = 0;
        call!("pool_open", |e| (a.pool_open)(
            lease, path, limit, &mut p, &mut e
        ));
        pools.push(p);
    }
    let (scan, arrow, hash, probe) = (pools[0], pools[1], pools[2], pools[3]);
    let mut stats = NmPoolStats::default();
    call!("pool_stats", |e| (a.pool_stats)(probe, &mut stats, &mut e));
    assert_eq!(stats.limit, (4 * MIB) as i64);

    // Reservations.
    let new_res = |pool, name| {
        let mut r = 0;
        call!("reservation_new", |e| (a.reservation_new)(
            pool, name, &mut r, &mut e
        ));
        r
    };
    let r1 = new_res(scan, cstr!("Scan[0]"));
    call!("try_grow", |e| (a.reservation_try_grow)(
        r1,
        3 * MIB + 17,
        &mut e
    ));
    call!("shrink", |e| (a.reservation_shrink)(r1, MIB, &mut e));
    call!("try_resize", |e| (a.reservation_try_resize)(
        r1,
        2 * MIB,
        &mut e
    ));
    let mut size = 0;
    call!("size", |e| (a.reservation_size)(r1, &mut size, &mut e));
    assert_eq!(size, 2 * MIB);
    let r2 = new_res(probe, cstr!("Probe[1]"));
    call!("force_grow", |e| (a.reservation_force_grow)(
        r2,
        MIB,
        ptr::null_mut(),
        &mut e
    ));
    call!("force_shrink", |e| (a.reservation_force_shrink)(
        r2,
        MIB,
        ptr::null_mut(),
        &mut e
    ));
    // Refused by the pool limit: an out-of-memory error with its message (the usage report).
    let mut err = ptr::null_mut();
    // SAFETY: valid arguments.
    let status = unsafe { (a.reservation_try_grow)(r2, 5 * MIB, &mut err) };
    assert_eq!(status, NM_ERR_OUT_OF_MEMORY);
    assert!(take_message(err).contains("probe"));
    // An over-release: refused with a message.
    let mut err = ptr::null_mut();
    // SAFETY: valid arguments.
    let status = unsafe { (a.reservation_shrink)(r2, 1, &mut err) };
    assert_eq!(status, NM_ERR_INVALID_ARGUMENT);
    take_message(err);
    let mut freed = 0;
    call!("free", |e| (a.reservation_free)(r1, &mut freed, &mut e));
    assert_eq!(freed, 2 * MIB);
    call!("try_grow", |e| (a.reservation_try_grow)(
        r1,
        5 * MIB,
        &mut e
    ));
    call!("reservation_close", |e| (a.reservation_close)(r2, &mut e));

    // Allocations: one freed, one leaked to the close.
    let mut p1 = ptr::null_mut();
    call!("allocate", |e| (a.allocate)(
        arrow, 4096, 64, &mut p1, &mut e
    ));
    let mut p2 = ptr::null_mut();
    call!("allocate", |e| (a.allocate)(
        probe, 1000, 0, &mut p2, &mut e
    ));
    let mut freed_size = 0;
    call!("free", |e| (a.free)(scan, p1, &mut freed_size, &mut e));
    assert_eq!(freed_size, 4096);

    // Spillers (their callbacks re-enter the table): one spilled, one unregistered, one left.
    let spillers: Vec<_> = (0..3)
        .map(|_| {
            let r = new_res(hash, cstr!("Hash"));
            call!("try_grow", |e| (a.reservation_try_grow)(r, MIB, &mut e));
            let s = TestSpiller::new(r);
            let vt = s.vtable();
            let mut h = 0;
            call!("spiller_register", |e| (a.spiller_register)(
                hash,
                cstr!("hash"),
                &vt,
                &mut h,
                &mut e
            ));
            (s, h, r)
        })
        .collect();
    let mut spilled = 0;
    call!("manager_spill", |e| (a.manager_spill)(
        lease,
        MIB,
        &mut spilled,
        &mut e
    ));
    assert_eq!(spilled, MIB);
    call!("spiller_unregister", |e| (a.spiller_unregister)(
        spillers[1].1,
        &mut e
    ));
    for (_, _, r) in &spillers[..2] {
        call!("reservation_close", |e| (a.reservation_close)(*r, &mut e));
    }

    // Attached state: one detached (its drop run), one given back, one left to the close.
    let states: Vec<_> = (0..3)
        .map(|_| {
            let s = TestState::new();
            let mut h = 0;
            call!("attach", |e| (a.attach)(
                lease,
                s.raw(),
                Some(state_drop),
                &mut h,
                &mut e
            ));
            (s, h)
        })
        .collect();
    call!("detach", |e| (a.detach)(states[0].1, 1, &mut e));
    call!("detach", |e| (a.detach)(states[1].1, 0, &mut e));
    // Detached without its drop: the state is ours again.
    // SAFETY: the reference `raw` made for this attach, given back by detach(run_drop = 0).
    unsafe { TestState::reclaim(std::sync::Arc::as_ptr(&states[1].0) as *mut _) };

    // Read-outs and Spark's reclaim.
    let mut mstats = NmManagerStats::default();
    call!("manager_stats", |e| (a.manager_stats)(
        lease,
        &mut mstats,
        &mut e
    ));
    assert!(mstats.used >= 6 * MIB);
    let mut report = ptr::null_mut();
    call!("usage_report", |e| (a.usage_report)(
        lease,
        &mut report,
        &mut e
    ));
    assert!(take_message(report).contains("root/join/build/hash/probe"));
    let mut returned = 0;
    call!("manager_reclaim", |e| (a.manager_reclaim)(
        lease,
        64 * MIB,
        &mut returned,
        &mut e
    ));

    for p in [arrow, hash] {
        call!("pool_close", |e| (a.pool_close)(p, &mut e));
    }

    let mut leaked = 0;
    let mut text = ptr::null_mut();
    if threaded_close {
        // Another thread holds a lease while this one closes: close waits for its release.
        let (acquired_tx, acquired_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let holder = thread::spawn(move || {
            let a = api();
            let mut l = 0;
            call!("acquire", |e| (a.acquire)(m, &mut l, &mut e));
            acquired_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            thread::sleep(std::time::Duration::from_millis(1));
            call!("release", |e| (a.release)(l, &mut e));
        });
        acquired_rx.recv().unwrap();
        call!("release", |e| (a.release)(lease, &mut e));
        go_tx.send(()).unwrap();
        call!("manager_close", |e| (a.manager_close)(
            m,
            &mut text,
            &mut leaked,
            &mut e
        ));
        holder.join().unwrap();
    } else {
        call!("release", |e| (a.release)(lease, &mut e));
        call!("manager_close", |e| (a.manager_close)(
            m,
            &mut text,
            &mut leaked,
            &mut e
        ));
    }
    assert!(take_message(text).contains("leaked"));

    assert_eq!(listener.held(), 0, "the listener got every byte back");
    assert_eq!(
        listener.drops.load(Ordering::SeqCst),
        1,
        "the listener was dropped once"
    );
    for (s, _, _) in &spillers {
        assert_eq!(
            s.drops.load(Ordering::SeqCst),
            1,
            "every spiller dropped once"
        );
    }
    assert_eq!(states[0].0.drops.load(Ordering::SeqCst), 1);
    assert_eq!(states[1].0.drops.load(Ordering::SeqCst), 0);
    assert_eq!(
        states[2].0.drops.load(Ordering::SeqCst),
        1,
        "dropped by the close"
    );
    leaked
}

#[test]
fn manager_lives_through_the_c_abi_free_every_block() {
    for _ in 0..3 {
        life(false);
        life(true);
    }
    let before = live();
    const LIVES: u64 = 200;
    let mut leaked = 0;
    for i in 0..LIVES {
        leaked += life(i % 2 == 1);
    }
    let after = live();
    // The leaks each close found and freed: r1 (5 MiB) and the raw block (1000 bytes); the
    // third spiller's reservation was emptied by `manager_reclaim`, which spills.
    assert_eq!(leaked, LIVES * (5 * MIB + 1000));
    assert_eq!(
        after,
        before,
        "live (blocks, bytes) after {LIVES} manager lives through the C ABI: {} blocks and {} \
         bytes not freed ({} bytes per manager)",
        after.0 - before.0,
        after.1 - before.1,
        (after.1 - before.1) / LIVES as i64
    );
}

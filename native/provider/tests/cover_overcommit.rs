//! `manager_cover_overcommit`: after a forced grow past the task limit, the listener (Spark)
//! reserves the over-commit at once, whatever the limit; a listener that grants part leaves the
//! rest over-committed; with nothing over-committed it grants 0 and calls no one; stale, forged
//! and wrong-kind handles are refused with their codes (nothing changes).

mod common;

use std::ptr;
use std::sync::atomic::Ordering;

use common::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// A manager with `listener`, 1 MiB blocks and a `limit` task limit, leased, with a reservation
/// of its root pool.
fn setup(listener: &std::sync::Arc<TestListener>, limit: u64) -> Objects {
    let a = api();
    let vt = listener.vtable();
    let mut o = Objects::default();
    let mut err = ptr::null_mut();
    // SAFETY: valid arguments and out pointers, for each call.
    let status = unsafe {
        (a.manager_create)(
            cstr!("cover"),
            MIB,
            limit as i64,
            &vt,
            &mut o.manager,
            &mut err,
        )
    };
    ok("manager_create", status, err);
    // SAFETY: as above.
    let status = unsafe { (a.acquire)(o.manager, &mut o.lease, &mut err) };
    ok("acquire", status, err);
    // SAFETY: as above.
    let status = unsafe { (a.pool_open)(o.lease, cstr!(""), -1, &mut o.pool, &mut err) };
    ok("pool_open", status, err);
    // SAFETY: as above.
    let status = unsafe { (a.reservation_new)(o.pool, cstr!("op"), &mut o.r, &mut err) };
    ok("reservation_new", status, err);
    o
}

#[derive(Default)]
struct Objects {
    manager: nm_manager,
    lease: nm_lease,
    pool: nm_pool,
    r: nm_reservation,
}

fn force_grow(r: nm_reservation, bytes: u64) -> u64 {
    let (mut over, mut err) = (0, ptr::null_mut());
    // SAFETY: valid out pointers.
    let status = unsafe { (api().reservation_force_grow)(r, bytes, &mut over, &mut err) };
    ok("reservation_force_grow", status, err);
    over
}

fn stats(lease: nm_lease) -> NmManagerStats {
    let (mut s, mut err) = (NmManagerStats::default(), ptr::null_mut());
    // SAFETY: valid out pointers.
    let status = unsafe { (api().manager_stats)(lease, &mut s, &mut err) };
    ok("manager_stats", status, err);
    s
}

/// `manager_cover_overcommit(lease)`: the status, the bytes granted and the message.
fn cover(lease: nm_lease) -> (nm_status, u64, String) {
    let (mut granted, mut err) = (u64::MAX, ptr::null_mut());
    // SAFETY: valid out pointers.
    let status = unsafe { (api().manager_cover_overcommit)(lease, &mut granted, &mut err) };
    (status, granted, take_message(err))
}

fn teardown(o: &Objects) {
    let a = api();
    let mut err = ptr::null_mut();
    // SAFETY: handles of this test; valid out pointers.
    let status = unsafe { (a.reservation_close)(o.r, &mut err) };
    ok("reservation_close", status, err);
    // SAFETY: as above.
    let status = unsafe { (a.release)(o.lease, &mut err) };
    ok("release", status, err);
    let mut leaked = u64::MAX;
    // SAFETY: as above.
    let status = unsafe { (a.manager_close)(o.manager, ptr::null_mut(), &mut leaked, &mut err) };
    ok("manager_close", status, err);
    assert_eq!(leaked, 0);
}

#[test]
fn table_has_it() {
    let a = api();
    let end = std::mem::offset_of!(NmApi, manager_cover_overcommit) + 8;
    assert!(
        a.struct_size as usize >= end,
        "struct_size {}",
        a.struct_size
    );
}

#[test]
fn a_forced_grow_past_the_task_limit_is_reserved_from_the_listener_at_once() {
    let listener = TestListener::new(64 * MIB);
    let o = setup(&listener, 4 * MIB);

    // Nothing over-committed: grants 0 and does not call the listener.
    let calls = listener.reserve_calls.load(Ordering::SeqCst);
    let (status, granted, msg) = cover(o.lease);
    assert_eq!((status, granted), (NM_OK, 0), "{msg}");
    assert_eq!(listener.reserve_calls.load(Ordering::SeqCst), calls);

    // 10 MiB forced into a task limited to 4 MiB: Spark holds none of it yet.
    let over = force_grow(o.r, 10 * MIB);
    assert_eq!(over, 10 * MIB);
    let before = stats(o.lease);
    assert_eq!(before.used, 10 * MIB);
    assert!(before.reserved < before.used, "{before:?}");
    assert!(listener.held() < 10 * MIB, "{}", listener.held());

    let (status, granted, msg) = cover(o.lease);
    assert_eq!(status, NM_OK, "{msg}");
    assert!(granted >= 10 * MIB - before.reserved, "granted {granted}");
    let after = stats(o.lease);
    assert!(after.reserved >= after.used, "{after:?}");
    assert!(
        listener.held() >= 10 * MIB,
        "listener holds {}",
        listener.held()
    );
    assert_eq!(listener.held(), after.reserved);

    // Covered: a second call has nothing to do.
    let (status, granted, msg) = cover(o.lease);
    assert_eq!((status, granted), (NM_OK, 0), "{msg}");

    // NULL `granted` is allowed.
    force_grow(o.r, 2 * MIB);
    // SAFETY: NULL out pointers are allowed (header).
    let status =
        unsafe { (api().manager_cover_overcommit)(o.lease, ptr::null_mut(), ptr::null_mut()) };
    assert_eq!(status, NM_OK);
    let s = stats(o.lease);
    assert!(s.reserved >= s.used && s.used == 12 * MIB, "{s:?}");

    teardown(&o);
    assert_eq!(listener.held(), 0);
    assert_eq!(listener.unreserve_errors.load(Ordering::SeqCst), 0);
}

#[test]
fn what_the_listener_does_not_grant_stays_over_committed() {
    let listener = TestListener::new(3 * MIB);
    let o = setup(&listener, 2 * MIB);
    force_grow(o.r, 8 * MIB);
    let (status, granted, msg) = cover(o.lease);
    assert_eq!(status, NM_OK, "{msg}");
    assert_eq!(listener.held(), 3 * MIB);
    assert!(granted <= 3 * MIB && granted > 0, "granted {granted}");
    let s = stats(o.lease);
    assert_eq!((s.used, s.reserved), (8 * MIB, 3 * MIB));
    teardown(&o);
    assert_eq!(listener.held(), 0);
}

#[test]
fn bad_handles_are_refused_with_their_codes() {
    let listener = TestListener::new(64 * MIB);
    let o = setup(&listener, 4 * MIB);
    force_grow(o.r, 6 * MIB);
    let held = listener.held();

    // 0, made up, and handles of other kinds (a pool, a reservation, the manager itself).
    for bad in [0, 12345, u64::MAX, o.pool, o.r, o.manager] {
        let (status, granted, msg) = cover(bad);
        assert_eq!(status, NM_ERR_INVALID_HANDLE, "handle {bad:#x}: {msg}");
        assert!(!msg.is_empty());
        assert_eq!(granted, u64::MAX, "out untouched on failure");
    }
    assert_eq!(listener.held(), held, "a refused call reserved nothing");

    // A released lease is stale.
    let mut other = 0;
    let mut err = ptr::null_mut();
    // SAFETY: valid out pointers.
    let status = unsafe { (api().acquire)(o.manager, &mut other, &mut err) };
    ok("acquire", status, err);
    // SAFETY: a lease of this test.
    let status = unsafe { (api().release)(other, &mut err) };
    ok("release", status, err);
    let (status, _, msg) = cover(other);
    assert_eq!(status, NM_ERR_STALE_HANDLE, "{msg}");
    assert_eq!(listener.held(), held);

    teardown(&o);
    // After close the lease is stale too.
    let (status, _, msg) = cover(o.lease);
    assert_eq!(status, NM_ERR_STALE_HANDLE, "{msg}");
}

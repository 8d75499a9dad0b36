//! A grow refused with `NM_ERR_OUT_OF_MEMORY` after the listener granted part of it keeps the
//! grant as cushion (the header's `reservation_try_grow`): `reserved` rises by what Spark
//! granted, nothing is charged, and the next grow that fits uses the grant without an upcall.

mod common;

use std::ptr;
use std::sync::atomic::Ordering;

use common::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn stats(lease: nm_lease) -> NmManagerStats {
    let mut s = NmManagerStats::default();
    let mut err = ptr::null_mut();
    // SAFETY: valid out pointers.
    ok(
        "manager_stats",
        unsafe { (api().manager_stats)(lease, &mut s, &mut err) },
        err,
    );
    s
}

#[test]
fn a_refused_grow_keeps_the_partial_grant_as_cushion() {
    let a = api();
    // Spark has 1.5 MiB for the task; the grow asks for 2 MiB.
    let listener = TestListener::new(MIB + MIB / 2);
    let m = create(cstr!("partial"), MIB, &listener);
    let (mut lease, mut pool, mut r) = (0, 0, 0);
    let mut err = ptr::null_mut();
    // SAFETY (all calls): valid arguments and out pointers.
    unsafe {
        ok("acquire", (a.acquire)(m, &mut lease, &mut err), err);
        ok(
            "pool_open",
            (a.pool_open)(lease, cstr!("op"), -1, &mut pool, &mut err),
            err,
        );
        ok(
            "reservation_new",
            (a.reservation_new)(pool, cstr!("r"), &mut r, &mut err),
            err,
        );
        assert_eq!(
            (a.reservation_try_grow)(r, 2 * MIB, &mut err),
            NM_ERR_OUT_OF_MEMORY
        );
        take_message(err);
    }
    let s = stats(lease);
    assert_eq!(
        (s.used, s.reserved),
        (0, MIB + MIB / 2),
        "the grant stays as cushion"
    );
    assert_eq!(listener.held(), MIB + MIB / 2);
    assert_eq!(listener.reserve_calls.load(Ordering::SeqCst), 1);
    // SAFETY (all calls): valid arguments and out pointers.
    unsafe {
        ok("try_grow", (a.reservation_try_grow)(r, MIB, &mut err), err);
    }
    assert_eq!(stats(lease).used, MIB);
    assert_eq!(
        listener.reserve_calls.load(Ordering::SeqCst),
        1,
        "no new upcall"
    );
    let mut leaked = 0;
    // SAFETY (all calls): valid arguments and out pointers.
    unsafe {
        ok("reservation_close", (a.reservation_close)(r, &mut err), err);
        ok("release", (a.release)(lease, &mut err), err);
        ok(
            "manager_close",
            (a.manager_close)(m, ptr::null_mut(), &mut leaked, &mut err),
            err,
        );
    }
    assert_eq!((leaked, listener.held()), (0, 0));
}

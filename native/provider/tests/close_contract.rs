//! Close is a contract, checked per function of `nm_api`: for every field of the table, the
//! status it returns (a) while the manager's close waits for a lease held on another thread and
//! (b) after the close, compared with the table `include/nativemem.h` documents next to
//! `manager_close` (and `abi.rs`'s module docs). A test checks that the table below names every
//! field of `NmApi` exactly once, by offset, so a function appended to the ABI without a row
//! fails here.
//!
//! The scenario: this thread holds a lease and has made one object of each kind; a second thread
//! calls `manager_close`, which waits for the lease. Once close is visibly under way, every
//! function is called with those handles (`release` last: it is what close waits for); then the
//! close returns and every function is called again with the same, now stale, handles.

mod common;

use std::ffi::c_void;
use std::mem::{offset_of, size_of};
use std::ptr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// The handles the calls use. During close they are live; after it, stale.
struct Objects {
    manager: nm_manager,
    lease: nm_lease,
    pool: nm_pool,
    /// Pool handle closed during close (`pool_close`).
    spare_pool: nm_pool,
    /// Reservation the refused calls use (it holds bytes: reported as a leak by the close).
    work: nm_reservation,
    /// Reservations given back during close.
    shrunk: nm_reservation,
    freed: nm_reservation,
    force_shrunk: nm_reservation,
    closed: nm_reservation,
    /// Allocation freed during close.
    block: *mut c_void,
    spiller: nm_spiller,
    state: nm_state,
}

/// What the documented contract says of one call in one phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Allowed: must succeed.
    Ok,
    /// Refused with this code.
    Refused(nm_status),
    /// `free_message` returns nothing: it must just not crash.
    Void,
}

use Expect::*;

type Call = fn(&NmApi, &Objects) -> nm_status;

/// One row per field of `NmApi`: its offset, the outcome during close and after close, and the
/// call. Order: the table's.
fn rows() -> Vec<(&'static str, usize, Expect, Expect, Call)> {
    const STALE: Expect = Refused(NM_ERR_STALE_HANDLE);
    const CLOSED: Expect = Refused(NM_ERR_CLOSED);
    vec![
        (
            "free_message",
            offset_of!(NmApi, free_message),
            Void,
            Void,
            |a, _| {
                // SAFETY: NULL is ignored (header contract).
                unsafe { (a.free_message)(ptr::null_mut()) };
                NM_OK
            },
        ),
        (
            "acquire",
            offset_of!(NmApi, acquire),
            STALE,
            STALE,
            |a, o| {
                let mut lease = 0;
                // SAFETY: valid out pointer.
                unsafe { (a.acquire)(o.manager, &mut lease, ptr::null_mut()) }
            },
        ),
        ("release", offset_of!(NmApi, release), Ok, STALE, |a, o| {
            // SAFETY: a lease handle (live or stale).
            unsafe { (a.release)(o.lease, ptr::null_mut()) }
        }),
        (
            "manager_stats",
            offset_of!(NmApi, manager_stats),
            CLOSED,
            STALE,
            |a, o| {
                let mut stats = NmManagerStats::default();
                // SAFETY: valid out pointer.
                unsafe { (a.manager_stats)(o.lease, &mut stats, ptr::null_mut()) }
            },
        ),
        (
            "usage_report",
            offset_of!(NmApi, usage_report),
            CLOSED,
            STALE,
            |a, o| {
                let mut report = ptr::null_mut();
                // SAFETY: valid out pointer.
                let status = unsafe { (a.usage_report)(o.lease, &mut report, ptr::null_mut()) };
                take_message(report);
                status
            },
        ),
        (
            "pool_open",
            offset_of!(NmApi, pool_open),
            CLOSED,
            STALE,
            |a, o| {
                let mut pool = 0;
                // SAFETY: valid arguments and out pointer.
                let status = unsafe {
                    (a.pool_open)(o.lease, cstr!("engine/new"), -1, &mut pool, ptr::null_mut())
                };
                if status == NM_OK {
                    // SAFETY: the handle just opened.
                    unsafe { (a.pool_close)(pool, ptr::null_mut()) };
                }
                status
            },
        ),
        (
            "pool_close",
            offset_of!(NmApi, pool_close),
            Ok,
            STALE,
            |a, o| {
                // SAFETY: a pool handle.
                unsafe { (a.pool_close)(o.spare_pool, ptr::null_mut()) }
            },
        ),
        (
            "pool_stats",
            offset_of!(NmApi, pool_stats),
            CLOSED,
            STALE,
            |a, o| {
                let mut stats = NmPoolStats::default();
                // SAFETY: valid out pointer.
                unsafe { (a.pool_stats)(o.pool, &mut stats, ptr::null_mut()) }
            },
        ),
        (
            "reservation_new",
            offset_of!(NmApi, reservation_new),
            CLOSED,
            STALE,
            |a, o| {
                let mut r = 0;
                // SAFETY: valid arguments and out pointer.
                let status =
                    unsafe { (a.reservation_new)(o.pool, cstr!("late"), &mut r, ptr::null_mut()) };
                if status == NM_OK {
                    // SAFETY: the handle just made.
                    unsafe { (a.reservation_close)(r, ptr::null_mut()) };
                }
                status
            },
        ),
        (
            "reservation_try_grow",
            offset_of!(NmApi, reservation_try_grow),
            CLOSED,
            STALE,
            |a, o| {
                // SAFETY: a reservation handle.
                unsafe { (a.reservation_try_grow)(o.work, KIB, ptr::null_mut()) }
            },
        ),
        (
            "reservation_shrink",
            offset_of!(NmApi, reservation_shrink),
            Ok,
            STALE,
            |a, o| {
                // SAFETY: a reservation handle.
                unsafe { (a.reservation_shrink)(o.shrunk, 10 * KIB, ptr::null_mut()) }
            },
        ),
        (
            "reservation_try_resize",
            offset_of!(NmApi, reservation_try_resize),
            CLOSED,
            STALE,
            |a, o| {
                // SAFETY: a reservation handle.
                unsafe { (a.reservation_try_resize)(o.work, 2 * MIB, ptr::null_mut()) }
            },
        ),
        (
            "reservation_size",
            offset_of!(NmApi, reservation_size),
            CLOSED,
            STALE,
            |a, o| {
                let mut size = 0;
                // SAFETY: valid out pointer.
                unsafe { (a.reservation_size)(o.work, &mut size, ptr::null_mut()) }
            },
        ),
        (
            "pool_spill_written",
            offset_of!(NmApi, pool_spill_written),
            CLOSED,
            STALE,
            // SAFETY: a pool handle (checked by the callee); no pointer argument.
            |a, o| unsafe { (a.pool_spill_written)(o.pool, MIB, ptr::null_mut()) },
        ),
        (
            "reservation_peak",
            offset_of!(NmApi, reservation_peak),
            CLOSED,
            STALE,
            |a, o| {
                let mut peak = 0;
                // SAFETY: valid out pointer.
                unsafe { (a.reservation_peak)(o.work, &mut peak, ptr::null_mut()) }
            },
        ),
        (
            "reservation_free",
            offset_of!(NmApi, reservation_free),
            Ok,
            STALE,
            |a, o| {
                let mut freed = 0;
                // SAFETY: valid out pointer.
                let status = unsafe { (a.reservation_free)(o.freed, &mut freed, ptr::null_mut()) };
                if status == NM_OK {
                    assert_eq!(freed, 100 * KIB, "reservation_free gives back what it held");
                }
                status
            },
        ),
        (
            "reservation_close",
            offset_of!(NmApi, reservation_close),
            Ok,
            STALE,
            |a, o| {
                // SAFETY: a reservation handle.
                unsafe { (a.reservation_close)(o.closed, ptr::null_mut()) }
            },
        ),
        (
            "allocate",
            offset_of!(NmApi, allocate),
            CLOSED,
            STALE,
            |a, o| {
                let mut p = ptr::null_mut();
                // SAFETY: valid out pointer.
                let status = unsafe { (a.allocate)(o.pool, 64, 0, &mut p, ptr::null_mut()) };
                if status == NM_OK {
                    // SAFETY: the block just allocated.
                    unsafe { (a.free)(o.pool, p, ptr::null_mut(), ptr::null_mut()) };
                } else {
                    assert!(p.is_null(), "a failed allocate leaves *out NULL");
                }
                status
            },
        ),
        ("free", offset_of!(NmApi, free), Ok, STALE, |a, o| {
            let mut size = 0;
            // SAFETY: a block of this pool's manager, or a stale pool (refused before the pointer
            // is looked at).
            let status = unsafe { (a.free)(o.pool, o.block, &mut size, ptr::null_mut()) };
            if status == NM_OK {
                assert_eq!(size, 4096);
            }
            status
        }),
        (
            "spiller_register",
            offset_of!(NmApi, spiller_register),
            CLOSED,
            STALE,
            |a, o| {
                let s = TestSpiller::new(o.work);
                let vt = s.vtable();
                let mut h = 0;
                // SAFETY: valid arguments and out pointer.
                let status = unsafe {
                    (a.spiller_register)(o.pool, cstr!("late"), &vt, &mut h, ptr::null_mut())
                };
                if status == NM_OK {
                    // SAFETY: the handle just registered.
                    unsafe { (a.spiller_unregister)(h, ptr::null_mut()) };
                } else {
                    // SAFETY: a failed registration leaves ctx ours.
                    unsafe { TestSpiller::reclaim_ctx(&vt) };
                    assert_eq!(
                        s.drops.load(Ordering::SeqCst),
                        0,
                        "drop(ctx) ran on a failure"
                    );
                }
                status
            },
        ),
        (
            "spiller_unregister",
            offset_of!(NmApi, spiller_unregister),
            Ok,
            STALE,
            |a, o| {
                // SAFETY: a spiller handle.
                unsafe { (a.spiller_unregister)(o.spiller, ptr::null_mut()) }
            },
        ),
        (
            "attach",
            offset_of!(NmApi, attach),
            CLOSED,
            STALE,
            |a, o| {
                let st = TestState::new();
                let raw = st.raw();
                let mut h = 0;
                // SAFETY: valid arguments and out pointer.
                let status =
                    unsafe { (a.attach)(o.lease, raw, Some(state_drop), &mut h, ptr::null_mut()) };
                if status == NM_OK {
                    // SAFETY: the handle just attached.
                    unsafe { (a.detach)(h, 1, ptr::null_mut()) };
                } else {
                    // SAFETY: a failed attach leaves the state ours.
                    unsafe { TestState::reclaim(raw) };
                    assert_eq!(
                        st.drops.load(Ordering::SeqCst),
                        0,
                        "drop(state) ran on a failure"
                    );
                }
                status
            },
        ),
        ("detach", offset_of!(NmApi, detach), Ok, STALE, |a, o| {
            // SAFETY: a state handle; run_drop: the drop runs now.
            unsafe { (a.detach)(o.state, 1, ptr::null_mut()) }
        }),
        (
            "manager_create",
            offset_of!(NmApi, manager_create),
            Ok,
            Ok,
            |a, _| {
                // Another manager: unaffected by this one's close.
                let mut m = 0;
                // SAFETY: valid arguments (NULL listener: unlimited) and out pointer.
                let status = unsafe {
                    (a.manager_create)(cstr!("other"), 0, -1, ptr::null(), &mut m, ptr::null_mut())
                };
                assert_eq!(status, NM_OK);
                // SAFETY: the manager just made.
                unsafe { (a.manager_close)(m, ptr::null_mut(), ptr::null_mut(), ptr::null_mut()) }
            },
        ),
        (
            "manager_close",
            offset_of!(NmApi, manager_close),
            STALE,
            STALE,
            |a, o| {
                // SAFETY: valid (NULL) out pointers.
                unsafe {
                    (a.manager_close)(o.manager, ptr::null_mut(), ptr::null_mut(), ptr::null_mut())
                }
            },
        ),
        (
            "manager_spill",
            offset_of!(NmApi, manager_spill),
            CLOSED,
            STALE,
            |a, o| {
                let mut freed = 0;
                // SAFETY: valid out pointer.
                unsafe { (a.manager_spill)(o.lease, MIB, &mut freed, ptr::null_mut()) }
            },
        ),
        (
            "manager_reclaim",
            offset_of!(NmApi, manager_reclaim),
            CLOSED,
            STALE,
            |a, o| {
                let mut returned = 0;
                // SAFETY: valid out pointer.
                unsafe { (a.manager_reclaim)(o.lease, MIB, &mut returned, ptr::null_mut()) }
            },
        ),
        (
            "manager_cover_overcommit",
            offset_of!(NmApi, manager_cover_overcommit),
            CLOSED,
            STALE,
            |a, o| {
                let mut granted = 0;
                // SAFETY: valid out pointer.
                unsafe { (a.manager_cover_overcommit)(o.lease, &mut granted, ptr::null_mut()) }
            },
        ),
        (
            "reservation_force_grow",
            offset_of!(NmApi, reservation_force_grow),
            CLOSED,
            STALE,
            |a, o| {
                // SAFETY: a reservation handle.
                unsafe { (a.reservation_force_grow)(o.work, KIB, ptr::null_mut(), ptr::null_mut()) }
            },
        ),
        (
            "reservation_force_shrink",
            offset_of!(NmApi, reservation_force_shrink),
            Ok,
            STALE,
            |a, o| {
                let mut released = 0;
                // SAFETY: valid out pointer.
                let status = unsafe {
                    (a.reservation_force_shrink)(
                        o.force_shrunk,
                        10 * KIB,
                        &mut released,
                        ptr::null_mut(),
                    )
                };
                if status == NM_OK {
                    assert_eq!(released, 10 * KIB);
                }
                status
            },
        ),
        (
            "manager_create_with",
            offset_of!(NmApi, manager_create_with),
            Ok,
            Ok,
            |a, _| {
                // Another manager: unaffected by this one's close.
                let options = NmManagerOptions {
                    reservation_block: MIB,
                    ..NmManagerOptions::default()
                };
                let mut m = 0;
                // SAFETY: valid arguments (NULL listener: unlimited) and out pointer.
                let status = unsafe {
                    (a.manager_create_with)(
                        cstr!("other"),
                        &options,
                        ptr::null(),
                        &mut m,
                        ptr::null_mut(),
                    )
                };
                assert_eq!(status, NM_OK);
                // SAFETY: the manager just made.
                unsafe { (a.manager_close)(m, ptr::null_mut(), ptr::null_mut(), ptr::null_mut()) }
            },
        ),
        (
            "trim_hook_register",
            offset_of!(NmApi, trim_hook_register),
            Ok,
            Ok,
            |a, _| trim_hook_round_trip(a),
        ),
        (
            "trim_hook_unregister",
            offset_of!(NmApi, trim_hook_unregister),
            Ok,
            Ok,
            |a, _| trim_hook_round_trip(a),
        ),
    ]
}

/// The trim hooks are process-wide, unaffected by a manager's close: one registered and
/// unregistered; the status of the unregister.
fn trim_hook_round_trip(a: &NmApi) -> nm_status {
    let mut id = 0;
    // SAFETY: a valid function, no ctx, no drop, a valid out pointer.
    let status = unsafe {
        (a.trim_hook_register)(
            Some(no_trim),
            ptr::null_mut(),
            None,
            &mut id,
            ptr::null_mut(),
        )
    };
    assert_eq!(status, NM_OK);
    // SAFETY: the id just returned.
    unsafe { (a.trim_hook_unregister)(id, ptr::null_mut()) }
}

/// A trim hook that frees nothing (for the close contract rows of the trim hooks).
unsafe extern "C" fn no_trim(_ctx: *mut std::ffi::c_void) -> u64 {
    0
}

#[test]
fn the_contract_table_names_every_function_of_the_table_once() {
    let ptr_size = size_of::<usize>();
    let first = offset_of!(NmApi, free_message);
    let slots = (size_of::<NmApi>() - first) / ptr_size;
    let mut offsets: Vec<usize> = rows().iter().map(|r| r.1).collect();
    offsets.sort_unstable();
    let expected: Vec<usize> = (0..slots).map(|k| first + k * ptr_size).collect();
    assert_eq!(
        offsets, expected,
        "every function pointer of NmApi has exactly one row (a new function needs its close \
         contract here and in the header)"
    );
    assert_eq!(first + slots * ptr_size, size_of::<NmApi>());
}

/// Makes the objects on `manager` with a fresh lease.
fn make_objects(
    manager: nm_manager,
    spiller: &Arc<TestSpiller>,
    state: &Arc<TestState>,
) -> Objects {
    let a = api();
    let mut err = ptr::null_mut();
    let mut lease = 0;
    // SAFETY (all calls of this function): valid arguments and out pointers.
    ok(
        "acquire",
        unsafe { (a.acquire)(manager, &mut lease, &mut err) },
        err,
    );
    let open = |path| {
        let mut p = 0;
        let mut err = ptr::null_mut();
        ok(
            "pool_open",
            unsafe { (a.pool_open)(lease, path, -1, &mut p, &mut err) },
            err,
        );
        p
    };
    let pool = open(cstr!("engine/op"));
    let spare_pool = open(cstr!("engine/spare"));
    let reservation = |bytes| {
        let mut r = 0;
        let mut err = ptr::null_mut();
        ok(
            "reservation_new",
            unsafe { (a.reservation_new)(pool, cstr!("r"), &mut r, &mut err) },
            err,
        );
        ok(
            "try_grow",
            unsafe { (a.reservation_try_grow)(r, bytes, &mut err) },
            err,
        );
        r
    };
    let work = reservation(MIB);
    let shrunk = reservation(10 * KIB);
    let freed = reservation(100 * KIB);
    let force_shrunk = reservation(10 * KIB);
    let closed = reservation(10 * KIB);
    let mut block = ptr::null_mut();
    ok(
        "allocate",
        unsafe { (a.allocate)(pool, 4096, 64, &mut block, &mut err) },
        err,
    );
    let vt = spiller.vtable();
    let mut sh = 0;
    ok(
        "spiller_register",
        unsafe { (a.spiller_register)(pool, cstr!("s"), &vt, &mut sh, &mut err) },
        err,
    );
    let mut st = 0;
    ok(
        "attach",
        unsafe { (a.attach)(lease, state.raw(), Some(state_drop), &mut st, &mut err) },
        err,
    );
    Objects {
        manager,
        lease,
        pool,
        spare_pool,
        work,
        shrunk,
        freed,
        force_shrunk,
        closed,
        block,
        spiller: sh,
        state: st,
    }
}

fn check(phase: &str, name: &str, expect: Expect, status: nm_status) {
    match expect {
        Ok => assert_eq!(status, NM_OK, "{phase}: {name} must be allowed"),
        Refused(code) => assert_eq!(status, code, "{phase}: {name} must be refused with {code}"),
        Void => {}
    }
}

#[test]
fn every_function_during_and_after_close_returns_the_documented_code() {
    let a = api();
    let listener = TestListener::new(64 * MIB);
    let manager = create(cstr!("contract"), MIB, &listener);
    let spiller = TestSpiller::new(0);
    let state = TestState::new();
    let objects = make_objects(manager, &spiller, &state);

    // Close on another thread: it waits for this thread's lease.
    let closer = thread::spawn(move || {
        let mut leaked = 0;
        let mut report = ptr::null_mut();
        let mut err = ptr::null_mut();
        // SAFETY: valid out pointers.
        let status = unsafe { (api().manager_close)(manager, &mut report, &mut leaked, &mut err) };
        (status, take_message(err), take_message(report), leaked)
    });
    // Close is under way once a call on a pool is refused (it sets CLOSING before waiting).
    let started = Instant::now();
    loop {
        let mut stats = NmPoolStats::default();
        // SAFETY: valid out pointer.
        if unsafe { (a.pool_stats)(objects.pool, &mut stats, ptr::null_mut()) } == NM_ERR_CLOSED {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "close did not start"
        );
        thread::sleep(Duration::from_millis(1));
    }

    let rows = rows();
    let mut failures = Vec::new();
    for (name, _, during, _, call) in rows.iter().filter(|r| r.0 != "release") {
        let status = call(a, &objects);
        if *during != Void && status != expect_code(*during) {
            failures.push(format!(
                "during close: {name} returned {status}, documented {during:?}"
            ));
        }
    }
    assert!(!closer.is_finished(), "close must still wait for the lease");
    assert_eq!(
        spiller.drops.load(Ordering::SeqCst),
        1,
        "unregistered during close: dropped once"
    );
    assert_eq!(
        state.drops.load(Ordering::SeqCst),
        1,
        "detached during close: dropped once"
    );
    let (_, _, during_release, _, release) = rows.iter().find(|r| r.0 == "release").unwrap();
    check(
        "during close",
        "release",
        *during_release,
        release(a, &objects),
    );

    let (status, err, report, leaked) = closer.join().unwrap();
    assert_eq!(status, NM_OK, "close: {err}");

    for (name, _, _, after, call) in &rows {
        let status = call(a, &objects);
        if *after != Void && status != expect_code(*after) {
            failures.push(format!(
                "after close: {name} returned {status}, documented {after:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(spiller.drops.load(Ordering::SeqCst), 1);
    assert_eq!(state.drops.load(Ordering::SeqCst), 1);
    // Only `work` (1 MiB) was still held: the give-backs during close released theirs.
    assert_eq!(leaked, MIB, "leak report: {report}");
    assert_eq!(listener.held(), 0, "the listener got every byte back");
    assert_eq!(listener.drops.load(Ordering::SeqCst), 1);
}

fn expect_code(e: Expect) -> nm_status {
    match e {
        Ok | Void => NM_OK,
        Refused(code) => code,
    }
}

/// A lease held while close waits keeps the manager from closing, not from *closing*: the calls
/// on it that would start new work (a new pool handle, new attached state, a spill) are refused
/// with `NM_ERR_CLOSED`, never answered `NM_OK` while close waits.
#[test]
fn a_lease_held_while_close_waits_gets_no_new_work() {
    let a = api();
    let listener = TestListener::new(64 * MIB);
    let manager = create(cstr!("lease-refusals"), MIB, &listener);
    let mut lease = 0;
    let mut err = ptr::null_mut();
    // SAFETY: valid out pointers.
    ok(
        "acquire",
        unsafe { (a.acquire)(manager, &mut lease, &mut err) },
        err,
    );
    let closer = thread::spawn(move || {
        // SAFETY: valid (NULL) out pointers.
        unsafe { (api().manager_close)(manager, ptr::null_mut(), ptr::null_mut(), ptr::null_mut()) }
    });
    // Wait until the manager's handle is gone (close's first step), then a little more for the
    // flag right after it.
    let started = Instant::now();
    loop {
        let mut l2 = 0;
        // SAFETY: valid out pointer.
        if unsafe { (a.acquire)(manager, &mut l2, ptr::null_mut()) } == NM_ERR_STALE_HANDLE {
            break;
        }
        // SAFETY: the lease just acquired.
        unsafe { (a.release)(l2, ptr::null_mut()) };
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "close did not start"
        );
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(Duration::from_millis(20));
    let mut stats = NmManagerStats::default();
    let mut pool = 0;
    let mut freed = 0;
    // SAFETY (all): valid arguments and out pointers.
    unsafe {
        assert_eq!(
            (a.manager_stats)(lease, &mut stats, ptr::null_mut()),
            NM_ERR_CLOSED
        );
        assert_eq!(
            (a.pool_open)(lease, cstr!("late"), -1, &mut pool, ptr::null_mut()),
            NM_ERR_CLOSED
        );
        assert_eq!(pool, 0, "no pool handle handed out");
        assert_eq!(
            (a.manager_spill)(lease, MIB, &mut freed, ptr::null_mut()),
            NM_ERR_CLOSED
        );
        assert_eq!(
            (a.manager_reclaim)(lease, MIB, &mut freed, ptr::null_mut()),
            NM_ERR_CLOSED
        );
        let st = TestState::new();
        let raw = st.raw();
        let mut h = 0;
        assert_eq!(
            (a.attach)(lease, raw, Some(state_drop), &mut h, ptr::null_mut()),
            NM_ERR_CLOSED
        );
        TestState::reclaim(raw);
        assert_eq!((a.release)(lease, ptr::null_mut()), NM_OK);
    }
    assert_eq!(closer.join().unwrap(), NM_OK);
    assert_eq!(listener.held(), 0);
}

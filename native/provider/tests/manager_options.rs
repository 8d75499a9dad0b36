//! `manager_create_with`: every setting of `nm_manager_options` takes effect (reservation block,
//! task limit, reservation quantum, close timeout), NULL options are the defaults, and a struct the
//! library cannot read whole (`struct_size` below this version's), a non-zero `reserved0` or an
//! out-of-range value is refused with `NM_ERR_INVALID_ARGUMENT`, changing nothing. Also: a caller
//! built for version 1 still gets the table.

mod common;

use std::ptr;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// `manager_create_with` with `options` (NULL: none) and `listener`; the status and the message.
fn create_with(
    options: Option<&NmManagerOptions>,
    listener: Option<&NmListener>,
) -> (nm_status, nm_manager, String) {
    let mut m = 0;
    let mut err = ptr::null_mut();
    // SAFETY: valid arguments and out pointers.
    let status = unsafe {
        (api().manager_create_with)(
            cstr!("with-options"),
            options.map_or(ptr::null(), |o| o as *const NmManagerOptions),
            listener.map_or(ptr::null(), |l| l as *const NmListener),
            &mut m,
            &mut err,
        )
    };
    (status, m, take_message(err))
}

fn close(m: nm_manager) -> u64 {
    let mut leaked = 0;
    let mut err = ptr::null_mut();
    // SAFETY: a manager made by this test; valid out pointers.
    let status = unsafe { (api().manager_close)(m, ptr::null_mut(), &mut leaked, &mut err) };
    ok("manager_close", status, err);
    leaked
}

/// Lease, pool ("" the root) and an empty reservation of `m`.
fn reservation(m: nm_manager) -> (nm_lease, nm_pool, nm_reservation) {
    let a = api();
    let (mut lease, mut pool, mut r) = (0, 0, 0);
    let mut err = ptr::null_mut();
    // SAFETY: valid arguments and out pointers, for each call.
    ok(
        "acquire",
        unsafe { (a.acquire)(m, &mut lease, &mut err) },
        err,
    );
    // SAFETY: as above.
    let status = unsafe { (a.pool_open)(lease, cstr!(""), -1, &mut pool, &mut err) };
    ok("pool_open", status, err);
    // SAFETY: as above.
    let status = unsafe { (a.reservation_new)(pool, cstr!("op"), &mut r, &mut err) };
    ok("reservation_new", status, err);
    (lease, pool, r)
}

fn pool_used(pool: nm_pool) -> u64 {
    let mut stats = NmPoolStats::default();
    let mut err = ptr::null_mut();
    // SAFETY: valid out pointers.
    ok(
        "pool_stats",
        unsafe { (api().pool_stats)(pool, &mut stats, &mut err) },
        err,
    );
    stats.used
}

#[test]
fn block_limit_and_quantum_take_effect() {
    let listener = TestListener::new(64 * MIB);
    let vt = listener.vtable();
    let options = NmManagerOptions {
        reservation_block: MIB,
        task_limit: (3 * MIB) as i64,
        reservation_quantum: 64 * KIB,
        ..NmManagerOptions::default()
    };
    let (status, m, text) = create_with(Some(&options), Some(&vt));
    assert_eq!(status, NM_OK, "{text}");
    let (lease, pool, r) = reservation(m);
    let a = api();
    let mut err = ptr::null_mut();

    // SAFETY: a live reservation; valid out pointer.
    let status = unsafe { (a.reservation_try_grow)(r, 100 * KIB, &mut err) };
    ok("try_grow", status, err);
    assert_eq!(
        listener.held(),
        MIB,
        "asked of the listener in whole 1 MiB blocks"
    );
    let used = pool_used(pool);
    assert!(
        used > 100 * KIB && used % (64 * KIB) == 0,
        "the reservation charges its pool in 64 KiB quanta: {used}"
    );

    // SAFETY: as above.
    let status = unsafe { (a.reservation_try_grow)(r, 3 * MIB, &mut err) };
    let text = take_message(err);
    assert_eq!(
        status, NM_ERR_OUT_OF_MEMORY,
        "over the 3 MiB task limit: {text}"
    );
    assert!(listener.held() <= 3 * MIB, "never reserved past the limit");
    // SAFETY: as above.
    let status = unsafe { (a.reservation_try_grow)(r, 2 * MIB, &mut err) };
    ok("try_grow within the limit", status, err);
    assert_eq!(listener.held() % MIB, 0, "whole blocks");

    // SAFETY: handles of this test, each closed once.
    unsafe {
        assert_eq!((a.reservation_close)(r, ptr::null_mut()), NM_OK);
        assert_eq!((a.pool_close)(pool, ptr::null_mut()), NM_OK);
        assert_eq!((a.release)(lease, ptr::null_mut()), NM_OK);
    }
    assert_eq!(close(m), 0);
    assert_eq!(listener.held(), 0);
    assert_eq!(listener.drops.load(Ordering::SeqCst), 1);
}

/// A close that finds a lease held elsewhere waits for the close timeout of the options (here
/// 50 ms, the default being 10 s), then reports NM_ERR_TIMEOUT; the memory goes when the lease
/// is released.
#[test]
fn the_close_timeout_takes_effect() {
    let listener = TestListener::new(64 * MIB);
    let vt = listener.vtable();
    let options = NmManagerOptions {
        close_timeout_millis: 50,
        ..NmManagerOptions::default()
    };
    let (status, m, text) = create_with(Some(&options), Some(&vt));
    assert_eq!(status, NM_OK, "{text}");
    let (lease, pool, r) = reservation(m);
    let a = api();
    // SAFETY: handles of this test.
    unsafe {
        assert_eq!((a.reservation_try_grow)(r, KIB, ptr::null_mut()), NM_OK);
        assert_eq!((a.reservation_close)(r, ptr::null_mut()), NM_OK);
        assert_eq!((a.pool_close)(pool, ptr::null_mut()), NM_OK);
    }
    assert_eq!(listener.held(), 8 * MIB, "the default block");

    let closer = thread::spawn(move || {
        let start = Instant::now();
        let mut err = ptr::null_mut();
        // SAFETY: a manager made by this test; valid out pointers.
        let status =
            unsafe { (api().manager_close)(m, ptr::null_mut(), ptr::null_mut(), &mut err) };
        (status, take_message(err), start.elapsed())
    });
    let (status, text, waited) = closer.join().unwrap();
    assert_eq!(status, NM_ERR_TIMEOUT, "{text}");
    assert!(waited >= Duration::from_millis(50), "{waited:?}");
    assert!(
        waited < Duration::from_secs(5),
        "not the 10 s default: {waited:?}"
    );
    // SAFETY: the lease this test holds; the close waited for it and gave up.
    assert_eq!(unsafe { (a.release)(lease, ptr::null_mut()) }, NM_OK);
    assert_eq!(listener.held(), 0, "freed when the last lease went");
    assert_eq!(listener.drops.load(Ordering::SeqCst), 1);
}

#[test]
fn null_options_are_the_defaults() {
    let listener = TestListener::new(64 * MIB);
    let vt = listener.vtable();
    let (status, m, text) = create_with(None, Some(&vt));
    assert_eq!(status, NM_OK, "{text}");
    let (lease, pool, r) = reservation(m);
    let a = api();
    // SAFETY: handles of this test.
    unsafe {
        assert_eq!(
            (a.reservation_try_grow)(r, 100 * KIB, ptr::null_mut()),
            NM_OK
        );
    }
    assert_eq!(listener.held(), 8 * MIB, "the default 8 MiB block");
    assert_eq!(
        pool_used(pool),
        NM_DEFAULT_RESERVATION_QUANTUM,
        "the default 1 MiB quantum: the pool is charged a whole quantum"
    );
    // SAFETY: handles of this test, each closed once.
    unsafe {
        assert_eq!((a.reservation_close)(r, ptr::null_mut()), NM_OK);
        assert_eq!((a.pool_close)(pool, ptr::null_mut()), NM_OK);
        assert_eq!((a.release)(lease, ptr::null_mut()), NM_OK);
    }
    assert_eq!(close(m), 0);
    assert_eq!(listener.held(), 0);
}

#[test]
fn quantum_0_opts_into_exact_accounting() {
    let listener = TestListener::new(64 * MIB);
    let vt = listener.vtable();
    let options = NmManagerOptions {
        reservation_quantum: 0,
        ..NmManagerOptions::default()
    };
    let (status, m, text) = create_with(Some(&options), Some(&vt));
    assert_eq!(status, NM_OK, "{text}");
    let (lease, pool, r) = reservation(m);
    let a = api();
    // SAFETY: handles of this test.
    unsafe {
        assert_eq!(
            (a.reservation_try_grow)(r, 100 * KIB, ptr::null_mut()),
            NM_OK
        );
    }
    assert_eq!(
        pool_used(pool),
        100 * KIB,
        "exact accounting: the pool holds what is grown"
    );
    // SAFETY: handles of this test, each closed once.
    unsafe {
        assert_eq!((a.reservation_close)(r, ptr::null_mut()), NM_OK);
        assert_eq!((a.pool_close)(pool, ptr::null_mut()), NM_OK);
        assert_eq!((a.release)(lease, ptr::null_mut()), NM_OK);
    }
    assert_eq!(close(m), 0);
    assert_eq!(listener.held(), 0);
}

/// What the library cannot read whole, or does not accept, is refused before anything is made;
/// the listener stays the caller's (its drop is not called).
#[test]
fn bad_options_are_refused() {
    let listener = TestListener::new(64 * MIB);
    let vt = listener.vtable();
    let base = NmManagerOptions::default();
    let cases = [
        (
            NmManagerOptions {
                struct_size: base.struct_size - 8,
                ..base
            },
            "nm_manager_options.struct_size",
        ),
        (
            NmManagerOptions {
                struct_size: 0,
                ..base
            },
            "nm_manager_options.struct_size",
        ),
        (
            NmManagerOptions {
                reserved0: 1,
                ..base
            },
            "reserved0",
        ),
        (
            NmManagerOptions {
                task_limit: -2,
                ..base
            },
            "limit",
        ),
        (
            NmManagerOptions {
                close_timeout_millis: -2,
                ..base
            },
            "close timeout",
        ),
        (
            NmManagerOptions {
                reservation_quantum: 1 << 41,
                ..base
            },
            "quantum",
        ),
        (
            NmManagerOptions {
                reservation_block: 1 << 63,
                ..base
            },
            "reservation block",
        ),
    ];
    for (options, want) in cases {
        let (status, m, text) = create_with(Some(&options), Some(&vt));
        assert_eq!(status, NM_ERR_INVALID_ARGUMENT, "{options:?}: {text}");
        assert_eq!(m, 0);
        assert!(text.contains(want), "{options:?}: {text}");
    }
    assert_eq!(listener.drops.load(Ordering::SeqCst), 0, "ctx stays ours");
    // The ctx reference the vtable holds, never given to a manager.
    // SAFETY: made by `TestListener::vtable`, not owned by the provider.
    drop(unsafe { std::sync::Arc::from_raw(vt.ctx as *const TestListener) });

    // A larger struct (a newer caller's) is fine: its extra fields are ignored.
    #[repr(C)]
    #[allow(dead_code)]
    struct Newer {
        v2: NmManagerOptions,
        extra: u64,
    }
    let newer = Newer {
        v2: NmManagerOptions {
            struct_size: std::mem::size_of::<Newer>() as u32,
            ..base
        },
        extra: u64::MAX,
    };
    let (status, m, text) = create_with(Some(&newer.v2), None);
    assert_eq!(status, NM_OK, "{text}");
    assert_eq!(close(m), 0);
}

/// A caller asking for version 1 gets the whole table (additions keep the version; the new slot
/// is found by `struct_size`); one asking for a version newer than the library's gets none.
#[test]
fn callers_of_version_1_get_the_whole_table() {
    assert!(!nativemem_provider::api(1).is_null());
    assert_eq!(
        nativemem_provider::api(1),
        nativemem_provider::api(NM_ABI_VERSION)
    );
    assert!(nativemem_provider::api(NM_ABI_VERSION + 1).is_null());
    assert_eq!(api().abi_version, 1);
    assert_eq!(api().struct_size as usize, std::mem::size_of::<NmApi>());
}

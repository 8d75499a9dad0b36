//! The task heap through the engine ABI: a block leaked by an engine is reported at
//! `manager_close` with its exact bytes and its memory is back once the close returns (the
//! provider drops its handles of the manager, so the manager's heap is destroyed); pointers of
//! another task's heap, of malloc and interior pointers are refused and change nothing.
//!
//! One `#[test]` in its own binary: it counts the process's task heaps.

mod common;

use std::ffi::c_void;
use std::ptr;

use common::*;

const MIB: u64 = 1 << 20;

unsafe fn alloc(pool: nm_pool, size: u64) -> *mut c_void {
    let mut p = ptr::null_mut();
    let mut err = ptr::null_mut();
    // SAFETY: the caller passes a live pool handle; valid out pointers.
    ok(
        "allocate",
        unsafe { (api().allocate)(pool, size, 0, &mut p, &mut err) },
        err,
    );
    p
}

/// `free` of `p` on `pool`: the status, the bytes reported freed.
unsafe fn free(pool: nm_pool, p: *mut c_void) -> (nm_status, u64) {
    let mut size = 0;
    let mut err = ptr::null_mut();
    // SAFETY: valid out pointers; `p` is only compared, never read, unless it is a block.
    let st = unsafe { (api().free)(pool, p, &mut size, &mut err) };
    take_message(err);
    (st, size)
}

#[test]
fn leaked_blocks_are_reported_and_freed_at_close_and_foreign_pointers_refused() {
    let a = api();
    let heaps_before = nativemem_core::live_task_heaps();
    let l1 = TestListener::new(64 * MIB);
    let l2 = TestListener::new(64 * MIB);
    let m1 = create(cstr!("heap-1"), MIB, &l1);
    let m2 = create(cstr!("heap-2"), MIB, &l2);
    let (mut lease1, mut lease2, mut p1, mut p2) = (0, 0, 0, 0);
    let mut err = ptr::null_mut();
    // SAFETY (all calls): valid handles and out pointers.
    unsafe {
        ok("acquire", (a.acquire)(m1, &mut lease1, &mut err), err);
        ok("acquire", (a.acquire)(m2, &mut lease2, &mut err), err);
        ok(
            "pool_open",
            (a.pool_open)(lease1, cstr!("op"), -1, &mut p1, &mut err),
            err,
        );
        ok(
            "pool_open",
            (a.pool_open)(lease2, cstr!("op"), -1, &mut p2, &mut err),
            err,
        );
        let x = alloc(p1, 4096);
        let y = alloc(p2, 64);
        let _leak1 = alloc(p1, 1000);
        let _leak2 = alloc(p1, 3 * MIB);
        assert_eq!(nativemem_core::live_task_heaps(), heaps_before + 2);
        // Another task's block, a malloc'd block, an interior pointer: refused, nothing freed.
        assert_eq!(free(p2, x).0, NM_ERR_UNKNOWN_POINTER);
        assert_eq!(free(p1, y).0, NM_ERR_UNKNOWN_POINTER);
        let m = libc_malloc(64);
        assert_eq!(free(p1, m).0, NM_ERR_UNKNOWN_POINTER);
        libc_free(m);
        assert_eq!(
            free(p1, x.cast::<u8>().add(64).cast()).0,
            NM_ERR_UNKNOWN_POINTER
        );
        // A free on another thread, then a double free.
        let xs = x as usize;
        let st = std::thread::spawn(move || free(p1, xs as *mut c_void))
            .join()
            .unwrap();
        assert_eq!(st, (NM_OK, 4096));
        assert_eq!(free(p1, x).0, NM_ERR_UNKNOWN_POINTER);
        assert_eq!(free(p2, y), (NM_OK, 64));
        ok("release", (a.release)(lease1, &mut err), err);
        ok("release", (a.release)(lease2, &mut err), err);
        let mut leaked = 0;
        ok(
            "manager_close",
            (a.manager_close)(m1, ptr::null_mut(), &mut leaked, &mut err),
            err,
        );
        assert_eq!(leaked, 1000 + 3 * MIB, "the leaked blocks' exact bytes");
        ok(
            "manager_close",
            (a.manager_close)(m2, ptr::null_mut(), &mut leaked, &mut err),
            err,
        );
        assert_eq!(leaked, 0);
    }
    assert_eq!((l1.held(), l2.held()), (0, 0));
    assert_eq!(
        nativemem_core::live_task_heaps(),
        heaps_before,
        "both heaps destroyed (with the leaked blocks) when manager_close returned"
    );
}

extern "C" {
    #[link_name = "malloc"]
    fn libc_malloc(size: usize) -> *mut c_void;
    #[link_name = "free"]
    fn libc_free(p: *mut c_void);
}

//! The governor's trim step gives the task heaps' free memory back to the kernel: an engine
//! allocates 64 MiB through the ABI, its task ends (`manager_close` destroys the heap), and the
//! pages stay resident (mimalloc purges only after its delay, and only when some thread allocates
//! again) until `trim_now` runs. Resident bytes are read from `/proc/self/statm`.
//!
//! One `#[test]` in its own binary: it reads the process's resident memory.
#![cfg(target_os = "linux")]

mod common;

use std::ffi::c_void;
use std::ptr;

use common::*;

const MIB: u64 = 1 << 20;

fn resident() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    // SAFETY: sysconf has no preconditions; 30 is _SC_PAGESIZE on Linux.
    let page = unsafe { libc_sysconf(30) } as u64;
    pages * page
}

extern "C" {
    #[link_name = "sysconf"]
    fn libc_sysconf(name: i32) -> i64;
}

#[test]
fn trim_returns_an_ended_task_s_heap_to_the_kernel() {
    let a = api();
    let l = TestListener::new(256 * MIB);
    let m = create(cstr!("trim"), MIB, &l);
    let mut err = ptr::null_mut();
    let before = resident();
    let (lease, pool) = lease_and_pool(m, cstr!("op"));
    // SAFETY (all calls): valid handles and out pointers; every block is written within its size.
    unsafe {
        let mut blocks = Vec::new();
        for _ in 0..1024 {
            let mut p: *mut c_void = ptr::null_mut();
            ok(
                "allocate",
                (a.allocate)(pool, 64 << 10, 0, &mut p, &mut err),
                err,
            );
            p.cast::<u8>().write_bytes(1, 64 << 10);
            blocks.push(p);
        }
        let full = resident();
        assert!(
            full >= before + 56 * MIB,
            "64 MiB written: resident {} -> {} MiB",
            before / MIB,
            full / MIB
        );
        for p in blocks {
            let mut size = 0;
            ok("free", (a.free)(pool, p, &mut size, &mut err), err);
        }
        ok("release", (a.release)(lease, &mut err), err);
        let mut leaked = 0;
        ok(
            "manager_close",
            (a.manager_close)(m, ptr::null_mut(), &mut leaked, &mut err),
            err,
        );
        assert_eq!(leaked, 0);
    }
    let closed = resident();
    nativemem_provider::governor::trim_now();
    let trimmed = resident();
    eprintln!(
        "resident: {} MiB before, {} MiB closed, {} MiB trimmed",
        before / MIB,
        closed / MIB,
        trimmed / MIB
    );
    assert!(
        trimmed + 48 * MIB <= closed,
        "trim gave back {} MiB of the ended task's 64 MiB heap (resident {} -> {} MiB)",
        closed.saturating_sub(trimmed) / MIB,
        closed / MIB,
        trimmed / MIB
    );
}

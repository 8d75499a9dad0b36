//! Allocations through a pool: raw (`allocate`/`free`) and owned (`Allocation`).

use super::*;

#[test]
fn allocations_are_charged_and_freed() {
    let (m, _l) = unlimited();
    let p = m.pool("buf").unwrap();
    let a = p.allocate(1000, 64).unwrap();
    assert_eq!(a.as_ptr() as usize % 64, 0);
    // SAFETY: `a` points to 1000 writable bytes just allocated.
    unsafe { a.as_ptr().write_bytes(7, 1000) };
    let b = p.allocate(24, 8).unwrap();
    assert_eq!(
        (p.used(), m.used(), m.stats().live_allocations),
        (1024, 1024, 2)
    );
    assert_eq!(p.free(a).unwrap(), 1000);
    assert_eq!((p.used(), m.stats().live_allocations), (24, 1));
    assert!(matches!(
        p.free(a).unwrap_err(),
        MemoryError::UnknownAllocation { .. }
    ));
    assert_eq!(m.root().free(b).unwrap(), 24);
    assert_eq!(m.used(), 0);
}

#[test]
fn bad_allocation_arguments_are_errors() {
    let (m, _l) = unlimited();
    let p = m.root();
    assert!(matches!(
        p.allocate(0, 8),
        Err(MemoryError::InvalidArgument(_))
    ));
    assert!(matches!(
        p.allocate(8, 3),
        Err(MemoryError::InvalidArgument(_))
    ));
    assert!(matches!(
        p.allocate(usize::MAX, 8),
        Err(MemoryError::InvalidArgument(_))
    ));
    let foreign = Box::new(5u64);
    let ptr = std::ptr::NonNull::from(&*foreign).cast::<u8>();
    assert!(matches!(
        p.free(ptr),
        Err(MemoryError::UnknownAllocation { .. })
    ));
    assert_eq!(m.used(), 0);
}

#[test]
fn allocation_beyond_a_pool_limit_is_out_of_memory() {
    let (m, _l) = unlimited();
    let p = m.root().child("small", Some(4096)).unwrap();
    let a = p.allocate(4000, 8).unwrap();
    let err = p.allocate(100, 8).unwrap_err();
    assert!(err.to_string().contains("consumer 'allocations'"), "{err}");
    p.free(a).unwrap();
}

#[test]
fn owned_allocations_free_on_drop_and_survive_close() {
    let (m, l) = unlimited();
    let p = m.pool("buf").unwrap();
    let mut a = p.allocate_owned(4096, 64).unwrap();
    assert_eq!(a.len(), 4096);
    assert_eq!(a.as_ptr().as_ptr() as usize % 64, 0);
    a.as_uninit_mut().fill(std::mem::MaybeUninit::new(1));
    assert_eq!((p.used(), m.stats().live_allocations), (4096, 1));
    // A raw free of an owned block is refused: the owner frees it.
    assert!(matches!(
        p.free(a.as_ptr()),
        Err(MemoryError::InvalidArgument(_))
    ));
    assert_eq!(p.used(), 4096);
    drop(a);
    assert_eq!((p.used(), m.stats().live_allocations), (0, 0));

    let mut held = p.allocate_owned(1000, 8).unwrap();
    let report = m.close().unwrap();
    assert!(
        report
            .to_string()
            .contains("1 allocation(s) in root/buf still held by their owner"),
        "{report}"
    );
    assert_eq!((m.used(), l.reserved()), (0, 0));
    // Still valid memory after close; freed on drop without touching the accounting again.
    held.as_uninit_mut().fill(std::mem::MaybeUninit::new(2));
    drop(held);
    assert_eq!((m.used(), l.reserved()), (0, 0));
}

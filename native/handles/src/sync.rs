//! Synchronization primitives, swapped for `loom`'s under `--cfg loom` so the table's lock-free
//! protocol can be model-checked (`tests/loom.rs`). `Arc` stays std's (as in nativemem-core):
//! reference counts are not part of the protocol.

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

#[cfg(not(loom))]
pub(crate) use parking_lot::Mutex;

/// `parking_lot`-shaped wrapper over loom's mutex (no poisoning in the API).
#[cfg(loom)]
#[derive(Debug, Default)]
pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

#[cfg(loom)]
impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Mutex(loom::sync::Mutex::new(value))
    }

    pub(crate) fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
        // Poisoning only follows a panic, which already fails the model run.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `std::cell::UnsafeCell` with loom's closure API (`with` / `with_mut`), so loom can check
/// every access to a slot's value for data races.
#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        UnsafeCell(std::cell::UnsafeCell::new(value))
    }

    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;

/// Stands for the single total order of `SeqCst` accesses where the protocol relies on it (a
/// store-buffering pair: a pin's increment before its read of a close flag, a close's flag
/// store before its read of the pins). The Rust memory model orders those accesses already, so
/// this is nothing outside loom; loom treats `SeqCst` accesses as `AcqRel` (loom issue #180)
/// and needs the fence to model them.
#[inline(always)]
pub(crate) fn sc_order() {
    #[cfg(loom)]
    loom::sync::atomic::fence(Ordering::SeqCst);
}

//! Synchronization primitives, swapped for `loom`'s under `--cfg loom` so the lock-free paths can
//! be model-checked (see `tests/loom.rs`). `Arc` stays std's: reference counts are not part of
//! the accounting protocol, and loom's `Arc` has no `Weak`.

#[cfg(not(loom))]
pub(crate) use parking_lot::Mutex;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::thread::yield_now;

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::MutexGuard;
#[cfg(loom)]
pub(crate) use loom::thread::yield_now;

/// `parking_lot`-shaped wrapper over loom's mutex (no poisoning in the API).
#[cfg(loom)]
#[derive(Debug, Default)]
pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

#[cfg(loom)]
impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Mutex(loom::sync::Mutex::new(value))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        // Poisoning only follows a panic, which already fails the model run.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

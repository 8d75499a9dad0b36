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

/// A named point on a lock-free path where a unit test can stop this thread (to force an
/// interleaving that the scheduler rarely produces). Compiled to nothing outside unit tests.
#[inline(always)]
pub(crate) fn test_point(_name: &'static str) {
    #[cfg(test)]
    test_points::hit(_name);
}

#[cfg(test)]
pub(crate) mod test_points {
    use std::cell::RefCell;

    type Hook = Box<dyn FnMut(&'static str)>;

    thread_local! {
        static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Runs `hook` at every test point this thread reaches until the returned guard drops.
    pub(crate) fn set(hook: impl FnMut(&'static str) + 'static) -> impl Drop {
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                HOOK.with(|h| h.borrow_mut().take());
            }
        }
        HOOK.with(|h| *h.borrow_mut() = Some(Box::new(hook)));
        Reset
    }

    pub(super) fn hit(name: &'static str) {
        // Taken out while it runs: a hook that reaches another point does not re-enter itself.
        let hook = HOOK.with(|h| h.borrow_mut().take());
        if let Some(mut f) = hook {
            f(name);
            HOOK.with(|h| {
                let mut slot = h.borrow_mut();
                if slot.is_none() {
                    *slot = Some(f);
                }
            });
        }
    }
}

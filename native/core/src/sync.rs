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

/// A lock for critical sections of a few nanoseconds (a hash insert or remove of the live
/// allocation table): its unlock is one release store, not the compare-and-swap of
/// `parking_lot`'s unlock (on x86 a locked instruction, ~10 ns on the VMs we measure). It spins
/// briefly, then yields, so a holder that was descheduled does not burn a waiter's time slice;
/// never hold it across anything that can block (it does not park).
#[cfg(not(loom))]
pub(crate) struct SpinMutex<T> {
    locked: std::sync::atomic::AtomicBool,
    value: std::cell::UnsafeCell<T>,
}

// SAFETY: the value is reached only through a guard, and `locked` admits one guard at a time
// (acquire on lock, release on unlock), so `T: Send` suffices for sharing the mutex.
#[cfg(not(loom))]
unsafe impl<T: Send> Sync for SpinMutex<T> {}

#[cfg(not(loom))]
impl<T> SpinMutex<T> {
    pub(crate) fn new(value: T) -> Self {
        SpinMutex {
            locked: std::sync::atomic::AtomicBool::new(false),
            value: std::cell::UnsafeCell::new(value),
        }
    }

    #[inline]
    pub(crate) fn lock(&self) -> SpinGuard<'_, T> {
        use std::sync::atomic::Ordering;
        // Acquire on success: the previous holder's writes to the value happen before ours.
        // Relaxed on failure and while waiting: only the winning exchange decides.
        if self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended();
        }
        SpinGuard { mutex: self }
    }

    #[cold]
    fn lock_contended(&self) {
        use std::sync::atomic::Ordering;
        let mut spins = 0u32;
        loop {
            // Wait on a plain load (no cache-line ping-pong), then try again.
            while self.locked.load(Ordering::Relaxed) {
                if spins < 64 {
                    spins += 1;
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
            if self
                .locked
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }
}

#[cfg(not(loom))]
pub(crate) struct SpinGuard<'a, T> {
    mutex: &'a SpinMutex<T>,
}

#[cfg(not(loom))]
impl<T> std::ops::Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard is the only one (see `SpinMutex::lock`), so no `&mut` aliases it.
        unsafe { &*self.mutex.value.get() }
    }
}

#[cfg(not(loom))]
impl<T> std::ops::DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this the only reference through the guard.
        unsafe { &mut *self.mutex.value.get() }
    }
}

#[cfg(not(loom))]
impl<T> Drop for SpinGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        // Release: our writes to the value happen before the next holder's acquire.
        self.mutex
            .locked
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Under loom the spin lock is loom's mutex (loom cannot model an unbounded spin).
#[cfg(loom)]
pub(crate) type SpinMutex<T> = Mutex<T>;

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

//! Asymmetric fences: a free one for the hot path, a costly one for the rare path that must
//! order itself against it.
//!
//! The exclusive fast path ([`Reservation::try_grow_exclusive`](crate::Reservation::try_grow_exclusive))
//! is one half of a store-buffering pair (edge 6 of `budget`): it stores a reservation's `size`
//! and then loads its `charged`, while a trim of that reservation from another thread lowers
//! `charged` and then loads `size`. Each side needs a StoreLoad barrier between its two accesses,
//! and on x86 any StoreLoad barrier (a locked RMW or `mfence`) costs ~10 ns, more than the rest of
//! the grow. Linux's `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` moves the whole cost to the
//! rare side: it returns only after every thread of the process that is running has executed a
//! full memory barrier (and a thread that is not running went through a context switch, which is
//! one). So the hot side ([`light`]) needs only to keep the compiler from reordering its two
//! accesses, and the rare side ([`heavy`]) pays a system call (~0.2-5 us, by how many CPUs run the
//! process's threads). This is the pairing of folly's `asymmetricLightBarrier` /
//! `asymmetricHeavyBarrier` and of liburcu.
//!
//! Where the expedited command is missing (not Linux, a kernel before 4.14, a seccomp filter
//! that refuses it), both sides fall back to `fence(SeqCst)`: correct, and as costly as the RMW
//! the exclusive path saves. Under `loom` both sides are `fence(SeqCst)`, the semantics the
//! system call guarantees, so the models check the protocol built on them.

#[cfg(not(loom))]
use std::sync::atomic::{compiler_fence, fence, Ordering};

#[cfg(loom)]
use loom::sync::atomic::{fence, Ordering};

/// The hot side of the pair: orders this thread's earlier stores before its later loads against
/// every [`heavy`] fence.
#[inline(always)]
pub(crate) fn light() {
    #[cfg(not(loom))]
    {
        if expedited() {
            compiler_fence(Ordering::SeqCst);
        } else {
            fence(Ordering::SeqCst);
        }
    }
    #[cfg(loom)]
    fence(Ordering::SeqCst);
}

/// The rare side: after it returns, every store a thread made before its [`light`] fence is
/// visible to this thread's later loads, or that thread's loads after its `light` see this
/// thread's stores before `heavy`. Returns `false` if the system call failed (it cannot once
/// registered, but the caller must then not rely on the ordering: it undoes what it did).
#[must_use]
pub(crate) fn heavy() -> bool {
    #[cfg(not(loom))]
    {
        if expedited() {
            return imp::membarrier_expedited();
        }
        fence(Ordering::SeqCst);
        true
    }
    #[cfg(loom)]
    {
        fence(Ordering::SeqCst);
        true
    }
}

/// Whether the process is registered for expedited private membarriers (registered on first
/// use; the answer never changes afterwards).
#[cfg(not(loom))]
#[inline(always)]
fn expedited() -> bool {
    static EXPEDITED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *EXPEDITED.get_or_init(imp::register)
}

#[cfg(all(not(loom), target_os = "linux"))]
mod imp {
    // From <linux/membarrier.h> (stable kernel ABI).
    const MEMBARRIER_CMD_QUERY: libc::c_long = 0;
    const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
    const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

    fn membarrier(cmd: libc::c_long) -> libc::c_long {
        // SAFETY: `membarrier(cmd, flags = 0, cpu_id = 0)` reads no memory of ours; an unknown
        // command or a refused call returns -1 with errno set, which callers handle.
        unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                cmd,
                0 as libc::c_long,
                0 as libc::c_long,
            )
        }
    }

    pub(super) fn register() -> bool {
        let supported = membarrier(MEMBARRIER_CMD_QUERY);
        let ok = supported >= 0
            && supported & MEMBARRIER_CMD_PRIVATE_EXPEDITED != 0
            && membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0;
        log::debug!(
            "exclusive reservation path: {}",
            if ok {
                "membarrier (expedited, private)"
            } else {
                "fence(SeqCst) on both sides (membarrier unavailable)"
            }
        );
        ok
    }

    pub(super) fn membarrier_expedited() -> bool {
        membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0
    }
}

#[cfg(all(not(loom), not(target_os = "linux")))]
mod imp {
    pub(super) fn register() -> bool {
        false
    }

    pub(super) fn membarrier_expedited() -> bool {
        false
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    #[test]
    fn both_sides_run_and_the_heavy_side_succeeds() {
        super::light();
        assert!(super::heavy());
        super::light();
    }
}

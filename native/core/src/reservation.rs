//! RAII reservations: accounting-only claims on a pool, released on drop.

use crate::sync::Ordering;
use std::sync::Arc;

use crate::budget::{Budget, ConsumerState, Slack, SlackId, TrimMode, MAX_REQUEST_BYTES};
use crate::error::{MemoryError, Result};
use crate::tree::PoolNode;
use crate::units::human;

/// A claim of bytes on a pool, in the style of DataFusion's `MemoryReservation`: grow it before
/// allocating, shrink it after freeing; whatever it holds is released when it is dropped.
///
/// All methods but the `_exclusive` pair take `&self` and are safe to call from several threads
/// (the size is atomic), so a binding can share one reservation without a lock around calls that
/// reach the listener. A caller that owns the reservation (`&mut`) can use
/// [`try_grow_exclusive`](Self::try_grow_exclusive) / [`shrink_exclusive`](Self::shrink_exclusive),
/// whose fast path makes no atomic read-modify-write.
///
/// Failing calls change nothing the caller holds: a refused `try_grow` leaves the reservation
/// and every pool as they were (what the listener granted towards it stays reserved as cushion,
/// see [`try_grow`](Self::try_grow)); an over-release (`shrink` by more than is held) is an
/// error, never a panic and never a negative counter.
pub struct Reservation {
    pub(crate) state: Arc<ConsumerState>,
    pub(crate) budget: Arc<Budget>,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("consumer", &self.consumer())
            .field("pool", &self.state.node.path)
            .field("size", &self.size())
            .finish()
    }
}

impl Reservation {
    pub(crate) fn new(budget: Arc<Budget>, node: Arc<PoolNode>, name: String) -> Reservation {
        let state = budget.register_consumer(node, &name);
        Reservation { state, budget }
    }

    /// The consumer's name, `name#id`.
    pub fn consumer(&self) -> &str {
        &self.state.name
    }

    /// Bytes held now.
    pub fn size(&self) -> u64 {
        // Relaxed: a read-out; `shrink` and `free` take bytes out with their own Acquire RMW.
        self.state.size.load(Ordering::Relaxed)
    }

    /// The most bytes this reservation has held.
    pub fn peak(&self) -> u64 {
        // Relaxed: a statistic.
        self.state.peak.load(Ordering::Relaxed)
    }

    /// Grows by `bytes`, charging the pool and its ancestors and reserving from the listener if
    /// the cushion is short (spilling native consumers if the listener grants too little). On
    /// error the reservation and every pool are as they were.
    ///
    /// **A partial grant is kept.** When the listener grants part of what was asked and the
    /// grow still fails (out of memory), the granted bytes stay reserved as cushion: `reserved`
    /// rises by up to the grant (the hysteresis rule gives back what is beyond two blocks of
    /// unused cushion, down to one block), and the listener is not called to take them back at
    /// once. The next grow of the task uses them without an upcall; Spark gets them back by
    /// asking ([`MemoryManager::reclaim`](crate::MemoryManager::reclaim), its `spill`), by a
    /// later release beyond the hysteresis band, or at close. Handing them back at once would
    /// make a task that retries after spilling ask Spark again for bytes it just returned (a
    /// reserve/unreserve ping-pong through Spark's memory manager on every refused grow).
    ///
    /// With a [reservation quantum](crate::MemoryConfig::reservation_quantum) a grow that fits
    /// in what this reservation already charged is one atomic read-modify-write on its own
    /// cache line and one load; only a grow past it charges the pools (its need rounded up to
    /// the quantum).
    #[inline]
    pub fn try_grow(&self, bytes: u64) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let st = &*self.state;
        if st.quantum == 0 || bytes > MAX_REQUEST_BYTES {
            return self.grow_exact(bytes);
        }
        // SeqCst (both): edge 6 of `budget`, a store-buffering pair with `Budget::trim`: either
        // this load sees a trim's lowered `charged`, or the trim's re-read sees this `size`.
        let now = st.size.fetch_add(bytes, Ordering::SeqCst) + bytes;
        if now <= st.charged.load(Ordering::SeqCst) {
            st.note_peak(now);
            return Ok(());
        }
        self.cover(bytes)
    }

    /// Grows like [`try_grow`](Self::try_grow), for a caller that holds the reservation
    /// exclusively (`&mut`, as DataFusion's `MemoryReservation::try_grow` does): with a
    /// [reservation quantum](crate::MemoryConfig::reservation_quantum), a grow that fits in the
    /// slack makes **no atomic read-modify-write and no fence instruction**: a load and a plain
    /// store of its own `size` and a load of its `charged`. `&mut` makes this thread the only
    /// writer of `size`, so the RMW is not needed for atomicity; the store-load ordering against
    /// a concurrent trim (edge 6 of `budget`) is paid by the trimming thread (a `membarrier`
    /// system call, see `barrier`), which trims only before refusing a grow, before spilling and
    /// on Spark's reclaim. In exact mode (quantum 0) it is `try_grow`.
    #[inline]
    pub fn try_grow_exclusive(&mut self, bytes: u64) -> Result<()> {
        let st = &*self.state;
        if bytes == 0 {
            return Ok(());
        }
        if st.quantum == 0 || bytes > MAX_REQUEST_BYTES {
            return self.try_grow(bytes);
        }
        // Relaxed (all three): the only writer is this thread (`&mut self`; the manager's close
        // also swaps `size`, after which a stale value here only makes the grow fail below).
        // The store must precede the `charged` load against a trim: `barrier::light` pairs with
        // the trimmer's `barrier::heavy` (edge 6).
        let now = st.size.load(Ordering::Relaxed) + bytes;
        st.size.store(now, Ordering::Relaxed);
        crate::barrier::light();
        if now <= st.charged.load(Ordering::Relaxed) {
            st.note_peak(now);
            return Ok(());
        }
        self.cover(bytes)
    }

    /// Shrinks like [`shrink`](Self::shrink), for a caller that holds the reservation
    /// exclusively: with a reservation quantum, a shrink that leaves the slack below two quanta
    /// is a load and a plain store of its own `size` (see
    /// [`try_grow_exclusive`](Self::try_grow_exclusive)). Shrinking by more than is held is an
    /// error and changes nothing.
    #[inline]
    pub fn shrink_exclusive(&mut self, bytes: u64) -> Result<()> {
        let st = &*self.state;
        if bytes == 0 {
            return Ok(());
        }
        if st.quantum == 0 {
            return self.shrink(bytes);
        }
        // Relaxed: the only writer is this thread (see `try_grow_exclusive`). Lowering `size`
        // needs no fence: a trim that reads the old, larger value only trims less.
        let cur = st.size.load(Ordering::Relaxed);
        if bytes > cur {
            return Err(self.over_release(bytes, cur));
        }
        st.size.store(cur - bytes, Ordering::Relaxed);
        self.trim_surplus(cur - bytes, TrimMode::Release)
    }

    /// Exact mode: every grow charges the pools.
    fn grow_exact(&self, bytes: u64) -> Result<()> {
        self.budget
            .grow(&self.state.node, &self.state.name, bytes)?;
        // Release: whoever takes these bytes out (a shrink or close on another thread) must see
        // the pool charge above before it uncharges (edge 4 in `budget`).
        let now = self.state.size.fetch_add(bytes, Ordering::Release) + bytes;
        self.state.note_peak(now);
        Ok(())
    }

    /// Quantum mode, the slow path: `size` was raised by `bytes` above `charged` (see
    /// `Budget::cover`).
    #[cold]
    fn cover(&self, bytes: u64) -> Result<()> {
        let st = &*self.state;
        let now = self.budget.cover(
            Slack {
                size: &st.size,
                charged: &st.charged,
                node: &st.node,
                consumer: &st.name,
                owner: SlackId::Reservation(st.id),
            },
            bytes,
        )?;
        st.note_peak(now);
        Ok(())
    }

    /// Grows by `bytes` at once, **whatever the limits and the cushion**: never calls the
    /// listener (the JVM) or a spiller, takes no lock, never waits. The part the reserved
    /// cushion does not cover is over-commit (returned, and counted in
    /// [`ManagerStats::overcommitted`](crate::ManagerStats::overcommitted) and the usage report);
    /// the next [`try_grow`](Self::try_grow) of the task that reaches the listener reserves it
    /// along with its own bytes, or spills, or fails. A pool pushed above its limit refuses grows
    /// until enough is released.
    ///
    /// This is for code that can neither fail nor call out, such as a global allocator's flush
    /// (`nativemem-track`); everything else should use `try_grow`. Errors (nothing changes):
    /// [`MemoryError::Closed`], or `bytes` above [`MAX_REQUEST_BYTES`](crate::MAX_REQUEST_BYTES).
    pub fn force_grow(&self, bytes: u64) -> Result<u64> {
        if bytes == 0 {
            return Ok(0);
        }
        let over = self.budget.force_grow(&self.state.node, bytes)?;
        if self.state.quantum > 0 {
            // SeqCst: after the pool charge and before `size`, so the bytes are never seen
            // uncovered (edges 4 and 6).
            self.state.charged.fetch_add(bytes, Ordering::SeqCst);
        }
        // Release: as in `try_grow` (edge 4 in `budget`); SeqCst for edge 6 in quantum mode.
        let now = self.state.size.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.state.note_peak(now);
        Ok(over)
    }

    /// Shrinks by up to `bytes` (what it holds, if less) **without calling the listener**: the
    /// bytes stay reserved as cushion, handed back by the next release that finds surplus, by
    /// Spark's reclaim or by the manager's close. Returns the bytes released. Never fails: after
    /// the manager's close emptied the reservation it releases 0. The counterpart of
    /// [`force_grow`](Self::force_grow).
    pub fn force_shrink(&self, bytes: u64) -> u64 {
        // Acquire on success: the charge behind these bytes comes before the uncharge (edge 4).
        // Relaxed on failure and for the first guess: the value only feeds the next attempt.
        let prev = self
            .state
            .size
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |cur| {
                Some(cur - bytes.min(cur))
            })
            .unwrap_or(0);
        let taken = bytes.min(prev);
        if taken > 0 {
            if self.state.quantum == 0 {
                self.budget.release_quiet(&self.state.node, taken);
            } else {
                // The bytes become slack; beyond two quanta it goes back to the pools (quietly:
                // a forced shrink never calls out). A quiet trim never fails.
                let _ = self.trim_surplus(prev - taken, TrimMode::Quiet);
            }
        }
        taken
    }

    /// Quantum mode: slack above two quanta goes back to the pools (see `Budget::trim_surplus`);
    /// `size` is what this thread's shrink left.
    #[inline]
    fn trim_surplus(&self, size: u64, mode: TrimMode) -> Result<()> {
        let st = &*self.state;
        self.budget
            .trim_surplus(&st.size, &st.charged, &st.node, size, mode)
    }

    /// Shrinks by `bytes`. Shrinking by more than is held is an error and changes nothing.
    ///
    /// The bytes always leave the pool; an error other than `InvalidArgument` means only that
    /// handing surplus cushion back to the listener failed (it stays reserved and is retried).
    #[inline]
    pub fn shrink(&self, bytes: u64) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        // Relaxed: a first guess for the CAS, which decides (and acquires on success).
        let mut cur = self.state.size.load(Ordering::Relaxed);
        loop {
            if bytes > cur {
                return Err(self.over_release(bytes, cur));
            }
            // SeqCst on success: the charge behind these bytes comes before the uncharge below
            // (edge 4, which needs Acquire), and edge 6 in quantum mode. Relaxed on failure:
            // the value only feeds the next attempt.
            match self.state.size.compare_exchange(
                cur,
                cur - bytes,
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        if self.state.quantum > 0 {
            // The bytes become slack, served to the next grows; beyond two quanta it goes back.
            return self.trim_surplus(cur - bytes, TrimMode::Release);
        }
        self.budget.release(&self.state.node, bytes)
    }

    /// The error of a shrink by more than is held.
    #[cold]
    fn over_release(&self, bytes: u64, held: u64) -> MemoryError {
        MemoryError::InvalidArgument(format!(
            "cannot shrink reservation '{}' in pool '{}' by {} ({bytes} bytes): it holds {} ({held} bytes)",
            self.state.name,
            self.state.node.path,
            human(bytes),
            human(held)
        ))
    }

    /// Grows or shrinks to exactly `new_size` bytes. On a refused grow nothing changes.
    pub fn try_resize(&self, new_size: u64) -> Result<()> {
        let cur = self.size();
        if new_size >= cur {
            self.try_grow(new_size - cur)
        } else {
            self.shrink(cur - new_size)
        }
    }

    /// Releases everything held; returns the bytes released.
    pub fn free(&self) -> u64 {
        // Acquire: the charge behind these bytes comes before the uncharge (edge 4); SeqCst for
        // edge 6 in quantum mode.
        let bytes = self.state.size.swap(0, Ordering::SeqCst);
        if self.state.quantum > 0 {
            // Everything charged goes back, the slack too.
            if let Err(e) = self.budget.trim(&self.state, 0, TrimMode::Release) {
                log::warn!(
                    "[{}] freeing reservation '{}': {e}",
                    self.budget.name,
                    self.state.name
                );
            }
            return bytes;
        }
        if bytes > 0 {
            if let Err(e) = self.budget.release(&self.state.node, bytes) {
                log::warn!(
                    "[{}] freeing reservation '{}': {e}",
                    self.budget.name,
                    self.state.name
                );
            }
        }
        bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.free();
        self.budget.unregister_consumer(self.state.id);
    }
}

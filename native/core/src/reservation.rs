//! RAII reservations: accounting-only claims on a pool, released on drop.

use crate::sync::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{MemoryError, Result};
use crate::manager::Inner;
use crate::pool::{Pool, PoolNode};
use crate::units::human;

/// The part of a reservation the manager can see (for reports and for close).
pub(crate) struct ConsumerState {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) node: Arc<PoolNode>,
    /// Bytes held. Changed only by CAS/swap so a concurrent close and shrink each release
    /// disjoint bytes.
    pub(crate) size: AtomicU64,
    pub(crate) peak: AtomicU64,
}

/// A claim of bytes on a pool, in the style of DataFusion's `MemoryReservation`: grow it before
/// allocating, shrink it after freeing; whatever it holds is released when it is dropped.
///
/// All methods take `&self` and are safe to call from several threads (the size is atomic), so a
/// binding can share one reservation without a lock around calls that reach the listener.
///
/// Failing calls change nothing: a refused `try_grow` leaves the reservation, every pool and the
/// listener as they were; an over-release (`shrink` by more than is held) is an error, never a
/// panic and never a negative counter.
pub struct Reservation {
    state: Arc<ConsumerState>,
    mgr: Arc<Inner>,
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
    pub(crate) fn new(mgr: Arc<Inner>, node: Arc<PoolNode>, name: String) -> Reservation {
        let id = mgr.next_id();
        let state = Arc::new(ConsumerState {
            id,
            name: format!("{name}#{id}"),
            node,
            size: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        });
        mgr.consumers.lock().insert(id, state.clone());
        Reservation { state, mgr }
    }

    /// The consumer's name, `name#id`.
    pub fn consumer(&self) -> &str {
        &self.state.name
    }

    /// The pool this reservation charges.
    pub fn pool(&self) -> Pool {
        Pool {
            node: self.state.node.clone(),
            mgr: self.mgr.clone(),
        }
    }

    /// Bytes held now.
    pub fn size(&self) -> u64 {
        self.state.size.load(Ordering::Acquire)
    }

    /// The most bytes this reservation has held.
    pub fn peak(&self) -> u64 {
        self.state.peak.load(Ordering::Relaxed)
    }

    /// Grows by `bytes`, charging the pool and its ancestors and reserving from the listener if
    /// the cushion is short (spilling native consumers if the listener grants too little). On
    /// error nothing changes.
    pub fn try_grow(&self, bytes: u64) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.mgr.grow(&self.state.node, &self.state.name, bytes)?;
        let now = self.state.size.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if now > self.state.peak.load(Ordering::Relaxed) {
            self.state.peak.fetch_max(now, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Shrinks by `bytes`. Shrinking by more than is held is an error and changes nothing.
    ///
    /// The bytes always leave the pool; an error other than `InvalidArgument` means only that
    /// handing surplus cushion back to the listener failed (it stays reserved and is retried).
    pub fn shrink(&self, bytes: u64) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let mut cur = self.state.size.load(Ordering::Acquire);
        loop {
            if bytes > cur {
                return Err(MemoryError::InvalidArgument(format!(
                    "cannot shrink reservation '{}' in pool '{}' by {} ({bytes} bytes): it holds {} ({cur} bytes)",
                    self.state.name,
                    self.state.node.path,
                    human(bytes),
                    human(cur)
                )));
            }
            match self.state.size.compare_exchange(
                cur,
                cur - bytes,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        self.mgr.release(&self.state.node, bytes)
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
        let bytes = self.state.size.swap(0, Ordering::AcqRel);
        if bytes > 0 {
            if let Err(e) = self.mgr.release(&self.state.node, bytes) {
                log::warn!(
                    "[{}] freeing reservation '{}': {e}",
                    self.mgr.name,
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
        self.mgr.consumers.lock().remove(&self.state.id);
    }
}

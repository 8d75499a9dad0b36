//! Per-manager configuration.

use crate::error::{MemoryError, Result};

/// Default size of one reservation block: the unit in which the manager asks the listener (the
/// JVM) for memory. 8 MiB means at most 128 listener calls per GiB grown.
pub const DEFAULT_RESERVATION_BLOCK_BYTES: u64 = 8 << 20;

/// The default reservation quantum, which makes the grow/shrink fast path touch no shared counter
/// in steady state (see [`MemoryConfig::reservation_quantum`]): 1 MiB, like Velox's smallest
/// quantum. 0 (exact accounting) is opt-in.
pub const RECOMMENDED_RESERVATION_QUANTUM_BYTES: u64 = 1 << 20;

/// Configuration of one [`MemoryManager`](crate::MemoryManager). Immutable once the manager is built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Bytes asked of the listener at a time (rounded up to a multiple of this). Must be > 0.
    pub reservation_block: u64,
    /// Upper bound on the bytes the task may use, enforced by the root pool. `None`: no limit
    /// besides what the listener grants.
    pub task_limit: Option<u64>,
    /// Per-reservation slack, in bytes ([`RECOMMENDED_RESERVATION_QUANTUM_BYTES`], 1 MiB, by
    /// default; 0, opt-in: exact accounting, every grow charges every pool level, so pools' `used`
    /// and `peak` equal what consumers hold byte for byte). With a quantum `q > 0` a reservation charges its pools in multiples of
    /// its quantum and serves grows and shrinks from what it already charged: the common
    /// `try_grow` / `shrink` is one atomic read-modify-write on the reservation's own cache line,
    /// shared with no other reservation or thread (none at all through
    /// [`Reservation::try_grow_exclusive`](crate::Reservation::try_grow_exclusive) on `&mut`).
    /// `Pool::allocate` charges the same way, through a slack per pool for its allocations.
    /// A reservation's quantum grows with it, like
    /// Velox's: `q` up to `16 * q` held, then 1/16 of its size rounded up to a power of two, at
    /// most `8 * q`. The cost, bounded: a pool's `used` and `peak` may run ahead of what its
    /// consumers hold by **at most two quanta per live reservation and per pool with
    /// allocations at or below it: `max(2 * q, size / 4)`, never more than `16 * q`** (slack
    /// above two quanta is given back by the shrink or free that creates it, down to one);
    /// consumers' sizes, the
    /// usage report's consumer lines and leak reports stay exact; what consumers hold never
    /// exceeds a limit. Slack is taken back from every reservation before a grow is refused or
    /// operators are spilled, and when Spark reclaims memory. See
    /// [`RECOMMENDED_RESERVATION_QUANTUM_BYTES`].
    pub reservation_quantum: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            reservation_block: DEFAULT_RESERVATION_BLOCK_BYTES,
            task_limit: None,
            reservation_quantum: RECOMMENDED_RESERVATION_QUANTUM_BYTES,
        }
    }
}

impl MemoryConfig {
    /// Returns a copy with the reservation block size set, in bytes.
    pub fn with_reservation_block(mut self, bytes: u64) -> Self {
        self.reservation_block = bytes;
        self
    }

    /// Returns a copy with the task limit set, in bytes (`None` removes it).
    pub fn with_task_limit(mut self, bytes: Option<u64>) -> Self {
        self.task_limit = bytes;
        self
    }

    /// Returns a copy with the reservation quantum set, in bytes (0: exact accounting; the default
    /// is [`RECOMMENDED_RESERVATION_QUANTUM_BYTES`]). See
    /// [`MemoryConfig::reservation_quantum`].
    pub fn with_reservation_quantum(mut self, bytes: u64) -> Self {
        self.reservation_quantum = bytes;
        self
    }

    /// Checks the values: the block must be in `1..=2^62` bytes, the quantum at most 2^40 bytes.
    pub fn validate(&self) -> Result<()> {
        if self.reservation_block == 0 || self.reservation_block > (1 << 62) {
            return Err(MemoryError::InvalidArgument(format!(
                "reservation block must be between 1 byte and 4 EiB, got {} bytes",
                self.reservation_block
            )));
        }
        if self.reservation_quantum > (1 << 40) {
            return Err(MemoryError::InvalidArgument(format!(
                "reservation quantum must be at most 1 TiB, got {} bytes",
                self.reservation_quantum
            )));
        }
        if let Some(limit) = self.task_limit {
            if limit > i64::MAX as u64 {
                return Err(MemoryError::InvalidArgument(format!(
                    "task limit must be at most {} bytes, got {limit}",
                    i64::MAX
                )));
            }
        }
        Ok(())
    }
}

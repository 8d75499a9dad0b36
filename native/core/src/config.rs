//! Per-manager configuration.

use crate::error::{MemoryError, Result};

/// Default size of one reservation block: the unit in which the manager asks the listener (the
/// JVM) for memory. 8 MiB means at most 128 listener calls per GiB grown.
pub const DEFAULT_RESERVATION_BLOCK_BYTES: u64 = 8 << 20;

/// Configuration of one [`MemoryManager`](crate::MemoryManager). Immutable once the manager is built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Bytes asked of the listener at a time (rounded up to a multiple of this). Must be > 0.
    pub reservation_block: u64,
    /// Upper bound on the bytes the task may use, enforced by the root pool. `None`: no limit
    /// besides what the listener grants.
    pub task_limit: Option<u64>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            reservation_block: DEFAULT_RESERVATION_BLOCK_BYTES,
            task_limit: None,
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

    /// Checks the values: the block must be in `1..=2^62` bytes.
    pub fn validate(&self) -> Result<()> {
        if self.reservation_block == 0 || self.reservation_block > (1 << 62) {
            return Err(MemoryError::InvalidArgument(format!(
                "reservation block must be between 1 byte and 4 EiB, got {} bytes",
                self.reservation_block
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

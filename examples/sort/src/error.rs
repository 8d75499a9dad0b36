//! The error type of the examples crate.

use std::io;
use std::path::PathBuf;

use nativemem_client::Code;

/// Result alias of this crate.
pub type Result<T, E = SortError> = std::result::Result<T, E>;

/// Everything that can go wrong in the external sort.
#[derive(Debug, thiserror::Error)]
pub enum SortError {
    /// The task's memory manager refused memory ([`Code::OutOfMemory`], whose message is the
    /// usage report), was closed ([`Code::StaleHandle`] or [`Code::Closed`]), or failed
    /// otherwise; decide on its [`code`](nativemem_client::Error::code).
    #[error(transparent)]
    Memory(#[from] nativemem_client::Error),
    /// Reading, writing, creating or deleting a spill file failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. `create spill file`.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A spill file did not hold what was written to it (truncated or changed on disk).
    #[error("spill file {} is corrupt: {message}", path.display())]
    CorruptRun {
        /// The file.
        path: PathBuf,
        /// What did not match.
        message: String,
    },
    /// An option or argument the sorter does not accept; nothing changed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The sorter cannot be used any more: a spill panicked and lost buffered keys, or the
    /// sorter's output was already taken.
    #[error("sorter '{sorter}' is unusable: {reason}")]
    Unusable {
        /// Name of the sorter.
        sorter: String,
        /// Why.
        reason: String,
    },
}

impl SortError {
    /// True for an out-of-memory error of the memory manager.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, SortError::Memory(e) if e.is_out_of_memory())
    }

    /// True if the task's manager is closed or closing (the sorter's calls then all fail).
    pub fn is_closed(&self) -> bool {
        matches!(self, SortError::Memory(e) if matches!(e.code, Code::StaleHandle | Code::Closed))
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> SortError {
        SortError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

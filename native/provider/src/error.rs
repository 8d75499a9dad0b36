//! The provider's error type and the one place that turns it into an engine ABI status code.
//!
//! | error                                                  | status (`include/nativemem.h`) |
//! |--------------------------------------------------------|--------------------------------|
//! | `MemoryError::OutOfMemory`, [`HandleError::Full`]      | `NM_ERR_OUT_OF_MEMORY`         |
//! | `MemoryError::InvalidArgument`, [`Error::InvalidArgument`], [`Error::NullArgument`] | `NM_ERR_INVALID_ARGUMENT` |
//! | `MemoryError::Closed`, [`Error::Closed`]               | `NM_ERR_CLOSED`                |
//! | `MemoryError::Listener`, `MemoryError::ListenerContract` | `NM_ERR_LISTENER`            |
//! | `MemoryError::Spill`                                   | `NM_ERR_SPILL`                 |
//! | `MemoryError::UnknownAllocation`                       | `NM_ERR_UNKNOWN_POINTER`       |
//! | [`HandleError::Stale`]                                 | `NM_ERR_STALE_HANDLE`          |
//! | any other [`HandleError`] (forged, wrong kind, null)   | `NM_ERR_INVALID_HANDLE`        |
//! | [`Error::CloseTimedOut`]                               | `NM_ERR_TIMEOUT`               |
//! | [`Error::Panic`], [`Error::Other`]                     | `NM_ERR_INTERNAL`              |
//!
//! The Java binding (`nativemem-jni`) wraps this type in its own, which adds JNI failures, and
//! maps both to Java exceptions in one place of its own.

use std::any::Any;

use nativemem_core::MemoryError;
use nativemem_handles::HandleError;
use nativemem_sys::*;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a call on the registry or the engine ABI can fail with. Build it with `?` from
/// [`MemoryError`] or [`HandleError`]; [`Error::status`] is its ABI status code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error of the memory manager.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A destroyed, double-destroyed, forged or wrong-kind handle.
    #[error(transparent)]
    Handle(#[from] HandleError),
    /// The object is closed or closing: no new call is accepted.
    #[error("{0}")]
    Closed(String),
    /// A bad argument detected at the boundary (negative size, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// A required argument was null; the value names the parameter.
    #[error("{0} must not be null")]
    NullArgument(&'static str),
    /// Close gave up waiting for calls or leases in flight; the last one to end runs the close.
    #[error("{0}")]
    CloseTimedOut(String),
    /// A Rust panic caught at the boundary.
    #[error("native panic: {0}")]
    Panic(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// The status code of this error at the engine ABI (see the module table).
    pub fn status(&self) -> nm_status {
        match self {
            Error::Memory(e) => match e {
                MemoryError::OutOfMemory(_) => NM_ERR_OUT_OF_MEMORY,
                MemoryError::InvalidArgument(_) => NM_ERR_INVALID_ARGUMENT,
                MemoryError::Closed { .. } => NM_ERR_CLOSED,
                MemoryError::Listener { .. } | MemoryError::ListenerContract(_) => NM_ERR_LISTENER,
                MemoryError::Spill { .. } => NM_ERR_SPILL,
                MemoryError::UnknownAllocation { .. } => NM_ERR_UNKNOWN_POINTER,
                #[allow(unreachable_patterns)]
                _ => NM_ERR_INTERNAL,
            },
            Error::Handle(HandleError::Stale { .. }) => NM_ERR_STALE_HANDLE,
            Error::Handle(HandleError::Full { .. }) => NM_ERR_OUT_OF_MEMORY,
            Error::Handle(_) => NM_ERR_INVALID_HANDLE,
            Error::Closed(_) => NM_ERR_CLOSED,
            Error::InvalidArgument(_) | Error::NullArgument(_) => NM_ERR_INVALID_ARGUMENT,
            Error::CloseTimedOut(_) => NM_ERR_TIMEOUT,
            Error::Panic(_) | Error::Other(_) => NM_ERR_INTERNAL,
        }
    }
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::panic;

    #[test]
    fn panic_messages() {
        let p = panic::catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "plain");
        let n = 3;
        let p = panic::catch_unwind(|| panic!("formatted {n}")).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "formatted 3");
        let p = panic::catch_unwind(|| std::panic::panic_any(5u8)).unwrap_err();
        assert_eq!(
            panic_message(p.as_ref()),
            "a panic with a non-string payload"
        );
    }
}

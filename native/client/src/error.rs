//! The error of every fallible call: the table's status code plus the message it returned.

use std::ffi::{c_char, CStr};
use std::fmt;

use nativemem_sys as sys;

/// The error type callbacks (`Spiller::spill`, `Listener`) return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Result of every fallible call of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, one variant per `NM_ERR_*` code of `include/nativemem.h`.
///
/// Decide on the code, never on the message text. New codes may be added by newer libraries;
/// they arrive as [`Code::Other`].
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    /// `NM_ERR_INVALID_ARGUMENT`: a size, name, path, alignment or limit the ABI does not accept
    /// (also: a string with an interior NUL, refused before the call). Nothing changed.
    InvalidArgument,
    /// `NM_ERR_STALE_HANDLE`: the object was closed since (also: the manager was closed).
    StaleHandle,
    /// `NM_ERR_INVALID_HANDLE`: the handle is 0, of another kind, or was never issued.
    InvalidHandle,
    /// `NM_ERR_CLOSED`: the manager is closing or closed; no new work is accepted.
    Closed,
    /// `NM_ERR_OUT_OF_MEMORY`: limits, Spark and spilling together could not provide the bytes.
    /// Nothing changed. The message is the request, the pool that refused and the usage report.
    OutOfMemory,
    /// `NM_ERR_UNKNOWN_POINTER`: `free` of a pointer the manager did not allocate.
    UnknownPointer,
    /// `NM_ERR_LISTENER`: the reservation listener (Spark) failed; the message carries its error.
    Listener,
    /// `NM_ERR_SPILL`: a spiller failed while freeing memory for this request.
    Spill,
    /// `NM_ERR_UNSUPPORTED`: the library does not support what was asked (e.g. the table is
    /// older or smaller than this client needs).
    Unsupported,
    /// `NM_ERR_TIMEOUT`: a close found calls or leases still held at its time limit.
    Timeout,
    /// `NM_ERR_INTERNAL`: a bug inside nativemem was caught at the boundary.
    Internal,
    /// A code this client does not know (from a newer library). Treat it as an error.
    Other(i32),
}

impl Code {
    /// The code of a non-zero status. (`NM_OK` is not an error; it maps to `Other(0)`.)
    pub fn from_status(status: sys::nm_status) -> Code {
        match status {
            sys::NM_ERR_INVALID_ARGUMENT => Code::InvalidArgument,
            sys::NM_ERR_STALE_HANDLE => Code::StaleHandle,
            sys::NM_ERR_INVALID_HANDLE => Code::InvalidHandle,
            sys::NM_ERR_CLOSED => Code::Closed,
            sys::NM_ERR_OUT_OF_MEMORY => Code::OutOfMemory,
            sys::NM_ERR_UNKNOWN_POINTER => Code::UnknownPointer,
            sys::NM_ERR_LISTENER => Code::Listener,
            sys::NM_ERR_SPILL => Code::Spill,
            sys::NM_ERR_UNSUPPORTED => Code::Unsupported,
            sys::NM_ERR_TIMEOUT => Code::Timeout,
            sys::NM_ERR_INTERNAL => Code::Internal,
            other => Code::Other(other),
        }
    }

    /// The `nm_status` value of this code.
    pub fn status(self) -> sys::nm_status {
        match self {
            Code::InvalidArgument => sys::NM_ERR_INVALID_ARGUMENT,
            Code::StaleHandle => sys::NM_ERR_STALE_HANDLE,
            Code::InvalidHandle => sys::NM_ERR_INVALID_HANDLE,
            Code::Closed => sys::NM_ERR_CLOSED,
            Code::OutOfMemory => sys::NM_ERR_OUT_OF_MEMORY,
            Code::UnknownPointer => sys::NM_ERR_UNKNOWN_POINTER,
            Code::Listener => sys::NM_ERR_LISTENER,
            Code::Spill => sys::NM_ERR_SPILL,
            Code::Unsupported => sys::NM_ERR_UNSUPPORTED,
            Code::Timeout => sys::NM_ERR_TIMEOUT,
            Code::Internal => sys::NM_ERR_INTERNAL,
            Code::Other(status) => status,
        }
    }

    /// The name of the code in the header (`NM_ERR_OUT_OF_MEMORY`), or `NM_ERR(<n>)`.
    pub fn name(self) -> std::borrow::Cow<'static, str> {
        let name = match self {
            Code::InvalidArgument => "NM_ERR_INVALID_ARGUMENT",
            Code::StaleHandle => "NM_ERR_STALE_HANDLE",
            Code::InvalidHandle => "NM_ERR_INVALID_HANDLE",
            Code::Closed => "NM_ERR_CLOSED",
            Code::OutOfMemory => "NM_ERR_OUT_OF_MEMORY",
            Code::UnknownPointer => "NM_ERR_UNKNOWN_POINTER",
            Code::Listener => "NM_ERR_LISTENER",
            Code::Spill => "NM_ERR_SPILL",
            Code::Unsupported => "NM_ERR_UNSUPPORTED",
            Code::Timeout => "NM_ERR_TIMEOUT",
            Code::Internal => "NM_ERR_INTERNAL",
            Code::Other(status) => return format!("NM_ERR({status})").into(),
        };
        name.into()
    }

    /// True for the codes that mean "the manager or this object is gone": what a `Drop` after the
    /// manager's close meets, and ignores.
    pub(crate) fn is_gone(self) -> bool {
        matches!(self, Code::StaleHandle | Code::Closed)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// An error returned by the nativemem table (or refused by this client before calling it).
///
/// `Display` is `"<CODE>: <message>"`; for [`Code::OutOfMemory`] the message holds the request,
/// the pool that refused and the task's usage report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    /// What went wrong; decide on this.
    pub code: Code,
    /// The library's message (owned: the C string was copied and freed).
    pub message: String,
}

impl Error {
    /// An error with this code and message.
    pub fn new(code: Code, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
        }
    }

    /// True if the request did not fit (limits, Spark and spilling); nothing changed.
    pub fn is_out_of_memory(&self) -> bool {
        self.code == Code::OutOfMemory
    }

    pub(crate) fn invalid_argument(message: impl Into<String>) -> Error {
        Error::new(Code::InvalidArgument, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

/// Copies a C string the table returned into a `String` (lossy UTF-8) and frees it with the
/// table's `free_message`. Null gives `None`.
///
/// # Safety
/// `message` is null or a NUL-terminated string `table` returned and nobody freed.
pub(crate) unsafe fn take_message(table: &sys::NmApi, message: *mut c_char) -> Option<String> {
    if message.is_null() {
        return None;
    }
    // SAFETY: the caller guarantees a live NUL-terminated string from this table.
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: the string came from this table and is freed exactly once, here.
    unsafe { (table.free_message)(message) };
    Some(text)
}

/// The one place a status becomes a `Result`: `NM_OK` is `Ok`, anything else an [`Error`] with
/// the table's message (freed here) or, if the table gave none, the code's description.
///
/// # Safety
/// `message` is null or a message `table` returned through `err` and nobody freed.
pub(crate) unsafe fn check(
    table: &sys::NmApi,
    status: sys::nm_status,
    message: *mut c_char,
) -> Result<()> {
    // SAFETY: forwarded from the caller; freed even on success (the header sets it to NULL then,
    // but a non-null one would otherwise leak).
    let text = unsafe { take_message(table, message) };
    if status == sys::NM_OK {
        return Ok(());
    }
    let code = Code::from_status(status);
    let message = text.unwrap_or_else(|| format!("{code} (the library gave no message)"));
    Err(Error { code, message })
}

//! The Java layer's error type: the provider's error ([`ProviderError`]: core, handles, arguments,
//! close) or a failed JNI call. Turning it into a Java exception is the `exception` module's.

use nativemem_core::MemoryError;
use nativemem_handles::HandleError;

pub use nativemem_provider::Error as ProviderError;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything an export can fail with. Build it with `?` from [`ProviderError`], [`MemoryError`],
/// [`HandleError`] or `jni::errors::Error`, or with `ProviderError::….into()`; `exception::throw`
/// maps it to a Java exception.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error of the provider: the registry, the core, a handle, an argument.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// A JNI call failed. `jni::errors::Error::JavaException` means a Java exception is pending.
    #[error("JNI call failed: {0}")]
    Jni(#[from] jni::errors::Error),
}

impl From<MemoryError> for Error {
    fn from(e: MemoryError) -> Self {
        Error::Provider(e.into())
    }
}

impl From<HandleError> for Error {
    fn from(e: HandleError) -> Self {
        Error::Provider(e.into())
    }
}

//! The JNI kit for an engine in its own library (feature `jni`): what every engine's `Java_*`
//! exports need, written once.
//!
//! The shape of every export is resolve arguments, call an inner function returning
//! [`Result`], turn the error into one Java exception in one place ([`run_export`]):
//!
//! ```ignore
//! use nativemem_client::java::{non_negative, run_export, to_jlong, JavaError};
//!
//! #[no_mangle]
//! pub extern "system" fn Java_org_example_Op_nativeRun<'l>(
//!     mut env: JNIEnv<'l>, _class: JClass<'l>, handle: jlong, bytes: jlong,
//! ) -> jlong {
//!     run_export(&mut env, 0, |_env| {
//!         let bytes = non_negative("bytes", bytes)?;
//!         Ok(to_jlong(OPS.get(handle)?.run(bytes)?))
//!     })
//! }
//! ```
//!
//! # Errors and exceptions
//! [`JavaError`] is what an export fails with; [`exception`] is the one table from it to a Java
//! exception:
//!
//! | error                                               | Java exception                      |
//! |-----------------------------------------------------|-------------------------------------|
//! | `NM_ERR_OUT_OF_MEMORY` (message: the usage report)  | `org.nativemem.NativeOutOfMemoryException` |
//! | `NM_ERR_INVALID_ARGUMENT`, [`JavaError::InvalidArgument`] | `IllegalArgumentException`    |
//! | `NM_ERR_STALE_HANDLE` / `_INVALID_HANDLE` / `_CLOSED`, a bad engine handle, [`JavaError::IllegalState`] | `IllegalStateException` |
//! | a `null` argument ([`JavaError::NullArgument`])     | `NullPointerException`              |
//! | an engine's own exception ([`JavaError::Throw`])    | what the engine builds              |
//! | anything else (JNI failure, panic, other codes)     | `org.nativemem.NativeMemoryException` |
//!
//! A Java exception already pending (a JNI call failed because of it) is kept. The exception
//! classes are found by name on the calling Java thread: `FindClass` there uses the class loader
//! of the engine's Java class, which sees `org.nativemem` also when both jars come from Spark's
//! `--jars`.
//!
//! # Logging
//! An engine's library has its own copy of the `log` facade. [`run_export`] installs a stderr
//! logger once per library ([`init_logging`]), filtered by `NATIVEMEM_LOG` (`env_logger` syntax,
//! default `warn`) as nativemem's own library is, unless the process has one already.

use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

pub use jni;
use jni::objects::{JString, JThrowable};
use jni::sys::{jlong, jlongArray};
use jni::JNIEnv;
use nativemem_handles::HandleError;

pub use crate::api::panic_message;
use crate::error::{Code, Error};

/// Result alias of JNI exports' inner functions.
pub type Result<T, E = JavaError> = std::result::Result<T, E>;

/// Builds an engine's own exception object on the calling Java thread.
pub type BuildException =
    Box<dyn for<'a> FnOnce(&mut JNIEnv<'a>) -> jni::errors::Result<JThrowable<'a>> + Send>;

/// Everything an export can fail with; [`exception`] maps it to a Java exception.
pub enum JavaError {
    /// An error of the engine ABI (the manager, its pools and memory): mapped by its code.
    Memory(Error),
    /// A closed, forged or wrong-kind handle of the engine's own table.
    Handle(HandleError),
    /// The engine's object is closed, busy or unusable.
    IllegalState(String),
    /// A bad argument or option.
    InvalidArgument(String),
    /// A required argument was `null`; the value names the parameter.
    NullArgument(&'static str),
    /// A JNI call failed. `jni::errors::Error::JavaException` means a Java exception is pending.
    Jni(jni::errors::Error),
    /// A Rust panic caught at the export.
    Panic(String),
    /// Anything else: `NativeMemoryException` with this text.
    Other(String),
    /// An exception of the engine's own class: `build` makes it; if that fails with no Java
    /// exception pending, `NativeMemoryException(fallback)` is thrown instead.
    Throw {
        /// Makes the exception object.
        build: BuildException,
        /// The message of the `NativeMemoryException` thrown if `build` fails.
        fallback: String,
    },
}

impl JavaError {
    /// An exception of the engine's own class, built by `build` (see [`JavaError::Throw`]).
    pub fn throw(
        fallback: impl Into<String>,
        build: impl for<'a> FnOnce(&mut JNIEnv<'a>) -> jni::errors::Result<JThrowable<'a>>
            + Send
            + 'static,
    ) -> JavaError {
        JavaError::Throw {
            build: Box::new(build),
            fallback: fallback.into(),
        }
    }
}

impl fmt::Display for JavaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JavaError::Memory(e) => e.fmt(f),
            JavaError::Handle(e) => e.fmt(f),
            JavaError::IllegalState(m) | JavaError::InvalidArgument(m) | JavaError::Other(m) => {
                f.write_str(m)
            }
            JavaError::NullArgument(name) => write!(f, "{name} must not be null"),
            JavaError::Jni(e) => write!(f, "JNI call failed: {e}"),
            JavaError::Panic(m) => write!(f, "native panic: {m}"),
            JavaError::Throw { fallback, .. } => f.write_str(fallback),
        }
    }
}

impl fmt::Debug for JavaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            JavaError::Memory(_) => "Memory",
            JavaError::Handle(_) => "Handle",
            JavaError::IllegalState(_) => "IllegalState",
            JavaError::InvalidArgument(_) => "InvalidArgument",
            JavaError::NullArgument(_) => "NullArgument",
            JavaError::Jni(_) => "Jni",
            JavaError::Panic(_) => "Panic",
            JavaError::Other(_) => "Other",
            JavaError::Throw { .. } => "Throw",
        };
        write!(f, "{kind}({self})")
    }
}

impl std::error::Error for JavaError {}

impl From<Error> for JavaError {
    fn from(e: Error) -> Self {
        JavaError::Memory(e)
    }
}

impl From<HandleError> for JavaError {
    fn from(e: HandleError) -> Self {
        JavaError::Handle(e)
    }
}

impl From<jni::errors::Error> for JavaError {
    fn from(e: jni::errors::Error) -> Self {
        JavaError::Jni(e)
    }
}

/// `org.nativemem.NativeOutOfMemoryException` (JNI name).
pub const OUT_OF_MEMORY: &str = "org/nativemem/NativeOutOfMemoryException";
/// `org.nativemem.NativeMemoryException` (JNI name).
pub const NATIVE_MEMORY: &str = "org/nativemem/NativeMemoryException";
/// `java.lang.IllegalArgumentException` (JNI name).
pub const ILLEGAL_ARGUMENT: &str = "java/lang/IllegalArgumentException";
/// `java.lang.IllegalStateException` (JNI name).
pub const ILLEGAL_STATE: &str = "java/lang/IllegalStateException";
/// `java.lang.NullPointerException` (JNI name).
pub const NULL_POINTER: &str = "java/lang/NullPointerException";

/// The Java exception class (JNI name) and message for `err` (the module's table); `None` if a
/// Java exception is pending already, or if the engine builds the exception itself
/// ([`JavaError::Throw`]).
pub fn exception(err: &JavaError) -> Option<(&'static str, String)> {
    let mapped = match err {
        JavaError::Memory(e) => match e.code {
            // The code is what the exception class says; the message is the library's text.
            Code::OutOfMemory => (OUT_OF_MEMORY, e.message.clone()),
            Code::InvalidArgument => (ILLEGAL_ARGUMENT, e.message.clone()),
            Code::StaleHandle | Code::InvalidHandle | Code::Closed => {
                (ILLEGAL_STATE, e.message.clone())
            }
            _ => (NATIVE_MEMORY, e.to_string()),
        },
        JavaError::Handle(_) | JavaError::IllegalState(_) => (ILLEGAL_STATE, err.to_string()),
        JavaError::InvalidArgument(_) => (ILLEGAL_ARGUMENT, err.to_string()),
        JavaError::NullArgument(_) => (NULL_POINTER, err.to_string()),
        JavaError::Jni(jni::errors::Error::JavaException) | JavaError::Throw { .. } => return None,
        JavaError::Jni(_) | JavaError::Panic(_) | JavaError::Other(_) => {
            (NATIVE_MEMORY, err.to_string())
        }
    };
    Some(mapped)
}

/// Throws the Java exception for `err` (see the module table). Keeps an exception that is
/// already pending. Never fails: if even throwing fails, the error is logged.
pub fn throw(env: &mut JNIEnv, err: JavaError) {
    match env.exception_check() {
        Ok(false) => {}
        Ok(true) => {
            log::debug!("keeping the pending Java exception instead of throwing for: {err}");
            return;
        }
        Err(e) => {
            log::error!("cannot check for a pending Java exception ({e}); dropping error: {err}");
            return;
        }
    }
    let (class, message) = match err {
        JavaError::Throw { build, fallback } => match build(env) {
            Ok(exception) => {
                if let Err(e) = env.throw(exception) {
                    log::error!("throwing the engine's exception failed ({e}): {fallback}");
                }
                return;
            }
            Err(_) if env.exception_check().unwrap_or(true) => return,
            Err(_) => (NATIVE_MEMORY, fallback),
        },
        err => exception(&err).unwrap_or((
            // A JNI call reported a pending exception that is no longer pending (it was
            // cleared): report it as a plain failure rather than losing it.
            NATIVE_MEMORY,
            "a JNI call failed with a Java exception that is no longer pending".to_string(),
        )),
    };
    if let Err(e) = env.throw_new(class, &message) {
        log::error!("failed to throw {class} ({e}): {message}");
    }
}

/// Runs an export body: returns its value, or throws the Java exception for its error (or for a
/// panic, as `NativeMemoryException("native panic: ...")`) and returns `on_error`, which the JVM
/// ignores because an exception is pending. Installs the library's logger on first use.
///
/// No panic leaves this function: both the body and the throwing are guarded.
pub fn run_export<'local, R>(
    env: &mut JNIEnv<'local>,
    on_error: R,
    body: impl FnOnce(&mut JNIEnv<'local>) -> Result<R>,
) -> R {
    init_logging();
    let err = match panic::catch_unwind(AssertUnwindSafe(|| body(env))) {
        Ok(Ok(value)) => return value,
        Ok(Err(err)) => err,
        Err(payload) => JavaError::Panic(panic_message(payload.as_ref())),
    };
    if panic::catch_unwind(AssertUnwindSafe(|| throw(env, err))).is_err() {
        log::error!("panic while throwing a Java exception; the error is lost");
    }
    on_error
}

/// Environment variable that filters an engine library's logging (`env_logger` syntax), as for
/// nativemem's own library.
pub const LOG_ENV: &str = "NATIVEMEM_LOG";

/// Installs the stderr logger of this library once, filtered by [`LOG_ENV`] (default `warn`),
/// unless the process already has one. [`run_export`] calls it; cheap after the first call.
pub fn init_logging() {
    static LOGGING: Once = Once::new();
    LOGGING.call_once(|| {
        let env = env_logger::Env::new().filter_or(LOG_ENV, "warn");
        if env_logger::Builder::from_env(env).try_init().is_err() {
            log::debug!("a logger is already installed; this engine logs through it");
        }
    });
}

/// A non-null `String` argument; `name` names the parameter in the error.
pub fn string_arg(env: &mut JNIEnv, value: &JString, name: &'static str) -> Result<String> {
    if value.is_null() {
        return Err(JavaError::NullArgument(name));
    }
    // SAFETY: `value` is a non-null reference to a java.lang.String: the JVM type-checks the
    // arguments of a native method against its declared parameter types (String here).
    let s = unsafe { env.get_string_unchecked(value) }?;
    Ok(s.into())
}

/// A size or count argument: must be `>= 0`.
pub fn non_negative(name: &str, value: jlong) -> Result<u64> {
    u64::try_from(value)
        .map_err(|_| JavaError::InvalidArgument(format!("{name} must be >= 0, got {value}")))
}

/// An optional size argument: `-1` means none; other values must be `>= 0`.
pub fn optional_size(name: &str, value: jlong) -> Result<Option<u64>> {
    match value {
        -1 => Ok(None),
        v => non_negative(name, v).map(Some),
    }
}

/// A count for Java (saturating at `Long.MAX_VALUE`, which no count reaches in practice).
pub fn to_jlong(value: u64) -> jlong {
    jlong::try_from(value).unwrap_or(jlong::MAX)
}

/// A new Java `long[]` holding `values`, bit for bit (a digest may use all 64 bits; counts never
/// reach 2^63).
pub fn long_array(env: &mut JNIEnv, values: &[u64]) -> Result<jlongArray> {
    let len = i32::try_from(values.len())
        .map_err(|_| JavaError::Other(format!("{} values exceed a Java array", values.len())))?;
    let array = env.new_long_array(len)?;
    let values: Vec<i64> = values.iter().map(|v| *v as i64).collect();
    env.set_long_array_region(&array, 0, &values)?;
    Ok(array.into_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(code: Code, message: &str) -> JavaError {
        JavaError::Memory(Error {
            code,
            message: message.to_string(),
        })
    }

    #[test]
    fn errors_map_to_one_exception_each() {
        let cases = [
            (memory(Code::OutOfMemory, "report"), OUT_OF_MEMORY, "report"),
            (
                memory(Code::InvalidArgument, "bad"),
                ILLEGAL_ARGUMENT,
                "bad",
            ),
            (memory(Code::StaleHandle, "stale"), ILLEGAL_STATE, "stale"),
            (
                memory(Code::InvalidHandle, "forged"),
                ILLEGAL_STATE,
                "forged",
            ),
            (memory(Code::Closed, "closed"), ILLEGAL_STATE, "closed"),
            (
                JavaError::IllegalState("sorter 'x' is closed".into()),
                ILLEGAL_STATE,
                "sorter 'x' is closed",
            ),
            (
                JavaError::InvalidArgument("rows must be >= 1".into()),
                ILLEGAL_ARGUMENT,
                "rows must be >= 1",
            ),
            (
                JavaError::NullArgument("name"),
                NULL_POINTER,
                "name must not be null",
            ),
            (
                JavaError::Panic("boom".into()),
                NATIVE_MEMORY,
                "native panic: boom",
            ),
            (JavaError::Other("io".into()), NATIVE_MEMORY, "io"),
        ];
        for (err, class, message) in cases {
            assert_eq!(
                exception(&err),
                Some((class, message.to_string())),
                "{err:?}"
            );
        }
        let other = memory(Code::Listener, "spark said no");
        let (class, message) = exception(&other).unwrap();
        assert_eq!(class, NATIVE_MEMORY);
        assert!(message.contains("spark said no"), "{message}");
        assert_eq!(
            exception(&JavaError::Jni(jni::errors::Error::JavaException)),
            None
        );
        assert_eq!(
            exception(&JavaError::throw("fallback", |_| {
                Err(jni::errors::Error::JavaException)
            })),
            None
        );
    }

    #[test]
    fn arguments() {
        assert_eq!(non_negative("bytes", 0).unwrap(), 0);
        assert_eq!(non_negative("bytes", i64::MAX).unwrap(), i64::MAX as u64);
        assert_eq!(
            non_negative("bytes", -1).unwrap_err().to_string(),
            "bytes must be >= 0, got -1"
        );
        assert_eq!(optional_size("limit", -1).unwrap(), None);
        assert_eq!(optional_size("limit", 5).unwrap(), Some(5));
        assert!(optional_size("limit", -2).is_err());
        assert_eq!(to_jlong(7), 7);
        assert_eq!(to_jlong(u64::MAX), i64::MAX);
    }
}

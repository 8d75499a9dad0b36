//! The export guard and the argument helpers: the shape of every export is resolve arguments,
//! call an inner function returning [`Result`], map the error in one place ([`throw`]);
//! [`run_export`] adds the panic guard. (The exports themselves are in `exports`.)
//!
//! ```ignore
//! #[no_mangle]
//! pub extern "system" fn Java_org_example_Op_nativeRun<'l>(
//!     mut env: JNIEnv<'l>, _class: JClass<'l>, manager: jlong, bytes: jlong,
//! ) -> jlong {
//!     run_export(&mut env, 0, |_env| {
//!         let bytes = non_negative("bytes", bytes)?;
//!         with_manager(manager, |m| Ok(to_jlong(m.spill(bytes)?)))
//!     })
//! }
//! ```

use std::panic::{self, AssertUnwindSafe};

use jni::objects::JString;
use jni::sys::jlong;
use jni::JNIEnv;

use crate::error::{ProviderError, Result};
use crate::exception::throw;
use nativemem_provider::panic_message;

/// Runs an export body: returns its value, or throws the Java exception for its error (or for a
/// panic, as `NativeMemoryException("native panic: ...")`) and returns `on_error`, which the JVM
/// ignores because an exception is pending.
///
/// No panic leaves this function: both the body and the throwing are guarded.
pub fn run_export<'local, R>(
    env: &mut JNIEnv<'local>,
    on_error: R,
    body: impl FnOnce(&mut JNIEnv<'local>) -> Result<R>,
) -> R {
    let err = match panic::catch_unwind(AssertUnwindSafe(|| body(env))) {
        Ok(Ok(value)) => return value,
        Ok(Err(err)) => err,
        Err(payload) => ProviderError::Panic(panic_message(payload.as_ref())).into(),
    };
    if panic::catch_unwind(AssertUnwindSafe(|| throw(env, err))).is_err() {
        log::error!("panic while throwing a Java exception; the error is lost");
    }
    on_error
}

/// A size argument in bytes: must be `>= 0`.
pub fn non_negative(name: &str, value: jlong) -> nativemem_provider::Result<u64> {
    u64::try_from(value)
        .map_err(|_| ProviderError::InvalidArgument(format!("{name} must be >= 0, got {value}")))
}

/// A byte count for Java (saturating at `Long.MAX_VALUE`, which no count reaches in practice).
pub fn to_jlong(value: u64) -> jlong {
    jlong::try_from(value).unwrap_or(jlong::MAX)
}

/// A non-null `String` argument.
pub fn string_arg(env: &mut JNIEnv, value: &JString, name: &'static str) -> Result<String> {
    if value.is_null() {
        return Err(ProviderError::NullArgument(name).into());
    }
    // SAFETY: `value` is a non-null reference to a java.lang.String: the JVM type-checks the
    // arguments of a native method against its declared parameter types (String here).
    let s = unsafe { env.get_string_unchecked(value) }?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(non_negative("bytes", 0).unwrap(), 0);
        assert_eq!(non_negative("bytes", i64::MAX).unwrap(), i64::MAX as u64);
        assert_eq!(
            non_negative("bytes", -1).unwrap_err().to_string(),
            "bytes must be >= 0, got -1"
        );
        assert_eq!(to_jlong(7), 7);
        assert_eq!(to_jlong(u64::MAX), i64::MAX);
    }
}

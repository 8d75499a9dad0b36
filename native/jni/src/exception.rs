//! The one place that turns the Java layer's [`Error`] into a Java exception, and the Java
//! throwables a listener upcall caught ([`JavaException`], [`UpcallError`]). The provider knows
//! nothing of Java, so the Java mapping lives here:
//!
//! | Rust error                                   | Java exception                               |
//! |----------------------------------------------|----------------------------------------------|
//! | `MemoryError::OutOfMemory`                   | `org.nativemem.NativeOutOfMemoryException`, message = the error with the usage report |
//! | `MemoryError::InvalidArgument`, `ProviderError::InvalidArgument` | `IllegalArgumentException` |
//! | `MemoryError::Closed`, `ProviderError::Handle`, `ProviderError::Closed` | `IllegalStateException` (naming the handle in hex) |
//! | `ProviderError::NullArgument`                | `NullPointerException`                       |
//! | `MemoryError::Listener` caused by a Java throwable that is a `java.lang.Error` | that same `Error`, rethrown unchanged |
//! | `MemoryError::Listener` caused by any other Java throwable | `NativeMemoryException` with the throwable as its cause |
//! | everything else, including `ProviderError::Panic` | `org.nativemem.NativeMemoryException`   |
//!
//! If a Java exception is already pending when an error reaches the export (a JNI call failed
//! because of it), that exception is kept and nothing else is thrown.

use std::fmt;

use jni::objects::{GlobalRef, JObject, JValue};
use jni::JNIEnv;
use nativemem_core::{MemoryError, OomReason, OutOfMemory};

use crate::error::{Error, ProviderError, Result};
use crate::vm;

/// Why an upcall failed. It is the `source` of `MemoryError::Listener`.
#[derive(Debug)]
pub enum UpcallError {
    /// The Java listener threw.
    Java(JavaException),
    /// The listener returned a value outside its contract.
    Contract(String),
    /// The binding could not make the call (no VM, JNI failure).
    Binding(String),
}

impl UpcallError {
    pub(crate) fn binding(e: Error) -> UpcallError {
        UpcallError::Binding(e.to_string())
    }

    pub(crate) fn jni(e: jni::errors::Error) -> UpcallError {
        UpcallError::Binding(format!("JNI call failed: {e}"))
    }
}

impl From<jni::errors::Error> for UpcallError {
    fn from(e: jni::errors::Error) -> Self {
        UpcallError::jni(e)
    }
}

impl std::fmt::Display for UpcallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpcallError::Java(ex) => write!(f, "{ex}"),
            UpcallError::Contract(m) | UpcallError::Binding(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for UpcallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UpcallError::Java(ex) => Some(ex),
            _ => None,
        }
    }
}

impl Error {
    /// The [`JavaException`] this error carries, if a Java listener threw it.
    pub fn java_exception(&self) -> Option<&JavaException> {
        match self {
            Error::Provider(ProviderError::Memory(e)) => java_exception_in(e),
            _ => None,
        }
    }
}

/// Finds a Java throwable in a core error: a listener upcall that threw, possibly inside a spiller
/// that grew memory while spilling.
fn java_exception_in(err: &MemoryError) -> Option<&JavaException> {
    match err {
        MemoryError::Listener { source, .. } => match source.downcast_ref::<UpcallError>() {
            Some(UpcallError::Java(ex)) => Some(ex),
            _ => source.downcast_ref::<JavaException>(),
        },
        MemoryError::Spill { source, .. } => source
            .downcast_ref::<MemoryError>()
            .and_then(java_exception_in),
        _ => None,
    }
}

/// A Java throwable caught during an upcall, kept alive as a global reference so it can be
/// attached as the cause of the exception thrown to the caller (or rethrown). Its `Display` is the
/// throwable's `toString()`, taken when it was caught.
pub struct JavaException {
    throwable: GlobalRef,
    description: String,
    is_error: bool,
}

impl JavaException {
    /// Takes the pending exception of `env`, clearing it. Errors if none is pending.
    pub fn take(env: &mut JNIEnv) -> Result<JavaException> {
        let classes = vm::classes()?;
        let throwable = env.exception_occurred()?;
        if throwable.is_null() {
            return Err(ProviderError::Other("no Java exception is pending".into()).into());
        }
        env.exception_clear()?;
        let is_error = env.is_instance_of(&throwable, vm::as_class(&classes.error))?;
        let description = describe(env, &throwable);
        let throwable = env.new_global_ref(&throwable)?;
        Ok(JavaException {
            throwable,
            description,
            is_error,
        })
    }

    /// The throwable.
    pub fn throwable(&self) -> &GlobalRef {
        &self.throwable
    }

    /// True if the throwable is a `java.lang.Error` (rethrown unchanged, not wrapped).
    pub fn is_error(&self) -> bool {
        self.is_error
    }
}

/// `throwable.toString()`, or a fixed text if that throws too.
fn describe(env: &mut JNIEnv, throwable: &JObject) -> String {
    let text = (|| -> Result<String> {
        let classes = vm::classes()?;
        // SAFETY: `throwable_to_string` is `Throwable.toString()Ljava/lang/String;`, resolved on
        // `java.lang.Throwable`; `throwable` is a non-null Throwable; no arguments are passed.
        let s = unsafe {
            env.call_method_unchecked(
                throwable,
                classes.throwable_to_string,
                jni::signature::ReturnType::Object,
                &[],
            )
        }?
        .l()?;
        let s = jni::objects::JString::from(s);
        let text: String = env.get_string(&s)?.into();
        Ok(text)
    })();
    text.unwrap_or_else(|_| {
        // toString() threw: drop that exception, the original is what matters.
        let _ = env.exception_clear();
        "a Java throwable (its toString() failed)".to_string()
    })
}

impl fmt::Debug for JavaException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JavaException")
            .field("description", &self.description)
            .field("is_error", &self.is_error)
            .finish()
    }
}

impl fmt::Display for JavaException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

impl std::error::Error for JavaException {}

impl Drop for JavaException {
    fn drop(&mut self) {
        // The global reference is deleted right after this; make sure the thread is attached
        // so that does not attach and detach it.
        vm::attach_for_drop();
    }
}

/// Throws the Java exception for `err` in `env` (see the module table). Keeps an exception that
/// is already pending. Never fails: if even throwing fails, the error is logged.
pub fn throw(env: &mut JNIEnv, err: Error) {
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
    if let Err(e) = throw_mapped(env, &err) {
        log::error!("failed to throw a Java exception ({e}) for: {err}");
    }
}

/// Which Java exception class an error maps to (for throwing and for tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JavaExceptionKind {
    /// `org.nativemem.NativeOutOfMemoryException`.
    OutOfMemory,
    /// `java.lang.IllegalArgumentException`.
    IllegalArgument,
    /// `java.lang.IllegalStateException`.
    IllegalState,
    /// `java.lang.NullPointerException`.
    NullPointer,
    /// `org.nativemem.NativeMemoryException`, with the Java cause if the error carries one.
    NativeMemory,
    /// The Java `Error` a listener threw, rethrown unchanged.
    Rethrow,
    /// A Java exception is already pending; nothing to throw.
    Pending,
}

/// The mapping of the module table, without JNI.
pub fn exception_kind(err: &Error) -> JavaExceptionKind {
    use JavaExceptionKind as K;
    use ProviderError as P;
    match err {
        Error::Provider(P::Memory(MemoryError::OutOfMemory(_))) => K::OutOfMemory,
        Error::Provider(P::Memory(MemoryError::InvalidArgument(_)) | P::InvalidArgument(_)) => {
            K::IllegalArgument
        }
        Error::Provider(P::Memory(MemoryError::Closed { .. }) | P::Handle(_) | P::Closed(_)) => {
            K::IllegalState
        }
        Error::Provider(P::NullArgument(_)) => K::NullPointer,
        Error::Jni(jni::errors::Error::JavaException) => K::Pending,
        _ => match err.java_exception() {
            Some(ex) if ex.is_error() => K::Rethrow,
            _ => K::NativeMemory,
        },
    }
}

/// The message of the thrown exception.
pub fn exception_message(err: &Error) -> String {
    match err {
        Error::Provider(ProviderError::Memory(MemoryError::OutOfMemory(oom))) => oom.to_string(),
        // Without core's "invalid argument: " prefix: the exception class says it.
        Error::Provider(ProviderError::Memory(MemoryError::InvalidArgument(m))) => m.clone(),
        other => other.to_string(),
    }
}

fn throw_mapped(env: &mut JNIEnv, err: &Error) -> Result<()> {
    let kind = exception_kind(err);
    if kind == JavaExceptionKind::Pending {
        // A JNI call reported a pending exception that is no longer pending (it was cleared):
        // report it as a plain failure rather than losing it.
        env.throw_new(
            "org/nativemem/NativeMemoryException",
            "a JNI call failed with a Java exception that is no longer pending",
        )?;
        return Ok(());
    }
    let message = exception_message(err);
    // Prefer the cached classes (resolvable on any thread); fall back to FindClass, which works
    // on the Java thread of an export.
    let Ok(classes) = vm::classes() else {
        let name = match kind {
            JavaExceptionKind::OutOfMemory => "org/nativemem/NativeOutOfMemoryException",
            JavaExceptionKind::IllegalArgument => "java/lang/IllegalArgumentException",
            JavaExceptionKind::IllegalState => "java/lang/IllegalStateException",
            JavaExceptionKind::NullPointer => "java/lang/NullPointerException",
            _ => "org/nativemem/NativeMemoryException",
        };
        env.throw_new(name, message)?;
        return Ok(());
    };
    if let (
        JavaExceptionKind::OutOfMemory,
        Error::Provider(ProviderError::Memory(MemoryError::OutOfMemory(oom))),
    ) = (kind, err)
    {
        return throw_oom(env, classes, oom, &message);
    }
    let class = match kind {
        JavaExceptionKind::OutOfMemory => &classes.oom_exception,
        JavaExceptionKind::IllegalArgument => &classes.illegal_argument,
        JavaExceptionKind::IllegalState => &classes.illegal_state,
        JavaExceptionKind::NullPointer => &classes.null_pointer,
        JavaExceptionKind::Rethrow => {
            if let Some(ex) = err.java_exception() {
                env.throw(jni::objects::JThrowable::from(
                    env.new_local_ref(ex.throwable())?,
                ))?;
                return Ok(());
            }
            &classes.memory_exception
        }
        JavaExceptionKind::NativeMemory | JavaExceptionKind::Pending => {
            if let Some(ex) = err.java_exception() {
                let msg = env.new_string(&message)?;
                // SAFETY: the constructor id is NativeMemoryException(String, Throwable), resolved
                // on that class; the arguments are a String and a Throwable, in that order.
                let obj = unsafe {
                    env.new_object_unchecked(
                        vm::as_class(&classes.memory_exception),
                        classes.memory_exception_with_cause,
                        &[
                            JValue::Object(&msg).as_jni(),
                            JValue::Object(ex.throwable().as_obj()).as_jni(),
                        ],
                    )
                }?;
                env.throw(jni::objects::JThrowable::from(obj))?;
                return Ok(());
            }
            &classes.memory_exception
        }
    };
    env.throw_new(vm::as_class(class), message)?;
    Ok(())
}

/// Throws a `NativeOutOfMemoryException` with its fields: requested bytes, pool, consumer, reason
/// (a `Reason` name), the pool whose limit refused (for a limit) and the usage report.
fn throw_oom(
    env: &mut JNIEnv,
    classes: &vm::JavaClasses,
    oom: &OutOfMemory,
    message: &str,
) -> Result<()> {
    let (reason, refusing_pool) = match &oom.reason {
        OomReason::PoolLimit { pool, .. } => ("POOL_LIMIT", Some(pool.as_str())),
        OomReason::ListenerDenied { .. } => ("LISTENER_DENIED", None),
        OomReason::SystemAllocator => ("SYSTEM_ALLOCATOR", None),
        #[allow(unreachable_patterns)]
        _ => ("UNKNOWN", None),
    };
    let message = env.new_string(message)?;
    let pool = env.new_string(&oom.pool)?;
    let consumer = env.new_string(&oom.consumer)?;
    let reason = env.new_string(reason)?;
    let refusing_pool = match refusing_pool {
        Some(p) => JObject::from(env.new_string(p)?),
        None => JObject::null(),
    };
    let report = env.new_string(oom.report.to_string())?;
    let requested = i64::try_from(oom.requested).unwrap_or(i64::MAX);
    // SAFETY: the constructor id is NativeOutOfMemoryException(String, long, String, String,
    // String, String, String), resolved on that class; the arguments match it in type and order.
    let obj = unsafe {
        env.new_object_unchecked(
            vm::as_class(&classes.oom_exception),
            classes.oom_exception_structured,
            &[
                JValue::Object(&message).as_jni(),
                JValue::Long(requested).as_jni(),
                JValue::Object(&pool).as_jni(),
                JValue::Object(&consumer).as_jni(),
                JValue::Object(&reason).as_jni(),
                JValue::Object(&refusing_pool).as_jni(),
                JValue::Object(&report).as_jni(),
            ],
        )
    }?;
    env.throw(jni::objects::JThrowable::from(obj))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nativemem_core::{MemoryConfig, MemoryManager, ReservationListener};
    use nativemem_handles::HandleError;
    use std::sync::Arc;

    struct Refuse;
    impl ReservationListener for Refuse {
        fn reserve(&self, _: u64) -> Result<u64, nativemem_core::ListenerError> {
            Ok(0)
        }
        fn unreserve(&self, _: u64) -> Result<(), nativemem_core::ListenerError> {
            Ok(())
        }
    }

    #[test]
    fn every_variant_maps_to_its_exception() {
        let mgr = MemoryManager::new("t", MemoryConfig::default(), Arc::new(Refuse)).unwrap();
        let oom = mgr
            .root()
            .reservation("c")
            .try_grow(10)
            .expect_err("listener grants nothing");
        let oom_text = oom.to_string();
        use JavaExceptionKind as K;
        use ProviderError as P;
        let provider_cases: Vec<(P, K, String)> = vec![
            (P::Memory(oom), K::OutOfMemory, oom_text),
            (
                P::Memory(MemoryError::InvalidArgument("bad".into())),
                K::IllegalArgument,
                "bad".into(),
            ),
            (
                P::InvalidArgument("bytes must be >= 0, got -1".into()),
                K::IllegalArgument,
                "bytes must be >= 0, got -1".into(),
            ),
            (
                P::Memory(MemoryError::Closed {
                    manager: "m".into(),
                }),
                K::IllegalState,
                "memory manager 'm' is closed".into(),
            ),
            (
                P::Handle(HandleError::Null {
                    kind: "memory manager",
                }),
                K::IllegalState,
                "null memory manager handle (0x0)".into(),
            ),
            (
                P::Closed("closing".into()),
                K::IllegalState,
                "closing".into(),
            ),
            (
                P::NullArgument("name"),
                K::NullPointer,
                "name must not be null".into(),
            ),
            (
                P::Panic("boom".into()),
                K::NativeMemory,
                "native panic: boom".into(),
            ),
            (
                P::Memory(MemoryError::ListenerContract("x".into())),
                K::NativeMemory,
                "reservation listener broke its contract: x".into(),
            ),
            (
                P::Memory(MemoryError::Listener {
                    op: "reserve",
                    bytes: 8,
                    source: "plain".into(),
                }),
                K::NativeMemory,
                "reservation listener failed to reserve 8 bytes: plain".into(),
            ),
            (
                P::Memory(MemoryError::Spill {
                    spiller: "s".into(),
                    source: "disk full".into(),
                }),
                K::NativeMemory,
                "spiller 's' failed: disk full".into(),
            ),
            (P::Other("o".into()), K::NativeMemory, "o".into()),
        ];
        let mut cases: Vec<(Error, K, String)> = provider_cases
            .into_iter()
            .map(|(err, kind, msg)| (err.into(), kind, msg))
            .collect();
        cases.push((
            Error::Jni(jni::errors::Error::JavaException),
            K::Pending,
            "JNI call failed: Java exception was thrown".into(),
        ));
        for (err, kind, msg) in cases {
            assert_eq!(exception_kind(&err), kind, "{err:?}");
            assert_eq!(exception_message(&err), msg, "{err:?}");
        }
    }

    #[test]
    fn out_of_memory_message_holds_the_usage_report() {
        let mgr = MemoryManager::new("task-7", MemoryConfig::default(), Arc::new(Refuse)).unwrap();
        let err = mgr
            .pool("scan")
            .unwrap()
            .reservation("reader")
            .try_grow(1 << 20)
            .unwrap_err();
        let msg = exception_message(&Error::from(err));
        assert!(
            msg.starts_with("Failed to reserve 1.0 MiB for consumer 'reader#"),
            "{msg}"
        );
        assert!(msg.contains("Native memory of 'task-7'"), "{msg}");
        assert!(msg.contains("Pools:"), "{msg}");
    }
}

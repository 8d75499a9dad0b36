//! [`JavaListener`]: the core's [`ReservationListener`] implemented by upcalls to an
//! `org.nativemem.ReservationListener` object.
//!
//! - The Java object is held as a global reference; the method ids come from the cache resolved
//!   on a Java thread ([`crate::vm`]), so an upcall from a native thread needs no `FindClass`.
//! - The calling thread is attached as a daemon if it is not attached yet (once, permanently).
//! - Each upcall runs in its own local reference frame, so a thread making many upcalls inside one
//!   long export does not pile up local references.
//! - A Java exception thrown by the listener is taken (and cleared) and returned as a
//!   [`JavaException`] inside the listener error; the export that triggered the upcall throws it as
//!   the cause of a `NativeMemoryException` (or rethrows it, for a `java.lang.Error`).
//! - A negative return from `reserve` is an error (nothing is counted as granted); a return above
//!   what was asked is passed to the core, which keeps the grant (it will be given back) and fails
//!   the request with `ListenerContract`. Either way the accounting stays exact.
//! - No lock of this crate or of the core is held during an upcall, so the Java listener may call
//!   back into the manager (e.g. Spark spilling this same task's consumer).

use jni::objects::{GlobalRef, JObject};
use jni::signature::{Primitive, ReturnType};
use jni::sys::{jlong, jvalue};
use jni::JNIEnv;
use nativemem_core::{ListenerError, ReservationListener};

use crate::error::{ProviderError, Result};
use crate::exception::{JavaException, UpcallError};
use crate::vm;

/// Local references one upcall may create (the result, an exception and its description).
const UPCALL_FRAME: i32 = 8;

/// A [`ReservationListener`] backed by a Java `org.nativemem.ReservationListener`.
pub struct JavaListener {
    listener: GlobalRef,
}

impl std::fmt::Debug for JavaListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JavaListener").finish_non_exhaustive()
    }
}

impl JavaListener {
    /// Wraps `listener` (must implement `org.nativemem.ReservationListener`; checked).
    pub fn new(env: &mut JNIEnv, listener: &JObject) -> Result<JavaListener> {
        if listener.is_null() {
            return Err(ProviderError::NullArgument("listener").into());
        }
        let classes = vm::init_classes(env)?;
        if !env.is_instance_of(listener, vm::as_class(&classes.listener))? {
            return Err(ProviderError::InvalidArgument(
                "listener does not implement org.nativemem.ReservationListener".into(),
            )
            .into());
        }
        Ok(JavaListener {
            listener: env.new_global_ref(listener)?,
        })
    }

    /// Runs one upcall on the current thread in a local frame; a Java exception becomes an
    /// [`UpcallError::Java`].
    fn upcall<T>(
        &self,
        what: &str,
        call: impl FnOnce(&mut JNIEnv, &vm::JavaClasses) -> jni::errors::Result<T>,
    ) -> Result<T, UpcallError> {
        let classes = vm::classes().map_err(UpcallError::binding)?;
        let mut env = vm::attach_current_thread().map_err(UpcallError::binding)?;
        if env.exception_check().map_err(UpcallError::jni)? {
            // Calling Java with an exception pending is undefined; the caller must surface it.
            return Err(UpcallError::Binding(format!(
                "cannot call ReservationListener.{what}: a Java exception is already pending on this thread"
            )));
        }
        env.with_local_frame(UPCALL_FRAME, |env| -> Result<T, UpcallError> {
            match call(env, classes) {
                Ok(v) => Ok(v),
                Err(jni::errors::Error::JavaException) => match JavaException::take(env) {
                    Ok(ex) => Err(UpcallError::Java(ex)),
                    Err(e) => Err(UpcallError::binding(e)),
                },
                Err(e) => Err(UpcallError::jni(e)),
            }
        })
    }
}

impl ReservationListener for JavaListener {
    fn reserve(&self, bytes: u64) -> Result<u64, ListenerError> {
        let asked = jlong::try_from(bytes).map_err(|_| {
            UpcallError::Binding(format!(
                "cannot ask the listener for {bytes} bytes: above Long.MAX_VALUE"
            ))
        })?;
        let granted = self.upcall("reserve", |env, classes| {
            // SAFETY: `listener_reserve` is `long reserve(long)` of org.nativemem.ReservationListener,
            // and `self.listener` implements that interface (checked in `new`); one long argument.
            let v = unsafe {
                env.call_method_unchecked(
                    self.listener.as_obj(),
                    classes.listener_reserve,
                    ReturnType::Primitive(Primitive::Long),
                    &[jvalue { j: asked }],
                )
            }?;
            v.j()
        })?;
        if granted < 0 {
            return Err(UpcallError::Contract(format!(
                "ReservationListener.reserve({asked}) returned {granted}; it must return the bytes granted, between 0 and {asked}"
            ))
            .into());
        }
        // More than asked is returned as is: the core records the whole grant (so it is given
        // back later) and fails the request with a contract error.
        Ok(granted as u64)
    }

    fn unreserve(&self, bytes: u64) -> Result<(), ListenerError> {
        let bytes_j = jlong::try_from(bytes).map_err(|_| {
            UpcallError::Binding(format!(
                "cannot give back {bytes} bytes: above Long.MAX_VALUE"
            ))
        })?;
        self.upcall("unreserve", |env, classes| {
            // SAFETY: `listener_unreserve` is `void unreserve(long)` of the listener interface, which
            // `self.listener` implements (checked in `new`); one long argument.
            let v = unsafe {
                env.call_method_unchecked(
                    self.listener.as_obj(),
                    classes.listener_unreserve,
                    ReturnType::Primitive(Primitive::Void),
                    &[jvalue { j: bytes_j }],
                )
            }?;
            v.v()
        })?;
        Ok(())
    }
}

impl Drop for JavaListener {
    fn drop(&mut self) {
        vm::attach_for_drop();
    }
}

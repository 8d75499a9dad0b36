//! The cached `JavaVM`, thread attachment, and the Java classes and method ids resolved once.
//!
//! # Why cache
//! `FindClass` on a thread that native code attached uses the *system* class loader, which does
//! not see classes Spark loads from `--jars`: `org.nativemem.ReservationListener` would not be
//! found from a native operator thread. So every class and method id this library needs is
//! resolved on a Java thread — in `JNI_OnLoad` (where `FindClass` uses the loader of the class
//! that loaded the library) or, if that failed, in the first `NativeMemoryManager.create` — and
//! kept as global references for the life of the library.
//!
//! # Threads
//! A native thread that needs the JVM is attached once, permanently, as a *daemon* (it does not
//! keep the JVM alive) by [`attach_current_thread`]; it is detached by `jni`'s thread-local guard
//! when the thread exits. Java threads and already attached threads get their existing `JNIEnv`.
//! Nothing attaches and detaches per call.

use jni::objects::{GlobalRef, JClass, JMethodID};
use jni::{JNIEnv, JavaVM};
use once_cell::sync::OnceCell;

use crate::error::{ProviderError, Result};

static VM: OnceCell<JavaVM> = OnceCell::new();
static CLASSES: OnceCell<JavaClasses> = OnceCell::new();

/// Classes and method ids resolved once on a Java thread (see the module docs).
pub struct JavaClasses {
    /// `org.nativemem.ReservationListener`.
    pub listener: GlobalRef,
    /// `long ReservationListener.reserve(long)`.
    pub listener_reserve: JMethodID,
    /// `void ReservationListener.unreserve(long)`.
    pub listener_unreserve: JMethodID,
    /// `java.lang.Throwable`: held so the class of `throwable_to_string` stays resolved.
    #[allow(dead_code)]
    pub throwable: GlobalRef,
    /// `String Throwable.toString()`.
    pub throwable_to_string: JMethodID,
    /// `java.lang.Error`: listener throwables of this class are rethrown unchanged.
    pub error: GlobalRef,
    /// `org.nativemem.NativeMemoryException`.
    pub memory_exception: GlobalRef,
    /// `NativeMemoryException(String, Throwable)`.
    pub memory_exception_with_cause: JMethodID,
    /// `org.nativemem.NativeOutOfMemoryException`.
    pub oom_exception: GlobalRef,
    /// `NativeOutOfMemoryException(String message, long requested, String pool, String consumer,
    /// String reason, String refusingPool, String usageReport)`.
    pub oom_exception_structured: JMethodID,
    /// `java.lang.IllegalStateException`.
    pub illegal_state: GlobalRef,
    /// `java.lang.IllegalArgumentException`.
    pub illegal_argument: GlobalRef,
    /// `java.lang.NullPointerException`.
    pub null_pointer: GlobalRef,
}

impl JavaClasses {
    fn resolve(env: &mut JNIEnv) -> Result<JavaClasses> {
        env.with_local_frame(16, |env| {
            let global = |env: &mut JNIEnv, name: &str| -> Result<GlobalRef> {
                let class = env.find_class(name)?;
                Ok(env.new_global_ref(class)?)
            };
            let listener = global(env, "org/nativemem/ReservationListener")?;
            let listener_reserve = env.get_method_id(as_class(&listener), "reserve", "(J)J")?;
            let listener_unreserve = env.get_method_id(as_class(&listener), "unreserve", "(J)V")?;
            let throwable = global(env, "java/lang/Throwable")?;
            let throwable_to_string =
                env.get_method_id(as_class(&throwable), "toString", "()Ljava/lang/String;")?;
            let memory_exception = global(env, "org/nativemem/NativeMemoryException")?;
            let memory_exception_with_cause = env.get_method_id(
                as_class(&memory_exception),
                "<init>",
                "(Ljava/lang/String;Ljava/lang/Throwable;)V",
            )?;
            let oom_exception = global(env, "org/nativemem/NativeOutOfMemoryException")?;
            let oom_exception_structured = env.get_method_id(
                as_class(&oom_exception),
                "<init>",
                "(Ljava/lang/String;JLjava/lang/String;Ljava/lang/String;Ljava/lang/String;Ljava/lang/String;Ljava/lang/String;)V",
            )?;
            Ok(JavaClasses {
                listener,
                listener_reserve,
                listener_unreserve,
                throwable,
                throwable_to_string,
                error: global(env, "java/lang/Error")?,
                memory_exception,
                memory_exception_with_cause,
                oom_exception,
                oom_exception_structured,
                illegal_state: global(env, "java/lang/IllegalStateException")?,
                illegal_argument: global(env, "java/lang/IllegalArgumentException")?,
                null_pointer: global(env, "java/lang/NullPointerException")?,
            })
        })
    }
}

/// Views a global reference to a class as a `JClass`.
pub fn as_class(global: &GlobalRef) -> &JClass<'static> {
    <&JClass>::from(global.as_obj())
}

/// Remembers the VM (called by `JNI_OnLoad`; later calls keep the first VM: one per process).
pub fn set_java_vm(vm: JavaVM) {
    if VM.set(vm).is_err() {
        log::debug!("JavaVM already cached");
    }
}

/// The VM this library was loaded into.
pub fn java_vm() -> Result<&'static JavaVM> {
    VM.get().ok_or_else(|| {
        ProviderError::Other(
            "the JavaVM is not known: the library was not loaded by System.load".into(),
        )
        .into()
    })
}

/// The `JNIEnv` of the current thread, attaching it permanently as a daemon thread if it is not
/// attached yet (it is detached automatically when it exits).
pub fn attach_current_thread() -> Result<JNIEnv<'static>> {
    attach_daemon(java_vm()?)
}

/// `attach_current_thread_as_daemon`, with its one panic turned into an error: `jni` keeps the
/// detach guard of a newly attached thread in a thread-local, which panics when the thread is
/// already destroying its thread-locals (e.g. an operator's reservation dropped by a thread-local
/// destructor releases bytes through the listener).
fn attach_daemon(vm: &'static JavaVM) -> Result<JNIEnv<'static>> {
    match std::panic::catch_unwind(|| vm.attach_current_thread_as_daemon()) {
        Ok(env) => Ok(env?),
        Err(_) => Err(ProviderError::Other(
            "cannot attach this thread to the JVM: it is exiting (thread-locals destroyed)".into(),
        )
        .into()),
    }
}

/// Resolves the classes on this thread if not done yet. Call on a Java thread (an export or
/// `JNI_OnLoad`), where `FindClass` sees the library's class loader.
///
/// On failure the Java exception `FindClass` raised (e.g. `NoClassDefFoundError`) is left
/// pending, so the export that called this surfaces it.
pub fn init_classes(env: &mut JNIEnv) -> Result<&'static JavaClasses> {
    CLASSES.get_or_try_init(|| JavaClasses::resolve(env))
}

/// The cached classes; an error if no Java thread has resolved them yet.
pub fn classes() -> Result<&'static JavaClasses> {
    CLASSES.get().ok_or_else(|| {
        ProviderError::Other(
            "org.nativemem classes are not resolved: no NativeMemoryManager was created on a Java thread".into(),
        )
        .into()
    })
}

/// Makes sure the current thread is attached before a global reference is dropped on it, so
/// `jni` deletes the reference through the existing `JNIEnv` instead of attaching and detaching
/// the thread just for that. A no-op when there is no VM (unit tests).
pub(crate) fn attach_for_drop() {
    if let Some(vm) = VM.get() {
        if let Err(e) = attach_daemon(vm) {
            log::warn!("attaching a thread to drop a Java reference: {e}");
        }
    }
}

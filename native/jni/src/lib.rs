//! # nativemem-jni: the JNI binding of nativemem
//!
//! The cdylib `libnativemem_jni` behind the Java package `org.nativemem`: thin `Java_*` exports
//! over [`nativemem_core`], a handle table so Java never holds a pointer, and the upcalls that
//! make a Java `ReservationListener` the budget of a native [`MemoryManager`](nativemem_core::MemoryManager).
//!
//! ```text
//!  Java thread                         this crate                              core
//!  ───────────                         ──────────                              ────
//!  NativeMemoryManager.spill(n) ──▶ Java_..._nativeSpill(handle, n)
//!                                     run_export: catch_unwind ─┐
//!                                     MANAGERS.get(handle) ─────┤ stale/forged → IllegalStateException
//!                                     entry.enter()  (in-flight +1; refused once closing)
//!                                     manager.spill(n) ──────────────────────▶ spillers, pools
//!                                                                                  │ cushion empty
//!  ReservationListener.reserve(b) ◀── JavaListener::reserve (attach as daemon, ◀──┘
//!        (Spark MemoryConsumer)         local frame, cached method id; no lock held)
//!                                     Result ─▶ error::throw: one mapping to Java exceptions
//! ```
//!
//! ## Pieces
//! - [`handle`]: generation-checked slot handles (`jlong`, never a pointer).
//! - [`registry`]: live managers and Java reservations, in-flight counting, close that never frees
//!   under a running call. [`with_manager`] / [`enter_manager`] let other native code in this
//!   library (operators and their exports) reach a manager from the handle Java gives them.
//! - [`listener`]: the Java listener as the core's `ReservationListener`.
//! - [`error`]: the error type and the single mapping to Java exceptions; [`export`]: the panic
//!   guard and argument helpers every export uses.
//! - [`vm`]: the cached `JavaVM`, classes and method ids; daemon attachment of native threads.
//!
//! ## Rules for code added to this library
//! - Every export goes through [`run_export`]: no panic crosses `extern "system"`.
//! - Reach a manager only through [`with_manager`] / [`enter_manager`], so close waits for you.
//! - Do not define `JNI_OnLoad` elsewhere; this crate owns it (use [`vm::java_vm`]).
//! - Never call `FindClass` from a native thread; resolve classes on a Java thread and cache them.
//!
//! ## Logging
//! Rust `log` records go to stderr (the executor's log in Spark) through `env_logger`, filtered by
//! the environment variable `NATIVEMEM_LOG` (default `warn`, e.g. `NATIVEMEM_LOG=debug`).

use std::ffi::c_void;
use std::panic::{self, AssertUnwindSafe};

use jni::sys::{jint, JNI_ERR, JNI_VERSION_1_8};
use jni::JavaVM;

mod bench;
pub mod error;
pub mod export;
mod exports;
pub mod handle;
pub mod listener;
pub mod registry;
mod sorter;
mod testing;
pub mod vm;

pub use error::{throw, Error, JavaException, Result};
pub use export::{non_negative, run_export, string_arg, to_jlong};
pub use handle::{HandleError, HandleTable};
pub use listener::JavaListener;
pub use registry::{enter_manager, with_manager, ManagerCall, ManagerEntry};

/// Version of the contract between this library and the `org.nativemem` classes (native method
/// signatures, `NativeMemoryStats` layout). The Java loader refuses a library with another value.
pub const ABI_VERSION: jint = 1;

/// Environment variable that filters this library's logging (`env_logger` syntax).
pub const LOG_ENV: &str = "NATIVEMEM_LOG";

/// Installs the stderr logger unless the process already has one (another Rust library). Called
/// by `JNI_OnLoad`.
pub fn init_logging() {
    let env = env_logger::Env::new().filter_or(LOG_ENV, "warn");
    if env_logger::Builder::from_env(env).try_init().is_err() {
        log::debug!("a logger is already installed; nativemem logs through it");
    }
}

/// Called by the JVM when `System.load` loads this library: caches the VM and resolves the
/// classes and method ids (here `FindClass` uses the class loader that loaded the library, which
/// sees `org.nativemem`; a native thread's would not).
///
/// If the classes cannot be resolved here, the error is logged and resolution is retried in the
/// first `NativeMemoryManager.create`, which then reports it as an exception.
///
/// # Safety
/// Only the JVM calls this, with a valid `JavaVM` pointer, on the thread loading the library.
#[no_mangle]
pub unsafe extern "system" fn JNI_OnLoad(
    vm: *mut jni::sys::JavaVM,
    _reserved: *mut c_void,
) -> jint {
    let loaded = panic::catch_unwind(AssertUnwindSafe(|| {
        init_logging();
        // SAFETY: the JVM passes a valid `JavaVM*` to `JNI_OnLoad`; it stays valid for the life
        // of the process.
        let vm = match unsafe { JavaVM::from_raw(vm) } {
            Ok(vm) => vm,
            Err(e) => {
                log::error!("JNI_OnLoad: invalid JavaVM pointer: {e}");
                return JNI_ERR;
            }
        };
        match vm.get_env() {
            Ok(mut env) => {
                if let Err(e) = vm::init_classes(&mut env) {
                    let _ = env.exception_clear();
                    log::warn!(
                        "JNI_OnLoad: cannot resolve org.nativemem classes yet ({e}); retrying at first use"
                    );
                }
            }
            Err(e) => log::warn!("JNI_OnLoad: no JNIEnv on the loading thread: {e}"),
        }
        vm::set_java_vm(vm);
        JNI_VERSION_1_8
    }));
    loaded.unwrap_or(JNI_ERR)
}

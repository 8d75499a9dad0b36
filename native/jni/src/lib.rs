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
//! ## Two faces
//! - **Java** (`org.nativemem`): the `Java_*` exports in [`exports`](crate) over the [`registry`].
//! - **Engines in their own library** (`include/nativemem.h`, the `nativemem-client` crate): the
//!   versioned C function table of [`abi`], reached from Java's `NativeMemoryManager.nativeApi()`
//!   or the C symbol [`nativemem_api`]. Native code outside this library reaches a manager only
//!   through it.
//!
//! ## Pieces
//! - handles come from `nativemem-handles`: generation-checked slots (`jlong`, never a pointer).
//! - [`registry`]: live managers and the objects they own (reservations, and the ABI's pools,
//!   spillers, attached state), in-flight counting, and a close that never frees under a running
//!   call or a held lease.
//! - `listener`: the Java listener as the core's `ReservationListener`.
//! - `error`: the error type and the single mapping to Java exceptions; `export`: the panic
//!   guard and argument helpers every export uses.
//! - `vm`: the cached `JavaVM`, classes and method ids; daemon attachment of native threads.
//! - With the `testing` feature only (the test library, never the product): `testing` (test
//!   hooks of `org.nativemem.NativeTesting`) and `bench` (`org.nativemem.NativeBench`).
//!
//! ## The rlib
//! The crate is a `cdylib` (the product) and an `rlib` for one purpose: tests of the engine side
//! (`nativemem-client`, the example operator) link it to get a provider of the table in their
//! test binary, where it is the only copy. An engine's *library* must never depend on it: a second
//! copy next to the JVM's has its own, empty handle table (every handle from Java refused). Its
//! Rust API is therefore just [`nativemem_api`]; everything else is private.
//!
//! ## Rules for code added to this library
//! - Every export goes through `run_export` (JNI) or `abi::run` (C): no panic crosses the boundary.
//! - Reach a manager only through the registry's `with_manager` / `enter_manager` / pins, so close
//!   waits for you.
//! - Never call `FindClass` from a native thread; resolve classes on a Java thread and cache them.
//!
//! ## Logging
//! Rust `log` records go to stderr (the executor's log in Spark) through `env_logger`, filtered by
//! the environment variable `NATIVEMEM_LOG` (default `warn`, e.g. `NATIVEMEM_LOG=debug`).

use std::ffi::c_void;
use std::panic::{self, AssertUnwindSafe};

use jni::sys::{jint, JNI_ERR, JNI_VERSION_1_8};
use jni::JavaVM;

mod abi;
#[cfg(feature = "testing")]
mod bench;
mod error;
mod export;
mod exports;
mod listener;
mod registry;
#[cfg(feature = "testing")]
mod testing;
mod vm;

/// The test library counts its own heap (`NativeTesting.nativeHeapCounts`), so tests count leaks
/// instead of estimating them from RSS. Never in the product library. A test binary that links
/// this crate with the `testing` feature gets it as its allocator too (and cannot have another).
#[cfg(feature = "testing")]
#[global_allocator]
static ALLOCATOR: testing::CountingAllocator = testing::CountingAllocator;

/// Version of the contract between this library and the `org.nativemem` classes (native method
/// signatures, `NativeMemoryStats` and `NativeCloseReport` layouts). The Java loader refuses a
/// library with another value. (The engine ABI has its own version, `NM_ABI_VERSION`.)
const ABI_VERSION: jint = 2;

/// The engine ABI table (`include/nativemem.h`) if this library supports `min_version`, else
/// null. For C engines in a process that loaded this library `RTLD_GLOBAL`; under a JVM, take the
/// address from `NativeMemoryManager.nativeApi()` instead (the JVM loads libraries locally).
#[no_mangle]
pub extern "C" fn nativemem_api(min_version: u32) -> *const nativemem_sys::NmApi {
    abi::api(min_version)
}

/// Environment variable that filters this library's logging (`env_logger` syntax).
const LOG_ENV: &str = "NATIVEMEM_LOG";

/// Installs the stderr logger unless the process already has one (another Rust library). Called
/// by `JNI_OnLoad`.
fn init_logging() {
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

//! # nativemem-jni: the Java layer of nativemem
//!
//! The cdylib `libnativemem_jni` behind the Java package `org.nativemem`: thin `Java_*` exports
//! over [`nativemem_provider`] (the registry of managers and the engine ABI table), and the
//! upcalls that make a Java `ReservationListener` the budget of a native
//! [`MemoryManager`](nativemem_core::MemoryManager).
//!
//! ```text
//!  Java thread                         this crate                  nativemem-provider / core
//!  ───────────                         ──────────                  ─────────────────────────
//!  NativeMemoryManager.spill(n) ──▶ Java_..._nativeSpill(handle, n)
//!                                     run_export: catch_unwind ─┐
//!                                     registry::with_manager ───┤ stale/forged → IllegalStateException
//!                                         (in-flight +1; refused once closing)
//!                                         manager.spill(n) ──────────────────▶ spillers, pools
//!                                                                                  │ cushion empty
//!  ReservationListener.reserve(b) ◀── JavaListener::reserve (attach as daemon, ◀──┘
//!        (Spark MemoryConsumer)         local frame, cached method id; no lock held)
//!                                     Result ─▶ exception::throw: one mapping to Java exceptions
//! ```
//!
//! ## Two faces, one copy of the tables
//! - **Java** (`org.nativemem`): the `Java_*` exports in `exports` over the provider's registry.
//! - **Engines in their own library** (`include/nativemem.h`, the `nativemem-client` crate): the
//!   provider's versioned C function table, reached from Java's `NativeMemoryManager.nativeApi()`
//!   or the C symbol [`nativemem_api`] this library exports.
//!
//! The provider is an rlib linked into this cdylib only, so the process has one copy of its
//! tables. This library decides what it exports: the provider exports no C symbol itself, and
//! `nativemem_api` is declared here (`scripts/check-product.sh` checks the export list).
//!
//! ## Pieces
//! - `exports`: the `Java_*` exports of the public classes.
//! - `container`: the `Java_*` exports of `ContainerGovernor` (the executor's container governor).
//! - `arbiter`: the `Java_*` exports of `ExecutorArbiter` (executor-wide arbitration).
//! - `guard`: the panic guard (`run_export`) and argument helpers every export uses.
//! - `error`: the provider's error plus JNI failures.
//! - `exception`: the single mapping of an error to a Java exception, and the Java throwables a
//!   listener upcall caught.
//! - `listener`: the Java listener as the core's `ReservationListener`, handed to the provider's
//!   registry as `Arc<dyn ReservationListener>`.
//! - `vm`: the cached `JavaVM`, classes and method ids; daemon attachment of native threads.
//! - With the `testing` feature only (the test library, never the product): `testing` (test
//!   hooks of `org.nativemem.NativeTesting`), `bench` (`org.nativemem.NativeBench`) and the
//!   counting global allocator of `nativemem-testkit`.
//!
//! ## Modules, in layers
//!
//! Each module imports only modules before it (`tests.rs` checks it): `error`, `vm`,
//! `exception`, `listener`, `guard`, `exports`, `container`, `arbiter`, `bench`, `testing`.
//!
//! ## A cdylib only
//! Nothing links this crate as a Rust library: tests that need a provider of the table link
//! `nativemem-provider`. An engine's library must link neither: a second copy next to the JVM's
//! has its own, empty handle tables (every handle from Java refused).
//!
//! ## Rules for code added to this library
//! - Every export goes through `run_export`: no panic crosses the boundary.
//! - Reach a manager only through the registry's `with_manager` / `enter_manager`, so close
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

mod arbiter;
#[cfg(feature = "testing")]
mod bench;
mod container;
mod error;
mod exception;
mod exports;
mod guard;
mod listener;
#[cfg(feature = "testing")]
mod testing;
#[cfg(test)]
mod tests;
mod vm;

/// The test library counts its own heap (`NativeTesting.nativeHeapCounts`), so tests count leaks
/// instead of estimating them from RSS. Never in the product library.
#[cfg(feature = "testing")]
#[global_allocator]
static ALLOCATOR: nativemem_testkit::CountingAllocator = nativemem_testkit::CountingAllocator;

/// The engine ABI table (`include/nativemem.h`) if this library supports `min_version`, else
/// null: the provider's [`api`](nativemem_provider::api), exported as a C symbol. For C engines in
/// a process that loaded this library `RTLD_GLOBAL`; under a JVM, take the address from
/// `NativeMemoryManager.nativeApi()` instead (the JVM loads libraries locally).
#[no_mangle]
pub extern "C" fn nativemem_api(min_version: u32) -> *const nativemem_sys::NmApi {
    nativemem_provider::api(min_version)
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

//! Test-only exports, bound by the package-private test class `org.nativemem.NativeTesting` (it
//! lives under `tests/java`, not in the published jar, so production code cannot call these).
//! They drive paths Java alone cannot reach: a panic inside an export, native spillers, native
//! allocations, and upcalls from threads the JVM did not start.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jni::objects::{JClass, JString};
use jni::sys::{jint, jlong};
use jni::JNIEnv;
use nativemem_core::{MemoryError, Reservation, Spiller};

use crate::error::{Error, Result};
use crate::export::{non_negative, run_export, string_arg, to_jlong};
use crate::registry::{enter_manager, with_manager, MANAGERS};
use crate::vm;

/// `static native void panic(String message)`: panics inside an export.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_panic<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    message: JString<'l>,
) {
    run_export(&mut env, (), |env| {
        let message = string_arg(env, &message, "message")?;
        panic!("{message}");
    })
}

/// `static native void panicInCall(long manager)`: panics while a call on the manager is in
/// flight (the in-flight guard must still be released by unwinding).
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_panicInCall<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    manager: jlong,
) {
    run_export(&mut env, (), |_| {
        with_manager(manager, |m| -> Result<()> {
            panic!("operator bug while holding manager '{}'", m.name());
        })
    })
}

/// `static native long inFlight(long manager)`: calls in flight on the manager now (not counting
/// this one, which does not enter the manager).
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_inFlight<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    manager: jlong,
) -> jlong {
    run_export(&mut env, 0, |_| {
        Ok(to_jlong(MANAGERS.get(manager)?.in_flight()))
    })
}

/// A native consumer holding a reservation; a spill frees up to the target, optionally slowly.
struct TestSpiller {
    reservation: Reservation,
    delay: Duration,
    calls: AtomicU64,
}

impl Spiller for TestSpiller {
    fn spillable_bytes(&self) -> u64 {
        self.reservation.size()
    }

    fn spill(&self, target: u64) -> Result<u64, MemoryError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let freed = target.min(self.reservation.size());
        self.reservation.shrink(freed)?;
        Ok(freed)
    }
}

/// `static native void registerSpiller(long manager, String pool, long bytes, long delayMillis)`:
/// registers a native spiller holding `bytes` in `pool`, kept until the manager closes.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_registerSpiller<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    manager: jlong,
    pool: JString<'l>,
    bytes: jlong,
    delay_millis: jlong,
) {
    run_export(&mut env, (), |env| {
        let pool = string_arg(env, &pool, "pool")?;
        let bytes = non_negative("bytes", bytes)?;
        let delay = Duration::from_millis(non_negative("delayMillis", delay_millis)?);
        let call = enter_manager(manager)?;
        let pool = call.manager().pool(&pool)?;
        let reservation = pool.reservation("test-spiller");
        reservation.try_grow(bytes)?;
        let spiller = Arc::new(TestSpiller {
            reservation,
            delay,
            calls: AtomicU64::new(0),
        });
        let registration = pool.register_spiller("test-spiller", spiller.clone());
        call.attach(Box::new((registration, spiller)));
        Ok(())
    })
}

/// `static native long allocate(long manager, String pool, long bytes)`: a native allocation
/// charged to `pool`; returns its address (only to pass back to `free`).
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_allocate<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    manager: jlong,
    pool: JString<'l>,
    bytes: jlong,
) -> jlong {
    run_export(&mut env, 0, |env| {
        let pool = string_arg(env, &pool, "pool")?;
        let size = usize::try_from(non_negative("bytes", bytes)?)
            .map_err(|_| Error::InvalidArgument("bytes too large".into()))?;
        with_manager(manager, |m| {
            let ptr = m.pool(&pool)?.allocate(size, 64)?;
            Ok(ptr.as_ptr() as usize as jlong)
        })
    })
}

/// `static native long free(long manager, long address)`: frees an allocation; returns its size.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_free<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    manager: jlong,
    address: jlong,
) -> jlong {
    run_export(&mut env, 0, |_| {
        let ptr = NonNull::new(address as usize as *mut u8)
            .ok_or_else(|| Error::InvalidArgument("address must not be 0".into()))?;
        // The core looks the address up in its table of live allocations before touching it, so a
        // wrong address is an error, never a free of foreign memory.
        with_manager(manager, |m| Ok(to_jlong(m.root().free(ptr)? as u64)))
    })
}

/// `static native int growFromNativeThreads(long manager, String pool, int threads,
/// int iterations, long bytesPerGrow)`: starts `threads` native threads; each grows a reservation
/// by `bytesPerGrow` `iterations` times (upcalls to the listener from a thread the JVM did not
/// start), then frees it. Returns how many threads were still attached to the JVM after their
/// upcalls (all of them: threads attach once, permanently). The first error of any thread is
/// thrown here, with the listener's exception as cause.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_growFromNativeThreads<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    manager: jlong,
    pool: JString<'l>,
    threads: jint,
    iterations: jint,
    bytes_per_grow: jlong,
) -> jint {
    run_export(&mut env, 0, |env| {
        let pool = string_arg(env, &pool, "pool")?;
        let threads = non_negative("threads", jlong::from(threads))?;
        let iterations = non_negative("iterations", jlong::from(iterations))?;
        let bytes = non_negative("bytesPerGrow", bytes_per_grow)?;
        let workers: Vec<_> = (0..threads)
            .map(|i| {
                let pool = pool.clone();
                std::thread::Builder::new()
                    .name(format!("nativemem-test-{i}"))
                    .spawn(move || -> Result<bool> {
                        let was_attached = vm::java_vm()?.get_env().is_ok();
                        if was_attached {
                            return Err(Error::Other(
                                "a new native thread is already attached".into(),
                            ));
                        }
                        {
                            let call = enter_manager(manager)?;
                            let reservation =
                                call.manager().pool(&pool)?.reservation("native-thread");
                            for _ in 0..iterations {
                                reservation.try_grow(bytes)?;
                            }
                            reservation.free();
                        }
                        Ok(vm::java_vm()?.get_env().is_ok())
                    })
            })
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::Other(format!("cannot start a thread: {e}")))?;
        let mut attached = 0;
        let mut first_error = None;
        for w in workers {
            match w.join() {
                Ok(Ok(still_attached)) => attached += i32::from(still_attached),
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(p) => {
                    first_error
                        .get_or_insert(Error::Panic(crate::export::panic_message(p.as_ref())));
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(attached),
        }
    })
}

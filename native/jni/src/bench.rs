//! Benchmark-only exports, bound by `org.nativemem.NativeBench` (it lives in the Spark e2e source
//! set, `tests/spark/java`, so only `nativemem-e2e.jar` has it; the published jar cannot call
//! these). `scripts/bench.sh` runs them inside a Spark task (`org.nativemem.bench.JniBench`).
//!
//! Both grow loops run here, in native code, because that is where a native operator grows
//! memory: what is compared is how often a grow has to cross into the JVM, not the cost of a
//! Java call into native code.
//!
//! ```text
//!  growLoop:           count x Reservation::try_grow(n) ─▶ cushion; 1 upcall per 8 MiB block
//!  upcallPerGrowLoop:  count x listener.reserve(n)      ─▶ 1 upcall per grow (Comet's design)
//!  noop:               nothing: the cost of one downcall through run_export (a baseline)
//! ```

use jni::objects::{JClass, JObject, JString, JThrowable};
use jni::signature::{Primitive, ReturnType};
use jni::sys::{jint, jlong, jvalue};
use jni::JNIEnv;

use crate::error::{ProviderError, Result};
use crate::guard::{non_negative, run_export, string_arg, to_jlong};
use crate::vm;
use nativemem_provider::registry::enter_manager;

/// `static native long noop(long value)`: returns `value`. The baseline of one JNI downcall, with
/// the same panic guard every export has.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeBench_noop<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    value: jlong,
) -> jlong {
    run_export(&mut env, 0, |_| Ok(value))
}

/// `static native long growLoop(long manager, String poolPath, long bytesPerGrow, int count)`:
/// grows one reservation of the pool at `poolPath` by `bytesPerGrow` bytes `count` times, then
/// frees it; returns the bytes it held at the end (`count * bytesPerGrow`). The manager reserves
/// from its Java listener one block at a time and hands surplus back with hysteresis, as for any
/// native operator. On error nothing stays held (the reservation is dropped).
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeBench_growLoop<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    manager: jlong,
    pool_path: JString<'l>,
    bytes_per_grow: jlong,
    count: jint,
) -> jlong {
    run_export(&mut env, 0, |env| {
        let pool_path = string_arg(env, &pool_path, "poolPath")?;
        let bytes = non_negative("bytesPerGrow", bytes_per_grow)?;
        let count = non_negative("count", jlong::from(count))?;
        let call = enter_manager(manager)?;
        let reservation = call.manager().pool(&pool_path)?.reservation("bench");
        for _ in 0..count {
            reservation.try_grow(bytes)?;
        }
        Ok(to_jlong(reservation.free()))
    })
}

/// `static native long upcallPerGrowLoop(ReservationListener listener, long bytesPerGrow,
/// int count)`: the per-grow design, for comparison: calls `listener.reserve(bytesPerGrow)`
/// `count` times (one upcall per grow, through the method id cached on a Java thread, as
/// [`JavaListener`](crate::listener::JavaListener) does), then `listener.unreserve` of the total once;
/// returns the bytes granted in all. A short grant is an error. Whatever was granted is given back
/// even on error; a Java exception thrown by `reserve` is set aside for that and rethrown.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeBench_upcallPerGrowLoop<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    listener: JObject<'l>,
    bytes_per_grow: jlong,
    count: jint,
) -> jlong {
    run_export(&mut env, 0, |env| {
        if listener.is_null() {
            return Err(ProviderError::NullArgument("listener").into());
        }
        non_negative("bytesPerGrow", bytes_per_grow)?;
        let count = non_negative("count", jlong::from(count))?;
        let classes = vm::init_classes(env)?;
        if !env.is_instance_of(&listener, vm::as_class(&classes.listener))? {
            return Err(ProviderError::InvalidArgument(
                "listener does not implement org.nativemem.ReservationListener".into(),
            )
            .into());
        }
        let mut granted_total: jlong = 0;
        let mut outcome: Result<()> = Ok(());
        for _ in 0..count {
            // SAFETY: `listener_reserve` is `long reserve(long)` of org.nativemem.ReservationListener,
            // resolved on that interface; `listener` is a non-null instance of it (checked above);
            // one long argument is passed.
            let reserved = unsafe {
                env.call_method_unchecked(
                    &listener,
                    classes.listener_reserve,
                    ReturnType::Primitive(Primitive::Long),
                    &[jvalue { j: bytes_per_grow }],
                )
            }
            .and_then(|v| v.j());
            match reserved {
                Ok(granted) => {
                    granted_total = granted_total.saturating_add(granted.max(0));
                    if granted != bytes_per_grow {
                        outcome = Err(ProviderError::Other(format!(
                            "per-grow baseline: listener granted {granted} of {bytes_per_grow} bytes \
                             after {granted_total} bytes in all"
                        ))
                        .into());
                        break;
                    }
                }
                Err(e) => {
                    outcome = Err(e.into());
                    break;
                }
            }
        }
        // Give back what was granted. A pending exception must be cleared before calling Java.
        let pending: JThrowable = env.exception_occurred()?;
        if !pending.is_null() {
            env.exception_clear()?;
        }
        if granted_total > 0 {
            // SAFETY: `listener_unreserve` is `void unreserve(long)` of the listener interface,
            // which `listener` implements (checked above); one long argument.
            let released = unsafe {
                env.call_method_unchecked(
                    &listener,
                    classes.listener_unreserve,
                    ReturnType::Primitive(Primitive::Void),
                    &[jvalue { j: granted_total }],
                )
            };
            if let Err(e) = released {
                if pending.is_null() {
                    return Err(e.into());
                }
                // Keep the first exception: drop the one unreserve threw.
                env.exception_clear()?;
                log::error!("per-grow baseline: unreserve({granted_total}) failed too: {e}");
            }
        }
        if !pending.is_null() {
            env.throw(pending)?;
        }
        outcome.map(|()| granted_total)
    })
}

//! `Java_org_nativemem_*` exports of the public Java API. Each one resolves its arguments and
//! calls the provider's registry; errors become Java exceptions in [`run_export`].
//!
//! Java side: the `native*` static methods of `NativeMemoryManager`, `NativeReservation` and
//! `NativeLibraryLoader`; the handle is always the first argument.

use std::sync::Arc;
use std::time::Duration;

use jni::objects::{JClass, JObject, JString};
use jni::sys::{jint, jlong, jlongArray, jobjectArray, jstring};
use jni::JNIEnv;
use nativemem_core::{LeakKind, LeakReport, MemoryConfig};

use crate::error::{ProviderError, Result};
use crate::guard::{non_negative, run_export, string_arg, to_jlong};
use crate::listener::JavaListener;
use nativemem_provider::registry::{self, CloseOutcome, Entry};

/// Version of the contract between this library and the `org.nativemem` classes (native method
/// signatures, `NativeMemoryStats` and `NativeCloseReport` layouts). The Java loader refuses a
/// library with another value. (The engine ABI has its own version, `NM_ABI_VERSION`.)
const ABI_VERSION: jint = 2;

fn new_jstring(env: &mut JNIEnv, s: &str) -> Result<jstring> {
    Ok(env.new_string(s)?.into_raw())
}

fn new_jlong_array(env: &mut JNIEnv, values: &[jlong]) -> Result<jlongArray> {
    let len = i32::try_from(values.len())
        .map_err(|_| ProviderError::Other("array too long for Java".into()))?;
    let array = env.new_long_array(len)?;
    env.set_long_array_region(&array, 0, values)?;
    Ok(array.into_raw())
}

/// `static native int nativeAbiVersion()`: lets the loader check the library matches the classes.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeLibraryLoader_nativeAbiVersion<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
) -> jint {
    run_export(&mut env, -1, |_| Ok(ABI_VERSION))
}

/// `static native long nativeApiAddress()`: the address of the engine ABI table.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeMemoryManager_nativeApiAddress<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
) -> jlong {
    run_export(&mut env, 0, |_| {
        Ok(nativemem_provider::api(nativemem_sys::NM_ABI_VERSION) as jlong)
    })
}

/// `static native long nativeCreate(String name, ReservationListener listener,
/// long reservationBlockBytes, long taskLimitBytes /* -1: none */, long closeTimeoutMillis,
/// long reservationQuantumBytes /* 0: exact accounting */)`.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeMemoryManager_nativeCreate<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    name: JString<'l>,
    listener: JObject<'l>,
    reservation_block: jlong,
    task_limit: jlong,
    close_timeout_millis: jlong,
    reservation_quantum: jlong,
) -> jlong {
    run_export(&mut env, 0, |env| {
        let name = string_arg(env, &name, "name")?;
        let listener = JavaListener::new(env, &listener)?;
        if reservation_block <= 0 {
            return Err(ProviderError::InvalidArgument(format!(
                "reservation block size must be > 0 bytes, got {reservation_block}"
            ))
            .into());
        }
        let task_limit = match task_limit {
            -1 => None,
            v => Some(non_negative("task limit", v)?),
        };
        let timeout = Duration::from_millis(non_negative("close timeout", close_timeout_millis)?);
        let config = MemoryConfig::default()
            .with_reservation_block(reservation_block as u64)
            .with_task_limit(task_limit)
            .with_reservation_quantum(non_negative("reservation quantum", reservation_quantum)?);
        Ok(registry::create_manager(
            name,
            config,
            Arc::new(listener),
            timeout,
        )?)
    })
}

/// `static native Object[] nativeClose(long handle)`: `{String text, long[] numbers, String[]
/// names}`, decoded by `NativeCloseReport.fromNative`: numbers = deferred (0/1), calls in flight,
/// bytes returned to the listener, then per leak bytes and count; names = per leak kind, consumer
/// and pool.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeMemoryManager_nativeClose<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
) -> jobjectArray {
    run_export(&mut env, std::ptr::null_mut(), |env| {
        let (text, mut numbers, mut names) = match registry::destroy_manager(handle)? {
            CloseOutcome::Closed(report) => (
                report.to_string(),
                vec![0, 0, to_jlong(report.returned_to_listener)],
                report,
            ),
            CloseOutcome::Deferred { in_flight } => (
                format!(
                    "close deferred: called from inside a call on the same manager; it completes when the {in_flight} call(s) in progress return"
                ),
                vec![1, to_jlong(in_flight), 0],
                LeakReport::default(),
            ),
        };
        let mut strings = Vec::with_capacity(names.leaks.len() * 3);
        for leak in names.leaks.drain(..) {
            let kind = match leak.kind {
                LeakKind::Allocation => "ALLOCATION",
                LeakKind::Reservation => "RESERVATION",
                LeakKind::HeldAllocation => "HELD_ALLOCATION",
                #[allow(unreachable_patterns)]
                _ => "ALLOCATION",
            };
            strings.extend([kind.to_string(), leak.name, leak.pool]);
            numbers.extend([to_jlong(leak.bytes), to_jlong(leak.count)]);
        }
        let string_class = env.find_class("java/lang/String")?;
        let object_class = env.find_class("java/lang/Object")?;
        let len = |n: usize| {
            i32::try_from(n)
                .map_err(|_| ProviderError::Other("close report too long for Java".into()))
        };
        let names_array =
            env.new_object_array(len(strings.len())?, &string_class, JObject::null())?;
        for (i, s) in strings.iter().enumerate() {
            let js = env.new_string(s)?;
            env.set_object_array_element(&names_array, len(i)?, &js)?;
            env.delete_local_ref(js)?;
        }
        let numbers_array = env.new_long_array(len(numbers.len())?)?;
        env.set_long_array_region(&numbers_array, 0, &numbers)?;
        let out = env.new_object_array(3, &object_class, JObject::null())?;
        let text = env.new_string(&text)?;
        env.set_object_array_element(&out, 0, &text)?;
        env.set_object_array_element(&out, 1, &numbers_array)?;
        env.set_object_array_element(&out, 2, &names_array)?;
        Ok(out.into_raw())
    })
}

/// `static native long nativeUsedBytes(long handle)`.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeMemoryManager_nativeUsedBytes<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
) -> jlong {
    run_export(&mut env, 0, |_| {
        Ok(registry::with_manager(handle, |m| Ok(to_jlong(m.used())))?)
    })
}

/// `static native long nativePeakBytes(long handle)`.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeMemoryManager_nativePeakBytes<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
) -> jlong {
    run_export(&mut env, 0, |_| {
        Ok(registry::with_manager(handle, |m| Ok(to_jlong(m.peak())))?)
    })
}

/// `static native long nativeReservedBytes(long handle)`.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeMemoryManager_nativeReservedBytes<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
) -> jlong {
    run_export(&mut env, 0, |_| {
        Ok(registry::with_manager(handle, |m| {
            Ok(to_jlong(m.reserved()))
        })?)
    })
}

/// `static native String nativeUsageReport(long handle)`.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeMemoryManager_nativeUsageReport<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
) -> jstring {
    run_export(&mut env, std::ptr::null_mut(), |env| {
        let text = registry::with_manager(handle, |m| Ok(m.usage_report().to_string()))?;
        new_jstring(env, &text)
    })
}

/// `static native long[] nativeStats(long handle)`: used, peak, reserved, spillCount,
/// spilledBytes, reserveCalls, unreserveCalls, liveAllocations, overcommittedBytes,
/// overcommitPeakBytes, overcommittedTotalBytes, gateRefusals, arbitrations, arbitratedBytes,
/// spillWrittenBytes, allocatedBytes (the order of `NativeMemoryStats`).
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeMemoryManager_nativeStats<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
) -> jlongArray {
    run_export(&mut env, std::ptr::null_mut(), |env| {
        let s = registry::with_manager(handle, |m| Ok(m.stats()))?;
        let values = [
            s.used,
            s.peak,
            s.reserved,
            s.spill_count,
            s.spilled_bytes,
            s.reserve_calls,
            s.unreserve_calls,
            s.live_allocations,
            s.overcommitted,
            s.overcommit_peak,
            s.overcommitted_total,
            s.gate_refusals,
            s.arbitrations,
            s.arbitrated_bytes,
            s.spill_written_bytes,
            s.allocated_bytes,
        ]
        .map(to_jlong);
        new_jlong_array(env, &values)
    })
}

/// `static native long nativeSpill(long handle, long bytes)`: bytes native spillers freed.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeMemoryManager_nativeSpill<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
    bytes: jlong,
) -> jlong {
    run_export(&mut env, 0, |_| {
        let bytes = non_negative("bytes", bytes)?;
        Ok(registry::with_manager(handle, |m| {
            Ok(to_jlong(m.spill(bytes)?))
        })?)
    })
}

/// `static native long nativeReleaseUnused(long handle, long maxBytes)`: bytes handed back.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeMemoryManager_nativeReleaseUnused<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
    max_bytes: jlong,
) -> jlong {
    run_export(&mut env, 0, |_| {
        let max = non_negative("maxBytes", max_bytes)?;
        Ok(registry::with_manager(handle, |m| {
            Ok(to_jlong(m.release_unused(max)?))
        })?)
    })
}

/// `static native long nativeReclaim(long handle, long bytes)`: bytes handed back to the
/// listener (core `reclaim`).
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeMemoryManager_nativeReclaim<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
    bytes: jlong,
) -> jlong {
    run_export(&mut env, 0, |_| {
        let bytes = non_negative("bytes", bytes)?;
        Ok(registry::with_manager(handle, |m| {
            Ok(to_jlong(m.reclaim(bytes)?))
        })?)
    })
}

/// `static native long nativeReserve(long handle, String poolPath, String consumer, long bytes)`:
/// a reservation handle.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeMemoryManager_nativeReserve<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
    pool_path: JString<'l>,
    consumer: JString<'l>,
    bytes: jlong,
) -> jlong {
    run_export(&mut env, 0, |env| {
        let pool_path = string_arg(env, &pool_path, "poolPath")?;
        let consumer = string_arg(env, &consumer, "consumer")?;
        let bytes = non_negative("bytes", bytes)?;
        Ok(registry::create_reservation(
            handle, &pool_path, &consumer, bytes,
        )?)
    })
}

/// `static native long[] nativeLiveHandles()`: live manager and reservation handles (diagnostics).
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeMemoryManager_nativeLiveHandles<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
) -> jlongArray {
    run_export(&mut env, std::ptr::null_mut(), |env| {
        let values = [
            to_jlong(registry::live_managers() as u64),
            to_jlong(registry::live_reservations() as u64),
        ];
        new_jlong_array(env, &values)
    })
}

/// `static native void nativeGrow(long reservation, long bytes)`.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeReservation_nativeGrow<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
    bytes: jlong,
) {
    run_export(&mut env, (), |_| {
        let bytes = non_negative("bytes", bytes)?;
        Ok(registry::with_reservation(handle, |r| {
            Ok(r.try_grow(bytes)?)
        })?)
    })
}

/// `static native void nativeShrink(long reservation, long bytes)`. A give-back, as the engine
/// ABI's `reservation_shrink` on the same handle: let in while the manager's close waits for
/// other calls, so the bytes are released at once (no leak).
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeReservation_nativeShrink<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
    bytes: jlong,
) {
    run_export(&mut env, (), |_| {
        let bytes = non_negative("bytes", bytes)?;
        Ok(registry::with_reservation_as(
            handle,
            Entry::GiveBack,
            |r| Ok(r.shrink(bytes)?),
        )?)
    })
}

/// `static native void nativeResize(long reservation, long newSize)`.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeReservation_nativeResize<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
    new_size: jlong,
) {
    run_export(&mut env, (), |_| {
        let new_size = non_negative("newSize", new_size)?;
        Ok(registry::with_reservation(handle, |r| {
            Ok(r.try_resize(new_size)?)
        })?)
    })
}

/// `static native long nativeSize(long reservation)`.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeReservation_nativeSize<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
) -> jlong {
    run_export(&mut env, 0, |_| {
        Ok(registry::with_reservation(handle, |r| {
            Ok(to_jlong(r.size()))
        })?)
    })
}

/// `static native long nativePeak(long reservation)`.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeReservation_nativePeak<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
) -> jlong {
    run_export(&mut env, 0, |_| {
        Ok(registry::with_reservation(handle, |r| {
            Ok(to_jlong(r.peak()))
        })?)
    })
}

/// `static native void nativeClose(long reservation)`.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeReservation_nativeClose<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
) {
    run_export(&mut env, (), |_| Ok(registry::close_reservation(handle)?))
}

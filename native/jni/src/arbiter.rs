//! `Java_org_nativemem_ExecutorArbiter_*`: executor-wide arbitration (see
//! `nativemem_provider::arbiter`), configured by the Spark plugin at executor start.

use jni::objects::JClass;
use jni::sys::{jboolean, jlong, jlongArray};
use jni::JNIEnv;
use nativemem_provider::arbiter::{self, ArbiterSettings};

use crate::guard::{non_negative, run_export, to_jlong};

/// `static native void nativeConfigure(boolean enabled, boolean crossTaskSpill, long
/// spillCapBytes)`: sets the arbiter's settings (process-wide).
#[no_mangle]
pub extern "system" fn Java_org_nativemem_ExecutorArbiter_nativeConfigure<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    enabled: jboolean,
    cross_task_spill: jboolean,
    spill_cap: jlong,
) {
    run_export(&mut env, (), |_| {
        arbiter::configure(ArbiterSettings {
            enabled: enabled != 0,
            cross_task_spill: cross_task_spill != 0,
            spill_cap: non_negative("cross-task spill cap", spill_cap)?,
        });
        Ok(())
    })
}

/// `static native long[] nativeStatus()`: {enabled, cross-task spill on, spill cap, idle bytes
/// across the executor, short grants, reclaims, reclaimed bytes, cross-task spills, spilled
/// bytes, victims}.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_ExecutorArbiter_nativeStatus<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
) -> jlongArray {
    run_export(&mut env, std::ptr::null_mut(), |env| {
        let c = arbiter::settings();
        let s = arbiter::status();
        let values = [
            c.enabled as u64,
            c.cross_task_spill as u64,
            c.spill_cap,
            s.idle_bytes,
            s.short_grants,
            s.reclaims,
            s.reclaimed_bytes,
            s.spills,
            s.spilled_bytes,
            s.victims,
        ]
        .map(to_jlong);
        let array = env.new_long_array(values.len() as i32)?;
        env.set_long_array_region(&array, 0, &values)?;
        Ok(array.into_raw())
    })
}

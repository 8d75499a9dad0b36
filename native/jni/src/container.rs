//! `Java_org_nativemem_ContainerGovernor_*`: the executor's container governor (see
//! `nativemem_provider::governor`), started by the Spark plugin at executor start.

use std::time::Duration;

use jni::objects::JClass;
use jni::sys::{jdouble, jlong, jlongArray, jstring};
use jni::JNIEnv;
use nativemem_governor::Thresholds;
use nativemem_provider::governor::{self, GovernorConfig, Started};

use crate::error::{ProviderError, Result};
use crate::guard::{non_negative, run_export, to_jlong};

/// `static native String nativeStart(long configuredLimitBytes /* 0: none */, double softLevel,
/// double hardLevel, long minIntervalMillis, long maxIntervalMillis)`: starts the governor unless
/// one runs or there is neither a memory cgroup nor a configured limit; returns what it found,
/// for the executor's log.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_ContainerGovernor_nativeStart<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    configured_limit: jlong,
    soft: jdouble,
    hard: jdouble,
    min_interval_millis: jlong,
    max_interval_millis: jlong,
) -> jstring {
    run_export(&mut env, std::ptr::null_mut(), |env| {
        let configured = non_negative("container limit", configured_limit)?;
        let thresholds = Thresholds {
            soft,
            hard,
            min_interval: Duration::from_millis(non_negative("min interval", min_interval_millis)?),
            max_interval: Duration::from_millis(non_negative("max interval", max_interval_millis)?),
            ..Thresholds::default()
        };
        let started = governor::start(GovernorConfig {
            thresholds,
            configured_limit: (configured > 0).then_some(configured),
        })?;
        let text = match started {
            Started::Running(view) => format!(
                "governing the container: {}; soft level {:.0}%, hard level {:.0}%",
                governor::describe_view(&view),
                soft * 100.0,
                hard * 100.0
            ),
            Started::AlreadyRunning => "the container governor runs already".to_string(),
            Started::NoLimit(view) => {
                format!("no container governor: {}", governor::describe_view(&view))
            }
        };
        new_jstring(env, &text)
    })
}

/// `static native long[] nativeStatus()`: {running, limit, anonymous usage, pressure, samples,
/// sample nanos, sample errors, soft entries, hard entries, give-backs, give-back bytes, trims,
/// spills, spilled bytes, last relief nanos, longest relief nanos, grow refusals so far}.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_ContainerGovernor_nativeStatus<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
) -> jlongArray {
    run_export(&mut env, std::ptr::null_mut(), |env| {
        let s = governor::status();
        let g = &s.stats;
        let values = [
            s.running as u64,
            s.limit,
            s.usage,
            s.pressure as u64,
            g.samples,
            g.sample_nanos,
            g.sample_errors,
            g.soft_entries,
            g.hard_entries,
            g.give_backs,
            g.give_back_bytes,
            g.trims,
            g.spills,
            g.spill_bytes,
            g.last_relief_nanos,
            g.max_relief_nanos,
            s.gate_refusals,
        ]
        .map(to_jlong);
        let array = env.new_long_array(values.len() as i32)?;
        env.set_long_array_region(&array, 0, &values)?;
        Ok(array.into_raw())
    })
}

/// `static native String nativeForensics()`: the governor's snapshot history (one taken now), or
/// null without a governor.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_ContainerGovernor_nativeForensics<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
) -> jstring {
    run_export(
        &mut env,
        std::ptr::null_mut(),
        |env| match governor::forensics() {
            Some(text) => new_jstring(env, &text),
            None => Ok(std::ptr::null_mut()),
        },
    )
}

/// `static native void nativeStop()`: stops the governor (no-op without one).
#[no_mangle]
pub extern "system" fn Java_org_nativemem_ContainerGovernor_nativeStop<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
) {
    run_export(&mut env, (), |_| {
        governor::stop();
        Ok(())
    })
}

fn new_jstring(env: &mut JNIEnv, s: &str) -> Result<jstring> {
    Ok(env
        .new_string(s)
        .map_err(|e| ProviderError::Other(format!("cannot make a Java string: {e}")))?
        .into_raw())
}

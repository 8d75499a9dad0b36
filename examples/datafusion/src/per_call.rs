//! [`PerCallPool`]: Comet's design, for comparison only — one JNI call into Spark per `try_grow`,
//! `grow` and `shrink`, through a Spark `MemoryConsumer` that cannot spill. Spark can take nothing
//! back from DataFusion through it, and every grow pays an upcall (and a thread attach the first
//! time a DataFusion thread calls). Never what an engine should do: it exists so the Spark job can
//! measure nativemem against it on the same queries.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use datafusion::error::{DataFusionError, Result};
use datafusion::execution::memory_pool::{MemoryLimit, MemoryPool, MemoryReservation};
use jni::objects::{GlobalRef, JValue};
use jni::JavaVM;

/// A DataFusion pool that asks Spark for every byte, one JNI call per request.
pub struct PerCallPool {
    vm: JavaVM,
    /// The Spark `MemoryConsumer` (its public `acquireMemory(long)` and `freeMemory(long)`).
    consumer: GlobalRef,
    reserved: AtomicU64,
    calls: AtomicU64,
}

impl PerCallPool {
    /// A pool charging `consumer` (an `org.apache.spark.memory.MemoryConsumer`) of the JVM `vm`.
    pub fn new(vm: JavaVM, consumer: GlobalRef) -> Self {
        PerCallPool {
            vm,
            consumer,
            reserved: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        }
    }

    /// JNI calls made so far.
    pub fn calls(&self) -> u64 {
        // Relaxed: a read-out.
        self.calls.load(Ordering::Relaxed)
    }

    /// `consumer.acquireMemory(bytes)`: the bytes Spark granted (0 on a Java exception, which is
    /// cleared: Comet's pool treats it as a refusal too).
    fn acquire(&self, bytes: u64) -> Result<u64> {
        self.upcall("acquireMemory", "(J)J", bytes)
            .map(|v| u64::try_from(v).unwrap_or(0))
    }

    fn release(&self, bytes: u64) {
        if let Err(e) = self.upcall("freeMemory", "(J)V", bytes) {
            log::warn!("per-call pool: freeMemory({bytes}) failed: {e}");
        }
    }

    fn upcall(&self, method: &str, sig: &str, bytes: u64) -> Result<i64> {
        // Relaxed: a statistic.
        self.calls.fetch_add(1, Ordering::Relaxed);
        let jni = |e: jni::errors::Error| DataFusionError::External(Box::new(e));
        // Attached for the thread's life (DataFusion's threads are the engine's runtime's).
        let mut env = self.vm.attach_current_thread_as_daemon().map_err(jni)?;
        let arg = i64::try_from(bytes).unwrap_or(i64::MAX);
        let result = env.call_method(self.consumer.as_obj(), method, sig, &[JValue::Long(arg)]);
        if env.exception_check().unwrap_or(false) {
            let _ = env.exception_clear();
            return Err(DataFusionError::ResourcesExhausted(format!(
                "Spark threw from MemoryConsumer.{method}({bytes})"
            )));
        }
        let value = result.map_err(jni)?;
        Ok(if sig.ends_with('J') {
            value.j().map_err(jni)?
        } else {
            0
        })
    }
}

impl fmt::Debug for PerCallPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerCallPool")
            .field("reserved", &self.reserved())
            .field("calls", &self.calls())
            .finish()
    }
}

impl fmt::Display for PerCallPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "per-call JNI pool ({} reserved, {} calls)",
            self.reserved(),
            self.calls()
        )
    }
}

impl MemoryPool for PerCallPool {
    fn name(&self) -> &str {
        "per-call-jni"
    }

    fn grow(&self, _reservation: &MemoryReservation, additional: usize) {
        // Infallible: what Spark does not grant is held anyway (unaccounted), as in Comet.
        if let Err(e) = self.acquire(additional as u64) {
            log::warn!("per-call pool: grow by {additional}: {e}");
        }
        // Relaxed: this pool's own total.
        self.reserved
            .fetch_add(additional as u64, Ordering::Relaxed);
    }

    fn shrink(&self, _reservation: &MemoryReservation, shrink: usize) {
        self.release(shrink as u64);
        // Relaxed: this pool's own total.
        self.reserved.fetch_sub(shrink as u64, Ordering::Relaxed);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let want = additional as u64;
        let got = self.acquire(want)?;
        if got < want {
            if got > 0 {
                self.release(got);
            }
            return Err(DataFusionError::ResourcesExhausted(format!(
                "Failed to acquire {want} bytes for {}: Spark granted {got}",
                reservation.consumer().name()
            )));
        }
        // Relaxed: this pool's own total.
        self.reserved.fetch_add(want, Ordering::Relaxed);
        Ok(())
    }

    fn reserved(&self) -> usize {
        // Relaxed: a read-out.
        self.reserved.load(Ordering::Relaxed) as usize
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Unknown
    }
}

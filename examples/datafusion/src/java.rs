//! `Java_org_nativemem_examples_DataFusionTask_*`: the JNI face of the engine.
//!
//! # Lifetime and the manager
//! A task (handle kind tag 64, the first of the engines' range) belongs to one manager. A query
//! holds a lease of that manager from `start` until it ends (the `ClientPool` keeps it:
//! DataFusion's threads charge the pool while it runs), never longer: `await` returns after the query dropped its pool, and `close` cancels a
//! running query and waits for it. Java closes the task before the task's manager (a Spark task
//! completion listener registered after the manager's runs first); a manager closing under a
//! running query waits for its lease, time-bounded, as for any engine.
//!
//! # Locks
//! The task's state mutex is held only to take or put back the running query; never while a
//! query runs, waits or calls nativemem (which may call Spark, which may ask this engine's pool
//! for memory on another thread).
//!
//! # Errors and exceptions
//! Every export runs under the JNI kit's guard (`nativemem_client::java::run_export`): no panic
//! crosses JNI, and each error becomes one Java exception by the kit's table, plus this engine's
//! own exception for a failed query:
//!
//! | error                                                  | Java exception                              |
//! |--------------------------------------------------------|---------------------------------------------|
//! | the query failed (DataFusion's error; refusals carry nativemem's report) | `org.nativemem.examples.DataFusionQueryException` (`resourcesExhausted()` says which) |
//! | `NM_ERR_OUT_OF_MEMORY` from the engine ABI             | `org.nativemem.NativeOutOfMemoryException`  |
//! | a bad argument                                         | `IllegalArgumentException`                  |
//! | a bad, closed or busy task handle; a stale manager     | `IllegalStateException`                     |
//! | a `null` argument                                      | `NullPointerException`                      |
//! | anything else (JNI failure, panic)                     | `org.nativemem.NativeMemoryException`       |

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use datafusion::error::DataFusionError;
use datafusion::execution::memory_pool::MemoryPool;
use jni::objects::{JClass, JObject, JString, JThrowable, JValue};
use jni::sys::{jboolean, jint, jlong, jlongArray};
use jni::JNIEnv;
use nativemem_client::handles::{kind, HandleTable};
use nativemem_client::java::{long_array, run_export, string_arg, JavaError as Error, Result};
use nativemem_client::Api;
use nativemem_datafusion::{ClientPool, NativememPool};
use parking_lot::Mutex;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use crate::per_call::PerCallPool;
use crate::query::{self, Outcome, Query};

/// Live tasks: this library's only table, with the first tag of the range reserved for engines.
static TASKS: HandleTable<Task> = HandleTable::for_engine(kind::ENGINE_FIRST, "DataFusion task");

/// Number of values in the `long[]` of `nativeAwait` / `nativeStats` (Java's `DataFusionStats`).
const STATS_LEN: usize = 12;

/// The engine's runtime, shared by every task of the JVM: DataFusion's partitions run on its two
/// worker threads (the executor's cores belong to Spark's task threads; an engine sizes this).
fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("nativemem-datafusion")
            .enable_all()
            .build()
            .expect("the engine's tokio runtime")
    })
}

// ---- errors ------------------------------------------------------------------------------------

const QUERY_EXCEPTION: &str = "org/nativemem/examples/DataFusionQueryException";

/// A failed query as `DataFusionQueryException(message, resourcesExhausted)`.
fn query_error(e: DataFusionError) -> Error {
    let exhausted = matches!(e.find_root(), DataFusionError::ResourcesExhausted(_));
    let message = e.to_string();
    Error::throw(format!("DataFusion query failed: {message}"), move |env| {
        let msg = env.new_string(message)?;
        let obj = env.new_object(
            QUERY_EXCEPTION,
            "(Ljava/lang/String;Z)V",
            &[JValue::Object(&msg), JValue::Bool(exhausted.into())],
        )?;
        Ok(JThrowable::from(obj))
    })
}

/// An error of the DataFusion pool's own use of nativemem.
fn pool_error(e: nativemem_datafusion::NativeError) -> Error {
    Error::IllegalState(format!("nativemem: {e}"))
}

// ---- the task ----------------------------------------------------------------------------------

/// Where a task's DataFusion memory goes.
enum Accounting {
    /// nativemem's pool on the task's manager (the product).
    Nativemem { answer_spill_requests: bool },
    /// Comet's design (comparison only): a JNI call into this Spark `MemoryConsumer` per request.
    PerCall {
        vm: jni::JavaVM,
        consumer: jni::objects::GlobalRef,
    },
}

/// The pool of a running (or the last) query, for live statistics.
#[derive(Clone)]
enum LivePool {
    Nativemem(Arc<NativememPool<ClientPool>>),
    PerCall(Arc<PerCallPool>),
}

impl LivePool {
    /// (spill requests, bytes requested, yields, bytes yielded, JNI calls, peak reserved)
    fn counters(&self) -> [u64; 6] {
        match self {
            LivePool::Nativemem(p) => {
                let s = p.spill_requests();
                [
                    s.requests,
                    s.requested_bytes,
                    s.yields,
                    s.yielded_bytes,
                    0,
                    p.peak_reserved(),
                ]
            }
            LivePool::PerCall(p) => [0, 0, 0, 0, p.calls(), 0],
        }
    }

    /// Each DataFusion operator's peak memory (nativemem's pool only), largest first.
    fn operator_peaks(&self) -> Vec<(String, u64)> {
        match self {
            LivePool::Nativemem(p) => p.consumer_peaks(),
            LivePool::PerCall(_) => Vec::new(),
        }
    }
}

struct Running {
    handle: JoinHandle<datafusion::error::Result<Outcome>>,
    started: Instant,
}

/// How long `await`/`close` wait, after the query's future ended, for the tasks DataFusion
/// spawned (repartitions, spill merges) to drop their reservations.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct State {
    running: Option<Running>,
    /// The pool of the running query (for live counters).
    pool: Option<LivePool>,
    /// The counters of the last query's pool, kept when it ended.
    counters: [u64; 6],
    /// The operators' peaks of the last query's pool, kept when it ended.
    peaks: Vec<(String, u64)>,
    last: Option<Outcome>,
    /// The last query completed (not failed, not cancelled).
    completed: bool,
    /// Aborts the query while a thread waits for it in `await` (`running` is taken then).
    abort: Option<tokio::task::AbortHandle>,
    elapsed: Duration,
    closed: bool,
}

struct Task {
    api: Api,
    manager: jlong,
    pool_path: String,
    partitions: usize,
    accounting: Accounting,
    state: Mutex<State>,
}

impl Task {
    /// The running (or last) query's operators' peaks, one `name<TAB>bytes` line each.
    fn operator_peaks(&self) -> String {
        let state = self.state.lock();
        let peaks = match &state.pool {
            Some(pool) => pool.operator_peaks(),
            None => state.peaks.clone(),
        };
        peaks
            .iter()
            .map(|(name, bytes)| format!("{name}\t{bytes}\n"))
            .collect()
    }

    fn stats(&self) -> [u64; STATS_LEN] {
        let state = self.state.lock();
        let out = state.last.unwrap_or_default();
        let c = match &state.pool {
            Some(pool) => pool.counters(),
            None => state.counters,
        };
        [
            out.rows,
            out.digest,
            out.spill_count,
            out.spilled_bytes,
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            c[5],
            u64::try_from(state.elapsed.as_nanos()).unwrap_or(u64::MAX),
            u64::from(
                state.completed
                    || state
                        .running
                        .as_ref()
                        .is_some_and(|r| r.handle.is_finished()),
            ),
        ]
    }

    fn start(&self, query: Query, rows: u64) -> Result<()> {
        {
            let state = self.state.lock();
            if state.closed {
                return Err(Error::IllegalState("the DataFusion task is closed".into()));
            }
            if state.running.is_some() || state.abort.is_some() {
                return Err(Error::IllegalState(
                    "a query is already running on this DataFusion task".into(),
                ));
            }
        }
        // Built outside the lock: opening the pool calls nativemem.
        let (pool, live): (Arc<dyn MemoryPool>, LivePool) = match &self.accounting {
            Accounting::Nativemem {
                answer_spill_requests,
            } => {
                let lease = self.api.acquire(self.manager)?;
                // `in_task`: the task's other pools (another query of the task) share the wait
                // of a merge for the consumers asked to spill.
                let pool = Arc::new(NativememPool::new(
                    ClientPool::open(lease, &self.pool_path, None)?.in_task(self.manager),
                ));
                if *answer_spill_requests {
                    pool.answer_spill_requests().map_err(pool_error)?;
                }
                (pool.clone(), LivePool::Nativemem(pool))
            }
            Accounting::PerCall { vm, consumer } => {
                // SAFETY: the raw pointer comes from a live JavaVM owned by `vm`.
                let vm = unsafe { jni::JavaVM::from_raw(vm.get_java_vm_pointer()) }?;
                let pool = Arc::new(PerCallPool::new(vm, consumer.clone()));
                (pool.clone(), LivePool::PerCall(pool))
            }
        };
        let partitions = self.partitions;
        let handle = runtime().spawn(query::run(pool, query, rows, partitions));
        let mut state = self.state.lock();
        if state.closed {
            // Closed while the pool was being built: stop at once.
            handle.abort();
            return Err(Error::IllegalState("the DataFusion task is closed".into()));
        }
        state.pool = Some(live);
        state.last = None;
        state.completed = false;
        state.abort = Some(handle.abort_handle());
        state.running = Some(Running {
            handle,
            started: Instant::now(),
        });
        Ok(())
    }

    /// Waits for the running query; its outcome or error.
    fn wait(&self) -> Result<[u64; STATS_LEN]> {
        let running = self.state.lock().running.take().ok_or_else(|| {
            Error::IllegalState("no query started on this DataFusion task".into())
        })?;
        let joined = runtime().block_on(running.handle);
        {
            let mut state = self.state.lock();
            state.elapsed = running.started.elapsed();
            state.abort = None;
        }
        self.release_pool();
        let mut state = self.state.lock();
        match joined {
            Ok(Ok(outcome)) => {
                state.last = Some(outcome);
                state.completed = true;
                drop(state);
                Ok(self.stats())
            }
            Ok(Err(e)) => {
                state.last = Some(Outcome::default());
                Err(query_error(e))
            }
            Err(e) => {
                state.last = Some(Outcome::default());
                Err(Error::IllegalState(format!(
                    "the DataFusion query did not finish: {e}"
                )))
            }
        }
    }

    /// Waits until the tasks DataFusion spawned for the query dropped the pool (they release
    /// their reservations asynchronously after the query's stream ended or was cancelled), keeps
    /// the pool's counters and drops it, so neither memory nor the manager's lease (held by a
    /// `ClientPool`) outlives `await` or `close`.
    fn release_pool(&self) {
        let Some(pool) = self.state.lock().pool.clone() else {
            return;
        };
        let started = Instant::now();
        let only_ours = |p: &LivePool| match p {
            // Two: the task state's and this function's.
            LivePool::Nativemem(p) => Arc::strong_count(p) <= 2,
            LivePool::PerCall(p) => Arc::strong_count(p) <= 2,
        };
        while !only_ours(&pool) && started.elapsed() < DRAIN_TIMEOUT {
            std::thread::sleep(Duration::from_millis(1));
        }
        if !only_ours(&pool) {
            log::warn!(
                "DataFusion still holds its pool {DRAIN_TIMEOUT:?} after the query ended; \
                 its memory is released when it drops it"
            );
        }
        let counters = pool.counters();
        let peaks = pool.operator_peaks();
        let taken = {
            let mut state = self.state.lock();
            state.counters = counters;
            state.peaks = peaks;
            state.pool.take()
        };
        // Dropped outside the lock: dropping the pool unregisters its spiller through nativemem.
        drop(taken);
        drop(pool);
    }

    fn close(&self) {
        let (running, abort) = {
            let mut state = self.state.lock();
            state.closed = true;
            (state.running.take(), state.abort.take())
        };
        if let Some(abort) = abort {
            // Also stops a query another thread waits for in `await` (it then gets its error).
            abort.abort();
        }
        if let Some(running) = running {
            // Cancellation is cooperative (DataFusion's operators yield at await points).
            let _ = runtime().block_on(running.handle);
            self.release_pool();
        }
    }
}

// ---- exports -----------------------------------------------------------------------------------

/// `static native long nativeOpen(long api, long manager, String poolPath, int partitions,
/// boolean answerSpillRequests, Object perCallConsumer)`
#[no_mangle]
pub extern "system" fn Java_org_nativemem_examples_DataFusionTask_nativeOpen<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    api: jlong,
    manager: jlong,
    pool_path: JString<'local>,
    partitions: jint,
    answer_spill_requests: jboolean,
    per_call_consumer: JObject<'local>,
) -> jlong {
    run_export(&mut env, 0, |env| {
        let pool_path = string_arg(env, &pool_path, "poolPath")?;
        let partitions = usize::try_from(partitions)
            .ok()
            .filter(|p| (1..=64).contains(p))
            .ok_or_else(|| {
                Error::InvalidArgument(format!("partitions must be in 1..=64, got {partitions}"))
            })?;
        // SAFETY: `api` is the address Java got from NativeMemoryManager.nativeApi(): the static
        // table of the loaded libnativemem_jni (from_address checks version and size first).
        let api = unsafe { Api::from_address(api) }?;
        // Fail early on a bad manager handle (the lease is not kept).
        drop(api.acquire(manager)?);
        let accounting = if per_call_consumer.is_null() {
            Accounting::Nativemem {
                answer_spill_requests: answer_spill_requests != 0,
            }
        } else {
            Accounting::PerCall {
                vm: env.get_java_vm()?,
                consumer: env.new_global_ref(&per_call_consumer)?,
            }
        };
        let task = Task {
            api,
            manager,
            pool_path,
            partitions,
            accounting,
            state: Mutex::new(State::default()),
        };
        Ok(TASKS.insert(Arc::new(task))?)
    })
}

/// `static native void nativeStart(long handle, int query, long rows)`
#[no_mangle]
pub extern "system" fn Java_org_nativemem_examples_DataFusionTask_nativeStart<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
    query: jint,
    rows: jlong,
) {
    run_export(&mut env, (), |_| {
        let query = Query::from_code(query).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "query must be 0 (ORDER BY) or 1 (GROUP BY), got {query}"
            ))
        })?;
        let rows = u64::try_from(rows)
            .ok()
            .filter(|r| *r >= 1)
            .ok_or_else(|| Error::InvalidArgument(format!("rows must be >= 1, got {rows}")))?;
        TASKS.get(handle)?.start(query, rows)
    })
}

/// `static native long[] nativeAwait(long handle)`
#[no_mangle]
pub extern "system" fn Java_org_nativemem_examples_DataFusionTask_nativeAwait<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
) -> jlongArray {
    run_export(&mut env, std::ptr::null_mut(), |env| {
        let stats = TASKS.get(handle)?.wait()?;
        long_array(env, &stats)
    })
}

/// `static native long[] nativeStats(long handle)`
#[no_mangle]
pub extern "system" fn Java_org_nativemem_examples_DataFusionTask_nativeStats<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
) -> jlongArray {
    run_export(&mut env, std::ptr::null_mut(), |env| {
        let stats = TASKS.get(handle)?.stats();
        long_array(env, &stats)
    })
}

/// `static native String nativeOperatorPeaks(long handle)`: `name<TAB>bytes` lines.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_examples_DataFusionTask_nativeOperatorPeaks<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
) -> jni::sys::jstring {
    run_export(&mut env, std::ptr::null_mut(), |env| {
        let text = TASKS.get(handle)?.operator_peaks();
        Ok(env.new_string(text)?.into_raw())
    })
}

/// `static native void nativeClose(long handle)`
#[no_mangle]
pub extern "system" fn Java_org_nativemem_examples_DataFusionTask_nativeClose<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
) {
    run_export(&mut env, (), |_| {
        let task = TASKS.remove(handle)?;
        task.close();
        Ok(())
    })
}

//! Test-only exports, bound by the package-private test class `org.nativemem.NativeTesting` (it
//! lives under `tests/java`, not in the published jar, so production code cannot call these).
//! They drive paths Java alone cannot reach: a panic inside an export, native spillers, native
//! allocations, and upcalls from threads the JVM did not start. The Spark e2e jobs bind the same
//! exports through their own copy of the class (`tests/spark/java/org/nativemem/NativeTesting.java`).
//!
//! Faults in each layer, and load:
//! - panics on purpose: in a native spiller (`registerPanickingSpiller`, reached from a Java or
//!   Spark spill and from a grow that spills), and on the listener's upcall path
//!   (`createPanickyManager`), besides the export body (`panic`, `panicInCall`);
//! - native threads churning memory in the background (`startNativeChurn`, `churnOps`,
//!   `churnRunning`, `joinNativeChurn`), for deadlock stress and for tasks that fail or are killed
//!   while their threads still run;
//! - a spiller owned by the registry alone, dropped with its registration
//!   (`registerAndDropSpiller`);
//! - resident memory (`allocateTouched`) and `mallocTrim`, to compare the process RSS before and
//!   after a soak; `setNativeLogLevel` for runs that fail tasks on purpose by the hundred.
//!
//! The test library also counts its own heap (`nativemem_testkit::CountingAllocator`, its global
//! allocator, installed in `lib.rs`): `nativeHeapCounts` gives the live blocks and bytes, so a
//! test proves that N create → use → close cycles leave the library's heap exactly where it was,
//! instead of estimating it from RSS. Only this library's allocations pass there (the JVM and
//! other native libraries have their own allocators).

use std::panic::AssertUnwindSafe;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jni::objects::{JClass, JObject, JString};
use jni::sys::{jboolean, jint, jlong, jlongArray, jstring, JNI_FALSE, JNI_TRUE};
use jni::JNIEnv;
use nativemem_core::{
    ListenerError, MemoryConfig, MemoryError, MemoryManager, Reservation, ReservationListener,
    Spiller,
};
use parking_lot::{Condvar, Mutex};

use crate::error::{ProviderError, Result};
use crate::guard::{non_negative, run_export, string_arg, to_jlong};
use crate::listener::JavaListener;
use crate::vm;
use nativemem_handles::{kind, HandleTable};
use nativemem_provider::registry::{
    self, create_manager, enter_manager, with_manager, DEFAULT_CLOSE_TIMEOUT,
};
use nativemem_provider::{panic_message, Result as ProviderResult};

// ---- the library's own heap, counted -------------------------------------------------------------

/// `static native long[] nativeHeapCounts()`: this library's heap as its global allocator counts
/// it: `{liveBlocks, liveBytes, allocations, allocatedBytes}` (the last two are totals since the
/// library was loaded; a reallocation counts as one allocation of its new size).
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_nativeHeapCounts<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
) -> jlongArray {
    run_export(&mut env, std::ptr::null_mut(), |env| {
        // Read before anything below allocates (the array is the JVM's, not this library's).
        let heap = nativemem_testkit::counts();
        let values = [
            heap.live_blocks,
            heap.live_bytes,
            to_jlong(heap.allocations),
            to_jlong(heap.allocated_bytes),
        ];
        let array = env.new_long_array(values.len() as i32)?;
        env.set_long_array_region(&array, 0, &values)?;
        Ok(array.into_raw())
    })
}

/// `static native void parkNativeThreads(int threads)`: starts `threads` native threads that all
/// wait on one lock-and-condition-variable until every one of them has arrived, then lets them
/// return, and joins them. For warm-ups before a heap baseline: `parking_lot` keeps a global hash
/// table of parked threads that grows (for good) when more threads than ever before have parked
/// at once; this sizes it for `threads`, so a later peak of fewer threads (task threads, native
/// churn threads) adds nothing to the heap.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_parkNativeThreads<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    threads: jint,
) {
    run_export(&mut env, (), |_| {
        let threads = usize::try_from(non_negative("threads", jlong::from(threads))?)
            .map_err(|_| ProviderError::InvalidArgument("threads too large".into()))?;
        let arrived = Arc::new((Mutex::new(0usize), Condvar::new()));
        let workers: Vec<_> = (0..threads)
            .map(|i| {
                let arrived = arrived.clone();
                std::thread::Builder::new()
                    .name(format!("nativemem-park-{i}"))
                    .spawn(move || {
                        let (count, all_here) = &*arrived;
                        let mut count = count.lock();
                        *count += 1;
                        if *count == threads {
                            all_here.notify_all();
                        }
                        while *count < threads {
                            all_here.wait(&mut count);
                        }
                    })
            })
            .collect::<std::io::Result<_>>()
            .map_err(|e| ProviderError::Other(format!("cannot start a thread: {e}")))?;
        for w in workers {
            w.join()
                .map_err(|p| ProviderError::Panic(panic_message(p.as_ref())))?;
        }
        Ok(())
    })
}

/// `static native void panic(String message)`: panics inside an export.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_panic<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    message: JString<'l>,
) {
    run_export(&mut env, (), |env| {
        let message = string_arg(env, &message, "message")?;
        // Deliberate test panic: `run_export` must turn it into a Java exception.
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
        Ok(with_manager(manager, |m| -> ProviderResult<()> {
            // Deliberate test panic: unwinding must still release the in-flight call.
            panic!("operator bug while holding manager '{}'", m.name());
        })?)
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
    run_export(&mut env, 0, |_| Ok(to_jlong(registry::in_flight(manager)?)))
}

/// A native consumer holding a reservation; a spill frees up to the target, optionally slowly. Its
/// first `panics` spill calls panic with `message` instead (an operator bug on the spill path).
struct TestSpiller {
    reservation: Reservation,
    delay: Duration,
    calls: AtomicU64,
    panics: AtomicU64,
    message: String,
}

impl Spiller for TestSpiller {
    fn spillable_bytes(&self) -> u64 {
        self.reservation.size()
    }

    fn spill(&self, target: u64) -> Result<u64, MemoryError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let panics = self
            .panics
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if panics.is_ok() {
            // Deliberate test panic: the core and the export must contain it.
            panic!(
                "{} (spill call {call}, target {target} bytes)",
                self.message
            );
        }
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let freed = target.min(self.reservation.size());
        self.reservation.shrink(freed)?;
        Ok(freed)
    }
}

/// Registers a [`TestSpiller`] holding `bytes` in `pool` of `manager`, kept until it closes.
fn register_test_spiller(
    manager: jlong,
    pool: &str,
    bytes: u64,
    delay: Duration,
    panics: u64,
    message: String,
) -> Result<()> {
    let call = enter_manager(manager)?;
    let pool = call.manager().pool(pool)?;
    let reservation = pool.reservation("test-spiller");
    reservation.try_grow(bytes)?;
    let spiller = Arc::new(TestSpiller {
        reservation,
        delay,
        calls: AtomicU64::new(0),
        panics: AtomicU64::new(panics),
        message,
    });
    let registration = pool.register_spiller("test-spiller", spiller.clone());
    call.attach(Box::new((registration, spiller)));
    Ok(())
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
        register_test_spiller(manager, &pool, bytes, delay, 0, String::new())
    })
}

/// `static native void registerPanickingSpiller(long manager, String pool, long bytes, int panics,
/// String message)`: like `registerSpiller`, but the first `panics` spill calls panic with
/// `message` (whoever asked for the spill: Java, Spark through the listener, or a native grow).
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_registerPanickingSpiller<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    manager: jlong,
    pool: JString<'l>,
    bytes: jlong,
    panics: jint,
    message: JString<'l>,
) {
    run_export(&mut env, (), |env| {
        let pool = string_arg(env, &pool, "pool")?;
        let message = string_arg(env, &message, "message")?;
        let bytes = non_negative("bytes", bytes)?;
        let panics = non_negative("panics", jlong::from(panics))?;
        register_test_spiller(manager, &pool, bytes, Duration::ZERO, panics, message)
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
            .map_err(|_| ProviderError::InvalidArgument("bytes too large".into()))?;
        Ok(with_manager(manager, |m| {
            let ptr = m.pool(&pool)?.allocate(size, 64)?;
            Ok(ptr.as_ptr() as usize as jlong)
        })?)
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
            .ok_or_else(|| ProviderError::InvalidArgument("address must not be 0".into()))?;
        // The core checks the address lies in the task's heap before reading its header, so a
        // wrong address is an error, never a free of foreign memory.
        Ok(with_manager(manager, |m| {
            Ok(to_jlong(m.root().free(ptr)? as u64))
        })?)
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
                            return Err(ProviderError::Other(
                                "a new native thread is already attached".into(),
                            )
                            .into());
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
            .map_err(|e| ProviderError::Other(format!("cannot start a thread: {e}")))?;
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
                        .get_or_insert(ProviderError::Panic(panic_message(p.as_ref())).into());
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(attached),
        }
    })
}

/// `static native void registerAndDropSpiller(long manager, String pool, long bytes)`: the common
/// way to own a spiller in Rust: the registry holds the only reference to a spiller that owns a
/// reservation of `bytes`, and the operator keeps the registration. Dropping the registration (here
/// at once, as an operator that finished) drops the spiller, whose reservation releases its bytes.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_registerAndDropSpiller<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    manager: jlong,
    pool: JString<'l>,
    bytes: jlong,
) {
    run_export(&mut env, (), |env| {
        let pool = string_arg(env, &pool, "pool")?;
        let bytes = non_negative("bytes", bytes)?;
        Ok(with_manager(manager, |m| {
            let pool = m.pool(&pool)?;
            let reservation = pool.reservation("owned-spiller");
            reservation.try_grow(bytes)?;
            let registration = pool.register_spiller(
                "owned-spiller",
                Arc::new(TestSpiller {
                    reservation,
                    delay: Duration::ZERO,
                    calls: AtomicU64::new(0),
                    panics: AtomicU64::new(0),
                    message: String::new(),
                }),
            );
            drop(registration);
            Ok(())
        })?)
    })
}

// ---- a panic on the listener's upcall path ----------------------------------------------------

/// A Rust listener in front of the Java one, on the upcall path (where a binding's own code runs
/// before and after the JVM call): its `panic_at_reserve`-th `reserve` call and its
/// `panic_at_unreserve`-th `unreserve` call (1-based; 0 = never) panic before reaching Java, so
/// the Java listener never sees them and nothing is granted or given back by them.
struct PanickyListener {
    java: JavaListener,
    message: String,
    panic_at_reserve: u64,
    panic_at_unreserve: u64,
    reserve_calls: AtomicU64,
    unreserve_calls: AtomicU64,
}

impl ReservationListener for PanickyListener {
    fn reserve(&self, bytes: u64) -> Result<u64, ListenerError> {
        let call = self.reserve_calls.fetch_add(1, Ordering::SeqCst) + 1;
        if call == self.panic_at_reserve {
            // Deliberate test panic on the upcall path.
            panic!("{} (reserve call {call}, {bytes} bytes)", self.message);
        }
        self.java.reserve(bytes)
    }

    fn unreserve(&self, bytes: u64) -> Result<(), ListenerError> {
        let call = self.unreserve_calls.fetch_add(1, Ordering::SeqCst) + 1;
        if call == self.panic_at_unreserve {
            // Deliberate test panic on the upcall path.
            panic!("{} (unreserve call {call}, {bytes} bytes)", self.message);
        }
        self.java.unreserve(bytes)
    }
}

/// `static native long createPanickyManager(String name, ReservationListener listener,
/// long blockBytes, int panicAtReserveCall, int panicAtUnreserveCall, String message)`: a manager
/// (no task limit, the default close timeout) whose listener is `listener` behind a
/// [`PanickyListener`]. Returns the manager handle, to wrap in a `NativeMemoryManager`.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_createPanickyManager<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    name: JString<'l>,
    listener: JObject<'l>,
    block_bytes: jlong,
    panic_at_reserve: jint,
    panic_at_unreserve: jint,
    message: JString<'l>,
) -> jlong {
    run_export(&mut env, 0, |env| {
        let name = string_arg(env, &name, "name")?;
        let message = string_arg(env, &message, "message")?;
        let java = JavaListener::new(env, &listener)?;
        let block = non_negative("blockBytes", block_bytes)?;
        let listener = PanickyListener {
            java,
            message,
            panic_at_reserve: non_negative("panicAtReserveCall", jlong::from(panic_at_reserve))?,
            panic_at_unreserve: non_negative(
                "panicAtUnreserveCall",
                jlong::from(panic_at_unreserve),
            )?,
            reserve_calls: AtomicU64::new(0),
            unreserve_calls: AtomicU64::new(0),
        };
        // Exact accounting (quantum 0, opt-in): the tests of this hook pin the cushion and what
        // goes back to the listener to the byte.
        let config = MemoryConfig::default()
            .with_reservation_block(block)
            .with_reservation_quantum(0);
        Ok(create_manager(
            name,
            config,
            Arc::new(listener),
            DEFAULT_CLOSE_TIMEOUT,
        )?)
    })
}

// ---- memory the process really uses --------------------------------------------------------------

/// Bytes between two writes when touching an allocation: every page is written once.
const PAGE_BYTES: usize = 4096;

/// Allocates `size` bytes in `pool` and writes every page, so the memory is resident (counts in
/// the process RSS) until freed.
fn allocate_touched(
    manager: &MemoryManager,
    pool: &str,
    size: usize,
) -> ProviderResult<NonNull<u8>> {
    let ptr = manager.pool(pool)?.allocate(size, 64)?;
    let mut offset = 0;
    while offset < size {
        // SAFETY: `ptr` is a fresh allocation of `size` bytes that nothing else knows yet, and
        // `offset < size`, so the write is in bounds of memory this code owns.
        unsafe { ptr.as_ptr().add(offset).write(0xA5) };
        offset += PAGE_BYTES;
    }
    Ok(ptr)
}

/// `static native long allocateTouched(long manager, String pool, long bytes)`: like `allocate`,
/// but every page of the block is written, so it is resident memory; returns its address (only to
/// pass back to `free`).
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_allocateTouched<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    manager: jlong,
    pool: JString<'l>,
    bytes: jlong,
) -> jlong {
    run_export(&mut env, 0, |env| {
        let pool = string_arg(env, &pool, "pool")?;
        let size = usize::try_from(non_negative("bytes", bytes)?)
            .map_err(|_| ProviderError::InvalidArgument("bytes too large".into()))?;
        Ok(with_manager(manager, |m| {
            Ok(allocate_touched(m, &pool, size)?.as_ptr() as usize as jlong)
        })?)
    })
}

/// `static native boolean mallocTrim()`: asks the C allocator to return free memory to the
/// operating system (glibc `malloc_trim(0)`), so an RSS reading after it shows what is really in
/// use. Returns whether memory was released; false where there is no `malloc_trim`.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_mallocTrim<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
) -> jboolean {
    run_export(&mut env, JNI_FALSE, |_| Ok(malloc_trim()))
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn malloc_trim() -> jboolean {
    extern "C" {
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: glibc's `int malloc_trim(size_t pad)` has this signature, takes no pointers and
    // may be called from any thread at any time.
    let released = unsafe { malloc_trim(0) };
    if released != 0 {
        JNI_TRUE
    } else {
        JNI_FALSE
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn malloc_trim() -> jboolean {
    JNI_FALSE
}

// ---- native threads churning memory in the background ------------------------------------------

/// Live churns (see `startNativeChurn`). Tag 120: far from the tags of the library's own tables.
static CHURNS: HandleTable<Churn> = HandleTable::new(kind::TESTING, "native churn");

/// Native threads growing, shrinking, allocating and spilling on one manager until a deadline,
/// the manager's close, or an unexpected error. Shared by the threads, the table and the guard
/// attached to the manager.
struct Churn {
    manager: String,
    ops: AtomicU64,
    ooms: AtomicU64,
    stopped_by_close: AtomicU64,
    running: Mutex<usize>,
    finished: Condvar,
    first_error: Mutex<Option<String>>,
    stop: AtomicBool,
}

impl Churn {
    fn fail(&self, what: String) {
        self.first_error.lock().get_or_insert(what);
    }
}

/// Attached to the manager: when it closes, the threads stop at their next step and the churn
/// handle goes stale (the threads keep their own reference until they return).
struct ChurnGuard {
    churn: Arc<Churn>,
    handle: jlong,
}

impl Drop for ChurnGuard {
    fn drop(&mut self) {
        self.churn.stop.store(true, Ordering::SeqCst);
        // Already removed if Java joined the churn.
        let _ = CHURNS.remove(self.handle);
    }
}

/// A churn thread's reservation as a spiller: Spark (through the listener) or another thread may
/// shrink it while its owner grows it.
struct ChurnSpiller {
    reservation: Arc<Reservation>,
}

impl Spiller for ChurnSpiller {
    fn spillable_bytes(&self) -> u64 {
        self.reservation.size()
    }

    fn spill(&self, target: u64) -> Result<u64, MemoryError> {
        shrink_up_to(&self.reservation, target)
    }
}

/// Shrinks `reservation` by up to `bytes` (less if it holds less, also when another thread
/// shrinks it meanwhile); returns the bytes released.
fn shrink_up_to(reservation: &Reservation, bytes: u64) -> Result<u64, MemoryError> {
    loop {
        let n = bytes.min(reservation.size());
        if n == 0 {
            return Ok(0);
        }
        match reservation.shrink(n) {
            Ok(()) => return Ok(n),
            // Shrunk by someone else between the read and the shrink: read again.
            Err(MemoryError::InvalidArgument(_)) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// splitmix64: a small, seedable generator (no dependency needed for test randomness).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `1..=max` (`max >= 1`).
    fn up_to(&mut self, max: u64) -> u64 {
        1 + self.next() % max.max(1)
    }
}

/// What ended a churn thread.
enum Stop {
    Deadline,
    Closed,
}

/// Parameters of one churn thread.
struct ChurnPlan {
    manager: jlong,
    pool: String,
    deadline: Instant,
    max_bytes: u64,
    spillable: bool,
    seed: u64,
}

/// One churn thread: each step is one call on the manager (entered and left, as a native operator
/// does per batch), so a close waits at most for one step and then refuses the next one.
///
/// The thread's reservation (and its spiller registration) belong to the manager: they are
/// attached to it, and the thread keeps only a weak reference that it upgrades inside each call.
/// So whatever it holds is released either by the thread inside a call or by the manager's close
/// (attachments are dropped there with no call in flight), never by a thread racing with the close.
fn churn_thread(plan: &ChurnPlan, churn: &Churn) -> ProviderResult<Stop> {
    let mut rng = Rng(plan.seed);
    let weak = {
        let call = match enter_manager(plan.manager) {
            Ok(call) => call,
            Err(ProviderError::Handle(_) | ProviderError::Closed(_)) => return Ok(Stop::Closed),
            Err(e) => return Err(e),
        };
        let pool = call.manager().pool(&plan.pool)?;
        let reservation = Arc::new(pool.reservation("native-churn"));
        let registration = plan.spillable.then(|| {
            let spiller = ChurnSpiller {
                reservation: reservation.clone(),
            };
            pool.register_spiller("native-churn", Arc::new(spiller))
        });
        let weak = Arc::downgrade(&reservation);
        // Dropped in this order at close: the registration, then the last reservation reference.
        call.attach(Box::new((registration, reservation)));
        weak
    };
    let stop = loop {
        if Instant::now() >= plan.deadline {
            break Stop::Deadline;
        }
        if churn.stop.load(Ordering::SeqCst) {
            break Stop::Closed;
        }
        let call = match enter_manager(plan.manager) {
            Ok(call) => call,
            Err(ProviderError::Handle(_) | ProviderError::Closed(_)) => break Stop::Closed,
            Err(e) => return Err(e),
        };
        let Some(reservation) = weak.upgrade() else {
            break Stop::Closed;
        };
        let step: ProviderResult<()> = match rng.next() % 16 {
            0..=8 => {
                let n = rng.up_to(plan.max_bytes / 8);
                if reservation.size() + n > plan.max_bytes {
                    shrink_up_to(&reservation, n)
                        .map(drop)
                        .map_err(ProviderError::from)
                } else {
                    reservation.try_grow(n).map_err(ProviderError::from)
                }
            }
            9..=13 => shrink_up_to(&reservation, rng.up_to(reservation.size()))
                .map(drop)
                .map_err(ProviderError::from),
            14 => {
                let size = rng.up_to(1 << 20) as usize;
                allocate_touched(call.manager(), &plan.pool, size)
                    .and_then(|ptr| Ok(call.manager().root().free(ptr).map(drop)?))
            }
            _ => call
                .manager()
                .spill(rng.up_to(plan.max_bytes))
                .map(drop)
                .map_err(ProviderError::from),
        };
        let outcome = match step {
            Ok(()) => Ok(None),
            Err(ProviderError::Memory(e)) if e.is_out_of_memory() => {
                churn.ooms.fetch_add(1, Ordering::SeqCst);
                shrink_up_to(&reservation, reservation.size() / 2)
                    .map(|_| None)
                    .map_err(ProviderError::from)
            }
            Err(ProviderError::Memory(MemoryError::Closed { .. })) => Ok(Some(Stop::Closed)),
            Err(e) => Err(e),
        };
        drop(reservation);
        drop(call);
        churn.ops.fetch_add(1, Ordering::SeqCst);
        if let Some(stop) = outcome? {
            break stop;
        }
    };
    if let Ok(_call) = enter_manager(plan.manager) {
        if let Some(reservation) = weak.upgrade() {
            reservation.free();
        }
    }
    Ok(stop)
}

/// `static native long startNativeChurn(long manager, String pool, int threads,
/// long durationMillis, long maxBytesPerThread, boolean spillable, long seed)`: starts `threads`
/// native threads that, for `durationMillis` or until the manager closes, grow and shrink a
/// reservation of up to `maxBytesPerThread` bytes in `pool` (random steps, seeded), allocate,
/// touch and free blocks of up to 1 MiB, and ask the manager to spill. With `spillable` each
/// thread's reservation is also a spiller, so spills (from Spark, from Java, from the other
/// threads) shrink it while its owner grows it. Out-of-memory is counted, not fatal. Returns a
/// churn handle for `churnOps` / `joinNativeChurn`; it goes stale when the manager closes.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_startNativeChurn<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    manager: jlong,
    pool: JString<'l>,
    threads: jint,
    duration_millis: jlong,
    max_bytes_per_thread: jlong,
    spillable: jboolean,
    seed: jlong,
) -> jlong {
    run_export(&mut env, 0, |env| {
        let pool = string_arg(env, &pool, "pool")?;
        let threads = non_negative("threads", jlong::from(threads))?;
        let duration = Duration::from_millis(non_negative("durationMillis", duration_millis)?);
        let max_bytes = non_negative("maxBytesPerThread", max_bytes_per_thread)?;
        let call = enter_manager(manager)?;
        let churn = Arc::new(Churn {
            manager: call.manager().name().to_string(),
            ops: AtomicU64::new(0),
            ooms: AtomicU64::new(0),
            stopped_by_close: AtomicU64::new(0),
            running: Mutex::new(0),
            finished: Condvar::new(),
            first_error: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let handle = CHURNS.insert(churn.clone())?;
        call.attach(Box::new(ChurnGuard {
            churn: churn.clone(),
            handle,
        }));
        let deadline = Instant::now() + duration;
        for i in 0..threads {
            let plan = ChurnPlan {
                manager,
                pool: pool.clone(),
                deadline,
                max_bytes,
                spillable: spillable == JNI_TRUE,
                seed: (seed as u64) ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            };
            let worker = churn.clone();
            *churn.running.lock() += 1;
            let spawned = std::thread::Builder::new()
                .name(format!("nativemem-churn-{i}"))
                .spawn(move || {
                    let outcome =
                        std::panic::catch_unwind(AssertUnwindSafe(|| churn_thread(&plan, &worker)));
                    match outcome {
                        Ok(Ok(Stop::Deadline)) => {}
                        Ok(Ok(Stop::Closed)) => {
                            worker.stopped_by_close.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Err(e)) => worker.fail(format!("native churn thread {i}: {e}")),
                        Err(p) => worker.fail(format!(
                            "native churn thread {i} panicked: {}",
                            panic_message(p.as_ref())
                        )),
                    }
                    let mut running = worker.running.lock();
                    *running -= 1;
                    worker.finished.notify_all();
                });
            if let Err(e) = spawned {
                *churn.running.lock() -= 1;
                churn.stop.store(true, Ordering::SeqCst);
                return Err(
                    ProviderError::Other(format!("cannot start a churn thread: {e}")).into(),
                );
            }
        }
        Ok(handle)
    })
}

/// `static native long churnOps(long churn)`: steps the churn's threads have completed so far
/// (a progress counter: it stops moving only when every thread is stuck or done).
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_churnOps<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    churn: jlong,
) -> jlong {
    run_export(&mut env, 0, |_| {
        Ok(to_jlong(CHURNS.get(churn)?.ops.load(Ordering::SeqCst)))
    })
}

/// `static native int churnRunning(long churn)`: the churn's threads that have not returned yet.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_churnRunning<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    churn: jlong,
) -> jint {
    run_export(&mut env, 0, |_| {
        let running = *CHURNS.get(churn)?.running.lock();
        Ok(jint::try_from(running).unwrap_or(jint::MAX))
    })
}

/// `static native long[] joinNativeChurn(long churn, long timeoutMillis)`: waits for the churn's
/// threads to return; returns `{steps, outOfMemory, threadsStoppedByClose}` and forgets the
/// churn. Throws the first unexpected error of a thread (`NativeMemoryException`), or if the
/// threads are still running after `timeoutMillis`.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_joinNativeChurn<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    churn: jlong,
    timeout_millis: jlong,
) -> jlongArray {
    run_export(&mut env, std::ptr::null_mut(), |env| {
        let timeout = Duration::from_millis(non_negative("timeoutMillis", timeout_millis)?);
        let c = CHURNS.get(churn)?;
        let deadline = Instant::now() + timeout;
        {
            let mut running = c.running.lock();
            while *running > 0 {
                if c.finished.wait_until(&mut running, deadline).timed_out() && *running > 0 {
                    return Err(ProviderError::Other(format!(
                        "{} native churn thread(s) of manager '{}' still running after {} ms",
                        *running,
                        c.manager,
                        timeout.as_millis()
                    ))
                    .into());
                }
            }
        }
        let _ = CHURNS.remove(churn);
        if let Some(e) = c.first_error.lock().take() {
            return Err(ProviderError::Other(e).into());
        }
        let values = [
            c.ops.load(Ordering::SeqCst),
            c.ooms.load(Ordering::SeqCst),
            c.stopped_by_close.load(Ordering::SeqCst),
        ]
        .map(to_jlong);
        let array = env.new_long_array(values.len() as i32)?;
        env.set_long_array_region(&array, 0, &values)?;
        Ok(array.into_raw())
    })
}

// ---- logging ------------------------------------------------------------------------------------

/// `static native String setNativeLogLevel(String level)`: sets the most verbose level this
/// library logs at (`off`, `error`, `warn`, `info`, `debug`, `trace`) for the whole process;
/// returns the previous one. For runs that fail tasks on purpose by the hundred (whose leak
/// reports at close are expected): `NATIVEMEM_LOG` still filters below it.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_NativeTesting_setNativeLogLevel<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    level: JString<'l>,
) -> jstring {
    run_export(&mut env, std::ptr::null_mut(), |env| {
        let level = string_arg(env, &level, "level")?;
        let filter = level
            .parse::<log::LevelFilter>()
            .map_err(|_| ProviderError::InvalidArgument(format!("unknown log level {level:?}")))?;
        let previous = log::max_level();
        log::set_max_level(filter);
        Ok(env
            .new_string(previous.as_str().to_ascii_lowercase())?
            .into_raw())
    })
}

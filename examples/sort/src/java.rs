//! `Java_org_nativemem_examples_NativeSorter_*`: the JNI face of the spilling external sort
//! ([`ExternalSorter`]), for the Java class `org.nativemem.examples.NativeSorter`.
//!
//! This library is an engine in its own `.so`: it reaches the task's manager (in
//! `libnativemem_jni.so`) only through the engine ABI table, whose address and the manager's
//! handle Java passes as two `long`s (`NativeMemoryManager.nativeApi()`, `manager.handle()`).
//!
//! ```text
//!  NativeSorter (Java)              this module                            sort / client
//!  ───────────────────              ───────────                            ─────────────
//!  new(manager, name, dir, opts) ─▶ nativeCreate(api, manager, ...):
//!                                     Api::from_address, acquire(manager) ─▶ lease for the call
//!                                     pool (optional limit) ──────────────▶ ExternalSorter::new
//!                                     SORTERS.insert ─▶ sorter handle (kind tag 64)
//!                                     lease.attach(CloseWithManager(handle))
//!  insert(long[], off, len) ──────▶ nativeInsert: lease for the call
//!                                     GetLongArrayRegion into a reusable
//!                                     64 Ki-key scratch, piece by piece ─▶ ExternalSorter::insert
//!  sorted() / nextBatch(long[]) ──▶ nativeFinish / nativeNextBatch ─────▶ ExternalSorter::sorted,
//!                                     SetLongArrayRegion from the batch     SortedBatches
//!  close() ───────────────────────▶ nativeClose: SORTERS.remove, drop ─▶ chunks freed, files gone
//!  manager.close() ───────────────▶ (libnativemem_jni) attached state dropped first: the same,
//!                                     before the leak check, so nothing is reported as leaked
//! ```
//!
//! # Lifetime and the manager
//! A sorter belongs to one manager. Every call on it holds a lease of that manager for the span
//! of the call, never across calls (a lease held across calls would block the manager's close),
//! so closing the manager waits for a running call and never frees memory under it. At creation
//! the sorter ties itself to the manager with [`Lease::attach`]: when the manager closes, the
//! attachment removes the sorter's handle (later calls on the Java object get
//! `IllegalStateException`) and drops the sorter before the manager's leak check, so its chunks
//! are freed and its spill files deleted, and none of it counts as a leak. The attachment holds
//! only the handle; closing the sorter from Java detaches it.
//!
//! # Calls and the lock rule
//! One call at a time works on a sorter: a call takes the sorter's state out of the entry (under
//! the entry's mutex, held only for that), works with **no lock held** (inserting may call the
//! JVM listener, which may make Spark spill this very sorter, on this thread or another), then
//! puts it back. A second call arriving meanwhile (another Java thread) fails with
//! `IllegalStateException` instead of waiting: waiting could deadlock with a JVM thread that
//! holds Spark's `TaskMemoryManager` monitor while it waits for the first call's upcall.
//! [`stats`] never fails that way: during another call it answers with the statistics as of the
//! last call that finished (it reads only the sorter's own counters, so it takes no lease). A
//! close during a call marks the sorter closed; the running call drops the sorter when it
//! returns.
//!
//! # Errors and exceptions
//! Every export runs under the JNI kit's guard (`nativemem_client::java::run_export`): no panic
//! crosses JNI, and each error becomes one Java exception by the kit's table; the sort's own
//! errors map onto it in [`sort_error`]:
//!
//! | error                                               | Java exception                      |
//! |-----------------------------------------------------|-------------------------------------|
//! | `NM_ERR_OUT_OF_MEMORY` (message: the usage report)  | `org.nativemem.NativeOutOfMemoryException` |
//! | `NM_ERR_INVALID_ARGUMENT`, bad options or arguments | `IllegalArgumentException`          |
//! | `NM_ERR_STALE_HANDLE` / `_INVALID_HANDLE` / `_CLOSED` | `IllegalStateException`           |
//! | a bad sorter handle; a closed, busy or unusable one | `IllegalStateException`             |
//! | a `null` argument                                   | `NullPointerException`              |
//! | anything else (listener or spill failure, I/O, corrupt spill file, panic) | `org.nativemem.NativeMemoryException` |
//!
//! A Java exception already pending (a JNI call failed because of it) is kept. A listener's
//! Java exception reaches this library only as text (the ABI carries codes and messages): it is
//! in the message of the `NativeMemoryException`, not its cause.
//!
//! Not charged to the pool: the insert scratch (at most 512 KiB per sorter) and the output batch
//! being handed to Java (at most `batch_keys` keys); like the sorter's own spill write buffer, they
//! are small fixed buffers.

use std::mem;
use std::path::PathBuf;
use std::sync::Arc;

use jni::objects::{JClass, JLongArray, JString};
use jni::sys::{jint, jlong, jlongArray};
use jni::JNIEnv;
use nativemem_client::handles::{kind, HandleTable};
use nativemem_client::java::{
    non_negative, optional_size, panic_message, run_export, string_arg, to_jlong,
    JavaError as Error, Result,
};
use nativemem_client::{Api, Attachment, Lease, TaskPool};
use parking_lot::Mutex;

use crate::error::SortError;
use crate::sort::{ExternalSorter, SortedBatches, SorterOptions, SorterStats};

/// Live sorters: this library's only table, with the first tag of the range reserved for engines.
static SORTERS: HandleTable<SorterEntry> = HandleTable::for_engine(kind::ENGINE_FIRST, "sorter");

/// Keys copied from a Java array per piece of an insert: 64 Ki keys, a 512 KiB scratch.
const INSERT_PIECE_KEYS: usize = 64 << 10;

/// Number of values in the `long[]` of `nativeStats`, in the order of Java's `SorterStats`.
const STATS_LEN: usize = 8;

// ---- errors ------------------------------------------------------------------------------------

/// The sort's errors as the JNI kit's (one Java exception each, see the module table): memory
/// errors keep their code, bad options are invalid arguments, an unusable sorter is an illegal
/// state, I/O and corrupt spill files are plain native failures.
fn sort_error(err: SortError) -> Error {
    match err {
        SortError::Memory(e) => Error::Memory(e),
        SortError::InvalidArgument(msg) => Error::InvalidArgument(msg),
        e @ SortError::Unusable { .. } => Error::IllegalState(e.to_string()),
        other => Error::Other(other.to_string()),
    }
}

// ---- the sorter entries ----------------------------------------------------------------------

/// A live sorter as this library holds it.
struct SorterEntry {
    name: String,
    /// The table and the manager's handle: each call leases the manager for its span.
    api: Api,
    manager: jlong,
    state: Mutex<State>,
    /// Statistics as of the end of the last call, for `stats` during a call and after a panic.
    last_stats: Mutex<SorterStats>,
    /// The tie to the manager's close; detached when Java closes the sorter first.
    attachment: Mutex<Option<Attachment<CloseWithManager>>>,
}

impl std::fmt::Debug for SorterEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SorterEntry")
            .field("name", &self.name)
            .field("manager", &self.manager)
            .finish()
    }
}

/// What a sorter entry holds between calls.
enum State {
    /// Ready for the next call.
    Idle(Box<Active>),
    /// A call has taken the sorter out and works on it.
    Busy,
    /// A call panicked; the sorter was dropped. The text says what happened.
    Broken(String),
    /// Closed (by Java or by its manager's close).
    Closed,
}

/// The sorter and its buffers, owned by one call at a time.
struct Active {
    phase: Phase,
    /// Input: the insert scratch. Output: the current batch, `buffer[pos..]` not yet handed out.
    buffer: Vec<i64>,
    pos: usize,
}

enum Phase {
    /// Taking keys.
    Input(ExternalSorter),
    /// The input is finished; the merge hands out batches.
    Output(SortedBatches),
    /// Between the two, only inside a call (the sorter is moved out of `Input`).
    Finishing,
}

impl Active {
    fn stats(&self) -> SorterStats {
        match &self.phase {
            Phase::Input(sorter) => sorter.stats(),
            Phase::Output(batches) => {
                let mut s = batches.stats();
                // Keys still in our batch buffer have not reached Java yet.
                s.rows_output = s
                    .rows_output
                    .saturating_sub((self.buffer.len() - self.pos) as u64);
                s
            }
            Phase::Finishing => SorterStats::default(),
        }
    }

    /// Ends the input (if not ended yet) and loads the first batch, so an error preparing the
    /// merge (out of memory for the read buffers) surfaces here.
    fn finish_input(&mut self, name: &str) -> Result<()> {
        if !matches!(self.phase, Phase::Input(_)) {
            return Ok(());
        }
        let Phase::Input(sorter) = mem::replace(&mut self.phase, Phase::Finishing) else {
            return Err(Error::Other(format!("sorter '{name}' lost its input")));
        };
        self.phase = Phase::Output(sorter.sorted());
        self.buffer = Vec::new();
        self.pos = 0;
        self.refill()?;
        Ok(())
    }

    /// Loads the next batch into the buffer if it is used up; false once the output ended.
    fn refill(&mut self) -> Result<bool> {
        if self.pos < self.buffer.len() {
            return Ok(true);
        }
        self.pos = 0;
        match &mut self.phase {
            Phase::Output(batches) => batches
                .next_batch_into(&mut self.buffer)
                .map_err(sort_error),
            _ => Ok(false),
        }
    }
}

impl SorterEntry {
    fn closed_error(&self) -> Error {
        Error::IllegalState(format!("sorter '{}' is closed", self.name))
    }

    /// Leases the sorter's manager for the span of a call; a closing or closed manager means a
    /// closed sorter.
    fn lease(&self) -> Result<Lease> {
        self.api
            .acquire(self.manager)
            .map_err(|_| self.closed_error())
    }

    /// Runs `f` on the sorter under a lease of its manager (see the module docs); the sorter is
    /// out of the entry while `f` runs, and no lock is held.
    fn with_active<R>(&self, f: impl FnOnce(&mut Active) -> Result<R>) -> Result<R> {
        let lease = self.lease()?;
        let taken = {
            let mut st = self.state.lock();
            match mem::replace(&mut *st, State::Busy) {
                State::Idle(active) => active,
                other => {
                    let err = match &other {
                        State::Busy => Error::IllegalState(format!(
                            "sorter '{}' is in use by another call (a sorter takes one call at a time)",
                            self.name
                        )),
                        State::Broken(why) => {
                            Error::IllegalState(format!("sorter '{}' is unusable: {why}", self.name))
                        }
                        _ => self.closed_error(),
                    };
                    *st = other;
                    return Err(err);
                }
            }
        };
        let mut guard = Taken {
            entry: self,
            active: Some(taken),
        };
        let result = match guard.active.as_deref_mut() {
            Some(active) => f(active),
            None => Err(Error::Other("sorter state missing".into())),
        };
        // The sorter goes back (or is dropped, if closed meanwhile) while the lease still pins
        // the manager; releasing it may then run a close that waited for it.
        drop(guard);
        drop(lease);
        result
    }

    /// Statistics now, or as of the last finished call while another call runs.
    fn stats(&self) -> Result<SorterStats> {
        let st = self.state.lock();
        match &*st {
            State::Idle(active) => Ok(active.stats()),
            State::Busy | State::Broken(_) => Ok(*self.last_stats.lock()),
            State::Closed => Err(self.closed_error()),
        }
    }

    /// Marks the sorter closed and drops it (no lock held while dropping: freeing chunks may call
    /// the listener). A call running now drops it when it returns.
    fn shutdown(&self) {
        let taken = mem::replace(&mut *self.state.lock(), State::Closed);
        drop(taken);
    }
}

/// The sorter taken out by a call; puts it back when dropped (or drops it if the sorter was
/// closed meanwhile, or the call panicked).
struct Taken<'a> {
    entry: &'a SorterEntry,
    active: Option<Box<Active>>,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        let Some(active) = self.active.take() else {
            return;
        };
        *self.entry.last_stats.lock() = active.stats();
        let mut st = self.entry.state.lock();
        let leftover = match &*st {
            State::Busy if std::thread::panicking() => {
                *st = State::Broken("a native panic interrupted a call on it".into());
                Some(active)
            }
            State::Busy => {
                *st = State::Idle(active);
                None
            }
            // Closed meanwhile: the sorter is ours to drop.
            _ => Some(active),
        };
        drop(st);
        drop(leftover);
    }
}

/// Attached to the manager: dropped by its close (on the closing thread, before the leak check),
/// it closes the sorter if Java did not.
struct CloseWithManager(jlong);

impl Drop for CloseWithManager {
    fn drop(&mut self) {
        if let Ok(entry) = SORTERS.remove(self.0) {
            log::debug!(
                "sorter '{}' closed with its manager {:#x}",
                entry.name,
                entry.manager
            );
            // The attachment being dropped is this one: forget its name (dropping an
            // `Attachment` does not detach).
            let _ = entry.attachment.lock().take();
            entry.shutdown();
        }
    }
}

// ---- operations (JNI-free, tested below) -------------------------------------------------------

/// Options of [`create`], as Java passes them (`-1` for "none" where allowed).
#[derive(Clone, Debug)]
struct CreateArgs {
    /// Sorter name in reports, errors and spill file names.
    name: String,
    /// Directory of the spill files (created if missing).
    spill_dir: PathBuf,
    /// Pool the sorter's memory is charged to, below the root (e.g. `sort`).
    pool_path: String,
    /// Limit of that pool in bytes, set when it is created by this call; `None`: no limit.
    pool_limit: Option<u64>,
    /// Sorter options.
    options: SorterOptions,
}

/// Creates a sorter on the manager `manager` (reached through `api`) and returns its handle.
fn create(api: Api, manager: jlong, args: CreateArgs) -> Result<jlong> {
    let path = args.pool_path.as_str();
    if args.pool_limit.is_some() && (path.is_empty() || path == "root") {
        return Err(Error::InvalidArgument(format!(
            "a pool limit needs a pool below the root, got pool path {path:?} (the root's limit is the task limit)"
        )));
    }
    let lease = api.acquire(manager)?;
    let pool = TaskPool::new(api, manager, lease.pool(path, args.pool_limit)?);
    let sorter = ExternalSorter::new(&pool, args.name.clone(), args.spill_dir, args.options)
        .map_err(sort_error)?;
    let stats = sorter.stats();
    let entry = Arc::new(SorterEntry {
        name: args.name,
        api,
        manager,
        state: Mutex::new(State::Idle(Box::new(Active {
            phase: Phase::Input(sorter),
            buffer: Vec::new(),
            pos: 0,
        }))),
        last_stats: Mutex::new(stats),
        attachment: Mutex::new(None),
    });
    let handle = SORTERS.insert(entry.clone())?;
    // Under the lease: the manager's close cannot run between the insert and the attach. If the
    // attach fails, the value is dropped, which removes and closes the sorter again.
    let attachment = lease.attach(CloseWithManager(handle))?;
    *entry.attachment.lock() = Some(attachment);
    drop(lease);
    Ok(handle)
}

/// Inserts `len` keys; `fill(piece, from)` copies keys `from..from + piece.len()` of the input
/// into `piece`. Keys go in pieces of at most [`INSERT_PIECE_KEYS`].
fn insert(
    handle: jlong,
    len: usize,
    mut fill: impl FnMut(&mut [i64], usize) -> Result<()>,
) -> Result<()> {
    let entry = SORTERS.get(handle)?;
    entry.with_active(|a| {
        let Phase::Input(sorter) = &a.phase else {
            return Err(Error::IllegalState(format!(
                "sorter '{}' is sorted: its input is finished",
                entry.name
            )));
        };
        let mut done = 0;
        while done < len {
            let n = (len - done).min(INSERT_PIECE_KEYS);
            a.buffer.resize(n, 0);
            fill(&mut a.buffer[..n], done)?;
            sorter.insert(&a.buffer[..n]).map_err(sort_error)?;
            done += n;
        }
        Ok(())
    })
}

/// Ends the input: from now on the sorter hands out its keys in order.
fn finish(handle: jlong) -> Result<()> {
    let entry = SORTERS.get(handle)?;
    entry.with_active(|a| a.finish_input(&entry.name))
}

/// Hands out up to `capacity` next keys through `emit(keys, at)` (`at`: how many keys of this
/// call came before); returns how many. Fewer than `capacity` only when the output ended. Ends
/// the input first if needed.
fn next_batch(
    handle: jlong,
    capacity: usize,
    mut emit: impl FnMut(&[i64], usize) -> Result<()>,
) -> Result<usize> {
    let entry = SORTERS.get(handle)?;
    entry.with_active(|a| {
        a.finish_input(&entry.name)?;
        let mut filled = 0;
        while filled < capacity && a.refill()? {
            let n = (a.buffer.len() - a.pos).min(capacity - filled);
            emit(&a.buffer[a.pos..a.pos + n], filled)?;
            a.pos += n;
            filled += n;
        }
        Ok(filled)
    })
}

/// The sorter's statistics.
fn stats(handle: jlong) -> Result<SorterStats> {
    SORTERS.get(handle)?.stats()
}

/// Closes the sorter: frees its memory, deletes its spill files and unties it from its manager.
/// If its manager is closing, the manager's close does it; this returns without error.
fn close(handle: jlong) -> Result<()> {
    let entry = SORTERS.get(handle)?;
    let Ok(lease) = entry.lease() else {
        return Ok(());
    };
    let removed = SORTERS.remove(handle)?;
    removed.shutdown();
    let attachment = removed.attachment.lock().take();
    if let Some(attachment) = attachment {
        // Runs `CloseWithManager`'s drop now: the handle is gone already, so it does nothing.
        if let Err(e) = attachment.detach() {
            log::debug!("sorter '{}': detaching from its manager: {e}", removed.name);
        }
    }
    drop(removed);
    drop(entry);
    drop(lease);
    Ok(())
}

/// Live sorter handles in the process.
fn live_sorters() -> usize {
    SORTERS.live()
}

fn stats_array(s: &SorterStats) -> [jlong; STATS_LEN] {
    [
        s.rows_inserted,
        s.rows_output,
        s.rows_spilled,
        s.bytes_spilled,
        s.runs,
        u64::try_from(s.spill_time.as_nanos()).unwrap_or(u64::MAX),
        s.memory_bytes,
        s.peak_memory_bytes,
    ]
    .map(to_jlong)
}

fn usize_arg(name: &str, value: jlong) -> Result<usize> {
    usize::try_from(non_negative(name, value)?)
        .map_err(|_| Error::InvalidArgument(format!("{name} is too large: {value}")))
}

/// `(off, len)` of a Java array argument, checked against its length.
fn array_range(env: &JNIEnv, array: &JLongArray, off: jint, len: jint) -> Result<(usize, usize)> {
    if array.is_null() {
        return Err(Error::NullArgument("keys"));
    }
    let length = env.get_array_length(array)?;
    if off < 0 || len < 0 || off > length - len {
        return Err(Error::InvalidArgument(format!(
            "range [{off}, {off} + {len}) is out of bounds for an array of length {length}"
        )));
    }
    // Both are >= 0 (checked above).
    Ok((off as usize, len as usize))
}

/// A key count as a JNI array index (`jsize`); counts here never exceed a Java array's length.
fn jsize(value: usize) -> Result<jint> {
    jint::try_from(value).map_err(|_| Error::Other(format!("index {value} exceeds a Java array")))
}

// ---- exports ---------------------------------------------------------------------------------

/// `static native long nativeCreate(long api, long manager, String name, String spillDir,
/// String poolPath, long poolLimitBytes /* -1: none */, long chunkBytes, long batchKeys,
/// long maxBufferBytes /* -1: none */, long readBufferBytes, long writeBufferBytes)`.
///
/// `api` is `NativeMemoryManager.nativeApi()` (checked: version and size), `manager` is
/// `manager.handle()`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "system" fn Java_org_nativemem_examples_NativeSorter_nativeCreate<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    api: jlong,
    manager: jlong,
    name: JString<'l>,
    spill_dir: JString<'l>,
    pool_path: JString<'l>,
    pool_limit: jlong,
    chunk_bytes: jlong,
    batch_keys: jlong,
    max_buffer_bytes: jlong,
    read_buffer_bytes: jlong,
    write_buffer_bytes: jlong,
) -> jlong {
    run_export(&mut env, 0, |env| {
        // SAFETY: Java passes NativeMemoryManager.nativeApi(): 0 (refused) or the address of the
        // provider's table, a static of libnativemem_jni that the JVM never unloads.
        let api = unsafe { Api::from_address(api) }?;
        let name = string_arg(env, &name, "name")?;
        let spill_dir = PathBuf::from(string_arg(env, &spill_dir, "spillDir")?);
        let pool_path = string_arg(env, &pool_path, "poolPath")?;
        let options = SorterOptions::default()
            .with_chunk_bytes(usize_arg("chunkBytes", chunk_bytes)?)
            .with_batch_keys(usize_arg("batchKeys", batch_keys)?)
            .with_max_buffer_bytes(optional_size("maxBufferBytes", max_buffer_bytes)?)
            .with_read_buffer_bytes(usize_arg("readBufferBytes", read_buffer_bytes)?)
            .with_write_buffer_bytes(usize_arg("writeBufferBytes", write_buffer_bytes)?);
        create(
            api,
            manager,
            CreateArgs {
                name,
                spill_dir,
                pool_path,
                pool_limit: optional_size("poolLimitBytes", pool_limit)?,
                options,
            },
        )
    })
}

/// `static native void nativeInsert(long sorter, long[] keys, int off, int len)`.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_examples_NativeSorter_nativeInsert<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
    keys: JLongArray<'l>,
    off: jint,
    len: jint,
) {
    run_export(&mut env, (), |env| {
        let (off, len) = array_range(env, &keys, off, len)?;
        insert(handle, len, |piece, from| {
            Ok(env.get_long_array_region(&keys, jsize(off + from)?, piece)?)
        })
    })
}

/// `static native void nativeFinish(long sorter)`: ends the input.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_examples_NativeSorter_nativeFinish<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
) {
    run_export(&mut env, (), |_| finish(handle))
}

/// `static native int nativeNextBatch(long sorter, long[] out)`: fills `out` from index 0 with
/// the next keys; returns how many (`out.length` unless the output ended; 0 at the end).
#[no_mangle]
pub extern "system" fn Java_org_nativemem_examples_NativeSorter_nativeNextBatch<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
    out: JLongArray<'l>,
) -> jint {
    run_export(&mut env, 0, |env| {
        if out.is_null() {
            return Err(Error::NullArgument("out"));
        }
        let capacity = usize::try_from(env.get_array_length(&out)?).unwrap_or(0);
        let n = next_batch(handle, capacity, |keys, at| {
            Ok(env.set_long_array_region(&out, jsize(at)?, keys)?)
        })?;
        jsize(n)
    })
}

/// `static native long[] nativeStats(long sorter)`: rowsInserted, rowsOutput, rowsSpilled,
/// bytesSpilled, runs, spillTimeNanos, memoryBytes, peakMemoryBytes (Java `SorterStats` order).
#[no_mangle]
pub extern "system" fn Java_org_nativemem_examples_NativeSorter_nativeStats<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
) -> jlongArray {
    run_export(&mut env, std::ptr::null_mut(), |env| {
        let values = stats_array(&stats(handle)?);
        let array = env.new_long_array(jsize(values.len())?)?;
        env.set_long_array_region(&array, 0, &values)?;
        Ok(array.into_raw())
    })
}

/// `static native void nativeClose(long sorter)`.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_examples_NativeSorter_nativeClose<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
) {
    run_export(&mut env, (), |_| close(handle))
}

/// `static native long nativeLiveSorters()`: live sorter handles in the process (diagnostics).
#[no_mangle]
pub extern "system" fn Java_org_nativemem_examples_NativeSorter_nativeLiveSorters<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
) -> jlong {
    run_export(&mut env, 0, |_| Ok(to_jlong(live_sorters() as u64)))
}

// ---- TrackedBuild: an engine's untracked allocations, charged by the tracking allocator ---------

/// Hash-map bucket bytes of a `HashMap<u64, u64>` of `capacity` (hashbrown: 16-byte slots plus one
/// control byte per bucket and a group of trailing control bytes), and its header.
fn map_bytes(capacity: usize) -> u64 {
    let buckets = (capacity * 8 / 7).next_power_of_two() as u64;
    buckets * 17 + 16 + 16
}

/// `static native long[] nativeTrackedBuild(long api, long manager, long entries)`: on a thread
/// it spawns and binds to a tracker of the task's pool `engine/tracked`, builds a
/// `HashMap<u64, u64>` of `entries` entries and a `Vec<u64>` of as many, with no reservation call.
/// Returns {pool used while held (the thread's batch may lag by < 1 MiB), the bytes the map and
/// the vector hold (headers included), pool used once the binding ended, pool used after the map
/// and vector were freed after the scope, flushes, over-committed bytes the tracker reported,
/// tracking allocator installed (1/0), pool used before}.
#[no_mangle]
pub extern "system" fn Java_org_nativemem_examples_TrackedBuild_nativeTrackedBuild<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    api: jlong,
    manager: jlong,
    entries: jlong,
) -> jlongArray {
    run_export(&mut env, std::ptr::null_mut(), |env| {
        let entries = non_negative("entries", entries)? as usize;
        // SAFETY: `api` is what Java's NativeMemoryManager.nativeApi() returned (the Java side
        // passes nothing else); 0 is refused by code.
        let api = unsafe { Api::from_address(api) }?;
        let lease = api.acquire(manager)?;
        let pool = lease.pool("engine/tracked", None)?;
        let tracker = nativemem_track::Tracker::for_pool(&pool, "hash build")?;
        let worker = tracker.clone();
        let probe = pool.stats()?;
        let pool_for_thread = &pool;
        let values = std::thread::scope(|s| {
            s.spawn(move || -> Result<[u64; 6]> {
                let guard = worker.track_thread();
                let mut map: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
                let mut vec: Vec<u64> = Vec::new();
                for k in 0..entries as u64 {
                    map.insert(k, k ^ 0x5a5a);
                    vec.push(k);
                }
                let holds = map_bytes(map.capacity()) + vec.capacity() as u64 * 8 + 16;
                let used_held = pool_for_thread.stats()?.used;
                drop(guard);
                let used_exact = pool_for_thread.stats()?.used;
                drop((map, vec)); // freed after the scope: credited to the same pool
                worker.flush();
                let used_after = pool_for_thread.stats()?.used;
                Ok([used_held, holds, used_exact, used_after, 0, 0])
            })
            .join()
            .map_err(|p| Error::Panic(panic_message(p.as_ref())))?
        })?;
        let stats = tracker.stats();
        drop((tracker, pool));
        nativemem_track::collect();
        lease.release()?;
        let installed = cfg!(feature = "tracking-allocator") as u64;
        let out = [
            values[0],
            values[1],
            values[2],
            values[3],
            stats.flushes,
            stats.overcommitted,
            installed,
            probe.used,
        ]
        .map(|v| v.min(i64::MAX as u64) as jlong);
        let array = env.new_long_array(jsize(out.len())?)?;
        env.set_long_array_region(&array, 0, &out)?;
        Ok(array.into_raw())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{api, manager_with, TestListener};
    use nativemem_client::handles::HandleError;
    use nativemem_client::java::{
        exception as java_exception, ILLEGAL_ARGUMENT, ILLEGAL_STATE, NATIVE_MEMORY, NULL_POINTER,
        OUT_OF_MEMORY,
    };
    use nativemem_client::Code;
    use nativemem_client::{ManagerOptions, OwnedManager};
    use std::path::Path;

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir().join(format!(
                "nativemem-examples-jni-{tag}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            Dir(p)
        }

        fn files(&self) -> usize {
            std::fs::read_dir(&self.0).map_or(0, |d| d.count())
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn manager(capacity: Option<u64>) -> (OwnedManager, Arc<TestListener>) {
        let l = match capacity {
            Some(c) => TestListener::new(c),
            None => TestListener::unlimited(),
        };
        let options = ManagerOptions {
            reservation_block: Some(1 << 20),
            // Exact accounting (quantum 0, opt-in): pool limits of a few 64 KiB chunks, pool
            // figures checked to the byte (as in `tests.rs`).
            reservation_quantum: 0,
            ..ManagerOptions::default()
        };
        (manager_with("t", options, l.clone()), l)
    }

    /// Closes the manager; asserts no byte was leaked.
    fn close_clean(m: OwnedManager) {
        let report = m.close().unwrap();
        assert_eq!(report.leaked_bytes, 0, "{}", report.report);
    }

    fn args(dir: &Path, pool_limit: Option<u64>) -> CreateArgs {
        CreateArgs {
            name: "s".into(),
            spill_dir: dir.to_path_buf(),
            pool_path: "sort".into(),
            pool_limit,
            options: SorterOptions::default()
                .with_chunk_bytes(64 << 10)
                .with_batch_keys(1000),
        }
    }

    fn keys(n: usize, seed: u64) -> Vec<i64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 11) as i64 - (1 << 52)
            })
            .collect()
    }

    fn insert_all(h: jlong, keys: &[i64]) -> Result<()> {
        insert(h, keys.len(), |piece, from| {
            piece.copy_from_slice(&keys[from..from + piece.len()]);
            Ok(())
        })
    }

    fn read_all(h: jlong, cap: usize) -> Vec<i64> {
        let mut all = Vec::new();
        loop {
            let mut out = vec![0; cap];
            let n = next_batch(h, cap, |k, at| {
                out[at..at + k.len()].copy_from_slice(k);
                Ok(())
            })
            .unwrap();
            all.extend_from_slice(&out[..n]);
            if n < cap {
                return all;
            }
        }
    }

    #[test]
    fn sorts_through_handles_with_forced_spills_and_closes_clean() {
        let dir = Dir::new("spill");
        let (m, l) = manager(None);
        // 4 chunks of 64 KiB: 200k keys (1.6 MB) spill many times.
        let h = create(api(), m.handle(), args(&dir.0, Some(256 << 10))).unwrap();
        let input = keys(200_000, 7);
        for piece in input.chunks(70_000) {
            insert_all(h, piece).unwrap();
        }
        let s = stats(h).unwrap();
        assert_eq!(s.rows_inserted, 200_000);
        assert!(s.runs >= 3, "{s}");
        assert!(dir.files() >= 3);
        finish(h).unwrap();
        // An odd capacity crosses batch edges.
        let out = read_all(h, 777);
        let mut expected = input.clone();
        expected.sort_unstable();
        assert_eq!(out, expected);
        assert_eq!(stats(h).unwrap().rows_output, 200_000);
        assert!(matches!(insert_all(h, &[1]), Err(Error::IllegalState(_))));
        close(h).unwrap();
        assert!(matches!(stats(h), Err(Error::Handle(_))));
        assert!(matches!(close(h), Err(Error::Handle(_))));
        assert_eq!(dir.files(), 0, "spill files removed");
        close_clean(m);
        assert_eq!(l.reserved(), 0);
    }

    #[test]
    fn rows_output_counts_only_keys_handed_out() {
        let dir = Dir::new("partial");
        let (m, _l) = manager(None);
        let h = create(api(), m.handle(), args(&dir.0, None)).unwrap();
        insert_all(h, &keys(5000, 3)).unwrap();
        let n = next_batch(h, 10, |_, _| Ok(())).unwrap();
        assert_eq!(n, 10);
        assert_eq!(stats(h).unwrap().rows_output, 10);
        assert_eq!(read_all(h, 5000).len(), 4990);
        m.close().unwrap();
    }

    #[test]
    fn closing_the_manager_closes_its_sorters_first() {
        let dir = Dir::new("mgrclose");
        let (m, l) = manager(None);
        let h = create(api(), m.handle(), args(&dir.0, Some(128 << 10))).unwrap();
        insert_all(h, &keys(100_000, 5)).unwrap();
        assert!(dir.files() > 0);
        let report = m.close().unwrap();
        assert_eq!(
            report.leaked_bytes, 0,
            "a sorter closed with its manager is no leak: {}",
            report.report
        );
        assert_eq!(l.reserved(), 0);
        assert_eq!(dir.files(), 0, "spill files removed");
        for r in [
            stats(h).map(|_| ()),
            insert_all(h, &[1]),
            finish(h),
            close(h),
        ] {
            let err = r.unwrap_err();
            assert!(matches!(err, Error::Handle(_)), "{err}");
            assert!(err.to_string().contains("sorter handle"), "{err}");
        }
    }

    #[test]
    fn bad_handles_are_refused() {
        let (m, _l) = manager(None);
        for (h, want) in [
            (0, "null sorter handle"),
            (m.handle(), "is not a sorter handle"),
            (-1, "is not a sorter handle"),
            (
                (i64::from(kind::ENGINE_FIRST) << 56) | (1 << 24) | 0xff_fff0,
                "is unknown",
            ),
        ] {
            let err = stats(h).unwrap_err();
            assert!(err.to_string().contains(want), "{h:#x}: {err}");
            assert!(insert_all(h, &[1]).is_err());
            assert!(close(h).is_err());
        }
        // A manager handle that is stale.
        let stale = m.handle();
        m.close().unwrap();
        let dir = Dir::new("stale");
        let err = create(api(), stale, args(&dir.0, None)).unwrap_err();
        assert!(
            matches!(err, Error::Memory(ref e) if e.code == Code::StaleHandle),
            "{err}"
        );
        assert_eq!(java_exception(&err).unwrap().0, ILLEGAL_STATE);
    }

    /// The sorters' table has a tag of the engines' range: a sorter handle passed to the engine
    /// ABI as a pool (or a pool handle passed as a sorter) is refused as the wrong kind, never
    /// taken for an object of the other library.
    #[test]
    fn a_sorter_handle_is_not_a_pool_handle() {
        let dir = Dir::new("kinds");
        let (m, _l) = manager(None);
        let h = create(api(), m.handle(), args(&dir.0, None)).unwrap();
        let lease = m.acquire().unwrap();
        let pool = lease.pool("sort", None).unwrap();

        let raw = api().raw();
        let mut out = nativemem_client::sys::NmPoolStats::default();
        // SAFETY: a valid out pointer; a handle of any value is checked by the table.
        let status = unsafe { (raw.pool_stats)(h as u64, &mut out, std::ptr::null_mut()) };
        assert_eq!(status, nativemem_client::sys::NM_ERR_INVALID_HANDLE);
        // SAFETY: as above.
        let status = unsafe { (raw.pool_close)(h as u64, std::ptr::null_mut()) };
        assert_eq!(status, nativemem_client::sys::NM_ERR_INVALID_HANDLE);

        let err = stats(pool.as_raw() as jlong).unwrap_err();
        assert!(err.to_string().contains("is not a sorter handle"), "{err}");
        assert!(stats(h).is_ok(), "the sorter is untouched");
        close(h).unwrap();
        drop(pool);
        drop(lease);
        close_clean(m);
    }

    #[test]
    fn out_of_memory_when_not_even_one_chunk_fits() {
        let dir = Dir::new("oom");
        let (m, _l) = manager(Some(0));
        let h = create(api(), m.handle(), args(&dir.0, None)).unwrap();
        let err = insert_all(h, &[1, 2, 3]).unwrap_err();
        assert!(
            matches!(err, Error::Memory(ref e) if e.is_out_of_memory()),
            "{err}"
        );
        let (class, message) = java_exception(&err).unwrap();
        assert_eq!(class, OUT_OF_MEMORY);
        assert!(message.contains("Native memory of 't'"), "{message}");
        close(h).unwrap();
        close_clean(m);
    }

    #[test]
    fn bad_options_and_pools_are_invalid_arguments() {
        let dir = Dir::new("args");
        let (m, _l) = manager(None);
        let mut a = args(&dir.0, None);
        a.options = a.options.with_chunk_bytes(7);
        assert!(matches!(
            create(api(), m.handle(), a),
            Err(Error::InvalidArgument(_))
        ));
        let mut a = args(&dir.0, Some(1 << 20));
        a.pool_path = "root".into();
        assert!(matches!(
            create(api(), m.handle(), a),
            Err(Error::InvalidArgument(_))
        ));
        let mut a = args(&dir.0, None);
        a.pool_path = "a//b".into();
        let err = create(api(), m.handle(), a).unwrap_err();
        assert!(
            matches!(err, Error::Memory(ref e) if e.code == Code::InvalidArgument),
            "{err}"
        );
        assert_eq!(java_exception(&err).unwrap().0, ILLEGAL_ARGUMENT);
        close_clean(m);
    }

    #[test]
    fn a_call_while_another_runs_is_refused_and_close_waits_for_nothing() {
        let dir = Dir::new("busy");
        let (m, _l) = manager(None);
        let h = create(api(), m.handle(), args(&dir.0, None)).unwrap();
        let (in_tx, in_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            insert(h, 10, |piece, _| {
                in_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                piece.fill(1);
                Ok(())
            })
        });
        in_rx.recv().unwrap();
        let err = insert_all(h, &[1]).unwrap_err();
        assert!(err.to_string().contains("in use by another call"), "{err}");
        assert_eq!(stats(h).unwrap().rows_inserted, 0, "last finished call");
        // Java closes the sorter while the insert runs: the insert drops it when it returns.
        close(h).unwrap();
        assert!(matches!(stats(h), Err(Error::Handle(_))));
        go_tx.send(()).unwrap();
        worker.join().unwrap().unwrap();
        close_clean(m);
    }

    #[test]
    fn a_panic_in_a_call_breaks_the_sorter_and_frees_it() {
        let dir = Dir::new("panic");
        let (m, l) = manager(None);
        let h = create(api(), m.handle(), args(&dir.0, None)).unwrap();
        insert_all(h, &keys(1000, 1)).unwrap();
        let r = std::panic::catch_unwind(|| {
            let _ = insert(h, 10, |_, _| panic!("boom"));
        });
        assert!(r.is_err());
        let err = insert_all(h, &[1]).unwrap_err();
        assert!(err.to_string().contains("unusable"), "{err}");
        assert_eq!(stats(h).unwrap().rows_inserted, 1000);
        close(h).unwrap();
        close_clean(m);
        assert_eq!(l.reserved(), 0);
    }

    #[test]
    fn errors_map_to_the_documented_exceptions() {
        let cases: Vec<(Error, &str, &str)> = vec![
            (
                nativemem_client::Error::new(Code::OutOfMemory, "Failed to reserve").into(),
                OUT_OF_MEMORY,
                "Failed to reserve",
            ),
            (
                nativemem_client::Error::new(Code::InvalidArgument, "bad path").into(),
                ILLEGAL_ARGUMENT,
                "bad path",
            ),
            (
                nativemem_client::Error::new(Code::StaleHandle, "is stale").into(),
                ILLEGAL_STATE,
                "is stale",
            ),
            (
                nativemem_client::Error::new(Code::Closed, "closing").into(),
                ILLEGAL_STATE,
                "closing",
            ),
            (
                nativemem_client::Error::new(Code::Listener, "spark said no").into(),
                NATIVE_MEMORY,
                "NM_ERR_LISTENER: spark said no",
            ),
            (
                HandleError::Null { kind: "sorter" }.into(),
                ILLEGAL_STATE,
                "null sorter handle (0x0)",
            ),
            (Error::IllegalState("busy".into()), ILLEGAL_STATE, "busy"),
            (
                Error::InvalidArgument("chunkBytes must be >= 0, got -8".into()),
                ILLEGAL_ARGUMENT,
                "chunkBytes must be >= 0, got -8",
            ),
            (
                Error::NullArgument("keys"),
                NULL_POINTER,
                "keys must not be null",
            ),
            (
                Error::Panic("boom".into()),
                NATIVE_MEMORY,
                "native panic: boom",
            ),
            (
                sort_error(SortError::CorruptRun {
                    path: "/x".into(),
                    message: "short".into(),
                }),
                NATIVE_MEMORY,
                "spill file /x is corrupt: short",
            ),
        ];
        for (err, class, message) in cases {
            assert_eq!(
                java_exception(&err),
                Some((class, message.to_string())),
                "{err:?}"
            );
        }
        assert_eq!(
            java_exception(&Error::Jni(jni::errors::Error::JavaException)),
            None
        );
    }
}

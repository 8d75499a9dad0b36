//! The executor's container governor, process-wide: started once per executor (by the Spark
//! plugin through JNI, or by an embedder), acting on every manager of the registry.
//!
//! The relief ladder (see `nativemem_governor`) acts through [`ExecutorRelief`]:
//!
//! - give back idle: each manager hands its reservations' slack and its unused cushion back to
//!   its listener (Spark);
//! - trim: `malloc_trim(0)` (glibc) returns the allocator's free pages to the kernel, and every
//!   engine's trim hook (`trim_hook_register` of the ABI: mimalloc's collect, jemalloc's purge)
//!   does the same for the engine's own allocator;
//! - spill: managers are asked to reclaim (spill and hand back), the largest user first, until
//!   what was asked is freed.
//!
//! Every manager is entered through the registry like any other caller, so a manager that is
//! closing is skipped (never waited for) and close waits for the governor's call on it; so is a
//! manager whose task is inside a reservation from Spark (its thread may hold the task's
//! `TaskMemoryManager` monitor while Spark makes it wait, and giving back takes that monitor).
//! Known limit: a JVM operator of a task waiting for memory under that monitor is not visible
//! here, so the governor's thread can wait for it (the tasks never wait for the governor). No
//! lock is held while a manager is called: the list of handles is copied first.

use std::sync::Arc;

use nativemem_core::human;
use nativemem_governor::{
    CgroupProbe, ContainerView, FsRoot, Governor, GovernorStats, GovernorThread, Probe, Relief,
    Source, Thresholds,
};
use parking_lot::Mutex;

use crate::container;
use crate::error::{Error, Result};
use crate::registry;

/// What a governor is started with.
#[derive(Clone, Debug, PartialEq)]
pub struct GovernorConfig {
    /// Levels and sampling bounds.
    pub thresholds: Thresholds,
    /// A limit set by the user (`spark.nativemem.containerLimit`), bytes; used beside the cgroup's.
    pub configured_limit: Option<u64>,
}

/// How [`start`] went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Started {
    /// A governor now runs; the first reading of the container.
    Running(ContainerView),
    /// One runs already (started by an earlier call).
    AlreadyRunning,
    /// No memory cgroup and no configured limit: nothing to govern. The reading.
    NoLimit(ContainerView),
}

static RUNNING: Mutex<Option<GovernorThread>> = Mutex::new(None);

/// Starts the process's governor over its memory cgroup (or, without one, the process's own
/// memory against the configured limit) unless one runs or no limit applies.
pub fn start(config: GovernorConfig) -> Result<Started> {
    let probe = CgroupProbe::new(FsRoot::system(), config.configured_limit);
    start_with(config.thresholds, Box::new(probe))
}

/// Like [`start`], reading the container through `probe` (an embedder's own view of its
/// container, or a test's).
pub fn start_with(thresholds: Thresholds, mut probe: Box<dyn Probe>) -> Result<Started> {
    thresholds
        .validate()
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let mut running = RUNNING.lock();
    if running.is_some() {
        return Ok(Started::AlreadyRunning);
    }
    let view = probe
        .read()
        .map_err(|e| Error::Other(format!("cannot read the container's memory: {e}")))?;
    // Without a limit but in a memory cgroup, the governor still samples (every
    // `max_interval`): a limit set later, or a move into a limited cgroup, is then governed.
    // Without a cgroup and a configured limit nothing can change: no governor.
    if view.limit.is_none() && view.source == Source::Process {
        return Ok(Started::NoLimit(view));
    }
    container::set_levels(Some(thresholds));
    let governor = Governor::new(
        thresholds,
        probe,
        Arc::new(ExecutorRelief),
        &container::PUBLISHED,
    );
    let thread = GovernorThread::start(governor)
        .map_err(|e| Error::Other(format!("cannot start the governor thread: {e}")))?;
    container::set_waker(Some(thread.waker()));
    *running = Some(thread);
    Ok(Started::Running(view))
}

/// Stops the governor, if one runs; grows are no longer refused afterwards.
pub fn stop() {
    container::set_waker(None);
    let thread = RUNNING.lock().take();
    drop(thread); // joins, with the lock released
    let p = &container::PUBLISHED;
    // A stopped governor publishes no pressure.
    p.clear();
    container::set_levels(None);
}

/// The governor's state, for gauges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GovernorStatus {
    /// A governor runs.
    pub running: bool,
    /// Binding limit and anonymous usage of the last sample, bytes.
    pub limit: u64,
    pub usage: u64,
    /// Level of the last sample.
    pub pressure: u8,
    /// What it did.
    pub stats: GovernorStats,
    /// Listener reservations refused by the gate so far, in all the executor's managers.
    pub gate_refusals: u64,
}

/// The governor's state now.
pub fn status() -> GovernorStatus {
    let p = &container::PUBLISHED;
    let running = RUNNING.lock();
    let is_running = running.is_some();
    let stats = running.as_ref().map(|t| t.stats()).unwrap_or_default();
    drop(running);
    GovernorStatus {
        running: is_running,
        limit: p.limit(),
        usage: p.usage(),
        pressure: p.pressure() as u8,
        stats,
        gate_refusals: container::refusals(),
    }
}

/// The forensics history (last snapshots and one taken now), or `None` without a governor.
pub fn forensics() -> Option<String> {
    let running = RUNNING.lock();
    running.as_ref().map(|t| t.with(|g| g.forensics()))
}

/// The relief ladder over the registry's managers.
struct ExecutorRelief;

impl ExecutorRelief {
    /// Runs `f` on each live manager that is not closing; the sum of what it returned.
    fn each(&self, mut f: impl FnMut(&nativemem_core::MemoryManager) -> u64) -> u64 {
        let mut total = 0;
        for handle in container::managers() {
            // A closing or closed manager refuses the call: skipped, never waited for. So is one
            // whose task is inside a reservation from Spark: its thread may hold the task's
            // monitor while it waits for memory, and giving back takes that monitor.
            if let Ok(call) = registry::enter_manager(handle) {
                if !call.manager().is_reserving() {
                    total += f(call.manager());
                }
            }
        }
        total
    }
}

impl Relief for ExecutorRelief {
    fn give_back_idle(&self) -> u64 {
        self.each(|m| m.release_idle(u64::MAX).unwrap_or(0))
    }

    fn trim(&self) -> u64 {
        trim_now()
    }

    fn spill(&self, bytes: u64) -> u64 {
        // Largest user first.
        let mut by_use: Vec<(u64, i64)> = container::managers()
            .into_iter()
            .filter_map(|h| {
                registry::enter_manager(h)
                    .ok()
                    .filter(|c| !c.manager().is_reserving())
                    .map(|c| (c.manager().used(), h))
            })
            .collect();
        by_use.sort_unstable_by_key(|&(used, _)| std::cmp::Reverse(used));
        let mut freed = 0u64;
        for (_, handle) in by_use {
            if freed >= bytes {
                break;
            }
            if let Ok(call) = registry::enter_manager(handle) {
                match call.manager().reclaim(bytes - freed) {
                    Ok(b) => freed += b,
                    Err(e) => log::warn!(
                        "nativemem governor: reclaiming from '{}' failed: {e}",
                        call.manager().name()
                    ),
                }
            }
        }
        freed
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        let mut n = 0;
        self.each(|m| {
            n += 1;
            if n <= 8 {
                out.push_str(&m.usage_report().to_string());
                out.push('\n');
            }
            0
        });
        if n > 8 {
            out.push_str(&format!("... and {} more task manager(s)\n", n - 8));
        }
        if n == 0 {
            out.push_str("no live task manager\n");
        }
        out
    }
}

/// An engine's allocator trim hook (`trim_hook_register` of the ABI).
pub(crate) struct TrimHook {
    trim: unsafe extern "C" fn(ctx: *mut std::ffi::c_void) -> u64,
    ctx: *mut std::ffi::c_void,
    drop: Option<unsafe extern "C" fn(ctx: *mut std::ffi::c_void)>,
}

// SAFETY: the header makes `trim` callable from the governor's thread and `drop` from any
// thread; `ctx` is only passed back to them, never dereferenced here.
unsafe impl Send for TrimHook {}
// SAFETY: as above; calls are never concurrent with `drop` (it runs when the last Arc goes).
unsafe impl Sync for TrimHook {}

impl TrimHook {
    /// # Safety
    /// `trim`, `ctx` and `drop` must follow `trim_hook_register`'s contract in the header.
    pub(crate) unsafe fn new(
        trim: unsafe extern "C" fn(ctx: *mut std::ffi::c_void) -> u64,
        ctx: *mut std::ffi::c_void,
        drop: Option<unsafe extern "C" fn(ctx: *mut std::ffi::c_void)>,
    ) -> Self {
        TrimHook { trim, ctx, drop }
    }
}

impl Drop for TrimHook {
    fn drop(&mut self) {
        if let Some(drop) = self.drop {
            // SAFETY: the engine's drop, called once, when no call of `trim` runs (last Arc).
            // A panic cannot come from C; a foreign unwind is not caught (header contract).
            unsafe { drop(self.ctx) }
        }
    }
}

/// The registered trim hooks: called with the list copied, so no lock is held while an engine
/// runs; a hook unregistered meanwhile is dropped when its last call returns.
static TRIM_HOOKS: Mutex<Vec<(u64, Arc<TrimHook>)>> = Mutex::new(Vec::new());
static NEXT_TRIM_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Registers an engine's trim hook; returns its id.
pub(crate) fn register_trim_hook(hook: TrimHook) -> u64 {
    let id = NEXT_TRIM_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    TRIM_HOOKS.lock().push((id, Arc::new(hook)));
    id
}

/// Unregisters a trim hook; false if `id` is not registered.
pub(crate) fn unregister_trim_hook(id: u64) -> bool {
    let removed = {
        let mut hooks = TRIM_HOOKS.lock();
        let at = hooks.iter().position(|(i, _)| *i == id);
        let removed = at.map(|i| hooks.swap_remove(i));
        if hooks.is_empty() {
            *hooks = Vec::new(); // no buffer kept (leak tests count bytes)
        }
        removed
    };
    // Dropped here, with the lock released: the engine's drop runs now unless a call is in flight.
    removed.is_some()
}

/// Trim hooks registered now.
pub fn trim_hooks() -> usize {
    TRIM_HOOKS.lock().len()
}

/// Calls every engine's trim hook; the bytes they report.
fn call_trim_hooks() -> u64 {
    let hooks: Vec<Arc<TrimHook>> = TRIM_HOOKS.lock().iter().map(|(_, h)| h.clone()).collect();
    let mut total = 0u64;
    for h in hooks {
        // SAFETY: the engine's function with its ctx (header contract); no lock held.
        total = total.saturating_add(unsafe { (h.trim)(h.ctx) });
    }
    total
}

/// Asks the allocators to return free pages to the kernel: the task heaps' (mimalloc's purge,
/// `nativemem_core::purge_task_heaps`), this library's (glibc's `malloc_trim`) and every
/// engine's trim hook. Returns the bytes the hooks reported.
pub fn trim_now() -> u64 {
    nativemem_core::purge_task_heaps();
    trim_allocator();
    call_trim_hooks()
}

/// Asks the allocator to return free pages to the kernel.
fn trim_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: glibc's malloc_trim takes no pointers and may be called from any thread at any
        // time; it only walks the allocator's own arenas under their locks.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Formats a reading for the executor's log.
pub fn describe_view(view: &ContainerView) -> String {
    let level = match view.limit {
        Some(limit) => format!(
            "limit {} ({}), anonymous {} ({:.0}%), page cache {}",
            human(limit),
            view.limit_from,
            human(view.usage),
            view.usage as f64 * 100.0 / limit.max(1) as f64,
            human(view.cache)
        ),
        None => format!(
            "no memory limit yet (no cgroup limit, {} not set), anonymous {}",
            nativemem_governor::view::CONFIGURED_LIMIT,
            human(view.usage)
        ),
    };
    format!("{:?}: {level}", view.source)
}

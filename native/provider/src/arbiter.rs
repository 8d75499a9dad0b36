//! Executor-wide arbitration: when Spark grants a task's native grow less than it needs, the
//! executor's *other* task managers hand their idle memory back to Spark, and the grow asks
//! again, before it spills its own native operators or fails (the rung of
//! `nativemem_core::Arbiter` in the core's remedy ladder).
//!
//! Spark gives each of N running tasks between 1/2N and 1/N of execution memory and spills only
//! consumers of the requesting task. A native manager keeps a *cushion* (whole blocks reserved
//! from Spark ahead of use) and, in quantum mode, *slack*: memory Spark counts as used by a task
//! that no operator of that task holds. Handing it back to Spark's pool lets the waiting task's
//! own `acquireMemory` succeed under Spark's own fairness rule: nothing is moved from task to
//! task behind Spark's back.
//!
//! # Whom it asks, in which order
//! Every live manager of the registry but the requester, entered through the registry like any
//! caller (a closing manager refuses: skipped, never waited for; the close waits for this short
//! call). What can be observed decides the order:
//! 1. tasks whose native operators hold nothing (`used == 0`): finished with their native work,
//!    or not started yet; their cushion is idle for sure;
//! 2. then the others, the most idle bytes (cushion + slack) first.
//!
//! A manager with a listener `reserve` in flight is skipped: it is short itself, and its thread
//! may be *waiting* inside Spark (`ExecutionMemoryPool` makes a task under 1/2N wait). Each
//! manager is asked for what is still short only.
//!
//! # Optional: cross-task spill (off by default)
//! With [`ArbiterSettings::cross_task_spill`], if idle memory was not enough, the largest other
//! task (by native use) is asked to spill for the requester (`MemoryManager::reclaim`), at most
//! [`ArbiterSettings::spill_cap`] bytes per request; the log names the task that paid. The trade:
//! a task that is not short pays with its own spill (and disk I/O) so another avoids spilling or
//! failing; the victim's spillers run on the requester's thread. Spark's own rule never spills
//! another task's consumers; this setting deliberately does (Velox's arbitrator does the same
//! across queries).
//!
//! # Locks
//! No lock is held while a manager is called: the list of handles is a copy. The core calls the
//! arbiter with no lock of the requester held, and never from a thread that already arbitrates
//! or runs a `reclaim` (Spark's `spill`, under the task's monitor), see
//! `nativemem_core::arbitration_allowed`. A grow of another manager caused here (a spiller
//! writing) is not arbitrated again.
//!
//! ## The giving task's locks (Spark)
//! Handing memory back calls the giving task's listener on the requester's thread. A listener
//! must not take a lock that a thread of the giving task can hold while it waits for memory: in
//! Spark, a thread of a task under 1/2N of the pool waits inside `acquireExecutionMemory` holding
//! its `TaskMemoryManager` monitor, and only a release to the pool wakes it. The Java listener
//! (`SparkReservationListener.unreserve`) therefore releases through
//! `TaskMemoryManager.releaseExecutionMemory`, which takes only the memory manager's lock (the
//! waiting thread releases it while it waits), and keeps its own count atomic;
//! `SparkArbitrationTest` (JUnit, Spark's own memory managers) recreates that wait.
//!
//! Below the registry: the registry gives every manager the arbiter and hands down how to enter
//! a manager ([`Visit`]), so this module needs no upward import.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use nativemem_core::{human, Arbiter, MemoryManager};

use crate::container;

/// How the registry lets the arbiter call a manager: runs `f` on the live manager `handle` as a
/// counted call (its close waits for it) and returns true, or returns false if the manager is
/// closing, closed or gone.
pub(crate) type Visit = fn(i64, &mut dyn FnMut(&MemoryManager)) -> bool;

/// The arbiter's settings (process-wide).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArbiterSettings {
    /// Other tasks hand idle memory back on a short grant (default off: see the known limit in
    /// the module docs).
    pub enabled: bool,
    /// If that is not enough, the largest other task spills for the requester (default off).
    pub cross_task_spill: bool,
    /// Most bytes a cross-task spill frees per request.
    pub spill_cap: u64,
}

/// Default [`ArbiterSettings::spill_cap`]: 64 MiB.
pub const DEFAULT_SPILL_CAP: u64 = 64 << 20;

impl Default for ArbiterSettings {
    fn default() -> Self {
        ArbiterSettings {
            enabled: false,
            cross_task_spill: false,
            spill_cap: DEFAULT_SPILL_CAP,
        }
    }
}

// Relaxed (all settings and counters below): independent flags and statistics, each read alone.
static ENABLED: AtomicBool = AtomicBool::new(false);
static CROSS_SPILL: AtomicBool = AtomicBool::new(false);
static SPILL_CAP: AtomicU64 = AtomicU64::new(DEFAULT_SPILL_CAP);

static RECLAIMS: AtomicU64 = AtomicU64::new(0);
static RECLAIMED_BYTES: AtomicU64 = AtomicU64::new(0);
static SPILLS: AtomicU64 = AtomicU64::new(0);
static SPILLED_BYTES: AtomicU64 = AtomicU64::new(0);
static VICTIMS: AtomicU64 = AtomicU64::new(0);
static SHORT_GRANTS: AtomicU64 = AtomicU64::new(0);

/// Sets the arbiter's settings (applies to every manager, from the next short grant on).
pub fn configure(settings: ArbiterSettings) {
    ENABLED.store(settings.enabled, Ordering::Relaxed);
    CROSS_SPILL.store(settings.cross_task_spill, Ordering::Relaxed);
    SPILL_CAP.store(settings.spill_cap, Ordering::Relaxed);
}

/// The settings now.
pub fn settings() -> ArbiterSettings {
    ArbiterSettings {
        enabled: ENABLED.load(Ordering::Relaxed),
        cross_task_spill: CROSS_SPILL.load(Ordering::Relaxed),
        spill_cap: SPILL_CAP.load(Ordering::Relaxed),
    }
}

/// Executor-wide figures, for gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArbiterStatus {
    /// Idle bytes held across the executor now: cushion + slack of every live manager.
    pub idle_bytes: u64,
    /// Short grants the arbiter was asked about.
    pub short_grants: u64,
    /// Short grants other tasks' idle memory helped, and the bytes they handed back.
    pub reclaims: u64,
    pub reclaimed_bytes: u64,
    /// Cross-task spills, the bytes they freed, and the tasks that paid (one per spill).
    pub spills: u64,
    pub spilled_bytes: u64,
    pub victims: u64,
}

/// The registry's [`Visit`], set when it creates the first manager.
static VISIT: OnceLock<Visit> = OnceLock::new();

/// The figures now (walks the live managers for the idle bytes).
pub fn status() -> ArbiterStatus {
    let mut idle = 0u64;
    if let Some(visit) = VISIT.get() {
        for handle in container::managers() {
            visit(handle, &mut |m| idle = idle.saturating_add(m.idle()));
        }
    }
    ArbiterStatus {
        idle_bytes: idle,
        short_grants: SHORT_GRANTS.load(Ordering::Relaxed),
        reclaims: RECLAIMS.load(Ordering::Relaxed),
        reclaimed_bytes: RECLAIMED_BYTES.load(Ordering::Relaxed),
        spills: SPILLS.load(Ordering::Relaxed),
        spilled_bytes: SPILLED_BYTES.load(Ordering::Relaxed),
        victims: VICTIMS.load(Ordering::Relaxed),
    }
}

/// The arbiter to give a new manager (one for the process).
pub(crate) fn arbiter(visit: Visit) -> Arc<dyn Arbiter> {
    static ARBITER: OnceLock<Arc<dyn Arbiter>> = OnceLock::new();
    let _ = VISIT.set(visit);
    ARBITER
        .get_or_init(|| Arc::new(ExecutorArbiter { visit }))
        .clone()
}

/// The arbiter over the registry's managers (see the module docs).
struct ExecutorArbiter {
    visit: Visit,
}

/// A manager that may give: not the requester, not waiting in its listener.
fn may_give(m: &MemoryManager, requester: u64) -> bool {
    m.id() != requester && !m.is_reserving()
}

impl ExecutorArbiter {
    /// Idle memory of the other managers, in the module docs' order; returns the bytes handed
    /// back.
    fn reclaim_idle(&self, requester: u64, short: u64) -> u64 {
        // (tier: 0 idle task first, idle bytes, handle)
        let mut candidates: Vec<(u8, u64, i64)> = Vec::new();
        for handle in container::managers() {
            (self.visit)(handle, &mut |m| {
                if may_give(m, requester) {
                    let idle = m.idle();
                    if idle > 0 {
                        candidates.push((u8::from(m.used() > 0), idle, handle));
                    }
                }
            });
        }
        candidates.sort_unstable_by_key(|&(tier, idle, _)| (tier, std::cmp::Reverse(idle)));
        let mut freed = 0u64;
        for (_, _, handle) in candidates {
            if freed >= short {
                break;
            }
            (self.visit)(handle, &mut |m| {
                if may_give(m, requester) {
                    match m.release_idle(short - freed) {
                        Ok(b) => freed += b,
                        Err(e) => log::warn!(
                            "nativemem arbiter: '{}' handing back idle memory failed: {e}",
                            m.name()
                        ),
                    }
                }
            });
        }
        freed
    }

    /// Cross-task spill: the largest other task spills up to `target` bytes for the requester.
    fn spill_other(&self, requester: u64, target: u64) -> u64 {
        let mut largest: Option<(u64, i64)> = None;
        let mut requester_name = String::new();
        for handle in container::managers() {
            (self.visit)(handle, &mut |m| {
                if m.id() == requester {
                    requester_name = m.name().to_string();
                } else if may_give(m, requester) && m.spiller_count() > 0 {
                    let used = m.used();
                    if used > 0 && largest.is_none_or(|(u, _)| used > u) {
                        largest = Some((used, handle));
                    }
                }
            });
        }
        let Some((_, handle)) = largest else {
            return 0;
        };
        let mut freed = 0;
        (self.visit)(handle, &mut |m| match m.reclaim(target) {
            Ok(b) => {
                freed = b;
                if b > 0 {
                    log::info!(
                        "nativemem arbiter: '{}' spilled {} (of {} asked) for '{requester_name}'",
                        m.name(),
                        human(b),
                        human(target)
                    );
                }
            }
            Err(e) => log::warn!(
                "nativemem arbiter: '{}' spilling for '{requester_name}' failed: {e}",
                m.name()
            ),
        });
        if freed > 0 {
            SPILLS.fetch_add(1, Ordering::Relaxed);
            SPILLED_BYTES.fetch_add(freed, Ordering::Relaxed);
            VICTIMS.fetch_add(1, Ordering::Relaxed);
        }
        freed
    }
}

impl Arbiter for ExecutorArbiter {
    fn on_short_grant(&self, requester: u64, short: u64) -> u64 {
        if !ENABLED.load(Ordering::Relaxed) || short == 0 {
            return 0;
        }
        SHORT_GRANTS.fetch_add(1, Ordering::Relaxed);
        let mut freed = self.reclaim_idle(requester, short);
        if freed > 0 {
            RECLAIMS.fetch_add(1, Ordering::Relaxed);
            RECLAIMED_BYTES.fetch_add(freed, Ordering::Relaxed);
            log::debug!(
                "nativemem arbiter: other tasks handed back {} idle for a short grant of {}",
                human(freed),
                human(short)
            );
        }
        if freed < short && CROSS_SPILL.load(Ordering::Relaxed) {
            let target = (short - freed).min(SPILL_CAP.load(Ordering::Relaxed));
            freed += self.spill_other(requester, target);
        }
        freed
    }
}

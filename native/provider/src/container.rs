//! What every manager of the process shares with the container governor: the governor's last
//! sample (read by each manager's grow gate, one atomic load), and the list of live managers the
//! governor acts on.
//!
//! Below the registry on purpose: the registry registers each manager here and gives it the
//! gate; the governor (`crate::governor`, above the registry) reads the list and enters the
//! managers through the registry like any other caller.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use nativemem_core::{human, GrowGate};
use nativemem_governor::{Pressure, Published, Thresholds, Waker};
use parking_lot::Mutex;

/// The governor's last sample; all zero (no pressure) until a governor runs.
pub(crate) static PUBLISHED: Published = Published::new();

/// Wakes the running governor (set by `governor::start`, cleared by `stop`).
static WAKER: Mutex<Option<Waker>> = Mutex::new(None);

pub(crate) fn set_waker(waker: Option<Waker>) {
    *WAKER.lock() = waker;
}

/// The levels of the governor that runs (for the gate's message).
static LEVELS: Mutex<Option<Thresholds>> = Mutex::new(None);

pub(crate) fn set_levels(levels: Option<Thresholds>) {
    *LEVELS.lock() = levels;
}

/// The gate every manager of the provider gets: refuses new memory from Spark under hard
/// container pressure (see `nativemem_core::GrowGate`).
#[derive(Debug)]
pub(crate) struct ContainerGate;

impl GrowGate for ContainerGate {
    #[inline]
    fn refuse(&self, bytes: u64) -> Option<String> {
        let p = &PUBLISHED;
        if p.pressure() != Pressure::Hard {
            if p.note_growth(bytes) {
                // Grown fast since the last sample: sample now. Rare (once per crossing), and the
                // lock is held for a notify only, never while calling anything else.
                if let Some(w) = WAKER.lock().as_ref() {
                    w.wake();
                }
            }
            return None;
        }
        // Relaxed: a statistic.
        REFUSALS.fetch_add(1, Ordering::Relaxed);
        let hard = LEVELS
            .lock()
            .map(|t| format!(" (hard level {:.0}%)", t.hard * 100.0))
            .unwrap_or_default();
        Some(format!(
            "container memory pressure: {} of anonymous memory in use of the container's {} limit{hard}, \
             so new native memory ({} asked of Spark) is refused until usage falls",
            human(p.usage()),
            human(p.limit()),
            human(bytes)
        ))
    }
}

/// Listener reservations the gate refused, in all managers so far.
static REFUSALS: AtomicU64 = AtomicU64::new(0);

/// Listener reservations the gate refused so far (process-wide).
pub(crate) fn refusals() -> u64 {
    REFUSALS.load(Ordering::Relaxed)
}

/// The gate to give a new manager.
pub(crate) fn gate() -> Arc<dyn GrowGate> {
    static GATE: OnceLock<Arc<dyn GrowGate>> = OnceLock::new();
    GATE.get_or_init(|| Arc::new(ContainerGate)).clone()
}

/// Handles of the live managers. Its buffer is capacity: it stays at the most managers ever
/// live at once (like the handle tables' slot storage).
static MANAGERS: Mutex<Vec<i64>> = Mutex::new(Vec::new());

/// Records a new manager.
pub(crate) fn register(handle: i64) {
    MANAGERS.lock().push(handle);
}

/// Forgets a manager being destroyed.
pub(crate) fn unregister(handle: i64) {
    let mut list = MANAGERS.lock();
    if let Some(i) = list.iter().position(|&h| h == handle) {
        list.swap_remove(i);
    }
}

/// The live managers' handles now (a copy: no lock is held while the governor works on them).
pub(crate) fn managers() -> Vec<i64> {
    MANAGERS.lock().clone()
}

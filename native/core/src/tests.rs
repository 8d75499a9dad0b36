//! Scenario tests of the manager: one scenario per test, totals asserted after each step. The
//! scenarios are grouped by topic in the submodules; the fixtures they share (managers, a holding
//! spiller) are here.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::*;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 8 * MIB;

fn manager_with(listener: Arc<dyn ReservationListener>, config: MemoryConfig) -> MemoryManager {
    MemoryManager::new("task-1", config, listener).unwrap()
}

fn unlimited() -> (MemoryManager, Arc<CapacityListener>) {
    capacity(u64::MAX)
}

/// Exact accounting (reservation quantum 0, opt-in: the default is the 1 MiB quantum). The
/// tests built on it pin pools' `used` and `peak` to the byte after every step, which is their
/// point; the quantum's bounds have their own tests (`tests/quantum.rs` and the model test
/// `quantum_manager_stays_within_its_bounds`), and `MemoryConfig::default()` is pinned in
/// `the_default_is_the_recommended_quantum`.
fn exact() -> MemoryConfig {
    MemoryConfig::default().with_reservation_quantum(0)
}

fn capacity(bytes: u64) -> (MemoryManager, Arc<CapacityListener>) {
    let l = Arc::new(CapacityListener::new(bytes));
    (manager_with(l.clone(), exact()), l)
}

/// A spiller holding a reservation; `spill` frees all of it.
struct HoldingSpiller {
    res: Reservation,
    calls: AtomicU64,
}

impl HoldingSpiller {
    fn new(pool: &Pool, name: &str, bytes: u64) -> Arc<HoldingSpiller> {
        let res = pool.reservation(name);
        res.try_grow(bytes).unwrap();
        Arc::new(HoldingSpiller {
            res,
            calls: AtomicU64::new(0),
        })
    }
}

impl Spiller for HoldingSpiller {
    fn spillable_bytes(&self) -> u64 {
        self.res.size()
    }
    fn spill(&self, _target: u64) -> Result<u64> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(self.res.free())
    }
}

mod alloc;
mod arbiter;
mod close;
mod cushion;
mod gate;
mod layers;
mod listener;
mod overcommit;
mod pools;
mod proptest_model;
mod quantum;
mod spill;

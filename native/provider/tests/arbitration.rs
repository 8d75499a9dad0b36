//! Executor-wide arbitration over the registry's managers (`nativemem_provider::arbiter`): a
//! task whose grow gets a short grant from a shared budget succeeds because another task hands
//! its idle cushion back; off, it fails; cross-task spill (opt-in) makes the largest other task
//! spill for it; four tasks arbitrating at once on a refusing budget never deadlock and keep
//! the accounting exact.
//!
//! The arbiter's settings and manager list are process-wide: the tests take `SERIAL`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nativemem_core::{CapacityListener, MemoryConfig, Result as CoreResult, Spiller};
use nativemem_provider::arbiter::{self, ArbiterSettings};
use nativemem_provider::registry;

const MIB: u64 = 1 << 20;

static SERIAL: Mutex<()> = Mutex::new(());

/// Arbitration on (it is opt-in), cross-task spill off.
fn on() -> ArbiterSettings {
    ArbiterSettings {
        enabled: true,
        ..ArbiterSettings::default()
    }
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn manager(name: &str, block: u64, listener: &Arc<CapacityListener>) -> i64 {
    registry::create_manager(
        name.into(),
        // Exact accounting: the tests follow every byte each task holds and hands back.
        MemoryConfig::default()
            .with_reservation_block(block)
            .with_reservation_quantum(0),
        listener.clone(),
        Duration::from_secs(10),
    )
    .unwrap()
}

fn idle(handle: i64) -> u64 {
    registry::with_manager(handle, |m| Ok(m.idle())).unwrap()
}

/// Task A holds 32 MiB reserved and uses 1 byte; task B needs 48 MiB of a 64 MiB budget. Spark
/// (the shared listener) grants B 32 MiB: B's grow succeeds only if A hands its cushion back.
fn idle_task_and_short_task(listener: &Arc<CapacityListener>) -> (i64, i64, i64) {
    let a = manager("task A", 32 * MIB, listener);
    let b = manager("task B", 8 * MIB, listener);
    let held = registry::create_reservation(a, "op", "a-op", 1).unwrap();
    assert_eq!(
        registry::with_manager(a, |m| Ok(m.reserved())).unwrap(),
        32 * MIB
    );
    assert_eq!(idle(a), 32 * MIB - 1);
    assert_eq!(listener.reserved(), 32 * MIB);
    (a, b, held)
}

#[test]
fn a_short_grant_is_served_by_the_idle_cushion_of_another_task() {
    let _serial = serial();
    arbiter::configure(on());
    let before = arbiter::status();
    let listener = Arc::new(CapacityListener::new(64 * MIB));
    let (a, b, held) = idle_task_and_short_task(&listener);
    assert_eq!(arbiter::status().idle_bytes, 32 * MIB - 1);

    let grown = registry::create_reservation(b, "op", "b-op", 48 * MIB).unwrap();
    assert_eq!(
        registry::with_reservation(grown, |r| Ok(r.size())).unwrap(),
        48 * MIB
    );
    // A handed back what B was short (16 MiB), kept the rest and its 1 byte.
    assert_eq!(
        registry::with_manager(a, |m| Ok(m.reserved())).unwrap(),
        16 * MIB
    );
    assert_eq!(registry::with_manager(a, |m| Ok(m.used())).unwrap(), 1);
    assert_eq!(
        registry::with_manager(b, |m| Ok(m.reserved())).unwrap(),
        48 * MIB
    );
    assert_eq!(listener.reserved(), 64 * MIB);
    let stats = registry::with_manager(b, |m| Ok(m.stats())).unwrap();
    assert_eq!((stats.arbitrations, stats.arbitrated_bytes), (1, 16 * MIB));
    assert_eq!(stats.spill_count, 0);
    let after = arbiter::status();
    assert_eq!(after.reclaims - before.reclaims, 1);
    assert_eq!(after.reclaimed_bytes - before.reclaimed_bytes, 16 * MIB);
    assert_eq!(after.spills, before.spills);
    assert_eq!(after.idle_bytes, 16 * MIB - 1);

    registry::close_reservation(grown).unwrap();
    registry::close_reservation(held).unwrap();
    registry::destroy_manager(a).unwrap();
    registry::destroy_manager(b).unwrap();
    assert_eq!(listener.reserved(), 0);
}

#[test]
fn without_arbitration_the_short_task_fails_and_the_idle_cushion_stays() {
    let _serial = serial();
    arbiter::configure(ArbiterSettings {
        enabled: false,
        ..ArbiterSettings::default()
    });
    let listener = Arc::new(CapacityListener::new(64 * MIB));
    let (a, b, held) = idle_task_and_short_task(&listener);

    let err = registry::create_reservation(b, "op", "b-op", 48 * MIB).unwrap_err();
    assert!(err.to_string().contains("Failed to reserve"), "{err}");
    assert_eq!(
        registry::with_manager(a, |m| Ok(m.reserved())).unwrap(),
        32 * MIB
    );
    let stats = registry::with_manager(b, |m| Ok(m.stats())).unwrap();
    assert_eq!(stats.arbitrated_bytes, 0);

    arbiter::configure(ArbiterSettings::default());
    registry::close_reservation(held).unwrap();
    registry::destroy_manager(a).unwrap();
    registry::destroy_manager(b).unwrap();
    assert_eq!(listener.reserved(), 0);
}

/// A spiller freeing a reservation handle of the registry.
struct HandleSpiller {
    reservation: i64,
    calls: AtomicU64,
}

impl Spiller for HandleSpiller {
    fn spillable_bytes(&self) -> u64 {
        registry::with_reservation(self.reservation, |r| Ok(r.size())).unwrap_or(0)
    }
    fn spill(&self, _target: u64) -> CoreResult<u64> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(registry::with_reservation(self.reservation, |r| Ok(r.free())).unwrap_or(0))
    }
}

#[test]
fn cross_task_spill_makes_the_largest_other_task_pay_within_the_cap() {
    let _serial = serial();
    let listener = Arc::new(CapacityListener::new(64 * MIB));
    let a = manager("task A", 8 * MIB, &listener);
    let b = manager("task B", 8 * MIB, &listener);
    let used = registry::create_reservation(a, "op", "a-op", 48 * MIB).unwrap();
    let spiller = Arc::new(HandleSpiller {
        reservation: used,
        calls: AtomicU64::new(0),
    });
    let _registration = registry::with_manager(a, |m| {
        Ok(m.pool("op")?.register_spiller("a-spiller", spiller.clone()))
    })
    .unwrap();

    // Cross-task spill off (the default): A has nothing idle, so B fails and A does not spill.
    arbiter::configure(on());
    let err = registry::create_reservation(b, "op", "b-op", 32 * MIB).unwrap_err();
    assert!(err.to_string().contains("Failed to reserve"), "{err}");
    assert_eq!(spiller.calls.load(Ordering::SeqCst), 0);

    // On: A (the largest other task) spills for B, which then gets its grant.
    let before = arbiter::status();
    arbiter::configure(ArbiterSettings {
        enabled: true,
        cross_task_spill: true,
        spill_cap: 64 * MIB,
    });
    let grown = registry::create_reservation(b, "op", "b-op", 32 * MIB).unwrap();
    assert_eq!(spiller.calls.load(Ordering::SeqCst), 1);
    let after = arbiter::status();
    assert_eq!(after.spills - before.spills, 1);
    assert_eq!(after.victims - before.victims, 1);
    assert!(after.spilled_bytes - before.spilled_bytes >= 16 * MIB);

    arbiter::configure(ArbiterSettings::default());
    registry::close_reservation(grown).unwrap();
    drop(_registration);
    registry::close_reservation(used).unwrap();
    registry::destroy_manager(a).unwrap();
    registry::destroy_manager(b).unwrap();
    assert_eq!(listener.reserved(), 0);
}

/// Four tasks on a budget too small for all of them grow and free from four threads at once,
/// each arbitrating against the three others: every thread finishes (no deadlock), every grow
/// either succeeds or fails out of memory, and the budget's accounting is exact at the end.
#[test]
fn four_tasks_arbitrating_at_once_never_deadlock() {
    let _serial = serial();
    arbiter::configure(ArbiterSettings {
        enabled: true,
        cross_task_spill: true,
        spill_cap: 8 * MIB,
    });
    let listener = Arc::new(CapacityListener::new(64 * MIB));
    let handles: Vec<i64> = (0..4)
        .map(|i| manager(&format!("task {i}"), 8 * MIB, &listener))
        .collect();
    let threads: Vec<_> = handles
        .iter()
        .enumerate()
        .map(|(i, &h)| {
            std::thread::spawn(move || {
                let mut failures = 0u32;
                for round in 0..300u64 {
                    let size = (round % 5 + 1 + i as u64) * 5 * MIB;
                    match registry::create_reservation(h, "op", "op", size) {
                        Ok(r) => {
                            registry::with_reservation(r, |r| {
                                let _ = r.try_grow(MIB);
                                Ok(())
                            })
                            .unwrap();
                            registry::close_reservation(r).unwrap();
                        }
                        Err(e) => {
                            assert!(e.to_string().contains("Failed to reserve"), "{e}");
                            failures += 1;
                        }
                    }
                }
                failures
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for h in handles {
        assert_eq!(registry::with_manager(h, |m| Ok(m.used())).unwrap(), 0);
        registry::destroy_manager(h).unwrap();
    }
    assert_eq!(listener.reserved(), 0);
    arbiter::configure(ArbiterSettings::default());
}

#[test]
fn a_grow_during_a_reclaim_does_not_arbitrate() {
    let _serial = serial();
    arbiter::configure(ArbiterSettings::default());
    assert!(nativemem_core::arbitration_allowed());
    {
        let _g = nativemem_core::NoArbitration::enter();
        assert!(!nativemem_core::arbitration_allowed());
    }
    assert!(nativemem_core::arbitration_allowed());
}

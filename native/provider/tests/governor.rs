//! The container governor over the registry's managers, with a scripted container: soft pressure
//! gives idle memory back and spills the largest manager first, hard pressure makes a grow that
//! needs new memory from Spark spill or fail naming the container, a closing manager is skipped,
//! and stopping the governor lifts the refusal.
//!
//! One `#[test]`: the governor is process-wide.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nativemem_core::{CapacityListener, MemoryConfig, Result as CoreResult, Spiller};
use nativemem_governor::{ContainerView, Pressure, Probe, Source, Thresholds};
use nativemem_provider::governor::{self, Started};
use nativemem_provider::registry;

const MIB: u64 = 1 << 20;

/// An engine's trim hook through the ABI: counts its calls and its drop.
static TRIMS: AtomicU64 = AtomicU64::new(0);
static TRIM_DROPS: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" fn engine_trim(ctx: *mut std::ffi::c_void) -> u64 {
    assert_eq!(ctx as usize, 0x5eed, "the engine's ctx comes back");
    TRIMS.fetch_add(1, Ordering::SeqCst);
    4096
}

unsafe extern "C" fn engine_trim_drop(ctx: *mut std::ffi::c_void) {
    assert_eq!(ctx as usize, 0x5eed);
    TRIM_DROPS.fetch_add(1, Ordering::SeqCst);
}
const LIMIT: u64 = 1000 * MIB;

/// The container: its anonymous usage is what the test says plus what the managers use.
struct Container {
    base: AtomicU64,
    managers: std::sync::Mutex<Vec<i64>>,
}

impl Container {
    fn usage(&self) -> u64 {
        let native: u64 = self
            .managers
            .lock()
            .unwrap()
            .iter()
            .filter_map(|&h| registry::with_manager(h, |m| Ok(m.used())).ok())
            .sum();
        self.base.load(Ordering::SeqCst) + native
    }
}

struct ScriptedProbe(Arc<Container>);

impl Probe for ScriptedProbe {
    fn read(&mut self) -> std::io::Result<ContainerView> {
        Ok(ContainerView {
            source: Source::CgroupV2,
            limit: Some(LIMIT),
            limit_from: "memory.max".into(),
            usage: self.0.usage(),
            cache: 0,
            oom_kills: Some(0),
        })
    }
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

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn governor_relieves_and_gates_the_registry_managers() {
    let container = Arc::new(Container {
        base: AtomicU64::new(100 * MIB),
        managers: Default::default(),
    });
    let block = 64 * MIB;
    let mut listeners = Vec::new();
    let mut handles = Vec::new();
    for i in 0..3 {
        let l = Arc::new(CapacityListener::unlimited());
        let h = registry::create_manager(
            format!("task {i}"),
            MemoryConfig::default().with_reservation_block(block),
            l.clone(),
            Duration::from_secs(5),
        )
        .unwrap();
        listeners.push(l);
        handles.push(h);
    }
    container.managers.lock().unwrap().extend(&handles);
    // task 0 uses 300 MiB through a spillable reservation; task 1 uses 10 MiB of its 64 MiB
    // block (54 MiB idle); task 2 nothing.
    let big = registry::create_reservation(handles[0], "sort", "sorter", 300 * MIB).unwrap();
    let spiller = Arc::new(HandleSpiller {
        reservation: big,
        calls: AtomicU64::new(0),
    });
    let _registration = registry::with_manager(handles[0], |m| {
        Ok(m.pool("sort")?.register_spiller("sorter", spiller.clone()))
    })
    .unwrap();
    let small = registry::create_reservation(handles[1], "op", "op", 10 * MIB).unwrap();
    assert_eq!(listeners[1].reserved(), block);

    // An engine registers its allocator's trim hook through the table.
    // SAFETY: the provider's static table; valid function pointers and out parameters.
    let api = unsafe { &*nativemem_provider::api(nativemem_sys::NM_ABI_VERSION) };
    let mut trim_id = 0u64;
    // SAFETY: valid functions (they check their ctx), a valid out pointer.
    let st = unsafe {
        (api.trim_hook_register)(
            Some(engine_trim),
            0x5eed as *mut std::ffi::c_void,
            Some(engine_trim_drop),
            &mut trim_id,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(st, nativemem_sys::NM_OK);
    assert_eq!(governor::trim_hooks(), 1);
    // SAFETY: a null trim is refused before anything is read; the out pointer is valid.
    let refused = unsafe {
        (api.trim_hook_register)(
            None,
            std::ptr::null_mut(),
            None,
            &mut 0,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(
        refused,
        nativemem_sys::NM_ERR_INVALID_ARGUMENT,
        "no trim function"
    );

    // No pressure (410 of 1000 MiB): the governor starts, nothing happens.
    let started = governor::start_with(
        Thresholds::default(),
        Box::new(ScriptedProbe(container.clone())),
    )
    .unwrap();
    assert!(matches!(started, Started::Running(_)), "{started:?}");
    assert_eq!(
        governor::start_with(
            Thresholds::default(),
            Box::new(ScriptedProbe(container.clone()))
        )
        .unwrap(),
        Started::AlreadyRunning
    );
    wait_for("a first sample", || governor::status().stats.samples >= 1);
    assert_eq!(governor::status().pressure, Pressure::None as u8);
    assert_eq!(spiller.calls.load(Ordering::SeqCst), 0);

    // Something outside nativemem grows: 560 + 410 = 970 MiB, over hard (930). The ladder gives
    // task 1's idle block back, then spills task 0 (the largest) for what is over soft (850).
    container.base.store(560 * MIB, Ordering::SeqCst);
    wait_for("the spill", || spiller.calls.load(Ordering::SeqCst) >= 1);
    wait_for("relief recorded", || {
        governor::status().stats.spill_bytes > 0
    });
    let status = governor::status();
    assert!(
        status.stats.give_backs >= 1 && status.stats.spills >= 1,
        "{status:?}"
    );
    assert_eq!(
        listeners[1].reserved(),
        10 * MIB,
        "task 1's idle 54 MiB went back to Spark"
    );
    assert!(status.stats.give_back_bytes >= 54 * MIB, "{status:?}");
    assert!(
        TRIMS.load(Ordering::SeqCst) >= 2,
        "the engine's trim ran (after the trim step and the spill)"
    );
    assert!(status.stats.trim_bytes >= 2 * 4096, "{status:?}");
    assert_eq!(TRIM_DROPS.load(Ordering::SeqCst), 0);
    assert_eq!(
        registry::with_manager(handles[0], |m| Ok(m.used())).unwrap(),
        0
    );
    assert!(
        listeners[0].reserved() <= block,
        "the spilled memory went back to Spark (a block may stay as cushion): {}",
        listeners[0].reserved()
    );
    wait_for("pressure back to none", || {
        governor::status().pressure == Pressure::None as u8
    });

    // Hard pressure that the ladder cannot relieve (nothing left to spill): grows that need new
    // memory from Spark are refused with the container's figures; the cushion still serves.
    // Task 1 grows while usage is low: a new block from Spark (60 of 64 MiB used).
    registry::with_reservation(small, |r| Ok(r.try_grow(50 * MIB)?)).unwrap();
    assert_eq!(listeners[1].reserved(), 10 * MIB + block);
    container.base.store(950 * MIB, Ordering::SeqCst);
    wait_for("hard pressure", || {
        governor::status().pressure == Pressure::Hard as u8
    });
    let err = registry::with_reservation(small, |r| Ok(r.try_grow(10 * MIB)?)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("container memory pressure"), "{text}");
    assert!(
        text.contains("of the container's 1000.0 MiB limit (hard level 93%)"),
        "{text}"
    );
    assert_eq!(
        listeners[1].reserved(),
        60 * MIB,
        "the idle 14 MiB went back; Spark was not asked again"
    );
    assert!(governor::status().gate_refusals >= 1);
    // Forced charges are never refused.
    registry::with_reservation(small, |r| Ok(r.force_grow(10 * MIB)?)).unwrap();
    let forensics = governor::forensics().unwrap();
    assert!(forensics.contains("pressure hard"), "{forensics}");
    assert!(forensics.contains("task 1"), "the usage trees: {forensics}");

    // A closed manager is no longer acted on; closing one under pressure works.
    registry::close_reservation(small).unwrap();
    registry::destroy_manager(handles[1]).unwrap();
    container
        .managers
        .lock()
        .unwrap()
        .retain(|&h| h != handles[1]);

    // The engine unregisters its hook: its drop runs (no call in flight), a second time is refused.
    // SAFETY: the id registered above.
    let st = unsafe { (api.trim_hook_unregister)(trim_id, std::ptr::null_mut()) };
    assert_eq!(st, nativemem_sys::NM_OK);
    assert_eq!(TRIM_DROPS.load(Ordering::SeqCst), 1);
    assert_eq!(governor::trim_hooks(), 0);
    // SAFETY: an id no longer registered: refused, nothing is called.
    let again = unsafe { (api.trim_hook_unregister)(trim_id, std::ptr::null_mut()) };
    assert_eq!(again, nativemem_sys::NM_ERR_INVALID_HANDLE);

    // Stopped: no refusal any more.
    governor::stop();
    assert_eq!(governor::status().pressure, Pressure::None as u8);
    assert!(!governor::status().running);
    let again = registry::create_reservation(handles[2], "op", "op", 100 * MIB).unwrap();
    registry::close_reservation(again).unwrap();
    registry::close_reservation(big).unwrap();
    for h in [handles[0], handles[2]] {
        registry::destroy_manager(h).unwrap();
    }
    assert_eq!(registry::live_managers(), 0);
}

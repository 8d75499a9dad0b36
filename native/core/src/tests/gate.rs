//! The grow gate: a refusal is a listener granting nothing, with the gate's reason; reserved
//! memory is still used freely, spillers spill for the rest, and forced charges pass.

use super::*;

/// A gate that refuses while `on`, counting what it was asked.
#[derive(Default)]
struct Switch {
    on: AtomicBool,
    asked: AtomicU64,
}

impl GrowGate for Switch {
    fn refuse(&self, bytes: u64) -> Option<String> {
        self.asked.fetch_add(bytes, Ordering::SeqCst);
        self.on
            .load(Ordering::SeqCst)
            .then(|| "container memory pressure: 95 of 100 anonymous".to_string())
    }
}

fn gated() -> (MemoryManager, Arc<CapacityListener>, Arc<Switch>) {
    let l = Arc::new(CapacityListener::unlimited());
    let gate = Arc::new(Switch::default());
    let m = MemoryManager::with_gate(
        "task-1",
        exact(),
        l.clone(),
        Some(gate.clone() as Arc<dyn GrowGate>),
    )
    .unwrap();
    (m, l, gate)
}

#[test]
fn an_open_gate_changes_nothing() {
    let (m, l, gate) = gated();
    let r = m.root().reservation("op");
    r.try_grow(3 * MIB).unwrap();
    assert_eq!(l.reserved(), BLOCK);
    assert_eq!(
        gate.asked.load(Ordering::SeqCst),
        3 * MIB,
        "consulted once, with the deficit"
    );
    // Served from the cushion: the gate is not consulted again.
    r.try_grow(MIB).unwrap();
    assert_eq!(gate.asked.load(Ordering::SeqCst), 3 * MIB);
    assert_eq!(m.stats().gate_refusals, 0);
}

#[test]
fn a_closed_gate_refuses_new_memory_but_not_the_cushion() {
    let (m, l, gate) = gated();
    let r = m.root().reservation("op");
    r.try_grow(MIB).unwrap();
    gate.on.store(true, Ordering::SeqCst);
    // The block already reserved still serves grows.
    r.try_grow(6 * MIB).unwrap();
    assert_eq!(m.used(), 7 * MIB);
    // Beyond it: the listener is not asked, nothing is charged, the error says why.
    let calls = l.reserve_calls();
    let err = r.try_grow(2 * MIB).unwrap_err();
    assert_eq!(l.reserve_calls(), calls, "the listener is not asked");
    assert_eq!(m.used(), 7 * MIB, "nothing charged");
    assert_eq!(m.reserved(), BLOCK);
    let MemoryError::OutOfMemory(oom) = &err else {
        panic!("{err}")
    };
    assert!(matches!(&oom.reason, OomReason::Gate { reason } if reason.contains("95 of 100")));
    let text = err.to_string();
    assert!(
        text.contains("container memory pressure: 95 of 100 anonymous, even after spilling"),
        "{text}"
    );
    assert!(
        text.contains("Native memory of 'task-1'"),
        "the usage report follows: {text}"
    );
    assert_eq!(m.stats().gate_refusals, 1);

    // Forced charges never consult the gate.
    let asked = gate.asked.load(Ordering::SeqCst);
    r.force_grow(4 * MIB).unwrap();
    assert_eq!(gate.asked.load(Ordering::SeqCst), asked);
    r.free();
    gate.on.store(false, Ordering::SeqCst);
    r.try_grow(20 * MIB).unwrap();
    assert!(l.reserved() >= 20 * MIB);
}

#[test]
fn a_refused_grow_spills_and_uses_what_the_spill_freed() {
    let (m, l, gate) = gated();
    let spiller = HoldingSpiller::new(&m.pool("sort").unwrap(), "sorter", 2 * BLOCK);
    let _reg = m
        .pool("sort")
        .unwrap()
        .register_spiller("sorter", spiller.clone());
    assert_eq!(l.reserved(), 2 * BLOCK);
    gate.on.store(true, Ordering::SeqCst);
    let join = m.pool("join").unwrap().reservation("hash");
    join.try_grow(BLOCK).unwrap();
    assert_eq!(
        spiller.calls.load(Ordering::SeqCst),
        1,
        "the sorter spilled for the join"
    );
    assert_eq!(join.size(), BLOCK);
    assert!(
        l.reserved() <= 2 * BLOCK,
        "no new memory from Spark: {}",
        l.reserved()
    );
    assert_eq!(m.stats().gate_refusals, 1);
}

//! The module layers: imports point one way.

/// The module layers, lowest first (see "Modules, in layers" in the crate docs), checked by
/// `nativemem_testkit::layers::check`: a module may name, in code, only `crate::<m>` for a module
/// `m` listed before it.
const LAYERS: [(&str, &str); 14] = [
    ("units", include_str!("../units.rs")),
    ("sync", include_str!("../sync.rs")),
    ("barrier", include_str!("../barrier.rs")),
    ("report", include_str!("../report.rs")),
    ("error", include_str!("../error.rs")),
    ("config", include_str!("../config.rs")),
    ("listener", include_str!("../listener.rs")),
    ("tree", include_str!("../tree.rs")),
    ("heap", include_str!("../heap.rs")),
    ("spill", include_str!("../spill.rs")),
    (
        "budget",
        concat!(
            include_str!("../budget/mod.rs"),
            include_str!("../budget/allocations.rs"),
            include_str!("../budget/close.rs"),
            include_str!("../budget/give_back.rs"),
            include_str!("../budget/grow.rs"),
            include_str!("../budget/overcommit.rs"),
            include_str!("../budget/reclaim.rs"),
            include_str!("../budget/report.rs"),
            include_str!("../budget/slack.rs"),
        ),
    ),
    ("reservation", include_str!("../reservation.rs")),
    ("pool", include_str!("../pool.rs")),
    ("manager", include_str!("../manager.rs")),
];

#[test]
fn module_imports_point_one_way() {
    nativemem_testkit::layers::assert_one_way(include_str!("../lib.rs"), &LAYERS);
}

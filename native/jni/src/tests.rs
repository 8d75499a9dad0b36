//! The module layers: imports point one way (see "Modules, in layers" in the crate docs).

const LAYERS: [(&str, &str); 10] = [
    ("error", include_str!("error.rs")),
    ("vm", include_str!("vm.rs")),
    ("exception", include_str!("exception.rs")),
    ("listener", include_str!("listener.rs")),
    ("guard", include_str!("guard.rs")),
    ("exports", include_str!("exports.rs")),
    ("container", include_str!("container.rs")),
    ("arbiter", include_str!("arbiter.rs")),
    ("bench", include_str!("bench.rs")),
    ("testing", include_str!("testing.rs")),
];

#[test]
fn module_imports_point_one_way() {
    nativemem_testkit::layers::assert_one_way(include_str!("lib.rs"), &LAYERS);
}

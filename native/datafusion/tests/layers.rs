//! The crate's layers: imports point one way (`backend` ← `pool`).

const LAYERS: [(&str, &str); 2] = [
    ("backend", include_str!("../src/backend.rs")),
    ("pool", include_str!("../src/pool.rs")),
];

#[test]
fn module_imports_point_one_way() {
    nativemem_testkit::layers::assert_one_way(include_str!("../src/lib.rs"), &LAYERS);
}

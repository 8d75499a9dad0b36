//! The client's layers: imports point one way (see "Modules, in layers" in the crate docs).

const LAYERS: [(&str, &str); 7] = [
    ("error", include_str!("../src/error.rs")),
    ("api", include_str!("../src/api.rs")),
    ("spill", include_str!("../src/spill.rs")),
    ("pool", include_str!("../src/pool.rs")),
    ("lease", include_str!("../src/lease.rs")),
    ("task_pool", include_str!("../src/task_pool.rs")),
    ("java", include_str!("../src/java.rs")),
];

#[test]
fn module_imports_point_one_way() {
    nativemem_testkit::layers::assert_one_way(include_str!("../src/lib.rs"), &LAYERS);
}

//! The crate's layers: imports point one way (`account` ← `alloc` ← `tracker`).

const LAYERS: [(&str, &str); 3] = [
    ("account", include_str!("../src/account.rs")),
    ("alloc", include_str!("../src/alloc.rs")),
    ("tracker", include_str!("../src/tracker.rs")),
];

#[test]
fn module_imports_point_one_way() {
    nativemem_testkit::layers::assert_one_way(include_str!("../src/lib.rs"), &LAYERS);
}

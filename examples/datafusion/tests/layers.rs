//! The example's layers: imports point one way (`per_call`, `query` ← `java`).

const LAYERS: [(&str, &str); 3] = [
    ("per_call", include_str!("../src/per_call.rs")),
    ("query", include_str!("../src/query.rs")),
    ("java", include_str!("../src/java.rs")),
];

#[test]
fn module_imports_point_one_way() {
    nativemem_testkit::layers::assert_one_way(include_str!("../src/lib.rs"), &LAYERS);
}

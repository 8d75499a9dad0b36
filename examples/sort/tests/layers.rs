//! The example's layers: imports point one way (`error` ← `chunk`, `merge`, `run` ← `sort` ← `testing` ← `java`).

const LAYERS: [(&str, &str); 7] = [
    ("error", include_str!("../src/error.rs")),
    ("chunk", include_str!("../src/chunk.rs")),
    ("merge", include_str!("../src/merge.rs")),
    ("run", include_str!("../src/run.rs")),
    ("sort", include_str!("../src/sort.rs")),
    ("testing", include_str!("../src/testing.rs")),
    ("java", include_str!("../src/java.rs")),
];

#[test]
fn module_imports_point_one_way() {
    nativemem_testkit::layers::assert_one_way(include_str!("../src/lib.rs"), &LAYERS);
}

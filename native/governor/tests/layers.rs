//! The governor's layers: imports point one way (`cgroup` ← `view` ← `levels` ← `governor`, see
//! "Modules, in layers" in the crate docs).

const LAYERS: [(&str, &str); 4] = [
    ("cgroup", include_str!("../src/cgroup.rs")),
    ("view", include_str!("../src/view.rs")),
    ("levels", include_str!("../src/levels.rs")),
    ("governor", include_str!("../src/governor.rs")),
];

#[test]
fn module_imports_point_one_way() {
    let violations = nativemem_testkit::layers::check(include_str!("../src/lib.rs"), &LAYERS);
    assert!(
        violations.is_empty(),
        "imports must point one way:\n{}",
        violations.join("\n")
    );
}

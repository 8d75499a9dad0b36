//! The provider's layers: imports point one way (`error` ← `container` ← `arbiter` ← `registry` ← `governor` ← `abi`, see "Modules, in
//! layers" in the crate docs), and nothing here imports `jni` (the Java layer is
//! `nativemem-jni`, built on this crate, never the reverse).

const LAYERS: [(&str, &str); 6] = [
    ("error", include_str!("../src/error.rs")),
    ("container", include_str!("../src/container.rs")),
    ("arbiter", include_str!("../src/arbiter.rs")),
    ("registry", include_str!("../src/registry.rs")),
    ("governor", include_str!("../src/governor.rs")),
    ("abi", include_str!("../src/abi.rs")),
];

#[test]
fn module_imports_point_one_way() {
    nativemem_testkit::layers::assert_one_way(include_str!("../src/lib.rs"), &LAYERS);
}

#[test]
fn nothing_imports_jni() {
    let sources = LAYERS
        .iter()
        .copied()
        .chain([("lib", include_str!("../src/lib.rs"))]);
    for (module, source) in sources {
        for (n, line) in source.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            assert!(
                !code.contains("jni::") && !code.contains("jni_sys"),
                "{module}.rs:{}: the provider must not use the jni crate: {line}",
                n + 1
            );
        }
    }
    let manifest = include_str!("../Cargo.toml");
    assert!(
        !manifest.lines().any(|l| l.trim_start().starts_with("jni")),
        "the provider must not depend on the jni crate"
    );
}

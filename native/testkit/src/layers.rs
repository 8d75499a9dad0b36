//! The check behind each crate's "imports point one way" test: a crate lists its modules lowest
//! first, and a module may name, in code, only `crate::<m>` for a module `m` listed before it.
//! Naming the crate root's re-exports in code (`crate::Error`) is refused too, since it would
//! hide an upward import; so is a grouped `crate::{…}` (one path per module). Comments and doc
//! links are not imports and are skipped. With that, the crate has no import cycle.
//!
//! ```ignore
//! const LAYERS: [(&str, &str); 2] = [
//!     ("error", include_str!("../src/error.rs")),
//!     ("registry", include_str!("../src/registry.rs")),
//! ];
//! nativemem_testkit::layers::assert_one_way(include_str!("../src/lib.rs"), &LAYERS);
//! ```

/// Every `crate::<name>` path in the code (not comments) of `source`, with its line number.
pub fn crate_paths(source: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in source.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let code = code.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = if after.starts_with('{') {
                "{…}".to_string() // a grouped import: refused, write one path per module
            } else {
                after
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect()
            };
            out.push((n + 1, name));
            rest = after;
        }
    }
    out
}

/// The violations of the layer order `layers` (`(module, source)`, lowest first) by the crate
/// whose root is `lib_rs`: every `mod x;` of the root (but `tests`) must be listed, and every
/// `crate::` path of a module must name a module listed before it. Empty if the crate keeps to it.
pub fn check(lib_rs: &str, layers: &[(&str, &str)]) -> Vec<String> {
    let names: Vec<&str> = layers.iter().map(|(name, _)| *name).collect();
    let mut violations = Vec::new();
    for line in lib_rs.lines() {
        let line = line.trim_start().trim_start_matches("pub ");
        if let Some(module) = line.strip_prefix("mod ").and_then(|m| m.strip_suffix(';')) {
            if module != "tests" && !names.contains(&module) {
                violations.push(format!(
                    "module `{module}` is not in the layers: place it in the layer order"
                ));
            }
        }
    }
    for (at, (module, source)) in layers.iter().enumerate() {
        for (line, name) in crate_paths(source) {
            match names.iter().position(|n| *n == name) {
                Some(below) if below < at => {}
                Some(_) => violations.push(format!(
                    "{module}.rs:{line}: `crate::{name}` is not below `{module}`"
                )),
                None => violations.push(format!(
                    "{module}.rs:{line}: `crate::{name}` is not a lower module (import from the \
                     defining module, one path per module)"
                )),
            }
        }
    }
    violations
}

/// The test each crate runs: panics listing every violation of [`check`].
pub fn assert_one_way(lib_rs: &str, layers: &[(&str, &str)]) {
    let violations = check(lib_rs, layers);
    assert!(
        violations.is_empty(),
        "imports must point one way:\n{}",
        violations.join("\n")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upward_import_and_an_unlisted_module_are_violations() {
        let lib = "mod low;\npub mod high;\nmod stray;\n#[cfg(test)]\nmod tests;\n";
        let low = "use crate::high::Thing; // up\n// crate::high in a comment is fine\n";
        let high = "use crate::low::Other;\nuse crate::{low, high};\n";
        let v = check(lib, &[("low", low), ("high", high)]);
        assert_eq!(
            v,
            [
                "module `stray` is not in the layers: place it in the layer order",
                "low.rs:1: `crate::high` is not below `low`",
                "high.rs:2: `crate::{…}` is not a lower module (import from the defining module, \
                 one path per module)",
            ]
        );
    }
}

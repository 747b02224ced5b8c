//! The layering rules of docs/ARCHITECTURE.md, checked on the sources so that they cannot rot:
//! crates depend one way (each on crates of a lower layer), no module of a crate imports one
//! that imports it back, only binary crates use clap, only `cairn-libvirt` reads domain XML,
//! and no control-plane function runs past ~120 lines without saying why.
//!
//! The checks read rustfmt-formatted sources line by line (CI checks the formatting), which is
//! all they need: `crate::` paths for imports, a closing brace at the `fn`'s indentation for
//! the end of a function.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Each crate's layer: a crate may depend only on crates of a lower layer. The picture in
/// docs/ARCHITECTURE.md, "Crates".
const LAYERS: &[(&str, u32)] = &[
    ("cairn-storage", 0),
    ("cairn-nbd", 0),
    ("cairn-hypervisor", 0),
    ("cairn-schedule", 0),
    // The guest agent's wire format, for both ends (issue 16).
    ("cairn-agent-proto", 0),
    ("cairn-repo", 1),
    ("cairn-libvirt", 1),
    ("cairn-engine", 2),
    ("cairn-disk", 3),
    ("cairn-vm", 4),
    ("cairn-ops", 5),
    // The director: an interface over the operations, which the CLI serves (`cairn server`).
    ("cairn-director", 6),
    // Interfaces and developer tools: nothing depends on them.
    ("cairn-cli", 7),
    ("cairn-torture", 7),
    ("cairn-bench", 7),
    // The guest agent: a binary of its own, for the guest, over the wire format only.
    ("cairn-agent", 7),
];

/// The control plane, where a long function needs a reason (the "~120 lines").
const CONTROL_PLANE: &[&str] =
    &["cairn-cli", "cairn-ops", "cairn-vm", "cairn-hypervisor", "cairn-libvirt", "cairn-director", "cairn-schedule"];
const LONG_FUNCTION: usize = 120;
/// What a long function's reason starts with, in a comment just above it.
const LONG_REASON: &str = "// Long on purpose:";

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn crates() -> Vec<(String, PathBuf)> {
    let mut out: Vec<_> = fs::read_dir(crates_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("Cargo.toml").is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), p))
        .collect();
    out.sort();
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The names in the `[dependencies]` tables of a Cargo.toml (also `[dependencies.NAME]` and
/// `[target.'cfg(..)'.dependencies]`; not dev- or build-dependencies).
fn dependencies(manifest: &str) -> Vec<String> {
    let mut in_deps = false;
    let mut out = Vec::new();
    for line in manifest.lines() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[') {
            let header = header.trim_end_matches(']');
            in_deps = header == "dependencies" || (header.starts_with("target.") && header.ends_with(".dependencies"));
            if let Some(name) = header.strip_prefix("dependencies.") {
                out.push(name.to_string());
            }
        } else if in_deps && !line.is_empty() && !line.starts_with('#') {
            if let Some(name) = line.split(['=', '.', ' ']).next() {
                out.push(name.to_string());
            }
        }
    }
    out
}

/// A source without its `#[cfg(test)]` tail (tests may reach anywhere).
fn without_tests(source: &str) -> &str {
    match source.find("#[cfg(test)]\nmod ") {
        Some(at) => &source[..at],
        None => source,
    }
}

/// A source without its comments and its tests. A `//` after an odd number of quotes is in a
/// string (`"s3://..."`), not a comment.
fn code_of(source: &str) -> String {
    let strip = |line: &str| -> String {
        match line.match_indices("//").find(|(at, _)| line[..*at].matches('"').count() % 2 == 0) {
            Some((at, _)) => line[..at].to_string(),
            None => line.to_string(),
        }
    };
    without_tests(source).lines().map(strip).collect::<Vec<_>>().join("\n")
}

/// What the crate root re-exports (`pub use module::{A, B};`): item name -> module, so that
/// `use crate::{A, B}` counts as an import of that module.
fn reexports(root: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in code_of(root).lines() {
        let Some(rest) = line.trim().strip_prefix("pub use ") else { continue };
        let Some((module, items)) = rest.split_once("::") else { continue };
        if module == "crate" || module.contains(' ') {
            continue;
        }
        for item in items.trim_matches(|c| c == '{' || c == '}' || c == ';').split(',') {
            let name = item.split(" as ").last().unwrap_or(item).trim();
            if !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                out.insert(name.to_string(), module.to_string());
            }
        }
    }
    out
}

/// The top-level modules a source names through `crate::...` (also inside `crate::{a, b::c}`).
fn modules_named(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Only the first segment of each item: `a` and `c` in `{a::b, c::{D, E}}`.
            let mut depth = 0;
            let mut item_start = true;
            let mut word = String::new();
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        if !word.is_empty() {
                            out.insert(std::mem::take(&mut word));
                        }
                        item_start = true;
                        continue;
                    }
                    _ => {}
                }
                if item_start && (ch.is_alphanumeric() || ch == '_') {
                    word.push(ch);
                } else if item_start && !word.is_empty() {
                    out.insert(std::mem::take(&mut word));
                    item_start = false;
                }
            }
            if !word.is_empty() {
                out.insert(word);
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// The crate's top-level modules and which of them each one imports.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let root = ["lib.rs", "main.rs"].iter().find_map(|r| fs::read_to_string(src.join(r)).ok()).unwrap_or_default();
    let reexported = reexports(&root);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let rel = file.strip_prefix(src).unwrap();
        let top = rel.components().next().unwrap().as_os_str().to_string_lossy();
        let top = top.trim_end_matches(".rs").to_string();
        if top == "lib" || top == "main" || top == "bin" {
            continue;
        }
        let names = modules_named(&code_of(&fs::read_to_string(file).unwrap()));
        let modules = names.into_iter().map(|n| reexported.get(&n).cloned().unwrap_or(n));
        graph.entry(top.clone()).or_default().extend(modules.filter(|n| *n != top));
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for edges in graph.values_mut() {
        edges.retain(|m| modules.contains(m));
    }
    graph
}

/// A cycle through `start`, if there is one (depth-first search back to it).
fn cycle_through(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in &graph[at] {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, start, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(graph, start, start, &mut path, &mut BTreeSet::new()).then(|| {
        path.push(start.to_string());
        path
    })
}

#[test]
fn crates_depend_one_way_down_the_layers() {
    let layer: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let mut wrong = Vec::new();
    for (name, dir) in crates() {
        let Some(&own) = layer.get(name.as_str()) else {
            wrong.push(format!("{name} has no layer in this test's LAYERS (nor in ARCHITECTURE.md?)"));
            continue;
        };
        for dep in dependencies(&fs::read_to_string(dir.join("Cargo.toml")).unwrap()) {
            if let Some(&theirs) = layer.get(dep.as_str()) {
                if theirs >= own {
                    wrong.push(format!("{name} (layer {own}) depends on {dep} (layer {theirs})"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "dependencies against the layers:\n{}", wrong.join("\n"));
}

#[test]
fn only_the_command_line_names_the_libvirt_implementation() {
    let users: Vec<String> = crates()
        .into_iter()
        .filter(|(_, dir)| {
            dependencies(&fs::read_to_string(dir.join("Cargo.toml")).unwrap()).contains(&"cairn-libvirt".into())
        })
        .map(|(name, _)| name)
        .collect();
    assert_eq!(users, ["cairn-cli"], "crates that name cairn-libvirt: the CLI picks the implementation, nothing else");
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let mut cycles = Vec::new();
    for (name, dir) in crates() {
        let graph = module_graph(&dir.join("src"));
        if let Some(cycle) = graph.keys().find_map(|m| cycle_through(&graph, m)) {
            cycles.push(format!("{name}: {}", cycle.join(" -> ")));
        }
    }
    assert!(cycles.is_empty(), "import cycles between modules:\n{}", cycles.join("\n"));
}

#[test]
fn only_binary_crates_use_clap() {
    let mut wrong = Vec::new();
    for (name, dir) in crates() {
        let uses_clap = dependencies(&fs::read_to_string(dir.join("Cargo.toml")).unwrap()).contains(&"clap".into());
        if uses_clap && dir.join("src/lib.rs").exists() {
            wrong.push(name);
        }
    }
    assert!(wrong.is_empty(), "libraries that depend on clap (argument parsing belongs to interfaces): {wrong:?}");
}

#[test]
fn only_the_libvirt_implementation_reads_domain_xml() {
    let mut wrong = Vec::new();
    for (name, dir) in crates() {
        if name == "cairn-libvirt" {
            continue;
        }
        let deps = dependencies(&fs::read_to_string(dir.join("Cargo.toml")).unwrap());
        for xml in ["roxmltree", "xmltree"] {
            if deps.contains(&xml.to_string()) {
                wrong.push(format!("{name} depends on {xml}"));
            }
        }
        let mut files = Vec::new();
        rust_files(&dir.join("src"), &mut files);
        for file in files {
            let code = code_of(&fs::read_to_string(&file).unwrap());
            for needle in ["<domain", "<devices>", "<disk type"] {
                if code.contains(needle) {
                    wrong.push(format!("{} holds {needle}", file.display()));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "domain XML outside cairn-libvirt:\n{}", wrong.join("\n"));
}

/// Functions of `source` longer than [`LONG_FUNCTION`] lines with no reason above them:
/// (name, first line, lines). Tests are exempt.
fn long_functions_without_reason(source: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = without_tests(source).lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let Some(signature) = function_signature(trimmed) else { continue };
        if trimmed.ends_with('}') {
            continue; // a one-line function
        }
        // The signature may wrap; the body starts at the first line ending in `{`, and a
        // declaration without a body (in a trait) ends in `;` first.
        let Some(open) = (i..lines.len()).find(|&j| lines[j].ends_with('{') || lines[j].ends_with(';')) else {
            continue;
        };
        if lines[open].ends_with(';') {
            continue;
        }
        let close = (open + 1..lines.len()).find(|&j| lines[j] == format!("{indent}}}"));
        let Some(close) = close else { continue };
        let length = close - i + 1;
        if length <= LONG_FUNCTION {
            continue;
        }
        // Above the signature: attributes, doc comments and comments; one of them the reason.
        let above: Vec<&str> = lines[..i]
            .iter()
            .rev()
            .map(|l| l.trim_start())
            .take_while(|l| l.starts_with("//") || l.starts_with("#["))
            .collect();
        let is_test = above.iter().any(|l| l.starts_with("#[test]"));
        let has_reason = above.iter().any(|l| l.starts_with(LONG_REASON));
        if !is_test && !has_reason {
            let name = signature.split(['(', '<']).next().unwrap_or(signature).to_string();
            out.push((name, i + 1, length));
        }
    }
    out
}

#[test]
fn control_plane_functions_are_short_or_say_why() {
    let mut wrong = Vec::new();
    for (name, dir) in crates() {
        if !CONTROL_PLANE.contains(&name.as_str()) {
            continue;
        }
        let mut files = Vec::new();
        rust_files(&dir.join("src"), &mut files);
        for file in files {
            for (function, line, length) in long_functions_without_reason(&fs::read_to_string(&file).unwrap()) {
                wrong.push(format!("{}:{line}: {function} is {length} lines", file.display()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "functions over {LONG_FUNCTION} lines without a `{LONG_REASON}` comment above them:\n{}",
        wrong.join("\n")
    );
}

/// `line`'s function name and what follows, if it starts a function (any visibility and
/// qualifiers: `pub(crate) const unsafe fn`, `pub(in crate::x) async fn`, `extern "C" fn`).
fn function_signature(line: &str) -> Option<&str> {
    let mut rest = line;
    if let Some(r) = rest.strip_prefix("pub") {
        rest = match r.strip_prefix('(') {
            Some(r) => r.split_once(')')?.1,
            None => r,
        }
        .trim_start();
    }
    loop {
        let before = rest;
        for qualifier in ["const ", "async ", "unsafe ", "extern \"C\" ", "default "] {
            rest = rest.strip_prefix(qualifier).unwrap_or(rest);
        }
        if rest == before {
            break;
        }
    }
    rest.strip_prefix("fn ")
}

// The checks above must be able to fail: each finds what it looks for in a made-up case.

#[test]
fn the_import_check_sees_grouped_and_plain_paths() {
    let code = code_of("use crate::{a::X, b, c::{D, E}};\nfn f() { crate::d::g(); } // crate::e\n");
    assert_eq!(modules_named(&code), ["a", "b", "c", "d"].map(String::from).into());
    let graph: BTreeMap<String, BTreeSet<String>> =
        [("a", ["b"]), ("b", ["c"]), ("c", ["a"])].map(|(m, e)| (m.into(), e.map(String::from).into())).into();
    assert_eq!(cycle_through(&graph, "a").unwrap(), ["a", "b", "c", "a"]);
}

#[test]
fn the_length_check_sees_a_long_function_and_its_reason() {
    let body = "    let x = 1;\n".repeat(LONG_FUNCTION);
    let long = format!("/// Docs.\npub fn big(\n    a: u8,\n) -> u8 {{\n{body}}}\n");
    assert_eq!(long_functions_without_reason(&long), [("big".to_string(), 2, LONG_FUNCTION + 4)]);
    let reasoned = format!("{LONG_REASON} a table.\n{long}");
    assert!(long_functions_without_reason(&reasoned).is_empty());
    let short = "fn small() {\n    let x = 1;\n}\n";
    assert!(long_functions_without_reason(short).is_empty());
    let qualified = long.replace("pub fn big(", "pub(crate) const unsafe fn big(");
    assert_eq!(long_functions_without_reason(&qualified).len(), 1, "a qualified function was not seen");
    let one_liner_first = format!("fn tiny() -> u8 {{ 1 }}\n{long}");
    assert_eq!(long_functions_without_reason(&one_liner_first)[0].0, "big");
    let in_tests = format!("fn a() {{}}\n#[cfg(test)]\nmod tests {{\n{long}}}\n");
    assert!(long_functions_without_reason(&in_tests).is_empty(), "test helpers are exempt");
}

#[test]
fn the_comment_and_reexport_reading_sees_through_strings_and_the_crate_root() {
    assert_eq!(
        code_of("let u = \"s3://b\"; crate::object::x(); // crate::gone"),
        "let u = \"s3://b\"; crate::object::x(); "
    );
    let root = "pub use repo::{Repository, PointList};\npub use id::BlockId as Id;\npub mod x;\n";
    let map = reexports(root);
    assert_eq!(map.get("Repository").map(String::as_str), Some("repo"));
    assert_eq!(map.get("Id").map(String::as_str), Some("id"));
    let deps = dependencies("[dependencies]\na = 1\n[dependencies.b]\nversion = \"1\"\n[target.'cfg(unix)'.dependencies]\nc = 1\n[dev-dependencies]\nd = 1\n");
    assert_eq!(deps, ["a", "b", "c"]);
}

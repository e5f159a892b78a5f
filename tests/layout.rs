//! The layout holds mechanically: no import circle between the sidecar's
//! files, every arrow down the layers `src/lib.rs` lists, no source file
//! over 700 lines. Every `crate::` path in a file's code (comments and its test
//! module left out) is an arrow to the file that defines it; a circle of
//! arrows between files that are not each other's ancestors fails the test,
//! naming the files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The module path of every source file under `src` (`keys::demand`), with
/// its code.
fn modules(root: &Path) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let relative = path
                .strip_prefix(root)
                .expect("under src")
                .with_extension("");
            let mut parts: Vec<String> = relative
                .iter()
                .map(|part| part.to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            let text = std::fs::read_to_string(&path).expect("read file");
            found.insert(parts.join("::"), code_of(&text));
        }
    }
    found
}

/// A file's code: before its test module, without comment lines.
fn code_of(text: &str) -> String {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    code.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The arrows between files: `crate::a::b::item` points at the longest
/// module prefix that is a file, unless one file is the other's ancestor.
fn arrows(modules: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, code) in modules {
        for (at, _) in code.match_indices("crate::") {
            let path: String = code[at + 7..]
                .chars()
                .take_while(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == ':'
                })
                .collect();
            let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
            let target = (1..=parts.len())
                .rev()
                .map(|n| parts[..n].join("::"))
                .find(|candidate| modules.contains_key(candidate));
            if let Some(target) = target {
                let related = name == &target
                    || name.starts_with(&format!("{target}::"))
                    || target.starts_with(&format!("{name}::"))
                    || name.is_empty();
                if !related {
                    graph.entry(name.clone()).or_default().insert(target);
                }
            }
        }
    }
    graph
}

/// A circle of arrows, if there is one (depth-first search).
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut found = path[start..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_import_circle_between_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&root);
    assert!(
        modules.contains_key("keys::demand"),
        "the walk found the files"
    );
    let graph = arrows(&modules);
    assert!(
        graph.values().map(BTreeSet::len).sum::<usize>() > 100,
        "the arrows were read"
    );
    if let Some(found) = circle(&graph) {
        panic!("an import circle between files: {}", found.join(" → "));
    }
}

#[test]
fn the_check_finds_a_circle_when_there_is_one() {
    let files = [
        ("a", "use crate::b::Thing;"),
        (
            "b",
            "// crate::c in a comment is no arrow\nuse crate::c::Other;",
        ),
        ("c", "fn f() { crate::a::g(); }"),
        ("d", "use crate::a;"),
    ];
    let modules: BTreeMap<String, String> = files
        .iter()
        .map(|(name, text)| ((*name).to_owned(), code_of(text)))
        .collect();
    let graph = arrows(&modules);
    assert_eq!(circle(&graph).expect("a circle").len(), 4);
    let broken: BTreeMap<String, String> = files
        .iter()
        .map(|(name, text)| {
            (
                (*name).to_owned(),
                code_of(&text.replace("crate::a::g", "g")),
            )
        })
        .collect();
    assert_eq!(circle(&arrows(&broken)), None);
}

/// The layers `src/lib.rs` lists under "# Layout", top first: each
/// top-level module's rank (modules named in one bullet share it).
fn layers(lib: &str) -> BTreeMap<String, usize> {
    let layout = lib
        .split("//! # Layout")
        .nth(1)
        .expect("src/lib.rs has a Layout section");
    let mut ranks = BTreeMap::new();
    for (rank, bullet) in layout
        .lines()
        .skip(1)
        .take_while(|line| line.starts_with("//!"))
        .filter(|line| line.starts_with("//! - "))
        .enumerate()
    {
        let head = bullet.split(':').next().unwrap_or_default();
        for (at, _) in head.match_indices("[`") {
            let name: String = head[at + 2..].chars().take_while(|c| *c != '`').collect();
            ranks.entry(name).or_insert(rank);
        }
    }
    ranks
}

/// Modules the layers do not place, and arrows that point up them.
fn against_layers(
    modules: &BTreeMap<String, String>,
    ranks: &BTreeMap<String, usize>,
) -> (BTreeSet<String>, Vec<String>) {
    let top = |name: &str| name.split("::").next().unwrap_or_default().to_owned();
    let mut unplaced = BTreeSet::new();
    let mut upward = Vec::new();
    for (from, targets) in arrows(modules) {
        for to in targets {
            let (a, b) = (top(&from), top(&to));
            if a.is_empty() || a == b {
                continue;
            }
            match (ranks.get(&a), ranks.get(&b)) {
                (Some(above), Some(below)) if above < below => {}
                (Some(_), Some(_)) => upward.push(format!("{from} → {to}")),
                (None, _) => {
                    unplaced.insert(a);
                }
                (_, None) => {
                    unplaced.insert(b);
                }
            }
        }
    }
    (unplaced, upward)
}

#[test]
fn every_arrow_points_down_the_layers_lib_rs_lists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(root.join("lib.rs")).expect("read lib.rs");
    let ranks = layers(&lib);
    assert!(ranks.len() > 20, "the layers were read: {ranks:?}");
    let (unplaced, upward) = against_layers(&modules(&root), &ranks);
    assert!(
        unplaced.is_empty(),
        "modules src/lib.rs's Layout does not place: {unplaced:?}"
    );
    assert!(
        upward.is_empty(),
        "arrows from a lower layer up (src/lib.rs's Layout, top first): {upward:#?}"
    );
}

#[test]
fn the_check_finds_an_arrow_up_and_a_module_left_out() {
    let lib = "//! # Layout\n//! Each layer imports only the ones below it.\n//! - [`a`]: top.\n//! - [`b`], [`c`]: below.\n//!\n";
    let ranks = layers(lib);
    let modules: BTreeMap<String, String> = [
        ("a", "fn f() { crate::b::g(); }"),
        ("b", "fn g() { crate::a::f(); crate::d::h(); }"),
        ("c", ""),
        ("d", ""),
    ]
    .into_iter()
    .map(|(name, code)| (name.to_owned(), code.to_owned()))
    .collect();
    let (unplaced, upward) = against_layers(&modules, &ranks);
    assert_eq!(upward, vec!["b → a".to_owned()]);
    assert_eq!(unplaced, BTreeSet::from(["d".to_owned()]));
}

#[test]
fn no_source_file_is_over_700_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = vec![root.join("src"), root.join("crates")];
    let mut long = Vec::new();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                let lines = std::fs::read_to_string(&path)
                    .expect("read")
                    .lines()
                    .count();
                if lines > 700 {
                    long.push(format!("{} ({lines})", path.display()));
                }
            }
        }
    }
    assert!(long.is_empty(), "source files over 700 lines: {long:?}");
}

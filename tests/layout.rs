//! The layout holds mechanically: no import circle between the sidecar's
//! files. Every `crate::` path in a file's code (comments and its test
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

//! The layout holds mechanically: no import circle between the sidecar's
//! files, every arrow down the layers `src/lib.rs` lists, no source file
//! under `src/` or `crates/` over 700 lines. An arrow is a `crate::` or
//! `super::` path in a file's code (a group's items each), comments and
//! `#[cfg(test)]` items left out. Every `crate::` path in a file's code (comments and its test
//! module left out) is an arrow to the file that defines it; a circle of
//! arrows between files that are not each other's ancestors fails the test,
//! naming the files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The module path of every source file under `src` (`keys::demand`), with
/// its code; files declared under `#[cfg(test)]` (a test module in a file
/// of its own, the in-memory test backend) and their children left out.
fn modules(root: &Path) -> BTreeMap<String, String> {
    let mut texts = BTreeMap::new();
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
            texts.insert(parts.join("::"), text);
        }
    }
    let test_only: Vec<String> = texts
        .iter()
        .flat_map(|(name, text)| {
            test_modules(text).into_iter().map(move |child| {
                if name.is_empty() {
                    child
                } else {
                    format!("{name}::{child}")
                }
            })
        })
        .collect();
    texts
        .into_iter()
        .filter(|(name, _)| {
            !test_only
                .iter()
                .any(|test| name == test || name.starts_with(&format!("{test}::")))
        })
        .map(|(name, text)| (name, code_of(&text)))
        .collect()
}

/// The modules a file declares under `#[cfg(test)]` in files of their own
/// (`#[cfg(test)]` then `mod name;`).
fn test_modules(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    lines
        .windows(2)
        .filter(|pair| pair[0] == "#[cfg(test)]")
        .filter_map(|pair| {
            let declared = pair[1]
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("pub(super) ")
                .trim_start_matches("pub ");
            declared
                .strip_prefix("mod ")
                .and_then(|rest| rest.strip_suffix(';'))
                .map(str::to_owned)
        })
        .collect()
}

/// A file's code: without comment lines, and without each item under
/// `#[cfg(test)]` (an inline test module to its closing brace, or a
/// `mod name;` line), wherever it stands in the file.
fn code_of(text: &str) -> String {
    let mut kept = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        if trimmed == "#[cfg(test)]" {
            let mut depth = 0i64;
            for next in lines.by_ref() {
                let item = next.trim_start();
                if depth == 0 && item.starts_with("#[") {
                    continue;
                }
                depth += i64::try_from(next.matches('{').count()).unwrap_or(0)
                    - i64::try_from(next.matches('}').count()).unwrap_or(0);
                if depth <= 0 && (item.ends_with(';') || item.ends_with('}')) {
                    break;
                }
            }
            continue;
        }
        kept.push(line);
    }
    kept.join("\n")
}

/// The module paths a file's code names, from the crate root:
/// `crate::a::b` and `super::b` (against `module`, the file's own path),
/// each item of a group (`crate::{a::X, b::{Y, Z}}`) on its own.
fn paths_in(code: &str, module: &str) -> Vec<String> {
    let is_path = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut found = Vec::new();
    for (at, _) in code
        .match_indices("crate::")
        .chain(code.match_indices("super::"))
    {
        if code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            continue;
        }
        let mut rest = &code[at..];
        let mut base: Vec<&str> = if rest.starts_with("crate::") {
            rest = &rest[7..];
            Vec::new()
        } else {
            module.split("::").filter(|part| !part.is_empty()).collect()
        };
        while let Some(after) = rest.strip_prefix("super::") {
            base.pop();
            rest = after;
        }
        let base = base.join("::");
        let join = |path: &str| {
            let path = path.trim_matches(':');
            match (base.is_empty(), path.is_empty()) {
                (true, _) => path.to_owned(),
                (false, true) => base.clone(),
                (false, false) => format!("{base}::{path}"),
            }
        };
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.push(join(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 && is_path(c) {
                    item.push(c);
                } else if depth == 0 && !c.is_whitespace() {
                    item.push(' ');
                }
            }
            found.push(join(&item));
            continue;
        }
        let path: String = rest.chars().take_while(|c| is_path(*c)).collect();
        found.push(join(&path));
    }
    found
        .into_iter()
        .map(|path| path.split(' ').next().unwrap_or_default().to_owned())
        .collect()
}

/// The arrows between files: each path a file's code names points at the
/// longest module prefix that is a file, unless one file is the other's
/// ancestor.
fn arrows(modules: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, code) in modules {
        for path in paths_in(code, name) {
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
    let modules = modules(&root);
    let reexported: Vec<String> = lib
        .lines()
        .filter_map(|line| line.strip_prefix("pub use keyward_core::"))
        .map(|name| name.trim_end_matches(';').to_owned())
        .collect();
    let stale: Vec<&String> = ranks
        .keys()
        .filter(|name| !modules.contains_key(*name) && !reexported.contains(name))
        .collect();
    assert!(
        stale.is_empty(),
        "src/lib.rs's Layout names no such module: {stale:?}"
    );
    let (unplaced, upward) = against_layers(&modules, &ranks);
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
fn arrows_are_read_past_test_items_through_super_and_groups() {
    let code = code_of(
        "#[cfg(test)]\nmod tests;\n#[cfg(test)]\nmod inline {\n    use crate::e::X;\n}\nuse crate::{b::Y, c::{Z, W}};\nuse super::super::d::V;\nfn f() { super::sibling::g(); }\n",
    );
    assert!(
        !code.contains("crate::e"),
        "test items are left out: {code}"
    );
    let paths = paths_in(&code, "top::inner::leaf");
    for expected in ["b::Y", "c::", "top::d::V", "top::inner::sibling::g"] {
        assert!(
            paths
                .iter()
                .any(|path| path.starts_with(expected.trim_end_matches(':'))),
            "{expected} in {paths:?}"
        );
    }
    assert_eq!(
        test_modules("#[cfg(test)]\nmod memory;\npub mod mirror;"),
        vec!["memory".to_owned()]
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

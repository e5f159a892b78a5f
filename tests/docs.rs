//! The documentation's links: every relative link and image in README.md
//! and docs/*.md points at a file that exists, every `#anchor` at a heading
//! of its target (GitHub's anchor rules), every page of docs/ is reachable
//! from README.md by following links, and every screenshot is shown
//! somewhere. External links
//! cannot be fetched here (CI has no network beyond package registries);
//! they must at least be absolute `https://` URLs (or the loopback server
//! a walk-through starts).
#![allow(
    clippy::too_many_lines,
    reason = "one end-to-end story reads best in one test"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use pulldown_cmark::{Event, HeadingLevel, Parser, Tag, TagEnd};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped, spaces
/// as hyphens; a repeated heading gets `-1`, `-2`, ….
fn slug(text: &str) -> String {
    text.trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// A page's anchors and its links.
struct Page {
    anchors: BTreeSet<String>,
    links: Vec<String>,
}

fn read(path: &Path) -> Page {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut anchors = BTreeSet::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut links = Vec::new();
    let mut heading: Option<String> = None;
    for event in Parser::new(&text) {
        match event {
            Event::Start(Tag::Heading { level, .. }) if level <= HeadingLevel::H6 => {
                heading = Some(String::new());
            }
            Event::Text(t) | Event::Code(t) => {
                if let Some(h) = heading.as_mut() {
                    h.push_str(&t);
                }
            }
            Event::End(TagEnd::Heading(_)) => {
                let base = slug(&heading.take().unwrap_or_default());
                let n = seen.entry(base.clone()).or_default();
                anchors.insert(if *n == 0 {
                    base.clone()
                } else {
                    format!("{base}-{n}")
                });
                *n += 1;
            }
            Event::Start(Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. }) => {
                links.push(dest_url.to_string());
            }
            _ => {}
        }
    }
    Page { anchors, links }
}

fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

#[test]
fn every_link_in_the_documentation_resolves() {
    let parsed: BTreeMap<PathBuf, Page> = pages()
        .into_iter()
        .map(|p| {
            let page = read(&p);
            (p.canonicalize().expect("canonical"), page)
        })
        .collect();
    let mut problems = Vec::new();
    // Every file some page links to, and each page's links (resolved).
    let mut reached = BTreeSet::new();
    let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for (path, page) in &parsed {
        let dir = path.parent().expect("dir");
        for link in &page.links {
            if link.starts_with("http://127.0.0.1") {
                // The walk-through's own loopback server.
                continue;
            }
            if link.starts_with("http://") {
                problems.push(format!("{}: {link}: use https", path.display()));
                continue;
            }
            if link.starts_with("https://") || link.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = link.split_once('#').unwrap_or((link, ""));
            let target = if file.is_empty() {
                path.clone()
            } else {
                let Ok(target) = dir.join(file).canonicalize() else {
                    problems.push(format!("{}: {link}: no such file", path.display()));
                    continue;
                };
                target
            };
            reached.insert(target.clone());
            if &target != path {
                edges
                    .entry(path.clone())
                    .or_default()
                    .insert(target.clone());
            }
            if anchor.is_empty() {
                continue;
            }
            match parsed.get(&target) {
                Some(target_page) if target_page.anchors.contains(anchor) => {}
                Some(_) => problems.push(format!("{}: {link}: no such heading", path.display())),
                None => problems.push(format!(
                    "{}: {link}: an anchor into a file that is not a page",
                    path.display()
                )),
            }
        }
    }
    // Pages a newcomer can reach by following links from README.md.
    let readme = root().join("README.md").canonicalize().expect("README");
    let mut from_readme = BTreeSet::from([readme.clone()]);
    let mut frontier = vec![readme];
    while let Some(page) = frontier.pop() {
        for next in edges.get(&page).into_iter().flatten() {
            if parsed.contains_key(next) && from_readme.insert(next.clone()) {
                frontier.push(next.clone());
            }
        }
    }
    for path in parsed.keys() {
        if !from_readme.contains(path) {
            problems.push(format!("{}: not reachable from README.md", path.display()));
        }
    }
    let shots = root().join("docs/screenshots");
    for shot in std::fs::read_dir(&shots).expect("docs/screenshots") {
        let shot = shot
            .expect("entry")
            .path()
            .canonicalize()
            .expect("canonical");
        if !reached.contains(&shot) {
            problems.push(format!("{}: shown nowhere", shot.display()));
        }
    }
    assert!(
        problems.is_empty(),
        "broken documentation links:\n{}",
        problems.join("\n")
    );
}

#[test]
fn anchors_follow_githubs_rules() {
    assert_eq!(
        slug("Decide inside Envoy (the keyward module)"),
        "decide-inside-envoy-the-keyward-module"
    );
    assert_eq!(slug("SendGrid's REST API"), "sendgrids-rest-api");
    assert_eq!(slug("`GET /openapi.json`"), "get-openapijson");
}

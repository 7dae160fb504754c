//! The module tree's dependencies point one way, down the data path (README, "Layout"): no
//! module imports from a module in its own layer or above, and no file is part of an import
//! cycle. Read from the sources, as text: every `use crate::…`/`use super::…` and every
//! `crate::…` path in code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, from the bottom. A module may use only modules of lower layers.
const LAYERS: &[&[&str]] = &[
    &["protocol", "config", "metrics"],
    &["net"],
    &["backend"],
    &["query"],
    &["rules"],
    &["cache", "policy"],
    &["stats"],
    &["l2"],
    &["peers", "replica"],
    &["context"],
    &["frontend"],
    &["session", "admin"],
    &["server"],
    &["demo"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A file's module path: `src/session/relay.rs` → `["session", "relay"]`.
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" && stem != "main" {
        parts.push(stem.to_owned());
    }
    parts
}

/// The file defining module `path` (its longest existing prefix), if any.
fn file_of(path: &[String]) -> Option<PathBuf> {
    for n in (1..=path.len()).rev() {
        let base = path[..n].iter().fold(src(), |p, s| p.join(s));
        for candidate in [base.with_extension("rs"), base.join("mod.rs")] {
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// Code without comments (line and doc comments), so paths in prose are not counted.
fn code(text: &str) -> String {
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// Expands a `use` tree (`a::{b, c::{d}}`) into paths.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    match tree.find('{') {
        None => vec![tree.to_owned()],
        Some(open) => {
            let prefix = &tree[..open];
            let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
            let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
            for (i, ch) in inner.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        parts.push(&inner[start..i]);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            parts.push(&inner[start..]);
            parts
                .into_iter()
                .filter(|p| !p.trim().is_empty())
                .flat_map(|p| expand(&format!("{prefix}{}", p.trim())))
                .collect()
        }
    }
}

/// The modules a file uses, as absolute module paths.
fn uses(file: &Path) -> Vec<Vec<String>> {
    let text = code(&std::fs::read_to_string(file).unwrap());
    let me = module_of(file);
    let mut out = Vec::new();
    let mut resolve = |path: &str| {
        let segs: Vec<&str> = path.split("::").map(str::trim).filter(|s| !s.is_empty()).collect();
        let mut abs: Vec<String> = match segs.first() {
            Some(&"crate") => Vec::new(),
            Some(&"super") => {
                let mut base = me.clone();
                base.pop();
                base
            }
            Some(&"self") => me.clone(),
            _ => return,
        };
        let mut rest = &segs[1..];
        while rest.first() == Some(&"super") {
            abs.pop();
            rest = &rest[1..];
        }
        abs.extend(rest.iter().map(|s| s.split_whitespace().next().unwrap_or("").to_owned()));
        out.push(abs);
    };
    for stmt in text.split(';') {
        let stmt = stmt.trim_start();
        let body = stmt
            .strip_prefix("pub use ")
            .or_else(|| stmt.strip_prefix("pub(crate) use "))
            .or_else(|| stmt.strip_prefix("use "));
        if let Some(body) = body {
            for p in expand(body) {
                resolve(&p);
            }
        }
    }
    // `crate::a::b` paths in code.
    let bytes = text.as_bytes();
    let mut at = 0;
    while let Some(i) = text[at..].find("crate::") {
        let start = at + i;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_' || bytes[end] == b':') {
            end += 1;
        }
        resolve(&text[start..end]);
        at = end.max(start + 7);
    }
    out
}

#[test]
fn imports_point_down_the_layers() {
    let mut all = Vec::new();
    files(&src(), &mut all);
    let mut wrong = BTreeSet::new();
    for f in &all {
        let me = module_of(f);
        let Some(mine) = me.first().and_then(|m| layer(m)) else { continue };
        for used in uses(f) {
            let Some(top) = used.first() else { continue };
            if *top == me[0] {
                continue;
            }
            match layer(top) {
                Some(theirs) if theirs < mine => {}
                Some(_) => {
                    wrong.insert(format!("{} uses {} (layer {} of {})", f.display(), used.join("::"), me[0], top));
                }
                None => {}
            }
        }
    }
    assert!(wrong.is_empty(), "imports that do not point down:\n{}", wrong.into_iter().collect::<Vec<_>>().join("\n"));
}

#[test]
fn no_file_is_part_of_an_import_cycle() {
    let mut all = Vec::new();
    files(&src(), &mut all);
    let mut graph: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for f in &all {
        let edges = graph.entry(f.clone()).or_default();
        for used in uses(f) {
            if let Some(target) = file_of(&used)
                && target != *f
            {
                edges.insert(target);
            }
        }
    }
    // Tarjan-free: a depth-first search reporting back edges.
    let mut cycles = Vec::new();
    let mut state: BTreeMap<PathBuf, u8> = BTreeMap::new();
    fn visit(
        n: &PathBuf,
        graph: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        state: &mut BTreeMap<PathBuf, u8>,
        stack: &mut Vec<PathBuf>,
        cycles: &mut Vec<String>,
    ) {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                0 => visit(m, graph, state, stack, cycles),
                1 => {
                    let from = stack.iter().position(|s| s == m).unwrap_or(0);
                    let names: Vec<String> = stack[from..]
                        .iter()
                        .chain([m])
                        .map(|p| p.strip_prefix(src()).unwrap().display().to_string())
                        .collect();
                    cycles.push(names.join(" -> "));
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
    }
    for n in graph.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            visit(n, &graph, &mut state, &mut Vec::new(), &mut cycles);
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_parser_of_this_test_reads_use_trees() {
    assert_eq!(expand("a::{b, c::{d, e}}"), vec!["a::b", "a::c::d", "a::c::e"]);
}

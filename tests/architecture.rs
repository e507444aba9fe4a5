//! The layers of `docs/ARCHITECTURE.md`, checked: every `crate::…` path in
//! `src/` (and `orchestrator::…` in the binary's files) names a module the
//! importing module's layer may use. A new upward import fails here, with
//! the file and the edge named.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → layer (0 domain, 1 adapters, 2 engine,
/// 3 application, 4 front ends).
const LAYERS: &[(&str, u8)] = &[
    ("job", 0),
    ("auth", 0),
    ("secret", 0),
    ("metrics", 0),
    ("net", 0),
    ("digest", 0),
    ("store", 1),
    ("queue", 1),
    ("sandbox", 1),
    ("git", 1),
    ("webhook", 1),
    ("worker", 2),
    ("maintenance", 2),
    ("pipeline", 2),
    ("app", 3),
    ("config", 3),
    ("api", 4),
    ("apalis", 4),
    ("bench", 4),
    ("cli", 4),
    ("telemetry", 4),
    ("main", 4),
];

/// Imports within one layer that are part of the design (never the other
/// way round: the cycle check below keeps them one-way).
const SAME_LAYER: &[(&str, &str)] = &[
    // Callback and webhook URLs are parsed by the address policy's type.
    ("job", "net"),
    // The worker runs the pipeline's handlers and the maintenance services.
    ("worker", "pipeline"),
    ("worker", "maintenance"),
    // The orphan reaper asks the sandbox host which containers exist.
    ("maintenance", "pipeline"),
    // The app is built from the settings.
    ("app", "config"),
    // The binary's CLI serves the API and runs the benchmarks.
    ("cli", "api"),
    ("cli", "bench"),
    // The binary sets up tracing before anything else, and its commands
    // stop on the same signal.
    ("main", "telemetry"),
    ("cli", "telemetry"),
];

/// What a module may import beyond the table's rule, and why.
const EXCEPTIONS: &[(&str, &str, &str)] = &[
    ("bench", "git", "bench git measures the git adapter itself"),
    (
        "bench",
        "sandbox",
        "bench sandbox measures the sandbox runtime itself",
    ),
    (
        "bench",
        "worker",
        "benchmarks watch the worker's events to time jobs",
    ),
    (
        "bench",
        "pipeline",
        "bench lifecycle uses the pipeline's settings types",
    ),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// May `from` import `to`? Domain imports nothing internal; adapters and
/// the engine import what is below them; front ends import the application
/// layer and the domain only.
fn allowed(from: &str, to: &str) -> bool {
    if from == to
        || SAME_LAYER.contains(&(from, to))
        || EXCEPTIONS.iter().any(|(f, t, _)| *f == from && *t == to)
    {
        return true;
    }
    let (Some(lf), Some(lt)) = (layer(from), layer(to)) else {
        return false;
    };
    match lf {
        0 => false,
        4 => lt == 0 || lt == 3,
        _ => lt < lf,
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of `text` without comments, with no whitespace around `::`
/// (so `crate :: app` and a path split over lines read as one).
fn code_of(text: &str) -> String {
    let block = regex::Regex::new(r"(?s)/\*.*?\*/").expect("regex");
    let line = regex::Regex::new(r"(?m)//.*$").expect("regex");
    let colons = regex::Regex::new(r"\s*::\s*").expect("regex");
    let text = block.replace_all(text, " ");
    let text = line.replace_all(&text, "");
    colons.replace_all(&text, "::").into_owned()
}

/// The first identifier of `s`.
fn ident(s: &str) -> String {
    s.trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// The top-level items of a `{…}` group (`s` starts after the `{`): each
/// item's first identifier, nested groups skipped by depth.
fn group_items(s: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(ident(&s[start..i]));
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(ident(&s[start..i]));
                start = i + 1;
            }
            _ => {}
        }
    }
    items.retain(|i| !i.is_empty());
    items
}

/// The top-level modules `text` names after `prefix::`, comments left out.
/// `use crate as …` (an alias the check could not follow) is reported as
/// the module `crate as`, which no layer allows.
fn imports(text: &str, prefix: &str) -> BTreeSet<String> {
    let code = code_of(text);
    let mut found = BTreeSet::new();
    let alias = regex::Regex::new(&format!(r"\b{prefix}\s+as\b")).expect("regex");
    if alias.is_match(&code) {
        found.insert(format!("{prefix} as"));
    }
    let needle = format!("{prefix}::");
    let mut rest = code.as_str();
    while let Some(at) = rest.find(&needle) {
        // A path segment, not the tail of a longer identifier.
        let before = rest[..at].chars().next_back();
        rest = &rest[at + needle.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            found.extend(group_items(group));
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found.remove("self");
    found
}

/// The top-level modules reached through `super::` paths that climb to the
/// crate root from a module `depth` levels deep (`src/a/b.rs` is 2).
fn super_imports(text: &str, depth: usize) -> BTreeSet<String> {
    let code = code_of(text);
    let chain = regex::Regex::new(r"\b((?:super::)+)(\{|[A-Za-z_])").expect("regex");
    let mut found = BTreeSet::new();
    for m in chain.captures_iter(&code) {
        let supers = m[1].len() / "super::".len();
        if supers < depth {
            continue;
        }
        let after = &code[m.get(2).map_or(0, |g| g.start())..];
        if let Some(group) = after.strip_prefix('{') {
            found.extend(group_items(group));
        } else {
            found.insert(ident(after));
        }
    }
    found
}

/// Every edge between top-level modules, with a file that makes it.
fn edges(src: &Path) -> BTreeMap<(String, String), PathBuf> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut edges = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let first = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("a name");
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "lib" {
            continue;
        }
        // The binary's files reach the library through its name.
        let prefix = if module == "main" || module == "cli" {
            "orchestrator"
        } else {
            "crate"
        };
        let text = std::fs::read_to_string(&file).expect("read");
        // How deep the file's module is: `src/a.rs` and `src/a/mod.rs` 1,
        // `src/a/b.rs` 2.
        let depth =
            rel.components().count() - usize::from(rel.file_name().is_some_and(|n| n == "mod.rs"));
        let mut named = imports(&text, prefix);
        named.extend(super_imports(&text, depth));
        for to in named {
            if to != module {
                edges
                    .entry((module.clone(), to))
                    .or_insert_with(|| rel.to_owned());
            }
        }
    }
    edges
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn every_import_goes_down_the_layers() {
    let bad: Vec<String> = edges(&src())
        .into_iter()
        .filter(|((from, to), _)| !allowed(from, to))
        .map(|((from, to), file)| format!("{from} → {to} (in src/{})", file.display()))
        .collect();
    assert!(
        bad.is_empty(),
        "imports against the layers (docs/ARCHITECTURE.md):\n{}",
        bad.join("\n")
    );
}

#[test]
fn every_module_has_a_layer() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    for file in files {
        let rel = file.strip_prefix(src()).expect("under src");
        let first = rel.components().next().and_then(|c| c.as_os_str().to_str());
        let module = first.expect("a name").trim_end_matches(".rs");
        assert!(
            module == "lib" || layer(module).is_some(),
            "src/{} is in no layer: add its module to LAYERS",
            rel.display()
        );
    }
}

#[test]
fn the_module_graph_has_no_cycle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in edges(&src()).into_keys() {
        graph.entry(from).or_default().insert(to);
    }
    // Depth-first, with the path so far: a module met again on it closes
    // a cycle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(node) {
            return;
        }
        if let Some(at) = path.iter().position(|n| n == node) {
            panic!("import cycle: {} → {node}", path[at..].join(" → "));
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, path, done);
        }
        path.pop();
        done.insert(node.to_owned());
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, &graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn the_checker_sees_what_it_checks() {
    let text = "use crate::queue::X;\nuse crate::{store, job::JobId};\n// crate::api in a comment\nfn f() { my_crate::git::x(); crate::git::y(); }";
    let found = imports(text, "crate");
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        vec!["git", "job", "queue", "store"]
    );
    // Forms a plain text search would miss.
    let tricky = "use crate::{job::{JobId}, app::App};\nuse crate ::\n    api::X;\n/* crate::bench */ use crate::{worker /* } */, metrics};";
    assert_eq!(
        imports(tricky, "crate").into_iter().collect::<Vec<_>>(),
        vec!["api", "app", "job", "metrics", "worker"]
    );
    assert!(imports("use crate as c; c::app::X;", "crate").contains("crate as"));
    assert_eq!(
        super_imports("use super::super::app::App; use super::x;", 2)
            .into_iter()
            .collect::<Vec<_>>(),
        vec!["app"]
    );
    assert!(super_imports("use super::super::app::App;", 3).is_empty());
    assert!(
        !allowed("store", "app"),
        "an adapter may not import the app"
    );
    assert!(
        !allowed("api", "store"),
        "a front end may not import an adapter"
    );
    assert!(
        !allowed("job", "metrics"),
        "the domain imports nothing internal"
    );
    assert!(allowed("api", "app") && allowed("worker", "store"));
}

//! The modules of `src/` depend on each other one way only.
//!
//! Every `use` and every `crate::`/`super::`/`self::` path of every source file
//! is read (with `syn`) and resolved to the module it names. Two checks follow:
//!
//! 1. No cycles: at every level of the module tree, the siblings below one
//!    parent form a directed acyclic graph, where sibling A depends on sibling
//!    B when anything inside A names anything inside B. A module and its own
//!    ancestors or descendants are not siblings (a `mod.rs` re-exporting its
//!    children, a child using `super::`), so they never count.
//! 2. The pipeline's direction: the top-level stages may depend only on the
//!    stages [`ALLOWED`] lists for them (data flows kernel -> identity ->
//!    enrichment -> model <- sinks; web and host beside them; `agent` wires
//!    everything; `config` composes the sections each stage owns).
//!
//! A failure names the files and lines behind every offending dependency.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use syn::visit::Visit;

/// Which top-level modules each top-level module may use.
const ALLOWED: &[(&str, &[&str])] = &[
    ("support", &[]),
    ("telemetry", &["support"]),
    ("model", &["support"]),
    ("kernel", &["support", "telemetry"]),
    ("identity", &["kernel", "model", "support", "telemetry"]),
    (
        "enrichment",
        &["identity", "kernel", "model", "support", "telemetry"],
    ),
    ("sinks", &["model", "support", "telemetry"]),
    ("web", &["support", "telemetry"]),
    ("host", &["identity", "kernel", "support", "telemetry"]),
    (
        "config",
        &[
            "enrichment",
            "identity",
            "kernel",
            "sinks",
            "support",
            "web",
        ],
    ),
    ("cli", &["config", "support"]),
    (
        "agent",
        &[
            "config",
            "enrichment",
            "host",
            "identity",
            "kernel",
            "model",
            "sinks",
            "support",
            "telemetry",
            "web",
        ],
    ),
];

type ModPath = Vec<String>;

/// One place a file names another module.
#[derive(Debug, Clone)]
struct Reference {
    from: ModPath,
    to: ModPath,
    file: PathBuf,
    line: usize,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The module path of a source file: `src/a/mod.rs` is `a`, `src/a/b.rs` is `a::b`.
fn module_of(src: &Path, file: &Path) -> Option<ModPath> {
    let relative = file.strip_prefix(src).ok()?;
    let mut parts: ModPath = relative
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    match last.as_str() {
        // The binary is its own crate; it reaches the library as `fleetsnitch::`.
        "main.rs" if parts.is_empty() => None,
        "lib.rs" if parts.is_empty() => Some(Vec::new()),
        "mod.rs" => Some(parts),
        name => {
            parts.push(name.strip_suffix(".rs")?.to_owned());
            Some(parts)
        }
    }
}

fn source_files(dir: &Path, files: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|error| panic!("read {}: {error}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            source_files(&path, files);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
}

/// Collects the paths one file names, resolved against its module (and the
/// inline modules it is inside).
struct Collector {
    /// The file's module, then any inline `mod x { ... }` being visited.
    scope: ModPath,
    file_module: ModPath,
    found: Vec<(ModPath, usize)>,
}

impl Collector {
    /// `segments` as an absolute path, if it starts with `crate`, `super` or `self`.
    fn absolute(&self, segments: &[String]) -> Option<ModPath> {
        let mut resolved = self.scope.clone();
        let mut rest = segments;
        match rest.first()?.as_str() {
            "crate" => {
                resolved.clear();
                rest = &rest[1..];
            }
            "self" => rest = &rest[1..],
            "super" => {
                while rest.first().is_some_and(|s| s == "super") {
                    resolved.pop()?;
                    rest = &rest[1..];
                }
            }
            _ => return None,
        }
        resolved.extend(rest.iter().cloned());
        Some(resolved)
    }

    fn record(&mut self, segments: &[String], line: usize) {
        if let Some(path) = self.absolute(segments) {
            self.found.push((path, line));
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(path) => {
                prefix.push(path.ident.to_string());
                self.use_tree(prefix, &path.tree);
                prefix.pop();
            }
            syn::UseTree::Name(name) => {
                let line = name.ident.span().start().line;
                let mut full = prefix.clone();
                if name.ident != "self" {
                    full.push(name.ident.to_string());
                }
                self.record(&full, line);
            }
            syn::UseTree::Rename(rename) => {
                let line = rename.ident.span().start().line;
                let mut full = prefix.clone();
                if rename.ident != "self" {
                    full.push(rename.ident.to_string());
                }
                self.record(&full, line);
            }
            syn::UseTree::Glob(glob) => {
                let line = glob.star_token.spans[0].start().line;
                self.record(&prefix.clone(), line);
            }
            syn::UseTree::Group(group) => {
                for tree in &group.items {
                    self.use_tree(prefix, tree);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Collector {
    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &item.tree);
    }

    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        if item.content.is_some() {
            self.scope.push(item.ident.to_string());
            syn::visit::visit_item_mod(self, item);
            self.scope.pop();
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path
            .segments
            .iter()
            .map(|segment| segment.ident.to_string())
            .collect();
        if let Some(first) = path.segments.first() {
            let line = first.ident.span().start().line;
            self.record(&segments, line);
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        // Macro arguments (`format!`, `matches!`, ...) are tokens to syn:
        // read `crate :: a :: b` and `super :: a` sequences out of their text.
        let text = mac.tokens.to_string();
        let words: Vec<&str> = text.split_whitespace().collect();
        let line = mac.path.segments[0].ident.span().start().line;
        for (index, word) in words.iter().enumerate() {
            if *word != "crate" && *word != "super" {
                continue;
            }
            let mut segments = vec![(*word).to_owned()];
            let mut at = index + 1;
            while words.get(at) == Some(&"::")
                && let Some(next) = words.get(at + 1)
                && next.chars().all(|c| c.is_alphanumeric() || c == '_')
            {
                segments.push((*next).to_owned());
                at += 2;
            }
            self.record(&segments, line);
        }
        syn::visit::visit_macro(self, mac);
    }
}

/// Every reference between modules in `src/`.
fn references() -> (BTreeSet<ModPath>, Vec<Reference>) {
    let src = src_dir();
    let mut files = Vec::new();
    source_files(&src, &mut files);
    files.sort();
    files.dedup();
    let modules: BTreeSet<ModPath> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    let mut references = Vec::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        let text = fs::read_to_string(file)
            .unwrap_or_else(|error| panic!("read {}: {error}", file.display()));
        let syntax = syn::parse_file(&text)
            .unwrap_or_else(|error| panic!("parse {}: {error}", file.display()));
        let mut collector = Collector {
            scope: module.clone(),
            file_module: module.clone(),
            found: Vec::new(),
        };
        collector.visit_file(&syntax);
        let Collector {
            file_module, found, ..
        } = collector;
        for (path, line) in found {
            // The deepest module (file) the path names.
            let Some(target) = (0..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|prefix| modules.contains(prefix))
            else {
                continue;
            };
            if target != file_module {
                references.push(Reference {
                    from: file_module.clone(),
                    to: target,
                    file: file.strip_prefix(&src).unwrap_or(file).to_owned(),
                    line,
                });
            }
        }
    }
    (modules, references)
}

fn display(path: &[String]) -> String {
    if path.is_empty() {
        "crate".to_owned()
    } else {
        path.join("::")
    }
}

/// The two siblings (children of the lowest common ancestor) that `reference`
/// connects, or `None` when one module contains the other.
fn siblings(reference: &Reference) -> Option<(ModPath, ModPath)> {
    let common = reference
        .from
        .iter()
        .zip(&reference.to)
        .take_while(|(a, b)| a == b)
        .count();
    if common == reference.from.len() || common == reference.to.len() {
        return None;
    }
    Some((
        reference.from[..=common].to_vec(),
        reference.to[..=common].to_vec(),
    ))
}

/// Cycles among siblings, each as the list of sibling edges with their evidence.
fn sibling_cycles(references: &[Reference]) -> Vec<String> {
    let mut edges: BTreeMap<ModPath, BTreeMap<ModPath, Vec<&Reference>>> = BTreeMap::new();
    for reference in references {
        if let Some((from, to)) = siblings(reference) {
            edges
                .entry(from)
                .or_default()
                .entry(to)
                .or_default()
                .push(reference);
        }
    }
    // Tarjan's strongly connected components over all sibling edges (edges
    // only ever join siblings, so each component lies under one parent).
    struct State<'e> {
        edges: &'e BTreeMap<ModPath, BTreeMap<ModPath, Vec<&'e Reference>>>,
        index: BTreeMap<ModPath, usize>,
        low: BTreeMap<ModPath, usize>,
        stack: Vec<ModPath>,
        on_stack: BTreeSet<ModPath>,
        components: Vec<Vec<ModPath>>,
    }
    fn connect(state: &mut State<'_>, node: &ModPath) {
        let next = state.index.len();
        state.index.insert(node.clone(), next);
        state.low.insert(node.clone(), next);
        state.stack.push(node.clone());
        state.on_stack.insert(node.clone());
        let targets: Vec<ModPath> = state
            .edges
            .get(node)
            .map(|targets| targets.keys().cloned().collect())
            .unwrap_or_default();
        for target in targets {
            if !state.index.contains_key(&target) {
                connect(state, &target);
                let low = state.low[node].min(state.low[&target]);
                state.low.insert(node.clone(), low);
            } else if state.on_stack.contains(&target) {
                let low = state.low[node].min(state.index[&target]);
                state.low.insert(node.clone(), low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut component = Vec::new();
            while let Some(member) = state.stack.pop() {
                state.on_stack.remove(&member);
                let done = &member == node;
                component.push(member);
                if done {
                    break;
                }
            }
            if component.len() > 1 {
                state.components.push(component);
            }
        }
    }
    let mut state = State {
        edges: &edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        components: Vec::new(),
    };
    let nodes: Vec<ModPath> = edges.keys().cloned().collect();
    for node in &nodes {
        if !state.index.contains_key(node) {
            connect(&mut state, node);
        }
    }
    let mut cycles = Vec::new();
    for component in &state.components {
        let members: BTreeSet<&ModPath> = component.iter().collect();
        let names: Vec<String> = component.iter().map(|m| display(m)).collect();
        let mut text = format!("cycle between {}:", names.join(", "));
        for from in &members {
            for (to, evidence) in &edges[*from] {
                if members.contains(to) {
                    let first = evidence[0];
                    text.push_str(&format!(
                        "\n    {} -> {} ({} references, e.g. {}:{} names {})",
                        display(from),
                        display(to),
                        evidence.len(),
                        first.file.display(),
                        first.line,
                        display(&first.to)
                    ));
                }
            }
        }
        cycles.push(text);
    }
    cycles
}

#[test]
fn modules_form_no_cycle_at_any_level() {
    let (modules, references) = references();
    assert!(
        modules.len() > 20 && references.len() > 100,
        "the source tree was not read: {} modules, {} references",
        modules.len(),
        references.len()
    );
    let cycles = sibling_cycles(&references);
    assert!(
        cycles.is_empty(),
        "{} import cycle(s):\n{}",
        cycles.len(),
        cycles.join("\n")
    );
}

#[test]
fn pipeline_stages_depend_only_one_way() {
    let (modules, references) = references();
    let top_level: BTreeSet<&str> = modules
        .iter()
        .filter_map(|m| m.first().map(String::as_str))
        .collect();
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let unlisted: Vec<&&str> = top_level
        .iter()
        .filter(|m| !allowed.contains_key(**m))
        .collect();
    assert!(
        unlisted.is_empty(),
        "top-level modules missing from ALLOWED (say what each may use): {unlisted:?}"
    );
    let mut violations: BTreeMap<(String, String), Vec<&Reference>> = BTreeMap::new();
    for reference in &references {
        let (Some(from), Some(to)) = (reference.from.first(), reference.to.first()) else {
            continue;
        };
        if from != to && !allowed[from.as_str()].contains(&to.as_str()) {
            violations
                .entry((from.clone(), to.clone()))
                .or_default()
                .push(reference);
        }
    }
    let report: Vec<String> = violations
        .iter()
        .map(|((from, to), evidence)| {
            let places: Vec<String> = evidence
                .iter()
                .take(3)
                .map(|r| format!("{}:{} names {}", r.file.display(), r.line, display(&r.to)))
                .collect();
            format!("{from} -> {to}: {}", places.join("; "))
        })
        .collect();
    assert!(
        report.is_empty(),
        "{} dependencies against the pipeline's direction:\n{}",
        report.len(),
        report.join("\n")
    );
}

#[test]
fn a_cycle_is_reported_with_its_evidence() {
    let reference = |from: &str, to: &str| Reference {
        from: from.split("::").map(str::to_owned).collect(),
        to: to.split("::").map(str::to_owned).collect(),
        file: PathBuf::from(format!("{}.rs", from.replace("::", "/"))),
        line: 7,
    };
    let cycles = sibling_cycles(&[
        reference("sinks::journal::store", "sinks::otlp::record"),
        reference("sinks::otlp", "sinks::journal"),
        reference("kernel::probes", "sinks::metrics"),
        // A module and its own parent are not siblings.
        reference("sinks::journal", "sinks"),
    ]);
    assert_eq!(cycles.len(), 1, "{cycles:?}");
    assert!(
        cycles[0].contains("sinks::journal -> sinks::otlp")
            && cycles[0].contains("journal/store.rs:7"),
        "{}",
        cycles[0]
    );
}

//! The dependency rules of `host/src/`, checked against the code.
//!
//! ARCHITECTURE.md's module table says, for each top-level module of `host/src/`,
//! which other modules it may use. This test reads that table and every `crate::`
//! path in the code (outside comments), and fails when
//! - the code uses a module its row does not list (an arrow that runs the wrong way),
//! - a row lists a module the code does not use (the table says more than is true),
//! - a module is missing from the table, or the table names one that does not exist,
//! - a row may use a module listed above it (the table must read top to bottom), or
//! - one sink uses another (`sinks/X` may use `sinks/mod.rs`, never `sinks/Y`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments (line comments, doc comments, block comments).
/// String literals are kept; none of weir's holds `crate::`.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("//") {
            rest = after.find('\n').map_or("", |i| &after[i..]);
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.find("*/").map_or("", |i| &after[i + 2..]);
        } else {
            let c = rest.chars().next().expect("non-empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first path segments after each `prefix` (`crate::`, `super::super::`), also
/// inside a group: `crate::{a, b::c}` gives `a` and `b`.
fn segments_after<'a>(code: &'a str, prefix: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    for (i, _) in code.match_indices(prefix) {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut start = 0;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.push(ident(group[start..].trim_start()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(ident(group[start..j].trim_start()));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(ident(rest));
        }
    }
    out.retain(|s| !s.is_empty() && *s != "self");
    out
}

/// The module a file of `host/src/` belongs to: its top-level folder or file stem.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("file under src");
    let first = rel.components().next().expect("non-empty path");
    let first = first.as_os_str().to_str().expect("UTF-8 path");
    first.strip_suffix(".rs").unwrap_or(first).to_owned()
}

/// The table of ARCHITECTURE.md: module -> the modules it may use, in table order.
fn table() -> Vec<(String, BTreeSet<String>)> {
    let doc = std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let start = doc
        .find("| module | may use |")
        .expect("ARCHITECTURE.md has a table headed `| module | may use |`");
    let names = |cell: &str| -> Vec<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(|n| n.trim_end_matches('/').trim_end_matches(".rs").to_owned())
            .collect()
    };
    doc[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').collect();
            let modules = names(cells[1]);
            assert_eq!(modules.len(), 1, "one module per row: {line}");
            (modules[0].clone(), names(cells[2]).into_iter().collect())
        })
        .collect()
}

#[test]
fn imports_follow_the_table_in_architecture_md() {
    let src = root().join("host/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut where_used: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut sink_violations = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        if module == "lib" || module == "main" {
            continue;
        }
        let code = strip_comments(&std::fs::read_to_string(file).expect("readable file"));
        let rel = file.strip_prefix(&src).unwrap().display().to_string();
        let entry = used.entry(module.clone()).or_default();
        for dep in segments_after(&code, "crate::") {
            if dep != module {
                where_used
                    .entry((module.clone(), dep.to_owned()))
                    .or_insert_with(|| rel.clone());
                entry.insert(dep.to_owned());
            }
        }
        // One sink never uses another.
        let parts: Vec<&str> = rel.split('/').collect();
        if parts.len() >= 3 && parts[0] == "sinks" {
            let sink = parts[1];
            let mut others = segments_after(&code, "crate::sinks::");
            others.extend(segments_after(&code, "super::super::"));
            for other in others {
                let is_sink = src.join("sinks").join(other).is_dir();
                if is_sink && other != sink {
                    sink_violations.push(format!("{rel} uses sinks/{other}"));
                }
            }
        }
    }

    let table = table();
    let mut problems = sink_violations;
    let rows: BTreeMap<&str, &BTreeSet<String>> =
        table.iter().map(|(m, deps)| (m.as_str(), deps)).collect();
    for (module, deps) in &used {
        let Some(allowed) = rows.get(module.as_str()) else {
            problems.push(format!("module {module} is not in ARCHITECTURE.md's table"));
            continue;
        };
        for dep in deps.difference(allowed) {
            let file = &where_used[&(module.clone(), dep.clone())];
            problems.push(format!(
                "{file} uses {dep}, which the row of {module} does not allow"
            ));
        }
        for dep in allowed.difference(deps) {
            problems.push(format!(
                "the row of {module} lists {dep}, which {module} does not use: drop it from the table"
            ));
        }
    }
    for (i, (module, deps)) in table.iter().enumerate() {
        if !used.contains_key(module) {
            problems.push(format!(
                "ARCHITECTURE.md's table names {module}, which host/src does not have"
            ));
        }
        for above in &table[..i] {
            if deps.contains(&above.0) {
                problems.push(format!(
                    "{module} may use {}, which is above it in the table: rows must only use the rows after them",
                    above.0
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "dependency rules broken:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_path_reader_sees_groups_and_ignores_comments() {
    let code = strip_comments(
        "use crate::{model::{Event, Origin}, bus};\n// crate::serve\n/* crate::cli */ let x = crate::metrics::X; fn f() { mycrate::no(); }",
    );
    assert_eq!(
        segments_after(&code, "crate::"),
        ["model", "bus", "metrics"]
    );
    let code = "use crate::sinks::{BoxError, clickhouse::Table};";
    assert_eq!(
        segments_after(code, "crate::sinks::"),
        ["BoxError", "clickhouse"]
    );
}

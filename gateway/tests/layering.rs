//! The code's shape, checked like rust-analyzer's `tidy.rs`: in the gateway and
//! the node agent each top-level module uses only modules below it (so no two
//! import each other), proto types stay behind the one conversion module per
//! side, and every Rust file in the workspace opens with a `//!` line saying
//! what it owns. A failure names the file, the line and the rule.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Top-level modules of a crate, top to bottom: a module may use those on later rows only.
/// Modules on one row are independent of each other.
const GATEWAY: &[&[&str]] = &[
    &["cli"],
    &["serve"],
    &["mcp"],
    &["tools"],
    &["app"],
    &["security", "guest"],
    &["nodes"],
    &["store"],
    &["config"],
    &["principal", "names", "image"],
];

const NODE: &[&[&str]] = &[
    // `testing` (a feature for tests) reaps what tests leave: VMM processes and their confinement.
    &["server", "testing"],
    &["api"],
    &["vm"],
    &["vmm", "storage", "net", "disk", "uplink"],
    &["probe"],
    &["dir", "vsock", "kvm", "tls"],
    &["cmd", "errors", "nofollow"],
];

/// Items the node agent's crate root re-exports, and the module each comes from.
const NODE_REEXPORTS: &[(&str, &str)] =
    &[("NodeApi", "api"), ("ListenAddr", "server"), ("NodeServerError", "server"), ("serve", "server")];

/// Where generated proto types may be named, per crate: everything else works on domain types.
const GATEWAY_PROTO: &[&str] = &["nodes/client.rs", "nodes/trans.rs"];
const NODE_PROTO: &[&str] = &["api/"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the gateway sits in the workspace").to_path_buf()
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !matches!(name.as_str(), "target" | "node_modules" | ".git") && !name.starts_with('.') {
                    stack.push(path);
                }
            } else if name.ends_with(".rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The top-level module a file under `src/` belongs to (`None` for the crate roots).
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_string_lossy().into_owned();
    match first.as_str() {
        "lib.rs" | "main.rs" => None,
        name => Some(name.trim_end_matches(".rs").to_string()),
    }
}

/// The top-level modules a line names through `crate::`, including `use crate::{a, b::c}`.
fn crate_refs(line: &str) -> Vec<String> {
    let mut refs = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            for item in inner.split(',') {
                let name: String = item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    refs.push(name);
                }
            }
        } else {
            let name: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                refs.push(name);
            }
        }
        rest = after;
    }
    refs
}

/// A line of code, without its comment (doc comments and `//` comments may name anything).
fn code_of(line: &str) -> &str {
    let trimmed = line.trim_start();
    if trimmed.starts_with("//") {
        return "";
    }
    match line.find("//") {
        Some(at) if !line[..at].contains('"') => &line[..at],
        _ => line,
    }
}

fn check_layers(krate: &str, layers: &[&[&str]], reexports: &[(&str, &str)], problems: &mut Vec<String>) {
    let src = workspace().join(krate).join("src");
    let level: BTreeMap<&str, usize> =
        layers.iter().enumerate().flat_map(|(i, row)| row.iter().map(move |m| (*m, i))).collect();
    for file in rust_files(&src) {
        let Some(module) = top_module(&src, &file) else { continue };
        let Some(&mine) = level.get(module.as_str()) else {
            problems.push(format!("{}: module `{module}` is not in the layer table of {krate}", file.display()));
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("source files are readable");
        for (n, line) in text.lines().enumerate() {
            for target in crate_refs(code_of(line)) {
                // A crate-root re-export (`crate::NodeApi`) is judged by the module it comes from.
                let target = reexports.iter().find(|(item, _)| *item == target).map_or(target, |(_, m)| m.to_string());
                if target == module || target == "self" {
                    continue;
                }
                match level.get(target.as_str()) {
                    None => problems.push(format!("{}:{}: unknown module crate::{target}", file.display(), n + 1)),
                    Some(&theirs) if theirs <= mine => problems.push(format!(
                        "{}:{}: `{module}` uses crate::{target}, which is not below it ({krate}'s layers: {})",
                        file.display(),
                        n + 1,
                        layers.iter().map(|row| row.join("|")).collect::<Vec<_>>().join(" > ")
                    )),
                    Some(_) => {}
                }
            }
        }
    }
}

fn check_proto(krate: &str, allowed: &[&str], problems: &mut Vec<String>) {
    let src = workspace().join(krate).join("src");
    for file in rust_files(&src) {
        let rel = file.strip_prefix(&src).expect("under src").to_string_lossy().replace('\\', "/");
        if allowed.iter().any(|a| rel.starts_with(a)) || rel == "main.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("source files are readable");
        for (n, line) in text.lines().enumerate() {
            let code = code_of(line);
            if code.contains("moat_proto::node") || code.contains("pb::") || code.contains("tonic::Status") {
                problems.push(format!(
                    "{}:{}: proto or gRPC status types outside {} ({krate}): convert there",
                    file.display(),
                    n + 1,
                    allowed.join(", ")
                ));
            }
        }
    }
}

#[test]
fn gateway_modules_point_down() {
    let mut problems = Vec::new();
    check_layers("gateway", GATEWAY, &[], &mut problems);
    check_proto("gateway", GATEWAY_PROTO, &mut problems);
    assert!(problems.is_empty(), "layering:\n{}", problems.join("\n"));
}

#[test]
fn node_agent_modules_point_down() {
    let mut problems = Vec::new();
    check_layers("node-agent", NODE, NODE_REEXPORTS, &mut problems);
    check_proto("node-agent", NODE_PROTO, &mut problems);
    assert!(problems.is_empty(), "layering:\n{}", problems.join("\n"));
}

#[test]
fn every_rust_file_says_what_it_owns() {
    let mut missing = Vec::new();
    for krate in ["tools", "gateway", "node-agent", "guest-agent", "proto", "evals"] {
        for file in rust_files(&workspace().join(krate)) {
            let text = std::fs::read_to_string(&file).expect("source files are readable");
            if !text.starts_with("//!") {
                missing.push(file.display().to_string());
            }
        }
    }
    assert!(missing.is_empty(), "files that do not open with a `//!` line:\n{}", missing.join("\n"));
}

/// The checker itself: it must see a violation when one is there.
#[test]
fn the_checker_sees_references() {
    assert_eq!(crate_refs("use crate::store::{State, now};"), ["store"]);
    assert_eq!(crate_refs("use crate::{config, names::is_dns_label};"), ["config", "names"]);
    assert_eq!(crate_refs("let x = crate::nodes::refresh(crate::store::now());"), ["nodes", "store"]);
    assert_eq!(code_of("    // crate::mcp is above"), "");
    assert_eq!(crate_refs(code_of("use crate::app; // crate::mcp")), ["app"]);
    let src = Path::new("/w/gateway/src");
    assert_eq!(top_module(src, &src.join("store/audit/chain.rs")).as_deref(), Some("store"));
    assert_eq!(top_module(src, &src.join("names.rs")).as_deref(), Some("names"));
    assert_eq!(top_module(src, &src.join("lib.rs")), None);
}

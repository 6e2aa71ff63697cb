//! Golden JSON schemas for every tool: a schema change is a contract change and must be reviewed.
//!
//! `MOAT_BLESS=1 cargo nextest run -p moat-tools` rewrites `tools/golden/`.

use std::path::PathBuf;

use serde_json::json;

/// The value with object keys sorted at every level, so golden files are stable to diff.
fn sorted(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => {
            let ordered: std::collections::BTreeMap<&String, serde_json::Value> =
                map.iter().map(|(k, v)| (k, sorted(v))).collect();
            serde_json::to_value(ordered).expect("a map of JSON values serializes")
        }
        serde_json::Value::Array(items) => serde_json::Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

#[test]
fn tool_schemas_match_goldens() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden");
    let bless = std::env::var_os("MOAT_BLESS").is_some();
    // In CI the goldens are checked, never rewritten: a blessed run there would pass any change.
    assert!(
        !(bless && std::env::var("CI").is_ok_and(|v| v == "true")),
        "MOAT_BLESS is set under CI=true: goldens are blessed by a person, then committed"
    );
    let mut mismatches = Vec::new();
    for spec in moat_tools::catalog() {
        let doc = json!({
            "name": spec.name.as_str(),
            "title": spec.title,
            "description": spec.description,
            "annotations": {
                "readOnlyHint": spec.hints.read_only,
                "destructiveHint": spec.hints.destructive,
                "idempotentHint": spec.hints.idempotent,
                "openWorldHint": spec.hints.open_world,
            },
            "class": format!("{:?}", spec.class),
            "cedarGroup": spec.group.cedar_id(),
            "resource": spec.resource.as_str(),
            "example": spec.example,
            "inputSchema": spec.input_schema,
            "outputSchema": spec.output_schema,
        });
        let path = dir.join(format!("{}.json", spec.name));
        if bless {
            let text = serde_json::to_string_pretty(&sorted(&doc)).expect("a JSON value serializes") + "\n";
            std::fs::write(&path, &text).expect("write golden");
            continue;
        }
        // Compared as JSON values: key order depends on serde_json's features, which the
        // workspace build unifies differently from a single-crate build.
        match std::fs::read_to_string(&path).map(|t| serde_json::from_str::<serde_json::Value>(&t)) {
            Ok(Ok(want)) if want == doc => {}
            Ok(_) => mismatches.push(format!("{} changed (see {})", spec.name, path.display())),
            Err(e) => mismatches.push(format!("{}: no golden at {} ({e})", spec.name, path.display())),
        }
    }
    let stale: Vec<_> = std::fs::read_dir(&dir)
        .expect("golden dir exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().trim_end_matches(".json").to_string())
        .filter(|n| moat_tools::ToolName::parse(n).is_none())
        .collect();
    assert!(stale.is_empty() || bless, "goldens for tools that no longer exist: {stale:?}");
    assert!(
        mismatches.is_empty(),
        "tool schemas differ from goldens; if intended, rerun with MOAT_BLESS=1 and review:\n{}",
        mismatches.join("\n")
    );
}

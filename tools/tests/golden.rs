//! Golden JSON schemas for every tool: a schema change is a contract change and must be reviewed.
//!
//! `MOAT_BLESS=1 cargo nextest run -p moat-tools` rewrites `tools/golden/`.

use std::path::PathBuf;

use serde_json::json;

#[test]
fn tool_schemas_match_goldens() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden");
    let bless = std::env::var_os("MOAT_BLESS").is_some();
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
        let text = serde_json::to_string_pretty(&doc).expect("a JSON value serializes") + "\n";
        let path = dir.join(format!("{}.json", spec.name));
        if bless {
            std::fs::write(&path, &text).expect("write golden");
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(want) if want == text => {}
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

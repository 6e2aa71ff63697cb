//! The tools as MCP lists them, built once from `moat-tools`, plus each tool's
//! compiled argument validator. Validation runs before anything else sees the
//! arguments, and its errors name the JSON path that is wrong.

use std::collections::HashMap;
use std::sync::Arc;

use jsonschema::error::ValidationErrorKind;
use moat_tools::{JsonObject, ToolName, ToolSpec};
use rmcp::model::{Tool, ToolAnnotations};
use serde_json::Value;

/// At most this many schema violations are reported per call; the first ones are what to fix.
const MAX_REPORTED_ERRORS: usize = 8;

pub struct Catalog {
    tools: Vec<Tool>,
    entries: HashMap<ToolName, Entry>,
}

struct Entry {
    spec: ToolSpec,
    validator: jsonschema::Validator,
}

/// One schema violation: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// JSON pointer into the arguments, "" for the arguments object itself.
    pub path: String,
    pub message: String,
}

impl Catalog {
    pub fn build() -> Catalog {
        let mut tools = Vec::new();
        let mut entries = HashMap::new();
        for spec in moat_tools::catalog() {
            let schema = Value::Object(spec.input_schema.clone());
            let validator = jsonschema::validator_for(&schema)
                .expect("moat-tools schemas are valid JSON Schema (golden tests check them)");
            tools.push(mcp_tool(&spec));
            entries.insert(spec.name, Entry { spec, validator });
        }
        Catalog { tools, entries }
    }

    pub fn tools(&self) -> &[Tool] {
        &self.tools
    }

    pub fn spec(&self, name: ToolName) -> &ToolSpec {
        &self.entry(name).spec
    }

    /// Checks `arguments` (absent means `{}`) against the tool's input schema.
    pub fn validate(&self, name: ToolName, arguments: Option<&JsonObject>) -> Result<(), Vec<Violation>> {
        let empty = JsonObject::new();
        let instance = Value::Object(arguments.unwrap_or(&empty).clone());
        let entry = self.entry(name);
        if entry.validator.is_valid(&instance) {
            return Ok(());
        }
        // Unknown top-level fields get their own precise message; the schema's own report of
        // them (a bare "false schema" at the root for argument-less tools) would not name them.
        let known = entry.spec.input_schema.get("properties").and_then(Value::as_object);
        let mut violations: Vec<Violation> = arguments
            .into_iter()
            .flat_map(|args| args.keys())
            .filter(|k| !known.is_some_and(|props| props.contains_key(k.as_str())))
            .map(|k| Violation {
                path: format!("/{}", escape_pointer(k)),
                message: format!("unknown field `{k}`; {}", known_fields(&entry.spec)),
            })
            .collect();
        let unknown_reported = !violations.is_empty();
        violations.extend(
            entry
                .validator
                .iter_errors(&instance)
                .filter(|e| {
                    !(unknown_reported
                        && e.instance_path().as_str().is_empty()
                        && matches!(
                            e.kind(),
                            ValidationErrorKind::AdditionalProperties { .. } | ValidationErrorKind::FalseSchema
                        ))
                })
                .map(|e| Violation { path: e.instance_path().as_str().to_string(), message: e.to_string() }),
        );
        violations.truncate(MAX_REPORTED_ERRORS);
        Err(violations)
    }

    fn entry(&self, name: ToolName) -> &Entry {
        self.entries.get(&name).expect("the catalog holds every ToolName")
    }
}

/// RFC 6901 escaping for one pointer segment.
fn escape_pointer(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// Lists the fields a tool accepts, for error messages.
fn known_fields(spec: &ToolSpec) -> String {
    match spec.input_schema.get("properties").and_then(Value::as_object) {
        Some(props) if !props.is_empty() => {
            format!("{} takes: {}", spec.name, props.keys().cloned().collect::<Vec<_>>().join(", "))
        }
        _ => format!("{} takes no arguments", spec.name),
    }
}

/// Renders violations as one sentence an agent can act on.
pub fn describe(tool: ToolName, violations: &[Violation]) -> String {
    let parts: Vec<String> = violations
        .iter()
        .map(|v| {
            let at = if v.path.is_empty() { "arguments".to_string() } else { format!("arguments{}", v.path) };
            format!("{at}: {}", v.message)
        })
        .collect();
    format!("invalid arguments for {tool}: {}", parts.join("; "))
}

fn mcp_tool(spec: &ToolSpec) -> Tool {
    let annotations = ToolAnnotations::with_title(spec.title)
        .read_only(spec.hints.read_only)
        .destructive(spec.hints.destructive)
        .idempotent(spec.hints.idempotent)
        .open_world(spec.hints.open_world);
    Tool::new(spec.name.as_str(), spec.description, Arc::new(spec.input_schema.clone()))
        .with_title(spec.title)
        .with_raw_output_schema(Arc::new(spec.output_schema.clone()))
        .with_annotations(annotations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_tool_is_listed_with_schemas() {
        let c = Catalog::build();
        assert_eq!(c.tools().len(), ToolName::ALL.len());
        for t in c.tools() {
            assert!(t.output_schema.is_some() && t.annotations.is_some(), "{}", t.name);
        }
    }

    #[test]
    fn violations_name_the_path() {
        let c = Catalog::build();
        let cases = [
            (ToolName::NodeInspect, json!({}), "", "node"),
            (ToolName::NodeInspect, json!({"node": 5}), "/node", "not of type"),
            (ToolName::NodeInspect, json!({"node": "Bad Name"}), "/node", "does not match"),
            (ToolName::NodeInspect, json!({"node": "x".repeat(64)}), "/node", "longer than 63"),
            (ToolName::Whoami, json!({"extra": true}), "/extra", "unknown field `extra`; whoami takes no arguments"),
            (ToolName::NodeInspect, json!({"node": "a", "nod": 1}), "/nod", "node_inspect takes: node"),
        ];
        for (tool, args, path, needle) in cases {
            let errs = c.validate(tool, args.as_object()).unwrap_err();
            assert_eq!(errs[0].path, path, "{args}");
            assert!(errs[0].message.contains(needle), "{args}: {}", errs[0].message);
            assert!(describe(tool, &errs).starts_with(&format!("invalid arguments for {tool}: arguments")));
        }
        assert_eq!(c.validate(ToolName::Whoami, None), Ok(()));
        assert_eq!(c.validate(ToolName::NodeInspect, json!({"node": "n-1"}).as_object()), Ok(()));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use moat_tools::ToolCall;
    use proptest::prelude::*;

    /// Arbitrary JSON, with keys drawn mostly from real argument names so valid inputs occur.
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            "[a-z0-9-]{0,70}".prop_map(Value::from),
            ".{0,20}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(key(), inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(vec!["node", "limit", "principal", "tool", "decision", "since"]).prop_map(String::from),
            1 => "[a-z_]{1,8}",
        ]
    }

    fn args() -> impl Strategy<Value = JsonObject> {
        prop::collection::btree_map(key(), json(), 0..5).prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever arrives, validation answers (never panics); what it accepts always decodes;
        /// and a field the schema does not declare is always refused, by name.
        #[test]
        fn validation_is_total_sound_and_closed(tool in prop::sample::select(ToolName::ALL.to_vec()), args in args()) {
            let catalog = Catalog::build();
            let verdict = catalog.validate(tool, Some(&args));
            if verdict.is_ok() {
                prop_assert!(ToolCall::decode(tool, Some(args.clone())).is_ok(), "{tool} accepted {args:?} but it does not decode");
            }
            let declared = catalog.spec(tool).input_schema.get("properties").and_then(Value::as_object).cloned().unwrap_or_default();
            if let Some(unknown) = args.keys().find(|k| !declared.contains_key(*k)) {
                let errors = verdict.expect_err("unknown fields are refused");
                let path = format!("/{unknown}");
                let named = errors.iter().any(|v| v.path == path && v.message.contains("unknown field"));
                prop_assert!(named, "{} not named in {:?}", unknown, errors);
            }
        }
    }
}

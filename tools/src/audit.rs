//! The audit log as a tool: cluster-admins query who did what.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{ActionGroup, Hints, ResourceKind, ToolClass, ToolName, ToolSpec, schema_object};

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditQueryInput {
    /// Only records of this principal (and of portal VMs acting for it).
    #[schemars(length(min = 1, max = 128))]
    pub principal: Option<String>,
    /// Only records of this tool, e.g. "vm_create".
    #[schemars(length(min = 1, max = 64))]
    pub tool: Option<String>,
    /// Only records with this decision.
    #[schemars(regex(pattern = r"^(allowed|denied|invalid|rate-limited)$"))]
    pub decision: Option<String>,
    /// Only records at or after this time (RFC 3339, e.g. "2026-11-23T00:00:00Z").
    #[schemars(length(min = 10, max = 40))]
    pub since: Option<String>,
    /// Newest records first, at most this many (default 100).
    #[schemars(range(min = 1, max = 1000))]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuditQueryOutput {
    pub records: Vec<AuditRecord>,
}

/// One audited call. Argument values are never recorded, only their digest and shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuditRecord {
    pub seq: i64,
    pub ts: String,
    pub principal: String,
    /// For a portal VM's call (principal `vm:<id>`): the owner it acted for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acting_for: Option<String>,
    pub role: String,
    pub transport: String,
    pub session: Option<String>,
    pub tool: String,
    pub resource: Option<String>,
    /// allowed, denied, invalid or rate-limited.
    pub decision: String,
    /// SHA-256 of the canonical JSON arguments.
    pub args_digest: String,
    /// The arguments with every value replaced by its JSON type.
    pub args_shape: String,
    /// For an allowed call, "ok", "tool-error" or "error" once it finished; null while running.
    pub outcome: Option<String>,
    pub error_code: Option<i64>,
    pub duration_us: Option<i64>,
}

pub(crate) fn audit_query_spec() -> ToolSpec {
    ToolSpec {
        name: ToolName::AuditQuery,
        title: "Query the audit log",
        description: "Lists audited tool calls, newest first: who called which tool on what, whether it \
                      was allowed, denied, invalid or rate-limited, and how it ended. Filter by principal, \
                      tool, decision and start time. Argument values are never shown, only their shape.",
        hints: Hints::READ,
        class: ToolClass::Read,
        group: ActionGroup::Cluster,
        resource: ResourceKind::Cluster,
        example: json!({"limit": 10}),
        input_schema: schema_object::<AuditQueryInput>(),
        output_schema: schema_object::<AuditQueryOutput>(),
    }
}

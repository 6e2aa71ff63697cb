//! The cluster tools: who the caller is, the nodes (asked live), and the
//! audit log for admins.

use moat_tools::{
    AuditQueryInput, AuditQueryOutput, NodeDetail, NodeInspectInput, NodeInspectOutput, NodeListOutput, NodeSummary,
    WhoamiOutput,
};
use serde_json::Value;

use super::{ToolError, to_value};
use crate::app::{CallContext, Shared};
use crate::nodes::{refresh, refresh_all};
use crate::store::{StateError, audit};

pub fn whoami(ctx: &CallContext) -> Value {
    to_value(WhoamiOutput {
        principal: ctx.principal.name.clone(),
        acting_for: ctx.principal.portal.as_ref().map(|p| p.owner.clone()),
        role: ctx.principal.role.as_str().to_string(),
        transport: ctx.transport.as_str().to_string(),
        protocol_version: ctx.protocol_version.clone(),
        session: ctx.session.clone(),
        server_version: env!("CARGO_PKG_VERSION").to_string(),
    })
}

pub async fn node_list(shared: &Shared) -> Result<Value, ToolError> {
    let details = refresh_all(&shared.state, &shared.nodes).await?;
    Ok(to_value(NodeListOutput { nodes: details.iter().map(node_summary).collect() }))
}

pub async fn node_inspect(shared: &Shared, input: NodeInspectInput) -> Result<Value, ToolError> {
    let row = shared.state.node(&input.node).await?;
    let node = refresh(&shared.state, &shared.nodes, &row).await?;
    Ok(to_value(NodeInspectOutput { node }))
}

pub async fn audit_query(shared: &Shared, input: AuditQueryInput) -> Result<Value, ToolError> {
    if let Some(since) = &input.since
        && !looks_like_rfc3339(since)
    {
        return Err(ToolError::Invalid(format!(
            "since `{since}` is not an RFC 3339 UTC time like 2026-11-23T00:00:00Z"
        )));
    }
    let filter = audit::Filter {
        principal: input.principal,
        tool: input.tool,
        decision: input.decision,
        since: input.since,
        limit: input.limit.unwrap_or(100),
    };
    let records = audit::query(shared.state.pool(), &filter).await.map_err(StateError::Query)?;
    Ok(to_value(AuditQueryOutput { records }))
}

/// What `node_list` shows of a node's detail.
fn node_summary(d: &NodeDetail) -> NodeSummary {
    NodeSummary {
        name: d.name.clone(),
        reachable: d.reachable,
        error: d.error.clone(),
        last_seen: d.last_seen.clone(),
        hostname: d.hostname.clone(),
        cpus: d.cpus,
        memory_total_mib: d.memory_total_mib,
        kvm_usable: d.kvm.as_ref().map(|k| k.usable),
        vmms: d.vmms.iter().filter(|v| v.installed).map(|v| v.kind.clone()).collect(),
        runtime: d.runtime.clone(),
        accel: d.accel.clone(),
        vm_count: d.vm_count,
        allocated_vcpus: d.allocated_vcpus,
        allocated_memory_mib: d.allocated_memory_mib,
    }
}

/// `YYYY-MM-DDTHH:MM:SS...Z`: the form audit timestamps use, so string comparison orders by time.
fn looks_like_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && s.ends_with('Z')
        && [0..4, 5..7, 8..10, 11..13, 14..16, 17..19].into_iter().all(|r| b[r].iter().all(u8::is_ascii_digit))
}

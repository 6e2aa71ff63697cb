//! What each tool does, as one exhaustive `match` over [`ToolCall`]. Adding a
//! tool to `moat-tools` fails to compile here until it is handled.

use moat_tools::{AuditQueryOutput, NodeInspectOutput, NodeListOutput, ToolCall, WhoamiOutput};
use std::time::Duration;

use moat_tools::guest::{ExecIdInput, ExecInput, ExecOutputInput, FileReadInput, FileWriteInput, PathInput};
use serde_json::Value;

use crate::audit;
use crate::gateway::{CallContext, Shared};
use crate::guest;
use crate::nodes;
use crate::state::StateError;
use crate::trans;
use crate::vms;

/// Deadline for guest calls other than vm_exec (file transfers of up to 32 MiB included).
const GUEST_CALL: Duration = Duration::from_secs(120);

/// How a tool call can fail once it has been decoded and allowed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The caller named something that does not exist; they can fix the call.
    #[error("{0}")]
    NotFound(String),
    /// Well-formed arguments the tool still cannot use (e.g. a malformed time); they can fix the call.
    #[error("{0}")]
    Invalid(String),
    /// A node refused or failed the work (no runtime, VMM error, unreachable); the message
    /// says what happened and whether anything changed.
    #[error("{0}")]
    Node(String),
    /// moat itself failed; not the caller's doing.
    #[error("internal error")]
    Internal(#[source] StateError),
}

impl From<StateError> for ToolError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::UnknownNode(_) => ToolError::NotFound(e.to_string()),
            other => ToolError::Internal(other),
        }
    }
}

pub async fn dispatch(shared: &Shared, ctx: &CallContext, call: ToolCall) -> Result<Value, ToolError> {
    match call {
        ToolCall::Whoami(_) => Ok(to_value(WhoamiOutput {
            principal: ctx.principal.name.clone(),
            role: ctx.principal.role.as_str().to_string(),
            transport: ctx.transport.as_str().to_string(),
            protocol_version: ctx.protocol_version.clone(),
            session: ctx.session.clone(),
            server_version: env!("CARGO_PKG_VERSION").to_string(),
        })),
        ToolCall::NodeList(_) => {
            let details = nodes::refresh_all(&shared.state, &shared.nodes).await?;
            Ok(to_value(NodeListOutput { nodes: details.iter().map(trans::node_summary).collect() }))
        }
        ToolCall::NodeInspect(input) => {
            let row = shared.state.node(&input.node).await?;
            let node = nodes::refresh(&shared.state, &shared.nodes, &row).await?;
            Ok(to_value(NodeInspectOutput { node }))
        }
        ToolCall::AuditQuery(input) => {
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
        ToolCall::VmCreate(input) => vms::create(shared, ctx, input).await,
        ToolCall::VmStart(input) => vms::start(shared, ctx, &input.vm).await,
        ToolCall::VmStop(input) => {
            vms::stop(shared, ctx, &input.vm, input.force.unwrap_or(false), input.timeout_s).await
        }
        ToolCall::VmDelete(input) => vms::delete(shared, ctx, &input.vm).await,
        ToolCall::VmList(input) => vms::list(shared, ctx, input).await,
        ToolCall::VmInspect(input) => vms::inspect(shared, ctx, &input.vm).await,
        ToolCall::VmLogs(input) => vms::logs(shared, ctx, &input.vm, input.tail).await,
        ToolCall::VmExec(input) => {
            // The guest kills the process at its timeout; the call gets a little longer to report it.
            let deadline = Duration::from_secs(u64::from(input.timeout_s.unwrap_or(60)) + 15);
            in_guest(shared, ctx, &input.vm.clone(), "exec", ExecInput::from(input), deadline).await
        }
        ToolCall::VmExecStart(input) => {
            in_guest(shared, ctx, &input.vm.clone(), "exec_start", ExecInput::from(input), GUEST_CALL).await
        }
        ToolCall::VmExecStatus(input) => {
            in_guest(shared, ctx, &input.vm.clone(), "exec_status", ExecIdInput::from(input), GUEST_CALL).await
        }
        ToolCall::VmExecOutput(input) => {
            in_guest(shared, ctx, &input.vm.clone(), "exec_output", ExecOutputInput::from(input), GUEST_CALL).await
        }
        ToolCall::VmExecKill(input) => {
            in_guest(shared, ctx, &input.vm.clone(), "exec_kill", ExecIdInput::from(input), GUEST_CALL).await
        }
        ToolCall::VmFileRead(input) => {
            in_guest(shared, ctx, &input.vm.clone(), "file_read", FileReadInput::from(input), GUEST_CALL).await
        }
        ToolCall::VmFileWrite(input) => {
            in_guest(shared, ctx, &input.vm.clone(), "file_write", FileWriteInput::from(input), GUEST_CALL).await
        }
        ToolCall::VmFileDelete(input) => {
            in_guest(shared, ctx, &input.vm.clone(), "file_delete", PathInput::from(input), GUEST_CALL).await
        }
        ToolCall::VmFileList(input) => {
            in_guest(shared, ctx, &input.vm.clone(), "file_list", PathInput::from(input), GUEST_CALL).await
        }
    }
}

/// Runs the guest agent's `tool` in the VM the caller named.
async fn in_guest(
    shared: &Shared,
    ctx: &CallContext,
    vm: &str,
    tool: &str,
    args: impl serde::Serialize,
    deadline: Duration,
) -> Result<Value, ToolError> {
    let vm = vms::row_for(shared, ctx, vm).await?;
    guest::call(shared, ctx, &vm, tool, args, deadline).await
}

/// `YYYY-MM-DDTHH:MM:SS...Z`: the form audit timestamps use, so string comparison orders by time.
pub fn looks_like_rfc3339(s: &str) -> bool {
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

pub fn to_value<T: serde::Serialize>(output: T) -> Value {
    serde_json::to_value(output).expect("tool output types serialize to JSON")
}

//! What each tool does, as one exhaustive `match` over [`ToolCall`]: adding a
//! tool to `moat-tools` fails to compile here until it is handled. Each
//! domain's handlers live in their own file; [`ToolError`] is how any of them
//! fails, with one `From` per lower boundary (store and its refusals, node, guest).

pub mod agents;
pub mod cluster;
pub mod disks;
pub mod git;
pub mod guest;
pub mod networks;
pub mod placement;
pub mod vms;
pub mod workspaces;

use std::time::Duration;

use moat_tools::{GuestTool, ToolCall};
use serde_json::Value;

use crate::app::{CallContext, Shared};
use crate::guest::GuestError;
use crate::nodes::client::NodeError;
use crate::security::resource::LookupError;
use crate::store::StateError;
use crate::store::vms::ReserveError;
use guest::{GUEST_CALL, in_guest};

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

impl From<ReserveError> for ToolError {
    /// A refusal (quota, name taken, no room, no address, port taken) is the caller's to fix.
    fn from(e: ReserveError) -> Self {
        match e {
            ReserveError::Refused(refusal) => ToolError::Invalid(refusal.to_string()),
            ReserveError::State(e) => e.into(),
        }
    }
}

impl From<NodeError> for ToolError {
    fn from(e: NodeError) -> Self {
        ToolError::Node(e.to_string())
    }
}

impl From<LookupError> for ToolError {
    fn from(e: LookupError) -> Self {
        match e {
            LookupError::Missing(message) => ToolError::NotFound(message),
            LookupError::Ambiguous(message) => ToolError::Invalid(message),
            LookupError::Store(e) => e.into(),
        }
    }
}

impl From<GuestError> for ToolError {
    fn from(e: GuestError) -> Self {
        match e {
            GuestError::NotRunning { .. } | GuestError::Refused(_) => ToolError::Invalid(e.to_string()),
            GuestError::Node(e) => e.into(),
            GuestError::Store(e) => e.into(),
            GuestError::Agent(_) | GuestError::Cancelled => ToolError::Node(e.to_string()),
        }
    }
}

/// Runs a call's handler. Every asynchronous handler is boxed: an `async fn` over all arms is as
/// large as its largest (over 20 KiB), and every call in flight would hold that much (a
/// thousand sessions' calls waiting on the audit commit, say), as would the stack of a path
/// that nests handlers (where Cedar needs room to evaluate). Boxed, each call holds only its
/// own handler's state; `whoami` allocates nothing.
pub async fn dispatch(shared: &Shared, ctx: &CallContext, call: ToolCall) -> Result<Value, ToolError> {
    match call {
        ToolCall::Whoami(_) => Ok(cluster::whoami(ctx)),
        ToolCall::NodeList(_) => Box::pin(cluster::node_list(shared)).await,
        ToolCall::NodeInspect(input) => Box::pin(cluster::node_inspect(shared, input)).await,
        ToolCall::AuditQuery(input) => Box::pin(cluster::audit_query(shared, input)).await,
        ToolCall::VmCreate(input) => Box::pin(vms::create(shared, ctx, input)).await,
        ToolCall::VmStart(input) => Box::pin(vms::start(shared, ctx, &input.vm)).await,
        ToolCall::VmStop(input) => {
            Box::pin(vms::stop(shared, ctx, &input.vm, input.force.unwrap_or(false), input.timeout_s)).await
        }
        ToolCall::VmDelete(input) => Box::pin(vms::delete(shared, ctx, &input.vm)).await,
        ToolCall::VmList(input) => Box::pin(vms::list(shared, ctx, input)).await,
        ToolCall::VmInspect(input) => Box::pin(vms::inspect(shared, ctx, &input.vm)).await,
        ToolCall::VmLogs(input) => Box::pin(vms::logs(shared, ctx, &input.vm, input.tail)).await,
        ToolCall::VmExec(input) => {
            // The guest kills the process at its timeout; the call gets a little longer to report it.
            let deadline = Duration::from_secs(u64::from(input.args.timeout_s.unwrap_or(60)) + 15);
            Box::pin(in_guest(shared, ctx, GuestTool::Exec, input, deadline)).await
        }
        ToolCall::VmExecStart(input) => Box::pin(in_guest(shared, ctx, GuestTool::ExecStart, input, GUEST_CALL)).await,
        ToolCall::VmExecStatus(input) => {
            Box::pin(in_guest(shared, ctx, GuestTool::ExecStatus, input, GUEST_CALL)).await
        }
        ToolCall::VmExecOutput(input) => {
            Box::pin(in_guest(shared, ctx, GuestTool::ExecOutput, input, GUEST_CALL)).await
        }
        ToolCall::VmExecKill(input) => Box::pin(in_guest(shared, ctx, GuestTool::ExecKill, input, GUEST_CALL)).await,
        ToolCall::VmFileRead(input) => Box::pin(in_guest(shared, ctx, GuestTool::FileRead, input, GUEST_CALL)).await,
        ToolCall::VmFileWrite(input) => Box::pin(in_guest(shared, ctx, GuestTool::FileWrite, input, GUEST_CALL)).await,
        ToolCall::VmFileDelete(input) => {
            Box::pin(in_guest(shared, ctx, GuestTool::FileDelete, input, GUEST_CALL)).await
        }
        ToolCall::VmFileList(input) => Box::pin(in_guest(shared, ctx, GuestTool::FileList, input, GUEST_CALL)).await,
        ToolCall::ImageList(input) => Box::pin(workspaces::image_list(shared, ctx, input)).await,
        ToolCall::ImageInspect(input) => Box::pin(workspaces::image_inspect(shared, ctx, input)).await,
        ToolCall::ImageImport(input) => Box::pin(workspaces::image_import(shared, input)).await,
        ToolCall::ImageDelete(input) => Box::pin(workspaces::image_delete(shared, ctx, input)).await,
        ToolCall::WorkspaceCreate(input) => Box::pin(workspaces::create(shared, ctx, input)).await,
        ToolCall::WorkspaceFork(input) => Box::pin(workspaces::fork(shared, ctx, input)).await,
        ToolCall::WorkspaceList(input) => Box::pin(workspaces::list(shared, ctx, input)).await,
        ToolCall::WorkspaceInspect(input) => Box::pin(workspaces::inspect(shared, ctx, &input.workspace)).await,
        ToolCall::WorkspaceDelete(input) => Box::pin(workspaces::delete(shared, ctx, &input.workspace)).await,
        ToolCall::NetworkCreate(input) => Box::pin(networks::network_create(shared, ctx, input)).await,
        ToolCall::NetworkList(input) => Box::pin(networks::network_list(shared, input)).await,
        ToolCall::NetworkInspect(input) => Box::pin(networks::network_inspect(shared, ctx, &input.network)).await,
        ToolCall::NetworkDelete(input) => Box::pin(networks::network_delete(shared, &input.network)).await,
        ToolCall::SecurityGroupCreate(input) => Box::pin(networks::group_create(shared, ctx, input)).await,
        ToolCall::SecurityGroupUpdate(input) => Box::pin(networks::group_update(shared, ctx, input)).await,
        ToolCall::SecurityGroupDelete(input) => Box::pin(networks::group_delete(shared, ctx, &input.group)).await,
        ToolCall::SecurityGroupList(input) => Box::pin(networks::group_list(shared, ctx, input)).await,
        ToolCall::SecurityGroupInspect(input) => Box::pin(networks::group_inspect(shared, ctx, &input.group)).await,
        ToolCall::PortForwardCreate(input) => Box::pin(networks::forward_create(shared, ctx, input)).await,
        ToolCall::PortForwardDelete(input) => Box::pin(networks::forward_delete(shared, ctx, &input.forward)).await,
        ToolCall::PortForwardList(input) => Box::pin(networks::forward_list(shared, ctx, input)).await,
        ToolCall::GitServiceEnsure(input) => Box::pin(git::service_ensure(shared, &input.network)).await,
        ToolCall::GitServiceList(_) => Box::pin(git::service_list(shared)).await,
        ToolCall::GitServiceInspect(input) => Box::pin(git::service_inspect(shared, &input.network)).await,
        ToolCall::GitServiceDelete(input) => {
            Box::pin(git::service_delete(shared, &input.network, input.delete_repositories.unwrap_or(false))).await
        }
        ToolCall::GitRepoCreate(input) => Box::pin(git::repo_create(shared, ctx, input)).await,
        ToolCall::GitRepoList(input) => Box::pin(git::repo_list(shared, ctx, input)).await,
        ToolCall::GitRepoDelete(input) => {
            Box::pin(git::repo_delete(shared, ctx, &input.repo, input.network.as_deref())).await
        }
        ToolCall::GitRepoLog(input) => Box::pin(git::repo_log(shared, ctx, input)).await,
        ToolCall::GitRepoBranches(input) => {
            Box::pin(git::repo_branches(shared, ctx, &input.repo, input.network.as_deref())).await
        }
        ToolCall::GitRepoPush(input) => Box::pin(git::repo_push(shared, ctx, input)).await,
        ToolCall::GitCredentialSet(input) => Box::pin(git::credential_set(shared, ctx, input)).await,
        ToolCall::GitCredentialDelete(input) => Box::pin(git::credential_delete(shared, ctx, input)).await,
        ToolCall::GitCredentialList(input) => Box::pin(git::credential_list(shared, ctx, input)).await,
        ToolCall::AgentCreate(input) => Box::pin(agents::create(shared, ctx, input)).await,
        ToolCall::AgentList(_) => Box::pin(agents::list(shared, ctx)).await,
        ToolCall::AgentInspect(input) => Box::pin(agents::inspect(shared, ctx, &input.agent)).await,
        ToolCall::AgentDelete(input) => Box::pin(agents::delete(shared, ctx, &input.agent)).await,
        ToolCall::DiskList(input) => Box::pin(disks::disk_list(shared, input)).await,
        ToolCall::DiskLayoutPlan(input) => Box::pin(disks::layout_plan(shared, input)).await,
        ToolCall::DiskLayoutApply(input) => Box::pin(disks::layout_apply(shared, input)).await,
        ToolCall::DiskLayoutList(input) => Box::pin(disks::layout_list(shared, input)).await,
        ToolCall::DiskLayoutStatus(input) => Box::pin(disks::layout_status(shared, &input.name)).await,
        ToolCall::DiskLayoutDelete(input) => Box::pin(disks::layout_delete(shared, &input.name)).await,
    }
}

pub fn to_value<T: serde::Serialize>(output: T) -> Value {
    serde_json::to_value(output).expect("tool output types serialize to JSON")
}

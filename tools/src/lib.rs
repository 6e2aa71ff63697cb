//! The typed tool contract every moat transport serves: one [`ToolName`] per
//! tool, its [`ToolSpec`] (description written for a model, annotations,
//! schemas, rate-limit class) and its typed input as one [`ToolCall`] variant.
//!
//! This crate does no IO. The gateway validates raw arguments against
//! [`ToolSpec::input_schema`] first, then turns them into a [`ToolCall`] and
//! dispatches on it with one exhaustive `match`, so adding a tool here forces
//! every layer to decide what it does.

pub mod agent;
pub mod audit;
pub mod cluster;
pub mod disk;
pub mod git;
pub mod guest;
pub mod names;
pub mod network;
pub mod vm;
pub mod vm_guest;
pub mod workspace;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

pub use agent::{
    AgentCreateInput, AgentDeleteOutput, AgentListInput, AgentListOutput, AgentMember, AgentOutput, AgentRefInput,
    AgentVm, ModelProvider, PortalAgent, PortalRole,
};
pub use audit::{AuditQueryInput, AuditQueryOutput, AuditRecord};
pub use cluster::{
    KvmState, NodeDetail, NodeInspectInput, NodeInspectOutput, NodeListInput, NodeListOutput, NodeSummary, Protection,
    StorageState, VmmState, WhoamiInput, WhoamiOutput,
};
pub use disk::{
    BlockDevice, DeviceUse, DiskApplier, DiskInfo, DiskLayout, DiskLayoutApplyInput, DiskLayoutDeleteOutput,
    DiskLayoutListInput, DiskLayoutListOutput, DiskLayoutOutput, DiskLayoutPlanInput, DiskLayoutPlanOutput,
    DiskLayoutRefInput, DiskLayoutStatus, DiskListInput, DiskListOutput, DiskManagement, DiskSnapshot, DiskSpec,
    Filesystem, LayoutArg, LayoutKind, LayoutMetadata, LayoutPhase, LayoutSpec, PartType, PartitionSpec,
    PartitionTable, Refusal, RefusalCode, RefusalReason, Verdict,
};
pub use git::{
    GitBranch, GitCommit, GitCredentialDeleteInput, GitCredentialDeleteOutput, GitCredentialInfo,
    GitCredentialListInput, GitCredentialListOutput, GitCredentialOutput, GitCredentialSetInput, GitRepoBranchesOutput,
    GitRepoCreateInput, GitRepoDeleteOutput, GitRepoInfo, GitRepoListInput, GitRepoListOutput, GitRepoLogInput,
    GitRepoLogOutput, GitRepoOutput, GitRepoPushInput, GitRepoPushOutput, GitRepoRefInput, GitServiceDeleteInput,
    GitServiceDeleteOutput, GitServiceInfo, GitServiceListInput, GitServiceListOutput, GitServiceOutput,
    GitServiceRefInput,
};
pub use guest::{GuestTool, InVm};
pub use network::{
    DeletedOutput, EgressRule, IngressRule, NetworkCreateInput, NetworkInfo, NetworkListInput, NetworkListOutput,
    NetworkMode, NetworkOutput, NetworkRefInput, NetworkVm, NicInfo, PortForwardCreateInput, PortForwardInfo,
    PortForwardListInput, PortForwardListOutput, PortForwardOutput, PortForwardRefInput, Protocol,
    SecurityGroupCreateInput, SecurityGroupInfo, SecurityGroupListInput, SecurityGroupListOutput, SecurityGroupOutput,
    SecurityGroupRefInput, SecurityGroupUpdateInput,
};
pub use vm::{
    AgentInfo, LabelValue, VmCreateInput, VmDeleteOutput, VmInfo, VmListInput, VmListOutput, VmLogsInput, VmLogsOutput,
    VmOutput, VmRefInput, VmState, VmStopInput,
};
pub use vm_guest::{VmExecIdInput, VmExecInput, VmExecOutputInput, VmFileReadInput, VmFileWriteInput, VmPathInput};
pub use workspace::{
    Attachment, DataWorkspace, ImageDeleteOutput, ImageImportInput, ImageInfo, ImageListInput, ImageListOutput,
    ImageOutput, ImageRefInput, WorkspaceCreateInput, WorkspaceDeleteOutput, WorkspaceForkInput, WorkspaceInfo,
    WorkspaceListInput, WorkspaceListOutput, WorkspaceOutput, WorkspaceRefInput,
};

/// A JSON object, as MCP carries tool schemas and arguments.
pub type JsonObject = Map<String, Value>;

/// The one declaration of every tool: variant, wire name (`noun_verb`), input type and spec.
/// [`ToolName`] (with [`ToolName::ALL`], the `tools/list` order), [`ToolCall`] and their
/// decoding are generated from it, so a tool cannot be listed without being decodable or
/// decodable without being listed.
macro_rules! tool_table {
    ($($variant:ident => $name:literal, $input:ty, $spec:expr;)+) => {
        /// Every tool moat serves. Names are `noun_verb` on the wire.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ToolName {
            $($variant,)+
        }

        impl ToolName {
            /// All tools, in the order `tools/list` shows them.
            pub const ALL: &'static [ToolName] = &[$(ToolName::$variant,)+];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ToolName::$variant => $name,)+
                }
            }

            pub fn spec(self) -> ToolSpec {
                match self {
                    $(ToolName::$variant => $spec,)+
                }
            }
        }

        /// A decoded call: one variant per tool, carrying its typed input.
        #[derive(Debug, Clone, PartialEq)]
        pub enum ToolCall {
            $($variant($input),)+
        }

        impl ToolCall {
            /// Decodes arguments that already passed [`ToolSpec::input_schema`].
            ///
            /// Missing arguments are treated as `{}` so that tools without required
            /// inputs can be called bare, as MCP clients commonly do.
            pub fn decode(name: ToolName, arguments: Option<JsonObject>) -> Result<ToolCall, DecodeError> {
                let args = Value::Object(arguments.unwrap_or_default());
                Ok(match name {
                    $(ToolName::$variant => ToolCall::$variant(typed(name, args)?),)+
                })
            }

            pub fn name(&self) -> ToolName {
                match self {
                    $(ToolCall::$variant(_) => ToolName::$variant,)+
                }
            }
        }
    };
}

tool_table! {
    Whoami => "whoami", WhoamiInput, cluster::whoami_spec();
    NodeList => "node_list", NodeListInput, cluster::node_list_spec();
    NodeInspect => "node_inspect", NodeInspectInput, cluster::node_inspect_spec();
    AuditQuery => "audit_query", AuditQueryInput, audit::audit_query_spec();
    VmCreate => "vm_create", VmCreateInput, vm::vm_create_spec();
    VmStart => "vm_start", VmRefInput, vm::vm_start_spec();
    VmStop => "vm_stop", VmStopInput, vm::vm_stop_spec();
    VmDelete => "vm_delete", VmRefInput, vm::vm_delete_spec();
    VmList => "vm_list", VmListInput, vm::vm_list_spec();
    VmInspect => "vm_inspect", VmRefInput, vm::vm_inspect_spec();
    VmLogs => "vm_logs", VmLogsInput, vm::vm_logs_spec();
    VmExec => "vm_exec", VmExecInput, vm_guest::spec::<VmExecInput>(ToolName::VmExec, GuestTool::Exec);
    VmExecStart => "vm_exec_start", VmExecInput, vm_guest::spec::<VmExecInput>(ToolName::VmExecStart, GuestTool::ExecStart);
    VmExecStatus => "vm_exec_status", VmExecIdInput, vm_guest::spec::<VmExecIdInput>(ToolName::VmExecStatus, GuestTool::ExecStatus);
    VmExecOutput => "vm_exec_output", VmExecOutputInput, vm_guest::spec::<VmExecOutputInput>(ToolName::VmExecOutput, GuestTool::ExecOutput);
    VmExecKill => "vm_exec_kill", VmExecIdInput, vm_guest::spec::<VmExecIdInput>(ToolName::VmExecKill, GuestTool::ExecKill);
    VmFileRead => "vm_file_read", VmFileReadInput, vm_guest::spec::<VmFileReadInput>(ToolName::VmFileRead, GuestTool::FileRead);
    VmFileWrite => "vm_file_write", VmFileWriteInput, vm_guest::spec::<VmFileWriteInput>(ToolName::VmFileWrite, GuestTool::FileWrite);
    VmFileDelete => "vm_file_delete", VmPathInput, vm_guest::spec::<VmPathInput>(ToolName::VmFileDelete, GuestTool::FileDelete);
    VmFileList => "vm_file_list", VmPathInput, vm_guest::spec::<VmPathInput>(ToolName::VmFileList, GuestTool::FileList);
    ImageList => "image_list", ImageListInput, workspace::image_list_spec();
    ImageInspect => "image_inspect", ImageRefInput, workspace::image_inspect_spec();
    ImageImport => "image_import", ImageImportInput, workspace::image_import_spec();
    ImageDelete => "image_delete", ImageRefInput, workspace::image_delete_spec();
    WorkspaceCreate => "workspace_create", WorkspaceCreateInput, workspace::workspace_create_spec();
    WorkspaceFork => "workspace_fork", WorkspaceForkInput, workspace::workspace_fork_spec();
    WorkspaceList => "workspace_list", WorkspaceListInput, workspace::workspace_list_spec();
    WorkspaceInspect => "workspace_inspect", WorkspaceRefInput, workspace::workspace_inspect_spec();
    WorkspaceDelete => "workspace_delete", WorkspaceRefInput, workspace::workspace_delete_spec();
    NetworkCreate => "network_create", NetworkCreateInput, network::network_create_spec();
    NetworkList => "network_list", NetworkListInput, network::network_list_spec();
    NetworkInspect => "network_inspect", NetworkRefInput, network::network_inspect_spec();
    NetworkDelete => "network_delete", NetworkRefInput, network::network_delete_spec();
    SecurityGroupCreate => "security_group_create", SecurityGroupCreateInput, network::security_group_create_spec();
    SecurityGroupUpdate => "security_group_update", SecurityGroupUpdateInput, network::security_group_update_spec();
    SecurityGroupDelete => "security_group_delete", SecurityGroupRefInput, network::security_group_delete_spec();
    SecurityGroupList => "security_group_list", SecurityGroupListInput, network::security_group_list_spec();
    SecurityGroupInspect => "security_group_inspect", SecurityGroupRefInput, network::security_group_inspect_spec();
    PortForwardCreate => "port_forward_create", PortForwardCreateInput, network::port_forward_create_spec();
    PortForwardDelete => "port_forward_delete", PortForwardRefInput, network::port_forward_delete_spec();
    PortForwardList => "port_forward_list", PortForwardListInput, network::port_forward_list_spec();
    GitServiceEnsure => "git_service_ensure", GitServiceRefInput, git::git_service_ensure_spec();
    GitServiceList => "git_service_list", GitServiceListInput, git::git_service_list_spec();
    GitServiceInspect => "git_service_inspect", GitServiceRefInput, git::git_service_inspect_spec();
    GitServiceDelete => "git_service_delete", GitServiceDeleteInput, git::git_service_delete_spec();
    GitRepoCreate => "git_repo_create", GitRepoCreateInput, git::git_repo_create_spec();
    GitRepoList => "git_repo_list", GitRepoListInput, git::git_repo_list_spec();
    GitRepoDelete => "git_repo_delete", GitRepoRefInput, git::git_repo_delete_spec();
    GitRepoLog => "git_repo_log", GitRepoLogInput, git::git_repo_log_spec();
    GitRepoBranches => "git_repo_branches", GitRepoRefInput, git::git_repo_branches_spec();
    GitRepoPush => "git_repo_push", GitRepoPushInput, git::git_repo_push_spec();
    GitCredentialSet => "git_credential_set", GitCredentialSetInput, git::git_credential_set_spec();
    GitCredentialDelete => "git_credential_delete", GitCredentialDeleteInput, git::git_credential_delete_spec();
    GitCredentialList => "git_credential_list", GitCredentialListInput, git::git_credential_list_spec();
    AgentCreate => "agent_create", AgentCreateInput, agent::agent_create_spec();
    AgentList => "agent_list", AgentListInput, agent::agent_list_spec();
    AgentInspect => "agent_inspect", AgentRefInput, agent::agent_inspect_spec();
    AgentDelete => "agent_delete", AgentRefInput, agent::agent_delete_spec();
    DiskList => "disk_list", DiskListInput, disk::disk_list_spec();
    DiskLayoutPlan => "disk_layout_plan", DiskLayoutPlanInput, disk::disk_layout_plan_spec();
    DiskLayoutApply => "disk_layout_apply", DiskLayoutApplyInput, disk::disk_layout_apply_spec();
    DiskLayoutList => "disk_layout_list", DiskLayoutListInput, disk::disk_layout_list_spec();
    DiskLayoutStatus => "disk_layout_status", DiskLayoutRefInput, disk::disk_layout_status_spec();
    DiskLayoutDelete => "disk_layout_delete", DiskLayoutRefInput, disk::disk_layout_delete_spec();
}

impl ToolName {
    pub fn parse(name: &str) -> Option<ToolName> {
        ToolName::ALL.iter().copied().find(|t| t.as_str() == name)
    }

    /// The Cedar action a principal needs to call this tool: `Action::"<name>"`.
    pub const fn cedar_action(self) -> &'static str {
        self.as_str()
    }
}

impl std::fmt::Display for ToolName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which rate-limit bucket a tool draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ToolClass {
    /// Inspects state; never changes anything.
    Read,
    /// Creates, changes or deletes resources.
    Write,
    /// Runs code or moves data inside a guest.
    Exec,
}

/// The Cedar action group a tool's action belongs to; roles are granted groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActionGroup {
    /// Identity and read-only views of shared infrastructure (nodes).
    Read,
    /// VM lifecycle, exec and files.
    Vm,
    /// Workspaces and images.
    Workspace,
    /// Networks and security groups.
    Network,
    /// Git repositories and remote credentials.
    Git,
    /// Disk layouts.
    Disk,
    /// Node management and the audit log.
    Cluster,
}

impl ActionGroup {
    pub const ALL: &'static [ActionGroup] = &[
        ActionGroup::Read,
        ActionGroup::Vm,
        ActionGroup::Workspace,
        ActionGroup::Network,
        ActionGroup::Git,
        ActionGroup::Disk,
        ActionGroup::Cluster,
    ];

    /// The group's Cedar action id, e.g. `Action::"group:read"`.
    pub const fn cedar_id(self) -> &'static str {
        match self {
            ActionGroup::Read => "group:read",
            ActionGroup::Vm => "group:vm",
            ActionGroup::Workspace => "group:workspace",
            ActionGroup::Network => "group:network",
            ActionGroup::Git => "group:git",
            ActionGroup::Disk => "group:disk",
            ActionGroup::Cluster => "group:cluster",
        }
    }
}

/// What a tool acts on, as the authorizer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    /// The deployment as a whole (whoami, listings, the audit log).
    Cluster,
    /// One node, named by the call's `node` argument.
    Node,
    /// One VM, named by the call's `vm` argument (or `name`, when creating it); owned.
    Vm,
    /// One workspace, named by `workspace` (or `name`, when creating it); owned.
    Workspace,
    /// One image on a node; shared, no owner.
    Image,
    /// One network, named by `network` (or `name`, when creating it); shared, no owner.
    Network,
    /// One security group, named by `group` (or `name`, when creating it); owned.
    SecurityGroup,
    /// One port forward, named by `forward`; owned.
    PortForward,
    /// One git repository, named by `repo` (or `name`, when creating it); owned.
    GitRepo,
    /// The caller's own remote git credential for a host; owned.
    GitCredential,
    /// One portal agent (a portal and a work VM), named by `agent` (or `name`, when creating
    /// it); owned.
    Agent,
    /// One DiskLayout, named by `name` or the layout's `metadata.name`; shared, no owner.
    DiskLayout,
}

impl ResourceKind {
    /// Kinds that never have an owner: shared infrastructure.
    pub const fn is_shared(self) -> bool {
        matches!(
            self,
            ResourceKind::Cluster
                | ResourceKind::Node
                | ResourceKind::Image
                | ResourceKind::Network
                | ResourceKind::DiskLayout
        )
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Cluster => "cluster",
            ResourceKind::Node => "node",
            ResourceKind::Vm => "vm",
            ResourceKind::Workspace => "workspace",
            ResourceKind::Image => "image",
            ResourceKind::Network => "network",
            ResourceKind::SecurityGroup => "security_group",
            ResourceKind::PortForward => "port_forward",
            ResourceKind::GitRepo => "git_repo",
            ResourceKind::GitCredential => "git_credential",
            ResourceKind::Agent => "agent",
            ResourceKind::DiskLayout => "disk_layout",
        }
    }
}

/// MCP tool annotations. All are hints to clients; moat's own checks never rely on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hints {
    pub read_only: bool,
    pub destructive: bool,
    pub idempotent: bool,
    /// True when the tool reaches outside moat's own hosts (e.g. a git push).
    pub open_world: bool,
}

impl Hints {
    pub const READ: Hints = Hints { read_only: true, destructive: false, idempotent: true, open_world: false };
}

/// Everything a transport needs to list a tool and an authorizer needs to judge it.
#[derive(Debug, Clone)]
pub struct ToolSpec {
    pub name: ToolName,
    pub title: &'static str,
    pub description: &'static str,
    pub hints: Hints,
    pub class: ToolClass,
    pub group: ActionGroup,
    pub resource: ResourceKind,
    /// A valid input, used by tests that call every tool and by docs.
    pub example: Value,
    pub input_schema: JsonObject,
    pub output_schema: JsonObject,
}

/// The whole catalog, in listing order.
pub fn catalog() -> Vec<ToolSpec> {
    ToolName::ALL.iter().map(|t| t.spec()).collect()
}

impl ToolCall {
    /// The resource this call names (a node name, a VM id or name, a new VM's name), if any.
    pub fn resource_id(&self) -> Option<&str> {
        match self {
            ToolCall::Whoami(_) | ToolCall::NodeList(_) | ToolCall::AuditQuery(_) | ToolCall::VmList(_) => None,
            ToolCall::NodeInspect(input) => Some(&input.node),
            ToolCall::VmCreate(input) => Some(&input.name),
            ToolCall::VmStart(input) | ToolCall::VmDelete(input) | ToolCall::VmInspect(input) => Some(&input.vm),
            ToolCall::VmStop(input) => Some(&input.vm),
            ToolCall::VmLogs(input) => Some(&input.vm),
            ToolCall::VmExec(input) | ToolCall::VmExecStart(input) => Some(&input.vm),
            ToolCall::VmExecStatus(input) | ToolCall::VmExecKill(input) => Some(&input.vm),
            ToolCall::VmExecOutput(input) => Some(&input.vm),
            ToolCall::VmFileRead(input) => Some(&input.vm),
            ToolCall::VmFileWrite(input) => Some(&input.vm),
            ToolCall::VmFileDelete(input) | ToolCall::VmFileList(input) => Some(&input.vm),
            ToolCall::ImageList(_) | ToolCall::WorkspaceList(_) => None,
            ToolCall::ImageInspect(input) | ToolCall::ImageDelete(input) => Some(&input.image),
            ToolCall::ImageImport(input) => Some(&input.name),
            ToolCall::WorkspaceCreate(input) => Some(&input.name),
            ToolCall::WorkspaceFork(input) => Some(&input.workspace),
            ToolCall::WorkspaceInspect(input) | ToolCall::WorkspaceDelete(input) => Some(&input.workspace),
            ToolCall::NetworkList(_) | ToolCall::SecurityGroupList(_) | ToolCall::PortForwardList(_) => None,
            ToolCall::NetworkCreate(input) => Some(&input.name),
            ToolCall::NetworkInspect(input) | ToolCall::NetworkDelete(input) => Some(&input.network),
            ToolCall::SecurityGroupCreate(input) => Some(&input.name),
            ToolCall::SecurityGroupUpdate(input) => Some(&input.group),
            ToolCall::SecurityGroupDelete(input) | ToolCall::SecurityGroupInspect(input) => Some(&input.group),
            ToolCall::PortForwardCreate(input) => Some(&input.vm),
            ToolCall::PortForwardDelete(input) => Some(&input.forward),
            ToolCall::GitServiceList(_) | ToolCall::GitRepoList(_) | ToolCall::GitCredentialList(_) => None,
            ToolCall::GitServiceEnsure(input) | ToolCall::GitServiceInspect(input) => Some(&input.network),
            ToolCall::GitServiceDelete(input) => Some(&input.network),
            ToolCall::GitRepoCreate(input) => Some(&input.name),
            ToolCall::GitRepoDelete(input) | ToolCall::GitRepoBranches(input) => Some(&input.repo),
            ToolCall::GitRepoLog(input) => Some(&input.repo),
            ToolCall::GitRepoPush(input) => Some(&input.repo),
            ToolCall::GitCredentialSet(input) => Some(&input.remote_host),
            ToolCall::GitCredentialDelete(input) => Some(&input.remote_host),
            ToolCall::AgentList(_) => None,
            ToolCall::AgentCreate(input) => Some(&input.name),
            ToolCall::AgentInspect(input) | ToolCall::AgentDelete(input) => Some(&input.agent),
            ToolCall::DiskList(input) => Some(&input.node),
            ToolCall::DiskLayoutList(_) => None,
            ToolCall::DiskLayoutPlan(input) => input.layout.name(),
            ToolCall::DiskLayoutApply(input) => input.layout.name(),
            ToolCall::DiskLayoutStatus(input) | ToolCall::DiskLayoutDelete(input) => Some(&input.name),
        }
    }
}

fn typed<T: DeserializeOwned>(tool: ToolName, args: Value) -> Result<T, DecodeError> {
    serde_json::from_value(args).map_err(|source| DecodeError { tool, source })
}

/// Arguments that passed the schema but still do not decode: a contract bug, reported as such.
#[derive(Debug, thiserror::Error)]
#[error("arguments for {tool} do not match its input type")]
pub struct DecodeError {
    pub tool: ToolName,
    #[source]
    pub source: serde_json::Error,
}

/// A tool's spec from its input type `I` and output type `O`.
pub(crate) fn spec_for<I: schemars::JsonSchema, O: schemars::JsonSchema>(
    name: ToolName,
    title: &'static str,
    description: &'static str,
    hints: Hints,
    (class, group, resource): (ToolClass, ActionGroup, ResourceKind),
    example: Value,
) -> ToolSpec {
    ToolSpec {
        name,
        title,
        description,
        hints,
        class,
        group,
        resource,
        example,
        input_schema: schema_object::<I>(),
        output_schema: schema_object::<O>(),
    }
}

/// Generates a tool schema as a JSON object (draft 2020-12, what MCP expects).
pub fn schema_object<T: schemars::JsonSchema>() -> JsonObject {
    match schemars::schema_for!(T).to_value() {
        Value::Object(map) => map,
        other => {
            // A derived schema is always an object; keep the contract total anyway.
            let mut map = JsonObject::new();
            map.insert("allOf".into(), Value::Array(vec![other]));
            map
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_noun_verb() {
        let mut seen = std::collections::HashSet::new();
        for &tool in ToolName::ALL {
            assert!(seen.insert(tool.as_str()), "{tool} is declared twice");
            assert_eq!(tool.spec().name, tool, "{tool}'s spec names another tool");
            assert_eq!(ToolName::parse(tool.as_str()), Some(tool));
            assert!(tool.as_str().chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{tool}");
        }
        assert_eq!(ToolName::parse("vm_explode"), None);
    }

    #[test]
    fn every_input_schema_is_a_closed_object() {
        for spec in catalog() {
            assert_eq!(spec.input_schema.get("type"), Some(&Value::from("object")), "{}", spec.name);
            assert_eq!(
                spec.input_schema.get("additionalProperties"),
                Some(&Value::Bool(false)),
                "{} must reject unknown fields",
                spec.name
            );
            assert_eq!(spec.output_schema.get("type"), Some(&Value::from("object")), "{}", spec.name);
            assert!(spec.description.len() > 40, "{} needs a description a model can use", spec.name);
            let example = spec.example.as_object().cloned();
            ToolCall::decode(spec.name, example)
                .unwrap_or_else(|e| panic!("{}: example does not decode: {e}", spec.name));
        }
    }

    #[test]
    fn decode_table() {
        let obj = |v: Value| v.as_object().cloned();
        let cases: Vec<(ToolName, Option<JsonObject>, Result<ToolCall, ()>)> = vec![
            (ToolName::Whoami, None, Ok(ToolCall::Whoami(WhoamiInput {}))),
            (ToolName::NodeList, obj(serde_json::json!({})), Ok(ToolCall::NodeList(NodeListInput {}))),
            (
                ToolName::NodeInspect,
                obj(serde_json::json!({"node": "n1"})),
                Ok(ToolCall::NodeInspect(NodeInspectInput { node: "n1".into() })),
            ),
            (ToolName::NodeInspect, None, Err(())),
            (ToolName::Whoami, obj(serde_json::json!({"x": 1})), Err(())),
        ];
        for (name, args, want) in cases {
            let got = ToolCall::decode(name, args.clone()).map_err(|_| ());
            assert_eq!(got, want, "{name} {args:?}");
            if let Ok(call) = got {
                assert_eq!(call.name(), name);
            }
        }
    }
}

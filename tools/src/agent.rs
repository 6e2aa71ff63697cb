//! Portal agents: a portal VM and a work VM made, listed and deleted as one unit. An MCP client
//! inside the portal (OpenClaw, say) reaches moat through `moat-guest mcp` over vsock, as the
//! portal VM's own identity (`vm:<id>`, acting for the agent's owner, with the role chosen
//! here); that identity may act only on its paired work VM and the workspaces given to it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{ActionGroup, Hints, ResourceKind, ToolClass, ToolName, ToolSpec, spec_for as spec};

/// An agent name: a DNS label short enough that `<name>-portal` is one too.
pub const AGENT_NAME: &str = r"^[a-z0-9]([a-z0-9-]{0,54}[a-z0-9])?$";

/// The role a portal VM calls moat with; never more than its owner's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PortalRole {
    Reader,
    Agent,
    VmAdmin,
}

impl PortalRole {
    pub const fn as_str(self) -> &'static str {
        match self {
            PortalRole::Reader => "reader",
            PortalRole::Agent => "agent",
            PortalRole::VmAdmin => "vm-admin",
        }
    }
}

/// One member VM of an agent, as `vm_create` would make it (its name is the agent's name with
/// `-portal` or `-work`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentMember {
    /// Virtual CPUs [default: 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub vcpus: Option<u32>,
    /// Memory in MiB [default: 256; a Debian-based image wants 512 or more].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 64, max = 262144))]
    pub memory_mib: Option<u64>,
    /// Image to boot [default: "base"]; for the portal, an image with an MCP client in it
    /// (`moat image build portal` makes one with OpenClaw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub image: Option<String>,
    /// Boot from this workspace of yours instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub workspace: Option<String>,
    /// More workspaces of yours, mounted at /workspaces/<name>; at most 8. The portal may act on
    /// the ones given to either member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub data_workspaces: Option<Vec<crate::workspace::DataWorkspace>>,
    /// Put the VM on this network (name or id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub network: Option<String>,
    /// Your security groups on that network; at most 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub security_groups: Option<Vec<crate::names::Label>>,
    /// Node to place the VM on [default: as vm_create places it].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub node: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentCreateInput {
    /// Agent name, a DNS label of at most 56 characters; unique among your agents. Its VMs are
    /// `<name>-portal` and `<name>-work`.
    #[schemars(length(min = 1, max = 56), regex(pattern = AGENT_NAME))]
    pub name: String,
    /// The portal VM: where the agent's MCP client runs and calls moat over vsock.
    pub portal: AgentMember,
    /// The work VM the portal acts on.
    pub work: AgentMember,
    /// The role the portal calls moat with [default: "agent"]; at most your own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<PortalRole>,
    /// Return only once both guest agents answer [default: true].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ready: Option<bool>,
    /// An API key for the portal's model provider, so its agent runtime (OpenClaw) can run
    /// turns: written into the portal as `/root/.openclaw/.env` (mode 0600) through the guest
    /// agent, and never stored, logged or audited by moat. Needs wait_ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub model_api_key: Option<String>,
    /// Whose key `model_api_key` is [default: "anthropic"].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_provider: Option<ModelProvider>,
}

/// A model provider whose key a portal can be given, by the variable OpenClaw reads it from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ModelProvider {
    #[default]
    Anthropic,
    Openai,
    Openrouter,
    Gemini,
}

impl ModelProvider {
    /// The environment variable the key is written as.
    pub const fn env_var(self) -> &'static str {
        match self {
            ModelProvider::Anthropic => "ANTHROPIC_API_KEY",
            ModelProvider::Openai => "OPENAI_API_KEY",
            ModelProvider::Openrouter => "OPENROUTER_API_KEY",
            ModelProvider::Gemini => "GEMINI_API_KEY",
        }
    }
}

/// Where a portal's model key is written: OpenClaw's global `.env`, which it reads at start.
pub const MODEL_KEY_FILE: &str = "/root/.openclaw/.env";

/// Names one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentRefInput {
    /// The agent's name (or id).
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub agent: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentListInput {}

/// One member VM as the agent tools show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentVm {
    pub id: String,
    pub name: String,
    pub node: String,
    /// As the database last knew it, e.g. "running".
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PortalAgent {
    pub id: String,
    pub name: String,
    pub owner: String,
    /// The role the portal calls moat with.
    pub role: String,
    /// The principal the portal's calls are made and audited as: `vm:<portal id>`.
    pub principal: String,
    pub portal: AgentVm,
    pub work: AgentVm,
    /// Workspace ids the portal may act on (those given to its members).
    pub workspaces: Vec<String>,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentOutput {
    pub agent: PortalAgent,
    /// How an MCP client in the portal reaches moat.
    pub mcp_server: serde_json::Value,
    /// Where the model key went, when one was given: `<file> (<VARIABLE>)`; never the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentListOutput {
    pub agents: Vec<PortalAgent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentDeleteOutput {
    /// The agent's name.
    pub deleted: String,
    /// The member VMs deleted with it.
    pub vms: Vec<String>,
}

/// How a portal's MCP client is configured (OpenClaw's `mcp.servers.moat`, Claude's
/// `mcpServers.moat`).
pub fn mcp_server_entry() -> serde_json::Value {
    json!({"command": "moat-guest", "args": ["mcp"]})
}

const CREATE: Hints = Hints { read_only: false, destructive: false, idempotent: false, open_world: false };
const DELETE: Hints = Hints { read_only: false, destructive: true, idempotent: false, open_world: false };

pub(crate) fn agent_create_spec() -> ToolSpec {
    spec::<AgentCreateInput, AgentOutput>(
        ToolName::AgentCreate,
        "Create a portal agent",
        "Creates an agent you own: a portal VM, where an MCP client (OpenClaw, say) runs and calls \
         moat through `moat-guest mcp` over vsock as the portal's own identity (no key in the VM), \
         and a work VM the portal acts on. The portal's role is at most yours; it may act only on \
         its work VM and the workspaces given to its members. Both VMs are made, or neither.",
        CREATE,
        (ToolClass::Write, ActionGroup::Vm, ResourceKind::Agent),
        json!({"name": "coder", "portal": {"memory_mib": 256}, "work": {"vcpus": 2, "memory_mib": 512}}),
    )
}

pub(crate) fn agent_list_spec() -> ToolSpec {
    spec::<AgentListInput, AgentListOutput>(
        ToolName::AgentList,
        "List portal agents",
        "Lists the agents you may see (your own; all for admins and readers): their portal and \
         work VMs, role and principal.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Read, ResourceKind::Agent),
        json!({}),
    )
}

pub(crate) fn agent_inspect_spec() -> ToolSpec {
    spec::<AgentRefInput, AgentOutput>(
        ToolName::AgentInspect,
        "Inspect a portal agent",
        "Shows one agent: its portal and work VMs with their state, the role and principal the \
         portal calls moat as, and how its MCP client is configured.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Read, ResourceKind::Agent),
        json!({"agent": "coder"}),
    )
}

pub(crate) fn agent_delete_spec() -> ToolSpec {
    spec::<AgentRefInput, AgentDeleteOutput>(
        ToolName::AgentDelete,
        "Delete a portal agent",
        "Deletes an agent and both its VMs (the portal's sessions with moat end). Workspaces given \
         to them stay.",
        DELETE,
        (ToolClass::Write, ActionGroup::Vm, ResourceKind::Agent),
        json!({"agent": "coder"}),
    )
}

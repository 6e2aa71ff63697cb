//! Cluster tools: who the caller is, and which hosts moat can place work on.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use serde_json::json;

use crate::{ActionGroup, Hints, ResourceKind, ToolClass, ToolName, ToolSpec, schema_object};

/// `whoami` takes no arguments.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WhoamiInput {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WhoamiOutput {
    /// The principal moat resolved for this connection (API key name, the local operator, or
    /// `vm:<id>` for a portal VM).
    pub principal: String,
    /// For a portal VM: the owner it acts for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acting_for: Option<String>,
    /// The principal's role: reader, agent, vm-admin or cluster-admin.
    pub role: String,
    /// How this call arrived: "stdio", "http" or "vsock" (a portal VM).
    pub transport: String,
    /// MCP protocol version negotiated for this call, e.g. "2025-11-25" or "2026-07-28".
    pub protocol_version: Option<String>,
    /// Streamable HTTP session id, when the client uses sessions.
    pub session: Option<String>,
    /// Version of the moat gateway answering.
    pub server_version: String,
}

/// `node_list` takes no arguments.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeListInput {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NodeListOutput {
    pub nodes: Vec<NodeSummary>,
}

/// One host as `node_list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NodeSummary {
    /// Node name; pass it to `node_inspect` or as the `node` of tools that place work.
    pub name: String,
    /// Whether the node answered just now.
    pub reachable: bool,
    /// Why the node is unreachable, when it is.
    pub error: Option<String>,
    /// When the node last answered (RFC 3339, UTC), if ever.
    pub last_seen: Option<String>,
    pub hostname: Option<String>,
    pub cpus: Option<u32>,
    pub memory_total_mib: Option<u64>,
    /// Whether hardware virtualization works on this node (not merely present).
    pub kvm_usable: Option<bool>,
    /// Installed VMMs, e.g. ["qemu"].
    pub vmms: Vec<String>,
    /// The VMM new VMs run under here ("qemu"), or null when the node has none.
    pub runtime: Option<String>,
    /// "kvm" or "tcg" (software emulation, several times slower).
    pub accel: Option<String>,
    /// VMs defined on the node and the vCPUs and memory they are allocated.
    pub vm_count: Option<u32>,
    pub allocated_vcpus: Option<u32>,
    pub allocated_memory_mib: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeInspectInput {
    /// Name of the node, as `node_list` shows it.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NodeInspectOutput {
    pub node: NodeDetail,
}

/// Everything moat knows about one host, fresh from the node agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NodeDetail {
    pub name: String,
    /// How the gateway reaches the node, e.g. "unix:/var/lib/moat/node.sock" or "http://10.0.0.2:7443".
    pub address: String,
    pub reachable: bool,
    pub error: Option<String>,
    pub last_seen: Option<String>,
    pub hostname: Option<String>,
    pub agent_version: Option<String>,
    pub cpus: Option<u32>,
    pub memory_total_mib: Option<u64>,
    pub memory_available_mib: Option<u64>,
    /// Kernel release, e.g. "6.1.0-28-amd64".
    pub kernel: Option<String>,
    pub arch: Option<String>,
    pub kvm: Option<KvmState>,
    pub vmms: Vec<VmmState>,
    pub storage: Option<StorageState>,
    /// The VMM new VMs run under here ("qemu"), or null when the node has none.
    pub runtime: Option<String>,
    /// "kvm" or "tcg" (software emulation, several times slower).
    pub accel: Option<String>,
    /// Why the node cannot run VMs, in words an operator can act on.
    pub runtime_detail: Option<String>,
    /// Guest images the node can boot, e.g. ["base"].
    #[serde(default)]
    pub images: Vec<String>,
    /// VMs defined on the node and the vCPUs and memory they are allocated (running or not).
    pub vm_count: Option<u32>,
    pub allocated_vcpus: Option<u32>,
    pub allocated_memory_mib: Option<u64>,
    /// How this node walls each VM's processes off from the host and from each other, and
    /// which of those protections it cannot give here (and why).
    #[serde(default)]
    pub protections: Vec<Protection>,
}

/// One protection around a VM's processes: a uid of its own, a seccomp filter, a cgroup with
/// limits, files only it can reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Protection {
    /// "user", "seccomp", "cgroup" or "files".
    pub name: String,
    /// Whether it is in force.
    pub on: bool,
    /// What exactly is in force, or why it cannot be.
    pub detail: String,
}

impl Protection {
    pub fn on(name: &str, detail: impl Into<String>) -> Protection {
        Protection { name: name.into(), on: true, detail: detail.into() }
    }
    pub fn off(name: &str, detail: impl Into<String>) -> Protection {
        Protection { name: name.into(), on: false, detail: detail.into() }
    }
}

impl NodeDetail {
    /// A node never heard from: its name and address, nothing else known.
    pub fn unknown(name: &str, address: &str) -> NodeDetail {
        NodeDetail {
            name: name.to_string(),
            address: address.to_string(),
            reachable: false,
            error: None,
            last_seen: None,
            hostname: None,
            agent_version: None,
            cpus: None,
            memory_total_mib: None,
            memory_available_mib: None,
            kernel: None,
            arch: None,
            kvm: None,
            vmms: Vec::new(),
            storage: None,
            runtime: None,
            accel: None,
            runtime_detail: None,
            images: Vec::new(),
            vm_count: None,
            allocated_vcpus: None,
            allocated_memory_mib: None,
            protections: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct KvmState {
    /// /dev/kvm exists.
    pub present: bool,
    /// /dev/kvm opened and a VM could be created on it.
    pub usable: bool,
    /// Why KVM is not usable; empty when it is.
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VmmState {
    /// "qemu", "firecracker" or "cloud-hypervisor".
    pub kind: String,
    pub installed: bool,
    pub path: Option<String>,
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StorageState {
    /// Directory where the node keeps VM and workspace data.
    pub root: String,
    pub filesystem: String,
    /// Workspaces are O(1) btrfs snapshots only when this is true.
    pub is_btrfs: bool,
    pub total_mib: u64,
    pub available_mib: u64,
    /// How the node makes workspaces: "snapshot" (btrfs, constant time), "reflink" or "copy".
    pub workspace_method: Option<String>,
    /// Why, in words an operator can act on (e.g. put the storage root on btrfs).
    pub workspace_detail: Option<String>,
}

pub(crate) fn whoami_spec() -> ToolSpec {
    ToolSpec {
        name: ToolName::Whoami,
        title: "Who am I",
        description: "Shows who moat thinks you are: your principal, your role (which decides the \
                      tools you can call), the transport and MCP protocol version of this \
                      connection. Call it first when a tool you expect is missing.",
        hints: Hints::READ,
        class: ToolClass::Read,
        group: ActionGroup::Read,
        resource: ResourceKind::Cluster,
        example: json!({}),
        input_schema: schema_object::<WhoamiInput>(),
        output_schema: schema_object::<WhoamiOutput>(),
    }
}

pub(crate) fn node_list_spec() -> ToolSpec {
    ToolSpec {
        name: ToolName::NodeList,
        title: "List nodes",
        description: "Lists the hosts (nodes) moat can run VMs on, asking each one live: whether it \
                      answers, its CPUs and memory, whether KVM works there and which VMMs are \
                      installed. Use it to pick a node before creating VMs.",
        hints: Hints::READ,
        class: ToolClass::Read,
        group: ActionGroup::Read,
        resource: ResourceKind::Cluster,
        example: json!({}),
        input_schema: schema_object::<NodeListInput>(),
        output_schema: schema_object::<NodeListOutput>(),
    }
}

pub(crate) fn node_inspect_spec() -> ToolSpec {
    ToolSpec {
        name: ToolName::NodeInspect,
        title: "Inspect a node",
        description: "Shows everything about one node, asked live: hostname, kernel, CPUs, total \
                      and available memory, KVM (present and usable, or why not), each VMM's \
                      path and version, and the storage root's filesystem and free space.",
        hints: Hints::READ,
        class: ToolClass::Read,
        group: ActionGroup::Read,
        resource: ResourceKind::Node,
        example: json!({"node": "local"}),
        input_schema: schema_object::<NodeInspectInput>(),
        output_schema: schema_object::<NodeInspectOutput>(),
    }
}

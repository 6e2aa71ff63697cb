//! VM lifecycle tools: create, start, stop, delete, list, inspect, console logs.
//! Every tool but `vm_create` and `vm_list` names its VM with `vm`: the id, or
//! the name (resolved among the caller's own VMs first).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{ActionGroup, Hints, ResourceKind, ToolClass, ToolName, ToolSpec};

/// Most labels one VM may carry.
pub const MAX_LABELS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCreateInput {
    /// VM name, a DNS label (lowercase letters, digits, '-'); unique among your VMs.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub name: String,
    /// Virtual CPUs.
    #[schemars(range(min = 1, max = 64))]
    pub vcpus: u32,
    /// Memory in MiB.
    #[schemars(range(min = 64, max = 262144))]
    pub memory_mib: u64,
    /// Image to boot [default: "base", moat's busybox initramfs]. A disk image (e.g. "debian")
    /// boots from a throw-away copy deleted with the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub image: Option<String>,
    /// Boot from this workspace of yours instead (persistent: what the VM writes stays in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub workspace: Option<String>,
    /// More workspaces of yours, mounted in the guest at /workspaces/<name>; at most 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub data_workspaces: Option<Vec<crate::workspace::DataWorkspace>>,
    /// Put the VM on this network (name or id): it gets a network card with an address from
    /// the network's range, a route and resolvers (network_list shows networks). The VM runs on
    /// the network's node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub network: Option<String>,
    /// Your security groups on that network (names or ids) whose rules apply to the VM; at most 8.
    /// Without one, nothing on the network reaches the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub security_groups: Option<Vec<crate::names::Label>>,
    /// Node to place the VM on [default: the reachable node with the most free memory, then vCPUs;
    /// the workspaces' node when it has any].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub node: Option<String>,
    /// Labels for finding the VM later (`vm_list {label: "k=v"}`); at most 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 16, "propertyNames" = {"pattern": "^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"}))]
    pub labels: Option<BTreeMap<String, LabelValue>>,
    /// Start the VM once created [default: true].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<bool>,
    /// Return only once the guest agent answers, so vm_exec and vm_file_* work at once
    /// [default: false: return when the VMM runs the guest].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ready: Option<bool>,
}

/// A label value: up to 63 printable characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct LabelValue(#[schemars(length(max = 63), regex(pattern = r"^[A-Za-z0-9._-]*$"))] pub String);

/// Names one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmRefInput {
    /// The VM's id (e.g. "vm-3f9a0c1d2e4b") or name.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub vm: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmStopInput {
    /// The VM's id or name.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub vm: String,
    /// Kill the VM at once instead of asking the guest to power off [default: false].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
    /// Seconds the guest gets to power off before it is killed [default: 30].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600))]
    pub timeout_s: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmListInput {
    /// Only VMs on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub node: Option<String>,
    /// Only VMs in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<VmState>,
    /// Only VMs carrying this label, as "key=value".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 127), regex(pattern = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?=[A-Za-z0-9._-]*$"))]
    pub label: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmLogsInput {
    /// The VM's id or name.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub vm: String,
    /// Lines from the end of the console [default: 200].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 5000))]
    pub tail: Option<u32>,
}

/// A VM's lifecycle state: the one definition the node (which drives it), the wire (as the
/// proto `VmState`), the gateway's database and the tools all use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Creating,
    Stopped,
    Starting,
    Running,
    Stopping,
    Crashed,
    Deleting,
}

impl VmState {
    pub const ALL: [VmState; 7] = [
        VmState::Creating,
        VmState::Stopped,
        VmState::Starting,
        VmState::Running,
        VmState::Stopping,
        VmState::Crashed,
        VmState::Deleting,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Crashed => "crashed",
            VmState::Deleting => "deleting",
        }
    }

    pub fn parse(s: &str) -> Option<VmState> {
        VmState::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Whether a VMM process may exist in this state.
    pub const fn has_process(self) -> bool {
        matches!(self, VmState::Starting | VmState::Running | VmState::Stopping)
    }

    /// Whether a VM in this state holds a running-VM quota slot.
    pub const fn is_live(self) -> bool {
        matches!(self, VmState::Creating | VmState::Starting | VmState::Running | VmState::Stopping)
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored state name that is not a [`VmState`].
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a VM state")]
pub struct UnknownVmState(pub String);

impl TryFrom<String> for VmState {
    type Error = UnknownVmState;
    fn try_from(s: String) -> Result<VmState, UnknownVmState> {
        VmState::parse(&s).ok_or(UnknownVmState(s))
    }
}

/// One VM as moat reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VmInfo {
    pub id: String,
    pub name: String,
    /// The principal that created the VM.
    pub owner: String,
    pub node: String,
    pub state: VmState,
    /// Why the VM is in this state, when that says more than the state (the crash cause, say).
    pub reason: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub image: String,
    /// The workspace it boots from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// Workspaces mounted at /workspaces/<name>.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_workspaces: Vec<String>,
    /// Its network card, when it is on a network: address, MAC, gateway and security groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nic: Option<crate::network::NicInfo>,
    pub labels: BTreeMap<String, String>,
    /// The VMM running it ("qemu") and its acceleration ("kvm" or "tcg").
    pub vmm: Option<String>,
    pub accel: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    /// Set when the node could not be asked just now: the state shown is the last one known.
    pub stale: Option<String>,
    /// The guest agent, as its node sees it: asked just now by vm_inspect and the lifecycle
    /// tools; as of the node's last heartbeat in vm_list (without `last_seen`).
    pub agent: Option<AgentInfo>,
    /// While it runs (vm_inspect only): the protections its VMM process actually has, read
    /// from the host (uid, seccomp mode, cgroup and limits, who can reach its files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protections: Vec<crate::cluster::Protection>,
}

/// Whether a VM's guest agent answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentInfo {
    /// True when the agent answers: vm_exec and vm_file_* will work.
    pub ready: bool,
    pub version: Option<String>,
    /// When it last answered (RFC 3339, UTC).
    pub last_seen: Option<String>,
    /// Why it is not ready.
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VmOutput {
    pub vm: VmInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VmDeleteOutput {
    /// Id of the deleted VM.
    pub deleted: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VmListOutput {
    pub vms: Vec<VmInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VmLogsOutput {
    pub vm: String,
    /// The console's last lines, oldest first.
    pub text: String,
    /// True when older output exists beyond what is shown.
    pub truncated: bool,
}

const VM_WRITE: Hints = Hints { read_only: false, destructive: false, idempotent: true, open_world: false };

/// A VM tool's spec: input type `I`, output type `O`.
fn spec<I: JsonSchema, O: JsonSchema>(
    name: ToolName,
    title: &'static str,
    description: &'static str,
    hints: Hints,
    (class, group): (ToolClass, ActionGroup),
    example: serde_json::Value,
) -> ToolSpec {
    crate::spec_for::<I, O>(name, title, description, hints, (class, group, ResourceKind::Vm), example)
}

pub(crate) fn vm_create_spec() -> ToolSpec {
    spec::<VmCreateInput, VmOutput>(
        ToolName::VmCreate,
        "Create a VM",
        "Creates a VM that you own and, unless start is false, boots it and returns once its VMM \
         runs the guest (state running). It boots the busybox image by default, a disk image such \
         as \"debian\" from a throw-away copy, or one of your workspaces (persistent); \
         data_workspaces mounts more at /workspaces/<name>. Placed on the node you name (or its \
         workspaces' node), else on the reachable node with the most free memory. Fails, changing \
         nothing, when the name is taken, no node has room, a workspace is in use read-write \
         elsewhere, or your quota (vCPUs, memory, running VMs) would be exceeded.",
        Hints { read_only: false, destructive: false, idempotent: false, open_world: false },
        (ToolClass::Write, ActionGroup::Vm),
        json!({"name": "dev", "vcpus": 1, "memory_mib": 256, "labels": {"team": "infra"}}),
    )
}

pub(crate) fn vm_start_spec() -> ToolSpec {
    spec::<VmRefInput, VmOutput>(
        ToolName::VmStart,
        "Start a VM",
        "Boots a stopped or crashed VM and returns once it is running. Starting a running VM \
         changes nothing.",
        VM_WRITE,
        (ToolClass::Write, ActionGroup::Vm),
        json!({"vm": "dev"}),
    )
}

pub(crate) fn vm_stop_spec() -> ToolSpec {
    spec::<VmStopInput, VmOutput>(
        ToolName::VmStop,
        "Stop a VM",
        "Stops a VM: presses its ACPI power button and waits up to timeout_s (default 30) for the \
         guest to power off, then kills it; force kills at once. Anything not saved inside the \
         guest is lost. Stopping a stopped VM changes nothing.",
        Hints { destructive: true, ..VM_WRITE },
        (ToolClass::Write, ActionGroup::Vm),
        json!({"vm": "dev", "timeout_s": 30}),
    )
}

pub(crate) fn vm_delete_spec() -> ToolSpec {
    spec::<VmRefInput, VmDeleteOutput>(
        ToolName::VmDelete,
        "Delete a VM",
        "Deletes a VM: kills it if it runs and removes its directory, console log and record. \
         This cannot be undone.",
        Hints { read_only: false, destructive: true, idempotent: false, open_world: false },
        (ToolClass::Write, ActionGroup::Vm),
        json!({"vm": "dev"}),
    )
}

pub(crate) fn vm_list_spec() -> ToolSpec {
    spec::<VmListInput, VmListOutput>(
        ToolName::VmList,
        "List VMs",
        "Lists the VMs you may see (your own; every VM for admins and readers) with state, node, \
         size and labels, optionally only those on one node, in one state or with a label \
         (\"key=value\"). States are refreshed by node heartbeats.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Read),
        json!({"state": "running"}),
    )
}

pub(crate) fn vm_inspect_spec() -> ToolSpec {
    spec::<VmRefInput, VmOutput>(
        ToolName::VmInspect,
        "Inspect a VM",
        "Shows one VM, asked live from its node: state (with the reason, e.g. why it crashed), \
         node, VMM and acceleration, size, labels, owner and times.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Read),
        json!({"vm": "dev"}),
    )
}

pub(crate) fn vm_logs_spec() -> ToolSpec {
    spec::<VmLogsInput, VmLogsOutput>(
        ToolName::VmLogs,
        "VM console output",
        "Returns the last lines of a VM's serial console: kernel boot messages, init output and, \
         after a crash, the panic. Kept on the node (about 2 MiB per VM), also while the VM is \
         stopped or crashed.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Read),
        json!({"vm": "dev", "tail": 50}),
    )
}

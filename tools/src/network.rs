//! Networks, security groups and port forwards. Networks are shared infrastructure on one node
//! (anyone may list and use them; vm-admins and up create and delete them); security groups and
//! port forwards are owned: an agent manages its own, for its own VMs.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{ActionGroup, Hints, ResourceKind, ToolClass, ToolName, ToolSpec, spec_for as spec};

/// An IPv4 CIDR, e.g. "10.80.0.0/24".
const CIDR: &str = r"^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$";
const IPV4: &str = r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$";
/// One port or an inclusive range: "443", "8000-8100".
const PORTS: &str = r"^[0-9]{1,5}(-[0-9]{1,5})?$";
/// A host interface name (what `ip link` shows).
const IFNAME: &str = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$";

/// How a network reaches beyond its bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Masqueraded out of the host's uplink interface: VMs reach the outside, nothing reaches in
    /// except through port forwards.
    Nat,
    /// Nothing beyond the bridge.
    Isolated,
    /// On a bridge the operator made; routed as the host routes it, no NAT.
    Bridged,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreateInput {
    /// Network name, a DNS label, unique in the cluster.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub name: String,
    /// Its IPv4 range, /29 or larger, overlapping no other network on the node, e.g.
    /// "10.80.0.0/24". The first address is the gateway (held by the bridge).
    #[schemars(length(min = 9, max = 18), regex(pattern = CIDR))]
    pub cidr: String,
    pub mode: NetworkMode,
    /// nat: the host interface traffic leaves by [default: any but the network's bridge, as the
    /// host's routes choose].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = IFNAME))]
    pub uplink: Option<String>,
    /// bridged: the existing host bridge to attach VMs to (required for bridged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = IFNAME))]
    pub bridge: Option<String>,
    /// Resolvers VMs get in /etc/resolv.conf [default: none].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 3))]
    pub dns: Option<Vec<Ipv4>>,
    /// Node to make it on [default: the only node, when there is one].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub node: Option<String>,
}

/// An IPv4 address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Ipv4(#[schemars(regex(pattern = IPV4))] pub String);

/// Names one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkRefInput {
    /// The network's name or id.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub network: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkListInput {
    /// Only networks on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub node: Option<String>,
}

/// A VM's place on a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NicInfo {
    /// The network's name.
    pub network: String,
    pub ip: String,
    pub mac: String,
    pub gateway: String,
    /// Security groups (names) whose rules apply to it.
    pub security_groups: Vec<String>,
}

/// A VM attached to a network, as network_inspect shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NetworkVm {
    pub vm: String,
    pub name: String,
    pub owner: String,
    pub ip: String,
    pub mac: String,
    pub security_groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NetworkInfo {
    pub id: String,
    pub name: String,
    pub node: String,
    pub cidr: String,
    pub mode: NetworkMode,
    /// The gateway address VMs route through (held by the bridge).
    pub gateway: String,
    /// The host bridge VMs' taps are on.
    pub bridge: String,
    pub uplink: Option<String>,
    pub dns: Vec<String>,
    /// Addresses in use by VMs, and how many VM addresses are left.
    pub addresses_used: u32,
    pub addresses_free: u32,
    pub created_by: String,
    pub created_at: String,
    /// network_inspect only: the VMs on it you may see.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<NetworkVm>,
    /// network_inspect only: the nftables rules in force on the node that name its bridge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<String>,
    /// Why the node's state may differ from this (the node did not answer, or could not apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NetworkOutput {
    pub network: NetworkInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NetworkListOutput {
    pub networks: Vec<NetworkInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeletedOutput {
    pub deleted: String,
    pub name: String,
}

/// Traffic a security group lets in to its VMs (from its network or anywhere the network routes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IngressRule {
    pub protocol: Protocol,
    /// A port or an inclusive range, "80" or "8000-8100" (tcp and udp only) [default: all].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = PORTS))]
    pub ports: Option<String>,
    /// From addresses in this CIDR. Give this or source_group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = CIDR))]
    pub source_cidr: Option<String>,
    /// From the VMs in this security group of yours on the same network (name or id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub source_group: Option<String>,
}

/// Traffic a security group lets out beyond its network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressRule {
    /// To addresses in this CIDR ("0.0.0.0/0": anywhere).
    #[schemars(regex(pattern = CIDR))]
    pub cidr: String,
    pub protocol: Protocol,
    /// A port or an inclusive range (tcp and udp only) [default: all].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = PORTS))]
    pub ports: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupCreateInput {
    /// Group name, a DNS label; unique among your groups on the network.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub name: String,
    /// The network (name or id) whose VMs it may apply to.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub network: String,
    /// What it lets in [default: nothing].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub ingress: Option<Vec<IngressRule>>,
    /// An allow-list of what may go out beyond the network. Absent: everything (nat and bridged
    /// networks); an empty list: nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub egress: Option<Vec<EgressRule>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupUpdateInput {
    /// The group (name or id).
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub group: String,
    /// Replaces its ingress rules [default: nothing in].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub ingress: Option<Vec<IngressRule>>,
    /// Replaces its egress allow-list. Absent: everything out is allowed again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub egress: Option<Vec<EgressRule>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupRefInput {
    /// The group (name or id).
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub group: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupListInput {
    /// Only groups on this network (name or id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub network: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecurityGroupInfo {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub network: String,
    pub ingress: Vec<IngressRule>,
    /// None: everything out is allowed.
    pub egress: Option<Vec<EgressRule>>,
    /// VMs (names) it applies to.
    pub vms: Vec<String>,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecurityGroupOutput {
    pub group: SecurityGroupInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecurityGroupListOutput {
    pub groups: Vec<SecurityGroupInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortForwardCreateInput {
    /// The VM (id or name) to forward to; it must be on a network.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub vm: String,
    /// The port on the node's addresses.
    #[schemars(range(min = 1, max = 65535))]
    pub host_port: u32,
    /// The VM's port.
    #[schemars(range(min = 1, max = 65535))]
    pub vm_port: u32,
    /// tcp or udp [default: tcp].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortForwardRefInput {
    /// The forward's id, e.g. "pf-3f9a0c1d2e4b".
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub forward: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortForwardListInput {
    /// Only forwards to this VM (id or name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub vm: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PortForwardInfo {
    pub id: String,
    pub owner: String,
    pub node: String,
    pub protocol: Protocol,
    pub host_port: u16,
    pub vm: String,
    pub vm_name: String,
    pub vm_ip: String,
    pub vm_port: u16,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PortForwardOutput {
    pub forward: PortForwardInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PortForwardListOutput {
    pub forwards: Vec<PortForwardInfo>,
}

const WRITE: Hints = Hints { read_only: false, destructive: false, idempotent: false, open_world: false };
const UPDATE: Hints = Hints { read_only: false, destructive: false, idempotent: true, open_world: false };
const DELETE: Hints = Hints { read_only: false, destructive: true, idempotent: false, open_world: false };

pub(crate) fn network_create_spec() -> ToolSpec {
    spec::<NetworkCreateInput, NetworkOutput>(
        ToolName::NetworkCreate,
        "Create a network",
        "Creates a network on a node: a Linux bridge holding the gateway address (the CIDR's first \
         address) and moat's nftables rules. nat: VMs reach the outside through the host's uplink, \
         masqueraded; isolated: nothing beyond the bridge; bridged: VMs join an existing host \
         bridge. VMs on one network cannot reach each other unless a security group allows it. \
         vm-admins and cluster-admins only; anyone may put VMs on it (vm_create {network}).",
        WRITE,
        (ToolClass::Write, ActionGroup::Network, ResourceKind::Network),
        json!({"name": "dev", "cidr": "10.80.0.0/24", "mode": "nat"}),
    )
}

pub(crate) fn network_list_spec() -> ToolSpec {
    spec::<NetworkListInput, NetworkListOutput>(
        ToolName::NetworkList,
        "List networks",
        "Lists the networks VMs can join, per node: CIDR, mode, gateway, bridge and how many \
         addresses are used and free.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Read, ResourceKind::Network),
        json!({}),
    )
}

pub(crate) fn network_inspect_spec() -> ToolSpec {
    spec::<NetworkRefInput, NetworkOutput>(
        ToolName::NetworkInspect,
        "Inspect a network",
        "Shows one network: addresses in use, the VMs on it you may see (address, MAC, security \
         groups) and the nftables rules in force for its bridge, as the node reports them now.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Read, ResourceKind::Network),
        json!({"network": "dev"}),
    )
}

pub(crate) fn network_delete_spec() -> ToolSpec {
    spec::<NetworkRefInput, DeletedOutput>(
        ToolName::NetworkDelete,
        "Delete a network",
        "Deletes a network: its bridge, rules, security groups and forwards go with it. Refused \
         while any VM is on it (delete those VMs first). vm-admins and cluster-admins only.",
        DELETE,
        (ToolClass::Write, ActionGroup::Network, ResourceKind::Network),
        json!({"network": "dev"}),
    )
}

pub(crate) fn security_group_create_spec() -> ToolSpec {
    spec::<SecurityGroupCreateInput, SecurityGroupOutput>(
        ToolName::SecurityGroupCreate,
        "Create a security group",
        "Creates a security group you own on a network: ingress rules (protocol, ports, from a \
         CIDR or from another of your groups) and an optional egress allow-list (CIDRs and ports; \
         absent means everything out is allowed on nat networks). Apply it to your VMs with \
         vm_create {security_groups}. Without a group, VMs on a network are unreachable from each \
         other.",
        WRITE,
        (ToolClass::Write, ActionGroup::Network, ResourceKind::SecurityGroup),
        json!({"name": "web", "network": "dev",
               "ingress": [{"protocol": "tcp", "ports": "80", "source_cidr": "10.80.0.0/24"}]}),
    )
}

pub(crate) fn security_group_update_spec() -> ToolSpec {
    spec::<SecurityGroupUpdateInput, SecurityGroupOutput>(
        ToolName::SecurityGroupUpdate,
        "Update a security group",
        "Replaces a security group's ingress rules and egress allow-list (omit egress to allow \
         everything out again). Takes effect at once for every VM in the group.",
        UPDATE,
        (ToolClass::Write, ActionGroup::Network, ResourceKind::SecurityGroup),
        json!({"group": "web", "ingress": [{"protocol": "tcp", "ports": "443", "source_cidr": "0.0.0.0/0"}]}),
    )
}

pub(crate) fn security_group_delete_spec() -> ToolSpec {
    spec::<SecurityGroupRefInput, DeletedOutput>(
        ToolName::SecurityGroupDelete,
        "Delete a security group",
        "Deletes one of your security groups. Refused while VMs have it or another group's rule \
         names it as a source.",
        DELETE,
        (ToolClass::Write, ActionGroup::Network, ResourceKind::SecurityGroup),
        json!({"group": "web"}),
    )
}

pub(crate) fn security_group_list_spec() -> ToolSpec {
    spec::<SecurityGroupListInput, SecurityGroupListOutput>(
        ToolName::SecurityGroupList,
        "List security groups",
        "Lists the security groups you may see (your own; all for admins and readers) with their \
         rules and the VMs they apply to.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Read, ResourceKind::SecurityGroup),
        json!({}),
    )
}

pub(crate) fn security_group_inspect_spec() -> ToolSpec {
    spec::<SecurityGroupRefInput, SecurityGroupOutput>(
        ToolName::SecurityGroupInspect,
        "Inspect a security group",
        "Shows one security group: network, ingress rules, egress allow-list and its VMs.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Read, ResourceKind::SecurityGroup),
        json!({"group": "web"}),
    )
}

pub(crate) fn port_forward_create_spec() -> ToolSpec {
    spec::<PortForwardCreateInput, PortForwardOutput>(
        ToolName::PortForwardCreate,
        "Forward a host port",
        "Forwards a port of the VM's node (tcp or udp) to a port of one of your VMs on a network, \
         so clients outside reach a service in it. A host port is forwarded once per node; \
         refused when taken.",
        WRITE,
        (ToolClass::Write, ActionGroup::Network, ResourceKind::Vm),
        json!({"vm": "web", "host_port": 8080, "vm_port": 80}),
    )
}

pub(crate) fn port_forward_delete_spec() -> ToolSpec {
    spec::<PortForwardRefInput, DeletedOutput>(
        ToolName::PortForwardDelete,
        "Delete a port forward",
        "Removes one of your port forwards; the host port is free again at once.",
        DELETE,
        (ToolClass::Write, ActionGroup::Network, ResourceKind::PortForward),
        json!({"forward": "pf-3f9a0c1d2e4b"}),
    )
}

pub(crate) fn port_forward_list_spec() -> ToolSpec {
    spec::<PortForwardListInput, PortForwardListOutput>(
        ToolName::PortForwardList,
        "List port forwards",
        "Lists the port forwards you may see (your own; all for admins and readers): node, \
         protocol, host port and the VM address and port it reaches.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Read, ResourceKind::PortForward),
        json!({}),
    )
}

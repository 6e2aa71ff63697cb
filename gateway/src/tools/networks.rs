//! Networks, security groups and port forwards. The database holds them; each node is sent its
//! whole network state (`moat_node::net::model::NetState`) after every change and applies it in
//! one transaction. Changes are serialized, and each is checked against the whole state before
//! anything is stored or sent: a refused change leaves the database and the node as they were.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use moat_node::net::model::{self as net, Cidr, NetState};
use moat_tools::{
    DeletedOutput, EgressRule, IngressRule, NetworkCreateInput, NetworkInfo, NetworkListInput, NetworkListOutput,
    NetworkMode, NetworkOutput, NetworkVm, NicInfo, PortForwardCreateInput, PortForwardInfo, PortForwardListInput,
    PortForwardListOutput, PortForwardOutput, Protocol, SecurityGroupCreateInput, SecurityGroupInfo,
    SecurityGroupListInput, SecurityGroupListOutput, SecurityGroupOutput, SecurityGroupUpdateInput, ToolName,
};
use serde_json::Value;

use super::vms::{random_id, row_for};
use super::{ToolError, to_value};
use crate::app::{CallContext, Shared};
use crate::nodes::client::{NodeClient, NodeNetworks};
use crate::security::resource::{forward_resource, group_not_found, group_resource, group_row, vm_resource};
use crate::store::networks::{ForwardRow, GroupRow, NetworkRow, NicRow};
use crate::store::now;
use crate::store::vms::VmRow;

/// One network change at a time, gateway-wide: each is checked against, and sends, the whole
/// state of its node.
static CHANGES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn client(shared: &Shared, node: &str) -> Result<NodeClient, ToolError> {
    let row = shared.state.node(node).await?;
    Ok(shared.nodes.node(&row.name, &row.address)?)
}

fn network_not_found(arg: &str) -> String {
    format!("no network named `{arg}`; network_list shows the networks")
}

pub(super) async fn network_row(shared: &Shared, arg: &str) -> Result<NetworkRow, ToolError> {
    shared.state.network(arg).await?.ok_or_else(|| ToolError::NotFound(network_not_found(arg)))
}

fn cidr_of(row: &NetworkRow) -> Cidr {
    row.cidr.parse().expect("a stored network's CIDR was validated when it was made")
}

fn proto(p: Protocol) -> net::Proto {
    match p {
        Protocol::Tcp => net::Proto::Tcp,
        Protocol::Udp => net::Proto::Udp,
        Protocol::Icmp => net::Proto::Icmp,
        Protocol::Any => net::Proto::Any,
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Icmp => "icmp",
        Protocol::Any => "any",
    }
}

/// "80" or "8000-8100" as a range, for tcp and udp only.
fn ports(spec: Option<&str>, p: Protocol) -> Result<Option<net::Ports>, ToolError> {
    let Some(spec) = spec else { return Ok(None) };
    let bad =
        || ToolError::Invalid(format!("ports `{spec}` must be a port or a range of 1-65535 such as 80 or 8000-8100"));
    if !matches!(p, Protocol::Tcp | Protocol::Udp) {
        return Err(ToolError::Invalid(format!(
            "ports apply to tcp and udp only; a {} rule covers the whole protocol",
            protocol_name(p)
        )));
    }
    let (from, to) = spec.split_once('-').unwrap_or((spec, spec));
    let (from, to): (u16, u16) = (from.parse().map_err(|_| bad())?, to.parse().map_err(|_| bad())?);
    if from == 0 || from > to {
        return Err(bad());
    }
    Ok(Some(net::Ports { from, to }))
}

fn cidr(s: &str) -> Result<Cidr, ToolError> {
    s.parse().map_err(|e: net::BadCidr| ToolError::Invalid(e.to_string()))
}

/// A group's rules checked and in the node's terms; source groups must be the caller's own on
/// the same network, and are stored by id.
async fn rules(
    shared: &Shared,
    ctx: &CallContext,
    network_id: &str,
    ingress: &[IngressRule],
    egress: Option<&[EgressRule]>,
) -> Result<(Vec<IngressRule>, Option<Vec<EgressRule>>), ToolError> {
    let mut stored = Vec::new();
    for rule in ingress {
        ports(rule.ports.as_deref(), rule.protocol)?;
        let mut rule = rule.clone();
        match (&rule.source_cidr, &rule.source_group) {
            (Some(c), None) => {
                cidr(c)?;
            }
            (None, Some(g)) => {
                let row = group_for(shared, ctx, ToolName::SecurityGroupUpdate, g).await?;
                if row.network_id != network_id {
                    return Err(ToolError::Invalid(format!(
                        "source group `{g}` is on another network; a rule's source group must be on the same network"
                    )));
                }
                rule.source_group = Some(row.id);
            }
            _ => {
                return Err(ToolError::Invalid(
                    "each ingress rule needs exactly one of source_cidr and source_group".into(),
                ));
            }
        }
        stored.push(rule);
    }
    if let Some(egress) = egress {
        for rule in egress {
            cidr(&rule.cidr)?;
            ports(rule.ports.as_deref(), rule.protocol)?;
        }
    }
    Ok((stored, egress.map(<[EgressRule]>::to_vec)))
}

fn model_group(row: &GroupRow) -> net::Group {
    let ingress: Vec<IngressRule> = serde_json::from_str(&row.ingress).unwrap_or_default();
    let egress: Option<Vec<EgressRule>> = row.egress.as_deref().and_then(|e| serde_json::from_str(e).ok());
    net::Group {
        id: row.id.clone(),
        name: row.name.clone(),
        ingress: ingress
            .iter()
            .filter_map(|r| {
                let source = match (&r.source_cidr, &r.source_group) {
                    (Some(c), _) => net::Source::Cidr(c.parse().ok()?),
                    (None, Some(g)) => net::Source::Group(g.clone()),
                    (None, None) => return None,
                };
                Some(net::Ingress {
                    proto: proto(r.protocol),
                    ports: ports(r.ports.as_deref(), r.protocol).ok()?,
                    source,
                })
            })
            .collect(),
        egress: egress.map(|rules| {
            rules
                .iter()
                .filter_map(|r| {
                    Some(net::Egress {
                        cidr: r.cidr.parse().ok()?,
                        proto: proto(r.protocol),
                        ports: ports(r.ports.as_deref(), r.protocol).ok()?,
                    })
                })
                .collect()
        }),
    }
}

fn model_network(row: &NetworkRow) -> net::Network {
    let mode = match row.mode.as_str() {
        "nat" => net::Mode::Nat { uplink: row.uplink.clone() },
        "bridged" => net::Mode::Bridged { bridge: row.bridge.clone() },
        _ => net::Mode::Isolated,
    };
    net::Network { id: row.id.clone(), name: row.name.clone(), cidr: cidr_of(row), mode }
}

/// What node `node` should have, from the database.
async fn node_state(shared: &Shared, node: &str) -> Result<NetState, ToolError> {
    let networks: Vec<NetworkRow> = shared.state.networks().await?.into_iter().filter(|n| n.node == node).collect();
    let mut state = NetState { networks: networks.iter().map(model_network).collect(), ..NetState::default() };
    for n in &networks {
        for nic in shared.state.nics(Some(&n.id)).await? {
            state.ports.push(net::Port {
                vm: nic.vm_id.clone(),
                network: n.id.clone(),
                ip: nic.ip.parse().map_err(|_| ToolError::Invalid(format!("stored address {} is bad", nic.ip)))?,
                mac: nic.mac.clone(),
                groups: nic.groups(),
            });
        }
        state.groups.extend(shared.state.groups(Some(&n.id)).await?.iter().map(model_group));
    }
    for f in shared.state.forwards(Some(node)).await? {
        state.forwards.push(net::Forward {
            proto: if f.protocol == "udp" { net::Proto::Udp } else { net::Proto::Tcp },
            host_port: f.host_port as u16,
            vm: f.vm_id.clone(),
            vm_port: f.vm_port as u16,
        });
    }
    Ok(state)
}

/// Checks `state` and sends it to `node`, which applies it or keeps what it had.
async fn push(shared: &Shared, node: &str, state: &NetState) -> Result<NodeNetworks, ToolError> {
    state.validate().map_err(|e| ToolError::Invalid(e.to_string()))?;
    client(shared, node)
        .await?
        .apply_networks(state)
        .await
        .map_err(|e| ToolError::Node(format!("{e}; nothing was changed")))
}

/// Sends node `node` its state as the database has it now.
async fn sync(shared: &Shared, node: &str) -> Result<NodeNetworks, ToolError> {
    let state = node_state(shared, node).await?;
    push(shared, node, &state).await
}

/// After a change was stored: send it, and undo the stored change when the node refuses it.
async fn apply_or_undo<F, Fut>(shared: &Shared, node: &str, undo: F) -> Result<NodeNetworks, ToolError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), crate::store::StateError>>,
{
    match sync(shared, node).await {
        Ok(report) => Ok(report),
        Err(e) => {
            if let Err(undo) = undo().await {
                tracing::error!(error = %undo, "undoing a refused network change failed");
            }
            Err(e)
        }
    }
}

fn mode_of(row: &NetworkRow) -> NetworkMode {
    match row.mode.as_str() {
        "nat" => NetworkMode::Nat,
        "bridged" => NetworkMode::Bridged,
        _ => NetworkMode::Isolated,
    }
}

fn network_info(row: &NetworkRow, used: usize) -> NetworkInfo {
    let cidr = cidr_of(row);
    // Host addresses but the gateway.
    let hosts = cidr.host_count().saturating_sub(1) as usize;
    NetworkInfo {
        id: row.id.clone(),
        name: row.name.clone(),
        node: row.node.clone(),
        cidr: row.cidr.clone(),
        mode: mode_of(row),
        gateway: cidr.gateway().map(|g| g.to_string()).unwrap_or_default(),
        bridge: moat_node::net::render::bridge_of(&model_network(row)),
        uplink: (!row.uplink.is_empty()).then(|| row.uplink.clone()),
        dns: row.dns(),
        addresses_used: used as u32,
        addresses_free: hosts.saturating_sub(used) as u32,
        created_by: row.created_by.clone(),
        created_at: row.created_at.clone(),
        vms: Vec::new(),
        rules: Vec::new(),
        detail: None,
    }
}

pub async fn network_create(shared: &Shared, ctx: &CallContext, input: NetworkCreateInput) -> Result<Value, ToolError> {
    let range = cidr(&input.cidr)?;
    let (uplink, bridge) = match input.mode {
        NetworkMode::Nat if input.bridge.is_some() => {
            return Err(ToolError::Invalid("bridge is for bridged networks; a nat network makes its own".into()));
        }
        NetworkMode::Nat => (input.uplink.clone().unwrap_or_default(), String::new()),
        NetworkMode::Isolated if input.uplink.is_some() || input.bridge.is_some() => {
            return Err(ToolError::Invalid("an isolated network takes neither uplink nor bridge".into()));
        }
        NetworkMode::Isolated => (String::new(), String::new()),
        NetworkMode::Bridged => match (&input.bridge, &input.uplink) {
            (Some(b), None) => (String::new(), b.clone()),
            _ => {
                return Err(ToolError::Invalid(
                    "a bridged network needs bridge (an existing host bridge) and takes no uplink".into(),
                ));
            }
        },
    };
    let mut dns = Vec::new();
    for d in input.dns.iter().flatten() {
        let ip: Ipv4Addr =
            d.0.parse().map_err(|_| ToolError::Invalid(format!("dns `{}` is not an IPv4 address", d.0)))?;
        dns.push(ip.to_string());
    }
    let node = match input.node {
        Some(node) => shared.state.node(&node).await?.name,
        None => match shared.state.nodes().await?.as_slice() {
            [one] => one.name.clone(),
            _ => return Err(ToolError::Invalid("several nodes are registered; pass node".into())),
        },
    };
    let row = NetworkRow {
        id: random_id("net"),
        name: input.name,
        node: node.clone(),
        cidr: range.to_string(),
        mode: match input.mode {
            NetworkMode::Nat => "nat",
            NetworkMode::Isolated => "isolated",
            NetworkMode::Bridged => "bridged",
        }
        .into(),
        uplink,
        bridge,
        dns: serde_json::to_string(&dns).expect("strings serialize"),
        created_by: ctx.principal.name.clone(),
        created_at: now(),
    };
    let _change = CHANGES.lock().await;
    shared.state.insert_network(&row).await?;
    let id = row.id.clone();
    apply_or_undo(shared, &node, || async { shared.state.delete_network(&id).await.map(drop) }).await?;
    Ok(to_value(NetworkOutput { network: network_info(&row, 0) }))
}

pub async fn network_list(shared: &Shared, input: NetworkListInput) -> Result<Value, ToolError> {
    let nics = shared.state.nics(None).await?;
    let networks = shared
        .state
        .networks()
        .await?
        .into_iter()
        .filter(|n| input.node.as_deref().is_none_or(|node| n.node == node))
        .map(|n| {
            let used = nics.iter().filter(|c| c.network_id == n.id).count();
            network_info(&n, used)
        })
        .collect();
    Ok(to_value(NetworkListOutput { networks }))
}

/// Every VM by id, in one query (a listing must not ask once per VM).
async fn vms_by_id(shared: &Shared) -> Result<HashMap<String, VmRow>, ToolError> {
    Ok(shared.state.vms().await?.into_iter().map(|vm| (vm.id.clone(), vm)).collect())
}

/// Group names by id, for showing a VM's groups.
fn group_names(groups: &[GroupRow]) -> HashMap<String, String> {
    groups.iter().map(|g| (g.id.clone(), g.name.clone())).collect()
}

pub async fn network_inspect(shared: &Shared, ctx: &CallContext, arg: &str) -> Result<Value, ToolError> {
    let row = network_row(shared, arg).await?;
    let nics = shared.state.nics(Some(&row.id)).await?;
    let mut info = network_info(&row, nics.len());
    let names = group_names(&shared.state.groups(Some(&row.id)).await?);
    let bundle = shared.authz.bundle();
    let vms = vms_by_id(shared).await?;
    for nic in &nics {
        let Some(vm) = vms.get(&nic.vm_id) else { continue };
        if !bundle.is_allowed(&ctx.principal, ToolName::VmInspect, &vm_resource(vm)) {
            continue;
        }
        info.vms.push(NetworkVm {
            vm: vm.id.clone(),
            name: vm.name.clone(),
            owner: vm.owner.clone(),
            ip: nic.ip.clone(),
            mac: nic.mac.clone(),
            security_groups: nic.groups().iter().map(|g| names.get(g).cloned().unwrap_or_else(|| g.clone())).collect(),
        });
    }
    match client(shared, &row.node).await {
        Ok(node) => match node.networks().await {
            Ok(report) => {
                let bridge = info.bridge.clone();
                info.rules =
                    report.ruleset.lines().map(str::trim).filter(|l| l.contains(&bridge)).map(str::to_string).collect();
                if !report.detail.is_empty() {
                    info.detail = Some(report.detail);
                } else if info.rules.is_empty() {
                    info.detail = Some(format!("node {} has no rules for this network's bridge", row.node));
                }
            }
            Err(e) => info.detail = Some(format!("the rules in force are unknown: {e}")),
        },
        Err(e) => info.detail = Some(format!("the rules in force are unknown: {e}")),
    }
    Ok(to_value(NetworkOutput { network: info }))
}

pub async fn network_delete(shared: &Shared, arg: &str) -> Result<Value, ToolError> {
    let _change = CHANGES.lock().await;
    let row = network_row(shared, arg).await?;
    if shared.state.git_service(&row.id).await?.is_some() {
        return Err(ToolError::Invalid(format!(
            "network {} has a git service; git_service_delete it first (with delete_repositories: true to drop its \
             repositories too)",
            row.name
        )));
    }
    let repos = shared.state.repos(Some(&row.id)).await?.len();
    if repos > 0 {
        return Err(ToolError::Invalid(format!(
            "network {} still holds {repos} git repositories of a deleted git service; git_service_ensure serves \
             them again, git_service_delete {{delete_repositories: true}} removes them",
            row.name
        )));
    }
    let nics = shared.state.nics(Some(&row.id)).await?;
    if !nics.is_empty() {
        let vms: Vec<&str> = nics.iter().map(|n| n.vm_id.as_str()).collect();
        return Err(ToolError::Invalid(format!(
            "network {} has VMs on it ({}); delete them first",
            row.name,
            vms.join(", ")
        )));
    }
    // The node first: when it cannot apply the state without the network, nothing changes.
    let mut state = node_state(shared, &row.node).await?;
    state.networks.retain(|n| n.id != row.id);
    let groups_here: Vec<String> = shared.state.groups(Some(&row.id)).await?.into_iter().map(|g| g.id).collect();
    state.groups.retain(|g| !groups_here.contains(&g.id));
    push(shared, &row.node, &state).await?;
    if !shared.state.delete_network(&row.id).await? {
        // A VM joined meanwhile (it cannot: changes are serialized); send what the database says.
        sync(shared, &row.node).await?;
        return Err(ToolError::Invalid(format!("network {} has VMs on it; delete them first", row.name)));
    }
    Ok(to_value(DeletedOutput { deleted: row.id, name: row.name }))
}

/// The security group a call names, re-checked against the caller for `tool`: someone else's
/// reads as missing.
async fn group_for(shared: &Shared, ctx: &CallContext, tool: ToolName, arg: &str) -> Result<GroupRow, ToolError> {
    let row = group_row(&shared.state, ctx.principal.owner(), arg).await?;
    if !shared.authz.bundle().is_allowed(&ctx.principal, tool, &group_resource(&row)) {
        return Err(ToolError::NotFound(group_not_found(arg)));
    }
    Ok(row)
}

async fn group_info(shared: &Shared, row: &GroupRow) -> Result<SecurityGroupInfo, ToolError> {
    let network = shared.state.network(&row.network_id).await?.map(|n| n.name).unwrap_or_default();
    let all_groups = group_names(&shared.state.groups(Some(&row.network_id)).await?);
    let all_vms = vms_by_id(shared).await?;
    let vms: Vec<String> = shared
        .state
        .nics(Some(&row.network_id))
        .await?
        .iter()
        .filter(|nic| nic.groups().contains(&row.id))
        .filter_map(|nic| all_vms.get(&nic.vm_id).map(|vm| vm.name.clone()))
        .collect();
    let mut ingress: Vec<IngressRule> = serde_json::from_str(&row.ingress).unwrap_or_default();
    for rule in &mut ingress {
        if let Some(g) = &rule.source_group {
            rule.source_group = Some(all_groups.get(g).cloned().unwrap_or_else(|| g.clone()));
        }
    }
    Ok(SecurityGroupInfo {
        id: row.id.clone(),
        name: row.name.clone(),
        owner: row.owner.clone(),
        network,
        ingress,
        egress: row.egress.as_deref().and_then(|e| serde_json::from_str(e).ok()),
        vms,
        created_at: row.created_at.clone(),
    })
}

pub async fn group_create(
    shared: &Shared,
    ctx: &CallContext,
    input: SecurityGroupCreateInput,
) -> Result<Value, ToolError> {
    let network = network_row(shared, &input.network).await?;
    let _change = CHANGES.lock().await;
    let (ingress, egress) =
        rules(shared, ctx, &network.id, input.ingress.as_deref().unwrap_or_default(), input.egress.as_deref()).await?;
    let row = GroupRow {
        id: random_id("sg"),
        name: input.name,
        owner: ctx.principal.owner().to_string(),
        network_id: network.id.clone(),
        ingress: serde_json::to_string(&ingress).expect("rules serialize"),
        egress: egress.map(|e| serde_json::to_string(&e).expect("rules serialize")),
        created_at: now(),
    };
    shared.state.insert_group(&row).await?;
    let id = row.id.clone();
    apply_or_undo(shared, &network.node, || shared.state.delete_group(&id)).await?;
    Ok(to_value(SecurityGroupOutput { group: group_info(shared, &row).await? }))
}

pub async fn group_update(
    shared: &Shared,
    ctx: &CallContext,
    input: SecurityGroupUpdateInput,
) -> Result<Value, ToolError> {
    let _change = CHANGES.lock().await;
    let row = group_for(shared, ctx, ToolName::SecurityGroupUpdate, &input.group).await?;
    let network = network_row(shared, &row.network_id).await?;
    let (ingress, egress) =
        rules(shared, ctx, &network.id, input.ingress.as_deref().unwrap_or_default(), input.egress.as_deref()).await?;
    let ingress = serde_json::to_string(&ingress).expect("rules serialize");
    let egress = egress.map(|e| serde_json::to_string(&e).expect("rules serialize"));
    shared.state.update_group(&row.id, &ingress, egress.as_deref()).await?;
    apply_or_undo(shared, &network.node, || shared.state.update_group(&row.id, &row.ingress, row.egress.as_deref()))
        .await?;
    let row = GroupRow { ingress, egress, ..row };
    Ok(to_value(SecurityGroupOutput { group: group_info(shared, &row).await? }))
}

pub async fn group_delete(shared: &Shared, ctx: &CallContext, arg: &str) -> Result<Value, ToolError> {
    let _change = CHANGES.lock().await;
    let row = group_for(shared, ctx, ToolName::SecurityGroupDelete, arg).await?;
    let info = group_info(shared, &row).await?;
    if !info.vms.is_empty() {
        return Err(ToolError::Invalid(format!(
            "security group {} applies to VMs ({}); delete those VMs first",
            row.name,
            info.vms.join(", ")
        )));
    }
    let sources: Vec<String> = shared
        .state
        .groups(Some(&row.network_id))
        .await?
        .into_iter()
        .filter(|g| g.id != row.id && g.ingress.contains(&format!("\"{}\"", row.id)))
        .map(|g| g.name)
        .collect();
    if !sources.is_empty() {
        return Err(ToolError::Invalid(format!(
            "security group {} is the source of rules in {}; update those groups first",
            row.name,
            sources.join(", ")
        )));
    }
    let network = network_row(shared, &row.network_id).await?;
    let mut state = node_state(shared, &network.node).await?;
    state.groups.retain(|g| g.id != row.id);
    push(shared, &network.node, &state).await?;
    shared.state.delete_group(&row.id).await?;
    Ok(to_value(DeletedOutput { deleted: row.id, name: row.name }))
}

pub async fn group_list(shared: &Shared, ctx: &CallContext, input: SecurityGroupListInput) -> Result<Value, ToolError> {
    let network = match &input.network {
        Some(arg) => Some(network_row(shared, arg).await?.id),
        None => None,
    };
    let bundle = shared.authz.bundle();
    let mut groups = Vec::new();
    for row in shared.state.groups(network.as_deref()).await? {
        if bundle.is_allowed(&ctx.principal, ToolName::SecurityGroupInspect, &group_resource(&row)) {
            groups.push(group_info(shared, &row).await?);
        }
    }
    Ok(to_value(SecurityGroupListOutput { groups }))
}

pub async fn group_inspect(shared: &Shared, ctx: &CallContext, arg: &str) -> Result<Value, ToolError> {
    let row = group_for(shared, ctx, ToolName::SecurityGroupInspect, arg).await?;
    Ok(to_value(SecurityGroupOutput { group: group_info(shared, &row).await? }))
}

async fn forward_info(shared: &Shared, row: &ForwardRow) -> Result<PortForwardInfo, ToolError> {
    let vm = shared.state.vm_by_id(&row.vm_id).await?;
    let nic = shared.state.nic(&row.vm_id).await?;
    Ok(PortForwardInfo {
        id: row.id.clone(),
        owner: row.owner.clone(),
        node: row.node.clone(),
        protocol: if row.protocol == "udp" { Protocol::Udp } else { Protocol::Tcp },
        host_port: row.host_port as u16,
        vm: row.vm_id.clone(),
        vm_name: vm.map(|v| v.name).unwrap_or_default(),
        vm_ip: nic.map(|n| n.ip).unwrap_or_default(),
        vm_port: row.vm_port as u16,
        created_at: row.created_at.clone(),
    })
}

pub async fn forward_create(
    shared: &Shared,
    ctx: &CallContext,
    input: PortForwardCreateInput,
) -> Result<Value, ToolError> {
    let protocol = input.protocol.unwrap_or(Protocol::Tcp);
    if !matches!(protocol, Protocol::Tcp | Protocol::Udp) {
        return Err(ToolError::Invalid("a port forward is tcp or udp".into()));
    }
    let vm = row_for(shared, ctx, &input.vm).await?;
    if shared.state.nic(&vm.id).await?.is_none() {
        return Err(ToolError::Invalid(format!(
            "vm {} is on no network; create it with vm_create {{network}} to forward ports to it",
            vm.name
        )));
    }
    let row = ForwardRow {
        id: random_id("pf"),
        owner: vm.owner.clone(),
        node: vm.node.clone(),
        protocol: protocol_name(protocol).into(),
        host_port: i64::from(input.host_port),
        vm_id: vm.id.clone(),
        vm_port: i64::from(input.vm_port),
        created_at: now(),
    };
    let _change = CHANGES.lock().await;
    shared.state.insert_forward(&row).await?;
    apply_or_undo(shared, &vm.node, || shared.state.delete_forward(&row.id)).await?;
    Ok(to_value(PortForwardOutput { forward: forward_info(shared, &row).await? }))
}

pub async fn forward_delete(shared: &Shared, ctx: &CallContext, arg: &str) -> Result<Value, ToolError> {
    let _change = CHANGES.lock().await;
    let missing = || ToolError::NotFound(format!("no port forward `{arg}`; port_forward_list shows yours"));
    let row = shared.state.forward(arg).await?.ok_or_else(missing)?;
    if !shared.authz.bundle().is_allowed(&ctx.principal, ToolName::PortForwardDelete, &forward_resource(&row)) {
        return Err(missing());
    }
    let mut state = node_state(shared, &row.node).await?;
    state.forwards.retain(|f| !(f.host_port == row.host_port as u16 && f.vm == row.vm_id));
    push(shared, &row.node, &state).await?;
    shared.state.delete_forward(&row.id).await?;
    Ok(to_value(DeletedOutput { deleted: row.id.clone(), name: format!("{}/{}", row.host_port, row.protocol) }))
}

pub async fn forward_list(shared: &Shared, ctx: &CallContext, input: PortForwardListInput) -> Result<Value, ToolError> {
    let only = match &input.vm {
        Some(arg) => Some(row_for(shared, ctx, arg).await?.id),
        None => None,
    };
    let bundle = shared.authz.bundle();
    let mut forwards = Vec::new();
    for row in shared.state.forwards(None).await? {
        if only.as_deref().is_none_or(|vm| row.vm_id == vm)
            && bundle.is_allowed(&ctx.principal, ToolName::PortForwardList, &forward_resource(&row))
        {
            forwards.push(forward_info(shared, &row).await?);
        }
    }
    Ok(to_value(PortForwardListOutput { forwards }))
}

/// A stable, locally administered MAC for VM `id` (02:6d = "m", then four bytes of its id).
fn mac_for(id: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(id.as_bytes());
    format!("02:6d:{:02x}:{:02x}:{:02x}:{:02x}", digest[0], digest[1], digest[2], digest[3])
}

/// What `vm_create {network, security_groups}` asks for, checked: the network, and the caller's
/// groups on it (by id).
pub(super) async fn nic_request(
    shared: &Shared,
    ctx: &CallContext,
    network: &str,
    groups: &[String],
) -> Result<(NetworkRow, Vec<String>), ToolError> {
    let network = network_row(shared, network).await?;
    let mut ids = Vec::new();
    for g in groups {
        let row = group_for(shared, ctx, ToolName::SecurityGroupUpdate, g).await?;
        if row.network_id != network.id {
            return Err(ToolError::Invalid(format!(
                "security group `{g}` is on another network than {}; a VM's groups must be on its network",
                network.name
            )));
        }
        if !ids.contains(&row.id) {
            ids.push(row.id);
        }
    }
    Ok((network, ids))
}

/// Gives reserved VM `vm` its address on `network` and sends the node the state with it, so
/// its tap finds a port when the VM starts. On any failure nothing is kept (the caller releases
/// the VM's reservation, which frees the address).
pub(super) async fn attach(
    shared: &Shared,
    vm: &VmRow,
    network: &NetworkRow,
    groups: &[String],
) -> Result<moat_node::vm::Nic, ToolError> {
    let range = cidr_of(network);
    let gateway = range.gateway().expect("networks are /29 or larger");
    let mac = mac_for(&vm.id);
    let _change = CHANGES.lock().await;
    let ip = shared.state.allocate_nic(&vm.id, network, range.hosts().filter(|h| *h != gateway), &mac, groups).await?;
    sync(shared, &network.node).await?;
    Ok(moat_node::vm::Nic {
        network: network.id.clone(),
        mac,
        ip,
        prefix: range.prefix(),
        gateway,
        dns: network.dns().iter().filter_map(|d| d.parse().ok()).collect(),
    })
}

/// At start: sends every node that has networks its state as the database has it, so a change
/// stored just before the gateway died (and never sent) is not left half-made. A node that does
/// not answer keeps what it has until the next change.
pub async fn sync_all(shared: &Shared) {
    let nodes: std::collections::BTreeSet<String> = match shared.state.networks().await {
        Ok(networks) => networks.into_iter().map(|n| n.node).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read networks to send them to their nodes");
            return;
        }
    };
    for node in nodes {
        let _change = CHANGES.lock().await;
        match sync(shared, &node).await {
            Ok(_) => tracing::info!(node, "sent the node its networks"),
            Err(e) => tracing::warn!(node, error = %e, "the node keeps its networks until the next change"),
        }
    }
}

/// After a VM with a network card is gone (deleted, or its create rolled back): its node's
/// state without it. A node that does not take it now gets it with the next change.
pub(super) async fn detached(shared: &Shared, node: &str) {
    let _change = CHANGES.lock().await;
    if let Err(e) = sync(shared, node).await {
        tracing::warn!(node, error = %e, "the node keeps a deleted VM's port until the next network change");
    }
}

/// The network cards of VMs, by VM id, as tools show them.
pub(super) async fn nic_infos(shared: &Shared) -> Result<HashMap<String, NicInfo>, ToolError> {
    let networks: HashMap<String, NetworkRow> =
        shared.state.networks().await?.into_iter().map(|n| (n.id.clone(), n)).collect();
    let names = group_names(&shared.state.groups(None).await?);
    Ok(shared
        .state
        .nics(None)
        .await?
        .into_iter()
        .filter_map(|nic: NicRow| {
            let network = networks.get(&nic.network_id)?;
            Some((
                nic.vm_id.clone(),
                NicInfo {
                    network: network.name.clone(),
                    ip: nic.ip.clone(),
                    mac: nic.mac.clone(),
                    gateway: cidr_of(network).gateway().map(|g| g.to_string()).unwrap_or_default(),
                    security_groups: nic
                        .groups()
                        .iter()
                        .map(|g| names.get(g).cloned().unwrap_or_else(|| g.clone()))
                        .collect(),
                },
            ))
        })
        .collect())
}

//! The VM tools: placement, reservation, the node call and the record of
//! what the node said. A create reserves its name, quota and node capacity
//! first and releases them if the node fails; every VM call refreshes the
//! stored state from the node's answer.

use std::collections::BTreeMap;
use std::time::Duration;

use moat_tools::{
    ToolName, VmCreateInput, VmDeleteOutput, VmInfo, VmListInput, VmListOutput, VmLogsOutput, VmOutput, VmState,
};
use serde_json::Value;

use super::networks;
use super::placement::{candidate, choose};
use super::workspaces::workspace_for;
use super::{ToolError, to_value};
use crate::app::{CallContext, Shared};
use crate::nodes::client::{NewVm, NodeClient, NodeError};
use crate::nodes::{refresh, refresh_all};
use crate::security::resource::{vm_resource, vm_row};
use crate::store::now;
use crate::store::vms::{NodeCapacity, VmReport, VmRow};
use crate::store::workspaces::{DiskRow, How, WorkspaceRow};

/// How long a node may take to create and boot a VM (TCG boots are slow under load).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long `vm_create {wait_ready: true}` waits for the guest agent.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// What a failed node call did to the VM, in the caller's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// The call cannot have changed anything (a refused create, a read).
    Unchanged,
    /// The node may have acted before it stopped answering.
    Unknown,
}

/// A node failure as the caller reads it: for an unreachable node, what that means for the VM.
fn node_failed(error: NodeError, effect: Effect) -> ToolError {
    match (&error, effect) {
        (NodeError::Unreachable { .. }, Effect::Unchanged) => ToolError::Node(format!("{error}; nothing was changed")),
        (NodeError::Unreachable { .. }, Effect::Unknown) => ToolError::Node(format!(
            "{error}; the VM's state is unknown until the node answers again (vm_inspect shows it)"
        )),
        _ => error.into(),
    }
}

/// The VM this call acts on (the one the authorizer judged, when it named one).
pub(super) async fn row_for(shared: &Shared, ctx: &CallContext, arg: &str) -> Result<VmRow, ToolError> {
    Ok(vm_row(&shared.state, ctx.principal.owner(), ctx.vm.as_deref(), arg).await?)
}

/// A client for the node `row` lives on.
async fn node_of(shared: &Shared, node: &str) -> Result<NodeClient, ToolError> {
    let row = shared.state.node(node).await?;
    shared.nodes.node(&row.name, &row.address).map_err(|e| node_failed(e, Effect::Unchanged))
}

/// A fresh id: `prefix` and 12 random hex digits (`vm-3f9a0c1d2e4b`).
pub(super) fn random_id(prefix: &str) -> String {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}")
}

/// A stored VM as tools show it; `stale` says why the state may be old.
pub fn vm_info(row: &VmRow, stale: Option<String>) -> VmInfo {
    VmInfo {
        id: row.id.clone(),
        name: row.name.clone(),
        owner: row.owner.clone(),
        node: row.node.clone(),
        state: row.state,
        reason: (!row.reason.is_empty()).then(|| row.reason.clone()),
        vcpus: row.vcpus as u32,
        memory_mib: row.memory_mib as u64,
        image: row.image.clone(),
        workspace: None,
        data_workspaces: Vec::new(),
        nic: None,
        labels: row.labels(),
        vmm: (!row.vmm.is_empty()).then(|| row.vmm.clone()),
        accel: (!row.accel.is_empty()).then(|| row.accel.clone()),
        created_at: row.created_at.clone(),
        started_at: row.started_at.clone(),
        stale,
        // As of the node's last heartbeat; callers that just asked the node replace it.
        agent: (row.state == VmState::Running)
            .then(|| row.agent.as_deref().and_then(|json| serde_json::from_str(json).ok()))
            .flatten(),
        protections: Vec::new(),
    }
}

/// `info` with the workspaces its VM has as disks, from `disks` (as `State::vm_disks` gives them).
fn add_disks(info: &mut VmInfo, disks: &[(String, String, String, String)]) {
    for (_, workspace, how, mount) in disks.iter().filter(|(vm, ..)| *vm == info.id) {
        if how == How::Root.as_str() {
            info.workspace = Some(workspace.clone());
        } else {
            info.data_workspaces.push(mount.clone());
        }
    }
}

/// `info` with the workspaces its VM has as disks and its network card.
async fn with_disks(shared: &Shared, mut info: VmInfo) -> Result<VmInfo, ToolError> {
    let disks = shared.state.vm_disks(Some(&info.id)).await?;
    add_disks(&mut info, &disks);
    if shared.state.nic(&info.id).await?.is_some() {
        info.nic = networks::nic_infos(shared).await?.remove(&info.id);
    }
    Ok(info)
}

/// A stored VM with what its node just said about the guest agent and its VMM's confinement.
fn vm_info_live(row: &VmRow, vm: &VmReport) -> VmInfo {
    let mut info = vm_info(row, None);
    info.agent = vm.agent.clone();
    info.protections = vm.protections.clone();
    info
}

/// The workspaces a new VM asks for, each one the caller may attach, all on one node.
async fn disks_for(
    shared: &Shared,
    ctx: &CallContext,
    input: &VmCreateInput,
) -> Result<(Vec<DiskRow>, Option<WorkspaceRow>, Option<String>), ToolError> {
    let mut disks = Vec::new();
    let mut node: Option<String> = None;
    let mut on_node = |row: &WorkspaceRow| -> Result<(), ToolError> {
        match &node {
            Some(n) if *n != row.node => Err(ToolError::Invalid(format!(
                "workspaces of one VM must be on one node: `{}` is on {}, another on {n}",
                row.name, row.node
            ))),
            _ => {
                node = Some(row.node.clone());
                Ok(())
            }
        }
    };
    let mut root = None;
    if let Some(arg) = &input.workspace {
        let row = workspace_for(shared, ctx, ToolName::VmCreate, arg).await?;
        on_node(&row)?;
        disks.push(DiskRow { workspace_id: row.id.clone(), how: How::Root, mount: "/".into() });
        root = Some(row);
    }
    for data in input.data_workspaces.iter().flatten() {
        let row = workspace_for(shared, ctx, ToolName::VmCreate, &data.name).await?;
        on_node(&row)?;
        if disks.iter().any(|d| d.workspace_id == row.id) {
            return Err(ToolError::Invalid(format!("workspace `{}` is named twice", data.name)));
        }
        let how = if data.read_only.unwrap_or(false) { How::ReadOnly } else { How::ReadWrite };
        disks.push(DiskRow { workspace_id: row.id.clone(), how, mount: row.name.clone() });
    }
    if let (Some(wanted), Some(have)) = (&input.node, &node)
        && wanted != have
    {
        return Err(ToolError::Invalid(format!("the workspaces are on node {have}, not on {wanted}")));
    }
    Ok((disks, root, node))
}

pub async fn create(shared: &Shared, ctx: &CallContext, input: VmCreateInput) -> Result<Value, ToolError> {
    let start = input.start.unwrap_or(true);
    if input.workspace.is_some() && input.image.is_some() {
        return Err(ToolError::Invalid(
            "pass image or workspace, not both: a VM boots from one (a workspace keeps the image it was made from)"
                .into(),
        ));
    }
    let (disks, root, disk_node) = disks_for(shared, ctx, &input).await?;
    let wanted_groups: Vec<String> = input.security_groups.iter().flatten().map(|g| g.0.clone()).collect();
    let nic = match &input.network {
        Some(network) => Some(networks::nic_request(shared, ctx, network, &wanted_groups).await?),
        None if !wanted_groups.is_empty() => {
            return Err(ToolError::Invalid("security_groups apply to a VM on a network; pass network too".into()));
        }
        None => None,
    };
    // A VM on a network runs on the network's node.
    let disk_node = match (&nic, disk_node) {
        (Some((net, _)), Some(node)) if net.node != node => {
            return Err(ToolError::Invalid(format!(
                "network {} is on node {}, the workspaces on {node}: a VM's network and disks must be on one node",
                net.name, net.node
            )));
        }
        (Some((net, _)), _) => {
            if let Some(wanted) = input.node.as_ref().filter(|n| **n != net.node) {
                return Err(ToolError::Invalid(format!(
                    "network {} is on node {}, not on {wanted}",
                    net.name, net.node
                )));
            }
            Some(net.node.clone())
        }
        (None, node) => node,
    };
    // A VM on a workspace boots the base image's kernel and initramfs, which switch to the disk.
    let boot_image =
        if root.is_some() { "base".to_string() } else { input.image.clone().unwrap_or_else(|| "base".into()) };
    let details = match input.node.as_ref().or(disk_node.as_ref()) {
        Some(node) => {
            let row = shared.state.node(node).await?;
            vec![refresh(&shared.state, &shared.nodes, &row).await?]
        }
        None => refresh_all(&shared.state, &shared.nodes).await?,
    };
    let mut fits = Vec::new();
    let mut refusals = Vec::new();
    for detail in &details {
        match candidate(&shared.state, detail, &boot_image).await? {
            Ok(c) => fits.push(c),
            Err(why) => refusals.push(why),
        }
    }
    let Some(chosen) = choose(&fits, input.vcpus, input.memory_mib).cloned() else {
        let mut why = refusals;
        why.extend(
            fits.iter().map(|c| {
                format!("node {} has {} MiB memory and {} vCPUs free", c.name, c.free_memory_mib, c.free_vcpus)
            }),
        );
        if why.is_empty() {
            why.push("no nodes are registered (`moat node list`)".into());
        }
        return Err(ToolError::Invalid(format!(
            "no node can take a VM with {} vCPUs and {} MiB: {}",
            input.vcpus,
            input.memory_mib,
            why.join("; ")
        )));
    };
    let labels: BTreeMap<String, String> =
        input.labels.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
    let at = now();
    let row = VmRow {
        id: random_id("vm"),
        name: input.name.clone(),
        owner: ctx.principal.owner().to_string(),
        node: chosen.name.clone(),
        vcpus: i64::from(input.vcpus),
        memory_mib: input.memory_mib as i64,
        image: root.as_ref().map(|w| w.image.clone()).unwrap_or(boot_image.clone()),
        labels: serde_json::to_string(&labels).expect("string maps serialize"),
        state: VmState::Creating,
        reason: String::new(),
        vmm: String::new(),
        accel: String::new(),
        created_at: at.clone(),
        started_at: None,
        updated_at: at,
        agent: None,
    };
    let quotas = shared.authz.bundle().limiter.config().quotas(ctx.principal.role).clone();
    let capacity = NodeCapacity { cpus: chosen.cpus, memory_mib: chosen.memory_mib };
    shared.state.reserve_vm(&row, &quotas, ctx.principal.role.as_str(), capacity, start, &disks).await?;
    let nic = match &nic {
        Some((network, groups)) => match networks::attach(shared, &row, network, groups).await {
            Ok(nic) => Some(nic),
            Err(e) => {
                shared.state.delete_vm_row(&row.id).await?;
                networks::detached(shared, &row.node).await;
                return Err(e);
            }
        },
        None => None,
    };
    let new = NewVm {
        nic: nic.clone(),
        id: row.id.clone(),
        name: row.name.clone(),
        vcpus: input.vcpus,
        memory_mib: input.memory_mib,
        image: if root.is_some() { "base".into() } else { row.image.clone() },
        root_workspace: root.as_ref().map(|w| w.id.clone()),
        disks: disks
            .iter()
            .filter(|d| d.how != How::Root)
            .map(|d| (d.workspace_id.clone(), d.mount.clone(), d.how == How::ReadOnly))
            .collect(),
    };
    let answer = match node_of(shared, &row.node).await {
        Ok(node) => node.create_vm(&new, start, START_TIMEOUT).await.map_err(|e| node_failed(e, Effect::Unchanged)),
        Err(e) => Err(e),
    };
    match answer {
        Ok(mut vm) => {
            let stored = shared.state.vm_reported(&vm).await?.unwrap_or(row);
            if start && input.wait_ready.unwrap_or(false) {
                vm = wait_ready(shared, &stored).await?;
                if nic.is_some() {
                    super::git::vm_ready(shared, &stored).await;
                }
            }
            Ok(to_value(VmOutput { vm: with_disks(shared, vm_info_live(&stored, &vm)).await? }))
        }
        Err(e) => {
            // Release the reservation; if the node may have made the VM after all, remove it there.
            if let Ok(node) = node_of(shared, &row.node).await {
                let _ = node.delete_vm(&row.id, crate::nodes::client::CALL_TIMEOUT).await;
            }
            shared.state.delete_vm_row(&row.id).await?;
            if nic.is_some() {
                networks::detached(shared, &row.node).await;
            }
            Err(e)
        }
    }
}

pub async fn start(shared: &Shared, ctx: &CallContext, arg: &str) -> Result<Value, ToolError> {
    let row = row_for(shared, ctx, arg).await?;
    let quotas = shared.authz.bundle().limiter.config().quotas(ctx.principal.role).clone();
    shared.state.may_start_vm(&row, &quotas, ctx.principal.role.as_str()).await?;
    let answer = node_of(shared, &row.node).await?.start_vm(&row.id, START_TIMEOUT).await;
    reported(shared, &row, answer.map_err(|e| node_failed(e, Effect::Unknown))).await
}

pub async fn stop(
    shared: &Shared,
    ctx: &CallContext,
    arg: &str,
    force: bool,
    timeout_s: Option<u32>,
) -> Result<Value, ToolError> {
    let row = row_for(shared, ctx, arg).await?;
    let answer = node_of(shared, &row.node).await?.stop_vm(&row.id, force, timeout_s.unwrap_or(30)).await;
    reported(shared, &row, answer.map_err(|e| node_failed(e, Effect::Unknown))).await
}

pub async fn delete(shared: &Shared, ctx: &CallContext, arg: &str) -> Result<Value, ToolError> {
    let row = row_for(shared, ctx, arg).await?;
    // An agent's VMs go together, so neither is ever left without the other.
    if let Some(agent) = shared.state.agent_of_vm(&row.id).await? {
        let member = if agent.portal_vm.as_deref() == Some(row.id.as_str()) { "portal" } else { "work VM" };
        return Err(ToolError::Invalid(format!(
            "vm {} is the {member} of agent {}; agent_delete removes the agent with both its VMs",
            row.name, agent.name
        )));
    }
    remove(shared, row).await
}

/// Deletes an agent's member VM by id; false when it was gone already.
pub(super) async fn delete_member(shared: &Shared, id: &str) -> Result<bool, ToolError> {
    match shared.state.vm_by_id(id).await? {
        Some(row) => remove(shared, row).await.map(|_| true),
        None => Ok(false),
    }
}

/// Deletes the VM on its node, then its record, addresses and git token.
async fn remove(shared: &Shared, row: VmRow) -> Result<Value, ToolError> {
    match node_of(shared, &row.node).await?.delete_vm(&row.id, START_TIMEOUT).await {
        // Gone on the node already (deleted there, or the node was rebuilt): drop the record too.
        Ok(()) | Err(NodeError::NotFound { .. }) => {}
        Err(e) => return Err(node_failed(e, Effect::Unchanged)),
    }
    let had_nic = shared.state.nic(&row.id).await?.is_some();
    shared.state.delete_vm_row(&row.id).await?;
    if had_nic {
        networks::detached(shared, &row.node).await;
        super::git::vm_deleted(shared, &row.id).await;
    }
    Ok(to_value(VmDeleteOutput { deleted: row.id, name: row.name }))
}

pub async fn inspect(shared: &Shared, ctx: &CallContext, arg: &str) -> Result<Value, ToolError> {
    let row = row_for(shared, ctx, arg).await?;
    let answer = match node_of(shared, &row.node).await {
        Ok(node) => node.get_vm(&row.id).await,
        Err(e) => return Ok(to_value(VmOutput { vm: vm_info(&row, Some(e.to_string())) })),
    };
    match answer {
        Ok(vm) => {
            let stored = shared.state.vm_reported(&vm).await?.unwrap_or(row);
            Ok(to_value(VmOutput { vm: with_disks(shared, vm_info_live(&stored, &vm)).await? }))
        }
        Err(NodeError::NotFound { .. }) => {
            let reason = format!("node {} no longer has this VM", row.node);
            shared.state.set_vm_state(&row.id, VmState::Crashed, &reason).await?;
            let mut row = row;
            row.state = VmState::Crashed;
            row.reason = reason;
            Ok(to_value(VmOutput { vm: vm_info(&row, None) }))
        }
        Err(e) => {
            let stale = match e {
                NodeError::Unreachable { detail, .. } => format!("node {} did not answer: {detail}", row.node),
                other => format!("node {}: {other}", row.node),
            };
            Ok(to_value(VmOutput { vm: vm_info(&row, Some(stale)) }))
        }
    }
}

pub async fn logs(shared: &Shared, ctx: &CallContext, arg: &str, tail: Option<u32>) -> Result<Value, ToolError> {
    let row = row_for(shared, ctx, arg).await?;
    let lines = tail.unwrap_or(200) as usize;
    // Ask for enough bytes for `lines` typical console lines, then cut to whole lines.
    let tail_bytes = (lines as u64 * 200).clamp(4096, 1024 * 1024);
    let (text, truncated) = node_of(shared, &row.node)
        .await?
        .vm_logs(&row.id, tail_bytes)
        .await
        .map_err(|e| node_failed(e, Effect::Unchanged))?;
    let all: Vec<&str> = text.lines().collect();
    let skip = all.len().saturating_sub(lines);
    let text = all[skip..].join("\n");
    Ok(to_value(VmLogsOutput { vm: row.id, text, truncated: truncated || skip > 0 }))
}

pub async fn list(shared: &Shared, ctx: &CallContext, input: VmListInput) -> Result<Value, ToolError> {
    let bundle = shared.authz.bundle();
    let label = input.label.as_deref().and_then(|l| l.split_once('='));
    let disks = shared.state.vm_disks(None).await?;
    let mut nics = networks::nic_infos(shared).await?;
    let vms = shared
        .state
        .vms()
        .await?
        .into_iter()
        .filter(|row| input.node.as_deref().is_none_or(|n| row.node == n))
        .filter(|row| input.state.is_none_or(|s| row.state == s))
        .filter(|row| label.is_none_or(|(k, v)| row.labels().get(k).is_some_and(|have| have == v)))
        // A caller sees exactly the VMs it may inspect.
        .filter(|row| bundle.is_allowed(&ctx.principal, ToolName::VmInspect, &vm_resource(row)))
        .map(|row| {
            let mut info = vm_info(&row, None);
            add_disks(&mut info, &disks);
            info.nic = nics.remove(&row.id);
            info
        })
        .collect();
    Ok(to_value(VmListOutput { vms }))
}

/// After a lifecycle call: store what the node answered, or show the error.
async fn reported(shared: &Shared, row: &VmRow, answer: Result<VmReport, ToolError>) -> Result<Value, ToolError> {
    let vm = answer?;
    let stored = shared.state.vm_reported(&vm).await?.unwrap_or_else(|| row.clone());
    Ok(to_value(VmOutput { vm: vm_info_live(&stored, &vm) }))
}

/// Polls the node until the VM's agent answers; says why not (with the console's last
/// lines) when it does not in time. The VM stays created either way.
pub(super) async fn wait_ready(shared: &Shared, row: &VmRow) -> Result<VmReport, ToolError> {
    let started = std::time::Instant::now();
    let node = node_of(shared, &row.node).await?;
    loop {
        let vm = node.get_vm(&row.id).await.map_err(|e| node_failed(e, Effect::Unknown))?;
        let agent = vm.agent.clone().unwrap_or_default();
        if agent.ready {
            return Ok(vm);
        }
        if vm.state != VmState::Running || started.elapsed() > READY_TIMEOUT {
            let console = node.vm_logs(&row.id, 2048).await.map(|(text, _)| text).unwrap_or_default();
            let last: Vec<&str> = console.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect();
            return Err(ToolError::Node(format!(
                "agent on vm {} not ready (vm {}{}, waited {:?}): last seen {}; {}; console says: {}. The VM \
                 was created; vm_inspect shows when the agent answers",
                row.name,
                vm.state,
                if vm.reason.is_empty() { String::new() } else { format!(": {}", vm.reason) },
                started.elapsed(),
                agent.last_seen.as_deref().unwrap_or("never"),
                agent.detail.as_deref().unwrap_or("no detail"),
                last.join(" | ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

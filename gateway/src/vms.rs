//! The VM tools: placement, reservation, the node call and the record of
//! what the node said. A create reserves its name, quota and node capacity
//! first and releases them if the node fails; every VM call refreshes the
//! stored state from the node's answer.

use std::collections::BTreeMap;
use std::time::Duration;

use moat_proto::node::v1 as pb;
use moat_proto::node::v1::node_service_client::NodeServiceClient;
use moat_tools::{
    NodeDetail, ToolName, VmCreateInput, VmDeleteOutput, VmListInput, VmListOutput, VmLogsOutput, VmOutput,
};
use serde_json::Value;
use tonic::transport::Channel;

use crate::authz::ResourceRef;
use crate::gateway::{CallContext, Shared};
use crate::handlers::{ToolError, to_value};
use crate::node_client::{CALL_TIMEOUT, request};
use crate::nodes;
use crate::state::{State, StateError, now};
use crate::trans;
use crate::vm_store::{NodeCapacity, ReserveError, VCPU_OVERCOMMIT, VmRow};

/// How long a node may take to create and boot a VM (TCG boots are slow under load).
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// What a `vm` argument names.
#[derive(Debug)]
pub enum Resolved {
    One(Box<VmRow>),
    Missing,
    /// Several VMs of other owners share the name; the caller must pass an id.
    Ambiguous(Vec<String>),
}

/// Resolves a `vm` argument: an id, else a name among the caller's own VMs, else a name
/// held by exactly one VM.
pub async fn resolve(state: &State, caller: &str, arg: &str) -> Result<Resolved, StateError> {
    if let Some(row) = state.vm_by_id(arg).await? {
        return Ok(Resolved::One(Box::new(row)));
    }
    let mut named = state.vms_named(arg, caller).await?;
    Ok(match named.len() {
        0 => Resolved::Missing,
        _ if named[0].owner == caller => Resolved::One(Box::new(named.swap_remove(0))),
        1 => Resolved::One(Box::new(named.swap_remove(0))),
        _ => Resolved::Ambiguous(named.into_iter().map(|r| r.id).collect()),
    })
}

/// The authorizer's view of the VM a call names (an unknown VM has no owner, which only
/// admins may act on; they then learn it does not exist).
pub async fn resource(state: &State, caller: &str, arg: &str) -> Result<ResourceRef, StateError> {
    Ok(match resolve(state, caller, arg).await? {
        Resolved::One(row) => vm_resource(&row),
        Resolved::Missing | Resolved::Ambiguous(_) => {
            ResourceRef { kind: moat_tools::ResourceKind::Vm, id: arg.to_string(), owner: None, labels: Vec::new() }
        }
    })
}

pub fn vm_resource(row: &VmRow) -> ResourceRef {
    ResourceRef {
        kind: moat_tools::ResourceKind::Vm,
        id: row.id.clone(),
        owner: Some(row.owner.clone()),
        labels: row.labels().into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
    }
}

/// The answer for a VM that does not exist, and for one the caller may not see.
pub fn not_found(arg: &str) -> String {
    format!("no vm named `{arg}`; vm_list shows your VMs")
}

pub(crate) async fn row_for(shared: &Shared, ctx: &CallContext, arg: &str) -> Result<VmRow, ToolError> {
    row_in(&shared.state, &ctx.principal.name, ctx.vm.as_deref(), arg).await
}

/// The VM a handler acts on: the one the authorizer judged (`pinned`), as it is now, when
/// there is one (gone since then reads as missing); otherwise `arg` resolved for `caller`.
async fn row_in(state: &State, caller: &str, pinned: Option<&str>, arg: &str) -> Result<VmRow, ToolError> {
    if let Some(id) = pinned {
        return state.vm_by_id(id).await?.ok_or_else(|| ToolError::NotFound(not_found(arg)));
    }
    match resolve(state, caller, arg).await? {
        Resolved::One(row) => Ok(*row),
        Resolved::Missing => Err(ToolError::NotFound(not_found(arg))),
        Resolved::Ambiguous(ids) => {
            Err(ToolError::Invalid(format!("several VMs are named `{arg}` (ids {}); pass the id", ids.join(", "))))
        }
    }
}

async fn client(shared: &Shared, node: &str) -> Result<NodeServiceClient<Channel>, ToolError> {
    let row = shared.state.node(node).await?;
    shared
        .nodes
        .client(&row.name, shared.nodes.address_of(&row.name, &row.address))
        .map_err(|e| ToolError::Node(format!("node {node}: {e}")))
}

/// A node's refusal or failure, in words for the caller.
fn node_error(node: &str, status: &tonic::Status, unchanged: bool) -> ToolError {
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            let effect = if unchanged {
                "nothing was changed"
            } else {
                "the VM's state is unknown until the node answers again (vm_inspect shows it)"
            };
            ToolError::Node(format!("node {node} is unreachable ({}); {effect}", nodes::describe_status(status)))
        }
        _ => ToolError::Node(status.message().to_string()),
    }
}

fn random_id() -> String {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("vm-{hex}")
}

/// A reachable node able to run VMs, with what it has left.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub free_memory_mib: u64,
    pub free_vcpus: u64,
}

/// Most free memory first, then most free vCPUs, then name; only nodes the VM fits on.
pub fn choose(candidates: &[Candidate], vcpus: u32, memory_mib: u64) -> Option<&Candidate> {
    candidates.iter().filter(|c| c.free_memory_mib >= memory_mib && c.free_vcpus >= u64::from(vcpus)).max_by(|a, b| {
        (a.free_memory_mib, a.free_vcpus).cmp(&(b.free_memory_mib, b.free_vcpus)).then(b.name.cmp(&a.name))
    })
}

/// Why a node cannot take VMs, or its capacity left after what the gateway has placed there.
async fn candidate(state: &State, detail: &NodeDetail, image: &str) -> Result<Result<Candidate, String>, StateError> {
    if !detail.reachable {
        return Ok(Err(format!(
            "node {} is unreachable: {}",
            detail.name,
            detail.error.as_deref().unwrap_or("no answer")
        )));
    }
    if detail.runtime.is_none() {
        let why = detail.runtime_detail.as_deref().unwrap_or("no VMM installed");
        return Ok(Err(format!("no VM runtime on node {}: {why}", detail.name)));
    }
    if !detail.images.iter().any(|i| i == image) {
        return Ok(Err(format!(
            "node {} does not have image `{image}` (it has: {}); build it there with `moat image build`",
            detail.name,
            if detail.images.is_empty() { "none".to_string() } else { detail.images.join(", ") }
        )));
    }
    let placed = state.vms_on(&detail.name).await?;
    let cpus = detail.cpus.unwrap_or(0);
    let memory_mib = detail.memory_total_mib.unwrap_or(0);
    let used_memory: u64 = placed.iter().map(|v| v.memory_mib as u64).sum();
    let used_vcpus: u64 = placed.iter().map(|v| v.vcpus as u64).sum();
    Ok(Ok(Candidate {
        name: detail.name.clone(),
        cpus,
        memory_mib,
        free_memory_mib: memory_mib.saturating_sub(used_memory),
        free_vcpus: (u64::from(cpus) * VCPU_OVERCOMMIT).saturating_sub(used_vcpus),
    }))
}

pub async fn create(shared: &Shared, ctx: &CallContext, input: VmCreateInput) -> Result<Value, ToolError> {
    let start = input.start.unwrap_or(true);
    let details = match &input.node {
        Some(node) => {
            let row = shared.state.node(node).await?;
            vec![nodes::refresh(&shared.state, &shared.nodes, &row).await?]
        }
        None => nodes::refresh_all(&shared.state, &shared.nodes).await?,
    };
    let mut fits = Vec::new();
    let mut refusals = Vec::new();
    for detail in &details {
        match candidate(&shared.state, detail, input.image.as_deref().unwrap_or("base")).await? {
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
        id: random_id(),
        name: input.name.clone(),
        owner: ctx.principal.name.clone(),
        node: chosen.name.clone(),
        vcpus: i64::from(input.vcpus),
        memory_mib: input.memory_mib as i64,
        image: input.image.clone().unwrap_or_else(|| "base".into()),
        labels: serde_json::to_string(&labels).expect("string maps serialize"),
        state: "creating".into(),
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
    match shared.state.reserve_vm(&row, &quotas, ctx.principal.role.as_str(), capacity, start).await {
        Ok(()) => {}
        Err(ReserveError::Refused(refusal)) => return Err(ToolError::Invalid(refusal.to_string())),
        Err(ReserveError::State(e)) => return Err(e.into()),
    }
    let spec = pb::VmSpec {
        id: row.id.clone(),
        name: row.name.clone(),
        vcpus: input.vcpus,
        memory_mib: input.memory_mib,
        image: row.image.clone(),
    };
    let answer = match client(shared, &row.node).await {
        Ok(mut node) => node
            .create_vm(request(pb::CreateVmRequest { spec: Some(spec), start }, START_TIMEOUT))
            .await
            .map_err(|status| node_error(&row.node, &status, true)),
        Err(e) => Err(e),
    };
    match answer {
        Ok(vm) => {
            let mut vm = vm.into_inner();
            let stored = shared.state.vm_reported(&vm).await?.unwrap_or(row);
            if start && input.wait_ready.unwrap_or(false) {
                vm = wait_ready(shared, &stored).await?;
            }
            Ok(to_value(VmOutput { vm: trans::vm_info_live(&stored, &vm) }))
        }
        Err(e) => {
            // Release the reservation; if the node may have made the VM after all, remove it there.
            if let Ok(mut node) = client(shared, &row.node).await {
                let _ = node.delete_vm(request(pb::VmRef { id: row.id.clone() }, CALL_TIMEOUT)).await;
            }
            shared.state.delete_vm_row(&row.id).await?;
            Err(e)
        }
    }
}

pub async fn start(shared: &Shared, ctx: &CallContext, arg: &str) -> Result<Value, ToolError> {
    let row = row_for(shared, ctx, arg).await?;
    let quotas = shared.authz.bundle().limiter.config().quotas(ctx.principal.role).clone();
    match shared.state.may_start_vm(&row, &quotas, ctx.principal.role.as_str()).await {
        Ok(()) => {}
        Err(ReserveError::Refused(refusal)) => return Err(ToolError::Invalid(refusal.to_string())),
        Err(ReserveError::State(e)) => return Err(e.into()),
    }
    let answer = client(shared, &row.node)
        .await?
        .start_vm(request(pb::VmRef { id: row.id.clone() }, START_TIMEOUT))
        .await
        .map_err(|status| node_error(&row.node, &status, false));
    reported(shared, &row, answer).await
}

pub async fn stop(
    shared: &Shared,
    ctx: &CallContext,
    arg: &str,
    force: bool,
    timeout_s: Option<u32>,
) -> Result<Value, ToolError> {
    let row = row_for(shared, ctx, arg).await?;
    let timeout_s = timeout_s.unwrap_or(30);
    let deadline = Duration::from_secs(u64::from(timeout_s) + 20);
    let answer = client(shared, &row.node)
        .await?
        .stop_vm(request(pb::StopVmRequest { id: row.id.clone(), force, timeout_s }, deadline))
        .await
        .map_err(|status| node_error(&row.node, &status, false));
    reported(shared, &row, answer).await
}

pub async fn delete(shared: &Shared, ctx: &CallContext, arg: &str) -> Result<Value, ToolError> {
    let row = row_for(shared, ctx, arg).await?;
    let answer =
        client(shared, &row.node).await?.delete_vm(request(pb::VmRef { id: row.id.clone() }, START_TIMEOUT)).await;
    match answer {
        // Gone on the node already (deleted there, or the node was rebuilt): drop the record too.
        Ok(_) => {}
        Err(status) if status.code() == tonic::Code::NotFound => {}
        Err(status) => return Err(node_error(&row.node, &status, true)),
    }
    shared.state.delete_vm_row(&row.id).await?;
    Ok(to_value(VmDeleteOutput { deleted: row.id, name: row.name }))
}

pub async fn inspect(shared: &Shared, ctx: &CallContext, arg: &str) -> Result<Value, ToolError> {
    let row = row_for(shared, ctx, arg).await?;
    let answer = match client(shared, &row.node).await {
        Ok(mut node) => node.get_vm(request(pb::VmRef { id: row.id.clone() }, CALL_TIMEOUT)).await,
        Err(e) => return Ok(to_value(VmOutput { vm: trans::vm_info(&row, Some(e.to_string())) })),
    };
    match answer {
        Ok(vm) => {
            let vm = vm.into_inner();
            let stored = shared.state.vm_reported(&vm).await?.unwrap_or(row);
            Ok(to_value(VmOutput { vm: trans::vm_info_live(&stored, &vm) }))
        }
        Err(status) if status.code() == tonic::Code::NotFound => {
            let reason = format!("node {} no longer has this VM", row.node);
            shared.state.set_vm_state(&row.id, "crashed", &reason).await?;
            let mut row = row;
            row.state = "crashed".into();
            row.reason = reason;
            Ok(to_value(VmOutput { vm: trans::vm_info(&row, None) }))
        }
        Err(status) => {
            let stale = format!("node {} did not answer: {}", row.node, nodes::describe_status(&status));
            Ok(to_value(VmOutput { vm: trans::vm_info(&row, Some(stale)) }))
        }
    }
}

pub async fn logs(shared: &Shared, ctx: &CallContext, arg: &str, tail: Option<u32>) -> Result<Value, ToolError> {
    let row = row_for(shared, ctx, arg).await?;
    let lines = tail.unwrap_or(200) as usize;
    // Ask for enough bytes for `lines` typical console lines, then cut to whole lines.
    let tail_bytes = (lines as u64 * 200).clamp(4096, 1024 * 1024);
    let answer = client(shared, &row.node)
        .await?
        .vm_logs(request(pb::VmLogsRequest { id: row.id.clone(), tail_bytes }, CALL_TIMEOUT))
        .await
        .map_err(|status| node_error(&row.node, &status, true))?
        .into_inner();
    let all: Vec<&str> = answer.text.lines().collect();
    let skip = all.len().saturating_sub(lines);
    let text = all[skip..].join("\n");
    Ok(to_value(VmLogsOutput { vm: row.id, text, truncated: answer.truncated || skip > 0 }))
}

pub async fn list(shared: &Shared, ctx: &CallContext, input: VmListInput) -> Result<Value, ToolError> {
    let bundle = shared.authz.bundle();
    let label = input.label.as_deref().and_then(|l| l.split_once('='));
    let vms = shared
        .state
        .vms()
        .await?
        .into_iter()
        .filter(|row| input.node.as_deref().is_none_or(|n| row.node == n))
        .filter(|row| input.state.is_none_or(|s| row.state == s.as_str()))
        .filter(|row| label.is_none_or(|(k, v)| row.labels().get(k).is_some_and(|have| have == v)))
        // A caller sees exactly the VMs it may inspect.
        .filter(|row| bundle.is_allowed(&ctx.principal, ToolName::VmInspect, &vm_resource(row)))
        .map(|row| trans::vm_info(&row, None))
        .collect();
    Ok(to_value(VmListOutput { vms }))
}

/// After a lifecycle call: store what the node answered, or show the error.
async fn reported(
    shared: &Shared,
    row: &VmRow,
    answer: Result<tonic::Response<pb::Vm>, ToolError>,
) -> Result<Value, ToolError> {
    let vm = answer?.into_inner();
    let stored = shared.state.vm_reported(&vm).await?.unwrap_or_else(|| row.clone());
    Ok(to_value(VmOutput { vm: trans::vm_info_live(&stored, &vm) }))
}

/// How long `vm_create {wait_ready: true}` waits for the guest agent.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Polls the node until the VM's agent answers; says why not (with the console's last
/// lines) when it does not in time. The VM stays created either way.
async fn wait_ready(shared: &Shared, row: &VmRow) -> Result<pb::Vm, ToolError> {
    let started = std::time::Instant::now();
    loop {
        let vm = client(shared, &row.node)
            .await?
            .get_vm(request(pb::VmRef { id: row.id.clone() }, CALL_TIMEOUT))
            .await
            .map_err(|status| node_error(&row.node, &status, false))?
            .into_inner();
        if vm.agent_ready {
            return Ok(vm);
        }
        if vm.state != "running" || started.elapsed() > READY_TIMEOUT {
            let console = client(shared, &row.node)
                .await?
                .vm_logs(request(pb::VmLogsRequest { id: row.id.clone(), tail_bytes: 2048 }, CALL_TIMEOUT))
                .await
                .map(|r| r.into_inner().text)
                .unwrap_or_default();
            let last: Vec<&str> = console.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect();
            let seen = if vm.agent_last_seen.is_empty() { "never" } else { vm.agent_last_seen.as_str() };
            return Err(ToolError::Node(format!(
                "agent on vm {} not ready (vm {}{}, waited {:?}): last seen {seen}; {}; console says: {}. The VM \
                 was created; vm_inspect shows when the agent answers",
                row.name,
                vm.state,
                if vm.reason.is_empty() { String::new() } else { format!(": {}", vm.reason) },
                started.elapsed(),
                if vm.agent_detail.is_empty() { "no detail" } else { vm.agent_detail.as_str() },
                last.join(" | ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Records the states a node reported in a heartbeat. A VM the node does not list is left
/// alone here (another gateway's embedded node may hold it); `vm_inspect` asks its node
/// directly and records a VM its node no longer has.
pub async fn sync_node(state: &State, node: &str, reported: &[pb::Vm]) -> Result<(), StateError> {
    for vm in reported {
        let Some(spec) = &vm.spec else { continue };
        if let Some(row) = state.vm_by_id(&spec.id).await?
            && row.node == node
            && (row.state != vm.state || row.reason != vm.reason || row.agent != crate::vm_store::reported_agent(vm))
        {
            if vm.state == "crashed" {
                tracing::warn!(vm = %spec.id, node, reason = %vm.reason, "vm crashed");
            }
            state.vm_reported(vm).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, free_memory_mib: u64, free_vcpus: u64) -> Candidate {
        Candidate { name: name.into(), cpus: 4, memory_mib: 8192, free_memory_mib, free_vcpus }
    }

    /// Authorization judged alice's `web`; she deletes it and bob's `web` is then the only VM
    /// of that name. The handler must not act on bob's: the pinned id reads as missing.
    #[tokio::test]
    async fn a_vm_authorized_by_name_stays_the_one_acted_on() {
        use crate::vm_store::tests::row;
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("moat.db")).await.unwrap();
        let quotas = crate::limits::Quotas { running_vms: 9, vcpus: 9, memory_mib: 9999, workspaces: 1 };
        let room = crate::vm_store::NodeCapacity { cpus: 8, memory_mib: 65536 };
        state.reserve_vm(&row("vm-a", "web", "alice", "n1", 1, 256), &quotas, "agent", room, true).await.unwrap();
        state.reserve_vm(&row("vm-b", "web", "bob", "n1", 1, 256), &quotas, "agent", room, true).await.unwrap();
        let Resolved::One(judged) = resolve(&state, "alice", "web").await.unwrap() else { panic!("alice's web") };
        assert_eq!(judged.id, "vm-a");
        assert_eq!(row_in(&state, "alice", Some(&judged.id), "web").await.unwrap().id, "vm-a");

        state.delete_vm_row("vm-a").await.unwrap();
        let unpinned = row_in(&state, "alice", None, "web").await.unwrap();
        assert_eq!(unpinned.owner, "bob", "by name alone the call would now reach bob's VM");
        match row_in(&state, "alice", Some(&judged.id), "web").await {
            Err(ToolError::NotFound(message)) => assert_eq!(message, not_found("web")),
            other => panic!("the pinned VM is gone, so the call must find nothing: {other:?}"),
        }
    }

    #[test]
    fn placement_is_most_free_memory_then_vcpus_among_fitting_nodes() {
        let nodes = [c("a", 4096, 8), c("b", 8192, 2), c("c", 8192, 6), c("d", 100, 64)];
        assert_eq!(choose(&nodes, 1, 512).unwrap().name, "c", "b and c tie on memory; c has more vCPUs");
        assert_eq!(choose(&nodes, 7, 512).unwrap().name, "a", "only a has 7 vCPUs free and room");
        assert!(choose(&nodes, 1, 16384).is_none());
        assert!(choose(&[], 1, 64).is_none());
        let tied = [c("x", 1024, 4), c("w", 1024, 4)];
        assert_eq!(choose(&tied, 1, 64).unwrap().name, "w", "a full tie goes to the first name");
    }
}

//! The one place the gateway converts node proto types, into tool output
//! types (a node's facts) and store types (what a node reports of its VMs).

use moat_proto::node::v1 as pb;
use moat_tools::{AgentInfo, KvmState, NodeDetail, Protection, StorageState, VmState, VmmState};

use super::client::{NodeDisks, NodeImage, NodeWorkspace, PortalOffer};
use crate::store::vms::VmReport;

const MIB: u64 = 1024 * 1024;

pub fn node_detail(name: &str, address: &str, info: pb::NodeInfo, last_seen: String) -> NodeDetail {
    NodeDetail {
        name: name.to_string(),
        address: address.to_string(),
        reachable: true,
        error: None,
        last_seen: Some(last_seen),
        hostname: Some(info.hostname),
        agent_version: Some(info.agent_version),
        cpus: Some(info.cpus),
        memory_total_mib: Some(info.memory_total_bytes / MIB),
        memory_available_mib: Some(info.memory_available_bytes / MIB),
        kernel: Some(info.kernel),
        arch: Some(info.arch),
        kvm: info.kvm.map(|k| KvmState { present: k.present, usable: k.usable, detail: k.detail }),
        vmms: info
            .vmms
            .into_iter()
            .map(|v| VmmState {
                kind: v.kind,
                installed: v.installed,
                path: (!v.path.is_empty()).then_some(v.path),
                version: (!v.version.is_empty()).then_some(v.version),
            })
            .collect(),
        storage: info.storage.map(|s| StorageState {
            root: s.root,
            filesystem: s.filesystem,
            is_btrfs: s.is_btrfs,
            total_mib: s.total_bytes / MIB,
            available_mib: s.available_bytes / MIB,
            workspace_method: (!info.storage_method.is_empty()).then(|| info.storage_method.clone()),
            workspace_detail: (!info.storage_detail.is_empty()).then(|| info.storage_detail.clone()),
        }),
        runtime: (!info.runtime.is_empty()).then_some(info.runtime),
        accel: (!info.accel.is_empty()).then_some(info.accel),
        runtime_detail: (!info.runtime_detail.is_empty()).then_some(info.runtime_detail),
        images: info.images,
        vm_count: Some(info.vm_count),
        allocated_vcpus: Some(info.allocated_vcpus),
        allocated_memory_mib: Some(info.allocated_memory_mib),
        protections: info.protections.into_iter().map(protection).collect(),
    }
}

fn protection(p: pb::Protection) -> Protection {
    Protection { name: p.name, on: p.on, detail: p.detail }
}

/// What a node reported about one VM. A state this gateway does not know (a newer node) reads
/// as crashed, with the reason saying so.
pub fn vm_report(vm: pb::Vm) -> VmReport {
    let (state, reason) = match vm_state(vm.state()) {
        Some(state) => (state, vm.reason),
        None => (VmState::Crashed, format!("the node reported an unknown state ({})", vm.state)),
    };
    let some = |s: String| (!s.is_empty()).then_some(s);
    VmReport {
        id: vm.spec.map(|s| s.id).unwrap_or_default(),
        state,
        reason,
        vmm: vm.vmm,
        accel: vm.accel,
        started_at: some(vm.started_at),
        agent: (state == VmState::Running).then(|| AgentInfo {
            ready: vm.agent_ready,
            version: some(vm.agent_version),
            last_seen: some(vm.agent_last_seen),
            detail: some(vm.agent_detail),
        }),
        protections: vm.protections.into_iter().map(protection).collect(),
    }
}

fn vm_state(state: pb::VmState) -> Option<VmState> {
    Some(match state {
        pb::VmState::Unspecified => return None,
        pb::VmState::Creating => VmState::Creating,
        pb::VmState::Stopped => VmState::Stopped,
        pb::VmState::Starting => VmState::Starting,
        pb::VmState::Running => VmState::Running,
        pb::VmState::Stopping => VmState::Stopping,
        pb::VmState::Crashed => VmState::Crashed,
        pb::VmState::Deleting => VmState::Deleting,
    })
}

pub fn image(image: pb::Image) -> NodeImage {
    let some = |s: String| (!s.is_empty()).then_some(s);
    NodeImage {
        name: image.name,
        kind: image.kind,
        size_bytes: image.size_bytes,
        sha256: some(image.sha256),
        source: some(image.source),
        created_at: some(image.created_at),
    }
}

pub fn workspace(ws: pb::Workspace) -> NodeWorkspace {
    NodeWorkspace { id: ws.id, size_bytes: ws.size_bytes, method: ws.method, exclusive_bytes: ws.exclusive_bytes }
}

pub fn portal_offer(offer: pb::PortalOffer) -> PortalOffer {
    PortalOffer { session: offer.session, vm_id: offer.vm_id }
}

/// A node's disk probe; an answer that does not parse is the node's fault, said as such.
pub fn node_disks(probe: pb::DiskProbe) -> Result<NodeDisks, String> {
    let snapshot = serde_json::from_str(&probe.snapshot_json)
        .map_err(|e| format!("the node's disk snapshot does not parse: {e}"))?;
    let word = |w: &str| serde_json::Value::String(w.to_string());
    let management = serde_json::from_value(word(&probe.management))
        .map_err(|_| format!("the node reports an unknown disk management mode `{}`", probe.management))?;
    let applier = serde_json::from_value(word(&probe.applier))
        .map_err(|_| format!("the node reports an unknown disk applier `{}`", probe.applier))?;
    Ok(NodeDisks { snapshot, management, applier })
}

pub fn disk_report(report: pb::DiskLayoutReport) -> moat_node::disk::ApplyReport {
    use moat_tools::LayoutPhase;
    let phase = match pb::DiskLayoutPhase::try_from(report.phase) {
        Ok(pb::DiskLayoutPhase::Applied) => LayoutPhase::Applied,
        Ok(pb::DiskLayoutPhase::Refused) => LayoutPhase::Refused,
        _ => LayoutPhase::Failed,
    };
    moat_node::disk::ApplyReport {
        generation: report.generation,
        phase,
        code: report.code,
        message: report.message,
        refusals: serde_json::from_str(&report.refusals_json).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_crosses_the_wire_and_back() {
        for state in VmState::ALL {
            let wire = pb::Vm { state: node_side(state) as i32, ..pb::Vm::default() };
            assert_eq!(vm_report(wire).state, state);
        }
        let unknown = vm_report(pb::Vm { state: 99, ..pb::Vm::default() });
        assert_eq!(unknown.state, VmState::Crashed);
        assert!(unknown.reason.contains("unknown state (99)"), "{}", unknown.reason);
    }

    /// How moat-node encodes a state (its api/trans.rs), restated to test the round trip.
    fn node_side(state: VmState) -> pb::VmState {
        pb::VmState::from_str_name(&format!("VM_STATE_{}", state.as_str().to_uppercase())).unwrap()
    }
}

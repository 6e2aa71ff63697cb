//! The one place the gateway converts node proto types into tool output types.

use moat_proto::node::v1 as pb;
use moat_tools::{AgentInfo, KvmState, NodeDetail, NodeSummary, StorageState, VmInfo, VmStateName, VmmState};

use crate::vm_store::VmRow;

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
        }),
        runtime: (!info.runtime.is_empty()).then_some(info.runtime),
        accel: (!info.accel.is_empty()).then_some(info.accel),
        runtime_detail: (!info.runtime_detail.is_empty()).then_some(info.runtime_detail),
        images: info.images,
        vm_count: Some(info.vm_count),
        allocated_vcpus: Some(info.allocated_vcpus),
        allocated_memory_mib: Some(info.allocated_memory_mib),
    }
}

/// What `node_list` shows of a node's detail.
pub fn node_summary(d: &NodeDetail) -> NodeSummary {
    NodeSummary {
        name: d.name.clone(),
        reachable: d.reachable,
        error: d.error.clone(),
        last_seen: d.last_seen.clone(),
        hostname: d.hostname.clone(),
        cpus: d.cpus,
        memory_total_mib: d.memory_total_mib,
        kvm_usable: d.kvm.as_ref().map(|k| k.usable),
        vmms: d.vmms.iter().filter(|v| v.installed).map(|v| v.kind.clone()).collect(),
        runtime: d.runtime.clone(),
        accel: d.accel.clone(),
        vm_count: d.vm_count,
        allocated_vcpus: d.allocated_vcpus,
        allocated_memory_mib: d.allocated_memory_mib,
    }
}

/// A stored VM as tools show it; `stale` says why the state may be old.
pub fn vm_info(row: &VmRow, stale: Option<String>) -> VmInfo {
    VmInfo {
        id: row.id.clone(),
        name: row.name.clone(),
        owner: row.owner.clone(),
        node: row.node.clone(),
        state: VmStateName::parse(&row.state).unwrap_or(VmStateName::Crashed),
        reason: (!row.reason.is_empty()).then(|| row.reason.clone()),
        vcpus: row.vcpus as u32,
        memory_mib: row.memory_mib as u64,
        image: row.image.clone(),
        labels: row.labels(),
        vmm: (!row.vmm.is_empty()).then(|| row.vmm.clone()),
        accel: (!row.accel.is_empty()).then(|| row.accel.clone()),
        created_at: row.created_at.clone(),
        started_at: row.started_at.clone(),
        stale,
        // As of the node's last heartbeat; callers that just asked the node replace it.
        agent: (row.state == "running")
            .then(|| row.agent.as_deref().and_then(|json| serde_json::from_str(json).ok()))
            .flatten(),
    }
}

/// A stored VM with what its node just said about the guest agent.
pub fn vm_info_live(row: &VmRow, vm: &pb::Vm) -> VmInfo {
    let mut info = vm_info(row, None);
    info.agent = agent_info(vm);
    info
}

/// The guest agent of a VM as its node reported it; none unless the VM runs.
pub fn agent_info(vm: &pb::Vm) -> Option<AgentInfo> {
    let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
    (vm.state == "running").then(|| AgentInfo {
        ready: vm.agent_ready,
        version: some(&vm.agent_version),
        last_seen: some(&vm.agent_last_seen),
        detail: some(&vm.agent_detail),
    })
}

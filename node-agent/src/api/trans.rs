//! The one place moat-node converts between domain types and proto types.

use moat_proto::node::v1 as pb;

use crate::probe::HostInfo;
use crate::storage::{ImageMeta, WorkspaceMeta, WorkspaceView};
use crate::vm::{Attach, Disk, NewVm, Nic, Runtime, VmManager, VmState, VmView};

pub(crate) fn node_info(info: HostInfo, vms: &VmManager) -> pb::NodeInfo {
    let is_btrfs = info.storage.is_btrfs();
    let (runtime, accel, runtime_detail) = match vms.runtime() {
        Runtime::Ready(vmm) => (vmm.kind().to_string(), vmm.accel().as_str().to_string(), String::new()),
        Runtime::Missing(detail) => (String::new(), String::new(), detail.clone()),
    };
    let defined = vms.list();
    pb::NodeInfo {
        name: info.name,
        hostname: info.hostname,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        cpus: info.cpus,
        memory_total_bytes: info.memory_total_bytes,
        memory_available_bytes: info.memory_available_bytes,
        kernel: info.kernel,
        arch: info.arch,
        kvm: Some(pb::KvmStatus { present: info.kvm.present, usable: info.kvm.usable, detail: info.kvm.detail }),
        vmms: info
            .vmms
            .into_iter()
            .map(|v| pb::VmmInfo {
                kind: v.kind.to_string(),
                installed: v.path.is_some(),
                path: v.path.map(|p| p.display().to_string()).unwrap_or_default(),
                version: v.version.unwrap_or_default(),
            })
            .collect(),
        storage: Some(pb::StorageInfo {
            root: info.storage.root.display().to_string(),
            filesystem: info.storage.filesystem,
            is_btrfs,
            total_bytes: info.storage.total_bytes,
            available_bytes: info.storage.available_bytes,
        }),
        runtime,
        accel,
        runtime_detail,
        allocated_vcpus: defined.iter().map(|v| v.config.vcpus).sum(),
        allocated_memory_mib: defined.iter().map(|v| v.config.memory_mib).sum(),
        vm_count: defined.len() as u32,
        images: vms.images(),
        protections: vms.protections().into_iter().map(protection).collect(),
        storage_method: vms.storage().map(|s| s.method().as_str().to_string()).unwrap_or_default(),
        storage_detail: vms.storage().map(|s| s.method_detail().to_string()).unwrap_or_default(),
    }
}

pub(crate) fn new_vm(spec: pb::VmSpec) -> Result<NewVm, tonic::Status> {
    let nic = spec.nic.map(nic).transpose()?;
    Ok(NewVm {
        id: spec.id,
        name: spec.name,
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        image: spec.image,
        root_workspace: (!spec.root_workspace.is_empty()).then_some(spec.root_workspace),
        disks: spec
            .disks
            .into_iter()
            .map(|d| Attach { workspace: d.workspace_id, name: d.name, read_only: d.read_only })
            .collect(),
        nic,
    })
}

fn nic(nic: pb::Nic) -> Result<Nic, tonic::Status> {
    let ip = |what: &str, s: &str| {
        s.parse::<std::net::Ipv4Addr>()
            .map_err(|_| tonic::Status::invalid_argument(format!("nic {what} `{s}` is not an IPv4 address")))
    };
    if nic.prefix > 30 {
        return Err(tonic::Status::invalid_argument(format!("nic prefix /{} is not 0-30", nic.prefix)));
    }
    Ok(Nic {
        ip: ip("address", &nic.ip)?,
        gateway: ip("gateway", &nic.gateway)?,
        dns: nic.dns.iter().map(|d| ip("resolver", d)).collect::<Result<_, _>>()?,
        prefix: nic.prefix as u8,
        network: nic.network_id,
        mac: nic.mac,
    })
}

/// A VM's network card as `VmSpec` carries it (the gateway sends it the same way).
pub fn nic_spec(nic: &Nic) -> pb::Nic {
    pb::Nic {
        network_id: nic.network.clone(),
        mac: nic.mac.clone(),
        ip: nic.ip.to_string(),
        prefix: u32::from(nic.prefix),
        gateway: nic.gateway.to_string(),
        dns: nic.dns.iter().map(|d| d.to_string()).collect(),
    }
}

pub(crate) fn disk_image(meta: ImageMeta) -> pb::Image {
    pb::Image {
        name: meta.name,
        kind: "disk".into(),
        size_bytes: meta.size_bytes,
        sha256: meta.sha256,
        source: meta.source,
        created_at: meta.created_at,
    }
}

pub(crate) fn initramfs_image(name: String, size_bytes: u64) -> pb::Image {
    pb::Image { name, kind: "initramfs".into(), size_bytes, ..pb::Image::default() }
}

pub(crate) fn workspace(meta: WorkspaceMeta, exclusive_bytes: Option<u64>) -> pb::Workspace {
    pb::Workspace {
        id: meta.id,
        name: meta.name,
        image: meta.image,
        parent: meta.parent.unwrap_or_default(),
        size_bytes: meta.size_bytes,
        method: meta.method.as_str().into(),
        created_at: meta.created_at,
        exclusive_bytes,
    }
}

pub(crate) fn workspace_view(view: WorkspaceView) -> pb::Workspace {
    workspace(view.meta, view.exclusive_bytes)
}

fn protection(p: moat_tools::Protection) -> pb::Protection {
    pb::Protection { name: p.name, on: p.on, detail: p.detail }
}

pub(crate) fn vm(view: VmView) -> pb::Vm {
    pb::Vm {
        spec: Some(pb::VmSpec {
            id: view.config.id,
            name: view.config.name,
            vcpus: view.config.vcpus,
            memory_mib: view.config.memory_mib,
            root_workspace: view
                .config
                .disks
                .iter()
                .find(|d| d.mount == Disk::ROOT)
                .map(|d| d.workspace.clone())
                .unwrap_or_default(),
            disks: view
                .config
                .disks
                .iter()
                .filter(|d| d.mount != Disk::ROOT)
                .map(|d| pb::DiskAttach {
                    workspace_id: d.workspace.clone(),
                    name: d.mount.clone(),
                    read_only: d.read_only,
                })
                .collect(),
            nic: view.config.nic.as_ref().map(nic_spec),
            image: view.config.image,
        }),
        state: vm_state(view.status.state) as i32,
        reason: view.status.reason,
        vmm: view.vmm.to_string(),
        accel: view.accel.to_string(),
        pid: view.status.pid,
        started_at: view.status.started_at,
        agent_ready: view.agent.ready,
        agent_version: view.agent.version,
        agent_last_seen: view.agent.last_seen,
        agent_detail: view.agent.detail,
        protections: view.protections.into_iter().map(protection).collect(),
    }
}

pub(crate) fn vm_state(state: VmState) -> pb::VmState {
    match state {
        VmState::Creating => pb::VmState::Creating,
        VmState::Stopped => pb::VmState::Stopped,
        VmState::Starting => pb::VmState::Starting,
        VmState::Running => pb::VmState::Running,
        VmState::Stopping => pb::VmState::Stopping,
        VmState::Crashed => pb::VmState::Crashed,
        VmState::Deleting => pb::VmState::Deleting,
    }
}

pub fn portal_offer(offer: crate::uplink::Offer) -> pb::PortalOffer {
    pb::PortalOffer { session: offer.session, vm_id: offer.vm_id }
}

pub(crate) fn disk_probe(snapshot: &moat_tools::DiskSnapshot, settings: &crate::disk::DiskSettings) -> pb::DiskProbe {
    let word = |v: serde_json::Value| v.as_str().unwrap_or_default().to_string();
    pb::DiskProbe {
        snapshot_json: serde_json::to_string(snapshot).expect("a snapshot serializes"),
        management: word(serde_json::json!(settings.management)),
        applier: word(serde_json::json!(settings.applier)),
    }
}

pub(crate) fn disk_layout(request: pb::ApplyDiskLayoutRequest) -> Result<(moat_tools::DiskLayout, u64), tonic::Status> {
    let layout = serde_json::from_str(&request.layout_json)
        .map_err(|e| tonic::Status::invalid_argument(format!("the disk layout does not parse: {e}")))?;
    Ok((layout, request.generation))
}

pub(crate) fn disk_report(report: crate::disk::ApplyReport) -> pb::DiskLayoutReport {
    use moat_tools::LayoutPhase;
    let phase = match report.phase {
        LayoutPhase::Applied => pb::DiskLayoutPhase::Applied,
        LayoutPhase::Refused => pb::DiskLayoutPhase::Refused,
        _ => pb::DiskLayoutPhase::Failed,
    };
    pb::DiskLayoutReport {
        generation: report.generation,
        phase: phase.into(),
        code: report.code,
        message: report.message,
        refusals_json: serde_json::to_string(&report.refusals).expect("refusals serialize"),
    }
}

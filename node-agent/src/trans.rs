//! The one place moat-node converts domain types into proto types.

use moat_proto::node::v1 as pb;

use crate::probe::HostInfo;

pub(crate) fn node_info(info: HostInfo) -> pb::NodeInfo {
    let is_btrfs = info.storage.is_btrfs();
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
    }
}

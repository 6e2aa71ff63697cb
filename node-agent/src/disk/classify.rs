//! The safety classifier: whether a disk may be repartitioned, judged on a snapshot of the host.
//! Pure and deterministic (same snapshot, same verdict, in a stable order), so the gateway's
//! pre-flight and the node's gate, which runs it again on a fresh snapshot just before writing,
//! cannot disagree about the rules, only about the facts.
//!
//! A disk is refused when it, any partition of it, or anything built on those (holders, and
//! their partitions, transitively) is in use: holds `/`, is mounted, is active swap, is an LVM
//! physical volume, a ZFS pool member or a RAID member, or holds moat's VM disks or workspace
//! storage. Only whole disks and loop devices may be named.

use std::collections::{BTreeSet, HashMap};

use moat_tools::disk::{BlockDevice, DiskSnapshot, Refusal, RefusalCode};

/// The device a layout names: a stable link, /dev/NAME, or NAME.
pub fn resolve<'a>(declared: &str, snap: &'a DiskSnapshot) -> Option<&'a BlockDevice> {
    let path = super::plan::device_path(declared);
    if path.starts_with("/dev/disk/") {
        return snap.devices.iter().find(|d| d.links.contains(&path));
    }
    let name = path.trim_start_matches("/dev/");
    snap.devices.iter().find(|d| d.name == name)
}

/// Why the whole disk `name` may not be repartitioned; empty when it may.
pub fn classify_disk(name: &str, snap: &DiskSnapshot) -> Vec<Refusal> {
    let Some(device) = snap.devices.iter().find(|d| d.name == name) else {
        return vec![Refusal {
            device: name.to_string(),
            code: RefusalCode::UnknownDevice,
            detail: format!("node {} has no device {name}", snap.node),
        }];
    };
    let mut refusals = in_use(name, snap);
    if device.parent.is_some() || !matches!(device.dev_type.as_str(), "disk" | "loop") {
        refusals.push(Refusal {
            device: name.to_string(),
            code: RefusalCode::NotADisk,
            detail: format!(
                "{name} is a {}{}; a layout names whole disks",
                device.dev_type,
                device.parent.as_ref().map(|p| format!(" of {p}")).unwrap_or_default()
            ),
        });
    }
    refusals.sort();
    refusals.dedup();
    refusals
}

/// Every reason `name` (and what hangs off it) is in use, sorted.
pub fn in_use(name: &str, snap: &DiskSnapshot) -> Vec<Refusal> {
    let by_name: HashMap<&str, &BlockDevice> = snap.devices.iter().map(|d| (d.name.as_str(), d)).collect();
    let mut refusals = BTreeSet::new();
    let mut refuse = |code: RefusalCode, detail: String| {
        refusals.insert(Refusal { device: name.to_string(), code, detail });
    };
    for dev in affected(name, snap) {
        let device = by_name.get(dev.as_str());
        let mut mountpoints: BTreeSet<&str> =
            device.map(|d| d.mountpoints.iter().map(String::as_str).collect()).unwrap_or_default();
        mountpoints.extend(snap.mounts.iter().filter(|(d, _)| *d == dev).map(|(_, m)| m.as_str()));
        for mp in mountpoints {
            if mp == "/" {
                refuse(RefusalCode::HoldsRoot, format!("{dev} holds the root filesystem /"));
            } else if mp == "[SWAP]" {
                refuse(RefusalCode::ActiveSwap, format!("{dev} is active swap"));
            } else {
                refuse(RefusalCode::Mounted, format!("{dev} is mounted at {mp}"));
            }
        }
        if snap.swaps.contains(&dev) {
            refuse(RefusalCode::ActiveSwap, format!("{dev} is active swap"));
        }
        for (_, vg) in snap.lvm_pvs.iter().filter(|(d, _)| *d == dev) {
            let group = if vg.is_empty() { String::from("no volume group yet") } else { format!("volume group {vg}") };
            refuse(RefusalCode::LvmPv, format!("{dev} is an LVM physical volume ({group})"));
        }
        for (_, pool) in snap.zfs_members.iter().filter(|(d, _)| *d == dev) {
            refuse(RefusalCode::ZfsMember, format!("{dev} is a member of ZFS pool {pool}"));
        }
        for used in snap.uses.iter().filter(|u| u.device == dev) {
            refuse(used.code, format!("{dev}: {}", used.detail));
        }
        let Some(device) = device else { continue };
        match device.fstype.as_str() {
            "LVM2_member" => refuse(RefusalCode::LvmPv, format!("{dev} carries an LVM physical volume signature")),
            "zfs_member" => refuse(RefusalCode::ZfsMember, format!("{dev} carries a ZFS pool member signature")),
            "linux_raid_member" => refuse(RefusalCode::RaidMember, format!("{dev} is a software RAID member")),
            _ => {}
        }
        for holder in &device.holders {
            if holder.starts_with("md") {
                refuse(RefusalCode::RaidMember, format!("{dev} is a member of RAID array {holder}"));
            } else {
                refuse(RefusalCode::HasHolders, format!("{holder} is built on {dev}"));
            }
        }
    }
    refusals.into_iter().collect()
}

/// `name`, its partitions, their holders and everything under those, transitively; sorted.
pub fn affected(name: &str, snap: &DiskSnapshot) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![name.to_string()];
    while let Some(dev) = todo.pop() {
        if !seen.insert(dev.clone()) {
            continue;
        }
        for d in &snap.devices {
            if d.parent.as_deref() == Some(dev.as_str()) {
                todo.push(d.name.clone());
            }
            if d.name == dev {
                todo.extend(d.holders.iter().cloned());
            }
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(name: &str, parent: Option<&str>) -> BlockDevice {
        BlockDevice {
            name: name.into(),
            dev_type: if parent.is_some() { "part".into() } else { "disk".into() },
            size_bytes: 1 << 30,
            parent: parent.map(str::to_string),
            ..BlockDevice::default()
        }
    }

    fn snap(devices: Vec<BlockDevice>) -> DiskSnapshot {
        DiskSnapshot { node: "n1".into(), devices, ..DiskSnapshot::default() }
    }

    fn codes(refusals: &[Refusal]) -> Vec<RefusalCode> {
        refusals.iter().map(|r| r.code).collect()
    }

    #[test]
    fn each_use_is_named_with_its_code() {
        let mut root = dev("vda1", Some("vda"));
        root.mountpoints = vec!["/".into()];
        let mut lvm = dev("sdc", None);
        lvm.fstype = "LVM2_member".into();
        let mut raid = dev("sdd1", Some("sdd"));
        raid.holders = vec!["md0".into()];
        let mut s = snap(vec![dev("vda", None), root, dev("sdb", None), lvm, dev("sdd", None), raid, dev("md0", None)]);
        s.swaps = vec!["sdb".into()];
        s.zfs_members = vec![("sde".into(), "tank".into())];
        s.devices.push(dev("sde", None));
        s.mounts = vec![("md0".into(), "/srv".into())];
        assert_eq!(codes(&classify_disk("vda", &s)), [RefusalCode::HoldsRoot]);
        assert_eq!(codes(&classify_disk("sdb", &s)), [RefusalCode::ActiveSwap]);
        assert_eq!(codes(&classify_disk("sdc", &s)), [RefusalCode::LvmPv]);
        // The array is mounted: the member's disk is refused for both, naming the holder's mount.
        let sdd = classify_disk("sdd", &s);
        assert_eq!(codes(&sdd), [RefusalCode::Mounted, RefusalCode::RaidMember]);
        assert!(sdd[0].detail.contains("md0 is mounted at /srv"), "{sdd:?}");
        assert_eq!(codes(&classify_disk("sde", &s)), [RefusalCode::ZfsMember]);
        assert_eq!(codes(&classify_disk("vda1", &s)), [RefusalCode::HoldsRoot, RefusalCode::NotADisk]);
        assert_eq!(codes(&classify_disk("nope", &s)), [RefusalCode::UnknownDevice]);
    }

    #[test]
    fn a_free_disk_is_safe_and_resolves_by_link() {
        let mut free = dev("loop7", None);
        free.dev_type = "loop".into();
        free.links = vec!["/dev/disk/by-id/loop-x".into()];
        let s = snap(vec![free]);
        assert!(classify_disk("loop7", &s).is_empty());
        assert_eq!(resolve("/dev/disk/by-id/loop-x", &s).map(|d| d.name.as_str()), Some("loop7"));
        assert_eq!(resolve("/dev/loop7", &s).map(|d| d.name.as_str()), Some("loop7"));
        assert_eq!(resolve("loop7", &s).map(|d| d.name.as_str()), Some("loop7"));
        assert!(resolve("/dev/disk/by-id/other", &s).is_none());
    }
}

//! The DiskLayout classifier, planner and disko renderer as pure functions: properties over
//! generated host snapshots and layouts (proptest), and a corpus of renderings, hostile strings
//! included, read back by Nix itself (`nix-instantiate --parse` and `--eval`, Debian's nix-bin).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use moat_node::disk::{disko, plan};
use moat_tools::disk::{
    BlockDevice, DeviceUse, DiskLayout, DiskSnapshot, DiskSpec, Filesystem, LayoutKind, LayoutMetadata, LayoutSpec,
    PartitionSpec, PartitionTable, RefusalCode,
};
use proptest::prelude::*;

const GIB: u64 = 1 << 30;

/// What can be true of one device in a generated snapshot.
#[derive(Debug, Clone, Default)]
struct Facts {
    mountpoint: Option<&'static str>,
    swap: bool,
    pv: bool,
    zfs: bool,
    signature: Option<&'static str>,
    holder: Option<&'static str>,
    moat: Option<RefusalCode>,
}

fn facts() -> impl Strategy<Value = Facts> {
    let rare = |p: f64| proptest::bool::weighted(p);
    (
        proptest::option::weighted(0.15, prop_oneof![Just("/"), Just("/srv"), Just("/var/lib/x")]),
        rare(0.1),
        rare(0.1),
        rare(0.1),
        proptest::option::weighted(
            0.1,
            prop_oneof![Just("LVM2_member"), Just("zfs_member"), Just("linux_raid_member")],
        ),
        proptest::option::weighted(0.1, prop_oneof![Just("md0"), Just("dm-0"), Just("dm-1")]),
        proptest::option::weighted(0.1, prop_oneof![Just(RefusalCode::VmDisk), Just(RefusalCode::WorkspaceStorage)]),
    )
        .prop_map(|(mountpoint, swap, pv, zfs, signature, holder, moat)| Facts {
            mountpoint,
            swap,
            pv,
            zfs,
            signature,
            holder,
            moat,
        })
}

/// Up to five disks with up to three partitions each, every device with its own facts; holders
/// (md0, dm-0, dm-1) exist as devices of their own, possibly mounted.
fn snapshot() -> impl Strategy<Value = DiskSnapshot> {
    let disk = (0usize..4, facts(), proptest::collection::vec(facts(), 3));
    (proptest::collection::vec(disk, 1..6), proptest::collection::vec(facts(), 3)).prop_map(|(disks, holders)| {
        let mut snap = DiskSnapshot { node: "n1".into(), taken_at: "t".into(), ..DiskSnapshot::default() };
        let add = |snap: &mut DiskSnapshot, name: String, parent: Option<String>, dev_type: &str, f: &Facts| {
            if let Some(mp) = f.mountpoint {
                snap.mounts.push((name.clone(), mp.to_string()));
            }
            if f.swap {
                snap.swaps.push(name.clone());
            }
            if f.pv {
                snap.lvm_pvs.push((name.clone(), "vg0".into()));
            }
            if f.zfs {
                snap.zfs_members.push((name.clone(), "tank".into()));
            }
            if let Some(code) = f.moat {
                snap.uses.push(DeviceUse { device: name.clone(), code, detail: "moat".into() });
            }
            snap.devices.push(BlockDevice {
                name: name.clone(),
                dev_type: dev_type.into(),
                size_bytes: GIB,
                parent,
                holders: f.holder.map(|h| vec![h.to_string()]).unwrap_or_default(),
                links: vec![format!("/dev/disk/by-id/id-{name}")],
                fstype: f.signature.unwrap_or_default().into(),
                ..BlockDevice::default()
            });
        };
        for (i, (parts, disk_facts, part_facts)) in disks.iter().enumerate() {
            let name = format!("d{i}");
            add(&mut snap, name.clone(), None, "disk", disk_facts);
            for (p, f) in part_facts.iter().take(*parts).enumerate() {
                add(&mut snap, format!("{name}p{}", p + 1), Some(name.clone()), "part", f);
            }
        }
        for (h, f) in ["md0", "dm-0", "dm-1"].iter().zip(&holders) {
            add(&mut snap, h.to_string(), None, if h.starts_with("md") { "raid1" } else { "lvm" }, f);
        }
        snap
    })
}

fn part(size: &str) -> PartitionSpec {
    PartitionSpec::new(size, Filesystem::Ext4)
}

fn layout_on(devices: &[String]) -> DiskLayout {
    DiskLayout {
        kind: LayoutKind::DiskLayout,
        api_version: None,
        metadata: LayoutMetadata { name: "data".into() },
        spec: LayoutSpec {
            node: "n1".into(),
            disks: devices
                .iter()
                .map(|d| DiskSpec {
                    device: d.clone(),
                    table: PartitionTable::Gpt,
                    partitions: vec![part("64MiB"), part("rest")],
                })
                .collect(),
        },
    }
}

/// The test's own idea of "in use", written apart from the classifier.
fn busy(snap: &DiskSnapshot) -> BTreeSet<String> {
    let mut busy = BTreeSet::new();
    busy.extend(snap.mounts.iter().map(|(d, _)| d.clone()));
    busy.extend(snap.swaps.iter().cloned());
    busy.extend(snap.lvm_pvs.iter().map(|(d, _)| d.clone()));
    busy.extend(snap.zfs_members.iter().map(|(d, _)| d.clone()));
    busy.extend(snap.uses.iter().map(|u| u.device.clone()));
    for d in &snap.devices {
        if !d.fstype.is_empty() || !d.holders.is_empty() || !d.mountpoints.is_empty() {
            busy.insert(d.name.clone());
        }
    }
    busy
}

/// Everything built on `name`: partitions, holders, their partitions, transitively.
fn under(name: &str, snap: &DiskSnapshot) -> BTreeSet<String> {
    let mut out = BTreeSet::from([name.to_string()]);
    loop {
        let before = out.len();
        for d in &snap.devices {
            if d.parent.as_ref().is_some_and(|p| out.contains(p)) {
                out.insert(d.name.clone());
            }
            if out.contains(&d.name) {
                out.extend(d.holders.iter().cloned());
            }
        }
        if out.len() == before {
            return out;
        }
    }
}

fn reversed(snap: &DiskSnapshot) -> DiskSnapshot {
    let mut r = snap.clone();
    r.devices.reverse();
    r.mounts.reverse();
    r.swaps.reverse();
    r.lvm_pvs.reverse();
    r.uses.reverse();
    r
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A safe verdict never names a disk that, or anything built on it, is in use.
    #[test]
    fn a_safe_verdict_never_overlaps_a_device_in_use(snap in snapshot(), pick in proptest::collection::vec(0usize..8, 1..3), by_id in any::<bool>()) {
        let wholes: Vec<&BlockDevice> = snap.devices.iter().filter(|d| d.dev_type == "disk").collect();
        let mut names: Vec<String> = pick.iter().map(|i| wholes[i % wholes.len()].name.clone()).collect();
        names.sort();
        names.dedup();
        let declared: Vec<String> =
            names.iter().map(|n| if by_id { format!("/dev/disk/by-id/id-{n}") } else { n.clone() }).collect();
        let planned = plan::plan(&layout_on(&declared), &snap).unwrap();
        let busy = busy(&snap);
        for name in &names {
            let overlap: Vec<_> = under(name, &snap).intersection(&busy).cloned().collect();
            prop_assert_eq!(planned.is_safe() && !overlap.is_empty(), false, "{} is safe yet {:?} are in use", name, overlap);
            // And the converse: a refusal names something real.
            if !overlap.is_empty() {
                prop_assert!(planned.refusals.iter().any(|r| &r.device == name));
            }
        }
    }

    /// Identical inputs, in any order, give identical verdicts.
    #[test]
    fn verdicts_are_deterministic(snap in snapshot(), pick in 0usize..8) {
        let wholes: Vec<&BlockDevice> = snap.devices.iter().filter(|d| d.dev_type == "disk").collect();
        let layout = layout_on(&[wholes[pick % wholes.len()].name.clone()]);
        let first = plan::plan(&layout, &snap).unwrap();
        prop_assert_eq!(&first, &plan::plan(&layout, &snap).unwrap());
        prop_assert_eq!(&first.refusals, &plan::plan(&layout, &reversed(&snap)).unwrap().refusals);
    }

    /// The renderer never panics; with no NUL anywhere it succeeds, and every device it emits
    /// is under /dev/.
    #[test]
    fn the_renderer_is_total_and_devices_are_under_dev(
        device in "(/dev/)?(disk/by-id/)?[a-z0-9._:-]{1,20}",
        label in any::<String>(),
        name in any::<String>(),
        mountpoint in any::<String>(),
        size in prop_oneof![Just("64MiB".to_string()), Just("rest".to_string()), any::<String>()],
    ) {
        let mut p = part(&size);
        p.label = Some(label.clone());
        p.name = Some(name.clone());
        p.mountpoint = Some(mountpoint.clone());
        let mut layout = layout_on(&[device]);
        layout.spec.disks[0].partitions = vec![p];
        let rendered = disko::render(&layout);
        let has_nul = [&label, &name, &mountpoint].iter().any(|s| s.contains('\0'));
        match rendered {
            Ok(text) => {
                prop_assert!(!has_nul);
                let devices = disko::emitted_devices(&text);
                prop_assert!(!devices.is_empty());
                prop_assert!(devices.iter().all(|d| d.starts_with("/dev/")), "{:?}", devices);
            }
            Err(disko::RenderError::Nul { .. }) => prop_assert!(has_nul),
            Err(disko::RenderError::Size(_)) => prop_assert!(plan::parse_size(&size).is_err()),
        }
    }
}

/// Layouts disko should take, each rendered and read back by Nix: parsed, evaluated, and every
/// string (hostile ones included) equal to what the layout said.
#[test]
fn rendered_layouts_parse_and_evaluate_in_nix() {
    if !moat_node::testing::root_and(&["nix-instantiate"]) {
        return;
    }
    let hostile =
        ["quote\"s", "${builtins.abort \"x\"}", "back\\slash", "new\nline", "dollar$sign", "tab\there", "''${x}"];
    let mut corpus: Vec<DiskLayout> = Vec::new();
    for (i, s) in hostile.iter().enumerate() {
        let mut p = part("64MiB");
        p.label = Some(s.to_string());
        p.name = Some(format!("n{i}{s}"));
        p.mountpoint = Some(format!("/srv/{s}"));
        let mut l = layout_on(&[format!("/dev/disk/by-id/nvme-{i}")]);
        l.spec.disks[0].partitions = vec![p, part("rest")];
        corpus.push(l);
    }
    let mut mixed = layout_on(&["sdb".into(), "/dev/sdc".into()]);
    mixed.spec.disks[0].partitions = vec![
        PartitionSpec { part_type: Some(moat_tools::PartType::Efi), filesystem: Filesystem::None, ..part("512M") },
        PartitionSpec { filesystem: Filesystem::Swap, label: Some("swap".into()), ..part("4G") },
        PartitionSpec { filesystem: Filesystem::Xfs, mountpoint: Some("/var/lib".into()), ..part("rest") },
    ];
    mixed.spec.disks[1].partitions = vec![
        PartitionSpec { start: Some("1GiB".into()), filesystem: Filesystem::Btrfs, ..part("10GiB") },
        PartitionSpec { part_type: Some(moat_tools::PartType::Lvm), filesystem: Filesystem::None, ..part("rest") },
    ];
    corpus.push(mixed);
    let dir = tempfile::tempdir().unwrap();
    for (i, layout) in corpus.iter().enumerate() {
        let text = disko::render(layout).unwrap();
        let file = dir.path().join(format!("l{i}.nix"));
        std::fs::write(&file, &text).unwrap();
        let parsed = moat_node::testing::sh(&["nix-instantiate", "--parse", file.to_str().unwrap()]);
        assert!(!parsed.is_empty(), "{text}");
        let json = moat_node::testing::sh(&["nix-instantiate", "--eval", "--strict", "--json", file.to_str().unwrap()]);
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        let disks = &value["disko"]["devices"]["disk"];
        for (d, disk) in layout.spec.disks.iter().enumerate() {
            let got = &disks[format!("disk{d}")];
            assert_eq!(got["device"], plan::device_path(&disk.device), "{text}");
            for (p, want) in disk.partitions.iter().enumerate() {
                let got = &got["content"]["partitions"][format!("p{}", p + 1)];
                if let Some(name) = &want.name {
                    assert_eq!(got["label"].as_str(), Some(name.as_str()), "{text}");
                }
                if let Some(mp) = &want.mountpoint {
                    assert_eq!(got["content"]["mountpoint"].as_str(), Some(mp.as_str()), "{text}");
                }
                if let Some(label) = &want.label {
                    assert_eq!(got["content"]["extraArgs"][1].as_str(), Some(label.as_str()), "{text}");
                }
            }
        }
    }
    // NUL cannot be said in Nix: refused, never emitted.
    let mut nul = layout_on(&["sdb".into()]);
    nul.spec.disks[0].partitions[0].label = Some("a\0b".into());
    assert!(matches!(disko::render(&nul), Err(disko::RenderError::Nul { .. })));
}

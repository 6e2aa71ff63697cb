//! Takes a [`DiskSnapshot`] of this host: `lsblk` for devices, `blkid -p` for what is on them,
//! sysfs for holders and partition starts, /dev/disk/by-* for stable names, /proc/mounts and /proc/swaps for what is in use,
//! `pvs` and `zpool status` where present, and where moat keeps its own VM disks and storage.
//! Everything the classifier judges comes from here; a probe that cannot run is noted in the
//! snapshot, never silently skipped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use moat_tools::disk::{BlockDevice, DeviceUse, DiskSnapshot, RefusalCode};

use crate::cmd;

const PROBE: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot list block devices with lsblk")]
    Lsblk(#[source] cmd::CmdError),
    #[error("lsblk failed: {0}")]
    LsblkFailed(String),
    #[error("cannot read lsblk's output")]
    Parse(#[source] serde_json::Error),
}

/// A path moat keeps something on, and what, for the snapshot's `uses`.
#[derive(Debug, Clone)]
pub struct MoatPath {
    pub path: PathBuf,
    pub code: RefusalCode,
    pub what: String,
}

#[derive(serde::Deserialize)]
struct Lsblk {
    blockdevices: Vec<LsblkDev>,
}

#[derive(serde::Deserialize)]
struct LsblkDev {
    kname: String,
    #[serde(rename = "type")]
    dev_type: Option<String>,
    size: Option<u64>,
    model: Option<String>,
    fstype: Option<String>,
    label: Option<String>,
    partlabel: Option<String>,
    #[serde(default)]
    mountpoints: Vec<Option<String>>,
    pkname: Option<String>,
}

/// The kernel name a /dev path leads to ("/dev/mapper/vg-root" → "dm-0").
fn kname_of(path: &Path) -> Option<String> {
    let real = std::fs::canonicalize(path).ok()?;
    let name = real.strip_prefix("/dev").ok()?.to_str()?.to_string();
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

fn read_trimmed(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// /sys/class/block/<name>: holders and, for partitions, number and start.
fn sysfs(device: &mut BlockDevice) {
    let dir = Path::new("/sys/class/block").join(&device.name);
    if let Ok(entries) = std::fs::read_dir(dir.join("holders")) {
        let mut holders: Vec<String> =
            entries.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str().map(str::to_string)).collect();
        holders.sort();
        device.holders = holders;
    }
    if device.parent.is_some() {
        device.partn = read_trimmed(dir.join("partition")).and_then(|s| s.parse().ok());
        device.start_sector = read_trimmed(dir.join("start")).and_then(|s| s.parse().ok());
    }
}

/// Filesystem type, label and GPT partition name as the device's own bytes say
/// (`blkid -p`, no cache): lsblk takes them from udev's database, which a host without udev
/// (containers, minimal VMs) lacks.
async fn blkid(device: &mut BlockDevice) {
    if device.size_bytes == 0 {
        return;
    }
    let dev = format!("/dev/{}", device.name);
    let Ok(output) = cmd::run(&["blkid", "-p", "-o", "export", &dev], PROBE).await else { return };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some((key, value)) = line.split_once('=') else { continue };
        let value = value.to_string();
        match key {
            "TYPE" if device.fstype.is_empty() => device.fstype = value,
            "LABEL" if device.label.is_empty() => device.label = value,
            "PART_ENTRY_NAME" if device.partlabel.is_empty() => device.partlabel = value,
            _ => {}
        }
    }
}

/// Stable links: every entry of /dev/disk/by-id and by-path, by the device it resolves to.
fn links() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for dir in ["/dev/disk/by-id", "/dev/disk/by-path"] {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if let (Some(name), Some(link)) = (kname_of(&path), path.to_str()) {
                out.push((name, link.to_string()));
            }
        }
    }
    out.sort();
    out
}

/// /proc/mounts' octal escapes (`\040` for a space) undone.
fn unescape_mount(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("x"), 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// (kernel name, mountpoint) of every mount whose source is a block device, in every mount
/// namespace on the host (a disk mounted only inside a container counts too): one process's
/// mounts per namespace, mountpoints outside moat-node's own namespace marked with that pid.
fn mounts() -> Vec<(String, String)> {
    let own = std::fs::read_link("/proc/self/ns/mnt").ok();
    let mut seen = std::collections::HashSet::new();
    let mut out = parse_mounts(&std::fs::read_to_string("/proc/self/mounts").unwrap_or_default(), None);
    if let Some(own) = &own {
        seen.insert(own.clone());
    }
    let pids = std::fs::read_dir("/proc").into_iter().flatten().flatten().filter_map(|e| {
        let name = e.file_name();
        name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())).map(str::to_string)
    });
    for pid in pids {
        let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/mnt")) else { continue };
        if !seen.insert(ns) {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/mounts")) {
            out.extend(parse_mounts(&text, Some(&pid)));
        }
    }
    out.sort();
    out.dedup();
    out
}

fn parse_mounts(text: &str, pid: Option<&str>) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let source = fields.next()?;
            let target = unescape_mount(fields.next()?);
            if !source.starts_with("/dev/") {
                return None;
            }
            let target = match pid {
                None => target,
                Some(pid) => format!("{target} (in the mount namespace of pid {pid})"),
            };
            Some((kname_of(Path::new(&unescape_mount(source)))?, target))
        })
        .collect()
}

fn swaps() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|p| kname_of(Path::new(&unescape_mount(p))))
        .collect()
}

/// The block device holding `path`: the source of the mount with the longest prefix of it.
fn device_holding(path: &Path, mounts: &[(String, String)]) -> Option<String> {
    let real = std::fs::canonicalize(path).ok()?;
    mounts.iter().filter(|(_, mp)| real.starts_with(mp)).max_by_key(|(_, mp)| mp.len()).map(|(dev, _)| dev.clone())
}

async fn lvm_pvs(notes: &mut Vec<String>) -> Vec<(String, String)> {
    let argv = ["pvs", "--reportformat", "json", "--noheadings", "-o", "pv_name,vg_name"];
    let output = match cmd::run(&argv, PROBE).await {
        Ok(output) if output.status.success() => output,
        Ok(output) => {
            notes.push(format!(
                "pvs failed ({}); LVM physical volumes are recognized by their signature only",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
            return Vec::new();
        }
        Err(_) => {
            notes.push(
                "pvs (lvm2) is not installed; LVM physical volumes are recognized by their signature only".into(),
            );
            return Vec::new();
        }
    };
    let mut out: Vec<(String, String)> = pvs_report(&output.stdout)
        .into_iter()
        .filter_map(|(path, vg)| Some((kname_of(Path::new(&path))?, vg)))
        .collect();
    out.sort();
    out
}

/// (PV path, volume group) from `pvs --reportformat json` output.
fn pvs_report(json: &[u8]) -> Vec<(String, String)> {
    let value: serde_json::Value = serde_json::from_slice(json).unwrap_or_default();
    let mut out = Vec::new();
    for report in value["report"].as_array().into_iter().flatten() {
        for pv in report["pv"].as_array().into_iter().flatten() {
            if let Some(path) = pv["pv_name"].as_str() {
                out.push((path.to_string(), pv["vg_name"].as_str().unwrap_or_default().to_string()));
            }
        }
    }
    out
}

async fn zfs_members(notes: &mut Vec<String>) -> Vec<(String, String)> {
    let output = match cmd::run(&["zpool", "status", "-LP"], PROBE).await {
        Ok(output) => output,
        Err(_) => {
            notes.push("zpool is not installed; ZFS pool members are recognized by their signature only".into());
            return Vec::new();
        }
    };
    let mut out: Vec<(String, String)> = zpool_members(&String::from_utf8_lossy(&output.stdout))
        .into_iter()
        .filter_map(|(path, pool)| Some((kname_of(Path::new(&path))?, pool)))
        .collect();
    out.sort();
    out
}

/// (device path, pool) of every vdev `zpool status -LP` lists (-P: full paths, -L: links resolved).
fn zpool_members(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pool = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("pool:") {
            pool = name.trim().to_string();
        } else if let Some(path) = line.split_whitespace().next().filter(|p| p.starts_with("/dev/")) {
            out.push((path.to_string(), pool.clone()));
        }
    }
    out
}

/// Takes a snapshot now. `moat_paths` are what moat keeps on this host (storage, VM disks).
pub async fn snapshot(node: &str, moat_paths: &[MoatPath]) -> Result<DiskSnapshot, ProbeError> {
    let argv = ["lsblk", "-J", "-b", "-l", "-o", "KNAME,TYPE,SIZE,MODEL,FSTYPE,LABEL,PARTLABEL,MOUNTPOINTS,PKNAME"];
    let output = cmd::run(&argv, PROBE).await.map_err(ProbeError::Lsblk)?;
    if !output.status.success() {
        return Err(ProbeError::LsblkFailed(String::from_utf8_lossy(&output.stderr).trim().to_string()));
    }
    let listed: Lsblk = serde_json::from_slice(&output.stdout).map_err(ProbeError::Parse)?;
    let links = links();
    let mut devices: Vec<BlockDevice> = Vec::new();
    for d in listed.blockdevices {
        if devices.iter().any(|seen| seen.name == d.kname) {
            continue; // listed again under another parent (a holder of several devices)
        }
        let dev_type = d.dev_type.unwrap_or_default();
        let mut device = BlockDevice {
            parent: if dev_type == "part" { d.pkname } else { None },
            links: links.iter().filter(|(name, _)| *name == d.kname).map(|(_, l)| l.clone()).collect(),
            name: d.kname,
            dev_type,
            size_bytes: d.size.unwrap_or(0),
            model: d.model.unwrap_or_default().trim().to_string(),
            fstype: d.fstype.unwrap_or_default(),
            label: d.label.unwrap_or_default(),
            partlabel: d.partlabel.unwrap_or_default(),
            mountpoints: d.mountpoints.into_iter().flatten().collect(),
            ..BlockDevice::default()
        };
        sysfs(&mut device);
        blkid(&mut device).await;
        devices.push(device);
    }
    let mounts = mounts();
    let mut notes = Vec::new();
    let mut uses = Vec::new();
    for moat in moat_paths {
        if let Some(device) = device_holding(&moat.path, &mounts) {
            uses.push(DeviceUse { device, code: moat.code, detail: moat.what.clone() });
        }
    }
    Ok(DiskSnapshot {
        node: node.to_string(),
        taken_at: moat_proto::time::now(),
        devices,
        swaps: swaps(),
        mounts,
        lvm_pvs: lvm_pvs(&mut notes).await,
        zfs_members: zfs_members(&mut notes).await,
        uses,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zpool_and_pvs_reports() {
        let status = "  pool: tank\n state: ONLINE\nconfig:\n\n\tNAME          STATE     READ WRITE CKSUM\n\ttank          \
                      ONLINE       0     0     0\n\t  mirror-0    ONLINE       0     0     0\n\t    /dev/sdb1 ONLINE       \
                      0     0     0\n\t    /dev/sdc1 ONLINE       0     0     0\n\nerrors: No known data errors\n\
                      \n  pool: scratch\n config:\n\tscratch ONLINE 0 0 0\n\t  /dev/nvme0n1 ONLINE 0 0 0\n";
        assert_eq!(
            zpool_members(status),
            [("/dev/sdb1", "tank"), ("/dev/sdc1", "tank"), ("/dev/nvme0n1", "scratch")]
                .map(|(d, p)| (d.to_string(), p.to_string()))
        );
        assert!(zpool_members("no pools available\n").is_empty());
        let pvs = br#"  {"report": [{"pv": [{"pv_name":"/dev/loop0", "vg_name":""}, {"pv_name":"/dev/sdd", "vg_name":"vg0"}]}]}"#;
        assert_eq!(
            pvs_report(pvs),
            [("/dev/loop0", ""), ("/dev/sdd", "vg0")].map(|(d, v)| (d.to_string(), v.to_string()))
        );
        assert!(pvs_report(b"not json").is_empty());
    }

    #[test]
    fn mount_escapes() {
        assert_eq!(unescape_mount(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mount(r"/plain"), "/plain");
        assert_eq!(unescape_mount(r"/end\04"), r"/end\04");
    }
}

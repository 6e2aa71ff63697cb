//! A DiskLayout checked and laid out: sizes parsed, partitions placed (1 MiB aligned, inside
//! GPT's usable area), each device resolved against a snapshot and judged by the classifier.
//! Pure: the gateway plans with it on a node's last snapshot, the node again on a fresh one.

use moat_tools::disk::{DiskLayout, DiskSnapshot, Filesystem, LayoutKind, PartType, PartitionSpec, Refusal};

use super::classify;

pub const MIB: u64 = 1 << 20;
/// Room GPT keeps at the end of a disk for its backup header and table (33 sectors), rounded to
/// the alignment so the last partition ends on a MiB boundary.
const GPT_TAIL: u64 = MIB;
/// Where the first partition starts: room for the primary GPT, aligned.
const FIRST_START: u64 = MIB;

/// Why a layout cannot be planned at all: the operator's to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LayoutError(pub String);

fn bad(message: impl Into<String>) -> LayoutError {
    LayoutError(message.into())
}

/// One partition, placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartPlan {
    pub number: u32,
    /// Its kernel name once made, e.g. "sdb1", "loop3p2".
    pub device: String,
    pub start: u64,
    pub size: u64,
    pub part_type: PartType,
    pub filesystem: Filesystem,
    pub name: Option<String>,
    pub label: Option<String>,
    pub mountpoint: Option<String>,
}

/// One disk: where it is and what goes on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlan {
    /// As the layout wrote it.
    pub declared: String,
    /// Its kernel name on the node.
    pub device: String,
    pub size: u64,
    pub partitions: Vec<PartPlan>,
}

/// A layout judged against one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutPlan {
    /// Empty when every disk is safe to write.
    pub refusals: Vec<Refusal>,
    /// Disks that could be resolved and placed (all of them when nothing is refused).
    pub disks: Vec<DiskPlan>,
}

impl LayoutPlan {
    pub fn is_safe(&self) -> bool {
        self.refusals.is_empty()
    }
}

/// Checks `layout` on its own (no host facts): names, sizes, starts, labels, mountpoints.
pub fn validate(layout: &DiskLayout) -> Result<(), LayoutError> {
    let LayoutKind::DiskLayout = layout.kind;
    if !moat_tools::names::is_dns_label(&layout.metadata.name) {
        return Err(bad(format!(
            "metadata.name `{}` must be a DNS label: 1-63 of a-z, 0-9 and '-'",
            printable(&layout.metadata.name)
        )));
    }
    if !moat_tools::names::is_dns_label(&layout.spec.node) {
        return Err(bad(format!("spec.node `{}` is not a node name", printable(&layout.spec.node))));
    }
    if layout.spec.disks.is_empty() {
        return Err(bad("spec.disks is empty: name at least one disk"));
    }
    let mut mountpoints = std::collections::HashSet::new();
    let mut devices = std::collections::HashSet::new();
    for (d, disk) in layout.spec.disks.iter().enumerate() {
        let at = format!("spec.disks[{d}]");
        valid_device(&disk.device).map_err(|why| bad(format!("{at}.device: {why}")))?;
        if !devices.insert(device_path(&disk.device)) {
            return Err(bad(format!("{at}.device `{}` is named twice", disk.device)));
        }
        if disk.partitions.is_empty() {
            return Err(bad(format!("{at} has no partitions")));
        }
        if disk.partitions.len() > 128 {
            return Err(bad(format!("{at} has {} partitions; GPT holds 128", disk.partitions.len())));
        }
        let last = disk.partitions.len() - 1;
        for (p, part) in disk.partitions.iter().enumerate() {
            let at = format!("{at}.partitions[{p}]");
            validate_partition(part, p == last).map_err(|why| bad(format!("{at}: {why}")))?;
            if let Some(mp) = &part.mountpoint
                && !mountpoints.insert(mp.clone())
            {
                return Err(bad(format!("{at}: mountpoint {mp} is used twice")));
            }
        }
    }
    Ok(())
}

fn validate_partition(part: &PartitionSpec, last: bool) -> Result<(), String> {
    let size = parse_size(&part.size)?;
    if size.is_none() && !last {
        return Err(format!("size `{}` (the rest of the disk) is only for the last partition", part.size));
    }
    if let Some(start) = &part.start {
        parse_size(start)?.ok_or_else(|| format!("start `{start}` must be an offset such as 1GiB, not `rest`"))?;
    }
    if let Some(name) = &part.name {
        text_ok(name, 36).map_err(|why| format!("name: {why}"))?;
        if name.contains(['"', '\\']) {
            return Err("name: quotes and backslashes are not allowed in partition names".into());
        }
    }
    let part_type = effective_type(part);
    match (part.filesystem, part_type) {
        (Filesystem::Swap, PartType::Swap) | (Filesystem::None, _) => {}
        (Filesystem::Swap, other) => return Err(format!("a swap filesystem needs type swap, not {other:?}")),
        (_, PartType::Swap | PartType::Lvm | PartType::Raid) => {
            return Err(format!(
                "type {} holds no {} filesystem; use filesystem: none (or type linux)",
                format!("{part_type:?}").to_lowercase(),
                part.filesystem.as_str()
            ));
        }
        _ => {}
    }
    if let Some(label) = &part.label {
        let max = match part.filesystem {
            Filesystem::Ext4 => 16,
            Filesystem::Xfs => 12,
            Filesystem::Swap => 15,
            Filesystem::Btrfs => 255,
            Filesystem::None => return Err("a label needs a filesystem to carry it".into()),
        };
        text_ok(label, max).map_err(|why| format!("label: {why}"))?;
        if part.filesystem == Filesystem::Xfs && label.contains(' ') {
            return Err("label: xfs labels cannot hold spaces".into());
        }
    }
    if let Some(mp) = &part.mountpoint {
        if !matches!(part.filesystem, Filesystem::Ext4 | Filesystem::Xfs | Filesystem::Btrfs) {
            return Err(format!("mountpoint needs ext4, xfs or btrfs, not {}", part.filesystem.as_str()));
        }
        valid_mountpoint(mp).map_err(|why| format!("mountpoint: {why}"))?;
    }
    Ok(())
}

/// GPT type, defaulted from the filesystem.
pub fn effective_type(part: &PartitionSpec) -> PartType {
    part.part_type.unwrap_or(if part.filesystem == Filesystem::Swap { PartType::Swap } else { PartType::Linux })
}

/// Printable text, at most `max` bytes: no control characters (newlines, NUL, ...).
fn text_ok(s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() {
        return Err("is empty".into());
    }
    if s.len() > max {
        return Err(format!("is {} bytes; at most {max}", s.len()));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(format!("holds the control character {:?}; only printable text", c));
    }
    Ok(())
}

fn valid_mountpoint(mp: &str) -> Result<(), String> {
    text_ok(mp, 4096)?;
    if !mp.starts_with('/') {
        return Err(format!("`{mp}` must be an absolute path"));
    }
    if mp.chars().any(char::is_whitespace) {
        return Err(format!("`{mp}` holds whitespace, which fstab cannot carry"));
    }
    if mp != "/" && (mp.ends_with('/') || mp.split('/').skip(1).any(|c| c.is_empty() || c == "." || c == "..")) {
        return Err(format!("`{mp}` must be a plain path: no empty, `.` or `..` components, no trailing /"));
    }
    Ok(())
}

fn valid_device(device: &str) -> Result<(), String> {
    let name = device.strip_prefix("/dev/").unwrap_or(device);
    let ok_chars = name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:+@/-".contains(&b));
    if name.is_empty() || !ok_chars || name.len() > 255 {
        return Err(format!(
            "`{}` is not a device: use /dev/disk/by-id/..., /dev/NAME or a kernel name such as sdb",
            printable(device)
        ));
    }
    if name.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(format!("`{}` has empty, `.` or `..` components", printable(device)));
    }
    if name.contains('/') && !name.starts_with("disk/by-") {
        return Err(format!("`{}`: paths must be under /dev/disk/by-*/", printable(device)));
    }
    Ok(())
}

/// A declared device as a /dev/ path: "sdb" and "/dev/sdb" are "/dev/sdb".
pub fn device_path(declared: &str) -> String {
    if declared.starts_with("/dev/") {
        declared.to_string()
    } else {
        format!("/dev/{}", declared.trim_start_matches('/'))
    }
}

/// `s` with control characters shown escaped, for messages.
pub fn printable(s: &str) -> String {
    s.chars().flat_map(char::escape_debug).collect::<String>().chars().take(300).collect()
}

/// Bytes in `size`, rounded up to whole MiB; None for "rest" (or "100%").
pub fn parse_size(size: &str) -> Result<Option<u64>, String> {
    let s = size.trim();
    if s == "rest" || s == "100%" {
        return Ok(None);
    }
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim());
    let scale: u64 = match unit {
        "" | "B" => 1,
        "K" | "KiB" | "KB" => 1 << 10,
        "M" | "MiB" | "MB" => 1 << 20,
        "G" | "GiB" | "GB" => 1 << 30,
        "T" | "TiB" | "TB" => 1 << 40,
        _ => return Err(format!("size `{size}`: unit `{unit}` is not one of K, M, G, T (binary), or `rest`")),
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    let whole: u64 = whole.parse().map_err(|_| format!("size `{size}` is not a number with a unit, e.g. 512MiB"))?;
    if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("size `{size}`: at most six decimals"));
    }
    let frac_value: u64 = if frac.is_empty() { 0 } else { frac.parse().unwrap_or(0) };
    let frac_bytes = u128::from(scale) * u128::from(frac_value) / 10u128.pow(frac.len() as u32);
    let bytes = u128::from(whole) * u128::from(scale) + frac_bytes;
    let bytes = u64::try_from(bytes).map_err(|_| format!("size `{size}` is too large"))?;
    if bytes < MIB {
        return Err(format!("size `{size}` is under 1 MiB"));
    }
    bytes.checked_next_multiple_of(MIB).map(Some).ok_or_else(|| format!("size `{size}` is too large"))
}

/// The kernel name of partition `n` of `disk`: "sdb1", "nvme0n1p1", "loop3p1".
pub fn partition_name(disk: &str, n: u32) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) { format!("{disk}p{n}") } else { format!("{disk}{n}") }
}

/// Validates `layout`, resolves its disks in `snap`, classifies them and places partitions.
pub fn plan(layout: &DiskLayout, snap: &DiskSnapshot) -> Result<LayoutPlan, LayoutError> {
    validate(layout)?;
    let mut refusals = Vec::new();
    let mut disks = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (d, disk) in layout.spec.disks.iter().enumerate() {
        let Some(device) = classify::resolve(&disk.device, snap) else {
            refusals.push(Refusal {
                device: disk.device.clone(),
                code: moat_tools::RefusalCode::UnknownDevice,
                detail: format!("node {} has no device {}; disk_list shows its devices", snap.node, disk.device),
            });
            continue;
        };
        if !seen.insert(device.name.clone()) {
            return Err(bad(format!(
                "spec.disks[{d}].device `{}` is a disk already named in this layout",
                disk.device
            )));
        }
        refusals.extend(classify::classify_disk(&device.name, snap));
        let partitions = place(&device.name, device.size_bytes, &disk.partitions)
            .map_err(|why| bad(format!("spec.disks[{d}] ({}): {why}", disk.device)))?;
        disks.push(DiskPlan {
            declared: disk.device.clone(),
            device: device.name.clone(),
            size: device.size_bytes,
            partitions,
        });
    }
    refusals.sort();
    refusals.dedup();
    Ok(LayoutPlan { refusals, disks })
}

/// Places `parts` on a disk of `size` bytes: in order, each at its start or right after the
/// previous one, never overlapping, all inside GPT's usable area.
pub fn place(disk: &str, size: u64, parts: &[PartitionSpec]) -> Result<Vec<PartPlan>, String> {
    let end = size.saturating_sub(GPT_TAIL) / MIB * MIB;
    let mut next = FIRST_START;
    let mut placed = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let number = u32::try_from(i + 1).map_err(|_| "too many partitions".to_string())?;
        let start = match &part.start {
            Some(s) => parse_size(s)?.unwrap_or(next),
            None => next,
        };
        if start < next {
            return Err(format!(
                "partition {number} starts at {} MiB, inside {} (which ends at {} MiB)",
                start / MIB,
                if number == 1 { "the partition table".to_string() } else { format!("partition {}", number - 1) },
                next / MIB
            ));
        }
        let length = match parse_size(&part.size)? {
            Some(bytes) => bytes,
            None if end > start => end - start,
            None => 0,
        };
        if length == 0 || start.checked_add(length).is_none_or(|stop| stop > end) {
            return Err(format!(
                "partition {number} ({} at {} MiB) does not fit: the disk has {} MiB usable for partitions \
                 (it is {} MiB)",
                part.size,
                start / MIB,
                end.saturating_sub(FIRST_START) / MIB,
                size / MIB
            ));
        }
        next = start + length;
        placed.push(PartPlan {
            number,
            device: partition_name(disk, number),
            start,
            size: length,
            part_type: effective_type(part),
            filesystem: part.filesystem,
            name: part.name.clone(),
            label: part.label.clone(),
            mountpoint: part.mountpoint.clone(),
        });
    }
    Ok(placed)
}

/// The GPT type GUID sfdisk takes for `t`.
pub fn type_guid(t: PartType) -> &'static str {
    match t {
        PartType::Linux => "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
        PartType::Efi => "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
        PartType::Swap => "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
        PartType::Lvm => "E6D6D379-F507-44C2-A23C-238F2A3DF928",
        PartType::Raid => "A19D880F-05FC-4D3B-A006-743F0F84911E",
    }
}

/// sfdisk's input for `disk`: a new GPT with exactly these partitions (sectors of 512 bytes).
pub fn sfdisk_script(disk: &DiskPlan) -> String {
    let mut script = String::from("label: gpt\nunit: sectors\n\n");
    for p in &disk.partitions {
        script.push_str(&format!("start={}, size={}, type={}", p.start / 512, p.size / 512, type_guid(p.part_type)));
        if let Some(name) = &p.name {
            // Validated: printable, no quotes or backslashes, so the quoted value cannot end early.
            script.push_str(&format!(", name=\"{name}\""));
        }
        script.push('\n');
    }
    script
}

/// The mkfs command line for a partition, if it gets a filesystem.
pub fn mkfs_argv(p: &PartPlan) -> Option<Vec<String>> {
    let dev = format!("/dev/{}", p.device);
    let mut argv: Vec<String> = match p.filesystem {
        Filesystem::Ext4 => vec!["mkfs.ext4".into(), "-F".into(), "-q".into()],
        Filesystem::Xfs => vec!["mkfs.xfs".into(), "-f".into(), "-q".into()],
        Filesystem::Btrfs => vec!["mkfs.btrfs".into(), "-f".into(), "-q".into()],
        Filesystem::Swap => vec!["mkswap".into()],
        Filesystem::None => return None,
    };
    if let Some(label) = &p.label {
        argv.push("-L".into());
        argv.push(label.clone());
    }
    argv.push(dev);
    Some(argv)
}

/// What applying `plan` directly does, one line per step.
pub fn actions(plan: &LayoutPlan) -> Vec<String> {
    let mut out = Vec::new();
    for disk in &plan.disks {
        out.push(format!(
            "/dev/{} ({}, {} MiB): erase signatures and write a new GPT",
            disk.device,
            disk.declared,
            disk.size / MIB
        ));
        for p in &disk.partitions {
            out.push(format!(
                "  partition {} /dev/{}: {} MiB at {} MiB, type {}{}",
                p.number,
                p.device,
                p.size / MIB,
                p.start / MIB,
                format!("{:?}", p.part_type).to_lowercase(),
                p.name.as_ref().map(|n| format!(", name {}", printable(n))).unwrap_or_default()
            ));
            if let Some(argv) = mkfs_argv(p) {
                out.push(format!("  {}", argv.iter().map(|a| printable(a)).collect::<Vec<_>>().join(" ")));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_tools::disk::{DiskSpec, LayoutMetadata, LayoutSpec, PartitionTable};

    fn part(size: &str) -> PartitionSpec {
        PartitionSpec::new(size, Filesystem::Ext4)
    }

    fn layout(parts: Vec<PartitionSpec>) -> DiskLayout {
        DiskLayout {
            kind: LayoutKind::DiskLayout,
            api_version: None,
            metadata: LayoutMetadata { name: "data".into() },
            spec: LayoutSpec {
                node: "n1".into(),
                disks: vec![DiskSpec { device: "sdb".into(), table: PartitionTable::Gpt, partitions: parts }],
            },
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB"), Ok(Some(512 * MIB)));
        assert_eq!(parse_size("1G"), Ok(Some(1024 * MIB)));
        assert_eq!(parse_size("1.5GiB"), Ok(Some(1536 * MIB)));
        assert_eq!(parse_size("1048577"), Ok(Some(2 * MIB)), "rounded up to whole MiB");
        assert_eq!(parse_size("rest"), Ok(None));
        assert_eq!(parse_size("100%"), Ok(None));
        for bad in ["", "12X", "1KiB", "G", "1.2.3G", "99999999999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn placement_aligns_and_fills() {
        let parts = place("loop3", 512 * MIB, &[part("64MiB"), part("rest")]).unwrap();
        assert_eq!((parts[0].device.as_str(), parts[0].start, parts[0].size), ("loop3p1", MIB, 64 * MIB));
        assert_eq!((parts[1].device.as_str(), parts[1].start, parts[1].size), ("loop3p2", 65 * MIB, 446 * MIB));
        assert_eq!(partition_name("sdb", 2), "sdb2");
        assert_eq!(partition_name("nvme0n1", 1), "nvme0n1p1");
    }

    #[test]
    fn overlapping_and_oversized_partitions_are_refused() {
        let mut second = part("16MiB");
        second.start = Some("8MiB".into());
        let overlap = place("sdb", 512 * MIB, &[part("64MiB"), second]).unwrap_err();
        assert!(overlap.contains("partition 2 starts at 8 MiB, inside partition 1"), "{overlap}");
        let big = place("sdb", 512 * MIB, &[part("600MiB")]).unwrap_err();
        assert!(big.contains("does not fit"), "{big}");
        let tight = place("sdb", 512 * MIB, &[part("510MiB"), part("rest")]).unwrap_err();
        assert!(tight.contains("partition 2"), "{tight}");
    }

    #[test]
    fn layouts_are_checked_on_their_own() {
        let ok = layout(vec![part("64MiB"), part("rest")]);
        validate(&ok).unwrap();
        let rest_first = layout(vec![part("rest"), part("64MiB")]);
        assert!(validate(&rest_first).unwrap_err().0.contains("only for the last partition"));
        let mut labelled = part("64MiB");
        labelled.label = Some("a\nb".into());
        assert!(validate(&layout(vec![labelled])).unwrap_err().0.contains("control character"));
        let mut long = part("64MiB");
        long.label = Some("seventeen-bytes!!".into());
        assert!(validate(&layout(vec![long])).unwrap_err().0.contains("at most 16"));
        for mp in ["relative", "/a/../b", "/a//b", "/a b", "/a/"] {
            let mut p = part("64MiB");
            p.mountpoint = Some(mp.into());
            assert!(validate(&layout(vec![p])).is_err(), "{mp}");
        }
        let mut swap_fs = part("64MiB");
        swap_fs.part_type = Some(PartType::Lvm);
        assert!(validate(&layout(vec![swap_fs])).unwrap_err().0.contains("holds no ext4"));
        let mut bad = layout(vec![part("64MiB")]);
        bad.spec.disks[0].device = "../etc/passwd".into();
        assert!(validate(&bad).is_err());
        bad.spec.disks[0].device = "/dev/mapper/x".into();
        assert!(validate(&bad).unwrap_err().0.contains("/dev/disk/by-*"));
    }

    #[test]
    fn the_sfdisk_script_places_each_partition() {
        let mut named = part("64MiB");
        named.name = Some("my data".into());
        let disk = DiskPlan {
            declared: "sdb".into(),
            device: "sdb".into(),
            size: 512 * MIB,
            partitions: place("sdb", 512 * MIB, &[named, part("rest")]).unwrap(),
        };
        assert_eq!(
            sfdisk_script(&disk),
            "label: gpt\nunit: sectors\n\n\
             start=2048, size=131072, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"my data\"\n\
             start=133120, size=913408, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n"
        );
    }
}

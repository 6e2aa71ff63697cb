//! Disk layouts: an operator declares the partitions and filesystems of a node's data disks as a
//! `kind: DiskLayout` resource; moat refuses any layout that would touch a disk in use (mounted,
//! swap, LVM, ZFS, RAID, `/`, or moat's own storage), renders it for disko on NixOS hosts or
//! applies it directly elsewhere, and reconciles each generation to its node. Here are the
//! resource, what a node reports about its block devices, and the tools; the classifier and the
//! renderers are pure functions in `moat_node::disk`, shared by the gateway and the node.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{ActionGroup, Hints, ResourceKind, ToolClass, ToolName, ToolSpec, spec_for as spec};

/// A device as a layout names it: a stable path under /dev/disk/, a /dev/ path, or a kernel name.
pub const DEVICE: &str = r"^(/dev/)?[A-Za-z0-9][A-Za-z0-9._:+@/-]{0,254}$";
/// A size: a number with an optional binary unit (K, M, G, T, with or without "iB"), or "rest".
pub const SIZE: &str = r"^(rest|100%|[0-9]{1,16}(\.[0-9]{1,6})?\s?([KMGT](iB|B)?|B)?)$";

/// The resource's kind, the only one: "DiskLayout".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LayoutKind {
    DiskLayout,
}

/// A declared layout of one node's disks, as an operator writes it (YAML or JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DiskLayout {
    pub kind: LayoutKind,
    /// Accepted and ignored, e.g. "moat.dev/v1".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub api_version: Option<String>,
    pub metadata: LayoutMetadata,
    pub spec: LayoutSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LayoutMetadata {
    /// The layout's name, a DNS label unique in the cluster.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LayoutSpec {
    /// The node whose disks these are.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub node: String,
    /// The disks, each wholly repartitioned.
    #[schemars(length(min = 1, max = 16))]
    pub disks: Vec<DiskSpec>,
}

/// One whole disk and the partitions it gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// The disk: a stable path (/dev/disk/by-id/...), a /dev/ path, or a kernel name ("sdb").
    #[schemars(length(min = 1, max = 255), regex(pattern = DEVICE))]
    pub device: String,
    /// Partition table [default: gpt, the only one].
    #[serde(default)]
    pub table: PartitionTable,
    /// Partitions in disk order.
    #[schemars(length(min = 1, max = 128))]
    pub partitions: Vec<PartitionSpec>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PartitionTable {
    #[default]
    Gpt,
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PartitionSpec {
    /// GPT partition name (PARTLABEL) [default: none]; also its key in the disko rendering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 36))]
    pub name: Option<String>,
    /// Size: "512MiB", "20G" (binary units), or "rest" (the last partition only: the space left).
    #[schemars(length(min = 1, max = 24), regex(pattern = SIZE))]
    pub size: String,
    /// Where it starts [default: right after the previous one, 1 MiB aligned].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 24), regex(pattern = SIZE))]
    pub start: Option<String>,
    /// GPT type [default: swap for a swap filesystem, else linux].
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub part_type: Option<PartType>,
    /// The filesystem made on it [default: none].
    #[serde(default)]
    pub filesystem: Filesystem,
    /// Where a NixOS host mounts it (disko only; direct apply makes filesystems, it mounts nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub mountpoint: Option<String>,
    /// The filesystem's label (ext4: 16 bytes, xfs: 12, swap: 15, btrfs: 255).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub label: Option<String>,
}

impl PartitionSpec {
    /// A partition of `size` with `filesystem` and nothing else set.
    pub fn new(size: &str, filesystem: Filesystem) -> PartitionSpec {
        PartitionSpec {
            name: None,
            size: size.to_string(),
            start: None,
            part_type: None,
            filesystem,
            mountpoint: None,
            label: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PartType {
    Linux,
    Efi,
    Swap,
    Lvm,
    Raid,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    Ext4,
    Xfs,
    Btrfs,
    Swap,
    #[default]
    None,
}

impl Filesystem {
    pub const fn as_str(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "ext4",
            Filesystem::Xfs => "xfs",
            Filesystem::Btrfs => "btrfs",
            Filesystem::Swap => "swap",
            Filesystem::None => "none",
        }
    }
}

/// Where a layout is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum LayoutPhase {
    /// Waiting for the node: it did not answer, or it was still applying an older generation.
    Pending,
    /// Stored after the gateway's pre-flight judged it safe; not sent to the node yet.
    Planned,
    /// Sent to the node, which has not answered yet.
    Applying,
    /// The node classified this exact generation safe and applied it.
    Applied,
    /// The node refused it (a disk in use, or the node is installer-only); nothing was written.
    Refused,
    /// Applying started and did not finish as declared; see the reason.
    Failed,
}

impl LayoutPhase {
    pub const fn as_str(self) -> &'static str {
        match self {
            LayoutPhase::Pending => "Pending",
            LayoutPhase::Planned => "Planned",
            LayoutPhase::Applying => "Applying",
            LayoutPhase::Applied => "Applied",
            LayoutPhase::Refused => "Refused",
            LayoutPhase::Failed => "Failed",
        }
    }

    pub fn parse(s: &str) -> Option<LayoutPhase> {
        [
            LayoutPhase::Pending,
            LayoutPhase::Planned,
            LayoutPhase::Applying,
            LayoutPhase::Applied,
            LayoutPhase::Refused,
            LayoutPhase::Failed,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

/// Why a disk may not be touched, or why a node would not apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    /// It (or a partition or holder of it) holds the root filesystem.
    HoldsRoot,
    /// It backs a VM's disk or VM directories on this node.
    VmDisk,
    /// It holds moat's workspace and image storage.
    WorkspaceStorage,
    /// A filesystem on it is mounted.
    Mounted,
    /// Swap on it is active.
    ActiveSwap,
    /// It is an LVM physical volume.
    LvmPv,
    /// It is a member of a ZFS pool.
    ZfsMember,
    /// It is a member of a software RAID array.
    RaidMember,
    /// Another device is built on it (device-mapper, ...).
    HasHolders,
    /// The node has no such device.
    UnknownDevice,
    /// It is not a whole disk (a partition, a ROM, a device-mapper target).
    NotADisk,
    /// The node does not let moat manage its disks (installer-only).
    InstallerOnly,
}

impl RefusalCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::HoldsRoot => "holds_root",
            RefusalCode::VmDisk => "vm_disk",
            RefusalCode::WorkspaceStorage => "workspace_storage",
            RefusalCode::Mounted => "mounted",
            RefusalCode::ActiveSwap => "active_swap",
            RefusalCode::LvmPv => "lvm_pv",
            RefusalCode::ZfsMember => "zfs_member",
            RefusalCode::RaidMember => "raid_member",
            RefusalCode::HasHolders => "has_holders",
            RefusalCode::UnknownDevice => "unknown_device",
            RefusalCode::NotADisk => "not_a_disk",
            RefusalCode::InstallerOnly => "installer_only",
        }
    }
}

/// One reason a device may not be touched.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub struct Refusal {
    /// The disk the layout names (its kernel name), or the device as written when unknown.
    pub device: String,
    pub code: RefusalCode,
    /// The device in use (the disk itself, a partition or a holder of it) and what uses it, e.g.
    /// "loop3p1 is mounted at /srv".
    pub detail: String,
}

/// One block device as a node saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BlockDevice {
    /// Kernel name, e.g. "sdb", "loop3p1".
    pub name: String,
    /// lsblk's TYPE: disk, part, loop, lvm, crypt, raid1, rom, ...
    #[serde(rename = "type")]
    pub dev_type: String,
    pub size_bytes: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    /// The kernel name of the device this is a partition of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Devices built on this one (/sys/block/*/holders): dm-0, md0, ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<String>,
    /// Stable paths that lead to it (/dev/disk/by-id/..., by-path).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fstype: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
    /// GPT partition name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub partlabel: String,
    /// Where it is mounted now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mountpoints: Vec<String>,
    /// Partition number, for partitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partn: Option<u32>,
    /// First sector (512 bytes), for partitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_sector: Option<u64>,
}

/// Something on the host that uses a device, besides mounts (which devices list themselves).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeviceUse {
    /// The device's kernel name.
    pub device: String,
    pub code: RefusalCode,
    /// What uses it, e.g. "VM vm-3f2a's disk /var/lib/moat/.../root.ext4".
    pub detail: String,
}

/// What a node knows about its block devices at one moment: what classifiers judge.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiskSnapshot {
    pub node: String,
    /// When it was taken (RFC 3339).
    pub taken_at: String,
    pub devices: Vec<BlockDevice>,
    /// Active swap areas, as /proc/swaps names them (kernel names).
    #[serde(default)]
    pub swaps: Vec<String>,
    /// Mounts from /proc/mounts whose source is a block device: (kernel name, mountpoint).
    #[serde(default)]
    pub mounts: Vec<(String, String)>,
    /// LVM physical volumes: (kernel name, volume group or "").
    #[serde(default)]
    pub lvm_pvs: Vec<(String, String)>,
    /// ZFS pool members: (kernel name, pool).
    #[serde(default)]
    pub zfs_members: Vec<(String, String)>,
    /// What moat itself keeps on the node's devices.
    #[serde(default)]
    pub uses: Vec<DeviceUse>,
    /// Probes that could not run (pvs or zpool missing, ...), said so the verdict's limits are clear.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// How a node lets moat change its disks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DiskManagement {
    /// Disks were laid out when the host was installed; moat plans but never applies.
    #[default]
    InstallerOnly,
    /// moat applies layouts (after its classifier approves each generation).
    ControllerManaged,
}

/// How a controller-managed node applies a layout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskApplier {
    /// sfdisk and mkfs on the device, then a re-probe that must match the layout.
    #[default]
    Direct,
    /// The disko expression is written (atomically) to a configured path and an optional
    /// rebuild command runs (NixOS hosts).
    Disko,
}

// ---- tools ----

/// A layout as a tool takes it: the resource as an object, or its YAML or JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum LayoutArg {
    Doc(Box<DiskLayout>),
    /// YAML or JSON text of a DiskLayout.
    Text(#[schemars(length(min = 1, max = 65536))] String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskListInput {
    /// The node whose block devices to list.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub node: String,
}

/// A block device with moat's verdict on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiskInfo {
    #[serde(flatten)]
    pub device: BlockDevice,
    /// A disk's partitions (their kernel names, in order; each is listed after it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<String>,
    /// Whether a layout naming this device would be refused.
    pub in_use: bool,
    /// Why, when it is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<Refusal>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiskListOutput {
    pub node: String,
    /// When the node took this snapshot.
    pub taken_at: String,
    pub management: DiskManagement,
    pub applier: DiskApplier,
    /// Whole disks and loop devices first, each followed by its partitions.
    pub devices: Vec<DiskInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskLayoutPlanInput {
    pub layout: LayoutArg,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskLayoutApplyInput {
    pub layout: LayoutArg,
    /// Must be true: applying repartitions and formats the disks named, erasing what is on them.
    #[serde(default)]
    pub confirm: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Safe,
    Refused,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiskLayoutPlanOutput {
    pub name: String,
    pub node: String,
    pub verdict: Verdict,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refusals: Vec<Refusal>,
    /// What applying would do, step by step (direct applier).
    pub actions: Vec<String>,
    /// The layout as a disko expression (what a disko node writes).
    pub disko: String,
    /// The snapshot judged: when the node took it, and whether it is fresh ("node") or the
    /// last one stored because the node did not answer ("stored").
    pub snapshot_taken_at: String,
    pub snapshot_source: String,
    /// What the node would do with an apply: its management mode and applier.
    pub management: DiskManagement,
    pub applier: DiskApplier,
}

/// Why a layout is refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RefusalReason {
    /// A [`RefusalCode`] name, or "apply_failed".
    pub code: String,
    pub message: String,
}

/// A stored layout and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskLayoutStatus {
    pub name: String,
    pub node: String,
    /// Bumped on every change of the spec.
    pub generation: u64,
    /// The last generation the node answered for.
    pub observed_generation: u64,
    pub phase: LayoutPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal_reason: Option<RefusalReason>,
    pub spec: LayoutSpec,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiskLayoutOutput {
    pub layout: DiskLayoutStatus,
    /// What is still to come, when the node has not answered yet (it is down, or still applying).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskLayoutListInput {
    /// Only this node's layouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub node: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiskLayoutListOutput {
    pub layouts: Vec<DiskLayoutStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskLayoutRefInput {
    /// The layout's name.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiskLayoutDeleteOutput {
    pub deleted: String,
    /// Always true: deleting forgets the resource; partitions and data stay as they are.
    pub disks_untouched: bool,
}

const APPLY: Hints = Hints { read_only: false, destructive: true, idempotent: true, open_world: false };
const FORGET: Hints = Hints { read_only: false, destructive: false, idempotent: false, open_world: false };

fn example_layout() -> serde_json::Value {
    json!({"kind": "DiskLayout", "metadata": {"name": "data"}, "spec": {"node": "local", "disks": [{
        "device": "/dev/disk/by-id/nvme-SAMSUNG_1234", "partitions": [
            {"name": "data", "size": "rest", "filesystem": "xfs", "mountpoint": "/srv", "label": "data"}]}]}})
}

pub(crate) fn disk_list_spec() -> ToolSpec {
    spec::<DiskListInput, DiskListOutput>(
        ToolName::DiskList,
        "List a node's disks",
        "Lists a node's block devices as it sees them now: size, model, stable paths, partitions, \
         holders, filesystems, mounts, and moat's verdict: whether a disk layout naming it would \
         be refused and why (holds /, mounted, active swap, LVM PV, ZFS or RAID member, moat's \
         VM disks or workspace storage). Use it before writing a DiskLayout.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Disk, ResourceKind::Node),
        json!({"node": "local"}),
    )
}

pub(crate) fn disk_layout_plan_spec() -> ToolSpec {
    spec::<DiskLayoutPlanInput, DiskLayoutPlanOutput>(
        ToolName::DiskLayoutPlan,
        "Plan a disk layout",
        "Dry run of a DiskLayout (an object, or its YAML/JSON text): checks it, judges it against \
         the node's current devices with the same classifier the node applies with, and shows \
         the verdict, each refusal (device, code, what uses it), the steps applying would take \
         and the disko expression. Changes nothing and stores nothing.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Disk, ResourceKind::DiskLayout),
        json!({"layout": example_layout()}),
    )
}

pub(crate) fn disk_layout_apply_spec() -> ToolSpec {
    spec::<DiskLayoutApplyInput, DiskLayoutOutput>(
        ToolName::DiskLayoutApply,
        "Apply a disk layout",
        "Stores a DiskLayout (a new generation when its spec changed) and has its node apply it: \
         the node classifies it again just before writing and refuses any disk in use; a \
         controller-managed node then repartitions and formats (direct) or writes the disko \
         expression (disko); an installer-only node refuses. ERASES the disks named: needs \
         confirm: true. Answers with the phase reached; an unreachable node catches up when it \
         returns. cluster-admins only.",
        APPLY,
        (ToolClass::Write, ActionGroup::Cluster, ResourceKind::DiskLayout),
        json!({"layout": example_layout(), "confirm": true}),
    )
}

pub(crate) fn disk_layout_list_spec() -> ToolSpec {
    spec::<DiskLayoutListInput, DiskLayoutListOutput>(
        ToolName::DiskLayoutList,
        "List disk layouts",
        "Lists the stored DiskLayouts with their node, generation, the generation the node last \
         answered for (observedGeneration), phase and refusal reason.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Disk, ResourceKind::DiskLayout),
        json!({}),
    )
}

pub(crate) fn disk_layout_status_spec() -> ToolSpec {
    spec::<DiskLayoutRefInput, DiskLayoutOutput>(
        ToolName::DiskLayoutStatus,
        "Show a disk layout's status",
        "Shows one stored DiskLayout: its spec, generation, observedGeneration, phase (Pending, \
         Planned, Applying, Applied, Refused, Failed) and, when refused or failed, the reason with \
         its code.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Disk, ResourceKind::DiskLayout),
        json!({"name": "data"}),
    )
}

pub(crate) fn disk_layout_delete_spec() -> ToolSpec {
    spec::<DiskLayoutRefInput, DiskLayoutDeleteOutput>(
        ToolName::DiskLayoutDelete,
        "Forget a disk layout",
        "Deletes a stored DiskLayout so it is no longer reconciled. It never wipes or changes a \
         disk: partitions and data stay as they are. Refused while the node is applying it. \
         cluster-admins only.",
        FORGET,
        (ToolClass::Write, ActionGroup::Cluster, ResourceKind::DiskLayout),
        json!({"name": "data"}),
    )
}

impl LayoutArg {
    /// The layout's name when given as an object; text is named once parsed.
    pub fn name(&self) -> Option<&str> {
        match self {
            LayoutArg::Doc(doc) => Some(&doc.metadata.name),
            LayoutArg::Text(_) => None,
        }
    }
}

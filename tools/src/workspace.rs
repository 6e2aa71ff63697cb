//! Disk images and workspaces: images are shared (anyone may list them, only cluster admins
//! import or delete them: an import reads a path on a host); workspaces are owned, copy-on-write
//! disks made from an image or forked from another workspace, attached to VMs with `vm_create`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{ActionGroup, Hints, ResourceKind, ToolClass, ToolName, ToolSpec, spec_for as spec};

/// Largest `size_gib` a workspace may ask for.
pub const MAX_SIZE_GIB: u64 = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageListInput {
    /// Only images on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub node: Option<String>,
}

/// Names one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageRefInput {
    /// The image's name, e.g. "debian".
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub image: String,
    /// The node holding it [default: the one node that has it].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub node: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageImportInput {
    /// Name to register it under, a DNS label.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub name: String,
    /// Absolute path on the node: an ext4 image file, or a directory (made into one).
    #[schemars(length(min = 2, max = 4096), regex(pattern = r"^/"))]
    pub source: String,
    /// Node to import on [default: the only node, when there is one].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub node: Option<String>,
}

/// One image as moat reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ImageInfo {
    pub name: String,
    pub node: String,
    /// "disk" (an ext4 root filesystem: workspaces and persistent VMs) or "initramfs" (the busybox
    /// image: exec-only sandboxes).
    pub kind: String,
    pub size_bytes: u64,
    pub sha256: Option<String>,
    /// Where it was imported from, on its node.
    pub source: Option<String>,
    pub created_at: Option<String>,
    /// Workspaces made from it that you may see (by name), also after the image is deleted.
    pub workspaces: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ImageOutput {
    pub image: ImageInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ImageListOutput {
    pub images: Vec<ImageInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ImageDeleteOutput {
    pub deleted: String,
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceCreateInput {
    /// Workspace name, a DNS label; unique among your workspaces.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub name: String,
    /// The disk image to start from (image_list shows them), e.g. "debian".
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub image: String,
    /// Grow the filesystem to this many GiB [default: the image's size].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub size_gib: Option<u64>,
    /// Node to make it on [default: the node that has the image].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub node: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceForkInput {
    /// The workspace to copy (its id or your name for it).
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub workspace: String,
    /// Name of the new workspace.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub name: String,
}

/// Names one workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceRefInput {
    /// The workspace's id (e.g. "ws-3f9a0c1d2e4b") or name.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub workspace: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceListInput {
    /// Only workspaces made from this image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub image: Option<String>,
}

/// A VM a workspace is a disk of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Attachment {
    pub vm: String,
    pub vm_name: String,
    /// "root" (the VM boots from it), "read-write" or "read-only" (mounted at /workspaces/<name>).
    pub how: String,
    /// The VM's state: a workspace can be deleted only while no VM using it runs.
    pub vm_state: crate::VmState,
}

/// One workspace as moat reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WorkspaceInfo {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub node: String,
    /// The image it descends from (kept when the image is deleted).
    pub image: String,
    /// Where it came from, oldest first: the image, then each workspace it was forked from
    /// (by id; deleted ones too).
    pub lineage: Vec<String>,
    /// Size of its filesystem.
    pub size_bytes: u64,
    /// How its node made it: "snapshot" (btrfs, constant time), "reflink" or "copy".
    pub method: String,
    /// Bytes only it holds (not shared with its image or forks), where btrfs can tell
    /// (workspace_inspect only).
    pub exclusive_bytes: Option<u64>,
    pub attached: Vec<Attachment>,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WorkspaceOutput {
    pub workspace: WorkspaceInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WorkspaceListOutput {
    pub workspaces: Vec<WorkspaceInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WorkspaceDeleteOutput {
    pub deleted: String,
    pub name: String,
}

/// A workspace mounted in a VM at /workspaces/<name>.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataWorkspace {
    /// The workspace's id or name.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub name: String,
    /// Mount it read-only: any number of VMs may; read-write is one VM at a time [default: false].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
}

const WRITE: Hints = Hints { read_only: false, destructive: false, idempotent: false, open_world: false };
const DELETE: Hints = Hints { read_only: false, destructive: true, idempotent: false, open_world: false };

pub(crate) fn image_list_spec() -> ToolSpec {
    spec::<ImageListInput, ImageListOutput>(
        ToolName::ImageList,
        "List images",
        "Lists the images VMs and workspaces can start from, per node: disk images (an ext4 root \
         filesystem such as \"debian\", for workspace_create and vm_create) and the busybox \
         initramfs image \"base\" (exec-only sandboxes), with size, checksum and the workspaces \
         you may see that came from each.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Read, ResourceKind::Image),
        json!({}),
    )
}

pub(crate) fn image_inspect_spec() -> ToolSpec {
    spec::<ImageRefInput, ImageOutput>(
        ToolName::ImageInspect,
        "Inspect an image",
        "Shows one image: kind, size, sha256, where it was imported from, when, and the workspaces \
         you may see that descend from it.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Read, ResourceKind::Image),
        json!({"image": "debian"}),
    )
}

pub(crate) fn image_import_spec() -> ToolSpec {
    spec::<ImageImportInput, ImageOutput>(
        ToolName::ImageImport,
        "Import an image",
        "Registers a disk image on a node from a path on that node: an ext4 image file (anything \
         else is refused with the reason) or a directory, which is made into one. Cluster admins \
         only. `moat image build debian` builds and registers a Debian image on the embedded node.",
        WRITE,
        (ToolClass::Write, ActionGroup::Cluster, ResourceKind::Image),
        json!({"name": "debian", "source": "/srv/images/debian/rootfs.ext4"}),
    )
}

pub(crate) fn image_delete_spec() -> ToolSpec {
    spec::<ImageRefInput, ImageDeleteOutput>(
        ToolName::ImageDelete,
        "Delete an image",
        "Removes a disk image from its node. Workspaces made from it keep working and keep its \
         name in their lineage; new workspaces and VMs can no longer start from it. Cluster admins \
         only.",
        DELETE,
        (ToolClass::Write, ActionGroup::Cluster, ResourceKind::Image),
        json!({"image": "old"}),
    )
}

pub(crate) fn workspace_create_spec() -> ToolSpec {
    spec::<WorkspaceCreateInput, WorkspaceOutput>(
        ToolName::WorkspaceCreate,
        "Create a workspace",
        "Creates a persistent disk you own from a disk image (e.g. \"debian\"), optionally grown \
         to size_gib. On a btrfs node it is a snapshot, made in constant time whatever its size. \
         Boot a VM from it with vm_create {workspace}, or mount it in one with \
         vm_create {data_workspaces}. Counts against your workspace quota (count and GiB).",
        WRITE,
        (ToolClass::Write, ActionGroup::Workspace, ResourceKind::Workspace),
        json!({"name": "dev", "image": "debian", "size_gib": 4}),
    )
}

pub(crate) fn workspace_fork_spec() -> ToolSpec {
    spec::<WorkspaceForkInput, WorkspaceOutput>(
        ToolName::WorkspaceFork,
        "Fork a workspace",
        "Copies one of your workspaces as it is now into a new workspace you own (a snapshot on \
         btrfs: constant time). Changes to either afterwards stay in that one. Stop VMs writing to \
         the source first for a clean copy; a fork of a disk in use is crash-consistent.",
        WRITE,
        (ToolClass::Write, ActionGroup::Workspace, ResourceKind::Workspace),
        json!({"workspace": "dev", "name": "dev-experiment"}),
    )
}

pub(crate) fn workspace_list_spec() -> ToolSpec {
    spec::<WorkspaceListInput, WorkspaceListOutput>(
        ToolName::WorkspaceList,
        "List workspaces",
        "Lists the workspaces you may see (your own; all for admins and readers) with image, \
         lineage, size, node and the VMs they are attached to.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Read, ResourceKind::Workspace),
        json!({}),
    )
}

pub(crate) fn workspace_inspect_spec() -> ToolSpec {
    spec::<WorkspaceRefInput, WorkspaceOutput>(
        ToolName::WorkspaceInspect,
        "Inspect a workspace",
        "Shows one workspace: lineage (image, then the workspaces it was forked from), size, how \
         its node made it, the bytes only it holds (btrfs), and which VMs use it and how.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Read, ResourceKind::Workspace),
        json!({"workspace": "dev"}),
    )
}

pub(crate) fn workspace_delete_spec() -> ToolSpec {
    spec::<WorkspaceRefInput, WorkspaceDeleteOutput>(
        ToolName::WorkspaceDelete,
        "Delete a workspace",
        "Deletes a workspace and its data. Refused while a VM that uses it is not stopped (stop or \
         delete the VM first). Its forks are independent and stay. This cannot be undone.",
        DELETE,
        (ToolClass::Write, ActionGroup::Workspace, ResourceKind::Workspace),
        json!({"workspace": "dev"}),
    )
}

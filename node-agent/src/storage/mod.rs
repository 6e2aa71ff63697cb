//! Disk images and workspaces on this node, under one storage root:
//!
//! ```text
//! <storage>/images/<name>/        an image: rootfs.ext4 + image.json; on btrfs a read-only subvolume
//! <storage>/workspaces/<id>/      a workspace: rootfs.ext4 + workspace.json; on btrfs a writable
//!                                 snapshot of its image or of the workspace it was forked from
//! <storage>/vm-roots/<vm-id>/     the throw-away root of a VM booted from an image, deleted with it
//! <storage>/tmp/<id>/             being made; whatever is here at start was never acknowledged
//!                                 and is removed
//! ```
//!
//! How a copy is made depends on the root's filesystem ([`Method`]): a btrfs snapshot (constant
//! time), else a reflink of `rootfs.ext4`, else a sparse copy. Everything is made under `tmp/`
//! and renamed into place once complete, so a crash or a full disk never leaves half of one.

mod btrfs;
mod copy;
mod ext4;
#[cfg(any(test, feature = "testing"))]
pub mod loopfs;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use ext4::is_ext4;

pub const ROOTFS: &str = "rootfs.ext4";
const IMAGE_META: &str = "image.json";
const WORKSPACE_META: &str = "workspace.json";
/// The largest workspace, in GiB.
pub const MAX_SIZE_GIB: u64 = 1024;

/// How this node makes a workspace from an image or another workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// A btrfs snapshot: constant time, blocks shared until written.
    Snapshot,
    /// A reflink of the image file (FICLONE): near constant time, blocks shared until written.
    Reflink,
    /// A sparse copy of the image file: time and space grow with the data.
    Copy,
}

impl Method {
    pub const fn as_str(self) -> &'static str {
        match self {
            Method::Snapshot => "snapshot",
            Method::Reflink => "reflink",
            Method::Copy => "copy",
        }
    }
}

/// What an image is, as `image.json` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    pub name: String,
    /// Bytes of `rootfs.ext4` (its logical size).
    pub size_bytes: u64,
    pub sha256: String,
    /// Where it was imported from (a path on this node) or how it was built.
    pub source: String,
    pub created_at: String,
}

/// What a workspace is, as `workspace.json` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceMeta {
    pub id: String,
    pub name: String,
    /// The image it descends from (kept when that image is deleted: lineage stays readable).
    pub image: String,
    /// The workspace it was forked from, if any (its id).
    pub parent: Option<String>,
    pub size_bytes: u64,
    pub method: Method,
    pub created_at: String,
}

/// A workspace with what only the filesystem can say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceView {
    pub meta: WorkspaceMeta,
    /// Bytes it holds that no other snapshot shares, where btrfs can tell.
    pub exclusive_bytes: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("the storage root {root} is full: {what}; nothing was made")]
    Full { root: String, what: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl StorageError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StorageError {
        let what = what.into();
        move |source| StorageError::Io { what, source }
    }
}

/// The node's images and workspaces. Cheap to clone; changes are serialized.
#[derive(Debug, Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    method: Method,
    /// Why the method is what it is, for node_inspect.
    detail: String,
    op: tokio::sync::Mutex<()>,
    /// Whether no other process had this root open when this one opened it.
    alone: bool,
    /// Holds the root's lock (shared) for as long as this storage is open.
    _lock: std::fs::File,
}

/// 1-64 of a-z, 0-9, '-', not starting with '-': what an image name or workspace id may be
/// before it becomes a directory name (no separators, no dots).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

fn check_name(kind: &str, s: &str) -> Result<(), StorageError> {
    if valid_name(s) {
        Ok(())
    } else {
        Err(StorageError::Invalid(format!(
            "{kind} `{s}` must be 1-64 lowercase letters, digits or '-' (no '/', no '.')"
        )))
    }
}

fn is_enospc(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT)
}

impl Storage {
    /// Opens (creating) the storage root, finds how copies are made there, and removes what an
    /// earlier run left half-made in `tmp/`.
    pub fn open(root: &Path) -> std::io::Result<Storage> {
        for sub in ["images", "workspaces", "vm-roots", "tmp"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        // Several processes may share a root (moat serve and `moat image build debian`, two
        // gateways on one state directory): only one that finds itself alone may treat what is
        // in tmp/ or vm-roots/ as left over. All hold a shared lock while they run.
        let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(root.join(".lock"))?;
        let alone = flock(&lock, libc::LOCK_EX | libc::LOCK_NB);
        let (method, detail) = detect(root);
        tracing::info!(root = %root.display(), method = method.as_str(), "{detail}");
        let storage = Storage {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                method,
                detail,
                op: tokio::sync::Mutex::new(()),
                alone,
                _lock: lock,
            }),
        };
        if alone {
            for entry in std::fs::read_dir(root.join("tmp"))?.flatten() {
                tracing::warn!(path = %entry.path().display(), "removing a half-made image or workspace");
                storage.remove_tree(&entry.path());
            }
        }
        // Shared from here on (a conversion, never unlocked in between).
        flock(&storage.inner._lock, libc::LOCK_SH);
        Ok(storage)
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }
    pub fn method(&self) -> Method {
        self.inner.method
    }
    pub fn method_detail(&self) -> &str {
        &self.inner.detail
    }

    fn image_dir(&self, name: &str) -> PathBuf {
        self.inner.root.join("images").join(name)
    }
    fn workspace_dir(&self, id: &str) -> PathBuf {
        self.inner.root.join("workspaces").join(id)
    }
    fn vm_root_dir(&self, vm: &str) -> PathBuf {
        self.inner.root.join("vm-roots").join(vm)
    }
    fn tmp_dir(&self, id: &str) -> PathBuf {
        self.inner.root.join("tmp").join(id)
    }

    /// The disk file of an image, when it exists.
    pub fn image_file(&self, name: &str) -> Option<PathBuf> {
        let path = self.image_dir(name).join(ROOTFS);
        (valid_name(name) && path.is_file()).then_some(path)
    }
    /// The disk file of a workspace.
    pub fn workspace_file(&self, id: &str) -> Result<PathBuf, StorageError> {
        check_name("workspace id", id)?;
        let path = self.workspace_dir(id).join(ROOTFS);
        if path.is_file() { Ok(path) } else { Err(StorageError::NotFound(format!("no workspace `{id}` on this node"))) }
    }

    pub fn images(&self) -> Vec<ImageMeta> {
        let mut images: Vec<ImageMeta> =
            list_dirs(&self.inner.root.join("images")).filter_map(|dir| read_json(&dir.join(IMAGE_META))).collect();
        images.sort_by(|a, b| a.name.cmp(&b.name));
        images
    }

    pub fn image(&self, name: &str) -> Result<ImageMeta, StorageError> {
        check_name("image", name)?;
        read_json(&self.image_dir(name).join(IMAGE_META))
            .ok_or_else(|| StorageError::NotFound(format!("no disk image `{name}` on this node")))
    }

    pub fn workspaces(&self) -> Vec<WorkspaceMeta> {
        let mut all: Vec<WorkspaceMeta> = list_dirs(&self.inner.root.join("workspaces"))
            .filter_map(|dir| read_json(&dir.join(WORKSPACE_META)))
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    pub async fn workspace(&self, id: &str) -> Result<WorkspaceView, StorageError> {
        check_name("workspace id", id)?;
        let dir = self.workspace_dir(id);
        let meta: WorkspaceMeta = read_json(&dir.join(WORKSPACE_META))
            .ok_or_else(|| StorageError::NotFound(format!("no workspace `{id}` on this node")))?;
        let exclusive_bytes = match self.inner.method {
            Method::Snapshot => btrfs::exclusive_bytes(&dir).await,
            // A sparse copy shares nothing: what it allocates is its own.
            Method::Copy => {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata(dir.join(ROOTFS)).ok().map(|m| m.blocks() * 512)
            }
            Method::Reflink => None,
        };
        Ok(WorkspaceView { meta, exclusive_bytes })
    }

    /// Registers `source` (an ext4 image file, or a directory made into one) as image `name`.
    pub async fn import_image(&self, name: &str, source: &Path) -> Result<ImageMeta, StorageError> {
        check_name("image", name)?;
        let _op = self.inner.op.lock().await;
        if self.image_dir(name).exists() {
            return Err(StorageError::Exists(format!("an image named `{name}` already exists on this node")));
        }
        let meta = std::fs::metadata(source)
            .map_err(|e| StorageError::Invalid(format!("cannot read the source {}: {e}", source.display())))?;
        let tmp = self.tmp_dir(&format!("image-{name}"));
        self.make_dir(&tmp)?;
        let made = async {
            let file = tmp.join(ROOTFS);
            if meta.is_dir() {
                ext4::from_dir(source, &file).await?;
            } else if meta.is_file() {
                if !is_ext4(source).map_err(StorageError::io(format!("cannot read {}", source.display())))? {
                    return Err(StorageError::Invalid(format!(
                        "{} is not an ext4 filesystem image (no ext4 superblock); import an ext4 image or a directory",
                        source.display()
                    )));
                }
                let (from, to) = (source.to_path_buf(), file.clone());
                self.blocking(move |st| st.copy_file(&from, &to, false)).await?;
            } else {
                return Err(StorageError::Invalid(format!("{} is neither a file nor a directory", source.display())));
            }
            let hashed = file.clone();
            let sha256 = self
                .blocking(move |_| sha256_file(&hashed))
                .await
                .map_err(StorageError::io("cannot hash the image"))?;
            let size_bytes = std::fs::metadata(&file).map_err(StorageError::io("cannot stat the image"))?.len();
            let image = ImageMeta {
                name: name.into(),
                size_bytes,
                sha256,
                source: source.display().to_string(),
                created_at: moat_proto::time::now(),
            };
            write_json(&tmp.join(IMAGE_META), &image).map_err(|e| self.full_or(e, "writing its metadata"))?;
            Ok(image)
        }
        .await;
        let image = match made {
            Ok(image) => image,
            Err(e) => {
                self.blocking(move |st| st.remove_tree(&tmp)).await;
                return Err(e);
            }
        };
        let dest = self.image_dir(name);
        self.blocking(move |st| st.move_into_place(&tmp, &dest, "cannot move the image into place")).await?;
        // Read-only once in place (btrfs will not rename a read-only subvolume).
        if self.inner.method == Method::Snapshot {
            btrfs::set_read_only(&self.image_dir(name)).map_err(StorageError::io("cannot make the image read-only"))?;
        }
        tracing::info!(image = name, bytes = image.size_bytes, "imported image");
        Ok(image)
    }

    /// Removes image `name`. Workspaces made from it keep their data (snapshots and copies
    /// do not depend on it) and their lineage.
    pub async fn delete_image(&self, name: &str) -> Result<(), StorageError> {
        check_name("image", name)?;
        let _op = self.inner.op.lock().await;
        let dir = self.image_dir(name);
        if !dir.exists() {
            return Err(StorageError::NotFound(format!("no disk image `{name}` on this node")));
        }
        let gone = format!("gone-image-{name}");
        self.blocking(move |st| st.remove_whole(&dir, &gone)).await
    }

    /// Makes workspace `id` from image `image`, grown to `size_gib` when that is larger.
    pub async fn create_workspace(
        &self,
        id: &str,
        name: &str,
        image: &str,
        size_gib: Option<u64>,
    ) -> Result<WorkspaceMeta, StorageError> {
        check_name("workspace id", id)?;
        check_name("image", image)?;
        let source = self.image_dir(image);
        if !source.join(ROOTFS).is_file() {
            return Err(StorageError::NotFound(format!("no disk image `{image}` on this node; image_list shows them")));
        }
        self.make_workspace(id, name, image, None, &source, size_gib).await
    }

    /// Makes workspace `id` as a copy of workspace `from` as it is now.
    pub async fn fork_workspace(&self, from: &str, id: &str, name: &str) -> Result<WorkspaceMeta, StorageError> {
        check_name("workspace id", id)?;
        let parent = self.workspace(from).await?.meta;
        let image = parent.image.clone();
        self.make_workspace(id, name, &image, Some(parent.id), &self.workspace_dir(from), None).await
    }

    async fn make_workspace(
        &self,
        id: &str,
        name: &str,
        image: &str,
        parent: Option<String>,
        source: &Path,
        size_gib: Option<u64>,
    ) -> Result<WorkspaceMeta, StorageError> {
        let _op = self.inner.op.lock().await;
        if self.workspace_dir(id).exists() {
            return Err(StorageError::Exists(format!("workspace `{id}` already exists on this node")));
        }
        let tmp = self.tmp_dir(id);
        let made = async {
            let (from, to) = (source.to_path_buf(), tmp.clone());
            self.blocking(move |st| st.copy_tree(&from, &to)).await?;
            let file = tmp.join(ROOTFS);
            let _ = std::fs::remove_file(tmp.join(IMAGE_META));
            let mut size_bytes = std::fs::metadata(&file).map_err(StorageError::io("cannot stat the disk"))?.len();
            if let Some(gib) = size_gib {
                let want = gib.min(MAX_SIZE_GIB) << 30;
                if want > size_bytes {
                    ext4::grow(&file, want).await.map_err(|e| self.full_or(e, "growing the filesystem"))?;
                    size_bytes = want;
                }
            }
            let meta = WorkspaceMeta {
                id: id.into(),
                name: name.into(),
                image: image.into(),
                parent,
                size_bytes,
                method: self.inner.method,
                created_at: moat_proto::time::now(),
            };
            let (at, written) = (tmp.join(WORKSPACE_META), meta.clone());
            self.blocking(move |st| write_json(&at, &written).map_err(|e| st.full_or(e, "writing its metadata")))
                .await?;
            Ok(meta)
        }
        .await;
        let meta = match made {
            Ok(meta) => meta,
            Err(e) => {
                self.blocking(move |st| st.remove_tree(&tmp)).await;
                return Err(e);
            }
        };
        let dest = self.workspace_dir(id);
        self.blocking(move |st| st.move_into_place(&tmp, &dest, "cannot move the workspace into place")).await?;
        Ok(meta)
    }

    /// Removes workspace `id` (the caller checked it is not attached).
    pub async fn delete_workspace(&self, id: &str) -> Result<(), StorageError> {
        check_name("workspace id", id)?;
        let _op = self.inner.op.lock().await;
        let dir = self.workspace_dir(id);
        if !dir.exists() {
            return Err(StorageError::NotFound(format!("no workspace `{id}` on this node")));
        }
        let gone = format!("gone-{id}");
        self.blocking(move |st| st.remove_whole(&dir, &gone)).await
    }

    /// A throw-away copy of image `image` for VM `vm` to boot from; its disk file.
    pub async fn make_vm_root(&self, vm: &str, image: &str) -> Result<PathBuf, StorageError> {
        check_name("vm id", vm)?;
        let source = self.image_dir(image);
        if !valid_name(image) || !source.join(ROOTFS).is_file() {
            return Err(StorageError::NotFound(format!("no disk image `{image}` on this node")));
        }
        let _op = self.inner.op.lock().await;
        let (tmp, dest) = (self.tmp_dir(&format!("root-{vm}")), self.vm_root_dir(vm));
        self.blocking(move |st| {
            if let Err(e) = st.copy_tree(&source, &tmp) {
                st.remove_tree(&tmp);
                return Err(e);
            }
            st.move_into_place(&tmp, &dest, "cannot move the VM's root into place")?;
            Ok(dest.join(ROOTFS))
        })
        .await
    }

    /// Removes VM `vm`'s throw-away root, if it has one.
    pub fn remove_vm_root(&self, vm: &str) {
        if valid_name(vm) {
            let dir = self.vm_root_dir(vm);
            if dir.exists() {
                self.remove_tree(&dir);
            }
        }
    }

    /// Removes the throw-away roots of VMs not in `keep` (only when no other process shares
    /// this root: its VMs are not in `keep`).
    pub fn prune_vm_roots(&self, keep: &[String]) {
        if !self.inner.alone {
            return;
        }
        for dir in list_dirs(&self.inner.root.join("vm-roots")) {
            let id = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if !keep.contains(&id) {
                tracing::warn!(vm = id, "removing the throw-away root of a VM that no longer exists");
                self.remove_tree(&dir);
            }
        }
    }

    /// Runs `work` (file copies, hashing, renames: blocking system calls) on tokio's blocking
    /// pool, so a long copy never holds up the node's other calls.
    async fn blocking<T: Send + 'static>(&self, work: impl FnOnce(&Storage) -> T + Send + 'static) -> T {
        let this = self.clone();
        tokio::task::spawn_blocking(move || work(&this)).await.expect("storage work does not panic")
    }

    /// Renames the finished `tmp` to `dest`; on failure removes `tmp`.
    fn move_into_place(&self, tmp: &Path, dest: &Path, what: &str) -> Result<(), StorageError> {
        std::fs::rename(tmp, dest).map_err(|e| {
            self.remove_tree(tmp);
            StorageError::io(what)(e)
        })
    }

    fn make_dir(&self, dir: &Path) -> Result<(), StorageError> {
        let made = match self.inner.method {
            Method::Snapshot => btrfs::create(dir),
            _ => std::fs::create_dir(dir),
        };
        made.map_err(|e| self.full_or(e, "making its directory"))
    }

    /// Makes `dest` (new) a copy of the directory `source` by this node's method.
    fn copy_tree(&self, source: &Path, dest: &Path) -> Result<(), StorageError> {
        if self.inner.method == Method::Snapshot && btrfs::is_subvolume(source) {
            return btrfs::snapshot(source, dest, false).map_err(|e| self.full_or(e, "snapshotting"));
        }
        self.make_dir(dest)?;
        for entry in std::fs::read_dir(source).map_err(StorageError::io("cannot read the source"))?.flatten() {
            let path = entry.path();
            if path.is_file() {
                self.copy_file(&path, &dest.join(entry.file_name()), true)?;
            }
        }
        Ok(())
    }

    fn copy_file(&self, source: &Path, dest: &Path, share: bool) -> Result<(), StorageError> {
        let copied = match self.inner.method {
            Method::Snapshot | Method::Reflink if share => {
                copy::reflink(source, dest).or_else(|_| copy::sparse(source, dest))
            }
            _ => copy::sparse(source, dest),
        };
        copied.map_err(|e| self.full_or(e, "copying the disk"))
    }

    fn full_or(&self, e: std::io::Error, what: &str) -> StorageError {
        if is_enospc(&e) {
            StorageError::Full { root: self.inner.root.display().to_string(), what: format!("{what}: {e}") }
        } else {
            StorageError::Io { what: format!("{what} failed"), source: e }
        }
    }

    /// Removes `dir` so that a crash cannot leave part of it in place: a subvolume is destroyed
    /// in one call; a directory is first moved out of sight into tmp/ (as `gone`), then removed.
    fn remove_whole(&self, dir: &Path, gone: &str) -> Result<(), StorageError> {
        if btrfs::is_subvolume(dir) {
            return btrfs::destroy(dir).map_err(StorageError::io(format!("cannot remove {}", dir.display())));
        }
        let tmp = self.tmp_dir(gone);
        std::fs::rename(dir, &tmp).map_err(StorageError::io(format!("cannot remove {}", dir.display())))?;
        self.remove_tree(&tmp);
        Ok(())
    }

    /// Removes a directory or subvolume and everything in it.
    fn remove_tree(&self, path: &Path) {
        if btrfs::is_subvolume(path) && btrfs::destroy(path).is_ok() {
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::error!(path = %path.display(), error = %e, "cannot remove");
        }
    }
}

/// How copies are made under `root`: btrfs snapshots, reflinks, or plain copies, and why.
fn detect(root: &Path) -> (Method, String) {
    if crate::probe::filesystem_of(root).as_deref() == Some("btrfs") {
        let probe = root.join("tmp").join(format!(".probe-subvolume-{}", std::process::id()));
        let works = btrfs::create(&probe).and_then(|()| btrfs::destroy(&probe));
        return match works {
            Ok(()) => (Method::Snapshot, "btrfs: workspaces are snapshots, made in constant time".into()),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&probe);
                (
                    Method::Reflink,
                    format!(
                        "btrfs, but subvolumes cannot be made here ({e}; run moat-node as root): workspaces are reflinks"
                    ),
                )
            }
        };
    }
    let (a, b) = {
        let pid = std::process::id();
        (root.join("tmp").join(format!(".probe-a-{pid}")), root.join("tmp").join(format!(".probe-b-{pid}")))
    };
    let _ = std::fs::write(&a, b"moat");
    let reflinks = copy::reflink(&a, &b);
    let _ = (std::fs::remove_file(&a), std::fs::remove_file(&b));
    let fs = crate::probe::filesystem_of(root).unwrap_or_else(|| "unknown".into());
    match reflinks {
        Ok(()) => (Method::Reflink, format!("{fs} with reflinks (not btrfs): workspaces are reflink copies")),
        Err(_) => (
            Method::Copy,
            format!(
                "{fs} has neither btrfs snapshots nor reflinks: workspaces are full (sparse) copies, slower and larger; put the storage root on btrfs"
            ),
        ),
    }
}

fn flock(file: &std::fs::File, how: libc::c_int) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this process owns.
    unsafe { libc::flock(file.as_raw_fd(), how) == 0 }
}

fn list_dirs(dir: &Path) -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.file_name().and_then(|n| n.to_str()).is_some_and(valid_name))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).expect("metadata serializes");
    crate::dir::write_atomic(path, &bytes)
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// How long a filesystem tool may run on one image.
const TOOL_TIMEOUT: Duration = Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::loopfs::LoopFs;
    use super::*;

    /// A small ext4 image holding `hello` with `text`.
    async fn image_file(dir: &Path, text: &str) -> PathBuf {
        let tree = dir.join("tree");
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::write(tree.join("hello"), text).unwrap();
        let file = dir.join("img.ext4");
        ext4::from_dir(&tree, &file).await.unwrap();
        file
    }

    async fn lifecycle(storage: &Storage, want: Method) {
        assert_eq!(storage.method(), want, "{}", storage.method_detail());
        let src = tempfile::tempdir().unwrap();
        let file = image_file(src.path(), "v1").await;
        let image = storage.import_image("img", &file).await.unwrap();
        assert_eq!(image.size_bytes, std::fs::metadata(&file).unwrap().len());
        assert_eq!(image.sha256.len(), 64);
        assert!(matches!(storage.import_image("img", &file).await, Err(StorageError::Exists(_))));

        let ws = storage.create_workspace("ws-1", "one", "img", Some(1)).await.unwrap();
        assert_eq!((ws.method, ws.size_bytes, ws.parent.as_deref()), (want, 1 << 30, None));
        assert!(ext4::is_ext4(&storage.workspace_file("ws-1").unwrap()).unwrap());
        // Writing into the workspace leaves the image alone; a fork sees the write.
        let disk = storage.workspace_file("ws-1").unwrap();
        write_at(&disk, 512 << 20, b"written-in-one");
        let fork = storage.fork_workspace("ws-1", "ws-2", "two").await.unwrap();
        assert_eq!((fork.parent.as_deref(), fork.image.as_str()), (Some("ws-1"), "img"));
        let forked = storage.workspace_file("ws-2").unwrap();
        assert_eq!(read_at(&forked, 512 << 20, 14), b"written-in-one");
        write_at(&forked, 512 << 20, b"changed-in-two");
        assert_eq!(read_at(&disk, 512 << 20, 14), b"written-in-one", "a fork's write reached its parent");
        assert_eq!(std::fs::metadata(storage.image_file("img").unwrap()).unwrap().len(), image.size_bytes);

        let view = storage.workspace("ws-2").await.unwrap();
        if want == Method::Snapshot {
            assert!(view.exclusive_bytes.is_some_and(|b| b < 64 << 20), "{view:?}");
        }
        // The image can go; its workspaces stay whole with their lineage.
        storage.delete_image("img").await.unwrap();
        assert_eq!(storage.workspace("ws-1").await.unwrap().meta.image, "img");
        assert!(matches!(storage.create_workspace("ws-3", "three", "img", None).await, Err(StorageError::NotFound(_))));
        storage.delete_workspace("ws-1").await.unwrap();
        assert_eq!(read_at(&forked, 512 << 20, 14), b"changed-in-two");
        storage.delete_workspace("ws-2").await.unwrap();
        assert!(storage.workspaces().is_empty());
        assert_eq!(std::fs::read_dir(storage.root().join("tmp")).unwrap().count(), 0, "nothing left in tmp/");
    }

    fn write_at(path: &Path, at: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, at).unwrap();
    }

    fn read_at(path: &Path, at: u64, n: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0; n];
        std::fs::File::open(path).unwrap().read_exact_at(&mut buf, at).unwrap();
        buf
    }

    #[tokio::test]
    async fn workspaces_on_btrfs_are_snapshots() {
        let Some(fs) = LoopFs::new("mkfs.btrfs", 1024) else { return };
        let storage = Storage::open(&fs.path().join("storage")).unwrap();
        lifecycle(&storage, Method::Snapshot).await;
        // Images are read-only subvolumes.
        let src = tempfile::tempdir().unwrap();
        storage.import_image("ro", &image_file(src.path(), "x").await).await.unwrap();
        let err = std::fs::write(storage.root().join("images/ro/extra"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        storage.delete_image("ro").await.unwrap();
    }

    #[tokio::test]
    async fn workspaces_on_ext4_are_copies_and_say_so() {
        let Some(fs) = LoopFs::new("mkfs.ext4", 512) else { return };
        let storage = Storage::open(&fs.path().join("storage")).unwrap();
        assert!(storage.method_detail().contains("put the storage root on btrfs"), "{}", storage.method_detail());
        lifecycle(&storage, Method::Copy).await;
    }

    #[tokio::test]
    async fn bad_names_and_sources_change_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let storage = Storage::open(&tmp.path().join("s")).unwrap();
        for bad in ["../x", "a/b", "a.b", ".", "", &"a".repeat(65), "-a", "A"] {
            assert!(matches!(storage.import_image(bad, tmp.path()).await, Err(StorageError::Invalid(_))), "{bad}");
            assert!(
                matches!(storage.create_workspace(bad, "n", "img", None).await, Err(StorageError::Invalid(_))),
                "{bad}"
            );
            assert!(matches!(storage.workspace_file(bad), Err(StorageError::Invalid(_))), "{bad}");
        }
        let not_ext4 = tmp.path().join("junk");
        std::fs::write(&not_ext4, vec![7u8; 8192]).unwrap();
        match storage.import_image("junk", &not_ext4).await {
            Err(StorageError::Invalid(why)) => assert!(why.contains("not an ext4 filesystem"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(storage.create_workspace("w", "n", "nope", None).await, Err(StorageError::NotFound(_))));
        assert!(storage.images().is_empty() && storage.workspaces().is_empty());
        assert_eq!(std::fs::read_dir(storage.root().join("tmp")).unwrap().count(), 0);
    }

    /// A full filesystem fails the copy with a clear error and leaves no part of it.
    #[tokio::test]
    async fn a_full_filesystem_leaves_nothing_half_made() {
        let Some(fs) = LoopFs::new("mkfs.ext4", 96) else { return };
        let storage = Storage::open(&fs.path().join("storage")).unwrap();
        // 56 MiB of real data: the image fits once, a second copy does not.
        let src = tempfile::tempdir().unwrap();
        let tree = src.path().join("tree");
        std::fs::create_dir_all(&tree).unwrap();
        let noise: Vec<u8> = (0..56u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        std::fs::write(tree.join("blob"), noise).unwrap();
        let file = src.path().join("big.ext4");
        ext4::from_dir(&tree, &file).await.unwrap();
        storage.import_image("big", &file).await.unwrap();
        match storage.create_workspace("w1", "w1", "big", None).await {
            Err(StorageError::Full { what, .. }) => assert!(what.contains("copying"), "{what}"),
            other => panic!("a copy that cannot fit must fail as full: {other:?}"),
        }
        assert!(storage.workspaces().is_empty());
        assert_eq!(std::fs::read_dir(storage.root().join("tmp")).unwrap().count(), 0, "a half copy stayed");
    }

    /// On a full btrfs a create fails as full and leaves no subvolume behind; with room again it
    /// works.
    #[tokio::test]
    async fn a_full_btrfs_leaves_no_subvolume() {
        let Some(fs) = LoopFs::new("mkfs.btrfs", 512) else { return };
        let storage = Storage::open(&fs.path().join("storage")).unwrap();
        let src = tempfile::tempdir().unwrap();
        storage.import_image("img", &image_file(src.path(), "x").await).await.unwrap();
        // Fill the filesystem with data until it refuses more.
        let mut filler = std::fs::File::create(fs.path().join("filler")).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        while std::io::Write::write_all(&mut filler, &chunk).and_then(|()| filler.sync_data()).is_ok() {}
        match storage.create_workspace("big", "big", "img", Some(64)).await {
            Err(StorageError::Full { .. }) => {}
            other => panic!("growing on a full filesystem must fail as full: {other:?}"),
        }
        // Even a snapshot needs a little room (its metadata): refused the same way.
        match storage.create_workspace("small", "small", "img", None).await {
            Err(StorageError::Full { .. }) | Ok(_) => {}
            other => panic!("{other:?}"),
        }
        let _ = storage.delete_workspace("small").await;
        assert!(storage.workspaces().is_empty());
        assert_eq!(std::fs::read_dir(storage.root().join("tmp")).unwrap().count(), 0, "an orphaned subvolume");
        // With room again, the same create works.
        drop(filler);
        std::fs::remove_file(fs.path().join("filler")).unwrap();
        storage.create_workspace("big", "big", "img", Some(1)).await.unwrap();
    }

    /// What a crash left in tmp/ is gone at the next open, unless another process has the root
    /// open (then it may be that process's work in progress).
    #[test]
    fn open_removes_half_made_work_when_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("s");
        let half = root.join("tmp/ws-half");
        std::fs::create_dir_all(&half).unwrap();
        let first = Storage::open(&root).unwrap();
        assert!(!half.exists());
        std::fs::create_dir_all(&half).unwrap();
        let second = Storage::open(&root).unwrap();
        assert!(half.exists(), "another open storage's work in progress was removed");
        drop((first, second));
        Storage::open(&root).unwrap();
        assert!(!half.exists());
    }
}

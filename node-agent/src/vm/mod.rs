//! VMs on this node: their directories, their VMM processes and their state
//! machine. Lifecycle operations on one VM are serialized; a monitor task per
//! running VM notices when its VMM exits and records whether that was a stop,
//! a guest power-off or a crash (with the reason). On start the manager
//! re-adopts VMs whose VMM is still running instead of killing them.

pub mod agent;
mod console;
mod monitor;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

pub use crate::dir::{Disk, Nic, VmConfig, VmDir, VmState, VmStatus};
use crate::net::host::Networks;
use crate::storage::{Storage, StorageError};
use crate::uplink::{self, Uplinks};
pub use crate::vmm::{Accel, Runtime, Vmm, VmmError, VsockMode};
use crate::vsock;
use console::{console_panic, last_lines, vmm_log_tail};

/// How long a graceful stop waits for the guest before killing the VMM, unless the caller says.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Console bytes `logs` returns unless asked for fewer.
pub const DEFAULT_LOG_TAIL: u64 = 64 * 1024;
const MAX_LOG_TAIL: u64 = 1024 * 1024;
const KILL_WAIT: Duration = Duration::from_secs(10);
/// During a graceful stop, how often the power button is pressed again.
const REPRESS: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("no vm with id `{0}` on this node")]
    NotFound(String),
    #[error("a vm with id `{0}` already exists on this node")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("no VM runtime on node {node}: {detail}")]
    NoRuntime { node: String, detail: String },
    #[error(
        "image `{image}` is not on node {node}: expected {dir}/vmlinux and initramfs.cpio.gz; build it with `moat image build --out {dir}`"
    )]
    NoImage { node: String, image: String, dir: String },
    #[error("vm {id} is {state}; cannot {action} it now")]
    WrongState { id: String, state: &'static str, action: &'static str },
    #[error("vm {id}: {source}{log}")]
    Vmm {
        id: String,
        #[source]
        source: VmmError,
        /// The VMM's last output lines, prefixed with a separator, or empty.
        log: String,
    },
    #[error("no vsock on node {node}, so guest agents cannot be reached: {detail}")]
    NoVsock { node: String, detail: String },
    #[error("agent on vm {id} not reachable: {detail}; console says: {console}")]
    AgentUnreachable { id: String, detail: String, console: String },
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("vm {id}: {what}")]
    Io {
        id: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// One VM as the node reports it.
#[derive(Debug, Clone)]
pub struct VmView {
    pub config: VmConfig,
    pub status: VmStatus,
    pub agent: agent::AgentState,
    pub vmm: &'static str,
    pub accel: &'static str,
    /// What its running VMM process is confined by, read from the host ([`VmManager::get`] only).
    pub protections: Vec<moat_tools::Protection>,
}

/// Where moat-node keeps VMs and finds images, and which VMM it uses.
#[derive(Debug, Clone)]
pub struct VmSettings {
    pub node: String,
    pub vms_root: PathBuf,
    pub images_root: PathBuf,
    pub runtime: Runtime,
    /// Disk images and workspaces; without it VMs boot only initramfs images.
    pub storage: Option<Storage>,
}

/// What a VM is made from: its size, its image, and the workspaces it boots from or mounts.
#[derive(Debug, Clone, Default)]
pub struct NewVm {
    pub id: String,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// An initramfs image, or a disk image booted from a throw-away copy ("" means "base").
    pub image: String,
    /// Boot from this workspace (its id) instead of from a copy of the image.
    pub root_workspace: Option<String>,
    pub disks: Vec<Attach>,
    /// A network card on one of the node's networks.
    pub nic: Option<Nic>,
}

/// A workspace mounted in the guest at /workspaces/<name>.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    pub workspace: String,
    pub name: String,
    pub read_only: bool,
}

impl NewVm {
    /// A VM booting image `image` with no disks.
    pub fn plain(id: &str, name: &str, vcpus: u32, memory_mib: u64, image: &str) -> NewVm {
        NewVm { id: id.into(), name: name.into(), vcpus, memory_mib, image: image.into(), ..NewVm::default() }
    }
}

#[derive(Debug, Clone)]
pub struct VmManager {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: VmSettings,
    networks: Option<Networks>,
    /// Connections portals opened to the host, waiting for the gateway.
    uplinks: Uplinks,
    /// Set once the kernel-vsock portal listener runs (it serves every VM).
    kernel_uplink: std::sync::Once,
    vms: Mutex<HashMap<String, Arc<Vm>>>,
}

#[derive(Debug)]
struct Vm {
    dir: VmDir,
    config: VmConfig,
    status: Mutex<VmStatus>,
    /// Serializes lifecycle operations on this VM.
    op: tokio::sync::Mutex<()>,
    /// Counts VMM exits; the monitor bumps it after recording the new state.
    exits: watch::Sender<u64>,
    /// The guest agent, as the control channel watcher sees it.
    agent: Arc<Mutex<agent::AgentState>>,
}

enum Process {
    Child(tokio::process::Child),
    /// A VMM started by an earlier moat-node: not our child, so no exit status.
    Adopted(u32),
}

enum Exit {
    Status(std::io::Result<std::process::ExitStatus>),
    Unknown,
}

impl Vm {
    fn status(&self) -> VmStatus {
        self.status.lock().expect("vm status lock is never poisoned").clone()
    }

    fn set_status(&self, status: VmStatus) -> Result<(), VmError> {
        let mut current = self.status.lock().expect("vm status lock is never poisoned");
        self.dir.write_status(&status).map_err(|source| VmError::Io {
            id: self.config.id.clone(),
            what: "cannot record its state".into(),
            source,
        })?;
        *current = status;
        Ok(())
    }

    fn set_state(&self, state: VmState, reason: impl Into<String>) -> Result<(), VmError> {
        let mut status = self.status();
        status.state = state;
        status.reason = reason.into();
        if !state.has_process() {
            status.pid = 0;
        }
        self.set_status(status)
    }
}

/// Creates the VMs' directory (consoles, sockets, disks) for this node's user only, and tightens
/// one found readable by others, saying so.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let private = std::fs::Permissions::from_mode(0o700);
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        return std::fs::set_permissions(dir, private);
    }
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, private)?;
        tracing::warn!(dir = %dir.display(), "the VMs' directory was {mode:o}, readable by other users; it is 0700 now");
    }
    Ok(())
}

fn valid_token(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

impl VmManager {
    /// Loads every VM under `vms_root`, re-adopting those whose VMM still runs.
    pub fn open(settings: VmSettings) -> std::io::Result<VmManager> {
        private_dir(&settings.vms_root)?;
        let manager = VmManager {
            inner: Arc::new(Inner {
                settings,
                networks: None,
                uplinks: Uplinks::default(),
                kernel_uplink: std::sync::Once::new(),
                vms: Mutex::new(HashMap::new()),
            }),
        };
        for entry in std::fs::read_dir(&manager.inner.settings.vms_root)? {
            let path = entry?.path();
            let Some(id) = path.file_name().and_then(|n| n.to_str()).map(str::to_string) else { continue };
            if path.is_dir() {
                manager.load(&id);
            }
        }
        Ok(manager)
    }

    fn load(&self, id: &str) {
        let dir = VmDir::new(&self.inner.settings.vms_root, id);
        if dir.is_being_created() {
            // A create (with its first start) that moat-node died in: the caller was never
            // told it worked, so nothing of it may stay, its VMM included.
            tracing::warn!(vm = id, "removing a VM whose create was interrupted");
            self.discard(&dir);
            return;
        }
        let (Ok(config), status) = (dir.read_config(), dir.read_status()) else {
            // A create that died before writing its config: nothing was acknowledged.
            tracing::warn!(vm = id, "removing a half-created VM directory");
            let _ = std::fs::remove_dir_all(dir.path());
            return;
        };
        let mut status = status.unwrap_or_else(|_| VmStatus::new(VmState::Stopped, ""));
        if matches!(status.state, VmState::Creating | VmState::Deleting) {
            tracing::warn!(vm = id, state = status.state.as_str(), "finishing an interrupted create/delete");
            let _ = std::fs::remove_dir_all(dir.path());
            return;
        }
        let mut adopted = None;
        if status.state.has_process() {
            let alive = dir.read_pid().filter(|&pid| match &self.inner.settings.runtime {
                Runtime::Ready(vmm) => vmm.owns(pid, &dir),
                Runtime::Missing(_) => false,
            });
            match alive {
                Some(pid) => {
                    tracing::info!(vm = id, pid, "re-adopting a running VM");
                    status.state = VmState::Running;
                    status.pid = pid;
                    adopted = Some(pid);
                }
                None => {
                    let was = status.state;
                    status.state = if was == VmState::Stopping { VmState::Stopped } else { VmState::Crashed };
                    status.reason = match console_panic(&dir, status.console_start) {
                        Some(line) => format!("guest kernel panic: {line}"),
                        None => "the VMM exited while moat-node was not running".into(),
                    };
                    status.pid = 0;
                    dir.clear_pid();
                    // Its helpers may have outlived it (the vsock daemon); its cgroup and uid
                    // are free again.
                    if let Runtime::Ready(vmm) = &self.inner.settings.runtime {
                        vmm.cleanup(&dir);
                    }
                }
            }
            let _ = dir.write_status(&status);
        }
        let vm = Arc::new(Vm {
            dir,
            config,
            status: Mutex::new(status),
            op: tokio::sync::Mutex::new(()),
            exits: watch::Sender::new(0),
            agent: Arc::default(),
        });
        {
            // Two calls may load the same VM at once: the first one in wins, so one monitor
            // and one agent watcher follow it.
            let mut vms = self.inner.vms.lock().expect("vm map lock is never poisoned");
            if vms.contains_key(id) {
                return;
            }
            vms.insert(id.to_string(), vm.clone());
        }
        if let Some(pid) = adopted {
            self.spawn_monitor(vm.clone(), Process::Adopted(pid));
            self.watch_agent(&vm);
        }
    }

    /// Removes a VM directory that no caller was told about, killing its VMM first if it runs.
    fn discard(&self, dir: &VmDir) {
        if let Runtime::Ready(vmm) = &self.inner.settings.runtime {
            if let Some(pid) = dir.read_pid().filter(|&pid| vmm.owns(pid, dir)) {
                // SAFETY: kill(2) on the process group the VMM of this VM leads (spawn_detached
                // makes it a group leader), checked by its working directory and command line.
                unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
                let gone = std::time::Instant::now();
                while std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
                    && vmm.owns(pid, dir)
                    && gone.elapsed() < KILL_WAIT
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            vmm.cleanup(dir);
        }
        let _ = std::fs::remove_dir_all(dir.path());
    }

    /// The manager for this host: QEMU found as `qemu` (path or name in PATH), KVM when it
    /// can create a VM here unless `forced`, VMs under `storage_root/vms`.
    pub fn for_host(
        node: &str,
        storage_root: &Path,
        images_root: PathBuf,
        qemu: &str,
        forced: Option<Accel>,
        vsock_daemon: &str,
        vm_uid_base: u32,
    ) -> std::io::Result<VmManager> {
        let kvm_usable = crate::kvm::probe(Path::new("/dev/kvm"), Path::new("/sys/module")).usable;
        let vsock = VsockMode::detect(vsock_daemon);
        if let VsockMode::Unavailable(why) = &vsock {
            tracing::warn!(node, "guest agents will be unreachable: {why}");
        }
        let runtime = Runtime::detect(qemu, kvm_usable, forced, vsock, vm_uid_base);
        if let Runtime::Missing(detail) = &runtime {
            tracing::warn!(node, "no VM runtime: {detail}");
        }
        VmManager::open(VmSettings {
            node: node.to_string(),
            vms_root: storage_root.join("vms"),
            images_root,
            runtime,
            storage: None,
        })
    }

    /// Gives the manager the node's image and workspace storage (before it is shared), and
    /// removes throw-away roots whose VM is gone.
    pub fn with_storage(mut self, storage: Storage) -> VmManager {
        let known: Vec<String> = self.list().into_iter().map(|v| v.config.id).collect();
        storage.prune_vm_roots(&known);
        Arc::get_mut(&mut self.inner).expect("with_storage is called before the manager is shared").settings.storage =
            Some(storage);
        self
    }

    /// VMs get network cards on these networks.
    pub fn with_networks(mut self, networks: Networks) -> VmManager {
        Arc::get_mut(&mut self.inner).expect("with_networks is called before the manager is shared").networks =
            Some(networks);
        self
    }

    /// Portal connections guests opened to this host.
    pub fn uplinks(&self) -> &Uplinks {
        &self.inner.uplinks
    }

    pub fn networks(&self) -> Option<&Networks> {
        self.inner.networks.as_ref()
    }

    pub fn storage(&self) -> Option<&Storage> {
        self.inner.settings.storage.as_ref()
    }

    /// Where VM directories (consoles, sockets, config) live.
    pub fn vms_root(&self) -> &Path {
        &self.inner.settings.vms_root
    }

    fn storage_or_err(&self) -> Result<&Storage, VmError> {
        self.storage().ok_or_else(|| {
            VmError::Invalid(format!("node {} has no storage for disk images and workspaces", self.inner.settings.node))
        })
    }

    /// Images this node can boot: directories under the image root with a kernel and initramfs.
    pub fn images(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.inner.settings.images_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("vmlinux").is_file() && e.path().join("initramfs.cpio.gz").is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| valid_token(n, 63))
            .collect();
        if let Some(storage) = self.storage() {
            names.extend(storage.images().into_iter().map(|i| i.name));
        }
        names.sort();
        names.dedup();
        names
    }

    /// Bytes of an initramfs image's kernel and initramfs.
    pub fn initramfs_bytes(&self, image: &str) -> u64 {
        let dir = self.inner.settings.images_root.join(image);
        ["vmlinux", "initramfs.cpio.gz"]
            .iter()
            .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
            .map(|m| m.len())
            .sum()
    }

    /// A VM with a VMM that may be running and that has workspace `id` as a disk.
    pub fn using_workspace(&self, id: &str) -> Option<VmView> {
        self.list()
            .into_iter()
            .find(|v| v.status.state.has_process() && v.config.disks.iter().any(|d| d.workspace == id))
    }

    pub fn runtime(&self) -> &Runtime {
        &self.inner.settings.runtime
    }

    fn vm(&self, id: &str) -> Result<Arc<Vm>, VmError> {
        if let Some(vm) = self.inner.vms.lock().expect("vm map lock is never poisoned").get(id) {
            return Ok(vm.clone());
        }
        // Created by another process on the same storage root (two gateways' embedded nodes).
        // Only settled VMs: one that process is still creating or deleting is not ours to touch.
        let dir = VmDir::new(&self.inner.settings.vms_root, id);
        if valid_token(id, 64)
            && !dir.is_being_created()
            && dir.read_config().is_ok()
            && dir.read_status().is_ok_and(|s| !matches!(s.state, VmState::Creating | VmState::Deleting))
        {
            self.load(id);
        }
        self.inner
            .vms
            .lock()
            .expect("vm map lock is never poisoned")
            .get(id)
            .cloned()
            .ok_or_else(|| VmError::NotFound(id.into()))
    }
    fn view(&self, vm: &Vm) -> VmView {
        let (vmm, accel) = match &self.inner.settings.runtime {
            Runtime::Ready(v) => (v.kind(), v.accel().as_str()),
            Runtime::Missing(_) => ("", ""),
        };
        let agent = vm.agent.lock().expect("agent state lock is never poisoned").clone();
        VmView { config: vm.config.clone(), status: vm.status(), agent, vmm, accel, protections: Vec::new() }
    }

    fn vmm(&self) -> Result<Arc<dyn Vmm>, VmError> {
        match &self.inner.settings.runtime {
            Runtime::Ready(vmm) => Ok(vmm.clone()),
            Runtime::Missing(detail) => {
                Err(VmError::NoRuntime { node: self.inner.settings.node.clone(), detail: detail.clone() })
            }
        }
    }

    pub fn get(&self, id: &str) -> Result<VmView, VmError> {
        let vm = self.vm(id)?;
        let mut view = self.view(&vm);
        if view.status.state == VmState::Running && view.status.pid != 0 {
            view.protections = crate::vmm::confine::observe(view.status.pid, &vm.dir);
        }
        Ok(view)
    }

    /// How this node confines VMs' processes, and what it cannot.
    pub fn protections(&self) -> Vec<moat_tools::Protection> {
        match &self.inner.settings.runtime {
            Runtime::Ready(vmm) => vmm.protections(),
            Runtime::Missing(_) => Vec::new(),
        }
    }

    pub fn list(&self) -> Vec<VmView> {
        let vms: Vec<Arc<Vm>> =
            self.inner.vms.lock().expect("vm map lock is never poisoned").values().cloned().collect();
        let mut views: Vec<VmView> = vms.iter().map(|vm| self.view(vm)).collect();
        views.sort_by(|a, b| a.config.id.cmp(&b.config.id));
        views
    }

    /// Creates the VM's directory and config (and its throw-away root when it boots a disk
    /// image); starts it when `start`. Any failure removes everything this call made.
    pub async fn create(&self, new: &NewVm, start: bool) -> Result<VmView, VmError> {
        let (id, name, vcpus, memory_mib) = (new.id.as_str(), new.name.as_str(), new.vcpus, new.memory_mib);
        if !valid_token(id, 64) {
            return Err(VmError::Invalid(format!("vm id `{id}` must be 1-64 lowercase letters, digits or '-'")));
        }
        if !valid_token(name, 63) {
            return Err(VmError::Invalid(format!("vm name `{name}` must be a DNS label")));
        }
        let image = if new.image.is_empty() { "base" } else { new.image.as_str() };
        if !valid_token(image, 63) {
            return Err(VmError::Invalid(format!("image `{image}` must be 1-63 lowercase letters, digits or '-'")));
        }
        if vcpus == 0 || memory_mib < 64 {
            return Err(VmError::Invalid("a vm needs at least 1 vCPU and 64 MiB of memory".into()));
        }
        if let Some(nic) = &new.nic {
            if !crate::dir::valid_mac(&nic.mac) {
                return Err(VmError::Invalid(format!("mac `{}` is not a locally administered unicast MAC", nic.mac)));
            }
            if self.networks().is_none() {
                return Err(VmError::Invalid(format!("node {} has no networks", self.inner.settings.node)));
            }
        }
        self.vmm()?;
        // A disk image or a workspace boots with the base image's kernel and initramfs, whose
        // init switches to the disk.
        let disk_image = self.storage().and_then(|s| s.image_file(image)).is_some()
            && !self.inner.settings.images_root.join(image).join("vmlinux").is_file();
        let boots_disk = disk_image || new.root_workspace.is_some();
        let kernel_image = if boots_disk { "base" } else { image };
        let image_dir = self.inner.settings.images_root.join(kernel_image);
        let (kernel, initrd) = (image_dir.join("vmlinux"), image_dir.join("initramfs.cpio.gz"));
        if !kernel.is_file() || !initrd.is_file() {
            return Err(VmError::NoImage {
                node: self.inner.settings.node.clone(),
                image: kernel_image.into(),
                dir: image_dir.display().to_string(),
            });
        }
        let mut disks = Vec::new();
        if let Some(ws) = &new.root_workspace {
            let path = self.storage_or_err()?.workspace_file(ws)?;
            disks.push(Disk { path, read_only: false, mount: Disk::ROOT.into(), workspace: ws.clone() });
        }
        for attach in &new.disks {
            if !valid_token(&attach.name, 63) {
                return Err(VmError::Invalid(format!("workspace name `{}` must be a DNS label", attach.name)));
            }
            let path = self.storage_or_err()?.workspace_file(&attach.workspace)?;
            disks.push(Disk {
                path,
                read_only: attach.read_only,
                mount: attach.name.clone(),
                workspace: attach.workspace.clone(),
            });
        }
        if disk_image && new.root_workspace.is_none() {
            let path = self.storage_or_err()?.make_vm_root(id, image).await?;
            disks.insert(0, Disk { path, read_only: false, mount: Disk::ROOT.into(), workspace: String::new() });
        }
        let created = self.create_dir(new, image, kernel, initrd, disks, start).await;
        if created.is_err() && disk_image {
            self.storage_or_err()?.remove_vm_root(id);
        }
        created
    }

    async fn create_dir(
        &self,
        new: &NewVm,
        image: &str,
        kernel: PathBuf,
        initrd: PathBuf,
        disks: Vec<Disk>,
        start: bool,
    ) -> Result<VmView, VmError> {
        let (id, name, vcpus, memory_mib) = (new.id.as_str(), new.name.as_str(), new.vcpus, new.memory_mib);
        let dir = VmDir::new(&self.inner.settings.vms_root, id);
        match std::fs::create_dir(dir.path()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(VmError::Exists(id.into())),
            Err(source) => {
                return Err(VmError::Io { id: id.into(), what: "cannot create its directory".into(), source });
            }
        }
        let config = VmConfig {
            id: id.into(),
            name: name.into(),
            vcpus,
            memory_mib,
            image: image.into(),
            kernel,
            initrd,
            cmdline: cmdline(&disks, new.nic.as_ref()),
            created_at: moat_proto::time::now(),
            disks,
            nic: new.nic.clone(),
        };
        let written = dir
            .mark_creating()
            .and_then(|()| dir.write_status(&VmStatus::new(VmState::Creating, "")))
            .and_then(|()| dir.write_config(&config))
            .and_then(|()| dir.write_status(&VmStatus::new(VmState::Stopped, "created")));
        if let Err(source) = written {
            let _ = std::fs::remove_dir_all(dir.path());
            return Err(VmError::Io { id: id.into(), what: "cannot write its config".into(), source });
        }
        let vm = Arc::new(Vm {
            dir,
            config,
            status: Mutex::new(VmStatus::new(VmState::Stopped, "created")),
            op: tokio::sync::Mutex::new(()),
            exits: watch::Sender::new(0),
            agent: Arc::default(),
        });
        self.inner.vms.lock().expect("vm map lock is never poisoned").insert(id.into(), vm.clone());
        tracing::info!(vm = id, name, vcpus, memory_mib, image, "created vm");
        if start && let Err(e) = self.start(id).await {
            self.inner.vms.lock().expect("vm map lock is never poisoned").remove(id);
            let _ = std::fs::remove_dir_all(vm.dir.path());
            tracing::warn!(vm = id, error = %e, "create rolled back: the vm did not start");
            return Err(e);
        }
        // From here a restart keeps the VM: the answer below tells the caller it exists.
        vm.dir.created().map_err(|source| VmError::Io {
            id: id.into(),
            what: "cannot record its create".into(),
            source,
        })?;
        Ok(self.view(&vm))
    }

    /// Starts a stopped or crashed VM and returns once its VMM runs the guest. Starting a
    /// running VM is a no-op.
    pub async fn start(&self, id: &str) -> Result<VmView, VmError> {
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        let before = vm.status();
        match before.state {
            VmState::Running | VmState::Starting => return Ok(self.view(&vm)),
            VmState::Stopped | VmState::Crashed => {}
            other => return Err(VmError::WrongState { id: id.into(), state: other.as_str(), action: "start" }),
        }
        let vmm = self.vmm()?;
        if let Some(gone) = vm.config.disks.iter().find(|d| !d.path.exists()) {
            let what = if gone.workspace.is_empty() {
                "its root disk".to_string()
            } else {
                format!("workspace {}", gone.workspace)
            };
            return Err(VmError::Invalid(format!(
                "vm {id} cannot start: {what} ({}) no longer exists; delete the VM and create it again",
                gone.path.display()
            )));
        }
        let console_start = std::fs::symlink_metadata(vm.dir.console_log()).map(|m| m.len()).unwrap_or(0);
        vm.set_status(VmStatus {
            state: VmState::Starting,
            reason: String::new(),
            pid: 0,
            started_at: String::new(),
            console_start,
        })?;
        let tap = match (&vm.config.nic, self.networks()) {
            (None, _) => None,
            (Some(_), Some(net)) => match net.tap(id).await {
                Ok(fd) => Some(fd),
                Err(e) => {
                    let _ = vm.set_state(before.state, format!("start failed: {e}"));
                    return Err(VmError::Invalid(format!("vm {id} cannot start: its network card: {e}")));
                }
            },
            (Some(_), None) => {
                let _ = vm.set_state(before.state, "start failed: this node has no networks");
                return Err(VmError::Invalid(format!("vm {id} has a network card but this node has no networks")));
            }
        };
        let child = match vmm.launch(&vm.dir, &vm.config, tap).await {
            Ok(child) => child,
            Err(source) => {
                let log = vmm_log_tail(&vm.dir);
                let _ = vm.set_state(before.state, format!("start failed: {source}"));
                return Err(VmError::Vmm { id: id.into(), source, log });
            }
        };
        let pid = child.id().unwrap_or(0);
        let _ = vm.dir.write_pid(pid);
        {
            let mut status = vm.status();
            status.pid = pid;
            vm.set_status(status)?;
        }
        let mut exits = vm.exits.subscribe();
        self.spawn_monitor(vm.clone(), Process::Child(child));
        let running = tokio::select! {
            ready = vmm.wait_running(&vm.dir) => ready,
            _ = exits.changed() => Err(VmmError::NotReady { vmm: vmm.kind(), detail: "it exited while starting".into() }),
        };
        match running {
            Ok(()) => {
                let mut status = vm.status();
                if status.state == VmState::Starting {
                    status.state = VmState::Running;
                    status.started_at = moat_proto::time::now();
                    vm.set_status(status)?;
                }
                tracing::info!(vm = id, pid, "vm running");
                self.watch_agent(&vm);
                Ok(self.view(&vm))
            }
            Err(source) => {
                if vm.status().state.has_process() {
                    kill_and_wait(&vm, pid, &mut exits).await;
                }
                let log = vmm_log_tail(&vm.dir);
                let _ = vm.set_state(VmState::Crashed, format!("start failed: {source}"));
                Err(VmError::Vmm { id: id.into(), source, log })
            }
        }
    }

    /// Stops a VM: ACPI power-down, then SIGKILL after `timeout` (or at once when `force`).
    /// Stopping a stopped or crashed VM is a no-op.
    pub async fn stop(&self, id: &str, force: bool, timeout: Duration) -> Result<VmView, VmError> {
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        self.stop_locked(&vm, force, timeout).await?;
        Ok(self.view(&vm))
    }

    async fn stop_locked(&self, vm: &Arc<Vm>, force: bool, timeout: Duration) -> Result<(), VmError> {
        let status = vm.status();
        if !status.state.has_process() {
            return Ok(());
        }
        let mut exits = vm.exits.subscribe();
        if force {
            vm.set_state(VmState::Stopping, "stopped: killed on request (force)")?;
        } else {
            vm.set_state(VmState::Stopping, "stopped: the guest powered off on request")?;
            let asked = match self.vmm() {
                Ok(vmm) => vmm.request_shutdown(&vm.dir).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match asked {
                Ok(()) => {
                    // Press again every few seconds: a guest still booting may miss the first.
                    let deadline = tokio::time::Instant::now() + timeout;
                    loop {
                        let next = (tokio::time::Instant::now() + REPRESS).min(deadline);
                        if tokio::time::timeout_at(next, exits.changed()).await.is_ok() {
                            return Ok(());
                        }
                        if next >= deadline {
                            break;
                        }
                        if let Ok(vmm) = self.vmm() {
                            let _ = vmm.request_shutdown(&vm.dir).await;
                        }
                    }
                    let secs = timeout.as_secs();
                    vm.set_state(
                        VmState::Stopping,
                        format!("stopped: killed after the guest ignored power-off for {secs} s"),
                    )?;
                }
                Err(e) => {
                    vm.set_state(
                        VmState::Stopping,
                        format!("stopped: killed because power-off could not be requested ({e})"),
                    )?;
                }
            }
        }
        kill_and_wait(vm, status.pid, &mut exits).await;
        Ok(())
    }

    /// Stops the VM if it runs, then removes its directory and everything in it.
    pub async fn delete(&self, id: &str) -> Result<(), VmError> {
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        self.stop_locked(&vm, true, Duration::ZERO).await?;
        let before = vm.status();
        vm.set_state(VmState::Deleting, "")?;
        if let Err(source) = std::fs::remove_dir_all(vm.dir.path()) {
            let _ = vm.set_state(before.state, before.reason);
            return Err(VmError::Io { id: id.into(), what: "cannot remove its directory".into(), source });
        }
        self.inner.vms.lock().expect("vm map lock is never poisoned").remove(id);
        if let Some(storage) = self.storage() {
            storage.remove_vm_root(id);
        }
        tracing::info!(vm = id, "deleted vm");
        Ok(())
    }

    /// Connects to port `port` of the VM's guest agent over its vsock, retrying until `deadline`.
    pub async fn guest_connect(
        &self,
        id: &str,
        port: u32,
        deadline: Duration,
    ) -> Result<Box<dyn vsock::Conn>, VmError> {
        let vm = self.vm(id)?;
        let vmm = self.vmm()?;
        if let VsockMode::Unavailable(why) = vmm.vsock() {
            return Err(VmError::NoVsock { node: self.inner.settings.node.clone(), detail: why.clone() });
        }
        let state = vm.status().state;
        if state != VmState::Running {
            return Err(VmError::WrongState { id: id.into(), state: state.as_str(), action: "reach the agent of" });
        }
        let unreachable =
            |detail: String| VmError::AgentUnreachable { id: id.into(), detail, console: last_lines(&vm.dir, 3) };
        let target = vmm.vsock_target(&vm.dir).ok_or_else(|| unreachable("the VM has no vsock CID".into()))?;
        vsock::connect_to(&target, port, deadline).await.map_err(|e| unreachable(e.to_string()))
    }

    /// The last `tail` bytes of the VM's console (default 64 KiB, at most 1 MiB).
    pub fn logs(&self, id: &str, tail: u64) -> Result<(String, bool), VmError> {
        let vm = self.vm(id)?;
        let tail = if tail == 0 { DEFAULT_LOG_TAIL } else { tail.min(MAX_LOG_TAIL) };
        vm.dir.console_tail(tail).map_err(|source| VmError::Io {
            id: id.into(),
            what: "cannot read its console".into(),
            source,
        })
    }

    /// Watches the VM's guest agent while the VM runs (when this node has vsock).
    fn watch_agent(&self, vm: &Arc<Vm>) {
        let Ok(vmm) = self.vmm() else { return };
        if let VsockMode::Unavailable(why) = vmm.vsock() {
            vm.agent.lock().expect("agent state lock is never poisoned").detail =
                format!("no vsock on this node: {why}");
            return;
        }
        let Some(target) = vmm.vsock_target(&vm.dir) else { return };
        // This run of the VM only: a watcher from before a quick stop and start ends instead of
        // watching alongside the new one.
        let watched = vm.clone();
        let run = vm.status().started_at;
        let running = move || {
            let status = watched.status();
            status.state == VmState::Running && status.started_at == run
        };
        let dir = vm.dir.clone();
        self.serve_uplinks(vm, &target, running.clone());
        let fault = move || vmm.vsock_fault(&dir);
        tokio::spawn(agent::watch(vm.config.id.clone(), target, vm.agent.clone(), running, fault));
    }

    /// Accepts the VM's connections to the host (portal sessions) while it runs: on hybrid vsock
    /// through a socket in its jail; on kernel vsock through one listener for the node, which
    /// knows the VM by the CID it was given.
    fn serve_uplinks(&self, vm: &Arc<Vm>, target: &vsock::Target, running: impl Fn() -> bool + Send + 'static) {
        let uplinks = self.inner.uplinks.clone();
        match target {
            vsock::Target::Hybrid(socket) => {
                tokio::spawn(uplink::serve_hybrid(uplinks, vm.config.id.clone(), socket.clone(), running));
            }
            vsock::Target::Kernel(_) => self.inner.kernel_uplink.call_once(|| {
                let manager = self.clone();
                tokio::spawn(uplink::serve_kernel(uplinks, move |cid| manager.running_vm_with_cid(cid)));
            }),
        }
    }

    /// The running VM the host kernel's vsock knows by `cid`.
    fn running_vm_with_cid(&self, cid: u32) -> Option<String> {
        let vms = self.inner.vms.lock().expect("vm map lock is never poisoned");
        vms.values()
            .find(|vm| vm.status().state == VmState::Running && vm.dir.read_cid() == Some(cid))
            .map(|vm| vm.config.id.clone())
    }

    fn spawn_monitor(&self, vm: Arc<Vm>, process: Process) {
        monitor::spawn(vm, process, self.vmm().ok());
    }
}

/// The kernel command line: the console, and which disk (by serial) is the root and which are
/// mounted where (read by the base image's init).
fn cmdline(disks: &[Disk], nic: Option<&Nic>) -> String {
    let mut line = String::from("console=ttyS0 panic=-1");
    let serial = |i: usize| format!("moat{i}");
    let mounts: Vec<String> = disks
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            if d.mount == Disk::ROOT {
                line.push_str(&format!(" moat.root={}", serial(i)));
                None
            } else {
                Some(format!("{}:{}:{}", d.mount, serial(i), if d.read_only { "ro" } else { "rw" }))
            }
        })
        .collect();
    if !mounts.is_empty() {
        line.push_str(&format!(" moat.mounts={}", mounts.join(",")));
    }
    if let Some(nic) = nic {
        line.push(' ');
        line.push_str(&nic.cmdline());
    }
    line
}

async fn kill_and_wait(vm: &Vm, pid: u32, exits: &mut watch::Receiver<u64>) {
    if pid != 0 {
        // SAFETY: kill(2) with a pid we started (and still monitor) and a constant signal.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    if tokio::time::timeout(KILL_WAIT, exits.changed()).await.is_err() {
        tracing::error!(vm = %vm.config.id, pid, "the VMM did not exit after SIGKILL");
    }
}

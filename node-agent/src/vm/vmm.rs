//! The one narrow interface between VM lifecycle logic and a VMM. A node picks
//! its driver at start (see [`Runtime::detect`]); the lifecycle code in
//! [`super::VmManager`] never knows which one it drives.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use super::dir::{VmConfig, VmDir};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How guests are accelerated on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's software emulation: works everywhere, several times slower.
    Tcg,
}

impl Accel {
    pub const fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot start {vmm}: {detail}")]
    Launch { vmm: &'static str, detail: String },
    #[error("{vmm} did not become ready: {detail}")]
    NotReady { vmm: &'static str, detail: String },
    #[error("{vmm} control request failed: {detail}")]
    Control { vmm: &'static str, detail: String },
}

/// A VMM driver. Implementations hold no per-VM state: everything about a VM is in its
/// [`VmDir`], which is what lets a restarted node re-adopt running VMs.
pub trait Vmm: Send + Sync + std::fmt::Debug {
    /// "qemu", "firecracker", "cloud-hypervisor".
    fn kind(&self) -> &'static str;
    fn accel(&self) -> Accel;
    /// Starts the VMM process for `config` (and any helper it needs first, e.g. a vsock device
    /// daemon); the process must outlive moat-node.
    fn launch<'a>(
        &'a self,
        dir: &'a VmDir,
        config: &'a VmConfig,
    ) -> BoxFuture<'a, Result<tokio::process::Child, VmmError>>;
    /// Resolves once the VMM's control socket answers and the guest is executing.
    fn wait_running<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), VmmError>>;
    /// Asks the guest to power off (ACPI power button); does not wait for it.
    fn request_shutdown<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), VmmError>>;
    /// Whether process `pid` is this VMM running the VM in `dir` (pids get reused).
    fn owns(&self, pid: u32, dir: &VmDir) -> bool;
    /// After the VMM exited: stop helpers it needed (the vsock device daemon).
    fn cleanup(&self, dir: &VmDir);
    /// How the host reaches the guest agent over vsock on this node, or why it cannot.
    fn vsock(&self) -> &VsockMode;
    /// Why the running VM in `dir` cannot be reached over vsock whatever its guest does (a
    /// helper daemon died), if that is so.
    fn vsock_fault(&self, _dir: &VmDir) -> Option<String> {
        None
    }
    /// Where the running VM in `dir` is reached over vsock, if it can be.
    fn vsock_target(&self, dir: &VmDir) -> Option<super::vsock::Target> {
        match self.vsock() {
            VsockMode::Hybrid { .. } => Some(super::vsock::Target::Hybrid(dir.vsock_socket())),
            VsockMode::Kernel => dir.read_cid().map(super::vsock::Target::Kernel),
            VsockMode::Unavailable(_) => None,
        }
    }
}

/// How VMs on this node get a vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsockMode {
    /// vhost-device-vsock (rust-vmm) per VM: the host side is a Unix socket speaking
    /// Firecracker's hybrid protocol. Works without /dev/vhost-vsock.
    Hybrid { daemon: PathBuf },
    /// The host kernel's vhost-vsock (/dev/vhost-vsock): each VM gets its own CID and the host
    /// connects with AF_VSOCK. Preferred when present: no daemon per VM.
    Kernel,
    /// No vsock: VMs run, but their guest agent cannot be reached.
    Unavailable(String),
}

impl VsockMode {
    /// Kernel vhost-vsock when /dev/vhost-vsock can be opened (existing is not enough: a
    /// container may see the node without the right to use it), else the hybrid daemon if
    /// installed.
    pub fn detect(daemon: &str) -> VsockMode {
        if std::fs::OpenOptions::new().read(true).write(true).open("/dev/vhost-vsock").is_ok() {
            return VsockMode::Kernel;
        }
        match which(daemon) {
            Some(path) => VsockMode::Hybrid { daemon: path },
            None => VsockMode::Unavailable(format!(
                "{daemon} not found: install it (cargo install vhost-device-vsock) or pass moat-node --vhost-vsock PATH"
            )),
        }
    }
}

/// The VMM this node runs VMs with, or why it has none.
#[derive(Debug, Clone)]
pub enum Runtime {
    Ready(std::sync::Arc<dyn Vmm>),
    Missing(String),
}

impl Runtime {
    /// QEMU at `qemu` (a path, or a name looked up in PATH), accelerated by KVM when `kvm_usable`.
    pub fn detect(qemu: &str, kvm_usable: bool, forced: Option<Accel>, vsock: VsockMode) -> Runtime {
        match which(qemu) {
            Some(binary) => {
                let accel = forced.unwrap_or(if kvm_usable { Accel::Kvm } else { Accel::Tcg });
                Runtime::Ready(std::sync::Arc::new(super::qemu::Qemu::new(binary, accel, vsock)))
            }
            None => Runtime::Missing(format!(
                "{qemu} not found: install qemu-system-x86 (apt-get install qemu-system-x86) or pass \
                 moat-node --qemu PATH"
            )),
        }
    }
}

/// `name` if it is a path to an executable, else the first match in PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable =
        |p: &std::path::Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if name.contains('/') {
        let path = PathBuf::from(name);
        return executable(&path).then_some(path);
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(name)).find(|p| executable(p))
}

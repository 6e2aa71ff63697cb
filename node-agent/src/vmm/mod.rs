//! The one narrow interface between VM lifecycle logic and a VMM. A node picks
//! its driver at start ([`detect`], the only module that names drivers); the
//! lifecycle code in `crate::vm` never knows which one it drives.

pub mod confine;
pub mod detect;
pub mod qemu;

pub use detect::{Runtime, VsockMode, which};

use std::future::Future;
use std::pin::Pin;

use crate::dir::{VmConfig, VmDir};

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
    /// daemon); the process must outlive moat-node. `tap` is the VM's network card's tap (when
    /// `config.nic` is set), which the VMM inherits.
    fn launch<'a>(
        &'a self,
        dir: &'a VmDir,
        config: &'a VmConfig,
        tap: Option<std::os::fd::OwnedFd>,
    ) -> BoxFuture<'a, Result<tokio::process::Child, VmmError>>;
    /// Resolves once the VMM's control socket answers and the guest is executing.
    fn wait_running<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), VmmError>>;
    /// Asks the guest to power off (ACPI power button); does not wait for it.
    fn request_shutdown<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), VmmError>>;
    /// Whether process `pid` is this VMM running the VM in `dir` (pids get reused).
    fn owns(&self, pid: u32, dir: &VmDir) -> bool;
    /// After the VMM exited: stop helpers it needed (the vsock device daemon), release its
    /// confinement (cgroup, uid).
    fn cleanup(&self, dir: &VmDir);
    /// How this driver confines every VM's processes here, and what it cannot.
    fn protections(&self) -> Vec<moat_tools::Protection> {
        Vec::new()
    }
    /// How the host reaches the guest agent over vsock on this node, or why it cannot.
    fn vsock(&self) -> &VsockMode;
    /// Why the running VM in `dir` cannot be reached over vsock whatever its guest does (a
    /// helper daemon died), if that is so.
    fn vsock_fault(&self, _dir: &VmDir) -> Option<String> {
        None
    }
    /// Where the running VM in `dir` is reached over vsock, if it can be.
    fn vsock_target(&self, dir: &VmDir) -> Option<crate::vsock::Target> {
        match self.vsock() {
            VsockMode::Hybrid { .. } => Some(crate::vsock::Target::Hybrid(dir.vsock_socket())),
            VsockMode::Kernel => dir.read_cid().map(crate::vsock::Target::Kernel),
            VsockMode::Unavailable(_) => None,
        }
    }
}

//! Runtime detection: which VMM this node drives and how its guests get vsock.
//! The only place that names concrete drivers.

use std::path::PathBuf;

use super::confine::Confinement;
use super::{Accel, Vmm};

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
        if kernel_vsock_opens() {
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

/// Whether /dev/vhost-vsock is the kernel's character device and opens read-write here.
pub fn kernel_vsock_opens() -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata("/dev/vhost-vsock").is_ok_and(|m| m.file_type().is_char_device())
        && std::fs::OpenOptions::new().read(true).write(true).open("/dev/vhost-vsock").is_ok()
}

/// The VMM this node runs VMs with, or why it has none.
#[derive(Debug, Clone)]
pub enum Runtime {
    Ready(std::sync::Arc<dyn Vmm>),
    Missing(String),
}

impl Runtime {
    /// QEMU at `qemu` (a path, or a name looked up in PATH), accelerated by KVM when `kvm_usable`,
    /// its VMs confined with uids from `uid_base` (see [`super::confine`]).
    pub fn detect(qemu: &str, kvm_usable: bool, forced: Option<Accel>, vsock: VsockMode, uid_base: u32) -> Runtime {
        match which(qemu) {
            Some(binary) => {
                let accel = forced.unwrap_or(if kvm_usable { Accel::Kvm } else { Accel::Tcg });
                let confinement = Confinement::detect(uid_base, super::qemu::sandbox_support(&binary));
                Runtime::Ready(std::sync::Arc::new(super::qemu::Qemu::new(binary, accel, vsock, confinement)))
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

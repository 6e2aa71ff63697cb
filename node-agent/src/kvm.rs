//! Decides whether KVM can actually run stock guests on this host.
//!
//! Presence of `/dev/kvm` is not enough: the device can be unopenable, refuse
//! `KVM_CREATE_VM`, or (on PVM nested hosts, module `kvm_pvm`) run only
//! PVM-enabled guest kernels, where stock kernels abort or crawl. Callers get
//! a yes/no plus a reason an operator can act on.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
/// `_IO(KVMIO, 0x01)`.
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
/// The only stable KVM API version, fixed since Linux 2.6.22.
const KVM_API_VERSION: libc::c_int = 12;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmReport {
    pub present: bool,
    pub usable: bool,
    /// Empty when usable; otherwise what is wrong and what to do.
    pub detail: String,
}

/// Probes `/dev/kvm` and the loaded KVM modules under `sys_module`.
pub fn probe(dev: &Path, sys_module: &Path) -> KvmReport {
    if !dev.exists() {
        return KvmReport {
            present: false,
            usable: false,
            detail: format!(
                "{} does not exist: enable virtualization in firmware and load kvm_intel or kvm_amd; \
                 VMs will use QEMU TCG (slow)",
                dev.display()
            ),
        };
    }
    if let Err(detail) = create_vm(dev) {
        return KvmReport { present: true, usable: false, detail };
    }
    let loaded = |m: &str| sys_module.join(m).exists();
    if loaded("kvm_pvm") && !loaded("kvm_intel") && !loaded("kvm_amd") {
        return KvmReport {
            present: true,
            usable: false,
            detail: "KVM here is kvm_pvm (PVM nested virtualization): only PVM-enabled guest kernels \
                     run, stock kernels fail; VMs will use QEMU TCG"
                .into(),
        };
    }
    KvmReport { present: true, usable: true, detail: String::new() }
}

fn create_vm(dev: &Path) -> Result<(), String> {
    let file =
        OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(dev).map_err(|e| {
            format!("cannot open {}: {e}; run moat-node as root or add it to the kvm group", dev.display())
        })?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int; the fd is valid
    // for the duration of the call because `file` is alive.
    let version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != KVM_API_VERSION {
        return Err(format!("{} reports KVM API version {version}, expected {KVM_API_VERSION}", dev.display()));
    }
    // SAFETY: KVM_CREATE_VM with machine type 0 returns a new fd or -1; it reads no memory of ours.
    let vm_fd = unsafe { libc::ioctl(file.as_raw_fd(), KVM_CREATE_VM, 0) };
    if vm_fd < 0 {
        let err = std::io::Error::last_os_error();
        return Err(format!("KVM_CREATE_VM failed on {}: {err}", dev.display()));
    }
    // SAFETY: `vm_fd` is a fresh descriptor returned by the kernel and owned by nobody else;
    // OwnedFd closes it on drop.
    drop(unsafe { OwnedFd::from_raw_fd(vm_fd) });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_not_present() {
        let dir = tempfile::tempdir().unwrap();
        let r = probe(&dir.path().join("kvm"), dir.path());
        assert!(!r.present && !r.usable);
        assert!(r.detail.contains("does not exist"), "{}", r.detail);
    }

    #[test]
    fn a_regular_file_is_present_but_not_usable() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        std::fs::write(&dev, b"").unwrap();
        let r = probe(&dev, dir.path());
        assert!(r.present && !r.usable);
        assert!(r.detail.contains("API version"), "{}", r.detail);
    }

    #[test]
    fn real_device_gives_a_consistent_answer() {
        // On every machine: either usable with no detail, or not usable with a reason.
        let r = probe(Path::new("/dev/kvm"), Path::new("/sys/module"));
        assert_eq!(r.usable, r.detail.is_empty(), "{r:?}");
        if Path::new("/sys/module/kvm_pvm").exists() && !Path::new("/sys/module/kvm_intel").exists() {
            assert!(!r.usable && r.detail.contains("kvm_pvm"), "{r:?}");
        }
    }
}

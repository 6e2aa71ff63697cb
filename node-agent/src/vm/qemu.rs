//! The QEMU driver: q35 with ACPI (so a graceful stop is a power-button
//! press), direct kernel boot, the serial console appended to the VM's
//! `console.log`, and QMP on a Unix socket in the VM's directory.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::dir::{VmConfig, VmDir};
use super::qmp;
use super::vmm::{Accel, BoxFuture, Vmm, VmmError};
use crate::cmd;

/// How long QEMU may take from exec to answering QMP with the guest running.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Qemu {
    binary: PathBuf,
    accel: Accel,
}

impl Qemu {
    pub fn new(binary: PathBuf, accel: Accel) -> Qemu {
        Qemu { binary, accel }
    }

    fn argv(&self, dir: &VmDir, config: &VmConfig) -> Vec<String> {
        let mut argv = vec![self.binary.display().to_string()];
        let mut push = |args: &[&str]| argv.extend(args.iter().map(|s| s.to_string()));
        push(&["-name", &format!("moat-{},process=moat-{}", config.name, config.id)]);
        push(&["-machine", "q35", "-accel", self.accel.as_str()]);
        if self.accel == Accel::Kvm {
            push(&["-cpu", "host"]);
        }
        push(&["-smp", &config.vcpus.to_string(), "-m", &format!("{}M", config.memory_mib)]);
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-display", "none"]);
        push(&["-kernel", &config.kernel.display().to_string()]);
        push(&["-initrd", &config.initrd.display().to_string()]);
        push(&["-append", &config.cmdline]);
        let console = format!("file,id=console,path={},append=on", dir.console_log().display());
        push(&["-chardev", &console, "-serial", "chardev:console"]);
        push(&["-qmp", &format!("unix:{},server=on,wait=off", dir.qmp_socket().display())]);
        argv
    }
}

impl Vmm for Qemu {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn accel(&self) -> Accel {
        self.accel
    }

    fn launch(&self, dir: &VmDir, config: &VmConfig) -> Result<tokio::process::Child, VmmError> {
        let _ = std::fs::remove_file(dir.qmp_socket());
        cmd::spawn_detached(&self.argv(dir, config), &dir.vmm_log())
            .map_err(|e| VmmError::Launch { vmm: "qemu", detail: crate::api::error_chain(&e) })
    }

    fn wait_running<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            let started = Instant::now();
            let mut last = String::from("no QMP socket yet");
            while started.elapsed() < READY_TIMEOUT {
                match qmp::execute(&dir.qmp_socket(), "query-status", None).await {
                    Ok(status) if status["status"] == "running" => return Ok(()),
                    Ok(status) => last = format!("status {}", status["status"]),
                    Err(e) => last = crate::api::error_chain(&e),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(VmmError::NotReady { vmm: "qemu", detail: format!("after {READY_TIMEOUT:?}: {last}") })
        })
    }

    fn request_shutdown<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            qmp::execute(&dir.qmp_socket(), "system_powerdown", None)
                .await
                .map(drop)
                .map_err(|e| VmmError::Control { vmm: "qemu", detail: crate::api::error_chain(&e) })
        })
    }

    fn owns(&self, pid: u32, dir: &VmDir) -> bool {
        // The command line names this VM's QMP socket, which no other process has.
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
        let needle = format!("unix:{},", dir.qmp_socket().display());
        cmdline.split(|&b| b == 0).any(|arg| arg.starts_with(needle.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_boots_the_image_with_console_and_qmp_in_the_vm_dir() {
        let dir = VmDir::new(std::path::Path::new("/srv/vms"), "abc");
        let config = VmConfig {
            id: "abc".into(),
            name: "web".into(),
            vcpus: 2,
            memory_mib: 512,
            image: "base".into(),
            kernel: "/img/vmlinux".into(),
            initrd: "/img/initramfs.cpio.gz".into(),
            cmdline: "console=ttyS0".into(),
            created_at: String::new(),
        };
        let argv = Qemu::new("/usr/bin/qemu-system-x86_64".into(), Accel::Tcg).argv(&dir, &config).join(" ");
        for want in [
            "-accel tcg",
            "-smp 2 -m 512M",
            "-kernel /img/vmlinux",
            "-chardev file,id=console,path=/srv/vms/abc/console.log,append=on",
            "-qmp unix:/srv/vms/abc/qmp.sock,server=on,wait=off",
            "-no-reboot",
        ] {
            assert!(argv.contains(want), "{want} missing from {argv}");
        }
        assert!(!argv.contains("-cpu host"), "TCG cannot use -cpu host");
        let kvm = Qemu::new("/usr/bin/qemu-system-x86_64".into(), Accel::Kvm).argv(&dir, &config).join(" ");
        assert!(kvm.contains("-accel kvm -cpu host"), "{kvm}");
    }
}

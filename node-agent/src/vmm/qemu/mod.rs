//! The QEMU driver: q35 with ACPI (so a graceful stop is a power-button
//! press), direct kernel boot, the serial console appended to the VM's
//! `console.log`, and QMP on a Unix socket in the VM's directory.

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub mod qmp;

use super::{Accel, BoxFuture, Vmm, VmmError, VsockMode};
use crate::cmd;
use crate::dir::{VmConfig, VmDir};

/// How long QEMU may take from exec to answering QMP with the guest running.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the vsock device daemon may take to create its vhost-user socket.
const VSOCK_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The guest's vsock CID. Each hybrid daemon has its own CID space, so every VM can use 3.
const GUEST_CID: u32 = 3;

#[derive(Debug)]
pub struct Qemu {
    binary: PathBuf,
    accel: Accel,
    vsock: VsockMode,
}

impl Qemu {
    pub fn new(binary: PathBuf, accel: Accel, vsock: VsockMode) -> Qemu {
        Qemu { binary, accel, vsock }
    }

    /// Starts the VM's vsock device daemon and waits for its vhost-user socket.
    async fn start_vsock(&self, dir: &VmDir, daemon: &std::path::Path) -> Result<(), VmmError> {
        let _ = std::fs::remove_file(dir.vhost_socket());
        let _ = std::fs::remove_file(dir.vsock_socket());
        let vm = format!(
            "guest-cid={GUEST_CID},socket={},uds-path={}",
            dir.vhost_socket().display(),
            dir.vsock_socket().display()
        );
        let argv = [daemon.display().to_string(), "--vm".into(), vm];
        let child = cmd::spawn_detached(&argv, &dir.path().join("vsock.log"))
            .map_err(|e| VmmError::Launch { vmm: "qemu", detail: crate::errors::chain(&e) })?;
        let pid = child.id().unwrap_or(0);
        let _ = std::fs::write(dir.vsock_pid_file(), format!("{pid}\n"));
        // Reaped by tokio's orphan handling once it exits; `cleanup` kills it with the VM.
        drop(child);
        let started = Instant::now();
        while !dir.vhost_socket().exists() {
            if started.elapsed() > VSOCK_READY_TIMEOUT {
                self.cleanup(dir);
                return Err(VmmError::Launch {
                    vmm: "qemu",
                    detail: format!("the vsock daemon made no socket within {VSOCK_READY_TIMEOUT:?}; see vsock.log"),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    fn argv(&self, dir: &VmDir, config: &VmConfig) -> Vec<String> {
        let mut argv = vec![self.binary.display().to_string()];
        let mut push = |args: &[&str]| argv.extend(args.iter().map(|s| s.to_string()));
        push(&["-name", &format!("moat-{},process=moat-{}", config.name, config.id)]);
        match &self.vsock {
            VsockMode::Hybrid { .. } => {
                // vhost-user needs the guest's memory shared with the device daemon.
                let mem = format!("memory-backend-memfd,id=mem,size={}M,share=on", config.memory_mib);
                push(&["-object", &mem, "-machine", "q35,memory-backend=mem", "-accel", self.accel.as_str()]);
                let chardev = format!("socket,id=vsock0,path={}", dir.vhost_socket().display());
                push(&["-chardev", &chardev, "-device", "vhost-user-vsock-pci,chardev=vsock0"]);
            }
            VsockMode::Kernel => {
                push(&["-machine", "q35", "-accel", self.accel.as_str()]);
                let cid = dir.read_cid().unwrap_or(GUEST_CID);
                push(&["-device", &format!("vhost-vsock-pci,guest-cid={cid}")]);
            }
            VsockMode::Unavailable(_) => push(&["-machine", "q35", "-accel", self.accel.as_str()]),
        }
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

/// The pid of the vsock device daemon serving the VM in `dir`, if it is alive: its command
/// line names this VM's socket (pids get reused) and it is not a zombie.
fn vsock_daemon(dir: &VmDir) -> Option<i32> {
    let pid = std::fs::read_to_string(dir.vsock_pid_file()).ok()?.trim().parse::<i32>().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let needle = dir.vhost_socket().display().to_string();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the parenthesised command name: "pid (comm) S ...".
    let zombie = stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'));
    (String::from_utf8_lossy(&cmdline).contains(&needle) && !zombie).then_some(pid)
}

/// Kernel vsock CIDs are host-wide: take the smallest one (from 3) no other VM here holds.
/// Two VMs starting at the same instant may pick the same CID; QEMU then refuses the second
/// ("Address already in use") and its start fails cleanly.
fn allocate_cid(dir: &VmDir) -> Result<(), VmmError> {
    let taken: std::collections::HashSet<u32> = dir
        .path()
        .parent()
        .and_then(|vms| std::fs::read_dir(vms).ok())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path() != dir.path())
        .filter_map(|e| std::fs::read_to_string(e.path().join("vsock.cid")).ok()?.trim().parse().ok())
        .collect();
    let cid = (GUEST_CID..).find(|c| !taken.contains(c)).unwrap_or(GUEST_CID);
    std::fs::write(dir.vsock_cid_file(), format!("{cid}\n"))
        .map_err(|e| VmmError::Launch { vmm: "qemu", detail: format!("cannot record the vsock CID: {e}") })
}

impl Vmm for Qemu {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn accel(&self) -> Accel {
        self.accel
    }

    fn launch<'a>(
        &'a self,
        dir: &'a VmDir,
        config: &'a VmConfig,
    ) -> BoxFuture<'a, Result<tokio::process::Child, VmmError>> {
        Box::pin(async move {
            let _ = std::fs::remove_file(dir.qmp_socket());
            match &self.vsock {
                VsockMode::Hybrid { daemon } => self.start_vsock(dir, daemon).await?,
                VsockMode::Kernel => allocate_cid(dir)?,
                VsockMode::Unavailable(_) => {}
            }
            cmd::spawn_detached(&self.argv(dir, config), &dir.vmm_log()).map_err(|e| {
                self.cleanup(dir);
                VmmError::Launch { vmm: "qemu", detail: crate::errors::chain(&e) }
            })
        })
    }

    fn cleanup(&self, dir: &VmDir) {
        if let Some(pid) = vsock_daemon(dir) {
            // SAFETY: kill(2) on the vsock daemon this VM started, checked by its command line.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_file(dir.vsock_pid_file());
        let _ = std::fs::remove_file(dir.vsock_cid_file());
        let _ = std::fs::remove_file(dir.vhost_socket());
        let _ = std::fs::remove_file(dir.vsock_socket());
    }

    fn vsock(&self) -> &VsockMode {
        &self.vsock
    }

    fn vsock_fault(&self, dir: &VmDir) -> Option<String> {
        if !matches!(self.vsock, VsockMode::Hybrid { .. }) || vsock_daemon(dir).is_some() {
            return None;
        }
        let log = std::fs::read_to_string(dir.path().join("vsock.log")).unwrap_or_default();
        let last = log.lines().rev().find(|l| !l.trim().is_empty()).map(|l| format!(" (vsock.log: {l})"));
        Some(format!(
            "the VM's vsock device daemon has exited{}; stop and start the VM to give it a new one",
            last.unwrap_or_default()
        ))
    }

    fn wait_running<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            let started = Instant::now();
            let mut last = String::from("no QMP socket yet");
            while started.elapsed() < READY_TIMEOUT {
                match qmp::execute(&dir.qmp_socket(), "query-status", None).await {
                    Ok(status) if status["status"] == "running" => return Ok(()),
                    Ok(status) => last = format!("status {}", status["status"]),
                    Err(e) => last = crate::errors::chain(&e),
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
                .map_err(|e| VmmError::Control { vmm: "qemu", detail: crate::errors::chain(&e) })
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
        let argv = Qemu::new("/usr/bin/qemu-system-x86_64".into(), Accel::Tcg, VsockMode::Unavailable(String::new()))
            .argv(&dir, &config)
            .join(" ");
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
        let kvm = Qemu::new("/usr/bin/qemu-system-x86_64".into(), Accel::Kvm, VsockMode::Unavailable(String::new()))
            .argv(&dir, &config)
            .join(" ");
        assert!(kvm.contains("-accel kvm -cpu host"), "{kvm}");
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (VmDir::new(tmp.path(), "a"), VmDir::new(tmp.path(), "b"));
        std::fs::create_dir_all(a.path()).unwrap();
        std::fs::create_dir_all(b.path()).unwrap();
        allocate_cid(&a).unwrap();
        allocate_cid(&b).unwrap();
        assert_eq!((a.read_cid(), b.read_cid()), (Some(3), Some(4)), "CIDs are unique on the host");
        let kernel = Qemu::new("/q".into(), Accel::Tcg, VsockMode::Kernel).argv(&b, &config).join(" ");
        assert!(kernel.contains("-device vhost-vsock-pci,guest-cid=4"), "{kernel}");
        let hybrid =
            Qemu::new("/q".into(), Accel::Tcg, VsockMode::Hybrid { daemon: "/d".into() }).argv(&dir, &config).join(" ");
        for want in [
            "-object memory-backend-memfd,id=mem,size=512M,share=on -machine q35,memory-backend=mem",
            "-chardev socket,id=vsock0,path=/srv/vms/abc/vhost.sock -device vhost-user-vsock-pci,chardev=vsock0",
        ] {
            assert!(hybrid.contains(want), "{want} missing from {hybrid}");
        }
    }

    /// A dead vsock daemon is a fault no retry mends, named with its last log line; a live one
    /// (its command line names the VM's socket) is none.
    #[test]
    #[allow(clippy::disallowed_methods)] // a stand-in daemon, killed and reaped below
    fn vsock_fault_says_when_the_daemon_is_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = VmDir::new(tmp.path(), "vm1");
        std::fs::create_dir_all(dir.path()).unwrap();
        let qemu = Qemu::new("qemu".into(), Accel::Tcg, VsockMode::Hybrid { daemon: "vhost-device-vsock".into() });
        assert!(qemu.vsock_fault(&dir).unwrap().contains("daemon has exited"), "no pid file: no daemon");

        // A stand-in daemon: a process whose command line names the VM's socket.
        std::fs::write(dir.vhost_socket(), b"").unwrap();
        let mut live = std::process::Command::new("tail").arg("-f").arg(dir.vhost_socket()).spawn().unwrap();
        std::fs::write(dir.vsock_pid_file(), format!("{}\n", live.id())).unwrap();
        let started = Instant::now();
        while qemu.vsock_fault(&dir).is_some() {
            assert!(started.elapsed() < Duration::from_secs(5), "a live daemon counts as exited");
            std::thread::sleep(Duration::from_millis(10)); // until the exec shows in /proc
        }

        live.kill().unwrap();
        std::fs::write(dir.path().join("vsock.log"), "[ERROR vhost_device_vsock] boom\n\n").unwrap();
        // Killed but not yet reaped is a zombie: gone all the same.
        let started = Instant::now();
        let fault = loop {
            match qemu.vsock_fault(&dir) {
                Some(fault) => break fault,
                None => assert!(started.elapsed() < Duration::from_secs(5), "the killed daemon still counts as alive"),
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(fault.contains("(vsock.log: [ERROR vhost_device_vsock] boom)"), "{fault}");
        live.wait().unwrap();
        assert!(qemu.vsock_fault(&dir).is_some());
        let unix = Qemu::new("qemu".into(), Accel::Tcg, VsockMode::Unavailable(String::new()));
        assert_eq!(unix.vsock_fault(&dir), None, "no vsock daemon is expected");
    }
}

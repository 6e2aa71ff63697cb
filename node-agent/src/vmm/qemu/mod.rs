//! The QEMU driver: q35 with ACPI (so a graceful stop is a power-button
//! press), direct kernel boot, the serial console appended to the VM's
//! `console.log`, and QMP on a Unix socket in the VM's directory.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub mod qmp;

use super::confine::{Confinement, SANDBOX};
use super::{Accel, BoxFuture, Vmm, VmmError, VsockMode};
use crate::cmd::{self, Confine};
use crate::dir::{CONSOLE_LOG, QMP_SOCKET, VHOST_SOCKET, VSOCK_SOCKET, VmConfig, VmDir};

/// How long QEMU may take from exec to answering QMP with the guest running.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the vsock device daemon may take to create its vhost-user socket.
const VSOCK_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The guest's vsock CID. Each hybrid daemon has its own CID space, so every VM can use 3.
const GUEST_CID: u32 = 3;
/// Kernel vsock CIDs tried before giving up: the host kernel refuses those in use.
const CID_TRIES: u32 = 4096;
/// TCG's translation cache, in MiB: bounded so a guest running much code cannot grow QEMU past
/// its cgroup's memory limit (QEMU's default is up to 1 GiB).
const TCG_TB_MIB: u32 = 128;

#[derive(Debug)]
pub struct Qemu {
    binary: PathBuf,
    accel: Accel,
    vsock: VsockMode,
    confinement: Confinement,
}

/// Descriptors QEMU inherits, named in its argv as `/proc/self/fd/N` (it cannot reach the image
/// directory itself) or as a vhost fd.
struct Inherited {
    /// QEMU's own binary, run as `/proc/self/fd/N`: the VM's uid may not reach where it is.
    binary: File,
    kernel: File,
    initrd: File,
    /// Kernel vsock: the CID the host kernel granted and the vhost-vsock device holding it.
    vhost: Option<(u32, OwnedFd)>,
    /// The VM's disks, in `config.disks` order: a read-only descriptor each, and a read-write
    /// one for disks attached read-write (QEMU opens an image read-only first, then reopens it
    /// for writing, and takes from its fd set the descriptor whose mode matches). QEMU gets them
    /// in an fd set: the VM's uid has no right to the files themselves.
    disks: Vec<(File, Option<File>)>,
}

impl Inherited {
    fn open(binary: &Path, config: &VmConfig, vsock: &VsockMode) -> Result<Inherited, VmmError> {
        let open = |path: &Path| {
            File::open(path).map_err(|e| VmmError::Launch { vmm: "qemu", detail: format!("{}: {e}", path.display()) })
        };
        let vhost = match vsock {
            VsockMode::Kernel => Some(reserve_cid()?),
            _ => None,
        };
        let mut disks = Vec::new();
        for disk in &config.disks {
            let open = |write: bool| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(write)
                    .open(&disk.path)
                    .map_err(|e| VmmError::Launch { vmm: "qemu", detail: format!("disk {}: {e}", disk.path.display()) })
            };
            disks.push((open(false)?, if disk.read_only { None } else { Some(open(true)?) }));
        }
        Ok(Inherited {
            binary: open(binary)?,
            kernel: open(&config.kernel)?,
            initrd: open(&config.initrd)?,
            vhost,
            disks,
        })
    }

    /// Per disk, its descriptors (read-only first).
    fn disk_fds(&self) -> Vec<Vec<RawFd>> {
        self.disks.iter().map(|(ro, rw)| std::iter::once(ro).chain(rw).map(|f| f.as_raw_fd()).collect()).collect()
    }

    /// Kernel, initramfs, then the vhost device if any, as [`Qemu::argv`] expects them.
    fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.kernel.as_raw_fd(), self.initrd.as_raw_fd()];
        fds.extend(self.vhost.as_ref().map(|(_, fd)| fd.as_raw_fd()));
        fds
    }
}

/// Opens /dev/vhost-vsock and asks the host kernel for a guest CID, from 3 up: the kernel
/// refuses one that any VM on this host holds (EADDRINUSE), whoever started it, so the answer
/// is host-wide. The device keeps the CID for QEMU, which gets it as `vhostfd`.
fn reserve_cid() -> Result<(u32, OwnedFd), VmmError> {
    // _IOW(VHOST_VIRTIO 0xAF, 0x60, __u64)
    const VHOST_VSOCK_SET_GUEST_CID: libc::c_ulong = 0x4008_AF60;
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vhost-vsock")
        .map_err(|e| VmmError::Launch { vmm: "qemu", detail: format!("cannot open /dev/vhost-vsock: {e}") })?;
    let fd = OwnedFd::from(device);
    for cid in GUEST_CID..GUEST_CID + CID_TRIES {
        let wanted = u64::from(cid);
        // SAFETY: the ioctl reads one u64 from a pointer to a live local.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), VHOST_VSOCK_SET_GUEST_CID, &wanted as *const u64) };
        if rc == 0 {
            return Ok((cid, fd));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EADDRINUSE) {
            return Err(VmmError::Launch { vmm: "qemu", detail: format!("the host refused vsock CID {cid}: {err}") });
        }
    }
    Err(VmmError::Launch {
        vmm: "qemu",
        detail: format!("vsock CIDs {GUEST_CID}..{} are all in use", GUEST_CID + CID_TRIES),
    })
}

/// Whether `qemu` was built with its seccomp sandbox (`-sandbox` in its help), or why not.
pub fn sandbox_support(qemu: &Path) -> Result<(), String> {
    let binary = qemu.display().to_string();
    match cmd::probe_blocking(&[&binary, "-help"], Duration::from_secs(10)) {
        Some(out) if String::from_utf8_lossy(&out.stdout).contains("-sandbox on") => Ok(()),
        Some(_) => Err(format!("{binary} was built without seccomp (no -sandbox)")),
        None => Err(format!("cannot run `{binary} -help` to see whether it has -sandbox")),
    }
}

impl Qemu {
    pub fn new(binary: PathBuf, accel: Accel, vsock: VsockMode, confinement: Confinement) -> Qemu {
        Qemu { binary, accel, vsock, confinement }
    }

    pub fn confinement(&self) -> &Confinement {
        &self.confinement
    }

    /// Starts the VM's vsock device daemon, confined like the VMM, and waits for its
    /// vhost-user socket.
    async fn start_vsock(&self, dir: &VmDir, daemon: &Path, confine: &Confine) -> Result<(), VmmError> {
        let _ = std::fs::remove_file(dir.vhost_socket());
        let _ = std::fs::remove_file(dir.vsock_socket());
        let vm = format!("guest-cid={GUEST_CID},socket={VHOST_SOCKET},uds-path={VSOCK_SOCKET}");
        // Run from a descriptor opened here: the daemon's uid may not reach where it is
        // installed (~/.cargo/bin under a 0700 home, say).
        let binary = File::open(daemon)
            .map_err(|e| VmmError::Launch { vmm: "qemu", detail: format!("{}: {e}", daemon.display()) })?;
        let argv = [format!("/proc/self/fd/{}", binary.as_raw_fd()), "--vm".into(), vm];
        let confine = Confine { inherit: vec![binary.as_raw_fd()], ..confine.clone() };
        let child = cmd::spawn_detached(&argv, &dir.path().join("vsock.log"), Some(&confine))
            .map_err(|e| VmmError::Launch { vmm: "qemu", detail: crate::errors::chain(&e) })?;
        let pid = child.id().unwrap_or(0);
        let _ = std::fs::write(dir.vsock_pid_file(), format!("{pid}\n"));
        // Reaped by tokio's orphan handling once it exits; `cleanup` kills it with the VM.
        drop(child);
        let started = Instant::now();
        while !dir.vhost_socket().exists() {
            if started.elapsed() > VSOCK_READY_TIMEOUT {
                return Err(VmmError::Launch {
                    vmm: "qemu",
                    detail: format!("the vsock daemon made no socket within {VSOCK_READY_TIMEOUT:?}; see vsock.log"),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// QEMU's command line. It runs in the VM's jail: sockets and console are relative paths,
    /// kernel and initramfs the descriptors `fds` names (kernel, initrd, then the vhost device).
    fn argv(
        &self,
        config: &VmConfig,
        fds: &[RawFd],
        cid: Option<u32>,
        disk_fds: &[Vec<RawFd>],
        tap: Option<RawFd>,
    ) -> Vec<String> {
        let mut argv = vec![self.binary.display().to_string()];
        let mut push = |args: &[&str]| argv.extend(args.iter().map(|s| s.to_string()));
        push(&["-name", &format!("moat-{},process=moat-{}", config.name, config.id)]);
        let accel = match self.accel {
            Accel::Kvm => "kvm".to_string(),
            Accel::Tcg => format!("tcg,tb-size={TCG_TB_MIB}"),
        };
        match &self.vsock {
            VsockMode::Hybrid { .. } => {
                // vhost-user needs the guest's memory shared with the device daemon.
                let mem = format!("memory-backend-memfd,id=mem,size={}M,share=on", config.memory_mib);
                push(&["-object", &mem, "-machine", "q35,memory-backend=mem", "-accel", &accel]);
                let chardev = format!("socket,id=vsock0,path={VHOST_SOCKET}");
                push(&["-chardev", &chardev, "-device", "vhost-user-vsock-pci,chardev=vsock0"]);
            }
            VsockMode::Kernel => {
                push(&["-machine", "q35", "-accel", &accel]);
                let cid = cid.unwrap_or(GUEST_CID);
                let vhost = fds.get(2).map(|fd| format!(",vhostfd={fd}")).unwrap_or_default();
                push(&["-device", &format!("vhost-vsock-pci,guest-cid={cid}{vhost}")]);
            }
            VsockMode::Unavailable(_) => push(&["-machine", "q35", "-accel", &accel]),
        }
        if self.accel == Accel::Kvm {
            push(&["-cpu", "host"]);
        }
        push(&["-smp", &config.vcpus.to_string(), "-m", &format!("{}M", config.memory_mib)]);
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-display", "none"]);
        push(&["-kernel", &format!("/proc/self/fd/{}", fds[0])]);
        push(&["-initrd", &format!("/proc/self/fd/{}", fds[1])]);
        push(&["-append", &config.cmdline]);
        // Disks: fd set i+1 holds disk i's descriptor; the guest finds it by serial moat<i>.
        for (i, (disk, fds)) in config.disks.iter().zip(disk_fds).enumerate() {
            let set = i + 1;
            let readonly = if disk.read_only { "on" } else { "off" };
            for fd in fds {
                push(&["-add-fd", &format!("fd={fd},set={set}")]);
            }
            let drive = format!("file=/dev/fdset/{set},if=none,id=disk{i},format=raw,readonly={readonly}");
            push(&["-drive", &drive, "-device", &format!("virtio-blk-pci,drive=disk{i},serial=moat{i}")]);
        }
        // The network card: virtio-net on the tap moat-node opened on the network's bridge.
        if let (Some(nic), Some(fd)) = (&config.nic, tap) {
            push(&["-netdev", &format!("tap,id=net0,fd={fd}")]);
            push(&["-device", &format!("virtio-net-pci,netdev=net0,mac={}", nic.mac)]);
        }
        let console = format!("file,id=console,path={CONSOLE_LOG},append=on");
        push(&["-chardev", &console, "-serial", "chardev:console"]);
        push(&["-qmp", &format!("unix:{QMP_SOCKET},server=on,wait=off")]);
        if self.confinement.sandbox() {
            push(&["-sandbox", SANDBOX]);
        }
        argv
    }

    /// Supplementary groups QEMU needs: /dev/kvm's group under KVM.
    fn groups(&self) -> Vec<u32> {
        use std::os::unix::fs::MetadataExt;
        match self.accel {
            Accel::Kvm => std::fs::metadata("/dev/kvm").map(|m| vec![m.gid()]).unwrap_or_default(),
            Accel::Tcg => Vec::new(),
        }
    }

    async fn launch_confined(
        &self,
        dir: &VmDir,
        config: &VmConfig,
        tap: Option<OwnedFd>,
    ) -> Result<tokio::process::Child, VmmError> {
        let launch_err = |detail: String| VmmError::Launch { vmm: "qemu", detail };
        let mut confine = self.confinement.enter(dir, config, self.groups()).map_err(launch_err)?;
        let _ = std::fs::remove_file(dir.qmp_socket());
        if let VsockMode::Hybrid { daemon } = &self.vsock {
            self.start_vsock(dir, daemon, &confine).await?;
        }
        let inherited = Inherited::open(&self.binary, config, &self.vsock)?;
        let cid = inherited.vhost.as_ref().map(|(cid, _)| *cid);
        if let Some(cid) = cid {
            std::fs::write(dir.vsock_cid_file(), format!("{cid}\n"))
                .map_err(|e| launch_err(format!("cannot record the vsock CID: {e}")))?;
        }
        confine.inherit = inherited.fds();
        let disk_fds = inherited.disk_fds();
        let tap_fd = tap.as_ref().map(|t| t.as_raw_fd());
        let mut argv = self.argv(config, &confine.inherit, cid, &disk_fds, tap_fd);
        confine.inherit.extend(disk_fds.iter().flatten());
        confine.inherit.extend(tap_fd);
        argv[0] = format!("/proc/self/fd/{}", inherited.binary.as_raw_fd());
        confine.inherit.push(inherited.binary.as_raw_fd());
        let child = cmd::spawn_detached(&argv, &dir.vmm_log(), Some(&confine))
            .map_err(|e| launch_err(crate::errors::chain(&e)))?;
        // QEMU holds its own copies now (the CID stays reserved while it runs, the tap exists
        // while it has it open).
        drop(inherited);
        drop(tap);
        Ok(child)
    }
}

/// Whether process `pid` runs in the VM's jail (its working directory), or, for a VM an older
/// moat-node started, names `legacy` (an absolute path of the VM's) on its command line.
fn runs_for(pid: i32, dir: &VmDir, relative: &str, legacy: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let has = |needle: &str| cmdline.split(|&b| b == 0).any(|arg| String::from_utf8_lossy(arg).contains(needle));
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
    (cwd.as_deref() == Some(dir.jail().as_path()) && has(relative)) || has(&legacy.display().to_string())
}

/// The pid of the vsock device daemon serving the VM in `dir`, if it is alive: it runs in the
/// VM's jail with the VM's socket (pids get reused) and is not a zombie.
fn vsock_daemon(dir: &VmDir) -> Option<i32> {
    let pid = std::fs::read_to_string(dir.vsock_pid_file()).ok()?.trim().parse::<i32>().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the parenthesised command name: "pid (comm) S ...".
    let zombie = stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'));
    let legacy = dir.path().join(VHOST_SOCKET);
    (runs_for(pid, dir, &format!("socket={VHOST_SOCKET}"), &legacy) && !zombie).then_some(pid)
}

impl Vmm for Qemu {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn accel(&self) -> Accel {
        self.accel
    }

    fn protections(&self) -> Vec<moat_tools::Protection> {
        self.confinement.protections()
    }

    fn launch<'a>(
        &'a self,
        dir: &'a VmDir,
        config: &'a VmConfig,
        tap: Option<OwnedFd>,
    ) -> BoxFuture<'a, Result<tokio::process::Child, VmmError>> {
        Box::pin(async move {
            let launched = self.launch_confined(dir, config, tap).await;
            if launched.is_err() {
                self.cleanup(dir);
            }
            launched
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
        self.confinement.release(dir);
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
        // It runs in this VM's jail with a QMP socket there (or names the VM's QMP socket by its
        // absolute path, as QEMU started by an older moat-node does).
        let legacy = PathBuf::from(format!("unix:{},", dir.path().join(QMP_SOCKET).display()));
        runs_for(pid as i32, dir, &format!("unix:{QMP_SOCKET},"), &legacy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::confine::DEFAULT_UID_BASE;

    fn qemu(accel: Accel, vsock: VsockMode) -> Qemu {
        Qemu::new("/usr/bin/qemu-system-x86_64".into(), accel, vsock, Confinement::none("test"))
    }

    #[test]
    fn argv_boots_the_image_with_console_and_qmp_in_the_jail() {
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
            disks: vec![
                crate::dir::Disk {
                    path: "/s/root".into(),
                    read_only: false,
                    mount: "/".into(),
                    workspace: String::new(),
                },
                crate::dir::Disk {
                    path: "/s/data".into(),
                    read_only: true,
                    mount: "data".into(),
                    workspace: "ws-1".into(),
                },
            ],
            nic: None,
        };
        let argv =
            qemu(Accel::Tcg, VsockMode::Unavailable(String::new())).argv(&config, &[7, 8], None, &[], None).join(" ");
        for want in [
            "-accel tcg,tb-size=128",
            "-smp 2 -m 512M",
            "-kernel /proc/self/fd/7 -initrd /proc/self/fd/8",
            "-chardev file,id=console,path=console.log,append=on",
            "-qmp unix:qmp.sock,server=on,wait=off",
            "-no-reboot",
        ] {
            assert!(argv.contains(want), "{want} missing from {argv}");
        }
        assert!(!argv.contains("-cpu host"), "TCG cannot use -cpu host");
        let disks = qemu(Accel::Tcg, VsockMode::Unavailable(String::new()))
            .argv(&config, &[7, 8], None, &[vec![11, 13], vec![12]], None)
            .join(" ");
        for want in [
            "-add-fd fd=11,set=1 -add-fd fd=13,set=1 -drive file=/dev/fdset/1,if=none,id=disk0,format=raw,readonly=off",
            "-device virtio-blk-pci,drive=disk0,serial=moat0",
            "-add-fd fd=12,set=2 -drive file=/dev/fdset/2,if=none,id=disk1,format=raw,readonly=on",
        ] {
            assert!(disks.contains(want), "{want} missing from {disks}");
        }
        let nic = crate::dir::Nic {
            network: "net-1".into(),
            mac: "02:6d:00:00:00:01".into(),
            ip: "10.1.0.2".parse().unwrap(),
            prefix: 24,
            gateway: "10.1.0.1".parse().unwrap(),
            dns: Vec::new(),
        };
        let networked = VmConfig { nic: Some(nic), ..config.clone() };
        let net = qemu(Accel::Tcg, VsockMode::Unavailable(String::new()))
            .argv(&networked, &[7, 8], None, &[], Some(14))
            .join(" ");
        assert!(
            net.contains("-netdev tap,id=net0,fd=14 -device virtio-net-pci,netdev=net0,mac=02:6d:00:00:00:01"),
            "{net}"
        );
        assert!(!argv.contains("-netdev"), "no network card unless the VM has one: {argv}");
        assert!(!argv.contains("-sandbox"), "no sandbox where it is not supported");
        let sandboxed = Qemu::new("/q".into(), Accel::Tcg, VsockMode::Unavailable(String::new()), {
            Confinement::detect(DEFAULT_UID_BASE, Ok(()))
        })
        .argv(&config, &[7, 8], None, &[], None)
        .join(" ");
        assert!(sandboxed.ends_with(&format!("-sandbox {SANDBOX}")), "{sandboxed}");
        let kvm =
            qemu(Accel::Kvm, VsockMode::Unavailable(String::new())).argv(&config, &[7, 8], None, &[], None).join(" ");
        assert!(kvm.contains("-accel kvm -cpu host"), "{kvm}");
        let kernel = qemu(Accel::Tcg, VsockMode::Kernel).argv(&config, &[7, 8, 9], Some(4), &[], None).join(" ");
        assert!(kernel.contains("-device vhost-vsock-pci,guest-cid=4,vhostfd=9"), "{kernel}");
        let hybrid = qemu(Accel::Tcg, VsockMode::Hybrid { daemon: "/d".into() })
            .argv(&config, &[7, 8], None, &[], None)
            .join(" ");
        for want in [
            "-object memory-backend-memfd,id=mem,size=512M,share=on -machine q35,memory-backend=mem",
            "-chardev socket,id=vsock0,path=vhost.sock -device vhost-user-vsock-pci,chardev=vsock0",
        ] {
            assert!(hybrid.contains(want), "{want} missing from {hybrid}");
        }
    }

    /// Where /dev/vhost-vsock opens, the kernel hands out distinct CIDs to two holders.
    #[test]
    fn kernel_cids_come_from_the_host_kernel() {
        if !crate::vmm::detect::kernel_vsock_opens() {
            eprintln!("SKIP: /dev/vhost-vsock cannot be opened here; the hybrid vsock mode is what runs");
            return;
        }
        let (a, _held_a) = reserve_cid().unwrap();
        let (b, _held_b) = reserve_cid().unwrap();
        assert_ne!(a, b, "two devices never hold one CID");
    }

    /// A dead vsock daemon is a fault no retry mends, named with its last log line; a live one
    /// (its command line names the VM's socket) is none.
    #[test]
    #[allow(clippy::disallowed_methods)] // a stand-in daemon, killed and reaped below
    fn vsock_fault_says_when_the_daemon_is_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = VmDir::new(tmp.path(), "vm1");
        std::fs::create_dir_all(dir.path()).unwrap();
        let qemu = qemu(Accel::Tcg, VsockMode::Hybrid { daemon: "vhost-device-vsock".into() });
        assert!(qemu.vsock_fault(&dir).unwrap().contains("daemon has exited"), "no pid file: no daemon");

        // A stand-in daemon: a process in the VM's jail whose command line names its socket.
        std::fs::create_dir_all(dir.jail()).unwrap();
        std::fs::write(dir.jail().join("socket=vhost.sock"), b"").unwrap();
        let mut live = std::process::Command::new("tail")
            .args(["-f", "socket=vhost.sock"])
            .current_dir(dir.jail())
            .spawn()
            .unwrap();
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
        let unix = super::tests::qemu(Accel::Tcg, VsockMode::Unavailable(String::new()));
        assert_eq!(unix.vsock_fault(&dir), None, "no vsock daemon is expected");
    }
}

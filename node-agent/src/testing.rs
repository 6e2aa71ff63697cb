//! Test fixtures shared by the node agent's and the gateway's tests (feature
//! `testing`, enabled only by dev-dependencies): where the guest image is, an
//! images directory holding it, a reaper that kills every VMM and vsock daemon a
//! test's VMs recorded (even when the test fails), and polling with a deadline.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The base guest image the tests boot: `$MOAT_GUEST_IMAGE`, else `target/ci/guest-image`
/// (what `.ci/test` builds). Panics with the command that builds it when it is missing.
pub fn guest_image() -> PathBuf {
    let image = std::env::var_os("MOAT_GUEST_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ci/guest-image"));
    assert!(
        image.join("vmlinux").exists(),
        "no guest image in {}: build it with `moat image build --out {} --guest <static moat-guest>` (as root), \
         or set MOAT_GUEST_IMAGE",
        image.display(),
        image.display()
    );
    image
}

/// `dir/images` with the guest image as `base`, for a node's `--images`.
pub fn images_with_base(dir: &Path) -> PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).expect("the test directory is writable");
    let base = images.join("base");
    if !base.exists() {
        let image = guest_image().canonicalize().expect("the guest image path resolves");
        std::os::unix::fs::symlink(image, &base).expect("the test directory is writable");
    }
    images
}

/// Kills every VMM and vsock device daemon recorded under `<root>/vms` when dropped and removes
/// their cgroups and uid claims, so a failing test leaves no QEMU behind.
#[derive(Debug)]
pub struct VmReaper(pub PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        for entry in std::fs::read_dir(self.0.join("vms")).into_iter().flatten().flatten() {
            for file in ["vmm.pid", "vsock.pid"] {
                let pid =
                    std::fs::read_to_string(entry.path().join(file)).ok().and_then(|s| s.trim().parse::<i32>().ok());
                if let Some(pid) = pid
                    && pid > 0
                {
                    // SAFETY: kill(2) with a pid this test's VMs recorded and a constant signal.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            // Their cgroups and uid claims too (a node that ran them would have released them).
            let dir = crate::dir::VmDir::new(&self.0.join("vms"), &entry.file_name().to_string_lossy());
            crate::vmm::confine::Confinement::detect(crate::vmm::confine::DEFAULT_UID_BASE, Ok(())).release(&dir);
        }
    }
}

/// Polls `check` every 100 ms until it holds; fails the test naming `what` after `deadline`.
pub async fn until(what: &str, deadline: Duration, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether process `pid` exists.
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// A TCP port on loopback nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("loopback has a free port")
}

/// A filesystem of its own for one test: a sparse file on a loop device, formatted and mounted
/// in a temporary directory; unmounted and detached when dropped, even when the test fails.
#[derive(Debug)]
pub struct LoopFs {
    mount: tempfile::TempDir,
    device: String,
    _backing: tempfile::TempDir,
}

impl LoopFs {
    /// A `size_mib` filesystem made by `mkfs` (e.g. "mkfs.btrfs", "mkfs.ext4"). None, with the
    /// reason printed, when this host cannot (not root, no loop devices, no mkfs); under
    /// `CI=true` that is a failure instead.
    pub fn new(mkfs: &str, size_mib: u64) -> Option<LoopFs> {
        match LoopFs::try_new(mkfs, size_mib) {
            Ok(fs) => Some(fs),
            Err(why) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("cannot make a {mkfs} loop filesystem: {why}")
            }
            Err(why) => {
                eprintln!("SKIP: cannot make a {mkfs} loop filesystem here: {why}");
                None
            }
        }
    }

    fn try_new(mkfs: &str, size_mib: u64) -> Result<LoopFs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("loop devices and mount need root".into());
        }
        let run = |argv: &[&str]| -> Result<String, String> {
            let out = crate::cmd::probe_blocking(argv, Duration::from_secs(60))
                .ok_or_else(|| format!("cannot run {}", argv[0]))?;
            if !out.status.success() {
                return Err(format!("{} failed: {}", argv.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let backing = tempfile::tempdir().map_err(|e| e.to_string())?;
        let file = backing.path().join("disk.img");
        std::fs::File::create(&file).and_then(|f| f.set_len(size_mib << 20)).map_err(|e| e.to_string())?;
        let file = file.display().to_string();
        run(&[mkfs, "-q", &file]).or_else(|_| run(&[mkfs, "-F", "-q", &file]))?;
        let device = run(&["losetup", "--find", "--show", &file])?;
        let mount = tempfile::tempdir().map_err(|e| e.to_string())?;
        let target = mount.path().display().to_string();
        if let Err(e) = run(&["mount", &device, &target]) {
            let _ = run(&["losetup", "-d", &device]);
            return Err(e);
        }
        Ok(LoopFs { mount, device, _backing: backing })
    }

    pub fn path(&self) -> &Path {
        self.mount.path()
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let target = self.mount.path().display().to_string();
        for _ in 0..50 {
            let out = crate::cmd::probe_blocking(&["umount", &target], Duration::from_secs(30));
            if out.is_some_and(|o| o.status.success()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = crate::cmd::probe_blocking(&["umount", "-l", &target], Duration::from_secs(30));
        let _ = crate::cmd::probe_blocking(&["losetup", "-d", &self.device], Duration::from_secs(30));
    }
}

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

pub use crate::storage::loopfs::LoopFs;

/// A network namespace made for one test, deleted (with everything in it) when dropped.
#[derive(Debug)]
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: String) -> Netns {
        let _ = crate::cmd::probe_blocking(&["ip", "netns", "del", &name], Duration::from_secs(10));
        for argv in [vec!["ip", "netns", "add", &name], vec!["ip", "-n", &name, "link", "set", "lo", "up"]] {
            let out = crate::cmd::probe_blocking(&argv, Duration::from_secs(10));
            assert!(out.is_some_and(|o| o.status.success()), "{} failed", argv.join(" "));
        }
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = crate::cmd::probe_blocking(&["ip", "netns", "del", &self.0], Duration::from_secs(10));
    }
}

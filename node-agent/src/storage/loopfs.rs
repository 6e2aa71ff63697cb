//! A filesystem of its own for one test (btrfs, ext4) on a loop device; under `cfg(test)` for
//! this module's tests and feature `testing` for everyone else's (as `moat_node::testing::LoopFs`).

use std::path::Path;
use std::time::Duration;

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

    /// The loop device it is on, e.g. "/dev/loop3".
    pub fn device(&self) -> &str {
        &self.device
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

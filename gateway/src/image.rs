//! `moat image build`: the default guest image, built by the recipe in
//! `service-vms/base` (embedded in the binary, so it works from any
//! directory). The recipe is idempotent: an up-to-date image is left alone.
//! moat never builds or downloads images on its own: `moat serve` only says
//! what is missing.

use std::path::Path;

use anyhow::Context;

const BUILD_SH: &str = include_str!("../../service-vms/base/build.sh");
const INIT: &str = include_str!("../../service-vms/base/init");
const MODULES: &str = include_str!("../../service-vms/base/modules");
const DEBIAN_SH: &str = include_str!("../../service-vms/debian/build.sh");

/// Runs the Debian recipe (`service-vms/debian/build.sh`, embedded) into `out`: debootstrap of
/// Debian stable (minbase) with python3, git, ca-certificates, iproute2 and `packages`, made
/// into `out/rootfs.ext4` with `mke2fs -d`. Idempotent: a stamp of the inputs skips the work.
pub fn build_debian(out: &Path, packages: &[String]) -> anyhow::Result<std::path::PathBuf> {
    let staged = tempfile::tempdir().context("cannot stage the image recipe")?;
    let script = staged.path().join("build.sh");
    std::fs::write(&script, DEBIAN_SH).with_context(|| format!("cannot write {}", script.display()))?;
    // The operator runs this in the foreground; its output is the progress report.
    #[allow(clippy::disallowed_methods)]
    let status = std::process::Command::new("bash")
        .arg(&script)
        .arg(out)
        .arg(packages.join(","))
        .status()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !status.success() {
        anyhow::bail!("building the Debian image into {} failed ({status}); the output above says why", out.display());
    }
    Ok(out.join("rootfs.ext4"))
}

/// Runs the recipe (`recipe/build.sh`, or the embedded copy) to build the image into `out`.
pub fn build(recipe: Option<&Path>, out: &Path, guest: Option<&Path>) -> anyhow::Result<()> {
    let staged;
    let dir = match recipe {
        Some(dir) => dir,
        None => {
            staged = tempfile::tempdir().context("cannot stage the image recipe")?;
            for (name, text, mode) in
                [("build.sh", BUILD_SH, 0o755), ("init", INIT, 0o755), ("modules", MODULES, 0o644)]
            {
                use std::os::unix::fs::PermissionsExt;
                let path = staged.path().join(name);
                std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            }
            staged.path()
        }
    };
    let script = dir.join("build.sh");
    // The operator runs this in the foreground; its output is the progress report.
    #[allow(clippy::disallowed_methods)]
    let mut command = std::process::Command::new("bash");
    command.arg(&script).arg(out);
    if let Some(guest) = guest {
        command.arg(guest);
    }
    let status = command.status().with_context(|| format!("cannot run {}", script.display()))?;
    if !status.success() {
        anyhow::bail!("building the image into {} failed ({status}); the output above says why", out.display());
    }
    Ok(())
}

/// Whether `dir` holds a bootable image; if not, what to run.
pub fn check(dir: &Path) -> Result<(), String> {
    if dir.join("vmlinux").is_file() && dir.join("initramfs.cpio.gz").is_file() {
        return Ok(());
    }
    Err(format!(
        "no guest image in {}: VMs cannot start until you run `moat image build` (as root; it downloads \
         Debian's kernel package with apt-get)",
        dir.display()
    ))
}

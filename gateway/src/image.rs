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
const GIT_SH: &str = include_str!("../../service-vms/git/build.sh");
const GIT_HTTP: &str = include_str!("../../service-vms/git/git-http.py");
const GIT_SERVICE: &str = include_str!("../../service-vms/git/service");
const PORTAL_SH: &str = include_str!("../../service-vms/portal/build.sh");

/// Writes `files` (name, text, mode) into a fresh directory, for running an embedded recipe.
fn stage(files: &[(&str, &str, u32)]) -> anyhow::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let staged = tempfile::tempdir().context("cannot stage the image recipe")?;
    for (name, text, mode) in files {
        let path = staged.path().join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))?;
    }
    Ok(staged)
}

/// Runs `script` with `args` in the foreground (its output is the operator's progress report).
fn run_recipe(script: &Path, args: &[&std::ffi::OsStr], what: &str, out: &Path) -> anyhow::Result<()> {
    #[allow(clippy::disallowed_methods)]
    let status = std::process::Command::new("bash")
        .arg(script)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !status.success() {
        anyhow::bail!("building the {what} into {} failed ({status}); the output above says why", out.display());
    }
    Ok(())
}

/// Runs the Debian recipe (`service-vms/debian/build.sh`, embedded) into `out`: debootstrap of
/// Debian stable (minbase) with python3, git, ca-certificates, iproute2 and `packages`, made
/// into `out/rootfs.ext4` with `mke2fs -d`. Idempotent: a stamp of the inputs skips the work.
pub fn build_debian(out: &Path, packages: &[String]) -> anyhow::Result<std::path::PathBuf> {
    let staged = stage(&[("build.sh", DEBIAN_SH, 0o755)])?;
    let packages = packages.join(",");
    run_recipe(&staged.path().join("build.sh"), &[out.as_os_str(), packages.as_ref()], "Debian image", out)?;
    Ok(out.join("rootfs.ext4"))
}

/// Runs the git service VM recipe (`service-vms/git/build.sh`, embedded) into `out` from the
/// Debian image `debian`: `out/rootfs.ext4` (Debian plus moat's git front, started by the init)
/// and `out/data.ext4` (empty: the repositories' workspace is made from it). Idempotent.
pub fn build_git(out: &Path, debian: &Path) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let staged =
        stage(&[("build.sh", GIT_SH, 0o755), ("git-http.py", GIT_HTTP, 0o755), ("service", GIT_SERVICE, 0o755)])?;
    run_recipe(&staged.path().join("build.sh"), &[out.as_os_str(), debian.as_os_str()], "git image", out)?;
    Ok((out.join("rootfs.ext4"), out.join("data.ext4")))
}

/// Runs the portal recipe (`service-vms/portal/build.sh`, embedded) into `out` from the Debian
/// image `debian`: `out/rootfs.ext4` with Node 24 and OpenClaw (from the npm prefix `openclaw`,
/// or installed with npm when `None`), configured with moat as its MCP server. Idempotent.
pub fn build_portal(out: &Path, debian: &Path, openclaw: Option<&Path>) -> anyhow::Result<std::path::PathBuf> {
    let staged = stage(&[("build.sh", PORTAL_SH, 0o755)])?;
    let mut args = vec![out.as_os_str(), debian.as_os_str()];
    if let Some(prefix) = openclaw {
        args.push(prefix.as_os_str());
    }
    run_recipe(&staged.path().join("build.sh"), &args, "portal image", out)?;
    Ok(out.join("rootfs.ext4"))
}

/// Runs the recipe (`recipe/build.sh`, or the embedded copy) to build the image into `out`.
pub fn build(recipe: Option<&Path>, out: &Path, guest: Option<&Path>) -> anyhow::Result<()> {
    let staged;
    let dir = match recipe {
        Some(dir) => dir,
        None => {
            staged = stage(&[("build.sh", BUILD_SH, 0o755), ("init", INIT, 0o755), ("modules", MODULES, 0o644)])?;
            staged.path()
        }
    };
    let mut args = vec![out.as_os_str()];
    if let Some(guest) = guest {
        args.push(guest.as_os_str());
    }
    run_recipe(&dir.join("build.sh"), &args, "image", out)
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

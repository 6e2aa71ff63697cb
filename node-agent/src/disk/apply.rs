//! The node's authoritative gate and its two appliers. One layout at a time: each apply takes a
//! fresh snapshot, classifies the exact generation it was given, and only then writes:
//! `direct` with sfdisk and mkfs (then re-probes and checks the disks match the layout), `disko`
//! by writing the rendered expression atomically and running an optional rebuild command. The
//! answer for each layout's last generation is kept on disk, so a generation asked again (the
//! gateway restarted before it heard) is answered, not applied twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use moat_tools::disk::{
    DiskApplier, DiskLayout, DiskManagement, DiskSnapshot, Filesystem, LayoutPhase, Refusal, RefusalCode,
};
use serde::{Deserialize, Serialize};

use super::plan::{self, DiskPlan, LayoutPlan};
use super::probe::{self, MoatPath};
use crate::cmd;

const MKFS: Duration = Duration::from_secs(600);
const PARTITIONS_APPEAR: Duration = Duration::from_secs(10);

/// How this node treats layouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSettings {
    pub management: DiskManagement,
    pub applier: DiskApplier,
    /// Where the disko applier writes the expression.
    pub disko_path: PathBuf,
    /// Run after the disko file is written (e.g. `nixos-rebuild switch`); none by default.
    pub rebuild: Vec<String>,
    pub rebuild_timeout: Duration,
    /// The answers kept per layout.
    pub state_file: PathBuf,
}

impl DiskSettings {
    /// Installer-only (plans, never applies), direct applier, answers kept under `storage_root`.
    pub fn new(storage_root: &Path) -> DiskSettings {
        DiskSettings {
            management: DiskManagement::InstallerOnly,
            applier: DiskApplier::Direct,
            disko_path: PathBuf::from("/etc/moat/disk/current.nix"),
            rebuild: Vec::new(),
            rebuild_timeout: Duration::from_secs(1800),
            state_file: storage_root.join("disk").join("layouts.json"),
        }
    }
}

impl DiskSettings {
    /// Settings from an operator's words: `management` "installer-only" (default) or
    /// "controller-managed", `applier` "direct" (default) or "disko", where the disko file goes,
    /// and the rebuild command (split on whitespace, run without a shell).
    pub fn configure(
        storage_root: &Path,
        management: Option<&str>,
        applier: Option<&str>,
        disko_path: Option<PathBuf>,
        rebuild: Option<&str>,
    ) -> Result<DiskSettings, String> {
        let mut settings = DiskSettings::new(storage_root);
        settings.management = match management.unwrap_or("installer-only") {
            "installer-only" => DiskManagement::InstallerOnly,
            "controller-managed" => DiskManagement::ControllerManaged,
            other => return Err(format!("disk management `{other}` is not installer-only or controller-managed")),
        };
        settings.applier = match applier.unwrap_or("direct") {
            "direct" => DiskApplier::Direct,
            "disko" => DiskApplier::Disko,
            other => return Err(format!("disk applier `{other}` is not direct or disko")),
        };
        if let Some(path) = disko_path {
            if !path.is_absolute() {
                return Err(format!("the disko path {} must be absolute", path.display()));
            }
            settings.disko_path = path;
        }
        settings.rebuild = rebuild.unwrap_or_default().split_whitespace().map(str::to_string).collect();
        Ok(settings)
    }
}

/// What the node did with one generation of one layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    pub generation: u64,
    /// Applied, Refused or Failed.
    pub phase: LayoutPhase,
    /// A refusal code, or "apply_failed" / "invalid_layout" / "probe_failed"; empty when applied.
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub refusals: Vec<Refusal>,
}

impl ApplyReport {
    fn refused(generation: u64, code: RefusalCode, message: String, refusals: Vec<Refusal>) -> ApplyReport {
        ApplyReport { generation, phase: LayoutPhase::Refused, code: code.as_str().into(), message, refusals }
    }

    fn failed(generation: u64, code: &str, message: String) -> ApplyReport {
        ApplyReport { generation, phase: LayoutPhase::Failed, code: code.into(), message, refusals: Vec::new() }
    }
}

/// The node's disk layouts: settings, the kept answers, and the one-at-a-time lock.
#[derive(Debug)]
pub struct Disks {
    node: String,
    settings: DiskSettings,
    lock: tokio::sync::Mutex<()>,
}

impl Disks {
    pub fn new(node: &str, settings: DiskSettings) -> Disks {
        Disks { node: node.to_string(), settings, lock: tokio::sync::Mutex::new(()) }
    }

    pub fn settings(&self) -> &DiskSettings {
        &self.settings
    }

    pub async fn snapshot(&self, moat_paths: &[MoatPath]) -> Result<DiskSnapshot, probe::ProbeError> {
        probe::snapshot(&self.node, moat_paths).await
    }

    fn answers(&self) -> BTreeMap<String, ApplyReport> {
        std::fs::read(&self.settings.state_file)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    fn keep(&self, name: &str, report: &ApplyReport) {
        let mut answers = self.answers();
        answers.insert(name.to_string(), report.clone());
        let written = self.settings.state_file.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| {
            let bytes = serde_json::to_vec_pretty(&answers).map_err(std::io::Error::other)?;
            crate::dir::write_atomic(&self.settings.state_file, &bytes)
        });
        if let Err(e) = written {
            tracing::error!(
                layout = name,
                "cannot keep the answer for this layout: {e}; a repeated request applies again"
            );
        }
    }

    /// Applies generation `generation` of `layout`, or answers as before when
    /// this generation (or a later one) was already handled.
    pub async fn apply(&self, layout: &DiskLayout, generation: u64, moat_paths: &[MoatPath]) -> ApplyReport {
        let _one_at_a_time = self.lock.lock().await;
        let name = &layout.metadata.name;
        if let Some(kept) = self.answers().remove(name)
            && kept.generation >= generation
        {
            tracing::info!(layout = %name, generation, "generation already handled; answering as before");
            return kept;
        }
        let report = self.apply_once(layout, generation, moat_paths).await;
        tracing::info!(layout = %name, generation, phase = report.phase.as_str(), code = %report.code, "disk layout");
        self.keep(name, &report);
        report
    }

    async fn apply_once(&self, layout: &DiskLayout, generation: u64, moat_paths: &[MoatPath]) -> ApplyReport {
        if self.settings.management == DiskManagement::InstallerOnly {
            return ApplyReport::refused(
                generation,
                RefusalCode::InstallerOnly,
                format!(
                    "node {} is installer-only: moat plans layouts for it but does not apply them; start \
                     moat-node with --disk-management controller-managed to let moat apply",
                    self.node
                ),
                Vec::new(),
            );
        }
        // The authoritative verdict: a snapshot taken now, the same classifier.
        let snap = match self.snapshot(moat_paths).await {
            Ok(snap) => snap,
            Err(e) => return ApplyReport::failed(generation, "probe_failed", crate::errors::chain(&e)),
        };
        let plan = match plan::plan(layout, &snap) {
            Ok(plan) => plan,
            Err(e) => return ApplyReport::failed(generation, "invalid_layout", e.to_string()),
        };
        if !plan.is_safe() {
            let code = plan.refusals[0].code;
            let message = plan.refusals.iter().map(|r| r.detail.clone()).collect::<Vec<_>>().join("; ");
            return ApplyReport::refused(generation, code, message, plan.refusals);
        }
        let done = match self.settings.applier {
            DiskApplier::Direct => self.direct(&plan, moat_paths).await,
            DiskApplier::Disko => self.disko(layout).await,
        };
        match done {
            Ok(()) => ApplyReport {
                generation,
                phase: LayoutPhase::Applied,
                code: String::new(),
                message: String::new(),
                refusals: Vec::new(),
            },
            Err(message) => ApplyReport::failed(generation, "apply_failed", message),
        }
    }

    async fn direct(&self, plan: &LayoutPlan, moat_paths: &[MoatPath]) -> Result<(), String> {
        for disk in &plan.disks {
            partition(disk).await?;
            for part in &disk.partitions {
                if let Some(argv) = plan::mkfs_argv(part) {
                    run_ok(&argv, None, MKFS).await?;
                }
            }
        }
        let after = self.snapshot(moat_paths).await.map_err(|e| format!("cannot check the result: {e}"))?;
        plan.disks.iter().try_for_each(|disk| matches(disk, &after))
    }

    async fn disko(&self, layout: &DiskLayout) -> Result<(), String> {
        let text = super::disko::render(layout).map_err(|e| e.to_string())?;
        let path = &self.settings.disko_path;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        }
        crate::dir::write_atomic(path, text.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        if !self.settings.rebuild.is_empty() {
            run_ok(&self.settings.rebuild, None, self.settings.rebuild_timeout).await?;
        }
        Ok(())
    }
}

/// Runs `argv`; its stderr (last lines) is the error when it fails.
async fn run_ok(argv: &[String], input: Option<&[u8]>, timeout: Duration) -> Result<(), String> {
    let output = cmd::run_with_input(argv, input, timeout).await.map_err(|e| crate::errors::chain(&e))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
    Err(format!(
        "`{}` failed ({}): {}",
        argv.join(" "),
        output.status,
        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
    ))
}

/// Writes a new GPT with exactly `disk`'s partitions and has the kernel show them: sfdisk asks it
/// to re-read the table, and `partx -u` tells it each partition directly (BLKPG), which also
/// works where the kernel parses no partition tables itself.
async fn partition(disk: &DiskPlan) -> Result<(), String> {
    let dev = format!("/dev/{}", disk.device);
    let argv: Vec<String> =
        ["sfdisk", "--quiet", "--wipe", "always", "--wipe-partitions", "always", &dev].map(String::from).into();
    run_ok(&argv, Some(plan::sfdisk_script(disk).as_bytes()), Duration::from_secs(60)).await?;
    run_ok(&["partx".to_string(), "-u".to_string(), dev.clone()], None, Duration::from_secs(30)).await?;
    let deadline = std::time::Instant::now() + PARTITIONS_APPEAR;
    while std::time::Instant::now() < deadline {
        if disk.partitions.iter().all(|p| Path::new("/dev").join(&p.device).exists()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "the partition table was written but the kernel does not show the partitions of {dev} (a loop device \
         needs partition scanning: losetup -P)"
    ))
}

/// Whether the re-probed `after` shows exactly `disk`'s partitions and filesystems.
fn matches(disk: &DiskPlan, after: &DiskSnapshot) -> Result<(), String> {
    let mut parts: Vec<_> =
        after.devices.iter().filter(|d| d.parent.as_deref() == Some(disk.device.as_str())).collect();
    parts.sort_by_key(|d| d.partn);
    if parts.len() != disk.partitions.len() {
        return Err(format!(
            "/dev/{} shows {} partitions after applying, the layout has {}",
            disk.device,
            parts.len(),
            disk.partitions.len()
        ));
    }
    for (want, got) in disk.partitions.iter().zip(parts) {
        let fstype = match want.filesystem {
            Filesystem::None => "",
            fs => fs.as_str(),
        };
        let checks = [
            ("name", got.name == want.device, got.name.clone()),
            ("start", got.start_sector.map(|s| s * 512) == Some(want.start), format!("{:?}", got.start_sector)),
            ("size", got.size_bytes == want.size, got.size_bytes.to_string()),
            ("filesystem", got.fstype == fstype, got.fstype.clone()),
            ("label", got.label == want.label.clone().unwrap_or_default(), got.label.clone()),
            ("partition name", got.partlabel == want.name.clone().unwrap_or_default(), got.partlabel.clone()),
        ];
        if let Some((what, _, seen)) = checks.into_iter().find(|(_, ok, _)| !ok) {
            return Err(format!(
                "/dev/{}: its {what} is `{seen}` after applying, not what the layout says",
                want.device
            ));
        }
    }
    Ok(())
}

//! Walls around each VM's processes (its VMM and its vsock device daemon), the
//! way Firecracker's jailer and libvirt build them:
//!
//! * a uid of its own, taken host-wide from a range (claims under
//!   `/run/moat/vm-uids`, so two nodes on one host never share one);
//! * a cgroup of its own (`moat/vm-<id>-<uid>`; v2, or v1's memory, cpu and pids
//!   hierarchies) with memory, CPU and pids limits derived from the VM's size;
//! * a working directory only that uid can enter (`jail/`, 0700), entered
//!   before privileges are dropped, so the processes reach their sockets and
//!   console by relative path and nothing above it: not the node's files, not
//!   other VMs'. Kernel and initramfs arrive as inherited descriptors.
//!
//! QEMU adds its own seccomp filter (`-sandbox`, see [`SANDBOX`]). A protection
//! this host cannot give (moat-node not root, no writable cgroup hierarchy, a
//! QEMU built without seccomp) is left out and said so by [`Confinement::protections`];
//! VMs still run. What a running VM's process actually has is read back from
//! the host by [`observe`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use moat_tools::Protection;

use crate::cmd::Confine;
use crate::dir::{VmConfig, VmDir};

/// The first uid (and gid) handed to VMs unless the operator names another; 65,536 follow.
pub const DEFAULT_UID_BASE: u32 = 2_000_000;
const UID_SLOTS: u32 = 65_536;
/// Host-wide claims on VM uids: one file per uid in use, whichever node started the VM.
const UID_CLAIMS: &str = "/run/moat/vm-uids";
/// A claim whose uid runs no process and is older than this was left by a node that died.
const CLAIM_GRACE: Duration = Duration::from_secs(60);
/// QEMU's seccomp filter, as libvirt asks for it.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// Memory a VM's processes may use beyond the guest's RAM: QEMU itself, device state, TCG's
/// translation cache (bounded by the QEMU driver), the vsock daemon.
pub const MEMORY_OVERHEAD_MIB: u64 = 384;
const PIDS_MAX: u64 = 256;
const CPU_PERIOD_US: u64 = 100_000;
const CGROUP_FS: &str = "/sys/fs/cgroup";
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// The file beside the VM's config that names its uid while it holds one.
const UID_FILE: &str = "vmm.uid";

/// What this node can do to confine VMs, decided once at start.
#[derive(Debug, Clone)]
pub struct Confinement {
    /// The first VM uid, or why VMs run as moat-node's own user.
    uids: Result<u32, String>,
    /// Whether the VMM's own seccomp filter is on, or why not.
    sandbox: Result<(), String>,
    cgroups: Result<Cgroups, String>,
    claims: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Cgroups {
    /// `<unified>/moat`, with the three controllers enabled for its children.
    V2(PathBuf),
    /// `<fs>/<controller>/moat` for each of [`CONTROLLERS`].
    V1(Vec<PathBuf>),
}

/// The limits of one VM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    /// CPU time per [`CPU_PERIOD_US`].
    pub cpu_quota_us: u64,
    pub pids: u64,
}

impl Limits {
    /// The guest's RAM plus [`MEMORY_OVERHEAD_MIB`]; one CPU per vCPU plus one for QEMU's main
    /// loop and I/O; [`PIDS_MAX`] threads.
    pub fn for_vm(config: &VmConfig) -> Limits {
        Limits {
            memory_bytes: (config.memory_mib + MEMORY_OVERHEAD_MIB) * 1024 * 1024,
            cpu_quota_us: (u64::from(config.vcpus) + 1) * CPU_PERIOD_US,
            pids: PIDS_MAX,
        }
    }
}

impl Confinement {
    /// What this host allows: per-VM uids from `uid_base` when moat-node is root, a cgroup per
    /// VM where a hierarchy is writable, and the VMM's seccomp filter as `sandbox` says.
    pub fn detect(uid_base: u32, sandbox: Result<(), String>) -> Confinement {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let uids = if euid == 0 {
            Ok(uid_base)
        } else {
            Err(format!("moat-node runs as uid {euid}, not root, so VMs run as that user too"))
        };
        let cgroups =
            if euid == 0 { detect_cgroups(Path::new(CGROUP_FS)) } else { Err("moat-node is not root".into()) };
        if let Err(why) = &cgroups {
            tracing::warn!("VMs get no cgroup limits: {why}");
        }
        Confinement { uids, sandbox, cgroups, claims: PathBuf::from(UID_CLAIMS) }
    }

    /// Nothing but the working directory: for tests of other layers.
    pub fn none(why: &str) -> Confinement {
        Confinement {
            uids: Err(why.into()),
            sandbox: Err(why.into()),
            cgroups: Err(why.into()),
            claims: PathBuf::from(UID_CLAIMS),
        }
    }

    /// Whether the VMM should add its seccomp filter.
    pub fn sandbox(&self) -> bool {
        self.sandbox.is_ok()
    }

    /// What this node applies to every VM, and what it cannot.
    pub fn protections(&self) -> Vec<Protection> {
        let user = match &self.uids {
            Ok(base) => Protection::on("user", format!("a uid of its own per VM, from {base}")),
            Err(why) => Protection::off("user", why.clone()),
        };
        let seccomp = match &self.sandbox {
            Ok(()) => Protection::on("seccomp", format!("QEMU -sandbox {SANDBOX}")),
            Err(why) => Protection::off("seccomp", why.clone()),
        };
        let cgroup = match &self.cgroups {
            Ok(c) => Protection::on(
                "cgroup",
                format!(
                    "{}: memory = guest RAM + {MEMORY_OVERHEAD_MIB} MiB, CPU = vCPUs + 1, {PIDS_MAX} pids",
                    c.describe()
                ),
            ),
            Err(why) => Protection::off("cgroup", why.clone()),
        };
        let files = match &self.uids {
            Ok(_) => Protection::on("files", "each VM's processes reach only its jail/ (0700, their own uid)"),
            Err(_) => Protection::off("files", "VMs share moat-node's uid, so each can reach the others' files"),
        };
        vec![user, seccomp, cgroup, files]
    }

    /// Prepares the VM's jail for a start: its directory owned by a freshly claimed uid, its
    /// cgroup with [`Limits::for_vm`]. Returns how to spawn its processes.
    pub fn enter(&self, dir: &VmDir, config: &VmConfig, groups: Vec<u32>) -> Result<Confine, String> {
        let jail = dir.jail();
        make_private_dir(&jail).map_err(|e| format!("cannot make {}: {e}", jail.display()))?;
        let user = match &self.uids {
            Ok(base) => {
                let uid = self.claim_uid(*base, dir)?;
                chown_tree(&jail, uid).map_err(|e| format!("cannot give {} to uid {uid}: {e}", jail.display()))?;
                Some((uid, groups))
            }
            Err(_) => None,
        };
        let cgroup_procs = match (&self.cgroups, &user) {
            (Ok(cgroups), Some((uid, _))) => cgroups.create(&cgroup_name(&config.id, *uid), Limits::for_vm(config))?,
            _ => Vec::new(),
        };
        Ok(Confine { cwd: jail, user, cgroup_procs, inherit: Vec::new() })
    }

    /// After the VM's processes exited: its cgroup removed, its uid given back.
    pub fn release(&self, dir: &VmDir) {
        let uid_file = dir.path().join(UID_FILE);
        if let Some(uid) = std::fs::read_to_string(&uid_file).ok().and_then(|s| s.trim().parse::<u32>().ok()) {
            if let (Ok(cgroups), Some(id)) = (&self.cgroups, dir.path().file_name().and_then(|n| n.to_str())) {
                cgroups.remove(&cgroup_name(id, uid));
            }
            let claim = self.claims.join(uid.to_string());
            if std::fs::read_to_string(&claim).is_ok_and(|owner| Path::new(owner.trim()) == dir.path()) {
                let _ = std::fs::remove_file(claim);
            }
        }
        let _ = std::fs::remove_file(uid_file);
    }

    /// Takes the lowest free uid from `base` for the VM in `dir`: no process runs as it and no
    /// live claim holds it. The claim file is made with O_EXCL, so two nodes racing for one
    /// uid get two.
    fn claim_uid(&self, base: u32, dir: &VmDir) -> Result<u32, String> {
        std::fs::create_dir_all(&self.claims)
            .map_err(|e| format!("cannot make the uid claims directory {}: {e}", self.claims.display()))?;
        let busy = uids_in_use();
        for uid in (base..base.saturating_add(UID_SLOTS)).filter(|u| !busy.contains(u)) {
            let claim = self.claims.join(uid.to_string());
            for _ in 0..2 {
                match std::fs::OpenOptions::new().write(true).create_new(true).open(&claim) {
                    Ok(mut file) => {
                        use std::io::Write;
                        writeln!(file, "{}", dir.path().display())
                            .and_then(|()| std::fs::write(dir.path().join(UID_FILE), format!("{uid}\n")))
                            .map_err(|e| format!("cannot record uid {uid}: {e}"))?;
                        return Ok(uid);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let age =
                            std::fs::metadata(&claim).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                        if age.is_some_and(|age| age > CLAIM_GRACE) {
                            let _ = std::fs::remove_file(&claim); // left by a node that died; retry it
                            continue;
                        }
                        break;
                    }
                    Err(e) => return Err(format!("cannot claim uid {uid} in {}: {e}", self.claims.display())),
                }
            }
        }
        Err(format!("all {UID_SLOTS} VM uids from {base} are in use"))
    }
}

impl Cgroups {
    fn describe(&self) -> String {
        match self {
            Cgroups::V2(root) => format!("cgroup v2 under {}", root.display()),
            Cgroups::V1(roots) => {
                let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
                format!("cgroup v1 under {}", roots.join(", "))
            }
        }
    }

    /// Makes `name` with `limits`; returns its cgroup.procs files.
    fn create(&self, name: &str, limits: Limits) -> Result<Vec<PathBuf>, String> {
        let quota = format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us);
        let writes: Vec<(PathBuf, Vec<(&str, String)>)> = match self {
            Cgroups::V2(root) => vec![(
                root.join(name),
                vec![
                    ("memory.max", limits.memory_bytes.to_string()),
                    ("memory.swap.max", "0".into()),
                    ("cpu.max", quota),
                    ("pids.max", limits.pids.to_string()),
                ],
            )],
            Cgroups::V1(roots) => roots
                .iter()
                .map(|root| {
                    let files = match root.parent().and_then(Path::file_name).and_then(|n| n.to_str()) {
                        Some("memory") => vec![
                            ("memory.limit_in_bytes", limits.memory_bytes.to_string()),
                            ("memory.memsw.limit_in_bytes", limits.memory_bytes.to_string()),
                        ],
                        Some("cpu") => vec![
                            ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                            ("cpu.cfs_quota_us", limits.cpu_quota_us.to_string()),
                        ],
                        _ => vec![("pids.max", limits.pids.to_string())],
                    };
                    (root.join(name), files)
                })
                .collect(),
        };
        let mut procs = Vec::new();
        for (dir, files) in writes {
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("cannot make cgroup {}: {e}", dir.display())),
            }
            for (file, value) in files {
                let path = dir.join(file);
                // Swap accounting is optional in both versions: no file, no swap to limit.
                if file.contains("swap") || file.contains("memsw") {
                    if path.exists() {
                        let _ = std::fs::write(&path, &value);
                    }
                    continue;
                }
                std::fs::write(&path, &value).map_err(|e| format!("cannot set {} to {value}: {e}", path.display()))?;
            }
            procs.push(dir.join("cgroup.procs"));
        }
        Ok(procs)
    }

    /// Removes `name`, waiting briefly for killed processes to leave it.
    fn remove(&self, name: &str) {
        let dirs: Vec<PathBuf> = match self {
            Cgroups::V2(root) => vec![root.join(name)],
            Cgroups::V1(roots) => roots.iter().map(|r| r.join(name)).collect(),
        };
        for dir in dirs {
            for _ in 0..100 {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            if dir.exists() {
                tracing::warn!(cgroup = %dir.display(), "cannot remove the VM's cgroup: a process is still in it");
            }
        }
    }
}

/// A VM's cgroup under `moat/`: its id (readable) and its uid (unique on the host: two nodes
/// may both have a VM with one id).
fn cgroup_name(id: &str, uid: u32) -> String {
    format!("vm-{id}-{uid}")
}

/// Finds a writable hierarchy with memory, cpu and pids: v2 when `fs` is the unified one,
/// else v1's per-controller mounts. Makes `moat` in it.
fn detect_cgroups(fs: &Path) -> Result<Cgroups, String> {
    let controllers = fs.join("cgroup.controllers");
    if let Ok(available) = std::fs::read_to_string(&controllers) {
        let missing: Vec<&str> =
            CONTROLLERS.iter().copied().filter(|c| !available.split_whitespace().any(|a| a == *c)).collect();
        if !missing.is_empty() {
            return Err(format!("cgroup v2 at {} lacks the {} controller(s)", fs.display(), missing.join(", ")));
        }
        let root = fs.join("moat");
        let enable = CONTROLLERS.map(|c| format!("+{c}")).join(" ");
        let _ = std::fs::write(fs.join("cgroup.subtree_control"), &enable);
        mkdir_ok(&root)?;
        std::fs::write(root.join("cgroup.subtree_control"), &enable)
            .map_err(|e| format!("cannot enable {enable} in {}: {e} (no cgroup delegation?)", root.display()))?;
        return Ok(Cgroups::V2(root));
    }
    let mut roots = Vec::new();
    for controller in CONTROLLERS {
        let mount = fs.join(controller);
        if !mount.join("cgroup.procs").exists() {
            return Err(format!("no cgroup v2 at {} and no v1 {controller} hierarchy", fs.display()));
        }
        let root = mount.join("moat");
        mkdir_ok(&root)?;
        roots.push(root);
    }
    Ok(Cgroups::V1(roots))
}

fn mkdir_ok(dir: &Path) -> Result<(), String> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("cannot make cgroup {}: {e}", dir.display())),
    }
}

fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Gives `dir` and what is in it to `uid` (the uid of an earlier run may differ).
fn chown_tree(dir: &Path, uid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(dir, Some(uid), Some(uid))?;
    for entry in std::fs::read_dir(dir)? {
        std::os::unix::fs::lchown(entry?.path(), Some(uid), Some(uid))?;
    }
    Ok(())
}

/// Real uids of every process on the host.
fn uids_in_use() -> HashSet<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter_map(|e| status_field(&std::fs::read_to_string(e.path().join("status")).ok()?, "Uid:"))
        .collect()
}

/// The first number of a `/proc/PID/status` line.
fn status_field(status: &str, key: &str) -> Option<u32> {
    status.lines().find_map(|l| l.strip_prefix(key))?.split_whitespace().next()?.parse().ok()
}

/// The protections process `pid` (the VM's VMM) has, read from the host: its uid, its seccomp
/// mode, its cgroup and limits, who owns its jail.
pub fn observe(pid: u32, dir: &VmDir) -> Vec<Protection> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return Vec::new() };
    let uid = status_field(&status, "Uid:");
    let user = match uid {
        Some(0) => Protection::off("user", "the VMM runs as root"),
        // SAFETY: geteuid has no preconditions.
        Some(uid) if uid == unsafe { libc::geteuid() } => {
            Protection::off("user", format!("the VMM runs as moat-node's uid {uid}"))
        }
        Some(uid) => Protection::on("user", format!("the VMM runs as uid {uid}")),
        None => Protection::off("user", "cannot read the VMM's uid"),
    };
    let seccomp = match status_field(&status, "Seccomp:") {
        Some(2) => Protection::on("seccomp", "seccomp filter mode 2 (QEMU -sandbox)"),
        Some(mode) => Protection::off("seccomp", format!("seccomp mode {mode}: no filter")),
        None => Protection::off("seccomp", "the kernel reports no seccomp mode"),
    };
    let cgroup = observe_cgroup(pid);
    let files = match std::fs::metadata(dir.jail()) {
        Ok(meta) => {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            let mode = meta.permissions().mode() & 0o777;
            let detail = format!("jail/ is {mode:o}, owned by uid {}", meta.uid());
            if mode == 0o700 && Some(meta.uid()) == uid && uid != Some(0) {
                Protection::on("files", detail)
            } else {
                Protection::off("files", detail)
            }
        }
        Err(_) => Protection::off("files", "the VM has no jail/ (started by an older moat-node)"),
    };
    vec![user, seccomp, cgroup, files]
}

/// The VM's cgroup as `/proc/PID/cgroup` names it, with the limits read from its files.
fn observe_cgroup(pid: u32) -> Protection {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return Protection::off("cgroup", "cannot read the VMM's cgroup");
    };
    let mut found = Vec::new();
    for line in text.lines() {
        // "hierarchy-id:controllers:path"; v2 has an empty controller list.
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if !path.starts_with("/moat/vm-") {
            continue;
        }
        let read = |mount: &str, file: &str| {
            std::fs::read_to_string(Path::new(CGROUP_FS).join(mount).join(path.trim_start_matches('/')).join(file))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into())
        };
        match controllers {
            "" => found.push(format!(
                "v2 {path}: memory.max {}, cpu.max {}, pids.max {}",
                read("", "memory.max"),
                read("", "cpu.max"),
                read("", "pids.max")
            )),
            "memory" => found.push(format!("memory {path}: limit {} bytes", read("memory", "memory.limit_in_bytes"))),
            "cpu" | "cpu,cpuacct" => {
                found.push(format!("cpu {path}: quota {} µs per 100 ms", read("cpu", "cpu.cfs_quota_us")))
            }
            "pids" => found.push(format!("pids {path}: max {}", read("pids", "pids.max"))),
            _ => {}
        }
    }
    if found.is_empty() {
        Protection::off("cgroup", "the VMM is in no cgroup of moat's")
    } else {
        found.sort();
        Protection::on("cgroup", found.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vcpus: u32, memory_mib: u64) -> VmConfig {
        VmConfig {
            id: "abc".into(),
            name: "web".into(),
            vcpus,
            memory_mib,
            image: "base".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: String::new(),
            created_at: String::new(),
            disks: Vec::new(),
            nic: None,
        }
    }

    #[test]
    fn limits_follow_the_vm_size() {
        let limits = Limits::for_vm(&config(2, 512));
        assert_eq!(limits.memory_bytes, (512 + MEMORY_OVERHEAD_MIB) << 20);
        assert_eq!(limits.cpu_quota_us, 300_000);
        assert_eq!(limits.pids, PIDS_MAX);
    }

    /// A fake cgroup v1 tree: the three controllers get `moat/vm-<id>-<uid>` with the VM's limits,
    /// and removing it leaves nothing.
    #[test]
    fn v1_cgroups_are_made_with_limits_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        for c in CONTROLLERS {
            std::fs::create_dir_all(tmp.path().join(c)).unwrap();
            std::fs::write(tmp.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        let cgroups = detect_cgroups(tmp.path()).unwrap();
        assert!(matches!(&cgroups, Cgroups::V1(roots) if roots.len() == 3));
        // A real kernel makes the files; the fake needs them to exist for the writes to land.
        let procs = cgroups.create("vm-abc-7", Limits::for_vm(&config(1, 256))).unwrap();
        assert_eq!(procs.len(), 3);
        let read =
            |c: &str, f: &str| std::fs::read_to_string(tmp.path().join(c).join("moat/vm-abc-7").join(f)).unwrap();
        assert_eq!(read("memory", "memory.limit_in_bytes"), ((256 + MEMORY_OVERHEAD_MIB) << 20).to_string());
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "200000");
        assert_eq!(read("pids", "pids.max"), PIDS_MAX.to_string());
        assert!(
            !tmp.path().join("memory/moat/vm-abc-7/memory.memsw.limit_in_bytes").exists(),
            "no swap file, no write"
        );
        for c in CONTROLLERS {
            for f in std::fs::read_dir(tmp.path().join(c).join("moat/vm-abc-7")).unwrap() {
                std::fs::remove_file(f.unwrap().path()).unwrap(); // a kernel's cgroup dir empties itself
            }
        }
        cgroups.remove("vm-abc-7");
        for c in CONTROLLERS {
            assert!(!tmp.path().join(c).join("moat/vm-abc-7").exists());
        }
    }

    /// A fake unified (v2) tree: the controllers are enabled for moat's children, and a VM's
    /// cgroup gets memory.max (no swap), cpu.max and pids.max.
    #[test]
    fn v2_cgroups_are_made_with_limits() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("cgroup.controllers"), "cpuset cpu io memory hugetlb pids rdma\n").unwrap();
        let cgroups = detect_cgroups(tmp.path()).unwrap();
        assert_eq!(cgroups, Cgroups::V2(tmp.path().join("moat")));
        let enabled = std::fs::read_to_string(tmp.path().join("moat/cgroup.subtree_control")).unwrap();
        assert_eq!(enabled, "+memory +cpu +pids");
        std::fs::create_dir(tmp.path().join("moat/vm-abc-7")).unwrap();
        std::fs::write(tmp.path().join("moat/vm-abc-7/memory.swap.max"), "max").unwrap();
        let procs = cgroups.create("vm-abc-7", Limits::for_vm(&config(3, 1024))).unwrap();
        assert_eq!(procs, [tmp.path().join("moat/vm-abc-7/cgroup.procs")]);
        let read = |f: &str| std::fs::read_to_string(tmp.path().join("moat/vm-abc-7").join(f)).unwrap();
        assert_eq!(read("memory.max"), ((1024 + MEMORY_OVERHEAD_MIB) << 20).to_string());
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("cpu.max"), "400000 100000");
        assert_eq!(read("pids.max"), PIDS_MAX.to_string());
    }

    #[test]
    fn a_host_without_controllers_says_which() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("cgroup.controllers"), "cpuset io memory\n").unwrap();
        let err = detect_cgroups(tmp.path()).unwrap_err();
        assert!(err.contains("lacks the cpu, pids controller(s)"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        assert!(detect_cgroups(empty.path()).unwrap_err().contains("no v1 memory hierarchy"));
    }

    /// Two VMs get two uids; a released uid is taken again; a stale claim (its uid runs
    /// nothing, older than the grace) is taken over, a fresh one is not.
    #[test]
    fn uid_claims_are_unique_and_released() {
        let tmp = tempfile::tempdir().unwrap();
        let confinement = Confinement { claims: tmp.path().join("claims"), ..Confinement::none("test") };
        let (a, b) = (VmDir::new(tmp.path(), "a"), VmDir::new(tmp.path(), "b"));
        std::fs::create_dir_all(a.path()).unwrap();
        std::fs::create_dir_all(b.path()).unwrap();
        let base = 3_900_000;
        let ua = confinement.claim_uid(base, &a).unwrap();
        let ub = confinement.claim_uid(base, &b).unwrap();
        assert_eq!((ua, ub), (base, base + 1));
        confinement.release(&a);
        assert!(!a.path().join(UID_FILE).exists());
        assert_eq!(confinement.claim_uid(base, &a).unwrap(), base, "a released uid is free again");
        let claim = tmp.path().join("claims").join(base.to_string());
        let old = std::time::SystemTime::now() - CLAIM_GRACE - Duration::from_secs(1);
        std::fs::File::options().write(true).open(&claim).unwrap().set_modified(old).unwrap();
        let c = VmDir::new(tmp.path(), "c");
        std::fs::create_dir_all(c.path()).unwrap();
        assert_eq!(confinement.claim_uid(base, &c).unwrap(), base, "a stale claim is taken over");
        assert_eq!(confinement.claim_uid(base, &a).unwrap(), base + 2, "a fresh claim is not");
    }
}

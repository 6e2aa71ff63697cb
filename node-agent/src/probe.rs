//! Reads the facts a node reports about its host: identity, capacity,
//! virtualization, installed VMMs and the storage root's filesystem.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cmd;
use crate::kvm::{self, KvmReport};

/// The VMMs moat can drive, by the binary it looks for.
pub const VMMS: &[(&str, &str)] =
    &[("qemu", "qemu-system-x86_64"), ("firecracker", "firecracker"), ("cloud-hypervisor", "cloud-hypervisor")];

#[derive(Debug, Clone, PartialEq)]
pub struct HostInfo {
    pub name: String,
    pub hostname: String,
    pub cpus: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub kernel: String,
    pub arch: String,
    pub kvm: KvmReport,
    pub vmms: Vec<Vmm>,
    pub storage: Storage,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vmm {
    pub kind: &'static str,
    pub path: Option<PathBuf>,
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storage {
    pub root: PathBuf,
    pub filesystem: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

impl Storage {
    pub fn is_btrfs(&self) -> bool {
        self.filesystem == "btrfs"
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("storage root {path} is not usable; create it or pass --storage-root")]
    Storage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Gathers everything `GetNodeInfo` reports. Blocking parts run on the blocking pool.
pub async fn host_info(name: &str, storage_root: &Path) -> Result<HostInfo, ProbeError> {
    let root = storage_root.to_path_buf();
    let (facts, kvm, storage) = tokio::task::spawn_blocking(move || {
        let facts = read_proc_facts();
        let kvm = kvm::probe(Path::new("/dev/kvm"), Path::new("/sys/module"));
        let storage = statfs(&root);
        (facts, kvm, storage)
    })
    .await
    .expect("the probe task does not panic");
    let facts = facts?;
    let mut vmms = Vec::with_capacity(VMMS.len());
    for &(kind, binary) in VMMS {
        vmms.push(find_vmm(kind, binary).await);
    }
    Ok(HostInfo {
        name: name.to_string(),
        hostname: facts.hostname,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory_total_bytes: facts.mem_total,
        memory_available_bytes: facts.mem_available,
        kernel: facts.kernel,
        arch: std::env::consts::ARCH.to_string(),
        kvm,
        vmms,
        storage: storage?,
    })
}

struct ProcFacts {
    hostname: String,
    kernel: String,
    mem_total: u64,
    mem_available: u64,
}

fn read_proc_facts() -> Result<ProcFacts, ProbeError> {
    let read = |p: &str| std::fs::read_to_string(p).map_err(|source| ProbeError::Read { path: p.into(), source });
    let meminfo = read("/proc/meminfo")?;
    Ok(ProcFacts {
        hostname: read("/proc/sys/kernel/hostname")?.trim().to_string(),
        kernel: read("/proc/sys/kernel/osrelease")?.trim().to_string(),
        mem_total: meminfo_bytes(&meminfo, "MemTotal").unwrap_or(0),
        mem_available: meminfo_bytes(&meminfo, "MemAvailable").unwrap_or(0),
    })
}

/// Parses a `Key:   1234 kB` line of /proc/meminfo into bytes.
fn meminfo_bytes(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    })
}

/// Looks the binary up on PATH and asks it for its version (first line).
async fn find_vmm(kind: &'static str, binary: &str) -> Vmm {
    let path = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join(binary)).find(|p| is_executable(p)));
    let version = match &path {
        Some(p) => match cmd::run(&[p.as_os_str(), "--version".as_ref()], Duration::from_secs(5)).await {
            Ok(out) if out.status.success() => {
                String::from_utf8_lossy(&out.stdout).lines().next().map(|l| l.trim().to_string())
            }
            Ok(_) | Err(_) => None,
        },
        None => None,
    };
    Vmm { kind, path, version }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `statfs(2)` on the storage root: filesystem type and space.
fn statfs(root: &Path) -> Result<Storage, ProbeError> {
    let err = |source| ProbeError::Storage { path: root.to_path_buf(), source };
    let c_path = CString::new(root.as_os_str().as_bytes())
        .map_err(|_| err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has a NUL byte")))?;
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c_path` is a valid NUL-terminated string and `buf` points to writable memory of
    // the right size; statfs fills it completely on success.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), buf.as_mut_ptr()) };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: statfs returned 0, so it initialized the whole struct.
    let st = unsafe { buf.assume_init() };
    let block = st.f_bsize as u64;
    // f_type is i64 on x86_64 glibc but narrower elsewhere; the cast keeps other targets building.
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as i64;
    Ok(Storage {
        root: root.to_path_buf(),
        filesystem: fs_name(magic).to_string(),
        total_bytes: st.f_blocks * block,
        available_bytes: st.f_bavail * block,
    })
}

/// The filesystem `path` is on ("btrfs", "ext4", ...), if statfs answers.
pub fn filesystem_of(path: &Path) -> Option<String> {
    statfs(path).ok().map(|s| s.filesystem)
}

/// Names the filesystem magic numbers moat cares about (linux/magic.h).
fn fs_name(magic: i64) -> &'static str {
    match magic {
        0x9123_683E => "btrfs",
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x0102_1994 => "tmpfs",
        0x2FC1_2FC1 => "zfs",
        0x794C_7630 => "overlayfs",
        0x6573_5546 => "fuse",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parsing() {
        let text = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(meminfo_bytes(text, "MemTotal"), Some(24_576_000 * 1024));
        assert_eq!(meminfo_bytes(text, "MemAvailable"), Some(2048 * 1024));
        assert_eq!(meminfo_bytes(text, "Mem"), None);
        assert_eq!(meminfo_bytes(text, "SwapTotal"), None);
    }

    #[test]
    fn filesystem_names() {
        for (magic, name) in [(0x9123_683E, "btrfs"), (0xEF53, "ext4"), (0x0102_1994, "tmpfs"), (7, "other")] {
            assert_eq!(fs_name(magic), name);
        }
    }

    #[tokio::test]
    async fn probes_this_host() {
        let dir = tempfile::tempdir().unwrap();
        let info = host_info("n1", dir.path()).await.unwrap();
        assert_eq!(info.name, "n1");
        assert!(!info.hostname.is_empty() && !info.kernel.is_empty());
        assert!(info.cpus >= 1 && info.memory_total_bytes > info.memory_available_bytes / 2);
        assert!(info.storage.total_bytes > 0);
        assert_eq!(info.vmms.len(), VMMS.len());
        // A VMM reported installed must be executable on this host.
        for vmm in &info.vmms {
            if let Some(p) = &vmm.path {
                assert!(is_executable(p), "{p:?}");
            }
        }
    }

    #[test]
    fn statfs_of_a_missing_root_says_what_to_do() {
        let err = statfs(Path::new("/nonexistent/moat-root")).unwrap_err();
        assert!(err.to_string().contains("--storage-root"), "{err}");
    }
}

//! One VM's directory on the node: everything about the VM lives here, so a
//! restarted moat-node can find and re-adopt it.
//!
//! ```text
//! <storage-root>/vms/<id>/
//!   creating       present until the create (and the start it asked for) answered
//!   config.json    what to run (written once, at create)
//!   status.json    last known state and why (rewritten atomically on every change)
//!   vmm.pid        the VMM's process id while it runs
//!   vmm.log        the VMM's own stdout and stderr
//!   vsock.pid      the vsock device daemon's process id
//!   vsock.log      its output
//!   vsock.cid      the guest's CID on the host kernel's vsock, while it runs
//!   jail/          the only part the VM's own processes can reach (owned by the
//!                  VM's uid, 0700; they run in it and use relative paths):
//!     qmp.sock       QEMU's control socket
//!     console.log    serial console output, appended by the VMM
//!     console.1.log  the previous console.log once it passed the size cap
//!     vhost.sock     vhost-user socket of the VM's vsock device (hybrid vsock)
//!     vsock.sock     the host end of the VM's vsock: `CONNECT <port>` reaches the guest
//! ```
//!
//! Everything else in the VM's directory is the node's: a VMM that was broken into
//! cannot rewrite what the node will run next time (config.json) or whom it signals
//! (vmm.pid). A VM created by an older moat-node has no `jail/` until it next starts;
//! until then its sockets and console are found where that node put them.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Console output kept per VM: `console.log` rotates into `console.1.log` past this size, so
/// at most twice this is on disk and the newest output (a kernel panic, say) is always there.
pub const CONSOLE_CAP: u64 = 1024 * 1024;

/// The VM's own part of its directory, and the names the VMM uses in it (relative: the VMM runs
/// in `jail/` and cannot reach anything above it).
pub const JAIL: &str = "jail";
/// Present while a create (and the first start it asked for) is under way.
const CREATING: &str = "creating";
pub const QMP_SOCKET: &str = "qmp.sock";
pub const CONSOLE_LOG: &str = "console.log";
pub const VHOST_SOCKET: &str = "vhost.sock";
pub const VSOCK_SOCKET: &str = "vsock.sock";

/// What to run; fixed at create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub id: String,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub image: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub created_at: String,
    /// Disks (virtio-blk, serial `moat<index>`): the root first when the VM boots from one.
    #[serde(default)]
    pub disks: Vec<Disk>,
    /// Its network card, if it has one: a tap on the network's bridge, made at each start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nic: Option<Nic>,
}

/// Six hex octets, locally administered and unicast: what moat hands out as a VM's MAC.
pub fn valid_mac(mac: &str) -> bool {
    let octets: Vec<&str> = mac.split(':').collect();
    octets.len() == 6
        && octets.iter().all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()))
        && u8::from_str_radix(octets[0], 16).is_ok_and(|first| first & 0b11 == 0b10)
}

/// A VM's network card, as the gateway assigned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// The network's id (its bridge is derived from it).
    pub network: String,
    pub mac: String,
    pub ip: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: std::net::Ipv4Addr,
    #[serde(default)]
    pub dns: Vec<std::net::Ipv4Addr>,
}

impl Nic {
    /// `moat.net=<ip>/<prefix>,<gateway>[,<dns>+<dns>...]`, read by the base image's init.
    pub fn cmdline(&self) -> String {
        let mut arg = format!("moat.net={}/{},{}", self.ip, self.prefix, self.gateway);
        if !self.dns.is_empty() {
            let dns: Vec<String> = self.dns.iter().map(|d| d.to_string()).collect();
            arg.push(',');
            arg.push_str(&dns.join("+"));
        }
        arg
    }
}

/// One disk of a VM: an image file in the node's storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub path: PathBuf,
    pub read_only: bool,
    /// Where the guest mounts it: [`Disk::ROOT`] for the root disk, else a workspace name
    /// (at /workspaces/<name>).
    pub mount: String,
    /// The workspace it is, or empty for a VM's throw-away root.
    #[serde(default)]
    pub workspace: String,
}

impl Disk {
    pub const ROOT: &'static str = "/";
}

/// The one VM state enum, shared with the gateway and the tools.
pub use moat_tools::VmState;

/// Where a VM is and why; persisted so a restarted node knows what it was doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub state: VmState,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub started_at: String,
    /// Size of console.log when this boot began: output before it is an earlier boot's.
    #[serde(default)]
    pub console_start: u64,
}

impl VmStatus {
    pub fn new(state: VmState, reason: impl Into<String>) -> VmStatus {
        VmStatus { state, reason: reason.into(), pid: 0, started_at: String::new(), console_start: 0 }
    }
}

#[derive(Debug, Clone)]
pub struct VmDir {
    root: PathBuf,
}

impl VmDir {
    pub fn new(vms_root: &Path, id: &str) -> VmDir {
        VmDir { root: vms_root.join(id) }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }
    /// The directory the VM's processes run in (see the module docs).
    pub fn jail(&self) -> PathBuf {
        self.root.join(JAIL)
    }
    /// Where the files the VMM itself makes live: `jail/`, or the VM's directory for a VM an
    /// older moat-node created and has not restarted since.
    fn run_dir(&self) -> PathBuf {
        let jail = self.jail();
        if jail.is_dir() { jail } else { self.root.clone() }
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir().join(QMP_SOCKET)
    }
    pub fn console_log(&self) -> PathBuf {
        self.run_dir().join(CONSOLE_LOG)
    }
    fn console_prev(&self) -> PathBuf {
        self.run_dir().join("console.1.log")
    }
    /// vhost-user control socket QEMU connects to (hybrid vsock).
    pub fn vhost_socket(&self) -> PathBuf {
        self.run_dir().join(VHOST_SOCKET)
    }
    /// The hybrid vsock socket: connect, send `CONNECT <port>\n`, read `OK ...`, then talk.
    pub fn vsock_socket(&self) -> PathBuf {
        self.run_dir().join(VSOCK_SOCKET)
    }
    /// The guest CID allocated for kernel vhost-vsock, while the VM runs.
    pub fn vsock_cid_file(&self) -> PathBuf {
        self.root.join("vsock.cid")
    }
    pub fn read_cid(&self) -> Option<u32> {
        std::fs::read_to_string(self.vsock_cid_file()).ok()?.trim().parse().ok()
    }
    pub fn vsock_pid_file(&self) -> PathBuf {
        self.root.join("vsock.pid")
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.root.join("vmm.log")
    }
    fn pid_file(&self) -> PathBuf {
        self.root.join("vmm.pid")
    }

    pub fn read_config(&self) -> std::io::Result<VmConfig> {
        read_json(&self.root.join("config.json"))
    }
    pub fn write_config(&self, config: &VmConfig) -> std::io::Result<()> {
        write_json(&self.root.join("config.json"), config)
    }
    pub fn read_status(&self) -> std::io::Result<VmStatus> {
        read_json(&self.root.join("status.json"))
    }
    pub fn write_status(&self, status: &VmStatus) -> std::io::Result<()> {
        write_json(&self.root.join("status.json"), status)
    }

    /// Marks a create in progress: until [`VmDir::created`], a restarted node removes the VM.
    pub fn mark_creating(&self) -> std::io::Result<()> {
        write_atomic(&self.root.join(CREATING), b"")
    }
    pub fn created(&self) -> std::io::Result<()> {
        std::fs::remove_file(self.root.join(CREATING))
    }
    pub fn is_being_created(&self) -> bool {
        self.root.join(CREATING).exists()
    }

    pub fn read_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_file()).ok()?.trim().parse().ok()
    }
    pub fn write_pid(&self, pid: u32) -> std::io::Result<()> {
        write_atomic(&self.pid_file(), format!("{pid}\n").as_bytes())
    }
    pub fn clear_pid(&self) {
        let _ = std::fs::remove_file(self.pid_file());
    }

    /// The last `max` bytes of console output (across the rotation), lossily decoded, and
    /// whether older output exists beyond them.
    pub fn console_tail(&self, max: u64) -> std::io::Result<(String, bool)> {
        let mut bytes = tail_of(&self.console_log(), max)?;
        let current = bytes.len() as u64;
        let truncated = if current < max {
            let older = tail_of(&self.console_prev(), max - current)?;
            let truncated = std::fs::metadata(self.console_prev()).is_ok_and(|m| m.len() > older.len() as u64);
            bytes.splice(0..0, older);
            truncated
        } else {
            std::fs::metadata(self.console_log()).is_ok_and(|m| m.len() > max)
                || std::fs::metadata(self.console_prev()).is_ok_and(|m| m.len() > 0)
        };
        Ok((String::from_utf8_lossy(&bytes).into_owned(), truncated))
    }

    /// Keeps the console log bounded: past [`CONSOLE_CAP`], its contents move to
    /// `console.1.log` and it starts over. The VMM appends (O_APPEND), so it keeps writing at
    /// the new end; output written between the copy and the truncate (one syscall apart) is
    /// the only output that can be lost.
    pub fn rotate_console(&self) -> std::io::Result<bool> {
        let path = self.console_log();
        let mut file = match crate::nofollow::open_own(&path, true) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        if meta.len() <= CONSOLE_CAP {
            return Ok(false);
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut bytes)?;
        write_atomic(&self.console_prev(), &bytes)?;
        file.set_len(0)?;
        Ok(true)
    }
}

fn tail_of(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut file = match crate::nofollow::open_own(path, false) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> std::io::Result<T> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    write_atomic(path, &bytes)
}

/// Write-then-rename, so a crash leaves either the old file or the new one, never half. The
/// temporary file is made fresh (O_EXCL after removing a leftover), never through a link.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_data()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_rotates_and_tail_spans_both_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = VmDir::new(tmp.path(), "vm1");
        std::fs::create_dir_all(dir.path()).unwrap();
        let big = vec![b'a'; CONSOLE_CAP as usize + 10];
        std::fs::write(dir.console_log(), &big).unwrap();
        assert!(dir.rotate_console().unwrap());
        assert_eq!(std::fs::metadata(dir.console_log()).unwrap().len(), 0);
        std::fs::write(dir.console_log(), b"Kernel panic - not syncing\n").unwrap();
        let (text, truncated) = dir.console_tail(64).unwrap();
        assert!(text.ends_with("Kernel panic - not syncing\n"), "{text}");
        assert_eq!(text.len(), 64);
        assert!(truncated);
        let (all, truncated) = dir.console_tail(10 * CONSOLE_CAP).unwrap();
        assert_eq!(all.len(), big.len() + 27);
        assert!(!truncated);
        assert!(!dir.rotate_console().unwrap(), "under the cap nothing rotates");
    }

    /// What the VM's uid can leave in `jail/` in place of its console or sockets: links to files
    /// or sockets elsewhere. The node reads, rotates and connects to none of them.
    #[tokio::test]
    async fn links_in_the_jail_are_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = VmDir::new(tmp.path(), "vm1");
        std::fs::create_dir_all(dir.jail()).unwrap();
        let secret = tmp.path().join("secret");
        std::fs::write(&secret, vec![b's'; CONSOLE_CAP as usize + 1]).unwrap();
        std::os::unix::fs::symlink(&secret, dir.console_log()).unwrap();
        assert!(dir.console_tail(64).is_err(), "the console tail does not read through a link");
        assert!(dir.rotate_console().is_err());
        std::os::unix::fs::symlink(&secret, dir.jail().join("console.1.tmp")).unwrap();
        std::fs::remove_file(dir.console_log()).unwrap();
        std::fs::write(dir.console_log(), vec![b'c'; CONSOLE_CAP as usize + 1]).unwrap();
        assert!(dir.rotate_console().unwrap(), "a real console rotates");
        assert_eq!(std::fs::metadata(&secret).unwrap().len(), CONSOLE_CAP + 1, "the linked file is untouched");
        assert!(!std::fs::symlink_metadata(dir.jail().join("console.1.tmp")).is_ok_and(|m| m.is_symlink()));

        let elsewhere = tmp.path().join("other.sock");
        let listener = tokio::net::UnixListener::bind(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.qmp_socket()).unwrap();
        let refused = crate::nofollow::connect_own(&dir.qmp_socket()).await.unwrap_err();
        assert!(refused.to_string().contains("is not a socket"), "{refused}");
        std::fs::remove_file(dir.qmp_socket()).unwrap();
        let _own = tokio::net::UnixListener::bind(dir.qmp_socket()).unwrap();
        crate::nofollow::connect_own(&dir.qmp_socket()).await.expect("the VM's own socket connects");
        drop(listener);
    }

    #[test]
    fn status_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = VmDir::new(tmp.path(), "vm1");
        std::fs::create_dir_all(dir.path()).unwrap();
        let status = VmStatus::new(VmState::Crashed, "qemu killed");
        dir.write_status(&status).unwrap();
        assert_eq!(dir.read_status().unwrap(), status);
        assert!(std::fs::read_to_string(dir.path().join("status.json")).unwrap().contains("\"crashed\""));
    }
}

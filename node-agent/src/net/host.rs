//! The node's networks as a service: the state the gateway last gave (kept in a file so a
//! restart, a reboot or a flushed table is repaired at the next start), applied whole on every
//! change, and the taps VMs get at start. A state that cannot be applied is not kept: the
//! previous one is applied again, so nothing is left half-done.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::apply::{Applier, ApplyError};
use super::model::NetState;
use super::names;

#[derive(Debug, Clone)]
pub struct Networks {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    applier: Applier,
    /// The network namespace bridges and taps live in (None: the node's own).
    netns: Option<String>,
    /// Where the last applied state is kept.
    file: PathBuf,
    state: tokio::sync::Mutex<NetState>,
    /// Why the kept state could not be applied at start, if it could not.
    detail: Mutex<String>,
}

impl Networks {
    /// Opens the state kept under `dir` (none yet: no networks). With `netns`, every bridge,
    /// tap and table lives in that named network namespace (`ip netns add`), not the node's own.
    pub fn open(dir: &Path, netns: Option<String>) -> std::io::Result<Networks> {
        std::fs::create_dir_all(dir)?;
        let file = dir.join("state.json");
        let state = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", file.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => NetState::default(),
            Err(e) => return Err(e),
        };
        let scratch = dir.join("tmp");
        let applier = match &netns {
            Some(ns) => Applier::in_namespace(ns, scratch),
            None => Applier::host(scratch),
        };
        Ok(Networks {
            inner: Arc::new(Inner {
                applier,
                netns,
                file,
                state: tokio::sync::Mutex::new(state),
                detail: Mutex::default(),
            }),
        })
    }

    /// Applies the kept state again (at start): bridges, addresses and the whole table are
    /// made to match it, whatever happened to them meanwhile. A failure is kept for
    /// [`Networks::detail`] and logged; VMs without networks are not held up by it.
    pub async fn reconcile(&self) {
        let state = self.inner.state.lock().await;
        if state.networks.is_empty() && !self.has_table().await {
            return;
        }
        let detail = match self.inner.applier.apply(&state).await {
            Ok(()) => {
                tracing::info!(networks = state.networks.len(), ports = state.ports.len(), "networks reconciled");
                String::new()
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot apply the kept network state");
                format!("the network state kept from before could not be applied at start: {e}")
            }
        };
        *self.inner.detail.lock().expect("never poisoned") = detail;
    }

    async fn has_table(&self) -> bool {
        self.inner.applier.list_table().await.is_ok_and(|t| !t.is_empty())
    }

    /// Makes `new` the node's networks: validated, applied, then kept. When applying fails the
    /// previous state is applied again and kept; the error says what failed.
    pub async fn set(&self, new: NetState) -> Result<(), ApplyError> {
        let mut state = self.inner.state.lock().await;
        let started = std::time::Instant::now();
        if let Err(e) = self.inner.applier.apply(&new).await {
            if let Err(again) = self.inner.applier.apply(&state).await {
                tracing::error!(error = %again, "re-applying the previous network state failed too");
            }
            return Err(e);
        }
        let json = serde_json::to_vec_pretty(&new).expect("network state serializes");
        let tmp = self.inner.file.with_extension("json.tmp");
        let kept = File::create(&tmp)
            .and_then(|mut f| {
                use std::io::Write;
                f.write_all(&json)?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &self.inner.file));
        kept.map_err(|e| ApplyError::Command { argv: "keep the network state".into(), detail: e.to_string() })?;
        tracing::debug!(ports = new.ports.len(), took = ?started.elapsed(), "networks applied and kept");
        *state = new;
        *self.inner.detail.lock().expect("never poisoned") = String::new();
        Ok(())
    }

    /// The `inet moat` table as the host has it now ("" when there is none).
    pub async fn ruleset(&self) -> String {
        self.inner.applier.list_table().await.unwrap_or_default()
    }

    pub fn detail(&self) -> String {
        self.inner.detail.lock().expect("never poisoned").clone()
    }

    /// A tap for VM `vm` on its network's bridge, as a descriptor for its VMM. The tap lives
    /// while a descriptor of it is open: it goes away with the VMM, leaving nothing behind.
    pub async fn tap(&self, vm: &str) -> Result<OwnedFd, ApplyError> {
        let state = self.inner.state.lock().await;
        if !state.ports.iter().any(|p| p.vm == vm) {
            return Err(ApplyError::Command {
                argv: format!("tap for vm {vm}"),
                detail: "the node's network state has no port for this VM; the gateway applies it before the VM starts"
                    .into(),
            });
        }
        let name = names::tap(vm);
        let netns = self.inner.netns.clone();
        let fd = std::thread::spawn(move || open_tap(&name, netns.as_deref()))
            .join()
            .map_err(|_| ApplyError::Command { argv: "open a tap".into(), detail: "the thread panicked".into() })?
            .map_err(|e| ApplyError::Command { argv: format!("open tap {}", names::tap(vm)), detail: e.to_string() })?;
        self.inner.applier.attach(&state, vm).await?;
        Ok(fd)
    }
}

/// Opens /dev/net/tun as tap `name` (no packet info, with virtio-net headers), inside network
/// namespace `netns` when given. Runs on a thread of its own: entering a namespace changes the
/// calling thread only, and this one ends right after.
fn open_tap(name: &str, netns: Option<&str>) -> std::io::Result<OwnedFd> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca; // _IOW('T', 202, int)
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    const IFF_VNET_HDR: libc::c_short = 0x4000;
    if let Some(ns) = netns {
        let handle = File::open(Path::new("/run/netns").join(ns))?;
        // SAFETY: setns(2) on a namespace descriptor we hold; it affects this thread only.
        if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let tun =
        std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(|e| {
            std::io::Error::new(e.kind(), format!("/dev/net/tun: {e} (load the tun module: modprobe tun)"))
        })?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= ifr.ifr_name.len() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "interface name too long"));
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    // SAFETY: TUNSETIFF reads an ifreq we own, on a descriptor we hold.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &ifr as *const libc::ifreq) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(OwnedFd::from(tun))
}

//! Portal sessions: connections guests open to the host on vsock port
//! [`UPLINK_PORT`] (`moat-guest mcp`), handed to the gateway.
//!
//! The node learns which VM a connection came from by where it arrived, never
//! from what the guest sends: hybrid vsock delivers a guest's connection to
//! `vsock.sock_<port>` in that VM's own jail (one listener per running VM);
//! kernel vsock gives the peer's CID, which the node gave that VM. The gateway
//! keeps one [`Uplinks::listen`] stream open (it dials the node, so mTLS keeps
//! its direction), is offered each connection with the VM's id, and takes it by
//! session id; an offer not taken within [`OFFER_TTL`] is closed.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moat_tools::guest::UPLINK_PORT;
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use crate::vsock::Conn;

/// How long an offered connection waits for the gateway to take it.
pub const OFFER_TTL: Duration = Duration::from_secs(10);
/// Offers queued for a gateway that is slow to read them; more are refused.
const QUEUE: usize = 64;

/// A guest's connection, offered to the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub session: String,
    pub vm_id: String,
}

/// The node's portal connections: who listens, and what waits to be taken.
#[derive(Clone, Default)]
pub struct Uplinks {
    hub: Arc<Mutex<Hub>>,
    /// Cancelled when the node shuts down: the gateway's listen stream and every portal session
    /// end, so a graceful shutdown is not held open by streams that never finish on their own.
    stopping: tokio_util::sync::CancellationToken,
}

#[derive(Default)]
struct Hub {
    listener: Option<mpsc::Sender<Offer>>,
    pending: HashMap<String, (String, Box<dyn Conn>)>,
}

impl std::fmt::Debug for Uplinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hub = self.lock();
        f.debug_struct("Uplinks")
            .field("listening", &hub.listener.as_ref().is_some_and(|l| !l.is_closed()))
            .field("pending", &hub.pending.len())
            .finish()
    }
}

/// Why a connection was not offered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OfferError {
    #[error("no gateway is listening for portal sessions on this node")]
    NoListener,
    #[error("the gateway has {QUEUE} portal sessions waiting already")]
    Busy,
}

impl Uplinks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Hub> {
        self.hub.lock().expect("the uplink hub lock is never poisoned")
    }

    /// Starts receiving offers; a listener already there is replaced (its stream ends).
    pub fn listen(&self) -> mpsc::Receiver<Offer> {
        let (tx, rx) = mpsc::channel(QUEUE);
        self.lock().listener = Some(tx);
        rx
    }

    /// Offers `conn`, which arrived on VM `vm_id`'s vsock, to the listening gateway.
    pub fn offer(&self, vm_id: &str, conn: Box<dyn Conn>) -> Result<Offer, OfferError> {
        let offer = Offer { session: session_id(), vm_id: vm_id.to_string() };
        let mut hub = self.lock();
        let listener = hub.listener.clone().filter(|l| !l.is_closed()).ok_or(OfferError::NoListener)?;
        listener.try_send(offer.clone()).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => OfferError::Busy,
            mpsc::error::TrySendError::Closed(_) => OfferError::NoListener,
        })?;
        hub.pending.insert(offer.session.clone(), (offer.vm_id.clone(), conn));
        drop(hub);
        let hub = self.hub.clone();
        let session = offer.session.clone();
        tokio::spawn(async move {
            tokio::time::sleep(OFFER_TTL).await;
            if hub.lock().expect("the uplink hub lock is never poisoned").pending.remove(&session).is_some() {
                tracing::warn!(%session, "the gateway did not take a portal session in time; closed it");
            }
        });
        Ok(offer)
    }

    /// Ends the listen stream and every portal session, and refuses new offers: the node is
    /// shutting down.
    pub fn stop(&self) {
        self.stopping.cancel();
        let mut hub = self.lock();
        hub.listener = None;
        hub.pending.clear();
    }

    /// Cancelled once [`Uplinks::stop`] is called.
    pub fn stopping(&self) -> tokio_util::sync::CancellationToken {
        self.stopping.clone()
    }

    /// Takes an offered connection: the VM it came from and the connection.
    pub fn take(&self, session: &str) -> Option<(String, Box<dyn Conn>)> {
        self.lock().pending.remove(session)
    }
}

/// 128 random bits, hex.
fn session_id() -> String {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).expect("the OS random source works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where hybrid vsock delivers a guest's connections to host port `port`: beside the VM's
/// `vsock.sock`, named `vsock.sock_<port>` (Firecracker's convention, which vhost-device-vsock
/// follows).
pub fn hybrid_socket(vsock_socket: &Path, port: u32) -> PathBuf {
    let mut name = vsock_socket.as_os_str().to_owned();
    name.push(format!("_{port}"));
    PathBuf::from(name)
}

/// Accepts VM `vm_id`'s connections to host port [`UPLINK_PORT`] on hybrid vsock while
/// `running()`; removes the socket when it stops. The socket goes in the VM's jail, owned by
/// the jail's owner (the uid the VM's vsock daemon runs as).
pub async fn serve_hybrid(uplinks: Uplinks, vm_id: String, vsock_socket: PathBuf, running: impl Fn() -> bool) {
    let path = hybrid_socket(&vsock_socket, UPLINK_PORT);
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!(vm = %vm_id, path = %path.display(), error = %e, "cannot listen for portal sessions");
            return;
        }
    };
    if let Some(jail) = path.parent().and_then(|dir| std::fs::metadata(dir).ok())
        && let Err(e) = std::os::unix::fs::chown(&path, Some(jail.uid()), Some(jail.gid()))
    {
        tracing::warn!(vm = %vm_id, error = %e, "cannot give the portal socket to the VM's uid");
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while running() {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => hand_over(&uplinks, &vm_id, Box::new(stream)),
                Err(e) => tracing::warn!(vm = %vm_id, error = %e, "accepting a portal connection failed"),
            },
            _ = tick.tick() => {}
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Accepts every guest's connections to host port [`UPLINK_PORT`] on the host kernel's vsock;
/// `vm_of_cid` names the running VM that holds a CID.
pub async fn serve_kernel(uplinks: Uplinks, vm_of_cid: impl Fn(u32) -> Option<String>) {
    let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, UPLINK_PORT);
    let listener = match tokio_vsock::VsockListener::bind(addr) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!(error = %e, port = UPLINK_PORT, "cannot listen for portal sessions on the kernel's vsock");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => match vm_of_cid(peer.cid()) {
                Some(vm_id) => hand_over(&uplinks, &vm_id, Box::new(stream)),
                None => tracing::warn!(cid = peer.cid(), "a portal connection from a CID no VM of this node holds"),
            },
            Err(e) => {
                tracing::warn!(error = %e, "accepting a portal connection failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

fn hand_over(uplinks: &Uplinks, vm_id: &str, conn: Box<dyn Conn>) {
    match uplinks.offer(vm_id, conn) {
        Ok(offer) => tracing::debug!(vm = %vm_id, session = %offer.session, "offered a portal session"),
        // Dropping the connection closes it: the guest's `moat-guest mcp` says moat is unreachable.
        Err(e) => tracing::warn!(vm = %vm_id, error = %e, "refused a portal connection"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_hybrid_socket_sits_beside_vsock_sock() {
        assert_eq!(hybrid_socket(Path::new("/v/jail/vsock.sock"), 300), PathBuf::from("/v/jail/vsock.sock_300"));
    }

    #[tokio::test]
    async fn offers_reach_the_listener_and_are_taken_once() {
        let uplinks = Uplinks::default();
        let (_unused, host) = tokio::io::duplex(64);
        assert_eq!(uplinks.offer("vm-1", Box::new(host)).unwrap_err(), OfferError::NoListener);

        let mut offers = uplinks.listen();
        let (mut guest, host) = tokio::io::duplex(64);
        let offer = uplinks.offer("vm-1", Box::new(host)).unwrap();
        assert_eq!(offers.recv().await.unwrap(), offer);
        let (vm, mut conn) = uplinks.take(&offer.session).unwrap();
        assert_eq!(vm, "vm-1");
        assert!(uplinks.take(&offer.session).is_none(), "taken once");
        guest.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        conn.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");

        // A newer listener replaces the old one, whose stream ends.
        let _newer = uplinks.listen();
        assert!(offers.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_hybrid_connection_is_offered_as_its_vm() {
        let tmp = tempfile::tempdir().unwrap();
        let vsock = tmp.path().join("vsock.sock");
        let uplinks = Uplinks::default();
        let mut offers = uplinks.listen();
        let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = running.clone();
        let server = tokio::spawn(serve_hybrid(uplinks.clone(), "vm-7".into(), vsock.clone(), move || {
            flag.load(std::sync::atomic::Ordering::SeqCst)
        }));
        let path = hybrid_socket(&vsock, UPLINK_PORT);
        let mut guest = loop {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(stream) => break stream,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let offer = offers.recv().await.unwrap();
        assert_eq!(offer.vm_id, "vm-7");
        let (_, mut conn) = uplinks.take(&offer.session).unwrap();
        conn.write_all(b"ok").await.unwrap();
        let mut buf = [0u8; 2];
        guest.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ok");

        running.store(false, std::sync::atomic::Ordering::SeqCst);
        server.await.unwrap();
        assert!(!path.exists(), "the socket goes when the VM stops");
    }
}

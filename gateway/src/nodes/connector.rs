//! Connections from the gateway to node agents over gRPC: mutual TLS for
//! remote nodes (`https://HOST:PORT`, the node's certificate must name the
//! node as registered), a Unix socket for the embedded node, and plain TCP
//! only for loopback development (`http://127.0.0.1:PORT`, added with
//! `--insecure-loopback`). Channels are cached per node and address and
//! reconnect on their own; [`NodeConnector::reload`] drops them so the next
//! call handshakes with a rotated gateway certificate.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use moat_proto::tuning;
use rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint, Uri};

use super::client::{NodeClient, NodeError};
use super::pki::Pki;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings: a node that stops answering mid-call (host down, network cut) fails the
/// call within about twice this instead of leaving it waiting for the node's deadline.
const KEEPALIVE: Duration = Duration::from_secs(5);

/// A node address as stored in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAddress {
    Unix(PathBuf),
    /// `https://host:port`: gRPC over mutual TLS.
    Tls {
        host: String,
        port: u16,
    },
    /// `http://host:port`: plain text, accepted only for loopback hosts.
    Plain {
        host: String,
        port: u16,
    },
}

impl NodeAddress {
    pub fn parse(s: &str) -> Result<NodeAddress, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("`{s}`: a unix: node address needs an absolute socket path"));
            }
            return Ok(NodeAddress::Unix(path.into()));
        }
        let bad = || format!("`{s}` is not a node address: use https://HOST:PORT, or unix:/PATH");
        let (tls, rest) = match (s.strip_prefix("https://"), s.strip_prefix("http://")) {
            (Some(rest), _) => (true, rest),
            (_, Some(rest)) => (false, rest),
            _ => return Err(bad()),
        };
        if rest.is_empty() || rest.contains('/') {
            return Err(bad());
        }
        let uri: Uri = rest.parse().map_err(|_| bad())?;
        let (Some(host), Some(port)) = (uri.host(), uri.port_u16()) else { return Err(bad()) };
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        Ok(if tls { NodeAddress::Tls { host, port } } else { NodeAddress::Plain { host, port } })
    }

    /// Plain-text TCP to anything but this host is refused: node traffic carries commands.
    pub fn check_plaintext_allowed(&self, insecure_loopback: bool) -> Result<(), String> {
        let NodeAddress::Plain { host, .. } = self else { return Ok(()) };
        let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if loopback && insecure_loopback {
            return Ok(());
        }
        Err(format!(
            "plain-text node address http://{host}:… refused: enroll the node with `moat node enroll NAME \
             --address https://HOST:PORT --out DIR` (mutual TLS){}",
            if loopback { ", or for development on this host only, pass --insecure-loopback" } else { "" }
        ))
    }
}

#[derive(Debug)]
pub struct NodeConnector {
    channels: Mutex<HashMap<(String, String), Channel>>,
    /// This process's embedded node (name, address): always dialled directly, whatever the
    /// registry says, since other gateway processes on the same state directory run their own.
    embedded: Option<(String, String)>,
    pki: Pki,
    tls: Mutex<Option<Arc<rustls::ClientConfig>>>,
}

impl NodeConnector {
    pub fn new(pki: Pki, embedded: Option<(&str, &str)>) -> NodeConnector {
        NodeConnector {
            channels: Mutex::new(HashMap::new()),
            embedded: embedded.map(|(n, a)| (n.to_string(), a.to_string())),
            pki,
            tls: Mutex::new(None),
        }
    }

    /// Where to reach the node registered as `name` at `registered`.
    pub fn address_of<'a>(&'a self, name: &str, registered: &'a str) -> &'a str {
        match &self.embedded {
            Some((embedded, address)) if embedded == name => address,
            _ => registered,
        }
    }

    /// Forgets cached connections and TLS settings (after `moat pki rotate`): the next call to
    /// each node connects afresh. Calls in flight finish on their old connections.
    pub fn reload(&self) {
        self.channels.lock().expect("the channel cache lock is never poisoned").clear();
        *self.tls.lock().expect("the TLS config lock is never poisoned") = None;
    }

    fn tls(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut tls = self.tls.lock().expect("the TLS config lock is never poisoned");
        if let Some(config) = &*tls {
            return Ok(config.clone());
        }
        let config = self.pki.client_config().map_err(|e| e.to_string())?;
        *tls = Some(config.clone());
        Ok(config)
    }

    /// A client for node `name` registered at `registered` (the embedded node is dialled at its
    /// own socket); the connection is made lazily on first use and cached.
    pub fn node(&self, name: &str, registered: &str) -> Result<NodeClient, NodeError> {
        let address = self.address_of(name, registered);
        let channel =
            self.channel(name, address).map_err(|detail| NodeError::Unreachable { node: name.to_string(), detail })?;
        Ok(NodeClient::new(name, channel))
    }

    fn channel(&self, name: &str, address: &str) -> Result<Channel, String> {
        let key = (name.to_string(), address.to_string());
        if let Some(ch) = self.channels.lock().expect("the channel cache lock is never poisoned").get(&key) {
            return Ok(ch.clone());
        }
        let endpoint = |authority: &str| {
            Endpoint::from_shared(format!("http://{authority}"))
                .map_err(|e| format!("bad node address {address}: {e}"))
                .map(|e| {
                    e.connect_timeout(CONNECT_TIMEOUT)
                        .http2_keep_alive_interval(KEEPALIVE)
                        .keep_alive_timeout(KEEPALIVE)
                        .keep_alive_while_idle(true)
                        .tcp_nodelay(true)
                        .initial_stream_window_size(tuning::STREAM_WINDOW)
                        .initial_connection_window_size(tuning::CONNECTION_WINDOW)
                        .max_frame_size(tuning::MAX_FRAME)
                })
        };
        let channel = match NodeAddress::parse(address)? {
            NodeAddress::Plain { host, port } => endpoint(&authority(&host, port))?.connect_lazy(),
            NodeAddress::Tls { host, port } => {
                let connector = tokio_rustls::TlsConnector::from(self.tls()?);
                // The node must present a certificate naming it as registered.
                let server_name = ServerName::try_from(name.to_string())
                    .map_err(|_| format!("node name `{name}` cannot be checked against a certificate"))?;
                endpoint(&authority(&host, port))?.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                    let (connector, server_name, host) = (connector.clone(), server_name.clone(), host.clone());
                    async move {
                        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                        tcp.set_nodelay(true)?;
                        let tls = connector.connect(server_name, tcp).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(tls))
                    }
                }))
            }
            NodeAddress::Unix(path) => {
                // The URI is required by tonic but unused: the connector below dials the socket.
                endpoint("moat-node.local")?.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
                }))
            }
        };
        self.channels.lock().expect("the channel cache lock is never poisoned").insert(key, channel.clone());
        Ok(channel)
    }
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_table() {
        let ok = [
            ("unix:/run/moat/node.sock", NodeAddress::Unix("/run/moat/node.sock".into())),
            ("https://10.0.0.2:7443", NodeAddress::Tls { host: "10.0.0.2".into(), port: 7443 }),
            ("https://n1.example:7443", NodeAddress::Tls { host: "n1.example".into(), port: 7443 }),
            ("http://[::1]:7443", NodeAddress::Plain { host: "::1".into(), port: 7443 }),
        ];
        for (s, want) in ok {
            assert_eq!(NodeAddress::parse(s), Ok(want), "{s}");
        }
        for bad in ["unix:relative.sock", "10.0.0.2:7443", "http://", "https://h", "http://h:1/path", "ftp://h:1"] {
            assert!(NodeAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plaintext_only_to_loopback_and_only_when_asked() {
        let plain = |s: &str| NodeAddress::parse(s).unwrap();
        assert!(plain("http://127.0.0.1:7443").check_plaintext_allowed(true).is_ok());
        assert!(plain("http://[::1]:7443").check_plaintext_allowed(true).is_ok());
        let err = plain("http://127.0.0.1:7443").check_plaintext_allowed(false).unwrap_err();
        assert!(err.contains("--insecure-loopback") && err.contains("moat node enroll"), "{err}");
        let err = plain("http://10.0.0.2:7443").check_plaintext_allowed(true).unwrap_err();
        assert!(!err.contains("--insecure-loopback"), "{err}");
        assert!(plain("https://10.0.0.2:7443").check_plaintext_allowed(false).is_ok());
    }
}

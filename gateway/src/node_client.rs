//! Connections from the gateway to node agents over gRPC: a Unix socket for
//! the embedded node, TCP for remote ones. Channels are cached per address
//! and reconnect on their own.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use moat_proto::node::v1::node_service_client::NodeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long a node may take to answer one call before the gateway gives up on it.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A node address as stored in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAddress {
    Unix(PathBuf),
    /// `http://host:port` (mTLS arrives with node enrollment).
    Tcp(String),
}

impl NodeAddress {
    pub fn parse(s: &str) -> Result<NodeAddress, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("`{s}`: a unix: node address needs an absolute socket path"));
            }
            return Ok(NodeAddress::Unix(path.into()));
        }
        if let Some(rest) = s.strip_prefix("http://")
            && !rest.is_empty()
            && !rest.contains('/')
            && rest.parse::<Uri>().is_ok()
        {
            return Ok(NodeAddress::Tcp(s.into()));
        }
        Err(format!("`{s}` is not a node address: use http://HOST:PORT or unix:/PATH"))
    }
}

#[derive(Debug, Default)]
pub struct NodeConnector {
    channels: Mutex<HashMap<String, Channel>>,
    /// This process's embedded node (name, address): always dialled directly, whatever the
    /// registry says, since other gateway processes on the same state directory run their own.
    embedded: Option<(String, String)>,
}

impl NodeConnector {
    pub fn with_embedded(name: &str, address: &str) -> NodeConnector {
        NodeConnector { embedded: Some((name.to_string(), address.to_string())), ..NodeConnector::default() }
    }

    /// Where to reach the node registered as `name` at `registered`.
    pub fn address_of<'a>(&'a self, name: &str, registered: &'a str) -> &'a str {
        match &self.embedded {
            Some((embedded, address)) if embedded == name => address,
            _ => registered,
        }
    }

    /// A client for the node at `address`; connection happens lazily on first use.
    pub fn client(&self, address: &str) -> Result<NodeServiceClient<Channel>, String> {
        let mut channels = self.channels.lock().expect("the channel cache lock is never poisoned");
        if let Some(ch) = channels.get(address) {
            return Ok(NodeServiceClient::new(ch.clone()));
        }
        let channel = match NodeAddress::parse(address)? {
            NodeAddress::Tcp(url) => Endpoint::from_shared(url)
                .map_err(|e| format!("bad node address {address}: {e}"))?
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(CALL_TIMEOUT)
                .tcp_nodelay(true)
                .connect_lazy(),
            NodeAddress::Unix(path) => {
                // The URI is required by tonic but unused: the connector below dials the socket.
                Endpoint::from_static("http://moat-node.local")
                    .connect_timeout(CONNECT_TIMEOUT)
                    .timeout(CALL_TIMEOUT)
                    .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
                    }))
            }
        };
        channels.insert(address.to_string(), channel.clone());
        Ok(NodeServiceClient::new(channel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_table() {
        let ok = [
            ("unix:/run/moat/node.sock", NodeAddress::Unix("/run/moat/node.sock".into())),
            ("http://10.0.0.2:7443", NodeAddress::Tcp("http://10.0.0.2:7443".into())),
            ("http://[::1]:7443", NodeAddress::Tcp("http://[::1]:7443".into())),
        ];
        for (s, want) in ok {
            assert_eq!(NodeAddress::parse(s), Ok(want), "{s}");
        }
        for bad in ["unix:relative.sock", "10.0.0.2:7443", "http://", "http://h:1/path", "ftp://h"] {
            assert!(NodeAddress::parse(bad).is_err(), "{bad}");
        }
    }
}

//! Binds the node's gRPC listener (TCP or Unix socket) and serves until shutdown.

use moat_proto::tuning;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::NodeApi;
use crate::tls::{ServerTls, TlsStream};

/// Where a node listens: `127.0.0.1:7443` or `unix:/run/moat/node.sock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/moat/node.sock".into());
            }
            return Ok(ListenAddr::Unix(path.into()));
        }
        s.parse()
            .map(ListenAddr::Tcp)
            .map_err(|_| format!("`{s}` is not a listen address: use HOST:PORT (e.g. 127.0.0.1:7443) or unix:PATH"))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeServerError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: ListenAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server on {addr} failed")]
    Serve {
        addr: ListenAddr,
        #[source]
        source: tonic::transport::Error,
    },
}

/// A bound listener, so callers learn the real address (port 0) before serving.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpIncoming, SocketAddr),
    /// TCP with mutual TLS: the production listener.
    Tls(tokio::net::TcpListener, ServerTls, SocketAddr),
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Listener {
    pub async fn bind(addr: &ListenAddr) -> Result<Listener, NodeServerError> {
        let bind_err = |source| NodeServerError::Bind { addr: addr.clone(), source };
        match addr {
            ListenAddr::Tcp(a) => {
                let listener = tokio::net::TcpListener::bind(a).await.map_err(bind_err)?;
                let local = listener.local_addr().map_err(bind_err)?;
                Ok(Listener::Tcp(TcpIncoming::from(listener).with_nodelay(Some(true)), local))
            }
            ListenAddr::Unix(path) => {
                // A socket file left by a crashed process would make bind fail; only ever remove a socket.
                if std::fs::symlink_metadata(path).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    std::fs::remove_file(path).map_err(bind_err)?;
                }
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(bind_err)?;
                }
                let listener = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
                Ok(Listener::Unix(listener, path.clone()))
            }
        }
    }

    /// Binds a TCP listener whose connections must complete an mTLS handshake.
    pub async fn bind_tls(addr: SocketAddr, tls: ServerTls) -> Result<Listener, NodeServerError> {
        let listen = ListenAddr::Tcp(addr);
        let bind_err = |source| NodeServerError::Bind { addr: listen.clone(), source };
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        Ok(Listener::Tls(listener, tls, local))
    }

    pub fn local_addr(&self) -> ListenAddr {
        match self {
            Listener::Tcp(_, a) | Listener::Tls(_, _, a) => ListenAddr::Tcp(*a),
            Listener::Unix(_, p) => ListenAddr::Unix(p.clone()),
        }
    }
}

/// Serves `api` on `listener` until `shutdown` resolves, then drains in-flight calls.
pub async fn serve(
    listener: Listener,
    api: NodeApi,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeServerError> {
    let addr = listener.local_addr();
    // Long-lived streams (the gateway's portal listener, portal sessions) end with the server,
    // or its graceful shutdown would wait for them forever.
    let uplinks = api.vms().uplinks().clone();
    let shutdown = async move {
        shutdown.await;
        uplinks.stop();
    };
    let router = Server::builder()
        .initial_stream_window_size(tuning::STREAM_WINDOW)
        .initial_connection_window_size(tuning::CONNECTION_WINDOW)
        .max_frame_size(tuning::MAX_FRAME)
        .add_service(api.into_service());
    let result = match listener {
        Listener::Tcp(incoming, _) => router.serve_with_incoming_shutdown(incoming, shutdown).await,
        Listener::Tls(listener, tls, _) => {
            router.serve_with_incoming_shutdown(tls_incoming(listener, tls), shutdown).await
        }
        Listener::Unix(listener, ref path) => {
            let result = router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown).await;
            let _ = std::fs::remove_file(path);
            result
        }
    };
    result.map_err(|source| NodeServerError::Serve { addr, source })
}

/// Accepted connections after their handshake. Handshakes run off the accept loop, so one
/// slow or hostile client cannot hold up others; failed ones are logged and dropped.
fn tls_incoming(
    listener: tokio::net::TcpListener,
    tls: ServerTls,
) -> impl tokio_stream::Stream<Item = Result<TlsStream, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (tls, sender) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                match tls.accept(stream).await {
                    Ok(stream) => {
                        let _ = sender.send(Ok(stream)).await;
                    }
                    Err(e) => tracing::warn!(%peer, error = %e, "refused a connection: TLS handshake failed"),
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_addresses() {
        assert_eq!("127.0.0.1:7443".parse(), Ok(ListenAddr::Tcp("127.0.0.1:7443".parse().unwrap())));
        assert_eq!("unix:/tmp/n.sock".parse(), Ok(ListenAddr::Unix("/tmp/n.sock".into())));
        assert!("unix:".parse::<ListenAddr>().unwrap_err().contains("socket path"));
        assert!("localhost".parse::<ListenAddr>().unwrap_err().contains("HOST:PORT"));
    }
}

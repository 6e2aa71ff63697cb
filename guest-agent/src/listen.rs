//! Where the agent listens: a vsock port (inside a VM) or a Unix socket (tests
//! on the host, and hosts without vsock). Both yield a byte stream.

use std::path::PathBuf;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

pub type Reader = Pin<Box<dyn AsyncRead + Send>>;
pub type Writer = Pin<Box<dyn AsyncWrite + Send>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    /// A port on this VM's vsock address (any CID).
    Vsock(u32),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(ListenAddr::Unix(path.into()));
        }
        if let Some(port) = s.strip_prefix("vsock:") {
            return port.parse().map(ListenAddr::Vsock).map_err(|_| format!("`{s}`: vsock:PORT needs a number"));
        }
        Err(format!("`{s}` is not a listen address: use vsock:PORT or unix:PATH"))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Vsock(port) => write!(f, "vsock:{port}"),
        }
    }
}

pub enum Listener {
    Unix(tokio::net::UnixListener),
    Vsock(tokio_vsock::VsockListener),
}

impl Listener {
    pub fn bind(addr: &ListenAddr) -> Result<Listener, String> {
        match addr {
            ListenAddr::Unix(path) => {
                let _ = std::fs::remove_file(path);
                tokio::net::UnixListener::bind(path)
                    .map(Listener::Unix)
                    .map_err(|e| format!("cannot listen on {addr}: {e}"))
            }
            ListenAddr::Vsock(port) => {
                let vsock = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, *port);
                tokio_vsock::VsockListener::bind(vsock)
                    .map(Listener::Vsock)
                    .map_err(|e| format!("cannot listen on {addr}: {e} (are the vsock modules loaded?)"))
            }
        }
    }

    pub async fn accept(&self) -> std::io::Result<(Reader, Writer)> {
        match self {
            Listener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                let (r, w) = stream.into_split();
                Ok((Box::pin(r), Box::pin(w)))
            }
            Listener::Vsock(l) => {
                let (stream, _) = l.accept().await?;
                let (r, w) = stream.into_split();
                Ok((Box::pin(r), Box::pin(w)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!("vsock:200".parse(), Ok(ListenAddr::Vsock(200)));
        assert_eq!("unix:/run/g.sock".parse(), Ok(ListenAddr::Unix("/run/g.sock".into())));
        assert!("vsock:x".parse::<ListenAddr>().is_err());
        assert!("tcp:1".parse::<ListenAddr>().unwrap_err().contains("vsock:PORT"));
    }
}

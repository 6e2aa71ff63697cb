//! mTLS for the node's gRPC listener. The node presents the certificate
//! `moat node enroll` issued it (CN and DNS name = node name) and accepts only
//! clients with a certificate from the gateway's client CA, which signs
//! nothing but gateway certificates, so one node cannot call another.
//!
//! The certificate is re-read on [`ServerTls::reload`] (moat-node does this on
//! SIGHUP): new handshakes use the new one, open connections keep going, so a
//! renewal needs no restart.
//!
//! Files in the `--certs` directory: `node.pem`, `node.key`, `client-ca.pem`.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TLS handshake that takes longer than this is dropped (slowloris).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: run `moat node enroll NAME --out DIR` on the gateway host and copy DIR here")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no usable {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("TLS configuration is invalid")]
    Rustls(#[from] rustls::Error),
    #[error("the client CA in {path} is unusable: {detail}")]
    Verifier { path: PathBuf, detail: String },
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read { path: path.into(), source })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(TlsError::Pem { path: path.into(), what: "certificate" });
    }
    Ok(certs)
}

pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read { path: path.into(), source })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| TlsError::Pem { path: path.into(), what: "private key" })
}

/// The node's certificate and key, swappable while serving.
#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("the certificate lock is never poisoned").clone())
    }
}

/// The node's TLS server side.
#[derive(Clone)]
pub struct ServerTls {
    dir: PathBuf,
    resolver: Arc<Resolver>,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl ServerTls {
    pub fn load(dir: &Path) -> Result<ServerTls, TlsError> {
        let provider = provider();
        let key = certified_key(dir, &provider)?;
        let ca_path = dir.join("client-ca.pem");
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(&ca_path)? {
            roots.add(cert)?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier { path: ca_path, detail: e.to_string() })?;
        let resolver = Arc::new(Resolver { current: RwLock::new(key) });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ServerTls { dir: dir.into(), resolver, acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)) })
    }

    /// Re-reads `node.pem` and `node.key`; on error the old certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = certified_key(&self.dir, &provider())?;
        *self.resolver.current.write().expect("the certificate lock is never poisoned") = key;
        Ok(())
    }

    /// Completes the handshake on `stream`, bounded by a timeout.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream)).await {
            Ok(result) => result.map(TlsStream),
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")),
        }
    }
}

fn certified_key(dir: &Path, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = read_certs(&dir.join("node.pem"))?;
    let key = read_key(&dir.join("node.key"))?;
    Ok(Arc::new(CertifiedKey::from_der(certs, key, provider)?))
}

/// An accepted mTLS connection, as tonic serves it.
#[derive(Debug)]
pub struct TlsStream(tokio_rustls::server::TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsStream {
    type ConnectInfo = Option<std::net::SocketAddr>;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.peer_addr().ok()
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

//! The host end of a VM's vsock. Hybrid (Firecracker's protocol, as served by
//! vhost-device-vsock): connect to the VM's `vsock.sock`, write
//! `CONNECT <port>\n`, read the `OK <port>\n` reply byte by byte (bytes after
//! it belong to the guest), then the stream is the guest port's. Kernel
//! (/dev/vhost-vsock): an AF_VSOCK connection to the guest's CID and port.
//! Every step has a timeout; a guest port nobody listens on yet refuses or
//! answers with EOF, so callers retry with backoff until their deadline.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

/// Where a VM's vsock is reached from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A hybrid vsock Unix socket.
    Hybrid(std::path::PathBuf),
    /// The guest's context id on the host's kernel vsock.
    Kernel(u32),
}

/// A connection to a guest port, whichever way it was reached.
pub trait Conn: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Conn for T {}

/// How long one connect-and-handshake attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_REPLY: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("the VM has no vsock socket at {0}: its VMM runs without a vsock device or is not running")]
    NoSocket(String),
    #[error("guest port {port} did not accept within {waited:?}: {last}")]
    NotListening { port: u32, waited: Duration, last: String },
}

/// One attempt: connect and handshake, or say why not.
async fn attempt(socket: &Path, port: u32) -> Result<UnixStream, String> {
    let mut stream = crate::nofollow::connect_own(socket).await.map_err(|e| format!("connect: {e}"))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    let mut reply = Vec::with_capacity(16);
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte).await {
            Ok(0) => return Err("the guest closed the connection (nothing listening yet?)".into()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if reply.len() >= MAX_REPLY => return Err("reply line too long".into()),
            Ok(_) => reply.push(byte[0]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    if !reply.starts_with(b"OK ") {
        return Err(format!("unexpected reply {:?}", String::from_utf8_lossy(&reply)));
    }
    Ok(stream)
}

/// Connects to guest `port` of `target`, retrying with backoff until `deadline`.
pub async fn connect_to(target: &Target, port: u32, deadline: Duration) -> Result<Box<dyn Conn>, VsockError> {
    match target {
        Target::Hybrid(socket) => Ok(Box::new(connect(socket, port, deadline).await?)),
        Target::Kernel(cid) => {
            let cid = *cid;
            let stream = retry(port, deadline, || async move {
                let addr = tokio_vsock::VsockAddr::new(cid, port);
                match tokio::time::timeout(ATTEMPT_TIMEOUT, tokio_vsock::VsockStream::connect(addr)).await {
                    Ok(Ok(stream)) => Ok(stream),
                    Ok(Err(e)) => Err(format!("connect to cid {cid}: {e}")),
                    Err(_) => Err(format!("no answer within {ATTEMPT_TIMEOUT:?}")),
                }
            })
            .await?;
            Ok(Box::new(stream))
        }
    }
}

/// Connects to guest `port` through the hybrid socket, retrying with backoff until `deadline`.
pub async fn connect(socket: &Path, port: u32, deadline: Duration) -> Result<UnixStream, VsockError> {
    retry(port, deadline, || async move {
        if !socket.exists() {
            return Err(VsockError::NoSocket(socket.display().to_string()).to_string());
        }
        match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt(socket, port)).await {
            Ok(result) => result,
            Err(_) => Err(format!("no reply within {ATTEMPT_TIMEOUT:?}")),
        }
    })
    .await
}

/// Runs `attempt` until it succeeds, backing off from 20 ms to 500 ms between tries; gives up
/// with the last reason once another try would end past `deadline`.
async fn retry<T, F: Future<Output = Result<T, String>>>(
    port: u32,
    deadline: Duration,
    mut attempt: impl FnMut() -> F,
) -> Result<T, VsockError> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(20);
    loop {
        let last = match attempt().await {
            Ok(done) => return Ok(done),
            Err(why) => why,
        };
        if started.elapsed() + backoff > deadline {
            return Err(VsockError::NotListening { port, waited: started.elapsed(), last });
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted hybrid socket: refuses the first connection (EOF), then answers OK and echoes.
    #[tokio::test]
    async fn retries_until_ok_and_keeps_bytes_after_the_reply() {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("vsock.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            let (first, _) = listener.accept().await.unwrap();
            drop(first);
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"CONNECT 200\n");
            // The reply and the guest's first bytes arrive together.
            s.write_all(b"OK 1073741824\nhello").await.unwrap();
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(&buf[..n]).await.unwrap();
        });
        let mut stream = connect(&socket, 200, Duration::from_secs(5)).await.unwrap();
        let mut hello = [0u8; 5];
        stream.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello");
        stream.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
    }

    /// vhost-device-vsock has been seen to stall a connection forever: a peer that accepts and
    /// never answers costs one attempt's timeout, and connect gives up by its deadline.
    #[tokio::test]
    async fn a_stalled_handshake_is_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("vsock.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let started = Instant::now();
        let err = connect(&socket, 200, Duration::from_secs(3)).await.unwrap_err();
        assert!(err.to_string().contains("no reply within"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(6), "bounded: {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_missing_socket_fails_by_the_deadline() {
        let err = connect(Path::new("/nonexistent/vsock.sock"), 200, Duration::from_millis(200)).await.unwrap_err();
        assert!(err.to_string().contains("no vsock socket"), "{err}");
    }
}

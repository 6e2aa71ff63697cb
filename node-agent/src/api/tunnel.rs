//! Splices a gRPC stream of [`GuestFrame`]s to a guest agent's vsock stream:
//! inbound frames' bytes are written to the guest, the guest's bytes go out
//! as frames. Either side closing ends both directions.

use crate::vsock::Conn;
use moat_proto::node::v1::GuestFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::Stream;
use tonic::Status;

const CHUNK: usize = 64 * 1024;

pub fn splice(
    stream: Box<dyn Conn>,
    first_data: Vec<u8>,
    mut inbound: tonic::Streaming<GuestFrame>,
) -> impl Stream<Item = Result<GuestFrame, Status>> + Send + 'static {
    let (mut read, mut write) = tokio::io::split(stream);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<GuestFrame, Status>>(16);
    // Guest → gateway.
    let from_guest = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match read.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    let frame = GuestFrame { data: buf[..n].to_vec(), ..GuestFrame::default() };
                    if tx.send(Ok(frame)).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(Status::unavailable(format!("guest connection failed: {e}")))).await;
                    break;
                }
            }
        }
    });
    let from_guest_abort = from_guest.abort_handle();
    // Gateway → guest. When the gateway's side ends (done, or gone), the connection is closed
    // whole, not half: hybrid vsock does not pass a half-close on to the guest, which would
    // otherwise wait for an end that never comes.
    let to_guest = tokio::spawn(async move {
        if first_data.is_empty() || write.write_all(&first_data).await.is_ok() {
            loop {
                match inbound.message().await {
                    Ok(Some(frame)) => {
                        if write.write_all(&frame.data).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(status = %e, "the gateway's side of a tunnel failed; closing it");
                        break;
                    }
                }
            }
        }
        tracing::debug!("the gateway's side of a tunnel ended; closing the connection");
        let _ = write.shutdown().await;
        from_guest_abort.abort();
    });
    // The guest closing ends the gateway's direction too.
    tokio::spawn(async move {
        let _ = from_guest.await;
        to_guest.abort();
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

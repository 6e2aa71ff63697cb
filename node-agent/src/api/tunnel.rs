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
    // Gateway → guest.
    let to_guest = tokio::spawn(async move {
        if !first_data.is_empty() && write.write_all(&first_data).await.is_err() {
            return;
        }
        while let Ok(Some(frame)) = inbound.message().await {
            if write.write_all(&frame.data).await.is_err() {
                return;
            }
        }
        let _ = write.shutdown().await;
    });
    // Guest → gateway.
    tokio::spawn(async move {
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
        to_guest.abort();
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

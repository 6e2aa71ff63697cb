//! `moat-guest mcp`: a stdio MCP endpoint for clients inside a portal VM. It
//! dials the host on vsock ([`HOST_CID`], [`UPLINK_PORT`]) and relays
//! newline-delimited JSON-RPC both ways; moat knows the caller by the VM the
//! connection came from, so nothing here carries a key or a claim.
//!
//! The relay reads just enough of each message to keep the session honest:
//! when the host side goes away (the gateway restarting, the portal VM being
//! deleted), every request still waiting gets a JSON-RPC error that says so
//! and how to reconnect, instead of hanging; when the client closes its input,
//! the relay waits for the answers it is owed before closing.

use std::collections::HashSet;

use moat_tools::guest::{HOST_CID, MAX_MESSAGE, UPLINK_PORT};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

/// JSON-RPC error code for "moat cannot be reached" (implementation-defined server error range).
pub const UNREACHABLE: i64 = -32001;

/// Where the relay dials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uplink {
    /// The host's vsock, port [`UPLINK_PORT`]: what a portal VM uses.
    Vsock,
    /// A Unix socket (tests on the host).
    Unix(std::path::PathBuf),
}

impl std::str::FromStr for Uplink {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some("") => Err("unix: needs a socket path".into()),
            Some(path) => Ok(Uplink::Unix(path.into())),
            None if s == "vsock" => Ok(Uplink::Vsock),
            None => Err(format!("`{s}` is not an uplink: use vsock or unix:PATH")),
        }
    }
}

type Conn = (Box<dyn AsyncRead + Send + Unpin>, Box<dyn AsyncWrite + Send + Unpin>);

async fn dial(uplink: &Uplink) -> Result<Conn, String> {
    match uplink {
        Uplink::Vsock => {
            let addr = tokio_vsock::VsockAddr::new(HOST_CID, UPLINK_PORT);
            let stream = tokio_vsock::VsockStream::connect(addr).await.map_err(|e| {
                format!(
                    "cannot reach moat on the host's vsock port {UPLINK_PORT}: {e}. Only portal VMs (made by \
                     agent_create) may call moat, and moat must be serving"
                )
            })?;
            let (r, w) = tokio::io::split(stream);
            Ok((Box::new(r), Box::new(w)))
        }
        Uplink::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| format!("cannot reach moat at {}: {e}", path.display()))?;
            let (r, w) = stream.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
    }
}

/// Runs the relay between `input`/`output` (the client's stdio) and moat. Returns why the
/// session ended, when it ended badly.
pub async fn run<R, W>(uplink: &Uplink, input: R, output: W) -> Result<(), String>
where
    R: AsyncRead + Send + Unpin,
    W: AsyncWrite + Send + Unpin,
{
    let output = Mutex::new(output);
    let mut input = BufReader::new(input);
    let (up_read, mut up_write) = match dial(uplink).await {
        Ok(conn) => conn,
        Err(why) => {
            // Say why to the client's first request, so it shows more than "server exited".
            if let Ok(Some(line)) = read_line(&mut input).await
                && let Some(id) = request_id(&line)
            {
                let _ = write_line(&output, &error_line(&id, &why)).await;
            }
            return Err(why);
        }
    };
    let waiting: Mutex<HashSet<String>> = Mutex::default();
    let answered = tokio::sync::Notify::new();
    // The client's `initialize` id, and whether its input ended (then a closing moat is expected).
    let initialize: Mutex<Option<String>> = Mutex::default();
    let input_done = std::sync::atomic::AtomicBool::new(false);
    // Why moat refused the session, when it answered `initialize` with an error.
    let refused: Mutex<Option<String>> = Mutex::default();
    let mut up_read = BufReader::new(up_read);

    let to_moat = async {
        loop {
            match read_line(&mut input).await {
                Ok(Some(line)) => {
                    if let Some(id) = request_id(&line) {
                        if is_initialize(&line) {
                            *initialize.lock().await = Some(id.to_string());
                        }
                        waiting.lock().await.insert(id.to_string());
                    }
                    if up_write.write_all(&line).await.is_err() || up_write.flush().await.is_err() {
                        // moat went away: the other side tells the client what it is owed.
                        return std::future::pending::<Result<(), String>>().await;
                    }
                }
                Ok(None) => break,
                Err(oversized) => {
                    let _ = write_line(&output, &error_line(&Value::Null, &oversized)).await;
                }
            }
        }
        input_done.store(true, std::sync::atomic::Ordering::SeqCst);
        // The client is done sending: wait for what it is owed, then close our side.
        loop {
            let notified = answered.notified();
            if waiting.lock().await.is_empty() {
                break;
            }
            notified.await;
        }
        // Then the relay ends, closing the connection whole: hybrid vsock (vhost-device-vsock)
        // does not pass a half-close on to the host, so waiting for moat to close would hang.
        let _ = up_write.shutdown().await;
        match refused.lock().await.take() {
            Some(why) => Err(format!("moat refused the session: {why}")),
            None => Ok(()),
        }
    };
    let from_moat = async {
        loop {
            match read_line(&mut up_read).await {
                Ok(Some(line)) => {
                    let id = response_id(&line).map(|id| id.to_string());
                    if let Some(id) = &id
                        && initialize.lock().await.as_deref() == Some(id.as_str())
                    {
                        *refused.lock().await = error_message(&line);
                    }
                    if write_line(&output, &line).await.is_err() {
                        return Err("the client's output closed".to_string());
                    }
                    // Only once the client has it: the input side may end the relay as soon as
                    // nothing is owed.
                    if let Some(id) = id {
                        waiting.lock().await.remove(&id);
                    }
                    answered.notify_waiters();
                }
                Ok(None) => break,
                Err(why) => return Err(format!("moat sent {why}")),
            }
        }
        if let Some(why) = refused.lock().await.take() {
            return Err(format!("moat refused the session: {why}"));
        }
        let owed: Vec<String> = waiting.lock().await.drain().collect();
        if owed.is_empty() {
            return if input_done.load(std::sync::atomic::Ordering::SeqCst) {
                Ok(())
            } else {
                Err("moat ended the session (the gateway or its node restarted?); start `moat-guest mcp` \
                     again to reconnect"
                    .into())
            };
        }
        let why = "the session with moat ended before it answered (the gateway or its node restarted, or \
                   this portal VM is being deleted); start `moat-guest mcp` again to reconnect";
        for id in owed {
            let id: Value = serde_json::from_str(&id).unwrap_or(Value::Null);
            let _ = write_line(&output, &error_line(&id, why)).await;
        }
        Err(why.to_string())
    };
    tokio::select! {
        ended = from_moat => ended,
        ended = to_moat => ended,
    }
}

/// One line, newline included; `None` at end of input (or when it fails); an error for a
/// line over the cap (discarded).
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> Result<Option<Vec<u8>>, String> {
    let mut line = Vec::new();
    let mut over = false;
    loop {
        // A read error ends the input like its end does.
        let Ok(available) = reader.fill_buf().await else { return Ok(None) };
        if available.is_empty() {
            return if line.is_empty() && !over {
                Ok(None)
            } else if over {
                Err(oversized())
            } else {
                Ok(Some(line))
            };
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        if !over && line.len() + chunk.len() > MAX_MESSAGE + 1 {
            over = true;
            line = Vec::new();
        }
        if !over {
            line.extend_from_slice(chunk);
        }
        let n = chunk.len();
        reader.consume(n);
        if done {
            return if over { Err(oversized()) } else { Ok(Some(line)) };
        }
    }
}

fn oversized() -> String {
    format!("a message over {MAX_MESSAGE} bytes; it was discarded")
}

async fn write_line<W: AsyncWrite + Unpin>(output: &Mutex<W>, line: &[u8]) -> std::io::Result<()> {
    let mut out = output.lock().await;
    out.write_all(line).await?;
    if !line.ends_with(b"\n") {
        out.write_all(b"\n").await?;
    }
    out.flush().await
}

/// The id of a request (has `method` and `id`); notifications and responses have none.
fn request_id(line: &[u8]) -> Option<Value> {
    let message: Value = serde_json::from_slice(line).ok()?;
    message.get("method")?;
    message.get("id").filter(|id| !id.is_null()).cloned()
}

fn is_initialize(line: &[u8]) -> bool {
    serde_json::from_slice::<Value>(line).is_ok_and(|m| m["method"] == "initialize")
}

/// The message of an error response.
fn error_message(line: &[u8]) -> Option<String> {
    let message: Value = serde_json::from_slice(line).ok()?;
    message["error"]["message"].as_str().map(String::from)
}

/// The id a response answers (has `result` or `error`).
fn response_id(line: &[u8]) -> Option<Value> {
    let message: Value = serde_json::from_slice(line).ok()?;
    if message.get("method").is_some() {
        return None;
    }
    message.get("id").cloned()
}

fn error_line(id: &Value, message: &str) -> Vec<u8> {
    let mut line =
        serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": id, "error": {"code": UNREACHABLE, "message": message}}))
            .expect("a JSON value serializes");
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A scripted moat on a Unix socket: answers `answer` of the requests it reads, then closes.
    async fn fake_moat(path: std::path::PathBuf, answer: usize) -> tokio::task::JoinHandle<Vec<String>> {
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::new(r);
            let mut seen = Vec::new();
            let mut line = String::new();
            while seen.len() < answer + 1 && r.read_line(&mut line).await.unwrap() > 0 {
                let message: Value = serde_json::from_str(&line).unwrap();
                seen.push(line.clone());
                line.clear();
                if seen.len() <= answer {
                    let id = message["id"].clone();
                    let reply = json!({"jsonrpc": "2.0", "id": id, "result": {}});
                    w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
                }
            }
            seen
        })
    }

    #[tokio::test]
    async fn requests_outstanding_when_moat_goes_get_an_error_each() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("moat.sock");
        let moat = fake_moat(path.clone(), 1).await;
        let (mut client, relay_in) = tokio::io::duplex(1 << 16);
        let (relay_out, mut client_out) = tokio::io::duplex(1 << 16);
        let relay = tokio::spawn(async move { run(&Uplink::Unix(path), relay_in, relay_out).await });
        client.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"a\"}\n").await.unwrap();
        client.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":\"two\",\"method\":\"b\"}\n").await.unwrap();
        moat.await.unwrap();
        let ended = relay.await.unwrap();
        assert!(ended.unwrap_err().contains("reconnect"));
        drop(client);
        let mut out = String::new();
        client_out.read_to_string(&mut out).await.unwrap();
        let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert_eq!(lines[0]["id"], 1);
        assert_eq!(lines[0]["result"], json!({}));
        assert_eq!(lines[1]["id"], "two");
        assert_eq!(lines[1]["error"]["code"], UNREACHABLE);
    }

    /// A moat that reads one line, answers `reply` after `delay` and reads until the relay's
    /// side ends. It never closes first: its write half is the task's output, held open until
    /// the test drops it.
    fn answer_once(
        path: &std::path::Path,
        reply: &'static [u8],
        delay: u64,
    ) -> tokio::task::JoinHandle<tokio::net::unix::OwnedWriteHalf> {
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::new(r);
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
            w.write_all(reply).await.unwrap();
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest).await;
            w
        })
    }

    /// The client's input ends before its answer comes: the relay waits for it, then closes the
    /// connection itself (moat never closes first here), as hybrid vsock needs.
    #[tokio::test]
    async fn closing_input_waits_for_the_answers_owed() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("moat.sock");
        let moat = answer_once(&path, b"{\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"ok\":true}}\n", 200);
        let input: &[u8] =
            b"{\"jsonrpc\":\"2.0\",\"method\":\"notifications/x\"}\n{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"a\"}\n";
        let mut out = Vec::new();
        let uplink = Uplink::Unix(path);
        let relay = run(&uplink, input, &mut out);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), relay).await;
        ended.expect("the relay ends without waiting for moat to close").unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("\"ok\":true"), "{out}");
        drop(moat.await.unwrap());
    }

    #[tokio::test]
    async fn an_unreachable_moat_answers_the_first_request_with_why() {
        let input: &[u8] = b"{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"initialize\"}\n";
        let mut out = Vec::new();
        let err = run(&Uplink::Unix("/nonexistent/moat.sock".into()), input, &mut out).await.unwrap_err();
        assert!(err.contains("cannot reach moat"), "{err}");
        let answer: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(answer["id"], 0);
        assert!(answer["error"]["message"].as_str().unwrap().contains("cannot reach moat"));
    }

    /// moat answering `initialize` with an error (a VM that is no portal) fails the relay.
    #[tokio::test]
    async fn a_refused_initialize_fails_the_relay() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("moat.sock");
        let no = b"{\"jsonrpc\":\"2.0\",\"id\":0,\"error\":{\"code\":-32001,\"message\":\"not a portal\"}}\n";
        let _moat = answer_once(&path, no, 0);
        let input: &[u8] = b"{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"initialize\"}\n";
        let mut out = Vec::new();
        let err = run(&Uplink::Unix(path), input, &mut out).await.unwrap_err();
        assert!(err.contains("not a portal"), "{err}");
        assert!(String::from_utf8(out).unwrap().contains("not a portal"), "the client sees the answer too");
    }

    #[test]
    fn uplinks_parse() {
        assert_eq!("vsock".parse(), Ok(Uplink::Vsock));
        assert_eq!("unix:/a".parse(), Ok(Uplink::Unix("/a".into())));
        assert!("tcp:1".parse::<Uplink>().is_err());
    }
}

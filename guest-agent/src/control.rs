//! The control channel: newline-delimited JSON requests and replies.
//!
//! `{"type":"hello","protocol":1}` → agent version, protocol, hostname and
//! the image metadata file's JSON (or null); `{"type":"ping"}` → uptime.
//! Anything else gets `{"type":"error","message":...}` and the connection
//! stays open.

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::listen::Listener;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Bumped when a request or reply changes incompatibly.
pub const PROTOCOL: u32 = 1;
/// Longest request line accepted; control messages are tiny.
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum Request {
    Hello { protocol: u32 },
    Ping,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Reply {
    Hello { agent_version: &'static str, protocol: u32, hostname: String, image: Value },
    Pong { uptime_ms: u64 },
    Error { message: String },
}

/// What answers control requests: the image metadata and when the agent started.
pub struct Agent {
    started: Instant,
    image: Value,
}

impl Agent {
    pub fn new(image: Value) -> Agent {
        Agent { started: Instant::now(), image }
    }

    /// The reply line (without its newline) to one request line.
    pub fn reply_line(&self, line: &str) -> String {
        serde_json::to_string(&self.answer(line)).expect("replies serialize")
    }

    fn answer(&self, line: &str) -> Reply {
        match serde_json::from_str::<Request>(line) {
            Ok(Request::Hello { protocol }) if protocol != PROTOCOL => Reply::Error {
                message: format!("control protocol {protocol} is not supported; this agent speaks {PROTOCOL}"),
            },
            Ok(Request::Hello { .. }) => Reply::Hello {
                agent_version: AGENT_VERSION,
                protocol: PROTOCOL,
                hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_default(),
                image: self.image.clone(),
            },
            Ok(Request::Ping) => Reply::Pong { uptime_ms: self.started.elapsed().as_millis() as u64 },
            Err(e) => Reply::Error {
                message: format!("bad request: {e}; send {{\"type\":\"hello\",\"protocol\":{PROTOCOL}}}"),
            },
        }
    }
}

/// Reads the image metadata file (JSON), or null when there is none.
pub fn image_info(path: Option<&Path>) -> Result<Value, String> {
    match path {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).map_err(|e| format!("cannot read image info {}: {e}", p.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("image info {} is not JSON: {e}", p.display()))
        }
        None => Ok(Value::Null),
    }
}

/// Serves the control channel on `listener` until the process is stopped.
pub async fn serve(listener: Listener, image: Value) -> Result<(), String> {
    let agent = std::rc::Rc::new(Agent::new(image));
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            loop {
                let (read, mut write) = match listener.accept().await {
                    Ok(conn) => conn,
                    Err(e) => {
                        eprintln!("moat-guest: accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let agent = agent.clone();
                tokio::task::spawn_local(async move {
                    let mut reader = BufReader::new(read);
                    let mut line = Vec::new();
                    loop {
                        line.clear();
                        // Bounded per line, so a peer cannot make the agent buffer without limit.
                        match (&mut reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                        let reply = if line.len() > MAX_LINE {
                            Reply::Error { message: format!("request over {MAX_LINE} bytes; closing") }
                        } else {
                            agent.answer(String::from_utf8_lossy(&line).trim_end())
                        };
                        let too_long = matches!(reply, Reply::Error { ref message } if message.ends_with("closing"));
                        let mut bytes = serde_json::to_vec(&reply).unwrap_or_default();
                        bytes.push(b'\n');
                        if write.write_all(&bytes).await.is_err() || too_long {
                            break;
                        }
                    }
                });
            }
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listen::ListenAddr;

    fn agent() -> Agent {
        Agent { started: Instant::now(), image: serde_json::json!({"name": "base"}) }
    }

    #[test]
    fn answers_table() {
        let a = agent();
        match a.answer(r#"{"type":"hello","protocol":1}"#) {
            Reply::Hello { protocol, image, .. } => assert_eq!((protocol, image["name"].as_str()), (1, Some("base"))),
            other => panic!("{other:?}"),
        }
        assert!(matches!(a.answer(r#"{"type":"ping"}"#), Reply::Pong { .. }));
        for bad in [r#"{"type":"hello","protocol":2}"#, "nonsense", r#"{"type":"exec"}"#] {
            assert!(matches!(a.answer(bad), Reply::Error { .. }), "{bad}");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn serves_hello_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("control.sock");
        let info = dir.path().join("image.json");
        std::fs::write(&info, r#"{"name":"moat-base","built":"2026-11-23"}"#).unwrap();
        let (s, i) = (socket.clone(), info.clone());
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                let listener = Listener::bind(&ListenAddr::Unix(s)).unwrap();
                let image = image_info(Some(&i)).unwrap();
                tokio::task::spawn_local(async move { serve(listener, image).await });
                let mut stream = loop {
                    match tokio::net::UnixStream::connect(&socket).await {
                        Ok(s) => break s,
                        Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                    }
                };
                stream.write_all(b"{\"type\":\"hello\",\"protocol\":1}\n{\"type\":\"ping\"}\n").await.unwrap();
                let mut buf = vec![0u8; 4096];
                let mut got = String::new();
                while got.lines().count() < 2 {
                    let n = stream.read(&mut buf).await.unwrap();
                    got.push_str(std::str::from_utf8(&buf[..n]).unwrap());
                }
                let hello: Value = serde_json::from_str(got.lines().next().unwrap()).unwrap();
                assert_eq!(hello["type"], "hello");
                assert_eq!(hello["agent_version"], AGENT_VERSION);
                assert_eq!(hello["image"]["name"], "moat-base");
                let pong: Value = serde_json::from_str(got.lines().nth(1).unwrap()).unwrap();
                assert_eq!(pong["type"], "pong");
            })
            .await;
    }
}

//! A minimal QMP client: one connection per command, greeting and capability
//! negotiation, then one `execute` and its `return` (events in between are
//! skipped). Every read has a deadline: a wedged VMM must not wedge the node.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const QMP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot reach QMP at {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP at {path} did not answer within {QMP_TIMEOUT:?}")]
    Timeout { path: String },
    #[error("QMP at {path} closed the connection")]
    Closed { path: String },
    #[error("QMP I/O on {path} failed")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP `{command}` failed: {message}")]
    Command { command: String, message: String },
}

/// Runs `command` (with `arguments`, if any) and returns its `return` value.
pub async fn execute(socket: &Path, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
    let path = socket.display().to_string();
    tokio::time::timeout(QMP_TIMEOUT, exchange(socket, &path, command, arguments))
        .await
        .unwrap_or(Err(QmpError::Timeout { path }))
}

async fn exchange(socket: &Path, path: &str, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
    let io = |source| QmpError::Io { path: path.to_string(), source };
    let stream = crate::nofollow::connect_own(socket)
        .await
        .map_err(|source| QmpError::Connect { path: path.to_string(), source })?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    // The greeting: {"QMP": {...}}.
    next_message(&mut lines, path).await?;
    write.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").await.map_err(io)?;
    reply(&mut lines, path, "qmp_capabilities").await?;
    let mut request = json!({"execute": command});
    if let Some(arguments) = arguments {
        request["arguments"] = arguments;
    }
    let mut line = request.to_string();
    line.push('\n');
    write.write_all(line.as_bytes()).await.map_err(io)?;
    reply(&mut lines, path, command).await
}

type Lines = tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>;

async fn next_message(lines: &mut Lines, path: &str) -> Result<Value, QmpError> {
    loop {
        let line = lines
            .next_line()
            .await
            .map_err(|source| QmpError::Io { path: path.to_string(), source })?
            .ok_or_else(|| QmpError::Closed { path: path.to_string() })?;
        if let Ok(value) = serde_json::from_str::<Value>(&line) {
            return Ok(value);
        }
    }
}

async fn reply(lines: &mut Lines, path: &str, command: &str) -> Result<Value, QmpError> {
    loop {
        let message = next_message(lines, path).await?;
        if let Some(value) = message.get("return") {
            return Ok(value.clone());
        }
        if let Some(error) = message.get("error") {
            let message = error.get("desc").and_then(Value::as_str).unwrap_or("unknown error").to_string();
            return Err(QmpError::Command { command: command.to_string(), message });
        }
        // An asynchronous event ({"event": ...}); not the reply.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A scripted QMP peer: greeting, capabilities, then an event before the reply.
    #[tokio::test]
    async fn skips_events_and_returns_the_reply() {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let peer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}}}\n").await.unwrap();
            let mut buf = vec![0; 4096];
            let n = s.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).contains("qmp_capabilities"));
            s.write_all(b"{\"return\": {}}\n").await.unwrap();
            let n = s.read(&mut buf).await.unwrap();
            let request: Value = serde_json::from_slice(&buf[..n]).unwrap();
            assert_eq!(request["execute"], "query-status");
            s.write_all(b"{\"event\": \"RESUME\"}\n{\"return\": {\"status\": \"running\"}}\n").await.unwrap();
        });
        let status = execute(&socket, "query-status", None).await.unwrap();
        assert_eq!(status["status"], "running");
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_connect_error() {
        let err = execute(Path::new("/nonexistent/qmp.sock"), "query-status", None).await.unwrap_err();
        assert!(matches!(err, QmpError::Connect { .. }), "{err:?}");
    }
}

//! The `moat-guest` binary's MCP server on a Unix socket, driven by the rmcp client:
//! files (a 10 MiB binary round trip), exec with streamed output, exit codes, signals,
//! timeouts, cancellation killing the process group, background processes re-attached
//! from a second connection, and bad input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // spawns the binary under test

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::model::{CallToolRequestParams, CallToolResult, ClientRequest, ProgressNotificationParam};
use rmcp::service::{NotificationContext, PeerRequestOptions, RunningService};
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{Value, json};
use sha2::Digest;

#[derive(Clone, Default)]
struct Collector {
    progress: Arc<Mutex<Vec<String>>>,
}

impl ClientHandler for Collector {
    async fn on_progress(&self, params: ProgressNotificationParam, _context: NotificationContext<RoleClient>) {
        self.progress.lock().unwrap().push(params.message.unwrap_or_default());
    }
}

struct Agent {
    child: tokio::process::Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

async fn start() -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("mcp.sock");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_moat-guest"))
        .args(["serve", "--mcp"])
        .arg(format!("unix:{}", socket.display()))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Agent { child, socket, _dir: dir }
}

async fn connect(socket: &Path, collector: Collector) -> RunningService<RoleClient, Collector> {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (r, w) = stream.into_split();
    let transport = rmcp::transport::async_rw::AsyncRwTransport::new_client(r, w).with_max_line_length(64 << 20);
    collector.serve(transport).await.unwrap()
}

async fn call(client: &RunningService<RoleClient, Collector>, tool: &str, args: Value) -> CallToolResult {
    let params = CallToolRequestParams::new(tool.to_string()).with_arguments(args.as_object().unwrap().clone());
    client.call_tool(params).await.unwrap_or_else(|e| panic!("{tool}: {e}"))
}

async fn ok(client: &RunningService<RoleClient, Collector>, tool: &str, args: Value) -> Value {
    let result = call(client, tool, args).await;
    assert_ne!(result.is_error, Some(true), "{tool}: {result:?}");
    result.structured_content.unwrap()
}

async fn refused(client: &RunningService<RoleClient, Collector>, tool: &str, args: Value) -> String {
    let result = call(client, tool, args).await;
    assert_eq!(result.is_error, Some(true), "{tool} should fail: {result:?}");
    result.content[0].as_text().unwrap().text.clone()
}

const MIB: u32 = 10;

fn hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn files_and_processes_over_mcp() {
    use base64::Engine;
    let mut agent = start().await;
    let collector = Collector::default();
    let client = connect(&agent.socket, collector.clone()).await;
    assert_eq!(client.list_all_tools().await.unwrap().len(), 10);
    let work = tempfile::tempdir().unwrap();

    // 10 MiB of binary, written and read back, same SHA-256.
    let bytes: Vec<u8> = (0..MIB * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let path = work.path().join("deep/blob.bin").display().to_string();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let written =
        ok(&client, "file_write", json!({"path": path, "content": b64, "encoding": "base64", "create_dirs": true}))
            .await;
    assert_eq!(written["sha256"], hex(&bytes));
    let back = ok(&client, "file_read", json!({"path": path})).await;
    assert_eq!(back["encoding"], "base64");
    let decoded = base64::engine::general_purpose::STANDARD.decode(back["content"].as_str().unwrap()).unwrap();
    assert_eq!(hex(&decoded), hex(&bytes));
    let stat = ok(&client, "file_stat", json!({"path": path})).await;
    assert_eq!((stat["kind"].as_str(), stat["size"].as_u64()), (Some("file"), Some(bytes.len() as u64)));

    // Bad paths change nothing.
    assert!(refused(&client, "file_write", json!({"path": "rel/x", "content": "x"})).await.contains("relative"));
    assert!(refused(&client, "file_read", json!({"path": "/tmp/\u{0}x"})).await.contains("NUL"));
    let long = format!("/{}", "a".repeat(5000));
    assert!(refused(&client, "file_stat", json!({"path": long})).await.contains("4096"));
    assert!(refused(&client, "exec_status", json!({"id": "nope"})).await.contains("no background process"));

    // exec: streamed output, exit code, signal, timeout.
    let uname = ok(&client, "exec", json!({"argv": ["uname", "-a"]})).await;
    assert_eq!(uname["exit_code"], 0);
    assert!(uname["stdout"].as_str().unwrap().starts_with("Linux"), "{uname}");
    let streamed = ok(&client, "exec", json!({"command": "echo first; sleep 0.3; echo second"})).await;
    assert_eq!(streamed["stdout"], "first\nsecond\n");
    let progress = collector.progress.lock().unwrap().clone();
    assert!(progress.iter().any(|m| m.starts_with("stdout: Linux")), "{progress:?}");
    assert!(progress.iter().any(|m| m == "stdout: first\n"), "output arrives as it is written: {progress:?}");
    let failed = ok(&client, "exec", json!({"command": "exit 7"})).await;
    assert_eq!((failed["exit_code"].as_i64(), failed["signal"].as_i64()), (Some(7), None));
    let signalled = ok(&client, "exec", json!({"command": "kill -TERM $$"})).await;
    assert_eq!((signalled["exit_code"].as_i64(), signalled["signal"].as_i64()), (None, Some(15)));
    let timed = ok(&client, "exec", json!({"command": "sleep 30", "timeout_s": 1})).await;
    assert_eq!((timed["timed_out"].as_bool(), timed["signal"].as_i64()), (Some(true), Some(9)));

    // Cancelling from the client (here: its request timeout) kills the process group.
    let pidfile = work.path().join("sleeper.pid");
    let args = json!({"command": format!("sleep 60 & echo $! > {}; wait", pidfile.display())});
    let request = ClientRequest::CallToolRequest(rmcp::model::CallToolRequest::new(
        CallToolRequestParams::new("exec").with_arguments(args.as_object().unwrap().clone()),
    ));
    let mut options = PeerRequestOptions::no_options();
    options.timeout = Some(Duration::from_millis(800));
    let handle = client.peer().send_cancellable_request(request, options).await.unwrap();
    assert!(handle.await_response().await.is_err(), "the request timed out and was cancelled");
    let sleeper: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let mut gone = false;
    for _ in 0..50 {
        let stat = std::fs::read_to_string(format!("/proc/{sleeper}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z") {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "cancellation killed the background sleep in the group");

    // A background process outlives the connection that started it.
    let started = ok(&client, "exec_start", json!({"command": "echo begun; sleep 0.5; echo done"})).await;
    let id = started["id"].as_str().unwrap().to_string();
    client.cancel().await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let again = connect(&agent.socket, Collector::default()).await;
    let output = ok(&again, "exec_output", json!({"id": id})).await;
    assert_eq!(
        (output["stdout"].as_str(), output["running"].as_bool(), output["exit_code"].as_i64()),
        (Some("begun\ndone\n"), Some(false), Some(0))
    );
    let long_runner = ok(&again, "exec_start", json!({"argv": ["sleep", "60"]})).await;
    let killed = ok(&again, "exec_kill", json!({"id": long_runner["id"]})).await;
    assert_eq!((killed["running"].as_bool(), killed["signal"].as_i64()), (Some(false), Some(9)));
    again.cancel().await.unwrap();
    agent.child.start_kill().unwrap();
}

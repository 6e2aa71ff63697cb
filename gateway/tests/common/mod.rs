//! Test harness: runs the real `moat` binary in a private HOME and talks to it
//! over its real transports. `Drop` kills whatever a test started.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report
#![allow(dead_code, clippy::disallowed_methods)] // tests spawn the binaries under test directly

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub mod node;

use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const MOAT: &str = env!("CARGO_BIN_EXE_moat");

/// An image file CI builds under target/ci (`rel`), or where `$var` says; panics with how to
/// build it when it is missing.
fn ci_image(var: &str, rel: &str, build: &str) -> PathBuf {
    let image = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel));
    assert!(image.is_file(), "no image at {}: build it with `{build}` (as root), or set {var}", image.display());
    image
}

/// The Debian image the tests import: `$MOAT_DEBIAN_IMAGE`, else what `.ci/test` builds.
pub fn debian_image() -> PathBuf {
    ci_image(
        "MOAT_DEBIAN_IMAGE",
        "target/ci/debian-image/rootfs.ext4",
        "moat image build debian --out target/ci/debian-image",
    )
}

/// The portal image (Debian with Node 24 and OpenClaw): `$MOAT_PORTAL_IMAGE`, else what
/// `.ci/test` builds.
pub fn portal_image() -> PathBuf {
    ci_image(
        "MOAT_PORTAL_IMAGE",
        "target/ci/portal-image/rootfs.ext4",
        "moat image build portal --debian target/ci/debian-image/rootfs.ext4 --openclaw target/ci/openclaw \
         --out target/ci/portal-image",
    )
}

/// The git service images (root, data) in `$MOAT_GIT_IMAGE`, else where `.ci/test` builds them.
pub fn git_images() -> (PathBuf, PathBuf) {
    let dir = std::env::var_os("MOAT_GIT_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ci/git-image"));
    let (root, data) = (dir.join("rootfs.ext4"), dir.join("data.ext4"));
    assert!(
        root.is_file() && data.is_file(),
        "no git images in {}: build them with `moat image build git --debian target/ci/debian-image/rootfs.ext4 \
         --out target/ci/git-image`, or set MOAT_GIT_IMAGE",
        dir.display()
    );
    (root, data)
}

/// A private HOME so XDG defaults point into a temp dir.
pub struct Home {
    pub dir: TempDir,
}

impl Home {
    pub fn new() -> Home {
        Home { dir: tempfile::tempdir().expect("temp dir") }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path().join(".local/state/moat")
    }

    /// `moat ARGS` with HOME pointing here and no inherited MOAT_* settings.
    pub fn moat(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(MOAT);
        cmd.args(args).env("HOME", self.path()).env("MOAT_LOG", "info,moat_gateway=debug").kill_on_drop(true);
        for (key, _) in std::env::vars() {
            if key.starts_with("MOAT_") && key != "MOAT_LOG" || key.starts_with("XDG_") {
                cmd.env_remove(key);
            }
        }
        cmd
    }

    /// Runs a `moat` subcommand to completion; returns (success, stdout, stderr).
    pub async fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.moat(args).stdin(Stdio::null()).output().await.expect("moat runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Creates an API key with `moat keys create` and returns the secret.
    pub async fn key(&self, name: &str, role: &str) -> String {
        let (ok, stdout, stderr) = self.run(&["keys", "create", "--name", name, "--role", role]).await;
        assert!(ok, "keys create failed: {stderr}");
        let key = stdout.trim().to_string();
        assert!(key.starts_with("moat_"), "{stdout}");
        key
    }

    /// `moat serve` on stdio, connected to an rmcp client.
    pub async fn stdio_client(&self, extra: &[&str]) -> RunningService<RoleClient, ()> {
        let mut args = vec!["serve"];
        args.extend_from_slice(extra);
        let mut cmd = self.moat(&args);
        cmd.stderr(Stdio::inherit());
        let transport = TokioChildProcess::new(cmd).expect("spawn moat serve");
        tokio::time::timeout(Duration::from_secs(30), ().serve(transport))
            .await
            .expect("moat initializes within 30 s")
            .expect("MCP initialize succeeds")
    }

    /// `moat serve --http 127.0.0.1:0 EXTRA`, waiting until it prints its URL.
    pub async fn http_server(&self, extra: &[&str]) -> HttpMoat {
        let mut args = vec!["serve", "--http", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let mut cmd = self.moat(&args);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn moat serve --http");
        let (url, log) = wait_for_field(&mut child, "moat listening", "url=").await;
        let key = self.key("tester", "cluster-admin").await;
        HttpMoat { child, url, log, key }
    }
}

pub struct HttpMoat {
    pub child: Child,
    /// e.g. http://127.0.0.1:43123/mcp
    pub url: String,
    pub log: Arc<Mutex<Vec<String>>>,
    /// A cluster-admin key named `tester`.
    pub key: String,
}

impl Drop for HttpMoat {
    /// A failing test shows what the gateway logged last.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log.lock().map(|l| l.clone()).unwrap_or_default();
            let keep = std::env::var("MOAT_TEST_LOG_LINES").ok().and_then(|n| n.parse().ok()).unwrap_or(60);
            eprintln!("--- moat serve log (last {keep} lines; MOAT_TEST_LOG_LINES shows more) ---");
            for line in &log[log.len().saturating_sub(keep)..] {
                eprintln!("{line}");
            }
        }
    }
}

impl HttpMoat {
    /// An rmcp client over HTTP authenticated with `key`.
    pub async fn client(&self, key: &str) -> RunningService<RoleClient, ()> {
        let config = StreamableHttpClientTransportConfig::with_uri(self.url.clone()).auth_header(key.to_string());
        let transport = StreamableHttpClientTransport::with_client(reqwest::Client::new(), config);
        ().serve(transport).await.expect("MCP initialize over HTTP succeeds")
    }

    /// SIGHUP: reload policies.
    pub fn hangup(&self) {
        // SAFETY: kill(2) with a valid signal on our own child's pid touches no memory.
        unsafe { libc::kill(self.child.id().expect("running") as i32, libc::SIGHUP) };
    }

    /// Lines the server logged so far.
    pub fn logged(&self, needle: &str) -> bool {
        self.logged_times(needle) > 0
    }

    /// How many log lines so far contain `needle`.
    pub fn logged_times(&self, needle: &str) -> usize {
        lines_with(&self.log, needle)
    }

    pub fn base(&self) -> String {
        self.url.trim_end_matches("/mcp").to_string()
    }

    pub fn port(&self) -> u16 {
        self.base().rsplit(':').next().and_then(|p| p.parse().ok()).expect("url has a port")
    }

    /// SIGTERM, then the exit status (within 10 s).
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("child still running") as i32;
        // SAFETY: kill(2) with a valid signal on our own child's pid touches no memory.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("moat exits within 10 s of SIGTERM")
            .expect("wait works")
    }
}

/// Reads the child's stderr until a line containing `marker`, returning the value after `field`.
/// Keeps draining stderr in the background into the returned log so the child never blocks.
pub async fn wait_for_field(child: &mut Child, marker: &str, field: &str) -> (String, Arc<Mutex<Vec<String>>>) {
    let stderr = child.stderr.take().expect("stderr piped");
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let shown_marker = marker.to_string();
    let (marker, field) = (marker.to_string(), field.to_string());
    let sink = log.clone();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(&marker)
                && let Some(rest) = line.split(&field).nth(1)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_string());
            }
            sink.lock().expect("log lock").push(line);
        }
    });
    let value = tokio::time::timeout(Duration::from_secs(60), rx)
        .await
        .unwrap_or_else(|_| panic!("no `{shown_marker}` line within 60 s; log: {:?}", log.lock().expect("log lock")))
        .expect("stderr reader alive");
    (value, log)
}

/// A 2025-11-25 `initialize` request, for tests that speak raw HTTP.
pub fn initialize_request() -> Value {
    serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}})
}

/// Calls a tool, returning the result (tool-level errors included) or the JSON-RPC error.
pub async fn call<H: rmcp::ClientHandler>(
    client: &RunningService<RoleClient, H>,
    tool: &str,
    args: Value,
) -> Result<CallToolResult, rmcp::ServiceError> {
    let mut params = CallToolRequestParams::new(tool.to_string());
    if let Value::Object(map) = args {
        params = params.with_arguments(map);
    }
    client.call_tool(params).await
}

/// The structured content of a successful call.
pub async fn call_ok<H: rmcp::ClientHandler>(client: &RunningService<RoleClient, H>, tool: &str, args: Value) -> Value {
    let result = call(client, tool, args).await.unwrap_or_else(|e| panic!("{tool} failed: {e}"));
    assert_ne!(result.is_error, Some(true), "{tool} returned a tool error: {result:?}");
    result.structured_content.unwrap_or_else(|| panic!("{tool} returned no structured content"))
}

/// The JSON-RPC error of a failed call: (code, message, data).
pub async fn call_err<H: rmcp::ClientHandler>(
    client: &RunningService<RoleClient, H>,
    tool: &str,
    args: Value,
) -> (i32, String, Option<Value>) {
    match call(client, tool, args).await {
        Err(rmcp::ServiceError::McpError(e)) => (e.code.0, e.message.to_string(), e.data),
        other => panic!("{tool}: expected a JSON-RPC error, got {other:?}"),
    }
}

/// The text of a tool-level error (isError), failing the test on success.
pub async fn tool_error<H: rmcp::ClientHandler>(
    client: &RunningService<RoleClient, H>,
    tool: &str,
    args: Value,
) -> String {
    let result = call(client, tool, args).await.unwrap_or_else(|e| panic!("{tool}: JSON-RPC error {e}"));
    assert_eq!(result.is_error, Some(true), "{tool} should fail: {result:?}");
    result.content.iter().filter_map(|c| c.as_text().map(|t| t.text.clone())).collect::<Vec<_>>().join("\n")
}

/// How many lines of a captured log contain `needle`.
pub fn lines_with(log: &std::sync::Mutex<Vec<String>>, needle: &str) -> usize {
    log.lock().expect("log lock").iter().filter(|l| l.contains(needle)).count()
}

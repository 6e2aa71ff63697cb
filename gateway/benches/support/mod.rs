//! Shared by the bench binaries: a bare rmcp server exposing `whoami`, the
//! servers under test as child processes, and the measuring loops.
#![allow(dead_code, clippy::disallowed_methods)] // starts the servers under test

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientConfig, ErrorData, ListToolsResult,
    PaginatedRequestParams, ProtocolVersion, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{RequestContext, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{RoleClient, RoleServer, ServerHandler, ServiceExt};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

pub const CONCURRENCY: usize = 16;

/// A bench binary's `main`: serves as the bare server when re-executed as one, else runs `bench`.
pub fn main<F: std::future::Future<Output = ()>>(bench: impl FnOnce() -> F) {
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match std::env::args().nth(1).as_deref() {
        Some("--bare-stdio") => rt.block_on(bare::stdio()),
        Some("--bare-http") => rt.block_on(bare::http()),
        Some("--moat-no-pipeline") => rt.block_on(no_pipeline(std::env::args().any(|a| a == "--http"))),
        _ => rt.block_on(bench()),
    }
}

/// moat with the pipeline switched off, built by the bench itself (feature `bench-no-pipeline`,
/// which only the benches and tests enable): the `moat` binary has no way to run like this.
async fn no_pipeline(http: bool) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MOAT_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let serve = moat_gateway::config::ServeOverrides {
        http: http.then(|| "127.0.0.1:0".parse().expect("a socket address")),
        ..Default::default()
    };
    let mut config = moat_gateway::config::load(&Default::default(), &serve, |k| std::env::var(k).ok())
        .expect("the bench's own configuration loads");
    config.insecure_no_pipeline = true;
    moat_gateway::serve::run(config).await.expect("the comparison server runs");
}

/// The same tool on the plainest rmcp server: no pipeline, no state, no node.
pub mod bare {
    use super::*;

    #[derive(Clone)]
    pub struct Bare;

    impl ServerHandler for Bare {
        fn get_info(&self) -> ServerConfig {
            ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
        }
        async fn list_tools(
            &self,
            _: Option<PaginatedRequestParams>,
            _: RequestContext<RoleServer>,
        ) -> Result<ListToolsResult, ErrorData> {
            let spec = moat_tools::ToolName::Whoami.spec();
            Ok(ListToolsResult::with_all_items(vec![Tool::new(
                "whoami",
                spec.description,
                Arc::new(spec.input_schema),
            )]))
        }
        async fn call_tool(
            &self,
            _: CallToolRequestParams,
            ctx: RequestContext<RoleServer>,
        ) -> Result<CallToolResponse, ErrorData> {
            Ok(CallToolResponse::Complete(CallToolResult::structured(json!({
                "principal": "operator", "role": "cluster-admin", "transport": "bench",
                "protocol_version": ctx.protocol_version().map(|v| v.to_string()),
                "session": null, "server_version": "bare",
            }))))
        }
    }

    pub async fn stdio() {
        let running = Bare.serve(rmcp::transport::stdio()).await.unwrap();
        running.waiting().await.unwrap();
    }

    pub async fn http() {
        use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
        use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
        let service = StreamableHttpService::new(
            || Ok(Bare),
            Arc::new(LocalSessionManager::default()),
            StreamableHttpServerConfig::default(),
        );
        let router = axum::Router::new().route_service("/mcp", service);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        eprintln!("bare listening url=http://{}/mcp", listener.local_addr().unwrap());
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, router).await.unwrap();
    }
}

/// A server under test.
#[derive(Clone, Copy, PartialEq)]
pub enum Server {
    /// `moat serve` plus these arguments; `key_role` makes the client authenticate with a fresh key.
    Moat {
        label: &'static str,
        args: &'static [&'static str],
        key_role: Option<&'static str>,
    },
    Bare,
    /// moat's own gateway with the pipeline off, run by the bench binary (see [`no_pipeline`]).
    NoPipeline,
}

impl Server {
    pub fn name(self) -> &'static str {
        match self {
            Server::Moat { label, .. } => label,
            Server::Bare => "bare rmcp",
            Server::NoPipeline => "moat, no pipeline",
        }
    }

    fn command(self, home: &std::path::Path, http: bool) -> tokio::process::Command {
        let mut cmd = match self {
            Server::Moat { args, .. } => {
                let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_moat"));
                c.arg("serve").args(args);
                if http {
                    c.args(["--http", "127.0.0.1:0"]);
                }
                c
            }
            Server::Bare => {
                let mut c = tokio::process::Command::new(std::env::current_exe().expect("bench binary path"));
                c.arg(if http { "--bare-http" } else { "--bare-stdio" });
                c
            }
            Server::NoPipeline => {
                let mut c = tokio::process::Command::new(std::env::current_exe().expect("bench binary path"));
                c.arg("--moat-no-pipeline");
                if http {
                    c.arg("--http");
                }
                c
            }
        };
        cmd.env("HOME", home).env("MOAT_LOG", if http { "info" } else { "warn" }).kill_on_drop(true);
        cmd.env_remove("XDG_STATE_HOME").env_remove("XDG_CONFIG_HOME").env_remove("MOAT_API_KEY");
        cmd
    }

    /// Creates an API key in `home` when this server wants one.
    async fn key(self, home: &std::path::Path) -> Option<String> {
        let Server::Moat { key_role: Some(role), .. } = self else { return None };
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_moat"))
            .args(["keys", "create", "--name", "bench", "--role", role])
            .env("HOME", home)
            .env_remove("XDG_STATE_HOME")
            .env_remove("XDG_CONFIG_HOME")
            .output()
            .await
            .expect("moat keys create runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

pub struct Connection {
    pub client: RunningService<RoleClient, ClientConfig>,
    /// moat's stderr on stdio runs: its per-call debug lines carry the server-side time.
    server_log: Option<std::path::PathBuf>,
    url: Option<String>,
    key: Option<String>,
    _server: Option<tokio::process::Child>,
    _home: tempfile::TempDir,
}

fn client_config(version: ProtocolVersion) -> ClientConfig {
    let mut c = ClientConfig::default();
    c.protocol_version = version;
    c
}

async fn http_client(
    url: &str,
    key: Option<&str>,
    version: ProtocolVersion,
) -> RunningService<RoleClient, ClientConfig> {
    let mut config = StreamableHttpClientTransportConfig::with_uri(url.to_string());
    if let Some(key) = key {
        config = config.auth_header(key.to_string());
    }
    let transport = StreamableHttpClientTransport::with_client(reqwest::Client::new(), config);
    client_config(version).serve(transport).await.expect("MCP initialize over HTTP")
}

/// Whether a stdio moat logs each call's time inside it (a debug line per call, which costs
/// the server a formatted write to stderr per call: only for benches that report that time).
#[derive(Clone, Copy, PartialEq)]
pub enum Inside {
    Logged,
    NotLogged,
}

pub async fn connect(server: Server, http: bool, version: ProtocolVersion, inside: Inside) -> Connection {
    let home = tempfile::tempdir().expect("temp dir");
    let key = server.key(home.path()).await;
    let mut cmd = server.command(home.path(), http);
    if !http {
        // On stdio moat serves the local operator, as Claude Code and Claude Desktop run it.
        let server_log = (inside == Inside::Logged && matches!(server, Server::Moat { .. } | Server::NoPipeline))
            .then(|| home.path().join("server.log"));
        let stderr: Stdio = match &server_log {
            Some(path) => {
                cmd.env("MOAT_LOG", "warn,moat_gateway::mcp=debug");
                std::fs::File::create(path).expect("log file").into()
            }
            None => Stdio::null(),
        };
        let (transport, _) = TokioChildProcess::builder(cmd).stderr(stderr).spawn().expect("spawn server");
        let client = client_config(version).serve(transport).await.expect("MCP initialize over stdio");
        return Connection { client, server_log, url: None, key, _server: None, _home: home };
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn server");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr piped")).lines();
    let url = loop {
        let line = lines.next_line().await.expect("read stderr").expect("server exited before listening");
        if let Some(rest) = line.split("url=").nth(1) {
            break rest.split_whitespace().next().expect("a URL").to_string();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let client = http_client(&url, key.as_deref(), version).await;
    Connection { client, server_log: None, url: Some(url), key, _server: Some(child), _home: home }
}

pub async fn whoami(client: &RunningService<RoleClient, ClientConfig>) -> Duration {
    let started = Instant::now();
    let result = client.call_tool(CallToolRequestParams::new("whoami")).await.expect("whoami answers");
    let elapsed = started.elapsed();
    assert_ne!(result.is_error, Some(true));
    elapsed
}

pub struct Stats {
    pub p50: Duration,
    pub p99: Duration,
    pub per_sec: f64,
    /// Inside moat, from `tools/call` arriving to its answer being ready (stdio runs of moat only).
    pub server_p50: Option<Duration>,
}

fn stats(mut samples: Vec<Duration>, wall: Duration) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    Stats { p50: at(0.50), p99: at(0.99), per_sec: samples.len() as f64 / wall.as_secs_f64(), server_p50: None }
}

/// `n` sequential calls on one connection, moat logging each call's time inside it.
pub async fn sequential(server: Server, http: bool, version: ProtocolVersion, n: usize) -> Stats {
    let conn = connect(server, http, version, Inside::Logged).await;
    for _ in 0..n / 10 {
        whoami(&conn.client).await;
    }
    let started = Instant::now();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        samples.push(whoami(&conn.client).await);
    }
    let mut result = stats(samples, started.elapsed());
    if let Some(path) = &conn.server_log {
        // Give the server a moment to flush its last lines, then skip the warm-up calls.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let log = std::fs::read_to_string(path).unwrap_or_default();
        let mut inside: Vec<Duration> = log.lines().filter_map(elapsed_of).skip(n / 10).collect();
        inside.sort();
        result.server_p50 = inside.get(inside.len() / 2).copied();
    }
    result
}

/// `n` sequential calls to each of two servers, alternating one call to each, so that the
/// machine's drift over the run (other load, frequency, the page cache) weighs on both alike.
/// Neither server logs per call.
pub async fn interleaved(a: Server, b: Server, http: bool, version: ProtocolVersion, n: usize) -> (Stats, Stats) {
    let first = connect(a, http, version.clone(), Inside::NotLogged).await;
    let second = connect(b, http, version, Inside::NotLogged).await;
    for _ in 0..n / 10 {
        whoami(&first.client).await;
        whoami(&second.client).await;
    }
    let (mut xs, mut ys) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        xs.push(whoami(&first.client).await);
        ys.push(whoami(&second.client).await);
    }
    // Calls per second as each server would serve them alone: its own calls' total time.
    let busy = |v: &[Duration]| v.iter().sum::<Duration>();
    let (wall_x, wall_y) = (busy(&xs), busy(&ys));
    (stats(xs, wall_x), stats(ys, wall_y))
}

/// Parses `elapsed=12.3µs` (tracing's Debug of a Duration) from a log line.
pub fn elapsed_of(line: &str) -> Option<Duration> {
    let rest = line.split("elapsed=").nth(1)?.split_whitespace().next()?;
    let (number, unit) = rest.split_at(rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?);
    let value: f64 = number.parse().ok()?;
    let secs = match unit {
        "ns" => value / 1e9,
        "µs" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

/// 16 clients, each with its own connection (and, on stdio, its own server process).
pub async fn concurrent(server: Server, http: bool, version: ProtocolVersion, per_client: usize) -> Stats {
    let mut conns = Vec::new();
    if http {
        let first = connect(server, true, version.clone(), Inside::NotLogged).await;
        let url = first.url.clone().expect("HTTP connections know their URL");
        let key = first.key.clone();
        conns.push(first);
        for _ in 1..CONCURRENCY {
            let client = http_client(&url, key.as_deref(), version.clone()).await;
            let home = tempfile::tempdir().expect("temp dir");
            conns.push(Connection { client, server_log: None, url: None, key: None, _server: None, _home: home });
        }
    } else {
        for _ in 0..CONCURRENCY {
            conns.push(connect(server, false, version.clone(), Inside::NotLogged).await);
        }
    }
    for c in &conns {
        for _ in 0..20 {
            whoami(&c.client).await;
        }
    }
    let started = Instant::now();
    let tasks = conns.iter().map(|c| async move {
        let mut samples = Vec::with_capacity(per_client);
        for _ in 0..per_client {
            samples.push(whoami(&c.client).await);
        }
        samples
    });
    let samples: Vec<Duration> = futures::future::join_all(tasks).await.into_iter().flatten().collect();
    stats(samples, started.elapsed())
}

pub fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

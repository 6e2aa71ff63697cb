//! `whoami` round trip: moat against a bare rmcp server exposing the same
//! tool, over stdio and Streamable HTTP, sequential and with 16 concurrent
//! clients, in one run. Both servers run as separate processes; the bare one
//! is this binary re-executed with `--bare-stdio` / `--bare-http`.
//!
//!     cargo bench -p moat-gateway --bench whoami
//!
//! MOAT_BENCH_N (sequential calls, default 2000) and MOAT_BENCH_CONC_N (calls
//! per concurrent client, default 300) size the run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // a bench binary

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientConfig, ErrorData, ListToolsResult,
    PaginatedRequestParams, ProtocolVersion, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{RequestContext, RunningService};
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{RoleClient, RoleServer, ServerHandler, ServiceExt};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

const CONCURRENCY: usize = 16;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    match args.get(1).map(String::as_str) {
        Some("--bare-stdio") => rt.block_on(bare::stdio()),
        Some("--bare-http") => rt.block_on(bare::http()),
        _ => rt.block_on(run()),
    }
}

/// The same tool on the plainest rmcp server: no pipeline, no state, no node.
mod bare {
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

#[derive(Clone, Copy, PartialEq)]
enum Server {
    Moat,
    Bare,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Moat => "moat",
            Server::Bare => "bare rmcp",
        }
    }

    fn command(self, home: &std::path::Path, http: bool) -> tokio::process::Command {
        let mut cmd = match self {
            Server::Moat => {
                let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_moat"));
                c.arg("serve");
                if http {
                    c.args(["--http", "127.0.0.1:0"]);
                }
                c
            }
            Server::Bare => {
                let mut c = tokio::process::Command::new(std::env::current_exe().unwrap());
                c.arg(if http { "--bare-http" } else { "--bare-stdio" });
                c
            }
        };
        cmd.env("HOME", home).env("MOAT_LOG", if http { "info" } else { "warn" }).kill_on_drop(true);
        cmd.env_remove("XDG_STATE_HOME").env_remove("XDG_CONFIG_HOME");
        cmd
    }
}

struct Connection {
    client: RunningService<RoleClient, ClientConfig>,
    /// The server's URL, for HTTP.
    url: Option<String>,
    _server: Option<tokio::process::Child>,
    _home: tempfile::TempDir,
}

fn client_config(version: ProtocolVersion) -> ClientConfig {
    let mut c = ClientConfig::default();
    c.protocol_version = version;
    c
}

async fn connect(server: Server, http: bool, version: ProtocolVersion) -> Connection {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = server.command(home.path(), http);
    if !http {
        cmd.stderr(Stdio::null());
        let client = client_config(version).serve(TokioChildProcess::new(cmd).unwrap()).await.unwrap();
        return Connection { client, url: None, _server: None, _home: home };
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next_line().await.unwrap().expect("server exited before listening");
        if let Some(rest) = line.split("url=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let client = client_config(version).serve(StreamableHttpClientTransport::from_uri(url.clone())).await.unwrap();
    Connection { client, url: Some(url), _server: Some(child), _home: home }
}

async fn whoami(client: &RunningService<RoleClient, ClientConfig>) -> Duration {
    let started = Instant::now();
    let result = client.call_tool(CallToolRequestParams::new("whoami")).await.unwrap();
    let elapsed = started.elapsed();
    assert_ne!(result.is_error, Some(true));
    elapsed
}

struct Stats {
    p50: Duration,
    p99: Duration,
    per_sec: f64,
}

fn stats(mut samples: Vec<Duration>, wall: Duration) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    Stats { p50: at(0.50), p99: at(0.99), per_sec: samples.len() as f64 / wall.as_secs_f64() }
}

async fn sequential(server: Server, http: bool, version: ProtocolVersion, n: usize) -> Stats {
    let conn = connect(server, http, version).await;
    for _ in 0..n / 10 {
        whoami(&conn.client).await;
    }
    let started = Instant::now();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        samples.push(whoami(&conn.client).await);
    }
    stats(samples, started.elapsed())
}

/// 16 clients, each with its own connection (and, on stdio, its own server process).
async fn concurrent(server: Server, http: bool, version: ProtocolVersion, per_client: usize) -> Stats {
    let mut conns = Vec::new();
    if http {
        // One server, 16 clients with their own connections.
        let first = connect(server, true, version.clone()).await;
        let url = first.url.clone().expect("HTTP connections know their URL");
        conns.push(first);
        for _ in 1..CONCURRENCY {
            let client = client_config(version.clone())
                .serve(StreamableHttpClientTransport::from_uri(url.clone()))
                .await
                .unwrap();
            conns.push(Connection { client, url: None, _server: None, _home: tempfile::tempdir().unwrap() });
        }
    } else {
        for _ in 0..CONCURRENCY {
            conns.push(connect(server, false, version.clone()).await);
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

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn run() {
    let n = env_usize("MOAT_BENCH_N", 2000);
    let per_client = env_usize("MOAT_BENCH_CONC_N", 300);
    println!("| transport | protocol | mode | server | p50 µs | p99 µs | calls/s | moat/bare p50 |");
    println!("|---|---|---|---|---|---|---|---|");
    let legacy = ProtocolVersion::V_2025_11_25;
    let modern = ProtocolVersion::V_2026_07_28;
    let cases = [
        ("stdio", false, legacy.clone(), false),
        ("stdio", false, modern.clone(), false),
        ("http", true, legacy.clone(), false),
        ("http", true, modern.clone(), false),
        ("stdio", false, legacy.clone(), true),
        ("http", true, legacy.clone(), true),
        ("http", true, modern.clone(), true),
    ];
    for (transport, http, version, conc) in cases {
        let mut bare_p50 = None;
        for server in [Server::Bare, Server::Moat] {
            let s = if conc {
                concurrent(server, http, version.clone(), per_client).await
            } else {
                sequential(server, http, version.clone(), n).await
            };
            let ratio = match (server, bare_p50) {
                (Server::Moat, Some(b)) => format!("{:.2}×", s.p50.as_secs_f64() / b),
                _ => String::from("—"),
            };
            if server == Server::Bare {
                bare_p50 = Some(s.p50.as_secs_f64());
            }
            println!(
                "| {transport} | {version} | {} | {} | {:.0} | {:.0} | {:.0} | {ratio} |",
                if conc { format!("{CONCURRENCY} clients") } else { "sequential".into() },
                server.name(),
                s.p50.as_secs_f64() * 1e6,
                s.p99.as_secs_f64() * 1e6,
                s.per_sec,
            );
        }
    }
}

//! Load, as a client sees it: MOAT_LOAD_SESSIONS (1,000) Streamable HTTP sessions, each with an
//! agent key of its own, call `whoami` then `vm_list` in a closed loop for MOAT_LOAD_SECONDS (60)
//! against `moat serve --http` (this build, with its embedded node). Reported: calls answered and
//! failed, p50/p99/max latency, the gateway's peak RSS (sampled from /proc every 250 ms), whether
//! every answered call has its audit records, and `moat audit verify` on the result. Then
//! `moat audit verify` timed on MOAT_LOAD_RECORDS (1,000,000) records written by moat's own
//! audit writer.
//!
//!     cargo bench -p moat-gateway --bench load
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // a bench binary

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rmcp::model::{CallToolRequestParams, ClientConfig, ProtocolVersion};
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{RoleClient, ServiceExt};
use support::env_usize;
use tokio::io::{AsyncBufReadExt, BufReader};

const MOAT: &str = env!("CARGO_BIN_EXE_moat");

fn main() {
    support::main(run);
}

fn moat(home: &Path, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(MOAT);
    cmd.args(args).env("HOME", home).env_remove("XDG_STATE_HOME").env_remove("XDG_CONFIG_HOME");
    cmd.env_remove("MOAT_API_KEY").kill_on_drop(true);
    cmd
}

/// `n` agent keys, made by `moat keys create`, 8 at a time.
async fn keys(home: &Path, n: usize) -> Vec<String> {
    let mut keys = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(8) {
        let made = futures::future::join_all(chunk.iter().map(|i| async move {
            let name = format!("agent{i:04}");
            let out = moat(home, &["keys", "create", "--name", &name, "--role", "agent"]).output().await.unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }))
        .await;
        keys.extend(made);
    }
    keys
}

async fn client(url: &str, key: &str) -> RunningService<RoleClient, ClientConfig> {
    let config = StreamableHttpClientTransportConfig::with_uri(url.to_string()).auth_header(key.to_string());
    let transport = StreamableHttpClientTransport::with_client(reqwest::Client::new(), config);
    let mut info = ClientConfig::default();
    info.protocol_version = ProtocolVersion::V_2025_11_25;
    info.serve(transport).await.expect("MCP initialize over HTTP")
}

/// Starts a server that logs `url=<its address>` on stderr; returns it and that URL.
async fn start(cmd: &mut tokio::process::Command) -> (tokio::process::Child, String) {
    use std::process::Stdio;
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next_line().await.unwrap().expect("the server exited before listening");
        if let Some(rest) = line.split("url=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url)
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// `moat audit verify` on `home`'s state: (clean, seconds, its last line).
async fn verify(home: &Path) -> (bool, f64, String) {
    let started = Instant::now();
    let out = moat(home, &["audit", "verify"]).output().await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let last = text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or_default().to_string();
    (out.status.success(), secs, last)
}

async fn run() {
    let sessions = env_usize("MOAT_LOAD_SESSIONS", 1000);
    let seconds = env_usize("MOAT_LOAD_SECONDS", 60) as u64;
    let records = env_usize("MOAT_LOAD_RECORDS", 1_000_000);
    let home = tempfile::tempdir().unwrap();

    let made = Instant::now();
    let keys = keys(home.path(), sessions).await;
    eprintln!("{sessions} agent keys in {:.1} s", made.elapsed().as_secs_f64());

    // MOAT_LOAD_PROFILER="heaptrack -o /tmp/moat-load" runs the server under a profiler (its
    // RSS figures are then the profiler's process, not moat's).
    let mut serve = moat(home.path(), &["serve", "--http", "127.0.0.1:0"]);
    if let Ok(profiler) = std::env::var("MOAT_LOAD_PROFILER") {
        let mut words = profiler.split_whitespace();
        let mut wrapped = tokio::process::Command::new(words.next().expect("a profiler command"));
        wrapped.args(words).arg(MOAT).args(["serve", "--http", "127.0.0.1:0"]).env("HOME", home.path());
        wrapped
            .env_remove("XDG_STATE_HOME")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("MOAT_API_KEY")
            .kill_on_drop(true);
        serve = wrapped;
    }
    let (mut server, url) =
        start(serve.env("MOAT_LOG", "warn,moat_gateway::serve=info,moat_gateway::mcp::http=info")).await;
    let pid = server.id().unwrap();

    let moat_run = drive(&url, &keys, pid, ["whoami", "vm_list"], seconds).await;
    // SAFETY: kill(2) on the server this bench started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = server.wait().await.unwrap();

    // The peer, in the same run: the plainest rmcp server over the same transport and session
    // manager, with the same sessions calling its one tool twice per round.
    let mut bare_cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
    let (mut bare, bare_url) = start(bare_cmd.arg("--bare-http")).await;
    let bare_pid = bare.id().unwrap();
    let bare_run = drive(&bare_url, &keys, bare_pid, ["whoami", "whoami"], seconds).await;
    bare.kill().await.unwrap();

    let answered = moat_run.latencies.len() as i64;
    let failed = moat_run.errors.len();
    let db = home.path().join(".local/state/moat/moat.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
    let audited_calls = count(
        "SELECT COUNT(*) FROM audit_log WHERE kind = 'call' AND tool IN ('whoami', 'vm_list') AND transport = 'http'",
    );
    let audited_outcomes = count(
        "SELECT COUNT(*) FROM audit_log WHERE kind = 'outcome' AND tool IN ('whoami', 'vm_list') AND transport = 'http'",
    );
    drop(conn);
    let (clean, verify_secs, verify_said) = verify(home.path()).await;

    let date = std::process::Command::new("date").arg("-u").arg("+%Y-%m-%d").output().unwrap();
    let date = String::from_utf8_lossy(&date.stdout).trim().to_string();
    println!("Load ({date}), {sessions} HTTP sessions × {seconds} s in a closed loop, the peer in the same run:\n");
    println!(
        "| server | calls answered | failed | rate-limited | calls/s | p50 ms | p99 ms | max ms | RSS idle → sessions open → peak MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, r) in [("moat (whoami + vm_list)", &moat_run), ("bare rmcp (whoami × 2)", &bare_run)] {
        println!("| {name} | {} |", r.row());
    }
    println!(
        "\nmoat's audit log after the run: {audited_calls} call + {audited_outcomes} outcome records for {} calls; \
         `moat audit verify`: {} in {verify_secs:.1} s",
        answered + failed as i64,
        if clean { "clean" } else { "NOT clean" },
    );
    for e in moat_run.errors.iter().take(5) {
        println!("error: {e}");
    }
    assert!(status.success(), "moat exited {status}");
    assert_eq!(audited_calls, answered + failed as i64, "every call is audited");
    assert!(clean, "audit verify: {verify_said}");

    million(records).await;
}

/// What one server did under the load.
struct Run {
    latencies: Vec<Duration>,
    errors: Vec<String>,
    wall: Duration,
    rss_idle_kib: u64,
    rss_open_kib: u64,
    rss_peak_kib: u64,
}

impl Run {
    fn row(&self) -> String {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let at = |q: f64| sorted[((sorted.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3;
        let limited = self.errors.iter().filter(|e| e.contains("rate limited")).count();
        let mib = |kib: u64| kib as f64 / 1024.0;
        format!(
            "{} | {} | {limited} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} → {:.0} → {:.0}",
            sorted.len(),
            self.errors.len() - limited,
            sorted.len() as f64 / self.wall.as_secs_f64(),
            at(0.50),
            at(0.99),
            at(1.0),
            mib(self.rss_idle_kib),
            mib(self.rss_open_kib),
            mib(self.rss_peak_kib),
        )
    }
}

/// Opens one session per key on `url` and has each call `tools` in turn until `seconds` pass,
/// sampling process `pid`'s RSS.
async fn drive(url: &str, keys: &[String], pid: u32, tools: [&'static str; 2], seconds: u64) -> Run {
    let sessions = keys.len();
    let rss_idle_kib = rss_kib(pid, "VmRSS:");
    let opened = Instant::now();
    let mut clients = Vec::with_capacity(sessions);
    for chunk in keys.chunks(50) {
        clients.extend(futures::future::join_all(chunk.iter().map(|k| client(url, k))).await);
    }
    eprintln!("{sessions} sessions open in {:.1} s", opened.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let open_rss = rss_kib(pid, "VmRSS:");

    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid, "VmRSS:"), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| {
            tokio::spawn(async move {
                let (mut latencies, mut errors) = (Vec::new(), Vec::new());
                while Instant::now() < deadline {
                    for tool in tools {
                        let at = Instant::now();
                        match client.call_tool(CallToolRequestParams::new(tool)).await {
                            Ok(r) if r.is_error != Some(true) => latencies.push(at.elapsed()),
                            Ok(r) => errors.push(format!("{tool}: {:?}", r.content)),
                            Err(e) => errors.push(format!("{tool}: {e}")),
                        }
                    }
                }
                let _ = client.cancel().await;
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    for task in tasks {
        let (l, e) = task.await.unwrap();
        latencies.extend(l);
        errors.extend(e);
    }
    let wall = started.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let peak_rss = peak.load(Ordering::Relaxed).max(rss_kib(pid, "VmHWM:"));
    Run { latencies, errors, wall, rss_idle_kib, rss_open_kib: open_rss, rss_peak_kib: peak_rss }
}

/// `records` records written through moat's own audit writer (group commit, 64 writers), then
/// `moat audit verify` on them, timed as a person would run it.
async fn million(records: usize) {
    let home = tempfile::tempdir().unwrap();
    let dir: PathBuf = home.path().join(".local/state/moat");
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("moat.db");
    let state = moat_gateway::store::State::open(&db).await.unwrap();
    let log = moat_gateway::store::audit::AuditLog::start(&db, moat_gateway::store::Durability::Process).unwrap();
    let written = Instant::now();
    let writers = 64;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let log = log.clone();
            tokio::spawn(async move {
                for i in (w..records).step_by(writers) {
                    let record = moat_gateway::store::audit::CallRecord {
                        principal: format!("agent{:04}", i % 1000),
                        acting_for: None,
                        role: "agent".into(),
                        transport: "http".into(),
                        session: Some(format!("s{}", i % 1000)),
                        tool: if i % 2 == 0 { "whoami" } else { "vm_list" }.into(),
                        resource: None,
                        decision: moat_gateway::store::audit::Decision::Allowed,
                        args_digest: moat_gateway::store::audit::args_digest(None),
                        args_shape: moat_gateway::store::audit::args_shape(None),
                    };
                    log.record_call(&record).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    log.shutdown().await;
    let write_secs = written.elapsed().as_secs_f64();
    // A signed checkpoint, as `moat serve` writes at shutdown, so verify checks the anchor too.
    let anchor = moat_gateway::store::audit::anchor::Anchor::open(
        &dir.join("audit.key"),
        dir.join("audit-checkpoints.jsonl"),
        None,
    )
    .unwrap();
    anchor.checkpoint(state.pool()).await.unwrap();
    drop(state);
    let (clean, secs, said) = verify(home.path()).await;
    let size = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0) as f64 / (1 << 20) as f64;
    println!("\n`moat audit verify` on {records} records ({size:.0} MiB database, written in {write_secs:.0} s):\n");
    println!("| records | verify s | target s | result |");
    println!("|---|---|---|---|");
    println!("| {records} | {secs:.1} | 10 | {} ({said}) |", if clean { "clean" } else { "NOT clean" });
}

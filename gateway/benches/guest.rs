//! Inside a VM: `vm_exec true` from an MCP client through gateway → node →
//! guest agent, against the same guest reached without moat in the same run
//! (a raw hybrid-vsock round trip on the agent's control channel, and an MCP
//! `exec` straight over hybrid vsock), then file transfer both ways.
//!
//!     cargo bench -p moat-gateway --bench guest
//!
//! Uses the release `moat serve --http` with its embedded node, QEMU (TCG on
//! hosts without usable KVM) and vhost-device-vsock. MOAT_BENCH_N (calls per
//! measure, default 200), MOAT_BENCH_MIB (file size, default 8),
//! MOAT_GUEST_IMAGE (default target/ci/guest-image, which must include moat-guest).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // a bench binary

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e6
}

async fn call(client: &RunningService<RoleClient, ()>, tool: &str, args: Value) -> Value {
    let params = CallToolRequestParams::new(tool.to_string()).with_arguments(args.as_object().unwrap().clone());
    let result = client.call_tool(params).await.unwrap();
    assert_ne!(result.is_error, Some(true), "{tool}: {result:?}");
    result.structured_content.unwrap()
}

async fn timed<F: std::future::Future<Output = ()>>(n: usize, mut f: impl FnMut() -> F) -> Vec<Duration> {
    for _ in 0..10 {
        f().await;
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await;
        times.push(t.elapsed());
    }
    times.sort();
    times
}

#[tokio::main]
async fn main() {
    let n = env_usize("MOAT_BENCH_N", 200);
    let mib = env_usize("MOAT_BENCH_MIB", 8);
    let home = tempfile::tempdir().unwrap();
    let state = home.path().join("state");
    let image = std::env::var_os("MOAT_GUEST_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ci/guest-image"));
    std::fs::create_dir_all(state.join("images")).unwrap();
    std::os::unix::fs::symlink(image.canonicalize().expect("a guest image with moat-guest"), state.join("images/base"))
        .unwrap();
    let moat = |args: &[&str]| {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_moat"));
        c.args(args).env("MOAT_STATE_DIR", &state).env("MOAT_LOG", "warn,moat_gateway::serve=info").kill_on_drop(true);
        c
    };
    let key = String::from_utf8(
        moat(&["keys", "create", "--name", "bench", "--role", "cluster-admin"]).output().await.unwrap().stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let mut server = moat(&["serve", "--http", "127.0.0.1:0"]).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(server.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next_line().await.unwrap().expect("moat printed its URL");
        if let Some(rest) = line.split("url=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let config = StreamableHttpClientTransportConfig::with_uri(url).auth_header(key);
    let client = ().serve(StreamableHttpClientTransport::with_client(reqwest::Client::new(), config)).await.unwrap();
    let created =
        call(&client, "vm_create", json!({"name": "bench", "vcpus": 1, "memory_mib": 512, "wait_ready": true})).await;
    let id = created["vm"]["id"].as_str().unwrap().to_string();
    let accel = created["vm"]["accel"].as_str().unwrap_or("?").to_string();
    let socket = state.join("node/vms").join(&id).join("vsock.sock");
    let rss = |v: Value| v["stdout"].as_str().unwrap_or("").split_whitespace().nth(1).unwrap_or("?").to_string();
    let probe = json!({"vm": "bench", "command": "grep VmRSS /proc/$(pidof moat-guest)/status"});
    let rss_idle = rss(call(&client, "vm_exec", probe.clone()).await);

    println!("Round trips to one guest (QEMU {accel}, 1 vCPU), {n} sequential calls each after 10 warm-up:\n");
    println!("| path | p50 µs | p99 µs |");
    println!("|---|---|---|");
    // Raw: the agent's control channel over hybrid vsock, one ping per round trip.
    let stream = moat_node::vsock::connect(&socket, 100, Duration::from_secs(30)).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut replies = BufReader::new(read).lines();
    let mut raw = Vec::with_capacity(n);
    for i in 0..n + 10 {
        let t = Instant::now();
        write.write_all(b"{\"type\":\"ping\"}\n").await.unwrap();
        replies.next_line().await.unwrap().unwrap();
        if i >= 10 {
            raw.push(t.elapsed());
        }
    }
    raw.sort();
    println!("| raw hybrid vsock: control ping/pong (no moat) | {:.0} | {:.0} |", pct(&raw, 0.5), pct(&raw, 0.99));
    // MCP exec straight to the agent over hybrid vsock: the guest's own cost of `true`.
    let stream = moat_node::vsock::connect(&socket, 200, Duration::from_secs(30)).await.unwrap();
    let (r, w) = stream.into_split();
    let direct = ().serve((r, w)).await.unwrap();
    let direct_times = timed(n, || async {
        call(&direct, "exec", json!({"argv": ["true"]})).await;
    })
    .await;
    println!(
        "| MCP exec `true` straight over hybrid vsock (no gateway, no node) | {:.0} | {:.0} |",
        pct(&direct_times, 0.5),
        pct(&direct_times, 0.99)
    );
    let through = timed(n, || async {
        call(&client, "vm_exec", json!({"vm": "bench", "argv": ["true"]})).await;
    })
    .await;
    println!(
        "| `vm_exec true` via MCP client → gateway (HTTP, full pipeline) → node (gRPC) → guest | {:.0} | {:.0} |",
        pct(&through, 0.5),
        pct(&through, 0.99)
    );

    println!("\nFile transfer through moat, {mib} MiB of binary (base64 in JSON), 3 runs each, best:\n");
    println!("| direction | MiB/s |");
    println!("|---|---|");
    use base64::Engine;
    let bytes: Vec<u8> = (0..mib * 1024 * 1024).map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8).collect();
    let content = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let mut best_in = f64::MAX;
    let mut best_out = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        call(
            &client,
            "vm_file_write",
            json!({"vm": "bench", "path": "/root/b", "content": content, "encoding": "base64"}),
        )
        .await;
        best_in = best_in.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        call(&client, "vm_file_read", json!({"vm": "bench", "path": "/root/b", "encoding": "base64"})).await;
        best_out = best_out.min(t.elapsed().as_secs_f64());
    }
    println!("| host → guest (vm_file_write) | {:.1} |", mib as f64 / best_in);
    println!("| guest → host (vm_file_read) | {:.1} |", mib as f64 / best_out);
    let rss_after = rss(call(&client, "vm_exec", probe).await);
    println!("\nmoat-guest RSS in the guest: {rss_idle} kB after boot, {rss_after} kB after the transfers");
    call(&client, "vm_delete", json!({"vm": "bench"})).await;
    server.start_kill().unwrap();
}

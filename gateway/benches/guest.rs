//! Inside a VM: `vm_exec true` from an MCP client through gateway → node →
//! guest agent, against the same guest reached without moat in the same run
//! (a raw hybrid-vsock round trip on the agent's control channel, and an MCP
//! `exec` straight over hybrid vsock), then file transfer both ways.
//!
//!     cargo bench -p moat-gateway --bench guest
//!
//! moat is reached two ways in the same run, as clients reach it: Streamable HTTP with an
//! API key, and stdio as the local operator (`moat serve --http ... --stdio`).
//!
//! Uses the release `moat serve --http --stdio` with its embedded node, QEMU (TCG on
//! hosts without usable KVM) and vhost-device-vsock. MOAT_BENCH_N (calls per
//! measure, default 200), MOAT_BENCH_MIB (file size, default 8),
//! MOAT_GUEST_IMAGE (default target/ci/guest-image, which must include moat-guest).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // a bench binary

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod support;

use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};
use support::elapsed_of;
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

/// The shortest of three runs of `f`, in seconds.
async fn best_of<F: std::future::Future<Output = ()>>(mut f: impl FnMut() -> F) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        f().await;
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
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
        // mcp=debug: each tools/call's time inside moat, for the breakdown.
        c.args(args)
            .env("MOAT_STATE_DIR", &state)
            .env("MOAT_LOG", "warn,moat_gateway::serve=info,moat_gateway::mcp=debug")
            .kill_on_drop(true);
        c
    };
    let key = String::from_utf8(
        moat(&["keys", "create", "--name", "bench", "--role", "cluster-admin"]).output().await.unwrap().stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    // One server for both transports: stdio is this process's pipe to it.
    let (stdio, server_stderr) =
        rmcp::transport::TokioChildProcess::builder(moat(&["serve", "--http", "127.0.0.1:0", "--stdio"]))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    let mut lines = BufReader::new(server_stderr.unwrap()).lines();
    let url = loop {
        let line = lines.next_line().await.unwrap().expect("moat printed its URL");
        if let Some(rest) = line.split("url=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let kept = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("tools/call") {
                kept.lock().unwrap().push(line);
            }
        }
    });
    // Time inside moat (tools/call arriving to its answer ready) of the last `n` calls of `tool`.
    let inside = |tool: &str, n: usize| -> Vec<Duration> {
        let needle = format!("tool={tool} ");
        let lines = log.lock().unwrap();
        let mut times: Vec<Duration> =
            lines.iter().filter(|l| l.contains(&needle)).filter_map(|l| elapsed_of(l)).collect();
        times = times.split_off(times.len().saturating_sub(n));
        times.sort();
        times
    };
    let config = StreamableHttpClientTransportConfig::with_uri(url).auth_header(key);
    let client = ().serve(StreamableHttpClientTransport::with_client(reqwest::Client::new(), config)).await.unwrap();
    let local = ().serve(stdio).await.unwrap();
    let created =
        call(&client, "vm_create", json!({"name": "bench", "vcpus": 1, "memory_mib": 512, "wait_ready": true})).await;
    let id = created["vm"]["id"].as_str().unwrap().to_string();
    let accel = created["vm"]["accel"].as_str().unwrap_or("?").to_string();
    let socket = state.join("node/vms").join(&id).join("jail/vsock.sock");
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
    let transport = rmcp::transport::async_rw::AsyncRwTransport::new_client(r, w)
        .with_max_line_length(moat_tools::guest::MAX_MESSAGE);
    let direct = ().serve(transport).await.unwrap();
    // Interleaved, one direct call then one through moat on each transport, so the emulated
    // guest's drift over the run (TCG: several hundred µs) weighs on all alike.
    let exec = json!({"vm": "bench", "argv": ["true"]});
    let (mut direct_times, mut via_http, mut via_stdio) = (Vec::new(), Vec::new(), Vec::new());
    let (mut share_http, mut share_stdio) = (Vec::new(), Vec::new());
    for i in 0..n + 10 {
        let t = Instant::now();
        call(&direct, "exec", json!({"argv": ["true"]})).await;
        let d = t.elapsed();
        let t = Instant::now();
        call(&client, "vm_exec", exec.clone()).await;
        let h = t.elapsed();
        let t = Instant::now();
        call(&local, "vm_exec", exec.clone()).await;
        let l = t.elapsed();
        if i >= 10 {
            direct_times.push(d);
            via_http.push(h);
            via_stdio.push(l);
            share_http.push(h.as_secs_f64() - d.as_secs_f64());
            share_stdio.push(l.as_secs_f64() - d.as_secs_f64());
        }
    }
    for v in [&mut direct_times, &mut via_http, &mut via_stdio] {
        v.sort();
    }
    for v in [&mut share_http, &mut share_stdio] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "| MCP exec `true` straight over hybrid vsock (no gateway, no node) | {:.0} | {:.0} |",
        pct(&direct_times, 0.5),
        pct(&direct_times, 0.99)
    );
    for (transport, times, share) in [("HTTP", &via_http, &share_http), ("stdio", &via_stdio, &share_stdio)] {
        println!(
            "| `vm_exec true` via MCP client → gateway ({transport}, full pipeline) → node (gRPC) → guest | {:.0} | {:.0} |",
            pct(times, 0.5),
            pct(times, 0.99)
        );
        println!(
            "| moat's share over {transport}: each pair's through-moat minus direct (median, p90) | {:.0} | {:.0} (p90) |",
            share[share.len() / 2] * 1e6,
            share[share.len() * 9 / 10] * 1e6
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let inside_exec = inside("vm_exec", 2 * n);
    println!(
        "| ... inside moat, both transports (`tools/call` in → answer ready: pipeline, node, tunnel, guest) | {:.0} | {:.0} |",
        pct(&inside_exec, 0.5),
        pct(&inside_exec, 0.99)
    );

    println!("\nFile transfer, {mib} MiB of binary (base64 in JSON for MCP), 3 runs each, best:\n");
    use base64::Engine;
    let bytes: Vec<u8> = (0..mib * 1024 * 1024).map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8).collect();
    let content = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let rate = |secs: f64| mib as f64 / secs;
    // Raw: the same number of bytes as the base64 content, streamed host → guest on the control
    // channel in 60 KiB lines the agent reads and answers (with an error: they are padding).
    let raw_in = {
        let stream = moat_node::vsock::connect(&socket, 100, Duration::from_secs(30)).await.unwrap();
        let (read, mut write) = stream.into_split();
        let chunk = format!("{{\"type\":\"ping\",\"pad\":\"{}\"}}\n", "x".repeat(60 * 1024));
        let lines_n = content.len().div_ceil(chunk.len());
        let mut best = f64::MAX;
        let mut replies = BufReader::new(read).lines();
        for _ in 0..3 {
            let t = Instant::now();
            let chunk = chunk.clone();
            let writer = async {
                for _ in 0..lines_n {
                    write.write_all(chunk.as_bytes()).await.unwrap();
                }
            };
            let reader = async {
                for _ in 0..lines_n {
                    replies.next_line().await.unwrap().unwrap();
                }
            };
            tokio::join!(writer, reader);
            best = best.min(t.elapsed().as_secs_f64());
        }
        best
    };
    let write_args = json!({"path": "/root/d", "content": content, "encoding": "base64"});
    let direct_in = best_of(|| async {
        call(&direct, "file_write", write_args.clone()).await;
    })
    .await;
    let read_args = json!({"path": "/root/d", "encoding": "base64"});
    let direct_out = best_of(|| async {
        call(&direct, "file_read", read_args.clone()).await;
    })
    .await;
    let moat_write = json!({"vm": "bench", "path": "/root/b", "content": content, "encoding": "base64"});
    let moat_in = best_of(|| async {
        call(&client, "vm_file_write", moat_write.clone()).await;
    })
    .await;
    let moat_read = json!({"vm": "bench", "path": "/root/b", "encoding": "base64"});
    let moat_out = best_of(|| async {
        call(&client, "vm_file_read", moat_read.clone()).await;
    })
    .await;
    let stdio_in = best_of(|| async {
        call(&local, "vm_file_write", moat_write.clone()).await;
    })
    .await;
    let stdio_out = best_of(|| async {
        call(&local, "vm_file_read", moat_read.clone()).await;
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let inside_in = inside("vm_file_write", 6)[0].as_secs_f64();
    let inside_out = inside("vm_file_read", 6)[0].as_secs_f64();
    println!("| path | host → guest MiB/s | guest → host MiB/s |");
    println!("|---|---|---|");
    println!(
        "| raw hybrid vsock (control channel, {} bytes in 60 KiB lines) | {:.1} | — |",
        content.len(),
        rate(raw_in)
    );
    println!(
        "| MCP `file_write` / `file_read` straight over hybrid vsock (no gateway, no node) | {:.1} | {:.1} |",
        rate(direct_in),
        rate(direct_out)
    );
    println!(
        "| `vm_file_write` / `vm_file_read` through moat (client → HTTP → gateway → node → guest) | {:.1} | {:.1} |",
        rate(moat_in),
        rate(moat_out)
    );
    println!(
        "| `vm_file_write` / `vm_file_read` through moat (client → stdio → gateway → node → guest) | {:.1} | {:.1} |",
        rate(stdio_in),
        rate(stdio_out)
    );
    println!("\nWhere the time goes (ms, best runs):\n");
    println!("| | host → guest | guest → host |");
    println!("|---|---|---|");
    let ms = |s: f64| s * 1e3;
    println!("| raw vsock for the same bytes | {:.0} | — |", ms(raw_in));
    println!(
        "| MCP straight to the agent (its JSON, base64, file IO under the guest's CPU) | {:.0} | {:.0} |",
        ms(direct_in),
        ms(direct_out)
    );
    println!(
        "| inside moat (`tools/call` in → answer ready), so moat's pipeline + node + tunnel ≈ this − the line above | {:.0} | {:.0} |",
        ms(inside_in),
        ms(inside_out)
    );
    println!(
        "| through moat as the client sees it, so HTTP + JSON between client and moat ≈ this − the line above | {:.0} | {:.0} |",
        ms(moat_in),
        ms(moat_out)
    );
    println!(
        "| the same over stdio (a pipe + JSON between client and moat) | {:.0} | {:.0} |",
        ms(stdio_in),
        ms(stdio_out)
    );
    let rss_after = rss(call(&client, "vm_exec", probe).await);
    println!("\nmoat-guest RSS in the guest: {rss_idle} kB after boot, {rss_after} kB after the transfers");
    call(&client, "vm_delete", json!({"vm": "bench"})).await;
    // The server (kill_on_drop) goes with its stdio transport.
    drop(local);
}

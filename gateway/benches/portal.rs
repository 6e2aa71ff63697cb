//! Portal agents: `whoami` round trips from an MCP client inside a portal VM (through
//! `moat-guest mcp`, vsock, the node's uplink and the gateway's portal stream) against the same
//! client calling `whoami` on `moat serve` over stdio on the host, in the same run.
//!
//!     cargo bench -p moat-gateway --bench portal
//!
//! Both sides run the same client, `support/mcp_rtt.py` (Python's standard library, one call
//! at a time, each waiting for its answer), so the difference is the path, not the client.
//! The portal boots the Debian image (it has python3) with the base image's kernel and
//! moat-guest. Uses the release `moat serve --http` with its embedded node, QEMU (TCG on hosts
//! without usable KVM) and vhost-device-vsock. MOAT_BENCH_N (calls per side, default 80: with the
//! warm-up they stay inside the agent role's burst of 100 read calls),
//! MOAT_GUEST_IMAGE (default target/ci/guest-image), MOAT_DEBIAN_IMAGE (default
//! target/ci/debian-image/rootfs.ext4).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // a bench binary

use std::path::PathBuf;
use std::process::Stdio;

use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

const CLIENT: &str = include_str!("support/mcp_rtt.py");

fn path_env(key: &str, default: &str) -> PathBuf {
    std::env::var_os(key)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(default))
}

async fn call(client: &RunningService<RoleClient, ()>, tool: &str, args: Value) -> Value {
    let params = CallToolRequestParams::new(tool.to_string()).with_arguments(args.as_object().unwrap().clone());
    let result = client.call_tool(params).await.unwrap();
    assert_ne!(result.is_error, Some(true), "{tool}: {result:?}");
    result.structured_content.unwrap()
}

/// `moat` with its own state directory.
fn moat(state: &std::path::Path, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_moat"));
    // The node's storage too: by default it is the user's ($XDG_DATA_HOME/moat/storage).
    c.args(args)
        .env("MOAT_STATE_DIR", state)
        .env("MOAT_NODE_STORAGE", state.join("storage"))
        .env("MOAT_LOG", "warn,moat_gateway::serve=info")
        .kill_on_drop(true);
    c
}

async fn key(state: &std::path::Path, name: &str, role: &str) -> String {
    let out = moat(state, &["keys", "create", "--name", name, "--role", role]).output().await.unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn row(what: &str, measured: &Value) {
    let us = |k: &str| measured[k].as_f64().unwrap();
    println!("| {what} | {:.0} | {:.0} | {:.0} |", us("p50_us"), us("p99_us"), us("mean_us"));
}

#[tokio::main]
async fn main() {
    // 80 measured + 10 warm-up calls stay inside the agent role's read burst (100), on both
    // sides: the figures are round trips, not the rate limiter.
    let n: usize = std::env::var("MOAT_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(80);
    let guest = path_env("MOAT_GUEST_IMAGE", "target/ci/guest-image");
    let debian = path_env("MOAT_DEBIAN_IMAGE", "target/ci/debian-image/rootfs.ext4");
    let home = tempfile::tempdir().unwrap();
    let state = home.path().join("state");
    std::fs::create_dir_all(state.join("images")).unwrap();
    std::os::unix::fs::symlink(guest.canonicalize().expect("a guest image with moat-guest"), state.join("images/base"))
        .unwrap();
    let admin = key(&state, "bench", "cluster-admin").await;
    let mut server = moat(&state, &["serve", "--http", "127.0.0.1:0"]).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(server.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next_line().await.unwrap().expect("moat printed its URL");
        if let Some(rest) = line.split("url=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let config = StreamableHttpClientTransportConfig::with_uri(url).auth_header(admin);
    let client = ().serve(StreamableHttpClientTransport::with_client(reqwest::Client::new(), config)).await.unwrap();
    call(&client, "image_import", json!({"name": "debian", "source": debian.canonicalize().unwrap()})).await;
    let member = json!({"image": "debian", "memory_mib": 512});
    let made =
        call(&client, "agent_create", json!({"name": "bench", "portal": member, "work": {"memory_mib": 128}})).await;
    let accel = call(&client, "vm_inspect", json!({"vm": "bench-portal"})).await["vm"]["accel"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    let args = json!({"vm": "bench-portal", "path": "/root/mcp_rtt.py", "content": CLIENT});
    call(&client, "vm_file_write", args).await;

    // Inside the portal: the same client, spawning `moat-guest mcp`.
    let command = format!("python3 /root/mcp_rtt.py {n} whoami moat-guest mcp");
    let out = call(&client, "vm_exec", json!({"vm": "bench-portal", "command": command, "timeout_s": 600})).await;
    assert_eq!(out["exit_code"], 0, "the client in the portal: {out}");
    let portal: Value = serde_json::from_str(out["stdout"].as_str().unwrap().trim()).unwrap();
    assert_eq!(portal["answer"]["transport"], "vsock", "{portal}");
    assert_eq!(portal["answer"]["principal"], made["agent"]["principal"], "{portal}");

    // On the host: the same client, spawning `moat serve` on stdio with an agent's key (a state
    // directory of its own, so the two gateways share nothing).
    let host_state = home.path().join("host");
    let agent_key = key(&host_state, "alice", "agent").await;
    let script = home.path().join("mcp_rtt.py");
    std::fs::write(&script, CLIENT).unwrap();
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .args([&n.to_string(), "whoami", env!("CARGO_BIN_EXE_moat"), "serve"])
        .env("MOAT_STATE_DIR", &host_state)
        .env("MOAT_NODE_STORAGE", host_state.join("storage"))
        .env("MOAT_API_KEY", agent_key)
        .env("MOAT_LOG", "warn")
        .stderr(Stdio::inherit())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "the client on the host failed");
    let host: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(host["answer"]["transport"], "stdio", "{host}");

    println!("`whoami` round trips, {n} sequential calls per side after 10 warm-up, same client (mcp_rtt.py):\n");
    println!("| path | p50 µs | p99 µs | mean µs |");
    println!("|---|---|---|---|");
    row(&format!("inside the portal (QEMU {accel}): moat-guest mcp → vsock → node → gateway"), &portal);
    row("on the host: moat serve over stdio", &host);
    call(&client, "agent_delete", json!({"agent": "bench"})).await;
    drop(client);
    let _ = server.kill().await;
}

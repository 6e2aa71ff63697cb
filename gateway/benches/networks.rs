//! Networks, as a client sees them: a `security_group_update` (which re-renders and re-applies
//! the node's whole `inet moat` table) through `moat serve` (this build, stdio, its embedded node
//! kept in a network namespace the bench makes) with 10, 100 and 1,000 VMs on the network, beside
//! the node's own render and apply of the same state (`nft -f` in another fresh namespace) in the
//! same run, so the figure shows what the gateway and the gRPC hop add.
//!
//!     cargo bench -p moat-gateway --bench networks     # as root
//!
//! 1,000 VMs do not fit on one host, so the bench gives the network's VMs their addresses in the
//! gateway's database directly (what `vm_create {network}` stores) rather than booting them: the
//! ruleset depends on the addresses, groups and forwards, not on the VMs running.
//! MOAT_BENCH_N (runs per size, default 7).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // a bench binary

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use moat_gateway::store::State;
use moat_gateway::store::networks::ForwardRow;
use moat_node::net::apply::Applier;
use moat_node::testing::Netns;
use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::TokioChildProcess;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};

type Client = RunningService<RoleClient, ()>;

async fn call(client: &Client, tool: &str, args: Value) -> Value {
    let params = CallToolRequestParams::new(tool.to_string()).with_arguments(args.as_object().unwrap().clone());
    let result = client.call_tool(params).await.unwrap();
    assert_ne!(result.is_error, Some(true), "{tool}: {result:?}");
    result.structured_content.unwrap()
}

fn median(mut runs: Vec<Duration>) -> f64 {
    runs.sort();
    runs[runs.len() / 2].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the networks bench needs root (namespaces, bridges, nftables)");
        std::process::exit(1);
    }
    let runs = std::env::var("MOAT_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(7usize);
    let tag = std::process::id() % 100_000;
    let ns = Netns::new(format!("moat-bn{tag}"));
    let peer_ns = Netns::new(format!("moat-bp{tag}"));
    let home = tempfile::tempdir().unwrap();
    let state_dir = home.path().join("state");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_moat"));
    cmd.args(["serve", "--node-netns", &ns.0])
        .env("HOME", home.path())
        .env("MOAT_STATE_DIR", &state_dir)
        .env("MOAT_LOG", "warn")
        .env_remove("MOAT_API_KEY");
    let client: Client = ().serve(TokioChildProcess::new(cmd).unwrap()).await.unwrap();

    let network =
        call(&client, "network_create", json!({"name": "bench", "cidr": "10.64.0.0/16", "mode": "nat"})).await;
    let network_id = network["network"]["id"].as_str().unwrap().to_string();
    let rules = |port: u16| {
        json!([
            {"protocol": "tcp", "ports": port.to_string(), "source_cidr": "10.0.0.0/8"},
            {"protocol": "tcp", "ports": "8000-8100", "source_group": "a"},
            {"protocol": "udp", "ports": "53", "source_cidr": "10.64.0.0/16"},
        ])
    };
    call(&client, "security_group_create", json!({"name": "a", "network": "bench"})).await;
    call(&client, "security_group_update", json!({"group": "a", "ingress": rules(22)})).await;
    let b =
        call(&client, "security_group_create", json!({"name": "b", "network": "bench", "ingress": rules(22)})).await;
    let a_id = call(&client, "security_group_inspect", json!({"group": "a"})).await["group"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let b_id = b["group"]["id"].as_str().unwrap().to_string();

    let db = State::open(&state_dir.join("moat.db")).await.unwrap();
    let row = db.network(&network_id).await.unwrap().unwrap();
    let node = row.node.clone();
    let mut have = 0usize;
    println!(
        "Networks, one change (security_group_update) with N VMs on the network, median of {runs}\n\
         {:>6}  {:>22}  {:>26}  {:>9}",
        "VMs", "client sees (moat serve)", "peer: node render + nft -f", "rules"
    );
    for n in [10usize, 100, 1000] {
        while have < n {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 2)) + have as u32);
            let groups = [if have.is_multiple_of(2) { a_id.clone() } else { b_id.clone() }];
            let vm = format!("vm-bench{have:04}");
            db.allocate_nic(&vm, &row, std::iter::once(ip), "02:6d:00:00:00:00", &groups).await.unwrap();
            if have.is_multiple_of(10) {
                let forward = ForwardRow {
                    id: format!("pf-bench{have:04}"),
                    owner: "operator".into(),
                    node: node.clone(),
                    protocol: "tcp".into(),
                    host_port: 20000 + have as i64 / 10,
                    vm_id: vm.clone(),
                    vm_port: 22,
                    created_at: String::new(),
                };
                db.insert_forward(&forward).await.unwrap();
            }
            have += 1;
        }
        // The client: each update changes a rule, so every one renders and applies anew.
        let mut seen = Vec::new();
        for i in 0..runs {
            let started = Instant::now();
            call(&client, "security_group_update", json!({"group": "a", "ingress": rules(2200 + i as u16)})).await;
            seen.push(started.elapsed());
        }
        // The peer, same state, same run: the node's own work only.
        let state = kept_state(&state_dir);
        assert_eq!(state.ports.len(), n, "the node was sent every VM's port");
        let scratch = tempfile::tempdir().unwrap();
        let applier = Applier::in_namespace(&peer_ns.0, scratch.path().to_path_buf());
        let mut peer = Vec::new();
        let mut size = 0;
        for _ in 0..runs {
            let started = Instant::now();
            let text = moat_node::net::render::print(&moat_node::net::render::table(&state));
            applier.ruleset(&state).await.unwrap();
            peer.push(started.elapsed());
            size = text.len();
        }
        println!("{n:>6}  {:>19.1} ms  {:>23.1} ms  {:>5} KiB", median(seen), median(peer), size / 1024);
    }
    client.cancel().await.unwrap();
}

/// The state the node was last sent, as it keeps it (the very document it applied).
fn kept_state(state_dir: &std::path::Path) -> moat_node::net::model::NetState {
    let bytes = std::fs::read(state_dir.join("node/net/state.json")).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

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

mod support;

use rmcp::model::ProtocolVersion;
use support::{CONCURRENCY, Server, concurrent, env_usize, sequential};

/// moat as a client would run it: the full pipeline, as the local operator on stdio or with a
/// cluster-admin key on HTTP.
const MOAT: Server = Server::Moat { label: "moat", args: &[], key_role: Some("cluster-admin") };

fn main() {
    support::main(run);
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
        for server in [Server::Bare, MOAT] {
            let s = if conc {
                concurrent(server, http, version.clone(), per_client).await
            } else {
                sequential(server, http, version.clone(), n).await
            };
            let ratio = match (server, bare_p50) {
                (Server::Moat { .. }, Some(b)) => format!("{:.2}×", s.p50.as_secs_f64() / b),
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

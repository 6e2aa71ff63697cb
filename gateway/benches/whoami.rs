//! `whoami` round trip: moat against a bare rmcp server exposing the same
//! tool, over stdio and Streamable HTTP, sequential and with 16 concurrent
//! clients, in one run. Both servers run as separate processes; the bare one
//! is this binary re-executed with `--bare-stdio` / `--bare-http`. Sequential
//! rows alternate one call to each server, and neither logs per call: moat
//! runs as shipped (its per-call debug line is for the pipeline bench).
//!
//!     cargo bench -p moat-gateway --bench whoami
//!
//! MOAT_BENCH_N (sequential calls, default 2000) and MOAT_BENCH_CONC_N (calls
//! per concurrent client, default 300) size the run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // a bench binary

mod support;

use rmcp::model::ProtocolVersion;
use support::{CONCURRENCY, Server, concurrent, env_usize, interleaved};

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
        let (bare, moat) = if conc {
            let bare = concurrent(Server::Bare, http, version.clone(), per_client).await;
            (bare, concurrent(MOAT, http, version.clone(), per_client).await)
        } else {
            interleaved(Server::Bare, MOAT, http, version.clone(), n).await
        };
        let mode = if conc { format!("{CONCURRENCY} clients") } else { "sequential, interleaved".into() };
        for (server, s) in [(Server::Bare, &bare), (MOAT, &moat)] {
            let ratio = if server == MOAT {
                format!("{:.2}×", s.p50.as_secs_f64() / bare.p50.as_secs_f64())
            } else {
                String::from("—")
            };
            println!(
                "| {transport} | {version} | {mode} | {} | {:.0} | {:.0} | {:.0} | {ratio} |",
                server.name(),
                s.p50.as_secs_f64() * 1e6,
                s.p99.as_secs_f64() * 1e6,
                s.per_sec,
            );
        }
    }
}

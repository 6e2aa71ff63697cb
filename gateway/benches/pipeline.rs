//! What the security pipeline costs: `whoami` through moat with the full
//! pipeline (API key lookup, Cedar, rate limit, audit written before and after
//! the call), through the same gateway with no pipeline (built and run by this
//! bench: the `moat` binary cannot run without it), and through a bare rmcp
//! server, in one run; then durable audited calls per second.
//!
//!     cargo bench -p moat-gateway --bench pipeline
//!
//! MOAT_BENCH_N (sequential calls, default 2000) and MOAT_BENCH_CONC_N (calls
//! per concurrent client, default 300) size the run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // a bench binary

mod support;

use rmcp::model::ProtocolVersion;
use support::{CONCURRENCY, Server, concurrent, env_usize, sequential};

const FULL: Server = Server::Moat { label: "moat, full pipeline", args: &[], key_role: Some("cluster-admin") };
/// The same gateway with the pipeline off: a server this bench builds and runs itself.
const NONE: Server = Server::NoPipeline;
const FULL_POWER: Server = Server::Moat {
    label: "moat, full pipeline, --durability power",
    args: &["--durability", "power"],
    key_role: Some("cluster-admin"),
};

fn main() {
    support::main(run);
}

async fn run() {
    let n = env_usize("MOAT_BENCH_N", 2000);
    let per_client = env_usize("MOAT_BENCH_CONC_N", 300);
    let version = ProtocolVersion::V_2025_11_25;
    println!("Latency, sequential calls ({n} each, protocol {version}):\n");
    println!(
        "| transport | server | p50 µs | p99 µs | p50 added vs no pipeline | p50 added vs bare | inside moat p50 µs |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (transport, http) in [("stdio", false), ("http", true)] {
        let bare = sequential(Server::Bare, http, version.clone(), n).await;
        let none = sequential(NONE, http, version.clone(), n).await;
        let full = sequential(FULL, http, version.clone(), n).await;
        let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
        for (name, s) in [("bare rmcp", &bare), (NONE.name(), &none), (FULL.name(), &full)] {
            let vs_none =
                if name == FULL.name() { format!("{:+.0} µs", us(s.p50) - us(none.p50)) } else { "—".into() };
            let vs_bare =
                if name == "bare rmcp" { "—".into() } else { format!("{:+.0} µs", us(s.p50) - us(bare.p50)) };
            let inside = s.server_p50.map_or("—".into(), |d| format!("{:.1}", us(d)));
            println!(
                "| {transport} | {name} | {:.0} | {:.0} | {vs_none} | {vs_bare} | {inside} |",
                us(s.p50),
                us(s.p99)
            );
        }
    }
    println!(
        "\nAudited calls per second, {CONCURRENCY} HTTP clients ({per_client} calls each; 2 audit records per call):\n"
    );
    println!("| server | calls/s | audit records/s | p50 µs | p99 µs |");
    println!("|---|---|---|---|---|");
    for server in [NONE, FULL, FULL_POWER] {
        let s = concurrent(server, true, version.clone(), per_client).await;
        let records = if server == NONE { "—".to_string() } else { format!("{:.0}", s.per_sec * 2.0) };
        println!(
            "| {} | {:.0} | {records} | {:.0} | {:.0} |",
            server.name(),
            s.per_sec,
            s.p50.as_secs_f64() * 1e6,
            s.p99.as_secs_f64() * 1e6
        );
    }
}

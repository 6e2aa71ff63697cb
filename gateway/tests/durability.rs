//! What an acknowledged call survives: with `--durability power` every audit commit is
//! fsynced before the call runs (counted with strace on the real binary); by default
//! (`process`) commits reach the WAL without an fsync each, which survives the process
//! being killed (see stdio.rs) but not the machine losing power.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // spawns strace and moat
mod common;

use common::{Home, MOAT, call_ok};
use serde_json::json;

/// fsync and fdatasync calls by `moat serve EXTRA` while it answers `calls` whoami calls.
async fn syncs_for(calls: usize, extra: &[&str]) -> usize {
    let home = Home::new();
    let trace = home.path().join("strace.log");
    let mut cmd = tokio::process::Command::new("strace");
    cmd.args(["-f", "-qq", "-e", "trace=fsync,fdatasync", "-o"]).arg(&trace).arg(MOAT).arg("serve").args(extra);
    cmd.env("HOME", home.path()).env_remove("XDG_STATE_HOME").env_remove("XDG_CONFIG_HOME").env_remove("MOAT_API_KEY");
    cmd.stderr(std::process::Stdio::null());
    let transport = rmcp::transport::TokioChildProcess::new(cmd).expect("strace runs (apt-get install strace)");
    let client = rmcp::ServiceExt::serve((), transport).await.expect("moat starts under strace");
    // Start-up writes (migrations, the first checkpoint) are not the calls'.
    call_ok(&client, "whoami", json!({})).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let before = count(&trace);
    for _ in 0..calls {
        call_ok(&client, "whoami", json!({})).await;
    }
    let during = count(&trace) - before;
    client.cancel().await.unwrap();
    during
}

fn count(trace: &std::path::Path) -> usize {
    std::fs::read_to_string(trace)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("fsync(") || l.contains("fdatasync("))
        .count()
}

#[tokio::test]
async fn power_durability_fsyncs_every_audit_commit() {
    let calls = 20;
    let power = syncs_for(calls, &["--durability", "power"]).await;
    assert!(power >= calls, "each of {calls} calls' audit record must be fsynced before it runs: {power} syncs");
    let process = syncs_for(calls, &[]).await;
    eprintln!("{calls} calls: {power} syncs with --durability power, {process} by default");
    assert!(process < calls / 2, "by default commits are not fsynced one by one: {process} syncs for {calls} calls");
}

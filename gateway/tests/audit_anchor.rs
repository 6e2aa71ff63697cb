//! The audit chain anchored outside the database: `moat serve` writes MACed
//! checkpoints (at start, on a schedule, at shutdown) and `moat audit verify`
//! names what someone with write access to the database alone could do: cut the
//! tail, replace the history with another valid chain, delete the checkpoint
//! file, or forge a checkpoint.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report
mod common;

use std::path::Path;
use std::time::Duration;

use common::{Home, call_ok};
use moat_node::testing::until;
use serde_json::json;

/// Runs `moat serve` on stdio in `home`, makes `calls` calls, and stops it (the shutdown
/// checkpoint then vouches for every record).
async fn served(home: &Home, calls: usize) {
    let client = home.stdio_client(&["--audit-checkpoint-ms", "200"]).await;
    for _ in 0..calls {
        call_ok(&client, "whoami", json!({})).await;
    }
    client.cancel().await.unwrap();
    until("the shutdown checkpoint", Duration::from_secs(20), async || {
        verify(&home.state_dir()).await.1.contains("vouches for every record")
    })
    .await;
}

/// `moat audit verify` on the state directory `dir`: (succeeded, stdout).
async fn verify(dir: &Path) -> (bool, String) {
    let home = Home::new();
    let (ok, out, err) = home.run(&["--state-dir", dir.to_str().unwrap(), "audit", "verify"]).await;
    (ok, format!("{out}{err}"))
}

/// A copy of the state directory `from` (database, key, checkpoints) to tamper with.
fn copy_state(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in ["moat.db", "moat.db-wal", "moat.db-shm", "audit.key", "audit-checkpoints.jsonl"] {
        if from.join(name).exists() {
            std::fs::copy(from.join(name), to.join(name)).unwrap();
        }
    }
}

/// What an intruder with the database but not the key can run.
fn sql(db: &Path, statements: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch(statements).unwrap();
}

#[tokio::test]
async fn verify_names_truncation_rechaining_and_missing_or_forged_checkpoints() {
    let home = Home::new();
    served(&home, 6).await;
    let state = home.state_dir();
    let (ok, report) = verify(&state).await;
    assert!(ok && report.contains("hash chain intact"), "{report}");
    let tmp = tempfile::tempdir().unwrap();

    // The tail cut off (the triggers that refuse deletes dropped first): the chain left is
    // consistent, the checkpoint is not satisfied.
    let cut = tmp.path().join("cut");
    copy_state(&state, &cut);
    sql(&cut.join("moat.db"), "DROP TRIGGER audit_log_no_delete; DELETE FROM audit_log WHERE seq > 3;");
    let (ok, report) = verify(&cut).await;
    assert!(!ok && report.contains("hash chain intact") && report.contains("TRUNCATED"), "{report}");
    assert!(report.contains("the log ends at record 3"), "{report}");

    // The whole history replaced by another valid chain, longer than the original.
    let other = Home::new();
    served(&other, 12).await;
    let rebuilt = tmp.path().join("rebuilt");
    copy_state(&state, &rebuilt);
    for name in ["moat.db-wal", "moat.db-shm"] {
        let _ = std::fs::remove_file(rebuilt.join(name));
    }
    std::fs::copy(other.state_dir().join("moat.db"), rebuilt.join("moat.db")).unwrap();
    let (ok, report) = verify(&rebuilt).await;
    assert!(!ok && report.contains("hash chain intact") && report.contains("RE-CHAINED"), "{report}");

    // The checkpoint file deleted.
    let gone = tmp.path().join("gone");
    copy_state(&state, &gone);
    std::fs::remove_file(gone.join("audit-checkpoints.jsonl")).unwrap();
    let (ok, report) = verify(&gone).await;
    assert!(!ok && report.contains("it was deleted"), "{report}");

    // A checkpoint edited to vouch for something else.
    let forged = tmp.path().join("forged");
    copy_state(&state, &forged);
    let file = forged.join("audit-checkpoints.jsonl");
    let text = std::fs::read_to_string(&file).unwrap();
    let mut lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    lines.last_mut().unwrap()["seq"] = json!(2);
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&file, text.join("\n") + "\n").unwrap();
    let (ok, report) = verify(&forged).await;
    assert!(!ok && report.contains("edited or forged"), "{report}");

    // The original still verifies, and its key is this user's only.
    let (ok, report) = verify(&state).await;
    assert!(ok, "{report}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(state.join("audit.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

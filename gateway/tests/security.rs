//! The security pipeline through the real server and database: API keys on
//! HTTP and stdio, Cedar RBAC (a role × tool matrix generated from the
//! catalog), rate limits, policy reload, and the audit log's hash chain
//! against tampering and SIGKILL.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{Home, call, call_ok};
use moat_tools::ActionGroup;
use reqwest::header::{ACCEPT, HOST, WWW_AUTHENTICATE};
use serde_json::{Value, json};

/// The groups each role is granted by the default policies, written independently of them.
fn granted(role: &str, spec: &moat_tools::ToolSpec) -> bool {
    use ActionGroup::*;
    let group = spec.group;
    match role {
        // Host disks are for readers and admins to see and plan; agents never see them.
        "reader" => matches!(group, Read | Disk),
        // Networks have no owner: agents manage only their own security groups and forwards.
        // Git service VMs are shared (group:network on a network); repositories are owned.
        "agent" => matches!(group, Read | Vm | Workspace | Git) || (group == Network && !spec.resource.is_shared()),
        "vm-admin" => matches!(group, Read | Vm | Workspace | Network | Git | Disk),
        "cluster-admin" => true,
        other => panic!("unknown role {other}"),
    }
}

fn error_of(result: Result<rmcp::model::CallToolResult, rmcp::ServiceError>) -> Option<(i32, String)> {
    match result {
        Err(rmcp::ServiceError::McpError(e)) => Some((e.code.0, e.message.to_string())),
        _ => None,
    }
}

#[tokio::test]
async fn role_by_tool_matrix_from_the_catalog() {
    let home = Home::new();
    // The examples make a network: as root it lives in a namespace of the test's own, never in
    // the host's (elsewhere the node cannot make it and says so).
    // SAFETY: geteuid has no preconditions.
    let netns = (unsafe { libc::geteuid() } == 0)
        .then(|| moat_node::testing::Netns::new(format!("moat-sec{}", std::process::id() % 100_000)));
    let args: Vec<&str> = netns.as_ref().map(|n| vec!["--node-netns", n.0.as_str()]).unwrap_or_default();
    let mut moat = home.http_server(&args).await;
    for role in ["reader", "agent", "vm-admin", "cluster-admin"] {
        let name = format!("{role}-1");
        let key = home.key(&name, role).await;
        let client = moat.client(&key).await;
        let listed: BTreeSet<String> =
            client.list_all_tools().await.unwrap().into_iter().map(|t| t.name.to_string()).collect();
        let nonexistent = error_of(call(&client, "no_such_tool", json!({})).await).expect("unknown tool errors");
        for spec in moat_tools::catalog() {
            let tool = spec.name.as_str();
            let allowed = granted(role, &spec);
            assert_eq!(listed.contains(tool), allowed, "{role}: tools/list and {tool}");
            let result = call(&client, tool, spec.example.clone()).await;
            match error_of(result) {
                Some((code, message)) if !allowed => {
                    assert_eq!(code, nonexistent.0, "{role} {tool}");
                    assert_eq!(
                        message,
                        nonexistent.1.replace("no_such_tool", tool),
                        "{role} {tool}: like an unknown tool"
                    );
                }
                Some((code, message)) => panic!("{role} may call {tool} but got {code} {message}"),
                None => assert!(allowed, "{role} must not be able to call {tool}"),
            }
        }
        client.cancel().await.unwrap();
        // Every hidden tool it tried is audited as denied.
        let admin = moat.client(&moat.key).await;
        let denied = call_ok(&admin, "audit_query", json!({"principal": name, "decision": "denied"})).await;
        let denied_tools: BTreeSet<String> =
            denied["records"].as_array().unwrap().iter().map(|r| r["tool"].as_str().unwrap().to_string()).collect();
        let mut want: BTreeSet<String> =
            moat_tools::catalog().iter().filter(|s| !granted(role, s)).map(|s| s.name.to_string()).collect();
        want.insert("no_such_tool".into());
        if role == "agent" {
            // The examples name VM `dev`, which does not exist: an unknown VM has no owner, so an
            // agent may not act on it (and is told there is no such VM, as for anyone's VM).
            want.extend(
                moat_tools::catalog()
                    .iter()
                    .filter(|s| {
                        // Likewise workspace `dev`.
                        // (agent_create makes what it acts on, like vm_create; agent `coder` does not exist.)
                        (s.group == moat_tools::ActionGroup::Vm
                            && s.name != moat_tools::ToolName::VmCreate
                            && s.name != moat_tools::ToolName::AgentCreate)
                            || (s.group == moat_tools::ActionGroup::Workspace
                                && s.name != moat_tools::ToolName::WorkspaceCreate)
                            // Likewise security group `web`, VM `web` and forward `pf-...`.
                            || (s.group == moat_tools::ActionGroup::Network
                                && !s.resource.is_shared()
                                && s.name != moat_tools::ToolName::SecurityGroupCreate)
                            // Likewise repository `app` (credentials are always the caller's own).
                            || (s.group == moat_tools::ActionGroup::Git
                                && s.name != moat_tools::ToolName::GitRepoCreate
                                && s.name != moat_tools::ToolName::GitCredentialSet
                                && s.name != moat_tools::ToolName::GitCredentialDelete)
                    })
                    .map(|s| s.name.to_string()),
            );
        }
        assert_eq!(denied_tools, want, "{role}");
        admin.cancel().await.unwrap();
    }
    assert!(moat.terminate().await.success());
}

async fn post_ping(url: &str, key: Option<&str>, host: Option<&str>) -> reqwest::Response {
    let mut req = reqwest::Client::new().post(url).header(ACCEPT, "application/json, text/event-stream");
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    if let Some(host) = host {
        req = req.header(HOST, host);
    }
    req.json(&common::initialize_request()).send().await.unwrap()
}

#[tokio::test]
async fn http_refuses_missing_bad_revoked_and_expired_keys() {
    let home = Home::new();
    let mut moat = home.http_server(&[]).await;
    let missing = post_ping(&moat.url, None, None).await;
    assert_eq!(missing.status(), 401);
    let challenge = missing.headers().get(WWW_AUTHENTICATE).unwrap().to_str().unwrap().to_string();
    assert_eq!(challenge, "Bearer realm=\"moat\"", "no error code without credentials (RFC 6750)");
    let body: Value = missing.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("moat keys create"), "{body}");

    let bad = post_ping(&moat.url, Some("moat_deadbeef_0000"), None).await;
    assert_eq!(bad.status(), 401);
    assert!(bad.headers().get(WWW_AUTHENTICATE).unwrap().to_str().unwrap().contains("invalid_token"));

    let key = home.key("soon-gone", "reader").await;
    assert_eq!(post_ping(&moat.url, Some(&key), None).await.status(), 200);
    let id = key.split('_').nth(1).unwrap();
    let (ok, _, stderr) = home.run(&["keys", "revoke", id]).await;
    assert!(ok, "{stderr}");
    let revoked = post_ping(&moat.url, Some(&key), None).await;
    assert_eq!(revoked.status(), 401, "refused on the very next request");
    let body: Value = revoked.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("revoked"), "{body}");

    let (ok, short, _) = home.run(&["keys", "create", "--name", "brief", "--role", "reader", "--expires", "1s"]).await;
    assert!(ok);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let expired = post_ping(&moat.url, Some(short.trim()), None).await;
    assert_eq!(expired.status(), 401);
    assert!(expired.text().await.unwrap().contains("expired"));

    // A good key from a foreign Host is still refused (DNS rebinding): 403.
    let good = home.key("ok", "reader").await;
    assert_eq!(post_ping(&moat.url, Some(&good), Some("evil.example")).await.status(), 403);

    let (ok, listing, _) = home.run(&["keys", "list"]).await;
    assert!(ok && listing.contains("revoked") && listing.contains("expired") && !listing.contains(&good[14..]));
    assert!(moat.terminate().await.success());
}

#[tokio::test]
async fn stdio_with_an_api_key_is_that_principal_until_revoked() {
    let home = Home::new();
    let key = home.key("agent-7", "agent").await;
    let mut cmd = home.moat(&["serve"]);
    cmd.env("MOAT_API_KEY", &key).stderr(std::process::Stdio::null());
    let client = rmcp::ServiceExt::serve((), rmcp::transport::TokioChildProcess::new(cmd).unwrap()).await.unwrap();
    let me = call_ok(&client, "whoami", json!({})).await;
    assert_eq!((me["principal"].as_str(), me["role"].as_str()), (Some("agent-7"), Some("agent")));
    use rmcp::model::ReadResourceRequestParams;
    let status = client.read_resource(ReadResourceRequestParams::new("moat://status")).await.unwrap();
    assert_eq!(status.contents.len(), 1);
    assert!(!client.list_prompts(None).await.unwrap().prompts.is_empty());
    match client.read_resource(ReadResourceRequestParams::new("moat://nope")).await {
        Err(rmcp::ServiceError::McpError(e)) => assert!(e.message.contains("no resource `moat://nope`"), "{e:?}"),
        other => panic!("an unknown resource is an error: {other:?}"),
    }
    let (ok, _, _) = home.run(&["keys", "revoke", key.split('_').nth(1).unwrap()]).await;
    assert!(ok);
    let (code, message) = error_of(call(&client, "whoami", json!({})).await).unwrap();
    assert_eq!(code, -32001);
    assert!(message.contains("revoked"), "{message}");
    // Every request authenticates the same way: prompts and resources too.
    let refused = |e: rmcp::ServiceError| match e {
        rmcp::ServiceError::McpError(e) => (e.code.0, e.message.contains("revoked")),
        other => panic!("expected a JSON-RPC error, got {other:?}"),
    };
    let denied = client.read_resource(ReadResourceRequestParams::new("moat://status")).await.unwrap_err();
    assert_eq!(refused(denied), (-32001, true));
    assert_eq!(refused(client.list_resources(None).await.unwrap_err()), (-32001, true));
    assert_eq!(refused(client.list_prompts(None).await.unwrap_err()), (-32001, true));
    let prompt = rmcp::model::GetPromptRequestParams::new("getting_started");
    assert_eq!(refused(client.get_prompt(prompt).await.unwrap_err()), (-32001, true));
    client.cancel().await.unwrap();
    // Reading a resource is audited, and an unknown one as denied.
    let (ok, audit, _) = home.run(&["audit", "list", "--principal", "agent-7"]).await;
    assert!(ok && audit.lines().any(|l| l.contains("resources/read") && l.contains("allowed")), "{audit}");
    let denied = audit.lines().any(|l| l.contains("resource/moat://nope") && l.contains("denied"));
    assert!(denied, "{audit}");

    let mut cmd = home.moat(&["serve"]);
    cmd.env("MOAT_API_KEY", "moat_nothing_here").stdin(std::process::Stdio::null());
    let out = cmd.output().await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("MOAT_API_KEY is not usable"));
}

/// `--anonymous-role` admits keyless HTTP requests with exactly the role it names: reader may
/// read, and what a reader may never call is hidden and refused like an unknown tool.
#[tokio::test]
async fn anonymous_callers_get_exactly_the_role_named() {
    let home = Home::new();
    let mut moat = home.http_server(&["--anonymous-role", "reader"]).await;
    let transport = rmcp::transport::StreamableHttpClientTransport::with_client(
        reqwest::Client::new(),
        rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig::with_uri(moat.url.clone()),
    );
    let anonymous = rmcp::ServiceExt::serve((), transport).await.unwrap();
    let me = call_ok(&anonymous, "whoami", json!({})).await;
    assert_eq!((me["principal"].as_str(), me["role"].as_str()), (Some("anonymous"), Some("reader")));
    let listed: BTreeSet<String> =
        anonymous.list_all_tools().await.unwrap().into_iter().map(|t| t.name.to_string()).collect();
    let want: BTreeSet<String> =
        moat_tools::catalog().iter().filter(|s| granted("reader", s)).map(|s| s.name.to_string()).collect();
    assert_eq!(listed, want);
    let (code, message) =
        error_of(call(&anonymous, "vm_create", json!({"name": "x", "vcpus": 1, "memory_mib": 64})).await)
            .expect("refused");
    assert_eq!(code, -32602);
    assert!(message.starts_with("unknown tool `vm_create`"), "{message}");
    anonymous.cancel().await.unwrap();
    // A key still counts as its own principal next to anonymous callers.
    let admin = moat.client(&moat.key).await;
    assert_eq!(call_ok(&admin, "whoami", json!({})).await["role"], "cluster-admin");
    admin.cancel().await.unwrap();
    assert!(moat.terminate().await.success());
}

/// The pipeline can only be switched off in the benchmark's own build: the binary has no flag.
#[tokio::test]
async fn the_binary_has_no_way_to_skip_the_pipeline() {
    let home = Home::new();
    let out = home.moat(&["serve", "--insecure-bench-no-pipeline"]).stdin(std::process::Stdio::null()).output().await;
    let out = out.unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unexpected argument '--insecure-bench-no-pipeline'"), "{stderr}");
}

/// Copies the repository's policies into `dir` so a test can change them.
fn copy_policies(dir: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    std::fs::create_dir_all(dir).unwrap();
    for f in ["moat.cedarschema", "moat.cedar", "limits.toml"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
}

#[tokio::test]
async fn bursts_are_rate_limited_with_a_retry_time() {
    let home = Home::new();
    let policies = home.path().join("policies");
    copy_policies(&policies);
    let limits = std::fs::read_to_string(policies.join("limits.toml")).unwrap();
    std::fs::write(
        policies.join("limits.toml"),
        limits.replace("read = { per_second = 20, burst = 40 }", "read = { per_second = 1, burst = 3 }"),
    )
    .unwrap();
    let mut moat = home.http_server(&["--policies-dir", policies.to_str().unwrap()]).await;
    let key = home.key("eager", "reader").await;
    let client = moat.client(&key).await;
    let mut outcomes = Vec::new();
    for _ in 0..6 {
        outcomes.push(call(&client, "whoami", json!({})).await);
    }
    let limited: Vec<_> = outcomes.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(outcomes.iter().filter(|r| r.is_ok()).count(), 3, "the burst of 3 goes through");
    assert_eq!(limited.len(), 3);
    match limited[0] {
        rmcp::ServiceError::McpError(e) => {
            assert_eq!(e.code.0, -32029);
            assert!(e.message.contains("retry in"), "{}", e.message);
            assert!(e.data.as_ref().unwrap()["retry_after_ms"].as_u64().unwrap() > 0);
        }
        other => panic!("{other:?}"),
    }
    let admin = moat.client(&moat.key).await;
    let records = call_ok(&admin, "audit_query", json!({"principal": "eager", "decision": "rate-limited"})).await;
    assert_eq!(records["records"].as_array().unwrap().len(), 3);
    assert!(moat.terminate().await.success());
}

#[tokio::test]
async fn sighup_reloads_policies_and_a_broken_file_keeps_the_old_set() {
    let home = Home::new();
    let policies = home.path().join("policies");
    copy_policies(&policies);
    let mut moat = home.http_server(&["--policies-dir", policies.to_str().unwrap()]).await;
    let reader = moat.client(&home.key("r", "reader").await).await;
    call_ok(&reader, "whoami", json!({})).await;

    let only_admins = "@id(\"admins\")\npermit (principal in Moat::Role::\"cluster-admin\", action, resource);\n";
    std::fs::write(policies.join("moat.cedar"), only_admins).unwrap();
    moat.hangup();
    wait_until(|| moat.logged("policies reloaded")).await;
    let (_, message) = error_of(call(&reader, "whoami", json!({})).await).expect("whoami is gone for readers");
    assert!(message.contains("unknown tool `whoami`"), "{message}");
    assert!(reader.list_all_tools().await.unwrap().is_empty());

    std::fs::write(policies.join("moat.cedar"), "permit (principal, action, resource) when { resource.nope };")
        .unwrap();
    moat.hangup();
    wait_until(|| moat.logged("policy reload refused")).await;
    assert!(error_of(call(&reader, "whoami", json!({})).await).is_some(), "still the admins-only set");
    let admin = moat.client(&moat.key).await;
    call_ok(&admin, "whoami", json!({})).await;
    assert!(moat.terminate().await.success());
}

async fn wait_until(mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("condition not reached within 5 s");
}

/// Makes a few audited calls through stdio, then lets the gateway exit.
async fn audited_history(home: &Home) {
    let client = home.stdio_client(&[]).await;
    call_ok(&client, "whoami", json!({})).await;
    call_ok(&client, "node_list", json!({})).await;
    let _ = call(&client, "node_inspect", json!({"node": "BAD"})).await;
    call_ok(&client, "whoami", json!({})).await;
    client.cancel().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
}

async fn tamper(home: &Home, statements: &[&str]) {
    let url = format!("sqlite://{}", home.state_dir().join("moat.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    // An attacker with the file can drop the append-only triggers; the chain must still tell.
    sqlx::query("DROP TRIGGER audit_log_no_update").execute(&pool).await.unwrap();
    sqlx::query("DROP TRIGGER audit_log_no_delete").execute(&pool).await.unwrap();
    for s in statements {
        sqlx::query(sqlx::AssertSqlSafe(*s)).execute(&pool).await.unwrap();
    }
    pool.close().await;
}

/// A call whose audit record cannot be written is failed before its handler runs: the answer
/// is the audit failure, not what the tool would have said, and calls work again (with an
/// unbroken chain) once writes do.
#[tokio::test]
async fn a_call_whose_audit_write_fails_is_failed_and_does_not_run() {
    let home = Home::new();
    let client = home.stdio_client(&[]).await;
    call_ok(&client, "whoami", json!({})).await;
    let url = format!("sqlite://{}", home.state_dir().join("moat.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    // The disk fills up under the audit log (as SQLite would report it).
    let full = "CREATE TRIGGER audit_full BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END";
    sqlx::query(full).execute(&pool).await.unwrap();
    let args = json!({"name": "web", "vcpus": 1, "memory_mib": 64});
    let (code, message) = error_of(call(&client, "vm_create", args.clone()).await).expect("a JSON-RPC error");
    assert_eq!(code, -32603, "{message}");
    assert!(message.contains("audit log could not be written") && message.contains("was not run"), "{message}");
    let (code, _) = error_of(call(&client, "whoami", json!({})).await).expect("every call fails while audit does");
    assert_eq!(code, -32603);
    sqlx::query("DROP TRIGGER audit_full").execute(&pool).await.unwrap();
    pool.close().await;
    // With the audit log writable again the same call reaches its handler, which says why it
    // cannot place the VM (this test's node has no image): before, it never got that far.
    let placed = call(&client, "vm_create", args).await.unwrap();
    assert_eq!(placed.is_error, Some(true));
    let text = placed.content[0].as_text().unwrap().text.clone();
    assert!(text.contains("no node can take a VM"), "{text}");
    client.cancel().await.unwrap();
    let (ok, out, _) = home.run(&["audit", "verify"]).await;
    assert!(ok && out.contains("hash chain intact"), "{out}");
}

#[tokio::test]
async fn audit_verify_detects_edited_deleted_and_reordered_records() {
    let cases: [(&[&str], &str); 3] = [
        (&["UPDATE audit_log SET principal = 'mallory' WHERE seq = 2"], "record 2 was edited"),
        (&["DELETE FROM audit_log WHERE seq = 3"], "records 3..3 are missing"),
        (
            &[
                "UPDATE audit_log SET seq = -1 WHERE seq = 2",
                "UPDATE audit_log SET seq = 2 WHERE seq = 3",
                "UPDATE audit_log SET seq = 3 WHERE seq = -1",
            ],
            "record 2 does not follow",
        ),
    ];
    for (statements, want) in cases {
        let home = Home::new();
        audited_history(&home).await;
        let (ok, out, _) = home.run(&["audit", "verify"]).await;
        assert!(ok && out.contains("hash chain intact: 7 records verified"), "{out}");
        // Append-only: ordinary edits are refused by the database itself.
        let url = format!("sqlite://{}", home.state_dir().join("moat.db").display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let err = sqlx::query("UPDATE audit_log SET tool = 'x'").execute(&pool).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{err}");
        pool.close().await;

        tamper(&home, statements).await;
        let (ok, out, _) = home.run(&["audit", "verify"]).await;
        assert!(!ok, "verify must fail: {out}");
        assert!(out.contains(want), "{want}: {out}");
    }
}

#[tokio::test]
async fn audit_list_and_export_show_calls_without_argument_values() {
    let home = Home::new();
    audited_history(&home).await;
    let (ok, out, _) = home.run(&["audit", "list", "--decision", "invalid"]).await;
    assert!(ok);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("node_inspect") && out.contains("invalid"), "{out}");
    let (ok, out, _) = home.run(&["audit", "export", "--format", "jsonl"]).await;
    assert!(ok);
    let rows: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 7, "4 calls, 3 of them allowed with an outcome each");
    assert!(!out.contains("BAD"), "argument values never reach the log");
    assert!(rows.iter().any(|r| r["args_shape"] == "{\"node\":\"string(3)\"}"));
    let outcome = rows.iter().find(|r| r["kind"] == "outcome").unwrap();
    assert_eq!(outcome["outcome"], "ok");
    assert!(rows.windows(2).all(|w| w[1]["prev_hash"] == w[0]["hash"]));
    let (ok, _, stderr) = home.run(&["audit", "export", "--format", "csv"]).await;
    assert!(!ok && stderr.contains("only jsonl"));
}

#[tokio::test]
async fn sigkill_loses_no_acknowledged_call() {
    let home = Home::new();
    let mut moat = home.http_server(&[]).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let client = moat.client(&moat.key).await;
        tasks.push(tokio::spawn(async move {
            let mut acked = 0u64;
            // After the kill a call fails or hangs in reconnects; either ends the loop.
            while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), call(&client, "whoami", json!({}))).await
            {
                acked += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    moat.child.start_kill().unwrap();
    moat.child.wait().await.unwrap();
    let mut acknowledged = 0;
    for t in tasks {
        acknowledged += t.await.unwrap();
    }
    assert!(acknowledged > 10, "the clients made progress before the kill ({acknowledged})");
    let url = format!("sqlite://{}", home.state_dir().join("moat.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let recorded: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM audit_log WHERE kind = 'call' AND tool = 'whoami' AND decision = 'allowed'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let outcomes: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM audit_log WHERE kind = 'outcome' AND tool = 'whoami' AND outcome = 'ok'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    assert!(recorded >= acknowledged as i64, "{recorded} records for {acknowledged} acknowledged calls");
    // Outcomes are appended without holding up the answer, in order behind each client's next
    // call: at most each client's last acknowledged call can be left without one.
    assert!(outcomes >= acknowledged as i64 - 4, "outcomes {outcomes} for {acknowledged} acknowledged calls");
    let (ok, out, _) = home.run(&["audit", "verify"]).await;
    assert!(ok, "the chain survives a crash: {out}");
}

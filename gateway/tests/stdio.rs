//! `moat serve` on stdio, driven by rmcp's client over real pipes, plus raw
//! bytes for what a well-behaved client never sends.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // spawns the binary under test

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Home, call, call_err, call_ok};
use rmcp::model::GetPromptRequestParams;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[tokio::test]
async fn lists_tools_and_answers_whoami() {
    let home = Home::new();
    let client = home.stdio_client(&[]).await;
    let tools = client.list_all_tools().await.unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    let all: Vec<&str> = moat_tools::ToolName::ALL.iter().map(|t| t.as_str()).collect();
    assert_eq!(names, all, "the operator is a cluster-admin: every tool, in catalog order");
    for tool in &tools {
        assert!(tool.output_schema.is_some(), "{} has an outputSchema", tool.name);
        assert_eq!(tool.input_schema.get("additionalProperties"), Some(&Value::Bool(false)));
        let hints = tool.annotations.as_ref().expect("annotations");
        let read_only = [
            "whoami",
            "node_list",
            "node_inspect",
            "audit_query",
            "vm_list",
            "vm_inspect",
            "vm_logs",
            "vm_exec_status",
            "vm_exec_output",
            "vm_file_read",
            "vm_file_list",
            "image_list",
            "image_inspect",
            "workspace_list",
            "workspace_inspect",
            "network_list",
            "network_inspect",
            "security_group_list",
            "security_group_inspect",
            "port_forward_list",
            "git_service_list",
            "git_service_inspect",
            "git_repo_list",
            "git_repo_log",
            "git_repo_branches",
            "git_credential_list",
            "agent_list",
            "agent_inspect",
            "disk_list",
            "disk_layout_plan",
            "disk_layout_list",
            "disk_layout_status",
        ];
        assert_eq!(hints.read_only_hint, Some(read_only.contains(&tool.name.as_ref())), "{}", tool.name);
    }

    let me = call_ok(&client, "whoami", json!({})).await;
    assert_eq!(me["principal"], "operator");
    assert_eq!(me["role"], "cluster-admin");
    assert_eq!(me["transport"], "stdio");
    assert!(me["protocol_version"].as_str().is_some_and(|v| v.starts_with("20")), "{me}");
    assert_eq!(me["server_version"], env!("CARGO_PKG_VERSION"));
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn embedded_node_answers_over_grpc() {
    let home = Home::new();
    let client = home.stdio_client(&["--node-name", "embedded-1"]).await;
    let list = call_ok(&client, "node_list", json!({})).await;
    let nodes = list["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{list}");
    let node = &nodes[0];
    assert_eq!(node["name"], "embedded-1");
    assert_eq!(node["reachable"], true, "{node}");
    assert!(node["cpus"].as_u64().unwrap() >= 1);
    assert!(node["last_seen"].as_str().is_some());

    let inspect = call_ok(&client, "node_inspect", json!({"node": "embedded-1"})).await;
    let detail = &inspect["node"];
    assert!(detail["address"].as_str().unwrap().starts_with("unix:"), "{detail}");
    assert_eq!(detail["kernel"], std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim());
    assert_eq!(detail["storage"]["root"], home.state_dir().join("node").display().to_string());
    let kvm = &detail["kvm"];
    assert_eq!(kvm["usable"].as_bool().unwrap(), kvm["detail"].as_str().unwrap().is_empty(), "{kvm}");
    assert_eq!(detail["vmms"].as_array().unwrap().len(), 3);
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn bad_calls_get_clear_errors_and_the_server_keeps_serving() {
    let home = Home::new();
    let client = home.stdio_client(&[]).await;

    let (code, message, data) = call_err(&client, "node_inspect", json!({"node": "Not A Label"})).await;
    assert_eq!(code, -32602);
    assert!(message.contains("arguments/node"), "{message}");
    assert_eq!(data.unwrap()["violations"][0]["path"], "/node");

    let (code, message, _) = call_err(&client, "node_inspect", json!({})).await;
    assert_eq!(code, -32602);
    assert!(message.contains("node"), "{message}");

    let (code, message, _) = call_err(&client, "whoami", json!({"sudo": true})).await;
    assert_eq!(code, -32602);
    assert!(message.contains("unknown field `sudo`"), "{message}");

    let (code, message, _) = call_err(&client, "vm_explode", json!({})).await;
    assert_eq!(code, -32602);
    assert!(message.contains("unknown tool `vm_explode`"), "{message}");

    // A well-formed call for a node that does not exist is the caller's to fix: a tool error.
    let missing = call(&client, "node_inspect", json!({"node": "ghost"})).await.unwrap();
    assert_eq!(missing.is_error, Some(true));
    let text = serde_json::to_string(&missing.content).unwrap();
    assert!(text.contains("no node named `ghost`"), "{text}");

    assert_eq!(call_ok(&client, "whoami", json!({})).await["transport"], "stdio");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn prompts_list_and_render() {
    let home = Home::new();
    let client = home.stdio_client(&[]).await;
    let prompts = client.list_all_prompts().await.unwrap();
    let choose = prompts.iter().find(|p| p.name == "choose_node").expect("choose_node listed");
    let args = choose.arguments.as_ref().unwrap();
    assert!(args.iter().any(|a| a.name == "vcpus" && a.required == Some(true)));

    let mut params = GetPromptRequestParams::new("choose_node");
    params.arguments = json!({"vcpus": "8", "memory_mib": "4096"}).as_object().cloned();
    let rendered = client.get_prompt(params).await.unwrap();
    let text = serde_json::to_string(&rendered.messages).unwrap();
    assert!(text.contains("It needs 8 vCPUs and") && text.contains("4096 MiB"), "{text}");

    let mut params = GetPromptRequestParams::new("choose_node");
    params.arguments = json!({"vcpus": "8"}).as_object().cloned();
    let err = client.get_prompt(params).await.unwrap_err().to_string();
    assert!(err.contains("needs argument `memory_mib`"), "{err}");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn unparsable_and_oversized_lines_are_answered_not_dropped() {
    let home = Home::new();
    let mut child = home
        .moat(&["serve", "--max-body-bytes", "2048"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut input = String::new();
    input.push_str("{this is not json\n");
    input.push_str(&format!("{{\"pad\":\"{}\"}}\n", "x".repeat(4096)));
    input.push_str(r#"{"jsonrpc":"2.0","id":"a","method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#);
    input.push('\n');
    input.push_str(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    input.push('\n');
    input.push_str(r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"whoami"}}"#);
    input.push('\n');
    stdin.write_all(input.as_bytes()).await.unwrap();
    stdin.flush().await.unwrap();

    let mut replies = Vec::new();
    while replies.len() < 4 {
        let line = tokio::time::timeout(Duration::from_secs(30), out.next_line()).await.unwrap().unwrap().unwrap();
        replies.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    assert_eq!(replies[0]["error"]["code"], -32700, "{:?}", replies[0]);
    assert!(replies[0]["error"]["message"].as_str().unwrap().contains("parse error"));
    assert_eq!(replies[1]["error"]["code"], -32600);
    assert!(replies[1]["error"]["message"].as_str().unwrap().contains("2048 byte limit"));
    assert_eq!(replies[2]["id"], "a");
    assert_eq!(replies[2]["result"]["serverInfo"]["name"], "moat");
    assert_eq!(replies[3]["id"], 9);
    assert_eq!(replies[3]["result"]["structuredContent"]["principal"], "operator");

    // EOF on stdin ends the server cleanly.
    drop(stdin);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn status_reports_paths_schema_and_nodes() {
    let home = Home::new();
    let client = home.stdio_client(&[]).await;
    call_ok(&client, "node_list", json!({})).await;
    client.cancel().await.unwrap();

    let (ok, stdout, stderr) = home.run(&["status"]).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains(&format!("moat {}", env!("CARGO_PKG_VERSION"))), "{stdout}");
    assert!(stdout.contains(&home.path().join(".config/moat/moat.toml").display().to_string()), "{stdout}");
    assert!(stdout.contains("not present; defaults in use"), "{stdout}");
    assert!(stdout.contains(&home.state_dir().join("moat.db").display().to_string()), "{stdout}");
    assert!(stdout.contains("schema version:  10"), "{stdout}");
    assert!(stdout.contains("active API keys: 0"), "{stdout}");
    // node_list's call record and its outcome.
    assert!(stdout.contains("audit records:   2 (last 20"), "{stdout}");
    let local = stdout.lines().find(|l| l.trim_start().starts_with("local ")).expect("local node listed");
    assert!(!local.contains("last seen never"), "the node_list call recorded contact: {local}");
}

#[tokio::test]
async fn broken_prompt_files_stop_startup_with_the_reason() {
    let home = Home::new();
    let dir = home.path().join("prompts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("bad.md"), "+++\nname = \"bad\"\ndescription = \"d\"\n+++\nHello {{who}}\n").unwrap();
    let (ok, _, stderr) = home.run(&["serve", "--prompts-dir", dir.to_str().unwrap()]).await;
    assert!(!ok);
    assert!(stderr.contains("bad.md") && stderr.contains("declares no argument `who`"), "{stderr}");
}

#[tokio::test]
async fn two_gateways_on_one_state_directory_share_one_audit_chain() {
    // Claude Code and Claude Desktop may each start `moat serve` on the same machine.
    let home = Home::new();
    let first = home.stdio_client(&[]).await;
    let second = home.stdio_client(&[]).await;
    for _ in 0..20 {
        let (a, b) = tokio::join!(call_ok(&first, "whoami", json!({})), call_ok(&second, "node_list", json!({})));
        assert_eq!(a["transport"], "stdio");
        assert_eq!(b["nodes"][0]["reachable"], true, "{b}");
    }
    first.cancel().await.unwrap();
    // The second gateway still reaches its own embedded node after the first one left.
    let list = call_ok(&second, "node_list", json!({})).await;
    assert_eq!(list["nodes"][0]["reachable"], true, "{list}");
    second.cancel().await.unwrap();
    let (ok, out, _) = home.run(&["audit", "verify"]).await;
    assert!(ok && out.contains("hash chain intact: 82 records verified"), "{out}");
}

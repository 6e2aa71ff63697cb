//! `moat serve --http` through real sockets: sessions (2025-11-25),
//! stateless requests (2026-07-28), health, DNS-rebinding protection, body
//! limits, malformed bodies and graceful shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report
mod common;

use common::Home;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HOST};
use serde_json::{Value, json};

const ACCEPT_BOTH: &str = "application/json, text/event-stream";

/// Reads a JSON-RPC reply from either a JSON body or an SSE stream.
async fn rpc_reply(response: reqwest::Response) -> Value {
    let is_sse = response
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.to_str().unwrap_or_default().starts_with("text/event-stream"));
    let text = response.text().await.unwrap();
    if !is_sse {
        return serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v.get("id").is_some())
        .unwrap_or_else(|| panic!("no JSON-RPC reply in SSE stream: {text}"))
}

#[tokio::test]
async fn healthz_answers() {
    let home = Home::new();
    let mut moat = home.http_server(&[]).await;
    let health: Value = reqwest::get(format!("{}/healthz", moat.base())).await.unwrap().json().await.unwrap();
    assert_eq!(health, json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}));
    assert!(moat.terminate().await.success());
}

#[tokio::test]
async fn session_clients_get_a_session_and_whoami_shows_it() {
    let home = Home::new();
    let mut moat = home.http_server(&[]).await;
    let http = reqwest::Client::new();
    let init = http
        .post(&moat.url)
        .bearer_auth(&moat.key)
        .header(ACCEPT, ACCEPT_BOTH)
        .json(&common::initialize_request())
        .send()
        .await
        .unwrap();
    assert_eq!(init.status(), 200);
    let session = init.headers().get("mcp-session-id").expect("a session id").to_str().unwrap().to_string();
    assert_eq!(rpc_reply(init).await["result"]["protocolVersion"], "2025-11-25");

    let initialized = http
        .post(&moat.url)
        .bearer_auth(&moat.key)
        .header(ACCEPT, ACCEPT_BOTH)
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-11-25")
        .json(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .send()
        .await
        .unwrap();
    assert_eq!(initialized.status(), 202);

    let call = http
        .post(&moat.url)
        .bearer_auth(&moat.key)
        .header(ACCEPT, ACCEPT_BOTH)
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-11-25")
        .json(
            &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}),
        )
        .send()
        .await
        .unwrap();
    let me = rpc_reply(call).await["result"]["structuredContent"].clone();
    assert_eq!(me["transport"], "http");
    assert_eq!(me["session"], session.as_str());
    assert_eq!(me["protocol_version"], "2025-11-25");
    assert_eq!((me["principal"].as_str(), me["role"].as_str()), (Some("tester"), Some("cluster-admin")));
    assert!(moat.terminate().await.success());
}

#[tokio::test]
async fn stateless_requests_need_no_session() {
    let home = Home::new();
    let mut moat = home.http_server(&[]).await;
    let meta = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {}
    });
    let call = reqwest::Client::new()
        .post(&moat.url)
        .bearer_auth(&moat.key)
        .header(ACCEPT, ACCEPT_BOTH)
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "whoami")
        .json(&json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
            "params": {"name": "whoami", "arguments": {}, "_meta": meta}}))
        .send()
        .await
        .unwrap();
    assert!(call.headers().get("mcp-session-id").is_none(), "no session in the stateless era");
    let reply = rpc_reply(call).await;
    let me = &reply["result"]["structuredContent"];
    assert_eq!(me["protocol_version"], "2026-07-28", "{reply}");
    assert_eq!(me["session"], Value::Null);
    assert!(moat.terminate().await.success());
}

#[tokio::test]
async fn foreign_host_headers_are_refused() {
    let home = Home::new();
    let mut moat = home.http_server(&[]).await;
    let refused = reqwest::Client::new()
        .post(&moat.url)
        .bearer_auth(&moat.key)
        .header(HOST, "evil.example:80")
        .header(ACCEPT, ACCEPT_BOTH)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    assert!(moat.terminate().await.success());

    // The allow list is configurable.
    let mut moat = home.http_server(&["--allowed-hosts", "moat.internal"]).await;
    let allowed = reqwest::Client::new()
        .post(&moat.url)
        .bearer_auth(&moat.key)
        .header(HOST, format!("moat.internal:{}", moat.port()))
        .header(ACCEPT, ACCEPT_BOTH)
        .json(&common::initialize_request())
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);
    assert!(moat.terminate().await.success());
}

#[tokio::test]
async fn oversized_and_malformed_bodies_get_clear_errors_and_serving_continues() {
    let home = Home::new();
    let mut moat = home.http_server(&["--max-body-bytes", "65536"]).await;
    let http = reqwest::Client::new();
    let huge = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "whoami", "arguments": {"pad": "x".repeat(100_000)}}});
    let too_big =
        http.post(&moat.url).bearer_auth(&moat.key).header(ACCEPT, ACCEPT_BOTH).json(&huge).send().await.unwrap();
    assert_eq!(too_big.status(), 413);
    let body: Value = too_big.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("65536 byte limit"), "{body}");

    let garbage = http
        .post(&moat.url)
        .bearer_auth(&moat.key)
        .header(ACCEPT, ACCEPT_BOTH)
        .header(CONTENT_TYPE, "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
    let body: Value = garbage.json().await.unwrap();
    assert_eq!(body["error"]["code"], -32700, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().starts_with("parse error"), "{body}");

    let health = reqwest::get(format!("{}/healthz", moat.base())).await.unwrap();
    assert_eq!(health.status(), 200, "still serving");
    assert!(moat.terminate().await.success());
}

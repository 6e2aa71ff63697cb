//! A gateway routing to a second node agent over plain gRPC/TCP on loopback
//! (development mode; mTLS is in vms.rs): registration with `moat node add`, live facts while it answers, last-known facts marked
//! unreachable (with the reason) once it stops.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report
mod common;

use common::{Home, call_ok};
use moat_node::server::{ListenAddr, Listener};
use serde_json::json;

#[tokio::test]
async fn remote_node_over_tcp_then_unreachable() {
    let home = Home::new();
    let storage = tempfile::tempdir().unwrap();
    let listener = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap())).await.unwrap();
    let addr = listener.local_addr().to_string();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let vms = moat_node::vm::VmManager::for_host(
        "far-1",
        storage.path(),
        storage.path().join("images"),
        "qemu-system-x86_64",
        None,
        "vhost-device-vsock",
        moat_node::vmm::confine::DEFAULT_UID_BASE,
    )
    .unwrap();
    let node = tokio::spawn(moat_node::serve(listener, moat_node::NodeApi::new("far-1", storage.path(), vms), async {
        let _ = stop_rx.await;
    }));

    let address = format!("http://{addr}");
    let (ok, _, stderr) = home.run(&["node", "add", "far-1", "--address", &address]).await;
    assert!(!ok && stderr.contains("plain-text node address") && stderr.contains("--insecure-loopback"), "{stderr}");
    let (ok, stdout, stderr) = home.run(&["node", "add", "far-1", "--address", &address, "--insecure-loopback"]).await;
    assert!(ok && stdout.contains("added node far-1"), "{stdout}{stderr}");
    let (ok, _, stderr) = home.run(&["node", "add", "far-1", "--address", &address, "--insecure-loopback"]).await;
    assert!(!ok && stderr.contains("already exists"), "{stderr}");
    let (ok, _, stderr) = home.run(&["node", "add", "far-2", "--address", "10.0.0.1:7443"]).await;
    assert!(!ok && stderr.contains("https://HOST:PORT"), "{stderr}");
    let (ok, _, stderr) =
        home.run(&["node", "add", "far-2", "--address", "http://10.0.0.1:7443", "--insecure-loopback"]).await;
    assert!(!ok && stderr.contains("refused"), "only loopback may be plain text: {stderr}");

    let client = home.stdio_client(&[]).await;
    let list = call_ok(&client, "node_list", json!({})).await;
    let names: Vec<&str> = list["nodes"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["far-1", "local"]);
    assert!(list["nodes"].as_array().unwrap().iter().all(|n| n["reachable"] == true), "{list}");

    let far = call_ok(&client, "node_inspect", json!({"node": "far-1"})).await;
    assert_eq!(far["node"]["address"], address.as_str());
    assert_eq!(far["node"]["storage"]["root"], storage.path().display().to_string());
    let hostname = far["node"]["hostname"].clone();
    assert!(hostname.is_string());

    stop_tx.send(()).unwrap();
    node.await.unwrap().unwrap();

    let far = call_ok(&client, "node_inspect", json!({"node": "far-1"})).await;
    assert_eq!(far["node"]["reachable"], false, "{far}");
    assert!(far["node"]["error"].as_str().unwrap().contains("node did not answer"), "{far}");
    assert_eq!(far["node"]["hostname"], hostname, "last known facts are kept");
    let list = call_ok(&client, "node_list", json!({})).await;
    let reach: Vec<bool> =
        list["nodes"].as_array().unwrap().iter().map(|n| n["reachable"].as_bool().unwrap()).collect();
    assert_eq!(reach, [false, true], "{list}");
    client.cancel().await.unwrap();

    let (ok, stdout, _) = home.run(&["status"]).await;
    assert!(ok && stdout.contains("last error: node did not answer"), "{stdout}");
    let (ok, _, _) = home.run(&["node", "remove", "far-1"]).await;
    assert!(ok);
    let (ok, _, stderr) = home.run(&["node", "remove", "far-1"]).await;
    assert!(!ok && stderr.contains("no node named `far-1`"), "{stderr}");
}

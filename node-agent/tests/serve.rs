//! The `moat-node` binary serving NodeService over TCP and a Unix socket,
//! called with a real tonic client; SIGTERM stops it cleanly.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // spawns the binary under test

use std::process::Stdio;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use moat_proto::node::v1::GetNodeInfoRequest;
use moat_proto::node::v1::node_service_client::NodeServiceClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::{Endpoint, Uri};

/// Starts `moat-node serve --listen LISTEN` and returns it with the address it logged.
async fn start(listen: &str, name: &str, root: &std::path::Path, extra: &[&str]) -> (tokio::process::Child, String) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_moat-node"))
        .args(["serve", "--listen", listen, "--name", name, "--storage-root"])
        .arg(root)
        .args(extra)
        .env("MOAT_LOG", "info")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("listen=").nth(1) {
                return rest.split_whitespace().next().unwrap().to_string();
            }
        }
        panic!("moat-node exited before listening");
    })
    .await
    .unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

async fn stop(mut child: tokio::process::Child) {
    // SAFETY: kill(2) on our own child's pid touches no memory.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn serves_node_info_over_tcp() {
    let root = tempfile::tempdir().unwrap();
    let (child, addr) = start("127.0.0.1:0", "tcp-node", root.path(), &["--insecure-loopback"]).await;
    let mut client = NodeServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let info = client.get_node_info(GetNodeInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "tcp-node");
    assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.kernel, std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim());
    assert!(info.cpus >= 1 && info.memory_total_bytes > 0);
    let storage = info.storage.unwrap();
    assert_eq!(storage.root, root.path().display().to_string());
    assert_eq!(storage.is_btrfs, storage.filesystem == "btrfs");
    let kvm = info.kvm.unwrap();
    assert_eq!(kvm.usable, kvm.detail.is_empty(), "{kvm:?}");
    let kinds: Vec<&str> = info.vmms.iter().map(|v| v.kind.as_str()).collect();
    assert_eq!(kinds, ["qemu", "firecracker", "cloud-hypervisor"]);
    stop(child).await;
}

#[tokio::test]
async fn serves_over_a_unix_socket_and_removes_it_on_exit() {
    let root = tempfile::tempdir().unwrap();
    let socket = root.path().join("run/node.sock");
    let (child, addr) = start(&format!("unix:{}", socket.display()), "uds-node", root.path(), &[]).await;
    assert_eq!(addr, format!("unix:{}", socket.display()));
    let path = socket.clone();
    let channel = Endpoint::from_static("http://moat-node.local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .unwrap();
    let info = NodeServiceClient::new(channel).get_node_info(GetNodeInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "uds-node");
    stop(child).await;
    assert!(!socket.exists(), "the socket file is removed on shutdown");
}

#[tokio::test]
async fn refuses_bad_listen_addresses() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_moat-node"))
        .args(["serve", "--listen", "localhost"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HOST:PORT"));
}

#[tokio::test]
async fn refuses_plain_tcp_unless_loopback_development() {
    let root = tempfile::tempdir().unwrap();
    for args in [vec!["127.0.0.1:0"], vec!["0.0.0.0:0", "--insecure-loopback"]] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_moat-node"))
            .args(["serve", "--storage-root"])
            .arg(root.path())
            .arg("--listen")
            .args(&args)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must be refused");
        assert!(stderr.contains("refusing to serve gRPC over plain TCP") && stderr.contains("--certs"), "{stderr}");
    }
}

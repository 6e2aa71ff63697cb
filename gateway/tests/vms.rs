//! End to end: MCP clients drive real VMs through the gateway and a separately started
//! `moat-node` over mutual TLS, with QEMU (TCG) booting moat's base image.
//! Needs the image (`service-vms/base/build.sh target/ci/guest-image`, or $MOAT_GUEST_IMAGE)
//! and the `moat-node` binary next to `moat` (cargo builds both).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code spawns binaries

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Home, MOAT, call, call_err, call_ok};
use rmcp::service::RunningService;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

type Client = RunningService<RoleClient, ()>;

fn guest_image() -> PathBuf {
    std::env::var_os("MOAT_GUEST_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ci/guest-image"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `moat-node` process enrolled with the gateway in `home`; its VMs are killed on drop.
struct Node {
    name: String,
    root: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    /// What moat-node logged, printed if the test fails.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Node {
    /// Enrolls `name` at a free port and starts it with `extra` arguments.
    async fn enroll_and_start(home: &Home, tmp: &Path, name: &str, extra: &[&str]) -> Node {
        let port = free_port();
        let certs = tmp.join(format!("{name}-certs"));
        let address = format!("https://127.0.0.1:{port}");
        let (ok, out, err) =
            home.run(&["node", "enroll", name, "--address", &address, "--out", certs.to_str().unwrap()]).await;
        assert!(ok && out.contains(&format!("enrolled node {name}")), "{out}{err}");
        let root = tmp.join(name);
        let mut args: Vec<String> =
            ["serve", "--name", name, "--listen", &format!("127.0.0.1:{port}"), "--certs"].map(String::from).into();
        args.push(certs.display().to_string());
        args.extend(["--storage-root".to_string(), root.display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut node = Node { name: name.into(), root, args, child: None, log: Default::default() };
        node.start().await;
        node
    }

    async fn start(&mut self) {
        let binary = Path::new(MOAT).with_file_name("moat-node");
        assert!(binary.exists(), "no {}: build it with `cargo build -p moat-node`", binary.display());
        let mut child = Command::new(binary)
            .args(&self.args)
            .env("MOAT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (_, log) = common::wait_for_field(&mut child, "moat-node listening", "listen=").await;
        self.log = log;
        self.child = Some(child);
    }

    /// SIGTERM and wait: what a service manager does on restart.
    async fn stop(&mut self) {
        let mut child = self.child.take().expect("node running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
        let status = tokio::time::timeout(Duration::from_secs(15), child.wait()).await.unwrap().unwrap();
        assert!(status.success(), "moat-node {} exited {status}", self.name);
    }

    /// SIGHUP: reload the node certificate.
    fn hangup(&self) {
        let pid = self.child.as_ref().and_then(|c| c.id()).expect("node running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    }

    fn logged_times(&self, needle: &str) -> usize {
        common::lines_with(&self.log, needle)
    }

    fn vmm_pid(&self, id: &str) -> i32 {
        std::fs::read_to_string(self.root.join("vms").join(id).join("vmm.pid")).unwrap().trim().parse().unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- moat-node {} log ---", self.name);
            for line in self.log.lock().map(|l| l.clone()).unwrap_or_default() {
                eprintln!("{line}");
            }
        }
        for entry in std::fs::read_dir(self.root.join("vms")).into_iter().flatten().flatten() {
            // The VMM and its vsock daemon (which would otherwise outlive the test).
            for file in ["vmm.pid", "vsock.pid"] {
                let pid =
                    std::fs::read_to_string(entry.path().join(file)).ok().and_then(|s| s.trim().parse::<i32>().ok());
                if let Some(pid) = pid {
                    // SAFETY: kill(2) on a VMM this test's node started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// The text of a tool-level error (isError), failing the test on success.
async fn tool_error(client: &Client, tool: &str, args: Value) -> String {
    let result = call(client, tool, args).await.unwrap_or_else(|e| panic!("{tool}: JSON-RPC error {e}"));
    assert_eq!(result.is_error, Some(true), "{tool} should fail: {result:?}");
    result.content.iter().filter_map(|c| c.as_text().map(|t| t.text.clone())).collect::<Vec<_>>().join("\n")
}

async fn until(what: &str, deadline: Duration, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn images_dir(tmp: &Path) -> PathBuf {
    let images = tmp.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let image = guest_image();
    assert!(
        image.join("vmlinux").exists(),
        "no guest image in {}: build it with `service-vms/base/build.sh {}` (as root)",
        image.display(),
        image.display()
    );
    std::os::unix::fs::symlink(image.canonicalize().unwrap(), images.join("base")).unwrap();
    images
}

#[tokio::test]
async fn vm_lifecycle_over_mtls_with_crash_and_node_restart() {
    let home = Home::new();
    let tmp = tempfile::tempdir().unwrap();
    let (ok, out, err) = home.run(&["pki", "init"]).await;
    assert!(ok && out.contains("created"), "{out}{err}");
    let images = images_dir(tmp.path());
    let mut n1 =
        Node::enroll_and_start(&home, tmp.path(), "n1", &["--images", images.to_str().unwrap(), "--accel", "tcg"])
            .await;
    let mut moat = home.http_server(&["--heartbeat-ms", "300"]).await;
    let alice = moat.client(&home.key("alice", "agent").await).await;
    let bob = moat.client(&home.key("bob", "agent").await).await;
    let admin = moat.client(&moat.key).await;

    let n1_info = call_ok(&alice, "node_inspect", json!({"node": "n1"})).await;
    assert_eq!(n1_info["node"]["reachable"], true, "{n1_info}");
    assert_eq!((n1_info["node"]["runtime"].as_str(), n1_info["node"]["accel"].as_str()), (Some("qemu"), Some("tcg")));
    assert_eq!(n1_info["node"]["images"], json!(["base"]));

    // No node named: placement skips `local` (no image there) and picks n1.
    let args = json!({"name": "web", "vcpus": 1, "memory_mib": 256, "labels": {"team": "a"}, "wait_ready": true});
    let created = call_ok(&alice, "vm_create", args).await;
    let vm = &created["vm"];
    assert_eq!(vm["agent"]["ready"], true, "wait_ready returns once the agent answers: {created}");
    assert_eq!(vm["agent"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        (vm["state"].as_str(), vm["node"].as_str(), vm["owner"].as_str()),
        (Some("running"), Some("n1"), Some("alice")),
        "{created}"
    );
    assert_eq!((vm["vmm"].as_str(), vm["accel"].as_str()), (Some("qemu"), Some("tcg")));
    let id = vm["id"].as_str().unwrap().to_string();

    until("the guest to boot", Duration::from_secs(120), async || {
        call_ok(&alice, "vm_logs", json!({"vm": "web"})).await["text"].as_str().unwrap().contains("moat-init: ready")
    })
    .await;
    let logs = call_ok(&alice, "vm_logs", json!({"vm": "web", "tail": 5000})).await;
    assert!(logs["text"].as_str().unwrap().contains("Linux version"), "the kernel boot is in the console: {logs}");
    let short = call_ok(&alice, "vm_logs", json!({"vm": id, "tail": 2})).await;
    assert_eq!(short["text"].as_str().unwrap().lines().count(), 2);
    assert_eq!(short["truncated"], true);

    // Ownership: bob cannot see or touch alice's VM, and is not told it exists.
    assert_eq!(tool_error(&bob, "vm_inspect", json!({"vm": "web"})).await, "no vm named `web`; vm_list shows your VMs");
    assert!(tool_error(&bob, "vm_stop", json!({"vm": id})).await.starts_with(&format!("no vm named `{id}`")));
    assert!(tool_error(&bob, "vm_logs", json!({"vm": id})).await.starts_with("no vm named"));
    assert_eq!(call_ok(&bob, "vm_list", json!({})).await["vms"], json!([]));
    // Names are per owner: bob may have a `web` too; an admin must then say which.
    let bobs =
        call_ok(&bob, "vm_create", json!({"name": "web", "vcpus": 1, "memory_mib": 64, "node": "n1", "start": false}))
            .await;
    assert_eq!(bobs["vm"]["state"], "stopped");
    let ambiguous = tool_error(&admin, "vm_inspect", json!({"vm": "web"})).await;
    assert!(ambiguous.contains("several VMs are named `web`") && ambiguous.contains(&id), "{ambiguous}");
    let mine = call_ok(&alice, "vm_list", json!({"label": "team=a"})).await;
    assert_eq!(mine["vms"].as_array().unwrap().len(), 1, "{mine}");
    assert_eq!(call_ok(&admin, "vm_list", json!({"node": "n1"})).await["vms"].as_array().unwrap().len(), 2);
    call_ok(&bob, "vm_delete", json!({"vm": "web"})).await;
    let dup = tool_error(&alice, "vm_create", json!({"name": "web", "vcpus": 1, "memory_mib": 64})).await;
    assert!(dup.contains("already have a vm named `web`"), "{dup}");
    let (ok, _, err) = home.run(&["node", "remove", "n1"]).await;
    assert!(!ok && err.contains("still has 1 VMs (web)"), "{err}");

    // Graceful stop (ACPI power button), then start again.
    let stopped = call_ok(&alice, "vm_stop", json!({"vm": "web", "timeout_s": 60})).await;
    assert_eq!(stopped["vm"]["state"], "stopped", "{stopped}");
    assert!(stopped["vm"]["reason"].as_str().unwrap().contains("powered off"), "{stopped}");
    assert_eq!(call_ok(&alice, "vm_start", json!({"vm": "web"})).await["vm"]["state"], "running");

    // QEMU killed behind moat's back: the heartbeat brings `crashed` and the signal back.
    let pid = n1.vmm_pid(&id);
    // SAFETY: kill(2) on the VMM of this test's VM.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    until("the crash to reach vm_list", Duration::from_secs(20), async || {
        call_ok(&alice, "vm_list", json!({"state": "crashed"})).await["vms"].as_array().unwrap().len() == 1
    })
    .await;
    let crashed = call_ok(&alice, "vm_inspect", json!({"vm": "web"})).await;
    assert!(crashed["vm"]["reason"].as_str().unwrap().contains("signal 9"), "{crashed}");

    // A moat-node restart keeps the running VM running and managed.
    assert_eq!(call_ok(&alice, "vm_start", json!({"vm": "web"})).await["vm"]["state"], "running");
    let pid = n1.vmm_pid(&id);
    n1.stop().await;
    let unreachable = tool_error(&alice, "vm_start", json!({"vm": "web"})).await;
    assert!(unreachable.starts_with("node n1 is unreachable"), "{unreachable}");
    let stale = call_ok(&alice, "vm_inspect", json!({"vm": "web"})).await;
    assert!(stale["vm"]["stale"].as_str().unwrap().contains("did not answer"), "{stale}");
    assert!(alive(pid), "the VM outlives its node agent");
    until("heartbeats to mark n1 unreachable", Duration::from_secs(20), async || {
        let (_, out, _) = home.run(&["status"]).await;
        out.lines().any(|l| l.contains("n1 ") && l.contains("UNREACHABLE"))
    })
    .await;
    n1.start().await;
    until("heartbeats to mark n1 reachable again", Duration::from_secs(20), async || {
        let (_, out, _) = home.run(&["status"]).await;
        out.lines().any(|l| l.contains("n1 ") && !l.contains("UNREACHABLE"))
    })
    .await;
    let adopted = call_ok(&alice, "vm_inspect", json!({"vm": "web"})).await;
    assert_eq!(adopted["vm"]["state"], "running", "{adopted}");
    assert!(adopted["vm"]["stale"].is_null());
    assert_eq!(n1.vmm_pid(&id), pid, "re-adopted, not restarted");
    let forced = call_ok(&alice, "vm_stop", json!({"vm": "web", "force": true})).await;
    assert_eq!(forced["vm"]["state"], "stopped", "{forced}");
    assert!(!alive(pid) || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z"));

    let deleted = call_ok(&alice, "vm_delete", json!({"vm": "web"})).await;
    assert_eq!(deleted["deleted"], id.as_str());
    assert!(!n1.root.join("vms").join(&id).exists(), "the VM's directory is gone");
    assert!(tool_error(&alice, "vm_inspect", json!({"vm": "web"})).await.starts_with("no vm named"));

    let audit = call_ok(&admin, "audit_query", json!({"principal": "alice", "tool": "vm_create"})).await;
    assert!(!audit["records"].as_array().unwrap().is_empty(), "{audit}");
    for client in [alice, bob, admin] {
        client.cancel().await.unwrap();
    }
    assert!(moat.terminate().await.success());
}

#[tokio::test]
async fn vm_faults_and_node_identity() {
    let home = Home::new();
    let tmp = tempfile::tempdir().unwrap();
    home.run(&["pki", "init"]).await;
    let images = images_dir(tmp.path());
    // n2 has the image but no VMM binary.
    let n2 = Node::enroll_and_start(
        &home,
        tmp.path(),
        "n2",
        &["--images", images.to_str().unwrap(), "--qemu", "/nonexistent/qemu-system-x86_64"],
    )
    .await;
    let mut moat = home.http_server(&[]).await;
    let admin = moat.client(&moat.key).await;

    let (code, message, _) = call_err(&admin, "vm_create", json!({"name": "x", "vcpus": 1, "memory_mib": 10})).await;
    assert_eq!(code, -32602);
    assert!(message.contains("memory_mib"), "{message}");
    let (code, _, _) = call_err(&admin, "vm_create", json!({"name": "Bad_Name", "vcpus": 1, "memory_mib": 64})).await;
    assert_eq!(code, -32602);
    let (code, _, _) = call_err(&admin, "vm_create", json!({"name": "x", "vcpus": 0, "memory_mib": 64})).await;
    assert_eq!(code, -32602);

    let no_runtime =
        tool_error(&admin, "vm_create", json!({"name": "x", "vcpus": 1, "memory_mib": 64, "node": "n2"})).await;
    assert!(
        no_runtime.contains("no VM runtime on node n2") && no_runtime.contains("install qemu-system-x86"),
        "{no_runtime}"
    );
    let huge = tool_error(&admin, "vm_create", json!({"name": "x", "vcpus": 1, "memory_mib": 262144})).await;
    assert!(huge.starts_with("no node can take a VM with 1 vCPUs and 262144 MiB"), "{huge}");
    let unknown =
        tool_error(&admin, "vm_create", json!({"name": "x", "vcpus": 1, "memory_mib": 64, "node": "nope"})).await;
    assert!(unknown.contains("no node named `nope`"), "{unknown}");
    assert!(tool_error(&admin, "vm_start", json!({"vm": "ghost"})).await.starts_with("no vm named `ghost`"));
    assert_eq!(call_ok(&admin, "vm_list", json!({})).await["vms"], json!([]), "failed creates leave no records");
    assert!(std::fs::read_dir(n2.root.join("vms")).unwrap().next().is_none(), "and no directories");

    // The gateway accepts a node only under the name its certificate carries.
    let n2_address =
        call_ok(&admin, "node_inspect", json!({"node": "n2"})).await["node"]["address"].as_str().unwrap().to_string();
    let (ok, _, err) = home.run(&["node", "add", "impostor", "--address", &n2_address]).await;
    assert!(ok, "{err}");
    let impostor = call_ok(&admin, "node_inspect", json!({"node": "impostor"})).await;
    assert_eq!(impostor["node"]["reachable"], false);
    assert!(impostor["node"]["error"].as_str().unwrap().contains("certificate"), "{impostor}");

    // The node accepts only the gateway's certificate: its own (a node certificate) is refused.
    let pki = home.state_dir().join("pki");
    let certs = tmp.path().join("n2-certs");
    let refused =
        tls_call(&n2_address, &pki.join("node-ca.pem"), &certs.join("node.pem"), &certs.join("node.key")).await;
    assert!(refused.is_err(), "a node certificate must not authenticate a client");
    let accepted =
        tls_call(&n2_address, &pki.join("node-ca.pem"), &pki.join("gateway.pem"), &pki.join("gateway.key")).await;
    assert_eq!(accepted.unwrap(), "n2");

    // Rotation: a new gateway certificate is used after SIGHUP, with no node restart.
    let before = std::fs::read(pki.join("gateway.pem")).unwrap();
    let (ok, out, err) = home.run(&["pki", "rotate"]).await;
    assert!(ok && out.contains("new gateway certificate"), "{out}{err}");
    assert_ne!(std::fs::read(pki.join("gateway.pem")).unwrap(), before);
    moat.hangup();
    until("the gateway to reload", Duration::from_secs(10), async || moat.logged("node connections will use")).await;
    let after = call_ok(&admin, "node_inspect", json!({"node": "n2"})).await;
    assert_eq!(after["node"]["reachable"], true, "{after}");

    // A node's certificate renewed in place: re-enroll, SIGHUP the node, and new handshakes get the
    // new certificate from the same process.
    let first_cert = |path: &Path| moat_node::tls::read_certs(path).unwrap().remove(0).as_ref().to_vec();
    assert_eq!(served_cert(&n2_address, &pki).await, first_cert(&certs.join("node.pem")));
    let (ok, out, err) =
        home.run(&["node", "enroll", "n2", "--address", &n2_address, "--out", certs.to_str().unwrap()]).await;
    assert!(ok, "{out}{err}");
    let renewed = first_cert(&certs.join("node.pem"));
    n2.hangup();
    until("n2 to serve its renewed certificate", Duration::from_secs(10), async || {
        served_cert(&n2_address, &pki).await == renewed
    })
    .await;
    moat.hangup();
    let renewed_ok = call_ok(&admin, "node_inspect", json!({"node": "n2"})).await;
    assert_eq!(renewed_ok["node"]["reachable"], true, "{renewed_ok}");

    admin.cancel().await.unwrap();
    assert!(moat.terminate().await.success());
}

/// The certificate (DER) a node presents to the gateway's client certificate.
async fn served_cert(address: &str, pki: &Path) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for c in moat_node::tls::read_certs(&pki.join("node-ca.pem")).unwrap() {
        roots.add(c).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(moat_node::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            moat_node::tls::read_certs(&pki.join("gateway.pem")).unwrap(),
            moat_node::tls::read_key(&pki.join("gateway.key")).unwrap(),
        )
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(address.trim_start_matches("https://")).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("n2").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].as_ref().to_vec()
}

/// GetNodeInfo over mTLS with the given client certificate; the node's name, or the error.
async fn tls_call(address: &str, ca: &Path, cert: &Path, key: &Path) -> Result<String, String> {
    use moat_proto::node::v1::GetNodeInfoRequest;
    use moat_proto::node::v1::node_service_client::NodeServiceClient;
    let mut roots = rustls::RootCertStore::empty();
    for c in moat_node::tls::read_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(moat_node::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(moat_node::tls::read_certs(cert).unwrap(), moat_node::tls::read_key(key).unwrap())
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let authority = address.trim_start_matches("https://").to_string();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let (connector, authority) = (connector.clone(), authority.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(authority).await?;
                let name = rustls::pki_types::ServerName::try_from("n2").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| e.to_string())?;
    let mut client = NodeServiceClient::new(channel);
    client.get_node_info(GetNodeInfoRequest {}).await.map(|r| r.into_inner().name).map_err(|e| e.to_string())
}

#[derive(Clone, Default)]
struct Progress(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl rmcp::ClientHandler for Progress {
    async fn on_progress(
        &self,
        params: rmcp::model::ProgressNotificationParam,
        _context: rmcp::service::NotificationContext<RoleClient>,
    ) {
        self.0.lock().unwrap().push(params.message.unwrap_or_default());
    }
}

/// An HTTP client that records the progress notifications it receives.
async fn progress_client(url: &str, key: &str) -> (RunningService<RoleClient, Progress>, Progress) {
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    let config = StreamableHttpClientTransportConfig::with_uri(url.to_string()).auth_header(key.to_string());
    let transport = StreamableHttpClientTransport::with_client(reqwest::Client::new(), config);
    let progress = Progress::default();
    (progress.clone().serve(transport).await.unwrap(), progress)
}

async fn guest_ok<H: rmcp::ClientHandler>(client: &RunningService<RoleClient, H>, tool: &str, args: Value) -> Value {
    let params =
        rmcp::model::CallToolRequestParams::new(tool.to_string()).with_arguments(args.as_object().unwrap().clone());
    let result = client.call_tool(params).await.unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert_ne!(result.is_error, Some(true), "{tool}: {result:?}");
    result.structured_content.unwrap()
}

#[tokio::test]
async fn guest_exec_and_files_through_the_gateway() {
    use base64::Engine;
    use sha2::Digest;
    let home = Home::new();
    let tmp = tempfile::tempdir().unwrap();
    home.run(&["pki", "init"]).await;
    let images = images_dir(tmp.path());
    let n1 = Node::enroll_and_start(&home, tmp.path(), "n1", &["--images", images.to_str().unwrap(), "--accel", "tcg"])
        .await;
    let mut moat = home.http_server(&[]).await;
    let alice_key = home.key("alice", "agent").await;
    let (alice, progress) = progress_client(&moat.url, &alice_key).await;
    let bob = moat.client(&home.key("bob", "agent").await).await;
    let admin = moat.client(&moat.key).await;

    let stopped =
        guest_ok(&alice, "vm_create", json!({"name": "box", "vcpus": 1, "memory_mib": 256, "start": false})).await;
    let not_running = tool_error(&admin, "vm_exec", json!({"vm": stopped["vm"]["id"], "argv": ["true"]})).await;
    assert!(not_running.contains("is stopped; start it first"), "{not_running}");
    guest_ok(&alice, "vm_start", json!({"vm": "box"})).await;
    // Boot doubles under a parallel build (VM-TESTING.md): the same bound as `wait_ready`, and on
    // failure what the node knows about the agent and what the console says.
    let started = Instant::now();
    loop {
        let inspect = guest_ok(&alice, "vm_inspect", json!({"vm": "box"})).await;
        if inspect["vm"]["agent"]["ready"] == true {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let logs = call_ok(&admin, "vm_logs", json!({"vm": stopped["vm"]["id"]})).await;
            let dir = tmp.path().join("n1/vms").join(stopped["vm"]["id"].as_str().unwrap());
            let daemon = std::fs::read_to_string(dir.join("vsock.log")).unwrap_or_default();
            panic!(
                "the agent did not answer within 120 s: {inspect}\n--- console ---\n{}\n--- vsock.log ---\n{daemon}",
                logs["text"]
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // An image whose kernel cannot boot: wait_ready says so, with the console.
    let broken = images.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::os::unix::fs::symlink(guest_image().canonicalize().unwrap().join("vmlinux"), broken.join("vmlinux")).unwrap();
    std::fs::write(broken.join("initramfs.cpio.gz"), b"not an initramfs").unwrap();
    let never = tool_error(
        &admin,
        "vm_create",
        json!({"name": "never", "vcpus": 1, "memory_mib": 128, "image": "broken", "wait_ready": true}),
    )
    .await;
    assert!(never.starts_with("agent on vm never not ready") && never.contains("Kernel panic"), "{never}");

    // Streamed output reaches the MCP client as progress while the command runs.
    let uname = guest_ok(&alice, "vm_exec", json!({"vm": "box", "command": "uname -a; sleep 0.2; echo done"})).await;
    assert_eq!(uname["exit_code"], 0, "{uname}");
    assert!(uname["stdout"].as_str().unwrap().starts_with("Linux"), "{uname}");
    let seen = progress.0.lock().unwrap().clone();
    assert!(seen.iter().any(|m| m.starts_with("stdout: Linux")), "progress forwarded: {seen:?}");

    // A 10 MiB binary file in and out, same SHA-256.
    let bytes: Vec<u8> = (0..10 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let want: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    let content = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let written = guest_ok(
        &alice,
        "vm_file_write",
        json!({"vm": "box", "path": "/root/blob.bin", "content": content, "encoding": "base64", "create_dirs": true}),
    )
    .await;
    assert_eq!(written["sha256"], want.as_str());
    let read = guest_ok(&alice, "vm_file_read", json!({"vm": "box", "path": "/root/blob.bin"})).await;
    let back = base64::engine::general_purpose::STANDARD.decode(read["content"].as_str().unwrap()).unwrap();
    let got: String = sha2::Sha256::digest(&back).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(got, want);
    let sum = guest_ok(&alice, "vm_exec", json!({"vm": "box", "argv": ["sha256sum", "/root/blob.bin"]})).await;
    assert!(sum["stdout"].as_str().unwrap().starts_with(&want), "the guest sees the same bytes: {sum}");
    let listed = guest_ok(&alice, "vm_file_list", json!({"vm": "box", "path": "/root"})).await;
    assert_eq!(listed["entries"][0]["size"], 10 * 1024 * 1024);

    // Short calls share the VM's kept session: no new tunnel per call.
    guest_ok(&alice, "vm_exec", json!({"vm": "box", "argv": ["true"]})).await;
    let opened = moat.logged_times("guest session opened");
    for _ in 0..3 {
        guest_ok(&alice, "vm_exec", json!({"vm": "box", "argv": ["true"]})).await;
    }
    assert_eq!(moat.logged_times("guest session opened"), opened, "the kept session was reused");

    // Exit codes, signals and timeouts are reported as such.
    let failed = guest_ok(&alice, "vm_exec", json!({"vm": "box", "command": "exit 3"})).await;
    assert_eq!((failed["exit_code"].as_i64(), failed["signal"].as_i64()), (Some(3), None));
    let killed = guest_ok(&alice, "vm_exec", json!({"vm": "box", "command": "kill -KILL $$"})).await;
    assert_eq!((killed["exit_code"].as_i64(), killed["signal"].as_i64()), (None, Some(9)));
    let timed = guest_ok(&alice, "vm_exec", json!({"vm": "box", "command": "sleep 30", "timeout_s": 1})).await;
    assert_eq!(timed["timed_out"], true, "{timed}");

    // Bad input changes nothing, and bob cannot reach alice's VM at all.
    let relative =
        tool_error(&admin, "vm_file_write", json!({"vm": stopped["vm"]["id"], "path": "x", "content": "y"})).await;
    assert!(relative.contains("relative"), "{relative}");
    let unknown = tool_error(&admin, "vm_exec_status", json!({"vm": stopped["vm"]["id"], "id": "x999"})).await;
    assert!(unknown.contains("no background process"), "{unknown}");
    assert!(tool_error(&bob, "vm_exec", json!({"vm": "box", "argv": ["id"]})).await.starts_with("no vm named `box`"));

    // A background process outlives the client that started it.
    let started =
        guest_ok(&alice, "vm_exec_start", json!({"vm": "box", "command": "echo begun; sleep 1; echo done"})).await;
    let id = started["id"].as_str().unwrap().to_string();
    alice.cancel().await.unwrap();
    let (alice, _) = progress_client(&moat.url, &alice_key).await;
    until("the background process to finish", Duration::from_secs(30), async || {
        guest_ok(&alice, "vm_exec_status", json!({"vm": "box", "id": id})).await["running"] == false
    })
    .await;
    let output = guest_ok(&alice, "vm_exec_output", json!({"vm": "box", "id": id})).await;
    assert_eq!(output["stdout"], "begun\ndone\n");

    // Cancelling the call kills the process group in the guest.
    let args = json!({"vm": "box", "command": "sleep 300 & echo $! > /root/sleeper; wait"});
    let request = rmcp::model::ClientRequest::CallToolRequest(rmcp::model::CallToolRequest::new(
        rmcp::model::CallToolRequestParams::new("vm_exec").with_arguments(args.as_object().unwrap().clone()),
    ));
    let mut options = rmcp::service::PeerRequestOptions::no_options();
    options.timeout = Some(Duration::from_secs(3));
    let handle = alice.peer().send_cancellable_request(request, options).await.unwrap();
    assert!(handle.await_response().await.is_err(), "timed out and cancelled");
    until("the cancelled process to be gone", Duration::from_secs(20), async || {
        let check = guest_ok(&alice, "vm_exec", json!({"vm": "box", "command": "kill -0 $(cat /root/sleeper)"})).await;
        check["exit_code"] != 0
    })
    .await;

    // The agent killed inside the guest comes back (init restarts it) and is reached again.
    guest_ok(&alice, "vm_exec_start", json!({"vm": "box", "command": "sleep 0.3; kill -9 $(pidof moat-guest)"})).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after = guest_ok(&alice, "vm_exec", json!({"vm": "box", "argv": ["echo", "back"]})).await;
    assert_eq!(after["stdout"], "back\n");
    let logs = call_ok(&admin, "vm_logs", json!({"vm": stopped["vm"]["id"]})).await;
    assert!(logs["text"].as_str().unwrap().contains("moat-guest exited"), "init restarted the agent: {logs}");
    until("the node to log the agent lost and back", Duration::from_secs(30), async || {
        n1.logged_times("guest agent lost") > 0 && n1.logged_times("guest agent ready") >= 2
    })
    .await;

    // vm_list shows each VM's agent as of the node's last heartbeat (no last_seen); a VM that
    // does not run has none.
    until("vm_list to show box's agent ready", Duration::from_secs(20), async || {
        let listed = guest_ok(&alice, "vm_list", json!({})).await;
        listed["vms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|vm| vm["name"] == "box" && vm["agent"]["ready"] == true && vm["agent"]["last_seen"].is_null())
    })
    .await;
    let listed = call_ok(&admin, "vm_list", json!({})).await;
    let never = listed["vms"].as_array().unwrap().iter().find(|vm| vm["name"] == "never").unwrap();
    assert!(never["state"] != "running" && never["agent"].is_null(), "{never}");

    // An agent that stops answering (SIGSTOP: the guest kernel still accepts its connections).
    // The kept session fails its ping and is replaced; the new connection stalls before
    // `initialize` is answered, is dropped after its timeout and opened once more, and that one
    // is answered when the agent continues. Timeline from the job's start: stopped at 0.3 s, the
    // call at 2 s, ping given up at 4 s, first connection given up at 14 s, continued at 19 s.
    let stall = "sleep 0.3; kill -STOP $(pidof moat-guest); sleep 18.7; kill -CONT $(pidof moat-guest)";
    guest_ok(&alice, "vm_exec_start", json!({"vm": "box", "command": stall})).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let resumed = guest_ok(&alice, "vm_exec", json!({"vm": "box", "argv": ["echo", "resumed"]})).await;
    assert_eq!(resumed["stdout"], "resumed\n");
    assert!(moat.logged("the kept guest session is replaced: no answer to a ping within 2s"));
    assert!(moat.logged("agent on vm box did not answer within 10s; trying a new connection"));

    // Contents never reach the audit log: only their digest and shape.
    let audit = call_ok(&admin, "audit_query", json!({"tool": "vm_file_write", "principal": "alice"})).await;
    let text = audit.to_string();
    assert!(!audit["records"].as_array().unwrap().is_empty());
    assert!(!text.contains(&content[..64]), "file contents are not audited");

    // A kept session closes once idle, so the agent frees what it held.
    until("the idle guest session to close", moat_gateway::guest::IDLE * 2, async || {
        moat.logged("guest session closed")
    })
    .await;

    for client in [bob, admin] {
        client.cancel().await.unwrap();
    }
    alice.cancel().await.unwrap();
    assert!(moat.terminate().await.success());
}

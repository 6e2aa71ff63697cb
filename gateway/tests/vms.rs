//! End to end: MCP clients drive real VMs through the gateway and a separately started
//! `moat-node` over mutual TLS, with QEMU (TCG) booting moat's base image. The lifecycle
//! test runs as named steps on one rig; the guest tools are in `guest.rs`.
//! Needs the image (`moat image build`, as `.ci/test` does, or $MOAT_GUEST_IMAGE)
//! and the `moat-node` binary next to `moat` (cargo builds both).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code spawns binaries

mod common;

use std::path::Path;
use std::time::Duration;

use common::node::Node;
use common::{Home, HttpMoat, call_err, call_ok, tool_error};
use moat_node::testing::{alive, images_with_base, until};
use rmcp::RoleClient;
use rmcp::service::RunningService;
use serde_json::json;
use tokio::io::AsyncBufReadExt;

type Client = RunningService<RoleClient, ()>;

/// A gateway over HTTP with node n1 (mTLS, QEMU TCG, the base image), and three callers:
/// alice and bob (agents) and an admin.
struct Rig {
    /// First, so it drops first: its reaper finds the VMs' directories before `_tmp` goes.
    n1: Node,
    home: Home,
    _tmp: tempfile::TempDir,
    moat: HttpMoat,
    alice_key: String,
    alice: Client,
    bob: Client,
    admin: Client,
    /// Alice's VM `web`, once created.
    web: String,
}

impl Rig {
    async fn start() -> Rig {
        let home = Home::new();
        let tmp = tempfile::tempdir().unwrap();
        let (ok, out, err) = home.run(&["pki", "init"]).await;
        assert!(ok && out.contains("created"), "{out}{err}");
        let images = images_with_base(tmp.path());
        // QEMU behind a wrapper that holds VMs named `slow` for 30 s before QEMU runs, so a test
        // can kill the node in the middle of their create.
        let wrapper = tmp.path().join("qemu-wrapper");
        let script = "#!/bin/sh\ncase \"$*\" in *moat-slow,*) sleep 30;; esac\nexec qemu-system-x86_64 \"$@\"\n";
        std::fs::write(&wrapper, script).unwrap();
        std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let args = ["--images", images.to_str().unwrap(), "--accel", "tcg", "--qemu", wrapper.to_str().unwrap()];
        let n1 = Node::enroll_and_start(&home, tmp.path(), "n1", &args).await;
        let moat = home.http_server(&["--heartbeat-ms", "300"]).await;
        let alice_key = home.key("alice", "agent").await;
        let alice = moat.client(&alice_key).await;
        let bob = moat.client(&home.key("bob", "agent").await).await;
        let admin = moat.client(&moat.key).await;
        Rig { home, _tmp: tmp, n1, moat, alice_key, alice, bob, admin, web: String::new() }
    }

    /// Until `moat status` shows n1 reachable (or not).
    async fn wait_n1(&self, reachable: bool) {
        until("heartbeats to see n1's new state", Duration::from_secs(20), async || {
            let (_, out, _) = self.home.run(&["status"]).await;
            out.lines().any(|l| l.contains("n1 ") && l.contains("UNREACHABLE") != reachable)
        })
        .await;
    }

    /// The VM directory on n1 whose config names `name`, if any.
    fn dir_named(&self, name: &str) -> Option<std::path::PathBuf> {
        std::fs::read_dir(self.n1.root.join("vms")).ok()?.flatten().map(|e| e.path()).find(|dir| {
            std::fs::read_to_string(dir.join("config.json")).is_ok_and(|c| c.contains(&format!("\"name\": \"{name}\"")))
        })
    }

    async fn node_is_seen_with_its_runtime(&self) {
        let n1_info = call_ok(&self.alice, "node_inspect", json!({"node": "n1"})).await;
        assert_eq!(n1_info["node"]["reachable"], true, "{n1_info}");
        let runtime = (n1_info["node"]["runtime"].as_str(), n1_info["node"]["accel"].as_str());
        assert_eq!(runtime, (Some("qemu"), Some("tcg")));
        assert_eq!(n1_info["node"]["images"], json!(["base"]));
    }

    /// No node named: placement skips `local` (no image there) and picks n1.
    async fn create_waits_for_the_agent(&mut self) {
        let args = json!({"name": "web", "vcpus": 1, "memory_mib": 256, "labels": {"team": "a"}, "wait_ready": true});
        let created = call_ok(&self.alice, "vm_create", args).await;
        let vm = &created["vm"];
        assert_eq!(vm["agent"]["ready"], true, "wait_ready returns once the agent answers: {created}");
        assert_eq!(vm["agent"]["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(
            (vm["state"].as_str(), vm["node"].as_str(), vm["owner"].as_str()),
            (Some("running"), Some("n1"), Some("alice")),
            "{created}"
        );
        assert_eq!((vm["vmm"].as_str(), vm["accel"].as_str()), (Some("qemu"), Some("tcg")));
        self.web = vm["id"].as_str().unwrap().to_string();
    }

    async fn the_console_is_readable(&self) {
        until("the guest to boot", Duration::from_secs(120), async || {
            let logs = call_ok(&self.alice, "vm_logs", json!({"vm": "web"})).await;
            logs["text"].as_str().unwrap().contains("moat-init: ready")
        })
        .await;
        let logs = call_ok(&self.alice, "vm_logs", json!({"vm": "web", "tail": 5000})).await;
        assert!(logs["text"].as_str().unwrap().contains("Linux version"), "the kernel boot is in the console: {logs}");
        let short = call_ok(&self.alice, "vm_logs", json!({"vm": self.web, "tail": 2})).await;
        assert_eq!(short["text"].as_str().unwrap().lines().count(), 2);
        assert_eq!(short["truncated"], true);
    }

    /// Bob cannot see or touch alice's VM, and is not told it exists; names are per owner.
    async fn ownership_and_names(&self) {
        let (alice, bob, admin, id) = (&self.alice, &self.bob, &self.admin, &self.web);
        assert_eq!(
            tool_error(bob, "vm_inspect", json!({"vm": "web"})).await,
            "no vm named `web`; vm_list shows your VMs"
        );
        assert!(tool_error(bob, "vm_stop", json!({"vm": id})).await.starts_with(&format!("no vm named `{id}`")));
        assert!(tool_error(bob, "vm_logs", json!({"vm": id})).await.starts_with("no vm named"));
        assert_eq!(call_ok(bob, "vm_list", json!({})).await["vms"], json!([]));
        // Bob may have a `web` too; an admin must then say which.
        let args = json!({"name": "web", "vcpus": 1, "memory_mib": 64, "node": "n1", "start": false});
        assert_eq!(call_ok(bob, "vm_create", args).await["vm"]["state"], "stopped");
        let ambiguous = tool_error(admin, "vm_inspect", json!({"vm": "web"})).await;
        assert!(ambiguous.contains("several VMs are named `web`") && ambiguous.contains(id.as_str()), "{ambiguous}");
        let mine = call_ok(alice, "vm_list", json!({"label": "team=a"})).await;
        assert_eq!(mine["vms"].as_array().unwrap().len(), 1, "{mine}");
        assert_eq!(call_ok(admin, "vm_list", json!({"node": "n1"})).await["vms"].as_array().unwrap().len(), 2);
        call_ok(bob, "vm_delete", json!({"vm": "web"})).await;
        let dup = tool_error(alice, "vm_create", json!({"name": "web", "vcpus": 1, "memory_mib": 64})).await;
        assert!(dup.contains("already have a vm named `web`"), "{dup}");
        let (ok, _, err) = self.home.run(&["node", "remove", "n1"]).await;
        assert!(!ok && err.contains("still has 1 VMs (web)"), "{err}");
    }

    /// The ACPI power button, then start again.
    async fn graceful_stop_and_start(&self) {
        let stopped = call_ok(&self.alice, "vm_stop", json!({"vm": "web", "timeout_s": 60})).await;
        assert_eq!(stopped["vm"]["state"], "stopped", "{stopped}");
        assert!(stopped["vm"]["reason"].as_str().unwrap().contains("powered off"), "{stopped}");
        assert_eq!(call_ok(&self.alice, "vm_start", json!({"vm": "web"})).await["vm"]["state"], "running");
    }

    /// QEMU killed behind moat's back: the heartbeat brings `crashed` and the signal back.
    async fn a_killed_vmm_is_a_crash(&self) {
        let pid = self.n1.vmm_pid(&self.web);
        // SAFETY: kill(2) on the VMM of this test's VM.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        until("the crash to reach vm_list", Duration::from_secs(20), async || {
            call_ok(&self.alice, "vm_list", json!({"state": "crashed"})).await["vms"].as_array().unwrap().len() == 1
        })
        .await;
        let crashed = call_ok(&self.alice, "vm_inspect", json!({"vm": "web"})).await;
        assert!(crashed["vm"]["reason"].as_str().unwrap().contains("signal 9"), "{crashed}");
    }

    /// A moat-node restart keeps the running VM running and managed.
    async fn a_node_restart_readopts_the_vm(&mut self) {
        let alice = &self.alice;
        assert_eq!(call_ok(alice, "vm_start", json!({"vm": "web"})).await["vm"]["state"], "running");
        let pid = self.n1.vmm_pid(&self.web);
        self.n1.stop().await;
        let unreachable = tool_error(alice, "vm_start", json!({"vm": "web"})).await;
        assert!(unreachable.starts_with("node n1 is unreachable"), "{unreachable}");
        let stale = call_ok(alice, "vm_inspect", json!({"vm": "web"})).await;
        assert!(stale["vm"]["stale"].as_str().unwrap().contains("did not answer"), "{stale}");
        assert!(alive(pid), "the VM outlives its node agent");
        until("heartbeats to mark n1 unreachable", Duration::from_secs(20), async || {
            let (_, out, _) = self.home.run(&["status"]).await;
            out.lines().any(|l| l.contains("n1 ") && l.contains("UNREACHABLE"))
        })
        .await;
        self.n1.start().await;
        until("heartbeats to mark n1 reachable again", Duration::from_secs(20), async || {
            let (_, out, _) = self.home.run(&["status"]).await;
            out.lines().any(|l| l.contains("n1 ") && !l.contains("UNREACHABLE"))
        })
        .await;
        let adopted = call_ok(alice, "vm_inspect", json!({"vm": "web"})).await;
        assert_eq!(adopted["vm"]["state"], "running", "{adopted}");
        assert!(adopted["vm"]["stale"].is_null());
        assert_eq!(self.n1.vmm_pid(&self.web), pid, "re-adopted, not restarted");
        let forced = call_ok(alice, "vm_stop", json!({"vm": "web", "force": true})).await;
        assert_eq!(forced["vm"]["state"], "stopped", "{forced}");
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z");
        assert!(!alive(pid) || zombie);
    }

    /// QEMU dies while moat-node is down: the restarted node finds the VM crashed and says why,
    /// and stops what outlived QEMU (the vsock daemon) and gives back its cgroup and uid.
    async fn a_vmm_that_dies_while_the_node_is_down_is_a_crash(&mut self) {
        assert_eq!(call_ok(&self.alice, "vm_start", json!({"vm": "web"})).await["vm"]["state"], "running");
        let dir = self.n1.root.join("vms").join(&self.web);
        let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap().trim().parse::<i32>().unwrap();
        let (qemu, daemon, uid) = (read("vmm.pid"), read("vsock.pid"), read("vmm.uid"));
        self.n1.kill().await;
        // SAFETY: kill(2) on the VMM of this test's VM.
        unsafe { libc::kill(qemu, libc::SIGKILL) };
        until("QEMU to die", Duration::from_secs(10), async || !running(qemu)).await;
        assert!(running(daemon), "the vsock daemon outlived QEMU while no node watched");
        self.n1.start().await;
        self.wait_n1(true).await;
        let found = call_ok(&self.alice, "vm_inspect", json!({"vm": "web"})).await;
        assert_eq!(found["vm"]["state"], "crashed", "{found}");
        assert!(found["vm"]["reason"].as_str().unwrap().contains("exited while moat-node was not running"), "{found}");
        until("the orphaned vsock daemon to be stopped", Duration::from_secs(10), async || !running(daemon)).await;
        assert!(!Path::new(&format!("/run/moat/vm-uids/{uid}")).exists(), "uid {uid} released");
        assert!(!dir.join("vmm.uid").exists());
    }

    /// moat-node killed in the middle of a create: the caller hears that it failed, and once the
    /// node is back nothing of that VM is left: no directory, no VMM, no record.
    async fn an_interrupted_create_leaves_nothing(&mut self) {
        let client = self.moat.client(&self.alice_key).await;
        let create = tokio::spawn(async move {
            let args = json!({"name": "slow", "vcpus": 1, "memory_mib": 128});
            let answer = tool_error(&client, "vm_create", args).await;
            client.cancel().await.unwrap();
            answer
        });
        let mut dir = None;
        until("the slow VM's VMM to be started", Duration::from_secs(30), async || {
            dir = self.dir_named("slow").filter(|d| d.join("vmm.pid").exists());
            dir.is_some()
        })
        .await;
        let dir = dir.unwrap();
        let pid: i32 = std::fs::read_to_string(dir.join("vmm.pid")).unwrap().trim().parse().unwrap();
        assert!(dir.join("creating").exists(), "the create is marked as under way");
        self.n1.kill().await;
        let answer = create.await.unwrap();
        assert!(answer.contains("n1"), "the caller is told the create failed: {answer}");
        assert!(running(pid), "the half-made VM's VMM outlived its node");
        self.n1.start().await;
        self.wait_n1(true).await;
        assert!(!dir.exists(), "the half-made VM's directory is gone");
        until("the half-made VM's VMM to be killed", Duration::from_secs(10), async || !running(pid)).await;
        let listed = call_ok(&self.admin, "vm_list", json!({})).await;
        assert!(!listed.to_string().contains("\"slow\""), "no record of it: {listed}");
    }

    /// moat-node killed in the middle of a delete (held inside its directory removal by strace):
    /// the restarted node finishes it, and the gateway's record goes at the next delete.
    async fn an_interrupted_delete_is_finished_at_restart(&mut self) {
        call_ok(&self.alice, "vm_create", json!({"name": "doomed", "vcpus": 1, "memory_mib": 64, "start": false}))
            .await;
        let dir = self.dir_named("doomed").unwrap();
        let mut strace = tokio::process::Command::new("strace")
            .args(["-f", "-p", &self.n1.pid().to_string(), "-e", "trace=unlinkat"])
            .args(["-e", "inject=unlinkat:delay_enter=3000000", "-o", "/dev/null"])
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("strace is installed (.ci/setup)");
        let mut stderr = tokio::io::BufReader::new(strace.stderr.take().unwrap()).lines();
        while let Some(line) = stderr.next_line().await.unwrap() {
            if line.contains("attached") {
                break;
            }
        }
        let client = self.moat.client(&self.alice_key).await;
        let delete = tokio::spawn(async move {
            let answer = tool_error(&client, "vm_delete", json!({"vm": "doomed"})).await;
            client.cancel().await.unwrap();
            answer
        });
        until("the node to be inside the delete", Duration::from_secs(20), async || {
            std::fs::read_to_string(dir.join("status.json")).is_ok_and(|s| s.contains("\"deleting\""))
        })
        .await;
        self.n1.kill().await;
        strace.kill().await.unwrap();
        assert!(delete.await.unwrap().contains("n1"), "the caller is told the delete did not finish");
        self.n1.start().await;
        self.wait_n1(true).await;
        assert!(!dir.exists(), "the restarted node finished the delete");
        let gone = call_ok(&self.alice, "vm_inspect", json!({"vm": "doomed"})).await;
        assert!(gone["vm"]["reason"].as_str().unwrap().contains("no longer has this VM"), "{gone}");
        call_ok(&self.alice, "vm_delete", json!({"vm": "doomed"})).await;
        assert!(tool_error(&self.alice, "vm_inspect", json!({"vm": "doomed"})).await.starts_with("no vm named"));
    }

    async fn delete_leaves_nothing(&self) {
        let deleted = call_ok(&self.alice, "vm_delete", json!({"vm": "web"})).await;
        assert_eq!(deleted["deleted"], self.web.as_str());
        assert!(!self.n1.root.join("vms").join(&self.web).exists(), "the VM's directory is gone");
        assert!(tool_error(&self.alice, "vm_inspect", json!({"vm": "web"})).await.starts_with("no vm named"));
        let audit = call_ok(&self.admin, "audit_query", json!({"principal": "alice", "tool": "vm_create"})).await;
        assert!(!audit["records"].as_array().unwrap().is_empty(), "{audit}");
    }

    async fn finish(mut self) {
        for client in [self.alice, self.bob, self.admin] {
            client.cancel().await.unwrap();
        }
        assert!(self.moat.terminate().await.success());
    }
}

/// Whether `pid` runs (a zombie does not).
fn running(pid: i32) -> bool {
    alive(pid) && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z")
}

#[tokio::test]
async fn vm_lifecycle_over_mtls_with_crash_and_node_restart() {
    let mut rig = Rig::start().await;
    rig.node_is_seen_with_its_runtime().await;
    rig.create_waits_for_the_agent().await;
    rig.the_console_is_readable().await;
    rig.ownership_and_names().await;
    rig.graceful_stop_and_start().await;
    rig.a_killed_vmm_is_a_crash().await;
    rig.a_node_restart_readopts_the_vm().await;
    rig.a_vmm_that_dies_while_the_node_is_down_is_a_crash().await;
    rig.an_interrupted_create_leaves_nothing().await;
    rig.an_interrupted_delete_is_finished_at_restart().await;
    rig.delete_leaves_nothing().await;
    rig.finish().await;
}

#[tokio::test]
async fn vm_faults_and_node_identity() {
    let home = Home::new();
    let tmp = tempfile::tempdir().unwrap();
    home.run(&["pki", "init"]).await;
    let images = images_with_base(tmp.path());
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
    // Nor a client certificate from another CA, an expired one from moat's own client CA, or none.
    let forged = tmp.path().join("forged");
    std::fs::create_dir_all(&forged).unwrap();
    let (cert, key) = client_cert(&forged, "foreign", None, false);
    assert!(tls_call(&n2_address, &pki.join("node-ca.pem"), &cert, &key).await.is_err(), "a foreign CA's client");
    let ca = (std::fs::read_to_string(pki.join("client-ca.key")).unwrap(), "moat gateway client CA");
    let (cert, key) = client_cert(&forged, "expired", Some(ca.clone()), true);
    let expired = tls_call(&n2_address, &pki.join("node-ca.pem"), &cert, &key).await;
    assert!(expired.is_err(), "an expired client certificate must be refused");
    let (cert, key) = client_cert(&forged, "current", Some(ca), false);
    assert_eq!(
        tls_call(&n2_address, &pki.join("node-ca.pem"), &cert, &key).await.unwrap(),
        "n2",
        "the same, unexpired, is accepted"
    );
    assert!(tls_call_without_cert(&n2_address, &pki.join("node-ca.pem")).await.is_err(), "no client certificate");
    // And the gateway trusts a node only with a node CA certificate: a server presenting the
    // gateway's own (client) certificate is refused.
    let posing = posing_node(&pki).await;
    let (ok, _, err) = home.run(&["node", "add", "poser", "--address", &posing]).await;
    assert!(ok, "{err}");
    let poser = call_ok(&admin, "node_inspect", json!({"node": "poser"})).await;
    assert_eq!(poser["node"]["reachable"], false, "{poser}");
    assert!(poser["node"]["error"].as_str().unwrap().contains("certificate"), "{poser}");

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

/// A client certificate (ClientAuth, CN `name`) in `dir`, signed by moat's client CA when given
/// its key and CN, else by a CA of its own; expired in 2001 when `expired`. (cert, key) paths.
fn client_cert(
    dir: &Path,
    name: &str,
    ca: Option<(String, &'static str)>,
    expired: bool,
) -> (std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_params = |cn: &str| {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.distinguished_name.push(DnType::OrganizationName, "moat");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        p
    };
    let issuer = match ca {
        Some((key_pem, cn)) => Issuer::new(ca_params(cn), KeyPair::from_pem(&key_pem).unwrap()),
        None => Issuer::new(ca_params("somebody else's CA"), KeyPair::generate().unwrap()),
    };
    let mut params = CertificateParams::new(vec!["moat-gateway".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "moat-gateway");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    if expired {
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

/// A TLS handshake with the node presenting no client certificate: Ok if the node accepts it.
async fn tls_call_without_cert(address: &str, ca: &Path) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let mut roots = rustls::RootCertStore::empty();
    for c in moat_node::tls::read_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(moat_node::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(address.trim_start_matches("https://")).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("n2").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    // TLS 1.3: the server's verdict on the client arrives after the client's handshake ends.
    let mut byte = [0u8; 1];
    match tls.read(&mut byte).await {
        Err(e) => Err(e.to_string()),
        Ok(0) => Err("closed".into()),
        Ok(_) => Ok(()),
    }
}

/// A TLS server on loopback presenting the gateway's client certificate as if it were a node.
async fn posing_node(pki: &Path) -> String {
    let certs = moat_node::tls::read_certs(&pki.join("gateway.pem")).unwrap();
    let key = moat_node::tls::read_key(&pki.join("gateway.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(moat_node::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    address
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

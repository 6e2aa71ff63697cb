//! The git service end to end, with QEMU guests on a nat network inside namespaces this test
//! makes (as in networks.rs: the node keeps its bridge and rules in a "host" namespace whose
//! uplink leads to an "outside" namespace). Storage is a loop-mounted btrfs, so the images and
//! workspaces are snapshots.
//!
//! Cases: the first repository starts the network's service VM (invisible to agents); an
//! agent's VM clones, commits and pushes through vm_exec and git_repo_log shows the commit;
//! another agent's VM on the same network is refused by the server (also with the first VM's
//! token, from the wrong address); a push to a "remote" (a smart-HTTP server with basic auth in
//! the outside namespace) succeeds with a credential that appears in no tool result, log line,
//! console log, audit record or database page; an unreachable remote fails within its timeout;
//! a stopped service VM is started again by the next call, a crashed one by the reconciler, and
//! a deleted one comes back with its repositories; a deleted VM's token stops working; bad
//! input changes nothing; everything can be removed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code spawns servers

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::node::Node;
use common::{Home, call, call_err, call_ok, debian_image, git_images, tool_error};
use moat_node::testing::{LoopFs, Netns, images_with_base, root_and, sh, until, uplink};
use serde_json::{Value, json};
use sha2::Digest;

/// A smart-HTTP git server with basic auth in namespace `ns` (moat's own front, run on the
/// host: `git http-backend` behind a user/password check), killed when dropped.
struct Remote(std::process::Child);

impl Remote {
    fn start(ns: &Netns, root: &Path, user: &str, secret: &str, from_ip: &str) -> Remote {
        std::fs::create_dir_all(root.join("git")).unwrap();
        sh(&["git", "init", "-q", "--bare", "-b", "main", root.join("git/app.git").to_str().unwrap()]);
        let hash = hex(&sha2::Sha256::digest(secret.as_bytes()));
        let access = json!({"repos": {"app": user}, "users": {user: {"sha256": hash, "owner": user, "ip": from_ip}}});
        std::fs::write(root.join("access.json"), access.to_string()).unwrap();
        let server = Path::new(env!("CARGO_MANIFEST_DIR")).join("../service-vms/git/git-http.py");
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.0, "python3", server.to_str().unwrap()])
            .env("MOAT_GIT_ROOT", root)
            .env("MOAT_GIT_PORT", "8080")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        Remote(child)
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `command` in `vm` with a shell; (exit code, stdout + stderr).
async fn run<H: rmcp::ClientHandler>(
    client: &rmcp::service::RunningService<rmcp::RoleClient, H>,
    vm: &str,
    command: &str,
) -> (i64, String) {
    let out = call_ok(client, "vm_exec", json!({"vm": vm, "command": command, "timeout_s": 60})).await;
    let text = format!("{}{}", out["stdout"].as_str().unwrap_or_default(), out["stderr"].as_str().unwrap_or_default());
    (out["exit_code"].as_i64().unwrap_or(-1), text)
}

#[tokio::test]
async fn agents_clone_and_push_in_their_own_repositories_and_remotes_get_the_secret_only_inside() {
    if !root_and(&["ip", "nft", "python3", "git", "qemu-system-x86_64", "mkfs.btrfs"]) {
        return;
    }
    let Some(btrfs) = LoopFs::new("mkfs.btrfs", 8192) else { return };
    let debian = debian_image();
    let (git_root, git_data) = git_images();
    let secret = format!("remote-secret-{}-xyzzy", std::process::id());

    let tag = std::process::id() % 100_000;
    let host = Netns::new(format!("moat-th{tag}"));
    let out = Netns::new(format!("moat-to{tag}"));
    // The uplink: host's up0 (192.0.2.1) to outside's eth0 (192.0.2.2).
    uplink(&host, &out);
    let tmp = tempfile::tempdir().unwrap();
    let remote_root = tmp.path().join("remote");
    // NAT makes the service VM's pushes come from the host namespace's uplink address.
    let _remote = Remote::start(&out, &remote_root, "ci", &secret, "192.0.2.1");

    let home = Home::new();
    home.run(&["pki", "init"]).await;
    let images = images_with_base(tmp.path());
    let storage = btrfs.path().join("storage");
    let node = Node::enroll_and_start(
        &home,
        tmp.path(),
        "n1",
        &[
            "--images",
            images.to_str().unwrap(),
            "--accel",
            "tcg",
            "--storage",
            storage.to_str().unwrap(),
            "--netns",
            &host.0,
        ],
    )
    .await;
    let moat = home.http_server(&[]).await;
    let admin = moat.client(&moat.key).await;
    let alice = moat.client(&home.key("alice", "agent").await).await;
    let bob = moat.client(&home.key("bob", "agent").await).await;
    call_ok(&admin, "image_import", json!({"name": "debian", "source": debian, "node": "n1"})).await;
    let dev = json!({"name": "dev", "cidr": "10.91.0.0/24", "mode": "nat", "uplink": "up0", "node": "n1"});
    call_ok(&admin, "network_create", dev).await;
    // Without the git images, the first repository says what to build.
    let err = tool_error(&alice, "git_repo_create", json!({"name": "app", "network": "dev"})).await;
    assert!(err.contains("moat image build git"), "{err}");
    assert_eq!(call_ok(&alice, "git_repo_list", json!({})).await["repos"], json!([]));
    for (name, file) in [("git", &git_root), ("git-data", &git_data)] {
        call_ok(&admin, "image_import", json!({"name": name, "source": file, "node": "n1"})).await;
    }

    // Agents neither see nor call the service tools; bad names are schema violations.
    let (code, _, _) = call_err(&alice, "git_service_ensure", json!({"network": "dev"})).await;
    assert_eq!(code, -32602, "agents cannot manage git services");
    for name in ["a/b", "a.b", "..", "app.git", "A"] {
        let (code, _, _) = call_err(&alice, "git_repo_create", json!({"name": name, "network": "dev"})).await;
        assert_eq!(code, -32602, "{name}");
    }
    let err = tool_error(&alice, "git_repo_create", json!({"name": "app", "network": "nosuch"})).await;
    assert!(err.contains("no network named `nosuch`"), "{err}");
    assert_eq!(call_ok(&admin, "git_service_list", json!({})).await["services"], json!([]));

    // The first repository starts the service VM.
    let started = Instant::now();
    let app = call_ok(&alice, "git_repo_create", json!({"name": "app", "network": "dev"})).await;
    eprintln!("git_repo_create with the service VM's first boot took {:?}", started.elapsed());
    let url = app["repo"]["clone_url"].as_str().unwrap().to_string();
    assert_eq!(url, "http://10.91.0.2/app.git", "{app}");
    assert_eq!(app["repo"]["owner"], "alice");
    let err = tool_error(&alice, "git_repo_create", json!({"name": "app", "network": "dev"})).await;
    assert!(err.contains("already exists"), "{err}");
    let services = call_ok(&admin, "git_service_list", json!({})).await;
    let service = services["services"][0].clone();
    assert_eq!((service["state"].as_str(), service["repos"].as_u64()), (Some("running"), Some(1)), "{services}");
    let service_vm = service["vm"].as_str().unwrap().to_string();
    assert_eq!(call_ok(&alice, "vm_list", json!({})).await["vms"], json!([]), "the service VM is not the agent's");
    let all = call_ok(&admin, "vm_list", json!({})).await;
    assert!(all["vms"].as_array().unwrap().iter().any(|v| v["id"] == service_vm.as_str()), "{all}");

    // Each agent's VM on the network gets credentials of its own when it is ready.
    let a1 = json!({"name": "a1", "vcpus": 1, "memory_mib": 384, "image": "debian", "network": "dev",
                    "wait_ready": true});
    let a1 = call_ok(&alice, "vm_create", a1).await;
    let a1_id = a1["vm"]["id"].as_str().unwrap().to_string();
    let b1 = json!({"name": "b1", "vcpus": 1, "memory_mib": 384, "image": "debian", "network": "dev",
                    "wait_ready": true});
    call_ok(&bob, "vm_create", b1).await;
    call_ok(&bob, "git_repo_create", json!({"name": "bobs", "network": "dev"})).await;
    // A VM created without waiting gets its credentials from the reconciler once its agent answers.
    let a2 = json!({"name": "a2", "vcpus": 1, "memory_mib": 256, "image": "debian", "network": "dev"});
    call_ok(&alice, "vm_create", a2).await;
    until("a2 has git credentials", Duration::from_secs(120), async || {
        let read = call(&alice, "vm_file_read", json!({"vm": "a2", "path": "/etc/moat/git-credentials"})).await;
        read.is_ok_and(|r| r.is_error != Some(true))
    })
    .await;
    let (code, said) = run(&alice, "a2", &format!("git ls-remote {url}")).await;
    assert_eq!(code, 0, "{said}");

    // Alice's VM clones, commits and pushes; git_repo_log shows the commit.
    let work = format!(
        "set -e; git clone -q {url} /root/app; cd /root/app; echo hello > README; git add README; \
         git -c user.name=Alice -c user.email=alice@example.com commit -qm 'first commit'; git push -q origin HEAD:main"
    );
    let (code, said) = run(&alice, "a1", &work).await;
    assert_eq!(code, 0, "{said}");
    let log = call_ok(&alice, "git_repo_log", json!({"repo": "app"})).await;
    assert_eq!(log["commits"].as_array().unwrap().len(), 1, "{log}");
    assert_eq!(
        (log["commits"][0]["subject"].as_str(), log["commits"][0]["author"].as_str()),
        (Some("first commit"), Some("Alice"))
    );
    let branches = call_ok(&alice, "git_repo_branches", json!({"repo": "app"})).await;
    assert_eq!(branches["branches"][0]["name"], "main", "{branches}");
    let err = tool_error(&alice, "git_repo_log", json!({"repo": "app", "ref": "nosuch"})).await;
    assert!(err.contains("no branch, tag or commit `nosuch`"), "{err}");
    let err = tool_error(&alice, "git_repo_log", json!({"repo": "app", "ref": "a..b"})).await;
    assert!(err.contains("not a ref"), "{err}");

    // Bob's VM is refused by the server: his own credentials do not open alice's repository,
    // and alice's token does not work from his VM's address.
    let (code, said) = run(&bob, "b1", &format!("git clone -q {url} /root/x")).await;
    assert!(code != 0 && said.contains("not found"), "{said}");
    let evil = format!(
        "set -e; git init -q /root/p; cd /root/p; git -c user.name=B -c user.email=b@example.com commit -q \
         --allow-empty -m evil; git push -q {url} HEAD:main"
    );
    let (code, said) = run(&bob, "b1", &evil).await;
    assert!(code != 0 && said.contains("not found"), "{said}");
    let stolen = call_ok(&alice, "vm_file_read", json!({"vm": "a1", "path": "/etc/moat/git-credentials"})).await;
    let stolen = stolen["content"].as_str().unwrap().trim().to_string();
    assert!(stolen.starts_with(&format!("http://{a1_id}:")), "{stolen}");
    let with_stolen = stolen.replace("@10.91.0.2", "@10.91.0.2/app.git");
    let (code, said) = run(&bob, "b1", &format!("git -c credential.helper= clone -q {with_stolen} /root/y")).await;
    assert!(code != 0 && said.contains("Authentication failed"), "{said}");
    let own = "set -e; git clone -q http://10.91.0.2/bobs.git /root/bobs; cd /root/bobs; git -c user.name=Bob \
               -c user.email=bob@example.com commit -q --allow-empty -m mine; git push -q origin HEAD:main";
    let (code, said) = run(&bob, "b1", own).await;
    assert_eq!(code, 0, "bob's own repository is his: {said}");
    let err = tool_error(&bob, "git_repo_log", json!({"repo": "app"})).await;
    assert!(err.contains("no git repository named `app`"), "{err}");
    let listed = call_ok(&bob, "git_repo_list", json!({})).await;
    assert_eq!(listed["repos"].as_array().unwrap().len(), 1, "{listed}");

    // Pushing to a remote: refused without the credential, done with it.
    let remote_url = "http://192.0.2.2:8080/app.git";
    let push = json!({"repo": "app", "remote_url": remote_url, "ref": "main", "timeout_s": 30});
    let err = tool_error(&alice, "git_repo_push", push.clone()).await;
    assert!(err.contains("git push to") && err.contains("failed"), "{err}");
    let set = json!({"remote_host": "192.0.2.2:8080", "username": "ci", "secret": secret});
    let mut results = vec![call_ok(&alice, "git_credential_set", set).await];
    results.push(call_ok(&alice, "git_credential_list", json!({})).await);
    assert_eq!(results[1]["credentials"][0]["username"], "ci", "{}", results[1]);
    assert_eq!(call_ok(&bob, "git_credential_list", json!({})).await["credentials"], json!([]));
    let pushed = call_ok(&alice, "git_repo_push", push).await;
    results.push(pushed.clone());
    let remote_log =
        sh(&["git", "-C", remote_root.join("git/app.git").to_str().unwrap(), "log", "--format=%s", "main"]);
    assert_eq!(remote_log.trim(), "first commit", "{pushed}");
    // Bob's pushes do not use alice's credential.
    let err = tool_error(&bob, "git_repo_push", json!({"repo": "bobs", "remote_url": remote_url, "ref": "main"})).await;
    assert!(err.contains("failed"), "{err}");
    // An unreachable remote fails within its timeout.
    let started = Instant::now();
    let far = json!({"repo": "app", "remote_url": "http://192.0.2.99:8080/app.git", "ref": "main", "timeout_s": 10});
    let err = tool_error(&alice, "git_repo_push", far).await;
    assert!(err.contains("192.0.2.99"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(40), "the push hung past its timeout: {:?}", started.elapsed());
    for (args, what) in [
        (json!({"repo": "app", "remote_url": "file:///etc", "ref": "main"}), "file URL"),
        (json!({"repo": "app", "remote_url": "http://u:p@h/x", "ref": "main"}), "URL with credentials"),
        (json!({"repo": "app", "remote_url": remote_url, "ref": "--force"}), "option as ref"),
    ] {
        let (code, _, _) = call_err(&alice, "git_repo_push", args).await;
        assert_eq!(code, -32602, "{what}");
    }
    let (code, _, _) =
        call_err(&alice, "git_credential_set", json!({"remote_host": "h", "username": "u", "secret": "a\nb"})).await;
    assert_eq!(code, -32602, "a secret with a newline");

    // A stopped service VM is started by the next call; the repositories are still there.
    call_ok(&admin, "vm_stop", json!({"vm": service_vm})).await;
    let log = call_ok(&alice, "git_repo_log", json!({"repo": "app"})).await;
    assert_eq!(log["commits"][0]["subject"], "first commit", "{log}");
    // A crashed one is started by the reconciler.
    let qemu = node.vmm_pid(&service_vm);
    // SAFETY: kill(2) on the service VM's QEMU, a process this test's node started.
    unsafe { libc::kill(qemu, libc::SIGKILL) };
    until("the crashed service VM runs again", Duration::from_secs(240), async || {
        let s = call_ok(&admin, "git_service_inspect", json!({"network": "dev"})).await;
        s["service"]["state"] == "running" && node.vmm_pid(&service_vm) != qemu
    })
    .await;
    // Deleted (as for an upgrade) and made again: same workspace, same repositories, and the
    // VMs on the network get new credentials.
    let gone = call_ok(&admin, "git_service_delete", json!({"network": "dev"})).await;
    assert_eq!(gone["repositories_deleted"], false);
    let err = tool_error(&admin, "network_delete", json!({"network": "dev"})).await;
    assert!(err.contains("git repositories"), "{err}");
    let again = call_ok(&admin, "git_service_ensure", json!({"network": "dev"})).await;
    assert_eq!(again["service"]["repos"], 2, "{again}");
    let (code, said) = run(&alice, "a1", "cd /root/app && git pull -q && git log --format=%s").await;
    assert_eq!((code, said.trim()), (0, "first commit"));
    // The remote credential lives with the repositories: it outlived the VM, until deleted.
    let again_push = json!({"repo": "app", "remote_url": remote_url, "ref": "main", "timeout_s": 30});
    results.push(call_ok(&alice, "git_repo_push", again_push.clone()).await);
    let err = tool_error(&alice, "git_credential_delete", json!({"remote_host": "nosuch.example"})).await;
    assert!(err.contains("no credential for nosuch.example"), "{err}");
    results.push(call_ok(&alice, "git_credential_delete", json!({"remote_host": "192.0.2.2:8080"})).await);
    assert_eq!(call_ok(&alice, "git_credential_list", json!({})).await["credentials"], json!([]));
    let err = tool_error(&alice, "git_repo_push", again_push).await;
    assert!(err.contains("failed"), "{err}");

    // A deleted VM's token is revoked in the service.
    call_ok(&alice, "vm_delete", json!({"vm": "a1"})).await;
    let access =
        call_ok(&admin, "vm_file_read", json!({"vm": again["service"]["vm"], "path": "/workspaces/repos/access.json"}))
            .await;
    let access: Value = serde_json::from_str(access["content"].as_str().unwrap()).unwrap();
    assert!(access["users"].get(&a1_id).is_none(), "{access}");
    assert_eq!(access["repos"]["app"], "alice", "{access}");
    let err = tool_error(&alice, "git_repo_delete", json!({"repo": "nosuch"})).await;
    assert!(err.contains("no git repository named `nosuch`"), "{err}");

    // The secret is nowhere moat writes: tool results, logs, consoles, audit records, database.
    let mut consoles = String::new();
    for vm in call_ok(&admin, "vm_list", json!({})).await["vms"].as_array().unwrap() {
        consoles += &call_ok(&admin, "vm_logs", json!({"vm": vm["id"], "tail": 5000})).await["text"].to_string();
    }
    let audit = call_ok(&admin, "audit_query", json!({"limit": 1000})).await;
    assert!(audit.to_string().contains("git_credential_set"), "the call itself is audited");
    for (what, text) in [
        ("tool results", results.iter().map(Value::to_string).collect::<Vec<_>>().join("\n")),
        ("console logs", consoles),
        ("audit records", audit.to_string()),
    ] {
        assert!(!text.contains(&secret), "the secret is in the {what}");
    }
    assert!(!moat.logged(&secret) && node.logged_times(&secret) == 0, "the secret is in a log");
    for file in ["moat.db", "moat.db-wal"] {
        let bytes = std::fs::read(home.state_dir().join(file)).unwrap_or_default();
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "the secret is in {file}");
    }

    // Everything goes: repositories with their service, then the network.
    call_ok(&alice, "git_repo_delete", json!({"repo": "app"})).await;
    call_ok(&bob, "vm_delete", json!({"vm": "b1"})).await;
    call_ok(&alice, "vm_delete", json!({"vm": "a2"})).await;
    call_ok(&admin, "git_service_delete", json!({"network": "dev", "delete_repositories": true})).await;
    assert_eq!(call_ok(&admin, "git_repo_list", json!({})).await["repos"], json!([]));
    assert_eq!(call_ok(&admin, "workspace_list", json!({})).await["workspaces"], json!([]));
    call_ok(&admin, "network_delete", json!({"network": "dev"})).await;
}

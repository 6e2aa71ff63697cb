//! End to end through the guest agent: processes and files inside a real QEMU
//! guest, driven through the gateway and a separately started `moat-node` over
//! mutual TLS, as named steps on one rig: boot and readiness, a kernel that
//! cannot boot, streamed output, a 10 MiB binary round trip, kept sessions,
//! exit codes and signals, bad input and other owners, background processes
//! outliving their client, cancellation, an agent restart, agents in vm_list,
//! a stalled agent, contents kept out of the audit log, and idle sessions
//! closing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code spawns binaries

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use common::node::Node;
use common::{Home, HttpMoat, call, call_ok, tool_error};
use moat_node::testing::{guest_image, images_with_base, until};
use rmcp::service::RunningService;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};
use sha2::Digest;

type Client = RunningService<RoleClient, ()>;

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

struct Rig {
    /// First, so it drops first: its reaper finds the VMs' directories before `tmp` goes.
    n1: Node,
    home: Home,
    tmp: tempfile::TempDir,
    images: PathBuf,
    moat: HttpMoat,
    alice_key: String,
    alice: RunningService<RoleClient, Progress>,
    progress: Progress,
    bob: Client,
    admin: Client,
    /// The id of alice's VM `box`.
    vm: String,
    /// The 10 MiB file's content as sent, base64.
    content: String,
}

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

impl Rig {
    async fn start() -> Rig {
        let home = Home::new();
        let tmp = tempfile::tempdir().unwrap();
        home.run(&["pki", "init"]).await;
        let images = images_with_base(tmp.path());
        let n1 =
            Node::enroll_and_start(&home, tmp.path(), "n1", &["--images", images.to_str().unwrap(), "--accel", "tcg"])
                .await;
        let moat = home.http_server(&[]).await;
        let alice_key = home.key("alice", "agent").await;
        let (alice, progress) = progress_client(&moat.url, &alice_key).await;
        let bob = moat.client(&home.key("bob", "agent").await).await;
        let admin = moat.client(&moat.key).await;
        Rig {
            home,
            tmp,
            images,
            n1,
            moat,
            alice_key,
            alice,
            progress,
            bob,
            admin,
            vm: String::new(),
            content: String::new(),
        }
    }

    /// A stopped VM refuses guest calls; started, its agent becomes ready. Boot doubles under a
    /// parallel build (VM-TESTING.md): the same bound as `wait_ready`, and on failure what the
    /// node knows about the agent and what the console says.
    async fn boot_box(&mut self) {
        let args = json!({"name": "box", "vcpus": 1, "memory_mib": 256, "start": false});
        let stopped = guest_ok(&self.alice, "vm_create", args).await;
        self.vm = stopped["vm"]["id"].as_str().unwrap().to_string();
        let not_running = tool_error(&self.admin, "vm_exec", json!({"vm": self.vm, "argv": ["true"]})).await;
        assert!(not_running.contains("is stopped; start it first"), "{not_running}");
        guest_ok(&self.alice, "vm_start", json!({"vm": "box"})).await;
        let started = Instant::now();
        loop {
            let inspect = guest_ok(&self.alice, "vm_inspect", json!({"vm": "box"})).await;
            if inspect["vm"]["agent"]["ready"] == true {
                break;
            }
            if started.elapsed() > Duration::from_secs(120) {
                let logs = call_ok(&self.admin, "vm_logs", json!({"vm": self.vm})).await;
                let dir = self.tmp.path().join("n1/vms").join(&self.vm);
                let daemon = std::fs::read_to_string(dir.join("vsock.log")).unwrap_or_default();
                panic!(
                    "the agent did not answer within 120 s: {inspect}\n--- console ---\n{}\n--- vsock.log ---\n{daemon}",
                    logs["text"]
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// An image whose kernel cannot boot: wait_ready says so, with the console.
    async fn a_kernel_that_cannot_boot(&self) {
        let broken = self.images.join("broken");
        std::fs::create_dir_all(&broken).unwrap();
        let vmlinux = guest_image().canonicalize().unwrap().join("vmlinux");
        std::os::unix::fs::symlink(vmlinux, broken.join("vmlinux")).unwrap();
        std::fs::write(broken.join("initramfs.cpio.gz"), b"not an initramfs").unwrap();
        let args = json!({"name": "never", "vcpus": 1, "memory_mib": 128, "image": "broken", "wait_ready": true});
        let never = tool_error(&self.admin, "vm_create", args).await;
        assert!(never.starts_with("agent on vm never not ready") && never.contains("Kernel panic"), "{never}");
    }

    /// Streamed output reaches the MCP client as progress while the command runs.
    async fn output_streams_as_progress(&self) {
        let args = json!({"vm": "box", "command": "uname -a; sleep 0.2; echo done"});
        let uname = guest_ok(&self.alice, "vm_exec", args).await;
        assert_eq!(uname["exit_code"], 0, "{uname}");
        assert!(uname["stdout"].as_str().unwrap().starts_with("Linux"), "{uname}");
        let seen = self.progress.0.lock().unwrap().clone();
        assert!(seen.iter().any(|m| m.starts_with("stdout: Linux")), "progress forwarded: {seen:?}");
    }

    /// A 10 MiB binary file in and out, same SHA-256, and the guest sees the same bytes.
    async fn a_binary_file_round_trip(&mut self) {
        let bytes: Vec<u8> = (0..10 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let want = sha256_hex(&bytes);
        self.content = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let args = json!({"vm": "box", "path": "/root/blob.bin", "content": self.content, "encoding": "base64",
                          "create_dirs": true});
        let written = guest_ok(&self.alice, "vm_file_write", args).await;
        assert_eq!(written["sha256"], want.as_str());
        let read = guest_ok(&self.alice, "vm_file_read", json!({"vm": "box", "path": "/root/blob.bin"})).await;
        let back = base64::engine::general_purpose::STANDARD.decode(read["content"].as_str().unwrap()).unwrap();
        assert_eq!(sha256_hex(&back), want);
        let sum = guest_ok(&self.alice, "vm_exec", json!({"vm": "box", "argv": ["sha256sum", "/root/blob.bin"]})).await;
        assert!(sum["stdout"].as_str().unwrap().starts_with(&want), "the guest sees the same bytes: {sum}");
        let listed = guest_ok(&self.alice, "vm_file_list", json!({"vm": "box", "path": "/root"})).await;
        assert_eq!(listed["entries"][0]["size"], 10 * 1024 * 1024);
    }

    /// Short calls share the VM's kept session: no new tunnel per call.
    async fn short_calls_share_a_session(&self) {
        guest_ok(&self.alice, "vm_exec", json!({"vm": "box", "argv": ["true"]})).await;
        let opened = self.moat.logged_times("guest session opened");
        assert!(opened >= 1, "the session log line this step counts is there to count");
        for _ in 0..3 {
            guest_ok(&self.alice, "vm_exec", json!({"vm": "box", "argv": ["true"]})).await;
        }
        assert_eq!(self.moat.logged_times("guest session opened"), opened, "the kept session was reused");
    }

    /// Exit codes, signals and timeouts are reported as such.
    async fn exit_codes_signals_and_timeouts(&self) {
        let failed = guest_ok(&self.alice, "vm_exec", json!({"vm": "box", "command": "exit 3"})).await;
        assert_eq!((failed["exit_code"].as_i64(), failed["signal"].as_i64()), (Some(3), None));
        let killed = guest_ok(&self.alice, "vm_exec", json!({"vm": "box", "command": "kill -KILL $$"})).await;
        assert_eq!((killed["exit_code"].as_i64(), killed["signal"].as_i64()), (None, Some(9)));
        let args = json!({"vm": "box", "command": "sleep 30", "timeout_s": 1});
        let timed = guest_ok(&self.alice, "vm_exec", args).await;
        assert_eq!(timed["timed_out"], true, "{timed}");
    }

    /// stdin, env and cwd reach the process; a background process is killed with its group; a
    /// file is deleted; a write over the 32 MiB cap is refused by the guest and changes nothing.
    async fn the_rest_of_the_guest_tools(&self) {
        let args = json!({"vm": "box", "command": "cat; echo \" $GREETING $(pwd)\"", "stdin": "hello",
                          "env": {"GREETING": "from-env"}, "cwd": "/root"});
        let ran = guest_ok(&self.alice, "vm_exec", args).await;
        assert_eq!(ran["stdout"], "hello from-env /root\n", "{ran}");
        let started = guest_ok(&self.alice, "vm_exec_start", json!({"vm": "box", "command": "sleep 300"})).await;
        let id = started["id"].as_str().unwrap().to_string();
        let killed = guest_ok(&self.alice, "vm_exec_kill", json!({"vm": "box", "id": id})).await;
        assert_eq!(killed["id"], id.as_str());
        until("the killed process to end", Duration::from_secs(20), async || {
            let status = guest_ok(&self.alice, "vm_exec_status", json!({"vm": "box", "id": id})).await;
            status["running"] == false && status["signal"] == 9
        })
        .await;
        let args = json!({"vm": "box", "path": "/root/gone.txt", "content": "bye"});
        guest_ok(&self.alice, "vm_file_write", args).await;
        let deleted = guest_ok(&self.alice, "vm_file_delete", json!({"vm": "box", "path": "/root/gone.txt"})).await;
        assert_eq!(deleted["deleted"], true);
        let listed = guest_ok(&self.alice, "vm_file_list", json!({"vm": "box", "path": "/root"})).await;
        assert!(!listed.to_string().contains("gone.txt"), "{listed}");
        // Just over the cap: 32 MiB + 1 byte of base64-encoded data, under the HTTP body limit.
        let over = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 32 * 1024 * 1024 + 1]);
        let args = json!({"vm": "box", "path": "/root/big.bin", "content": over, "encoding": "base64"});
        let refused = tool_error(&self.alice, "vm_file_write", args).await;
        assert!(refused.contains("over the 33554432-byte cap"), "{refused}");
        let listed = guest_ok(&self.alice, "vm_file_list", json!({"vm": "box", "path": "/root"})).await;
        assert!(!listed.to_string().contains("big.bin"), "nothing was written: {listed}");
    }

    /// Bad input changes nothing, and bob cannot reach alice's VM at all.
    async fn bad_input_and_other_owners(&self) {
        let args = json!({"vm": self.vm, "path": "x", "content": "y"});
        let relative = tool_error(&self.admin, "vm_file_write", args).await;
        assert!(relative.contains("relative"), "{relative}");
        let unknown = tool_error(&self.admin, "vm_exec_status", json!({"vm": self.vm, "id": "x999"})).await;
        assert!(unknown.contains("no background process"), "{unknown}");
        let bobs = tool_error(&self.bob, "vm_exec", json!({"vm": "box", "argv": ["id"]})).await;
        assert!(bobs.starts_with("no vm named `box`"), "{bobs}");
    }

    /// At most `max_concurrent` (16 for agents, policies/limits.toml) of one principal's calls run
    /// at once: of 17 concurrent two-second execs exactly one is refused, whichever comes last,
    /// and once they finish the slots are free again.
    async fn the_in_flight_cap_holds(&self) {
        tokio::time::sleep(Duration::from_secs(2)).await; // a full exec token bucket: only the cap can refuse
        let calls = (0..17).map(|_| call(&self.alice, "vm_exec", json!({"vm": "box", "argv": ["sleep", "2"]})));
        let results = futures::future::join_all(calls).await;
        let mut refused = Vec::new();
        let mut ran = 0;
        for result in results {
            match result {
                Ok(r) if r.is_error != Some(true) => ran += 1,
                Ok(r) => refused.push(format!("{:?}", r.content)),
                Err(rmcp::ServiceError::McpError(e)) => refused.push(e.message.to_string()),
                Err(other) => panic!("{other}"),
            }
        }
        assert_eq!((ran, refused.len()), (16, 1), "{refused:?}");
        assert!(refused[0].contains("too many calls in flight: alice may have 16 at once"), "{refused:?}");
        guest_ok(&self.alice, "vm_exec", json!({"vm": "box", "argv": ["true"]})).await;
    }

    /// Quotas hold under concurrency through the real parts: alice's `box` holds 256 MiB of her
    /// 16,384 MiB; two 8,100 MiB VMs asked for at once fit one at a time, so exactly one is made
    /// and the other is refused by the quota, whichever comes second.
    async fn concurrent_creates_at_the_quota(&self) {
        let args = |name: &str| json!({"name": name, "vcpus": 1, "memory_mib": 8100, "start": false});
        let (one, two) =
            tokio::join!(call(&self.alice, "vm_create", args("q1")), call(&self.alice, "vm_create", args("q2")));
        let mut made = Vec::new();
        let mut refused = Vec::new();
        for result in [one.unwrap(), two.unwrap()] {
            if result.is_error == Some(true) {
                refused.push(format!("{:?}", result.content));
            } else {
                made.push(result.structured_content.unwrap()["vm"]["name"].as_str().unwrap().to_string());
            }
        }
        assert_eq!((made.len(), refused.len()), (1, 1), "made {made:?}, refused {refused:?}");
        assert!(refused[0].contains("quota: memory (MiB) would be 16456 of your 16384 (role agent)"), "{refused:?}");
        guest_ok(&self.alice, "vm_delete", json!({"vm": made[0]})).await;
    }

    /// A background process outlives the client that started it.
    async fn a_background_process_outlives_its_client(&mut self) {
        let args = json!({"vm": "box", "command": "echo begun; sleep 1; echo done"});
        let started = guest_ok(&self.alice, "vm_exec_start", args).await;
        let id = started["id"].as_str().unwrap().to_string();
        let (alice, progress) = progress_client(&self.moat.url, &self.alice_key).await;
        let gone = std::mem::replace(&mut self.alice, alice);
        self.progress = progress;
        gone.cancel().await.unwrap();
        until("the background process to finish", Duration::from_secs(30), async || {
            guest_ok(&self.alice, "vm_exec_status", json!({"vm": "box", "id": id})).await["running"] == false
        })
        .await;
        let output = guest_ok(&self.alice, "vm_exec_output", json!({"vm": "box", "id": id})).await;
        assert_eq!(output["stdout"], "begun\ndone\n");
    }

    /// Cancelling the call kills the process group in the guest.
    async fn cancelling_kills_the_process_group(&self) {
        let args = json!({"vm": "box", "command": "sleep 300 & echo $! > /root/sleeper; wait"});
        let request = rmcp::model::ClientRequest::CallToolRequest(rmcp::model::CallToolRequest::new(
            rmcp::model::CallToolRequestParams::new("vm_exec").with_arguments(args.as_object().unwrap().clone()),
        ));
        let mut options = rmcp::service::PeerRequestOptions::no_options();
        options.timeout = Some(Duration::from_secs(3));
        let handle = self.alice.peer().send_cancellable_request(request, options).await.unwrap();
        assert!(handle.await_response().await.is_err(), "timed out and cancelled");
        until("the cancelled process to be gone", Duration::from_secs(20), async || {
            let args = json!({"vm": "box", "command": "kill -0 $(cat /root/sleeper)"});
            guest_ok(&self.alice, "vm_exec", args).await["exit_code"] != 0
        })
        .await;
    }

    /// The agent killed inside the guest comes back (init restarts it) and is reached again.
    async fn a_killed_agent_comes_back(&self) {
        let args = json!({"vm": "box", "command": "sleep 0.3; kill -9 $(pidof moat-guest)"});
        guest_ok(&self.alice, "vm_exec_start", args).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        let after = guest_ok(&self.alice, "vm_exec", json!({"vm": "box", "argv": ["echo", "back"]})).await;
        assert_eq!(after["stdout"], "back\n");
        let logs = call_ok(&self.admin, "vm_logs", json!({"vm": self.vm})).await;
        assert!(logs["text"].as_str().unwrap().contains("moat-guest exited"), "init restarted the agent: {logs}");
        until("the node to log the agent lost and back", Duration::from_secs(30), async || {
            self.n1.logged_times("guest agent lost") > 0 && self.n1.logged_times("guest agent ready") >= 2
        })
        .await;
    }

    /// vm_list shows each VM's agent as of the node's last heartbeat (no last_seen); a VM that
    /// does not run has none.
    async fn vm_list_shows_agents(&self) {
        until("vm_list to show box's agent ready", Duration::from_secs(20), async || {
            let listed = guest_ok(&self.alice, "vm_list", json!({})).await;
            listed["vms"]
                .as_array()
                .unwrap()
                .iter()
                .any(|vm| vm["name"] == "box" && vm["agent"]["ready"] == true && vm["agent"]["last_seen"].is_null())
        })
        .await;
        let listed = call_ok(&self.admin, "vm_list", json!({})).await;
        let never = listed["vms"].as_array().unwrap().iter().find(|vm| vm["name"] == "never").unwrap();
        assert!(never["state"] != "running" && never["agent"].is_null(), "{never}");
    }

    /// An agent that stops answering (SIGSTOP: the guest kernel still accepts its connections).
    /// The kept session fails its ping and is replaced; the new connection stalls before
    /// `initialize` is answered, is dropped after its timeout and opened once more, and that one
    /// is answered when the agent continues. Timeline from the job's start: stopped at 0.3 s, the
    /// call at 2 s, ping given up at 4 s, first connection given up at 14 s, continued at 19 s.
    async fn a_stalled_agent_is_waited_out(&self) {
        let stall = "sleep 0.3; kill -STOP $(pidof moat-guest); sleep 18.7; kill -CONT $(pidof moat-guest)";
        guest_ok(&self.alice, "vm_exec_start", json!({"vm": "box", "command": stall})).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let resumed = guest_ok(&self.alice, "vm_exec", json!({"vm": "box", "argv": ["echo", "resumed"]})).await;
        assert_eq!(resumed["stdout"], "resumed\n");
        assert!(self.moat.logged("the kept guest session is replaced: no answer to a ping within 2s"));
        assert!(self.moat.logged("agent on vm box did not answer within 10s; trying a new connection"));
    }

    /// Contents never reach the audit log: only their digest and shape.
    async fn contents_are_not_audited(&self) {
        let audit = call_ok(&self.admin, "audit_query", json!({"tool": "vm_file_write", "principal": "alice"})).await;
        assert!(!audit["records"].as_array().unwrap().is_empty());
        assert!(!audit.to_string().contains(&self.content[..64]), "file contents are not audited");
    }

    /// A kept session closes once idle, so the agent frees what it held.
    async fn an_idle_session_closes(&self) {
        until("the idle guest session to close", moat_gateway::guest::IDLE * 2, async || {
            self.moat.logged("guest session closed")
        })
        .await;
    }

    /// A guest that ignores the power button (its init's watcher killed) is killed once the stop's
    /// timeout passes, and the reason says so.
    async fn a_stop_the_guest_ignores_escalates_to_a_kill(&self) {
        let gone = guest_ok(&self.alice, "vm_exec", json!({"vm": "box", "command": "kill $(pidof head)"})).await;
        assert_eq!(gone["exit_code"], 0, "the init's power-button watcher is `head -c 1`: {gone}");
        let started = Instant::now();
        let stopped = guest_ok(&self.alice, "vm_stop", json!({"vm": "box", "timeout_s": 3})).await;
        assert_eq!(stopped["vm"]["state"], "stopped", "{stopped}");
        let reason = stopped["vm"]["reason"].as_str().unwrap();
        assert!(reason.contains("killed after the guest ignored power-off for 3 s"), "{reason}");
        assert!(started.elapsed() >= Duration::from_secs(3), "the guest had its time first");
    }

    async fn finish(mut self) {
        for client in [self.bob, self.admin] {
            client.cancel().await.unwrap();
        }
        self.alice.cancel().await.unwrap();
        assert!(self.moat.terminate().await.success());
        drop(self.home);
    }
}

#[tokio::test]
async fn guest_exec_and_files_through_the_gateway() {
    let mut rig = Rig::start().await;
    rig.boot_box().await;
    rig.a_kernel_that_cannot_boot().await;
    rig.output_streams_as_progress().await;
    rig.a_binary_file_round_trip().await;
    rig.short_calls_share_a_session().await;
    rig.exit_codes_signals_and_timeouts().await;
    rig.the_rest_of_the_guest_tools().await;
    rig.bad_input_and_other_owners().await;
    rig.the_in_flight_cap_holds().await;
    rig.concurrent_creates_at_the_quota().await;
    rig.a_background_process_outlives_its_client().await;
    rig.cancelling_kills_the_process_group().await;
    rig.a_killed_agent_comes_back().await;
    rig.vm_list_shows_agents().await;
    rig.a_stalled_agent_is_waited_out().await;
    rig.contents_are_not_audited().await;
    rig.an_idle_session_closes().await;
    rig.a_stop_the_guest_ignores_escalates_to_a_kill().await;
    rig.finish().await;
}

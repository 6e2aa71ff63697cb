//! Portal agents end to end in QEMU guests, through a `moat-node` over mutual
//! TLS: alice's agent (a portal and a work VM) is made with `agent_create`; an
//! MCP client inside the portal (a scripted JSON-RPC exchange through
//! `moat-guest mcp`, the endpoint any local client spawns, on the busybox image:
//! it can send what no real client would) lists moat's tools, runs `vm_exec` on
//! its work VM, and is refused on alice's other VM and on bob's; forged identity
//! claims change nothing; the audit log shows `vm:<id>` acting for alice; a VM
//! that is no portal cannot open a session; garbage and oversized messages are
//! answered as on stdio; a gateway restart ends a session with an error for what
//! was pending, and the client reconnects; deleting the agent ends its session
//! and both VMs. Last, OpenClaw itself: `openclaw mcp probe` inside a portal
//! booted from the portal image (Debian, Node 24, OpenClaw from npm) lists the
//! tools the portal may call; it takes about two minutes under TCG.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code spawns binaries

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::node::Node;
use common::{Home, HttpMoat, call_ok, tool_error, wait_for_field};
use moat_node::testing::{images_with_base, until};
use rmcp::RoleClient;
use rmcp::service::RunningService;
use serde_json::{Value, json};

type Client = RunningService<RoleClient, ()>;

/// The gateway's message cap in this test: small, so an oversized message is cheap to make.
const MAX_BODY: usize = 65536;
/// The model key alice gives her agent: it must reach the portal's OpenClaw `.env` and nothing else.
const MODEL_KEY: &str = "sk-ant-portal-test-4f1d2c9b7e";

fn line(message: Value) -> String {
    format!("{message}\n")
}

fn initialize(id: i64) -> String {
    // The client names itself like a VM and claims a principal: neither may matter.
    line(json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "vm:forged", "version": "1"},
        "_meta": {"principal": "alice", "role": "cluster-admin"}}}))
        + &line(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
}

fn tool_call(id: i64, name: &str, arguments: Value) -> String {
    line(json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                "params": {"name": name, "arguments": arguments, "_meta": {"principal": "alice"}}}))
}

/// The JSON-RPC answers `moat-guest mcp` printed, by id (null-id answers under "null").
fn answers(stdout: &str) -> std::collections::BTreeMap<String, Value> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON-RPC: {l}: {e}")))
        .map(|m| (m["id"].to_string(), m))
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn text_of(answer: &Value) -> String {
    answer["result"]["content"][0]["text"].as_str().unwrap_or_default().to_string()
}

struct Rig {
    /// First, so it drops first: its reaper finds the VMs' directories before `tmp` goes.
    _n1: Node,
    home: Home,
    _tmp: tempfile::TempDir,
    moat: HttpMoat,
    alice_key: String,
    alice: Client,
    bob: Client,
    admin: Client,
    portal: String,
    work: String,
    bobs: String,
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
        let moat = home.http_server(&["--max-body-bytes", &MAX_BODY.to_string()]).await;
        let alice_key = home.key("alice", "agent").await;
        let alice = moat.client(&alice_key).await;
        let bob = moat.client(&home.key("bob", "agent").await).await;
        let admin = moat.client(&moat.key).await;
        Rig {
            _n1: n1,
            home,
            _tmp: tmp,
            moat,
            alice_key,
            alice,
            bob,
            admin,
            portal: String::new(),
            work: String::new(),
            bobs: String::new(),
        }
    }

    /// Runs `script` (a shell command line) in VM `vm` as alice and returns its stdout.
    async fn sh(&self, vm: &str, script: &str, stdin: &str) -> (i64, String, String) {
        let mut args = json!({"vm": vm, "command": script, "timeout_s": 120});
        if !stdin.is_empty() {
            args["stdin"] = json!(stdin);
        }
        let out = call_ok(&self.alice, "vm_exec", args).await;
        let text = |k: &str| out[k].as_str().unwrap_or_default().to_string();
        (out["exit_code"].as_i64().unwrap_or(-1), text("stdout"), text("stderr"))
    }

    /// alice's agent `coder` on n1, her unpaired VM `other`, and bob's VM `bobs`.
    async fn make_agent(&mut self) {
        // Workspaces: `notes` is given to the work VM (so the portal may act on it), `mine` is not.
        call_ok(&self.admin, "image_import", json!({"name": "debian", "source": common::debian_image(), "node": "n1"}))
            .await;
        for name in ["notes", "mine"] {
            call_ok(&self.alice, "workspace_create", json!({"name": name, "image": "debian", "node": "n1"})).await;
        }
        let member = json!({"node": "n1", "memory_mib": 256});
        let work = json!({"node": "n1", "memory_mib": 256, "data_workspaces": [{"name": "notes", "read_only": true}]});
        let args = json!({"name": "coder", "portal": member, "work": work, "model_api_key": MODEL_KEY});
        let made = call_ok(&self.alice, "agent_create", args).await;
        assert_eq!(made["model_key"], "/root/.openclaw/.env (ANTHROPIC_API_KEY)", "{made}");
        assert!(!made.to_string().contains(MODEL_KEY), "the answer never carries the key: {made}");
        let agent = &made["agent"];
        self.portal = agent["portal"]["id"].as_str().unwrap().to_string();
        self.work = agent["work"]["id"].as_str().unwrap().to_string();
        assert_eq!(agent["principal"], format!("vm:{}", self.portal));
        assert_eq!((agent["owner"].as_str(), agent["role"].as_str()), (Some("alice"), Some("agent")));
        assert_eq!(
            (agent["portal"]["state"].as_str(), agent["work"]["state"].as_str()),
            (Some("running"), Some("running"))
        );
        assert_eq!(made["mcp_server"], json!({"command": "moat-guest", "args": ["mcp"]}));

        let ready = json!({"vcpus": 1, "memory_mib": 128, "node": "n1", "wait_ready": true});
        let mut other = ready.clone();
        other["name"] = json!("other");
        call_ok(&self.alice, "vm_create", other).await;
        let mut bobs = ready;
        bobs["name"] = json!("bobs");
        self.bobs = call_ok(&self.bob, "vm_create", bobs).await["vm"]["id"].as_str().unwrap().to_string();
        let args = json!({"vm": "coder-work", "path": "/root/marker", "content": "work-marker"});
        call_ok(&self.alice, "vm_file_write", args).await;
        // Checked by its digest, so the key travels in no answer (and so in no log) here either.
        let (_, env, _) =
            self.sh("coder-portal", "stat -c %a /root/.openclaw/.env; sha256sum < /root/.openclaw/.env", "").await;
        let want = sha256_hex(format!("ANTHROPIC_API_KEY={MODEL_KEY}\n").as_bytes());
        assert_eq!(env, format!("600\n{want}  -\n"), "the key is in the portal, 0600");
        let (_, work_env, _) = self.sh("coder-work", "cat /root/.openclaw/.env 2>&1", "").await;
        assert!(!work_env.contains(MODEL_KEY), "only the portal gets the key: {work_env}");

        // Bad input changes nothing: a role above alice's, a name she already has.
        let no_wait = json!({"name": "late", "portal": {}, "work": {}, "model_api_key": "k", "wait_ready": false});
        let no_wait = tool_error(&self.alice, "agent_create", no_wait).await;
        assert!(no_wait.contains("needs wait_ready"), "{no_wait}");
        let above = tool_error(
            &self.alice,
            "agent_create",
            json!({"name": "boss", "portal": {}, "work": {}, "role": "vm-admin"}),
        )
        .await;
        assert!(above.contains("above your own (agent)"), "{above}");
        let again = tool_error(&self.alice, "agent_create", json!({"name": "coder", "portal": {}, "work": {}})).await;
        assert!(again.contains("already have an agent named `coder`"), "{again}");
        let listed = call_ok(&self.alice, "agent_list", json!({})).await;
        assert_eq!(listed["agents"].as_array().unwrap().len(), 1, "{listed}");
        assert_eq!(call_ok(&self.bob, "agent_list", json!({})).await["agents"], json!([]), "bob sees none");
        let member_delete = tool_error(&self.alice, "vm_delete", json!({"vm": "coder-work"})).await;
        assert!(member_delete.contains("agent_delete removes the agent"), "{member_delete}");
    }

    /// The portal's client: tools, whoami, its work VM, refusals elsewhere, bad messages.
    async fn the_portal_acts_on_its_pair_only(&self) {
        let mut script = initialize(0);
        script += &line(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}));
        script += &tool_call(2, "whoami", json!({}));
        script += &tool_call(3, "vm_exec", json!({"vm": "coder-work", "argv": ["cat", "/root/marker"]}));
        script += &tool_call(4, "vm_exec", json!({"vm": "other", "argv": ["true"]}));
        script += &tool_call(5, "vm_exec", json!({"vm": self.bobs, "argv": ["true"]}));
        script += &tool_call(6, "vm_list", json!({}));
        script += &tool_call(7, "vm_create", json!({"name": "extra", "vcpus": 1, "memory_mib": 128}));
        script += &tool_call(8, "vm_exec", json!({"vm": self.portal, "argv": ["true"]}));
        script += &tool_call(10, "workspace_inspect", json!({"workspace": "notes"}));
        script += &tool_call(11, "workspace_fork", json!({"workspace": "notes", "name": "notes-copy"}));
        script += &tool_call(12, "workspace_inspect", json!({"workspace": "mine"}));
        script += "this is not json\n";
        // The oversized request is made in the guest: alice's own call must stay under the cap.
        let oversized = format!(
            r#"printf '%s' '{{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{{"name":"whoami","arguments":{{"pad":"'; head -c {} /dev/zero | tr '\0' a; printf '"}}}}}}\n'"#,
            MAX_BODY + 10
        );
        let command = format!("cat > /tmp/script; {{ cat /tmp/script; {oversized}; }} | moat-guest mcp");
        let (code, stdout, stderr) = self.sh(&self.portal, &command, &script).await;
        assert_eq!(code, 0, "moat-guest mcp: {stderr}\n{stdout}");
        let a = answers(&stdout);

        assert!(a["0"]["result"]["serverInfo"]["name"] == "moat", "{}", a["0"]);
        let tools: Vec<&str> =
            a["1"]["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
        for tool in ["whoami", "vm_exec", "vm_list", "vm_file_read", "workspace_list"] {
            assert!(tools.contains(&tool), "the portal lists {tool}: {tools:?}");
        }
        for tool in ["audit_query", "image_import", "network_create", "agent_create"] {
            assert!(!tools.contains(&tool), "the portal (role agent, pair only) does not list {tool}: {tools:?}");
        }
        let me = &a["2"]["result"]["structuredContent"];
        assert_eq!(me["principal"], format!("vm:{}", self.portal), "identity from the vsock device: {me}");
        assert_eq!((me["acting_for"].as_str(), me["role"].as_str()), (Some("alice"), Some("agent")), "{me}");
        assert_eq!(me["transport"], "vsock");

        let exec = &a["3"]["result"]["structuredContent"];
        assert_eq!((exec["exit_code"].as_i64(), exec["stdout"].as_str()), (Some(0), Some("work-marker")), "{}", a["3"]);
        for (id, named) in [("4", "other".to_string()), ("5", self.bobs.clone()), ("8", self.portal.clone())] {
            assert_eq!(a[id]["result"]["isError"], true, "{}", a[id]);
            assert_eq!(text_of(&a[id]), format!("no vm named `{named}`; vm_list shows your VMs"), "as if missing");
        }
        let listed = &a["6"]["result"]["structuredContent"]["vms"];
        let names: Vec<&str> = listed.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["coder-work"], "the portal sees its work VM only");
        assert_eq!(a["7"]["result"]["isError"], true, "a portal makes no VMs: {}", a["7"]);
        assert!(text_of(&a["7"]).contains("cannot call vm_create"), "{}", a["7"]);
        let vms = call_ok(&self.admin, "vm_list", json!({})).await;
        assert!(!vms.to_string().contains("\"extra\""), "nothing was made: {vms}");

        // Its work VM's workspace is the portal's to use; what it makes from it is alice's.
        assert_eq!(a["10"]["result"]["structuredContent"]["workspace"]["name"], "notes", "{}", a["10"]);
        let fork = &a["11"]["result"]["structuredContent"]["workspace"];
        assert_eq!((fork["name"].as_str(), fork["owner"].as_str()), (Some("notes-copy"), Some("alice")), "{}", a["11"]);
        assert_eq!(a["12"]["result"]["isError"], true, "{}", a["12"]);
        assert_eq!(text_of(&a["12"]), "no workspace named `mine`; workspace_list shows your workspaces");
        let listed = call_ok(&self.alice, "workspace_list", json!({})).await.to_string();
        assert!(listed.contains("\"notes-copy\""), "alice owns the portal's fork: {listed}");

        assert_eq!(a["null"]["error"]["code"], -32700, "garbage is a parse error: {}", a["null"]);
        let big = &a["9"]["error"];
        assert!(big["message"].as_str().unwrap().contains(&format!("{MAX_BODY} byte limit")), "{big}");
    }

    /// Every call is audited as the portal, for alice, over vsock; refusals as denied.
    async fn the_audit_log_names_the_vm_and_its_owner(&self) {
        let records = call_ok(&self.admin, "audit_query", json!({"principal": "alice", "limit": 200})).await;
        let portal = format!("vm:{}", self.portal);
        let ours: Vec<&Value> =
            records["records"].as_array().unwrap().iter().filter(|r| r["principal"] == portal.as_str()).collect();
        assert!(ours.iter().all(|r| r["acting_for"] == "alice" && r["transport"] == "vsock"), "{ours:?}");
        let decision = |tool: &str, resource: &str| {
            ours.iter()
                .find(|r| r["tool"] == tool && r["resource"].as_str().is_some_and(|x| x.contains(resource)))
                .map(|r| r["decision"].as_str().unwrap().to_string())
        };
        assert_eq!(decision("vm_exec", &self.work).as_deref(), Some("allowed"));
        assert_eq!(decision("vm_exec", &self.bobs).as_deref(), Some("denied"));
        assert_eq!(decision("whoami", "cluster").as_deref(), Some("allowed"));

        // The model key given at agent_create is in no audit record and no log line.
        let everything = call_ok(&self.admin, "audit_query", json!({"limit": 1000})).await.to_string();
        assert!(everything.contains("agent_create"), "agent_create is audited");
        assert!(!everything.contains(MODEL_KEY), "the audit log never holds the model key");
        assert_eq!(self.moat.logged_times(MODEL_KEY), 0, "moat's log never holds the model key");
    }

    /// A VM made by vm_create is no portal: its `moat-guest mcp` is told so and closed.
    async fn a_vm_that_is_no_portal_cannot_open_a_session(&self) {
        let (code, stdout, stderr) = self.sh("other", "moat-guest mcp", &initialize(0)).await;
        assert_eq!(code, 1, "{stdout}{stderr}");
        let a = answers(&stdout);
        let refused = a["0"]["error"]["message"].as_str().unwrap_or_default();
        assert!(refused.contains("was not created as a portal"), "{stdout}");
        let records = call_ok(&self.admin, "audit_query", json!({"tool": "session", "decision": "denied"})).await;
        assert!(records.to_string().contains("vm:"), "the refusal is audited: {records}");
    }

    /// A session open while the gateway restarts: what was pending gets an error that says to
    /// reconnect, and a new `moat-guest mcp` works once the gateway is back.
    async fn a_gateway_restart_ends_the_session_and_the_client_reconnects(&mut self) {
        let script = initialize(0) + &tool_call(1, "vm_exec", json!({"vm": "coder-work", "command": "sleep 120"}));
        // The exit status is written by the right side of the pipe: the shell would wait for the
        // `sleep` on the left before running anything after the pipeline.
        let command = "cat > /tmp/s1; (cat /tmp/s1; sleep 300) | \
                       (moat-guest mcp > /tmp/s1.out 2> /tmp/s1.err; echo exit=$? >> /tmp/s1.out)";
        let opened = self.moat.logged_times("portal session opened");
        let args = json!({"vm": "coder-portal", "command": command, "stdin": script});
        call_ok(&self.alice, "vm_exec_start", args).await;
        until("the session to open", Duration::from_secs(60), async || {
            self.moat.logged_times("portal session opened") > opened
        })
        .await;
        until("the exec to start in the work VM", Duration::from_secs(60), async || {
            let (_, ps, _) = self.sh("coder-work", "ps", "").await;
            ps.contains("sleep 120")
        })
        .await;

        self.moat.terminate().await;
        let mut cmd = self.home.moat(&["serve", "--http", "127.0.0.1:0", "--max-body-bytes", &MAX_BODY.to_string()]);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let (url, log) = wait_for_field(&mut child, "moat listening", "url=").await;
        self.moat = HttpMoat { child, url, log, key: self.moat.key.clone() };
        self.alice = self.moat.client(&self.alice_key).await;
        self.admin = self.moat.client(&self.moat.key).await;
        let read = async |this: &Rig| {
            let args = json!({"vm": this.portal, "path": "/tmp/s1.out"});
            let out = common::call(&this.admin, "vm_file_read", args).await;
            out.ok().and_then(|r| r.structured_content).and_then(|c| c["content"].as_str().map(String::from))
        };
        let told = tokio::time::timeout(Duration::from_secs(60), async {
            while !read(self).await.is_some_and(|out| out.contains("exit=")) {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
        .await;
        if told.is_err() {
            let args = json!({"vm": self.portal, "command": "ps; cat /tmp/s1.out /tmp/s1.err"});
            let seen = call_ok(&self.admin, "vm_exec", args).await;
            panic!("the client was not told its session ended within 60 s; in the portal: {}", seen["stdout"]);
        }
        let out = read(self).await.unwrap();
        let a = answers(out.split("exit=").next().unwrap());
        // The pending call is answered: by the gateway as it shuts down (SIGTERM), or by the
        // relay when moat went without a word (-32001). Either way it says to reconnect.
        let pending = &a["1"];
        let said = match pending["error"]["code"].as_i64() {
            Some(code) => {
                assert_eq!(code, -32001, "{out}");
                pending["error"]["message"].as_str().unwrap_or_default().to_string()
            }
            None => {
                assert_eq!(pending["result"]["isError"], true, "{out}");
                text_of(pending)
            }
        };
        assert!(said.contains("reconnect"), "the pending call says to reconnect: {out}");
        assert!(out.contains("exit=1"), "{out}");
        let err = call_ok(&self.admin, "vm_file_read", json!({"vm": self.portal, "path": "/tmp/s1.err"})).await;
        assert!(err["content"].as_str().unwrap().contains("start `moat-guest mcp` again to reconnect"), "{err}");

        // Reconnecting: the gateway is listening on the node again within seconds.
        let script = initialize(0) + &tool_call(1, "whoami", json!({}));
        let mut last = String::new();
        for _ in 0..20 {
            let args = json!({"vm": self.portal, "command": "moat-guest mcp", "stdin": script, "timeout_s": 60});
            let out = call_ok(&self.admin, "vm_exec", args).await;
            last = out.to_string();
            let a = answers(out["stdout"].as_str().unwrap_or_default());
            if a.get("1").is_some_and(|w| w["result"]["structuredContent"]["transport"] == "vsock") {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        panic!("the portal did not reconnect: {last}");
    }

    /// agent_delete with a session open: the session ends, both VMs and the agent go.
    async fn deleting_the_agent_ends_its_session(&self) {
        let script = initialize(0);
        let command = "cat > /tmp/s2; (cat /tmp/s2; sleep 300) | moat-guest mcp";
        let opened = self.moat.logged_times("portal session opened");
        let args = json!({"vm": self.portal, "command": command, "stdin": script});
        call_ok(&self.admin, "vm_exec_start", args).await;
        until("the session to open", Duration::from_secs(60), async || {
            self.moat.logged_times("portal session opened") > opened
        })
        .await;
        let ended = self.moat.logged_times("portal session ended");
        let deleted = call_ok(&self.admin, "agent_delete", json!({"agent": "coder"})).await;
        assert_eq!(deleted["vms"], json!([self.work, self.portal]), "{deleted}");
        until("the session to end", Duration::from_secs(30), async || {
            self.moat.logged_times("portal session ended") > ended
        })
        .await;
        assert_eq!(call_ok(&self.admin, "agent_list", json!({})).await["agents"], json!([]));
        let vms = call_ok(&self.admin, "vm_list", json!({})).await.to_string();
        assert!(!vms.contains(&self.portal) && !vms.contains(&self.work), "nothing orphaned: {vms}");
        let gone = tool_error(&self.admin, "agent_inspect", json!({"agent": "coder"})).await;
        assert!(gone.contains("no agent named `coder`"), "{gone}");
    }
}

impl Rig {
    /// OpenClaw in a portal booted from the portal image: its own `mcp probe` reaches moat
    /// through `moat-guest mcp` (its config names it) and lists what the portal may call.
    async fn openclaw_in_a_portal_probes_moat(&self) {
        let image = common::portal_image();
        call_ok(&self.admin, "image_import", json!({"name": "portal", "source": image, "node": "n1"})).await;
        let args = json!({"name": "claw", "portal": {"image": "portal", "memory_mib": 1536, "node": "n1"},
                          "work": {"memory_mib": 128, "node": "n1"}});
        let made = call_ok(&self.alice, "agent_create", args).await;
        let args = json!({"vm": "claw-portal", "command": "openclaw mcp probe moat --json", "timeout_s": 900});
        let out = call_ok(&self.alice, "vm_exec", args).await;
        assert_eq!(out["exit_code"], 0, "openclaw mcp probe in the portal: {out}");
        let report: Value = serde_json::from_str(out["stdout"].as_str().unwrap()).unwrap();
        let server = &report["servers"]["moat"];
        assert_eq!(server["launch"], "moat-guest mcp", "{report}");
        let tools: Vec<&str> = report["tools"].as_array().unwrap().iter().filter_map(|t| t.as_str()).collect();
        for tool in ["moat__whoami", "moat__vm_exec", "moat__vm_list", "moat__agent_list"] {
            assert!(tools.contains(&tool), "OpenClaw lists {tool}: {tools:?}");
        }
        for tool in ["moat__audit_query", "moat__image_import", "moat__agent_create", "moat__network_create"] {
            assert!(!tools.contains(&tool), "OpenClaw does not list {tool}: {tools:?}");
        }
        // A probe lists and calls nothing, so there is no audit record: the gateway's log shows the
        // session it served as this portal.
        let portal = made["agent"]["portal"]["id"].as_str().unwrap();
        let served = self.moat.logged_times(&format!("portal session opened node=n1 vm={portal}"));
        assert!(served >= 1, "the probe's session was served as the portal");
        call_ok(&self.alice, "agent_delete", json!({"agent": "claw"})).await;
    }
}

#[tokio::test]
async fn portal_agents_end_to_end() {
    let mut rig = Rig::start().await;
    eprintln!("portal: make_agent");
    rig.make_agent().await;
    eprintln!("portal: the_portal_acts_on_its_pair_only");
    rig.the_portal_acts_on_its_pair_only().await;
    eprintln!("portal: the_audit_log_names_the_vm_and_its_owner");
    rig.the_audit_log_names_the_vm_and_its_owner().await;
    eprintln!("portal: a_vm_that_is_no_portal_cannot_open_a_session");
    rig.a_vm_that_is_no_portal_cannot_open_a_session().await;
    eprintln!("portal: a_gateway_restart_ends_the_session_and_the_client_reconnects");
    rig.a_gateway_restart_ends_the_session_and_the_client_reconnects().await;
    eprintln!("portal: deleting_the_agent_ends_its_session");
    rig.deleting_the_agent_ends_its_session().await;
    eprintln!("portal: openclaw_in_a_portal_probes_moat");
    rig.openclaw_in_a_portal_probes_moat().await;
}

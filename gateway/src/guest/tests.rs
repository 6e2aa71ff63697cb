//! The guest session pool against in-process fake agents (rmcp servers on
//! in-memory pipes behind a fake [`Dial`]): reuse, replacement of a dead
//! session, the stalled-handshake retry, racing first calls, and progress
//! from two callers streaming through one session at once.

use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

use rmcp::model::{CallToolResponse, CallToolResult, ErrorData, NumberOrString, ServerCapabilities, ServerConfig};
use rmcp::service::RequestContext;
use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::{ClientHandler, ServerHandler};
use serde_json::json;

use super::*;
use crate::store::vms::tests::row;

/// An agent whose `exec` reports five progress steps tagged with its `command`, then answers.
#[derive(Clone, Default)]
struct FakeAgent;

impl ServerHandler for FakeAgent {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let args = request.arguments.unwrap_or_default();
        let tag = args.get("command").and_then(|v| v.as_str()).unwrap_or_default().to_string();
        if let Some(token) = context.meta.get_progress_token() {
            for step in 0..5 {
                let mut note = ProgressNotificationParam::new(token.clone(), f64::from(step));
                note.message = Some(format!("{tag}-{step}"));
                let _ = context.peer.notify_progress(note).await;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }
        Ok(CallToolResponse::Complete(CallToolResult::structured(json!({"tag": tag}))))
    }
}

/// Dials fake agents; the first `stalls` dials get a pipe nobody answers.
#[derive(Default)]
struct FakeDial {
    stalls: usize,
    dials: AtomicUsize,
    held: Mutex<Vec<DuplexStream>>,
    agents: Mutex<Vec<CancellationToken>>,
}

impl FakeDial {
    fn stalling(stalls: usize) -> FakeDial {
        FakeDial { stalls, ..FakeDial::default() }
    }

    fn dials(&self) -> usize {
        self.dials.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops every agent dialled so far: their connections close.
    fn kill_agents(&self) {
        for agent in self.agents.lock().unwrap().drain(..) {
            agent.cancel();
        }
    }
}

impl Dial for FakeDial {
    fn dial<'a>(
        &'a self,
        _vm_id: &'a str,
        port: u32,
        _connect_timeout: Duration,
    ) -> futures::future::BoxFuture<'a, Result<DuplexStream, GuestError>> {
        Box::pin(async move {
            assert_eq!(port, MCP_PORT);
            let n = self.dials.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let (ours, theirs) = tokio::io::duplex(1 << 20);
            if n <= self.stalls {
                self.held.lock().unwrap().push(theirs);
                return Ok(ours);
            }
            let stop = CancellationToken::new();
            self.agents.lock().unwrap().push(stop.clone());
            tokio::spawn(async move {
                let (read, write) = tokio::io::split(theirs);
                if let Ok(running) = FakeAgent.serve_with_ct(AsyncRwTransport::new_server(read, write), stop).await {
                    let _ = running.waiting().await;
                }
            });
            Ok(ours)
        })
    }
}

/// An MCP client of moat, connected to a server half whose peer is what guest progress is sent
/// to: it records every progress message it receives.
#[derive(Clone, Default)]
struct Caller {
    seen: Arc<Mutex<Vec<String>>>,
}

impl ClientHandler for Caller {
    async fn on_progress(&self, params: ProgressNotificationParam, _context: NotificationContext<RoleClient>) {
        self.seen.lock().unwrap().push(params.message.unwrap_or_default());
    }
}

#[derive(Clone, Default)]
struct Moat;

impl ServerHandler for Moat {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

/// A connected caller: its progress route into moat, and what it has seen. Both halves are kept
/// alive by the returned services.
async fn caller(
    token: i64,
) -> (Progress, Caller, RunningService<RoleServer, Moat>, RunningService<RoleClient, Caller>) {
    let (a, b) = tokio::io::duplex(1 << 16);
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let listener = Caller::default();
    let (server, client) = tokio::join!(
        Moat.serve(AsyncRwTransport::new_server(ar, aw)),
        listener.clone().serve(AsyncRwTransport::new_client(br, bw))
    );
    let server = server.unwrap();
    let progress = Progress { peer: server.peer().clone(), token: ProgressToken(NumberOrString::Number(token)) };
    (progress, listener, server, client.unwrap())
}

fn running_vm() -> VmRow {
    let mut vm = row("vm-1", "dev", "alice", "n1", 1, 256);
    vm.state = VmState::Running;
    vm
}

async fn exec(
    sessions: &Sessions,
    dial: &FakeDial,
    tag: &str,
    progress: Option<Progress>,
) -> Result<Value, GuestError> {
    let args = json!({"command": tag});
    call(
        sessions,
        dial,
        &running_vm(),
        GuestTool::Exec,
        args,
        Duration::from_secs(5),
        progress,
        &CancellationToken::new(),
    )
    .await
}

#[tokio::test]
async fn a_kept_session_is_reused_and_a_file_transfer_opens_its_own() {
    let (sessions, dial) = (Sessions::default(), FakeDial::default());
    assert_eq!(exec(&sessions, &dial, "a", None).await.unwrap(), json!({"tag": "a"}));
    assert_eq!(exec(&sessions, &dial, "b", None).await.unwrap(), json!({"tag": "b"}));
    // Past the trusted window the kept session is pinged, answers, and is still reused.
    tokio::time::sleep(pool::TRUSTED + Duration::from_millis(50)).await;
    exec(&sessions, &dial, "c", None).await.unwrap();
    assert_eq!(dial.dials(), 1, "one session for three small calls");
    let vm = running_vm();
    let cancel = CancellationToken::new();
    let read = call(&sessions, &dial, &vm, GuestTool::FileRead, json!({}), Duration::from_secs(5), None, &cancel);
    read.await.unwrap();
    assert_eq!(dial.dials(), 2, "a file read opens a session of its own");
}

#[tokio::test]
async fn a_dead_session_is_replaced() {
    let (sessions, dial) = (Sessions::default(), FakeDial::default());
    exec(&sessions, &dial, "a", None).await.unwrap();
    dial.kill_agents();
    // The agent's side closes; the kept session sees its connection closed and is not trusted.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sessions.open.lock().unwrap().get("vm-1").unwrap().service.peer().is_transport_closed() {
        assert!(Instant::now() < deadline, "the killed agent's connection never closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(exec(&sessions, &dial, "b", None).await.unwrap(), json!({"tag": "b"}));
    assert_eq!(dial.dials(), 2);
}

#[tokio::test]
async fn a_stalled_handshake_is_retried_once_on_a_new_connection() {
    let (sessions, dial) = (Sessions::default(), FakeDial::stalling(1));
    assert_eq!(exec(&sessions, &dial, "a", None).await.unwrap(), json!({"tag": "a"}));
    assert_eq!(dial.dials(), 2, "the stalled connection, then a fresh one");

    let (sessions, dial) = (Sessions::default(), FakeDial::stalling(5));
    match exec(&sessions, &dial, "a", None).await {
        Err(GuestError::Agent(message)) => assert!(message.contains("did not answer"), "{message}"),
        other => panic!("two stalls must fail the call: {other:?}"),
    }
    assert_eq!(dial.dials(), 2, "no more than two attempts");
}

#[tokio::test]
async fn first_calls_racing_to_one_vm_open_one_session() {
    let (sessions, dial) = (Sessions::default(), FakeDial::default());
    let calls = (0..5).map(|i| exec(&sessions, &dial, if i % 2 == 0 { "x" } else { "y" }, None));
    for answer in futures::future::join_all(calls).await {
        answer.unwrap();
    }
    assert_eq!(dial.dials(), 1);
    assert!(sessions.opening.lock().unwrap().is_empty(), "no opener is kept once nobody calls");
}

#[tokio::test]
async fn two_callers_streaming_through_one_session_each_get_only_their_progress() {
    let (sessions, dial) = (Sessions::default(), FakeDial::default());
    let (to_a, seen_a, _sa, _ca) = caller(7).await;
    let (to_b, seen_b, _sb, _cb) = caller(7).await;
    let (a, b) = tokio::join!(exec(&sessions, &dial, "a", Some(to_a)), exec(&sessions, &dial, "b", Some(to_b)));
    assert_eq!((a.unwrap(), b.unwrap()), (json!({"tag": "a"}), json!({"tag": "b"})));
    assert_eq!(dial.dials(), 1, "both calls shared the VM's session");
    // Notifications travel on their own; give the last ones a moment to land.
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen_a.seen.lock().unwrap().len() < 5 || seen_b.seen.lock().unwrap().len() < 5 {
        assert!(Instant::now() < deadline, "progress never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let want = |tag: &str| (0..5).map(|i| format!("{tag}-{i}")).collect::<Vec<_>>();
    assert_eq!(*seen_a.seen.lock().unwrap(), want("a"));
    assert_eq!(*seen_b.seen.lock().unwrap(), want("b"));
}

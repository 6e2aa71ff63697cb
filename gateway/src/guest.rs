//! The VM guest tools: each call reaches the VM's guest agent over an MCP
//! session through its node (`GuestStream`, spliced to the VM's vsock port
//! 200), calls the agent's tool, forwards its progress to the caller, and
//! cancels it in the guest when the caller cancels.
//!
//! Sessions for the small tools (exec, background processes, listing and
//! deleting files) are kept per VM and reused: opening one (a tunnel, the
//! vsock handshake, `initialize`) costs more than a short call itself. A kept
//! session is pinged before each reuse, so one whose agent restarted or whose
//! connection stalled is replaced rather than trusted, and it is closed after
//! [`IDLE`] without calls. File reads and writes open a session of their own,
//! so the agent's buffers for a large transfer are freed when it ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use moat_proto::node::v1::GuestFrame;
use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CancelledNotificationParam, ClientRequest, ProgressNotificationParam,
    ProgressToken, ServerResult,
};
use rmcp::service::{NotificationContext, Peer, PeerRequestOptions, RunningService};
use rmcp::{ClientHandler, RoleClient, RoleServer, ServiceExt};
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::gateway::{CallContext, Shared};
use crate::handlers::ToolError;
use crate::vm_store::VmRow;

/// The agent's MCP port inside every VM.
pub const AGENT_MCP_PORT: u32 = 200;
/// Longest message to or from an agent: a 32 MiB file in base64 plus framing.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// How long the node may wait for the agent to accept, and the session to initialize.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a kept session may take to answer the ping before it is reused.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// A kept session unused this long is closed.
pub const IDLE: Duration = Duration::from_secs(15);
const FRAME: usize = 64 * 1024;

/// The caller's progress token and connection, so guest progress reaches it.
#[derive(Clone)]
pub struct Progress {
    pub peer: Peer<RoleServer>,
    pub token: ProgressToken,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress").field("token", &self.token).finish_non_exhaustive()
    }
}

/// Where the agent's progress for each request in flight goes: the request's own progress
/// token (rmcp gives every request one) → the caller's connection and token.
type Routes = Arc<Mutex<HashMap<ProgressToken, Progress>>>;

/// Receives the agent's notifications and passes progress on to the caller it belongs to.
#[derive(Clone, Default)]
struct Forwarder {
    routes: Routes,
}

impl ClientHandler for Forwarder {
    async fn on_progress(&self, params: ProgressNotificationParam, _context: NotificationContext<RoleClient>) {
        let to = self.routes.lock().expect("routes lock is never poisoned").get(&params.progress_token).cloned();
        if let Some(to) = to {
            let mut note = ProgressNotificationParam::new(to.token.clone(), params.progress);
            note.total = params.total;
            note.message = params.message;
            let _ = to.peer.notify_progress(note).await;
        }
    }
}

/// An MCP session with one VM's agent.
struct Session {
    service: RunningService<RoleClient, Forwarder>,
    routes: Routes,
    last_used: Mutex<Instant>,
    in_flight: AtomicUsize,
}

impl Session {
    fn new(service: RunningService<RoleClient, Forwarder>) -> Session {
        let routes = service.service().routes.clone();
        Session { service, routes, last_used: Mutex::new(Instant::now()), in_flight: AtomicUsize::new(0) }
    }

    /// Whether a kept session still reaches its agent: the tunnel is open and a ping is answered.
    async fn answers(&self) -> Result<(), String> {
        let peer = self.service.peer();
        if peer.is_transport_closed() {
            return Err("its connection closed".into());
        }
        let ping = peer.send_request(ClientRequest::PingRequest(Default::default()));
        match tokio::time::timeout(PING_TIMEOUT, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("ping failed: {e}")),
            Err(_) => Err(format!("no answer to a ping within {PING_TIMEOUT:?}")),
        }
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
            && self.last_used.lock().expect("last_used lock is never poisoned").elapsed() >= IDLE
    }
}

/// Marks a session in use for as long as it lives.
struct Busy<'a>(&'a Session);

impl<'a> Busy<'a> {
    fn new(session: &'a Session) -> Busy<'a> {
        session.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(session)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        *self.0.last_used.lock().expect("last_used lock is never poisoned") = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sends one request's progress to its caller for as long as it lives.
struct Route {
    routes: Routes,
    token: ProgressToken,
}

impl Drop for Route {
    fn drop(&mut self) {
        self.routes.lock().expect("routes lock is never poisoned").remove(&self.token);
    }
}

/// The kept sessions, one per VM.
#[derive(Default)]
pub struct Sessions {
    open: Arc<Mutex<HashMap<String, Arc<Session>>>>,
}

impl Sessions {
    /// The kept session with `vm`'s agent if it still answers, else a new one (kept).
    async fn get(&self, shared: &Shared, vm: &VmRow) -> Result<Arc<Session>, ToolError> {
        let kept = self.open.lock().expect("sessions lock is never poisoned").get(&vm.id).cloned();
        if let Some(session) = kept {
            match session.answers().await {
                Ok(()) => return Ok(session),
                Err(why) => {
                    tracing::info!(vm = %vm.id, "the kept guest session is replaced: {why}");
                    forget(&self.open, &vm.id, &session);
                }
            }
        }
        let session = Arc::new(Session::new(session(shared, vm).await?));
        self.open.lock().expect("sessions lock is never poisoned").insert(vm.id.clone(), session.clone());
        tokio::spawn(close_when_idle(Arc::downgrade(&self.open), vm.id.clone(), Arc::downgrade(&session)));
        Ok(session)
    }
}

/// Drops `session` from the kept ones if it is still the one kept for `vm`; it closes once the
/// calls using it end.
fn forget(open: &Mutex<HashMap<String, Arc<Session>>>, vm: &str, session: &Arc<Session>) {
    let mut open = open.lock().expect("sessions lock is never poisoned");
    if open.get(vm).is_some_and(|kept| Arc::ptr_eq(kept, session)) {
        open.remove(vm);
    }
}

/// Closes a kept session once it has been idle for [`IDLE`] or its connection has closed.
async fn close_when_idle(open: Weak<Mutex<HashMap<String, Arc<Session>>>>, vm: String, session: Weak<Session>) {
    loop {
        tokio::time::sleep(IDLE / 3).await;
        let (Some(open), Some(session)) = (open.upgrade(), session.upgrade()) else { return };
        if session.idle() || session.service.peer().is_transport_closed() {
            forget(&open, &vm, &session);
            tracing::debug!(vm, "guest session closed");
            return;
        }
    }
}

/// Whether calls of `tool` share the VM's kept session (file transfers get their own).
fn keeps_session(tool: &str) -> bool {
    !matches!(tool, "file_read" | "file_write")
}

/// How many times a session that stalls before it is initialized is opened afresh.
const SESSION_ATTEMPTS: u32 = 2;

/// Why one attempt to open a session failed.
enum Attempt {
    /// The tunnel opened but the agent never initialized the session (a stalled vsock
    /// connection, a busy or stopped agent): nothing has been asked of it yet, so a fresh
    /// connection is safe to try.
    Stalled(ToolError),
    /// Anything else (the VM or node is not there, the agent refused): trying again cannot help.
    Failed(ToolError),
}

/// Opens an MCP session with `vm`'s agent through its node. A connection that stalls before
/// the session is initialized is dropped and opened again once (VM-TESTING.md: the vsock
/// daemon occasionally stalls a connection for good); no request has been sent by then.
async fn session(shared: &Shared, vm: &VmRow) -> Result<RunningService<RoleClient, Forwarder>, ToolError> {
    if vm.state != "running" {
        return Err(ToolError::Invalid(format!("vm {} is {}; start it first (vm_start)", vm.name, vm.state)));
    }
    let mut attempt = 1;
    loop {
        match open(shared, vm).await {
            Ok(session) => {
                tracing::debug!(vm = %vm.id, "guest session opened");
                return Ok(session);
            }
            Err(Attempt::Stalled(e)) if attempt < SESSION_ATTEMPTS => {
                tracing::warn!(vm = %vm.id, attempt, "{e}; trying a new connection");
                attempt += 1;
            }
            Err(Attempt::Stalled(e) | Attempt::Failed(e)) => return Err(e),
        }
    }
}

/// One attempt at [`session`]: a tunnel through the node, then MCP `initialize`.
async fn open(shared: &Shared, vm: &VmRow) -> Result<RunningService<RoleClient, Forwarder>, Attempt> {
    let row = shared.state.node(&vm.node).await.map_err(|e| Attempt::Failed(e.into()))?;
    let mut node = shared
        .nodes
        .client(&row.name, shared.nodes.address_of(&row.name, &row.address))
        .map_err(|e| Attempt::Failed(ToolError::Node(format!("node {}: {e}", vm.node))))?;
    let (to_node, outbound) = tokio::sync::mpsc::channel::<GuestFrame>(16);
    let first = GuestFrame {
        vm_id: vm.id.clone(),
        port: AGENT_MCP_PORT,
        data: Vec::new(),
        connect_timeout_ms: CONNECT_TIMEOUT.as_millis() as u32,
    };
    to_node.send(first).await.map_err(|_| Attempt::Failed(ToolError::Node("the node tunnel closed at once".into())))?;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outbound));
    request.set_timeout(Duration::from_secs(24 * 3600));
    let mut inbound = node
        .guest_stream(request)
        .await
        .map_err(|status| {
            Attempt::Failed(match status.code() {
                tonic::Code::FailedPrecondition | tonic::Code::NotFound => {
                    ToolError::Node(status.message().to_string())
                }
                _ => ToolError::Node(format!(
                    "node {} is unreachable ({}); nothing ran",
                    vm.node,
                    crate::nodes::describe_status(&status)
                )),
            })
        })?
        .into_inner();
    // Splice the gRPC stream to an in-memory pipe the MCP client reads and writes.
    let (ours, theirs) = tokio::io::duplex(4 * FRAME);
    let (mut from_client, mut to_client) = tokio::io::split(theirs);
    tokio::spawn(async move {
        let mut buf = vec![0u8; FRAME];
        loop {
            match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let frame = GuestFrame { data: buf[..n].to_vec(), ..GuestFrame::default() };
                    if to_node.send(frame).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Ok(Some(frame)) = inbound.message().await {
            if to_client.write_all(&frame.data).await.is_err() {
                return;
            }
        }
        let _ = to_client.shutdown().await;
    });
    let (read, write) = tokio::io::split(ours);
    let transport =
        rmcp::transport::async_rw::AsyncRwTransport::new_client(read, write).with_max_line_length(MAX_MESSAGE);
    match tokio::time::timeout(CONNECT_TIMEOUT, Forwarder::default().serve(transport)).await {
        Ok(Ok(session)) => Ok(session),
        Ok(Err(e)) => {
            Err(Attempt::Stalled(ToolError::Node(format!("agent on vm {} did not start an MCP session: {e}", vm.name))))
        }
        Err(_) => Err(Attempt::Stalled(ToolError::Node(format!(
            "agent on vm {} did not answer within {CONNECT_TIMEOUT:?}",
            vm.name
        )))),
    }
}

/// Calls the agent's `tool` with `args` in `vm`, bounded by `deadline`; the agent's own
/// refusals (bad path, unknown id) come back as the caller's errors, word for word.
pub async fn call(
    shared: &Shared,
    ctx: &CallContext,
    vm: &VmRow,
    tool: &str,
    args: impl Serialize,
    deadline: Duration,
) -> Result<Value, ToolError> {
    let Value::Object(args) = serde_json::to_value(args).expect("guest inputs serialize") else {
        return Err(ToolError::Invalid("guest tool arguments must be an object".into()));
    };
    let session = if keeps_session(tool) {
        shared.guest.get(shared, vm).await?
    } else {
        Arc::new(Session::new(session(shared, vm).await?))
    };
    let _busy = Busy::new(&session);
    let request = ClientRequest::CallToolRequest(CallToolRequest::new(
        CallToolRequestParams::new(tool.to_string()).with_arguments(args),
    ));
    let mut options = PeerRequestOptions::no_options();
    options.timeout = Some(deadline);
    let peer = session.service.peer().clone();
    let handle = peer
        .send_cancellable_request(request, options)
        .await
        .map_err(|e| ToolError::Node(format!("agent on vm {}: {e}", vm.name)))?;
    let id = handle.id.clone();
    let _route = ctx.progress.clone().map(|progress| {
        let token = handle.progress_token.clone();
        session.routes.lock().expect("routes lock is never poisoned").insert(token.clone(), progress);
        Route { routes: session.routes.clone(), token }
    });
    let answer = tokio::select! {
        answer = handle.await_response() => answer,
        _ = ctx.cancel.cancelled() => {
            // The agent cancels the request (an exec's process group is killed); the session stays.
            let note = CancelledNotificationParam::new(Some(id), Some("the MCP client cancelled the call".into()));
            let _ = peer.notify_cancelled(note).await;
            return Err(ToolError::Node("cancelled".into()));
        }
    };
    match answer {
        Ok(ServerResult::CallToolResult(result)) if result.is_error == Some(true) => {
            let text: Vec<String> = result.content.iter().filter_map(|c| c.as_text().map(|t| t.text.clone())).collect();
            Err(ToolError::Invalid(text.join("\n")))
        }
        Ok(ServerResult::CallToolResult(result)) => result
            .structured_content
            .ok_or_else(|| ToolError::Node(format!("agent on vm {} returned no structured result", vm.name))),
        Ok(other) => Err(ToolError::Node(format!("agent on vm {} answered unexpectedly: {other:?}", vm.name))),
        Err(rmcp::ServiceError::Timeout { timeout }) => Err(ToolError::Node(format!(
            "agent on vm {} did not finish {tool} within {timeout:?}; the call was cancelled in the guest",
            vm.name
        ))),
        Err(e) => Err(ToolError::Node(format!("agent on vm {}: {e}", vm.name))),
    }
}

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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CancelledNotificationParam, ClientRequest, ProgressNotificationParam,
    ProgressToken, ServerResult,
};
use rmcp::service::{NotificationContext, Peer, PeerRequestOptions, RunningService};
use rmcp::{ClientHandler, RoleClient, RoleServer, ServiceExt};
use serde::Serialize;
use serde_json::Value;
use tokio::io::DuplexStream;
use tokio_util::sync::CancellationToken;

use pool::{Busy, Route, Session};
pub use pool::{IDLE, Sessions};

use crate::nodes::client::{NodeClient, NodeError};
use crate::store::StateError;
use crate::store::vms::VmRow;
use moat_tools::VmState;
use moat_tools::guest::{GuestTool, MAX_MESSAGE, MCP_PORT};

mod pool;
#[cfg(test)]
mod tests;

/// How a guest call failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The VM is not running, so its agent cannot be reached; the caller can start it.
    #[error("vm {vm} is {state}; start it first (vm_start)")]
    NotRunning { vm: String, state: VmState },
    /// The node refused the tunnel or could not be reached.
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Store(#[from] StateError),
    /// The agent did not start a session, stopped answering, or failed the call.
    #[error("{0}")]
    Agent(String),
    /// The agent refused the call (a bad path, an unknown id); its words, for the caller to fix.
    #[error("{0}")]
    Refused(String),
    /// The call was cancelled: by the MCP client, or because its session or moat is ending;
    /// the agent was told.
    #[error(
        "cancelled (by the client, or because moat is shutting down: reconnect and call again); the guest \
         agent was told to stop it"
    )]
    Cancelled,
}

/// Opens a byte stream to a guest port of a VM: through its node's `GuestStream` in
/// production, an in-process agent in tests.
pub trait Dial: Send + Sync {
    fn dial<'a>(
        &'a self,
        vm_id: &'a str,
        port: u32,
        connect_timeout: Duration,
    ) -> futures::future::BoxFuture<'a, Result<DuplexStream, GuestError>>;
}

impl Dial for NodeClient {
    fn dial<'a>(
        &'a self,
        vm_id: &'a str,
        port: u32,
        connect_timeout: Duration,
    ) -> futures::future::BoxFuture<'a, Result<DuplexStream, GuestError>> {
        Box::pin(async move { Ok(self.guest_stream(vm_id, port, connect_timeout).await?) })
    }
}

/// How long the node may wait for the agent to accept, and the session to initialize.
/// (Short in unit tests, whose fake agents answer at once or never.)
const CONNECT_TIMEOUT: Duration = Duration::from_millis(if cfg!(test) { 300 } else { 10_000 });
/// How long a kept session may take to answer the ping before it is reused.
pub(super) const PING_TIMEOUT: Duration = Duration::from_millis(if cfg!(test) { 200 } else { 2_000 });

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
pub(super) type Routes = Arc<Mutex<HashMap<ProgressToken, Progress>>>;

/// Receives the agent's notifications and passes progress on to the caller it belongs to.
#[derive(Clone, Default)]
pub(super) struct Forwarder {
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

/// How many times a session that stalls before it is initialized is opened afresh.
const SESSION_ATTEMPTS: u32 = 2;

/// Why one attempt to open a session failed.
enum Attempt {
    /// The tunnel opened but the agent never initialized the session (a stalled vsock
    /// connection, a busy or stopped agent): nothing has been asked of it yet, so a fresh
    /// connection is safe to try.
    Stalled(GuestError),
    /// Anything else (the VM or node is not there, the agent refused): trying again cannot help.
    Failed(GuestError),
}

/// Opens an MCP session with `vm`'s agent through its node. A connection that stalls before
/// the session is initialized is dropped and opened again once (VM-TESTING.md: the vsock
/// daemon occasionally stalls a connection for good); no request has been sent by then.
pub(super) async fn session(dial: &dyn Dial, vm: &VmRow) -> Result<RunningService<RoleClient, Forwarder>, GuestError> {
    if vm.state != VmState::Running {
        return Err(GuestError::NotRunning { vm: vm.name.clone(), state: vm.state });
    }
    let mut attempt = 1;
    loop {
        match open(dial, vm).await {
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
async fn open(dial: &dyn Dial, vm: &VmRow) -> Result<RunningService<RoleClient, Forwarder>, Attempt> {
    let stream = dial.dial(&vm.id, MCP_PORT, CONNECT_TIMEOUT).await.map_err(Attempt::Failed)?;
    let (read, write) = tokio::io::split(stream);
    let transport =
        rmcp::transport::async_rw::AsyncRwTransport::new_client(read, write).with_max_line_length(MAX_MESSAGE);
    match tokio::time::timeout(CONNECT_TIMEOUT, Forwarder::default().serve(transport)).await {
        Ok(Ok(session)) => Ok(session),
        Ok(Err(e)) => Err(Attempt::Stalled(GuestError::Agent(format!(
            "agent on vm {} did not start an MCP session: {e}",
            vm.name
        )))),
        Err(_) => Err(Attempt::Stalled(GuestError::Agent(format!(
            "agent on vm {} did not answer within {CONNECT_TIMEOUT:?}",
            vm.name
        )))),
    }
}

/// Calls the agent's `tool` with `args` in `vm`, bounded by `deadline`; the agent's own
/// refusals (bad path, unknown id) come back as the caller's errors, word for word.
#[allow(clippy::too_many_arguments)]
pub async fn call(
    sessions: &Sessions,
    dial: &dyn Dial,
    vm: &VmRow,
    tool: GuestTool,
    args: impl Serialize,
    deadline: Duration,
    progress: Option<Progress>,
    cancel: &CancellationToken,
) -> Result<Value, GuestError> {
    let Value::Object(args) = serde_json::to_value(args).expect("guest inputs serialize") else {
        return Err(GuestError::Refused("guest tool arguments must be an object".into()));
    };
    let session = if tool.keeps_session() {
        sessions.get(dial, vm).await?
    } else {
        Arc::new(Session::new(session(dial, vm).await?))
    };
    let _busy = Busy::new(&session);
    let request = ClientRequest::CallToolRequest(CallToolRequest::new(
        CallToolRequestParams::new(tool.name()).with_arguments(args),
    ));
    let mut options = PeerRequestOptions::no_options();
    options.timeout = Some(deadline);
    let peer = session.service.peer().clone();
    let handle = peer
        .send_cancellable_request(request, options)
        .await
        .map_err(|e| GuestError::Agent(format!("agent on vm {}: {e}", vm.name)))?;
    let id = handle.id.clone();
    let _route = progress.map(|progress| {
        let token = handle.progress_token.clone();
        session.routes.lock().expect("routes lock is never poisoned").insert(token.clone(), progress);
        Route { routes: session.routes.clone(), token }
    });
    let answer = tokio::select! {
        answer = handle.await_response() => answer,
        _ = cancel.cancelled() => {
            // The agent cancels the request (an exec's process group is killed); the session stays.
            let note = CancelledNotificationParam::new(Some(id), Some("the MCP client cancelled the call".into()));
            let _ = peer.notify_cancelled(note).await;
            return Err(GuestError::Cancelled);
        }
    };
    if answer.is_ok() {
        session.answered();
    }
    match answer {
        Ok(ServerResult::CallToolResult(result)) if result.is_error == Some(true) => {
            let text: Vec<String> = result.content.iter().filter_map(|c| c.as_text().map(|t| t.text.clone())).collect();
            Err(GuestError::Refused(text.join("\n")))
        }
        Ok(ServerResult::CallToolResult(result)) => result
            .structured_content
            .ok_or_else(|| GuestError::Agent(format!("agent on vm {} returned no structured result", vm.name))),
        Ok(other) => Err(GuestError::Agent(format!("agent on vm {} answered unexpectedly: {other:?}", vm.name))),
        Err(rmcp::ServiceError::Timeout { timeout }) => Err(GuestError::Agent(format!(
            "agent on vm {} did not finish {} within {timeout:?}; the call was cancelled in the guest",
            vm.name,
            tool.name()
        ))),
        Err(e) => Err(GuestError::Agent(format!("agent on vm {}: {e}", vm.name))),
    }
}

//! The VM guest tools: each call opens an MCP session with the VM's guest
//! agent through its node (`GuestStream`, spliced to the VM's vsock port
//! 200), calls the agent's tool, forwards its progress to the caller, and
//! cancels it in the guest when the caller cancels. A session per call keeps
//! no state to go stale: an agent restarted inside the guest is simply
//! reached again on the next call.

use std::time::Duration;

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

/// Receives the agent's notifications and passes progress on to the caller.
#[derive(Clone)]
struct Forwarder {
    progress: Option<Progress>,
}

impl ClientHandler for Forwarder {
    async fn on_progress(&self, params: ProgressNotificationParam, _context: NotificationContext<RoleClient>) {
        if let Some(to) = &self.progress {
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
    Stalled(ToolError),
    /// Anything else (the VM or node is not there, the agent refused): trying again cannot help.
    Failed(ToolError),
}

/// Opens an MCP session with `vm`'s agent through its node. A connection that stalls before
/// the session is initialized is dropped and opened again once (VM-TESTING.md: the vsock
/// daemon occasionally stalls a connection for good); no request has been sent by then.
async fn session(
    shared: &Shared,
    vm: &VmRow,
    progress: Option<Progress>,
) -> Result<RunningService<RoleClient, Forwarder>, ToolError> {
    if vm.state != "running" {
        return Err(ToolError::Invalid(format!("vm {} is {}; start it first (vm_start)", vm.name, vm.state)));
    }
    let mut attempt = 1;
    loop {
        match open(shared, vm, progress.clone()).await {
            Ok(session) => return Ok(session),
            Err(Attempt::Stalled(e)) if attempt < SESSION_ATTEMPTS => {
                tracing::warn!(vm = %vm.id, attempt, "{e}; trying a new connection");
                attempt += 1;
            }
            Err(Attempt::Stalled(e) | Attempt::Failed(e)) => return Err(e),
        }
    }
}

/// One attempt at [`session`]: a tunnel through the node, then MCP `initialize`.
async fn open(
    shared: &Shared,
    vm: &VmRow,
    progress: Option<Progress>,
) -> Result<RunningService<RoleClient, Forwarder>, Attempt> {
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
    match tokio::time::timeout(CONNECT_TIMEOUT, Forwarder { progress }.serve(transport)).await {
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
    let session = session(shared, vm, ctx.progress.clone()).await?;
    let request = ClientRequest::CallToolRequest(CallToolRequest::new(
        CallToolRequestParams::new(tool.to_string()).with_arguments(args),
    ));
    let mut options = PeerRequestOptions::no_options();
    options.timeout = Some(deadline);
    let peer = session.peer().clone();
    let handle = peer
        .send_cancellable_request(request, options)
        .await
        .map_err(|e| ToolError::Node(format!("agent on vm {}: {e}", vm.name)))?;
    let id = handle.id.clone();
    let answer = tokio::select! {
        answer = handle.await_response() => answer,
        _ = ctx.cancel.cancelled() => {
            let note = CancelledNotificationParam::new(Some(id), Some("the MCP client cancelled the call".into()));
            let _ = peer.notify_cancelled(note).await;
            let _ = session.cancel().await;
            return Err(ToolError::Node("cancelled".into()));
        }
    };
    let _ = session.cancel().await;
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

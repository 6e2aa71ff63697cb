//! Portal sessions: MCP from inside portal VMs. For every node it knows, the
//! gateway keeps a `portal_listen` stream open (it dials the node, as for every
//! node call, so mTLS trust keeps its direction). The node offers each
//! connection a guest opened to it (`moat-guest mcp`) with the VM it arrived
//! on; the gateway takes it, checks that the VM is an agent's portal on that
//! node, and serves it with the same server and pipeline as stdio and HTTP, as
//! transport `vsock` and principal `vm:<id>`. A VM that may not call moat is
//! answered once with why, audited, and closed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rmcp::ServiceExt;
use rmcp::model::{ErrorCode, ErrorData};
use rmcp::service::{RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport as _;
use rmcp::{RoleServer, model::JsonRpcMessage};
use tokio::io::BufReader;
use tokio_util::sync::CancellationToken;

use super::stdio::LineTransport;
use super::{Gateway, Server, UNAUTHENTICATED};
use crate::nodes::client::{NodeClient, PortalOffer};
use crate::principal::Transport;
use crate::store::audit::{self, CallRecord, Decision};
use crate::tools::agents::{PortalRefusal, portal_principal};

/// How often the node list is read again: new nodes get a listener, lost streams are reopened.
const RESCAN: Duration = Duration::from_secs(2);
/// How long a refused VM has to send its first request before it is closed without an answer.
const REFUSAL_WAIT: Duration = Duration::from_secs(10);

/// Keeps a portal listener on every known node until `shutdown`.
pub async fn run(server: Arc<Server>, max_line: usize, shutdown: CancellationToken) {
    let mut listening: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut tick = tokio::time::interval(RESCAN);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        let nodes = match server.shared.state.nodes().await {
            Ok(nodes) => nodes,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the nodes to listen for portal sessions");
                continue;
            }
        };
        listening.retain(|name, task| {
            let keep = !task.is_finished() && nodes.iter().any(|n| &n.name == name);
            if !keep {
                task.abort();
            }
            keep
        });
        for node in nodes {
            if listening.contains_key(&node.name) {
                continue;
            }
            let task =
                tokio::spawn(listen(server.clone(), node.name.clone(), node.address, max_line, shutdown.clone()));
            listening.insert(node.name, task);
        }
    }
    for task in listening.values() {
        task.abort();
    }
}

/// One node's offers, each served on its own task, until the stream ends.
async fn listen(server: Arc<Server>, node: String, address: String, max_line: usize, shutdown: CancellationToken) {
    let client = match server.shared.nodes.node(&node, &address) {
        Ok(client) => client,
        Err(e) => return tracing::debug!(%node, error = %e, "cannot reach the node for portal sessions"),
    };
    let mut offers = match client.portal_listen().await {
        Ok(offers) => offers,
        Err(e) => return tracing::debug!(%node, error = %e, "the node does not offer portal sessions"),
    };
    tracing::debug!(%node, "listening for portal sessions");
    loop {
        let next = tokio::select! {
            next = offers.next() => next,
            _ = shutdown.cancelled() => return,
        };
        match next {
            Ok(Some(offer)) => {
                let session =
                    serve(server.clone(), client.clone(), node.clone(), offer, max_line, shutdown.child_token());
                tokio::spawn(session);
            }
            Ok(None) => return tracing::debug!(%node, "the node ended the portal stream"),
            Err(e) => return tracing::debug!(%node, error = %e, "the portal stream failed"),
        }
    }
}

/// Takes one offered connection and serves it, or refuses it.
async fn serve(
    server: Arc<Server>,
    client: NodeClient,
    node: String,
    offer: PortalOffer,
    max_line: usize,
    stop: CancellationToken,
) {
    let stream = match client.portal_attach(&offer.session).await {
        Ok(stream) => stream,
        Err(e) => return tracing::warn!(%node, vm = %offer.vm_id, error = %e, "cannot take a portal session"),
    };
    let (read, write) = tokio::io::split(stream);
    let transport = LineTransport::new(BufReader::new(read), write, max_line);
    if let Err(why) = portal_principal(&server.shared, &offer.vm_id, &node).await {
        return refuse(&server, &offer.vm_id, transport, why).await;
    }
    tracing::info!(%node, vm = %offer.vm_id, "portal session opened");
    match Gateway::portal(server, &offer.vm_id, &node).serve_with_ct(transport, stop).await {
        Ok(running) => {
            let reason = running.waiting().await;
            tracing::info!(vm = %offer.vm_id, ?reason, "portal session ended");
        }
        Err(e) => tracing::info!(vm = %offer.vm_id, error = %e, "portal client left before initializing"),
    }
}

/// Answers the first request of a VM that may not call moat with why, audits it, and closes.
async fn refuse<R, W>(server: &Server, vm: &str, mut transport: LineTransport<R, W>, why: PortalRefusal)
where
    R: tokio::io::AsyncBufRead + Unpin + Send,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tracing::warn!(vm, reason = %why, "refused a portal session");
    let record = CallRecord {
        principal: format!("vm:{vm}"),
        acting_for: None,
        role: "none".into(),
        transport: Transport::Vsock.as_str().into(),
        session: None,
        tool: "session".into(),
        resource: Some(format!("vm/{vm}")),
        decision: Decision::Denied,
        args_digest: audit::args_digest(None),
        args_shape: audit::args_shape(None),
    };
    if let Err(e) = server.shared.audit.record_call(&record).await {
        tracing::error!(error = %e, "cannot audit a refused portal session");
    }
    if let PortalRefusal::Store(e) = &why {
        tracing::error!(error = %e, "checking a portal session failed");
    }
    let first: Option<RxJsonRpcMessage<RoleServer>> =
        tokio::time::timeout(REFUSAL_WAIT, transport.receive()).await.ok().flatten();
    let id = match first {
        Some(JsonRpcMessage::Request(request)) => Some(request.id),
        _ => None,
    };
    let error = ErrorData::new(ErrorCode(UNAUTHENTICATED), why.to_string(), None);
    let _ = transport.send(TxJsonRpcMessage::<RoleServer>::error(error, id)).await;
    let _ = transport.close().await;
}

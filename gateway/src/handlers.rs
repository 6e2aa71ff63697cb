//! What each tool does, as one exhaustive `match` over [`ToolCall`]. Adding a
//! tool to `moat-tools` fails to compile here until it is handled.

use moat_tools::{NodeInspectOutput, NodeListOutput, ToolCall, WhoamiOutput};
use serde_json::Value;

use crate::gateway::{CallContext, Shared};
use crate::nodes;
use crate::state::StateError;
use crate::trans;

/// How a tool call can fail once it has been decoded and allowed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The caller named something that does not exist; they can fix the call.
    #[error("{0}")]
    NotFound(String),
    /// moat itself failed; not the caller's doing.
    #[error("internal error")]
    Internal(#[source] StateError),
}

impl From<StateError> for ToolError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::UnknownNode(_) => ToolError::NotFound(e.to_string()),
            other => ToolError::Internal(other),
        }
    }
}

pub async fn dispatch(shared: &Shared, ctx: &CallContext, call: ToolCall) -> Result<Value, ToolError> {
    match call {
        ToolCall::Whoami(_) => Ok(to_value(WhoamiOutput {
            principal: ctx.principal.name.clone(),
            role: ctx.principal.role.as_str().to_string(),
            transport: ctx.transport.as_str().to_string(),
            protocol_version: ctx.protocol_version.clone(),
            session: ctx.session.clone(),
            server_version: env!("CARGO_PKG_VERSION").to_string(),
        })),
        ToolCall::NodeList(_) => {
            let details = nodes::refresh_all(&shared.state, &shared.nodes).await?;
            Ok(to_value(NodeListOutput { nodes: details.iter().map(trans::node_summary).collect() }))
        }
        ToolCall::NodeInspect(input) => {
            let row = shared.state.node(&input.node).await?;
            let node = nodes::refresh(&shared.state, &shared.nodes, &row).await?;
            Ok(to_value(NodeInspectOutput { node }))
        }
    }
}

fn to_value<T: serde::Serialize>(output: T) -> Value {
    serde_json::to_value(output).expect("tool output types serialize to JSON")
}

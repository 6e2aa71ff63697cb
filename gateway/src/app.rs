//! What every tool call shares, whatever its tool: the state store, node
//! connections, the policy bundle, the audit log, the key checker and the
//! guest sessions; and who is calling ([`CallContext`]). Knows no tool.

use std::sync::Arc;

use crate::guest::{Progress, Sessions};
use crate::nodes::connector::NodeConnector;
use crate::principal::{Principal, Transport};
use crate::security::authz::Authz;
use crate::store::State;
use crate::store::audit::AuditLog;
use crate::store::keys::KeyChecker;

/// What every call shares: state, node connections, policies, the audit log, keys, guest sessions.
pub struct Shared {
    pub state: State,
    pub nodes: Arc<NodeConnector>,
    pub authz: Authz,
    pub audit: AuditLog,
    pub keys: KeyChecker,
    /// MCP sessions with guest agents, kept per VM.
    pub guest: Sessions,
}

/// Who is calling and how, resolved per call.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub principal: Principal,
    pub transport: Transport,
    pub protocol_version: Option<String>,
    pub session: Option<String>,
    /// Cancelled when the client cancels this call; guest tools pass it into the VM.
    pub cancel: tokio_util::sync::CancellationToken,
    /// Where to send progress for this call, when the client asked for it.
    pub progress: Option<Progress>,
    /// The id of the existing VM the authorizer judged, when the call names one: handlers act
    /// on exactly this VM, never on whatever the caller's `vm` argument resolves to by then.
    pub vm: Option<String>,
}

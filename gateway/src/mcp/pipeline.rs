//! The tool-call pipeline, in this order: look up the tool (hidden tools answer
//! as unknown) → validate arguments → authorize the resource → rate limit →
//! audit (committed before anything acts) → dispatch → audit the outcome.
//! Outcomes become MCP answers in exactly one place, [`respond`].

use std::borrow::Cow;

use moat_tools::{ResourceKind, ToolCall, ToolName};
use rmcp::model::{CallToolRequestParams, CallToolResult, ContentBlock, ErrorCode, ErrorData};
use serde_json::{Value, json};

use super::Gateway;
use super::catalog;
use crate::app::CallContext;
use crate::security::limits::Permit;
use crate::security::resource::{self, ResourceRef};
use crate::store::audit::{self, CallRecord, Decision, Outcome};
use crate::tools::{self, ToolError};

/// JSON-RPC error code for a refused API key (stdio; HTTP answers 401 before MCP).
pub const UNAUTHENTICATED: i32 = -32001;
/// JSON-RPC error code for a rate-limited call; `data.retry_after_ms` says when to retry.
pub const RATE_LIMITED: i32 = -32029;
/// Results larger than this (as JSON) are not repeated as text.
const LARGE_RESULT: usize = 256 * 1024;

impl Gateway {
    /// Commits one audit record, failing the call if it cannot be written.
    pub(super) async fn audit(&self, record: &CallRecord) -> Result<i64, ErrorData> {
        self.server.shared.audit.record_call(record).await.map_err(|e| ErrorData::internal_error(e.to_string(), None))
    }

    /// What the authorizer judges: nodes and the cluster have no owner; a new VM is owned by
    /// its creator; an existing VM brings its owner and labels from the database.
    async fn resource_of(
        &self,
        call: &ToolCall,
        kind: ResourceKind,
        ctx: &CallContext,
    ) -> Result<ResourceRef, ErrorData> {
        let Some(id) = call.resource_id() else { return Ok(ResourceRef::cluster()) };
        match (kind, call) {
            (ResourceKind::Vm, ToolCall::VmCreate(input)) => Ok(ResourceRef {
                kind,
                id: id.to_string(),
                owner: Some(ctx.principal.owner().to_string()),
                labels: input.labels.iter().flatten().map(|(k, v)| format!("{k}={}", v.0)).collect(),
            }),
            (ResourceKind::Vm, _) => {
                resource::resource(&self.server.shared.state, ctx.principal.owner(), id).await.map_err(|e| {
                    tracing::error!(error = %e, "resolving a VM for authorization failed");
                    ErrorData::internal_error(format!("internal error: {e}; see the gateway log"), None)
                })
            }
            (ResourceKind::Workspace, ToolCall::WorkspaceCreate(_)) => Ok(ResourceRef {
                kind,
                id: id.to_string(),
                owner: Some(ctx.principal.owner().to_string()),
                labels: Vec::new(),
            }),
            (ResourceKind::Workspace, _) => {
                resource::workspace_resource_of(&self.server.shared.state, ctx.principal.owner(), id).await.map_err(
                    |e| {
                        tracing::error!(error = %e, "resolving a workspace for authorization failed");
                        ErrorData::internal_error(format!("internal error: {e}; see the gateway log"), None)
                    },
                )
            }
            // A new repository, and remote credentials (only ever the caller's own), are the caller's.
            (ResourceKind::GitRepo, ToolCall::GitRepoCreate(_))
            | (ResourceKind::GitCredential, _)
            | (ResourceKind::Agent, ToolCall::AgentCreate(_)) => Ok(ResourceRef {
                kind,
                id: id.to_string(),
                owner: Some(ctx.principal.owner().to_string()),
                labels: Vec::new(),
            }),
            (ResourceKind::SecurityGroup, ToolCall::SecurityGroupCreate(_)) => Ok(ResourceRef {
                kind,
                id: id.to_string(),
                owner: Some(ctx.principal.owner().to_string()),
                labels: Vec::new(),
            }),
            (
                ResourceKind::SecurityGroup | ResourceKind::PortForward | ResourceKind::GitRepo | ResourceKind::Agent,
                _,
            ) => resource::owned_resource_of(&self.server.shared.state, ctx.principal.owner(), kind, id).await.map_err(
                |e| {
                    tracing::error!(error = %e, "resolving a resource for authorization failed");
                    ErrorData::internal_error(format!("internal error: {e}; see the gateway log"), None)
                },
            ),
            _ => Ok(ResourceRef { kind, id: id.to_string(), owner: None, labels: Vec::new() }),
        }
    }

    /// The whole tool-call pipeline, after authentication.
    pub(super) async fn call(
        &self,
        request: CallToolRequestParams,
        ctx: &CallContext,
    ) -> Result<CallToolResult, ErrorData> {
        #[cfg(feature = "bench-no-pipeline")]
        if self.server.no_pipeline {
            let tool = ToolName::parse(&request.name).ok_or_else(|| unknown_tool(&request.name))?;
            let call = ToolCall::decode(tool, request.arguments)
                .map_err(|e| ErrorData::invalid_params(e.to_string(), None))?;
            return respond(tools::dispatch(&self.server.shared, ctx, call).await);
        }
        match self.admit(request, ctx).await? {
            Checked::Admitted(admitted) => self.run(admitted).await,
            Checked::Answered(answer) => answer,
        }
    }

    /// Every check before a call runs: the tool, its arguments, the authorizer, the rate limit,
    /// and the committed audit record. An admitted call carries the context it runs with: for a
    /// call on an existing VM, pinned to the VM that was judged.
    async fn admit<'a>(&self, request: CallToolRequestParams, ctx: &'a CallContext) -> Result<Checked<'a>, ErrorData> {
        let bundle = self.server.shared.authz.bundle();
        let mut record = call_record(ctx, bounded(&request.name), request.arguments.as_ref());
        // A tool this principal may never call is indistinguishable from one that does not exist.
        let tool = match ToolName::parse(&request.name) {
            Some(tool) if bundle.may_ever_call(&ctx.principal, tool) => tool,
            _ => {
                self.audit(&record).await?;
                return Err(unknown_tool(&request.name));
            }
        };
        if let Err(violations) = self.server.catalog.validate(tool, request.arguments.as_ref()) {
            record.decision = Decision::Invalid;
            self.audit(&record).await?;
            let detail: Vec<Value> = violations.iter().map(|v| json!({"path": v.path, "message": v.message})).collect();
            return Err(ErrorData::invalid_params(
                catalog::describe(tool, &violations),
                Some(json!({"tool": tool.as_str(), "violations": detail})),
            ));
        }
        let call = ToolCall::decode(tool, request.arguments).map_err(|e| {
            tracing::error!(error = %e, source = %e.source, "schema-valid arguments failed to decode");
            ErrorData::internal_error(format!("{e}: this is a moat bug, please report it"), None)
        })?;
        let spec = self.server.catalog.spec(tool);
        let resource = self.resource_of(&call, spec.resource, ctx).await?;
        record.resource = Some(format!("{}/{}", resource.kind.as_str(), resource.id));
        if !bundle.is_allowed(&ctx.principal, tool, &resource) {
            self.audit(&record).await?;
            // Do not confirm that someone else's resource exists: answer exactly as for a missing
            // one, in the caller's own words (never the id a name resolved to).
            let named = call.resource_id().unwrap_or(&resource.id);
            let message = match resource.kind {
                // Nothing exists yet to hide: a portal is told what it may do instead.
                _ if ctx.principal.portal.is_some() && tool.as_str().ends_with("_create") => format!(
                    "a portal agent acts only on its own work VM and workspaces and cannot call {}: ask its \
                     owner to make what it needs",
                    tool.as_str()
                ),
                ResourceKind::Vm => resource::not_found(named),
                ResourceKind::Workspace => resource::workspace_not_found(named),
                ResourceKind::SecurityGroup => resource::group_not_found(named),
                ResourceKind::GitRepo => resource::repo_not_found(named),
                ResourceKind::Agent => resource::agent_not_found(named),
                kind => format!("no {} named `{named}`", kind.as_str()),
            };
            return Ok(Checked::Answered(Ok(CallToolResult::error(vec![ContentBlock::text(message)]))));
        }
        let permit = match bundle.limiter.admit(&ctx.principal, spec.class) {
            Ok(permit) => permit,
            Err(limited) => {
                record.decision = Decision::RateLimited;
                self.audit(&record).await?;
                let retry_ms = limited.retry_after().map(|d| d.as_millis().max(1) as u64);
                return Err(ErrorData::new(
                    ErrorCode(RATE_LIMITED),
                    limited.to_string(),
                    Some(json!({"retry_after_ms": retry_ms})),
                ));
            }
        };
        record.decision = Decision::Allowed;
        let seq = self.audit(&record).await?;
        // Cloned only for calls that pin a VM: the whoami hot path keeps borrowing.
        let ctx = match resource::pinned_vm(&call, &resource) {
            Some(id) => Cow::Owned(CallContext { vm: Some(id), ..ctx.clone() }),
            None => Cow::Borrowed(ctx),
        };
        Ok(Checked::Admitted(Admitted { call, ctx, record, seq, _permit: permit }))
    }

    /// Runs an admitted call and appends its outcome to the audit log.
    async fn run(&self, admitted: Admitted<'_>) -> Result<CallToolResult, ErrorData> {
        let Admitted { call, ctx, record, seq, _permit } = admitted;
        let started = std::time::Instant::now();
        let answer = respond(tools::dispatch(&self.server.shared, &ctx, call).await);
        let (outcome, code) = match &answer {
            Ok(result) if result.is_error == Some(true) => (Outcome::ToolError, None),
            Ok(_) => (Outcome::Ok, None),
            Err(e) => (Outcome::Error, Some(i64::from(e.code.0))),
        };
        self.server.shared.audit.record_outcome(&record, seq, outcome, code, started.elapsed());
        answer
    }
}

/// What the checks decided: run the call, or answer without running it.
// One per call, on the stack; boxing the admitted call would allocate on the whoami hot path.
#[allow(clippy::large_enum_variant)]
enum Checked<'a> {
    Admitted(Admitted<'a>),
    Answered(Result<CallToolResult, ErrorData>),
}

/// A call that passed every check, with its audit record committed and its rate-limit permit.
struct Admitted<'a> {
    call: ToolCall,
    ctx: Cow<'a, CallContext>,
    record: CallRecord,
    seq: i64,
    _permit: Permit,
}

/// The one mapping from a handler outcome to an MCP answer.
fn respond(outcome: Result<Value, ToolError>) -> Result<CallToolResult, ErrorData> {
    match outcome {
        Ok(value) => {
            // A large result (a file read) goes once, as structured content; its text copy
            // would double the message. Small results keep the copy for text-only clients. The
            // copy is written with a cap, so a large result is never printed in full to find out.
            let text = match json_within(&value, LARGE_RESULT) {
                Some(text) => text,
                None => format!("more than {LARGE_RESULT} bytes of JSON in structuredContent"),
            };
            let mut result = CallToolResult::structured(Value::Null);
            result.content = vec![ContentBlock::text(text)];
            result.structured_content = Some(value);
            Ok(result)
        }
        Err(ToolError::NotFound(message) | ToolError::Invalid(message) | ToolError::Node(message)) => {
            Ok(CallToolResult::error(vec![ContentBlock::text(message)]))
        }
        Err(ToolError::Internal(source)) => {
            tracing::error!(error = %source, cause = ?std::error::Error::source(&source), "tool failed");
            Err(ErrorData::internal_error(format!("internal error: {source}; see the gateway log"), None))
        }
    }
}

/// The audit record of a request by `ctx`'s caller, denied until a check says otherwise.
pub(super) fn call_record(ctx: &CallContext, tool: String, args: Option<&rmcp::model::JsonObject>) -> CallRecord {
    CallRecord {
        principal: ctx.principal.name.clone(),
        acting_for: ctx.principal.portal.as_ref().map(|p| p.owner.clone()),
        role: ctx.principal.role.as_str().to_string(),
        transport: ctx.transport.as_str().to_string(),
        session: ctx.session.clone(),
        tool,
        resource: None,
        decision: Decision::Denied,
        args_digest: audit::args_digest(args),
        args_shape: audit::args_shape(args),
    }
}

/// `value` as compact JSON if that takes at most `limit` bytes.
fn json_within(value: &Value, limit: usize) -> Option<String> {
    struct Capped(Vec<u8>, usize);
    impl std::io::Write for Capped {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            if self.0.len() + bytes.len() > self.1 {
                return Err(std::io::Error::other("over the cap"));
            }
            self.0.extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut out = Capped(Vec::new(), limit);
    serde_json::to_writer(&mut out, value).ok()?;
    String::from_utf8(out.0).ok()
}

/// A caller-supplied name as moat repeats it (in errors and the audit log): at most 128 characters.
pub(super) fn bounded(name: &str) -> String {
    match name.char_indices().nth(128) {
        Some((cut, _)) => format!("{}…", &name[..cut]),
        None => name.to_string(),
    }
}

/// The answer for a tool that does not exist, and for one the caller may never call.
pub(super) fn unknown_tool(name: &str) -> ErrorData {
    let name = bounded(name);
    ErrorData::new(
        ErrorCode::INVALID_PARAMS,
        format!("unknown tool `{name}`; tools/list shows the tools you can call"),
        Some(json!({"tool": name})),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gateway on a fresh database in `dir`, with the built-in policies, no nodes.
    async fn gateway(dir: &std::path::Path) -> (Gateway, crate::store::State) {
        use crate::app::Shared;
        use crate::principal::{Principal, Role};
        let db = dir.join("moat.db");
        let state = crate::store::State::open(&db).await.unwrap();
        let shared = std::sync::Arc::new(Shared {
            state: state.clone(),
            nodes: std::sync::Arc::new(crate::nodes::connector::NodeConnector::new(
                crate::nodes::pki::Pki::at(dir),
                None,
            )),
            authz: crate::security::authz::Authz::load(&crate::config::PolicySource::Embedded).unwrap(),
            audit: crate::store::audit::AuditLog::start(&db, crate::store::Durability::Process).unwrap(),
            keys: crate::store::keys::KeyChecker::open(&db).unwrap(),
            guest: crate::guest::Sessions::default(),
        });
        let server = std::sync::Arc::new(super::super::Server {
            shared,
            catalog: super::super::catalog::Catalog::build(),
            prompts: super::super::prompts::Prompts::load(None).unwrap(),
            #[cfg(feature = "bench-no-pipeline")]
            no_pipeline: false,
        });
        let operator = Principal::new("alice", Role::Agent);
        (Gateway::stdio(server, super::super::Identity::Operator(operator)), state)
    }

    fn alice() -> CallContext {
        CallContext {
            principal: crate::principal::Principal::new("alice", crate::principal::Role::Agent),
            transport: crate::principal::Transport::Stdio,
            protocol_version: None,
            session: None,
            cancel: tokio_util::sync::CancellationToken::new(),
            progress: None,
            vm: None,
        }
    }

    /// Alice's `web` is authorized; before the handler runs it is deleted and bob's `web` is the
    /// only VM of that name. The handler must answer that alice's VM is gone, never act on bob's:
    /// without the pin the name would now resolve to bob's VM (and the answer would be about its
    /// node instead).
    #[tokio::test]
    async fn the_handler_acts_on_the_vm_that_was_authorized() {
        use crate::store::vms::tests::row;
        let dir = tempfile::tempdir().unwrap();
        let (gateway, state) = gateway(dir.path()).await;
        let quotas =
            crate::config::Quotas { running_vms: 9, vcpus: 9, memory_mib: 9999, workspaces: 1, workspace_gib: 8 };
        let room = crate::store::vms::NodeCapacity { cpus: 8, memory_mib: 65536 };
        state.reserve_vm(&row("vm-a", "web", "alice", "n1", 1, 256), &quotas, "agent", room, true, &[]).await.unwrap();
        state.reserve_vm(&row("vm-b", "web", "bob", "n1", 1, 256), &quotas, "agent", room, true, &[]).await.unwrap();
        let ctx = alice();
        let request =
            CallToolRequestParams::new("vm_inspect").with_arguments(json!({"vm": "web"}).as_object().cloned().unwrap());
        let Checked::Admitted(admitted) = gateway.admit(request, &ctx).await.unwrap() else {
            panic!("alice may inspect her own VM");
        };
        assert_eq!(admitted.ctx.vm.as_deref(), Some("vm-a"), "pinned to the VM that was judged");
        state.delete_vm_row("vm-a").await.unwrap();
        let answer = gateway.run(admitted).await.unwrap();
        assert_eq!(answer.is_error, Some(true));
        let text = answer.content[0].as_text().unwrap().text.clone();
        assert_eq!(text, resource::not_found("web"));
    }

    /// Every call in flight holds its pipeline future: a thousand sessions' calls waiting on the
    /// audit commit hold a thousand. Handlers are boxed by `dispatch` so that this stays the
    /// pipeline's own state, not the largest handler's (25 KiB when they were inlined).
    #[tokio::test]
    async fn a_call_in_flight_holds_only_its_own_state() {
        let dir = tempfile::tempdir().unwrap();
        let (gateway, _state) = gateway(dir.path()).await;
        let ctx = alice();
        let call = gateway.call(CallToolRequestParams::new("whoami"), &ctx);
        let size = std::mem::size_of_val(&call);
        assert!(size <= 8 * 1024, "a tools/call future takes {size} bytes");
        assert_ne!(call.await.unwrap().is_error, Some(true), "whoami answers");
    }

    #[test]
    fn large_results_are_sent_once() {
        let small = json!({"a": 1});
        let answer = respond(Ok(small.clone())).unwrap();
        assert_eq!(answer.content[0].as_text().unwrap().text, small.to_string());
        assert_eq!(answer.structured_content, Some(small));
        let large = json!({"content": "x".repeat(LARGE_RESULT)});
        let answer = respond(Ok(large.clone())).unwrap();
        assert!(answer.content[0].as_text().unwrap().text.starts_with("more than"), "a summary, not a copy");
        assert_eq!(answer.structured_content, Some(large));
        assert_eq!(json_within(&json!([1, 2]), 5), Some("[1,2]".into()));
        assert_eq!(json_within(&json!([1, 2]), 4), None);
    }

    #[test]
    fn repeated_names_are_bounded() {
        assert_eq!(bounded("whoami"), "whoami");
        let long = "é".repeat(300);
        let shown = bounded(&long);
        assert_eq!(shown.chars().count(), 129, "128 characters and an ellipsis");
        assert!(unknown_tool(&long).message.len() < 400);
    }

    #[test]
    fn calls_on_an_existing_vm_are_pinned_to_the_judged_id() {
        let call = |tool, args: Value| ToolCall::decode(tool, args.as_object().cloned()).unwrap();
        let vm = |id: &str, owner: Option<&str>| ResourceRef {
            kind: ResourceKind::Vm,
            id: id.into(),
            owner: owner.map(String::from),
            labels: Vec::new(),
        };
        let exec = call(ToolName::VmExec, json!({"vm": "web", "argv": ["true"]}));
        assert_eq!(resource::pinned_vm(&exec, &vm("vm-a1", Some("alice"))).as_deref(), Some("vm-a1"));
        let stop = call(ToolName::VmStop, json!({"vm": "web"}));
        assert_eq!(resource::pinned_vm(&stop, &vm("vm-a1", Some("alice"))).as_deref(), Some("vm-a1"));
        assert_eq!(resource::pinned_vm(&stop, &vm("web", None)), None, "not found: the handler says so");
        let create = call(ToolName::VmCreate, json!({"name": "web", "vcpus": 1, "memory_mib": 256}));
        assert_eq!(resource::pinned_vm(&create, &vm("web", Some("alice"))), None, "a new VM has no id yet");
        let node = call(ToolName::NodeInspect, json!({"node": "n1"}));
        let n1 = ResourceRef { kind: ResourceKind::Node, id: "n1".into(), owner: None, labels: Vec::new() };
        assert_eq!(resource::pinned_vm(&node, &n1), None);
    }
}

//! The MCP server every transport serves: lists tools, prompts and
//! resources, and runs each `tools/call` through one pipeline, in this order:
//! authenticate (resolve the principal) → look up the tool (hidden tools
//! answer as unknown) → validate arguments → authorize the resource → rate
//! limit → audit (committed before anything acts) → dispatch → audit the
//! outcome. Outcomes become MCP answers in exactly one place, [`respond`].

use std::collections::BTreeMap;
use std::sync::Arc;

use moat_tools::{ResourceKind, ToolCall, ToolName};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ErrorCode, ErrorData,
    GetPromptRequestParams, GetPromptResponse, GetPromptResult, Implementation, ListPromptsResult, ListResourcesResult,
    ListToolsResult, PaginatedRequestParams, Prompt, PromptArgument, PromptMessage, ReadResourceRequestParams,
    ReadResourceResponse, ReadResourceResult, Resource, ResourceContents, Role as MessageRole, ServerCapabilities,
    ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, ServerHandler};
use serde_json::{Value, json};

use crate::audit::{self, AuditLog, CallRecord, Decision, Outcome};
use crate::authz::{Authz, ResourceRef};
use crate::catalog::{self, Catalog};
use crate::handlers::{self, ToolError};
use crate::keys;
use crate::node_client::NodeConnector;
use crate::principal::{Principal, Transport};
use crate::prompts::Prompts;
use crate::state::State;
use crate::vms;

/// JSON-RPC error code for a refused API key (stdio; HTTP answers 401 before MCP).
pub const UNAUTHENTICATED: i32 = -32001;
/// JSON-RPC error code for a rate-limited call; `data.retry_after_ms` says when to retry.
pub const RATE_LIMITED: i32 = -32029;

const STATUS_URI: &str = "moat://status";
/// Results larger than this (as JSON) are not repeated as text.
const LARGE_RESULT: usize = 256 * 1024;

/// What every connection shares: state, node connections, the tool catalog, prompts.
pub struct Shared {
    pub state: State,
    pub nodes: NodeConnector,
    pub catalog: Catalog,
    pub prompts: Prompts,
    pub authz: Authz,
    pub audit: AuditLog,
    pub keys: keys::KeyChecker,
    /// Benchmarks only: validate and dispatch, nothing else (see `--insecure-bench-no-pipeline`).
    pub no_pipeline: bool,
    /// MCP sessions with guest agents, kept per VM.
    pub guest: crate::guest::Sessions,
}

/// How a stdio connection's caller is identified.
#[derive(Debug, Clone)]
pub enum StdioIdentity {
    /// The local operator named in config.
    Operator(Principal),
    /// An API key from MOAT_API_KEY, re-checked on every call so revocation takes effect at once.
    Key(String),
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
    pub progress: Option<crate::guest::Progress>,
    /// The id of the existing VM the authorizer judged, when the call names one: handlers act
    /// on exactly this VM, never on whatever the caller's `vm` argument resolves to by then.
    pub vm: Option<String>,
}

/// One MCP server instance; cheap to clone (one per HTTP session or stdio connection).
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
    transport: Transport,
    /// The caller of a stdio connection; HTTP resolves it per request from the bearer key.
    stdio: Option<StdioIdentity>,
}

impl Gateway {
    pub fn stdio(shared: Arc<Shared>, identity: StdioIdentity) -> Gateway {
        Gateway { shared, transport: Transport::Stdio, stdio: Some(identity) }
    }

    pub fn http(shared: Arc<Shared>) -> Gateway {
        Gateway { shared, transport: Transport::Http, stdio: None }
    }

    /// Authenticates the caller of this request.
    async fn context(&self, ctx: &RequestContext<RoleServer>) -> Result<CallContext, ErrorData> {
        let refused = |message: String| ErrorData::new(ErrorCode(UNAUTHENTICATED), message, None);
        let parts = ctx.extensions.get::<axum::http::request::Parts>();
        let (principal, session) = match (&self.stdio, parts) {
            (Some(StdioIdentity::Operator(p)), _) => (p.clone(), None),
            (Some(StdioIdentity::Key(key)), _) => {
                let principal =
                    self.shared.keys.check(key).map_err(|e| refused(format!("MOAT_API_KEY refused: {e}")))?;
                (principal, None)
            }
            (None, Some(parts)) => {
                // The HTTP layer authenticated the bearer key and attached the principal.
                let principal = parts
                    .extensions
                    .get::<Principal>()
                    .cloned()
                    .ok_or_else(|| refused("request carried no authenticated principal".into()))?;
                let session = parts.headers.get("mcp-session-id").and_then(|v| v.to_str().ok()).map(String::from);
                (principal, session)
            }
            (None, None) => return Err(refused("request carried no authenticated principal".into())),
        };
        Ok(CallContext {
            principal,
            transport: self.transport,
            protocol_version: ctx.protocol_version().map(|v| v.to_string()),
            session,
            cancel: ctx.ct.clone(),
            progress: ctx
                .meta
                .get_progress_token()
                .map(|token| crate::guest::Progress { peer: ctx.peer.clone(), token }),
            vm: None,
        })
    }

    /// Commits one audit record, failing the call if it cannot be written.
    async fn audit(&self, record: &CallRecord) -> Result<i64, ErrorData> {
        self.shared.audit.record_call(record).await.map_err(|e| ErrorData::internal_error(e.to_string(), None))
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
                owner: Some(ctx.principal.name.clone()),
                labels: input.labels.iter().flatten().map(|(k, v)| format!("{k}={}", v.0)).collect(),
            }),
            (ResourceKind::Vm, _) => vms::resource(&self.shared.state, &ctx.principal.name, id).await.map_err(|e| {
                tracing::error!(error = %e, "resolving a VM for authorization failed");
                ErrorData::internal_error(format!("internal error: {e}; see the gateway log"), None)
            }),
            _ => Ok(ResourceRef { kind, id: id.to_string(), owner: None, labels: Vec::new() }),
        }
    }

    /// The whole tool-call pipeline, after authentication.
    async fn call(&self, request: CallToolRequestParams, ctx: &CallContext) -> Result<CallToolResult, ErrorData> {
        if self.shared.no_pipeline {
            let tool = ToolName::parse(&request.name).ok_or_else(|| unknown_tool(&request.name))?;
            let call = ToolCall::decode(tool, request.arguments)
                .map_err(|e| ErrorData::invalid_params(e.to_string(), None))?;
            return respond(handlers::dispatch(&self.shared, ctx, call).await);
        }
        let bundle = self.shared.authz.bundle();
        let mut record = CallRecord {
            principal: ctx.principal.name.clone(),
            role: ctx.principal.role.as_str().to_string(),
            transport: ctx.transport.as_str().to_string(),
            session: ctx.session.clone(),
            tool: bounded(&request.name),
            resource: None,
            decision: Decision::Denied,
            args_digest: audit::args_digest(request.arguments.as_ref()),
            args_shape: audit::args_shape(request.arguments.as_ref()),
        };
        // A tool this principal may never call is indistinguishable from one that does not exist.
        let tool = match ToolName::parse(&request.name) {
            Some(tool) if bundle.may_ever_call(&ctx.principal, tool) => tool,
            _ => {
                self.audit(&record).await?;
                return Err(unknown_tool(&request.name));
            }
        };
        if let Err(violations) = self.shared.catalog.validate(tool, request.arguments.as_ref()) {
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
        let spec = self.shared.catalog.spec(tool);
        let resource = self.resource_of(&call, spec.resource, ctx).await?;
        record.resource = Some(format!("{}/{}", resource.kind.as_str(), resource.id));
        if !bundle.is_allowed(&ctx.principal, tool, &resource) {
            self.audit(&record).await?;
            // Do not confirm that someone else's resource exists: answer exactly as for a missing
            // one, in the caller's own words (never the id a name resolved to).
            let named = call.resource_id().unwrap_or(&resource.id);
            let message = match resource.kind {
                ResourceKind::Vm => vms::not_found(named),
                kind => format!("no {} named `{named}`", kind.as_str()),
            };
            return Ok(CallToolResult::error(vec![ContentBlock::text(message)]));
        }
        let _permit = match bundle.limiter.admit(&ctx.principal, spec.class) {
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
        let pinned;
        let ctx = match pinned_vm(&call, &resource) {
            Some(id) => {
                pinned = CallContext { vm: Some(id), ..ctx.clone() };
                &pinned
            }
            None => ctx,
        };
        let started = std::time::Instant::now();
        let answer = respond(handlers::dispatch(&self.shared, ctx, call).await);
        let (outcome, code) = match &answer {
            Ok(result) if result.is_error == Some(true) => (Outcome::ToolError, None),
            Ok(_) => (Outcome::Ok, None),
            Err(e) => (Outcome::Error, Some(i64::from(e.code.0))),
        };
        self.shared.audit.record_outcome(&record, seq, outcome, code, started.elapsed());
        answer
    }
}

/// The existing VM a call was authorized on, by id. A VM named by name is pinned to the one
/// just judged: were it deleted and the name taken by another owner's VM meanwhile, the handler
/// must not act on that one. A VM being created, or one that was not found (no owner), is not.
fn pinned_vm(call: &ToolCall, resource: &ResourceRef) -> Option<String> {
    let existing = resource.kind == ResourceKind::Vm && resource.owner.is_some();
    (existing && !matches!(call, ToolCall::VmCreate(_))).then(|| resource.id.clone())
}

/// The one mapping from a handler outcome to an MCP answer.
fn respond(outcome: Result<Value, ToolError>) -> Result<CallToolResult, ErrorData> {
    match outcome {
        Ok(value) => {
            let mut result = CallToolResult::structured(value);
            // A large result (a file read) goes once, as structured content; its text copy
            // would double the message. Small results keep the copy for text-only clients.
            if let Some(ContentBlock::Text(text)) = result.content.first()
                && text.text.len() > LARGE_RESULT
            {
                let summary = format!("{} bytes of JSON in structuredContent", text.text.len());
                result.content = vec![ContentBlock::text(summary)];
            }
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

/// A caller-supplied name as moat repeats it (in errors and the audit log): at most 128 characters.
fn bounded(name: &str) -> String {
    match name.char_indices().nth(128) {
        Some((cut, _)) => format!("{}…", &name[..cut]),
        None => name.to_string(),
    }
}

/// The answer for a tool that does not exist, and for one the caller may never call.
fn unknown_tool(name: &str) -> ErrorData {
    let name = bounded(name);
    ErrorData::new(
        ErrorCode::INVALID_PARAMS,
        format!("unknown tool `{name}`; tools/list shows the tools you can call"),
        Some(json!({"tool": name})),
    )
}

impl ServerHandler for Gateway {
    fn get_info(&self) -> ServerConfig {
        let capabilities = ServerCapabilities::builder().enable_tools().enable_prompts().enable_resources().build();
        let mut implementation = Implementation::from_build_env();
        implementation.name = "moat".into();
        implementation.title = Some("moat: agent-native infrastructure gateway".into());
        implementation.version = env!("CARGO_PKG_VERSION").into();
        ServerConfig::new(capabilities).with_server_info(implementation).with_instructions(
            "moat gives you typed tools for VMs, workspaces, networks and hosts. Call `whoami` first to see \
             your role, then `node_list`. Arguments are validated against each tool's schema; errors name the \
             JSON path to fix. The `getting_started` prompt explains more.",
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let ctx = self.context(&context).await?;
        let bundle = self.shared.authz.bundle();
        let visible = self
            .shared
            .catalog
            .tools()
            .iter()
            .filter(|t| ToolName::parse(&t.name).is_some_and(|name| bundle.may_ever_call(&ctx.principal, name)))
            .cloned()
            .collect();
        Ok(ListToolsResult::with_all_items(visible))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let ctx = self.context(&context).await?;
        let name = request.name.clone();
        let started = std::time::Instant::now();
        let result = self.call(request, &ctx).await;
        tracing::debug!(tool = %name, principal = %ctx.principal.name, ok = result.is_ok(), elapsed = ?started.elapsed(), "tools/call");
        result.map(CallToolResponse::Complete)
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        let prompts = self
            .shared
            .prompts
            .all()
            .map(|p| {
                let args = p
                    .arguments
                    .iter()
                    .map(|a| {
                        let mut arg = PromptArgument::new(&a.name);
                        arg.description = Some(a.description.clone());
                        arg.required = Some(a.required);
                        arg
                    })
                    .collect();
                let mut prompt = Prompt::new(&p.name, Some(p.description.clone()), Some(args));
                prompt.title = p.title.clone();
                prompt
            })
            .collect();
        Ok(ListPromptsResult::with_all_items(prompts))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        let mut args = BTreeMap::new();
        for (key, value) in request.arguments.unwrap_or_default() {
            let Value::String(text) = value else {
                return Err(ErrorData::invalid_params(
                    format!("prompt argument `{key}` must be a string"),
                    Some(json!({"argument": key})),
                ));
            };
            args.insert(key, text);
        }
        let (prompt, body) = self
            .shared
            .prompts
            .render(&request.name, &args)
            .map_err(|e| ErrorData::invalid_params(e.to_string(), Some(json!({"prompt": request.name}))))?;
        let result = GetPromptResult::new(vec![PromptMessage::new_text(MessageRole::User, body)])
            .with_description(prompt.description.clone());
        Ok(result.into())
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        let status = Resource::new(STATUS_URI, "status")
            .with_title("Gateway status")
            .with_description("Version, database schema version and the nodes this gateway knows, as JSON.");
        let mut status = status;
        status.mime_type = Some("application/json".into());
        Ok(ListResourcesResult::with_all_items(vec![status]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        if request.uri != STATUS_URI {
            return Err(ErrorData::resource_not_found(
                format!("no resource `{}`; resources/list shows what exists", request.uri),
                None,
            ));
        }
        let state = &self.shared.state;
        let internal =
            |e: crate::state::StateError| ErrorData::internal_error(format!("reading status failed: {e}"), None);
        let nodes: Vec<Value> = state
            .nodes()
            .await
            .map_err(internal)?
            .into_iter()
            .map(|n| {
                json!({"name": n.name, "address": n.address, "last_seen": n.last_seen, "last_error": n.last_error,
                           "reachable": !n.is_unreachable(), "missed_heartbeats": n.missed_heartbeats})
            })
            .collect();
        let body = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "schema_version": state.schema_version().await.map_err(internal)?,
            "nodes": nodes,
        });
        let contents = ResourceContents::TextResourceContents {
            uri: STATUS_URI.into(),
            mime_type: Some("application/json".into()),
            text: body.to_string(),
            meta: None,
        };
        Ok(ReadResourceResult::new(vec![contents]).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(pinned_vm(&exec, &vm("vm-a1", Some("alice"))).as_deref(), Some("vm-a1"));
        let stop = call(ToolName::VmStop, json!({"vm": "web"}));
        assert_eq!(pinned_vm(&stop, &vm("vm-a1", Some("alice"))).as_deref(), Some("vm-a1"));
        assert_eq!(pinned_vm(&stop, &vm("web", None)), None, "not found: the handler says so");
        let create = call(ToolName::VmCreate, json!({"name": "web", "vcpus": 1, "memory_mib": 256}));
        assert_eq!(pinned_vm(&create, &vm("web", Some("alice"))), None, "a new VM has no id yet");
        let node = call(ToolName::NodeInspect, json!({"node": "n1"}));
        let n1 = ResourceRef { kind: ResourceKind::Node, id: "n1".into(), owner: None, labels: Vec::new() };
        assert_eq!(pinned_vm(&node, &n1), None);
    }
}

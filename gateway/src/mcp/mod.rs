//! The MCP server every transport serves: authenticates each request, lists
//! tools, prompts and resources, and hands each `tools/call` to the
//! [`pipeline`]. Transports: [`stdio`] and [`http`]; the tool list and
//! argument validation: [`catalog`]; prompt files: [`prompts`].

pub mod catalog;
pub mod http;
mod pipeline;
pub mod portal;
pub mod prompts;
pub mod stdio;

pub use pipeline::{RATE_LIMITED, UNAUTHENTICATED};

use std::collections::BTreeMap;
use std::sync::Arc;

use moat_tools::ToolName;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, ErrorCode, ErrorData, GetPromptRequestParams, GetPromptResponse,
    GetPromptResult, Implementation, ListPromptsResult, ListResourcesResult, ListToolsResult, PaginatedRequestParams,
    Prompt, PromptArgument, PromptMessage, ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult,
    Resource, ResourceContents, Role as MessageRole, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, ServerHandler};
use serde_json::{Value, json};

use catalog::Catalog;
use prompts::Prompts;

use crate::app::{CallContext, Shared};
use crate::guest::Progress;
use crate::principal::{Principal, Transport};
use crate::security::resource::ResourceRef;
use crate::store::StateError;
use crate::store::audit::{CallRecord, Decision};

const STATUS_URI: &str = "moat://status";

/// How the caller of a connection (stdio, or a portal's vsock session) is identified; HTTP
/// resolves its caller per request instead.
#[derive(Debug, Clone)]
pub enum Identity {
    /// The local operator named in config.
    Operator(Principal),
    /// An API key from MOAT_API_KEY, re-checked on every call so revocation takes effect at once.
    Key(String),
    /// A portal VM, as the node its connection came through named it; re-checked on every call,
    /// so a deleted VM or agent loses access at once.
    Portal { vm: String, node: String },
}

/// The MCP side of a gateway: the calls' shared state plus the tool catalog and prompts.
pub struct Server {
    pub shared: Arc<Shared>,
    pub catalog: Catalog,
    pub prompts: Prompts,
    /// The pipeline bench's comparison server only: validate and dispatch, nothing else.
    #[cfg(feature = "bench-no-pipeline")]
    pub no_pipeline: bool,
}

/// One MCP server instance; cheap to clone (one per HTTP session or stdio connection).
#[derive(Clone)]
pub struct Gateway {
    server: Arc<Server>,
    transport: Transport,
    /// The caller of a stdio or vsock connection; HTTP resolves it per request from the bearer key.
    caller: Option<Identity>,
}

impl Gateway {
    pub fn stdio(server: Arc<Server>, identity: Identity) -> Gateway {
        Gateway { server, transport: Transport::Stdio, caller: Some(identity) }
    }

    /// A portal VM's session, which node `node` said came from VM `vm`.
    pub fn portal(server: Arc<Server>, vm: &str, node: &str) -> Gateway {
        let identity = Identity::Portal { vm: vm.to_string(), node: node.to_string() };
        Gateway { server, transport: Transport::Vsock, caller: Some(identity) }
    }

    pub fn http(server: Arc<Server>) -> Gateway {
        Gateway { server, transport: Transport::Http, caller: None }
    }

    /// Authenticates the caller of this request.
    async fn context(&self, ctx: &RequestContext<RoleServer>) -> Result<CallContext, ErrorData> {
        let refused = |message: String| ErrorData::new(ErrorCode(UNAUTHENTICATED), message, None);
        let parts = ctx.extensions.get::<axum::http::request::Parts>();
        let (principal, session) = match (&self.caller, parts) {
            (Some(Identity::Operator(p)), _) => (p.clone(), None),
            (Some(Identity::Key(key)), _) => {
                let principal =
                    self.server.shared.keys.check(key).map_err(|e| refused(format!("MOAT_API_KEY refused: {e}")))?;
                (principal, None)
            }
            (Some(Identity::Portal { vm, node }), _) => {
                let principal = crate::tools::agents::portal_principal(&self.server.shared, vm, node)
                    .await
                    .map_err(|e| refused(e.to_string()))?;
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
            progress: ctx.meta.get_progress_token().map(|token| Progress { peer: ctx.peer.clone(), token }),
            vm: None,
        })
    }
}

impl Gateway {
    /// `moat://status` shows the cluster's nodes: whoever may list nodes may read it.
    fn may_read_status(&self, ctx: &CallContext) -> bool {
        self.server.shared.authz.bundle().is_allowed(&ctx.principal, ToolName::NodeList, &ResourceRef::cluster())
    }

    /// The audit record of a `resources/read`.
    fn resource_record(&self, ctx: &CallContext, uri: &str, decision: Decision) -> CallRecord {
        let mut record = pipeline::call_record(ctx, "resources/read".into(), None);
        record.resource = Some(format!("resource/{}", pipeline::bounded(uri)));
        record.decision = decision;
        record
    }
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
        let bundle = self.server.shared.authz.bundle();
        let visible = self
            .server
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
        context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        self.context(&context).await?;
        let prompts = self
            .server
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
        context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        self.context(&context).await?;
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
            .server
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
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        let ctx = self.context(&context).await?;
        if !self.may_read_status(&ctx) {
            return Ok(ListResourcesResult::with_all_items(Vec::new()));
        }
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
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let ctx = self.context(&context).await?;
        // Audited like a tool call; a resource the caller may not read answers as one that does
        // not exist.
        let allowed = request.uri == STATUS_URI && self.may_read_status(&ctx);
        let decision = if allowed { Decision::Allowed } else { Decision::Denied };
        let record = self.resource_record(&ctx, &request.uri, decision);
        self.audit(&record).await?;
        if !allowed {
            return Err(ErrorData::resource_not_found(
                format!("no resource `{}`; resources/list shows what exists", pipeline::bounded(&request.uri)),
                None,
            ));
        }
        let state = &self.server.shared.state;
        let internal = |e: StateError| ErrorData::internal_error(format!("reading status failed: {e}"), None);
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

//! The MCP server every transport serves: lists tools, prompts and
//! resources, and runs each `tools/call` through one pipeline
//! (resolve principal → look up tool → validate → decode → dispatch → map
//! the outcome). Errors become MCP answers in exactly one place,
//! [`respond`].

use std::collections::BTreeMap;
use std::sync::Arc;

use moat_tools::{ToolCall, ToolName};
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

use crate::catalog::{self, Catalog};
use crate::handlers::{self, ToolError};
use crate::node_client::NodeConnector;
use crate::principal::{Principal, Transport};
use crate::prompts::Prompts;
use crate::state::State;

const STATUS_URI: &str = "moat://status";

/// What every connection shares: state, node connections, the tool catalog, prompts.
pub struct Shared {
    pub state: State,
    pub nodes: NodeConnector,
    pub catalog: Catalog,
    pub prompts: Prompts,
}

/// Who is calling and how, resolved per call.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub principal: Principal,
    pub transport: Transport,
    pub protocol_version: Option<String>,
    pub session: Option<String>,
}

/// One MCP server instance; cheap to clone (one per HTTP session or stdio connection).
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
    transport: Transport,
    /// The principal of a stdio connection; HTTP resolves it per request.
    stdio_principal: Principal,
}

impl Gateway {
    pub fn stdio(shared: Arc<Shared>, operator: Principal) -> Gateway {
        Gateway { shared, transport: Transport::Stdio, stdio_principal: operator }
    }

    pub fn http(shared: Arc<Shared>) -> Gateway {
        Gateway { shared, transport: Transport::Http, stdio_principal: Principal::anonymous() }
    }

    fn context(&self, ctx: &RequestContext<RoleServer>) -> CallContext {
        let parts = ctx.extensions.get::<axum::http::request::Parts>();
        let (principal, session) = match self.transport {
            Transport::Stdio => (self.stdio_principal.clone(), None),
            Transport::Http => {
                let session =
                    parts.and_then(|p| p.headers.get("mcp-session-id")).and_then(|v| v.to_str().ok()).map(String::from);
                (Principal::anonymous(), session)
            }
        };
        CallContext {
            principal,
            transport: self.transport,
            protocol_version: ctx.protocol_version().map(|v| v.to_string()),
            session,
        }
    }

    /// The whole tool-call pipeline.
    async fn call(&self, request: CallToolRequestParams, ctx: &CallContext) -> Result<CallToolResult, ErrorData> {
        let Some(tool) = ToolName::parse(&request.name) else {
            return Err(unknown_tool(&request.name));
        };
        if let Err(violations) = self.shared.catalog.validate(tool, request.arguments.as_ref()) {
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
        respond(handlers::dispatch(&self.shared, ctx, call).await)
    }
}

/// The one mapping from a handler outcome to an MCP answer.
fn respond(outcome: Result<Value, ToolError>) -> Result<CallToolResult, ErrorData> {
    match outcome {
        Ok(value) => Ok(CallToolResult::structured(value)),
        Err(ToolError::NotFound(message)) => Ok(CallToolResult::error(vec![ContentBlock::text(message)])),
        Err(ToolError::Internal(source)) => {
            tracing::error!(error = %source, cause = ?std::error::Error::source(&source), "tool failed");
            Err(ErrorData::internal_error(format!("internal error: {source}; see the gateway log"), None))
        }
    }
}

/// The answer for a tool that does not exist (and, with RBAC, for one the caller may not see).
fn unknown_tool(name: &str) -> ErrorData {
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
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.shared.catalog.tools().to_vec()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let ctx = self.context(&context);
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
            .map(
                |n| json!({"name": n.name, "address": n.address, "last_seen": n.last_seen, "last_error": n.last_error}),
            )
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

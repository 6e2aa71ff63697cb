//! The agent's MCP server (vsock port 200): file and process tools. Messages
//! may be up to [`MAX_MESSAGE`] long, enough for a 32 MiB file in base64. Errors a
//! caller can fix come back as `isError` results with a message saying what
//! to change; malformed arguments are JSON-RPC invalid-params errors.

use std::sync::Arc;

use moat_tools::JsonObject;
use moat_tools::guest::{ExecIdInput, ExecInput, ExecOutputInput, GuestTool, PathInput};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ErrorData, Implementation, ListToolsResult,
    PaginatedRequestParams, ProgressNotificationParam, ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, ServerHandler};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::exec::{self, Jobs};
use crate::files;

pub use moat_tools::guest::MAX_MESSAGE;

#[derive(Clone, Default)]
pub struct GuestServer {
    jobs: Arc<Jobs>,
}

impl GuestServer {
    pub fn new(jobs: Arc<Jobs>) -> GuestServer {
        GuestServer { jobs }
    }
}

fn decode<T: DeserializeOwned>(args: Option<JsonObject>) -> Result<T, ErrorData> {
    serde_json::from_value(Value::Object(args.unwrap_or_default()))
        .map_err(|e| ErrorData::invalid_params(format!("invalid arguments: {e}"), None))
}

fn answer<T: Serialize>(result: Result<T, String>) -> Result<CallToolResult, ErrorData> {
    match result {
        Ok(value) => Ok(CallToolResult::structured(serde_json::to_value(value).expect("outputs serialize"))),
        Err(message) => Ok(CallToolResult::error(vec![ContentBlock::text(message)])),
    }
}

impl ServerHandler for GuestServer {
    fn get_info(&self) -> ServerConfig {
        let mut implementation = Implementation::from_build_env();
        implementation.name = "moat-guest".into();
        implementation.version = env!("CARGO_PKG_VERSION").into();
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_server_info(implementation)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let tools = GuestTool::ALL
            .into_iter()
            .map(|t| {
                Tool::new(t.name(), t.description(), Arc::new(t.input_schema()))
                    .with_raw_output_schema(Arc::new(t.output_schema()))
                    .with_annotations(ToolAnnotations::new().read_only(t.read_only()))
            })
            .collect();
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let args = request.arguments;
        let Some(tool) = GuestTool::parse(&request.name) else {
            return Err(ErrorData::invalid_params(format!("unknown tool `{}`", request.name), None));
        };
        let result = match tool {
            GuestTool::FileRead => {
                // Up to 32 MiB: send it once, as structured content, with a one-line text summary
                // instead of a second serialized copy.
                let read = files::read(&decode(args)?);
                let summary = read.as_ref().ok().map(|r| {
                    format!("read {} bytes of {} at offset {} ({:?})", r.length, r.path, r.offset, r.encoding)
                });
                answer(read).map(|mut result| {
                    if let Some(summary) = summary {
                        result.content = vec![ContentBlock::text(summary)];
                    }
                    result
                })
            }
            GuestTool::FileWrite => answer(files::write(&decode(args)?)),
            GuestTool::FileDelete => answer(files::delete(&decode::<PathInput>(args)?.path)),
            GuestTool::FileList => answer(files::list(&decode::<PathInput>(args)?.path)),
            GuestTool::FileStat => answer(files::stat(&decode::<PathInput>(args)?.path)),
            GuestTool::Exec => {
                let input: ExecInput = decode(args)?;
                let live = context.meta.get_progress_token().map(|token| {
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(exec::Pipe, String)>();
                    let peer = context.peer.clone();
                    tokio::spawn(async move {
                        let mut n = 0.0;
                        while let Some((pipe, chunk)) = rx.recv().await {
                            n += 1.0;
                            let mut note = ProgressNotificationParam::new(token.clone(), n);
                            note.message = Some(format!("{}: {chunk}", pipe.as_str()));
                            let _ = peer.notify_progress(note).await;
                        }
                    });
                    tx
                });
                answer(exec::run(&input, live, context.ct.clone()).await)
            }
            GuestTool::ExecStart => answer(self.jobs.start(&decode(args)?)),
            GuestTool::ExecStatus => answer(self.jobs.status(&decode::<ExecIdInput>(args)?.id)),
            GuestTool::ExecOutput => {
                let input: ExecOutputInput = decode(args)?;
                answer(self.jobs.output(&input.id, input.stdout_offset.unwrap_or(0), input.stderr_offset.unwrap_or(0)))
            }
            GuestTool::ExecKill => answer(self.jobs.kill(&decode::<ExecIdInput>(args)?.id).await),
        };
        result.map(CallToolResponse::Complete)
    }
}

//! The agent's MCP server (vsock port 200): file and process tools. Messages
//! may be up to [`MAX_MESSAGE`] long, enough for a 32 MiB file in base64. Errors a
//! caller can fix come back as `isError` results with a message saying what
//! to change; malformed arguments are JSON-RPC invalid-params errors.

use std::sync::Arc;

use moat_tools::JsonObject;
use moat_tools::guest::{ExecIdInput, ExecInput, ExecOutputInput, FileReadInput, FileWriteInput, GuestTool, PathInput};
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

/// One tools/call, decoded: which tool and its typed arguments.
#[derive(Debug)]
pub enum Call {
    FileRead(FileReadInput),
    FileWrite(FileWriteInput),
    FileDelete(PathInput),
    FileList(PathInput),
    FileStat(PathInput),
    Exec(ExecInput),
    ExecStart(ExecInput),
    ExecStatus(ExecIdInput),
    ExecOutput(ExecOutputInput),
    ExecKill(ExecIdInput),
}

/// Decodes a tools/call's name and arguments; nothing has run yet. An unknown tool or arguments
/// that do not fit its input are invalid-params errors.
pub fn parse_call(name: &str, args: Option<JsonObject>) -> Result<Call, ErrorData> {
    let Some(tool) = GuestTool::parse(name) else {
        return Err(ErrorData::invalid_params(format!("unknown tool `{name}`"), None));
    };
    Ok(match tool {
        GuestTool::FileRead => Call::FileRead(decode(args)?),
        GuestTool::FileWrite => Call::FileWrite(decode(args)?),
        GuestTool::FileDelete => Call::FileDelete(decode(args)?),
        GuestTool::FileList => Call::FileList(decode(args)?),
        GuestTool::FileStat => Call::FileStat(decode(args)?),
        GuestTool::Exec => Call::Exec(decode(args)?),
        GuestTool::ExecStart => Call::ExecStart(decode(args)?),
        GuestTool::ExecStatus => Call::ExecStatus(decode(args)?),
        GuestTool::ExecOutput => Call::ExecOutput(decode(args)?),
        GuestTool::ExecKill => Call::ExecKill(decode(args)?),
    })
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
        let result = match parse_call(&request.name, request.arguments)? {
            Call::FileRead(input) => {
                // Up to 32 MiB: send it once, as structured content, with a one-line text summary
                // instead of a second serialized copy.
                let read = files::read(&input);
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
            Call::FileWrite(input) => answer(files::write(&input)),
            Call::FileDelete(input) => answer(files::delete(&input.path)),
            Call::FileList(input) => answer(files::list(&input.path)),
            Call::FileStat(input) => answer(files::stat(&input.path)),
            Call::Exec(input) => {
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
            Call::ExecStart(input) => answer(self.jobs.start(&input)),
            Call::ExecStatus(input) => answer(self.jobs.status(&input.id)),
            Call::ExecOutput(input) => {
                answer(self.jobs.output(&input.id, input.stdout_offset.unwrap_or(0), input.stderr_offset.unwrap_or(0)))
            }
            Call::ExecKill(input) => answer(self.jobs.kill(&input.id).await),
        };
        result.map(CallToolResponse::Complete)
    }
}

//! The agent's MCP server (vsock port 200): file and process tools. Messages
//! may be up to [`MAX_MESSAGE`] long, enough for a 32 MiB file in base64. Errors a
//! caller can fix come back as `isError` results with a message saying what
//! to change; malformed arguments are JSON-RPC invalid-params errors.

use std::sync::Arc;

use moat_tools::guest::{
    ExecIdInput, ExecInput, ExecOutput, ExecOutputInput, ExecOutputOutput, ExecStartOutput, ExecStatusOutput,
    FileDeleteOutput, FileListOutput, FileReadInput, FileReadOutput, FileStat, FileWriteInput, FileWriteOutput,
    PathInput,
};
use moat_tools::{JsonObject, schema_object};
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

/// Longest JSON-RPC message (line) accepted or sent: a 32 MiB file in base64 plus framing.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

#[derive(Clone, Default)]
pub struct GuestServer {
    jobs: Arc<Jobs>,
}

impl GuestServer {
    pub fn new(jobs: Arc<Jobs>) -> GuestServer {
        GuestServer { jobs }
    }
}

struct Spec {
    name: &'static str,
    description: &'static str,
    read_only: bool,
    input: JsonObject,
    output: JsonObject,
}

fn spec<I: rmcp::schemars::JsonSchema, O: rmcp::schemars::JsonSchema>(
    name: &'static str,
    description: &'static str,
    read_only: bool,
) -> Spec {
    Spec { name, description, read_only, input: schema_object::<I>(), output: schema_object::<O>() }
}

fn specs() -> Vec<Spec> {
    vec![
        spec::<FileReadInput, FileReadOutput>(
            "file_read",
            "Reads a file (text, or base64 for binary), optionally a byte range.",
            true,
        ),
        spec::<FileWriteInput, FileWriteOutput>(
            "file_write",
            "Writes a file atomically (write, fsync, rename) and returns its SHA-256.",
            false,
        ),
        spec::<PathInput, FileDeleteOutput>("file_delete", "Deletes a file or an empty directory.", false),
        spec::<PathInput, FileListOutput>(
            "file_list",
            "Lists a directory with each entry's kind, size, mode and mtime.",
            true,
        ),
        spec::<PathInput, FileStat>("file_stat", "Describes one path: kind, size, mode, mtime.", true),
        spec::<ExecInput, ExecOutput>(
            "exec",
            "Runs a process to completion (argv, or command with /bin/sh -c); output is streamed as progress while it runs.",
            false,
        ),
        spec::<ExecInput, ExecStartOutput>(
            "exec_start",
            "Starts a background process and returns its id; it outlives this connection.",
            false,
        ),
        spec::<ExecIdInput, ExecStatusOutput>(
            "exec_status",
            "Whether a background process runs, and how it ended.",
            true,
        ),
        spec::<ExecOutputInput, ExecOutputOutput>(
            "exec_output",
            "A background process's output from given byte offsets.",
            true,
        ),
        spec::<ExecIdInput, ExecStatusOutput>("exec_kill", "Kills a background process's whole process group.", false),
    ]
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
        let tools = specs()
            .into_iter()
            .map(|s| {
                Tool::new(s.name, s.description, Arc::new(s.input))
                    .with_raw_output_schema(Arc::new(s.output))
                    .with_annotations(ToolAnnotations::new().read_only(s.read_only))
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
        let result = match request.name.as_ref() {
            "file_read" => {
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
            "file_write" => answer(files::write(&decode(args)?)),
            "file_delete" => answer(files::delete(&decode::<PathInput>(args)?.path)),
            "file_list" => answer(files::list(&decode::<PathInput>(args)?.path)),
            "file_stat" => answer(files::stat(&decode::<PathInput>(args)?.path)),
            "exec" => {
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
            "exec_start" => answer(self.jobs.start(&decode(args)?)),
            "exec_status" => answer(self.jobs.status(&decode::<ExecIdInput>(args)?.id)),
            "exec_output" => {
                let input: ExecOutputInput = decode(args)?;
                answer(self.jobs.output(&input.id, input.stdout_offset.unwrap_or(0), input.stderr_offset.unwrap_or(0)))
            }
            "exec_kill" => answer(self.jobs.kill(&decode::<ExecIdInput>(args)?.id).await),
            other => Err(ErrorData::invalid_params(format!("unknown tool `{other}`"), None)),
        };
        result.map(CallToolResponse::Complete)
    }
}

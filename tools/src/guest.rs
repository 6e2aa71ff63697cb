//! The tools `moat-guest` serves inside each VM (MCP on vsock port 200): files
//! and processes. The gateway's `vm_*` guest tools carry the same arguments
//! plus `vm`. Limits are part of the contract so both sides agree on them.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Longest path accepted, in bytes (Linux's PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Most bytes one `file_read` returns or one `file_write` writes.
pub const MAX_FILE_BYTES: u64 = 32 * 1024 * 1024;
/// Most bytes of stdout and of stderr an `exec` result carries; the rest is flagged truncated.
pub const MAX_OUTPUT_BYTES: usize = 1024 * 1024;
/// Longest an `exec` may run.
pub const MAX_EXEC_SECONDS: u32 = 3600;

/// How file content travels in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// UTF-8 text.
    Utf8,
    /// Any bytes, base64 (standard alphabet, padded).
    Base64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileReadInput {
    /// Absolute path inside the VM.
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
    /// Byte offset to start at [default: 0].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Most bytes to return [default and maximum: 32 MiB].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 33554432))]
    pub length: Option<u64>,
    /// utf8 or base64 [default: utf8 when the bytes are valid UTF-8, else base64].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FileReadOutput {
    pub path: String,
    pub content: String,
    pub encoding: Encoding,
    /// The file's size; with `offset` and the bytes returned, says whether there is more.
    pub size: u64,
    pub offset: u64,
    /// Bytes returned.
    pub length: u64,
    pub eof: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileWriteInput {
    /// Absolute path inside the VM. The file is replaced atomically (write, fsync, rename).
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
    pub content: String,
    /// How `content` is encoded [default: utf8].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
    /// Permission bits, e.g. 420 (0o644) [default: 0o644].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 4095))]
    pub mode: Option<u32>,
    /// Create missing parent directories [default: false].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_dirs: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FileWriteOutput {
    pub path: String,
    pub bytes_written: u64,
    /// SHA-256 of what was written, hex.
    pub sha256: String,
}

/// Names one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PathInput {
    /// Absolute path inside the VM.
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FileStat {
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Seconds since the Unix epoch.
    pub modified_unix: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FileListOutput {
    pub path: String,
    /// Sorted by name; at most 10,000.
    pub entries: Vec<FileStat>,
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FileDeleteOutput {
    pub path: String,
    pub deleted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecInput {
    /// Program and arguments, run directly (no shell). Give this or `command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub argv: Option<Vec<String>>,
    /// A shell command line, run with `/bin/sh -c`. Give this or `argv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub command: Option<String>,
    /// Working directory (absolute) [default: /].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Text fed to the process's standard input, then closed [default: empty].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Seconds before the process group is killed [default: 60; background processes: none].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_s: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ExecOutput {
    /// Exit status when the process exited; null when a signal ended it.
    pub exit_code: Option<i32>,
    /// The signal that ended it, e.g. 9.
    pub signal: Option<i32>,
    /// True when moat killed it because `timeout_s` passed.
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    /// True when output beyond 1 MiB was dropped.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ExecStartOutput {
    /// Pass to exec_status, exec_output and exec_kill; valid until the agent restarts.
    pub id: String,
    pub pid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecIdInput {
    #[schemars(length(min = 1, max = 64))]
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecOutputInput {
    #[schemars(length(min = 1, max = 64))]
    pub id: String,
    /// Skip this many bytes of stdout (the `stdout_next` of the previous call) [default: 0].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_offset: Option<u64>,
    /// Skip this many bytes of stderr [default: 0].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_offset: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ExecStatusOutput {
    pub id: String,
    pub pid: u32,
    pub running: bool,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Output so far, in bytes.
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ExecOutputOutput {
    pub id: String,
    pub running: bool,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Output from the offsets asked for (lossy UTF-8), at most 1 MiB each.
    pub stdout: String,
    pub stderr: String,
    /// Offsets to pass next time.
    pub stdout_next: u64,
    pub stderr_next: u64,
    /// True when the offset asked for is older than the 1 MiB kept per stream.
    pub lost: bool,
}

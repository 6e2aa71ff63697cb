//! The guest contract: the tools `moat-guest` serves inside each VM (MCP on
//! vsock port [`MCP_PORT`]): files and processes, one [`GuestTool`] each with
//! its one description. The gateway's `vm_*` guest tools are the same tools
//! with their inputs wrapped in [`InVm`] (the same schema plus `vm`). Ports,
//! limits and the message cap are part of the contract so both sides agree.

use std::borrow::Cow;
use std::collections::BTreeMap;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::{JsonObject, schema_object};

/// The guest agent's control channel (hello, version, ping) inside every VM.
pub const CONTROL_PORT: u32 = 100;
/// The guest agent's MCP server inside every VM.
pub const MCP_PORT: u32 = 200;
/// The host port a portal's `moat-guest mcp` dials (guest → host, CID 2): the node hands the
/// connection to the gateway as an MCP session of the VM's own identity.
pub const UPLINK_PORT: u32 = 300;
/// The host's vsock context id, as a guest dials it.
pub const HOST_CID: u32 = 2;
/// Longest MCP message (one JSON-RPC line) either side sends: a 32 MiB file in base64 plus framing.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

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
    /// The content; never written to moat's audit log.
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
    /// Text fed to the process's standard input, then closed [default: empty]; never written to
    /// moat's audit log.
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
    /// The id exec_start (vm_exec_start) returned.
    #[schemars(length(min = 1, max = 64))]
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecOutputInput {
    /// The id exec_start (vm_exec_start) returned.
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

/// Every tool the guest agent serves. The gateway serves each (but `file_stat`) as `vm_<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestTool {
    Exec,
    ExecStart,
    ExecStatus,
    ExecOutput,
    ExecKill,
    FileRead,
    FileWrite,
    FileDelete,
    FileList,
    FileStat,
}

impl GuestTool {
    pub const ALL: [GuestTool; 10] = [
        GuestTool::Exec,
        GuestTool::ExecStart,
        GuestTool::ExecStatus,
        GuestTool::ExecOutput,
        GuestTool::ExecKill,
        GuestTool::FileRead,
        GuestTool::FileWrite,
        GuestTool::FileDelete,
        GuestTool::FileList,
        GuestTool::FileStat,
    ];

    /// The name the guest agent serves it under.
    pub const fn name(self) -> &'static str {
        match self {
            GuestTool::Exec => "exec",
            GuestTool::ExecStart => "exec_start",
            GuestTool::ExecStatus => "exec_status",
            GuestTool::ExecOutput => "exec_output",
            GuestTool::ExecKill => "exec_kill",
            GuestTool::FileRead => "file_read",
            GuestTool::FileWrite => "file_write",
            GuestTool::FileDelete => "file_delete",
            GuestTool::FileList => "file_list",
            GuestTool::FileStat => "file_stat",
        }
    }

    pub fn parse(name: &str) -> Option<GuestTool> {
        GuestTool::ALL.into_iter().find(|t| t.name() == name)
    }

    /// What it does, for a model: the one description both the guest agent and the gateway's
    /// `vm_*` tool serve.
    pub const fn description(self) -> &'static str {
        match self {
            GuestTool::Exec => {
                "Runs a process inside the VM and waits for it: exit code or signal, stdout and stderr \
                 (1 MiB each, truncation flagged), whether the timeout (default 60 s) killed it. Give argv \
                 (run directly) or command (run with /bin/sh -c). Output streams as progress notifications \
                 while it runs; cancelling the call kills the process group."
            }
            GuestTool::ExecStart => {
                "Starts a background process inside the VM and returns an id at once; the process keeps \
                 running after this connection closes. Poll it with exec_status and exec_output and stop it \
                 with exec_kill (vm_exec_status, vm_exec_output and vm_exec_kill through moat)."
            }
            GuestTool::ExecStatus => "Whether a background process started by exec_start still runs, and how it ended.",
            GuestTool::ExecOutput => {
                "A background process's output from byte offsets; pass back stdout_next and stderr_next to \
                 read only what is new."
            }
            GuestTool::ExecKill => "Kills a background process and everything it started (its process group).",
            GuestTool::FileRead => {
                "Reads a file inside the VM: text, or base64 for binary; up to 32 MiB per call, with offset \
                 and length for larger files."
            }
            GuestTool::FileWrite => {
                "Writes a file inside the VM atomically (a reader sees the old or the new file, never half), \
                 up to 32 MiB, and returns its SHA-256."
            }
            GuestTool::FileDelete => "Deletes a file or an empty directory inside the VM.",
            GuestTool::FileList => "Lists a directory inside the VM with each entry's kind, size, mode and mtime.",
            GuestTool::FileStat => "Describes one path inside the VM: kind, size, mode and mtime.",
        }
    }

    /// Whether it only reads (processes it runs may do anything, so exec tools are not).
    pub const fn read_only(self) -> bool {
        matches!(
            self,
            GuestTool::ExecStatus
                | GuestTool::ExecOutput
                | GuestTool::FileRead
                | GuestTool::FileList
                | GuestTool::FileStat
        )
    }

    /// Whether its calls share a VM's kept session (file transfers open their own, so the agent
    /// frees a large transfer's buffers when it ends).
    pub const fn keeps_session(self) -> bool {
        !matches!(self, GuestTool::FileRead | GuestTool::FileWrite)
    }

    /// The input schema as the guest agent serves it.
    pub fn input_schema(self) -> JsonObject {
        match self {
            GuestTool::Exec | GuestTool::ExecStart => schema_object::<ExecInput>(),
            GuestTool::ExecStatus | GuestTool::ExecKill => schema_object::<ExecIdInput>(),
            GuestTool::ExecOutput => schema_object::<ExecOutputInput>(),
            GuestTool::FileRead => schema_object::<FileReadInput>(),
            GuestTool::FileWrite => schema_object::<FileWriteInput>(),
            GuestTool::FileDelete | GuestTool::FileList | GuestTool::FileStat => schema_object::<PathInput>(),
        }
    }

    pub fn output_schema(self) -> JsonObject {
        match self {
            GuestTool::Exec => schema_object::<ExecOutput>(),
            GuestTool::ExecStart => schema_object::<ExecStartOutput>(),
            GuestTool::ExecStatus | GuestTool::ExecKill => schema_object::<ExecStatusOutput>(),
            GuestTool::ExecOutput => schema_object::<ExecOutputOutput>(),
            GuestTool::FileRead => schema_object::<FileReadOutput>(),
            GuestTool::FileWrite => schema_object::<FileWriteOutput>(),
            GuestTool::FileDelete => schema_object::<FileDeleteOutput>(),
            GuestTool::FileList => schema_object::<FileListOutput>(),
            GuestTool::FileStat => schema_object::<FileStat>(),
        }
    }
}

/// A guest tool's input addressed to one VM: `{"vm": ..., <the guest tool's own arguments>}`.
/// Its schema is the inner schema with `vm` added (required, a DNS label); the guest agent
/// receives exactly the inner arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InVm<T> {
    /// The VM's id or name.
    pub vm: String,
    pub args: T,
}

impl<T: Serialize> Serialize for InVm<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = match serde_json::to_value(&self.args).map_err(serde::ser::Error::custom)? {
            Value::Object(map) => map,
            _ => return Err(serde::ser::Error::custom("guest tool inputs are objects")),
        };
        map.insert("vm".into(), Value::String(self.vm.clone()));
        map.serialize(serializer)
    }
}

impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for InVm<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<InVm<T>, D::Error> {
        let mut map = Map::<String, Value>::deserialize(deserializer)?;
        let vm = match map.remove("vm") {
            Some(Value::String(vm)) => vm,
            Some(_) => return Err(D::Error::custom("`vm` must be a string")),
            None => return Err(D::Error::missing_field("vm")),
        };
        let args = serde_json::from_value(Value::Object(map)).map_err(D::Error::custom)?;
        Ok(InVm { vm, args })
    }
}

impl<T: JsonSchema> JsonSchema for InVm<T> {
    fn schema_name() -> Cow<'static, str> {
        format!("Vm{}", T::schema_name()).into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let mut schema = T::json_schema(generator);
        let vm = json_schema!({
            "description": "The VM's id or name.",
            "type": "string",
            "minLength": 1,
            "maxLength": 63,
            "pattern": crate::names::DNS_LABEL,
        });
        if let Some(object) = schema.as_object_mut() {
            let properties = object.entry("properties").or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(properties) = properties {
                properties.insert("vm".into(), vm.to_value());
            }
            let required = object.entry("required").or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(required) = required {
                required.insert(0, Value::String("vm".into()));
            }
        }
        schema
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for tool in GuestTool::ALL {
            assert_eq!(GuestTool::parse(tool.name()), Some(tool));
        }
    }

    #[test]
    fn in_vm_is_the_inner_input_plus_vm() {
        let input: InVm<PathInput> = serde_json::from_value(serde_json::json!({"vm": "dev", "path": "/a"})).unwrap();
        assert_eq!(input, InVm { vm: "dev".into(), args: PathInput { path: "/a".into() } });
        assert_eq!(serde_json::to_value(&input).unwrap(), serde_json::json!({"vm": "dev", "path": "/a"}));
        for bad in [
            serde_json::json!({"path": "/a"}),
            serde_json::json!({"vm": 1, "path": "/a"}),
            serde_json::json!({"vm": "dev", "path": "/a", "extra": 1}),
            serde_json::json!({"vm": "dev"}),
        ] {
            assert!(serde_json::from_value::<InVm<PathInput>>(bad.clone()).is_err(), "{bad}");
        }
        let schema = schema_object::<InVm<PathInput>>();
        assert_eq!(schema["required"], serde_json::json!(["vm", "path"]));
        assert_eq!(schema["additionalProperties"], Value::Bool(false));
        assert_eq!(schema["properties"]["vm"]["pattern"], crate::names::DNS_LABEL);
        assert_eq!(schema["properties"]["path"], schema_object::<PathInput>()["properties"]["path"]);
    }
}

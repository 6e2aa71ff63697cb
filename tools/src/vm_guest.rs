//! Tools that act inside a VM through its guest agent: processes and files.
//! Each takes `vm` plus the guest tool's own arguments (see [`crate::guest`])
//! and returns the guest tool's output.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::guest::{
    Encoding, ExecIdInput, ExecInput, ExecOutput, ExecOutputInput, ExecOutputOutput, ExecStartOutput, ExecStatusOutput,
    FileDeleteOutput, FileListOutput, FileReadInput, FileReadOutput, FileWriteInput, FileWriteOutput, PathInput,
};
use crate::{ActionGroup, Hints, ResourceKind, ToolClass, ToolName, ToolSpec, schema_object};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmExecInput {
    /// The VM's id or name.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub vm: String,
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
    /// Text fed to standard input, then closed. Never written to the audit log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Seconds before the process group is killed [default: 60 for vm_exec; none for vm_exec_start].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_s: Option<u32>,
}

impl From<VmExecInput> for ExecInput {
    fn from(i: VmExecInput) -> ExecInput {
        ExecInput { argv: i.argv, command: i.command, cwd: i.cwd, env: i.env, stdin: i.stdin, timeout_s: i.timeout_s }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmExecIdInput {
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub vm: String,
    /// The id vm_exec_start returned.
    #[schemars(length(min = 1, max = 64))]
    pub id: String,
}

impl From<VmExecIdInput> for ExecIdInput {
    fn from(i: VmExecIdInput) -> ExecIdInput {
        ExecIdInput { id: i.id }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmExecOutputInput {
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub vm: String,
    #[schemars(length(min = 1, max = 64))]
    pub id: String,
    /// Skip this many bytes of stdout (the previous call's `stdout_next`) [default: 0].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_offset: Option<u64>,
    /// Skip this many bytes of stderr [default: 0].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_offset: Option<u64>,
}

impl From<VmExecOutputInput> for ExecOutputInput {
    fn from(i: VmExecOutputInput) -> ExecOutputInput {
        ExecOutputInput { id: i.id, stdout_offset: i.stdout_offset, stderr_offset: i.stderr_offset }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmFileReadInput {
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub vm: String,
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

impl From<VmFileReadInput> for FileReadInput {
    fn from(i: VmFileReadInput) -> FileReadInput {
        FileReadInput { path: i.path, offset: i.offset, length: i.length, encoding: i.encoding }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmFileWriteInput {
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub vm: String,
    /// Absolute path inside the VM; replaced atomically.
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
    /// The content; never written to the audit log.
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

impl From<VmFileWriteInput> for FileWriteInput {
    fn from(i: VmFileWriteInput) -> FileWriteInput {
        FileWriteInput {
            path: i.path,
            content: i.content,
            encoding: i.encoding,
            mode: i.mode,
            create_dirs: i.create_dirs,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmPathInput {
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub vm: String,
    /// Absolute path inside the VM.
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
}

impl From<VmPathInput> for PathInput {
    fn from(i: VmPathInput) -> PathInput {
        PathInput { path: i.path }
    }
}

fn spec<I: JsonSchema, O: JsonSchema>(
    name: ToolName,
    title: &'static str,
    description: &'static str,
    hints: Hints,
    example: serde_json::Value,
) -> ToolSpec {
    ToolSpec {
        name,
        title,
        description,
        hints,
        class: ToolClass::Exec,
        group: ActionGroup::Vm,
        resource: ResourceKind::Vm,
        example,
        input_schema: schema_object::<I>(),
        output_schema: schema_object::<O>(),
    }
}

const RUNS: Hints = Hints { read_only: false, destructive: true, idempotent: false, open_world: false };
const LOOKS: Hints = Hints::READ;

pub(crate) fn specs(name: ToolName) -> ToolSpec {
    match name {
        ToolName::VmExec => spec::<VmExecInput, ExecOutput>(
            name,
            "Run a command in a VM",
            "Runs a process inside the VM through its guest agent and waits for it: exit code or \
             signal, stdout and stderr (1 MiB each, truncation flagged), whether the timeout \
             (default 60 s) killed it. Output streams as progress notifications while it runs; \
             cancelling the call kills the process group.",
            RUNS,
            json!({"vm": "dev", "argv": ["uname", "-a"]}),
        ),
        ToolName::VmExecStart => spec::<VmExecInput, ExecStartOutput>(
            name,
            "Start a background process in a VM",
            "Starts a process inside the VM and returns an id at once; the process keeps running \
             after this connection closes. Follow it with vm_exec_status and vm_exec_output, stop \
             it with vm_exec_kill.",
            RUNS,
            json!({"vm": "dev", "command": "sleep 30"}),
        ),
        ToolName::VmExecStatus => spec::<VmExecIdInput, ExecStatusOutput>(
            name,
            "Background process status",
            "Whether a background process started by vm_exec_start still runs, and how it ended.",
            LOOKS,
            json!({"vm": "dev", "id": "x1"}),
        ),
        ToolName::VmExecOutput => spec::<VmExecOutputInput, ExecOutputOutput>(
            name,
            "Background process output",
            "A background process's output from byte offsets; pass back stdout_next and \
             stderr_next to read only what is new.",
            LOOKS,
            json!({"vm": "dev", "id": "x1"}),
        ),
        ToolName::VmExecKill => spec::<VmExecIdInput, ExecStatusOutput>(
            name,
            "Kill a background process",
            "Kills a background process and everything it started (its process group).",
            Hints { idempotent: true, ..RUNS },
            json!({"vm": "dev", "id": "x1"}),
        ),
        ToolName::VmFileRead => spec::<VmFileReadInput, FileReadOutput>(
            name,
            "Read a file in a VM",
            "Reads a file inside the VM: text, or base64 for binary; up to 32 MiB per call, with \
             offset and length for larger files.",
            LOOKS,
            json!({"vm": "dev", "path": "/etc/hostname"}),
        ),
        ToolName::VmFileWrite => spec::<VmFileWriteInput, FileWriteOutput>(
            name,
            "Write a file in a VM",
            "Writes a file inside the VM atomically (a reader sees the old or the new file, never \
             half), up to 32 MiB, and returns its SHA-256.",
            Hints { read_only: false, destructive: true, idempotent: true, open_world: false },
            json!({"vm": "dev", "path": "/root/hello.txt", "content": "hello\n"}),
        ),
        ToolName::VmFileDelete => spec::<VmPathInput, FileDeleteOutput>(
            name,
            "Delete a file in a VM",
            "Deletes a file or an empty directory inside the VM.",
            Hints { read_only: false, destructive: true, idempotent: false, open_world: false },
            json!({"vm": "dev", "path": "/root/hello.txt"}),
        ),
        ToolName::VmFileList => spec::<VmPathInput, FileListOutput>(
            name,
            "List a directory in a VM",
            "Lists a directory inside the VM with each entry's kind, size, mode and mtime.",
            LOOKS,
            json!({"vm": "dev", "path": "/"}),
        ),
        other => panic!("{other} is not a guest tool"),
    }
}

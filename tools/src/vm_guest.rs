//! Tools that act inside a VM through its guest agent: processes and files.
//! Each is a [`GuestTool`] served as `vm_<name>`: its input is the guest
//! tool's input in [`InVm`] (plus `vm`), its output and description are the
//! guest tool's own.

use serde_json::json;

use crate::guest::{
    ExecIdInput, ExecInput, ExecOutputInput, FileReadInput, FileWriteInput, GuestTool, InVm, PathInput,
};
use crate::{ActionGroup, Hints, ResourceKind, ToolClass, ToolName, ToolSpec, schema_object};

pub type VmExecInput = InVm<ExecInput>;
pub type VmExecIdInput = InVm<ExecIdInput>;
pub type VmExecOutputInput = InVm<ExecOutputInput>;
pub type VmFileReadInput = InVm<FileReadInput>;
pub type VmFileWriteInput = InVm<FileWriteInput>;
pub type VmPathInput = InVm<PathInput>;

const RUNS: Hints = Hints { read_only: false, destructive: true, idempotent: false, open_world: false };
const LOOKS: Hints = Hints::READ;

/// The `vm_*` tool's spec for `tool`, with its title, hints and example; `Input` is its input
/// type (the guest tool's input in [`InVm`]).
pub(crate) fn spec<Input: schemars::JsonSchema>(name: ToolName, tool: GuestTool) -> ToolSpec {
    let (title, hints, example) = match tool {
        GuestTool::Exec => ("Run a command in a VM", RUNS, json!({"vm": "dev", "argv": ["uname", "-a"]})),
        GuestTool::ExecStart => {
            ("Start a background process in a VM", RUNS, json!({"vm": "dev", "command": "sleep 30"}))
        }
        GuestTool::ExecStatus => ("Background process status", LOOKS, json!({"vm": "dev", "id": "x1"})),
        GuestTool::ExecOutput => ("Background process output", LOOKS, json!({"vm": "dev", "id": "x1"})),
        GuestTool::ExecKill => {
            ("Kill a background process", Hints { idempotent: true, ..RUNS }, json!({"vm": "dev", "id": "x1"}))
        }
        GuestTool::FileRead => ("Read a file in a VM", LOOKS, json!({"vm": "dev", "path": "/etc/hostname"})),
        GuestTool::FileWrite => (
            "Write a file in a VM",
            Hints { idempotent: true, ..RUNS },
            json!({"vm": "dev", "path": "/root/hello.txt", "content": "hello\n"}),
        ),
        GuestTool::FileDelete => ("Delete a file in a VM", RUNS, json!({"vm": "dev", "path": "/root/hello.txt"})),
        GuestTool::FileList => ("List a directory in a VM", LOOKS, json!({"vm": "dev", "path": "/"})),
        GuestTool::FileStat => ("Describe a path in a VM", LOOKS, json!({"vm": "dev", "path": "/etc"})),
    };
    ToolSpec {
        name,
        title,
        description: tool.description(),
        hints,
        class: ToolClass::Exec,
        group: ActionGroup::Vm,
        resource: ResourceKind::Vm,
        example,
        input_schema: schema_object::<Input>(),
        output_schema: tool.output_schema(),
    }
}

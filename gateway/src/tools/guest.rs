//! The VM guest tools (`vm_exec*`, `vm_file_*`): the VM the caller named, its
//! node, and the guest agent's tool of the same name, called through the
//! guest session pool with the caller's progress and cancellation.

use std::time::Duration;

use moat_tools::{GuestTool, InVm};
use serde_json::Value;

use super::ToolError;
use super::vms::row_for;
use crate::app::{CallContext, Shared};
use crate::guest;
use crate::security::resource::not_found;

/// Deadline for guest calls other than vm_exec (file transfers of up to 32 MiB included).
pub const GUEST_CALL: Duration = Duration::from_secs(120);

/// Runs the guest agent's `tool` with the caller's arguments in the VM the caller named.
pub async fn in_guest<T: serde::Serialize>(
    shared: &Shared,
    ctx: &CallContext,
    tool: GuestTool,
    input: InVm<T>,
    deadline: Duration,
) -> Result<Value, ToolError> {
    let InVm { vm: named, args } = input;
    // The VM the pipeline judged and its node's address in one read; the VM gone since reads
    // as missing, in the caller's words.
    let (vm, address) = match ctx.vm.as_deref() {
        Some(id) => shared.state.vm_at(id).await?.ok_or_else(|| ToolError::NotFound(not_found(&named)))?,
        None => {
            let vm = row_for(shared, ctx, &named).await?;
            let node = shared.state.node(&vm.node).await?;
            (vm, node.address)
        }
    };
    let dial = shared.nodes.node(&vm.node, &address)?;
    let answer =
        guest::call(&shared.guest, &dial, &vm, tool, args, deadline, ctx.progress.clone(), &ctx.cancel).await?;
    Ok(answer)
}

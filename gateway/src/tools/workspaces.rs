//! The image and workspace tools. Images are per node and shared; workspaces are owned rows
//! whose bytes live on one node. A create or fork reserves the name and quota first, asks the
//! node, and removes the row (and whatever the node may have made) if the node fails; nothing
//! about another owner's workspace is ever told to a caller who may not see it.

use std::time::Duration;

use moat_tools::{
    Attachment, ImageDeleteOutput, ImageImportInput, ImageInfo, ImageListInput, ImageListOutput, ImageOutput,
    ImageRefInput, ToolName, WorkspaceCreateInput, WorkspaceDeleteOutput, WorkspaceForkInput, WorkspaceInfo,
    WorkspaceListInput, WorkspaceListOutput, WorkspaceOutput,
};
use serde_json::Value;

use super::{ToolError, to_value};
use crate::app::{CallContext, Shared};
use crate::nodes::client::{NodeClient, NodeError, NodeImage};
use crate::security::resource::{workspace_not_found, workspace_resource, workspace_row};
use crate::store::now;
use crate::store::workspaces::{AttachedRow, WorkspaceRow};

/// How long a node may take to make a workspace (a copy on a filesystem without snapshots, or
/// growing a large one, takes a while).
const MAKE_TIMEOUT: Duration = Duration::from_secs(600);

async fn client(shared: &Shared, node: &str) -> Result<NodeClient, ToolError> {
    let row = shared.state.node(node).await?;
    Ok(shared.nodes.node(&row.name, &row.address)?)
}

/// The workspaces `ctx` may see.
async fn visible(shared: &Shared, ctx: &CallContext) -> Result<Vec<WorkspaceRow>, ToolError> {
    let bundle = shared.authz.bundle();
    Ok(shared
        .state
        .workspaces()
        .await?
        .into_iter()
        .filter(|w| bundle.is_allowed(&ctx.principal, ToolName::WorkspaceInspect, &workspace_resource(w)))
        .collect())
}

/// The workspace a call names, re-checked against the caller now (it may have changed hands
/// since the pipeline judged it): someone else's reads as missing.
pub(super) async fn workspace_for(
    shared: &Shared,
    ctx: &CallContext,
    tool: ToolName,
    arg: &str,
) -> Result<WorkspaceRow, ToolError> {
    let row = workspace_row(&shared.state, ctx.principal.owner(), arg).await?;
    if !shared.authz.bundle().is_allowed(&ctx.principal, tool, &workspace_resource(&row)) {
        return Err(ToolError::NotFound(workspace_not_found(arg)));
    }
    Ok(row)
}

fn image_info(node: &str, image: NodeImage, workspaces: Vec<String>) -> ImageInfo {
    ImageInfo {
        name: image.name,
        node: node.to_string(),
        kind: image.kind,
        size_bytes: image.size_bytes,
        sha256: image.sha256,
        source: image.source,
        created_at: image.created_at,
        workspaces,
    }
}

/// Every node's images, with the visible workspaces made from each.
async fn images(shared: &Shared, ctx: &CallContext, only: Option<&str>) -> Result<Vec<ImageInfo>, ToolError> {
    let seen = visible(shared, ctx).await?;
    let mut out = Vec::new();
    for node in shared.state.nodes().await? {
        if only.is_some_and(|n| n != node.name) {
            continue;
        }
        let Ok(client) = shared.nodes.node(&node.name, &node.address) else { continue };
        let Ok(list) = client.list_images().await else { continue };
        for image in list {
            let from: Vec<String> =
                seen.iter().filter(|w| w.node == node.name && w.image == image.name).map(|w| w.name.clone()).collect();
            out.push(image_info(&node.name, image, from));
        }
    }
    Ok(out)
}

pub async fn image_list(shared: &Shared, ctx: &CallContext, input: ImageListInput) -> Result<Value, ToolError> {
    Ok(to_value(ImageListOutput { images: images(shared, ctx, input.node.as_deref()).await? }))
}

/// The one image `input` names: on its node, or the only node that has it.
async fn one_image(shared: &Shared, ctx: &CallContext, input: &ImageRefInput) -> Result<ImageInfo, ToolError> {
    let mut found: Vec<ImageInfo> =
        images(shared, ctx, input.node.as_deref()).await?.into_iter().filter(|i| i.name == input.image).collect();
    match found.len() {
        0 => Err(ToolError::NotFound(format!("no image named `{}`; image_list shows them", input.image))),
        1 => Ok(found.remove(0)),
        _ => Err(ToolError::Invalid(format!(
            "image `{}` is on several nodes ({}); pass node",
            input.image,
            found.iter().map(|i| i.node.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

pub async fn image_inspect(shared: &Shared, ctx: &CallContext, input: ImageRefInput) -> Result<Value, ToolError> {
    Ok(to_value(ImageOutput { image: one_image(shared, ctx, &input).await? }))
}

pub async fn image_import(shared: &Shared, input: ImageImportInput) -> Result<Value, ToolError> {
    let node = match input.node {
        Some(node) => node,
        None => {
            let nodes = shared.state.nodes().await?;
            match nodes.as_slice() {
                [one] => one.name.clone(),
                _ => return Err(ToolError::Invalid("several nodes are registered; pass node".into())),
            }
        }
    };
    let image = client(shared, &node).await?.import_image(&input.name, &input.source, MAKE_TIMEOUT).await?;
    Ok(to_value(ImageOutput { image: image_info(&node, image, Vec::new()) }))
}

pub async fn image_delete(shared: &Shared, ctx: &CallContext, input: ImageRefInput) -> Result<Value, ToolError> {
    let image = one_image(shared, ctx, &input).await?;
    if image.kind != "disk" {
        return Err(ToolError::Invalid(format!(
            "`{}` is an initramfs image; remove its directory on node {} instead",
            image.name, image.node
        )));
    }
    client(shared, &image.node).await?.delete_image(&image.name).await?;
    Ok(to_value(ImageDeleteOutput { deleted: image.name, node: image.node }))
}

/// The image, then each workspace `row` was forked from, oldest first (deleted ones too). Rows
/// made before lineages were stored have only their parent to go by: walked through the rows
/// that still exist.
fn lineage(row: &WorkspaceRow, all: &[WorkspaceRow]) -> Vec<String> {
    let mut chain = row.ancestors();
    if chain.is_empty() {
        let mut parent = row.parent.clone();
        while let Some(id) = parent {
            if chain.contains(&id) || chain.len() > 64 {
                break;
            }
            parent = all.iter().find(|w| w.id == id).and_then(|w| w.parent.clone());
            chain.insert(0, id);
        }
    }
    chain.insert(0, row.image.clone());
    chain
}

fn info(row: &WorkspaceRow, all: &[WorkspaceRow], attached: &[AttachedRow], exclusive: Option<u64>) -> WorkspaceInfo {
    WorkspaceInfo {
        id: row.id.clone(),
        name: row.name.clone(),
        owner: row.owner.clone(),
        node: row.node.clone(),
        image: row.image.clone(),
        lineage: lineage(row, all),
        size_bytes: row.size_bytes as u64,
        method: row.method.clone(),
        exclusive_bytes: exclusive,
        attached: attached
            .iter()
            .filter(|a| a.workspace_id == row.id)
            .map(|a| Attachment {
                vm: a.vm_id.clone(),
                vm_name: a.vm_name.clone(),
                how: a.how.clone(),
                vm_state: a.vm_state,
            })
            .collect(),
        created_at: row.created_at.clone(),
    }
}

/// Reserves `row`, asks the node to make it with `make`, records the answer; undoes all of it
/// if the node fails.
async fn make<F>(shared: &Shared, ctx: &CallContext, row: WorkspaceRow, make: F) -> Result<Value, ToolError>
where
    F: AsyncFnOnce(&NodeClient) -> Result<crate::nodes::client::NodeWorkspace, NodeError>,
{
    let quotas = shared.authz.bundle().limiter.config().quotas(ctx.principal.role).clone();
    shared.state.reserve_workspace(&row, &quotas, ctx.principal.role.as_str()).await?;
    let node = match client(shared, &row.node).await {
        Ok(node) => node,
        Err(e) => {
            shared.state.delete_workspace_row(&row.id).await?;
            return Err(e);
        }
    };
    match make(&node).await {
        Ok(made) => {
            shared.state.workspace_made(&row.id, made.size_bytes, &made.method).await?;
            let stored = shared.state.workspace_by_id(&row.id).await?.unwrap_or(row);
            let all = shared.state.workspaces().await?;
            Ok(to_value(WorkspaceOutput { workspace: info(&stored, &all, &[], made.exclusive_bytes) }))
        }
        Err(e) => {
            // The node may have made it before it stopped answering: remove it there too, once it
            // answers again (a restarted node has already dropped what it left half made).
            if matches!(e, NodeError::Unreachable { .. }) {
                tokio::spawn(remove_when_back(node.clone(), row.id.clone()));
            }
            shared.state.delete_workspace_row(&row.id).await?;
            Err(e.into())
        }
    }
}

/// At start: removes workspaces whose create a stopped gateway never finished (reserved more than
/// a create's longest time ago, so never another gateway's create in progress), here and on
/// their nodes, freeing their names and quota.
pub async fn clear_unfinished(shared: &Shared) -> Result<(), crate::store::StateError> {
    let before = moat_proto::time::rfc3339_before(MAKE_TIMEOUT + Duration::from_secs(60));
    for row in shared.state.unfinished_workspaces(&before).await? {
        tracing::warn!(
            workspace = row.id,
            name = row.name,
            owner = row.owner,
            "removing a workspace whose create never finished"
        );
        shared.state.delete_workspace_row(&row.id).await?;
        if let Ok(node) = client(shared, &row.node).await {
            tokio::spawn(remove_when_back(node, row.id));
        }
    }
    Ok(())
}

/// Deletes workspace `id` on `node` once the node answers (for up to ten minutes): it was never
/// acknowledged, so nothing may keep it.
async fn remove_when_back(node: NodeClient, id: String) {
    for _ in 0..300 {
        match node.delete_workspace(&id, crate::nodes::client::CALL_TIMEOUT).await {
            Ok(()) | Err(NodeError::NotFound { .. }) => return,
            Err(NodeError::Refused { message, .. }) => {
                tracing::warn!(workspace = id, "cannot remove an unacknowledged workspace: {message}");
                return;
            }
            Err(NodeError::Unreachable { .. }) => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    }
    tracing::warn!(workspace = id, node = node.name(), "gave up removing an unacknowledged workspace");
}

fn new_row(
    ctx: &CallContext,
    name: &str,
    node: &str,
    image: &str,
    parent: Option<String>,
    size_gib: u64,
) -> WorkspaceRow {
    WorkspaceRow {
        id: super::vms::random_id("ws"),
        name: name.to_string(),
        owner: ctx.principal.owner().to_string(),
        node: node.to_string(),
        image: image.to_string(),
        parent,
        size_gib: size_gib.max(1) as i64,
        size_bytes: 0,
        method: String::new(),
        state: "creating".into(),
        created_at: now(),
        lineage: "[]".into(),
    }
}

pub async fn create(shared: &Shared, ctx: &CallContext, input: WorkspaceCreateInput) -> Result<Value, ToolError> {
    let wanted = ImageRefInput { image: input.image.clone(), node: input.node.clone() };
    let image = one_image(shared, ctx, &wanted).await?;
    if image.kind != "disk" {
        return Err(ToolError::Invalid(format!(
            "`{}` is an initramfs image; workspaces start from a disk image (image_list shows kind \"disk\")",
            image.name
        )));
    }
    let size_gib = input.size_gib.unwrap_or(0).max(image.size_bytes.div_ceil(1 << 30));
    let row = new_row(ctx, &input.name, &image.node, &image.name, None, size_gib);
    let (id, name, size) = (row.id.clone(), row.name.clone(), input.size_gib);
    make(shared, ctx, row, async |node: &NodeClient| {
        node.create_workspace(&id, &name, &image.name, size, MAKE_TIMEOUT).await
    })
    .await
}

pub async fn fork(shared: &Shared, ctx: &CallContext, input: WorkspaceForkInput) -> Result<Value, ToolError> {
    let source = workspace_for(shared, ctx, ToolName::WorkspaceFork, &input.workspace).await?;
    let mut row =
        new_row(ctx, &input.name, &source.node, &source.image, Some(source.id.clone()), source.size_gib as u64);
    let mut ancestors = lineage(&source, &shared.state.workspaces().await?);
    ancestors.remove(0); // the image
    ancestors.push(source.id.clone());
    row.lineage = serde_json::to_string(&ancestors).expect("strings serialize");
    let (id, name) = (row.id.clone(), row.name.clone());
    make(shared, ctx, row, async |node: &NodeClient| node.fork_workspace(&source.id, &id, &name, MAKE_TIMEOUT).await)
        .await
}

pub async fn list(shared: &Shared, ctx: &CallContext, input: WorkspaceListInput) -> Result<Value, ToolError> {
    let all = shared.state.workspaces().await?;
    let attached = shared.state.attachments(None).await?;
    let seen = visible(shared, ctx).await?;
    let workspaces = seen
        .iter()
        .filter(|w| input.image.as_deref().is_none_or(|i| w.image == i))
        .map(|w| info(w, &all, &attached, None))
        .collect();
    Ok(to_value(WorkspaceListOutput { workspaces }))
}

pub async fn inspect(shared: &Shared, ctx: &CallContext, arg: &str) -> Result<Value, ToolError> {
    let row = workspace_for(shared, ctx, ToolName::WorkspaceInspect, arg).await?;
    let all = shared.state.workspaces().await?;
    let attached = shared.state.attachments(Some(&row.id)).await?;
    let exclusive = match client(shared, &row.node).await {
        Ok(node) => node.get_workspace(&row.id).await.ok().and_then(|w| w.exclusive_bytes),
        Err(_) => None,
    };
    Ok(to_value(WorkspaceOutput { workspace: info(&row, &all, &attached, exclusive) }))
}

pub async fn delete(shared: &Shared, ctx: &CallContext, arg: &str) -> Result<Value, ToolError> {
    let row = workspace_for(shared, ctx, ToolName::WorkspaceDelete, arg).await?;
    let attached = shared.state.attachments(Some(&row.id)).await?;
    let busy: Vec<String> = attached
        .iter()
        .filter(|a| a.vm_state.is_live() || a.vm_state == moat_tools::VmState::Deleting)
        .map(|a| format!("{} ({}, {})", a.vm_name, a.vm_id, a.vm_state))
        .collect();
    if !busy.is_empty() {
        return Err(ToolError::Invalid(format!(
            "workspace `{}` is a disk of VMs that are not stopped: {}; stop or delete them first. Nothing was changed",
            row.name,
            busy.join(", ")
        )));
    }
    match client(shared, &row.node).await?.delete_workspace(&row.id, MAKE_TIMEOUT).await {
        Ok(()) | Err(NodeError::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    shared.state.delete_workspace_row(&row.id).await?;
    Ok(to_value(WorkspaceDeleteOutput { deleted: row.id, name: row.name }))
}

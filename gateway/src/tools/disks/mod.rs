//! Disk layouts: the tools, and the reconciler that brings each stored generation to its node.
//!
//! The gateway judges every layout before storing it, with the node's own classifier
//! (`moat_node::disk`) on the node's snapshot (fresh when the node answers, else the last one
//! stored): a layout that touches a disk in use, or is for an installer-only node, is refused and
//! nothing is stored. The node judges again on a fresh snapshot just before writing, and its
//! verdict is the one recorded. Transitions of a layout's state are [`machine`]'s, model-checked.

pub mod machine;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use moat_node::disk::{classify, disko, plan};
use moat_tools::{
    DiskInfo, DiskLayout, DiskLayoutApplyInput, DiskLayoutDeleteOutput, DiskLayoutListInput, DiskLayoutListOutput,
    DiskLayoutOutput, DiskLayoutPlanInput, DiskLayoutPlanOutput, DiskLayoutStatus, DiskListInput, DiskListOutput,
    DiskManagement, DiskSnapshot, LayoutArg, LayoutKind, LayoutMetadata, LayoutPhase, Refusal, RefusalReason, Verdict,
};
use serde_json::Value;

use super::{ToolError, to_value};
use crate::app::Shared;
use crate::nodes::client::{NodeDisks, NodeError};
use crate::store::disks::{LayoutRow, NodeDisksRow};
use crate::store::now;
use machine::{Answer, Track};

/// How long a node may take to apply one generation (mkfs on large disks, a NixOS rebuild).
const APPLY_DEADLINE: Duration = Duration::from_secs(3600);
/// How long disk_layout_apply waits for the node's answer before answering with the phase reached.
const APPLY_WAIT: Duration = Duration::from_secs(120);
/// How often unobserved generations are pushed to their nodes (and offline nodes retried).
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// Read-modify-write of layout rows, gateway-wide (never held across a node call).
static ROWS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// One reconcile per node at a time: a node is never sent a generation while another is applying.
static NODES: std::sync::Mutex<Option<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = std::sync::Mutex::new(None);

fn node_lock(node: &str) -> Arc<tokio::sync::Mutex<()>> {
    let mut locks = NODES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    locks.get_or_insert_with(HashMap::new).entry(node.to_string()).or_default().clone()
}

/// The layout a call gives, parsed (YAML or JSON text, or an object) and checked on its own.
fn parse_layout(arg: LayoutArg) -> Result<DiskLayout, ToolError> {
    let layout = match arg {
        LayoutArg::Doc(doc) => *doc,
        LayoutArg::Text(text) => serde_yaml::from_str::<DiskLayout>(&text).map_err(|e| {
            ToolError::Invalid(format!(
                "the layout does not parse as a DiskLayout (YAML or JSON): {e}; it needs kind: DiskLayout, \
                 metadata.name, spec.node and spec.disks"
            ))
        })?,
    };
    plan::validate(&layout).map_err(|e| ToolError::Invalid(format!("layout: {e}")))?;
    Ok(layout)
}

/// A node's snapshot as judged: fresh from the node, or the last stored when it does not answer.
struct Seen {
    disks: NodeDisks,
    source: &'static str,
}

async fn snapshot_for(shared: &Shared, node: &str) -> Result<Seen, ToolError> {
    let row = shared.state.node(node).await?;
    let asked = match shared.nodes.node(&row.name, &row.address) {
        Ok(client) => client.probe_disks().await,
        Err(e) => Err(e),
    };
    match asked {
        Ok(disks) => {
            shared
                .state
                .put_node_disks(&NodeDisksRow {
                    node: row.name.clone(),
                    snapshot: serde_json::to_string(&disks.snapshot).expect("a snapshot serializes"),
                    management: word(&disks.management),
                    applier: word(&disks.applier),
                    taken_at: disks.snapshot.taken_at.clone(),
                })
                .await?;
            Ok(Seen { disks, source: "node" })
        }
        Err(e @ NodeError::Unreachable { .. }) => {
            let Some(stored) = shared.state.node_disks(&row.name).await? else {
                return Err(ToolError::Node(format!(
                    "{e}; it has never reported its disks, so there is nothing to judge a layout on: nothing \
                     was stored or applied"
                )));
            };
            let snapshot: DiskSnapshot = serde_json::from_str(&stored.snapshot).unwrap_or_default();
            let management = serde_json::from_value(Value::String(stored.management)).unwrap_or_default();
            let applier = serde_json::from_value(Value::String(stored.applier)).unwrap_or_default();
            Ok(Seen { disks: NodeDisks { snapshot, management, applier }, source: "stored" })
        }
        Err(e) => Err(e.into()),
    }
}

fn word<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

pub async fn disk_list(shared: &Shared, input: DiskListInput) -> Result<Value, ToolError> {
    let seen = snapshot_for(shared, &input.node).await?;
    let snap = &seen.disks.snapshot;
    let mut wholes: Vec<_> = snap.devices.iter().filter(|d| d.parent.is_none()).collect();
    wholes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut devices = Vec::new();
    for whole in wholes {
        let mut parts: Vec<_> = snap.devices.iter().filter(|d| d.parent.as_deref() == Some(&whole.name)).collect();
        parts.sort_by_key(|d| (d.partn, d.name.clone()));
        let names: Vec<String> = parts.iter().map(|p| p.name.clone()).collect();
        for device in std::iter::once(whole).chain(parts) {
            let reasons = classify::in_use(&device.name, snap);
            let partitions = if device.name == whole.name { names.clone() } else { Vec::new() };
            devices.push(DiskInfo { device: device.clone(), partitions, in_use: !reasons.is_empty(), reasons });
        }
    }
    let mut notes = snap.notes.clone();
    if seen.source == "stored" {
        notes.push(format!("node {} did not answer: this is its last snapshot, taken {}", input.node, snap.taken_at));
    }
    Ok(to_value(DiskListOutput {
        node: input.node,
        taken_at: snap.taken_at.clone(),
        management: seen.disks.management,
        applier: seen.disks.applier,
        devices,
        notes,
    }))
}

fn refusal_text(refusals: &[Refusal]) -> String {
    refusals.iter().map(|r| format!("{} ({}): {}", r.device, r.code.as_str(), r.detail)).collect::<Vec<_>>().join("; ")
}

pub async fn layout_plan(shared: &Shared, input: DiskLayoutPlanInput) -> Result<Value, ToolError> {
    let layout = parse_layout(input.layout)?;
    let seen = snapshot_for(shared, &layout.spec.node).await?;
    let planned = plan::plan(&layout, &seen.disks.snapshot).map_err(|e| ToolError::Invalid(format!("layout: {e}")))?;
    let rendered = disko::render(&layout).map_err(|e| ToolError::Invalid(format!("layout: {e}")))?;
    Ok(to_value(DiskLayoutPlanOutput {
        name: layout.metadata.name.clone(),
        node: layout.spec.node.clone(),
        verdict: if planned.is_safe() { Verdict::Safe } else { Verdict::Refused },
        actions: plan::actions(&planned),
        refusals: planned.refusals,
        disko: rendered,
        snapshot_taken_at: seen.disks.snapshot.taken_at.clone(),
        snapshot_source: seen.source.to_string(),
        management: seen.disks.management,
        applier: seen.disks.applier,
    }))
}

fn track_of(row: &LayoutRow) -> Track {
    Track {
        generation: row.generation.max(0) as u64,
        observed: row.observed_generation.max(0) as u64,
        phase: LayoutPhase::parse(&row.phase).unwrap_or(LayoutPhase::Pending),
    }
}

/// `row` carrying `track`; the reason goes with it (cleared when none).
fn with_track(row: &LayoutRow, track: &Track, reason: Option<(String, String, Vec<Refusal>)>) -> LayoutRow {
    let (code, message, refusals) = match reason {
        Some((code, message, refusals)) => (Some(code), Some(message), refusals),
        None => (None, None, Vec::new()),
    };
    LayoutRow {
        generation: track.generation as i64,
        observed_generation: track.observed as i64,
        phase: track.phase.as_str().to_string(),
        reason_code: code,
        reason_message: message,
        refusals: serde_json::to_string(&refusals).expect("refusals serialize"),
        updated_at: now(),
        ..row.clone()
    }
}

fn status_of(row: &LayoutRow) -> DiskLayoutStatus {
    let track = track_of(row);
    DiskLayoutStatus {
        name: row.name.clone(),
        node: row.node.clone(),
        generation: track.generation,
        observed_generation: track.observed,
        phase: track.phase,
        refusal_reason: row
            .reason_code
            .clone()
            .map(|code| RefusalReason { code, message: row.reason_message.clone().unwrap_or_default() }),
        spec: serde_json::from_str(&row.spec).expect("a stored spec was serialized from a LayoutSpec"),
        updated_at: row.updated_at.clone(),
    }
}

pub async fn layout_apply(shared: &Shared, input: DiskLayoutApplyInput) -> Result<Value, ToolError> {
    if !input.confirm {
        return Err(ToolError::Invalid(
            "disk_layout_apply repartitions and formats the disks it names, erasing them: call it again with \
             confirm: true (disk_layout_plan shows what it would do)"
                .into(),
        ));
    }
    let layout = parse_layout(input.layout)?;
    let (name, node) = (layout.metadata.name.clone(), layout.spec.node.clone());
    if let Some(row) = shared.state.disk_layout(&name).await?
        && row.node != node
    {
        return Err(moved(&name, &row.node));
    }
    let seen = snapshot_for(shared, &node).await?;
    if seen.disks.management == DiskManagement::InstallerOnly {
        return Err(ToolError::Invalid(format!(
            "refused (installer_only): node {node} is installer-only: moat plans layouts for it but does not apply \
             them; its operator can start moat-node with --disk-management controller-managed. Nothing was stored."
        )));
    }
    let planned = plan::plan(&layout, &seen.disks.snapshot).map_err(|e| ToolError::Invalid(format!("layout: {e}")))?;
    if !planned.is_safe() {
        return Err(ToolError::Invalid(format!(
            "refused: {}. Nothing was stored or written.",
            refusal_text(&planned.refusals)
        )));
    }
    let spec = serde_json::to_string(&layout.spec).expect("a spec serializes");
    {
        let _rows = ROWS.lock().await;
        let existing = shared.state.disk_layout(&name).await?;
        if let Some(row) = &existing
            && row.node != node
        {
            return Err(moved(&name, &row.node));
        }
        let changed = existing.as_ref().is_none_or(|row| row.spec != spec);
        let track = machine::on_spec(existing.as_ref().map(track_of).as_ref(), changed);
        let at = now();
        let base = existing.clone().unwrap_or_else(|| LayoutRow {
            name: name.clone(),
            node: node.clone(),
            spec: spec.clone(),
            generation: 0,
            observed_generation: 0,
            phase: String::new(),
            reason_code: None,
            reason_message: None,
            refusals: "[]".into(),
            created_at: at.clone(),
            updated_at: at,
        });
        if existing.as_ref().is_none_or(|row| track_of(row) != track) {
            let row = LayoutRow { spec, ..with_track(&base, &track, None) };
            shared.state.put_disk_layout(&row).await?;
        }
    }
    let waited = tokio::time::timeout(APPLY_WAIT, reconcile_node(shared, &node)).await;
    let row = shared.state.disk_layout(&name).await?.ok_or_else(|| ToolError::NotFound(not_found(&name)))?;
    let status = status_of(&row);
    let note = match (&waited, status.phase) {
        (Err(_), _) => Some(format!(
            "node {node} is still applying after {}s; disk_layout_status {name} shows when it is done",
            APPLY_WAIT.as_secs()
        )),
        (_, LayoutPhase::Pending) => Some(format!(
            "node {node} did not answer; the reconciler sends it this generation when it returns (every {}s)",
            RECONCILE_EVERY.as_secs()
        )),
        _ => None,
    };
    Ok(to_value(DiskLayoutOutput { layout: status, note }))
}

fn moved(name: &str, node: &str) -> ToolError {
    ToolError::Invalid(format!(
        "layout {name} is for node {node}; a layout cannot move to another node: disk_layout_delete it first or \
         use another name"
    ))
}

fn not_found(name: &str) -> String {
    format!("no disk layout named `{name}`; disk_layout_list shows them")
}

pub async fn layout_list(shared: &Shared, input: DiskLayoutListInput) -> Result<Value, ToolError> {
    let rows = shared.state.disk_layouts(input.node.as_deref()).await?;
    Ok(to_value(DiskLayoutListOutput { layouts: rows.iter().map(status_of).collect() }))
}

pub async fn layout_status(shared: &Shared, name: &str) -> Result<Value, ToolError> {
    let row = shared.state.disk_layout(name).await?.ok_or_else(|| ToolError::NotFound(not_found(name)))?;
    Ok(to_value(DiskLayoutOutput { layout: status_of(&row), note: None }))
}

pub async fn layout_delete(shared: &Shared, name: &str) -> Result<Value, ToolError> {
    let _rows = ROWS.lock().await;
    let row = shared.state.disk_layout(name).await?.ok_or_else(|| ToolError::NotFound(not_found(name)))?;
    let lock = node_lock(&row.node);
    let applying = track_of(&row).phase == LayoutPhase::Applying && lock.try_lock().is_err();
    if applying {
        return Err(ToolError::Invalid(format!(
            "node {} is applying layout {name} now; delete it once disk_layout_status shows it done",
            row.node
        )));
    }
    shared.state.delete_disk_layout(name).await?;
    Ok(to_value(DiskLayoutDeleteOutput { deleted: name.to_string(), disks_untouched: true }))
}

/// Sends `node` every generation it has not answered for, one at a time, oldest change first,
/// and records each answer; stops at the first call that does not reach the node.
pub async fn reconcile_node(shared: &Shared, node: &str) {
    let lock = node_lock(node);
    let _one_at_a_time = lock.lock().await;
    loop {
        let rows = match shared.state.disk_layouts_unobserved().await {
            Ok(rows) => rows,
            Err(e) => return tracing::warn!(node, error = %e, "disk reconcile: cannot read the layouts"),
        };
        let Some(row) = rows.into_iter().find(|r| r.node == node) else { return };
        let Some(generation) = machine::to_push(&track_of(&row)) else { return };
        {
            let _rows = ROWS.lock().await;
            match shared.state.disk_layout(&row.name).await {
                Ok(Some(current)) if current.generation == row.generation => {
                    let sending = machine::sending(&track_of(&current));
                    if let Err(e) = shared.state.put_disk_layout(&with_track(&current, &sending, None)).await {
                        return tracing::warn!(node, error = %e, "disk reconcile: cannot record a send");
                    }
                }
                Ok(_) => continue, // changed or deleted meanwhile: decide again
                Err(e) => return tracing::warn!(node, error = %e, "disk reconcile: cannot read a layout"),
            }
        }
        let layout = DiskLayout {
            kind: LayoutKind::DiskLayout,
            api_version: None,
            metadata: LayoutMetadata { name: row.name.clone() },
            spec: serde_json::from_str(&row.spec).expect("a stored spec was serialized from a LayoutSpec"),
        };
        let answer = match shared.state.node(node).await {
            Ok(n) => match shared.nodes.node(&n.name, &n.address) {
                Ok(client) => client.apply_disk_layout(&layout, generation, APPLY_DEADLINE).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(NodeError::Unreachable { node: node.to_string(), detail: e.to_string() }),
        };
        let reached = !matches!(answer, Err(NodeError::Unreachable { .. }));
        let _rows = ROWS.lock().await;
        let Ok(Some(current)) = shared.state.disk_layout(&row.name).await else { continue };
        let track = track_of(&current);
        let next = match answer {
            Ok(report) => {
                let next = machine::on_answer(&track, Answer { generation: report.generation, phase: report.phase });
                let reason = (report.generation == current.generation.max(0) as u64 && !report.code.is_empty())
                    .then_some((report.code, report.message, report.refusals));
                with_track(&current, &next, reason)
            }
            Err(e @ NodeError::Unreachable { .. }) => {
                tracing::info!(node, layout = %row.name, generation, error = %e, "disk reconcile: node unreachable");
                with_track(&current, &machine::on_unreachable(&track), None)
            }
            Err(e) => {
                let next = machine::on_answer(&track, Answer { generation, phase: LayoutPhase::Failed });
                let reason = (generation == current.generation.max(0) as u64)
                    .then(|| ("node_error".into(), e.to_string(), vec![]));
                with_track(&current, &next, reason)
            }
        };
        if let Err(e) = shared.state.put_disk_layout(&next).await {
            return tracing::warn!(node, error = %e, "disk reconcile: cannot record the node's answer");
        }
        if !reached {
            return;
        }
    }
}

/// Every few seconds, sends unobserved generations to their nodes; a node that was offline
/// catches up when it answers again.
pub async fn reconcile(shared: Arc<Shared>, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let Ok(rows) = shared.state.disk_layouts_unobserved().await else { continue };
        let mut nodes: Vec<String> = rows.into_iter().map(|r| r.node).collect();
        nodes.sort();
        nodes.dedup();
        for node in nodes {
            if node_lock(&node).try_lock().is_err() {
                continue; // already being reconciled (a tool call, or a long apply)
            }
            let shared = shared.clone();
            tokio::spawn(async move { reconcile_node(&shared, &node).await });
        }
    }
}

//! The node registry seen live: asks each registered node for its facts,
//! records who answered, and falls back to the last known facts (marked
//! unreachable, with the reason) for nodes that do not. The [`heartbeat`]
//! does the same in the background and carries VM states back.

use std::sync::Arc;

use moat_tools::NodeDetail;
use tokio_util::sync::CancellationToken;

use super::client::NodeError;
use super::connector::NodeConnector;
pub use crate::store::MISSED_HEARTBEATS_UNREACHABLE;
use crate::store::{NodeRow, State, StateError};

/// Asks one node for its facts and records the outcome.
pub async fn refresh(state: &State, connector: &NodeConnector, row: &NodeRow) -> Result<NodeDetail, StateError> {
    let address = connector.address_of(&row.name, &row.address);
    let answer = match connector.node(&row.name, &row.address) {
        Ok(client) => client.info(address).await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(mut detail) => {
            let json = serde_json::to_string(&detail).expect("tool output types serialize");
            detail.last_seen = Some(state.node_seen(&row.name, &json).await?);
            if row.missed_heartbeats >= MISSED_HEARTBEATS_UNREACHABLE {
                tracing::info!(node = %row.name, "node is reachable again");
            }
            Ok(detail)
        }
        Err(error) => {
            let error = match error {
                NodeError::Unreachable { detail, .. } => detail,
                other => other.to_string(),
            };
            // Heartbeats and live calls (node_inspect, `moat status`) both count: log the one
            // failure that crosses the line, whichever it is.
            if state.node_failed(&row.name, &error).await? == MISSED_HEARTBEATS_UNREACHABLE {
                tracing::warn!(node = %row.name, %error, "node unreachable: {MISSED_HEARTBEATS_UNREACHABLE} contacts in a row failed");
            }
            Ok(unreachable(row, error))
        }
    }
}

/// Refreshes every registered node concurrently.
pub async fn refresh_all(state: &State, connector: &NodeConnector) -> Result<Vec<NodeDetail>, StateError> {
    let rows = state.nodes().await?;
    let calls = rows.iter().map(|row| refresh(state, connector, row));
    let mut out = Vec::with_capacity(rows.len());
    for result in futures::future::join_all(calls).await {
        out.push(result?);
    }
    Ok(out)
}

/// The last facts a node reported, marked unreachable with `error`.
fn unreachable(row: &NodeRow, error: String) -> NodeDetail {
    let mut detail = row
        .last_info
        .as_deref()
        .and_then(|json| serde_json::from_str::<NodeDetail>(json).ok())
        .unwrap_or_else(|| NodeDetail::unknown(&row.name, &row.address));
    detail.address = row.address.clone();
    detail.reachable = false;
    detail.last_seen = row.last_seen.clone();
    detail.error = Some(error);
    detail
}

/// Every `every`, asks each node for its facts and VM states and records them: VM crashes
/// reach the database (and `vm_list`) within one interval, and a node that misses
/// [`MISSED_HEARTBEATS_UNREACHABLE`] contacts in a row (heartbeats or live calls) is shown and
/// logged unreachable until it answers.
pub async fn heartbeat(state: State, nodes: Arc<NodeConnector>, every: std::time::Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let rows = match state.nodes().await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat: cannot read the node registry");
                continue;
            }
        };
        futures::future::join_all(rows.iter().map(|row| beat(&state, &nodes, row))).await;
    }
}

/// One heartbeat for one node: the same contact as `node_inspect` (facts recorded, a failure
/// counted as a miss), then its VM states.
async fn beat(state: &State, nodes: &NodeConnector, row: &NodeRow) {
    let recorded = async {
        if !refresh(state, nodes, row).await?.reachable {
            return Ok(());
        }
        let listed = match nodes.node(&row.name, &row.address) {
            Ok(client) => client.list_vms().await,
            Err(e) => Err(e),
        };
        match listed {
            Ok(vms) => state.sync_node(&row.name, &vms).await,
            Err(error) => {
                tracing::warn!(node = %row.name, %error, "heartbeat: cannot list the node's VMs");
                Ok(())
            }
        }
    }
    .await;
    if let Err(e) = recorded {
        tracing::warn!(node = %row.name, error = %e, "heartbeat: cannot record the node's state");
    }
}

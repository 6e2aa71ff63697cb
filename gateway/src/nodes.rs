//! The node registry seen live: asks each registered node for its facts,
//! records who answered, and falls back to the last known facts (marked
//! unreachable, with the reason) for nodes that do not. The [`heartbeat`]
//! does the same in the background and carries VM states back.

use moat_proto::node::v1::GetNodeInfoRequest;
use moat_tools::NodeDetail;

use tokio_util::sync::CancellationToken;

use crate::gateway::Shared;
use crate::node_client::{CALL_TIMEOUT, NodeConnector};
use crate::state::{NodeRow, State, StateError};
use crate::trans;

/// Asks one node for its facts and records the outcome.
pub async fn refresh(state: &State, connector: &NodeConnector, row: &NodeRow) -> Result<NodeDetail, StateError> {
    let address = connector.address_of(&row.name, &row.address);
    let answer = match connector.client(&row.name, address) {
        Ok(mut client) => client
            .get_node_info(crate::node_client::request(GetNodeInfoRequest {}, CALL_TIMEOUT))
            .await
            .map_err(|s| describe_status(&s)),
        Err(e) => Err(e),
    };
    match answer {
        Ok(response) => {
            let mut detail = trans::node_detail(&row.name, address, response.into_inner(), String::new());
            let json = serde_json::to_string(&detail).expect("tool output types serialize");
            detail.last_seen = Some(state.node_seen(&row.name, &json).await?);
            if row.missed_heartbeats >= MISSED_HEARTBEATS_UNREACHABLE {
                tracing::info!(node = %row.name, "node is reachable again");
            }
            Ok(detail)
        }
        Err(error) => {
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
    let mut detail =
        row.last_info.as_deref().and_then(|json| serde_json::from_str::<NodeDetail>(json).ok()).unwrap_or_else(|| {
            NodeDetail {
                name: row.name.clone(),
                address: row.address.clone(),
                reachable: false,
                error: None,
                last_seen: None,
                hostname: None,
                agent_version: None,
                cpus: None,
                memory_total_mib: None,
                memory_available_mib: None,
                kernel: None,
                arch: None,
                kvm: None,
                vmms: Vec::new(),
                storage: None,
                runtime: None,
                accel: None,
                runtime_detail: None,
                images: Vec::new(),
                vm_count: None,
                allocated_vcpus: None,
                allocated_memory_mib: None,
            }
        });
    detail.address = row.address.clone();
    detail.reachable = false;
    detail.last_seen = row.last_seen.clone();
    detail.error = Some(error);
    detail
}

pub fn describe_status(status: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut message = format!("node did not answer: {} ({:?})", status.message(), status.code());
    let mut source = status.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Heartbeats missed in a row after which a node counts as unreachable.
pub const MISSED_HEARTBEATS_UNREACHABLE: i64 = 3;

/// Every `every`, asks each node for its facts and VM states and records them: VM crashes
/// reach the database (and `vm_list`) within one interval, and a node that misses
/// [`MISSED_HEARTBEATS_UNREACHABLE`] contacts in a row (heartbeats or live calls) is shown and
/// logged unreachable until it answers.
pub async fn heartbeat(shared: std::sync::Arc<Shared>, every: std::time::Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let rows = match shared.state.nodes().await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat: cannot read the node registry");
                continue;
            }
        };
        futures::future::join_all(rows.iter().map(|row| beat(&shared, row))).await;
    }
}

/// One heartbeat for one node: the same contact as `node_inspect` (facts recorded, a failure
/// counted as a miss), then its VM states.
async fn beat(shared: &Shared, row: &NodeRow) {
    let recorded = async {
        if !refresh(&shared.state, &shared.nodes, row).await?.reachable {
            return Ok(());
        }
        let address = shared.nodes.address_of(&row.name, &row.address);
        let listed = match shared.nodes.client(&row.name, address) {
            Ok(mut client) => client
                .list_vms(crate::node_client::request(moat_proto::node::v1::ListVmsRequest {}, CALL_TIMEOUT))
                .await
                .map_err(|s| describe_status(&s)),
            Err(e) => Err(e),
        };
        match listed {
            Ok(answer) => crate::vms::sync_node(&shared.state, &row.name, &answer.into_inner().vms).await,
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

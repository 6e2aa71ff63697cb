//! The node registry seen live: asks each registered node for its facts,
//! records who answered, and falls back to the last known facts (marked
//! unreachable, with the reason) for nodes that do not.

use moat_proto::node::v1::GetNodeInfoRequest;
use moat_tools::NodeDetail;

use crate::node_client::NodeConnector;
use crate::state::{NodeRow, State, StateError};
use crate::trans;

/// Asks one node for its facts and records the outcome.
pub async fn refresh(state: &State, connector: &NodeConnector, row: &NodeRow) -> Result<NodeDetail, StateError> {
    let address = connector.address_of(&row.name, &row.address);
    let answer = match connector.client(address) {
        Ok(mut client) => client.get_node_info(GetNodeInfoRequest {}).await.map_err(|s| describe_status(&s)),
        Err(e) => Err(e),
    };
    match answer {
        Ok(response) => {
            let mut detail = trans::node_detail(&row.name, address, response.into_inner(), String::new());
            let json = serde_json::to_string(&detail).expect("tool output types serialize");
            detail.last_seen = Some(state.node_seen(&row.name, &json).await?);
            Ok(detail)
        }
        Err(error) => {
            state.node_failed(&row.name, &error).await?;
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
            }
        });
    detail.address = row.address.clone();
    detail.reachable = false;
    detail.last_seen = row.last_seen.clone();
    detail.error = Some(error);
    detail
}

fn describe_status(status: &tonic::Status) -> String {
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

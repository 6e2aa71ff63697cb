//! [`NodeClient`]: the typed calls the gateway makes to one node agent. The
//! only user of the generated gRPC client, and the one place a
//! `tonic::Status` becomes a [`NodeError`]. Callers pass and get domain types;
//! `super::trans` converts.

use std::time::Duration;

use moat_proto::node::v1::node_service_client::NodeServiceClient;
use moat_proto::node::v1::{self as pb, GuestFrame};
use moat_tools::NodeDetail;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tonic::transport::Channel;

use super::trans;
use crate::store::vms::VmReport;

/// How long a node may take to answer a quick call (facts, state, logs); calls that boot or
/// stop VMs pass their own deadline.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a node may take to apply its networks (bridges, sysctls, one nft transaction).
const NET_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes per frame on a guest stream.
const FRAME: usize = 64 * 1024;

/// Why a node call failed, as the gateway may act on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// No answer (down, unreachable, timed out, connection lost): whether the node acted is unknown.
    #[error("node {node} is unreachable ({detail})")]
    Unreachable { node: String, detail: String },
    /// The node does not have what was named (a VM id).
    #[error("{message}")]
    NotFound { node: String, message: String },
    /// The node answered and refused or failed the work; its message says why.
    #[error("{message}")]
    Refused { node: String, message: String },
}

impl NodeError {
    /// The one mapping from a node's gRPC status to what the gateway makes of it.
    fn from_status(node: &str, status: tonic::Status) -> NodeError {
        use tonic::Code;
        let node = node.to_string();
        match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                NodeError::Unreachable { node, detail: describe(&status) }
            }
            Code::NotFound => NodeError::NotFound { node, message: status.message().to_string() },
            _ => NodeError::Refused { node, message: status.message().to_string() },
        }
    }
}

/// A status with its code and cause chain, for an operator.
fn describe(status: &tonic::Status) -> String {
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

/// `message` with a deadline the node sees (grpc-timeout) and enforces.
fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// What a new VM is to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVm {
    pub id: String,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub image: String,
    /// The workspace (id) it boots from.
    pub root_workspace: Option<String>,
    /// Workspaces mounted at /workspaces/<name>: (id, name, read-only).
    pub disks: Vec<(String, String, bool)>,
    /// Its network card.
    pub nic: Option<moat_node::vm::Nic>,
}

/// A node's networks as it reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNetworks {
    /// `nft list table inet moat` now.
    pub ruleset: String,
    /// Why the state it kept could not be applied at its start, if so.
    pub detail: String,
}

/// A node's block devices and how it manages its disks, as it reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDisks {
    pub snapshot: moat_tools::DiskSnapshot,
    pub management: moat_tools::DiskManagement,
    pub applier: moat_tools::DiskApplier,
}

/// How long a node may take to probe its disks (lsblk, pvs, zpool).
const DISK_PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// An image as a node reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeImage {
    pub name: String,
    /// "disk" or "initramfs".
    pub kind: String,
    pub size_bytes: u64,
    pub sha256: Option<String>,
    pub source: Option<String>,
    pub created_at: Option<String>,
}

/// A workspace as its node reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeWorkspace {
    pub id: String,
    pub size_bytes: u64,
    pub method: String,
    pub exclusive_bytes: Option<u64>,
}

/// Calls to one node. Cheap to clone: the channel is shared and cached by the connector.
#[derive(Debug, Clone)]
pub struct NodeClient {
    node: String,
    inner: NodeServiceClient<Channel>,
}

impl NodeClient {
    pub(super) fn new(node: &str, channel: Channel) -> NodeClient {
        NodeClient { node: node.to_string(), inner: NodeServiceClient::new(channel) }
    }

    pub fn name(&self) -> &str {
        &self.node
    }

    fn failed(&self) -> impl FnOnce(tonic::Status) -> NodeError + '_ {
        move |status| NodeError::from_status(&self.node, status)
    }

    /// The node's facts, as `node_inspect` shows them (reachable, never yet seen).
    pub async fn info(&self, address: &str) -> Result<NodeDetail, NodeError> {
        let info = self.inner.clone().get_node_info(request(pb::GetNodeInfoRequest {}, CALL_TIMEOUT)).await;
        Ok(trans::node_detail(&self.node, address, info.map_err(self.failed())?.into_inner(), String::new()))
    }

    pub async fn create_vm(&self, vm: &NewVm, start: bool, deadline: Duration) -> Result<VmReport, NodeError> {
        let spec = pb::VmSpec {
            id: vm.id.clone(),
            name: vm.name.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            image: vm.image.clone(),
            root_workspace: vm.root_workspace.clone().unwrap_or_default(),
            disks: vm
                .disks
                .iter()
                .map(|(id, name, read_only)| pb::DiskAttach {
                    workspace_id: id.clone(),
                    name: name.clone(),
                    read_only: *read_only,
                })
                .collect(),
            nic: vm.nic.as_ref().map(moat_node::api::nic_spec),
        };
        let answer =
            self.inner.clone().create_vm(request(pb::CreateVmRequest { spec: Some(spec), start }, deadline)).await;
        Ok(trans::vm_report(answer.map_err(self.failed())?.into_inner()))
    }

    /// Makes `state` the node's whole network state; the node applies it or keeps the last one.
    pub async fn apply_networks(&self, state: &moat_node::net::model::NetState) -> Result<NodeNetworks, NodeError> {
        let message =
            pb::ApplyNetworksRequest { state_json: serde_json::to_string(state).expect("network state serializes") };
        let answer = self.inner.clone().apply_networks(request(message, NET_TIMEOUT)).await;
        let report = answer.map_err(self.failed())?.into_inner();
        Ok(NodeNetworks { ruleset: report.ruleset, detail: report.detail })
    }

    pub async fn networks(&self) -> Result<NodeNetworks, NodeError> {
        let answer = self.inner.clone().get_networks(request(pb::GetNetworksRequest {}, CALL_TIMEOUT)).await;
        let report = answer.map_err(self.failed())?.into_inner();
        Ok(NodeNetworks { ruleset: report.ruleset, detail: report.detail })
    }

    pub async fn probe_disks(&self) -> Result<NodeDisks, NodeError> {
        let answer = self.inner.clone().probe_disks(request(pb::ProbeDisksRequest {}, DISK_PROBE_TIMEOUT)).await;
        trans::node_disks(answer.map_err(self.failed())?.into_inner())
            .map_err(|message| NodeError::Refused { node: self.node.clone(), message })
    }

    /// Hands the node generation `generation` of `layout`; its answer (applied, refused, failed).
    pub async fn apply_disk_layout(
        &self,
        layout: &moat_tools::DiskLayout,
        generation: u64,
        deadline: Duration,
    ) -> Result<moat_node::disk::ApplyReport, NodeError> {
        let message = pb::ApplyDiskLayoutRequest {
            layout_json: serde_json::to_string(layout).expect("a layout serializes"),
            generation,
        };
        let answer = self.inner.clone().apply_disk_layout(request(message, deadline)).await;
        Ok(trans::disk_report(answer.map_err(self.failed())?.into_inner()))
    }

    pub async fn list_images(&self) -> Result<Vec<NodeImage>, NodeError> {
        let answer = self.inner.clone().list_images(request(pb::ListImagesRequest {}, CALL_TIMEOUT)).await;
        Ok(answer.map_err(self.failed())?.into_inner().images.into_iter().map(trans::image).collect())
    }

    pub async fn import_image(&self, name: &str, source: &str, deadline: Duration) -> Result<NodeImage, NodeError> {
        let message = pb::ImportImageRequest { name: name.into(), source: source.into() };
        let answer = self.inner.clone().import_image(request(message, deadline)).await;
        Ok(trans::image(answer.map_err(self.failed())?.into_inner()))
    }

    pub async fn delete_image(&self, name: &str) -> Result<(), NodeError> {
        let answer = self.inner.clone().delete_image(request(pb::ImageRef { name: name.into() }, CALL_TIMEOUT)).await;
        answer.map(|_| ()).map_err(self.failed())
    }

    pub async fn create_workspace(
        &self,
        id: &str,
        name: &str,
        image: &str,
        size_gib: Option<u64>,
        deadline: Duration,
    ) -> Result<NodeWorkspace, NodeError> {
        let message = pb::CreateWorkspaceRequest {
            id: id.into(),
            name: name.into(),
            image: image.into(),
            size_gib: size_gib.unwrap_or(0),
        };
        let answer = self.inner.clone().create_workspace(request(message, deadline)).await;
        Ok(trans::workspace(answer.map_err(self.failed())?.into_inner()))
    }

    pub async fn fork_workspace(
        &self,
        from: &str,
        id: &str,
        name: &str,
        deadline: Duration,
    ) -> Result<NodeWorkspace, NodeError> {
        let message = pb::ForkWorkspaceRequest { from: from.into(), id: id.into(), name: name.into() };
        let answer = self.inner.clone().fork_workspace(request(message, deadline)).await;
        Ok(trans::workspace(answer.map_err(self.failed())?.into_inner()))
    }

    pub async fn get_workspace(&self, id: &str) -> Result<NodeWorkspace, NodeError> {
        let answer = self.inner.clone().get_workspace(request(pb::WorkspaceRef { id: id.into() }, CALL_TIMEOUT)).await;
        Ok(trans::workspace(answer.map_err(self.failed())?.into_inner()))
    }

    pub async fn delete_workspace(&self, id: &str, deadline: Duration) -> Result<(), NodeError> {
        let answer = self.inner.clone().delete_workspace(request(pb::WorkspaceRef { id: id.into() }, deadline)).await;
        answer.map(|_| ()).map_err(self.failed())
    }

    pub async fn start_vm(&self, id: &str, deadline: Duration) -> Result<VmReport, NodeError> {
        let answer = self.inner.clone().start_vm(request(pb::VmRef { id: id.to_string() }, deadline)).await;
        Ok(trans::vm_report(answer.map_err(self.failed())?.into_inner()))
    }

    /// Stops a VM: the power button, then a kill after `timeout_s` (or at once with `force`).
    pub async fn stop_vm(&self, id: &str, force: bool, timeout_s: u32) -> Result<VmReport, NodeError> {
        let deadline = Duration::from_secs(u64::from(timeout_s) + 20);
        let message = pb::StopVmRequest { id: id.to_string(), force, timeout_s };
        let answer = self.inner.clone().stop_vm(request(message, deadline)).await;
        Ok(trans::vm_report(answer.map_err(self.failed())?.into_inner()))
    }

    pub async fn delete_vm(&self, id: &str, deadline: Duration) -> Result<(), NodeError> {
        let answer = self.inner.clone().delete_vm(request(pb::VmRef { id: id.to_string() }, deadline)).await;
        answer.map(|_| ()).map_err(self.failed())
    }

    pub async fn get_vm(&self, id: &str) -> Result<VmReport, NodeError> {
        let answer = self.inner.clone().get_vm(request(pb::VmRef { id: id.to_string() }, CALL_TIMEOUT)).await;
        Ok(trans::vm_report(answer.map_err(self.failed())?.into_inner()))
    }

    pub async fn list_vms(&self) -> Result<Vec<VmReport>, NodeError> {
        let answer = self.inner.clone().list_vms(request(pb::ListVmsRequest {}, CALL_TIMEOUT)).await;
        Ok(answer.map_err(self.failed())?.into_inner().vms.into_iter().map(trans::vm_report).collect())
    }

    /// The console's last `tail_bytes`, and whether older output exists.
    pub async fn vm_logs(&self, id: &str, tail_bytes: u64) -> Result<(String, bool), NodeError> {
        let message = pb::VmLogsRequest { id: id.to_string(), tail_bytes };
        let answer = self.inner.clone().vm_logs(request(message, CALL_TIMEOUT)).await;
        let logs = answer.map_err(self.failed())?.into_inner();
        Ok((logs.text, logs.truncated))
    }

    /// A byte stream to `port` of VM `vm_id`'s guest, spliced through the node's `GuestStream`.
    /// The node waits up to `connect_timeout` for the guest to accept. Dropping the stream
    /// closes the connection in the guest.
    pub async fn guest_stream(
        &self,
        vm_id: &str,
        port: u32,
        connect_timeout: Duration,
    ) -> Result<DuplexStream, NodeError> {
        let first = GuestFrame {
            vm_id: vm_id.to_string(),
            port,
            connect_timeout_ms: u32::try_from(connect_timeout.as_millis()).unwrap_or(u32::MAX),
            ..GuestFrame::default()
        };
        self.frames(first, false).await
    }

    /// Portal connections guests open to this node, as the node offers them; the stream stays
    /// open until either side goes away.
    pub async fn portal_listen(&self) -> Result<PortalOffers, NodeError> {
        let mut request = tonic::Request::new(pb::PortalListenRequest {});
        request.set_timeout(Duration::from_secs(365 * 24 * 3600));
        let offers = self.inner.clone().portal_listen(request).await.map_err(self.failed())?.into_inner();
        Ok(PortalOffers { node: self.node.clone(), offers })
    }

    /// Takes an offered portal connection: a byte stream to the guest's `moat-guest mcp`.
    pub async fn portal_attach(&self, session: &str) -> Result<DuplexStream, NodeError> {
        let first = GuestFrame { session: session.to_string(), ..GuestFrame::default() };
        self.frames(first, true).await
    }

    /// Opens a frame stream (GuestStream, or PortalAttach when `portal`) with `first` and
    /// splices it to an in-memory pipe the caller reads and writes.
    async fn frames(&self, first: GuestFrame, portal: bool) -> Result<DuplexStream, NodeError> {
        let (to_node, outbound) = tokio::sync::mpsc::channel::<GuestFrame>(16);
        to_node.send(first).await.expect("the receiver is held just below");
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outbound));
        request.set_timeout(Duration::from_secs(24 * 3600));
        let mut client = self.inner.clone();
        let answer = if portal { client.portal_attach(request).await } else { client.guest_stream(request).await };
        let mut inbound = answer.map_err(self.failed())?.into_inner();
        let (ours, theirs) = tokio::io::duplex(4 * FRAME);
        let (mut from_caller, mut to_caller) = tokio::io::split(theirs);
        tokio::spawn(async move {
            let mut buf = vec![0u8; FRAME];
            loop {
                match from_caller.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let frame = GuestFrame { data: buf[..n].to_vec(), ..GuestFrame::default() };
                        if to_node.send(frame).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        tokio::spawn(async move {
            while let Ok(Some(frame)) = inbound.message().await {
                if to_caller.write_all(&frame.data).await.is_err() {
                    return;
                }
            }
            let _ = to_caller.shutdown().await;
        });
        Ok(ours)
    }
}

/// A connection a guest opened to its node, waiting for the gateway to take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortalOffer {
    pub session: String,
    /// The VM whose vsock device it came from.
    pub vm_id: String,
}

/// The offers of one `portal_listen` stream.
pub struct PortalOffers {
    node: String,
    offers: tonic::Streaming<pb::PortalOffer>,
}

impl PortalOffers {
    /// The next offer; `None` when the node ended the stream.
    pub async fn next(&mut self) -> Result<Option<PortalOffer>, NodeError> {
        match self.offers.message().await {
            Ok(offer) => Ok(offer.map(trans::portal_offer)),
            Err(status) => Err(NodeError::from_status(&self.node, status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_what_the_gateway_can_act_on() {
        use tonic::{Code, Status};
        let cases = [
            (Code::Unavailable, "unreachable"),
            (Code::DeadlineExceeded, "unreachable"),
            (Code::Cancelled, "unreachable"),
            (Code::Unknown, "unreachable"),
            (Code::NotFound, "not found"),
            (Code::FailedPrecondition, "refused"),
            (Code::InvalidArgument, "refused"),
            (Code::AlreadyExists, "refused"),
            (Code::Aborted, "refused"),
            (Code::Internal, "refused"),
        ];
        for (code, want) in cases {
            let got = match NodeError::from_status("n1", Status::new(code, "why")) {
                NodeError::Unreachable { node, detail } => {
                    assert_eq!(node, "n1");
                    assert!(detail.contains("why"), "{detail}");
                    "unreachable"
                }
                NodeError::NotFound { message, .. } => {
                    assert_eq!(message, "why");
                    "not found"
                }
                NodeError::Refused { message, .. } => {
                    assert_eq!(message, "why");
                    "refused"
                }
            };
            assert_eq!(got, want, "{code:?}");
        }
    }
}

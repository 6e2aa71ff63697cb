//! The tonic `NodeService`: decode the request, call the module that does the
//! work, encode the answer. Conversions live in `trans`, the one error →
//! `tonic::Status` mapping in `status`, the guest tunnel in [`tunnel`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use moat_proto::node::v1::{self as pb, GetNodeInfoRequest, NodeInfo, node_service_server::NodeService};
use tonic::{Request, Response, Status};

mod status;
mod trans;

pub use trans::nic_spec;
pub mod tunnel;

use status::{disk_probe_status, net_status, probe_status, storage_status, vm_status};

use crate::disk::probe::MoatPath;
use crate::disk::{DiskSettings, Disks};
use crate::probe;
use crate::vm::VmManager;
use moat_tools::RefusalCode;

/// `stream` until it ends or `stop` is cancelled (the node shutting down), whichever is first.
fn until_stopped<S>(
    stream: S,
    stop: tokio_util::sync::CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<S::Item>
where
    S: tokio_stream::Stream + Send + 'static,
    S::Item: Send + 'static,
{
    use tokio_stream::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        tokio::pin!(stream);
        loop {
            let item = tokio::select! {
                () = stop.cancelled() => break,
                item = stream.next() => item,
            };
            let Some(item) = item else { break };
            if tx.send(item).await.is_err() {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Node identity and configuration the service needs to answer.
#[derive(Debug, Clone)]
pub struct NodeApi {
    name: String,
    storage_root: PathBuf,
    vms: VmManager,
    disks: std::sync::Arc<Disks>,
}

impl NodeApi {
    /// A node that plans disk layouts but never applies them (installer-only); see
    /// [`NodeApi::with_disks`].
    pub fn new(name: impl Into<String>, storage_root: impl Into<PathBuf>, vms: VmManager) -> Self {
        let (name, storage_root) = (name.into(), storage_root.into());
        let disks = std::sync::Arc::new(Disks::new(&name, DiskSettings::new(&storage_root)));
        Self { name, storage_root, vms, disks }
    }

    /// How this node manages its disks.
    pub fn with_disks(mut self, settings: DiskSettings) -> Self {
        self.disks = std::sync::Arc::new(Disks::new(&self.name, settings));
        self
    }

    /// What moat keeps on this host's devices: storage, VM directories, each VM's disks.
    fn moat_paths(&self) -> Vec<MoatPath> {
        let mut paths = vec![MoatPath {
            path: self.vms.vms_root().to_path_buf(),
            code: RefusalCode::VmDisk,
            what: format!("moat's VM directories at {}", self.vms.vms_root().display()),
        }];
        if let Some(storage) = self.vms.storage() {
            paths.push(MoatPath {
                path: storage.root().to_path_buf(),
                code: RefusalCode::WorkspaceStorage,
                what: format!("moat's image and workspace storage at {}", storage.root().display()),
            });
        }
        for vm in self.vms.list() {
            for disk in &vm.config.disks {
                paths.push(MoatPath {
                    path: disk.path.clone(),
                    code: RefusalCode::VmDisk,
                    what: format!("VM {} ({})'s disk {}", vm.config.name, vm.config.id, disk.path.display()),
                });
            }
        }
        paths
    }

    pub fn vms(&self) -> &VmManager {
        &self.vms
    }

    fn storage(&self) -> Result<&crate::storage::Storage, Status> {
        self.vms.storage().ok_or_else(|| {
            Status::failed_precondition(format!("node {} has no storage for disk images and workspaces", self.name))
        })
    }

    fn networks(&self) -> Result<&crate::net::host::Networks, Status> {
        self.vms
            .networks()
            .ok_or_else(|| Status::failed_precondition(format!("node {} does not manage networks", self.name)))
    }

    pub fn into_service(self) -> moat_proto::node::v1::node_service_server::NodeServiceServer<Self> {
        moat_proto::node::v1::node_service_server::NodeServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn get_node_info(&self, _request: Request<GetNodeInfoRequest>) -> Result<Response<NodeInfo>, Status> {
        let info = probe::host_info(&self.name, &self.storage_root).await.map_err(probe_status)?;
        Ok(Response::new(trans::node_info(info, &self.vms)))
    }

    async fn create_vm(&self, request: Request<pb::CreateVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let request = request.into_inner();
        let spec = request.spec.ok_or_else(|| Status::invalid_argument("CreateVm needs a spec"))?;
        let view = self.vms.create(&trans::new_vm(spec)?, request.start).await.map_err(vm_status)?;
        Ok(Response::new(trans::vm(view)))
    }

    async fn start_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let view = self.vms.start(&request.into_inner().id).await.map_err(vm_status)?;
        Ok(Response::new(trans::vm(view)))
    }

    async fn stop_vm(&self, request: Request<pb::StopVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let request = request.into_inner();
        let timeout = match request.timeout_s {
            0 => crate::vm::DEFAULT_STOP_TIMEOUT,
            s => Duration::from_secs(u64::from(s)),
        };
        let view = self.vms.stop(&request.id, request.force, timeout).await.map_err(vm_status)?;
        Ok(Response::new(trans::vm(view)))
    }

    async fn delete_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::DeleteVmResponse>, Status> {
        self.vms.delete(&request.into_inner().id).await.map_err(vm_status)?;
        Ok(Response::new(pb::DeleteVmResponse {}))
    }

    async fn get_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let view = self.vms.get(&request.into_inner().id).map_err(vm_status)?;
        Ok(Response::new(trans::vm(view)))
    }

    async fn list_vms(&self, _request: Request<pb::ListVmsRequest>) -> Result<Response<pb::ListVmsResponse>, Status> {
        Ok(Response::new(pb::ListVmsResponse { vms: self.vms.list().into_iter().map(trans::vm).collect() }))
    }

    type GuestStreamStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GuestFrame, Status>> + Send + 'static>>;

    async fn guest_stream(
        &self,
        request: Request<tonic::Streaming<pb::GuestFrame>>,
    ) -> Result<Response<Self::GuestStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("GuestStream needs a first frame naming vm_id and port"))?;
        let wait = match first.connect_timeout_ms {
            0 => Duration::from_secs(10),
            ms => Duration::from_millis(u64::from(ms)),
        };
        let stream = self.vms.guest_connect(&first.vm_id, first.port, wait).await.map_err(vm_status)?;
        Ok(Response::new(Box::pin(tunnel::splice(stream, first.data, inbound))))
    }

    type PortalListenStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::PortalOffer, Status>> + Send + 'static>>;

    async fn portal_listen(
        &self,
        _request: Request<pb::PortalListenRequest>,
    ) -> Result<Response<Self::PortalListenStream>, Status> {
        use tokio_stream::StreamExt;
        let offers = tokio_stream::wrappers::ReceiverStream::new(self.vms.uplinks().listen());
        let offers = offers.map(|offer| Ok(trans::portal_offer(offer)));
        Ok(Response::new(Box::pin(until_stopped(offers, self.vms.uplinks().stopping()))))
    }

    type PortalAttachStream = Self::GuestStreamStream;

    async fn portal_attach(
        &self,
        request: Request<tonic::Streaming<pb::GuestFrame>>,
    ) -> Result<Response<Self::PortalAttachStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("PortalAttach needs a first frame naming the session"))?;
        let (_vm, conn) = self.vms.uplinks().take(&first.session).ok_or_else(|| {
            Status::not_found(format!(
                "no portal session `{}` waits on node {} (taken already, or closed after {:?})",
                first.session,
                self.name,
                crate::uplink::OFFER_TTL
            ))
        })?;
        let session = tunnel::splice(conn, first.data, inbound);
        Ok(Response::new(Box::pin(until_stopped(session, self.vms.uplinks().stopping()))))
    }

    async fn list_images(
        &self,
        _request: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let mut images: Vec<pb::Image> = Vec::new();
        let storage = self.vms.storage();
        for name in self.vms.images() {
            match storage.and_then(|s| s.image(&name).ok()) {
                Some(meta) => images.push(trans::disk_image(meta)),
                None => images.push(trans::initramfs_image(name.clone(), self.vms.initramfs_bytes(&name))),
            }
        }
        Ok(Response::new(pb::ListImagesResponse { images }))
    }

    async fn import_image(&self, request: Request<pb::ImportImageRequest>) -> Result<Response<pb::Image>, Status> {
        let request = request.into_inner();
        if self.vms.images().contains(&request.name) {
            return Err(Status::already_exists(format!(
                "an image named `{}` already exists on this node",
                request.name
            )));
        }
        let meta =
            self.storage()?.import_image(&request.name, Path::new(&request.source)).await.map_err(storage_status)?;
        Ok(Response::new(trans::disk_image(meta)))
    }

    async fn delete_image(&self, request: Request<pb::ImageRef>) -> Result<Response<pb::DeleteImageResponse>, Status> {
        self.storage()?.delete_image(&request.into_inner().name).await.map_err(storage_status)?;
        Ok(Response::new(pb::DeleteImageResponse {}))
    }

    async fn create_workspace(
        &self,
        request: Request<pb::CreateWorkspaceRequest>,
    ) -> Result<Response<pb::Workspace>, Status> {
        let r = request.into_inner();
        let size = (r.size_gib > 0).then_some(r.size_gib);
        let meta = self.storage()?.create_workspace(&r.id, &r.name, &r.image, size).await.map_err(storage_status)?;
        Ok(Response::new(trans::workspace(meta, None)))
    }

    async fn fork_workspace(
        &self,
        request: Request<pb::ForkWorkspaceRequest>,
    ) -> Result<Response<pb::Workspace>, Status> {
        let r = request.into_inner();
        let meta = self.storage()?.fork_workspace(&r.from, &r.id, &r.name).await.map_err(storage_status)?;
        Ok(Response::new(trans::workspace(meta, None)))
    }

    async fn get_workspace(&self, request: Request<pb::WorkspaceRef>) -> Result<Response<pb::Workspace>, Status> {
        let view = self.storage()?.workspace(&request.into_inner().id).await.map_err(storage_status)?;
        Ok(Response::new(trans::workspace_view(view)))
    }

    async fn delete_workspace(
        &self,
        request: Request<pb::WorkspaceRef>,
    ) -> Result<Response<pb::DeleteWorkspaceResponse>, Status> {
        let id = request.into_inner().id;
        // The node's own guard: never pull a disk from under a VMM that may be running.
        if let Some(vm) = self.vms.using_workspace(&id) {
            return Err(Status::failed_precondition(format!(
                "workspace {id} is a disk of vm {} ({}); stop the VM first",
                vm.config.id, vm.status.state
            )));
        }
        self.storage()?.delete_workspace(&id).await.map_err(storage_status)?;
        Ok(Response::new(pb::DeleteWorkspaceResponse {}))
    }

    async fn apply_networks(
        &self,
        request: Request<pb::ApplyNetworksRequest>,
    ) -> Result<Response<pb::NetworksReport>, Status> {
        let networks = self.networks()?;
        let state: crate::net::model::NetState = serde_json::from_str(&request.into_inner().state_json)
            .map_err(|e| Status::invalid_argument(format!("the network state does not parse: {e}")))?;
        networks.set(state).await.map_err(net_status)?;
        // No listing of the ruleset here: at 1,000 VMs `nft list` costs as much as applying.
        Ok(Response::new(pb::NetworksReport { ruleset: String::new(), detail: networks.detail() }))
    }

    async fn get_networks(
        &self,
        _request: Request<pb::GetNetworksRequest>,
    ) -> Result<Response<pb::NetworksReport>, Status> {
        let networks = self.networks()?;
        Ok(Response::new(pb::NetworksReport { ruleset: networks.ruleset().await, detail: networks.detail() }))
    }

    async fn probe_disks(&self, _request: Request<pb::ProbeDisksRequest>) -> Result<Response<pb::DiskProbe>, Status> {
        let snapshot = self.disks.snapshot(&self.moat_paths()).await.map_err(disk_probe_status)?;
        Ok(Response::new(trans::disk_probe(&snapshot, self.disks.settings())))
    }

    async fn apply_disk_layout(
        &self,
        request: Request<pb::ApplyDiskLayoutRequest>,
    ) -> Result<Response<pb::DiskLayoutReport>, Status> {
        let (layout, generation) = trans::disk_layout(request.into_inner())?;
        if layout.spec.node != self.name {
            return Err(Status::invalid_argument(format!(
                "layout {} is for node {}, not {}",
                layout.metadata.name, layout.spec.node, self.name
            )));
        }
        let report = self.disks.apply(&layout, generation, &self.moat_paths()).await;
        Ok(Response::new(trans::disk_report(report)))
    }

    async fn vm_logs(&self, request: Request<pb::VmLogsRequest>) -> Result<Response<pb::VmLogsResponse>, Status> {
        let request = request.into_inner();
        let (text, truncated) = self.vms.logs(&request.id, request.tail_bytes).map_err(vm_status)?;
        Ok(Response::new(pb::VmLogsResponse { text, truncated }))
    }
}

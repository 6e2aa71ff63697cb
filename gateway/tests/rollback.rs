//! `vm_create` when the node fails: a recording fake node agent (a real tonic
//! server on a Unix socket, speaking the real gRPC contract) takes the VM and
//! then fails; the gateway must release the reservation (no row, quota free),
//! ask the node to remove whatever it may have made, and say nothing changed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::Path;
use std::sync::{Arc, Mutex};

use moat_gateway::app::{CallContext, Shared};
use moat_gateway::config::PolicySource;
use moat_gateway::guest::Sessions;
use moat_gateway::nodes::connector::NodeConnector;
use moat_gateway::nodes::pki::Pki;
use moat_gateway::principal::{Principal, Role, Transport};
use moat_gateway::security::authz::Authz;
use moat_gateway::store::audit::AuditLog;
use moat_gateway::store::keys::KeyChecker;
use moat_gateway::store::{Durability, State};
use moat_gateway::tools::{ToolError, vms};
use moat_proto::node::v1::node_service_server::{NodeService, NodeServiceServer};
use moat_proto::node::v1::{self as pb};
use tonic::{Request, Response, Status};

/// What the fake node was asked, in order.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl Recorder {
    fn push(&self, what: String) {
        self.0.lock().unwrap().push(what);
    }
    fn calls(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// A node that has room and the image, accepts a create, then fails it as a node that lost
/// its VMM (or its connection) would.
struct FailingNode {
    seen: Recorder,
    create: Failure,
}

type Frames = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GuestFrame, Status>> + Send>>;

#[tonic::async_trait]
impl NodeService for FailingNode {
    async fn get_node_info(&self, _: Request<pb::GetNodeInfoRequest>) -> Result<Response<pb::NodeInfo>, Status> {
        Ok(Response::new(pb::NodeInfo {
            name: "n1".into(),
            hostname: "fake".into(),
            cpus: 4,
            memory_total_bytes: 8 << 30,
            memory_available_bytes: 8 << 30,
            runtime: "qemu".into(),
            accel: "tcg".into(),
            images: vec!["base".into()],
            ..pb::NodeInfo::default()
        }))
    }
    async fn create_vm(&self, request: Request<pb::CreateVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let spec = request.into_inner().spec.unwrap();
        self.seen.push(format!("create {}", spec.id));
        Err((self.create)())
    }
    async fn delete_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::DeleteVmResponse>, Status> {
        self.seen.push(format!("delete {}", request.into_inner().id));
        Ok(Response::new(pb::DeleteVmResponse {}))
    }
    async fn list_vms(&self, _: Request<pb::ListVmsRequest>) -> Result<Response<pb::ListVmsResponse>, Status> {
        Ok(Response::new(pb::ListVmsResponse::default()))
    }
    async fn start_vm(&self, _: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn stop_vm(&self, _: Request<pb::StopVmRequest>) -> Result<Response<pb::Vm>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn get_vm(&self, _: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn vm_logs(&self, _: Request<pb::VmLogsRequest>) -> Result<Response<pb::VmLogsResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    type GuestStreamStream = Frames;
    async fn guest_stream(&self, _: Request<tonic::Streaming<pb::GuestFrame>>) -> Result<Response<Frames>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    type PortalListenStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::PortalOffer, Status>> + Send + 'static>>;
    async fn portal_listen(
        &self,
        _: Request<pb::PortalListenRequest>,
    ) -> Result<Response<Self::PortalListenStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    type PortalAttachStream = Frames;
    async fn portal_attach(&self, _: Request<tonic::Streaming<pb::GuestFrame>>) -> Result<Response<Frames>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn list_images(&self, _: Request<pb::ListImagesRequest>) -> Result<Response<pb::ListImagesResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn import_image(&self, _: Request<pb::ImportImageRequest>) -> Result<Response<pb::Image>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn delete_image(&self, _: Request<pb::ImageRef>) -> Result<Response<pb::DeleteImageResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn create_workspace(
        &self,
        _: Request<pb::CreateWorkspaceRequest>,
    ) -> Result<Response<pb::Workspace>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn fork_workspace(&self, _: Request<pb::ForkWorkspaceRequest>) -> Result<Response<pb::Workspace>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn get_workspace(&self, _: Request<pb::WorkspaceRef>) -> Result<Response<pb::Workspace>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn delete_workspace(
        &self,
        _: Request<pb::WorkspaceRef>,
    ) -> Result<Response<pb::DeleteWorkspaceResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn apply_networks(
        &self,
        _: Request<pb::ApplyNetworksRequest>,
    ) -> Result<Response<pb::NetworksReport>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn get_networks(&self, _: Request<pb::GetNetworksRequest>) -> Result<Response<pb::NetworksReport>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn probe_disks(&self, _: Request<pb::ProbeDisksRequest>) -> Result<Response<pb::DiskProbe>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn apply_disk_layout(
        &self,
        _: Request<pb::ApplyDiskLayoutRequest>,
    ) -> Result<Response<pb::DiskLayoutReport>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// Serves `node` on a Unix socket in `dir`; returns its address.
fn serve(dir: &Path, node: FailingNode) -> String {
    let socket = dir.join("node.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(NodeServiceServer::new(node))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    format!("unix:{}", socket.display())
}

async fn shared(dir: &Path, node_address: &str) -> Shared {
    let db = dir.join("moat.db");
    let state = State::open(&db).await.unwrap();
    state.add_node("n1", node_address).await.unwrap();
    Shared {
        state,
        nodes: Arc::new(NodeConnector::new(Pki::at(dir), None)),
        authz: Authz::load(&PolicySource::Embedded).unwrap(),
        audit: AuditLog::start(&db, Durability::Process).unwrap(),
        keys: KeyChecker::open(&db).unwrap(),
        guest: Sessions::default(),
    }
}

fn alice() -> CallContext {
    CallContext {
        principal: Principal::new("alice", Role::Agent),
        transport: Transport::Stdio,
        protocol_version: None,
        session: None,
        cancel: tokio_util::sync::CancellationToken::new(),
        progress: None,
        vm: None,
    }
}

fn input(name: &str) -> moat_tools::VmCreateInput {
    serde_json::from_value(serde_json::json!({"name": name, "vcpus": 1, "memory_mib": 256})).unwrap()
}

/// How the fake node fails a create.
type Failure = fn() -> Status;

#[tokio::test]
async fn a_create_the_node_fails_is_rolled_back_everywhere() {
    let cases: [(Failure, &str); 2] = [
        (|| Status::unavailable("connection reset"), "nothing was changed"),
        (|| Status::aborted("vm vm-x: cannot start qemu: no such file"), "cannot start qemu"),
    ];
    for (create, says) in cases {
        let dir = tempfile::tempdir().unwrap();
        let seen = Recorder::default();
        let address = serve(dir.path(), FailingNode { seen: seen.clone(), create });
        let shared = shared(dir.path(), &address).await;

        let err = vms::create(&shared, &alice(), input("web")).await.unwrap_err();
        let ToolError::Node(message) = &err else { panic!("a node failure is the node's: {err:?}") };
        assert!(message.contains(says), "{message}");

        let calls = seen.calls();
        assert_eq!(calls.len(), 2, "{calls:?}");
        let id = calls[0].strip_prefix("create ").unwrap();
        assert_eq!(calls[1], format!("delete {id}"), "the node is asked to remove what it may have made");
        assert!(shared.state.vms().await.unwrap().is_empty(), "the reservation is released");
        assert!(shared.state.vm_by_id(id).await.unwrap().is_none());
        // The name and the quota are free again: the next create reaches the node.
        vms::create(&shared, &alice(), input("web")).await.unwrap_err();
        assert_eq!(seen.calls().len(), 4);
    }
}

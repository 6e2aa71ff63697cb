//! The tonic `NodeService`: decode the request, call the module that does the
//! work, encode the answer. Node errors become `tonic::Status` in exactly one
//! place, [`status_of`].

use std::path::PathBuf;

use moat_proto::node::v1::{GetNodeInfoRequest, NodeInfo, node_service_server::NodeService};
use tonic::{Request, Response, Status};

use crate::probe::{self, ProbeError};
use crate::trans;

/// Node identity and configuration the service needs to answer.
#[derive(Debug, Clone)]
pub struct NodeApi {
    name: String,
    storage_root: PathBuf,
}

impl NodeApi {
    pub fn new(name: impl Into<String>, storage_root: impl Into<PathBuf>) -> Self {
        Self { name: name.into(), storage_root: storage_root.into() }
    }

    pub fn into_service(self) -> moat_proto::node::v1::node_service_server::NodeServiceServer<Self> {
        moat_proto::node::v1::node_service_server::NodeServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn get_node_info(&self, _request: Request<GetNodeInfoRequest>) -> Result<Response<NodeInfo>, Status> {
        let info = probe::host_info(&self.name, &self.storage_root).await.map_err(status_of)?;
        Ok(Response::new(trans::node_info(info)))
    }
}

fn status_of(err: ProbeError) -> Status {
    // Keep the cause chain in the message: the gateway shows it to an operator.
    let message = error_chain(&err);
    match err {
        ProbeError::Read { .. } => Status::internal(message),
        ProbeError::Storage { .. } => Status::failed_precondition(message),
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

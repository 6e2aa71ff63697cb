//! The one mapping from node errors to `tonic::Status`. The code says what
//! the gateway may conclude (not found, refused, unreachable); the message
//! keeps the cause chain, since the gateway shows it to an operator.

use tonic::Status;

use crate::disk::probe::ProbeError as DiskProbeError;
use crate::net::apply::ApplyError;
use crate::probe::ProbeError;
use crate::storage::StorageError;
use crate::vm::VmError;

pub(super) fn probe_status(err: ProbeError) -> Status {
    // Keep the cause chain in the message: the gateway shows it to an operator.
    let message = crate::errors::chain(&err);
    match err {
        ProbeError::Read { .. } => Status::internal(message),
        ProbeError::Storage { .. } => Status::failed_precondition(message),
    }
}

pub(super) fn vm_status(err: VmError) -> Status {
    let message = crate::errors::chain(&err);
    match err {
        VmError::NotFound(_) => Status::not_found(message),
        VmError::Exists(_) => Status::already_exists(message),
        VmError::Invalid(_) => Status::invalid_argument(message),
        VmError::NoRuntime { .. } | VmError::NoImage { .. } | VmError::WrongState { .. } => {
            Status::failed_precondition(message)
        }
        VmError::Vmm { .. } => Status::aborted(message),
        VmError::NoVsock { .. } | VmError::AgentUnreachable { .. } => Status::failed_precondition(message),
        VmError::Io { .. } => Status::internal(message),
        VmError::Storage(e) => storage_status(e),
    }
}

pub(super) fn storage_status(err: StorageError) -> Status {
    let message = crate::errors::chain(&err);
    match err {
        StorageError::Invalid(_) => Status::invalid_argument(message),
        StorageError::NotFound(_) => Status::not_found(message),
        StorageError::Exists(_) => Status::already_exists(message),
        StorageError::Full { .. } => Status::resource_exhausted(message),
        StorageError::Io { .. } => Status::internal(message),
    }
}

pub(super) fn net_status(err: ApplyError) -> Status {
    let message = crate::errors::chain(&err);
    match err {
        ApplyError::Invalid(_) | ApplyError::Missing { .. } => Status::invalid_argument(message),
        ApplyError::NoNft => Status::failed_precondition(message),
        ApplyError::Command { .. } => Status::aborted(message),
    }
}

pub(super) fn disk_probe_status(err: DiskProbeError) -> Status {
    let message = crate::errors::chain(&err);
    match err {
        DiskProbeError::Lsblk(_) => Status::failed_precondition(format!("{message} (install util-linux)")),
        DiskProbeError::LsblkFailed(_) | DiskProbeError::Parse(_) => Status::internal(message),
    }
}

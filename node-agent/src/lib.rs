//! `moat-node`: the agent on each host. It serves the gRPC `NodeService`
//! (`proto/moat/node/v1`) over TCP, or over a Unix socket when embedded in
//! `moat serve`, and does the host work behind it.
//!
//! Module map: [`api`] is the tonic service (thin: decode, call, encode);
//! [`probe`] reads host facts; [`kvm`] decides whether KVM can actually run
//! guests; [`cmd`] is the only place that runs external programs;
//! [`server`] binds listeners (mTLS via [`tls`]) and shuts down gracefully; [`vm`] runs VMs
//! (their directories, VMM processes and states); [`trans`] is the one
//! module converting domain types to proto types.

pub mod api;
pub mod cmd;
pub mod kvm;
pub mod probe;
pub mod server;
pub mod tls;
mod trans;
pub mod tunnel;
pub mod vm;

pub use api::NodeApi;
pub use server::{ListenAddr, NodeServerError, serve};

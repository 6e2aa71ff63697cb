//! `moat-node`: the agent on each host. It serves the gRPC `NodeService`
//! (`proto/moat/node/v1`) over TCP, or over a Unix socket when embedded in
//! `moat serve`, and does the host work behind it.
//!
//! Module map, top to bottom (a module uses only those below it, which
//! gateway/tests/layering.rs checks): [`server`] binds listeners (mTLS via [`tls`])
//! and serves [`api`], the tonic service (decode, call, encode; its `trans` is the
//! one place converting between proto and domain types, its `status` the one
//! error → `Status` map, [`api::tunnel`] the guest stream); [`vm`] runs VMs (state
//! machine, monitor, agent watcher); [`vmm`] is the narrow driver trait with
//! detection and the QEMU driver; beside it, [`storage`] (images, workspaces), [`net`]
//! (bridges, nftables) and [`disk`] (DiskLayouts: pure classifier, planner and disko renderer,
//! and the gate that applies them); [`dir`] is one VM's directory on disk; [`probe`]
//! and [`kvm`] read host facts; [`vsock`] reaches guest ports; [`cmd`] is the only
//! place that runs external programs; [`errors`] writes cause chains.

pub mod api;
pub mod cmd;
pub mod dir;
pub mod disk;
pub mod errors;
pub mod kvm;
pub mod net;
pub mod nofollow;
pub mod probe;
pub mod server;
pub mod storage;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
pub mod uplink;
pub mod vm;
pub mod vmm;
pub mod vsock;

pub use api::NodeApi;
pub use server::{ListenAddr, NodeServerError, serve};

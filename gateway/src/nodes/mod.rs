//! Reaching node agents: connections and clients ([`client`]), the one place
//! converting node proto types ([`trans`]), the registry seen live and the
//! heartbeat ([`registry`]), and moat's PKI for mutual TLS ([`pki`]).

pub mod client;
pub mod connector;
pub mod pki;
pub mod registry;
pub mod trans;

pub use registry::{MISSED_HEARTBEATS_UNREACHABLE, heartbeat, refresh, refresh_all};

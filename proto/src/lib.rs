//! Generated gRPC types for the gateway ↔ node contract (`proto/moat/node/v1`).
//!
//! This crate holds what `tonic-prost-build` generates, so the gateway and
//! every node agent compile against the same definitions, and the one wire
//! format both write by hand: [`time`].

/// `moat.node.v1`: the node agent's API.
pub mod node {
    pub mod v1 {
        tonic::include_proto!("moat.node.v1");
    }
}

pub mod time;
pub mod tuning;

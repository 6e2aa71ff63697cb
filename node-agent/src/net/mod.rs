//! Networks on this node: the state they are rendered from ([`model`]), the nftables table
//! `inet moat` as a pure function of it ([`render`]), and short interface names ([`names`]).
//! Bridges, taps and the whole ruleset are applied from the same state, idempotently; [`host`]
//! keeps that state across restarts and opens VMs' taps.

pub mod apply;
pub mod host;
pub mod model;
pub mod names;
pub mod render;

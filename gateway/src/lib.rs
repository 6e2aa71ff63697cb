//! The moat gateway: MCP transports (stdio, Streamable HTTP), the tool-call
//! pipeline, durable state, and routing to node agents over gRPC.
//!
//! Code map: [`gateway`] is the MCP server and pipeline; [`handlers`] does
//! each tool; [`catalog`] lists tools and validates arguments; [`state`] is
//! SQLite; [`nodes`] and [`node_client`] reach node agents; [`trans`]
//! converts proto types; [`stdio`] and [`http`] are the transports;
//! [`serve`] wires it together; [`config`] resolves settings.

pub mod audit;
pub mod authz;
pub mod catalog;
pub mod config;
pub mod gateway;
pub mod guest;
pub mod handlers;
pub mod http;
pub mod image;
pub mod keys;
pub mod limits;
pub mod node_client;
pub mod nodes;
pub mod pki;
pub mod principal;
pub mod prompts;
pub mod serve;
pub mod state;
pub mod stdio;
pub mod trans;
pub mod vm_store;
pub mod vms;

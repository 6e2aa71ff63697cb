//! The moat gateway: MCP transports (stdio, Streamable HTTP), the tool-call
//! pipeline, durable state, and routing to node agents over gRPC.
//!
//! Modules, top to bottom; a module uses only those below it (`tests/layering.rs`
//! checks it): [`cli`] (operator subcommands) → [`serve`] (wiring) → [`mcp`] (the
//! server handler, the pipeline and the one outcome → MCP mapping, catalog, prompts,
//! stdio, http) → [`tools`] (one file per domain, the exhaustive dispatch,
//! `ToolError`) → [`app`] (what every call shares) → [`security`] (authz, limits,
//! resource refs) and [`guest`] (sessions with guest agents) → [`nodes`] (node
//! clients, conversions, registry and heartbeat, PKI) → [`store`] (all SQL) → the
//! leaves [`config`], [`principal`], [`names`], [`image`].

pub mod app;
pub mod cli;
pub mod config;
pub mod guest;
pub mod image;
pub mod mcp;
pub mod names;
pub mod nodes;
pub mod principal;
pub mod security;
pub mod serve;
pub mod store;
pub mod tools;

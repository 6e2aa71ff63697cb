//! The agent's parts, as a library so the binary (`main.rs`) and the fuzz
//! targets (`fuzz/`) run the same code: the control channel, the MCP server's
//! request decoding and tools, and the listeners.

pub mod control;
pub mod exec;
pub mod files;
pub mod listen;
pub mod mcp;
pub mod uplink;

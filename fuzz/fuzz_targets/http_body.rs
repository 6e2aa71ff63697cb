//! The HTTP JSON-RPC guard (`moat_gateway::mcp::http::check_body`) in front of rmcp's streamable
//! HTTP server: any POST body. The guard never panics, refuses with a message that says what is
//! wrong, and never refuses a body rmcp would take as a client message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_gateway::mcp::http::check_body;
use rmcp::model::ClientJsonRpcMessage;

fuzz_target!(|data: &[u8]| {
    let guard = check_body(data);
    if serde_json::from_slice::<ClientJsonRpcMessage>(data).is_ok() {
        assert!(guard.is_ok(), "the guard refuses a body rmcp accepts: {guard:?}");
    }
    if let Err(message) = guard {
        assert!(message.starts_with("parse error: "), "{message}");
    }
});

//! Tool argument decoding: the first byte picks a tool, the rest is its `arguments` as JSON.
//! Schema validation (`Catalog::validate`, what the gateway runs first) and typed decoding
//! (`ToolCall::decode`, what the tools then get) must agree: arguments the schema accepts always
//! decode, and every refusal names where it is and what is wrong.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use moat_gateway::mcp::catalog::Catalog;
use moat_tools::{JsonObject, ToolCall, ToolName};
use serde_json::Value;

static CATALOG: LazyLock<Catalog> = LazyLock::new(Catalog::build);

fuzz_target!(|data: &[u8]| {
    let Some((&pick, json)) = data.split_first() else { return };
    let tool = ToolName::ALL[usize::from(pick) % ToolName::ALL.len()];
    let arguments: Option<JsonObject> = match serde_json::from_slice::<Value>(json) {
        Ok(Value::Object(object)) => Some(object),
        Ok(_) => return, // MCP arguments are an object or absent; rmcp refuses anything else
        Err(_) => None,
    };
    match CATALOG.validate(tool, arguments.as_ref()) {
        Ok(()) => {
            if let Err(e) = ToolCall::decode(tool, arguments.clone()) {
                panic!("{tool:?}: the schema accepts {arguments:?} but it does not decode: {e}");
            }
        }
        Err(violations) => {
            assert!(!violations.is_empty());
            for v in violations {
                assert!(v.path.is_empty() || v.path.starts_with('/'), "{v:?}");
                assert!(!v.message.is_empty(), "{v:?}");
            }
        }
    }
});

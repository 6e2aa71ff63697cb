//! The guest agent's request handling, with nothing run: a tools/call's name and arguments
//! decoded as the agent does before acting (`mcp::parse_call`), the paths in them checked as
//! the file tools do, and control channel lines answered (`control::Agent`). The first byte
//! picks which; the rest is the request.
#![no_main]

use std::path::Component;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use moat_guest::control::Agent;
use moat_guest::files::check_path;
use moat_guest::mcp::{Call, parse_call};
use moat_tools::guest::GuestTool;
use serde_json::Value;

static AGENT: LazyLock<Agent> = LazyLock::new(|| Agent::new(serde_json::json!({"name": "fuzz"})));

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    if pick & 0x80 != 0 {
        let line = String::from_utf8_lossy(rest);
        let reply: Value = serde_json::from_str(&AGENT.reply_line(line.trim_end())).expect("replies are JSON");
        assert!(matches!(reply["type"].as_str(), Some("hello" | "pong" | "error")), "{reply}");
        return;
    }
    let tool = GuestTool::ALL[usize::from(pick) % GuestTool::ALL.len()];
    let arguments = match serde_json::from_slice::<Value>(rest) {
        Ok(Value::Object(object)) => Some(object),
        Ok(_) => return,
        Err(_) => None,
    };
    let path = match parse_call(tool.name(), arguments) {
        Err(e) => {
            assert!(e.message.starts_with("invalid arguments: "), "{}", e.message);
            return;
        }
        Ok(Call::FileRead(input)) => input.path,
        Ok(Call::FileWrite(input)) => input.path,
        Ok(Call::FileDelete(input) | Call::FileList(input) | Call::FileStat(input)) => input.path,
        Ok(_) => return,
    };
    if let Ok(checked) = check_path(&path) {
        assert!(checked.is_absolute(), "{path:?}");
        assert!(!checked.components().any(|c| c == Component::ParentDir), "{path:?}");
    }
});

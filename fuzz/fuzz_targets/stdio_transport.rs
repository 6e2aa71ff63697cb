//! The stdio line transport (`moat_gateway::mcp::stdio`): any byte stream on stdin. Every line
//! is either delivered as one message or answered with one JSON-RPC error (-32700 or -32600)
//! and reading goes on; nothing panics or hangs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_gateway::mcp::stdio::LineTransport;
use rmcp::transport::Transport;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

/// Small, so oversized lines are common.
const MAX_LINE: usize = 256;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(4096);
        let (out_w, mut out_r) = tokio::io::duplex(4096);
        let input = data.to_vec();
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&input).await;
        });
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = out_r.read_to_end(&mut out).await;
            out
        });
        let mut transport = LineTransport::new(BufReader::new(server), out_w, MAX_LINE);
        let mut delivered = 0usize;
        while transport.receive().await.is_some() {
            delivered += 1;
        }
        drop(transport);
        writer.await.expect("the writer task ends");
        let out = reader.await.expect("the reader task ends");
        let text = String::from_utf8(out).expect("replies are UTF-8");
        let mut replies = 0usize;
        for line in text.lines() {
            let reply: serde_json::Value = serde_json::from_str(line).expect("each reply is one JSON line");
            assert_eq!(reply["jsonrpc"], "2.0", "{line}");
            let code = reply["error"]["code"].as_i64();
            assert!(matches!(code, Some(-32700 | -32600)), "unexpected reply {line}");
            assert!(!reply["error"]["message"].as_str().unwrap_or_default().is_empty(), "{line}");
            replies += 1;
        }
        let lines = data.split(|&b| b == b'\n').count();
        assert!(delivered + replies <= lines, "{delivered} delivered + {replies} replies > {lines} lines");
    });
});

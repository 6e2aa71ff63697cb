//! The stdio transport: one JSON-RPC message per line on stdin/stdout.
//!
//! rmcp's own stdio transport silently drops unparsable lines (to avoid error
//! storms with misbehaving peers). moat answers them instead, once per line,
//! with a JSON-RPC error that says what was wrong: a parse error (-32700), an
//! invalid request (-32600, with the id when one can be read), or a message
//! over the size limit. Logs never go to stdout.

use std::sync::Arc;

use rmcp::RoleServer;
use rmcp::model::{ErrorCode, ErrorData, RequestId};
use rmcp::service::{RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;

pub struct LineTransport<R, W> {
    reader: R,
    writer: Arc<Mutex<W>>,
    max_line: usize,
    line: Vec<u8>,
    /// Set while skipping the rest of an oversized line.
    discarding: bool,
    /// The first bytes of the line being discarded: its request id, when it sits there, lets
    /// the refusal answer that request instead of none.
    head: Vec<u8>,
}

/// How much of an oversized line is kept to find its id.
const HEAD: usize = 512;

impl<R, W> LineTransport<R, W> {
    pub fn new(reader: R, writer: W, max_line: usize) -> Self {
        Self {
            reader,
            writer: Arc::new(Mutex::new(writer)),
            max_line,
            line: Vec::new(),
            discarding: false,
            head: Vec::new(),
        }
    }
}

/// Stdin and stdout as a line transport.
pub fn stdio(max_line: usize) -> LineTransport<tokio::io::BufReader<tokio::io::Stdin>, tokio::io::Stdout> {
    LineTransport::new(tokio::io::BufReader::new(tokio::io::stdin()), tokio::io::stdout(), max_line)
}

enum Line {
    Complete,
    Oversized,
    Eof,
}

impl<R, W> LineTransport<R, W>
where
    R: AsyncBufRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    /// Reads one line into `self.line`. Cancel-safe: partial lines stay buffered in `self`.
    async fn read_line(&mut self) -> std::io::Result<Line> {
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                return Ok(Line::Eof);
            }
            let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..i], Some(i + 1)),
                None => (available, None),
            };
            if !self.discarding {
                if self.line.len() + chunk.len() > self.max_line {
                    self.discarding = true;
                    self.head.clear();
                    self.head.extend_from_slice(&self.line[..self.line.len().min(HEAD)]);
                    let room = HEAD - self.head.len();
                    self.head.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    self.line.clear();
                } else {
                    self.line.extend_from_slice(chunk);
                }
            }
            let consumed = done.unwrap_or(available.len());
            self.reader.consume(consumed);
            if done.is_some() {
                if std::mem::take(&mut self.discarding) {
                    return Ok(Line::Oversized);
                }
                return Ok(Line::Complete);
            }
        }
    }

    /// Answers a line that could not be delivered; false when stdout is gone.
    fn reply_error(&self, id: Option<RequestId>, error: ErrorData) -> impl Future<Output = bool> + Send + use<R, W> {
        let writer = self.writer.clone();
        let message = TxJsonRpcMessage::<RoleServer>::error(error, id);
        async move { write_message(&writer, &message).await.is_ok() }
    }
}

async fn write_message<W: AsyncWrite + Unpin>(
    writer: &Mutex<W>,
    message: &TxJsonRpcMessage<RoleServer>,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    let mut w = writer.lock().await;
    w.write_all(&bytes).await?;
    w.flush().await
}

impl<R, W> Transport<RoleServer> for LineTransport<R, W>
where
    R: AsyncBufRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    type Error = std::io::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleServer>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        let writer = self.writer.clone();
        async move { write_message(&writer, &item).await }
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleServer>> {
        loop {
            match self.read_line().await {
                Err(e) => {
                    tracing::error!(error = %e, "reading stdin failed; closing the stdio transport");
                    return None;
                }
                Ok(Line::Eof) => return None,
                Ok(Line::Oversized) => {
                    let error = ErrorData::new(
                        ErrorCode::INVALID_REQUEST,
                        format!(
                            "message exceeds the {} byte limit and was discarded; send smaller arguments \
                             or raise max_body_bytes",
                            self.max_line
                        ),
                        None,
                    );
                    let id = top_level_id(&std::mem::take(&mut self.head));
                    if !self.reply_error(id, error).await {
                        return None;
                    }
                }
                Ok(Line::Complete) => {
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    match serde_json::from_slice::<RxJsonRpcMessage<RoleServer>>(line) {
                        Ok(message) => return Some(message),
                        Err(e) => {
                            let (id, error) = classify(line, &e);
                            if !self.reply_error(id, error).await {
                                return None;
                            }
                        }
                    }
                }
            }
        }
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        self.writer.lock().await.flush().await
    }
}

/// The `id` member of the top-level object that `prefix` begins, if it is within the prefix
/// and a number or a plain string: enough to answer an oversized request by its id (clients
/// put `id` before `params`; one found nested inside, or cut off, is no answer).
fn top_level_id(prefix: &[u8]) -> Option<RequestId> {
    let (mut depth, mut i) = (0usize, 0usize);
    while i < prefix.len() {
        match prefix[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.checked_sub(1)?,
            b'"' => {
                let end = i + 1 + prefix[i + 1..].iter().position(|&b| b == b'"' || b == b'\\')?;
                if prefix[end] == b'\\' {
                    // Escapes are rare in keys and ids; skip the string the slow way.
                    let mut j = end;
                    while j < prefix.len() && prefix[j] != b'"' {
                        j += if prefix[j] == b'\\' { 2 } else { 1 };
                    }
                    i = j + 1;
                    continue;
                }
                let key = &prefix[i + 1..end];
                let rest = &prefix[end + 1..];
                let after_colon = rest.iter().position(|b| !b.is_ascii_whitespace()).filter(|&p| rest[p] == b':');
                if depth == 1 && key == b"id" {
                    let value = &rest[after_colon? + 1..];
                    let start = value.iter().position(|b| !b.is_ascii_whitespace())?;
                    let value = &value[start..];
                    let len = match value.first()? {
                        b'"' => value[1..].iter().position(|&b| b == b'"' || b == b'\\').map(|p| p + 2)?,
                        _ => value.iter().position(|b| !(b.is_ascii_digit() || *b == b'-'))?,
                    };
                    return serde_json::from_slice(&value[..len]).ok();
                }
                i = end + 1;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Turns a line that failed to decode into the JSON-RPC error that explains it.
fn classify(line: &[u8], err: &serde_json::Error) -> (Option<RequestId>, ErrorData) {
    match serde_json::from_slice::<serde_json::Value>(line) {
        Err(parse) => (
            None,
            ErrorData::new(
                ErrorCode::PARSE_ERROR,
                format!("parse error: {parse}; send one JSON-RPC message per line"),
                None,
            ),
        ),
        Ok(value) => {
            let id = value.get("id").cloned().and_then(|id| serde_json::from_value::<RequestId>(id).ok());
            let error = ErrorData::new(
                ErrorCode::INVALID_REQUEST,
                format!("invalid JSON-RPC message: {err}; expected {{\"jsonrpc\":\"2.0\",\"id\":...,\"method\":...}}"),
                None,
            );
            (id, error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, BufReader};

    async fn run(input: &[u8], max_line: usize) -> (Vec<String>, usize) {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (out_w, mut out_r) = tokio::io::duplex(1 << 16);
        client.write_all(input).await.unwrap();
        drop(client);
        let mut t = LineTransport::new(BufReader::new(server), out_w, max_line);
        let mut received = 0;
        while t.receive().await.is_some() {
            received += 1;
        }
        drop(t);
        let mut out = String::new();
        out_r.read_to_string(&mut out).await.unwrap();
        (out.lines().map(String::from).collect(), received)
    }

    #[tokio::test]
    async fn answers_garbage_and_keeps_reading() {
        let input = b"not json\n{\"jsonrpc\":\"2.0\",\"id\":7,\"bogus\":1}\n\n{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n";
        let (out, received) = run(input, 1024).await;
        assert_eq!(received, 1, "the valid ping still arrives");
        assert_eq!(out.len(), 2, "{out:?}");
        let parse: serde_json::Value = serde_json::from_str(&out[0]).unwrap();
        assert_eq!(parse["error"]["code"], -32700);
        assert_eq!(parse["id"], serde_json::Value::Null);
        let invalid: serde_json::Value = serde_json::from_str(&out[1]).unwrap();
        assert_eq!(invalid["error"]["code"], -32600);
        assert_eq!(invalid["id"], 7);
    }

    #[tokio::test]
    async fn oversized_lines_are_refused_whole() {
        let mut input = vec![b'x'; 5000];
        input.extend_from_slice(b"\n{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n");
        let (out, received) = run(&input, 1024).await;
        assert_eq!(received, 1);
        assert_eq!(out.len(), 1);
        assert!(out[0].contains("1024 byte limit"), "{}", out[0]);
        let answer: serde_json::Value = serde_json::from_str(&out[0]).unwrap();
        assert_eq!(answer["id"], serde_json::Value::Null, "no id to be found in 'xxx…'");
    }

    /// An oversized request is answered by its id, so a client waiting on it is not left hanging.
    #[tokio::test]
    async fn an_oversized_request_is_answered_by_its_id() {
        let mut input = br#"{"jsonrpc":"2.0","id":"req-9","method":"tools/call","params":{"pad":""#.to_vec();
        input.extend(vec![b'a'; 5000]);
        input.extend_from_slice(b"\"}}\n");
        let (out, _) = run(&input, 1024).await;
        let answer: serde_json::Value = serde_json::from_str(&out[0]).unwrap();
        assert_eq!(answer["id"], "req-9");
        assert!(answer["error"]["message"].as_str().unwrap().contains("1024 byte limit"));
    }

    #[test]
    fn top_level_ids_and_only_those() {
        let id = |s: &str| top_level_id(s.as_bytes()).map(|id| serde_json::to_value(id).unwrap());
        assert_eq!(id(r#"{"jsonrpc":"2.0","id":42,"method":"x","params":{"#), Some(serde_json::json!(42)));
        assert_eq!(id(r#"{ "id" : "a-b" , "x"#), Some(serde_json::json!("a-b")));
        assert_eq!(id(r#"{"method":"x","params":{"id":7,"pad":"aaaa"#), None, "nested ids are not the request's");
        assert_eq!(id(r#"{"note":"the \"id\": 3 inside","id":5}"#), Some(serde_json::json!(5)));
        assert_eq!(id(r#"{"method":"x","params":{"pad":"aaaa"#), None);
        assert_eq!(id(r#"{"id":12"#), None, "cut off: the number may go on");
        assert_eq!(id("xxxx"), None);
    }
}

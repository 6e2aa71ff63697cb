//! The audit log: every tool call is recorded (allowed, denied, invalid or
//! rate-limited) before anything acts on it, and an allowed call's outcome is
//! appended after. Rows form a SHA-256 hash chain; one writer task assigns
//! sequence numbers and commits queued records together (group commit).
//! Argument values are never stored: only a digest and a shape.

pub mod anchor;
mod chain;
mod query;
mod writer;

pub use chain::{ChainProblem, VerifyReport, verify};
pub use query::{Filter, export, query, summary};
pub use writer::{AuditError, AuditLog};

use std::io::Write as _;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use chain::hex;

/// The chain's anchor: the `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Denied,
    Invalid,
    RateLimited,
}

impl Decision {
    pub const fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Denied => "denied",
            Decision::Invalid => "invalid",
            Decision::RateLimited => "rate-limited",
        }
    }
}

/// How an allowed call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The tool answered `isError: true` (the caller can fix it).
    ToolError,
    /// A JSON-RPC error (moat failed).
    Error,
}

impl Outcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ToolError => "tool-error",
            Outcome::Error => "error",
        }
    }
}

/// Who called what; the part of a record known before the call runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    pub principal: String,
    /// For a portal VM's call (`vm:<id>`): the owner it acts for.
    pub acting_for: Option<String>,
    pub role: String,
    pub transport: String,
    pub session: Option<String>,
    pub tool: String,
    pub resource: Option<String>,
    pub decision: Decision,
    pub args_digest: String,
    pub args_shape: String,
}

/// Top-level arguments whose values reach the audit log in no form, not even hashed or measured
/// (a digest of a short password can be guessed offline): `git_credential_set`'s secret and
/// `agent_create`'s model key.
const SECRET_ARGS: &[&str] = &["secret", "model_api_key"];

/// `map` with each [`SECRET_ARGS`] value replaced by a marker.
fn redact(map: &Map<String, Value>) -> Map<String, Value> {
    let mut copy = map.clone();
    for key in SECRET_ARGS {
        if let Some(v) = copy.get_mut(*key) {
            *v = json!("<redacted>");
        }
    }
    copy
}

/// SHA-256 of the arguments as canonical JSON (object keys sorted at every level). Written
/// straight into the hash: a 32 MiB file write is hashed, never copied.
pub fn args_digest(args: Option<&Map<String, Value>>) -> String {
    let mut hash = HashWriter(Sha256::new());
    let redacted = args.filter(|map| SECRET_ARGS.iter().any(|k| map.contains_key(*k))).map(redact);
    let written = match redacted.as_ref().or(args) {
        Some(map) => write_canonical_object(&mut hash, map),
        None => hash.write_all(b"{}"),
    };
    written.expect("hashing cannot fail");
    hex(&hash.0.finalize())
}

/// Feeds what is written into a SHA-256.
struct HashWriter(Sha256);

impl std::io::Write for HashWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `v` as compact JSON with object keys sorted at every level.
fn write_canonical(w: &mut impl std::io::Write, v: &Value) -> std::io::Result<()> {
    match v {
        Value::Object(map) => write_canonical_object(w, map),
        Value::Array(items) => {
            w.write_all(b"[")?;
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    w.write_all(b",")?;
                }
                write_canonical(w, item)?;
            }
            w.write_all(b"]")
        }
        scalar => serde_json::to_writer(w, scalar).map_err(std::io::Error::other),
    }
}

fn write_canonical_object(w: &mut impl std::io::Write, map: &Map<String, Value>) -> std::io::Result<()> {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    w.write_all(b"{")?;
    for (i, key) in keys.into_iter().enumerate() {
        if i > 0 {
            w.write_all(b",")?;
        }
        serde_json::to_writer(&mut *w, key).map_err(std::io::Error::other)?;
        w.write_all(b":")?;
        write_canonical(w, &map[key])?;
    }
    w.write_all(b"}")
}

/// The arguments with every value replaced by its type: shows what was sent, never what it said.
/// Top-level keys are the tool schema's own names and stay; a nested object is a free-form map
/// (env variables, labels), whose key names can say as much as values, so only its size is kept.
pub fn args_shape(args: Option<&Map<String, Value>>) -> String {
    fn shape(v: &Value) -> Value {
        match v {
            Value::Null => json!("null"),
            Value::Bool(_) => json!("boolean"),
            Value::Number(_) => json!("number"),
            Value::String(s) => json!(format!("string({})", s.len())),
            Value::Array(items) => json!({"array": items.len(), "first": items.first().map(shape)}),
            Value::Object(map) => json!(format!("object({} keys)", map.len())),
        }
    }
    let top: Option<Value> = args.map(|map| {
        Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), if SECRET_ARGS.contains(&k.as_str()) { json!("redacted") } else { shape(v) }))
                .collect(),
        )
    });
    let mut out = Vec::new();
    let written = match &top {
        Some(top) => write_canonical(&mut out, top),
        None => std::io::Write::write_all(&mut out, b"{}"),
    };
    written.expect("writing to memory cannot fail");
    String::from_utf8(out).expect("JSON is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A secret argument leaves no trace: the digest is the same whatever it was, and the shape
    /// does not even give its length.
    #[test]
    fn secrets_are_neither_hashed_nor_measured() {
        let with = |secret: &str| json!({"remote_host": "h", "username": "u", "secret": secret});
        let (a, b) = (with("hunter2"), with("correct horse battery staple"));
        assert_eq!(args_digest(a.as_object()), args_digest(b.as_object()));
        assert_ne!(
            args_digest(a.as_object()),
            args_digest(json!({"remote_host": "h2", "username": "u", "secret": "x"}).as_object())
        );
        let shape = args_shape(a.as_object());
        assert!(!shape.contains("string(7)") && shape.contains("redacted"), "{shape}");

        let key = |k: &str| json!({"name": "coder", "portal": {}, "work": {}, "model_api_key": k});
        let (a, b) = (key("sk-ant-one"), key("sk-ant-another-one"));
        assert_eq!(args_digest(a.as_object()), args_digest(b.as_object()), "agent_create's model key");
        assert!(args_shape(a.as_object()).contains("redacted"));
    }

    /// The digest and shape are what sorting a copy and printing it gave before they were
    /// streamed: records written before and after hash their arguments alike.
    #[test]
    fn streamed_canonical_json_matches_the_sorted_copy() {
        fn sorted(v: &Value) -> Value {
            match v {
                Value::Object(map) => {
                    let mut keys: Vec<&String> = map.keys().collect();
                    keys.sort();
                    Value::Object(keys.into_iter().map(|k| (k.clone(), sorted(&map[k]))).collect())
                }
                Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
                other => other.clone(),
            }
        }
        let cases = [
            json!({}),
            json!({"z": 1, "a": {"y": [1, {"b": 2, "a": null}], "x": "é\"\n\u{1}"}, "m": 1.5, "t": true}),
            json!({"vm": "dev", "content": "x".repeat(100_000), "env": {"B": "2", "A": "1"}}),
        ];
        for case in cases {
            let map = case.as_object().unwrap();
            let want = hex(&Sha256::digest(sorted(&case).to_string().as_bytes()));
            assert_eq!(args_digest(Some(map)), want, "{case}");
            let mut out = Vec::new();
            write_canonical(&mut out, &case).unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), sorted(&case).to_string());
        }
        assert_eq!(args_digest(None), hex(&Sha256::digest(b"{}")));
        assert_eq!(
            args_shape(Some(json!({"b": "xy", "a": [1]}).as_object().unwrap())),
            r#"{"a":{"array":1,"first":"number"},"b":"string(2)"}"#
        );
    }
    use crate::store::Durability;

    fn record(i: usize) -> CallRecord {
        CallRecord {
            principal: format!("p{}", i % 3),
            acting_for: None,
            role: "agent".into(),
            transport: "stdio".into(),
            session: None,
            tool: "whoami".into(),
            resource: None,
            decision: Decision::Allowed,
            args_digest: args_digest(None),
            args_shape: args_shape(None),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_form_one_unbroken_chain_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moat.db");
        let state = crate::store::State::open(&path).await.unwrap();
        for round in 0..2 {
            let log = AuditLog::start(&path, Durability::Process).unwrap();
            let tasks: Vec<_> = (0..64)
                .map(|i| {
                    let log = log.clone();
                    tokio::spawn(async move {
                        let r = record(i);
                        let seq = log.record_call(&r).await.unwrap();
                        log.record_outcome(&r, seq, Outcome::Ok, None, std::time::Duration::from_micros(5));
                        seq
                    })
                })
                .collect();
            let mut seqs: Vec<i64> = futures::future::join_all(tasks).await.into_iter().map(|r| r.unwrap()).collect();
            log.shutdown().await;
            seqs.sort();
            seqs.dedup();
            assert_eq!(seqs.len(), 64, "round {round}: every call got its own seq");
            let report = verify(state.path()).await.unwrap();
            assert_eq!(report, VerifyReport { checked: 128 * (round + 1), problem: None });
        }
        let outcomes = query(state.pool(), &Filter { limit: 1000, ..Filter::default() }).await.unwrap();
        assert_eq!(outcomes.len(), 128);
        assert!(outcomes.iter().all(|r| r.outcome.as_deref() == Some("ok")));
    }

    #[test]
    fn digest_ignores_key_order_and_shape_hides_values() {
        let a = json!({"b": 1, "a": {"y": "secret", "x": [1, 2]}});
        let b = json!({"a": {"x": [1, 2], "y": "secret"}, "b": 1});
        assert_eq!(args_digest(a.as_object()), args_digest(b.as_object()));
        assert_ne!(args_digest(a.as_object()), args_digest(json!({"b": 2}).as_object()));
        let shape = args_shape(a.as_object());
        assert!(!shape.contains("secret"), "{shape}");
        assert_eq!(shape, r#"{"a":"object(2 keys)","b":"number"}"#);
        // Free-form maps keep neither values nor key names.
        let exec =
            json!({"vm": "dev", "argv": ["env"], "env": {"GITHUB_TOKEN": "ghp_x"}, "labels": {"customer-acme": "1"}});
        let shape = args_shape(exec.as_object());
        assert!(!shape.contains("GITHUB_TOKEN") && !shape.contains("acme") && !shape.contains("ghp_"), "{shape}");
        assert_eq!(
            shape,
            r#"{"argv":{"array":1,"first":"string(3)"},"env":"object(1 keys)","labels":"object(1 keys)","vm":"string(3)"}"#
        );
        assert_eq!(args_shape(None), "{}");
    }
}

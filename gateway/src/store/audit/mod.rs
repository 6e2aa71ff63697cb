//! The audit log: every tool call is recorded (allowed, denied, invalid or
//! rate-limited) before anything acts on it, and an allowed call's outcome is
//! appended after. Rows form a SHA-256 hash chain; one writer task assigns
//! sequence numbers and commits queued records together (group commit).
//! Argument values are never stored: only a digest and a shape.

mod chain;
mod query;
mod writer;

pub use chain::{ChainProblem, VerifyReport, verify};
pub use query::{Filter, export, query, summary};
pub use writer::{AuditError, AuditLog};

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
    pub role: String,
    pub transport: String,
    pub session: Option<String>,
    pub tool: String,
    pub resource: Option<String>,
    pub decision: Decision,
    pub args_digest: String,
    pub args_shape: String,
}

/// SHA-256 of the arguments as canonical JSON (object keys sorted at every level).
pub fn args_digest(args: Option<&Map<String, Value>>) -> String {
    let value = args.map(|a| canonical(&Value::Object(a.clone()))).unwrap_or_else(|| json!({}));
    hex(&Sha256::digest(value.to_string().as_bytes()))
}

fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            Value::Object(keys.into_iter().map(|k| (k.clone(), canonical(&map[k]))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// The arguments with every value replaced by its type: shows what was sent, never what it said.
pub fn args_shape(args: Option<&Map<String, Value>>) -> String {
    fn shape(v: &Value) -> Value {
        match v {
            Value::Null => json!("null"),
            Value::Bool(_) => json!("boolean"),
            Value::Number(_) => json!("number"),
            Value::String(s) => json!(format!("string({})", s.len())),
            Value::Array(items) => json!({"array": items.len(), "first": items.first().map(shape)}),
            Value::Object(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        }
    }
    args.map(|a| canonical(&shape(&Value::Object(a.clone())))).unwrap_or_else(|| json!({})).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Durability;

    fn record(i: usize) -> CallRecord {
        CallRecord {
            principal: format!("p{}", i % 3),
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
            let report = verify(state.pool()).await.unwrap();
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
        assert_eq!(shape, r#"{"a":{"x":{"array":2,"first":"number"},"y":"string(6)"},"b":"number"}"#);
        assert_eq!(args_shape(None), "{}");
    }
}

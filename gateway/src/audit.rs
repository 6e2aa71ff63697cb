//! The audit log: every tool call is recorded (allowed, denied, invalid or
//! rate-limited) before anything acts on it, and an allowed call's outcome is
//! appended after. Rows form a SHA-256 hash chain; one writer task assigns
//! sequence numbers and commits queued records together (group commit).
//! Argument values are never stored: only a digest and a shape.

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::state::{Durability, now};

/// The chain's anchor: the `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Most records committed in one transaction.
const MAX_BATCH: usize = 256;

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

#[derive(Debug, Clone, PartialEq)]
struct Row {
    ts: String,
    kind: &'static str,
    ref_seq: Option<i64>,
    call: CallRecord,
    outcome: Option<&'static str>,
    error_code: Option<i64>,
    duration_us: Option<i64>,
}

impl Row {
    /// The hashed content: everything but `seq`, so a moved row breaks the chain's links
    /// (reported as reordered) while a changed field breaks its own hash (reported as edited).
    fn hash(&self, prev_hash: &str) -> String {
        row_hash(
            prev_hash,
            &json!([
                self.ts,
                self.kind,
                self.ref_seq,
                self.call.principal,
                self.call.role,
                self.call.transport,
                self.call.session,
                self.call.tool,
                self.call.resource,
                self.call.decision.as_str(),
                self.call.args_digest,
                self.call.args_shape,
                self.outcome,
                self.error_code,
                self.duration_us,
            ]),
        )
    }
}

fn row_hash(prev_hash: &str, content: &Value) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(content.to_string().as_bytes());
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("the audit log could not be written ({0}); the call was not run")]
    Write(String),
    #[error("the audit writer has stopped; restart the gateway")]
    Stopped,
}

struct Job {
    row: Row,
    done: oneshot::Sender<Result<i64, AuditError>>,
}

// Every message but the last is an Append; boxing it would allocate once more per record.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Append(Job),
    /// Commit what is queued, then exit.
    Stop,
}

/// Handle to the single audit writer: a thread owning its own SQLite connection.
///
/// Appends are the one database write on every call's path, so they bypass sqlx: its
/// worker-thread hand-offs cost more than the commit itself (see BENCHMARKS.md).
#[derive(Clone)]
pub struct AuditLog {
    tx: std::sync::mpsc::Sender<Msg>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl AuditLog {
    /// Starts the writer on the database at `path`, continuing the chain from its last record.
    pub fn start(path: &Path, durability: Durability) -> Result<AuditLog, rusqlite::Error> {
        let conn = crate::state::open_direct(path, durability)?;
        let head = chain_head(&conn)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("moat-audit".into())
            .spawn(move || writer(conn, rx, head))
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(AuditLog { tx, writer: Arc::new(Mutex::new(Some(handle))) })
    }

    /// Commits a call record; returns its sequence number once durable.
    pub async fn record_call(&self, call: &CallRecord) -> Result<i64, AuditError> {
        let row = Row {
            ts: now(),
            kind: "call",
            ref_seq: None,
            call: call.clone(),
            outcome: None,
            error_code: None,
            duration_us: None,
        };
        let (done, wait) = oneshot::channel();
        self.tx.send(Msg::Append(Job { row, done })).map_err(|_| AuditError::Stopped)?;
        wait.await.map_err(|_| AuditError::Stopped)?
    }

    /// Appends how the call recorded as `seq` ended, without waiting for the commit: the call
    /// itself was recorded before it ran, and a crash in between leaves it visibly without outcome.
    pub fn record_outcome(
        &self,
        call: &CallRecord,
        seq: i64,
        outcome: Outcome,
        error_code: Option<i64>,
        duration: std::time::Duration,
    ) -> Result<(), AuditError> {
        let (done, _ignored) = oneshot::channel();
        let row = Row {
            ts: now(),
            kind: "outcome",
            ref_seq: Some(seq),
            call: call.clone(),
            outcome: Some(outcome.as_str()),
            error_code,
            duration_us: Some(duration.as_micros().min(i64::MAX as u128) as i64),
        };
        self.tx.send(Msg::Append(Job { row, done })).map_err(|_| AuditError::Stopped)
    }

    /// Commits what is queued, then stops the writer.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Msg::Stop);
        let handle = self.writer.lock().expect("the writer handle lock is never poisoned").take();
        if let Some(handle) = handle {
            match tokio::task::spawn_blocking(move || handle.join()).await {
                Ok(Ok(())) => {}
                _ => tracing::error!("the audit writer thread panicked"),
            }
        }
    }
}

fn chain_head(conn: &rusqlite::Connection) -> Result<(i64, String), rusqlite::Error> {
    use rusqlite::OptionalExtension;
    let last = conn
        .query_row("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(last.unwrap_or((0, GENESIS.to_string())))
}

const INSERT: &str = "INSERT INTO audit_log (seq, ts, kind, ref_seq, principal, role, transport, session, tool, \
                      resource, decision, args_digest, args_shape, outcome, error_code, duration_us, prev_hash, hash) \
                      VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)";

fn writer(mut conn: rusqlite::Connection, rx: std::sync::mpsc::Receiver<Msg>, mut head: (i64, String)) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut stopping = false;
    while !stopping {
        // Block for the first record, then take whatever else is queued: one commit for all.
        match rx.recv() {
            Ok(Msg::Append(job)) => batch.push(job),
            Ok(Msg::Stop) | Err(_) => stopping = true,
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Append(job)) => batch.push(job),
                Ok(Msg::Stop) => stopping = true,
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            commit(&mut conn, &mut head, &mut batch);
        }
    }
}

fn commit(conn: &mut rusqlite::Connection, head: &mut (i64, String), batch: &mut Vec<Job>) {
    let mut seq = head.0;
    let mut prev = head.1.clone();
    let result = (|| {
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(INSERT)?;
            for job in batch.iter() {
                seq += 1;
                let hash = job.row.hash(&prev);
                let r = &job.row;
                stmt.execute(rusqlite::params![
                    seq,
                    r.ts,
                    r.kind,
                    r.ref_seq,
                    r.call.principal,
                    r.call.role,
                    r.call.transport,
                    r.call.session,
                    r.call.tool,
                    r.call.resource,
                    r.call.decision.as_str(),
                    r.call.args_digest,
                    r.call.args_shape,
                    r.outcome,
                    r.error_code,
                    r.duration_us,
                    prev,
                    hash,
                ])?;
                prev = hash;
            }
        }
        tx.commit()
    })();
    match result {
        Ok(()) => {
            let first = head.0 + 1;
            *head = (seq, prev);
            for (i, job) in batch.drain(..).enumerate() {
                let _ = job.done.send(Ok(first + i as i64));
            }
        }
        Err(e) => {
            // The transaction rolled back: nothing of this batch exists, the head is unchanged.
            tracing::error!(error = %e, "audit write failed; failing the calls it carried");
            for job in batch.drain(..) {
                let _ = job.done.send(Err(AuditError::Write(e.to_string())));
            }
        }
    }
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

/// The first problem `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainProblem {
    /// The record's content no longer matches its hash.
    Edited { seq: i64 },
    /// Sequence numbers jump: records were deleted.
    Missing { after: i64, next: i64 },
    /// The record does not link to the one before it: moved or forged.
    Reordered { seq: i64 },
}

impl std::fmt::Display for ChainProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainProblem::Edited { seq } => write!(f, "record {seq} was edited: its content does not match its hash"),
            ChainProblem::Missing { after, next } => {
                write!(f, "records {}..{} are missing (deleted after {after})", after + 1, next - 1)
            }
            ChainProblem::Reordered { seq } => {
                write!(f, "record {seq} does not follow the record before it: reordered or forged")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub checked: u64,
    pub problem: Option<ChainProblem>,
}

/// A row as stored, for verification and export.
#[derive(Debug, sqlx::FromRow)]
struct StoredRow {
    seq: i64,
    ts: String,
    kind: String,
    ref_seq: Option<i64>,
    principal: String,
    role: String,
    transport: String,
    session: Option<String>,
    tool: String,
    resource: Option<String>,
    decision: String,
    args_digest: String,
    args_shape: String,
    outcome: Option<String>,
    error_code: Option<i64>,
    duration_us: Option<i64>,
    prev_hash: String,
    hash: String,
}

impl StoredRow {
    fn content(&self) -> Value {
        json!([
            self.ts,
            self.kind,
            self.ref_seq,
            self.principal,
            self.role,
            self.transport,
            self.session,
            self.tool,
            self.resource,
            self.decision,
            self.args_digest,
            self.args_shape,
            self.outcome,
            self.error_code,
            self.duration_us,
        ])
    }
}

/// Walks the chain in sequence order and reports the first broken, missing or reordered record.
pub async fn verify(pool: &SqlitePool) -> Result<VerifyReport, sqlx::Error> {
    use futures::TryStreamExt;
    let mut rows = sqlx::query_as::<_, StoredRow>(
        "SELECT seq, ts, kind, ref_seq, principal, role, transport, session, tool, resource, decision, \
         args_digest, args_shape, outcome, error_code, duration_us, prev_hash, hash FROM audit_log ORDER BY seq",
    )
    .fetch(pool);
    let (mut last_seq, mut last_hash, mut checked) = (0i64, GENESIS.to_string(), 0u64);
    while let Some(r) = rows.try_next().await? {
        let (seq, prev_hash, hash) = (r.seq, r.prev_hash.clone(), r.hash.clone());
        let problem = if row_hash(&prev_hash, &r.content()) != hash {
            Some(ChainProblem::Edited { seq })
        } else if seq != last_seq + 1 {
            Some(ChainProblem::Missing { after: last_seq, next: seq })
        } else if prev_hash != last_hash {
            Some(ChainProblem::Reordered { seq })
        } else {
            None
        };
        if problem.is_some() {
            return Ok(VerifyReport { checked, problem });
        }
        checked += 1;
        last_seq = seq;
        last_hash = hash;
    }
    Ok(VerifyReport { checked, problem: None })
}

/// Filters for listing calls.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub principal: Option<String>,
    pub tool: Option<String>,
    pub decision: Option<String>,
    pub since: Option<String>,
    pub limit: u32,
}

/// Calls matching `filter`, newest first, each with its outcome when it has one.
pub async fn query(pool: &SqlitePool, filter: &Filter) -> Result<Vec<moat_tools::AuditRecord>, sqlx::Error> {
    let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
        "SELECT c.seq, c.ts, c.principal, c.role, c.transport, c.session, c.tool, c.resource, c.decision, \
         c.args_digest, c.args_shape, o.outcome, o.error_code, o.duration_us \
         FROM audit_log c LEFT JOIN audit_log o ON o.kind = 'outcome' AND o.ref_seq = c.seq \
         WHERE c.kind = 'call'",
    );
    if let Some(p) = &filter.principal {
        q.push(" AND c.principal = ").push_bind(p.clone());
    }
    if let Some(t) = &filter.tool {
        q.push(" AND c.tool = ").push_bind(t.clone());
    }
    if let Some(d) = &filter.decision {
        q.push(" AND c.decision = ").push_bind(d.clone());
    }
    if let Some(s) = &filter.since {
        q.push(" AND c.ts >= ").push_bind(s.clone());
    }
    q.push(" ORDER BY c.seq DESC LIMIT ").push_bind(i64::from(filter.limit));
    type R = (
        i64,
        String,
        String,
        String,
        String,
        Option<String>,
        String,
        Option<String>,
        String,
        String,
        String,
        Option<String>,
        Option<i64>,
        Option<i64>,
    );
    let rows: Vec<R> = q.build_query_as().fetch_all(pool).await?;
    Ok(rows
        .into_iter()
        .map(|r| moat_tools::AuditRecord {
            seq: r.0,
            ts: r.1,
            principal: r.2,
            role: r.3,
            transport: r.4,
            session: r.5,
            tool: r.6,
            resource: r.7,
            decision: r.8,
            args_digest: r.9,
            args_shape: r.10,
            outcome: r.11,
            error_code: r.12,
            duration_us: r.13,
        })
        .collect())
}

/// Every stored row in sequence order as JSON objects, hashes included, for `moat audit export`.
pub async fn export(pool: &SqlitePool, mut each: impl FnMut(Value)) -> Result<u64, sqlx::Error> {
    use futures::TryStreamExt;
    let mut rows = sqlx::query_as::<_, StoredRow>(
        "SELECT seq, ts, kind, ref_seq, principal, role, transport, session, tool, resource, decision, \
         args_digest, args_shape, outcome, error_code, duration_us, prev_hash, hash FROM audit_log ORDER BY seq",
    )
    .fetch(pool);
    let mut n = 0;
    while let Some(r) = rows.try_next().await? {
        each(json!({
            "seq": r.seq, "ts": r.ts, "kind": r.kind, "ref_seq": r.ref_seq, "principal": r.principal,
            "role": r.role, "transport": r.transport, "session": r.session, "tool": r.tool,
            "resource": r.resource, "decision": r.decision, "args_digest": r.args_digest,
            "args_shape": r.args_shape, "outcome": r.outcome, "error_code": r.error_code,
            "duration_us": r.duration_us, "prev_hash": r.prev_hash, "hash": r.hash,
        }));
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

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

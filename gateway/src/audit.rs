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
    fn hash(&self, prev_hash: &str) -> String {
        let c = &self.call;
        Hashed {
            ts: &self.ts,
            kind: self.kind,
            ref_seq: self.ref_seq,
            principal: &c.principal,
            role: &c.role,
            transport: &c.transport,
            session: c.session.as_deref(),
            tool: &c.tool,
            resource: c.resource.as_deref(),
            decision: c.decision.as_str(),
            args_digest: &c.args_digest,
            args_shape: &c.args_shape,
            outcome: self.outcome,
            error_code: self.error_code,
            duration_us: self.duration_us,
        }
        .hash(prev_hash)
    }
}

/// The hashed content of a record, built by field name from a new row (append) or a stored
/// one (verify), so both hash identically. Everything but `seq`: a moved row breaks the
/// chain's links (reported as reordered) while a changed field breaks its own hash (edited).
struct Hashed<'a> {
    ts: &'a str,
    kind: &'a str,
    ref_seq: Option<i64>,
    principal: &'a str,
    role: &'a str,
    transport: &'a str,
    session: Option<&'a str>,
    tool: &'a str,
    resource: Option<&'a str>,
    decision: &'a str,
    args_digest: &'a str,
    args_shape: &'a str,
    outcome: Option<&'a str>,
    error_code: Option<i64>,
    duration_us: Option<i64>,
}

impl Hashed<'_> {
    fn hash(&self, prev_hash: &str) -> String {
        use Field::{Int, Text};
        row_hash(
            prev_hash,
            &[
                Text(Some(self.ts)),
                Text(Some(self.kind)),
                Int(self.ref_seq),
                Text(Some(self.principal)),
                Text(Some(self.role)),
                Text(Some(self.transport)),
                Text(self.session),
                Text(Some(self.tool)),
                Text(self.resource),
                Text(Some(self.decision)),
                Text(Some(self.args_digest)),
                Text(Some(self.args_shape)),
                Text(self.outcome),
                Int(self.error_code),
                Int(self.duration_us),
            ],
        )
    }
}

/// One hashed field. Each is tagged and length-prefixed, so no two records hash alike by
/// shifting text between fields, and an absent value differs from an empty one.
enum Field<'a> {
    Text(Option<&'a str>),
    Int(Option<i64>),
}

fn row_hash(prev_hash: &str, fields: &[Field<'_>]) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    for field in fields {
        match field {
            Field::Text(None) | Field::Int(None) => h.update([0u8]),
            Field::Text(Some(text)) => {
                h.update([1u8]);
                h.update((text.len() as u64).to_le_bytes());
                h.update(text.as_bytes());
            }
            Field::Int(Some(n)) => {
                h.update([2u8]);
                h.update(n.to_le_bytes());
            }
        }
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
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

/// Records waiting to be committed, and whether some task is committing now.
#[derive(Default)]
struct Pending {
    jobs: Vec<Job>,
    committing: bool,
    /// A delayed commit of queued outcomes is scheduled.
    flush_scheduled: bool,
}

/// How long an outcome may wait to share the next call's commit before it is committed alone.
const OUTCOME_LINGER: std::time::Duration = std::time::Duration::from_millis(2);

struct Inner {
    pending: Mutex<Pending>,
    /// The connection and the chain head as this process last saw it (seq, hash); only the
    /// committing task holds it.
    writer: Mutex<(rusqlite::Connection, (i64, String))>,
    /// Whether a commit waits for an fsync (milliseconds) rather than a WAL append (microseconds).
    fsync: bool,
}

/// The audit log's single writer, as group commit without a dedicated thread: the task that
/// finds nobody committing becomes the committer and writes every queued record in one
/// transaction. Alone, a call commits its own record with no hand-off at all; under load,
/// records that arrive during a commit share the next one.
///
/// Appends bypass sqlx: its hand-off to a worker thread per statement costs more than the
/// commit itself (see BENCHMARKS.md).
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

impl AuditLog {
    /// Opens the writer on the database at `path`, continuing the chain from its last record.
    pub fn start(path: &Path, durability: Durability) -> Result<AuditLog, rusqlite::Error> {
        let conn = crate::state::open_direct(path, durability)?;
        let head = chain_head(&conn)?;
        let fsync = durability == Durability::Power;
        Ok(AuditLog { inner: Arc::new(Inner { pending: Mutex::default(), writer: Mutex::new((conn, head)), fsync }) })
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
        if self.enqueue(Job { row, done }) {
            self.commit_rounds(true);
        }
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
    ) {
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
        // The answer need not wait for its outcome record: it rides along with the next commit
        // (usually the next call's own record), or is committed alone after a short linger.
        let mut p = self.inner.pending.lock().expect("the audit queue lock is never poisoned");
        p.jobs.push(Job { row, done });
        if !p.committing && !std::mem::replace(&mut p.flush_scheduled, true) {
            drop(p);
            let log = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(OUTCOME_LINGER).await;
                let must_commit = {
                    let mut p = log.inner.pending.lock().expect("the audit queue lock is never poisoned");
                    p.flush_scheduled = false;
                    !p.jobs.is_empty() && !std::mem::replace(&mut p.committing, true)
                };
                if must_commit {
                    log.commit_rounds(false);
                }
            });
        }
    }

    /// Queues a job; true if the caller must now commit (nobody else is).
    fn enqueue(&self, job: Job) -> bool {
        let mut p = self.inner.pending.lock().expect("the audit queue lock is never poisoned");
        p.jobs.push(job);
        !std::mem::replace(&mut p.committing, true)
    }

    /// Commits queued records until the queue is empty. A call's own task stops after the first
    /// round (which holds its record) and hands any newer records to a background task.
    fn commit_rounds(&self, handing_over: bool) {
        loop {
            let mut batch = {
                let mut p = self.inner.pending.lock().expect("the audit queue lock is never poisoned");
                if p.jobs.is_empty() {
                    p.committing = false;
                    return;
                }
                let n = p.jobs.len().min(MAX_BATCH);
                p.jobs.drain(..n).collect::<Vec<_>>()
            };
            let mut writer = self.inner.writer.lock().expect("the audit writer lock is never poisoned");
            let (conn, head) = &mut *writer;
            let is_multi_thread = tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            if self.inner.fsync && is_multi_thread {
                // An fsync can take milliseconds; let this worker's other tasks move elsewhere.
                // (A WAL append takes microseconds: cheaper than handing the worker off.)
                tokio::task::block_in_place(|| commit(conn, head, &mut batch));
            } else {
                commit(conn, head, &mut batch);
            }
            drop(writer);
            if handing_over {
                let mut p = self.inner.pending.lock().expect("the audit queue lock is never poisoned");
                if p.jobs.is_empty() {
                    p.committing = false;
                } else {
                    drop(p);
                    let log = self.clone();
                    tokio::spawn(async move { log.commit_rounds(false) });
                }
                return;
            }
        }
    }

    /// Waits until every queued record is committed (at most 5 s).
    pub async fn shutdown(&self) {
        for _ in 0..500 {
            {
                let p = self.inner.pending.lock().expect("the audit queue lock is never poisoned");
                if p.jobs.is_empty() && !p.committing && !p.flush_scheduled {
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tracing::error!("audit records still queued after 5 s at shutdown");
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

/// Appends `batch` after `head` in one transaction and answers each job.
///
/// `head` is this process's view of the chain's end. Another gateway process on the same
/// database (two stdio clients, say) may have appended since: then the first row's `seq`
/// collides with the primary key, and the batch is rebuilt on the fresh head. The common
/// case costs no extra read.
fn commit(conn: &mut rusqlite::Connection, head: &mut (i64, String), batch: &mut Vec<Job>) {
    let mut result = append(conn, head, batch);
    for _ in 0..3 {
        match &result {
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                match chain_head(conn) {
                    Ok(fresh) => *head = fresh,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
                result = append(conn, head, batch);
            }
            _ => break,
        }
    }
    match result {
        Ok(new_head) => {
            let first = head.0 + 1;
            *head = new_head;
            for (i, job) in batch.drain(..).enumerate() {
                let _ = job.done.send(Ok(first + i as i64));
            }
        }
        Err(e) => {
            // The transaction rolled back: nothing of this batch exists.
            tracing::error!(error = %e, "audit write failed; failing the calls it carried");
            for job in batch.drain(..) {
                let _ = job.done.send(Err(AuditError::Write(e.to_string())));
            }
            if let Ok(fresh) = chain_head(conn) {
                *head = fresh;
            }
        }
    }
}

/// Inserts `batch` after `head`; returns the new head once committed.
fn append(
    conn: &mut rusqlite::Connection,
    head: &(i64, String),
    batch: &[Job],
) -> Result<(i64, String), rusqlite::Error> {
    let (mut seq, mut prev) = head.clone();
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(INSERT)?;
        for job in batch {
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
    tx.commit()?;
    Ok((seq, prev))
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
    fn hash_with(&self, prev_hash: &str) -> String {
        Hashed {
            ts: &self.ts,
            kind: &self.kind,
            ref_seq: self.ref_seq,
            principal: &self.principal,
            role: &self.role,
            transport: &self.transport,
            session: self.session.as_deref(),
            tool: &self.tool,
            resource: self.resource.as_deref(),
            decision: &self.decision,
            args_digest: &self.args_digest,
            args_shape: &self.args_shape,
            outcome: self.outcome.as_deref(),
            error_code: self.error_code,
            duration_us: self.duration_us,
        }
        .hash(prev_hash)
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
        let problem = if r.hash_with(&prev_hash) != hash {
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

/// How many records the log holds, and the time of the newest.
pub async fn summary(pool: &SqlitePool) -> Result<(i64, Option<String>), sqlx::Error> {
    sqlx::query_as("SELECT COUNT(*), MAX(ts) FROM audit_log").fetch_one(pool).await
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
        let state = crate::state::State::open(&path).await.unwrap();
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

//! Appending to the audit log: group commit without a writer thread, on a
//! direct SQLite connection, detecting other processes' appends.

use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::chain::Row;
use super::{CallRecord, GENESIS, Outcome};
use crate::store::{Durability, now};

/// Most records committed in one transaction.
const MAX_BATCH: usize = 256;

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
        let conn = crate::store::open_direct(path, durability)?;
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
                      resource, decision, args_digest, args_shape, outcome, error_code, duration_us, prev_hash, hash, \
                      acting_for) \
                      VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)";

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
                r.call.acting_for,
            ])?;
            prev = hash;
        }
    }
    tx.commit()?;
    Ok((seq, prev))
}

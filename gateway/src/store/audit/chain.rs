//! The hash chain: what a record's hash covers, and `verify`, which walks the
//! stored rows and names the first edited, missing or reordered one.

use sha2::{Digest, Sha256};

use super::{CallRecord, GENESIS};

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Row {
    pub(super) ts: String,
    pub(super) kind: &'static str,
    pub(super) ref_seq: Option<i64>,
    pub(super) call: CallRecord,
    pub(super) outcome: Option<&'static str>,
    pub(super) error_code: Option<i64>,
    pub(super) duration_us: Option<i64>,
}

impl Row {
    pub(super) fn hash(&self, prev_hash: &str) -> String {
        let c = &self.call;
        Hashed {
            ts: &self.ts,
            kind: self.kind,
            ref_seq: self.ref_seq,
            principal: &c.principal,
            acting_for: c.acting_for.as_deref(),
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
    acting_for: Option<&'a str>,
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
    pub(super) fn hash(&self, prev_hash: &str) -> String {
        use Field::{Int, Text};
        let fields = [
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
        ];
        // Only portal calls have it: records without it hash as they did before it existed.
        match self.acting_for {
            Some(owner) => row_hash(prev_hash, &[&fields[..], &[Text(Some(owner))]].concat()),
            None => row_hash(prev_hash, &fields),
        }
    }
}

/// One hashed field. Each is tagged and length-prefixed, so no two records hash alike by
/// shifting text between fields, and an absent value differs from an empty one.
#[derive(Clone, Copy)]
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

pub(super) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
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
pub(super) struct StoredRow {
    pub(super) seq: i64,
    pub(super) ts: String,
    pub(super) kind: String,
    pub(super) ref_seq: Option<i64>,
    pub(super) principal: String,
    pub(super) acting_for: Option<String>,
    pub(super) role: String,
    pub(super) transport: String,
    pub(super) session: Option<String>,
    pub(super) tool: String,
    pub(super) resource: Option<String>,
    pub(super) decision: String,
    pub(super) args_digest: String,
    pub(super) args_shape: String,
    pub(super) outcome: Option<String>,
    pub(super) error_code: Option<i64>,
    pub(super) duration_us: Option<i64>,
    pub(super) prev_hash: String,
    pub(super) hash: String,
}

impl StoredRow {
    fn hash_with(&self, prev_hash: &str) -> String {
        Hashed {
            ts: &self.ts,
            kind: &self.kind,
            ref_seq: self.ref_seq,
            principal: &self.principal,
            acting_for: self.acting_for.as_deref(),
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
/// Reads through a direct connection on a blocking thread: a million rows through sqlx's
/// per-row hand-offs took 9.8 s (BENCHMARKS.md, "Load").
pub async fn verify(db: &std::path::Path) -> Result<VerifyReport, rusqlite::Error> {
    let db = db.to_path_buf();
    tokio::task::spawn_blocking(move || verify_blocking(&db)).await.expect("the verify task does not panic")
}

fn verify_blocking(db: &std::path::Path) -> Result<VerifyReport, rusqlite::Error> {
    let conn = crate::store::open_direct(db, crate::store::Durability::Process)?;
    let mut statement = conn.prepare(
        "SELECT seq, ts, kind, ref_seq, principal, role, transport, session, tool, resource, decision, \
         args_digest, args_shape, outcome, error_code, duration_us, prev_hash, hash, acting_for FROM audit_log \
         ORDER BY seq",
    )?;
    let mut rows = statement.query([])?;
    let (mut last_seq, mut last_hash, mut checked) = (0i64, GENESIS.to_string(), 0u64);
    while let Some(row) = rows.next()? {
        let r = StoredRow {
            seq: row.get(0)?,
            ts: row.get(1)?,
            kind: row.get(2)?,
            ref_seq: row.get(3)?,
            principal: row.get(4)?,
            role: row.get(5)?,
            transport: row.get(6)?,
            session: row.get(7)?,
            tool: row.get(8)?,
            resource: row.get(9)?,
            decision: row.get(10)?,
            args_digest: row.get(11)?,
            args_shape: row.get(12)?,
            outcome: row.get(13)?,
            error_code: row.get(14)?,
            duration_us: row.get(15)?,
            prev_hash: row.get(16)?,
            hash: row.get(17)?,
            acting_for: row.get(18)?,
        };
        let seq = r.seq;
        let problem = if r.hash_with(&r.prev_hash) != r.hash {
            Some(ChainProblem::Edited { seq })
        } else if seq != last_seq + 1 {
            Some(ChainProblem::Missing { after: last_seq, next: seq })
        } else if r.prev_hash != last_hash {
            Some(ChainProblem::Reordered { seq })
        } else {
            None
        };
        if problem.is_some() {
            return Ok(VerifyReport { checked, problem });
        }
        checked += 1;
        last_seq = seq;
        last_hash = r.hash;
    }
    Ok(VerifyReport { checked, problem: None })
}

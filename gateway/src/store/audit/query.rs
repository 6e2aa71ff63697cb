//! Reading the audit log: filtered queries for `audit_query` and `moat audit
//! list`, a summary for `moat status`, and the full export.

use serde_json::{Value, json};

use super::chain::StoredRow;
use sqlx::{QueryBuilder, Sqlite, SqlitePool};

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
         c.args_digest, c.args_shape, o.outcome, o.error_code, o.duration_us, c.acting_for \
         FROM audit_log c LEFT JOIN audit_log o ON o.kind = 'outcome' AND o.ref_seq = c.seq \
         WHERE c.kind = 'call'",
    );
    if let Some(p) = &filter.principal {
        // A principal's records, and those of the portals acting for it.
        q.push(" AND (c.principal = ").push_bind(p.clone()).push(" OR c.acting_for = ").push_bind(p.clone()).push(")");
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
        Option<String>,
    );
    let rows: Vec<R> = q.build_query_as().fetch_all(pool).await?;
    Ok(rows
        .into_iter()
        .map(|r| moat_tools::AuditRecord {
            seq: r.0,
            ts: r.1,
            principal: r.2,
            acting_for: r.14,
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
         args_digest, args_shape, outcome, error_code, duration_us, prev_hash, hash, acting_for FROM audit_log \
         ORDER BY seq",
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
            "acting_for": r.acting_for,
        }));
        n += 1;
    }
    Ok(n)
}

-- API keys: only a SHA-256 of the key and a short public id are stored.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY NOT NULL,   -- public id, shown by `moat keys list`
    name        TEXT NOT NULL,               -- the principal name
    role        TEXT NOT NULL,
    key_sha256  TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    expires_at  TEXT,
    revoked_at  TEXT
) STRICT;

-- The audit log: append-only, hash-chained. A call is recorded (kind 'call')
-- before its side effect starts; an allowed call's outcome is appended after
-- as a separate row (kind 'outcome', ref_seq = the call's seq).
CREATE TABLE audit_log (
    seq          INTEGER PRIMARY KEY NOT NULL,
    ts           TEXT NOT NULL,
    kind         TEXT NOT NULL,
    ref_seq      INTEGER,
    principal    TEXT NOT NULL,
    role         TEXT NOT NULL,
    transport    TEXT NOT NULL,
    session      TEXT,
    tool         TEXT NOT NULL,
    resource     TEXT,
    decision     TEXT NOT NULL,
    args_digest  TEXT NOT NULL,
    args_shape   TEXT NOT NULL,
    outcome      TEXT,
    error_code   INTEGER,
    duration_us  INTEGER,
    prev_hash    TEXT NOT NULL,
    hash         TEXT NOT NULL
) STRICT;
-- Every index is paid for on every call's commit, so there is one: the join from a
-- call to its outcome. Filters by principal or tool scan newest-first by seq, which
-- `LIMIT` keeps short for the queries operators run.
CREATE INDEX audit_by_ref ON audit_log (ref_seq);

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;

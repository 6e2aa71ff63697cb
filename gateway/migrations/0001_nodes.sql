-- Hosts the gateway routes to. The embedded node registers itself as a
-- unix: address; remote nodes are added by `moat node add`.
CREATE TABLE nodes (
    name        TEXT PRIMARY KEY NOT NULL,
    address     TEXT NOT NULL,
    added_at    TEXT NOT NULL,
    -- Set each time the node answers; NULL until it first does.
    last_seen   TEXT,
    -- Last NodeInfo the node reported, as JSON, so status survives restarts.
    last_info   TEXT,
    last_error  TEXT
) STRICT;

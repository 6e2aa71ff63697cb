-- DiskLayout resources: an operator's declared layout of one node's disks. `spec` is the layout's
-- spec as JSON; `generation` is bumped on every change of it; `observed_generation` is the last
-- generation the node answered for, with the phase and reason it answered (refusals as JSON).
CREATE TABLE disk_layouts (
    name                TEXT PRIMARY KEY NOT NULL,
    node                TEXT NOT NULL,
    spec                TEXT NOT NULL,
    generation          INTEGER NOT NULL,
    observed_generation INTEGER NOT NULL DEFAULT 0,
    phase               TEXT NOT NULL,
    reason_code         TEXT,
    reason_message      TEXT,
    refusals            TEXT NOT NULL DEFAULT '[]',
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL
) STRICT;
CREATE INDEX disk_layouts_node ON disk_layouts (node);

-- The last disk snapshot each node reported (moat_tools::disk::DiskSnapshot as JSON): what the
-- gateway's pre-flight judges when the node cannot be asked.
CREATE TABLE node_disks (
    node        TEXT PRIMARY KEY NOT NULL,
    snapshot    TEXT NOT NULL,
    management  TEXT NOT NULL,
    applier     TEXT NOT NULL,
    taken_at    TEXT NOT NULL
) STRICT;

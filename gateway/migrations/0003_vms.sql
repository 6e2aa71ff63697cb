-- VMs the gateway placed on nodes. The node owns the VM's directory and
-- process; this row owns its name, owner, labels and the last state seen.
CREATE TABLE vms (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    owner       TEXT NOT NULL,
    node        TEXT NOT NULL,
    vcpus       INTEGER NOT NULL,
    memory_mib  INTEGER NOT NULL,
    image       TEXT NOT NULL,
    labels      TEXT NOT NULL DEFAULT '{}',   -- JSON object of strings
    state       TEXT NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    vmm         TEXT NOT NULL DEFAULT '',
    accel       TEXT NOT NULL DEFAULT '',
    created_at  TEXT NOT NULL,
    started_at  TEXT,
    updated_at  TEXT NOT NULL,
    UNIQUE (owner, name)
) STRICT;

CREATE INDEX vms_by_node ON vms (node);
CREATE INDEX vms_by_name ON vms (name);

-- Heartbeats: consecutive misses; a node is unreachable after three.
ALTER TABLE nodes ADD COLUMN missed_heartbeats INTEGER NOT NULL DEFAULT 0;

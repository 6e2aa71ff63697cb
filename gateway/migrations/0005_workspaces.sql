-- Workspaces the gateway placed on nodes. The node owns the bytes; this row owns the name,
-- owner, lineage and quota. `state` is 'creating' until the node answered, so a failed create
-- leaves no row (the handler deletes it) and a listing never shows half of one.
CREATE TABLE workspaces (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    owner       TEXT NOT NULL,
    node        TEXT NOT NULL,
    image       TEXT NOT NULL,
    parent      TEXT,                        -- the workspace it was forked from (id), kept after that one is deleted
    size_gib    INTEGER NOT NULL,            -- what the quota counts (size rounded up)
    size_bytes  INTEGER NOT NULL DEFAULT 0,
    method      TEXT NOT NULL DEFAULT '',
    state       TEXT NOT NULL,               -- 'creating' or 'ready'
    created_at  TEXT NOT NULL,
    UNIQUE (owner, name)
) STRICT;

CREATE INDEX workspaces_by_name ON workspaces (name);

-- Which workspaces each VM has as disks, and how. Written in the VM's reservation transaction,
-- so two creates cannot both take a workspace read-write.
CREATE TABLE vm_disks (
    vm_id        TEXT NOT NULL,
    workspace_id TEXT NOT NULL,
    how          TEXT NOT NULL,              -- 'root', 'read-write' or 'read-only'
    mount        TEXT NOT NULL,              -- the name under /workspaces (the VM's root: '/')
    PRIMARY KEY (vm_id, workspace_id)
) STRICT;

CREATE INDEX vm_disks_by_workspace ON vm_disks (workspace_id);

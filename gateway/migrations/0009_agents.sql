-- Portal agents: a portal VM (whose MCP client calls moat over vsock as `vm:<portal id>`) and a
-- work VM it acts on, owned together. `role` is what the portal calls with (never more than the
-- owner's when it was made); `workspaces` the ids (JSON array) given to its members, which the
-- portal may act on too.
CREATE TABLE agents (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    owner       TEXT NOT NULL,
    role        TEXT NOT NULL,
    portal_vm   TEXT,
    work_vm     TEXT,
    workspaces  TEXT NOT NULL DEFAULT '[]',
    created_at  TEXT NOT NULL,
    UNIQUE (owner, name)
) STRICT;
CREATE INDEX agents_portal ON agents (portal_vm);

-- Calls a portal makes name the owner it acts for beside the principal (`vm:<id>`). NULL for
-- everyone else, and left out of the record's hash when NULL, so older records verify as before.
ALTER TABLE audit_log ADD COLUMN acting_for TEXT;

-- The git service: one service VM per network (owned by the system), the repositories it holds
-- (owned), the per-VM credentials its server checks (only their SHA-256: the token itself lives
-- in the VM it was made for), and which remote credentials exist (host and username only: the
-- secret lives in the service VM).
CREATE TABLE git_services (
    network_id    TEXT PRIMARY KEY NOT NULL REFERENCES networks (id),
    vm_id         TEXT NOT NULL,
    workspace_id  TEXT NOT NULL,
    group_id      TEXT NOT NULL,
    created_at    TEXT NOT NULL
) STRICT;

-- Kept when the service VM is deleted without its repositories: the next service on the
-- network mounts the same workspace and serves them again.
CREATE TABLE git_repos (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    network_id  TEXT NOT NULL REFERENCES networks (id),
    owner       TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    UNIQUE (network_id, name)
) STRICT;

CREATE TABLE git_tokens (
    vm_id       TEXT PRIMARY KEY NOT NULL,
    network_id  TEXT NOT NULL REFERENCES networks (id),
    owner       TEXT NOT NULL,
    ip          TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    created_at  TEXT NOT NULL
) STRICT;

CREATE TABLE git_credentials (
    network_id   TEXT NOT NULL REFERENCES networks (id),
    owner        TEXT NOT NULL,
    remote_host  TEXT NOT NULL,
    username     TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    PRIMARY KEY (network_id, owner, remote_host)
) STRICT;

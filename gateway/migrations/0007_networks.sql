-- Networks, VMs' places on them, security groups and port forwards. The gateway owns this state
-- and sends each node the part that is its own, whole, after every change; the node applies it
-- and keeps the last copy for its own restarts.
CREATE TABLE networks (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL UNIQUE,
    node        TEXT NOT NULL,
    cidr        TEXT NOT NULL,
    mode        TEXT NOT NULL,               -- 'nat', 'isolated' or 'bridged'
    uplink      TEXT NOT NULL DEFAULT '',    -- nat: the host interface out ('' = any but the bridge)
    bridge      TEXT NOT NULL DEFAULT '',    -- bridged: the operator's bridge
    dns         TEXT NOT NULL DEFAULT '[]',  -- JSON array of resolver addresses
    created_by  TEXT NOT NULL,
    created_at  TEXT NOT NULL
) STRICT;

-- A VM's network card. (network, ip) is unique: an address is never held twice, whatever
-- happens to the gateway between the allocation and the VM's create.
CREATE TABLE vm_nics (
    vm_id       TEXT PRIMARY KEY NOT NULL,
    network_id  TEXT NOT NULL REFERENCES networks (id),
    ip          TEXT NOT NULL,
    mac         TEXT NOT NULL,
    groups      TEXT NOT NULL DEFAULT '[]',  -- JSON array of security group ids
    UNIQUE (network_id, ip)
) STRICT;

CREATE TABLE security_groups (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    owner       TEXT NOT NULL,
    network_id  TEXT NOT NULL REFERENCES networks (id),
    ingress     TEXT NOT NULL DEFAULT '[]',  -- JSON: the tool's ingress rules, source groups by id
    egress      TEXT,                        -- JSON allow-list, or NULL: everything out
    created_at  TEXT NOT NULL,
    UNIQUE (network_id, owner, name)
) STRICT;

-- (node, protocol, host_port) is unique: a host port is forwarded once per node.
CREATE TABLE port_forwards (
    id          TEXT PRIMARY KEY NOT NULL,
    owner       TEXT NOT NULL,
    node        TEXT NOT NULL,
    protocol    TEXT NOT NULL,
    host_port   INTEGER NOT NULL,
    vm_id       TEXT NOT NULL,
    vm_port     INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    UNIQUE (node, protocol, host_port)
) STRICT;

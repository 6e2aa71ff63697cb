//! VM records in the gateway database. Creation reserves the name, the
//! owner's quota and the node's capacity in one `BEGIN IMMEDIATE`
//! transaction, so concurrent creates cannot both take the last slot.

use std::collections::BTreeMap;

use moat_tools::{AgentInfo, VmState};

use super::{State, StateError, now};
use crate::config::Quotas;

/// A VM as the gateway stores it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct VmRow {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub node: String,
    pub vcpus: i64,
    pub memory_mib: i64,
    pub image: String,
    pub labels: String,
    #[sqlx(try_from = "String")]
    pub state: VmState,
    pub reason: String,
    pub vmm: String,
    pub accel: String,
    pub created_at: String,
    pub started_at: Option<String>,
    pub updated_at: String,
    /// The guest agent as the last heartbeat reported it (JSON `AgentInfo` without `last_seen`).
    pub agent: Option<String>,
}

impl VmRow {
    /// A row of `SELECT * FROM vms` (or a join with its columns), read by column name.
    fn from_direct(row: &rusqlite::Row<'_>) -> rusqlite::Result<VmRow> {
        let state: String = row.get("state")?;
        let state = VmState::try_from(state)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))?;
        Ok(VmRow {
            id: row.get("id")?,
            name: row.get("name")?,
            owner: row.get("owner")?,
            node: row.get("node")?,
            vcpus: row.get("vcpus")?,
            memory_mib: row.get("memory_mib")?,
            image: row.get("image")?,
            labels: row.get("labels")?,
            state,
            reason: row.get("reason")?,
            vmm: row.get("vmm")?,
            accel: row.get("accel")?,
            created_at: row.get("created_at")?,
            started_at: row.get("started_at")?,
            updated_at: row.get("updated_at")?,
            agent: row.get("agent")?,
        })
    }

    pub fn labels(&self) -> BTreeMap<String, String> {
        serde_json::from_str(&self.labels).unwrap_or_default()
    }

    /// Whether the VM holds a running-VM quota slot.
    pub fn is_live(&self) -> bool {
        self.state.is_live()
    }
}

/// What a node reports about one of its VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmReport {
    pub id: String,
    pub state: VmState,
    pub reason: String,
    pub vmm: String,
    pub accel: String,
    pub started_at: Option<String>,
    /// The guest agent, while the VM runs.
    pub agent: Option<AgentInfo>,
    /// What its VMM process is confined by, while it runs (not stored).
    pub protections: Vec<moat_tools::Protection>,
}

/// The states that hold a running-VM quota slot, as SQL; a test checks it against
/// [`VmState::is_live`].
macro_rules! live_states {
    () => {
        "('creating', 'starting', 'running', 'stopping')"
    };
}

/// What a node can still take, as the caller measured it.
#[derive(Debug, Clone, Copy)]
pub struct NodeCapacity {
    pub cpus: u32,
    pub memory_mib: u64,
}

/// vCPUs may be overcommitted this many times over a node's CPUs; memory never is.
pub const VCPU_OVERCOMMIT: u64 = 4;

/// Why a reservation was refused; each says what the caller can do.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("you already have a vm named `{0}`; pick another name or delete it first")]
    NameTaken(String),
    #[error("quota: {what} would be {would} of your {quota} (role {role}); stop or delete VMs first")]
    Quota { what: &'static str, would: u64, quota: u64, role: String },
    #[error("node {node} has no room: {detail}")]
    NoRoom { node: String, detail: String },
    #[error("you already have a workspace named `{0}`; pick another name or delete it first")]
    WorkspaceNameTaken(String),
    #[error(
        "workspace `{workspace}` is attached {how} to vm {vm}; a workspace is read-write in one VM at a time \
         (or read-only in any number): delete that VM, or attach it read_only"
    )]
    WorkspaceInUse { workspace: String, vm: String, how: String },
    #[error("a network named `{0}` already exists; pick another name")]
    NetworkNameTaken(String),
    #[error("you already have a security group named `{0}` on this network; pick another name or update it")]
    GroupNameTaken(String),
    #[error(
        "network {network} ({cidr}) has no free address left: {used} VMs hold all of them; delete a VM on it \
         or use a larger network"
    )]
    NoAddress { network: String, cidr: String, used: usize },
    #[error("host port {port}/{protocol} on node {node} is already forwarded ({id}); pick another host port")]
    PortTaken { node: String, protocol: String, port: u16, id: String },
    #[error("a repository named `{0}` already exists on this network; pick another name")]
    RepoNameTaken(String),
    #[error("you already have an agent named `{0}`; pick another name or delete it first")]
    AgentNameTaken(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    State(#[from] StateError),
}

impl From<sqlx::Error> for ReserveError {
    fn from(e: sqlx::Error) -> Self {
        ReserveError::State(StateError::Query(e))
    }
}

impl State {
    /// Inserts `row` (state "creating") if its name is free for the owner, the owner's
    /// quotas hold and the node has room, all in one write transaction.
    pub async fn reserve_vm(
        &self,
        row: &VmRow,
        quotas: &Quotas,
        role: &str,
        capacity: NodeCapacity,
        start: bool,
        disks: &[super::workspaces::DiskRow],
    ) -> Result<(), ReserveError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let taken: Option<String> = sqlx::query_scalar("SELECT id FROM vms WHERE owner = ? AND name = ?")
            .bind(&row.owner)
            .bind(&row.name)
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_some() {
            return Err(Refusal::NameTaken(row.name.clone()).into());
        }
        let (vcpus, memory, live): (i64, i64, i64) = sqlx::query_as(concat!(
            "SELECT COALESCE(SUM(vcpus), 0), COALESCE(SUM(memory_mib), 0), COALESCE(SUM(state IN ",
            live_states!(),
            "), 0) FROM vms WHERE owner = ?"
        ))
        .bind(&row.owner)
        .fetch_one(&mut *tx)
        .await?;
        let quota = |what, would: i64, quota: u64| {
            if would as u64 > quota {
                Err(Refusal::Quota { what, would: would as u64, quota, role: role.to_string() })
            } else {
                Ok(())
            }
        };
        quota("vCPUs", vcpus + row.vcpus, u64::from(quotas.vcpus))?;
        quota("memory (MiB)", memory + row.memory_mib, quotas.memory_mib)?;
        if start {
            quota("running VMs", live + 1, u64::from(quotas.running_vms))?;
        }
        let (node_vcpus, node_memory): (i64, i64) =
            sqlx::query_as("SELECT COALESCE(SUM(vcpus), 0), COALESCE(SUM(memory_mib), 0) FROM vms WHERE node = ?")
                .bind(&row.node)
                .fetch_one(&mut *tx)
                .await?;
        if (node_memory + row.memory_mib) as u64 > capacity.memory_mib {
            return Err(Refusal::NoRoom {
                node: row.node.clone(),
                detail: format!(
                    "{} MiB of {} MiB memory is allocated, {} MiB more asked",
                    node_memory, capacity.memory_mib, row.memory_mib
                ),
            }
            .into());
        }
        if (node_vcpus + row.vcpus) as u64 > u64::from(capacity.cpus) * VCPU_OVERCOMMIT {
            return Err(Refusal::NoRoom {
                node: row.node.clone(),
                detail: format!(
                    "{} vCPUs are allocated on {} CPUs, {} more asked",
                    node_vcpus, capacity.cpus, row.vcpus
                ),
            }
            .into());
        }
        sqlx::query(
            "INSERT INTO vms (id, name, owner, node, vcpus, memory_mib, image, labels, state, reason, vmm, accel,
                              created_at, started_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&row.id)
        .bind(&row.name)
        .bind(&row.owner)
        .bind(&row.node)
        .bind(row.vcpus)
        .bind(row.memory_mib)
        .bind(&row.image)
        .bind(&row.labels)
        .bind(row.state.as_str())
        .bind(&row.reason)
        .bind(&row.vmm)
        .bind(&row.accel)
        .bind(&row.created_at)
        .bind(&row.started_at)
        .bind(&row.updated_at)
        .execute(&mut *tx)
        .await?;
        super::workspaces::attach(&mut tx, &row.id, disks).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Checks the running-VM quota before starting `vm`.
    pub async fn may_start_vm(&self, vm: &VmRow, quotas: &Quotas, role: &str) -> Result<(), ReserveError> {
        if vm.is_live() {
            return Ok(());
        }
        let live: i64 =
            sqlx::query_scalar(concat!("SELECT COUNT(*) FROM vms WHERE owner = ? AND state IN ", live_states!()))
                .bind(&vm.owner)
                .fetch_one(self.pool())
                .await?;
        if (live + 1) as u64 > u64::from(quotas.running_vms) {
            return Err(Refusal::Quota {
                what: "running VMs",
                would: (live + 1) as u64,
                quota: u64::from(quotas.running_vms),
                role: role.to_string(),
            }
            .into());
        }
        Ok(())
    }

    pub async fn vm_by_id(&self, id: &str) -> Result<Option<VmRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM vms WHERE id = ?").bind(id).fetch_optional(self.pool()).await?)
    }

    /// The VM whose id is `arg` and those named `arg`, the given owner's first. (Every call on a
    /// VM resolves it here first: a direct read.)
    pub async fn vms_by_id_or_name(&self, arg: &str, owner: &str) -> Result<Vec<VmRow>, StateError> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT * FROM vms WHERE id = ?1 OR name = ?1 ORDER BY owner != ?2, id")?;
            let rows = stmt.query_map(rusqlite::params![arg, owner], VmRow::from_direct)?;
            rows.collect()
        })
    }

    /// A VM with the registered address of its node, in one direct read (the guest tools' hot path).
    pub async fn vm_at(&self, id: &str) -> Result<Option<(VmRow, String)>, StateError> {
        use rusqlite::OptionalExtension;
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT vms.*, nodes.address AS node_address FROM vms JOIN nodes ON nodes.name = vms.node \
                 WHERE vms.id = ?1",
            )?
            .query_row([id], |row| Ok((VmRow::from_direct(row)?, row.get("node_address")?)))
            .optional()
        })
    }

    /// VMs named `name`, the given owner's first.
    pub async fn vms_named(&self, name: &str, owner: &str) -> Result<Vec<VmRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM vms WHERE name = ? ORDER BY owner != ?, id")
            .bind(name)
            .bind(owner)
            .fetch_all(self.pool())
            .await?)
    }

    pub async fn vms(&self) -> Result<Vec<VmRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM vms ORDER BY name, id").fetch_all(self.pool()).await?)
    }

    pub async fn vms_on(&self, node: &str) -> Result<Vec<VmRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM vms WHERE node = ? ORDER BY id").bind(node).fetch_all(self.pool()).await?)
    }

    /// Records what the node reported for a VM. Returns the updated row, or None if it is gone.
    pub async fn vm_reported(&self, vm: &VmReport) -> Result<Option<VmRow>, StateError> {
        sqlx::query(
            "UPDATE vms SET state = ?, reason = ?, vmm = ?, accel = ?, started_at = COALESCE(?, started_at),
                            updated_at = ?, agent = ?
             WHERE id = ?",
        )
        .bind(vm.state.as_str())
        .bind(&vm.reason)
        .bind(&vm.vmm)
        .bind(&vm.accel)
        .bind(vm.started_at.as_deref())
        .bind(now())
        .bind(stored_agent(vm))
        .bind(&vm.id)
        .execute(self.pool())
        .await?;
        self.vm_by_id(&vm.id).await
    }

    /// Records the states a node reported in a heartbeat. A VM the node does not list is left
    /// alone here (another gateway's embedded node may hold it); `vm_inspect` asks its node
    /// directly and records a VM its node no longer has.
    pub async fn sync_node(&self, node: &str, reported: &[VmReport]) -> Result<(), StateError> {
        for vm in reported {
            if let Some(row) = self.vm_by_id(&vm.id).await?
                && row.node == node
                && (row.state != vm.state || row.reason != vm.reason || row.agent != stored_agent(vm))
            {
                if vm.state == VmState::Crashed {
                    tracing::warn!(vm = %vm.id, node, reason = %vm.reason, "vm crashed");
                }
                self.vm_reported(vm).await?;
            }
        }
        Ok(())
    }

    pub async fn set_vm_state(&self, id: &str, state: VmState, reason: &str) -> Result<(), StateError> {
        sqlx::query("UPDATE vms SET state = ?, reason = ?, updated_at = ? WHERE id = ?")
            .bind(state.as_str())
            .bind(reason)
            .bind(now())
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    pub async fn delete_vm_row(&self, id: &str) -> Result<(), StateError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("DELETE FROM vm_disks WHERE vm_id = ?").bind(id).execute(&mut *tx).await?;
        // Its address and forwards go with it: the address may be handed out again.
        sqlx::query("DELETE FROM vm_nics WHERE vm_id = ?").bind(id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM port_forwards WHERE vm_id = ?").bind(id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM vms WHERE id = ?").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// The agent part of a node's report on a running VM, as stored (no `last_seen`: it changes
/// with every ping and would rewrite the row on every heartbeat).
fn stored_agent(vm: &VmReport) -> Option<String> {
    vm.agent.clone().map(|mut agent| {
        agent.last_seen = None;
        serde_json::to_string(&agent).expect("tool output types serialize")
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn row(id: &str, name: &str, owner: &str, node: &str, vcpus: i64, memory_mib: i64) -> VmRow {
        VmRow {
            id: id.into(),
            name: name.into(),
            owner: owner.into(),
            node: node.into(),
            vcpus,
            memory_mib,
            image: "base".into(),
            labels: "{}".into(),
            state: VmState::Creating,
            reason: String::new(),
            vmm: String::new(),
            accel: String::new(),
            created_at: now(),
            started_at: None,
            updated_at: now(),
            agent: None,
        }
    }

    /// Two creates by one principal racing for the last slot of a quota: exactly one wins.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reservations_at_the_quota_limit_admit_exactly_one() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("moat.db")).await.unwrap();
        let quotas = Quotas { running_vms: 1, vcpus: 8, memory_mib: 8192, workspaces: 1, workspace_gib: 8 };
        let room = NodeCapacity { cpus: 8, memory_mib: 65536 };
        for round in 0..20 {
            let owner = format!("p{round}");
            let (a, b) = (
                row(&format!("a{round}"), "a", &owner, "n1", 1, 64),
                row(&format!("b{round}"), "b", &owner, "n1", 1, 64),
            );
            let (first, second) = tokio::join!(
                state.reserve_vm(&a, &quotas, "agent", room, true, &[]),
                state.reserve_vm(&b, &quotas, "agent", room, true, &[]),
            );
            let won = [&first, &second].iter().filter(|r| r.is_ok()).count();
            assert_eq!(won, 1, "round {round}: {first:?} {second:?}");
            let refused = if first.is_err() { first } else { second };
            assert!(refused.unwrap_err().to_string().contains("running VMs would be 2 of your 1"));
        }
    }

    #[test]
    fn the_sql_live_states_are_the_enums() {
        let live: Vec<String> =
            VmState::ALL.into_iter().filter(|s| s.is_live()).map(|s| format!("'{}'", s.as_str())).collect();
        assert_eq!(format!("({})", live.join(", ")), live_states!());
    }

    #[tokio::test]
    async fn reservations_enforce_names_quotas_and_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("moat.db")).await.unwrap();
        let quotas = Quotas { running_vms: 2, vcpus: 4, memory_mib: 4096, workspaces: 1, workspace_gib: 8 };
        let big = NodeCapacity { cpus: 8, memory_mib: 65536 };
        state.reserve_vm(&row("a", "web", "alice", "n1", 2, 1024), &quotas, "agent", big, true, &[]).await.unwrap();
        let err = state.reserve_vm(&row("b", "web", "alice", "n1", 1, 64), &quotas, "agent", big, true, &[]).await;
        assert!(matches!(err, Err(ReserveError::Refused(Refusal::NameTaken(_)))), "{err:?}");
        // Names are per owner.
        state.reserve_vm(&row("c", "web", "bob", "n1", 1, 64), &quotas, "agent", big, true, &[]).await.unwrap();
        let err = state.reserve_vm(&row("d", "db", "alice", "n1", 3, 64), &quotas, "agent", big, true, &[]).await;
        let msg = err.unwrap_err().to_string();
        assert!(msg.contains("vCPUs would be 5 of your 4 (role agent)"), "{msg}");
        state.reserve_vm(&row("e", "db", "alice", "n1", 1, 64), &quotas, "agent", big, true, &[]).await.unwrap();
        let msg = state
            .reserve_vm(&row("f", "q", "alice", "n1", 1, 64), &quotas, "agent", big, true, &[])
            .await
            .unwrap_err()
            .to_string();
        assert!(msg.contains("running VMs would be 3 of your 2"), "{msg}");
        state.reserve_vm(&row("f", "q", "alice", "n1", 1, 64), &quotas, "agent", big, false, &[]).await.unwrap();
        let small = NodeCapacity { cpus: 1, memory_mib: 1300 };
        let msg = state
            .reserve_vm(&row("g", "x", "carol", "n1", 1, 128), &quotas, "agent", small, false, &[])
            .await
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("node n1 has no room") && msg.contains("MiB"), "{msg}");
        assert!(state.vm_by_id("g").await.unwrap().is_none(), "a refused reservation writes nothing");
        assert_eq!(state.vms_named("web", "bob").await.unwrap()[0].owner, "bob", "the caller's own first");
    }
}

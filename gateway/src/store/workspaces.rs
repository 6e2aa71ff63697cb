//! Workspace records and VM disk attachments. A create or fork reserves the name and the
//! owner's quota (count and GiB) in one `BEGIN IMMEDIATE` transaction; a VM's attachments are
//! checked and written in its own reservation (`vms.rs`), so a workspace is never read-write in
//! two VMs.

use moat_tools::VmState;

use super::vms::{Refusal, ReserveError};
use super::{State, StateError};
use crate::config::Quotas;

/// A workspace as the gateway stores it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct WorkspaceRow {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub node: String,
    pub image: String,
    pub parent: Option<String>,
    pub size_gib: i64,
    pub size_bytes: i64,
    pub method: String,
    pub state: String,
    pub created_at: String,
    /// Ancestor workspace ids, oldest first (JSON array).
    pub lineage: String,
}

impl WorkspaceRow {
    /// Ancestor workspace ids, oldest first (deleted ones included).
    pub fn ancestors(&self) -> Vec<String> {
        serde_json::from_str(&self.lineage).unwrap_or_default()
    }
}

/// How a VM has a workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// The VM boots from it.
    Root,
    ReadWrite,
    ReadOnly,
}

impl How {
    pub const fn as_str(self) -> &'static str {
        match self {
            How::Root => "root",
            How::ReadWrite => "read-write",
            How::ReadOnly => "read-only",
        }
    }
    pub const fn writes(self) -> bool {
        !matches!(self, How::ReadOnly)
    }
}

/// One disk a VM is being created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRow {
    pub workspace_id: String,
    pub how: How,
    /// Name under /workspaces in the guest ("/" for the root).
    pub mount: String,
}

/// A VM that has a workspace, as `workspace_inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AttachedRow {
    pub vm_id: String,
    pub vm_name: String,
    pub how: String,
    #[sqlx(try_from = "String")]
    pub vm_state: VmState,
    pub workspace_id: String,
}

impl State {
    /// Inserts `row` (state "creating") if its name is free for the owner and the owner's
    /// workspace quotas hold.
    pub async fn reserve_workspace(&self, row: &WorkspaceRow, quotas: &Quotas, role: &str) -> Result<(), ReserveError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let taken: Option<String> = sqlx::query_scalar("SELECT id FROM workspaces WHERE owner = ? AND name = ?")
            .bind(&row.owner)
            .bind(&row.name)
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_some() {
            return Err(Refusal::WorkspaceNameTaken(row.name.clone()).into());
        }
        let (count, gib): (i64, i64) =
            sqlx::query_as("SELECT COUNT(*), COALESCE(SUM(size_gib), 0) FROM workspaces WHERE owner = ?")
                .bind(&row.owner)
                .fetch_one(&mut *tx)
                .await?;
        let over = |what, would: u64, quota: u64| Refusal::Quota { what, would, quota, role: role.to_string() };
        if (count + 1) as u64 > u64::from(quotas.workspaces) {
            return Err(over("workspaces", (count + 1) as u64, u64::from(quotas.workspaces)).into());
        }
        if (gib + row.size_gib) as u64 > quotas.workspace_gib {
            return Err(over("workspace GiB", (gib + row.size_gib) as u64, quotas.workspace_gib).into());
        }
        sqlx::query(
            "INSERT INTO workspaces (id, name, owner, node, image, parent, size_gib, size_bytes, method, state, created_at,
                                     lineage)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&row.id)
        .bind(&row.name)
        .bind(&row.owner)
        .bind(&row.node)
        .bind(&row.image)
        .bind(&row.parent)
        .bind(row.size_gib)
        .bind(row.size_bytes)
        .bind(&row.method)
        .bind(&row.state)
        .bind(&row.created_at)
        .bind(&row.lineage)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records what the node made: size, method, and that the workspace is ready.
    pub async fn workspace_made(&self, id: &str, size_bytes: u64, method: &str) -> Result<(), StateError> {
        let gib = size_bytes.div_ceil(1 << 30).max(1) as i64;
        sqlx::query("UPDATE workspaces SET size_bytes = ?, size_gib = MAX(size_gib, ?), method = ?, state = 'ready' WHERE id = ?")
            .bind(size_bytes as i64)
            .bind(gib)
            .bind(method)
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    pub async fn delete_workspace_row(&self, id: &str) -> Result<(), StateError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("DELETE FROM vm_disks WHERE workspace_id = ?").bind(id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM workspaces WHERE id = ?").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Workspaces still 'creating' that were reserved before `before`: their create never
    /// finished (the gateway that made them stopped), so no caller was told they exist.
    pub async fn unfinished_workspaces(&self, before: &str) -> Result<Vec<WorkspaceRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM workspaces WHERE state = 'creating' AND created_at < ?")
            .bind(before)
            .fetch_all(self.pool())
            .await?)
    }

    pub async fn workspaces(&self) -> Result<Vec<WorkspaceRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM workspaces WHERE state = 'ready' ORDER BY owner, name")
            .fetch_all(self.pool())
            .await?)
    }

    pub async fn workspace_by_id(&self, id: &str) -> Result<Option<WorkspaceRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM workspaces WHERE id = ?").bind(id).fetch_optional(self.pool()).await?)
    }

    /// The ready workspace whose id is `arg` and those named `arg`, the given owner's first.
    pub async fn workspaces_by_id_or_name(&self, arg: &str, owner: &str) -> Result<Vec<WorkspaceRow>, StateError> {
        Ok(sqlx::query_as(
            "SELECT * FROM workspaces WHERE (id = ? OR name = ?) AND state = 'ready' ORDER BY owner != ?, id",
        )
        .bind(arg)
        .bind(arg)
        .bind(owner)
        .fetch_all(self.pool())
        .await?)
    }

    /// The VMs that have workspace `id` (or any, when `id` is None) as a disk.
    pub async fn attachments(&self, id: Option<&str>) -> Result<Vec<AttachedRow>, StateError> {
        Ok(sqlx::query_as(
            "SELECT d.vm_id, v.name AS vm_name, d.how, v.state AS vm_state, d.workspace_id
             FROM vm_disks d JOIN vms v ON v.id = d.vm_id WHERE ? IS NULL OR d.workspace_id = ? ORDER BY d.vm_id",
        )
        .bind(id)
        .bind(id)
        .fetch_all(self.pool())
        .await?)
    }

    /// VMs' disks as (vm id, workspace name (its id if it is gone), how, mount), of VM `vm` or
    /// of every VM.
    pub async fn vm_disks(&self, vm: Option<&str>) -> Result<Vec<(String, String, String, String)>, StateError> {
        Ok(sqlx::query_as(
            "SELECT d.vm_id, COALESCE(w.name, d.workspace_id), d.how, d.mount FROM vm_disks d
             LEFT JOIN workspaces w ON w.id = d.workspace_id WHERE ? IS NULL OR d.vm_id = ? ORDER BY d.vm_id, d.mount",
        )
        .bind(vm)
        .bind(vm)
        .fetch_all(self.pool())
        .await?)
    }
}

/// In a VM's reservation transaction: refuses a disk another VM holds in a conflicting way,
/// then records the VM's disks.
pub(super) async fn attach(tx: &mut sqlx::SqliteConnection, vm: &str, disks: &[DiskRow]) -> Result<(), ReserveError> {
    for disk in disks {
        let holders: Vec<(String, String)> =
            sqlx::query_as("SELECT vm_id, how FROM vm_disks WHERE workspace_id = ? AND vm_id != ?")
                .bind(&disk.workspace_id)
                .bind(vm)
                .fetch_all(&mut *tx)
                .await?;
        let conflict = holders.iter().find(|(_, how)| disk.how.writes() || how != How::ReadOnly.as_str());
        if let Some((holder, how)) = conflict {
            return Err(Refusal::WorkspaceInUse {
                workspace: if disk.how == How::Root { disk.workspace_id.clone() } else { disk.mount.clone() },
                vm: holder.clone(),
                how: how.clone(),
            }
            .into());
        }
        sqlx::query("INSERT INTO vm_disks (vm_id, workspace_id, how, mount) VALUES (?, ?, ?, ?)")
            .bind(vm)
            .bind(&disk.workspace_id)
            .bind(disk.how.as_str())
            .bind(&disk.mount)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::vms::NodeCapacity;
    use crate::store::vms::tests::row as vm_row;

    fn ws(id: &str, name: &str, owner: &str, gib: i64, created_at: &str) -> WorkspaceRow {
        WorkspaceRow {
            id: id.into(),
            name: name.into(),
            owner: owner.into(),
            node: "n1".into(),
            image: "debian".into(),
            parent: None,
            size_gib: gib,
            size_bytes: 0,
            method: String::new(),
            state: "creating".into(),
            created_at: created_at.into(),
            lineage: "[]".into(),
        }
    }

    #[tokio::test]
    async fn quotas_names_attachments_and_unfinished_creates() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("moat.db")).await.unwrap();
        let quotas = Quotas { running_vms: 9, vcpus: 9, memory_mib: 9999, workspaces: 2, workspace_gib: 10 };
        state
            .reserve_workspace(&ws("ws-a", "a", "alice", 6, "2026-01-01T00:00:00.000Z"), &quotas, "agent")
            .await
            .unwrap();
        let refused = |r: Result<(), ReserveError>| match r {
            Err(ReserveError::Refused(refusal)) => refusal.to_string(),
            other => panic!("{other:?}"),
        };
        let msg = refused(state.reserve_workspace(&ws("ws-b", "a", "alice", 1, "x"), &quotas, "agent").await);
        assert!(msg.contains("already have a workspace named `a`"), "{msg}");
        let msg = refused(state.reserve_workspace(&ws("ws-b", "b", "alice", 5, "x"), &quotas, "agent").await);
        assert!(msg.contains("workspace GiB would be 11 of your 10"), "{msg}");
        state.reserve_workspace(&ws("ws-b", "b", "alice", 4, &crate::store::now()), &quotas, "agent").await.unwrap();
        let msg = refused(state.reserve_workspace(&ws("ws-c", "c", "alice", 1, "x"), &quotas, "agent").await);
        assert!(msg.contains("workspaces would be 3 of your 2"), "{msg}");
        state.reserve_workspace(&ws("ws-c", "a", "bob", 1, "x"), &quotas, "agent").await.unwrap();

        // Only creates reserved long ago and never finished are unfinished; made ones are ready.
        state.workspace_made("ws-c", 1 << 30, "snapshot").await.unwrap();
        let old = state.unfinished_workspaces("2026-06-01T00:00:00.000Z").await.unwrap();
        assert_eq!(old.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(), ["ws-a"]);
        assert_eq!(state.workspaces().await.unwrap().iter().map(|w| w.id.as_str()).collect::<Vec<_>>(), ["ws-c"]);

        // Read-write in one VM; read-only in many, but not beside a writer.
        let room = NodeCapacity { cpus: 8, memory_mib: 65536 };
        let disk = |how| [DiskRow { workspace_id: "ws-c".into(), how, mount: "a".into() }];
        let vm = |id: &str| vm_row(id, id, "bob", "n1", 1, 64);
        state.reserve_vm(&vm("v1"), &quotas, "agent", room, false, &disk(How::ReadOnly)).await.unwrap();
        state.reserve_vm(&vm("v2"), &quotas, "agent", room, false, &disk(How::ReadOnly)).await.unwrap();
        let msg = match state.reserve_vm(&vm("v3"), &quotas, "agent", room, false, &disk(How::ReadWrite)).await {
            Err(ReserveError::Refused(r)) => r.to_string(),
            other => panic!("{other:?}"),
        };
        assert!(msg.contains("is attached read-only to vm v1"), "{msg}");
        assert!(state.vm_by_id("v3").await.unwrap().is_none(), "a refused VM left its row");
        state.delete_vm_row("v1").await.unwrap();
        state.delete_vm_row("v2").await.unwrap();
        state.reserve_vm(&vm("v3"), &quotas, "agent", room, false, &disk(How::Root)).await.unwrap();
        assert!(state.reserve_vm(&vm("v4"), &quotas, "agent", room, false, &disk(How::ReadOnly)).await.is_err());
        assert_eq!(state.attachments(Some("ws-c")).await.unwrap()[0].how, "root");
    }
}

//! Portal agents: which VM is whose portal, which work VM and workspaces it may act on, and the
//! role it calls moat with. The row is written before its VMs are made (the name is reserved)
//! and completed once both exist; a portal VM without a complete row cannot call moat.

use super::networks::unique_violation;
use super::vms::{Refusal, ReserveError};
use super::{State, StateError};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AgentRow {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub role: String,
    pub portal_vm: Option<String>,
    pub work_vm: Option<String>,
    /// Workspace ids, a JSON array.
    pub workspaces: String,
    pub created_at: String,
}

impl AgentRow {
    pub fn workspace_ids(&self) -> Vec<String> {
        serde_json::from_str(&self.workspaces).unwrap_or_default()
    }
}

impl State {
    /// Reserves the agent's name for its owner (its VMs come later, [`State::complete_agent`]).
    pub async fn insert_agent(&self, row: &AgentRow) -> Result<(), ReserveError> {
        let inserted = sqlx::query(
            "INSERT INTO agents (id, name, owner, role, portal_vm, work_vm, workspaces, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&row.id)
        .bind(&row.name)
        .bind(&row.owner)
        .bind(&row.role)
        .bind(&row.portal_vm)
        .bind(&row.work_vm)
        .bind(&row.workspaces)
        .bind(&row.created_at)
        .execute(self.pool())
        .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(e) if unique_violation(&e) => Err(Refusal::AgentNameTaken(row.name.clone()).into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Records the agent's VMs and the workspaces attached to them (read from their disks).
    pub async fn complete_agent(&self, id: &str, portal_vm: &str, work_vm: &str) -> Result<AgentRow, StateError> {
        let workspaces: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT workspace_id FROM vm_disks WHERE vm_id IN (?1, ?2) ORDER BY workspace_id",
        )
        .bind(portal_vm)
        .bind(work_vm)
        .fetch_all(self.pool())
        .await?;
        let workspaces = serde_json::to_string(&workspaces).expect("strings serialize");
        Ok(sqlx::query_as("UPDATE agents SET portal_vm = ?, work_vm = ?, workspaces = ? WHERE id = ? RETURNING *")
            .bind(portal_vm)
            .bind(work_vm)
            .bind(workspaces)
            .bind(id)
            .fetch_one(self.pool())
            .await?)
    }

    pub async fn agents(&self) -> Result<Vec<AgentRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM agents ORDER BY owner, name").fetch_all(self.pool()).await?)
    }

    /// Agents whose id is `arg` or whose name is `arg` (the caller's first).
    pub async fn agents_by_id_or_name(&self, arg: &str, owner: &str) -> Result<Vec<AgentRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM agents WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC, owner = ?2 DESC, id")
            .bind(arg)
            .bind(owner)
            .fetch_all(self.pool())
            .await?)
    }

    /// The complete agent whose portal is VM `vm_id`, if it is one.
    pub async fn agent_of_portal(&self, vm_id: &str) -> Result<Option<AgentRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM agents WHERE portal_vm = ? AND work_vm IS NOT NULL")
            .bind(vm_id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// The agent VM `vm_id` belongs to, as its portal or its work VM.
    pub async fn agent_of_vm(&self, vm_id: &str) -> Result<Option<AgentRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM agents WHERE portal_vm = ?1 OR work_vm = ?1")
            .bind(vm_id)
            .fetch_optional(self.pool())
            .await?)
    }

    pub async fn delete_agent(&self, id: &str) -> Result<(), StateError> {
        sqlx::query("DELETE FROM agents WHERE id = ?").bind(id).execute(self.pool()).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, name: &str, owner: &str) -> AgentRow {
        AgentRow {
            id: id.into(),
            name: name.into(),
            owner: owner.into(),
            role: "agent".into(),
            portal_vm: None,
            work_vm: None,
            workspaces: "[]".into(),
            created_at: super::super::now(),
        }
    }

    #[tokio::test]
    async fn names_are_per_owner_and_only_complete_agents_have_portals() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("moat.db")).await.unwrap();
        state.insert_agent(&row("agent-1", "coder", "alice")).await.unwrap();
        state.insert_agent(&row("agent-2", "coder", "bob")).await.unwrap();
        let taken = state.insert_agent(&row("agent-3", "coder", "alice")).await.unwrap_err();
        assert!(taken.to_string().contains("already have an agent named `coder`"), "{taken}");

        assert_eq!(state.agent_of_portal("vm-p").await.unwrap(), None);
        let done = state.complete_agent("agent-1", "vm-p", "vm-w").await.unwrap();
        assert_eq!(done.workspace_ids(), Vec::<String>::new());
        assert_eq!(state.agent_of_portal("vm-p").await.unwrap().unwrap().id, "agent-1");
        assert_eq!(state.agent_of_portal("vm-w").await.unwrap(), None, "a work VM is no portal");
        assert_eq!(state.agent_of_vm("vm-w").await.unwrap().unwrap().id, "agent-1");

        let found = state.agents_by_id_or_name("coder", "bob").await.unwrap();
        assert_eq!(found[0].owner, "bob", "the caller's own first");
        state.delete_agent("agent-1").await.unwrap();
        assert_eq!(state.agent_of_portal("vm-p").await.unwrap(), None);
    }
}

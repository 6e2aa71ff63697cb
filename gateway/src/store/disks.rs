//! DiskLayout resources and each node's last disk snapshot. A layout row carries its reconcile
//! state (generation, observed generation, phase, reason); the transitions themselves are
//! decided by `tools::disks::machine` and written here whole.

use super::{State, StateError};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LayoutRow {
    pub name: String,
    pub node: String,
    /// `moat_tools::disk::LayoutSpec` as JSON.
    pub spec: String,
    pub generation: i64,
    pub observed_generation: i64,
    pub phase: String,
    pub reason_code: Option<String>,
    pub reason_message: Option<String>,
    /// `moat_tools::disk::Refusal` list as JSON.
    pub refusals: String,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct NodeDisksRow {
    pub node: String,
    /// `moat_tools::disk::DiskSnapshot` as JSON.
    pub snapshot: String,
    pub management: String,
    pub applier: String,
    pub taken_at: String,
}

impl State {
    pub async fn disk_layout(&self, name: &str) -> Result<Option<LayoutRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM disk_layouts WHERE name = ?").bind(name).fetch_optional(self.pool()).await?)
    }

    pub async fn disk_layouts(&self, node: Option<&str>) -> Result<Vec<LayoutRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM disk_layouts WHERE ?1 IS NULL OR node = ?1 ORDER BY name")
            .bind(node)
            .fetch_all(self.pool())
            .await?)
    }

    /// Layouts whose generation their node has not answered for, oldest change first.
    pub async fn disk_layouts_unobserved(&self) -> Result<Vec<LayoutRow>, StateError> {
        Ok(sqlx::query_as(
            "SELECT * FROM disk_layouts WHERE observed_generation < generation ORDER BY updated_at, name",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// Writes `row` whole (insert or replace).
    pub async fn put_disk_layout(&self, row: &LayoutRow) -> Result<(), StateError> {
        sqlx::query(
            "INSERT OR REPLACE INTO disk_layouts (name, node, spec, generation, observed_generation, phase,
             reason_code, reason_message, refusals, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&row.name)
        .bind(&row.node)
        .bind(&row.spec)
        .bind(row.generation)
        .bind(row.observed_generation)
        .bind(&row.phase)
        .bind(&row.reason_code)
        .bind(&row.reason_message)
        .bind(&row.refusals)
        .bind(&row.created_at)
        .bind(&row.updated_at)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn delete_disk_layout(&self, name: &str) -> Result<bool, StateError> {
        let done = sqlx::query("DELETE FROM disk_layouts WHERE name = ?").bind(name).execute(self.pool()).await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn put_node_disks(&self, row: &NodeDisksRow) -> Result<(), StateError> {
        sqlx::query(
            "INSERT OR REPLACE INTO node_disks (node, snapshot, management, applier, taken_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&row.node)
        .bind(&row.snapshot)
        .bind(&row.management)
        .bind(&row.applier)
        .bind(&row.taken_at)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn node_disks(&self, node: &str) -> Result<Option<NodeDisksRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM node_disks WHERE node = ?").bind(node).fetch_optional(self.pool()).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, node: &str, generation: i64, observed: i64) -> LayoutRow {
        LayoutRow {
            name: name.into(),
            node: node.into(),
            spec: "{}".into(),
            generation,
            observed_generation: observed,
            phase: "Pending".into(),
            reason_code: None,
            reason_message: None,
            refusals: "[]".into(),
            created_at: "2026-12-07T00:00:00Z".into(),
            updated_at: format!("2026-12-07T00:00:0{generation}Z"),
        }
    }

    #[tokio::test]
    async fn layouts_survive_reopen_and_the_unobserved_come_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moat.db");
        let state = State::open(&path).await.unwrap();
        state.put_disk_layout(&row("b", "n2", 2, 1)).await.unwrap();
        state.put_disk_layout(&row("a", "n1", 1, 0)).await.unwrap();
        state.put_disk_layout(&row("c", "n1", 3, 3)).await.unwrap();
        let unobserved: Vec<String> =
            state.disk_layouts_unobserved().await.unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(unobserved, ["a", "b"], "oldest change first; c is observed");
        assert_eq!(state.disk_layouts(Some("n1")).await.unwrap().len(), 2);
        // A row is written whole: the answer for generation 1, recorded after the spec moved to 2.
        let mut answered = row("a", "n1", 2, 1);
        answered.phase = "Pending".into();
        state.put_disk_layout(&answered).await.unwrap();
        state
            .put_node_disks(&NodeDisksRow {
                node: "n1".into(),
                snapshot: "{}".into(),
                management: "installer-only".into(),
                applier: "direct".into(),
                taken_at: "t".into(),
            })
            .await
            .unwrap();
        state.close().await;

        let state = State::open(&path).await.unwrap();
        let a = state.disk_layout("a").await.unwrap().unwrap();
        assert_eq!((a.generation, a.observed_generation, a.phase.as_str()), (2, 1, "Pending"));
        assert_eq!(state.node_disks("n1").await.unwrap().unwrap().management, "installer-only");
        assert!(state.delete_disk_layout("a").await.unwrap());
        assert!(!state.delete_disk_layout("a").await.unwrap());
        assert!(state.disk_layout("a").await.unwrap().is_none());
    }
}

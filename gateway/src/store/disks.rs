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

    /// Writes `row` only if the stored generation is still `generation`; false when a newer spec
    /// was stored meanwhile (the caller re-reads and decides again).
    pub async fn put_disk_layout_if(&self, row: &LayoutRow, generation: i64) -> Result<bool, StateError> {
        let done = sqlx::query(
            "UPDATE disk_layouts SET observed_generation = ?, phase = ?, reason_code = ?, reason_message = ?,
             refusals = ?, updated_at = ? WHERE name = ? AND generation = ?",
        )
        .bind(row.observed_generation)
        .bind(&row.phase)
        .bind(&row.reason_code)
        .bind(&row.reason_message)
        .bind(&row.refusals)
        .bind(&row.updated_at)
        .bind(&row.name)
        .bind(generation)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
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

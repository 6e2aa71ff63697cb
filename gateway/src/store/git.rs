//! The git service's records: one service VM per network, the repositories on it, the SHA-256
//! of each VM's git token (the token itself is only in that VM) and which remote credentials
//! exist (never their secrets, which only the service VM holds).

use super::networks::unique_violation;
use super::vms::{Refusal, ReserveError};
use super::{State, StateError};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ServiceRow {
    pub network_id: String,
    pub vm_id: String,
    pub workspace_id: String,
    pub group_id: String,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RepoRow {
    pub id: String,
    pub name: String,
    pub network_id: String,
    pub owner: String,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TokenRow {
    pub vm_id: String,
    pub network_id: String,
    pub owner: String,
    pub ip: String,
    pub sha256: String,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CredentialRow {
    pub network_id: String,
    pub owner: String,
    pub remote_host: String,
    pub username: String,
    pub updated_at: String,
}

impl State {
    /// Records network `row.network_id`'s service, replacing a previous record.
    pub async fn put_git_service(&self, row: &ServiceRow) -> Result<(), StateError> {
        sqlx::query(
            "INSERT OR REPLACE INTO git_services (network_id, vm_id, workspace_id, group_id, created_at)
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&row.network_id)
        .bind(&row.vm_id)
        .bind(&row.workspace_id)
        .bind(&row.group_id)
        .bind(&row.created_at)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn git_service(&self, network_id: &str) -> Result<Option<ServiceRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM git_services WHERE network_id = ?")
            .bind(network_id)
            .fetch_optional(self.pool())
            .await?)
    }

    pub async fn git_services(&self) -> Result<Vec<ServiceRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM git_services ORDER BY network_id").fetch_all(self.pool()).await?)
    }

    /// The service whose VM is `vm_id`, if it is one.
    pub async fn git_service_of_vm(&self, vm_id: &str) -> Result<Option<ServiceRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM git_services WHERE vm_id = ?").bind(vm_id).fetch_optional(self.pool()).await?)
    }

    pub async fn delete_git_service(&self, network_id: &str) -> Result<(), StateError> {
        sqlx::query("DELETE FROM git_services WHERE network_id = ?").bind(network_id).execute(self.pool()).await?;
        Ok(())
    }

    pub async fn insert_repo(&self, row: &RepoRow) -> Result<(), ReserveError> {
        let inserted =
            sqlx::query("INSERT INTO git_repos (id, name, network_id, owner, created_at) VALUES (?, ?, ?, ?, ?)")
                .bind(&row.id)
                .bind(&row.name)
                .bind(&row.network_id)
                .bind(&row.owner)
                .bind(&row.created_at)
                .execute(self.pool())
                .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(e) if unique_violation(&e) => Err(Refusal::RepoNameTaken(row.name.clone()).into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every repository, or those of one network.
    pub async fn repos(&self, network_id: Option<&str>) -> Result<Vec<RepoRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM git_repos WHERE ?1 IS NULL OR network_id = ?1 ORDER BY name, id")
            .bind(network_id)
            .fetch_all(self.pool())
            .await?)
    }

    /// Repositories whose id is `arg` or whose name is `arg` (the caller's first).
    pub async fn repos_by_id_or_name(&self, arg: &str, owner: &str) -> Result<Vec<RepoRow>, StateError> {
        Ok(sqlx::query_as(
            "SELECT * FROM git_repos WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC, owner = ?2 DESC, id",
        )
        .bind(arg)
        .bind(owner)
        .fetch_all(self.pool())
        .await?)
    }

    pub async fn delete_repo(&self, id: &str) -> Result<(), StateError> {
        sqlx::query("DELETE FROM git_repos WHERE id = ?").bind(id).execute(self.pool()).await?;
        Ok(())
    }

    pub async fn delete_repos(&self, network_id: &str) -> Result<(), StateError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("DELETE FROM git_repos WHERE network_id = ?").bind(network_id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM git_credentials WHERE network_id = ?").bind(network_id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records (or replaces) VM `row.vm_id`'s token hash.
    pub async fn put_git_token(&self, row: &TokenRow) -> Result<(), StateError> {
        sqlx::query(
            "INSERT OR REPLACE INTO git_tokens (vm_id, network_id, owner, ip, sha256, created_at)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&row.vm_id)
        .bind(&row.network_id)
        .bind(&row.owner)
        .bind(&row.ip)
        .bind(&row.sha256)
        .bind(&row.created_at)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn git_tokens(&self, network_id: &str) -> Result<Vec<TokenRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM git_tokens WHERE network_id = ? ORDER BY vm_id")
            .bind(network_id)
            .fetch_all(self.pool())
            .await?)
    }

    /// Forgets VM `vm_id`'s token; the network it was on, when it had one.
    pub async fn delete_git_token(&self, vm_id: &str) -> Result<Option<String>, StateError> {
        Ok(sqlx::query_scalar("DELETE FROM git_tokens WHERE vm_id = ? RETURNING network_id")
            .bind(vm_id)
            .fetch_optional(self.pool())
            .await?)
    }

    pub async fn put_git_credential(&self, row: &CredentialRow) -> Result<(), StateError> {
        sqlx::query(
            "INSERT OR REPLACE INTO git_credentials (network_id, owner, remote_host, username, updated_at)
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&row.network_id)
        .bind(&row.owner)
        .bind(&row.remote_host)
        .bind(&row.username)
        .bind(&row.updated_at)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Forgets that `owner` has a credential for `remote_host` on network `network_id`; whether
    /// there was one.
    pub async fn delete_git_credential(
        &self,
        network_id: &str,
        owner: &str,
        remote_host: &str,
    ) -> Result<bool, StateError> {
        let done = sqlx::query("DELETE FROM git_credentials WHERE network_id = ? AND owner = ? AND remote_host = ?")
            .bind(network_id)
            .bind(owner)
            .bind(remote_host)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn git_credentials(&self) -> Result<Vec<CredentialRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM git_credentials ORDER BY network_id, owner, remote_host")
            .fetch_all(self.pool())
            .await?)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::networks::NetworkRow;

    fn network(id: &str, name: &str) -> NetworkRow {
        NetworkRow {
            id: id.into(),
            name: name.into(),
            node: "n1".into(),
            cidr: "10.9.0.0/24".into(),
            mode: "nat".into(),
            uplink: String::new(),
            bridge: String::new(),
            dns: "[]".into(),
            created_by: "admin".into(),
            created_at: "t".into(),
        }
    }

    fn repo(id: &str, name: &str, network: &str, owner: &str) -> RepoRow {
        RepoRow {
            id: id.into(),
            name: name.into(),
            network_id: network.into(),
            owner: owner.into(),
            created_at: "t".into(),
        }
    }

    fn token(vm: &str, network: &str, sha: &str) -> TokenRow {
        TokenRow {
            vm_id: vm.into(),
            network_id: network.into(),
            owner: "alice".into(),
            ip: "10.9.0.3".into(),
            sha256: sha.into(),
            created_at: "t".into(),
        }
    }

    /// A name is taken once per network (also across a reopen), tokens are one per VM and
    /// forgetting one says where it was, and a service with its repositories goes whole.
    #[tokio::test]
    async fn names_tokens_and_credentials_hold_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moat.db");
        {
            let state = State::open(&path).await.unwrap();
            for n in [network("net-a", "a"), network("net-b", "b")] {
                state.insert_network(&n).await.unwrap();
            }
            state.insert_repo(&repo("repo-1", "app", "net-a", "alice")).await.unwrap();
            state.insert_repo(&repo("repo-2", "app", "net-b", "bob")).await.unwrap();
            state.put_git_token(&token("vm-1", "net-a", "old")).await.unwrap();
            state.put_git_token(&token("vm-1", "net-a", "new")).await.unwrap();
        }
        let state = State::open(&path).await.unwrap();
        let taken = state.insert_repo(&repo("repo-3", "app", "net-a", "carol")).await;
        assert!(matches!(taken, Err(ReserveError::Refused(Refusal::RepoNameTaken(ref n))) if n == "app"), "{taken:?}");
        let named = state.repos_by_id_or_name("app", "bob").await.unwrap();
        assert_eq!(named.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["repo-2", "repo-1"], "the caller's first");
        let tokens = state.git_tokens("net-a").await.unwrap();
        assert_eq!((tokens.len(), tokens[0].sha256.as_str()), (1, "new"), "a VM has one token, the last one");
        assert_eq!(state.delete_git_token("vm-1").await.unwrap().as_deref(), Some("net-a"));
        assert_eq!(state.delete_git_token("vm-1").await.unwrap(), None);

        let cred = CredentialRow {
            network_id: "net-a".into(),
            owner: "alice".into(),
            remote_host: "h".into(),
            username: "u".into(),
            updated_at: "t".into(),
        };
        state.put_git_credential(&cred).await.unwrap();
        state.put_git_credential(&CredentialRow { username: "u2".into(), ..cred.clone() }).await.unwrap();
        assert_eq!(state.git_credentials().await.unwrap().len(), 1, "set again replaces");
        assert!(!state.delete_git_credential("net-a", "bob", "h").await.unwrap(), "only the owner's");
        state.delete_repos("net-a").await.unwrap();
        assert!(state.git_credentials().await.unwrap().is_empty());
        assert_eq!(state.repos(None).await.unwrap().len(), 1, "only net-a's repositories went");
    }
}

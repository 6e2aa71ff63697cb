//! Networks, VMs' network cards, security groups and port forwards. Addresses are allocated in
//! one `BEGIN IMMEDIATE` transaction against a unique (network, ip) pair, and host ports against
//! a unique (node, protocol, port): neither is ever held twice, also across restarts.

use std::net::Ipv4Addr;

use super::vms::{Refusal, ReserveError};
use super::{State, StateError};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct NetworkRow {
    pub id: String,
    pub name: String,
    pub node: String,
    pub cidr: String,
    /// "nat", "isolated" or "bridged".
    pub mode: String,
    pub uplink: String,
    pub bridge: String,
    /// JSON array of resolver addresses.
    pub dns: String,
    pub created_by: String,
    pub created_at: String,
}

impl NetworkRow {
    pub fn dns(&self) -> Vec<String> {
        serde_json::from_str(&self.dns).unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct NicRow {
    pub vm_id: String,
    pub network_id: String,
    pub ip: String,
    pub mac: String,
    /// JSON array of security group ids.
    pub groups: String,
}

impl NicRow {
    pub fn groups(&self) -> Vec<String> {
        serde_json::from_str(&self.groups).unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct GroupRow {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub network_id: String,
    /// JSON: the tool's ingress rules, with source groups by id.
    pub ingress: String,
    /// JSON allow-list, or None: everything out.
    pub egress: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ForwardRow {
    pub id: String,
    pub owner: String,
    pub node: String,
    pub protocol: String,
    pub host_port: i64,
    pub vm_id: String,
    pub vm_port: i64,
    pub created_at: String,
}

/// Whether `e` is a UNIQUE constraint failing.
pub(super) fn unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

impl State {
    pub async fn insert_network(&self, row: &NetworkRow) -> Result<(), ReserveError> {
        let inserted = sqlx::query(
            "INSERT INTO networks (id, name, node, cidr, mode, uplink, bridge, dns, created_by, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&row.id)
        .bind(&row.name)
        .bind(&row.node)
        .bind(&row.cidr)
        .bind(&row.mode)
        .bind(&row.uplink)
        .bind(&row.bridge)
        .bind(&row.dns)
        .bind(&row.created_by)
        .bind(&row.created_at)
        .execute(self.pool())
        .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(e) if unique_violation(&e) => Err(Refusal::NetworkNameTaken(row.name.clone()).into()),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn networks(&self) -> Result<Vec<NetworkRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM networks ORDER BY node, name").fetch_all(self.pool()).await?)
    }

    /// The network with this id or name.
    pub async fn network(&self, arg: &str) -> Result<Option<NetworkRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM networks WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC LIMIT 1")
            .bind(arg)
            .fetch_optional(self.pool())
            .await?)
    }

    /// Removes a network with its security groups. Refused (false) while a VM has a card on it.
    pub async fn delete_network(&self, id: &str) -> Result<bool, StateError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let attached: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM vm_nics WHERE network_id = ?")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        if attached > 0 {
            return Ok(false);
        }
        sqlx::query("DELETE FROM security_groups WHERE network_id = ?").bind(id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM networks WHERE id = ?").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Gives VM `vm_id` the lowest free address of network `network` (`hosts`: its host
    /// addresses, the gateway left out), with `mac` and `groups`.
    pub async fn allocate_nic(
        &self,
        vm_id: &str,
        network: &NetworkRow,
        hosts: impl Iterator<Item = Ipv4Addr>,
        mac: &str,
        groups: &[String],
    ) -> Result<Ipv4Addr, ReserveError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let used: Vec<String> = sqlx::query_scalar("SELECT ip FROM vm_nics WHERE network_id = ?")
            .bind(&network.id)
            .fetch_all(&mut *tx)
            .await?;
        let taken: std::collections::HashSet<Ipv4Addr> = used.iter().filter_map(|ip| ip.parse().ok()).collect();
        let Some(ip) = hosts.into_iter().find(|ip| !taken.contains(ip)) else {
            return Err(Refusal::NoAddress {
                network: network.name.clone(),
                cidr: network.cidr.clone(),
                used: used.len(),
            }
            .into());
        };
        sqlx::query("INSERT INTO vm_nics (vm_id, network_id, ip, mac, groups) VALUES (?, ?, ?, ?, ?)")
            .bind(vm_id)
            .bind(&network.id)
            .bind(ip.to_string())
            .bind(mac)
            .bind(serde_json::to_string(groups).expect("strings serialize"))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(ip)
    }

    pub async fn nic(&self, vm_id: &str) -> Result<Option<NicRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM vm_nics WHERE vm_id = ?").bind(vm_id).fetch_optional(self.pool()).await?)
    }

    /// Every VM's network card (for listings), or those on one network.
    pub async fn nics(&self, network_id: Option<&str>) -> Result<Vec<NicRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM vm_nics WHERE ?1 IS NULL OR network_id = ?1 ORDER BY vm_id")
            .bind(network_id)
            .fetch_all(self.pool())
            .await?)
    }

    pub async fn insert_group(&self, row: &GroupRow) -> Result<(), ReserveError> {
        let inserted = sqlx::query(
            "INSERT INTO security_groups (id, name, owner, network_id, ingress, egress, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&row.id)
        .bind(&row.name)
        .bind(&row.owner)
        .bind(&row.network_id)
        .bind(&row.ingress)
        .bind(&row.egress)
        .bind(&row.created_at)
        .execute(self.pool())
        .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(e) if unique_violation(&e) => Err(Refusal::GroupNameTaken(row.name.clone()).into()),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn update_group(&self, id: &str, ingress: &str, egress: Option<&str>) -> Result<(), StateError> {
        sqlx::query("UPDATE security_groups SET ingress = ?, egress = ? WHERE id = ?")
            .bind(ingress)
            .bind(egress)
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    pub async fn delete_group(&self, id: &str) -> Result<(), StateError> {
        sqlx::query("DELETE FROM security_groups WHERE id = ?").bind(id).execute(self.pool()).await?;
        Ok(())
    }

    /// Every security group, or those of one network.
    pub async fn groups(&self, network_id: Option<&str>) -> Result<Vec<GroupRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM security_groups WHERE ?1 IS NULL OR network_id = ?1 ORDER BY name, id")
            .bind(network_id)
            .fetch_all(self.pool())
            .await?)
    }

    /// Groups whose id is `arg` or whose name is `arg` (the caller's first).
    pub async fn groups_by_id_or_name(&self, arg: &str, owner: &str) -> Result<Vec<GroupRow>, StateError> {
        Ok(sqlx::query_as(
            "SELECT * FROM security_groups WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC, owner = ?2 DESC, id",
        )
        .bind(arg)
        .bind(owner)
        .fetch_all(self.pool())
        .await?)
    }

    pub async fn insert_forward(&self, row: &ForwardRow) -> Result<(), ReserveError> {
        let inserted = sqlx::query(
            "INSERT INTO port_forwards (id, owner, node, protocol, host_port, vm_id, vm_port, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&row.id)
        .bind(&row.owner)
        .bind(&row.node)
        .bind(&row.protocol)
        .bind(row.host_port)
        .bind(&row.vm_id)
        .bind(row.vm_port)
        .bind(&row.created_at)
        .execute(self.pool())
        .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(e) if unique_violation(&e) => {
                let id: String = sqlx::query_scalar(
                    "SELECT id FROM port_forwards WHERE node = ? AND protocol = ? AND host_port = ?",
                )
                .bind(&row.node)
                .bind(&row.protocol)
                .bind(row.host_port)
                .fetch_optional(self.pool())
                .await?
                .unwrap_or_default();
                Err(Refusal::PortTaken {
                    node: row.node.clone(),
                    protocol: row.protocol.clone(),
                    port: row.host_port as u16,
                    id,
                }
                .into())
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn delete_forward(&self, id: &str) -> Result<(), StateError> {
        sqlx::query("DELETE FROM port_forwards WHERE id = ?").bind(id).execute(self.pool()).await?;
        Ok(())
    }

    pub async fn forward(&self, id: &str) -> Result<Option<ForwardRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM port_forwards WHERE id = ?").bind(id).fetch_optional(self.pool()).await?)
    }

    /// Every port forward, or those on one node.
    pub async fn forwards(&self, node: Option<&str>) -> Result<Vec<ForwardRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM port_forwards WHERE ?1 IS NULL OR node = ?1 ORDER BY node, host_port")
            .bind(node)
            .fetch_all(self.pool())
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(id: &str, name: &str) -> NetworkRow {
        NetworkRow {
            id: id.into(),
            name: name.into(),
            node: "n1".into(),
            cidr: "10.9.0.0/29".into(),
            mode: "nat".into(),
            uplink: String::new(),
            bridge: String::new(),
            dns: "[]".into(),
            created_by: "root".into(),
            created_at: super::super::now(),
        }
    }

    /// Addresses: lowest free first, never twice, a freed one reused, an exhausted pool refused
    /// with the reason; names and host ports are unique.
    #[tokio::test]
    async fn addresses_names_and_ports_are_never_held_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moat.db");
        let state = State::open(&path).await.unwrap();
        let net = network("net-1", "dev");
        state.insert_network(&net).await.unwrap();
        assert!(matches!(
            state.insert_network(&network("net-2", "dev")).await,
            Err(ReserveError::Refused(Refusal::NetworkNameTaken(_)))
        ));
        // 10.9.0.0/29: hosts .1-.6, .1 is the gateway.
        let hosts = || (2..=6).map(|i| Ipv4Addr::new(10, 9, 0, i));
        let mut got = Vec::new();
        for i in 0..5 {
            got.push(state.allocate_nic(&format!("vm-{i}"), &net, hosts(), "02:00:00:00:00:01", &[]).await.unwrap());
        }
        assert_eq!(got, hosts().collect::<Vec<_>>());
        match state.allocate_nic("vm-9", &net, hosts(), "02:00:00:00:00:09", &[]).await {
            Err(ReserveError::Refused(e @ Refusal::NoAddress { .. })) => {
                assert!(e.to_string().contains("no free address left"), "{e}")
            }
            other => panic!("a full pool must be refused: {other:?}"),
        }
        // A reopened database (a restart) still knows every address.
        drop(state);
        let state = State::open(&path).await.unwrap();
        assert!(state.allocate_nic("vm-9", &net, hosts(), "02:00:00:00:00:09", &[]).await.is_err());
        sqlx::query("DELETE FROM vm_nics WHERE vm_id = 'vm-2'").execute(state.pool()).await.unwrap();
        let again = state.allocate_nic("vm-9", &net, hosts(), "02:00:00:00:00:09", &[]).await.unwrap();
        assert_eq!(again, Ipv4Addr::new(10, 9, 0, 4), "the freed address is handed out again");
        assert!(!state.delete_network("net-1").await.unwrap(), "a network with VMs is not deleted");

        let forward = |id: &str, port: i64| ForwardRow {
            id: id.into(),
            owner: "alice".into(),
            node: "n1".into(),
            protocol: "tcp".into(),
            host_port: port,
            vm_id: "vm-0".into(),
            vm_port: 80,
            created_at: String::new(),
        };
        state.insert_forward(&forward("pf-1", 8080)).await.unwrap();
        match state.insert_forward(&forward("pf-2", 8080)).await {
            Err(ReserveError::Refused(Refusal::PortTaken { id, .. })) => assert_eq!(id, "pf-1"),
            other => panic!("a forwarded port must be refused: {other:?}"),
        }
        state.insert_forward(&ForwardRow { protocol: "udp".into(), ..forward("pf-3", 8080) }).await.unwrap();
    }
}

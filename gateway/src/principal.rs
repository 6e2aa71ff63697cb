//! Who is calling: a principal name and its role. Transports resolve it; tools see it.

use std::str::FromStr;

/// The four roles of moat's RBAC, from least to most privileged (the order `Ord` compares by).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Reader,
    Agent,
    VmAdmin,
    ClusterAdmin,
}

impl Role {
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Agent => "agent",
            Role::VmAdmin => "vm-admin",
            Role::ClusterAdmin => "cluster-admin",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Role::Reader, Role::Agent, Role::VmAdmin, Role::ClusterAdmin]
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role `{s}`: use reader, agent, vm-admin or cluster-admin"))
    }
}

/// The transport a call arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Stdio,
    Http,
    /// moat acting on its own behalf (the git service's VMs), never a client.
    Internal,
    /// A portal VM's MCP client, over the VM's vsock through its node.
    Vsock,
}

impl Transport {
    pub const fn as_str(self) -> &'static str {
        match self {
            Transport::Stdio => "stdio",
            Transport::Http => "http",
            Transport::Internal => "internal",
            Transport::Vsock => "vsock",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    /// Set when the caller is a portal VM (`vm:<id>`): whom it acts for and what it may touch.
    pub portal: Option<Portal>,
}

/// What a portal VM's principal carries: the owner it acts for and the resources paired with it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Portal {
    /// The agent's owner, as the audit log names who a call was made for.
    pub owner: String,
    /// The agent's id.
    pub agent: String,
    /// `<kind>/<id>` of each resource the portal may act on (its work VM, its workspaces).
    pub pairs: Vec<String>,
}

impl Principal {
    pub fn new(name: impl Into<String>, role: Role) -> Principal {
        Principal { name: name.into(), role, portal: None }
    }

    /// Whose resources the caller works with: a portal's owner, else the caller itself.
    pub fn owner(&self) -> &str {
        self.portal.as_ref().map_or(&self.name, |p| &p.owner)
    }

    /// An HTTP caller without a key, when the operator allows them in with `role`.
    pub fn anonymous(role: Role) -> Principal {
        Principal::new("anonymous", role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip() {
        for r in [Role::Reader, Role::Agent, Role::VmAdmin, Role::ClusterAdmin] {
            assert_eq!(r.as_str().parse(), Ok(r));
        }
        assert!("admin".parse::<Role>().unwrap_err().contains("cluster-admin"));
    }
}

//! Who is calling: a principal name and its role. Transports resolve it; tools see it.

use std::str::FromStr;

/// The four roles of moat's RBAC, from least to most privileged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
}

impl Transport {
    pub const fn as_str(self) -> &'static str {
        match self {
            Transport::Stdio => "stdio",
            Transport::Http => "http",
            Transport::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
}

impl Principal {
    /// An HTTP caller without a key, when the operator allows them in with `role`.
    pub fn anonymous(role: Role) -> Principal {
        Principal { name: "anonymous".into(), role }
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

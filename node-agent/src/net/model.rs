//! What a node's networks are: the state the ruleset and the links are rendered from. Plain
//! data, validated on the way in; the gateway owns it and the node keeps the last copy it was
//! given, so a restart (or a flushed table) renders the same again.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

pub use crate::dir::valid_mac;

/// An IPv4 prefix, e.g. `10.80.0.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an IPv4 CIDR such as 10.80.0.0/24")]
pub struct BadCidr(pub String);

impl Cidr {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Cidr, BadCidr> {
        if prefix > 32 {
            return Err(BadCidr(format!("{addr}/{prefix}")));
        }
        Ok(Cidr { addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)), prefix })
    }
    pub fn prefix(self) -> u8 {
        self.prefix
    }
    pub fn network(self) -> Ipv4Addr {
        self.addr
    }
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }
    pub fn overlaps(self, other: Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
    /// Host addresses: all but the network and broadcast addresses (for /31 and /32, none).
    pub fn hosts(self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u32::from(self.addr);
        let size = 1u64 << (32 - u32::from(self.prefix));
        let count = size.saturating_sub(2) as u32;
        (1..=count).map(move |i| Ipv4Addr::from(base + i))
    }
    /// How many host addresses it has (all but the network and broadcast addresses).
    pub fn host_count(self) -> u64 {
        (1u64 << (32 - u32::from(self.prefix))).saturating_sub(2)
    }

    /// Whether `ip` is one of its host addresses (not the network or broadcast address).
    pub fn is_host(self, ip: Ipv4Addr) -> bool {
        let size = 1u64 << (32 - u32::from(self.prefix));
        let offset = u64::from(u32::from(ip).wrapping_sub(u32::from(self.addr)));
        self.contains(ip) && offset >= 1 && offset + 1 < size
    }

    /// The network's gateway: its first host address, held by the bridge.
    pub fn gateway(self) -> Option<Ipv4Addr> {
        self.hosts().next()
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) }
}

impl std::str::FromStr for Cidr {
    type Err = BadCidr;
    fn from_str(s: &str) -> Result<Cidr, BadCidr> {
        let bad = || BadCidr(s.to_string());
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if prefix > 32 || u32::from(addr) & !mask(prefix) != 0 {
            return Err(bad());
        }
        Cidr::new(addr, prefix)
    }
}

impl TryFrom<String> for Cidr {
    type Error = BadCidr;
    fn try_from(s: String) -> Result<Cidr, BadCidr> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// How a network reaches beyond its bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum Mode {
    /// Masqueraded out of `uplink`.
    Nat { uplink: String },
    /// Nothing beyond the bridge.
    Isolated,
    /// On a bridge the operator made (`bridge`), routed as the host routes it; no NAT.
    Bridged { bridge: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub name: String,
    pub cidr: Cidr,
    pub mode: Mode,
}

/// A VM's place on a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    pub vm: String,
    pub network: String,
    pub ip: Ipv4Addr,
    /// The VM's MAC: frames from its tap must carry it, and its address (anti-spoofing).
    pub mac: String,
    /// Security groups (ids) whose rules apply to this VM.
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    Any,
}

/// Inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ports {
    pub from: u16,
    pub to: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Cidr(Cidr),
    /// The VMs in this security group (its id).
    Group(String),
}

/// Traffic a group lets in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ingress {
    pub proto: Proto,
    /// None: every port (and the only choice for icmp and any).
    pub ports: Option<Ports>,
    pub source: Source,
}

/// Traffic a group lets out, beyond its own network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Egress {
    pub cidr: Cidr,
    pub proto: Proto,
    pub ports: Option<Ports>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub id: String,
    pub name: String,
    pub ingress: Vec<Ingress>,
    /// None: everything out is allowed (on nat and bridged networks); Some: only these.
    pub egress: Option<Vec<Egress>>,
}

/// A host port forwarded to a VM's port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    pub proto: Proto,
    pub host_port: u16,
    pub vm: String,
    pub vm_port: u16,
}

/// Everything the node renders its networks from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub networks: Vec<Network>,
    pub ports: Vec<Port>,
    pub groups: Vec<Group>,
    pub forwards: Vec<Forward>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("networks {0} and {1} overlap ({2} and {3}); pick a CIDR no other network on this node uses")]
    Overlap(String, String, Cidr, Cidr),
    #[error("network {0}: {1} is too small for a gateway and a VM; use a /29 or larger")]
    TooSmall(String, Cidr),
    #[error("vm {vm}: address {ip} is not a host address of network {network} ({cidr}) or is its gateway")]
    Address { vm: String, ip: Ipv4Addr, network: String, cidr: Cidr },
    #[error("vm {0}: `{1}` is not a locally administered unicast MAC such as 02:6d:00:00:00:01")]
    Mac(String, String),
    #[error("vm {0}: address {1} is used twice")]
    Duplicate(String, Ipv4Addr),
    #[error("{0} names `{1}`, which does not exist")]
    Unknown(String, String),
    #[error("{0}: ports {1}-{2} are not a range of 1-65535, or the protocol has no ports")]
    Ports(String, u16, u16),
    #[error("host port {0}/{1:?} is forwarded twice")]
    Forwarded(u16, Proto),
}

fn check_ports(what: &str, proto: Proto, ports: Option<Ports>) -> Result<(), Invalid> {
    match ports {
        None => Ok(()),
        Some(p) if p.from == 0 || p.from > p.to || !matches!(proto, Proto::Tcp | Proto::Udp) => {
            Err(Invalid::Ports(what.to_string(), p.from, p.to))
        }
        Some(_) => Ok(()),
    }
}

impl NetState {
    /// Checks what no ruleset may be rendered from: overlapping networks, addresses outside
    /// their network or used twice, names of things that do not exist, bad ports.
    pub fn validate(&self) -> Result<(), Invalid> {
        for (i, a) in self.networks.iter().enumerate() {
            if a.cidr.prefix() > 29 {
                return Err(Invalid::TooSmall(a.name.clone(), a.cidr));
            }
            for b in &self.networks[i + 1..] {
                if a.cidr.overlaps(b.cidr) {
                    return Err(Invalid::Overlap(a.name.clone(), b.name.clone(), a.cidr, b.cidr));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for port in &self.ports {
            let net = self
                .networks
                .iter()
                .find(|n| n.id == port.network)
                .ok_or_else(|| Invalid::Unknown(format!("vm {}", port.vm), port.network.clone()))?;
            if !net.cidr.is_host(port.ip) || Some(port.ip) == net.cidr.gateway() {
                return Err(Invalid::Address {
                    vm: port.vm.clone(),
                    ip: port.ip,
                    network: net.name.clone(),
                    cidr: net.cidr,
                });
            }
            if !valid_mac(&port.mac) {
                return Err(Invalid::Mac(port.vm.clone(), port.mac.clone()));
            }
            if !seen.insert(port.ip) {
                return Err(Invalid::Duplicate(port.vm.clone(), port.ip));
            }
            for g in &port.groups {
                if !self.groups.iter().any(|x| &x.id == g) {
                    return Err(Invalid::Unknown(format!("vm {}", port.vm), g.clone()));
                }
            }
        }
        for g in &self.groups {
            for rule in &g.ingress {
                check_ports(&format!("group {}", g.name), rule.proto, rule.ports)?;
                if let Source::Group(src) = &rule.source
                    && !self.groups.iter().any(|x| &x.id == src)
                {
                    return Err(Invalid::Unknown(format!("group {}", g.name), src.clone()));
                }
            }
            for rule in g.egress.iter().flatten() {
                check_ports(&format!("group {}", g.name), rule.proto, rule.ports)?;
            }
        }
        let mut forwarded = std::collections::HashSet::new();
        for f in &self.forwards {
            if !self.ports.iter().any(|p| p.vm == f.vm) {
                return Err(Invalid::Unknown("a port forward".into(), f.vm.clone()));
            }
            let one = Some(Ports { from: f.vm_port, to: f.vm_port });
            check_ports("a port forward", f.proto, one)?;
            check_ports("a port forward", f.proto, Some(Ports { from: f.host_port, to: f.host_port }))?;
            if !forwarded.insert((f.host_port, f.proto)) {
                return Err(Invalid::Forwarded(f.host_port, f.proto));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c: Cidr = "10.80.0.0/24".parse().unwrap();
        assert_eq!(c.gateway(), Some(Ipv4Addr::new(10, 80, 0, 1)));
        assert_eq!(c.hosts().count(), 254);
        assert_eq!(c.host_count(), 254);
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().host_count(), (1 << 24) - 2);
        let all: Vec<Ipv4Addr> = (0..=255).map(|i| Ipv4Addr::new(10, 80, 0, i)).collect();
        assert_eq!(all.iter().filter(|ip| c.is_host(**ip)).count(), 254);
        assert!(!c.is_host(Ipv4Addr::new(10, 80, 0, 0)) && !c.is_host(Ipv4Addr::new(10, 80, 0, 255)));
        assert!(!c.is_host(Ipv4Addr::new(10, 80, 1, 1)) && c.is_host(Ipv4Addr::new(10, 80, 0, 1)));
        assert!(c.contains(Ipv4Addr::new(10, 80, 0, 255)) && !c.contains(Ipv4Addr::new(10, 80, 1, 0)));
        assert!(c.overlaps("10.80.0.128/25".parse().unwrap()) && !c.overlaps("10.81.0.0/16".parse().unwrap()));
        for bad in ["10.80.0.1/24", "10.80.0.0", "10.80.0.0/33", "x/8", "10.80.0.0/-1", "300.0.0.0/8"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"10.80.0.0/24\"");
    }
}

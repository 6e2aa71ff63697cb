//! The nftables ruleset, as a pure function of [`NetState`]: the table `inet moat`, built as a
//! small syntax tree ([`Table`]) and printed as `nft -f` input that replaces the table whole
//! in one transaction. The tree is also what the property tests evaluate packets against.
//!
//! Policy, per network bridge `B`:
//! * `forward`: `iifname B jump from_B` for every bridge, then `oifname B jump to_B` for every
//!   bridge (a destination's accept must never run before a source's drop).
//! * `from_B`: replies pass; a VM's own source address goes to its profile's `out_` chain (one
//!   verdict-map lookup for all VMs); any other source (spoofed, IPv6) is dropped.
//! * `out_<profile>`: traffic staying on `B` goes on to `to_B`; beyond it, an isolated network drops
//!   everything, a VM whose groups list egress rules may reach only those, otherwise anything.
//! * `to_B`: replies and port-forwarded connections pass; traffic to a VM goes to its profile's
//!   `in_` chain, which accepts only what one of its groups' ingress rules allows, and drops the
//!   rest. So VM-to-VM traffic (forced through the host by isolated bridge ports with proxy ARP)
//!   needs a rule. VMs with the same groups on the same network share one `in_` and one `out_`
//!   chain (a profile), so the ruleset grows with the kinds of VMs, not their number.
//! * `input`: from a VM to the host itself, only replies and ICMP.
//! * NAT: `postrouting` masquerades nat networks out of their uplink (no uplink named: out of any
//!   interface but the bridge); `prerouting` DNATs forwarded host ports (to local addresses only)
//!   to their VM.
//!
//! Beside it, in the same transaction, `bridge moat` binds each tap to its VM: a frame from a tap
//! must carry the VM's MAC and IPv4 address (IP and ARP), and anything else than IPv4 and ARP is
//! dropped. `inet moat` judges VMs by source address; this is what makes that address true.

use std::fmt::Write;
use std::net::Ipv4Addr;

use super::model::{Cidr, Forward, Mode, NetState, Ports, Proto, Source};
use super::names;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    Iif(String),
    Oif(String),
    /// Leaving by any interface but this one.
    OifNot(String),
    Saddr(Ipv4Addr),
    Daddr(Ipv4Addr),
    SaddrCidr(Cidr),
    DaddrCidr(Cidr),
    /// Source address in a named set (a security group's members).
    SaddrSet(String),
    L4(Proto, Option<Ports>),
    /// conntrack: a reply or related to an accepted connection.
    Established,
    /// conntrack: the connection was DNATed (a port forward).
    Dnatted,
    /// The destination is one of the host's own addresses.
    ToHost,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
    Masquerade,
    Dnat(Ipv4Addr, u16),
    /// One lookup instead of a rule per VM: the packet's source (or destination) address picks
    /// the chain to `goto`; no entry, no verdict (the next rule runs).
    Vmap {
        source: bool,
        entries: Vec<(Ipv4Addr, String)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub verdict: Verdict,
    pub comment: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    pub kind: &'static str,
    pub hook: &'static str,
    pub priority: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub hook: Option<Hook>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    pub elements: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    pub sets: Vec<Set>,
    pub chains: Vec<Chain>,
    /// Each VM's tap, MAC and address: the bridge table `bridge moat` drops frames from a tap
    /// with another source MAC or IPv4 address (in IP and ARP), and anything but IPv4 and ARP,
    /// so a guest cannot pose as another VM.
    pub taps: Vec<(String, String, Ipv4Addr)>,
}

impl Table {
    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name == name)
    }
}

fn rule(matches: Vec<Match>, verdict: Verdict) -> Rule {
    Rule { matches, verdict, comment: None }
}

/// The bridge a network's VMs are on.
pub fn bridge_of(network: &super::model::Network) -> String {
    match &network.mode {
        Mode::Bridged { bridge } => bridge.clone(),
        _ => names::bridge(&network.id),
    }
}

/// The set holding a security group's members' addresses.
pub fn group_set(group: &str) -> String {
    format!("g_{}", names::short(group))
}

/// The table for `state` (which [`NetState::validate`] accepted).
pub fn table(state: &NetState) -> Table {
    let mut t = Table {
        taps: state.ports.iter().map(|p| (names::tap(&p.vm), p.mac.to_ascii_lowercase(), p.ip)).collect(),
        ..Table::default()
    };
    for g in &state.groups {
        let elements = state.ports.iter().filter(|p| p.groups.contains(&g.id)).map(|p| p.ip).collect();
        t.sets.push(Set { name: group_set(&g.id), elements });
    }
    let mut forward = Vec::new();
    let mut forward_to = Vec::new();
    let mut input = Vec::new();
    let mut postrouting = Vec::new();
    for net in &state.networks {
        let b = bridge_of(net);
        let label = |what: &str| Some(format!("{what} {}", net.name));
        // Every source check comes before any destination check: a destination's accept ends
        // the evaluation, so it must never run before the source's egress drop.
        forward.push(Rule {
            comment: label("from network"),
            ..rule(vec![Match::Iif(b.clone())], Verdict::Jump(format!("from_{b}")))
        });
        forward_to.push(Rule {
            comment: label("to network"),
            ..rule(vec![Match::Oif(b.clone())], Verdict::Jump(format!("to_{b}")))
        });
        input.push(rule(vec![Match::Iif(b.clone())], Verdict::Jump(format!("host_{b}"))));
        t.chains.push(Chain {
            name: format!("host_{b}"),
            hook: None,
            rules: vec![
                rule(vec![Match::Established], Verdict::Accept),
                rule(vec![Match::L4(Proto::Icmp, None)], Verdict::Accept),
                rule(vec![], Verdict::Drop),
            ],
        });
        if let Mode::Nat { uplink } = &net.mode {
            // No uplink named: masquerade whatever leaves by another interface than the bridge
            // (the host's routes pick the way out).
            let out = if uplink.is_empty() { Match::OifNot(b.clone()) } else { Match::Oif(uplink.clone()) };
            postrouting.push(rule(vec![Match::SaddrCidr(net.cidr), out], Verdict::Masquerade));
        }
        let ports: Vec<_> = state.ports.iter().filter(|p| p.network == net.id).collect();
        let mut from = vec![rule(vec![Match::Established], Verdict::Accept)];
        let mut to = vec![rule(vec![Match::Established], Verdict::Accept)];
        // Port forwards are per VM: accepted before the per-profile chains.
        for f in &state.forwards {
            if let Some(port) = ports.iter().find(|p| p.vm == f.vm) {
                let one = Some(Ports { from: f.vm_port, to: f.vm_port });
                to.push(Rule {
                    comment: Some(format!("forward to vm {}", f.vm)),
                    ..rule(vec![Match::Dnatted, Match::Daddr(port.ip), Match::L4(f.proto, one)], Verdict::Accept)
                });
            }
        }
        // VMs with the same groups on the same network share their chains (a profile), so the
        // number of chains grows with the kinds of VMs, not with the VMs.
        let (mut outs, mut ins) = (Vec::new(), Vec::new());
        let mut made = std::collections::HashSet::new();
        for port in &ports {
            let mut groups = port.groups.clone();
            groups.sort();
            let profile = names::short(&format!("{}/{}", net.id, groups.join(",")));
            outs.push((port.ip, format!("out_{profile}")));
            ins.push((port.ip, format!("in_{profile}")));
            if made.insert(profile.clone()) {
                t.chains.push(Chain {
                    name: format!("out_{profile}"),
                    hook: None,
                    rules: egress(state, net, &b, port),
                });
                t.chains.push(Chain { name: format!("in_{profile}"), hook: None, rules: ingress(state, port) });
            }
        }
        if !outs.is_empty() {
            from.push(rule(vec![], Verdict::Vmap { source: true, entries: outs }));
            to.push(rule(vec![], Verdict::Vmap { source: false, entries: ins }));
        }
        from.push(rule(vec![], Verdict::Drop));
        to.push(rule(vec![], Verdict::Drop));
        t.chains.push(Chain { name: format!("from_{b}"), hook: None, rules: from });
        t.chains.push(Chain { name: format!("to_{b}"), hook: None, rules: to });
    }
    forward.extend(forward_to);
    let prerouting: Vec<Rule> = state.forwards.iter().filter_map(|f| dnat(state, f)).collect();
    let base = |name: &str, kind, hook, priority, rules| Chain {
        name: name.into(),
        hook: Some(Hook { kind, hook, priority }),
        rules,
    };
    t.chains.insert(0, base("forward", "filter", "forward", "filter", forward));
    t.chains.insert(1, base("input", "filter", "input", "filter", input));
    t.chains.insert(2, base("postrouting", "nat", "postrouting", "srcnat", postrouting));
    t.chains.insert(3, base("prerouting", "nat", "prerouting", "dstnat", prerouting));
    t
}

fn egress(state: &NetState, net: &super::model::Network, bridge: &str, port: &super::model::Port) -> Vec<Rule> {
    let mut rules = vec![rule(vec![Match::Oif(bridge.to_string())], Verdict::Return)];
    if net.mode == Mode::Isolated {
        rules.push(rule(vec![], Verdict::Drop));
        return rules;
    }
    let lists: Vec<_> =
        state.groups.iter().filter(|g| port.groups.contains(&g.id)).filter_map(|g| g.egress.as_ref()).collect();
    if lists.is_empty() {
        return rules;
    }
    for allowed in lists.into_iter().flatten() {
        let mut m = vec![Match::DaddrCidr(allowed.cidr)];
        if allowed.proto != Proto::Any {
            m.push(Match::L4(allowed.proto, allowed.ports));
        }
        rules.push(rule(m, Verdict::Return));
    }
    rules.push(rule(vec![], Verdict::Drop));
    rules
}

fn ingress(state: &NetState, port: &super::model::Port) -> Vec<Rule> {
    let mut rules = Vec::new();
    for g in state.groups.iter().filter(|g| port.groups.contains(&g.id)) {
        for allowed in &g.ingress {
            let mut m = vec![match &allowed.source {
                Source::Cidr(c) => Match::SaddrCidr(*c),
                Source::Group(src) => Match::SaddrSet(group_set(src)),
            }];
            if allowed.proto != Proto::Any {
                m.push(Match::L4(allowed.proto, allowed.ports));
            }
            rules.push(Rule { comment: Some(format!("group {}", g.name)), ..rule(m, Verdict::Accept) });
        }
    }
    rules.push(rule(vec![], Verdict::Drop));
    rules
}

fn dnat(state: &NetState, f: &Forward) -> Option<Rule> {
    let port = state.ports.iter().find(|p| p.vm == f.vm)?;
    let host = Some(Ports { from: f.host_port, to: f.host_port });
    Some(Rule {
        comment: Some(format!("forward to vm {}", f.vm)),
        ..rule(vec![Match::ToHost, Match::L4(f.proto, host)], Verdict::Dnat(port.ip, f.vm_port))
    })
}

/// A comment as nft reads it: printable ASCII without quotes or backslashes, at most 128 bytes.
pub fn escape(text: &str) -> String {
    text.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').filter(|c| *c != '"' && *c != '\\').take(128).collect()
}

fn l4(proto: Proto, ports: Option<Ports>) -> String {
    let range = |p: Ports| if p.from == p.to { p.from.to_string() } else { format!("{}-{}", p.from, p.to) };
    match (proto, ports) {
        (Proto::Tcp, Some(p)) => format!("tcp dport {}", range(p)),
        (Proto::Udp, Some(p)) => format!("udp dport {}", range(p)),
        (Proto::Tcp, None) => "meta l4proto tcp".into(),
        (Proto::Udp, None) => "meta l4proto udp".into(),
        (Proto::Icmp, _) => "meta l4proto icmp".into(),
        (Proto::Any, _) => String::new(),
    }
}

fn print_match(m: &Match) -> String {
    match m {
        Match::Iif(i) => format!("iifname \"{}\"", escape(i)),
        Match::Oif(i) => format!("oifname \"{}\"", escape(i)),
        Match::OifNot(i) => format!("oifname != \"{}\"", escape(i)),
        Match::Saddr(a) => format!("ip saddr {a}"),
        Match::Daddr(a) => format!("ip daddr {a}"),
        Match::SaddrCidr(c) => format!("ip saddr {c}"),
        Match::DaddrCidr(c) => format!("ip daddr {c}"),
        Match::SaddrSet(s) => format!("ip saddr @{s}"),
        Match::L4(p, ports) => l4(*p, *ports),
        Match::Established => "ct state established,related".into(),
        Match::Dnatted => "ct status dnat".into(),
        Match::ToHost => "fib daddr type local".into(),
    }
}

fn print_verdict(v: &Verdict) -> String {
    match v {
        Verdict::Accept => "accept".into(),
        Verdict::Drop => "drop".into(),
        Verdict::Return => "return".into(),
        Verdict::Jump(c) => format!("jump {c}"),
        Verdict::Goto(c) => format!("goto {c}"),
        Verdict::Masquerade => "masquerade".into(),
        Verdict::Dnat(ip, port) => format!("dnat ip to {ip}:{port}"),
        Verdict::Vmap { source, entries } => {
            let list: Vec<String> = entries.iter().map(|(ip, chain)| format!("{ip} : goto {chain}")).collect();
            format!("ip {} vmap {{ {} }}", if *source { "saddr" } else { "daddr" }, list.join(", "))
        }
    }
}

/// `nft -f` input replacing the table whole (creating it first, so the delete never fails).
pub fn print(table: &Table) -> String {
    let mut out = String::from("table inet moat\ndelete table inet moat\ntable inet moat {\n");
    for set in &table.sets {
        let _ = writeln!(out, "\tset {} {{\n\t\ttype ipv4_addr", set.name);
        if !set.elements.is_empty() {
            let list: Vec<String> = set.elements.iter().map(Ipv4Addr::to_string).collect();
            let _ = writeln!(out, "\t\telements = {{ {} }}", list.join(", "));
        }
        out.push_str("\t}\n");
    }
    for chain in &table.chains {
        let _ = writeln!(out, "\tchain {} {{", chain.name);
        if let Some(h) = chain.hook {
            let _ = writeln!(out, "\t\ttype {} hook {} priority {}; policy accept;", h.kind, h.hook, h.priority);
        }
        for r in &chain.rules {
            let mut parts: Vec<String> = r.matches.iter().map(print_match).filter(|s| !s.is_empty()).collect();
            parts.push(print_verdict(&r.verdict));
            if let Some(c) = &r.comment {
                parts.push(format!("comment \"{}\"", escape(c)));
            }
            let _ = writeln!(out, "\t\t{}", parts.join(" "));
        }
        out.push_str("\t}\n");
    }
    out.push_str("}\n");
    print_bridge(&mut out, table);
    out
}

/// `nft -f` input removing the table (when no network is left).
pub const REMOVE: &str = "table inet moat\ndelete table inet moat\ntable bridge moat\ndelete table bridge moat\n";

/// The `bridge moat` table: frames from moat's taps must carry their VM's MAC and IPv4 address.
/// (Frames are picked by tap: other ports of an operator's bridge are not moat's to judge.)
fn print_bridge(out: &mut String, table: &Table) {
    out.push_str("table bridge moat\ndelete table bridge moat\ntable bridge moat {\n");
    out.push_str("\tset taps {\n\t\ttype ifname\n");
    if !table.taps.is_empty() {
        let names: Vec<String> = table.taps.iter().map(|(tap, ..)| format!("\"{}\"", escape(tap))).collect();
        let _ = writeln!(out, "\t\telements = {{ {} }}", names.join(", "));
    }
    out.push_str("\t}\n\tset ports {\n\t\ttype ifname . ether_addr . ipv4_addr\n");
    if !table.taps.is_empty() {
        let elements: Vec<String> =
            table.taps.iter().map(|(tap, mac, ip)| format!("\"{}\" . {mac} . {ip}", escape(tap))).collect();
        let _ = writeln!(out, "\t\telements = {{ {} }}", elements.join(", "));
    }
    out.push_str("\t}\n\tchain prerouting {\n\t\ttype filter hook prerouting priority -200; policy accept;\n");
    out.push_str("\t\tiifname @taps jump port\n\t}\n\tchain port {\n");
    out.push_str("\t\tether type ip iifname . ether saddr . ip saddr != @ports drop comment \"spoofed\"\n");
    out.push_str("\t\tether type arp iifname . ether saddr . arp saddr ip != @ports drop comment \"spoofed\"\n");
    out.push_str("\t\tether type != { ip, arp } drop comment \"not IPv4\"\n");
    out.push_str("\t}\n}\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::model::{Egress, Group, Ingress, Network, Port};
    use proptest::prelude::*;

    /// A packet as the forward hook sees it.
    #[derive(Debug, Clone)]
    struct Packet {
        iif: String,
        oif: String,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: Proto,
        dport: u16,
        established: bool,
    }

    #[derive(Debug, PartialEq)]
    enum Outcome {
        Accept,
        Drop,
        Return,
    }

    fn matches(t: &Table, m: &Match, p: &Packet) -> bool {
        let in_ports = |ports: &Option<Ports>| ports.is_none_or(|r| (r.from..=r.to).contains(&p.dport));
        match m {
            Match::Iif(i) => &p.iif == i,
            Match::Oif(i) => &p.oif == i,
            Match::OifNot(i) => &p.oif != i,
            Match::Saddr(a) => p.src == *a,
            Match::Daddr(a) => p.dst == *a,
            Match::SaddrCidr(c) => c.contains(p.src),
            Match::DaddrCidr(c) => c.contains(p.dst),
            Match::SaddrSet(s) => t.sets.iter().any(|set| &set.name == s && set.elements.contains(&p.src)),
            Match::L4(proto, ports) => (*proto == Proto::Any || *proto == p.proto) && in_ports(ports),
            Match::Established => p.established,
            Match::Dnatted | Match::ToHost => false,
        }
    }

    /// Evaluates chain `name` as nft does (jump returns here; goto returns to our caller).
    fn run(t: &Table, name: &str, p: &Packet) -> Outcome {
        let chain = t.chain(name).unwrap_or_else(|| panic!("no chain {name}"));
        for r in &chain.rules {
            if !r.matches.iter().all(|m| matches(t, m, p)) {
                continue;
            }
            match &r.verdict {
                Verdict::Accept => return Outcome::Accept,
                Verdict::Drop => return Outcome::Drop,
                Verdict::Return => return Outcome::Return,
                Verdict::Jump(c) => match run(t, c, p) {
                    Outcome::Return => {}
                    other => return other,
                },
                Verdict::Goto(c) => return run(t, c, p),
                Verdict::Vmap { source, entries } => {
                    let key = if *source { p.src } else { p.dst };
                    if let Some((_, c)) = entries.iter().find(|(ip, _)| *ip == key) {
                        return run(t, c, p);
                    }
                }
                Verdict::Masquerade | Verdict::Dnat(..) => unreachable!("no NAT in the filter chains"),
            }
        }
        Outcome::Return
    }

    /// Whether the forward hook lets `p` through (its policy is accept).
    fn forwarded(t: &Table, p: &Packet) -> bool {
        run(t, "forward", p) != Outcome::Drop
    }

    /// What the policy says: some ingress rule of one of `dst`'s groups allows `src` on this
    /// protocol and port.
    fn allowed(state: &NetState, src: &Port, dst: &Port, proto: Proto, dport: u16) -> bool {
        state.groups.iter().filter(|g| dst.groups.contains(&g.id)).flat_map(|g| &g.ingress).any(|r| {
            let from = match &r.source {
                Source::Cidr(c) => c.contains(src.ip),
                Source::Group(g) => src.groups.contains(g),
            };
            let l4 =
                r.proto == Proto::Any || (r.proto == proto && r.ports.is_none_or(|p| (p.from..=p.to).contains(&dport)));
            from && l4
        })
    }

    fn ports_strategy() -> impl Strategy<Value = Option<Ports>> {
        prop_oneof![Just(None), (1u16..100, 0u16..20).prop_map(|(from, len)| Some(Ports { from, to: from + len }))]
    }

    fn proto_strategy() -> impl Strategy<Value = Proto> {
        prop_oneof![Just(Proto::Tcp), Just(Proto::Udp), Just(Proto::Icmp), Just(Proto::Any)]
    }

    /// Networks 10.1.0.0/24 and 10.2.0.0/24 (nat or isolated), up to 6 VMs, up to 3 groups with
    /// random ingress rules (from CIDRs or groups) and egress lists, random memberships.
    fn state_strategy() -> impl Strategy<Value = NetState> {
        let rule = (proto_strategy(), ports_strategy(), 0u8..4, 0usize..3, 0u8..8);
        let group = (
            proptest::collection::vec(rule, 0..4),
            proptest::option::of(proptest::collection::vec((0u8..3, 0u8..8), 0..3)),
        );
        (
            prop::bool::ANY,
            prop::bool::ANY,
            proptest::collection::vec((0usize..2, 0usize..3, 0usize..3), 2..6),
            proptest::collection::vec(group, 0..3),
        )
            .prop_map(|(nat_a, nat_b, vms, groups)| {
                let mode = |nat: bool| if nat { Mode::Nat { uplink: "up0".into() } } else { Mode::Isolated };
                let networks = vec![
                    Network {
                        id: "net-a".into(),
                        name: "a \"quoted\" \\ name".into(),
                        cidr: "10.1.0.0/24".parse().unwrap(),
                        mode: mode(nat_a),
                    },
                    Network {
                        id: "net-b".into(),
                        name: "b".into(),
                        cidr: "10.2.0.0/24".parse().unwrap(),
                        mode: mode(nat_b),
                    },
                ];
                let group_ids: Vec<String> = (0..groups.len()).map(|i| format!("sg-{i}")).collect();
                let ports: Vec<Port> = vms
                    .iter()
                    .enumerate()
                    .map(|(i, (net, g1, g2))| Port {
                        vm: format!("vm-{i}"),
                        network: networks[*net].id.clone(),
                        ip: Ipv4Addr::new(10, (*net + 1) as u8, 0, (i + 2) as u8),
                        mac: format!("02:6d:00:00:00:{:02x}", i + 2),
                        groups: [g1, g2]
                            .iter()
                            .filter_map(|g| group_ids.get(**g).cloned())
                            .collect::<std::collections::BTreeSet<_>>()
                            .into_iter()
                            .collect(),
                    })
                    .collect();
                let groups = groups
                    .into_iter()
                    .enumerate()
                    .map(|(i, (rules, egress))| Group {
                        id: group_ids[i].clone(),
                        name: format!("group {i}"),
                        ingress: rules
                            .into_iter()
                            .map(|(proto, ports, kind, g, host)| Ingress {
                                proto,
                                ports: if matches!(proto, Proto::Tcp | Proto::Udp) { ports } else { None },
                                source: match kind {
                                    0 => Source::Cidr("10.0.0.0/8".parse().unwrap()),
                                    1 => Source::Cidr(Cidr::new(Ipv4Addr::new(10, 1, 0, 0), 24).unwrap()),
                                    2 => Source::Cidr(Cidr::new(Ipv4Addr::new(10, 2, 0, host + 2), 32).unwrap()),
                                    _ => {
                                        Source::Group(group_ids.get(g).cloned().unwrap_or_else(|| group_ids[i].clone()))
                                    }
                                },
                            })
                            .collect(),
                        egress: egress.map(|list| {
                            list.into_iter()
                                .map(|(net, _)| Egress {
                                    cidr: Cidr::new(Ipv4Addr::new(10, net + 1, 0, 0), 24).unwrap(),
                                    proto: Proto::Any,
                                    ports: None,
                                })
                                .collect()
                        }),
                    })
                    .collect();
                NetState { networks, ports, groups, forwards: Vec::new() }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// No ruleset lets a new connection from one VM reach another without a rule allowing
        /// it; on one network, every allowed one gets through; an isolated network's VMs reach
        /// no other network; a spoofed source reaches no VM.
        #[test]
        fn vm_to_vm_needs_a_rule(state in state_strategy(), pick in (0usize..6, 0usize..6, proto_strategy(), 1u16..130, 0u8..255)) {
            state.validate().unwrap();
            let t = table(&state);
            prop_assert_eq!(&t, &table(&state), "the renderer is a function of the state");
            let (a, b, proto, dport, spoof) = pick;
            let (src, dst) = (&state.ports[a % state.ports.len()], &state.ports[b % state.ports.len()]);
            prop_assume!(src.vm != dst.vm && proto != Proto::Any);
            let net = |p: &Port| state.networks.iter().find(|n| n.id == p.network).unwrap().clone();
            let packet = Packet {
                iif: bridge_of(&net(src)),
                oif: bridge_of(&net(dst)),
                src: src.ip,
                dst: dst.ip,
                proto,
                dport,
                established: false,
            };
            let through = forwarded(&t, &packet);
            let policy = allowed(&state, src, dst, proto, dport);
            if through {
                prop_assert!(policy, "{src:?} -> {dst:?} {proto:?}/{dport} got through without a rule");
            }
            if src.network == dst.network {
                prop_assert_eq!(through, policy, "same network: exactly what the rules allow");
            } else if net(src).mode == Mode::Isolated {
                prop_assert!(!through, "an isolated network's VM reached another network");
            }
            let spoofed = Packet { src: Ipv4Addr::new(10, 1, 0, spoof), ..packet.clone() };
            if !state.ports.iter().any(|p| p.ip == spoofed.src) {
                prop_assert!(!forwarded(&t, &spoofed), "a spoofed source got through");
            }
            // Replies always pass; IPv6 or other sources from a bridge never do.
            let reply = Packet { established: true, ..packet };
            prop_assert!(forwarded(&t, &reply), "a reply was dropped");
        }

        /// Whatever names say, the printed ruleset's comments stay comments.
        #[test]
        fn comments_are_escaped(name in ".{0,80}") {
            let state = NetState {
                networks: vec![Network { id: "n".into(), name, cidr: "10.9.0.0/24".parse().unwrap(), mode: Mode::Isolated }],
                ..NetState::default()
            };
            let text = print(&table(&state));
            for line in text.lines() {
                if let Some((_, comment)) = line.split_once("comment \"") {
                    prop_assert!(comment.ends_with('"'), "{line}");
                    let body = &comment[..comment.len() - 1];
                    prop_assert!(!body.contains('"') && !body.contains('\\') && body.is_ascii(), "{line}");
                }
            }
        }
    }

    #[test]
    fn a_small_ruleset_reads_as_intended() {
        let state = NetState {
            networks: vec![Network {
                id: "net-1".into(),
                name: "dev".into(),
                cidr: "10.5.0.0/24".parse().unwrap(),
                mode: Mode::Nat { uplink: "eth0".into() },
            }],
            ports: vec![Port {
                vm: "vm-1".into(),
                network: "net-1".into(),
                ip: "10.5.0.2".parse().unwrap(),
                mac: "02:6d:00:00:00:02".into(),
                groups: vec!["sg-1".into()],
            }],
            groups: vec![Group {
                id: "sg-1".into(),
                name: "web".into(),
                ingress: vec![Ingress {
                    proto: Proto::Tcp,
                    ports: Some(Ports { from: 80, to: 80 }),
                    source: Source::Cidr("10.5.0.0/24".parse().unwrap()),
                }],
                egress: None,
            }],
            forwards: vec![Forward { proto: Proto::Tcp, host_port: 8080, vm: "vm-1".into(), vm_port: 80 }],
        };
        state.validate().unwrap();
        let text = print(&table(&state));
        let (b, profile) = (names::bridge("net-1"), names::short("net-1/sg-1"));
        for want in [
            "table inet moat\ndelete table inet moat\ntable inet moat {".to_string(),
            format!("iifname \"{b}\" jump from_{b} comment \"from network dev\""),
            format!("ip saddr vmap {{ 10.5.0.2 : goto out_{profile} }}"),
            format!("ip daddr vmap {{ 10.5.0.2 : goto in_{profile} }}"),
            "ip saddr 10.5.0.0/24 tcp dport 80 accept comment \"group web\"".into(),
            "ct status dnat ip daddr 10.5.0.2 tcp dport 80 accept comment \"forward to vm vm-1\"".into(),
            "ip saddr 10.5.0.0/24 oifname \"eth0\" masquerade".into(),
            "fib daddr type local tcp dport 8080 dnat ip to 10.5.0.2:80".into(),
        ] {
            assert!(text.contains(&want), "{want} missing from\n{text}");
        }
    }
}

//! Networks with real packets, only inside network namespaces this test makes: a "host"
//! namespace where the node's bridge and `inet moat` table live, an "outside" one reached
//! through an uplink veth, and one per VM stand-in (a veth pair in place of a VM's NIC, its host
//! end named as the VM's tap). Nothing is created in, or sent to, the test's own namespace or any
//! real address. Cases: NAT out, isolation between VMs until a group allows one port, a port
//! forward, an egress allow-list, an isolated network, removal, and repair after a flush.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code runs ip and python3

use moat_node::net::apply::Applier;
use moat_node::net::model::{Egress, Group, Ingress, Mode, NetState, Network, Port, Ports, Proto, Source};
use moat_node::net::{names, render};
use moat_node::testing::{Netns, TcpServers, root_and, sh, tcp_read, uplink};

type Ns = Netns;

/// Whether a TCP connection from namespace `ns` to `ip:port` is answered (every server here
/// answers).
fn connects(ns: &Ns, ip: &str, port: u16) -> bool {
    !tcp_read(ns, None, ip, port).is_empty()
}

/// The MAC a VM stand-in's NIC has (and its port says).
fn mac_of(vm: &str) -> String {
    format!("02:6d:00:00:00:{:02x}", vm.bytes().last().unwrap())
}

/// Likewise, from source address `from`.
fn connects_from(ns: &Ns, from: &str, ip: &str, port: u16) -> bool {
    !tcp_read(ns, Some(from), ip, port).is_empty()
}

fn root_and_tools() -> bool {
    root_and(&["ip", "nft", "python3", "bridge"])
}

#[tokio::test]
async fn packets_follow_the_policy_inside_namespaces() {
    if !root_and_tools() {
        return;
    }
    let tag = std::process::id() % 100_000;
    let host = Ns::new(format!("moat-h{tag}"));
    let out = Ns::new(format!("moat-o{tag}"));
    let (v1, v2) = (Ns::new(format!("moat-a{tag}")), Ns::new(format!("moat-b{tag}")));
    // The uplink: host's up0 (192.0.2.1) to outside's eth0 (192.0.2.2).
    uplink(&host, &out);
    // Two VM stand-ins: the host end is named as the VM's tap.
    for (ns, vm, ip) in [(&v1, "vm-1", "10.1.0.2/24"), (&v2, "vm-2", "10.1.0.3/24")] {
        let tap = names::tap(vm);
        let peer = ["peer", "name", "eth0", "address", &mac_of(vm), "netns", &ns.0];
        sh(&[&["ip", "-n", &host.0, "link", "add", &tap, "type", "veth"][..], &peer[..]].concat());
        sh(&["ip", "-n", &ns.0, "addr", "add", ip, "dev", "eth0"]);
        sh(&["ip", "-n", &ns.0, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &ns.0, "route", "add", "default", "via", "10.1.0.1"]);
    }
    let _outside = TcpServers::start(&out, &[8000, 8001]);
    let _web = TcpServers::start(&v2, &[80, 81]);

    let scratch = tempfile::tempdir().unwrap();
    let applier = Applier::in_namespace(&host.0, scratch.path().to_path_buf());
    let nat = Network {
        id: "net-1".into(),
        name: "dev".into(),
        cidr: "10.1.0.0/24".parse().unwrap(),
        mode: Mode::Nat { uplink: "up0".into() },
    };
    let port = |vm: &str, ip: &str, groups: &[&str]| Port {
        vm: vm.into(),
        network: "net-1".into(),
        ip: ip.parse().unwrap(),
        mac: mac_of(vm),
        groups: groups.iter().map(|g| g.to_string()).collect(),
    };
    let web = Group {
        id: "sg-web".into(),
        name: "web".into(),
        ingress: vec![Ingress {
            proto: Proto::Tcp,
            ports: Some(Ports { from: 80, to: 80 }),
            source: Source::Cidr("10.1.0.0/24".parse().unwrap()),
        }],
        egress: None,
    };
    let mut state = NetState {
        networks: vec![nat.clone()],
        ports: vec![port("vm-1", "10.1.0.2", &[]), port("vm-2", "10.1.0.3", &[])],
        groups: vec![web.clone()],
        forwards: Vec::new(),
    };
    applier.apply(&state).await.unwrap();
    applier.apply(&state).await.unwrap(); // idempotent
    for vm in ["vm-1", "vm-2"] {
        applier.attach(&state, vm).await.unwrap();
    }

    // NAT out; VMs cannot reach each other without a rule.
    assert!(connects(&v1, "192.0.2.2", 8000), "nat: vm-1 reaches the outside");
    assert!(!connects(&v1, "10.1.0.3", 80), "vm-1 reached vm-2 with no group allowing it");
    // A group lets port 80 in, and only port 80.
    state.ports[1].groups = vec!["sg-web".into()];
    applier.apply(&state).await.unwrap();
    assert!(connects(&v1, "10.1.0.3", 80), "the group allows tcp/80 from the network");
    assert!(!connects(&v1, "10.1.0.3", 81), "only the allowed port");
    // A VM cannot pose as another address, nor with another MAC, though the rule allows the range.
    sh(&["ip", "-n", &v1.0, "addr", "add", "10.1.0.50/24", "dev", "eth0"]);
    assert!(!connects_from(&v1, "10.1.0.50", "10.1.0.3", 80), "a spoofed source address got through");
    assert!(connects_from(&v1, "10.1.0.2", "10.1.0.3", 80), "its own address still works");
    sh(&["ip", "-n", &v1.0, "link", "set", "eth0", "address", "02:6d:00:00:00:99"]);
    assert!(!connects(&v1, "10.1.0.3", 80), "a spoofed MAC got through");
    sh(&["ip", "-n", &v1.0, "link", "set", "eth0", "address", &mac_of("vm-1")]);
    assert!(connects(&v1, "10.1.0.3", 80), "its own MAC again");
    // A port forward: the host's 8080 to vm-2's 80, from outside.
    state.forwards =
        vec![moat_node::net::model::Forward { proto: Proto::Tcp, host_port: 8080, vm: "vm-2".into(), vm_port: 81 }];
    applier.apply(&state).await.unwrap();
    assert!(connects(&out, "192.0.2.1", 8080), "the forward reaches vm-2:81");
    assert!(!connects(&out, "192.0.2.1", 8081), "nothing else is forwarded");
    // An egress allow-list: vm-1 may reach 192.0.2.2:8000 and nothing else beyond its network.
    state.groups.push(Group {
        id: "sg-out".into(),
        name: "only 8000".into(),
        ingress: Vec::new(),
        egress: Some(vec![Egress {
            cidr: "192.0.2.2/32".parse().unwrap(),
            proto: Proto::Tcp,
            ports: Some(Ports { from: 8000, to: 8000 }),
        }]),
    });
    state.ports[0].groups = vec!["sg-out".into()];
    applier.apply(&state).await.unwrap();
    assert!(connects(&v1, "192.0.2.2", 8000), "allowed by the egress list");
    assert!(!connects(&v1, "192.0.2.2", 8001), "refused by the egress list");
    assert!(connects(&v1, "10.1.0.3", 80), "its own network is not egress");

    // A flushed table is repaired by the next apply.
    sh(&["ip", "netns", "exec", &host.0, "nft", "flush", "ruleset"]);
    assert!(connects(&v1, "10.1.0.3", 81), "without the table nothing is filtered (the flush worked)");
    applier.apply(&state).await.unwrap();
    assert!(!connects(&v1, "10.1.0.3", 81), "the policy is back");
    assert!(!connects(&v1, "192.0.2.2", 8001) && connects(&v1, "192.0.2.2", 8000), "and the egress list with it");

    // Isolated: nothing beyond the bridge.
    state.networks[0].mode = Mode::Isolated;
    state.groups.retain(|g| g.id != "sg-out");
    state.ports[0].groups.clear();
    applier.apply(&state).await.unwrap();
    assert!(!connects(&v1, "192.0.2.2", 8000), "an isolated network reached the outside");
    assert!(connects(&v1, "10.1.0.3", 80), "but its VMs still reach each other where a group allows");

    // Removing every network leaves no table and no bridge.
    let bridge = render::bridge_of(&nat);
    assert!(sh(&["ip", "-n", &host.0, "-j", "link"]).contains(&bridge));
    applier.apply(&NetState::default()).await.unwrap();
    let ruleset = sh(&["ip", "netns", "exec", &host.0, "nft", "list", "ruleset"]);
    assert!(!ruleset.contains("moat"), "{ruleset}");
    assert!(!sh(&["ip", "-n", &host.0, "-j", "link"]).contains(&bridge), "the bridge outlived its network");
}

/// Bad states are refused before anything is applied.
#[tokio::test]
async fn bad_states_change_nothing() {
    if !root_and_tools() {
        return;
    }
    let host = Ns::new(format!("moat-x{}", std::process::id() % 100_000));
    let scratch = tempfile::tempdir().unwrap();
    let applier = Applier::in_namespace(&host.0, scratch.path().to_path_buf());
    let net = |id: &str, cidr: &str| Network {
        id: id.into(),
        name: id.into(),
        cidr: cidr.parse().unwrap(),
        mode: Mode::Isolated,
    };
    let overlapping =
        NetState { networks: vec![net("a", "10.1.0.0/16"), net("b", "10.1.2.0/24")], ..NetState::default() };
    let err = applier.apply(&overlapping).await.unwrap_err().to_string();
    assert!(err.contains("overlap"), "{err}");
    let outside = NetState {
        networks: vec![net("a", "10.1.0.0/24")],
        ports: vec![Port {
            vm: "vm-1".into(),
            network: "a".into(),
            ip: "10.9.0.2".parse().unwrap(),
            mac: mac_of("vm-1"),
            groups: vec![],
        }],
        ..NetState::default()
    };
    let err = applier.apply(&outside).await.unwrap_err().to_string();
    assert!(err.contains("is not a host address"), "{err}");
    let ruleset = sh(&["ip", "netns", "exec", &host.0, "nft", "list", "ruleset"]);
    assert!(ruleset.trim().is_empty(), "something was applied: {ruleset}");
    assert!(!sh(&["ip", "-n", &host.0, "-j", "link"]).contains("\"mb"), "a bridge was made");
}

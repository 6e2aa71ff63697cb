//! Networks end to end, with real packets and QEMU guests, only inside network namespaces this
//! test makes: the node agent keeps its bridges, taps and `inet moat` table in a "host"
//! namespace (`--netns`), whose uplink veth leads to an "outside" namespace with TCP servers.
//! Nothing is created in, or sent to, the test's own namespace or any real address (the
//! gateway talks to the node over loopback, as every gateway test does).
//!
//! Cases: a guest on a nat network gets its address at boot and reaches the outside through NAT;
//! an egress allow-list refuses what it does not list; VMs cannot reach each other until a
//! security group allows one port, and then only that port; a port forward reaches a guest from
//! outside; a flushed table is repaired when the node restarts; deleting VMs and the network
//! leaves no tap, bridge or rule. Bad input (overlapping CIDRs, an exhausted pool, bad ports and
//! CIDRs, a forward to a taken port, another agent's group, a host without nft) is refused with
//! a reason and changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code runs ip and python3

mod common;

use std::time::Duration;

use common::node::Node;
use common::{Home, call_err, call_ok, tool_error};
use moat_node::testing::{Netns, TcpServers, images_with_base, root_and, sh, tcp_read, until, uplink};
use serde_json::{Value, json};

fn root_and_tools() -> bool {
    root_and(&["ip", "nft", "python3", "bridge", "qemu-system-x86_64"])
}

/// What `nc` in VM `vm` reads from `ip:port` within 3 s ("" when nothing answers).
async fn vm_reads<H: rmcp::ClientHandler>(
    client: &rmcp::service::RunningService<rmcp::RoleClient, H>,
    vm: &str,
    ip: &str,
    port: u16,
) -> String {
    let command = format!("nc -w 3 {ip} {port} </dev/null");
    let out = call_ok(client, "vm_exec", json!({"vm": vm, "command": command, "timeout_s": 20})).await;
    out["stdout"].as_str().unwrap_or_default().trim().to_string()
}

/// [`vm_reads`], asked again (up to three times) while the answer is not `want`: the guests'
/// `nc -l` loops are briefly not listening between two connections.
async fn vm_reads_until<H: rmcp::ClientHandler>(
    client: &rmcp::service::RunningService<rmcp::RoleClient, H>,
    vm: &str,
    ip: &str,
    port: u16,
    want: &str,
) -> String {
    let mut got = String::new();
    for _ in 0..3 {
        got = vm_reads(client, vm, ip, port).await;
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    got
}

/// [`tcp_read`], likewise asked again while the answer is not `want`.
fn read_from_until(ns: &Netns, ip: &str, port: u16, want: &str) -> String {
    let mut got = String::new();
    for _ in 0..3 {
        got = tcp_read(ns, None, ip, port);
        if got == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    got
}

/// The host namespace's links named like moat's taps (`mt` and 8 hex digits).
fn taps(ns: &Netns) -> Vec<String> {
    let links: Value = serde_json::from_str(&sh(&["ip", "-n", &ns.0, "-j", "link"])).unwrap();
    links
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| n.len() == 10 && n.starts_with("mt"))
        .map(str::to_string)
        .collect()
}

fn ruleset(ns: &Netns) -> String {
    sh(&["ip", "netns", "exec", &ns.0, "nft", "list", "ruleset"])
}

#[tokio::test]
async fn guests_on_networks_follow_the_policy() {
    if !root_and_tools() {
        return;
    }
    let tag = std::process::id() % 100_000;
    let host = Netns::new(format!("moat-gh{tag}"));
    let out = Netns::new(format!("moat-go{tag}"));
    let bare_ns = Netns::new(format!("moat-gb{tag}"));
    // The uplink: host's up0 (192.0.2.1) to outside's eth0 (192.0.2.2).
    uplink(&host, &out);
    let _servers = TcpServers::start(&out, &[8000, 8001]);

    let home = Home::new();
    let tmp = tempfile::tempdir().unwrap();
    home.run(&["pki", "init"]).await;
    let images = images_with_base(tmp.path());
    let mut node = Node::enroll_and_start(
        &home,
        tmp.path(),
        "n1",
        &["--images", images.to_str().unwrap(), "--accel", "tcg", "--netns", &host.0],
    )
    .await;
    // A second node on a host without nft: its networks are refused with what to install.
    let bare_path = tmp.path().join("bin");
    std::fs::create_dir_all(&bare_path).unwrap();
    for tool in ["ip", "sysctl", "bridge"] {
        let real = sh(&["sh", "-c", &format!("command -v {tool}")]);
        std::os::unix::fs::symlink(real.trim(), bare_path.join(tool)).unwrap();
    }
    let _bare = Node::enroll_and_start_env(
        &home,
        tmp.path(),
        "bare",
        &["--images", images.to_str().unwrap(), "--accel", "tcg", "--netns", &bare_ns.0],
        &[("PATH", bare_path.to_str().unwrap())],
    )
    .await;
    let mut moat = home.http_server(&[]).await;
    let admin = moat.client(&moat.key).await;
    let alice_key = home.key("alice", "agent").await;
    let alice = moat.client(&alice_key).await;
    let bob = moat.client(&home.key("bob", "agent").await).await;

    // Networks are made by admins; agents do not even see the tool.
    let (code, _, _) =
        call_err(&alice, "network_create", json!({"name": "x", "cidr": "10.9.0.0/24", "mode": "nat"})).await;
    assert_eq!(code, -32602, "agents cannot create networks");
    let dev = json!({"name": "dev", "cidr": "10.80.0.0/24", "mode": "nat", "uplink": "up0", "node": "n1",
                     "dns": ["192.0.2.53"]});
    let dev = call_ok(&admin, "network_create", dev).await;
    assert_eq!(
        (dev["network"]["gateway"].as_str(), dev["network"]["addresses_free"].as_u64()),
        (Some("10.80.0.1"), Some(253))
    );
    let bridge = dev["network"]["bridge"].as_str().unwrap().to_string();
    assert!(sh(&["ip", "-n", &host.0, "-j", "link"]).contains(&bridge), "the bridge is in the node's namespace");
    assert!(!sh(&["ip", "-j", "link"]).contains(&bridge), "nothing in the test's own namespace");

    // Bad networks change nothing.
    for (args, want) in [
        (json!({"name": "o", "cidr": "10.80.0.128/25", "mode": "nat", "node": "n1"}), "overlap"),
        (json!({"name": "o", "cidr": "10.80.1.1/24", "mode": "nat", "node": "n1"}), "is not an IPv4 CIDR"),
        (json!({"name": "o", "cidr": "10.80.1.0/30", "mode": "isolated", "node": "n1"}), "/29 or larger"),
        (json!({"name": "o", "cidr": "10.80.1.0/24", "mode": "bridged", "node": "n1"}), "needs bridge"),
        (
            json!({"name": "o", "cidr": "10.80.1.0/24", "mode": "bridged", "bridge": "nosuchbr", "node": "n1"}),
            "does not exist",
        ),
        (
            json!({"name": "o", "cidr": "10.80.1.0/24", "mode": "nat", "uplink": "nosuch0", "node": "n1"}),
            "does not exist",
        ),
        (json!({"name": "dev", "cidr": "10.80.1.0/24", "mode": "nat", "node": "n1"}), "already exists"),
        (json!({"name": "o", "cidr": "10.90.0.0/24", "mode": "nat", "node": "bare"}), "install nftables"),
    ] {
        let err = tool_error(&admin, "network_create", args.clone()).await;
        assert!(err.contains(want), "{args}: {err}");
    }
    assert!(!sh(&["ip", "-n", &bare_ns.0, "-j", "link"]).contains("\"mb"), "a bridge was made without nft");
    let (code, _, _) =
        call_err(&admin, "network_create", json!({"name": "o", "cidr": "10.80.1.0/24", "mode": "mesh"})).await;
    assert_eq!(code, -32602, "an unknown mode is a schema violation");
    let listed = call_ok(&alice, "network_list", json!({})).await;
    assert_eq!(listed["networks"].as_array().unwrap().len(), 1, "only dev exists: {listed}");
    // Any name fits: interface names are derived from ids (15 bytes at most).
    let long = "n".repeat(63);
    let made = call_ok(
        &admin,
        "network_create",
        json!({"name": long, "cidr": "10.82.0.0/24", "mode": "isolated", "node": "n1"}),
    )
    .await;
    assert_eq!(made["network"]["bridge"].as_str().unwrap().len(), 10, "{made}");
    call_ok(&admin, "network_delete", json!({"network": long})).await;

    // An exhausted pool: a /29 has five VM addresses.
    call_ok(
        &admin,
        "network_create",
        json!({"name": "tiny", "cidr": "10.81.0.0/29", "mode": "isolated", "node": "n1"}),
    )
    .await;
    for i in 0..5 {
        let args = json!({"name": format!("t{i}"), "vcpus": 1, "memory_mib": 128, "network": "tiny", "start": false});
        let vm = call_ok(&alice, "vm_create", args).await;
        assert_eq!(vm["vm"]["nic"]["ip"], format!("10.81.0.{}", i + 2), "{vm}");
    }
    let args = json!({"name": "t5", "vcpus": 1, "memory_mib": 128, "network": "tiny", "start": false});
    let err = tool_error(&alice, "vm_create", args).await;
    assert!(err.contains("no free address left"), "{err}");
    assert!(call_ok(&alice, "vm_list", json!({})).await["vms"].as_array().unwrap().iter().all(|v| v["name"] != "t5"));
    let err = tool_error(&admin, "network_delete", json!({"network": "tiny"})).await;
    assert!(err.contains("has VMs on it"), "{err}");
    for i in 0..5 {
        call_ok(&alice, "vm_delete", json!({"vm": format!("t{i}")})).await;
    }
    call_ok(&admin, "network_delete", json!({"network": "tiny"})).await;

    // Security groups: bad rules are refused; another agent's group is not there for bob.
    for (ingress, want) in [
        (json!([{"protocol": "tcp", "ports": "0", "source_cidr": "10.80.0.0/24"}]), "1-65535"),
        (json!([{"protocol": "tcp", "ports": "70000", "source_cidr": "10.80.0.0/24"}]), "1-65535"),
        (json!([{"protocol": "tcp", "ports": "90-80", "source_cidr": "10.80.0.0/24"}]), "1-65535"),
        (json!([{"protocol": "icmp", "ports": "80", "source_cidr": "10.80.0.0/24"}]), "tcp and udp only"),
        (json!([{"protocol": "tcp", "ports": "80", "source_cidr": "10.80.0.7/24"}]), "is not an IPv4 CIDR"),
        (json!([{"protocol": "tcp", "ports": "80"}]), "exactly one of"),
    ] {
        let err =
            tool_error(&alice, "security_group_create", json!({"name": "bad", "network": "dev", "ingress": ingress}))
                .await;
        assert!(err.contains(want), "{ingress}: {err}");
    }
    let (code, _, _) = call_err(
        &alice,
        "security_group_create",
        json!({"name": "bad", "network": "dev", "ingress": [{"protocol": "sctp"}]}),
    )
    .await;
    assert_eq!(code, -32602, "an unknown protocol is a schema violation");
    let web = json!({"name": "web", "network": "dev",
                     "ingress": [{"protocol": "tcp", "ports": "8080", "source_cidr": "10.80.0.0/24"}]});
    call_ok(&alice, "security_group_create", web).await;
    call_ok(&alice, "security_group_create", json!({"name": "out", "network": "dev"})).await;
    let args = json!({"name": "b1", "vcpus": 1, "memory_mib": 128, "network": "dev", "security_groups": ["web"], "start": false});
    let err = tool_error(&bob, "vm_create", args).await;
    assert!(err.contains("no security group named `web`"), "{err}");
    assert_eq!(call_ok(&bob, "security_group_list", json!({})).await["groups"], json!([]));

    // Two guests on dev: a1 (group "out": everything out allowed) and a2 (group "web").
    let a1 = json!({"name": "a1", "vcpus": 1, "memory_mib": 256, "network": "dev", "security_groups": ["out"],
                    "wait_ready": true});
    let a1 = call_ok(&alice, "vm_create", a1).await;
    let a2 = json!({"name": "a2", "vcpus": 1, "memory_mib": 256, "network": "dev", "security_groups": ["web"],
                    "wait_ready": true});
    let a2 = call_ok(&alice, "vm_create", a2).await;
    let (ip1, ip2) = (a1["vm"]["nic"]["ip"].as_str().unwrap(), a2["vm"]["nic"]["ip"].as_str().unwrap());
    assert_eq!((ip1, ip2), ("10.80.0.2", "10.80.0.3"), "{a1} {a2}");
    assert_eq!(a1["vm"]["nic"]["security_groups"], json!(["out"]));
    assert_eq!(taps(&host).len(), 2, "one tap per running guest, in the node's namespace");
    // The guest configured what moat gave it at boot.
    let addr = call_ok(
        &alice,
        "vm_exec",
        json!({"vm": "a1", "command": "ip -4 addr show eth0; ip route; cat /etc/resolv.conf"}),
    )
    .await;
    let text = addr["stdout"].as_str().unwrap();
    assert!(
        text.contains("10.80.0.2/24")
            && text.contains("default via 10.80.0.1")
            && text.contains("nameserver 192.0.2.53"),
        "{addr}"
    );
    let mac = a1["vm"]["nic"]["mac"].as_str().unwrap();
    let link = call_ok(&alice, "vm_exec", json!({"vm": "a1", "command": "cat /sys/class/net/eth0/address"})).await;
    assert_eq!(link["stdout"].as_str().unwrap().trim(), mac, "the guest has the MAC moat chose");

    // NAT out, also after a stop and start (a new tap, the same address).
    assert_eq!(
        vm_reads_until(&alice, "a1", "192.0.2.2", 8000, "hello 8000").await,
        "hello 8000",
        "nat reaches the outside"
    );
    call_ok(&alice, "vm_stop", json!({"vm": "a1", "force": true})).await;
    assert_eq!(taps(&host).len(), 1, "a stopped VM's tap is gone");
    call_ok(&alice, "vm_start", json!({"vm": "a1"})).await;
    until("a1's agent after its restart", Duration::from_secs(60), async || {
        call_ok(&alice, "vm_inspect", json!({"vm": "a1"})).await["vm"]["agent"]["ready"] == true
    })
    .await;
    assert_eq!(call_ok(&alice, "vm_inspect", json!({"vm": "a1"})).await["vm"]["nic"]["ip"], ip1);
    assert_eq!(
        vm_reads_until(&alice, "a1", "192.0.2.2", 8000, "hello 8000").await,
        "hello 8000",
        "and again after a restart"
    );
    // VM to VM: only what a2's group lets in.
    call_ok(
        &alice,
        "vm_exec_start",
        json!({"vm": "a2", "command": "while true; do echo hi-8080 | nc -l -p 8080; done"}),
    )
    .await;
    call_ok(
        &alice,
        "vm_exec_start",
        json!({"vm": "a2", "command": "while true; do echo hi-8081 | nc -l -p 8081; done"}),
    )
    .await;
    call_ok(&alice, "vm_exec_start", json!({"vm": "a1", "command": "while true; do echo hi-a1 | nc -l -p 8080; done"}))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        vm_reads_until(&alice, "a1", ip2, 8080, "hi-8080").await,
        "hi-8080",
        "web lets tcp/8080 in from the network"
    );
    assert_eq!(vm_reads(&alice, "a1", ip2, 8081).await, "", "only the allowed port");
    assert_eq!(vm_reads(&alice, "a2", ip1, 8080).await, "", "a1's groups let nothing in");
    // A guest cannot pose as another address on its network (frames from its tap must carry its
    // own address and MAC), though the group's rule admits the whole range.
    let spoof = format!(
        "ip addr flush dev eth0 && ip addr add 10.80.0.77/24 dev eth0 && nc -w 3 {ip2} 8080 </dev/null; \
         ip addr flush dev eth0; ip addr add {ip1}/24 dev eth0; ip route add default via 10.80.0.1"
    );
    let spoofed = call_ok(&alice, "vm_exec", json!({"vm": "a1", "command": spoof, "timeout_s": 20})).await;
    assert!(!spoofed["stdout"].as_str().unwrap().contains("hi-8080"), "a spoofed address got through: {spoofed}");
    assert_eq!(vm_reads_until(&alice, "a1", ip2, 8080, "hi-8080").await, "hi-8080", "its own address works again");

    // An egress allow-list: only 192.0.2.2:8001 beyond the network.
    let update = json!({"group": "out", "egress": [{"cidr": "192.0.2.2/32", "protocol": "tcp", "ports": "8001"}]});
    call_ok(&alice, "security_group_update", update).await;
    assert_eq!(vm_reads(&alice, "a1", "192.0.2.2", 8000).await, "", "refused by the allow-list");
    assert_eq!(
        vm_reads_until(&alice, "a1", "192.0.2.2", 8001, "hello 8001").await,
        "hello 8001",
        "allowed by the allow-list"
    );
    assert_eq!(vm_reads_until(&alice, "a1", ip2, 8080, "hi-8080").await, "hi-8080", "its own network is not egress");

    // A port forward from the node's address to a2:8080, reached from outside.
    let err = tool_error(&bob, "port_forward_create", json!({"vm": "a2", "host_port": 9090, "vm_port": 8080})).await;
    assert!(err.contains("no vm named `a2`"), "{err}");
    let forward = call_ok(&alice, "port_forward_create", json!({"vm": "a2", "host_port": 9090, "vm_port": 8080})).await;
    assert_eq!(forward["forward"]["vm_ip"], ip2, "{forward}");
    assert_eq!(read_from_until(&out, "192.0.2.1", 9090, "hi-8080"), "hi-8080", "the forward reaches the guest");
    assert_eq!(tcp_read(&out, None, "192.0.2.1", 9091), "", "nothing else is forwarded");
    let err = tool_error(&alice, "port_forward_create", json!({"vm": "a1", "host_port": 9090, "vm_port": 8080})).await;
    assert!(err.contains("already forwarded"), "{err}");
    let (code, _, _) =
        call_err(&alice, "port_forward_create", json!({"vm": "a1", "host_port": 0, "vm_port": 80})).await;
    assert_eq!(code, -32602, "port 0 is a schema violation");
    assert_eq!(call_ok(&bob, "port_forward_list", json!({})).await["forwards"], json!([]));

    // What is in force, as network_inspect and vm_list show it.
    let inspected = call_ok(&alice, "network_inspect", json!({"network": "dev"})).await;
    assert_eq!(inspected["network"]["vms"].as_array().unwrap().len(), 2, "{inspected}");
    assert!(!inspected["network"]["rules"].as_array().unwrap().is_empty(), "{inspected}");
    let listed = call_ok(&alice, "vm_list", json!({})).await;
    assert!(listed["vms"].as_array().unwrap().iter().all(|v| v["nic"]["network"] == "dev"), "{listed}");

    // A flushed table is repaired when the node starts again.
    sh(&["ip", "netns", "exec", &host.0, "nft", "flush", "ruleset"]);
    assert_eq!(
        vm_reads_until(&alice, "a1", ip2, 8081, "hi-8081").await,
        "hi-8081",
        "without the table nothing is filtered"
    );
    node.stop().await;
    node.start().await;
    until("the node to answer again", Duration::from_secs(30), async || {
        call_ok(&alice, "vm_inspect", json!({"vm": "a1"})).await["vm"]["stale"].is_null()
    })
    .await;
    assert!(ruleset(&host).contains("table inet moat"), "the table is back after the restart");
    assert_eq!(vm_reads(&alice, "a1", ip2, 8081).await, "", "the policy is back");
    assert_eq!(vm_reads_until(&alice, "a1", ip2, 8080, "hi-8080").await, "hi-8080", "and the allowed port with it");

    // A gateway that starts again sends each node its networks as the database has them (a change
    // stored just before a crash is not left half-made): here, it repairs a flushed table.
    sh(&["ip", "netns", "exec", &host.0, "nft", "flush", "ruleset"]);
    for client in [admin, alice, bob] {
        client.cancel().await.unwrap();
    }
    assert!(moat.terminate().await.success());
    let moat = home.http_server(&[]).await;
    until("the restarted gateway to send n1 its networks", Duration::from_secs(30), async || {
        ruleset(&host).contains("table inet moat")
    })
    .await;
    let admin = moat.client(&moat.key).await;
    let alice = moat.client(&alice_key).await;
    assert_eq!(vm_reads(&alice, "a1", ip2, 8081).await, "", "the policy is back");

    // Removal leaves nothing: no tap, no forward, no bridge, no table.
    let err = tool_error(&admin, "network_delete", json!({"network": "dev"})).await;
    assert!(err.contains("has VMs on it"), "{err}");
    let err = tool_error(&alice, "security_group_delete", json!({"group": "web"})).await;
    assert!(err.contains("applies to VMs"), "{err}");
    call_ok(&alice, "vm_delete", json!({"vm": "a1"})).await;
    call_ok(&alice, "vm_delete", json!({"vm": "a2"})).await;
    assert!(taps(&host).is_empty(), "taps outlived their VMs: {:?}", taps(&host));
    assert!(!ruleset(&host).contains("9090"), "the forward outlived its VM");
    assert_eq!(call_ok(&alice, "port_forward_list", json!({})).await["forwards"], json!([]));
    call_ok(&admin, "network_delete", json!({"network": "dev"})).await;
    assert!(!sh(&["ip", "-n", &host.0, "-j", "link"]).contains(&bridge), "the bridge outlived its network");
    assert!(!ruleset(&host).contains("moat"), "{}", ruleset(&host));
    assert_eq!(call_ok(&alice, "security_group_list", json!({})).await["groups"], json!([]));
}

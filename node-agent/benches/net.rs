//! The network ruleset: time to render and apply `inet moat` for 10, 100 and 1,000 VMs with
//! rules, and TCP throughput and latency between two VM stand-ins through the table against the
//! same path with no table, in the same run. Everything runs inside network namespaces the bench
//! makes (as root); nothing touches the host's own.
//!
//!     cargo bench -p moat-node --bench net
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // a bench binary

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moat_node::net::apply::Applier;
use moat_node::net::model::{Forward, Group, Ingress, Mode, NetState, Network, Port, Ports, Proto, Source};
use moat_node::net::{names, render};
use moat_node::testing::Netns;

fn sh(argv: &[&str]) {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
    assert!(out.status.success(), "{}: {}", argv.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// `n` VMs on one /16 nat network, in two groups of three ingress rules each (one from the other
/// group), one port forward per ten VMs.
fn state(n: usize) -> NetState {
    let groups = ["sg-a", "sg-b"].map(|id| Group {
        id: id.into(),
        name: id.into(),
        ingress: vec![
            Ingress {
                proto: Proto::Tcp,
                ports: Some(Ports { from: 22, to: 22 }),
                source: Source::Cidr("10.0.0.0/8".parse().unwrap()),
            },
            Ingress {
                proto: Proto::Tcp,
                ports: Some(Ports { from: 8000, to: 8100 }),
                source: Source::Group("sg-a".into()),
            },
            Ingress {
                proto: Proto::Udp,
                ports: Some(Ports { from: 53, to: 53 }),
                source: Source::Cidr("10.1.0.0/16".parse().unwrap()),
            },
        ],
        egress: None,
    });
    let ports = (0..n)
        .map(|i| Port {
            vm: format!("vm-{i}"),
            network: "net-1".into(),
            ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 2)) + i as u32),
            mac: format!("02:6d:00:00:{:02x}:{:02x}", i / 256, i % 256),
            groups: vec![if i % 2 == 0 { "sg-a" } else { "sg-b" }.into()],
        })
        .collect();
    let forwards = (0..n / 10)
        .map(|i| Forward { proto: Proto::Tcp, host_port: 20000 + i as u16, vm: format!("vm-{}", i * 10), vm_port: 22 })
        .collect();
    NetState {
        networks: vec![Network {
            id: "net-1".into(),
            name: "bench".into(),
            cidr: "10.1.0.0/16".parse().unwrap(),
            mode: Mode::Nat { uplink: "lo".into() },
        }],
        ports,
        groups: groups.to_vec(),
        forwards,
    }
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

/// Python run in namespace `ns` printing one line.
fn python(ns: &str, code: &str, args: &[&str]) -> String {
    let out = Command::new("ip").args(["netns", "exec", ns, "python3", "-c", code]).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

const SINK: &str = "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 5001)); s.listen(4)\nwhile True:\n c,_=s.accept()\n while True:\n  d=c.recv(1<<20)\n  if not d: break\n  if len(d)==1: c.sendall(d)\n c.close()";
const THROUGHPUT: &str = "import socket,sys,time\nc=socket.create_connection((sys.argv[1],5001)); buf=b'x'*(1<<20); t=time.time()\nfor _ in range(512): c.sendall(buf)\nc.shutdown(socket.SHUT_WR); c.recv(1); print(512*8/(time.time()-t))";
const LATENCY: &str = "import socket,sys,time\nc=socket.create_connection((sys.argv[1],5001)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); ts=[]\nfor _ in range(2000):\n t=time.perf_counter(); c.sendall(b'x'); c.recv(1); ts.append(time.perf_counter()-t)\nts.sort(); print(ts[len(ts)//2]*1e6, ts[int(len(ts)*0.99)]*1e6)";

#[tokio::main]
async fn main() {
    let tag = std::process::id() % 100_000;
    let scratch = tempfile::tempdir().unwrap();
    println!("net bench: render and apply `inet moat` (median of 5), inside namespaces");
    for n in [10, 100, 1000] {
        let ns = Netns::new(format!("moat-bn{tag}"));
        let applier = Applier::in_namespace(&ns.0, scratch.path().to_path_buf());
        let s = state(n);
        s.validate().unwrap();
        let (mut rendered, mut applied) = (Vec::new(), Vec::new());
        let mut bytes = 0;
        for _ in 0..5 {
            let t = Instant::now();
            let text = render::print(&render::table(&s));
            rendered.push(t.elapsed());
            bytes = text.len();
            let t = Instant::now();
            applier.ruleset(&s).await.unwrap();
            applied.push(t.elapsed());
        }
        println!(
            "  {n:5} VMs: render {:7.2} ms, apply (write + nft -f, replacing the table) {:7.1} ms, {} KiB of rules",
            median(rendered),
            median(applied),
            bytes / 1024
        );
    }

    // Two VM stand-ins on one network, through the table, then with no table on the same path.
    let host = Netns::new(format!("moat-bh{tag}"));
    let (a, b) = (Netns::new(format!("moat-ba{tag}")), Netns::new(format!("moat-bb{tag}")));
    for (i, (ns, vm, ip)) in [(&a, "vm-a", "10.7.0.2/24"), (&b, "vm-b", "10.7.0.3/24")].into_iter().enumerate() {
        let tap = names::tap(vm);
        let mac = format!("02:6d:00:00:07:{:02x}", i + 2);
        let peer = ["peer", "name", "eth0", "address", &mac, "netns", &ns.0];
        sh(&[&["ip", "-n", &host.0, "link", "add", &tap, "type", "veth"][..], &peer[..]].concat());
        sh(&["ip", "-n", &ns.0, "addr", "add", ip, "dev", "eth0"]);
        sh(&["ip", "-n", &ns.0, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &ns.0, "route", "add", "default", "via", "10.7.0.1"]);
    }
    let state = NetState {
        networks: vec![Network {
            id: "net-p".into(),
            name: "path".into(),
            cidr: "10.7.0.0/24".parse().unwrap(),
            mode: Mode::Isolated,
        }],
        ports: ["vm-a", "vm-b"]
            .iter()
            .enumerate()
            .map(|(i, vm)| Port {
                vm: vm.to_string(),
                network: "net-p".into(),
                ip: Ipv4Addr::new(10, 7, 0, 2 + i as u8),
                mac: format!("02:6d:00:00:07:{:02x}", i + 2),
                groups: vec!["sg".into()],
            })
            .collect(),
        groups: vec![Group {
            id: "sg".into(),
            name: "sink".into(),
            ingress: vec![Ingress {
                proto: Proto::Tcp,
                ports: Some(Ports { from: 5001, to: 5001 }),
                source: Source::Cidr("10.7.0.0/24".parse().unwrap()),
            }],
            egress: None,
        }],
        forwards: Vec::new(),
    };
    let applier = Applier::in_namespace(&host.0, scratch.path().to_path_buf());
    applier.apply(&state).await.unwrap();
    for vm in ["vm-a", "vm-b"] {
        applier.attach(&state, vm).await.unwrap();
    }
    let mut sink =
        Command::new("ip").args(["netns", "exec", &b.0, "python3", "-c", SINK]).stdout(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let measure = |label: &str| {
        let gbit: f64 = python(&a.0, THROUGHPUT, &["10.7.0.3"]).parse::<f64>().unwrap() / 1000.0;
        let lat = python(&a.0, LATENCY, &["10.7.0.3"]);
        let (p50, p99) = lat.split_once(' ').unwrap();
        let (p50, p99): (f64, f64) = (p50.parse().unwrap(), p99.parse().unwrap());
        println!("  {label:28} {gbit:6.2} Gbit/s, round trip p50 {p50:6.1} µs, p99 {p99:6.1} µs");
    };
    println!("\nTCP between two VM stand-ins (veth, bridge with isolated ports, proxy ARP), python3 sockets:");
    measure("through the moat table");
    sh(&["ip", "netns", "exec", &host.0, "nft", "flush", "ruleset"]);
    measure("same path, no table");
    let _ = sink.kill();
    let _ = sink.wait();
}

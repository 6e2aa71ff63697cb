//! Gateway → node: the gRPC round trip over mutual TLS (the production path)
//! against plain TCP on loopback and the embedded node's Unix socket, in one
//! run; then `vm_create` → running (CreateVm with start over mTLS: QEMU
//! launched, QMP answering with the guest executing) and → guest ready (the
//! image's init on the console).
//!
//!     cargo bench -p moat-gateway --bench node
//!
//! MOAT_BENCH_N (round trips per transport, default 5000), MOAT_BENCH_VMS (VMs
//! created, default 5), MOAT_GUEST_IMAGE (default target/ci/guest-image).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench binary

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moat_gateway::nodes::client::NewVm;
use moat_gateway::nodes::connector::NodeConnector;
use moat_gateway::nodes::pki::Pki;
use moat_node::server::{ListenAddr, Listener};
use moat_node::tls::ServerTls;
use moat_node::vm::{Accel, VmManager};
use moat_tools::VmState;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn serve(listener: Listener, root: &Path, images: PathBuf) -> String {
    let address = listener.local_addr();
    let vms = VmManager::for_host(
        "bench",
        root,
        images,
        "qemu-system-x86_64",
        Some(Accel::Tcg),
        "vhost-device-vsock",
        moat_node::vmm::confine::DEFAULT_UID_BASE,
    )
    .unwrap();
    let api = moat_node::NodeApi::new("bench", root, vms);
    tokio::spawn(moat_node::serve(listener, api, std::future::pending()));
    match address {
        ListenAddr::Tcp(a) => a.to_string(),
        ListenAddr::Unix(p) => format!("unix:{}", p.display()),
    }
}

#[tokio::main]
async fn main() {
    let n = env_usize("MOAT_BENCH_N", 5000);
    let vms = env_usize("MOAT_BENCH_VMS", 5);
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::at(tmp.path());
    pki.init().unwrap();
    let certs = tmp.path().join("certs");
    pki.issue_node("bench").unwrap().write(&certs).unwrap();
    let image = std::env::var_os("MOAT_GUEST_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ci/guest-image"));
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::os::unix::fs::symlink(image.canonicalize().expect("a guest image (moat image build)"), images.join("base"))
        .unwrap();

    let tls = ServerTls::load(&certs).unwrap();
    let mtls = serve(
        Listener::bind_tls("127.0.0.1:0".parse().unwrap(), tls).await.unwrap(),
        &tmp.path().join("a"),
        images.clone(),
    )
    .await;
    let plain =
        serve(Listener::bind(&"127.0.0.1:0".parse().unwrap()).await.unwrap(), &tmp.path().join("b"), images.clone())
            .await;
    let socket = tmp.path().join("node.sock");
    let unix = serve(Listener::bind(&ListenAddr::Unix(socket)).await.unwrap(), &tmp.path().join("c"), images).await;

    let connector = NodeConnector::new(pki, None);
    println!("gRPC round trip (ListVms, empty node), {n} sequential calls each after 200 warm-up:\n");
    println!("| transport | p50 µs | p99 µs | calls/s |");
    println!("|---|---|---|---|");
    for (label, address) in [
        ("mTLS over TCP (remote nodes)", format!("https://{mtls}")),
        ("plain TCP, loopback (--insecure-loopback)", format!("http://{plain}")),
        ("Unix socket (embedded node)", unix),
    ] {
        let client = connector.node("bench", &address).unwrap();
        for _ in 0..200 {
            client.list_vms().await.unwrap();
        }
        let mut times = Vec::with_capacity(n);
        let started = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            client.list_vms().await.unwrap();
            times.push(t.elapsed());
        }
        let total = started.elapsed();
        times.sort();
        println!(
            "| {label} | {:.0} | {:.0} | {:.0} |",
            us(percentile(&times, 0.5)),
            us(percentile(&times, 0.99)),
            n as f64 / total.as_secs_f64()
        );
    }

    println!(
        "\nvm_create → running and → guest ready, over mTLS, QEMU TCG, 1 vCPU, 256 MiB, {vms} VMs one after another:\n"
    );
    let client = connector.node("bench", &format!("https://{mtls}")).unwrap();
    let (mut running, mut ready) = (Vec::new(), Vec::new());
    for i in 0..vms {
        let id = format!("vm-bench{i}");
        let new = NewVm {
            id: id.clone(),
            name: format!("b{i}"),
            vcpus: 1,
            memory_mib: 256,
            image: "base".into(),
            root_workspace: None,
            disks: Vec::new(),
            nic: None,
        };
        let started = Instant::now();
        let vm = client.create_vm(&new, true, Duration::from_secs(90)).await.unwrap();
        assert_eq!(vm.state, VmState::Running);
        running.push(started.elapsed());
        loop {
            let (text, _) = client.vm_logs(&id, 4096).await.unwrap();
            if text.contains("moat-init: ready") {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(120), "guest never became ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ready.push(started.elapsed());
        client.delete_vm(&id, Duration::from_secs(30)).await.unwrap();
    }
    running.sort();
    ready.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("| measure | min ms | p50 ms | max ms |");
    println!("|---|---|---|---|");
    for (label, t) in
        [("vm_create → running (QMP: guest executing)", &running), ("vm_create → guest ready (console)", &ready)]
    {
        println!("| {label} | {:.0} | {:.0} | {:.0} |", ms(t[0]), ms(percentile(t, 0.5)), ms(t[t.len() - 1]));
    }
}

//! `moat-node`: serves the node agent's gRPC API on this host.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use moat_node::server::{ListenAddr, Listener};

#[derive(Parser)]
#[command(name = "moat-node", version, about = "moat's node agent: serves NodeService over gRPC on this host")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the node API until SIGINT/SIGTERM.
    Serve {
        /// HOST:PORT for TCP (port 0 picks a free one) or unix:PATH.
        #[arg(long, env = "MOAT_NODE_LISTEN", default_value = "127.0.0.1:7443")]
        listen: ListenAddr,
        /// The node's name as the gateway knows it (DNS label).
        #[arg(long, env = "MOAT_NODE_NAME", default_value = "local")]
        name: String,
        /// Directory for VM and workspace data; its filesystem decides how workspaces are made.
        #[arg(long, env = "MOAT_NODE_STORAGE_ROOT", default_value = "/var/lib/moat-node")]
        storage_root: PathBuf,
        /// Directory with node.pem, node.key and client-ca.pem from `moat node enroll`: serve
        /// gRPC over mutual TLS. Re-read on SIGHUP, so a renewed certificate needs no restart.
        #[arg(long, env = "MOAT_NODE_CERTS")]
        certs: Option<PathBuf>,
        /// Serve plain-text gRPC on a loopback address without --certs. Development only: anyone
        /// on this host can then drive the node.
        #[arg(long, env = "MOAT_NODE_INSECURE_LOOPBACK")]
        insecure_loopback: bool,
        #[command(flatten)]
        vm: VmArgs,
        #[command(flatten)]
        disk: DiskArgs,
    },
}

/// How moat may change this host's disks (DiskLayout resources).
#[derive(clap::Args)]
struct DiskArgs {
    /// installer-only: layouts are planned, never applied (the host's disks were laid out when
    /// it was installed); controller-managed: moat applies layouts its classifier approves.
    #[arg(long, env = "MOAT_NODE_DISK_MANAGEMENT", default_value = "installer-only",
          value_parser = ["installer-only", "controller-managed"])]
    disk_management: String,
    /// direct: sfdisk and mkfs on the disks; disko: write the layout as a disko expression to
    /// --disko-path (NixOS hosts) and run --disko-rebuild.
    #[arg(long, env = "MOAT_NODE_DISK_APPLIER", default_value = "direct", value_parser = ["direct", "disko"])]
    disk_applier: String,
    /// Where the disko applier writes the layout (replaced atomically).
    #[arg(long, env = "MOAT_NODE_DISKO_PATH", default_value = "/etc/moat/disk/current.nix")]
    disko_path: PathBuf,
    /// A command run after the disko file is written, split on spaces, no shell (e.g.
    /// "nixos-rebuild switch"). Default: none.
    #[arg(long, env = "MOAT_NODE_DISKO_REBUILD")]
    disko_rebuild: Option<String>,
}

/// Where VMs live and what runs them.
#[derive(clap::Args)]
struct VmArgs {
    /// Guest images, one directory per image (IMAGES/base/vmlinux, initramfs.cpio.gz).
    /// Default: STORAGE_ROOT/images.
    #[arg(long, env = "MOAT_NODE_IMAGES")]
    images: Option<PathBuf>,
    /// Disk images and workspaces. On btrfs, workspaces are snapshots made in constant time
    /// whatever their size (needs root); elsewhere reflink or full copies (node_inspect says
    /// which). Default: STORAGE_ROOT/storage.
    #[arg(long, env = "MOAT_NODE_STORAGE")]
    storage: Option<PathBuf>,
    /// The QEMU binary: a path, or a name looked up in PATH.
    #[arg(long, env = "MOAT_NODE_QEMU", default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Acceleration: auto uses KVM when it can create a VM here, TCG otherwise.
    #[arg(long, env = "MOAT_NODE_ACCEL", default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    accel: String,
    /// The vsock device daemon (rust-vmm's vhost-device-vsock) that lets the host reach guest
    /// agents: a path, or a name looked up in PATH. Not needed where /dev/vhost-vsock exists (the
    /// kernel's vsock is used); without either, VMs run but their agents cannot be reached.
    #[arg(long, env = "MOAT_NODE_VHOST_VSOCK", default_value = "vhost-device-vsock")]
    vhost_vsock: String,
    /// VMs' processes run as uids from this one on (one per running VM, taken host-wide) when
    /// moat-node runs as root; pick a range no other user or container on the host uses.
    #[arg(long, env = "MOAT_NODE_VM_UID_BASE", default_value_t = moat_node::vmm::confine::DEFAULT_UID_BASE)]
    vm_uid_base: u32,
    /// Keep moat's networks (bridges, VMs' taps, the `inet moat` nftables table) inside this
    /// named network namespace (`ip netns add NAME`) instead of the host's own. Default: the
    /// host's. Their state is kept in STORAGE_ROOT/net and re-applied at every start.
    #[arg(long, env = "MOAT_NODE_NETNS")]
    netns: Option<String>,
}

impl VmArgs {
    fn manager(&self, name: &str, storage_root: &std::path::Path) -> anyhow::Result<moat_node::vm::VmManager> {
        let forced = match self.accel.as_str() {
            "kvm" => Some(moat_node::vm::Accel::Kvm),
            "tcg" => Some(moat_node::vm::Accel::Tcg),
            _ => None,
        };
        let images = self.images.clone().unwrap_or_else(|| storage_root.join("images"));
        let vms = moat_node::vm::VmManager::for_host(
            name,
            storage_root,
            images,
            &self.qemu,
            forced,
            &self.vhost_vsock,
            self.vm_uid_base,
        )
        .with_context(|| format!("cannot open the VM directory {}", storage_root.join("vms").display()))?;
        let dir = self.storage.clone().unwrap_or_else(|| storage_root.join("storage"));
        let storage = moat_node::storage::Storage::open(&dir)
            .with_context(|| format!("cannot open the image and workspace storage {}", dir.display()))?;
        let net = storage_root.join("net");
        let networks = moat_node::net::host::Networks::open(&net, self.netns.clone())
            .with_context(|| format!("cannot open the network state in {}", net.display()))?;
        Ok(vms.with_storage(storage).with_networks(networks))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MOAT_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    match Cli::parse().command {
        Command::Serve { listen, name, storage_root, certs, insecure_loopback, vm, disk } => {
            std::fs::create_dir_all(&storage_root)
                .with_context(|| format!("cannot create storage root {}", storage_root.display()))?;
            // VMs first: re-adopt what still runs before taking calls about it.
            let vms = vm.manager(&name, &storage_root)?;
            // Then the networks, as they were last given: a reboot or a flushed table is repaired.
            if let Some(networks) = vms.networks() {
                networks.reconcile().await;
            }
            let listener = match (&listen, certs) {
                (ListenAddr::Tcp(addr), Some(dir)) => {
                    let tls = moat_node::tls::ServerTls::load(&dir)
                        .with_context(|| format!("cannot load the node certificate from {}", dir.display()))?;
                    tokio::spawn(reload_on_sighup(tls.clone()));
                    Listener::bind_tls(*addr, tls).await?
                }
                (ListenAddr::Tcp(addr), None) if !(insecure_loopback && addr.ip().is_loopback()) => {
                    anyhow::bail!(
                        "refusing to serve gRPC over plain TCP on {addr}: pass --certs DIR (from `moat node \
                         enroll {name} --out DIR` on the gateway host), or for development on this host only, \
                         --insecure-loopback with a loopback address"
                    );
                }
                (ListenAddr::Unix(_), Some(_)) => {
                    anyhow::bail!("--certs is for TCP; a unix: socket is guarded by its file permissions")
                }
                _ => Listener::bind(&listen).await?,
            };
            // Tests and scripts read this line to learn the port when --listen used port 0.
            tracing::info!(node = %name, listen = %listener.local_addr(), "moat-node listening");
            let disks = moat_node::disk::DiskSettings::configure(
                &storage_root,
                Some(&disk.disk_management),
                Some(&disk.disk_applier),
                Some(disk.disko_path.clone()),
                disk.disko_rebuild.as_deref(),
            )
            .map_err(anyhow::Error::msg)?;
            let api = moat_node::NodeApi::new(name, storage_root, vms).with_disks(disks);
            // A signal stops new calls; open streams (guest sessions the gateway keeps, exec
            // output) get a short grace to end, then the node stops anyway: VMs keep running and
            // the next start re-adopts them.
            let stop = tokio_util::sync::CancellationToken::new();
            let signalled = stop.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                signalled.cancel();
            });
            tokio::select! {
                served = moat_node::serve(listener, api, stop.clone().cancelled_owned()) => served?,
                () = async {
                    stop.cancelled().await;
                    tokio::time::sleep(SHUTDOWN_GRACE).await;
                } => tracing::warn!("streams still open {SHUTDOWN_GRACE:?} after the stop signal; stopping anyway"),
            }
            tracing::info!("moat-node stopped");
            Ok(())
        }
    }
}

/// How long open streams may take to end once moat-node is told to stop.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

async fn reload_on_sighup(tls: moat_node::tls::ServerTls) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
    while hup.recv().await.is_some() {
        match tls.reload() {
            Ok(()) => tracing::info!("reloaded the node certificate"),
            Err(e) => tracing::error!(error = %e, "cannot reload the node certificate; keeping the old one"),
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler works in main");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

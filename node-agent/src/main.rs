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
        #[command(flatten)]
        vm: VmArgs,
    },
}

/// Where VMs live and what runs them.
#[derive(clap::Args)]
struct VmArgs {
    /// Guest images, one directory per image (IMAGES/base/vmlinux, initramfs.cpio.gz).
    /// Default: STORAGE_ROOT/images.
    #[arg(long, env = "MOAT_NODE_IMAGES")]
    images: Option<PathBuf>,
    /// The QEMU binary: a path, or a name looked up in PATH.
    #[arg(long, env = "MOAT_NODE_QEMU", default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Acceleration: auto uses KVM when it can create a VM here, TCG otherwise.
    #[arg(long, env = "MOAT_NODE_ACCEL", default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    accel: String,
}

impl VmArgs {
    fn manager(&self, name: &str, storage_root: &std::path::Path) -> anyhow::Result<moat_node::vm::VmManager> {
        let forced = match self.accel.as_str() {
            "kvm" => Some(moat_node::vm::Accel::Kvm),
            "tcg" => Some(moat_node::vm::Accel::Tcg),
            _ => None,
        };
        let images = self.images.clone().unwrap_or_else(|| storage_root.join("images"));
        moat_node::vm::VmManager::for_host(name, storage_root, images, &self.qemu, forced)
            .with_context(|| format!("cannot open the VM directory {}", storage_root.join("vms").display()))
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
        Command::Serve { listen, name, storage_root, vm } => {
            std::fs::create_dir_all(&storage_root)
                .with_context(|| format!("cannot create storage root {}", storage_root.display()))?;
            let listener = Listener::bind(&listen).await?;
            // Tests and scripts read this line to learn the port when --listen used port 0.
            tracing::info!(node = %name, listen = %listener.local_addr(), "moat-node listening");
            let vms = vm.manager(&name, &storage_root)?;
            let api = moat_node::NodeApi::new(name, storage_root, vms);
            moat_node::serve(listener, api, shutdown_signal()).await?;
            tracing::info!("moat-node stopped");
            Ok(())
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

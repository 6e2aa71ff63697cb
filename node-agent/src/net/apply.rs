//! Making the host match a [`NetState`]: bridges with their gateway addresses, forwarding and
//! proxy ARP for isolated ports, and the whole `inet moat` table in one `nft -f` transaction.
//! Idempotent: applying the same state twice changes nothing; what moat made and the state no
//! longer has (an `mb*` bridge) is removed. Every change runs through the node's command runner,
//! behind an optional prefix (`ip netns exec NS`) so tests act only inside namespaces they made.

use std::path::PathBuf;
use std::time::Duration;

use super::model::{Mode, NetState};
use super::{names, render};

const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("`nft` is not installed on this host: install nftables (apt-get install nftables)")]
    NoNft,
    #[error(transparent)]
    Invalid(#[from] super::model::Invalid),
    #[error("{argv} failed: {detail}")]
    Command { argv: String, detail: String },
    #[error("network {network}: its {what} `{dev}` does not exist on this node; create it first or name another")]
    Missing { network: String, what: &'static str, dev: String },
}

/// Applies states to the host (or to the namespace its prefix enters).
#[derive(Debug, Clone, Default)]
pub struct Applier {
    prefix: Vec<String>,
    /// Where the ruleset file is written before `nft -f` reads it.
    scratch: PathBuf,
}

impl Applier {
    /// Acting on this host's own network namespace.
    pub fn host(scratch: PathBuf) -> Applier {
        Applier { prefix: Vec::new(), scratch }
    }

    /// Acting inside network namespace `ns` (tests).
    pub fn in_namespace(ns: &str, scratch: PathBuf) -> Applier {
        Applier { prefix: vec!["ip".into(), "netns".into(), "exec".into(), ns.into()], scratch }
    }

    async fn run(&self, args: &[&str], ok_if: &[&str]) -> Result<String, ApplyError> {
        let argv: Vec<String> = self.prefix.iter().cloned().chain(args.iter().map(|s| s.to_string())).collect();
        let shown = args.join(" ");
        let out = crate::cmd::run(&argv, TIMEOUT).await.map_err(|e| {
            if args.first() == Some(&"nft") && matches!(e, crate::cmd::CmdError::Spawn { .. }) {
                ApplyError::NoNft
            } else {
                ApplyError::Command { argv: shown.clone(), detail: crate::errors::chain(&e) }
            }
        })?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if !out.status.success() && !ok_if.iter().any(|s| stderr.contains(s)) {
            if args.first() == Some(&"nft") && stderr.contains("No such file or directory") && stderr.contains("nft") {
                return Err(ApplyError::NoNft);
            }
            return Err(ApplyError::Command { argv: shown, detail: stderr });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Makes bridges, addresses, forwarding and the ruleset match `state`, in four programs at
    /// most (a link listing, `nft -f`, one `ip -batch`, one `sysctl`): each start of a program
    /// costs milliseconds, and every change of a network, group or forward comes through here.
    pub async fn apply(&self, state: &NetState) -> Result<(), ApplyError> {
        state.validate()?;
        let links = self.links().await?;
        // Interfaces the operator names must exist (a rule naming a missing one never matches).
        for net in &state.networks {
            let (dev, what, bridge) = match &net.mode {
                Mode::Nat { uplink } if !uplink.is_empty() => (uplink, "uplink", false),
                Mode::Bridged { bridge } => (bridge, "bridge", true),
                _ => continue,
            };
            if !links.iter().any(|(name, kind)| name == dev && (!bridge || kind == "bridge")) {
                return Err(ApplyError::Missing { network: net.name.clone(), what, dev: dev.clone() });
            }
        }
        // The ruleset first: without nft nothing else is touched (interface names in it are only
        // strings, so bridges made below are matched from the moment they exist).
        self.ruleset(state).await?;
        let mut batch = String::new();
        let mut sysctls = Vec::new();
        if !state.networks.is_empty() {
            sysctls.push("net.ipv4.ip_forward=1".to_string());
        }
        for net in &state.networks {
            let bridge = render::bridge_of(net);
            if !matches!(net.mode, Mode::Bridged { .. }) {
                if !links.iter().any(|(name, _)| *name == bridge) {
                    batch.push_str(&format!("link add name {bridge} type bridge\n"));
                }
                let gateway = net.cidr.gateway().expect("validated: /29 or larger");
                batch.push_str(&format!("addr replace {gateway}/{} dev {bridge}\n", net.cidr.prefix()));
                batch.push_str(&format!("link set {bridge} up\n"));
            }
            // VMs' ports are isolated from each other: their traffic goes through the host (and
            // the ruleset), which answers ARP for the other VMs.
            sysctls.push(format!("net.ipv4.conf.{bridge}.proxy_arp_pvlan=1"));
            sysctls.push(format!("net.ipv4.conf.{bridge}.proxy_arp=1"));
        }
        // Bridges moat made that the state no longer has.
        let wanted: Vec<String> = state.networks.iter().map(render::bridge_of).collect();
        for (name, kind) in &links {
            if kind == "bridge" && names::is_bridge(name) && !wanted.contains(name) {
                batch.push_str(&format!("link del {name}\n"));
            }
        }
        if !batch.is_empty() {
            let file = self.scratch_file("ip", &batch)?;
            let done = self.run(&["ip", "-batch", &file.display().to_string()], &[]).await;
            let _ = std::fs::remove_file(&file);
            done?;
        }
        if !sysctls.is_empty() {
            let mut argv = vec!["sysctl", "-qw"];
            argv.extend(sysctls.iter().map(String::as_str));
            self.run(&argv, &[]).await?;
        }
        Ok(())
    }

    /// Writes `text` to a file of this process in the scratch directory.
    fn scratch_file(&self, what: &str, text: &str) -> Result<PathBuf, ApplyError> {
        std::fs::create_dir_all(&self.scratch)
            .map_err(|e| ApplyError::Command { argv: "mkdir".into(), detail: e.to_string() })?;
        let file = self.scratch.join(format!("moat-{}.{what}", std::process::id()));
        std::fs::write(&file, text).map_err(|e| ApplyError::Command { argv: "write".into(), detail: e.to_string() })?;
        Ok(file)
    }

    /// Every link (name and kind, "" for a plain device), in one listing.
    async fn links(&self) -> Result<Vec<(String, String)>, ApplyError> {
        let out = self.run(&["ip", "-j", "-d", "link", "show"], &[]).await?;
        let links: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        Ok(links
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| {
                let kind = l["linkinfo"]["info_kind"].as_str().unwrap_or_default().to_string();
                Some((l["ifname"].as_str()?.to_string(), kind))
            })
            .collect())
    }

    /// Replaces the `inet moat` table whole (or removes it when there are no networks).
    pub async fn ruleset(&self, state: &NetState) -> Result<(), ApplyError> {
        let text =
            if state.networks.is_empty() { render::REMOVE.to_string() } else { render::print(&render::table(state)) };
        let file = self.scratch_file("nft", &text)?;
        let applied = self.run(&["nft", "-f", &file.display().to_string()], &[]).await;
        let _ = std::fs::remove_file(&file);
        applied.map(drop)
    }

    /// Attaches VM `vm`'s tap (already made) to its network's bridge as an isolated port.
    pub async fn attach(&self, state: &NetState, vm: &str) -> Result<(), ApplyError> {
        let Some(port) = state.ports.iter().find(|p| p.vm == vm) else { return Ok(()) };
        let Some(net) = state.networks.iter().find(|n| n.id == port.network) else { return Ok(()) };
        let tap = names::tap(vm);
        self.run(&["ip", "link", "set", &tap, "master", &render::bridge_of(net)], &[]).await?;
        self.run(&["bridge", "link", "set", "dev", &tap, "isolated", "on"], &[]).await?;
        self.run(&["ip", "link", "set", &tap, "up"], &[]).await?;
        Ok(())
    }

    /// `nft list table inet moat`, or "" when there is no such table.
    pub async fn list_table(&self) -> Result<String, ApplyError> {
        self.run(&["nft", "list", "table", "inet", "moat"], &["No such file or directory"]).await
    }
}

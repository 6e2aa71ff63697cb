//! Gateway configuration: defaults, then `$XDG_CONFIG_HOME/moat/moat.toml`,
//! then `MOAT_*` environment variables, then command-line flags (clap reads
//! env and flags together, so both arrive here as [`Overrides`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::principal::Role;

/// Room for vm_file_write's largest content (32 MiB, about 43 MiB in base64) and framing.
pub const DEFAULT_MAX_BODY_BYTES: usize = 48 * 1024 * 1024;

/// What a committed write survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The gateway process crashing or being killed (default).
    Process,
    /// The machine losing power: every commit is fsynced (slower).
    Power,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "process" => Ok(Durability::Process),
            "power" => Ok(Durability::Power),
            _ => Err(format!("durability `{s}`: use process (survives crashes) or power (fsync every commit)")),
        }
    }
}

/// Where policies come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// The files in `policies/`, compiled into the binary.
    Embedded,
    /// `moat.cedarschema`, `moat.cedar` and `limits.toml` in a directory.
    Dir(PathBuf),
}

impl std::fmt::Display for PolicySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicySource::Embedded => f.write_str("built-in policies"),
            PolicySource::Dir(d) => write!(f, "{}", d.display()),
        }
    }
}

/// What one principal of a role may hold at once.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    pub running_vms: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub workspaces: u32,
    /// Total GiB of one's workspaces; limits files written before workspaces had sizes get 1024.
    #[serde(default = "default_workspace_gib")]
    pub workspace_gib: u64,
}

fn default_workspace_gib() -> u64 {
    1024
}

/// The settled configuration a gateway runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the file came from, if one was read.
    pub config_path: PathBuf,
    pub config_file_found: bool,
    pub state_dir: PathBuf,
    pub http: Option<SocketAddr>,
    /// Serve stdio too when `--http` is given (stdio alone is the default).
    pub stdio_with_http: bool,
    /// `Host` header values HTTP accepts (DNS-rebinding protection).
    pub allowed_hosts: Vec<String>,
    pub max_body_bytes: usize,
    pub operator: String,
    pub operator_role: Role,
    /// Extra prompt files loaded on top of the built-in ones; a file with the same name wins.
    pub prompts_dir: Option<PathBuf>,
    pub node_name: String,
    pub node_storage_root: PathBuf,
    /// The embedded node's disk images and workspaces (btrfs for constant-time workspaces).
    pub node_storage: PathBuf,
    /// The network namespace the embedded node keeps its networks in (None: the host's own).
    pub node_netns: Option<String>,
    /// How the embedded node treats DiskLayouts (installer-only unless configured).
    pub node_disks: moat_node::disk::DiskSettings,
    /// Cedar schema, policies and limits; the built-in set unless a directory is configured.
    pub policies: PolicySource,
    pub durability: Durability,
    /// The pipeline bench's comparison server only (feature `bench-no-pipeline`, set by code,
    /// never by a flag): skip authentication, authorization, rate limits and audit.
    #[cfg(feature = "bench-no-pipeline")]
    pub insecure_no_pipeline: bool,
    /// Role of HTTP requests without a bearer key; None (the default) answers them 401.
    pub anonymous_role: Option<Role>,
    /// How often the gateway asks each node for its facts and VM states; three misses in a
    /// row mark the node unreachable.
    pub heartbeat: std::time::Duration,
    /// The key sealing audit checkpoints.
    pub audit_key: PathBuf,
    /// How often a checkpoint of the audit chain is written.
    pub audit_checkpoint: std::time::Duration,
    /// A second file each checkpoint is appended to.
    pub audit_checkpoint_copy: Option<PathBuf>,
    /// Authenticate stdio with this API key instead of as the operator (MOAT_API_KEY; never a flag).
    pub api_key: Option<String>,
}

impl Config {
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("moat.db")
    }

    /// Where audit checkpoints are appended.
    pub fn audit_checkpoints(&self) -> PathBuf {
        self.state_dir.join("audit-checkpoints.jsonl")
    }

    /// This process's embedded node socket. Per process, because several gateways (say, two
    /// stdio clients) may share one state directory and each runs its own embedded node.
    /// Guest images (`<images>/<name>/vmlinux`, `initramfs.cpio.gz`) for the embedded node;
    /// `moat image build` writes the default image, `base`, here.
    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }

    pub fn node_socket(&self) -> PathBuf {
        self.state_dir.join("run").join(format!("node-{}.sock", std::process::id()))
    }
}

/// What the TOML file may contain. Unknown keys are an error, so typos do not pass silently.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    state_dir: Option<PathBuf>,
    http: Option<SocketAddr>,
    stdio_with_http: Option<bool>,
    allowed_hosts: Option<Vec<String>>,
    max_body_bytes: Option<usize>,
    operator: Option<String>,
    operator_role: Option<String>,
    prompts_dir: Option<PathBuf>,
    policies_dir: Option<PathBuf>,
    durability: Option<String>,
    anonymous_role: Option<String>,
    heartbeat_ms: Option<u64>,
    node: Option<FileNode>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNode {
    name: Option<String>,
    storage_root: Option<PathBuf>,
    storage: Option<PathBuf>,
    netns: Option<String>,
    disk_management: Option<String>,
    disk_applier: Option<String>,
    disko_path: Option<PathBuf>,
    disko_rebuild: Option<String>,
}

/// Values given by flag or `MOAT_*` environment variable; each beats the file.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// Config file [default: $XDG_CONFIG_HOME/moat/moat.toml]
    #[arg(long, env = "MOAT_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// State directory holding moat.db and the embedded node's socket [default: $XDG_STATE_HOME/moat]
    #[arg(long, env = "MOAT_STATE_DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    /// Key that seals audit checkpoints; keep it (or a copy) off this machine's database disk
    /// [default: <state dir>/audit.key, made 0600 on first serve]
    #[arg(long, env = "MOAT_AUDIT_KEY", global = true)]
    pub audit_key: Option<PathBuf>,
    /// The embedded node's disk images and workspaces; on btrfs (and as root) workspaces are
    /// snapshots made in constant time [default: $XDG_DATA_HOME/moat/storage]
    #[arg(long, env = "MOAT_NODE_STORAGE", global = true)]
    pub node_storage: Option<PathBuf>,
}

/// Settings only `moat serve` takes.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeOverrides {
    /// Serve Streamable HTTP at http://ADDR/mcp instead of stdio (e.g. 127.0.0.1:8080; port 0 picks one)
    #[arg(long, env = "MOAT_HTTP")]
    pub http: Option<SocketAddr>,
    /// With --http, also serve stdio
    #[arg(long, env = "MOAT_STDIO_WITH_HTTP")]
    pub stdio: bool,
    /// Host header values HTTP accepts, comma-separated [default: localhost,127.0.0.1,::1]
    #[arg(long, env = "MOAT_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Option<Vec<String>>,
    /// Largest request body or stdio message accepted, in bytes [default: 50331648, room for a 32 MiB file]
    #[arg(long, env = "MOAT_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Principal name for stdio callers [default: operator]
    #[arg(long, env = "MOAT_OPERATOR")]
    pub operator: Option<String>,
    /// Role of the stdio principal: reader, agent, vm-admin or cluster-admin [default: cluster-admin]
    #[arg(long, env = "MOAT_OPERATOR_ROLE")]
    pub operator_role: Option<String>,
    /// Extra prompts directory (*.md with +++ TOML front matter)
    #[arg(long, env = "MOAT_PROMPTS_DIR")]
    pub prompts_dir: Option<PathBuf>,
    /// Name of the embedded node [default: local]
    #[arg(long, env = "MOAT_NODE_NAME")]
    pub node_name: Option<String>,
    /// Storage root of the embedded node [default: <state-dir>/node]
    #[arg(long, env = "MOAT_NODE_STORAGE_ROOT")]
    pub node_storage_root: Option<PathBuf>,
    /// Keep the embedded node's networks (bridges, taps, the `inet moat` nftables table) in
    /// this named network namespace (`ip netns add NAME`) [default: the host's own]
    #[arg(long, env = "MOAT_NODE_NETNS")]
    pub node_netns: Option<String>,
    /// Whether the embedded node applies DiskLayouts: installer-only (plan only) or
    /// controller-managed [default: installer-only]
    #[arg(long, env = "MOAT_NODE_DISK_MANAGEMENT")]
    pub node_disk_management: Option<String>,
    /// How the embedded node applies them: direct (sfdisk, mkfs) or disko [default: direct]
    #[arg(long, env = "MOAT_NODE_DISK_APPLIER")]
    pub node_disk_applier: Option<String>,
    /// Where the embedded node's disko applier writes [default: /etc/moat/disk/current.nix]
    #[arg(long, env = "MOAT_NODE_DISKO_PATH")]
    pub node_disko_path: Option<PathBuf>,
    /// Run after the disko file is written, split on spaces, no shell [default: none]
    #[arg(long, env = "MOAT_NODE_DISKO_REBUILD")]
    pub node_disko_rebuild: Option<String>,
    /// Directory with moat.cedarschema, moat.cedar and limits.toml [default: the built-in policies]
    #[arg(long, env = "MOAT_POLICIES_DIR")]
    pub policies_dir: Option<PathBuf>,
    /// What an acknowledged write survives: process (crashes, default) or power (fsync every commit)
    #[arg(long, env = "MOAT_DURABILITY")]
    pub durability: Option<String>,
    /// Let HTTP requests without a bearer key in as principal `anonymous` with this role [default: refuse them]
    #[arg(long, env = "MOAT_ANONYMOUS_ROLE")]
    pub anonymous_role: Option<String>,
    /// Milliseconds between node heartbeats (facts and VM states) [default: 5000]
    #[arg(long, env = "MOAT_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Milliseconds between audit checkpoints (also written at start and at shutdown) [default: 60000]
    #[arg(long, env = "MOAT_AUDIT_CHECKPOINT_MS")]
    pub audit_checkpoint_ms: Option<u64>,
    /// Also append each audit checkpoint to this file (on another disk, say)
    #[arg(long, env = "MOAT_AUDIT_CHECKPOINT_COPY")]
    pub audit_checkpoint_copy: Option<PathBuf>,
}

/// Resolves the configuration. `env` looks up XDG variables (injected for tests).
pub fn load(
    common: &Overrides,
    serve: &ServeOverrides,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Config> {
    let home = env("HOME").map(PathBuf::from);
    let xdg = |var: &str, fallback: &str| -> anyhow::Result<PathBuf> {
        match (env(var).filter(|v| !v.is_empty()), &home) {
            (Some(v), _) => Ok(PathBuf::from(v)),
            (None, Some(h)) => Ok(h.join(fallback)),
            (None, None) => bail!("neither {var} nor HOME is set: set MOAT_STATE_DIR and MOAT_CONFIG"),
        }
    };
    let config_path = match &common.config {
        Some(p) => p.clone(),
        None => xdg("XDG_CONFIG_HOME", ".config")?.join("moat").join("moat.toml"),
    };
    let (file, found) = read_file(&config_path, common.config.is_some())?;
    let state_dir = match common.state_dir.clone().or(file.state_dir) {
        Some(d) => d,
        None => xdg("XDG_STATE_HOME", ".local/state")?.join("moat"),
    };
    let operator_role = match (&serve.operator_role, file.operator_role) {
        (Some(r), _) => r.parse().map_err(anyhow::Error::msg).context("--operator-role / MOAT_OPERATOR_ROLE")?,
        (None, Some(r)) => r.parse().map_err(anyhow::Error::msg).context("operator_role in the config file")?,
        (None, None) => Role::ClusterAdmin,
    };
    let node = file.node.unwrap_or_default();
    let node_storage = match common.node_storage.clone().or(node.storage) {
        Some(d) => d,
        // Without XDG_DATA_HOME and HOME (a service with only a state directory), beside the state.
        None => xdg("XDG_DATA_HOME", ".local/share").map(|d| d.join("moat").join("storage")).unwrap_or_else(|_| {
            common.state_dir.clone().unwrap_or_else(|| PathBuf::from("/var/lib/moat")).join("storage")
        }),
    };
    let node_name = serve.node_name.clone().or(node.name).unwrap_or_else(|| "local".into());
    validate_node_name(&node_name)?;
    let node_storage_root =
        serve.node_storage_root.clone().or(node.storage_root).unwrap_or_else(|| state_dir.join("node"));
    let durability = match serve.durability.clone().or(file.durability) {
        Some(d) => d.parse().map_err(anyhow::Error::msg)?,
        None => Durability::Process,
    };
    let anonymous_role = match serve.anonymous_role.clone().or(file.anonymous_role) {
        Some(r) => Some(r.parse::<Role>().map_err(anyhow::Error::msg).context("anonymous_role")?),
        None => None,
    };
    let policies = match serve.policies_dir.clone().or(file.policies_dir) {
        Some(dir) => PolicySource::Dir(dir),
        None => PolicySource::Embedded,
    };
    let max_body_bytes = serve.max_body_bytes.or(file.max_body_bytes).unwrap_or(DEFAULT_MAX_BODY_BYTES);
    if max_body_bytes < 1024 {
        bail!("max_body_bytes is {max_body_bytes}; it must be at least 1024");
    }
    Ok(Config {
        config_path,
        config_file_found: found,
        http: serve.http.or(file.http),
        stdio_with_http: serve.stdio || file.stdio_with_http.unwrap_or(false),
        allowed_hosts: serve
            .allowed_hosts
            .clone()
            .or(file.allowed_hosts)
            .unwrap_or_else(|| vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]),
        max_body_bytes,
        operator: serve.operator.clone().or(file.operator).unwrap_or_else(|| "operator".into()),
        operator_role,
        prompts_dir: serve.prompts_dir.clone().or(file.prompts_dir),
        node_name,
        node_storage_root: node_storage_root.clone(),
        node_storage,
        node_netns: serve.node_netns.clone().or(node.netns),
        node_disks: moat_node::disk::DiskSettings::configure(
            &node_storage_root,
            serve.node_disk_management.as_deref().or(node.disk_management.as_deref()),
            serve.node_disk_applier.as_deref().or(node.disk_applier.as_deref()),
            serve.node_disko_path.clone().or(node.disko_path.clone()),
            serve.node_disko_rebuild.as_deref().or(node.disko_rebuild.as_deref()),
        )
        .map_err(anyhow::Error::msg)?,
        audit_key: common.audit_key.clone().unwrap_or_else(|| state_dir.join("audit.key")),
        state_dir,
        policies,
        durability,
        anonymous_role,
        heartbeat: std::time::Duration::from_millis(serve.heartbeat_ms.or(file.heartbeat_ms).unwrap_or(5000).max(100)),
        #[cfg(feature = "bench-no-pipeline")]
        insecure_no_pipeline: false,
        audit_checkpoint: std::time::Duration::from_millis(serve.audit_checkpoint_ms.unwrap_or(60_000).max(100)),
        audit_checkpoint_copy: serve.audit_checkpoint_copy.clone(),
        api_key: env("MOAT_API_KEY").filter(|k| !k.is_empty()),
    })
}

fn read_file(path: &Path, explicit: bool) -> anyhow::Result<(FileConfig, bool)> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let file = toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?;
            Ok((file, true))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok((FileConfig::default(), false)),
        Err(e) => Err(e).with_context(|| format!("cannot read config file {}", path.display())),
    }
}

/// Node names are DNS labels: they appear in URLs, certificates and resource ids.
pub fn validate_node_name(name: &str) -> anyhow::Result<()> {
    if !crate::names::is_dns_label(name) {
        bail!("node name `{name}` is not a DNS label: use 1-63 of a-z, 0-9 and '-', not starting or ending with '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| pairs.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn defaults_follow_xdg() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap();
        let c = load(&Overrides::default(), &ServeOverrides::default(), env_of(&[("HOME", home)])).unwrap();
        assert_eq!(c.state_dir, dir.path().join(".local/state/moat"));
        assert_eq!(c.config_path, dir.path().join(".config/moat/moat.toml"));
        assert!(!c.config_file_found);
        assert_eq!(c.db_path(), dir.path().join(".local/state/moat/moat.db"));
        assert_eq!(c.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!((c.operator.as_str(), c.operator_role), ("operator", Role::ClusterAdmin));
        assert_eq!(c.node_name, "local");
        assert_eq!(c.http, None);
        assert_eq!(c.node_disks.management, moat_tools::DiskManagement::InstallerOnly);
    }

    #[test]
    fn file_then_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("moat.toml");
        std::fs::write(
            &cfg,
            "state_dir = \"/srv/moat\"\nhttp = \"127.0.0.1:9000\"\nmax_body_bytes = 2048\noperator = \"ops\"\n[node]\nname = \"n7\"\n\
             disk_management = \"controller-managed\"\ndisk_applier = \"disko\"\ndisko_rebuild = \"nixos-rebuild switch\"\n",
        )
        .unwrap();
        let common = Overrides { config: Some(cfg.clone()), state_dir: None, audit_key: None, node_storage: None };
        let c = load(&common, &ServeOverrides::default(), env_of(&[])).unwrap();
        assert!(c.config_file_found);
        assert_eq!(c.state_dir, PathBuf::from("/srv/moat"));
        assert_eq!(c.http, Some("127.0.0.1:9000".parse().unwrap()));
        assert_eq!((c.max_body_bytes, c.operator.as_str(), c.node_name.as_str()), (2048, "ops", "n7"));
        assert_eq!(c.node_storage_root, PathBuf::from("/srv/moat/node"));
        assert_eq!(c.node_disks.management, moat_tools::DiskManagement::ControllerManaged);
        assert_eq!(c.node_disks.applier, moat_tools::DiskApplier::Disko);
        assert_eq!(c.node_disks.rebuild, ["nixos-rebuild", "switch"]);
        assert_eq!(c.node_disks.state_file, PathBuf::from("/srv/moat/node/disk/layouts.json"));

        let serve = ServeOverrides {
            max_body_bytes: Some(4096),
            node_name: Some("n8".into()),
            operator_role: Some("reader".into()),
            ..Default::default()
        };
        let common =
            Overrides { config: Some(cfg), state_dir: Some("/tmp/x".into()), audit_key: None, node_storage: None };
        let c = load(&common, &serve, env_of(&[])).unwrap();
        assert_eq!((c.max_body_bytes, c.node_name.as_str(), c.operator_role), (4096, "n8", Role::Reader));
        assert_eq!(c.state_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn bad_files_and_values_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("moat.toml");
        let cases = [
            ("stat_dir = \"/x\"\n", "invalid config file"),
            ("operator_role = \"root\"\n", "operator_role"),
            ("max_body_bytes = 10\n", "at least 1024"),
            ("[node]\nname = \"Bad_Name\"\n", "DNS label"),
            ("[node]\ndisk_management = \"yes\"\n", "not installer-only or controller-managed"),
            ("[node]\ndisk_applier = \"parted\"\n", "not direct or disko"),
            ("[node]\ndisko_path = \"relative.nix\"\n", "must be absolute"),
        ];
        for (text, want) in cases {
            std::fs::write(&cfg, text).unwrap();
            let common = Overrides { config: Some(cfg.clone()), state_dir: None, audit_key: None, node_storage: None };
            let err = load(&common, &ServeOverrides::default(), env_of(&[("HOME", "/tmp")])).unwrap_err();
            assert!(format!("{err:#}").contains(want), "{text}: {err:#}");
        }
        let missing = Overrides {
            config: Some(dir.path().join("nope.toml")),
            state_dir: None,
            audit_key: None,
            node_storage: None,
        };
        let err = load(&missing, &ServeOverrides::default(), env_of(&[])).unwrap_err();
        assert!(format!("{err:#}").contains("cannot read config file"), "{err:#}");
    }
}

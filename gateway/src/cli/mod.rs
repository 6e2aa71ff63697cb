//! The `moat` command line: one function per subcommand. `serve` runs the
//! gateway ([`crate::serve`]); the rest are operator tools on the same state
//! directory (keys, audit, policy, PKI, nodes, images, status).

use anyhow::Context;
use clap::{Parser, Subcommand};
use moat_tools::ToolName;

use crate::config::{self, Config, Overrides, PolicySource, ServeOverrides};
use crate::nodes::connector::NodeAddress;
use crate::nodes::pki::Pki;
use crate::principal::Role;
use crate::security::authz::Bundle;
use crate::store::{State, audit, keys, now};

#[derive(Parser)]
#[command(
    name = "moat",
    version,
    about = "moat: an MCP gateway for VMs, workspaces, networks and hosts",
    long_about = "moat: an MCP gateway for VMs, workspaces, networks and hosts.\n\n\
                  `moat serve` with no arguments serves MCP on stdio with an embedded node agent for this \
                  host and SQLite state in $XDG_STATE_HOME/moat. Every setting can come from the config \
                  file ($XDG_CONFIG_HOME/moat/moat.toml), a MOAT_* environment variable, or a flag; flags win."
)]
struct Cli {
    #[command(flatten)]
    common: Overrides,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve MCP: stdio by default, Streamable HTTP at /mcp with --http. Stops on SIGINT/SIGTERM.
    Serve(Box<ServeOverrides>),
    /// Print version, config and database paths, schema version, API keys, audit size and known nodes.
    Status,
    /// Manage the nodes this gateway routes to.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Manage API keys (HTTP bearer keys; MOAT_API_KEY on stdio).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Read and check the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Check Cedar policies and limits.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The private CA for gateway ↔ node mutual TLS (in <state-dir>/pki).
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Guest images for VMs.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create the node CA, the gateway client CA and the gateway's certificate; does nothing
    /// if they exist.
    Init,
    /// Issue the gateway a new client certificate. Nodes keep accepting it (they trust the CA);
    /// send the running gateway SIGHUP to use it for new connections. Renew a node's own
    /// certificate with `moat node enroll NAME --out DIR` and SIGHUP to that moat-node.
    Rotate,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build an image. `base` (the default): Debian's kernel and a busybox initramfs into
    /// <state-dir>/images/base, or --out DIR; needs apt-get, busybox-static, cpio and xz-utils.
    /// `debian`: a Debian stable root filesystem (debootstrap minbase with python3, git,
    /// ca-certificates, iproute2 and --packages) as ext4, built into --out (default
    /// <state-dir>/images/debian-build) and registered as image --name (default debian) in the
    /// embedded node's storage; needs debootstrap. `git`: the git service VM's images from the
    /// Debian image (--debian, default <state-dir>/images/debian-build/rootfs.ext4) into --out
    /// (default <state-dir>/images/git-build), registered as images `git` (the service VM's root)
    /// and `git-data` (empty: its repositories' workspace); needs e2fsprogs. `portal`: a portal
    /// agent's root filesystem, the Debian image (--debian) plus Node 24 and OpenClaw from npm
    /// (--openclaw names an npm prefix that has both, else npm installs them), with moat as
    /// OpenClaw's MCP server through `moat-guest mcp`; into --out (default
    /// <state-dir>/images/portal-build), registered as image `portal`. All are idempotent; base,
    /// debian and portal need root.
    Build {
        /// base, debian, git or portal
        #[arg(default_value = "base", value_parser = ["base", "debian", "git", "portal"])]
        kind: String,
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// debian: more packages to install, comma-separated
        #[arg(long, value_delimiter = ',')]
        packages: Vec<String>,
        /// debian: the name to register the image under
        #[arg(long, default_value = "debian")]
        name: String,
        /// git, portal: the Debian root filesystem to start from
        #[arg(long)]
        debian: Option<std::path::PathBuf>,
        /// portal: an npm prefix with openclaw (node_modules/) and node@24 (node/node_modules/)
        #[arg(long)]
        openclaw: Option<std::path::PathBuf>,
        /// A static moat-guest binary to include in the image.
        #[arg(long)]
        guest: Option<std::path::PathBuf>,
        /// A recipe directory with build.sh, init and modules [default: the service-vms/base recipe built
        /// into this binary]
        #[arg(long, env = "MOAT_IMAGE_RECIPE")]
        recipe: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print it once; only its hash is stored.
    Create {
        /// The principal name the key authenticates as (owner of what it creates)
        #[arg(long)]
        name: String,
        /// reader, agent, vm-admin or cluster-admin
        #[arg(long)]
        role: String,
        /// Lifetime, e.g. 90s, 15m, 12h, 30d [default: never expires]
        #[arg(long)]
        expires: Option<String>,
    },
    /// List keys (never the secrets).
    List,
    /// Revoke a key by id; it is refused from its next call on.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// List audited calls, newest first, with their outcomes.
    List {
        #[arg(long)]
        principal: Option<String>,
        #[arg(long)]
        tool: Option<String>,
        /// RFC 3339 UTC, e.g. 2026-11-23T00:00:00Z
        #[arg(long)]
        since: Option<String>,
        /// allowed, denied, invalid or rate-limited
        #[arg(long)]
        decision: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Check the hash chain; exits non-zero at the first edited, missing or reordered record.
    Verify,
    /// Print every record with its hashes.
    Export {
        #[arg(long, default_value = "jsonl")]
        format: String,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policies directory (schema, policies, limits, every tool present) [default: the built-in set]
    Validate { dir: Option<std::path::PathBuf> },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Register a node agent reachable at ADDRESS without issuing a certificate: unix:/PATH, an
    /// https:// node already enrolled, or http://127.0.0.1:PORT with --insecure-loopback.
    Add {
        /// DNS label, e.g. n1
        name: String,
        #[arg(long)]
        address: String,
        /// Accept a plain-text http:// address on this host (development only).
        #[arg(long)]
        insecure_loopback: bool,
    },
    /// Issue node NAME a certificate bundle in --out DIR (node.pem, node.key, client-ca.pem)
    /// and register it at --address https://HOST:PORT. Run again to renew the certificate;
    /// then SIGHUP that moat-node. Start the node with `moat-node serve --certs DIR`.
    Enroll {
        /// DNS label, e.g. n1; the certificate's CN and DNS name
        name: String,
        /// https://HOST:PORT where the node listens
        #[arg(long)]
        address: String,
        /// Where to write the bundle
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Forget a node.
    Remove { name: String },
    /// List registered nodes with when they last answered.
    List,
}

/// Parses the command line, sets up logging (to stderr: on stdio, stdout belongs to MCP) and
/// runs the subcommand.
pub async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MOAT_LOG")
                .unwrap_or_else(|_| "info,sqlx=warn,rmcp=error".into()),
        )
        .init();
    let env = |k: &str| std::env::var(k).ok();
    let config = |serve: &ServeOverrides| config::load(&cli.common, serve, env);
    match cli.command {
        Command::Serve(serve) => crate::serve::run(config(&serve)?).await,
        Command::Status => status(&config(&ServeOverrides::default())?).await,
        Command::Keys(cmd) => keys_cmd(&config(&ServeOverrides::default())?, cmd).await,
        Command::Audit(cmd) => audit_cmd(&config(&ServeOverrides::default())?, cmd).await,
        Command::Policy(PolicyCommand::Validate { dir }) => policy_validate(dir),
        Command::Node(cmd) => node_cmd(&config(&ServeOverrides::default())?, cmd).await,
        Command::Pki(cmd) => pki_cmd(&config(&ServeOverrides::default())?, cmd),
        Command::Image(ImageCommand::Build { kind, out, packages, name, .. }) if kind == "debian" => {
            let config = config(&ServeOverrides::default())?;
            let out = out.unwrap_or_else(|| config.images_dir().join("debian-build"));
            let file = crate::image::build_debian(&out, &packages)?;
            register(&config, &name, &file).await
        }
        Command::Image(ImageCommand::Build { kind, out, debian, .. }) if kind == "git" => {
            let config = config(&ServeOverrides::default())?;
            let out = out.unwrap_or_else(|| config.images_dir().join("git-build"));
            let debian = debian.unwrap_or_else(|| config.images_dir().join("debian-build").join("rootfs.ext4"));
            let (root, data) = crate::image::build_git(&out, &debian)?;
            register(&config, "git", &root).await?;
            register(&config, "git-data", &data).await
        }
        Command::Image(ImageCommand::Build { kind, out, debian, openclaw, .. }) if kind == "portal" => {
            let config = config(&ServeOverrides::default())?;
            let out = out.unwrap_or_else(|| config.images_dir().join("portal-build"));
            let debian = debian.unwrap_or_else(|| config.images_dir().join("debian-build").join("rootfs.ext4"));
            let root = crate::image::build_portal(&out, &debian, openclaw.as_deref())?;
            register(&config, "portal", &root).await
        }
        Command::Image(ImageCommand::Build { out, guest, recipe, .. }) => {
            let out = match out {
                Some(out) => out,
                None => config(&ServeOverrides::default())?.images_dir().join("base"),
            };
            crate::image::build(recipe.as_deref(), &out, guest.as_deref())
        }
    }
}

/// Registers `file` as disk image `name` in the embedded node's storage, unless the same
/// content is already there.
async fn register(config: &Config, name: &str, file: &std::path::Path) -> anyhow::Result<()> {
    let storage = moat_node::storage::Storage::open(&config.node_storage)
        .with_context(|| format!("cannot open the node storage {}", config.node_storage.display()))?;
    if let Ok(have) = storage.image(name) {
        let sum = {
            let out = moat_node::cmd::probe_blocking(
                &["sha256sum", &file.display().to_string()],
                std::time::Duration::from_secs(600),
            );
            out.map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap_or_default().to_string())
        };
        if sum.as_deref() == Some(have.sha256.as_str()) {
            println!("image {name} is registered and up to date in {}", config.node_storage.display());
            return Ok(());
        }
        anyhow::bail!(
            "an image named {name} with other content is registered in {}: delete it (image_delete) or pass --name",
            config.node_storage.display()
        );
    }
    let image = storage.import_image(name, file).await.map_err(|e| anyhow::anyhow!(moat_node::errors::chain(&e)))?;
    println!(
        "registered image {name} ({} MiB, sha256 {}) in {} ({})",
        image.size_bytes >> 20,
        image.sha256,
        config.node_storage.display(),
        storage.method_detail()
    );
    Ok(())
}

async fn status(config: &Config) -> anyhow::Result<()> {
    let state = State::open(&config.db_path()).await?;
    println!("moat {}", env!("CARGO_PKG_VERSION"));
    let found = if config.config_file_found { "" } else { " (not present; defaults in use)" };
    println!("config:          {}{found}", config.config_path.display());
    println!("database:        {}", state.path().display());
    println!("schema version:  {}", state.schema_version().await?);
    let now_ts = now();
    let active = keys::list(state.pool())
        .await?
        .iter()
        .filter(|k| k.revoked_at.is_none() && k.expires_at.as_ref().is_none_or(|at| *at > now_ts))
        .count();
    println!("active API keys: {active}");
    let (records, last) = audit::summary(state.pool()).await?;
    println!("audit records:   {records}{}", last.map(|ts| format!(" (last {ts})")).unwrap_or_default());
    let nodes = state.nodes().await?;
    println!("nodes:           {}", nodes.len());
    for n in nodes {
        let seen = n.last_seen.as_deref().unwrap_or("never");
        let err = n.last_error.as_ref().map(|e| format!("  last error: {e}")).unwrap_or_default();
        let reach = if n.is_unreachable() {
            format!("  UNREACHABLE ({} heartbeats missed)", n.missed_heartbeats)
        } else {
            String::new()
        };
        println!("  {:<16} {:<40} last seen {seen}{reach}{err}", n.name, n.address);
    }
    Ok(())
}

async fn keys_cmd(config: &Config, cmd: KeysCommand) -> anyhow::Result<()> {
    let state = State::open(&config.db_path()).await?;
    let pool = state.pool();
    match cmd {
        KeysCommand::Create { name, role, expires } => {
            let role = role.parse::<Role>().map_err(anyhow::Error::msg)?;
            let expires = expires.map(|e| keys::parse_duration(&e)).transpose().map_err(anyhow::Error::msg)?;
            let (row, key) = keys::create(pool, &name, role, expires).await?;
            eprintln!(
                "created key {} for {} ({}){}; it is shown only now:",
                row.id,
                row.name,
                row.role,
                row.expires_at.map(|e| format!(", expires {e}")).unwrap_or_default()
            );
            println!("{key}");
        }
        KeysCommand::List => {
            println!("{:<10} {:<24} {:<14} {:<26} status", "id", "name", "role", "created");
            for k in keys::list(pool).await? {
                let status = match (&k.revoked_at, &k.expires_at) {
                    (Some(at), _) => format!("revoked {at}"),
                    (None, Some(at)) if *at <= now() => format!("expired {at}"),
                    (None, Some(at)) => format!("active, expires {at}"),
                    (None, None) => "active".into(),
                };
                println!("{:<10} {:<24} {:<14} {:<26} {status}", k.id, k.name, k.role, k.created_at);
            }
        }
        KeysCommand::Revoke { id } => {
            keys::revoke(pool, &id).await?;
            println!("revoked key {id}");
        }
    }
    Ok(())
}

async fn audit_cmd(config: &Config, cmd: AuditCommand) -> anyhow::Result<()> {
    let state = State::open(&config.db_path()).await?;
    let pool = state.pool();
    match cmd {
        AuditCommand::List { principal, tool, since, decision, limit } => {
            let filter = audit::Filter { principal, tool, decision, since, limit };
            for r in audit::query(pool, &filter).await? {
                println!(
                    "{:>6} {} {:<16} {:<13} {:<14} {:<12} {:<24} {}{}",
                    r.seq,
                    r.ts,
                    r.principal,
                    r.role,
                    r.tool,
                    r.decision,
                    r.resource.unwrap_or_default(),
                    r.outcome.as_deref().unwrap_or(if r.decision == "allowed" { "(no outcome)" } else { "-" }),
                    r.duration_us.map(|d| format!(" {d}us")).unwrap_or_default(),
                );
            }
        }
        AuditCommand::Verify => {
            let report = audit::verify(state.path()).await?;
            if let Some(problem) = report.problem {
                println!("audit log BROKEN after {} good records: {problem}", report.checked);
                std::process::exit(1);
            }
            println!("hash chain intact: {} records verified", report.checked);
            let anchors = audit::anchor::verify_anchors(pool, &config.audit_key, &config.audit_checkpoints()).await?;
            if let Some(problem) = anchors.problem {
                println!("audit log BROKEN: {problem}");
                std::process::exit(1);
            }
            match anchors.anchored {
                Some((seq, at)) if seq == anchors.last => {
                    println!("checkpoints: {} verified; the last, of {at}, vouches for every record", anchors.checked)
                }
                Some((seq, at)) => println!(
                    "checkpoints: {} verified; the last, of {at}, vouches for records up to {seq}; records {} to {} \
                     came after it and cannot be checked for truncation until the next checkpoint",
                    anchors.checked,
                    seq + 1,
                    anchors.last
                ),
                None => println!(
                    "no checkpoints and no audit key ({}): truncation and re-chaining cannot be checked; `moat \
                     serve` writes checkpoints",
                    config.audit_key.display()
                ),
            }
        }
        AuditCommand::Export { format } => {
            anyhow::ensure!(format == "jsonl", "unknown export format `{format}`: only jsonl is supported");
            use std::io::Write;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut failed = None;
            audit::export(pool, |v| {
                if failed.is_none()
                    && let Err(e) = writeln!(out, "{v}")
                {
                    failed = Some(e);
                }
            })
            .await?;
            if let Some(e) = failed {
                return Err(e.into());
            }
            out.flush()?;
        }
    }
    Ok(())
}

fn policy_validate(dir: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let source = dir.map_or(PolicySource::Embedded, PolicySource::Dir);
    let bundle = Bundle::load(&source)?;
    println!("{}: valid ({} tools, 4 roles with limits and quotas)", bundle.source, ToolName::ALL.len());
    Ok(())
}

async fn node_cmd(config: &Config, cmd: NodeCommand) -> anyhow::Result<()> {
    let state = State::open(&config.db_path()).await?;
    match cmd {
        NodeCommand::Add { name, address, insecure_loopback } => {
            config::validate_node_name(&name)?;
            let parsed = NodeAddress::parse(&address).map_err(anyhow::Error::msg)?;
            parsed.check_plaintext_allowed(insecure_loopback).map_err(anyhow::Error::msg)?;
            state.add_node(&name, &address).await?;
            println!("added node {name} at {address}");
        }
        NodeCommand::Enroll { name, address, out } => {
            config::validate_node_name(&name)?;
            if !matches!(NodeAddress::parse(&address), Ok(NodeAddress::Tls { .. })) {
                anyhow::bail!("--address must be https://HOST:PORT: enrolled nodes speak mutual TLS");
            }
            let pki = Pki::at(&config.state_dir);
            let bundle = pki.issue_node(&name)?;
            bundle.write(&out).with_context(|| format!("cannot write the bundle to {}", out.display()))?;
            state.upsert_node(&name, &address).await?;
            println!("enrolled node {name} at {address}; its certificate bundle is in {}", out.display());
            println!("on the node: moat-node serve --name {name} --listen 0.0.0.0:PORT --certs DIR");
        }
        NodeCommand::Remove { name } => {
            let placed = state.vms_on(&name).await?;
            if !placed.is_empty() {
                anyhow::bail!(
                    "node {name} still has {} VMs ({}); delete them first (vm_delete)",
                    placed.len(),
                    placed.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
                );
            }
            state.remove_node(&name).await.with_context(|| format!("cannot remove node {name}"))?;
            println!("removed node {name}");
        }
        NodeCommand::List => {
            for n in state.nodes().await? {
                println!("{}\t{}\t{}", n.name, n.address, n.last_seen.as_deref().unwrap_or("never"));
            }
        }
    }
    Ok(())
}

fn pki_cmd(config: &Config, cmd: PkiCommand) -> anyhow::Result<()> {
    let pki = Pki::at(&config.state_dir);
    match cmd {
        PkiCommand::Init => {
            if pki.init()? {
                println!(
                    "created the node CA, the gateway client CA and the gateway certificate in {}",
                    pki.dir().display()
                );
            } else {
                println!("PKI already present in {}; nothing changed", pki.dir().display());
            }
        }
        PkiCommand::Rotate => {
            if !pki.exists() {
                anyhow::bail!("no PKI in {}: run `moat pki init` first", pki.dir().display());
            }
            pki.rotate_gateway()?;
            println!(
                "issued a new gateway certificate in {}; send the running gateway SIGHUP to use it",
                pki.dir().display()
            );
        }
    }
    Ok(())
}

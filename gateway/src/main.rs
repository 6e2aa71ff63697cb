//! `moat`: the gateway binary and operator CLI.

use anyhow::Context;
use clap::{Parser, Subcommand};
use moat_gateway::config::{self, Overrides, ServeOverrides};
use moat_gateway::node_client::NodeAddress;
use moat_gateway::state::State;

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
    Serve(ServeOverrides),
    /// Print version, config and database paths, schema version and the known nodes.
    Status,
    /// Manage the nodes this gateway routes to.
    #[command(subcommand)]
    Node(NodeCommand),
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Register a node agent reachable at ADDRESS (http://HOST:PORT or unix:/PATH).
    Add {
        /// DNS label, e.g. n1
        name: String,
        #[arg(long)]
        address: String,
    },
    /// Forget a node.
    Remove { name: String },
    /// List registered nodes with when they last answered.
    List,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Logs go to stderr always: on stdio, stdout belongs to the MCP protocol.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MOAT_LOG")
                .unwrap_or_else(|_| "info,sqlx=warn,rmcp=error".into()),
        )
        .init();
    let env = |k: &str| std::env::var(k).ok();
    match cli.command {
        Command::Serve(serve) => {
            let config = config::load(&cli.common, &serve, env)?;
            moat_gateway::serve::run(config).await
        }
        Command::Status => {
            let config = config::load(&cli.common, &ServeOverrides::default(), env)?;
            let state = State::open(&config.db_path()).await?;
            println!("moat {}", env!("CARGO_PKG_VERSION"));
            let found = if config.config_file_found { "" } else { " (not present; defaults in use)" };
            println!("config:          {}{found}", config.config_path.display());
            println!("database:        {}", state.path().display());
            println!("schema version:  {}", state.schema_version().await?);
            let nodes = state.nodes().await?;
            println!("nodes:           {}", nodes.len());
            for n in nodes {
                let seen = n.last_seen.as_deref().unwrap_or("never");
                let err = n.last_error.map(|e| format!("  last error: {e}")).unwrap_or_default();
                println!("  {:<16} {:<40} last seen {seen}{err}", n.name, n.address);
            }
            Ok(())
        }
        Command::Node(cmd) => {
            let config = config::load(&cli.common, &ServeOverrides::default(), env)?;
            let state = State::open(&config.db_path()).await?;
            match cmd {
                NodeCommand::Add { name, address } => {
                    config::validate_node_name(&name)?;
                    NodeAddress::parse(&address).map_err(anyhow::Error::msg)?;
                    state.add_node(&name, &address).await?;
                    println!("added node {name} at {address}");
                }
                NodeCommand::Remove { name } => {
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
    }
}

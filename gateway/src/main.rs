//! `moat`: the gateway binary and operator CLI (see `moat_gateway::cli`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    moat_gateway::cli::run().await
}

//! `moat-evals`: runs scripted multi-step scenarios against a live gateway.
//!
//! Each scenario starts `moat serve` on stdio in a private state directory,
//! calls tools step by step through an MCP client, and checks each answer.
//! Prints one line per step and a closing `N passed, M failed` line.

mod scenario;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(name = "moat-evals", version, about = "Run scripted scenarios against a live moat gateway")]
struct Cli {
    /// The moat binary to start (on stdio) for each scenario
    #[arg(long, env = "MOAT_BIN", default_value = "moat")]
    moat: PathBuf,
    /// The guest image directory (vmlinux, initramfs with moat-guest) for scenarios that boot VMs
    #[arg(long, env = "MOAT_GUEST_IMAGE")]
    guest_image: Option<PathBuf>,
    /// The Debian image (rootfs.ext4) for scenarios that boot VMs
    #[arg(long, env = "MOAT_DEBIAN_IMAGE")]
    debian_image: Option<PathBuf>,
    /// The git service images' directory (rootfs.ext4, data.ext4: `moat image build git`)
    #[arg(long, env = "MOAT_GIT_IMAGE")]
    git_image: Option<PathBuf>,
    /// Scenario files (TOML)
    #[arg(required = true)]
    scenarios: Vec<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (mut passed, mut failed) = (0usize, 0usize);
    for path in &cli.scenarios {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let scenario: scenario::Scenario =
            toml::from_str(&text).with_context(|| format!("{} is not a valid scenario", path.display()))?;
        println!("scenario {}: {}", scenario.name, scenario.description);
        let images = scenario::Images {
            guest: cli.guest_image.clone(),
            debian: cli.debian_image.clone(),
            git: cli.git_image.clone(),
        };
        let outcomes = scenario::run(&cli.moat, &scenario, &images).await?;
        for (i, outcome) in outcomes.iter().enumerate() {
            match outcome {
                Ok(()) => {
                    passed += 1;
                    println!("  ok    step {} {}", i + 1, scenario.steps[i].tool);
                }
                Err(why) => {
                    failed += 1;
                    println!("  FAIL  step {} {}: {why}", i + 1, scenario.steps[i].tool);
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

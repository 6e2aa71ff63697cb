//! Workspaces, as a client sees them: `workspace_create` and `workspace_fork` at 100 MiB and
//! 2 GiB (images full of data, not sparse) through `moat serve` (this build, stdio, its embedded
//! node) on a loop-mounted btrfs made by the bench, against `cp --reflink=never` and
//! `cp --reflink=always` of the same image file on the same filesystem in the same run; then VM
//! boot to agent-ready (`vm_create {wait_ready: true}`) from a Debian workspace against the
//! busybox initramfs image.
//!
//!     cargo bench -p moat-gateway --bench workspaces     # as root
//!
//! MOAT_BENCH_N (runs per measure, default 10), MOAT_GUEST_IMAGE (default target/ci/guest-image),
//! MOAT_DEBIAN_IMAGE (default target/ci/debian-image/rootfs.ext4; without it the boot comparison
//! is left out).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // a bench binary

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moat_node::testing::LoopFs;
use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::TokioChildProcess;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};

type Client = RunningService<RoleClient, ()>;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn call(client: &Client, tool: &str, args: Value) -> Value {
    let params = CallToolRequestParams::new(tool.to_string()).with_arguments(args.as_object().unwrap().clone());
    let result = client.call_tool(params).await.unwrap();
    assert_ne!(result.is_error, Some(true), "{tool}: {result:?}");
    result.structured_content.unwrap()
}

/// Median and worst of `runs`, in ms.
fn summary(mut runs: Vec<Duration>) -> String {
    runs.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!("median {:8.1} ms   max {:8.1} ms", ms(runs[runs.len() / 2]), ms(runs[runs.len() - 1]))
}

/// An ext4 image of `mib` MiB, nearly full of pseudo-random data (nothing for a copy to skip).
fn data_image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let tree = dir.join(format!("{name}-tree"));
    std::fs::create_dir_all(&tree).unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut chunk = vec![0u8; 1 << 20];
    let mut blob = std::fs::File::create(tree.join("blob")).unwrap();
    for _ in 0..mib * 85 / 100 {
        for word in chunk.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        std::io::Write::write_all(&mut blob, &chunk).unwrap();
    }
    drop(blob);
    let image = dir.join(format!("{name}.ext4"));
    let out = std::process::Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d", tree.to_str().unwrap(), image.to_str().unwrap(), &format!("{mib}M")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&tree).unwrap();
    image
}

fn cp(args: &[&str], from: &Path, to: &Path) -> Duration {
    let started = Instant::now();
    let status = std::process::Command::new("cp").args(args).arg(from).arg(to).status().unwrap();
    let took = started.elapsed();
    assert!(status.success());
    std::fs::remove_file(to).unwrap();
    took
}

async fn timed(client: &Client, tool: &str, args: Value) -> Duration {
    let started = Instant::now();
    call(client, tool, args).await;
    started.elapsed()
}

#[tokio::main]
async fn main() {
    let n = env_usize("MOAT_BENCH_N", 10);
    let fs = LoopFs::new("mkfs.btrfs", 16 << 10).expect("a loop btrfs (run as root, with btrfs-progs)");
    let home = tempfile::tempdir().unwrap();
    let state = home.path().join("state");
    std::fs::create_dir_all(state.join("images")).unwrap();
    let guest = std::env::var_os("MOAT_GUEST_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ci/guest-image"));
    if let Ok(guest) = guest.canonicalize() {
        std::os::unix::fs::symlink(guest, state.join("images/base")).unwrap();
    }
    let storage = fs.path().join("storage");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_moat"));
    cmd.args(["serve", "--node-storage", storage.to_str().unwrap()])
        .env("HOME", home.path())
        .env("MOAT_STATE_DIR", &state)
        .env("MOAT_LOG", "warn")
        .env_remove("MOAT_API_KEY");
    let client: Client = ().serve(TokioChildProcess::new(cmd).unwrap()).await.unwrap();
    let node = call(&client, "node_inspect", json!({"node": "local"})).await;
    println!("workspaces bench: {} runs per measure; storage {}", n, node["node"]["storage"]["workspace_detail"]);

    let images = fs.path().join("src");
    std::fs::create_dir_all(&images).unwrap();
    for (name, mib) in [("w100m", 100u64), ("w2g", 2048)] {
        let file = data_image(&images, name, mib);
        call(&client, "image_import", json!({"name": name, "source": file})).await;
        let registered = storage.join("images").join(name).join("rootfs.ext4");
        let (mut create, mut fork, mut plain, mut reflink) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            create
                .push(timed(&client, "workspace_create", json!({"name": format!("{name}-c{i}"), "image": name})).await);
        }
        for i in 0..n {
            let args = json!({"workspace": format!("{name}-c0"), "name": format!("{name}-f{i}")});
            fork.push(timed(&client, "workspace_fork", args).await);
        }
        let dest = fs.path().join("copy.ext4");
        for _ in 0..n.min(3) {
            plain.push(cp(&["--reflink=never"], &registered, &dest));
        }
        for _ in 0..n {
            reflink.push(cp(&["--reflink=always"], &registered, &dest));
        }
        let median = |v: &Vec<Duration>| {
            let mut v = v.clone();
            v.sort();
            v[v.len() / 2]
        };
        println!("\n{name} ({mib} MiB image, {} MiB of data)", mib * 85 / 100);
        println!("  workspace_create (moat, client-seen)  {}", summary(create.clone()));
        println!("  workspace_fork   (moat, client-seen)  {}", summary(fork.clone()));
        println!("  cp --reflink=never                    {}", summary(plain.clone()));
        println!("  cp --reflink=always                   {}", summary(reflink));
        println!(
            "  plain cp / workspace_create = {:.0}x, plain cp / workspace_fork = {:.0}x",
            median(&plain).as_secs_f64() / median(&create).as_secs_f64(),
            median(&plain).as_secs_f64() / median(&fork).as_secs_f64()
        );
        for i in 0..n {
            call(&client, "workspace_delete", json!({"workspace": format!("{name}-f{i}")})).await;
            call(&client, "workspace_delete", json!({"workspace": format!("{name}-c{i}")})).await;
        }
    }

    let debian = std::env::var_os("MOAT_DEBIAN_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ci/debian-image/rootfs.ext4"));
    if debian.is_file() && state.join("images/base").exists() {
        call(&client, "image_import", json!({"name": "debian", "source": debian})).await;
        call(&client, "workspace_create", json!({"name": "boot", "image": "debian"})).await;
        let (mut on_debian, mut on_busybox) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let args = json!({"name": "d", "vcpus": 1, "memory_mib": 512, "workspace": "boot", "wait_ready": true});
            on_debian.push(timed(&client, "vm_create", args).await);
            call(&client, "vm_delete", json!({"vm": "d"})).await;
            let args = json!({"name": "b", "vcpus": 1, "memory_mib": 512, "wait_ready": true});
            on_busybox.push(timed(&client, "vm_create", args).await);
            call(&client, "vm_delete", json!({"vm": "b"})).await;
        }
        println!("\nVM boot to agent-ready (vm_create {{wait_ready: true}}, {}), 3 runs each", node["node"]["accel"]);
        println!("  Debian from a workspace  {}", summary(on_debian));
        println!("  busybox initramfs        {}", summary(on_busybox));
    } else {
        println!("\n(no guest image or Debian image: boot comparison left out)");
    }
    client.cancel().await.unwrap();
}

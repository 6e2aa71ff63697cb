//! The base guest image (service-vms/base) boots under QEMU and its init reports ready on
//! the serial console with every vsock module loaded. TCG, since KVM is not usable for stock
//! kernels on every host (see VM-TESTING.md); the deadline is generous because a parallel
//! build can double boot time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // spawns QEMU directly

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn base_image_boots_to_ready_with_vsock_modules() {
    let dir = moat_node::testing::guest_image();
    let (kernel, initrd) = (dir.join("vmlinux"), dir.join("initramfs.cpio.gz"));
    let mut qemu = tokio::process::Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-machine", "q35", "-m", "256", "-smp", "1"])
        .args(["-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("qemu-system-x86_64 runs (apt-get install qemu-system-x86)");
    let mut lines = BufReader::new(qemu.stdout.take().unwrap()).lines();
    let mut console = Vec::new();
    let ready = tokio::time::timeout(Duration::from_secs(180), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.contains("moat-init: ready");
            console.push(line);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    qemu.start_kill().unwrap();
    let console = console.join("\n");
    assert_eq!(ready, Ok(true), "the guest never reported ready; console:\n{console}");
    let modules =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../service-vms/base/modules")).unwrap();
    let want = modules.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(console.contains(&format!("moat-init: loaded {want} modules")), "{console}");
    assert!(!console.contains("cannot load"), "{console}");
    assert!(console.contains("\"name\":\"moat-base\""), "the image metadata is on the console: {console}");
}

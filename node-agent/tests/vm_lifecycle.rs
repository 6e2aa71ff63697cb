//! The VM lifecycle on a real QEMU (TCG) booting moat's base image: create and start,
//! console output, graceful stop through ACPI, restart, a killed VMM recorded as crashed,
//! re-adoption by a second manager over the same directory (a moat-node restart), delete.
//! Needs the image from `service-vms/base/build.sh target/ci/guest-image` (or $MOAT_GUEST_IMAGE).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use moat_node::testing::{VmReaper, guest_image, images_with_base, until};
use moat_node::vm::{NewVm, Runtime, VmManager, VmSettings, VmState, VsockMode};
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

fn manager(root: &Path) -> VmManager {
    let images = images_with_base(root);
    VmManager::open(VmSettings {
        node: "t1".into(),
        vms_root: root.join("vms"),
        images_root: images,
        runtime: Runtime::detect(
            "qemu-system-x86_64",
            false,
            None,
            VsockMode::detect("vhost-device-vsock"),
            moat_node::vmm::confine::DEFAULT_UID_BASE,
        ),
        storage: None,
    })
    .unwrap()
}

#[tokio::test]
async fn qemu_vm_lifecycle_crash_and_readoption() {
    assert!(
        guest_image().join("vmlinux").exists(),
        "build the guest image first: service-vms/base/build.sh {}",
        guest_image().display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let _reaper = VmReaper(tmp.path().to_path_buf());
    let vms = manager(tmp.path());

    let view = vms.create(&NewVm::plain("vm-a1", "alpha", 1, 256, ""), true).await.unwrap();
    assert_eq!(view.status.state, VmState::Running);
    assert_eq!((view.vmm, view.accel), ("qemu", "tcg"));
    let ready = |vms: &VmManager| vms.logs("vm-a1", 0).unwrap().0.contains("moat-init: ready");
    until("the guest to boot", Duration::from_secs(120), async || ready(&vms)).await;
    let (console, _) = vms.logs("vm-a1", 0).unwrap();
    assert!(console.contains("Linux version"), "the kernel's boot is on the console:\n{console}");

    // The guest agent over hybrid vsock: the control channel's hello, then MCP on port 200.
    let mut control = vms.guest_connect("vm-a1", 100, Duration::from_secs(60)).await.unwrap();
    control.write_all(b"{\"type\":\"hello\",\"protocol\":1}\n").await.unwrap();
    let mut hello = String::new();
    tokio::io::BufReader::new(&mut control).read_line(&mut hello).await.unwrap();
    assert!(hello.contains("\"agent_version\"") && hello.contains("moat-base"), "{hello}");
    let stream = vms.guest_connect("vm-a1", 200, Duration::from_secs(60)).await.unwrap();
    let (r, w) = tokio::io::split(stream);
    let client = ().serve((r, w)).await.unwrap();
    let args = serde_json::json!({"argv": ["uname", "-a"]}).as_object().unwrap().clone();
    let uname = client.call_tool(CallToolRequestParams::new("exec").with_arguments(args)).await.unwrap();
    let out = uname.structured_content.unwrap();
    assert!(out["stdout"].as_str().unwrap().starts_with("Linux"), "{out}");
    assert_eq!(out["exit_code"], 0);
    client.cancel().await.unwrap();

    // Graceful stop: the power button reaches the guest, which powers off.
    let stopped = vms.stop("vm-a1", false, Duration::from_secs(60)).await.unwrap();
    assert_eq!(stopped.status.state, VmState::Stopped, "{:?}\n{}", stopped.status, vms.logs("vm-a1", 0).unwrap().0);
    assert!(stopped.status.reason.contains("powered off on request"), "{}", stopped.status.reason);
    assert!(vms.logs("vm-a1", 0).unwrap().0.contains("power button"));

    // Start again, then kill the VMM behind the node's back: crashed, with the signal.
    let again = vms.start("vm-a1").await.unwrap();
    assert_eq!(again.status.state, VmState::Running);
    let pid = again.status.pid as i32;
    // SAFETY: kill(2) on the QEMU this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    until("the crash to be noticed", Duration::from_secs(10), async || {
        vms.get("vm-a1").unwrap().status.state == VmState::Crashed
    })
    .await;
    let crashed = vms.get("vm-a1").unwrap();
    assert!(crashed.status.reason.contains("signal 9"), "{}", crashed.status.reason);

    // A restarted node (a second manager on the same directory) adopts a running VM.
    vms.start("vm-a1").await.unwrap();
    let pid = vms.get("vm-a1").unwrap().status.pid;
    drop(vms);
    let vms = manager(tmp.path());
    let adopted = vms.get("vm-a1").unwrap();
    assert_eq!((adopted.status.state, adopted.status.pid), (VmState::Running, pid), "re-adopted, not restarted");
    // SAFETY: kill(2) on the QEMU this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    until("the adopted VM's crash to be noticed", Duration::from_secs(10), async || {
        vms.get("vm-a1").unwrap().status.state == VmState::Crashed
    })
    .await;

    vms.delete("vm-a1").await.unwrap();
    assert!(!tmp.path().join("vms/vm-a1").exists());
    assert!(vms.list().is_empty());
}

#[tokio::test]
async fn failed_creates_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let _reaper = VmReaper(tmp.path().to_path_buf());
    let vms = manager(tmp.path());
    let err = vms.create(&NewVm::plain("vm-b1", "beta", 1, 256, "nosuch"), false).await.unwrap_err().to_string();
    assert!(err.contains("image `nosuch` is not on node t1") && err.contains("moat image build"), "{err}");
    assert!(!tmp.path().join("vms/vm-b1").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(tmp.path().join("vms")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "VM consoles and sockets are the node's user's only");

    let missing = VmManager::open(VmSettings {
        node: "t2".into(),
        vms_root: tmp.path().join("vms"),
        images_root: tmp.path().join("images"),
        runtime: Runtime::detect(
            "/nonexistent/qemu-system-x86_64",
            false,
            None,
            VsockMode::detect("vhost-device-vsock"),
            moat_node::vmm::confine::DEFAULT_UID_BASE,
        ),
        storage: None,
    })
    .unwrap();
    let err = missing.create(&NewVm::plain("vm-b2", "beta", 1, 256, ""), true).await.unwrap_err().to_string();
    assert!(err.starts_with("no VM runtime on node t2") && err.contains("qemu-system-x86"), "{err}");
    assert!(!tmp.path().join("vms/vm-b2").exists());

    // QEMU refuses the VM (more memory than it can map): the create rolls back.
    let err = vms.create(&NewVm::plain("vm-b3", "beta", 1, 1 << 40, ""), true).await.unwrap_err().to_string();
    assert!(err.contains("vm vm-b3"), "{err}");
    assert!(!tmp.path().join("vms/vm-b3").exists(), "a failed start rolls back the create");
    assert!(vms.list().is_empty());

    // A second manager on the same storage root (another gateway's embedded node) opened first
    // still finds a VM created after it started.
    let other = manager(tmp.path());
    vms.create(&NewVm::plain("vm-b4", "beta", 1, 256, ""), false).await.unwrap();
    assert_eq!(other.get("vm-b4").unwrap().config.name, "beta");
    let err = vms.create(&NewVm::plain("vm-b4", "beta", 1, 256, ""), false).await.unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(vms.get("vm-b4").unwrap().status.state, VmState::Stopped);
    assert!(
        vms.create(&NewVm::plain("../x", "beta", 1, 256, ""), false).await.is_err(),
        "ids cannot escape the vms directory"
    );
}

#[tokio::test]
async fn a_guest_kernel_panic_is_a_crash_and_stays_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let _reaper = VmReaper(tmp.path().to_path_buf());
    let vms = manager(tmp.path());
    // The real kernel with an initramfs that is not one: no root filesystem, so the kernel panics.
    let broken = tmp.path().join("images/broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::os::unix::fs::symlink(guest_image().canonicalize().unwrap().join("vmlinux"), broken.join("vmlinux")).unwrap();
    std::fs::write(broken.join("initramfs.cpio.gz"), b"not an initramfs").unwrap();
    vms.create(&NewVm::plain("vm-p1", "panics", 1, 256, "broken"), true).await.unwrap();
    until("the panic to be recorded", Duration::from_secs(120), async || {
        vms.get("vm-p1").unwrap().status.state == VmState::Crashed
    })
    .await;
    let status = vms.get("vm-p1").unwrap().status;
    assert!(status.reason.starts_with("guest kernel panic: Kernel panic - not syncing"), "{}", status.reason);
    let (console, _) = vms.logs("vm-p1", 0).unwrap();
    assert!(console.contains("Kernel panic - not syncing"), "the panic stays readable after the crash:\n{console}");
}

/// Two nodes on one host (two managers on two storage roots, as two moat-node processes would
/// be): their VMs get distinct uids from the host-wide claims, and, with the kernel's
/// vhost-vsock, distinct CIDs from the host kernel, each guest reachable. Which vsock mode ran
/// is printed; the CID half is skipped, saying why, only where /dev/vhost-vsock cannot be opened.
#[tokio::test]
async fn two_nodes_on_one_host_share_no_uid_or_cid() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let _reapers = (VmReaper(one.path().to_path_buf()), VmReaper(two.path().to_path_buf()));
    let (a, b) = (manager(one.path()), manager(two.path()));
    let mode = a.runtime();
    let kernel = match mode {
        moat_node::vm::Runtime::Ready(vmm) => matches!(vmm.vsock(), VsockMode::Kernel),
        moat_node::vm::Runtime::Missing(why) => panic!("no runtime: {why}"),
    };
    eprintln!(
        "vsock mode: {}",
        if kernel {
            "kernel (/dev/vhost-vsock)"
        } else {
            "hybrid (vhost-device-vsock; /dev/vhost-vsock cannot be opened)"
        }
    );
    // The same VM id on both nodes: nothing host-wide may be keyed by it alone.
    a.create(&NewVm::plain("vm-same", "one", 1, 128, ""), true).await.unwrap();
    b.create(&NewVm::plain("vm-same", "two", 1, 128, ""), true).await.unwrap();
    let read = |root: &Path, file: &str| std::fs::read_to_string(root.join("vms/vm-same").join(file)).ok();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let (ua, ub) = (read(one.path(), "vmm.uid").unwrap(), read(two.path(), "vmm.uid").unwrap());
        assert_ne!(ua, ub, "two VMs on one host never share a uid");
    }
    if kernel {
        let (ca, cb) = (read(one.path(), "vsock.cid").unwrap(), read(two.path(), "vsock.cid").unwrap());
        assert_ne!(ca, cb, "the host kernel never grants one CID twice");
        for vms in [&a, &b] {
            let mut control = vms.guest_connect("vm-same", 100, Duration::from_secs(120)).await.unwrap();
            control.write_all(b"{\"type\":\"ping\"}\n").await.unwrap();
            let mut pong = String::new();
            tokio::io::BufReader::new(&mut control).read_line(&mut pong).await.unwrap();
            assert!(pong.contains("pong"), "{pong}");
        }
    } else {
        eprintln!(
            "SKIP (CID half): /dev/vhost-vsock cannot be opened on this host, so no kernel CIDs are granted here"
        );
    }
    a.delete("vm-same").await.unwrap();
    b.delete("vm-same").await.unwrap();
}

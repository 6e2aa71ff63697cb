//! The walls around a VM's processes, checked on the host through the real
//! parts: a separately started `moat-node` (root, as in production) boots two
//! QEMU guests; their QEMU and vsock daemons must run as uids of their own
//! with QEMU's seccomp filter, each in a cgroup with limits from the VM's
//! size; neither VM's uid can open the other's console or sockets, nor the
//! node's files; a guest that eats more memory than it was given is stopped
//! inside its VM; vm_inspect and node_inspect say which protections are on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code spawns binaries

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use common::node::Node;
use common::{Home, call_ok};
use moat_node::testing::images_with_base;
use moat_node::vmm::confine::{DEFAULT_UID_BASE, MEMORY_OVERHEAD_MIB};
use serde_json::{Value, json};

const MEMORY_MIB: u64 = 256;

/// One VM's processes as the host sees them.
struct Vm {
    id: String,
    dir: PathBuf,
    qemu: u32,
    daemon: u32,
}

impl Vm {
    fn new(node: &Node, created: &Value) -> Vm {
        let id = created["vm"]["id"].as_str().unwrap().to_string();
        let dir = node.root.join("vms").join(&id);
        let pid = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap().trim().parse().unwrap();
        Vm { qemu: pid("vmm.pid"), daemon: pid("vsock.pid"), id, dir }
    }
}

/// A `/proc/PID/status` field's first number.
fn status(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key} for {pid}"));
    line[key.len()..].split_whitespace().next().unwrap().parse().unwrap()
}

/// The VM's cgroup directory for `controller` (v1), or its v2 cgroup, as `/proc/PID/cgroup` names it.
fn cgroup_dir(pid: u32, controller: &str) -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = text
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let wanted = if unified { controllers.is_empty() } else { controllers.split(',').any(|c| c == controller) };
            wanted.then(|| path.trim_start_matches('/').to_string())
        })
        .unwrap_or_else(|| panic!("pid {pid} has no {controller} cgroup: {text}"));
    let base = if unified { PathBuf::from("/sys/fs/cgroup") } else { Path::new("/sys/fs/cgroup").join(controller) };
    base.join(path)
}

fn cgroup_file(pid: u32, controller: &str, file: &str) -> String {
    std::fs::read_to_string(cgroup_dir(pid, controller).join(file)).unwrap().trim().to_string()
}

/// Runs `script` with sh as `uid` (its gid the same; std drops root's groups); returns (success, stderr).
fn as_uid(uid: u32, script: &str) -> (bool, String) {
    let out = std::process::Command::new("sh").args(["-c", script]).uid(uid).gid(uid).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn vm_processes_are_confined() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var("CI").is_err(), "CI runs as root: confinement needs it");
        eprintln!("SKIP: not root; moat-node confines VMs only when it runs as root");
        return;
    }
    let home = Home::new();
    let tmp = tempfile::tempdir().unwrap();
    home.run(&["pki", "init"]).await;
    let images = images_with_base(tmp.path());
    let node =
        Node::enroll_and_start(&home, tmp.path(), "n1", &["--images", images.to_str().unwrap(), "--accel", "tcg"])
            .await;
    let moat = home.http_server(&[]).await;
    let alice = moat.client(&home.key("alice", "agent").await).await;
    let admin = moat.client(&moat.key).await;

    let mut vms = Vec::new();
    for name in ["a", "b"] {
        let args = json!({"name": name, "vcpus": 1, "memory_mib": MEMORY_MIB, "wait_ready": true});
        vms.push(Vm::new(&node, &call_ok(&alice, "vm_create", args).await));
    }
    let (a, b) = (&vms[0], &vms[1]);

    // Uids of their own, distinct, from the VM range; QEMU's seccomp filter on; both
    // processes of a VM in its cgroup, with limits from its size.
    let (uid_a, uid_b) = (status(a.qemu, "Uid:"), status(b.qemu, "Uid:"));
    assert!(uid_a >= u64::from(DEFAULT_UID_BASE) && uid_b >= u64::from(DEFAULT_UID_BASE), "{uid_a} {uid_b}");
    assert_ne!(uid_a, uid_b, "each VM has its own uid");
    for vm in [a, b] {
        assert_eq!(status(vm.qemu, "Gid:"), status(vm.qemu, "Uid:"));
        assert_eq!(status(vm.qemu, "Seccomp:"), 2, "QEMU runs under its seccomp filter");
        assert_eq!(status(vm.qemu, "NoNewPrivs:"), 1);
        assert_eq!(status(vm.daemon, "Uid:"), status(vm.qemu, "Uid:"), "the vsock daemon runs as the VM's uid");
        for pid in [vm.qemu, vm.daemon] {
            let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
            assert!(cgroups.contains(&format!("/moat/vm-{}-", vm.id)), "pid {pid} in the VM's cgroup: {cgroups}");
        }
    }
    let memory = ((MEMORY_MIB + MEMORY_OVERHEAD_MIB) << 20).to_string();
    let cgroup_of_a = cgroup_dir(a.qemu, "memory");
    assert!(cgroup_of_a.ends_with(format!("moat/vm-{}-{uid_a}", a.id)), "{}", cgroup_of_a.display());
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        assert_eq!(cgroup_file(a.qemu, "", "memory.max"), memory);
        assert_eq!(cgroup_file(a.qemu, "", "cpu.max"), "200000 100000");
    } else {
        assert_eq!(cgroup_file(a.qemu, "memory", "memory.limit_in_bytes"), memory);
        assert_eq!(cgroup_file(a.qemu, "cpu", "cpu.cfs_quota_us"), "200000");
    }
    assert_eq!(cgroup_file(a.qemu, "pids", "pids.max"), "256");
    let cgroups = [cgroup_of_a, cgroup_dir(b.qemu, "memory")];

    // As VM a's uid: nothing of VM b's is reachable, nor the node's own files of VM a; VM b's
    // QEMU cannot be inspected through /proc. The same paths exist (root sees them).
    let b_files = ["jail/console.log", "jail/qmp.sock", "jail/vsock.sock", "config.json"];
    for file in b_files {
        assert!(b.dir.join(file).exists(), "{file} exists");
        let (ok, err) = as_uid(uid_a as u32, &format!(": < {}", b.dir.join(file).display()));
        assert!(!ok && err.contains("Permission denied"), "uid {uid_a} opened b's {file}: {err}");
    }
    let (ok, err) = as_uid(uid_a as u32, &format!("echo x >> {}", a.dir.join("config.json").display()));
    assert!(!ok && err.contains("Permission denied"), "a VM's uid cannot touch the node's files: {err}");
    let (ok, err) = as_uid(uid_a as u32, &format!("ls /proc/{}/fd /proc/{}/root/", b.qemu, b.qemu));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    let (ok, _) = as_uid(uid_a as u32, &format!("ls /proc/{}/fd", a.qemu));
    assert!(ok, "the control: a's uid does reach its own QEMU's descriptors");

    // What VM a's processes can do to their own jail/ (from inside it, as they run): put a link
    // to a host file in place of the console. The node (root) reads the console for vm_logs and
    // must not follow it.
    let secret = tmp.path().join("host-secret");
    std::fs::write(&secret, "the host's secret\n").unwrap();
    let swap = format!(
        "cd {} && exec setpriv --reuid={uid_a} --regid={uid_a} --clear-groups sh -c 'mv console.log console.real && ln -s {} console.log'",
        a.dir.join("jail").display(),
        secret.display()
    );
    let swapped = std::process::Command::new("sh").args(["-c", &swap]).output().unwrap();
    assert!(swapped.status.success(), "{}", String::from_utf8_lossy(&swapped.stderr));
    let logs = common::call(&alice, "vm_logs", json!({"vm": "a"})).await;
    let said = format!("{logs:?}");
    assert!(!said.contains("the host's secret"), "the node read a host file through the VM's link: {said}");
    assert!(said.contains("is a symbolic link, not a regular file; not followed"), "{said}");

    // What the tools say: every protection on, for the node and for the running VM.
    let inspect = call_ok(&alice, "vm_inspect", json!({"vm": "a"})).await;
    let on: Vec<(&str, bool)> = inspect["vm"]["protections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["on"].as_bool().unwrap()))
        .collect();
    assert_eq!(on, [("user", true), ("seccomp", true), ("cgroup", true), ("files", true)], "{inspect}");
    assert!(inspect["vm"]["protections"][0]["detail"].as_str().unwrap().contains(&uid_a.to_string()));
    let node_inspect = call_ok(&admin, "node_inspect", json!({"node": "n1"})).await;
    let node_on = node_inspect["node"]["protections"].as_array().unwrap();
    assert_eq!(node_on.len(), 4, "{node_inspect}");
    assert!(node_on.iter().all(|p| p["on"] == true), "{node_inspect}");

    // A guest that eats memory without end is stopped inside its VM (the guest kernel's OOM
    // killer); its VM keeps running, its QEMU stays within the cgroup's limit, the other VM
    // never notices.
    let hog = call_ok(&alice, "vm_exec", json!({"vm": "a", "argv": ["tail", "/dev/zero"], "timeout_s": 120})).await;
    assert_eq!(hog["timed_out"], false, "{hog}");
    assert!(hog["signal"] == 9 || hog["exit_code"].as_i64().is_some_and(|c| c != 0), "the guest ends the hog: {hog}");
    let after = call_ok(&alice, "vm_exec", json!({"vm": "a", "argv": ["echo", "alive"]})).await;
    assert_eq!(after["stdout"], "alive\n", "the guest survives its OOM");
    assert_eq!(status(a.qemu, "Uid:"), uid_a, "the same QEMU process runs VM a");
    let rss_kib = status(a.qemu, "VmRSS:");
    eprintln!("QEMU RSS {rss_kib} KiB");
    assert!(rss_kib * 1024 < (MEMORY_MIB + MEMORY_OVERHEAD_MIB) << 20, "QEMU within its limit: {rss_kib} KiB");
    let other = call_ok(&alice, "vm_exec", json!({"vm": "b", "argv": ["echo", "fine"]})).await;
    assert_eq!(other["stdout"], "fine\n");

    // Deleting the VMs gives back their uids and cgroups.
    for (name, uid, cgroup) in [("a", uid_a, &cgroups[0]), ("b", uid_b, &cgroups[1])] {
        call_ok(&alice, "vm_delete", json!({"vm": name})).await;
        let claim = Path::new("/run/moat/vm-uids").join(uid.to_string());
        assert!(!claim.exists(), "{} still claimed", claim.display());
        assert!(!cgroup.exists(), "{} removed", cgroup.display());
    }
}

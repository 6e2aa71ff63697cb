//! Workspaces end to end on real btrfs: a loop-mounted btrfs made by the test holds a node's
//! storage; the Debian image is imported; a VM boots (QEMU, TCG) from a workspace, gets a file
//! through the guest agent and runs apt-get and python3; a fork boots in a second VM and sees
//! the file while the fork's own change stays out of the original; attachments, ownership and
//! bad input are refused with reasons; a throw-away root goes with its VM. A second test runs
//! the embedded node on ext4, where workspaces are copies and node_inspect says so.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code spawns binaries

mod common;

use std::path::Path;

use common::node::Node;
use common::{Home, call_err, call_ok, debian_image, tool_error};
use moat_node::testing::{LoopFs, images_with_base, until};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

/// Whether `path` exists in the ext4 filesystem in `disk`, asked of e2fsprogs' debugfs (the
/// host reads the workspace's bytes; no VM needed).
fn in_disk(disk: &Path, path: &str) -> bool {
    let out = std::process::Command::new("debugfs")
        .args(["-R", &format!("stat {path}"), disk.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    text.contains("Inode:") && !text.contains("File not found")
}

#[tokio::test]
async fn workspaces_on_btrfs_boot_fork_and_stay_apart() {
    let Some(btrfs) = LoopFs::new("mkfs.btrfs", 6144) else { return };
    let debian = debian_image();
    let home = Home::new();
    let tmp = tempfile::tempdir().unwrap();
    home.run(&["pki", "init"]).await;
    let images = images_with_base(tmp.path());
    let storage = btrfs.path().join("storage");
    let mut n1 = Node::enroll_and_start(
        &home,
        tmp.path(),
        "n1",
        &["--images", images.to_str().unwrap(), "--accel", "tcg", "--storage", storage.to_str().unwrap()],
    )
    .await;
    let moat = home.http_server(&[]).await;
    let admin = moat.client(&moat.key).await;
    let alice_key = home.key("alice", "agent").await;
    let alice = moat.client(&alice_key).await;
    let bob = moat.client(&home.key("bob", "agent").await).await;

    // The node says how it makes workspaces.
    let node = call_ok(&admin, "node_inspect", json!({"node": "n1"})).await;
    assert_eq!(node["node"]["storage"]["workspace_method"], "snapshot", "{node}");

    // Images: import, refuse what is not ext4, agents cannot import at all.
    let junk = tmp.path().join("junk.img");
    std::fs::write(&junk, vec![0u8; 1 << 20]).unwrap();
    let err = tool_error(&admin, "image_import", json!({"name": "junk", "source": junk, "node": "n1"})).await;
    assert!(err.contains("is not an ext4 filesystem"), "{err}");
    let (code, _, _) = call_err(&alice, "image_import", json!({"name": "mine", "source": debian, "node": "n1"})).await;
    assert_eq!(code, -32602, "agents never import (an import reads a host path)");
    let image = call_ok(&admin, "image_import", json!({"name": "debian", "source": debian, "node": "n1"})).await;
    assert_eq!(
        (image["image"]["kind"].as_str(), image["image"]["sha256"].as_str().map(str::len)),
        (Some("disk"), Some(64))
    );
    let listed = call_ok(&alice, "image_list", json!({})).await;
    let kinds: Vec<(String, String)> = listed["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["name"].as_str().unwrap().into(), i["kind"].as_str().unwrap().into()))
        .collect();
    assert!(
        kinds.contains(&("debian".into(), "disk".into())) && kinds.contains(&("base".into(), "initramfs".into())),
        "{kinds:?}"
    );

    // Bad input changes nothing.
    let (code, message, _) = call_err(&alice, "workspace_create", json!({"name": "a/b", "image": "debian"})).await;
    assert_eq!(code, -32602, "{message}");
    let (code, _, _) = call_err(&alice, "workspace_create", json!({"name": "a".repeat(64), "image": "debian"})).await;
    assert_eq!(code, -32602);
    let err = tool_error(&alice, "workspace_create", json!({"name": "x", "image": "nosuch"})).await;
    assert!(err.contains("no image named `nosuch`"), "{err}");
    let err = tool_error(&alice, "workspace_create", json!({"name": "x", "image": "base"})).await;
    assert!(err.contains("initramfs image"), "{err}");
    let err = tool_error(&alice, "workspace_create", json!({"name": "huge", "image": "debian", "size_gib": 100})).await;
    assert!(err.contains("workspace GiB would be 100 of your 64"), "{err}");
    assert_eq!(call_ok(&alice, "workspace_list", json!({})).await["workspaces"], json!([]));

    // A workspace, grown to 2 GiB, booted; a file goes in; Debian's tools run.
    let dev = call_ok(&alice, "workspace_create", json!({"name": "dev", "image": "debian", "size_gib": 2})).await;
    let dev_id = dev["workspace"]["id"].as_str().unwrap().to_string();
    assert_eq!(dev["workspace"]["method"], "snapshot");
    assert_eq!(dev["workspace"]["size_bytes"], 2u64 << 30);
    assert_eq!(dev["workspace"]["lineage"], json!(["debian"]));
    let args = json!({"name": "one", "vcpus": 1, "memory_mib": 512, "workspace": "dev", "wait_ready": true});
    let one = call_ok(&alice, "vm_create", args).await;
    assert_eq!(one["vm"]["workspace"], "dev", "{one}");
    let write = json!({"vm": "one", "path": "/root/note.txt", "content": "written in one\n"});
    call_ok(&alice, "vm_file_write", write).await;
    let apt = call_ok(&alice, "vm_exec", json!({"vm": "one", "argv": ["apt-get", "--version"]})).await;
    assert!(apt["exit_code"] == 0 && apt["stdout"].as_str().unwrap().starts_with("apt "), "{apt}");
    let py = call_ok(&alice, "vm_exec", json!({"vm": "one", "argv": ["python3", "-c", "print(6 * 7)"]})).await;
    assert_eq!(py["stdout"], "42\n", "{py}");
    let df = call_ok(&alice, "vm_exec", json!({"vm": "one", "command": "df -k / | tail -1"})).await;
    let root_kib: u64 = df["stdout"].as_str().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(root_kib > 1_800_000, "the root filesystem was not grown to 2 GiB: {df}");

    // Attached and running: not deletable, not attachable read-write elsewhere.
    let err = tool_error(&alice, "workspace_delete", json!({"workspace": "dev"})).await;
    assert!(err.contains("not stopped") && err.contains("one"), "{err}");
    let args =
        json!({"name": "two", "vcpus": 1, "memory_mib": 256, "data_workspaces": [{"name": "dev"}], "start": false});
    let err = tool_error(&alice, "vm_create", args).await;
    assert!(err.contains("is attached root to vm"), "{err}");
    let listed = call_ok(&alice, "vm_list", json!({})).await;
    assert_eq!(listed["vms"][0]["workspace"], "dev", "vm_list shows what a VM boots from: {listed}");
    let stopped = call_ok(&alice, "vm_stop", json!({"vm": "one"})).await;
    assert_eq!(stopped["vm"]["state"], "stopped", "{stopped}");
    let inspected = call_ok(&alice, "workspace_inspect", json!({"workspace": "dev"})).await;
    assert_eq!(inspected["workspace"]["attached"][0]["how"], "root", "{inspected}");
    assert!(inspected["workspace"]["exclusive_bytes"].as_u64().is_some(), "btrfs tells exclusive bytes: {inspected}");

    // A fork sees the file; its own change stays out of the original.
    let fork = call_ok(&alice, "workspace_fork", json!({"workspace": "dev", "name": "dev-fork"})).await;
    assert_eq!(fork["workspace"]["lineage"], json!(["debian", dev_id]), "{fork}");
    let args = json!({"name": "forked", "vcpus": 1, "memory_mib": 512, "workspace": "dev-fork", "wait_ready": true});
    call_ok(&alice, "vm_create", args).await;
    let read = call_ok(&alice, "vm_file_read", json!({"vm": "forked", "path": "/root/note.txt"})).await;
    assert_eq!(read["content"], "written in one\n");
    call_ok(&alice, "vm_file_write", json!({"vm": "forked", "path": "/root/fork-only.txt", "content": "x"})).await;
    call_ok(&alice, "vm_stop", json!({"vm": "forked"})).await;
    let dev_disk = storage.join("workspaces").join(&dev_id).join("rootfs.ext4");
    let fork_disk = storage.join("workspaces").join(fork["workspace"]["id"].as_str().unwrap()).join("rootfs.ext4");
    assert!(in_disk(&dev_disk, "/root/note.txt") && in_disk(&fork_disk, "/root/fork-only.txt"));
    assert!(!in_disk(&dev_disk, "/root/fork-only.txt"), "the fork's change reached the original");

    // moat-node killed in the middle of a fork (held at a rename by strace): the caller is told,
    // no row stays, and the restarted node leaves no half-made workspace.
    let mut strace = tokio::process::Command::new("strace")
        .args(["-f", "-p", &n1.pid().to_string(), "-e", "trace=rename,renameat,renameat2"])
        .args(["-e", "inject=rename,renameat,renameat2:delay_enter=3000000", "-o", "/dev/null"])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("strace is installed (.ci/setup)");
    // Kept open until strace is killed: strace dies of SIGPIPE writing to a closed pipe.
    let mut strace_says = tokio::io::BufReader::new(strace.stderr.take().unwrap()).lines();
    while let Some(line) = strace_says.next_line().await.unwrap() {
        if line.contains("attached") {
            break;
        }
    }
    let held = moat.client(&alice_key).await;
    let fork_call = tokio::spawn(async move {
        let answer = tool_error(&held, "workspace_fork", json!({"workspace": "dev", "name": "interrupted"})).await;
        held.cancel().await.unwrap();
        answer
    });
    let started = std::time::Instant::now();
    while std::fs::read_dir(storage.join("tmp")).unwrap().count() == 0 {
        assert!(!fork_call.is_finished(), "the fork ended before the node was killed: {:?}", fork_call.await);
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "the node never started the fork");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    n1.kill().await;
    strace.kill().await.unwrap();
    drop(strace_says);
    let told = fork_call.await.unwrap();
    assert!(told.contains("n1"), "the caller is told the fork did not finish: {told}");
    n1.start().await;
    until("n1 to answer again", std::time::Duration::from_secs(30), async || {
        common::call(&admin, "node_inspect", json!({"node": "n1"})).await.is_ok_and(|r| r.is_error != Some(true))
    })
    .await;
    assert_eq!(std::fs::read_dir(storage.join("tmp")).unwrap().count(), 0, "a half-made fork outlived the restart");
    assert_eq!(std::fs::read_dir(storage.join("workspaces")).unwrap().count(), 2, "only dev and dev-fork");
    let names = call_ok(&alice, "workspace_list", json!({})).await.to_string();
    assert!(!names.contains("interrupted"), "a row outlived the failed fork: {names}");

    // Another owner learns nothing and touches nothing.
    assert_eq!(call_ok(&bob, "workspace_list", json!({})).await["workspaces"], json!([]));
    for (tool, args) in [
        ("workspace_inspect", json!({"workspace": "dev"})),
        ("workspace_inspect", json!({"workspace": dev_id})),
        ("workspace_delete", json!({"workspace": dev_id})),
        ("workspace_fork", json!({"workspace": dev_id, "name": "stolen"})),
    ] {
        let err = tool_error(&bob, tool, args.clone()).await;
        assert!(err.starts_with("no workspace named"), "{tool} {args}: {err}");
    }
    let args = json!({"name": "steal", "vcpus": 1, "memory_mib": 256, "workspace": dev_id, "start": false});
    let err = tool_error(&bob, "vm_create", args).await;
    assert!(err.starts_with("no workspace named"), "{err}");
    let listed = call_ok(&bob, "image_list", json!({})).await;
    assert!(listed.to_string().contains("debian") && !listed.to_string().contains("dev-fork"), "{listed}");

    // Read-only in any number of VMs, read-write in one; the busybox image mounts it.
    call_ok(&alice, "vm_delete", json!({"vm": "forked"})).await;
    let args = json!({"name": "ro", "vcpus": 1, "memory_mib": 256, "data_workspaces": [{"name": "dev-fork", "read_only": true}], "wait_ready": true});
    call_ok(&alice, "vm_create", args).await;
    let seen = call_ok(
        &alice,
        "vm_exec",
        json!({"vm": "ro", "command": "cat /workspaces/dev-fork/root/note.txt; touch /workspaces/dev-fork/x"}),
    )
    .await;
    assert!(seen["stdout"] == "written in one\n" && seen["exit_code"] != 0, "mounted read-only: {seen}");
    let args = json!({"name": "ro2", "vcpus": 1, "memory_mib": 256, "data_workspaces": [{"name": "dev-fork", "read_only": true}], "start": false});
    call_ok(&alice, "vm_create", args).await;
    let args =
        json!({"name": "rw", "vcpus": 1, "memory_mib": 256, "data_workspaces": [{"name": "dev-fork"}], "start": false});
    let err = tool_error(&alice, "vm_create", args).await;
    assert!(err.contains("attached read-only to vm"), "{err}");

    // A VM on the disk image boots from a throw-away copy that goes with it.
    let args = json!({"name": "scratch", "vcpus": 1, "memory_mib": 256, "image": "debian", "start": false});
    let scratch = call_ok(&alice, "vm_create", args).await;
    let scratch_root = storage.join("vm-roots").join(scratch["vm"]["id"].as_str().unwrap());
    assert!(scratch_root.join("rootfs.ext4").is_file());
    call_ok(&alice, "vm_delete", json!({"vm": "scratch"})).await;
    assert!(!scratch_root.exists(), "the throw-away root outlived its VM");

    // The image can go while workspaces descend from it; their lineage stays.
    call_ok(&admin, "image_delete", json!({"image": "debian"})).await;
    let dev = call_ok(&alice, "workspace_inspect", json!({"workspace": "dev"})).await;
    assert_eq!(dev["workspace"]["image"], "debian");

    // Deleting: stopped VMs no longer hold it; nothing is left on the node.
    for vm in ["one", "ro", "ro2"] {
        call_ok(&alice, "vm_delete", json!({"vm": vm})).await;
    }
    // A lineage stays whole when an ancestor is deleted.
    let grandchild = call_ok(&alice, "workspace_fork", json!({"workspace": "dev-fork", "name": "dev-fork-2"})).await;
    let fork_id = fork["workspace"]["id"].as_str().unwrap();
    let whole = json!(["debian", dev_id, fork_id]);
    assert_eq!(grandchild["workspace"]["lineage"], whole);
    for ws in ["dev-fork", "dev"] {
        call_ok(&alice, "workspace_delete", json!({"workspace": ws})).await;
    }
    let kept = call_ok(&alice, "workspace_inspect", json!({"workspace": "dev-fork-2"})).await;
    assert_eq!(kept["workspace"]["lineage"], whole, "deleting ancestors cut the lineage: {kept}");
    call_ok(&alice, "workspace_delete", json!({"workspace": "dev-fork-2"})).await;
    assert_eq!(std::fs::read_dir(storage.join("workspaces")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(storage.join("tmp")).unwrap().count(), 0);
    drop(n1);
}

/// On ext4 the embedded node copies, says so in node_inspect and workspace_inspect, and a
/// filesystem too small for the copy fails the create with nothing left behind.
#[tokio::test]
async fn workspaces_on_ext4_are_copies_and_a_full_disk_leaves_nothing() {
    let Some(ext4) = LoopFs::new("mkfs.ext4", 256) else { return };
    let home = Home::new();
    let storage = ext4.path().join("storage");
    let client = home.stdio_client(&["--node-storage", storage.to_str().unwrap()]).await;
    let node = call_ok(&client, "node_inspect", json!({"node": "local"})).await;
    assert_eq!(node["node"]["storage"]["workspace_method"], "copy", "{node}");
    assert!(node["node"]["storage"]["workspace_detail"].as_str().unwrap().contains("put the storage root on btrfs"));

    // An image of 64 MiB of random bytes: one copy fits, a third does not.
    let tree = home.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let mut noise = vec![0u8; 64 << 20];
    getrandom::fill(&mut noise).unwrap();
    std::fs::write(tree.join("blob"), &noise).unwrap();
    let image = call_ok(&client, "image_import", json!({"name": "noise", "source": tree})).await;
    assert_eq!(image["image"]["kind"], "disk");
    let a = call_ok(&client, "workspace_create", json!({"name": "a", "image": "noise"})).await;
    assert_eq!(a["workspace"]["method"], "copy");
    let mut full = None;
    for name in ["b", "c", "d"] {
        match common::call(&client, "workspace_create", json!({"name": name, "image": "noise"})).await.unwrap() {
            r if r.is_error == Some(true) => {
                full = Some(format!("{:?}", r.content));
                break;
            }
            _ => {}
        }
    }
    let full = full.expect("the loop filesystem never filled up");
    assert!(full.contains("is full"), "{full}");
    let listed = call_ok(&client, "workspace_list", json!({})).await;
    let names: Vec<&str> =
        listed["workspaces"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    let on_disk = std::fs::read_dir(storage.join("workspaces")).unwrap().count();
    assert_eq!(on_disk, names.len(), "a row or a directory outlived the failed create: {names:?}");
    assert_eq!(std::fs::read_dir(storage.join("tmp")).unwrap().count(), 0, "a half copy stayed");
    client.cancel().await.unwrap();
}

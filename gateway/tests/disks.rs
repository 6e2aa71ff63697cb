//! DiskLayouts end to end, with loop devices as disks: `moat serve` (stdio, the operator) and a
//! separately started, controller-managed `moat-node` over mTLS whose storage is a loop-mounted
//! btrfs. The tools plan and apply a GPT layout with two partitions to a blank loop disk (lsblk
//! and blkid then show exactly that); refuse, before anything is stored and without writing a
//! byte, a mounted disk, an LVM PV, active swap and the disk holding the node's workspace
//! storage, and one mounted only in another mount namespace; store a layout while the node is down, which the node itself refuses when it comes
//! back (the disk got mounted meanwhile), and apply its retry; refuse an installer-only node; and
//! answer bad input clearly. Every disk the test writes is one of its own loop devices.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::node::Node;
use common::{Home, call_err, call_ok, tool_error};
use moat_node::testing::{LoopDisk, LoopFs, first_mib, root_and, sh, until};
use serde_json::{Value, json};

/// Undoes a test's `swapon` / `pvcreate` on drop, even when the test fails.
struct Undo(Vec<Vec<String>>);

impl Drop for Undo {
    fn drop(&mut self) {
        for argv in &self.0 {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let _ = moat_node::cmd::probe_blocking(&argv, Duration::from_secs(30));
        }
    }
}

/// A process holding a mount in a namespace of its own; killed (its mount goes with it) and
/// reaped on drop.
struct Holder(std::process::Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A mounted filesystem frozen (`fsfreeze`): flushed, and its kernel writes nothing (superblock
/// times included) until it is thawed on drop, so its disk's bytes can be compared.
struct Frozen(String);

impl Frozen {
    fn new(mountpoint: &std::path::Path) -> Frozen {
        let mountpoint = mountpoint.display().to_string();
        sh(&["fsfreeze", "-f", &mountpoint]);
        Frozen(mountpoint)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = moat_node::cmd::probe_blocking(&["fsfreeze", "-u", &self.0], Duration::from_secs(30));
    }
}

fn layout(name: &str, node: &str, device: &str, partitions: Value) -> Value {
    json!({"kind": "DiskLayout", "metadata": {"name": name},
           "spec": {"node": node, "disks": [{"device": device, "partitions": partitions}]}})
}

fn two_partitions(label: &str) -> Value {
    json!([
        {"name": "data", "size": "64MiB", "filesystem": "ext4", "label": label, "mountpoint": "/srv/data"},
        {"name": "logs", "size": "rest", "filesystem": "xfs", "label": "logs"}
    ])
}

/// lsblk's partitions of `disk`: (name, size in bytes).
fn partitions(disk: &str) -> Vec<(String, u64)> {
    let out: Value =
        serde_json::from_str(&sh(&["lsblk", "-J", "-b", "-l", "-o", "KNAME,TYPE,SIZE,PKNAME", disk])).unwrap();
    out["blockdevices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["type"] == "part")
        .map(|d| (d["kname"].as_str().unwrap().to_string(), d["size"].as_u64().unwrap()))
        .collect()
}

/// What blkid reads on `device`: (TYPE, LABEL, PART_ENTRY_NAME).
fn blkid(device: &str) -> (String, String, String) {
    let out = sh(&["blkid", "-p", "-o", "export", device]);
    let field =
        |key: &str| out.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).unwrap_or_default().to_string();
    (field("TYPE"), field("LABEL"), field("PART_ENTRY_NAME"))
}

fn device<'a>(listed: &'a Value, name: &str) -> &'a Value {
    listed["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("{name}: {listed}"))
}

fn codes(device: &Value) -> Vec<String> {
    device["reasons"].as_array().into_iter().flatten().map(|r| r["code"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn layouts_are_planned_applied_refused_and_reconciled_on_loop_disks() {
    let tools = [
        "losetup",
        "sfdisk",
        "partx",
        "blkid",
        "lsblk",
        "mkfs.ext4",
        "mkfs.xfs",
        "mkswap",
        "swapon",
        "pvcreate",
        "fsfreeze",
        "unshare",
    ];
    if !root_and(&tools) {
        return;
    }
    let Some(storage) = LoopFs::new("mkfs.btrfs", 256) else { return };
    let home = Home::new();
    home.run(&["pki", "init"]).await;
    let tmp = tempfile::tempdir().unwrap();
    let store = storage.path().to_str().unwrap().to_string();
    let mut node = Node::enroll_and_start(
        &home,
        tmp.path(),
        "disks-1",
        &["--disk-management", "controller-managed", "--storage", &store],
    )
    .await;
    let client = home.stdio_client(&[]).await;
    let free = LoopDisk::new(512);

    // disk_list: the blank disk is free; the host's root disk, and the disk under the node's
    // workspace storage, are in use and say why.
    let listed = call_ok(&client, "disk_list", json!({"node": "disks-1"})).await;
    assert_eq!(listed["management"], "controller-managed");
    assert_eq!(device(&listed, free.name())["in_use"], false, "{listed}");
    assert!(
        listed["devices"].as_array().unwrap().iter().any(|d| codes(d).contains(&"holds_root".to_string())),
        "the root filesystem's disk is named: {listed}"
    );
    let storage_dev = device(&listed, storage.device().trim_start_matches("/dev/"));
    assert!(codes(storage_dev).contains(&"workspace_storage".to_string()), "{storage_dev}");

    // Plan: safe, the steps, and the disko expression; YAML text plans the same.
    let data = layout("data", "disks-1", free.path(), two_partitions("data"));
    let plan = call_ok(&client, "disk_layout_plan", json!({"layout": data})).await;
    assert_eq!(plan["verdict"], "safe", "{plan}");
    assert_eq!(plan["snapshot_source"], "node");
    let actions = plan["actions"].as_array().unwrap();
    assert!(actions.iter().any(|a| a.as_str().unwrap().contains("mkfs.xfs")), "{plan}");
    assert!(plan["disko"].as_str().unwrap().contains(&format!("device = \"{}\";", free.path())), "{plan}");
    let yaml = format!(
        "kind: DiskLayout\nmetadata:\n  name: data\nspec:\n  node: disks-1\n  disks:\n    - device: {}\n      \
         partitions:\n        - {{name: data, size: 64MiB, filesystem: ext4, label: data, mountpoint: /srv/data}}\n        \
         - {{name: logs, size: rest, filesystem: xfs, label: logs}}\n",
        free.path()
    );
    let from_yaml = call_ok(&client, "disk_layout_plan", json!({"layout": yaml})).await;
    assert_eq!(from_yaml["disko"], plan["disko"]);

    // Without confirm nothing happens.
    let unconfirmed = tool_error(&client, "disk_layout_apply", json!({"layout": data})).await;
    assert!(unconfirmed.contains("confirm: true"), "{unconfirmed}");
    assert_eq!(call_ok(&client, "disk_layout_list", json!({})).await["layouts"], json!([]));
    assert!(first_mib(free.path()).iter().all(|b| *b == 0));

    // Apply: the node writes exactly that.
    let applied = call_ok(&client, "disk_layout_apply", json!({"layout": data, "confirm": true})).await;
    let status = &applied["layout"];
    assert_eq!(
        (status["phase"].as_str(), status["generation"].as_u64(), status["observedGeneration"].as_u64()),
        (Some("Applied"), Some(1), Some(1)),
        "{applied}"
    );
    let p1 = format!("{}p1", free.path());
    let p2 = format!("{}p2", free.path());
    assert_eq!(
        partitions(free.path()),
        [(format!("{}p1", free.name()), 64 << 20), (format!("{}p2", free.name()), 446 << 20)]
    );
    assert_eq!(blkid(&p1), ("ext4".into(), "data".into(), "data".into()));
    assert_eq!(blkid(&p2), ("xfs".into(), "logs".into(), "logs".into()));
    let listed = call_ok(&client, "disk_list", json!({"node": "disks-1"})).await;
    assert_eq!(
        device(&listed, free.name())["partitions"],
        json!([format!("{}p1", free.name()), format!("{}p2", free.name())])
    );
    assert_eq!(device(&listed, &format!("{}p2", free.name()))["fstype"], "xfs", "{listed}");

    // The same spec again is the same generation, not applied twice; a changed one is the next.
    let again = call_ok(&client, "disk_layout_apply", json!({"layout": data, "confirm": true})).await;
    assert_eq!(again["layout"]["generation"], 1);
    assert_eq!(again["layout"]["phase"], "Applied");
    let relabelled = layout("data", "disks-1", free.path(), two_partitions("data2"));
    let second = call_ok(&client, "disk_layout_apply", json!({"layout": relabelled, "confirm": true})).await;
    assert_eq!(
        (second["layout"]["generation"].as_u64(), second["layout"]["phase"].as_str()),
        (Some(2), Some("Applied"))
    );
    assert_eq!(blkid(&p1).1, "data2");

    // Disks in use are refused before anything is stored, and not a byte is written.
    let mounted = LoopFs::new("mkfs.ext4", 64).expect("an ext4 loop filesystem");
    let lvm = LoopDisk::new(64);
    let swap = LoopDisk::new(64);
    let _undo =
        Undo(vec![vec!["swapoff".into(), swap.path().into()], vec!["pvremove".into(), "-y".into(), lvm.path().into()]]);
    sh(&["pvcreate", "-y", lvm.path()]);
    sh(&["mkswap", swap.path()]);
    sh(&["swapon", swap.path()]);
    let storage_disk = storage.device().to_string();
    for (dev, code) in [
        (mounted.device(), "mounted"),
        (lvm.path(), "lvm_pv"),
        (swap.path(), "active_swap"),
        (storage_disk.as_str(), "workspace_storage"),
    ] {
        let _still = match code {
            "mounted" => Some(Frozen::new(mounted.path())),
            "workspace_storage" => Some(Frozen::new(storage.path())),
            _ => None,
        };
        let before = first_mib(dev);
        let busy = layout("busy", "disks-1", dev, json!([{"size": "rest", "filesystem": "ext4"}]));
        let planned = call_ok(&client, "disk_layout_plan", json!({"layout": busy})).await;
        assert_eq!(planned["verdict"], "refused", "{dev}: {planned}");
        let planned_codes: Vec<&str> =
            planned["refusals"].as_array().unwrap().iter().map(|r| r["code"].as_str().unwrap()).collect();
        assert!(planned_codes.contains(&code), "{dev}: {planned}");
        let refused = tool_error(&client, "disk_layout_apply", json!({"layout": busy, "confirm": true})).await;
        assert!(refused.contains(&format!("({code})")) && refused.contains("Nothing was stored"), "{dev}: {refused}");
        assert!(first_mib(dev) == before, "{dev} was written to");
    }
    // A disk mounted only inside another mount namespace (a container's, say) is in use too.
    let hidden = LoopDisk::new(64);
    sh(&["mkfs.ext4", "-q", "-F", hidden.path()]);
    let hidden_mp = tempfile::tempdir().unwrap();
    let mut holder = Holder(
        std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!("mount {} {} && echo mounted && exec sleep 120", hidden.path(), hidden_mp.path().display()))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.0.stdout.take().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "mounted");
    assert!(!sh(&["cat", "/proc/self/mounts"]).contains(hidden.path()), "mounted only in the other namespace");
    let busy = layout("busy", "disks-1", hidden.path(), json!([{"size": "rest", "filesystem": "ext4"}]));
    let planned = call_ok(&client, "disk_layout_plan", json!({"layout": busy})).await;
    assert_eq!(planned["refusals"][0]["code"], "mounted", "{planned}");
    assert!(planned["refusals"][0]["detail"].as_str().unwrap().contains("mount namespace of pid"), "{planned}");
    let refused = tool_error(&client, "disk_layout_apply", json!({"layout": busy, "confirm": true})).await;
    assert!(refused.contains("(mounted)"), "{refused}");

    let names: Vec<Value> = call_ok(&client, "disk_layout_list", json!({})).await["layouts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].clone())
        .collect();
    assert_eq!(names, [json!("data")]);

    // The node is authoritative, and catches up when it returns: a layout stored while it is
    // down (judged on its last snapshot, where the disk was free) is refused by the node itself
    // once the disk got mounted meanwhile, and nothing is written.
    let late = LoopDisk::new(128);
    call_ok(&client, "disk_list", json!({"node": "disks-1"})).await;
    node.stop().await;
    let late_layout =
        layout("late", "disks-1", late.path(), json!([{"size": "rest", "filesystem": "ext4", "label": "late"}]));
    let pending = call_ok(&client, "disk_layout_apply", json!({"layout": late_layout, "confirm": true})).await;
    assert_eq!(pending["layout"]["phase"], "Pending", "{pending}");
    assert!(pending["note"].as_str().unwrap().contains("did not answer"), "{pending}");
    sh(&["mkfs.ext4", "-q", "-F", late.path()]);
    let mountpoint = tempfile::tempdir().unwrap();
    sh(&["mount", late.path(), mountpoint.path().to_str().unwrap()]);
    let _unmount = Undo(vec![vec!["umount".into(), mountpoint.path().display().to_string()]]);
    let frozen = Frozen::new(mountpoint.path());
    let before = first_mib(late.path());
    node.start().await;
    let mut seen = Value::Null;
    until("the node refuses the late layout", Duration::from_secs(60), async || {
        seen = call_ok(&client, "disk_layout_status", json!({"name": "late"})).await["layout"].clone();
        seen["phase"] == "Refused"
    })
    .await;
    assert_eq!(seen["observedGeneration"], 1, "{seen}");
    assert_eq!(seen["refusalReason"]["code"], "mounted", "{seen}");
    assert!(first_mib(late.path()) == before, "the refused disk was written to");
    drop(frozen);
    // Unmounted, the retry of the same spec is a new generation the node applies.
    sh(&["umount", mountpoint.path().to_str().unwrap()]);
    let retried = call_ok(&client, "disk_layout_apply", json!({"layout": late_layout, "confirm": true})).await;
    assert_eq!(
        (retried["layout"]["generation"].as_u64(), retried["layout"]["phase"].as_str()),
        (Some(2), Some("Applied")),
        "{retried}"
    );
    assert_eq!(blkid(&format!("{}p1", late.path())).1, "late");

    // An installer-only node (the embedded one) plans but never applies.
    let other = LoopDisk::new(64);
    let local = layout("local-data", "local", other.path(), json!([{"size": "rest", "filesystem": "ext4"}]));
    assert_eq!(call_ok(&client, "disk_layout_plan", json!({"layout": local})).await["verdict"], "safe");
    let installer = tool_error(&client, "disk_layout_apply", json!({"layout": local, "confirm": true})).await;
    assert!(
        installer.contains("installer_only") && installer.contains("--disk-management controller-managed"),
        "{installer}"
    );
    assert!(first_mib(other.path()).iter().all(|b| *b == 0));

    // Bad input: clear errors, nothing stored or applied.
    let unknown = layout("x", "disks-1", "/dev/disk/by-id/no-such-disk", json!([{"size": "rest"}]));
    let planned = call_ok(&client, "disk_layout_plan", json!({"layout": unknown})).await;
    assert_eq!(planned["refusals"][0]["code"], "unknown_device", "{planned}");
    let text = tool_error(&client, "disk_layout_apply", json!({"layout": unknown, "confirm": true})).await;
    assert!(text.contains("unknown_device") && text.contains("disk_list"), "{text}");
    let overlap = layout("x", "disks-1", other.path(), json!([{"size": "16MiB"}, {"size": "8MiB", "start": "8MiB"}]));
    let text = tool_error(&client, "disk_layout_plan", json!({"layout": overlap})).await;
    assert!(text.contains("inside partition 1"), "{text}");
    let oversized = layout("x", "disks-1", other.path(), json!([{"size": "1TiB"}]));
    let text = tool_error(&client, "disk_layout_apply", json!({"layout": oversized, "confirm": true})).await;
    assert!(text.contains("does not fit"), "{text}");
    let zfs = layout("x", "disks-1", other.path(), json!([{"size": "rest", "filesystem": "zfs"}]));
    let (code, _, _) = call_err(&client, "disk_layout_plan", json!({"layout": zfs})).await;
    assert_eq!(code, -32602, "an unsupported filesystem is a schema violation");
    let elsewhere = layout("x", "nowhere", other.path(), json!([{"size": "rest"}]));
    let text = tool_error(&client, "disk_layout_plan", json!({"layout": elsewhere})).await;
    assert!(text.contains("nowhere"), "{text}");
    let text = tool_error(&client, "disk_layout_plan", json!({"layout": "kind: [DiskLayout"})).await;
    assert!(text.contains("does not parse"), "{text}");
    let hostile =
        layout("x", "disks-1", other.path(), json!([{"size": "rest", "filesystem": "ext4", "label": "a\nb"}]));
    let text = tool_error(&client, "disk_layout_plan", json!({"layout": hostile})).await;
    assert!(text.contains("control character"), "{text}");
    let moved = layout("data", "local", other.path(), json!([{"size": "rest"}]));
    let text = tool_error(&client, "disk_layout_apply", json!({"layout": moved, "confirm": true})).await;
    assert!(text.contains("cannot move to another node"), "{text}");
    assert!(first_mib(other.path()).iter().all(|b| *b == 0));

    // Forgetting a layout leaves the disk as it is.
    let deleted = call_ok(&client, "disk_layout_delete", json!({"name": "data"})).await;
    assert_eq!(deleted["disks_untouched"], true);
    assert_eq!(partitions(free.path()).len(), 2);
    assert_eq!(blkid(&p2).0, "xfs");
    let gone = tool_error(&client, "disk_layout_status", json!({"name": "data"})).await;
    assert!(gone.contains("no disk layout named `data`"), "{gone}");
    let gone = tool_error(&client, "disk_layout_delete", json!({"name": "data"})).await;
    assert!(gone.contains("disk_layout_list"), "{gone}");
    client.cancel().await.unwrap();
    node.stop().await;
}

/// A node with the disko applier: the layout is written as a disko expression (which Nix reads
/// back) and the rebuild command runs; a generation stored while another is being applied waits
/// for it (the rebuild's own log shows no overlap); a failing rebuild is Failed with its words,
/// and the retry applies. A node that never reported its disks cannot be planned for.
#[tokio::test]
async fn disko_nodes_write_the_expression_and_generations_never_interleave() {
    if !root_and(&["losetup", "lsblk", "blkid", "nix-instantiate"]) {
        return;
    }
    let home = Home::new();
    home.run(&["pki", "init"]).await;
    let tmp = tempfile::tempdir().unwrap();
    let nix = tmp.path().join("etc/current.nix");
    let log = tmp.path().join("rebuild.log");
    let rebuild = tmp.path().join("rebuild.sh");
    let script = |body: &str| {
        std::fs::write(
            &rebuild,
            format!("#!/bin/sh\necho start >> {log}\n{body}\necho end >> {log}\n", log = log.display()),
        )
        .unwrap();
        sh(&["chmod", "0755", rebuild.to_str().unwrap()]);
    };
    script("sleep 2");
    let (nix_arg, rebuild_arg) = (nix.display().to_string(), rebuild.display().to_string());
    let _node = Node::enroll_and_start(
        &home,
        tmp.path(),
        "nix-1",
        &[
            "--disk-management",
            "controller-managed",
            "--disk-applier",
            "disko",
            "--disko-path",
            &nix_arg,
            "--disko-rebuild",
            &rebuild_arg,
        ],
    )
    .await;
    let mut moat = home.http_server(&[]).await;
    let disk = LoopDisk::new(64);
    let labelled = |label: &str| {
        layout(
            "nix",
            "nix-1",
            disk.path(),
            json!([{"size": "rest", "filesystem": "ext4", "label": label, "mountpoint": "/srv"}]),
        )
    };

    // Generation 2 is stored while generation 1's rebuild runs; it waits its turn.
    let first = moat.client(&moat.key).await;
    let one = labelled("one");
    let applying = tokio::spawn(async move {
        let out = call_ok(&first, "disk_layout_apply", json!({"layout": one, "confirm": true})).await;
        first.cancel().await.unwrap();
        out
    });
    until("the first rebuild starts", Duration::from_secs(30), async || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("start"))
    })
    .await;
    let second = moat.client(&moat.key).await;
    let two = call_ok(&second, "disk_layout_apply", json!({"layout": labelled("two"), "confirm": true})).await;
    assert_eq!(
        (two["layout"]["generation"].as_u64(), two["layout"]["observedGeneration"].as_u64()),
        (Some(2), Some(2)),
        "{two}"
    );
    assert_eq!(two["layout"]["phase"], "Applied", "{two}");
    applying.await.unwrap();
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "start\nend\nstart\nend\n", "one rebuild at a time");
    let written = std::fs::read_to_string(&nix).unwrap();
    assert!(written.contains("\"two\"") && written.contains(&format!("device = \"{}\";", disk.path())), "{written}");
    let value: Value =
        serde_json::from_str(&sh(&["nix-instantiate", "--eval", "--strict", "--json", nix.to_str().unwrap()])).unwrap();
    assert_eq!(
        value["disko"]["devices"]["disk"]["disk0"]["content"]["partitions"]["p1"]["content"]["mountpoint"],
        "/srv"
    );
    assert!(first_mib(disk.path()).iter().all(|b| *b == 0), "the disko applier writes no disk");

    // A failing rebuild is Failed, with what it said; once mended, the retry applies.
    script("echo 'rebuild broke: no such flake' >&2\nexit 1");
    let failed = call_ok(&second, "disk_layout_apply", json!({"layout": labelled("three"), "confirm": true})).await;
    assert_eq!(failed["layout"]["phase"], "Failed", "{failed}");
    assert_eq!(failed["layout"]["refusalReason"]["code"], "apply_failed");
    assert!(failed["layout"]["refusalReason"]["message"].as_str().unwrap().contains("rebuild broke"), "{failed}");
    script("true");
    let retried = call_ok(&second, "disk_layout_apply", json!({"layout": labelled("three"), "confirm": true})).await;
    assert_eq!(
        (retried["layout"]["generation"].as_u64(), retried["layout"]["phase"].as_str()),
        (Some(4), Some("Applied"))
    );

    // A node that has never answered has no snapshot to judge on: nothing is stored.
    let ghost_certs = tmp.path().join("ghost-certs");
    let address = format!("https://127.0.0.1:{}", moat_node::testing::free_port());
    let (ok, _, err) =
        home.run(&["node", "enroll", "ghost", "--address", &address, "--out", ghost_certs.to_str().unwrap()]).await;
    assert!(ok, "{err}");
    let ghost = layout("ghost", "ghost", "sdb", json!([{"size": "rest"}]));
    let text = tool_error(&second, "disk_layout_apply", json!({"layout": ghost, "confirm": true})).await;
    assert!(text.contains("unreachable") && text.contains("never reported its disks"), "{text}");
    let names: Vec<Value> = call_ok(&second, "disk_layout_list", json!({})).await["layouts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].clone())
        .collect();
    assert_eq!(names, [json!("nix")]);
    second.cancel().await.unwrap();
    assert!(moat.terminate().await.success());
}

//! A `moat-node` process for gateway tests: enrolled with the test gateway
//! (mutual TLS), started, stopped and signalled like a service manager would;
//! its VMs are reaped and its log printed when a test fails.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use moat_node::testing::{VmReaper, free_port};
use tokio::process::{Child, Command};

use super::{Home, MOAT};

/// A `moat-node` process enrolled with the gateway in `home`; its VMs are killed on drop.
pub struct Node {
    pub name: String,
    pub root: PathBuf,
    args: Vec<String>,
    /// Environment variables set for the process (e.g. a PATH without some tool).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    /// What moat-node logged, printed if the test fails.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Kills the node's VMMs and vsock daemons when the test ends, however it ends.
    _reaper: VmReaper,
}

impl Node {
    /// Enrolls `name` at a free port and starts it with `extra` arguments.
    pub async fn enroll_and_start(home: &Home, tmp: &Path, name: &str, extra: &[&str]) -> Node {
        Node::enroll_and_start_env(home, tmp, name, extra, &[]).await
    }

    /// As [`Node::enroll_and_start`], with `env` set for the process.
    pub async fn enroll_and_start_env(
        home: &Home,
        tmp: &Path,
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Node {
        let port = free_port();
        let certs = tmp.join(format!("{name}-certs"));
        let address = format!("https://127.0.0.1:{port}");
        let (ok, out, err) =
            home.run(&["node", "enroll", name, "--address", &address, "--out", certs.to_str().unwrap()]).await;
        assert!(ok && out.contains(&format!("enrolled node {name}")), "{out}{err}");
        let root = tmp.join(name);
        let mut args: Vec<String> =
            ["serve", "--name", name, "--listen", &format!("127.0.0.1:{port}"), "--certs"].map(String::from).into();
        args.push(certs.display().to_string());
        args.extend(["--storage-root".to_string(), root.display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let reaper = VmReaper(root.clone());
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut node =
            Node { name: name.into(), root, args, env, child: None, log: Default::default(), _reaper: reaper };
        node.start().await;
        node
    }

    pub async fn start(&mut self) {
        let binary = Path::new(MOAT).with_file_name("moat-node");
        assert!(binary.exists(), "no {}: build it with `cargo build -p moat-node`", binary.display());
        let mut child = Command::new(binary)
            .args(&self.args)
            .env("MOAT_LOG", "info,moat_node::uplink=debug,moat_node::api::tunnel=debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (_, log) = super::wait_for_field(&mut child, "moat-node listening", "listen=").await;
        self.log = log;
        self.child = Some(child);
    }

    /// SIGTERM and wait: what a service manager does on restart.
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("node running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
        let status = tokio::time::timeout(Duration::from_secs(15), child.wait()).await.unwrap().unwrap();
        assert!(status.success(), "moat-node {} exited {status}", self.name);
    }

    /// SIGKILL and wait: the node agent dies with no chance to tidy up.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("node running");
        child.kill().await.unwrap();
    }

    /// The node agent's pid while it runs.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).expect("node running")
    }

    /// SIGHUP: reload the node certificate.
    pub fn hangup(&self) {
        let pid = self.child.as_ref().and_then(|c| c.id()).expect("node running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    }

    pub fn logged_times(&self, needle: &str) -> usize {
        super::lines_with(&self.log, needle)
    }

    pub fn vmm_pid(&self, id: &str) -> i32 {
        std::fs::read_to_string(self.root.join("vms").join(id).join("vmm.pid")).unwrap().trim().parse().unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- moat-node {} log ---", self.name);
            for line in self.log.lock().map(|l| l.clone()).unwrap_or_default() {
                eprintln!("{line}");
            }
        }
    }
}

//! Test fixtures shared by the node agent's and the gateway's tests (feature
//! `testing`, enabled only by dev-dependencies): where the guest image is, an
//! images directory holding it, a reaper that kills every VMM and vsock daemon a
//! test's VMs recorded (even when the test fails), and polling with a deadline.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The base guest image the tests boot: `$MOAT_GUEST_IMAGE`, else `target/ci/guest-image`
/// (what `.ci/test` builds). Panics with the command that builds it when it is missing.
pub fn guest_image() -> PathBuf {
    let image = std::env::var_os("MOAT_GUEST_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ci/guest-image"));
    assert!(
        image.join("vmlinux").exists(),
        "no guest image in {}: build it with `moat image build --out {} --guest <static moat-guest>` (as root), \
         or set MOAT_GUEST_IMAGE",
        image.display(),
        image.display()
    );
    image
}

/// `dir/images` with the guest image as `base`, for a node's `--images`.
pub fn images_with_base(dir: &Path) -> PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).expect("the test directory is writable");
    let base = images.join("base");
    if !base.exists() {
        let image = guest_image().canonicalize().expect("the guest image path resolves");
        std::os::unix::fs::symlink(image, &base).expect("the test directory is writable");
    }
    images
}

/// Kills every VMM and vsock device daemon recorded under `<root>/vms` when dropped and removes
/// their cgroups and uid claims, so a failing test leaves no QEMU behind.
#[derive(Debug)]
pub struct VmReaper(pub PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        for entry in std::fs::read_dir(self.0.join("vms")).into_iter().flatten().flatten() {
            for file in ["vmm.pid", "vsock.pid"] {
                let pid =
                    std::fs::read_to_string(entry.path().join(file)).ok().and_then(|s| s.trim().parse::<i32>().ok());
                if let Some(pid) = pid
                    && pid > 0
                {
                    // SAFETY: kill(2) with a pid this test's VMs recorded and a constant signal.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            // Their cgroups and uid claims too (a node that ran them would have released them).
            let dir = crate::dir::VmDir::new(&self.0.join("vms"), &entry.file_name().to_string_lossy());
            crate::vmm::confine::Confinement::detect(crate::vmm::confine::DEFAULT_UID_BASE, Ok(())).release(&dir);
        }
    }
}

/// Polls `check` every 100 ms until it holds; fails the test naming `what` after `deadline`.
pub async fn until(what: &str, deadline: Duration, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether process `pid` exists.
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// A TCP port on loopback nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("loopback has a free port")
}

pub use crate::storage::loopfs::LoopFs;

/// A blank disk for one test: a sparse file on a loop device with partition scanning; its
/// partitions removed and the device detached when dropped, even when the test fails.
#[derive(Debug)]
pub struct LoopDisk {
    device: String,
    _backing: tempfile::TempDir,
}

impl LoopDisk {
    /// A `size_mib` disk of zeros. Panics when it cannot be made (callers check `root_and`).
    pub fn new(size_mib: u64) -> LoopDisk {
        let backing = tempfile::tempdir().expect("a temporary directory");
        let file = backing.path().join("disk.img");
        std::fs::File::create(&file).and_then(|f| f.set_len(size_mib << 20)).expect("a sparse disk file");
        let device = sh(&["losetup", "--find", "--show", "--partscan", file.to_str().expect("a UTF-8 path")]);
        LoopDisk { device: device.trim().to_string(), _backing: backing }
    }

    /// "/dev/loop3".
    pub fn path(&self) -> &str {
        &self.device
    }

    /// "loop3".
    pub fn name(&self) -> &str {
        self.device.trim_start_matches("/dev/")
    }
}

/// The first MiB of `device`, to show nothing was written to it.
pub fn first_mib(device: &str) -> Vec<u8> {
    use std::io::Read;
    let mut bytes = vec![0u8; 1 << 20];
    std::fs::File::open(device).and_then(|mut f| f.read_exact(&mut bytes)).expect("the device is readable");
    bytes
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = crate::cmd::probe_blocking(&["partx", "-d", &self.device], Duration::from_secs(30));
        let _ = crate::cmd::probe_blocking(&["losetup", "-d", &self.device], Duration::from_secs(30));
    }
}

/// A network namespace made for one test, deleted (with everything in it) when dropped.
#[derive(Debug)]
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: String) -> Netns {
        let _ = crate::cmd::probe_blocking(&["ip", "netns", "del", &name], Duration::from_secs(10));
        for argv in [vec!["ip", "netns", "add", &name], vec!["ip", "-n", &name, "link", "set", "lo", "up"]] {
            let out = crate::cmd::probe_blocking(&argv, Duration::from_secs(10));
            assert!(out.is_some_and(|o| o.status.success()), "{} failed", argv.join(" "));
        }
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = crate::cmd::probe_blocking(&["ip", "netns", "del", &self.0], Duration::from_secs(10));
    }
}

/// Runs `argv` (test set-up: `ip`, `nft`) and returns its stdout; panics with its stderr when it
/// fails.
pub fn sh(argv: &[&str]) -> String {
    let out = crate::cmd::probe_blocking(argv, Duration::from_secs(30));
    let out = out.unwrap_or_else(|| panic!("{} did not run", argv.join(" ")));
    assert!(out.status.success(), "{}: {}", argv.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether this test can run here: as root, with `tools` in PATH. Under `CI=true` a missing one
/// fails the test; elsewhere it is skipped with the reason printed.
pub fn root_and(tools: &[&str]) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            !crate::cmd::probe_blocking(&["sh", "-c", &format!("command -v {t}")], Duration::from_secs(5))
                .is_some_and(|o| o.status.success())
        })
        .collect();
    if root && missing.is_empty() {
        return true;
    }
    let why = format!("needs root and {} (missing: {missing:?}, root: {root})", tools.join(", "));
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("SKIP: {why}");
    false
}

/// TCP servers on `ports` inside namespace `ns` (python3): each connection is answered with
/// "hello <port>" and closed. Killed when dropped.
pub struct TcpServers(std::process::Child);

impl TcpServers {
    pub fn start(ns: &Netns, ports: &[u16]) -> TcpServers {
        let code = "import socket,sys,threading,time\ndef serve(p):\n s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', p)); s.listen(16)\n while True:\n  c,_=s.accept(); c.sendall(b'hello %d\\n' % p); c.close()\nfor p in sys.argv[1:]:\n threading.Thread(target=serve, args=(int(p),), daemon=True).start()\ntime.sleep(3600)";
        let mut args =
            vec!["netns".to_string(), "exec".into(), ns.0.clone(), "python3".into(), "-c".into(), code.into()];
        args.extend(ports.iter().map(u16::to_string));
        #[allow(clippy::disallowed_methods)] // a test's server, killed when dropped
        let child = std::process::Command::new("ip")
            .args(args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("ip netns exec runs");
        std::thread::sleep(Duration::from_millis(500));
        TcpServers(child)
    }
}

impl Drop for TcpServers {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a TCP client in namespace `ns` (from source address `from`, when given) reads from
/// `ip:port` within 3 s: "" when nothing answers. [`TcpServers`] answer "hello <port>".
pub fn tcp_read(ns: &Netns, from: Option<&str>, ip: &str, port: u16) -> String {
    let code = "import socket,sys\ntry:\n src=(sys.argv[3], 0) if len(sys.argv) > 3 else None\n s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3, source_address=src); print(s.recv(100).decode().strip())\nexcept Exception:\n pass";
    let port = port.to_string();
    let mut argv = vec!["ip", "netns", "exec", &ns.0, "python3", "-c", code, ip, &port];
    argv.extend(from);
    let out = crate::cmd::probe_blocking(&argv, Duration::from_secs(15));
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}

/// Links namespace `host` to namespace `out` as a host's uplink to the world outside: `up0`
/// (192.0.2.1/24) in `host`, `eth0` (192.0.2.2/24) in `out`, both up. The addresses are from
/// TEST-NET-1 and exist only in these two namespaces.
pub fn uplink(host: &Netns, out: &Netns) {
    sh(&["ip", "-n", &host.0, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", &out.0]);
    sh(&["ip", "-n", &host.0, "addr", "add", "192.0.2.1/24", "dev", "up0"]);
    sh(&["ip", "-n", &host.0, "link", "set", "up0", "up"]);
    sh(&["ip", "-n", &out.0, "addr", "add", "192.0.2.2/24", "dev", "eth0"]);
    sh(&["ip", "-n", &out.0, "link", "set", "eth0", "up"]);
}

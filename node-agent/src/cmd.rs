//! The one wrapper through which moat-node runs external programs.
//!
//! Takes argv (never a shell string) and a timeout, logs what it ran, and
//! kills the child if the timeout passes. `clippy.toml` bans spawning
//! processes anywhere else so every command moat runs is visible here.

use std::ffi::OsStr;
use std::process::Output;
use std::time::{Duration, Instant};

/// Why an external command could not produce output.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("`{program}` could not be started")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{program}` did not finish within {timeout:?} and was killed")]
    Timeout { program: String, timeout: Duration },
    #[error("waiting for `{program}` failed")]
    Wait {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `argv[0]` with the remaining arguments; stdin is closed, output captured.
///
/// A non-zero exit is not an error here: callers decide what a status means.
pub async fn run<S: AsRef<OsStr>>(argv: &[S], timeout: Duration) -> Result<Output, CmdError> {
    run_with_input(argv, None, timeout).await
}

/// As [`run`], with `input` written to the program's standard input (then closed).
pub async fn run_with_input<S: AsRef<OsStr>>(
    argv: &[S],
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, CmdError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(CmdError::Spawn {
            program: String::new(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty argv"),
        });
    };
    let shown = program.as_ref().to_string_lossy().into_owned();
    let started = Instant::now();
    #[allow(clippy::disallowed_methods)] // this is the one sanctioned place
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(if input.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|source| CmdError::Spawn { program: shown.clone(), source })?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        use tokio::io::AsyncWriteExt;
        // A program that exits without reading all of it reports that through its status.
        let _ = tokio::time::timeout(timeout, stdin.write_all(input)).await;
    }
    let result = tokio::time::timeout(timeout, child.wait_with_output()).await;
    let elapsed = started.elapsed();
    match result {
        Err(_) => {
            tracing::warn!(program = %shown, ?timeout, "command timed out; killed");
            Err(CmdError::Timeout { program: shown, timeout })
        }
        Ok(Err(source)) => Err(CmdError::Wait { program: shown, source }),
        Ok(Ok(output)) => {
            tracing::debug!(
                argv = ?argv.iter().map(|a| a.as_ref().to_string_lossy()).collect::<Vec<_>>(),
                status = ?output.status.code(),
                ?elapsed,
                "ran command"
            );
            Ok(output)
        }
    }
}

/// Runs a short probe (`qemu -help`, say) synchronously, for start-up detection outside an async
/// context; killed after `timeout`. None when it cannot be run or does not finish.
pub fn probe_blocking(argv: &[&str], timeout: Duration) -> Option<Output> {
    let (program, args) = argv.split_first()?;
    #[allow(clippy::disallowed_methods)] // this is the one sanctioned place
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    let started = Instant::now();
    while child.try_wait().ok()?.is_none() {
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().ok()
}

/// How [`spawn_detached`] walls in what it starts (see `vmm::confine`).
#[derive(Debug, Clone, Default)]
pub struct Confine {
    /// Entered before privileges are dropped: the program reaches its files by relative path,
    /// and needs no right to the directories above.
    pub cwd: std::path::PathBuf,
    /// The uid (also the gid) to run as and the supplementary groups; `None` keeps moat-node's.
    pub user: Option<(u32, Vec<u32>)>,
    /// `cgroup.procs` files the program joins before it runs.
    pub cgroup_procs: Vec<std::path::PathBuf>,
    /// Descriptors the program inherits (their numbers appear in its argv); the caller keeps
    /// them open until this returns.
    pub inherit: Vec<std::os::fd::RawFd>,
}

/// Starts a long-running program (a VMM) that must outlive moat-node: it gets its own process
/// group, so a Ctrl-C or SIGTERM aimed at moat-node's group does not reach it, and it is not
/// killed when its handle drops. stdout and stderr go to `log` (appended), stdin is closed.
/// With `confine`, it starts in its cgroups and working directory, as its own user.
pub fn spawn_detached<S: AsRef<OsStr>>(
    argv: &[S],
    log: &std::path::Path,
    confine: Option<&Confine>,
) -> Result<tokio::process::Child, CmdError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(CmdError::Spawn {
            program: String::new(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty argv"),
        });
    };
    let shown = program.as_ref().to_string_lossy().into_owned();
    let spawn_err = |source| CmdError::Spawn { program: shown.clone(), source };
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).map_err(spawn_err)?;
    let err = out.try_clone().map_err(spawn_err)?;
    #[allow(clippy::disallowed_methods)] // this is the one sanctioned place
    let mut command = tokio::process::Command::new(program);
    command.args(args).stdin(std::process::Stdio::null()).stdout(out).stderr(err).process_group(0).kill_on_drop(false);
    // Opened here, written by the child: joining a cgroup before exec charges it from the start.
    let mut cgroup_files = Vec::new();
    if let Some(confine) = confine {
        for procs in &confine.cgroup_procs {
            cgroup_files.push(std::fs::OpenOptions::new().write(true).open(procs).map_err(spawn_err)?);
        }
        let prepared = Prepared::new(confine, &cgroup_files).map_err(spawn_err)?;
        // SAFETY: the closure runs between fork and exec and makes only async-signal-safe
        // calls (chdir, write, fcntl, setgroups, setgid, setuid) on data prepared before fork.
        unsafe { command.pre_exec(move || prepared.apply()) };
    }
    let child = command.spawn().map_err(spawn_err)?;
    drop(cgroup_files);
    tracing::info!(
        argv = ?argv.iter().map(|a| a.as_ref().to_string_lossy()).collect::<Vec<_>>(),
        pid = child.id(),
        "started detached process"
    );
    Ok(child)
}

/// A [`Confine`] with everything the child needs allocated before fork.
struct Prepared {
    cwd: std::ffi::CString,
    cgroups: Vec<std::os::fd::RawFd>,
    inherit: Vec<std::os::fd::RawFd>,
    user: Option<(libc::uid_t, Vec<libc::gid_t>)>,
}

impl Prepared {
    fn new(confine: &Confine, cgroup_files: &[std::fs::File]) -> std::io::Result<Prepared> {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let cwd = std::ffi::CString::new(confine.cwd.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL in the working directory"))?;
        Ok(Prepared {
            cwd,
            cgroups: cgroup_files.iter().map(|f| f.as_raw_fd()).collect(),
            inherit: confine.inherit.clone(),
            user: confine.user.clone(),
        })
    }

    /// In the child, between fork and exec.
    fn apply(&self) -> std::io::Result<()> {
        let check = |rc: libc::c_int| if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
        // SAFETY: plain system calls on descriptors and buffers owned by `self`, which outlives
        // this call; none of them allocates.
        unsafe {
            check(libc::chdir(self.cwd.as_ptr()))?;
            for &fd in &self.cgroups {
                // "0" is the writing process itself.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for &fd in &self.inherit {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                check(flags)?;
                check(libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC))?;
            }
            if let Some((uid, groups)) = &self.user {
                check(libc::setgroups(groups.len(), groups.as_ptr()))?;
                check(libc::setgid(*uid))?;
                check(libc::setuid(*uid))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn captures_output_and_status() {
        let out = run(&["sh", "-c", "echo hi; echo err >&2; exit 3"], Duration::from_secs(5)).await.unwrap();
        assert_eq!(out.stdout, b"hi\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status.code(), Some(3));
    }

    #[tokio::test]
    async fn times_out_and_kills() {
        let err = run(&["sleep", "30"], Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(err, CmdError::Timeout { .. }), "{err:?}");
    }

    /// A confined child runs in its directory, in its cgroup file (a plain file stands in for
    /// cgroup.procs), with an inherited descriptor open and, when root, as the uid asked for.
    #[tokio::test]
    async fn a_confined_child_gets_its_directory_cgroup_descriptor_and_user() {
        use std::os::fd::AsRawFd;
        let tmp = tempfile::tempdir().unwrap();
        let jail = tmp.path().join("jail");
        std::fs::create_dir(&jail).unwrap();
        let procs = tmp.path().join("cgroup.procs");
        std::fs::write(&procs, "").unwrap();
        let passed = std::fs::File::open("/proc/self/status").unwrap();
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let root = euid == 0;
        let user = root.then(|| (3_999_999, Vec::new()));
        if root {
            std::os::unix::fs::chown(&jail, Some(3_999_999), Some(3_999_999)).unwrap();
        }
        let confine =
            Confine { cwd: jail.clone(), user, cgroup_procs: vec![procs.clone()], inherit: vec![passed.as_raw_fd()] };
        let script =
            format!("pwd; id -u; test -r /proc/self/fd/{} && echo inherited; echo x > made", passed.as_raw_fd());
        let log = tmp.path().join("out.log");
        let mut child = spawn_detached(&["sh", "-c", &script], &log, Some(&confine)).unwrap();
        assert!(child.wait().await.unwrap().success());
        let out = std::fs::read_to_string(&log).unwrap();
        let want_uid = if root { "3999999".to_string() } else { euid.to_string() };
        assert_eq!(out, format!("{}\n{want_uid}\ninherited\n", jail.display()));
        assert_eq!(std::fs::read_to_string(&procs).unwrap(), "0", "the child wrote itself into its cgroup");
        assert!(jail.join("made").exists(), "relative paths land in the working directory");
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let err = run(&["/nonexistent/moat-test-binary"], Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, CmdError::Spawn { .. }), "{err:?}");
    }
}

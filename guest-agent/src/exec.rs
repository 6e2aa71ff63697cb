//! Processes: `exec` runs one to completion (output streamed while it runs,
//! capped in the result), `exec_start` runs one in the background under an id
//! that outlives the connection. Every process gets its own process group, so
//! a timeout, a cancellation or `exec_kill` ends everything it started.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_tools::guest::{
    ExecInput, ExecOutput, ExecOutputOutput, ExecStartOutput, ExecStatusOutput, MAX_EXEC_SECONDS, MAX_OUTPUT_BYTES,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::files::check_path;

const DEFAULT_TIMEOUT_S: u32 = 60;
/// After the process exits, how long to wait for pipes that a grandchild still holds open.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// Which output a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipe {
    Stdout,
    Stderr,
}

impl Pipe {
    pub const fn as_str(self) -> &'static str {
        match self {
            Pipe::Stdout => "stdout",
            Pipe::Stderr => "stderr",
        }
    }
}

/// Output kept for one stream: the newest [`MAX_OUTPUT_BYTES`], and how much there was.
#[derive(Debug, Default)]
struct Kept {
    bytes: Vec<u8>,
    total: u64,
}

impl Kept {
    fn push(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > MAX_OUTPUT_BYTES {
            let cut = self.bytes.len() - MAX_OUTPUT_BYTES;
            self.bytes.drain(..cut);
        }
    }

    /// Output from byte `offset` on, and whether some of it was already dropped.
    fn since(&self, offset: u64) -> (String, u64, bool) {
        let first = self.total - self.bytes.len() as u64;
        let lost = offset < first;
        let from = offset.saturating_sub(first).min(self.bytes.len() as u64) as usize;
        (String::from_utf8_lossy(&self.bytes[from..]).into_owned(), self.total, lost)
    }
}

// Running the caller's program is this agent's job: it has no command wrapper to go through.
#[allow(clippy::disallowed_methods)]
fn command_of(input: &ExecInput) -> Result<tokio::process::Command, String> {
    let mut command = match (&input.argv, &input.command) {
        (Some(argv), None) => {
            let (program, args) = argv.split_first().ok_or("argv is empty")?;
            if argv.iter().any(|a| a.contains('\0')) {
                return Err("argv contains a NUL byte".into());
            }
            let mut c = tokio::process::Command::new(program);
            c.args(args);
            c
        }
        (None, Some(line)) => {
            if line.contains('\0') {
                return Err("command contains a NUL byte".into());
            }
            let mut c = tokio::process::Command::new("/bin/sh");
            c.arg("-c").arg(line);
            c
        }
        _ => return Err("give exactly one of argv (run directly) or command (run with /bin/sh -c)".into()),
    };
    let cwd = match &input.cwd {
        Some(cwd) => check_path(cwd)?,
        None => "/".into(),
    };
    if !cwd.is_dir() {
        return Err(format!("cwd {} is not a directory", cwd.display()));
    }
    command.current_dir(cwd).envs(input.env.iter().flatten()).process_group(0).kill_on_drop(false);
    command
        .stdin(if input.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(command)
}

fn spawn(input: &ExecInput) -> Result<tokio::process::Child, String> {
    let mut child = command_of(input)?.spawn().map_err(|e| {
        let what = input.argv.as_ref().and_then(|a| a.first()).map_or("/bin/sh", String::as_str);
        format!("cannot start {what}: {e}")
    })?;
    if let (Some(text), Some(mut stdin)) = (input.stdin.clone(), child.stdin.take()) {
        tokio::spawn(async move {
            let _ = stdin.write_all(text.as_bytes()).await;
        });
    }
    Ok(child)
}

fn kill_group(pid: u32) {
    // SAFETY: kill(2) on the process group this agent created for the child; no memory involved.
    unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
}

fn read_into(
    mut pipe: impl AsyncRead + Unpin + Send + 'static,
    which: Pipe,
    kept: Arc<Mutex<Kept>>,
    live: Option<mpsc::UnboundedSender<(Pipe, String)>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match pipe.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    kept.lock().expect("output lock is never poisoned").push(&buf[..n]);
                    if let Some(live) = &live {
                        let _ = live.send((which, String::from_utf8_lossy(&buf[..n]).into_owned()));
                    }
                }
            }
        }
    })
}

fn split_status(status: Option<ExitStatus>) -> (Option<i32>, Option<i32>) {
    match status {
        Some(s) => (s.code(), s.signal()),
        None => (None, None),
    }
}

/// Runs to completion. Chunks of output go to `live` as they arrive; `cancel` kills the
/// process group and fails the call.
pub async fn run(
    input: &ExecInput,
    live: Option<mpsc::UnboundedSender<(Pipe, String)>>,
    cancel: CancellationToken,
) -> Result<ExecOutput, String> {
    let timeout = Duration::from_secs(u64::from(input.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S).min(MAX_EXEC_SECONDS)));
    let started = Instant::now();
    let mut child = spawn(input)?;
    let pid = child.id().unwrap_or(0);
    let (out, err) = (Arc::new(Mutex::new(Kept::default())), Arc::new(Mutex::new(Kept::default())));
    let readers = [
        read_into(child.stdout.take().expect("stdout is piped"), Pipe::Stdout, out.clone(), live.clone()),
        read_into(child.stderr.take().expect("stderr is piped"), Pipe::Stderr, err.clone(), live),
    ];
    let mut timed_out = false;
    let status = tokio::select! {
        status = child.wait() => status.map_err(|e| format!("waiting for the process failed: {e}"))?,
        _ = tokio::time::sleep(timeout) => {
            timed_out = true;
            kill_group(pid);
            child.wait().await.map_err(|e| format!("waiting for the process failed: {e}"))?
        }
        _ = cancel.cancelled() => {
            kill_group(pid);
            let _ = child.wait().await;
            return Err("cancelled: the process group was killed".into());
        }
    };
    for reader in readers {
        if tokio::time::timeout(DRAIN_GRACE, reader).await.is_err() {
            // A background grandchild still holds the pipe; what arrived so far is the output.
        }
    }
    let (exit_code, signal) = split_status(Some(status));
    let take = |kept: &Arc<Mutex<Kept>>| {
        let kept = kept.lock().expect("output lock is never poisoned");
        (String::from_utf8_lossy(&kept.bytes).into_owned(), kept.total > kept.bytes.len() as u64)
    };
    let ((stdout, stdout_truncated), (stderr, stderr_truncated)) = (take(&out), take(&err));
    Ok(ExecOutput {
        exit_code,
        signal,
        timed_out,
        stdout,
        stderr,
        stdout_truncated,
        stderr_truncated,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

struct Job {
    pid: u32,
    stdout: Arc<Mutex<Kept>>,
    stderr: Arc<Mutex<Kept>>,
    status: watch::Receiver<Option<ExitStatus>>,
}

/// Background processes by id; they outlive the connection that started them.
#[derive(Default)]
pub struct Jobs {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    next: AtomicU64,
}

impl Jobs {
    pub fn start(&self, input: &ExecInput) -> Result<ExecStartOutput, String> {
        let mut child = spawn(input)?;
        let pid = child.id().unwrap_or(0);
        let (out, err) = (Arc::new(Mutex::new(Kept::default())), Arc::new(Mutex::new(Kept::default())));
        read_into(child.stdout.take().expect("stdout is piped"), Pipe::Stdout, out.clone(), None);
        read_into(child.stderr.take().expect("stderr is piped"), Pipe::Stderr, err.clone(), None);
        let (tx, rx) = watch::channel(None);
        let timeout = input.timeout_s.map(|s| Duration::from_secs(u64::from(s.min(MAX_EXEC_SECONDS))));
        tokio::spawn(async move {
            let status = match timeout {
                Some(t) => match tokio::time::timeout(t, child.wait()).await {
                    Ok(status) => status,
                    Err(_) => {
                        kill_group(pid);
                        child.wait().await
                    }
                },
                None => child.wait().await,
            };
            let _ = tx.send(status.ok());
        });
        let id = format!("x{}", self.next.fetch_add(1, Ordering::Relaxed) + 1);
        let job = Arc::new(Job { pid, stdout: out, stderr: err, status: rx });
        self.jobs.lock().expect("jobs lock is never poisoned").insert(id.clone(), job);
        Ok(ExecStartOutput { id, pid })
    }

    fn job(&self, id: &str) -> Result<Arc<Job>, String> {
        self.jobs
            .lock()
            .expect("jobs lock is never poisoned")
            .get(id)
            .cloned()
            .ok_or_else(|| format!("no background process with id `{id}` (ids do not survive an agent restart)"))
    }

    pub fn status(&self, id: &str) -> Result<ExecStatusOutput, String> {
        let job = self.job(id)?;
        let status = *job.status.borrow();
        let (exit_code, signal) = split_status(status);
        Ok(ExecStatusOutput {
            id: id.to_string(),
            pid: job.pid,
            running: status.is_none(),
            exit_code,
            signal,
            stdout_bytes: job.stdout.lock().expect("output lock is never poisoned").total,
            stderr_bytes: job.stderr.lock().expect("output lock is never poisoned").total,
        })
    }

    pub fn output(&self, id: &str, stdout_offset: u64, stderr_offset: u64) -> Result<ExecOutputOutput, String> {
        let job = self.job(id)?;
        let status = *job.status.borrow();
        let (exit_code, signal) = split_status(status);
        let (stdout, stdout_next, lost_out) =
            job.stdout.lock().expect("output lock is never poisoned").since(stdout_offset);
        let (stderr, stderr_next, lost_err) =
            job.stderr.lock().expect("output lock is never poisoned").since(stderr_offset);
        Ok(ExecOutputOutput {
            id: id.to_string(),
            running: status.is_none(),
            exit_code,
            signal,
            stdout,
            stderr,
            stdout_next,
            stderr_next,
            lost: lost_out || lost_err,
        })
    }

    /// Kills the process group and waits (briefly) for the exit to be recorded.
    pub async fn kill(&self, id: &str) -> Result<ExecStatusOutput, String> {
        let job = self.job(id)?;
        if job.status.borrow().is_none() {
            kill_group(job.pid);
            let mut status = job.status.clone();
            let _ = tokio::time::timeout(Duration::from_secs(5), status.wait_for(Option::is_some)).await;
        }
        self.status(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(command: &str) -> ExecInput {
        ExecInput { argv: None, command: Some(command.into()), cwd: None, env: None, stdin: None, timeout_s: None }
    }

    #[tokio::test]
    async fn exit_codes_signals_timeouts_and_caps() {
        let never = CancellationToken::new();
        let ok = run(&sh("echo out; echo err >&2; exit 3"), None, never.clone()).await.unwrap();
        assert_eq!(
            (ok.exit_code, ok.signal, ok.stdout.as_str(), ok.stderr.as_str()),
            (Some(3), None, "out\n", "err\n")
        );
        let killed = run(&sh("kill -9 $$"), None, never.clone()).await.unwrap();
        assert_eq!((killed.exit_code, killed.signal), (None, Some(9)));
        let slow = ExecInput { timeout_s: Some(1), ..sh("sleep 30 & sleep 30") };
        let timed = run(&slow, None, never.clone()).await.unwrap();
        assert!(timed.timed_out && timed.signal == Some(9), "{timed:?}");
        let big = run(&sh("head -c 3000000 /dev/zero"), None, never.clone()).await.unwrap();
        assert!(big.stdout_truncated && big.stdout.len() == MAX_OUTPUT_BYTES);
        let fed = run(&ExecInput { stdin: Some("hi there".into()), ..sh("cat") }, None, never).await.unwrap();
        assert_eq!(fed.stdout, "hi there");
        let both = ExecInput { argv: Some(vec!["true".into()]), ..sh("true") };
        assert!(command_of(&both).unwrap_err().contains("exactly one"));
        assert!(command_of(&ExecInput { cwd: Some("rel".into()), ..sh("true") }).unwrap_err().contains("relative"));
    }

    #[tokio::test]
    async fn cancelling_kills_the_process_group() {
        let cancel = CancellationToken::new();
        let marker = tempfile::tempdir().unwrap();
        let pidfile = marker.path().join("child.pid");
        let input = sh(&format!("sleep 60 & echo $! > {}; wait", pidfile.display()));
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move { run(&input, None, cancel).await }
        });
        while !pidfile.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let grandchild: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        cancel.cancel();
        assert!(task.await.unwrap().unwrap_err().contains("cancelled"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        // SAFETY: signal 0 only checks existence.
        let alive = unsafe { libc::kill(grandchild, 0) } == 0
            && !std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default().contains(") Z");
        assert!(!alive, "the whole group is gone");
    }

    #[tokio::test]
    async fn background_jobs_report_output_by_offset_and_die_on_kill() {
        let jobs = Jobs::default();
        let started = jobs.start(&sh("echo one; sleep 60")).unwrap();
        let mut out = jobs.output(&started.id, 0, 0).unwrap();
        while out.stdout.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            out = jobs.output(&started.id, 0, 0).unwrap();
        }
        assert_eq!((out.stdout.as_str(), out.running), ("one\n", true));
        assert_eq!(jobs.output(&started.id, out.stdout_next, 0).unwrap().stdout, "");
        let killed = jobs.kill(&started.id).await.unwrap();
        assert_eq!((killed.running, killed.signal), (false, Some(9)));
        assert!(jobs.status("x999").unwrap_err().contains("no background process"));
    }
}

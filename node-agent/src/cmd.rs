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
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().map_err(|source| CmdError::Spawn { program: shown.clone(), source })?;
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

/// Starts a long-running program (a VMM) that must outlive moat-node: it gets its own process
/// group, so a Ctrl-C or SIGTERM aimed at moat-node's group does not reach it, and it is not
/// killed when its handle drops. stdout and stderr go to `log` (appended), stdin is closed.
pub fn spawn_detached<S: AsRef<OsStr>>(argv: &[S], log: &std::path::Path) -> Result<tokio::process::Child, CmdError> {
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
    let child = command.spawn().map_err(spawn_err)?;
    tracing::info!(
        argv = ?argv.iter().map(|a| a.as_ref().to_string_lossy()).collect::<Vec<_>>(),
        pid = child.id(),
        "started detached process"
    );
    Ok(child)
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

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let err = run(&["/nonexistent/moat-test-binary"], Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, CmdError::Spawn { .. }), "{err:?}");
    }
}

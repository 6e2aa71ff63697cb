//! One task per VMM process: waits for it to exit (as our child, or by pidfd for
//! a re-adopted one), keeps the console bounded meanwhile, and records whether
//! the exit was a stop, a guest power-off or a crash, with the reason.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::console::{console_panic, console_powered_off, vmm_log_tail};
use super::{Exit, Process, Vm, VmState};
use crate::vmm::Vmm;

/// Watches one VMM process until it exits, rotating the console meanwhile, then records
/// what the exit means.
pub(super) fn spawn(vm: Arc<Vm>, process: Process, vmm: Option<Arc<dyn Vmm>>) {
    tokio::spawn(async move {
        let exited = async {
            match process {
                Process::Child(mut child) => Exit::Status(child.wait().await),
                Process::Adopted(pid) => {
                    wait_for_exit(pid).await;
                    Exit::Unknown
                }
            }
        };
        tokio::pin!(exited);
        let mut rotate = tokio::time::interval(Duration::from_secs(2));
        let exit = loop {
            tokio::select! {
                exit = &mut exited => break exit,
                _ = rotate.tick() => {
                    if let Err(e) = vm.dir.rotate_console() {
                        tracing::warn!(vm = %vm.config.id, error = %e, "cannot rotate the console log");
                    }
                }
            }
        };
        if let Some(vmm) = vmm {
            vmm.cleanup(&vm.dir);
        }
        record_exit(&vm, exit);
        vm.exits.send_modify(|n| *n += 1);
    });
}

/// Decides what a VMM exit means and records it.
fn record_exit(vm: &Vm, exit: Exit) {
    let status = vm.status();
    let (state, reason) = if matches!(status.state, VmState::Stopping | VmState::Deleting) {
        (VmState::Stopped, status.reason.clone())
    } else if let Some(line) = console_panic(&vm.dir, status.console_start) {
        (VmState::Crashed, format!("guest kernel panic: {line}"))
    } else {
        match exit {
            Exit::Status(Ok(s)) if s.success() => (VmState::Stopped, "the guest powered off".to_string()),
            Exit::Status(Ok(s)) => {
                use std::os::unix::process::ExitStatusExt;
                let how = match (s.code(), s.signal()) {
                    (_, Some(sig)) => format!("was killed by signal {sig}{}", signal_name(sig)),
                    (Some(code), _) => format!("exited with status {code}"),
                    _ => "exited".into(),
                };
                (VmState::Crashed, format!("the VMM (pid {}) {how}{}", status.pid, vmm_log_tail(&vm.dir)))
            }
            Exit::Status(Err(e)) => (VmState::Crashed, format!("cannot wait for the VMM: {e}")),
            Exit::Unknown if console_powered_off(&vm.dir, status.console_start) => {
                (VmState::Stopped, "the guest powered off".to_string())
            }
            Exit::Unknown => (
                VmState::Crashed,
                format!("the VMM (pid {}) exited; its exit status is unknown since it was re-adopted", status.pid),
            ),
        }
    };
    vm.dir.clear_pid();
    if state == VmState::Crashed {
        tracing::warn!(vm = %vm.config.id, reason = %reason, "vm crashed");
    } else {
        tracing::info!(vm = %vm.config.id, reason = %reason, "vm stopped");
    }
    if let Err(e) = vm.set_state(state, reason) {
        tracing::error!(vm = %vm.config.id, error = %e, "cannot record the vm's exit");
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGABRT => " (SIGABRT)",
        _ => "",
    }
}

/// Resolves when process `pid` (not our child) exits, via a pidfd.
async fn wait_for_exit(pid: u32) {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return; // ESRCH: already gone.
    }
    // SAFETY: `fd` is a fresh descriptor this function owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: `owned` is a valid open pidfd, moved into the AsyncFd and closed only when it drops.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) };
    match registered {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(_) => {
            // Fall back to polling.
            while Path::new(&format!("/proc/{pid}")).exists() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

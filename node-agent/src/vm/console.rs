//! Reading a VM's console and VMM log for what a person (or the crash
//! classifier) needs: this boot's output, a panic line, the last lines.

use crate::dir::VmDir;

/// Console output of the current boot (from `start` bytes in), bounded.
fn console_since(dir: &VmDir, start: u64) -> String {
    let Ok(len) = std::fs::symlink_metadata(dir.console_log()).map(|m| m.len()) else { return String::new() };
    // Rotation may have shortened the file; then all of it belongs to this boot.
    let from = if start <= len { start } else { 0 };
    dir.console_tail((len - from).min(256 * 1024)).map(|(text, _)| text).unwrap_or_default()
}

pub(super) fn console_panic(dir: &VmDir, start: u64) -> Option<String> {
    let text = console_since(dir, start);
    let line = text.lines().find(|l| l.contains("Kernel panic"))?;
    // From "Kernel panic" on: the kernel's timestamp prefix says nothing to the reader.
    line.find("Kernel panic").map(|at| line[at..].trim().to_string())
}

pub(super) fn console_powered_off(dir: &VmDir, start: u64) -> bool {
    console_since(dir, start).contains("reboot: Power down")
}

/// The console's last `n` non-empty lines, joined with " | ".
pub(super) fn last_lines(dir: &VmDir, n: usize) -> String {
    let (text, _) = dir.console_tail(8192).unwrap_or_default();
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// The VMM's last few output lines, as "; qemu said: ..." or empty.
pub(super) fn vmm_log_tail(dir: &VmDir) -> String {
    let Ok(text) = std::fs::read_to_string(dir.vmm_log()) else { return String::new() };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    format!("; the VMM said: {}", lines[lines.len().saturating_sub(3)..].join(" | "))
}

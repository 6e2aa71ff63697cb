//! Reaching files and sockets in a VM's `jail/` from the node (root) without following a
//! symlink in the last component. `jail/` belongs to the VM's uid, so a VMM broken into could
//! leave a link there to any file on the host (for root to read or truncate) or to another
//! VM's QMP or vsock socket (for the node to drive the wrong VM). The directories above
//! `jail/` are the node's, so only the last component needs the check.

use std::path::Path;

/// Opens a regular file without following a symlink in its last component.
pub fn open_own(path: &Path, write: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is a symbolic link, not a regular file; not followed", path.display()),
            ),
            _ => e,
        })?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

/// Connects to a Unix socket, refusing a symlink in its last component.
pub async fn connect_own(path: &Path) -> std::io::Result<tokio::net::UnixStream> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let handle = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH | libc::O_NOFOLLOW).open(path)?;
    if !handle.metadata()?.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a socket", path.display()),
        ));
    }
    // Through the descriptor: what was checked is what is connected to.
    tokio::net::UnixStream::connect(format!("/proc/self/fd/{}", handle.as_raw_fd())).await
}

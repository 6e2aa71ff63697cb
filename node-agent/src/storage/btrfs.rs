//! btrfs subvolumes through the kernel's ioctls: create, snapshot (constant time whatever the
//! size), mark read-only, destroy. ioctls rather than the `btrfs` program: a snapshot is one
//! system call, where spawning `btrfs subvolume snapshot` costs a process start on every
//! create and fork (the workspace benchmark's target is 50 ms). `btrfs filesystem du`, which
//! only inspect needs, goes through the command runner.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `struct btrfs_ioctl_vol_args_v2` (4096 bytes).
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; 4040],
}

/// `struct btrfs_ioctl_vol_args` (4096 bytes).
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}

// _IOW(0x94, nr, size): 0x4000_0000 | size << 16 | 0x94 << 8 | nr.
const SNAP_CREATE_V2: libc::c_ulong = 0x5000_9417;
const SUBVOL_CREATE_V2: libc::c_ulong = 0x5000_9418;
const SNAP_DESTROY: libc::c_ulong = 0x5000_940f;
const SUBVOL_SETFLAGS: libc::c_ulong = 0x4008_941a;
const SUBVOL_RDONLY: u64 = 1 << 1;

fn parent_and_name(path: &Path) -> std::io::Result<(File, &OsStr)> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{}: {what}", path.display()));
    let name = path.file_name().ok_or_else(|| invalid("no file name"))?;
    if name.len() >= 255 {
        return Err(invalid("name too long"));
    }
    let parent = path.parent().ok_or_else(|| invalid("no parent directory"))?;
    Ok((File::open(parent)?, name))
}

fn ioctl<T>(fd: &File, request: libc::c_ulong, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: `arg` is a live, correctly sized #[repr(C)] struct (or u64) for `request`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn v2(name: &OsStr, fd: i64, flags: u64) -> Box<VolArgsV2> {
    let mut args = Box::new(VolArgsV2 { fd, transid: 0, flags, unused: [0; 4], name: [0; 4040] });
    args.name[..name.len()].copy_from_slice(name.as_bytes());
    args
}

/// Makes an empty subvolume at `path`.
pub fn create(path: &Path) -> std::io::Result<()> {
    let (parent, name) = parent_and_name(path)?;
    ioctl(&parent, SUBVOL_CREATE_V2, &mut *v2(name, 0, 0))
}

/// Snapshots subvolume `source` at `dest`, read-only when asked.
pub fn snapshot(source: &Path, dest: &Path, read_only: bool) -> std::io::Result<()> {
    let (parent, name) = parent_and_name(dest)?;
    let source = File::open(source)?;
    let flags = if read_only { SUBVOL_RDONLY } else { 0 };
    ioctl(&parent, SNAP_CREATE_V2, &mut *v2(name, i64::from(source.as_raw_fd()), flags))
}

/// Marks subvolume `path` read-only.
pub fn set_read_only(path: &Path) -> std::io::Result<()> {
    let subvol = File::open(path)?;
    let mut flags = SUBVOL_RDONLY;
    ioctl(&subvol, SUBVOL_SETFLAGS, &mut flags)
}

/// Destroys subvolume `path` and everything in it (read-only ones too; needs root).
pub fn destroy(path: &Path) -> std::io::Result<()> {
    let (parent, name) = parent_and_name(path)?;
    let mut args = Box::new(VolArgs { fd: 0, name: [0; 4088] });
    args.name[..name.len()].copy_from_slice(name.as_bytes());
    ioctl(&parent, SNAP_DESTROY, &mut *args)
}

/// Whether `path` is the root of a subvolume (btrfs gives subvolume roots inode 256).
pub fn is_subvolume(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && m.ino() == 256)
}

/// Bytes only `path` holds (not shared with its image or other snapshots), from
/// `btrfs filesystem du`; None when btrfs-progs is missing or says nothing useful.
pub async fn exclusive_bytes(path: &Path) -> Option<u64> {
    let argv = [
        OsStr::new("btrfs"),
        OsStr::new("filesystem"),
        OsStr::new("du"),
        OsStr::new("-s"),
        OsStr::new("--raw"),
        path.as_os_str(),
    ];
    let out = crate::cmd::run(&argv, std::time::Duration::from_secs(30)).await.ok()?;
    if !out.status.success() {
        return None;
    }
    // "     Total   Exclusive  Set shared  Filename" then one line of numbers.
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().nth(1)?.split_whitespace().nth(1)?.parse().ok()
}

const _: () = assert!(std::mem::size_of::<VolArgsV2>() == 4096 && std::mem::size_of::<VolArgs>() == 4096);

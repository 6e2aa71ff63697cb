//! ext4 images: recognising one, making one from a directory (`mke2fs -d`, no loop mount), and
//! growing one offline (`e2fsck -f`, then `resize2fs`), all through the command runner.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::{StorageError, TOOL_TIMEOUT};

/// Whether `path` starts with an ext2/3/4 superblock (magic 0xEF53 at byte 1080).
pub fn is_ext4(path: &Path) -> std::io::Result<bool> {
    let mut file = std::fs::File::open(path)?;
    let mut magic = [0u8; 2];
    file.seek(SeekFrom::Start(1024 + 56))?;
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(magic == [0x53, 0xEF]),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// How e2fsprogs say the filesystem they write to is full.
const NO_SPACE: &str = "No space left on device";

async fn tool(argv: &[&std::ffi::OsStr], ok: &[i32]) -> Result<(), String> {
    let program = argv[0].to_string_lossy().into_owned();
    let out = crate::cmd::run(argv, TOOL_TIMEOUT).await.map_err(|e| crate::errors::chain(&e))?;
    match out.status.code() {
        Some(code) if ok.contains(&code) => Ok(()),
        _ => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stdout = String::from_utf8_lossy(&out.stdout);
            if stdout.contains(NO_SPACE) || stderr.contains(NO_SPACE) {
                return Err(format!("{program} failed: {NO_SPACE}"));
            }
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
            Err(format!("{program} failed ({}): {last}", out.status))
        }
    }
}

/// Makes `dest`, an ext4 filesystem holding `dir`'s tree, sized to its contents plus a quarter.
pub async fn from_dir(dir: &Path, dest: &Path) -> Result<(), StorageError> {
    let used = tree_bytes(dir);
    let size_kib = ((used + used / 4) / 1024).max(64 * 1024);
    let size = format!("{size_kib}k");
    let argv = [
        "mke2fs".as_ref(),
        "-q".as_ref(),
        "-F".as_ref(),
        "-t".as_ref(),
        "ext4".as_ref(),
        "-d".as_ref(),
        dir.as_os_str(),
        dest.as_os_str(),
        size.as_ref(),
    ];
    tool(&argv, &[0])
        .await
        .map_err(|e| StorageError::Invalid(format!("cannot make an ext4 image of {}: {e}", dir.display())))
}

/// Grows the ext4 filesystem in `file` to `bytes` (offline).
pub async fn grow(file: &Path, bytes: u64) -> std::io::Result<()> {
    std::fs::OpenOptions::new().write(true).open(file)?.set_len(bytes)?;
    let fail = |e: String| {
        if e.contains(NO_SPACE) { std::io::Error::from_raw_os_error(libc::ENOSPC) } else { std::io::Error::other(e) }
    };
    // e2fsck exits 1 when it fixed something, which is fine before a resize.
    tool(&["e2fsck".as_ref(), "-f".as_ref(), "-y".as_ref(), file.as_os_str()], &[0, 1]).await.map_err(fail)?;
    tool(&["resize2fs".as_ref(), file.as_os_str()], &[0]).await.map_err(fail)
}

fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            total += meta.len().max(4096);
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

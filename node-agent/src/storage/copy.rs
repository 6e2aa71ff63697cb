//! Copying a disk image where btrfs snapshots are not available: a reflink (FICLONE: shared
//! extents, near constant time on XFS or btrfs) when the filesystem has them, else a copy of
//! the data segments only, so a mostly empty image stays sparse.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// _IOW(0x94, 9, int)
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Makes `dest` share `source`'s extents.
pub fn reflink(source: &Path, dest: &Path) -> std::io::Result<()> {
    let from = File::open(source)?;
    let to = std::fs::OpenOptions::new().write(true).create_new(true).open(dest)?;
    // SAFETY: FICLONE takes the source descriptor as its argument.
    let rc = unsafe { libc::ioctl(to.as_raw_fd(), FICLONE, from.as_raw_fd()) };
    if rc == 0 {
        return to.sync_all();
    }
    let err = std::io::Error::last_os_error();
    drop(to);
    let _ = std::fs::remove_file(dest);
    Err(err)
}

/// Copies `source` to a new `dest`, skipping holes (SEEK_DATA / SEEK_HOLE), then syncs it.
pub fn sparse(source: &Path, dest: &Path) -> std::io::Result<()> {
    let from = File::open(source)?;
    let to = std::fs::OpenOptions::new().write(true).create_new(true).open(dest)?;
    let copied = copy_segments(&from, &to).and_then(|()| to.sync_all());
    if copied.is_err() {
        drop(to);
        let _ = std::fs::remove_file(dest);
    }
    copied
}

fn copy_segments(from: &File, to: &File) -> std::io::Result<()> {
    let len = from.metadata()?.len();
    to.set_len(len)?;
    let mut at: i64 = 0;
    while (at as u64) < len {
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(from.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(err);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(from.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            // SAFETY: both descriptors are ours; the offsets are live locals.
            let n = unsafe {
                libc::copy_file_range(
                    from.as_raw_fd(),
                    &mut off_in,
                    to.as_raw_fd(),
                    &mut off_out,
                    (hole - off_in) as usize,
                    0,
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                // Across filesystems the kernel may refuse copy_file_range: copy by hand.
                if matches!(err.raw_os_error(), Some(libc::EXDEV | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)) {
                    copy_by_hand(from, to, off_in as u64, (hole - off_in) as u64)?;
                    break;
                }
                return Err(err);
            }
            if n == 0 {
                break;
            }
        }
        at = hole;
    }
    Ok(())
}

fn copy_by_hand(from: &File, to: &File, mut at: u64, mut left: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = from.read_at(&mut buf[..want], at)?;
        if n == 0 {
            break;
        }
        to.write_all_at(&buf[..n], at)?;
        at += n as u64;
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("a"), tmp.path().join("b"));
        let mut f = File::create(&src).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(64 << 20)).unwrap();
        f.write_all(b"tail").unwrap();
        drop(f);
        sparse(&src, &dst).unwrap();
        let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert_eq!(a, b);
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 8 << 20, "the hole was written out");
        assert!(sparse(&src, &dst).is_err(), "an existing destination is never overwritten");
    }
}

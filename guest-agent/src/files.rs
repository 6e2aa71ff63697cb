//! File tools. Paths must be absolute and normalized (no `..`), without NUL
//! bytes, at most 4096 bytes; writes replace the file atomically.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use base64::Engine;
use moat_tools::guest::{
    Encoding, FileDeleteOutput, FileKind, FileListOutput, FileReadInput, FileReadOutput, FileStat, FileWriteInput,
    FileWriteOutput, MAX_FILE_BYTES, MAX_PATH,
};
use sha2::{Digest, Sha256};

const MAX_LIST: usize = 10_000;

/// Why a path or file operation was refused; every message says what to change.
pub fn check_path(path: &str) -> Result<PathBuf, String> {
    if path.len() > MAX_PATH {
        return Err(format!("path is {} bytes; the limit is {MAX_PATH}", path.len()));
    }
    if path.contains('\0') {
        return Err("path contains a NUL byte".into());
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!("path `{path}` is relative; give an absolute path like /root/{path}"));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("path `{path}` contains `..`; give the normalized absolute path"));
    }
    Ok(p.to_path_buf())
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> String {
    format!("cannot {what} {}: {e}", path.display())
}

pub fn read(input: &FileReadInput) -> Result<FileReadOutput, String> {
    let path = check_path(&input.path)?;
    let mut file = std::fs::File::open(&path).map_err(|e| io_err("open", &path, e))?;
    let meta = file.metadata().map_err(|e| io_err("stat", &path, e))?;
    if meta.is_dir() {
        return Err(format!("{} is a directory; use file_list", path.display()));
    }
    let size = meta.len();
    let offset = input.offset.unwrap_or(0);
    let want = input.length.unwrap_or(MAX_FILE_BYTES).min(MAX_FILE_BYTES);
    if offset == 0 && input.length.is_none() && size > MAX_FILE_BYTES {
        return Err(format!(
            "{} is {size} bytes, over the {MAX_FILE_BYTES}-byte cap for one read; read it in parts with offset and length",
            path.display()
        ));
    }
    file.seek(SeekFrom::Start(offset)).map_err(|e| io_err("seek in", &path, e))?;
    let mut bytes = Vec::new();
    file.take(want).read_to_end(&mut bytes).map_err(|e| io_err("read", &path, e))?;
    let (content, encoding) = match input.encoding {
        Some(Encoding::Base64) => (base64::engine::general_purpose::STANDARD.encode(&bytes), Encoding::Base64),
        Some(Encoding::Utf8) => match String::from_utf8(bytes) {
            Ok(text) => (text, Encoding::Utf8),
            Err(_) => return Err(format!("{} is not valid UTF-8; read it with encoding base64", path.display())),
        },
        None => match String::from_utf8(bytes) {
            Ok(text) => (text, Encoding::Utf8),
            Err(e) => (base64::engine::general_purpose::STANDARD.encode(e.as_bytes()), Encoding::Base64),
        },
    };
    let length = match encoding {
        Encoding::Utf8 => content.len() as u64,
        Encoding::Base64 => base64::engine::general_purpose::STANDARD.decode(&content).map_or(0, |b| b.len() as u64),
    };
    Ok(FileReadOutput {
        path: input.path.clone(),
        content,
        encoding,
        size,
        offset,
        length,
        eof: offset + length >= size,
    })
}

pub fn write(input: &FileWriteInput) -> Result<FileWriteOutput, String> {
    let path = check_path(&input.path)?;
    let bytes = match input.encoding.unwrap_or(Encoding::Utf8) {
        Encoding::Utf8 => input.content.as_bytes().to_vec(),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(&input.content)
            .map_err(|e| format!("content is not valid base64: {e}"))?,
    };
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("content is {} bytes, over the {MAX_FILE_BYTES}-byte cap for one write", bytes.len()));
    }
    let parent = path.parent().ok_or_else(|| "cannot write to /".to_string())?;
    if input.create_dirs.unwrap_or(false) {
        std::fs::create_dir_all(parent).map_err(|e| io_err("create", parent, e))?;
    } else if !parent.is_dir() {
        return Err(format!("directory {} does not exist; pass create_dirs: true to create it", parent.display()));
    }
    let name = path.file_name().ok_or_else(|| format!("{} names no file", path.display()))?;
    let tmp = parent.join(format!(".{}.moat-tmp-{}", name.to_string_lossy(), std::process::id()));
    let mode = input.mode.unwrap_or(0o644);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        file.write_all(&bytes)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("write", &path, e));
    }
    Ok(FileWriteOutput {
        path: input.path.clone(),
        bytes_written: bytes.len() as u64,
        sha256: Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect(),
    })
}

pub fn delete(path: &str) -> Result<FileDeleteOutput, String> {
    let p = check_path(path)?;
    let meta = std::fs::symlink_metadata(&p).map_err(|e| io_err("stat", &p, e))?;
    let done = if meta.is_dir() { std::fs::remove_dir(&p) } else { std::fs::remove_file(&p) };
    done.map_err(|e| io_err("delete", &p, e))?;
    Ok(FileDeleteOutput { path: path.to_string(), deleted: true })
}

fn stat_of(path: &Path, shown: String) -> Result<FileStat, String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| io_err("stat", path, e))?;
    let kind = if meta.is_file() {
        FileKind::File
    } else if meta.is_dir() {
        FileKind::Dir
    } else if meta.file_type().is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    };
    Ok(FileStat { path: shown, kind, size: meta.len(), mode: meta.mode() & 0o7777, modified_unix: meta.mtime() })
}

pub fn stat(path: &str) -> Result<FileStat, String> {
    let p = check_path(path)?;
    stat_of(&p, path.to_string())
}

pub fn list(path: &str) -> Result<FileListOutput, String> {
    let p = check_path(path)?;
    let mut names: Vec<_> = std::fs::read_dir(&p)
        .map_err(|e| io_err("list", &p, e))?
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    names.sort();
    let truncated = names.len() > MAX_LIST;
    let entries = names
        .into_iter()
        .take(MAX_LIST)
        .filter_map(|n| stat_of(&p.join(&n), p.join(&n).display().to_string()).ok())
        .collect();
    Ok(FileListOutput { path: path.to_string(), entries, truncated })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        assert!(check_path("/etc/hostname").is_ok());
        assert!(check_path("etc/hostname").unwrap_err().contains("relative"));
        assert!(check_path("/etc/\0x").unwrap_err().contains("NUL"));
        assert!(check_path("/etc/../root").unwrap_err().contains(".."));
        assert!(check_path(&format!("/{}", "a".repeat(5000))).unwrap_err().contains("limit is 4096"));
    }

    #[test]
    fn content_over_the_cap_is_refused_and_nothing_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("big").display().to_string();
        let input = FileWriteInput {
            path: path.clone(),
            content: "x".repeat(MAX_FILE_BYTES as usize + 1),
            encoding: None,
            mode: None,
            create_dirs: None,
        };
        assert!(write(&input).unwrap_err().contains("over the"), "the cap is named");
        assert!(stat(&path).is_err(), "nothing was written");
        std::fs::write(&path, vec![0u8; MAX_FILE_BYTES as usize + 1]).unwrap();
        let whole = read(&FileReadInput { path: path.clone(), offset: None, length: None, encoding: None });
        assert!(whole.unwrap_err().contains("in parts with offset and length"));
        let part = read(&FileReadInput { path, offset: Some(MAX_FILE_BYTES), length: None, encoding: None }).unwrap();
        assert_eq!(part.length, 1);
    }

    #[test]
    fn write_read_round_trip_binary_and_text() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sub/f.bin").display().to_string();
        let bytes: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        let input = |create_dirs| FileWriteInput {
            path: path.clone(),
            content: base64::engine::general_purpose::STANDARD.encode(&bytes),
            encoding: Some(Encoding::Base64),
            mode: Some(0o600),
            create_dirs: Some(create_dirs),
        };
        assert!(write(&input(false)).unwrap_err().contains("create_dirs"));
        let written = write(&input(true)).unwrap();
        assert_eq!(written.bytes_written, 100_000);
        assert_eq!(stat(&path).unwrap().mode, 0o600);
        let back = read(&FileReadInput { path: path.clone(), offset: None, length: None, encoding: None }).unwrap();
        assert_eq!(back.encoding, Encoding::Base64, "binary comes back as base64");
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(back.content).unwrap(), bytes);
        assert!(back.eof);
        let part = read(&FileReadInput {
            path: path.clone(),
            offset: Some(99_990),
            length: Some(100),
            encoding: Some(Encoding::Base64),
        })
        .unwrap();
        assert_eq!((part.length, part.eof), (10, true));
        let listed = list(&tmp.path().join("sub").display().to_string()).unwrap();
        assert_eq!(listed.entries.len(), 1, "the temp file is gone after the rename");
        delete(&path).unwrap();
        assert!(stat(&path).is_err());
    }
}

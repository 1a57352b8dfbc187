//! File-system discipline: random temp names, fsync of files and directories, checksums.

pub(crate) use keel_core::fsname::{now_rfc3339, parent_of, random_hex};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{io_err, Result};

/// Fsyncs a directory so that renames and unlinks inside it survive a crash.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(io_err("open directory", dir))?;
    d.sync_all().map_err(io_err("fsync directory", dir))
}

pub(crate) fn fsync_file(path: &Path) -> Result<()> {
    let f = File::open(path).map_err(io_err("open", path))?;
    f.sync_all().map_err(io_err("fsync", path))
}

/// CRC-32C and length of a file, read in bounded chunks (backups can be large).
pub(crate) fn crc32c_file(path: &Path) -> Result<(u32, u64)> {
    let mut f = File::open(path).map_err(io_err("open", path))?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut crc, mut bytes) = (0u32, 0u64);
    loop {
        let n = f.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        bytes += n as u64;
    }
    Ok((crc, bytes))
}

/// A path with `suffix` appended to its file name (`a.sqlite` + `-wal` → `a.sqlite-wal`).
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

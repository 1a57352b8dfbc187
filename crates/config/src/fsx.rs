//! File-system discipline shared by the repository, the profile and the backups: atomic file
//! replacement (temp + fsync + rename + fsync of the directory), the repository lock, random
//! tokens and timestamps. Kept in one place so every writer follows the same rules.

pub(crate) use keel_core::fsname::{now_rfc3339, parent_of, random_hex};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{io_err, ConfigError, Result, FIX_PERM};

/// How long `Repository::update` and friends wait for another process's lock before giving up.
/// Long enough for any real update (milliseconds), short enough that a hung holder is reported.
pub(crate) const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Name of the lock file inside a repository directory (a dot file, so loaders skip it).
pub(crate) const LOCK_FILE: &str = ".lock";

/// Now as a compact UTC stamp for file names (`20250131T120000Z`).
pub(crate) fn now_compact() -> String {
    let s: String = now_rfc3339()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    assert_eq!(s.len(), 16, "compact timestamp {s}");
    s
}

/// Fsyncs a directory so that renames and unlinks inside it survive a crash.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(io_err("open directory", dir, FIX_PERM))?;
    d.sync_all()
        .map_err(io_err("fsync directory", dir, FIX_PERM))
}

/// Creates `dir` and any missing parents, fsyncing each parent that gained an entry, so a new
/// directory tree is durable before files in it are trusted.
pub(crate) fn ensure_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    // Collect the missing components bottom-up; the depth of any real path bounds the loop.
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(p) = cur {
        if p.as_os_str().is_empty() || p.is_dir() {
            break;
        }
        assert!(
            missing.len() < 4096,
            "path {} is absurdly deep",
            dir.display()
        );
        missing.push(p.to_path_buf());
        cur = p.parent();
    }
    for p in missing.iter().rev() {
        match std::fs::create_dir(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => continue,
            Err(e) => return Err(io_err("create directory", p, FIX_PERM)(e)),
        }
        if let Some(parent) = p.parent().filter(|x| !x.as_os_str().is_empty()) {
            fsync_dir(parent)?;
        }
    }
    Ok(())
}

/// Replaces `path` with `bytes` atomically: readers see the old or the new content, never a
/// mix, and after return the new content survives a crash.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_mode(path, bytes, None)
}

/// `write_atomic` for a file only its owner may read (mode 0600 from its creation on, so the
/// content is never readable by others, not even in the temp file).
pub(crate) fn write_atomic_private(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_mode(path, bytes, Some(0o600))
}

fn write_atomic_mode(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = parent_of(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert!(
        !name.is_empty(),
        "write_atomic needs a file path, got {}",
        path.display()
    );
    let tmp = dir.join(format!(".{name}.tmp-{}", random_hex(6)));
    let result = (|| {
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        if let Some(m) = mode {
            opts.mode(m);
        }
        let mut f = opts.open(&tmp).map_err(io_err("create", &tmp, FIX_PERM))?;
        if let Some(m) = mode {
            // The umask can only remove bits; set them exactly anyway.
            f.set_permissions(std::fs::Permissions::from_mode(m))
                .map_err(io_err("set permissions of", &tmp, FIX_PERM))?;
        }
        f.write_all(bytes)
            .map_err(io_err("write", &tmp, FIX_PERM))?;
        f.sync_all().map_err(io_err("fsync", &tmp, FIX_PERM))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io_err("rename temp file into", path, FIX_PERM))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    fsync_dir(&dir)
}

/// Reads a whole file, with an error naming it.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(io_err("read", path, FIX_PERM))
}

/// Compares names the way people count: `server2` before `server10`. Used for the canonical
/// order of nodes, servers and buses, which the files on disk do not carry.
pub(crate) fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i].is_ascii_digit() && b[j].is_ascii_digit() {
            let si = i;
            while i < a.len() && a[i].is_ascii_digit() {
                i += 1;
            }
            let sj = j;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            // Compare the digit runs as numbers without parsing (they may exceed u64).
            let (na, nb) = (trim_zeros(&a[si..i]), trim_zeros(&b[sj..j]));
            let ord = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
            if ord != Ordering::Equal {
                return ord;
            }
        } else {
            let ord = a[i].cmp(&b[j]);
            if ord != Ordering::Equal {
                return ord;
            }
            i += 1;
            j += 1;
        }
    }
    // Equal prefixes: shorter first; finally the raw bytes so that `a01` and `a1` still differ.
    (a.len() - i).cmp(&(b.len() - j)).then_with(|| a.cmp(b))
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let k = d.iter().position(|c| *c != b'0').unwrap_or(d.len());
    &d[k..]
}

/// An advisory lock on a repository directory, released on drop. Exclusive for writers, shared
/// for readers, so a reader never sees a half-applied update.
#[derive(Debug)]
pub(crate) struct RepoLock {
    _file: File,
}

impl RepoLock {
    /// Takes the exclusive lock of `dir`, creating the directory and lock file if needed, and
    /// records our pid in the lock file so a waiter that times out can name the holder.
    pub(crate) fn exclusive(dir: &Path) -> Result<RepoLock> {
        ensure_dir(dir)?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("open lock file", &path, FIX_PERM))?;
        wait_for_lock(dir, &path, &file, true, LOCK_WAIT)?;
        // The pid is a hint for operators only; failing to write it must not fail the update.
        let _ = file
            .set_len(0)
            .and_then(|_| file.write_all(format!("{}\n", std::process::id()).as_bytes()));
        Ok(RepoLock { _file: file })
    }

    /// Takes the shared lock of `dir` if the lock file can be opened; `None` when the
    /// repository is read-only to us (then no writer of ours can race the read either).
    pub(crate) fn shared(dir: &Path) -> Result<Option<RepoLock>> {
        let path = dir.join(LOCK_FILE);
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
        {
            Ok(f) => f,
            Err(_) => match File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    tracing::debug!(lock = %path.display(), error = %e, "reading repository without its lock");
                    return Ok(None);
                }
            },
        };
        wait_for_lock(dir, &path, &file, false, LOCK_WAIT)?;
        Ok(Some(RepoLock { _file: file }))
    }
}

// `File::try_lock` (flock on Linux) is stable since Rust 1.89.
fn wait_for_lock(
    dir: &Path,
    path: &Path,
    file: &File,
    exclusive: bool,
    wait: Duration,
) -> Result<()> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    // Bounded: the pause grows to 50 ms, so 10 s take at most a few hundred attempts.
    for _attempt in 0..10_000u32 {
        let r = if exclusive {
            file.try_lock()
        } else {
            file.try_lock_shared()
        };
        match r {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err("lock", path, FIX_PERM)(e)),
        }
        if start.elapsed() >= wait {
            break;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    let mut text = String::new();
    let holder = File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .ok()
        .and_then(|_| text.trim().parse::<u32>().ok());
    Err(ConfigError::LockTimeout {
        dir: dir.to_path_buf(),
        lock: path.to_path_buf(),
        waited_s: wait.as_secs(),
        holder,
    })
}

/// Writes `<pid>\n` of this process to `path` atomically (temp + rename), so a reader never
/// sees a partial pid (node agents and servers each keep one in the profile's `run/`).
pub fn write_pid_file(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("pid.tmp{}", std::process::id()));
    std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_counts_numbers() {
        let mut v = vec!["server10", "server2", "server1", "a", "server02", "b1"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["a", "b1", "server1", "server02", "server2", "server10"]);
        assert_eq!(natural_cmp("x", "x"), std::cmp::Ordering::Equal);
    }

    #[test]
    fn compact_timestamp_shape() {
        let s = now_compact();
        assert_eq!(&s[8..9], "T");
        assert!(s.ends_with('Z'));
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("a.toml");
        write_atomic(&p, b"one").expect("write");
        write_atomic(&p, b"two").expect("write");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        let names: Vec<_> = std::fs::read_dir(d.path())
            .expect("ls")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn lock_wait_is_bounded_and_names_the_holder() {
        let d = tempfile::tempdir().expect("tempdir");
        let _held = RepoLock::exclusive(d.path()).expect("lock");
        let path = d.path().join(LOCK_FILE);
        let f = File::open(&path).expect("open");
        let start = Instant::now();
        let e =
            wait_for_lock(d.path(), &path, &f, true, Duration::from_millis(100)).expect_err("held");
        assert!(start.elapsed() < Duration::from_secs(5));
        match &e {
            ConfigError::LockTimeout { lock, holder, .. } => {
                assert_eq!(lock, &path);
                assert_eq!(*holder, Some(std::process::id()));
            }
            other => panic!("{other:?}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains(&path.display().to_string())
                && msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
    }

    #[test]
    fn exclusive_lock_excludes_and_records_pid() {
        let d = tempfile::tempdir().expect("tempdir");
        let l = RepoLock::exclusive(d.path()).expect("lock");
        let text = std::fs::read_to_string(d.path().join(LOCK_FILE)).expect("read");
        assert_eq!(text.trim(), std::process::id().to_string());
        // A second exclusive try on another open file description must block.
        let f = File::open(d.path().join(LOCK_FILE)).expect("open");
        let busy = matches!(f.try_lock_shared(), Err(std::fs::TryLockError::WouldBlock));
        assert!(busy);
        drop(l);
        let free = f.try_lock_shared().is_ok();
        assert!(free);
    }
}

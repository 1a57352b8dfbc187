//! Test support: a small tmpfs to fill up, so tests meet a real full disk (ENOSPC from the
//! kernel, not a simulation). Mounting needs root, which the tests have here and in CI; a
//! test that cannot mount fails and says why, it never passes silently.

use std::io::Write;
use std::path::Path;
use std::process::Command;

/// A tmpfs mounted on a fresh temporary directory; unmounted when dropped, also when the test
/// fails (lazily: a process still holding a file open there does not keep it mounted).
pub struct Tmpfs {
    dir: std::path::PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_bytes` on a new directory under the system's temp dir.
    /// Panics with the reason when it cannot (not root, no mount permission).
    pub fn mount(size_bytes: u64) -> Tmpfs {
        let dir = std::env::temp_dir().join(format!(
            "keel-tmpfs-{}-{}",
            std::process::id(),
            crate::unix_ms()
        ));
        Tmpfs::mount_at(&dir, size_bytes)
    }

    /// Mounts a tmpfs of `size_bytes` on `dir` (created if absent; whatever it held is hidden
    /// until the unmount). Panics with the reason when it cannot.
    pub fn mount_at(dir: &Path, size_bytes: u64) -> Tmpfs {
        assert!(size_bytes >= 64 * 1024, "a tmpfs of at least 64 KiB");
        std::fs::create_dir_all(dir).expect("create the tmpfs mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_bytes},mode=0700"))
            .arg("keel-test")
            .arg(dir)
            .output();
        let why = match out {
            Ok(o) if o.status.success() => {
                return Tmpfs {
                    dir: dir.to_path_buf(),
                }
            }
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => format!("cannot run mount: {e}"),
        };
        let _ = std::fs::remove_dir(dir);
        panic!(
            "this test fills a small tmpfs to meet a real full disk and must mount one (it runs \
             as root in CI); `mount -t tmpfs` failed: {why}"
        );
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Writes `filler` until its file system is full to the last byte: 64 KiB writes, then 4 KiB,
/// then single bytes (each bounded by the count a small tmpfs can take). Returns its size.
pub fn fill(filler: &Path) -> u64 {
    let mut f = std::fs::File::create(filler).expect("create the filler file");
    let mut bytes = 0u64;
    for chunk in [65_536usize, 4_096, 1] {
        let buf = vec![0x5au8; chunk];
        // Bounded: a test tmpfs is a few MiB, at most a few thousand writes of each size.
        for _ in 0..100_000 {
            if f.write_all(&buf).is_err() {
                break;
            }
            bytes += chunk as u64;
        }
    }
    bytes
}

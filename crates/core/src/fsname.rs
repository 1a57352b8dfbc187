//! Names for files, computed without touching the file system: random suffixes for temporary
//! files, the time stamps written into manifests and backups, and the directory that holds a
//! path. The config repository and the data stores both name their temporary files and backups
//! with these, so there is one definition of each. Each crate keeps its own `fsync_dir` and
//! `io_err`, because those build the crate's own error type.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// `n` random bytes (1 to 32) as lowercase hex, for temporary file names that never collide.
pub fn random_hex(n: usize) -> String {
    assert!(n > 0 && n <= 32, "random_hex takes 1 to 32 bytes, not {n}");
    let mut buf = [0u8; 32];
    // Randomness only avoids name collisions here; if the OS source fails, the clock and the
    // pid are still unique enough for a temporary name.
    if getrandom::fill(&mut buf[..n]).is_err() {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let seed = nanos ^ (u128::from(std::process::id()) << 64);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = (seed >> ((i % 16) * 8)) as u8;
        }
    }
    buf[..n].iter().map(|b| format!("{b:02x}")).collect()
}

/// Now as RFC 3339 with whole seconds, UTC (`2025-01-31T12:00:00Z`).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_have_their_shapes() {
        let a = random_hex(6);
        assert_eq!(a.len(), 12);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(random_hex(16), random_hex(16));
        assert_eq!(random_hex(32).len(), 64);
        let t = now_rfc3339();
        assert!(t.len() == 20 && t.ends_with('Z'), "{t}");
        assert_eq!(parent_of(Path::new("a.sqlite")), PathBuf::from("."));
        assert_eq!(parent_of(Path::new("/x/a.sqlite")), PathBuf::from("/x"));
    }
}

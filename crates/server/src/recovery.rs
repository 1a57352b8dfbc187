//! Whether a server has recovery logs (a `--recovery` start without them is refused). The
//! recovery itself is the transaction service's (`txsvc`).
//!
//! What counts as "has recovery logs": a non-empty file anywhere under
//! `tranlog/<cell>/<node>/<server>/` (the tranlog and partnerlog directories). A clean shutdown
//! leaves empty logs, so a recovery start after a clean stop is refused.

use std::path::Path;

/// Bounded directory walk (depth 4, 10 000 entries): a recovery log directory is small.
pub fn has_logs(dir: &Path) -> bool {
    fn walk(dir: &Path, depth: u32, budget: &mut u32) -> bool {
        if depth > 4 {
            return false;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return false;
        };
        for entry in entries.flatten() {
            if *budget == 0 {
                return false;
            }
            *budget -= 1;
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_file() && meta.len() > 0 {
                return true;
            }
            if meta.is_dir() && walk(&entry.path(), depth + 1, budget) {
                return true;
            }
        }
        false
    }
    let mut budget = 10_000;
    walk(dir, 0, &mut budget)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_non_empty_files_count_as_logs() {
        let d = tempfile::tempdir().unwrap();
        assert!(!has_logs(&d.path().join("missing")));
        std::fs::create_dir_all(d.path().join("tranlog")).unwrap();
        std::fs::write(d.path().join("tranlog/log1"), b"").unwrap();
        assert!(!has_logs(d.path()));
        std::fs::write(d.path().join("tranlog/log2"), b"x").unwrap();
        assert!(has_logs(d.path()));
    }
}

//! Recovery-mode plumbing of the server. The transaction service (a later crate) plugs in as a
//! `Participant`. With logs present and no participant able to replay them, a recovery start
//! is refused and the logs are left untouched: reporting "nothing to do" would be a lie.
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

/// Something that replays recovery logs: finishes in-doubt transactions at every resource.
pub trait Participant: Send + Sync {
    fn name(&self) -> &str;
    /// Resolves everything the logs hold; returns how many transactions it resolved.
    fn recover<'a>(
        &'a self,
        tranlog_dir: &'a Path,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, String>> + Send + 'a>>;
}

/// Runs every participant to completion and returns how many in-doubt transactions they
/// resolved in total. Refuses when there is none: the logs would go unread.
pub async fn run_participants(
    participants: &[Box<dyn Participant>],
    tranlog_dir: &Path,
) -> Result<u64, String> {
    if participants.is_empty() {
        return Err(format!(
            "recovery logs exist under {} but this build of Keel has no transaction service to replay them; the logs are left untouched",
            tranlog_dir.display()
        ));
    }
    let mut resolved = 0u64;
    for p in participants {
        resolved += p
            .recover(tranlog_dir)
            .await
            .map_err(|e| format!("{}: {e}", p.name()))?;
    }
    Ok(resolved)
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

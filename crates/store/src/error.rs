//! One error type for the crate, written for an operator: what failed, on which store, ME or
//! file, and what to do. `Clone` because one failed group commit answers many callers.

use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("data store {} of messaging engine {me} is corrupt ({detail}); stop the messaging engine and restore its store from a backup with `keel store restore`", file.display())]
    Corrupt {
        me: String,
        file: PathBuf,
        detail: String,
    },

    /// SQLITE_FULL or ENOSPC: the transaction did not commit, so nothing acknowledged is lost.
    /// The store keeps running and commits again as soon as a write fits (DESIGN §10).
    #[error("data store of messaging engine {me}: the disk is full ({}); this change was not stored (nothing acknowledged is lost); free space on that file system: sends resume by themselves", file.display())]
    DiskFull { me: String, file: PathBuf },

    /// The store takes no more work: its state on disk is in doubt (a failed fsync of a commit,
    /// corruption found while writing) or its writer stopped. Reopening it recovers from what
    /// the disk holds.
    #[error("data store {} of messaging engine {me} has failed and takes no more work ({reason}); check the disk (`dmesg`), then restart the messaging engine (`keel me stop {me}` then `keel me start {me}`, or restart its server): the store recovers from its files when it opens", file.display())]
    Failed {
        me: String,
        file: PathBuf,
        reason: String,
    },

    #[error("data store {} belongs to messaging engine {found_me} (uuid {found_uuid}), not {want_me} (uuid {want_uuid}); point {want_me} at its own store", file.display())]
    WrongOwner {
        file: PathBuf,
        found_me: String,
        found_uuid: String,
        want_me: String,
        want_uuid: String,
    },

    #[error("data store {} has schema version {found}, newer than this Keel supports ({supported}); run the Keel version that wrote it, or restore a backup taken by this version", file.display())]
    SchemaTooNew {
        file: PathBuf,
        found: u32,
        supported: u32,
    },

    #[error("data store {} already exists; open it instead, or move it away to start empty", file.display())]
    AlreadyExists { file: PathBuf },

    #[error("data store {} does not exist; create it (a new messaging engine creates its store on first start) or restore it from a backup", file.display())]
    Missing { file: PathBuf },

    /// Delete, Move or SetDeliveryCount of a message that is not there: a bug in the caller.
    #[error("message seq {seq} is not on destination `{dest}` in the data store of messaging engine {me}; the batch was not applied (acknowledging or moving a message twice is a bug: report it)")]
    NoSuchMessage { me: String, dest: String, seq: u64 },

    /// An op or a read breaks a rule (a caller bug, never the operator's doing).
    #[error("data store of messaging engine {me} refused a request: {problem}; nothing was changed (this is a bug in the caller: report it)")]
    Invalid { me: String, problem: String },

    #[error("data store of messaging engine {me} is closed; restart the messaging engine")]
    Closed { me: String },

    #[error("data store {} of messaging engine {me}: {action} failed: {source}; check the file's permissions and the disk, then retry", file.display())]
    Sqlite {
        me: String,
        file: PathBuf,
        action: String,
        source: Arc<rusqlite::Error>,
    },

    #[error("data store {location} of messaging engine {me}: {action} failed: {source}; check that PostgreSQL is running and reachable, and that the configured user may use that database and schema")]
    Postgres {
        me: String,
        location: String,
        action: String,
        source: Arc<tokio_postgres::Error>,
    },

    /// Another process (or another handle in this one) holds the store's writer lock.
    #[error("data store {location} of messaging engine {me} is in use: another process has it open; stop the messaging engine that runs it (a restore needs it stopped), then retry")]
    InUse { me: String, location: String },

    #[error("could not {action} {}: {source}; {fix}", path.display())]
    Io {
        action: String,
        path: PathBuf,
        source: Arc<std::io::Error>,
        fix: String,
    },

    #[error("backup {} is damaged ({how}); nothing was restored and the current store is unchanged; use another backup", file.display())]
    BackupDamaged { file: PathBuf, how: String },

    #[error("backup {} belongs to messaging engine {found_me} (uuid {found_uuid}), not {want_me} (uuid {want_uuid}); nothing was restored; restore a backup taken of {want_me}", file.display())]
    ForeignBackup {
        file: PathBuf,
        found_me: String,
        found_uuid: String,
        want_me: String,
        want_uuid: String,
    },

    #[error("backup target {} already exists; choose another file name or move the old backup away", path.display())]
    TargetExists { path: PathBuf },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The usual advice for a failed file-system call.
pub(crate) const FIX_PERM: &str =
    "check that the path exists, that you have permission, and that the disk is not full";

/// Wraps an `io::Error` with the action, the path and the fix.
pub(crate) fn io_err<'a>(
    action: &'a str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action: action.to_string(),
        path: path.to_path_buf(),
        source: Arc::new(source),
        fix: FIX_PERM.to_string(),
    }
}

//! A messaging engine's durable data store, behind one trait ([`Store`]) so that backends are
//! interchangeable: SQLite ([`SqliteStore`], the embedded default with an online backup) and
//! PostgreSQL ([`PgStore`], a shared store, so an ME can move to another server). Every
//! backend must pass the same [`conformance`] suite.
//!
//! What the store guarantees (DESIGN.md §4, §5):
//! - it is stamped with its ME's UUID and name and refuses to open for another ME;
//! - it records its *restore state* (`none`, `restored`, or `flush-pending` while a FLUSH start
//!   waits for its peers) and an *incarnation* that every start of its engine moves to at least
//!   the current Unix time in ms (see [`next_incarnation`]), so system message IDs are unique
//!   for all time: after a restore, and also after a store file was copied back behind Keel's
//!   back (which the bus handshake relies on, DESIGN §5);
//! - [`Store::commit`] applies a batch of [`Op`]s atomically and resolves only once durable;
//!   concurrent batches are group-committed (one transaction, one fsync, many callers);
//! - messages, transmission-queue entries (`stream`) and small durable state (`SetKv`: stream
//!   prefixes, subscriptions, prepared-xid markers) change in the same transaction;
//! - reads are paged with a bound, so an ME holding millions of messages uses bounded RAM;
//! - a restore verifies the backup completely before it replaces anything, and marks the store
//!   `restored`;
//! - it says whether it takes work ([`Store::health`], [`StoreHealth`]): a full disk is
//!   `disk-full` and clears by itself at the next commit that fits; a store whose files are in
//!   doubt is `failed` until its engine reopens it. PostgreSQL stores report `ok` always (the
//!   trait's default; not built yet for that backend).
//!
//! An engine uses PostgreSQL when its bus member has a `store_url` (one schema per engine),
//! else SQLite. `keel-testkit`'s `pgtest` gives the conformance suite a throwaway cluster.

mod bodylog;
mod commit;

/// Measures the fuzz targets' allocations (`bodylog`); the unit-test binary only.
#[cfg(test)]
#[global_allocator]
static FUZZ_ALLOC: keel_core::fuzz::CountingAlloc = keel_core::fuzz::CountingAlloc;
pub mod conformance;
mod error;
mod fsx;
mod pg;
mod sqlite;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

pub use error::{Result, StoreError};
pub use pg::PgStore;
pub use sqlite::{
    disk_bytes, manifest_path, read_info, restore_from, verify_file, BackupManifest, RestoreReport,
    SqliteStore,
};

/// The current schema version of the data store. A store with a newer one is refused; older
/// ones are migrated on open. Version 2 put SQLite's large bodies in a body log (PostgreSQL's
/// tables did not change; its stores only record the new number).
pub const SCHEMA_VERSION: u32 = 2;

/// The most messages one [`Store::page`] or [`Store::by_stream`] call may return. Bounds the
/// memory of one read; an ME pages through a destination instead of loading it.
pub const PAGE_LIMIT_MAX: usize = 10_000;

/// The most ops one [`Store::commit`] call may carry. A bigger batch is a caller bug (an ME
/// commits one consumer transaction or one producer batch at a time).
pub const BATCH_OPS_MAX: usize = 4_096;

/// The most payload bytes (bodies, properties, ids, kv values) one commit call may carry.
pub const BATCH_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Where the SQLite data store of messaging engine `me_name` lives inside a profile.
pub fn sqlite_path(layout: &keel_core::Layout, me_name: &str) -> PathBuf {
    assert!(!me_name.is_empty(), "a messaging engine has a name");
    layout.databases().join(format!("{me_name}.sqlite"))
}

/// Whether the store was put back from a backup and not yet FLUSH-started since, or
/// FLUSH-started with the flush of its delivery streams not yet confirmed by every peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreState {
    None,
    Restored,
    /// A FLUSH start ran; some peer has not confirmed it yet (DESIGN §5). A normal start
    /// continues the flush.
    FlushPending,
}

impl RestoreState {
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreState::None => "none",
            RestoreState::Restored => "restored",
            RestoreState::FlushPending => "flush-pending",
        }
    }
    pub fn parse(s: &str) -> Option<RestoreState> {
        match s {
            "none" => Some(RestoreState::None),
            "restored" => Some(RestoreState::Restored),
            "flush-pending" => Some(RestoreState::FlushPending),
            _ => None,
        }
    }
}

impl std::fmt::Display for RestoreState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a store says about itself (`keel store info`, the admin API, the start-up checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreInfo {
    pub me: String,
    pub uuid: String,
    /// `"sqlite"` or `"postgresql"`.
    pub backend: &'static str,
    /// The file path, or the URL without its password.
    pub location: String,
    pub restore_state: RestoreState,
    pub messages: u64,
    pub schema_version: u32,
    pub incarnation: u64,
}

/// A store's own account of whether it takes work (DESIGN §10: a resource that fails degrades
/// visibly, never broken while reported healthy). The engine's admin object, `keel me state`
/// and the server's health show it; the store logs each change once (`CWSIP0112W` disk full,
/// `CWSIP0113I` writing again, `CWSIP0114E` failed), never once per refused commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreHealth {
    Ok,
    /// Commits fail for lack of space on `path`'s file system since `since_ms` (Unix ms);
    /// nothing is lost, and the first commit that fits again clears it by itself.
    DiskFull {
        since_ms: u64,
        path: PathBuf,
        /// Commits refused since then.
        refused: u64,
    },
    /// The store takes no more work until the engine reopens it (see [`StoreError::Failed`]).
    Failed {
        since_ms: u64,
        reason: String,
    },
}

impl StoreHealth {
    /// `ok`, `disk-full` or `failed`: the word scripts match on.
    pub fn as_str(&self) -> &'static str {
        match self {
            StoreHealth::Ok => "ok",
            StoreHealth::DiskFull { .. } => "disk-full",
            StoreHealth::Failed { .. } => "failed",
        }
    }

    /// The JSON of the admin attribute: `state`, `since` (RFC 3339), and what else applies.
    pub fn to_json(&self) -> serde_json::Value {
        let since = |ms: u64| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
            .to_string()
        };
        match self {
            StoreHealth::Ok => serde_json::json!({ "state": "ok" }),
            StoreHealth::DiskFull {
                since_ms,
                path,
                refused,
            } => serde_json::json!({
                "state": "disk-full",
                "since": since(*since_ms),
                "path": path.display().to_string(),
                "refused": refused,
            }),
            StoreHealth::Failed { since_ms, reason } => serde_json::json!({
                "state": "failed",
                "since": since(*since_ms),
                "reason": reason,
            }),
        }
    }
}

impl std::fmt::Display for StoreHealth {
    /// One line for an operator: `ok`, `disk-full since T (path; N commit(s) refused)`,
    /// `failed since T: why`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let j = self.to_json();
        let since = j["since"].as_str().unwrap_or("");
        match self {
            StoreHealth::Ok => f.write_str("ok"),
            StoreHealth::DiskFull { path, refused, .. } => write!(
                f,
                "disk-full since {since} ({}; {refused} commit(s) refused; free space: sends resume by themselves)",
                path.display()
            ),
            StoreHealth::Failed { reason, .. } => write!(f, "failed since {since}: {reason}"),
        }
    }
}

/// One message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub dest: String,
    /// Assigned by the store on Put: strictly increasing per store, never reused, survives a
    /// restart. Kept by [`Op::Move`].
    pub seq: u64,
    /// The system ID (`<me-uuid>:<incarnation>:<seq>`) or a foreign one.
    pub id: String,
    /// 0..=9; higher is delivered first.
    pub priority: u8,
    pub reliability: u8,
    /// Unix time in milliseconds after which the message expires.
    pub expiry_ms: Option<u64>,
    pub delivery_count: u32,
    /// Opaque to the store.
    pub properties: Vec<u8>,
    pub body: Vec<u8>,
    /// `(stream_id, tick)` of a transmission-queue entry.
    pub stream: Option<(String, u64)>,
}

/// One change inside a [`Store::commit`] batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Stores a message; the store assigns its `seq` (returned in [`CommitOutcome`] in op
    /// order). An empty `id` asks the store for the system ID `<me-uuid>:<incarnation>:<seq>`.
    Put {
        dest: String,
        id: String,
        priority: u8,
        reliability: u8,
        expiry_ms: Option<u64>,
        properties: Vec<u8>,
        body: Vec<u8>,
        stream: Option<(String, u64)>,
    },
    /// Removes a message. Fails (the whole batch) if it is absent: acknowledging a message
    /// twice is a bug upstream.
    Delete { dest: String, seq: u64 },
    /// Records a redelivery count. Fails if the message is absent.
    SetDeliveryCount { dest: String, seq: u64, count: u32 },
    /// Moves a message to another destination (e.g. the exception destination), keeping its
    /// seq. Fails if it is absent from `from`; `from` and `to` must differ.
    Move { from: String, seq: u64, to: String },
    /// Durable small state: stream prefixes, subscriptions, prepared-xid markers …
    SetKv {
        space: String,
        key: String,
        value: Vec<u8>,
    },
    /// Removes a key; removing an absent key is not an error (idempotent clean-up).
    DeleteKv { space: String, key: String },
    /// Moves the store's restore state (a FLUSH start and its completion), in the same
    /// transaction as the stream changes that justify it.
    SetRestoreState(RestoreState),
}

impl Op {
    /// Payload bytes the op carries, for the batch and transaction byte bounds.
    pub fn bytes(&self) -> usize {
        match self {
            Op::Put {
                dest,
                id,
                properties,
                body,
                stream,
                ..
            } => {
                dest.len()
                    + id.len()
                    + properties.len()
                    + body.len()
                    + stream.as_ref().map_or(0, |s| s.0.len())
                    + 32
            }
            Op::Delete { dest, .. } | Op::SetDeliveryCount { dest, .. } => dest.len() + 16,
            Op::Move { from, to, .. } => from.len() + to.len() + 16,
            Op::SetKv { space, key, value } => space.len() + key.len() + value.len(),
            Op::DeleteKv { space, key } => space.len() + key.len(),
            Op::SetRestoreState(_) => 16,
        }
    }
}

/// What a successful commit returns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommitOutcome {
    /// The seq of every [`Op::Put`] of the batch, in op order.
    pub assigned_seqs: Vec<u64>,
}

/// The incarnation after `current`: greater than it, and at least the Unix time in ms, so a
/// store put back to an older copy (whose incarnation is behind) still never reissues one, as
/// long as the clock does not go back by more than the time since the copy.
pub fn next_incarnation(current: u64) -> u64 {
    let next = current.saturating_add(1).max(keel_core::unix_ms());
    assert!(next > current, "incarnation space exhausted");
    next
}

/// Seqs reserved at a time in `meta.next_seq`. The stored value is a reservation (every seq
/// handed out is below it), not the exact next seq: rewriting the meta row in every group commit
/// cost the writer a statement and a page per commit. A reopened store starts at the
/// reservation, so a crash or restart skips at most this many seqs (gaps are allowed; reuse is
/// not), and 2^63 seqs last 8.8 million years at a million a second even skipping 2^20 per
/// restart every second.
pub const SEQ_RESERVE: u64 = 1 << 20;

/// The reservation a group commit must store so every seq below `next_seq` is covered, or
/// `None` when `reserved` (the stored one) covers them already.
pub(crate) fn seq_reservation(next_seq: u64, reserved: u64) -> Option<u64> {
    assert!(next_seq > 0 && reserved > 0);
    (next_seq > reserved).then(|| {
        let r = next_seq
            .checked_add(SEQ_RESERVE)
            .expect("seq space exhausted");
        assert!(r < i64::MAX as u64, "seq space exhausted");
        r
    })
}

/// The read-back of the seq invariant when a store opens: every stored seq (`seq_max`, the
/// highest) is below the reservation. `Err` holds the corruption detail.
pub(crate) fn check_seq_max(
    seq_max: Option<i64>,
    next_seq: u64,
) -> std::result::Result<(), String> {
    match seq_max {
        Some(max) if max < 1 || max as u64 >= next_seq => Err(format!(
            "message seq {max} is not below meta next_seq {next_seq}"
        )),
        _ => Ok(()),
    }
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// A messaging engine's data store. Every method is cancel-safe in the sense that dropping the
/// future never leaves a batch half-applied (a commit either happens whole or not at all).
pub trait Store: Send + Sync + 'static {
    /// Atomically applies all ops; resolves only once durable. Concurrent callers are
    /// group-committed; a batch whose op fails fails alone.
    fn commit(&self, ops: Vec<Op>) -> StoreFuture<'_, CommitOutcome>;
    /// Messages of `dest` in delivery order (priority DESC, then seq ASC), strictly after the
    /// cursor `after = Some((priority, seq))`, at most `limit` (≤ [`PAGE_LIMIT_MAX`]).
    fn page(
        &self,
        dest: &str,
        after: Option<(u8, u64)>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<StoredMessage>>;
    /// How many messages `dest` holds.
    fn depth(&self, dest: &str) -> StoreFuture<'_, u64>;
    /// Every destination holding messages, with its count, sorted by name.
    fn destinations(&self) -> StoreFuture<'_, Vec<(String, u64)>>;
    /// Transmission-queue entries of `stream_id` with tick ≥ `from_tick`, in tick order, at
    /// most `limit` (≤ [`PAGE_LIMIT_MAX`]).
    fn by_stream(
        &self,
        stream_id: &str,
        from_tick: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<StoredMessage>>;
    fn kv_get(&self, space: &str, key: &str) -> StoreFuture<'_, Option<Vec<u8>>>;
    /// Every key of `space`, sorted by key.
    fn kv_scan(&self, space: &str) -> StoreFuture<'_, Vec<(String, Vec<u8>)>>;
    fn info(&self) -> StoreFuture<'_, StoreInfo>;
    /// Moves the incarnation to [`next_incarnation`] and returns it, in one durable
    /// transaction; with `clear_restored` (a FLUSH start) also sets the restore state to `none`.
    /// Every start of the engine calls it before minting a message ID.
    fn begin_incarnation(&self, clear_restored: bool) -> StoreFuture<'_, u64>;
    /// Finishes queued work and releases the store; later calls fail with
    /// [`StoreError::Closed`].
    fn close(&self) -> StoreFuture<'_, ()>;
    /// Whether the store takes work (cheap: no I/O). A backend whose errors are all the
    /// caller's to see (PostgreSQL: the server reports its own condition) says `Ok`.
    fn health(&self) -> StoreHealth {
        StoreHealth::Ok
    }
}

#[cfg(test)]
mod incarnation_tests {
    #[test]
    fn next_incarnation_is_later_and_follows_the_clock() {
        let now = super::next_incarnation(0);
        assert!(now > 1_700_000_000_000, "Unix time in ms: {now}");
        // Behind the clock (an old copy): jumps to the clock.
        assert!(super::next_incarnation(5) >= now);
        // Ahead of the clock (the clock went back): still one more.
        let ahead = now + 10_000_000;
        assert_eq!(super::next_incarnation(ahead), ahead + 1);
    }
}

#[cfg(test)]
mod seq_reservation_tests {
    use super::{seq_reservation, SEQ_RESERVE};

    #[test]
    fn open_refuses_a_seq_at_or_past_the_reservation() {
        assert_eq!(super::check_seq_max(None, 1), Ok(()));
        assert_eq!(super::check_seq_max(Some(9), 10), Ok(()));
        assert!(super::check_seq_max(Some(10), 10)
            .unwrap_err()
            .contains("seq 10"));
        assert!(super::check_seq_max(Some(0), 10).is_err());
    }

    #[test]
    fn a_reservation_is_written_only_when_seqs_pass_it() {
        // A fresh store: meta says 1, nothing handed out yet.
        assert_eq!(seq_reservation(1, 1), None);
        // Seqs 1..=10 handed out: next is 11, past the stored 1.
        assert_eq!(seq_reservation(11, 1), Some(11 + SEQ_RESERVE));
        // Inside the reservation: nothing to write.
        assert_eq!(seq_reservation(11 + SEQ_RESERVE, 11 + SEQ_RESERVE), None);
        assert_eq!(
            seq_reservation(12 + SEQ_RESERVE, 11 + SEQ_RESERVE),
            Some(12 + 2 * SEQ_RESERVE)
        );
    }
}

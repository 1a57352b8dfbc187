//! The SQLite backend: one file per messaging engine (`<profile>/databases/<me>.sqlite`), WAL
//! mode with `synchronous=FULL`, one writer thread that group-commits, one reader thread, an
//! online backup and an offline restore.
//!
//! Schema (version 2; version 1 lacked the body_* columns and `segments`):
//! ```text
//! meta(key PRIMARY KEY, value)      me_name, me_uuid, schema_version, incarnation,
//!                                   restore_state, next_seq, created_at
//! messages(seq INTEGER PRIMARY KEY, dest, id, priority, reliability, expiry_ms,
//!          delivery_count, properties, body, stream_id, tick,
//!          body_seg, body_at, body_len, body_crc)   body in the body log when body_seg is set
//!   index (dest, priority DESC, seq)             delivery-order paging
//!   index (stream_id, tick) WHERE stream_id …    transmission-queue resend
//! dests(dest PRIMARY KEY, depth)    maintained in the same transaction, so depth() and
//!                                   destinations() never count a whole destination
//! kv(space, key, value, PRIMARY KEY (space, key))
//! segments(seg PRIMARY KEY, bytes, live_bytes, seq_min, seq_max)   the body log's accounting
//! ```
//! Beside the database: `<store>.lock`, flock-held while a store is open (one writer per
//! store; no restore under a running ME), SQLite's own `-wal`/`-shm` files, and the body log
//! `<store>-bodies/` (see `bodylog`).
//!
//! `seq` is unique per store (a Move keeps it), so it is the rowid: `next_seq` in `meta` is a
//! reservation ([`crate::SEQ_RESERVE`] ahead), moved on in the same transaction as the Puts
//! that pass it, so a seq is never reused, even after the message holding the highest one is
//! deleted; a reopened store starts at the reservation.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction};
use tokio::sync::{mpsc, oneshot};

use crate::bodylog::{self, Appender, BodyError, BodyRef, Segments};
use crate::error::{io_err, Result, StoreError};
use crate::fsx;
use crate::{
    CommitOutcome, Op, RestoreState, Store, StoreFuture, StoreHealth, StoreInfo, StoredMessage,
    BATCH_BYTES_MAX, BATCH_OPS_MAX, PAGE_LIMIT_MAX, SCHEMA_VERSION,
};
use keel_core::{catalog, emit};

/// Bounds of one group commit (one SQLite transaction, one fsync). A group stops growing at
/// the first bound reached; a single batch larger than a bound still commits, alone.
pub(crate) const TXN_BATCHES_MAX: usize = 256;
pub(crate) const TXN_OPS_MAX: usize = 8_192;
pub(crate) const TXN_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Body-log bytes a simulated full disk still takes (test hook).
const BODY_LOG_ROOM_WHEN_FULL: u64 = 64 * 1024;
/// How long the writer waits for more batches when callers are known to be on their way. Short
/// against an fsync (milliseconds), long enough for woken tasks to enqueue.
pub(crate) const LINGER_US: u64 = 1_000;
/// Batches queued for the writer before callers wait (backpressure, bounded memory).
pub(crate) const WRITE_QUEUE_MAX: usize = 1_024;
/// Read requests queued for the reader thread.
const READ_QUEUE_MAX: usize = 1_024;
/// Pages copied per backup step: small enough to report progress, big enough to be quick.
const BACKUP_STEP_PAGES: i32 = 1_024;
/// A manifest is a few hundred bytes; anything much larger is not ours.
const MANIFEST_BYTES_MAX: u64 = 64 * 1024;

const SELECT_COLS: &str = "dest, seq, id, priority, reliability, expiry_ms, delivery_count, \
                           properties, body, stream_id, tick, body_seg, body_at, body_len, body_crc";
/// Body-log rows relocated into their rows by one compaction transaction.
const COMPACT_ROWS_MAX: usize = 512;
/// Segments compacted at most per look.
const COMPACT_SEGMENTS_PER_CHECK: usize = 8;
/// Group commits between two looks at whether the body log needs compacting.
const COMPACT_CHECK_GROUPS: u64 = 64;
/// Rows read per step when a backup or a verify walks the body log.
const BODY_WALK_ROWS: i64 = 1_024;

fn sql_err(me: &str, file: &Path, action: &str, e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => StoreError::DiskFull {
            me: me.to_string(),
            file: file.to_path_buf(),
        },
        Some(ErrorCode::DatabaseCorrupt) | Some(ErrorCode::NotADatabase) => StoreError::Corrupt {
            me: me.to_string(),
            file: file.to_path_buf(),
            detail: format!("{action}: {e}"),
        },
        _ => StoreError::Sqlite {
            me: me.to_string(),
            file: file.to_path_buf(),
            action: action.to_string(),
            source: Arc::new(e),
        },
    }
}

/// The identity and location every error names.
#[derive(Debug, Clone)]
struct Ctx {
    me: String,
    uuid: String,
    file: PathBuf,
    /// The body log beside `file` (see `bodylog`).
    bodies: Arc<Segments>,
}

impl Ctx {
    fn new(me: &str, uuid: &str, file: &Path) -> Ctx {
        Ctx {
            me: me.to_string(),
            uuid: uuid.to_string(),
            file: file.to_path_buf(),
            bodies: Arc::new(Segments::new(file)),
        }
    }
    fn body_err(&self, e: BodyError) -> StoreError {
        match e {
            BodyError::Damaged(detail) => StoreError::Corrupt {
                me: self.me.clone(),
                file: self.file.clone(),
                detail,
            },
            BodyError::Io(path, e) => io_err("read message bodies from", &path)(e),
        }
    }
    /// An error of the body log's writer: a full disk is `DiskFull` like SQLite's own.
    fn log_err(&self, action: &str, path: &Path, e: std::io::Error) -> StoreError {
        if bodylog::is_disk_full(&e) {
            return StoreError::DiskFull {
                me: self.me.clone(),
                file: path.to_path_buf(),
            };
        }
        io_err(action, path)(e)
    }
    fn err(&self, action: &str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        let action = action.to_string();
        move |e| sql_err(&self.me, &self.file, &action, e)
    }
    fn invalid(&self, problem: impl Into<String>) -> StoreError {
        StoreError::Invalid {
            me: self.me.clone(),
            problem: problem.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Opening, stamping, checking.

/// Takes the store's writer lock: an exclusive `flock` on `<store>.lock`, held for the life of
/// an open store (the kernel drops it if the process dies). Two writers would each hand out
/// the same seqs, and a restore under a running ME would pull the file from under it. A
/// separate file, because closing any other descriptor of the database itself would drop
/// SQLite's own POSIX locks. The lock file is never deleted (deleting lock files races).
fn take_lock(path: &Path, me: &str) -> Result<File> {
    let lock_path = fsx::with_suffix(path, ".lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(io_err("open lock file", &lock_path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(StoreError::InUse {
            me: me.to_string(),
            location: path.display().to_string(),
        }),
        Err(TryLockError::Error(e)) => Err(io_err("lock", &lock_path)(e)),
    }
}

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY,
    dest TEXT NOT NULL,
    id TEXT NOT NULL,
    priority INTEGER NOT NULL CHECK (priority BETWEEN 0 AND 9),
    reliability INTEGER NOT NULL,
    expiry_ms INTEGER,
    delivery_count INTEGER NOT NULL,
    properties BLOB NOT NULL,
    body BLOB NOT NULL,
    stream_id TEXT,
    tick INTEGER,
    CHECK ((stream_id IS NULL) = (tick IS NULL))
);
CREATE INDEX messages_delivery ON messages (dest, priority DESC, seq);
CREATE INDEX messages_stream ON messages (stream_id, tick) WHERE stream_id IS NOT NULL;
CREATE TABLE dests (dest TEXT PRIMARY KEY, depth INTEGER NOT NULL CHECK (depth > 0)) WITHOUT ROWID;
CREATE TABLE kv (space TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
                 PRIMARY KEY (space, key)) WITHOUT ROWID;
";

/// What version 2 added to version 1: bodies in the body log. A new store runs `SCHEMA` and
/// then this, exactly as a version-1 store is migrated, so there is one shape of version 2.
const SCHEMA_V2: &str = "
ALTER TABLE messages ADD COLUMN body_seg INTEGER;
ALTER TABLE messages ADD COLUMN body_at INTEGER;
ALTER TABLE messages ADD COLUMN body_len INTEGER;
ALTER TABLE messages ADD COLUMN body_crc INTEGER;
CREATE TABLE segments (seg INTEGER PRIMARY KEY, bytes INTEGER NOT NULL,
                       live_bytes INTEGER NOT NULL CHECK (live_bytes BETWEEN 0 AND bytes),
                       seq_min INTEGER NOT NULL, seq_max INTEGER NOT NULL);
";

fn set_pragmas(conn: &Connection, ctx: &Ctx) -> Result<()> {
    // WAL: readers never block the writer (backup and paging run while commits go on).
    // synchronous=FULL: a commit is durable when it returns, which `commit` promises.
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(ctx.err("set journal_mode=WAL"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(ctx.invalid(format!(
            "the file system refused WAL journal mode (got `{mode}`)"
        )));
    }
    conn.execute_batch(
        "PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=10000;",
    )
    .map_err(ctx.err("set pragmas"))?;
    Ok(())
}

fn meta_get(conn: &Connection, ctx: &Ctx, key: &str) -> Result<Option<String>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
        .map_err(ctx.err("read meta"))
}

fn meta_req(conn: &Connection, ctx: &Ctx, key: &str) -> Result<String> {
    meta_get(conn, ctx, key)?.ok_or_else(|| StoreError::Corrupt {
        me: ctx.me.clone(),
        file: ctx.file.clone(),
        detail: format!("meta key `{key}` is missing"),
    })
}

fn meta_u64(conn: &Connection, ctx: &Ctx, key: &str) -> Result<u64> {
    let v = meta_req(conn, ctx, key)?;
    v.parse().map_err(|_| StoreError::Corrupt {
        me: ctx.me.clone(),
        file: ctx.file.clone(),
        detail: format!("meta key `{key}` holds `{v}`, not a number"),
    })
}

fn meta_set(conn: &Connection, ctx: &Ctx, key: &str, value: &str) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )
    .and_then(|mut s| s.execute(params![key, value]))
    .map_err(ctx.err("write meta"))?;
    Ok(())
}

/// What the meta table says, read back and checked.
#[derive(Debug, Clone)]
struct Meta {
    me: String,
    uuid: String,
    schema_version: u32,
    incarnation: u64,
    restore_state: RestoreState,
    next_seq: u64,
}

fn read_meta(conn: &Connection, ctx: &Ctx) -> Result<Meta> {
    let corrupt = |detail: String| StoreError::Corrupt {
        me: ctx.me.clone(),
        file: ctx.file.clone(),
        detail,
    };
    let schema_version = meta_u64(conn, ctx, "schema_version")?;
    let restore = meta_req(conn, ctx, "restore_state")?;
    let meta = Meta {
        me: meta_req(conn, ctx, "me_name")?,
        uuid: meta_req(conn, ctx, "me_uuid")?,
        schema_version: u32::try_from(schema_version)
            .map_err(|_| corrupt(format!("schema_version {schema_version} is out of range")))?,
        incarnation: meta_u64(conn, ctx, "incarnation")?,
        restore_state: RestoreState::parse(&restore)
            .ok_or_else(|| corrupt(format!("restore_state `{restore}` is unknown")))?,
        next_seq: meta_u64(conn, ctx, "next_seq")?,
    };
    if meta.next_seq == 0 || meta.incarnation == 0 {
        return Err(corrupt("next_seq and incarnation start at 1".into()));
    }
    Ok(meta)
}

/// Checks a file is a Keel store of this ME with a schema we understand. Returns its meta.
fn check_identity(conn: &Connection, ctx: &Ctx) -> Result<Meta> {
    // Schema version first: a newer store may lay meta out differently.
    let has_meta: bool = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n == 1)
        .map_err(ctx.err("read schema"))?;
    if !has_meta {
        return Err(StoreError::Corrupt {
            me: ctx.me.clone(),
            file: ctx.file.clone(),
            detail: "it is an SQLite database but not a Keel data store (no meta table)".into(),
        });
    }
    let found = meta_u64(conn, ctx, "schema_version")?;
    if found > u64::from(SCHEMA_VERSION) {
        return Err(StoreError::SchemaTooNew {
            file: ctx.file.clone(),
            found: u32::try_from(found).unwrap_or(u32::MAX),
            supported: SCHEMA_VERSION,
        });
    }
    let meta = read_meta(conn, ctx)?;
    if meta.uuid != ctx.uuid || meta.me != ctx.me {
        return Err(StoreError::WrongOwner {
            file: ctx.file.clone(),
            found_me: meta.me,
            found_uuid: meta.uuid,
            want_me: ctx.me.clone(),
            want_uuid: ctx.uuid.clone(),
        });
    }
    // Older schemas are migrated by `migrate`, when the store opens for work.
    assert!(meta.schema_version >= 1 && meta.schema_version <= SCHEMA_VERSION);
    Ok(meta)
}

/// Brings a store of an older schema to `SCHEMA_VERSION`, in one transaction (a crash leaves
/// it at the old version, to be migrated at the next open).
fn migrate(conn: &mut Connection, ctx: &Ctx, meta: &mut Meta) -> Result<()> {
    if meta.schema_version == SCHEMA_VERSION {
        return Ok(());
    }
    assert_eq!(meta.schema_version, 1, "the only older schema");
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(ctx.err("begin schema migration"))?;
    tx.execute_batch(SCHEMA_V2)
        .map_err(ctx.err("migrate the schema to version 2"))?;
    meta_set(&tx, ctx, "schema_version", &SCHEMA_VERSION.to_string())?;
    tx.commit().map_err(ctx.err("commit schema migration"))?;
    tracing::info!(me = %ctx.me, file = %ctx.file.display(), from = meta.schema_version,
        to = SCHEMA_VERSION, "migrated data store schema");
    meta.schema_version = SCHEMA_VERSION;
    Ok(())
}

fn quick_check(conn: &Connection, ctx: &Ctx, pragma: &str) -> Result<()> {
    let mut stmt = conn
        .prepare(&format!("PRAGMA {pragma}"))
        .map_err(ctx.err(pragma))?;
    // Both checks stop after 100 problems by default; keep only the first few for the message.
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(ctx.err(pragma))?
        .take(5)
        .collect::<std::result::Result<_, _>>()
        .map_err(ctx.err(pragma))?;
    if rows.len() == 1 && rows[0] == "ok" {
        return Ok(());
    }
    Err(StoreError::Corrupt {
        me: ctx.me.clone(),
        file: ctx.file.clone(),
        detail: format!("{pragma} reports: {}", rows.join("; ")),
    })
}

/// Opens a connection on an existing store file, sets it up and checks its identity. `check`
/// runs `quick_check`, which reads the whole file: O(store size), about 46 s for 5 million
/// 1 KiB messages here, so it is never part of an engine start (restart must stay under 2 s).
/// Damage in pages not read at open surfaces as `Corrupt` on first access instead, and
/// `verify_file` runs the full check on demand (`keel store verify`).
fn open_conn(ctx: &Ctx, check: bool) -> Result<(Connection, Meta)> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(&ctx.file, flags).map_err(ctx.err("open"))?;
    set_pragmas(&conn, ctx)?;
    if check {
        quick_check(&conn, ctx, "quick_check")?;
    }
    let meta = check_identity(&conn, ctx)?;
    Ok((conn, meta))
}

// ---------------------------------------------------------------------------------------------
// The store.

enum WriteReq {
    Commit {
        ops: Vec<Op>,
        ops_bytes: usize,
        reply: oneshot::Sender<Result<CommitOutcome>>,
    },
    NewIncarnation {
        clear_restored: bool,
        reply: oneshot::Sender<Result<u64>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
    /// Test hook: caps the file at `pages` pages, as a full disk would.
    LimitPages {
        pages: u64,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Test hook: smaller body log segments, to exercise rolling and compaction.
    SegmentBytesMax {
        bytes: u64,
        reply: oneshot::Sender<()>,
    },
    /// Test hook: the current segment's writes fail from now on.
    BreakSegment {
        reply: oneshot::Sender<Result<()>>,
    },
    /// Test hook: the next group's commit fails as a failed fsync would (`SQLITE_IOERR_FSYNC`).
    FailNextFsync {
        reply: oneshot::Sender<()>,
    },
    /// Test hook: the writer thread panics, as a broken invariant would make it.
    Panic,
}

type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

enum ReadReq {
    Job(ReadJob),
    Close { reply: oneshot::Sender<()> },
}

/// State shared by the store handle and its writer thread.
struct Shared {
    ctx: Ctx,
    /// Commit callers that have announced a batch the writer has not taken yet: when non-zero
    /// and the queue is momentarily empty, the writer lingers for them.
    pending_batches: AtomicUsize,
    transactions_committed: AtomicU64,
    closed: AtomicBool,
    /// What the store says about itself (DESIGN §10); the writer moves it, anyone reads it.
    health: Mutex<StoreHealth>,
    /// Set when the writer thread has ended (closed, or failed with its reason recorded).
    writer_ended: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    fn health(&self) -> StoreHealth {
        // A poisoned lock still holds a whole value (it is only ever replaced).
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The error every change gets once the store has failed, if it has.
    fn failed_err(&self) -> Option<StoreError> {
        match self.health() {
            StoreHealth::Failed { reason, .. } => Some(StoreError::Failed {
                me: self.ctx.me.clone(),
                file: self.ctx.file.clone(),
                reason,
            }),
            _ => None,
        }
    }

    /// Marks the store failed (once: the first reason stays) and logs it, once.
    fn fail(&self, reason: String) -> StoreError {
        let first = {
            let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
            let first = !matches!(*h, StoreHealth::Failed { .. });
            if first {
                *h = StoreHealth::Failed {
                    since_ms: keel_core::unix_ms(),
                    reason: reason.clone(),
                };
            }
            first
        };
        if first {
            emit!(catalog::CWSIP0114E, me = self.ctx.me, reason = reason);
        }
        self.failed_err().expect("the store was just marked failed")
    }
}

/// The text of a panic's payload.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// Whether an error of the store means its files are in doubt, so it must take no more work:
/// a failed fsync of a commit (the kernel may have dropped the dirty pages and a later fsync
/// would not say so: the commit may or may not be on disk, and only reopening the store, which
/// reads the WAL back, tells), or corruption found while writing. A failed *write* is not one:
/// SQLite writes the commit frame of a WAL transaction last, so a transaction whose write failed
/// is rolled back and never recovered, and the body log cuts or abandons its tail.
fn fatal_reason(e: &StoreError) -> Option<String> {
    match e {
        StoreError::Sqlite { source, .. } => {
            let ext = source.sqlite_error().map(|f| f.extended_code)?;
            (ext == rusqlite::ffi::SQLITE_IOERR_FSYNC
                || ext == rusqlite::ffi::SQLITE_IOERR_DIR_FSYNC)
                .then(|| format!("an fsync of a commit failed, so whether that commit is on disk is unknown ({e})"))
        }
        StoreError::Corrupt { .. } => Some(e.to_string()),
        _ => None,
    }
}

/// Checks the body log against the `segments` table at open, removes files nothing points
/// into (appends of a transaction that never committed, segments whose unlink a crash cut
/// short, the old store's segments after a restore) and starts a new segment.
/// O(segments): a few stats and one small table read, never a scan of the messages.
fn open_body_log(conn: &Connection, ctx: &Ctx) -> Result<Appender> {
    let dir = ctx.bodies.dir().to_path_buf();
    let known: Vec<(u64, i64)> = conn
        .prepare("SELECT seg, live_bytes FROM segments ORDER BY seg")
        .and_then(|mut st| {
            st.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(ctx.err("read the body log's segments"))?;
    let files = bodylog::list_segments(&dir).map_err(io_err("list the body log", &dir))?;
    for &(seg, live) in &known {
        if files.binary_search(&seg).is_err() {
            if live > 0 {
                return Err(StoreError::Corrupt {
                    me: ctx.me.clone(),
                    file: ctx.file.clone(),
                    detail: format!(
                        "body log segment {} holds {live} bytes of stored messages and is missing \
                         (a store is its .sqlite file and its -bodies directory together)",
                        bodylog::segment_path(&dir, seg).display()
                    ),
                });
            }
            conn.execute("DELETE FROM segments WHERE seg = ?1", [seg as i64])
                .map_err(ctx.err("forget an empty segment"))?;
        }
    }
    for &seg in &files {
        if known.binary_search_by_key(&seg, |k| k.0).is_err() {
            let path = bodylog::segment_path(&dir, seg);
            std::fs::remove_file(&path).map_err(io_err("remove orphan body log segment", &path))?;
            tracing::info!(me = %ctx.me, segment = %path.display(), "removed a body log segment no message points into");
        }
    }
    let last = files
        .last()
        .copied()
        .max(known.last().map(|k| k.0))
        .unwrap_or(0);
    Appender::create(&dir, last + 1)
        .map_err(|e| ctx.log_err("start a body log segment in", &dir, e))
}

/// The SQLite data store of one messaging engine. Construction and [`SqliteStore::backup_to`]
/// block (file I/O): call them from `spawn_blocking` inside a server.
pub struct SqliteStore {
    shared: Arc<Shared>,
    writer_tx: mpsc::Sender<WriteReq>,
    reader_tx: mpsc::Sender<ReadReq>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("me", &self.shared.ctx.me)
            .field("file", &self.shared.ctx.file)
            .finish()
    }
}

impl SqliteStore {
    /// Creates a new, empty store stamped with the ME's name and UUID. Refuses an existing file.
    pub fn create(path: &Path, me_name: &str, me_uuid: &str) -> Result<SqliteStore> {
        assert!(!me_name.is_empty() && !me_uuid.is_empty());
        let ctx = Ctx::new(me_name, me_uuid, path);
        if path.exists() {
            return Err(StoreError::AlreadyExists {
                file: path.to_path_buf(),
            });
        }
        let dir = fsx::parent_of(path);
        std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        // Build the stamped file under a temp name and rename it into place, so a crash never
        // leaves a half-initialised store at the real path.
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.create-{}", fsx::random_hex(6)));
        let tmp_ctx = Ctx::new(&ctx.me, &ctx.uuid, &tmp);
        let built = (|| {
            let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let mut conn =
                Connection::open_with_flags(&tmp, flags).map_err(tmp_ctx.err("create"))?;
            // The temp file is built in rollback mode so that it is one self-contained file
            // at rename time; the real store switches to WAL when opened.
            // 16 KiB pages: a 1 KiB message leaves fewer WAL frames (one write each) per
            // commit than with 4 KiB pages; 64 KiB measured no better.
            conn.execute_batch(
                "PRAGMA page_size=16384; PRAGMA journal_mode=DELETE; PRAGMA synchronous=FULL;",
            )
            .map_err(tmp_ctx.err("set pragmas"))?;
            let tx = conn.transaction().map_err(tmp_ctx.err("begin"))?;
            tx.execute_batch(SCHEMA)
                .and_then(|()| tx.execute_batch(SCHEMA_V2))
                .map_err(tmp_ctx.err("create schema"))?;
            for (k, v) in [
                ("me_name", me_name.to_string()),
                ("me_uuid", me_uuid.to_string()),
                ("schema_version", SCHEMA_VERSION.to_string()),
                ("incarnation", "1".to_string()),
                ("restore_state", RestoreState::None.as_str().to_string()),
                ("next_seq", "1".to_string()),
                ("created_at", fsx::now_rfc3339()),
            ] {
                meta_set(&tx, &tmp_ctx, k, &v)?;
            }
            tx.commit().map_err(tmp_ctx.err("commit schema"))?;
            conn.close().map_err(|(_, e)| tmp_ctx.err("close")(e))?;
            fsx::fsync_file(&tmp)?;
            // No-replace rename semantics: check again right before (a racing create loses).
            if path.exists() {
                return Err(StoreError::AlreadyExists {
                    file: path.to_path_buf(),
                });
            }
            std::fs::rename(&tmp, path).map_err(io_err("rename new store into", path))?;
            fsx::fsync_dir(&dir)
        })();
        if built.is_err() {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(fsx::with_suffix(&tmp, "-journal"));
        }
        built?;
        tracing::info!(me = me_name, file = %path.display(), "created data store");
        SqliteStore::open(path, me_name, me_uuid)
    }

    /// Opens an existing store of this ME: checks it is a database, passes `quick_check`, is
    /// stamped with this ME and has a schema we understand; then starts the writer and reader.
    pub fn open(path: &Path, me_name: &str, me_uuid: &str) -> Result<SqliteStore> {
        assert!(!me_name.is_empty() && !me_uuid.is_empty());
        let ctx = Ctx::new(me_name, me_uuid, path);
        if !path.is_file() {
            return Err(StoreError::Missing {
                file: path.to_path_buf(),
            });
        }
        let lock = take_lock(path, me_name)?;
        let (mut wconn, mut meta) = open_conn(&ctx, false)?;
        migrate(&mut wconn, &ctx, &mut meta)?;
        let appender = open_body_log(&wconn, &ctx)?;
        // Read back the seq invariant: every stored seq is below the reservation (a rowid
        // lookup, O(log n)).
        let seq_max: Option<i64> = wconn
            .query_row("SELECT MAX(seq) FROM messages", [], |r| r.get(0))
            .map_err(ctx.err("read the highest seq"))?;
        crate::check_seq_max(seq_max, meta.next_seq).map_err(|detail| StoreError::Corrupt {
            me: ctx.me.clone(),
            file: ctx.file.clone(),
            detail,
        })?;
        let (rconn, _) = open_conn(&ctx, false)?;
        let shared = Arc::new(Shared {
            ctx: ctx.clone(),
            pending_batches: AtomicUsize::new(0),
            transactions_committed: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            health: Mutex::new(StoreHealth::Ok),
            writer_ended: tokio::sync::watch::Sender::new(false),
        });
        let (writer_tx, writer_rx) = mpsc::channel(WRITE_QUEUE_MAX);
        let (reader_tx, reader_rx) = mpsc::channel(READ_QUEUE_MAX);
        let w_shared = shared.clone();
        let w_meta = meta.clone();
        // A thread that panics (a broken invariant) must not leave a store that looks open and
        // answers "closed": the store is marked failed, which the engine and server report.
        let w_watch = shared.clone();
        std::thread::Builder::new()
            .name(format!("store-w-{me_name}"))
            .spawn(move || {
                let writer = Writer::new(w_shared, wconn, lock, w_meta, appender);
                let run = std::panic::AssertUnwindSafe(|| writer.run(writer_rx));
                if let Err(p) = std::panic::catch_unwind(run) {
                    w_watch.fail(format!("its writer thread stopped: {}", panic_text(&*p)));
                }
                w_watch.writer_ended.send_replace(true);
            })
            .map_err(io_err("start the writer thread of", path))?;
        let r_watch = shared.clone();
        std::thread::Builder::new()
            .name(format!("store-r-{me_name}"))
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| reader_loop(rconn, reader_rx));
                if let Err(p) = std::panic::catch_unwind(run) {
                    r_watch.fail(format!("its reader thread stopped: {}", panic_text(&*p)));
                }
            })
            .map_err(io_err("start the reader thread of", path))?;
        tracing::info!(me = me_name, file = %path.display(), incarnation = meta.incarnation,
            restore_state = meta.restore_state.as_str(), "opened data store");
        Ok(SqliteStore {
            shared,
            writer_tx,
            reader_tx,
        })
    }

    pub fn path(&self) -> &Path {
        &self.shared.ctx.file
    }

    /// SQLite transactions committed by the writer since open (group commit makes this far
    /// smaller than the number of `commit` calls under concurrency).
    pub fn transactions_committed(&self) -> u64 {
        self.shared.transactions_committed.load(Ordering::Relaxed)
    }

    /// Test hook: makes the file behave as if the disk filled up at `pages` pages of the
    /// page size (SQLite then fails writes with SQLITE_FULL). Raise it again to recover.
    #[doc(hidden)]
    pub async fn simulate_disk_full_at_pages(&self, pages: u64) -> Result<()> {
        self.ask_writer(|reply| WriteReq::LimitPages { pages, reply })
            .await?
    }

    /// Test hook: body log segments roll at `bytes` instead of `bodylog::SEGMENT_BYTES_MAX`
    /// (compaction's floor scales with it), so tests can make many segments.
    #[doc(hidden)]
    pub async fn set_segment_bytes_max(&self, bytes: u64) -> Result<()> {
        assert!(bytes > 0);
        self.ask_writer(|reply| WriteReq::SegmentBytesMax { bytes, reply })
            .await
    }

    /// Test hook: the current body log segment's writes fail from now on, as a failing disk's
    /// would; the writer must move to a new segment and lose nothing.
    #[doc(hidden)]
    pub async fn break_body_log_segment(&self) -> Result<()> {
        self.ask_writer(|reply| WriteReq::BreakSegment { reply })
            .await?
    }

    /// Test hook: the next group commit fails as if its fsync had failed; the store must
    /// then be failed, visibly, until it is reopened.
    #[doc(hidden)]
    pub async fn fail_next_fsync(&self) -> Result<()> {
        self.ask_writer(|reply| WriteReq::FailNextFsync { reply })
            .await
    }

    /// Test hook: the writer thread panics. The store must say it failed, not just "closed".
    #[doc(hidden)]
    pub async fn panic_writer(&self) {
        let _ = self.writer_tx.send(WriteReq::Panic).await;
    }

    /// The body log segments on disk (test and diagnostics).
    #[doc(hidden)]
    pub fn body_log_segments(&self) -> Vec<u64> {
        bodylog::list_segments(self.shared.ctx.bodies.dir()).unwrap_or_default()
    }

    /// Hands the writer one request and waits for its answer.
    async fn ask_writer<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> WriteReq) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let answered = match self.writer_tx.send(make(tx)).await {
            Ok(()) => rx.await.ok(),
            Err(_) => None,
        };
        match answered {
            Some(v) => Ok(v),
            None => Err(self.writer_gone().await),
        }
    }

    /// The error for a request the writer dropped unanswered. Only a writer thread that is
    /// ending drops one (after a close, or unwinding from a panic, which drops the requests it
    /// held before its thread can record why): wait until the thread has ended, so the answer
    /// says "failed: why" rather than "closed".
    async fn writer_gone(&self) -> StoreError {
        let mut ended = self.shared.writer_ended.subscribe();
        // Bounded: the thread sets it as the last thing it does, and it is ending.
        let _ = ended.wait_for(|e| *e).await;
        self.closed_err()
    }

    /// A writer or reader that is gone: the store failed (its threads' end says why) or was
    /// closed.
    fn closed_err(&self) -> StoreError {
        self.shared
            .failed_err()
            .unwrap_or_else(|| StoreError::Closed {
                me: self.shared.ctx.me.clone(),
            })
    }

    /// Runs `f` on the reader thread's connection and returns its result.
    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &Ctx) -> Result<T> + Send + 'static,
    ) -> StoreFuture<'_, T> {
        Box::pin(async move {
            if self.shared.closed.load(Ordering::Acquire) {
                return Err(self.closed_err());
            }
            let (tx, rx) = oneshot::channel();
            let ctx = self.shared.ctx.clone();
            let job: ReadJob = Box::new(move |conn: &Connection| {
                let _ = tx.send(f(conn, &ctx));
            });
            self.reader_tx
                .send(ReadReq::Job(job))
                .await
                .map_err(|_| self.closed_err())?;
            rx.await.map_err(|_| self.closed_err())?
        })
    }

    /// Copies the live store to `target` while writers keep committing, and writes
    /// `<target>.manifest.json` beside it. The copy is one consistent snapshot: it is read in
    /// one read transaction (WAL lets commits go on meanwhile), in steps so `progress` can be
    /// reported. Refuses an existing target. Blocking.
    pub fn backup_to(
        &self,
        target: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<BackupManifest> {
        let ctx = &self.shared.ctx;
        let manifest_path = manifest_path(target);
        for p in [target, manifest_path.as_path()] {
            if p.exists() {
                return Err(StoreError::TargetExists {
                    path: p.to_path_buf(),
                });
            }
        }
        let dir = fsx::parent_of(target);
        std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp-{}", fsx::random_hex(6)));
        let tmp_ctx = Ctx::new(&ctx.me, &ctx.uuid, &tmp);
        // Before the snapshot: no segment it points into is unlinked until the copy is done.
        let _pin = ctx.bodies.pin();
        let result = (|| -> Result<BackupManifest> {
            let (src, _) = open_conn(ctx, false)?;
            // Hold one read transaction across every step: the snapshot cannot move, so the
            // backup neither restarts when the writer commits nor mixes two states.
            src.execute_batch("BEGIN DEFERRED")
                .map_err(ctx.err("begin backup snapshot"))?;
            let meta = read_meta(&src, ctx)?;
            let messages = count_messages(&src, ctx)?;
            let mut dst = Connection::open(&tmp).map_err(tmp_ctx.err("create backup file"))?;
            {
                let backup = rusqlite::backup::Backup::new(&src, &mut dst)
                    .map_err(ctx.err("start backup"))?;
                // Bound: each step copies BACKUP_STEP_PAGES pages of a fixed snapshot, so the
                // loop ends after page_count / step + 1 rounds; the cap catches a broken promise.
                let mut rounds: u64 = 0;
                loop {
                    rounds += 1;
                    assert!(rounds < (1 << 40), "backup made no progress");
                    let step = backup
                        .step(BACKUP_STEP_PAGES)
                        .map_err(ctx.err("copy pages to the backup"))?;
                    let p = backup.progress();
                    let total = u64::try_from(p.pagecount).unwrap_or(0);
                    let left = u64::try_from(p.remaining).unwrap_or(0);
                    progress(total.saturating_sub(left), total);
                    match step {
                        rusqlite::backup::StepResult::Done => break,
                        rusqlite::backup::StepResult::More => {}
                        // Only the destination (ours alone) could be busy; wait briefly.
                        _ => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }
            src.execute_batch("COMMIT")
                .map_err(ctx.err("end backup snapshot"))?;
            // A backup is one self-contained file: the bodies come into their rows.
            inline_bodies(&mut dst, &tmp_ctx, &ctx.bodies, progress)?;
            // The copy must be a self-contained file: no WAL beside it.
            dst.execute_batch("PRAGMA journal_mode=DELETE")
                .map_err(tmp_ctx.err("finish backup file"))?;
            dst.close()
                .map_err(|(_, e)| tmp_ctx.err("close backup file")(e))?;
            fsx::fsync_file(&tmp)?;
            let (crc, bytes) = fsx::crc32c_file(&tmp)?;
            if target.exists() {
                return Err(StoreError::TargetExists {
                    path: target.to_path_buf(),
                });
            }
            std::fs::rename(&tmp, target).map_err(io_err("rename backup into", target))?;
            let manifest = BackupManifest {
                me: meta.me.clone(),
                uuid: meta.uuid.clone(),
                created_at: fsx::now_rfc3339(),
                bytes,
                crc32c: crc,
                schema_version: meta.schema_version,
                incarnation: meta.incarnation,
                messages,
            };
            write_manifest(&manifest_path, &manifest)?;
            fsx::fsync_dir(&dir)?;
            Ok(manifest)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(fsx::with_suffix(&tmp, "-journal"));
        }
        let manifest = result?;
        tracing::info!(me = %ctx.me, target = %target.display(), messages = manifest.messages,
            bytes = manifest.bytes, "backed up data store");
        Ok(manifest)
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Dropping the senders ends both threads once their queues drain; queued commits
        // still complete (their callers may be gone, which is fine: they were not answered).
        self.shared.closed.store(true, Ordering::Release);
    }
}

fn count_messages(conn: &Connection, ctx: &Ctx) -> Result<u64> {
    let n: i64 = conn
        .query_row("SELECT coalesce(sum(depth), 0) FROM dests", [], |r| {
            r.get(0)
        })
        .map_err(ctx.err("count messages"))?;
    assert!(n >= 0);
    Ok(n as u64)
}

/// A row of `SELECT_COLS`: the message, and where its body is when it is in the body log (the
/// `body` column is then empty).
fn row_to_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<(StoredMessage, Option<BodyRef>)> {
    let stream_id: Option<String> = r.get(9)?;
    let tick: Option<i64> = r.get(10)?;
    let body_ref = body_ref_at(r, 11)?;
    let message = StoredMessage {
        dest: r.get(0)?,
        seq: r.get::<_, i64>(1)? as u64,
        id: r.get(2)?,
        priority: r.get(3)?,
        reliability: r.get(4)?,
        expiry_ms: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
        delivery_count: r.get(6)?,
        properties: r.get(7)?,
        body: r.get(8)?,
        stream: stream_id.zip(tick.map(|t| t as u64)),
    };
    Ok((message, body_ref))
}

/// The body reference in columns `first..first + 4` (body_seg, body_at, body_len, body_crc).
fn body_ref_at(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Option<BodyRef>> {
    let seg: Option<i64> = r.get(first)?;
    let Some(seg) = seg else {
        return Ok(None);
    };
    Ok(Some(BodyRef {
        seg: seg as u64,
        at: r.get::<_, i64>(first + 1)? as u64,
        len: r.get(first + 2)?,
        crc: r.get(first + 3)?,
    }))
}

/// Walks the messages whose body is in the body log, `BODY_WALK_ROWS` at a time in seq
/// order, handing each step's rows and bodies (CRC-checked) to `each`. Bounded memory.
fn walk_logged_bodies(
    conn: &Connection,
    ctx: &Ctx,
    bodies: &Segments,
    mut each: impl FnMut(&[(i64, BodyRef)], Vec<Vec<u8>>) -> Result<()>,
) -> Result<()> {
    let mut after = i64::MIN;
    loop {
        let rows = logged_rows_after(conn, ctx, after)?;
        let Some(&(last, _)) = rows.last() else {
            return Ok(());
        };
        assert!(last > after, "the walk moves forward");
        let refs: Vec<BodyRef> = rows.iter().map(|(_, r)| *r).collect();
        let read = bodies.read(&refs).map_err(|e| ctx.body_err(e))?;
        each(&rows, read)?;
        after = last;
    }
}

/// Up to `BODY_WALK_ROWS` messages after seq `after` whose body is in the body log.
fn logged_rows_after(conn: &Connection, ctx: &Ctx, after: i64) -> Result<Vec<(i64, BodyRef)>> {
    let rows = conn
        .prepare_cached(
            "SELECT seq, body_seg, body_at, body_len, body_crc FROM messages \
             WHERE seq > ?1 AND body_seg IS NOT NULL ORDER BY seq LIMIT ?2",
        )
        .and_then(|mut st| {
            st.query_map(params![after, BODY_WALK_ROWS], |r| {
                Ok((r.get(0)?, body_ref_at(r, 1)?.expect("body_seg is set")))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(ctx.err("read body references"))?;
    assert!(rows.len() <= BODY_WALK_ROWS as usize);
    assert!(rows.iter().all(|(seq, _)| *seq > after));
    Ok(rows)
}

/// Puts `body` into the row of `seq`, which then no longer points into the body log.
fn body_into_row(conn: &Connection, ctx: &Ctx, seq: i64, body: &[u8], action: &str) -> Result<()> {
    let n = conn
        .prepare_cached(
            "UPDATE messages SET body = ?2, body_seg = NULL, body_at = NULL, body_len = NULL, \
             body_crc = NULL WHERE seq = ?1",
        )
        .and_then(|mut st| st.execute(params![seq, body]))
        .map_err(ctx.err(action))?;
    assert_eq!(n, 1, "the row of seq {seq} holds its body");
    Ok(())
}

/// Moves every body-log body of a backup copy into its row, so the backup is one file.
fn inline_bodies(
    dst: &mut Connection,
    ctx: &Ctx,
    bodies: &Segments,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let logged: i64 = dst
        .query_row(
            "SELECT count(*) FROM messages WHERE body_seg IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .map_err(ctx.err("count bodies to copy"))?;
    let total = logged as u64;
    let tx = dst.transaction().map_err(ctx.err("begin copying bodies"))?;
    let mut done = 0u64;
    // Each step's rows are read before they are updated, and the next step starts after them.
    walk_logged_bodies(&tx, ctx, bodies, |rows, read| {
        for ((seq, _), body) in rows.iter().zip(&read) {
            body_into_row(&tx, ctx, *seq, body, "copy a body into the backup")?;
        }
        done += rows.len() as u64;
        progress(done, total);
        Ok(())
    })?;
    assert_eq!(done, total, "every logged body copied");
    tx.execute("DELETE FROM segments", [])
        .map_err(ctx.err("clear the backup's segment counts"))?;
    tx.commit().map_err(ctx.err("commit copied bodies"))
}

/// Fills in the bodies that live in the body log.
fn fill_bodies(
    ctx: &Ctx,
    rows: Vec<(StoredMessage, Option<BodyRef>)>,
) -> Result<Vec<StoredMessage>> {
    let refs: Vec<BodyRef> = rows.iter().filter_map(|(_, r)| *r).collect();
    if refs.is_empty() {
        return Ok(rows.into_iter().map(|(m, _)| m).collect());
    }
    let mut bodies = ctx
        .bodies
        .read(&refs)
        .map_err(|e| ctx.body_err(e))?
        .into_iter();
    let out: Vec<StoredMessage> = rows
        .into_iter()
        .map(|(mut m, r)| {
            if r.is_some() {
                assert!(m.body.is_empty(), "a body both in its row and in the log");
                m.body = bodies.next().expect("one body per reference");
            }
            m
        })
        .collect();
    assert!(bodies.next().is_none());
    Ok(out)
}

fn query_messages(
    conn: &Connection,
    ctx: &Ctx,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<StoredMessage>> {
    // Pinned from before the statement's snapshot until the bodies are read.
    let _pin = ctx.bodies.pin();
    let mut stmt = conn.prepare_cached(sql).map_err(ctx.err("prepare read"))?;
    let rows = stmt
        .query_map(params, row_to_message)
        .map_err(ctx.err("read messages"))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(ctx.err("read messages"))?;
    fill_bodies(ctx, rows)
}

pub(crate) fn check_limit(me: &str, limit: usize) -> Result<()> {
    if limit == 0 || limit > PAGE_LIMIT_MAX {
        return Err(StoreError::Invalid {
            me: me.to_string(),
            problem: format!(
                "a read of {limit} messages is outside 1..={PAGE_LIMIT_MAX}; page in smaller steps"
            ),
        });
    }
    Ok(())
}

fn page_impl(
    conn: &Connection,
    ctx: &Ctx,
    dest: &str,
    after: Option<(u8, u64)>,
    limit: usize,
) -> Result<Vec<StoredMessage>> {
    check_limit(&ctx.me, limit)?;
    // Two index range scans instead of one OR: the rest of the cursor's priority, then the
    // lower priorities. Each uses (dest, priority DESC, seq) without sorting.
    let mut out = match after {
        None => Vec::new(),
        Some((p, s)) => query_messages(
            conn,
            ctx,
            &format!(
                "SELECT {SELECT_COLS} FROM messages WHERE dest = ?1 AND priority = ?2 AND seq > ?3 \
                 ORDER BY seq LIMIT ?4"
            ),
            params![dest, p, s as i64, limit as i64],
        )?,
    };
    if out.len() < limit {
        let below: i64 = after.map_or(10, |(p, _)| i64::from(p));
        let rest = query_messages(
            conn,
            ctx,
            &format!(
                "SELECT {SELECT_COLS} FROM messages WHERE dest = ?1 AND priority < ?2 \
                 ORDER BY priority DESC, seq LIMIT ?3"
            ),
            params![dest, below, (limit - out.len()) as i64],
        )?;
        out.extend(rest);
    }
    // Read back, assert: delivery order, strictly after the cursor, bounded.
    assert!(out.len() <= limit);
    let mut prev = after;
    for m in &out {
        assert_eq!(m.dest, dest);
        if let Some((p, s)) = prev {
            assert!(
                m.priority < p || (m.priority == p && m.seq > s),
                "page out of delivery order"
            );
        }
        prev = Some((m.priority, m.seq));
    }
    Ok(out)
}

fn reader_loop(conn: Connection, mut rx: mpsc::Receiver<ReadReq>) {
    while let Some(req) = rx.blocking_recv() {
        match req {
            ReadReq::Job(job) => job(&conn),
            ReadReq::Close { reply } => {
                drop(conn);
                let _ = reply.send(());
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The writer: group commit.

struct Writer {
    shared: Arc<Shared>,
    conn: Connection,
    /// The writer lock; released after `conn` is closed.
    lock: File,
    /// The next seq to assign.
    next_seq: u64,
    /// `meta.next_seq` as committed: every seq handed out is below it.
    seq_reserved: u64,
    incarnation: u64,
    /// The body log segment that takes this group's bodies.
    appender: Appender,
    /// Segments made dead by committed transactions, unlinked once no read or backup is pinned.
    dead_segments: Vec<u64>,
    /// Group commits since the last look at whether to compact.
    groups_since_compact_check: u64,
    /// Groups failed by errors other than a full disk since the last commit, and when the
    /// first did: only the first is logged, the count when writing works again.
    failing: Option<(u64, u64)>,
    /// Test hook: the next group's commit fails as a failed fsync would.
    fail_next_fsync: bool,
}

/// What one group does to the body log's `segments` rows, written once per transaction.
#[derive(Clone, Debug, Default)]
struct SegDelta {
    /// Bytes staged into the current segment, and the seqs of their messages.
    put_bytes: u64,
    seq_min: u64,
    seq_max: u64,
    /// (segment, bytes) of each deleted message whose body was in the log.
    deleted: Vec<(u64, u64)>,
}

/// One caller's batch inside a group, with its outcome so far.
/// One caller's ops in a group commit, and where its outcome goes (both backends).
pub(crate) struct Batch {
    pub(crate) ops: Vec<Op>,
    pub(crate) reply: oneshot::Sender<Result<CommitOutcome>>,
}

/// Answers every caller of a committed group with its own outcome, and counts the commit.
pub(crate) fn answer_committed(
    committed: &AtomicU64,
    group: Vec<Batch>,
    outcomes: Vec<Result<CommitOutcome>>,
) {
    committed.fetch_add(1, Ordering::Relaxed);
    assert_eq!(outcomes.len(), group.len());
    for (batch, outcome) in group.into_iter().zip(outcomes) {
        let _ = batch.reply.send(outcome);
    }
}

/// Answers every caller of a group that did not commit: the transaction's error, except a
/// batch that failed alone before it, which keeps its own, more precise one.
pub(crate) fn answer_failed(
    group: Vec<Batch>,
    outcomes: Vec<Result<CommitOutcome>>,
    e: StoreError,
) {
    let mut own = outcomes.into_iter();
    for batch in group {
        let r = match own.next() {
            Some(Err(mine)) => Err(mine),
            _ => Err(e.clone()),
        };
        let _ = batch.reply.send(r);
    }
}

impl Writer {
    fn new(
        shared: Arc<Shared>,
        conn: Connection,
        lock: File,
        meta: Meta,
        appender: Appender,
    ) -> Writer {
        Writer {
            shared,
            conn,
            lock,
            next_seq: meta.next_seq,
            seq_reserved: meta.next_seq,
            incarnation: meta.incarnation,
            appender,
            dead_segments: Vec::new(),
            groups_since_compact_check: 0,
            failing: None,
            fail_next_fsync: false,
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<WriteReq>) {
        // A request taken from the queue that did not fit the previous group.
        let mut carry: Option<WriteReq> = None;
        loop {
            let first = match carry.take() {
                Some(r) => r,
                None => match rx.blocking_recv() {
                    Some(r) => r,
                    None => return,
                },
            };
            match first {
                WriteReq::SegmentBytesMax { bytes, reply } => {
                    self.appender.segment_bytes_max = bytes;
                    let _ = reply.send(());
                }
                WriteReq::BreakSegment { reply } => {
                    let ctx = self.ctx();
                    let r = self.appender.break_writes().map_err(|e| {
                        ctx.log_err("reopen a body log segment in", self.appender.dir(), e)
                    });
                    let _ = reply.send(r);
                }
                WriteReq::Close { reply } => {
                    // Connection first (it checkpoints and removes the WAL), then the lock,
                    // then the answer: a reopen right after close finds the store free.
                    self.unlink_dead_segments();
                    let Writer { conn, lock, .. } = self;
                    drop(conn);
                    drop(lock);
                    let _ = reply.send(());
                    return;
                }
                WriteReq::NewIncarnation {
                    clear_restored,
                    reply,
                } => {
                    let r = match self.shared.failed_err() {
                        Some(e) => Err(e),
                        None => self.new_incarnation(clear_restored),
                    };
                    let _ = reply.send(r);
                }
                WriteReq::FailNextFsync { reply } => {
                    self.fail_next_fsync = true;
                    let _ = reply.send(());
                }
                WriteReq::Panic => panic!("test hook: the writer panics"),
                WriteReq::LimitPages { pages, reply } => {
                    let ctx = self.ctx();
                    let r = self
                        .conn
                        .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                            r.get::<_, i64>(0)
                        })
                        .map(|_| ())
                        .map_err(ctx.err("limit pages"));
                    // The body log fills up with the file: a little room, or all of it back.
                    self.appender.limit_bytes = (pages < 1 << 30)
                        .then(|| self.appender.len_bytes() + BODY_LOG_ROOM_WHEN_FULL);
                    let _ = reply.send(r);
                }
                WriteReq::Commit {
                    ops,
                    ops_bytes,
                    reply,
                } => {
                    self.shared.pending_batches.fetch_sub(1, Ordering::AcqRel);
                    let mut group = vec![Batch { ops, reply }];
                    let mut group_ops = group[0].ops.len();
                    let mut group_bytes = ops_bytes;
                    let started = Instant::now();
                    let linger = Duration::from_micros(LINGER_US);
                    // Bounded by TXN_BATCHES_MAX pushes and by the linger deadline.
                    while group.len() < TXN_BATCHES_MAX
                        && group_ops < TXN_OPS_MAX
                        && group_bytes < TXN_BYTES_MAX
                    {
                        match rx.try_recv() {
                            Ok(WriteReq::Commit {
                                ops,
                                ops_bytes,
                                reply,
                            }) => {
                                self.shared.pending_batches.fetch_sub(1, Ordering::AcqRel);
                                if group_ops + ops.len() > TXN_OPS_MAX
                                    || group_bytes + ops_bytes > TXN_BYTES_MAX
                                {
                                    // Re-announce it: it is pending again until the next group.
                                    self.shared.pending_batches.fetch_add(1, Ordering::AcqRel);
                                    carry = Some(WriteReq::Commit {
                                        ops,
                                        ops_bytes,
                                        reply,
                                    });
                                    break;
                                }
                                group_ops += ops.len();
                                group_bytes += ops_bytes;
                                group.push(Batch { ops, reply });
                            }
                            Ok(other) => {
                                carry = Some(other);
                                break;
                            }
                            Err(mpsc::error::TryRecvError::Empty) => {
                                // Linger only when callers are on their way (announced but not
                                // yet queued, or blocked on a full queue), and at most LINGER_US.
                                if self.shared.pending_batches.load(Ordering::Acquire) > 0
                                    && started.elapsed() < linger
                                {
                                    std::thread::sleep(Duration::from_micros(20));
                                    continue;
                                }
                                break;
                            }
                            Err(mpsc::error::TryRecvError::Disconnected) => break,
                        }
                    }
                    self.commit_group(group);
                }
            }
        }
    }

    fn ctx(&self) -> Ctx {
        self.shared.ctx.clone()
    }

    /// Commits a group in one transaction and answers every caller. First without savepoints:
    /// a savepoint makes SQLite copy every page it touches into a sub-journal first (about a
    /// sixth of the writer's time in the peers benchmark), and a batch almost never fails. If
    /// one does, the whole transaction is rolled back and the group is applied again with each
    /// batch in its own SAVEPOINT, so the failing batch rolls back alone and the others commit.
    /// A full disk fails the group as a whole (no batch of it was at fault) and is not retried;
    /// an error that leaves the files in doubt fails the store (see `fatal_reason`).
    fn commit_group(&mut self, group: Vec<Batch>) {
        assert!(!group.is_empty() && group.len() <= TXN_BATCHES_MAX);
        if let Some(e) = self.shared.failed_err() {
            return answer_failed(group, Vec::new(), e);
        }
        if let Err(e) = self.roll_segment_if_needed() {
            let e = self.note_failed(e, group.len());
            return answer_failed(group, Vec::new(), e);
        }
        let next_seq_before = self.next_seq;
        match self.commit_group_plain(&group) {
            Ok(outcomes) => {
                // Health first: a caller that reads it after its answer sees it current.
                self.note_committed();
                answer_committed(&self.shared.transactions_committed, group, outcomes);
                return self.after_commit();
            }
            Err(e) => {
                // Nothing of the group committed; the seqs it took are handed out again (no
                // caller has seen them), and so are the body log bytes it staged.
                if !self.conn.is_autocommit() {
                    // The rollback on drop failed: try once more; if the transaction is still
                    // open, the slow path's BEGIN fails and every caller gets that error.
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                self.appender.discard();
                self.next_seq = next_seq_before;
                if matches!(e, StoreError::DiskFull { .. }) || fatal_reason(&e).is_some() {
                    let e = self.note_failed(e, group.len());
                    return answer_failed(group, Vec::new(), e);
                }
                tracing::debug!(me = %self.shared.ctx.me, error = %e, "group commit retried batch by batch");
            }
        }
        // A failed write or sync of the bodies leaves the segment's tail in doubt.
        if let Err(e) = self.roll_segment_if_needed() {
            let e = self.note_failed(e, group.len());
            return answer_failed(group, Vec::new(), e);
        }
        self.commit_group_savepoints(group);
        self.after_commit();
    }

    /// A group committed: a full disk or a run of failures is over, and says so once.
    fn note_committed(&mut self) {
        if let Some((since_ms, failed)) = self.failing.take() {
            if failed > 1 {
                tracing::warn!(me = %self.shared.ctx.me, failed, since_ms,
                    "data store writes work again after failed group commits");
            }
        }
        let cleared = {
            let mut h = self.shared.health.lock().unwrap_or_else(|p| p.into_inner());
            match &*h {
                StoreHealth::DiskFull {
                    since_ms, refused, ..
                } => {
                    let was = (*since_ms, *refused);
                    *h = StoreHealth::Ok;
                    Some(was)
                }
                _ => None,
            }
        };
        if let Some((since_ms, refused)) = cleared {
            let since = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(since_ms),
            );
            emit!(
                catalog::CWSIP0113I,
                me = self.shared.ctx.me,
                refused = refused,
                since = since
            );
        }
    }

    /// A group of `batches` failed with `e` as a whole: moves the store's health and logs a
    /// change once (never once per group). Returns the error its callers get: `e`, or the
    /// store's failure when `e` leaves the files in doubt.
    fn note_failed(&mut self, e: StoreError, batches: usize) -> StoreError {
        if let Some(reason) = fatal_reason(&e) {
            return self.shared.fail(reason);
        }
        if let StoreError::DiskFull { file, .. } = &e {
            let started = {
                let mut h = self.shared.health.lock().unwrap_or_else(|p| p.into_inner());
                match &mut *h {
                    StoreHealth::DiskFull { refused, .. } => {
                        *refused += batches as u64;
                        false
                    }
                    StoreHealth::Ok => {
                        *h = StoreHealth::DiskFull {
                            since_ms: keel_core::unix_ms(),
                            path: file.clone(),
                            refused: batches as u64,
                        };
                        true
                    }
                    StoreHealth::Failed { .. } => false,
                }
            };
            if started {
                emit!(
                    catalog::CWSIP0112W,
                    me = self.shared.ctx.me,
                    path = file.display()
                );
            }
            return e;
        }
        // Other errors (a failed write, a busy file): the group fails, the store goes on. The
        // first of a run is logged; the rest are counted and reported when writing works.
        match &mut self.failing {
            Some((_, n)) => *n += 1,
            None => {
                self.failing = Some((keel_core::unix_ms(), 1));
                tracing::error!(me = %self.shared.ctx.me, error = %e, batches, "group commit failed");
            }
        }
        e
    }

    /// The fast path: every batch applied in one transaction, none may fail.
    fn commit_group_plain(&mut self, group: &[Batch]) -> Result<Vec<Result<CommitOutcome>>> {
        let ctx = self.ctx();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(ctx.err("begin transaction"))?;
        let mut outcomes = Vec::with_capacity(group.len());
        let mut g = Group::new(
            &tx,
            &ctx,
            &mut self.next_seq,
            self.incarnation,
            &mut self.appender,
        );
        for batch in group {
            // An error drops `tx`, which rolls the whole transaction back.
            outcomes.push(Ok(g.apply(&batch.ops)?));
        }
        let (dead, reservation) = g.finish(self.seq_reserved)?;
        if std::mem::take(&mut self.fail_next_fsync) {
            // Test hook: what a failed fsync of the WAL returns (`tx` rolls back on drop).
            let f = rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR_FSYNC);
            let e = rusqlite::Error::SqliteFailure(f, Some("simulated fsync failure".into()));
            return Err(ctx.err("commit transaction")(e));
        }
        tx.commit().map_err(ctx.err("commit transaction"))?;
        self.seq_reserved = reservation.unwrap_or(self.seq_reserved);
        self.dead_segments.extend(dead);
        Ok(outcomes)
    }

    /// The slow path after a failed group: each batch inside its own SAVEPOINT.
    fn commit_group_savepoints(&mut self, group: Vec<Batch>) {
        let ctx = self.ctx();
        let mut outcomes: Vec<Result<CommitOutcome>> = Vec::with_capacity(group.len());
        let mut dead = Vec::new();
        let txn = (|| -> Result<()> {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(ctx.err("begin transaction"))?;
            let mut g = Group::new(
                &tx,
                &ctx,
                &mut self.next_seq,
                self.incarnation,
                &mut self.appender,
            );
            for batch in &group {
                tx.execute_batch("SAVEPOINT batch")
                    .map_err(ctx.err("savepoint"))?;
                let seq_before = *g.next_seq;
                let (delta_before, staged_before) = (g.delta.clone(), g.appender.staged());
                match g.apply(&batch.ops) {
                    Ok(outcome) => {
                        tx.execute_batch("RELEASE batch")
                            .map_err(ctx.err("release savepoint"))?;
                        outcomes.push(Ok(outcome));
                    }
                    Err(e) if tx.is_autocommit() => {
                        // SQLite rolled the whole transaction back by itself (SQLITE_FULL,
                        // an I/O error): the group fails, with this batch's error.
                        return Err(e);
                    }
                    Err(e) => {
                        tx.execute_batch("ROLLBACK TO batch; RELEASE batch")
                            .map_err(ctx.err("roll back savepoint"))?;
                        // The seqs it took are skipped, not handed out again: strictly
                        // increasing is the rule, gaps are allowed. Its bodies are unstaged.
                        assert!(*g.next_seq >= seq_before);
                        g.delta = delta_before;
                        g.appender.unstage_to(staged_before);
                        outcomes.push(Err(e));
                    }
                }
            }
            let reservation;
            (dead, reservation) = g.finish(self.seq_reserved)?;
            tx.commit().map_err(ctx.err("commit transaction"))?;
            self.seq_reserved = reservation.unwrap_or(self.seq_reserved);
            Ok(())
        })();
        match txn {
            Ok(()) => {
                self.dead_segments.extend(dead);
                self.note_committed();
                answer_committed(&self.shared.transactions_committed, group, outcomes);
            }
            Err(e) => {
                // Nothing of the group committed.
                self.appender.discard();
                let e = self.note_failed(e, group.len());
                answer_failed(group, outcomes, e);
            }
        }
    }

    /// Housekeeping between groups: dead segments, and now and then compaction.
    fn after_commit(&mut self) {
        self.unlink_dead_segments();
        self.groups_since_compact_check += 1;
        if self.groups_since_compact_check >= COMPACT_CHECK_GROUPS {
            self.groups_since_compact_check = 0;
            // Bounded: a few segments per look, each its own short transaction.
            for _ in 0..COMPACT_SEGMENTS_PER_CHECK {
                match self.compact() {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        // Compaction only saves space; the next look tries again.
                        tracing::warn!(me = %self.shared.ctx.me, error = %e, "body log compaction failed");
                        break;
                    }
                }
            }
        }
    }

    /// Moves to a new segment when the current one is full or its tail is in doubt. An error
    /// means no body can be made durable now: the group fails, nothing of it committed.
    fn roll_segment_if_needed(&mut self) -> Result<()> {
        if !self.appender.needs_roll() {
            return Ok(());
        }
        // The caller reports the error (once per episode, see `note_failed`).
        self.roll_segment()
    }

    /// Moves to a new segment; the old one is forgotten right away if nothing points into it.
    fn roll_segment(&mut self) -> Result<()> {
        let ctx = self.ctx();
        let next = self
            .appender
            .roll()
            .map_err(|e| ctx.log_err("start a body log segment in", self.appender.dir(), e))?;
        let old = std::mem::replace(&mut self.appender, next).seg();
        let live: Option<i64> = self
            .conn
            .query_row(
                "SELECT live_bytes FROM segments WHERE seg = ?1",
                [old as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(ctx.err("read a segment's live bytes"))?;
        if live.unwrap_or(0) == 0 {
            self.conn
                .execute("DELETE FROM segments WHERE seg = ?1", [old as i64])
                .map_err(ctx.err("forget a dead segment"))?;
            self.dead_segments.push(old);
        }
        Ok(())
    }

    /// Unlinks the segments committed transactions made dead, unless a read or a backup is pinned (its
    /// snapshot may still point into them). A crash before the unlink leaves an orphan, which
    /// the next open removes.
    fn unlink_dead_segments(&mut self) {
        if self.dead_segments.is_empty() || self.shared.ctx.bodies.pinned() {
            return;
        }
        let ctx = &self.shared.ctx;
        for seg in self.dead_segments.drain(..) {
            assert_ne!(
                seg,
                self.appender.seg(),
                "the current segment is never dead"
            );
            ctx.bodies.forget(seg);
            let path = bodylog::segment_path(ctx.bodies.dir(), seg);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // Only space is lost; the next open removes it.
                Err(e) => tracing::warn!(me = %ctx.me, segment = %path.display(), error = %e,
                    "cannot remove a dead body log segment"),
            }
        }
    }

    /// Bounds the space a few long-lived messages can hold: when the segments other than the
    /// current one hold more dead bytes than live ones (and more than two segments' worth), the
    /// one with the smallest live share has up to `COMPACT_ROWS_MAX` of its bodies moved back
    /// into their rows, in one transaction. Each such segment dies after a few rounds. Says
    /// whether it compacted anything.
    fn compact(&mut self) -> Result<bool> {
        let ctx = self.ctx();
        let current = self.appender.seg() as i64;
        let (bytes, live): (i64, i64) = self
            .conn
            .query_row(
                "SELECT coalesce(sum(bytes), 0), coalesce(sum(live_bytes), 0) FROM segments \
                 WHERE seg != ?1",
                [current],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(ctx.err("size the body log"))?;
        let dead = bytes - live;
        assert!(dead >= 0 && live >= 0);
        let floor = 2 * self.appender.segment_bytes_max as i64;
        if dead <= live.max(floor) {
            return Ok(false);
        }
        let (seg, seq_min, seq_max): (i64, i64, i64) = self
            .conn
            .query_row(
                "SELECT seg, seq_min, seq_max FROM segments WHERE seg != ?1 \
                 ORDER BY live_bytes * 1.0 / bytes, seg LIMIT 1",
                [current],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(ctx.err("choose a segment to compact"))?;
        // A segment's bodies belong to seqs it took in order, so its rows are in
        // [seq_min, seq_max]: a rowid range, never a scan of the whole table.
        let rows: Vec<(i64, BodyRef)> = self
            .conn
            .prepare_cached(
                "SELECT seq, body_seg, body_at, body_len, body_crc FROM messages \
                 WHERE seq BETWEEN ?1 AND ?2 AND body_seg = ?3 ORDER BY seq LIMIT ?4",
            )
            .and_then(|mut st| {
                st.query_map(
                    params![seq_min, seq_max, seg, COMPACT_ROWS_MAX as i64],
                    |r| Ok((r.get(0)?, body_ref_at(r, 1)?.expect("body_seg is set"))),
                )?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(ctx.err("read a segment's rows"))?;
        if rows.is_empty() {
            // The counts say bytes are live but no row points into the segment.
            return Err(StoreError::Corrupt {
                me: ctx.me.clone(),
                file: ctx.file.clone(),
                detail: format!(
                    "body log segment {seg} is counted live but no message points into it"
                ),
            });
        }
        let refs: Vec<BodyRef> = rows.iter().map(|(_, r)| *r).collect();
        let bodies = ctx.bodies.read(&refs).map_err(|e| ctx.body_err(e))?;
        let moved: u64 = refs.iter().map(|r| u64::from(r.len)).sum();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(ctx.err("begin compaction"))?;
        for ((seq, _), body) in rows.iter().zip(&bodies) {
            body_into_row(&tx, &ctx, *seq, body, "move a body into its row")?;
        }
        let delta = SegDelta {
            deleted: vec![(seg as u64, moved)],
            ..SegDelta::default()
        };
        let dead_now = apply_seg_delta(&tx, &ctx, &delta, self.appender.seg())?;
        tx.commit().map_err(ctx.err("commit compaction"))?;
        self.dead_segments.extend(dead_now);
        tracing::debug!(me = %ctx.me, segment = seg, bodies = rows.len(), bytes = moved, "compacted the body log");
        self.unlink_dead_segments();
        Ok(true)
    }

    fn new_incarnation(&mut self, clear_restored: bool) -> Result<u64> {
        let ctx = self.ctx();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(ctx.err("begin transaction"))?;
        let meta = read_meta(&tx, &ctx)?;
        assert_eq!(
            meta.incarnation, self.incarnation,
            "incarnation changed behind the writer"
        );
        let next = crate::next_incarnation(meta.incarnation);
        meta_set(&tx, &ctx, "incarnation", &next.to_string())?;
        if clear_restored {
            meta_set(&tx, &ctx, "restore_state", RestoreState::None.as_str())?;
        }
        tx.commit().map_err(ctx.err("commit new incarnation"))?;
        self.incarnation = next;
        self.shared
            .transactions_committed
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(me = %ctx.me, incarnation = next, clear_restored, "began new incarnation");
        Ok(next)
    }
}

/// A group's hot statements, taken from rusqlite's statement cache once per group instead of
/// once per op (each lookup hashes the SQL text: about 3 % of the instructions of the engine
/// benchmark under callgrind). Dropped before the transaction commits.
#[derive(Default)]
struct HotStmts<'c> {
    insert: Option<rusqlite::CachedStatement<'c>>,
    find: Option<rusqlite::CachedStatement<'c>>,
    delete: Option<rusqlite::CachedStatement<'c>>,
}

const INSERT_MESSAGE_SQL: &str = "INSERT INTO messages (seq, dest, id, priority, reliability, \
     expiry_ms, delivery_count, properties, body, stream_id, tick, body_seg, body_at, body_len, \
     body_crc) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";
// Where the body is, then the delete by rowid. Not `DELETE … RETURNING`: SQLite runs RETURNING
// through an ephemeral table (a b-tree and pager opened, and a 16 KiB page zeroed, per
// statement) and a statement journal: a third more instructions per message under callgrind.
const FIND_MESSAGE_SQL: &str =
    "SELECT body_seg, body_len FROM messages WHERE seq = ?1 AND dest = ?2";
const DELETE_MESSAGE_SQL: &str = "DELETE FROM messages WHERE seq = ?1";

/// One group commit in the making: its transaction, the writer state it moves on (seqs, the
/// body log) and what it does to the segment counts. Both the fast path and the slow path
/// (a savepoint per batch) apply batches through it and finish with it.
struct Group<'c, 'w> {
    tx: &'c Transaction<'c>,
    ctx: &'w Ctx,
    next_seq: &'w mut u64,
    incarnation: u64,
    appender: &'w mut Appender,
    delta: SegDelta,
    stmts: HotStmts<'c>,
}

impl<'c, 'w> Group<'c, 'w> {
    fn new(
        tx: &'c Transaction<'c>,
        ctx: &'w Ctx,
        next_seq: &'w mut u64,
        incarnation: u64,
        appender: &'w mut Appender,
    ) -> Group<'c, 'w> {
        Group {
            tx,
            ctx,
            next_seq,
            incarnation,
            appender,
            delta: SegDelta::default(),
            stmts: HotStmts::default(),
        }
    }

    /// Applies one caller's ops inside the open transaction. Any error leaves the caller to
    /// roll back (the whole transaction, or the batch's savepoint).
    fn apply(&mut self, ops: &[Op]) -> Result<CommitOutcome> {
        apply_batch(
            self.tx,
            self.ctx,
            ops,
            self.next_seq,
            self.incarnation,
            self.appender,
            &mut self.delta,
            &mut self.stmts,
        )
    }

    /// Writes the segment counts and the seq reservation, then makes the staged bodies
    /// durable: the caller commits right after. Returns the segments that die with the commit
    /// and the reservation written, if any.
    fn finish(self, seq_reserved: u64) -> Result<(Vec<u64>, Option<u64>)> {
        let Group {
            tx,
            ctx,
            next_seq,
            appender,
            delta,
            stmts,
            ..
        } = self;
        drop(stmts);
        let dead = apply_seg_delta(tx, ctx, &delta, appender.seg())?;
        let reservation = crate::seq_reservation(*next_seq, seq_reserved);
        if let Some(r) = reservation {
            meta_set(tx, ctx, "next_seq", &r.to_string())?;
        }
        // Bodies durable before the rows that point at them.
        appender
            .flush()
            .map_err(|e| ctx.log_err("write message bodies to", appender.dir(), e))?;
        Ok((dead, reservation))
    }
}

/// `Group::apply`'s work, kept a function of its parts so the borrows stay plain.
#[allow(clippy::too_many_arguments)]
fn apply_batch<'c>(
    tx: &'c Transaction<'_>,
    ctx: &Ctx,
    ops: &[Op],
    next_seq: &mut u64,
    incarnation: u64,
    appender: &mut Appender,
    delta: &mut SegDelta,
    stmts: &mut HotStmts<'c>,
) -> Result<CommitOutcome> {
    let mut outcome = CommitOutcome::default();
    // Depth changes are summed per destination and written once per batch: one statement per
    // destination instead of one or two per message.
    let mut depth: Vec<(&str, i64)> = Vec::new();
    fn count<'a>(depth: &mut Vec<(&'a str, i64)>, dest: &'a str, delta: i64) {
        match depth.iter_mut().find(|(d, _)| *d == dest) {
            Some((_, n)) => *n += delta,
            None => depth.push((dest, delta)),
        }
    }
    for op in ops {
        match op {
            Op::Put {
                dest,
                id,
                priority,
                reliability,
                expiry_ms,
                properties,
                body,
                stream,
            } => {
                let seq = *next_seq;
                assert!(seq > 0 && seq < i64::MAX as u64);
                *next_seq += 1;
                let id = if id.is_empty() {
                    format!("{}:{incarnation}:{seq}", ctx.uuid)
                } else {
                    id.clone()
                };
                // Large bodies go to the body log; the row keeps where.
                let logged = (body.len() > bodylog::INLINE_BODY_BYTES_MAX).then(|| {
                    let r = appender.stage(body);
                    if delta.put_bytes == 0 {
                        delta.seq_min = seq;
                    }
                    delta.put_bytes += u64::from(r.len);
                    delta.seq_max = seq;
                    r
                });
                let row_body: &[u8] = if logged.is_some() { &[] } else { body };
                let insert = match &mut stmts.insert {
                    Some(st) => st,
                    None => stmts.insert.insert(
                        tx.prepare_cached(INSERT_MESSAGE_SQL)
                            .map_err(ctx.err("insert message"))?,
                    ),
                };
                insert
                    .execute(params![
                        seq as i64,
                        dest,
                        id,
                        priority,
                        reliability,
                        expiry_ms.map(|v| v as i64),
                        properties,
                        row_body,
                        stream.as_ref().map(|s| s.0.as_str()),
                        stream.as_ref().map(|s| s.1 as i64),
                        logged.map(|r| r.seg as i64),
                        logged.map(|r| r.at as i64),
                        logged.map(|r| r.len),
                        logged.map(|r| r.crc),
                    ])
                    .map_err(ctx.err("insert message"))?;
                count(&mut depth, dest, 1);
                outcome.assigned_seqs.push(seq);
            }
            Op::Delete { dest, seq } => {
                let find = match &mut stmts.find {
                    Some(st) => st,
                    None => stmts.find.insert(
                        tx.prepare_cached(FIND_MESSAGE_SQL)
                            .map_err(ctx.err("delete message"))?,
                    ),
                };
                let found: Option<(Option<i64>, Option<i64>)> = find
                    .query_row(params![*seq as i64, dest], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
                    .map_err(ctx.err("delete message"))?;
                let Some(body_at) = found else {
                    return Err(no_such(ctx, dest, *seq));
                };
                let delete = match &mut stmts.delete {
                    Some(st) => st,
                    None => stmts.delete.insert(
                        tx.prepare_cached(DELETE_MESSAGE_SQL)
                            .map_err(ctx.err("delete message"))?,
                    ),
                };
                let n = delete
                    .execute([*seq as i64])
                    .map_err(ctx.err("delete message"))?;
                assert_eq!(n, 1, "the row just found is deleted");
                if let (Some(seg), Some(len)) = body_at {
                    delta.deleted.push((seg as u64, len as u64));
                }
                count(&mut depth, dest, -1);
            }
            Op::SetDeliveryCount { dest, seq, count } => {
                let n = tx
                    .prepare_cached(
                        "UPDATE messages SET delivery_count = ?3 WHERE seq = ?1 AND dest = ?2",
                    )
                    .and_then(|mut s| s.execute(params![*seq as i64, dest, count]))
                    .map_err(ctx.err("update delivery count"))?;
                if n == 0 {
                    return Err(no_such(ctx, dest, *seq));
                }
            }
            Op::Move { from, seq, to } => {
                let n = tx
                    .prepare_cached("UPDATE messages SET dest = ?3 WHERE seq = ?1 AND dest = ?2")
                    .and_then(|mut s| s.execute(params![*seq as i64, from, to]))
                    .map_err(ctx.err("move message"))?;
                if n == 0 {
                    return Err(no_such(ctx, from, *seq));
                }
                count(&mut depth, from, -1);
                count(&mut depth, to, 1);
            }
            Op::SetKv { space, key, value } => {
                tx.prepare_cached(
                    "INSERT INTO kv (space, key, value) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (space, key) DO UPDATE SET value = excluded.value",
                )
                .and_then(|mut s| s.execute(params![space, key, value]))
                .map_err(ctx.err("write kv"))?;
            }
            Op::DeleteKv { space, key } => {
                tx.prepare_cached("DELETE FROM kv WHERE space = ?1 AND key = ?2")
                    .and_then(|mut s| s.execute(params![space, key]))
                    .map_err(ctx.err("delete kv"))?;
            }
            Op::SetRestoreState(state) => meta_set(tx, ctx, "restore_state", state.as_str())?,
        }
    }
    for (dest, delta) in depth {
        depth_add(tx, ctx, dest, delta)?;
    }
    Ok(outcome)
}

/// Writes a group's body-log accounting: the current segment's new bytes, then the bytes its
/// deletes freed. Returns the segments that died (no live bytes, not current): their rows are
/// gone with this transaction, their files are unlinked after it commits.
fn apply_seg_delta(
    tx: &Transaction<'_>,
    ctx: &Ctx,
    delta: &SegDelta,
    current: u64,
) -> Result<Vec<u64>> {
    if delta.put_bytes > 0 {
        assert!(delta.seq_min <= delta.seq_max);
        tx.prepare_cached(
            "INSERT INTO segments (seg, bytes, live_bytes, seq_min, seq_max) \
             VALUES (?1, ?2, ?2, ?3, ?4) ON CONFLICT (seg) DO UPDATE SET \
             bytes = bytes + excluded.bytes, live_bytes = live_bytes + excluded.live_bytes, \
             seq_max = excluded.seq_max",
        )
        .and_then(|mut s| {
            s.execute(params![
                current as i64,
                delta.put_bytes as i64,
                delta.seq_min as i64,
                delta.seq_max as i64
            ])
        })
        .map_err(ctx.err("count body log bytes"))?;
    }
    // Summed per segment first: a group's deletes mostly hit one or two segments.
    let mut freed: Vec<(u64, u64)> = Vec::new();
    for &(seg, bytes) in &delta.deleted {
        match freed.iter_mut().find(|(s, _)| *s == seg) {
            Some((_, b)) => *b += bytes,
            None => freed.push((seg, bytes)),
        }
    }
    let mut dead = Vec::new();
    for (seg, bytes) in freed {
        // No RETURNING (see FIND_MESSAGE_SQL): update, then read back.
        let n = tx
            .prepare_cached("UPDATE segments SET live_bytes = live_bytes - ?2 WHERE seg = ?1")
            .and_then(|mut s| s.execute(params![seg as i64, bytes as i64]))
            .map_err(ctx.err("count body log bytes"))?;
        let live: Option<i64> = if n == 0 {
            None
        } else {
            tx.prepare_cached("SELECT live_bytes FROM segments WHERE seg = ?1")
                .and_then(|mut s| s.query_row([seg as i64], |r| r.get(0)))
                .map(Some)
                .map_err(ctx.err("count body log bytes"))?
        };
        let Some(live) = live else {
            return Err(StoreError::Corrupt {
                me: ctx.me.clone(),
                file: ctx.file.clone(),
                detail: format!(
                    "a message points into body log segment {seg}, which is not counted"
                ),
            });
        };
        // The CHECK keeps live_bytes >= 0; read back: never below.
        assert!(live >= 0);
        if live == 0 && seg != current {
            tx.prepare_cached("DELETE FROM segments WHERE seg = ?1")
                .and_then(|mut s| s.execute([seg as i64]))
                .map_err(ctx.err("forget a dead segment"))?;
            dead.push(seg);
        }
    }
    Ok(dead)
}

fn no_such(ctx: &Ctx, dest: &str, seq: u64) -> StoreError {
    StoreError::NoSuchMessage {
        me: ctx.me.clone(),
        dest: dest.to_string(),
        seq,
    }
}

/// Keeps `dests.depth` equal to the number of messages of `dest` by adding `delta` (a batch's
/// net change); a row exists only while the destination holds messages.
fn depth_add(tx: &Transaction<'_>, ctx: &Ctx, dest: &str, delta: i64) -> Result<()> {
    if delta == 0 {
        return Ok(());
    }
    let current: i64 = tx
        .prepare_cached("SELECT depth FROM dests WHERE dest = ?1")
        .and_then(|mut s| s.query_row([dest], |r| r.get(0)).optional())
        .map_err(ctx.err("count messages"))?
        .unwrap_or(0);
    let depth = current + delta;
    // Messages were just removed from `dest` and only those it held can be.
    assert!(
        depth >= 0,
        "destination count out of step with its messages"
    );
    let n = match (current, depth) {
        (_, 0) => tx
            .prepare_cached("DELETE FROM dests WHERE dest = ?1")
            .and_then(|mut s| s.execute([dest])),
        (0, _) => tx
            .prepare_cached("INSERT INTO dests (dest, depth) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![dest, depth])),
        _ => tx
            .prepare_cached("UPDATE dests SET depth = ?2 WHERE dest = ?1")
            .and_then(|mut s| s.execute(params![dest, depth])),
    }
    .map_err(ctx.err("count messages"))?;
    assert_eq!(n, 1, "one destination count row changes");
    Ok(())
}

/// Checks a batch before it is queued: bounds and per-op rules. Never touches the database.
pub(crate) fn validate_ops(me: &str, ops: &[Op]) -> Result<usize> {
    let invalid = |problem: String| StoreError::Invalid {
        me: me.to_string(),
        problem,
    };
    if ops.is_empty() {
        return Err(invalid("a commit needs at least one op".into()));
    }
    if ops.len() > BATCH_OPS_MAX {
        return Err(invalid(format!(
            "a commit of {} ops exceeds the maximum of {BATCH_OPS_MAX}",
            ops.len()
        )));
    }
    let mut bytes = 0usize;
    for op in ops {
        bytes = bytes.saturating_add(op.bytes());
        match op {
            Op::Put {
                dest,
                priority,
                stream,
                ..
            } => {
                if dest.is_empty() {
                    return Err(invalid("Put with an empty destination name".into()));
                }
                if *priority > 9 {
                    return Err(invalid(format!("Put with priority {priority} (0..=9)")));
                }
                if let Some((sid, _)) = stream {
                    if sid.is_empty() {
                        return Err(invalid("Put with an empty stream_id".into()));
                    }
                }
            }
            Op::Delete { dest, .. } | Op::SetDeliveryCount { dest, .. } => {
                if dest.is_empty() {
                    return Err(invalid("an op with an empty destination name".into()));
                }
            }
            Op::Move { from, to, .. } => {
                if from.is_empty() || to.is_empty() || from == to {
                    return Err(invalid(format!(
                        "Move from `{from}` to `{to}` (both named, and different)"
                    )));
                }
            }
            Op::SetKv { space, key, .. } | Op::DeleteKv { space, key } => {
                if space.is_empty() || key.is_empty() {
                    return Err(invalid("a kv op with an empty space or key".into()));
                }
            }
            Op::SetRestoreState(_) => {}
        }
    }
    if bytes > BATCH_BYTES_MAX {
        return Err(invalid(format!(
            "a commit of {bytes} bytes exceeds the maximum of {BATCH_BYTES_MAX}"
        )));
    }
    Ok(bytes)
}

/// Decrements `pending_batches` if the commit future is dropped before its batch was queued.
pub(crate) struct PendingGuard<'a> {
    pub(crate) pending: &'a AtomicUsize,
    pub(crate) armed: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Store for SqliteStore {
    fn commit(&self, ops: Vec<Op>) -> StoreFuture<'_, CommitOutcome> {
        Box::pin(async move {
            if self.shared.closed.load(Ordering::Acquire) {
                return Err(self.closed_err());
            }
            if let Some(e) = self.shared.failed_err() {
                return Err(e);
            }
            let ops_bytes = validate_ops(&self.shared.ctx.me, &ops)?;
            let puts = ops.iter().filter(|o| matches!(o, Op::Put { .. })).count();
            let (tx, rx) = oneshot::channel();
            self.shared.pending_batches.fetch_add(1, Ordering::AcqRel);
            let mut guard = PendingGuard {
                pending: &self.shared.pending_batches,
                armed: true,
            };
            let sent = self
                .writer_tx
                .send(WriteReq::Commit {
                    ops,
                    ops_bytes,
                    reply: tx,
                })
                .await;
            match sent {
                // The writer decrements when it takes the batch.
                Ok(()) => guard.armed = false,
                Err(_) => return Err(self.writer_gone().await),
            }
            let outcome = match rx.await {
                Ok(r) => r?,
                Err(_) => return Err(self.writer_gone().await),
            };
            assert_eq!(outcome.assigned_seqs.len(), puts);
            assert!(outcome.assigned_seqs.windows(2).all(|w| w[0] < w[1]));
            Ok(outcome)
        })
    }

    fn page(
        &self,
        dest: &str,
        after: Option<(u8, u64)>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<StoredMessage>> {
        let dest = dest.to_string();
        self.read(move |conn, ctx| page_impl(conn, ctx, &dest, after, limit))
    }

    fn depth(&self, dest: &str) -> StoreFuture<'_, u64> {
        let dest = dest.to_string();
        self.read(move |conn, ctx| {
            let n: Option<i64> = conn
                .query_row("SELECT depth FROM dests WHERE dest = ?1", [&dest], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(ctx.err("read depth"))?;
            assert!(n.is_none_or(|n| n > 0));
            Ok(n.unwrap_or(0) as u64)
        })
    }

    fn destinations(&self) -> StoreFuture<'_, Vec<(String, u64)>> {
        self.read(|conn, ctx| {
            let mut stmt = conn
                .prepare_cached("SELECT dest, depth FROM dests ORDER BY dest")
                .map_err(ctx.err("read destinations"))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
                })
                .map_err(ctx.err("read destinations"))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(ctx.err("read destinations"))?;
            assert!(rows.iter().all(|(_, n)| *n > 0));
            Ok(rows)
        })
    }

    fn by_stream(
        &self,
        stream_id: &str,
        from_tick: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<StoredMessage>> {
        let stream_id = stream_id.to_string();
        self.read(move |conn, ctx| {
            check_limit(&ctx.me, limit)?;
            let out = query_messages(
                conn,
                ctx,
                &format!(
                    "SELECT {SELECT_COLS} FROM messages WHERE stream_id = ?1 AND tick >= ?2 \
                     ORDER BY tick, seq LIMIT ?3"
                ),
                params![stream_id, from_tick as i64, limit as i64],
            )?;
            assert!(out.len() <= limit);
            assert!(out
                .windows(2)
                .all(|w| w[0].stream.as_ref().map(|s| s.1) <= w[1].stream.as_ref().map(|s| s.1)));
            Ok(out)
        })
    }

    fn kv_get(&self, space: &str, key: &str) -> StoreFuture<'_, Option<Vec<u8>>> {
        let (space, key) = (space.to_string(), key.to_string());
        self.read(move |conn, ctx| {
            conn.query_row(
                "SELECT value FROM kv WHERE space = ?1 AND key = ?2",
                params![space, key],
                |r| r.get(0),
            )
            .optional()
            .map_err(ctx.err("read kv"))
        })
    }

    fn kv_scan(&self, space: &str) -> StoreFuture<'_, Vec<(String, Vec<u8>)>> {
        let space = space.to_string();
        self.read(move |conn, ctx| {
            let mut stmt = conn
                .prepare_cached("SELECT key, value FROM kv WHERE space = ?1 ORDER BY key")
                .map_err(ctx.err("scan kv"))?;
            let rows = stmt
                .query_map([&space], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(ctx.err("scan kv"))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(ctx.err("scan kv"))?;
            Ok(rows)
        })
    }

    fn info(&self) -> StoreFuture<'_, StoreInfo> {
        self.read(|conn, ctx| {
            // One read transaction, so meta and the count describe the same moment.
            conn.execute_batch("BEGIN DEFERRED")
                .map_err(ctx.err("begin read"))?;
            let r = info_of(conn, ctx);
            conn.execute_batch("COMMIT").map_err(ctx.err("end read"))?;
            r
        })
    }

    fn begin_incarnation(&self, clear_restored: bool) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            if self.shared.closed.load(Ordering::Acquire) {
                return Err(self.closed_err());
            }
            self.ask_writer(|reply| WriteReq::NewIncarnation {
                clear_restored,
                reply,
            })
            .await?
        })
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            if self.shared.closed.swap(true, Ordering::AcqRel) {
                return Ok(());
            }
            // Queued commits ahead of Close still complete (FIFO); the replies come after each
            // thread dropped its connection, so a reopen right after sees a released file.
            // Reader first, writer last: the last connection to close checkpoints the WAL and
            // removes it; two closing at once could each see the other and both skip it.
            let (rtx, rrx) = oneshot::channel();
            let _ = self.reader_tx.send(ReadReq::Close { reply: rtx }).await;
            let _ = rrx.await;
            let (wtx, wrx) = oneshot::channel();
            let _ = self.writer_tx.send(WriteReq::Close { reply: wtx }).await;
            let _ = wrx.await;
            tracing::info!(me = %self.shared.ctx.me, "closed data store");
            Ok(())
        })
    }

    fn health(&self) -> StoreHealth {
        self.shared.health()
    }
}

fn info_of(conn: &Connection, ctx: &Ctx) -> Result<StoreInfo> {
    let meta = read_meta(conn, ctx)?;
    Ok(StoreInfo {
        me: meta.me,
        uuid: meta.uuid,
        backend: "sqlite",
        location: ctx.file.display().to_string(),
        restore_state: meta.restore_state,
        messages: count_messages(conn, ctx)?,
        schema_version: meta.schema_version,
        incarnation: meta.incarnation,
    })
}

// ---------------------------------------------------------------------------------------------
// Offline: info, backup manifest, restore.

/// Reads what a store says about itself without starting it (the ME may be stopped). Opens
/// the file read-only and checks nothing but that it is a Keel store.
/// Full integrity check of a store file (`PRAGMA quick_check`): reads every page, so it takes
/// time proportional to the store's size. Safe while the engine runs (a WAL reader).
pub fn verify_file(path: &Path, me_name: &str, me_uuid: &str) -> Result<()> {
    let ctx = Ctx::new(me_name, me_uuid, path);
    if !path.exists() {
        return Err(StoreError::Missing {
            file: path.to_path_buf(),
        });
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(ctx.err("open"))?;
    quick_check(&conn, &ctx, "quick_check")?;
    let meta = check_identity(&conn, &ctx)?;
    if meta.schema_version >= 2 {
        // Every body in the body log is there and passes its checksum. The engine may be
        // running (another process, whose pins this one cannot hold): a body that fails to
        // read counts only if its row still points at it afterwards; otherwise the message
        // was consumed, or compacted, and its segment unlinked meanwhile.
        let still_there = |seq: i64, r: BodyRef| -> Result<bool> {
            let now: Option<Option<BodyRef>> = conn
                .query_row(
                    "SELECT body_seg, body_at, body_len, body_crc FROM messages WHERE seq = ?1",
                    [seq],
                    |row| body_ref_at(row, 0),
                )
                .optional()
                .map_err(ctx.err("read a body reference again"))?;
            Ok(now == Some(Some(r)))
        };
        let mut after = i64::MIN;
        loop {
            let rows = logged_rows_after(&conn, &ctx, after)?;
            let Some(&(last, _)) = rows.last() else {
                break;
            };
            let refs: Vec<BodyRef> = rows.iter().map(|(_, r)| *r).collect();
            if ctx.bodies.read(&refs).is_err() {
                for &(seq, r) in &rows {
                    if let Err(e) = ctx.bodies.read(&[r]) {
                        if still_there(seq, r)? {
                            return Err(ctx.body_err(e));
                        }
                    }
                }
            }
            after = last;
        }
    }
    Ok(())
}

/// Bytes a store takes on disk: its file, SQLite's WAL beside it, and its body log.
pub fn disk_bytes(path: &Path) -> std::io::Result<u64> {
    let mut total = std::fs::metadata(path)?.len();
    total += std::fs::metadata(fsx::with_suffix(path, "-wal")).map_or(0, |m| m.len());
    let dir = bodylog::dir_of(path);
    for seg in bodylog::list_segments(&dir)? {
        total += std::fs::metadata(bodylog::segment_path(&dir, seg)).map_or(0, |m| m.len());
    }
    Ok(total)
}

pub fn read_info(path: &Path) -> Result<StoreInfo> {
    let ctx = Ctx::new("(unknown)", "", path);
    if !path.is_file() {
        return Err(StoreError::Missing {
            file: path.to_path_buf(),
        });
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(ctx.err("open read-only"))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(ctx.err("set busy timeout"))?;
    let me: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'me_name'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(|e| match e.sqlite_error_code() {
            Some(ErrorCode::Unknown) | None => StoreError::Corrupt {
                me: ctx.me.clone(),
                file: ctx.file.clone(),
                detail: format!("not a Keel data store ({e})"),
            },
            _ => sql_err(&ctx.me, &ctx.file, "read meta", e),
        })?;
    let ctx = Ctx {
        me: me.unwrap_or_else(|| ctx.me.clone()),
        ..ctx
    };
    conn.execute_batch("BEGIN DEFERRED")
        .map_err(ctx.err("begin read"))?;
    let found = meta_u64(&conn, &ctx, "schema_version")?;
    if found > u64::from(SCHEMA_VERSION) {
        return Err(StoreError::SchemaTooNew {
            file: ctx.file.clone(),
            found: u32::try_from(found).unwrap_or(u32::MAX),
            supported: SCHEMA_VERSION,
        });
    }
    info_of(&conn, &ctx)
}

/// The manifest written beside a backup as `<backup>.manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackupManifest {
    pub me: String,
    pub uuid: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Size of the backup file.
    pub bytes: u64,
    /// CRC-32C of the backup file.
    pub crc32c: u32,
    pub schema_version: u32,
    pub incarnation: u64,
    pub messages: u64,
}

/// What a restore put back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    pub from_created_at: String,
    pub messages: u64,
}

/// Where the manifest of the backup `backup` lives: `<backup>.manifest.json`.
pub fn manifest_path(backup: &Path) -> PathBuf {
    fsx::with_suffix(backup, ".manifest.json")
}

fn write_manifest(path: &Path, m: &BackupManifest) -> Result<()> {
    let json = serde_json::to_vec_pretty(m).expect("a manifest serializes");
    assert!((json.len() as u64) < MANIFEST_BYTES_MAX);
    let dir = fsx::parent_of(path);
    let tmp = dir.join(format!(".manifest.tmp-{}", fsx::random_hex(6)));
    let r = (|| {
        std::fs::write(&tmp, &json).map_err(io_err("write", &tmp))?;
        fsx::fsync_file(&tmp)?;
        std::fs::rename(&tmp, path).map_err(io_err("rename manifest into", path))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

fn read_manifest(backup: &Path) -> Result<BackupManifest> {
    let path = manifest_path(backup);
    let damaged = |how: String| StoreError::BackupDamaged {
        file: backup.to_path_buf(),
        how,
    };
    let len = std::fs::metadata(&path)
        .map_err(|e| damaged(format!("cannot read its manifest {}: {e}", path.display())))?
        .len();
    if len > MANIFEST_BYTES_MAX {
        return Err(damaged(format!(
            "manifest {} is {len} bytes, too big",
            path.display()
        )));
    }
    let bytes = std::fs::read(&path)
        .map_err(|e| damaged(format!("cannot read its manifest {}: {e}", path.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| damaged(format!("manifest {} is not valid: {e}", path.display())))
}

/// Replaces the (stopped) ME's store with a backup. Everything is verified BEFORE the current
/// store is touched: the manifest, the size and CRC-32C, that the copy opens, passes
/// `integrity_check` and is stamped with this ME. Then the store is replaced atomically and
/// marked `restored` (a normal start is refused until a FLUSH start).
pub fn restore_from(
    backup: &Path,
    store_path: &Path,
    me_name: &str,
    me_uuid: &str,
) -> Result<RestoreReport> {
    assert!(!me_name.is_empty() && !me_uuid.is_empty());
    let damaged = |how: String| StoreError::BackupDamaged {
        file: backup.to_path_buf(),
        how,
    };
    let dir = fsx::parent_of(store_path);
    std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
    // Held until the end: the ME cannot start on a half-replaced store, and a running ME
    // makes the restore fail here, before anything is touched.
    let _lock = take_lock(store_path, me_name)?;
    if !backup.is_file() {
        return Err(damaged("the file does not exist".into()));
    }
    let manifest = read_manifest(backup)?;
    if manifest.uuid != me_uuid || manifest.me != me_name {
        return Err(StoreError::ForeignBackup {
            file: backup.to_path_buf(),
            found_me: manifest.me,
            found_uuid: manifest.uuid,
            want_me: me_name.to_string(),
            want_uuid: me_uuid.to_string(),
        });
    }
    if manifest.schema_version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            file: backup.to_path_buf(),
            found: manifest.schema_version,
            supported: SCHEMA_VERSION,
        });
    }
    let name = store_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Verify a private copy, not the backup itself: what is checked is exactly what is
    // renamed into place, and the backup file is never modified.
    let tmp = dir.join(format!(".{name}.restore-{}", fsx::random_hex(6)));
    let cleanup = |tmp: &Path| {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(fsx::with_suffix(tmp, suffix));
        }
    };
    let verified = (|| -> Result<u64> {
        std::fs::copy(backup, &tmp).map_err(io_err("copy backup to", &tmp))?;
        let (crc, bytes) = fsx::crc32c_file(&tmp)?;
        if bytes != manifest.bytes {
            return Err(damaged(format!(
                "it is {bytes} bytes, its manifest says {} (truncated or replaced)",
                manifest.bytes
            )));
        }
        if crc != manifest.crc32c {
            return Err(damaged(format!(
                "its CRC-32C is {crc:08x}, its manifest says {:08x} (the file changed after the backup)",
                manifest.crc32c
            )));
        }
        let ctx = Ctx::new(me_name, me_uuid, &tmp);
        let as_damaged = |e: StoreError| match e {
            StoreError::Corrupt { detail, .. } => damaged(detail),
            StoreError::WrongOwner {
                found_me,
                found_uuid,
                want_me,
                want_uuid,
                ..
            } => StoreError::ForeignBackup {
                file: backup.to_path_buf(),
                found_me,
                found_uuid,
                want_me,
                want_uuid,
            },
            other => other,
        };
        let conn = Connection::open_with_flags(
            &tmp,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| as_damaged(sql_err(me_name, &tmp, "open", e)))?;
        quick_check(&conn, &ctx, "integrity_check").map_err(as_damaged)?;
        let meta = check_identity(&conn, &ctx).map_err(as_damaged)?;
        if meta.schema_version >= 2 {
            let logged: i64 = conn
                .query_row(
                    "SELECT count(*) FROM messages WHERE body_seg IS NOT NULL",
                    [],
                    |r| r.get(0),
                )
                .map_err(ctx.err("count bodies outside the file"))?;
            if logged > 0 {
                return Err(damaged(format!(
                    "{logged} of its messages have their body outside the file (a copy of a live \
                     store, not a backup made by `keel store backup`)"
                )));
            }
        }
        let messages = count_messages(&conn, &ctx).map_err(as_damaged)?;
        if messages != manifest.messages {
            return Err(damaged(format!(
                "it holds {messages} messages, its manifest says {}",
                manifest.messages
            )));
        }
        conn.execute_batch("PRAGMA journal_mode=DELETE; PRAGMA synchronous=FULL;")
            .map_err(ctx.err("prepare restored copy"))?;
        meta_set(
            &conn,
            &ctx,
            "restore_state",
            RestoreState::Restored.as_str(),
        )?;
        let back = read_meta(&conn, &ctx)?;
        assert_eq!(back.restore_state, RestoreState::Restored);
        conn.close()
            .map_err(|(_, e)| ctx.err("close restored copy")(e))?;
        fsx::fsync_file(&tmp)?;
        Ok(messages)
    })();
    let messages = match verified {
        Ok(m) => m,
        Err(e) => {
            cleanup(&tmp);
            return Err(e);
        }
    };
    // Point of no return. The old store's WAL and shared-memory files go first: left beside the
    // new file they would be replayed into it.
    for suffix in ["-wal", "-shm"] {
        let p = fsx::with_suffix(store_path, suffix);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                cleanup(&tmp);
                return Err(io_err("remove", &p)(e));
            }
        }
    }
    if let Err(e) = std::fs::rename(&tmp, store_path) {
        cleanup(&tmp);
        return Err(io_err("rename restored store into", store_path)(e));
    }
    fsx::fsync_dir(&dir)?;
    // The old store's body log: nothing in the restored file points into it. A crash before
    // this leaves it to the next open, which removes segments no row counts.
    let bodies = bodylog::dir_of(store_path);
    match std::fs::remove_dir_all(&bodies) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(me = me_name, dir = %bodies.display(), error = %e,
            "cannot remove the old store's body log; the next start removes it"),
    }
    tracing::info!(me = me_name, backup = %backup.display(), store = %store_path.display(),
        messages, from = %manifest.created_at, "restored data store; it is marked restored");
    Ok(RestoreReport {
        from_created_at: manifest.created_at,
        messages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_state_round_trips() {
        for s in [RestoreState::None, RestoreState::Restored] {
            assert_eq!(RestoreState::parse(s.as_str()), Some(s));
        }
        assert_eq!(RestoreState::parse("maybe"), None);
    }

    #[test]
    fn validate_ops_enforces_bounds() {
        let put = |p: u8, body: usize| Op::Put {
            dest: "Q".into(),
            id: String::new(),
            priority: p,
            reliability: 0,
            expiry_ms: None,
            properties: vec![],
            body: vec![0; body],
            stream: None,
        };
        assert!(validate_ops("me", &[put(9, 10)]).is_ok());
        assert!(validate_ops("me", &[put(10, 10)]).is_err());
        assert!(validate_ops("me", &[]).is_err());
        assert!(validate_ops("me", &[put(1, BATCH_BYTES_MAX + 1)]).is_err());
        let e = validate_ops(
            "me",
            &[Op::SetKv {
                space: String::new(),
                key: "k".into(),
                value: vec![],
            }],
        )
        .unwrap_err();
        assert!(e.to_string().contains("messaging engine me"), "{e}");
        assert!(check_limit("me", PAGE_LIMIT_MAX).is_ok());
        assert!(check_limit("me", PAGE_LIMIT_MAX + 1).is_err());
    }

    #[test]
    fn sqlite_full_maps_to_disk_full() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.sqlite");
        let conn = Connection::open(&file).unwrap();
        conn.execute_batch("CREATE TABLE t (b BLOB); PRAGMA max_page_count = 4;")
            .unwrap();
        let e = conn
            .execute("INSERT INTO t VALUES (zeroblob(100000))", [])
            .unwrap_err();
        let mapped = sql_err("me1", &file, "insert", e);
        assert!(matches!(mapped, StoreError::DiskFull { .. }), "{mapped}");
        assert!(mapped.to_string().contains("x.sqlite"));
    }
}

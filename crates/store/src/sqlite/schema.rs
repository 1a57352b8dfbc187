//! Opening, stamping, checking: the store's writer lock, its schema and migration, the
//! `meta` table, the integrity checks and the connection settings every thread uses.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::Ctx;
use crate::error::{io_err, Result, StoreError};
use crate::fsx;
use crate::{RestoreState, SCHEMA_VERSION};

/// Takes the store's writer lock: an exclusive `flock` on `<store>.lock`, held for the life of
/// an open store (the kernel drops it if the process dies). Two writers would each hand out
/// the same seqs, and a restore under a running ME would pull the file from under it. A
/// separate file, because closing any other descriptor of the database itself would drop
/// SQLite's own POSIX locks. The lock file is never deleted (deleting lock files races).
pub(super) fn take_lock(path: &Path, me: &str) -> Result<File> {
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

pub(super) const SCHEMA: &str = "
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
pub(super) const SCHEMA_V2: &str = "
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

pub(super) fn meta_u64(conn: &Connection, ctx: &Ctx, key: &str) -> Result<u64> {
    let v = meta_req(conn, ctx, key)?;
    v.parse().map_err(|_| StoreError::Corrupt {
        me: ctx.me.clone(),
        file: ctx.file.clone(),
        detail: format!("meta key `{key}` holds `{v}`, not a number"),
    })
}

pub(super) fn meta_set(conn: &Connection, ctx: &Ctx, key: &str, value: &str) -> Result<()> {
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
pub(super) struct Meta {
    pub(super) me: String,
    pub(super) uuid: String,
    pub(super) schema_version: u32,
    pub(super) incarnation: u64,
    pub(super) restore_state: RestoreState,
    pub(super) next_seq: u64,
}

pub(super) fn read_meta(conn: &Connection, ctx: &Ctx) -> Result<Meta> {
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
pub(super) fn check_identity(conn: &Connection, ctx: &Ctx) -> Result<Meta> {
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
pub(super) fn migrate(conn: &mut Connection, ctx: &Ctx, meta: &mut Meta) -> Result<()> {
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

pub(super) fn quick_check(conn: &Connection, ctx: &Ctx, pragma: &str) -> Result<()> {
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
pub(super) fn open_conn(ctx: &Ctx, check: bool) -> Result<(Connection, Meta)> {
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

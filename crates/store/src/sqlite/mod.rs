//! The SQLite backend: one file per messaging engine (`<profile>/databases/<me>.sqlite`), WAL
//! mode with `synchronous=FULL`, one writer thread that group-commits, one reader thread, an
//! online backup and an offline restore. The bundled SQLite syncs with `fdatasync`
//! (`HAVE_FDATASYNC`, set in the workspace's `.cargo/config.toml` as distribution builds set
//! it): plain `fsync` also wrote the inode's times at every commit.
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
//! deleted; a reopened store starts at the reservation, after checking that every stored seq
//! is below it. A restart skips at most `SEQ_RESERVE` seqs.
//!
//! The files of this backend, one per section:
//! - `schema.rs`: opening, stamping, checking (the lock, the schema and its migration, `meta`);
//! - `writer.rs`: the writer thread, which group-commits (the neutral part, shared with
//!   PostgreSQL, is `crate::commit`), and the body log's upkeep (rolling, compaction);
//! - `reads.rs`: the reader thread's queries (paging, bodies from the body log, info);
//! - `backup.rs`: the online backup and the offline functions (info, verify, restore);
//! - here: the store handle (`SqliteStore`, its `Store` implementation) and what the threads
//!   share.

mod backup;
mod reads;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use crate::bodylog::{self, Appender, BodyError, Segments};
use crate::commit::{check_limit, validate_ops, PendingGuard, WRITE_QUEUE_MAX};
use crate::error::{io_err, Result, StoreError};
use crate::fsx;
use crate::{
    CommitOutcome, Op, RestoreState, Store, StoreFuture, StoreHealth, StoreInfo, StoredMessage,
    SCHEMA_VERSION,
};
use keel_core::{catalog, emit};

pub use backup::{
    disk_bytes, manifest_path, read_info, restore_from, verify_file, BackupManifest, RestoreReport,
};
use reads::{info_of, page_impl, query_messages, reader_loop, SELECT_COLS};
use schema::{meta_set, migrate, open_conn, take_lock, SCHEMA, SCHEMA_V2};
use writer::Writer;

/// Read requests queued for the reader thread.
const READ_QUEUE_MAX: usize = 1_024;

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
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Dropping the senders ends both threads once their queues drain; queued commits
        // still complete (their callers may be gone, which is fine: they were not answered).
        self.shared.closed.store(true, Ordering::Release);
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

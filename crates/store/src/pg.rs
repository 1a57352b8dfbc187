//! The PostgreSQL backend: a shared store, so a messaging engine can move to another server.
//! Each ME owns one schema of a database (same tables as the SQLite store, see `sqlite/mod.rs`).
//!
//! One writer task owns one connection and group-commits exactly like the SQLite writer (same
//! bounds; a SAVEPOINT per batch; `synchronous_commit` is left at the server's default, `on`,
//! so COMMIT returns once the WAL is flushed). It also holds a session advisory lock on the
//! schema, so two processes never write one ME's store. Reads use a second connection;
//! tokio-postgres pipelines concurrent reads on it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Statement};

use crate::commit::{
    answer_committed, answer_failed, check_limit, seal, validate_ops, Batch, PendingGuard,
    LINGER_US, TXN_BATCHES_MAX, TXN_BYTES_MAX, TXN_OPS_MAX, WRITE_QUEUE_MAX,
};
use crate::error::{Result, StoreError};
use crate::{
    fsx, CommitOutcome, Op, RestoreState, Store, StoreFuture, StoreInfo, StoredMessage,
    SCHEMA_VERSION,
};

/// How long connecting may take before the store reports PostgreSQL unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest schema name PostgreSQL keeps (NAMEDATALEN - 1).
const SCHEMA_NAME_BYTES_MAX: usize = 63;

const SELECT_COLS: &str = "dest, seq, id, priority, reliability, expiry_ms, delivery_count, \
                           properties, body, stream_id, tick";

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE messages (
    seq BIGINT PRIMARY KEY,
    dest TEXT NOT NULL,
    id TEXT NOT NULL,
    priority SMALLINT NOT NULL CHECK (priority BETWEEN 0 AND 9),
    reliability SMALLINT NOT NULL,
    expiry_ms BIGINT,
    delivery_count BIGINT NOT NULL,
    properties BYTEA NOT NULL,
    body BYTEA NOT NULL,
    stream_id TEXT,
    tick BIGINT,
    CHECK ((stream_id IS NULL) = (tick IS NULL))
);
CREATE INDEX messages_delivery ON messages (dest, priority DESC, seq);
CREATE INDEX messages_stream ON messages (stream_id, tick) WHERE stream_id IS NOT NULL;
CREATE TABLE dests (dest TEXT PRIMARY KEY, depth BIGINT NOT NULL CHECK (depth > 0));
CREATE TABLE kv (space TEXT NOT NULL, key TEXT NOT NULL, value BYTEA NOT NULL,
                 PRIMARY KEY (space, key));
";

/// Identity and location every error names.
#[derive(Debug, Clone)]
struct Ctx {
    me: String,
    uuid: String,
    schema: String,
    /// URL without the password.
    location: String,
}

impl Ctx {
    fn err(&self, action: &str) -> impl FnOnce(tokio_postgres::Error) -> StoreError + '_ {
        let action = action.to_string();
        move |e| pg_err(self, &action, e)
    }
    fn corrupt(&self, detail: String) -> StoreError {
        StoreError::Corrupt {
            me: self.me.clone(),
            file: PathBuf::from(&self.location),
            detail,
        }
    }
}

fn pg_err(ctx: &Ctx, action: &str, e: tokio_postgres::Error) -> StoreError {
    match e.code() {
        Some(c) if *c == SqlState::DISK_FULL => StoreError::DiskFull {
            me: ctx.me.clone(),
            file: PathBuf::from(&ctx.location),
        },
        Some(c) if *c == SqlState::DATA_CORRUPTED || *c == SqlState::INDEX_CORRUPTED => {
            ctx.corrupt(format!("{action}: {e}"))
        }
        _ => StoreError::Postgres {
            me: ctx.me.clone(),
            location: ctx.location.clone(),
            action: action.to_string(),
            source: Arc::new(e),
        },
    }
}

/// `postgresql://user@host:port/db?schema=S`, never with the password.
fn location_of(cfg: &tokio_postgres::Config, schema: &str) -> String {
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgresql://{}@{host}:{port}/{}?schema={schema}",
        cfg.get_user().unwrap_or(""),
        cfg.get_dbname().unwrap_or("")
    )
}

fn check_schema_name(me: &str, schema: &str) -> Result<()> {
    let ok = !schema.is_empty()
        && schema.len() <= SCHEMA_NAME_BYTES_MAX
        && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        return Ok(());
    }
    Err(StoreError::Invalid {
        me: me.to_string(),
        problem: format!(
            "PostgreSQL schema name `{schema}` must be 1 to {SCHEMA_NAME_BYTES_MAX} lowercase \
             letters, digits or `_`, starting with a letter or `_`"
        ),
    })
}

/// Connects, spawns the connection driver, and points `search_path` at the ME's schema.
async fn connect(url: &str, ctx: &Ctx) -> Result<Client> {
    // `sslmode=verify-full&sslrootcert=FILE` asks for TLS (keel_tls::pg).
    let mut target = keel_tls::pg::pg_target(url).map_err(|problem| StoreError::Invalid {
        me: ctx.me.clone(),
        problem: format!("data store URL: {problem}"),
    })?;
    if target.config.get_connect_timeout().is_none() {
        target.config.connect_timeout(CONNECT_TIMEOUT);
    }
    let me = ctx.me.clone();
    let ended = move |e: tokio_postgres::Error| {
        tracing::warn!(me = %me, error = %e, "data store connection ended");
    };
    let client = match target.tls {
        Some(tls) => {
            let (client, conn) = target
                .config
                .connect(tls)
                .await
                .map_err(ctx.err("connect over TLS"))?;
            tokio::spawn(async move { conn.await.unwrap_or_else(ended) });
            client
        }
        None => {
            let (client, conn) = target
                .config
                .connect(NoTls)
                .await
                .map_err(ctx.err("connect"))?;
            tokio::spawn(async move { conn.await.unwrap_or_else(ended) });
            client
        }
    };
    // The schema name was checked to be a plain identifier, so quoting is exact.
    client
        .batch_execute(&format!("SET search_path TO \"{}\"", ctx.schema))
        .await
        .map_err(ctx.err("set search_path"))?;
    Ok(client)
}

#[derive(Debug, Clone)]
struct Meta {
    me: String,
    uuid: String,
    schema_version: u32,
    incarnation: u64,
    restore_state: RestoreState,
    next_seq: u64,
}

fn parse_meta(ctx: &Ctx, rows: &[(String, String)]) -> Result<Meta> {
    let map: HashMap<&str, &str> = rows.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let get = |k: &str| {
        map.get(k)
            .map(|v| v.to_string())
            .ok_or_else(|| ctx.corrupt(format!("meta key `{k}` is missing")))
    };
    let num = |k: &str| -> Result<u64> {
        let v = get(k)?;
        v.parse()
            .map_err(|_| ctx.corrupt(format!("meta key `{k}` holds `{v}`, not a number")))
    };
    let restore = get("restore_state")?;
    let schema_version = num("schema_version")?;
    let meta = Meta {
        me: get("me_name")?,
        uuid: get("me_uuid")?,
        schema_version: u32::try_from(schema_version)
            .map_err(|_| ctx.corrupt(format!("schema_version {schema_version} is out of range")))?,
        incarnation: num("incarnation")?,
        restore_state: RestoreState::parse(&restore)
            .ok_or_else(|| ctx.corrupt(format!("restore_state `{restore}` is unknown")))?,
        next_seq: num("next_seq")?,
    };
    if meta.next_seq == 0 || meta.incarnation == 0 {
        return Err(ctx.corrupt("next_seq and incarnation start at 1".into()));
    }
    Ok(meta)
}

async fn read_meta(client: &Client, ctx: &Ctx) -> Result<Meta> {
    let rows = client
        .query("SELECT key, value FROM meta", &[])
        .await
        .map_err(ctx.err("read meta"))?;
    let pairs: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    parse_meta(ctx, &pairs)
}

async fn meta_set(client: &Client, ctx: &Ctx, key: &str, value: &str) -> Result<()> {
    client
        .execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&key, &value],
        )
        .await
        .map_err(ctx.err("write meta"))?;
    Ok(())
}

async fn has_meta_table(client: &Client, ctx: &Ctx) -> Result<bool> {
    let row = client
        .query_one(
            "SELECT count(*) FROM information_schema.tables \
             WHERE table_schema = $1 AND table_name = 'meta'",
            &[&ctx.schema],
        )
        .await
        .map_err(ctx.err("read schema"))?;
    Ok(row.get::<_, i64>(0) == 1)
}

struct Shared {
    ctx: Ctx,
    pending_batches: AtomicUsize,
    transactions_committed: AtomicU64,
    closed: AtomicBool,
}

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
}

/// The PostgreSQL data store of one messaging engine (one schema of a database).
pub struct PgStore {
    shared: Arc<Shared>,
    writer_tx: mpsc::Sender<WriteReq>,
    reader: Mutex<Option<Arc<Client>>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("me", &self.shared.ctx.me)
            .field("location", &self.shared.ctx.location)
            .finish()
    }
}

impl PgStore {
    fn ctx_for(url: &str, schema: &str, me_name: &str, me_uuid: &str) -> Result<Ctx> {
        assert!(!me_name.is_empty() && !me_uuid.is_empty());
        check_schema_name(me_name, schema)?;
        let location = match url.parse::<tokio_postgres::Config>() {
            Ok(cfg) => location_of(&cfg, schema),
            Err(_) => format!("(unparsable PostgreSQL URL)?schema={schema}"),
        };
        Ok(Ctx {
            me: me_name.to_string(),
            uuid: me_uuid.to_string(),
            schema: schema.to_string(),
            location,
        })
    }

    /// Creates the store of an ME in `schema` (created if absent) of the database `url`
    /// names (a libpq-style URL or `key=value` string), stamped with the ME. Refuses a schema
    /// that already holds a store. Must run inside a Tokio runtime (it spawns the writer and
    /// the connection drivers on it).
    pub async fn create(url: &str, schema: &str, me_name: &str, me_uuid: &str) -> Result<PgStore> {
        let ctx = PgStore::ctx_for(url, schema, me_name, me_uuid)?;
        let mut client = connect(url, &ctx).await?;
        if has_meta_table(&client, &ctx).await? {
            return Err(StoreError::AlreadyExists {
                file: PathBuf::from(&ctx.location),
            });
        }
        let tx = client.transaction().await.map_err(ctx.err("begin"))?;
        tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
            .await
            .map_err(ctx.err("create schema"))?;
        tx.batch_execute(SCHEMA).await.map_err(|e| match e.code() {
            // A concurrent create won the race.
            Some(c) if *c == SqlState::DUPLICATE_TABLE => StoreError::AlreadyExists {
                file: PathBuf::from(&ctx.location),
            },
            _ => pg_err(&ctx, "create tables", e),
        })?;
        for (k, v) in [
            ("me_name", me_name.to_string()),
            ("me_uuid", me_uuid.to_string()),
            ("schema_version", SCHEMA_VERSION.to_string()),
            ("incarnation", "1".to_string()),
            ("restore_state", RestoreState::None.as_str().to_string()),
            ("next_seq", "1".to_string()),
            ("created_at", fsx::now_rfc3339()),
        ] {
            tx.execute("INSERT INTO meta (key, value) VALUES ($1, $2)", &[&k, &v])
                .await
                .map_err(ctx.err("write meta"))?;
        }
        tx.commit().await.map_err(ctx.err("commit schema"))?;
        drop(client);
        tracing::info!(me = me_name, location = %ctx.location, "created data store");
        PgStore::open(url, schema, me_name, me_uuid).await
    }

    /// Opens the store of an ME: checks it exists, is stamped with this ME, has a schema
    /// version we understand, and that no other process holds it. Must run inside a Tokio
    /// runtime.
    pub async fn open(url: &str, schema: &str, me_name: &str, me_uuid: &str) -> Result<PgStore> {
        let ctx = PgStore::ctx_for(url, schema, me_name, me_uuid)?;
        let wclient = connect(url, &ctx).await?;
        if !has_meta_table(&wclient, &ctx).await? {
            return Err(StoreError::Missing {
                file: PathBuf::from(&ctx.location),
            });
        }
        let rows = wclient
            .query("SELECT key, value FROM meta", &[])
            .await
            .map_err(ctx.err("read meta"))?;
        let pairs: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        // Schema version before anything else: a newer store may lay meta out differently.
        if let Some((_, v)) = pairs.iter().find(|(k, _)| k == "schema_version") {
            if let Ok(found) = v.parse::<u64>() {
                if found > u64::from(SCHEMA_VERSION) {
                    return Err(StoreError::SchemaTooNew {
                        file: PathBuf::from(&ctx.location),
                        found: u32::try_from(found).unwrap_or(u32::MAX),
                        supported: SCHEMA_VERSION,
                    });
                }
            }
        }
        let meta = parse_meta(&ctx, &pairs)?;
        if meta.uuid != ctx.uuid || meta.me != ctx.me {
            return Err(StoreError::WrongOwner {
                file: PathBuf::from(&ctx.location),
                found_me: meta.me,
                found_uuid: meta.uuid,
                want_me: ctx.me.clone(),
                want_uuid: ctx.uuid.clone(),
            });
        }
        let mut meta = meta;
        if meta.schema_version < SCHEMA_VERSION {
            // Version 2 moved SQLite bodies into a body log; PostgreSQL's tables did not change.
            assert_eq!(meta.schema_version, 1, "the only older schema");
            wclient
                .execute(
                    "UPDATE meta SET value = $1 WHERE key = 'schema_version'",
                    &[&SCHEMA_VERSION.to_string()],
                )
                .await
                .map_err(ctx.err("migrate the schema version"))?;
            meta.schema_version = SCHEMA_VERSION;
        }
        assert_eq!(meta.schema_version, SCHEMA_VERSION);
        // One writer per store, across processes: a session lock, released when the writer's
        // connection ends (also on a crash).
        let locked: bool = wclient
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext('keel-store:' || $1))",
                &[&ctx.schema],
            )
            .await
            .map_err(ctx.err("lock the store"))?
            .get(0);
        if !locked {
            return Err(StoreError::InUse {
                me: ctx.me.clone(),
                location: ctx.location.clone(),
            });
        }
        // Read back the seq invariant: every stored seq is below the reservation.
        let seq_max: Option<i64> = wclient
            .query_one("SELECT MAX(seq) FROM messages", &[])
            .await
            .map_err(ctx.err("read the highest seq"))?
            .get(0);
        crate::check_seq_max(seq_max, meta.next_seq).map_err(|d| ctx.corrupt(d))?;
        let rclient = connect(url, &ctx).await?;
        let shared = Arc::new(Shared {
            ctx: ctx.clone(),
            pending_batches: AtomicUsize::new(0),
            transactions_committed: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        let (writer_tx, writer_rx) = mpsc::channel(WRITE_QUEUE_MAX);
        let writer = Writer {
            shared: shared.clone(),
            client: wclient,
            statements: HashMap::new(),
            next_seq: meta.next_seq,
            seq_reserved: meta.next_seq,
            incarnation: meta.incarnation,
        };
        tokio::spawn(writer.run(writer_rx));
        tracing::info!(me = me_name, location = %ctx.location, incarnation = meta.incarnation,
            restore_state = meta.restore_state.as_str(), "opened data store");
        Ok(PgStore {
            shared,
            writer_tx,
            reader: Mutex::new(Some(Arc::new(rclient))),
        })
    }

    /// Transactions committed by the writer since open.
    pub fn transactions_committed(&self) -> u64 {
        self.shared.transactions_committed.load(Ordering::Relaxed)
    }

    fn closed_err(&self) -> StoreError {
        StoreError::Closed {
            me: self.shared.ctx.me.clone(),
        }
    }

    fn reader(&self) -> Result<Arc<Client>> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(self.closed_err());
        }
        let guard = self.reader.lock().expect("reader lock");
        guard.clone().ok_or_else(|| self.closed_err())
    }

    async fn query_messages(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<StoredMessage>> {
        let ctx = &self.shared.ctx;
        let client = self.reader()?;
        let rows = client
            .query(sql, params)
            .await
            .map_err(ctx.err("read messages"))?;
        Ok(rows.iter().map(row_to_message).collect())
    }
}

fn row_to_message(r: &Row) -> StoredMessage {
    let stream_id: Option<String> = r.get(9);
    let tick: Option<i64> = r.get(10);
    StoredMessage {
        dest: r.get(0),
        seq: r.get::<_, i64>(1) as u64,
        id: r.get(2),
        priority: r.get::<_, i16>(3) as u8,
        reliability: r.get::<_, i16>(4) as u8,
        expiry_ms: r.get::<_, Option<i64>>(5).map(|v| v as u64),
        delivery_count: r.get::<_, i64>(6) as u32,
        properties: r.get(7),
        body: r.get(8),
        stream: stream_id.zip(tick.map(|t| t as u64)),
    }
}

struct Writer {
    shared: Arc<Shared>,
    client: Client,
    /// Prepared once per connection: a group of N ops costs N executions, not 2N round trips.
    statements: HashMap<&'static str, Statement>,
    /// The next seq to assign.
    next_seq: u64,
    /// `meta.next_seq` as committed: every seq handed out is below it.
    seq_reserved: u64,
    incarnation: u64,
}

const INSERT_MESSAGE: &str = "INSERT INTO messages (seq, dest, id, priority, reliability, \
     expiry_ms, delivery_count, properties, body, stream_id, tick) \
     VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8, $9, $10)";
const DELETE_MESSAGE: &str = "DELETE FROM messages WHERE seq = $1 AND dest = $2";
const SET_COUNT: &str = "UPDATE messages SET delivery_count = $3 WHERE seq = $1 AND dest = $2";
const MOVE_MESSAGE: &str = "UPDATE messages SET dest = $3 WHERE seq = $1 AND dest = $2";
const SET_KV: &str = "INSERT INTO kv (space, key, value) VALUES ($1, $2, $3) \
     ON CONFLICT (space, key) DO UPDATE SET value = excluded.value";
const DELETE_KV: &str = "DELETE FROM kv WHERE space = $1 AND key = $2";
const DEPTH_UP: &str = "INSERT INTO dests (dest, depth) VALUES ($1, 1) \
     ON CONFLICT (dest) DO UPDATE SET depth = dests.depth + 1";
const DEPTH_DOWN: &str = "UPDATE dests SET depth = depth - 1 WHERE dest = $1 AND depth > 1";
const DEPTH_GONE: &str = "DELETE FROM dests WHERE dest = $1 AND depth = 1";

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<WriteReq>) {
        let mut carry: Option<WriteReq> = None;
        loop {
            let first = match carry.take() {
                Some(r) => r,
                None => match rx.recv().await {
                    Some(r) => r,
                    None => return,
                },
            };
            match first {
                WriteReq::Close { reply } => {
                    // Release the writer lock now, not when the server notices the
                    // connection is gone, so a reopen right after close succeeds.
                    if let Err(e) = self
                        .client
                        .batch_execute("SELECT pg_advisory_unlock_all()")
                        .await
                    {
                        tracing::warn!(me = %self.shared.ctx.me, error = %e, "could not release the store lock; it goes with the connection");
                    }
                    drop(self.client);
                    let _ = reply.send(());
                    return;
                }
                WriteReq::NewIncarnation {
                    clear_restored,
                    reply,
                } => {
                    let _ = reply.send(self.new_incarnation(clear_restored).await);
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
                    let deadline = tokio::time::Instant::now() + Duration::from_micros(LINGER_US);
                    // Bounded by TXN_BATCHES_MAX pushes and by the linger deadline.
                    while group.len() < TXN_BATCHES_MAX
                        && group_ops < TXN_OPS_MAX
                        && group_bytes < TXN_BYTES_MAX
                    {
                        let next = match rx.try_recv() {
                            Ok(r) => Some(r),
                            // Linger only for callers known to be on their way.
                            Err(mpsc::error::TryRecvError::Empty)
                                if self.shared.pending_batches.load(Ordering::Acquire) > 0 =>
                            {
                                tokio::time::timeout_at(deadline, rx.recv())
                                    .await
                                    .ok()
                                    .flatten()
                            }
                            Err(_) => None,
                        };
                        let Some(req) = next else { break };
                        match req {
                            WriteReq::Commit {
                                ops,
                                ops_bytes,
                                reply,
                            } => {
                                if group_ops + ops.len() > TXN_OPS_MAX
                                    || group_bytes + ops_bytes > TXN_BYTES_MAX
                                {
                                    carry = Some(WriteReq::Commit {
                                        ops,
                                        ops_bytes,
                                        reply,
                                    });
                                    break;
                                }
                                self.shared.pending_batches.fetch_sub(1, Ordering::AcqRel);
                                group_ops += ops.len();
                                group_bytes += ops_bytes;
                                group.push(Batch { ops, reply });
                            }
                            other => {
                                carry = Some(other);
                                break;
                            }
                        }
                    }
                    // A carried commit stays announced (pending) until the next round takes
                    // it as `first` and counts it down.
                    self.commit_group(group).await;
                }
            }
        }
    }

    async fn stmt(&mut self, sql: &'static str) -> Result<Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let ctx = &self.shared.ctx;
        let s = self
            .client
            .prepare(sql)
            .await
            .map_err(ctx.err("prepare statement"))?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    async fn exec(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
        action: &str,
    ) -> Result<u64> {
        let s = self.stmt(sql).await?;
        let ctx = self.shared.ctx.clone();
        self.client
            .execute(&s, params)
            .await
            .map_err(|e| pg_err(&ctx, action, e))
    }

    async fn batch(&self, sql: &str, action: &str) -> Result<()> {
        let ctx = &self.shared.ctx;
        self.client
            .batch_execute(sql)
            .await
            .map_err(ctx.err(action))
    }

    async fn commit_group(&mut self, group: Vec<Batch>) {
        assert!(!group.is_empty() && group.len() <= TXN_BATCHES_MAX);
        let ctx = self.shared.ctx.clone();
        let mut outcomes: Vec<Result<CommitOutcome>> = Vec::with_capacity(group.len());
        let txn: Result<()> = async {
            self.batch("BEGIN", "begin transaction").await?;
            for batch in &group {
                self.batch("SAVEPOINT batch", "savepoint").await?;
                let seq_before = self.next_seq;
                match self.apply_batch(&batch.ops).await {
                    Ok(outcome) => {
                        self.batch("RELEASE SAVEPOINT batch", "release savepoint")
                            .await?;
                        outcomes.push(Ok(outcome));
                    }
                    Err(e) => {
                        self.batch(
                            "ROLLBACK TO SAVEPOINT batch; RELEASE SAVEPOINT batch",
                            "roll back savepoint",
                        )
                        .await?;
                        // Seqs it took are skipped, never handed out again.
                        assert!(self.next_seq >= seq_before);
                        outcomes.push(Err(e));
                    }
                }
            }
            let reservation = seal(self.next_seq, self.seq_reserved).next_seq;
            if let Some(r) = reservation {
                meta_set(&self.client, &ctx, "next_seq", &r.to_string()).await?;
            }
            self.batch("COMMIT", "commit transaction").await?;
            self.seq_reserved = reservation.unwrap_or(self.seq_reserved);
            Ok(())
        }
        .await;
        match txn {
            Ok(()) => answer_committed(&self.shared.transactions_committed, group, outcomes),
            Err(e) => {
                // Leave no transaction open on the connection; it may be gone already.
                let _ = self.client.batch_execute("ROLLBACK").await;
                tracing::error!(me = %ctx.me, error = %e, batches = group.len(), "group commit failed");
                answer_failed(group, outcomes, e);
            }
        }
    }

    async fn apply_batch(&mut self, ops: &[Op]) -> Result<CommitOutcome> {
        let ctx = self.shared.ctx.clone();
        let no_such = |dest: &str, seq: u64| StoreError::NoSuchMessage {
            me: ctx.me.clone(),
            dest: dest.to_string(),
            seq,
        };
        let mut outcome = CommitOutcome::default();
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
                    let seq = self.next_seq;
                    assert!(seq > 0 && seq < i64::MAX as u64);
                    self.next_seq += 1;
                    let id = if id.is_empty() {
                        format!("{}:{}:{seq}", ctx.uuid, self.incarnation)
                    } else {
                        id.clone()
                    };
                    let (seq_i, prio, rel) =
                        (seq as i64, i16::from(*priority), i16::from(*reliability));
                    let expiry = expiry_ms.map(|v| v as i64);
                    let sid = stream.as_ref().map(|s| s.0.as_str());
                    let tick = stream.as_ref().map(|s| s.1 as i64);
                    self.exec(
                        INSERT_MESSAGE,
                        &[
                            &seq_i, dest, &id, &prio, &rel, &expiry, properties, body, &sid, &tick,
                        ],
                        "insert message",
                    )
                    .await?;
                    self.depth_add(dest, 1).await?;
                    outcome.assigned_seqs.push(seq);
                }
                Op::Delete { dest, seq } => {
                    let n = self
                        .exec(DELETE_MESSAGE, &[&(*seq as i64), dest], "delete message")
                        .await?;
                    assert!(n <= 1);
                    if n == 0 {
                        return Err(no_such(dest, *seq));
                    }
                    self.depth_add(dest, -1).await?;
                }
                Op::SetDeliveryCount { dest, seq, count } => {
                    let n = self
                        .exec(
                            SET_COUNT,
                            &[&(*seq as i64), dest, &i64::from(*count)],
                            "update delivery count",
                        )
                        .await?;
                    if n == 0 {
                        return Err(no_such(dest, *seq));
                    }
                }
                Op::Move { from, seq, to } => {
                    let n = self
                        .exec(MOVE_MESSAGE, &[&(*seq as i64), from, to], "move message")
                        .await?;
                    if n == 0 {
                        return Err(no_such(from, *seq));
                    }
                    self.depth_add(from, -1).await?;
                    self.depth_add(to, 1).await?;
                }
                Op::SetKv { space, key, value } => {
                    self.exec(SET_KV, &[space, key, value], "write kv").await?;
                }
                Op::DeleteKv { space, key } => {
                    self.exec(DELETE_KV, &[space, key], "delete kv").await?;
                }
                Op::SetRestoreState(state) => {
                    meta_set(
                        &self.client,
                        &self.shared.ctx,
                        "restore_state",
                        state.as_str(),
                    )
                    .await?;
                }
            }
        }
        Ok(outcome)
    }

    async fn depth_add(&mut self, dest: &String, delta: i64) -> Result<()> {
        assert!(delta == 1 || delta == -1);
        if delta > 0 {
            self.exec(DEPTH_UP, &[dest], "count message").await?;
        } else if self.exec(DEPTH_DOWN, &[dest], "count message").await? == 0 {
            let gone = self.exec(DEPTH_GONE, &[dest], "count message").await?;
            assert_eq!(gone, 1, "destination count out of step with its messages");
        }
        Ok(())
    }

    async fn new_incarnation(&mut self, clear_restored: bool) -> Result<u64> {
        let ctx = self.shared.ctx.clone();
        let r: Result<u64> = async {
            self.batch("BEGIN", "begin transaction").await?;
            let meta = read_meta(&self.client, &ctx).await?;
            assert_eq!(
                meta.incarnation, self.incarnation,
                "incarnation changed behind the writer"
            );
            let next = crate::next_incarnation(meta.incarnation);
            meta_set(&self.client, &ctx, "incarnation", &next.to_string()).await?;
            if clear_restored {
                meta_set(
                    &self.client,
                    &ctx,
                    "restore_state",
                    RestoreState::None.as_str(),
                )
                .await?;
            }
            self.batch("COMMIT", "commit new incarnation").await?;
            Ok(next)
        }
        .await;
        match r {
            Ok(next) => {
                self.incarnation = next;
                self.shared
                    .transactions_committed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(me = %ctx.me, incarnation = next, clear_restored, "began new incarnation");
                Ok(next)
            }
            Err(e) => {
                let _ = self.client.batch_execute("ROLLBACK").await;
                Err(e)
            }
        }
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
    }
}

impl Store for PgStore {
    fn commit(&self, ops: Vec<Op>) -> StoreFuture<'_, CommitOutcome> {
        Box::pin(async move {
            if self.shared.closed.load(Ordering::Acquire) {
                return Err(self.closed_err());
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
                Ok(()) => guard.armed = false,
                Err(_) => return Err(self.closed_err()),
            }
            let outcome = rx.await.map_err(|_| self.closed_err())??;
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
        Box::pin(async move {
            check_limit(&self.shared.ctx.me, limit)?;
            let mut out = match after {
                None => Vec::new(),
                Some((p, s)) => {
                    self.query_messages(
                        &format!(
                            "SELECT {SELECT_COLS} FROM messages WHERE dest = $1 AND priority = $2 \
                             AND seq > $3 ORDER BY seq LIMIT $4"
                        ),
                        &[&dest, &i16::from(p), &(s as i64), &(limit as i64)],
                    )
                    .await?
                }
            };
            if out.len() < limit {
                let below: i16 = after.map_or(10, |(p, _)| i16::from(p));
                let rest = self
                    .query_messages(
                        &format!(
                            "SELECT {SELECT_COLS} FROM messages WHERE dest = $1 AND priority < $2 \
                             ORDER BY priority DESC, seq LIMIT $3"
                        ),
                        &[&dest, &below, &((limit - out.len()) as i64)],
                    )
                    .await?;
                out.extend(rest);
            }
            assert!(out.len() <= limit);
            let mut prev = after;
            for m in &out {
                assert_eq!(m.dest, dest);
                if let Some((p, s)) = prev {
                    assert!(
                        m.priority < p || (m.priority == p && m.seq > s),
                        "page out of order"
                    );
                }
                prev = Some((m.priority, m.seq));
            }
            Ok(out)
        })
    }

    fn depth(&self, dest: &str) -> StoreFuture<'_, u64> {
        let dest = dest.to_string();
        Box::pin(async move {
            let ctx = &self.shared.ctx;
            let row = self
                .reader()?
                .query_opt("SELECT depth FROM dests WHERE dest = $1", &[&dest])
                .await
                .map_err(ctx.err("read depth"))?;
            let n: i64 = row.map_or(0, |r| r.get(0));
            assert!(n >= 0);
            Ok(n as u64)
        })
    }

    fn destinations(&self) -> StoreFuture<'_, Vec<(String, u64)>> {
        Box::pin(async move {
            let ctx = &self.shared.ctx;
            // COLLATE "C": byte order, as the SQLite backend sorts, whatever the database's
            // collation.
            let rows = self
                .reader()?
                .query(
                    "SELECT dest, depth FROM dests ORDER BY dest COLLATE \"C\"",
                    &[],
                )
                .await
                .map_err(ctx.err("read destinations"))?;
            let out: Vec<(String, u64)> = rows
                .iter()
                .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
                .collect();
            assert!(out.iter().all(|(_, n)| *n > 0));
            Ok(out)
        })
    }

    fn by_stream(
        &self,
        stream_id: &str,
        from_tick: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<StoredMessage>> {
        let stream_id = stream_id.to_string();
        Box::pin(async move {
            check_limit(&self.shared.ctx.me, limit)?;
            let out = self
                .query_messages(
                    &format!(
                        "SELECT {SELECT_COLS} FROM messages WHERE stream_id = $1 AND tick >= $2 \
                         ORDER BY tick, seq LIMIT $3"
                    ),
                    &[&stream_id, &(from_tick as i64), &(limit as i64)],
                )
                .await?;
            assert!(out.len() <= limit);
            Ok(out)
        })
    }

    fn kv_get(&self, space: &str, key: &str) -> StoreFuture<'_, Option<Vec<u8>>> {
        let (space, key) = (space.to_string(), key.to_string());
        Box::pin(async move {
            let ctx = &self.shared.ctx;
            let row = self
                .reader()?
                .query_opt(
                    "SELECT value FROM kv WHERE space = $1 AND key = $2",
                    &[&space, &key],
                )
                .await
                .map_err(ctx.err("read kv"))?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn kv_scan(&self, space: &str) -> StoreFuture<'_, Vec<(String, Vec<u8>)>> {
        let space = space.to_string();
        Box::pin(async move {
            let ctx = &self.shared.ctx;
            let rows = self
                .reader()?
                .query(
                    "SELECT key, value FROM kv WHERE space = $1 ORDER BY key COLLATE \"C\"",
                    &[&space],
                )
                .await
                .map_err(ctx.err("scan kv"))?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn info(&self) -> StoreFuture<'_, StoreInfo> {
        Box::pin(async move {
            let ctx = &self.shared.ctx;
            // One statement, one snapshot: meta and the count describe the same moment.
            let rows = self
                .reader()?
                .query(
                    "SELECT key, value, (SELECT coalesce(sum(depth), 0)::BIGINT FROM dests) \
                     FROM meta",
                    &[],
                )
                .await
                .map_err(ctx.err("read info"))?;
            let pairs: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            let messages: i64 = rows.first().map_or(0, |r| r.get(2));
            let meta = parse_meta(ctx, &pairs)?;
            Ok(StoreInfo {
                me: meta.me,
                uuid: meta.uuid,
                backend: "postgresql",
                location: ctx.location.clone(),
                restore_state: meta.restore_state,
                messages: messages as u64,
                schema_version: meta.schema_version,
                incarnation: meta.incarnation,
            })
        })
    }

    fn begin_incarnation(&self, clear_restored: bool) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            if self.shared.closed.load(Ordering::Acquire) {
                return Err(self.closed_err());
            }
            let (tx, rx) = oneshot::channel();
            self.writer_tx
                .send(WriteReq::NewIncarnation {
                    clear_restored,
                    reply: tx,
                })
                .await
                .map_err(|_| self.closed_err())?;
            rx.await.map_err(|_| self.closed_err())?
        })
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            if self.shared.closed.swap(true, Ordering::AcqRel) {
                return Ok(());
            }
            let reader = self.reader.lock().expect("reader lock").take();
            drop(reader);
            let (wtx, wrx) = oneshot::channel();
            let _ = self.writer_tx.send(WriteReq::Close { reply: wtx }).await;
            let _ = wrx.await;
            tracing::info!(me = %self.shared.ctx.me, "closed data store");
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_never_shows_the_password() {
        let cfg: tokio_postgres::Config =
            "postgresql://keel:s3cret@db.example:6543/bus?sslmode=disable"
                .parse()
                .unwrap();
        let loc = location_of(&cfg, "me_one");
        assert_eq!(loc, "postgresql://keel@db.example:6543/bus?schema=me_one");
        let cfg: tokio_postgres::Config = "host=/run/pg port=5433 user=u password=pw dbname=d"
            .parse()
            .unwrap();
        assert_eq!(
            location_of(&cfg, "s"),
            "postgresql://u@/run/pg:5433/d?schema=s"
        );
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        for ok in ["keel", "_x1", "me_node1_server1"] {
            assert!(check_schema_name("me", ok).is_ok(), "{ok}");
        }
        for bad in ["", "Keel", "1x", "a-b", "a\"b", &"a".repeat(64)] {
            assert!(check_schema_name("me", bad).is_err(), "{bad}");
        }
    }
}

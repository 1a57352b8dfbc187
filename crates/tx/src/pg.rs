//! PostgreSQL as a transaction resource and data source (DESIGN §6). Connections come from a
//! bounded pool (`pool.rs`): a branch holds one from `BEGIN` until `PREPARE TRANSACTION`
//! (which detaches the prepared transaction from the session, so the connection goes back to
//! the pool), a one-phase `COMMIT` or a `ROLLBACK`; phase two (`COMMIT PREPARED` /
//! `ROLLBACK PREPARED`), recovery (`pg_prepared_xacts`) and checks take one for a statement. A
//! connection is closed instead of reused after an error whose effect on the session is unclear,
//! and an idle one found dead (e.g. after a database restart) is replaced by a fresh one, once.
//! The server needs `max_prepared_transactions` above zero.
//!
//! Statements ([`PgResource::execute`], [`PgResource::query`]) are prepared, so each parameter
//! (`$1`, `$2`, …) is converted from its [`SqlValue`] to the type PostgreSQL infers for it;
//! the parameter is checked here where the type is known, and otherwise sent as text for
//! PostgreSQL to parse. Result columns of common types map back (numeric, dates, timestamps
//! and uuid as text; another type is an error naming the column; see `decode`). Every
//! connection reads `max_prepared_transactions` when it opens; with 0, a branch's `begin` is
//! refused at once instead of every message failing at `PREPARE`.
//!
//! Global transaction ids: `keel:<format id, 8 hex>:<gtrid hex>:<bqual hex>` (at most 150
//! characters of PostgreSQL's 200), so recovery recognises Keel's branches and rebuilds their
//! XIDs. Passwords: the URL is never logged or put in an error (errors name the resource).

use std::error::Error as StdError;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio_postgres::types::{Format, FromSql, IsNull, ToSql, Type};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage, Statement};

use crate::coordinator::{Resource, ResourceError, ResourceFuture, Vote, Xid};
use crate::pool::{Branches, Lease, Pool, Running, State, Use, POOL_WAIT_MS};
use crate::sql::{
    bad_param, civil_from_days, time_text, Rows, SqlResource, SqlValue, TwoPhase, ROWS_MAX,
};

/// How long a connect may take.
pub const CONNECT_TIMEOUT_MS: u64 = 5_000;

/// A PostgreSQL database as a resource, by its configuration name.
pub struct PgResource {
    name: String,
    /// The parsed URL (with its password, kept in memory only), or why it does not parse.
    config: Result<keel_tls::pg::PgTarget, String>,
    pool: Pool<Client>,
    branches: Branches<Client>,
    /// The server's `max_prepared_transactions` as the newest connection read it (-1: not
    /// read yet). It changes only with a PostgreSQL restart, which ends every connection, so
    /// reading it once per connection is exact.
    prepared_max: std::sync::atomic::AtomicI64,
}

/// Why a PostgreSQL server whose `max_prepared_transactions` is 0 cannot be a data source.
pub const NO_PREPARED_TRANSACTIONS: &str = "PostgreSQL's max_prepared_transactions is 0, so it cannot prepare a transaction's branch (PREPARE TRANSACTION), which every message handled with a data source needs; set it above 0 (in postgresql.conf, or `ALTER SYSTEM SET max_prepared_transactions = 100;`; at least the transactions in flight at once, max_connections is safe) and restart PostgreSQL";

/// `SHOW max_prepared_transactions`'s answer as a number.
fn prepared_max_of(messages: &[SimpleQueryMessage]) -> Option<i64> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.trim().parse().ok()),
        _ => None,
    })
}

/// The PostgreSQL global id of a branch.
pub fn gid(xid: &Xid) -> String {
    format!(
        "keel:{:08x}:{}:{}",
        xid.format_id,
        keel_core::hex::encode(&xid.gtrid),
        keel_core::hex::encode(&xid.bqual)
    )
}

/// The branch of a Keel global id (None: not Keel's).
pub fn xid_of(gid: &str) -> Option<Xid> {
    let mut parts = gid.strip_prefix("keel:")?.split(':');
    let format_id = u32::from_str_radix(parts.next()?, 16).ok()? as i32;
    let gtrid = keel_core::hex::decode(parts.next()?)?;
    let bqual = keel_core::hex::decode(parts.next()?)?;
    parts.next().is_none().then_some(Xid {
        format_id,
        gtrid,
        bqual,
    })
}

/// An error's text: the database's message and SQLSTATE, or the client's error and its cause
/// (tokio-postgres's own text for a database error is only "db error").
fn pg_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// The connection is gone (closed, or the server ended the session).
fn lost(client: &Client, e: &tokio_postgres::Error) -> bool {
    client.is_closed()
        || e.is_closed()
        || e.code().is_some_and(|c| {
            // 08: connection exception; 57P0x: the server is shutting down or ended us.
            c.code().starts_with("08") || c.code().starts_with("57P")
        })
}

impl PgResource {
    /// `url`: libpq key-value or URL form (with its password, kept in memory only).
    /// `pool_max`: most connections open at once (branches, phase two and recovery together;
    /// branches get at most `pool_max - 1` of them when `pool_max` > 1); taken as 1 to
    /// [`crate::sql::POOL_MAX_LIMIT`].
    pub fn new(name: &str, url: &str, pool_max: usize) -> PgResource {
        // `sslmode=verify-full&sslrootcert=FILE` asks for TLS (keel_tls::pg).
        let config = keel_tls::pg::pg_target(url)
            .map(|mut t| {
                t.config
                    .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS));
                t
            })
            .map_err(|e| {
                format!(
                    "the data source URL is not usable (give it as postgresql://USER:PASSWORD@HOST:PORT/DATABASE[?sslmode=verify-full&sslrootcert=FILE]): {e}"
                )
            });
        PgResource {
            name: name.to_string(),
            config,
            pool: Pool::new(name, pool_max, Duration::from_millis(POOL_WAIT_MS)),
            branches: Branches::new(name),
            prepared_max: std::sync::atomic::AtomicI64::new(-1),
        }
    }

    /// Why no branch can begin here (None: it can, or not known yet).
    fn two_phase_refusal(&self) -> Option<&'static str> {
        (self.prepared_max.load(std::sync::atomic::Ordering::Relaxed) == 0)
            .then_some(NO_PREPARED_TRANSACTIONS)
    }

    /// Most connections open at once.
    pub fn pool_max(&self) -> usize {
        self.pool.max()
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> ResourceError {
        ResourceError {
            resource: self.name.clone(),
            detail: format!("{what}: {e}"),
            not_found: false,
        }
    }

    async fn connect(&self) -> Result<Client, ResourceError> {
        let cfg = self.config.as_ref().map_err(|d| ResourceError {
            resource: self.name.clone(),
            detail: d.clone(),
            not_found: false,
        })?;
        let name = self.name.clone();
        let ended = move |e: tokio_postgres::Error| {
            tracing::debug!(resource = %name, error = %e, "connection ended");
        };
        let client = match &cfg.tls {
            Some(tls) => {
                let (client, conn) = cfg
                    .config
                    .connect(tls.clone())
                    .await
                    .map_err(|e| self.err("connect over TLS", pg_error(&e)))?;
                tokio::spawn(async move { conn.await.unwrap_or_else(ended) });
                client
            }
            None => {
                let (client, conn) = cfg
                    .config
                    .connect(NoTls)
                    .await
                    .map_err(|e| self.err("connect", pg_error(&e)))?;
                tokio::spawn(async move { conn.await.unwrap_or_else(ended) });
                client
            }
        };
        // Every new connection reads the setting (see `prepared_max`).
        let shown = client
            .simple_query("SHOW max_prepared_transactions")
            .await
            .map_err(|e| self.err("read max_prepared_transactions", pg_error(&e)))?;
        let n = prepared_max_of(&shown).ok_or_else(|| {
            self.err(
                "read max_prepared_transactions",
                "the answer is not a number",
            )
        })?;
        assert!(
            n >= 0,
            "PostgreSQL's max_prepared_transactions is never negative"
        );
        self.prepared_max
            .store(n, std::sync::atomic::Ordering::Relaxed);
        Ok(client)
    }

    /// Runs `sql` (simple protocol) on a pooled connection: phase two, recovery, checks. A dead
    /// idle connection is replaced by a fresh one, once; an unknown prepared transaction is
    /// `not_found` (the connection stays pooled: the statement failed outside a transaction).
    async fn short(&self, what: &str, sql: &str) -> Result<Vec<SimpleQueryMessage>, ResourceError> {
        let mut slot = self.pool.slot(Use::Short).await?;
        let mut fresh = false;
        loop {
            let client = match slot.idle.take() {
                Some(c) if !c.is_closed() => c,
                Some(_) => {
                    self.pool.retain_idle(|c| !c.is_closed());
                    continue;
                }
                None => {
                    fresh = true;
                    self.connect().await?
                }
            };
            match client.simple_query(sql).await {
                Ok(m) => {
                    self.pool.give_back(slot.lease(client));
                    return Ok(m);
                }
                Err(e) if !fresh && lost(&client, &e) => {
                    drop(client);
                    self.pool.retain_idle(|c| !c.is_closed());
                    // Loop: slot.idle is None now, so a fresh connection.
                }
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) => {
                    self.pool.give_back(slot.lease(client));
                    return Err(ResourceError {
                        resource: self.name.clone(),
                        detail: format!("{what}: {}", pg_error(&e)),
                        not_found: true,
                    });
                }
                Err(e) => return Err(self.err(what, pg_error(&e))),
            }
        }
    }

    /// Opens branch `xid`: a pooled connection in a transaction, where `execute` and `query`
    /// run its work. Waits (at most [`POOL_WAIT_MS`]) while the pool is exhausted.
    pub async fn begin(&self, xid: &Xid) -> Result<(), ResourceError> {
        if self.branches.get(xid).is_some() {
            return Err(self.err("begin", format!("branch {xid} is open already")));
        }
        let mut slot = self.pool.slot(Use::Branch).await?;
        let mut client = None;
        if let Some(c) = slot.idle.take() {
            if !c.is_closed() && c.batch_execute("BEGIN").await.is_ok() {
                client = Some(c);
            } else {
                // Dead (or in a state BEGIN refuses): closed; a fresh one instead, once.
                drop(c);
                self.pool.retain_idle(|c| !c.is_closed());
            }
        }
        let client = match client {
            Some(c) => c,
            None => {
                let c = self.connect().await?;
                c.batch_execute("BEGIN")
                    .await
                    .map_err(|e| self.err("begin", pg_error(&e)))?;
                c
            }
        };
        if let Some(why) = self.two_phase_refusal() {
            // Closing the connection ends its transaction; the next begin connects afresh and
            // reads the setting again, so a fixed server is used without a Keel restart.
            drop(client);
            return Err(self.err("begin", why));
        }
        self.branches
            .open(xid, slot.lease(client))
            .map_err(|_| self.err("begin", format!("branch {xid} is open already")))
    }

    /// Runs a statement in branch `xid` with parameters `$1`, `$2`, …; returns the rows it
    /// changed. After an error from the database the branch can only roll back.
    pub async fn execute(
        &self,
        xid: &Xid,
        sql: &str,
        params: &[SqlValue],
    ) -> Result<u64, ResourceError> {
        self.run(xid, sql, params, false).await.map(|(n, _)| n)
    }

    /// Runs a query in branch `xid`; returns its column names and rows (at most [`ROWS_MAX`]).
    pub async fn query(
        &self,
        xid: &Xid,
        sql: &str,
        params: &[SqlValue],
    ) -> Result<Rows, ResourceError> {
        self.run(xid, sql, params, true)
            .await
            .map(|(_, rows)| rows.unwrap_or_default())
    }

    async fn run(
        &self,
        xid: &Xid,
        sql: &str,
        params: &[SqlValue],
        want_rows: bool,
    ) -> Result<(u64, Option<Rows>), ResourceError> {
        let mut branch = self.branches.for_statement(xid).await?;
        let mut run = Running::start(&mut *branch);
        let r = statement(run.conn(), sql, params, want_rows).await;
        match r {
            Ok(out) => {
                run.done(State::Ok);
                Ok(out)
            }
            Err(Failure::Refused(detail)) => {
                // Nothing reached the database beyond preparing: the branch goes on.
                run.done(State::Ok);
                Err(self.err("statement refused", detail))
            }
            Err(Failure::Db(e)) => {
                let lost = lost(run.conn(), &e);
                let detail = pg_error(&e);
                run.done(if lost {
                    State::Unclear(detail.clone())
                } else {
                    State::Failed(detail.clone())
                });
                Err(self.err("statement failed", detail))
            }
        }
    }

    /// Ends a branch that cannot commit (a statement failed): rolled back on its connection,
    /// which goes back to the pool, or closed (which rolls it back too).
    async fn abandon(&self, lease: Lease<Client>, state: &State) {
        if matches!(state, State::Failed(_)) && lease.conn.batch_execute("ROLLBACK").await.is_ok() {
            self.pool.give_back(lease);
        }
    }
}

enum Failure {
    /// Refused before anything ran (a parameter, a result column type, too many rows).
    Refused(String),
    Db(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Failure {
        Failure::Db(e)
    }
}

/// Prepares `sql`, converts `params` to its parameter types, runs it; with `want_rows`, reads
/// its rows.
async fn statement(
    client: &Client,
    sql: &str,
    params: &[SqlValue],
    want_rows: bool,
) -> Result<(u64, Option<Rows>), Failure> {
    let stmt = client.prepare(sql).await?;
    let values = convert_params(stmt.params(), params).map_err(Failure::Refused)?;
    let values = values.iter().map(|v| v as &dyn ToSql);
    if !want_rows {
        return Ok((client.execute_raw(&stmt, values).await?, None));
    }
    let columns = check_columns(&stmt).map_err(Failure::Refused)?;
    let stream = client.query_raw(&stmt, values).await?;
    let mut stream = std::pin::pin!(stream);
    let mut rows = Vec::new();
    while let Some(row) =
        std::future::poll_fn(|cx| futures_core::Stream::poll_next(stream.as_mut(), cx)).await
    {
        let row = row?;
        if rows.len() == ROWS_MAX {
            // The rest is read and discarded by the connection.
            return Err(Failure::Refused(format!(
                "the query returned more than {ROWS_MAX} rows (the most a query may return)"
            )));
        }
        let mut out = Vec::with_capacity(columns.len());
        for (i, c) in stmt.columns().iter().enumerate() {
            let raw = row.try_get::<_, Option<Raw>>(i)?;
            out.push(match raw {
                None => SqlValue::Null,
                Some(Raw(b)) => decode(c.type_(), b)
                    .map_err(|d| Failure::Refused(format!("column {}: {d}", c.name())))?,
            });
        }
        rows.push(out);
    }
    let n = stream.rows_affected().unwrap_or(rows.len() as u64);
    Ok((n, Some(Rows { columns, rows })))
}

/// The column names, or an error naming a column whose type does not map to a [`SqlValue`].
fn check_columns(stmt: &Statement) -> Result<Vec<String>, String> {
    stmt.columns()
        .iter()
        .map(|c| {
            if supported(c.type_()) {
                Ok(c.name().to_string())
            } else {
                Err(format!(
                    "column {} has type {}, which does not map to a value (cast it in the statement, e.g. {}::text)",
                    c.name(),
                    c.type_(),
                    c.name()
                ))
            }
        })
        .collect()
}

/// A parameter as sent: binary for the types converted here, text (parsed by PostgreSQL)
/// for the others.
#[derive(Debug)]
enum PgParam {
    Null,
    Bool(bool),
    I16(i16),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    /// Binary format, for text types (the bytes are the text).
    Str(String),
    Bytes(Vec<u8>),
    /// Text format: PostgreSQL parses it as the parameter's type.
    AsText(String),
}

impl ToSql for PgParam {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self {
            PgParam::Null => return Ok(IsNull::Yes),
            PgParam::Bool(b) => out.put_u8(u8::from(*b)),
            PgParam::I16(v) => out.put_i16(*v),
            PgParam::I32(v) => out.put_i32(*v),
            PgParam::I64(v) => out.put_i64(*v),
            PgParam::F32(v) => out.put_f32(*v),
            PgParam::F64(v) => out.put_f64(*v),
            PgParam::Str(s) | PgParam::AsText(s) => out.put_slice(s.as_bytes()),
            PgParam::Bytes(b) => out.put_slice(b),
        }
        Ok(IsNull::No)
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        match self {
            PgParam::AsText(_) => Format::Text,
            _ => Format::Binary,
        }
    }

    tokio_postgres::types::to_sql_checked!();
}

/// A built-in type's name (None for types outside `pg_catalog`).
fn builtin(ty: &Type) -> Option<&str> {
    (ty.schema() == "pg_catalog").then(|| ty.name())
}

fn float_text(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        f.to_string()
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "t" | "true" | "y" | "yes" | "on" | "1" => Some(true),
        "f" | "false" | "n" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// Converts each value to the type PostgreSQL reports for its parameter.
fn convert_params(types: &[Type], params: &[SqlValue]) -> Result<Vec<PgParam>, String> {
    if types.len() != params.len() {
        return Err(format!(
            "the statement has {} parameter(s), {} given",
            types.len(),
            params.len()
        ));
    }
    types
        .iter()
        .zip(params)
        .enumerate()
        .map(|(i, (ty, v))| convert(i, ty, v))
        .collect()
}

fn convert(i: usize, ty: &Type, v: &SqlValue) -> Result<PgParam, String> {
    use SqlValue as V;
    let bad = || bad_param(i, v, &ty.to_string());
    let out_of_range = || format!("{} (out of range)", bad_param(i, v, &ty.to_string()));
    let int = |v: &SqlValue| -> Result<i64, String> {
        match v {
            V::Int(n) => Ok(*n),
            V::Text(s) => s.trim().parse().map_err(|_| bad()),
            _ => Err(bad()),
        }
    };
    if *v == V::Null {
        return Ok(PgParam::Null);
    }
    Ok(match builtin(ty) {
        Some("bool") => match v {
            V::Bool(b) => PgParam::Bool(*b),
            V::Text(s) => PgParam::Bool(parse_bool(s).ok_or_else(bad)?),
            _ => return Err(bad()),
        },
        Some("int2") => PgParam::I16(int(v)?.try_into().map_err(|_| out_of_range())?),
        Some("int4") => PgParam::I32(int(v)?.try_into().map_err(|_| out_of_range())?),
        Some("int8") => PgParam::I64(int(v)?),
        Some("float4" | "float8") => {
            let f = match v {
                V::Float(f) => *f,
                V::Int(n) => *n as f64,
                V::Text(s) => s.trim().parse().map_err(|_| bad())?,
                _ => return Err(bad()),
            };
            if ty.name() == "float4" {
                PgParam::F32(f as f32)
            } else {
                PgParam::F64(f)
            }
        }
        Some("numeric") => match v {
            V::Int(n) => PgParam::AsText(n.to_string()),
            V::Float(f) => PgParam::AsText(float_text(*f)),
            V::Text(s) => PgParam::AsText(s.clone()),
            _ => return Err(bad()),
        },
        Some("text" | "varchar" | "bpchar" | "name" | "unknown") => match v {
            V::Text(s) => PgParam::Str(s.clone()),
            V::Int(n) => PgParam::Str(n.to_string()),
            V::Float(f) => PgParam::Str(float_text(*f)),
            V::Bool(b) => PgParam::Str(b.to_string()),
            _ => return Err(bad()),
        },
        Some("bytea") => match v {
            V::Bytes(b) => PgParam::Bytes(b.clone()),
            _ => return Err(bad()),
        },
        Some("json" | "jsonb") => match v {
            V::Text(s) => PgParam::AsText(s.clone()),
            V::Int(n) => PgParam::AsText(n.to_string()),
            V::Float(f) if f.is_finite() => PgParam::AsText(f.to_string()),
            V::Bool(b) => PgParam::AsText(b.to_string()),
            _ => return Err(bad()),
        },
        // Any other type (dates, timestamps, uuid, enums, domains, arrays …): its text form,
        // which PostgreSQL parses (and refuses with its own error).
        _ => match v {
            V::Text(s) => PgParam::AsText(s.clone()),
            V::Int(n) => PgParam::AsText(n.to_string()),
            V::Float(f) => PgParam::AsText(float_text(*f)),
            V::Bool(b) => PgParam::AsText(b.to_string()),
            _ => return Err(bad()),
        },
    })
}

/// A column value's bytes as PostgreSQL sent them (binary format).
struct Raw<'a>(&'a [u8]);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(_ty: &Type, raw: &'a [u8]) -> Result<Raw<'a>, Box<dyn StdError + Sync + Send>> {
        Ok(Raw(raw))
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }
}

/// Whether [`decode`] maps columns of type `ty`.
fn supported(ty: &Type) -> bool {
    ty.name() == "citext"
        || matches!(
            builtin(ty),
            Some(
                "bool"
                    | "int2"
                    | "int4"
                    | "int8"
                    | "oid"
                    | "float4"
                    | "float8"
                    | "text"
                    | "varchar"
                    | "bpchar"
                    | "name"
                    | "unknown"
                    | "char"
                    | "json"
                    | "jsonb"
                    | "xml"
                    | "bytea"
                    | "numeric"
                    | "date"
                    | "time"
                    | "timestamp"
                    | "timestamptz"
                    | "uuid"
            )
        )
}

/// A column value (binary format) as a [`SqlValue`]: booleans, integers and floats as such,
/// text types, JSON and XML as text, bytea as bytes; numeric, date, time, timestamp
/// (timestamptz in UTC) and uuid as their text.
pub(crate) fn decode(ty: &Type, raw: &[u8]) -> Result<SqlValue, String> {
    let bad = || format!("a malformed {ty} value");
    let be8 = |raw: &[u8]| -> Result<[u8; 8], String> { raw.try_into().map_err(|_| bad()) };
    let text = |b: &[u8]| -> Result<SqlValue, String> {
        String::from_utf8(b.to_vec())
            .map(SqlValue::Text)
            .map_err(|_| bad())
    };
    let name = if ty.name() == "citext" {
        "text"
    } else {
        builtin(ty).unwrap_or("")
    };
    Ok(match name {
        "bool" => SqlValue::Bool(raw.first().ok_or_else(bad)? != &0),
        "int2" => SqlValue::Int(i16::from_be_bytes(raw.try_into().map_err(|_| bad())?).into()),
        "int4" => SqlValue::Int(i32::from_be_bytes(raw.try_into().map_err(|_| bad())?).into()),
        "oid" => SqlValue::Int(u32::from_be_bytes(raw.try_into().map_err(|_| bad())?).into()),
        "int8" => SqlValue::Int(i64::from_be_bytes(be8(raw)?)),
        "float4" => SqlValue::Float(f32::from_be_bytes(raw.try_into().map_err(|_| bad())?).into()),
        "float8" => SqlValue::Float(f64::from_be_bytes(be8(raw)?)),
        "text" | "varchar" | "bpchar" | "name" | "unknown" | "json" | "xml" => text(raw)?,
        "jsonb" => match raw.split_first() {
            Some((1, rest)) => text(rest)?,
            _ => return Err(bad()),
        },
        "char" => SqlValue::Text(char::from(*raw.first().ok_or_else(bad)?).to_string()),
        "bytea" => SqlValue::Bytes(raw.to_vec()),
        "numeric" => SqlValue::Text(numeric_text(raw).ok_or_else(bad)?),
        "date" => {
            let days = i32::from_be_bytes(raw.try_into().map_err(|_| bad())?);
            SqlValue::Text(match days {
                i32::MAX => "infinity".into(),
                i32::MIN => "-infinity".into(),
                d => match date_text(i64::from(d)) {
                    (date, false) => date,
                    (date, true) => format!("{date} BC"),
                },
            })
        }
        "time" => {
            let us = i64::from_be_bytes(be8(raw)?).max(0) as u64;
            let s = us / 1_000_000;
            SqlValue::Text(time_text(s / 3600, s / 60 % 60, s % 60, us % 1_000_000))
        }
        "timestamp" | "timestamptz" => {
            let us = i64::from_be_bytes(be8(raw)?);
            let zone = if name == "timestamptz" { "+00" } else { "" };
            SqlValue::Text(match us {
                i64::MAX => "infinity".into(),
                i64::MIN => "-infinity".into(),
                us => {
                    const DAY: i64 = 86_400_000_000;
                    let (date, bc) = date_text(us.div_euclid(DAY));
                    let rest = us.rem_euclid(DAY) as u64;
                    let s = rest / 1_000_000;
                    let time = time_text(s / 3600, s / 60 % 60, s % 60, rest % 1_000_000);
                    format!("{date} {time}{zone}{}", if bc { " BC" } else { "" })
                }
            })
        }
        "uuid" => {
            let h = keel_core::hex::encode(raw);
            if h.len() != 32 {
                return Err(bad());
            }
            SqlValue::Text(format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            ))
        }
        _ => return Err(format!("type {ty} does not map to a value")),
    })
}

/// PostgreSQL's date (days since 2000-01-01) as `YYYY-MM-DD`, and whether it is BC (for
/// dates, the caller adds " BC" after the whole value, as PostgreSQL prints it).
fn date_text(days_since_2000: i64) -> (String, bool) {
    let (y, m, d) = civil_from_days(days_since_2000 + 10_957);
    if y <= 0 {
        (format!("{:04}-{m:02}-{d:02}", 1 - y), true)
    } else {
        (format!("{y:04}-{m:02}-{d:02}"), false)
    }
}

/// PostgreSQL's binary numeric as its text (NaN and infinities included).
fn numeric_text(raw: &[u8]) -> Option<String> {
    use std::fmt::Write;
    let word =
        |i: usize| -> Option<u16> { Some(u16::from_be_bytes([*raw.get(i)?, *raw.get(i + 1)?])) };
    let ndigits = usize::from(word(0)?);
    let weight = i32::from(word(2)? as i16);
    let sign = word(4)?;
    let dscale = usize::from(word(6)?);
    if raw.len() != 8 + 2 * ndigits {
        return None;
    }
    match sign {
        0xC000 => return Some("NaN".into()),
        0xD000 => return Some("Infinity".into()),
        0xF000 => return Some("-Infinity".into()),
        0x0000 | 0x4000 => {}
        _ => return None,
    }
    // The base-10000 digit of exponent `e` (digit i has exponent weight - i).
    let digit = |e: i32| -> u16 {
        let i = weight - e;
        if i >= 0 && (i as usize) < ndigits {
            word(8 + 2 * i as usize).unwrap_or(0)
        } else {
            0
        }
    };
    let mut s = String::new();
    if sign == 0x4000 {
        s.push('-');
    }
    if weight < 0 {
        s.push('0');
    } else {
        for e in (0..=weight).rev() {
            if e == weight {
                let _ = write!(s, "{}", digit(e));
            } else {
                let _ = write!(s, "{:04}", digit(e));
            }
        }
    }
    if dscale > 0 {
        let mut frac = String::new();
        let mut e = -1;
        while frac.len() < dscale {
            let _ = write!(frac, "{:04}", digit(e));
            e -= 1;
        }
        frac.truncate(dscale);
        s.push('.');
        s.push_str(&frac);
    }
    Some(s)
}

impl Resource for PgResource {
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, Vote> {
        Box::pin(async move {
            let (lease, state) = self
                .branches
                .take(xid)
                .await
                .ok_or_else(|| self.err("prepare", format!("no open branch {xid}")))?;
            if let Some(e) = state.refusal(&self.name, "prepare") {
                self.abandon(lease, &state).await;
                return Err(e);
            }
            // The gid is hex and fixed punctuation: nothing to escape.
            match lease
                .conn
                .batch_execute(&format!("PREPARE TRANSACTION '{}'", gid(xid)))
                .await
            {
                Ok(()) => {
                    // The prepared transaction no longer belongs to the session.
                    self.pool.give_back(lease);
                    Ok(Vote::Commit)
                }
                // The connection is closed with the lease: unprepared, the branch rolls back.
                Err(e) => Err(self.err("prepare", pg_error(&e))),
            }
        })
    }

    fn commit<'a>(&'a self, xid: &'a Xid, one_phase: bool) -> ResourceFuture<'a, ()> {
        Box::pin(async move {
            if one_phase {
                let (lease, state) = self
                    .branches
                    .take(xid)
                    .await
                    .ok_or_else(|| self.err("commit", format!("no open branch {xid}")))?;
                if let Some(e) = state.refusal(&self.name, "commit") {
                    self.abandon(lease, &state).await;
                    return Err(e);
                }
                return match lease.conn.batch_execute("COMMIT").await {
                    Ok(()) => {
                        self.pool.give_back(lease);
                        Ok(())
                    }
                    Err(e) => Err(self.err("commit", pg_error(&e))),
                };
            }
            self.short(
                "COMMIT PREPARED",
                &format!("COMMIT PREPARED '{}'", gid(xid)),
            )
            .await
            .map(drop)
        })
    }

    fn rollback<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, ()> {
        Box::pin(async move {
            if let Some((lease, state)) = self.branches.take(xid).await {
                // Not prepared yet: its own connection ends it.
                if let State::Unclear(_) = state {
                    // Closing the connection rolls it back.
                    drop(lease);
                    return Ok(());
                }
                return match lease.conn.batch_execute("ROLLBACK").await {
                    Ok(()) => {
                        self.pool.give_back(lease);
                        Ok(())
                    }
                    Err(e) => Err(self.err("rollback", pg_error(&e))),
                };
            }
            self.short(
                "ROLLBACK PREPARED",
                &format!("ROLLBACK PREPARED '{}'", gid(xid)),
            )
            .await
            .map(drop)
        })
    }

    fn recover(&self) -> ResourceFuture<'_, Vec<Xid>> {
        Box::pin(async move {
            let messages = self
                .short(
                    "read pg_prepared_xacts",
                    "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()",
                )
                .await?;
            Ok(messages
                .iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(r) => r.get(0).and_then(xid_of),
                    _ => None,
                })
                .collect())
        })
    }
}

impl SqlResource for PgResource {
    fn begin<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, ()> {
        Box::pin(PgResource::begin(self, xid))
    }

    fn execute<'a>(
        &'a self,
        xid: &'a Xid,
        sql: &'a str,
        params: &'a [SqlValue],
    ) -> ResourceFuture<'a, u64> {
        Box::pin(PgResource::execute(self, xid, sql, params))
    }

    fn query<'a>(
        &'a self,
        xid: &'a Xid,
        sql: &'a str,
        params: &'a [SqlValue],
    ) -> ResourceFuture<'a, Rows> {
        Box::pin(PgResource::query(self, xid, sql, params))
    }

    fn check<'a>(&'a self) -> ResourceFuture<'a, TwoPhase> {
        Box::pin(async move {
            let shown = self
                .short("check", "SHOW max_prepared_transactions")
                .await?;
            let n = prepared_max_of(&shown)
                .ok_or_else(|| self.err("check", "max_prepared_transactions is not a number"))?;
            self.prepared_max
                .store(n, std::sync::atomic::Ordering::Relaxed);
            Ok(if n > 0 {
                TwoPhase::Ready
            } else {
                TwoPhase::Unable(NO_PREPARED_TRANSACTIONS.to_string())
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_round_trip_and_stay_within_postgresql_bounds() {
        let x = Xid {
            format_id: crate::coordinator::KEEL_FORMAT_ID,
            gtrid: vec![0xab; 64],
            bqual: vec![0, 0, 0, 1],
        };
        let g = gid(&x);
        assert!(g.len() < 200, "{}", g.len());
        assert_eq!(xid_of(&g), Some(x));
        assert_eq!(xid_of("someone-else"), None);
        assert_eq!(xid_of("keel:zz:00:00"), None);
    }

    fn numeric(weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut b = Vec::new();
        for w in [digits.len() as u16, weight as u16, sign, dscale]
            .into_iter()
            .chain(digits.iter().copied())
        {
            b.extend_from_slice(&w.to_be_bytes());
        }
        b
    }

    #[test]
    fn numerics_print_as_postgresql_does() {
        assert_eq!(numeric_text(&numeric(0, 0, 0, &[])).unwrap(), "0");
        assert_eq!(
            numeric_text(&numeric(1, 0, 2, &[12, 3456, 7800])).unwrap(),
            "123456.78"
        );
        assert_eq!(
            numeric_text(&numeric(-2, 0x4000, 6, &[1200])).unwrap(),
            "-0.000012"
        );
        assert_eq!(numeric_text(&numeric(2, 0, 0, &[1])).unwrap(), "100000000");
        assert_eq!(numeric_text(&numeric(0, 0xC000, 0, &[])).unwrap(), "NaN");
        assert_eq!(numeric_text(&[0, 1]), None);
    }

    #[test]
    fn dates_and_timestamps_print_as_text() {
        let ts = |us: i64| decode(&Type::TIMESTAMP, &us.to_be_bytes()).unwrap();
        assert_eq!(ts(0), SqlValue::Text("2000-01-01 00:00:00".into()));
        assert_eq!(ts(-1), SqlValue::Text("1999-12-31 23:59:59.999999".into()));
        assert_eq!(
            decode(
                &Type::TIMESTAMPTZ,
                &(86_400_000_000i64 + 1_500_000).to_be_bytes()
            )
            .unwrap(),
            SqlValue::Text("2000-01-02 00:00:01.500000+00".into())
        );
        assert_eq!(
            decode(&Type::DATE, &(-1i32).to_be_bytes()).unwrap(),
            SqlValue::Text("1999-12-31".into())
        );
        assert!(decode(&Type::POINT, &[]).is_err());
    }

    #[test]
    fn parameters_convert_to_the_types_postgresql_reports() {
        use SqlValue as V;
        let p = |ty: Type, v: V| convert(0, &ty, &v);
        assert!(matches!(
            p(Type::INT4, V::Text(" 42".into())),
            Ok(PgParam::I32(42))
        ));
        assert!(matches!(p(Type::INT2, V::Int(7)), Ok(PgParam::I16(7))));
        let e = p(Type::INT2, V::Int(1 << 20)).err().unwrap();
        assert!(e.contains("out of range"), "{e}");
        let e = p(Type::INT4, V::Text("x".into())).err().unwrap();
        assert_eq!(e, "parameter 1 (Text value) does not convert to int4");
        assert!(p(Type::BYTEA, V::Text("x".into())).is_err());
        assert!(matches!(p(Type::NUMERIC, V::Int(5)), Ok(PgParam::AsText(s)) if s == "5"));
        assert!(matches!(
            p(Type::TIMESTAMP, V::Text("2024-01-01".into())),
            Ok(PgParam::AsText(_))
        ));
        assert!(matches!(p(Type::INT8, V::Null), Ok(PgParam::Null)));
        assert!(matches!(
            p(Type::BOOL, V::Text("yes".into())),
            Ok(PgParam::Bool(true))
        ));
        let e = convert_params(&[Type::INT4], &[]).err().unwrap();
        assert!(e.contains("1 parameter(s), 0 given"), "{e}");
    }
}

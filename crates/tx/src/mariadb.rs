//! MariaDB (and MySQL) as a transaction resource and data source (mysql_async, without TLS):
//! XA (DESIGN §6) over a bounded connection pool (`pool.rs`). A branch holds a pooled
//! connection from `XA START` until it ends; the XA statements go over the text protocol, XIDs
//! as hex literals (no byte needs quoting), and the branch's own statements
//! ([`MariaDbResource::execute`], [`MariaDbResource::query`]) as prepared statements with `?`
//! parameters.
//!
//! A prepared branch stays on its connection until phase two, which runs there (`XA COMMIT` /
//! `XA ROLLBACK`); then the connection goes back to the pool. MariaDB (10.11 tested) keeps a
//! prepared branch tied to a live session: another session sees it in `XA RECOVER` but gets
//! `XAER_NOTA` committing it, and the session cannot `XA START` again until it is resolved;
//! `COM_RESET_CONNECTION` detaches it but leaves the session failing InnoDB statements. Only
//! when the session ends does the branch pass to the server (10.5+: it survives), where phase
//! two on another connection and recovery find it: after a crash, or when the branch's
//! connection broke. Recovery (`XA RECOVER`) and phase two of a branch this resource no
//! longer holds use a pooled connection; there `XAER_NOTA` means "not found" only when
//! `XA RECOVER` does not list the branch (a crashed process's session may hold it a moment).
//!
//! A connection is closed instead of reused after an error whose effect on the session is
//! unclear, and an idle one found dead (e.g. killed, or the server restarted) is replaced by a
//! fresh one, once. Passwords: the URL is never logged or put in an error.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use mysql_async::consts::ColumnType;
use mysql_async::prelude::Queryable;
use mysql_async::{Column, Conn, Opts, Params, Row, Value};

use crate::coordinator::{Resource, ResourceError, ResourceFuture, Vote, Xid};
use crate::pool::{Branches, Lease, Pool, Running, State, Use, POOL_WAIT_MS};
use crate::sql::{time_text, Rows, SqlResource, SqlValue, TwoPhase, ROWS_MAX};

/// MariaDB's error for an unknown XID (XAER_NOTA).
const ER_XAER_NOTA: u16 = 1397;

/// A MariaDB database as a resource, by its configuration name.
pub struct MariaDbResource {
    name: String,
    opts: Opts,
    pool: Pool<Conn>,
    branches: Branches<Conn>,
    /// Prepared branches still on their connection, waiting for phase two.
    prepared: Mutex<HashMap<Xid, Lease<Conn>>>,
}

/// The XID as MariaDB's XA statements take it.
fn xa(xid: &Xid) -> String {
    // An empty branch qualifier is written as '' (X'' is accepted too, but not everywhere).
    let bqual = if xid.bqual.is_empty() {
        "''".to_string()
    } else {
        format!("X'{}'", keel_core::hex::encode(&xid.bqual))
    };
    format!(
        "X'{}',{bqual},{}",
        keel_core::hex::encode(&xid.gtrid),
        xid.format_id
    )
}

/// The connection is gone (closed, killed, or the server went away).
fn lost(e: &mysql_async::Error) -> bool {
    match e {
        mysql_async::Error::Io(_) => true,
        mysql_async::Error::Driver(mysql_async::DriverError::ConnectionClosed) => true,
        // Server shutdown, connection killed, server gone away, lost connection.
        mysql_async::Error::Server(s) => matches!(s.code, 1053 | 1927 | 2006 | 2013),
        _ => false,
    }
}

impl MariaDbResource {
    /// `url`: `mysql://user:password@host:port/db` (kept in memory only, never in errors).
    /// `pool_max`: most connections open at once (branches, phase two and recovery together;
    /// branches get at most `pool_max - 1` of them when `pool_max` > 1); taken as 1 to
    /// [`crate::sql::POOL_MAX_LIMIT`].
    pub fn new(name: &str, url: &str, pool_max: usize) -> Result<MariaDbResource, ResourceError> {
        // `sslmode=verify-full&sslrootcert=FILE` (libpq's words, as for PostgreSQL) asks for
        // TLS checked against that CA and the host's name; taken out before mysql_async reads
        // the URL.
        let (url, tls) = keel_tls::pg::tls_request(url).map_err(|detail| ResourceError {
            resource: name.to_string(),
            detail,
            not_found: false,
        })?;
        let url = url.as_str();
        let opts = Opts::from_url(url).map_err(|e| ResourceError {
            resource: name.to_string(),
            // Only the error's kind (before any `:`): its details may quote the URL, and with
            // it the password.
            detail: format!(
                "the data source URL does not parse ({}); give it as mysql://USER:PASSWORD@HOST:PORT/DATABASE",
                e.to_string().split(':').next().unwrap_or("invalid")
            ),
            not_found: false,
        })?;
        let opts = match tls {
            None => opts,
            Some(root) => mysql_async::OptsBuilder::from_opts(opts)
                .ssl_opts(Some(
                    mysql_async::SslOpts::default()
                        .with_root_certs(vec![std::path::PathBuf::from(root).into()])
                        .with_disable_built_in_roots(true),
                ))
                .into(),
        };
        Ok(MariaDbResource {
            name: name.to_string(),
            opts,
            pool: Pool::new(name, pool_max, Duration::from_millis(POOL_WAIT_MS)),
            branches: Branches::new(name),
            prepared: Mutex::new(HashMap::new()),
        })
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

    fn classify(&self, what: &str, e: &mysql_async::Error) -> ResourceError {
        ResourceError {
            resource: self.name.clone(),
            detail: format!("{what}: {e}"),
            not_found: is_nota(e),
        }
    }

    async fn connect(&self) -> Result<Conn, ResourceError> {
        Conn::new(self.opts.clone())
            .await
            .map_err(|e| self.err("connect", e))
    }

    /// Runs `sql` (text protocol) on a pooled connection: phase two, recovery, checks. A dead
    /// idle connection is replaced by a fresh one, once; an unknown XID is `not_found` (the
    /// connection stays pooled).
    async fn short(&self, what: &str, sql: &str) -> Result<Vec<Row>, ResourceError> {
        let mut slot = self.pool.slot(Use::Short).await?;
        let mut fresh = false;
        loop {
            let mut conn = match slot.idle.take() {
                Some(c) => c,
                None => {
                    fresh = true;
                    self.connect().await?
                }
            };
            match conn.query::<Row, _>(sql).await {
                Ok(rows) => {
                    self.pool.give_back(slot.lease(conn));
                    return Ok(rows);
                }
                Err(e) if !fresh && lost(&e) => {
                    drop(conn);
                    // The others may be dead too (a restart): not worth a failure each.
                    self.pool.retain_idle(|_| false);
                }
                Err(e) if is_nota(&e) => {
                    self.pool.give_back(slot.lease(conn));
                    return Err(self.classify(what, &e));
                }
                Err(e) => return Err(self.classify(what, &e)),
            }
        }
    }

    /// Opens branch `xid`: a pooled connection with `XA START`, where `execute` and `query`
    /// run its work. Waits (at most [`POOL_WAIT_MS`]) while the pool is exhausted.
    pub async fn begin(&self, xid: &Xid) -> Result<(), ResourceError> {
        if self.branches.get(xid).is_some() {
            return Err(self.err("begin", format!("branch {xid} is open already")));
        }
        let start = format!("XA START {}", xa(xid));
        let mut slot = self.pool.slot(Use::Branch).await?;
        let mut conn = None;
        if let Some(mut c) = slot.idle.take() {
            match c.query_drop(&start).await {
                Ok(()) => conn = Some(c),
                Err(e) => {
                    // Dead (or in a state XA START refuses): closed; a fresh one instead, once.
                    drop(c);
                    if lost(&e) {
                        self.pool.retain_idle(|_| false);
                    }
                }
            }
        }
        let conn = match conn {
            Some(c) => c,
            None => {
                let mut c = self.connect().await?;
                c.query_drop(&start)
                    .await
                    .map_err(|e| self.err("XA START", e))?;
                c
            }
        };
        self.branches
            .open(xid, slot.lease(conn))
            .map_err(|_| self.err("begin", format!("branch {xid} is open already")))
    }

    /// Runs a statement in branch `xid` with `?` parameters; returns the rows it changed.
    /// After an error from the database the branch can only roll back.
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
        match statement(run.conn(), sql, params, want_rows).await {
            Ok(out) => {
                run.done(State::Ok);
                Ok(out)
            }
            Err(Failure::Refused(detail)) => {
                run.done(State::Ok);
                Err(self.err("statement refused", detail))
            }
            Err(Failure::Db(e)) => {
                let detail = e.to_string();
                run.done(if lost(&e) || !matches!(e, mysql_async::Error::Server(_)) {
                    State::Unclear(detail.clone())
                } else {
                    State::Failed(detail.clone())
                });
                Err(self.err("statement failed", detail))
            }
        }
    }

    /// Ends a branch on its connection: `XA END` then `XA ROLLBACK` (or `XA COMMIT … ONE
    /// PHASE`); the connection goes back to the pool when both succeed, else it is closed
    /// (which rolls an unprepared branch back).
    async fn finish(
        &self,
        mut lease: Lease<Conn>,
        xid: &Xid,
        commit: bool,
    ) -> Result<(), ResourceError> {
        let x = xa(xid);
        if let Err(e) = lease.conn.query_drop(format!("XA END {x}")).await {
            if commit {
                return Err(self.err("XA END", e));
            }
            // A branch the server already rolled back (a deadlock victim) is idle already.
        }
        let (sql, what) = if commit {
            (format!("XA COMMIT {x} ONE PHASE"), "XA COMMIT ONE PHASE")
        } else {
            (format!("XA ROLLBACK {x}"), "XA ROLLBACK")
        };
        match lease.conn.query_drop(sql).await {
            Ok(()) => {
                self.pool.give_back(lease);
                Ok(())
            }
            Err(e) => Err(self.classify(what, &e)),
        }
    }

    /// Phase two of prepared branch `xid`: on its own connection while this resource holds it
    /// (which then goes back to the pool), else on a pooled one.
    async fn phase_two(&self, xid: &Xid, what: &str, sql: String) -> Result<(), ResourceError> {
        let held = self.prepared.lock().expect("prepared lock").remove(xid);
        let Some(mut lease) = held else {
            return match self.short(what, &sql).await {
                Err(e) if e.not_found => {
                    // XAER_NOTA also answers for a prepared branch still tied to a session
                    // (one that a crashed process left, not yet cleaned up by the server);
                    // "not found" only when `XA RECOVER` does not list it either.
                    match Resource::recover(self).await {
                        Ok(prepared) if !prepared.contains(xid) => Err(e),
                        Ok(_) => Err(self.err(
                            what,
                            "the branch is prepared but still tied to another session (one that just ended?); try again",
                        )),
                        Err(r) => Err(r),
                    }
                }
                r => r.map(drop),
            };
        };
        match lease.conn.query_drop(sql).await {
            Ok(()) => {
                self.pool.give_back(lease);
                Ok(())
            }
            // The connection is closed with the lease, which hands a still prepared branch to
            // the server; never `not_found` unless the server said so (a commit decision is
            // only forgotten once a branch is known to be resolved).
            Err(e) => Err(self.classify(what, &e)),
        }
    }

    /// Rolls back a branch that cannot commit (or closes its connection, which does too).
    async fn abandon(&self, lease: Lease<Conn>, xid: &Xid, state: &State) {
        if matches!(state, State::Failed(_)) {
            let _ = self.finish(lease, xid, false).await;
        }
    }
}

fn is_nota(e: &mysql_async::Error) -> bool {
    matches!(e, mysql_async::Error::Server(s) if s.code == ER_XAER_NOTA)
}

enum Failure {
    /// Refused before anything ran, or after it ran without harm (too many rows).
    Refused(String),
    Db(mysql_async::Error),
}

impl From<mysql_async::Error> for Failure {
    fn from(e: mysql_async::Error) -> Failure {
        Failure::Db(e)
    }
}

fn to_mysql(v: &SqlValue) -> Value {
    match v {
        SqlValue::Null => Value::NULL,
        SqlValue::Bool(b) => Value::Int(i64::from(*b)),
        SqlValue::Int(n) => Value::Int(*n),
        SqlValue::Float(f) => Value::Double(*f),
        SqlValue::Text(s) => Value::Bytes(s.as_bytes().to_vec()),
        SqlValue::Bytes(b) => Value::Bytes(b.clone()),
    }
}

/// Prepares `sql` (binary protocol, cached per connection), binds `params`, runs it; with
/// `want_rows`, reads its rows.
async fn statement(
    conn: &mut Conn,
    sql: &str,
    params: &[SqlValue],
    want_rows: bool,
) -> Result<(u64, Option<Rows>), Failure> {
    let stmt = conn.prep(sql).await?;
    if usize::from(stmt.num_params()) != params.len() {
        return Err(Failure::Refused(format!(
            "the statement has {} parameter(s), {} given",
            stmt.num_params(),
            params.len()
        )));
    }
    let values = if params.is_empty() {
        Params::Empty
    } else {
        Params::Positional(params.iter().map(to_mysql).collect())
    };
    if !want_rows {
        conn.exec_drop(&stmt, values).await?;
        return Ok((conn.affected_rows(), None));
    }
    let mut result = conn.exec_iter(&stmt, values).await?;
    let columns = result.columns().unwrap_or_else(|| Vec::new().into());
    let mut rows = Vec::new();
    let mut more = false;
    result
        .for_each(|row: Row| {
            if rows.len() == ROWS_MAX {
                more = true; // read to the end, not kept
            } else {
                rows.push(
                    row.unwrap()
                        .into_iter()
                        .zip(columns.iter())
                        .map(|(v, c)| from_mysql(c, v))
                        .collect(),
                );
            }
        })
        .await?;
    let changed = result.affected_rows();
    // Any further result sets (a procedure's) are read and dropped.
    result.drop_result().await?;
    if more {
        return Err(Failure::Refused(format!(
            "the query returned more than {ROWS_MAX} rows (the most a query may return)"
        )));
    }
    let names = columns.iter().map(|c| c.name_str().into_owned()).collect();
    Ok((
        changed,
        Some(Rows {
            columns: names,
            rows,
        }),
    ))
}

/// A value as a [`SqlValue`]: integers and floats as such (an unsigned one past `i64` as
/// text), binary strings as bytes, other strings (decimals included) as text, dates and times
/// as their text.
fn from_mysql(col: &Column, v: Value) -> SqlValue {
    match v {
        Value::NULL => SqlValue::Null,
        Value::Int(n) => SqlValue::Int(n),
        Value::UInt(n) => i64::try_from(n)
            .map(SqlValue::Int)
            .unwrap_or_else(|_| SqlValue::Text(n.to_string())),
        Value::Float(f) => SqlValue::Float(f64::from(f)),
        Value::Double(f) => SqlValue::Float(f),
        Value::Bytes(b) => {
            let binary = col.character_set() == 63
                && matches!(
                    col.column_type(),
                    ColumnType::MYSQL_TYPE_STRING
                        | ColumnType::MYSQL_TYPE_VAR_STRING
                        | ColumnType::MYSQL_TYPE_VARCHAR
                        | ColumnType::MYSQL_TYPE_BLOB
                        | ColumnType::MYSQL_TYPE_TINY_BLOB
                        | ColumnType::MYSQL_TYPE_MEDIUM_BLOB
                        | ColumnType::MYSQL_TYPE_LONG_BLOB
                        | ColumnType::MYSQL_TYPE_BIT
                        | ColumnType::MYSQL_TYPE_GEOMETRY
                );
            if binary {
                SqlValue::Bytes(b)
            } else {
                match String::from_utf8(b) {
                    Ok(s) => SqlValue::Text(s),
                    Err(e) => SqlValue::Bytes(e.into_bytes()),
                }
            }
        }
        Value::Date(y, mo, d, h, mi, s, us) => {
            let date = format!("{y:04}-{mo:02}-{d:02}");
            if col.column_type() == ColumnType::MYSQL_TYPE_DATE {
                SqlValue::Text(date)
            } else {
                let time = time_text(h.into(), mi.into(), s.into(), us.into());
                SqlValue::Text(format!("{date} {time}"))
            }
        }
        Value::Time(neg, days, h, mi, s, us) => {
            let hours = u64::from(days) * 24 + u64::from(h);
            let time = time_text(hours, mi.into(), s.into(), us.into());
            SqlValue::Text(if neg { format!("-{time}") } else { time })
        }
    }
}

impl Resource for MariaDbResource {
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, Vote> {
        Box::pin(async move {
            let (mut lease, state) = self
                .branches
                .take(xid)
                .await
                .ok_or_else(|| self.err("prepare", format!("no open branch {xid}")))?;
            if let Some(e) = state.refusal(&self.name, "prepare") {
                self.abandon(lease, xid, &state).await;
                return Err(e);
            }
            let x = xa(xid);
            lease
                .conn
                .query_drop(format!("XA END {x}"))
                .await
                .map_err(|e| self.err("XA END", e))?;
            lease
                .conn
                .query_drop(format!("XA PREPARE {x}"))
                .await
                .map_err(|e| self.err("XA PREPARE", e))?;
            // Phase two runs on this connection (see the module docs).
            self.prepared
                .lock()
                .expect("prepared lock")
                .insert(xid.clone(), lease);
            Ok(Vote::Commit)
        })
    }

    fn commit<'a>(&'a self, xid: &'a Xid, one_phase: bool) -> ResourceFuture<'a, ()> {
        Box::pin(async move {
            let x = xa(xid);
            if one_phase {
                let (lease, state) = self
                    .branches
                    .take(xid)
                    .await
                    .ok_or_else(|| self.err("commit", format!("no open branch {xid}")))?;
                if let Some(e) = state.refusal(&self.name, "commit") {
                    self.abandon(lease, xid, &state).await;
                    return Err(e);
                }
                return self.finish(lease, xid, true).await;
            }
            self.phase_two(xid, "XA COMMIT", format!("XA COMMIT {x}"))
                .await
        })
    }

    fn rollback<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, ()> {
        Box::pin(async move {
            if let Some((lease, state)) = self.branches.take(xid).await {
                // Not prepared yet: ended on its own connection.
                if let State::Unclear(_) = state {
                    // Closing the connection rolls it back.
                    drop(lease);
                    return Ok(());
                }
                return self.finish(lease, xid, false).await;
            }
            self.phase_two(xid, "XA ROLLBACK", format!("XA ROLLBACK {}", xa(xid)))
                .await
        })
    }

    fn recover(&self) -> ResourceFuture<'_, Vec<Xid>> {
        Box::pin(async move {
            let rows = self.short("XA RECOVER", "XA RECOVER").await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let (Some(format_id), Some(glen), Some(blen), Some(data)) = (
                    r.get::<i64, _>(0),
                    r.get::<usize, _>(1),
                    r.get::<usize, _>(2),
                    r.get::<Vec<u8>, _>(3),
                ) else {
                    continue;
                };
                if data.len() != glen + blen {
                    continue;
                }
                out.push(Xid {
                    format_id: format_id as i32,
                    gtrid: data[..glen].to_vec(),
                    bqual: data[glen..].to_vec(),
                });
            }
            Ok(out)
        })
    }
}

impl SqlResource for MariaDbResource {
    fn begin<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, ()> {
        Box::pin(MariaDbResource::begin(self, xid))
    }

    fn execute<'a>(
        &'a self,
        xid: &'a Xid,
        sql: &'a str,
        params: &'a [SqlValue],
    ) -> ResourceFuture<'a, u64> {
        Box::pin(MariaDbResource::execute(self, xid, sql, params))
    }

    fn query<'a>(
        &'a self,
        xid: &'a Xid,
        sql: &'a str,
        params: &'a [SqlValue],
    ) -> ResourceFuture<'a, Rows> {
        Box::pin(MariaDbResource::query(self, xid, sql, params))
    }

    fn check<'a>(&'a self) -> ResourceFuture<'a, TwoPhase> {
        // XA needs no setting in MariaDB/MySQL (InnoDB): reachable is ready.
        Box::pin(async move {
            self.short("check", "SELECT 1")
                .await
                .map(|_| TwoPhase::Ready)
        })
    }
}

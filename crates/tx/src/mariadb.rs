//! MariaDB (and MySQL) as a transaction resource: XA over the text protocol (DESIGN §6). Each
//! branch runs on its own connection from `XA START` to `XA PREPARE` (MariaDB ties an active
//! XA branch to its connection); phase two (`XA COMMIT`, `XA ROLLBACK`) and recovery
//! (`XA RECOVER`) use a fresh connection, which MariaDB 10.5 and later allow for prepared
//! branches (they survive their connection). XIDs go as hex literals, so no byte needs quoting.

use std::collections::HashMap;
use std::sync::Mutex;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, Row};

use crate::coordinator::{Resource, ResourceError, ResourceFuture, Vote, Xid};

/// Branches one resource runs at once (connections held until prepared).
pub const BRANCHES_MAX: usize = 256;
/// MariaDB's error for an unknown XID (XAER_NOTA).
const ER_XAER_NOTA: u16 = 1397;

/// A MariaDB database as a resource, by its configuration name.
pub struct MariaDbResource {
    name: String,
    opts: Opts,
    branches: tokio::sync::Mutex<HashMap<Xid, Conn>>,
    open: Mutex<usize>,
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

impl MariaDbResource {
    /// `url`: `mysql://user:password@host:port/db` (kept in memory only, never in errors).
    pub fn new(name: &str, url: &str) -> Result<MariaDbResource, ResourceError> {
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
        Ok(MariaDbResource {
            name: name.to_string(),
            opts,
            branches: tokio::sync::Mutex::new(HashMap::new()),
            open: Mutex::new(0),
        })
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> ResourceError {
        ResourceError {
            resource: self.name.clone(),
            detail: format!("{what}: {e}"),
            not_found: false,
        }
    }

    fn classify(&self, what: &str, e: mysql_async::Error) -> ResourceError {
        let not_found = matches!(&e, mysql_async::Error::Server(s) if s.code == ER_XAER_NOTA);
        ResourceError {
            resource: self.name.clone(),
            detail: format!("{what}: {e}"),
            not_found,
        }
    }

    async fn connect(&self) -> Result<Conn, ResourceError> {
        Conn::new(self.opts.clone())
            .await
            .map_err(|e| self.err("connect", e))
    }

    /// Opens branch `xid`: a connection with `XA START`, where `execute` runs its work.
    pub async fn begin(&self, xid: &Xid) -> Result<(), ResourceError> {
        {
            let mut open = self.open.lock().expect("open lock");
            if *open >= BRANCHES_MAX {
                return Err(self.err("begin", format!("{BRANCHES_MAX} branches are open already")));
            }
            *open += 1;
        }
        let r = async {
            let mut c = self.connect().await?;
            c.query_drop(format!("XA START {}", xa(xid)))
                .await
                .map_err(|e| self.err("XA START", e))?;
            Ok::<_, ResourceError>(c)
        }
        .await;
        match r {
            Ok(c) => {
                self.branches.lock().await.insert(xid.clone(), c);
                Ok(())
            }
            Err(e) => {
                *self.open.lock().expect("open lock") -= 1;
                Err(e)
            }
        }
    }

    /// Runs a statement in branch `xid`; returns the rows it changed.
    pub async fn execute(&self, xid: &Xid, sql: &str) -> Result<u64, ResourceError> {
        let mut branches = self.branches.lock().await;
        let c = branches.get_mut(xid).ok_or_else(|| ResourceError {
            resource: self.name.clone(),
            detail: format!("no open branch {xid}"),
            not_found: true,
        })?;
        c.query_drop(sql)
            .await
            .map_err(|e| self.err("statement failed", e))?;
        Ok(c.affected_rows())
    }

    async fn take(&self, xid: &Xid) -> Option<Conn> {
        let c = self.branches.lock().await.remove(xid);
        if c.is_some() {
            *self.open.lock().expect("open lock") -= 1;
        }
        c
    }

    async fn on_fresh(&self, what: &str, sql: String) -> Result<(), ResourceError> {
        let mut c = self.connect().await?;
        let r = c.query_drop(sql).await.map_err(|e| self.classify(what, e));
        let _ = c.disconnect().await;
        r
    }
}

impl Resource for MariaDbResource {
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, Vote> {
        Box::pin(async move {
            let mut c = self
                .take(xid)
                .await
                .ok_or_else(|| self.err("prepare", format!("no open branch {xid}")))?;
            let x = xa(xid);
            c.query_drop(format!("XA END {x}"))
                .await
                .map_err(|e| self.err("XA END", e))?;
            c.query_drop(format!("XA PREPARE {x}"))
                .await
                .map_err(|e| self.err("XA PREPARE", e))?;
            // A prepared branch outlives its connection (MariaDB 10.5+).
            let _ = c.disconnect().await;
            Ok(Vote::Commit)
        })
    }

    fn commit<'a>(&'a self, xid: &'a Xid, one_phase: bool) -> ResourceFuture<'a, ()> {
        Box::pin(async move {
            let x = xa(xid);
            if one_phase {
                let mut c = self
                    .take(xid)
                    .await
                    .ok_or_else(|| self.err("commit", format!("no open branch {xid}")))?;
                c.query_drop(format!("XA END {x}"))
                    .await
                    .map_err(|e| self.err("XA END", e))?;
                let r = c
                    .query_drop(format!("XA COMMIT {x} ONE PHASE"))
                    .await
                    .map_err(|e| self.err("XA COMMIT ONE PHASE", e));
                let _ = c.disconnect().await;
                return r;
            }
            self.on_fresh("XA COMMIT", format!("XA COMMIT {x}")).await
        })
    }

    fn rollback<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, ()> {
        Box::pin(async move {
            let x = xa(xid);
            if let Some(mut c) = self.take(xid).await {
                // Not prepared yet: end and roll back on its own connection.
                let _ = c.query_drop(format!("XA END {x}")).await;
                let r = c
                    .query_drop(format!("XA ROLLBACK {x}"))
                    .await
                    .map_err(|e| self.classify("XA ROLLBACK", e));
                let _ = c.disconnect().await;
                return r;
            }
            self.on_fresh("XA ROLLBACK", format!("XA ROLLBACK {x}"))
                .await
        })
    }

    fn recover(&self) -> ResourceFuture<'_, Vec<Xid>> {
        Box::pin(async move {
            let mut c = self.connect().await?;
            let rows: Vec<Row> = c
                .query("XA RECOVER")
                .await
                .map_err(|e| self.err("XA RECOVER", e))?;
            let _ = c.disconnect().await;
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

//! PostgreSQL as a transaction resource (DESIGN §6): each branch runs on its own connection
//! until `PREPARE TRANSACTION`; phase two (`COMMIT PREPARED` / `ROLLBACK PREPARED`) and
//! recovery (`pg_prepared_xacts`) use a fresh connection. The server needs
//! `max_prepared_transactions` above zero.
//!
//! Global transaction ids: `keel:<format id, 8 hex>:<gtrid hex>:<bqual hex>` (at most 150
//! characters of PostgreSQL's 200), so recovery recognises Keel's branches and rebuilds their
//! XIDs. Passwords: the URL is never logged or put in an error (errors name the resource).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::coordinator::{Resource, ResourceError, ResourceFuture, Vote, Xid};

/// How long a connect may take.
pub const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Branches one resource runs at once (connections held until prepared).
pub const BRANCHES_MAX: usize = 256;

/// A PostgreSQL database as a resource, by its configuration name.
pub struct PgResource {
    name: String,
    url: String,
    /// Open branches: their connection, in a transaction, until prepared or rolled back.
    branches: Mutex<HashMap<Xid, std::sync::Arc<Client>>>,
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

impl PgResource {
    /// `url`: libpq key-value or URL form (with its password, kept in memory only).
    pub fn new(name: &str, url: &str) -> PgResource {
        PgResource {
            name: name.to_string(),
            url: url.to_string(),
            branches: Mutex::new(HashMap::new()),
        }
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> ResourceError {
        ResourceError {
            resource: self.name.clone(),
            detail: format!("{what}: {e}"),
            not_found: false,
        }
    }

    async fn connect(&self) -> Result<Client, ResourceError> {
        let mut cfg: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| {
                self.err(
                    "the data source URL does not parse (give it as postgresql://USER:PASSWORD@HOST:PORT/DATABASE)",
                    e,
                )
            })?;
        cfg.connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS));
        let (client, conn) = cfg
            .connect(NoTls)
            .await
            .map_err(|e| self.err("connect", e))?;
        let name = self.name.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(resource = %name, error = %e, "connection ended");
            }
        });
        Ok(client)
    }

    /// Opens branch `xid`: a connection in a transaction, where `execute` runs its work.
    pub async fn begin(&self, xid: &Xid) -> Result<(), ResourceError> {
        if self.branches.lock().expect("branches lock").len() >= BRANCHES_MAX {
            return Err(self.err("begin", format!("{BRANCHES_MAX} branches are open already")));
        }
        let client = self.connect().await?;
        client
            .batch_execute("BEGIN")
            .await
            .map_err(|e| self.err("begin", e))?;
        self.branches
            .lock()
            .expect("branches lock")
            .insert(xid.clone(), std::sync::Arc::new(client));
        Ok(())
    }

    fn branch(&self, xid: &Xid) -> Result<std::sync::Arc<Client>, ResourceError> {
        self.branches
            .lock()
            .expect("branches lock")
            .get(xid)
            .cloned()
            .ok_or_else(|| ResourceError {
                resource: self.name.clone(),
                detail: format!("no open branch {xid}"),
                not_found: true,
            })
    }

    /// Runs a statement in branch `xid`; returns the rows it changed.
    pub async fn execute(
        &self,
        xid: &Xid,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, ResourceError> {
        let client = self.branch(xid)?;
        client
            .execute(sql, params)
            .await
            .map_err(|e| self.err("statement failed", e))
    }

    fn take(&self, xid: &Xid) -> Option<std::sync::Arc<Client>> {
        self.branches.lock().expect("branches lock").remove(xid)
    }

    /// Runs `sql` (a phase-two statement on a prepared branch) on a fresh connection; an
    /// unknown prepared transaction is `not_found`.
    async fn phase_two(&self, sql: &str) -> Result<(), ResourceError> {
        let client = self.connect().await?;
        match client.batch_execute(sql).await {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) => {
                Err(ResourceError {
                    resource: self.name.clone(),
                    detail: e.to_string(),
                    not_found: true,
                })
            }
            Err(e) => Err(self.err("phase two", e)),
        }
    }
}

impl Resource for PgResource {
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, Vote> {
        Box::pin(async move {
            let client = self
                .take(xid)
                .ok_or_else(|| self.err("prepare", format!("no open branch {xid}")))?;
            // The gid is hex and fixed punctuation: nothing to escape.
            client
                .batch_execute(&format!("PREPARE TRANSACTION '{}'", gid(xid)))
                .await
                .map_err(|e| self.err("prepare", e))?;
            Ok(Vote::Commit)
        })
    }

    fn commit<'a>(&'a self, xid: &'a Xid, one_phase: bool) -> ResourceFuture<'a, ()> {
        Box::pin(async move {
            if one_phase {
                let client = self
                    .take(xid)
                    .ok_or_else(|| self.err("commit", format!("no open branch {xid}")))?;
                return client
                    .batch_execute("COMMIT")
                    .await
                    .map_err(|e| self.err("commit", e));
            }
            self.phase_two(&format!("COMMIT PREPARED '{}'", gid(xid)))
                .await
        })
    }

    fn rollback<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, ()> {
        Box::pin(async move {
            if let Some(client) = self.take(xid) {
                // Not prepared yet: its own connection ends it.
                return client
                    .batch_execute("ROLLBACK")
                    .await
                    .map_err(|e| self.err("rollback", e));
            }
            self.phase_two(&format!("ROLLBACK PREPARED '{}'", gid(xid)))
                .await
        })
    }

    fn recover(&self) -> ResourceFuture<'_, Vec<Xid>> {
        Box::pin(async move {
            let client = self.connect().await?;
            let rows = client
                .query(
                    "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()",
                    &[],
                )
                .await
                .map_err(|e| self.err("read pg_prepared_xacts", e))?;
            Ok(rows
                .iter()
                .filter_map(|r| xid_of(r.get::<_, &str>(0)))
                .collect())
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
}

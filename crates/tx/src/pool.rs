//! The connection pool and open branches shared by the SQL resources ([`crate::pg`],
//! [`crate::mariadb`]).
//!
//! A [`Pool`] bounds the connections a resource has open at once (`pool_max`: branches, phase
//! two and recovery together) and keeps the idle ones for reuse. A caller first takes a
//! [`Slot`] (waiting at most [`POOL_WAIT_MS`] for one to be free), which may carry an idle
//! connection; with a connection it becomes a [`Lease`]. [`Pool::give_back`] returns a lease's
//! connection to the idle set; dropping a lease closes its connection instead (what a caller
//! does after an error whose effect on the session is unclear). Branches may hold at most
//! `pool_max - 1` connections (all of them when `pool_max` is 1), so phase two and recovery
//! always get one: otherwise branches blocked on rows locked by a prepared branch could hold
//! every connection while that branch waits for one to commit (a deadlock ended only by the
//! pool wait).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::coordinator::{ResourceError, Xid};

/// How long a caller waits for a free connection before the pool is "exhausted".
pub const POOL_WAIT_MS: u64 = 30_000;
/// The largest `pool_max` (larger values are taken as this).
pub const POOL_MAX_LIMIT: usize = 1_024;

/// What a connection is taken for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    /// A branch's own connection, held until it is prepared or ended.
    Branch,
    /// A short statement: phase two, recovery, a check.
    Short,
}

pub(crate) struct Pool<C> {
    resource: String,
    max: usize,
    wait: Duration,
    /// Connections open (or being opened), `max` permits.
    all: Arc<Semaphore>,
    /// Connections held by branches, `max - 1` permits (1 when `max` is 1).
    branches: Arc<Semaphore>,
    idle: Mutex<Vec<C>>,
}

/// The right to one connection, with an idle one to try first if there was one.
pub(crate) struct Slot<C> {
    pub idle: Option<C>,
    permits: Permits,
}

/// A connection and its place in the pool.
pub(crate) struct Lease<C> {
    pub conn: C,
    _permits: Permits,
}

struct Permits {
    _all: OwnedSemaphorePermit,
    _branch: Option<OwnedSemaphorePermit>,
}

impl<C> Slot<C> {
    pub fn lease(self, conn: C) -> Lease<C> {
        Lease {
            conn,
            _permits: self.permits,
        }
    }
}

impl<C> Pool<C> {
    pub fn new(resource: &str, max: usize, wait: Duration) -> Pool<C> {
        let max = max.clamp(1, POOL_MAX_LIMIT);
        Pool {
            resource: resource.to_string(),
            max,
            wait,
            all: Arc::new(Semaphore::new(max)),
            branches: Arc::new(Semaphore::new((max - 1).max(1))),
            idle: Mutex::new(Vec::with_capacity(max)),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Waits (bounded) for the right to a connection.
    pub async fn slot(&self, usage: Use) -> Result<Slot<C>, ResourceError> {
        let take = async {
            let branch = match usage {
                Use::Branch => Some(self.branches.clone().acquire_owned().await),
                Use::Short => None,
            };
            let all = self.all.clone().acquire_owned().await;
            (branch, all)
        };
        let (branch, all) = tokio::time::timeout(self.wait, take)
            .await
            .map_err(|_| self.exhausted(usage))?;
        // The semaphores are never closed.
        let permits = Permits {
            _all: all.expect("the pool's semaphore is never closed"),
            _branch: branch.map(|b| b.expect("the pool's semaphore is never closed")),
        };
        let idle = self.idle.lock().expect("pool lock").pop();
        Ok(Slot { idle, permits })
    }

    fn exhausted(&self, usage: Use) -> ResourceError {
        let held = match usage {
            Use::Branch => format!(
                "{} for open branches, the rest for phase two and recovery",
                (self.max - 1).max(1)
            ),
            Use::Short => "all of them".to_string(),
        };
        ResourceError {
            resource: self.resource.clone(),
            detail: format!(
                "the connection pool is exhausted: its {} connection(s) ({held}) stayed busy for {} s (raise the data source's pool size, or look for transactions that do not end)",
                self.max,
                self.wait.as_secs()
            ),
            not_found: false,
        }
    }

    /// Puts a lease's connection back among the idle ones (then frees its place).
    pub fn give_back(&self, lease: Lease<C>) {
        let Lease { conn, _permits, .. } = lease;
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() < self.max {
            idle.push(conn);
        }
        drop(idle);
        drop(_permits);
    }

    /// Keeps the idle connections `keep` says are usable, closes the others (one was found
    /// dead: the others may be too, e.g. after a database restart).
    pub fn retain_idle(&self, keep: impl FnMut(&C) -> bool) {
        let dropped: Vec<C> = {
            let mut idle = self.idle.lock().expect("pool lock");
            let (kept, dropped) = std::mem::take(&mut *idle).into_iter().partition(keep);
            *idle = kept;
            dropped
        };
        drop(dropped); // outside the lock
    }

    #[cfg(test)]
    pub fn idle_len(&self) -> usize {
        self.idle.lock().expect("pool lock").len()
    }
}

/// What an open branch is fit for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum State {
    Ok,
    /// A statement failed: the branch can only roll back (PostgreSQL has aborted its
    /// transaction; MariaDB's is treated the same so that both behave alike).
    Failed(String),
    /// A statement was cancelled halfway (its future dropped) or the connection broke: the
    /// session's state is unknown, so its connection is closed rather than reused.
    Unclear(String),
}

impl State {
    /// Why a branch in this state cannot `what` (prepare, commit), if it cannot.
    pub fn refusal(&self, resource: &str, what: &str) -> Option<ResourceError> {
        match self {
            State::Ok => None,
            State::Failed(d) | State::Unclear(d) => Some(ResourceError {
                resource: resource.to_string(),
                detail: format!(
                    "{what}: a statement of this branch failed ({d}), so it rolled back"
                ),
                not_found: false,
            }),
        }
    }
}

pub(crate) struct Branch<C> {
    /// None once prepare, commit or rollback took it.
    pub lease: Option<Lease<C>>,
    pub state: State,
}

/// The open branches of one resource, each with its own lock (held across its statements, so
/// branches run concurrently; the map's lock is never held across an await).
pub(crate) struct Branches<C> {
    resource: String,
    map: Mutex<HashMap<Xid, Arc<tokio::sync::Mutex<Branch<C>>>>>,
}

impl<C> Branches<C> {
    pub fn new(resource: &str) -> Branches<C> {
        Branches {
            resource: resource.to_string(),
            map: Mutex::new(HashMap::new()),
        }
    }

    fn no_branch(&self, xid: &Xid) -> ResourceError {
        ResourceError {
            resource: self.resource.clone(),
            detail: format!("no open branch {xid}"),
            not_found: true,
        }
    }

    /// Branch `xid`, locked, if it can take a statement: open, with its connection, and no
    /// earlier statement failed (then it can only roll back).
    pub async fn for_statement(
        &self,
        xid: &Xid,
    ) -> Result<tokio::sync::OwnedMutexGuard<Branch<C>>, ResourceError> {
        let branch = self.get(xid).ok_or_else(|| self.no_branch(xid))?;
        let branch = branch.lock_owned().await;
        match &branch.state {
            State::Ok if branch.lease.is_some() => Ok(branch),
            State::Ok => Err(self.no_branch(xid)),
            State::Failed(d) | State::Unclear(d) => Err(ResourceError {
                resource: self.resource.clone(),
                detail: format!(
                    "statement refused: an earlier statement of this branch failed ({d}); it can only roll back"
                ),
                not_found: false,
            }),
        }
    }

    /// Registers branch `xid` on `lease`; false if it is open already.
    pub fn open(&self, xid: &Xid, lease: Lease<C>) -> Result<(), Lease<C>> {
        let mut map = self.map.lock().expect("branches lock");
        if map.contains_key(xid) {
            return Err(lease);
        }
        map.insert(
            xid.clone(),
            Arc::new(tokio::sync::Mutex::new(Branch {
                lease: Some(lease),
                state: State::Ok,
            })),
        );
        Ok(())
    }

    pub fn get(&self, xid: &Xid) -> Option<Arc<tokio::sync::Mutex<Branch<C>>>> {
        self.map.lock().expect("branches lock").get(xid).cloned()
    }

    /// Ends branch `xid` here: its connection (once a statement running on it finished) and
    /// state; None if it is not open.
    pub async fn take(&self, xid: &Xid) -> Option<(Lease<C>, State)> {
        let b = self.map.lock().expect("branches lock").remove(xid)?;
        let mut b = b.lock().await;
        let state = b.state.clone();
        b.lease.take().map(|l| (l, state))
    }
}

/// Marks a branch `Unclear` while a statement runs on it, so that a statement whose future is
/// dropped halfway leaves a branch whose connection is not reused; `done` sets the outcome.
pub(crate) struct Running<'a, C> {
    branch: &'a mut Branch<C>,
}

impl<'a, C> Running<'a, C> {
    pub fn start(branch: &'a mut Branch<C>) -> Running<'a, C> {
        branch.state = State::Unclear("a statement was cancelled before it finished".into());
        Running { branch }
    }

    pub fn conn(&mut self) -> &mut C {
        &mut self
            .branch
            .lease
            .as_mut()
            .expect("a running branch has its connection")
            .conn
    }

    pub fn done(self, state: State) {
        self.branch.state = state;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounds_reuse_and_reserve_one_connection_beyond_branches() {
        let pool: Pool<u32> = Pool::new("db1", 3, Duration::from_millis(100));
        let a = pool.slot(Use::Branch).await.unwrap();
        assert!(a.idle.is_none());
        let a = a.lease(1);
        let b = pool.slot(Use::Branch).await.unwrap().lease(2);
        // Branches hold 2 of 3: a third branch waits, then fails naming the size.
        let e = pool.slot(Use::Branch).await.err().unwrap();
        assert!(e.detail.contains("exhausted"), "{e}");
        assert!(e.detail.contains("3 connection"), "{e}");
        // Phase two still gets the last one.
        let c = pool.slot(Use::Short).await.unwrap().lease(3);
        assert!(pool.slot(Use::Short).await.is_err());
        pool.give_back(c);
        pool.give_back(a);
        let again = pool.slot(Use::Short).await.unwrap();
        assert_eq!(again.idle, Some(1), "the most recently returned first");
        drop(again); // its idle connection is closed with it
        assert_eq!(pool.idle_len(), 1);
        drop(b); // closed, not kept
        assert_eq!(pool.idle_len(), 1);
        pool.retain_idle(|c| *c != 3);
        assert_eq!(pool.idle_len(), 0);
    }

    #[tokio::test]
    async fn a_waiter_gets_the_connection_given_back() {
        let pool: Arc<Pool<u32>> = Arc::new(Pool::new("db1", 1, Duration::from_secs(5)));
        let a = pool.slot(Use::Branch).await.unwrap().lease(7);
        let p = pool.clone();
        let waiter = tokio::spawn(async move { p.slot(Use::Short).await.map(|s| s.idle) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        pool.give_back(a);
        assert_eq!(waiter.await.unwrap().unwrap(), Some(7));
    }
}

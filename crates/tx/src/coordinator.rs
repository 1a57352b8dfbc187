//! Two-phase commit over XA-style resources (DESIGN §6), with presumed abort.
//!
//! - One resource (or one left after read-only votes): one-phase commit, no log write.
//! - Several: prepare all (concurrently); any refusal or failure rolls every branch back and
//!   nothing is logged (presumed abort: a prepared branch without a commit record is rolled
//!   back by recovery). All prepared: the commit decision is put in the tranlog and *forced*
//!   (group commit with every transaction deciding at the same moment), then each branch is
//!   committed, then the record is removed (not forced: a record left behind only makes
//!   recovery commit a branch again, which a resource answers as "not found").
//! - Recovery ([`Coordinator::recover`]): every resource is asked for its prepared branches of
//!   this coordinator (Keel's format ID and this server's recovery identity); those with a
//!   commit record are committed, the rest rolled back; a decision whose branches are all done
//!   leaves the log.
//!
//! XIDs: format ID [`KEEL_FORMAT_ID`]; global id = recovery identity, the coordinator's
//! incarnation (Unix ms at its start: unique across restarts) and a sequence number; branch
//! qualifier = the branch's index. So recovery only ever touches its own branches.
//!
//! What recovery relies on:
//! - the tranlog keys decisions by transaction number, and a new coordinator numbers above
//!   every live record ([`Coordinator::reserve_ids_above`]), so an earlier run's decision is
//!   never overwritten;
//! - `recover_pass` leaves this incarnation's branches alone (a background pass must not roll
//!   back a branch prepared a moment ago), except those of its own *pending* decisions (a
//!   phase two that did not reach a branch, `TxError::CommitPending`), which the next pass
//!   finishes, and of its *unresolved* transactions (a rollback a branch did not confirm, or
//!   the last voter's failed commit: prepared with no decision), which the next pass rolls back;
//! - a forced decision write that fails leaves the branches prepared: the record may be on disk
//!   all the same, the failed log refuses further writes, and the next start decides from what
//!   the log holds;
//! - recovery runs phase twos `RECOVERY_CONCURRENCY` (32) at a time per resource, so the
//!   database shares its log flushes; a `PREPARE` a crashed process had sent can complete at
//!   the database after a pass, so callers repeat passes (the server's `TxService::recover`).
//!
//! Fault points: `tx.after_prepare`, `tx.after_decision`, `tx.mid_commit`.
//!
//! Resources are the server's business: its messaging engines and the SQL data sources of
//! [`crate::pg`] and [`crate::mariadb`]; the partnerlog naming them is kept by the server
//! (keel-server `txsvc`). Deliberately absent so far: transaction timeouts in the coordinator
//! (an application bounds its handler with its `timeout_s`), heuristic outcomes *reported by a
//! resource* (PostgreSQL and MariaDB have none to report; an operator's resolution by hand is
//! the heuristic case, `WTRN0006W`), and peer recovery.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::log::{LogError, Op, RecoveryLog};

/// "KEEL".
pub const KEEL_FORMAT_ID: i32 = 0x4B45_454C;
/// Phase twos recovery runs at once per resource.
pub const RECOVERY_CONCURRENCY: usize = 32;
/// Longest recovery identity (XA allows 64 bytes of global id; 16 go to the numbers).
pub const RECOVERY_ID_BYTES_MAX: usize = 48;

/// An XA transaction branch identifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Xid {
    pub format_id: i32,
    pub gtrid: Vec<u8>,
    pub bqual: Vec<u8>,
}

impl Xid {
    /// The (incarnation, sequence) of a Keel XID of recovery identity `recovery_id`, if it is one.
    pub fn keel_tx(&self, recovery_id: &str) -> Option<(u64, u64)> {
        if self.format_id != KEEL_FORMAT_ID {
            return None;
        }
        let rest = self.gtrid.strip_prefix(recovery_id.as_bytes())?;
        let rest: [u8; 16] = rest.try_into().ok()?;
        Some((
            u64::from_be_bytes(rest[..8].try_into().expect("8 bytes")),
            u64::from_be_bytes(rest[8..].try_into().expect("8 bytes")),
        ))
    }
}

impl std::str::FromStr for Xid {
    type Err = String;

    /// The form `Display` writes: `<format id, 8 hex>:<gtrid hex>:<bqual hex>`.
    fn from_str(s: &str) -> Result<Xid, String> {
        let bad = || {
            format!(
                "`{s}` is not a transaction id: give it as `keel tx list` shows it (FORMAT:GTRID:BQUAL in hex)"
            )
        };
        let mut parts = s.split(':');
        let (Some(f), Some(g), Some(b), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if f.len() != 8 || g.is_empty() || g.len() > 128 || b.len() > 128 {
            return Err(bad());
        }
        Ok(Xid {
            format_id: u32::from_str_radix(f, 16).map_err(|_| bad())? as i32,
            gtrid: keel_core::hex::decode(g).ok_or_else(bad)?,
            bqual: keel_core::hex::decode(b).ok_or_else(bad)?,
        })
    }
}

impl std::fmt::Display for Xid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:08x}:{}:{}",
            self.format_id,
            keel_core::hex::encode(&self.gtrid),
            keel_core::hex::encode(&self.bqual)
        )
    }
}

/// A branch's answer to prepare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vote {
    /// Prepared: it will commit or roll back as told, even after a crash.
    Commit,
    /// Nothing to commit: the branch is finished and takes no part in phase two.
    ReadOnly,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("resource {resource}: {detail}")]
pub struct ResourceError {
    pub resource: String,
    pub detail: String,
    /// The branch is unknown to the resource (already committed or rolled back).
    pub not_found: bool,
}

pub type ResourceFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, ResourceError>> + Send + 'a>>;

/// An XA-style resource: a database or a messaging engine taking part in transactions.
pub trait Resource: Send + Sync {
    /// Its configuration name (what the partnerlog and messages name; never a password).
    fn name(&self) -> &str;
    fn prepare<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, Vote>;
    /// `one_phase`: no prepare came first (the only branch).
    fn commit<'a>(&'a self, xid: &'a Xid, one_phase: bool) -> ResourceFuture<'a, ()>;
    fn rollback<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, ()>;
    /// Its prepared branches (of every coordinator: the caller picks its own).
    fn recover(&self) -> ResourceFuture<'_, Vec<Xid>>;
}

#[derive(Debug, thiserror::Error)]
pub enum TxError {
    #[error("transaction {xid} rolled back: {cause}")]
    RolledBack { xid: String, cause: String },
    #[error(
        "transaction {xid}: the commit decision could not be logged, so it rolled back: {source}"
    )]
    Log {
        xid: String,
        #[source]
        source: LogError,
    },
    #[error("transaction {xid} committed, but {pending} branch(es) could not be told yet ({cause}); recovery commits them")]
    CommitPending {
        xid: String,
        pending: usize,
        cause: String,
    },
}

/// A decided transaction's branches: (resource name, branch XID).
pub type Branches = Vec<(String, Xid)>;

/// What the tranlog holds for a decided transaction: its branches by resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Decision {
    branches: Vec<(String, Xid)>,
}

/// One global transaction: its branches, one per resource enlisted.
pub struct Transaction {
    gtrid: Vec<u8>,
    id: u64,
    branches: Vec<(Arc<dyn Resource>, Xid)>,
}

impl Transaction {
    /// Enlists `resource`; returns the XID its branch must use.
    pub fn enlist(&mut self, resource: Arc<dyn Resource>) -> Xid {
        let xid = Xid {
            format_id: KEEL_FORMAT_ID,
            gtrid: self.gtrid.clone(),
            bqual: (self.branches.len() as u32).to_be_bytes().to_vec(),
        };
        self.branches.push((resource, xid.clone()));
        xid
    }

    /// Takes back the branch `xid` enlisted last, when its resource could not even open it
    /// (a connect failed): there is nothing there to prepare or roll back.
    pub fn unenlist(&mut self, xid: &Xid) {
        if self.branches.last().is_some_and(|(_, x)| x == xid) {
            self.branches.pop();
        }
    }

    /// The global id, for messages.
    pub fn name(&self) -> String {
        Xid {
            format_id: KEEL_FORMAT_ID,
            gtrid: self.gtrid.clone(),
            bqual: Vec::new(),
        }
        .to_string()
    }
}

/// The transaction coordinator of one server.
pub struct Coordinator {
    recovery_id: String,
    incarnation: u64,
    next: AtomicU64,
    log: RecoveryLog,
    /// Decisions of this incarnation whose phase two did not reach every branch
    /// (`TxError::CommitPending`): the next recovery pass finishes them.
    pending: std::sync::Mutex<std::collections::BTreeMap<u64, Vec<u8>>>,
    /// Global ids of this incarnation's transactions that rolled back without every branch
    /// confirming it (a resource failed to answer): the next recovery pass rolls back what is
    /// still prepared of them (presumed abort, as for an earlier run's). Bounded: beyond
    /// `UNRESOLVED_MAX` a restart's recovery finishes them.
    unresolved: std::sync::Mutex<std::collections::HashSet<Vec<u8>>>,
}

/// This incarnation's unconfirmed rollbacks remembered for recovery passes.
pub const UNRESOLVED_MAX: usize = 65_536;

/// What recovery did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub committed: usize,
    pub rolled_back: usize,
    /// Decisions still waiting for an unreachable resource.
    pub pending: usize,
    /// The global transaction ids (gtrids) the committed and rolled-back branches belong to:
    /// operators count transactions, and one transaction has a branch per resource.
    pub transactions: std::collections::BTreeSet<Vec<u8>>,
}

impl Coordinator {
    /// `recovery_id`: this server's identity in XIDs (e.g. `cell/node/server`); `incarnation`:
    /// at least the previous start's (Unix ms is what servers use).
    pub fn new(recovery_id: &str, incarnation: u64, log: RecoveryLog) -> Coordinator {
        assert!(
            !recovery_id.is_empty() && recovery_id.len() <= RECOVERY_ID_BYTES_MAX,
            "a recovery identity of 1 to {RECOVERY_ID_BYTES_MAX} bytes"
        );
        Coordinator {
            recovery_id: recovery_id.to_string(),
            incarnation,
            next: AtomicU64::new(1),
            log,
            pending: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            unresolved: std::sync::Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// This coordinator's incarnation (the XIDs of its transactions carry it).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    pub fn recovery_id(&self) -> &str {
        &self.recovery_id
    }

    /// Makes this coordinator's transaction numbers start above `max`: the tranlog keys
    /// decisions by transaction number, and an earlier incarnation's decision still in the log
    /// must never be overwritten (or removed) by a new transaction of the same number.
    pub fn reserve_ids_above(&self, max: u64) {
        self.next
            .fetch_max(max.saturating_add(1), Ordering::Relaxed);
    }

    /// The decisions of a tranlog's live records: transaction number → branches by resource.
    pub fn decisions(
        &self,
        live: &std::collections::BTreeMap<u64, Vec<u8>>,
    ) -> Result<Vec<(u64, Branches)>, LogError> {
        live.iter()
            .map(|(id, data)| {
                postcard::from_bytes::<Decision>(data)
                    .map(|d| (*id, d.branches))
                    .map_err(|e| LogError::BadRecord {
                        dir: self.log.dir().to_path_buf(),
                        id: *id,
                        detail: e.to_string(),
                    })
            })
            .collect()
    }

    /// Whether `xid` belongs to an earlier incarnation of this coordinator: recovery's to
    /// resolve. (This incarnation's branches belong to transactions still running here: a
    /// background recovery pass must never roll back a branch prepared a moment ago.)
    pub fn is_recoverable(&self, xid: &Xid) -> bool {
        matches!(xid.keel_tx(&self.recovery_id), Some((inc, _)) if inc != self.incarnation)
    }

    /// Moves this incarnation's pending decisions into `live` (what `recover_pass` does first),
    /// for a listing or a resolution by hand.
    pub fn merge_pending(&self, live: &mut std::collections::BTreeMap<u64, Vec<u8>>) {
        live.append(&mut self.pending.lock().expect("pending lock"));
    }

    /// Closes the tranlog (see `RecoveryLog::close`); returns the live records it holds.
    pub async fn close_log(&self) -> Result<usize, LogError> {
        self.log.close().await
    }

    /// Whether some decision or unconfirmed rollback of this incarnation waits for a recovery
    /// pass.
    pub fn has_pending(&self) -> bool {
        !self.pending.lock().expect("pending lock").is_empty()
            || !self.unresolved.lock().expect("unresolved lock").is_empty()
    }

    /// Removes decision `id` from the tranlog (forced): an operator resolved it by hand.
    pub async fn forget(&self, id: u64) -> Result<(), LogError> {
        self.log.write(vec![Op::Remove { id }], true).await
    }

    pub fn begin(&self) -> Transaction {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut gtrid = self.recovery_id.as_bytes().to_vec();
        gtrid.extend_from_slice(&self.incarnation.to_be_bytes());
        gtrid.extend_from_slice(&id.to_be_bytes());
        Transaction {
            gtrid,
            id,
            branches: Vec::new(),
        }
    }

    /// Commits `tx` (see the module docs).
    pub async fn commit(&self, tx: Transaction) -> Result<(), TxError> {
        let name = tx.name();
        match tx.branches.len() {
            0 => return Ok(()),
            1 => {
                let (r, xid) = &tx.branches[0];
                return r.commit(xid, true).await.map_err(|e| TxError::RolledBack {
                    xid: name,
                    cause: e.to_string(),
                });
            }
            _ => {}
        }
        let votes = futures_join(tx.branches.iter().map(|(r, xid)| r.prepare(xid))).await;
        if let Some(e) = votes.iter().find_map(|v| v.as_ref().err()) {
            let cause = e.to_string();
            self.rollback_all(&tx, &votes).await;
            return Err(TxError::RolledBack { xid: name, cause });
        }
        let voters: Vec<&(Arc<dyn Resource>, Xid)> = tx
            .branches
            .iter()
            .zip(&votes)
            .filter(|(_, v)| matches!(v, Ok(Vote::Commit)))
            .map(|(b, _)| b)
            .collect();
        match voters.len() {
            0 => return Ok(()),
            // The only voter left: its commit is the decision; a crash before it is a rollback
            // nobody was told otherwise of.
            1 => {
                let (r, xid) = voters[0];
                return match r.commit(xid, false).await {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        // Prepared, no decision: a rollback whenever it answers again.
                        if !e.not_found {
                            self.unresolved(&tx.gtrid);
                        }
                        Err(TxError::RolledBack {
                            xid: name,
                            cause: e.to_string(),
                        })
                    }
                };
            }
            _ => {}
        }
        keel_core::faults::hit("tx.after_prepare");
        let decision = Decision {
            branches: voters
                .iter()
                .map(|(r, xid)| (r.name().to_string(), xid.clone()))
                .collect(),
        };
        let data = postcard::to_stdvec(&decision).expect("decisions encode");
        // Both sides of the log boundary: a logged decision names every voter (two or more:
        // one voter commits in one phase with no record) and reads back as what was decided,
        // because recovery will act on the bytes, not on this value.
        assert!(decision.branches.len() == voters.len() && voters.len() >= 2);
        assert_eq!(
            postcard::from_bytes::<Decision>(&data).ok().as_ref(),
            Some(&decision),
            "a decision record reads back as written"
        );
        if let Err(source) = self
            .log
            .write(
                vec![Op::Put {
                    id: tx.id,
                    data: data.clone(),
                }],
                true,
            )
            .await
        {
            // The record may be on disk all the same (a write that succeeded before a failed
            // fdatasync): rolling back now could contradict it after a restart. The branches
            // stay prepared; the failed log refuses further writes, and the next start's
            // recovery decides from what the log really holds.
            return Err(TxError::Log { xid: name, source });
        }
        keel_core::faults::hit("tx.after_decision");
        let mut failed = Vec::new();
        for (i, (r, xid)) in voters.iter().enumerate() {
            if i > 0 {
                keel_core::faults::hit("tx.mid_commit");
            }
            if let Err(e) = r.commit(xid, false).await {
                if !e.not_found {
                    failed.push(e);
                }
            }
        }
        if let Some(e) = failed.first() {
            // The decision stays logged: the next recovery pass finishes the branches.
            self.pending
                .lock()
                .expect("pending lock")
                .insert(tx.id, data);
            return Err(TxError::CommitPending {
                xid: name,
                pending: failed.len(),
                cause: e.to_string(),
            });
        }
        // Not forced: a record left by a crash only makes recovery commit again.
        let _ = self.log.write(vec![Op::Remove { id: tx.id }], false).await;
        Ok(())
    }

    /// Rolls back `tx` (nothing was logged for it).
    pub async fn rollback(&self, tx: Transaction) -> Result<(), TxError> {
        let name = tx.name();
        let results = futures_join(tx.branches.iter().map(|(r, xid)| r.rollback(xid))).await;
        match results.into_iter().find_map(Result::err) {
            Some(e) if !e.not_found => {
                self.unresolved(&tx.gtrid);
                Err(TxError::RolledBack {
                    xid: name,
                    cause: format!(
                        "a branch did not confirm its rollback ({e}); recovery rolls it back"
                    ),
                })
            }
            _ => Ok(()),
        }
    }

    fn unresolved(&self, gtrid: &[u8]) {
        let mut u = self.unresolved.lock().expect("unresolved lock");
        if u.len() < UNRESOLVED_MAX {
            u.insert(gtrid.to_vec());
        }
    }

    /// Whether `xid` belongs to a transaction of this incarnation that rolled back without
    /// every branch confirming.
    pub fn is_unresolved(&self, xid: &Xid) -> bool {
        self.unresolved
            .lock()
            .expect("unresolved lock")
            .contains(&xid.gtrid)
    }

    /// Logs (forced) a commit decision an operator took for `branches`, as a pending decision:
    /// the next recovery pass commits whatever of it is still prepared. Returns its record id.
    pub async fn decide_by_hand(&self, branches: Branches) -> Result<u64, LogError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let data = postcard::to_stdvec(&Decision { branches }).expect("decisions encode");
        self.log
            .write(
                vec![Op::Put {
                    id,
                    data: data.clone(),
                }],
                true,
            )
            .await?;
        self.pending.lock().expect("pending lock").insert(id, data);
        Ok(id)
    }

    /// Records that an operator rolled back transaction `gtrid` by hand: whatever of it is
    /// still prepared is rolled back by the next recovery pass.
    pub fn rolled_back_by_hand(&self, gtrid: &[u8]) {
        self.unresolved(gtrid);
    }

    async fn rollback_all(&self, tx: &Transaction, votes: &[Result<Vote, ResourceError>]) {
        let to_undo = tx
            .branches
            .iter()
            .zip(votes)
            .filter(|(_, v)| !matches!(v, Ok(Vote::ReadOnly)))
            .map(|((r, xid), _)| r.rollback(xid));
        // A branch that does not answer stays prepared; recovery rolls it back (no record).
        let results = futures_join(to_undo).await;
        if results
            .iter()
            .any(|r| r.as_ref().is_err_and(|e| !e.not_found))
        {
            self.unresolved(&tx.gtrid);
        }
    }

    /// Finishes what the log and `resources` hold in doubt for this coordinator's recovery
    /// identity: logged decisions committed, other prepared branches rolled back. `live`: the
    /// tranlog's records as read when it was opened.
    pub async fn recover(
        &self,
        live: &std::collections::BTreeMap<u64, Vec<u8>>,
        resources: &[Arc<dyn Resource>],
    ) -> Result<Recovered, LogError> {
        let mut live = live.clone();
        self.recover_pass(&mut live, resources).await
    }

    /// One recovery pass (see [`Coordinator::recover`]); decisions it finished leave `live`,
    /// so passes can repeat (a PREPARE in flight at a crash can complete after a pass).
    /// Branches of this incarnation are left alone, except those of its pending decisions.
    pub async fn recover_pass(
        &self,
        live: &mut std::collections::BTreeMap<u64, Vec<u8>>,
        resources: &[Arc<dyn Resource>],
    ) -> Result<Recovered, LogError> {
        self.merge_pending(live);
        let mut out = Recovered::default();
        let mut decisions: Vec<(u64, Decision)> = Vec::new();
        for (id, data) in live.iter() {
            let d: Decision = postcard::from_bytes(data).map_err(|e| LogError::BadRecord {
                dir: self.log.dir().to_path_buf(),
                id: *id,
                detail: e.to_string(),
            })?;
            decisions.push((*id, d));
        }
        let committed: std::collections::HashSet<&Xid> = decisions
            .iter()
            .flat_map(|(_, d)| d.branches.iter().map(|(_, x)| x))
            .collect();
        let mut unreachable = std::collections::HashSet::new();
        let mut answered = std::collections::HashSet::new();
        // This pass finishes the unconfirmed rollbacks known now (one added meanwhile waits
        // for the next pass).
        let unresolved_now: Vec<Vec<u8>> = self
            .unresolved
            .lock()
            .expect("unresolved lock")
            .iter()
            .cloned()
            .collect();
        for r in resources {
            let prepared = match r.recover().await {
                Ok(p) => p,
                Err(_) => {
                    unreachable.insert(r.name().to_string());
                    continue;
                }
            };
            answered.insert(r.name().to_string());
            let mut actions = Vec::new();
            for xid in prepared {
                if committed.contains(&xid) {
                    actions.push((xid, true));
                } else if self.is_recoverable(&xid) || self.is_unresolved(&xid) {
                    actions.push((xid, false));
                } // else another coordinator's, or running in this incarnation
            }
            // Bounded concurrency: a database commits concurrent phase twos with shared log
            // flushes, where one at a time pays a flush each (10 000 in doubt would take
            // minutes).
            for chunk in actions.chunks(RECOVERY_CONCURRENCY) {
                let results = futures_join(chunk.iter().map(|(xid, commit)| {
                    if *commit {
                        r.commit(xid, false)
                    } else {
                        r.rollback(xid)
                    }
                }))
                .await;
                for ((xid, commit), r2) in chunk.iter().zip(results) {
                    out.transactions.insert(xid.gtrid.clone());
                    if *commit {
                        out.committed += 1;
                    } else {
                        out.rolled_back += 1;
                    }
                    if let Err(e) = r2 {
                        if !e.not_found {
                            unreachable.insert(r.name().to_string());
                        }
                    }
                }
            }
        }
        // Decisions whose resources all answered (and took their outcome) are done; one whose
        // resource was not asked at all (not configured now) stays, for an operator to see.
        let mut done = Vec::new();
        for (id, d) in &decisions {
            if d.branches
                .iter()
                .any(|(name, _)| unreachable.contains(name) || !answered.contains(name))
            {
                out.pending += 1;
            } else {
                done.push(Op::Remove { id: *id });
            }
        }
        if !done.is_empty() {
            self.log.write(done.clone(), true).await?;
            for op in done {
                if let Op::Remove { id } = op {
                    live.remove(&id);
                }
            }
        }
        if unreachable.is_empty() && answered.len() == resources.len() {
            let mut u = self.unresolved.lock().expect("unresolved lock");
            for g in &unresolved_now {
                u.remove(g);
            }
        } else {
            out.pending += unresolved_now.len();
        }
        Ok(out)
    }
}

/// Runs futures concurrently and returns their outputs in order.
async fn futures_join<T, F: Future<Output = T>>(futs: impl IntoIterator<Item = F>) -> Vec<T> {
    let mut set: Vec<Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<T>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.expect("every future finished"))
        .collect()
}

#[cfg(test)]
mod tests;

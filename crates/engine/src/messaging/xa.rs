//! The engine as an XA resource (DESIGN §6): a local [`Transaction`] prepared under a global
//! transaction's branch id, then committed or rolled back by the transaction service, also after
//! a crash of this process.
//!
//! Prepare makes the branch durable in one store commit, without making anything visible:
//! - each persistent send is stored on the branch's hidden destination `_TX:<branch>` (not a
//!   queue point: no consumer or refill ever reads it);
//! - each persistent message the branch settled moves there too (`Op::Move` keeps its seq), so
//!   a restart does not deliver it again while the branch is in doubt;
//! - the *prepared record* (space `tx.prepared`, key = the branch id) says where each row
//!   goes on commit: sends to their destination, settled messages back to their queue with
//!   the settle's outcome applied.
//!
//! An empty branch votes read-only. A branch whose phase two would not fit one store batch (up
//! to three ops per settled message, `keel_store::BATCH_OPS_MAX`) is refused at prepare, while
//! it can still roll back. A failed prepare releases the branch's deliveries, as a failed
//! one-phase commit does (`Messaging::commit_or_release`).
//!
//! Commit and rollback are one store commit each: every row leaves `_TX:<branch>` (to its
//! destination, back to its queue, to the exception destination, or deleted) and the record is
//! deleted in the same batch, so a branch is resolved exactly once; an id with no record is
//! "not found" (resolved already), which is what a repeated phase two gets. Rollback counts one
//! failed delivery on each message the branch had settled, like a local rollback.
//!
//! In memory, a branch prepared by this run keeps its `Transaction` (its deliveries stay
//! claimed: nothing hands them out while in doubt) and resolves like a local commit. A branch
//! found in the store at start (prepared by an earlier run) has nothing in memory: its rows are
//! only in `_TX:<branch>`, and resolving it makes the affected queues read their store again.
//!
//! Non-persistent sends and settles of non-persistent messages are kept in memory only (a
//! crash loses them, as it loses every non-persistent message).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use keel_store::Op;
use serde::{Deserialize, Serialize};

use super::{entry_of, Messaging, MessagingError, Outcome, Transaction, TX_WORK_MAX};

/// Store key-value space of prepared records.
pub const PREPARED_KV: &str = "tx.prepared";
/// Prefix of a prepared branch's hidden destination (`:` never appears in configured names).
pub const PREPARED_DEST_PREFIX: &str = "_TX:";
/// Longest branch id (the XID as text: 8 + 2 × (64 + 64) hex digits and two colons fit).
pub const BRANCH_ID_BYTES_MAX: usize = 300;

/// What a branch's commit found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    Done,
    /// No such prepared branch: resolved before (or never prepared here).
    NotFound,
}

/// The durable description of a prepared branch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct PreparedRecord {
    /// The destination of each persistent send, in the order of their rows' seqs in
    /// `_TX:<branch>` (the store assigns seqs in op order; the record is written in the same
    /// batch as the rows, so it cannot name their seqs).
    sends: Vec<String>,
    /// Seq → (queue it came from, outcome code), for each persistent message settled.
    settles: Vec<(u64, String, u8)>,
}

fn outcome_code(o: Outcome) -> u8 {
    match o {
        Outcome::Accepted => 0,
        Outcome::Released => 1,
        Outcome::Failed => 2,
        Outcome::Rejected => 3,
    }
}

fn outcome_of(code: u8) -> Option<Outcome> {
    Some(match code {
        0 => Outcome::Accepted,
        1 => Outcome::Released,
        2 => Outcome::Failed,
        3 => Outcome::Rejected,
        _ => return None,
    })
}

/// Destinations of the persistent sends of `tx`, in op order.
fn record_sends(tx: &Transaction) -> Vec<String> {
    tx.sends
        .iter()
        .filter(|s| s.prepared.reliability.is_persistent())
        .map(|s| s.q.cfg.name.clone())
        .collect()
}

/// A branch prepared by this run, with its work in memory.
pub(super) struct PreparedBranch {
    tx: Transaction,
    /// Seq in `_TX:<branch>` of each persistent send, in `tx.sends` order (None: non-persistent).
    send_seqs: Vec<Option<u64>>,
}

/// The prepared branches of this run (see the module docs).
#[derive(Default)]
pub(super) struct Branches {
    live: std::sync::Mutex<HashMap<String, PreparedBranch>>,
    /// Serialises resolving branches found in the store, so two resolutions of one id (a
    /// recovery pass and an operator) never both read its record.
    stored: tokio::sync::Mutex<()>,
}

fn check_id(id: &str) -> Result<(), MessagingError> {
    if id.is_empty() || id.len() > BRANCH_ID_BYTES_MAX || id.contains(char::is_whitespace) {
        return Err(MessagingError::Relayed(format!(
            "`{id}` is not a transaction branch id (1 to {BRANCH_ID_BYTES_MAX} characters, no spaces)"
        )));
    }
    Ok(())
}

impl Messaging {
    fn prepared_dest(id: &str) -> String {
        format!("{PREPARED_DEST_PREFIX}{id}")
    }

    /// Phase one: makes `tx` durable as branch `id` (see the module docs). Returns false for a
    /// read-only branch (no work: it is finished and takes no part in phase two).
    pub async fn xa_prepare(&self, mut tx: Transaction, id: &str) -> Result<bool, MessagingError> {
        self.check_open()?;
        check_id(id)?;
        assert!(!tx.done, "a finished transaction is not prepared");
        if tx.is_empty() {
            tx.done = true;
            return Ok(false);
        }
        if self.xa.live.lock().expect("branches lock").contains_key(id) {
            return Err(MessagingError::Relayed(format!(
                "transaction branch {id} is prepared already on messaging engine {}",
                self.me
            )));
        }
        // Phase two needs up to three ops per settled message (move back, count, move on)
        // and one per send: a branch whose phase two could not be one store batch is refused
        // now, while it can still roll back, never after it was prepared.
        let persistent_settles = tx.settles.iter().filter(|(_, e, _)| e.persistent).count();
        let phase_two_ops = record_sends(&tx).len() + 3 * persistent_settles + 1;
        if phase_two_ops > keel_store::BATCH_OPS_MAX {
            return Err(MessagingError::TransactionTooLarge {
                max: (keel_store::BATCH_OPS_MAX - 1) / 3,
            });
        }
        let pdest = Self::prepared_dest(id);
        let mut ops = Vec::new();
        let mut record = PreparedRecord {
            sends: Vec::new(),
            settles: Vec::new(),
        };
        for s in tx
            .sends
            .iter()
            .filter(|s| s.prepared.reliability.is_persistent())
        {
            let p = &s.prepared;
            ops.push(Op::Put {
                dest: pdest.clone(),
                id: String::new(),
                priority: p.priority,
                reliability: p.code,
                expiry_ms: p.expiry_ms,
                properties: p.properties.clone(),
                body: s.body.clone(),
                stream: None,
            });
        }
        for (q, e, plan) in &tx.settles {
            if e.persistent {
                ops.push(Op::Move {
                    from: q.cfg.name.clone(),
                    seq: e.seq,
                    to: pdest.clone(),
                });
                record
                    .settles
                    .push((e.seq, q.cfg.name.clone(), outcome_code(plan.outcome)));
            }
        }
        let persistent_sends = record_sends(&tx);
        record.sends = persistent_sends.clone();
        ops.push(Op::SetKv {
            space: PREPARED_KV.into(),
            key: id.into(),
            value: serde_json::to_vec(&record).expect("a prepared record serializes"),
        });
        assert!(ops.len() <= 2 * TX_WORK_MAX + 1, "a transaction is bounded");
        // From here the branch may be durable even if this future is dropped: its deliveries
        // must stay claimed (see `Drop for Transaction`).
        tx.done = true;
        let out = match self.store.commit(ops).await {
            Ok(out) => out,
            Err(err) => {
                // Not prepared: the branch rolled back, so its deliveries are available again
                // (unchanged: nothing reached the store). Unlike a local commit, no client
                // holds them to settle again.
                for (q, e, _) in tx.settles.drain(..) {
                    let mut st = q.state.lock().expect("queue lock");
                    st.release(e);
                    drop(st);
                    q.notify.notify_one();
                }
                return Err(err.into());
            }
        };
        assert_eq!(
            out.assigned_seqs.len(),
            persistent_sends.len(),
            "one seq per prepared send"
        );
        let send_seqs = super::seqs_per_send(&tx.sends, out.assigned_seqs);
        self.xa
            .live
            .lock()
            .expect("branches lock")
            .insert(id.to_string(), PreparedBranch { tx, send_seqs });
        Ok(true)
    }

    /// The ids of every branch prepared in this engine's store and not resolved yet (this
    /// run's and earlier runs').
    pub async fn xa_recover(&self) -> Result<Vec<String>, MessagingError> {
        self.check_open()?;
        Ok(self
            .store
            .kv_scan(PREPARED_KV)
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    /// Phase two, commit.
    pub async fn xa_commit(&self, id: &str) -> Result<Resolved, MessagingError> {
        self.resolve(id, true).await
    }

    /// Phase two, rollback (also of a branch prepared by an earlier run).
    pub async fn xa_rollback(&self, id: &str) -> Result<Resolved, MessagingError> {
        self.resolve(id, false).await
    }

    async fn resolve(&self, id: &str, commit: bool) -> Result<Resolved, MessagingError> {
        self.check_open()?;
        check_id(id)?;
        let live = self.xa.live.lock().expect("branches lock").remove(id);
        match live {
            Some(b) => self.resolve_live(id, b, commit).await,
            None => {
                let _one = self.xa.stored.lock().await;
                self.resolve_stored(id, commit).await
            }
        }
    }

    /// A branch this run prepared: one store commit, then the in-memory change of a local
    /// commit or rollback.
    async fn resolve_live(
        &self,
        id: &str,
        mut b: PreparedBranch,
        commit: bool,
    ) -> Result<Resolved, MessagingError> {
        let pdest = Self::prepared_dest(id);
        let (items, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut b.tx.settles)
            .into_iter()
            .map(|(q, e, plan)| ((q, e), plan))
            .unzip();
        // A rollback counts one failed delivery on each message, like a local rollback.
        let failed: Vec<super::SettlePlan> = if commit {
            Vec::new()
        } else {
            items
                .iter()
                .map(|(q, e)| self.settle_plan(q, e, Outcome::Failed))
                .collect()
        };
        let plans = if commit { &kept } else { &failed };
        let mut ops = Vec::new();
        for ((q, e), plan) in items.iter().zip(plans) {
            if e.persistent {
                ops.push(Op::Move {
                    from: pdest.clone(),
                    seq: e.seq,
                    to: q.cfg.name.clone(),
                });
            }
            ops.extend(plan.ops.iter().cloned());
        }
        for (s, seq) in b.tx.sends.iter().zip(&b.send_seqs) {
            if let Some(seq) = seq {
                ops.push(if commit {
                    Op::Move {
                        from: pdest.clone(),
                        seq: *seq,
                        to: s.q.cfg.name.clone(),
                    }
                } else {
                    Op::Delete {
                        dest: pdest.clone(),
                        seq: *seq,
                    }
                });
            }
        }
        ops.push(Op::DeleteKv {
            space: PREPARED_KV.into(),
            key: id.into(),
        });
        let marks: Vec<super::RefillMark> =
            b.tx.sends
                .iter()
                .map(|s| s.q.state.lock().expect("queue lock").refill_mark())
                .collect();
        let pending = super::OffersPending {
            queues: if commit {
                b.tx.sends.iter().map(|s| s.q.clone()).collect()
            } else {
                Vec::new()
            },
        };
        if let Err(err) = self.store.commit(ops).await {
            pending.done();
            // Still prepared, durably and in memory: phase two can be tried again.
            b.tx.settles = items
                .into_iter()
                .zip(kept)
                .map(|((q, e), plan)| (q, e, plan))
                .collect();
            self.xa
                .live
                .lock()
                .expect("branches lock")
                .insert(id.to_string(), b);
            return Err(err.into());
        }
        keel_core::faults::hit("me.after_store_commit");
        if commit {
            self.offer_sent(
                std::mem::take(&mut b.tx.sends),
                b.send_seqs.iter().copied(),
                marks,
            );
        }
        pending.done();
        for ((q, e), plan) in items.into_iter().zip(plans) {
            self.settle_apply(&q, e, plan)?;
        }
        Ok(Resolved::Done)
    }

    /// A branch an earlier run prepared: its rows are only in `_TX:<branch>`.
    async fn resolve_stored(&self, id: &str, commit: bool) -> Result<Resolved, MessagingError> {
        let Some(value) = self.store.kv_get(PREPARED_KV, id).await? else {
            return Ok(Resolved::NotFound);
        };
        let record: PreparedRecord = serde_json::from_slice(&value).map_err(|e| {
            MessagingError::Relayed(format!(
                "the prepared record of transaction branch {id} in the data store of messaging engine {} does not decode ({e}); the branch stays prepared: restore the data store from a backup or report this",
                self.me
            ))
        })?;
        let pdest = Self::prepared_dest(id);
        let rows = self
            .store
            .page(&pdest, None, keel_store::PAGE_LIMIT_MAX)
            .await?;
        let rows: HashMap<u64, keel_store::StoredMessage> =
            rows.into_iter().map(|m| (m.seq, m)).collect();
        // Sends are named by position: rows that are not settled messages, in seq order.
        let settled: std::collections::HashSet<u64> =
            record.settles.iter().map(|(s, _, _)| *s).collect();
        let mut send_rows: Vec<u64> = rows
            .keys()
            .copied()
            .filter(|s| !settled.contains(s))
            .collect();
        send_rows.sort_unstable();
        if send_rows.len() != record.sends.len() || settled.iter().any(|s| !rows.contains_key(s)) {
            return Err(MessagingError::Relayed(format!(
                "transaction branch {id} on messaging engine {}: its record names {} sends and {} settled messages but the data store holds {} of its rows; the branch stays prepared: report this",
                self.me,
                record.sends.len(),
                record.settles.len(),
                rows.len()
            )));
        }
        let mut ops = Vec::new();
        let mut touched: Vec<Arc<super::QueuePoint>> = Vec::new();
        let mut depth_up: Vec<Arc<super::QueuePoint>> = Vec::new();
        for (seq, origin, code) in &record.settles {
            let outcome = if commit {
                outcome_of(*code).unwrap_or(Outcome::Released)
            } else {
                Outcome::Failed
            };
            let e = entry_of(rows[seq].clone());
            match self.queue(origin) {
                Ok(q) => {
                    ops.push(Op::Move {
                        from: pdest.clone(),
                        seq: *seq,
                        to: origin.clone(),
                    });
                    let plan = self.settle_plan(&q, &e, outcome);
                    ops.extend(plan.ops.iter().cloned());
                    if plan.to_exception {
                        if let Ok(xq) = self.queue(&self.exception) {
                            depth_up.push(xq);
                        }
                    } else if outcome != Outcome::Accepted {
                        depth_up.push(q.clone());
                    }
                    touched.push(q);
                }
                // Its queue is gone from the configuration and the message was consumed:
                // nothing to keep.
                Err(_) if outcome == Outcome::Accepted => ops.push(Op::Delete {
                    dest: pdest.clone(),
                    seq: *seq,
                }),
                // Its queue is gone from the configuration: keep the message where an
                // operator looks for it.
                Err(_) => {
                    ops.push(Op::Move {
                        from: pdest.clone(),
                        seq: *seq,
                        to: self.exception.clone(),
                    });
                    if let Ok(xq) = self.queue(&self.exception) {
                        depth_up.push(xq);
                    }
                }
            }
        }
        for (seq, dest) in send_rows.iter().zip(&record.sends) {
            if !commit {
                ops.push(Op::Delete {
                    dest: pdest.clone(),
                    seq: *seq,
                });
                continue;
            }
            let to = match self.queue(dest) {
                Ok(q) => {
                    depth_up.push(q);
                    dest.clone()
                }
                Err(_) => {
                    if let Ok(xq) = self.queue(&self.exception) {
                        depth_up.push(xq);
                    }
                    self.exception.clone()
                }
            };
            ops.push(Op::Move {
                from: pdest.clone(),
                seq: *seq,
                to,
            });
        }
        ops.push(Op::DeleteKv {
            space: PREPARED_KV.into(),
            key: id.into(),
        });
        self.store.commit(ops).await?;
        keel_core::faults::hit("me.after_store_commit");
        // Rows appeared on queues behind their windows' backs: make them read the store again.
        touched.extend(depth_up.iter().cloned());
        for q in &depth_up {
            q.counters.depth.fetch_add(1, Ordering::Relaxed);
        }
        for q in touched {
            q.state.lock().expect("queue lock").forget_window();
            q.notify.notify_one();
        }
        Ok(Resolved::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_codes_round_trip() {
        for o in [
            Outcome::Accepted,
            Outcome::Released,
            Outcome::Failed,
            Outcome::Rejected,
        ] {
            assert_eq!(outcome_of(outcome_code(o)), Some(o));
        }
        assert_eq!(outcome_of(9), None);
    }

    #[test]
    fn branch_ids_are_bounded() {
        assert!(check_id("4b45454c:00ff:00000001").is_ok());
        assert!(check_id("").is_err());
        assert!(check_id("a b").is_err());
        assert!(check_id(&"a".repeat(BRANCH_ID_BYTES_MAX + 1)).is_err());
    }
}

//! The store's commit machinery that is not a backend's: both writers (SQLite's thread,
//! PostgreSQL's task) group-commit with the same bounds, validate batches and reads the same
//! way and answer their callers the same way, from here.
//!
//! - the bounds of one group commit (`TXN_*`), the linger and the write queue's length;
//! - [`validate_ops`]: a batch checked before it is queued; [`check_limit`]: the read bound;
//! - [`Batch`], [`answer_committed`], [`answer_failed`]: a group's callers and their answers,
//!   and [`PendingGuard`], which keeps the writers' count of announced batches right;
//! - [`seal`]: the one function every group commit of either backend passes through before
//!   its COMMIT, where a check that must hold for every commit goes (fencing, the HA issue).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::oneshot;

use crate::error::{Result, StoreError};
use crate::{CommitOutcome, Op, BATCH_BYTES_MAX, BATCH_OPS_MAX, PAGE_LIMIT_MAX};

/// Bounds of one group commit (one transaction, one fsync or WAL flush). A group stops growing at
/// the first bound reached; a single batch larger than a bound still commits, alone.
pub(crate) const TXN_BATCHES_MAX: usize = 256;
pub(crate) const TXN_OPS_MAX: usize = 8_192;
pub(crate) const TXN_BYTES_MAX: usize = 64 * 1024 * 1024;
/// How long the writer waits for more batches when callers are known to be on their way. Short
/// against an fsync (milliseconds), long enough for woken tasks to enqueue.
pub(crate) const LINGER_US: u64 = 1_000;
/// Batches queued for the writer before callers wait (backpressure, bounded memory).
pub(crate) const WRITE_QUEUE_MAX: usize = 1_024;

/// One caller's ops in a group commit, and where its outcome goes (both backends).
pub(crate) struct Batch {
    pub(crate) ops: Vec<Op>,
    pub(crate) reply: oneshot::Sender<Result<CommitOutcome>>,
}

/// Answers every caller of a committed group with its own outcome, and counts the commit.
pub(crate) fn answer_committed(
    committed: &AtomicU64,
    group: Vec<Batch>,
    outcomes: Vec<Result<CommitOutcome>>,
) {
    committed.fetch_add(1, Ordering::Relaxed);
    assert_eq!(outcomes.len(), group.len());
    for (batch, outcome) in group.into_iter().zip(outcomes) {
        let _ = batch.reply.send(outcome);
    }
}

/// Answers every caller of a group that did not commit: the transaction's error, except a
/// batch that failed alone before it, which keeps its own, more precise one.
pub(crate) fn answer_failed(
    group: Vec<Batch>,
    outcomes: Vec<Result<CommitOutcome>>,
    e: StoreError,
) {
    let mut own = outcomes.into_iter();
    for batch in group {
        let r = match own.next() {
            Some(Err(mine)) => Err(mine),
            _ => Err(e.clone()),
        };
        let _ = batch.reply.send(r);
    }
}

/// Checks a batch before it is queued: bounds and per-op rules. Never touches the database.
pub(crate) fn validate_ops(me: &str, ops: &[Op]) -> Result<usize> {
    let invalid = |problem: String| StoreError::Invalid {
        me: me.to_string(),
        problem,
    };
    if ops.is_empty() {
        return Err(invalid("a commit needs at least one op".into()));
    }
    if ops.len() > BATCH_OPS_MAX {
        return Err(invalid(format!(
            "a commit of {} ops exceeds the maximum of {BATCH_OPS_MAX}",
            ops.len()
        )));
    }
    let mut bytes = 0usize;
    for op in ops {
        bytes = bytes.saturating_add(op.bytes());
        match op {
            Op::Put {
                dest,
                priority,
                stream,
                ..
            } => {
                if dest.is_empty() {
                    return Err(invalid("Put with an empty destination name".into()));
                }
                if *priority > 9 {
                    return Err(invalid(format!("Put with priority {priority} (0..=9)")));
                }
                if let Some((sid, _)) = stream {
                    if sid.is_empty() {
                        return Err(invalid("Put with an empty stream_id".into()));
                    }
                }
            }
            Op::Delete { dest, .. } | Op::SetDeliveryCount { dest, .. } => {
                if dest.is_empty() {
                    return Err(invalid("an op with an empty destination name".into()));
                }
            }
            Op::Move { from, to, .. } => {
                if from.is_empty() || to.is_empty() || from == to {
                    return Err(invalid(format!(
                        "Move from `{from}` to `{to}` (both named, and different)"
                    )));
                }
            }
            Op::SetKv { space, key, .. } | Op::DeleteKv { space, key } => {
                if space.is_empty() || key.is_empty() {
                    return Err(invalid("a kv op with an empty space or key".into()));
                }
            }
            Op::SetRestoreState(_) => {}
        }
    }
    if bytes > BATCH_BYTES_MAX {
        return Err(invalid(format!(
            "a commit of {bytes} bytes exceeds the maximum of {BATCH_BYTES_MAX}"
        )));
    }
    Ok(bytes)
}

/// Decrements `pending_batches` if the commit future is dropped before its batch was queued.
pub(crate) struct PendingGuard<'a> {
    pub(crate) pending: &'a AtomicUsize,
    pub(crate) armed: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Checks the bound of one read (`page`, `by_stream`): 1..=[`PAGE_LIMIT_MAX`] messages.
pub(crate) fn check_limit(me: &str, limit: usize) -> Result<()> {
    if limit == 0 || limit > PAGE_LIMIT_MAX {
        return Err(StoreError::Invalid {
            me: me.to_string(),
            problem: format!(
                "a read of {limit} messages is outside 1..={PAGE_LIMIT_MAX}; page in smaller steps"
            ),
        });
    }
    Ok(())
}

/// What a group's transaction writes besides its batches' ops, decided in [`seal`] for both
/// backends; the backend writes it in the same transaction, before COMMIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seal {
    /// The new `meta.next_seq` reservation, when the group's seqs passed the old one
    /// ([`crate::seq_reservation`]).
    pub(crate) next_seq: Option<u64>,
}

/// Seals a group commit. **Every group commit of either backend passes through here**, inside
/// its open transaction, after the group's batches were applied and right before COMMIT:
/// SQLite's `sqlite::writer::Group::finish` (the fast path and the savepoint path alike) and
/// PostgreSQL's `pg::Writer::commit_group`. `next_seq` is the next seq the writer would hand
/// out, `seq_reserved` the reservation committed so far.
///
/// The one place for a rule every commit must keep: fencing (the HA issue) goes here, as a
/// seal the backend verifies and writes in the same transaction, so that a writer fenced off
/// fails its whole group before COMMIT (every caller answered with the error, nothing of it
/// committed). Not through here: the writers' transactions that carry no caller's batch (a new
/// incarnation, both backends; SQLite's body-log compaction, which only moves bodies).
pub(crate) fn seal(next_seq: u64, seq_reserved: u64) -> Seal {
    Seal {
        next_seq: crate::seq_reservation(next_seq, seq_reserved),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_ops_enforces_bounds() {
        let put = |p: u8, body: usize| Op::Put {
            dest: "Q".into(),
            id: String::new(),
            priority: p,
            reliability: 0,
            expiry_ms: None,
            properties: vec![],
            body: vec![0; body],
            stream: None,
        };
        assert!(validate_ops("me", &[put(9, 10)]).is_ok());
        assert!(validate_ops("me", &[put(10, 10)]).is_err());
        assert!(validate_ops("me", &[]).is_err());
        assert!(validate_ops("me", &[put(1, BATCH_BYTES_MAX + 1)]).is_err());
        let e = validate_ops(
            "me",
            &[Op::SetKv {
                space: String::new(),
                key: "k".into(),
                value: vec![],
            }],
        )
        .unwrap_err();
        assert!(e.to_string().contains("messaging engine me"), "{e}");
        assert!(check_limit("me", PAGE_LIMIT_MAX).is_ok());
        assert!(check_limit("me", PAGE_LIMIT_MAX + 1).is_err());
    }
}

//! The writer thread: group commit (SQLite's side of it; the grouping bounds, validation and
//! answers shared with PostgreSQL are `crate::commit`), and the body log's upkeep: rolling
//! segments, unlinking dead ones, compaction.
//!
//! A group (up to `TXN_BATCHES_MAX` batches) commits in one transaction with one fsync, first
//! without savepoints: a savepoint makes SQLite copy each page it touches into a sub-journal
//! first. Only when a batch fails is the group rolled back and applied again with a savepoint
//! per batch, so a failing batch fails alone (`commit_group`).
//!
//! Failures (DESIGN §10). A full disk (`SQLITE_FULL`, or ENOSPC/EDQUOT on the body log) fails
//! the whole group with `DiskFull`, not batch by batch, and moves the health to `disk-full`
//! (`CWSIP0112W` once); the first group that commits clears it (`CWSIP0113I` once). Going on
//! is safe: SQLite writes a WAL transaction's commit frame last and rolls back a transaction
//! whose write failed, and the body log cuts a failed write back off (`set_len`). A failed
//! commit fsync (`SQLITE_IOERR_FSYNC`: the kernel may have dropped the pages, so the commit may
//! or may not be on disk) or corruption found while writing fails the store: health `failed`,
//! `CWSIP0114E` once, every later change refused with `StoreError::Failed` until the engine
//! reopens it and recovery from the WAL decides (`fatal_reason`). A writer or reader thread
//! that panics fails the store the same way, with the panic's text; a caller whose request it
//! dropped waits for the thread's end and answers `failed`, not "closed". Tested on a real
//! full tmpfs (`tests/disk_full.rs`) and with the hooks `fail_next_fsync` and `panic_writer`.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tokio::sync::mpsc;

use super::reads::body_ref_at;
use super::schema::{meta_set, read_meta, Meta};
use super::{fatal_reason, Ctx, Shared, WriteReq};
use crate::bodylog::{self, Appender, BodyRef};
use crate::commit::{
    answer_committed, answer_failed, seal, Batch, LINGER_US, TXN_BATCHES_MAX, TXN_BYTES_MAX,
    TXN_OPS_MAX,
};
use crate::error::{Result, StoreError};
use crate::{CommitOutcome, Op, RestoreState, StoreHealth};
use keel_core::{catalog, emit};

/// Body-log bytes a simulated full disk still takes (test hook).
const BODY_LOG_ROOM_WHEN_FULL: u64 = 64 * 1024;
/// Body-log rows relocated into their rows by one compaction transaction.
const COMPACT_ROWS_MAX: usize = 512;
/// Segments compacted at most per look.
const COMPACT_SEGMENTS_PER_CHECK: usize = 8;
/// Group commits between two looks at whether the body log needs compacting.
const COMPACT_CHECK_GROUPS: u64 = 64;

pub(super) struct Writer {
    shared: Arc<Shared>,
    conn: Connection,
    /// The writer lock; released after `conn` is closed.
    lock: File,
    /// The next seq to assign.
    next_seq: u64,
    /// `meta.next_seq` as committed: every seq handed out is below it.
    seq_reserved: u64,
    incarnation: u64,
    /// The body log segment that takes this group's bodies.
    appender: Appender,
    /// Segments made dead by committed transactions, unlinked once no read or backup is pinned.
    dead_segments: Vec<u64>,
    /// Group commits since the last look at whether to compact.
    groups_since_compact_check: u64,
    /// Groups failed by errors other than a full disk since the last commit, and when the
    /// first did: only the first is logged, the count when writing works again.
    failing: Option<(u64, u64)>,
    /// Test hook: the next group's commit fails as a failed fsync would.
    fail_next_fsync: bool,
}

/// What one group does to the body log's `segments` rows, written once per transaction.
#[derive(Clone, Debug, Default)]
struct SegDelta {
    /// Bytes staged into the current segment, and the seqs of their messages.
    put_bytes: u64,
    seq_min: u64,
    seq_max: u64,
    /// (segment, bytes) of each deleted message whose body was in the log.
    deleted: Vec<(u64, u64)>,
}

impl Writer {
    pub(super) fn new(
        shared: Arc<Shared>,
        conn: Connection,
        lock: File,
        meta: Meta,
        appender: Appender,
    ) -> Writer {
        Writer {
            shared,
            conn,
            lock,
            next_seq: meta.next_seq,
            seq_reserved: meta.next_seq,
            incarnation: meta.incarnation,
            appender,
            dead_segments: Vec::new(),
            groups_since_compact_check: 0,
            failing: None,
            fail_next_fsync: false,
        }
    }

    pub(super) fn run(mut self, mut rx: mpsc::Receiver<WriteReq>) {
        // A request taken from the queue that did not fit the previous group.
        let mut carry: Option<WriteReq> = None;
        loop {
            let first = match carry.take() {
                Some(r) => r,
                None => match rx.blocking_recv() {
                    Some(r) => r,
                    None => return,
                },
            };
            match first {
                WriteReq::SegmentBytesMax { bytes, reply } => {
                    self.appender.segment_bytes_max = bytes;
                    let _ = reply.send(());
                }
                WriteReq::BreakSegment { reply } => {
                    let ctx = self.ctx();
                    let r = self.appender.break_writes().map_err(|e| {
                        ctx.log_err("reopen a body log segment in", self.appender.dir(), e)
                    });
                    let _ = reply.send(r);
                }
                WriteReq::Close { reply } => {
                    // Connection first (it checkpoints and removes the WAL), then the lock,
                    // then the answer: a reopen right after close finds the store free.
                    self.unlink_dead_segments();
                    let Writer { conn, lock, .. } = self;
                    drop(conn);
                    drop(lock);
                    let _ = reply.send(());
                    return;
                }
                WriteReq::NewIncarnation {
                    clear_restored,
                    reply,
                } => {
                    let r = match self.shared.failed_err() {
                        Some(e) => Err(e),
                        None => self.new_incarnation(clear_restored),
                    };
                    let _ = reply.send(r);
                }
                WriteReq::FailNextFsync { reply } => {
                    self.fail_next_fsync = true;
                    let _ = reply.send(());
                }
                WriteReq::Panic => panic!("test hook: the writer panics"),
                WriteReq::LimitPages { pages, reply } => {
                    let ctx = self.ctx();
                    let r = self
                        .conn
                        .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                            r.get::<_, i64>(0)
                        })
                        .map(|_| ())
                        .map_err(ctx.err("limit pages"));
                    // The body log fills up with the file: a little room, or all of it back.
                    self.appender.limit_bytes = (pages < 1 << 30)
                        .then(|| self.appender.len_bytes() + BODY_LOG_ROOM_WHEN_FULL);
                    let _ = reply.send(r);
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
                    let started = Instant::now();
                    let linger = Duration::from_micros(LINGER_US);
                    // Bounded by TXN_BATCHES_MAX pushes and by the linger deadline.
                    while group.len() < TXN_BATCHES_MAX
                        && group_ops < TXN_OPS_MAX
                        && group_bytes < TXN_BYTES_MAX
                    {
                        match rx.try_recv() {
                            Ok(WriteReq::Commit {
                                ops,
                                ops_bytes,
                                reply,
                            }) => {
                                self.shared.pending_batches.fetch_sub(1, Ordering::AcqRel);
                                if group_ops + ops.len() > TXN_OPS_MAX
                                    || group_bytes + ops_bytes > TXN_BYTES_MAX
                                {
                                    // Re-announce it: it is pending again until the next group.
                                    self.shared.pending_batches.fetch_add(1, Ordering::AcqRel);
                                    carry = Some(WriteReq::Commit {
                                        ops,
                                        ops_bytes,
                                        reply,
                                    });
                                    break;
                                }
                                group_ops += ops.len();
                                group_bytes += ops_bytes;
                                group.push(Batch { ops, reply });
                            }
                            Ok(other) => {
                                carry = Some(other);
                                break;
                            }
                            Err(mpsc::error::TryRecvError::Empty) => {
                                // Linger only when callers are on their way (announced but not
                                // yet queued, or blocked on a full queue), and at most LINGER_US.
                                if self.shared.pending_batches.load(Ordering::Acquire) > 0
                                    && started.elapsed() < linger
                                {
                                    std::thread::sleep(Duration::from_micros(20));
                                    continue;
                                }
                                break;
                            }
                            Err(mpsc::error::TryRecvError::Disconnected) => break,
                        }
                    }
                    self.commit_group(group);
                }
            }
        }
    }

    fn ctx(&self) -> Ctx {
        self.shared.ctx.clone()
    }

    /// Commits a group in one transaction and answers every caller. First without savepoints:
    /// a savepoint makes SQLite copy every page it touches into a sub-journal first (about a
    /// sixth of the writer's time in the peers benchmark), and a batch almost never fails. If
    /// one does, the whole transaction is rolled back and the group is applied again with each
    /// batch in its own SAVEPOINT, so the failing batch rolls back alone and the others commit.
    /// A full disk fails the group as a whole (no batch of it was at fault) and is not retried;
    /// an error that leaves the files in doubt fails the store (see `fatal_reason`).
    fn commit_group(&mut self, group: Vec<Batch>) {
        assert!(!group.is_empty() && group.len() <= TXN_BATCHES_MAX);
        if let Some(e) = self.shared.failed_err() {
            return answer_failed(group, Vec::new(), e);
        }
        if let Err(e) = self.roll_segment_if_needed() {
            let e = self.note_failed(e, group.len());
            return answer_failed(group, Vec::new(), e);
        }
        let next_seq_before = self.next_seq;
        match self.commit_group_plain(&group) {
            Ok(outcomes) => {
                // Health first: a caller that reads it after its answer sees it current.
                self.note_committed();
                answer_committed(&self.shared.transactions_committed, group, outcomes);
                return self.after_commit();
            }
            Err(e) => {
                // Nothing of the group committed; the seqs it took are handed out again (no
                // caller has seen them), and so are the body log bytes it staged.
                if !self.conn.is_autocommit() {
                    // The rollback on drop failed: try once more; if the transaction is still
                    // open, the slow path's BEGIN fails and every caller gets that error.
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                self.appender.discard();
                self.next_seq = next_seq_before;
                if matches!(e, StoreError::DiskFull { .. }) || fatal_reason(&e).is_some() {
                    let e = self.note_failed(e, group.len());
                    return answer_failed(group, Vec::new(), e);
                }
                tracing::debug!(me = %self.shared.ctx.me, error = %e, "group commit retried batch by batch");
            }
        }
        // A failed write or sync of the bodies leaves the segment's tail in doubt.
        if let Err(e) = self.roll_segment_if_needed() {
            let e = self.note_failed(e, group.len());
            return answer_failed(group, Vec::new(), e);
        }
        self.commit_group_savepoints(group);
        self.after_commit();
    }

    /// A group committed: a full disk or a run of failures is over, and says so once.
    fn note_committed(&mut self) {
        if let Some((since_ms, failed)) = self.failing.take() {
            if failed > 1 {
                tracing::warn!(me = %self.shared.ctx.me, failed, since_ms,
                    "data store writes work again after failed group commits");
            }
        }
        let cleared = {
            let mut h = self.shared.health.lock().unwrap_or_else(|p| p.into_inner());
            match &*h {
                StoreHealth::DiskFull {
                    since_ms, refused, ..
                } => {
                    let was = (*since_ms, *refused);
                    *h = StoreHealth::Ok;
                    Some(was)
                }
                _ => None,
            }
        };
        if let Some((since_ms, refused)) = cleared {
            let since = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(since_ms),
            );
            emit!(
                catalog::CWSIP0113I,
                me = self.shared.ctx.me,
                refused = refused,
                since = since
            );
        }
    }

    /// A group of `batches` failed with `e` as a whole: moves the store's health and logs a
    /// change once (never once per group). Returns the error its callers get: `e`, or the
    /// store's failure when `e` leaves the files in doubt.
    fn note_failed(&mut self, e: StoreError, batches: usize) -> StoreError {
        if let Some(reason) = fatal_reason(&e) {
            return self.shared.fail(reason);
        }
        if let StoreError::DiskFull { file, .. } = &e {
            let started = {
                let mut h = self.shared.health.lock().unwrap_or_else(|p| p.into_inner());
                match &mut *h {
                    StoreHealth::DiskFull { refused, .. } => {
                        *refused += batches as u64;
                        false
                    }
                    StoreHealth::Ok => {
                        *h = StoreHealth::DiskFull {
                            since_ms: keel_core::unix_ms(),
                            path: file.clone(),
                            refused: batches as u64,
                        };
                        true
                    }
                    StoreHealth::Failed { .. } => false,
                }
            };
            if started {
                emit!(
                    catalog::CWSIP0112W,
                    me = self.shared.ctx.me,
                    path = file.display()
                );
            }
            return e;
        }
        // Other errors (a failed write, a busy file): the group fails, the store goes on. The
        // first of a run is logged; the rest are counted and reported when writing works.
        match &mut self.failing {
            Some((_, n)) => *n += 1,
            None => {
                self.failing = Some((keel_core::unix_ms(), 1));
                tracing::error!(me = %self.shared.ctx.me, error = %e, batches, "group commit failed");
            }
        }
        e
    }

    /// The fast path: every batch applied in one transaction, none may fail.
    fn commit_group_plain(&mut self, group: &[Batch]) -> Result<Vec<Result<CommitOutcome>>> {
        let ctx = self.ctx();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(ctx.err("begin transaction"))?;
        let mut outcomes = Vec::with_capacity(group.len());
        let mut g = Group::new(
            &tx,
            &ctx,
            &mut self.next_seq,
            self.incarnation,
            &mut self.appender,
        );
        for batch in group {
            // An error drops `tx`, which rolls the whole transaction back.
            outcomes.push(Ok(g.apply(&batch.ops)?));
        }
        let (dead, reservation) = g.finish(self.seq_reserved)?;
        if std::mem::take(&mut self.fail_next_fsync) {
            // Test hook: what a failed fsync of the WAL returns (`tx` rolls back on drop).
            let f = rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR_FSYNC);
            let e = rusqlite::Error::SqliteFailure(f, Some("simulated fsync failure".into()));
            return Err(ctx.err("commit transaction")(e));
        }
        tx.commit().map_err(ctx.err("commit transaction"))?;
        self.seq_reserved = reservation.unwrap_or(self.seq_reserved);
        self.dead_segments.extend(dead);
        Ok(outcomes)
    }

    /// The slow path after a failed group: each batch inside its own SAVEPOINT.
    fn commit_group_savepoints(&mut self, group: Vec<Batch>) {
        let ctx = self.ctx();
        let mut outcomes: Vec<Result<CommitOutcome>> = Vec::with_capacity(group.len());
        let mut dead = Vec::new();
        let txn = (|| -> Result<()> {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(ctx.err("begin transaction"))?;
            let mut g = Group::new(
                &tx,
                &ctx,
                &mut self.next_seq,
                self.incarnation,
                &mut self.appender,
            );
            for batch in &group {
                tx.execute_batch("SAVEPOINT batch")
                    .map_err(ctx.err("savepoint"))?;
                let seq_before = *g.next_seq;
                let (delta_before, staged_before) = (g.delta.clone(), g.appender.staged());
                match g.apply(&batch.ops) {
                    Ok(outcome) => {
                        tx.execute_batch("RELEASE batch")
                            .map_err(ctx.err("release savepoint"))?;
                        outcomes.push(Ok(outcome));
                    }
                    Err(e) if tx.is_autocommit() => {
                        // SQLite rolled the whole transaction back by itself (SQLITE_FULL,
                        // an I/O error): the group fails, with this batch's error.
                        return Err(e);
                    }
                    Err(e) => {
                        tx.execute_batch("ROLLBACK TO batch; RELEASE batch")
                            .map_err(ctx.err("roll back savepoint"))?;
                        // The seqs it took are skipped, not handed out again: strictly
                        // increasing is the rule, gaps are allowed. Its bodies are unstaged.
                        assert!(*g.next_seq >= seq_before);
                        g.delta = delta_before;
                        g.appender.unstage_to(staged_before);
                        outcomes.push(Err(e));
                    }
                }
            }
            let reservation;
            (dead, reservation) = g.finish(self.seq_reserved)?;
            tx.commit().map_err(ctx.err("commit transaction"))?;
            self.seq_reserved = reservation.unwrap_or(self.seq_reserved);
            Ok(())
        })();
        match txn {
            Ok(()) => {
                self.dead_segments.extend(dead);
                self.note_committed();
                answer_committed(&self.shared.transactions_committed, group, outcomes);
            }
            Err(e) => {
                // Nothing of the group committed.
                self.appender.discard();
                let e = self.note_failed(e, group.len());
                answer_failed(group, outcomes, e);
            }
        }
    }

    /// Housekeeping between groups: dead segments, and now and then compaction.
    fn after_commit(&mut self) {
        self.unlink_dead_segments();
        self.groups_since_compact_check += 1;
        if self.groups_since_compact_check >= COMPACT_CHECK_GROUPS {
            self.groups_since_compact_check = 0;
            // Bounded: a few segments per look, each its own short transaction.
            for _ in 0..COMPACT_SEGMENTS_PER_CHECK {
                match self.compact() {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        // Compaction only saves space; the next look tries again.
                        tracing::warn!(me = %self.shared.ctx.me, error = %e, "body log compaction failed");
                        break;
                    }
                }
            }
        }
    }

    /// Moves to a new segment when the current one is full or its tail is in doubt. An error
    /// means no body can be made durable now: the group fails, nothing of it committed.
    fn roll_segment_if_needed(&mut self) -> Result<()> {
        if !self.appender.needs_roll() {
            return Ok(());
        }
        // The caller reports the error (once per episode, see `note_failed`).
        self.roll_segment()
    }

    /// Moves to a new segment; the old one is forgotten right away if nothing points into it.
    fn roll_segment(&mut self) -> Result<()> {
        let ctx = self.ctx();
        let next = self
            .appender
            .roll()
            .map_err(|e| ctx.log_err("start a body log segment in", self.appender.dir(), e))?;
        let old = std::mem::replace(&mut self.appender, next).seg();
        let live: Option<i64> = self
            .conn
            .query_row(
                "SELECT live_bytes FROM segments WHERE seg = ?1",
                [old as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(ctx.err("read a segment's live bytes"))?;
        if live.unwrap_or(0) == 0 {
            self.conn
                .execute("DELETE FROM segments WHERE seg = ?1", [old as i64])
                .map_err(ctx.err("forget a dead segment"))?;
            self.dead_segments.push(old);
        }
        Ok(())
    }

    /// Unlinks the segments committed transactions made dead, unless a read or a backup is pinned (its
    /// snapshot may still point into them). A crash before the unlink leaves an orphan, which
    /// the next open removes.
    fn unlink_dead_segments(&mut self) {
        if self.dead_segments.is_empty() || self.shared.ctx.bodies.pinned() {
            return;
        }
        let ctx = &self.shared.ctx;
        for seg in self.dead_segments.drain(..) {
            assert_ne!(
                seg,
                self.appender.seg(),
                "the current segment is never dead"
            );
            ctx.bodies.forget(seg);
            let path = bodylog::segment_path(ctx.bodies.dir(), seg);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // Only space is lost; the next open removes it.
                Err(e) => tracing::warn!(me = %ctx.me, segment = %path.display(), error = %e,
                    "cannot remove a dead body log segment"),
            }
        }
    }

    /// Bounds the space a few long-lived messages can hold: when the segments other than the
    /// current one hold more dead bytes than live ones (and more than two segments' worth), the
    /// one with the smallest live share has up to `COMPACT_ROWS_MAX` of its bodies moved back
    /// into their rows, in one transaction. Each such segment dies after a few rounds. Says
    /// whether it compacted anything.
    fn compact(&mut self) -> Result<bool> {
        let ctx = self.ctx();
        let current = self.appender.seg() as i64;
        let (bytes, live): (i64, i64) = self
            .conn
            .query_row(
                "SELECT coalesce(sum(bytes), 0), coalesce(sum(live_bytes), 0) FROM segments \
                 WHERE seg != ?1",
                [current],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(ctx.err("size the body log"))?;
        let dead = bytes - live;
        assert!(dead >= 0 && live >= 0);
        let floor = 2 * self.appender.segment_bytes_max as i64;
        if dead <= live.max(floor) {
            return Ok(false);
        }
        let (seg, seq_min, seq_max): (i64, i64, i64) = self
            .conn
            .query_row(
                "SELECT seg, seq_min, seq_max FROM segments WHERE seg != ?1 \
                 ORDER BY live_bytes * 1.0 / bytes, seg LIMIT 1",
                [current],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(ctx.err("choose a segment to compact"))?;
        // A segment's bodies belong to seqs it took in order, so its rows are in
        // [seq_min, seq_max]: a rowid range, never a scan of the whole table.
        let rows: Vec<(i64, BodyRef)> = self
            .conn
            .prepare_cached(
                "SELECT seq, body_seg, body_at, body_len, body_crc FROM messages \
                 WHERE seq BETWEEN ?1 AND ?2 AND body_seg = ?3 ORDER BY seq LIMIT ?4",
            )
            .and_then(|mut st| {
                st.query_map(
                    params![seq_min, seq_max, seg, COMPACT_ROWS_MAX as i64],
                    |r| Ok((r.get(0)?, body_ref_at(r, 1)?.expect("body_seg is set"))),
                )?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(ctx.err("read a segment's rows"))?;
        if rows.is_empty() {
            // The counts say bytes are live but no row points into the segment.
            return Err(StoreError::Corrupt {
                me: ctx.me.clone(),
                file: ctx.file.clone(),
                detail: format!(
                    "body log segment {seg} is counted live but no message points into it"
                ),
            });
        }
        let refs: Vec<BodyRef> = rows.iter().map(|(_, r)| *r).collect();
        let bodies = ctx.bodies.read(&refs).map_err(|e| ctx.body_err(e))?;
        let moved: u64 = refs.iter().map(|r| u64::from(r.len)).sum();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(ctx.err("begin compaction"))?;
        for ((seq, _), body) in rows.iter().zip(&bodies) {
            body_into_row(&tx, &ctx, *seq, body, "move a body into its row")?;
        }
        let delta = SegDelta {
            deleted: vec![(seg as u64, moved)],
            ..SegDelta::default()
        };
        let dead_now = apply_seg_delta(&tx, &ctx, &delta, self.appender.seg())?;
        tx.commit().map_err(ctx.err("commit compaction"))?;
        self.dead_segments.extend(dead_now);
        tracing::debug!(me = %ctx.me, segment = seg, bodies = rows.len(), bytes = moved, "compacted the body log");
        self.unlink_dead_segments();
        Ok(true)
    }

    fn new_incarnation(&mut self, clear_restored: bool) -> Result<u64> {
        let ctx = self.ctx();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(ctx.err("begin transaction"))?;
        let meta = read_meta(&tx, &ctx)?;
        assert_eq!(
            meta.incarnation, self.incarnation,
            "incarnation changed behind the writer"
        );
        let next = crate::next_incarnation(meta.incarnation);
        meta_set(&tx, &ctx, "incarnation", &next.to_string())?;
        if clear_restored {
            meta_set(&tx, &ctx, "restore_state", RestoreState::None.as_str())?;
        }
        tx.commit().map_err(ctx.err("commit new incarnation"))?;
        self.incarnation = next;
        self.shared
            .transactions_committed
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(me = %ctx.me, incarnation = next, clear_restored, "began new incarnation");
        Ok(next)
    }
}

pub(super) fn body_into_row(
    conn: &Connection,
    ctx: &Ctx,
    seq: i64,
    body: &[u8],
    action: &str,
) -> Result<()> {
    let n = conn
        .prepare_cached(
            "UPDATE messages SET body = ?2, body_seg = NULL, body_at = NULL, body_len = NULL, \
             body_crc = NULL WHERE seq = ?1",
        )
        .and_then(|mut st| st.execute(params![seq, body]))
        .map_err(ctx.err(action))?;
    assert_eq!(n, 1, "the row of seq {seq} holds its body");
    Ok(())
}

/// A group's hot statements, taken from rusqlite's statement cache once per group instead of
/// once per op (each lookup hashes the SQL text: about 3 % of the instructions of the engine
/// benchmark under callgrind). Dropped before the transaction commits.
#[derive(Default)]
struct HotStmts<'c> {
    insert: Option<rusqlite::CachedStatement<'c>>,
    find: Option<rusqlite::CachedStatement<'c>>,
    delete: Option<rusqlite::CachedStatement<'c>>,
}

const INSERT_MESSAGE_SQL: &str = "INSERT INTO messages (seq, dest, id, priority, reliability, \
     expiry_ms, delivery_count, properties, body, stream_id, tick, body_seg, body_at, body_len, \
     body_crc) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";
// Where the body is, then the delete by rowid. Not `DELETE … RETURNING`: SQLite runs RETURNING
// through an ephemeral table (a b-tree and pager opened, and a 16 KiB page zeroed, per
// statement) and a statement journal: a third more instructions per message under callgrind.
const FIND_MESSAGE_SQL: &str =
    "SELECT body_seg, body_len FROM messages WHERE seq = ?1 AND dest = ?2";
const DELETE_MESSAGE_SQL: &str = "DELETE FROM messages WHERE seq = ?1";

/// One group commit in the making: its transaction, the writer state it moves on (seqs, the
/// body log) and what it does to the segment counts. Both the fast path and the slow path
/// (a savepoint per batch) apply batches through it and finish with it.
struct Group<'c, 'w> {
    tx: &'c Transaction<'c>,
    ctx: &'w Ctx,
    next_seq: &'w mut u64,
    incarnation: u64,
    appender: &'w mut Appender,
    delta: SegDelta,
    stmts: HotStmts<'c>,
}

impl<'c, 'w> Group<'c, 'w> {
    fn new(
        tx: &'c Transaction<'c>,
        ctx: &'w Ctx,
        next_seq: &'w mut u64,
        incarnation: u64,
        appender: &'w mut Appender,
    ) -> Group<'c, 'w> {
        Group {
            tx,
            ctx,
            next_seq,
            incarnation,
            appender,
            delta: SegDelta::default(),
            stmts: HotStmts::default(),
        }
    }

    /// Applies one caller's ops inside the open transaction. Any error leaves the caller to
    /// roll back (the whole transaction, or the batch's savepoint).
    fn apply(&mut self, ops: &[Op]) -> Result<CommitOutcome> {
        apply_batch(
            self.tx,
            self.ctx,
            ops,
            self.next_seq,
            self.incarnation,
            self.appender,
            &mut self.delta,
            &mut self.stmts,
        )
    }

    /// Writes the segment counts and the seq reservation, then makes the staged bodies
    /// durable: the caller commits right after. Returns the segments that die with the commit
    /// and the reservation written, if any.
    fn finish(self, seq_reserved: u64) -> Result<(Vec<u64>, Option<u64>)> {
        let Group {
            tx,
            ctx,
            next_seq,
            appender,
            delta,
            stmts,
            ..
        } = self;
        drop(stmts);
        let dead = apply_seg_delta(tx, ctx, &delta, appender.seg())?;
        let reservation = seal(*next_seq, seq_reserved).next_seq;
        if let Some(r) = reservation {
            meta_set(tx, ctx, "next_seq", &r.to_string())?;
        }
        // Bodies durable before the rows that point at them.
        appender
            .flush()
            .map_err(|e| ctx.log_err("write message bodies to", appender.dir(), e))?;
        Ok((dead, reservation))
    }
}

/// `Group::apply`'s work, kept a function of its parts so the borrows stay plain.
#[allow(clippy::too_many_arguments)]
fn apply_batch<'c>(
    tx: &'c Transaction<'_>,
    ctx: &Ctx,
    ops: &[Op],
    next_seq: &mut u64,
    incarnation: u64,
    appender: &mut Appender,
    delta: &mut SegDelta,
    stmts: &mut HotStmts<'c>,
) -> Result<CommitOutcome> {
    let mut outcome = CommitOutcome::default();
    // Depth changes are summed per destination and written once per batch: one statement per
    // destination instead of one or two per message.
    let mut depth: Vec<(&str, i64)> = Vec::new();
    fn count<'a>(depth: &mut Vec<(&'a str, i64)>, dest: &'a str, delta: i64) {
        match depth.iter_mut().find(|(d, _)| *d == dest) {
            Some((_, n)) => *n += delta,
            None => depth.push((dest, delta)),
        }
    }
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
                let seq = *next_seq;
                assert!(seq > 0 && seq < i64::MAX as u64);
                *next_seq += 1;
                let id = if id.is_empty() {
                    format!("{}:{incarnation}:{seq}", ctx.uuid)
                } else {
                    id.clone()
                };
                // Large bodies go to the body log; the row keeps where.
                let logged = (body.len() > bodylog::INLINE_BODY_BYTES_MAX).then(|| {
                    let r = appender.stage(body);
                    if delta.put_bytes == 0 {
                        delta.seq_min = seq;
                    }
                    delta.put_bytes += u64::from(r.len);
                    delta.seq_max = seq;
                    r
                });
                let row_body: &[u8] = if logged.is_some() { &[] } else { body };
                let insert = match &mut stmts.insert {
                    Some(st) => st,
                    None => stmts.insert.insert(
                        tx.prepare_cached(INSERT_MESSAGE_SQL)
                            .map_err(ctx.err("insert message"))?,
                    ),
                };
                insert
                    .execute(params![
                        seq as i64,
                        dest,
                        id,
                        priority,
                        reliability,
                        expiry_ms.map(|v| v as i64),
                        properties,
                        row_body,
                        stream.as_ref().map(|s| s.0.as_str()),
                        stream.as_ref().map(|s| s.1 as i64),
                        logged.map(|r| r.seg as i64),
                        logged.map(|r| r.at as i64),
                        logged.map(|r| r.len),
                        logged.map(|r| r.crc),
                    ])
                    .map_err(ctx.err("insert message"))?;
                count(&mut depth, dest, 1);
                outcome.assigned_seqs.push(seq);
            }
            Op::Delete { dest, seq } => {
                let find = match &mut stmts.find {
                    Some(st) => st,
                    None => stmts.find.insert(
                        tx.prepare_cached(FIND_MESSAGE_SQL)
                            .map_err(ctx.err("delete message"))?,
                    ),
                };
                let found: Option<(Option<i64>, Option<i64>)> = find
                    .query_row(params![*seq as i64, dest], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
                    .map_err(ctx.err("delete message"))?;
                let Some(body_at) = found else {
                    return Err(no_such(ctx, dest, *seq));
                };
                let delete = match &mut stmts.delete {
                    Some(st) => st,
                    None => stmts.delete.insert(
                        tx.prepare_cached(DELETE_MESSAGE_SQL)
                            .map_err(ctx.err("delete message"))?,
                    ),
                };
                let n = delete
                    .execute([*seq as i64])
                    .map_err(ctx.err("delete message"))?;
                assert_eq!(n, 1, "the row just found is deleted");
                if let (Some(seg), Some(len)) = body_at {
                    delta.deleted.push((seg as u64, len as u64));
                }
                count(&mut depth, dest, -1);
            }
            Op::SetDeliveryCount { dest, seq, count } => {
                let n = tx
                    .prepare_cached(
                        "UPDATE messages SET delivery_count = ?3 WHERE seq = ?1 AND dest = ?2",
                    )
                    .and_then(|mut s| s.execute(params![*seq as i64, dest, count]))
                    .map_err(ctx.err("update delivery count"))?;
                if n == 0 {
                    return Err(no_such(ctx, dest, *seq));
                }
            }
            Op::Move { from, seq, to } => {
                let n = tx
                    .prepare_cached("UPDATE messages SET dest = ?3 WHERE seq = ?1 AND dest = ?2")
                    .and_then(|mut s| s.execute(params![*seq as i64, from, to]))
                    .map_err(ctx.err("move message"))?;
                if n == 0 {
                    return Err(no_such(ctx, from, *seq));
                }
                count(&mut depth, from, -1);
                count(&mut depth, to, 1);
            }
            Op::SetKv { space, key, value } => {
                tx.prepare_cached(
                    "INSERT INTO kv (space, key, value) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (space, key) DO UPDATE SET value = excluded.value",
                )
                .and_then(|mut s| s.execute(params![space, key, value]))
                .map_err(ctx.err("write kv"))?;
            }
            Op::DeleteKv { space, key } => {
                tx.prepare_cached("DELETE FROM kv WHERE space = ?1 AND key = ?2")
                    .and_then(|mut s| s.execute(params![space, key]))
                    .map_err(ctx.err("delete kv"))?;
            }
            Op::SetRestoreState(state) => meta_set(tx, ctx, "restore_state", state.as_str())?,
        }
    }
    for (dest, delta) in depth {
        depth_add(tx, ctx, dest, delta)?;
    }
    Ok(outcome)
}

/// Writes a group's body-log accounting: the current segment's new bytes, then the bytes its
/// deletes freed. Returns the segments that died (no live bytes, not current): their rows are
/// gone with this transaction, their files are unlinked after it commits.
fn apply_seg_delta(
    tx: &Transaction<'_>,
    ctx: &Ctx,
    delta: &SegDelta,
    current: u64,
) -> Result<Vec<u64>> {
    if delta.put_bytes > 0 {
        assert!(delta.seq_min <= delta.seq_max);
        tx.prepare_cached(
            "INSERT INTO segments (seg, bytes, live_bytes, seq_min, seq_max) \
             VALUES (?1, ?2, ?2, ?3, ?4) ON CONFLICT (seg) DO UPDATE SET \
             bytes = bytes + excluded.bytes, live_bytes = live_bytes + excluded.live_bytes, \
             seq_max = excluded.seq_max",
        )
        .and_then(|mut s| {
            s.execute(params![
                current as i64,
                delta.put_bytes as i64,
                delta.seq_min as i64,
                delta.seq_max as i64
            ])
        })
        .map_err(ctx.err("count body log bytes"))?;
    }
    // Summed per segment first: a group's deletes mostly hit one or two segments.
    let mut freed: Vec<(u64, u64)> = Vec::new();
    for &(seg, bytes) in &delta.deleted {
        match freed.iter_mut().find(|(s, _)| *s == seg) {
            Some((_, b)) => *b += bytes,
            None => freed.push((seg, bytes)),
        }
    }
    let mut dead = Vec::new();
    for (seg, bytes) in freed {
        // No RETURNING (see FIND_MESSAGE_SQL): update, then read back.
        let n = tx
            .prepare_cached("UPDATE segments SET live_bytes = live_bytes - ?2 WHERE seg = ?1")
            .and_then(|mut s| s.execute(params![seg as i64, bytes as i64]))
            .map_err(ctx.err("count body log bytes"))?;
        let live: Option<i64> = if n == 0 {
            None
        } else {
            tx.prepare_cached("SELECT live_bytes FROM segments WHERE seg = ?1")
                .and_then(|mut s| s.query_row([seg as i64], |r| r.get(0)))
                .map(Some)
                .map_err(ctx.err("count body log bytes"))?
        };
        let Some(live) = live else {
            return Err(StoreError::Corrupt {
                me: ctx.me.clone(),
                file: ctx.file.clone(),
                detail: format!(
                    "a message points into body log segment {seg}, which is not counted"
                ),
            });
        };
        // The CHECK keeps live_bytes >= 0; read back: never below.
        assert!(live >= 0);
        if live == 0 && seg != current {
            tx.prepare_cached("DELETE FROM segments WHERE seg = ?1")
                .and_then(|mut s| s.execute([seg as i64]))
                .map_err(ctx.err("forget a dead segment"))?;
            dead.push(seg);
        }
    }
    Ok(dead)
}

fn no_such(ctx: &Ctx, dest: &str, seq: u64) -> StoreError {
    StoreError::NoSuchMessage {
        me: ctx.me.clone(),
        dest: dest.to_string(),
        seq,
    }
}

/// Keeps `dests.depth` equal to the number of messages of `dest` by adding `delta` (a batch's
/// net change); a row exists only while the destination holds messages.
fn depth_add(tx: &Transaction<'_>, ctx: &Ctx, dest: &str, delta: i64) -> Result<()> {
    if delta == 0 {
        return Ok(());
    }
    let current: i64 = tx
        .prepare_cached("SELECT depth FROM dests WHERE dest = ?1")
        .and_then(|mut s| s.query_row([dest], |r| r.get(0)).optional())
        .map_err(ctx.err("count messages"))?
        .unwrap_or(0);
    let depth = current + delta;
    // Messages were just removed from `dest` and only those it held can be.
    assert!(
        depth >= 0,
        "destination count out of step with its messages"
    );
    let n = match (current, depth) {
        (_, 0) => tx
            .prepare_cached("DELETE FROM dests WHERE dest = ?1")
            .and_then(|mut s| s.execute([dest])),
        (0, _) => tx
            .prepare_cached("INSERT INTO dests (dest, depth) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![dest, depth])),
        _ => tx
            .prepare_cached("UPDATE dests SET depth = ?2 WHERE dest = ?1")
            .and_then(|mut s| s.execute(params![dest, depth])),
    }
    .map_err(ctx.err("count messages"))?;
    assert_eq!(n, 1, "one destination count row changes");
    Ok(())
}

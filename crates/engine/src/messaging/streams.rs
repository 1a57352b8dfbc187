//! Delivery streams as the engine keeps them (DESIGN §5): a message for a queue whose queue
//! point is on another engine of the bus waits on this engine's *transmission queue* towards
//! that engine, numbered by the stream's ticks, until the target acknowledges it; the target
//! stores each in-order message together with its stream's new prefix. The link that carries
//! the frames is the server's (`keel_server::links`); the protocol decisions are keel-bus's:
//! every change of a source state ([`OutState`] = `keel_bus::SourceState`) is one of its
//! transitions, so this file keeps no protocol arithmetic of its own.
//!
//! Persistence, each change in the same store transaction as the message change it describes:
//! - source: a transmission-queue row per message (`dest` = `_XMIT:<target>:<final dest>`,
//!   `stream` = (stream id, tick)) and the stream's [`OutState`] (kv space `streams.out`, key =
//!   target engine), whose `next_tick` moves with the rows; an acknowledgement deletes the rows
//!   up to it and moves `acked` in one commit;
//! - target: the delivered message (its original ID kept), the stream's [`InState`] (kv
//!   space `streams.in`, key = `<source>/<stream id>`) and the source's duplicate window
//!   ([`Seen`], kv space `streams.seen`) in one commit.
//!
//! Sending: a stream's committer commits the sends of every waiting producer together and
//! keeps what it committed for the link (`Unsent`: at most `UNSENT_MAX` messages and
//! `UNSENT_BYTES_MAX` per stream, each taken once), so a link sends new messages without
//! reading rows back; a resend, a link behind the oldest kept message, or a flush reads the
//! store (`unsent_stream_messages_from_memory_equal_the_stored_rows` holds the two equal).
//!
//! FLUSH (DESIGN §5, [`begin_flush`], [`Messaging::in_hello`], [`Messaging::out_flush`]): a
//! FLUSH start gives every outgoing stream a new id, its unacknowledged messages renumbered
//! from tick 1, and records which peers must confirm ([`FlushRecord`], kv `streams.flush`); a
//! peer confirms the outbound side by resuming one of the new streams, and the inbound side by
//! flushing its own stream towards this engine for this flush's epoch. Renumbering rewrites no
//! row: rows keep `(row stream, row tick)` and the state maps wire ticks onto them
//! (`row tick = wire tick + row_base`), so a FLUSH takes the same time with one message or a
//! million on the transmission queues. The FLUSH start's one commit also sets the restore
//! state to `flush-pending` and gives every peer a stream tagged with the flush's epoch, also a
//! peer it had no stream towards (that history may have gone with the restore). At the target,
//! a tagged stream retires every older stream of its source (`retired_ms`); a source that
//! announces a retired stream went back in time again and is held. The last confirmation
//! ([`Messaging::flush_confirm`]) deletes the record and sets the restore state to `none` in
//! one commit, then logs `CWSIP0783E`.
//!
//! Invariants: one committer task per stream is the only writer of its state (so no caller
//! can cancel a change mid-commit); it assigns ticks in commit order, so the rows of a
//! stream are exactly the wire ticks `acked + 1 .. next_tick` (shifted by `row_base`); a
//! target's prefix only grows, and a retired (replaced) stream is never taken again; within
//! one incarnation of a source, the messages it sends one target carry increasing seqs, which
//! is what lets the duplicate window keep one high-water mark per incarnation. The window
//! forgets an incarnation after the bus's `duplicate_window_hours` and beyond
//! `SEEN_INCARNATIONS_MAX`; only the resent ticks of a stream made by a FLUSH (`resend_upto`)
//! can be dropped by it, so a message ID reused by mistake (a clock stepped back across a
//! restore) never makes a target drop a new message.
//! Deliberately absent so far: non-persistent remote sends (every remote message is stored on
//! the transmission queue). Remote get is `remote.rs`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use keel_config::DestinationCfg;
use keel_store::{Op, StoredMessage};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify};

use keel_core::{catalog, emit};

use super::{Messaging, MessagingError, OutgoingMessage};
use crate::queue::{Entry, RefillMark};

pub const OUT_KV: &str = "streams.out";
pub const IN_KV: &str = "streams.in";
pub const FLUSH_KV: &str = "streams.flush";
const FLUSH_KEY: &str = "pending";
pub const SEEN_KV: &str = "streams.seen";
/// Incarnations a target remembers per source engine in its duplicate window (the least
/// recently used leave first).
pub const SEEN_INCARNATIONS_MAX: usize = 256;
/// Retired (replaced) streams a target remembers per source engine.
pub const RETIRED_MAX: usize = 64;
const XMIT_PREFIX: &str = "_XMIT:";
/// Rows read or acknowledged per store call.
pub const STREAM_PAGE_MAX: usize = 512;

/// A source stream's durable state: keel-bus's state machine, stored as JSON in kv space
/// `streams.out` (key = target engine). Ticks are the wire's; rows are stored under
/// `row_stream()` at `row_of(tick)` (a FLUSH renumbers without rewriting rows).
pub type OutState = keel_bus::SourceState;

fn fresh_out() -> OutState {
    OutState::new(uuid::Uuid::new_v4().to_string())
}

/// A stored source state, decoded and checked before anything trusts it.
fn decode_out(me: &str, target: &str, bytes: &[u8]) -> Result<OutState, MessagingError> {
    let st: OutState = serde_json::from_slice(bytes).map_err(|e| {
        broken(
            me,
            target,
            format!("its recorded state does not decode ({e})"),
        )
    })?;
    st.validated().map_err(|e| {
        broken(
            me,
            target,
            format!("its recorded state does not add up ({e})"),
        )
    })
}

fn set_out(target: &str, st: &OutState) -> Op {
    Op::SetKv {
        space: OUT_KV.into(),
        key: target.to_string(),
        value: serde_json::to_vec(st).expect("stream state serializes"),
    }
}

/// A target stream's durable state: every tick up to `tick` is stored here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InState {
    pub tick: u64,
    pub identity: Option<String>,
    /// When a FLUSH of the source replaced this stream (None: current). A retired stream is
    /// never taken again: its source announcing it means its store went back in time.
    #[serde(default)]
    pub retired_ms: Option<u64>,
    /// The stream's resent ticks (see `SourceState::resend_upto`): only these pass through the
    /// duplicate window, so a message ID reused by mistake (a clock gone back) can never make
    /// the target drop a new message.
    #[serde(default)]
    pub resend_upto: u64,
}

/// A FLUSH start of this engine not yet confirmed by every peer (DESIGN §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushRecord {
    /// Names this flush on the wire (peers tag the streams they make for it).
    pub epoch: String,
    pub started_ms: u64,
    /// Per peer engine, which sides confirmed.
    pub peers: BTreeMap<String, PeerFlush>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PeerFlush {
    /// The peer resumed this engine's new stream towards it.
    pub outbound: bool,
    /// The peer moved its stream towards this engine onto a stream made for this flush.
    pub inbound: bool,
}

impl FlushRecord {
    /// Forgets peers that are no longer members of the bus (nothing to wait for from them);
    /// true if any went.
    pub fn keep_only(&mut self, peers: &[(String, String)]) -> bool {
        let before = self.peers.len();
        self.peers
            .retain(|p, _| peers.iter().any(|(me, _)| me == p));
        self.peers.len() != before
    }

    pub fn is_complete(&self) -> bool {
        self.peers.values().all(|p| p.outbound && p.inbound)
    }

    /// "node01.server2-bus1 (outbound, inbound), …" for the peers still to confirm.
    pub fn waiting_for(&self) -> String {
        let w: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| !(p.outbound && p.inbound))
            .map(|(me, p)| {
                let sides: Vec<&str> = [(!p.outbound, "outbound"), (!p.inbound, "inbound")]
                    .into_iter()
                    .filter_map(|(w, s)| w.then_some(s))
                    .collect();
                format!("{me} ({})", sides.join(", "))
            })
            .collect();
        if w.is_empty() {
            "nobody".into()
        } else {
            w.join("; ")
        }
    }
}

/// Which side of a flush a peer confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushSide {
    Outbound,
    Inbound,
}

/// A target's duplicate window for one source engine: per incarnation of the source, the
/// highest seq delivered and when. A source sends one target its messages of one incarnation
/// in seq order (see the invariants), so a message whose seq is at or below the mark of its
/// incarnation was delivered before: a pre-backup message resent after a FLUSH.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Seen {
    /// incarnation → (highest seq, last update in Unix ms).
    pub marks: BTreeMap<u64, (u64, u64)>,
}

impl Seen {
    /// Whether `(incarnation, seq)` is new; records it.
    fn admit(&mut self, incarnation: u64, seq: u64, now_ms: u64) -> bool {
        let mark = self.marks.entry(incarnation).or_insert((0, now_ms));
        if seq <= mark.0 {
            return false;
        }
        *mark = (seq, now_ms);
        true
    }

    /// Forgets incarnations not updated within `window_ms`, and the least recently updated
    /// beyond SEEN_INCARNATIONS_MAX.
    fn prune(&mut self, now_ms: u64, window_ms: u64) {
        self.marks
            .retain(|_, (_, at)| at.saturating_add(window_ms) >= now_ms);
        while self.marks.len() > SEEN_INCARNATIONS_MAX {
            let oldest = self
                .marks
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(i, _)| *i)
                .expect("non-empty");
            self.marks.remove(&oldest);
        }
    }
}

/// Splits a system message ID `<uuid>:<incarnation>:<seq>`.
fn parse_system_id(id: &str) -> Option<(&str, u64, u64)> {
    let mut parts = id.rsplitn(3, ':');
    let seq = parts.next()?.parse().ok()?;
    let inc = parts.next()?.parse().ok()?;
    Some((parts.next()?, inc, seq))
}

/// One source stream towards a target engine.
pub struct OutStream {
    /// This engine, and the engine the stream goes to.
    me: String,
    pub target: String,
    state: Mutex<OutState>,
    /// (wire stream id, row stream, row base) as of the last flush, for readers that must not
    /// wait for a commit (`out_page`).
    rows: std::sync::Mutex<(String, String, u64)>,
    /// `next_tick` as last committed, readable without waiting for a commit in progress
    /// (the state's lock is held across commits).
    next_tick: std::sync::atomic::AtomicU64,
    /// To the stream's committer task (bounded: senders wait when it is full).
    work: tokio::sync::mpsc::Sender<StreamWork>,
    /// Woken when new messages are on the stream.
    pub notify: Notify,
    /// What the committer stored lately and no link has sent yet (see [`Unsent`]).
    unsent: std::sync::Mutex<Unsent>,
}

impl OutStream {
    pub async fn state(&self) -> OutState {
        self.state.lock().await.clone()
    }

    /// Asks the committer to remove what the target acknowledged of stream `stream_id`,
    /// without waiting (a later ack covers one that did not fit).
    pub fn ack_later(&self, stream_id: &str, upto: u64) {
        let _ = self.work.try_send(StreamWork::Ack {
            stream_id: stream_id.to_string(),
            upto,
            reply: None,
        });
    }

    /// The next tick a message will get (every tick below it is committed).
    pub fn next_tick(&self) -> u64 {
        self.next_tick.load(Ordering::Acquire)
    }

    fn rows(&self) -> (String, String, u64) {
        self.rows.lock().expect("rows lock").clone()
    }
}

/// Work items a stream's committer takes, in order.
enum StreamWork {
    Send(PendingSend),
    /// Acks name their stream: one for a stream a flush replaced meanwhile is ignored.
    Ack {
        stream_id: String,
        upto: u64,
        /// The outcome, as the error's sentence (the error itself is logged here).
        reply: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    },
    /// Moves the stream's unacknowledged messages onto a new stream for flush `epoch`.
    Flush {
        epoch: String,
        reply: tokio::sync::oneshot::Sender<Result<OutState, String>>,
    },
}

/// Work items queued per stream before senders wait.
const STREAM_WORK_MAX: usize = 1_024;
/// Work items one committer round takes (one commit for all the sends among them).
const STREAM_ROUND_MAX: usize = 256;

/// The one task that changes a stream's state: it runs each round's sends as one commit, then
/// the greatest ack among them, and ends when the stream is dropped. Being the only writer, and
/// never cancelled by a caller, its in-memory state never falls behind the store.
async fn committer(
    store: Arc<dyn keel_store::Store>,
    stream: std::sync::Weak<OutStream>,
    mut rx: tokio::sync::mpsc::Receiver<StreamWork>,
    id_prefix: String,
) {
    let mut recent = Recent::new(id_prefix);
    while let Some(first) = rx.recv().await {
        let mut round = vec![first];
        while round.len() < STREAM_ROUND_MAX {
            match rx.try_recv() {
                Ok(w) => round.push(w),
                Err(_) => break,
            }
        }
        let Some(stream) = stream.upgrade() else {
            return;
        };
        let mut sends = Vec::new();
        let mut acks = Vec::new();
        let mut waiting = Vec::new();
        let mut flushes = Vec::new();
        for w in round {
            match w {
                StreamWork::Send(p) => sends.push(p),
                StreamWork::Ack {
                    stream_id,
                    upto: u,
                    reply,
                } => {
                    acks.push((stream_id, u));
                    waiting.extend(reply);
                }
                StreamWork::Flush { epoch, reply } => flushes.push((epoch, reply)),
            }
        }
        let mut st = stream.state.lock().await;
        let upto = acks
            .iter()
            .filter(|(id, _)| id == st.stream_id())
            .map(|(_, u)| *u)
            .max()
            .unwrap_or(0);
        if !sends.is_empty() {
            // Within the store's bounds per commit (a lone oversized batch fails on its own).
            let mut chunk: Vec<PendingSend> = Vec::new();
            let (mut ops, mut bytes) = (1usize, 0usize);
            for p in sends {
                let (n, b) = (p.items.len(), p.bytes());
                if !chunk.is_empty()
                    && (ops + n > keel_store::BATCH_OPS_MAX
                        || bytes + b > keel_store::BATCH_BYTES_MAX / 2)
                {
                    commit_sends(
                        &*store,
                        &stream,
                        &mut st,
                        std::mem::take(&mut chunk),
                        &mut recent,
                    )
                    .await;
                    (ops, bytes) = (1, 0);
                }
                ops += n;
                bytes += b;
                chunk.push(p);
            }
            commit_sends(&*store, &stream, &mut st, chunk, &mut recent).await;
            stream.next_tick.store(st.next_tick(), Ordering::Release);
            stream.notify.notify_one();
        }
        if upto > 0 || !waiting.is_empty() {
            let r = ack(
                &*store,
                &stream.me,
                &stream.target,
                &mut st,
                upto,
                &mut recent,
            )
            .await;
            for w in waiting {
                let _ = w.send(r.as_ref().map_err(|e| e.to_string()).copied());
            }
            if let Err(e) = r {
                tracing::warn!(target = %stream.target, error = %e, "removing acknowledged messages from the transmission queue failed; the next link's handshake acknowledges them again");
            }
        }
        for (epoch, reply) in flushes {
            let r = flush_one(&*store, &stream, &mut st, &epoch).await;
            let _ = reply.send(r.map_err(|e| e.to_string()));
        }
    }
}

/// Moves `st` onto a new stream for flush `epoch` (one commit), unless it already is one
/// made for that epoch (a repeated request after a lost link).
async fn flush_one(
    store: &dyn keel_store::Store,
    stream: &OutStream,
    st: &mut OutState,
    epoch: &str,
) -> Result<OutState, MessagingError> {
    if st.is_flushed_for(epoch) {
        return Ok(st.clone());
    }
    let new = st.flushed(uuid::Uuid::new_v4().to_string(), Some(epoch));
    store.commit(vec![set_out(&stream.target, &new)]).await?;
    keel_core::faults::hit("bus.source_after_flush");
    emit!(
        catalog::CWSIT0010I,
        stream = st.stream_id(),
        me = stream.me,
        peer = stream.target,
        epoch = epoch,
        messages = new.unacked(),
        new = new.stream_id()
    );
    *st = new;
    stream.next_tick.store(st.next_tick(), Ordering::Release);
    *stream.rows.lock().expect("rows lock") = (
        st.stream_id().to_string(),
        st.row_stream().to_string(),
        st.row_base(),
    );
    // The new stream's first link resends from the store.
    stream.unsent.lock().expect("unsent lock").clear();
    Ok(st.clone())
}

/// One store commit for `batches`, ticks from `st.next_tick()` on; answers each batch.
async fn commit_sends(
    store: &dyn keel_store::Store,
    stream: &OutStream,
    st: &mut OutState,
    batches: Vec<PendingSend>,
    recent: &mut Recent,
) {
    let target = stream.target.as_str();
    let count: usize = batches.iter().map(|b| b.items.len()).sum();
    let new_state = st.assigned(count as u64);
    let mut next = st.next_tick();
    let mut ops = Vec::with_capacity(batches.iter().map(|b| b.items.len()).sum::<usize>() + 1);
    for b in &batches {
        for (p, body) in &b.items {
            ops.push(Op::Put {
                dest: xmit_dest(target, &b.dest),
                id: String::new(),
                priority: p.priority,
                reliability: p.code,
                expiry_ms: p.expiry_ms,
                properties: p.properties.clone(),
                body: body.clone(),
                stream: Some((st.row_stream().to_string(), st.row_of(next))),
            });
            next += 1;
        }
    }
    assert_eq!(next, new_state.next_tick(), "one tick per message");
    ops.push(set_out(target, &new_state));
    match store.commit(ops).await {
        Ok(out) => {
            keel_core::faults::hit("me.after_store_commit");
            let mut row = st.row_of(st.next_tick());
            *st = new_state;
            let mut seqs = out.assigned_seqs.into_iter();
            let mut unsent = stream.unsent.lock().expect("unsent lock");
            unsent.follow(st.row_stream());
            for b in batches {
                let mine: Vec<u64> = seqs.by_ref().take(b.items.len()).collect();
                assert_eq!(mine.len(), b.items.len(), "one seq per message");
                let dest: Arc<str> = xmit_dest(target, &b.dest).into();
                for (seq, (p, body)) in mine.iter().zip(b.items) {
                    recent.push(row, &dest, *seq);
                    // As `out_page` would read the row back (tick relative to the row base).
                    unsent.push(
                        row,
                        StreamMessage {
                            tick: 0,
                            id: recent.id(*seq),
                            dest: b.dest.clone(),
                            priority: p.priority,
                            reliability: p.code,
                            expiry_ms: p.expiry_ms,
                            properties: p.properties,
                            body,
                        },
                    );
                    row += 1;
                }
                let _ = b.reply.send(Ok(mine));
            }
            drop(unsent);
            assert_eq!(row, st.row_of(st.next_tick()), "one row per tick");
        }
        Err(e) => {
            for b in batches {
                let _ = b.reply.send(Err(e.clone()));
            }
        }
    }
}

/// Removes the rows up to `upto` and moves `acked`, one commit per STREAM_PAGE_MAX rows.
async fn ack(
    store: &dyn keel_store::Store,
    me: &str,
    target: &str,
    st: &mut OutState,
    upto: u64,
    recent: &mut Recent,
) -> Result<(), MessagingError> {
    if upto <= st.acked() {
        return Ok(());
    }
    if upto >= st.next_tick() {
        return Err(broken(
            me,
            target,
            format!(
                "engine {target} acknowledged tick {upto} of stream {}, which has only {} ticks",
                st.stream_id(),
                st.next_tick() - 1
            ),
        ));
    }
    while st.acked() < upto {
        let n = usize::try_from(upto - st.acked())
            .unwrap_or(usize::MAX)
            .min(STREAM_PAGE_MAX);
        let first_row = st.row_of(st.acked() + 1);
        // From what this committer stored lately (no read of the rows and their bodies), else
        // from the store.
        let (mut ops, last_tick, last_id) = match recent.deletes(first_row, n) {
            Some((ops, last_id)) => (ops, st.acked() + n as u64, last_id),
            None => {
                let rows = store.by_stream(st.row_stream(), first_row, n).await?;
                let last = rows.last().ok_or_else(|| {
                    broken(
                        me,
                        target,
                        format!(
                            "the transmission queue lacks tick {} of stream {} (a damaged data store)",
                            st.acked() + 1,
                            st.stream_id()
                        ),
                    )
                })?;
                let last_tick = st.tick_of(last.stream.as_ref().map(|s| s.1).expect("tick"));
                let ops = rows
                    .iter()
                    .map(|m| Op::Delete {
                        dest: m.dest.clone(),
                        seq: m.seq,
                    })
                    .collect();
                (ops, last_tick, last.id.clone())
            }
        };
        let new_state = st
            .acked_to(last_tick, last_id)
            .map_err(|e| broken(me, target, e.to_string()))?
            .expect("a page of rows beyond acked moves it");
        assert!(new_state.acked() <= upto, "never past the ack");
        ops.push(set_out(target, &new_state));
        store.commit(ops).await?;
        recent.forget_below(st.row_of(last_tick) + 1);
        *st = new_state;
    }
    Ok(())
}

/// Rows a committer stored lately, by row tick (consecutive), so that acknowledging them
/// deletes by seq without reading the rows and their bodies back. Bounded; a gap (a restart,
/// rows older than the bound) falls back to reading the store. A row's ID is derived (this
/// engine's `<uuid>:<incarnation>:` and its seq), and rows of one batch share their
/// destination name, so remembering a row allocates nothing.
struct Recent {
    /// (row tick, transmission-queue destination, seq).
    rows: std::collections::VecDeque<(u64, Arc<str>, u64)>,
    id_prefix: String,
}

/// Rows a committer remembers.
const RECENT_ROWS_MAX: usize = 16_384;

impl Recent {
    fn new(id_prefix: String) -> Recent {
        Recent {
            rows: std::collections::VecDeque::new(),
            id_prefix,
        }
    }

    fn push(&mut self, row_tick: u64, dest: &Arc<str>, seq: u64) {
        if let Some(last) = self.rows.back() {
            if last.0 + 1 != row_tick {
                // Not consecutive (cannot happen while one committer assigns the ticks; a
                // cheap guard): start over.
                self.rows.clear();
            }
        }
        if self.rows.len() == RECENT_ROWS_MAX {
            self.rows.pop_front();
        }
        self.rows.push_back((row_tick, dest.clone(), seq));
    }

    /// Delete ops for the `n` rows from `first_row` on and the last one's ID, if all known.
    fn deletes(&mut self, first_row: u64, n: usize) -> Option<(Vec<Op>, String)> {
        self.forget_below(first_row);
        let front = self.rows.front()?;
        if front.0 != first_row || self.rows.len() < n {
            return None;
        }
        let ops = self
            .rows
            .iter()
            .take(n)
            .map(|(_, dest, seq)| Op::Delete {
                dest: dest.to_string(),
                seq: *seq,
            })
            .collect();
        let last = &self.rows[n - 1];
        debug_assert_eq!(last.0, first_row + n as u64 - 1);
        Some((ops, self.id(last.2)))
    }

    /// The ID the store gave the row of `seq` (`<uuid>:<incarnation>:<seq>`).
    fn id(&self, seq: u64) -> String {
        format!("{}{}", self.id_prefix, seq)
    }

    fn forget_below(&mut self, row_tick: u64) {
        while self.rows.front().is_some_and(|r| r.0 < row_tick) {
            self.rows.pop_front();
        }
    }
}

/// Messages the committer stored lately that no link has taken to send yet, by row tick
/// (consecutive), so that the link sends them without reading rows and bodies back from the
/// store (that read was most of the source engine's store work across a bus). Bounded by
/// count and bytes: while no link is up the oldest go, and the next link reads those from the
/// store until it reaches what is still here. Taking moves the messages out: a resend reads
/// the store.
#[derive(Default)]
struct Unsent {
    /// The row stream the ticks belong to (a flush clears the whole cache).
    row_stream: String,
    /// (row tick, message with `tick` unset).
    msgs: std::collections::VecDeque<(u64, StreamMessage)>,
    bytes: usize,
}

/// Messages and bytes [`Unsent`] holds at most per stream.
const UNSENT_MAX: usize = 4_096;
const UNSENT_BYTES_MAX: usize = 8 * 1024 * 1024;

impl Unsent {
    fn weight(m: &StreamMessage) -> usize {
        m.body.len() + m.properties.len() + m.id.len() + m.dest.len() + 64
    }

    /// Starts over when the rows now belong to another row stream.
    fn follow(&mut self, row_stream: &str) {
        if self.row_stream != row_stream {
            self.clear();
            self.row_stream = row_stream.to_string();
        }
    }

    fn clear(&mut self) {
        self.msgs.clear();
        self.bytes = 0;
    }

    fn push(&mut self, row_tick: u64, m: StreamMessage) {
        if self
            .msgs
            .back()
            .is_some_and(|(last, _)| last + 1 != row_tick)
        {
            // Not consecutive (cannot happen while one committer assigns the ticks): start
            // over rather than hand out a run with a hole.
            self.clear();
        }
        self.bytes += Unsent::weight(&m);
        self.msgs.push_back((row_tick, m));
        while self.msgs.len() > UNSENT_MAX || (self.msgs.len() > 1 && self.bytes > UNSENT_BYTES_MAX)
        {
            let (_, old) = self.msgs.pop_front().expect("not empty");
            self.bytes -= Unsent::weight(&old);
        }
    }

    /// Up to `limit` messages from `first_row` on of `row_stream`, ticks relative to `base`;
    /// empty unless the cache holds `first_row` itself. What lies before `first_row` was
    /// sent already and is dropped.
    fn take(
        &mut self,
        row_stream: &str,
        first_row: u64,
        limit: usize,
        base: u64,
    ) -> Vec<StreamMessage> {
        if self.row_stream != row_stream {
            return Vec::new();
        }
        while self.msgs.front().is_some_and(|(r, _)| *r < first_row) {
            let (_, old) = self.msgs.pop_front().expect("not empty");
            self.bytes -= Unsent::weight(&old);
        }
        if self.msgs.front().is_none_or(|(r, _)| *r != first_row) {
            return Vec::new();
        }
        let n = limit.min(self.msgs.len());
        let mut out = Vec::with_capacity(n);
        for (row, mut m) in self.msgs.drain(..n) {
            self.bytes -= Unsent::weight(&m);
            assert!(row >= base, "row tick {row} below the row base {base}");
            m.tick = row - base;
            out.push(m);
        }
        out
    }
}

/// One sender's messages waiting for the stream's next commit.
struct PendingSend {
    dest: String,
    items: Vec<(super::Prepared, Vec<u8>)>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<u64>, keel_store::StoreError>>,
}

impl PendingSend {
    /// What its rows weigh in a commit (bodies, properties, a bound for the rest).
    fn bytes(&self) -> usize {
        self.items
            .iter()
            .map(|(p, body)| body.len() + p.properties.len() + 256)
            .sum()
    }
}

/// A message as it travels on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMessage {
    pub tick: u64,
    pub id: String,
    pub dest: String,
    pub priority: u8,
    pub reliability: u8,
    pub expiry_ms: Option<u64>,
    pub properties: Vec<u8>,
    pub body: Vec<u8>,
}

/// Target-side streams are keyed by their source engine too: a peer can only ever touch the
/// streams it sources.
fn in_key(source: &str, stream_id: &str) -> String {
    format!("{source}/{stream_id}")
}

/// The target's first answer to a source's stream (see `Messaging::in_hello`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InHello {
    /// This engine runs a FLUSH: the source must move the stream onto one made for `epoch`.
    FlushNeeded { epoch: String },
    /// What this engine stored of the stream (None: never seen; a retired one has
    /// `retired_ms`).
    Known(Option<InState>),
}

/// Target-side state of one source engine (see `Messaging::in_entry`): its lock serialises
/// every link that carries its streams; the duplicate window is cached under it (loaded
/// once, replaced only after a commit wrote it).
#[derive(Default)]
pub struct InSource {
    seen: Option<Seen>,
    /// Stream prefixes as last committed by `in_deliver` (a read saved per batch; every
    /// writer of a prefix holds the source's lock and keeps this in step).
    prefixes: HashMap<String, InState>,
}

/// Target-side entries, by source engine.
#[derive(Default)]
pub struct InStreams(std::sync::Mutex<HashMap<String, Arc<Mutex<InSource>>>>);

fn xmit_dest(target: &str, dest: &str) -> String {
    format!("{XMIT_PREFIX}{target}:{dest}")
}

fn final_dest(target: &str, xmit: &str) -> Option<String> {
    xmit.strip_prefix(XMIT_PREFIX)?
        .strip_prefix(target)?
        .strip_prefix(':')
        .map(str::to_string)
}

/// A stream whose state does not add up (a damaged store, a peer breaking the protocol, or
/// two links racing): the link ends and is opened again from the stores' state.
fn broken(me: &str, peer: &str, problem: String) -> MessagingError {
    MessagingError::Stream {
        me: me.to_string(),
        peer: peer.to_string(),
        problem,
    }
}

/// The in-memory map of source streams, by target engine.
#[derive(Default)]
pub struct OutStreams(std::sync::Mutex<HashMap<String, Arc<OutStream>>>);

impl Messaging {
    /// The engine holding `dest` when it is a queue of this bus on another engine.
    pub fn remote_queue(&self, dest: &str) -> Option<&DestinationCfg> {
        self.bus_destinations
            .get(dest)
            .filter(|d| d.kind == keel_config::DestinationKind::Queue && d.me != self.me)
    }

    /// The source stream towards `target`, from the store or new (a new stream is written with
    /// its first message).
    pub async fn out_stream(&self, target: &str) -> Result<Arc<OutStream>, MessagingError> {
        if let Some(s) = self.out_streams.0.lock().expect("streams lock").get(target) {
            return Ok(s.clone());
        }
        let state = match self.store.kv_get(OUT_KV, target).await? {
            Some(bytes) => decode_out(&self.me, target, &bytes)?,
            None => fresh_out(),
        };
        let mut map = self.out_streams.0.lock().expect("streams lock");
        let s = map
            .entry(target.to_string())
            .or_insert_with(|| {
                let (work, rx) = tokio::sync::mpsc::channel(STREAM_WORK_MAX);
                let stream = Arc::new(OutStream {
                    me: self.me.clone(),
                    target: target.to_string(),
                    rows: std::sync::Mutex::new((
                        state.stream_id().to_string(),
                        state.row_stream().to_string(),
                        state.row_base(),
                    )),
                    next_tick: std::sync::atomic::AtomicU64::new(state.next_tick()),
                    state: Mutex::new(state),
                    work,
                    notify: Notify::new(),
                    unsent: std::sync::Mutex::new(Unsent::default()),
                });
                tokio::spawn(committer(
                    self.store.clone(),
                    Arc::downgrade(&stream),
                    rx,
                    format!("{}:{}:", self.uuid, self.incarnation),
                ));
                stream
            })
            .clone();
        Ok(s)
    }

    /// Stores `msgs` for `cfg` (a queue on another engine) on the stream towards its engine.
    /// Resolves once durable. The stream's committer task stores every batch waiting at a time
    /// in one commit (rows and the stream's new `next_tick`), so ticks reach the store in the
    /// order they are assigned, many producers share one commit, and a sender that goes away
    /// mid-commit cannot leave the stream's state behind its store.
    pub(crate) async fn send_remote(
        &self,
        cfg: &DestinationCfg,
        msgs: Vec<OutgoingMessage>,
    ) -> Result<Vec<Result<String, MessagingError>>, MessagingError> {
        let stream = self.out_stream(&cfg.me).await?;
        let mut results: Vec<Option<Result<String, MessagingError>>> =
            (0..msgs.len()).map(|_| None).collect();
        let mut accepted = Vec::new();
        let mut items = Vec::new();
        for (i, m) in msgs.into_iter().enumerate() {
            match self.prepare(cfg, &m) {
                Ok(p) => {
                    accepted.push(i);
                    items.push((p, m.body));
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        if !accepted.is_empty() {
            let (reply, seqs) = tokio::sync::oneshot::channel();
            let closed = || {
                MessagingError::Store(Box::new(keel_store::StoreError::Closed {
                    me: self.me.clone(),
                }))
            };
            stream
                .work
                .send(StreamWork::Send(PendingSend {
                    dest: cfg.name.clone(),
                    items,
                    reply,
                }))
                .await
                .map_err(|_| closed())?;
            let seqs = seqs.await.map_err(|_| closed())??;
            assert_eq!(seqs.len(), accepted.len());
            for (i, seq) in accepted.into_iter().zip(seqs) {
                results[i] = Some(Ok(format!("{}:{}:{seq}", self.uuid, self.incarnation)));
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every message of a batch has a result"))
            .collect())
    }

    /// Up to `limit` messages of stream `stream_id` towards `target` from tick `from` on, in
    /// order. Takes no lock: a sender committing meanwhile does not hold it up.
    pub async fn out_page(
        &self,
        target: &str,
        stream_id: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<StreamMessage>, MessagingError> {
        assert!(from >= 1 && (1..=STREAM_PAGE_MAX).contains(&limit));
        let stream = self.out_stream(target).await?;
        let (wire, row_stream, base) = stream.rows();
        if wire != stream_id {
            return Err(broken(
                &self.me,
                target,
                format!("stream {stream_id} was replaced by stream {wire} (a flush)"),
            ));
        }
        let cached =
            stream
                .unsent
                .lock()
                .expect("unsent lock")
                .take(&row_stream, from + base, limit, base);
        if !cached.is_empty() {
            assert!(
                cached.iter().zip(from..).all(|(m, t)| m.tick == t),
                "a consecutive run from tick {from}"
            );
            return Ok(cached);
        }
        let rows = self
            .store
            .by_stream(&row_stream, from + base, limit)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (expect, m) in (from..).zip(rows) {
            let tick = m
                .stream
                .as_ref()
                .map(|s| s.1)
                .expect("a stream row has a tick")
                - base;
            // Rows are exactly acked+1 .. next_tick: a hole is a broken store, not a state.
            if tick != expect {
                return Err(broken(&self.me, target, format!(
                    "the transmission queue lacks tick {expect} of stream {stream_id} (found {tick}; a damaged data store)"
                )));
            }
            out.push(stream_message(&self.me, target, tick, m)?);
        }
        Ok(out)
    }

    /// The target has every tick up to `upto` of stream `stream_id`: its rows leave the
    /// transmission queue and `acked` moves, in one commit (by the stream's committer). Acks
    /// at or below `acked`, or for a stream a flush replaced, change nothing. Resolves once
    /// done.
    pub async fn out_acked(
        &self,
        target: &str,
        stream_id: &str,
        upto: u64,
    ) -> Result<(), MessagingError> {
        self.ask_committer(target, |reply| StreamWork::Ack {
            stream_id: stream_id.to_string(),
            upto,
            reply: Some(reply),
        })
        .await
    }

    /// Hands the stream's committer one work item and waits for its answer.
    async fn ask_committer<T>(
        &self,
        target: &str,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, String>>) -> StreamWork,
    ) -> Result<T, MessagingError> {
        let stream = self.out_stream(target).await?;
        let (reply, done) = tokio::sync::oneshot::channel();
        let closed = || {
            MessagingError::Store(Box::new(keel_store::StoreError::Closed {
                me: self.me.clone(),
            }))
        };
        stream.work.send(make(reply)).await.map_err(|_| closed())?;
        done.await
            .map_err(|_| closed())?
            .map_err(MessagingError::Relayed)
    }

    /// The ID of the stream's message at `tick`, if this side still knows it.
    pub async fn out_identity_at(
        &self,
        target: &str,
        tick: u64,
    ) -> Result<Option<String>, MessagingError> {
        let stream = self.out_stream(target).await?;
        // Held across the read: the committer cannot remove the row meanwhile.
        let st = stream.state.lock().await;
        if tick == st.acked() {
            return Ok(st.acked_identity().map(str::to_string));
        }
        if st.unacked_ticks().contains(&tick) {
            let row = st.row_of(tick);
            let rows = self.store.by_stream(st.row_stream(), row, 1).await?;
            return Ok(rows
                .into_iter()
                .next()
                .filter(|m| m.stream.as_ref().is_some_and(|s| s.1 == row))
                .map(|m| m.id));
        }
        Ok(None)
    }

    /// Moves the stream towards `target` onto a new stream made for flush `epoch` (a peer
    /// that runs a FLUSH asked for it); returns the new stream's state. Its unacknowledged
    /// messages become ticks 1 .. of the new stream, in order; messages sent from now on
    /// follow them.
    pub async fn out_flush(&self, target: &str, epoch: &str) -> Result<OutState, MessagingError> {
        self.ask_committer(target, |reply| StreamWork::Flush {
            epoch: epoch.to_string(),
            reply,
        })
        .await
    }

    /// The flush this engine runs, if a peer has not confirmed it yet.
    pub async fn flush_status(&self) -> Option<FlushRecord> {
        self.flush.lock().await.clone()
    }

    /// The epoch of this engine's flush when `peer` still has to move its stream towards
    /// this engine onto a stream made for it.
    async fn flush_wanted_from(&self, peer: &str) -> Option<String> {
        let f = self.flush.lock().await;
        let f = f.as_ref()?;
        let p = f.peers.get(peer)?;
        (!p.inbound).then(|| f.epoch.clone())
    }

    /// Records that `peer` confirmed one side of this engine's flush; when that was the last
    /// confirmation the flush is complete: the record goes and the restored mark is cleared
    /// in one commit, and `CWSIP0783E` is logged.
    pub async fn flush_confirm(&self, peer: &str, side: FlushSide) -> Result<(), MessagingError> {
        let mut guard = self.flush.lock().await;
        let Some(record) = guard.as_ref() else {
            return Ok(());
        };
        let Some(p) = record.peers.get(peer) else {
            return Ok(());
        };
        let done = match side {
            FlushSide::Outbound => p.outbound,
            FlushSide::Inbound => p.inbound,
        };
        if done {
            return Ok(());
        }
        let mut next = record.clone();
        let p = next.peers.get_mut(peer).expect("present");
        match side {
            FlushSide::Outbound => p.outbound = true,
            FlushSide::Inbound => p.inbound = true,
        }
        let complete = next.is_complete();
        let ops = if complete {
            vec![
                Op::DeleteKv {
                    space: FLUSH_KV.into(),
                    key: FLUSH_KEY.into(),
                },
                Op::SetRestoreState(keel_store::RestoreState::None),
            ]
        } else {
            vec![Op::SetKv {
                space: FLUSH_KV.into(),
                key: FLUSH_KEY.into(),
                value: serde_json::to_vec(&next).expect("flush record serializes"),
            }]
        };
        self.store.commit(ops).await?;
        keel_core::faults::hit("bus.flush_after_confirm");
        emit!(
            catalog::CWSIP0110I,
            me = self.me,
            peer = peer,
            side = match side {
                FlushSide::Outbound => "its stream from this engine",
                FlushSide::Inbound => "its stream towards this engine",
            },
            waiting = next.waiting_for()
        );
        if complete {
            *guard = None;
            emit!(catalog::CWSIP0783E, me = self.me);
        } else {
            *guard = Some(next);
        }
        Ok(())
    }

    /// The target-side entry of `source`: its lock serialises every link that carries one of
    /// its streams (a reconnect can overlap an old link's last commit).
    fn in_entry(&self, source: &str) -> Arc<Mutex<InSource>> {
        self.in_streams
            .0
            .lock()
            .expect("streams lock")
            .entry(source.to_string())
            .or_insert_with(|| Arc::new(Mutex::new(InSource::default())))
            .clone()
    }

    /// What this engine has stored of `source`'s stream `stream_id` (as its target).
    pub async fn in_state(
        &self,
        source: &str,
        stream_id: &str,
    ) -> Result<Option<InState>, MessagingError> {
        let entry = self.in_entry(source);
        let _one = entry.lock().await;
        self.read_in_state(source, stream_id).await
    }

    /// The target's side of the handshake for `source`'s stream `hello` (before the
    /// tick-level verdict): whether this engine's own FLUSH needs that stream flushed first,
    /// and otherwise what is stored of it. A stream made by a FLUSH of the source retires
    /// every older stream of that source (never taken again), in one commit with the new
    /// stream's empty prefix; one made for this engine's flush confirms its inbound side.
    pub async fn in_hello(
        &self,
        source: &str,
        stream_id: &str,
        flush_epoch: Option<&str>,
        resend_upto: u64,
    ) -> Result<InHello, MessagingError> {
        let wanted = self.flush_wanted_from(source).await;
        if let Some(epoch) = &wanted {
            if flush_epoch != Some(epoch.as_str()) {
                return Ok(InHello::FlushNeeded {
                    epoch: epoch.clone(),
                });
            }
        }
        let entry = self.in_entry(source);
        let mut one = entry.lock().await;
        let state = self.read_in_state(source, stream_id).await?;
        if state.is_none() && flush_epoch.is_some() {
            // Cleared first: a failed commit may still have retired them.
            one.prefixes.clear();
            self.retire_others(source, stream_id, resend_upto).await?;
        }
        drop(one);
        if wanted.is_some() {
            self.flush_confirm(source, FlushSide::Inbound).await?;
        }
        Ok(InHello::Known(state))
    }

    /// Marks every stream of `source` but `keep` retired, drops the oldest retired beyond
    /// RETIRED_MAX, and records `keep` with an empty prefix: one commit. Caller holds the
    /// source's lock.
    async fn retire_others(
        &self,
        source: &str,
        keep: &str,
        resend_upto: u64,
    ) -> Result<(), MessagingError> {
        let prefix = format!("{source}/");
        let now = keel_core::unix_ms();
        let mut retired = Vec::new();
        let mut ops = Vec::new();
        for (key, bytes) in self.store.kv_scan(IN_KV).await? {
            let Some(id) = key.strip_prefix(&prefix) else {
                continue;
            };
            let mut st: InState = serde_json::from_slice(&bytes).map_err(|e| {
                broken(
                    &self.me,
                    source,
                    format!("the recorded state of stream {id} does not decode ({e})"),
                )
            })?;
            if st.retired_ms.is_none() {
                st.retired_ms = Some(now);
                ops.push(Op::SetKv {
                    space: IN_KV.into(),
                    key: key.clone(),
                    value: serde_json::to_vec(&st).expect("stream state serializes"),
                });
            }
            retired.push((st.retired_ms.unwrap_or(now), key));
        }
        retired.sort();
        let excess = retired.len().saturating_sub(RETIRED_MAX);
        for (_, key) in retired.into_iter().take(excess) {
            ops.retain(|o| !matches!(o, Op::SetKv { key: k, .. } if *k == key));
            ops.push(Op::DeleteKv {
                space: IN_KV.into(),
                key,
            });
        }
        ops.push(Op::SetKv {
            space: IN_KV.into(),
            key: in_key(source, keep),
            value: serde_json::to_vec(&InState {
                tick: 0,
                identity: None,
                retired_ms: None,
                resend_upto,
            })
            .expect("stream state serializes"),
        });
        self.store.commit(ops).await?;
        Ok(())
    }

    async fn read_in_state(
        &self,
        source: &str,
        stream_id: &str,
    ) -> Result<Option<InState>, MessagingError> {
        match self.store.kv_get(IN_KV, &in_key(source, stream_id)).await? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                broken(
                    &self.me,
                    source,
                    format!("the recorded state of stream {stream_id} does not decode ({e})"),
                )
            }),
        }
    }

    /// Stores the next in-order messages of a stream (ticks consecutive from its prefix + 1)
    /// and the stream's new prefix in one commit, then makes them available. A destination
    /// this engine does not hold (the bus was reconfigured meanwhile) sends its message to the
    /// exception destination rather than dropping it.
    pub async fn in_deliver(
        &self,
        source: &str,
        stream_id: &str,
        msgs: Vec<StreamMessage>,
    ) -> Result<(), MessagingError> {
        let Some(last) = msgs.last() else {
            return Ok(());
        };
        assert!(
            msgs.windows(2).all(|w| w[1].tick == w[0].tick + 1),
            "a stream's messages are stored in tick order, without gaps"
        );
        // Under the source's lock, against the store's prefix (never a cached one): a link
        // that started from an older prefix while another link stored more must not store
        // those messages again.
        let entry = self.in_entry(source);
        let mut one = entry.lock().await;
        let stored = match one.prefixes.get(stream_id) {
            Some(p) => Some(p.clone()),
            None => self.read_in_state(source, stream_id).await?,
        };
        if stored.as_ref().is_some_and(|s| s.retired_ms.is_some()) {
            return Err(broken(
                &self.me,
                source,
                format!("stream {stream_id} was replaced by a flush; nothing of it is taken"),
            ));
        }
        let resend_upto = stored.as_ref().map_or(0, |p| p.resend_upto);
        let prefix = stored.map_or(0, |p| p.tick);
        if msgs[0].tick != prefix + 1 {
            return Err(broken(&self.me, source, format!(
                "tick {} of stream {stream_id} does not follow the stored prefix {prefix} (another link stored it first)",
                msgs[0].tick
            )));
        }
        let state = InState {
            tick: last.tick,
            identity: Some(last.id.clone()),
            retired_ms: None,
            resend_upto,
        };
        assert!(state.tick > prefix, "a target's prefix only grows");
        // The duplicate window: a message of the source at or below its incarnation's mark
        // was delivered before (resent after a FLUSH): it only moves the prefix.
        let now = keel_core::unix_ms();
        let source_uuid = self.peer_uuids.get(source);
        let mut seen = match one.seen.clone() {
            Some(s) => s,
            None => match self.store.kv_get(SEEN_KV, source).await? {
                None => Seen::default(),
                Some(b) => serde_json::from_slice(&b).map_err(|e| {
                    broken(
                        &self.me,
                        source,
                        format!("its recorded duplicate window does not decode ({e})"),
                    )
                })?,
            },
        };
        let mut duplicates = 0usize;
        let msgs: Vec<StreamMessage> = msgs
            .into_iter()
            .filter(|m| match parse_system_id(&m.id) {
                Some((uuid, inc, seq)) if source_uuid.is_some_and(|u| u == uuid) => {
                    // Every delivery moves the marks; only a resent tick can be dropped.
                    let new = seen.admit(inc, seq, now);
                    let drop = !new && m.tick <= resend_upto;
                    duplicates += usize::from(drop);
                    !drop
                }
                _ => true,
            })
            .collect();
        seen.prune(now, self.duplicate_window_ms);
        if duplicates > 0 {
            tracing::info!(me = %self.me, source, stream = stream_id, duplicates, "dropped messages the source resent after a flush: this engine had them already");
        }
        let mut placed = Vec::with_capacity(msgs.len());
        let mut ops = Vec::with_capacity(msgs.len() + 2);
        // Messages of a batch mostly share their queue: one lookup and one refill mark for
        // each run of them (taken before the commit, like a local batch's).
        let mut last: Option<(Arc<super::QueuePoint>, RefillMark)> = None;
        for m in msgs {
            let (q, mark) = match last.as_ref() {
                Some((q, mark)) if q.cfg.name == m.dest => (q.clone(), *mark),
                _ => {
                    let q = match self.queue(&m.dest) {
                        Ok(q) => q,
                        Err(e) => {
                            tracing::warn!(dest = %m.dest, id = %m.id, error = %e, "a message from another engine is for a destination this engine does not hold; it goes to the exception destination");
                            self.queue(&self.exception)?
                        }
                    };
                    let mark = q.state.lock().expect("queue lock").refill_mark();
                    if q.cfg.name == m.dest {
                        last = Some((q.clone(), mark));
                    }
                    (q, mark)
                }
            };
            ops.push(Op::Put {
                dest: q.cfg.name.clone(),
                id: m.id.clone(),
                priority: m.priority,
                reliability: m.reliability,
                expiry_ms: m.expiry_ms,
                properties: m.properties.clone(),
                body: m.body.clone(),
                stream: None,
            });
            placed.push((q, mark, m));
        }
        ops.push(Op::SetKv {
            space: IN_KV.into(),
            key: in_key(source, stream_id),
            value: serde_json::to_vec(&state).expect("stream state serializes"),
        });
        ops.push(Op::SetKv {
            space: SEEN_KV.into(),
            key: source.to_string(),
            value: serde_json::to_vec(&seen).expect("duplicate window serializes"),
        });
        let pending = super::OffersPending {
            queues: placed.iter().map(|(q, _, _)| q.clone()).collect(),
        };
        // Until the commit answers, the cached prefix is unknown (a failed or cancelled commit
        // may or may not have landed): the next batch reads the store.
        one.prefixes.remove(stream_id);
        let out = self.store.commit(ops).await?;
        one.seen = Some(seen);
        one.prefixes.insert(stream_id.to_string(), state);
        keel_core::faults::hit("bus.target_after_commit");
        assert_eq!(out.assigned_seqs.len(), placed.len());
        for ((q, mark, m), seq) in placed.into_iter().zip(out.assigned_seqs) {
            let e = Entry {
                seq,
                id: m.id,
                priority: m.priority,
                reliability: m.reliability,
                expiry_ms: m.expiry_ms,
                delivery_count: 0,
                properties: m.properties,
                body: m.body,
                persistent: true,
            };
            q.state
                .lock()
                .expect("queue lock")
                .offer_persistent(e, mark);
            q.counters.sent.fetch_add(1, Ordering::Relaxed);
            q.counters.depth.fetch_add(1, Ordering::Relaxed);
            q.notify.notify_one();
        }
        pending.done();
        Ok(())
    }
}

/// The FLUSH start of an engine (DESIGN §5 (a)), before it takes work: every outgoing stream
/// moves onto a new stream (its unacknowledged messages renumbered from tick 1, no row
/// rewritten), and the record of which peers must confirm is written, with the store's restore
/// state (`flush-pending`, or `none` when there is no peer to wait for), in one commit.
/// Returns the record (None: nothing to wait for), the streams moved and their messages.
pub async fn begin_flush(
    store: &dyn keel_store::Store,
    me: &str,
    peers: &[(String, String)],
) -> Result<(Option<FlushRecord>, usize, u64), MessagingError> {
    let epoch = uuid::Uuid::new_v4().to_string();
    let mut ops = Vec::new();
    let mut messages = 0;
    let outs = store.kv_scan(OUT_KV).await?;
    // A peer this engine's store has no stream towards still gets a stream made for this
    // flush: its target then retires whatever older streams of this engine it knows (they may
    // come from history the restore took away), so none of them is ever taken again.
    for (peer, _) in peers {
        if !outs.iter().any(|(t, _)| t == peer) {
            let new = OutState::new_for_flush(uuid::Uuid::new_v4().to_string(), &epoch);
            ops.push(set_out(peer, &new));
        }
    }
    let streams = outs.len();
    for (target, bytes) in outs {
        let st = decode_out(me, &target, &bytes)?;
        let new = st.flushed(uuid::Uuid::new_v4().to_string(), Some(&epoch));
        messages += new.unacked();
        ops.push(set_out(&target, &new));
    }
    let record = (!peers.is_empty()).then(|| FlushRecord {
        epoch,
        started_ms: keel_core::unix_ms(),
        peers: peers
            .iter()
            .map(|(p, _)| (p.clone(), PeerFlush::default()))
            .collect(),
    });
    match &record {
        Some(r) => {
            ops.push(Op::SetKv {
                space: FLUSH_KV.into(),
                key: FLUSH_KEY.into(),
                value: serde_json::to_vec(r).expect("flush record serializes"),
            });
            ops.push(Op::SetRestoreState(keel_store::RestoreState::FlushPending));
        }
        None => {
            ops.push(Op::DeleteKv {
                space: FLUSH_KV.into(),
                key: FLUSH_KEY.into(),
            });
            ops.push(Op::SetRestoreState(keel_store::RestoreState::None));
        }
    }
    store.commit(ops).await?;
    Ok((record, streams, messages))
}

/// The FLUSH a store records as waiting for peers, less peers that left the bus (a normal
/// start continues it). Ok(None) when nothing is left to wait for: the completion (record
/// deleted, restore state `none`) is committed here.
pub async fn continue_flush(
    store: &dyn keel_store::Store,
    me: &str,
    peers: &[(String, String)],
) -> Result<Option<FlushRecord>, MessagingError> {
    let Some(mut record) = pending_flush(store, me).await? else {
        store
            .commit(vec![Op::SetRestoreState(keel_store::RestoreState::None)])
            .await?;
        return Ok(None);
    };
    let changed = record.keep_only(peers);
    if record.is_complete() {
        store
            .commit(vec![
                Op::DeleteKv {
                    space: FLUSH_KV.into(),
                    key: FLUSH_KEY.into(),
                },
                Op::SetRestoreState(keel_store::RestoreState::None),
            ])
            .await?;
        return Ok(None);
    }
    if changed {
        store
            .commit(vec![Op::SetKv {
                space: FLUSH_KV.into(),
                key: FLUSH_KEY.into(),
                value: serde_json::to_vec(&record).expect("flush record serializes"),
            }])
            .await?;
    }
    Ok(Some(record))
}

/// The FLUSH a store records as waiting for peers.
async fn pending_flush(
    store: &dyn keel_store::Store,
    me: &str,
) -> Result<Option<FlushRecord>, MessagingError> {
    match store.kv_get(FLUSH_KV, FLUSH_KEY).await? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            broken(
                me,
                "every peer",
                format!("the recorded flush does not decode ({e})"),
            )
        }),
    }
}

fn stream_message(
    me: &str,
    target: &str,
    tick: u64,
    m: StoredMessage,
) -> Result<StreamMessage, MessagingError> {
    let dest = final_dest(target, &m.dest).ok_or_else(|| {
        broken(
            me,
            target,
            format!(
                "transmission queue row {} has destination {} (a damaged data store)",
                m.seq, m.dest
            ),
        )
    })?;
    Ok(StreamMessage {
        tick,
        id: m.id,
        dest,
        priority: m.priority,
        reliability: m.reliability,
        expiry_ms: m.expiry_ms,
        properties: m.properties,
        body: m.body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_duplicate_window_drops_only_what_an_incarnation_delivered() {
        let mut seen = Seen::default();
        assert!(seen.admit(7, 10, 1_000));
        assert!(seen.admit(7, 11, 1_000));
        assert!(!seen.admit(7, 11, 1_000), "redelivered");
        assert!(!seen.admit(7, 3, 1_000), "older in the same incarnation");
        assert!(
            seen.admit(8, 1, 1_000),
            "another incarnation has its own mark"
        );
        // Pruned by age: the incarnation-7 mark was last moved at 1 000.
        seen.prune(1_000 + 500, 400);
        assert!(seen.marks.is_empty());
        assert!(seen.admit(7, 3, 2_000), "forgotten after the window");
        // Pruned by count: the least recently moved go first.
        let mut many = Seen::default();
        for inc in 0..(SEEN_INCARNATIONS_MAX as u64 + 10) {
            many.admit(inc, 1, inc);
        }
        many.prune(0, u64::MAX);
        assert_eq!(many.marks.len(), SEEN_INCARNATIONS_MAX);
        assert!(!many.marks.contains_key(&0) && many.marks.contains_key(&265));
    }

    #[test]
    fn system_ids_split_into_uuid_incarnation_and_seq() {
        let id = "0b5e0c1e-5a1d-4c38-9c0e-b3e1c0ffee00:1795625557399:42";
        assert_eq!(
            parse_system_id(id),
            Some((
                "0b5e0c1e-5a1d-4c38-9c0e-b3e1c0ffee00",
                1_795_625_557_399,
                42
            ))
        );
        assert_eq!(parse_system_id("app-id-7"), None);
        assert_eq!(parse_system_id("a:b:c"), None);
    }

    fn unsent_message(body_bytes: usize) -> StreamMessage {
        StreamMessage {
            tick: 0,
            id: "u:1:1".into(),
            dest: "q".into(),
            priority: 4,
            reliability: 4,
            expiry_ms: None,
            properties: Vec::new(),
            body: vec![7; body_bytes],
        }
    }

    #[test]
    fn unsent_is_bounded_and_hands_out_only_runs_that_start_where_asked() {
        let mut u = Unsent::default();
        u.follow("s");
        // The count bound: the oldest go.
        for row in 1..=(UNSENT_MAX as u64 + 10) {
            u.push(row, unsent_message(10));
        }
        assert_eq!(u.msgs.len(), UNSENT_MAX);
        assert_eq!(u.msgs.front().unwrap().0, 11);
        // Asked for a row it no longer holds: nothing (the caller reads the store).
        assert!(u.take("s", 5, 100, 0).is_empty());
        // Another row stream: nothing.
        assert!(u.take("other", 11, 100, 0).is_empty());
        // From its first row: a run, ticks relative to the base; taken once.
        let run = u.take("s", 11, 100, 10);
        assert_eq!(run.len(), 100);
        assert!(run.iter().zip(1..).all(|(m, t)| m.tick == t));
        assert!(
            u.take("s", 11, 100, 10).is_empty(),
            "taken messages are gone"
        );
        // Asking past rows drops them (sent already).
        let run = u.take("s", 200, 1, 0);
        assert_eq!((run.len(), run[0].tick), (1, 200));
        assert_eq!(u.msgs.front().unwrap().0, 201);
        // The byte bound: the oldest go, one message always stays.
        u.clear();
        for row in 1..=20 {
            u.push(row, unsent_message(1024 * 1024));
        }
        assert!(u.bytes <= UNSENT_BYTES_MAX && u.msgs.len() < 20);
        assert_eq!(
            u.bytes,
            u.msgs.iter().map(|(_, m)| Unsent::weight(m)).sum::<usize>()
        );
        u.clear();
        u.push(1, unsent_message(UNSENT_BYTES_MAX + 1));
        assert_eq!(u.msgs.len(), 1);
        // A hole starts over.
        u.push(5, unsent_message(1));
        assert_eq!(u.msgs.len(), 1);
        assert_eq!(u.msgs.front().unwrap().0, 5);
    }

    #[test]
    fn recent_rows_answer_only_consecutive_runs_from_the_first_unacknowledged() {
        let mut r = Recent::new("u:1:".into());
        let dest: Arc<str> = "_XMIT:x:q".into();
        for t in 5..10 {
            r.push(t, &dest, 100 + t);
        }
        assert!(r.deletes(4, 2).is_none(), "row 4 is not remembered");
        let (ops, last) = r.deletes(5, 3).unwrap();
        assert_eq!(ops.len(), 3);
        assert_eq!(last, "u:1:107");
        assert!(r.deletes(6, 10).is_none(), "more than remembered");
        r.push(20, &dest, 1);
        assert_eq!(r.rows.len(), 1, "a gap starts over");
    }

    #[test]
    fn transmission_destinations_round_trip() {
        let x = super::xmit_dest("node01.server2-bus1", "a:b.c");
        assert_eq!(
            super::final_dest("node01.server2-bus1", &x).as_deref(),
            Some("a:b.c")
        );
        assert_eq!(super::final_dest("node01.server3-bus1", &x), None);
    }
}

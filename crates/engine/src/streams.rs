//! Delivery streams as the engine keeps them (DESIGN §5): a message for a queue whose queue
//! point is on another engine of the bus waits on this engine's *transmission queue* towards
//! that engine, numbered by the stream's ticks, until the target acknowledges it; the target
//! stores each in-order message together with its stream's new prefix. The link that carries
//! the frames is the server's (`keel_server::links`); the protocol decisions are keel-bus's.
//!
//! Persistence, each change in the same store transaction as the message change it describes:
//! - source: a transmission-queue row per message (`dest` = `_XMIT:<target>:<final dest>`,
//!   `stream` = (stream id, tick)) and the stream's [`OutState`] (kv space `streams.out`, key =
//!   target engine), whose `next_tick` moves with the rows; an acknowledgement deletes the rows
//!   up to it and moves `acked` in one commit;
//! - target: the delivered message (its original ID kept) and the stream's [`InState`] (kv
//!   space `streams.in`, key = stream id) in one commit.
//!
//! Invariants: one committer task per stream is the only writer of its state (so no caller
//! can cancel a change mid-commit); it assigns ticks in commit order, so the rows of a
//! stream are exactly the ticks `acked + 1 .. next_tick`; a target's prefix only grows.
//! Deliberately absent so far: FLUSH of streams with peers, remote get, and non-persistent
//! remote sends (every remote message is stored on the transmission queue).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use keel_config::DestinationCfg;
use keel_store::{Op, StoredMessage};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify};

use super::{Messaging, MessagingError, OutgoingMessage};
use crate::queue::Entry;

pub const OUT_KV: &str = "streams.out";
pub const IN_KV: &str = "streams.in";
const XMIT_PREFIX: &str = "_XMIT:";
/// Rows read or acknowledged per store call.
pub const STREAM_PAGE_MAX: usize = 512;

/// A source stream's durable state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutState {
    pub stream_id: String,
    pub next_tick: u64,
    pub acked: u64,
    /// ID of the message at tick `acked` (None when `acked` is 0): the fork check compares it.
    pub acked_identity: Option<String>,
}

/// A target stream's durable state: every tick up to `tick` is stored here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InState {
    pub tick: u64,
    pub identity: Option<String>,
}

/// One source stream towards a target engine.
pub struct OutStream {
    /// This engine, and the engine the stream goes to.
    me: String,
    pub target: String,
    state: Mutex<OutState>,
    /// To the stream's committer task (bounded: senders wait when it is full).
    work: tokio::sync::mpsc::Sender<StreamWork>,
    /// Woken when new messages are on the stream.
    pub notify: Notify,
}

impl OutStream {
    pub async fn state(&self) -> OutState {
        self.state.lock().await.clone()
    }

    /// Asks the committer to remove what the target acknowledged, without waiting (a later
    /// ack covers one that did not fit).
    pub fn ack_later(&self, upto: u64) {
        let _ = self.work.try_send(StreamWork::Ack { upto, reply: None });
    }
}

/// Work items a stream's committer takes, in order.
enum StreamWork {
    Send(PendingSend),
    Ack {
        upto: u64,
        /// The outcome, as the error's sentence (the error itself is logged here).
        reply: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
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
) {
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
        let mut upto = 0;
        let mut waiting = Vec::new();
        for w in round {
            match w {
                StreamWork::Send(p) => sends.push(p),
                StreamWork::Ack { upto: u, reply } => {
                    upto = upto.max(u);
                    waiting.extend(reply);
                }
            }
        }
        let mut st = stream.state.lock().await;
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
                    commit_sends(&*store, &stream.target, &mut st, std::mem::take(&mut chunk))
                        .await;
                    (ops, bytes) = (1, 0);
                }
                ops += n;
                bytes += b;
                chunk.push(p);
            }
            commit_sends(&*store, &stream.target, &mut st, chunk).await;
            stream.notify.notify_one();
        }
        if upto > 0 || !waiting.is_empty() {
            let r = ack(&*store, &stream.me, &stream.target, &mut st, upto).await;
            for w in waiting {
                let _ = w.send(r.as_ref().map_err(|e| e.to_string()).copied());
            }
            if let Err(e) = r {
                tracing::warn!(target = %stream.target, error = %e, "removing acknowledged messages from the transmission queue failed; the next link's handshake acknowledges them again");
            }
        }
    }
}

/// One store commit for `batches`, ticks from `st.next_tick` on; answers each batch.
async fn commit_sends(
    store: &dyn keel_store::Store,
    target: &str,
    st: &mut OutState,
    batches: Vec<PendingSend>,
) {
    let mut next = st.next_tick;
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
                stream: Some((st.stream_id.clone(), next)),
            });
            next += 1;
        }
    }
    let new_state = OutState {
        next_tick: next,
        ..st.clone()
    };
    ops.push(Op::SetKv {
        space: OUT_KV.into(),
        key: target.to_string(),
        value: serde_json::to_vec(&new_state).expect("stream state serializes"),
    });
    match store.commit(ops).await {
        Ok(out) => {
            keel_core::faults::hit("me.after_store_commit");
            *st = new_state;
            let mut seqs = out.assigned_seqs.into_iter();
            for b in batches {
                let mine: Vec<u64> = seqs.by_ref().take(b.items.len()).collect();
                assert_eq!(mine.len(), b.items.len(), "one seq per message");
                let _ = b.reply.send(Ok(mine));
            }
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
) -> Result<(), MessagingError> {
    if upto <= st.acked {
        return Ok(());
    }
    if upto >= st.next_tick {
        return Err(broken(
            me,
            target,
            format!(
                "engine {target} acknowledged tick {upto} of stream {}, which has only {} ticks",
                st.stream_id,
                st.next_tick - 1
            ),
        ));
    }
    while st.acked < upto {
        let n = usize::try_from(upto - st.acked)
            .unwrap_or(usize::MAX)
            .min(STREAM_PAGE_MAX);
        let rows = store.by_stream(&st.stream_id, st.acked + 1, n).await?;
        let last = rows.last().ok_or_else(|| {
            broken(
                me,
                target,
                format!(
                    "the transmission queue lacks tick {} of stream {} (a damaged data store)",
                    st.acked + 1,
                    st.stream_id
                ),
            )
        })?;
        let last_tick = last.stream.as_ref().map(|s| s.1).expect("tick");
        let new_state = OutState {
            acked: last_tick,
            acked_identity: Some(last.id.clone()),
            ..st.clone()
        };
        let mut ops: Vec<Op> = rows
            .iter()
            .map(|m| Op::Delete {
                dest: m.dest.clone(),
                seq: m.seq,
            })
            .collect();
        ops.push(Op::SetKv {
            space: OUT_KV.into(),
            key: target.to_string(),
            value: serde_json::to_vec(&new_state).expect("stream state serializes"),
        });
        store.commit(ops).await?;
        assert!(new_state.acked > st.acked && new_state.acked <= upto);
        *st = new_state;
    }
    Ok(())
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

/// Target-side stream entries (see `Messaging::in_entry`).
#[derive(Default)]
pub struct InStreams(std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>);

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
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                broken(
                    &self.me,
                    target,
                    format!("its recorded state does not decode ({e})"),
                )
            })?,
            None => OutState {
                stream_id: uuid::Uuid::new_v4().to_string(),
                next_tick: 1,
                acked: 0,
                acked_identity: None,
            },
        };
        let mut map = self.out_streams.0.lock().expect("streams lock");
        let s = map
            .entry(target.to_string())
            .or_insert_with(|| {
                let (work, rx) = tokio::sync::mpsc::channel(STREAM_WORK_MAX);
                let stream = Arc::new(OutStream {
                    me: self.me.clone(),
                    target: target.to_string(),
                    state: Mutex::new(state),
                    work,
                    notify: Notify::new(),
                });
                tokio::spawn(committer(self.store.clone(), Arc::downgrade(&stream), rx));
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
        let rows = self.store.by_stream(stream_id, from, limit).await?;
        let mut out = Vec::with_capacity(rows.len());
        for (expect, m) in (from..).zip(rows) {
            let tick = m
                .stream
                .as_ref()
                .map(|s| s.1)
                .expect("a stream row has a tick");
            // Rows are exactly acked+1 .. next_tick: a hole is a broken store, not a state.
            if tick != expect {
                return Err(broken(&self.me, target, format!(
                    "the transmission queue lacks tick {expect} of stream {stream_id} (found {tick}; a damaged data store)"
                )));
            }
            out.push(stream_message(&self.me, target, m)?);
        }
        Ok(out)
    }

    /// The target has every tick up to `upto`: its rows leave the transmission queue and
    /// `acked` moves, in one commit (by the stream's committer). Acks at or below `acked`
    /// change nothing. Resolves once done.
    pub async fn out_acked(&self, target: &str, upto: u64) -> Result<(), MessagingError> {
        let stream = self.out_stream(target).await?;
        let (reply, done) = tokio::sync::oneshot::channel();
        let closed = || {
            MessagingError::Store(Box::new(keel_store::StoreError::Closed {
                me: self.me.clone(),
            }))
        };
        stream
            .work
            .send(StreamWork::Ack {
                upto,
                reply: Some(reply),
            })
            .await
            .map_err(|_| closed())?;
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
        if tick == st.acked {
            return Ok(st.acked_identity.clone());
        }
        if tick > st.acked && tick < st.next_tick {
            let rows = self.store.by_stream(&st.stream_id, tick, 1).await?;
            return Ok(rows
                .into_iter()
                .next()
                .filter(|m| m.stream.as_ref().is_some_and(|s| s.1 == tick))
                .map(|m| m.id));
        }
        Ok(None)
    }

    /// The target-side entry of `source`'s stream `stream_id`: its lock serialises every link
    /// that carries the stream (a reconnect can overlap an old link's last commit).
    fn in_entry(&self, source: &str, stream_id: &str) -> Arc<Mutex<()>> {
        self.in_streams
            .0
            .lock()
            .expect("streams lock")
            .entry(in_key(source, stream_id))
            .or_insert_with(|| Arc::new(Mutex::new(())))
            .clone()
    }

    /// What this engine has stored of `source`'s stream `stream_id` (as its target).
    pub async fn in_state(
        &self,
        source: &str,
        stream_id: &str,
    ) -> Result<Option<InState>, MessagingError> {
        let entry = self.in_entry(source, stream_id);
        let _one = entry.lock().await;
        self.read_in_state(source, stream_id).await
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
        // Under the stream's lock, against the store's prefix (never a cached one): a link
        // that started from an older prefix while another link stored more must not store
        // those messages again.
        let entry = self.in_entry(source, stream_id);
        let _one = entry.lock().await;
        let prefix = self
            .read_in_state(source, stream_id)
            .await?
            .map_or(0, |p| p.tick);
        if msgs[0].tick != prefix + 1 {
            return Err(broken(&self.me, source, format!(
                "tick {} of stream {stream_id} does not follow the stored prefix {prefix} (another link stored it first)",
                msgs[0].tick
            )));
        }
        let state = InState {
            tick: last.tick,
            identity: Some(last.id.clone()),
        };
        let mut placed = Vec::with_capacity(msgs.len());
        let mut ops = Vec::with_capacity(msgs.len() + 1);
        for m in msgs {
            let q = match self.queue(&m.dest) {
                Ok(q) => q,
                Err(e) => {
                    tracing::warn!(dest = %m.dest, id = %m.id, error = %e, "a message from another engine is for a destination this engine does not hold; it goes to the exception destination");
                    self.queue(&self.exception)?
                }
            };
            let mark = q.state.lock().expect("queue lock").refill_mark();
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
        let pending = super::OffersPending {
            queues: placed.iter().map(|(q, _, _)| q.clone()).collect(),
        };
        let out = self.store.commit(ops).await?;
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

fn stream_message(
    me: &str,
    target: &str,
    m: StoredMessage,
) -> Result<StreamMessage, MessagingError> {
    let tick = m
        .stream
        .as_ref()
        .map(|s| s.1)
        .expect("a stream row has a tick");
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

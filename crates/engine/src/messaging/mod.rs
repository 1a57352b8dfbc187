//! Sending, receiving and settling messages on an engine's queue points.
//!
//! Order of effects, always: the store commit first, then the in-memory change. A send is
//! acknowledged to its producer only after `commit` resolved (durable), so an acknowledged
//! persistent message survives a crash; a settle that fails to commit leaves the delivery
//! locked and the message in the store.

use keel_core::unix_ms as now_ms;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_config::{DestinationCfg, DestinationKind, Reliability};
use keel_store::{Op, Store, StoredMessage};

use crate::queue::{
    Entry, QueueState, RefillMark, WindowBudget, ENGINE_WINDOW_BYTES_MAX, NONPERSISTENT_MAX,
    REFILL_BATCH,
};

pub mod remote;
pub mod streams;
pub mod xa;

pub type Properties = serde_json::Map<String, serde_json::Value>;

/// Separates topic and subscription in a subscription's queue name (`prices::audit`); never
/// part of a configured destination name, so the two cannot collide.
pub const SUBSCRIPTION_SEPARATOR: &str = "::";
/// Store key-value space recording durable subscriptions.
const SUBSCRIPTIONS_KV: &str = "subscriptions";

pub fn subscription_queue(topic: &str, sub: &str) -> String {
    format!("{topic}{SUBSCRIPTION_SEPARATOR}{sub}")
}

/// A message as a producer hands it to the engine.
#[derive(Debug, Clone, Default)]
pub struct OutgoingMessage {
    pub body: Vec<u8>,
    pub properties: Properties,
    pub priority: Option<u8>,
    pub reliability: Option<Reliability>,
    pub ttl_ms: Option<u64>,
}

/// A message handed to a consumer; locked until settled.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub dest: String,
    pub seq: u64,
    pub id: String,
    pub priority: u8,
    pub reliability: Reliability,
    /// Earlier failed deliveries of this message.
    pub delivery_count: u32,
    pub properties: Properties,
    pub body: Vec<u8>,
}

/// How a consumer settles a delivery (the AMQP outcomes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Processed: the message is gone.
    Accepted,
    /// Not processed, no fault: available again, count unchanged.
    Released,
    /// Processing failed: count + 1, then redelivered or moved to the exception destination.
    Failed,
    /// The message is bad: moved to the exception destination at once.
    Rejected,
}

#[derive(Debug, thiserror::Error)]
pub enum MessagingError {
    #[error("messaging engine {me} is not started; start it with `keel me start {me}`")]
    NotStarted { me: String },
    #[error("destination {dest} is not defined on bus {bus} (defined: {}); create it with `keel destination create {bus} {dest} --type queue`; one created while this server runs takes effect when the server restarts", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    UnknownDestination {
        dest: String,
        bus: String,
        known: Vec<String>,
    },
    #[error("delivery stream between messaging engine {me} and messaging engine {peer}: {problem}; the link between them ends and is opened again from what both data stores hold (if this repeats, read both engines' logs)")]
    Stream {
        me: String,
        peer: String,
        problem: String,
    },
    /// An error another task met and logged, passed on as its sentence.
    #[error("{0}")]
    Relayed(String),
    #[error("destination {dest} is held by messaging engine {holder}, not {me}: sending and receiving work through any engine of the bus, but a transaction's work on it needs its own engine; connect to the server of {holder} for that")]
    NotHere {
        dest: String,
        me: String,
        holder: String,
    },
    #[error("topic space {dest} is published on another messaging engine; connect to the server of that engine (remote publication comes with the bus)")]
    TopicNotServed { dest: String },
    #[error("{dest} is a topic space: receive from one of its subscriptions (`{dest}::NAME`), created with a subscribe")]
    NotAQueue { dest: String },
    #[error(
        "topic space {topic} has no durable subscription named {subscription}; subscribe first"
    )]
    NoSubscription { topic: String, subscription: String },
    #[error(
        "`{name}` is not a valid subscription name: use 1 to 128 letters, digits, `_`, `.` or `-`"
    )]
    BadSubscriptionName { name: String },
    #[error("message of {bytes} bytes for {dest} is larger than the bus limit of {max} bytes (max_message_bytes of the bus)")]
    TooLarge { dest: String, bytes: u64, max: u64 },
    #[error("destination {dest} holds {max} non-persistent messages already; consume some, or send persistent messages")]
    QueueFull { dest: String, max: usize },
    #[error("a transaction holds at most {max} sends and settles; commit in smaller transactions")]
    TransactionTooLarge { max: usize },
    #[error("no delivery {seq} is locked on destination {dest} (already settled, or the engine restarted)")]
    UnknownDelivery { dest: String, seq: u64 },
    /// Boxed: the store's error is large and this one travels on every hot-path result.
    #[error(transparent)]
    Store(Box<keel_store::StoreError>),
}

impl From<keel_store::StoreError> for MessagingError {
    fn from(e: keel_store::StoreError) -> MessagingError {
        MessagingError::Store(Box::new(e))
    }
}

/// What a refusal means to a client, whatever the protocol it speaks: the endpoints map this
/// to their own conditions (AMQP's), so they need not know the store's errors two floors down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No such destination, or not here.
    NotFound,
    /// The request names something that cannot take it (a topic for a queue, a bad name).
    Invalid,
    /// Over a bound that frees up by itself (a full queue or disk, a stopped engine): the
    /// client may try again later; nothing was stored.
    OverLimit,
    /// The message is larger than the destination takes.
    TooLarge,
    /// Anything else: the engine or its store failed.
    Internal,
}

impl MessagingError {
    pub fn refusal(&self) -> Refusal {
        match self {
            MessagingError::TooLarge { .. } => Refusal::TooLarge,
            MessagingError::UnknownDestination { .. }
            | MessagingError::NotHere { .. }
            | MessagingError::TopicNotServed { .. }
            | MessagingError::NoSubscription { .. } => Refusal::NotFound,
            MessagingError::NotAQueue { .. } | MessagingError::BadSubscriptionName { .. } => {
                Refusal::Invalid
            }
            MessagingError::QueueFull { .. }
            | MessagingError::TransactionTooLarge { .. }
            | MessagingError::NotStarted { .. } => Refusal::OverLimit,
            MessagingError::Store(e) if matches!(**e, keel_store::StoreError::DiskFull { .. }) => {
                Refusal::OverLimit
            }
            _ => Refusal::Internal,
        }
    }
}

/// Sends plus settles one transaction may hold: it is one store transaction, so it is bounded.
pub const TX_WORK_MAX: usize = 10_000;

struct TxSend {
    q: Arc<QueuePoint>,
    prepared: Prepared,
    body: Vec<u8>,
}

/// A local transaction (see `Messaging::begin`). Dropping one that was neither committed nor
/// rolled back (a lost connection) releases the deliveries it claimed, unchanged.
pub struct Transaction {
    sends: Vec<TxSend>,
    settles: Vec<(Arc<QueuePoint>, Entry, SettlePlan)>,
    done: bool,
}

impl Transaction {
    /// Work items held so far.
    pub fn len(&self) -> usize {
        self.sends.len() + self.settles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if self.done {
            if !self.settles.is_empty() {
                // Its commit was abandoned while the store had it: whether it took effect is
                // unknown, so its deliveries stay claimed (never handed out twice) until the
                // engine restarts and reads the store.
                tracing::warn!(
                    deliveries = self.settles.len(),
                    "a transaction commit was abandoned; its deliveries stay claimed until the engine restarts"
                );
            }
            return;
        }
        for (q, e, _) in self.settles.drain(..) {
            let mut st = q.state.lock().expect("queue lock");
            st.release(e);
            drop(st);
            q.notify.notify_one();
        }
    }
}

struct SettlePlan {
    ops: Vec<Op>,
    outcome: Outcome,
    to_exception: bool,
    new_count: u32,
    /// The exception destination's refill mark, when the message moves there.
    exception_mark: RefillMark,
}

#[derive(Clone)]
struct Prepared {
    reliability: Reliability,
    priority: u8,
    properties: Vec<u8>,
    expiry_ms: Option<u64>,
    code: u8,
}

impl Prepared {
    /// The message as a queue holds it, once it has its seq and ID.
    fn into_entry(self, seq: u64, id: String, body: Vec<u8>, persistent: bool) -> Entry {
        Entry {
            seq,
            id,
            priority: self.priority,
            reliability: self.code,
            expiry_ms: self.expiry_ms,
            delivery_count: 0,
            properties: self.properties,
            body,
            persistent,
        }
    }
}

/// The seq of each send of a transaction: the next of `assigned` (the store's, in op order)
/// for a persistent one, None for a non-persistent one.
fn seqs_per_send(sends: &[TxSend], assigned: impl IntoIterator<Item = u64>) -> Vec<Option<u64>> {
    let mut assigned = assigned.into_iter();
    sends
        .iter()
        .map(|s| {
            s.prepared
                .reliability
                .is_persistent()
                .then(|| assigned.next().expect("one seq per persistent send"))
        })
        .collect()
}

/// Marks a refill as no longer running if its read is dropped (see `Messaging::refill`).
struct AbortRefillOnDrop<'a>(&'a QueuePoint);

impl Drop for AbortRefillOnDrop<'_> {
    fn drop(&mut self) {
        self.0.state.lock().expect("queue lock").abort_refill();
    }
}

/// Armed across a store commit that inserts messages: if the future is dropped before their
/// offers (the caller went away), the queues forget their windows so a refill finds the rows,
/// instead of leaving them unseen until a restart.
struct OffersPending {
    queues: Vec<Arc<QueuePoint>>,
}

impl OffersPending {
    fn done(mut self) {
        self.queues.clear();
    }
}

impl Drop for OffersPending {
    fn drop(&mut self) {
        for q in &self.queues {
            q.state.lock().expect("queue lock").forget_window();
        }
    }
}

/// A taken entry as a consumer sees it.
fn delivery_of(dest: &str, e: Entry) -> Delivery {
    let properties = if e.properties.is_empty() {
        Properties::new()
    } else {
        serde_json::from_slice(&e.properties).unwrap_or_default()
    };
    Delivery {
        dest: dest.into(),
        seq: e.seq,
        id: e.id,
        priority: e.priority,
        reliability: reliability_of(e.reliability),
        delivery_count: e.delivery_count,
        properties,
        body: e.body,
    }
}

/// The live state of one queue point.
pub struct QueuePoint {
    pub cfg: DestinationCfg,
    pub state: Mutex<QueueState>,
    pub notify: tokio::sync::Notify,
    /// One refill at a time per queue (they read after the same cursor).
    refill: tokio::sync::Mutex<()>,
    pub counters: Counters,
}

#[derive(Debug, Default)]
pub struct Counters {
    /// Messages on the queue point (stored and non-persistent, locked ones included).
    pub depth: AtomicU64,
    pub sent: AtomicU64,
    pub delivered: AtomicU64,
    pub accepted: AtomicU64,
    pub redelivered: AtomicU64,
    pub to_exception: AtomicU64,
}

impl QueuePoint {
    fn new(cfg: DestinationCfg, budget: &Arc<WindowBudget>) -> Arc<QueuePoint> {
        Arc::new(QueuePoint {
            cfg,
            state: Mutex::new(QueueState::unloaded_in(budget.clone())),
            notify: tokio::sync::Notify::new(),
            refill: tokio::sync::Mutex::new(()),
            counters: Counters::default(),
        })
    }
}

/// The messaging side of a started engine: its queue points over its store.
pub struct Messaging {
    pub me: String,
    pub uuid: String,
    pub bus: String,
    incarnation: u64,
    store: Arc<dyn Store>,
    /// Every destination of the bus (for "held elsewhere" answers), by name.
    bus_destinations: HashMap<String, DestinationCfg>,
    /// Source delivery streams towards other engines (see `streams`).
    out_streams: streams::OutStreams,
    /// Target-side stream locks and duplicate windows, by source engine.
    in_streams: streams::InStreams,
    /// The other member engines of the bus: name → UUID.
    peer_uuids: HashMap<String, String>,
    /// How long a target remembers what a source's incarnation delivered (DESIGN §5).
    duplicate_window_ms: u64,
    /// This engine's FLUSH while some peer has not confirmed it.
    flush: tokio::sync::Mutex<Option<streams::FlushRecord>>,
    /// Links that carry remote get requests, by peer engine.
    remote_links: remote::RemoteLinks,
    /// Queue points by destination name: configured queues, the exception destination, and
    /// one per durable subscription (`<topic>::<subscription>`), which are added at run time.
    queues: std::sync::RwLock<HashMap<String, Arc<QueuePoint>>>,
    /// What the queue points' windows hold together, bounded (see `queue::WindowBudget`).
    window_budget: Arc<WindowBudget>,
    /// Topic spaces published on this engine, with their durable subscriptions' queue names.
    topics: HashMap<String, DestinationCfg>,
    subscriptions: Mutex<HashMap<String, Vec<String>>>,
    exception: String,
    max_message_bytes: u64,
    /// Set when the engine stops: waiting receivers wake up and every call answers NotStarted.
    closed: std::sync::atomic::AtomicBool,
    /// Turns true when the engine stops (see `stopped`).
    stopped_tx: tokio::sync::watch::Sender<bool>,
    /// Seqs of non-persistent messages: from 2^63 up, never colliding with store seqs.
    volatile_seq: AtomicU64,
    /// Transaction branches prepared by this run (the engine as an XA resource, `xa`).
    xa: xa::Branches,
}

pub fn reliability_code(r: Reliability) -> u8 {
    match r {
        Reliability::BestEffort => 1,
        Reliability::Express => 2,
        Reliability::ReliablePersistent => 3,
        Reliability::AssuredPersistent => 4,
    }
}

fn reliability_of(code: u8) -> Reliability {
    match code {
        1 => Reliability::BestEffort,
        2 => Reliability::Express,
        3 => Reliability::ReliablePersistent,
        _ => Reliability::AssuredPersistent,
    }
}

fn entry_of(m: StoredMessage) -> Entry {
    Entry {
        seq: m.seq,
        id: m.id,
        priority: m.priority,
        reliability: m.reliability,
        expiry_ms: m.expiry_ms,
        delivery_count: m.delivery_count,
        properties: m.properties,
        body: m.body,
        persistent: true,
    }
}

impl Messaging {
    /// `flush`: this engine's FLUSH still waiting for peers (see `streams`).
    pub fn new(
        cfg: &crate::EngineConfig,
        incarnation: u64,
        store: Arc<dyn Store>,
        flush: Option<streams::FlushRecord>,
    ) -> Messaging {
        let (me, uuid, bus) = (cfg.me.as_str(), cfg.uuid.as_str(), cfg.bus.as_str());
        let (destinations, max_message_bytes) = (&cfg.destinations, cfg.max_message_bytes);
        let exception = keel_config::system_exception_destination(me);
        let window_budget = WindowBudget::new(ENGINE_WINDOW_BYTES_MAX);
        let mut queues: HashMap<String, Arc<QueuePoint>> = destinations
            .iter()
            .filter(|d| d.me == me && d.kind == DestinationKind::Queue)
            .map(|d| (d.name.clone(), QueuePoint::new(d.clone(), &window_budget)))
            .collect();
        let mut exc = DestinationCfg::new(&exception, DestinationKind::Queue, me);
        // Nothing leaves the exception destination by failing again: it has nowhere to go.
        exc.max_failed_deliveries = u32::MAX;
        queues.insert(exception.clone(), QueuePoint::new(exc, &window_budget));
        Messaging {
            me: me.into(),
            uuid: uuid.into(),
            bus: bus.into(),
            incarnation,
            store,
            bus_destinations: destinations
                .iter()
                .map(|d| (d.name.clone(), d.clone()))
                .collect(),
            queues: std::sync::RwLock::new(queues),
            window_budget,
            topics: destinations
                .iter()
                .filter(|d| d.me == me && d.kind == DestinationKind::Topic)
                .map(|d| (d.name.clone(), d.clone()))
                .collect(),
            subscriptions: Mutex::new(HashMap::new()),
            exception,
            max_message_bytes,
            volatile_seq: AtomicU64::new(1 << 63),
            xa: xa::Branches::default(),
            out_streams: streams::OutStreams::default(),
            in_streams: streams::InStreams::default(),
            peer_uuids: cfg.peers.iter().cloned().collect(),
            duplicate_window_ms: cfg.duplicate_window_ms,
            flush: tokio::sync::Mutex::new(flush),
            remote_links: remote::RemoteLinks::default(),
            closed: std::sync::atomic::AtomicBool::new(false),
            stopped_tx: tokio::sync::watch::channel(false).0,
        }
    }

    pub fn queue(&self, dest: &str) -> Result<Arc<QueuePoint>, MessagingError> {
        if let Some(q) = self.queues.read().expect("queues lock").get(dest) {
            return Ok(q.clone());
        }
        match self.bus_destinations.get(dest) {
            Some(d) if d.kind == DestinationKind::Topic && d.me == self.me => {
                Err(MessagingError::NotAQueue { dest: dest.into() })
            }
            Some(d) if d.kind == DestinationKind::Topic => {
                Err(MessagingError::TopicNotServed { dest: dest.into() })
            }
            Some(d) => Err(MessagingError::NotHere {
                dest: dest.into(),
                me: self.me.clone(),
                holder: d.me.clone(),
            }),
            None => {
                if let Some((topic, sub)) = dest.split_once(SUBSCRIPTION_SEPARATOR) {
                    return Err(MessagingError::NoSubscription {
                        topic: topic.into(),
                        subscription: sub.into(),
                    });
                }
                let mut known: Vec<String> = self.bus_destinations.keys().cloned().collect();
                known.sort();
                Err(MessagingError::UnknownDestination {
                    dest: dest.into(),
                    bus: self.bus.clone(),
                    known,
                })
            }
        }
    }

    /// The queue points of this engine (configured queues and the exception destination).
    pub fn queue_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .queues
            .read()
            .expect("queues lock")
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Reads each queue's depth from the store once at start; counters keep it current after.
    pub async fn init_depths(&self) -> Result<(), keel_store::StoreError> {
        let stored: HashMap<String, u64> = self.store.destinations().await?.into_iter().collect();
        for (name, q) in self.queues.read().expect("queues lock").iter() {
            q.counters
                .depth
                .store(stored.get(name).copied().unwrap_or(0), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Called by the engine's stop: later calls answer NotStarted, and receivers waiting for a
    /// message wake up now instead of at their timeout.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.stopped_tx.send_replace(true);
        for q in self.queues.read().expect("queues lock").values() {
            q.notify.notify_waiters();
        }
    }

    /// Resolves once the engine stops: links of this engine end with it (a restart, with
    /// FLUSH or not, must run the handshake again on a new link).
    pub async fn stopped(&self) {
        let mut rx = self.stopped_tx.subscribe();
        let _ = rx.wait_for(|stopped| *stopped).await;
    }

    fn check_open(&self) -> Result<(), MessagingError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(MessagingError::NotStarted {
                me: self.me.clone(),
            });
        }
        Ok(())
    }

    /// What a send needs from a message and its destination: effective reliability (capped at
    /// the destination's maximum) and priority, encoded properties, expiry, and the size check.
    fn prepare(
        &self,
        d: &DestinationCfg,
        msg: &OutgoingMessage,
    ) -> Result<Prepared, MessagingError> {
        let reliability = msg
            .reliability
            .unwrap_or(d.default_reliability)
            .min(d.reliability);
        let priority = msg
            .priority
            .unwrap_or(d.default_priority)
            .min(keel_config::MAX_PRIORITY);
        let properties = if msg.properties.is_empty() {
            Vec::new()
        } else {
            serde_json::to_vec(&msg.properties).expect("a JSON map serializes")
        };
        let bytes = (msg.body.len() + properties.len()) as u64;
        if bytes > self.max_message_bytes {
            return Err(MessagingError::TooLarge {
                dest: d.name.clone(),
                bytes,
                max: self.max_message_bytes,
            });
        }
        Ok(Prepared {
            reliability,
            priority,
            properties,
            expiry_ms: msg.ttl_ms.map(|t| now_ms().saturating_add(t)),
            code: reliability_code(reliability),
        })
    }

    /// Stores (persistent) or holds (non-persistent) a message; returns its system ID. For a
    /// persistent message this resolves only once it is durable.
    pub async fn send(&self, dest: &str, msg: OutgoingMessage) -> Result<String, MessagingError> {
        self.check_open()?;
        if let Some(topic) = self.topics.get(dest) {
            return self.publish(topic.clone(), msg).await;
        }
        // A queue send is a batch of one (one store commit when persistent).
        self.send_batch(dest, vec![msg])
            .await?
            .pop()
            .expect("one result for one message")
    }

    /// A non-persistent message goes to the queue's bounded in-memory part only.
    fn hold_volatile(
        &self,
        q: &QueuePoint,
        dest: &str,
        p: Prepared,
        body: Vec<u8>,
    ) -> Result<String, MessagingError> {
        let seq = self.volatile_seq.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}:{}:{seq}", self.uuid, self.incarnation);
        let mut st = q.state.lock().expect("queue lock");
        if st.volatile.len() >= NONPERSISTENT_MAX {
            return Err(MessagingError::QueueFull {
                dest: dest.into(),
                max: NONPERSISTENT_MAX,
            });
        }
        let e = p.into_entry(seq, id.clone(), body, false);
        st.volatile.insert(e.key(), e);
        drop(st);
        q.counters.sent.fetch_add(1, Ordering::Relaxed);
        q.counters.depth.fetch_add(1, Ordering::Relaxed);
        q.notify.notify_one();
        Ok(id)
    }

    /// Sends several messages to one destination, in order, with one store commit for all the
    /// persistent ones: a link that has many messages in flight pays one group-commit wait per
    /// batch instead of one per message, and keeps its order (one batch, consecutive seqs).
    /// The outer error fails the whole batch (nothing of it is stored); the inner ones are per
    /// message (too large, queue full), in input order.
    pub async fn send_batch(
        &self,
        dest: &str,
        msgs: Vec<OutgoingMessage>,
    ) -> Result<Vec<Result<String, MessagingError>>, MessagingError> {
        self.check_open()?;
        if let Some(topic) = self.topics.get(dest) {
            // Publication fans out per subscription, one message at a time.
            let mut out = Vec::with_capacity(msgs.len());
            for m in msgs {
                out.push(self.publish(topic.clone(), m).await);
            }
            return Ok(out);
        }
        if let Some(cfg) = self.remote_queue(dest).cloned() {
            // A queue on another engine of the bus: onto the stream towards it.
            return self.send_remote(&cfg, msgs).await;
        }
        let q = self.queue(dest)?;
        let mut results: Vec<Option<Result<String, MessagingError>>> =
            (0..msgs.len()).map(|_| None).collect();
        let mut ops = Vec::new();
        let mut persistent = Vec::new();
        for (i, m) in msgs.into_iter().enumerate() {
            let p = match self.prepare(&q.cfg, &m) {
                Ok(p) => p,
                Err(e) => {
                    results[i] = Some(Err(e));
                    continue;
                }
            };
            if p.reliability.is_persistent() {
                ops.push(Op::Put {
                    dest: dest.into(),
                    id: String::new(),
                    priority: p.priority,
                    reliability: p.code,
                    expiry_ms: p.expiry_ms,
                    properties: p.properties.clone(),
                    body: m.body.clone(),
                    stream: None,
                });
                persistent.push((i, p, m.body));
            } else {
                results[i] = Some(self.hold_volatile(&q, dest, p, m.body));
            }
        }
        if !ops.is_empty() {
            let mark = q.state.lock().expect("queue lock").refill_mark();
            let pending = OffersPending {
                queues: vec![q.clone()],
            };
            let out = self.store.commit(ops).await?;
            keel_core::faults::hit("me.after_store_commit");
            assert_eq!(
                out.assigned_seqs.len(),
                persistent.len(),
                "every Put of a batch gets a seq"
            );
            let stored = persistent.len() as u64;
            let mut st = q.state.lock().expect("queue lock");
            for ((i, p, body), seq) in persistent.into_iter().zip(out.assigned_seqs) {
                let id = format!("{}:{}:{seq}", self.uuid, self.incarnation);
                st.offer_persistent(p.into_entry(seq, id.clone(), body, true), mark);
                results[i] = Some(Ok(id));
            }
            drop(st);
            pending.done();
            q.counters.sent.fetch_add(stored, Ordering::Relaxed);
            q.counters.depth.fetch_add(stored, Ordering::Relaxed);
            // One wake per message: each may serve a different waiting consumer.
            for _ in 0..stored {
                q.notify.notify_one();
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every message of a batch has a result"))
            .collect())
    }

    async fn refill(&self, q: &QueuePoint) -> Result<(), MessagingError> {
        let _one = q.refill.lock().await;
        let Some((cursor, skipped_before)) = q.state.lock().expect("queue lock").begin_refill()
        else {
            return Ok(());
        };
        let after = cursor.map(|(p, s)| (p.0, s));
        // A receive dropped during the read (its consumer went away) must not leave the
        // refill marked as running: the sets that track it would grow with the backlog.
        let abort = AbortRefillOnDrop(q);
        let page = self.store.page(&q.cfg.name, after, REFILL_BATCH).await?;
        std::mem::forget(abort);
        let complete = page.len() < REFILL_BATCH;
        q.state.lock().expect("queue lock").refill(
            page.into_iter().map(entry_of).collect(),
            complete,
            skipped_before,
        );
        Ok(())
    }

    /// The next message of `dest` in delivery order, waiting up to `timeout` for one.
    pub async fn receive(
        &self,
        dest: &str,
        timeout: Duration,
    ) -> Result<Option<Delivery>, MessagingError> {
        if let Some(peer) = self.remote_queue(dest).map(|d| d.me.clone()) {
            return self.remote_receive(&peer, dest, timeout).await;
        }
        let q = self.queue(dest)?;
        let deadline = Instant::now() + timeout;
        loop {
            self.check_open()?;
            // Register interest before looking, so a send between the look and the wait wakes us.
            let notified = q.notify.notified();
            self.refill(&q).await?;
            let taken = q.state.lock().expect("queue lock").take_next();
            if let Some(e) = taken {
                if e.expiry_ms.is_some_and(|x| x <= now_ms()) {
                    self.discard_expired(&q, e).await?;
                    continue;
                }
                q.counters.delivered.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(delivery_of(dest, e)));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    /// Up to `max` messages of `dest` that are available now, in delivery order, without
    /// waiting: one refill and one lock for all of them (a consumer link with credit for many).
    pub async fn receive_now(
        &self,
        dest: &str,
        max: usize,
    ) -> Result<Vec<Delivery>, MessagingError> {
        assert!(max > 0);
        self.check_open()?;
        if let Some(peer) = self.remote_queue(dest).map(|d| d.me.clone()) {
            let wait = Duration::from_millis(remote::REMOTE_WAIT_MS);
            return self.remote_receive_now(&peer, dest, max, wait).await;
        }
        let q = self.queue(dest)?;
        self.refill(&q).await?;
        let mut taken = Vec::with_capacity(max);
        let mut expired = Vec::new();
        {
            let mut st = q.state.lock().expect("queue lock");
            let now = now_ms();
            while taken.len() < max {
                let Some(e) = st.take_next() else { break };
                if e.expiry_ms.is_some_and(|x| x <= now) {
                    expired.push(e);
                } else {
                    taken.push(delivery_of(dest, e));
                }
            }
        }
        q.counters
            .delivered
            .fetch_add(taken.len() as u64, Ordering::Relaxed);
        for e in expired {
            let seq = e.seq;
            if let Err(err) = self.discard_expired(&q, e).await {
                // What was taken is handed out all the same; this one stays locked until the
                // engine restarts (as when `receive` fails to discard).
                tracing::warn!(dest, seq, error = %err, "could not remove an expired message");
            }
        }
        Ok(taken)
    }

    async fn discard_expired(&self, q: &QueuePoint, e: Entry) -> Result<(), MessagingError> {
        if e.persistent {
            self.store
                .commit(vec![Op::Delete {
                    dest: q.cfg.name.clone(),
                    seq: e.seq,
                }])
                .await?;
        }
        q.state.lock().expect("queue lock").unlock_gone(e.seq);
        q.counters.depth.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    /// Settles a locked delivery (see `Outcome`).
    pub async fn settle(
        &self,
        dest: &str,
        seq: u64,
        outcome: Outcome,
    ) -> Result<(), MessagingError> {
        self.check_open()?;
        if let Some(peer) = self.remote_queue(dest).map(|d| d.me.clone()) {
            let mut r = self.remote_settle(&peer, dest, &[(seq, outcome)]).await?;
            return r.pop().unwrap_or(Ok(()));
        }
        let (q, e) = self.claim(dest, seq)?;
        let plan = self.settle_plan(&q, &e, outcome);
        // Durable effect first; the in-memory change only once it committed.
        if !plan.ops.is_empty() {
            if let Err(err) = self.store.commit(plan.ops.clone()).await {
                // Nothing changed durably: the delivery stays locked, to be settled again.
                q.state.lock().expect("queue lock").unclaim(e);
                return Err(err.into());
            }
        }
        self.settle_apply(&q, e, &plan)
    }

    /// Settles several locked deliveries of one destination with one store commit (a consumer
    /// link settles many messages per group-commit wait). Results in input order; a delivery
    /// that is not locked fails alone; a destination that is no queue here fails the batch. If
    /// the commit fails, every claimed delivery stays locked and every result is that error's
    /// text.
    pub async fn settle_batch(
        &self,
        dest: &str,
        settles: &[(u64, Outcome)],
    ) -> Result<Vec<Result<(), MessagingError>>, MessagingError> {
        self.check_open()?;
        if let Some(peer) = self.remote_queue(dest).map(|d| d.me.clone()) {
            return self.remote_settle(&peer, dest, settles).await;
        }
        let mut results: Vec<Option<Result<(), MessagingError>>> =
            (0..settles.len()).map(|_| None).collect();
        let mut claimed = Vec::with_capacity(settles.len());
        let mut ops = Vec::new();
        // One lookup and one lock to claim the whole batch; plans after the lock is released
        // (a plan may lock the exception destination).
        let q = self.queue(dest)?;
        let entries: Vec<Option<Entry>> = {
            let mut st = q.state.lock().expect("queue lock");
            settles.iter().map(|(seq, _)| st.claim(*seq)).collect()
        };
        for (i, ((seq, outcome), e)) in settles.iter().zip(entries).enumerate() {
            match e {
                Some(e) => {
                    let mut plan = self.settle_plan(&q, &e, *outcome);
                    ops.append(&mut plan.ops);
                    claimed.push((i, e, plan));
                }
                None => {
                    results[i] = Some(Err(MessagingError::UnknownDelivery {
                        dest: dest.into(),
                        seq: *seq,
                    }))
                }
            }
        }
        if !ops.is_empty() {
            if let Err(err) = self.store.commit(ops).await {
                // Nothing changed durably: the deliveries stay locked, to be settled again.
                let mut st = q.state.lock().expect("queue lock");
                for (_, e, _) in claimed {
                    st.unclaim(e);
                }
                return Err(err.into());
            }
        }
        for (i, e, plan) in claimed {
            results[i] = Some(self.settle_apply(&q, e, &plan));
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every settle of a batch has a result"))
            .collect())
    }

    /// Takes a locked delivery out of the locked set: a second settle of the same one (a
    /// repeated disposition) finds nothing instead of racing this one.
    fn claim(&self, dest: &str, seq: u64) -> Result<(Arc<QueuePoint>, Entry), MessagingError> {
        let q = self.queue(dest)?;
        let e = q
            .state
            .lock()
            .expect("queue lock")
            .claim(seq)
            .ok_or_else(|| MessagingError::UnknownDelivery {
                dest: dest.into(),
                seq,
            })?;
        Ok((q, e))
    }

    /// The store operations a settle needs, and where the message goes.
    fn settle_plan(&self, q: &QueuePoint, e: &Entry, outcome: Outcome) -> SettlePlan {
        let dest = &q.cfg.name;
        let failed_count = e.delivery_count.saturating_add(1);
        let to_exception = *dest != self.exception
            && (outcome == Outcome::Rejected
                || (outcome == Outcome::Failed && failed_count >= q.cfg.max_failed_deliveries));
        let mut ops = Vec::new();
        if e.persistent {
            let moved = Op::Move {
                from: dest.clone(),
                seq: e.seq,
                to: self.exception.clone(),
            };
            let counted = Op::SetDeliveryCount {
                dest: dest.clone(),
                seq: e.seq,
                count: failed_count,
            };
            ops = match outcome {
                Outcome::Accepted => vec![Op::Delete {
                    dest: dest.clone(),
                    seq: e.seq,
                }],
                // The final count travels with the message (one batch: both or neither).
                Outcome::Failed if to_exception => vec![counted, moved],
                _ if to_exception => vec![moved],
                Outcome::Failed => vec![counted],
                Outcome::Released | Outcome::Rejected => vec![],
            };
        }
        let new_count = if outcome == Outcome::Failed {
            failed_count
        } else {
            e.delivery_count
        };
        // Taken before the commit that moves the row (see `QueueState::refill_mark`).
        let exception_mark = match self.queue(&self.exception) {
            Ok(xq) if to_exception => xq.state.lock().expect("queue lock").refill_mark(),
            _ => RefillMark::UNKNOWN,
        };
        SettlePlan {
            ops,
            outcome,
            to_exception,
            new_count,
            exception_mark,
        }
    }

    /// The in-memory part of a settle, once its store operations committed.
    fn settle_apply(
        &self,
        q: &QueuePoint,
        mut e: Entry,
        plan: &SettlePlan,
    ) -> Result<(), MessagingError> {
        e.delivery_count = plan.new_count;
        if plan.outcome == Outcome::Accepted {
            q.state.lock().expect("queue lock").settled(e.seq, true);
            q.counters.accepted.fetch_add(1, Ordering::Relaxed);
            q.counters.depth.fetch_sub(1, Ordering::Relaxed);
            return Ok(());
        }
        if !plan.to_exception {
            // Settled and available again under one lock: no take or refill in between.
            q.counters.redelivered.fetch_add(1, Ordering::Relaxed);
            let mut st = q.state.lock().expect("queue lock");
            st.release(e);
            drop(st);
            q.notify.notify_one();
            return Ok(());
        }
        q.state.lock().expect("queue lock").settled(e.seq, true);
        q.counters.to_exception.fetch_add(1, Ordering::Relaxed);
        q.counters.depth.fetch_sub(1, Ordering::Relaxed);
        let xq = self.queue(&self.exception.clone())?;
        xq.counters.depth.fetch_add(1, Ordering::Relaxed);
        let mut st = xq.state.lock().expect("queue lock");
        if e.persistent {
            // Its row arrived with the commit: a new message for the exception destination.
            st.offer_persistent(e, plan.exception_mark);
        } else {
            st.volatile.insert(e.key(), e);
        }
        drop(st);
        xq.notify.notify_one();
        Ok(())
    }

    /// Records durable subscriptions found in the store at start.
    pub async fn load_subscriptions(&self) -> Result<(), keel_store::StoreError> {
        for (key, _) in self.store.kv_scan(SUBSCRIPTIONS_KV).await? {
            let Some((topic, sub)) = key.split_once(SUBSCRIPTION_SEPARATOR) else {
                continue;
            };
            if let Some(cfg) = self.topics.get(topic) {
                self.add_subscription_point(cfg, sub);
            }
        }
        Ok(())
    }

    fn add_subscription_point(&self, topic: &DestinationCfg, sub: &str) -> Arc<QueuePoint> {
        let name = subscription_queue(&topic.name, sub);
        let mut cfg = topic.clone();
        cfg.name = name.clone();
        cfg.kind = DestinationKind::Queue;
        let q = self
            .queues
            .write()
            .expect("queues lock")
            .entry(name.clone())
            .or_insert_with(|| QueuePoint::new(cfg, &self.window_budget))
            .clone();
        let mut subs = self.subscriptions.lock().expect("subscriptions lock");
        let list = subs.entry(topic.name.clone()).or_default();
        if !list.contains(&name) {
            list.push(name);
            list.sort();
        }
        q
    }

    /// Creates (or finds) the durable subscription `sub` of topic space `topic`; returns the
    /// queue to receive from. Durable: it survives restarts and collects publications while no
    /// consumer is attached.
    pub async fn subscribe(&self, topic: &str, sub: &str) -> Result<String, MessagingError> {
        let cfg = self.topics.get(topic).cloned().ok_or_else(|| {
            match self.bus_destinations.get(topic) {
                Some(d) if d.kind == DestinationKind::Topic => {
                    MessagingError::TopicNotServed { dest: topic.into() }
                }
                Some(_) => MessagingError::NotAQueue { dest: topic.into() },
                None => MessagingError::UnknownDestination {
                    dest: topic.into(),
                    bus: self.bus.clone(),
                    known: self.bus_destinations.keys().cloned().collect(),
                },
            }
        })?;
        let valid = !sub.is_empty()
            && sub.len() <= 128
            && sub
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !valid {
            return Err(MessagingError::BadSubscriptionName { name: sub.into() });
        }
        let name = subscription_queue(topic, sub);
        if self.queues.read().expect("queues lock").contains_key(&name) {
            return Ok(name);
        }
        // Durable first: the subscription exists once the store says so.
        self.store
            .commit(vec![Op::SetKv {
                space: SUBSCRIPTIONS_KV.into(),
                key: name.clone(),
                value: now_ms().to_string().into_bytes(),
            }])
            .await?;
        let q = self.add_subscription_point(&cfg, sub);
        // A new subscription holds nothing yet: no refill needed until something is published.
        q.state.lock().expect("queue lock").store_has_more = false;
        Ok(name)
    }

    /// Removes a durable subscription and every message it holds (in bounded batches).
    pub async fn unsubscribe(&self, topic: &str, sub: &str) -> Result<u64, MessagingError> {
        let name = subscription_queue(topic, sub);
        let q = self.queue(&name)?;
        {
            let mut subs = self.subscriptions.lock().expect("subscriptions lock");
            if let Some(list) = subs.get_mut(topic) {
                list.retain(|n| n != &name);
            }
        }
        self.queues.write().expect("queues lock").remove(&name);
        let mut removed = 0u64;
        loop {
            let page = self.store.page(&name, None, REFILL_BATCH).await?;
            if page.is_empty() {
                break;
            }
            removed += page.len() as u64;
            self.store
                .commit(
                    page.iter()
                        .map(|m| Op::Delete {
                            dest: name.clone(),
                            seq: m.seq,
                        })
                        .collect(),
                )
                .await?;
        }
        self.store
            .commit(vec![Op::DeleteKv {
                space: SUBSCRIPTIONS_KV.into(),
                key: name.clone(),
            }])
            .await?;
        q.notify.notify_waiters();
        Ok(removed)
    }

    /// One store commit with a copy per durable subscription; with none, the publication
    /// reaches nobody (topic semantics) and nothing is stored. Returns the first copy's ID.
    async fn publish(
        &self,
        topic: DestinationCfg,
        msg: OutgoingMessage,
    ) -> Result<String, MessagingError> {
        let subs: Vec<Arc<QueuePoint>> = {
            let names = self
                .subscriptions
                .lock()
                .expect("subscriptions lock")
                .get(&topic.name)
                .cloned()
                .unwrap_or_default();
            let queues = self.queues.read().expect("queues lock");
            names
                .iter()
                .filter_map(|n| queues.get(n).cloned())
                .collect()
        };
        let p = self.prepare(&topic, &msg)?;
        if subs.is_empty() {
            let seq = self.volatile_seq.fetch_add(1, Ordering::Relaxed);
            return Ok(format!("{}:{}:{seq}", self.uuid, self.incarnation));
        }
        let mut ids = Vec::with_capacity(subs.len());
        if p.reliability.is_persistent() {
            let ops = subs
                .iter()
                .map(|q| Op::Put {
                    dest: q.cfg.name.clone(),
                    id: String::new(),
                    priority: p.priority,
                    reliability: p.code,
                    expiry_ms: p.expiry_ms,
                    properties: p.properties.clone(),
                    body: msg.body.clone(),
                    stream: None,
                })
                .collect();
            let marks: Vec<RefillMark> = subs
                .iter()
                .map(|q| q.state.lock().expect("queue lock").refill_mark())
                .collect();
            let pending = OffersPending {
                queues: subs.clone(),
            };
            let out = self.store.commit(ops).await?;
            keel_core::faults::hit("me.after_store_commit");
            for ((q, seq), mark) in subs.iter().zip(out.assigned_seqs).zip(marks) {
                let id = format!("{}:{}:{seq}", self.uuid, self.incarnation);
                ids.push(id.clone());
                let e = p.clone().into_entry(seq, id, msg.body.clone(), true);
                q.state
                    .lock()
                    .expect("queue lock")
                    .offer_persistent(e, mark);
            }
            pending.done();
        } else {
            for q in &subs {
                let seq = self.volatile_seq.fetch_add(1, Ordering::Relaxed);
                let id = format!("{}:{}:{seq}", self.uuid, self.incarnation);
                ids.push(id.clone());
                let mut st = q.state.lock().expect("queue lock");
                if st.volatile.len() >= NONPERSISTENT_MAX {
                    continue; // a full subscriber misses a non-persistent publication, as best effort allows
                }
                let e = p.clone().into_entry(seq, id, msg.body.clone(), false);
                st.volatile.insert(e.key(), e);
            }
        }
        for q in &subs {
            q.counters.sent.fetch_add(1, Ordering::Relaxed);
            q.counters.depth.fetch_add(1, Ordering::Relaxed);
            q.notify.notify_one();
        }
        Ok(ids.swap_remove(0))
    }

    /// Messages in the whole store (every destination).
    pub async fn store_messages(&self) -> Result<u64, MessagingError> {
        Ok(self
            .store
            .destinations()
            .await?
            .iter()
            .map(|(_, n)| n)
            .sum())
    }

    /// Starts a local transaction: its sends and settles take effect together at `commit`, in
    /// one store transaction (atomic and durable), or not at all.
    pub fn begin(&self) -> Transaction {
        Transaction {
            sends: Vec::new(),
            settles: Vec::new(),
            done: false,
        }
    }

    /// Adds a send to `tx`. Checked now (destination, size), stored at commit. A topic space
    /// gets one copy per subscription it has at this moment.
    pub fn tx_send(
        &self,
        tx: &mut Transaction,
        dest: &str,
        msg: OutgoingMessage,
    ) -> Result<(), MessagingError> {
        self.check_open()?;
        assert!(!tx.done, "a finished transaction takes no more work");
        if tx.sends.len() + tx.settles.len() >= TX_WORK_MAX {
            return Err(MessagingError::TransactionTooLarge { max: TX_WORK_MAX });
        }
        let (cfg, targets) = match self.topics.get(dest) {
            Some(topic) => {
                let names = self
                    .subscriptions
                    .lock()
                    .expect("subscriptions lock")
                    .get(dest)
                    .cloned()
                    .unwrap_or_default();
                let queues = self.queues.read().expect("queues lock");
                (
                    topic.clone(),
                    names
                        .iter()
                        .filter_map(|n| queues.get(n).cloned())
                        .collect(),
                )
            }
            None => {
                let q = self.queue(dest)?;
                (q.cfg.clone(), vec![q])
            }
        };
        let prepared = self.prepare(&cfg, &msg)?;
        for q in targets {
            tx.sends.push(TxSend {
                q,
                prepared: prepared.clone(),
                body: msg.body.clone(),
            });
        }
        Ok(())
    }

    /// Adds a settle of a locked delivery to `tx`; the delivery is claimed now, so nothing else
    /// can settle it meanwhile.
    pub fn tx_settle(
        &self,
        tx: &mut Transaction,
        dest: &str,
        seq: u64,
        outcome: Outcome,
    ) -> Result<(), MessagingError> {
        self.check_open()?;
        assert!(!tx.done, "a finished transaction takes no more work");
        if tx.sends.len() + tx.settles.len() >= TX_WORK_MAX {
            return Err(MessagingError::TransactionTooLarge { max: TX_WORK_MAX });
        }
        let (q, e) = self.claim(dest, seq)?;
        let plan = self.settle_plan(&q, &e, outcome);
        tx.settles.push((q, e, plan));
        Ok(())
    }

    /// Applies the whole transaction in one store commit, then in memory. Returns the IDs of
    /// the messages it sent. On a store error nothing took effect and the claimed deliveries
    /// are locked again (settle them, or roll back).
    pub async fn commit(&self, tx: Transaction) -> Result<Vec<String>, MessagingError> {
        self.commit_with(tx, false).await
    }

    /// Like `commit`, but on a store error the claimed deliveries become available again
    /// (the transaction rolled back) instead of staying locked for their consumer to settle
    /// again: for a transaction no client holds (an application's).
    pub async fn commit_or_release(&self, tx: Transaction) -> Result<Vec<String>, MessagingError> {
        self.commit_with(tx, true).await
    }

    async fn commit_with(
        &self,
        mut tx: Transaction,
        release_on_error: bool,
    ) -> Result<Vec<String>, MessagingError> {
        self.check_open()?;
        let mut ops = Vec::new();
        for s in tx
            .sends
            .iter()
            .filter(|s| s.prepared.reliability.is_persistent())
        {
            let p = &s.prepared;
            ops.push(Op::Put {
                dest: s.q.cfg.name.clone(),
                id: String::new(),
                priority: p.priority,
                reliability: p.code,
                expiry_ms: p.expiry_ms,
                properties: p.properties.clone(),
                body: s.body.clone(),
                stream: None,
            });
        }
        for (_, _, plan) in &tx.settles {
            ops.extend(plan.ops.iter().cloned());
        }
        let marks: Vec<RefillMark> = tx
            .sends
            .iter()
            .map(|s| s.q.state.lock().expect("queue lock").refill_mark())
            .collect();
        let mut seqs = Vec::new().into_iter();
        // From here the outcome may be in the store even if this future is dropped: the
        // transaction must not release its deliveries on drop (see `Drop for Transaction`).
        tx.done = true;
        let pending = OffersPending {
            queues: tx.sends.iter().map(|s| s.q.clone()).collect(),
        };
        if !ops.is_empty() {
            match self.store.commit(ops).await {
                Ok(out) => seqs = out.assigned_seqs.into_iter(),
                Err(err) => {
                    pending.done();
                    for (q, e, _) in tx.settles.drain(..) {
                        let mut st = q.state.lock().expect("queue lock");
                        if release_on_error {
                            st.release(e);
                            drop(st);
                            q.notify.notify_one();
                        } else {
                            st.unclaim(e);
                        }
                    }
                    return Err(err.into());
                }
            }
        }
        keel_core::faults::hit("me.after_store_commit");
        let per_send = seqs_per_send(&tx.sends, seqs);
        let ids = self.offer_sent(std::mem::take(&mut tx.sends), per_send, marks);
        pending.done();
        for (q, e, plan) in std::mem::take(&mut tx.settles) {
            self.settle_apply(&q, e, &plan)?;
        }
        Ok(ids)
    }

    /// Makes a committed transaction's sends available on their queues: each persistent one
    /// under the seq its store commit gave it (`seqs`, one per send, None for non-persistent
    /// ones, which get a volatile seq). Returns their message IDs.
    fn offer_sent(
        &self,
        sends: Vec<TxSend>,
        seqs: impl IntoIterator<Item = Option<u64>>,
        marks: Vec<RefillMark>,
    ) -> Vec<String> {
        let mut ids = Vec::with_capacity(sends.len());
        for ((s, seq), mark) in sends.into_iter().zip(seqs).zip(marks) {
            let p = s.prepared;
            let persistent = p.reliability.is_persistent();
            debug_assert_eq!(persistent, seq.is_some(), "a seq for each persistent send");
            let seq = seq.unwrap_or_else(|| self.volatile_seq.fetch_add(1, Ordering::Relaxed));
            let id = format!("{}:{}:{seq}", self.uuid, self.incarnation);
            let e = p.into_entry(seq, id.clone(), s.body, persistent);
            let mut st = s.q.state.lock().expect("queue lock");
            if persistent {
                st.offer_persistent(e, mark);
            } else if st.volatile.len() < NONPERSISTENT_MAX {
                st.volatile.insert(e.key(), e);
            }
            drop(st);
            s.q.counters.sent.fetch_add(1, Ordering::Relaxed);
            s.q.counters.depth.fetch_add(1, Ordering::Relaxed);
            s.q.notify.notify_one();
            ids.push(id);
        }
        ids
    }

    /// Discards the transaction's sends; every delivery it settled counts one failed delivery
    /// (redelivered, or moved to the exception destination after max_failed_deliveries), so a
    /// message that always makes its transaction fail cannot loop forever.
    pub async fn rollback(&self, tx: Transaction) -> Result<(), MessagingError> {
        self.rollback_as(tx, Outcome::Failed).await
    }

    /// Like `rollback`, with the outcome its settled deliveries get: `Released` when the
    /// transaction failed for a reason that is not the message's (a data source down), so a
    /// good message does not drift to the exception destination while a database restarts.
    pub async fn rollback_as(
        &self,
        mut tx: Transaction,
        outcome: Outcome,
    ) -> Result<(), MessagingError> {
        tx.done = true;
        tx.sends.clear();
        let settles: Vec<(Arc<QueuePoint>, Entry)> =
            tx.settles.drain(..).map(|(q, e, _)| (q, e)).collect();
        let plans: Vec<SettlePlan> = settles
            .iter()
            .map(|(q, e)| self.settle_plan(q, e, outcome))
            .collect();
        let ops: Vec<Op> = plans.iter().flat_map(|p| p.ops.iter().cloned()).collect();
        if !ops.is_empty() {
            if let Err(err) = self.store.commit(ops).await {
                // The counts did not change: release the deliveries as they were.
                for (q, e) in settles {
                    let mut st = q.state.lock().expect("queue lock");
                    st.release(e);
                }
                return Err(err.into());
            }
        }
        for ((q, e), plan) in settles.into_iter().zip(plans) {
            self.settle_apply(&q, e, &plan)?;
        }
        Ok(())
    }

    /// Durable subscriptions of a topic space.
    pub fn subscriptions_of(&self, topic: &str) -> Vec<String> {
        self.subscriptions
            .lock()
            .expect("subscriptions lock")
            .get(topic)
            .cloned()
            .unwrap_or_default()
    }

    /// Messages on `dest`: stored (persistent, including locked ones) plus non-persistent.
    pub async fn depth(&self, dest: &str) -> Result<u64, MessagingError> {
        let q = self.queue(dest)?;
        let stored = self.store.depth(dest).await?;
        let st = q.state.lock().expect("queue lock");
        let volatile = st.volatile.len() + st.locked.values().filter(|e| !e.persistent).count();
        Ok(stored + volatile as u64)
    }
}

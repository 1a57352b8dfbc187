//! ME-to-ME links accepted on the bus port (DESIGN §5): who may open one, and how it is told
//! apart from AMQP (keel-amqp peeks at the first four bytes and hands `KEEL` connections here).
//!
//! A link opens with the 8-byte protocol header, then each side's `Open` frame: bus, engine,
//! UUID, incarnation and a credential proof (`keel_bus::auth`) under the bus's link key, which
//! is derived from the profile's admin credential (so engines of another profile or bus are
//! refused). This server accepts a link only from a member engine of a bus it hosts an engine
//! for, not from one of its own, with a valid proof; anything else is refused and logged
//! (`CWSIT0004W`) and the link closed, and so is a malformed frame. Nothing a refused link sent
//! is acted on.
//!
//! The connecting side ([`keep_linked`]): each started engine links to every other member
//! engine of its bus (found from the configuration: the member's server's bus port on its
//! node's host), checks the answering `Open` (bus, engine, UUID, proof) and holds the link;
//! after a failure or a loss it tries again with bounded back-off.
//!
//! Delivery streams (DESIGN §5): a link carries the connecting engine's stream towards the
//! accepting one ([`source_side`], [`target_side`]); the protocol decisions are keel-bus's, the
//! durable state the engine's (`keel_engine::messaging::streams`). FLUSH rounds run in the
//! handshake ([`handshake`], `link_once`). Remote get rides on the same link: the connecting
//! engine's consumers send `Get`/`Settle`, the accepting engine (the queue's) answers in order
//! and releases what it lent when the link ends (`Lent`, at most LENT_MAX per link).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use keel_bus::auth;
use keel_bus::link::{check_header, LinkCodec, LinkFrame, StreamState, VerdictKind};
use keel_core::catalog;
use keel_core::emit;
use keel_core::unix_ms as now_ms;
use keel_engine::messaging::remote::{
    delivery_from, lend, outcome_code, outcome_of, RemoteRequest, GOT_BYTES_MAX,
    REMOTE_REQUESTS_MAX,
};
use keel_engine::messaging::streams::{FlushSide, InHello, OutState, OutStream, StreamMessage};
use keel_engine::messaging::{Delivery, Messaging, Outcome};
use keel_engine::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// How long a peer may take for its header and `Open` frame together.
pub const OPEN_WAIT_MS: u64 = 5_000;

/// The byte stream a link runs over: a TCP socket, or a simulated one in tests.
pub trait LinkIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> LinkIo for T {}

/// One engine this server hosts, as links see it.
struct Local {
    engine: Arc<Engine>,
    key: [u8; 32],
    /// Member engines of its bus (name → UUID), this one excluded.
    peers: HashMap<String, String>,
}

/// Accepts links for the engines of one server.
pub struct LinkAcceptor {
    /// By bus name.
    local: HashMap<String, Local>,
}

/// An engine's `Open` frame: who it is, with a fresh credential proof, and the streams it
/// sources towards the other side.
fn open_frame(
    key: &[u8; 32],
    ours: &keel_engine::EngineConfig,
    incarnation: u64,
    streams: Vec<StreamState>,
) -> LinkFrame {
    LinkFrame::Open {
        bus: ours.bus.clone(),
        me: ours.me.clone(),
        me_uuid: ours.uuid.clone(),
        incarnation,
        credential_proof: auth::make_proof(key, now_ms(), &ours.bus, &ours.me, &ours.uuid),
        streams,
    }
}

impl LinkAcceptor {
    /// `shared_secret` is the profile's admin credential, from which each bus's key derives.
    pub fn new(
        cfg: &keel_config::Config,
        engines: &[Arc<Engine>],
        shared_secret: &[u8],
    ) -> LinkAcceptor {
        let mut local = HashMap::new();
        for e in engines {
            let bus = &e.config().bus;
            let peers = peers_of(cfg, e)
                .into_iter()
                .map(|p| (p.me, p.uuid))
                .collect();
            local.insert(
                bus.clone(),
                Local {
                    engine: e.clone(),
                    key: auth::link_key(shared_secret, bus),
                    peers,
                },
            );
        }
        LinkAcceptor { local }
    }

    /// As keel-amqp's link handler.
    pub fn handler(self: Arc<Self>) -> keel_amqp::LinkHandler {
        Arc::new(move |sock, peer, admitted| {
            let me = self.clone();
            Box::pin(async move { me.accept(sock, peer, admitted).await })
        })
    }

    async fn accept(&self, sock: TcpStream, peer: SocketAddr, mut admitted: keel_amqp::Admitted) {
        if let Err(e) = harden(&sock) {
            let why = format!("cannot set keepalive on the connection ({e})");
            return emit!(catalog::CWSIT0004W, peer = peer, me = "unknown", why = why);
        }
        self.serve(sock, &peer.to_string(), &mut || admitted.authenticated())
            .await
    }

    /// Serves one accepted connection (after its socket options are set): header, `Open`,
    /// checks, then the target side of the peer's streams until the link ends. Generic over
    /// the byte stream so simulations can drive it over a simulated network.
    /// `authenticated` is told when the peer's `Open` checked out (it moves the connection
    /// from the bus port's unauthenticated count to its links' pool, or refuses it).
    pub async fn serve<S: LinkIo>(
        &self,
        mut sock: S,
        peer: &str,
        authenticated: &mut (dyn FnMut() -> Result<(), String> + Send),
    ) {
        let refuse = |me: &str, why: &str| {
            emit!(catalog::CWSIT0004W, peer = peer, me = me, why = why);
        };
        let mut head = [0u8; 8];
        // One deadline for the header and the Open together: a peer that has not proved
        // who it is holds a connection slot for OPEN_WAIT_MS at most.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(OPEN_WAIT_MS);
        match tokio::time::timeout_at(deadline, sock.read_exact(&mut head)).await {
            Ok(Ok(_)) => {}
            _ => return refuse("unknown", "no complete protocol header"),
        }
        if let Err(e) = check_header(head) {
            return refuse("unknown", &e.to_string());
        }
        // Until the Open is checked, frames are bounded by OPEN_FRAME_BYTES_MAX.
        let mut framed = Framed::new(sock, LinkCodec::default());
        let open = match tokio::time::timeout_at(deadline, framed.next()).await {
            Ok(Some(Ok(f))) => f,
            Ok(Some(Err(e))) => return refuse("unknown", &e.to_string()),
            Ok(None) => return refuse("unknown", "closed before its Open frame"),
            Err(_) => return refuse("unknown", "no Open frame in time"),
        };
        let LinkFrame::Open {
            bus,
            me,
            me_uuid,
            credential_proof,
            streams,
            ..
        } = open
        else {
            return refuse("unknown", "the first frame was not Open");
        };
        let verdict = self.check_open(&bus, &me, &me_uuid, &credential_proof);
        let local = match verdict {
            Ok(local) => local,
            Err(why) => {
                refuse(&me, &why);
                let _ = framed.send(LinkFrame::Close { reason: why }).await;
                return;
            }
        };
        if let Err(why) = authenticated() {
            refuse(&me, &why);
            let _ = framed.send(LinkFrame::Close { reason: why }).await;
            return;
        }
        framed.codec_mut().authenticated();
        emit!(catalog::CWSIT0005I, me = me, peer = peer, bus = bus);
        let incarnation = local.engine.info().await.map_or(0, |i| i.incarnation);
        let reply = open_frame(&local.key, local.engine.config(), incarnation, Vec::new());
        if framed.send(reply).await.is_err() {
            return emit!(catalog::CWSIT0006I, me = me, why = "the connection failed");
        }
        let why = match target_side(&local.engine, &me, streams, &mut framed).await {
            Ok(why) => why,
            Err(why) => {
                let _ = framed
                    .send(LinkFrame::Close {
                        reason: why.clone(),
                    })
                    .await;
                why
            }
        };
        emit!(catalog::CWSIT0006I, me = me, why = why);
        let _ = framed.into_inner().shutdown().await;
    }

    /// The local engine a valid `Open` is for, or why it is refused.
    fn check_open(&self, bus: &str, me: &str, uuid: &str, proof: &[u8]) -> Result<&Local, String> {
        let Some(local) = self.local.get(bus) else {
            return Err(format!(
                "it is an engine of bus {bus}, which this server has no engine on"
            ));
        };
        let ours = &local.engine.config().me;
        if me == ours {
            return Err(format!("it claims to be {me}, an engine of this server"));
        }
        match local.peers.get(me) {
            None => return Err(format!("{me} is not a member of bus {bus}")),
            Some(known) if known != uuid => {
                return Err(format!(
                    "{me} has UUID {uuid}, but the bus's member {me} has UUID {known}"
                ))
            }
            Some(_) => {}
        }
        auth::verify_proof(&local.key, proof, now_ms(), bus, me, uuid)
            .map_err(|e| e.to_string())?;
        if local.engine.state() != keel_engine::MeState::Started {
            return Err(format!("this server's engine {ours} is not started"));
        }
        Ok(local)
    }
}

/// A member engine of the same bus on another server, and where its server's bus port is.
#[derive(Debug, Clone)]
pub struct Peer {
    pub me: String,
    pub uuid: String,
    pub address: String,
}

/// The other member engines of `engine`'s bus, from the configuration.
pub fn peers_of(cfg: &keel_config::Config, engine: &Engine) -> Vec<Peer> {
    let ours = engine.config();
    cfg.buses
        .iter()
        .filter(|b| b.name == ours.bus)
        .flat_map(|b| b.members.iter())
        .filter(|m| m.me != ours.me)
        .filter_map(|m| {
            let node = cfg.nodes.iter().find(|n| n.name == m.node)?;
            let server = node.servers.iter().find(|s| s.name == m.server)?;
            Some(Peer {
                me: m.me.clone(),
                uuid: m.uuid.clone(),
                address: format!("{}:{}", node.host, server.bus_port),
            })
        })
        .collect()
}

/// Unacknowledged ticks a source may have in flight on one stream.
pub const STREAM_WINDOW: u64 = 1_024;
/// In-order messages a target stores with one commit, and their bytes (within the store's
/// bounds per commit).
pub const DELIVER_BATCH_MAX: usize = 256;
/// (A quarter of the store's 64 MiB per commit.)
pub const DELIVER_BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Messages read from the store per send burst.
pub const SEND_BATCH_MAX: usize = 128;
/// How often a source looks for new messages when no wake-up came.
pub const SOURCE_POLL_MS: u64 = 1_000;

/// A dead peer (crashed machine, cut network) is noticed on an idle link after
/// KEEPALIVE_IDLE_S + KEEPALIVE_RETRIES × KEEPALIVE_INTERVAL_S, and with data unacknowledged
/// after USER_TIMEOUT_S; the link then ends and is opened again, and the source resends what
/// the target did not acknowledge. Without these a half-open link waits forever.
pub const KEEPALIVE_IDLE_S: u64 = 15;
pub const KEEPALIVE_INTERVAL_S: u64 = 5;
pub const KEEPALIVE_RETRIES: u32 = 3;
pub const USER_TIMEOUT_S: u64 = 30;

/// Sets the link socket's keepalive and user timeout (see KEEPALIVE_IDLE_S).
fn harden(sock: &TcpStream) -> std::io::Result<()> {
    let s = socket2::SockRef::from(sock);
    s.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(KEEPALIVE_IDLE_S))
            .with_interval(Duration::from_secs(KEEPALIVE_INTERVAL_S))
            .with_retries(KEEPALIVE_RETRIES),
    )?;
    s.set_tcp_user_timeout(Some(Duration::from_secs(USER_TIMEOUT_S)))
}

/// First and largest pause between attempts to link to a peer.
pub const RECONNECT_FIRST_MS: u64 = 100;
pub const RECONNECT_MAX_MS: u64 = 10_000;
/// How long a connect and the peer's answering `Open` may take.
pub const CONNECT_WAIT_MS: u64 = 5_000;

/// Keeps `engine` linked to `peer` until the task is aborted: connects, proves its credential,
/// checks the peer's, holds the link, and after a failure or a loss tries again with back-off
/// (doubling from RECONNECT_FIRST_MS up to RECONNECT_MAX_MS). Logs `CWSIT0007I` when a link
/// comes up and `CWSIT0008W` when an attempt fails or a link is lost, once per distinct reason,
/// so a peer that stays down does not flood the log.
pub async fn keep_linked(engine: Arc<Engine>, shared_secret: Vec<u8>, peer: Peer) {
    let ours = engine.config().clone();
    let key = auth::link_key(&shared_secret, &ours.bus);
    let mut pause_ms = RECONNECT_FIRST_MS;
    let mut last_failure: Option<String> = None;
    loop {
        if engine.state() != keel_engine::MeState::Started {
            // Nothing to link until this engine runs; look again shortly.
            tokio::time::sleep(Duration::from_millis(RECONNECT_MAX_MS / 10)).await;
            continue;
        }
        let failure = match link_once(&engine, &key, &peer).await {
            Ok(lost) => {
                // It was up: the next failure is news, and retrying starts quickly again.
                pause_ms = RECONNECT_FIRST_MS;
                last_failure = None;
                format!("the link was lost ({lost})")
            }
            Err(why) => why,
        };
        if last_failure.as_deref() != Some(failure.as_str()) {
            emit!(
                catalog::CWSIT0008W,
                me = ours.me,
                peer = peer.me,
                address = peer.address,
                why = failure
            );
            last_failure = Some(failure);
        }
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        pause_ms = (pause_ms * 2).min(RECONNECT_MAX_MS);
    }
}

/// One link: Err(why) if it never came up, Ok(why it ended) once it was up.
async fn link_once(engine: &Engine, key: &[u8; 32], peer: &Peer) -> Result<String, String> {
    let wait = Duration::from_millis(CONNECT_WAIT_MS);
    let sock = match tokio::time::timeout(wait, TcpStream::connect(&peer.address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("cannot connect ({e})")),
        Err(_) => return Err(format!("no connection within {CONNECT_WAIT_MS} ms")),
    };
    let _ = sock.set_nodelay(true);
    harden(&sock).map_err(|e| format!("cannot set keepalive ({e})"))?;
    source_link(engine, key, peer, sock).await
}

/// The connecting side of one link over `sock` (connected, socket options set): header,
/// `Open`, the peer's checks and verdicts, then the source side of this engine's stream until
/// the link ends. Err(why) if it never came up, Ok(why it ended) once it was up. Generic over
/// the byte stream so simulations can drive it over a simulated network.
pub async fn source_link<S: LinkIo>(
    engine: &Engine,
    key: &[u8; 32],
    peer: &Peer,
    mut sock: S,
) -> Result<String, String> {
    let ours = engine.config();
    let wait = Duration::from_millis(CONNECT_WAIT_MS);
    sock.write_all(&keel_bus::link::PROTOCOL_HEADER)
        .await
        .map_err(|e| format!("cannot write ({e})"))?;
    let incarnation = engine.info().await.map_or(0, |i| i.incarnation);
    let messaging = engine.messaging().map_err(|e| e.to_string())?;
    let stream = messaging
        .out_stream(&peer.me)
        .await
        .map_err(|e| e.to_string())?;
    let mut st = stream.state().await;
    // The answer is bounded like any frame before its sender is checked.
    let mut framed = Framed::new(sock, LinkCodec::default());
    let open = open_frame(key, ours, incarnation, vec![stream_state(&st)]);
    framed
        .send(open)
        .await
        .map_err(|e| format!("cannot write ({e})"))?;
    let answer = match tokio::time::timeout(wait, framed.next()).await {
        Ok(Some(Ok(f))) => f,
        Ok(Some(Err(e))) => return Err(e.to_string()),
        Ok(None) => return Err("the peer closed the connection without an answer".into()),
        Err(_) => return Err(format!("no answer within {CONNECT_WAIT_MS} ms")),
    };
    match answer {
        LinkFrame::Open {
            bus,
            me,
            me_uuid,
            credential_proof,
            ..
        } => {
            if bus != ours.bus || me != peer.me || me_uuid != peer.uuid {
                return Err(format!(
                    "the answer came from engine {me} ({me_uuid}) of bus {bus}, not {} ({}) of bus {}",
                    peer.me, peer.uuid, ours.bus
                ));
            }
            auth::verify_proof(key, &credential_proof, now_ms(), &bus, &me, &me_uuid)
                .map_err(|e| format!("the peer's {e}"))?;
            framed.codec_mut().authenticated();
        }
        LinkFrame::Close { reason } => return Err(format!("refused by the peer: {reason}")),
        _ => return Err("the peer's first frame was not Open".into()),
    }
    // The peer's verdict on our stream. A peer that runs a FLUSH first asks for the stream to
    // move onto a new one made for its flush: done here, then the peer judges the new stream.
    let mut verdict = read_verdict(&mut framed, &st.stream_id).await?;
    let mut rounds = 0;
    while verdict.0 == VerdictKind::FlushRequested {
        rounds += 1;
        let Some(epoch) = verdict.4.clone().filter(|_| rounds <= FLUSH_ROUNDS_MAX) else {
            return Err(format!(
                "the peer asked for a flush without an epoch or more than {FLUSH_ROUNDS_MAX} times"
            ));
        };
        st = messaging
            .out_flush(&peer.me, &epoch)
            .await
            .map_err(|e| e.to_string())?;
        framed
            .send(LinkFrame::Flush {
                stream: stream_state(&st),
            })
            .await
            .map_err(|e| format!("cannot write ({e})"))?;
        verdict = read_verdict(&mut framed, &st.stream_id).await?;
    }
    emit!(
        catalog::CWSIT0007I,
        me = ours.me,
        peer = peer.me,
        address = peer.address
    );
    let (kind, a, b, last, _) = verdict;
    let verdict = match check_verdict(&messaging, peer, &st, (kind, a, b, last)).await {
        Ok(v) => v,
        Err(e) => return Ok(format!("checking the peer's verdict failed ({e})")),
    };
    let from = match verdict {
        Ok(from) => {
            // The peer resumed a stream of ours made after any FLUSH of this engine: its
            // outbound side of that flush is confirmed.
            if let Err(e) = messaging.flush_confirm(&peer.me, FlushSide::Outbound).await {
                return Ok(format!("recording the flush confirmation failed ({e})"));
            }
            Some(from)
        }
        Err(why) => {
            emit!(
                catalog::CWSIT0009E,
                stream = st.stream_id,
                me = ours.me,
                peer = peer.me,
                why = why
            );
            None
        }
    };
    Ok(source_side(&messaging, peer, &stream, from, &mut framed).await)
}

/// A remote get request sent on a link, waiting for its answer (answers come in order).
enum Waiting {
    /// Queue, messages asked for, the consumer's reply.
    Get(
        String,
        u32,
        tokio::sync::oneshot::Sender<Result<Vec<Delivery>, String>>,
    ),
    /// Settles asked, the positions of those sent (known loans), the reply.
    Settle(
        usize,
        Vec<usize>,
        tokio::sync::oneshot::Sender<Result<Vec<Result<(), String>>, String>>,
    ),
    /// A release this side sent for messages nobody wanted any more.
    Discard,
}

/// Deliveries a target engine has lent to a peer's consumers at most, over one link.
pub const LENT_MAX: usize = 4_096;

/// Deliveries lent over one link, by queue: released when the link ends.
#[derive(Default)]
struct Lent {
    by_queue: HashMap<String, std::collections::BTreeSet<u64>>,
    count: usize,
}

/// The owning engine's answer to a remote `Get`.
async fn lend_messages(
    messaging: &Messaging,
    lent: &mut Lent,
    req: u64,
    queue: String,
    max: u32,
) -> LinkFrame {
    let room = LENT_MAX.saturating_sub(lent.count);
    let max = usize::try_from(max)
        .unwrap_or(usize::MAX)
        .min(room)
        .min(DELIVER_BATCH_MAX);
    let error = |e: String| LinkFrame::Got {
        req,
        msgs: Vec::new(),
        error: Some(e),
    };
    if let Err(e) = messaging.queue(&queue) {
        return error(e.to_string());
    }
    if max == 0 {
        return LinkFrame::Got {
            req,
            msgs: Vec::new(),
            error: None,
        };
    }
    // Taken a few at a time, up to GOT_BYTES_MAX (at least one message): one answer stays
    // within a frame and within what the peer's reader holds.
    let mut ds = Vec::new();
    let mut bytes = 0usize;
    while ds.len() < max && bytes < GOT_BYTES_MAX {
        let step = (max - ds.len()).min(8);
        match messaging.receive_now(&queue, step).await {
            Err(e) if ds.is_empty() => return error(e.to_string()),
            Err(_) => break,
            Ok(more) if more.is_empty() => break,
            Ok(more) => {
                let mut over = Vec::new();
                for d in more {
                    if bytes >= GOT_BYTES_MAX {
                        over.push((d.seq, keel_engine::messaging::Outcome::Released));
                        continue;
                    }
                    bytes += d.body.len() + 256;
                    ds.push(d);
                }
                if !over.is_empty() {
                    // Over the budget: back at once in one settle, delivered again (count
                    // unchanged); if that fails they stay locked until the engine restarts.
                    if let Err(e) = messaging.settle_batch(&queue, &over).await {
                        tracing::warn!(queue = %queue, error = %e, "giving back messages over a remote get's budget failed");
                    }
                }
            }
        }
    }
    let set = lent.by_queue.entry(queue).or_default();
    let msgs = ds
        .into_iter()
        .map(|d| {
            set.insert(d.seq);
            let (properties, reliability) = lend(&d);
            keel_bus::link::RemoteMessage {
                seq: d.seq,
                id: d.id,
                priority: d.priority,
                reliability,
                delivery_count: d.delivery_count,
                properties,
                body: d.body,
            }
        })
        .collect::<Vec<_>>();
    lent.count += msgs.len();
    LinkFrame::Got {
        req,
        msgs,
        error: None,
    }
}

/// The owning engine's answer to a remote `Settle`: only deliveries lent over this link.
async fn settle_lent(
    messaging: &Messaging,
    lent: &mut Lent,
    req: u64,
    queue: String,
    settles: Vec<(u64, u8)>,
) -> LinkFrame {
    let mut results: Vec<Option<String>> = vec![None; settles.len()];
    let mut valid = Vec::with_capacity(settles.len());
    let mut at = Vec::with_capacity(settles.len());
    let mut none = std::collections::BTreeSet::new();
    let set = lent.by_queue.get_mut(&queue).unwrap_or(&mut none);
    for (i, (seq, code)) in settles.into_iter().enumerate() {
        match outcome_of(code) {
            Some(o) if set.remove(&seq) => {
                valid.push((seq, o));
                at.push(i);
            }
            Some(_) => {
                results[i] = Some(format!(
                    "delivery {seq} of {queue} was not lent to this link"
                ))
            }
            None => results[i] = Some(format!("unknown outcome code {code}")),
        }
    }
    lent.count -= valid.len();
    if valid.is_empty() {
        return LinkFrame::Settled {
            req,
            results,
            error: None,
        };
    }
    match messaging.settle_batch(&queue, &valid).await {
        Ok(rs) => {
            for (i, r) in at.into_iter().zip(rs) {
                results[i] = r.err().map(|e| e.to_string());
            }
            LinkFrame::Settled {
                req,
                results,
                error: None,
            }
        }
        Err(e) => {
            // Nothing was settled (the engine stopped or its store failed): they stay lent, so
            // the end of the link still releases them.
            let set = lent.by_queue.entry(queue).or_default();
            for (seq, _) in &valid {
                set.insert(*seq);
            }
            lent.count += valid.len();
            LinkFrame::Settled {
                req,
                results: Vec::new(),
                error: Some(e.to_string()),
            }
        }
    }
}

/// Gives back what was lent over a link that ended: delivered again, count unchanged.
async fn release_lent(messaging: &Messaging, lent: Lent) {
    for (queue, seqs) in lent.by_queue {
        let settles: Vec<_> = seqs
            .into_iter()
            .map(|s| (s, keel_engine::messaging::Outcome::Released))
            .collect();
        for chunk in settles.chunks(DELIVER_BATCH_MAX) {
            if let Err(e) = messaging.settle_batch(&queue, chunk).await {
                tracing::warn!(queue = %queue, error = %e, "releasing deliveries lent over an ended link failed; they stay locked until the engine restarts");
            }
        }
    }
}

/// Times a FLUSH may be requested in one handshake (each for a new epoch: several engines
/// restored at once each ask once).
pub const FLUSH_ROUNDS_MAX: usize = 4;

/// A verdict as it travels: (kind, a, b, last identity, flush epoch).
type VerdictParts = (VerdictKind, u64, u64, Option<String>, Option<String>);

/// How a source announces its stream.
fn stream_state(st: &OutState) -> StreamState {
    StreamState {
        stream_id: st.stream_id.clone(),
        next_tick: st.next_tick,
        acked: st.acked,
        flush_epoch: st.flush_epoch.clone(),
        resend_upto: st.resend_upto,
    }
}

/// The peer's verdict on stream `stream_id`.
async fn read_verdict<S: LinkIo>(
    framed: &mut Framed<S, LinkCodec>,
    stream_id: &str,
) -> Result<VerdictParts, String> {
    let wait = Duration::from_millis(CONNECT_WAIT_MS);
    match tokio::time::timeout(wait, framed.next()).await {
        Ok(Some(Ok(LinkFrame::Verdict {
            stream_id: id,
            kind,
            a,
            b,
            last_identity,
            flush_epoch,
        }))) if id == stream_id => Ok((kind, a, b, last_identity, flush_epoch)),
        Ok(Some(Ok(LinkFrame::Close { reason }))) => Err(format!("refused by the peer: {reason}")),
        Ok(Some(Err(e))) => Err(e.to_string()),
        Ok(_) => Err("the peer did not answer for our delivery stream".into()),
        Err(_) => Err(format!("no verdict within {CONNECT_WAIT_MS} ms")),
    }
}

/// What the source does with the target's verdict: Ok(Ok(tick to send from)) after
/// acknowledging what the target already has, Ok(Err(why the stream is held)) when a store
/// went back in time, or Err(why) when this side failed (a store error: the link ends and is
/// tried again, rather than holding a stream that is fine).
async fn check_verdict(
    messaging: &Messaging,
    peer: &Peer,
    st: &OutState,
    (kind, a, b, last): (VerdictKind, u64, u64, Option<String>),
) -> Result<Result<u64, String>, String> {
    let stream_id = &st.stream_id;
    match kind {
        VerdictKind::SourceRestored => Ok(Err(format!(
            "engine {} has completed tick {a} of it but this engine's next tick is {b}: this engine's data store went back in time",
            peer.me
        ))),
        VerdictKind::TargetRestored => Ok(Err(format!(
            "engine {} has completed only tick {a} of it but acknowledged tick {b} before: that engine's data store went back in time",
            peer.me
        ))),
        VerdictKind::Replaced => Ok(Err(format!(
            "engine {} retired this stream when a FLUSH of this engine replaced it: this engine's data store went back in time",
            peer.me
        ))),
        VerdictKind::FlushRequested => Err("the peer asked for a flush once too often".into()),
        VerdictKind::Resume => {
            let from = a.max(1);
            // A resume behind what the target acknowledged, or past what was assigned, is what
            // a restored (or broken) target says: hold rather than trust it.
            if from <= st.acked || from > st.next_tick {
                return Ok(Err(format!(
                    "engine {} asks to resume at tick {from}, but it acknowledged tick {} and tick {} is the next to assign",
                    peer.me, st.acked, st.next_tick
                )));
            }
            if from > 1 {
                let ours = messaging
                    .out_identity_at(&peer.me, from - 1)
                    .await
                    .map_err(|e| e.to_string())?;
                if ours.is_some() && ours != last {
                    return Ok(Err(format!(
                        "tick {} of stream {stream_id} is message {} here but {} at engine {}: the two histories forked (a store went back in time)",
                        from - 1,
                        ours.unwrap_or_default(),
                        last.unwrap_or_default(),
                        peer.me
                    )));
                }
            }
            // The target has everything before `from`.
            messaging
                .out_acked(&peer.me, stream_id, from - 1)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Ok(from))
        }
    }
}

/// Sends the stream's messages from `from` on (None: held, nothing is sent) and takes the
/// target's acks and resend requests until the link ends; returns why it ended. The target
/// has what it acknowledged durably, so the window moves with each ack at once; removing the
/// acknowledged rows here is left to the stream's committer (`OutStream::ack_later`), so
/// sending never waits for it.
async fn source_side<S: LinkIo>(
    messaging: &Messaging,
    peer: &Peer,
    stream: &OutStream,
    from: Option<u64>,
    framed: &mut Framed<S, LinkCodec>,
) -> String {
    // The peer's frames are read all the time, also while this side writes: the peer may be
    // writing (acks, remote get answers with message bodies) while it does not read, and two
    // sides that only write would wait for each other forever. What is read waits in a
    // channel bounded by what the protocol lets the peer have outstanding: an ack per window
    // of ticks and an answer per remote request (REMOTE_REQUESTS_MAX, each bounded by
    // GOT_BYTES_MAX).
    let (mut sink, mut source) = StreamExt::split(framed);
    let (inbound_tx, mut inbound) = tokio::sync::mpsc::channel(INBOUND_FRAMES_MAX);
    let reader = async move {
        while let Some(f) = source.next().await {
            if inbound_tx.send(f).await.is_err() {
                break;
            }
        }
    };
    let writer = source_loop(messaging, peer, stream, from, &mut sink, &mut inbound);
    tokio::pin!(reader, writer);
    let mut reading = true;
    loop {
        tokio::select! {
            why = &mut writer => return why,
            _ = &mut reader, if reading => reading = false,
        }
    }
}

/// Frames read ahead on a source link (see `source_side`).
const INBOUND_FRAMES_MAX: usize = 2 * STREAM_WINDOW as usize + REMOTE_REQUESTS_MAX;

type LinkSink<'a, S> = futures_util::stream::SplitSink<&'a mut Framed<S, LinkCodec>, LinkFrame>;
type Inbound = tokio::sync::mpsc::Receiver<Result<LinkFrame, keel_bus::link::LinkError>>;

async fn source_loop<S: LinkIo>(
    messaging: &Messaging,
    peer: &Peer,
    stream: &OutStream,
    from: Option<u64>,
    framed: &mut LinkSink<'_, S>,
    inbound: &mut Inbound,
) -> String {
    let st0 = stream.state().await;
    let stream_id = st0.stream_id.clone();
    let mut peer_acked = st0.acked;
    let mut next_send = from;
    // Highest tick sent on this link: acks and resend requests beyond it are refused, so a
    // peer can never make this side forget messages it did not receive.
    let mut sent_upto = from.map_or(peer_acked, |f| f - 1);
    // Remote get requests of this engine's consumers, carried on this link while it is up.
    let mut remote_rx = messaging.attach_remote_link(&peer.me);
    let mut remote_open = true;
    let mut next_req: u64 = 1;
    let mut waiting: std::collections::VecDeque<(u64, Waiting)> = Default::default();
    // Deliveries lent over this link, by the loan number this engine's consumer sees as the
    // delivery's seq: a settle names a loan of this link, never a seq the queue's engine may
    // have lent again over a later link.
    let mut loans: HashMap<u64, u64> = HashMap::new();
    loop {
        if let Some(next) = next_send.as_mut() {
            let next_tick = stream.next_tick();
            // At most STREAM_WINDOW unacknowledged ticks in flight.
            while *next < next_tick && next.saturating_sub(peer_acked) <= STREAM_WINDOW {
                let room = (next_tick - *next)
                    .min((STREAM_WINDOW + peer_acked + 1).saturating_sub(*next))
                    .max(1);
                let n = usize::try_from(room)
                    .unwrap_or(usize::MAX)
                    .min(SEND_BATCH_MAX);
                let page = match messaging.out_page(&peer.me, &stream_id, *next, n).await {
                    Ok(p) if !p.is_empty() => p,
                    Ok(_) => break,
                    Err(e) => return e.to_string(),
                };
                for m in page {
                    *next = m.tick + 1;
                    sent_upto = sent_upto.max(m.tick);
                    let frame = LinkFrame::Data {
                        stream_id: stream_id.clone(),
                        tick: m.tick,
                        message_id: m.id,
                        priority: m.priority,
                        reliability: m.reliability,
                        expiry_ms: m.expiry_ms,
                        destination: m.dest,
                        properties: m.properties,
                        body: m.body,
                    };
                    if let Err(e) = framed.feed(frame).await {
                        return e.to_string();
                    }
                }
                if let Err(e) = framed.flush().await {
                    return e.to_string();
                }
            }
        }
        tokio::select! {
            f = inbound.recv() => match f {
                Some(Ok(LinkFrame::Ack { stream_id: id, .. } | LinkFrame::Resend { stream_id: id, .. })) if id != stream_id => {
                    return format!("the peer answered for stream {id}, not this link's stream {stream_id}");
                }
                Some(Ok(LinkFrame::Ack { upto, .. })) => {
                    if upto > sent_upto {
                        return format!("the peer acknowledged tick {upto}, which was not sent");
                    }
                    if upto > peer_acked {
                        peer_acked = upto;
                        stream.ack_later(&stream_id, upto);
                    }
                }
                Some(Ok(LinkFrame::Resend { from, .. })) => {
                    if from <= peer_acked || from > sent_upto + 1 {
                        return format!("the peer asked to resend from tick {from}, outside {}..={}", peer_acked + 1, sent_upto + 1);
                    }
                    if let Some(next) = next_send.as_mut() {
                        *next = from;
                    }
                }
                Some(Ok(LinkFrame::Got { req, msgs, error })) => {
                    match waiting.pop_front() {
                        Some((r, Waiting::Get(queue, max, reply))) if r == req => {
                            if msgs.len() > usize::try_from(max).unwrap_or(usize::MAX) {
                                return format!("the peer answered remote get request {req} with {} messages, more than the {max} asked for", msgs.len());
                            }
                            let answer = match error {
                                Some(e) => Err(e),
                                None => Ok(msgs
                                    .into_iter()
                                    .map(|m| {
                                        let loan = messaging.next_loan();
                                        loans.insert(loan, m.seq);
                                        delivery_from(&queue, loan, m.id, m.priority, m.reliability, m.delivery_count, &m.properties, m.body)
                                    })
                                    .collect::<Vec<_>>()),
                            };
                            // The consumer gave up meanwhile (its link detached): give the
                            // messages back at once rather than leave them lent until this
                            // link ends.
                            if let Err(Ok(unwanted)) = reply.send(answer) {
                                if !unwanted.is_empty() {
                                    let req = next_req;
                                    next_req += 1;
                                    let settles = unwanted
                                        .iter()
                                        .filter_map(|d| loans.remove(&d.seq))
                                        .map(|seq| (seq, outcome_code(Outcome::Released)))
                                        .collect();
                                    if let Err(e) = framed.send(LinkFrame::Settle { req, queue, settles }).await {
                                        return e.to_string();
                                    }
                                    waiting.push_back((req, Waiting::Discard));
                                }
                            }
                        }
                        _ => return format!("the peer answered remote get request {req}, which was not the next one"),
                    }
                }
                Some(Ok(LinkFrame::Settled { req, results, error })) => {
                    match waiting.pop_front() {
                        Some((r, Waiting::Discard)) if r == req => {}
                        Some((r, Waiting::Settle(asked, at, reply))) if r == req => {
                            if error.is_none() && results.len() != at.len() {
                                return format!("the peer answered remote settle request {req} with {} results for {} deliveries", results.len(), at.len());
                            }
                            let _ = reply.send(match error {
                                Some(e) => Err(e),
                                None => {
                                    let mut all: Vec<Result<(), String>> = vec![Err("lent over a link that has ended: the queue's engine released it, and delivers it again".to_string()); asked];
                                    for (i, r) in at.into_iter().zip(results) {
                                        all[i] = r.map_or(Ok(()), Err);
                                    }
                                    Ok(all)
                                }
                            });
                        }
                        _ => return format!("the peer answered remote settle request {req}, which was not the next one"),
                    }
                }
                Some(Ok(LinkFrame::Close { reason })) => return format!("closed by the peer: {reason}"),
                Some(Ok(_)) => return "the peer sent a frame a source does not take".into(),
                Some(Err(e)) => return e.to_string(),
                None => return "the peer closed the connection".into(),
            },
            r = remote_rx.recv(), if remote_open && waiting.len() < REMOTE_REQUESTS_MAX => {
                let Some(r) = r else {
                    // A newer link took over the requests.
                    remote_open = false;
                    continue;
                };
                let req = next_req;
                next_req += 1;
                let (frame, w) = match r {
                    RemoteRequest::Get { queue, max, reply } => (
                        LinkFrame::Get { req, queue: queue.clone(), max },
                        Waiting::Get(queue, max, reply),
                    ),
                    RemoteRequest::Settle { queue, settles, reply } => {
                        // Loans of an earlier link are refused here: the queue's engine
                        // released them when that link ended.
                        let mut known = Vec::with_capacity(settles.len());
                        let mut at = Vec::with_capacity(settles.len());
                        for (i, (loan, o)) in settles.iter().enumerate() {
                            if let Some(seq) = loans.remove(loan) {
                                known.push((seq, outcome_code(*o)));
                                at.push(i);
                            }
                        }
                        (
                            LinkFrame::Settle { req, queue, settles: known },
                            Waiting::Settle(settles.len(), at, reply),
                        )
                    }
                };
                if let Err(e) = framed.send(frame).await {
                    return e.to_string();
                }
                waiting.push_back((req, w));
            }
            _ = stream.notify.notified() => {}
            _ = messaging.stopped() => return "this engine stopped".into(),
            // A bound on how long a missed wake-up can delay sending.
            _ = tokio::time::sleep(Duration::from_millis(SOURCE_POLL_MS)) => {}
        }
    }
}

/// What a frame weighs in a target's batch (see DELIVER_BATCH_BYTES_MAX).
fn frame_bytes(f: &LinkFrame) -> usize {
    match f {
        LinkFrame::Data {
            body, properties, ..
        } => body.len() + properties.len() + 256,
        _ => 64,
    }
}

/// A message ID as keel-bus identifies it.
#[derive(Debug)]
struct Ident(String);

impl keel_bus::Identified for Ident {
    fn identity(&self) -> String {
        self.0.clone()
    }
}

/// The target side of an accepted link: a verdict for each of the peer's streams, then each
/// in-order message stored with its stream's prefix (one commit) before its ack. Ok(why the
/// link ended), or Err(why to close it).
async fn target_side<S: LinkIo>(
    engine: &Engine,
    peer_me: &str,
    streams: Vec<StreamState>,
    framed: &mut Framed<S, LinkCodec>,
) -> Result<String, String> {
    let messaging = engine.messaging().map_err(|e| e.to_string())?;
    let mut lent = Lent::default();
    let r = target_loop(engine, &messaging, peer_me, streams, framed, &mut lent).await;
    release_lent(&messaging, lent).await;
    r
}

async fn target_loop<S: LinkIo>(
    engine: &Engine,
    messaging: &Messaging,
    peer_me: &str,
    streams: Vec<StreamState>,
    framed: &mut Framed<S, LinkCodec>,
    lent: &mut Lent,
) -> Result<String, String> {
    let ours = &engine.config().me;
    let mut target = keel_bus::Target::default();
    for s in streams {
        if let Some(why) = handshake(messaging, ours, peer_me, s, &mut target, framed).await? {
            return Ok(why);
        }
    }
    loop {
        let next = tokio::select! {
            f = framed.next() => f,
            _ = messaging.stopped() => return Err(format!("engine {ours} stopped")),
        };
        let first = match next {
            None => return Ok("the peer closed the connection".into()),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(f)) => f,
        };
        // This frame and those already here: in-order messages of one stream are stored with
        // one commit and acknowledged with one ack (bounded by DELIVER_BATCH_MAX).
        let mut bytes = frame_bytes(&first);
        let mut frames = vec![first];
        while frames.len() < DELIVER_BATCH_MAX && bytes < DELIVER_BATCH_BYTES_MAX {
            match framed.next().now_or_never() {
                Some(Some(Ok(f))) => {
                    bytes += frame_bytes(&f);
                    frames.push(f);
                }
                Some(Some(Err(e))) => return Err(e.to_string()),
                Some(None) | None => break,
            }
        }
        let mut batch: Option<(String, Vec<StreamMessage>)> = None;
        let mut replies = Vec::new();
        for frame in frames {
            match frame {
                LinkFrame::Close { reason } => {
                    store_batch(messaging, peer_me, batch.take(), &mut replies).await?;
                    send_all(framed, replies).await?;
                    return Ok(format!("the peer closed it ({reason})"));
                }
                LinkFrame::Data {
                    stream_id,
                    tick,
                    message_id,
                    priority,
                    reliability,
                    expiry_ms,
                    destination,
                    properties,
                    body,
                } => {
                    if tick == 0 {
                        return Err("a data frame with tick 0".into());
                    }
                    match target.on_data(&stream_id, tick, Ident(message_id.clone())) {
                        keel_bus::Delivery::Deliver { .. } => {
                            let m = StreamMessage {
                                tick,
                                id: message_id,
                                dest: destination,
                                priority: priority.min(9),
                                reliability,
                                expiry_ms,
                                properties,
                                body,
                            };
                            match batch.as_mut() {
                                Some((id, msgs)) if *id == stream_id => msgs.push(m),
                                _ => {
                                    store_batch(messaging, peer_me, batch.take(), &mut replies)
                                        .await?;
                                    batch = Some((stream_id, vec![m]));
                                }
                            }
                        }
                        keel_bus::Delivery::Duplicate {
                            ack: keel_bus::Frame::Ack { stream_id, upto },
                        } => replies.push(LinkFrame::Ack { stream_id, upto }),
                        keel_bus::Delivery::Gap {
                            resend: keel_bus::Frame::Resend { stream_id, from },
                        } => replies.push(LinkFrame::Resend { stream_id, from }),
                        // Held or never announced: nothing of it is taken.
                        keel_bus::Delivery::UnknownStream => {}
                        other => return Err(format!("unexpected protocol answer {other:?}")),
                    }
                }
                LinkFrame::Get { req, queue, max } => {
                    replies.push(lend_messages(messaging, lent, req, queue, max).await);
                }
                LinkFrame::Settle {
                    req,
                    queue,
                    settles,
                } => {
                    replies.push(settle_lent(messaging, lent, req, queue, settles).await);
                }
                _ => return Err("a frame a target does not take".into()),
            }
        }
        store_batch(messaging, peer_me, batch.take(), &mut replies).await?;
        send_all(framed, replies).await?;
    }
}

/// The target's handshake on one stream of the peer: when this engine runs a FLUSH the peer
/// must first move the stream onto one made for it (FlushRequested, answered by `Flush`);
/// then the verdict. Ok(Some(why)) if the peer closed the link meanwhile.
async fn handshake<S: LinkIo>(
    messaging: &Messaging,
    ours: &str,
    peer_me: &str,
    mut s: StreamState,
    target: &mut keel_bus::Target,
    framed: &mut Framed<S, LinkCodec>,
) -> Result<Option<String>, String> {
    let wait = Duration::from_millis(CONNECT_WAIT_MS);
    for _ in 0..=FLUSH_ROUNDS_MAX {
        let hello = keel_bus::Hello {
            stream_id: s.stream_id.clone(),
            next_tick: s.next_tick,
            acked: s.acked,
        };
        // A source whose own store went back is held even while this engine flushes: asking
        // it to flush would hide that (it must be FLUSH-started itself).
        let stored = messaging
            .in_state(peer_me, &s.stream_id)
            .await
            .map_err(|e| e.to_string())?;
        let mut probe = keel_bus::Target::default();
        match &stored {
            Some(p) if p.retired_ms.is_some() => probe.discard(&s.stream_id),
            Some(p) => probe.restore(&s.stream_id, p.tick, p.identity.clone()),
            None => {}
        }
        let source_went_back = matches!(
            probe.on_hello(&hello),
            keel_bus::Verdict::SourceRestored { .. } | keel_bus::Verdict::Replaced
        );
        let known = if source_went_back {
            stored
        } else {
            match messaging
                .in_hello(
                    peer_me,
                    &s.stream_id,
                    s.flush_epoch.as_deref(),
                    s.resend_upto,
                )
                .await
                .map_err(|e| e.to_string())?
            {
                InHello::FlushNeeded { epoch } => {
                    framed
                        .send(LinkFrame::Verdict {
                            stream_id: s.stream_id.clone(),
                            kind: VerdictKind::FlushRequested,
                            a: 0,
                            b: 0,
                            last_identity: None,
                            flush_epoch: Some(epoch),
                        })
                        .await
                        .map_err(|e| e.to_string())?;
                    match tokio::time::timeout(wait, framed.next()).await {
                        Ok(Some(Ok(LinkFrame::Flush { stream }))) => {
                            s = stream;
                            continue;
                        }
                        Ok(Some(Ok(LinkFrame::Close { reason }))) => {
                            return Ok(Some(format!("the peer closed it ({reason})")))
                        }
                        Ok(None) => return Ok(Some("the peer closed the connection".into())),
                        Ok(Some(Err(e))) => return Err(e.to_string()),
                        Ok(Some(Ok(_))) => {
                            return Err("a flush request was not answered by Flush".into())
                        }
                        Err(_) => return Err(format!("no Flush within {CONNECT_WAIT_MS} ms")),
                    }
                }
                InHello::Known(known) => known,
            }
        };
        match known {
            Some(p) if p.retired_ms.is_some() => target.discard(&s.stream_id),
            Some(p) => target.restore(&s.stream_id, p.tick, p.identity),
            None => {}
        }
        let verdict = target.on_hello(&hello);
        let (kind, a, b, last_identity) = match verdict {
            keel_bus::Verdict::Resume { from, last } => (VerdictKind::Resume, from, 0, last),
            keel_bus::Verdict::SourceRestored {
                target_prefix,
                source_next_tick,
            } => (
                VerdictKind::SourceRestored,
                target_prefix,
                source_next_tick,
                None,
            ),
            keel_bus::Verdict::TargetRestored {
                target_prefix,
                source_acked,
            } => (
                VerdictKind::TargetRestored,
                target_prefix,
                source_acked,
                None,
            ),
            keel_bus::Verdict::Replaced => (VerdictKind::Replaced, 0, 0, None),
        };
        if kind != VerdictKind::Resume {
            emit!(catalog::CWSIP0784E, receiver = ours, producer = peer_me);
            // Nothing of this stream is taken until a FLUSH replaces it.
            target.discard(&s.stream_id);
        }
        framed
            .send(LinkFrame::Verdict {
                stream_id: s.stream_id.clone(),
                kind,
                a,
                b,
                last_identity,
                flush_epoch: None,
            })
            .await
            .map_err(|e| e.to_string())?;
        return Ok(None);
    }
    Err(format!(
        "the peer's stream needed more than {FLUSH_ROUNDS_MAX} flushes"
    ))
}

/// Stores a batch of in-order messages of one stream with its new prefix, and queues its
/// ack. On a failure the in-memory prefix ran ahead of the store: the link ends, and the next
/// one starts from the store's prefix.
async fn store_batch(
    messaging: &Messaging,
    source: &str,
    batch: Option<(String, Vec<StreamMessage>)>,
    replies: &mut Vec<LinkFrame>,
) -> Result<(), String> {
    let Some((stream_id, msgs)) = batch else {
        return Ok(());
    };
    let upto = msgs.last().expect("a batch is never empty").tick;
    messaging
        .in_deliver(source, &stream_id, msgs)
        .await
        .map_err(|e| e.to_string())?;
    replies.push(LinkFrame::Ack { stream_id, upto });
    Ok(())
}

async fn send_all<S: LinkIo>(
    framed: &mut Framed<S, LinkCodec>,
    replies: Vec<LinkFrame>,
) -> Result<(), String> {
    for r in replies {
        framed.feed(r).await.map_err(|e| e.to_string())?;
    }
    framed.flush().await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn link_sockets_notice_a_dead_peer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sock = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        harden(&sock).unwrap();
        let s = socket2::SockRef::from(&sock);
        assert!(s.keepalive().unwrap());
        assert_eq!(
            s.tcp_keepalive_time().unwrap(),
            Duration::from_secs(KEEPALIVE_IDLE_S)
        );
        assert_eq!(
            s.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(USER_TIMEOUT_S))
        );
    }
}

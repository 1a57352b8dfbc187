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
//! Deliberately absent so far (issue 4): delivery streams over a link. The acceptor answers
//! with its own `Open` (no streams) and closes, with a reason, on the first frame that needs a
//! stream; `Close` ends a link quietly.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use keel_bus::auth;
use keel_bus::link::{check_header, LinkCodec, LinkFrame};
use keel_core::catalog;
use keel_core::emit;
use keel_engine::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// How long a peer may take for its header and `Open` frame.
pub const OPEN_WAIT_MS: u64 = 10_000;

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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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
            let me = &e.config().me;
            let bus = &e.config().bus;
            let peers = cfg
                .buses
                .iter()
                .filter(|b| &b.name == bus)
                .flat_map(|b| b.members.iter())
                .filter(|m| &m.me != me)
                .map(|m| (m.me.clone(), m.uuid.clone()))
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
        Arc::new(move |sock, peer| {
            let me = self.clone();
            Box::pin(async move { me.accept(sock, peer).await })
        })
    }

    async fn accept(&self, mut sock: TcpStream, peer: SocketAddr) {
        let refuse = |me: &str, why: &str| {
            emit!(catalog::CWSIT0004W, peer = peer, me = me, why = why);
        };
        let mut head = [0u8; 8];
        let wait = Duration::from_millis(OPEN_WAIT_MS);
        match tokio::time::timeout(wait, sock.read_exact(&mut head)).await {
            Ok(Ok(_)) => {}
            _ => return refuse("unknown", "no complete protocol header"),
        }
        if let Err(e) = check_header(head) {
            return refuse("unknown", &e.to_string());
        }
        let mut framed = Framed::new(sock, LinkCodec);
        let open = match tokio::time::timeout(wait, framed.next()).await {
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
        emit!(catalog::CWSIT0005I, me = me, peer = peer, bus = bus);
        let ours = local.engine.config();
        let info = local.engine.info().await.ok();
        let time = now_ms();
        let reply = LinkFrame::Open {
            bus: bus.clone(),
            me: ours.me.clone(),
            me_uuid: ours.uuid.clone(),
            incarnation: info.map_or(0, |i| i.incarnation),
            credential_proof: auth::make_proof(&local.key, time, &bus, &ours.me, &ours.uuid),
            streams: Vec::new(),
        };
        if framed.send(reply).await.is_err() {
            return emit!(catalog::CWSIT0006I, me = me, why = "the connection failed");
        }
        let why = match framed.next().await {
            None => "the peer closed the connection".to_string(),
            Some(Ok(LinkFrame::Close { reason })) => format!("the peer closed it ({reason})"),
            Some(Ok(_)) => {
                let reason = "delivery streams are not served by this server yet".to_string();
                let _ = framed
                    .send(LinkFrame::Close {
                        reason: reason.clone(),
                    })
                    .await;
                reason
            }
            Some(Err(e)) => {
                refuse(&me, &e.to_string());
                e.to_string()
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
        let failure = if engine.state() != keel_engine::MeState::Started {
            // Nothing to link until this engine runs; look again shortly.
            tokio::time::sleep(Duration::from_millis(RECONNECT_MAX_MS / 10)).await;
            continue;
        } else {
            match link_once(&engine, &key, &peer).await {
                Ok(lost) => {
                    // It was up: the next failure is news, and retrying starts quickly again.
                    pause_ms = RECONNECT_FIRST_MS;
                    last_failure = None;
                    format!("the link was lost ({lost})")
                }
                Err(why) => why,
            }
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
    let ours = engine.config();
    let wait = Duration::from_millis(CONNECT_WAIT_MS);
    let mut sock = match tokio::time::timeout(wait, TcpStream::connect(&peer.address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("cannot connect ({e})")),
        Err(_) => return Err(format!("no connection within {CONNECT_WAIT_MS} ms")),
    };
    let _ = sock.set_nodelay(true);
    sock.write_all(&keel_bus::link::PROTOCOL_HEADER)
        .await
        .map_err(|e| format!("cannot write ({e})"))?;
    let incarnation = engine.info().await.map_or(0, |i| i.incarnation);
    let mut framed = Framed::new(sock, LinkCodec);
    let open = LinkFrame::Open {
        bus: ours.bus.clone(),
        me: ours.me.clone(),
        me_uuid: ours.uuid.clone(),
        incarnation,
        credential_proof: auth::make_proof(key, now_ms(), &ours.bus, &ours.me, &ours.uuid),
        streams: Vec::new(),
    };
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
        }
        LinkFrame::Close { reason } => return Err(format!("refused by the peer: {reason}")),
        _ => return Err("the peer's first frame was not Open".into()),
    }
    emit!(
        catalog::CWSIT0007I,
        me = ours.me,
        peer = peer.me,
        address = peer.address
    );
    // Held until either side goes; delivery streams will travel here (issue 4).
    Ok(match framed.next().await {
        None => "the peer closed the connection".to_string(),
        Some(Ok(LinkFrame::Close { reason })) => format!("closed by the peer: {reason}"),
        Some(Ok(_)) => "the peer sent a frame this server does not serve yet".to_string(),
        Some(Err(e)) => e.to_string(),
    })
}

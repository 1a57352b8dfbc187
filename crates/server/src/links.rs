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
//! Deliberately absent so far (issue 4): delivery streams over an accepted link. It answers
//! with its own `Open` (no streams) and closes, with a reason, on the first frame that needs a
//! stream; `Close` ends it quietly.

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

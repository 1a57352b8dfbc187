//! AMQP 1.0 on the bus port (DESIGN §2, §4): clients send to and receive from the messaging
//! engines this server hosts.
//!
//! One task per connection, one per session, one per link. fe2o3-amqp does the protocol
//! (framing, SASL, sessions, flow control); this crate maps links onto the engine:
//! - a client's *sending* link (our receiver) targets a destination. Its messages are stored
//!   in batches: while one batch is being made durable, the next one gathers, so a link with
//!   many messages in flight pays one group-commit wait per batch and keeps its order. A
//!   message is accepted only once the engine has it (durable when persistent); one the engine
//!   refuses is rejected with the reason.
//! - a client's *receiving* link (our sender) sources a queue, a topic subscription
//!   (`TOPIC::SUB`), or a topic (a durable subscription named after the link when the source is
//!   durable, else a temporary one removed when the link closes). Each message is locked in
//!   the engine until the client settles it: accepted → gone; released/modified → back on the
//!   queue (modified with delivery-failed counts as a failed delivery); rejected → exception
//!   destination. A link or connection that goes away releases what it held.
//!
//!   A receiving link takes what is ready (up to `TAKE_MAX` per wake-up, each locked and
//!   holding one of the link's `UNSETTLED_MAX` permits), sends each when the client has credit
//!   (a locked message waits at most `CREDIT_WAIT_MS` for credit, then goes back), and hands
//!   the outcomes to one settler task per link, which settles them with
//!   `Messaging::settle_batch` (one store commit per batch). A consumer on a topic gets its
//!   subscription before its attach is answered, so nothing published after the attach misses
//!   it.
//!
//! Addresses name a destination of a bus this server is a member of; `BUS/DEST` picks the bus
//! when two buses define the same name (`route`). An unknown or foreign destination is refused
//! at attach (`CWSIT0003W`), never dropped message by message.
//!
//! Before authentication (`serve`, `connection`): a connection first takes a `Ticket` of the
//! port's `Admission` (`PREAUTH_CONNECTIONS_MAX` in total, `PREAUTH_PER_SOURCE_MAX` per
//! source; over that it is closed at once) and has one deadline, `AUTH_DEADLINE_MS`, for its
//! first bytes, SASL and `Open`, plus the login delay it may owe. Once authenticated,
//! [`Admitted::authenticated`] swaps the ticket for a slot of its kind: client connections
//! (`CONNECTIONS_MAX`) and engine links (`LINKS_MAX`) have pools of their own. Refusals are
//! logged through the port's log budget. The first four bytes tell AMQP from an engine link
//! (`KEEL`), which is handed to the server's link code.
//!
//! Bounds: client connections per server (`CONNECTIONS_MAX`), unsettled deliveries per
//! receiving link (`UNSETTLED_MAX`), messages per stored batch (`BATCH_MAX`) and per consumer
//! take (`TAKE_MAX`), frame size; a client's sending link gets fe2o3's default credit (200).
//!
//! AMQP transactions (`txn.rs`): fe2o3's coordinator parses declare and discharge and keeps a
//! transaction's posts and settlements until the discharge; on commit, `txn::SessionLinks`
//! applies them all in one engine transaction (one durable store commit) before the discharge
//! is answered.
//!
//! Deliberately absent (see docs/ARCHITECTURE.md): transactional acquisition, link recovery
//! (resume of unsettled state across connections), TLS.

pub mod convert;
pub mod gate;
mod linksock;
pub mod sasl;

pub use linksock::{LinkSocket, Prefixed};
mod txn;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerSessionHandle, SessionAcceptor,
};
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::transaction::coordinator::ControlLinkAcceptor;
use fe2o3_amqp::types::definitions::{self, AmqpError, ErrorCondition, LinkError};
use fe2o3_amqp::types::messaging::{Body, Outcome as AmqpOutcome, TerminusDurability};
use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::Sendable;
use keel_core::admission::{Admission, Ticket};
use keel_core::budget::{left_out_note, LogBudget};
use keel_core::roles::BusRole;
use keel_core::throttle::LoginThrottle;
use keel_core::{catalog, emit};
use keel_engine::messaging::{Messaging, MessagingError, Outcome, SUBSCRIPTION_SEPARATOR};
use keel_engine::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::sasl::{KeelSasl, Principal};

/// Authenticated client connections per server; more are refused at once (CWSIT0002W).
pub const CONNECTIONS_MAX: usize = 1024;
/// Authenticated engine links per server: a pool of their own, so clients cannot take every
/// slot from the bus's engines, nor links from clients.
pub const LINKS_MAX: usize = 256;
/// Connections that have not authenticated yet, in total and from one source
/// (`keel_core::admission`): a peer without a password holds at most PREAUTH_PER_SOURCE_MAX
/// slots, for at most AUTH_DEADLINE_MS each.
pub const PREAUTH_CONNECTIONS_MAX: usize = 256;
pub const PREAUTH_PER_SOURCE_MAX: usize = 32;
/// A connection must send its protocol header, authenticate and open within this time.
pub const AUTH_DEADLINE_MS: u64 = 5_000;
/// Deliveries a receiving link may hold unsettled; the engine keeps each locked meanwhile.
pub const UNSETTLED_MAX: usize = 1024;
/// Messages of one link stored in one batch (one store commit).
pub const BATCH_MAX: usize = 512;
/// Messages a consumer link takes from its queue and sends in one go.
pub const TAKE_MAX: usize = 64;
/// Largest frame we accept or send.
pub const FRAME_BYTES_MAX: u32 = 256 * 1024;
/// How long a session that ended waits for its links to finish releasing what they held.
pub const LINK_END_MS: u64 = 10_000;
/// How long a locked message waits for the client's credit before going back to the queue.
pub const CREDIT_WAIT_MS: u64 = 2_000;
/// Posted plus settled messages one AMQP transaction may hold until its discharge. Its commit
/// is one store commit, which carries at most `keel_store::BATCH_OPS_MAX` (4 096) operations
/// and a settlement can take two (delete, and a put on the exception destination): a larger
/// transaction could never commit, so it is refused while it grows instead of at the end.
pub const TXN_MESSAGES_MAX: usize = keel_store::BATCH_OPS_MAX / 2;
/// Bytes of posted messages one AMQP transaction may hold (the server keeps them in memory
/// until the discharge): half of what one store commit may carry
/// (`keel_store::BATCH_BYTES_MAX`, 64 MiB), leaving room for what a message gains when it is
/// converted (properties as JSON).
pub const TXN_BYTES_MAX: usize = keel_store::BATCH_BYTES_MAX / 2;
/// How long an AMQP transaction may stay open before the server rolls it back (it holds the
/// deliveries it settled locked meanwhile). Artemis' `transaction-timeout` has the same
/// default. `KEEL_AMQP_TXN_AGE_MAX_S` in the server's environment overrides it.
pub const TXN_AGE_MAX_S: u64 = 300;
/// Open AMQP transactions per connection (across its sessions): one per session for a
/// JMS-style client with a pool of 32 sessions. With `TXN_BYTES_MAX` it bounds what one
/// connection's transactions hold to 1 GiB.
pub const TXN_OPEN_MAX: usize = 32;

/// A messaging engine this server hosts, as the endpoint sees it.
#[derive(Clone)]
pub struct Hosted {
    pub engine: Arc<Engine>,
    pub allow_anonymous: bool,
    /// The user anonymous clients of this bus act as (its grants are theirs).
    pub anonymous_user: String,
    pub max_message_bytes: u64,
}

/// Takes over a bus-port connection that opened with the ME-to-ME link header (`KEEL`), in
/// plain TCP (loopback peers only) or inside TLS. It calls [`Admitted::authenticated`] once
/// the peer's `Open` checks out.
pub type LinkHandler = Arc<
    dyn Fn(LinkSocket, SocketAddr, Admitted) -> futures_util::future::BoxFuture<'static, ()>
        + Send
        + Sync,
>;

/// A bus-port connection's place: unauthenticated (counted per source) until the peer proves
/// who it is, then one of the authenticated slots of its kind (clients or links).
pub struct Admitted {
    ticket: Option<Ticket>,
    slots: Arc<Semaphore>,
    slots_max: usize,
    what: &'static str,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Admitted {
    /// The peer authenticated: it leaves the unauthenticated count and takes an authenticated
    /// slot, or is refused (the reason) when they are all taken.
    pub fn authenticated(&mut self) -> Result<(), String> {
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            format!(
                "the server already has {} authenticated {}",
                self.slots_max, self.what
            )
        })?;
        self.permit = Some(permit);
        self.ticket = None;
        Ok(())
    }
}

/// What every connection of one bus port shares.
struct Surface {
    preauth: Arc<Admission>,
    clients: Arc<Semaphore>,
    links: Arc<Semaphore>,
    throttle: Arc<LoginThrottle>,
    /// Budget of the log records that unauthenticated peers cause.
    refusals: LogBudget,
}

impl Surface {
    /// CWSIT0002W within the log budget.
    /// A client connection's admission: its unauthenticated place, then a client slot.
    fn client(&self, ticket: keel_core::admission::Ticket) -> Admitted {
        Admitted {
            ticket: Some(ticket),
            slots: self.clients.clone(),
            slots_max: CONNECTIONS_MAX,
            what: "client connections",
            permit: None,
        }
    }

    fn link(&self, ticket: keel_core::admission::Ticket) -> Admitted {
        Admitted {
            ticket: Some(ticket),
            slots: self.links.clone(),
            slots_max: LINKS_MAX,
            what: "engine links",
            permit: None,
        }
    }

    fn refused(&self, peer: impl std::fmt::Display, why: impl std::fmt::Display) {
        if let Some(left_out) = self.refusals.take(std::time::Instant::now()) {
            let why = format!("{why}{}", left_out_note(left_out));
            emit!(catalog::CWSIT0002W, peer = peer, why = why);
        }
    }
}

/// What the endpoint serves.
pub struct Settings {
    pub server: String,
    /// The cell's users (read again when the configuration changes).
    pub users: Arc<keel_auth::Users>,
    pub hosted: Vec<Hosted>,
    /// ME-to-ME links on the same port, told apart by their first four bytes.
    pub links: Option<LinkHandler>,
    /// AMQP over TLS on the same port (`amqps://`), told apart by its first byte (a TLS
    /// record, 0x16), with the server's certificate; None: plain AMQP only.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// What CWSIT0001I says about TLS (the certificate used, or why there is none).
    pub tls_note: String,
}

/// What a connection opened with.
enum Opening {
    Link,
    Amqp,
    /// A TLS record (a ClientHello): AMQP over TLS.
    Tls,
    /// The AMQP header asking for TLS (protocol id 2): answered, then TLS.
    TlsHeader,
    Gone,
}

/// The first byte of every TLS connection (a handshake record). AMQP starts with `A`, links
/// with `K`: the three never collide.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The AMQP protocol header that asks for TLS first (AMQP 1.0 §5.2.1, protocol id 2): the
/// server answers with the same 8 bytes, then the TLS handshake follows.
const AMQP_TLS_HEADER: [u8; 8] = *b"AMQP\x02\x01\x00\x00";

/// Peeks (without consuming) at the first bytes: `KEEL` is an ME-to-ME link, a TLS record is
/// AMQP over TLS, the AMQP header with protocol id 2 asks for TLS first, anything else goes to
/// the AMQP stack, which checks its own header. Bounded by `deadline`.
async fn opening(sock: &TcpStream, deadline: tokio::time::Instant) -> Opening {
    let look = async {
        let mut head = [0u8; 8];
        loop {
            match sock.peek(&mut head).await {
                Ok(0) | Err(_) => return Opening::Gone,
                Ok(n) if n >= 4 && &head[..4] == b"KEEL" => return Opening::Link,
                Ok(n) if n >= 4 && head[0] == TLS_HANDSHAKE_RECORD => return Opening::Tls,
                Ok(n) if n >= 4 && &head[..4] != b"AMQP" => return Opening::Amqp,
                // A whole AMQP header (a client sends its 8 bytes at once).
                Ok(n) if n >= 8 => {
                    return if head == AMQP_TLS_HEADER {
                        Opening::TlsHeader
                    } else {
                        Opening::Amqp
                    };
                }
                // Not enough bytes yet: peek returns at once, so wait for more.
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    };
    tokio::time::timeout_at(deadline, look)
        .await
        .unwrap_or(Opening::Gone)
}

impl Settings {
    fn any_anonymous(&self) -> bool {
        self.hosted.iter().any(|h| h.allow_anonymous)
    }
}

/// Serves AMQP connections on `listener` until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, settings: Arc<Settings>) {
    let address = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mechanisms = if settings.any_anonymous() {
        "SCRAM-SHA-256, PLAIN (TLS or loopback only), ANONYMOUS"
    } else {
        "SCRAM-SHA-256, PLAIN (TLS or loopback only)"
    };
    let mes: Vec<String> = settings
        .hosted
        .iter()
        .map(|h| h.engine.config().me.clone())
        .collect();
    emit!(
        catalog::CWSIT0001I,
        server = settings.server,
        address = address,
        tls = settings.tls_note,
        mechanisms = mechanisms,
        mes = if mes.is_empty() {
            "none".to_string()
        } else {
            mes.join(", ")
        }
    );
    let surface = Arc::new(Surface {
        preauth: Admission::new(keel_core::admission::Limits {
            total_max: PREAUTH_CONNECTIONS_MAX,
            per_source_max: PREAUTH_PER_SOURCE_MAX,
        }),
        clients: Arc::new(Semaphore::new(CONNECTIONS_MAX)),
        links: Arc::new(Semaphore::new(LINKS_MAX)),
        throttle: Arc::new(LoginThrottle::new(keel_core::throttle::Limits::default())),
        refusals: LogBudget::new(10, 2),
    });
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(target: "keel_amqp", error = %e, "bus port accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ticket = match surface.preauth.admit(peer.ip()) {
            Ok(t) => t,
            Err(why) => {
                surface.refused(peer, why);
                drop(sock);
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let settings = settings.clone();
        let surface = surface.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_millis(AUTH_DEADLINE_MS);
            let kind = opening(&sock, deadline).await;
            // Plain AMQP and plain engine links only from loopback (keel_core::plaintext).
            if matches!(kind, Opening::Amqp | Opening::Link)
                && !keel_core::plaintext::plain_allowed(peer.ip())
            {
                surface.refused(peer, keel_core::plaintext::plain_refusal(peer));
                return;
            }
            match kind {
                Opening::Amqp => {
                    let admitted = surface.client(ticket);
                    connection(sock, false, peer, settings, surface, admitted, deadline).await
                }
                Opening::Tls | Opening::TlsHeader => {
                    let mut sock = sock;
                    if matches!(kind, Opening::TlsHeader) {
                        if settings.tls.is_none() {
                            surface.refused(peer, "it asked for TLS (AMQP protocol id 2), which this bus port does not offer (CWSIT0001I says why)");
                            return;
                        }
                        let answered = tokio::time::timeout_at(deadline, async {
                            let mut header = [0u8; 8];
                            sock.read_exact(&mut header).await?;
                            sock.write_all(&AMQP_TLS_HEADER).await
                        })
                        .await;
                        if !matches!(answered, Ok(Ok(()))) {
                            surface
                                .refused(peer, "it went away during the AMQP TLS header exchange");
                            return;
                        }
                    }
                    let Some(tls) = settings.tls.clone().map(tokio_rustls::TlsAcceptor::from)
                    else {
                        surface.refused(peer, "it opened with TLS, which this bus port does not offer (CWSIT0001I says why)");
                        return;
                    };
                    // The handshake counts against the same deadline as SASL and Open.
                    let sock = match tokio::time::timeout_at(deadline, tls.accept(sock)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            surface.refused(peer, format!("its TLS handshake failed ({e})"));
                            return;
                        }
                        Err(_) => {
                            surface.refused(
                                peer,
                                format!(
                                    "its TLS handshake did not finish within {AUTH_DEADLINE_MS} ms"
                                ),
                            );
                            return;
                        }
                    };
                    // Inside TLS: an engine link (mutual TLS) or AMQP, told by the first bytes,
                    // which are read (TLS cannot be peeked) and put back in front.
                    let mut sock = sock;
                    let mut head = [0u8; 4];
                    if !matches!(
                        tokio::time::timeout_at(deadline, sock.read_exact(&mut head)).await,
                        Ok(Ok(_))
                    ) {
                        surface.refused(peer, "it sent no protocol header inside TLS in time");
                        return;
                    }
                    let sock = Prefixed::new(head.to_vec(), sock);
                    if &head == b"KEEL" {
                        let admitted = surface.link(ticket);
                        let sock = LinkSocket::Tls(Box::new(sock));
                        hand_link(&settings, sock, peer, admitted).await
                    } else {
                        let admitted = surface.client(ticket);
                        connection(sock, true, peer, settings, surface, admitted, deadline).await
                    }
                }
                Opening::Link => {
                    let admitted = surface.link(ticket);
                    hand_link(&settings, LinkSocket::Plain(sock), peer, admitted).await
                }
                Opening::Gone => {}
            }
        });
    }
}

async fn hand_link(settings: &Settings, sock: LinkSocket, peer: SocketAddr, admitted: Admitted) {
    match &settings.links {
        Some(handler) => handler(sock, peer, admitted).await,
        None => emit!(
            catalog::CWSIT0004W,
            peer = peer,
            me = "unknown",
            why = "this server hosts no messaging engine that takes links"
        ),
    }
}

async fn connection<S>(
    sock: S,
    tls: bool,
    peer: SocketAddr,
    settings: Arc<Settings>,
    surface: Arc<Surface>,
    mut admitted: Admitted,
    deadline: tokio::time::Instant,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
{
    let gate = Arc::new(gate::Gate::default());
    let (sasl, verdict) = KeelSasl::new(settings.users.clone(), settings.any_anonymous());
    let sasl = sasl.channel(tls, peer.ip()).guarded(sasl::LoginGuard {
        source: keel_core::admission::Source::of(peer.ip()),
        throttle: surface.throttle.clone(),
        gate: gate.clone(),
    });
    let acceptor = ConnectionAcceptor::builder()
        .container_id(format!("keel-{}", settings.server))
        .max_frame_size(FRAME_BYTES_MAX)
        .channel_max(64u16)
        .sasl_acceptor(sasl)
        .build();
    // A throttled login's outcome waits behind the gate; the deadline leaves room for it.
    let delay_room = Duration::from_millis(keel_core::throttle::Limits::default().delay_max_ms);
    let opened = tokio::time::timeout_at(
        deadline + delay_room,
        acceptor.accept(gate::Gated::new(sock, gate)),
    )
    .await;
    let sasl_outcome = verdict.lock().expect("sasl verdict lock").clone();
    let (mut conn, principal) = match (opened, sasl_outcome) {
        (Ok(Ok(c)), Some(Ok(p))) => (c, p),
        (_, Some(Err(why))) => {
            surface.refused(peer, why);
            return;
        }
        (Ok(Ok(mut c)), None) => {
            // fe2o3 let the connection open without SASL: never accepted here.
            surface.refused(peer, "the client did not authenticate with SASL");
            let _ = c.close().await;
            return;
        }
        (Ok(Err(e)), _) => {
            surface.refused(peer, e);
            return;
        }
        (Err(_), _) => {
            surface.refused(
                peer,
                format!(
                    "the connection did not authenticate and open within {AUTH_DEADLINE_MS} ms plus the {} ms a throttled login may be delayed (ADMN0031W says when logins from a source are delayed)",
                    delay_room.as_millis()
                ),
            );
            return;
        }
    };
    if let Err(why) = admitted.authenticated() {
        surface.refused(peer, &why);
        let error = definitions::Error::new(
            AmqpError::ResourceLimitExceeded,
            Some(format!("{why}; try again later")),
            None,
        );
        let _ = conn.close_with_error(error).await;
        return;
    }
    // A named user must be a connector of some bus this server hosts; anonymous clients are
    // checked per link, as their bus's anonymous user.
    if let Principal::User(name) = &principal {
        if let Err(why) = may_connect(&settings, name) {
            surface.refused(peer, &why);
            let error = definitions::Error::new(AmqpError::UnauthorizedAccess, Some(why), None);
            let _ = conn.close_with_error(error).await;
            return;
        }
    }
    tracing::debug!(target: "keel_amqp", %peer, ?principal, "AMQP connection open");
    // A removed user's connections close when this server next reads the users
    // (`keel_auth::Users::refresh`, every USERS_REFRESH_MS).
    // Resolves only when this connection's user is removed: the session accept below is
    // dropped only then (the connection closes anyway), and a closed watch waits forever
    // instead of spinning.
    let mut users_changed = settings.users.subscribe();
    let removed = async {
        let Principal::User(name) = &principal else {
            return std::future::pending().await;
        };
        loop {
            if users_changed.changed().await.is_err() {
                return std::future::pending().await;
            }
            if settings.users.principal(name).is_none() {
                return name.clone();
            }
        }
    };
    tokio::pin!(removed);
    let mut sessions = JoinSet::new();
    // Open transactions of this connection, across its sessions (TXN_OPEN_MAX).
    let txn_open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        // Per session: its links, which are also its transactions' resource.
        let links = Arc::new(txn::SessionLinks::default());
        let acceptor = SessionAcceptor::builder()
            .control_link_acceptor(
                ControlLinkAcceptor::with_resource(links.clone())
                    .with_limits(txn::limits(&txn_open)),
            )
            .build();
        let accepted = tokio::select! {
            accepted = acceptor.accept(&mut conn) => accepted,
            name = &mut removed => {
                let why = format!("user {name:?} was removed: its connections are closed");
                surface.refused(peer, &why);
                let error =
                    definitions::Error::new(AmqpError::UnauthorizedAccess, Some(why), None);
                let _ = conn.close_with_error(error).await;
                sessions.abort_all();
                return;
            }
        };
        let Ok(session) = accepted else {
            break;
        };
        sessions.spawn(run_session(
            session,
            peer,
            principal.clone(),
            settings.clone(),
            links,
        ));
    }
    // The client closed the connection (or it broke): sessions end with it.
    while sessions.join_next().await.is_some() {}
    let _ = conn.close().await;
    drop(admitted);
    tracing::debug!(target: "keel_amqp", %peer, "AMQP connection closed");
}

async fn run_session(
    mut session: ListenerSessionHandle,
    peer: SocketAddr,
    principal: Principal,
    settings: Arc<Settings>,
    links: Arc<txn::SessionLinks>,
) {
    let mut tasks = JoinSet::new();
    while let Some(attach) = session.next_incoming_attach().await {
        let link_name = attach.name.clone();
        let remote_handle = attach.handle.0;
        // Every settle mode is supported, so the client's wish is the link's mode.
        let presettled = matches!(
            attach.snd_settle_mode,
            fe2o3_amqp::types::definitions::SenderSettleMode::Settled
        );
        let route = match route(&settings, &principal, &attach) {
            // A consumer on a topic gets its subscription before the attach is answered, so
            // whatever the client publishes after attaching reaches it.
            Ok(r) => subscribe_if_topic(r, &link_name).await,
            Err(refused) => Err(refused),
        };
        // The acceptor carries the bus's size limit: fe2o3 refuses a larger transfer with
        // amqp:link:message-size-exceeded before it is buffered whole.
        let max_bytes = route.as_ref().map(|r| r.max_message_bytes).unwrap_or(0);
        let acceptor = LinkAcceptor::builder().max_message_size(max_bytes).build();
        let endpoint = match acceptor.accept_incoming_attach(attach, &mut session).await {
            Ok(l) => l,
            Err(e) => {
                if let Ok(Route {
                    messaging,
                    temporary: Some((t, sub)),
                    ..
                }) = &route
                {
                    let _ = messaging.unsubscribe(t, sub).await;
                }
                emit!(catalog::CWSIT0003W, link = link_name, peer = peer, why = e);
                continue;
            }
        };
        let route = match route {
            Ok(r) => r,
            Err(refusal) => {
                emit!(
                    catalog::CWSIT0003W,
                    link = link_name,
                    peer = peer,
                    why = refusal.description
                );
                let err = definitions::Error::new(refusal.condition, refusal.description, None);
                match endpoint {
                    LinkEndpoint::Sender(s) => {
                        let _ = s.close_with_error(err).await;
                    }
                    LinkEndpoint::Receiver(r) => {
                        let _ = r.close_with_error(err).await;
                    }
                }
                continue;
            }
        };
        match endpoint {
            LinkEndpoint::Receiver(r) => {
                links.add(
                    remote_handle,
                    txn::LinkInfo::Incoming {
                        messaging: route.messaging.clone(),
                        dest: route.dest.clone(),
                    },
                );
                let links = links.clone();
                tasks.spawn(async move {
                    incoming_link(r, route).await;
                    links.remove(remote_handle);
                });
            }
            LinkEndpoint::Sender(s) => {
                let tags = Arc::new(txn::Tags::default());
                links.add(
                    remote_handle,
                    txn::LinkInfo::Outgoing {
                        messaging: route.messaging.clone(),
                        queue: route.dest.clone(),
                        tags: tags.clone(),
                    },
                );
                let links = links.clone();
                tasks.spawn(async move {
                    outgoing_link(s, route, presettled, tags).await;
                    links.remove(remote_handle);
                });
            }
        }
        // Reap finished links so a long session does not accumulate them.
        while tasks.try_join_next().is_some() {}
    }
    // The session ended: its links notice and release what they held (and remove temporary
    // subscriptions); aborting them would leave those messages locked until a restart. A link
    // that does not finish in time is aborted.
    let finished = tokio::time::timeout(Duration::from_millis(LINK_END_MS), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(target: "keel_amqp", %peer, links = tasks.len(), "links did not finish within {LINK_END_MS} ms of their session's end; aborting them");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    let _ = session.end().await;
}

/// Where a link goes: an engine and a destination on it.
struct Route {
    messaging: Arc<Messaging>,
    /// The queue or topic; for a consumer on a topic, its subscription's queue once
    /// `subscribe_if_topic` ran.
    dest: String,
    max_message_bytes: u64,
    /// For a receiving link on a topic: the topic, and whether the subscription is durable.
    topic: Option<(String, bool)>,
    /// A temporary subscription (topic, name) to remove when the link ends.
    temporary: Option<(String, String)>,
}

/// Creates the subscription of a consumer on a topic: durable (named after the link) when the
/// link's source is durable, else temporary.
async fn subscribe_if_topic(mut r: Route, link_name: &str) -> Result<Route, Refusal> {
    let Some((topic, durable)) = r.topic.take() else {
        return Ok(r);
    };
    let sub = if durable {
        subscription_name(link_name)
    } else {
        format!("tmp-{}", uuid_like())
    };
    match r.messaging.subscribe(&topic, &sub).await {
        Ok(queue) => {
            r.dest = queue;
            r.temporary = (!durable).then_some((topic, sub));
            Ok(r)
        }
        Err(e) => Err(refusal(condition_of(&e), e.to_string())),
    }
}

struct Refusal {
    condition: ErrorCondition,
    description: String,
}

fn refusal(condition: impl Into<ErrorCondition>, description: impl Into<String>) -> Refusal {
    Refusal {
        condition: condition.into(),
        description: description.into(),
    }
}

/// Whether user `name` holds the connector role of some bus this server hosts; else why not.
fn may_connect(settings: &Settings, name: &str) -> Result<(), String> {
    let Some(p) = settings.users.principal(name) else {
        return Err(format!("user {name:?} no longer exists"));
    };
    let buses: Vec<&str> = settings
        .hosted
        .iter()
        .map(|h| h.engine.config().bus.as_str())
        .collect();
    if buses.is_empty()
        || buses
            .iter()
            .any(|b| p.grants.bus(b, BusRole::Connector, None))
    {
        return Ok(());
    }
    Err(keel_core::roles::bus_refusal(
        name,
        BusRole::Connector,
        &buses.join(" or "),
        None,
    ))
}

fn route(settings: &Settings, principal: &Principal, attach: &Attach) -> Result<Route, Refusal> {
    use fe2o3_amqp::types::definitions::Role;
    // The client's role: its sending link targets an address, its receiving link sources one.
    let (address, durable) = match attach.role {
        Role::Sender => {
            let t = attach
                .target
                .as_ref()
                .and_then(|t| match t.as_ref() {
                    fe2o3_amqp::types::messaging::TargetArchetype::Target(t) => Some(t),
                    #[allow(unreachable_patterns)]
                    _ => None,
                })
                .ok_or_else(|| {
                    refusal(
                        AmqpError::NotImplemented,
                        "this kind of target is not served: give a destination address",
                    )
                })?;
            (t.address.clone(), false)
        }
        Role::Receiver => {
            let s = attach
                .source
                .as_ref()
                .ok_or_else(|| refusal(AmqpError::InvalidField, "the link has no source"))?;
            (s.address.clone(), s.durable != TerminusDurability::None)
        }
    };
    let Some(address) = address.filter(|a| !a.is_empty()) else {
        return Err(refusal(
            AmqpError::InvalidField,
            "the link names no address: give a destination name",
        ));
    };
    let (bus, dest) = match address.split_once('/') {
        Some((b, d)) if settings.hosted.iter().any(|h| h.engine.config().bus == b) => {
            (Some(b.to_string()), d.to_string())
        }
        _ => (None, address.clone()),
    };
    // The configured name: a subscription address `TOPIC::SUB` is defined by its topic.
    let defined = dest
        .split_once(SUBSCRIPTION_SEPARATOR)
        .map(|(t, _)| t)
        .unwrap_or(&dest);
    let candidates: Vec<&Hosted> = settings
        .hosted
        .iter()
        .filter(|h| bus.as_deref().is_none_or(|b| h.engine.config().bus == b))
        .filter(|h| {
            h.engine
                .config()
                .destinations
                .iter()
                .any(|d| d.name == defined)
        })
        .collect();
    let hosted = match candidates.as_slice() {
        [one] => *one,
        [] => {
            let known: Vec<String> = settings
                .hosted
                .iter()
                .flat_map(|h| {
                    h.engine
                        .config()
                        .destinations
                        .iter()
                        .map(|d| d.name.clone())
                        .collect::<Vec<_>>()
                })
                .collect();
            return Err(refusal(
                AmqpError::NotFound,
                format!(
                    "destination {dest} is not defined on any bus of this server (defined: {}); create it with `keel destination create BUS {dest} --type queue`; one created while this server runs takes effect when the server restarts (`keel server stop SERVER`, then `keel server start SERVER`)",
                    if known.is_empty() { "none".into() } else { known.join(", ") }
                ),
            ));
        }
        many => {
            let buses: Vec<String> = many.iter().map(|h| h.engine.config().bus.clone()).collect();
            return Err(refusal(
                AmqpError::NotFound,
                format!(
                    "destination {dest} is defined on buses {}: address it as BUS/{dest}",
                    buses.join(", ")
                ),
            ));
        }
    };
    let bus_name = &hosted.engine.config().bus;
    let acting = match principal {
        Principal::Anonymous if !hosted.allow_anonymous => {
            return Err(refusal(
                AmqpError::UnauthorizedAccess,
                format!(
                    "bus {bus_name} does not allow anonymous clients: authenticate with SASL PLAIN"
                ),
            ))
        }
        Principal::Anonymous => &hosted.anonymous_user,
        Principal::User(name) => name,
    };
    // The grants as they stand now: a role revoked while connected applies to the next link.
    let Some(grants) = settings.users.principal(acting).map(|p| p.grants) else {
        return Err(refusal(
            AmqpError::UnauthorizedAccess,
            match principal {
                Principal::Anonymous => format!("bus {bus_name} lets anonymous clients act as user {acting:?}, which does not exist; an Administrator can add it with `keel user add {acting} --no-password`"),
                Principal::User(_) => format!("user {acting:?} no longer exists"),
            },
        ));
    };
    let needed = match attach.role {
        Role::Sender => BusRole::Sender,
        Role::Receiver => BusRole::Receiver,
    };
    for (role, destination) in [(BusRole::Connector, None), (needed, Some(defined))] {
        if !grants.bus(bus_name, role, destination) {
            return Err(refusal(
                AmqpError::UnauthorizedAccess,
                keel_core::roles::bus_refusal(acting, role, bus_name, destination),
            ));
        }
    }
    let messaging = hosted
        .engine
        .messaging()
        .map_err(|e| refusal(AmqpError::ResourceLimitExceeded, e.to_string()))?;
    let is_topic = hosted
        .engine
        .config()
        .destinations
        .iter()
        .any(|d| d.name == dest && d.kind == keel_config::DestinationKind::Topic);
    let topic = (attach.role == Role::Receiver && is_topic).then(|| (dest.clone(), durable));
    // A client may send to and receive from a queue on another engine of the bus: its
    // messages travel on a delivery stream (remote put), or are lent by the queue's engine
    // over the link between the two (remote get).
    let remote = messaging.remote_queue(&dest).is_some();
    if !is_topic && !remote {
        // Queues and subscriptions must be served by this engine; refuse now, not per message.
        messaging
            .queue(&dest)
            .map_err(|e| refusal(condition_of(&e), e.to_string()))?;
    }
    Ok(Route {
        messaging,
        dest,
        max_message_bytes: hosted.max_message_bytes,
        topic,
        temporary: None,
    })
}

/// The AMQP error condition for an engine error.
fn condition_of(e: &MessagingError) -> ErrorCondition {
    use keel_engine::messaging::Refusal as R;
    match e.refusal() {
        R::TooLarge => LinkError::MessageSizeExceeded.into(),
        R::NotFound => AmqpError::NotFound.into(),
        R::Invalid => AmqpError::InvalidField.into(),
        // A full queue or disk, a stopped engine: the client may retry later; nothing stored.
        R::OverLimit => AmqpError::ResourceLimitExceeded.into(),
        R::Internal => AmqpError::InternalError.into(),
    }
}

fn amqp_error(e: &MessagingError) -> definitions::Error {
    definitions::Error::new(condition_of(e), e.to_string(), None)
}

type Stored = Result<Vec<Result<String, MessagingError>>, MessagingError>;

/// A client's sending link: store what it sends, in batches, and settle each message with
/// the engine's answer.
async fn incoming_link(mut rx: Receiver, route: Route) {
    let Route {
        messaging, dest, ..
    } = route;
    // Converted messages waiting for the next batch; refusals carry their error.
    let mut pending: Vec<(
        DeliveryInfo,
        Result<keel_engine::messaging::OutgoingMessage, definitions::Error>,
    )> = Vec::new();
    let mut inflight: Option<(Vec<DeliveryInfo>, tokio::task::JoinHandle<Stored>)> = None;
    let mut ended = None;
    loop {
        if inflight.is_none() && !pending.is_empty() {
            let batch: Vec<_> = std::mem::take(&mut pending);
            let mut infos = Vec::with_capacity(batch.len());
            let mut msgs = Vec::with_capacity(batch.len());
            for (info, m) in batch {
                match m {
                    Ok(m) => {
                        infos.push(info);
                        msgs.push(m);
                    }
                    Err(err) => {
                        if let Err(e) = rx.reject(info, err).await {
                            ended = Some(e.to_string());
                        }
                    }
                }
            }
            if !msgs.is_empty() {
                let m = messaging.clone();
                let d = dest.clone();
                inflight = Some((
                    infos,
                    tokio::spawn(async move { m.send_batch(&d, msgs).await }),
                ));
            }
        }
        if ended.is_some() {
            break;
        }
        tokio::select! {
            d = rx.recv::<Body<Value>>(), if pending.len() < BATCH_MAX => match d {
                Ok(d) => {
                    let (info, msg) = d.into_parts();
                    let m = convert::incoming(msg).map_err(|e| {
                        definitions::Error::new(AmqpError::DecodeError, e.to_string(), None)
                    });
                    pending.push((info, m));
                }
                Err(e) => {
                    ended = Some(e.to_string());
                }
            },
            done = async { (&mut inflight.as_mut().expect("guarded").1).await }, if inflight.is_some() => {
                let (infos, _) = inflight.take().expect("guarded");
                if let Err(e) = settle_stored(&mut rx, infos, done).await {
                    ended = Some(e);
                }
            }
        }
    }
    // The link is going away: finish the batch in flight (what is stored stays stored; the
    // client learns nothing more, so it may resend: at least once across a broken link).
    if let Some((infos, h)) = inflight.take() {
        let done = h.await;
        let _ = settle_stored(&mut rx, infos, done).await;
    }
    tracing::debug!(target: "keel_amqp", dest = %dest, why = ended.as_deref().unwrap_or(""), "incoming link ended");
    let _ = rx.close().await;
}

async fn settle_stored(
    rx: &mut Receiver,
    infos: Vec<DeliveryInfo>,
    done: Result<Stored, tokio::task::JoinError>,
) -> Result<(), String> {
    let results = match done {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            // The whole batch failed (store error, engine stopped): nothing of it is stored.
            rx.reject_all(infos, amqp_error(&e))
                .await
                .map_err(|e| e.to_string())?;
            if matches!(e, MessagingError::NotStarted { .. }) {
                return Err(e.to_string());
            }
            return Ok(());
        }
        Err(join) => {
            let err = definitions::Error::new(AmqpError::InternalError, join.to_string(), None);
            rx.reject_all(infos, err).await.map_err(|e| e.to_string())?;
            return Err(join.to_string());
        }
    };
    assert_eq!(infos.len(), results.len(), "one result per message");
    // Consecutive accepts go out as one disposition range.
    let mut accepted = Vec::new();
    for (info, r) in infos.into_iter().zip(results) {
        match r {
            Ok(_) => accepted.push(info),
            Err(e) => {
                if !accepted.is_empty() {
                    rx.accept_all(std::mem::take(&mut accepted))
                        .await
                        .map_err(|e| e.to_string())?;
                }
                rx.reject(info, amqp_error(&e))
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    if !accepted.is_empty() {
        rx.accept_all(accepted).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A client's receiving link: hand it messages while it has credit, settle each in the
/// engine as the client settles it.
async fn outgoing_link(mut tx: Sender, route: Route, presettled: bool, tags: Arc<txn::Tags>) {
    let Route {
        messaging,
        dest: queue,
        temporary,
        ..
    } = route;
    let slots = Arc::new(Semaphore::new(UNSETTLED_MAX));
    // Outcomes go to one settler per link, which settles them in batches (one store commit
    // each); a delivery's permit is returned once its settle is done.
    let (settle_tx, settle_rx) = tokio::sync::mpsc::channel(UNSETTLED_MAX);
    let settler = tokio::spawn(settler(messaging.clone(), queue.clone(), settle_rx));
    let mut settles = JoinSet::new();
    let mut close_error = None;
    let why = loop {
        while settles.try_join_next().is_some() {}
        // Room for at least one more unsettled delivery, then a message to fill it.
        let first_permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = tx.on_detach() => break "detached by the client".to_string(),
        };
        let d = tokio::select! {
            d = messaging.receive(&queue, Duration::from_secs(1)) => d,
            _ = tx.on_detach() => break "detached by the client".to_string(),
        };
        let first = match d {
            Ok(Some(d)) => d,
            Ok(None) => continue,
            Err(e) => {
                close_error = Some(amqp_error(&e));
                break e.to_string();
            }
        };
        // Take what else is ready (as far as the unsettled bound allows) and send it in one
        // go: one wake-up, one outcome task and one settle batch for many messages.
        let mut taken = vec![(first, first_permit)];
        // Only this task takes permits, so what is available now stays available.
        let room = slots.available_permits().min(TAKE_MAX - 1);
        if room > 0 {
            let more = messaging
                .receive_now(&queue, room)
                .await
                .unwrap_or_default();
            for d in more {
                let permit = slots
                    .clone()
                    .try_acquire_owned()
                    .expect("permits counted before taking");
                taken.push((d, permit));
            }
        }
        let mut pending = Vec::with_capacity(taken.len());
        let mut stop = None;
        let mut taken = taken.into_iter();
        // One deadline for the whole batch (one timer, not one per message).
        let credit_wait = tokio::time::sleep(Duration::from_millis(CREDIT_WAIT_MS));
        tokio::pin!(credit_wait);
        for (d, permit) in taken.by_ref() {
            let seq = d.seq;
            let sendable = Sendable::builder()
                .message(convert::outgoing(d))
                .settled(presettled)
                .build();
            let sent = tokio::select! {
                r = tx.send_batchable(sendable) => Ok(r),
                _ = &mut credit_wait => Err(()),
            };
            match sent {
                Ok(Ok(fut)) if presettled => {
                    // At most once: settled as it leaves.
                    drop(fut);
                    let _ = settle_tx.send((seq, Outcome::Accepted, permit)).await;
                }
                Ok(Ok(fut)) => {
                    // A transaction that settles this delivery finds its seq by tag.
                    let tag = fut.delivery_tag().to_vec();
                    tags.insert(tag.clone(), seq);
                    pending.push((tag, seq, fut, permit));
                }
                Ok(Err(e)) => {
                    let _ = settle_tx.send((seq, Outcome::Released, permit)).await;
                    stop = Some(e.to_string());
                    break;
                }
                Err(_) => {
                    // No credit for a while: give the messages back so another consumer can
                    // have them.
                    let _ = settle_tx.send((seq, Outcome::Released, permit)).await;
                    break;
                }
            }
        }
        for (d, permit) in taken {
            let _ = settle_tx.send((d.seq, Outcome::Released, permit)).await;
        }
        if !pending.is_empty() {
            let to_settler = settle_tx.clone();
            let tags = tags.clone();
            settles.spawn(async move {
                use futures_util::stream::{FuturesUnordered, StreamExt};
                let mut outcomes: FuturesUnordered<_> = pending
                    .into_iter()
                    .map(|(tag, seq, fut, permit)| async move { (tag, seq, fut.await, permit) })
                    .collect();
                use futures_util::FutureExt;
                let mut ready = Vec::new();
                while let Some(first) = outcomes.next().await {
                    // Whatever else resolved meanwhile, with one lock of the tags.
                    ready.push(first);
                    while let Some(Some(more)) = outcomes.next().now_or_never() {
                        ready.push(more);
                    }
                    let still = tags.remove_many(ready.iter().map(|(tag, ..)| tag.as_slice()));
                    for ((_, seq, result, permit), still) in ready.drain(..).zip(still) {
                        if !still {
                            continue; // settled by a committed transaction already
                        }
                        // An error: the link or connection went away.
                        let outcome = engine_outcome(result.ok().as_ref());
                        let _ = to_settler.send((seq, outcome, permit)).await;
                    }
                }
            });
        }
        if let Some(why) = stop {
            break why;
        }
    };
    // Unsettled deliveries resolve (released) as the link closes; wait for them so the
    // temporary subscription is removed with nothing locked.
    let _ = match close_error {
        Some(err) => tx.close_with_error(err).await,
        None => tx.close().await,
    };
    while settles.join_next().await.is_some() {}
    drop(settle_tx);
    let _ = settler.await;
    if let Some((t, sub)) = temporary {
        if let Err(e) = messaging.unsubscribe(&t, &sub).await {
            tracing::warn!(target: "keel_amqp", topic = %t, subscription = %sub, error = %e, "removing a temporary subscription failed");
        }
    }
    tracing::debug!(target: "keel_amqp", queue = %queue, why = %why, "outgoing link ended");
}

/// What a client's outcome means to the engine: accepted → gone; rejected → exception
/// destination; modified with delivery-failed → a failed delivery; released, modified without
/// failure, or none at all → back on the queue.
fn engine_outcome(o: Option<&AmqpOutcome>) -> Outcome {
    match o {
        Some(AmqpOutcome::Accepted(_)) => Outcome::Accepted,
        Some(AmqpOutcome::Rejected(_)) => Outcome::Rejected,
        Some(AmqpOutcome::Modified(m)) if m.delivery_failed == Some(true) => Outcome::Failed,
        _ => Outcome::Released,
    }
}

/// Settles a consumer link's outcomes in batches until every sender of the channel is gone.
async fn settler(
    messaging: Arc<Messaging>,
    queue: String,
    mut rx: tokio::sync::mpsc::Receiver<(u64, Outcome, tokio::sync::OwnedSemaphorePermit)>,
) {
    let mut batch = Vec::with_capacity(BATCH_MAX);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let settles: Vec<(u64, Outcome)> = batch.iter().map(|(s, o, _)| (*s, *o)).collect();
        match messaging.settle_batch(&queue, &settles).await {
            Ok(results) => {
                for ((seq, _), r) in settles.iter().zip(results) {
                    if let Err(e) = r {
                        tracing::warn!(target: "keel_amqp", queue = %queue, seq, error = %e, "settling a delivery failed");
                    }
                }
            }
            // The engine stopped or the store failed: the deliveries stay locked until the
            // engine restarts (locks are in memory), so nothing is lost.
            Err(e) => {
                tracing::warn!(target: "keel_amqp", queue = %queue, error = %e, count = settles.len(), "settling deliveries failed")
            }
        }
        batch.clear();
    }
}

/// A durable subscription's name from its link name: the characters a subscription name
/// allows (letters, digits, `_ . -`), others as `_`, at most 128.
fn subscription_name(link: &str) -> String {
    let s: String = link
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    if s.is_empty() {
        "link".into()
    } else {
        s
    }
}

fn uuid_like() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod fast_codec_tests;

#[cfg(test)]
mod receiver_unsettled_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_the_amqp_conditions_clients_act_on() {
        let c = |e: MessagingError| condition_of(&e);
        assert_eq!(
            c(MessagingError::TooLarge {
                dest: "q".into(),
                bytes: 2,
                max: 1
            }),
            LinkError::MessageSizeExceeded.into()
        );
        assert_eq!(
            c(MessagingError::UnknownDestination {
                dest: "q".into(),
                bus: "b".into(),
                known: vec![]
            }),
            AmqpError::NotFound.into()
        );
        assert_eq!(
            c(MessagingError::Store(Box::new(
                keel_store::StoreError::DiskFull {
                    me: "me".into(),
                    file: "f".into()
                }
            ))),
            AmqpError::ResourceLimitExceeded.into()
        );
        assert_eq!(
            c(MessagingError::QueueFull {
                dest: "q".into(),
                max: 1
            }),
            AmqpError::ResourceLimitExceeded.into()
        );
    }

    #[test]
    fn subscription_names_from_link_names_are_valid_and_bounded() {
        assert_eq!(subscription_name("proton-sub"), "proton-sub");
        assert_eq!(subscription_name("a b/c:d"), "a_b_c_d");
        assert_eq!(subscription_name(""), "link");
        assert_eq!(subscription_name(&"x".repeat(300)).len(), 128);
    }
}

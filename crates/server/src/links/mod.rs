//! ME-to-ME links accepted on the bus port (DESIGN §5): who may open one, and how it is told
//! apart from AMQP (keel-amqp peeks at the first four bytes and hands `KEEL` connections here).
//!
//! A link opens with the 8-byte protocol header, then each side's `Open` frame: bus, engine,
//! UUID, incarnation and a credential proof (`keel_bus::auth`) under the bus's link key, which
//! is derived from the profile's admin credential (so engines of another profile or bus are
//! refused). This server accepts a link only from a member engine of a bus it hosts an engine
//! for, not from one of its own, with the UUID the configuration gives that member and a valid
//! proof, and only while its own engine on that bus is started; anything else is refused and
//! logged (`CWSIT0004W`) and the link closed, and so is a malformed frame; a refused `Open` is
//! told why in a `Close` frame. Nothing a refused link sent is acted on. Until its `Open`
//! checks out, a link counts as an unauthenticated connection of the bus port; then it takes a
//! place in keel-amqp's pool of engine links (`keel_amqp::LINKS_MAX`).
//!
//! The connecting side ([`keep_linked`]): each started engine links to every other member
//! engine of its bus (found from the configuration: the member's server's bus port on its
//! node's host), checks the answering `Open` (bus, engine, UUID, proof) and holds the link;
//! after a failure or a loss it tries again with bounded back-off. Both sides' sockets use TCP
//! keepalive and a user timeout (`KEEPALIVE_IDLE_S`, `USER_TIMEOUT_S`), so a dead peer ends
//! the link.
//!
//! Delivery streams (DESIGN §5): a link carries the connecting engine's stream towards the
//! accepting one ([`source_side`], [`target_side`]); the protocol decisions are keel-bus's, the
//! durable state the engine's (`keel_engine::messaging::streams`). FLUSH rounds run in the
//! handshake ([`handshake`], `link_once`). The source's `Open` states its stream (id, next
//! tick, acked); the target answers keel-bus's verdict from its stored prefix: `Resume` with the
//! identity at the prefix, which the source checks for a fork, or a store gone back
//! (`CWSIP0784E` at the target, `CWSIT0009E` at the source: the stream is held, nothing is
//! dropped). When the target's engine runs a FLUSH it first answers `FlushRequested`; the source
//! moves the stream onto one made for that epoch (`CWSIT0010I`) and announces it in a `Flush`
//! frame (at most `FLUSH_ROUNDS_MAX` rounds per handshake). A source whose own store went back
//! is held even by a flushing target; a source that gets `Resume` confirms the outbound side of
//! its own engine's flush; a store error while checking a verdict ends the link (tried again)
//! instead of holding the stream. The source keeps at most `STREAM_WINDOW` ticks
//! unacknowledged; the target stores each burst of in-order messages with the new prefix in one
//! commit, then sends one cumulative ack (a duplicate gets an ack, a gap a resend request).
//!
//! Remote get rides on the same link: the connecting engine's consumers send `Get`/`Settle`,
//! the accepting engine (the queue's) answers in order and releases what it lent when the link
//! ends (`Lent`, at most LENT_MAX per link, at most `GOT_BYTES_MAX` of bodies per answer).

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

/// The process certificate a server presents on its links (`<node>.<server>`), with the
/// cell's CA: links use mutual TLS when the server has them.
pub type LinkTls = Option<Arc<keel_tls::rustls::ClientConfig>>;

/// How long a peer may take for its header and `Open` frame together.
pub const OPEN_WAIT_MS: u64 = 5_000;

/// The byte stream a link runs over: a TCP socket, or a simulated one in tests.
pub trait LinkIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> LinkIo for T {}

mod accept;
mod connect;
mod error;
mod lend;
mod source;
mod target;

// The sides call each other's helpers (lend, source, target); what other crates use is
// re-exported by name.
use lend::*;
use source::*;
use target::*;

pub use accept::LinkAcceptor;
pub use connect::{
    keep_linked, source_link, CONNECT_WAIT_MS, RECONNECT_FIRST_MS, RECONNECT_MAX_MS,
};
pub use error::LinkError;
pub use lend::LENT_MAX;
pub use source::FLUSH_ROUNDS_MAX;

/// An engine's `Open` frame: who it is, with a fresh credential proof, and the streams it
/// sources towards the other side.
pub(crate) fn open_frame(
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

/// A member engine of the same bus on another server, and where its server's bus port is.
#[derive(Debug, Clone)]
pub struct Peer {
    pub me: String,
    pub uuid: String,
    pub address: String,
    /// The node and server that host it: the process its certificate must name.
    pub node: String,
    pub server: String,
}

/// How the peer of an accepted link connection is known at the transport: plain TCP (a
/// loopback peer: the bus port serves plain to nothing else), or TLS with the process its
/// client certificate names (None: it showed none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Plain,
    Tls(Option<(String, String)>),
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Plain => f.write_str("plain TCP on loopback"),
            Transport::Tls(Some((node, process))) => {
                write!(f, "mutual TLS with the certificate of {node}/{process}")
            }
            Transport::Tls(None) => f.write_str("TLS without a client certificate"),
        }
    }
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
                node: m.node.clone(),
                server: m.server.clone(),
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

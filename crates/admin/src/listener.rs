//! The admin endpoint's accept loop and connection table (DESIGN §10). axum's own `serve` has
//! no bound on connections and no deadline on a connection that never sends a request, so 20
//! 000 idle sockets from anyone who can reach the port used to exhaust the process's file
//! descriptors. Here:
//! - a connection has `header_read_ms` to send each request's head (in a head buffer of at
//!   most `HEAD_BUFFER_BYTES_MAX`, 16 KiB), and one with no request in progress is closed after
//!   `idle_ms`;
//! - connections are capped in total and per source; when a cap is reached, the connection
//!   that has been idle longest (not in the middle of an authenticated request) is closed to
//!   make room, so a flood of idle or unauthenticated connections can delay a legitimate
//!   client but not lock it out, and only authenticated work is never cut (it is bounded by
//!   the request semaphore in `server.rs`);
//! - refusals and evictions are logged within a log budget (ADMN0030W), never one line each.
//!
//! The node agent's health ping does not come through here at all (`health.rs`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use keel_core::admission::Source;
use keel_core::budget::{left_out_note, LogBudget};
use tokio::sync::{watch, Notify};

/// The bounds of one admin endpoint. `Default` is what servers and node agents use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at once, from all sources.
    pub connections_max: usize,
    /// Open connections at once from one source (see `keel_core::admission::Source`).
    pub per_source_max: usize,
    /// Time to send one request's line and headers.
    pub header_read_ms: u64,
    /// A connection with no request in progress for this long is closed.
    pub idle_ms: u64,
    /// Time for an authenticated request's body to arrive whole.
    pub body_read_ms: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connections_max: 1_024,
            per_source_max: 512,
            header_read_ms: 5_000,
            idle_ms: 10_000,
            body_read_ms: 10_000,
        }
    }
}

/// Bytes hyper buffers for one request head (hyper's floor is 8 KiB): a request line or
/// headers longer than that are refused (431) instead of being read into memory.
const HEAD_BUFFER_BYTES_MAX: usize = 16 * 1024;

/// One connection as the table and its request handlers see it.
#[derive(Debug)]
pub(crate) struct ConnState {
    id: u64,
    /// In an authenticated request now: never evicted (the request semaphore bounds these).
    busy: AtomicBool,
    /// A request (any) is being served: the idle clock stops.
    in_request: AtomicBool,
    /// Milliseconds since the table's epoch at the last request's start or end.
    last_active_ms: AtomicU64,
    close: Notify,
}

/// Handed to every request as an extension, so `server::guard` can mark authenticated work.
#[derive(Clone, Debug)]
pub(crate) struct ConnHandle(pub(crate) Arc<ConnState>);

impl ConnHandle {
    /// Marks the connection busy until the returned guard drops.
    pub(crate) fn busy(&self) -> BusyGuard {
        self.0.busy.store(true, Ordering::Release);
        BusyGuard(self.0.clone())
    }
}

pub(crate) struct BusyGuard(Arc<ConnState>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

struct Entry {
    source: Source,
    state: Arc<ConnState>,
}

#[derive(Default)]
struct Counts {
    next_id: u64,
    conns: HashMap<u64, Entry>,
    by_source: HashMap<Source, usize>,
}

/// Why a connection got no place.
#[derive(Debug)]
enum Refused {
    Total(usize),
    Source(Source, usize),
}

struct Table {
    limits: Limits,
    /// HTTPS beside HTTP (None: HTTP only).
    tls: Option<tokio_rustls::TlsAcceptor>,
    epoch: Instant,
    counts: Mutex<Counts>,
}

impl Table {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A place for a connection from `source`, closing the longest-idle connection (of that
    /// source when its cap is the one reached) if there is no free place. Returns the new
    /// connection and whether it took an evicted one's place.
    fn admit(&self, source: Source) -> Result<(Arc<ConnState>, bool), Refused> {
        let mut c = self.counts.lock().expect("admin connection table lock");
        let from_source = c.by_source.get(&source).copied().unwrap_or(0);
        let mut evicted = false;
        if from_source >= self.limits.per_source_max {
            if !Self::evict(&mut c, Some(source)) {
                return Err(Refused::Source(source, self.limits.per_source_max));
            }
            evicted = true;
        } else if c.conns.len() >= self.limits.connections_max {
            if !Self::evict(&mut c, None) {
                return Err(Refused::Total(self.limits.connections_max));
            }
            evicted = true;
        }
        c.next_id += 1;
        let state = Arc::new(ConnState {
            id: c.next_id,
            busy: AtomicBool::new(false),
            in_request: AtomicBool::new(false),
            last_active_ms: AtomicU64::new(self.now_ms()),
            close: Notify::new(),
        });
        c.conns.insert(
            state.id,
            Entry {
                source,
                state: state.clone(),
            },
        );
        *c.by_source.entry(source).or_insert(0) += 1;
        assert!(c.conns.len() <= self.limits.connections_max);
        Ok((state, evicted))
    }

    /// Closes the connection idle longest (of `source` only, if given) and frees its place.
    fn evict(c: &mut Counts, source: Option<Source>) -> bool {
        let victim = c
            .conns
            .values()
            .filter(|e| source.is_none_or(|s| e.source == s))
            .filter(|e| !e.state.busy.load(Ordering::Acquire))
            .min_by_key(|e| e.state.last_active_ms.load(Ordering::Acquire))
            .map(|e| e.state.id);
        let Some(id) = victim else {
            return false;
        };
        let entry = Self::forget(c, id).expect("the victim is in the table");
        // notify_one keeps the wake-up if the task is not waiting yet.
        entry.state.close.notify_one();
        true
    }

    fn forget(c: &mut Counts, id: u64) -> Option<Entry> {
        let entry = c.conns.remove(&id)?;
        let n = c
            .by_source
            .get_mut(&entry.source)
            .expect("a connection's source is counted");
        *n -= 1;
        if *n == 0 {
            c.by_source.remove(&entry.source);
        }
        Some(entry)
    }

    fn remove(&self, id: u64) {
        let mut c = self.counts.lock().expect("admin connection table lock");
        Self::forget(&mut c, id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.counts.lock().unwrap().conns.len()
    }
}

/// Accepts and serves connections until `stopping` turns true, then lets every connection
/// finish its request in progress (hyper's graceful shutdown) and returns when all are gone.
pub(crate) async fn run(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    mut stopping: watch::Receiver<bool>,
) {
    assert!(limits.per_source_max >= 1 && limits.per_source_max <= limits.connections_max);
    let table = Arc::new(Table {
        limits,
        tls: tls.map(tokio_rustls::TlsAcceptor::from),
        epoch: Instant::now(),
        counts: Mutex::default(),
    });
    let budget = Arc::new(LogBudget::new(5, 1));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopping.wait_for(|s| *s) => break,
        };
        let (sock, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                if let Some(left_out) = budget.take(Instant::now()) {
                    let why = format!("accept failed: {e}{}", left_out_note(left_out));
                    keel_core::emit!(keel_core::catalog::ADMN0030W, peer = "-", why = why);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while tasks.try_join_next().is_some() {}
        let source = Source::of(peer.ip());
        let state = match table.admit(source) {
            Ok((state, evicted)) => {
                if evicted {
                    note(&budget, peer, "the longest-idle connection was closed to make room for it (connection cap reached)".to_string());
                }
                state
            }
            Err(refused) => {
                let why = match refused {
                    Refused::Total(max) => format!("refused: {max} connections are open, each in an authenticated request"),
                    Refused::Source(s, max) => format!("refused: {max} connections from {s} are open, each in an authenticated request"),
                };
                note(&budget, peer, why);
                drop(sock);
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        tasks.spawn(connection(
            sock,
            peer,
            app.clone(),
            table.clone(),
            state,
            budget.clone(),
            stopping.clone(),
        ));
    }
    // Stopping: no new connections; those open finish their request in progress.
    while tasks.join_next().await.is_some() {}
}

fn note(budget: &LogBudget, peer: SocketAddr, why: String) {
    if let Some(left_out) = budget.take(Instant::now()) {
        let why = format!("{why}{}", left_out_note(left_out));
        keel_core::emit!(keel_core::catalog::ADMN0030W, peer = peer, why = why);
    }
}

/// A connection's byte stream: plain TCP, or TLS over it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// The first byte of a TLS connection (a handshake record); HTTP starts with a method name.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The Keel process a connection's TLS client certificate names (`node`, `process`), verified
/// against the cell's CA during the handshake; None over plain HTTP or without a certificate.
/// Set on every request of the connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PeerProcess(pub(crate) Option<(String, String)>);

/// Plain or TLS, told by the first byte, within the head deadline (a peer that sends nothing
/// is closed then, as hyper would close it). None: closed, failed or refused.
async fn stream(
    sock: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    head_ms: u64,
    budget: &LogBudget,
) -> Option<(Box<dyn Io>, PeerProcess)> {
    // Plain HTTP only from loopback (keel_core::plaintext): elsewhere, TLS or nothing.
    let plain_ok = keel_core::plaintext::plain_allowed(peer.ip());
    let Some(tls) = tls else {
        if !plain_ok {
            note(budget, peer, keel_core::plaintext::plain_refusal(peer));
            return None;
        }
        return Some((Box::new(sock), PeerProcess(None)));
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(head_ms);
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, sock.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE_RECORD => {}
        Ok(Ok(1)) if plain_ok => return Some((Box::new(sock), PeerProcess(None))),
        Ok(Ok(1)) => {
            note(budget, peer, keel_core::plaintext::plain_refusal(peer));
            return None;
        }
        _ => return None,
    }
    match tokio::time::timeout_at(deadline, tls.accept(sock)).await {
        Ok(Ok(s)) => {
            let process = keel_tls::peer_process(s.get_ref().1.peer_certificates());
            Some((Box::new(s), PeerProcess(process)))
        }
        Ok(Err(e)) => {
            note(budget, peer, format!("its TLS handshake failed ({e})"));
            None
        }
        Err(_) => {
            note(
                budget,
                peer,
                format!("its TLS handshake did not finish within {head_ms} ms"),
            );
            None
        }
    }
}

async fn connection(
    sock: tokio::net::TcpStream,
    peer: SocketAddr,
    app: Router,
    table: Arc<Table>,
    state: Arc<ConnState>,
    budget: Arc<LogBudget>,
    mut stopping: watch::Receiver<bool>,
) {
    let limits = table.limits;
    let tls = table.tls.clone();
    let Some((sock, process)) = stream(sock, peer, tls, limits.header_read_ms, &budget).await
    else {
        table.remove(state.id);
        return;
    };
    let service = {
        let state = state.clone();
        let table = table.clone();
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            let state = state.clone();
            let table = table.clone();
            let mut app = app.clone();
            request.extensions_mut().insert(ConnectInfo(peer));
            request.extensions_mut().insert(ConnHandle(state.clone()));
            request.extensions_mut().insert(process.clone());
            async move {
                state.in_request.store(true, Ordering::Release);
                let response =
                    tower_service::Service::call(&mut app, request.map(axum::body::Body::new))
                        .await;
                state
                    .last_active_ms
                    .store(table.now_ms(), Ordering::Release);
                state.in_request.store(false, Ordering::Release);
                Ok::<_, Infallible>(response.unwrap_or_else(|never| match never {}))
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_read_ms))
        .max_buf_size(HEAD_BUFFER_BYTES_MAX)
        .serve_connection(TokioIo::new(sock), service);
    tokio::pin!(conn);
    let idle = Duration::from_millis(limits.idle_ms);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            // Evicted: the table has already forgotten it; close at once.
            () = state.close.notified() => return,
            _ = stopping.wait_for(|s| *s), if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep(idle / 4) => {
                let since_ms = table
                    .now_ms()
                    .saturating_sub(state.last_active_ms.load(Ordering::Acquire));
                if !state.in_request.load(Ordering::Acquire) && since_ms >= limits.idle_ms {
                    break;
                }
            }
        }
    }
    table.remove(state.id);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(connections_max: usize, per_source_max: usize) -> Table {
        Table {
            tls: None,
            limits: Limits {
                connections_max,
                per_source_max,
                ..Limits::default()
            },
            epoch: Instant::now(),
            counts: Mutex::default(),
        }
    }

    fn src(s: &str) -> Source {
        Source::of(s.parse().unwrap())
    }

    #[test]
    fn a_full_source_makes_room_by_closing_its_longest_idle_connection() {
        let t = table(10, 3);
        let a: Vec<_> = (0..3)
            .map(|_| t.admit(src("127.0.0.2")).unwrap().0)
            .collect();
        a[0].last_active_ms.store(50, Ordering::Release);
        a[1].last_active_ms.store(10, Ordering::Release);
        a[2].last_active_ms.store(30, Ordering::Release);
        let (_, evicted) = t.admit(src("127.0.0.2")).unwrap();
        assert!(evicted);
        assert_eq!(t.len(), 3);
        // a[1] was idle longest: it was told to close (its permit is stored).
        let woken = futures_now(a[1].close.notified());
        assert!(woken);
        // Busy connections are never evicted: with all of a source's busy, it is refused.
        let t = table(10, 2);
        let b: Vec<_> = (0..2)
            .map(|_| t.admit(src("127.0.0.2")).unwrap().0)
            .collect();
        for s in &b {
            s.busy.store(true, Ordering::Release);
        }
        assert!(matches!(
            t.admit(src("127.0.0.2")),
            Err(Refused::Source(_, 2))
        ));
        // Another source is still let in.
        assert!(t.admit(src("127.0.0.1")).is_ok());
    }

    #[test]
    fn a_full_table_evicts_across_sources_and_removal_frees_places() {
        let t = table(4, 4);
        let mut all = Vec::new();
        for i in 0..4 {
            let (s, _) = t.admit(src(&format!("127.0.0.{}", i + 2))).unwrap();
            s.last_active_ms.store(100 - i, Ordering::Release);
            all.push(s);
        }
        let (_, evicted) = t.admit(src("127.0.0.1")).unwrap();
        assert!(evicted);
        assert!(futures_now(all[3].close.notified()));
        assert_eq!(t.len(), 4);
        t.remove(all[0].id);
        assert_eq!(t.len(), 3);
        assert!(!t.admit(src("127.0.0.1")).unwrap().1);
        let c = t.counts.lock().unwrap();
        assert_eq!(c.by_source.values().sum::<usize>(), c.conns.len());
    }

    /// Polls a future once: whether it is ready now.
    fn futures_now<F: std::future::Future>(f: F) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        f.as_mut().poll(&mut cx).is_ready()
    }
}

//! The admin endpoint under hostile and broken peers (issue 19, DESIGN §10): idle and half-open
//! connections, floods from one source while another is served, stalled bodies, a full request
//! pool, and password guessing. Each test would fail on the endpoint as it was (axum::serve with
//! no connection bound, no deadlines, the ping inside the request pool, no login delay).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, credential, users};
use keel_admin::{
    AdminClient, AdminError, AdminObject, Credential, Identity, Limits, OpFuture, Registry,
    Settings,
};
use keel_core::ObjectName;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// An object whose `wait` operation holds its request until released: a long-poll.
struct Blocker {
    release: tokio::sync::Semaphore,
}

impl AdminObject for Blocker {
    fn name(&self) -> ObjectName {
        ObjectName::parse("Keel:type=Blocker,name=b,process=s1").unwrap()
    }
    fn attributes(&self) -> Map<String, Value> {
        Map::new()
    }
    fn operations(&self) -> Vec<keel_admin::Op> {
        vec![keel_admin::Op::monitor(
            "wait",
            "holds the request until released",
        )]
    }
    fn invoke<'a>(&'a self, _op: &'a str, _args: Vec<Value>) -> OpFuture<'a> {
        Box::pin(async move {
            let permit = self.release.acquire().await.expect("semaphore open");
            permit.forget();
            Ok(json!("released"))
        })
    }
}

const BLOCKER: &str = "Keel:type=Blocker,name=b,process=s1";

async fn start_with(
    registry: Arc<Registry>,
    limits: Limits,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    start_throttled(registry, limits, keel_core::throttle::Limits::default()).await
}

async fn start_throttled(
    registry: Arc<Registry>,
    limits: Limits,
    logins: keel_core::throttle::Limits,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let settings = Settings {
        identity: Identity {
            cell: "cellA".into(),
            node: "node01".into(),
            process: "s1".into(),
        },
        limits,
        logins,
        tls: None,
    };
    tokio::spawn(keel_admin::serve_with(
        listener,
        registry,
        users(),
        settings,
        async move {
            let _ = rx.await;
        },
    ));
    (addr, tx)
}

/// A connection to `to` from the loopback address `from` (127.0.0.0/8 is all ours).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// Whether the server has closed `s` (EOF or reset within `wait_ms`).
async fn closed_by_server(s: &mut TcpStream, wait_ms: u64) -> bool {
    let mut buf = [0u8; 512];
    match tokio::time::timeout(Duration::from_millis(wait_ms), s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => {
            // An answer (a 4xx) came first; the close follows.
            matches!(
                tokio::time::timeout(Duration::from_millis(wait_ms), s.read(&mut buf)).await,
                Ok(Ok(0)) | Ok(Err(_))
            )
        }
        Err(_) => false,
    }
}

fn small_limits() -> Limits {
    Limits {
        connections_max: 64,
        per_source_max: 16,
        header_read_ms: 600,
        idle_ms: 600,
        body_read_ms: 600,
    }
}

#[tokio::test]
async fn a_flood_of_idle_connections_is_capped_and_closed_while_another_source_is_served() {
    let registry = Registry::new();
    registry.register(common::TestServer::new("s1"));
    let (addr, _stop) = start_with(registry, small_limits()).await;
    // 400 connections that never send a byte, from one source.
    let mut idle = Vec::new();
    for _ in 0..400 {
        idle.push(connect_from("127.0.0.2", addr).await);
    }
    // A client from another source is served at once, the whole time.
    let c = client(addr);
    assert_eq!(c.ping().await.unwrap()["process"], "s1");
    assert_eq!(
        c.invoke(
            &common::TestServer::object_name("s1"),
            "echo",
            vec![json!(1)]
        )
        .await
        .unwrap(),
        json!([1])
    );
    // At most per_source_max of the flood are still open: the rest were closed to make room.
    let mut open = 0;
    for s in idle.iter_mut() {
        if !closed_by_server(s, 1).await {
            open += 1;
        }
    }
    assert!(
        open <= 16,
        "{open} idle connections from one source still open"
    );
    // The survivors are closed by the idle deadline.
    for s in idle.iter_mut() {
        assert!(
            closed_by_server(s, 3_000).await,
            "an idle connection outlived the idle deadline"
        );
    }
}

#[tokio::test]
async fn one_source_cannot_lock_out_a_client_from_the_same_source() {
    let registry = Registry::new();
    registry.register(common::TestServer::new("s1"));
    let limits = Limits {
        idle_ms: 60_000,
        header_read_ms: 60_000,
        ..small_limits()
    };
    let (addr, _stop) = start_with(registry, limits).await;
    // Half-open requests (a request line and no end of headers) fill the source's places.
    let mut held = Vec::new();
    for _ in 0..200 {
        let mut s = connect_from("127.0.0.1", addr).await;
        s.write_all(b"GET /v1/ping HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        held.push(s);
    }
    // A legitimate request from the same address still gets through: the idle ones make room.
    for _ in 0..5 {
        client(addr).ping().await.unwrap();
    }
}

#[tokio::test]
async fn the_ping_is_answered_while_every_request_slot_holds_a_long_poll() {
    let registry = Registry::new();
    let blocker = Arc::new(Blocker {
        release: tokio::sync::Semaphore::new(0),
    });
    registry.register(blocker.clone());
    let (addr, _stop) = start_with(
        registry,
        Limits {
            connections_max: 2_048,
            per_source_max: 2_048,
            ..Limits::default()
        },
    )
    .await;
    let mut polls = tokio::task::JoinSet::new();
    for _ in 0..1_000 {
        let c = client(addr).with_timeout_ms(60_000);
        polls.spawn(async move { c.invoke(BLOCKER, "wait", vec![]).await });
    }
    // The pool (256) fills; the rest are told the endpoint is busy.
    let mut busy = 0;
    while busy < 1_000 - 256 {
        match polls.join_next().await.unwrap().unwrap() {
            Err(AdminError::Failed { why, .. }) if why.contains("already serving") => busy += 1,
            other => panic!("expected a busy refusal, got {other:?}"),
        }
    }
    for _ in 0..10 {
        assert_eq!(client(addr).ping().await.unwrap()["ok"], true);
    }
    blocker.release.add_permits(1_000);
    while let Some(r) = polls.join_next().await {
        assert_eq!(r.unwrap().unwrap(), json!("released"));
    }
}

#[tokio::test]
async fn a_stalled_body_is_cut_off_and_holds_no_request_slot() {
    let registry = Registry::new();
    registry.register(common::TestServer::new("s1"));
    let (addr, _stop) = start_with(registry, small_limits()).await;
    let auth = {
        use base64::Engine as _;
        let c = credential();
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.user, c.password))
    };
    let mut s = connect_from("127.0.0.1", addr).await;
    let head = format!(
        "POST /v1/query HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"pattern\""
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("the server ends a stalled body")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(500));
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("did not arrive within 600 ms"), "{text}");
}

#[tokio::test]
async fn wrong_passwords_are_answered_later_and_later_and_say_who_answered() {
    let registry = Registry::new();
    registry.register(common::TestServer::new("s1"));
    let (addr, _stop) = start_with(registry, Limits::default()).await;
    let wrong = AdminClient::new(addr, Credential::new("admin", "guess"));
    let mut took = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        match wrong.ping().await {
            Err(e @ AdminError::Unauthorized { .. }) => {
                // The refusal names what answered, so a command that reached another
                // profile's process can say so.
                let text = e.to_string();
                assert!(
                    text.contains("process s1 of node node01, cell cellA"),
                    "{text}"
                );
            }
            other => panic!("expected Unauthorized, got {other:?}"),
        }
        took.push(t.elapsed());
    }
    // Three free failures, then 250, 500, 1000 ms before the 5th, 6th and 7th answers.
    let waited: Duration = took[4..].iter().sum();
    assert!(waited >= Duration::from_millis(1_750), "{took:?}");
    // The right password from the same source and user waits its turn too, then gets in.
    let t = Instant::now();
    client(addr).ping().await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(1_000),
        "{:?}",
        t.elapsed()
    );
    // A refusal closes the connection (its body was never read) and names who answered.
    let mut s = connect_from("127.0.0.1", addr).await;
    s.write_all(b"GET /v1/ping HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(text.contains("\"answered_by\""), "{text}");
}

#[tokio::test]
async fn guesses_sent_at_once_are_answered_one_delay_apart_and_the_rest_refused_unchecked() {
    let registry = Registry::new();
    registry.register(common::TestServer::new("s1"));
    let logins = keel_core::throttle::Limits {
        free_failures: 3,
        source_free_failures: 1_000,
        first_delay_ms: 100,
        delay_max_ms: 200,
        queue_max_ms: 1_000,
        ..keel_core::throttle::Limits::default()
    };
    let (addr, _stop) = start_throttled(registry, Limits::default(), logins).await;
    let wrong = AdminClient::new(addr, Credential::new("admin", "guess"));
    for _ in 0..4 {
        assert!(matches!(
            wrong.ping().await,
            Err(AdminError::Unauthorized { .. })
        ));
    }
    // 30 guesses at once: the key's queue holds 1 s of answers at 100-200 ms each.
    let mut guesses = tokio::task::JoinSet::new();
    for _ in 0..30 {
        let w = wrong.clone();
        guesses.spawn(async move { w.ping().await });
    }
    let (mut checked, mut refused) = (0, 0);
    while let Some(r) = guesses.join_next().await {
        match r.unwrap() {
            Err(AdminError::Unauthorized { .. }) => checked += 1,
            Err(e) if e.to_string().contains("too many login attempts") => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(checked + refused, 30);
    assert!(
        checked <= 11,
        "{checked} guesses were checked within a 1 s queue at >= 100 ms each"
    );
    assert!(refused >= 19, "{refused}");
    // The right password is queued like any attempt of the key, then gets in.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    client(addr).ping().await.unwrap();
}

//! Numbered AMQP messages for tests with real servers (fe2o3-amqp as the client): each carries
//! its number in the application property `n` and a 1 KiB body, so a checker can tell every
//! message apart and count how often it arrived.
#![allow(dead_code)]

use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::{ApplicationProperties, Body, Message, Outcome};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use fe2o3_amqp::{Receiver, Sender, Session};

pub fn numbered(n: u64) -> Message<Body<Value>> {
    numbered_sized(n, 1024)
}

/// A numbered message with a body of `body_bytes`.
pub fn numbered_sized(n: u64, body_bytes: usize) -> Message<Body<Value>> {
    let mut props = fe2o3_amqp::types::primitives::OrderedMap::new();
    props.insert("n".to_string(), SimpleValue::Ulong(n));
    Message::builder()
        .header(fe2o3_amqp::types::messaging::Header {
            durable: true,
            ..Default::default()
        })
        .application_properties(ApplicationProperties(props))
        .body(Body::Data(fe2o3_amqp::types::messaging::Batch::new(vec![
            fe2o3_amqp::types::messaging::Data(vec![7u8; body_bytes].into()),
        ])))
        .build()
}

pub fn n_of(m: &Message<Body<Value>>) -> u64 {
    match m.application_properties.as_ref().and_then(|a| a.0.get("n")) {
        Some(SimpleValue::Ulong(n)) => *n,
        Some(SimpleValue::Long(n)) => *n as u64,
        other => panic!("message without its number: {other:?}"),
    }
}

pub async fn open(port: u16, password: &str) -> (ConnectionHandle<()>, SessionHandle<()>) {
    let url = format!("amqp://admin:{password}@127.0.0.1:{port}");
    let mut c = fe2o3_amqp::connection::Connection::builder()
        .container_id("keel-test")
        .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Plain {
            username: "admin".into(),
            password: password.into(),
        })
        .open(url.as_str())
        .await
        .unwrap();
    let s = Session::begin(&mut c).await.unwrap();
    (c, s)
}

/// Receives until `count` messages or `idle` without one; accepts each; returns their numbers.
pub async fn drain_numbers(
    session: &mut SessionHandle<()>,
    dest: &str,
    idle: Duration,
) -> Vec<u64> {
    let mut r = Receiver::attach(session, "drain", dest).await.unwrap();
    let mut got = Vec::new();
    while let Ok(Ok(d)) = tokio::time::timeout(idle, r.recv::<Body<Value>>()).await {
        got.push(n_of(d.message()));
        r.accept(&d).await.unwrap();
    }
    r.close().await.unwrap();
    got
}

/// Sends `range` as numbered messages to `dest` through the server on `port`; each must be
/// accepted.
pub fn send_numbers(
    rt: &tokio::runtime::Runtime,
    port: u16,
    password: &str,
    dest: &str,
    range: std::ops::Range<u64>,
) {
    rt.block_on(async {
        let (mut c, mut s) = open(port, password).await;
        let mut snd = Sender::attach(&mut s, "p", dest).await.unwrap();
        for n in range {
            let o = snd.send(numbered(n)).await.unwrap();
            assert!(matches!(o, Outcome::Accepted(_)), "{o:?}");
        }
        snd.close().await.unwrap();
        // Every message is accepted by now. fe2o3's client may fail the session end with
        // UnattachedHandle when a frame for the just-detached link crosses its Detach (seen
        // 1 in ~10 runs); the connection ends either way.
        let _ = s.end().await;
        let _ = c.close().await;
    })
}

/// Consumes numbered messages of `dest` until `want` arrived or `limit` passed.
pub fn receive_numbers(
    rt: &tokio::runtime::Runtime,
    port: u16,
    password: &str,
    dest: &str,
    want: usize,
    limit: Duration,
) -> Vec<u64> {
    rt.block_on(async {
        let (mut c, mut s) = open(port, password).await;
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + limit;
        while got.len() < want && std::time::Instant::now() < deadline {
            got.extend(drain_numbers(&mut s, dest, Duration::from_secs(1)).await);
        }
        // As in `send_numbers`: what was received is settled; the end's outcome is moot.
        let _ = s.end().await;
        let _ = c.close().await;
        got
    })
}

/// Receives until `want` arrived (or `limit` passed), then for 2 s more (anything late would be
/// a duplicate); the numbers, sorted.
pub fn receive_every(
    rt: &tokio::runtime::Runtime,
    port: u16,
    password: &str,
    dest: &str,
    want: usize,
    limit: Duration,
) -> Vec<u64> {
    let mut got = receive_numbers(rt, port, password, dest, want, limit);
    got.extend(receive_numbers(
        rt,
        port,
        password,
        dest,
        1,
        Duration::from_secs(2),
    ));
    got.sort_unstable();
    got
}

/// Checks that every number in `accepted` is in `got` exactly once; returns how often each
/// number of `got` arrived.
pub fn assert_each_accepted_once(
    accepted: &[u64],
    got: &[u64],
) -> std::collections::BTreeMap<u64, u32> {
    let mut counts = std::collections::BTreeMap::new();
    for n in got {
        *counts.entry(*n).or_default() += 1;
    }
    for n in accepted {
        assert_eq!(
            counts.get(n),
            Some(&1),
            "accepted message {n} lost or duplicated"
        );
    }
    counts
}

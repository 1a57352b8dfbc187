//! The engine as an XA resource: prepared branches are durable, invisible, and resolve exactly
//! once, by this run or (after a restart) from the store alone.

use std::sync::Arc;
use std::time::Duration;

use keel_config::{DestinationCfg, DestinationKind, Reliability};
use keel_engine::messaging::xa::Resolved;
use keel_engine::messaging::{Outcome, OutgoingMessage};
use keel_engine::{Engine, EngineConfig, StartMode};

const ME: &str = "node01.server1-bus1";

fn engine(dir: &std::path::Path) -> Arc<Engine> {
    engine_in(dir, false)
}

fn engine_in(dir: &std::path::Path, recovery_mode: bool) -> Arc<Engine> {
    let mut q = DestinationCfg::new("in", DestinationKind::Queue, ME);
    q.max_failed_deliveries = 2;
    let out = DestinationCfg::new("out", DestinationKind::Queue, ME);
    Engine::new(
        EngineConfig {
            me: ME.into(),
            uuid: "6f1c2f2e-8f0a-4a57-9d1e-1b7c1e0f0a11".into(),
            bus: "bus1".into(),
            node: "node01".into(),
            server: "server1".into(),
            store_path: dir.join("me.sqlite"),
            destinations: vec![q, out],
            max_message_bytes: 64 * 1024,
            store_url: None,
            peers: Vec::new(),
            duplicate_window_ms: 3_600_000,
        },
        recovery_mode,
    )
}

fn persistent(body: &str) -> OutgoingMessage {
    OutgoingMessage {
        body: body.as_bytes().to_vec(),
        reliability: Some(Reliability::AssuredPersistent),
        ..Default::default()
    }
}

async fn depths(e: &Engine) -> (u64, u64) {
    let m = e.messaging().unwrap();
    (m.depth("in").await.unwrap(), m.depth("out").await.unwrap())
}

/// Receives `in`'s next message and prepares a branch that consumes it and sends a copy to
/// `out`.
async fn prepare_move(e: &Engine, id: &str) -> Vec<u8> {
    let m = e.messaging().unwrap();
    let d = m
        .receive("in", Duration::ZERO)
        .await
        .unwrap()
        .expect("a message");
    let mut tx = m.begin();
    m.tx_settle(&mut tx, "in", d.seq, Outcome::Accepted)
        .unwrap();
    m.tx_send(
        &mut tx,
        "out",
        persistent(std::str::from_utf8(&d.body).unwrap()),
    )
    .unwrap();
    assert!(m.xa_prepare(tx, id).await.unwrap(), "not read-only");
    d.body
}

#[tokio::test]
async fn prepared_work_is_invisible_until_commit_and_resolves_once() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    for b in ["a", "b"] {
        m.send("in", persistent(b)).await.unwrap();
    }
    prepare_move(&e, "x1").await;
    prepare_move(&e, "x2").await;
    assert_eq!(m.xa_recover().await.unwrap(), vec!["x1", "x2"]);
    assert!(m.receive("in", Duration::ZERO).await.unwrap().is_none());
    assert!(m.receive("out", Duration::ZERO).await.unwrap().is_none());

    assert_eq!(m.xa_commit("x1").await.unwrap(), Resolved::Done);
    assert_eq!(m.xa_commit("x1").await.unwrap(), Resolved::NotFound);
    assert_eq!(m.xa_rollback("x2").await.unwrap(), Resolved::Done);
    assert_eq!(m.xa_rollback("x2").await.unwrap(), Resolved::NotFound);
    assert!(m.xa_recover().await.unwrap().is_empty());

    let got = m.receive("out", Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(got.body, b"a");
    assert!(m.receive("out", Duration::ZERO).await.unwrap().is_none());
    // The rolled-back branch's message is back, one failed delivery counted.
    let back = m.receive("in", Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(
        (back.body.as_slice(), back.delivery_count),
        (b"b".as_slice(), 1)
    );
    m.settle("in", back.seq, Outcome::Released).await.unwrap();
    m.settle("out", got.seq, Outcome::Released).await.unwrap();
    assert_eq!(depths(&e).await, (1, 1));

    // And so it stays after a restart.
    e.stop(false).await.unwrap();
    e.start(StartMode::Normal).await.unwrap();
    assert_eq!(depths(&e).await, (1, 1));
}

#[tokio::test]
async fn branches_prepared_before_a_restart_resolve_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    for b in ["c", "r", "waiting"] {
        m.send("in", persistent(b)).await.unwrap();
    }
    prepare_move(&e, "commit-me").await;
    prepare_move(&e, "roll-me").await;
    // A restart (what a crash leaves, as far as the store goes: the branches are durable).
    e.stop(false).await.unwrap();
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    assert_eq!(m.xa_recover().await.unwrap(), vec!["commit-me", "roll-me"]);
    assert_eq!(depths(&e).await, (1, 0), "only `waiting` is visible");
    // The in-doubt messages are not delivered while in doubt.
    let w = m.receive("in", Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(w.body, b"waiting");
    assert!(m.receive("in", Duration::ZERO).await.unwrap().is_none());
    m.settle("in", w.seq, Outcome::Released).await.unwrap();

    assert_eq!(m.xa_commit("commit-me").await.unwrap(), Resolved::Done);
    assert_eq!(m.xa_rollback("roll-me").await.unwrap(), Resolved::Done);
    assert_eq!(m.xa_commit("commit-me").await.unwrap(), Resolved::NotFound);
    assert!(m.xa_recover().await.unwrap().is_empty());
    assert_eq!(depths(&e).await, (2, 1));
    let out = m.receive("out", Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(out.body, b"c");
    // Both available at once (each stays locked until released below).
    let mut seen = Vec::new();
    let mut locked = Vec::new();
    while let Some(d) = m.receive("in", Duration::ZERO).await.unwrap() {
        seen.push((String::from_utf8(d.body.clone()).unwrap(), d.delivery_count));
        locked.push(d.seq);
        assert!(seen.len() <= 2, "{seen:?}");
    }
    for seq in locked {
        m.settle("in", seq, Outcome::Released).await.unwrap();
    }
    seen.sort();
    assert_eq!(seen, vec![("r".into(), 1), ("waiting".into(), 0)]);
}

#[tokio::test]
async fn rolled_back_too_often_ends_on_the_exception_destination() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    m.send("in", persistent("poison")).await.unwrap();
    // max_failed_deliveries 2: the first rollback redelivers, the second (after a restart,
    // from the store) moves the message away.
    prepare_move(&e, "r1").await;
    m.xa_rollback("r1").await.unwrap();
    prepare_move(&e, "r2").await;
    e.stop(false).await.unwrap();
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    m.xa_rollback("r2").await.unwrap();
    assert_eq!(depths(&e).await, (0, 0));
    let exc = keel_config::system_exception_destination(ME);
    let x = m.receive(&exc, Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(
        (x.body.as_slice(), x.delivery_count),
        (b"poison".as_slice(), 2)
    );
}

#[tokio::test]
async fn an_empty_branch_votes_read_only_and_ids_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    assert!(!m.xa_prepare(m.begin(), "empty").await.unwrap());
    assert!(m.xa_recover().await.unwrap().is_empty());
    let mut tx = m.begin();
    m.tx_send(&mut tx, "out", persistent("x")).unwrap();
    assert!(m.xa_prepare(tx, "has space").await.is_err());
    // Refused before anything was stored.
    assert_eq!(depths(&e).await, (0, 0));
    assert!(m.xa_recover().await.unwrap().is_empty());
}

/// A recovery-mode engine asked before its store opened says it is still opening (the
/// transaction service may be asked first); one whose open failed says why and what to do.
#[tokio::test]
async fn a_recovery_mode_engine_tells_opening_from_failed() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine_in(dir.path(), true);
    let early = e.why_not_started().await;
    assert!(early.contains("still opening"), "{early}");

    // A directory where the store file should be: the open fails.
    std::fs::create_dir(dir.path().join("me.sqlite")).unwrap();
    std::fs::write(dir.path().join("me.sqlite").join("x"), b"x").unwrap();
    assert!(e.start_for_recovery().await.is_err());
    let failed = e.why_not_started().await;
    assert!(failed.contains("could not open its data store"), "{failed}");
    assert!(
        failed.contains("stop this server and start it again"),
        "{failed}"
    );
    assert!(!failed.contains("still opening"), "{failed}");
}

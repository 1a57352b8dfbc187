//! Messaging through a real engine over a real SQLite store in a temp directory.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use keel_config::{DestinationCfg, DestinationKind, Reliability};
use keel_engine::messaging::{MessagingError, Outcome, OutgoingMessage};
use keel_engine::{Engine, EngineConfig, StartMode};

const ME: &str = "node01.server1-bus1";

fn engine(dir: &std::path::Path) -> Arc<Engine> {
    let mut q = DestinationCfg::new("q1", DestinationKind::Queue, ME);
    q.max_failed_deliveries = 3;
    let small = DestinationCfg::new("express", DestinationKind::Queue, ME);
    let topic = DestinationCfg::new("t1", DestinationKind::Topic, ME);
    let remote = DestinationCfg::new("elsewhere", DestinationKind::Queue, "node01.server2-bus1");
    Engine::new(
        EngineConfig {
            me: ME.into(),
            uuid: "6f1c2f2e-8f0a-4a57-9d1e-1b7c1e0f0a11".into(),
            bus: "bus1".into(),
            node: "node01".into(),
            server: "server1".into(),
            store_path: dir.join("me.sqlite"),
            destinations: vec![q, small, topic, remote],
            max_message_bytes: 64 * 1024,
            store_url: None,
            peers: Vec::new(),
            duplicate_window_ms: 3_600_000,
        },
        false,
    )
}

fn msg(body: &str, priority: u8) -> OutgoingMessage {
    OutgoingMessage {
        body: body.as_bytes().to_vec(),
        priority: Some(priority),
        ..Default::default()
    }
}

#[tokio::test]
async fn delivery_order_accept_and_depth() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    for (b, p) in [("a", 4), ("b", 9), ("c", 4), ("d", 0), ("e", 9)] {
        m.send("q1", msg(b, p)).await.unwrap();
    }
    assert_eq!(m.depth("q1").await.unwrap(), 5);
    let mut got = Vec::new();
    while let Some(d) = m.receive("q1", Duration::ZERO).await.unwrap() {
        got.push(String::from_utf8(d.body.clone()).unwrap());
        m.settle("q1", d.seq, Outcome::Accepted).await.unwrap();
    }
    assert_eq!(got, ["b", "e", "a", "c", "d"]);
    assert_eq!(m.depth("q1").await.unwrap(), 0);
    // A batch take: what is there now, in the same order, at most `max`, each locked once.
    for (b, p) in [("a", 4), ("b", 9), ("c", 4), ("d", 0), ("e", 9)] {
        m.send("q1", msg(b, p)).await.unwrap();
    }
    let first = m.receive_now("q1", 3).await.unwrap();
    let rest = m.receive_now("q1", 10).await.unwrap();
    assert!(m.receive_now("q1", 10).await.unwrap().is_empty());
    let bodies: Vec<&[u8]> = first.iter().chain(&rest).map(|d| &d.body[..]).collect();
    assert_eq!(bodies, [&b"b"[..], b"e", b"a", b"c", b"d"]);
    assert_eq!(first.len(), 3);
    for d in first.iter().chain(&rest) {
        m.settle("q1", d.seq, Outcome::Accepted).await.unwrap();
    }
    assert_eq!(m.depth("q1").await.unwrap(), 0);
    // Settling twice is refused.
    let id = m.send("q1", msg("x", 4)).await.unwrap();
    // `<me-uuid>:<incarnation>:<seq>`, the incarnation begun by this start (Unix ms or later).
    let parts: Vec<&str> = id.split(':').collect();
    assert_eq!(parts[0], "6f1c2f2e-8f0a-4a57-9d1e-1b7c1e0f0a11", "{id}");
    assert!(parts[1].parse::<u64>().unwrap() > 1_700_000_000_000, "{id}");
    let d = m.receive("q1", Duration::ZERO).await.unwrap().unwrap();
    m.settle("q1", d.seq, Outcome::Accepted).await.unwrap();
    assert!(matches!(
        m.settle("q1", d.seq, Outcome::Accepted).await,
        Err(MessagingError::UnknownDelivery { .. })
    ));
}

#[tokio::test]
async fn failures_count_and_end_on_the_exception_destination() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    m.send("q1", msg("poison", 4)).await.unwrap();
    // Released: same count.
    let d = m.receive("q1", Duration::ZERO).await.unwrap().unwrap();
    m.settle("q1", d.seq, Outcome::Released).await.unwrap();
    let d = m.receive("q1", Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(d.delivery_count, 0);
    // Failed twice: counts 1, 2; the third failure reaches max_failed_deliveries = 3.
    for expected in [1, 2] {
        m.settle("q1", d.seq, Outcome::Failed).await.unwrap();
        let again = m.receive("q1", Duration::ZERO).await.unwrap().unwrap();
        assert_eq!(again.delivery_count, expected);
    }
    m.settle("q1", d.seq, Outcome::Failed).await.unwrap();
    assert!(m.receive("q1", Duration::ZERO).await.unwrap().is_none());
    let exc = keel_config::system_exception_destination(ME);
    let x = m.receive(&exc, Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(x.body, b"poison");
    assert_eq!(x.delivery_count, 3);
    // Rejected goes there at once; the exception destination keeps what fails on it.
    m.send("q1", msg("bad", 4)).await.unwrap();
    let d = m.receive("q1", Duration::ZERO).await.unwrap().unwrap();
    m.settle("q1", d.seq, Outcome::Rejected).await.unwrap();
    m.settle(&exc, x.seq, Outcome::Failed).await.unwrap();
    assert_eq!(m.depth(&exc).await.unwrap(), 2);
    // And the moves are durable.
    e.stop(false).await.unwrap();
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    assert_eq!(m.depth(&exc).await.unwrap(), 2);
    assert_eq!(m.depth("q1").await.unwrap(), 0);
}

#[tokio::test]
async fn persistent_messages_survive_a_restart_in_order_and_volatile_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    // More than the in-memory window, so delivery pages through the store.
    let n = 3_000u32;
    for i in 0..n {
        m.send("q1", msg(&format!("{i}"), (i % 3) as u8))
            .await
            .unwrap();
    }
    let mut ex = msg("gone", 4);
    ex.reliability = Some(Reliability::Express);
    m.send("express", ex).await.unwrap();
    e.stop(false).await.unwrap();
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    assert!(
        m.receive("express", Duration::ZERO)
            .await
            .unwrap()
            .is_none(),
        "express messages are not persisted"
    );
    let mut last: Option<(u8, u64)> = None;
    let mut seen = BTreeSet::new();
    while let Some(d) = m.receive("q1", Duration::ZERO).await.unwrap() {
        if let Some((lp, ls)) = last {
            assert!(
                d.priority < lp || (d.priority == lp && d.seq > ls),
                "order broken at {}",
                d.seq
            );
        }
        last = Some((d.priority, d.seq));
        assert!(seen.insert(String::from_utf8(d.body.clone()).unwrap()));
        m.settle("q1", d.seq, Outcome::Accepted).await.unwrap();
    }
    assert_eq!(seen.len(), n as usize);
}

#[tokio::test]
async fn expiry_and_bad_input_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    let mut short = msg("short-lived", 4);
    short.ttl_ms = Some(1);
    m.send("q1", short).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(m.receive("q1", Duration::ZERO).await.unwrap().is_none());
    assert_eq!(m.depth("q1").await.unwrap(), 0);
    let big = OutgoingMessage {
        body: vec![b'x'; 65 * 1024],
        ..Default::default()
    };
    assert!(matches!(
        m.send("q1", big).await,
        Err(MessagingError::TooLarge { .. })
    ));
    let err = m.send("nosuch", msg("x", 4)).await.unwrap_err();
    assert!(err.to_string().contains("keel destination create"), "{err}");
    // A topic space is served: a publication with no subscription reaches nobody.
    assert!(m.send("t1", msg("x", 4)).await.is_ok());
    // A queue on another engine: the message goes onto the stream towards it (stored, with a
    // tick), and it cannot be received here.
    assert!(m.send("elsewhere", msg("x", 4)).await.is_ok());
    let stream = m
        .out_stream("node01.server2-bus1")
        .await
        .unwrap()
        .state()
        .await;
    assert_eq!((stream.next_tick(), stream.acked()), (2, 0));
    let waiting = m
        .out_page("node01.server2-bus1", stream.stream_id(), 1, 10)
        .await
        .unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!(
        (waiting[0].tick, waiting[0].dest.as_str()),
        (1, "elsewhere")
    );
    // Remote get: without a link to the queue's engine, a consumer here waits (nothing yet).
    assert!(matches!(
        m.receive("elsewhere", Duration::ZERO).await,
        Ok(None)
    ));
    e.stop(false).await.unwrap();
    assert!(matches!(
        e.messaging(),
        Err(MessagingError::NotStarted { .. })
    ));
}

/// A link sends what the stream's committer just stored from memory (no read back); the
/// messages must be exactly what the store holds for those ticks, IDs included (the target's
/// duplicate window goes by them).
#[tokio::test]
async fn unsent_stream_messages_from_memory_equal_the_stored_rows() {
    const TARGET: &str = "node01.server2-bus1";
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    let n = 300;
    for i in 0..n {
        let mut properties = keel_engine::messaging::Properties::new();
        if i % 3 == 0 {
            properties.insert("i".into(), serde_json::json!(i));
        }
        let sent = OutgoingMessage {
            // Inline bodies and body-log bodies both.
            body: vec![b'a' + (i % 26) as u8; [10, 300, 2_000][i % 3]],
            properties,
            priority: Some((i % 10) as u8),
            reliability: None,
            ttl_ms: (i % 4 == 0).then_some(3_600_000),
        };
        m.send("elsewhere", sent).await.unwrap();
    }
    let stream_id = m
        .out_stream(TARGET)
        .await
        .unwrap()
        .state()
        .await
        .stream_id()
        .to_string();
    // The first page comes from memory and takes it; asking again from tick 1 reads the store.
    let from_memory = m.out_page(TARGET, &stream_id, 1, 256).await.unwrap();
    let from_store = m.out_page(TARGET, &stream_id, 1, 256).await.unwrap();
    assert_eq!(from_memory.len(), 256);
    assert_eq!(from_memory, from_store);
    // The rest: from memory after what was taken, then from the store.
    let rest = m.out_page(TARGET, &stream_id, 257, 256).await.unwrap();
    let rest_stored = m.out_page(TARGET, &stream_id, 257, 256).await.unwrap();
    assert_eq!(rest.len(), n - 256);
    assert_eq!(rest, rest_stored);
    assert!(rest.iter().zip(257..).all(|(m, t)| m.tick == t));
    e.stop(false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_and_consumers_see_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    let producers = 8;
    let per = 300;
    let mut tasks = Vec::new();
    for p in 0..producers {
        let m = m.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                m.send("q1", msg(&format!("{p}-{i}"), (i % 10) as u8))
                    .await
                    .unwrap();
            }
        }));
    }
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let m = m.clone();
        consumers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(d) = m.receive("q1", Duration::from_millis(500)).await.unwrap() {
                got.push(String::from_utf8(d.body.clone()).unwrap());
                m.settle("q1", d.seq, Outcome::Accepted).await.unwrap();
            }
            got
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut all = Vec::new();
    for c in consumers {
        all.extend(c.await.unwrap());
    }
    let unique: BTreeSet<_> = all.iter().cloned().collect();
    assert_eq!(all.len(), producers * per, "each message exactly once");
    assert_eq!(unique.len(), producers * per);
    assert_eq!(m.depth("q1").await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_settle_is_refused_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    for outcome in [Outcome::Released, Outcome::Accepted, Outcome::Failed] {
        m.send("q1", msg("x", 4)).await.unwrap();
        let d = m.receive("q1", Duration::ZERO).await.unwrap().unwrap();
        let (a, b) = tokio::join!(
            m.settle("q1", d.seq, outcome),
            m.settle("q1", d.seq, outcome)
        );
        assert!(
            a.is_ok() != b.is_ok(),
            "exactly one of two concurrent settles wins: {a:?} {b:?}"
        );
        if outcome != Outcome::Accepted {
            let again = m.receive("q1", Duration::ZERO).await.unwrap().unwrap();
            m.settle("q1", again.seq, Outcome::Accepted).await.unwrap();
        }
    }
    assert_eq!(m.depth("q1").await.unwrap(), 0);
}

#[tokio::test]
async fn topic_publications_reach_every_durable_subscription_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    // No subscription yet: a publication reaches nobody and nothing is stored.
    m.send("t1", msg("lost", 4)).await.unwrap();
    assert!(m.store_messages().await.unwrap() == 0);
    let a = m.subscribe("t1", "audit").await.unwrap();
    let b = m.subscribe("t1", "billing").await.unwrap();
    assert_eq!(a, "t1::audit");
    assert_eq!(
        m.subscribe("t1", "audit").await.unwrap(),
        a,
        "subscribing again finds the same subscription"
    );
    for i in 0..5 {
        m.send("t1", msg(&format!("p{i}"), 4)).await.unwrap();
    }
    assert_eq!(m.depth(&a).await.unwrap(), 5);
    assert_eq!(m.depth(&b).await.unwrap(), 5);
    // Consuming one subscription leaves the other's copies alone.
    while let Some(d) = m.receive(&a, Duration::ZERO).await.unwrap() {
        m.settle(&a, d.seq, Outcome::Accepted).await.unwrap();
    }
    assert_eq!(m.depth(&b).await.unwrap(), 5);
    // Durable: the subscription and its messages survive a restart.
    e.stop(false).await.unwrap();
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    assert_eq!(
        m.subscriptions_of("t1"),
        vec!["t1::audit".to_string(), "t1::billing".to_string()]
    );
    let mut got = Vec::new();
    while let Some(d) = m.receive(&b, Duration::ZERO).await.unwrap() {
        got.push(String::from_utf8(d.body.clone()).unwrap());
        m.settle(&b, d.seq, Outcome::Accepted).await.unwrap();
    }
    assert_eq!(got, ["p0", "p1", "p2", "p3", "p4"]);
    m.send("t1", msg("after", 4)).await.unwrap();
    assert_eq!(m.unsubscribe("t1", "billing").await.unwrap(), 1);
    assert!(
        m.receive(&b, Duration::ZERO).await.is_err(),
        "an unsubscribed subscription is gone"
    );
    assert_eq!(m.depth(&a).await.unwrap(), 1);
    // Errors name the fix.
    assert!(m
        .receive("t1", Duration::ZERO)
        .await
        .unwrap_err()
        .to_string()
        .contains("subscriptions"));
    assert!(m.subscribe("t1", "bad name").await.is_err());
    assert!(m.subscribe("q1", "x").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_engine_wakes_waiting_receivers() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    let waiter = tokio::spawn(async move { m.receive("q1", Duration::from_secs(60)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    e.stop(false).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the receiver wakes up")
        .unwrap();
    assert!(matches!(r, Err(MessagingError::NotStarted { .. })), "{r:?}");
}

#[tokio::test]
async fn transactions_apply_sends_and_settles_together_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    m.send("q1", msg("in-1", 4)).await.unwrap();
    m.send("q1", msg("in-2", 4)).await.unwrap();
    let a = m.receive("q1", Duration::ZERO).await.unwrap().unwrap();
    let b = m.receive("q1", Duration::ZERO).await.unwrap().unwrap();

    // Consume two, produce three, in one transaction: nothing shows before commit.
    let mut tx = m.begin();
    m.tx_settle(&mut tx, "q1", a.seq, Outcome::Accepted)
        .unwrap();
    m.tx_settle(&mut tx, "q1", b.seq, Outcome::Accepted)
        .unwrap();
    for i in 0..3 {
        m.tx_send(
            &mut tx,
            "express",
            OutgoingMessage {
                body: format!("out-{i}").into_bytes(),
                reliability: Some(Reliability::AssuredPersistent),
                ..Default::default()
            },
        )
        .unwrap();
    }
    assert_eq!(tx.len(), 5);
    assert!(m
        .receive("express", Duration::ZERO)
        .await
        .unwrap()
        .is_none());
    assert!(
        m.settle("q1", a.seq, Outcome::Accepted).await.is_err(),
        "a delivery in a transaction is claimed by it"
    );
    let ids = m.commit(tx).await.unwrap();
    assert_eq!(ids.len(), 3);
    assert_eq!(m.depth("q1").await.unwrap(), 0);
    assert_eq!(m.depth("express").await.unwrap(), 3);

    // Durable: the committed effects survive a restart.
    e.stop(false).await.unwrap();
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    assert_eq!(m.depth("q1").await.unwrap(), 0);
    assert_eq!(m.depth("express").await.unwrap(), 3);
}

#[tokio::test]
async fn rollback_counts_a_failed_delivery_and_drop_releases() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    m.send("q1", msg("work", 4)).await.unwrap();
    // max_failed_deliveries of q1 is 3: two rollbacks redeliver, the third moves it away.
    for expected_count in 1..=3u32 {
        let d = m
            .receive("q1", Duration::ZERO)
            .await
            .unwrap()
            .expect("redelivered");
        assert_eq!(d.delivery_count, expected_count - 1);
        let mut tx = m.begin();
        m.tx_settle(&mut tx, "q1", d.seq, Outcome::Accepted)
            .unwrap();
        m.tx_send(&mut tx, "q1", msg("never", 4)).unwrap();
        m.rollback(tx).await.unwrap();
    }
    assert!(
        m.receive("q1", Duration::ZERO).await.unwrap().is_none(),
        "the rolled-back send never appears"
    );
    let exc = keel_config::system_exception_destination(ME);
    let x = m.receive(&exc, Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(
        (x.body.as_slice(), x.delivery_count),
        (b"work".as_slice(), 3)
    );

    // A transaction dropped unfinished (a lost connection) releases its claims unchanged,
    // and its uncommitted sends leave no trace, also after a restart.
    m.send("q1", msg("again", 4)).await.unwrap();
    let d = m.receive("q1", Duration::ZERO).await.unwrap().unwrap();
    let mut tx = m.begin();
    m.tx_settle(&mut tx, "q1", d.seq, Outcome::Accepted)
        .unwrap();
    m.tx_send(&mut tx, "q1", msg("ghost", 4)).unwrap();
    drop(tx);
    let again = m.receive("q1", Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(
        (again.body.as_slice(), again.delivery_count),
        (b"again".as_slice(), 0)
    );
    m.settle("q1", again.seq, Outcome::Released).await.unwrap();
    e.stop(false).await.unwrap();
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    assert_eq!(
        m.depth("q1").await.unwrap(),
        1,
        "only `again`, never `ghost`"
    );
}

#[tokio::test]
async fn batches_keep_order_report_per_message_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    let mut batch: Vec<OutgoingMessage> = (0..20).map(|i| msg(&format!("m{i}"), 4)).collect();
    // One too large and one non-persistent in the middle: refused alone / held in memory.
    batch[5].body = vec![0; 65 * 1024];
    batch[7].reliability = Some(Reliability::Express);
    let results = m.send_batch("q1", batch).await.unwrap();
    assert_eq!(results.len(), 20);
    assert!(matches!(results[5], Err(MessagingError::TooLarge { .. })));
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 19);
    assert_eq!(m.depth("q1").await.unwrap(), 19);
    // An undefined destination fails the whole batch, storing nothing.
    assert!(matches!(
        m.send_batch("nosuch", vec![msg("x", 4)]).await,
        Err(MessagingError::UnknownDestination { .. })
    ));

    let mut taken = Vec::new();
    for _ in 0..6 {
        taken.push(m.receive("q1", Duration::ZERO).await.unwrap().unwrap());
    }
    let bodies: Vec<String> = taken
        .iter()
        .map(|d| String::from_utf8(d.body.clone()).unwrap())
        .collect();
    assert_eq!(
        bodies,
        ["m0", "m1", "m2", "m3", "m4", "m6"],
        "in order, m5 refused"
    );
    // Accept four, release one, reject one, plus one that is not locked: one commit.
    let settles = [
        (taken[0].seq, Outcome::Accepted),
        (taken[1].seq, Outcome::Accepted),
        (taken[2].seq, Outcome::Released),
        (taken[3].seq, Outcome::Rejected),
        (taken[4].seq, Outcome::Accepted),
        (taken[5].seq, Outcome::Accepted),
        (999_999, Outcome::Accepted),
    ];
    let results = m.settle_batch("q1", &settles).await.unwrap();
    assert!(results[..6].iter().all(|r| r.is_ok()));
    assert!(matches!(
        results[6],
        Err(MessagingError::UnknownDelivery { .. })
    ));
    assert_eq!(
        m.depth("q1").await.unwrap(),
        14,
        "19 - 4 accepted - 1 rejected"
    );

    e.stop(false).await.unwrap();
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    let mut after = Vec::new();
    while let Some(d) = m.receive("q1", Duration::ZERO).await.unwrap() {
        after.push(String::from_utf8(d.body.clone()).unwrap());
        m.settle("q1", d.seq, Outcome::Accepted).await.unwrap();
    }
    let want: Vec<String> = [2, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
        .iter()
        .map(|i| format!("m{i}"))
        .collect();
    assert_eq!(
        after, want,
        "the express message is gone with the stop; order kept"
    );
}

#[tokio::test]
async fn ids_stay_unique_when_a_store_file_is_copied_back() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.start(StartMode::Normal).await.unwrap();
    let first = e
        .messaging()
        .unwrap()
        .send("q1", msg("a", 4))
        .await
        .unwrap();
    e.stop(false).await.unwrap();
    // An operator copies the store file aside, more traffic follows, and the old copy is put
    // back by hand (no restore mark): the seqs repeat, the IDs must not.
    let store = dir.path().join("me.sqlite");
    let copy = dir.path().join("copy.sqlite");
    std::fs::copy(&store, &copy).unwrap();
    e.start(StartMode::Normal).await.unwrap();
    let after_copy = e
        .messaging()
        .unwrap()
        .send("q1", msg("b", 4))
        .await
        .unwrap();
    e.stop(false).await.unwrap();
    std::fs::copy(&copy, &store).unwrap();
    e.start(StartMode::Normal).await.unwrap();
    let after_copy_back = e
        .messaging()
        .unwrap()
        .send("q1", msg("c", 4))
        .await
        .unwrap();
    let seq = |id: &str| id.rsplit(':').next().unwrap().to_string();
    assert_eq!(
        seq(&after_copy),
        seq(&after_copy_back),
        "the copy reissues the seq"
    );
    let ids = BTreeSet::from([first, after_copy, after_copy_back.clone()]);
    assert_eq!(ids.len(), 3, "an ID was minted twice: {ids:?}");
    e.stop(false).await.unwrap();
}

#[tokio::test]
async fn a_stream_message_is_stored_once_even_when_two_links_race() {
    use keel_engine::messaging::streams::StreamMessage;
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.start(StartMode::Normal).await.unwrap();
    let m = e.messaging().unwrap();
    let at = |tick: u64| StreamMessage {
        tick,
        id: format!("peer:1:{tick}"),
        dest: "q1".into(),
        priority: 4,
        reliability: 3,
        expiry_ms: None,
        properties: vec![],
        body: b"x".to_vec(),
    };
    let peer = "node01.server2-bus1";
    m.in_deliver(peer, "s1", vec![at(1), at(2)]).await.unwrap();
    // A second link that started from the older prefix: refused, nothing stored twice.
    assert!(m.in_deliver(peer, "s1", vec![at(2)]).await.is_err());
    assert!(m.in_deliver(peer, "s1", vec![at(4)]).await.is_err());
    m.in_deliver(peer, "s1", vec![at(3)]).await.unwrap();
    assert_eq!(m.depth("q1").await.unwrap(), 3);
    assert_eq!(m.in_state(peer, "s1").await.unwrap().unwrap().tick, 3);
    // Another engine's stream of the same id is its own.
    assert_eq!(m.in_state("node01.server3-bus1", "s1").await.unwrap(), None);
    e.stop(false).await.unwrap();
}

/// A data store that fails (here: a commit whose fsync failed, so whether it is on disk is
/// unknown) makes its engine visibly failed: sends are refused with the store's sentence,
/// the state reads `failed`, the admin object says why; a stop and start bring it back.
#[tokio::test]
async fn a_failed_store_makes_the_engine_failed_until_it_is_restarted() {
    use keel_admin::AdminObject;
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.start(StartMode::Normal).await.unwrap();
    let object = keel_engine::EngineObject::new(e.clone());
    assert_eq!(object.attributes()["store_health"]["state"], "ok");
    let m = e.messaging().unwrap();
    m.send("q1", msg("kept", 4)).await.unwrap();
    e.sqlite_store().unwrap().fail_next_fsync().await.unwrap();
    let err = m.send("q1", msg("in doubt", 4)).await.unwrap_err();
    assert!(
        matches!(&err, MessagingError::Store(s) if matches!(**s, keel_store::StoreError::Failed { .. })),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!("keel me stop {ME}")),
        "{err}"
    );
    assert_eq!(e.reported_state(), "failed");
    let attrs = object.attributes();
    assert_eq!(attrs["state"], "failed");
    assert_eq!(attrs["store_health"]["state"], "failed");
    assert!(
        attrs["store_health"]["text"]
            .as_str()
            .unwrap()
            .contains("fsync"),
        "{attrs:?}"
    );
    // The remedy the sentence names: stop, start.
    e.stop(false).await.unwrap();
    e.start(StartMode::Normal).await.unwrap();
    assert_eq!(e.reported_state(), "started");
    let m = e.messaging().unwrap();
    m.send("q1", msg("after", 4)).await.unwrap();
    let mut got = Vec::new();
    while let Some(d) = m.receive("q1", Duration::ZERO).await.unwrap() {
        got.push(String::from_utf8(d.body.clone()).unwrap());
        m.settle("q1", d.seq, Outcome::Accepted).await.unwrap();
    }
    assert_eq!(got, ["kept", "after"]);
}

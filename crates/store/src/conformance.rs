//! The backend-independent conformance suite. Every [`Store`] backend runs these same checks
//! (`tests/sqlite.rs` for SQLite): a backend is done when [`run_all`] passes and its own tests
//! (durability under SIGKILL, backup/restore, corruption) pass.
//!
//! Each check takes a [`Backend`], which creates and reopens named stores, and uses its own
//! store names, so checks never see each other's data. Checks panic on failure (they are
//! test code), with a message naming the check.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::{
    CommitOutcome, Op, RestoreState, Store, StoreError, StoreFuture, StoredMessage, PAGE_LIMIT_MAX,
};

/// Creates and reopens stores for the suite. `name` is unique per check; `me`/`uuid` stamp it.
pub trait Backend: Send + Sync {
    /// A new, empty store.
    fn create<'a>(
        &'a self,
        name: &'a str,
        me: &'a str,
        uuid: &'a str,
    ) -> StoreFuture<'a, Box<dyn Store>>;
    /// The store `name` again (after `close`), as the ME `me`/`uuid`.
    fn open<'a>(
        &'a self,
        name: &'a str,
        me: &'a str,
        uuid: &'a str,
    ) -> StoreFuture<'a, Box<dyn Store>>;
}

const ME: &str = "node1.server1-bus1";
const UUID: &str = "6f1c2a7e-0000-4000-8000-000000000001";

/// A Put with the fields the suite cares about; an empty id asks for the system id.
pub fn put(dest: &str, priority: u8, body: &[u8]) -> Op {
    Op::Put {
        dest: dest.to_string(),
        id: String::new(),
        priority,
        reliability: 3,
        expiry_ms: None,
        properties: b"{}".to_vec(),
        body: body.to_vec(),
        stream: None,
    }
}

fn put_stream(dest: &str, stream: &str, tick: u64) -> Op {
    Op::Put {
        dest: dest.to_string(),
        id: format!("foreign:{stream}:{tick}"),
        priority: 4,
        reliability: 4,
        expiry_ms: Some(1_900_000_000_000),
        properties: vec![],
        body: format!("tick {tick}").into_bytes(),
        stream: Some((stream.to_string(), tick)),
    }
}

async fn create(b: &dyn Backend, name: &str) -> Box<dyn Store> {
    b.create(name, ME, UUID)
        .await
        .unwrap_or_else(|e| panic!("create store {name}: {e}"))
}

async fn reopen(b: &dyn Backend, name: &str, s: Box<dyn Store>) -> Box<dyn Store> {
    s.close().await.expect("close");
    drop(s);
    b.open(name, ME, UUID)
        .await
        .unwrap_or_else(|e| panic!("reopen store {name}: {e}"))
}

async fn commit(s: &dyn Store, ops: Vec<Op>) -> CommitOutcome {
    s.commit(ops).await.expect("commit")
}

/// Pages `dest` to the end in steps of `page`, returning every message.
async fn page_all(s: &dyn Store, dest: &str, page: usize) -> Vec<StoredMessage> {
    let mut out: Vec<StoredMessage> = Vec::new();
    let mut after = None;
    // Bounded: every round returns at least one message or ends; 10M messages is far beyond
    // any check here.
    for _ in 0..10_000_000 {
        let got = s.page(dest, after, page).await.expect("page");
        assert!(got.len() <= page);
        let Some(last) = got.last() else { break };
        after = Some((last.priority, last.seq));
        out.extend(got);
    }
    out
}

/// Runs every check of the suite, one after the other.
pub async fn run_all(b: &dyn Backend) {
    put_page_order_and_cursor(b).await;
    seq_increases_across_reopen(b).await;
    delete_move_set_count(b).await;
    failing_batch_fails_alone(b).await;
    atomicity(b).await;
    kv(b).await;
    by_stream(b).await;
    depth_and_destinations(b).await;
    incarnation_and_restore_state(b).await;
    identity_is_enforced(b).await;
    limits_are_enforced(b).await;
    closed_store_refuses(b).await;
    model_check(b, "model-fixed", &lcg_script(7, 300)).await;
}

/// 25_000 messages over 10 priorities, paged in 1_000s: delivery order, no dup, no gap.
pub async fn put_page_order_and_cursor(b: &dyn Backend) {
    let s = create(b, "order").await;
    let n: u64 = 25_000;
    let mut seqs = Vec::new();
    for chunk in 0..(n / 1_000) {
        let ops = (0..1_000u64)
            .map(|i| {
                let k = chunk * 1_000 + i;
                put("Q", ((k * 7) % 10) as u8, &k.to_le_bytes())
            })
            .collect();
        seqs.extend(commit(&*s, ops).await.assigned_seqs);
    }
    assert_eq!(seqs.len() as u64, n);
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs strictly increase"
    );
    assert_eq!(s.depth("Q").await.unwrap(), n);
    let got = page_all(&*s, "Q", 1_000).await;
    assert_eq!(got.len() as u64, n, "no gap, no dup");
    // Expected order: priority DESC, seq ASC.
    let mut expected: Vec<(u8, u64)> = seqs
        .iter()
        .enumerate()
        .map(|(k, seq)| (((k as u64 * 7) % 10) as u8, *seq))
        .collect();
    expected.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let actual: Vec<(u8, u64)> = got.iter().map(|m| (m.priority, m.seq)).collect();
    assert_eq!(actual, expected, "delivery order");
    // Bodies belong to their seqs, ids are system ids.
    let info = s.info().await.unwrap();
    for m in got.iter().take(50) {
        let k = seqs.iter().position(|x| *x == m.seq).unwrap() as u64;
        assert_eq!(m.body, k.to_le_bytes());
        assert_eq!(
            m.id,
            format!("{}:{}:{}", info.uuid, info.incarnation, m.seq)
        );
        assert_eq!(m.delivery_count, 0);
        assert_eq!(m.dest, "Q");
    }
    assert_eq!(info.messages, n);
    // A cursor past the end returns nothing; an unknown destination is empty.
    let last = got.last().unwrap();
    assert!(s
        .page("Q", Some((last.priority, last.seq)), 10)
        .await
        .unwrap()
        .is_empty());
    assert!(s.page("nope", None, 10).await.unwrap().is_empty());
    s.close().await.unwrap();
}

/// Seqs keep increasing after a restart, even when the highest message was deleted.
pub async fn seq_increases_across_reopen(b: &dyn Backend) {
    let s = create(b, "reopen").await;
    let a = commit(
        &*s,
        vec![put("Q", 4, b"a"), put("Q", 4, b"b"), put("Q", 4, b"c")],
    )
    .await;
    let top = *a.assigned_seqs.last().unwrap();
    commit(
        &*s,
        vec![Op::Delete {
            dest: "Q".into(),
            seq: top,
        }],
    )
    .await;
    let s = reopen(b, "reopen", s).await;
    let c = commit(&*s, vec![put("Q", 4, b"d")]).await;
    assert!(
        c.assigned_seqs[0] > top,
        "seq {} reused after reopen",
        c.assigned_seqs[0]
    );
    let got = page_all(&*s, "Q", 10).await;
    let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        vec![a.assigned_seqs[0], a.assigned_seqs[1], c.assigned_seqs[0]]
    );
    s.close().await.unwrap();
}

pub async fn delete_move_set_count(b: &dyn Backend) {
    let s = create(b, "dms").await;
    let seqs = commit(&*s, vec![put("Q", 4, b"x"), put("Q", 9, b"y")])
        .await
        .assigned_seqs;
    let (x, y) = (seqs[0], seqs[1]);
    commit(
        &*s,
        vec![Op::SetDeliveryCount {
            dest: "Q".into(),
            seq: x,
            count: 3,
        }],
    )
    .await;
    let got = s.page("Q", None, 10).await.unwrap();
    assert_eq!(got.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![y, x]);
    assert_eq!(got[1].delivery_count, 3);
    // Move keeps seq and everything else.
    commit(
        &*s,
        vec![Op::Move {
            from: "Q".into(),
            seq: x,
            to: "_SYSTEM.Exception".into(),
        }],
    )
    .await;
    assert_eq!(s.depth("Q").await.unwrap(), 1);
    assert_eq!(s.depth("_SYSTEM.Exception").await.unwrap(), 1);
    let moved = s.page("_SYSTEM.Exception", None, 10).await.unwrap();
    assert_eq!(moved.len(), 1);
    assert_eq!((moved[0].seq, moved[0].delivery_count), (x, 3));
    assert_eq!(moved[0].body, b"x");
    // Ops naming the wrong destination, or a gone message, fail.
    for op in [
        Op::Delete {
            dest: "Q".into(),
            seq: x,
        },
        Op::SetDeliveryCount {
            dest: "Q".into(),
            seq: x,
            count: 1,
        },
        Op::Move {
            from: "Q".into(),
            seq: x,
            to: "R".into(),
        },
        Op::Delete {
            dest: "Q".into(),
            seq: 999_999,
        },
    ] {
        let e = s
            .commit(vec![op.clone()])
            .await
            .expect_err("absent message");
        assert!(matches!(e, StoreError::NoSuchMessage { .. }), "{op:?}: {e}");
    }
    commit(
        &*s,
        vec![Op::Delete {
            dest: "Q".into(),
            seq: y,
        }],
    )
    .await;
    let e = s
        .commit(vec![Op::Delete {
            dest: "Q".into(),
            seq: y,
        }])
        .await;
    assert!(
        matches!(e, Err(StoreError::NoSuchMessage { seq, .. }) if seq == y),
        "double ack"
    );
    assert_eq!(s.depth("Q").await.unwrap(), 0);
    s.close().await.unwrap();
}

/// Concurrent batches, some deleting absent messages: the bad ones fail, every good one
/// commits (they share group commits, where the backend groups).
pub async fn failing_batch_fails_alone(b: &dyn Backend) {
    let s: Arc<dyn Store> = Arc::from(create(b, "alone").await);
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let ops = if i % 4 == 0 {
                vec![
                    put("Q", 4, b"doomed"),
                    Op::Delete {
                        dest: "Q".into(),
                        seq: 1_000_000 + i,
                    },
                ]
            } else {
                vec![put("Q", 4, &i.to_le_bytes())]
            };
            (i, s.commit(ops).await)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (i, r) = t.await.expect("task");
        if i % 4 == 0 {
            assert!(
                matches!(r, Err(StoreError::NoSuchMessage { .. })),
                "batch {i}: {r:?}"
            );
        } else {
            assert_eq!(r.expect("good batch commits").assigned_seqs.len(), 1);
            ok += 1;
        }
    }
    assert_eq!(s.depth("Q").await.unwrap(), ok);
    let got = page_all(&*s, "Q", 100).await;
    assert_eq!(got.len() as u64, ok);
    assert!(got.iter().all(|m| m.body != b"doomed"));
    s.close().await.unwrap();
}

/// A batch with a failing op leaves no trace of its other ops.
pub async fn atomicity(b: &dyn Backend) {
    let s = create(b, "atomic").await;
    let keep = commit(&*s, vec![put("Q", 4, b"keep")]).await.assigned_seqs[0];
    let e = s
        .commit(vec![
            put("Q", 4, b"ghost"),
            put("R", 4, b"ghost"),
            Op::SetKv {
                space: "sub".into(),
                key: "k".into(),
                value: b"v".to_vec(),
            },
            Op::SetDeliveryCount {
                dest: "Q".into(),
                seq: keep,
                count: 7,
            },
            Op::Move {
                from: "Q".into(),
                seq: keep,
                to: "X".into(),
            },
            Op::Delete {
                dest: "Q".into(),
                seq: 123_456,
            },
        ])
        .await
        .expect_err("the batch fails");
    assert!(matches!(e, StoreError::NoSuchMessage { .. }), "{e}");
    assert_eq!(s.depth("Q").await.unwrap(), 1);
    assert_eq!(s.depth("R").await.unwrap(), 0);
    assert_eq!(s.depth("X").await.unwrap(), 0);
    assert_eq!(s.kv_get("sub", "k").await.unwrap(), None);
    let got = s.page("Q", None, 10).await.unwrap();
    assert_eq!((got[0].seq, got[0].delivery_count), (keep, 0));
    assert_eq!(s.destinations().await.unwrap(), vec![("Q".to_string(), 1)]);
    let after = commit(&*s, vec![put("Q", 4, b"next")]).await.assigned_seqs[0];
    assert!(after > keep);
    s.close().await.unwrap();
}

pub async fn kv(b: &dyn Backend) {
    let s = create(b, "kv").await;
    assert_eq!(s.kv_get("stream", "a").await.unwrap(), None);
    assert!(s.kv_scan("stream").await.unwrap().is_empty());
    commit(
        &*s,
        vec![
            Op::SetKv {
                space: "stream".into(),
                key: "b".into(),
                value: b"2".to_vec(),
            },
            Op::SetKv {
                space: "stream".into(),
                key: "a".into(),
                value: b"1".to_vec(),
            },
            Op::SetKv {
                space: "xid".into(),
                key: "a".into(),
                value: vec![0, 255],
            },
        ],
    )
    .await;
    assert_eq!(s.kv_get("stream", "a").await.unwrap(), Some(b"1".to_vec()));
    assert_eq!(s.kv_get("xid", "a").await.unwrap(), Some(vec![0, 255]));
    commit(
        &*s,
        vec![Op::SetKv {
            space: "stream".into(),
            key: "a".into(),
            value: b"9".to_vec(),
        }],
    )
    .await;
    assert_eq!(
        s.kv_scan("stream").await.unwrap(),
        vec![
            ("a".to_string(), b"9".to_vec()),
            ("b".to_string(), b"2".to_vec())
        ]
    );
    commit(
        &*s,
        vec![Op::DeleteKv {
            space: "stream".into(),
            key: "a".into(),
        }],
    )
    .await;
    // Deleting an absent key is not an error.
    commit(
        &*s,
        vec![Op::DeleteKv {
            space: "stream".into(),
            key: "a".into(),
        }],
    )
    .await;
    assert_eq!(s.kv_get("stream", "a").await.unwrap(), None);
    assert_eq!(
        s.kv_scan("stream").await.unwrap(),
        vec![("b".to_string(), b"2".to_vec())]
    );
    // Survives a restart.
    let s = reopen(b, "kv", s).await;
    assert_eq!(s.kv_get("stream", "b").await.unwrap(), Some(b"2".to_vec()));
    assert_eq!(
        s.kv_scan("xid").await.unwrap(),
        vec![("a".to_string(), vec![0, 255])]
    );
    s.close().await.unwrap();
}

pub async fn by_stream(b: &dyn Backend) {
    let s = create(b, "stream").await;
    commit(
        &*s,
        vec![
            put_stream("_TQ.me2", "s1", 3),
            put_stream("_TQ.me2", "s2", 1),
        ],
    )
    .await;
    commit(&*s, vec![put_stream("_TQ.me2", "s1", 1)]).await;
    let two = commit(
        &*s,
        vec![put_stream("_TQ.me3", "s1", 2), put("Q", 4, b"plain")],
    )
    .await
    .assigned_seqs[0];
    let ticks = |v: Vec<StoredMessage>| -> Vec<u64> {
        v.iter().map(|m| m.stream.as_ref().unwrap().1).collect()
    };
    let all = s.by_stream("s1", 0, 100).await.unwrap();
    assert!(all.iter().all(|m| m.stream.as_ref().unwrap().0 == "s1"));
    assert_eq!(all[0].id, "foreign:s1:1");
    assert_eq!(all[0].expiry_ms, Some(1_900_000_000_000));
    assert_eq!(ticks(all), vec![1, 2, 3]);
    assert_eq!(ticks(s.by_stream("s1", 2, 100).await.unwrap()), vec![2, 3]);
    assert_eq!(ticks(s.by_stream("s1", 1, 1).await.unwrap()), vec![1]);
    assert_eq!(ticks(s.by_stream("s2", 0, 100).await.unwrap()), vec![1]);
    assert!(s.by_stream("s3", 0, 100).await.unwrap().is_empty());
    commit(
        &*s,
        vec![Op::Delete {
            dest: "_TQ.me3".into(),
            seq: two,
        }],
    )
    .await;
    assert_eq!(ticks(s.by_stream("s1", 0, 100).await.unwrap()), vec![1, 3]);
    let plain = s.page("Q", None, 10).await.unwrap();
    assert_eq!(plain[0].stream, None);
    s.close().await.unwrap();
}

pub async fn depth_and_destinations(b: &dyn Backend) {
    let s = create(b, "depth").await;
    assert!(s.destinations().await.unwrap().is_empty());
    assert_eq!(s.depth("A").await.unwrap(), 0);
    let seqs = commit(
        &*s,
        vec![put("B", 1, b""), put("A", 2, b""), put("B", 3, b"")],
    )
    .await
    .assigned_seqs;
    assert_eq!(
        s.destinations().await.unwrap(),
        vec![("A".to_string(), 1), ("B".to_string(), 2)]
    );
    commit(
        &*s,
        vec![Op::Delete {
            dest: "A".into(),
            seq: seqs[1],
        }],
    )
    .await;
    assert_eq!(s.destinations().await.unwrap(), vec![("B".to_string(), 2)]);
    assert_eq!(s.depth("A").await.unwrap(), 0);
    assert_eq!(s.depth("B").await.unwrap(), 2);
    assert_eq!(s.info().await.unwrap().messages, 2);
    s.close().await.unwrap();
}

pub async fn incarnation_and_restore_state(b: &dyn Backend) {
    let s = create(b, "incarnation").await;
    let info = s.info().await.unwrap();
    assert_eq!((info.me.as_str(), info.uuid.as_str()), (ME, UUID));
    assert_eq!(info.incarnation, 1);
    assert_eq!(info.restore_state, RestoreState::None);
    assert_eq!(info.schema_version, crate::SCHEMA_VERSION);
    assert!(!info.location.is_empty());
    // A start: at least the clock (unique even for a store copied back), restore state kept.
    let before_ms = crate::next_incarnation(0);
    let first = s.begin_incarnation(false).await.unwrap();
    assert!(first > 1 && first >= before_ms, "{first} < {before_ms}");
    assert_eq!(s.info().await.unwrap().incarnation, first);
    assert_eq!(s.info().await.unwrap().restore_state, RestoreState::None);
    // A FLUSH start: strictly later again.
    let second = s.begin_incarnation(true).await.unwrap();
    assert!(second > first);
    let seq = commit(&*s, vec![put("Q", 4, b"")]).await.assigned_seqs[0];
    let m = &s.page("Q", None, 1).await.unwrap()[0];
    assert_eq!(
        m.id,
        format!("{UUID}:{second}:{seq}"),
        "system ids carry the incarnation"
    );
    // The restore state moves in a commit, with the changes that justify it, and survives a
    // reopen; a failing batch leaves it as it was.
    commit(
        &*s,
        vec![
            Op::SetRestoreState(RestoreState::FlushPending),
            Op::SetKv {
                space: "streams.flush".into(),
                key: "pending".into(),
                value: b"{}".to_vec(),
            },
        ],
    )
    .await;
    assert_eq!(
        s.info().await.unwrap().restore_state,
        RestoreState::FlushPending
    );
    let bad = s
        .commit(vec![
            Op::SetRestoreState(RestoreState::None),
            Op::Delete {
                dest: "Q".into(),
                seq: 999_999,
            },
        ])
        .await;
    assert!(bad.is_err());
    let s = reopen(b, "incarnation", s).await;
    assert_eq!(s.info().await.unwrap().incarnation, second);
    assert_eq!(
        s.info().await.unwrap().restore_state,
        RestoreState::FlushPending
    );
    commit(&*s, vec![Op::SetRestoreState(RestoreState::None)]).await;
    assert_eq!(s.info().await.unwrap().restore_state, RestoreState::None);
    assert!(s.begin_incarnation(false).await.unwrap() > second);
    s.close().await.unwrap();
}

pub async fn identity_is_enforced(b: &dyn Backend) {
    let s = create(b, "identity").await;
    s.close().await.unwrap();
    drop(s);
    let other_uuid = "6f1c2a7e-0000-4000-8000-0000000000ff";
    match b.open("identity", "node2.server2-bus1", other_uuid).await {
        Err(e @ StoreError::WrongOwner { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains(ME) && text.contains(UUID) && text.contains(other_uuid),
                "{text}"
            );
        }
        Err(e) => panic!("wrong error for another ME: {e}"),
        Ok(_) => panic!("store opened for another ME"),
    }
    assert!(matches!(
        b.open("identity", ME, other_uuid).await,
        Err(StoreError::WrongOwner { .. })
    ));
    let s = b
        .open("identity", ME, UUID)
        .await
        .expect("its own ME opens it");
    s.close().await.unwrap();
}

pub async fn limits_are_enforced(b: &dyn Backend) {
    let s = create(b, "limits").await;
    let invalid = |r: Result<_, StoreError>| matches!(r, Err(StoreError::Invalid { .. }));
    assert!(invalid(
        s.page("Q", None, PAGE_LIMIT_MAX + 1).await.map(|_| ())
    ));
    assert!(invalid(s.page("Q", None, 0).await.map(|_| ())));
    assert!(invalid(
        s.by_stream("s", 0, PAGE_LIMIT_MAX + 1).await.map(|_| ())
    ));
    assert!(s.page("Q", None, PAGE_LIMIT_MAX).await.is_ok());
    assert!(invalid(s.commit(vec![]).await.map(|_| ())));
    assert!(invalid(s.commit(vec![put("Q", 10, b"")]).await.map(|_| ())));
    assert!(invalid(s.commit(vec![put("", 1, b"")]).await.map(|_| ())));
    assert!(invalid(
        s.commit(vec![Op::Move {
            from: "Q".into(),
            seq: 1,
            to: "Q".into()
        }])
        .await
        .map(|_| ())
    ));
    let too_many = (0..crate::BATCH_OPS_MAX + 1)
        .map(|_| put("Q", 1, b""))
        .collect();
    assert!(invalid(s.commit(too_many).await.map(|_| ())));
    assert_eq!(s.depth("Q").await.unwrap(), 0);
    s.close().await.unwrap();
}

pub async fn closed_store_refuses(b: &dyn Backend) {
    let s = create(b, "closed").await;
    s.close().await.unwrap();
    assert!(matches!(
        s.commit(vec![put("Q", 1, b"")]).await,
        Err(StoreError::Closed { .. })
    ));
    assert!(matches!(s.depth("Q").await, Err(StoreError::Closed { .. })));
    s.close().await.expect("closing twice is harmless");
}

// ---------------------------------------------------------------------------------------------
// Model check: random batches against a BTreeMap.

/// One step of a model-check script. Message references pick the `nth` (modulo the count)
/// message of a destination in the model, so any script is meaningful.
#[derive(Debug, Clone)]
pub enum ModelStep {
    Put {
        dest: u8,
        priority: u8,
    },
    Delete {
        dest: u8,
        nth: usize,
    },
    SetCount {
        dest: u8,
        nth: usize,
        count: u32,
    },
    Move {
        from: u8,
        nth: usize,
        to: u8,
    },
    /// Deletes a message that is not there: fails the whole batch.
    DeleteAbsent {
        dest: u8,
    },
}

const MODEL_DESTS: u8 = 3;

fn dest_name(d: u8) -> String {
    format!("D{}", d % MODEL_DESTS)
}

#[derive(Debug, Clone, PartialEq)]
struct ModelMsg {
    dest: String,
    priority: u8,
    count: u32,
    body: Vec<u8>,
}

/// A body that names its batch and op, in three sizes: empty, small and one large enough for
/// a backend to keep it apart from the row (SQLite's body log).
fn model_body(batch: usize, op: usize) -> Vec<u8> {
    let len = [0, 100, 700][(batch * 7 + op) % 3];
    (0..len).map(|i| (batch * 31 + op * 7 + i) as u8).collect()
}

/// Applies `batches` (each a list of steps committed as one batch) to a fresh store and to an
/// in-memory model, comparing depth, destinations and a full paging walk after every batch.
pub async fn model_check(b: &dyn Backend, name: &str, batches: &[Vec<ModelStep>]) {
    let s = create(b, name).await;
    // seq → message; BTreeMap order is seq order.
    let mut model: BTreeMap<u64, ModelMsg> = BTreeMap::new();
    for (bi, steps) in batches.iter().enumerate() {
        // Simulate on a copy; placeholders (seq = None) stand for this batch's Puts.
        let mut sim: Vec<(Option<u64>, ModelMsg)> =
            model.iter().map(|(s, m)| (Some(*s), m.clone())).collect();
        let mut ops = Vec::new();
        let mut fails = false;
        for step in steps {
            let nth_of = |sim: &Vec<(Option<u64>, ModelMsg)>, dest: &str, nth: usize| {
                let of: Vec<usize> = (0..sim.len())
                    .filter(|i| sim[*i].1.dest == dest && sim[*i].0.is_some())
                    .collect();
                if of.is_empty() {
                    None
                } else {
                    Some(of[nth % of.len()])
                }
            };
            match step {
                ModelStep::Put { dest, priority } => {
                    let p = priority % 10;
                    let body = model_body(bi, ops.len());
                    ops.push(put(&dest_name(*dest), p, &body));
                    sim.push((
                        None,
                        ModelMsg {
                            dest: dest_name(*dest),
                            priority: p,
                            count: 0,
                            body,
                        },
                    ));
                }
                ModelStep::Delete { dest, nth } => {
                    if let Some(i) = nth_of(&sim, &dest_name(*dest), *nth) {
                        ops.push(Op::Delete {
                            dest: dest_name(*dest),
                            seq: sim[i].0.unwrap(),
                        });
                        sim.remove(i);
                    }
                }
                ModelStep::SetCount { dest, nth, count } => {
                    if let Some(i) = nth_of(&sim, &dest_name(*dest), *nth) {
                        ops.push(Op::SetDeliveryCount {
                            dest: dest_name(*dest),
                            seq: sim[i].0.unwrap(),
                            count: *count,
                        });
                        sim[i].1.count = *count;
                    }
                }
                ModelStep::Move { from, nth, to } => {
                    if dest_name(*from) == dest_name(*to) {
                        continue;
                    }
                    if let Some(i) = nth_of(&sim, &dest_name(*from), *nth) {
                        ops.push(Op::Move {
                            from: dest_name(*from),
                            seq: sim[i].0.unwrap(),
                            to: dest_name(*to),
                        });
                        sim[i].1.dest = dest_name(*to);
                    }
                }
                ModelStep::DeleteAbsent { dest } => {
                    ops.push(Op::Delete {
                        dest: dest_name(*dest),
                        seq: u64::MAX >> 2,
                    });
                    fails = true;
                }
            }
        }
        if ops.is_empty() {
            continue;
        }
        let r = s.commit(ops).await;
        if fails {
            assert!(
                matches!(r, Err(StoreError::NoSuchMessage { .. })),
                "{name} batch {bi}: expected failure, got {r:?}"
            );
        } else {
            let seqs = r
                .unwrap_or_else(|e| panic!("{name} batch {bi}: {e}"))
                .assigned_seqs;
            let mut seqs = seqs.into_iter();
            model.clear();
            for (seq, m) in sim {
                let seq = seq.unwrap_or_else(|| seqs.next().expect("a seq per Put"));
                assert!(model.insert(seq, m).is_none(), "seq {seq} assigned twice");
            }
            assert!(seqs.next().is_none());
        }
        compare(&*s, &model, name, bi).await;
    }
    s.close().await.unwrap();
}

async fn compare(s: &dyn Store, model: &BTreeMap<u64, ModelMsg>, name: &str, bi: usize) {
    let mut want_dests: BTreeMap<String, u64> = BTreeMap::new();
    for m in model.values() {
        *want_dests.entry(m.dest.clone()).or_default() += 1;
    }
    let got_dests: BTreeMap<String, u64> = s.destinations().await.unwrap().into_iter().collect();
    assert_eq!(got_dests, want_dests, "{name} batch {bi}: destinations");
    for d in 0..MODEL_DESTS {
        let dest = dest_name(d);
        let mut want: Vec<(u8, u64, u32, Vec<u8>)> = model
            .iter()
            .filter(|(_, m)| m.dest == dest)
            .map(|(s, m)| (m.priority, *s, m.count, m.body.clone()))
            .collect();
        want.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        assert_eq!(
            s.depth(&dest).await.unwrap(),
            want.len() as u64,
            "{name} batch {bi}: depth of {dest}"
        );
        let got: Vec<(u8, u64, u32, Vec<u8>)> = page_all(s, &dest, 3)
            .await
            .into_iter()
            .map(|m| (m.priority, m.seq, m.delivery_count, m.body))
            .collect();
        assert_eq!(got, want, "{name} batch {bi}: page walk of {dest}");
    }
}

/// A deterministic pseudo-random script (linear congruential), for backends' `run_all`
/// without a property-testing dependency.
pub fn lcg_script(seed: u64, batches: usize) -> Vec<Vec<ModelStep>> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move |m: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % m
    };
    (0..batches)
        .map(|_| {
            let n = 1 + next(4) as usize;
            (0..n)
                .map(|_| match next(20) {
                    0..=8 => ModelStep::Put {
                        dest: next(3) as u8,
                        priority: next(10) as u8,
                    },
                    9..=12 => ModelStep::Delete {
                        dest: next(3) as u8,
                        nth: next(100) as usize,
                    },
                    13..=15 => ModelStep::SetCount {
                        dest: next(3) as u8,
                        nth: next(100) as usize,
                        count: next(5) as u32,
                    },
                    16..=18 => ModelStep::Move {
                        from: next(3) as u8,
                        nth: next(100) as usize,
                        to: next(3) as u8,
                    },
                    _ => ModelStep::DeleteAbsent {
                        dest: next(3) as u8,
                    },
                })
                .collect()
        })
        .collect()
}

//! A real full disk under the SQLite store: a small tmpfs mounted for the test (the tests run
//! as root here and in CI), filled with a filler file. The writer must refuse the commits that
//! do not fit with `DiskFull`, lose nothing it acknowledged, say so in its health, and commit
//! again by itself once the filler is gone.

use std::path::PathBuf;
use std::sync::Arc;

use keel_core::testfs::{fill, Tmpfs};
use keel_store::{Op, SqliteStore, Store, StoreError, StoreHealth};

const ME: &str = "node1.server1-bus1";
const UUID: &str = "6f1c2a7e-0000-4000-8000-000000000001";

fn put(body: &[u8]) -> Op {
    Op::Put {
        dest: "Q".into(),
        id: String::new(),
        priority: 4,
        reliability: 4,
        expiry_ms: None,
        properties: Vec::new(),
        body: body.to_vec(),
        stream: None,
    }
}

/// A body that says which message it is, large enough to go to the body log.
fn body(i: u64) -> Vec<u8> {
    let mut b = format!("message {i} ").into_bytes();
    b.resize(1_500, b'.');
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_full_disk_refuses_commits_then_they_resume_by_themselves() {
    let fs = Tmpfs::mount(8 * 1024 * 1024);
    let path: PathBuf = fs.path().join("db").join(format!("{ME}.sqlite"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let store = Arc::new(SqliteStore::create(&path, ME, UUID).unwrap());
    assert_eq!(store.health(), StoreHealth::Ok);
    let mut acked: Vec<(u64, u64)> = Vec::new(); // (seq, message number)
    let mut next = 0u64;
    for _ in 0..50 {
        let o = store.commit(vec![put(&body(next))]).await.unwrap();
        acked.push((o.assigned_seqs[0], next));
        next += 1;
    }
    let filler = fs.path().join("filler");
    assert!(fill(&filler) > 0);
    // Concurrent producers until the disk refuses them (bounded).
    let mut refused = 0;
    for _round in 0..2_000 {
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let s = store.clone();
            let n = next;
            next += 1;
            tasks.push(tokio::spawn(async move {
                (n, s.commit(vec![put(&body(n)), put(b"small")]).await)
            }));
        }
        for t in tasks {
            match t.await.unwrap() {
                (n, Ok(o)) => acked.push((o.assigned_seqs[0], n)),
                (_, Err(e)) => {
                    assert!(matches!(e, StoreError::DiskFull { .. }), "{e}");
                    refused += 1;
                }
            }
        }
        if refused >= 20 {
            break;
        }
    }
    assert!(refused >= 20, "the full disk refused commits");
    match store.health() {
        StoreHealth::DiskFull { .. } => {}
        other => panic!("health says {other:?}"),
    }
    // Still refused while full: the writer is alive and answers.
    let e = store.commit(vec![put(&body(next))]).await.unwrap_err();
    assert!(matches!(e, StoreError::DiskFull { .. }), "{e}");
    // Space returns: the next commits succeed without a reopen.
    std::fs::remove_file(&filler).unwrap();
    for _ in 0..20 {
        let o = store.commit(vec![put(&body(next))]).await.unwrap();
        acked.push((o.assigned_seqs[0], next));
        next += 1;
    }
    assert_eq!(store.health(), StoreHealth::Ok);
    // Every acknowledged message is there with its body, before and after a reopen.
    let check = |s: Arc<SqliteStore>, acked: Vec<(u64, u64)>| async move {
        let mut got = Vec::new();
        let mut after = None;
        loop {
            let page = s.page("Q", after, 1_000).await.unwrap();
            let Some(last) = page.last() else { break };
            after = Some((last.priority, last.seq));
            got.extend(page.into_iter().map(|m| (m.seq, m.body)));
        }
        for (seq, n) in &acked {
            let b = got.iter().find(|(s, _)| s == seq).map(|(_, b)| b.clone());
            assert_eq!(b, Some(body(*n)), "acknowledged message {n} (seq {seq})");
        }
    };
    check(store.clone(), acked.clone()).await;
    store.close().await.unwrap();
    drop(store);
    let store = Arc::new(SqliteStore::open(&path, ME, UUID).unwrap());
    check(store.clone(), acked).await;
    store.close().await.unwrap();
    keel_store::verify_file(&path, ME, UUID).unwrap();
}

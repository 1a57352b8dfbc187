//! The SQLite backend: the shared conformance suite, then what only a file-backed store has
//! (group-commit counting, durability under SIGKILL, corruption, backup and restore).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use keel_store::conformance::{self, Backend, ModelStep};
use keel_store::{
    read_info, restore_from, Op, RestoreState, SqliteStore, Store, StoreError, StoreFuture,
    StoreHealth, StoredMessage,
};
use proptest::prelude::*;

const ME: &str = "node1.server1-bus1";
const UUID: &str = "6f1c2a7e-0000-4000-8000-000000000001";
const OTHER_ME: &str = "node2.server2-bus1";
const OTHER_UUID: &str = "6f1c2a7e-0000-4000-8000-000000000002";

struct SqliteBackend {
    dir: tempfile::TempDir,
}

impl SqliteBackend {
    fn new() -> SqliteBackend {
        SqliteBackend {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sqlite"))
    }
}

impl Backend for SqliteBackend {
    fn create<'a>(
        &'a self,
        name: &'a str,
        me: &'a str,
        uuid: &'a str,
    ) -> StoreFuture<'a, Box<dyn Store>> {
        Box::pin(async move {
            SqliteStore::create(&self.path(name), me, uuid).map(|s| Box::new(s) as Box<dyn Store>)
        })
    }
    fn open<'a>(
        &'a self,
        name: &'a str,
        me: &'a str,
        uuid: &'a str,
    ) -> StoreFuture<'a, Box<dyn Store>> {
        Box::pin(async move {
            SqliteStore::open(&self.path(name), me, uuid).map(|s| Box::new(s) as Box<dyn Store>)
        })
    }
}

fn put(dest: &str, priority: u8, body: &[u8]) -> Op {
    conformance::put(dest, priority, body)
}

async fn page_all(s: &dyn Store, dest: &str) -> Vec<StoredMessage> {
    let mut out: Vec<StoredMessage> = Vec::new();
    let mut after = None;
    for _ in 0..1_000_000 {
        let got = s.page(dest, after, 1_000).await.unwrap();
        let Some(last) = got.last() else { break };
        after = Some((last.priority, last.seq));
        out.extend(got);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_suite() {
    let b = SqliteBackend::new();
    conformance::run_all(&b).await;
}

fn step_strategy() -> impl Strategy<Value = ModelStep> {
    prop_oneof![
        4 => (0u8..3, 0u8..10).prop_map(|(dest, priority)| ModelStep::Put { dest, priority }),
        2 => (0u8..3, 0usize..50).prop_map(|(dest, nth)| ModelStep::Delete { dest, nth }),
        1 => (0u8..3, 0usize..50, 0u32..6)
            .prop_map(|(dest, nth, count)| ModelStep::SetCount { dest, nth, count }),
        2 => (0u8..3, 0usize..50, 0u8..3).prop_map(|(from, nth, to)| ModelStep::Move { from, nth, to }),
        1 => (0u8..3).prop_map(|dest| ModelStep::DeleteAbsent { dest }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn model_check_random_batches(
        batches in prop::collection::vec(prop::collection::vec(step_strategy(), 1..5), 1..40)
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let b = SqliteBackend::new();
        rt.block_on(conformance::model_check(&b, "model", &batches));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_groups_concurrent_callers() {
    let b = SqliteBackend::new();
    let store = Arc::new(SqliteStore::create(&b.path("group"), ME, UUID).unwrap());
    let before = store.transactions_committed();
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            s.commit(vec![put("Q", 4, &i.to_le_bytes())]).await.unwrap()
        }));
    }
    let mut seqs = BTreeSet::new();
    for t in tasks {
        assert!(seqs.insert(t.await.unwrap().assigned_seqs[0]));
    }
    let txns = store.transactions_committed() - before;
    println!("64 concurrent commits took {txns} SQLite transactions");
    assert_eq!(seqs.len(), 64);
    assert!(
        txns < 64,
        "64 commits took {txns} transactions: no grouping"
    );
    assert!(txns >= 1);
    assert_eq!(store.depth("Q").await.unwrap(), 64);
    store.close().await.unwrap();
}

/// Child half of `durability_survives_sigkill`: commits puts from several tasks and prints each
/// acknowledged seq, until killed. Does nothing in a normal test run.
#[test]
fn durability_child() {
    let Ok(path) = std::env::var("KEEL_STORE_DURABILITY_CHILD") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let s = Arc::new(SqliteStore::open(Path::new(&path), ME, UUID).unwrap());
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                // Bounded; the parent kills us long before the end.
                for i in 0..1_000_000u64 {
                    // Odd tasks send bodies long enough for the body log.
                    let mut body = format!("{t}:{i}");
                    if t % 2 == 1 {
                        body.push_str(&".".repeat(600));
                    }
                    let seq = s
                        .commit(vec![put("Q", (i % 10) as u8, body.as_bytes())])
                        .await
                        .unwrap()
                        .assigned_seqs[0];
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ack {seq} {body}").unwrap();
                    out.flush().unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_survives_sigkill() {
    let b = SqliteBackend::new();
    let path = b.path("durable");
    SqliteStore::create(&path, ME, UUID)
        .unwrap()
        .close()
        .await
        .unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "durability_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("KEEL_STORE_DURABILITY_CHILD", &path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let acked = tokio::task::spawn_blocking(move || {
        let mut acked: Vec<(u64, String)> = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let Some(rest) = line.strip_prefix("ack ") else {
                continue;
            };
            let (seq, body) = rest.split_once(' ').unwrap();
            acked.push((seq.parse().unwrap(), body.to_string()));
            if acked.len() == 400 {
                // SIGKILL mid-run: no destructor, no clean close.
                child.kill().unwrap();
                break;
            }
        }
        child.wait().unwrap();
        acked
    })
    .await
    .unwrap();
    assert_eq!(
        acked.len(),
        400,
        "the child acknowledged fewer puts than expected"
    );
    let s = SqliteStore::open(&path, ME, UUID).unwrap();
    let got = page_all(&s, "Q").await;
    let by_seq: std::collections::BTreeMap<u64, Vec<u8>> =
        got.into_iter().map(|m| (m.seq, m.body)).collect();
    for (seq, body) in &acked {
        assert_eq!(
            by_seq.get(seq).map(|b| b.as_slice()),
            Some(body.as_bytes()),
            "acknowledged seq {seq} lost after SIGKILL"
        );
    }
    // New seqs never reuse anything the killed process handed out and persisted.
    let max = *by_seq.keys().max().unwrap();
    let next = s
        .commit(vec![put("Q", 1, b"after")])
        .await
        .unwrap()
        .assigned_seqs[0];
    assert!(next > max);
    assert!(
        acked.iter().any(|(_, b)| b.len() > 600),
        "some bodies were in the body log"
    );
    s.close().await.unwrap();
    // The body log holds what the rows say, checksums included.
    keel_store::verify_file(&path, ME, UUID).unwrap();
}

#[tokio::test]
async fn create_refuses_existing_and_open_refuses_missing() {
    let b = SqliteBackend::new();
    let path = b.path("one");
    let s = SqliteStore::create(&path, ME, UUID).unwrap();
    s.close().await.unwrap();
    assert!(matches!(
        SqliteStore::create(&path, ME, UUID),
        Err(StoreError::AlreadyExists { .. })
    ));
    assert!(matches!(
        SqliteStore::open(&b.path("missing"), ME, UUID),
        Err(StoreError::Missing { .. })
    ));
    // Stamped with the ME: another ME is told whose store it is and what to do.
    let e = SqliteStore::open(&path, OTHER_ME, OTHER_UUID).unwrap_err();
    let text = e.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(
        text.contains(&format!(
            "belongs to messaging engine {ME} (uuid {UUID}), not {OTHER_ME} (uuid {OTHER_UUID})"
        )),
        "{text}"
    );
    assert!(
        text.contains("point node2.server2-bus1 at its own store"),
        "{text}"
    );
}

#[test]
fn sqlite_path_lives_in_databases() {
    let layout = keel_core::Layout::new("/p");
    assert_eq!(
        keel_store::sqlite_path(&layout, "node1.server1-bus1"),
        PathBuf::from("/p/databases/node1.server1-bus1.sqlite")
    );
}

fn assert_corrupt(path: &Path) {
    // The full check finds any damage.
    assert!(
        matches!(
            keel_store::verify_file(path, ME, UUID),
            Err(StoreError::Corrupt { .. })
        ),
        "verify_file must find the damage"
    );
    match SqliteStore::open(path, ME, UUID) {
        Err(e @ StoreError::Corrupt { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(text.contains("restore"), "{text}");
        }
        Err(e) => panic!("expected Corrupt, got: {e}"),
        Ok(_) => panic!("a corrupt store opened"),
    }
}

#[tokio::test]
async fn corrupt_files_are_detected() {
    let b = SqliteBackend::new();
    // Not a database at all.
    let garbage = b.path("garbage");
    std::fs::write(&garbage, vec![0x5a; 64 * 1024]).unwrap();
    assert_corrupt(&garbage);
    assert!(matches!(
        read_info(&garbage),
        Err(StoreError::Corrupt { .. })
    ));
    // A database that is not a Keel store.
    let foreign = b.path("foreign");
    rusqlite::Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    assert_corrupt(&foreign);
    // A real store with garbage written over its table pages.
    let path = b.path("damaged");
    let s = SqliteStore::create(&path, ME, UUID).unwrap();
    for _ in 0..4 {
        let ops = (0..500).map(|i| put("Q", 4, &[i as u8; 200])).collect();
        s.commit(ops).await.unwrap();
    }
    s.close().await.unwrap();
    drop(s);
    assert!(
        !Path::new(&format!("{}-wal", path.display())).exists(),
        "clean close checkpoints"
    );
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(len > 16 * 4096);
    // The page size is in the file header (bytes 16-17, big endian).
    let header = std::fs::read(&path).unwrap();
    let page_bytes = u64::from(u16::from_be_bytes([header[16], header[17]]));
    assert!(len > 5 * page_bytes, "at least six pages");
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for page in [1u64, 2, 3, 5] {
        // Over the cell pointer array, just after a b-tree page's 8-byte header: pointers
        // of 0xa5a5 point past any page, which the checks must notice.
        f.seek(SeekFrom::Start(page * page_bytes + 8)).unwrap();
        f.write_all(&[0xa5; 1500]).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    // Open checks the header, schema and identity, not every page (that would make restart
    // time grow with the store): damage elsewhere is found by the full check, and by the
    // first read of the damaged pages.
    assert!(matches!(
        keel_store::verify_file(&path, ME, UUID),
        Err(StoreError::Corrupt { .. })
    ));
    match SqliteStore::open(&path, ME, UUID) {
        Err(e) => assert!(matches!(e, StoreError::Corrupt { .. }), "{e}"),
        Ok(s) => {
            let mut after = None;
            let mut found = None;
            for _ in 0..100 {
                match s.page("Q", after, 100).await {
                    Ok(p) if p.is_empty() => break,
                    Ok(p) => after = p.last().map(|m| (m.priority, m.seq)),
                    Err(e) => {
                        found = Some(e);
                        break;
                    }
                }
            }
            let e = found.expect("reading the damaged pages reports corruption");
            assert!(
                matches!(e, StoreError::Corrupt { .. }) && e.to_string().contains("restore"),
                "{e}"
            );
        }
    }
}

#[tokio::test]
async fn newer_schema_is_refused() {
    let b = SqliteBackend::new();
    let path = b.path("newer");
    SqliteStore::create(&path, ME, UUID)
        .unwrap()
        .close()
        .await
        .unwrap();
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE meta SET value = '99' WHERE key = 'schema_version'",
            [],
        )
        .unwrap();
    let e = SqliteStore::open(&path, ME, UUID).unwrap_err();
    assert!(
        matches!(e, StoreError::SchemaTooNew { found: 99, .. }),
        "{e}"
    );
    assert!(matches!(
        read_info(&path),
        Err(StoreError::SchemaTooNew { .. })
    ));
}

#[tokio::test]
async fn read_info_works_stopped_and_running() {
    let b = SqliteBackend::new();
    let path = b.path("info");
    let s = SqliteStore::create(&path, ME, UUID).unwrap();
    s.commit(vec![put("Q", 1, b"a"), put("R", 1, b"b")])
        .await
        .unwrap();
    let running = read_info(&path).unwrap();
    assert_eq!(running.messages, 2);
    assert_eq!(running, s.info().await.unwrap());
    s.close().await.unwrap();
    drop(s);
    let stopped = read_info(&path).unwrap();
    assert_eq!(stopped.me, ME);
    assert_eq!(stopped.uuid, UUID);
    assert_eq!(stopped.backend, "sqlite");
    assert_eq!(stopped.location, path.display().to_string());
    assert_eq!(stopped.restore_state, RestoreState::None);
    assert_eq!(stopped.messages, 2);
    assert_eq!(stopped.incarnation, 1);
    assert!(matches!(
        read_info(&b.path("nope")),
        Err(StoreError::Missing { .. })
    ));
}

/// Preloads `n` messages of `body_bytes` each on `Q`; returns their seqs.
async fn preload(s: &SqliteStore, n: usize, body_bytes: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    for chunk in 0..n.div_ceil(1_000) {
        let k = (n - chunk * 1_000).min(1_000);
        let ops = (0..k)
            .map(|i| put("Q", (i % 10) as u8, &vec![i as u8; body_bytes]))
            .collect();
        seqs.extend(s.commit(ops).await.unwrap().assigned_seqs);
    }
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_while_writing_then_restore() {
    let b = SqliteBackend::new();
    let path = b.path("live");
    let store = Arc::new(SqliteStore::create(&path, ME, UUID).unwrap());
    let mut acked: Vec<u64> = preload(&store, 20_000, 1_000).await;
    let acked_live = Arc::new(Mutex::new(Vec::<u64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (s, acked_live, stop) = (store.clone(), acked_live.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && i < 1_000_000 {
                let ops = vec![put("W", 4, &i.to_le_bytes()), put("Q", 9, b"q")];
                let seqs = s.commit(ops).await.unwrap().assigned_seqs;
                acked_live.lock().unwrap().extend(seqs);
                i += 1;
            }
            i
        })
    };
    // Let the writer get going, then take the backup while it runs.
    while acked_live.lock().unwrap().len() < 200 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    acked.extend(acked_live.lock().unwrap().iter().copied());
    let target = b.dir.path().join("backups").join("live.backup");
    let (manifest, steps, last) = {
        let (s, target) = (store.clone(), target.clone());
        tokio::task::spawn_blocking(move || {
            let mut steps = 0u64;
            let mut last = (0, 0);
            let m = s
                .backup_to(&target, &mut |done, total| {
                    steps += 1;
                    last = (done, total);
                })
                .unwrap();
            (m, steps, last)
        })
        .await
        .unwrap()
    };
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.await.unwrap();
    assert!(rounds > 0);
    assert!(steps >= 2, "the backup ran in steps ({steps})");
    assert_eq!(last.0, last.1, "progress ends at total");
    assert!(manifest.messages >= acked.len() as u64);
    assert_eq!((manifest.me.as_str(), manifest.uuid.as_str()), (ME, UUID));
    assert_eq!(manifest.bytes, std::fs::metadata(&target).unwrap().len());
    let mpath = PathBuf::from(format!("{}.manifest.json", target.display()));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    for key in [
        "me",
        "uuid",
        "created_at",
        "bytes",
        "crc32c",
        "schema_version",
        "incarnation",
        "messages",
    ] {
        assert!(json.get(key).is_some(), "manifest lacks {key}");
    }
    // A second backup to the same target is refused.
    assert!(matches!(
        store.backup_to(&target, &mut |_, _| {}),
        Err(StoreError::TargetExists { .. })
    ));
    let live_total = store.info().await.unwrap().messages;
    store.close().await.unwrap();

    // Restore into a new path (another machine, or after losing the disk).
    let restored_path = b.dir.path().join("elsewhere").join("live.sqlite");
    let report = restore_from(&target, &restored_path, ME, UUID).unwrap();
    assert_eq!(report.messages, manifest.messages);
    assert_eq!(report.from_created_at, manifest.created_at);
    assert_eq!(
        read_info(&restored_path).unwrap().restore_state,
        RestoreState::Restored
    );
    assert!(
        !bodies_dir(&restored_path).exists(),
        "no body log came with the restore"
    );
    let r = SqliteStore::open(&restored_path, ME, UUID).unwrap();
    let info = r.info().await.unwrap();
    assert_eq!(info.restore_state, RestoreState::Restored);
    assert_eq!(info.messages, manifest.messages);
    assert!(info.messages <= live_total);
    // The backup is one file: its bodies (1 000 bytes each, in the body log of the live
    // store) came along into their rows.
    let q = page_all(&r, "Q").await;
    assert!(q.iter().all(
        |m| m.body == b"q" || (m.body.len() == 1_000 && m.body.iter().all(|&x| x == m.body[0]))
    ));
    let mut have: BTreeSet<u64> = q.iter().map(|m| m.seq).collect();
    have.extend(page_all(&r, "W").await.iter().map(|m| m.seq));
    for seq in &acked {
        assert!(
            have.contains(seq),
            "seq {seq}, acknowledged before the backup, is missing"
        );
    }
    // A forced normal start keeps the mark; a FLUSH start clears it; each moves to a new
    // incarnation.
    let forced = r.begin_incarnation(false).await.unwrap();
    assert!(forced > info.incarnation);
    assert_eq!(
        r.info().await.unwrap().restore_state,
        RestoreState::Restored
    );
    assert!(r.begin_incarnation(true).await.unwrap() > forced);
    assert_eq!(r.info().await.unwrap().restore_state, RestoreState::None);
    r.close().await.unwrap();
}

#[tokio::test]
async fn restore_replaces_a_live_store_and_its_wal() {
    let b = SqliteBackend::new();
    let path = b.path("swap");
    let s = SqliteStore::create(&path, ME, UUID).unwrap();
    let before = s
        .commit(vec![put("Q", 4, b"before")])
        .await
        .unwrap()
        .assigned_seqs[0];
    let target = b.dir.path().join("swap.backup");
    s.backup_to(&target, &mut |_, _| {}).unwrap();
    s.commit(vec![put("Q", 4, b"after")]).await.unwrap();
    s.close().await.unwrap();
    drop(s);
    // Leave a stale WAL beside the store, as a crashed ME would: it must not be replayed.
    std::fs::write(format!("{}-wal", path.display()), vec![7u8; 8192]).unwrap();
    restore_from(&target, &path, ME, UUID).unwrap();
    assert!(!Path::new(&format!("{}-wal", path.display())).exists());
    let s = SqliteStore::open(&path, ME, UUID).unwrap();
    let got = page_all(&s, "Q").await;
    assert_eq!(got.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![before]);
    assert_eq!(
        s.info().await.unwrap().restore_state,
        RestoreState::Restored
    );
    s.close().await.unwrap();
}

fn snapshot(path: &Path) -> (Vec<u8>, bool) {
    (
        std::fs::read(path).unwrap(),
        Path::new(&format!("{}-wal", path.display())).exists(),
    )
}

#[tokio::test]
async fn restore_refuses_foreign_and_damaged_backups() {
    let b = SqliteBackend::new();
    // ME 1 and its backup.
    let mine = SqliteStore::create(&b.path("mine"), ME, UUID).unwrap();
    preload(&mine, 3_000, 100).await;
    let backup = b.dir.path().join("mine.backup");
    mine.backup_to(&backup, &mut |_, _| {}).unwrap();
    mine.close().await.unwrap();
    // ME 2, stopped, with its own messages.
    let theirs_path = b.path("theirs");
    let theirs = SqliteStore::create(&theirs_path, OTHER_ME, OTHER_UUID).unwrap();
    theirs.commit(vec![put("Q", 1, b"theirs")]).await.unwrap();
    theirs.close().await.unwrap();
    drop(theirs);
    let original = snapshot(&theirs_path);

    // Another ME's backup.
    let e = restore_from(&backup, &theirs_path, OTHER_ME, OTHER_UUID).unwrap_err();
    assert!(matches!(e, StoreError::ForeignBackup { .. }), "{e}");
    assert!(e.to_string().contains("nothing was restored"), "{e}");
    assert_eq!(snapshot(&theirs_path), original);

    // The right ME, but a truncated copy, then a bit-flipped copy (same manifest).
    let bytes = std::fs::read(&backup).unwrap();
    let manifest = std::fs::read(format!("{}.manifest.json", backup.display())).unwrap();
    let damaged = b.dir.path().join("damaged.backup");
    let damaged_manifest = format!("{}.manifest.json", damaged.display());
    std::fs::write(&damaged_manifest, &manifest).unwrap();
    let target_path = b.path("mine");
    let mine_original = snapshot(&target_path);
    std::fs::write(&damaged, &bytes[..bytes.len() / 2]).unwrap();
    let e = restore_from(&damaged, &target_path, ME, UUID).unwrap_err();
    assert!(matches!(e, StoreError::BackupDamaged { .. }), "{e}");
    assert_eq!(snapshot(&target_path), mine_original);
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 3] ^= 0x10;
    std::fs::write(&damaged, &flipped).unwrap();
    let e = restore_from(&damaged, &target_path, ME, UUID).unwrap_err();
    assert!(matches!(e, StoreError::BackupDamaged { .. }), "{e}");
    assert!(e.to_string().contains("CRC-32C"), "{e}");
    assert_eq!(snapshot(&target_path), mine_original);
    // A missing manifest.
    std::fs::remove_file(&damaged_manifest).unwrap();
    std::fs::write(&damaged, &bytes).unwrap();
    let e = restore_from(&damaged, &target_path, ME, UUID).unwrap_err();
    assert!(matches!(e, StoreError::BackupDamaged { .. }), "{e}");
    assert_eq!(snapshot(&target_path), mine_original);
    // No temp files left beside the store.
    let leftovers: Vec<_> = std::fs::read_dir(b.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // And the intact backup still restores.
    restore_from(&backup, &target_path, ME, UUID).unwrap();
    assert_eq!(read_info(&target_path).unwrap().messages, 3_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_full_fails_the_commit_and_loses_nothing_acknowledged() {
    let b = SqliteBackend::new();
    let path = b.path("full");
    let store = Arc::new(SqliteStore::create(&path, ME, UUID).unwrap());
    let mut acked = preload(&store, 100, 100).await;
    let pages = std::fs::metadata(&path).unwrap().len() / 4096 + 8;
    store.simulate_disk_full_at_pages(pages).await.unwrap();
    // Producers keep sending until the "disk" is full; concurrent batches in the failing
    // group all get DiskFull, none is half-applied.
    let mut full = None;
    for round in 0..1_000 {
        let mut tasks = Vec::new();
        for t in 0..4u8 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.commit(vec![
                    put("Q", t, &[round as u8; 2_000]),
                    put("R", 1, b"pair"),
                ])
                .await
            }));
        }
        for task in tasks {
            match task.await.unwrap() {
                Ok(o) => acked.push(o.assigned_seqs[0]),
                Err(e) => {
                    assert!(matches!(e, StoreError::DiskFull { .. }), "{e}");
                    full = Some(e);
                }
            }
        }
        if full.is_some() {
            break;
        }
    }
    let e = full.expect("the simulated disk filled up");
    assert!(matches!(e, StoreError::DiskFull { .. }), "{e}");
    // The store says so itself, and still answers: a refused commit does not end the writer.
    match store.health() {
        StoreHealth::DiskFull {
            path: p, refused, ..
        } => {
            // The database or its body log beside it, whichever write found the disk full.
            assert!(p.starts_with(path.parent().unwrap()), "{}", p.display());
            assert!(refused >= 1);
        }
        other => panic!("health says {other}"),
    }
    let again = store
        .commit(vec![put("Q", 1, &[9; 2_000])])
        .await
        .unwrap_err();
    assert!(matches!(again, StoreError::DiskFull { .. }), "{again}");
    let text = e.to_string();
    assert!(
        text.contains(&path.display().to_string()) && text.contains(ME),
        "{text}"
    );
    assert!(text.contains("nothing acknowledged is lost"), "{text}");
    // Every acknowledged message is there, and each Q put has its R pair.
    let q: BTreeSet<u64> = page_all(&*store, "Q").await.iter().map(|m| m.seq).collect();
    assert!(acked.iter().all(|s| q.contains(s)));
    assert_eq!(
        store.depth("R").await.unwrap() + 100,
        store.depth("Q").await.unwrap()
    );
    // Space comes back: commits work again, and the health clears by itself.
    store.simulate_disk_full_at_pages(1 << 30).await.unwrap();
    store.commit(vec![put("Q", 1, b"again")]).await.unwrap();
    assert_eq!(store.health(), StoreHealth::Ok, "{}", store.health());
    store.close().await.unwrap();
}

/// A commit whose fsync failed may or may not be on disk: the store takes no more work, says
/// so (health, and an error naming the remedy), keeps answering reads, and a reopen (what
/// the remedy asks) brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_fails_the_store_visibly_until_it_is_reopened() {
    let b = SqliteBackend::new();
    let path = b.path("fsync");
    let store = SqliteStore::create(&path, ME, UUID).unwrap();
    let kept = store.commit(vec![put("Q", 4, b"kept")]).await.unwrap();
    store.fail_next_fsync().await.unwrap();
    let e = store
        .commit(vec![put("Q", 4, b"in doubt")])
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Failed { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("fsync") && text.contains(&format!("keel me stop {ME}")),
        "{text}"
    );
    match store.health() {
        StoreHealth::Failed { reason, .. } => assert!(reason.contains("fsync"), "{reason}"),
        other => panic!("health says {other}"),
    }
    // Every later change is refused the same way, also one that would fit.
    for _ in 0..3 {
        let e = store.commit(vec![put("Q", 4, b"later")]).await.unwrap_err();
        assert!(matches!(e, StoreError::Failed { .. }), "{e}");
    }
    let e = store.begin_incarnation(false).await.unwrap_err();
    assert!(matches!(e, StoreError::Failed { .. }), "{e}");
    // Reads still answer.
    assert_eq!(store.depth("Q").await.unwrap(), 1);
    store.close().await.unwrap();
    drop(store);
    let store = SqliteStore::open(&path, ME, UUID).unwrap();
    assert_eq!(store.health(), StoreHealth::Ok);
    let seqs: Vec<u64> = page_all(&store, "Q").await.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, kept.assigned_seqs);
    store.commit(vec![put("Q", 4, b"after")]).await.unwrap();
    store.close().await.unwrap();
}

/// A writer thread that dies (a broken invariant) leaves a store that says it failed and why,
/// not one that looks open and answers "closed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_panics_fails_the_store_visibly() {
    let b = SqliteBackend::new();
    let path = b.path("panic");
    let store = SqliteStore::create(&path, ME, UUID).unwrap();
    store.commit(vec![put("Q", 4, b"kept")]).await.unwrap();
    store.panic_writer().await;
    // The panic is asynchronous to this task: the first commit after it may still be queued
    // behind it (then its reply is dropped) or come after (then it is refused up front).
    for _ in 0..2 {
        let e = store.commit(vec![put("Q", 4, b"lost")]).await.unwrap_err();
        assert!(matches!(e, StoreError::Failed { .. }), "{e}");
        assert!(e.to_string().contains("writer thread stopped"), "{e}");
    }
    assert_eq!(store.health().as_str(), "failed");
    store.close().await.unwrap();
    drop(store);
    // The writer's end released the lock: the store opens again.
    let store = SqliteStore::open(&path, ME, UUID).unwrap();
    assert_eq!(store.depth("Q").await.unwrap(), 1);
    store.close().await.unwrap();
}

/// Failing batches share a group with good ones: the writer is held up by another connection's
/// write lock while 64 batches queue, so they are committed in (nearly) one group; each failing
/// batch fails alone and every good one commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_batches_fail_alone_inside_one_group() {
    let b = SqliteBackend::new();
    let path = b.path("shared-group");
    let store = Arc::new(SqliteStore::create(&path, ME, UUID).unwrap());
    let keep = store
        .commit(vec![put("Q", 1, b"keep")])
        .await
        .unwrap()
        .assigned_seqs[0];
    let before = store.transactions_committed();
    // Another connection takes the write lock: the writer waits (busy timeout) on its first
    // group while the other batches pile up behind it.
    let blocker = rusqlite::Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let ops = if i % 4 == 1 {
                vec![
                    put("Q", 4, b"doomed"),
                    Op::SetKv {
                        space: "s".into(),
                        key: format!("doomed{i}"),
                        value: vec![1],
                    },
                    Op::Delete {
                        dest: "Q".into(),
                        seq: 9_000_000 + i,
                    },
                ]
            } else {
                vec![
                    put("Q", 4, &i.to_le_bytes()),
                    Op::SetKv {
                        space: "s".into(),
                        key: format!("good{i:02}"),
                        value: vec![2],
                    },
                ]
            };
            (i, s.commit(ops).await)
        }));
    }
    // Give every task time to queue; the assertion below does not depend on this timing.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    blocker.execute_batch("COMMIT").unwrap();
    drop(blocker);
    let mut good = 0;
    for t in tasks {
        let (i, r) = t.await.unwrap();
        if i % 4 == 1 {
            assert!(
                matches!(r, Err(StoreError::NoSuchMessage { .. })),
                "batch {i}: {r:?}"
            );
        } else {
            r.unwrap_or_else(|e| panic!("good batch {i} failed: {e}"));
            good += 1;
        }
    }
    let txns = store.transactions_committed() - before;
    println!("64 batches (16 failing) took {txns} SQLite transactions");
    assert!(
        txns < 16,
        "{txns} transactions: the failing batches did not share groups"
    );
    assert_eq!(store.depth("Q").await.unwrap(), good + 1);
    let kv = store.kv_scan("s").await.unwrap();
    assert_eq!(kv.len() as u64, good);
    assert!(kv.iter().all(|(k, _)| k.starts_with("good")));
    let q = page_all(&*store, "Q").await;
    assert!(q.iter().any(|m| m.seq == keep));
    assert!(q.iter().all(|m| m.body != b"doomed"));
    store.close().await.unwrap();
}

#[tokio::test]
async fn one_writer_per_store_and_no_restore_under_a_running_me() {
    let b = SqliteBackend::new();
    let path = b.path("busy");
    let s = SqliteStore::create(&path, ME, UUID).unwrap();
    s.commit(vec![put("Q", 1, b"a")]).await.unwrap();
    let target = b.dir.path().join("busy.backup");
    s.backup_to(&target, &mut |_, _| {}).unwrap();
    s.commit(vec![put("Q", 1, b"b")]).await.unwrap();
    let e = SqliteStore::open(&path, ME, UUID).unwrap_err();
    assert!(matches!(e, StoreError::InUse { .. }), "{e}");
    assert!(e.to_string().contains("stop the messaging engine"), "{e}");
    let e = restore_from(&target, &path, ME, UUID).unwrap_err();
    assert!(matches!(e, StoreError::InUse { .. }), "{e}");
    // The running store did not notice.
    assert_eq!(s.depth("Q").await.unwrap(), 2);
    s.close().await.unwrap();
    // Closed: both work (close releases the lock before it returns).
    let s = SqliteStore::open(&path, ME, UUID).unwrap();
    s.close().await.unwrap();
    drop(s);
    restore_from(&target, &path, ME, UUID).unwrap();
    assert_eq!(read_info(&path).unwrap().messages, 1);
}

fn bodies_dir(store: &Path) -> PathBuf {
    PathBuf::from(format!("{}-bodies", store.display()))
}

/// Every message of `dest` as (seq, body), in delivery order.
async fn seqs_and_bodies(s: &dyn Store, dest: &str) -> Vec<(u64, Vec<u8>)> {
    page_all(s, dest)
        .await
        .into_iter()
        .map(|m| (m.seq, m.body))
        .collect()
}

/// A 1 KiB-ish body that names its message, so a body read from the wrong place shows.
fn named_body(i: u64, len: usize) -> Vec<u8> {
    let mut b: Vec<u8> = (0..len).map(|k| (i as usize * 13 + k) as u8).collect();
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

/// Bodies over the inline limit live in the body log: they read back the same (also after a
/// reopen), segments roll at their size, a segment whose messages are all gone is unlinked,
/// and a file no row points into (an append whose transaction never committed) is removed
/// at the next open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn body_log_reads_back_rolls_and_frees_dead_segments() {
    let b = SqliteBackend::new();
    let path = b.path("log");
    let s = SqliteStore::create(&path, ME, UUID).unwrap();
    s.set_segment_bytes_max(64 * 1024).await.unwrap();
    // Mostly logged, every fifth one small enough to stay in its row.
    let body_len = |i: u64| {
        if i.is_multiple_of(5) {
            64
        } else {
            1_000 + (i as usize % 300)
        }
    };
    let mut want = Vec::new();
    for c in 0..30u64 {
        let ops = (0..20u64)
            .map(|k| {
                let i = c * 20 + k;
                put("Q", 4, &named_body(i, body_len(i)))
            })
            .collect();
        let seqs = s.commit(ops).await.unwrap().assigned_seqs;
        for (k, seq) in seqs.into_iter().enumerate() {
            let i = c * 20 + k as u64;
            want.push((seq, named_body(i, body_len(i))));
        }
    }
    assert_eq!(seqs_and_bodies(&s, "Q").await, want);
    let segments = s.body_log_segments();
    assert!(segments.len() >= 5, "segments rolled: {segments:?}");
    // Consume the first two thirds: their segments die and go.
    let gone = 400;
    for chunk in want[..gone].chunks(100) {
        let ops = chunk
            .iter()
            .map(|(seq, _)| Op::Delete {
                dest: "Q".into(),
                seq: *seq,
            })
            .collect();
        s.commit(ops).await.unwrap();
    }
    let after = s.body_log_segments();
    assert!(
        after.len() < segments.len() && after[0] > segments[0],
        "dead segments unlinked: {segments:?} -> {after:?}"
    );
    s.close().await.unwrap();
    // An orphan (bytes of a transaction that never committed) is removed at open.
    let orphan = bodies_dir(&path).join("000999999999.seg");
    std::fs::write(&orphan, [7u8; 100]).unwrap();
    let s = SqliteStore::open(&path, ME, UUID).unwrap();
    assert!(!orphan.exists(), "the orphan segment was removed");
    assert_eq!(seqs_and_bodies(&s, "Q").await, want[gone..].to_vec());
    s.close().await.unwrap();
}

/// A few long-lived messages among many consumed ones would keep every segment alive; once
/// the dead bytes outweigh the live ones, compaction moves the stragglers into their rows and
/// the segments go, with every body intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compaction_frees_segments_held_by_a_few_messages() {
    let b = SqliteBackend::new();
    let path = b.path("compact");
    let s = SqliteStore::create(&path, ME, UUID).unwrap();
    s.set_segment_bytes_max(32 * 1024).await.unwrap();
    let mut keep = Vec::new();
    let mut churn = Vec::new();
    for c in 0..40u64 {
        let ops: Vec<Op> = (0..10u64)
            .map(|k| {
                let i = c * 10 + k;
                put(
                    if k == 0 { "KEEP" } else { "CHURN" },
                    4,
                    &named_body(i, 1_000),
                )
            })
            .collect();
        let seqs = s.commit(ops).await.unwrap().assigned_seqs;
        keep.push((seqs[0], named_body(c * 10, 1_000)));
        churn.extend_from_slice(&seqs[1..]);
    }
    let before = s.body_log_segments();
    assert!(before.len() >= 10, "{before:?}");
    // Consume every CHURN message, one commit each: enough group commits for the writer
    // to look at compaction several times.
    for seq in churn {
        s.commit(vec![Op::Delete {
            dest: "CHURN".into(),
            seq,
        }])
        .await
        .unwrap();
    }
    let after = s.body_log_segments();
    assert!(
        after.len() * 2 < before.len(),
        "compaction freed segments: {} -> {} ({after:?})",
        before.len(),
        after.len()
    );
    assert_eq!(seqs_and_bodies(&s, "KEEP").await, keep);
    s.close().await.unwrap();
    let s = SqliteStore::open(&path, ME, UUID).unwrap();
    assert_eq!(page_all(&s, "KEEP").await.len(), keep.len());
    s.close().await.unwrap();
}

/// A damaged or missing body log is corruption of the store, said as such: a flipped byte
/// fails the read and `verify`, a missing segment stops the open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_or_missing_body_log_is_corruption() {
    let b = SqliteBackend::new();
    let path = b.path("damaged");
    let s = SqliteStore::create(&path, ME, UUID).unwrap();
    s.commit(
        (0..10)
            .map(|i| put("Q", 4, &named_body(i, 1_000)))
            .collect(),
    )
    .await
    .unwrap();
    let segs = s.body_log_segments();
    s.close().await.unwrap();
    keel_store::verify_file(&path, ME, UUID).unwrap();
    let seg = bodies_dir(&path).join(format!("{:012}.seg", segs[0]));
    let mut f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.seek(SeekFrom::Start(2_500)).unwrap();
    f.write_all(&[0xEE]).unwrap();
    drop(f);
    let e = keel_store::verify_file(&path, ME, UUID).unwrap_err();
    assert!(
        matches!(e, StoreError::Corrupt { .. }) && e.to_string().contains("checksum"),
        "{e}"
    );
    let s = SqliteStore::open(&path, ME, UUID).unwrap();
    let e = s.page("Q", None, 100).await.unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("keel store restore"), "{e}");
    s.close().await.unwrap();
    std::fs::remove_file(&seg).unwrap();
    let e = SqliteStore::open(&path, ME, UUID).unwrap_err();
    assert!(
        matches!(e, StoreError::Corrupt { .. }) && e.to_string().contains("missing"),
        "{e}"
    );
}

/// A version-1 store (bodies in their rows, no body log) opens, is migrated to the current
/// schema in place, and keeps every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_1_store_is_migrated_on_open() {
    let b = SqliteBackend::new();
    let path = b.path("v1");
    let s = SqliteStore::create(&path, ME, UUID).unwrap();
    let seqs = s
        .commit(vec![put("Q", 4, b"small"), put("Q", 4, &[5u8; 100])])
        .await
        .unwrap()
        .assigned_seqs;
    s.close().await.unwrap();
    // Take it back to version 1's shape.
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(
        "DROP TABLE segments;
         ALTER TABLE messages DROP COLUMN body_seg; ALTER TABLE messages DROP COLUMN body_at;
         ALTER TABLE messages DROP COLUMN body_len; ALTER TABLE messages DROP COLUMN body_crc;
         UPDATE meta SET value = '1' WHERE key = 'schema_version';",
    )
    .unwrap();
    drop(c);
    assert_eq!(read_info(&path).unwrap().schema_version, 1);
    let s = SqliteStore::open(&path, ME, UUID).unwrap();
    assert_eq!(
        s.info().await.unwrap().schema_version,
        keel_store::SCHEMA_VERSION
    );
    s.commit(vec![put("Q", 4, &named_body(9, 2_000))])
        .await
        .unwrap();
    let got = page_all(&s, "Q").await;
    assert_eq!(got.len(), 3);
    assert_eq!(
        (got[0].seq, got[0].body.as_slice()),
        (seqs[0], &b"small"[..])
    );
    assert_eq!(got[1].body, vec![5u8; 100]);
    assert_eq!(got[2].body, named_body(9, 2_000));
    s.close().await.unwrap();
}

/// A write error on the body log (here: the segment's file turned read-only) leaves its tail
/// in doubt: the writer retries the group in a new segment, and the commit still succeeds
/// with every body intact, before and after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_segment_write_moves_to_a_new_segment() {
    let b = SqliteBackend::new();
    let path = b.path("eio");
    let s = SqliteStore::create(&path, ME, UUID).unwrap();
    let first = s
        .commit(vec![put("Q", 4, &named_body(1, 1_000))])
        .await
        .unwrap()
        .assigned_seqs[0];
    let before = s.body_log_segments();
    s.break_body_log_segment().await.unwrap();
    let second = s
        .commit(vec![put("Q", 4, &named_body(2, 1_500))])
        .await
        .unwrap()
        .assigned_seqs[0];
    let after = s.body_log_segments();
    assert!(
        after.last() > before.last(),
        "a new segment took the group: {before:?} -> {after:?}"
    );
    let want = vec![
        (first, named_body(1, 1_000)),
        (second, named_body(2, 1_500)),
    ];
    assert_eq!(seqs_and_bodies(&s, "Q").await, want);
    s.close().await.unwrap();
    let s = SqliteStore::open(&path, ME, UUID).unwrap();
    assert_eq!(seqs_and_bodies(&s, "Q").await, want);
    s.close().await.unwrap();
    keel_store::verify_file(&path, ME, UUID).unwrap();
}

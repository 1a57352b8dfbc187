use super::*;
use proptest::prelude::*;

fn put(id: u64, n: usize) -> Op {
    Op::Put {
        id,
        data: vec![id as u8; n],
    }
}

fn active_file(dir: &Path) -> PathBuf {
    let w = Writer::open(dir).unwrap();
    w.files[w.active].clone()
}

#[test]
fn records_survive_a_reopen_and_removals_stay_removed() {
    let d = tempfile::tempdir().unwrap();
    let mut w = Writer::open(d.path()).unwrap();
    assert!(w.live().is_empty());
    w.append(&[put(1, 10), put(2, 20), put(3, 5)]).unwrap();
    w.append(&[Op::Remove { id: 2 }]).unwrap();
    w.force().unwrap();
    drop(w);
    let w = Writer::open(d.path()).unwrap();
    assert_eq!(w.live().keys().copied().collect::<Vec<_>>(), vec![1, 3]);
    assert_eq!(w.live()[&1], vec![1u8; 10]);
}

#[test]
fn a_keypoint_switches_files_and_keeps_exactly_the_live_records() {
    let d = tempfile::tempdir().unwrap();
    let mut w = Writer::open(d.path()).unwrap();
    for id in 0..100 {
        w.append(&[put(id, 100)]).unwrap();
    }
    for id in 0..90 {
        w.append(&[Op::Remove { id }]).unwrap();
    }
    let before = w.active;
    w.keypoint().unwrap();
    assert_ne!(w.active, before);
    w.append(&[put(500, 1)]).unwrap();
    w.force().unwrap();
    let epoch = w.epoch();
    drop(w);
    let w = Writer::open(d.path()).unwrap();
    assert_eq!(w.epoch(), epoch);
    let ids: Vec<u64> = w.live().keys().copied().collect();
    assert_eq!(ids, (90..100).chain([500]).collect::<Vec<_>>());
}

#[test]
fn a_keypoint_cut_short_by_a_crash_loses_to_the_older_file() {
    let d = tempfile::tempdir().unwrap();
    let mut w = Writer::open(d.path()).unwrap();
    w.append(&[put(7, 10)]).unwrap();
    w.force().unwrap();
    let other = w.files[1 - w.active].clone();
    drop(w);
    // The other file, written by a keypoint with a later epoch, without its KeypointEnd.
    let mut buf = Vec::new();
    encode(
        &Entry::Header {
            magic: MAGIC,
            version: VERSION,
            epoch: 99,
        },
        &mut buf,
    );
    encode(
        &Entry::Put {
            id: 8,
            data: vec![1],
        },
        &mut buf,
    );
    std::fs::write(&other, &buf).unwrap();
    let w = Writer::open(d.path()).unwrap();
    assert_eq!(w.live().keys().copied().collect::<Vec<_>>(), vec![7]);
    assert_eq!(w.epoch(), 1);
}

#[test]
fn a_torn_tail_is_ignored_and_cut_off() {
    let d = tempfile::tempdir().unwrap();
    let mut w = Writer::open(d.path()).unwrap();
    w.append(&[put(1, 10)]).unwrap();
    w.force().unwrap();
    w.append(&[put(2, 1000)]).unwrap();
    drop(w);
    let f = active_file(d.path());
    let len = std::fs::metadata(&f).unwrap().len();
    // The last record's write cut short, then junk where the rest should be.
    let file = OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(len - 500).unwrap();
    drop(file);
    let mut bytes = std::fs::read(&f).unwrap();
    bytes.extend_from_slice(&[0xab; 37]);
    std::fs::write(&f, &bytes).unwrap();
    let mut w = Writer::open(d.path()).unwrap();
    assert_eq!(w.live().keys().copied().collect::<Vec<_>>(), vec![1]);
    // Appends go on after the last good record.
    w.append(&[put(3, 3)]).unwrap();
    w.force().unwrap();
    drop(w);
    let w = Writer::open(d.path()).unwrap();
    assert_eq!(w.live().keys().copied().collect::<Vec<_>>(), vec![1, 3]);
}

#[test]
fn corruption_before_the_tail_is_refused_with_where_it_is() {
    let d = tempfile::tempdir().unwrap();
    let mut w = Writer::open(d.path()).unwrap();
    w.append(&[put(1, 50)]).unwrap();
    let at = w.size;
    w.append(&[put(2, 50), put(3, 50)]).unwrap();
    w.force().unwrap();
    drop(w);
    let f = active_file(d.path());
    let mut bytes = std::fs::read(&f).unwrap();
    // A flipped bit in record 2's data, and (another case) in its length.
    for (offset, what) in [(at as usize + 20, "payload"), (at as usize + 1, "length")] {
        let mut b = bytes.clone();
        b[offset] ^= 0x10;
        std::fs::write(&f, &b).unwrap();
        match Writer::open(d.path()) {
            Err(LogError::Corrupt { offset: o, .. }) => assert_eq!(o, at, "{what}"),
            Err(e) => panic!("{what}: {e}"),
            Ok(w) => panic!("{what}: read {:?}", w.live().keys().collect::<Vec<_>>()),
        }
    }
    bytes.truncate(bytes.len());
    std::fs::write(&f, &bytes).unwrap();
    assert_eq!(Writer::open(d.path()).unwrap().live().len(), 3);
}

#[test]
fn bounds_are_checked_before_anything_is_written() {
    let d = tempfile::tempdir().unwrap();
    let mut w = Writer::open(d.path()).unwrap();
    let size = w.size;
    assert!(matches!(
        w.append(&[put(1, 1), put(2, RECORD_BYTES_MAX + 1)]),
        Err(LogError::TooLarge { .. })
    ));
    assert_eq!(w.size, size);
    assert!(w.live().is_empty());
}

#[tokio::test]
async fn concurrent_forced_writes_share_forces_and_all_arrive() {
    let d = tempfile::tempdir().unwrap();
    let (log, live) = RecoveryLog::open(d.path()).unwrap();
    assert!(live.is_empty());
    let log = std::sync::Arc::new(log);
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..200u64 {
        let log = log.clone();
        tasks.spawn(async move { log.write(vec![put(id, 64)], true).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    log.write((0..100).map(|id| Op::Remove { id }).collect(), true)
        .await
        .unwrap();
    drop(log);
    // The writer thread has answered everything; reopen reads the same set.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let w = Writer::open(d.path()).unwrap();
    assert_eq!(
        w.live().keys().copied().collect::<Vec<_>>(),
        (100..200).collect::<Vec<_>>()
    );
}

#[derive(Debug, Clone)]
enum Step {
    Put(u64, usize),
    Remove(u64),
    Force,
    Keypoint,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u64..40, 0usize..300).prop_map(|(i, n)| Step::Put(i, n)),
        3 => (0u64..40).prop_map(Step::Remove),
        2 => Just(Step::Force),
        1 => Just(Step::Keypoint),
    ]
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// A crash at any moment: the active file cut anywhere after what was last forced, junk
    /// possibly written after that. What reads back is the live set after some step at or
    /// after the last force: nothing forced is lost, and nothing is made up.
    #[test]
    fn a_crash_anywhere_after_a_force_loses_nothing_forced(
        steps in proptest::collection::vec(step(), 1..80),
        cut in 0.0f64..=1.0,
        junk in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let d = tempfile::tempdir().unwrap();
        let mut w = Writer::open(d.path()).unwrap();
        let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        // The live set after each step since the last force (the first is the forced one).
        let mut since_force = vec![model.clone()];
        let mut forced_len = w.size;
        for s in steps {
            match s {
                Step::Put(id, n) => {
                    w.append(&[put(id, n)]).unwrap();
                    model.insert(id, vec![id as u8; n]);
                }
                Step::Remove(id) => {
                    w.append(&[Op::Remove { id }]).unwrap();
                    model.remove(&id);
                }
                Step::Force => {
                    w.force().unwrap();
                    since_force = vec![];
                    forced_len = w.size;
                }
                Step::Keypoint => {
                    w.keypoint().unwrap();
                    since_force = vec![];
                    forced_len = w.size;
                }
            }
            since_force.push(model.clone());
        }
        let file = w.files[w.active].clone();
        drop(w);
        let len = std::fs::metadata(&file).unwrap().len();
        let keep = forced_len + ((len - forced_len) as f64 * cut) as u64;
        let mut bytes = std::fs::read(&file).unwrap();
        bytes.truncate(keep as usize);
        // Junk after a tear is what a crash may leave; only where nothing valid follows.
        bytes.extend_from_slice(&junk);
        std::fs::write(&file, &bytes).unwrap();
        match Writer::open(d.path()) {
            Ok(back) => prop_assert!(
                since_force.contains(back.live()),
                "read back {:?}, not a state since the last force",
                back.live().keys().collect::<Vec<_>>()
            ),
            // Junk that happens to hold a valid frame reads as corruption: refused, never
            // silently wrong.
            Err(LogError::Corrupt { .. }) => prop_assert!(!junk.is_empty()),
            Err(e) => prop_assert!(false, "{e}"),
        }
    }
}

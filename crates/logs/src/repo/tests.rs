use super::*;

fn rec(n: u64, level: u8, id: Option<&str>, text: &str) -> Record {
    Record {
        time_ms: 1_700_000_000_000 + n,
        level,
        process: "server1".into(),
        thread: (n % 3) as u32 + 1,
        logger: if n.is_multiple_of(2) {
            "server".into()
        } else {
            "engine".into()
        },
        id: id.map(str::to_string),
        text: text.into(),
        fields: vec![("n".into(), n.to_string())],
    }
}

fn all(dir: &Path, q: &Query) -> (Vec<Record>, ReadReport) {
    let mut out = Vec::new();
    let mut report = ReadReport::default();
    read(dir, q, &mut Position::default(), &mut report, &mut |r| {
        out.push(r);
        true
    })
    .unwrap();
    (out, report)
}

fn write(dir: &Path, cfg: Option<RepoConfig>, records: impl IntoIterator<Item = Record>) {
    let w = RepoWriter::start(cfg.unwrap_or_else(|| RepoConfig::new(dir.to_path_buf()))).unwrap();
    for r in records {
        w.push(r);
    }
    w.flush();
}

#[test]
fn records_round_trip_and_filters_combine() {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        None,
        (0..1000).map(|n| {
            let (level, id) = match n % 10 {
                0 => (1, Some("WSVR0101E")),
                1 => (2, Some("CWSIP0784E")),
                2 => (3, Some("WSVR0001I")),
                _ => (4, None),
            };
            rec(n, level, id, &format!("text {n}"))
        }),
    );
    let (every, report) = all(d.path(), &Query::default());
    assert_eq!(every.len(), 1000);
    assert_eq!(report.corrupt_blocks, 0);
    assert_eq!(every[7], rec(7, 4, None, "text 7"));

    // Level window, ID, logger, thread, text and time combined.
    let q = Query {
        min_level: Some(2),
        ..Query::default()
    };
    assert_eq!(all(d.path(), &q).0.len(), 200, "ERROR and WARN");
    let q = Query {
        max_level: Some(3),
        min_level: Some(4),
        ..Query::default()
    };
    assert_eq!(all(d.path(), &q).0.len(), 800, "INFO and DEBUG");
    let q = Query {
        ids: vec!["WSVR0101E".into(), "WSVR0001I".into()],
        min_level: Some(1),
        ..Query::default()
    };
    let got = all(d.path(), &q).0;
    assert_eq!(got.len(), 100);
    assert!(got.iter().all(|r| r.id.as_deref() == Some("WSVR0101E")));
    let q = Query {
        logger: Some("engine".into()),
        thread: Some(2),
        contains: Some("text 1".into()),
        since_ms: Some(1_700_000_000_100),
        until_ms: Some(1_700_000_000_199),
        ..Query::default()
    };
    let got = all(d.path(), &q).0;
    assert!(!got.is_empty());
    assert!(got.iter().all(|r| r.logger == "engine"
        && r.thread == 2
        && r.text.contains("text 1")
        && (100..200).contains(&(r.time_ms - 1_700_000_000_000))));
    let expect = (100..200u64)
        .filter(|n| n % 2 == 1 && n % 3 == 1 && format!("text {n}").contains("text 1"))
        .count();
    assert_eq!(got.len(), expect);
}

#[test]
fn a_reader_resumes_where_it_stopped_and_sees_new_segments() {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        None,
        (0..10).map(|n| rec(n, 3, None, "first run")),
    );
    let mut pos = Position::default();
    let mut report = ReadReport::default();
    let mut seen = 0;
    read(
        d.path(),
        &Query::default(),
        &mut pos,
        &mut report,
        &mut |_| {
            seen += 1;
            true
        },
    )
    .unwrap();
    assert_eq!(seen, 10);
    // A "restart": a new writer starts a new segment.
    write(
        d.path(),
        None,
        (10..15).map(|n| rec(n, 3, None, "second run")),
    );
    assert_eq!(segments(d.path()).unwrap().len(), 2);
    let mut new = Vec::new();
    read(
        d.path(),
        &Query::default(),
        &mut pos,
        &mut report,
        &mut |r| {
            new.push(r.text);
            true
        },
    )
    .unwrap();
    assert_eq!(new, vec!["second run"; 5]);
}

#[test]
fn a_torn_tail_is_ignored_and_a_corrupt_block_skipped() {
    let d = tempfile::tempdir().unwrap();
    let w = RepoWriter::start(RepoConfig::new(d.path().to_path_buf())).unwrap();
    for block in 0..3u64 {
        for n in 0..10 {
            w.push(rec(block * 10 + n, 3, None, &format!("block {block}")));
        }
        w.flush();
    }
    drop(w);
    let seg = segments(d.path()).unwrap().pop().unwrap();
    let bytes = std::fs::read(&seg).unwrap();
    // Torn tail: the last block cut in half.
    let mut cut = bytes.clone();
    cut.truncate(bytes.len() - 20);
    std::fs::write(&seg, &cut).unwrap();
    let (got, report) = all(d.path(), &Query::default());
    assert_eq!(got.len(), 20, "the last block is torn off, the rest reads");
    assert_eq!(report.corrupt_blocks, 0, "a torn tail is not damage");

    // Damage inside the first block's payload: that block is skipped, the others read.
    let mut bad = bytes.clone();
    bad[HEADER_BYTES + 5] ^= 0x55;
    std::fs::write(&seg, &bad).unwrap();
    let (got, report) = all(d.path(), &Query::default());
    assert_eq!(report.corrupt_blocks, 1);
    let texts: std::collections::BTreeSet<String> = got.into_iter().map(|r| r.text).collect();
    assert_eq!(texts, ["block 1".to_string(), "block 2".to_string()].into());

    // A damaged header (its length) resynchronises on the next block.
    let mut bad = bytes.clone();
    bad[5] = 0xff;
    bad[6] = 0xff;
    std::fs::write(&seg, &bad).unwrap();
    let (got, report) = all(d.path(), &Query::default());
    assert_eq!(report.corrupt_blocks, 1);
    assert_eq!(got.len(), 20);
}

#[test]
fn retention_removes_the_oldest_segments_only() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = RepoConfig::new(d.path().to_path_buf());
    cfg.segment_bytes_max = 2_000;
    cfg.total_bytes_max = 10_000;
    let w = RepoWriter::start(cfg).unwrap();
    for n in 0..400u64 {
        // Text that does not compress away: each block is about a segment.
        let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let text: String = (0..60)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'a' + (x % 26) as u8)
            })
            .collect();
        w.push(rec(n, 3, None, &text));
        if n % 20 == 19 {
            w.flush();
        }
    }
    w.flush();
    let segs = segments(d.path()).unwrap();
    let (size, count, oldest) = summary(d.path()).unwrap();
    assert_eq!(count, segs.len());
    assert!(size <= 10_000 + 2_500, "{size}");
    // What is left is the newest records, contiguous to the end.
    let (got, _) = all(d.path(), &Query::default());
    let first = got.first().unwrap().time_ms - 1_700_000_000_000;
    assert!(first > 0, "the oldest records are gone");
    assert_eq!(oldest, Some(got[0].time_ms));
    let ns: Vec<u64> = got.iter().map(|r| r.time_ms - 1_700_000_000_000).collect();
    assert_eq!(ns, (first..400).collect::<Vec<_>>());
}

#[test]
fn a_full_queue_drops_and_says_so() {
    let d = tempfile::tempdir().unwrap();
    let w = RepoWriter::start(RepoConfig::new(d.path().to_path_buf())).unwrap();
    // More than the queue holds, faster than the writer takes them.
    for n in 0..(QUEUE_RECORDS_MAX as u64 * 3) {
        w.push(rec(n, 4, None, "flood"));
    }
    w.flush();
    // A record after the flood makes the writer report the drops in the next block.
    w.push(rec(0, 3, None, "after"));
    w.flush();
    let dropped = w.stats.dropped.load(Ordering::Relaxed);
    let written = w.stats.written.load(Ordering::Relaxed);
    assert!(dropped > 0);
    let (got, _) = all(
        d.path(),
        &Query {
            ids: vec!["WSVR0107W".into()],
            ..Query::default()
        },
    );
    let reported: u64 = got
        .iter()
        .map(|r| r.fields[0].1.parse::<u64>().unwrap())
        .sum();
    assert_eq!(reported, dropped, "every drop is reported");
    assert_eq!(
        written,
        QUEUE_RECORDS_MAX as u64 * 3 + 1 - dropped + got.len() as u64
    );
}

#[test]
fn retention_by_age_keeps_the_segment_being_written() {
    let d = tempfile::tempdir().unwrap();
    // Three earlier runs, each its own segment.
    for run in 0..3u64 {
        write(
            d.path(),
            None,
            (0..5).map(|n| rec(run * 10 + n, 3, None, "old run")),
        );
    }
    assert_eq!(segments(d.path()).unwrap().len(), 3);
    // A run with an age limit of zero: at its first segment every older one has expired.
    let mut cfg = RepoConfig::new(d.path().to_path_buf());
    cfg.age_max_ms = 0;
    std::thread::sleep(std::time::Duration::from_millis(5));
    write(
        d.path(),
        Some(cfg),
        (100..105).map(|n| rec(n, 3, None, "new run")),
    );
    let left = segments(d.path()).unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    let (got, _) = all(d.path(), &Query::default());
    assert_eq!(got.len(), 5);
    assert!(got.iter().all(|r| r.text == "new run"));
}

#[test]
fn a_read_stopped_mid_block_resumes_with_the_next_record() {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        None,
        (0..10).map(|n| rec(n, 3, None, &format!("r{n}"))),
    );
    let mut pos = Position::default();
    let mut report = ReadReport::default();
    let mut got = Vec::new();
    // Stop after three records (one block holds all ten).
    read(
        d.path(),
        &Query::default(),
        &mut pos,
        &mut report,
        &mut |r| {
            got.push(r.text);
            got.len() < 3
        },
    )
    .unwrap();
    read(
        d.path(),
        &Query::default(),
        &mut pos,
        &mut report,
        &mut |r| {
            got.push(r.text);
            true
        },
    )
    .unwrap();
    let want: Vec<String> = (0..10).map(|n| format!("r{n}")).collect();
    assert_eq!(got, want, "each record once, in order");
}

#[test]
fn loggers_match_by_component_and_big_records_fit_their_blocks() {
    let d = tempfile::tempdir().unwrap();
    // Many records with large fields: blocks are cut on their real size, all stay readable.
    write(
        d.path(),
        None,
        (0..9_000u64).map(|n| {
            let mut r = rec(n, 3, None, "x");
            r.logger = if n % 2 == 0 {
                "server".into()
            } else {
                "server.txsvc".into()
            };
            r.fields = vec![("big".into(), "y".repeat(300 + (n % 7) as usize))];
            r
        }),
    );
    let (got, report) = all(d.path(), &Query::default());
    assert_eq!(got.len(), 9_000);
    assert_eq!(report.corrupt_blocks, 0);
    assert!(report.blocks_read >= 3, "cut on size: {report:?}");
    let q = |l: &str| Query {
        logger: Some(l.into()),
        ..Query::default()
    };
    assert_eq!(all(d.path(), &q("server")).0.len(), 9_000);
    assert_eq!(all(d.path(), &q("server.txsvc")).0.len(), 4_500);
    assert_eq!(
        all(d.path(), &q("s")).0.len(),
        0,
        "a prefix of a name is not a component"
    );
}

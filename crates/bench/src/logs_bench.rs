//! `keel-bench logs`: the binary log repository. Writes N records (server-like: 10 message IDs,
//! mostly INFO, a few fields) through the repository's writer thread and reports records/s
//! into the repository and the cost of one `push` on the caller's thread (the hot path); then
//! filters the N records by one message ID and a level window and reports the time.

use std::time::Instant;

use anyhow::Result;
use keel_logs::repo::{self, Position, Query, ReadReport, Record, RepoConfig, RepoWriter};
use serde_json::json;

const IDS: [&str; 10] = [
    "CWSIP0101I",
    "CWSIT0007I",
    "WTRN0002I",
    "WSVR0001I",
    "CWSIP0783E",
    "CWSIT0008W",
    "WTRN0008W",
    "ADMN0011I",
    "CWSIP0100I",
    "WSVR0102I",
];

/// About 1 % errors, 9 % warnings, the rest INFO, independent of the message ID.
fn level(n: u64) -> u8 {
    match n % 97 {
        0 => 1,
        1..=9 => 2,
        _ => 3,
    }
}

fn record(n: u64) -> Record {
    let id = IDS[(n % IDS.len() as u64) as usize];
    Record {
        time_ms: 1_795_000_000_000 + n / 50,
        level: level(n),
        process: "server1".into(),
        thread: (n % 8) as u32 + 1,
        logger: "engine".into(),
        id: Some(id.into()),
        text: format!(
            "Messaging engine node01.server1-bus1 did step {n} of its work on queue q{}.",
            n % 37
        ),
        fields: vec![
            ("me".into(), "node01.server1-bus1".into()),
            ("n".into(), n.to_string()),
        ],
    }
}

pub fn run(records: u64, json_out: bool) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("keel-bench-logs-")
        .tempdir()?;
    let mut cfg = RepoConfig::new(dir.path().to_path_buf());
    cfg.total_bytes_max = u64::MAX / 2;

    // The hot path: what one push costs the caller while the queue has room.
    let w = RepoWriter::start(cfg.clone())?;
    let sample = 20_000u64;
    let prepared: Vec<Record> = (0..sample).map(record).collect();
    let t = Instant::now();
    for r in prepared {
        w.push(r);
    }
    let push_ns = t.elapsed().as_nanos() as f64 / sample as f64;
    w.flush();
    drop(w);
    std::fs::remove_dir_all(dir.path())?;
    std::fs::create_dir_all(dir.path())?;

    // Throughput into the repository: records built and queued by one producer, waiting when
    // the queue is full; ends when the writer wrote the last one.
    let w = RepoWriter::start(cfg)?;
    let t = Instant::now();
    for n in 0..records {
        w.push_wait(record(n));
    }
    w.flush();
    let write_s = t.elapsed().as_secs_f64();
    let written = w.stats.written.load(std::sync::atomic::Ordering::Relaxed);
    drop(w);
    let (bytes, segments, _) = repo::summary(dir.path())?;

    // Filtering all of it by one message ID and a level window.
    let q = Query {
        ids: vec!["CWSIT0008W".into()],
        min_level: Some(2),
        max_level: Some(1),
        ..Query::default()
    };
    let t = Instant::now();
    let mut matched = 0u64;
    let mut report = ReadReport::default();
    repo::read(
        dir.path(),
        &q,
        &mut Position::default(),
        &mut report,
        &mut |_| {
            matched += 1;
            true
        },
    )?;
    let filter_s = t.elapsed().as_secs_f64();
    let expected = (0..records)
        .filter(|n| IDS[(n % 10) as usize] == "CWSIT0008W" && level(*n) <= 2)
        .count() as u64;
    anyhow::ensure!(
        matched == expected,
        "filter found {matched}, expected {expected}"
    );
    anyhow::ensure!(written == records, "wrote {written} of {records}");
    let rate = records as f64 / write_s;
    if json_out {
        println!(
            "{}",
            json!({"records": records, "write_s": write_s, "records_per_s": rate, "push_ns": push_ns,
                   "bytes": bytes, "segments": segments, "filter_s": filter_s, "matched": matched,
                   "blocks_read": report.blocks_read, "blocks_skipped": report.blocks_skipped})
        );
    } else {
        println!("write: {records} records in {write_s:.2} s: {rate:.0} records/s into the repository ({:.1} MiB in {segments} segments, {:.1} bytes/record); push on the caller's thread: {push_ns:.0} ns", bytes as f64 / 1048576.0, bytes as f64 / records as f64);
        println!("filter by message ID and level over {records} records: {:.3} s, {matched} matched ({} blocks read, {} skipped by their headers)", filter_s, report.blocks_read, report.blocks_skipped);
    }
    Ok(())
}

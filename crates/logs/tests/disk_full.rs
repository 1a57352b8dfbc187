//! The process log on a real full disk (a small tmpfs the test mounts and fills): writing
//! goes on, no half line is left, the first lines that failed are written late once space
//! returns with a WSVR0108W line saying how many failed, and the repository writer keeps
//! writing afterwards.

use std::time::{Duration, Instant};

use keel_core::testfs::{fill, Tmpfs};
use keel_logs::repo::{RepoConfig, RepoWriter};
use keel_logs::SystemOutLayer;
use tracing_subscriber::layer::SubscriberExt;

#[test]
fn system_out_and_the_repository_resume_after_a_full_disk() {
    let fs = Tmpfs::mount(1024 * 1024);
    let path = fs.path().join("logs/s1/SystemOut.log");
    let repo = RepoWriter::start(RepoConfig::new(fs.path().join("logs/s1/repository"))).unwrap();
    let layer = SystemOutLayer::open(&path, false)
        .unwrap()
        .with_repository(repo.clone(), "s1");
    let subscriber = tracing_subscriber::registry().with(layer);
    let filler = fs.path().join("filler");
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..5 {
            tracing::info!(target: "keel_server", "before {i} {}", "x".repeat(100));
        }
        repo.flush();
        assert!(fill(&filler) > 0);
        for i in 0..20 {
            // Longer than a page and not compressible: neither the line nor the repository's
            // block of them fits in the slack of its file's last page.
            tracing::info!(target: "keel_server", "during {i} {}", noise(i, 5_000));
        }
        // The repository's block of these records finds no room either.
        repo.flush();
        assert!(
            repo.stats
                .write_errors
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        );
        // No half line was left behind by a write that found no space.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n'), "{text}");
        assert!(!text.contains("during"), "{text}");
        std::fs::remove_file(&filler).unwrap();
        tracing::info!(target: "keel_server", "after");
    });
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.iter().all(|l| l.starts_with('[')), "{text}");
    // The lines that failed, in order, then the note, then the line that found room.
    let during: Vec<usize> = (0..20)
        .map(|i| {
            let want = format!(" during {i} ");
            lines
                .iter()
                .position(|l| l.contains(&want))
                .unwrap_or_else(|| panic!("line {i} was held and written late:\n{text}"))
        })
        .collect();
    assert!(during.windows(2).all(|w| w[0] < w[1]), "{text}");
    let note = lines
        .iter()
        .position(|l| l.contains("WSVR0108W: 20 log line(s) could not be written"))
        .unwrap_or_else(|| panic!("the note:\n{text}"));
    assert!(
        lines[note].contains("; 20 of them are written just above, late"),
        "{}",
        lines[note]
    );
    assert!(
        note > during[19] && lines.last().unwrap().ends_with(" after"),
        "{text}"
    );
    // The repository writer is alive: records pushed now are written (it pauses 1 s after a
    // failed block, so this polls, bounded).
    let written = repo
        .stats
        .written
        .load(std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        repo.push(keel_logs::repo::Record {
            time_ms: keel_core::unix_ms(),
            level: 3,
            process: "s1".into(),
            thread: 1,
            logger: "test".into(),
            id: None,
            text: "after the outage".into(),
            fields: Vec::new(),
        });
        repo.flush();
        if repo
            .stats
            .written
            .load(std::sync::atomic::Ordering::Relaxed)
            > written
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the repository writer writes again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        repo.stats
            .write_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

/// `len` letters from a small linear congruential generator seeded with `seed`.
fn noise(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            char::from(b'a' + (x >> 59) as u8 % 26)
        })
        .collect()
}

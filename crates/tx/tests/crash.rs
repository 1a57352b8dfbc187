//! The recovery log under SIGKILL: a child process puts and removes records with forced writes
//! (8 concurrent writers, so forces are shared), printing each one once it is durable; the
//! parent kills it mid-run (keypoints included: the child keypoints every 300 writes) and
//! reopens the log: every acknowledged put not acknowledged as removed is there, every
//! acknowledged removal is gone.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Arc;

use keel_tx::log::{Op, RecoveryLog, Writer};

#[test]
fn recovery_log_child() {
    let Ok(dir) = std::env::var("KEEL_TX_LOG_CHILD") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (log, _) = RecoveryLog::open(Path::new(&dir)).unwrap();
        let log = Arc::new(log);
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                // Bounded; the parent kills us long before the end.
                for i in 0..1_000_000u64 {
                    let id = t * 10_000_000 + i;
                    log.write(
                        vec![Op::Put {
                            id,
                            data: id.to_be_bytes().to_vec(),
                        }],
                        true,
                    )
                    .await
                    .unwrap();
                    println_flush(&format!("put {id}"));
                    // Every other record is resolved (removed) right away.
                    if i % 2 == 0 {
                        log.write(vec![Op::Remove { id }], true).await.unwrap();
                        println_flush(&format!("removed {id}"));
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

fn println_flush(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let d = tempfile::tempdir().unwrap();
    // Small keypoints would need a knob; the child's own volume passes KEYPOINT_BYTES rarely,
    // so keypoints are exercised by a second run on the same log below.
    for round in 0..2 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "recovery_log_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("KEEL_TX_LOG_CHILD", d.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut put = std::collections::BTreeSet::new();
        let mut removed = std::collections::BTreeSet::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(id) = line.strip_prefix("put ") {
                put.insert(id.parse::<u64>().unwrap());
            } else if let Some(id) = line.strip_prefix("removed ") {
                removed.insert(id.parse::<u64>().unwrap());
            }
            if put.len() == 600 {
                // SIGKILL mid-run: no destructor, no clean close.
                child.kill().unwrap();
                break;
            }
        }
        child.wait().unwrap();
        let w = Writer::open(d.path()).unwrap();
        for id in &put {
            if removed.contains(id) {
                assert!(
                    !w.live().contains_key(id),
                    "round {round}: removed {id} is back"
                );
            } else if id % 2 == 0 {
                // Its removal may have been durable without being acknowledged yet: either.
                continue;
            } else {
                assert_eq!(
                    w.live().get(id).map(|d| d.as_slice()),
                    Some(&id.to_be_bytes()[..]),
                    "round {round}: acknowledged put {id} lost"
                );
            }
        }
        // The next round keypoints first (as a start would after recovery), then runs again.
        let mut w = w;
        w.keypoint().unwrap();
        // Records of this round are resolved before the next one reuses the ids.
        let ids: Vec<u64> = w.live().keys().copied().collect();
        w.append(
            &ids.into_iter()
                .map(|id| Op::Remove { id })
                .collect::<Vec<_>>(),
        )
        .unwrap();
        w.force().unwrap();
    }
}

//! Fuzz target: recovery-log records read back (`log::Writer::open` over `log1`/`log2`). A real
//! log (keypoint, puts, removes, a second keypoint, appends) is damaged: its bytes mutated
//! anywhere (bit flips, truncation, repeated and spliced sections, hostile length words), or
//! one frame's payload mutated behind a recomputed length and CRC-32C so only the record
//! decoder stands guard.
//!
//! Checked: no panic; a damaged log opens (its tail cut) or is refused as `Corrupt` or
//! `Unusable`; a log that opens takes an append and reads it back; and opening allocates at
//! most `ALLOC_PER_INPUT_BYTE` × the files' bytes + `ALLOC_CONST_BYTES` (serde's cautious
//! pre-allocation of a record's data, at most 1 MiB whatever its length says).
//!
//! `KEEL_FUZZ_CASES=N cargo nextest run -p keel-tx -E 'test(fuzz)'` for a long run.

use std::path::Path;

use keel_core::fuzz::{self, CountingAlloc};
use keel_tx::log::{LogError, Op, Writer};
use proptest::prelude::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const ALLOC_PER_INPUT_BYTE: usize = 4;
const ALLOC_CONST_BYTES: usize = (1 << 20) + 64 * 1024;
const HEAD_BYTES: usize = 8;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: fuzz::cases(fuzz::CASES_DEFAULT),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The two files of a real log that went through two keypoints, appends and removals.
fn real_log() -> [Vec<u8>; 2] {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut w = Writer::open(tmp.path()).expect("new log");
    let put = |id: u64, n: usize| Op::Put {
        id,
        data: vec![id as u8; n],
    };
    w.append(&[put(1, 3), put(2, 200), put(3, 0)])
        .expect("append");
    w.append(&[Op::Remove { id: 2 }]).expect("remove");
    w.keypoint().expect("keypoint");
    w.append(&[put(4, 40), Op::Remove { id: 1 }, put(5, 130)])
        .expect("append");
    w.force().expect("force");
    drop(w);
    let read = |f: &str| std::fs::read(tmp.path().join(f)).unwrap_or_default();
    [read("log1"), read("log2")]
}

/// Start offsets of the frames of a file that walk cleanly from its start.
fn frames(b: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while b.len() - at >= HEAD_BYTES {
        let len = u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes")) as usize;
        if b.len() - at - HEAD_BYTES < len {
            break;
        }
        out.push((at, len));
        at += HEAD_BYTES + len;
    }
    out
}

/// Frame `k` (mod their number) of `b` with its payload mutated and a valid head rewritten.
fn mutate_payload(b: &[u8], k: usize, ops: &[(u8, u64)]) -> Vec<u8> {
    let fr = frames(b);
    if fr.is_empty() {
        return fuzz::mutate(b, ops);
    }
    let (at, len) = fr[k % fr.len()];
    let payload = fuzz::mutate(&b[at + HEAD_BYTES..at + HEAD_BYTES + len], ops);
    let mut out = b[..at].to_vec();
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_be_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&b[at + HEAD_BYTES + len..]);
    out
}

/// Opens a log made of `files`; checks the outcome, the allocation, and that a log that opens
/// still works.
fn open_damaged(dir: &Path, files: &[Vec<u8>; 2]) {
    for (name, bytes) in ["log1", "log2"].iter().zip(files) {
        std::fs::write(dir.join(name), bytes).expect("write log file");
    }
    let input_bytes = files[0].len() + files[1].len();
    let (opened, peak_bytes) = fuzz::peak_bytes(|| Writer::open(dir));
    assert!(
        peak_bytes <= ALLOC_PER_INPUT_BYTE * input_bytes + ALLOC_CONST_BYTES,
        "opening {input_bytes} bytes of log allocated {peak_bytes} bytes"
    );
    match opened {
        Ok(mut w) => {
            w.append(&[Op::Put {
                id: 1 << 40,
                data: b"after".to_vec(),
            }])
            .expect("a log that opens takes appends");
            w.force().expect("force");
            drop(w);
            let again = Writer::open(dir).expect("a log that opened opens again");
            assert_eq!(
                again.live().get(&(1 << 40)).map(Vec::as_slice),
                Some(&b"after"[..])
            );
        }
        Err(LogError::Corrupt { .. } | LogError::Unusable { .. }) => {}
        Err(other) => panic!("damage must read as Corrupt or Unusable, not: {other}"),
    }
}

#[test]
fn fuzz_seed_the_real_log_opens_whole() {
    let files = real_log();
    assert!(
        !files[0].is_empty() && !files[1].is_empty(),
        "two keypoints, two files"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    for (name, bytes) in ["log1", "log2"].iter().zip(&files) {
        std::fs::write(tmp.path().join(name), bytes).expect("write");
    }
    let w = Writer::open(tmp.path()).expect("open");
    let ids: Vec<u64> = w.live().keys().copied().collect();
    assert_eq!(ids, vec![3, 4, 5]);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_mutated_log_files(which in 0usize..3, ops in proptest::collection::vec(any::<(u8, u64)>(), 1..8)) {
        let mut files = real_log();
        // One file or the other, or both (the same mutations).
        for (i, f) in files.iter_mut().enumerate() {
            if which == 2 || which == i {
                *f = fuzz::mutate(f, &ops);
            }
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        open_damaged(tmp.path(), &files);
    }

    #[test]
    fn fuzz_mutated_records_with_valid_checksums(which in 0usize..2, k in any::<usize>(), ops in proptest::collection::vec(any::<(u8, u64)>(), 1..6)) {
        let mut files = real_log();
        files[which] = mutate_payload(&files[which], k, &ops);
        let tmp = tempfile::tempdir().expect("tempdir");
        open_damaged(tmp.path(), &files);
    }
}

//! Fuzz target: log-repository blocks read back (`repo::read`). A real segment written by
//! `RepoWriter` (several blocks) is damaged: its bytes mutated anywhere; one block's header
//! fields mutated behind a recomputed CRC-32C; one block's zstd payload mutated behind a
//! recomputed length and CRC; or one block's records (the decompressed bytes) mutated and
//! compressed again, with its raw length set true or hostile, behind a recomputed CRC. So the
//! fuzzer gets past the header and CRC checks to zstd, the record framing and postcard.
//!
//! Checked: no panic, an `Ok` read (damage is skipped and counted, never an error), a read
//! stopped mid-block resumes without panicking, and a read allocates at most
//! `ALLOC_PER_INPUT_BYTE` × the segment's bytes + `ALLOC_CONST_BYTES`: the decompression
//! buffer a header may announce (bounded by the reader at about 2 MiB), serde's cautious
//! pre-allocation of a record's fields (at most 1 MiB), and the records handed out.
//!
//! `KEEL_FUZZ_CASES=N cargo nextest run -p keel-logs -E 'test(fuzz)'` for a long run.

use std::path::Path;
use std::sync::OnceLock;

use keel_core::fuzz::{self, CountingAlloc};
use keel_logs::repo::{self, Position, Query, ReadReport, Record, RepoConfig, RepoWriter};
use proptest::prelude::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const ALLOC_PER_INPUT_BYTE: usize = 4;
const ALLOC_CONST_BYTES: usize = 3 * (1 << 20) + 256 * 1024;
const HEADER_BYTES: usize = repo::HEADER_BYTES;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: fuzz::cases(fuzz::CASES_DEFAULT),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn record(n: u64) -> Record {
    Record {
        time_ms: 1_700_000_000_000 + n,
        level: (n % 5) as u8 + 1,
        process: "server1".into(),
        thread: (n % 3) as u32 + 1,
        logger: "engine".into(),
        id: n.is_multiple_of(2).then(|| format!("CWSIP{n:04}I")),
        text: format!("record {n} {}", "x".repeat((n as usize * 7) % 90)),
        fields: vec![("n".into(), n.to_string()), ("q".into(), "queue1".into())],
    }
}

/// A real segment of three blocks (file name, bytes), written once per test binary.
fn real_segment() -> &'static (String, Vec<u8>) {
    static SEGMENT: OnceLock<(String, Vec<u8>)> = OnceLock::new();
    SEGMENT.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("tempdir");
        let w = RepoWriter::start(RepoConfig::new(tmp.path().to_path_buf())).expect("writer");
        for block in 0..3u64 {
            for n in 0..(4 + block * 5) {
                w.push_wait(record(block * 100 + n));
            }
            w.flush();
        }
        drop(w);
        let segs = repo::segments(tmp.path()).expect("segments");
        assert_eq!(segs.len(), 1, "one segment");
        let name = segs[0]
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        (name, std::fs::read(&segs[0]).expect("read segment"))
    })
}

/// (offset, payload length) of each block of a well-formed segment.
fn blocks(b: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while b.len() - at >= HEADER_BYTES {
        let len = u32::from_le_bytes(b[at + 4..at + 8].try_into().expect("4 bytes")) as usize;
        out.push((at, len));
        at += HEADER_BYTES + len;
    }
    assert_eq!(at, b.len(), "a real segment is whole blocks");
    out
}

/// Rewrites the CRC of the block at `at` (header bytes 4..36 and the payload).
fn reseal(b: &mut [u8], at: usize) {
    let len = u32::from_le_bytes(b[at + 4..at + 8].try_into().expect("4 bytes")) as usize;
    let end = (at + HEADER_BYTES + len).min(b.len());
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&b[at + 4..at + 36]),
        &b[at + HEADER_BYTES..end],
    );
    b[at + 36..at + 40].copy_from_slice(&crc.to_le_bytes());
}

/// The segment with block `k` replaced by a header (fields as given) and `payload`, sealed.
fn with_block(seg: &[u8], k: usize, payload: &[u8], raw_len: Option<u32>) -> Vec<u8> {
    let bl = blocks(seg);
    let (at, len) = bl[k % bl.len()];
    let mut header = seg[at..at + HEADER_BYTES].to_vec();
    header[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    if let Some(raw) = raw_len {
        header[8..12].copy_from_slice(&raw.to_le_bytes());
    }
    let mut out = seg[..at].to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    out.extend_from_slice(&seg[at + HEADER_BYTES + len..]);
    reseal(&mut out, at);
    out
}

/// Reads a repository holding `bytes` as its one segment: whole, then stopped after `stop`
/// records and resumed. Checks the outcome and each read's allocation.
fn read_damaged(bytes: &[u8], stop: usize) {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join(&real_segment().0), bytes).expect("write segment");
    let bound_bytes = ALLOC_PER_INPUT_BYTE * bytes.len() + ALLOC_CONST_BYTES;
    let read = |dir: &Path, pos: &mut Position, stop_after: usize| {
        let mut report = ReadReport::default();
        let mut seen = 0usize;
        let (result, peak_bytes) = fuzz::peak_bytes(|| {
            repo::read(dir, &Query::default(), pos, &mut report, &mut |_r| {
                seen += 1;
                seen < stop_after
            })
        });
        assert!(
            peak_bytes <= bound_bytes,
            "reading a {}-byte segment allocated {peak_bytes} bytes",
            bytes.len()
        );
        result.expect("damage is skipped, never an error");
        seen
    };
    read(tmp.path(), &mut Position::default(), usize::MAX);
    let mut pos = Position::default();
    read(tmp.path(), &mut pos, stop.max(1));
    read(tmp.path(), &mut pos, usize::MAX);
}

fn ops() -> impl Strategy<Value = Vec<(u8, u64)>> {
    proptest::collection::vec(any::<(u8, u64)>(), 1..8)
}

#[test]
fn fuzz_seed_the_real_segment_reads_whole() {
    let (name, bytes) = real_segment();
    assert_eq!(blocks(bytes).len(), 3);
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join(name), bytes).expect("write");
    let mut got = Vec::new();
    let mut report = ReadReport::default();
    repo::read(
        tmp.path(),
        &Query::default(),
        &mut Position::default(),
        &mut report,
        &mut |r| {
            got.push(r);
            true
        },
    )
    .expect("read");
    assert_eq!(got.len(), 4 + 9 + 14);
    assert_eq!(got[0], record(0));
    assert_eq!(report.corrupt_blocks, 0);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_mutated_segments(ops in ops(), stop in 0usize..30) {
        read_damaged(&fuzz::mutate(&real_segment().1, &ops), stop);
    }

    /// Header fields (lengths, count, times, level mask) mutated behind a valid CRC.
    #[test]
    fn fuzz_mutated_headers_with_valid_checksums(k in any::<usize>(), ops in ops(), stop in 0usize..30) {
        let seg = &real_segment().1;
        let bl = blocks(seg);
        let (at, _) = bl[k % bl.len()];
        let header = fuzz::mutate(&seg[at + 4..at + 36], &ops);
        let mut b = seg.clone();
        // Same length kept (the header is fixed-size): mutations that grow or shrink it are
        // cut or padded back.
        for i in 0..32 {
            b[at + 4 + i] = header.get(i).copied().unwrap_or(0);
        }
        reseal(&mut b, at);
        read_damaged(&b, stop);
    }

    /// The zstd payload mutated behind a valid length and CRC.
    #[test]
    fn fuzz_mutated_payloads_with_valid_checksums(k in any::<usize>(), ops in ops(), stop in 0usize..30) {
        let seg = &real_segment().1;
        let bl = blocks(seg);
        let (at, len) = bl[k % bl.len()];
        let payload = fuzz::mutate(&seg[at + HEADER_BYTES..at + HEADER_BYTES + len], &ops);
        read_damaged(&with_block(seg, k, &payload, None), stop);
    }

    /// The records (decompressed bytes) mutated and compressed again: valid zstd, valid CRC,
    /// raw length true or hostile.
    #[test]
    fn fuzz_mutated_records_behind_valid_zstd(k in any::<usize>(), ops in ops(), raw in prop_oneof![Just(None), any::<u32>().prop_map(Some)], stop in 0usize..30) {
        let seg = &real_segment().1;
        let bl = blocks(seg);
        let (at, len) = bl[k % bl.len()];
        let raw_bytes = zstd::bulk::decompress(&seg[at + HEADER_BYTES..at + HEADER_BYTES + len], 1 << 20).expect("a real block decompresses");
        let damaged = fuzz::mutate(&raw_bytes, &ops);
        let payload = zstd::bulk::compress(&damaged, 1).expect("compress");
        let raw_len = raw.unwrap_or(damaged.len() as u32);
        read_damaged(&with_block(seg, k, &payload, Some(raw_len)), stop);
    }
}

//! Fuzz target: the engine-link frame decoder (`LinkCodec`) on arbitrary bytes and on valid
//! frame streams mutated (bit flips, truncation, repeated and spliced sections, hostile
//! lengths), including corrupted payloads behind a recomputed CRC-32C, with both bounds: the
//! 16 KiB of an unauthenticated peer and the full bound of a trusted link.
//!
//! Checked per decode call: no panic, and the peak bytes allocated stay within
//! `ALLOC_PER_INPUT_BYTE` × input + `ALLOC_CONST_BYTES`. The constant is serde's cautious
//! pre-allocation of a sequence (`Vec<StreamState>`, `Vec<RemoteMessage>`...: at most 1 MiB
//! whatever length the input announces), never a length taken from the input.
//!
//! `KEEL_FUZZ_CASES=N cargo nextest run -p keel-bus -E 'test(fuzz)'` for a long run.

use bytes::{BufMut, BytesMut};
use keel_bus::link::{sample_frames, LinkCodec, LinkFrame};
use keel_core::fuzz::{self, CountingAlloc};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const ALLOC_PER_INPUT_BYTE: usize = 8;
const ALLOC_CONST_BYTES: usize = (1 << 20) + 64 * 1024;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: fuzz::cases(fuzz::CASES_DEFAULT),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn codec(trusted: bool) -> LinkCodec {
    if trusted {
        LinkCodec::trusted()
    } else {
        LinkCodec::default()
    }
}

/// Decodes frames from `bytes` until the codec wants more or refuses, checking each call's
/// allocation. Returns the frames decoded.
fn decode_all(mut codec: LinkCodec, bytes: &[u8]) -> Vec<LinkFrame> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    // Every decoded frame takes at least one header's 8 bytes.
    for _ in 0..=bytes.len() / 8 {
        let (result, peak_bytes) = fuzz::peak_bytes(|| codec.decode(&mut buf));
        assert!(
            peak_bytes <= ALLOC_PER_INPUT_BYTE * bytes.len() + ALLOC_CONST_BYTES,
            "one decode of a {}-byte input allocated {peak_bytes} bytes",
            bytes.len()
        );
        match result {
            Ok(Some(f)) => out.push(f),
            Ok(None) | Err(_) => break,
        }
    }
    out
}

/// Every sample frame, encoded back to back: a valid stream.
fn valid_stream() -> Vec<u8> {
    let mut buf = BytesMut::new();
    for f in sample_frames() {
        LinkCodec::trusted()
            .encode(f, &mut buf)
            .expect("sample frames encode");
    }
    buf.to_vec()
}

fn ops() -> impl Strategy<Value = Vec<(u8, u64)>> {
    proptest::collection::vec(any::<(u8, u64)>(), 1..8)
}

#[test]
fn fuzz_seed_the_valid_stream_decodes_whole() {
    let stream = valid_stream();
    assert_eq!(decode_all(LinkCodec::trusted(), &stream), sample_frames());
    // The sample frames are all small: an unauthenticated codec reads them too.
    assert_eq!(decode_all(LinkCodec::default(), &stream), sample_frames());
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048), trusted in any::<bool>()) {
        decode_all(codec(trusted), &bytes);
    }

    /// A valid stream of frames, mutated anywhere (headers included).
    #[test]
    fn fuzz_mutated_streams(ops in ops(), trusted in any::<bool>()) {
        decode_all(codec(trusted), &fuzz::mutate(&valid_stream(), &ops));
    }

    /// One frame's payload mutated behind a valid header and CRC, so only postcard and the
    /// frame types stand guard.
    #[test]
    fn fuzz_mutated_payloads_with_valid_checksums(i in any::<usize>(), ops in ops(), trusted in any::<bool>()) {
        let frames = sample_frames();
        let payload = postcard::to_stdvec(&frames[i % frames.len()]).expect("encode");
        let payload = fuzz::mutate(&payload, &ops);
        let mut b = BytesMut::new();
        b.put_u32(payload.len() as u32);
        b.put_u32(crc32c::crc32c(&payload));
        b.put_slice(&payload);
        decode_all(codec(trusted), &b);
    }
}

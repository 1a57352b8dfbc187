//! The wire format of ME-to-ME links on the bus port.
//!
//! A link starts with an 8-byte protocol header, `KEEL` then version `2 0 0 0` (2: FLUSH
//! frames; engines of another version refuse each other's links), so the bus port
//! tells links apart from AMQP connections (`AMQP` + protocol id + version) by the first four
//! bytes. Then frames, each:
//!
//! ```text
//! u32 big-endian  payload length (bytes)      ≤ FRAME_BYTES_MAX
//! u32 big-endian  CRC-32C of the payload
//! payload         postcard-encoded LinkFrame
//! ```
//!
//! The decoder refuses (with an error that closes that link only) a length over the bound, a
//! CRC mismatch and a payload that does not decode; it never allocates more than the bound and
//! never panics, whatever the bytes (property-tested).

use bytes::{Buf, BufMut, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

/// First bytes a link sends.
pub const PROTOCOL_HEADER: [u8; 8] = *b"KEEL\x02\x00\x00\x00";
/// Largest payload of one frame: a message is bounded by the bus's max_message_bytes (at most
/// 256 MiB); frames carry one message each.
pub const FRAME_BYTES_MAX: usize = 256 * 1024 * 1024 + 64 * 1024;
const HEAD_BYTES: usize = 8;

/// One stream's state as a side states it when a link comes up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    pub stream_id: String,
    pub next_tick: u64,
    pub acked: u64,
    /// Set on a stream a FLUSH created: the flush it was made for (the restored engine's
    /// flush epoch). The target then retires every older stream of this source, and a target
    /// waiting for this flush counts it as confirmed.
    pub flush_epoch: Option<String>,
    /// Of a stream made by a FLUSH: its ticks 1 ..= this are resent messages.
    pub resend_upto: u64,
}

/// Everything that travels on a link after the header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkFrame {
    /// First frame each way: who is talking, on which bus, with which credential proof, and the
    /// streams it sources towards the other side.
    Open {
        bus: String,
        me: String,
        me_uuid: String,
        incarnation: u64,
        #[serde(with = "serde_bytes")]
        credential_proof: Vec<u8>,
        streams: Vec<StreamState>,
    },
    /// The target's verdict per stream (see `Target::on_hello`), encoded as (stream, kind, a, b):
    /// Resume → a = from; the restored kinds → the two ticks that disagree. `last_identity` is
    /// the identity of the target's message at tick from - 1 (Resume only). FlushRequested
    /// carries the target's flush epoch in `flush_epoch`; the source answers with `Flush`.
    Verdict {
        stream_id: String,
        kind: VerdictKind,
        a: u64,
        b: u64,
        last_identity: Option<String>,
        flush_epoch: Option<String>,
    },
    Data {
        stream_id: String,
        tick: u64,
        message_id: String,
        priority: u8,
        reliability: u8,
        expiry_ms: Option<u64>,
        destination: String,
        #[serde(with = "serde_bytes")]
        properties: Vec<u8>,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
    Ack {
        stream_id: String,
        upto: u64,
    },
    Resend {
        stream_id: String,
        from: u64,
    },
    /// The source's answer to a FlushRequested verdict: the new stream (tagged with the
    /// requested flush epoch) that carries the old one's unacknowledged messages. The target
    /// answers with a verdict on it.
    Flush {
        stream: StreamState,
    },
    /// Remote get: up to `max` messages of `queue` (a queue of the answering engine), locked
    /// for this link until settled or the link ends.
    Get {
        req: u64,
        queue: String,
        max: u32,
    },
    /// The answer to `Get` (`error`: why nothing could be taken).
    Got {
        req: u64,
        msgs: Vec<RemoteMessage>,
        error: Option<String>,
    },
    /// Outcomes (seq, outcome code) of deliveries a `Got` handed out.
    Settle {
        req: u64,
        queue: String,
        settles: Vec<(u64, u8)>,
    },
    /// The answer to `Settle`: per delivery, None if settled, else why not.
    Settled {
        req: u64,
        results: Vec<Option<String>>,
        error: Option<String>,
    },
    Close {
        reason: String,
    },
}

/// A message lent to another engine's consumer by remote get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteMessage {
    pub seq: u64,
    pub id: String,
    pub priority: u8,
    pub reliability: u8,
    pub delivery_count: u32,
    #[serde(with = "serde_bytes")]
    pub properties: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VerdictKind {
    Resume,
    SourceRestored,
    TargetRestored,
    /// The target runs a FLUSH (its store was restored): the source must move this stream's
    /// unacknowledged messages onto a new stream made for the target's flush epoch.
    FlushRequested,
    /// A FLUSH of the source replaced this stream: the source announcing it again means its
    /// store went back in time (again).
    Replaced,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link frame of {bytes} bytes is over the limit of {max}; closing the link")]
    TooLarge { bytes: usize, max: usize },
    #[error("link frame checksum mismatch (CRC-32C {found:08x}, expected {expected:08x}); closing the link")]
    Checksum { found: u32, expected: u32 },
    #[error("link frame does not decode ({0}); closing the link")]
    Malformed(String),
    #[error("not a Keel link: the first bytes were {0:?}")]
    NotALink([u8; 8]),
    #[error("link I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Checks the 8 bytes a connection opened with.
pub fn check_header(head: [u8; 8]) -> Result<(), LinkError> {
    if head == PROTOCOL_HEADER {
        Ok(())
    } else {
        Err(LinkError::NotALink(head))
    }
}

/// Largest payload a link takes before its peer has proved who it is (the `Open` frame, and
/// the answering `Open` on the connecting side): an `Open` states a handful of streams, a few
/// hundred bytes. Without this bound a peer with no credential could make the server buffer
/// a 256 MiB first frame (measured: RSS 92 -> 489 MB for one connection).
pub const OPEN_FRAME_BYTES_MAX: usize = 16 * 1024;

/// tokio-util codec for link frames (after the protocol header). A new codec takes frames of
/// at most [`OPEN_FRAME_BYTES_MAX`] bytes; [`LinkCodec::authenticated`] lifts the bound to
/// [`FRAME_BYTES_MAX`] once the peer's `Open` was checked.
#[derive(Debug)]
pub struct LinkCodec {
    /// The largest payload `decode` accepts now.
    frame_bytes_max: usize,
}

impl Default for LinkCodec {
    fn default() -> LinkCodec {
        LinkCodec {
            frame_bytes_max: OPEN_FRAME_BYTES_MAX,
        }
    }
}

impl LinkCodec {
    /// The peer proved who it is: take frames up to [`FRAME_BYTES_MAX`].
    pub fn authenticated(&mut self) {
        self.frame_bytes_max = FRAME_BYTES_MAX;
    }

    /// A codec for a link already authenticated (tests, tools that read a recorded stream).
    pub fn trusted() -> LinkCodec {
        LinkCodec {
            frame_bytes_max: FRAME_BYTES_MAX,
        }
    }
}

impl Encoder<LinkFrame> for LinkCodec {
    type Error = LinkError;

    fn encode(&mut self, frame: LinkFrame, dst: &mut BytesMut) -> Result<(), LinkError> {
        // Straight into the output buffer behind a header filled in afterwards: no payload
        // buffer of its own and no copy of it (a body's bytes are copied once, here).
        let start = dst.len();
        dst.put_bytes(0, HEAD_BYTES);
        let written = postcard::serialize_with_flavor(
            &frame,
            Append {
                dst: &mut *dst,
                bytes: 0,
                bytes_max: FRAME_BYTES_MAX,
            },
        );
        let bytes = match written {
            Ok(bytes) => bytes,
            Err(e) => {
                dst.truncate(start);
                return Err(match e {
                    // The encoder stopped at the bound: count the whole size (no buffer) so
                    // the error names the frame's real size.
                    postcard::Error::SerializeBufferFull => LinkError::TooLarge {
                        bytes: postcard::serialize_with_flavor(
                            &frame,
                            postcard::ser_flavors::Size::default(),
                        )
                        .unwrap_or(FRAME_BYTES_MAX + 1),
                        max: FRAME_BYTES_MAX,
                    },
                    other => LinkError::Malformed(other.to_string()),
                });
            }
        };
        let payload = start + HEAD_BYTES;
        assert_eq!(
            dst.len() - payload,
            bytes,
            "the payload is what the encoder wrote"
        );
        assert!(bytes <= FRAME_BYTES_MAX);
        let crc = crc32c::crc32c(&dst[payload..]);
        dst[start..start + 4].copy_from_slice(&(bytes as u32).to_be_bytes());
        dst[start + 4..payload].copy_from_slice(&crc.to_be_bytes());
        Ok(())
    }
}

/// A postcard output that appends to a codec's buffer and refuses to grow a payload past
/// `bytes_max` (it stops there instead of writing the rest first).
struct Append<'a> {
    dst: &'a mut BytesMut,
    bytes: usize,
    bytes_max: usize,
}

impl Append<'_> {
    fn take(&mut self, n: usize) -> postcard::Result<()> {
        if self.bytes + n > self.bytes_max {
            return Err(postcard::Error::SerializeBufferFull);
        }
        self.bytes += n;
        Ok(())
    }
}

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = usize;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.take(data.len())?;
        self.dst.put_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.take(1)?;
        self.dst.put_u8(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.bytes)
    }
}

impl Decoder for LinkCodec {
    type Item = LinkFrame;
    type Error = LinkError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<LinkFrame>, LinkError> {
        if src.len() < HEAD_BYTES {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.frame_bytes_max {
            return Err(LinkError::TooLarge {
                bytes: len,
                max: self.frame_bytes_max,
            });
        }
        if src.len() < HEAD_BYTES + len {
            // No reserve for the announced length: a peer announcing a maximal frame and sending
            // nothing must not make us allocate it. The buffer grows as bytes arrive.
            return Ok(None);
        }
        let expected = u32::from_be_bytes([src[4], src[5], src[6], src[7]]);
        src.advance(HEAD_BYTES);
        let payload = src.split_to(len);
        let found = crc32c::crc32c(&payload);
        if found != expected {
            return Err(LinkError::Checksum { found, expected });
        }
        let frame: LinkFrame =
            postcard::from_bytes(&payload).map_err(|e| LinkError::Malformed(e.to_string()))?;
        Ok(Some(frame))
    }
}

/// One frame of each kind (two verdicts more), valid and small: what the codec's tests and
/// the fuzz targets (`tests/fuzz.rs`) start from.
#[doc(hidden)]
pub fn sample_frames() -> Vec<LinkFrame> {
    vec![
        LinkFrame::Open {
            bus: "bus1".into(),
            me: "n.s-b".into(),
            me_uuid: "u".into(),
            incarnation: 2,
            credential_proof: vec![1, 2, 3],
            streams: vec![StreamState {
                stream_id: "s".into(),
                next_tick: 9,
                acked: 4,
                flush_epoch: Some("e".into()),
                resend_upto: 8,
            }],
        },
        LinkFrame::Verdict {
            stream_id: "s".into(),
            kind: VerdictKind::SourceRestored,
            a: 6,
            b: 4,
            last_identity: None,
            flush_epoch: None,
        },
        LinkFrame::Verdict {
            stream_id: "s".into(),
            kind: VerdictKind::Resume,
            a: 6,
            b: 0,
            last_identity: Some("u:1:5".into()),
            flush_epoch: None,
        },
        LinkFrame::Verdict {
            stream_id: "s".into(),
            kind: VerdictKind::FlushRequested,
            a: 0,
            b: 0,
            last_identity: None,
            flush_epoch: Some("e".into()),
        },
        LinkFrame::Data {
            stream_id: "s".into(),
            tick: 5,
            message_id: "u:1:5".into(),
            priority: 4,
            reliability: 4,
            expiry_ms: Some(1),
            destination: "q".into(),
            properties: vec![],
            body: vec![7; 1000],
        },
        LinkFrame::Ack {
            stream_id: "s".into(),
            upto: 5,
        },
        LinkFrame::Resend {
            stream_id: "s".into(),
            from: 3,
        },
        LinkFrame::Flush {
            stream: StreamState {
                stream_id: "b".into(),
                next_tick: 3,
                acked: 0,
                flush_epoch: Some("e".into()),
                resend_upto: 2,
            },
        },
        LinkFrame::Get {
            req: 1,
            queue: "q".into(),
            max: 16,
        },
        LinkFrame::Got {
            req: 1,
            msgs: vec![RemoteMessage {
                seq: 9,
                id: "u:1:9".into(),
                priority: 4,
                reliability: 4,
                delivery_count: 1,
                properties: b"{}".to_vec(),
                body: vec![1, 2],
            }],
            error: None,
        },
        LinkFrame::Settle {
            req: 2,
            queue: "q".into(),
            settles: vec![(9, 0)],
        },
        LinkFrame::Settled {
            req: 2,
            results: vec![None, Some("gone".into())],
            error: None,
        },
        LinkFrame::Close {
            reason: "bye".into(),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip_even_split_byte_by_byte() {
        let mut buf = BytesMut::new();
        for f in sample_frames() {
            LinkCodec::trusted().encode(f, &mut buf).unwrap();
        }
        let all = buf.freeze();
        let mut dec = BytesMut::new();
        let mut out = Vec::new();
        for b in all.iter() {
            dec.put_u8(*b);
            while let Some(f) = LinkCodec::trusted().decode(&mut dec).unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, sample_frames());
        assert!(dec.is_empty());
    }

    #[test]
    fn frames_are_written_as_a_header_and_the_postcard_payload() {
        for f in sample_frames() {
            let payload = postcard::to_stdvec(&f).unwrap();
            let mut expected = BytesMut::from(&b"junk"[..]);
            expected.put_u32(payload.len() as u32);
            expected.put_u32(crc32c::crc32c(&payload));
            expected.put_slice(&payload);
            let mut buf = BytesMut::from(&b"junk"[..]);
            LinkCodec::trusted().encode(f, &mut buf).unwrap();
            assert_eq!(buf, expected);
        }
    }

    #[test]
    fn a_payload_over_the_bound_stops_the_encoder_there() {
        let mut buf = BytesMut::new();
        let out = Append {
            dst: &mut buf,
            bytes: 0,
            bytes_max: 100,
        };
        let big = sample_frames()[4].clone(); // a data frame with a 1 000-byte body
        assert!(matches!(
            postcard::serialize_with_flavor(&big, out),
            Err(postcard::Error::SerializeBufferFull)
        ));
        assert!(buf.len() <= 100, "nothing written past the bound");
    }

    #[test]
    fn damage_is_refused() {
        let mut buf = BytesMut::new();
        LinkCodec::trusted()
            .encode(sample_frames()[2].clone(), &mut buf)
            .unwrap();
        let mut flipped = buf.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(
            LinkCodec::trusted().decode(&mut flipped),
            Err(LinkError::Checksum { .. })
        ));
        let mut huge = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0][..]);
        assert!(matches!(
            LinkCodec::trusted().decode(&mut huge),
            Err(LinkError::TooLarge { .. })
        ));
        assert!(check_header(*b"AMQP\x00\x01\x00\x00").is_err());
        assert!(check_header(PROTOCOL_HEADER).is_ok());
    }

    #[test]
    fn before_authentication_a_frame_over_the_open_bound_is_refused_from_its_header() {
        // A header announcing 256 MiB: refused from the 8 header bytes, before any payload.
        let mut huge = BytesMut::new();
        huge.put_u32(256 * 1024 * 1024);
        huge.put_u32(0);
        let mut fresh = LinkCodec::default();
        assert!(matches!(
            fresh.decode(&mut huge.clone()),
            Err(LinkError::TooLarge {
                bytes: 268_435_456,
                max: OPEN_FRAME_BYTES_MAX
            })
        ));
        // The same header is only waited on once the link is authenticated.
        fresh.authenticated();
        assert!(matches!(fresh.decode(&mut huge), Ok(None)));
        // Every frame an engine sends first fits the bound, with room to spare.
        for f in sample_frames() {
            if matches!(f, LinkFrame::Open { .. }) {
                let mut b = BytesMut::new();
                LinkCodec::default().encode(f, &mut b).unwrap();
                assert!(b.len() < OPEN_FRAME_BYTES_MAX / 8);
                assert!(LinkCodec::default().decode(&mut b).unwrap().is_some());
            }
        }
    }

    /// The frames as builds before `serde_bytes` encoded them: byte fields as sequences of
    /// u8. Postcard writes both as a length and the raw bytes, so engines of either build keep
    /// talking; this mirror proves it.
    #[derive(Serialize)]
    enum Plain {
        Open {
            bus: String,
            me: String,
            me_uuid: String,
            incarnation: u64,
            credential_proof: Vec<u8>,
            streams: Vec<StreamState>,
        },
        Verdict {
            stream_id: String,
            kind: VerdictKind,
            a: u64,
            b: u64,
            last_identity: Option<String>,
            flush_epoch: Option<String>,
        },
        Data {
            stream_id: String,
            tick: u64,
            message_id: String,
            priority: u8,
            reliability: u8,
            expiry_ms: Option<u64>,
            destination: String,
            properties: Vec<u8>,
            body: Vec<u8>,
        },
        Ack {
            stream_id: String,
            upto: u64,
        },
        Resend {
            stream_id: String,
            from: u64,
        },
        Flush {
            stream: StreamState,
        },
        Get {
            req: u64,
            queue: String,
            max: u32,
        },
        Got {
            req: u64,
            msgs: Vec<PlainRemote>,
            error: Option<String>,
        },
        Settle {
            req: u64,
            queue: String,
            settles: Vec<(u64, u8)>,
        },
        Settled {
            req: u64,
            results: Vec<Option<String>>,
            error: Option<String>,
        },
        Close {
            reason: String,
        },
    }

    #[derive(Serialize)]
    struct PlainRemote {
        seq: u64,
        id: String,
        priority: u8,
        reliability: u8,
        delivery_count: u32,
        properties: Vec<u8>,
        body: Vec<u8>,
    }

    fn plain(f: LinkFrame) -> Plain {
        match f {
            LinkFrame::Open {
                bus,
                me,
                me_uuid,
                incarnation,
                credential_proof,
                streams,
            } => Plain::Open {
                bus,
                me,
                me_uuid,
                incarnation,
                credential_proof,
                streams,
            },
            LinkFrame::Verdict {
                stream_id,
                kind,
                a,
                b,
                last_identity,
                flush_epoch,
            } => Plain::Verdict {
                stream_id,
                kind,
                a,
                b,
                last_identity,
                flush_epoch,
            },
            LinkFrame::Data {
                stream_id,
                tick,
                message_id,
                priority,
                reliability,
                expiry_ms,
                destination,
                properties,
                body,
            } => Plain::Data {
                stream_id,
                tick,
                message_id,
                priority,
                reliability,
                expiry_ms,
                destination,
                properties,
                body,
            },
            LinkFrame::Ack { stream_id, upto } => Plain::Ack { stream_id, upto },
            LinkFrame::Resend { stream_id, from } => Plain::Resend { stream_id, from },
            LinkFrame::Flush { stream } => Plain::Flush { stream },
            LinkFrame::Get { req, queue, max } => Plain::Get { req, queue, max },
            LinkFrame::Got { req, msgs, error } => Plain::Got {
                req,
                msgs: msgs
                    .into_iter()
                    .map(|m| PlainRemote {
                        seq: m.seq,
                        id: m.id,
                        priority: m.priority,
                        reliability: m.reliability,
                        delivery_count: m.delivery_count,
                        properties: m.properties,
                        body: m.body,
                    })
                    .collect(),
                error,
            },
            LinkFrame::Settle {
                req,
                queue,
                settles,
            } => Plain::Settle {
                req,
                queue,
                settles,
            },
            LinkFrame::Settled {
                req,
                results,
                error,
            } => Plain::Settled {
                req,
                results,
                error,
            },
            LinkFrame::Close { reason } => Plain::Close { reason },
        }
    }

    fn same_bytes_as_before(f: LinkFrame) {
        let now = postcard::to_stdvec(&f).unwrap();
        let before = postcard::to_stdvec(&plain(f.clone())).unwrap();
        assert_eq!(
            now, before,
            "{f:?} encodes as it did with byte fields as sequences"
        );
        assert_eq!(postcard::from_bytes::<LinkFrame>(&before).unwrap(), f);
    }

    #[test]
    fn frames_encode_as_before_byte_fields_were_slices() {
        for f in sample_frames() {
            same_bytes_as_before(f);
        }
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder, and it never asks for more than the bound.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut b = BytesMut::from(&bytes[..]);
            for _ in 0..64 {
                match LinkCodec::trusted().decode(&mut b) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
            prop_assert!(b.capacity() <= 2 * 4096 + HEAD_BYTES, "the decoder never allocates for announced lengths");
        }

        /// Bodies and properties of any length and content (the length prefix grows past one
        /// byte at 128) encode as they did with byte fields as sequences.
        #[test]
        fn data_frames_encode_as_before(body in proptest::collection::vec(any::<u8>(), 0..2048), properties in proptest::collection::vec(any::<u8>(), 0..300)) {
            same_bytes_as_before(LinkFrame::Data {
                stream_id: "s".into(),
                tick: 1,
                message_id: "m".into(),
                priority: 4,
                reliability: 4,
                expiry_ms: None,
                destination: "q".into(),
                properties,
                body,
            });
        }

        /// A valid frame with random payload corruption (checksum recomputed, so only the
        /// postcard decoder stands guard) decodes or errors, never panics.
        #[test]
        fn corrupted_payloads_with_valid_checksums_never_panic(i in 0usize..13, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut payload = postcard::to_stdvec(&sample_frames()[i]).unwrap();
            for (at, x) in flips {
                let n = payload.len();
                payload[at % n] ^= x;
            }
            let mut b = BytesMut::new();
            b.put_u32(payload.len() as u32);
            b.put_u32(crc32c::crc32c(&payload));
            b.put_slice(&payload);
            let _ = LinkCodec::trusted().decode(&mut b);
        }
    }
}

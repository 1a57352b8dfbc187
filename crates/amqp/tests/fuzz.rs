//! Fuzz targets: the AMQP decoders of the bus port, on arbitrary bytes and on valid encodings
//! mutated (bit flips, truncation, repeated and spliced sections, hostile length words):
//! - the frame decoder (`frames::amqp::FrameDecoder`: the fast codec for transfer, disposition
//!   and flow, serde_amqp for the rest), from real Open, Transfer, Flow and Disposition frames;
//! - the SASL frame decoder (`frames::sasl::FrameCodec`, what the acceptor reads before the
//!   peer has authenticated), from real SASL init, mechanisms and outcome frames;
//! - the direct message decoder (`link::fast_message::decode_common`) and serde_amqp's message
//!   decoder behind the length check the receiver applies (`frames::bounds::check_values`).
//!
//! Checked per decode: no panic, and the peak bytes allocated stay within
//! `ALLOC_PER_INPUT_BYTE` × input + `ALLOC_CONST_BYTES` (serde's cautious pre-allocation of a
//! sequence, at most 1 MiB). Before the `bounds` check, serde_amqp allocated whatever a
//! `str32`/`sym32`/`vbin32` announced (4 GiB from a 20-byte SASL init); the regressions below
//! keep those cases.
//!
//! `KEEL_FUZZ_CASES=N cargo nextest run -p keel-amqp -E 'test(fuzz)'` for a long run.

use bytes::BytesMut;
use fe2o3_amqp::frames::{amqp, bounds, fast, sasl};
use fe2o3_amqp::link::fast_message::{decode_common, encode_common};
use fe2o3_amqp::types::definitions::{DeliveryTag, Handle, Role};
use fe2o3_amqp::types::messaging::message::__private::{Deserializable, Serializable};
use fe2o3_amqp::types::messaging::{
    Accepted, Batch, Body, Data, DeliveryState, Header, Message, MessageId, Properties,
};
use fe2o3_amqp::types::performatives::{Disposition, Flow, Open, Performative, Transfer};
use fe2o3_amqp::types::primitives::{Binary, OrderedMap, Symbol, Value};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslMechanisms, SaslOutcome};
use keel_core::fuzz::{self, CountingAlloc};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const ALLOC_PER_INPUT_BYTE: usize = 16;
const ALLOC_CONST_BYTES: usize = (1 << 20) + 64 * 1024;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: fuzz::cases(fuzz::CASES_DEFAULT),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn within_bound<T>(input_bytes: usize, f: impl FnOnce() -> T) -> T {
    let (out, peak_bytes) = fuzz::peak_bytes(f);
    assert!(
        peak_bytes <= ALLOC_PER_INPUT_BYTE * input_bytes + ALLOC_CONST_BYTES,
        "decoding {input_bytes} bytes allocated {peak_bytes} bytes"
    );
    out
}

/// A frame body as the transport hands it over (after the 4-byte size): decoded by the AMQP
/// frame decoder. Returns whether it decoded.
fn decode_amqp(bytes: &[u8]) -> bool {
    let mut src = BytesMut::from(bytes);
    within_bound(bytes.len(), || amqp::FrameDecoder {}.decode(&mut src)).is_ok()
}

fn decode_sasl(bytes: &[u8]) -> bool {
    let mut src = BytesMut::from(bytes);
    within_bound(bytes.len(), || sasl::FrameCodec {}.decode(&mut src)).is_ok()
}

fn performative_frame(p: &Performative) -> Vec<u8> {
    let mut b = vec![2, 0, 0, 7]; // doff 2, type AMQP, channel 7
    b.extend_from_slice(&serde_amqp::to_vec(p).expect("encode"));
    b
}

/// Real AMQP frames (body after the size): an Open with properties, a Transfer with a payload
/// after it, a Flow and a Disposition (the last three through the fast codec).
fn amqp_frames() -> Vec<Vec<u8>> {
    let mut props = OrderedMap::new();
    props.insert(Symbol::from("product"), Value::String("keel-fuzz".into()));
    props.insert(
        Symbol::from("nested"),
        Value::List(vec![Value::Uint(1), Value::List(vec![Value::Null])]),
    );
    let open = Open {
        container_id: "client-1".into(),
        hostname: Some("localhost".into()),
        max_frame_size: 65_536.into(),
        channel_max: 255.into(),
        idle_time_out: Some(30_000),
        outgoing_locales: None,
        incoming_locales: None,
        offered_capabilities: Some(vec![Symbol::from("ANONYMOUS-RELAY")].into()),
        desired_capabilities: None,
        properties: Some(props),
    };
    let transfer = Transfer {
        handle: Handle(1),
        delivery_id: Some(9),
        delivery_tag: Some(DeliveryTag::from(vec![1, 2, 3, 4])),
        message_format: Some(0),
        settled: Some(false),
        more: false,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: false,
        batchable: false,
    };
    let flow = Flow {
        next_incoming_id: Some(1),
        incoming_window: 2048,
        next_outgoing_id: 1,
        outgoing_window: 2048,
        handle: Some(Handle(1)),
        delivery_count: Some(0),
        link_credit: Some(256),
        available: None,
        drain: false,
        echo: false,
        properties: None,
    };
    let disposition = Disposition {
        role: Role::Receiver,
        first: 3,
        last: Some(9),
        settled: true,
        state: Some(DeliveryState::Accepted(Accepted {})),
        batchable: false,
    };
    let mut t = vec![2, 0, 0, 1];
    let mut b = BytesMut::new();
    assert!(fast::encode_transfer(&transfer, &mut b));
    t.extend_from_slice(&b);
    t.extend_from_slice(&message_bytes()[0]);
    let mut f = BytesMut::from(&[2u8, 0, 0, 1][..]);
    assert!(fast::encode_flow(&flow, &mut f));
    let mut d = BytesMut::from(&[2u8, 0, 0, 1][..]);
    assert!(fast::encode_disposition(&disposition, &mut d));
    vec![
        performative_frame(&Performative::Open(open)),
        t,
        f.to_vec(),
        d.to_vec(),
    ]
}

/// Real SASL frames (body after the size): what a client and the acceptor send.
fn sasl_frames() -> Vec<Vec<u8>> {
    let frames = vec![
        sasl::Frame::Init(SaslInit {
            mechanism: Symbol::from("PLAIN"),
            initial_response: Some(Binary::from(b"\0user1\0secret".to_vec())),
            hostname: Some("localhost".into()),
        }),
        sasl::Frame::Mechanisms(SaslMechanisms {
            sasl_server_mechanisms: vec![Symbol::from("PLAIN"), Symbol::from("ANONYMOUS")].into(),
        }),
        sasl::Frame::Outcome(SaslOutcome {
            code: SaslCode::Auth,
            additional_data: None,
        }),
    ];
    frames
        .into_iter()
        .map(|f| {
            let mut b = BytesMut::new();
            sasl::FrameCodec {}.encode(f, &mut b).expect("encode");
            b.to_vec()
        })
        .collect()
}

/// Real message payloads: the direct codec's common shape, and one serde_amqp writes.
fn message_bytes() -> Vec<Vec<u8>> {
    let common = Message {
        header: Some(Header {
            durable: true,
            priority: 4.into(),
            ttl: None,
            first_acquirer: false,
            delivery_count: 0,
        }),
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            message_id: Some(MessageId::String("id-1".into())),
            ..Properties::default()
        }),
        application_properties: None,
        body: Body::Data(Batch::new(vec![Data(Binary::from(vec![7u8; 40]))])),
        footer: None,
    };
    let value = Message {
        body: Body::Value(fe2o3_amqp::types::messaging::AmqpValue(Value::List(vec![
            Value::String("a".into()),
            Value::Binary(Binary::from(vec![1, 2])),
        ]))),
        ..common.clone()
    };
    vec![
        encode_common(&common).expect("the common shape").to_vec(),
        serde_amqp::to_vec(&Serializable(&value)).expect("encode"),
    ]
}

/// Decodes a message as the receiver does: the direct codec, else the length check and serde.
fn decode_message(bytes: &[u8]) {
    within_bound(bytes.len(), || {
        if decode_common(bytes).is_none() && bounds::check_values(bytes).is_ok() {
            let _ = serde_amqp::from_slice::<Deserializable<Message<Body<Value>>>>(bytes);
        }
    });
}

fn ops() -> impl Strategy<Value = Vec<(u8, u64)>> {
    proptest::collection::vec(any::<(u8, u64)>(), 1..8)
}

#[test]
fn fuzz_seed_the_real_encodings_decode() {
    for f in amqp_frames() {
        assert!(decode_amqp(&f), "{f:02x?}");
    }
    for f in sasl_frames() {
        assert!(decode_sasl(&f), "{f:02x?}");
    }
    for m in message_bytes() {
        bounds::check_values(&m).expect("a real message passes the length check");
        serde_amqp::from_slice::<Deserializable<Message<Body<Value>>>>(&m).expect("decodes");
    }
}

/// Regression: frames announcing 4 to 7 bytes reached the decoders shorter than their 4-byte
/// header, and `get_u8` panicked.
#[test]
fn fuzz_regression_frames_shorter_than_their_header_are_errors() {
    for n in 0..4 {
        let bytes = vec![2u8; n];
        assert!(!decode_amqp(&bytes));
        assert!(!decode_sasl(&bytes));
    }
}

/// Regression: a SASL init whose mechanism (sym32) announces 4 GiB made serde_amqp allocate
/// 4 GiB before finding 5 bytes; a binary (vbin32) and a string (str32) likewise.
#[test]
fn fuzz_regression_announced_lengths_allocate_nothing() {
    for code in [0xb3u8, 0xb0, 0xb1] {
        let mut b = vec![2, 1, 0, 0, 0x00, 0x53, 0x41, 0xc0, 10, 1, code];
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        b.extend_from_slice(b"PLAIN");
        assert!(!decode_sasl(&b), "{code:02x}");
        b[1] = 0; // the same list as an AMQP frame (an Open's container id)
        b[6] = 0x10;
        assert!(!decode_amqp(&b), "{code:02x}");
        decode_message(&b[4..]);
    }
}

/// Regression (long run, 1 million cases): a map counting an odd number of keys and values
/// made serde_amqp's map reader subtract past zero (a panic in debug builds) reading an Open.
#[test]
fn fuzz_regression_a_map_with_an_odd_count_is_refused() {
    assert!(bounds::check_value(&[0xc1, 3, 1, 0x40, 0x40]).is_err());
    assert_eq!(bounds::check_value(&[0xc1, 3, 2, 0x40, 0x40]), Ok(5));
    // An Open whose properties map counts 3: refused before serde reads it.
    let mut open = amqp_frames()[0].clone();
    let at = open
        .windows(2)
        .position(|w| w[0] == 0xc1)
        .expect("the Open has a properties map");
    let count_at = at + 2;
    open[count_at] |= 1;
    assert!(!decode_amqp(&open));
}

#[test]
fn fuzz_bounds_refuses_lengths_over_the_bytes_present() {
    assert!(bounds::check_value(&[0xb3, 0xff, 0xff, 0xff, 0xff, b'a', b'b', b'c']).is_err());
    assert_eq!(bounds::check_value(&[0xa3, 3, b'a', b'b', b'c', 9]), Ok(5));
    // list8 of two smalluints, then the same list counting three.
    assert_eq!(bounds::check_value(&[0xc0, 5, 2, 0x52, 1, 0x52, 2]), Ok(7));
    assert!(bounds::check_value(&[0xc0, 5, 3, 0x52, 1, 0x52, 2]).is_err());
    // array8 of 200 nulls in 2 bytes.
    assert!(bounds::check_value(&[0xe0, 2, 200, 0x40]).is_err());
    // Described values nested one level more than allowed.
    let mut deep = Vec::new();
    for _ in 0..=bounds::DEPTH_MAX {
        deep.extend_from_slice(&[0x00, 0x53, 0x01]);
    }
    deep.push(0x40);
    assert!(bounds::check_value(&deep).is_err());
    assert!(bounds::check_values(&[0x40, 0x41, 0x52, 7]).is_ok());
    assert!(bounds::check_values(&[0x40, 0x52]).is_err());
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_amqp_frames_arbitrary(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        decode_amqp(&bytes);
        let mut framed = vec![2, 0, 0, 0];
        framed.extend_from_slice(&bytes);
        decode_amqp(&framed);
    }

    #[test]
    fn fuzz_amqp_frames_mutated(i in any::<usize>(), ops in ops()) {
        let frames = amqp_frames();
        decode_amqp(&fuzz::mutate(&frames[i % frames.len()], &ops));
    }

    #[test]
    fn fuzz_fast_codec_mutated(i in 1usize..4, ops in ops()) {
        // The performative alone (no frame header), as the fast decoder sees it.
        let frames = amqp_frames();
        let bytes = fuzz::mutate(&frames[i][4..], &ops);
        within_bound(bytes.len(), || fast::decode(&bytes));
    }

    #[test]
    fn fuzz_sasl_frames_arbitrary(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_sasl(&bytes);
        let mut framed = vec![2, 1, 0, 0];
        framed.extend_from_slice(&bytes);
        decode_sasl(&framed);
    }

    #[test]
    fn fuzz_sasl_frames_mutated(i in any::<usize>(), ops in ops()) {
        let frames = sasl_frames();
        decode_sasl(&fuzz::mutate(&frames[i % frames.len()], &ops));
    }

    #[test]
    fn fuzz_messages_mutated(i in any::<usize>(), ops in ops()) {
        let msgs = message_bytes();
        decode_message(&fuzz::mutate(&msgs[i % msgs.len()], &ops));
    }

    #[test]
    fn fuzz_messages_arbitrary(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        decode_message(&bytes);
    }
}

fn key() -> impl Strategy<Value = Value> {
    prop_oneof![
        "[a-z-]{0,12}".prop_map(|s| Value::Symbol(Symbol::from(s))),
        ".{0,12}".prop_map(Value::String),
        any::<u64>().prop_map(Value::Ulong),
    ]
}

/// Values of most AMQP types, nested (lists, maps, arrays, described values).
fn value() -> impl Strategy<Value = Value> {
    use fe2o3_amqp::types::primitives::{Array, Timestamp, Uuid};
    use serde_amqp::described::Described;
    use serde_amqp::descriptor::Descriptor;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u8>().prop_map(Value::Ubyte),
        any::<u16>().prop_map(Value::Ushort),
        any::<u32>().prop_map(Value::Uint),
        any::<u64>().prop_map(Value::Ulong),
        any::<i8>().prop_map(Value::Byte),
        any::<i32>().prop_map(Value::Int),
        any::<i64>().prop_map(Value::Long),
        any::<char>().prop_map(Value::Char),
        any::<i64>().prop_map(|t| Value::Timestamp(Timestamp::from_milliseconds(t))),
        any::<[u8; 16]>().prop_map(|u| Value::Uuid(Uuid::from(u))),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| Value::Binary(Binary::from(b))),
        ".{0,40}".prop_map(Value::String),
        "[a-z:]{0,300}".prop_map(|s| Value::Symbol(Symbol::from(s))),
        proptest::collection::vec(any::<u32>(), 0..70).prop_map(|v| Value::Array(Array::from(
            v.into_iter().map(Value::Uint).collect::<Vec<_>>()
        ))),
        proptest::collection::vec("[a-z]{0,9}", 0..5).prop_map(|v| Value::Array(Array::from(
            v.into_iter()
                .map(|s| Value::Symbol(Symbol::from(s)))
                .collect::<Vec<_>>()
        ))),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::List),
            // Keys of the kinds AMQP maps use (serde_amqp's encoder panics on some others,
            // e.g. an array key: an encoder limit, not a decoder's).
            proptest::collection::vec((key(), inner.clone()), 0..4).prop_map(|kv| {
                let mut m = OrderedMap::new();
                for (k, v) in kv {
                    m.insert(k, v);
                }
                Value::Map(m)
            }),
            (any::<u64>(), inner).prop_map(|(code, v)| Value::Described(Box::new(Described {
                descriptor: Descriptor::Code(code),
                value: v,
            }))),
        ]
    })
}

proptest! {
    #![proptest_config(config())]

    /// No false refusals: whatever serde_amqp writes passes the length check, whole.
    #[test]
    fn fuzz_bounds_accepts_what_serde_amqp_writes(v in value()) {
        let bytes = serde_amqp::to_vec(&v).expect("encode");
        prop_assert_eq!(bounds::check_value(&bytes), Ok(bytes.len()));
    }
}

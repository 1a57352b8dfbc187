//! The direct codec of the patched fe2o3-amqp (`third_party/fe2o3-amqp/src/frames/fast.rs`)
//! against serde_amqp, the codec it stands in for: the same bytes out, the same values in,
//! and a decline (never a different answer) for whatever it does not handle.

use bytes::BytesMut;
use fe2o3_amqp::frames::fast::{self, Decoded};
use fe2o3_amqp::types::definitions::{
    DeliveryTag, Error as AmqpErrorValue, Handle, ReceiverSettleMode, Role,
};
use fe2o3_amqp::types::messaging::{Accepted, DeliveryState, Rejected, Released};
use fe2o3_amqp::types::performatives::{Disposition, Flow, Performative, Transfer};
use fe2o3_amqp::types::primitives::{OrderedMap, Symbol, Value};
use proptest::prelude::*;

fn uint() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), 1u32..=255, 256u32..=65_536, any::<u32>()]
}

fn opt_uint() -> impl Strategy<Value = Option<u32>> {
    proptest::option::of(uint())
}

/// States the codec writes itself (none, accepted, released) and one it leaves to serde_amqp.
fn state() -> impl Strategy<Value = Option<DeliveryState>> {
    prop_oneof![
        4 => Just(None),
        2 => Just(Some(DeliveryState::Accepted(Accepted {}))),
        1 => Just(Some(DeliveryState::Released(Released {}))),
        1 => Just(Some(DeliveryState::Rejected(Rejected {
            error: Some(AmqpErrorValue::new(
                fe2o3_amqp::types::definitions::AmqpError::InternalError,
                Some("x".to_string()),
                None,
            )),
        }))),
    ]
}

fn transfer() -> impl Strategy<Value = Transfer> {
    (
        (
            uint(),
            opt_uint(),
            proptest::option::of(prop_oneof![
                8 => proptest::collection::vec(any::<u8>(), 0..=40),
                1 => proptest::collection::vec(any::<u8>(), 250..=300),
            ]),
            opt_uint(),
            proptest::option::of(any::<bool>()),
            any::<bool>(),
        ),
        (
            proptest::option::of(prop_oneof![
                Just(ReceiverSettleMode::First),
                Just(ReceiverSettleMode::Second)
            ]),
            state(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (handle, delivery_id, tag, message_format, settled, more),
                (rcv_settle_mode, state, resume, aborted, batchable),
            )| Transfer {
                handle: Handle(handle),
                delivery_id,
                delivery_tag: tag.map(DeliveryTag::from),
                message_format,
                settled,
                more,
                rcv_settle_mode,
                state,
                resume,
                aborted,
                batchable,
            },
        )
}

fn disposition() -> impl Strategy<Value = Disposition> {
    (
        any::<bool>(),
        uint(),
        opt_uint(),
        any::<bool>(),
        state(),
        any::<bool>(),
    )
        .prop_map(
            |(receiver, first, last, settled, state, batchable)| Disposition {
                role: if receiver {
                    Role::Receiver
                } else {
                    Role::Sender
                },
                first,
                last,
                settled,
                state,
                batchable,
            },
        )
}

fn flow() -> impl Strategy<Value = Flow> {
    (
        (opt_uint(), uint(), uint(), uint(), opt_uint(), opt_uint()),
        (
            opt_uint(),
            opt_uint(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (next_incoming_id, incoming_window, next_outgoing_id, outgoing_window, handle, dc),
                (link_credit, available, drain, echo, with_properties),
            )| Flow {
                next_incoming_id,
                incoming_window,
                next_outgoing_id,
                outgoing_window,
                handle: handle.map(Handle),
                delivery_count: dc,
                link_credit,
                available,
                drain,
                echo,
                properties: with_properties.then(|| {
                    let mut m = OrderedMap::new();
                    m.insert(Symbol::from("k"), Value::Uint(7));
                    m
                }),
            },
        )
}

/// Reads `bytes` (a performative followed by `tail`) with both codecs: when the direct one
/// answers, it must agree with serde_amqp and stop where the performative ends.
fn check_decode(bytes: &[u8], tail: &[u8]) -> Option<Decoded> {
    let mut framed = bytes.to_vec();
    framed.extend_from_slice(tail);
    let (decoded, used) = fast::decode(&framed)?;
    assert_eq!(
        used,
        bytes.len(),
        "the performative ends where serde_amqp's does"
    );
    let by_serde: Performative = serde_amqp::from_slice(bytes).expect("serde_amqp reads it");
    match (&decoded, by_serde) {
        (Decoded::Transfer(a), Performative::Transfer(b)) => assert_eq!(*a, b),
        (Decoded::Disposition(a), Performative::Disposition(b)) => assert_eq!(*a, b),
        (Decoded::Flow(a), Performative::Flow(b)) => assert_eq!(*a, b),
        (a, b) => panic!("direct codec read {a:?}, serde_amqp {b:?}"),
    }
    Some(decoded)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn transfers_encode_and_decode_as_serde_amqp_does(t in transfer(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
        let by_serde = serde_amqp::to_vec(&t).unwrap();
        let mut dst = BytesMut::new();
        let handled = matches!(t.state, None | Some(DeliveryState::Accepted(_)) | Some(DeliveryState::Released(_)))
            && t.delivery_tag.as_ref().is_none_or(|tag| tag.len() < 255);
        prop_assert_eq!(fast::encode_transfer(&t, &mut dst), handled);
        prop_assert_eq!(fast::transfer_len(&t), handled.then_some(by_serde.len()));
        if handled {
            prop_assert_eq!(&dst[..], &by_serde[..]);
            prop_assert_eq!(check_decode(&by_serde, &tail), Some(Decoded::Transfer(t)));
        } else {
            prop_assert!(dst.is_empty(), "a decline writes nothing");
            check_decode(&by_serde, &tail);
        }
    }

    #[test]
    fn dispositions_encode_and_decode_as_serde_amqp_does(d in disposition()) {
        let by_serde = serde_amqp::to_vec(&d).unwrap();
        let mut dst = BytesMut::new();
        let handled = matches!(d.state, None | Some(DeliveryState::Accepted(_)) | Some(DeliveryState::Released(_)));
        prop_assert_eq!(fast::encode_disposition(&d, &mut dst), handled);
        if handled {
            prop_assert_eq!(&dst[..], &by_serde[..]);
            prop_assert_eq!(check_decode(&by_serde, &[]), Some(Decoded::Disposition(d)));
        } else {
            prop_assert!(dst.is_empty());
            prop_assert_eq!(check_decode(&by_serde, &[]), None);
        }
    }

    #[test]
    fn flows_encode_and_decode_as_serde_amqp_does(f in flow()) {
        let by_serde = serde_amqp::to_vec(&f).unwrap();
        let mut dst = BytesMut::new();
        let handled = f.properties.is_none();
        prop_assert_eq!(fast::encode_flow(&f, &mut dst), handled);
        if handled {
            prop_assert_eq!(&dst[..], &by_serde[..]);
            prop_assert_eq!(check_decode(&by_serde, &[]), Some(Decoded::Flow(f)));
        } else {
            prop_assert!(dst.is_empty());
            prop_assert_eq!(check_decode(&by_serde, &[]), None);
        }
    }

    /// Other peers choose other encodings (uint for small values, boolean with a byte, list32,
    /// vbin32): whatever the direct codec reads from them, serde_amqp reads the same.
    #[test]
    fn wider_encodings_read_the_same(t in transfer(), d in disposition(), f in flow(), seed in any::<u64>()) {
        for bytes in [serde_amqp::to_vec(&t).unwrap(), serde_amqp::to_vec(&d).unwrap(), serde_amqp::to_vec(&f).unwrap()] {
            let wide = widen(&bytes, seed);
            check_decode(&wide, &[1, 2, 3]);
        }
    }

    /// Arbitrary bytes after a plausible start: no panic, and any answer matches serde_amqp.
    #[test]
    fn garbage_is_declined_or_read_as_serde_amqp_reads_it(code in 0x13u8..=0x15, list in prop_oneof![Just(0x45u8), Just(0xc0), Just(0xd0), any::<u8>()], rest in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = vec![0x00, 0x53, code, list];
        bytes.extend_from_slice(&rest);
        if let Some((_, used)) = fast::decode(&bytes) {
            check_decode(&bytes[..used], &bytes[used..]);
        }
    }
}

/// Re-encodes a serde_amqp performative with wider encodings, chosen by `seed`: the outer list
/// as list32, small uints as uint, booleans as 0x56 xx, vbin8 as vbin32.
fn widen(bytes: &[u8], seed: u64) -> Vec<u8> {
    let (count, mut p) = match bytes[3] {
        0x45 => (0u32, 4),
        0xc0 => (bytes[5] as u32, 6),
        _ => return bytes.to_vec(),
    };
    let mut bit = 0;
    let mut pick = || {
        bit = (bit + 1) % 64;
        seed >> bit & 1 == 1
    };
    let mut elems = Vec::new();
    for _ in 0..count {
        let len = element_len(&bytes[p..]);
        match bytes[p] {
            0x43 if pick() => elems.extend_from_slice(&[0x70, 0, 0, 0, 0]),
            0x52 if pick() => elems.extend_from_slice(&[0x70, 0, 0, 0, bytes[p + 1]]),
            0x41 if pick() => elems.extend_from_slice(&[0x56, 1]),
            0x42 if pick() => elems.extend_from_slice(&[0x56, 0]),
            0xa0 if pick() => {
                let n = bytes[p + 1] as usize;
                elems.push(0xb0);
                elems.extend_from_slice(&(n as u32).to_be_bytes());
                elems.extend_from_slice(&bytes[p + 2..p + 2 + n]);
            }
            _ => elems.extend_from_slice(&bytes[p..p + len]),
        }
        p += len;
    }
    let mut out = bytes[..3].to_vec();
    out.push(0xd0);
    out.extend_from_slice(&(elems.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(&elems);
    out
}

/// Bytes of the element at the start of `b` (the encodings serde_amqp uses for these
/// performatives' fields).
fn element_len(b: &[u8]) -> usize {
    match b[0] {
        0x40 | 0x41 | 0x42 | 0x43 | 0x45 => 1,
        0x50 | 0x52 | 0x53 | 0x56 => 2,
        0x70 => 5,
        0xa0 => 2 + b[1] as usize,
        0xb0 => 5 + u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize,
        0xc0 | 0xc1 => 2 + b[1] as usize,
        0xd0 | 0xd1 => 5 + u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize,
        0x00 => {
            let d = 1 + element_len(&b[1..]);
            d + element_len(&b[d..])
        }
        other => panic!("element code {other:#x} not expected in these performatives"),
    }
}

// ---------------------------------------------------------------------------------------------
// The direct message encoder and decoder (`third_party/fe2o3-amqp/src/link/fast_message.rs`).

mod message {
    use fe2o3_amqp::link::fast_message::{decode_common, encode_common};
    use fe2o3_amqp::types::messaging::message::__private::{Deserializable, Serializable};
    use fe2o3_amqp::types::messaging::{
        AmqpValue, ApplicationProperties, Batch, Body, Data, Header, Message, MessageAnnotations,
        MessageId, Priority, Properties,
    };
    use fe2o3_amqp::types::primitives::{Binary, Value};
    use proptest::prelude::*;

    fn serde_decode(bytes: &[u8]) -> Option<Message<Body<Value>>> {
        serde_amqp::from_slice::<Deserializable<Message<Body<Value>>>>(bytes)
            .ok()
            .map(|Deserializable(m)| m)
    }

    fn serde_encode(m: &Message<Body<Value>>) -> Vec<u8> {
        serde_amqp::to_vec(&Serializable(m)).unwrap()
    }

    fn header() -> impl Strategy<Value = Option<Header>> {
        proptest::option::of(
            (
                any::<bool>(),
                any::<u8>(),
                proptest::option::of(any::<u32>()),
                any::<bool>(),
                prop_oneof![Just(0u32), 1u32..256, any::<u32>()],
            )
                .prop_map(|(durable, p, ttl, first_acquirer, delivery_count)| Header {
                    durable,
                    priority: Priority(p),
                    ttl,
                    first_acquirer,
                    delivery_count,
                }),
        )
    }

    fn properties() -> impl Strategy<Value = Option<Properties>> {
        proptest::option::of(
            proptest::option::of("[a-z0-9:-]{0,300}").prop_map(|id| Properties {
                message_id: id.map(MessageId::String),
                ..Default::default()
            }),
        )
    }

    /// Messages of the covered shape, and now and then one with a section it leaves to serde.
    fn message() -> impl Strategy<Value = (Message<Body<Value>>, bool)> {
        (
            header(),
            properties(),
            proptest::collection::vec(any::<u8>(), 0..700),
            0u8..10,
        )
            .prop_map(|(header, properties, body, extra)| {
                let mut m = Message {
                    header,
                    delivery_annotations: None,
                    message_annotations: None,
                    properties,
                    application_properties: None,
                    body: Body::Data(Batch::new(vec![Data(Binary::from(body))])),
                    footer: None,
                };
                let covered = match extra {
                    0 => {
                        let mut a = ApplicationProperties::default();
                        a.0.insert("k".into(), 1i32.into());
                        m.application_properties = Some(a);
                        false
                    }
                    1 => {
                        m.message_annotations = Some(MessageAnnotations::default());
                        false
                    }
                    2 => {
                        m.body = Body::Value(AmqpValue(Value::String("v".into())));
                        false
                    }
                    3 => {
                        if let Some(p) = m.properties.as_mut() {
                            p.subject = Some("s".into());
                            false
                        } else {
                            true
                        }
                    }
                    _ => true,
                };
                (m, covered)
            })
    }

    proptest! {
        /// Whatever serde_amqp writes, the direct decoder reads as serde_amqp reads it, or
        /// declines it when it has a section the decoder leaves to serde.
        #[test]
        fn reads_what_serde_amqp_writes((m, covered) in message()) {
            let bytes = serde_encode(&m);
            match decode_common(&bytes) {
                Some(fast) => {
                    prop_assert!(covered);
                    prop_assert_eq!(&fast, &m);
                    prop_assert_eq!(Some(fast), serde_decode(&bytes));
                }
                None => prop_assert!(!covered, "declined a covered message"),
            }
        }

        /// The direct encoder writes every covered message, so that serde_amqp and the direct
        /// decoder both read it back as the same message, and declines the others.
        #[test]
        fn writes_what_serde_amqp_and_the_decoder_read_back((m, covered) in message()) {
            match encode_common(&m) {
                Some(bytes) => {
                    prop_assert!(covered, "encoded a message outside its shape");
                    prop_assert_eq!(serde_decode(&bytes), Some(m.clone()));
                    prop_assert_eq!(decode_common(&bytes), Some(m));
                }
                None => prop_assert!(!covered, "declined a covered message"),
            }
        }

        /// Damaged messages (a byte changed, the end cut off, bytes appended): the decoder
        /// declines or reads exactly what serde_amqp reads; it never reads something serde
        /// rejects or reads differently.
        #[test]
        fn damaged_messages_are_declined_or_read_as_serde_amqp_reads_them(
            (m, _) in message(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            how in 0u8..3,
        ) {
            let mut bytes = serde_encode(&m);
            let i = at.index(bytes.len());
            match how {
                0 => bytes[i] = byte,
                1 => bytes.truncate(i),
                _ => bytes.push(byte),
            }
            if let Some(fast) = decode_common(&bytes) {
                prop_assert_eq!(Some(fast), serde_decode(&bytes));
            }
        }
    }

    /// Shapes the strategy above does not make: declined by the encoder.
    #[test]
    fn other_ids_and_several_data_sections_are_declined() {
        let mut m = Message {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(Properties {
                message_id: Some(MessageId::Ulong(7)),
                ..Default::default()
            }),
            application_properties: None,
            body: Body::Data(Batch::new(vec![Data(Binary::from(b"x".to_vec()))])),
            footer: None,
        };
        assert!(encode_common(&m).is_none());
        m.properties = None;
        assert!(encode_common(&m).is_some());
        m.body = Body::Data(Batch::new(vec![
            Data(Binary::from(b"x".to_vec())),
            Data(Binary::from(b"y".to_vec())),
        ]));
        assert!(encode_common(&m).is_none());
    }
}

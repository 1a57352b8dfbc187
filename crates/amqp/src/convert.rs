//! AMQP 1.0 messages ↔ engine messages.
//!
//! The engine keeps a message as body bytes plus a JSON map of properties, so a message sent by
//! `keel send` and one sent by an AMQP client look alike to every consumer. The mapping:
//! - body: one `data` section → its bytes as they are; an `amqp-value` string → its UTF-8
//!   bytes; any other body (other values, sequences, several data sections) → its AMQP
//!   encoding. `$amqp.body` records which (absent = data), so the body goes out as it came in.
//! - application-properties → the top-level keys of the map (booleans, numbers and strings as
//!   JSON; other AMQP types as strings);
//! - the properties section's standard fields (message-id, subject, content-type, …) →
//!   `$amqp` (a key application properties cannot hold by accident: it starts with `$`);
//! - header: `priority` → priority; `ttl` → time to live; `durable: true` → asks for
//!   `assured_persistent` (the destination's maximum still caps it); no header or `durable:
//!   false` → the destination's default reliability. The message annotation
//!   `x-opt-keel-reliability` (`best_effort`, `express`, `reliable_persistent`,
//!   `assured_persistent`) names a level outright.
//!
//! Deliberately absent: delivery annotations and footers are not kept (they are per hop).

use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{
    AmqpSequence, AmqpValue, ApplicationProperties, Batch, Body, Data, Header, Message, MessageId,
    Properties as AmqpProperties,
};
use fe2o3_amqp::types::primitives::{Binary, OrderedMap, SimpleValue, Symbol, Value};
use keel_config::Reliability;
use keel_engine::messaging::{Delivery, OutgoingMessage, Properties};
use serde_json::Value as Json;

/// Key of the map entry that holds the AMQP properties section and the body kind.
pub const AMQP_KEY: &str = "$amqp";
/// Message annotation naming a reliability level.
pub const RELIABILITY_ANNOTATION: &str = "x-opt-keel-reliability";

/// Why an incoming message cannot be taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    #[error("message annotation {RELIABILITY_ANNOTATION} = {0:?} is not a reliability level (best_effort, express, reliable_persistent, assured_persistent)")]
    BadReliability(String),
    #[error("message body does not encode: {0}")]
    Encode(String),
}

/// An AMQP message as the engine takes it.
pub fn incoming(msg: Message<Body<Value>>) -> Result<OutgoingMessage, ConvertError> {
    let mut props = Properties::new();
    let mut amqp = serde_json::Map::new();
    let (body, kind) = match msg.body {
        Body::Data(batch) if batch.len() == 1 => {
            let d = batch.into_inner().pop().expect("one data section");
            (d.0.into_vec(), None)
        }
        Body::Value(AmqpValue(Value::String(s))) => (s.into_bytes(), Some("string")),
        Body::Empty => (Vec::new(), Some("empty")),
        other => {
            let kind = match &other {
                Body::Data(_) => "data-sections",
                Body::Sequence(_) => "sequence",
                _ => "value",
            };
            (encode_body(&other)?, Some(kind))
        }
    };
    if let Some(k) = kind {
        amqp.insert("body".into(), Json::from(k));
    }
    if let Some(p) = msg.properties {
        put_properties(&mut amqp, p);
    }
    if !amqp.is_empty() {
        props.insert(AMQP_KEY.into(), Json::Object(amqp));
    }
    if let Some(ApplicationProperties(map)) = msg.application_properties {
        for (k, v) in map.into_iter() {
            if k != AMQP_KEY {
                props.insert(k, simple_to_json(v));
            }
        }
    }
    let mut reliability = None;
    let mut priority = None;
    let mut ttl_ms = None;
    if let Some(h) = msg.header {
        if h.durable {
            reliability = Some(Reliability::AssuredPersistent);
        }
        priority = Some(h.priority.0);
        ttl_ms = h.ttl.map(u64::from);
    }
    if let Some(ann) = msg.message_annotations {
        for (k, v) in ann.0.iter() {
            let OwnedKey::Symbol(Symbol(name)) = k else {
                continue;
            };
            if name == RELIABILITY_ANNOTATION {
                let level = match v {
                    Value::String(s) => s.clone(),
                    Value::Symbol(Symbol(s)) => s.clone(),
                    other => format!("{other:?}"),
                };
                reliability = Some(
                    level
                        .parse::<Reliability>()
                        .map_err(|_| ConvertError::BadReliability(level))?,
                );
            }
        }
    }
    Ok(OutgoingMessage {
        body,
        properties: props,
        priority,
        reliability,
        ttl_ms,
    })
}

/// An engine delivery as an AMQP message (taken by value: the body moves, no copy).
pub fn outgoing(mut d: Delivery) -> Message<Body<Value>> {
    let amqp = d.properties.get(AMQP_KEY).and_then(Json::as_object);
    let kind = amqp
        .and_then(|a| a.get("body"))
        .and_then(Json::as_str)
        .unwrap_or("data");
    let body = match kind {
        "string" => Body::Value(AmqpValue(Value::String(
            String::from_utf8_lossy(&d.body).into_owned(),
        ))),
        "empty" => Body::Empty,
        "value" | "sequence" | "data-sections" => {
            decode_body(&d.body).unwrap_or_else(|| data_body(d.body.clone()))
        }
        _ => data_body(std::mem::take(&mut d.body)),
    };
    let app: OrderedMap<String, SimpleValue> = d
        .properties
        .iter()
        .filter(|(k, _)| k.as_str() != AMQP_KEY)
        .map(|(k, v)| (k.clone(), json_to_simple(v)))
        .collect();
    Message {
        header: Some(Header {
            durable: d.reliability.is_persistent(),
            priority: d.priority.into(),
            ttl: None,
            first_acquirer: d.delivery_count == 0,
            delivery_count: d.delivery_count,
        }),
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(get_properties(amqp, &d.id)),
        application_properties: (!app.is_empty()).then_some(ApplicationProperties(app)),
        body,
        footer: None,
    }
}

fn data_body(bytes: Vec<u8>) -> Body<Value> {
    Body::Data(Batch::new(vec![Data(Binary::from(bytes))]))
}

/// Any body as the AMQP encoding of its sections, one after another.
fn encode_body(body: &Body<Value>) -> Result<Vec<u8>, ConvertError> {
    let value = match body {
        Body::Value(AmqpValue(v)) => Value::List(vec![Value::Ubyte(0), v.clone()]),
        Body::Sequence(seqs) => Value::List(
            std::iter::once(Value::Ubyte(1))
                .chain(seqs.iter().map(|AmqpSequence(s)| Value::List(s.clone())))
                .collect(),
        ),
        Body::Data(ds) => Value::List(
            std::iter::once(Value::Ubyte(2))
                .chain(ds.iter().map(|Data(b)| Value::Binary(b.clone())))
                .collect(),
        ),
        Body::Empty => Value::List(vec![Value::Ubyte(3)]),
    };
    serde_amqp::to_vec(&value).map_err(|e| ConvertError::Encode(e.to_string()))
}

/// The inverse of `encode_body`; None when the bytes are not one (a message stored by
/// another path under a body kind it does not have: it goes out as data).
fn decode_body(bytes: &[u8]) -> Option<Body<Value>> {
    let Value::List(mut items) = serde_amqp::from_slice::<Value>(bytes).ok()? else {
        return None;
    };
    if items.is_empty() {
        return None;
    }
    let rest = items.split_off(1);
    match items[0] {
        Value::Ubyte(0) if rest.len() == 1 => Some(Body::Value(AmqpValue(
            rest.into_iter().next().expect("one value"),
        ))),
        Value::Ubyte(1) => {
            let seqs: Option<Vec<AmqpSequence<Value>>> = rest
                .into_iter()
                .map(|v| match v {
                    Value::List(l) => Some(AmqpSequence(l)),
                    _ => None,
                })
                .collect();
            Some(Body::Sequence(Batch::new(seqs?)))
        }
        Value::Ubyte(2) => {
            let ds: Option<Vec<Data>> = rest
                .into_iter()
                .map(|v| match v {
                    Value::Binary(b) => Some(Data(b)),
                    _ => None,
                })
                .collect();
            Some(Body::Data(Batch::new(ds?)))
        }
        Value::Ubyte(3) => Some(Body::Empty),
        _ => None,
    }
}

fn message_id_to_json(id: &MessageId) -> Json {
    match id {
        MessageId::Ulong(n) => Json::from(*n),
        MessageId::Uuid(u) => Json::from(format!("uuid:{}", keel_core::hex::encode(u.as_ref()))),
        MessageId::Binary(b) => {
            Json::from(format!("binary:{}", keel_core::hex::encode(b.as_ref())))
        }
        MessageId::String(s) => Json::from(s.clone()),
    }
}

fn json_to_message_id(v: &Json) -> Option<MessageId> {
    match v {
        Json::Number(n) => n.as_u64().map(MessageId::Ulong),
        Json::String(s) => {
            if let Some(h) = s.strip_prefix("binary:") {
                keel_core::hex::decode(h).map(|b| MessageId::Binary(Binary::from(b)))
            } else if let Some(h) = s.strip_prefix("uuid:") {
                let b: [u8; 16] = keel_core::hex::decode(h)?.try_into().ok()?;
                Some(MessageId::Uuid(b.into()))
            } else {
                Some(MessageId::String(s.clone()))
            }
        }
        _ => None,
    }
}

fn put_properties(amqp: &mut serde_json::Map<String, Json>, p: AmqpProperties) {
    let mut put = |k: &str, v: Option<Json>| {
        if let Some(v) = v {
            amqp.insert(k.into(), v);
        }
    };
    put("message_id", p.message_id.as_ref().map(message_id_to_json));
    put(
        "correlation_id",
        p.correlation_id.as_ref().map(message_id_to_json),
    );
    put("to", p.to.map(Json::from));
    put("subject", p.subject.map(Json::from));
    put("reply_to", p.reply_to.map(Json::from));
    put("content_type", p.content_type.map(|s| Json::from(s.0)));
    put(
        "content_encoding",
        p.content_encoding.map(|s| Json::from(s.0)),
    );
    put(
        "creation_time_ms",
        p.creation_time.map(|t| Json::from(t.milliseconds())),
    );
    put("group_id", p.group_id.map(Json::from));
    put("group_sequence", p.group_sequence.map(Json::from));
    put("reply_to_group_id", p.reply_to_group_id.map(Json::from));
    put(
        "user_id",
        p.user_id
            .map(|b| Json::from(String::from_utf8_lossy(b.as_ref()).into_owned())),
    );
}

/// The properties section of an outgoing message; `message-id` falls back to the engine's
/// system ID so every consumer sees an ID.
fn get_properties(amqp: Option<&serde_json::Map<String, Json>>, system_id: &str) -> AmqpProperties {
    let s = |k: &str| {
        amqp.and_then(|a| a.get(k))
            .and_then(Json::as_str)
            .map(str::to_string)
    };
    let n = |k: &str| amqp.and_then(|a| a.get(k)).and_then(Json::as_i64);
    AmqpProperties {
        message_id: amqp
            .and_then(|a| a.get("message_id"))
            .and_then(json_to_message_id)
            .or_else(|| Some(MessageId::String(system_id.to_string()))),
        user_id: s("user_id").map(|u| Binary::from(u.into_bytes())),
        to: s("to"),
        subject: s("subject"),
        reply_to: s("reply_to"),
        correlation_id: amqp
            .and_then(|a| a.get("correlation_id"))
            .and_then(json_to_message_id),
        content_type: s("content_type").map(Symbol::from),
        content_encoding: s("content_encoding").map(Symbol::from),
        absolute_expiry_time: None,
        creation_time: n("creation_time_ms").map(Into::into),
        group_id: s("group_id"),
        group_sequence: n("group_sequence").and_then(|v| u32::try_from(v).ok()),
        reply_to_group_id: s("reply_to_group_id"),
    }
}

fn simple_to_json(v: SimpleValue) -> Json {
    match v {
        SimpleValue::Null => Json::Null,
        SimpleValue::Bool(b) => Json::from(b),
        SimpleValue::Ubyte(n) => Json::from(n),
        SimpleValue::Ushort(n) => Json::from(n),
        SimpleValue::Uint(n) => Json::from(n),
        SimpleValue::Ulong(n) => Json::from(n),
        SimpleValue::Byte(n) => Json::from(n),
        SimpleValue::Short(n) => Json::from(n),
        SimpleValue::Int(n) => Json::from(n),
        SimpleValue::Long(n) => Json::from(n),
        SimpleValue::Float(f) => Json::from(f64::from(f.into_inner())),
        SimpleValue::Double(f) => Json::from(f.into_inner()),
        SimpleValue::String(s) => Json::from(s),
        SimpleValue::Symbol(s) => Json::from(s.0),
        SimpleValue::Timestamp(t) => Json::from(t.milliseconds()),
        other => Json::from(format!("{other:?}")),
    }
}

fn json_to_simple(v: &Json) -> SimpleValue {
    match v {
        Json::Null => SimpleValue::Null,
        Json::Bool(b) => SimpleValue::Bool(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                SimpleValue::Long(i)
            } else if let Some(u) = n.as_u64() {
                SimpleValue::Ulong(u)
            } else {
                SimpleValue::Double(n.as_f64().unwrap_or(0.0).into())
            }
        }
        Json::String(s) => SimpleValue::String(s.clone()),
        other => SimpleValue::String(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery_of(m: OutgoingMessage) -> Delivery {
        Delivery {
            dest: "q".into(),
            seq: 1,
            id: "u:1:1".into(),
            priority: m.priority.unwrap_or(4),
            reliability: m.reliability.unwrap_or(Reliability::AssuredPersistent),
            delivery_count: 0,
            properties: m.properties,
            body: m.body,
        }
    }

    fn round_trip(m: Message<Body<Value>>) -> Message<Body<Value>> {
        outgoing(delivery_of(incoming(m).expect("converts")))
    }

    #[test]
    fn data_string_and_other_bodies_go_out_as_they_came_in() {
        let bodies = vec![
            data_body(b"raw bytes".to_vec()),
            Body::Value(AmqpValue(Value::String("hello".into()))),
            Body::Value(AmqpValue(Value::Long(-7))),
            Body::Sequence(Batch::new(vec![AmqpSequence(vec![
                Value::Bool(true),
                Value::String("x".into()),
            ])])),
            Body::Data(Batch::new(vec![
                Data(Binary::from(vec![1u8])),
                Data(Binary::from(vec![2u8, 3])),
            ])),
            Body::Empty,
        ];
        for b in bodies {
            let m = Message::builder().body(b.clone()).build();
            assert_eq!(round_trip(m).body, b);
        }
    }

    #[test]
    fn a_data_body_is_stored_as_its_bytes_and_a_string_as_utf8() {
        let m = incoming(Message::builder().body(data_body(b"abc".to_vec())).build()).unwrap();
        assert_eq!(m.body, b"abc");
        assert!(m.properties.is_empty(), "nothing to record for plain data");
        let m = incoming(
            Message::builder()
                .body(Body::Value(AmqpValue(Value::String("héllo".into()))))
                .build(),
        )
        .unwrap();
        assert_eq!(m.body, "héllo".as_bytes());
    }

    #[test]
    fn properties_application_properties_and_header_map_both_ways() {
        let mut app = OrderedMap::new();
        app.insert("colour".to_string(), SimpleValue::String("red".into()));
        app.insert("count".to_string(), SimpleValue::Int(3));
        app.insert("ok".to_string(), SimpleValue::Bool(true));
        let m = Message::builder()
            .header(Header {
                durable: true,
                priority: 7.into(),
                ttl: Some(60_000),
                first_acquirer: false,
                delivery_count: 0,
            })
            .properties(AmqpProperties {
                message_id: Some(MessageId::String("m-1".into())),
                subject: Some("subj".into()),
                correlation_id: Some(MessageId::Ulong(42)),
                content_type: Some(Symbol::from("text/plain")),
                reply_to: Some("replies".into()),
                ..Default::default()
            })
            .application_properties(ApplicationProperties(app))
            .body(data_body(b"x".to_vec()))
            .build();
        let e = incoming(m).unwrap();
        assert_eq!(e.priority, Some(7));
        assert_eq!(e.ttl_ms, Some(60_000));
        assert_eq!(e.reliability, Some(Reliability::AssuredPersistent));
        assert_eq!(e.properties["colour"], Json::from("red"));
        assert_eq!(e.properties["count"], Json::from(3));
        let out = outgoing(delivery_of(e));
        let p = out.properties.unwrap();
        assert_eq!(p.message_id, Some(MessageId::String("m-1".into())));
        assert_eq!(p.correlation_id, Some(MessageId::Ulong(42)));
        assert_eq!(p.subject.as_deref(), Some("subj"));
        assert_eq!(p.reply_to.as_deref(), Some("replies"));
        assert_eq!(p.content_type, Some(Symbol::from("text/plain")));
        let app = out.application_properties.unwrap().0;
        assert_eq!(app.get("colour"), Some(&SimpleValue::String("red".into())));
        assert_eq!(app.get("ok"), Some(&SimpleValue::Bool(true)));
        assert!(app.get(AMQP_KEY).is_none());
        let h = out.header.unwrap();
        assert_eq!(h.priority.0, 7);
        assert!(h.durable);
    }

    fn simple_value() -> impl proptest::strategy::Strategy<Value = SimpleValue> {
        use proptest::prelude::*;
        prop_oneof![
            Just(SimpleValue::Null),
            any::<bool>().prop_map(SimpleValue::Bool),
            any::<i64>().prop_map(SimpleValue::Long),
            "[a-zA-Z0-9 ]{0,20}".prop_map(SimpleValue::String),
        ]
    }

    fn body() -> impl proptest::strategy::Strategy<Value = Body<Value>> {
        use proptest::prelude::*;
        let value = prop_oneof![
            any::<i64>().prop_map(Value::Long),
            ".{0,40}".prop_map(Value::String),
            proptest::collection::vec(any::<u8>(), 0..64)
                .prop_map(|b| Value::Binary(Binary::from(b))),
            any::<bool>().prop_map(Value::Bool),
        ];
        prop_oneof![
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..4)
                .prop_map(|ds| {
                    let sections: Vec<Data> =
                        ds.into_iter().map(|d| Data(Binary::from(d))).collect();
                    Body::Data(Batch::new(sections))
                }),
            value.clone().prop_map(|v| Body::Value(AmqpValue(v))),
            proptest::collection::vec(value, 0..5)
                .prop_map(|v| Body::Sequence(Batch::new(vec![AmqpSequence(v)]))),
            Just(Body::Empty),
        ]
    }

    proptest::proptest! {
        /// Whatever body and application properties a client sends, a consumer gets them
        /// back as sent (application property integers come back as longs: JSON numbers).
        #[test]
        fn any_message_round_trips(
            b in body(),
            props in proptest::collection::btree_map("[a-z]{1,8}", simple_value(), 0..6),
            subject in proptest::option::of("[a-z]{0,10}"),
        ) {
            let mut app = OrderedMap::new();
            for (k, v) in &props {
                app.insert(k.clone(), v.clone());
            }
            let m = Message::builder()
                .properties(AmqpProperties { subject: subject.clone(), ..Default::default() })
                .application_properties(ApplicationProperties(app))
                .body(b.clone())
                .build();
            let out = round_trip(m);
            proptest::prop_assert_eq!(&out.body, &b);
            proptest::prop_assert_eq!(out.properties.unwrap().subject, subject);
            let got = out.application_properties.map(|a| a.0).unwrap_or_default();
            proptest::prop_assert_eq!(got.len(), props.len());
            for (k, v) in &props {
                proptest::prop_assert_eq!(got.get(k), Some(v));
            }
        }
    }

    #[test]
    fn without_a_message_id_the_system_id_is_sent() {
        let e = incoming(Message::builder().body(data_body(vec![])).build()).unwrap();
        let out = outgoing(delivery_of(e));
        assert_eq!(
            out.properties.unwrap().message_id,
            Some(MessageId::String("u:1:1".into()))
        );
    }

    #[test]
    fn the_reliability_annotation_names_a_level_or_is_refused() {
        use fe2o3_amqp::types::messaging::MessageAnnotations;
        let with = |v: &str| {
            let mut ann = OrderedMap::new();
            ann.insert(
                OwnedKey::Symbol(Symbol::from(RELIABILITY_ANNOTATION)),
                Value::Symbol(Symbol::from(v)),
            );
            Message::builder()
                .message_annotations(MessageAnnotations(ann))
                .body(data_body(vec![1]))
                .build()
        };
        assert_eq!(
            incoming(with("express")).unwrap().reliability,
            Some(Reliability::Express)
        );
        assert_eq!(
            incoming(with("sometimes")).unwrap_err(),
            ConvertError::BadReliability("sometimes".into())
        );
    }
}

//! KEEL PATCH: a direct encoder and decoder for the common shape of a message, a
//! `Message<Body<Value>>` with an optional header, an optional properties section holding at
//! most a string message id, and one data section. serde_amqp writes and reads the same bytes
//! through generic visitors (about 5 % of all CPU, server and client, in Keel's peers
//! benchmark).
//!
//! Anything else (another descriptor form, annotations, application properties, other
//! properties, other bodies, several data sections, a footer, any encoding it does not
//! expect) is declined with `None` and the message takes the serde path as before, so this
//! never reads a message differently from serde_amqp, and what it writes serde_amqp reads back
//! as the same message. Proof: Keel's `crates/amqp/src/fast_codec_tests.rs` (against
//! serde_amqp on random messages and on random corruptions of them).

use fe2o3_amqp_types::messaging::{
    Batch, Body, Data, Header, Message, MessageId, Priority, Properties,
};
use bytes::{BufMut, Bytes, BytesMut};
use fe2o3_amqp_types::primitives::{Binary, Value};

const HEADER: u8 = 0x70;
const PROPERTIES: u8 = 0x73;
const DATA: u8 = 0x75;
/// Fields of the header and properties lists (AMQP 1.0 §3.2.1, §3.2.4).
const HEADER_FIELDS: usize = 5;
const PROPERTIES_FIELDS: usize = 13;

/// The message in `bytes`, when it has the common shape.
#[doc(hidden)]
pub fn decode_common(bytes: &[u8]) -> Option<Message<Body<Value>>> {
    let mut r = Reader { b: bytes, at: 0 };
    let mut header = None;
    let mut properties = None;
    let mut code = r.descriptor()?;
    if code == HEADER {
        header = Some(r.header()?);
        code = r.descriptor()?;
    }
    if code == PROPERTIES {
        properties = Some(r.properties()?);
        code = r.descriptor()?;
    }
    if code != DATA {
        return None;
    }
    let body = r.variable(0xa0, 0xb0)?;
    if r.at != bytes.len() {
        return None; // another section follows: serde's business
    }
    Some(Message {
        header,
        delivery_annotations: None,
        message_annotations: None,
        properties,
        application_properties: None,
        body: Body::Data(Batch::new(vec![Data(Binary::from(body.to_vec()))])),
        footer: None,
    })
}

/// `m` encoded, when it has the common shape.
#[doc(hidden)]
pub fn encode_common(m: &Message<Body<Value>>) -> Option<Bytes> {
    if m.delivery_annotations.is_some()
        || m.message_annotations.is_some()
        || m.application_properties.is_some()
        || m.footer.is_some()
    {
        return None;
    }
    let id = match &m.properties {
        None => None,
        Some(p) => Some(only_string_id(p)?),
    };
    let Body::Data(batch) = &m.body else {
        return None;
    };
    if batch.len() != 1 {
        return None;
    }
    let body: &[u8] = batch.first()?.0.as_ref();
    let id_len = id.flatten().map_or(0, str::len);
    if u32::try_from(body.len()).is_err() || u32::try_from(id_len).is_err() {
        return None;
    }
    // Header ≤ 3 + 2 + 15, properties ≤ 3 + 9 + 5 + id, data ≤ 3 + 5 + body.
    let mut buf = BytesMut::with_capacity(64 + id_len + body.len());
    if let Some(h) = &m.header {
        put_header(&mut buf, h);
    }
    if let Some(id) = id {
        put_properties(&mut buf, id);
    }
    buf.put_slice(&[0x00, 0x53, DATA]);
    put_variable(&mut buf, 0xa0, 0xb0, body);
    Some(buf.freeze())
}

/// `Some(id)` when the message id is absent (`None`) or a string and every other property is
/// absent; `None` (declined) otherwise.
fn only_string_id(p: &Properties) -> Option<Option<&str>> {
    let Properties {
        message_id,
        user_id: None,
        to: None,
        subject: None,
        reply_to: None,
        correlation_id: None,
        content_type: None,
        content_encoding: None,
        absolute_expiry_time: None,
        creation_time: None,
        group_id: None,
        group_sequence: None,
        reply_to_group_id: None,
    } = p
    else {
        return None;
    };
    match message_id {
        None => Some(None),
        Some(MessageId::String(id)) => Some(Some(id)),
        Some(_) => None,
    }
}

fn put_header(buf: &mut BytesMut, h: &Header) {
    let mut fields = [0u8; 15];
    let mut n = 0;
    let mut put = |bytes: &[u8]| {
        fields[n..n + bytes.len()].copy_from_slice(bytes);
        n += bytes.len();
    };
    put(&[bool_code(h.durable)]);
    put(&[0x50, h.priority.0]);
    match h.ttl {
        None => put(&[0x40]),
        Some(t) => put_uint(&mut put, t),
    }
    put(&[bool_code(h.first_acquirer)]);
    put_uint(&mut put, h.delivery_count);
    assert!(n <= fields.len());
    // list8: size counts the count byte and the fields.
    buf.put_slice(&[0x00, 0x53, HEADER, 0xc0, (n + 1) as u8, HEADER_FIELDS as u8]);
    buf.put_slice(&fields[..n]);
}

fn put_properties(buf: &mut BytesMut, id: Option<&str>) {
    buf.put_slice(&[0x00, 0x53, PROPERTIES]);
    let Some(id) = id else {
        buf.put_u8(0x45); // list0: every property absent
        return;
    };
    let id_len = if id.len() < 256 { 2 } else { 5 } + id.len();
    if id_len < 255 {
        buf.put_slice(&[0xc0, (id_len + 1) as u8, 1]);
    } else {
        // list32: size counts the 4-byte count and the field.
        buf.put_u8(0xd0);
        buf.put_u32((id_len + 4) as u32);
        buf.put_u32(1);
    }
    put_variable(buf, 0xa1, 0xb1, id.as_bytes());
}

/// A binary (`0xa0`/`0xb0`) or string (`0xa1`/`0xb1`): 1-byte length below 256, else 4.
fn put_variable(buf: &mut BytesMut, code8: u8, code32: u8, bytes: &[u8]) {
    if bytes.len() < 256 {
        buf.put_slice(&[code8, bytes.len() as u8]);
    } else {
        buf.put_u8(code32);
        buf.put_u32(bytes.len() as u32);
    }
    buf.put_slice(bytes);
}

fn put_uint(put: &mut impl FnMut(&[u8]), v: u32) {
    match v {
        0 => put(&[0x43]),
        1..=255 => put(&[0x52, v as u8]),
        _ => {
            let b = v.to_be_bytes();
            put(&[0x70, b[0], b[1], b[2], b[3]]);
        }
    }
}

fn bool_code(b: bool) -> u8 {
    if b {
        0x41
    } else {
        0x42
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let v = *self.b.get(self.at)?;
        self.at += 1;
        Some(v)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    /// A section descriptor as a small numeric code; symbolic descriptors are declined.
    fn descriptor(&mut self) -> Option<u8> {
        if self.u8()? != 0x00 {
            return None;
        }
        match self.u8()? {
            0x53 => self.u8(),
            0x80 => {
                let v = u64::from_be_bytes(self.take(8)?.try_into().ok()?);
                u8::try_from(v).ok()
            }
            _ => None,
        }
    }

    /// A list's field count and the offset where it ends.
    fn list(&mut self, fields_max: usize) -> Option<(usize, usize)> {
        let (count, end) = match self.u8()? {
            0x45 => (0, self.at),
            0xc0 => {
                let size = self.u8()? as usize;
                let end = self.at + size;
                (self.u8()? as usize, end)
            }
            0xd0 => {
                let size = self.u32()? as usize;
                let end = self.at.checked_add(size)?;
                (self.u32()? as usize, end)
            }
            _ => return None,
        };
        (count <= fields_max && end <= self.b.len() && end >= self.at).then_some((count, end))
    }

    /// A field that may be null: `None` for null, `Some(code)` otherwise.
    fn code(&mut self) -> Option<Option<u8>> {
        match self.u8()? {
            0x40 => Some(None),
            c => Some(Some(c)),
        }
    }

    fn bool_field(&mut self) -> Option<bool> {
        match self.code()? {
            None | Some(0x42) => Some(false),
            Some(0x41) => Some(true),
            Some(0x56) => match self.u8()? {
                0 => Some(false),
                1 => Some(true),
                _ => None,
            },
            Some(_) => None,
        }
    }

    fn uint_field(&mut self) -> Option<Option<u32>> {
        Some(match self.code()? {
            None => None,
            Some(0x43) => Some(0),
            Some(0x52) => Some(u32::from(self.u8()?)),
            Some(0x70) => Some(self.u32()?),
            Some(_) => return None,
        })
    }

    fn header(&mut self) -> Option<Header> {
        let (count, end) = self.list(HEADER_FIELDS)?;
        let mut h = Header::default();
        for i in 0..count {
            match i {
                0 => h.durable = self.bool_field()?,
                1 => {
                    h.priority = match self.code()? {
                        None => Priority::default(),
                        Some(0x50) => Priority(self.u8()?),
                        Some(_) => return None,
                    }
                }
                2 => h.ttl = self.uint_field()?,
                3 => h.first_acquirer = self.bool_field()?,
                _ => h.delivery_count = self.uint_field()?.unwrap_or(0),
            }
        }
        (self.at == end).then_some(h)
    }

    fn properties(&mut self) -> Option<Properties> {
        let (count, end) = self.list(PROPERTIES_FIELDS)?;
        let mut p = Properties::default();
        for i in 0..count {
            if i == 0 {
                let at = self.at;
                if self.code()?.is_some() {
                    self.at = at;
                    let s = self.variable(0xa1, 0xb1)?;
                    p.message_id = Some(MessageId::String(std::str::from_utf8(s).ok()?.into()));
                }
            } else if self.code()?.is_some() {
                return None; // any other property: serde's business
            }
        }
        (self.at == end).then_some(p)
    }

    /// A binary (`0xa0`/`0xb0`) or string (`0xa1`/`0xb1`), as its bytes.
    fn variable(&mut self, code8: u8, code32: u8) -> Option<&'a [u8]> {
        let c = self.u8()?;
        let len = if c == code8 {
            self.u8()? as usize
        } else if c == code32 {
            self.u32()? as usize
        } else {
            return None;
        };
        self.take(len)
    }
}

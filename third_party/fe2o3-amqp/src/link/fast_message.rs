//! KEEL PATCH: a direct decoder for the common shape of a received message, a
//! `Message<Body<Value>>` with an optional header, an optional properties section holding at
//! most a string message id, and one data section. serde_amqp reads the same bytes through
//! generic visitors (about 3 % of all CPU, server and client, in Keel's peers benchmark).
//!
//! Anything else (another descriptor form, annotations, application properties, other
//! properties, other bodies, several data sections, a footer, any encoding it does not
//! expect) is declined with `None` and the message takes the serde path as before, so this
//! never reads a message differently from serde_amqp: it reads what it covers or nothing.
//! Proof: Keel's `crates/amqp/src/fast_codec_tests.rs` (equal to serde_amqp on random
//! messages and on random corruptions of them).

use fe2o3_amqp_types::messaging::{
    Batch, Body, Data, Header, Message, MessageId, Priority, Properties,
};
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

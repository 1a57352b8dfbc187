//! KEEL PATCH: a direct encoder and decoder for the three performatives of the steady state
//! (transfer, disposition, flow), which every message crosses several times.
//!
//! serde_amqp encodes a described list by serializing its fields into a temporary buffer
//! (allocating for the buffer and for the serializer's own state) and decodes through a chain
//! of visitors; profiles of a broker under load put these three performatives at about 8 % of
//! all CPU (client and server together). Here they are written and read in place.
//!
//! Scope, on purpose: only the shapes that carry no nested structure beyond an `accepted` or
//! `released` state. Anything else (another delivery state, flow properties, a delivery tag
//! longer than 254 bytes, a descriptor written as a symbol, an encoding this reader does not
//! know) makes these functions decline (`None` / `false`) having written or consumed nothing,
//! and the caller uses serde_amqp as before. The output is byte-for-byte what serde_amqp
//! writes for the same value (null for a default boolean, trailing nulls trimmed, the
//! smallest integer encoding, list8 when it fits), so the two paths are interchangeable;
//! `keel-amqp`'s `fast_codec` tests check both directions against serde_amqp.

use bytes::{BufMut, BytesMut};
use fe2o3_amqp_types::definitions::{DeliveryTag, Handle, ReceiverSettleMode, Role};
use fe2o3_amqp_types::messaging::{Accepted, DeliveryState, Released};
use fe2o3_amqp_types::performatives::{Disposition, Flow, Transfer};

const DESCRIBED: u8 = 0x00;
const SMALL_ULONG: u8 = 0x53;
const NULL: u8 = 0x40;
const TRUE: u8 = 0x41;
const FALSE: u8 = 0x42;
const BOOLEAN: u8 = 0x56;
const UBYTE: u8 = 0x50;
const UINT0: u8 = 0x43;
const SMALL_UINT: u8 = 0x52;
const UINT: u8 = 0x70;
const VBIN8: u8 = 0xa0;
const VBIN32: u8 = 0xb0;
const LIST0: u8 = 0x45;
const LIST8: u8 = 0xc0;
const LIST32: u8 = 0xd0;

const CODE_FLOW: u8 = 0x13;
const CODE_TRANSFER: u8 = 0x14;
const CODE_DISPOSITION: u8 = 0x15;
const CODE_ACCEPTED: u8 = 0x24;
const CODE_RELEASED: u8 = 0x26;

/// Room for the fields of the largest performative encoded here: a transfer with a 254-byte
/// tag (11 fields, at most 5 bytes each besides the tag) fits with margin.
const FIELDS_BYTES_MAX: usize = 320;

/// The fields of one described list, written to the stack before the list header (whose
/// size depends on them).
struct Fields {
    buf: [u8; FIELDS_BYTES_MAX],
    len: usize,
    count: u8,
    /// Bytes and count up to the last non-null field: trailing nulls are dropped.
    kept_len: usize,
    kept_count: u8,
}

impl Fields {
    fn new() -> Self {
        Fields {
            buf: [0; FIELDS_BYTES_MAX],
            len: 0,
            count: 0,
            kept_len: 0,
            kept_count: 0,
        }
    }

    fn put(&mut self, bytes: &[u8]) {
        // The callers bound what they put (see FIELDS_BYTES_MAX); exceeding it is a bug here.
        assert!(self.len + bytes.len() <= FIELDS_BYTES_MAX, "fast codec fields overflow");
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn field(&mut self, bytes: &[u8]) {
        self.put(bytes);
        self.count += 1;
        if bytes != [NULL] {
            self.kept_len = self.len;
            self.kept_count = self.count;
        }
    }

    fn null(&mut self) {
        self.field(&[NULL]);
    }

    fn uint(&mut self, v: u32) {
        match v {
            0 => self.field(&[UINT0]),
            1..=255 => self.field(&[SMALL_UINT, v as u8]),
            _ => {
                let b = v.to_be_bytes();
                self.field(&[UINT, b[0], b[1], b[2], b[3]])
            }
        }
    }

    fn opt_uint(&mut self, v: Option<u32>) {
        match v {
            Some(v) => self.uint(v),
            None => self.null(),
        }
    }

    /// A mandatory boolean or an optional one that is set.
    fn bool(&mut self, v: bool) {
        self.field(&[if v { TRUE } else { FALSE }]);
    }

    fn opt_bool(&mut self, v: Option<bool>) {
        match v {
            Some(v) => self.bool(v),
            None => self.null(),
        }
    }

    /// A boolean with a default of false: serde_amqp writes the default as null.
    fn default_bool(&mut self, v: bool) {
        if v {
            self.field(&[TRUE])
        } else {
            self.null()
        }
    }

    /// False when the state is one this module leaves to serde_amqp.
    fn state(&mut self, state: Option<&DeliveryState>) -> bool {
        match state {
            None => self.null(),
            Some(DeliveryState::Accepted(_)) => {
                self.field(&[DESCRIBED, SMALL_ULONG, CODE_ACCEPTED, LIST0])
            }
            Some(DeliveryState::Released(_)) => {
                self.field(&[DESCRIBED, SMALL_ULONG, CODE_RELEASED, LIST0])
            }
            Some(_) => return false,
        }
        true
    }

    /// Writes the described list (descriptor, header, kept fields) to `dst`.
    fn finish(&self, code: u8, dst: &mut BytesMut) -> usize {
        let body = &self.buf[..self.kept_len];
        let count = self.kept_count;
        let start = dst.len();
        dst.put_slice(&[DESCRIBED, SMALL_ULONG, code]);
        if count == 0 {
            dst.put_u8(LIST0);
        } else if body.len() < 255 {
            // list8: the size counts the count byte too.
            dst.put_slice(&[LIST8, body.len() as u8 + 1, count]);
        } else {
            dst.put_u8(LIST32);
            dst.put_u32(body.len() as u32 + 4);
            dst.put_u32(count as u32);
        }
        dst.put_slice(body);
        dst.len() - start
    }

    /// Length `finish` would write.
    fn finished_len(&self) -> usize {
        let header = if self.kept_count == 0 {
            1
        } else if self.kept_len < 255 {
            3
        } else {
            9
        };
        3 + header + self.kept_len
    }
}

fn transfer_fields(t: &Transfer) -> Option<Fields> {
    let mut f = Fields::new();
    f.uint(t.handle.0);
    f.opt_uint(t.delivery_id);
    match &t.delivery_tag {
        Some(tag) if tag.len() < 255 => {
            f.put(&[VBIN8, tag.len() as u8]);
            f.count += 1;
            f.put(tag);
            f.kept_len = f.len;
            f.kept_count = f.count;
        }
        Some(_) => return None,
        None => f.null(),
    }
    f.opt_uint(t.message_format);
    f.opt_bool(t.settled);
    f.default_bool(t.more);
    match t.rcv_settle_mode {
        Some(ReceiverSettleMode::First) => f.field(&[UBYTE, 0]),
        Some(ReceiverSettleMode::Second) => f.field(&[UBYTE, 1]),
        None => f.null(),
    }
    if !f.state(t.state.as_ref()) {
        return None;
    }
    f.default_bool(t.resume);
    f.default_bool(t.aborted);
    f.default_bool(t.batchable);
    Some(f)
}

/// Appends `t` to `dst`; false (nothing written) when serde_amqp must encode it.
pub fn encode_transfer(t: &Transfer, dst: &mut BytesMut) -> bool {
    match transfer_fields(t) {
        Some(f) => {
            f.finish(CODE_TRANSFER, dst);
            true
        }
        None => false,
    }
}

/// The encoded size of `t`, when this module encodes it.
pub fn transfer_len(t: &Transfer) -> Option<usize> {
    transfer_fields(t).map(|f| f.finished_len())
}

/// Appends `d` to `dst`; false (nothing written) when serde_amqp must encode it.
pub fn encode_disposition(d: &Disposition, dst: &mut BytesMut) -> bool {
    let mut f = Fields::new();
    f.bool(matches!(d.role, Role::Receiver));
    f.uint(d.first);
    f.opt_uint(d.last);
    f.default_bool(d.settled);
    if !f.state(d.state.as_ref()) {
        return false;
    }
    f.default_bool(d.batchable);
    f.finish(CODE_DISPOSITION, dst);
    true
}

/// Appends `fl` to `dst`; false (nothing written) when serde_amqp must encode it.
pub fn encode_flow(fl: &Flow, dst: &mut BytesMut) -> bool {
    if fl.properties.is_some() {
        return false;
    }
    let mut f = Fields::new();
    f.opt_uint(fl.next_incoming_id);
    f.uint(fl.incoming_window);
    f.uint(fl.next_outgoing_id);
    f.uint(fl.outgoing_window);
    f.opt_uint(fl.handle.as_ref().map(|h| h.0));
    f.opt_uint(fl.delivery_count);
    f.opt_uint(fl.link_credit);
    f.opt_uint(fl.available);
    f.default_bool(fl.drain);
    f.default_bool(fl.echo);
    f.null(); // properties
    f.finish(CODE_FLOW, dst);
    true
}

/// A performative read by [`decode`].
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// A transfer; its payload follows the performative in the frame.
    Transfer(Transfer),
    /// A disposition.
    Disposition(Disposition),
    /// A flow.
    Flow(Flow),
}

/// Reads the elements of a list; `None` means "leave it to serde_amqp".
struct Reader<'a> {
    src: &'a [u8],
    pos: usize,
    /// Elements of the list not read yet; a missing trailing element reads as null.
    left: u32,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.src.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.src.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The next element's format code, or null for an element past the end of the list.
    fn code(&mut self) -> Option<u8> {
        if self.left == 0 {
            return Some(NULL);
        }
        self.left -= 1;
        self.byte()
    }

    fn opt_uint(&mut self) -> Option<Option<u32>> {
        Some(match self.code()? {
            NULL => None,
            UINT0 => Some(0),
            SMALL_UINT => Some(self.byte()? as u32),
            UINT => Some(self.u32()?),
            _ => return None,
        })
    }

    fn uint(&mut self) -> Option<u32> {
        self.opt_uint()?
    }

    fn opt_bool(&mut self) -> Option<Option<bool>> {
        Some(match self.code()? {
            NULL => None,
            TRUE => Some(true),
            FALSE => Some(false),
            BOOLEAN => match self.byte()? {
                0 => Some(false),
                1 => Some(true),
                _ => return None,
            },
            _ => return None,
        })
    }

    fn default_bool(&mut self) -> Option<bool> {
        Some(self.opt_bool()?.unwrap_or(false))
    }

    fn opt_binary(&mut self) -> Option<Option<&'a [u8]>> {
        Some(match self.code()? {
            NULL => None,
            VBIN8 => {
                let n = self.byte()? as usize;
                Some(self.take(n)?)
            }
            VBIN32 => {
                let n = self.u32()? as usize;
                Some(self.take(n)?)
            }
            _ => return None,
        })
    }

    fn state(&mut self) -> Option<Option<DeliveryState>> {
        match self.code()? {
            NULL => Some(None),
            DESCRIBED => {
                if self.byte()? != SMALL_ULONG {
                    return None;
                }
                let code = self.byte()?;
                // An empty list, in any of its encodings.
                match self.byte()? {
                    LIST0 => {}
                    LIST8 => {
                        if self.take(2)? != [1, 0] {
                            return None;
                        }
                    }
                    LIST32 => {
                        if self.take(8)? != [0, 0, 0, 4, 0, 0, 0, 0] {
                            return None;
                        }
                    }
                    _ => return None,
                }
                match code {
                    CODE_ACCEPTED => Some(Some(DeliveryState::Accepted(Accepted {}))),
                    CODE_RELEASED => Some(Some(DeliveryState::Released(Released {}))),
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

/// Reads a transfer, disposition or flow performative at the start of `src` (a frame body);
/// returns it with the number of bytes it took. `None` for any other performative and for
/// anything this reader does not handle: the caller then decodes `src` with serde_amqp, which
/// also reports what is malformed.
pub fn decode(src: &[u8]) -> Option<(Decoded, usize)> {
    let [DESCRIBED, SMALL_ULONG, code, list, ..] = *src else {
        return None;
    };
    if !matches!(code, CODE_TRANSFER | CODE_DISPOSITION | CODE_FLOW) {
        return None;
    }
    let (count, start, end) = match list {
        LIST0 => (0u32, 4, 4),
        LIST8 => {
            let size = *src.get(4)? as usize;
            let count = *src.get(5)? as u32;
            (count, 6, 5usize.checked_add(size)?)
        }
        LIST32 => {
            let size = u32::from_be_bytes(src.get(4..8)?.try_into().ok()?) as usize;
            let count = u32::from_be_bytes(src.get(8..12)?.try_into().ok()?);
            (count, 12, 8usize.checked_add(size)?)
        }
        _ => return None,
    };
    if end < start || end > src.len() {
        return None;
    }
    let mut r = Reader {
        src: &src[..end],
        pos: start,
        left: count,
    };
    let decoded = match code {
        CODE_TRANSFER => {
            if count > 11 {
                return None;
            }
            let handle = Handle(r.uint()?);
            let delivery_id = r.opt_uint()?;
            let delivery_tag = r.opt_binary()?.map(|t| DeliveryTag::from(t.to_vec()));
            let message_format = r.opt_uint()?;
            let settled = r.opt_bool()?;
            let more = r.default_bool()?;
            let rcv_settle_mode = match r.code()? {
                NULL => None,
                UBYTE => match r.byte()? {
                    0 => Some(ReceiverSettleMode::First),
                    1 => Some(ReceiverSettleMode::Second),
                    _ => return None,
                },
                _ => return None,
            };
            let state = r.state()?;
            Decoded::Transfer(Transfer {
                handle,
                delivery_id,
                delivery_tag,
                message_format,
                settled,
                more,
                rcv_settle_mode,
                state,
                resume: r.default_bool()?,
                aborted: r.default_bool()?,
                batchable: r.default_bool()?,
            })
        }
        CODE_DISPOSITION => {
            if count > 6 {
                return None;
            }
            let role = match r.opt_bool()?? {
                true => Role::Receiver,
                false => Role::Sender,
            };
            Decoded::Disposition(Disposition {
                role,
                first: r.uint()?,
                last: r.opt_uint()?,
                settled: r.default_bool()?,
                state: r.state()?,
                batchable: r.default_bool()?,
            })
        }
        _ => {
            if count > 11 {
                return None;
            }
            let flow = Flow {
                next_incoming_id: r.opt_uint()?,
                incoming_window: r.uint()?,
                next_outgoing_id: r.uint()?,
                outgoing_window: r.uint()?,
                handle: r.opt_uint()?.map(Handle),
                delivery_count: r.opt_uint()?,
                link_credit: r.opt_uint()?,
                available: r.opt_uint()?,
                drain: r.default_bool()?,
                echo: r.default_bool()?,
                properties: None,
            };
            if r.code()? != NULL {
                return None; // properties: serde_amqp's
            }
            Decoded::Flow(flow)
        }
    };
    // Every element read, and exactly the list's bytes.
    if r.left != 0 || r.pos != end {
        return None;
    }
    Some((decoded, end))
}

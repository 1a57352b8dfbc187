//! KEEL PATCH: a structural check of AMQP-encoded bytes before serde_amqp reads them.
//!
//! serde_amqp allocates from announced lengths: a `str32`, `sym32` or `vbin32` is read into
//! `vec![0; len]` (and `IoReader` first resizes its buffer to `len`) before it finds the bytes
//! are not there, so a 12-byte SASL frame announcing a 4 GiB string made an unauthenticated
//! peer's connection allocate 4 GiB (regression: `keel-amqp`'s fuzz tests). Nested lists and
//! maps are read by recursion, so deep nesting could exhaust a task's stack.
//!
//! [`check_value`] walks one encoded value (described types, lists, maps, arrays) and refuses
//! it unless every announced length and size fits the bytes actually present, every list, map
//! and array fills exactly the size it announces (so a reader going by size and one going by
//! count see the same elements), a map counts keys and values in pairs, an array does not announce more elements than its size has
//! bytes, and nesting stays within [`DEPTH_MAX`]. A value that passes makes serde_amqp
//! allocate at most about the input's length per string or binary it holds. The walk reads
//! each byte once and allocates nothing.

/// Most levels of nesting (described values, lists, maps, arrays) accepted. AMQP's own types
/// nest a handful deep; application values deeper than this are refused.
pub const DEPTH_MAX: usize = 64;

/// Why bytes were refused.
pub type Refusal = &'static str;

/// Checks the one value at the start of `b`; returns how many bytes it takes.
pub fn check_value(b: &[u8]) -> Result<usize, Refusal> {
    value(b, 0)
}

/// Checks that `b` is a sequence of whole values (a message's sections) to its end.
pub fn check_values(b: &[u8]) -> Result<(), Refusal> {
    let mut at = 0;
    while at < b.len() {
        at += value(&b[at..], 0)?;
    }
    assert_eq!(at, b.len(), "values end at the input's end");
    Ok(())
}

fn depth_ok(depth: usize) -> Result<(), Refusal> {
    if depth > DEPTH_MAX {
        Err("values nested too deep")
    } else {
        Ok(())
    }
}

/// One value (constructor and payload) at the start of `b`.
fn value(b: &[u8], depth: usize) -> Result<usize, Refusal> {
    depth_ok(depth)?;
    let (code, used) = constructor(b, depth)?;
    Ok(used + payload(code, &b[used..], depth)?)
}

/// A constructor: a primitive format code, or 0x00, a descriptor value and a primitive format
/// code. Returns the primitive code and the bytes the constructor takes.
fn constructor(b: &[u8], depth: usize) -> Result<(u8, usize), Refusal> {
    let code = *b.first().ok_or("a value is cut short")?;
    if code != 0x00 {
        return Ok((code, 1));
    }
    let descriptor = value(&b[1..], depth + 1)?;
    let at = 1 + descriptor;
    let (inner, used) = constructor(&b[at..], depth + 1)?;
    Ok((inner, at + used))
}

/// Reads a big-endian length of `width` (1 or 4) bytes at the start of `b`.
fn length(b: &[u8], width: usize) -> Result<usize, Refusal> {
    let bytes = b.get(..width).ok_or("a length is cut short")?;
    Ok(bytes.iter().fold(0usize, |n, x| (n << 8) | usize::from(*x)))
}

/// Bytes of a fixed-width payload by format code, or None for a code of another kind.
fn fixed_width(code: u8) -> Option<usize> {
    match code >> 4 {
        0x4 => Some(0),
        0x5 => Some(1),
        0x6 => Some(2),
        0x7 => Some(4),
        0x8 => Some(8),
        0x9 => Some(16),
        _ => None,
    }
}

/// The payload of a value of primitive `code` at the start of `b`; returns its length.
fn payload(code: u8, b: &[u8], depth: usize) -> Result<usize, Refusal> {
    if let Some(width) = fixed_width(code) {
        return if b.len() >= width {
            Ok(width)
        } else {
            Err("a fixed-width value is cut short")
        };
    }
    let width = match code >> 4 {
        0xa | 0xc | 0xe => 1,
        0xb | 0xd | 0xf => 4,
        _ => return Err("an unknown format code"),
    };
    let size = length(b, width)?;
    let body = b
        .get(width..)
        .and_then(|rest| rest.get(..size))
        .ok_or("a length or size is over the bytes present")?;
    match code >> 4 {
        // Binary, string, symbol: bytes only.
        0xa | 0xb => {}
        // List, map: a count, then exactly `size` bytes of elements.
        0xc | 0xd => {
            let count = length(body, width)?;
            // A map counts keys and values: serde_amqp subtracts 2 per entry and underflowed
            // on an odd count (a panic in debug builds).
            if code & 0x0f == 0x01 && count % 2 == 1 {
                return Err("a map counts an odd number of keys and values");
            }
            let mut at = width;
            for _ in 0..count {
                if at >= body.len() {
                    return Err("a list or map holds fewer elements than it counts");
                }
                at += value(&body[at..], depth + 1)?;
            }
            if at != body.len() {
                return Err("a list or map does not fill its size");
            }
        }
        // Array: a count, one constructor, then `count` payloads of its type.
        _ => {
            let count = length(body, width)?;
            if count > size {
                return Err("an array counts more elements than its size has bytes");
            }
            if count == 0 && body.len() == width {
                // serde_amqp writes an empty array without an element constructor.
                return Ok(width + size);
            }
            let (element, used) = constructor(&body[width..], depth + 1)?;
            let mut at = width + used;
            for _ in 0..count {
                at += payload(element, &body[at..], depth + 1)?;
            }
            if at != body.len() {
                return Err("an array does not fill its size");
            }
        }
    }
    Ok(width + size)
}

//! Lower-case hex for bytes that travel as text (AMQP binary message IDs, XA transaction ids in
//! SQL statements and PostgreSQL gids).

const DIGITS: &[u8; 16] = b"0123456789abcdef";

pub fn encode(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(DIGITS[usize::from(x >> 4)] as char);
        s.push(DIGITS[usize::from(x & 15)] as char);
    }
    s
}

/// None unless `s` is an even number of hex digits (either case).
pub fn decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trips_and_refuses_what_is_not_hex() {
        let b = [0u8, 1, 0x7f, 0xab, 0xff];
        assert_eq!(super::encode(&b), "00017fabff");
        assert_eq!(super::decode("00017FABff").as_deref(), Some(&b[..]));
        assert_eq!(super::decode("abc"), None);
        assert_eq!(super::decode("zz"), None);
        assert_eq!(super::decode("é0"), None);
    }
}

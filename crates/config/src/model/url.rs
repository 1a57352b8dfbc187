//! Passwords in URLs: found (to refuse them in the configuration) and taken out (to keep them
//! in the profile's secrets). The password is percent-decoded by the `percent-encoding` crate.

/// Byte range of the password in `url` (`scheme://user:PASSWORD@host/...`), if it has one.
/// Deliberately broad, so that a password is never stored by mistake: the user information is
/// everything before the *last* `@` (a password may hold an unescaped `@` or `/`), and any `:` in
/// it starts a password. A `@` elsewhere in a URL is written `%40`.
fn url_password_range(url: &str) -> Option<std::ops::Range<usize>> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let at = rest.rfind('@')?;
    let colon = rest[..at].find(':')?;
    Some(start + colon + 1..start + at)
}

/// Whether `url` holds a password (see [`take_url_password`]).
pub fn url_has_password(url: &str) -> bool {
    url_password_range(url).is_some()
}

/// Splits the password out of `url`: `postgresql://u:secret@h/db` gives
/// (`postgresql://u@h/db`, `Some("secret")`). The password is percent-decoded (`p%40ss` is
/// `p@ss`) unless that would not give UTF-8 text. A URL without a password comes back as is.
pub fn take_url_password(url: &str) -> (String, Option<String>) {
    let Some(r) = url_password_range(url) else {
        return (url.to_string(), None);
    };
    let raw = &url[r.clone()];
    let password = percent_decode(raw).unwrap_or_else(|| raw.to_string());
    // Drop the `:` before the password too.
    let clean = format!("{}{}", &url[..r.start - 1], &url[r.end..]);
    (clean, Some(password))
}

/// Whether a member's `store_url` (given without its `postgresql://` scheme) holds a password:
/// a `:` before its first `@`. Narrower than [`url_has_password`] (a `:` before the *last* `@`),
/// which data source URLs use; kept as it always was, so no store URL accepted before is
/// refused now.
pub(crate) fn store_url_has_password(rest: &str) -> bool {
    rest.contains('@')
        && rest
            .split('@')
            .next()
            .is_some_and(|userinfo| userinfo.contains(':'))
}

/// `s` percent-decoded (`%` and two hex digits is a byte, anything else is itself), or `None`
/// when the bytes are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    /// The hand-written decoder `percent_decode` replaced, kept as the reference: `%` and two
    /// hex digits (either case) is a byte, anything else is itself; `None` unless UTF-8.
    fn hand_decode(s: &str) -> Option<String> {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            match (
                b[i],
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                (b'%', Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                }
                (c, _, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).ok()
    }

    const TRICKY: &[&str] = &[
        "",
        "plain",
        "p%40ss%2F",
        "p%40SS%2f",
        "100%",
        "%",
        "%%",
        "%%41",
        "%4",
        "%4g",
        "%g4",
        "%%%",
        "%41%",
        "%00",
        "%7F%80",
        "%C3%A9",
        "%c3%a9t%C3%A9",
        "%C3",
        "%C3%",
        "%C3%2",
        "%FF%FE",
        "%E2%82%AC",
        "%F0%9F%98%80",
        "%ED%A0%80",
        "é%41",
        "%é",
        "%\u{0660}\u{0661}",
        "%Ａ１",
        "a%2",
        "%25",
        "%2541",
        "%%2541%",
    ];

    #[test]
    fn percent_decode_decodes_like_the_hand_written_decoder() {
        for s in TRICKY {
            assert_eq!(super::percent_decode(s), hand_decode(s), "{s:?}");
        }
        // Pinned results, so the comparison is not between two wrong answers.
        assert_eq!(super::percent_decode("%%41").as_deref(), Some("%A"));
        assert_eq!(super::percent_decode("100%").as_deref(), Some("100%"));
        assert_eq!(super::percent_decode("%c3%a9").as_deref(), Some("é"));
        assert_eq!(super::percent_decode("%C3"), None);
    }

    proptest! {
        #[test]
        fn percent_decoding_agrees_on_any_input(s in "[%0-9a-fA-FgG@/:é\u{0}\u{7f}]{0,12}") {
            prop_assert_eq!(super::percent_decode(&s), hand_decode(&s));
        }

        #[test]
        fn percent_decoding_agrees_on_arbitrary_text(s in "\\PC{0,16}") {
            prop_assert_eq!(super::percent_decode(&s), hand_decode(&s));
        }
    }
}

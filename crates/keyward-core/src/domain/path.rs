//! Request paths as keyward accepts them: one reading only, never a guess.
//!
//! Proxies and upstreams disagree on how to normalise `..`, `//`, `%2F` and
//! friends; an authorizer that picks one reading can be bypassed through
//! another. So keyward does not normalise: a path that any common server could
//! read two ways is refused outright. That includes spellings a decoding
//! upstream turns into another path: an escaped unreserved character
//! (`%70ools` is `pools` to WSGI) and `;` path parameters (`pools;x=1` is
//! `pools` to servlet containers). Escapes of reserved characters stay legal
//! (`alice%40example.com`): no route has them in a literal segment, so their
//! decoding cannot change the route. (The route table adds the last rule: a
//! parameter value spelling a sibling route's literal, see
//! [`super::route::RouteTable::required`].)

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Empty, or not starting with `/`.
    #[error("path must start with '/'")]
    NotAbsolute,
    /// A `.` or `..` segment, plain or percent-encoded.
    #[error("path has a dot segment")]
    DotSegment,
    /// `//` or a trailing `/`.
    #[error("path has an empty segment")]
    EmptySegment,
    /// `%2F`, `%5C`, a backslash, `%25` (double encoding) or `%00`.
    #[error("path has an encoded separator, backslash, NUL or double encoding")]
    EncodedSeparator,
    /// A percent-escape of an unreserved character (letters, digits,
    /// `-._~`), which decoding upstreams undo: never needed, often an attack.
    #[error("path escapes a character that needs no escaping")]
    EncodedUnreserved,
    /// A `;` path parameter, which servlet-style upstreams strip.
    #[error("path has a ';' parameter")]
    PathParameter,
    /// A `%` not followed by two hex digits.
    #[error("path has a malformed percent escape")]
    BadEscape,
    /// Space, control, non-ASCII or fragment characters.
    #[error("path has a character that is not allowed")]
    BadCharacter,
}

/// Bytes that can never make a path ambiguous: unreserved and sub-delim
/// characters except `.` (dot segments), `%` (escapes) and `;` (path
/// parameters), which need a closer look.
const PLAIN: [bool; 256] = {
    let mut table = [false; 256];
    let mut c = 0u8;
    loop {
        table[c as usize] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b'='
                    | b':'
                    | b'@'
            );
        if c == u8::MAX {
            break;
        }
        c += 1;
    }
    table
};

/// Strips the query string and checks that the rest has one reading.
/// Returns the path to match, borrowed from the input (no allocation).
pub fn canonical_path(raw: &str) -> Result<&str, PathError> {
    let path = raw.split_once('?').map_or(raw, |(path, _query)| path);
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Fast path: plain bytes and single slashes only, one table lookup per
    // byte. Anything else (dots, escapes, junk) takes the careful path.
    let mut after_slash = true;
    for &byte in &bytes[1..] {
        if byte == b'/' {
            if after_slash {
                return Err(PathError::EmptySegment);
            }
            after_slash = true;
        } else if PLAIN[usize::from(byte)] {
            after_slash = false;
        } else {
            return check_segments(path);
        }
    }
    if after_slash && bytes.len() > 1 {
        return Err(PathError::EmptySegment);
    }
    Ok(path)
}

fn check_segments(path: &str) -> Result<&str, PathError> {
    for segment in path[1..].split('/') {
        check_segment(segment.as_bytes())?;
    }
    Ok(path)
}

fn check_segment(segment: &[u8]) -> Result<(), PathError> {
    if segment.is_empty() {
        return Err(PathError::EmptySegment);
    }
    let mut dots_only = true;
    let mut dots = 0;
    let mut escaped_unreserved = false;
    let mut i = 0;
    while i < segment.len() {
        let byte = match segment[i] {
            b'%' => {
                let hi = segment.get(i + 1).and_then(|b| hex(*b));
                let lo = segment.get(i + 2).and_then(|b| hex(*b));
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(PathError::BadEscape);
                };
                i += 3;
                match hi << 4 | lo {
                    b'/' | b'\\' | b'%' | 0 => return Err(PathError::EncodedSeparator),
                    decoded if decoded < 0x20 || decoded == 0x7f => {
                        return Err(PathError::BadCharacter);
                    }
                    decoded => {
                        escaped_unreserved |=
                            decoded.is_ascii_alphanumeric() || b"-._~".contains(&decoded);
                        decoded
                    }
                }
            }
            b'\\' => return Err(PathError::EncodedSeparator),
            b';' => return Err(PathError::PathParameter),
            b'#' => return Err(PathError::BadCharacter),
            plain @ 0x21..=0x7e => {
                i += 1;
                plain
            }
            _ => return Err(PathError::BadCharacter),
        };
        if byte == b'.' {
            dots += 1;
        } else {
            dots_only = false;
        }
    }
    if dots_only && dots <= 2 {
        return Err(PathError::DotSegment);
    }
    if escaped_unreserved {
        return Err(PathError::EncodedUnreserved);
    }
    Ok(())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_pass_and_lose_their_query() {
        assert_eq!(canonical_path("/"), Ok("/"));
        assert_eq!(canonical_path("/v3/mail/send"), Ok("/v3/mail/send"));
        assert_eq!(
            canonical_path("/v3/suppression/bounces?limit=10&x=/../"),
            Ok("/v3/suppression/bounces")
        );
        assert_eq!(
            canonical_path("/v3/asm/suppressions/a%40b.com"),
            Ok("/v3/asm/suppressions/a%40b.com")
        );
        assert_eq!(
            canonical_path("/v3/files/.well..."),
            Ok("/v3/files/.well...")
        );
        assert_eq!(canonical_path("/v3/a/..."), Ok("/v3/a/..."));
        // Escapes of reserved characters and IPv6 addresses stay legal.
        for legal in [
            "/v3/suppression/bounces/alice%40example.com",
            "/v3/ips/2001:db8::1",
            "/v3/ips/2001%3Adb8%3A%3A1",
            "/v3/a%20b",
        ] {
            assert_eq!(canonical_path(legal), Ok(legal));
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        let cases = [
            ("", PathError::NotAbsolute),
            ("v3/mail/send", PathError::NotAbsolute),
            ("?x", PathError::NotAbsolute),
            ("/v3/scopes/../billing", PathError::DotSegment),
            ("/v3/./scopes", PathError::DotSegment),
            ("/v3/%2e%2e/billing", PathError::DotSegment),
            ("/v3/%2E./billing", PathError::DotSegment),
            ("/v3/.", PathError::DotSegment),
            ("/v3//scopes", PathError::EmptySegment),
            ("/v3/scopes/", PathError::EmptySegment),
            ("/v3/scopes%2F..%2Fbilling", PathError::EncodedSeparator),
            ("/v3/scopes%2f", PathError::EncodedSeparator),
            ("/v3/a%5cb", PathError::EncodedSeparator),
            ("/v3/a\\b", PathError::EncodedSeparator),
            ("/v3/%252e%252e", PathError::EncodedSeparator),
            ("/v3/a%00", PathError::EncodedSeparator),
            ("/v3/a%0a", PathError::BadCharacter),
            ("/v3/a%", PathError::BadEscape),
            ("/v3/a%zz", PathError::BadEscape),
            ("/v3/a%4", PathError::BadEscape),
            ("/v3/ips/%70ools", PathError::EncodedUnreserved),
            ("/v3/ips/POOL%53", PathError::EncodedUnreserved),
            ("/v3/a%2eb", PathError::EncodedUnreserved),
            ("/v3/a%7E", PathError::EncodedUnreserved),
            ("/v3/a%2D", PathError::EncodedUnreserved),
            ("/v3/ips/pools;x=1", PathError::PathParameter),
            ("/v3/ips;/pools", PathError::PathParameter),
            ("/v3/a b", PathError::BadCharacter),
            ("/v3/a#frag", PathError::BadCharacter),
            ("/v3/caf\u{e9}", PathError::BadCharacter),
            ("/v3/\t", PathError::BadCharacter),
        ];
        for (path, want) in cases {
            assert_eq!(canonical_path(path), Err(want), "{path:?}");
        }
    }
}

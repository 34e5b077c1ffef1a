//! Request path normalization, run by the proxy before route matching. The normalized path is
//! both what routes and policies are matched against *and* what is forwarded upstream, so the
//! upstream sees exactly the path the policy saw: there is no second interpretation to smuggle
//! a request through.
//!
//! What it does (RFC 3986 §6.2.2 and §5.2.4): decodes percent-escapes of unreserved characters
//! only (`A-Z a-z 0-9 - . _ ~`), uppercases the hex digits of every other escape, removes `.`
//! and `..` segments (also those spelled `%2e`), merges duplicate slashes and keeps a trailing
//! slash. It rejects what a gateway cannot represent faithfully: encoded `/`, `\` or NUL,
//! encoded control characters, a raw backslash, invalid escapes, escaped bytes that are not
//! UTF-8, raw control/space/non-ASCII characters, a `..` that climbs above the root, and paths
//! longer than [`MAX_PATH_LEN`].
//!
//! What it must not do: decode more than once (`%252e` stays `%252e`), decode anything but
//! unreserved characters (decoding `%2F` or `%3F` would change the path's structure), clamp a
//! `..` at the root (that hides an attack instead of reporting it), or allocate when the path is
//! already normal (the common case returns [`Cow::Borrowed`]).
//!
//! `;` is an ordinary character here, as in RFC 3986, with one exception: a segment that is `.`
//! or `..` followed by `;` parameters (`..;`, `..;jsessionid=x`, `.;x`, also spelled with `%2e`) is
//! refused as [`PathError::Traversal`]. RFC 3986 calls it an ordinary segment, but Tomcat, Jetty
//! and some Spring setups strip `;` parameters *before* resolving dot segments, so
//! `/api/..;/admin` would reach their `/admin` behind a gateway that matched `/api`: a path the
//! policy never saw. Other `;` parameters (`/a;b=c`) pass unchanged.

use std::borrow::Cow;

/// The longest path accepted, in bytes, before normalization.
pub const MAX_PATH_LEN: usize = 8 * 1024;

/// Why a path was rejected. Each variant maps to one stable [`PathError::reason`] string.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("path must start with '/'")]
    NotAbsolute,
    #[error("path is {len} bytes long, more than the limit of {MAX_PATH_LEN}")]
    TooLong { len: usize },
    #[error("path contains an encoded slash (%2F)")]
    EncodedSlash,
    #[error("path contains an encoded backslash (%5C)")]
    EncodedBackslash,
    #[error("path contains a backslash")]
    Backslash,
    #[error("path contains an encoded nul (%00)")]
    EncodedNul,
    #[error("path contains an encoded control character")]
    EncodedControl,
    #[error("path contains an invalid percent-encoding")]
    InvalidEncoding,
    #[error("path contains percent-encoded bytes that are not valid utf-8")]
    InvalidUtf8,
    #[error("path climbs above the root with '..'")]
    Traversal,
    #[error("path contains a control, space, non-ascii, '?' or '#' character")]
    InvalidCharacter,
}

impl PathError {
    /// The stable name of this rejection, shared by metrics labels, audit events and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            PathError::NotAbsolute => "path_not_absolute",
            PathError::TooLong { .. } => "path_too_long",
            PathError::EncodedSlash => "path_encoded_slash",
            PathError::EncodedBackslash => "path_encoded_backslash",
            PathError::Backslash => "path_backslash",
            PathError::EncodedNul => "path_encoded_nul",
            PathError::EncodedControl => "path_encoded_control",
            PathError::InvalidEncoding => "path_invalid_encoding",
            PathError::InvalidUtf8 => "path_invalid_utf8",
            PathError::Traversal => "path_traversal",
            PathError::InvalidCharacter => "path_invalid_character",
        }
    }
}

/// Normalizes the path part of a request target (no query, no fragment; `*` and absolute-form
/// targets are the caller's business). Returns the input itself when it is already normal.
pub fn normalize(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if raw.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong { len: raw.len() });
    }
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // Validate everything in one pass first: most paths are already normal, and those must be
    // returned without building a new string.
    let normal = if scan(raw.as_bytes())? { Cow::Owned(rewrite(raw)?) } else { Cow::Borrowed(raw) };
    if dot_segment_with_parameters(&normal) {
        return Err(PathError::Traversal);
    }
    Ok(normal)
}

/// A `.` or `..` segment carrying `;` parameters, in a normalized path (where `%2e` is already
/// decoded to `.`). Paths without `;` cost one byte scan.
fn dot_segment_with_parameters(path: &str) -> bool {
    if !path.as_bytes().contains(&b';') {
        return false;
    }
    path.split('/').any(|seg| match seg.split_once(';') {
        Some((head, _)) => head == "." || head == "..",
        None => false,
    })
}

/// What a percent-escape stands for, once its two hex digits are read.
enum Escape {
    /// An unreserved character: decoded in the output.
    Unreserved(u8),
    /// Any other allowed byte: kept escaped; `lower` when its hex digits need uppercasing.
    Kept { byte: u8, lower: bool },
}

/// Reads the escape whose `%` is at `bytes[i]`.
#[inline]
fn escape(bytes: &[u8], i: usize) -> Result<Escape, PathError> {
    let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
        return Err(PathError::InvalidEncoding);
    };
    let (Some(hv), Some(lv)) = (hex(h), hex(l)) else {
        return Err(PathError::InvalidEncoding);
    };
    let byte = hv << 4 | lv;
    match byte {
        0 => Err(PathError::EncodedNul),
        b'/' => Err(PathError::EncodedSlash),
        b'\\' => Err(PathError::EncodedBackslash),
        // An upstream decoding `%0A` or `%7F` may log or route on it; nothing legitimate needs it.
        0x01..=0x1f | 0x7f => Err(PathError::EncodedControl),
        b if is_unreserved(b) => Ok(Escape::Unreserved(b)),
        b => Ok(Escape::Kept { byte: b, lower: h.is_ascii_lowercase() || l.is_ascii_lowercase() }),
    }
}

#[inline]
fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[inline]
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Raw bytes that can appear in a normal path as they are: printable ASCII except `%` (an
/// escape), `/` (a separator), `\` and, since the caller split them off, `?` and `#`.
const fn plain_bytes() -> [bool; 256] {
    let mut table = [false; 256];
    let mut b = b'!';
    while b < 0x7f {
        table[b as usize] = !matches!(b, b'%' | b'/' | b'\\' | b'?' | b'#');
        b += 1;
    }
    table
}

static PLAIN: [bool; 256] = plain_bytes();

fn is_plain(b: u8) -> bool {
    PLAIN[usize::from(b)]
}

/// Why a raw byte that is neither plain, `%` nor `/` is rejected.
fn bad_byte(b: u8) -> PathError {
    if b == b'\\' { PathError::Backslash } else { PathError::InvalidCharacter }
}

/// Validates the whole path and tells whether it needs rewriting (`false`: already normal).
fn scan(bytes: &[u8]) -> Result<bool, PathError> {
    let mut utf8 = Utf8::default();
    let mut rewrite = false;
    // Start of the current segment (just after its '/'); bytes[0] is the leading '/'.
    let mut seg_start = 1;
    let mut i = 1;
    loop {
        // Most bytes are plain: skip a run of them with one table lookup each.
        let run = i;
        while let Some(&b) = bytes.get(i)
            && is_plain(b)
        {
            i += 1;
        }
        // A raw ASCII byte cannot continue a multi-byte sequence started by escapes.
        if i > run && utf8.pending() {
            return Err(PathError::InvalidUtf8);
        }
        match bytes.get(i) {
            None | Some(b'/') => {
                // Nor can a '/' or the end.
                if utf8.pending() {
                    return Err(PathError::InvalidUtf8);
                }
                let last = i >= bytes.len();
                let seg = bytes.get(seg_start..i).unwrap_or_default();
                // `//` in the middle, or a dot segment anywhere, must be rewritten.
                if (seg.is_empty() && !last) || seg == b"." || seg == b".." {
                    rewrite = true;
                }
                if last {
                    return Ok(rewrite);
                }
                seg_start = i + 1;
                i += 1;
            }
            Some(b'%') => {
                match escape(bytes, i)? {
                    Escape::Unreserved(_) if utf8.pending() => return Err(PathError::InvalidUtf8),
                    Escape::Unreserved(_) => rewrite = true,
                    Escape::Kept { byte, lower } => {
                        if !utf8.feed(byte) {
                            return Err(PathError::InvalidUtf8);
                        }
                        rewrite |= lower;
                    }
                }
                i += 3;
            }
            Some(&b) => return Err(bad_byte(b)),
        }
    }
}

/// Builds the normal form of a path that `scan` accepted but found not normal.
fn rewrite(raw: &str) -> Result<String, PathError> {
    let mut out: Vec<u8> = Vec::with_capacity(raw.len());
    // Output offsets of the '/' that opens each kept segment, so `..` can drop the last one.
    let mut kept: Vec<usize> = Vec::new();
    let mut segments = raw.as_bytes().get(1..).unwrap_or_default().split(|b| *b == b'/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        let mark = out.len();
        // Empty and dot segments are common in attacks: settle the raw ones without decoding.
        let climbs = match seg {
            b"" | b"." => false,
            b".." => true,
            _ => {
                out.push(b'/');
                decode_segment(seg, &mut out)?;
                let decoded = out.get(mark + 1..).unwrap_or_default();
                // Refused even when a later `..` would remove it (see the module docs).
                if let Some(p) = decoded.iter().position(|b| *b == b';')
                    && matches!(decoded.get(..p), Some(b"." | b".."))
                {
                    return Err(PathError::Traversal);
                }
                match decoded {
                    b"." => false,
                    b".." => true,
                    _ => {
                        kept.push(mark);
                        continue;
                    }
                }
            }
        };
        out.truncate(mark);
        if climbs {
            let Some(start) = kept.pop() else {
                return Err(PathError::Traversal);
            };
            out.truncate(start);
        }
        // A removed last segment leaves the path ending in '/' (RFC 3986 §5.2.4: "/a/b/.." is
        // "/a/"), and an empty last segment is the trailing slash itself.
        if last {
            out.push(b'/');
        }
    }
    // Always ASCII: raw bytes were checked by `scan`, and escapes decode to ASCII or stay.
    String::from_utf8(out).map_err(|_| PathError::InvalidCharacter)
}

/// Appends the normal form of one segment (already validated by `scan`).
fn decode_segment(seg: &[u8], out: &mut Vec<u8>) -> Result<(), PathError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut rest = seg;
    while let Some(at) = rest.iter().position(|b| *b == b'%') {
        out.extend_from_slice(rest.get(..at).unwrap_or_default());
        match escape(rest, at)? {
            Escape::Unreserved(c) => out.push(c),
            Escape::Kept { byte, .. } => {
                out.extend_from_slice(&[b'%', HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 0xf)]]);
            }
        }
        rest = rest.get(at + 3..).unwrap_or_default();
    }
    out.extend_from_slice(rest);
    Ok(())
}

/// A streaming UTF-8 validator over the bytes that escapes decode to. We never decode
/// non-ASCII, but an upstream will: overlong forms (`%C0%AE` for '.') and surrogates are the
/// classic way to smuggle a character past a filter that only looks at ASCII.
#[derive(Default)]
struct Utf8 {
    /// Continuation bytes still expected.
    need: u8,
    /// Allowed range of the next continuation byte (narrower after E0, ED, F0, F4).
    lo: u8,
    hi: u8,
}

impl Utf8 {
    fn pending(&self) -> bool {
        self.need > 0
    }

    /// Feeds one decoded byte; `false` when the sequence is invalid.
    fn feed(&mut self, b: u8) -> bool {
        if self.need > 0 {
            if b < self.lo || b > self.hi {
                return false;
            }
            self.need -= 1;
            (self.lo, self.hi) = (0x80, 0xbf);
            return true;
        }
        let (need, lo, hi) = match b {
            0x00..=0x7f => return true,
            0xc2..=0xdf => (1, 0x80, 0xbf),
            0xe0 => (2, 0xa0, 0xbf),
            0xe1..=0xec | 0xee..=0xef => (2, 0x80, 0xbf),
            0xed => (2, 0x80, 0x9f),
            0xf0 => (3, 0x90, 0xbf),
            0xf1..=0xf3 => (3, 0x80, 0xbf),
            0xf4 => (3, 0x80, 0x8f),
            // 0x80..=0xc1 (stray continuation, overlong lead) and 0xf5.. (beyond U+10FFFF).
            _ => return false,
        };
        *self = Utf8 { need, lo, hi };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Normalizes `input` and compares with `expected`; an unchanged path must come back
    /// borrowed (no allocation) and a changed one owned.
    #[track_caller]
    fn check(input: &str, expected: Result<&str, PathError>) {
        let got = normalize(input);
        match (&got, &expected) {
            (Ok(out), Ok(want)) => {
                assert_eq!(out, want, "normalize({input:?})");
                let borrowed = matches!(out, Cow::Borrowed(_));
                assert_eq!(borrowed, input == *want, "normalize({input:?}) borrowed={borrowed}");
            }
            _ => assert_eq!(got.as_deref(), expected.as_ref().map(|s| *s), "normalize({input:?})"),
        }
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/a", "/a/b", "/a/b/", "/api/v1/users/42", "/a-b_c.d~e", "/a;b=c", "/@:!$&'()*+,="] {
            check(p, Ok(p));
        }
        check("/%C3%A9", Ok("/%C3%A9"));
        check("/%F0%9F%98%80", Ok("/%F0%9F%98%80"));
        check("/%20/%3B/%25", Ok("/%20/%3B/%25"));
    }

    #[test]
    fn absolute_and_length() {
        use PathError::*;
        check("", Err(NotAbsolute));
        check("a/b", Err(NotAbsolute));
        check("*", Err(NotAbsolute));
        check("http://example.com/a", Err(NotAbsolute));
        check("%2Fa", Err(NotAbsolute));
        let max = format!("/{}", "a".repeat(MAX_PATH_LEN - 1));
        check(&max, Ok(&max));
        let over = format!("/{}", "a".repeat(MAX_PATH_LEN));
        check(&over, Err(TooLong { len: MAX_PATH_LEN + 1 }));
    }

    #[test]
    fn slashes_and_dot_segments() {
        use PathError::*;
        for (input, want) in [
            ("//", Ok("/")),
            ("///", Ok("/")),
            ("//admin", Ok("/admin")),
            ("/a//b", Ok("/a/b")),
            ("/a///b//", Ok("/a/b/")),
            ("/.", Ok("/")),
            ("/./", Ok("/")),
            ("/a/./b", Ok("/a/b")),
            ("/a/.", Ok("/a/")),
            ("/a/./", Ok("/a/")),
            ("/a/../b", Ok("/b")),
            ("/a/b/..", Ok("/a/")),
            ("/a/b/../", Ok("/a/")),
            ("/a/..", Ok("/")),
            ("/a/b/../../c", Ok("/c")),
            ("/a/.//../b", Ok("/b")),
            ("/..", Err(Traversal)),
            ("/../", Err(Traversal)),
            ("/../a", Err(Traversal)),
            ("/a/../..", Err(Traversal)),
            ("/a/b/../../../c", Err(Traversal)),
            ("//../a", Err(Traversal)),
            // Not dot segments: only exactly "." and ".." are.
            ("/...", Ok("/...")),
            ("/a/.b/..c/c..", Ok("/a/.b/..c/c..")),
        ] {
            check(input, want);
        }
    }

    #[test]
    fn percent_encoding() {
        use PathError::*;
        for (input, want) in [
            // Unreserved characters are decoded, in any hex case.
            ("/%41%7a%30%2D%2d%5f%7E%2e", Ok("/Az0--_~.")),
            ("/a%62c", Ok("/abc")),
            // Other escapes stay escaped, hex uppercased.
            ("/%3b", Ok("/%3B")),
            ("/%c3%a9", Ok("/%C3%A9")),
            ("/%c3%A9", Ok("/%C3%A9")),
            ("/%2b%2C", Ok("/%2B%2C")),
            // Decode once only: a double-encoded dot stays double-encoded.
            ("/api/%252e%252e/", Ok("/api/%252e%252e/")),
            ("/api/%252E%252e/admin", Ok("/api/%252E%252e/admin")),
            ("/%25", Ok("/%25")),
            ("/%", Err(InvalidEncoding)),
            ("/a%", Err(InvalidEncoding)),
            ("/%4", Err(InvalidEncoding)),
            ("/%4/", Err(InvalidEncoding)),
            ("/%G1", Err(InvalidEncoding)),
            ("/%4g", Err(InvalidEncoding)),
            ("/%%41", Err(InvalidEncoding)),
            ("/%-1", Err(InvalidEncoding)),
            ("/a%2fb", Err(EncodedSlash)),
            ("/a%2Fb", Err(EncodedSlash)),
            ("/..%2f..%2fetc", Err(EncodedSlash)),
            ("/a%5cb", Err(EncodedBackslash)),
            ("/a%5C..%5C", Err(EncodedBackslash)),
            ("/a%00", Err(EncodedNul)),
            ("/a%00.html", Err(EncodedNul)),
            ("/a%0a", Err(EncodedControl)),
            ("/a%0D%0A", Err(EncodedControl)),
            ("/a%1F", Err(EncodedControl)),
            ("/a%7f", Err(EncodedControl)),
            ("/%09", Err(EncodedControl)),
        ] {
            check(input, want);
        }
    }

    #[test]
    fn escaped_bytes_must_be_utf8() {
        use PathError::*;
        for (input, want) in [
            ("/%e2%82%ac", Ok("/%E2%82%AC")),
            ("/%F4%8F%BF%BF", Ok("/%F4%8F%BF%BF")),
            // Overlong '.', '/' and NUL: decoded by lax upstreams into dangerous characters.
            ("/%C0%AE%C0%AE/admin", Err(InvalidUtf8)),
            ("/%c0%af", Err(InvalidUtf8)),
            ("/%C0%80", Err(InvalidUtf8)),
            ("/%E0%80%AE", Err(InvalidUtf8)),
            ("/%F0%80%80%AE", Err(InvalidUtf8)),
            // Surrogate, beyond U+10FFFF, invalid lead bytes.
            ("/%ED%A0%80", Err(InvalidUtf8)),
            ("/%F4%90%80%80", Err(InvalidUtf8)),
            ("/%F5%80%80%80", Err(InvalidUtf8)),
            ("/%FF", Err(InvalidUtf8)),
            // Stray continuation, truncated sequences, a sequence cut by '/' or another byte.
            ("/%A9", Err(InvalidUtf8)),
            ("/%C3", Err(InvalidUtf8)),
            ("/%E2%82", Err(InvalidUtf8)),
            ("/%C3/%A9", Err(InvalidUtf8)),
            ("/%C3a", Err(InvalidUtf8)),
            ("/%C3%41", Err(InvalidUtf8)),
            ("/%C3%3B", Err(InvalidUtf8)),
        ] {
            check(input, want);
        }
    }

    #[test]
    fn raw_characters() {
        use PathError::*;
        for (input, want) in [
            ("/a\\b", Err(Backslash)),
            ("/..\\..\\etc", Err(Backslash)),
            ("/a\0", Err(InvalidCharacter)),
            ("/a\tb", Err(InvalidCharacter)),
            ("/a\r\nb", Err(InvalidCharacter)),
            ("/a b", Err(InvalidCharacter)),
            ("/a\x7f", Err(InvalidCharacter)),
            ("/é", Err(InvalidCharacter)),
            ("/a?b=c", Err(InvalidCharacter)),
            ("/a#frag", Err(InvalidCharacter)),
            // Printable ASCII that RFC 3986 wants escaped is passed through as it is: routes may
            // name it, and nothing about it changes the path's structure.
            ("/{a}|^`\"<>", Ok("/{a}|^`\"<>")),
        ] {
            check(input, want);
        }
    }

    #[test]
    fn attacks() {
        use PathError::*;
        for (input, want) in [
            ("/api/%2e%2e/admin", Ok("/admin")),
            ("/api/%2E%2e/admin", Ok("/admin")),
            ("/api/.%2e/admin", Ok("/admin")),
            ("/api/%2e./admin", Ok("/admin")),
            ("/api/%2e/admin", Ok("/api/admin")),
            ("/api/v1/%2e%2e/%2e%2e/admin", Ok("/admin")),
            ("/%2e%2e/etc/passwd", Err(Traversal)),
            ("/api/%2e%2e/%2e%2e/etc", Err(Traversal)),
            ("/api/./.././../x", Err(Traversal)),
            // Dot segments with `;` parameters: Tomcat/Jetty would climb (see the module docs).
            ("/api/..;/admin", Err(Traversal)),
            ("/api/..;jsessionid=x/admin", Err(Traversal)),
            ("/api/.;/admin", Err(Traversal)),
            ("/api/%2e%2e;/admin", Err(Traversal)),
            ("/api/.%2e;x/admin", Err(Traversal)),
            // Other `;` parameters are ordinary characters.
            ("/api/a;b=c/x", Ok("/api/a;b=c/x")),
            ("/api/...;/x", Ok("/api/...;/x")),
            ("/api/..%3B/x", Ok("/api/..%3B/x")),
            ("//admin", Ok("/admin")),
            ("//admin//", Ok("/admin/")),
            ("/api/%252e%252e/", Ok("/api/%252e%252e/")),
            ("/api%2f..%2fadmin", Err(EncodedSlash)),
            ("/api/%2e%2e%2fadmin", Err(EncodedSlash)),
            ("/api/%u002e", Err(InvalidEncoding)),
            ("/A/./B/../C//%64", Ok("/A/C/d")),
        ] {
            check(input, want);
        }
    }

    #[test]
    fn reasons_are_stable_and_distinct() {
        use PathError::*;
        let all = [
            (NotAbsolute, "path_not_absolute"),
            (TooLong { len: 9000 }, "path_too_long"),
            (EncodedSlash, "path_encoded_slash"),
            (EncodedBackslash, "path_encoded_backslash"),
            (Backslash, "path_backslash"),
            (EncodedNul, "path_encoded_nul"),
            (EncodedControl, "path_encoded_control"),
            (InvalidEncoding, "path_invalid_encoding"),
            (InvalidUtf8, "path_invalid_utf8"),
            (Traversal, "path_traversal"),
            (InvalidCharacter, "path_invalid_character"),
        ];
        let mut seen = std::collections::HashSet::new();
        for (e, reason) in &all {
            assert_eq!(e.reason(), *reason);
            assert!(seen.insert(*reason), "{reason} is used twice");
            let msg = e.to_string();
            assert_eq!(msg, msg.to_lowercase().replace("%2f", "%2F").replace("%5c", "%5C"), "{msg}");
        }
    }

    // ------------------------------------------------------------ properties

    /// Path pieces chosen to collide: dots in every spelling, escapes in both cases, slashes.
    fn piece() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "/", "/", "/", ".", "..", "%2e", "%2E", "a", "B", "z9", "%41", "%7e", "%7E", "%3b", "%3B", ";", "%25",
            "%252e", "%c3%a9", "~", "-", "%2F", "\\", "%", "%C0%AE", " ",
        ])
    }

    fn pathish() -> impl Strategy<Value = String> {
        prop::collection::vec(piece(), 0..24).prop_map(|p| format!("/{}", p.concat()))
    }

    /// What every successful output must look like, checked without the code under test.
    fn assert_normal(out: &str) {
        assert!(out.starts_with('/'), "{out:?}");
        assert!(!out.contains("//"), "{out:?}");
        let segs: Vec<&str> = out[1..].split('/').collect();
        assert!(segs.iter().all(|s| *s != "." && *s != ".."), "dot segment in {out:?}");
        let b = out.as_bytes();
        for (i, _) in out.match_indices('%') {
            let hex = &out[i + 1..i + 3];
            assert_eq!(hex, hex.to_uppercase(), "lowercase escape in {out:?}");
            let byte = u8::from_str_radix(hex, 16).unwrap();
            assert!(!(byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)), "escaped unreserved in {out:?}");
        }
        assert!(b.iter().all(|c| c.is_ascii_graphic()), "{out:?}");
    }

    /// Decodes escapes of unreserved characters and uppercases the others: the reference for
    /// one segment, written apart from the code under test.
    fn model_segment(seg: &str) -> String {
        let mut out = String::new();
        let mut rest = seg;
        while let Some(pos) = rest.find('%') {
            out.push_str(&rest[..pos]);
            let hex = &rest[pos + 1..pos + 3];
            let c = char::from(u8::from_str_radix(hex, 16).unwrap());
            if c.is_ascii_alphanumeric() || "-._~".contains(c) {
                out.push(c);
            } else {
                out.push('%');
                out.push_str(&hex.to_uppercase());
            }
            rest = &rest[pos + 3..];
        }
        out.push_str(rest);
        out
    }

    /// A stack model of dot-segment removal that refuses to climb above the root.
    fn model(segments: &[&str]) -> Result<String, PathError> {
        let mut stack: Vec<String> = Vec::new();
        let mut trailing = false;
        for seg in segments {
            let seg = model_segment(seg);
            if let Some((".." | ".", _)) = seg.split_once(';') {
                return Err(PathError::Traversal);
            }
            trailing = true;
            match seg.as_str() {
                "" | "." => {}
                ".." => {
                    stack.pop().ok_or(PathError::Traversal)?;
                }
                _ => {
                    stack.push(seg);
                    trailing = false;
                }
            }
        }
        let tail = if trailing && !stack.is_empty() { "/" } else { "" };
        Ok(format!("/{}{tail}", stack.join("/")))
    }

    fn segment() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "a", "b", "", "", ".", "..", "..", "%2e", "%2E%2e", ".%2e", "%2e.", "c%41", "x;y", "..;", "%7e", "%3b",
            "%252e",
        ])
    }

    proptest! {
        #[test]
        fn idempotent_and_normal(path in pathish()) {
            if let Ok(once) = normalize(&path) {
                assert_normal(&once);
                let twice = normalize(&once);
                prop_assert!(matches!(twice, Ok(Cow::Borrowed(_))), "{path:?} -> {once:?} -> {twice:?}");
                prop_assert_eq!(twice.as_deref(), Ok(&*once));
            }
        }

        #[test]
        fn never_panics_and_output_is_normal(path in "/\\PC{0,40}") {
            if let Ok(out) = normalize(&path) {
                assert_normal(&out);
                let again = normalize(&out);
                prop_assert_eq!(again.as_deref(), Ok(&*out));
            }
        }

        /// Normalizing a path made of random segments equals the stack model: in particular a
        /// `..` (in any spelling) never climbs out of the segment it follows, and never above
        /// the root.
        #[test]
        fn matches_stack_model(segments in prop::collection::vec(segment(), 1..10)) {
            let path = format!("/{}", segments.join("/"));
            prop_assert_eq!(normalize(&path).map(Cow::into_owned), model(&segments), "{}", path);
        }
    }
}

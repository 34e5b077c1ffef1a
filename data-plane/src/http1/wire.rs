//! HTTP/1.1 on the wire, without I/O: request heads parsed (httparse) into [`http`] types with
//! their body framing decided once, upstream response heads parsed into ranges of the read
//! buffer, heads written back out, and a strict chunked decoder/encoder.
//!
//! Framing is where request smuggling lives, so the rules are strict and in one place
//! (RFC 9112 §6): a request with both `Transfer-Encoding` and `Content-Length`, a
//! `Transfer-Encoding` other than exactly `chunked`, a `Transfer-Encoding` on HTTP/1.0, or
//! `Content-Length` values that are not one and the same decimal number are refused (400);
//! so is an HTTP/1.1 request without exactly one `Host`. Chunked bodies need CRLF line ends,
//! at most 16 hex digits per size and bounded size lines and trailers. Every body the proxy
//! sends on is re-framed by the proxy (one `Content-Length`, or chunks it encodes itself), and
//! trailers and chunk extensions are not forwarded: what the next hop parses is what we parsed.
//!
//! What it must not do: copy header bytes it can share (header values are slices of the head's
//! buffer), allocate per header, or accept a head it would not send on unchanged in meaning.

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::BytesMut;
use http::header::{CONTENT_LENGTH, HOST, HeaderName, TRANSFER_ENCODING};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Uri, Version};
use smallvec::SmallVec;

/// The most header lines a request or response head may have.
pub const MAX_HEADERS: usize = 128;
/// The longest chunk-size line (size, extensions) accepted.
const MAX_CHUNK_LINE: usize = 1024;
/// The most trailer bytes accepted (and dropped) at the end of a chunked body.
const MAX_TRAILERS: usize = 16 * 1024;

/// How a message's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    Chunked,
    /// Until the sender closes the connection (responses only).
    Close,
}

impl Framing {
    pub fn is_empty(self) -> bool {
        matches!(self, Framing::Empty | Framing::Length(0))
    }
}

/// Why a request head is refused. Each is a 400 `request_invalid` but `TooLarge` (431).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("the request head is larger than the limit")]
    TooLarge,
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
}

/// A parsed request head.
#[derive(Debug)]
pub struct RequestHead {
    pub parts: Parts,
    pub framing: Framing,
    /// Whether the client lets the connection stay open after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue` (HTTP/1.1): the client waits for a `100 Continue` before the body.
    pub expect_continue: bool,
}

/// Parses the request head at the start of `buf`. `Ok(None)`: incomplete, read more (unless
/// `buf` already holds `max` bytes: then `TooLarge`). On success the head's bytes are split off
/// `buf` and shared by the header values; the body (or the next request) stays in `buf`.
pub fn parse_request(buf: &mut BytesMut, max: usize) -> Result<Option<RequestHead>, HeadError> {
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let limit = buf.len().min(max);
    let parsed =
        httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, &buf[..limit], &mut storage);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= max => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(httparse::Error::Version) => return Err(HeadError::Malformed("invalid request line or HTTP version")),
        Err(_) => return Err(HeadError::Malformed("invalid request line or header syntax")),
    };
    let base = buf.as_ptr() as usize;
    let offset = |s: &[u8]| s.as_ptr() as usize - base;
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|_| HeadError::Malformed("invalid method"))?;
    let path = req.path.unwrap_or_default();
    let target = offset(path.as_bytes())..offset(path.as_bytes()) + path.len();
    let version = if req.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // (name start, name end, value start, value end): the head is split off the buffer before
    // the values can share it.
    let mut fields: SmallVec<[[u32; 4]; 32]> = SmallVec::new();
    for h in req.headers.iter() {
        let (n, v) = (offset(h.name.as_bytes()), offset(h.value));
        fields.push([n, n + h.name.len(), v, v + h.value.len()].map(|x| x as u32));
    }
    let head = buf.split_to(len).freeze();

    // Room for the fields the proxy adds on the way (forwarding fields, claim headers).
    let mut headers = HeaderMap::with_capacity(fields.len() + 8);
    let mut meta = Meta::default();
    for &[ns, ne, vs, ve] in &fields {
        let name = HeaderName::from_bytes(&head[ns as usize..ne as usize])
            .map_err(|_| HeadError::Malformed("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs as usize..ve as usize))
            .map_err(|_| HeadError::Malformed("invalid header value"))?;
        meta.observe(&name, &value);
        headers.append(name, value);
    }
    let uri = Uri::from_maybe_shared(head.slice(target)).map_err(|_| HeadError::Malformed("invalid request target"))?;
    if version == Version::HTTP_11 && meta.hosts != 1 {
        return Err(HeadError::Malformed("an HTTP/1.1 request needs exactly one Host header"));
    }
    let framing = meta.request_framing(version)?;
    let keep_alive = match version {
        Version::HTTP_10 => meta.connection_keep_alive && !meta.connection_close,
        _ => !meta.connection_close,
    };
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(RequestHead {
        parts,
        framing,
        keep_alive,
        expect_continue: meta.expect_continue && version == Version::HTTP_11,
    }))
}

/// What the framing and connection decisions need from the header fields, in one pass.
#[derive(Default)]
struct Meta {
    hosts: usize,
    length: Option<Result<u64, ()>>,
    /// `Transfer-Encoding` seen; `Some(true)` while it is exactly one `chunked`.
    chunked: Option<bool>,
    connection_close: bool,
    connection_keep_alive: bool,
    expect_continue: bool,
}

impl Meta {
    fn observe(&mut self, name: &HeaderName, value: &HeaderValue) {
        if *name == HOST {
            self.hosts += 1;
        } else if *name == CONTENT_LENGTH {
            self.length = Some(match (self.length, content_length(value.as_bytes())) {
                (None | Some(Ok(_)), Err(())) | (Some(Err(())), _) => Err(()),
                (None, Ok(n)) => Ok(n),
                (Some(Ok(a)), Ok(b)) if a == b => Ok(a),
                (Some(Ok(_)), Ok(_)) => Err(()),
            });
        } else if *name == TRANSFER_ENCODING {
            let only_chunked = self.chunked.is_none() && trimmed(value.as_bytes()).eq_ignore_ascii_case(b"chunked");
            self.chunked = Some(only_chunked);
        } else if *name == http::header::CONNECTION {
            for token in value.as_bytes().split(|b| *b == b',').map(trimmed) {
                if token.eq_ignore_ascii_case(b"close") {
                    self.connection_close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.connection_keep_alive = true;
                }
            }
        } else if *name == http::header::EXPECT {
            self.expect_continue = trimmed(value.as_bytes()).eq_ignore_ascii_case(b"100-continue");
        }
    }

    fn request_framing(&self, version: Version) -> Result<Framing, HeadError> {
        match (self.chunked, self.length) {
            (Some(_), Some(_)) => Err(HeadError::Malformed("both Transfer-Encoding and Content-Length")),
            (Some(_), None) if version == Version::HTTP_10 => {
                Err(HeadError::Malformed("Transfer-Encoding on an HTTP/1.0 request"))
            }
            (Some(true), None) => Ok(Framing::Chunked),
            (Some(false), None) => Err(HeadError::Malformed("a Transfer-Encoding other than chunked")),
            (None, Some(Ok(n))) => Ok(Framing::Length(n)),
            (None, Some(Err(()))) => Err(HeadError::Malformed("invalid Content-Length")),
            (None, None) => Ok(Framing::Empty),
        }
    }
}

/// A `Content-Length` value: a decimal number, or a list of the same number (RFC 9110 §8.6).
fn content_length(value: &[u8]) -> Result<u64, ()> {
    let mut found = None;
    for part in value.split(|b| *b == b',').map(trimmed) {
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(());
        }
        let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        match found {
            Some(m) if m != n => return Err(()),
            _ => found = Some(n),
        }
    }
    found.ok_or(())
}

fn trimmed(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| !matches!(b, b' ' | b'\t')).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !matches!(b, b' ' | b'\t')).map_or(start, |i| i + 1);
    &s[start..end]
}

// ------------------------------------------------------------------ request head out

/// Appends the request head for the upstream: origin-form target, the headers as they are
/// (the pipeline already removed hop-by-hop fields), the fields `extra` writes (the proxy's
/// forwarding fields), and the framing of the body the proxy sends (`Transfer-Encoding:
/// chunked` when it re-chunks).
pub fn write_request_head(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    framing: Framing,
    extra: impl FnOnce(&mut Vec<u8>),
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if framing == Framing::Chunked && *name == CONTENT_LENGTH {
            continue;
        }
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    extra(out);
    if framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

pub fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal.
pub fn push_decimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

// ------------------------------------------------------------------ response heads

/// Why an upstream response head cannot be relayed (502 `upstream_reset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("the upstream response head is larger than the limit")]
    TooLarge,
    #[error("malformed upstream response: {0}")]
    Malformed(&'static str),
}

/// The largest upstream response head accepted.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// A parsed upstream response head: everything but the header fields is decoded; the fields
/// stay in the read buffer (as ranges) until [`ResponseHead::write_head`] copies them out.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: Range<usize>,
    /// (name start, name end, value start, value end) of the fields to relay (framing,
    /// hop-by-hop and `Connection`-named fields already left out).
    fields: SmallVec<[[u32; 4]; 16]>,
    pub framing: Framing,
    /// Whether the upstream connection may carry another request after this response.
    pub reusable: bool,
    pub has_date: bool,
    /// The head's length in the buffer.
    pub len: usize,
}

/// Parses the upstream response head at the start of `buf`. `request_head`: the request was a
/// HEAD (no body whatever the framing fields say). `Ok(None)`: incomplete.
pub fn parse_response(buf: &[u8], request_head: bool) -> Result<Option<ResponseHead>, ResponseError> {
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let limit = buf.len().min(MAX_RESPONSE_HEAD);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        &buf[..limit],
        &mut storage,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_RESPONSE_HEAD => return Err(ResponseError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ResponseError::TooLarge),
        Err(_) => return Err(ResponseError::Malformed("invalid status line or header syntax")),
    };
    let base = buf.as_ptr() as usize;
    let range = |s: &[u8]| (s.as_ptr() as usize - base)..(s.as_ptr() as usize - base + s.len());
    let status = res.code.unwrap_or(0);
    if !(100..=999).contains(&status) {
        return Err(ResponseError::Malformed("invalid status code"));
    }
    let http10 = res.version == Some(0);
    let reason = res.reason.map_or(0..0, |r| range(r.as_bytes()));

    let bodiless = request_head || status < 200 || status == 204 || status == 304;
    let switching = status == 101;
    // One pass: framing and connection fields are decoded and left out, the rest is kept.
    // Fields `Connection` names are hop-by-hop too; they are taken out after the pass.
    let mut named: SmallVec<[&[u8]; 4]> = SmallVec::new();
    let (mut close, mut keep_alive, mut has_date) = (false, false, false);
    let mut length: Option<Result<u64, ()>> = None;
    let mut transfer: Option<bool> = None;
    let mut fields: SmallVec<[[u32; 4]; 16]> = SmallVec::with_capacity(res.headers.len());
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        let relay = match name.len() {
            2 => !name.eq_ignore_ascii_case(b"te"),
            4 => {
                has_date |= name.eq_ignore_ascii_case(b"date");
                true
            }
            7 => !(name.eq_ignore_ascii_case(b"trailer") || !switching && name.eq_ignore_ascii_case(b"upgrade")),
            10 if name.eq_ignore_ascii_case(b"connection") => {
                for token in h.value.split(|b| *b == b',').map(trimmed).filter(|t| !t.is_empty()) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive = true;
                    } else if !token.eq_ignore_ascii_case(b"upgrade") {
                        // (`Upgrade` itself is hop-by-hop unless the answer is a switch)
                        named.push(token);
                    }
                }
                false
            }
            10 => !name.eq_ignore_ascii_case(b"keep-alive"),
            12 => !name.eq_ignore_ascii_case(b"x-request-id"),
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                length = Some(match (length, content_length(h.value)) {
                    (None, Ok(n)) => Ok(n),
                    (Some(Ok(a)), Ok(b)) if a == b => Ok(a),
                    _ => Err(()),
                });
                // A bodiless answer's length describes the body it would have had: relayed.
                bodiless
            }
            16 => !name.eq_ignore_ascii_case(b"proxy-connection"),
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                // Chunked only when `chunked` is the last coding of the last field.
                let last = h.value.rsplit(|b| *b == b',').next().map(trimmed).unwrap_or_default();
                transfer = Some(last.eq_ignore_ascii_case(b"chunked"));
                false
            }
            _ => true,
        };
        if relay {
            let (n, v) = (range(name), range(h.value));
            fields.push([n.start, n.end, v.start, v.end].map(|x| x as u32));
        }
    }
    if !named.is_empty() {
        fields.retain(|f| !named.iter().any(|n| n.eq_ignore_ascii_case(&buf[f[0] as usize..f[1] as usize])));
    }
    let framing = match (transfer, length) {
        _ if bodiless => Framing::Empty,
        (Some(true), _) => Framing::Chunked,
        (Some(false), _) => Framing::Close,
        (None, Some(Ok(n))) => Framing::Length(n),
        (None, Some(Err(()))) => return Err(ResponseError::Malformed("invalid Content-Length")),
        (None, None) => Framing::Close,
    };
    let reusable = !close && (!http10 || keep_alive) && framing != Framing::Close && !switching;
    Ok(Some(ResponseHead { status, reason, fields, framing, reusable, has_date, len }))
}

impl ResponseHead {
    /// Appends the head the client gets: the status line, the relayed fields, `X-Request-Id`,
    /// `Date` if the upstream sent none, the framing the proxy chose, and `Connection` when the
    /// client connection closes after this response (or an HTTP/1.0 one stays open).
    pub fn write_head(&self, buf: &[u8], out: &mut Vec<u8>, extra: &ResponseExtras<'_>) {
        out.extend_from_slice(b"HTTP/1.1 ");
        push_decimal(out, u64::from(self.status));
        out.push(b' ');
        out.extend_from_slice(&buf[self.reason.clone()]);
        out.extend_from_slice(b"\r\n");
        for &[ns, ne, vs, ve] in &self.fields {
            push_field(out, &buf[ns as usize..ne as usize], &buf[vs as usize..ve as usize]);
        }
        if self.status == 101 {
            out.extend_from_slice(b"connection: upgrade\r\n");
        }
        extra.write(out, !self.has_date);
    }
}

/// What the proxy adds to every response head it writes.
#[derive(Debug)]
pub struct ResponseExtras<'a> {
    pub request_id: &'a [u8],
    /// The framing of the body as sent to the client.
    pub framing: Framing,
    /// The client connection closes after this response.
    pub close: bool,
    /// The client spoke HTTP/1.0 and the connection stays open.
    pub keep_alive_10: bool,
}

impl ResponseExtras<'_> {
    pub fn write(&self, out: &mut Vec<u8>, date: bool) {
        push_field(out, b"x-request-id", self.request_id);
        if date {
            super::date::push(out);
        }
        match self.framing {
            Framing::Length(n) => {
                out.extend_from_slice(b"content-length: ");
                push_decimal(out, n);
                out.extend_from_slice(b"\r\n");
            }
            Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            Framing::Empty | Framing::Close => {}
        }
        if self.close {
            out.extend_from_slice(b"connection: close\r\n");
        } else if self.keep_alive_10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Appends a response head from `http` types (a problem document the proxy makes itself, or an
/// HTTP/2 upstream's answer): status line, `headers` (no framing or hop-by-hop fields), the
/// extras (with `Date` when `date`), then `body`.
pub fn write_response(
    out: &mut Vec<u8>,
    status: http::StatusCode,
    headers: &HeaderMap,
    date: bool,
    body: &[u8],
    extras: &ResponseExtras<'_>,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    extras.write(out, date);
    out.extend_from_slice(body);
}

// ------------------------------------------------------------------ chunked bodies

/// Why a chunked body is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunk size line")]
    SizeLine,
    #[error("chunk size too large")]
    SizeOverflow,
    #[error("chunk data not followed by CRLF")]
    DataEnd,
    #[error("invalid or too large trailer section")]
    Trailers,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    /// Hex digits of the size (`digits` so far).
    Size,
    /// Whitespace after the size: only `;` or more whitespace may follow.
    SizeSpace,
    /// A chunk extension, up to CR.
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// The start of a trailer line (or of the final empty line).
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// A strict, incremental decoder of `Transfer-Encoding: chunked` (RFC 9112 §7.1).
#[derive(Clone, Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    size: u64,
    digits: u8,
    line: usize,
    trailers: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder { state: ChunkState::Size, size: 0, digits: 0, line: 0, trailers: 0 }
    }
}

impl ChunkedDecoder {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes from `input`, handing each run of data to `data`; returns how many bytes of
    /// `input` belong to the body (all of them unless the body ended inside `input`).
    pub fn decode<'a>(&mut self, input: &'a [u8], mut data: impl FnMut(&'a [u8])) -> Result<usize, ChunkError> {
        use ChunkState as S;
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                S::Size => match hex(b) {
                    Some(d) => {
                        if self.digits == 16 {
                            return Err(ChunkError::SizeOverflow);
                        }
                        self.size = self.size << 4 | u64::from(d);
                        self.digits += 1;
                    }
                    None if self.digits == 0 => return Err(ChunkError::SizeLine),
                    None => {
                        self.state = match b {
                            b'\r' => S::SizeLf,
                            b';' => S::Extension,
                            b' ' | b'\t' => S::SizeSpace,
                            _ => return Err(ChunkError::SizeLine),
                        }
                    }
                },
                S::SizeSpace => match b {
                    b' ' | b'\t' => {}
                    b';' => self.state = S::Extension,
                    _ => return Err(ChunkError::SizeLine),
                },
                S::Extension => match b {
                    b'\r' => self.state = S::SizeLf,
                    b'\t' | b' '..=b'~' | 0x80..=0xff => {}
                    _ => return Err(ChunkError::SizeLine),
                },
                S::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::SizeLine);
                    }
                    self.state = if self.size == 0 { S::TrailerStart } else { S::Data };
                    self.line = 0;
                }
                S::Data => {
                    let take = usize::try_from(self.size).unwrap_or(usize::MAX).min(input.len() - i);
                    data(&input[i..i + take]);
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = S::DataCr;
                    }
                    continue;
                }
                S::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError::DataEnd);
                    }
                    self.state = S::DataLf;
                }
                S::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError::DataEnd);
                    }
                    self.state = S::Size;
                    self.digits = 0;
                    self.size = 0;
                }
                S::TrailerStart => {
                    self.state = match b {
                        b'\r' => S::EndLf,
                        // obs-fold or an empty field name
                        b' ' | b'\t' | b':' | b'\n' => return Err(ChunkError::Trailers),
                        _ => S::Trailer,
                    };
                    self.count_trailer()?;
                }
                S::Trailer => {
                    match b {
                        b'\r' => self.state = S::TrailerLf,
                        b'\t' | b' '..=b'~' | 0x80..=0xff => {}
                        _ => return Err(ChunkError::Trailers),
                    }
                    self.count_trailer()?;
                }
                S::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError::Trailers);
                    }
                    self.state = S::TrailerStart;
                }
                S::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkError::Trailers);
                    }
                    self.state = S::Done;
                    return Ok(i + 1);
                }
                S::Done => return Ok(i),
            }
            if matches!(self.state, S::Size | S::SizeSpace | S::Extension | S::SizeLf) {
                self.line += 1;
                if self.line > MAX_CHUNK_LINE {
                    return Err(ChunkError::SizeLine);
                }
            }
            i += 1;
        }
        Ok(i)
    }

    fn count_trailer(&mut self) -> Result<(), ChunkError> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS { Err(ChunkError::Trailers) } else { Ok(()) }
    }
}

fn hex(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

/// Appends one chunk (`data` must not be empty: an empty chunk ends the body).
pub fn push_chunk(out: &mut Vec<u8>, data: &[u8]) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = data.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn parse(raw: &str) -> Result<Option<RequestHead>, HeadError> {
        let mut buf = BytesMut::from(raw.as_bytes());
        parse_request(&mut buf, 16 * 1024)
    }

    /// (raw head, expected framing or error, keep-alive)
    fn check(raw: &str, expected: Result<Framing, HeadError>, keep_alive: bool) {
        match (parse(raw), expected) {
            (Ok(Some(head)), Ok(framing)) => {
                assert_eq!(head.framing, framing, "{raw:?}");
                assert_eq!(head.keep_alive, keep_alive, "{raw:?}");
            }
            (Err(e), Err(expected)) => assert_eq!(e, expected, "{raw:?}"),
            (got, expected) => panic!("{raw:?}: got {got:?}, expected {expected:?}"),
        }
    }

    const BAD: fn(&'static str) -> Result<Framing, HeadError> = |m| Err(HeadError::Malformed(m));

    #[test]
    fn request_framing_is_strict() {
        check("GET / HTTP/1.1\r\nHost: a\r\n\r\n", Ok(Framing::Empty), true);
        check("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n", Ok(Framing::Length(5)), true);
        check("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", Ok(Framing::Length(5)), true);
        check(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            Ok(Framing::Length(5)),
            true,
        );
        check("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked \r\n\r\n", Ok(Framing::Chunked), true);
        check("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, close\r\n\r\n", Ok(Framing::Empty), false);
        check("GET / HTTP/1.0\r\n\r\n", Ok(Framing::Empty), false);
        check("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", Ok(Framing::Empty), true);
        // smuggling shapes
        let both = BAD("both Transfer-Encoding and Content-Length");
        check("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", both, true);
        check("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", both, true);
        let coding = BAD("a Transfer-Encoding other than chunked");
        check("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", coding, true);
        check(
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            coding,
            true,
        );
        check("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", coding, true);
        check("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n", coding, true);
        check(
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            BAD("Transfer-Encoding on an HTTP/1.0 request"),
            true,
        );
        let length = BAD("invalid Content-Length");
        for cl in ["5, 6", "+5", "-1", "5a", "", "0x5", "1 2", "99999999999999999999"] {
            let raw = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {cl}\r\n\r\n");
            check(Box::leak(raw.into_boxed_str()), length, true);
        }
        check("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", length, true);
        // Host
        let host = BAD("an HTTP/1.1 request needs exactly one Host header");
        check("GET / HTTP/1.1\r\n\r\n", host, true);
        check("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", host, true);
        // syntax
        let syntax = BAD("invalid request line or header syntax");
        check("GET / HTTP/1.1\r\nHost : a\r\n\r\n", syntax, true);
        check("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", syntax, true);
        check("GET  / HTTP/1.1\r\nHost: a\r\n\r\n", syntax, true);
        let version = BAD("invalid request line or HTTP version");
        check("GET / HTTP/2.0\r\nHost: a\r\n\r\n", version, true);
        check("GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", version, true);
    }

    #[test]
    fn heads_split_off_and_share_the_buffer() {
        let mut buf = BytesMut::from(&b"GET /x?q=1 HTTP/1.1\r\nHost: a:1\r\nX-A: 1\r\nX-A: 2\r\n\r\nNEXT"[..]);
        let head = parse_request(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(&buf[..], b"NEXT");
        assert_eq!(head.parts.method, Method::GET);
        assert_eq!(head.parts.uri.path_and_query().unwrap().as_str(), "/x?q=1");
        assert_eq!(head.parts.headers["host"], "a:1");
        let all: Vec<_> = head.parts.headers.get_all("x-a").iter().collect();
        assert_eq!(all, ["1", "2"]);
        // incomplete, then too large
        let mut partial = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: a\r\n"[..]);
        assert!(parse_request(&mut partial, 1024).unwrap().is_none());
        assert_eq!(parse_request(&mut partial, 20).unwrap_err(), HeadError::TooLarge);
        let many: String = (0..MAX_HEADERS + 1).map(|i| format!("x-{i}: 1\r\n")).collect();
        let mut buf = BytesMut::from(format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes());
        assert_eq!(parse_request(&mut buf, 1 << 20).unwrap_err(), HeadError::TooLarge);
        // absolute form
        let head = parse("GET http://example.com/p HTTP/1.1\r\nHost: other\r\n\r\n").unwrap().unwrap();
        assert_eq!(head.parts.uri.authority().unwrap(), "example.com");
        assert!(parse("GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n").unwrap().unwrap().expect_continue);
    }

    fn response(raw: &str, head_request: bool) -> (ResponseHead, String) {
        let head = parse_response(raw.as_bytes(), head_request).unwrap().unwrap();
        let mut out = Vec::new();
        let extras = ResponseExtras { request_id: b"id-1", framing: head.framing, close: false, keep_alive_10: false };
        head.write_head(raw.as_bytes(), &mut out, &extras);
        (head, String::from_utf8(out).unwrap())
    }

    #[test]
    fn response_heads_lose_hop_by_hop_fields_and_keep_the_rest() {
        let (head, out) = response(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
             Content-Length: 2\r\nX-Request-Id: upstream\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nX-Kept: 3\r\n\r\nok",
            false,
        );
        assert_eq!(head.framing, Framing::Length(2));
        assert!(head.reusable);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nX-Kept: 3\r\nx-request-id: id-1\r\n\
             content-length: 2\r\n\r\n"
        );
        let (head, out) = response("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", false);
        assert_eq!(head.framing, Framing::Chunked);
        assert!(out.contains("date: ") && out.contains("transfer-encoding: chunked\r\n"), "{out}");
        assert!(!out.contains("gzip"), "codings other than chunked are not ours to keep: {out}");
        // close-delimited, HTTP/1.0, Connection: close
        assert_eq!(response("HTTP/1.1 200 OK\r\n\r\n", false).0.framing, Framing::Close);
        assert!(!response("HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", false).0.reusable);
        assert!(!response("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false).0.reusable);
        assert!(response("HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n", false).0.reusable);
        // bodiless answers
        assert_eq!(response("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true).0.framing, Framing::Empty);
        assert_eq!(response("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", false).0.framing, Framing::Empty);
        assert_eq!(response("HTTP/1.1 204 No Content\r\n\r\n", false).0.framing, Framing::Empty);
        // a switch keeps Upgrade and says Connection: upgrade
        let (head, out) =
            response("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", false);
        assert!(!head.reusable);
        assert!(out.contains("Upgrade: websocket\r\n") && out.contains("connection: upgrade\r\n"), "{out}");
        // refused
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", false).is_err());
        assert!(parse_response(b"HTTP/1.1 20 OK\r\n\r\n", false).is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n", false).is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nX: 1\r\n", false).unwrap().is_none());
    }

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, usize), ChunkError> {
        let mut d = ChunkedDecoder::default();
        let mut out = Vec::new();
        let used = d.decode(input, |data| out.extend_from_slice(data))?;
        assert!(d.is_done(), "{input:?}");
        Ok((out, used))
    }

    #[test]
    fn chunked_bodies_decode_strictly() {
        assert_eq!(decode_all(b"5\r\nhello\r\n0\r\n\r\nNEXT").unwrap(), (b"hello".to_vec(), 15));
        assert_eq!(decode_all(b"3;ext=1\r\nabc\r\n2 ; x\r\nde\r\n0\r\nTrailer: 1\r\n\r\n").unwrap().0, b"abcde");
        assert_eq!(decode_all(b"A\r\n0123456789\r\n00\r\n\r\n").unwrap().0, b"0123456789");
        for (bad, e) in [
            (&b"5\nhello\r\n0\r\n\r\n"[..], ChunkError::SizeLine),
            (b"5\r\nhello\n0\r\n\r\n", ChunkError::DataEnd),
            (b"5\r\nhelloX\r\n", ChunkError::DataEnd),
            (b"x\r\n", ChunkError::SizeLine),
            (b"\r\n", ChunkError::SizeLine),
            (b"5 \r\nhello\r\n", ChunkError::SizeLine),
            (b"-5\r\n", ChunkError::SizeLine),
            (b"10000000000000000\r\n", ChunkError::SizeOverflow),
            (b"0\r\n folded\r\n\r\n", ChunkError::Trailers),
            (b"0\r\nX: 1\n\r\n", ChunkError::Trailers),
            (b"0\r\n\n", ChunkError::Trailers),
            (b"1;\x01\r\n", ChunkError::SizeLine),
        ] {
            let mut d = ChunkedDecoder::default();
            assert_eq!(d.decode(bad, |_| {}), Err(e), "{bad:?}");
        }
        let long = format!("1;{}\r\n", "x".repeat(MAX_CHUNK_LINE));
        assert_eq!(ChunkedDecoder::default().decode(long.as_bytes(), |_| {}), Err(ChunkError::SizeLine));
        let trailers = format!("0\r\n{}", "X: 1\r\n".repeat(MAX_TRAILERS / 4));
        assert_eq!(ChunkedDecoder::default().decode(trailers.as_bytes(), |_| {}), Err(ChunkError::Trailers));
    }

    proptest! {
        /// Whatever the chunk sizes and however the bytes are split across reads, decoding what
        /// `push_chunk` encoded gives the data back and stops exactly at the end of the body.
        #[test]
        fn chunks_round_trip_across_any_split(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..8),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let mut wire = Vec::new();
            for c in &chunks {
                push_chunk(&mut wire, c);
            }
            wire.extend_from_slice(LAST_CHUNK);
            let body_len = wire.len();
            wire.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len())).collect();
            points.push(wire.len());
            points.sort_unstable();
            let mut decoder = ChunkedDecoder::default();
            let (mut out, mut at) = (Vec::new(), 0);
            for p in points {
                if p <= at || decoder.is_done() {
                    continue;
                }
                at += decoder.decode(&wire[at..p], |d| out.extend_from_slice(d)).unwrap();
            }
            prop_assert!(decoder.is_done());
            prop_assert_eq!(at, body_len);
            prop_assert_eq!(out, chunks.concat());
        }

        /// Arbitrary heads never panic the parsers; a request head that parses leaves the bytes
        /// after it in the buffer, and a response head never claims more than it was given.
        #[test]
        fn arbitrary_heads_are_parsed_or_refused(
            line in "((GET|POST|HEAD|PRI|get) [ -~]{0,12} HTTP/1\\.[01]|HTTP/1\\.[01] [0-9]{3} [ -~]{0,8})\r\n",
            fields in proptest::collection::vec("[ -~]{0,20}(\r\n|\n)", 0..6),
            tail in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut raw = line.into_bytes();
            for f in &fields {
                raw.extend_from_slice(f.as_bytes());
            }
            raw.extend_from_slice(b"\r\n");
            raw.extend_from_slice(&tail);
            let mut buf = BytesMut::from(&raw[..]);
            if let Ok(Some(_)) = parse_request(&mut buf, 1024) {
                prop_assert!(raw.ends_with(&buf));
            }
            if let Ok(Some(head)) = parse_response(&raw, false) {
                prop_assert!(head.len <= raw.len());
            }
        }

        /// Arbitrary bytes never panic the decoder, and it never claims more than it was given.
        #[test]
        fn arbitrary_bytes_are_decoded_or_refused(input in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut d = ChunkedDecoder::default();
            if let Ok(n) = d.decode(&input, |_| {}) {
                prop_assert!(n <= input.len());
            }
        }
    }
}

//! The HTTP/1 engine's side towards HTTP/1.1 upstreams: connections (plain or TLS) owned by the
//! client connection's task while a request uses them, a per-endpoint stack of idle ones
//! ([`IdlePool`]), and the attempt loop of one exchange: endpoint choice, connect, request head
//! and body, response head; passive health and retries as in [`crate::forward`] (the
//! bookkeeping is [`forward::attempt_failed`], shared).
//!
//! Idle connections are not polled by anyone. One that the upstream closed meanwhile is
//! recognised without a system call when it is taken: the reactor has marked it readable (an
//! idle HTTP/1.1 connection has nothing to say but its close). One that closes *as* it is reused
//! fails before a byte of the response arrives; such a request is sent again on another
//! connection when that is safe (idempotent, no body), which is what RFC 9112 §9.3.1 allows.
//!
//! Retries on another endpoint follow [`crate::forward`]: only connect or TLS failures, only
//! for idempotent requests without a body. The whole exchange (connect, request, body, response
//! head) runs within the route's deadline; a connect within the upstream's connect timeout.
//!
//! What it must not do: write a request body it did not frame itself (chunks are re-encoded,
//! extensions and trailers dropped), send more of a body than its framing says, or reuse a
//! connection that is not exactly at a message boundary.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice};
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::wire::{self, ChunkError, ChunkedDecoder, Framing, ResponseError, ResponseHead};
use super::{Stream, TimedOut, Timer};
use crate::denial::{self, Denial, Reason};
use crate::forward::{self, Attempt, Attempts, ConnectError, Failure};
use crate::pipeline::Outbound;
use crate::upstream::{Endpoint, TlsSettings};

/// At most this many idle connections are kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 1024;
/// An idle connection unused this long is closed (when the pool is next given one back).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How many reused connections a request may find closed before it connects afresh.
const MAX_STALE: usize = 4;
/// Read buffers grow by this much when full (a body on its way).
pub const READ_CHUNK: usize = 16 * 1024;
/// What a connection's buffers start with, and shrink back to between messages when a large
/// one made them grow: an idle keep-alive connection holds a few KiB, not a body's worth.
pub const SMALL_BUF: usize = 4 * 1024;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

// ------------------------------------------------------------------ connections

/// A connection to an upstream endpoint and the bytes read from it but not yet used.
#[derive(Debug)]
pub struct UpstreamConn {
    pub io: Stream,
    pub buf: BytesMut,
    reused: bool,
}

impl UpstreamConn {
    fn new(io: Stream) -> UpstreamConn {
        UpstreamConn { io, buf: BytesMut::with_capacity(SMALL_BUF), reused: false }
    }

    /// No close (or stray bytes) pending, as far as the reactor knows.
    fn is_quiet(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        matches!(self.io.tcp().poll_read_ready(&mut cx), Poll::Pending)
    }

    pub async fn read_more(&mut self) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        self.io.read_buf(&mut self.buf).await
    }
}

/// Idle connections to one endpoint with when they went idle: most recently used at the back
/// (taken first), the oldest at the front (closed once idle too long). The lock is held only
/// to push or pop.
#[derive(Default)]
pub struct IdlePool {
    idle: Mutex<VecDeque<(UpstreamConn, std::time::Instant)>>,
}

impl fmt::Debug for IdlePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdlePool").finish_non_exhaustive()
    }
}

impl IdlePool {
    fn take(&self) -> Option<UpstreamConn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((conn, _)) = idle.pop_back() {
            if conn.is_quiet() {
                return Some(conn);
            }
        }
        None
    }

    /// Gives back a connection at a message boundary (nothing buffered).
    pub fn put(&self, mut conn: UpstreamConn) {
        if !conn.buf.is_empty() {
            return;
        }
        if conn.buf.capacity() > READ_CHUNK {
            conn.buf = BytesMut::with_capacity(SMALL_BUF);
        }
        conn.reused = true;
        let now = std::time::Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while idle.front().is_some_and(|(_, since)| now.duration_since(*since) >= IDLE_TIMEOUT) {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE_PER_ENDPOINT {
            idle.push_back((conn, now));
        }
    }

    pub fn len(&self) -> usize {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which deadline passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deadline {
    Connect,
    Request,
}

/// A new connection to `endpoint`, over TLS when `tls` is set, within the connect timeout
/// (and the request deadline).
async fn connect(
    endpoint: &Endpoint,
    tls: Option<&TlsSettings>,
    connect_timeout: Duration,
    deadline: Instant,
    timer: &mut Timer,
) -> Result<UpstreamConn, AttemptError> {
    let (at, which) = match Instant::now() + connect_timeout {
        at if at < deadline => (at, Deadline::Connect),
        _ => (deadline, Deadline::Request),
    };
    let authority = &endpoint.authority;
    let host = authority.host();
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let port = authority.port_u16().unwrap_or(if tls.is_some() { 443 } else { 80 });
    let stream = match timer.within(at, TcpStream::connect((host, port))).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(AttemptError::Connect(ConnectError::Failed(e.into()))),
        Err(TimedOut) => return Err(AttemptError::TimedOut(which)),
    };
    let _ = stream.set_nodelay(true);
    let Some(tls) = tls else { return Ok(UpstreamConn::new(Stream::Plain(stream))) };
    let Some(name) = endpoint.server_name.clone() else {
        return Err(AttemptError::Connect(ConnectError::ServerName(authority.to_string())));
    };
    match timer.within(at, tls.connector.connect(name, stream)).await {
        Ok(Ok(stream)) => Ok(UpstreamConn::new(Stream::Client(Box::new(stream)))),
        Ok(Err(e)) => Err(AttemptError::Connect(ConnectError::Tls(e))),
        Err(TimedOut) => Err(AttemptError::TimedOut(which)),
    }
}

// ------------------------------------------------------------------ the request body

/// How much of the client's request body has been read, and how.
#[derive(Debug)]
pub struct BodyState {
    pub framing: Framing,
    /// `Length`: bytes still to read.
    remaining: u64,
    decoder: ChunkedDecoder,
    /// Decoded bytes so far (the limit applies to these).
    seen: u64,
    pub limit: u64,
    expect_continue: bool,
    /// The whole body has been read from the client.
    pub done: bool,
}

impl BodyState {
    pub fn new(framing: Framing, expect_continue: bool) -> BodyState {
        BodyState {
            framing,
            remaining: if let Framing::Length(n) = framing { n } else { 0 },
            decoder: ChunkedDecoder::default(),
            seen: 0,
            limit: u64::MAX,
            expect_continue,
            done: framing.is_empty(),
        }
    }

    /// Consumes the body if it is all in `buf` already (to keep the connection after a
    /// denial); whether it was.
    pub fn discard_buffered(&mut self, buf: &mut BytesMut) -> bool {
        match self.framing {
            _ if self.done => {}
            Framing::Length(_) => {
                if let Ok(n) = usize::try_from(self.remaining)
                    && n <= buf.len()
                {
                    buf.advance(n);
                    self.remaining = 0;
                    self.done = true;
                }
            }
            Framing::Chunked => {
                let mut probe = self.decoder.clone();
                if let Ok(used) = probe.decode(buf, |_| {})
                    && probe.is_done()
                {
                    buf.advance(used);
                    self.done = true;
                }
            }
            Framing::Empty | Framing::Close => {}
        }
        self.done
    }

    /// Sends `100 Continue` once, if the client waits for it and the body is not in yet.
    pub async fn continue_if_expected(&mut self, client: &mut Stream) -> io::Result<()> {
        if std::mem::take(&mut self.expect_continue) && !self.done {
            client.write_all(CONTINUE).await?;
            client.flush().await?;
        }
        Ok(())
    }

    /// Takes what `buf` holds of the body: `Length` bodies as they are, chunked ones decoded and
    /// handed to `data` piece by piece. Returns how much of `buf` was body.
    pub fn take<'a>(&mut self, buf: &'a [u8], mut data: impl FnMut(&'a [u8])) -> Result<usize, BodyFault> {
        match self.framing {
            _ if self.done => Ok(0),
            Framing::Length(_) => {
                let n = usize::try_from(self.remaining).unwrap_or(usize::MAX).min(buf.len());
                if n > 0 {
                    data(&buf[..n]);
                }
                self.remaining -= n as u64;
                self.done = self.remaining == 0;
                Ok(n)
            }
            Framing::Chunked => {
                let mut seen = 0u64;
                let used = self.decoder.decode(buf, |d| {
                    seen += d.len() as u64;
                    data(d);
                });
                let used = used.map_err(BodyFault::Chunk)?;
                self.seen = self.seen.saturating_add(seen);
                if self.seen > self.limit {
                    return Err(BodyFault::TooLarge);
                }
                self.done = self.decoder.is_done();
                Ok(used)
            }
            Framing::Empty | Framing::Close => Ok(0),
        }
    }
}

/// Why a request body could not be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFault {
    Chunk(ChunkError),
    TooLarge,
}

/// The client's side of an exchange: its connection, what was read from it, its timer.
#[derive(Debug)]
pub struct ClientSide<'a> {
    pub io: &'a mut Stream,
    pub buf: &'a mut BytesMut,
    pub timer: &'a mut Timer,
}

impl ClientSide<'_> {
    /// Reads more of the client's bytes, within `deadline`.
    pub async fn read_more(&mut self, deadline: Instant) -> Result<(), AttemptError> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        match self.timer.within(deadline, self.io.read_buf(self.buf)).await {
            Ok(Ok(0)) => Err(AttemptError::ClientClosed),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(AttemptError::Client(e)),
            // A client too slow with its body within the route's deadline: its problem, not
            // the upstream's (no 504, no upstream error counted).
            Err(TimedOut) => Err(AttemptError::Client(io::ErrorKind::TimedOut.into())),
        }
    }
}

// ------------------------------------------------------------------ one exchange

/// What went wrong in one attempt.
#[derive(Debug)]
pub enum AttemptError {
    Connect(ConnectError),
    TimedOut(Deadline),
    /// A reused connection failed before any byte of the response arrived.
    Stale(io::Error),
    Upstream(io::Error),
    /// The upstream closed the connection before a whole response head.
    UpstreamClosed,
    Response(ResponseError),
    Client(io::Error),
    ClientClosed,
    Body(BodyFault),
}

impl fmt::Display for AttemptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptError::Connect(e) => write!(f, "{e}"),
            AttemptError::TimedOut(Deadline::Connect) => f.write_str("connect timed out"),
            AttemptError::TimedOut(Deadline::Request) => f.write_str("request timed out"),
            AttemptError::Stale(e) => write!(f, "reused connection failed: {e}"),
            AttemptError::Upstream(e) => write!(f, "upstream connection failed: {e}"),
            AttemptError::UpstreamClosed => f.write_str("upstream closed the connection before a response"),
            AttemptError::Response(e) => write!(f, "{e}"),
            AttemptError::Client(e) => write!(f, "reading the request body: {e}"),
            AttemptError::ClientClosed => f.write_str("the client closed the connection mid-body"),
            AttemptError::Body(BodyFault::Chunk(e)) => write!(f, "request body: {e}"),
            AttemptError::Body(BodyFault::TooLarge) => f.write_str("request body too large"),
        }
    }
}

/// A response head received from endpoint `endpoint` on `conn` (whose buffer still holds it).
#[derive(Debug)]
pub struct Exchanged {
    pub conn: UpstreamConn,
    pub head: ResponseHead,
    pub endpoint: usize,
}

/// How an exchange ended without a response to relay.
#[derive(Debug)]
pub enum ExchangeError {
    /// Answer the client with this.
    Denied(Denial),
    /// The client went away (or stopped sending its body): nothing to answer.
    ClientGone,
}

/// Sends the request (`head`, already written for the upstream, then the body from `client`)
/// to one of the route's endpoints and reads the response head.
pub async fn exchange(
    client: &mut ClientSide<'_>,
    out: &Outbound,
    body: &mut BodyState,
    head: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<Exchanged, ExchangeError> {
    let state = &*out.state;
    let upstream = &out.route.upstream;
    let tls = state.tls.as_deref();
    let idempotent = forward::is_idempotent(&out.method);
    let resendable = idempotent && body.framing.is_empty();
    let retryable = resendable && state.endpoints.len() > 1;
    let head_request = out.method == Method::HEAD;
    let mut attempts = Attempts::new(retryable);
    let mut outcome = Denial::BadGateway(denial::BadGateway::ConnectFailed);
    while let Some(Attempt { number: attempt, endpoint: i, last }) = attempts.next(state, upstream) {
        let endpoint = &state.endpoints[i];
        let _in_flight = state.start(i);
        let mut stale = 0;
        let result = loop {
            let pooled = if stale < MAX_STALE { endpoint.idle.take() } else { None };
            let conn = match pooled {
                Some(conn) => Ok(conn),
                None => {
                    state.metrics.record_connect();
                    // Boxed: connecting (TCP, TLS handshake) is rare and its future large.
                    Box::pin(connect(endpoint, tls, upstream.connect_timeout, out.deadline, client.timer)).await
                }
            };
            let sent = match conn {
                Ok(conn) => send(client, body, conn, out.deadline, head, scratch, head_request).await,
                Err(e) => Err(e),
            };
            match sent {
                Err(AttemptError::Stale(e)) if resendable => {
                    debug!(upstream.name = %state.name, upstream.endpoint = %endpoint.authority, error = %e, "reused upstream connection was closed; sending again");
                    stale += 1;
                }
                other => break other,
            }
        };
        let error = match result {
            Ok((conn, head)) => {
                state.report_success(i);
                return Ok(Exchanged { conn, head, endpoint: i });
            }
            Err(e) => e,
        };
        let failure = match &error {
            AttemptError::TimedOut(Deadline::Request) => {
                debug!(upstream.name = %state.name, upstream.endpoint = %endpoint.authority, "upstream request timed out");
                state.metrics.record_error(Reason::UpstreamTimeout);
                return Err(ExchangeError::Denied(Denial::GatewayTimeout(denial::Timeout::Request)));
            }
            AttemptError::Client(_) | AttemptError::ClientClosed => {
                debug!(upstream.name = %state.name, error = %error, "client went away during the exchange");
                return Err(ExchangeError::ClientGone);
            }
            AttemptError::Body(BodyFault::Chunk(_)) => {
                debug!(upstream.name = %state.name, error = %error, "invalid request body");
                return Err(ExchangeError::Denied(Denial::InvalidRequest("invalid chunked body")));
            }
            AttemptError::Body(BodyFault::TooLarge) => Failure::BodyTooLarge,
            AttemptError::Connect(e) => Failure::of_connect(e),
            AttemptError::TimedOut(Deadline::Connect) => Failure::ConnectTimeout,
            AttemptError::Stale(_)
            | AttemptError::Upstream(_)
            | AttemptError::UpstreamClosed
            | AttemptError::Response(_) => Failure::Reset,
        };
        match forward::attempt_failed(state, upstream, i, attempt, failure, &error) {
            Ok(denial) if !last => outcome = denial,
            Ok(denial) | Err(denial) => return Err(ExchangeError::Denied(denial)),
        }
    }
    Err(ExchangeError::Denied(outcome))
}

/// One attempt on `conn`: the head, the body, then the response head.
async fn send(
    client: &mut ClientSide<'_>,
    body: &mut BodyState,
    mut conn: UpstreamConn,
    deadline: Instant,
    head: &[u8],
    scratch: &mut Vec<u8>,
    head_request: bool,
) -> Result<(UpstreamConn, ResponseHead), AttemptError> {
    let reused = conn.reused;
    // A reused connection that fails before the upstream answered anything was (most
    // likely) closed by it while idle.
    let upstream_failed = |e: io::Error| if reused { AttemptError::Stale(e) } else { AttemptError::Upstream(e) };
    match body.framing {
        Framing::Length(_) if !body.done => {
            let mut prefix = 0;
            body.take(client.buf, |d| prefix = d.len()).map_err(AttemptError::Body)?;
            write_two(&mut conn.io, client.timer, deadline, head, &client.buf[..prefix]).await.map_err(
                |e| match e {
                    IoFault::TimedOut => AttemptError::TimedOut(Deadline::Request),
                    IoFault::Io(e) => upstream_failed(e),
                },
            )?;
            client.buf.advance(prefix);
            while !body.done {
                body.continue_if_expected(client.io).await.map_err(AttemptError::Client)?;
                client.read_more(deadline).await?;
                let mut n = 0;
                body.take(client.buf, |d| n = d.len()).map_err(AttemptError::Body)?;
                write_two(&mut conn.io, client.timer, deadline, &client.buf[..n], &[]).await.map_err(io_fault)?;
                client.buf.advance(n);
            }
        }
        Framing::Chunked if !body.done => {
            scratch.clear();
            scratch.extend_from_slice(head);
            let mut first = true;
            loop {
                let used = body.take(client.buf, |d| wire::push_chunk(scratch, d)).map_err(AttemptError::Body)?;
                client.buf.advance(used);
                if body.done {
                    scratch.extend_from_slice(wire::LAST_CHUNK);
                }
                if !scratch.is_empty() {
                    write_two(&mut conn.io, client.timer, deadline, scratch, &[]).await.map_err(|e| match e {
                        IoFault::Io(e) if first => upstream_failed(e),
                        e => io_fault(e),
                    })?;
                    scratch.clear();
                    first = false;
                }
                if body.done {
                    break;
                }
                body.continue_if_expected(client.io).await.map_err(AttemptError::Client)?;
                client.read_more(deadline).await?;
            }
        }
        _ => {
            write_two(&mut conn.io, client.timer, deadline, head, &[]).await.map_err(|e| match e {
                IoFault::TimedOut => AttemptError::TimedOut(Deadline::Request),
                IoFault::Io(e) => upstream_failed(e),
            })?;
        }
    }
    let mut received = false;
    loop {
        if !conn.buf.is_empty() {
            received = true;
            match wire::parse_response(&conn.buf, head_request) {
                // Informational answers (100, 102, 103) are not relayed; the final one follows.
                Ok(Some(h)) if h.status < 200 && h.status != 101 => {
                    conn.buf.advance(h.len);
                    continue;
                }
                Ok(Some(h)) => return Ok((conn, h)),
                Ok(None) => {}
                Err(e) => return Err(AttemptError::Response(e)),
            }
        }
        match client.timer.within(deadline, conn.read_more()).await {
            Ok(Ok(0)) if !received && reused => {
                return Err(AttemptError::Stale(io::Error::from(io::ErrorKind::UnexpectedEof)));
            }
            Ok(Ok(0)) => return Err(AttemptError::UpstreamClosed),
            Ok(Ok(_)) => {}
            Ok(Err(e)) if !received => return Err(upstream_failed(e)),
            Ok(Err(e)) => return Err(AttemptError::Upstream(e)),
            Err(TimedOut) => return Err(AttemptError::TimedOut(Deadline::Request)),
        }
    }
}

/// An I/O step that failed or ran out of time.
#[derive(Debug)]
pub enum IoFault {
    TimedOut,
    Io(io::Error),
}

fn io_fault(e: IoFault) -> AttemptError {
    match e {
        IoFault::TimedOut => AttemptError::TimedOut(Deadline::Request),
        IoFault::Io(e) => AttemptError::Upstream(e),
    }
}

/// Writes `a` then `b` (one `writev` when both fit) and flushes, within `deadline`.
pub async fn write_two(
    io: &mut Stream,
    timer: &mut Timer,
    deadline: Instant,
    a: &[u8],
    b: &[u8],
) -> Result<(), IoFault> {
    let write = async {
        let (mut a, mut b) = (a, b);
        while !a.is_empty() {
            let n = if b.is_empty() {
                io.write(a).await?
            } else {
                io.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]).await?
            };
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            if n < a.len() {
                a = &a[n..];
            } else {
                b = &b[n - a.len()..];
                a = &[];
            }
        }
        if !b.is_empty() {
            io.write_all(b).await?;
        }
        io.flush().await
    };
    match timer.within(deadline, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(IoFault::Io(e)),
        Err(TimedOut) => Err(IoFault::TimedOut),
    }
}

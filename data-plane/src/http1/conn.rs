//! One HTTP/1.x client connection, start to end, in its own task: read a request head, run the
//! pipeline, exchange with the upstream ([`super::client`]), relay the response, and again
//! while both sides keep the connection.
//!
//! Timeouts, all on the connection's one [`Timer`]: a request head must arrive within
//! `header_read_timeout` of its first byte (of the accept, for the first request); an idle
//! connection waits `keep_alive_timeout` for the next request; an exchange runs within the
//! route's deadline; while a body is relayed, every read and write must make progress within
//! the route's timeout. A head over `max_header_bytes` is 431, a malformed one 400
//! `request_invalid`; both close the connection.
//!
//! Draining (shutdown): an idle connection closes at once; a busy one finishes its exchange,
//! answers with `Connection: close` and closes.
//!
//! What it must not do: answer before the request was decided, keep a connection whose
//! request body was not read to its end (the next bytes would be taken for a request), or
//! reuse an upstream connection that is not at a message boundary.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, DATE};
use http::{HeaderValue, StatusCode, Version};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span};

use super::client::{self, BodyState, ClientSide, ExchangeError, Exchanged, IoFault, READ_CHUNK, SMALL_BUF, write_two};
use super::wire::{self, ChunkedDecoder, Framing, HeadError, RequestHead, ResponseExtras};
use super::{Rewind, Stream, TimedOut, Timer};
use crate::denial::{BadGateway, Denial};
use crate::forward::{self, Outgoing, Piece, RequestBody, X_REQUEST_ID};
use crate::pipeline::{ConnInfo, Outbound, Pipeline, RequestCtx};

/// The HTTP/2 connection preface: a plaintext connection that starts with it speaks h2c.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What every connection of a listener shares.
#[derive(Debug)]
pub struct Shared {
    pub pipeline: Arc<Pipeline>,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub shutdown: CancellationToken,
    /// Plaintext listener: a connection may start with the HTTP/2 preface (h2c).
    pub detect_h2: bool,
}

/// How a connection ended.
#[derive(Debug)]
pub enum Served {
    Done,
    /// It speaks HTTP/2: serve it with hyper (the bytes read so far come first).
    Http2(Rewind),
}

// Built once per request and matched at once: boxing the large variant would cost an
// allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
enum Incoming {
    Request(RequestHead),
    Http2,
    Refused(Denial),
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
}

/// The state of one client connection.
pub struct Connection {
    io: Stream,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    /// The upstream request head being built.
    head: Vec<u8>,
    /// Re-encoded request body chunks.
    scratch: Vec<u8>,
    timer: Timer,
    info: Arc<ConnInfo>,
    shared: Arc<Shared>,
    /// The client may still be sending bytes the proxy will not read (a refused head, a body
    /// left unread): close lingering (see [`Connection::serve`]).
    linger: bool,
}

/// How long a keep-alive connection waits for its next request before it gives its buffers back.
const IDLE_RELEASE: Duration = Duration::from_secs(1);
/// How long a closing connection keeps reading (and dropping) what the client still sends.
const LINGER: Duration = Duration::from_secs(2);
/// The most it reads so.
const LINGER_BYTES: usize = 4 << 20;

impl Connection {
    pub fn new(io: Stream, info: Arc<ConnInfo>, shared: Arc<Shared>) -> Connection {
        let timer = Timer::new(Instant::now() + shared.header_read_timeout);
        Connection {
            io,
            rbuf: BytesMut::with_capacity(SMALL_BUF),
            wbuf: Vec::with_capacity(SMALL_BUF),
            head: Vec::with_capacity(1024),
            scratch: Vec::new(),
            timer,
            info,
            shared,
            linger: false,
        }
    }

    pub async fn serve(mut self) -> Served {
        let mut first = true;
        loop {
            let head = match self.read_head(first).await {
                Incoming::Request(head) => head,
                Incoming::Http2 => return Served::Http2(Rewind::new(self.rbuf.freeze(), self.io)),
                Incoming::Closed => break,
                Incoming::Refused(denial) => {
                    self.shared.pipeline.record_unparsed(&denial, self.info.peer);
                    let id = self.shared.pipeline.next_request_id();
                    self.answer(&denial, &id, false).await;
                    self.linger = true;
                    break;
                }
            };
            first = false;
            // A `request` span only when it is recorded: wrapping the exchange in one moves the
            // whole exchange future per request, even for a disabled span (~350 instructions).
            let next = if tracing::enabled!(tracing::Level::DEBUG) {
                let span = debug_span!("request", http.method = %head.parts.method, client.addr = %self.info.peer);
                self.exchange(head).instrument(span).await
            } else {
                self.exchange(head).await
            };
            if next == Next::Close || self.shared.shutdown.is_cancelled() {
                break;
            }
        }
        let at = Instant::now() + Duration::from_secs(1);
        let _ = self.timer.within(at, self.io.shutdown()).await;
        if self.linger {
            // Closing a socket with unread bytes in it resets the connection, and a reset can
            // destroy the answer the client has not read yet (a 413 ahead of a large body).
            // So, after our FIN: read and drop what still comes, for a little while.
            let until = Instant::now() + LINGER;
            let mut dropped = 0;
            while dropped < LINGER_BYTES {
                self.rbuf.clear();
                match self.timer.within(until, self.io.read_buf(&mut self.rbuf)).await {
                    Ok(Ok(n)) if n > 0 => dropped += n,
                    _ => break,
                }
            }
        }
        Served::Done
    }

    /// Reads the next request head. Waiting for its first byte, the connection is idle: it may
    /// close on drain or after the keep-alive timeout.
    async fn read_head(&mut self, first: bool) -> Incoming {
        let Connection { io, rbuf, wbuf, head: head_buf, scratch, timer, shared, info, .. } = self;
        let mut idle = !first && rbuf.is_empty();
        if idle && rbuf.capacity() > READ_CHUNK {
            // A large message made them grow; between requests they shrink back.
            *rbuf = BytesMut::with_capacity(SMALL_BUF);
        }
        if wbuf.capacity() > READ_CHUNK {
            *wbuf = Vec::with_capacity(SMALL_BUF);
        }
        let now = Instant::now();
        let mut at = now + if idle { shared.keep_alive_timeout } else { shared.header_read_timeout };
        // An idle connection that stays idle gives its buffers back (a few KiB each, for every
        // open keep-alive connection); a busy one never waits that long.
        let mut release = (idle && IDLE_RELEASE < shared.keep_alive_timeout).then(|| now + IDLE_RELEASE);
        timer.set(release.map_or(at, |r| r.min(at)));
        let mut drain = pin!(shared.shutdown.cancelled());
        loop {
            if !rbuf.is_empty() {
                if first && shared.detect_h2 && H2_PREFACE.starts_with(&rbuf[..rbuf.len().min(H2_PREFACE.len())]) {
                    if rbuf.len() >= H2_PREFACE.len() {
                        return Incoming::Http2;
                    }
                } else {
                    match wire::parse_request(rbuf, shared.max_header_bytes) {
                        Ok(Some(head)) => return Incoming::Request(head),
                        Ok(None) => {}
                        Err(HeadError::TooLarge) => return Incoming::Refused(Denial::HeadersTooLarge),
                        Err(HeadError::Malformed(what)) => {
                            debug!(client.addr = %info.peer, error = what, "malformed request head");
                            return Incoming::Refused(Denial::InvalidRequest(what));
                        }
                    }
                }
                if idle {
                    idle = false;
                    release = None;
                    at = Instant::now() + shared.header_read_timeout;
                    timer.set(at);
                }
            }
            if rbuf.capacity() - rbuf.len() < 1024 {
                rbuf.reserve(if rbuf.capacity() == 0 { SMALL_BUF } else { READ_CHUNK });
            }
            let mut read = pin!(io.read_buf(rbuf));
            let step = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = read.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                if idle && drain.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                timer.poll_expired(cx).map(|()| Some(Err(std::io::ErrorKind::TimedOut.into())))
            })
            .await;
            match step {
                Some(Ok(0)) | None => return Incoming::Closed,
                Some(Ok(_)) => {}
                Some(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                    if release.take().is_some() && Instant::now() < at {
                        *rbuf = BytesMut::new();
                        *wbuf = Vec::new();
                        *head_buf = Vec::new();
                        *scratch = Vec::new();
                        timer.set(at);
                        continue;
                    }
                    let metrics = &shared.pipeline.metrics().connections;
                    if idle { &metrics.idle_timeouts } else { &metrics.header_timeouts }.fetch_add(1, Relaxed);
                    return Incoming::Closed;
                }
                Some(Err(e)) => {
                    debug!(client.addr = %info.peer, error = %e, "client connection failed");
                    return Incoming::Closed;
                }
            }
        }
    }

    /// One request, from its head to the end of its response.
    async fn exchange(&mut self, head: RequestHead) -> Next {
        let mut body = BodyState::new(head.framing, head.expect_continue);
        let next = self.exchange_with(head, &mut body).await;
        self.linger = next == Next::Close && !body.done;
        next
    }

    async fn exchange_with(&mut self, head: RequestHead, body: &mut BodyState) -> Next {
        let RequestHead { parts, framing, keep_alive, .. } = head;
        let pipeline = Arc::clone(&self.shared.pipeline);
        let mut ctx = RequestCtx::new(parts, Arc::clone(&self.info));
        if let Err((stage, denial)) = pipeline.decide(&mut ctx).await {
            pipeline.record_denial(&ctx, stage, &denial);
            let keep = keep_alive && body.discard_buffered(&mut self.rbuf);
            return self.answer(&denial, ctx.request_id(), keep).await;
        }
        let out = match pipeline.outbound(&mut ctx) {
            Ok(out) => out,
            Err(denial) => {
                pipeline.record_denial(&ctx, "forward", &denial);
                let keep = keep_alive && body.discard_buffered(&mut self.rbuf);
                return self.answer(&denial, ctx.request_id(), keep).await;
            }
        };
        body.limit = out.body_limit;
        if out.route.upstream.http2 {
            // Boxed: hyper's client future is large, and HTTP/2 upstreams are the rarer case;
            // inline it would grow every connection's future by kilobytes.
            return Box::pin(self.via_hyper(&pipeline, &ctx, out, body, keep_alive)).await;
        }
        self.head.clear();
        wire::write_request_head(
            &mut self.head,
            &out.method,
            out.path_and_query.as_str(),
            &out.headers,
            framing,
            |h| out.forwarding.write(h),
        );
        let mut client = ClientSide { io: &mut self.io, buf: &mut self.rbuf, timer: &mut self.timer };
        match client::exchange(&mut client, &out, body, &self.head, &mut self.scratch).await {
            Ok(exchanged) => self.relay(&pipeline, &ctx, &out, exchanged, body, keep_alive).await,
            Err(ExchangeError::ClientGone) => Next::Close,
            Err(ExchangeError::Denied(denial)) => {
                pipeline.record_upstream_failure(&ctx, &out, &denial);
                self.answer(&denial, ctx.request_id(), keep_alive && body.done).await
            }
        }
    }

    /// Relays the upstream's response (head, then body) to the client.
    async fn relay(
        &mut self,
        pipeline: &Pipeline,
        ctx: &RequestCtx,
        out: &Outbound,
        exchanged: Exchanged,
        body: &BodyState,
        keep_alive: bool,
    ) -> Next {
        let Exchanged { mut conn, head, endpoint } = exchanged;
        let switching = head.status == 101;
        if switching && !out.upgrade {
            // A switch nobody asked for cannot be relayed.
            let denial = Denial::BadGateway(BadGateway::Reset);
            pipeline.record_upstream_failure(ctx, out, &denial);
            return self.answer(&denial, ctx.request_id(), false).await;
        }
        pipeline.record_forwarded(ctx, out, StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY));
        let http10 = ctx.version() == Version::HTTP_10;
        let framing = match head.framing {
            // HTTP/1.0 has no chunks: the body ends with the connection.
            Framing::Chunked if http10 => Framing::Close,
            f => f,
        };
        let close = !switching
            && (!keep_alive || !body.done || framing == Framing::Close || self.shared.shutdown.is_cancelled());
        let extras = ResponseExtras {
            request_id: ctx.request_id().as_bytes(),
            framing: if switching { Framing::Empty } else { framing },
            close,
            keep_alive_10: !close && http10,
        };
        self.wbuf.clear();
        head.write_head(&conn.buf, &mut self.wbuf, &extras);
        conn.buf.advance(head.len);
        if switching {
            return Box::pin(self.tunnel(conn, out)).await;
        }
        let idle = out.route.plan.timeout;
        match self.relay_body(&mut conn, head.framing, framing, idle).await {
            Ok(true) if head.reusable => out.state.endpoints[endpoint].idle.put(conn),
            Ok(_) => {}
            Err(fault) => {
                debug!(route.name = %out.route.route.name, upstream.name = %out.route.upstream.name, error = ?fault, "response body not relayed to its end");
                if fault == RelayFault::Upstream {
                    out.state.metrics.record_error(crate::denial::Reason::UpstreamReset);
                }
                return Next::Close;
            }
        }
        if close { Next::Close } else { Next::KeepAlive }
    }

    /// Writes the response head in `wbuf` and the body from `conn`, framed as `to`. `Ok(true)`:
    /// the upstream connection ended exactly at the end of the message.
    async fn relay_body(
        &mut self,
        conn: &mut client::UpstreamConn,
        from: Framing,
        to: Framing,
        idle: Duration,
    ) -> Result<bool, RelayFault> {
        let timer = &mut self.timer;
        let client = &mut self.io;
        let wbuf = &mut self.wbuf;
        match from {
            Framing::Empty => {
                write_two(client, timer, Instant::now() + idle, wbuf, &[]).await.map_err(RelayFault::client)?;
                Ok(conn.buf.is_empty())
            }
            Framing::Length(n) => {
                let mut remaining = n;
                let mut k = usize::try_from(remaining).unwrap_or(usize::MAX).min(conn.buf.len());
                if k <= COALESCE {
                    wbuf.extend_from_slice(&conn.buf[..k]);
                    write_two(client, timer, Instant::now() + idle, wbuf, &[]).await
                } else {
                    write_two(client, timer, Instant::now() + idle, wbuf, &conn.buf[..k]).await
                }
                .map_err(RelayFault::client)?;
                loop {
                    conn.buf.advance(k);
                    remaining -= k as u64;
                    if remaining == 0 {
                        return Ok(conn.buf.is_empty());
                    }
                    read_upstream(conn, timer, Instant::now() + idle).await?;
                    k = usize::try_from(remaining).unwrap_or(usize::MAX).min(conn.buf.len());
                    write_two(client, timer, Instant::now() + idle, &conn.buf[..k], &[])
                        .await
                        .map_err(RelayFault::client)?;
                }
            }
            Framing::Chunked => {
                let mut decoder = ChunkedDecoder::default();
                loop {
                    let used = decoder
                        .decode(&conn.buf, |d| {
                            if to == Framing::Chunked {
                                wire::push_chunk(wbuf, d);
                            } else {
                                wbuf.extend_from_slice(d);
                            }
                        })
                        .map_err(|_| RelayFault::Upstream)?;
                    conn.buf.advance(used);
                    if decoder.is_done() && to == Framing::Chunked {
                        wbuf.extend_from_slice(wire::LAST_CHUNK);
                    }
                    if !wbuf.is_empty() {
                        write_two(client, timer, Instant::now() + idle, wbuf, &[]).await.map_err(RelayFault::client)?;
                        wbuf.clear();
                    }
                    if decoder.is_done() {
                        return Ok(conn.buf.is_empty());
                    }
                    read_upstream(conn, timer, Instant::now() + idle).await?;
                }
            }
            Framing::Close => {
                write_two(client, timer, Instant::now() + idle, wbuf, &conn.buf).await.map_err(RelayFault::client)?;
                loop {
                    conn.buf.clear();
                    match timer.within(Instant::now() + idle, conn.read_more()).await {
                        Ok(Ok(0)) => return Ok(false),
                        Ok(Ok(_)) => {}
                        Ok(Err(_)) | Err(TimedOut) => return Err(RelayFault::Upstream),
                    }
                    write_two(client, timer, Instant::now() + idle, &conn.buf, &[])
                        .await
                        .map_err(RelayFault::client)?;
                }
            }
        }
    }

    /// After a `101`: the head (and whatever the upstream sent after it) to the client, what the
    /// client sent after its request to the upstream, then bytes both ways until either closes.
    async fn tunnel(&mut self, mut conn: client::UpstreamConn, out: &Outbound) -> Next {
        let idle = Instant::now() + out.route.plan.timeout;
        let timer = &mut self.timer;
        if write_two(&mut self.io, timer, idle, &self.wbuf, &conn.buf).await.is_err() {
            return Next::Close;
        }
        conn.buf.clear();
        if !self.rbuf.is_empty() {
            if write_two(&mut conn.io, timer, idle, &self.rbuf, &[]).await.is_err() {
                return Next::Close;
            }
            self.rbuf.clear();
        }
        // The tunnel's lifetime is the client's and the upstream's business, not a deadline's.
        timer.set(Instant::now() + Duration::from_secs(365 * 24 * 3600));
        match tokio::io::copy_bidirectional(&mut self.io, &mut conn.io).await {
            Ok((up, down)) => {
                debug!(route.name = %out.route.route.name, bytes.up = up, bytes.down = down, "upgraded connection closed");
            }
            Err(e) => debug!(route.name = %out.route.route.name, error = %e, "upgraded connection failed"),
        }
        Next::Close
    }

    /// Forwards through hyper's client (an HTTP/2 upstream): the body is read here and handed
    /// over piece by piece, the response is written back as HTTP/1.1.
    async fn via_hyper(
        &mut self,
        pipeline: &Pipeline,
        ctx: &RequestCtx,
        mut out: Outbound,
        body: &mut BodyState,
        keep_alive: bool,
    ) -> Next {
        let (tx, rx) = mpsc::channel(2);
        let request_body = if body.done { RequestBody::empty() } else { RequestBody::pieces(rx, out.body_limit) };
        let outgoing = Outgoing {
            method: out.method.clone(),
            path_and_query: out.path_and_query.clone(),
            headers: out.take_headers(),
            body: request_body,
        };
        let result = {
            let send = pipeline.forwarder().send(&out.route.upstream, &out.state, out.deadline, outgoing);
            let mut client = ClientSide { io: &mut self.io, buf: &mut self.rbuf, timer: &mut self.timer };
            let pump = pump_body(&mut client, body, tx, out.deadline);
            // Both run in this task; once the answer (or the failure) is in, the body no longer
            // matters: a failed upstream must not wait for a slow client's body.
            let (mut send, mut pump) = (std::pin::pin!(send), std::pin::pin!(pump));
            let mut pumping = true;
            loop {
                tokio::select! {
                    r = &mut send => break r,
                    () = &mut pump, if pumping => pumping = false,
                }
            }
        };
        let mut response = match result {
            Ok(r) if r.status() != StatusCode::SWITCHING_PROTOCOLS => r,
            Ok(_) => {
                let denial = Denial::BadGateway(BadGateway::Reset);
                pipeline.record_upstream_failure(ctx, &out, &denial);
                return self.answer(&denial, ctx.request_id(), false).await;
            }
            Err(denial) => {
                pipeline.record_upstream_failure(ctx, &out, &denial);
                return self.answer(&denial, ctx.request_id(), keep_alive && body.done).await;
            }
        };
        let status = response.status();
        pipeline.record_forwarded(ctx, &out, status);
        let headers = response.headers_mut();
        forward::remove_hop_by_hop(headers, false);
        headers.remove(&X_REQUEST_ID);
        let http10 = ctx.version() == Version::HTTP_10;
        let bodiless = out.method == http::Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let length = if bodiless {
            None
        } else {
            headers.remove(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        };
        let framing = match length {
            _ if bodiless => Framing::Empty,
            Some(n) => Framing::Length(n),
            None if http10 => Framing::Close,
            None => Framing::Chunked,
        };
        let close = !keep_alive || !body.done || framing == Framing::Close || self.shared.shutdown.is_cancelled();
        let extras =
            ResponseExtras { request_id: ctx.request_id().as_bytes(), framing, close, keep_alive_10: !close && http10 };
        self.wbuf.clear();
        let date = !headers.contains_key(DATE);
        wire::write_response(&mut self.wbuf, status, headers, date, &[], &extras);
        let idle = out.route.plan.timeout;
        let mut upstream = response.into_body();
        let mut sent = 0u64;
        let complete = loop {
            let frame = match self.timer.within(Instant::now() + idle, upstream.frame()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(None) => break true,
                Ok(Some(Err(_))) | Err(TimedOut) => break false,
            };
            let Ok(data) = frame.into_data() else { continue };
            if data.is_empty() {
                continue;
            }
            sent += data.len() as u64;
            match framing {
                Framing::Chunked => wire::push_chunk(&mut self.wbuf, &data),
                Framing::Length(n) if sent > n => break false,
                _ => self.wbuf.extend_from_slice(&data),
            }
            if write_two(&mut self.io, &mut self.timer, Instant::now() + idle, &self.wbuf, &[]).await.is_err() {
                return Next::Close;
            }
            self.wbuf.clear();
        };
        let complete = complete && !matches!(framing, Framing::Length(n) if sent != n);
        if complete && framing == Framing::Chunked {
            self.wbuf.extend_from_slice(wire::LAST_CHUNK);
        }
        if !self.wbuf.is_empty()
            && write_two(&mut self.io, &mut self.timer, Instant::now() + idle, &self.wbuf, &[]).await.is_err()
        {
            return Next::Close;
        }
        if complete && !close { Next::KeepAlive } else { Next::Close }
    }

    /// Writes `denial`'s problem response; `keep`: the connection stays open after it.
    async fn answer(&mut self, denial: &Denial, request_id: &HeaderValue, keep: bool) -> Next {
        let (status, headers, body) = denial.problem(Some(request_id));
        let close = !keep || self.shared.shutdown.is_cancelled();
        let extras = ResponseExtras {
            request_id: request_id.as_bytes(),
            framing: Framing::Length(body.len() as u64),
            close,
            keep_alive_10: false,
        };
        self.wbuf.clear();
        wire::write_response(&mut self.wbuf, status, &headers, true, &body, &extras);
        let at = Instant::now() + self.shared.header_read_timeout;
        if write_two(&mut self.io, &mut self.timer, at, &self.wbuf, &[]).await.is_err() || close {
            Next::Close
        } else {
            Next::KeepAlive
        }
    }
}

/// Bodies up to this size are copied after the response head into one write.
const COALESCE: usize = 8 * 1024;

/// Why a response body stopped before its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RelayFault {
    /// The upstream closed, failed, went silent or broke the framing.
    Upstream,
    /// The client stopped reading or went away.
    Client,
}

impl RelayFault {
    fn client(_: IoFault) -> RelayFault {
        RelayFault::Client
    }
}

async fn read_upstream(conn: &mut client::UpstreamConn, timer: &mut Timer, at: Instant) -> Result<(), RelayFault> {
    match timer.within(at, conn.read_more()).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        _ => Err(RelayFault::Upstream),
    }
}

/// Reads the client's body and hands it to a hyper client as pieces, ending with
/// [`Piece::End`] only once the body is complete.
async fn pump_body(client: &mut ClientSide<'_>, body: &mut BodyState, tx: mpsc::Sender<Piece>, deadline: Instant) {
    if body.done {
        return;
    }
    loop {
        if !client.buf.is_empty() {
            let mut pieces: smallvec::SmallVec<[Bytes; 4]> = smallvec::SmallVec::new();
            let used = match body.take(client.buf, |d| pieces.push(Bytes::copy_from_slice(d))) {
                Ok(used) => used,
                Err(_) => return,
            };
            client.buf.advance(used);
            for piece in pieces {
                if !matches!(client.timer.within(deadline, tx.send(Piece::Data(piece))).await, Ok(Ok(()))) {
                    return;
                }
            }
            if body.done {
                let _ = client.timer.within(deadline, tx.send(Piece::End)).await;
                return;
            }
        }
        if body.continue_if_expected(client.io).await.is_err() || client.read_more(deadline).await.is_err() {
            return;
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// Every open connection holds its task's future: the rare paths (HTTP/2 upstreams,
    /// tunnels, introspection) are boxed so that an idle keep-alive connection stays small.
    #[tokio::test]
    async fn a_connection_future_stays_small() {
        fn size_of<F: std::future::Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let pipeline = Arc::new(Pipeline::new(crate::snapshot::new_handle(), Default::default(), Default::default()));
        let shared = Arc::new(Shared {
            pipeline,
            max_header_bytes: 8192,
            header_read_timeout: Duration::from_secs(1),
            keep_alive_timeout: Duration::from_secs(1),
            shutdown: CancellationToken::new(),
            detect_h2: true,
        });
        let info = Arc::new(ConnInfo::new(addr, false));
        let serve = Connection::new(Stream::Plain(stream), info, shared).serve();
        let size = size_of(&serve);
        assert!(size <= 5 * 1024, "the connection future grew to {size} bytes");
    }
}

//! The proxy's own HTTP/1.1 engine: client connections speaking HTTP/1.x, proxied to HTTP/1.1
//! upstreams (plain or TLS) on pooled connections, in ONE task per client connection.
//!
//! Why not hyper here: a proxied request through hyper's server and client is two connection
//! tasks and a dispatch channel per side, a `Request`/`Response` moved through several layers,
//! a timer armed per request and per read, and the head parsed into a `HeaderMap` and written
//! back out on both sides. This engine reads a request head (httparse, header values shared with
//! the read buffer), runs the same [`Pipeline`](crate::pipeline::Pipeline) stages as the hyper
//! path, writes the upstream head straight from the pipeline's `HeaderMap`, drives the pooled
//! upstream connection from the same task, and copies the response head field by field (hop-by-hop
//! fields dropped) without building a `HeaderMap` for it. Timeouts use one lazily re-armed timer
//! per connection ([`Timer`]): a request moves a deadline (an `Instant` in a field), and the
//! timer wheel is touched only when the armed sleep fires early or a deadline moves earlier.
//!
//! hyper still serves HTTP/2 (h2c prior knowledge and ALPN `h2`, see [`crate::server`]) and
//! talks to HTTP/2 upstreams; an HTTP/1 client whose route has an HTTP/2 upstream goes through
//! [`crate::forward::Forwarder`] from this engine.
//!
//! - [`wire`]: parsing, framing rules, head writing, chunked coding (no I/O).
//! - [`conn`]: the client connection loop.
//! - [`client`]: upstream connections, their per-endpoint idle pool, the attempt loop.

pub mod client;
pub mod conn;
pub mod wire;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

// ------------------------------------------------------------------ streams

/// A connection of either side, plain or TLS: one concrete type, so the engine is compiled once.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    /// A client connection over TLS.
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// An upstream connection over TLS.
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Server(s) => s.get_ref().0,
            Stream::Client(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Server(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Client(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Server(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Client(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Server(s) => Pin::new(s).poll_flush(cx),
            Stream::Client(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Server(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Client(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A stream whose first bytes were already read (the connection preface that told HTTP/2
/// from HTTP/1): they are read again before the stream's own.
#[derive(Debug)]
pub struct Rewind {
    pre: Bytes,
    inner: Stream,
}

impl Rewind {
    pub fn new(pre: Bytes, inner: Stream) -> Rewind {
        Rewind { pre, inner }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pre.has_remaining() {
            let n = this.pre.len().min(buf.remaining());
            buf.put_slice(&this.pre[..n]);
            this.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

// ------------------------------------------------------------------ timer

/// A deadline was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("timed out")]
pub struct TimedOut;

/// One connection's timeouts with one timer: the deadline in force is a plain field, and the
/// armed sleep is only moved when a deadline comes *earlier* than it, or when it fires before
/// the deadline in force (then it is re-armed to it). A request that moves its deadlines later,
/// as every keep-alive request does, never touches the timer wheel.
///
/// **Invariant:** the armed sleep never fires after the deadline in force.
#[derive(Debug)]
pub struct Timer {
    sleep: Pin<Box<Sleep>>,
    at: Instant,
}

impl Timer {
    pub fn new(at: Instant) -> Timer {
        Timer { sleep: Box::pin(tokio::time::sleep_until(at)), at }
    }

    pub fn set(&mut self, at: Instant) {
        if at < self.sleep.deadline() {
            self.sleep.as_mut().reset(at);
        }
        self.at = at;
    }

    /// Ready once the deadline in force has passed.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(self.sleep.as_mut().poll(cx));
            if Instant::now() >= self.at {
                return Poll::Ready(());
            }
            self.sleep.as_mut().reset(self.at);
        }
    }

    /// Runs `f` until it finishes or `at` passes.
    pub async fn within<F: Future>(&mut self, at: Instant, f: F) -> Result<F::Output, TimedOut> {
        self.set(at);
        let mut f = std::pin::pin!(f);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = f.as_mut().poll(cx) {
                return Poll::Ready(Ok(v));
            }
            self.poll_expired(cx).map(|()| Err(TimedOut))
        })
        .await
    }
}

// ------------------------------------------------------------------ live connections

/// Counts open client connections so that draining can wait for the last one.
#[derive(Debug, Default)]
pub struct Live {
    open: AtomicUsize,
    idle: Notify,
}

/// One open connection; dropping it closes the count.
#[derive(Debug)]
pub struct LiveGuard(Arc<Live>);

impl Live {
    pub fn enter(self: &Arc<Self>) -> LiveGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        LiveGuard(Arc::clone(self))
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Resolves once no connection is open.
    pub async fn drained(&self) {
        loop {
            let notified = self.idle.notified();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

// ------------------------------------------------------------------ Date

/// The `Date` field of responses the proxy writes, formatted at most once a second.
pub mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }

    /// Appends `date: <IMF-fixdate>\r\n`.
    pub fn push(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHE.with_borrow_mut(|(at, text)| {
            if *at != secs || text.is_empty() {
                *at = secs;
                *text = httpdate::fmt_http_date(now);
            }
            super::wire::push_field(out, b"date", text.as_bytes());
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_timer_fires_at_the_deadline_in_force() {
        let start = Instant::now();
        let mut timer = Timer::new(start + Duration::from_secs(10));
        // moved later: the armed sleep fires early, is re-armed, and the work finishes in time
        let done = timer.within(start + Duration::from_secs(20), tokio::time::sleep(Duration::from_secs(15))).await;
        assert_eq!(done, Ok(()));
        // moved earlier: the sleep is reset
        let at = Instant::now() + Duration::from_secs(1);
        let late = timer.within(at, tokio::time::sleep(Duration::from_secs(5))).await;
        assert_eq!(late, Err(TimedOut));
        assert_eq!(Instant::now(), at);
        // an already elapsed sleep does not fire for a later deadline
        let at = Instant::now() + Duration::from_secs(3);
        assert_eq!(timer.within(at, tokio::time::sleep(Duration::from_secs(2))).await, Ok(()));
        assert_eq!(timer.within(at + Duration::from_secs(5), std::future::pending::<()>()).await, Err(TimedOut));
        assert_eq!(Instant::now(), at + Duration::from_secs(5));
    }

    #[tokio::test]
    async fn draining_waits_for_the_last_connection() {
        let live = Arc::new(Live::default());
        let a = live.enter();
        let b = live.enter();
        assert_eq!(live.open(), 2);
        let waiter = tokio::spawn({
            let live = Arc::clone(&live);
            async move { live.drained().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        tokio::time::timeout(Duration::from_secs(1), waiter).await.unwrap().unwrap();
    }

    #[test]
    fn the_date_is_an_imf_fixdate() {
        let mut out = Vec::new();
        date::push(&mut out);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("date: ") && s.ends_with(" GMT\r\n") && s.len() == 6 + 29 + 2, "{s:?}");
    }
}

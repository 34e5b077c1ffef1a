//! The client-facing server: accepts connections (plaintext, or TLS through [`crate::tls`]),
//! serves HTTP/1.x on them with the proxy's own engine ([`crate::http1`]) and HTTP/2 with
//! hyper (h2c by prior knowledge on plaintext, found from the connection preface; ALPN `h2` on
//! TLS), and drains on shutdown: stop accepting, let in-flight requests finish until the drain
//! deadline, then close.
//!
//! Limits enforced at this layer: the header block size (HTTP/1: 431 with a problem body, then
//! close; HTTP/2: `max_header_list_size`), the time a client may take to send its headers (and
//! to finish a TLS handshake), and how long an idle HTTP/1 connection is kept.
//!
//! What it must not do: decide anything about a request (that is the pipeline's job) or block
//! the accept loop on one connection's handshake.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, info, warn};

use crate::http1::conn::{Connection, Served, Shared};
use crate::http1::{Live, Rewind, Stream};
use crate::pipeline::{ConnInfo, Pipeline};

/// The smallest header block limit accepted (what hyper needs for HTTP/1 too).
const MIN_HEADER_BYTES: usize = 8192;

#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The largest request header block accepted (at least 8 KiB).
    pub max_header_bytes: usize,
    /// How long a client may take to send a request's headers (and to finish a TLS handshake).
    pub header_read_timeout: Duration,
    /// How long an idle HTTP/1 connection waits for its next request.
    pub keep_alive_timeout: Duration,
    /// How long in-flight requests may run after shutdown starts.
    pub drain_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_header_bytes: 16 * 1024,
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

pub struct Server {
    h2: Arc<hyper::server::conn::http2::Builder<TokioExecutor>>,
    pipeline: Arc<Pipeline>,
    tls: Option<TlsAcceptor>,
    options: ServerOptions,
}

impl Server {
    pub fn new(options: ServerOptions, pipeline: Arc<Pipeline>, tls: Option<TlsAcceptor>) -> Server {
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new()).max_header_list_size(u32::try_from(options.max_header_bytes).unwrap_or(u32::MAX));
        Server { h2: Arc::new(h2), pipeline, tls, options }
    }

    /// Accepts connections until `shutdown` fires, then drains them (up to the drain timeout).
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        let live = Arc::new(Live::default());
        let shared = Arc::new(Shared {
            pipeline: Arc::clone(&self.pipeline),
            max_header_bytes: self.options.max_header_bytes.max(MIN_HEADER_BYTES),
            header_read_timeout: self.options.header_read_timeout,
            keep_alive_timeout: self.options.keep_alive_timeout,
            shutdown: shutdown.clone(),
            detect_h2: self.tls.is_none(),
        });
        loop {
            let (stream, peer) = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let guard = live.enter();
            let conn = ConnSetup {
                shared: Arc::clone(&shared),
                h2: Arc::clone(&self.h2),
                tls: self.tls.clone(),
                handshake_timeout: self.options.header_read_timeout,
            };
            tokio::spawn(async move {
                conn.run(stream, peer).await;
                drop(guard);
            });
        }
        drop(listener);
        info!(connections = live.open(), drain_timeout = ?self.options.drain_timeout, "stopped accepting; draining");
        tokio::select! {
            () = live.drained() => info!("drained"),
            () = tokio::time::sleep(self.options.drain_timeout) => {
                warn!(connections = live.open(), "drain deadline passed; closing the remaining connections");
            }
        }
    }
}

/// What a connection task needs to start.
struct ConnSetup {
    shared: Arc<Shared>,
    h2: Arc<hyper::server::conn::http2::Builder<TokioExecutor>>,
    tls: Option<TlsAcceptor>,
    handshake_timeout: Duration,
}

impl ConnSetup {
    async fn run(self, stream: TcpStream, peer: SocketAddr) {
        let metrics = Arc::clone(self.shared.pipeline.metrics());
        metrics.connections.open.fetch_add(1, Relaxed);
        let info = Arc::new(ConnInfo::new(peer, self.tls.is_some()));
        let served = match &self.tls {
            None => {
                metrics.connections.http1.fetch_add(1, Relaxed);
                Connection::new(Stream::Plain(stream), Arc::clone(&info), Arc::clone(&self.shared)).serve().await
            }
            Some(acceptor) => match tokio::time::timeout(self.handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => {
                    metrics.connections.http2.fetch_add(1, Relaxed);
                    Served::Http2(Rewind::new(bytes::Bytes::new(), Stream::Server(Box::new(tls))))
                }
                Ok(Ok(tls)) => {
                    metrics.connections.http1.fetch_add(1, Relaxed);
                    let io = Stream::Server(Box::new(tls));
                    Connection::new(io, Arc::clone(&info), Arc::clone(&self.shared)).serve().await
                }
                Ok(Err(e)) => {
                    debug!(client.addr = %peer, error = %e, "tls handshake failed");
                    Served::Done
                }
                Err(_) => {
                    debug!(client.addr = %peer, "tls handshake timed out");
                    Served::Done
                }
            },
        };
        if let Served::Http2(io) = served {
            if self.tls.is_none() {
                // Counted as HTTP/1 until the preface said otherwise.
                metrics.connections.http1.fetch_sub(1, Relaxed);
                metrics.connections.http2.fetch_add(1, Relaxed);
            }
            self.serve_h2(io, info).await;
        }
        metrics.connections.open.fetch_sub(1, Relaxed);
    }

    /// HTTP/2 through hyper, each stream through [`Pipeline::handle`]; on drain, a GOAWAY and
    /// the open streams finish.
    async fn serve_h2(&self, io: Rewind, info: Arc<ConnInfo>) {
        let pipeline = Arc::clone(&self.shared.pipeline);
        let peer = info.peer;
        let service = service_fn(move |request: Request<Incoming>| {
            let pipeline = Arc::clone(&pipeline);
            let info = Arc::clone(&info);
            let span = debug_span!("request", http.method = %request.method());
            async move { Ok::<_, Infallible>(pipeline.handle(request, info).await) }.instrument(span)
        });
        let mut connection = std::pin::pin!(self.h2.serve_connection(TokioIo::new(io), service));
        let result = tokio::select! {
            r = connection.as_mut() => r,
            () = self.shared.shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(e) = result {
            debug!(client.addr = %peer, error = %e, "http/2 connection ended with an error");
        }
    }
}

//! The client-facing HTTP server: accepts connections (plaintext, or TLS through
//! [`crate::tls`]), serves HTTP/1.1 and HTTP/2 on them with hyper's auto builder (h2c by prior
//! knowledge on plaintext, ALPN on TLS), hands each request to the [`Pipeline`], and drains on
//! shutdown: stop accepting, let in-flight requests finish until the drain deadline, then close.
//!
//! Limits enforced here: the header block size (HTTP/1 read buffer; HTTP/2 `max_header_list_size`)
//! and the time a client may take to send its headers (also bounds a TLS handshake). hyper
//! answers an HTTP/1 header block over the limit itself with a bare `431` (no problem body:
//! hyper writes that response before any service runs) and closes the connection.
//!
//! What it must not do: decide anything about a request (that is the pipeline's job) or block
//! the accept loop on one connection's handshake.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, info, warn};

use crate::pipeline::{ConnInfo, Pipeline};

/// hyper's smallest accepted HTTP/1 read buffer.
const MIN_HEADER_BYTES: usize = 8192;

#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The largest request header block accepted (at least 8 KiB for HTTP/1).
    pub max_header_bytes: usize,
    /// How long a client may take to send a request's headers (and to finish a TLS handshake).
    pub header_read_timeout: Duration,
    /// How long in-flight requests may run after shutdown starts.
    pub drain_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_header_bytes: 16 * 1024,
            header_read_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

pub struct Server {
    builder: Arc<auto::Builder<TokioExecutor>>,
    pipeline: Arc<Pipeline>,
    tls: Option<TlsAcceptor>,
    options: ServerOptions,
}

impl Server {
    pub fn new(options: ServerOptions, pipeline: Arc<Pipeline>, tls: Option<TlsAcceptor>) -> Server {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .keep_alive(true)
            // One flat write buffer: a response head and a small body go out in one write
            // without building an iovec array per flush (bodies are copied into the buffer).
            .writev(false)
            .max_buf_size(options.max_header_bytes.max(MIN_HEADER_BYTES))
            .header_read_timeout(options.header_read_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(options.max_header_bytes).unwrap_or(u32::MAX));
        Server { builder: Arc::new(builder), pipeline, tls, options }
    }

    /// Accepts connections until `shutdown` fires, then drains them (up to the drain timeout).
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        let graceful = GracefulShutdown::new();
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
            // Shared by the connection's requests: one reference count per request, not a copy.
            let conn = Arc::new(ConnInfo::new(peer, self.tls.is_some()));
            let pipeline = Arc::clone(&self.pipeline);
            let service = service_fn(move |request: Request<Incoming>| {
                let pipeline = Arc::clone(&pipeline);
                let conn = Arc::clone(&conn);
                let span = debug_span!("request", http.method = %request.method());
                async move { Ok::<_, Infallible>(pipeline.handle(request, conn).await) }.instrument(span)
            });
            let builder = Arc::clone(&self.builder);
            let watcher = graceful.watcher();
            match &self.tls {
                None => {
                    tokio::spawn(async move {
                        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        if let Err(e) = watcher.watch(connection).await {
                            debug!(client.addr = %peer, error = %e, "connection ended with an error");
                        }
                    });
                }
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    let handshake_timeout = self.options.header_read_timeout;
                    tokio::spawn(async move {
                        let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                debug!(client.addr = %peer, error = %e, "tls handshake failed");
                                return;
                            }
                            Err(_) => {
                                debug!(client.addr = %peer, "tls handshake timed out");
                                return;
                            }
                        };
                        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        if let Err(e) = watcher.watch(connection).await {
                            debug!(client.addr = %peer, error = %e, "connection ended with an error");
                        }
                    });
                }
            }
        }
        drop(listener);
        let open = graceful.count();
        info!(connections = open, drain_timeout = ?self.options.drain_timeout, "stopped accepting; draining");
        tokio::select! {
            () = graceful.shutdown() => info!("drained"),
            () = tokio::time::sleep(self.options.drain_timeout) => {
                warn!("drain deadline passed; closing the remaining connections");
            }
        }
    }
}

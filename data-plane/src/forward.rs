//! Forwarding to upstreams: HTTP/1.1 requests go over a small per-endpoint stack of idle
//! connections ([`IdlePool`], kept in the endpoint state); HTTP/2 upstreams (prior knowledge, or
//! ALPN `h2` over TLS) and protocol switches use hyper-util's pooled client, built once and kept
//! across config versions (idle HTTP/1.1 connections are bounded per endpoint and closed after
//! 90 s unused); the attempt loop (endpoint choice, passive health, retries, deadlines); the
//! request body limit; hop-by-hop header removal; the `X-Forwarded-*`/`Forwarded` headers; and
//! the byte tunnel of an accepted `Upgrade`.
//!
//! Upstream TLS: an upstream with `tls` enabled connects with rustls using the [`TlsSettings`]
//! compiled with the snapshot (no file is read here). Its HTTP/1.1 connections go through the
//! same per-endpoint pool (so TLS connections are reused, one handshake per connection); its
//! HTTP/2 and protocol-switch requests through a client of its own whose connector carries the
//! settings ([`TlsClients`], in the upstream state). The connect timeout covers the TCP connect
//! and the handshake. A failed handshake or certificate check is 502 `upstream_tls_failed`, with
//! the reason in a warning log line. Plain upstreams take exactly the path they took before.
//!
//! Retries happen only when nothing reached the upstream: an idempotent method (GET, HEAD,
//! OPTIONS, PUT, DELETE), no request body, a *connect* (or TLS handshake) failure, and another
//! endpoint to try; at most two. Connect refused/unreachable is 502, a connect or request
//! deadline is 504.
//!
//! What it must not do: buffer bodies (both directions stream), forward hop-by-hop headers,
//! leak an upstream error to the client (errors become a [`Denial`]; the detail goes to the log),
//! or connect to a TLS upstream without verifying its certificate.

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use portcullis_shared::http_client::HttpsStream;
use portcullis_shared::model::Upstream;
use smallvec::SmallVec;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::denial::{self, Denial, Reason};
use crate::upstream::{ConnectTimeouts, Endpoint, TlsSettings, UpstreamState};

/// At most this many retries after the first attempt.
pub const MAX_RETRIES: usize = 2;

// ------------------------------------------------------------------ request body

/// Why the request body stopped.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("reading the request body: {0}")]
    Client(#[source] hyper::Error),
}

/// The client's request body on its way upstream, streamed, with a byte limit: the frame that
/// crosses it ends the body with [`BodyError::TooLarge`].
#[derive(Debug)]
pub struct RequestBody {
    inner: Option<Incoming>,
    limit: u64,
    seen: u64,
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: u64) -> RequestBody {
        RequestBody { inner: Some(inner), limit, seen: 0 }
    }

    /// No body (used for retries, which only happen for requests without one).
    pub fn empty() -> RequestBody {
        RequestBody { inner: None, limit: 0, seen: 0 }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        match ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.len() as u64);
                    if this.seen > this.limit {
                        this.inner = None;
                        return Poll::Ready(Some(Err(BodyError::TooLarge { limit: this.limit })));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.inner = None;
                Poll::Ready(Some(Err(BodyError::Client(e))))
            }
            None => {
                this.inner = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

// ------------------------------------------------------------------ connector

/// Why a connection to an endpoint could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    TimedOut(Duration),
    #[error("connect failed: {0}")]
    Failed(#[source] Box<dyn StdError + Send + Sync>),
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] std::io::Error),
    #[error("no valid TLS server name for {0}")]
    ServerName(String),
}

/// `HttpConnector` with a per-endpoint connect timeout (an upstream's `connect_timeout`),
/// looked up once per new connection.
#[derive(Clone, Debug)]
pub struct Connector {
    http: HttpConnector,
    timeouts: Arc<ConnectTimeouts>,
}

impl Connector {
    pub fn new(timeouts: Arc<ConnectTimeouts>) -> Connector {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        http.set_connect_timeout(None); // ours, per endpoint, below
        Connector { http, timeouts }
    }
}

type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, ConnectError>> + Send>>;

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.http, cx).map_err(|e| ConnectError::Failed(e.into()))
    }

    fn call(&mut self, uri: Uri) -> Connecting {
        let timeout = self.timeouts.get(uri.authority().map_or("", |a| a.as_str()));
        let connecting = tower_service::Service::<Uri>::call(&mut self.http, uri);
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(Ok(io)) => Ok(io),
                Ok(Err(e)) => Err(ConnectError::Failed(e.into())),
                Err(_) => Err(ConnectError::TimedOut(timeout)),
            }
        })
    }
}

/// The connector of a TLS upstream's own legacy clients: [`Connector`]'s TCP connect, then the
/// rustls handshake with the upstream's settings, all within the endpoint's connect timeout.
#[derive(Clone, Debug)]
pub struct UpstreamTlsConnector {
    http: HttpConnector,
    timeouts: Arc<ConnectTimeouts>,
    tls: Arc<TlsSettings>,
}

type TlsConnecting = Pin<Box<dyn Future<Output = Result<TokioIo<HttpsStream>, ConnectError>> + Send>>;

impl tower_service::Service<Uri> for UpstreamTlsConnector {
    type Response = TokioIo<HttpsStream>;
    type Error = ConnectError;
    type Future = TlsConnecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.http, cx).map_err(|e| ConnectError::Failed(e.into()))
    }

    fn call(&mut self, uri: Uri) -> TlsConnecting {
        let authority = uri.authority().cloned();
        let timeout = self.timeouts.get(authority.as_ref().map_or("", |a| a.as_str()));
        let name = authority.as_ref().and_then(|a| self.tls.server_name_for(a));
        let connecting = tower_service::Service::<Uri>::call(&mut self.http, uri);
        let tls = Arc::clone(&self.tls);
        Box::pin(async move {
            let Some(name) = name else {
                return Err(ConnectError::ServerName(authority.map(|a| a.to_string()).unwrap_or_default()));
            };
            let handshake = async {
                let tcp = connecting.await.map_err(|e| ConnectError::Failed(e.into()))?.into_inner();
                tls.connector.connect(name, tcp).await.map_err(ConnectError::Tls)
            };
            match tokio::time::timeout(timeout, handshake).await {
                Ok(Ok(stream)) => Ok(TokioIo::new(HttpsStream::from(stream))),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(ConnectError::TimedOut(timeout)),
            }
        })
    }
}

/// A TLS upstream's HTTP/1.1 (protocol switches) and HTTP/2 clients.
#[derive(Clone, Debug)]
pub struct TlsClients {
    h1: Client<UpstreamTlsConnector, RequestBody>,
    h2: Client<UpstreamTlsConnector, RequestBody>,
}

// ------------------------------------------------------------------ HTTP/1.1 pool

/// At most this many idle HTTP/1.1 connections are kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 1024;
/// An idle HTTP/1.1 connection unused this long is closed (when the pool is next touched).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

type H1Sender = http1::SendRequest<RequestBody>;

/// Idle HTTP/1.1 connections to one endpoint with when they went idle, most recently used at
/// the back (taken first), the oldest at the front (closed once idle too long). The lock is held
/// only to push or pop; each connection is driven by its own task.
#[derive(Default)]
pub struct IdlePool {
    idle: Mutex<VecDeque<(H1Sender, std::time::Instant)>>,
}

impl fmt::Debug for IdlePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdlePool").finish_non_exhaustive()
    }
}

impl IdlePool {
    fn take(&self) -> Option<H1Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((sender, _)) = idle.pop_back() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn put(&self, sender: H1Sender) {
        if sender.is_closed() {
            return;
        }
        let now = std::time::Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while idle.front().is_some_and(|(s, since)| s.is_closed() || now.duration_since(*since) >= IDLE_TIMEOUT) {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE_PER_ENDPOINT {
            idle.push_back((sender, now));
        }
    }
}

/// An upstream response body; a pooled HTTP/1.1 connection goes back to its pool once the body
/// has been read to its end (a body dropped early closes the connection).
pub struct UpstreamBody {
    inner: Incoming,
    give_back: Option<(H1Sender, Arc<IdlePool>)>,
}

impl fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamBody").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl UpstreamBody {
    fn give_back(&mut self) {
        if let Some((sender, pool)) = self.give_back.take() {
            pool.put(sender);
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if self.give_back.is_some() && self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            None => this.give_back(),
            Some(Ok(_)) if this.inner.is_end_stream() => this.give_back(),
            Some(Ok(_)) => {}
            Some(Err(_)) => this.give_back = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a request sent through the HTTP/1.1 pool or the legacy client failed.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error(transparent)]
    Connect(ConnectError),
    #[error("upstream handshake: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("upstream request: {0}")]
    Request(#[source] hyper::Error),
    #[error(transparent)]
    Legacy(hyper_util::client::legacy::Error),
}

/// A new HTTP/1.1 connection to `endpoint`, over TLS when `tls` is set, its task spawned. The
/// timeout covers the TCP connect and the TLS handshake.
async fn connect_h1(endpoint: &Endpoint, timeout: Duration, tls: Option<&TlsSettings>) -> Result<H1Sender, SendError> {
    let authority = &endpoint.authority;
    let host = authority.host();
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let default_port = if tls.is_some() { 443 } else { 80 };
    let port = authority.port_u16().unwrap_or(default_port);
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = match tokio::time::timeout_at(deadline, TcpStream::connect((host, port))).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(SendError::Connect(ConnectError::Failed(e.into()))),
        Err(_) => return Err(SendError::Connect(ConnectError::TimedOut(timeout))),
    };
    let _ = stream.set_nodelay(true);
    let Some(tls) = tls else { return handshake_h1(TokioIo::new(stream)).await };
    let Some(name) = endpoint.server_name.clone() else {
        return Err(SendError::Connect(ConnectError::ServerName(authority.to_string())));
    };
    let stream = match tokio::time::timeout_at(deadline, tls.connector.connect(name, stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(SendError::Connect(ConnectError::Tls(e))),
        Err(_) => return Err(SendError::Connect(ConnectError::TimedOut(timeout))),
    };
    handshake_h1(TokioIo::new(stream)).await
}

/// The HTTP/1.1 handshake on a new connection; its task is spawned.
async fn handshake_h1<I>(io: I) -> Result<H1Sender, SendError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    // One flat write buffer, as on the server side: a request head (and a small body) go out in
    // one write without building an iovec array per flush.
    let (sender, connection) = http1::Builder::new().writev(false).handshake(io).await.map_err(SendError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// Sends `request` on an idle connection to the endpoint, or a new one. A request an idle
/// connection could not take (it was closing) goes on another one; it never reached the
/// upstream.
async fn send_h1(
    endpoint: &Endpoint,
    connect_timeout: Duration,
    tls: Option<&TlsSettings>,
    mut request: Request<RequestBody>,
) -> Result<Response<UpstreamBody>, SendError> {
    let pool = &endpoint.idle;
    loop {
        let (mut sender, fresh) = match pool.take() {
            Some(sender) => (sender, false),
            // Boxed: connecting (TCP, TLS handshake, HTTP/1.1 handshake) is rare and its future
            // large; inline, every pooled request's future would carry and copy it.
            None => (Box::pin(connect_h1(endpoint, connect_timeout, tls)).await?, true),
        };
        if let Err(e) = sender.ready().await {
            if fresh {
                return Err(SendError::Request(e));
            }
            continue;
        }
        match sender.try_send_request(request).await {
            Ok(response) => {
                let pool = Arc::clone(pool);
                return Ok(response.map(|inner| UpstreamBody { inner, give_back: Some((sender, pool)) }));
            }
            Err(mut e) => match e.take_message() {
                Some(again) if !fresh => request = again,
                _ => return Err(SendError::Request(e.into_error())),
            },
        }
    }
}

// ------------------------------------------------------------------ client

/// What the request looks like once the pipeline is done with it.
#[derive(Debug)]
pub struct Outgoing {
    pub method: Method,
    /// The normalized, rewritten path with the original query.
    pub path_and_query: PathAndQuery,
    pub headers: HeaderMap,
    pub body: RequestBody,
}

/// The legacy clients of plain upstreams: one for protocol switches (HTTP/1.1), one for HTTP/2
/// prior knowledge. TLS upstreams get their own ([`TlsClients`]).
#[derive(Clone, Debug)]
pub struct Forwarder {
    h1: Client<Connector, RequestBody>,
    h2: Client<Connector, RequestBody>,
    timeouts: Arc<ConnectTimeouts>,
}

/// How every legacy client is set up.
fn client_builder() -> hyper_util::client::legacy::Builder {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .set_host(false); // the pipeline sets Host to the client's
    builder
}

impl Forwarder {
    pub fn new(timeouts: Arc<ConnectTimeouts>) -> Forwarder {
        let connector = Connector::new(Arc::clone(&timeouts));
        let mut builder = client_builder();
        let h1 = builder.build(connector.clone());
        builder.http2_only(true);
        let h2 = builder.build(connector);
        Forwarder { h1, h2, timeouts }
    }

    /// The legacy clients of a TLS upstream, speaking TLS with `tls`.
    fn tls_clients(&self, tls: &Arc<TlsSettings>) -> TlsClients {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        http.set_connect_timeout(None); // ours, per endpoint, over TCP and TLS
        http.enforce_http(false); // the URIs say https
        let connector = UpstreamTlsConnector { http, timeouts: Arc::clone(&self.timeouts), tls: Arc::clone(tls) };
        let mut builder = client_builder();
        let h1 = builder.build(connector.clone());
        builder.http2_only(true);
        let h2 = builder.build(connector);
        TlsClients { h1, h2 }
    }

    /// Sends `out` to one of `upstream`'s endpoints, retrying on another endpoint only when a
    /// connect failed for a retryable request, and gives up at `deadline`.
    pub async fn send(
        &self,
        upstream: &Upstream,
        state: &UpstreamState,
        deadline: tokio::time::Instant,
        out: Outgoing,
    ) -> Result<Response<UpstreamBody>, Denial> {
        let Outgoing { method, path_and_query, mut headers, body } = out;
        let retryable = is_idempotent(&method) && body.is_end_stream() && state.endpoints.len() > 1;
        // Protocol switches go through the legacy client, which hands over the upgraded I/O.
        let pooled = !upstream.http2 && !headers.contains_key(header::UPGRADE);
        let (client, version) = if upstream.http2 { (&self.h2, Version::HTTP_2) } else { (&self.h1, Version::HTTP_11) };
        let tls = state.tls.as_ref();
        let tls_client = match tls {
            Some(tls) if !pooled => {
                let clients = state.tls_clients.get_or_init(|| self.tls_clients(tls));
                Some(if upstream.http2 { &clients.h2 } else { &clients.h1 })
            }
            _ => None,
        };
        let mut body = Some(body);
        let mut tried: SmallVec<[usize; MAX_RETRIES + 1]> = SmallVec::new();
        let mut outcome = Denial::BadGateway(denial::BadGateway::ConnectFailed);
        for attempt in 0..=MAX_RETRIES {
            let Some(i) = state.pick(upstream.load_balancing, &tried) else { break };
            tried.push(i);
            let last = !retryable || attempt == MAX_RETRIES || tried.len() == state.endpoints.len();
            let endpoint = &state.endpoints[i];
            let uri = if pooled {
                Uri::from(path_and_query.clone())
            } else {
                let mut parts = http::uri::Parts::default();
                parts.scheme = Some(if tls.is_some() { Scheme::HTTPS } else { Scheme::HTTP });
                parts.authority = Some(endpoint.authority.clone());
                parts.path_and_query = Some(path_and_query.clone());
                let Ok(uri) = Uri::from_parts(parts) else { break };
                uri
            };
            let _in_flight = state.start(i);
            // The request and the attempt are built where they are awaited: a value bound to a
            // local first keeps its own slot in this (larger) future, next to the copy in use.
            let sent = tokio::time::timeout_at(deadline, async {
                let mut request = Request::new(body.take().unwrap_or_else(RequestBody::empty));
                *request.method_mut() = method.clone();
                *request.uri_mut() = uri;
                *request.version_mut() = version;
                *request.headers_mut() = if last { std::mem::take(&mut headers) } else { headers.clone() };
                if pooled {
                    send_h1(endpoint, upstream.connect_timeout, tls.map(|t| &**t), request).await
                } else {
                    let sent = match tls_client {
                        Some(client) => client.request(request).await,
                        None => client.request(request).await,
                    };
                    match sent {
                        Ok(response) => Ok(response.map(|inner| UpstreamBody { inner, give_back: None })),
                        Err(e) => Err(SendError::Legacy(e)),
                    }
                }
            })
            .await;
            let result = match sent {
                Err(_) => {
                    debug!(upstream.name = %state.name, upstream.endpoint = %endpoint.authority, "upstream request timed out");
                    state.metrics.record_error(Reason::UpstreamTimeout);
                    return Err(Denial::GatewayTimeout(denial::Timeout::Request));
                }
                Ok(result) => result,
            };
            let error = match result {
                Ok(response) => {
                    state.report_success(i);
                    return Ok(response);
                }
                Err(e) => e,
            };
            let failure = classify(&error);
            debug!(
                upstream.name = %state.name,
                upstream.endpoint = %endpoint.authority,
                attempt,
                error = %ErrorChain(&error),
                "upstream attempt failed"
            );
            let denial = match failure {
                Failure::BodyTooLarge => return Err(Denial::PayloadTooLarge),
                // The client went away mid-body; not the endpoint's fault.
                Failure::ClientBody => return Err(Denial::BadGateway(denial::BadGateway::Reset)),
                Failure::ConnectTimeout => Denial::GatewayTimeout(denial::Timeout::Connect),
                Failure::Connect => Denial::BadGateway(denial::BadGateway::ConnectFailed),
                Failure::Tls => {
                    warn!(
                        upstream.name = %state.name,
                        upstream.endpoint = %endpoint.authority,
                        error = %ErrorChain(&error),
                        "upstream TLS handshake failed"
                    );
                    Denial::BadGateway(denial::BadGateway::TlsFailed)
                }
                Failure::Reset => Denial::BadGateway(denial::BadGateway::Reset),
            };
            state.metrics.record_error(denial.reason_code());
            if state.report_failure(i, upstream) {
                warn!(
                    upstream.name = %state.name,
                    upstream.endpoint = %endpoint.authority,
                    ejection_time = ?upstream.health.ejection_time,
                    "endpoint ejected after consecutive failures"
                );
            }
            if !matches!(failure, Failure::Connect | Failure::ConnectTimeout | Failure::Tls) || last {
                return Err(denial);
            }
            outcome = denial;
        }
        Err(outcome)
    }
}

/// GET, HEAD, OPTIONS, PUT, DELETE: safe to send twice when the first never arrived.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    BodyTooLarge,
    ClientBody,
    Connect,
    ConnectTimeout,
    /// The TLS handshake or the certificate check failed.
    Tls,
    Reset,
}

fn classify(e: &SendError) -> Failure {
    let mut source: Option<&(dyn StdError + 'static)> = match e {
        SendError::Connect(ConnectError::TimedOut(_)) => return Failure::ConnectTimeout,
        SendError::Connect(ConnectError::Tls(_) | ConnectError::ServerName(_)) => return Failure::Tls,
        SendError::Connect(_) | SendError::Handshake(_) => return Failure::Connect,
        SendError::Request(e) => Some(e),
        SendError::Legacy(e) => e.source(),
    };
    while let Some(s) = source {
        if let Some(b) = s.downcast_ref::<BodyError>() {
            return match b {
                BodyError::TooLarge { .. } => Failure::BodyTooLarge,
                BodyError::Client(_) => Failure::ClientBody,
            };
        }
        match s.downcast_ref::<ConnectError>() {
            Some(ConnectError::TimedOut(_)) => return Failure::ConnectTimeout,
            Some(ConnectError::Tls(_) | ConnectError::ServerName(_)) => return Failure::Tls,
            _ => {}
        }
        source = s.source();
    }
    if matches!(e, SendError::Legacy(e) if e.is_connect()) { Failure::Connect } else { Failure::Reset }
}

/// Displays an error with its sources, for logs.
pub struct ErrorChain<'a>(pub &'a (dyn StdError + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

// ------------------------------------------------------------------ headers

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Whether `headers` ask to switch protocols (`Connection: upgrade` + `Upgrade`).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1): `Connection` and every header it names,
/// `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`, and `Upgrade` unless
/// `keep_upgrade` (a protocol switch being forwarded, which keeps `Connection: upgrade`).
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One scan of the few names finds which are there: most messages carry none, and most
    // upstream responses only `Connection: keep-alive`; a hashed removal per absent name costs
    // more than the scan.
    let present = headers.keys().fold(0, |found, name| found | hop_by_hop_bit(name));
    if present == 0 && !keep_upgrade {
        return;
    }
    if present & HOP_CONNECTION != 0
        && let header::Entry::Occupied(entry) = headers.entry(header::CONNECTION)
    {
        let (_, values) = entry.remove_entry_mult();
        let values: SmallVec<[HeaderValue; 2]> = values.collect();
        for token in values.iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')) {
            let token = token.trim();
            if token.is_empty() || (keep_upgrade && token.eq_ignore_ascii_case("upgrade")) {
                continue;
            }
            // Tokens such as `keep-alive` or `close` usually name no header of the message:
            // look among the names present instead of parsing and hashing the token.
            let named = headers.keys().find(|name| name.as_str().eq_ignore_ascii_case(token)).cloned();
            if let Some(name) = named {
                headers.remove(name);
            }
        }
    }
    for (bit, name) in [
        (HOP_KEEP_ALIVE, &KEEP_ALIVE),
        (HOP_PROXY_CONNECTION, &PROXY_CONNECTION),
        (HOP_TE, &header::TE),
        (HOP_TRAILER, &header::TRAILER),
        (HOP_TRANSFER_ENCODING, &header::TRANSFER_ENCODING),
    ] {
        if present & bit != 0 {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present & HOP_UPGRADE != 0 {
        headers.remove(header::UPGRADE);
    }
}

const HOP_CONNECTION: u8 = 1;
const HOP_KEEP_ALIVE: u8 = 1 << 1;
const HOP_PROXY_CONNECTION: u8 = 1 << 2;
const HOP_TE: u8 = 1 << 3;
const HOP_TRAILER: u8 = 1 << 4;
const HOP_TRANSFER_ENCODING: u8 = 1 << 5;
const HOP_UPGRADE: u8 = 1 << 6;

/// The bit of `name` if it is one of the hop-by-hop headers [`remove_hop_by_hop`] always
/// handles (the ones `Connection` names can only be there with `Connection`), else 0.
fn hop_by_hop_bit(name: &HeaderName) -> u8 {
    // One match on the (lowercase) name: cheaper than comparing against seven `HeaderName`s.
    match name.as_str() {
        "connection" => HOP_CONNECTION,
        "keep-alive" => HOP_KEEP_ALIVE,
        "proxy-connection" => HOP_PROXY_CONNECTION,
        "te" => HOP_TE,
        "trailer" => HOP_TRAILER,
        "transfer-encoding" => HOP_TRANSFER_ENCODING,
        "upgrade" => HOP_UPGRADE,
        _ => 0,
    }
}

/// What the proxy knows about where a request came from.
#[derive(Debug)]
pub struct Origin<'a> {
    /// The client as resolved through trusted proxies.
    pub client: IpAddr,
    /// The socket peer.
    pub peer: IpAddr,
    /// `for=<peer>;proto=<proto>` ([`forwarded_peer`]), built once per connection.
    pub peer_element: &'a str,
    pub peer_trusted: bool,
    /// The `X-Forwarded-For` to send (the trusted chain plus the peer, or just the peer).
    pub xff: &'a HeaderValue,
    pub tls: bool,
    /// The host the client asked for, port included.
    pub host: Option<&'a HeaderValue>,
}

/// Sets `X-Forwarded-For`, `-Proto`, `-Host`, `Forwarded` and `Host`. From an untrusted peer
/// every incoming forwarding header is replaced; from a trusted one `X-Forwarded-Proto`/`-Host`
/// are kept and our `Forwarded` element is appended.
pub fn set_forwarding_headers(headers: &mut HeaderMap, origin: &Origin<'_>) {
    let proto = if origin.tls { "https" } else { "http" };
    let host = origin.host.and_then(|h| h.to_str().ok());
    headers.insert(&X_FORWARDED_FOR, origin.xff.clone());
    if !origin.peer_trusted || !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if let Some(h) = origin.host {
        if !origin.peer_trusted || !headers.contains_key(&X_FORWARDED_HOST) {
            headers.insert(&X_FORWARDED_HOST, h.clone());
        }
        match headers.entry(header::HOST) {
            // Usually the request's own `Host`: nothing to replace.
            header::Entry::Occupied(e) if e.iter().eq([h]) => {}
            header::Entry::Occupied(mut e) => {
                e.insert(h.clone());
            }
            header::Entry::Vacant(e) => {
                e.insert(h.clone());
            }
        }
    }
    match headers.entry(header::FORWARDED) {
        header::Entry::Occupied(mut e) if origin.peer_trusted => {
            let mut chain = String::with_capacity(128);
            for v in e.iter().filter_map(|v| v.to_str().ok()) {
                chain.push_str(v);
                chain.push_str(", ");
            }
            // Appended to a trusted chain, the element names the peer (the node that connected
            // to us, RFC 7239 §5.2).
            chain.push_str(origin.peer_element);
            forwarded_host(&mut chain, host);
            match HeaderValue::try_from(chain) {
                Ok(v) => {
                    e.insert(v);
                }
                Err(_) => {
                    e.remove();
                }
            }
        }
        entry => {
            // As the only element, it names the resolved client.
            let mut element = SmallVec::<[u8; 128]>::new();
            if origin.client == origin.peer {
                element.extend_from_slice(origin.peer_element.as_bytes());
            } else {
                let mut s = String::new();
                forwarded_for(&mut s, origin.client, proto);
                element.extend_from_slice(s.as_bytes());
            }
            if let Some(host) = host {
                push_forwarded_host(&mut element, host);
            }
            match (entry, HeaderValue::from_bytes(&element)) {
                (header::Entry::Occupied(mut e), Ok(v)) => {
                    e.insert(v);
                }
                (header::Entry::Occupied(e), Err(_)) => {
                    e.remove();
                }
                (header::Entry::Vacant(e), Ok(v)) => {
                    e.insert(v);
                }
                (header::Entry::Vacant(_), Err(_)) => {}
            }
        }
    }
}

/// `for=<peer>;proto=<proto>` for a connection from `peer`: the start of the `Forwarded`
/// element of each of its requests, formatted once per connection.
pub fn forwarded_peer(peer: IpAddr, tls: bool) -> String {
    let mut out = String::with_capacity(64);
    forwarded_for(&mut out, peer, if tls { "https" } else { "http" });
    out
}

/// Appends one RFC 7239 element: `for=…;proto=…;host=…`, IPv6 quoted and bracketed, a host
/// that is not a token (a port's `:`) quoted.
pub fn forwarded_element(out: &mut String, for_ip: IpAddr, proto: &str, host: Option<&str>) {
    forwarded_for(out, for_ip, proto);
    forwarded_host(out, host);
}

fn forwarded_for(out: &mut String, for_ip: IpAddr, proto: &str) {
    use std::fmt::Write as _;
    out.push_str("for=");
    let _ = match for_ip {
        IpAddr::V4(ip) => write!(out, "{ip}"),
        IpAddr::V6(ip) => write!(out, "\"[{ip}]\""),
    };
    out.push_str(";proto=");
    out.push_str(proto);
}

fn forwarded_host(out: &mut String, host: Option<&str>) {
    let Some(host) = host else { return };
    let mut bytes = SmallVec::<[u8; 128]>::new();
    push_forwarded_host(&mut bytes, host);
    // Only ASCII went in (a host is a visible-ASCII header value).
    out.push_str(std::str::from_utf8(&bytes).unwrap_or_default());
}

/// `;host=<host>`, quoted (with `"` and `\` escaped) unless the host is a token.
fn push_forwarded_host(out: &mut SmallVec<[u8; 128]>, host: &str) {
    out.extend_from_slice(b";host=");
    if !host.is_empty() && host.bytes().all(is_tchar) {
        out.extend_from_slice(host.as_bytes());
        return;
    }
    out.push(b'"');
    // A port's `:` is the usual reason to quote; a `"` or `\` to escape hardly ever occurs.
    let mut rest = host.as_bytes();
    while let Some(i) = rest.iter().position(|&b| b == b'"' || b == b'\\') {
        out.extend_from_slice(&rest[..i]);
        out.push(b'\\');
        out.push(rest[i]);
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

fn is_tchar(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~')
}

// ------------------------------------------------------------------ upgrades

/// Once both sides have switched protocols, copies bytes both ways until either closes.
pub fn tunnel(client: OnUpgrade, upstream: OnUpgrade, route: Arc<str>) {
    tokio::spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((client, upstream)) => {
                let mut client = TokioIo::new(client);
                let mut upstream = TokioIo::new(upstream);
                match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    Ok((up, down)) => {
                        debug!(route.name = %route, bytes.up = up, bytes.down = down, "upgraded connection closed")
                    }
                    Err(e) => debug!(route.name = %route, error = %e, "upgraded connection failed"),
                }
            }
            Err(e) => debug!(route.name = %route, error = %e, "protocol switch failed"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut v: Vec<String> = h.iter().map(|(k, v)| format!("{k}: {}", v.to_str().unwrap())).collect();
        v.sort();
        v
    }

    fn check_hop(input: &[(&str, &str)], keep_upgrade: bool, expected: &[&str]) {
        let mut h = headers(input);
        remove_hop_by_hop(&mut h, keep_upgrade);
        assert_eq!(names(&h), expected, "{input:?}");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        check_hop(
            &[
                ("connection", "keep-alive, X-Secret"),
                ("connection", "x-other"),
                ("keep-alive", "timeout=5"),
                ("proxy-connection", "keep-alive"),
                ("te", "trailers"),
                ("trailer", "x-t"),
                ("transfer-encoding", "chunked"),
                ("upgrade", "websocket"),
                ("x-secret", "1"),
                ("x-other", "2"),
                ("x-kept", "3"),
                ("accept", "*/*"),
            ],
            false,
            &["accept: */*", "x-kept: 3"],
        );
        check_hop(&[("x-kept", "3")], false, &["x-kept: 3"]);
        for hop in ["keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"] {
            check_hop(&[(hop, "x"), ("x-kept", "3")], false, &["x-kept: 3"]);
        }
        check_hop(&[("connection", " , ,")], false, &[]);
        // an upstream's usual answer: only `Connection: keep-alive`
        check_hop(&[("connection", "keep-alive"), ("content-length", "3")], false, &["content-length: 3"]);
        check_hop(&[("connection", "close, X-Kept-Not")], false, &[]);
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_connection_upgrade_only() {
        check_hop(
            &[("connection", "Upgrade, x-hop"), ("upgrade", "websocket"), ("x-hop", "1"), ("sec-websocket-key", "k")],
            true,
            &["connection: upgrade", "sec-websocket-key: k", "upgrade: websocket"],
        );
        assert!(is_upgrade(&headers(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")])));
        assert!(!is_upgrade(&headers(&[("connection", "keep-alive"), ("upgrade", "websocket")])));
        assert!(!is_upgrade(&headers(&[("connection", "upgrade")])));
    }

    fn check_forwarded(for_ip: &str, proto: &str, host: Option<&str>, expected: &str) {
        let mut out = String::new();
        forwarded_element(&mut out, for_ip.parse().unwrap(), proto, host);
        assert_eq!(out, expected);
    }

    #[test]
    fn forwarded_elements_follow_rfc_7239() {
        check_forwarded("192.0.2.60", "http", Some("example.com"), "for=192.0.2.60;proto=http;host=example.com");
        check_forwarded(
            "2001:db8::1",
            "https",
            Some("example.com"),
            r#"for="[2001:db8::1]";proto=https;host=example.com"#,
        );
        check_forwarded(
            "192.0.2.60",
            "http",
            Some("example.com:8080"),
            r#"for=192.0.2.60;proto=http;host="example.com:8080""#,
        );
        check_forwarded("192.0.2.60", "http", Some("[::1]:80"), r#"for=192.0.2.60;proto=http;host="[::1]:80""#);
        check_forwarded("192.0.2.60", "http", None, "for=192.0.2.60;proto=http");
        check_forwarded("192.0.2.60", "http", Some(r#"a"b\c"#), r#"for=192.0.2.60;proto=http;host="a\"b\\c""#);
        check_forwarded("192.0.2.60", "http", Some(""), r#"for=192.0.2.60;proto=http;host="""#);
        assert_eq!(forwarded_peer("2001:db8::1".parse().unwrap(), true), r#"for="[2001:db8::1]";proto=https"#);
    }

    fn check_origin(trusted: bool, incoming: &[(&str, &str)], expected: &[&str]) {
        let mut h = headers(incoming);
        let host = HeaderValue::from_static("api.example.com");
        let origin = Origin {
            client: "203.0.113.7".parse().unwrap(),
            peer: "10.0.0.2".parse().unwrap(),
            peer_element: &forwarded_peer("10.0.0.2".parse().unwrap(), true),
            peer_trusted: trusted,
            xff: &HeaderValue::from_static("203.0.113.7, 10.0.0.2"),
            tls: true,
            host: Some(&host),
        };
        set_forwarding_headers(&mut h, &origin);
        assert_eq!(names(&h), expected);
    }

    #[test]
    fn forwarding_headers_from_untrusted_and_trusted_peers() {
        let replaced = [
            "forwarded: for=203.0.113.7;proto=https;host=api.example.com",
            "host: api.example.com",
            "x-forwarded-for: 203.0.113.7, 10.0.0.2",
            "x-forwarded-host: api.example.com",
            "x-forwarded-proto: https",
        ];
        let spoofed = [
            ("forwarded", "for=1.1.1.1"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "evil"),
            ("x-forwarded-for", "1.1.1.1"),
        ];
        check_origin(false, &spoofed, &replaced);
        check_origin(false, &[], &replaced);
        check_origin(
            true,
            &spoofed,
            &[
                "forwarded: for=1.1.1.1, for=10.0.0.2;proto=https;host=api.example.com",
                "host: api.example.com",
                "x-forwarded-for: 203.0.113.7, 10.0.0.2",
                "x-forwarded-host: evil",
                "x-forwarded-proto: http",
            ],
        );
        check_origin(true, &[], &replaced);
    }

    #[test]
    fn idempotent_methods() {
        for (m, expected) in [
            (Method::GET, true),
            (Method::HEAD, true),
            (Method::OPTIONS, true),
            (Method::PUT, true),
            (Method::DELETE, true),
            (Method::POST, false),
            (Method::PATCH, false),
        ] {
            assert_eq!(is_idempotent(&m), expected, "{m}");
        }
    }
}

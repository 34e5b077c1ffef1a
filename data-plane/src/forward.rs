//! Forwarding through hyper's clients, for what the proxy's own HTTP/1.1 engine
//! ([`crate::http1`]) does not carry: requests of HTTP/2 clients, requests to HTTP/2 upstreams
//! (prior knowledge, or ALPN `h2` over TLS) and protocol switches of HTTP/2-served routes. The
//! clients (hyper-util's pooled legacy client; idle connections closed after 90 s unused) are
//! built once and kept across config versions. Also here, shared with the HTTP/1 engine: the
//! attempt bookkeeping ([`attempt_failed`]: error metric, passive health, logs), the request
//! body limit, hop-by-hop header removal, the `X-Forwarded-*`/`Forwarded` headers, and the byte
//! tunnel of an upgrade accepted over hyper.
//!
//! Upstream TLS: an upstream with `tls` enabled connects with rustls using the [`TlsSettings`]
//! compiled with the snapshot (no file is read here), through clients of its own whose
//! connector carries the settings ([`TlsClients`], in the upstream state). The connect timeout
//! covers the TCP connect and the handshake. A failed handshake or certificate check is 502
//! `upstream_tls_failed`, with the reason in a warning log line.
//!
//! Retries happen only when nothing reached the upstream: an idempotent method (GET, HEAD,
//! OPTIONS, PUT, DELETE), no request body, a *connect* (or TLS handshake) failure, and another
//! endpoint to try; at most two. Connect refused/unreachable is 502, a connect or request
//! deadline is 504.
//!
//! What it must not do: buffer bodies (both directions stream), forward hop-by-hop headers,
//! leak an upstream error to the client (errors become a [`Denial`]; the detail goes to the log),
//! or connect to a TLS upstream without verifying its certificate.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
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
use crate::upstream::{ConnectTimeouts, TlsSettings, UpstreamState};

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
    #[error("the client stopped sending the request body")]
    ClientAborted,
}

/// A piece of a request body read by the HTTP/1 engine ([`crate::http1`]) and handed to a
/// hyper client. The body is complete only once `End` arrives: a channel closed without it is a
/// client that went away, never a shorter body.
#[derive(Debug)]
pub enum Piece {
    Data(Bytes),
    End,
}

#[derive(Debug)]
enum Source {
    Incoming(Incoming),
    Pieces(tokio::sync::mpsc::Receiver<Piece>),
}

/// The client's request body on its way upstream, streamed, with a byte limit: the frame that
/// crosses it ends the body with [`BodyError::TooLarge`].
#[derive(Debug)]
pub struct RequestBody {
    inner: Option<Source>,
    limit: u64,
    seen: u64,
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: u64) -> RequestBody {
        RequestBody { inner: Some(Source::Incoming(inner)), limit, seen: 0 }
    }

    /// A body whose pieces come through a channel (an HTTP/1 client's body for an HTTP/2
    /// upstream).
    pub fn pieces(rx: tokio::sync::mpsc::Receiver<Piece>, limit: u64) -> RequestBody {
        RequestBody { inner: Some(Source::Pieces(rx)), limit, seen: 0 }
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
        let frame = match this.inner.as_mut() {
            None => return Poll::Ready(None),
            Some(Source::Incoming(inner)) => match ready!(Pin::new(inner).poll_frame(cx)) {
                Some(Ok(frame)) => Some(Ok(frame)),
                Some(Err(e)) => Some(Err(BodyError::Client(e))),
                None => None,
            },
            Some(Source::Pieces(rx)) => match ready!(rx.poll_recv(cx)) {
                Some(Piece::Data(data)) => Some(Ok(Frame::data(data))),
                Some(Piece::End) => None,
                None => Some(Err(BodyError::ClientAborted)),
            },
        };
        match frame {
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
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.inner = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            None => true,
            Some(Source::Incoming(inner)) => inner.is_end_stream(),
            Some(Source::Pieces(_)) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            None => SizeHint::with_exact(0),
            Some(Source::Incoming(inner)) => inner.size_hint(),
            Some(Source::Pieces(_)) => SizeHint::default(),
        }
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

/// An upstream response body as hyper delivers it (HTTP/2 upstreams and protocol switches;
/// HTTP/1.1 upstreams of HTTP/1 clients go through [`crate::http1`]).
pub type UpstreamBody = Incoming;

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
        let tls = state.tls.as_ref();
        let plain = if upstream.http2 { &self.h2 } else { &self.h1 };
        let tls_client = tls.map(|tls| {
            let clients = state.tls_clients.get_or_init(|| self.tls_clients(tls));
            if upstream.http2 { &clients.h2 } else { &clients.h1 }
        });
        let version = if upstream.http2 { Version::HTTP_2 } else { Version::HTTP_11 };
        let mut body = Some(body);
        let mut attempts = Attempts::new(retryable);
        let mut outcome = Denial::BadGateway(denial::BadGateway::ConnectFailed);
        while let Some(Attempt { number: attempt, endpoint: i, last }) = attempts.next(state, upstream) {
            let endpoint = &state.endpoints[i];
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(if tls.is_some() { Scheme::HTTPS } else { Scheme::HTTP });
            parts.authority = Some(endpoint.authority.clone());
            parts.path_and_query = Some(path_and_query.clone());
            let Ok(uri) = Uri::from_parts(parts) else { break };
            let _in_flight = state.start(i);
            let mut request = Request::new(body.take().unwrap_or_else(RequestBody::empty));
            *request.method_mut() = method.clone();
            *request.uri_mut() = uri;
            *request.version_mut() = version;
            *request.headers_mut() = if last { std::mem::take(&mut headers) } else { headers.clone() };
            let sent = async {
                match tls_client {
                    Some(client) => client.request(request).await,
                    None => plain.request(request).await,
                }
            };
            let error = match tokio::time::timeout_at(deadline, sent).await {
                Err(_) => {
                    debug!(upstream.name = %state.name, upstream.endpoint = %endpoint.authority, "upstream request timed out");
                    state.metrics.record_error(Reason::UpstreamTimeout);
                    return Err(Denial::GatewayTimeout(denial::Timeout::Request));
                }
                Ok(Ok(response)) => {
                    state.report_success(i);
                    return Ok(response);
                }
                Ok(Err(e)) => e,
            };
            let failure = classify(&error);
            let denial = attempt_failed(state, upstream, i, attempt, failure, &ErrorChain(&error))?;
            if last {
                return Err(denial);
            }
            outcome = denial;
        }
        Err(outcome)
    }
}

/// The attempts of one request: which endpoint each goes to (never one already tried), and
/// whether it is the last one allowed (`retryable`: another endpoint may be tried after a
/// connect failure). Shared by the HTTP/1 engine and the hyper path.
#[derive(Debug)]
pub struct Attempts {
    tried: SmallVec<[usize; MAX_RETRIES + 1]>,
    retryable: bool,
}

/// One attempt: its number, the endpoint's index, and whether no retry may follow it.
#[derive(Clone, Copy, Debug)]
pub struct Attempt {
    pub number: usize,
    pub endpoint: usize,
    pub last: bool,
}

impl Attempts {
    pub fn new(retryable: bool) -> Attempts {
        Attempts { tried: SmallVec::new(), retryable }
    }

    pub fn next(&mut self, state: &UpstreamState, upstream: &Upstream) -> Option<Attempt> {
        let number = self.tried.len();
        if number > MAX_RETRIES {
            return None;
        }
        let endpoint = state.pick(upstream.load_balancing, &self.tried)?;
        self.tried.push(endpoint);
        let last = !self.retryable || number == MAX_RETRIES || self.tried.len() == state.endpoints.len();
        Some(Attempt { number, endpoint, last })
    }
}

/// Accounts for a failed attempt on endpoint `i` of `state` (log, error metric, passive
/// health) and says what the client gets: `Ok(denial)` when the failure is a connect failure,
/// so another endpoint may be tried; `Err(denial)` when the request must not be retried.
/// Failures of the client's own body do not count against the endpoint.
pub fn attempt_failed(
    state: &UpstreamState,
    upstream: &Upstream,
    i: usize,
    attempt: usize,
    failure: Failure,
    error: &dyn fmt::Display,
) -> Result<Denial, Denial> {
    let endpoint = &state.endpoints[i];
    debug!(
        upstream.name = %state.name,
        upstream.endpoint = %endpoint.authority,
        attempt,
        error = %error,
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
                error = %error,
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
    if matches!(failure, Failure::Connect | Failure::ConnectTimeout | Failure::Tls) { Ok(denial) } else { Err(denial) }
}

/// GET, HEAD, OPTIONS, PUT, DELETE: safe to send twice when the first never arrived.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE)
}

/// How an attempt failed, as far as retries, passive health and the client's status go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    BodyTooLarge,
    ClientBody,
    Connect,
    ConnectTimeout,
    /// The TLS handshake or the certificate check failed.
    Tls,
    Reset,
}

impl Failure {
    /// The failure of a connect (or TLS handshake) attempt.
    pub fn of_connect(e: &ConnectError) -> Failure {
        match e {
            ConnectError::TimedOut(_) => Failure::ConnectTimeout,
            ConnectError::Tls(_) | ConnectError::ServerName(_) => Failure::Tls,
            ConnectError::Failed(_) => Failure::Connect,
        }
    }
}

fn classify(e: &hyper_util::client::legacy::Error) -> Failure {
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(b) = s.downcast_ref::<BodyError>() {
            return match b {
                BodyError::TooLarge { .. } => Failure::BodyTooLarge,
                BodyError::Client(_) | BodyError::ClientAborted => Failure::ClientBody,
            };
        }
        if let Some(c) = s.downcast_ref::<ConnectError>()
            && !matches!(c, ConnectError::Failed(_))
        {
            return Failure::of_connect(c);
        }
        source = s.source();
    }
    if e.is_connect() { Failure::Connect } else { Failure::Reset }
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
    let present = scan(headers);
    remove_hop_by_hop_scanned(headers, present, keep_upgrade);
}

/// [`remove_hop_by_hop`] with the message's [`scan`] done already.
pub fn remove_hop_by_hop_scanned(headers: &mut HeaderMap, present: u16, keep_upgrade: bool) {
    if present & HOP_BY_HOP == 0 && !keep_upgrade {
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

const HOP_CONNECTION: u16 = 1;
const HOP_KEEP_ALIVE: u16 = 1 << 1;
const HOP_PROXY_CONNECTION: u16 = 1 << 2;
const HOP_TE: u16 = 1 << 3;
const HOP_TRAILER: u16 = 1 << 4;
const HOP_TRANSFER_ENCODING: u16 = 1 << 5;
const HOP_UPGRADE: u16 = 1 << 6;
const FWD_FOR: u16 = 1 << 7;
const FWD_PROTO: u16 = 1 << 8;
const FWD_HOST: u16 = 1 << 9;
const FWD_FORWARDED: u16 = 1 << 10;
const FWD_REQUEST_ID: u16 = 1 << 11;
const HOP_BY_HOP: u16 = (1 << 7) - 1;

/// Which of the fields the proxy removes or sets a message carries: one scan of its names,
/// cheaper than a hashed lookup per absent name (most messages carry none of them).
pub fn scan(headers: &HeaderMap) -> u16 {
    headers.keys().fold(0, |found, name| found | special_bit(name))
}

/// The bit of `name` if it is one of the hop-by-hop fields [`remove_hop_by_hop`] always
/// handles (the ones `Connection` names can only be there with `Connection`) or one the proxy
/// sets itself, else 0.
fn special_bit(name: &HeaderName) -> u16 {
    // One match on the (lowercase) name: cheaper than comparing against a dozen `HeaderName`s.
    match name.as_str() {
        "connection" => HOP_CONNECTION,
        "keep-alive" => HOP_KEEP_ALIVE,
        "proxy-connection" => HOP_PROXY_CONNECTION,
        "te" => HOP_TE,
        "trailer" => HOP_TRAILER,
        "transfer-encoding" => HOP_TRANSFER_ENCODING,
        "upgrade" => HOP_UPGRADE,
        "x-forwarded-for" => FWD_FOR,
        "x-forwarded-proto" => FWD_PROTO,
        "x-forwarded-host" => FWD_HOST,
        "forwarded" => FWD_FORWARDED,
        "x-request-id" => FWD_REQUEST_ID,
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

/// The fields the proxy sets on a request it forwards: `X-Forwarded-For`, `-Proto`, `-Host`,
/// `Forwarded` and `X-Request-Id`, computed once ([`forwarding_fields`]) and then either put
/// into a `HeaderMap` ([`ForwardingFields::apply`], hyper's clients) or written straight into
/// an HTTP/1.1 head ([`ForwardingFields::write`], the HTTP/1 engine).
#[derive(Debug)]
pub struct ForwardingFields {
    xff: HeaderValue,
    /// `None`: the trusted peer's own `X-Forwarded-Proto` stays.
    proto: Option<&'static str>,
    /// `None`: none to set (no host, or the trusted peer's own stays).
    host: Option<HeaderValue>,
    /// The whole `Forwarded` value (visible ASCII and what field values may hold).
    forwarded: SmallVec<[u8; 128]>,
    /// `None`: `X-Request-Id` is not the caller's business.
    request_id: Option<HeaderValue>,
}

/// Works out the forwarding fields for `origin` and removes from `headers` the client's
/// copies they replace (`present`: the message's [`scan`]). From an untrusted peer every
/// incoming forwarding field is replaced; from a trusted one `X-Forwarded-Proto`/`-Host` are
/// kept and our `Forwarded` element is appended to its chain. `Host` is set to the host the
/// client asked for (the URI's authority may differ from the `Host` field).
pub fn forwarding_fields(
    headers: &mut HeaderMap,
    present: u16,
    origin: &Origin<'_>,
    request_id: Option<HeaderValue>,
) -> ForwardingFields {
    let proto = if origin.tls { "https" } else { "http" };
    let host = origin.host.and_then(|h| h.to_str().ok());
    if present & FWD_FOR != 0 {
        headers.remove(&X_FORWARDED_FOR);
    }
    if request_id.is_some() && present & FWD_REQUEST_ID != 0 {
        headers.remove(&X_REQUEST_ID);
    }
    let keep_proto = origin.peer_trusted && present & FWD_PROTO != 0;
    let keep_host = origin.peer_trusted && present & FWD_HOST != 0;
    if !origin.peer_trusted {
        for (bit, name) in [(FWD_PROTO, &X_FORWARDED_PROTO), (FWD_HOST, &X_FORWARDED_HOST)] {
            if present & bit != 0 {
                headers.remove(name);
            }
        }
    }
    if let Some(h) = origin.host
        && headers.get(header::HOST) != Some(h)
    {
        headers.insert(header::HOST, h.clone());
    }
    let chain = match present & FWD_FORWARDED {
        0 => None,
        _ => match headers.entry(header::FORWARDED) {
            header::Entry::Occupied(e) => Some(e.remove_entry_mult().1.collect::<SmallVec<[HeaderValue; 2]>>()),
            header::Entry::Vacant(_) => None,
        },
    };
    let mut forwarded = SmallVec::<[u8; 128]>::new();
    match chain {
        Some(chain) if origin.peer_trusted => {
            for v in &chain {
                forwarded.extend_from_slice(v.as_bytes());
                forwarded.extend_from_slice(b", ");
            }
            // Appended to a trusted chain, the element names the peer (the node that connected
            // to us, RFC 7239 §5.2).
            forwarded.extend_from_slice(origin.peer_element.as_bytes());
        }
        _ if origin.client == origin.peer => forwarded.extend_from_slice(origin.peer_element.as_bytes()),
        _ => {
            // As the only element, it names the resolved client.
            let mut s = String::with_capacity(64);
            forwarded_for(&mut s, origin.client, proto);
            forwarded.extend_from_slice(s.as_bytes());
        }
    }
    if let Some(host) = host {
        push_forwarded_host(&mut forwarded, host);
    }
    // Valid by construction: field values (the chain, the host) joined by ", " and ";", and
    // our own formatting of an address; `apply` checks again when it makes a `HeaderValue`.
    ForwardingFields {
        xff: origin.xff.clone(),
        proto: (!keep_proto).then_some(proto),
        host: if keep_host { None } else { origin.host.cloned() },
        forwarded,
        request_id,
    }
}

impl ForwardingFields {
    /// Puts the fields into `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(&X_FORWARDED_FOR, self.xff.clone());
        if let Some(proto) = self.proto {
            headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        if let Some(host) = &self.host {
            headers.insert(&X_FORWARDED_HOST, host.clone());
        }
        if !self.forwarded.is_empty()
            && let Ok(v) = HeaderValue::from_bytes(&self.forwarded)
        {
            headers.insert(header::FORWARDED, v);
        }
        if let Some(id) = &self.request_id {
            headers.insert(&X_REQUEST_ID, id.clone());
        }
    }

    /// Appends the fields as HTTP/1.1 field lines.
    pub fn write(&self, out: &mut Vec<u8>) {
        use crate::http1::wire::push_field;
        push_field(out, b"x-forwarded-for", self.xff.as_bytes());
        if let Some(proto) = self.proto {
            push_field(out, b"x-forwarded-proto", proto.as_bytes());
        }
        if let Some(host) = &self.host {
            push_field(out, b"x-forwarded-host", host.as_bytes());
        }
        if !self.forwarded.is_empty() {
            push_field(out, b"forwarded", &self.forwarded);
        }
        if let Some(id) = &self.request_id {
            push_field(out, b"x-request-id", id.as_bytes());
        }
    }
}

/// Sets `X-Forwarded-For`, `-Proto`, `-Host`, `Forwarded` and `Host` in `headers` (see
/// [`forwarding_fields`]); `X-Request-Id` is left as it is.
pub fn set_forwarding_headers(headers: &mut HeaderMap, origin: &Origin<'_>) {
    let present = scan(headers);
    forwarding_fields(headers, present, origin, None).apply(headers);
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

//! A recording upstream: a hyper 1 HTTP/1 server on a loopback port that keeps every request it
//! receives (method, path and query, headers, body, arrival time) and answers with a small JSON
//! echo — `{"upstream":NAME,"method":..,"path":..,"headers":{..}}` — after an optional delay and
//! with a chosen status. Both knobs can be turned while it runs, so one upstream serves a whole
//! scenario. It is what proxies forward to in the end-to-end suites, and, with recording off, the
//! example upstream of the README's quick start (`portcullis-example-upstream`).
//!
//! With [`UpstreamOptions::tls`] it serves TLS instead (the test certificate of
//! [`crate::tls`]), HTTP/2 when the client negotiates `h2` by ALPN, else HTTP/1.1. It counts the
//! connections it accepted, so tests can see whether a client reused one.
//!
//! What it must not do: interpret requests (every path answers the same way) or block a
//! connection on another one's delay.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How an upstream answers. The delay and status can also be changed later.
#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    /// The `upstream` field of the echo, to tell several upstreams apart.
    pub name: String,
    /// How long each response waits before it is sent.
    pub delay: Duration,
    pub status: StatusCode,
    /// Keep every request (tests) or only count them (a long-running example server).
    pub record: bool,
    /// Serve TLS with this configuration (see [`crate::tls::server_config`]); `None`: plain.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            name: "upstream".into(),
            delay: Duration::ZERO,
            status: StatusCode::OK,
            record: true,
            tls: None,
        }
    }
}

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: Method,
    /// The request target as received: path and query.
    pub uri: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub received_at: Instant,
}

impl RecordedRequest {
    /// The value of header `name` as a string, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Debug)]
struct Shared {
    name: String,
    record: bool,
    delay_micros: AtomicU64,
    status: AtomicU16,
    requests: Mutex<Vec<RecordedRequest>>,
    received: AtomicUsize,
    in_flight: AtomicUsize,
    connections: AtomicUsize,
}

/// A running recording upstream; stops accepting when dropped.
#[derive(Debug)]
pub struct RecordingUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl RecordingUpstream {
    /// A recording upstream on `127.0.0.1:0` answering 200 at once.
    pub async fn start() -> RecordingUpstream {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::bind(any, UpstreamOptions::default()).await.expect("start the recording upstream")
    }

    /// A recording upstream on `127.0.0.1:0` serving TLS with the test certificate (ALPN `h2`
    /// and `http/1.1`), answering 200 at once.
    pub async fn start_tls() -> RecordingUpstream {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let tls = Some(crate::tls::server_config(&[b"h2", b"http/1.1"]));
        Self::bind(any, UpstreamOptions { tls, ..UpstreamOptions::default() }).await.expect("start the TLS upstream")
    }

    /// Binds `addr` and serves until dropped (or [`RecordingUpstream::stop`]).
    pub async fn bind(addr: SocketAddr, options: UpstreamOptions) -> std::io::Result<RecordingUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            name: options.name,
            record: options.record,
            delay_micros: AtomicU64::new(micros(options.delay)),
            status: AtomicU16::new(options.status.as_u16()),
            requests: Mutex::new(Vec::new()),
            received: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
        });
        let stop = CancellationToken::new();
        let tls = options.tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), tls, stop.clone()));
        Ok(RecordingUpstream { addr, shared, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, as an `Upstream`'s endpoint.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    pub fn set_delay(&self, delay: Duration) {
        self.shared.delay_micros.store(micros(delay), Ordering::Relaxed);
    }

    pub fn set_status(&self, status: StatusCode) {
        self.shared.status.store(status.as_u16(), Ordering::Relaxed);
    }

    /// Every request received so far, in arrival order (empty when recording is off).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().expect("requests lock").clone()
    }

    /// The requests whose path and query start with `prefix`.
    pub fn requests_to(&self, prefix: &str) -> Vec<RecordedRequest> {
        self.requests().into_iter().filter(|r| r.uri.starts_with(prefix)).collect()
    }

    /// How many requests arrived (counted with recording off too).
    pub fn request_count(&self) -> usize {
        self.shared.received.load(Ordering::Relaxed)
    }

    /// TCP connections accepted so far (TLS ones whose handshake failed included).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Requests received and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// Forgets the requests recorded so far.
    pub fn clear(&self) {
        self.shared.requests.lock().expect("requests lock").clear();
    }

    /// Stops accepting and closes open connections.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Resolves once [`RecordingUpstream::stop`] was called (or the upstream dropped elsewhere).
    pub async fn stopped(&self) {
        self.stop.cancelled().await;
    }
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of descriptors and the like: back off rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let (shared, stop, tls) = (Arc::clone(&shared), stop.clone(), tls.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request| respond(request, Arc::clone(&shared)));
            let Some(tls) = tls else {
                let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    () = stop.cancelled() => {}
                    _ = connection => {}
                }
                return;
            };
            // A client that does not trust the certificate aborts here.
            let Ok(stream) = tls.accept(stream).await else { return };
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let io = TokioIo::new(stream);
            tokio::select! {
                () = stop.cancelled() => {}
                _ = async {
                    if h2 {
                        let _ = http2::Builder::new(TokioExecutor::new()).serve_connection(io, service).await;
                    } else {
                        let _ = http1::Builder::new().serve_connection(io, service).await;
                    }
                } => {}
            }
        });
    }
}

async fn respond(request: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<Full<Bytes>>, Infallible> {
    shared.received.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight::enter(&shared);
    let received_at = Instant::now();
    let (parts, body) = request.into_parts();
    let uri = parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_owned(), ToString::to_string);
    // A body the client abandons half-way is recorded as what arrived: nothing is answered then.
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let echo = echo(&shared.name, &parts.method, &uri, &parts.headers);
    if shared.record {
        let recorded = RecordedRequest {
            method: parts.method,
            uri,
            version: parts.version,
            headers: parts.headers,
            body,
            received_at,
        };
        shared.requests.lock().expect("requests lock").push(recorded);
    }
    let delay = Duration::from_micros(shared.delay_micros.load(Ordering::Relaxed));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut response = Response::new(Full::new(Bytes::from(echo)));
    *response.status_mut() = StatusCode::from_u16(shared.status.load(Ordering::Relaxed)).unwrap_or(StatusCode::OK);
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// Counts a request as in flight until it is answered or its client goes away.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> InFlight<'a> {
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `{"upstream":..,"method":..,"path":..,"headers":{name: value}}`; repeated headers are joined
/// with `, `, values that are not UTF-8 are shown lossily.
fn echo(name: &str, method: &Method, uri: &str, headers: &HeaderMap) -> String {
    let mut map = serde_json::Map::new();
    for key in headers.keys() {
        let joined = headers
            .get_all(key)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        map.insert(key.as_str().to_owned(), serde_json::Value::String(joined));
    }
    let echo = serde_json::json!({ "upstream": name, "method": method.as_str(), "path": uri, "headers": map });
    let mut out = echo.to_string();
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn raw(addr: SocketAddr, request: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await.unwrap().unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn records_requests_and_echoes_them() {
        let up = RecordingUpstream::start().await;
        let res = raw(
            up.addr(),
            "POST /a/b?x=1 HTTP/1.1\r\nHost: h\r\nX-One: 1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        )
        .await;
        assert!(res.starts_with("HTTP/1.1 200 OK\r\n"), "{res}");
        let body: serde_json::Value = serde_json::from_str(res.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["upstream"], "upstream");
        assert_eq!(body["method"], "POST");
        assert_eq!(body["path"], "/a/b?x=1");
        assert_eq!(body["headers"]["x-one"], "1");

        let seen = up.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].method, Method::POST);
        assert_eq!(seen[0].uri, "/a/b?x=1");
        assert_eq!(seen[0].header("x-one"), Some("1"));
        assert_eq!(seen[0].body, "abc");
        assert_eq!(up.request_count(), 1);
        assert_eq!(up.in_flight(), 0);
    }

    #[tokio::test]
    async fn status_and_delay_can_be_changed() {
        let up = RecordingUpstream::start().await;
        up.set_status(StatusCode::SERVICE_UNAVAILABLE);
        up.set_delay(Duration::from_millis(50));
        let started = Instant::now();
        let res = raw(up.addr(), "GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").await;
        assert!(res.starts_with("HTTP/1.1 503"), "{res}");
        assert!(started.elapsed() >= Duration::from_millis(50));
    }
}

//! The proxy end to end, in process: a snapshot compiled from resources and published into a
//! `SnapshotHandle` (no control plane), the real server and pipeline on a loopback port, and a
//! tiny hyper upstream that records what it receives.

// Test support outside `#[test]` functions too: a failed set-up step should panic.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::channel::Channel;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use portcullis_data_plane::denial::Reason;
use portcullis_data_plane::metrics::Metrics;
use portcullis_data_plane::pipeline::{Pipeline, Settings};
use portcullis_data_plane::server::{Server, ServerOptions};
use portcullis_data_plane::snapshot::{self, ResourceMap, SnapshotHandle};
use portcullis_proto::config::v1 as pb;
use portcullis_shared::Kind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

// ------------------------------------------------------------------ the upstream

#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    uri: String,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

type UpBody = BoxBody<Bytes, Infallible>;

/// A recording upstream: `/slow*` answers after 2 s, `/delay*` after 400 ms, `/stream*` sends three chunks 50 ms apart,
/// `/ws*` with `Upgrade` switches protocols and echoes bytes, everything else answers `ok`.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorder = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let recorder = Arc::clone(&recorder);
                tokio::spawn(async move {
                    let service = service_fn(move |req| upstream_handle(req, Arc::clone(&recorder)));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream { addr, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn seen_path(&self, prefix: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.uri.starts_with(prefix)).collect()
    }
}

async fn upstream_handle(
    mut req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<UpBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let mut record = Seen {
        method: req.method().clone(),
        // origin-form for HTTP/1, the path and query of the :path for HTTP/2
        uri: req.uri().path_and_query().map(ToString::to_string).unwrap_or_default(),
        version: req.version(),
        headers: req.headers().clone(),
        body: Bytes::new(),
    };
    if path.starts_with("/ws") && req.headers().contains_key("upgrade") {
        seen.lock().unwrap().push(record);
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = on.await else { return };
            let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        let mut res = Response::new(Empty::new().boxed());
        *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        res.headers_mut().insert("upgrade", "websocket".parse().unwrap());
        res.headers_mut().insert("connection", "Upgrade".parse().unwrap());
        return Ok(res);
    }
    // A body the proxy aborts mid-way is fine: nothing we answer then reaches anyone.
    record.body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    seen.lock().unwrap().push(record);
    if path.starts_with("/slow") {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    if path.starts_with("/delay") {
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    if path.starts_with("/stream") {
        let (mut tx, body) = Channel::<Bytes, Infallible>::new(1);
        tokio::spawn(async move {
            for i in 0..3 {
                if tx.send_data(Bytes::from(format!("chunk{i}\n"))).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        return Ok(Response::new(body.boxed()));
    }
    let mut res = Response::new(Full::new(Bytes::from_static(b"ok")).boxed());
    res.headers_mut().insert("connection", "x-upstream-hop".parse().unwrap());
    res.headers_mut().insert("x-upstream-hop", "1".parse().unwrap());
    Ok(res)
}

// ------------------------------------------------------------------ the configuration

fn resource(kind: pb::resource::Kind) -> pb::Resource {
    pb::Resource { kind: Some(kind) }
}

fn insert(map: &mut ResourceMap, r: pb::Resource) {
    let (k, n) = Kind::of(&r).map(|(k, n)| (k, n.to_owned())).unwrap();
    map.insert((k, n), r);
}

fn upstream(name: &str, endpoints: &[SocketAddr], http2: bool) -> pb::Resource {
    resource(pb::resource::Kind::Upstream(pb::Upstream {
        name: name.into(),
        endpoints: endpoints.iter().map(|a| a.to_string()).collect(),
        connect_timeout: Some(portcullis_shared::duration::to_proto(Duration::from_millis(500))),
        http2,
        ..Default::default()
    }))
}

fn policy(name: &str, mode: pb::AuthMode, deny: &[&str]) -> pb::Resource {
    let public = mode == pb::AuthMode::Public;
    resource(pb::resource::Kind::Policy(pb::Policy {
        name: name.into(),
        authentication: Some(pb::Authentication {
            mode: mode as i32,
            reason: if public { "test".into() } else { String::new() },
            issuers: if public { vec![] } else { vec!["idp".into()] },
            ..Default::default()
        }),
        ip_filter: Some(pb::IpFilter { allow: vec![], deny: deny.iter().map(|s| s.to_string()).collect() }),
        ..Default::default()
    }))
}

struct RouteSpec<'a> {
    name: &'a str,
    prefix: Option<&'a str>,
    exact: Option<&'a str>,
    methods: &'a [&'a str],
    upstream: &'a str,
    policy: &'a str,
    strip: Option<&'a str>,
    max_body: u64,
    timeout: Option<Duration>,
}

impl Default for RouteSpec<'_> {
    fn default() -> Self {
        RouteSpec {
            name: "",
            prefix: None,
            exact: None,
            methods: &[],
            upstream: "backend",
            policy: "public",
            strip: None,
            max_body: 0,
            timeout: None,
        }
    }
}

fn route(spec: RouteSpec<'_>) -> pb::Resource {
    use pb::path_match::Kind as PK;
    let path = match (spec.prefix, spec.exact) {
        (Some(p), _) => PK::Prefix(p.into()),
        (None, Some(e)) => PK::Exact(e.into()),
        (None, None) => PK::Prefix("/".into()),
    };
    let rewrite = (spec.name == "api").then(|| pb::Rewrite {
        path: spec.strip.map(|s| pb::rewrite::Path::StripPrefix(s.into())),
        set_headers: [("x-added".to_owned(), "yes".to_owned())].into(),
        remove_headers: vec!["x-remove-me".into()],
    });
    resource(pb::resource::Kind::Route(pb::Route {
        name: spec.name.into(),
        r#match: Some(pb::RouteMatch {
            hosts: vec![],
            methods: spec.methods.iter().map(|m| m.to_string()).collect(),
            path: Some(pb::PathMatch { kind: Some(path) }),
        }),
        upstream: spec.upstream.into(),
        policy: spec.policy.into(),
        rewrite,
        limits: Some(pb::RouteLimits {
            max_body_bytes: spec.max_body,
            timeout: spec.timeout.map(portcullis_shared::duration::to_proto),
        }),
        ..Default::default()
    }))
}

/// A port that refuses connections: bound (so no other test can take it) but not listening.
fn dead_port() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

fn config(live: SocketAddr, dead: SocketAddr) -> ResourceMap {
    let mut m = ResourceMap::new();
    for r in [
        upstream("backend", &[live], false),
        upstream("h2-backend", &[live], true),
        upstream("down", &[dead], false),
        upstream("flaky-get", &[dead, live], false),
        upstream("flaky-post", &[dead, live], false),
        resource(pb::resource::Kind::Issuer(pb::Issuer {
            name: "idp".into(),
            issuer: "https://idp.example".into(),
            audiences: vec!["api".into()],
            algorithms: vec!["RS256".into()],
            keys: Some(pb::KeySource {
                // never fetched by a proxy: the issuer simply has no keys yet
                source: Some(pb::key_source::Source::JwksUri("http://127.0.0.1:9/jwks".into())),
                ..Default::default()
            }),
            ..Default::default()
        })),
        policy("public", pb::AuthMode::Public, &[]),
        policy("required", pb::AuthMode::Required, &[]),
        policy("loopback-denied", pb::AuthMode::Public, &["127.0.0.0/8"]),
        route(RouteSpec { name: "api", prefix: Some("/api"), strip: Some("/api"), ..Default::default() }),
        route(RouteSpec {
            name: "only-get",
            exact: Some("/only-get"),
            methods: &["GET", "HEAD"],
            ..Default::default()
        }),
        route(RouteSpec { name: "private", prefix: Some("/private"), policy: "required", ..Default::default() }),
        route(RouteSpec { name: "denied", prefix: Some("/denied"), policy: "loopback-denied", ..Default::default() }),
        route(RouteSpec { name: "small", prefix: Some("/small"), max_body: 16, ..Default::default() }),
        route(RouteSpec {
            name: "slow",
            prefix: Some("/slow"),
            timeout: Some(Duration::from_millis(200)),
            ..Default::default()
        }),
        route(RouteSpec { name: "down", prefix: Some("/down"), upstream: "down", ..Default::default() }),
        route(RouteSpec { name: "flaky-get", prefix: Some("/flaky-get"), upstream: "flaky-get", ..Default::default() }),
        route(RouteSpec {
            name: "flaky-post",
            prefix: Some("/flaky-post"),
            upstream: "flaky-post",
            ..Default::default()
        }),
        route(RouteSpec { name: "stream", prefix: Some("/stream"), ..Default::default() }),
        route(RouteSpec { name: "ws", prefix: Some("/ws"), ..Default::default() }),
        route(RouteSpec { name: "h2", prefix: Some("/h2"), upstream: "h2-backend", ..Default::default() }),
    ] {
        insert(&mut m, r);
    }
    m
}

// ------------------------------------------------------------------ the proxy

struct Harness {
    upstream: Upstream,
    proxy: SocketAddr,
    metrics: Arc<Metrics>,
    _snapshots: SnapshotHandle,
    _dead: tokio::net::TcpSocket,
    shutdown: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Harness {
    async fn start() -> Harness {
        let upstream = Upstream::start().await;
        let (dead_socket, dead) = dead_port();
        let snapshots = snapshot::new_handle();
        let compiled = snapshot::compile(7, &config(upstream.addr, dead)).unwrap();
        snapshots.store(Some(Arc::new(compiled)));
        let metrics = Arc::new(Metrics::new());
        let pipeline = Arc::new(Pipeline::new(snapshots.clone(), Settings::default(), Arc::clone(&metrics)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let options = ServerOptions { drain_timeout: Duration::from_secs(1), ..ServerOptions::default() };
        tokio::spawn(Server::new(options, pipeline, None).serve(listener, shutdown.clone()));
        Harness { upstream, proxy, metrics, _snapshots: snapshots, _dead: dead_socket, shutdown }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> (Response<()>, Bytes) {
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let res = client.request(req).await.unwrap();
        let (parts, body) = res.into_parts();
        (Response::from_parts(parts, ()), body.collect().await.unwrap().to_bytes())
    }

    async fn get(&self, path: &str) -> (Response<()>, Bytes) {
        self.send(Request::get(self.url(path)).body(Full::default()).unwrap()).await
    }

    /// Writes `request` on a fresh connection and reads until the server closes it.
    async fn raw(&self, request: &[u8]) -> String {
        let mut s = TcpStream::connect(self.proxy).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }
}

fn problem(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

/// Status, problem+json shape, and the reason counted for `route`.
fn check_denied(h: &Harness, res: &Response<()>, body: &Bytes, status: u16, reason: Reason, route: Option<&str>) {
    assert_eq!(res.status().as_u16(), status, "{}", String::from_utf8_lossy(body));
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let p = problem(body);
    assert_eq!(p["status"], status);
    assert_eq!(p["type"], "about:blank");
    assert_eq!(p["request_id"], res.headers()["x-request-id"].to_str().unwrap());
    let counters = match route {
        Some(r) => h.metrics.route(r),
        None => Arc::clone(h.metrics.unmatched()),
    };
    assert!(counters.denied(reason) >= 1, "{reason:?} not counted for {route:?}");
}

// ------------------------------------------------------------------ scenarios

#[tokio::test]
async fn a_routed_request_reaches_the_upstream_normalized_and_rewritten() {
    let h = Harness::start().await;
    let req = Request::get(h.url("/api/users/../items/%7efoo?q=1&r=%2F"))
        .header("x-remove-me", "1")
        .header("connection", "x-hop")
        .header("x-hop", "1")
        .header("x-forwarded-for", "6.6.6.6")
        .header("forwarded", "for=6.6.6.6")
        .header("x-request-id", "client-id-1")
        .body(Full::default())
        .unwrap();
    let (res, body) = h.send(req).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(body, "ok");
    assert_eq!(res.headers()["x-request-id"], "client-id-1");
    assert!(!res.headers().contains_key("x-upstream-hop"), "hop-by-hop response header removed");

    let seen = h.upstream.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.method, Method::GET);
    assert_eq!(s.uri, "/items/~foo?q=1&r=%2F");
    let host = h.proxy.to_string();
    let hv = |n: &str| s.headers.get(n).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(hv("host").as_deref(), Some(host.as_str()));
    assert_eq!(hv("x-added").as_deref(), Some("yes"));
    assert_eq!(hv("x-remove-me"), None);
    assert_eq!(hv("x-hop"), None);
    assert_eq!(hv("connection"), None);
    // untrusted peer: forwarding headers replaced
    assert_eq!(hv("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(hv("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(hv("x-forwarded-host").as_deref(), Some(host.as_str()));
    assert_eq!(hv("forwarded"), Some(format!("for=127.0.0.1;proto=http;host=\"{host}\"")));
    assert_eq!(hv("x-request-id").as_deref(), Some("client-id-1"));
    assert_eq!(h.metrics.route("api").forwarded(StatusCode::OK), 1);

    // an invalid incoming id is replaced by a generated one
    let req = Request::get(h.url("/api/x")).header("x-request-id", "has space").body(Full::default()).unwrap();
    let (res, _) = h.send(req).await;
    let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_ne!(id, "has space");
    assert_eq!(h.upstream.seen()[1].headers["x-request-id"], id.as_str());
}

#[tokio::test]
async fn bad_paths_are_400_and_never_forwarded() {
    let h = Harness::start().await;
    for (path, reason) in [
        ("/api/a%2Fb", Reason::PathEncodedSlash),
        ("/api/a%5cb", Reason::PathEncodedBackslash),
        ("/api/a%00b", Reason::PathEncodedNul),
        ("/api/a%zz", Reason::PathInvalidEncoding),
        ("/../x", Reason::PathTraversal),
        // Tomcat/Jetty drop `;` parameters before resolving dot segments: this would be /admin there.
        ("/api/..;/admin", Reason::PathTraversal),
        ("/api/%2e%2e;jsessionid=1/admin", Reason::PathTraversal),
    ] {
        let before = h.metrics.unmatched().denied(reason);
        let res = h.raw(format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes()).await;
        assert!(res.starts_with("HTTP/1.1 400"), "{path}: {res}");
        assert!(res.contains("application/problem+json"), "{res}");
        assert_eq!(h.metrics.unmatched().denied(reason), before + 1, "{path}");
    }
    assert!(h.upstream.seen().is_empty());
}

#[tokio::test]
async fn unrouted_wrong_method_unauthenticated_and_denied_ip() {
    let h = Harness::start().await;
    let (res, body) = h.get("/nothing/here").await;
    check_denied(&h, &res, &body, 404, Reason::RouteNotFound, None);

    let (res, body) = h.send(Request::post(h.url("/only-get")).body(Full::default()).unwrap()).await;
    check_denied(&h, &res, &body, 405, Reason::MethodNotAllowed, None);
    assert_eq!(res.headers()["allow"], "GET, HEAD");

    let (res, body) = h.get("/private/x").await;
    check_denied(&h, &res, &body, 401, Reason::TokenMissing, Some("private"));
    assert_eq!(res.headers()["www-authenticate"], r#"Bearer realm="portcullis""#);
    let req = Request::get(h.url("/private/x")).header("authorization", "Bearer abc").body(Full::default()).unwrap();
    let (res, body) = h.send(req).await;
    check_denied(&h, &res, &body, 401, Reason::TokenMalformed, Some("private"));

    let (res, body) = h.get("/denied").await;
    check_denied(&h, &res, &body, 403, Reason::IpDenied, Some("denied"));
    assert!(h.upstream.seen().is_empty());
}

#[tokio::test]
async fn body_limits_by_content_length_and_while_streaming() {
    let h = Harness::start().await;
    let req = Request::post(h.url("/small")).body(Full::new(Bytes::from(vec![b'x'; 100]))).unwrap();
    let (res, body) = h.send(req).await;
    check_denied(&h, &res, &body, 413, Reason::BodyTooLarge, Some("small"));
    assert!(h.upstream.seen().is_empty(), "refused before forwarding");

    // within the limit: forwarded
    let req = Request::post(h.url("/small")).body(Full::new(Bytes::from_static(b"0123456789"))).unwrap();
    let (res, _) = h.send(req).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(h.upstream.seen()[0].body, "0123456789");

    // chunked, no length: cut off when it crosses the limit
    let client: Client<HttpConnector, Channel<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let (mut tx, body) = Channel::<Bytes>::new(1);
    tokio::spawn(async move {
        for _ in 0..4 {
            if tx.send_data(Bytes::from_static(b"0123456789")).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let res = client.request(Request::post(h.url("/small/stream")).body(body).unwrap()).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    check_denied(&h, &Response::from_parts(parts, ()), &body, 413, Reason::BodyTooLarge, Some("small"));
    assert_eq!(h.metrics.route("small").denied(Reason::BodyTooLarge), 2, "the streamed body was cut too");
}

#[tokio::test]
async fn huge_headers_are_431() {
    let h = Harness::start().await;
    let big = "a".repeat(20 * 1024);
    let res = h.raw(format!("GET /api/x HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n").as_bytes()).await;
    assert!(res.starts_with("HTTP/1.1 431"), "{res}");
    assert!(h.upstream.seen().is_empty());
}

#[tokio::test]
async fn huge_headers_over_http2_are_refused() {
    let h = Harness::start().await;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    let req = Request::get(h.url("/api/x")).header("x-big", "a".repeat(20 * 1024)).body(Full::default()).unwrap();
    match client.request(req).await {
        Ok(res) => assert_eq!(res.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(e) => eprintln!("refused with a stream error: {e:?}"),
    }
    assert!(h.upstream.seen().is_empty());
}

#[tokio::test]
async fn upstream_down_is_502_and_slow_is_504() {
    let h = Harness::start().await;
    let (res, body) = h.get("/down").await;
    check_denied(&h, &res, &body, 502, Reason::UpstreamConnectFailed, Some("down"));
    assert!(!String::from_utf8_lossy(&body).contains("127.0.0.1"), "no upstream details");
    assert_eq!(h.metrics.upstream("down").errors(Reason::UpstreamConnectFailed), 1);

    let started = std::time::Instant::now();
    let (res, body) = h.get("/slow").await;
    check_denied(&h, &res, &body, 504, Reason::UpstreamTimeout, Some("slow"));
    assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
}

#[tokio::test]
async fn connect_failures_are_retried_for_get_but_not_post() {
    let h = Harness::start().await;
    // round robin starts on the dead endpoint of each upstream
    let (res, body) = h.send(Request::post(h.url("/flaky-post")).body(Full::from("x")).unwrap()).await;
    check_denied(&h, &res, &body, 502, Reason::UpstreamConnectFailed, Some("flaky-post"));
    assert!(h.upstream.seen_path("/flaky-post").is_empty(), "a POST is not retried");

    let (res, _) = h.get("/flaky-get").await;
    assert_eq!(res.status(), StatusCode::OK, "retried on the live endpoint");
    assert_eq!(h.upstream.seen_path("/flaky-get").len(), 1);
    assert_eq!(h.metrics.upstream("flaky-get").errors(Reason::UpstreamConnectFailed), 1);
}

#[tokio::test]
async fn a_streamed_response_arrives_in_chunks() {
    let h = Harness::start().await;
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let res = client.request(Request::get(h.url("/stream")).body(Full::default()).unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let mut chunks = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            chunks.push(data);
        }
    }
    assert!(chunks.len() >= 2, "{chunks:?}");
    assert_eq!(chunks.concat(), b"chunk0\nchunk1\nchunk2\n");
}

#[tokio::test]
async fn a_websocket_upgrade_is_tunnelled() {
    let h = Harness::start().await;
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.to_ascii_lowercase().contains("upgrade: websocket"), "{head}");
    s.write_all(b"hello through the tunnel").await.unwrap();
    let mut echo = [0u8; 24];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo)).await.unwrap().unwrap();
    assert_eq!(&echo, b"hello through the tunnel");
    let seen = h.upstream.seen_path("/ws");
    assert_eq!(seen[0].headers["upgrade"], "websocket");
    assert_eq!(seen[0].headers["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
}

#[tokio::test]
async fn h2c_clients_and_http2_upstreams() {
    let h = Harness::start().await;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    let res = client.request(Request::get(h.url("/api/h2c")).body(Full::default()).unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.version(), Version::HTTP_2);
    let s = &h.upstream.seen_path("/h2c")[0];
    assert_eq!(s.version, Version::HTTP_11);
    assert_eq!(s.headers["host"], h.proxy.to_string().as_str(), "the :authority becomes Host");

    // an upstream with http2: prior knowledge from the proxy
    let (res, _) = h.get("/h2/x").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(h.upstream.seen_path("/h2/x")[0].version, Version::HTTP_2);
}

#[tokio::test]
async fn draining_stops_accepting_and_finishes_in_flight_requests() {
    let h = Harness::start().await;
    let in_flight = tokio::spawn({
        let url = h.url("/api/delay");
        async move {
            let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            let res = client.request(Request::get(url).body(Full::default()).unwrap()).await.unwrap();
            (res.status(), res.into_body().collect().await.unwrap().to_bytes())
        }
    });
    // wait until the upstream holds the request, then drain
    while h.upstream.seen_path("/delay").is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(TcpStream::connect(h.proxy).await.is_err(), "no longer accepting");
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "ok");
}

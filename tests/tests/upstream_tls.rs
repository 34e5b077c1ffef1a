//! The proxy speaking TLS to upstreams, in process: snapshots compiled from resources (no control
//! plane), the real server and pipeline on a loopback port, and TLS recording upstreams with the
//! test certificate (`tests/keys/tls/`). HTTP/1.1 and h2 (ALPN) over TLS reach the upstream and
//! reuse their connection; a certificate that does not verify (wrong CA, wrong name, not in the
//! system roots, not TLS at all) is 502 `upstream_tls_failed` with nothing leaked; an unusable
//! `ca_file` fails the version and a proxy NACKs it with a message naming field and file.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use portcullis_data_plane::config_client::{ConfigClient, ConfigClientOptions};
use portcullis_data_plane::denial::Reason;
use portcullis_data_plane::metrics::Metrics;
use portcullis_data_plane::pipeline::{Pipeline, Settings};
use portcullis_data_plane::server::{Server, ServerOptions};
use portcullis_data_plane::snapshot::{self, ResourceMap, SnapshotHandle};
use portcullis_proto::admin::v1 as api;
use portcullis_proto::config::v1 as pb;
use portcullis_shared::Kind;
use portcullis_tests::control_plane::TestControlPlane;
use portcullis_tests::resources::*;
use portcullis_tests::tls;
use portcullis_tests::upstream::RecordingUpstream;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

fn insert(map: &mut ResourceMap, r: pb::Resource) {
    let (k, n) = Kind::of(&r).map(|(k, n)| (k, n.to_owned())).expect("a named resource");
    map.insert((k, n), r);
}

fn prefix_route(name: &str, upstream: &str) -> pb::Resource {
    route(name, pb::path_match::Kind::Prefix(format!("/{name}")), upstream, "open")
}

struct Harness {
    /// The TLS upstream (test certificate).
    tls: RecordingUpstream,
    /// A plain HTTP upstream.
    plain: RecordingUpstream,
    proxy: SocketAddr,
    metrics: Arc<Metrics>,
    _snapshots: SnapshotHandle,
    shutdown: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Harness {
    async fn start() -> Harness {
        let tls = RecordingUpstream::start_tls().await;
        let plain = RecordingUpstream::start().await;
        let ca = tls::ca_file().display().to_string();
        let other_ca = tls::other_ca_file().display().to_string();
        let at = tls.endpoint();
        let localhost = format!("localhost:{}", tls.addr().port());
        let mut m = ResourceMap::new();
        for r in [
            // verified against the IP SAN 127.0.0.1
            tls_upstream("h1", &at, &ca, "", false),
            tls_upstream("h2", &at, &ca, "", true),
            // verified against the DNS SAN localhost: the endpoint host, or the server_name
            tls_upstream("localhost", &localhost, &ca, "", false),
            tls_upstream("named", &at, &ca, "localhost", false),
            tls_upstream("misnamed", &at, &ca, "api.example.com", false),
            tls_upstream("wrong-ca", &at, &other_ca, "", false),
            tls_upstream("wrong-ca-h2", &at, &other_ca, "", true),
            tls_upstream("system", &at, "", "", false),
            tls_upstream("not-tls", &plain.endpoint(), &ca, "", false),
            upstream("plain", &plain.endpoint()),
            public_policy("open", "test traffic"),
        ] {
            insert(&mut m, r);
        }
        for (route, upstream) in [
            ("h1", "h1"),
            ("h2", "h2"),
            ("localhost", "localhost"),
            ("named", "named"),
            ("misnamed", "misnamed"),
            ("wrong-ca", "wrong-ca"),
            ("wrong-ca-h2", "wrong-ca-h2"),
            ("system", "system"),
            ("not-tls", "not-tls"),
            ("plain", "plain"),
        ] {
            insert(&mut m, prefix_route(route, upstream));
        }
        let snapshots = snapshot::new_handle();
        snapshots.store(Some(Arc::new(snapshot::compile(1, &m).expect("the config compiles"))));
        let metrics = Arc::new(Metrics::new());
        let pipeline = Arc::new(Pipeline::new(snapshots.clone(), Settings::default(), Arc::clone(&metrics)));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let proxy = listener.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        tokio::spawn(Server::new(ServerOptions::default(), pipeline, None).serve(listener, shutdown.clone()));
        Harness { tls, plain, proxy, metrics, _snapshots: snapshots, shutdown }
    }

    async fn get(&self, path: &str) -> (Response<()>, Bytes) {
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let request = Request::get(format!("http://{}{path}", self.proxy)).body(Full::default()).expect("request");
        let response = tokio::time::timeout(WAIT, client.request(request)).await.expect("in time").expect("response");
        let (parts, body) = response.into_parts();
        (Response::from_parts(parts, ()), body.collect().await.expect("body").to_bytes())
    }

    /// 502 `upstream_tls_failed` as problem+json that names nothing of the upstream, counted
    /// for the route and the upstream.
    fn check_tls_failed(&self, route: &str, response: &Response<()>, body: &Bytes) {
        let text = String::from_utf8_lossy(body);
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY, "{route}: {text}");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        let problem: serde_json::Value = serde_json::from_slice(body).expect("problem json");
        assert_eq!(problem["status"], 502);
        assert_eq!(problem["detail"], "the upstream service could not be reached");
        for leak in ["127.0.0.1", "localhost", "certificate", "tls", "TLS", "issuer", "example.com"] {
            assert!(!text.contains(leak), "{route}: {leak:?} leaked in {text}");
        }
        assert_eq!(self.metrics.route(route).denied(Reason::UpstreamTlsFailed), 1, "{route}");
        assert_eq!(self.metrics.upstream(route).errors(Reason::UpstreamTlsFailed), 1, "{route}");
    }
}

#[tokio::test]
async fn http1_over_tls_reaches_the_upstream_on_one_reused_connection() {
    let h = Harness::start().await;
    for i in 0..5 {
        let (response, body) = h.get(&format!("/h1/x?i={i}")).await;
        assert_eq!(response.status(), StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let echo: serde_json::Value = serde_json::from_slice(&body).expect("echo json");
        assert_eq!(echo["path"], format!("/h1/x?i={i}"));
    }
    let seen = h.tls.requests();
    assert_eq!(seen.len(), 5);
    assert_eq!(seen[0].uri, "/h1/x?i=0");
    assert_eq!(seen[0].version, Version::HTTP_11);
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("http"), "the client's protocol, not ours");
    assert_eq!(h.tls.connections(), 1, "five requests, one TLS connection");
    assert_eq!(h.metrics.route("h1").forwarded(StatusCode::OK), 5);
}

#[tokio::test]
async fn h2_over_tls_by_alpn() {
    let h = Harness::start().await;
    for _ in 0..3 {
        let (response, body) = h.get("/h2/y").await;
        assert_eq!(response.status(), StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    }
    let seen = h.tls.requests_to("/h2/y");
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|r| r.version == Version::HTTP_2), "{seen:?}");
    assert_eq!(h.tls.connections(), 1, "one h2 connection, multiplexed");
}

#[tokio::test]
async fn the_certificate_name_is_the_endpoint_host_or_the_server_name() {
    let h = Harness::start().await;
    let (response, _) = h.get("/localhost").await;
    assert_eq!(response.status(), StatusCode::OK, "endpoint localhost:PORT, DNS SAN localhost");
    let (response, _) = h.get("/named").await;
    assert_eq!(response.status(), StatusCode::OK, "endpoint 127.0.0.1:PORT, server_name localhost");
    assert_eq!(h.tls.requests().len(), 2);

    let (response, body) = h.get("/misnamed").await;
    h.check_tls_failed("misnamed", &response, &body);
    assert_eq!(h.tls.requests().len(), 2, "nothing reached the upstream");
}

#[tokio::test]
async fn an_untrusted_certificate_is_502_upstream_tls_failed() {
    let h = Harness::start().await;
    for route in ["wrong-ca", "wrong-ca-h2", "system", "not-tls"] {
        let (response, body) = h.get(&format!("/{route}/secret")).await;
        h.check_tls_failed(route, &response, &body);
    }
    assert!(h.tls.requests().is_empty(), "nothing reached the TLS upstream");
    assert!(h.plain.requests().is_empty(), "a TLS client hello is not a request");
    assert!(h.tls.connections() >= 3, "the handshakes were attempted");

    // the plain upstream next to them is unaffected
    let (response, _) = h.get("/plain").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(h.plain.requests()[0].version, Version::HTTP_11);
}

#[tokio::test]
async fn an_unusable_ca_file_fails_the_version() {
    let mut m = ResourceMap::new();
    for r in [
        tls_upstream("u", "127.0.0.1:9", "/nonexistent/ca.pem", "", false),
        public_policy("open", "test traffic"),
        prefix_route("u", "u"),
    ] {
        insert(&mut m, r);
    }
    let err = snapshot::compile(3, &m).expect_err("the version must fail").to_string();
    assert!(err.contains("upstream u: tls.ca_file"), "{err}");
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
}

/// The control plane accepts the Upstream (the file lives on the proxies), a proxy NACKs the
/// version naming the field and the file, and keeps serving the previous one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_nacks_a_version_whose_ca_file_it_cannot_read() {
    let cp = TestControlPlane::embedded().await;
    let mut client = cp.client().await;
    let mut apply = async |resources: Vec<pb::Resource>| -> i64 {
        let request = api::ApplyRequest { resources, ..Default::default() };
        client.apply(request).await.expect("apply").into_inner().revision
    };
    let v1 = apply(vec![
        upstream("orders", "127.0.0.1:9000"),
        public_policy("open", "test traffic"),
        exact_route("r1", "/one", "orders", "open"),
    ])
    .await;

    let handle = snapshot::new_handle();
    let options = ConfigClientOptions {
        endpoints: vec![cp.proxy_url()],
        proxy_id: "proxy-tls".into(),
        zone: "zone-a".into(),
        token: Some(cp.token().into()),
        cache_dir: None,
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(ConfigClient::new(options, handle.clone()).run(stop.clone()));
    wait_for(|| handle.load().as_ref().is_some_and(|s| s.version == v1), "the first version").await;

    let v2 = apply(vec![tls_upstream("orders", "127.0.0.1:9000", "/nonexistent/orders-ca.pem", "", false)]).await;
    let mut admin = cp.client().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let status = loop {
        let list = admin.list_proxies(api::ListProxiesRequest {}).await.expect("list proxies").into_inner();
        if let Some(p) = list.proxies.into_iter().find(|p| p.id == "proxy-tls" && p.last_nack_version == v2) {
            break p;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for the NACK of {v2}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(status.last_nack_error.contains("upstream orders: tls.ca_file"), "{status:?}");
    assert!(status.last_nack_error.contains("/nonexistent/orders-ca.pem"), "{status:?}");
    assert_eq!(status.acked_version, v1);
    assert_eq!(handle.load().as_ref().map(|s| s.version), Some(v1), "the previous version keeps serving");
    stop.cancel();
    let _ = task.await;
    cp.stop().await;
}

/// Bounded polling of in-process state.
async fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

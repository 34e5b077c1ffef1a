//! Opaque tokens and the phantom-token swap, end to end over loopback: the real test
//! authorization server (RFC 7662 introspection with RFC 9701 JWT answers, client
//! authentication, down/slow switches), the proxy's real server and pipeline, and a recording
//! upstream that shows exactly what crossed the gateway.
//!
//! The issuer's keys are given inline (the auth server's published JWKs), so no control plane is
//! needed: key fetching has its own suite (`key_rotation.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use portcullis_data_plane::denial::Reason;
use portcullis_data_plane::metrics::Metrics;
use portcullis_data_plane::pipeline::{Pipeline, Settings};
use portcullis_data_plane::server::{Server, ServerOptions};
use portcullis_data_plane::snapshot::{self, ResourceMap};
use portcullis_proto::config::v1 as pb;
use portcullis_shared::Kind;
use portcullis_shared::duration::to_proto;
use portcullis_tests::auth_server::{AuthServer, CLIENT_ID, CLIENT_SECRET, Endpoint};
use portcullis_tests::upstream::RecordingUpstream;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const AUD: &str = "api://orders";

struct Options {
    secret: &'static str,
    cache_ttl: Duration,
    negative_ttl: Duration,
    timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            secret: CLIENT_SECRET,
            cache_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(300),
            timeout: Duration::from_secs(2),
        }
    }
}

struct Harness {
    auth: AuthServer,
    upstream: RecordingUpstream,
    proxy: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    client: Client<HttpConnector, Full<Bytes>>,
    shutdown: CancellationToken,
    _secret: tempfile::NamedTempFile,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn resource(kind: pb::resource::Kind) -> pb::Resource {
    pb::Resource { kind: Some(kind) }
}

fn config(auth: &AuthServer, upstream: &RecordingUpstream, secret_file: &str, o: &Options) -> ResourceMap {
    let jwks: Vec<Value> = auth.published_kids().iter().filter_map(|k| auth.jwk(k)).collect();
    let issuer = pb::Issuer {
        name: "idp".into(),
        issuer: auth.issuer(),
        audiences: vec![AUD.into()],
        algorithms: vec!["RS256".into(), "ES256".into()],
        keys: Some(pb::KeySource {
            source: Some(pb::key_source::Source::InlineJwks(json!({ "keys": jwks }).to_string())),
            ..Default::default()
        }),
        introspection: Some(pb::Introspection {
            endpoint: format!("{}/introspect", auth.issuer()),
            client_id: CLIENT_ID.into(),
            client_secret_file: secret_file.into(),
            cache_ttl: Some(to_proto(o.cache_ttl)),
            negative_cache_ttl: Some(to_proto(o.negative_ttl)),
            timeout: Some(to_proto(o.timeout)),
        }),
        ..Default::default()
    };
    let policy = pb::Policy {
        name: "orders".into(),
        authentication: Some(pb::Authentication {
            mode: pb::AuthMode::Required as i32,
            issuers: vec!["idp".into()],
            tokens: vec![pb::TokenKind::Jwt as i32, pb::TokenKind::Opaque as i32],
            ..Default::default()
        }),
        authorization: Some(pb::Authorization { required_scopes: vec!["orders:read".into()], ..Default::default() }),
        forwarding: Some(pb::Forwarding {
            forward_token: false,
            claim_headers: [("sub".to_string(), "x-user".to_string())].into(),
        }),
        ..Default::default()
    };
    let route = pb::Route {
        name: "orders".into(),
        r#match: Some(pb::RouteMatch {
            path: Some(pb::PathMatch { kind: Some(pb::path_match::Kind::Prefix("/orders".into())) }),
            ..Default::default()
        }),
        upstream: "backend".into(),
        policy: "orders".into(),
        ..Default::default()
    };
    let upstream =
        pb::Upstream { name: "backend".into(), endpoints: vec![upstream.addr().to_string()], ..Default::default() };
    let mut map = ResourceMap::new();
    for r in [
        resource(pb::resource::Kind::Issuer(issuer)),
        resource(pb::resource::Kind::Policy(policy)),
        resource(pb::resource::Kind::Route(route)),
        resource(pb::resource::Kind::Upstream(upstream)),
    ] {
        let (k, n) = Kind::of(&r).map(|(k, n)| (k, n.to_owned())).expect("named resource");
        map.insert((k, n), r);
    }
    map
}

impl Harness {
    async fn start(o: Options) -> Harness {
        let auth = AuthServer::start().await;
        let upstream = RecordingUpstream::start().await;
        let secret = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(secret.path(), format!("{}\n", o.secret)).expect("write secret");
        let map = config(&auth, &upstream, &secret.path().display().to_string(), &o);
        let snapshots = snapshot::new_handle();
        snapshots.store(Some(Arc::new(snapshot::compile(1, &map).expect("config compiles"))));
        let metrics = Arc::new(Metrics::new());
        let pipeline = Arc::new(Pipeline::new(snapshots, Settings::default(), Arc::clone(&metrics)));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let proxy = listener.local_addr().expect("proxy addr");
        let shutdown = CancellationToken::new();
        let options = ServerOptions { drain_timeout: Duration::from_secs(1), ..ServerOptions::default() };
        tokio::spawn(Server::new(options, pipeline, None).serve(listener, shutdown.clone()));
        let client = Client::builder(TokioExecutor::new()).build_http();
        Harness { auth, upstream, proxy, metrics, client, shutdown, _secret: secret }
    }

    async fn bearer(&self, token: &str) -> Response<Bytes> {
        let req = Request::get(format!("http://{}/orders/1", self.proxy))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::default())
            .expect("request");
        let res = self.client.request(req).await.expect("proxy answers");
        let (parts, body) = res.into_parts();
        Response::from_parts(parts, body.collect().await.expect("body").to_bytes())
    }

    fn introspections(&self) -> u64 {
        self.auth.requests(Endpoint::Introspect)
    }

    fn denied(&self, reason: Reason) -> u64 {
        self.metrics.route("orders").denied(reason)
    }

    /// An opaque token the auth server reports active with the read scope.
    fn opaque(&self) -> String {
        self.auth.issue_opaque(json!({"sub": "alice", "aud": AUD, "scope": "orders:read"}))
    }
}

/// The claims of a JWT (its payload, undecoded signature ignored).
fn payload(jwt: &str) -> Value {
    let part = jwt.split('.').nth(1).expect("a JWT payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("JSON payload")
}

fn assert_problem(res: &Response<Bytes>, status: StatusCode) {
    assert_eq!(res.status(), status, "{:?}", res.body());
    assert_eq!(res.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn an_opaque_token_is_swapped_for_the_signed_introspection_jwt() {
    let h = Harness::start(Options::default()).await;
    let opaque = h.opaque();
    let res = h.bearer(&opaque).await;
    assert_eq!(res.status(), StatusCode::OK, "{:?}", res.body());
    assert_eq!(h.introspections(), 1);

    let seen = h.upstream.requests();
    assert_eq!(seen.len(), 1);
    let authorization = seen[0].header("authorization").expect("a JWT goes upstream");
    let jwt = authorization.strip_prefix("Bearer ").expect("bearer");
    assert_ne!(jwt, opaque);
    assert_eq!(jwt.split('.').count(), 3, "a compact JWS");
    let claims = payload(jwt);
    assert_eq!(claims["iss"], h.auth.issuer());
    assert_eq!(claims["aud"], CLIENT_ID);
    assert_eq!(claims["token_introspection"]["sub"], "alice");
    assert_eq!(claims["token_introspection"]["active"], true);
    assert_eq!(seen[0].header("x-user"), Some("alice"), "claim headers come from the introspected claims");
    for (name, value) in &seen[0].headers {
        let value = value.to_str().unwrap_or_default();
        assert!(!value.contains(&opaque), "the opaque token reached the upstream in {name}");
    }

    // The same token again: answered from the cache, same swap.
    let res = h.bearer(&opaque).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(h.introspections(), 1, "cached");
    assert_eq!(h.upstream.requests()[1].header("authorization"), Some(authorization));
    assert!(h.metrics.introspection.cache_hits.load(std::sync::atomic::Ordering::Relaxed) >= 1);
}

#[tokio::test]
async fn unknown_and_revoked_tokens_are_refused_and_refusals_are_cached_briefly() {
    let h = Harness::start(Options {
        cache_ttl: Duration::from_millis(500),
        negative_ttl: Duration::from_millis(500),
        ..Options::default()
    })
    .await;
    let res = h.bearer("not-a-token-the-server-knows").await;
    assert_problem(&res, StatusCode::UNAUTHORIZED);
    assert!(res.headers()["www-authenticate"].to_str().unwrap_or_default().contains("invalid_token"));
    let res = h.bearer("not-a-token-the-server-knows").await;
    assert_problem(&res, StatusCode::UNAUTHORIZED);
    assert_eq!(h.introspections(), 1, "the refusal is cached");
    assert_eq!(h.denied(Reason::TokenInactive), 2);

    let opaque = h.opaque();
    assert_eq!(h.bearer(&opaque).await.status(), StatusCode::OK);
    h.auth.revoke_opaque(&opaque);
    assert_eq!(h.bearer(&opaque).await.status(), StatusCode::OK, "cached until cache_ttl");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_problem(&h.bearer(&opaque).await, StatusCode::UNAUTHORIZED);
    assert_eq!(h.upstream.request_count(), 2, "refused requests never reach the upstream");
}

#[tokio::test]
async fn concurrent_requests_with_one_token_share_one_introspection_call() {
    let h = Arc::new(Harness::start(Options::default()).await);
    let opaque = h.opaque();
    h.auth.set_delay(Duration::from_millis(300));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (h, opaque) = (Arc::clone(&h), opaque.clone());
        tasks.push(tokio::spawn(async move { h.bearer(&opaque).await.status() }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), StatusCode::OK);
    }
    assert_eq!(h.introspections(), 1, "one call for sixteen requests");
    assert!(h.metrics.introspection.coalesced.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert_eq!(h.upstream.request_count(), 16);
}

#[tokio::test]
async fn introspection_down_is_503_with_retry_after_never_a_pass() {
    let h = Harness::start(Options::default()).await;
    let opaque = h.opaque();
    h.auth.set_down(true);
    let res = h.bearer(&opaque).await;
    assert_problem(&res, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(h.upstream.request_count(), 0);
    assert_eq!(h.denied(Reason::IntrospectionUnavailable), 1);
    // Failures are not cached: the next request asks again and passes.
    h.auth.set_down(false);
    assert_eq!(h.bearer(&opaque).await.status(), StatusCode::OK);
    assert_eq!(h.introspections(), 2);
}

#[tokio::test]
async fn slow_introspection_times_out_to_503() {
    let h = Harness::start(Options { timeout: Duration::from_millis(200), ..Options::default() }).await;
    let opaque = h.opaque();
    h.auth.set_delay(Duration::from_secs(3));
    let started = Instant::now();
    let res = h.bearer(&opaque).await;
    assert_problem(&res, StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < Duration::from_secs(2), "the introspection timeout bounds the wait");
    assert_eq!(h.upstream.request_count(), 0);
}

#[tokio::test]
async fn a_wrong_client_secret_is_503_not_a_pass() {
    let h = Harness::start(Options { secret: "not-the-secret", ..Options::default() }).await;
    let res = h.bearer(&h.opaque()).await;
    assert_problem(&res, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.upstream.request_count(), 0);
}

#[tokio::test]
async fn introspected_claims_are_authorized_like_a_jwts() {
    let h = Harness::start(Options::default()).await;
    let no_scope = h.auth.issue_opaque(json!({"sub": "bob", "aud": AUD, "scope": "profile"}));
    let res = h.bearer(&no_scope).await;
    assert_problem(&res, StatusCode::FORBIDDEN);
    let other_audience = h.auth.issue_opaque(json!({"sub": "bob", "aud": "api://payroll", "scope": "orders:read"}));
    assert_problem(&h.bearer(&other_audience).await, StatusCode::UNAUTHORIZED);
    assert_eq!(h.denied(Reason::TokenAudienceMismatch), 1);
    assert_eq!(h.upstream.request_count(), 0);
}

#[tokio::test]
async fn jwts_are_still_verified_locally_without_introspection() {
    let h = Harness::start(Options::default()).await;
    let jwt = h.auth.mint(json!({"sub": "carol", "aud": AUD, "scope": "orders:read"}));
    assert_eq!(h.bearer(&jwt).await.status(), StatusCode::OK);
    assert_eq!(h.introspections(), 0);
    assert_eq!(h.upstream.requests()[0].header("authorization"), None, "forward_token is off");
}

#[tokio::test]
async fn an_https_introspection_endpoint_is_verified_against_the_configured_ca() {
    let auth = AuthServer::start_tls().await;
    assert!(auth.issuer().starts_with("https://"));
    let upstream = RecordingUpstream::start().await;
    let secret = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(secret.path(), CLIENT_SECRET).expect("write secret");
    let map = config(&auth, &upstream, &secret.path().display().to_string(), &Options::default());
    let opaque = auth.issue_opaque(json!({"sub": "alice", "aud": AUD, "scope": "orders:read"}));
    for (ca, expected) in [
        (portcullis_tests::tls::ca_file(), StatusCode::OK),
        (portcullis_tests::tls::other_ca_file(), StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let snapshots = snapshot::new_handle();
        snapshots.store(Some(Arc::new(snapshot::compile(1, &map).expect("config compiles"))));
        let settings = Settings { introspection_ca_file: Some(ca), ..Settings::default() };
        let pipeline = Arc::new(Pipeline::new(snapshots, settings, Arc::new(Metrics::new())));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let proxy = listener.local_addr().expect("proxy addr");
        let shutdown = CancellationToken::new();
        tokio::spawn(Server::new(ServerOptions::default(), pipeline, None).serve(listener, shutdown.clone()));
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let req = Request::get(format!("http://{proxy}/orders/1"))
            .header("authorization", format!("Bearer {opaque}"))
            .body(Full::default())
            .expect("request");
        let res = client.request(req).await.expect("proxy answers");
        assert_eq!(res.status(), expected);
        shutdown.cancel();
    }
    assert_eq!(upstream.request_count(), 1, "only the verified connection let a request through");
}

//! JWT authentication and claims authorization, end to end in process: an inline-JWKS issuer
//! (the fixed RSA and P-256 test keys), tokens minted with `jsonwebtoken`, the real server and
//! pipeline on a loopback port, and a recording upstream that proves what (not) reached it.

// Test support outside `#[test]` functions too: a failed set-up step should panic.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use portcullis_data_plane::denial::Reason;
use portcullis_data_plane::metrics::Metrics;
use portcullis_data_plane::pipeline::{Pipeline, Settings};
use portcullis_data_plane::server::{Server, ServerOptions};
use portcullis_data_plane::snapshot::{self, ResourceMap, SnapshotHandle};
use portcullis_proto::config::v1 as pb;
use portcullis_shared::Kind;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const ISS: &str = "https://idp.test/";
const AUD: &str = "api://orders";

// ------------------------------------------------------------------ keys and tokens

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(body).unwrap()
}

struct Keys {
    rsa: EncodingKey,
    rsa_jwk: Value,
    /// The RSA public key as PEM: what an attacker uses as an HMAC secret.
    rsa_public_pem: String,
    ec: EncodingKey,
    ec_jwk: Value,
}

fn keys() -> Keys {
    let private =
        rsa::RsaPrivateKey::from_pkcs8_der(&der(include_str!("../../shared/tests/keys/test_issuer_rsa2048.pem")))
            .unwrap();
    let rsa = EncodingKey::from_rsa_der(private.to_pkcs1_der().unwrap().as_bytes());
    let public = private.to_public_key();
    let rsa_jwk = json!({"kty": "RSA", "kid": "rsa-1", "use": "sig", "alg": "RS256",
        "n": b64(public.n().to_bytes_be()), "e": b64(public.e().to_bytes_be())});
    let rsa_public_pem = {
        use rsa::pkcs8::EncodePublicKey;
        public.to_public_key_pem(rsa::pkcs8::LineEnding::LF).unwrap()
    };
    let ec_der = der(include_str!("../../shared/tests/keys/test_issuer_p256.pem"));
    let sk = p256::SecretKey::from_pkcs8_der(&ec_der).unwrap();
    let point = sk.public_key().to_sec1_bytes().to_vec();
    let ec_jwk = json!({"kty": "EC", "crv": "P-256", "kid": "ec-1", "x": b64(&point[1..33]), "y": b64(&point[33..])});
    Keys { rsa, rsa_jwk, rsa_public_pem, ec: EncodingKey::from_ec_der(&ec_der), ec_jwk }
}

fn now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}

fn claims() -> Value {
    json!({"iss": ISS, "aud": AUD, "sub": "alice", "exp": now() + 600, "iat": now(),
        "scope": "orders:read profile", "tenant": "acme", "roles": ["a", "b"]})
}

fn with(mut base: Value, changes: Value) -> Value {
    for (k, v) in changes.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

fn rs256(k: &Keys, claims: &Value) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("rsa-1".into());
    jsonwebtoken::encode(&h, claims, &k.rsa).unwrap()
}

fn es256(k: &Keys, claims: &Value) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("ec-1".into());
    jsonwebtoken::encode(&h, claims, &k.ec).unwrap()
}

// ------------------------------------------------------------------ the upstream

type Seen = Arc<Mutex<Vec<HeaderMap>>>;

async fn start_upstream() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let recorder = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let recorder = Arc::clone(&recorder);
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    recorder.lock().unwrap().push(req.headers().clone());
                    async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
                });
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    (addr, seen)
}

// ------------------------------------------------------------------ the configuration

fn resource(kind: pb::resource::Kind) -> pb::Resource {
    pb::Resource { kind: Some(kind) }
}

fn insert(map: &mut ResourceMap, r: pb::Resource) {
    let (k, n) = Kind::of(&r).map(|(k, n)| (k, n.to_owned())).unwrap();
    map.insert((k, n), r);
}

fn issuer(k: &Keys) -> pb::Resource {
    let jwks = json!({"keys": [k.rsa_jwk, k.ec_jwk]}).to_string();
    resource(pb::resource::Kind::Issuer(pb::Issuer {
        name: "idp".into(),
        issuer: ISS.into(),
        audiences: vec![AUD.into()],
        algorithms: vec!["RS256".into(), "ES256".into()],
        keys: Some(pb::KeySource { source: Some(pb::key_source::Source::InlineJwks(jwks)), ..Default::default() }),
        ..Default::default()
    }))
}

#[derive(Default)]
struct PolicySpec<'a> {
    name: &'a str,
    optional: bool,
    opaque_only: bool,
    scopes: &'a [&'a str],
    forward_token: bool,
    claim_headers: &'a [(&'a str, &'a str)],
    report_only: bool,
    /// Default: "idp".
    issuer: Option<&'a str>,
}

fn policy(spec: PolicySpec<'_>) -> pb::Resource {
    let mode = if spec.optional { pb::AuthMode::Optional } else { pb::AuthMode::Required };
    let tokens = if spec.opaque_only { vec![pb::TokenKind::Opaque as i32] } else { vec![] };
    resource(pb::resource::Kind::Policy(pb::Policy {
        name: spec.name.into(),
        authentication: Some(pb::Authentication {
            mode: mode as i32,
            issuers: vec![spec.issuer.unwrap_or("idp").into()],
            tokens,
            ..Default::default()
        }),
        authorization: Some(pb::Authorization {
            required_scopes: spec.scopes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        forwarding: Some(pb::Forwarding {
            forward_token: spec.forward_token,
            claim_headers: spec.claim_headers.iter().map(|(c, h)| (c.to_string(), h.to_string())).collect(),
        }),
        mode: if spec.report_only { pb::PolicyMode::ReportOnly } else { pb::PolicyMode::Enforce } as i32,
        ..Default::default()
    }))
}

fn route(name: &str, policy: &str) -> pb::Resource {
    resource(pb::resource::Kind::Route(pb::Route {
        name: name.into(),
        r#match: Some(pb::RouteMatch {
            path: Some(pb::PathMatch { kind: Some(pb::path_match::Kind::Prefix(format!("/{name}"))) }),
            ..Default::default()
        }),
        upstream: "backend".into(),
        policy: policy.into(),
        ..Default::default()
    }))
}

/// The HS256 secret of the shared-secret issuer, in a file the proxy reads (as it would a
/// mounted secret).
const HMAC_SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";

fn hmac_issuer() -> pb::Resource {
    // One file per call: tests run on threads of one process, and a rewrite in progress
    // (truncated, not yet written) must never be what another test's proxy reads.
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("portcullis-proxy-auth-hmac-{}-{n}", std::process::id()));
    std::fs::write(&path, format!("{HMAC_SECRET}\n")).unwrap();
    resource(pb::resource::Kind::Issuer(pb::Issuer {
        name: "hmac-idp".into(),
        issuer: ISS.into(),
        audiences: vec![AUD.into()],
        algorithms: vec!["HS256".into()],
        keys: Some(pb::KeySource {
            source: Some(pb::key_source::Source::SharedSecretFile(path.display().to_string())),
            ..Default::default()
        }),
        ..Default::default()
    }))
}

fn config(k: &Keys, upstream: SocketAddr) -> ResourceMap {
    let mut m = ResourceMap::new();
    let headers = [("sub", "x-user"), ("tenant", "x-tenant"), ("roles", "x-roles"), ("missing", "x-missing")];
    for r in [
        resource(pb::resource::Kind::Upstream(pb::Upstream {
            name: "backend".into(),
            endpoints: vec![upstream.to_string()],
            ..Default::default()
        })),
        issuer(k),
        policy(PolicySpec {
            name: "required",
            scopes: &["orders:read"],
            claim_headers: &headers,
            ..Default::default()
        }),
        policy(PolicySpec { name: "writer", scopes: &["orders:write"], ..Default::default() }),
        policy(PolicySpec { name: "forward", forward_token: true, ..Default::default() }),
        policy(PolicySpec {
            name: "optional",
            optional: true,
            claim_headers: &[("sub", "x-user")],
            ..Default::default()
        }),
        policy(PolicySpec { name: "opaque", opaque_only: true, ..Default::default() }),
        hmac_issuer(),
        policy(PolicySpec { name: "hmac", issuer: Some("hmac-idp"), ..Default::default() }),
        route("hmac", "hmac"),
        policy(PolicySpec { name: "report", scopes: &["orders:write"], report_only: true, ..Default::default() }),
        route("req", "required"),
        route("write", "writer"),
        route("fwd", "forward"),
        route("opt", "optional"),
        route("opaque", "opaque"),
        route("report", "report"),
    ] {
        insert(&mut m, r);
    }
    m
}

// ------------------------------------------------------------------ the proxy

struct Harness {
    keys: Keys,
    proxy: SocketAddr,
    seen: Seen,
    metrics: Arc<Metrics>,
    snapshots: SnapshotHandle,
    shutdown: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Harness {
    async fn start() -> Harness {
        let keys = keys();
        let (upstream, seen) = start_upstream().await;
        let snapshots = snapshot::new_handle();
        snapshots.store(Some(Arc::new(snapshot::compile(3, &config(&keys, upstream)).unwrap())));
        let metrics = Arc::new(Metrics::new());
        let settings = Settings { token_cache_size: 1024, ..Settings::default() };
        let pipeline = Arc::new(Pipeline::new(snapshots.clone(), settings, Arc::clone(&metrics)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let options = ServerOptions { drain_timeout: Duration::from_secs(1), ..ServerOptions::default() };
        tokio::spawn(Server::new(options, pipeline, None).serve(listener, shutdown.clone()));
        Harness { keys, proxy, seen, metrics, snapshots, shutdown }
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response<Bytes> {
        let mut req = Request::get(format!("http://{}{path}", self.proxy));
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let res = client.request(req.body(Full::default()).unwrap()).await.unwrap();
        let (parts, body) = res.into_parts();
        Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    }

    async fn bearer(&self, path: &str, token: &str) -> Response<Bytes> {
        self.get(path, &[("authorization", &format!("Bearer {token}"))]).await
    }

    fn upstream_count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn last_seen(&self) -> HeaderMap {
        self.seen.lock().unwrap().last().cloned().unwrap()
    }

    fn render(&self) -> String {
        self.metrics.render(self.snapshots.load_full().as_deref())
    }
}

fn challenge(res: &Response<Bytes>) -> &str {
    res.headers()["www-authenticate"].to_str().unwrap()
}

// ------------------------------------------------------------------ scenarios

#[tokio::test]
async fn valid_rs256_and_es256_tokens_pass_and_the_token_is_not_forwarded() {
    let h = Harness::start().await;
    for token in [rs256(&h.keys, &claims()), es256(&h.keys, &claims())] {
        let before = h.upstream_count();
        let res = h.bearer("/req/x", &token).await;
        assert_eq!(res.status(), StatusCode::OK, "{:?}", res.body());
        assert_eq!(h.upstream_count(), before + 1);
        assert!(!h.last_seen().contains_key("authorization"), "the token is stripped");
        // again: answered from the token cache, same outcome
        let res = h.bearer("/req/x", &token).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert!(!h.last_seen().contains_key("authorization"));
    }
    assert_eq!(h.metrics.route("req").forwarded(StatusCode::OK), 4);
}

#[tokio::test]
async fn forward_token_sends_the_verified_token_unchanged() {
    let h = Harness::start().await;
    let token = rs256(&h.keys, &claims());
    let res = h.bearer("/fwd", &token).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(h.last_seen()["authorization"], format!("Bearer {token}").as_str());
}

#[tokio::test]
async fn no_token_is_a_plain_challenge() {
    let h = Harness::start().await;
    for headers in [&[][..], &[("authorization", "Basic YWxpY2U6cHc=")][..]] {
        let res = h.get("/req", headers).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(challenge(&res), r#"Bearer realm="portcullis""#, "no error= without a token (RFC 6750 3.1)");
    }
    assert_eq!(h.metrics.route("req").denied(Reason::TokenMissing), 2);
    assert_eq!(h.upstream_count(), 0);
}

#[tokio::test]
async fn bad_tokens_are_refused_before_the_upstream() {
    let h = Harness::start().await;
    let k = &h.keys;
    let good = rs256(k, &claims());
    let tampered = {
        let parts: Vec<&str> = good.split('.').collect();
        let evil = b64(with(claims(), json!({"sub": "admin"})).to_string());
        format!("{}.{evil}.{}", parts[0], parts[2])
    };
    let alg_none = format!("{}.{}.", b64(json!({"alg": "none", "typ": "JWT"}).to_string()), b64(claims().to_string()));
    let hs256_with_public_key = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(k.rsa_public_pem.as_bytes()),
    )
    .unwrap();
    let cases = [
        ("tampered", tampered, Reason::TokenSignatureInvalid),
        ("expired", rs256(k, &with(claims(), json!({"exp": now() - 3600, "iat": now() - 7200}))), Reason::TokenExpired),
        ("wrong iss", es256(k, &with(claims(), json!({"iss": "https://evil.test/"}))), Reason::TokenIssuerMismatch),
        ("wrong aud", rs256(k, &with(claims(), json!({"aud": "api://other"}))), Reason::TokenAudienceMismatch),
        ("alg none", alg_none, Reason::TokenAlgNone),
        ("hs256 with the public key", hs256_with_public_key, Reason::TokenAlgNotAllowed),
        ("garbage", "not-a-jwt".to_owned(), Reason::TokenMalformed),
    ];
    for (name, token, reason) in cases {
        for path in ["/req", "/opt"] {
            let res = h.bearer(path, &token).await;
            assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{name} on {path}");
            let c = challenge(&res);
            assert!(c.starts_with(r#"Bearer realm="portcullis", error="invalid_token", error_description=""#), "{c}");
            let body = String::from_utf8_lossy(res.body());
            assert!(!body.contains(&token) && !c.contains(&token), "the token is never echoed");
        }
        assert_eq!(h.metrics.route("req").denied(reason), 1, "{name}: {reason:?}");
    }
    let expired = h.bearer("/req", &cases_expired(k)).await;
    assert!(challenge(&expired).ends_with(r#"error_description="the access token expired""#));
    assert_eq!(h.upstream_count(), 0, "nothing reached the upstream");
    let text = h.render();
    assert!(text.contains(r#"route="req",status_class="4xx",reason="token_signature_invalid"} 1"#), "{text}");
}

fn cases_expired(k: &Keys) -> String {
    rs256(k, &with(claims(), json!({"exp": now() - 3600, "iat": now() - 7200})))
}

#[tokio::test]
async fn a_missing_scope_is_403_insufficient_scope() {
    let h = Harness::start().await;
    let res = h.bearer("/write", &rs256(&h.keys, &claims())).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(challenge(&res), r#"Bearer realm="portcullis", error="insufficient_scope""#);
    assert_eq!(h.metrics.route("write").denied(Reason::ScopeMissing), 1);
    assert_eq!(h.upstream_count(), 0);
    let res = h.bearer("/write", &rs256(&h.keys, &with(claims(), json!({"scope": "orders:write"})))).await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn claim_headers_are_set_from_the_token_and_client_copies_stripped() {
    let h = Harness::start().await;
    let token = es256(&h.keys, &claims());
    let auth = format!("Bearer {token}");
    let res = h
        .get("/req", &[("authorization", &auth), ("x-user", "mallory"), ("x-missing", "forged"), ("x-roles", "admin")])
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let seen = h.last_seen();
    assert_eq!(seen.get_all("x-user").iter().collect::<Vec<_>>(), ["alice"]);
    assert_eq!(seen["x-tenant"], "acme");
    assert_eq!(seen.get_all("x-roles").iter().collect::<Vec<_>>(), [r#"["a","b"]"#], "non-strings JSON-encoded");
    assert!(!seen.contains_key("x-missing"), "a client copy of a claim header never passes");

    // anonymous on an optional route: no claim headers, client copies still stripped
    let res = h.get("/opt", &[("x-user", "mallory")]).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(!h.last_seen().contains_key("x-user"));
}

#[tokio::test]
async fn optional_passes_anonymously_and_verifies_a_token_that_is_sent() {
    let h = Harness::start().await;
    let res = h.get("/opt", &[]).await;
    assert_eq!(res.status(), StatusCode::OK);
    let res = h.get("/opt", &[("authorization", "Basic YWxpY2U6cHc=")]).await;
    assert_eq!(res.status(), StatusCode::OK, "another scheme is no bearer token");
    assert!(!h.last_seen().contains_key("authorization"));
    let res = h.bearer("/opt", &rs256(&h.keys, &claims())).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(h.upstream_count(), 3);
}

#[tokio::test]
async fn an_opaque_policy_without_introspection_refuses_every_token() {
    let h = Harness::start().await;
    let res = h.bearer("/opaque", &rs256(&h.keys, &claims())).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(h.metrics.route("opaque").denied(Reason::TokenUnverified), 1);
    assert_eq!(h.upstream_count(), 0);
}

#[tokio::test]
async fn report_only_counts_the_denial_and_lets_the_request_through() {
    let h = Harness::start().await;
    let good = rs256(&h.keys, &claims());
    let tampered = format!("{}x", &good[..good.len() - 1]);
    let res = h.bearer("/report", &tampered).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(!h.last_seen().contains_key("authorization"), "an unverified token is not passed on");
    // a verified token without the scope
    let res = h.bearer("/report", &good).await;
    assert_eq!(res.status(), StatusCode::OK);
    let res = h.get("/report", &[]).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(h.upstream_count(), 3);
    let m = h.metrics.route("report");
    assert_eq!(m.would_deny(Reason::TokenSignatureInvalid), 1);
    assert_eq!(m.would_deny(Reason::ScopeMissing), 1);
    assert_eq!(m.would_deny(Reason::TokenMissing), 1);
    assert_eq!(m.denied(Reason::TokenSignatureInvalid), 0, "nothing was refused");
    let text = h.render();
    let report_line =
        r#"portcullis_proxy_report_only_denials_total{route="report",reason="token_signature_invalid"} 1"#;
    assert!(text.lines().any(|l| l == report_line), "{text}");
    // Each request counts once in requests_total: as forwarded, which is what it got.
    let requests: Vec<&str> =
        text.lines().filter(|l| l.starts_with(r#"portcullis_proxy_requests_total{route="report""#)).collect();
    assert_eq!(
        requests,
        [r#"portcullis_proxy_requests_total{route="report",status_class="2xx",reason="forwarded"} 3"#]
    );
}

// ------------------------------------------------------------------ compilation

#[test]
fn an_unusable_key_fails_the_version() {
    let k = keys();
    let upstream: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut m = config(&k, upstream);
    // a Key resource reusing an inline kid
    insert(
        &mut m,
        resource(pb::resource::Kind::Key(pb::Key {
            name: "dup".into(),
            issuer: "idp".into(),
            kid: "rsa-1".into(),
            jwk: with(k.ec_jwk.clone(), json!({"kid": "rsa-1"})).to_string(),
            ..Default::default()
        })),
    );
    let err = snapshot::compile(4, &m).unwrap_err();
    assert!(err.to_string().contains("same kid"), "{err}");

    // the same key under another kid is fine: the issuer now has three keys
    let mut m = config(&k, upstream);
    let jwk = with(k.ec_jwk.clone(), json!({"kid": "ec-2"}));
    insert(
        &mut m,
        resource(pb::resource::Kind::Key(pb::Key {
            name: "ec-2".into(),
            issuer: "idp".into(),
            kid: "ec-2".into(),
            jwk: jwk.to_string(),
            ..Default::default()
        })),
    );
    let snap = snapshot::compile(5, &m).unwrap();
    assert_eq!(snap.verifiers["idp"].keys().len(), 3);
    assert!(snap.route_verifiers.iter().all(|v| v.len() == 1));
}

#[tokio::test]
async fn a_shared_secret_issuer_verifies_hs256_with_the_secret_the_proxy_read() {
    let h = Harness::start().await;
    let hs256 = |secret: &[u8]| {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims(), &EncodingKey::from_secret(secret)).unwrap()
    };
    let res = h.bearer("/hmac", &hs256(HMAC_SECRET.as_bytes())).await;
    assert_eq!(res.status(), StatusCode::OK, "{:?}", res.body());
    let res = h.bearer("/hmac", &hs256(b"another-secret-of-at-least-32-bytes!!")).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(h.metrics.route("hmac").denied(Reason::TokenSignatureInvalid), 1);
    // An asymmetric token never passes a shared-secret issuer.
    let res = h.bearer("/hmac", &rs256(&h.keys, &claims())).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(h.upstream_count(), 1);
}

//! Key rotation end to end: a real control plane (embedded store, and etcd once) runs the
//! `KeyRotation` task against the test authorization server over real HTTP. Keys appear as Key
//! resources, follow the server's rotation, are retired after the grace period, survive the
//! server going down, and bad keys or a lying discovery document never get stored.
//! Proxies' unknown-kid reports on a raw config stream make it refetch, rate-limited.
//! Every wait is bounded and driven by the index's revision notifications, not by sleeps (the
//! rotation task's counters, which move without an index change, are polled with a deadline).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use portcullis_control_plane::keys::{FetchError, KeyRotation, KeyRotationConfig, KeyRotationHandle, RefetchOutcome};
use portcullis_control_plane::state::{Change, ConfigState};
use portcullis_proto::config::v1 as pb;
use portcullis_proto::discovery::v1 as ds;
use portcullis_proto::discovery::v1::config_request::Msg;
use portcullis_shared::Kind;
use portcullis_tests::auth_server::{AuthServer, Endpoint, weak_rsa_jwk};
use portcullis_tests::control_plane::TestControlPlane;
use portcullis_tests::etcd::EtcdServer;
use portcullis_tests::tls;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

enum Source {
    Discovery,
    JwksUri,
}

fn issuer(name: &str, server: &AuthServer, source: Source, refresh: Option<Duration>) -> pb::Resource {
    let source = match source {
        Source::Discovery => pb::key_source::Source::Discovery(server.issuer()),
        Source::JwksUri => pb::key_source::Source::JwksUri(server.jwks_uri()),
    };
    pb::Resource {
        kind: Some(pb::resource::Kind::Issuer(pb::Issuer {
            name: name.into(),
            issuer: server.issuer(),
            audiences: vec!["api://test".into()],
            algorithms: vec!["RS256".into(), "ES256".into()],
            keys: Some(pb::KeySource {
                source: Some(source),
                refresh_interval: refresh.map(portcullis_shared::duration::to_proto),
            }),
            ..Default::default()
        })),
    }
}

async fn put(state: &ConfigState, resource: pb::Resource) {
    state.write(vec![Change::Upsert { resource: Box::new(resource), expected_revision: 0 }], false).await.unwrap();
}

/// kid → retiring? for the stored keys of `issuer`.
fn keys_of(state: &ConfigState, issuer: &str) -> BTreeMap<String, bool> {
    let idx = state.index();
    idx.iter(Some(Kind::Key))
        .filter_map(|e| match &e.resource.kind {
            Some(pb::resource::Kind::Key(k)) if k.issuer == issuer => Some((k.kid.clone(), k.retire_at.is_some())),
            _ => None,
        })
        .collect()
}

/// Waits (bounded) until `check` holds, re-checking each time the index moves.
async fn wait_until(state: &ConfigState, what: &str, mut check: impl FnMut() -> bool) {
    let mut rx = state.subscribe();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("config state stopped while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

struct Rotation {
    handle: KeyRotationHandle,
    stop: CancellationToken,
}

impl Drop for Rotation {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn start_rotation(state: &Arc<ConfigState>, config: KeyRotationConfig) -> Rotation {
    let rotation = KeyRotation::new(Arc::clone(state), config).unwrap();
    let handle = rotation.handle();
    let stop = CancellationToken::new();
    tokio::spawn(rotation.run(stop.clone()));
    Rotation { handle, stop }
}

fn kids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

async fn discovery_rotate_retire(cp: &TestControlPlane) {
    let server = AuthServer::start().await;
    let state = cp.state();
    let config = KeyRotationConfig { grace: Duration::from_secs(2), ..Default::default() };
    let rotation = start_rotation(state, config);
    put(state, issuer("idp", &server, Source::Discovery, Some(Duration::from_secs(1)))).await;

    wait_until(state, "the initial keys", || {
        keys_of(state, "idp").keys().cloned().collect::<Vec<_>>() == kids(&["ec-1", "rsa-1"])
    })
    .await;
    assert!(server.requests(Endpoint::Discovery) >= 1);
    // the stored key is the server's public JWK, addressed by kid
    {
        let idx = state.index();
        let entry = idx.get(Kind::Key, "idp-rsa-1").expect("key resource named <issuer>-<kid>");
        let Some(pb::resource::Kind::Key(k)) = &entry.resource.kind else { panic!("not a key") };
        let stored: serde_json::Value = serde_json::from_str(&k.jwk).unwrap();
        assert_eq!(Some(stored), server.jwk("rsa-1"));
    }

    // rotation: the new key appears within one refresh, the old one stays
    let new_kid = server.rotate();
    wait_until(state, "the rotated key", || keys_of(state, "idp").contains_key(&new_kid)).await;
    assert_eq!(keys_of(state, "idp").get("rsa-1"), Some(&false));

    // the old key leaves the JWKS: retire_at first, deletion after the grace
    server.retire_old();
    wait_until(state, "retire_at on the old key", || keys_of(state, "idp").get("rsa-1") == Some(&true)).await;
    wait_until(state, "deletion of the old key", || !keys_of(state, "idp").contains_key("rsa-1")).await;
    let left = keys_of(state, "idp");
    assert_eq!(left.get(&new_kid), Some(&false));
    assert_eq!(left.get("ec-1"), Some(&false));
    assert_eq!(rotation.handle.stats().fetch_failures, 0);
}

#[tokio::test]
async fn discovery_keys_rotate_and_retire_embedded() {
    let cp = TestControlPlane::embedded().await;
    tokio::time::timeout(Duration::from_secs(60), discovery_rotate_retire(&cp)).await.expect("scenario timed out");
}

#[tokio::test]
async fn discovery_keys_rotate_and_retire_etcd() {
    let etcd = EtcdServer::start().await.expect("start etcd");
    let cp = TestControlPlane::etcd(&etcd).await;
    tokio::time::timeout(Duration::from_secs(60), discovery_rotate_retire(&cp)).await.expect("scenario timed out");
}

#[tokio::test]
async fn server_down_keeps_keys_and_counts_the_failure() {
    let cp = TestControlPlane::embedded().await;
    let server = AuthServer::start().await;
    let state = cp.state();
    let config = KeyRotationConfig { refetch_min_interval: Duration::ZERO, ..Default::default() };
    let rotation = start_rotation(state, config);
    put(state, issuer("idp", &server, Source::JwksUri, None)).await;
    wait_until(state, "the initial keys", || keys_of(state, "idp").len() == 2).await;

    server.set_down(true);
    server.retire_old();
    let outcome = tokio::time::timeout(WAIT, rotation.handle.refetch("idp")).await.unwrap();
    assert!(matches!(outcome, RefetchOutcome::Failed(FetchError::Status { status: 503, .. })), "{outcome:?}");
    assert!(rotation.handle.stats().fetch_failures >= 1);
    assert_eq!(keys_of(state, "idp"), BTreeMap::from([("ec-1".into(), false), ("rsa-1".into(), false)]));

    // slow beyond the timeout: also a failure, keys kept
    server.set_down(false);
    server.set_delay(Duration::from_secs(3));
    let rotation_fast = start_rotation(
        state,
        KeyRotationConfig {
            refetch_min_interval: Duration::ZERO,
            fetch_timeout: Duration::from_millis(300),
            ..Default::default()
        },
    );
    let outcome = tokio::time::timeout(WAIT, rotation_fast.handle.refetch("idp")).await.unwrap();
    assert!(matches!(outcome, RefetchOutcome::Failed(FetchError::Timeout { .. })), "{outcome:?}");
    assert_eq!(keys_of(state, "idp").len(), 2);

    // back up: the next fetch works again
    server.set_delay(Duration::ZERO);
    let new_kid = server.rotate();
    let outcome = tokio::time::timeout(WAIT, rotation.handle.refetch("idp")).await.unwrap();
    assert!(matches!(outcome, RefetchOutcome::Fetched), "{outcome:?}");
    assert!(keys_of(state, "idp").contains_key(&new_kid));
}

#[tokio::test]
async fn private_and_weak_keys_are_skipped() {
    let cp = TestControlPlane::embedded().await;
    let server = AuthServer::start().await;
    let state = cp.state();
    let mut private = server.jwk("ec-1").unwrap();
    private["kid"] = json!("leaky");
    private["d"] = json!("AAAA");
    server.set_extra_jwks(vec![private, weak_rsa_jwk("weak-1024")]);
    let rotation = start_rotation(state, KeyRotationConfig::default());
    put(state, issuer("idp", &server, Source::JwksUri, None)).await;
    wait_until(state, "the good keys", || keys_of(state, "idp").len() == 2).await;
    assert_eq!(keys_of(state, "idp").keys().cloned().collect::<Vec<_>>(), kids(&["ec-1", "rsa-1"]));
    assert_eq!(rotation.handle.stats().keys_rejected, 2);
}

#[tokio::test]
async fn refetch_is_rate_limited_per_issuer() {
    let cp = TestControlPlane::embedded().await;
    let server = AuthServer::start().await;
    let state = cp.state();
    let rotation = start_rotation(state, KeyRotationConfig::default());
    put(state, issuer("idp", &server, Source::JwksUri, None)).await;
    wait_until(state, "the initial keys", || keys_of(state, "idp").len() == 2).await;
    let before = server.requests(Endpoint::Jwks);

    let first = tokio::time::timeout(WAIT, rotation.handle.refetch("idp")).await.unwrap();
    let second = tokio::time::timeout(WAIT, rotation.handle.refetch("idp")).await.unwrap();
    assert!(matches!(first, RefetchOutcome::Fetched), "{first:?}");
    assert!(matches!(second, RefetchOutcome::RateLimited), "{second:?}");
    assert_eq!(server.requests(Endpoint::Jwks), before + 1);
    assert_eq!(rotation.handle.stats().refetches_rate_limited, 1);

    let unknown = tokio::time::timeout(WAIT, rotation.handle.refetch("nobody")).await.unwrap();
    assert!(matches!(unknown, RefetchOutcome::UnknownIssuer), "{unknown:?}");
}

#[tokio::test]
async fn discovery_with_another_issuer_writes_no_keys() {
    let cp = TestControlPlane::embedded().await;
    let server = AuthServer::start().await;
    server.set_discovery_issuer(Some("http://evil.example/".into()));
    let state = cp.state();
    let config = KeyRotationConfig { refetch_min_interval: Duration::ZERO, ..Default::default() };
    let rotation = start_rotation(state, config);
    put(state, issuer("idp", &server, Source::Discovery, None)).await;

    let outcome = tokio::time::timeout(WAIT, rotation.handle.refetch("idp")).await.unwrap();
    assert!(matches!(outcome, RefetchOutcome::Failed(FetchError::IssuerMismatch { .. })), "{outcome:?}");
    assert!(keys_of(state, "idp").is_empty());
    assert_eq!(server.requests(Endpoint::Jwks), 0);
    assert!(rotation.handle.stats().fetch_failures >= 1);
}

/// An https IdP with a private CA: nothing is fetched until the control plane trusts that CA
/// (`--issuer-ca-file`); then discovery and the JWKS are fetched over verified TLS.
#[tokio::test]
async fn keys_are_fetched_over_https_from_an_issuer_with_a_private_ca() {
    let cp = TestControlPlane::embedded().await;
    let server = AuthServer::start_tls().await;
    assert!(server.issuer().starts_with("https://127.0.0.1:"), "{}", server.issuer());
    let state = cp.state();
    put(state, issuer("idp", &server, Source::Discovery, None)).await;

    // the system roots and an unrelated CA do not trust the IdP's certificate
    for ca in [None, Some(tls::other_ca_file())] {
        let config = KeyRotationConfig {
            refetch_min_interval: Duration::ZERO,
            issuer_ca_file: ca.clone(),
            ..Default::default()
        };
        let rotation = start_rotation(state, config);
        let outcome = tokio::time::timeout(WAIT, rotation.handle.refetch("idp")).await.unwrap();
        let RefetchOutcome::Failed(FetchError::Request { url, message }) = &outcome else {
            panic!("{ca:?}: {outcome:?}")
        };
        assert!(url.starts_with("https://127.0.0.1:") && url.ends_with("/.well-known/openid-configuration"), "{url}");
        assert!(message.contains("UnknownIssuer"), "{ca:?}: {message}");
        assert!(keys_of(state, "idp").is_empty());
    }
    assert_eq!(server.requests(Endpoint::Discovery), 0, "no request was sent over an unverified connection");

    let config = KeyRotationConfig { issuer_ca_file: Some(tls::ca_file()), ..Default::default() };
    let rotation = start_rotation(state, config);
    wait_until(state, "the keys fetched over https", || {
        keys_of(state, "idp").keys().cloned().collect::<Vec<_>>() == kids(&["ec-1", "rsa-1"])
    })
    .await;
    assert!(server.requests(Endpoint::Discovery) >= 1 && server.requests(Endpoint::Jwks) >= 1);
    assert_eq!(rotation.handle.stats().fetch_failures, 0);
}

#[tokio::test]
async fn an_unusable_issuer_ca_file_is_refused_at_start() {
    let cp = TestControlPlane::embedded().await;
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    for (file, expected) in [
        (dir.path().join("missing.pem"), "reading CA certificates from"),
        (empty, "holds no usable PEM CA certificate"),
    ] {
        let config = KeyRotationConfig { issuer_ca_file: Some(file.clone()), ..Default::default() };
        let Err(e) = KeyRotation::new(Arc::clone(cp.state()), config) else { panic!("{file:?} accepted") };
        let message = e.to_string();
        assert!(message.contains(expected) && message.contains(&file.display().to_string()), "{message}");
    }
}

#[tokio::test]
async fn token_and_introspection_endpoints_work() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let server = AuthServer::start().await;
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let post = |path: &str, body: String, extra: Vec<(&'static str, String)>| {
        let mut b = hyper::Request::post(format!("{}{path}", server.issuer()));
        for (k, v) in extra {
            b = b.header(k, v);
        }
        b.body(Full::new(bytes::Bytes::from(body))).unwrap()
    };
    let r = client
        .request(post("/token", json!({"sub": "alice", "aud": "api://test", "exp_in": 60}).to_string(), vec![]))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let token = body["access_token"].as_str().unwrap();
    assert_eq!(token.split('.').count(), 3);
    assert_eq!(server.mint(json!({"sub": "bob"})).split('.').count(), 3);

    use base64::Engine;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            portcullis_tests::auth_server::CLIENT_ID,
            portcullis_tests::auth_server::CLIENT_SECRET
        ))
    );
    let opaque = server.issue_opaque(json!({"sub": "carol", "scope": "orders:read"}));
    let form = format!("token={opaque}");
    let r = client.request(post("/introspect", form.clone(), vec![("authorization", basic.clone())])).await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["active"], true);
    assert_eq!(body["sub"], "carol");
    let r = client
        .request(post(
            "/introspect",
            form.clone(),
            vec![("authorization", basic.clone()), ("accept", "application/token-introspection+jwt".into())],
        ))
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "application/token-introspection+jwt");
    let jwt = String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let payload = jwt.split('.').nth(1).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    assert_eq!(claims["token_introspection"]["active"], true);
    server.revoke_opaque(&opaque);
    let r = client.request(post("/introspect", form.clone(), vec![("authorization", basic)])).await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body, json!({"active": false}));
    let r = client.request(post("/introspect", form, vec![])).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(server.requests(Endpoint::Introspect), 4);
}

// ---------------------------------------------------------------- unknown kids reported by proxies

/// A raw config stream as a proxy would open it: hello, then the first response acknowledged.
struct RawStream {
    tx: tokio::sync::mpsc::Sender<ds::ConfigRequest>,
    inbound: tonic::Streaming<ds::ConfigResponse>,
}

impl RawStream {
    async fn open(cp: &TestControlPlane) -> RawStream {
        let mut client = ds::discovery_service_client::DiscoveryServiceClient::connect(cp.proxy_url()).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let hello = ds::ProxyHello { id: "raw-proxy".into(), zone: "z".into(), build: "raw".into(), version: 0 };
        tx.send(ds::ConfigRequest { msg: Some(Msg::Hello(hello)) }).await.unwrap();
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        request.metadata_mut().insert("authorization", format!("Bearer {}", cp.token()).parse().unwrap());
        let inbound = client.stream_config(request).await.unwrap().into_inner();
        let mut stream = RawStream { tx, inbound };
        stream.next_and_ack().await;
        stream
    }

    /// The next response (within [`WAIT`]), acknowledged.
    async fn next_and_ack(&mut self) -> ds::ConfigResponse {
        let response = tokio::time::timeout(WAIT, self.inbound.message()).await.unwrap().unwrap().unwrap();
        self.send(Msg::Ack(ds::Ack { version: response.version })).await;
        response
    }

    async fn send(&self, msg: Msg) {
        self.tx.send(ds::ConfigRequest { msg: Some(msg) }).await.unwrap();
    }

    async fn unknown_kid(&self, issuer: &str, kid: &str) {
        self.send(Msg::UnknownKid(ds::UnknownKid { issuer: issuer.into(), kid: kid.into() })).await;
    }
}

/// Polls `check` (bounded by [`WAIT`]): for counters of the rotation task, which move without
/// an index change.
async fn poll_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kid_reports_on_the_config_stream_trigger_rate_limited_refetches() {
    // Explicit: one on-demand fetch per issuer per hour, so the second report is refused for sure.
    let config = KeyRotationConfig { refetch_min_interval: Duration::from_secs(3600), ..Default::default() };
    let cp = TestControlPlane::embedded_with_key_rotation(config).await;
    let keys = cp.key_rotation().expect("key rotation runs").clone();
    let server = AuthServer::start().await;
    let state = cp.state();
    // Refreshed hourly: within this test only a report can make it fetch again.
    put(state, issuer("idp", &server, Source::JwksUri, Some(Duration::from_secs(3600)))).await;
    let mut inline = issuer("static", &server, Source::JwksUri, None);
    if let Some(pb::resource::Kind::Issuer(i)) = &mut inline.kind {
        i.issuer = "http://static.example/".into();
        i.keys = Some(pb::KeySource {
            source: Some(pb::key_source::Source::InlineJwks(json!({"keys": [server.jwk("ec-1")]}).to_string())),
            refresh_interval: None,
        });
    }
    put(state, inline).await;
    wait_until(state, "the initial keys", || keys_of(state, "idp").len() == 2).await;
    let mut stream = RawStream::open(&cp).await;
    let before = server.requests(Endpoint::Jwks);
    assert_eq!(before, 1);

    // the issuer rotates; a proxy reports the new kid: one fetch, and the key reaches the proxy
    let new_kid = server.rotate();
    stream.unknown_kid("idp", &new_kid).await;
    wait_until(state, "the rotated key", || keys_of(state, "idp").contains_key(&new_kid)).await;
    assert_eq!(server.requests(Endpoint::Jwks), before + 1);
    let response = stream.next_and_ack().await;
    let upserted: Vec<String> =
        response.upserts.iter().filter_map(|u| Kind::of(u).map(|(_, name)| name.to_owned())).collect();
    assert_eq!(upserted, [format!("idp-{new_kid}")], "the new key is streamed as a delta");

    // ignored: unknown issuers, inline keys, malformed kids; then a second report of idp within
    // the window is rate-limited. The stream handles messages in order, so once that one is
    // counted, the others have been seen.
    stream.unknown_kid("nobody", "k").await;
    stream.unknown_kid("static", "k").await;
    stream.unknown_kid("idp", "").await;
    stream.unknown_kid("idp", &"x".repeat(300)).await;
    stream.unknown_kid("idp", "random-\u{1b}[31m-kid").await;
    poll_until("the rate-limited refetch", || keys.stats().refetches_rate_limited == 1).await;
    assert_eq!(server.requests(Endpoint::Jwks), before + 1, "no fetch beyond the first report");
    assert_eq!(keys.stats().fetches, 2, "the initial fetch and the one report");

    // the stream carries on: the next change arrives and is acknowledged
    put(state, issuer("idp-2", &server, Source::JwksUri, Some(Duration::from_secs(3600)))).await;
    let response = stream.next_and_ack().await;
    assert!(!response.full && !response.upserts.is_empty(), "{response:?}");
    let list = cp.registry().list();
    let raw = list.iter().find(|p| p.id == "raw-proxy").expect("the raw proxy is listed");
    assert!(raw.connected, "{raw:?}");
}

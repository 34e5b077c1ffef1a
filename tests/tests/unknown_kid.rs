//! Unknown-kid refetch, whole deployment: a [`Sandbox`] (real etcd, the control plane and a proxy
//! as real processes) and the test authorization server. The issuer's keys are refreshed only
//! hourly, so when the server rotates its key, a token signed with the new key is refused until
//! the proxy reports the unknown kid, the control plane refetches and the new key arrives in a
//! new config version; then the very same token passes. A flood of tokens with random kids costs
//! the issuer a bounded number of JWKS fetches (the control plane's refetch rate limit) and the
//! control plane a bounded number of reports (the proxy's one-per-second de-duplication).
//!
//! Waiting is bounded polling, never a bare sleep.

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use portcullis_proto::config::v1 as pb;
use portcullis_tests::auth_server::{AuthServer, Endpoint};
use portcullis_tests::resources::{exact_route, required_policy, upstream};
use portcullis_tests::sandbox::{HttpResponse, Sandbox, SandboxOptions};
use serde_json::{Value, json};

/// The control plane's `--key-refetch-min-interval` in these tests: explicit, because the bounds
/// below are derived from it.
const REFETCH_MIN_INTERVAL: Duration = Duration::from_secs(2);
/// The proxy's de-duplication interval (`kid_reports::DEFAULT_INTERVAL`).
const REPORT_INTERVAL: Duration = Duration::from_secs(1);
const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);
const AUDIENCE: &str = "api://orders";

async fn sandbox() -> Sandbox {
    Sandbox::with(SandboxOptions { key_refetch_min_interval: Some(REFETCH_MIN_INTERVAL), ..SandboxOptions::default() })
        .await
}

/// An issuer whose keys come from the server's `jwks_uri`, refreshed only every hour.
fn issuer(server: &AuthServer) -> pb::Resource {
    pb::Resource {
        kind: Some(pb::resource::Kind::Issuer(pb::Issuer {
            name: "idp".into(),
            issuer: server.issuer(),
            audiences: vec![AUDIENCE.into()],
            algorithms: vec!["RS256".into()],
            keys: Some(pb::KeySource {
                source: Some(pb::key_source::Source::JwksUri(server.jwks_uri())),
                refresh_interval: Some(portcullis_shared::duration::to_proto(Duration::from_secs(3600))),
            }),
            ..Default::default()
        })),
    }
}

/// `GET /orders` on `idp`'s policy; waits until the proxy holds the issuer's RSA key (the
/// control plane fetched it on its own when the issuer appeared) before any token is sent, so
/// no report is made before the scenario starts.
async fn configured(sb: &Sandbox, server: &AuthServer) {
    let resources = vec![
        upstream("orders", &sb.upstream().endpoint()),
        issuer(server),
        required_policy("signed-in", "idp"),
        exact_route("orders", "/orders", "orders", "signed-in"),
    ];
    // One Key resource: the server's ES256 key is not among the issuer's algorithms.
    let with_keys = resources.len() as u64 + 1;
    sb.apply(resources).await;
    eventually(
        sb,
        "the issuer's first keys at the proxy",
        || sb.proxy_config(0),
        |c| c.as_ref().and_then(|c| c["resources"].as_u64()) == Some(with_keys),
    )
    .await;
    assert_eq!(server.requests(Endpoint::Jwks), 1);
    assert_eq!(get(sb, &server.mint(claims())).await.status, StatusCode::OK);
}

fn claims() -> Value {
    json!({"sub": "alice", "aud": AUDIENCE})
}

async fn get(sb: &Sandbox, token: &str) -> HttpResponse {
    let request = Request::get(format!("{}/orders", sb.proxy_url(0)))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::<Bytes>::default())
        .expect("request");
    sb.send(request).await.unwrap_or_else(|e| panic!("GET /orders: {e}\n{}", sb.proxy_log_tail(0)))
}

/// Calls `probe` until `done` holds for its answer; panics after [`WAIT`] with the logs.
async fn eventually<T, Fut>(sb: &Sandbox, what: &str, mut probe: impl FnMut() -> Fut, done: impl Fn(&T) -> bool) -> T
where
    Fut: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let value = probe().await;
        if done(&value) {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", sb.proxy_log_tail(0));
        tokio::time::sleep(POLL).await;
    }
}

/// `token` with its header's `kid` replaced (the signature no longer matters: no key has that
/// kid, so the proxy never gets to it).
fn with_kid(token: &str, kid: &str) -> String {
    let (header, rest) = token.split_once('.').expect("a JWT");
    let mut header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).expect("base64url")).expect("json");
    header["kid"] = json!(kid);
    format!("{}.{rest}", URL_SAFE_NO_PAD.encode(header.to_string()))
}

/// `portcullis_proxy_unknown_kid_reports_total{outcome}` from proxy 0's `/metrics`.
async fn reports(sb: &Sandbox, outcome: &str) -> u64 {
    let url = format!("{}/metrics", sb.proxy_admin_url(0));
    let r = sb.send(Request::get(&url).body(Full::default()).expect("request")).await.expect("GET /metrics");
    let prefix = format!("portcullis_proxy_unknown_kid_reports_total{{outcome=\"{outcome}\"}} ");
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} in /metrics:\n{}", r.text()))
}

fn assert_unauthorized(r: &HttpResponse) {
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    let challenge = r.header("www-authenticate").unwrap_or_default();
    assert!(challenge.contains("invalid_token"), "{challenge}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_a_rotated_key_passes_once_the_proxy_reported_its_kid() {
    let server = AuthServer::start().await;
    let sb = sandbox().await;
    configured(&sb, &server).await;
    let fetched = server.requests(Endpoint::Jwks);
    assert_eq!(reports(&sb, "sent").await, 0);

    server.rotate();
    let token = server.mint(claims());
    // The proxy does not know the key yet and never asks the issuer itself: 401.
    assert_unauthorized(&get(&sb, &token).await);
    // The control plane refetches as soon as the report reaches it, which may be before this
    // test reads the count: a fetch seen now must follow a report. The proxy counts a report
    // when it hands it to the stream, before the control plane can act on it, so reading the
    // fetches first and the reports second cannot count a refetch without its report.
    let since = server.requests(Endpoint::Jwks) - fetched;
    let reported = reports(&sb, "sent").await;
    assert!(since <= reported, "the request path fetched nothing: {since} fetches, {reported} reports");

    // ... but it reported the kid: the control plane refetches, the key arrives, the same token passes.
    let started = Instant::now();
    let r = eventually(&sb, "the rotated key", || get(&sb, &token), |r| r.status != StatusCode::UNAUTHORIZED).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(server.requests(Endpoint::Jwks) > fetched, "the control plane refetched");
    assert!(reports(&sb, "sent").await >= 1);
    assert_eq!(reports(&sb, "dropped").await, 0);
    let list = sb.list_proxies().await;
    assert!(list.proxies.iter().all(|p| p.connected), "{list:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_random_kids_fetches_the_jwks_a_bounded_number_of_times() {
    let server = AuthServer::start().await;
    let sb = sandbox().await;
    configured(&sb, &server).await;
    let token = server.mint(claims());
    let fetched = server.requests(Endpoint::Jwks);
    assert_eq!((reports(&sb, "sent").await, reports(&sb, "deduplicated").await), (0, 0));

    // Random kids, as fast as one client can send them, for a little longer than one refetch window.
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < REFETCH_MIN_INTERVAL + Duration::from_millis(500) {
        assert_unauthorized(&get(&sb, &with_kid(&token, &format!("random-{sent}"))).await);
        sent += 1;
    }
    // At most one on-demand fetch per window of the control plane's rate limit, from the first
    // report on; at least one, or the flood never reached the control plane. (Counted before the
    // time is taken: the bounds hold at any moment.)
    let refetches = server.requests(Endpoint::Jwks) - fetched;
    let reports_sent = reports(&sb, "sent").await;
    let deduplicated = reports(&sb, "deduplicated").await;
    let elapsed = started.elapsed();
    let windows = (elapsed.as_millis() / REFETCH_MIN_INTERVAL.as_millis()) as u64;
    eprintln!(
        "{sent} random kids in {elapsed:?}: {refetches} JWKS fetches, {reports_sent} reports sent, {deduplicated} de-duplicated"
    );
    assert!(refetches >= 1, "no refetch at all");
    assert!(refetches <= 1 + windows, "{refetches} JWKS fetches in {elapsed:?} for {sent} random kids");

    // The proxy itself sent at most one report per second; everything else was de-duplicated.
    let attempts = 1 + (elapsed.as_millis() / REPORT_INTERVAL.as_millis()) as u64;
    assert!((1..=attempts).contains(&reports_sent), "{reports_sent} reports in {elapsed:?}");
    assert!(sent > 10 * attempts, "the flood was too small to mean anything: {sent} requests");
    assert!(deduplicated >= sent - attempts, "{deduplicated} of {sent} de-duplicated");

    // The config stream survived the flood, and real tokens still pass.
    let list = sb.list_proxies().await;
    assert!(list.proxies.iter().all(|p| p.connected && p.lag == 0), "{list:#?}");
    assert_eq!(get(&sb, &token).await.status, StatusCode::OK);
}

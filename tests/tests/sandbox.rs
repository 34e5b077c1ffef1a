//! Whole-deployment scenarios on a [`Sandbox`]: a real etcd, the control plane and the proxies as
//! real processes, real HTTP through the proxies to a recording upstream. Each test reads as what
//! an operator or a client would observe: a change reaches every proxy and is acknowledged; the
//! control plane can die, be away while a proxy restarts, and come back; a proxy drains on
//! SIGTERM without failing a request it accepted; and what the upstream receives is normalized
//! and carries the forwarding headers, whatever the client sent.
//!
//! Waiting is bounded polling; every loop has a fixed number of rounds.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1;
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_proto::admin::v1 as api;
use portcullis_proto::config::v1 as pb;
use portcullis_tests::bin_path;
use portcullis_tests::resources::{exact_route, public_policy, route, upstream};
use portcullis_tests::sandbox::{Sandbox, SandboxOptions, raw_request};
use tokio::net::TcpStream;

/// The upstream `orders` (the sandbox's recording upstream), a public policy, and the prefix
/// route `orders` on `/orders`.
fn base_config(sb: &Sandbox) -> Vec<pb::Resource> {
    vec![
        upstream("orders", &sb.upstream().endpoint()),
        public_policy("open", "sandbox scenarios"),
        route("orders", pb::path_match::Kind::Prefix("/orders".into()), "orders", "open"),
    ]
}

/// Applies the base config and waits until every proxy serves it.
async fn configured(sb: &Sandbox) -> i64 {
    let version = sb.apply(base_config(sb)).await;
    sb.wait_all_acked(version).await;
    version
}

fn assert_problem(status: StatusCode, content_type: Option<&str>, body: &serde_json::Value, expected: u16) {
    assert_eq!(status.as_u16(), expected, "{body}");
    assert_eq!(content_type, Some("application/problem+json"), "{body}");
    assert_eq!(body["status"], expected, "{body}");
    assert!(body["request_id"].as_str().is_some_and(|id| !id.is_empty()), "{body}");
}

// ------------------------------------------------------------------ (a) propagation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_and_its_deletion_reach_all_three_proxies_and_are_acknowledged() {
    let sb = Sandbox::start(3).await;
    let v1 = sb.apply(base_config(&sb)).await;
    let list = sb.wait_all_acked(v1).await;
    assert_eq!(list.config_version, v1);
    assert_eq!(list.proxies.len(), 3, "{list:#?}");
    for p in &list.proxies {
        assert!(p.connected, "{p:?}");
        assert_eq!((p.acked_version, p.lag), (v1, 0), "{p:?}");
        assert!(p.last_nack_error.is_empty(), "{p:?}");
    }

    for i in 0..3 {
        let r = sb.get(i, &format!("/orders/42?proxy={i}")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let echo = r.json();
        assert_eq!(echo["method"], "GET");
        assert_eq!(echo["path"], format!("/orders/42?proxy={i}"));
    }
    let seen: Vec<String> = sb.upstream().requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(seen, ["/orders/42?proxy=0", "/orders/42?proxy=1", "/orders/42?proxy=2"]);

    let v2 = sb.delete(api::Kind::Route, "orders").await;
    assert!(v2 > v1);
    let list = sb.wait_all_acked(v2).await;
    assert!(list.proxies.iter().all(|p| p.acked_version == v2 && p.lag == 0), "{list:#?}");
    for i in 0..3 {
        let r = sb.get(i, "/orders/42").await;
        assert_problem(r.status, r.header("content-type"), &r.json(), 404);
    }
    assert_eq!(sb.upstream().request_count(), 3, "nothing forwarded once the route is gone");

    // What an operator sees: `portctl proxies` lists the three at v2 with no lag.
    let out = tokio::process::Command::new(bin_path("portctl"))
        .args(["--server", &sb.admin_url(), "proxies"])
        .output()
        .await
        .expect("run portctl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for i in 0..3 {
        let row = stdout.lines().find(|l| l.starts_with(sb.proxy_id(i))).unwrap_or_else(|| panic!("{stdout}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert!(cols.contains(&v2.to_string().as_str()) && cols.contains(&"0") && cols.contains(&"yes"), "{row}");
    }
}

// ------------------------------------------------------------------ (b) control plane killed

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_continues_without_errors_when_the_control_plane_is_killed() {
    const REQUESTS: usize = 500;
    let mut sb = Sandbox::start(2).await;
    configured(&sb).await;

    // Requests alternate between the two proxies on keep-alive connections; the control plane
    // is killed (SIGKILL) while they flow.
    let urls: Vec<String> = (0..2).map(|i| sb.proxy_url(i)).collect();
    let traffic = tokio::spawn(async move {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let mut failures = Vec::new();
        for n in 0..REQUESTS {
            let url = format!("{}/orders/{n}", urls[n % 2]);
            let outcome = tokio::time::timeout(Duration::from_secs(10), async {
                let r = client.request(Request::get(&url).body(Empty::new()).unwrap()).await?;
                let status = r.status();
                r.into_body().collect().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(status)
            })
            .await;
            match outcome {
                Ok(Ok(StatusCode::OK)) => {}
                other => failures.push(format!("{url}: {other:?}")),
            }
        }
        failures
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while sb.upstream().request_count() < REQUESTS / 5 {
        assert!(Instant::now() < deadline, "traffic did not start");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    sb.kill_control_plane();
    let killed_at = sb.upstream().request_count();
    let failures = traffic.await.unwrap();
    assert!(failures.is_empty(), "{} of {REQUESTS} failed: {failures:#?}", failures.len());
    assert_eq!(sb.upstream().request_count(), REQUESTS);
    assert!(killed_at < REQUESTS, "the control plane was killed while requests flowed ({killed_at} before)");
    assert!(!sb.admin_reachable().await, "the control plane is gone");
    for i in 0..2 {
        assert!(sb.is_ready(i).await, "{} stays ready", sb.proxy_id(i));
    }
}

// ------------------------------------------------------------------ (c) last-known-good

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_restarted_while_the_control_plane_is_down_serves_its_last_known_good_config() {
    let mut sb = Sandbox::start(1).await;
    let version = configured(&sb).await;
    sb.kill_control_plane();

    let exit = sb.stop_proxy(0).await;
    assert!(exit.success(), "drained and exited cleanly: {exit}");
    sb.restart_proxy(0).await;
    sb.wait_ready(0).await;
    assert_eq!(sb.proxy_version(0).await, Some(version), "serves the cached version");
    assert!(!sb.admin_reachable().await, "still no control plane");
    let r = sb.get(0, "/orders/after-restart").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["path"], "/orders/after-restart");

    // When the control plane is back, the proxy reconnects and acknowledges the same version.
    sb.start_control_plane().await;
    sb.wait_all_acked(version).await;
}

// ------------------------------------------------------------------ (d) control plane restarted

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_reconnect_to_a_restarted_control_plane_and_take_the_next_change() {
    let mut sb = Sandbox::start(2).await;
    let v1 = configured(&sb).await;
    sb.kill_control_plane();
    sb.start_control_plane().await;
    // The new process has an empty registry: both proxies must come back on their own.
    sb.wait_all_acked(v1).await;

    let v2 = sb.apply(vec![exact_route("fresh", "/fresh", "orders", "open")]).await;
    assert!(v2 > v1);
    let list = sb.wait_all_acked(v2).await;
    assert_eq!(list.config_version, v2);
    for i in 0..2 {
        let r = sb.get(i, "/fresh").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json()["path"], "/fresh");
    }
}

// ------------------------------------------------------------------ (e) SIGTERM under load

/// One request of a drain client: which one, when it ended, and how.
#[derive(Debug)]
struct Outcome {
    key: String,
    done_at: Instant,
    result: Result<StatusCode, String>,
}

/// A keep-alive client: up to `rounds` sequential requests on one connection, reconnecting after
/// a failure; stops when the proxy no longer accepts connections.
async fn drain_client(addr: SocketAddr, client: usize, rounds: usize) -> Vec<Outcome> {
    async fn connect(addr: SocketAddr) -> Option<http1::SendRequest<Empty<Bytes>>> {
        let stream = TcpStream::connect(addr).await.ok()?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.ok()?;
        tokio::spawn(connection);
        Some(sender)
    }
    let mut outcomes = Vec::new();
    let mut sender = connect(addr).await.expect("first connection");
    for n in 0..rounds {
        let key = format!("c={client}&n={n}");
        let request = Request::get(format!("/orders/drain?{key}")).header("host", addr.to_string());
        let result = async {
            let key = &key;
            sender.ready().await.map_err(|e| format!("not sent: {e}"))?;
            let response = sender.send_request(request.body(Empty::new()).unwrap()).await.map_err(|e| e.to_string())?;
            let status = response.status();
            let body = response.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
            // A complete answer is the upstream's echo of this very request.
            let echo: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("body {body:?}: {e}"))?;
            if status == StatusCode::OK && echo["path"] != format!("/orders/drain?{key}") {
                return Err(format!("the echo of another request: {echo}"));
            }
            Ok(status)
        };
        let result = tokio::time::timeout(Duration::from_secs(15), result).await.unwrap_or_else(|_| Err("hung".into()));
        let failed = result.is_err();
        outcomes.push(Outcome { key, done_at: Instant::now(), result });
        if failed {
            match connect(addr).await {
                Some(s) => sender = s,
                None => break, // the listener is closed: the proxy is draining
            }
        }
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_completes_every_accepted_request() {
    const CLIENTS: usize = 4;
    const ROUNDS: usize = 25;
    let mut sb = Sandbox::with(SandboxOptions { proxies: 1, ..SandboxOptions::default() }).await;
    configured(&sb).await;
    sb.upstream().set_delay(Duration::from_millis(200));
    let addr = sb.proxy_addr(0);
    let clients: Vec<_> = (0..CLIENTS).map(|c| tokio::spawn(drain_client(addr, c, ROUNDS))).collect();

    // Two rounds in, with every client's request held by the slow upstream: SIGTERM.
    let deadline = Instant::now() + Duration::from_secs(20);
    while sb.upstream().request_count() < 2 * CLIENTS || sb.upstream().in_flight() < CLIENTS {
        assert!(Instant::now() < deadline, "load did not build up");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let sigterm_at = Instant::now();
    let exit = sb.stop_proxy(0).await;
    assert!(exit.success(), "the proxy exits 0 after draining: {exit}\n{}", sb.proxy_log_tail(0));

    let mut outcomes = Vec::new();
    for c in clients {
        outcomes.extend(c.await.unwrap());
    }
    let by_key: HashMap<&str, &Outcome> = outcomes.iter().map(|o| (o.key.as_str(), o)).collect();
    let received: Vec<_> = sb.upstream().requests_to("/orders/drain");
    let received_keys: HashSet<&str> = received.iter().map(|r| r.uri.split_once('?').unwrap().1).collect();

    // Every request the proxy accepted and forwarded was answered 200 in full.
    for key in &received_keys {
        let o = by_key.get(key).unwrap_or_else(|| panic!("{key} reached the upstream but no client sent it"));
        assert_eq!(o.result, Ok(StatusCode::OK), "{key} was accepted, then failed: {o:?}");
    }
    // No response other than 200; failures only after SIGTERM, for requests never accepted.
    for o in &outcomes {
        match &o.result {
            Ok(status) => assert_eq!(*status, StatusCode::OK, "{o:?}"),
            Err(_) => {
                assert!(o.done_at > sigterm_at, "failed before SIGTERM: {o:?}");
                assert!(!received_keys.contains(o.key.as_str()), "{o:?}");
            }
        }
    }
    // The drain was exercised: requests held upstream at SIGTERM completed after it.
    let drained = received
        .iter()
        .filter(|r| r.received_at < sigterm_at)
        .filter(|r| by_key[r.uri.split_once('?').unwrap().1].done_at > sigterm_at)
        .count();
    assert!(drained >= 1, "no request was in flight at SIGTERM: {outcomes:#?}");
    let ok = outcomes.iter().filter(|o| o.result.is_ok()).count();
    assert!(ok < CLIENTS * ROUNDS, "the proxy stopped before the clients were done");
    eprintln!(
        "drain: {ok} answered (200), {drained} of them in flight at SIGTERM, {} refused after",
        outcomes.len() - ok
    );
}

// ------------------------------------------------------------------ (f) path normalization

/// Status, headers (lowercased names) and body of a raw HTTP/1.1 response.
fn parse_raw(response: &str) -> (u16, HashMap<String, String>, String) {
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header block: {response:?}"));
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{response:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalized_or_refused_over_real_http() {
    let sb = Sandbox::start(1).await;
    let mut config = base_config(&sb);
    config.push(route("ok", pb::path_match::Kind::Prefix("/ok".into()), "orders", "open"));
    config.push(route("api", pb::path_match::Kind::Prefix("/api".into()), "orders", "open"));
    let version = sb.apply(config).await;
    sb.wait_all_acked(version).await;
    let addr = sb.proxy_addr(0);
    let send = |target: &str| {
        let request = format!("GET {target} HTTP/1.1\r\nHost: sandbox.test\r\nConnection: close\r\n\r\n");
        async move { parse_raw(&raw_request(addr, request.as_bytes()).await) }
    };

    for target in [
        "/a/%2F/b",             // encoded slash
        "/a/%5C",               // encoded backslash
        "/a%00",                // encoded NUL
        "/a/%zz",               // invalid escape
        "/../x",                // climbs above the root
        "/api/%2e%2e/%2e%2e/x", // the same, spelled with escapes
        "/api/%2e%2e%2fadmin",  // an escaped slash hiding a traversal
    ] {
        let (status, headers, body) = send(target).await;
        let problem: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{target}: {e}: {body}"));
        assert_problem(
            StatusCode::from_u16(status).unwrap(),
            headers.get("content-type").map(String::as_str),
            &problem,
            400,
        );
    }

    // `%2e%2e` is a dot segment (RFC 3986): `/api/%2e%2e/admin` is `/admin`, which no route
    // serves; the `/api` route never sees it.
    let (status, headers, body) = send("/api/%2e%2e/admin").await;
    let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_problem(
        StatusCode::from_u16(status).unwrap(),
        headers.get("content-type").map(String::as_str),
        &problem,
        404,
    );
    assert!(sb.upstream().requests().is_empty(), "nothing refused was forwarded: {:?}", sb.upstream().requests());

    // A path that only needs normalizing is forwarded in normal form.
    let (status, _, body) = send("/ok/./x//y").await;
    assert_eq!(status, 200, "{body}");
    let seen: Vec<String> = sb.upstream().requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(seen, ["/ok/x/y"]);
}

// ------------------------------------------------------------------ (g) forwarding headers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_receives_forwarding_headers_and_no_hop_by_hop_ones() {
    let sb = Sandbox::start(1).await;
    configured(&sb).await;
    let request = "GET /orders/headers HTTP/1.1\r\n\
        Host: api.example.com:8443\r\n\
        X-Forwarded-For: 6.6.6.6\r\n\
        X-Forwarded-Proto: https\r\n\
        X-Forwarded-Host: evil.example\r\n\
        Forwarded: for=6.6.6.6;proto=https;host=evil.example\r\n\
        X-Request-Id: sandbox-request-1\r\n\
        Connection: close, x-hop\r\n\
        X-Hop: 1\r\n\
        Keep-Alive: timeout=5\r\n\
        Proxy-Connection: keep-alive\r\n\
        TE: trailers\r\n\
        Upgrade: h2c\r\n\
        X-Kept: yes\r\n\r\n";
    let (status, headers, body) = parse_raw(&raw_request(sb.proxy_addr(0), request.as_bytes()).await);
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers.get("x-request-id").map(String::as_str), Some("sandbox-request-1"));

    let seen = sb.upstream().requests();
    assert_eq!(seen.len(), 1);
    let up = &seen[0];
    assert_eq!(up.uri, "/orders/headers");
    // The peer is not a trusted proxy: every client-supplied forwarding header is replaced.
    assert_eq!(up.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(up.header("x-forwarded-proto"), Some("http"));
    assert_eq!(up.header("x-forwarded-host"), Some("api.example.com:8443"));
    assert_eq!(up.header("forwarded"), Some(r#"for=127.0.0.1;proto=http;host="api.example.com:8443""#));
    assert_eq!(up.headers.get_all("forwarded").iter().count(), 1);
    assert_eq!(up.headers.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(up.header("host"), Some("api.example.com:8443"));
    assert_eq!(up.header("x-request-id"), Some("sandbox-request-1"));
    assert_eq!(up.header("x-kept"), Some("yes"));
    for hop in ["connection", "x-hop", "keep-alive", "proxy-connection", "te", "upgrade", "trailer"] {
        assert_eq!(up.header(hop), None, "{hop} must not be forwarded: {:?}", up.headers);
    }

    // Without a request id, the proxy makes one and gives the same to both sides.
    let r = sb.send(Request::get(format!("{}/orders/no-id", sb.proxy_url(0))).body(Full::default()).unwrap()).await;
    let r = r.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let id = r.header("x-request-id").expect("a generated request id").to_owned();
    assert!(!id.is_empty() && id != "sandbox-request-1");
    assert_eq!(sb.upstream().requests_to("/orders/no-id")[0].header("x-request-id"), Some(id.as_str()));
}

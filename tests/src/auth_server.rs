//! The central authorization server of the tests: a real hyper 1 HTTP/1 server on a loopback
//! port that publishes OIDC discovery and a JWKS, mints signed test tokens, introspects opaque
//! tokens (RFC 7662, with the RFC 9701 JWT response) and can rotate its keys, go down or get slow
//! on command. It counts the requests of each endpoint so tests can check what a client did.
//!
//! Endpoints:
//! - `GET /.well-known/openid-configuration`: `issuer`, `jwks_uri`, `token_endpoint`,
//!   `introspection_endpoint`.
//! - `GET /jwks`: the published keys, with `Cache-Control: max-age=N` when set.
//! - `POST /token`: a JSON object of claims (`sub`, `aud`, `scope`, any other) plus `exp_in`, the
//!   `exp` offset in seconds from now (default 300, negative for an expired token); answers
//!   `{"access_token": JWT, "token_type": "Bearer", "expires_in": exp_in}`.
//! - `POST /introspect`: form body `token=…`, HTTP Basic client auth ([`CLIENT_ID`] /
//!   [`CLIENT_SECRET`]); JSON `{"active": …, claims…}`, or with
//!   `Accept: application/token-introspection+jwt` a signed JWT whose `token_introspection`
//!   claim holds that object.
//!
//! [`AuthServer::start_tls`] serves the same over https (the test certificate of [`crate::tls`];
//! its URLs are then `https://127.0.0.1:PORT/…`, verified against the certificate's IP SAN).
//!
//! Signing keys are the fixed PEMs of `shared/tests/keys/` and `tests/keys/`: an RSA key that
//! rotates ([`AuthServer::rotate`], [`AuthServer::retire_old`]) and an ES256 key always published.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The client credentials `/introspect` accepts.
pub const CLIENT_ID: &str = "portcullis-gateway";
pub const CLIENT_SECRET: &str = "test-introspection-secret";

const RSA_A: &str = include_str!("../../shared/tests/keys/test_issuer_rsa2048.pem");
const RSA_B: &str = include_str!("../keys/test_authserver_rotated_rsa2048.pem");
const EC_P256: &str = include_str!("../../shared/tests/keys/test_issuer_p256.pem");
const WEAK_RSA_1024: &str = include_str!("../keys/test_weak_rsa1024.pem");

/// An endpoint, for the request counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Discovery,
    Jwks,
    Token,
    Introspect,
    Other,
}

#[derive(Clone)]
struct SigningKey {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    fn load(kid: &str, alg: Algorithm, pem: &str) -> SigningKey {
        // PKCS#8 PEM → DER by hand: jsonwebtoken's PEM parsing is a feature the workspace leaves off.
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD.decode(body).expect("test key base64");
        let key = match alg {
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_der(&der),
            _ => {
                use rsa::pkcs1::EncodeRsaPrivateKey;
                use rsa::pkcs8::DecodePrivateKey;
                let private = rsa::RsaPrivateKey::from_pkcs8_der(&der).expect("test RSA key");
                EncodingKey::from_rsa_der(private.to_pkcs1_der().expect("PKCS#1").as_bytes())
            }
        };
        let mut jwk = serde_json::to_value(Jwk::from_encoding_key(&key, alg).expect("public JWK")).expect("JWK JSON");
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        SigningKey { kid: kid.to_owned(), alg, key, jwk }
    }
}

/// Public JWK of a 1024-bit RSA key (too weak: a control plane must refuse it).
pub fn weak_rsa_jwk(kid: &str) -> Value {
    SigningKey::load(kid, Algorithm::RS256, WEAK_RSA_1024).jwk
}

struct Keys {
    /// The rotating RSA keys still published, oldest first; the last one signs.
    rsa: Vec<SigningKey>,
    /// Keys not yet used by a rotation.
    pool: Vec<SigningKey>,
    ec: SigningKey,
    /// Raw JWKs published after the real ones (e.g. invalid keys).
    extra: Vec<Value>,
}

struct Shared {
    issuer: String,
    base: String,
    keys: Mutex<Keys>,
    down: AtomicBool,
    delay_ms: AtomicU64,
    /// `Cache-Control: max-age` of `/jwks`; `u64::MAX` = no header.
    max_age: AtomicU64,
    /// Overrides the discovery document's `issuer` (to test a mismatch).
    discovery_issuer: Mutex<Option<String>>,
    opaque: Mutex<HashMap<String, Value>>,
    counters: Mutex<HashMap<Endpoint, u64>>,
    next_opaque: AtomicU64,
}

/// A running test authorization server; stops when dropped.
pub struct AuthServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl AuthServer {
    /// An http server on a loopback port.
    pub async fn start() -> AuthServer {
        Self::start_with(None).await
    }

    /// An https server on a loopback port, with the test certificate (HTTP/1.1).
    pub async fn start_tls() -> AuthServer {
        let tls = crate::tls::server_config(&[b"http/1.1"]);
        Self::start_with(Some(tokio_rustls::TlsAcceptor::from(tls))).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> AuthServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind auth server");
        let addr = listener.local_addr().expect("local addr");
        let base = format!("{}://{addr}", if tls.is_some() { "https" } else { "http" });
        let keys = Keys {
            rsa: vec![SigningKey::load("rsa-1", Algorithm::RS256, RSA_A)],
            pool: vec![SigningKey::load("rsa-2", Algorithm::RS256, RSA_B)],
            ec: SigningKey::load("ec-1", Algorithm::ES256, EC_P256),
            extra: Vec::new(),
        };
        let shared = Arc::new(Shared {
            issuer: base.clone(),
            base,
            keys: Mutex::new(keys),
            down: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            max_age: AtomicU64::new(u64::MAX),
            discovery_issuer: Mutex::new(None),
            opaque: Mutex::new(HashMap::new()),
            counters: Mutex::new(HashMap::new()),
            next_opaque: AtomicU64::new(1),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), tls, stop.clone()));
        AuthServer { addr, shared, stop }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `iss` of its tokens, also the discovery base URL (`http://127.0.0.1:PORT`, or
    /// `https://…` for [`AuthServer::start_tls`]).
    pub fn issuer(&self) -> String {
        self.shared.issuer.clone()
    }

    pub fn jwks_uri(&self) -> String {
        format!("{}/jwks", self.shared.base)
    }

    /// The kids published now, RSA ones first (oldest first), then the EC one.
    pub fn published_kids(&self) -> Vec<String> {
        let keys = self.shared.keys.lock().expect("keys lock");
        keys.rsa.iter().chain(std::iter::once(&keys.ec)).map(|k| k.kid.clone()).collect()
    }

    /// The kid that signs [`AuthServer::mint`]'s tokens.
    pub fn current_kid(&self) -> String {
        let keys = self.shared.keys.lock().expect("keys lock");
        keys.rsa.last().expect("a signing key").kid.clone()
    }

    /// A signed RS256 JWT with `claims`, completed with `iss`, `iat` and `exp` (+300 s) unless set.
    pub fn mint(&self, claims: Value) -> String {
        let key = self.shared.keys.lock().expect("keys lock").rsa.last().cloned().expect("a signing key");
        self.shared.sign(&key, claims, None)
    }

    /// Like [`AuthServer::mint`] with the always-published ES256 key.
    pub fn mint_es256(&self, claims: Value) -> String {
        let key = self.shared.keys.lock().expect("keys lock").ec.clone();
        self.shared.sign(&key, claims, None)
    }

    /// Publishes a new RSA signing key (it signs from now on) and keeps the old one published.
    /// Returns the new kid. Panics when the fixed test keys are used up.
    pub fn rotate(&self) -> String {
        let mut keys = self.shared.keys.lock().expect("keys lock");
        let next = keys.pool.pop().expect("no more test keys to rotate to");
        let kid = next.kid.clone();
        keys.rsa.push(next);
        kid
    }

    /// Stops publishing every RSA key but the current signing one.
    pub fn retire_old(&self) {
        let mut keys = self.shared.keys.lock().expect("keys lock");
        let n = keys.rsa.len();
        keys.rsa.drain(..n.saturating_sub(1));
    }

    /// Raw JWKs published after the real keys (to serve invalid ones).
    pub fn set_extra_jwks(&self, jwks: Vec<Value>) {
        self.shared.keys.lock().expect("keys lock").extra = jwks;
    }

    /// The published JWK of `kid` (e.g. to derive a bad variant of it).
    pub fn jwk(&self, kid: &str) -> Option<Value> {
        let keys = self.shared.keys.lock().expect("keys lock");
        keys.rsa.iter().chain(std::iter::once(&keys.ec)).find(|k| k.kid == kid).map(|k| k.jwk.clone())
    }

    /// Every endpoint answers 503 while down.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Every response waits this long first.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.delay_ms.store(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// `Cache-Control: max-age` of `/jwks` (`None`: no header, the default).
    pub fn set_jwks_max_age(&self, max_age: Option<Duration>) {
        self.shared.max_age.store(max_age.map_or(u64::MAX, |d| d.as_secs()), Ordering::SeqCst);
    }

    /// Makes the discovery document name another `issuer` (`None`: the real one).
    pub fn set_discovery_issuer(&self, issuer: Option<String>) {
        *self.shared.discovery_issuer.lock().expect("issuer lock") = issuer;
    }

    /// An opaque token that `/introspect` reports active with `claims` (plus `iss`, and `exp`
    /// +300 s unless set) until it expires or is revoked.
    pub fn issue_opaque(&self, claims: Value) -> String {
        let n = self.shared.next_opaque.fetch_add(1, Ordering::Relaxed);
        let token = format!("opaque-{n:08}-{:x}", crc_like(n, &self.shared.issuer));
        let mut claims = claims;
        if let Value::Object(m) = &mut claims {
            m.entry("iss").or_insert_with(|| json!(self.shared.issuer));
            m.entry("exp").or_insert_with(|| json!(now_secs() + 300));
            m.entry("token_type").or_insert_with(|| json!("Bearer"));
        }
        self.shared.opaque.lock().expect("opaque lock").insert(token.clone(), claims);
        token
    }

    pub fn revoke_opaque(&self, token: &str) {
        self.shared.opaque.lock().expect("opaque lock").remove(token);
    }

    /// Requests received on `endpoint` so far (including refused ones while down).
    pub fn requests(&self, endpoint: Endpoint) -> u64 {
        self.shared.counters.lock().expect("counters lock").get(&endpoint).copied().unwrap_or(0)
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

/// A non-guessable-looking suffix for opaque tokens (tests need uniqueness, not secrecy).
fn crc_like(n: u64, salt: &str) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    h.write(salt.as_bytes());
    h.finish()
}

impl Shared {
    fn sign(&self, key: &SigningKey, claims: Value, typ: Option<&str>) -> String {
        let mut claims = claims;
        if let Value::Object(m) = &mut claims {
            let now = now_secs();
            m.entry("iss").or_insert_with(|| json!(self.issuer));
            m.entry("iat").or_insert_with(|| json!(now));
            m.entry("exp").or_insert_with(|| json!(now + 300));
        }
        let mut header = Header::new(key.alg);
        header.kid = Some(key.kid.clone());
        header.typ = Some(typ.unwrap_or("JWT").to_owned());
        jsonwebtoken::encode(&header, &claims, &key.key).expect("sign test token")
    }

    fn count(&self, endpoint: Endpoint) {
        *self.counters.lock().expect("counters lock").entry(endpoint).or_default() += 1;
    }

    fn jwks(&self) -> Value {
        let keys = self.keys.lock().expect("keys lock");
        let mut all: Vec<Value> = keys.rsa.iter().chain(std::iter::once(&keys.ec)).map(|k| k.jwk.clone()).collect();
        all.extend(keys.extra.iter().cloned());
        json!({ "keys": all })
    }

    fn discovery(&self) -> Value {
        let issuer = self.discovery_issuer.lock().expect("issuer lock").clone().unwrap_or_else(|| self.issuer.clone());
        json!({
            "issuer": issuer,
            "jwks_uri": format!("{}/jwks", self.base),
            "token_endpoint": format!("{}/token", self.base),
            "introspection_endpoint": format!("{}/introspect", self.base),
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        })
    }

    fn token(&self, body: &[u8]) -> Response<Full<Bytes>> {
        let Ok(Value::Object(mut claims)) = serde_json::from_slice::<Value>(body) else {
            return json_response(StatusCode::BAD_REQUEST, &json!({"error": "invalid_request"}));
        };
        let exp_in = claims.remove("exp_in").and_then(|v| v.as_i64()).unwrap_or(300);
        claims.insert("exp".into(), json!(now_secs() + exp_in));
        let key = self.keys.lock().expect("keys lock").rsa.last().cloned().expect("a signing key");
        let token = self.sign(&key, Value::Object(claims), None);
        json_response(StatusCode::OK, &json!({"access_token": token, "token_type": "Bearer", "expires_in": exp_in}))
    }

    fn introspect(&self, request: &hyper::http::request::Parts, body: &[u8]) -> Response<Full<Bytes>> {
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
        );
        if request.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            let mut r = json_response(StatusCode::UNAUTHORIZED, &json!({"error": "invalid_client"}));
            r.headers_mut().insert("www-authenticate", HeaderValue::from_static("Basic realm=\"introspection\""));
            return r;
        }
        let Some(token) = form_value(body, "token") else {
            return json_response(StatusCode::BAD_REQUEST, &json!({"error": "invalid_request"}));
        };
        let found = self.opaque.lock().expect("opaque lock").get(&token).cloned();
        let answer = match found {
            Some(Value::Object(mut claims))
                if claims.get("exp").and_then(Value::as_i64).is_some_and(|e| e > now_secs()) =>
            {
                claims.insert("active".into(), json!(true));
                claims.entry("client_id").or_insert_with(|| json!(CLIENT_ID));
                Value::Object(claims)
            }
            _ => json!({"active": false}),
        };
        let wants_jwt = request
            .headers
            .get(ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("application/token-introspection+jwt"));
        if !wants_jwt {
            return json_response(StatusCode::OK, &answer);
        }
        // RFC 9701: iss, aud (the client), iat, and the response in `token_introspection`.
        let key = self.keys.lock().expect("keys lock").rsa.last().cloned().expect("a signing key");
        let jwt = self.sign(
            &key,
            json!({"iss": self.issuer, "aud": CLIENT_ID, "iat": now_secs(), "token_introspection": answer}),
            Some("token-introspection+jwt"),
        );
        let mut r = Response::new(Full::new(Bytes::from(jwt)));
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/token-introspection+jwt"));
        r
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// One value of an `application/x-www-form-urlencoded` body.
fn form_value(body: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    text.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (percent_decode(k)? == name).then(|| percent_decode(v)).flatten()
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
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
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let (shared, stop, tls) = (Arc::clone(&shared), stop.clone(), tls.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request| respond(request, Arc::clone(&shared)));
            let served = async {
                match tls {
                    None => {
                        let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                    }
                    // A client that does not trust the certificate aborts the handshake.
                    Some(tls) => {
                        if let Ok(stream) = tls.accept(stream).await {
                            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                }
            };
            tokio::select! {
                () = stop.cancelled() => {}
                () = served => {}
            }
        });
    }
}

async fn respond(request: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let endpoint = match (&parts.method, parts.uri.path()) {
        (&Method::GET, "/.well-known/openid-configuration") => Endpoint::Discovery,
        (&Method::GET, "/jwks") => Endpoint::Jwks,
        (&Method::POST, "/token") => Endpoint::Token,
        (&Method::POST, "/introspect") => Endpoint::Introspect,
        _ => Endpoint::Other,
    };
    shared.count(endpoint);
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let delay = shared.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if shared.down.load(Ordering::SeqCst) {
        return Ok(json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"error": "temporarily_unavailable"})));
    }
    Ok(match endpoint {
        Endpoint::Discovery => json_response(StatusCode::OK, &shared.discovery()),
        Endpoint::Jwks => {
            let mut r = json_response(StatusCode::OK, &shared.jwks());
            let max_age = shared.max_age.load(Ordering::SeqCst);
            if max_age != u64::MAX
                && let Ok(v) = HeaderValue::from_str(&format!("public, max-age={max_age}"))
            {
                r.headers_mut().insert(CACHE_CONTROL, v);
            }
            r
        }
        Endpoint::Token => shared.token(&body),
        Endpoint::Introspect => shared.introspect(&parts, &body),
        Endpoint::Other => json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"})),
    })
}

//! Opaque access tokens: RFC 7662 token introspection at the issuer, and the phantom-token swap.
//!
//! A policy that accepts `opaque` tokens sends a bearer token it does not verify itself as a JWT
//! to the introspection endpoint of its issuers that have one, in the policy's order; the first
//! that reports the token active wins. The proxy asks for the RFC 9701 answer
//! (`Accept: application/token-introspection+jwt`), verifies it with the issuer's keys
//! ([`Verifier::verify_introspection_jwt`]: signature, `typ`, `iss`, `aud` = our client id, a
//! fresh `iat`; then `active` and the access-token rules on the answer), authorizes on the claims
//! it carries, and forwards **that JWT** upstream in `Authorization` in place of the opaque token.
//! The upstream never sees the opaque token; the client never sees the JWT. A server that answers
//! `application/jwt` (a JWT access token standing for the opaque one) has that JWT verified as an
//! access token of the issuer and forwarded. A plain RFC 7662 JSON answer authenticates the
//! request but leaves no JWT to forward: the upstream then gets the claim headers only.
//!
//! Cache: answers are kept under a SHA-256 of (issuer configuration, token), never the token:
//! active ones until the token's `exp`, at most `cache_ttl`; refusals for `negative_cache_ttl`.
//! Failures (unreachable, timeout, a status other than 200, an answer that cannot be trusted) are
//! not cached: the request gets 503 with `Retry-After`, never an unauthenticated pass.
//! Concurrent requests with the same token share one call (single flight): the first starts it,
//! the others wait on the same [`OnceCell`]; if the first is cancelled (its client went away), a
//! waiter takes over.
//!
//! Transport: one pooled HTTP/1.1 client for all issuers; `https://` endpoints are verified
//! against the system roots or the proxy's `--introspection-ca-file`, never unverified.
//!
//! Client credentials: HTTP Basic (RFC 6749 §2.3.1) with `client_id` and the secret the proxy
//! reads from `client_secret_file` when it compiles a config version, kept as a sensitive header
//! value that no log or `Debug` output shows. Without a secret file the proxy is a public client
//! and sends `client_id` in the form.
//!
//! What it must not do: hold a lock across an await, log or key anything by the raw token, or
//! let the opaque token reach the upstream.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use portcullis_shared::http_client::{HttpsConnector, tls_client_config};
use portcullis_shared::jwt::{IntrospectionError, JwtError, VerifiedToken, Verifier};
use portcullis_shared::model;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// The largest introspection answer read.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// What the proxy asks the authorization server for, best first.
const ACCEPT_ANSWERS: &str = "application/token-introspection+jwt, application/jwt;q=0.9, application/json;q=0.5";
const SHARDS: usize = 16;

/// How to introspect at one Issuer, compiled once per config version.
pub struct Introspector {
    /// The Issuer resource's name.
    issuer: String,
    endpoint: Uri,
    client_id: String,
    /// `Basic …`, marked sensitive; `None` for a public client.
    authorization: Option<HeaderValue>,
    cache_ttl: Duration,
    negative_ttl: Duration,
    timeout: Duration,
    verifier: Arc<Verifier>,
    /// Cache namespace: a hash of everything above, so a changed endpoint, client or secret
    /// does not answer from entries the old configuration made.
    namespace: [u8; 32],
}

impl std::fmt::Debug for Introspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Introspector")
            .field("issuer", &self.issuer)
            .field("endpoint", &self.endpoint)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.authorization.as_ref().map(|_| "<redacted>"))
            .field("cache_ttl", &self.cache_ttl)
            .field("negative_ttl", &self.negative_ttl)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Why an issuer's introspection settings cannot be used by this proxy: the field and a message.
#[derive(Debug, PartialEq, Eq)]
pub struct IntrospectorError {
    pub field: &'static str,
    pub message: String,
}

impl Introspector {
    /// Prepares the endpoint and credentials; `secret` is the content of the issuer's
    /// `client_secret_file`, which the snapshot compiler reads (`None`: a public client).
    pub fn compile(
        issuer: &model::Issuer,
        config: &model::Introspection,
        secret: Option<String>,
        verifier: Arc<Verifier>,
    ) -> Result<Introspector, IntrospectorError> {
        let fail = |field, message| IntrospectorError { field, message };
        let endpoint: Uri =
            config.endpoint.parse().map_err(|e| fail("introspection.endpoint", format!("not a valid URL: {e}")))?;
        let authorization = match &secret {
            None => None,
            Some(secret) => {
                let credentials = format!("{}:{}", form_encode(&config.client_id), form_encode(secret));
                let mut value = HeaderValue::try_from(format!("Basic {}", STANDARD.encode(credentials)))
                    .map_err(|_| fail("introspection.client_id", "not usable in a header".into()))?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let mut hash = Sha256::new();
        for part in [issuer.name.as_bytes(), config.endpoint.as_bytes(), config.client_id.as_bytes()] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        hash.update(secret.as_deref().unwrap_or_default().as_bytes());
        Ok(Introspector {
            issuer: issuer.name.clone(),
            endpoint,
            client_id: config.client_id.clone(),
            authorization,
            cache_ttl: config.cache_ttl,
            negative_ttl: config.negative_cache_ttl,
            timeout: config.timeout,
            verifier,
            namespace: hash.finalize().into(),
        })
    }

    /// The Issuer resource's name.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    fn key(&self, token: &str) -> [u8; 32] {
        Sha256::new().chain_update(self.namespace).chain_update(token.as_bytes()).finalize().into()
    }
}

/// `application/x-www-form-urlencoded` encoding of one value (unreserved characters kept).
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    form_encode_into(&mut out, s);
    out
}

fn form_encode_into(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

/// An active token, as the request path uses it.
#[derive(Debug)]
pub struct Phantom {
    /// The claims to authorize on.
    pub token: Arc<VerifiedToken>,
    /// `Bearer <JWT>` to forward in place of the opaque token, when the answer was a JWT.
    pub authorization: Option<HeaderValue>,
}

/// What introspection said about a token.
#[derive(Clone, Debug)]
pub enum Outcome {
    Active(Arc<Phantom>),
    /// The token is not accepted (inactive, expired, another audience...).
    Refused(JwtError),
    /// The authorization server could not be asked, or its answer could not be trusted.
    Unavailable,
}

struct Entry {
    outcome: Outcome,
    expires: Instant,
}

type Shard = Mutex<HashMap<[u8; 32], Entry>>;

/// Why a call failed (logged, never shown to the client).
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("request failed: {0}")]
    Http(#[from] hyper_util::client::legacy::Error),
    #[error("answered with status {0}")]
    Status(StatusCode),
    #[error("answer body unreadable or larger than {MAX_RESPONSE_BYTES} bytes")]
    Body,
    #[error("answer has unexpected content type {0:?}")]
    ContentType(String),
    #[error("answer cannot be trusted: {0}")]
    Response(JwtError),
    #[error("cannot build the request: {0}")]
    Request(#[from] http::Error),
}

/// The proxy's introspection client and cache; lives beside the snapshots (a config push keeps
/// the cache of unchanged issuers).
pub struct Introspection {
    /// Built on the first call: a proxy without opaque-token policies never loads CA roots.
    http: OnceLock<Client<HttpsConnector, Full<Bytes>>>,
    ca_file: Option<PathBuf>,
    shards: Box<[Shard]>,
    per_shard: usize,
    inflight: Mutex<HashMap<[u8; 32], Arc<OnceCell<Outcome>>>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Introspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Introspection").field("capacity", &(self.per_shard * SHARDS)).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Introspection {
    /// A cache of at most `capacity` answers.
    /// `ca_file`: the CA bundle https endpoints must chain to; default the system roots. The
    /// proxy checks it at start-up (an unusable one stops it there).
    pub fn new(capacity: usize, ca_file: Option<&Path>, metrics: Arc<Metrics>) -> Introspection {
        Introspection {
            http: OnceLock::new(),
            ca_file: ca_file.map(Path::to_path_buf),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            inflight: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn http(&self) -> &Client<HttpsConnector, Full<Bytes>> {
        self.http.get_or_init(|| {
            let connect_timeout = Duration::from_secs(2);
            let connector = match tls_client_config(self.ca_file.as_deref(), &[b"http/1.1"]) {
                Ok(tls) => HttpsConnector::new(tls, connect_timeout),
                Err(error) => {
                    warn!(error = %error, "no usable CA roots: https introspection endpoints cannot be reached");
                    HttpsConnector::http_only(connect_timeout)
                }
            };
            Client::builder(TokioExecutor::new()).build(connector)
        })
    }

    /// A cached answer for `token` at `introspector`, without waiting.
    pub fn cached(&self, introspector: &Introspector, token: &str) -> Option<Outcome> {
        self.get(&introspector.key(token))
    }

    fn get(&self, key: &[u8; 32]) -> Option<Outcome> {
        let shard = lock(&self.shards[usize::from(key[0]) % SHARDS]);
        let entry = shard.get(key).filter(|e| e.expires > Instant::now())?;
        self.metrics.introspection.cache_hits.fetch_add(1, Relaxed);
        Some(entry.outcome.clone())
    }

    fn put(&self, key: [u8; 32], outcome: Outcome, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut shard = lock(&self.shards[usize::from(key[0]) % SHARDS]);
        if shard.len() >= self.per_shard && !shard.contains_key(&key) {
            shard.retain(|_, e| e.expires > now);
            if shard.len() >= self.per_shard {
                // Full of live answers: make room by dropping one (a refetch is the only cost).
                if let Some(victim) = shard.keys().next().copied() {
                    shard.remove(&victim);
                }
            }
        }
        shard.insert(key, Entry { outcome, expires: now + ttl });
    }

    /// The answer for `token` at `introspector`: from the cache, from a call another request
    /// already started, or from a new call.
    pub async fn introspect(&self, introspector: &Introspector, token: &str) -> Outcome {
        let key = introspector.key(token);
        if let Some(hit) = self.get(&key) {
            return hit;
        }
        let guard = {
            let mut inflight = lock(&self.inflight);
            let cell = Arc::clone(inflight.entry(key).or_default());
            Inflight { map: &self.inflight, key, cell }
        };
        let mut called = false;
        let outcome = guard
            .cell
            .get_or_init(|| {
                called = true;
                self.call_and_cache(introspector, token, key)
            })
            .await
            .clone();
        if !called {
            self.metrics.introspection.coalesced.fetch_add(1, Relaxed);
        }
        outcome
    }

    async fn call_and_cache(&self, introspector: &Introspector, token: &str, key: [u8; 32]) -> Outcome {
        let started = Instant::now();
        let result = tokio::time::timeout(introspector.timeout, self.call(introspector, token)).await;
        let m = &self.metrics.introspection;
        m.duration.observe(started.elapsed());
        let outcome = match result {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(error)) => {
                warn!(issuer = %introspector.issuer, endpoint = %introspector.endpoint, error = %error, "token introspection failed");
                Outcome::Unavailable
            }
            Err(_) => {
                warn!(issuer = %introspector.issuer, endpoint = %introspector.endpoint, timeout = ?introspector.timeout, "token introspection timed out");
                Outcome::Unavailable
            }
        };
        match &outcome {
            Outcome::Active(phantom) => {
                m.active.fetch_add(1, Relaxed);
                let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                let left = Duration::from_secs(phantom.token.exp.saturating_sub(now));
                self.put(key, outcome.clone(), left.min(introspector.cache_ttl));
            }
            Outcome::Refused(reason) => {
                m.refused.fetch_add(1, Relaxed);
                debug!(issuer = %introspector.issuer, reason = reason.reason(), "introspection refused the token");
                self.put(key, outcome.clone(), introspector.negative_ttl);
            }
            Outcome::Unavailable => {
                m.failed.fetch_add(1, Relaxed);
            }
        }
        outcome
    }

    async fn call(&self, introspector: &Introspector, token: &str) -> Result<Outcome, CallError> {
        let mut form = String::with_capacity(token.len() + 80);
        form.push_str("token=");
        form_encode_into(&mut form, token);
        form.push_str("&token_type_hint=access_token");
        if introspector.authorization.is_none() {
            form.push_str("&client_id=");
            form_encode_into(&mut form, &introspector.client_id);
        }
        let mut request = Request::post(introspector.endpoint.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, ACCEPT_ANSWERS)
            .body(Full::new(Bytes::from(form)))?;
        if let Some(credentials) = &introspector.authorization {
            request.headers_mut().insert(AUTHORIZATION, credentials.clone());
        }
        let response = self.http().request(request).await?;
        if response.status() != StatusCode::OK {
            return Err(CallError::Status(response.status()));
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|_| CallError::Body)?
            .to_bytes();
        let now = SystemTime::now();
        let verifier = &introspector.verifier;
        let text = || std::str::from_utf8(&body).map(str::trim).map_err(|_| CallError::Body);
        let verified = match content_type.as_str() {
            "application/token-introspection+jwt" => {
                let jwt = text()?;
                verifier.verify_introspection_jwt(jwt, &introspector.client_id, now).map(|t| (t, Some(jwt)))
            }
            "application/jwt" => {
                let jwt = text()?;
                verifier.verify(jwt, now).map(|t| (t, Some(jwt))).map_err(|e| match e {
                    // The answer itself is broken or forged: not the client's fault.
                    JwtError::Malformed(_)
                    | JwtError::SignatureInvalid
                    | JwtError::KidUnknown { .. }
                    | JwtError::AlgNotAllowed
                    | JwtError::AlgKeyMismatch => IntrospectionError::Response(e),
                    e => IntrospectionError::Token(e),
                })
            }
            "application/json" => verifier.accept_introspection_json(&body, now).map(|t| (t, None)),
            other => return Err(CallError::ContentType(other.to_owned())),
        };
        match verified {
            Ok((token, jwt)) => {
                let authorization = match jwt {
                    None => None,
                    Some(jwt) => Some(
                        HeaderValue::try_from(format!("Bearer {jwt}"))
                            .map_err(|_| CallError::Response(JwtError::Malformed("not a header value")))?,
                    ),
                };
                Ok(Outcome::Active(Arc::new(Phantom { token: Arc::new(token), authorization })))
            }
            Err(IntrospectionError::Token(e)) => Ok(Outcome::Refused(e)),
            Err(IntrospectionError::Response(e)) => Err(CallError::Response(e)),
        }
    }
}

/// A request's share in an in-flight call; the last one out removes the call from the map.
struct Inflight<'a> {
    map: &'a Mutex<HashMap<[u8; 32], Arc<OnceCell<Outcome>>>>,
    key: [u8; 32],
    cell: Arc<OnceCell<Outcome>>,
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        let mut map = lock(self.map);
        let ours = map.get(&self.key).is_some_and(|c| Arc::ptr_eq(c, &self.cell));
        // Done: later requests find the answer in the cache (or, after a failure, try again).
        // Not done (every request that waited was cancelled): remove it once nobody holds it.
        if ours && (self.cell.initialized() || Arc::strong_count(&self.cell) <= 2) {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding() {
        assert_eq!(form_encode("abc-._~XYZ09"), "abc-._~XYZ09");
        assert_eq!(form_encode("a b+c/d=e&f:é"), "a%20b%2Bc%2Fd%3De%26f%3A%C3%A9");
    }
}

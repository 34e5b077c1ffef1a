//! Key rotation: the control plane fetches the verification keys of every Issuer whose key
//! source is `jwks_uri` or OIDC `discovery`, validates them and stores them as Key resources, so
//! proxies verify against one shared key set and never call the issuer on the request path.
//!
//! One long-lived task ([`KeyRotation::run`]) refreshes each issuer on its interval (or the JWKS
//! response's `Cache-Control: max-age`, clamped to [30 s, 24 h]), immediately when an Issuer is
//! created or its key source changes, and on demand through [`KeyRotationHandle::refetch`]
//! (rate-limited per issuer). A key that disappears from the JWKS gets `retire_at = now + grace`
//! and is deleted once that has passed. A failed fetch keeps the old keys. Every write for one
//! issuer is a single [`ConfigState::write`]; unchanged keys are not rewritten, so replicas running
//! this task side by side do not fight.
//!
//! Key sources may be `https://` (verified against the system roots, or the PEM bundle of
//! [`KeyRotationConfig::issuer_ca_file`] for a private IdP CA) or `http://` (development and
//! tests). The client is [`portcullis_shared::http_client::HttpsConnector`]; redirects are not
//! followed. Key material is never logged: log lines name the issuer and the `kid` only.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use portcullis_proto::config::v1 as pb;
use portcullis_shared::Kind;
use portcullis_shared::http_client::{HttpsConnector, TlsConfigError, tls_client_config};
use portcullis_shared::model::{self, Algorithm, Issuer, KeySourceKind};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::state::{Action, Change, ConfigState};

/// Bounds on a `Cache-Control: max-age` the refresh honours.
const MIN_MAX_AGE: Duration = Duration::from_secs(30);
const MAX_MAX_AGE: Duration = Duration::from_secs(86_400);
/// Longest Key resource name the name rules allow.
const MAX_NAME_LEN: usize = 253;

/// Tunables of the rotation task.
#[derive(Clone, Debug)]
pub struct KeyRotationConfig {
    /// How long a key that vanished from the JWKS stays valid.
    pub grace: Duration,
    /// At most one on-demand fetch per issuer in this window.
    pub refetch_min_interval: Duration,
    /// The whole HTTP exchange (connect, headers, body) must finish within this.
    pub fetch_timeout: Duration,
    /// Largest discovery document or JWKS accepted.
    pub max_body_bytes: usize,
    /// PEM bundle of the CAs that `https://` key sources must chain to (a private IdP CA);
    /// `None`: the system roots.
    pub issuer_ca_file: Option<PathBuf>,
}

impl Default for KeyRotationConfig {
    fn default() -> Self {
        KeyRotationConfig {
            grace: Duration::from_secs(3600),
            refetch_min_interval: Duration::from_secs(10),
            fetch_timeout: Duration::from_secs(5),
            max_body_bytes: 1024 * 1024,
            issuer_ca_file: None,
        }
    }
}

/// Why fetching an issuer's keys failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("invalid url {0:?}")]
    InvalidUrl(String),
    #[error("request to {url} failed: {message}")]
    Request { url: String, message: String },
    #[error("request to {url} timed out")]
    Timeout { url: String },
    #[error("{url} answered with status {status}")]
    Status { url: String, status: u16 },
    #[error("response from {url} is larger than {limit} bytes or was cut off")]
    Body { url: String, limit: usize },
    #[error("response from {url} is not valid json: {message}")]
    Json { url: String, message: String },
    #[error("discovery document has no jwks_uri")]
    NoJwksUri,
    #[error("discovery document names issuer {found:?}, expected {expected:?}")]
    IssuerMismatch { expected: String, found: String },
    #[error("the jwks has no \"keys\" array")]
    NoKeys,
    #[error("the jwks holds no usable key")]
    NoUsableKeys,
    #[error("storing the keys failed: {0}")]
    Write(String),
}

/// What an on-demand refetch did.
#[derive(Debug)]
pub enum RefetchOutcome {
    /// The keys were fetched (and stored).
    Fetched,
    /// The fetch failed; the old keys are kept.
    Failed(FetchError),
    /// Another on-demand fetch of this issuer happened within the rate-limit window.
    RateLimited,
    /// No Issuer of that name fetches its keys (unknown, or inline/shared-secret keys).
    UnknownIssuer,
    /// The rotation task is not running.
    Stopped,
}

impl RefetchOutcome {
    /// Stable snake_case name, for logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            RefetchOutcome::Fetched => "fetched",
            RefetchOutcome::Failed(_) => "failed",
            RefetchOutcome::RateLimited => "rate_limited",
            RefetchOutcome::UnknownIssuer => "unknown_issuer",
            RefetchOutcome::Stopped => "stopped",
        }
    }
}

/// Counters for tests and, later, metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyRotationStats {
    /// Key-set fetches attempted (scheduled and on demand).
    pub fetches: u64,
    /// Fetches that failed (the old keys were kept).
    pub fetch_failures: u64,
    /// JWKs skipped because they failed validation.
    pub keys_rejected: u64,
    /// Key resources created, updated (e.g. `retire_at` set) or deleted.
    pub keys_changed: u64,
    /// On-demand refetches refused by the rate limit.
    pub refetches_rate_limited: u64,
}

#[derive(Default)]
struct Counters {
    fetches: AtomicU64,
    fetch_failures: AtomicU64,
    keys_rejected: AtomicU64,
    keys_changed: AtomicU64,
    refetches_rate_limited: AtomicU64,
}

struct Shared {
    counters: Counters,
    /// Issuer name → when the last on-demand fetch was let through. Never held across `.await`.
    last_refetch: Mutex<HashMap<String, Instant>>,
    refetch_min_interval: Duration,
}

type RefetchRequest = (String, oneshot::Sender<RefetchOutcome>);

/// A cheap, cloneable handle to a running [`KeyRotation`]: on-demand refetches and counters.
#[derive(Clone)]
pub struct KeyRotationHandle {
    shared: Arc<Shared>,
    tx: mpsc::Sender<RefetchRequest>,
}

impl KeyRotationHandle {
    /// Fetches `issuer_name`'s keys now (the "unknown kid" path), unless an on-demand fetch of
    /// that issuer already happened within the rate-limit window. Returns once the fetch (and
    /// the write) is done.
    pub async fn refetch(&self, issuer_name: &str) -> RefetchOutcome {
        {
            let mut last = self.shared.last_refetch.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            if let Some(at) = last.get(issuer_name)
                && now.duration_since(*at) < self.shared.refetch_min_interval
            {
                self.shared.counters.refetches_rate_limited.fetch_add(1, Ordering::Relaxed);
                return RefetchOutcome::RateLimited;
            }
            last.insert(issuer_name.to_owned(), now);
        }
        let (reply, rx) = oneshot::channel();
        if self.tx.send((issuer_name.to_owned(), reply)).await.is_err() {
            return RefetchOutcome::Stopped;
        }
        rx.await.unwrap_or(RefetchOutcome::Stopped)
    }

    pub fn stats(&self) -> KeyRotationStats {
        let c = &self.shared.counters;
        KeyRotationStats {
            fetches: c.fetches.load(Ordering::Relaxed),
            fetch_failures: c.fetch_failures.load(Ordering::Relaxed),
            keys_rejected: c.keys_rejected.load(Ordering::Relaxed),
            keys_changed: c.keys_changed.load(Ordering::Relaxed),
            refetches_rate_limited: c.refetches_rate_limited.load(Ordering::Relaxed),
        }
    }
}

/// What decides whether an issuer must be fetched again at once.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SourceSig {
    iss: String,
    kind: KeySourceKind,
    refresh_interval: Duration,
    algorithms: Vec<Algorithm>,
}

struct Tracked {
    sig: SourceSig,
    next_fetch: Instant,
}

/// The key rotation task. Build it with [`KeyRotation::new`], keep a [`KeyRotation::handle`],
/// then spawn [`KeyRotation::run`].
pub struct KeyRotation {
    state: Arc<ConfigState>,
    config: KeyRotationConfig,
    shared: Arc<Shared>,
    tx: mpsc::Sender<RefetchRequest>,
    rx: mpsc::Receiver<RefetchRequest>,
    client: Client<HttpsConnector, Empty<Bytes>>,
}

impl KeyRotation {
    /// Fails only when `config.issuer_ca_file` is set and cannot be used. Without it, system
    /// roots that cannot be loaded are logged and `https://` key sources then fail to fetch
    /// (inline and `http://` sources keep working).
    pub fn new(state: Arc<ConfigState>, config: KeyRotationConfig) -> Result<KeyRotation, TlsConfigError> {
        let (tx, rx) = mpsc::channel(64);
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            last_refetch: Mutex::new(HashMap::new()),
            refetch_min_interval: config.refetch_min_interval,
        });
        let connector = match tls_client_config(config.issuer_ca_file.as_deref(), &[b"http/1.1"]) {
            Ok(tls) => HttpsConnector::new(tls, config.fetch_timeout),
            Err(e) if config.issuer_ca_file.is_none() => {
                warn!(error = %e, "no trust roots: https key sources cannot be fetched");
                HttpsConnector::http_only(config.fetch_timeout)
            }
            Err(e) => return Err(e),
        };
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(KeyRotation { state, config, shared, tx, rx, client })
    }

    pub fn handle(&self) -> KeyRotationHandle {
        KeyRotationHandle { shared: Arc::clone(&self.shared), tx: self.tx.clone() }
    }

    pub fn stats(&self) -> KeyRotationStats {
        self.handle().stats()
    }

    /// Runs until `shutdown` is cancelled. Fetches are done one at a time, each bounded by the
    /// fetch timeout.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut revisions = self.state.subscribe();
        let mut tracked: BTreeMap<String, Tracked> = BTreeMap::new();
        self.sync_issuers(&mut tracked);
        loop {
            let now = Instant::now();
            let due: Vec<String> =
                tracked.iter().filter(|(_, t)| t.next_fetch <= now).map(|(n, _)| n.clone()).collect();
            for name in due {
                if shutdown.is_cancelled() {
                    return;
                }
                let next = tokio::select! {
                    () = shutdown.cancelled() => return,
                    r = self.refresh_issuer(&name) => r.unwrap_or(None),
                };
                if let Some(t) = tracked.get_mut(&name) {
                    t.next_fetch = Instant::now() + next.unwrap_or(t.sig.refresh_interval);
                }
            }
            self.sweep(&tracked).await;
            let wake = tracked.values().map(|t| t.next_fetch).min();
            let retire = self.earliest_retire(&tracked);
            let wake = match (wake, retire) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = revisions.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.sync_issuers(&mut tracked);
                }
                request = self.rx.recv() => {
                    let Some((name, reply)) = request else { return };
                    if !tracked.contains_key(&name) {
                        // the request may have overtaken the index notification
                        self.sync_issuers(&mut tracked);
                    }
                    let outcome = if tracked.contains_key(&name) {
                        match self.refresh_issuer(&name).await {
                            Ok(next) => {
                                if let Some(t) = tracked.get_mut(&name) {
                                    t.next_fetch = Instant::now() + next.unwrap_or(t.sig.refresh_interval);
                                }
                                RefetchOutcome::Fetched
                            }
                            Err(e) => RefetchOutcome::Failed(e),
                        }
                    } else {
                        RefetchOutcome::UnknownIssuer
                    };
                    let _ = reply.send(outcome);
                }
                () = sleep => {}
            }
        }
    }

    /// Brings the tracked issuers in line with the index: new or changed ones are due now.
    fn sync_issuers(&self, tracked: &mut BTreeMap<String, Tracked>) {
        let current: BTreeMap<String, SourceSig> = {
            let idx = self.state.index();
            idx.iter(Some(Kind::Issuer))
                .filter_map(|e| match &e.resource.kind {
                    Some(pb::resource::Kind::Issuer(p)) => Issuer::try_from(p).ok(),
                    _ => None,
                })
                .filter(|i| matches!(i.keys.kind, KeySourceKind::JwksUri(_) | KeySourceKind::Discovery(_)))
                .map(|i| {
                    let sig = SourceSig {
                        iss: i.issuer,
                        kind: i.keys.kind,
                        refresh_interval: i.keys.refresh_interval,
                        algorithms: i.algorithms,
                    };
                    (i.name, sig)
                })
                .collect()
        };
        tracked.retain(|name, _| current.contains_key(name));
        let now = Instant::now();
        for (name, sig) in current {
            match tracked.get_mut(&name) {
                Some(t) if t.sig == sig => {}
                Some(t) => {
                    debug!(issuer = %name, "issuer key source changed; fetching now");
                    *t = Tracked { sig, next_fetch: now };
                }
                None => {
                    debug!(issuer = %name, "new issuer; fetching its keys");
                    tracked.insert(name, Tracked { sig, next_fetch: now });
                }
            }
        }
    }

    /// Fetches and stores one issuer's keys. `Ok(Some(d))`: the response asked to be cached for
    /// `d` (already clamped). Failures are counted and logged here.
    async fn refresh_issuer(&self, name: &str) -> Result<Option<Duration>, FetchError> {
        let issuer = {
            let idx = self.state.index();
            match idx.get(Kind::Issuer, name).map(|e| &e.resource.kind) {
                Some(Some(pb::resource::Kind::Issuer(p))) => Issuer::try_from(p).ok(),
                _ => None,
            }
        };
        let Some(issuer) = issuer else { return Ok(None) };
        self.shared.counters.fetches.fetch_add(1, Ordering::Relaxed);
        let result = async {
            let (jwks, max_age) = self.fetch_jwks(&issuer).await?;
            self.store_keys(&issuer, &jwks).await?;
            Ok(max_age)
        }
        .await;
        if let Err(e) = &result {
            self.shared.counters.fetch_failures.fetch_add(1, Ordering::Relaxed);
            warn!(issuer = %name, error = %e, "key fetch failed");
        }
        result
    }

    async fn fetch_jwks(&self, issuer: &Issuer) -> Result<(serde_json::Value, Option<Duration>), FetchError> {
        let jwks_uri = match &issuer.keys.kind {
            KeySourceKind::JwksUri(u) => u.clone(),
            KeySourceKind::Discovery(base) => {
                let url = format!("{}/.well-known/openid-configuration", base.trim_end_matches('/'));
                let (doc, _) = self.get_json(&url).await?;
                let found = doc.get("issuer").and_then(|v| v.as_str()).unwrap_or_default();
                if found != issuer.issuer {
                    return Err(FetchError::IssuerMismatch {
                        expected: issuer.issuer.clone(),
                        found: found.to_owned(),
                    });
                }
                doc.get("jwks_uri").and_then(|v| v.as_str()).ok_or(FetchError::NoJwksUri)?.to_owned()
            }
            KeySourceKind::Inline(_) | KeySourceKind::SharedSecretFile(_) => return Err(FetchError::NoKeys),
        };
        self.get_json(&jwks_uri).await
    }

    /// GET `url`, bounded in time and size; returns the JSON body and the clamped max-age.
    async fn get_json(&self, url: &str) -> Result<(serde_json::Value, Option<Duration>), FetchError> {
        let uri: hyper::Uri = url.parse().map_err(|_| FetchError::InvalidUrl(url.to_owned()))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(FetchError::InvalidUrl(url.to_owned()));
        }
        let request = hyper::Request::get(uri)
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|_| FetchError::InvalidUrl(url.to_owned()))?;
        let limit = self.config.max_body_bytes;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| FetchError::Request { url: url.to_owned(), message: error_chain(&e) })?;
            let status = response.status();
            if status != hyper::StatusCode::OK {
                return Err(FetchError::Status { url: url.to_owned(), status: status.as_u16() });
            }
            let max_age = response
                .headers()
                .get_all(hyper::header::CACHE_CONTROL)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(parse_max_age);
            let body = Limited::new(response.into_body(), limit)
                .collect()
                .await
                .map_err(|_| FetchError::Body { url: url.to_owned(), limit })?
                .to_bytes();
            Ok((body, max_age))
        };
        let (body, max_age) = tokio::time::timeout(self.config.fetch_timeout, exchange)
            .await
            .map_err(|_| FetchError::Timeout { url: url.to_owned() })??;
        let json = serde_json::from_slice(&body)
            .map_err(|e| FetchError::Json { url: url.to_owned(), message: e.to_string() })?;
        Ok((json, max_age.map(clamp_max_age)))
    }

    /// Writes the fetched keys, marks vanished ones for retirement and deletes expired ones:
    /// one `ConfigState::write`.
    async fn store_keys(&self, issuer: &Issuer, jwks: &serde_json::Value) -> Result<(), FetchError> {
        let keys = jwks.get("keys").and_then(|k| k.as_array()).ok_or(FetchError::NoKeys)?;
        let mut fresh: BTreeMap<String, pb::Key> = BTreeMap::new();
        for jwk in keys {
            match accept_jwk(jwk, &issuer.algorithms) {
                Ok(kid) => {
                    let name = key_name(&issuer.name, &kid);
                    if fresh.contains_key(&name) {
                        self.shared.counters.keys_rejected.fetch_add(1, Ordering::Relaxed);
                        warn!(issuer = %issuer.name, kid = %kid, "duplicate kid in jwks; key skipped");
                        continue;
                    }
                    // serde_json's map is ordered by key: this is a canonical form.
                    let jwk = jwk.to_string();
                    fresh.insert(
                        name.clone(),
                        pb::Key { name, revision: 0, issuer: issuer.name.clone(), kid, jwk, retire_at: None },
                    );
                }
                Err(reason) => {
                    self.shared.counters.keys_rejected.fetch_add(1, Ordering::Relaxed);
                    let kid = jwk.get("kid").and_then(|v| v.as_str()).unwrap_or_default();
                    warn!(issuer = %issuer.name, kid = %kid, reason = %reason, "invalid key in jwks; skipped");
                }
            }
        }
        if fresh.is_empty() {
            // An empty or all-invalid set looks like a broken issuer: keep the keys we have.
            return Err(FetchError::NoUsableKeys);
        }
        let existing = self.stored_keys(&issuer.name);
        let now = SystemTime::now();
        let mut changes = Vec::new();
        for (name, stored) in existing {
            if fresh.contains_key(&name) {
                continue;
            }
            match stored.retire_at.as_ref().and_then(to_system_time) {
                Some(at) if at <= now => {
                    changes.push(Change::Delete { kind: Kind::Key, name, expected_revision: stored.revision })
                }
                Some(_) => {}
                None => {
                    let mut retiring = stored;
                    retiring.retire_at = Some(to_timestamp(now + self.config.grace));
                    let revision = retiring.revision;
                    retiring.revision = 0;
                    info!(issuer = %issuer.name, kid = %retiring.kid, "key left the jwks; retiring it after the grace period");
                    changes.push(Change::Upsert {
                        resource: Box::new(key_resource(retiring)),
                        expected_revision: revision,
                    });
                }
            }
        }
        for (_, key) in fresh {
            changes.push(Change::Upsert { resource: Box::new(key_resource(key)), expected_revision: 0 });
        }
        self.apply(&issuer.name, changes).await
    }

    /// Deletes the keys of tracked issuers whose grace period is over, without fetching.
    async fn sweep(&self, tracked: &BTreeMap<String, Tracked>) {
        let now = SystemTime::now();
        for name in tracked.keys() {
            let changes: Vec<Change> = self
                .stored_keys(name)
                .into_iter()
                .filter(|(_, k)| k.retire_at.as_ref().and_then(to_system_time).is_some_and(|at| at <= now))
                .map(|(key_name, k)| Change::Delete { kind: Kind::Key, name: key_name, expected_revision: k.revision })
                .collect();
            if let Err(e) = self.apply(name, changes).await {
                warn!(issuer = %name, error = %e, "deleting retired keys failed");
            }
        }
    }

    async fn apply(&self, issuer: &str, changes: Vec<Change>) -> Result<(), FetchError> {
        if changes.is_empty() {
            return Ok(());
        }
        let result = self.state.write(changes, false).await.map_err(|e| FetchError::Write(e.to_string()))?;
        for o in result.outcomes.iter().filter(|o| o.action != Action::Unchanged) {
            self.shared.counters.keys_changed.fetch_add(1, Ordering::Relaxed);
            info!(issuer = %issuer, key = %o.name, action = o.action.as_str(), "key resource written");
        }
        Ok(())
    }

    fn earliest_retire(&self, tracked: &BTreeMap<String, Tracked>) -> Option<Instant> {
        let now = SystemTime::now();
        tracked
            .keys()
            .flat_map(|name| self.stored_keys(name).into_values())
            .filter_map(|k| k.retire_at.as_ref().and_then(to_system_time))
            .min()
            // a failing delete must not turn into a busy loop
            .map(|at| Instant::now() + at.duration_since(now).unwrap_or_default().max(Duration::from_millis(200)))
    }

    /// The stored Key resources of `issuer`, by resource name (with their revisions).
    fn stored_keys(&self, issuer: &str) -> BTreeMap<String, pb::Key> {
        let idx = self.state.index();
        idx.iter(Some(Kind::Key))
            .filter_map(|e| match &e.resource.kind {
                Some(pb::resource::Kind::Key(k)) if k.issuer == issuer => {
                    let mut k = k.clone();
                    k.revision = e.revision;
                    Some((k.name.clone(), k))
                }
                _ => None,
            })
            .collect()
    }
}

fn key_resource(key: pb::Key) -> pb::Resource {
    pb::Resource { kind: Some(pb::resource::Kind::Key(key)) }
}

/// Validates one JWK from a fetched set for `algorithms`; returns its `kid`.
pub fn accept_jwk(jwk: &serde_json::Value, algorithms: &[Algorithm]) -> Result<String, String> {
    let kid = model::check_public_jwk(jwk)?;
    if kid.is_empty() {
        return Err("key has no kid".into());
    }
    let member = |m: &str| jwk.get(m).and_then(|v| v.as_str());
    if member("use").is_some_and(|u| u != "sig") {
        return Err("key is not for signatures (use != sig)".into());
    }
    let fits = |alg: Algorithm| -> bool {
        use Algorithm::*;
        match (member("kty"), alg) {
            (Some("RSA"), RS256 | RS384 | RS512 | PS256 | PS384 | PS512) => true,
            (Some("EC"), ES256) => member("crv") == Some("P-256"),
            (Some("EC"), ES384) => member("crv") == Some("P-384"),
            (Some("OKP"), EdDSA) => member("crv") == Some("Ed25519"),
            _ => false,
        }
    };
    match member("alg") {
        Some(a) => match Algorithm::parse(a) {
            Some(alg) if algorithms.contains(&alg) && fits(alg) => Ok(kid),
            _ => Err(format!("key algorithm {a:?} is not allowed for this issuer or does not match the key type")),
        },
        None if algorithms.iter().any(|a| fits(*a)) => Ok(kid),
        None => Err("key type matches none of the issuer's algorithms".into()),
    }
}

/// `<issuer>-<kid>` under the resource name rules: a kid that had to be changed (case, characters,
/// length) gets a short hash of the original so two kids never collide.
pub fn key_name(issuer: &str, kid: &str) -> String {
    let mut clean: String = kid
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' { c } else { '-' })
        .collect();
    let changed = clean != kid || !clean.ends_with(|c: char| c.is_ascii_alphanumeric());
    let base_max = MAX_NAME_LEN.saturating_sub(issuer.len() + 1 + 9);
    let too_long = clean.len() > base_max + 9;
    if changed || too_long {
        clean.truncate(base_max);
        let trimmed = clean.trim_matches(|c| c == '-' || c == '.');
        let hash = crc32fast::hash(kid.as_bytes());
        if trimmed.is_empty() { format!("{issuer}-{hash:08x}") } else { format!("{issuer}-{trimmed}-{hash:08x}") }
    } else {
        format!("{issuer}-{clean}")
    }
}

/// An error with its sources (`client error (Connect): TLS handshake with …: invalid peer
/// certificate: UnknownIssuer`): the legacy client's own message says little.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// `max-age=N` of one Cache-Control header value.
fn parse_max_age(value: &str) -> Option<Duration> {
    value.split(',').find_map(|d| {
        let (k, v) = d.trim().split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("max-age") {
            return None;
        }
        v.trim().trim_matches('"').parse::<u64>().ok().map(Duration::from_secs)
    })
}

fn clamp_max_age(d: Duration) -> Duration {
    d.clamp(MIN_MAX_AGE, MAX_MAX_AGE)
}

fn to_timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX), nanos: 0 }
}

fn to_system_time(t: &prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(t.seconds).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_follow_the_name_rules() {
        assert_eq!(key_name("idp", "abc-1"), "idp-abc-1");
        let n = key_name("idp", "ABC_1");
        assert!(n.starts_with("idp-abc-1-"), "{n}");
        assert_ne!(key_name("idp", "ABC_1"), key_name("idp", "abc_1"));
        assert!(portcullis_shared::validate::name(&key_name("idp", "__")).is_ok());
        let long = "k".repeat(400);
        let n = key_name("idp", &long);
        assert!(n.len() <= MAX_NAME_LEN && portcullis_shared::validate::name(&n).is_ok(), "{n}");
    }

    #[test]
    fn max_age_is_parsed_and_clamped() {
        assert_eq!(parse_max_age("public, max-age=600"), Some(Duration::from_secs(600)));
        assert_eq!(parse_max_age("no-store"), None);
        assert_eq!(clamp_max_age(Duration::from_secs(1)), MIN_MAX_AGE);
        assert_eq!(clamp_max_age(Duration::from_secs(10_000_000)), MAX_MAX_AGE);
    }

    #[test]
    fn jwks_keys_must_fit_the_issuer() {
        let ec = serde_json::json!({"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "kid": "e1"});
        assert_eq!(accept_jwk(&ec, &[Algorithm::ES256]).as_deref(), Ok("e1"));
        assert!(accept_jwk(&ec, &[Algorithm::RS256]).is_err());
        let private = serde_json::json!({"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "d": "c", "kid": "e1"});
        assert!(accept_jwk(&private, &[Algorithm::ES256]).is_err());
        let no_kid = serde_json::json!({"kty": "EC", "crv": "P-256", "x": "a", "y": "b"});
        assert!(accept_jwk(&no_kid, &[Algorithm::ES256]).is_err());
        let enc = serde_json::json!({"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "kid": "e", "use": "enc"});
        assert!(accept_jwk(&enc, &[Algorithm::ES256]).is_err());
    }
}

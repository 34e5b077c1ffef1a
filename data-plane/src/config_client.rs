//! The proxy's end of the config stream (DESIGN.md §3): connects to a control plane with the
//! bootstrap token, says hello with the version it holds, and for every response — a full
//! snapshot or a delta on top of the version it holds — applies it to its resources (in place,
//! with an undo log), compiles that on the blocking pool (a delta of routes from the previous
//! snapshot, in time proportional to the change), persists it as last-known-good (a delta as
//! one appended log record), publishes it with one pointer swap and ACKs; or NACKs with the
//! error, undoes the change and keeps serving the previous snapshot.
//! It reconnects on any error with full-jitter exponential backoff, rotating through the
//! configured control-plane endpoints. It also passes the request path's unknown-kid reports
//! ([`crate::kid_reports`]) to the control plane on the open stream; reports made while no stream
//! is open are dropped (and counted).
//!
//! It must never publish a version that did not compile, never block the runtime with a
//! compilation (10k routes take milliseconds), and never log the token. The request path does not
//! depend on it: a proxy whose control plane is away keeps serving what it has.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use portcullis_proto::config::v1 as pb;
use portcullis_proto::discovery::v1::config_request::Msg;
use portcullis_proto::discovery::v1::discovery_service_client::DiscoveryServiceClient;
use portcullis_proto::discovery::v1::{Ack, ConfigRequest, ConfigResponse, Nack, ProxyHello, UnknownKid};
use portcullis_shared::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::kid_reports::{KidReportReceiver, UnknownKidReport};
use crate::lkg::{self, LastKnownGood};
use crate::snapshot::{self, ResourceMap, Snapshot, SnapshotHandle};

/// A full snapshot of a large configuration is one message (as on the control plane's side).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings find a control plane that vanished without closing the connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct ConfigClientOptions {
    /// Control-plane URLs (`http://host:port`), tried in rotation.
    pub endpoints: Vec<String>,
    pub proxy_id: String,
    pub zone: String,
    /// The bootstrap token, sent as `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Where the last-known-good configuration is kept; `None` = not kept.
    pub cache_dir: Option<PathBuf>,
}

impl fmt::Debug for ConfigClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigClientOptions")
            .field("endpoints", &self.endpoints)
            .field("proxy_id", &self.proxy_id)
            .field("zone", &self.zone)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("cache_dir", &self.cache_dir)
            .finish()
    }
}

/// Why a stream ended; the client reconnects after each.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("invalid control-plane endpoint {endpoint:?}: {source}")]
    Endpoint { endpoint: String, source: tonic::transport::Error },
    #[error("connecting to {endpoint}: {source}")]
    Connect { endpoint: String, source: tonic::transport::Error },
    #[error("the bootstrap token is not a valid header value")]
    Token,
    #[error("the control plane refused the stream: {0}")]
    Refused(tonic::Status),
    #[error("the config stream broke: {0}")]
    Broken(tonic::Status),
    #[error("the control plane closed the config stream")]
    Closed,
    #[error("a delta from version {base} does not apply to the held version {held}; resyncing from scratch")]
    BaseMismatch { base: i64, held: i64 },
    #[error("the compile task failed: {0}")]
    Task(String),
}

type RejectHook = Arc<dyn Fn(&ResourceMap) -> Option<String> + Send + Sync>;

/// The config stream client of one proxy. Long-lived: `run` until shutdown.
pub struct ConfigClient {
    options: ConfigClientOptions,
    snapshots: SnapshotHandle,
    /// The resources of the version held (the one published, or none yet): what deltas apply to.
    resources: ResourceMap,
    /// The version `resources` is; 0 = none (then `resources` is empty).
    version: i64,
    /// The last-known-good files, if kept; `None` while a compile task has them.
    lkg: Option<LastKnownGood>,
    reject_for_test: Option<RejectHook>,
    /// Unknown-kid reports from the request path, passed on to the control plane.
    kid_reports: Option<KidReportReceiver>,
}

impl ConfigClient {
    pub fn new(options: ConfigClientOptions, snapshots: SnapshotHandle) -> ConfigClient {
        let lkg = options.cache_dir.clone().map(LastKnownGood::new);
        ConfigClient {
            options,
            snapshots,
            resources: ResourceMap::new(),
            version: 0,
            lkg,
            reject_for_test: None,
            kid_reports: None,
        }
    }

    /// Sends the reports of the pipeline's [`KidReporter`](crate::kid_reports::KidReporter) to
    /// the control plane.
    pub fn with_kid_reports(mut self, reports: KidReportReceiver) -> ConfigClient {
        self.kid_reports = Some(reports);
        self
    }

    /// **Tests only.** Rejects (NACKs) every version for which `reject` returns a reason, as if
    /// it had not compiled: a way to provoke a proxy-side failure with a configuration the
    /// control plane accepts. Never used by the proxy binary.
    #[doc(hidden)]
    pub fn reject_config_for_test(
        mut self,
        reject: impl Fn(&ResourceMap) -> Option<String> + Send + Sync + 'static,
    ) -> ConfigClient {
        self.reject_for_test = Some(Arc::new(reject));
        self
    }

    /// Loads the last-known-good file (if any), compiles it and publishes it; returns its
    /// version. Called at start-up before `run`, so a proxy whose control plane is unreachable
    /// serves. Blocking (file read and compile).
    pub fn load_last_known_good(&mut self) -> Option<i64> {
        let (version, resources) = match self.lkg.as_mut()?.load() {
            Ok(Some(loaded)) => loaded,
            Ok(None) => {
                info!(proxy.id = %self.options.proxy_id, "no last-known-good configuration yet");
                return None;
            }
            Err(e) => {
                warn!(proxy.id = %self.options.proxy_id, error = %e, "last-known-good configuration unreadable; ignored");
                return None;
            }
        };
        match snapshot::compile(version, &resources) {
            Ok(snapshot) => {
                self.snapshots.store(Some(Arc::new(snapshot)));
                info!(proxy.id = %self.options.proxy_id, config.version = version, resources = resources.len(), "serving the last-known-good configuration");
                self.resources = resources;
                self.version = version;
                Some(version)
            }
            Err(e) => {
                warn!(proxy.id = %self.options.proxy_id, config.version = version, error = %e, "last-known-good configuration does not compile; ignored");
                None
            }
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let endpoints = self.options.endpoints.clone();
        if endpoints.is_empty() {
            error!(proxy.id = %self.options.proxy_id, "no control-plane endpoints configured; serving what is held, without updates");
            return;
        }
        let mut backoff = Backoff::new();
        for endpoint in endpoints.iter().cycle() {
            // One span per connection, with the version it started from: events carry the
            // current version (re-recording a span field would append to it forever).
            let span = info_span!("config_stream", proxy.id = %self.options.proxy_id, config.version = self.version);
            match self.session(endpoint, &mut backoff, &shutdown).instrument(span.clone()).await {
                Ok(()) => return,
                Err(e) => span.in_scope(|| warn!(endpoint = %endpoint, error = %e, "config stream lost; reconnecting")),
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection: hello, then apply and (N)ACK each response. `Ok` only on shutdown.
    async fn session(
        &mut self,
        endpoint: &str,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> Result<(), StreamError> {
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|source| StreamError::Endpoint { endpoint: endpoint.to_owned(), source })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let channel = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            c = channel.connect() => c.map_err(|source| StreamError::Connect { endpoint: endpoint.to_owned(), source })?,
        };
        let mut client = DiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);

        // Room for the hello, one (N)ACK (there is never more than one response to answer) and
        // a few unknown-kid reports (which are dropped rather than waited for).
        let (tx, rx) = mpsc::channel(4);
        let hello = ProxyHello {
            id: self.options.proxy_id.clone(),
            zone: self.options.zone.clone(),
            build: env!("CARGO_PKG_VERSION").to_owned(),
            version: self.version,
        };
        tx.try_send(ConfigRequest { msg: Some(Msg::Hello(hello)) }).map_err(|_| StreamError::Closed)?;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = &self.options.token {
            let value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| StreamError::Token)?;
            request.metadata_mut().insert("authorization", value);
        }
        let response = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = client.stream_config(request) => r.map_err(StreamError::Refused)?,
        };
        let mut inbound = response.into_inner();
        info!(endpoint = %endpoint, config.version = self.version, "config stream open");
        if let Some(reports) = &mut self.kid_reports {
            // Made while no stream was open: the next unknown kid will be reported afresh.
            reports.discard_queued();
        }
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = inbound.message() => m,
                Some(report) = next_report(&mut self.kid_reports) => {
                    self.send_report(&tx, report);
                    continue;
                }
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => return Err(StreamError::Closed),
                Err(status) => return Err(StreamError::Broken(status)),
            };
            let Some(reply) = self.handle(response, shutdown).await? else {
                return Ok(());
            };
            backoff.reset();
            if tx.send(reply).await.is_err() {
                return Err(StreamError::Closed);
            }
        }
    }

    /// Applies one response; returns the (N)ACK to send, or `None` on shutdown.
    async fn handle(
        &mut self,
        response: ConfigResponse,
        shutdown: &CancellationToken,
    ) -> Result<Option<ConfigRequest>, StreamError> {
        let version = response.version;
        if !response.full && response.base_version != self.version {
            let err = StreamError::BaseMismatch { base: response.base_version, held: self.version };
            // Version 0 holds nothing: the next stream starts from an empty map.
            self.resources.clear();
            self.version = 0;
            return Err(err);
        }
        let unchanged = !response.full && response.upserts.is_empty() && response.removals.is_empty();
        if unchanged && version == self.version && self.published_version() == Some(version) {
            // Already current (the first response after a hello, when nothing changed).
            return Ok(Some(ack(version)));
        }
        let full = response.full;
        let started = Instant::now();
        let resources = std::mem::take(&mut self.resources);
        let mut lkg = self.lkg.take();
        let reject = self.reject_for_test.clone();
        let previous = self.snapshots.load_full();
        let task = tokio::task::spawn_blocking(move || {
            let applied = apply(resources, response, lkg.as_mut(), reject, previous.as_deref());
            (applied, lkg)
        });
        let applied = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            r = task => r,
        };
        let applied = match applied {
            Ok((applied, lkg)) => {
                self.lkg = lkg;
                applied
            }
            Err(e) => {
                // The resources went with the task: start again from nothing (and with a whole
                // last-known-good snapshot: the next save writes one).
                self.version = 0;
                self.lkg = self.options.cache_dir.clone().map(LastKnownGood::new);
                return Err(StreamError::Task(e.to_string()));
            }
        };
        self.resources = applied.resources;
        if let Some(e) = applied.persist_error {
            // Serving the new version matters more than remembering it; say so loudly.
            error!(config.version = version, error = %e, "saving the last-known-good configuration failed");
        }
        match applied.outcome {
            Ok(snapshot) => {
                let previous = self.snapshots.swap(Some(Arc::new(snapshot)));
                if previous.is_some() {
                    // Freeing a whole configuration takes a while; not on a runtime thread
                    // (a request still holding it frees it when it ends instead).
                    tokio::task::spawn_blocking(move || drop(previous));
                }
                self.version = version;
                info!(
                    config.version = version,
                    full,
                    resources = self.resources.len(),
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "configuration applied"
                );
                Ok(Some(ack(version)))
            }
            Err(error) => {
                warn!(config.version = version, error = %error, "configuration rejected; serving the previous version");
                Ok(Some(ConfigRequest { msg: Some(Msg::Nack(Nack { version, error })) }))
            }
        }
    }

    fn published_version(&self) -> Option<i64> {
        self.snapshots.load_full().map(|s| s.version)
    }

    /// Puts an unknown-kid report on the stream, or drops it if the stream's queue is full.
    fn send_report(&self, tx: &mpsc::Sender<ConfigRequest>, report: UnknownKidReport) {
        let Some(reports) = &self.kid_reports else { return };
        let UnknownKidReport { issuer, kid } = report;
        let message = ConfigRequest { msg: Some(Msg::UnknownKid(UnknownKid { issuer, kid })) };
        match tx.try_send(message) {
            Ok(()) => {
                reports.record_sent();
                debug!("unknown kid reported to the control plane");
            }
            Err(_) => reports.record_dropped(1),
        }
    }
}

/// The next unknown-kid report; never, without a receiver (or once every reporter is gone).
async fn next_report(reports: &mut Option<KidReportReceiver>) -> Option<UnknownKidReport> {
    match reports {
        Some(r) => match r.recv().await {
            Some(report) => Some(report),
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

fn ack(version: i64) -> ConfigRequest {
    ConfigRequest { msg: Some(Msg::Ack(Ack { version })) }
}

/// What the blocking task hands back: the resources (changed on success, as they were on
/// failure) and the compiled snapshot or the reason to NACK.
struct Applied {
    resources: ResourceMap,
    outcome: Result<Snapshot, String>,
    persist_error: Option<lkg::LkgError>,
}

/// On the blocking pool: apply `response` to `resources`, compile, persist on success, undo on
/// failure. Deltas change the map in place and keep an undo log, compile from `previous`
/// (the snapshot of `resources` before the change) and persist as one log record, so a
/// one-route change costs O(changes) here, not a copy, a compile or a write of every resource.
fn apply(
    mut resources: ResourceMap,
    response: ConfigResponse,
    lkg: Option<&mut LastKnownGood>,
    reject: Option<RejectHook>,
    previous: Option<&Snapshot>,
) -> Applied {
    let version = response.version;
    let base = response.base_version;
    let undo = match change(&mut resources, response) {
        Ok(undo) => undo,
        Err(message) => {
            return Applied {
                resources,
                outcome: Err(format!("config version {version} rejected: {message}")),
                persist_error: None,
            };
        }
    };
    let changed = undo.changed();
    let outcome = match reject.and_then(|f| f(&resources)) {
        Some(reason) => Err(format!("config version {version} rejected: {reason}")),
        None => match &changed {
            // From the snapshot of the version the delta applies to, if that is the one
            // published (it is, unless something else swapped one in); else by revision.
            Some(keys) if previous.is_some_and(|p| p.version == base) => {
                snapshot::compile_changes(version, &resources, previous, keys)
            }
            _ => snapshot::compile_from(version, &resources, previous),
        }
        .map_err(|e| e.to_string()),
    };
    match outcome {
        Ok(snapshot) => {
            let persist_error = lkg.and_then(|lkg| match &changed {
                Some(keys) => lkg.save_delta(base, version, &resources, keys).err(),
                None => lkg.save_full(version, &resources).err(),
            });
            Applied { resources, outcome: Ok(snapshot), persist_error }
        }
        Err(e) => {
            undo.revert(&mut resources);
            Applied { resources, outcome: Err(e), persist_error: None }
        }
    }
}

/// How to put the map back as it was before a change.
#[derive(Debug)]
enum Undo {
    Full(ResourceMap),
    /// The previous value (or absence) of each key changed, in the order changed.
    Delta(Vec<((Kind, String), Option<pb::Resource>)>),
}

impl Undo {
    /// The keys a delta changed; `None` for a full snapshot.
    fn changed(&self) -> Option<Vec<(Kind, String)>> {
        match self {
            Undo::Full(_) => None,
            Undo::Delta(log) => Some(log.iter().map(|(key, _)| key.clone()).collect()),
        }
    }

    fn revert(self, resources: &mut ResourceMap) {
        match self {
            Undo::Full(previous) => *resources = previous,
            Undo::Delta(log) => {
                for (key, previous) in log.into_iter().rev() {
                    match previous {
                        Some(r) => resources.insert(key, r),
                        None => resources.remove(&key),
                    };
                }
            }
        }
    }
}

/// Applies a response to `resources`. Every key is checked before anything changes, so an
/// error leaves the map untouched.
fn change(resources: &mut ResourceMap, response: ConfigResponse) -> Result<Undo, String> {
    if response.full {
        if !response.removals.is_empty() {
            return Err("a full snapshot must not carry removals".into());
        }
        let new = lkg::resource_map(response.upserts)?;
        return Ok(Undo::Full(std::mem::replace(resources, new)));
    }
    let mut puts = Vec::with_capacity(response.upserts.len());
    for r in response.upserts {
        let Some(key) = Kind::of(&r).map(|(k, n)| (k, n.to_owned())) else {
            return Err("an upsert sets none of upstream, issuer, key, policy, route, block".into());
        };
        puts.push((key, r));
    }
    let mut removals = Vec::with_capacity(response.removals.len());
    for r in response.removals {
        let Some(kind) = Kind::ALL.into_iter().find(|k| k.as_str() == r.kind) else {
            return Err(format!("removal of {:?}: unknown kind {:?}", r.name, r.kind));
        };
        removals.push((kind, r.name));
    }
    let mut log = Vec::with_capacity(puts.len() + removals.len());
    for (key, r) in puts {
        let previous = resources.insert(key.clone(), r);
        log.push((key, previous));
    }
    for key in removals {
        let previous = resources.remove(&key);
        log.push((key, previous));
    }
    Ok(Undo::Delta(log))
}

/// Full-jitter exponential backoff: each delay is uniform in [0, min(max, base · 2^attempt)].
/// The randomness is a xorshift64* seeded from std's per-process random hasher keys and the
/// clock: proxies restarted together must not reconnect in lockstep; nothing here is secret.
struct Backoff {
    attempt: u32,
    state: u64,
}

impl Backoff {
    fn new() -> Backoff {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        Backoff { attempt: 0, state: hasher.finish() | 1 }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next_delay(&mut self) -> Duration {
        let ceiling = BACKOFF_BASE.saturating_mul(1 << self.attempt.min(16)).min(BACKOFF_MAX);
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.next_u64() % ceiling.saturating_add(1))
    }

    fn next_u64(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_proto::discovery::v1::Removal;

    fn upstream(name: &str, endpoint: &str) -> pb::Resource {
        pb::Resource {
            kind: Some(pb::resource::Kind::Upstream(pb::Upstream {
                name: name.into(),
                endpoints: vec![endpoint.into()],
                ..Default::default()
            })),
        }
    }

    fn key(name: &str) -> (Kind, String) {
        (Kind::Upstream, name.to_owned())
    }

    fn delta(version: i64, base: i64, upserts: Vec<pb::Resource>, removals: &[&str]) -> ConfigResponse {
        ConfigResponse {
            version,
            full: false,
            base_version: base,
            upserts,
            removals: removals.iter().map(|n| Removal { kind: "upstream".into(), name: (*n).into() }).collect(),
        }
    }

    #[test]
    fn deltas_apply_and_revert() {
        let mut map = lkg::resource_map(vec![upstream("a", "127.0.0.1:1"), upstream("b", "127.0.0.1:2")]).unwrap();
        let before = map.clone();
        let undo = change(
            &mut map,
            delta(5, 4, vec![upstream("a", "127.0.0.1:9"), upstream("c", "127.0.0.1:3")], &["b", "zz"]),
        )
        .unwrap();
        assert_eq!(map.keys().cloned().collect::<Vec<_>>(), [key("a"), key("c")]);
        assert_eq!(map[&key("a")], upstream("a", "127.0.0.1:9"));
        undo.revert(&mut map);
        assert_eq!(map, before);
    }

    #[test]
    fn malformed_responses_change_nothing() {
        let mut map = lkg::resource_map(vec![upstream("a", "127.0.0.1:1")]).unwrap();
        let before = map.clone();
        let mut bad_kind = delta(5, 4, vec![upstream("n", "127.0.0.1:1")], &["a"]);
        bad_kind.removals[0].kind = "Upstreams".into();
        assert!(change(&mut map, bad_kind).unwrap_err().contains("unknown kind"));
        assert!(change(&mut map, delta(5, 4, vec![pb::Resource { kind: None }], &[])).is_err());
        let mut twice = delta(5, 0, vec![upstream("x", "127.0.0.1:1"), upstream("x", "127.0.0.1:1")], &[]);
        twice.full = true;
        assert!(change(&mut map, twice).unwrap_err().contains("twice"));
        assert_eq!(map, before);
    }

    #[test]
    fn a_version_that_does_not_compile_leaves_the_map_as_it_was() {
        let map = lkg::resource_map(vec![upstream("a", "127.0.0.1:1")]).unwrap();
        let bad = delta(6, 5, vec![upstream("b", "not an endpoint")], &["a"]);
        let applied = apply(map.clone(), bad, None, None, None);
        assert_eq!(applied.resources, map);
        assert!(applied.outcome.unwrap_err().starts_with("config version 6 rejected: upstream b"));

        let good = delta(6, 5, vec![upstream("b", "127.0.0.1:2")], &[]);
        let reject: RejectHook = Arc::new(|m: &ResourceMap| m.contains_key(&key("b")).then(|| "no b here".to_owned()));
        let applied = apply(map.clone(), good.clone(), None, Some(reject), None);
        assert_eq!(applied.resources, map);
        assert_eq!(applied.outcome.unwrap_err(), "config version 6 rejected: no b here");

        let dir = tempfile::tempdir().unwrap();
        let mut files = LastKnownGood::new(dir.path().to_owned());
        let applied = apply(map.clone(), good, Some(&mut files), None, None);
        assert_eq!(applied.outcome.unwrap().version, 6);
        assert!(applied.persist_error.is_none());
        assert_eq!(lkg::load(dir.path()).unwrap().unwrap(), (6, applied.resources));
    }

    #[test]
    fn applied_versions_are_persisted_and_rejected_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = LastKnownGood::new(dir.path().to_owned());
        let full = ConfigResponse {
            version: 1,
            full: true,
            upserts: vec![upstream("a", "127.0.0.1:1")],
            ..Default::default()
        };
        let one = apply(ResourceMap::new(), full, Some(&mut files), None, None);
        let snap = one.outcome.unwrap();
        let two = apply(
            one.resources,
            delta(2, 1, vec![upstream("b", "127.0.0.1:2")], &["a"]),
            Some(&mut files),
            None,
            Some(&snap),
        );
        let snap = two.outcome.unwrap();
        assert!(two.persist_error.is_none());
        assert_eq!(lkg::load(dir.path()).unwrap().unwrap(), (2, two.resources.clone()));
        let bad = apply(
            two.resources.clone(),
            delta(3, 2, vec![upstream("c", "bad")], &[]),
            Some(&mut files),
            None,
            Some(&snap),
        );
        assert!(bad.outcome.is_err());
        assert_eq!(lkg::load(dir.path()).unwrap().unwrap(), (2, two.resources.clone()));
        // A restarted proxy serves version 2 and appends the next delta on top of it.
        let handle = snapshot::new_handle();
        let options = ConfigClientOptions {
            endpoints: vec![],
            proxy_id: "p".into(),
            zone: "z".into(),
            token: None,
            cache_dir: Some(dir.path().to_owned()),
        };
        let mut client = ConfigClient::new(options, handle.clone());
        assert_eq!(client.load_last_known_good(), Some(2));
        assert_eq!(handle.load().as_ref().map(|s| s.version), Some(2));
        assert_eq!(client.resources, two.resources);
        let mut files = client.lkg.take().unwrap();
        let four = apply(
            client.resources,
            delta(4, 2, vec![upstream("d", "127.0.0.1:4")], &[]),
            Some(&mut files),
            None,
            handle.load_full().as_deref(),
        );
        assert!(four.outcome.is_ok() && four.persist_error.is_none());
        assert_eq!(lkg::load(dir.path()).unwrap().unwrap(), (4, four.resources));
    }

    #[test]
    fn backoff_is_full_jitter_and_capped() {
        let mut b = Backoff::new();
        for attempt in 0..40 {
            let ceiling = BACKOFF_BASE.saturating_mul(1 << attempt.min(16)).min(BACKOFF_MAX);
            assert!(b.next_delay() <= ceiling);
        }
        b.reset();
        assert!(b.next_delay() <= BACKOFF_BASE);
        let delays: std::collections::HashSet<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.len() > 10, "jittered, not constant");
    }
}

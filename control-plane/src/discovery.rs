//! The proxies' side of the control plane: `portcullis.discovery.v1.DiscoveryService`, which
//! streams the configuration to each connected proxy, and the [`ProxyRegistry`] that records
//! what every proxy has acknowledged (served to operators by `ListProxies`).
//!
//! One stream per proxy, with xDS's flow control: at most one unacknowledged response in
//! flight. Each response brings the proxy from the version it last ACKed to the index's current
//! revision, as a delta (`Index::touched_since`) when the index's history reaches back that far
//! and as a full snapshot otherwise; changes that land while a response is in flight coalesce
//! into the next one. A NACKed version is never sent again: the stream waits for the index to
//! move past it.
//!
//! A proxy may also report, at any time, a token `kid` missing from the keys of an issuer whose
//! keys this control plane fetches (`UnknownKid`): the stream task hands it to key rotation
//! ([`KeyRotationHandle::refetch`], rate-limited per issuer) on a task of its own and carries on;
//! new keys reach the proxies as any other change does. Reports for issuers that do not exist or
//! whose keys are inline or a shared secret are ignored.
//!
//! It must not hold the index lock across an `.await` (resources are cloned under the lock,
//! encoded and sent after it is released), must not accept a proxy without the bootstrap token
//! (no token configured = no proxy accepted), must never wait for a key fetch on a stream task,
//! and must never log a token (a reported kid is logged truncated, printable ASCII only).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use portcullis_proto::config::v1 as cfg;
use portcullis_proto::discovery::v1 as pb;
use portcullis_proto::discovery::v1::config_request::Msg;
use portcullis_proto::discovery::v1::discovery_service_server::{DiscoveryService, DiscoveryServiceServer};
use portcullis_shared::Kind;
use portcullis_shared::jwt::MAX_KID_LEN;
use portcullis_shared::model::{Issuer, KeySourceKind};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::keys::{KeyRotationHandle, RefetchOutcome};
use crate::state::{ConfigState, Index};

/// A full snapshot of a large configuration is one message; 64 MiB holds several hundred
/// thousand routes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// How long a new stream may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a proxy that holds a newer version than this replica (it came from a replica further
/// along) waits for this replica's index to catch up before it is sent what this replica has.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);
/// Full snapshots being built or in flight at once, across all streams: a reconnect storm of
/// many proxies must not hold one copy of the whole configuration per proxy in memory.
const CONCURRENT_FULL_SNAPSHOTS: usize = 16;
/// A full snapshot's slot is freed by the proxy's (N)ACK, or after this long: a proxy that
/// never answers must not hold a slot forever.
const FULL_SNAPSHOT_SLOT_TIMEOUT: Duration = Duration::from_secs(30);
/// Disconnected proxies stay listed (with `connected = false`) this long.
const DISCONNECTED_RETENTION: Duration = Duration::from_secs(3600);
/// HTTP/2 pings find proxies that vanished without closing their connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a reported kid (or issuer name) goes into a log line.
const LOGGED_CHARS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading the bootstrap token file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the bootstrap token is empty")]
    Empty,
    #[error("the bootstrap token must be printable ASCII without spaces")]
    NotPrintable,
}

// ---------------------------------------------------------------- authentication

/// The shared secret proxies present as `authorization: Bearer <token>` (development and
/// bootstrap; mTLS comes later). Its `Debug` output never shows it.
#[derive(Clone)]
pub struct BootstrapToken(Arc<[u8]>);

impl BootstrapToken {
    /// The token is `token` with surrounding whitespace trimmed; it must not be empty.
    pub fn new(token: &str) -> Result<BootstrapToken, TokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenError::Empty);
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::NotPrintable);
        }
        Ok(BootstrapToken(token.as_bytes().into()))
    }

    /// Reads the token from `path` (its trimmed content).
    pub fn from_file(path: &Path) -> Result<BootstrapToken, TokenError> {
        let content =
            std::fs::read_to_string(path).map_err(|source| TokenError::Read { path: path.to_owned(), source })?;
        BootstrapToken::new(&content)
    }

    fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(&self.0, presented)
    }
}

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BootstrapToken(<redacted>)")
    }
}

/// Compares without stopping at the first differing byte, so the time taken does not tell an
/// attacker how much of a guess was right. (The length is not hidden; it is not the secret.)
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// `Ok` when `metadata` carries `authorization: Bearer <token>` with the configured token.
fn authenticate(token: Option<&BootstrapToken>, metadata: &MetadataMap) -> Result<(), Status> {
    let Some(token) = token else {
        return Err(Status::unauthenticated("this control plane accepts no proxies: no bootstrap token is configured"));
    };
    let presented = metadata.get("authorization").map(|v| v.as_bytes()).and_then(|v| {
        let (scheme, rest) = v.split_at_checked(7)?;
        scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
    });
    match presented {
        Some(p) if token.matches(p) => Ok(()),
        Some(_) => Err(Status::unauthenticated("invalid bootstrap token")),
        None => Err(Status::unauthenticated("missing bearer token (authorization metadata)")),
    }
}

// ---------------------------------------------------------------- registry

/// What `ListProxies` shows about one proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyStatus {
    pub id: String,
    pub zone: String,
    pub build: String,
    /// The peer address of its current (or last) stream.
    pub address: String,
    pub connected_since: SystemTime,
    /// The last version it ACKed (or, before its first ACK on a stream, the one its hello said it held).
    pub acked_version: i64,
    pub last_nack_version: i64,
    pub last_nack_error: String,
    pub connected: bool,
}

/// The proxies that opened a config stream to **this control-plane replica**, by id. The
/// registry is per replica and not shared through the store: a proxy is listed by the replica it
/// is (or was last) connected to, so an operator asks each replica (or a load balancer spreads
/// `ListProxies` and the answer is partial). Disconnected proxies stay listed with
/// `connected = false` for an hour.
#[derive(Debug, Default)]
pub struct ProxyRegistry {
    inner: Mutex<RegistryInner>,
}

#[derive(Debug, Default)]
struct RegistryInner {
    proxies: BTreeMap<String, Record>,
    next_session: u64,
}

#[derive(Debug)]
struct Record {
    status: ProxyStatus,
    /// Which stream owns the entry: a proxy that reconnects before its old stream is noticed
    /// dead must not be marked disconnected when the old one ends.
    session: u64,
    disconnected_at: Option<Instant>,
}

impl ProxyRegistry {
    pub fn new() -> ProxyRegistry {
        ProxyRegistry::default()
    }

    /// Every proxy, sorted by id.
    pub fn list(&self) -> Vec<ProxyStatus> {
        self.lock().proxies.values().map(|r| r.status.clone()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers (or re-registers) the proxy of a new stream; the returned session updates its
    /// entry and marks it disconnected when dropped.
    fn register(self: &Arc<Self>, hello: &pb::ProxyHello, address: Option<SocketAddr>) -> Session {
        let mut inner = self.lock();
        inner.next_session += 1;
        let session = inner.next_session;
        inner.proxies.retain(|_, r| r.disconnected_at.is_none_or(|t| t.elapsed() < DISCONNECTED_RETENTION));
        let status = ProxyStatus {
            id: hello.id.clone(),
            zone: hello.zone.clone(),
            build: hello.build.clone(),
            address: address.map(|a| a.to_string()).unwrap_or_default(),
            connected_since: SystemTime::now(),
            acked_version: hello.version,
            // A NACK is about a version: it stays visible across reconnects until a newer ACK.
            last_nack_version: inner.proxies.get(&hello.id).map_or(0, |r| r.status.last_nack_version),
            last_nack_error: inner.proxies.get(&hello.id).map(|r| r.status.last_nack_error.clone()).unwrap_or_default(),
            connected: true,
        };
        inner.proxies.insert(hello.id.clone(), Record { status, session, disconnected_at: None });
        Session { registry: Arc::clone(self), id: hello.id.clone(), session }
    }

    fn update(&self, id: &str, session: u64, f: impl FnOnce(&mut Record)) {
        if let Some(r) = self.lock().proxies.get_mut(id).filter(|r| r.session == session) {
            f(r);
        }
    }
}

/// One stream's hold on its registry entry.
struct Session {
    registry: Arc<ProxyRegistry>,
    id: String,
    session: u64,
}

impl Session {
    fn acked(&self, version: i64) {
        self.registry.update(&self.id, self.session, |r| {
            r.status.acked_version = version;
            if version >= r.status.last_nack_version {
                r.status.last_nack_version = 0;
                r.status.last_nack_error.clear();
            }
        });
    }

    fn nacked(&self, version: i64, error: &str) {
        self.registry.update(&self.id, self.session, |r| {
            r.status.last_nack_version = version;
            r.status.last_nack_error = error.to_owned();
        });
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.registry.update(&self.id, self.session, |r| {
            r.status.connected = false;
            r.disconnected_at = Some(Instant::now());
        });
    }
}

// ---------------------------------------------------------------- responses

/// The delta that brings a proxy from `base` to the index's revision; `None` when a full
/// snapshot is needed (the index's history does not reach back to `base`) or is no bigger (the
/// proxy holds nothing, or more keys changed than the configuration holds).
fn delta(idx: &Index, base: i64) -> Option<pb::ConfigResponse> {
    if base == 0 {
        return None;
    }
    let keys = idx.touched_since(base)?;
    if keys.len() > idx.len() {
        return None;
    }
    let mut response =
        pb::ConfigResponse { version: idx.revision(), full: false, base_version: base, ..Default::default() };
    for (kind, name) in keys {
        match idx.get(kind, &name) {
            Some(entry) => response.upserts.push(entry.resource.clone()),
            None => response.removals.push(pb::Removal { kind: kind.as_str().to_owned(), name }),
        }
    }
    Some(response)
}

fn full(idx: &Index) -> pb::ConfigResponse {
    pb::ConfigResponse {
        version: idx.revision(),
        full: true,
        base_version: 0,
        upserts: idx.iter(None).map(|e| e.resource.clone()).collect(),
        removals: Vec::new(),
    }
}

// ---------------------------------------------------------------- service

type ResponseTx = mpsc::Sender<Result<pb::ConfigResponse, Status>>;

/// The gRPC service; one per replica, shared by every stream.
pub struct Discovery {
    state: Arc<ConfigState>,
    registry: Arc<ProxyRegistry>,
    token: Option<BootstrapToken>,
    keys: Option<KeyRotationHandle>,
    full_snapshots: Arc<Semaphore>,
    shutdown: CancellationToken,
}

impl Discovery {
    /// With `token = None` every proxy is refused; with `keys = None` unknown-kid reports are
    /// ignored (no key rotation runs here).
    pub fn new(
        state: Arc<ConfigState>,
        registry: Arc<ProxyRegistry>,
        token: Option<BootstrapToken>,
        keys: Option<KeyRotationHandle>,
        shutdown: CancellationToken,
    ) -> Discovery {
        Discovery {
            state,
            registry,
            token,
            keys,
            full_snapshots: Arc::new(Semaphore::new(CONCURRENT_FULL_SNAPSHOTS)),
            shutdown,
        }
    }
}

#[tonic::async_trait]
impl DiscoveryService for Discovery {
    type StreamConfigStream = ReceiverStream<Result<pb::ConfigResponse, Status>>;

    async fn stream_config(
        &self,
        request: Request<Streaming<pb::ConfigRequest>>,
    ) -> Result<Response<Self::StreamConfigStream>, Status> {
        let peer = request.remote_addr();
        if let Err(status) = authenticate(self.token.as_ref(), request.metadata()) {
            warn!(peer = ?peer, error = status.message(), "proxy refused");
            return Err(status);
        }
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(pb::ConfigRequest { msg: Some(Msg::Hello(hello)) }))) => hello,
            Ok(Ok(Some(_))) => {
                return Err(Status::invalid_argument("the first message of a config stream must be a hello"));
            }
            Ok(Ok(None)) => return Err(Status::invalid_argument("the config stream ended before its hello")),
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no hello within 10 s")),
        };
        if hello.id.is_empty() {
            return Err(Status::invalid_argument("hello.id: required"));
        }
        if hello.version < 0 {
            return Err(Status::invalid_argument("hello.version: must not be negative"));
        }
        let session = self.registry.register(&hello, peer);
        info!(proxy.id = %hello.id, proxy.zone = %hello.zone, proxy.build = %hello.build, peer = ?peer, config.version = hello.version, "proxy connected");
        // Capacity 1: the next response is built only once the previous one is acknowledged, so
        // the channel never holds more than the one in flight.
        let (tx, rx) = mpsc::channel(1);
        let span = info_span!("config_stream", proxy.id = %hello.id, config.version = hello.version);
        let stream = ProxyStream {
            state: Arc::clone(&self.state),
            full_snapshots: Arc::clone(&self.full_snapshots),
            keys: self.keys.clone(),
            shutdown: self.shutdown.clone(),
            session,
            acked: hello.version,
        };
        tokio::spawn(stream.run(inbound, tx).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Why a stream ended (for the log line).
enum End {
    Shutdown,
    ProxyClosed,
    Broken(Status),
    Protocol(&'static str),
    ResponseDropped,
}

/// One proxy's stream: sends, waits for the (N)ACK, waits for the index to move, sends again.
struct ProxyStream {
    state: Arc<ConfigState>,
    full_snapshots: Arc<Semaphore>,
    keys: Option<KeyRotationHandle>,
    shutdown: CancellationToken,
    session: Session,
    /// The version the proxy holds (its hello, then its ACKs).
    acked: i64,
}

impl ProxyStream {
    async fn run(mut self, mut inbound: Streaming<pb::ConfigRequest>, tx: ResponseTx) {
        let end = self.serve(&mut inbound, &tx).await;
        match end {
            End::Shutdown => {
                let _ = tx.try_send(Err(Status::unavailable("the control plane is shutting down")));
                info!("config stream closed: control plane shutting down");
            }
            End::ProxyClosed => info!("proxy disconnected"),
            End::Broken(status) => info!(error = %status, "proxy disconnected: stream broken"),
            End::Protocol(message) => {
                warn!(error = message, "config stream closed: protocol violation");
                let _ = tx.try_send(Err(Status::invalid_argument(message)));
            }
            End::ResponseDropped => info!("proxy disconnected: response stream dropped"),
        }
        // `self.session` drops here: the proxy is marked disconnected.
    }

    async fn serve(&mut self, inbound: &mut Streaming<pb::ConfigRequest>, tx: &ResponseTx) -> End {
        let mut revisions = self.state.subscribe();
        if self.acked > *revisions.borrow() {
            // The proxy came from a replica further along: wait for ours rather than move it back.
            let caught_up = tokio::select! {
                _ = self.shutdown.cancelled() => return End::Shutdown,
                r = tokio::time::timeout(CATCH_UP_TIMEOUT, revisions.wait_for(|r| *r >= self.acked)) => r,
            };
            if caught_up.is_err() {
                warn!(
                    config.version = self.acked,
                    "proxy holds a version this replica has not reached; sending a full snapshot"
                );
            }
        }
        // The last version the proxy NACKed: not sent again until the index moves past it.
        let mut nacked = i64::MIN;
        // The response awaiting an (N)ACK.
        let mut in_flight: Option<InFlight> = None;
        let mut first = true;
        loop {
            if in_flight.is_none() {
                let current = *revisions.borrow_and_update();
                if first || current > self.acked.max(nacked) {
                    first = false;
                    match self.respond(tx).await {
                        Ok(sent) => in_flight = Some(sent),
                        Err(end) => return end,
                    }
                }
            }
            let slot_deadline = in_flight.as_ref().and_then(|f| f.slot.as_ref().map(|(_, until)| *until));
            tokio::select! {
                _ = self.shutdown.cancelled() => return End::Shutdown,
                _ = sleep_until_or_never(slot_deadline) => {
                    if let Some(f) = &mut in_flight {
                        f.slot = None;
                    }
                }
                changed = revisions.changed(), if in_flight.is_none() => {
                    if changed.is_err() {
                        return End::Shutdown; // the configuration state is gone
                    }
                }
                message = inbound.message() => {
                    let msg = match message {
                        Ok(Some(pb::ConfigRequest { msg: Some(msg) })) => msg,
                        Ok(Some(pb::ConfigRequest { msg: None })) => return End::Protocol("empty config request"),
                        Ok(None) => return End::ProxyClosed,
                        Err(status) => return End::Broken(status),
                    };
                    // Not part of the (N)ACK flow: it may come at any time.
                    let msg = match msg {
                        Msg::UnknownKid(report) => {
                            self.unknown_kid(report);
                            continue;
                        }
                        msg => msg,
                    };
                    // Taking it frees its full-snapshot slot, if it holds one.
                    let Some(InFlight { version: sent, .. }) = in_flight.take() else {
                        return End::Protocol("an ack or nack arrived with no response in flight");
                    };
                    match msg {
                        Msg::Ack(ack) if ack.version == sent => {
                            self.acked = sent;
                            self.session.acked(sent);
                            debug!(config.version = sent, "proxy acknowledged");
                        }
                        Msg::Nack(nack) if nack.version == sent => {
                            nacked = sent;
                            self.session.nacked(sent, &nack.error);
                            warn!(config.version = sent, error = %nack.error, "proxy rejected the configuration");
                        }
                        Msg::Ack(_) | Msg::Nack(_) => {
                            return End::Protocol("an ack or nack named a version that is not the one in flight");
                        }
                        Msg::Hello(_) => return End::Protocol("a second hello on one config stream"),
                        Msg::UnknownKid(_) => {} // handled above
                    }
                }
            }
        }
    }

    /// A proxy met `report.kid` in a token of `report.issuer`: refetch that issuer's keys, on a
    /// task of its own (the fetch takes up to the fetch timeout; this stream must not wait).
    fn unknown_kid(&self, report: pb::UnknownKid) {
        let pb::UnknownKid { issuer, kid } = report;
        if kid.is_empty() || kid.len() > MAX_KID_LEN {
            debug!(issuer = %loggable(&issuer), kid.len = kid.len(), "unknown-kid report with an empty or overlong kid; ignored");
            return;
        }
        let kid = loggable(&kid);
        let Some(keys) = &self.keys else {
            debug!(issuer = %loggable(&issuer), kid = %kid, "unknown kid reported; no key rotation runs here");
            return;
        };
        if !fetches_keys(&self.state.index(), &issuer) {
            debug!(issuer = %loggable(&issuer), kid = %kid, "unknown kid reported for an issuer whose keys are not fetched; ignored");
            return;
        }
        let keys = keys.clone();
        let proxy = self.session.id.clone();
        let refetch = async move {
            let outcome = keys.refetch(&issuer).await;
            match &outcome {
                RefetchOutcome::Fetched => {
                    info!(issuer = %issuer, kid = %kid, proxy.id = %proxy, outcome = outcome.as_str(), "keys refetched after an unknown kid")
                }
                RefetchOutcome::Failed(e) => {
                    warn!(issuer = %issuer, kid = %kid, proxy.id = %proxy, outcome = outcome.as_str(), error = %e, "key refetch after an unknown kid failed")
                }
                RefetchOutcome::RateLimited | RefetchOutcome::UnknownIssuer | RefetchOutcome::Stopped => {
                    debug!(issuer = %issuer, kid = %kid, proxy.id = %proxy, outcome = outcome.as_str(), "no key refetch after an unknown kid")
                }
            }
        };
        tokio::spawn(refetch.in_current_span());
    }

    /// Builds and sends the response that brings the proxy from `acked` to the index's revision.
    async fn respond(&self, tx: &ResponseTx) -> Result<InFlight, End> {
        // The guard lives only inside these synchronous calls: never across an `.await`.
        let delta = delta(&self.state.index(), self.acked);
        let (response, slot) = match delta {
            Some(response) => (response, None),
            None => {
                let permit = tokio::select! {
                    _ = self.shutdown.cancelled() => return Err(End::Shutdown),
                    p = Arc::clone(&self.full_snapshots).acquire_owned() => p.ok(),
                };
                let slot = permit.map(|p| (p, tokio::time::Instant::now() + FULL_SNAPSHOT_SLOT_TIMEOUT));
                (full(&self.state.index()), slot)
            }
        };
        let version = response.version;
        debug!(
            config.version = version,
            full = response.full,
            base_version = response.base_version,
            upserts = response.upserts.len(),
            removals = response.removals.len(),
            "sending configuration"
        );
        tokio::select! {
            _ = self.shutdown.cancelled() => Err(End::Shutdown),
            sent = tx.send(Ok(response)) => match sent {
                Ok(()) => Ok(InFlight { version, slot }),
                Err(_) => Err(End::ResponseDropped),
            },
        }
    }
}

/// Whether `name` is an Issuer whose keys are fetched (`jwks_uri` or discovery).
fn fetches_keys(idx: &Index, name: &str) -> bool {
    match idx.get(Kind::Issuer, name).map(|e| &e.resource.kind) {
        Some(Some(cfg::resource::Kind::Issuer(p))) => Issuer::try_from(p)
            .is_ok_and(|i| matches!(i.keys.kind, KeySourceKind::JwksUri(_) | KeySourceKind::Discovery(_))),
        _ => false,
    }
}

/// A reported kid (or an issuer name not checked yet) for a log line: untrusted, so printable
/// ASCII only (others become `?`) and at most [`LOGGED_CHARS`] characters (then `…`).
fn loggable(value: &str) -> String {
    let mut out: String =
        value.chars().take(LOGGED_CHARS).map(|c| if c.is_ascii_graphic() { c } else { '?' }).collect();
    if value.chars().nth(LOGGED_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// A response sent and not yet answered.
struct InFlight {
    version: i64,
    /// A full snapshot's slot in [`CONCURRENT_FULL_SNAPSHOTS`], held until the answer or a deadline.
    slot: Option<(OwnedSemaphorePermit, tokio::time::Instant)>,
}

async fn sleep_until_or_never(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Serves the discovery service on `listener` until `shutdown` fires; open streams end then
/// (with `UNAVAILABLE`, and proxies reconnect elsewhere), so the server drains promptly.
/// Unknown-kid reports go to `keys` (ignored without it).
pub async fn serve(
    state: Arc<ConfigState>,
    registry: Arc<ProxyRegistry>,
    token: Option<BootstrapToken>,
    keys: Option<KeyRotationHandle>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let addr = listener.local_addr().ok();
    let service = DiscoveryServiceServer::new(Discovery::new(state, registry, token, keys, shutdown.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    info!(proxy.addr = ?addr, "config streams listening");
    // Small responses (one changed route) must not wait for Nagle.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::encode;
    use crate::store::{Event, WatchBatch};
    use portcullis_proto::config::v1 as cfg;
    use portcullis_shared::Kind;
    use tonic::metadata::MetadataValue;

    fn upstream(name: &str) -> cfg::Resource {
        cfg::Resource {
            kind: Some(cfg::resource::Kind::Upstream(cfg::Upstream {
                name: name.into(),
                endpoints: vec!["127.0.0.1:9000".into()],
                ..Default::default()
            })),
        }
    }

    fn put(idx: &mut Index, revision: i64, name: &str) {
        idx.apply(WatchBatch {
            revision,
            events: vec![Event {
                kind: Kind::Upstream,
                name: name.into(),
                value: Some(encode(&upstream(name))),
                revision,
            }],
        });
    }

    fn del(idx: &mut Index, revision: i64, name: &str) {
        idx.apply(WatchBatch {
            revision,
            events: vec![Event { kind: Kind::Upstream, name: name.into(), value: None, revision }],
        });
    }

    fn names(r: &pb::ConfigResponse) -> (Vec<String>, Vec<String>) {
        let ups = r.upserts.iter().map(|u| Kind::of(u).unwrap().1.to_owned()).collect();
        let rms = r.removals.iter().map(|x| format!("{}/{}", x.kind, x.name)).collect();
        (ups, rms)
    }

    #[test]
    fn deltas_carry_current_values_and_removals() {
        let mut idx = Index::default();
        put(&mut idx, 1, "a");
        put(&mut idx, 2, "b");
        put(&mut idx, 3, "c");
        del(&mut idx, 4, "b");
        let d = delta(&idx, 1).unwrap();
        assert_eq!((d.version, d.base_version, d.full), (4, 1, false));
        assert_eq!(names(&d), (vec!["c".to_owned()], vec!["upstream/b".to_owned()]));
        let current = delta(&idx, 4).unwrap();
        assert!(current.upserts.is_empty() && current.removals.is_empty(), "already current: empty delta");
        assert!(delta(&idx, 5).is_none(), "a version from the future needs a full snapshot");
        assert!(delta(&idx, 0).is_none(), "a proxy that holds nothing gets a full snapshot");
        let f = full(&idx);
        assert_eq!((f.version, f.full), (4, true));
        assert_eq!(names(&f).0, ["a", "c"]);
        for rev in [5, 7, 9] {
            put(&mut idx, rev, &format!("x{rev}"));
            del(&mut idx, rev + 1, &format!("x{rev}"));
        }
        assert!(delta(&idx, 4).is_none(), "more changes than resources: a full snapshot is smaller");
    }

    fn issuer(name: &str, source: cfg::key_source::Source) -> cfg::Resource {
        cfg::Resource {
            kind: Some(cfg::resource::Kind::Issuer(cfg::Issuer {
                name: name.into(),
                issuer: format!("https://{name}.test/"),
                audiences: vec!["api://test".into()],
                algorithms: vec!["ES256".into()],
                keys: Some(cfg::KeySource { source: Some(source), refresh_interval: None }),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn only_issuers_with_fetched_keys_are_refetched() {
        use cfg::key_source::Source;
        let mut idx = Index::default();
        let jwks = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k",
            "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;
        let issuers = [
            issuer("by-uri", Source::JwksUri("http://idp.test/jwks".into())),
            issuer("by-discovery", Source::Discovery("http://idp.test".into())),
            issuer("inline", Source::InlineJwks(jwks.into())),
        ];
        for (i, resource) in issuers.iter().enumerate() {
            let name = Kind::of(resource).unwrap().1.to_owned();
            let revision = i as i64 + 1;
            let event = Event { kind: Kind::Issuer, name, value: Some(encode(resource)), revision };
            idx.apply(WatchBatch { revision, events: vec![event] });
        }
        put(&mut idx, 10, "not-an-issuer");
        for (name, fetched) in
            [("by-uri", true), ("by-discovery", true), ("inline", false), ("not-an-issuer", false), ("nobody", false)]
        {
            assert_eq!(fetches_keys(&idx, name), fetched, "{name}");
        }
    }

    #[test]
    fn reported_kids_are_logged_printable_and_short() {
        let check = |kid: &str, logged: &str| assert_eq!(loggable(kid), logged, "{kid:?}");
        check("rsa-2", "rsa-2");
        check("a b\n\u{1b}[31m", "a?b??[31m");
        check("\u{e9}t\u{e9}", "?t?");
        check(&"k".repeat(64), &"k".repeat(64));
        check(&"k".repeat(65), &format!("{}\u{2026}", "k".repeat(64)));
    }

    fn metadata(value: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(v) = value {
            m.insert("authorization", MetadataValue::try_from(v).unwrap());
        }
        m
    }

    #[test]
    fn authentication() {
        let token = BootstrapToken::new("  s3cret\n").unwrap();
        let check = |t: Option<&BootstrapToken>, v: Option<&str>| authenticate(t, &metadata(v)).map_err(|s| s.code());
        assert_eq!(check(Some(&token), Some("Bearer s3cret")), Ok(()));
        assert_eq!(check(Some(&token), Some("bearer s3cret")), Ok(()));
        assert_eq!(check(Some(&token), Some("Bearer s3cret2")), Err(tonic::Code::Unauthenticated));
        assert_eq!(check(Some(&token), Some("Bearer s3cre")), Err(tonic::Code::Unauthenticated));
        assert_eq!(check(Some(&token), Some("s3cret")), Err(tonic::Code::Unauthenticated));
        assert_eq!(check(Some(&token), Some("Bearer ")), Err(tonic::Code::Unauthenticated));
        assert_eq!(check(Some(&token), None), Err(tonic::Code::Unauthenticated));
        assert_eq!(check(None, Some("Bearer s3cret")), Err(tonic::Code::Unauthenticated), "no token: refuse all");
        assert!(matches!(BootstrapToken::new(" \n"), Err(TokenError::Empty)));
        assert!(matches!(BootstrapToken::new("a b"), Err(TokenError::NotPrintable)));
        assert_eq!(format!("{token:?}"), "BootstrapToken(<redacted>)");
    }

    #[test]
    fn registry_keeps_disconnected_proxies_and_ignores_stale_sessions() {
        let registry = Arc::new(ProxyRegistry::new());
        let hello = |id: &str, version| pb::ProxyHello { id: id.into(), zone: "z".into(), build: "b".into(), version };
        let first = registry.register(&hello("p2", 3), None);
        let other = registry.register(&hello("p1", 0), None);
        first.acked(5);
        first.nacked(6, "bad route");
        assert_eq!(registry.list().iter().map(|p| p.id.as_str()).collect::<Vec<_>>(), ["p1", "p2"]);
        // p2 reconnects before its old stream is noticed dead
        let second = registry.register(&hello("p2", 5), None);
        drop(first);
        let p2 = registry.list().into_iter().find(|p| p.id == "p2").unwrap();
        assert!(p2.connected, "the old stream ending must not disconnect the new one");
        assert_eq!((p2.acked_version, p2.last_nack_version, p2.last_nack_error.as_str()), (5, 6, "bad route"));
        second.acked(7);
        drop(second);
        drop(other);
        let list = registry.list();
        assert!(list.iter().all(|p| !p.connected));
        let p2 = list.into_iter().find(|p| p.id == "p2").unwrap();
        assert_eq!((p2.acked_version, p2.last_nack_version, p2.last_nack_error.as_str()), (7, 0, ""));
    }
}

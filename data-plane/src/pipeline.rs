//! The request pipeline: one concrete [`Pipeline`] running named stages, in the DESIGN.md §4
//! order, over one [`RequestCtx`], then forwarding. A stage returns [`Verdict::Continue`] or
//! [`Verdict::Deny`]; it never builds a response: [`Denial::to_response`] does, in one place.
//!
//! Stages today: request id → config snapshot → client IP → path normalization → route match →
//! CIDR filter → strip identity headers → authentication → authorization → body limit → rewrite.
//! Then the request goes upstream.
//!
//! Authentication (JWTs): `public` passes. `required` needs a bearer token (none, or another
//! scheme: 401 with a plain `Bearer` challenge); the token is verified through the proxy's one
//! [`TokenCache`] against the verifiers of the policy's issuers, chosen by its `iss` (none of
//! them: `token_issuer_mismatch`); any failure is 401 `invalid_token`. `optional` passes without
//! a bearer token (anonymously) and verifies one that is sent exactly like `required`.
//!
//! Opaque tokens (policy `tokens: [opaque]`): a bearer token that is not a JWT the policy verifies
//! itself (not JWT-shaped, or the policy accepts opaque tokens only) is introspected at the
//! policy's issuers that have an introspection endpoint ([`crate::introspect`]). A cached answer
//! is used in the stage itself; otherwise the stage answers [`Verdict::Introspect`] and the one
//! asynchronous step of the pipeline calls the authorization server (boxed, so the common path's
//! future stays small). Active: the claims are authorized like a JWT's and `Authorization`
//! carries the JWT from the answer instead of the opaque token (the phantom-token swap), whatever
//! `forward_token` says — the opaque token never goes upstream. Refused: 401 `invalid_token`.
//! Authorization server down, slow or untrustworthy: 503 `introspection_unavailable` with
//! `Retry-After`. No issuer with introspection: 401 `token_unverified`.
//!
//! Authorization then runs [`claims::authorize`] on the verified token
//! (403 `insufficient_scope` on a denial). The `Authorization` header is removed before
//! forwarding unless the policy has `forward_token` and a token was verified (then the verified
//! token goes on unchanged); the policy's claim headers (client copies were already stripped)
//! are set from the verified claims: strings as they are, other values JSON-encoded, `null`,
//! missing claims and values that are not valid header values left out.
//!
//! A `report_only` policy decides the same way but lets a request it would refuse through: the
//! denial is counted under its reason and logged (`request would be denied`); nothing about the
//! refused token reaches the upstream (no `Authorization`, no claim headers). Such a denial is
//! counted in `portcullis_proxy_report_only_denials_total`, not in `requests_total`, where the
//! request counts once, as forwarded.
//!
//! What it must not do: load the snapshot more than once per request, hold a lock across an
//! await, format strings for metric labels, or decide anything from the raw path: everything
//! after normalization sees the normalized path, and that path (rewritten) is what is sent.

use std::borrow::Cow;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, EXPECT, HOST, HeaderName, TE};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use ipnet::IpNet;
use portcullis_shared::claims;
use portcullis_shared::jwt::{self, JwtError, TokenCache, VerifiedToken};
use portcullis_shared::model::{Authentication, PathRewrite, Policy, PolicyMode, Route, TokenKind, Upstream};
use portcullis_shared::path::{self, PathError};
use portcullis_shared::{Kind, Violation};
use smallvec::SmallVec;
use tracing::{debug, info};

use crate::denial::{AuthFailure, Denial, Forbidden};
use crate::forward::{
    self, Forwarder, ForwardingFields, Origin, Outgoing, RequestBody, UpstreamBody, X_FORWARDED_FOR, X_REQUEST_ID,
};
use crate::introspect::{Introspection, Introspector, Outcome, Phantom};
use crate::kid_reports::KidReporter;
use crate::metrics::{Metrics, RouteMetrics};
use crate::router::Lookup;
use crate::snapshot::{CompiledRoute, Snapshot, SnapshotHandle};
use crate::upstream::{ConnectTimeouts, UpstreamRegistry, UpstreamState};

/// What the proxy answers with: an upstream's streamed body, or a problem document.
pub type ResponseBody = Either<UpstreamBody, Full<Bytes>>;

/// The longest `X-Request-Id` kept from a client.
pub const MAX_REQUEST_ID_LEN: usize = 128;

// ------------------------------------------------------------------ per-version precomputation

/// What a route needs on the request path, parsed once per config version (at compile time).
#[derive(Debug)]
pub struct RoutePlan {
    pub name: Arc<str>,
    set_headers: Vec<(HeaderName, HeaderValue)>,
    remove_headers: Vec<HeaderName>,
    /// Headers only the proxy may set (the policy's `strip_headers` and claim headers).
    strip_headers: Vec<HeaderName>,
    /// The policy's claim headers: (claim, header).
    claim_headers: Vec<(Box<str>, HeaderName)>,
    /// The route's `limits.timeout`, else the upstream's `request_timeout`.
    pub timeout: Duration,
}

impl RoutePlan {
    pub fn compile(route: &Route, upstream: &Upstream, policy: &Policy) -> Result<RoutePlan, Violation> {
        let fail = |field: &str, message: String| Violation {
            kind: Kind::Route,
            name: route.name.clone(),
            field: field.to_owned(),
            message,
        };
        let name = |field: &str, n: &str| {
            HeaderName::from_bytes(n.as_bytes()).map_err(|_| fail(field, format!("invalid header name {n:?}")))
        };
        let mut set_headers = Vec::with_capacity(route.set_headers.len());
        for (n, v) in &route.set_headers {
            let value =
                HeaderValue::from_str(v).map_err(|_| fail("rewrite.set_headers", format!("invalid value for {n}")))?;
            set_headers.push((name("rewrite.set_headers", n)?, value));
        }
        let remove_headers =
            route.remove_headers.iter().map(|n| name("rewrite.remove_headers", n)).collect::<Result<_, _>>()?;
        let mut strip_headers = Vec::new();
        if let Authentication::Required(a) | Authentication::Optional(a) = &policy.authentication {
            for n in a.strip_headers.iter().chain(policy.claim_headers.values()) {
                strip_headers.push(name("policy", n)?);
            }
        }
        let claim_headers = policy
            .claim_headers
            .iter()
            .map(|(claim, header)| Ok((claim.as_str().into(), name("policy", header)?)))
            .collect::<Result<_, _>>()?;
        Ok(RoutePlan {
            name: route.name.as_str().into(),
            set_headers,
            remove_headers,
            strip_headers,
            claim_headers,
            timeout: route.timeout.unwrap_or(upstream.request_timeout),
        })
    }
}

/// Handles to state that lives outside the snapshot (counters, endpoint state), resolved on a
/// route's first request in a config version and then reused without a lookup.
#[derive(Debug, Default)]
pub struct RouteBindings {
    metrics: OnceLock<Arc<RouteMetrics>>,
    upstream: OnceLock<Arc<UpstreamState>>,
}

// ------------------------------------------------------------------ connection and settings

/// The connection a request arrived on; built once per connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The socket peer, IPv4-mapped addresses unmapped.
    pub peer: IpAddr,
    /// `peer` as a header value, for `X-Forwarded-For` from an untrusted peer.
    peer_header: HeaderValue,
    /// `for=<peer>;proto=<proto>`, the start of the `Forwarded` element naming the peer.
    peer_element: Box<str>,
    pub tls: bool,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool) -> ConnInfo {
        let peer = peer.ip().to_canonical();
        let peer_header =
            HeaderValue::try_from(peer.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        let peer_element = forward::forwarded_peer(peer, tls).into_boxed_str();
        ConnInfo { peer, peer_header, peer_element, tls }
    }
}

/// Proxy-wide settings from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Peers allowed to set `X-Forwarded-For` (and keep `X-Forwarded-Proto`/`-Host`).
    pub trusted_proxies: Vec<IpNet>,
    /// The body limit of routes without `limits.max_body_bytes`.
    pub max_body_bytes: u64,
    /// Connect timeout for endpoints no upstream names (should not happen).
    pub default_connect_timeout: Duration,
    /// How many verified tokens the process-wide token cache holds.
    pub token_cache_size: usize,
    /// How many introspection answers (opaque tokens) the process-wide cache holds.
    pub introspection_cache_size: usize,
    /// CA bundle for https introspection endpoints (default: the system roots).
    pub introspection_ca_file: Option<std::path::PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            trusted_proxies: Vec::new(),
            max_body_bytes: 10 * 1024 * 1024,
            default_connect_timeout: Duration::from_secs(5),
            token_cache_size: 100_000,
            introspection_cache_size: 100_000,
            introspection_ca_file: None,
        }
    }
}

/// Request ids: a per-process random prefix and a counter (`3f9a1c02-1b`).
#[derive(Debug)]
pub struct RequestIds {
    prefix: [u8; 8],
    counter: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        let seed = h.finish();
        let mut prefix = [0; 8];
        for (i, b) in prefix.iter_mut().enumerate() {
            *b = HEX[((seed >> (i * 4)) & 0xf) as usize];
        }
        RequestIds { prefix, counter: AtomicU64::new(1) }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl RequestIds {
    pub fn next(&self) -> HeaderValue {
        let n = self.counter.fetch_add(1, Relaxed);
        let mut buf = [0u8; 8 + 1 + 16];
        buf[..8].copy_from_slice(&self.prefix);
        buf[8] = b'-';
        let digits = (16 - n.leading_zeros() as usize / 4).max(1);
        for i in 0..digits {
            buf[9 + i] = HEX[((n >> ((digits - 1 - i) * 4)) & 0xf) as usize];
        }
        HeaderValue::from_bytes(&buf[..9 + digits]).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
    }
}

/// A client's `X-Request-Id` is kept when it is 1–128 visible ASCII characters.
pub fn valid_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= MAX_REQUEST_ID_LEN && b.iter().all(|c| (0x21..=0x7e).contains(c))
}

// ------------------------------------------------------------------ client address

/// The client address and the `X-Forwarded-For` to send. From an untrusted peer the peer is the
/// client and the chain is replaced by it. From a trusted peer, `X-Forwarded-For` is read right
/// to left: the client is the right-most hop that is not itself a trusted proxy (or the
/// left-most hop when all are trusted; an unparsable hop stops the walk), and the chain sent on
/// is the verified part, from the client on, plus the peer.
pub fn resolve_client(
    peer: IpAddr,
    peer_header: &HeaderValue,
    headers: &http::HeaderMap,
    trusted: &[IpNet],
) -> (IpAddr, HeaderValue, bool) {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return (peer, peer_header.clone(), false);
    }
    let hops: SmallVec<[&str; 8]> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    let mut client = None;
    for (i, hop) in hops.iter().enumerate().rev() {
        let Some(ip) = parse_hop(hop) else { break };
        client = Some((i, ip));
        if !is_trusted(&ip) {
            break;
        }
    }
    let Some((from, ip)) = client else { return (peer, peer_header.clone(), true) };
    let mut chain = String::with_capacity(hops[from..].iter().map(|h| h.len() + 2).sum::<usize>() + 40);
    for hop in &hops[from..] {
        chain.push_str(hop);
        chain.push_str(", ");
    }
    chain.push_str(peer_header.to_str().unwrap_or_default());
    let xff = HeaderValue::try_from(chain).unwrap_or_else(|_| peer_header.clone());
    (ip.to_canonical(), xff, true)
}

/// An `X-Forwarded-For` hop: an IP address, bracketed IPv6 allowed.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let bare = hop.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(hop);
    bare.parse().ok()
}

// ------------------------------------------------------------------ helpers

/// `example.com:8080` → `example.com`, `[::1]:80` → `[::1]`.
pub fn host_without_port(host: &str) -> &str {
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Applies a route's path rewrite to the normalized path. Prefixes apply on segment
/// boundaries; the result always starts with `/`.
pub fn rewrite_path<'a>(rewrite: &PathRewrite, path: &'a str) -> Cow<'a, str> {
    match rewrite {
        PathRewrite::None => Cow::Borrowed(path),
        PathRewrite::StripPrefix(prefix) => replace_prefix(path, prefix, ""),
        PathRewrite::ReplacePrefix { prefix, replacement } => replace_prefix(path, prefix, replacement),
    }
}

fn replace_prefix<'a>(path: &'a str, prefix: &str, replacement: &str) -> Cow<'a, str> {
    let prefix = prefix.trim_end_matches('/');
    let rest = if prefix.is_empty() {
        path
    } else if path == prefix {
        ""
    } else {
        match path.strip_prefix(prefix) {
            Some(rest) if rest.starts_with('/') => rest,
            _ => return Cow::Borrowed(path),
        }
    };
    let replacement = replacement.trim_end_matches('/');
    if replacement.is_empty() && rest.starts_with('/') {
        return Cow::Borrowed(rest);
    }
    let mut out = String::with_capacity(replacement.len() + rest.len() + 1);
    if !replacement.starts_with('/') {
        out.push('/');
    }
    out.push_str(replacement);
    out.push_str(rest);
    Cow::Owned(out)
}

// ------------------------------------------------------------------ the pipeline

/// A stage's answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    Deny(Denial),
    /// The token must be introspected (no cached answer): the pipeline awaits
    /// [`Pipeline::introspect`], whose verdict stands for the stage's.
    Introspect,
}

/// Everything one request carries through the stages.
#[derive(Debug)]
pub struct RequestCtx {
    parts: Parts,
    conn: Arc<ConnInfo>,
    start: Instant,
    request_id: HeaderValue,
    snapshot: Option<Arc<Snapshot>>,
    client_ip: IpAddr,
    peer_trusted: bool,
    xff: HeaderValue,
    /// The host asked for, port included, as sent (for `Host` and `X-Forwarded-Host`).
    host: Option<HeaderValue>,
    /// The normalized path when it differs from the request's.
    normalized: Option<String>,
    route: Option<usize>,
    /// The path and query to send, when not the request's own.
    upstream_path: Option<PathAndQuery>,
    body_limit: u64,
    /// The verified token (after authentication), if one was sent and passed.
    token: Option<Arc<VerifiedToken>>,
}

impl RequestCtx {
    pub fn new(parts: Parts, conn: Arc<ConnInfo>) -> RequestCtx {
        RequestCtx {
            client_ip: conn.peer,
            xff: conn.peer_header.clone(),
            parts,
            conn,
            start: Instant::now(),
            request_id: HeaderValue::from_static("-"),
            snapshot: None,
            peer_trusted: false,
            host: None,
            normalized: None,
            route: None,
            upstream_path: None,
            body_limit: 0,
            token: None,
        }
    }

    /// The request id (after the first stage: the client's valid one, or a generated one).
    pub fn request_id(&self) -> &HeaderValue {
        &self.request_id
    }

    pub fn version(&self) -> Version {
        self.parts.version
    }

    /// The normalized path (after the normalization stage).
    pub fn path(&self) -> &str {
        self.normalized.as_deref().unwrap_or_else(|| self.parts.uri.path())
    }

    fn compiled(&self) -> Option<&CompiledRoute> {
        self.snapshot.as_ref()?.routes.get(self.route?).map(Arc::as_ref)
    }
}

/// Runs synchronous stages, in order, each under the name logs use. Written out as direct
/// calls, not a table of function pointers: called through one indirect call site, the eleven
/// stages mispredicted on every request (measured: 11 mispredicted indirect branches per
/// request). Only `authenticate` may answer `Introspect`; it is run on its own.
macro_rules! run_stages {
    ($pipeline:expr, $ctx:expr, $($name:literal => $stage:ident),+ $(,)?) => {
        $(
            if let Verdict::Deny(denial) = $pipeline.$stage($ctx) {
                return Err(($name, denial));
            }
        )+
    };
}

/// The request pipeline and the long-lived state it uses. One per proxy.
#[derive(Debug)]
pub struct Pipeline {
    snapshots: SnapshotHandle,
    settings: Settings,
    metrics: Arc<Metrics>,
    upstreams: UpstreamRegistry,
    forwarder: Forwarder,
    ids: RequestIds,
    /// Verified tokens, across config versions (entries of changed issuers or keys are void).
    tokens: TokenCache,
    /// Introspection answers for opaque tokens, across config versions.
    introspection: Introspection,
    /// Tells the control plane about kids missing from fetched key sets (off by default).
    kid_reports: KidReporter,
}

impl Pipeline {
    pub fn new(snapshots: SnapshotHandle, settings: Settings, metrics: Arc<Metrics>) -> Pipeline {
        let timeouts = Arc::new(ConnectTimeouts::new(settings.default_connect_timeout));
        Pipeline {
            snapshots,
            upstreams: UpstreamRegistry::new(Arc::clone(&metrics), Arc::clone(&timeouts)),
            forwarder: Forwarder::new(timeouts),
            introspection: Introspection::new(
                settings.introspection_cache_size,
                settings.introspection_ca_file.as_deref(),
                Arc::clone(&metrics),
            ),
            metrics,
            tokens: TokenCache::new(settings.token_cache_size),
            settings,
            ids: RequestIds::default(),
            kid_reports: KidReporter::disabled(),
        }
    }

    /// Reports unknown kids of fetched issuers to `reporter` (whose receiver the config client drains).
    pub fn with_kid_reports(mut self, reporter: KidReporter) -> Pipeline {
        self.kid_reports = reporter;
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Runs one request through the stages and forwards it (the hyper path: HTTP/2 clients).
    pub async fn handle(&self, request: Request<Incoming>, conn: Arc<ConnInfo>) -> Response<ResponseBody> {
        let (parts, body) = request.into_parts();
        let mut ctx = RequestCtx::new(parts, conn);
        if let Err((stage, denial)) = self.decide(&mut ctx).await {
            self.record_denial(&ctx, stage, &denial);
            return problem(&denial, ctx.request_id.clone());
        }
        self.forward(&mut ctx, body).await
    }

    /// Runs the stages over `ctx`: `Ok` when the request may go upstream, else the stage that
    /// refused it and why.
    pub async fn decide(&self, ctx: &mut RequestCtx) -> Result<(), (&'static str, Denial)> {
        run_stages!(self, ctx,
            "request_id" => request_id,
            "snapshot" => load_snapshot,
            "client_ip" => client_ip,
            "normalize_path" => normalize_path,
            "route" => match_route,
            "ip_filter" => ip_filter,
            "strip_identity_headers" => strip_identity_headers,
        );
        let verdict = match self.authenticate(ctx) {
            Verdict::Introspect => Box::pin(self.introspect(ctx)).await,
            verdict => verdict,
        };
        if let Verdict::Deny(denial) = verdict {
            return Err(("authenticate", denial));
        }
        run_stages!(self, ctx,
            "authorize" => authorize,
            "body_limit" => body_limit,
            "rewrite" => rewrite,
        );
        Ok(())
    }

    fn route_metrics(&self, ctx: &RequestCtx) -> Arc<RouteMetrics> {
        match ctx.compiled() {
            Some(c) => Arc::clone(c.bindings.metrics.get_or_init(|| self.metrics.route(&c.route.name))),
            None => Arc::clone(self.metrics.unmatched()),
        }
    }

    /// Counts and logs a request the proxy refuses itself (its answer is `denial`'s problem).
    pub fn record_denial(&self, ctx: &RequestCtx, stage: &'static str, denial: &Denial) {
        let elapsed = ctx.start.elapsed();
        self.route_metrics(ctx).record_denied(denial.reason_code(), elapsed);
        debug!(
            route.name = ctx.compiled().map(|c| c.route.name.as_str()),
            stage,
            reason = denial.reason(),
            http.method = %ctx.parts.method,
            http.path = ctx.path(),
            http.status = denial.status().as_u16(),
            client.ip = %ctx.client_ip,
            request.id = ?ctx.request_id,
            elapsed = ?elapsed,
            "request denied"
        );
    }

    /// Counts a request refused before it had a context (a malformed or oversized head).
    pub fn record_unparsed(&self, denial: &Denial, peer: IpAddr) {
        self.metrics.unmatched().record_denied(denial.reason_code(), Duration::ZERO);
        debug!(reason = denial.reason(), http.status = denial.status().as_u16(), client.ip = %peer, "request refused");
    }

    // -------------------------------------------------------------- stages

    fn request_id(&self, ctx: &mut RequestCtx) -> Verdict {
        ctx.request_id = match ctx.parts.headers.get(&X_REQUEST_ID) {
            Some(v) if valid_request_id(v) => v.clone(),
            _ => self.ids.next(),
        };
        Verdict::Continue
    }

    fn load_snapshot(&self, ctx: &mut RequestCtx) -> Verdict {
        ctx.snapshot = self.snapshots.load_full();
        if ctx.snapshot.is_none() { Verdict::Deny(Denial::NotReady) } else { Verdict::Continue }
    }

    fn client_ip(&self, ctx: &mut RequestCtx) -> Verdict {
        let (ip, xff, trusted) =
            resolve_client(ctx.conn.peer, &ctx.conn.peer_header, &ctx.parts.headers, &self.settings.trusted_proxies);
        ctx.client_ip = ip;
        ctx.xff = xff;
        ctx.peer_trusted = trusted;
        Verdict::Continue
    }

    fn normalize_path(&self, ctx: &mut RequestCtx) -> Verdict {
        match path::normalize(ctx.parts.uri.path()) {
            Ok(Cow::Borrowed(_)) => Verdict::Continue,
            Ok(Cow::Owned(p)) => {
                ctx.normalized = Some(p);
                Verdict::Continue
            }
            Err(e) => Verdict::Deny(Denial::BadRequest(e)),
        }
    }

    fn match_route(&self, ctx: &mut RequestCtx) -> Verdict {
        let Some(snapshot) = ctx.snapshot.as_ref() else { return Verdict::Deny(Denial::NotReady) };
        // The host the request is for: the URI's authority (HTTP/2, absolute-form) or `Host`,
        // looked up once for matching and for the `Host`/`X-Forwarded-Host` sent upstream.
        let authority = ctx.parts.uri.authority();
        let host_header = if authority.is_none() { ctx.parts.headers.get(HOST) } else { None };
        let raw_host = match authority {
            Some(a) => Some(a.as_str()),
            None => host_header.and_then(|v| v.to_str().ok()),
        };
        let host = raw_host.map_or("", host_without_port);
        let found = match snapshot.table.lookup(host, ctx.parts.method.as_str(), ctx.path()) {
            Lookup::Found(m) => m.route,
            Lookup::MethodNotAllowed { allowed } => return Verdict::Deny(Denial::MethodNotAllowed { allow: allowed }),
            Lookup::NotFound => return Verdict::Deny(Denial::NotFound),
        };
        ctx.host = match authority {
            Some(a) => HeaderValue::from_str(a.as_str()).ok(),
            None => host_header.cloned(),
        };
        ctx.route = Some(found);
        Verdict::Continue
    }

    fn ip_filter(&self, ctx: &mut RequestCtx) -> Verdict {
        let Some(route) = ctx.compiled() else { return Verdict::Deny(Denial::NotFound) };
        let ip = ctx.client_ip;
        let policy = &route.policy;
        if policy.deny.iter().any(|n| n.contains(&ip)) {
            return Verdict::Deny(Denial::Forbidden(Forbidden::IpDenied));
        }
        if !policy.allow.is_empty() && !policy.allow.iter().any(|n| n.contains(&ip)) {
            return Verdict::Deny(Denial::Forbidden(Forbidden::IpNotAllowed));
        }
        Verdict::Continue
    }

    fn strip_identity_headers(&self, ctx: &mut RequestCtx) -> Verdict {
        let Some(snapshot) = ctx.snapshot.as_ref() else { return Verdict::Continue };
        let Some(route) = ctx.route.and_then(|i| snapshot.routes.get(i)) else { return Verdict::Continue };
        for name in &route.plan.strip_headers {
            ctx.parts.headers.remove(name);
        }
        Verdict::Continue
    }

    fn authenticate(&self, ctx: &mut RequestCtx) -> Verdict {
        let RequestCtx { snapshot, route, parts, token, .. } = ctx;
        let Some((snapshot, index)) = snapshot.as_ref().zip(*route) else { return Verdict::Deny(Denial::NotFound) };
        let Some(compiled) = snapshot.routes.get(index) else { return Verdict::Deny(Denial::NotFound) };
        let policy = &compiled.policy;
        let (accepted, required) = match &policy.authentication {
            Authentication::Public { .. } => return Verdict::Continue,
            Authentication::Required(a) => (a, true),
            Authentication::Optional(a) => (a, false),
        };
        let header = parts.headers.get(AUTHORIZATION).map(|v| v.to_str().map_err(|_| ()));
        let outcome = match header {
            Some(Err(())) => Err(AuthFailure::Invalid(JwtError::Malformed("authorization header is not ascii"))),
            Some(Ok(v)) => match jwt::bearer_token(Some(v)) {
                Err(JwtError::Missing) => Err(AuthFailure::Missing),
                Err(e) => Err(AuthFailure::Invalid(e)),
                Ok(t)
                    if accepted.tokens.contains(&TokenKind::Jwt)
                        && (looks_like_jwt(t) || !accepted.tokens.contains(&TokenKind::Opaque)) =>
                {
                    let verifiers = snapshot.route_verifiers.get(index).map_or(&[][..], |v| &v[..]);
                    self.tokens
                        .verify(verifiers, t, SystemTime::now())
                        .inspect_err(|e| self.kid_reports.on_verify_error(snapshot, verifiers, t, e))
                        .map_err(AuthFailure::Invalid)
                }
                Ok(t) if accepted.tokens.contains(&TokenKind::Opaque) => {
                    match self.cached_introspection(snapshot, &accepted.issuers, t) {
                        Some(Ok(phantom)) => {
                            accept_phantom(parts, token, &phantom);
                            return Verdict::Continue;
                        }
                        Some(Err(failure)) => Err(failure),
                        None => return Verdict::Introspect,
                    }
                }
                Ok(_) => Err(AuthFailure::Unverified),
            },
            None => Err(AuthFailure::Missing),
        };
        let keep_authorization = policy.forward_token && outcome.is_ok();
        if !keep_authorization {
            parts.headers.remove(AUTHORIZATION);
        }
        match outcome {
            Ok(verified) => {
                *token = Some(verified);
                Verdict::Continue
            }
            Err(AuthFailure::Missing) if !required => Verdict::Continue,
            Err(failure) => self.report_only(ctx, "authenticate", Denial::Unauthorized(failure)),
        }
    }

    /// The introspection answer for `token` if every issuer it depends on has one cached: the
    /// first active one, or the refusal when all refused. `None`: a call is needed.
    fn cached_introspection(
        &self,
        snapshot: &Snapshot,
        issuers: &[String],
        token: &str,
    ) -> Option<Result<Arc<Phantom>, AuthFailure>> {
        let mut refused = None;
        for introspector in issuers.iter().filter_map(|i| snapshot.introspectors.get(i)) {
            match self.introspection.cached(introspector, token)? {
                Outcome::Active(phantom) => return Some(Ok(phantom)),
                Outcome::Refused(e) => refused = Some(e),
                Outcome::Unavailable => return None,
            }
        }
        Some(Err(refused.map_or(AuthFailure::Unverified, AuthFailure::Invalid)))
    }

    /// The asynchronous half of `authenticate` for an opaque token without a cached answer.
    async fn introspect(&self, ctx: &mut RequestCtx) -> Verdict {
        let Some((snapshot, compiled)) = ctx.snapshot.as_ref().and_then(|s| Some((s, s.routes.get(ctx.route?)?)))
        else {
            return Verdict::Deny(Denial::NotFound);
        };
        let issuers = match &compiled.policy.authentication {
            Authentication::Required(a) | Authentication::Optional(a) => &a.issuers,
            Authentication::Public { .. } => return Verdict::Continue,
        };
        let introspectors: SmallVec<[Arc<Introspector>; 2]> =
            issuers.iter().filter_map(|i| snapshot.introspectors.get(i).cloned()).collect();
        let token = ctx.parts.headers.get(AUTHORIZATION).and_then(|v| jwt::bearer_token(v.to_str().ok()).ok());
        let Some(token) = token.map(str::to_owned) else {
            return Verdict::Deny(Denial::Unauthorized(AuthFailure::Missing));
        };
        let mut refused = None;
        let mut unavailable = false;
        for introspector in &introspectors {
            match self.introspection.introspect(introspector, &token).await {
                Outcome::Active(phantom) => {
                    accept_phantom(&mut ctx.parts, &mut ctx.token, &phantom);
                    return Verdict::Continue;
                }
                Outcome::Refused(e) => refused = Some(e),
                Outcome::Unavailable => unavailable = true,
            }
        }
        ctx.parts.headers.remove(AUTHORIZATION);
        let denial = match refused {
            _ if unavailable => Denial::IntrospectionUnavailable,
            Some(e) => Denial::Unauthorized(AuthFailure::Invalid(e)),
            None => Denial::Unauthorized(AuthFailure::Unverified),
        };
        self.report_only(ctx, "authenticate", denial)
    }

    fn authorize(&self, ctx: &mut RequestCtx) -> Verdict {
        let RequestCtx { snapshot, route, parts, token, .. } = ctx;
        let Some(token) = token.as_ref() else { return Verdict::Continue };
        let Some(compiled) = snapshot.as_ref().zip(*route).and_then(|(s, i)| s.routes.get(i)) else {
            return Verdict::Deny(Denial::NotFound);
        };
        if let Err(denial) = claims::authorize(&compiled.policy, token) {
            parts.headers.remove(AUTHORIZATION);
            return self.report_only(ctx, "authorize", Denial::InsufficientScope(denial));
        }
        for (claim, header) in &compiled.plan.claim_headers {
            let value = match token.claims.get(&**claim) {
                None | Some(serde_json::Value::Null) => continue,
                Some(serde_json::Value::String(s)) => HeaderValue::from_str(s),
                Some(other) => HeaderValue::try_from(other.to_string()),
            };
            match value {
                Ok(v) => {
                    parts.headers.insert(header.clone(), v);
                }
                Err(_) => {
                    debug!(route.name = %compiled.route.name, claim = &**claim, "claim is not a valid header value")
                }
            }
        }
        Verdict::Continue
    }

    /// `denial` for an enforcing policy; for a `report_only` one the denial is counted and logged
    /// and the request goes on.
    fn report_only(&self, ctx: &mut RequestCtx, stage: &'static str, denial: Denial) -> Verdict {
        let Some(route) = ctx.compiled() else { return Verdict::Deny(denial) };
        if route.policy.mode != PolicyMode::ReportOnly {
            return Verdict::Deny(denial);
        }
        self.route_metrics(ctx).record_would_deny(denial.reason_code());
        info!(
            route.name = %route.route.name,
            stage,
            reason = denial.reason(),
            http.method = %ctx.parts.method,
            http.path = ctx.path(),
            http.status = denial.status().as_u16(),
            client.ip = %ctx.client_ip,
            request.id = ?ctx.request_id,
            "request would be denied (report-only policy)"
        );
        // Nothing from a refused token goes upstream.
        ctx.token = None;
        ctx.parts.headers.remove(AUTHORIZATION);
        Verdict::Continue
    }

    fn body_limit(&self, ctx: &mut RequestCtx) -> Verdict {
        let Some(route) = ctx.compiled() else { return Verdict::Deny(Denial::NotFound) };
        let limit = route.route.max_body_bytes.unwrap_or(self.settings.max_body_bytes);
        ctx.body_limit = limit;
        let declared = ctx.parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Verdict::Deny(Denial::PayloadTooLarge);
        }
        Verdict::Continue
    }

    fn rewrite(&self, ctx: &mut RequestCtx) -> Verdict {
        let RequestCtx { snapshot, route, parts, normalized, upstream_path, .. } = ctx;
        let Some(route) = snapshot.as_ref().zip(*route).and_then(|(s, i)| s.routes.get(i)) else {
            return Verdict::Deny(Denial::NotFound);
        };
        let path = normalized.as_deref().unwrap_or_else(|| parts.uri.path());
        let rewritten = rewrite_path(&route.route.rewrite_path, path);
        if normalized.is_some() || matches!(rewritten, Cow::Owned(_)) || rewritten.len() != path.len() {
            let query = parts.uri.query();
            let mut pq = String::with_capacity(rewritten.len() + query.map_or(0, |q| q.len() + 1));
            pq.push_str(&rewritten);
            if let Some(q) = query {
                pq.push('?');
                pq.push_str(q);
            }
            match PathAndQuery::from_maybe_shared(Bytes::from(pq)) {
                Ok(pq) => *upstream_path = Some(pq),
                Err(_) => return Verdict::Deny(Denial::BadRequest(PathError::InvalidCharacter)),
            }
        }
        for name in &route.plan.remove_headers {
            parts.headers.remove(name);
        }
        for (name, value) in &route.plan.set_headers {
            parts.headers.insert(name.clone(), value.clone());
        }
        Verdict::Continue
    }

    // -------------------------------------------------------------- forwarding

    /// Makes the request that goes upstream from a request the stages let through: the route's
    /// upstream state and counters resolved, hop-by-hop fields removed, the forwarding fields
    /// and `X-Request-Id` set, the (normalized, rewritten) path, the deadline. Shared by the
    /// HTTP/1 engine and the hyper path, so both send exactly the same request.
    pub fn outbound(&self, ctx: &mut RequestCtx) -> Result<Outbound, Denial> {
        let route = ctx.snapshot.as_ref().zip(ctx.route).and_then(|(s, i)| s.routes.get(i)).cloned();
        let Some(route) = route else { return Err(Denial::NotFound) };
        let state = Arc::clone(
            route.bindings.upstream.get_or_init(|| self.upstreams.resolve(&route.upstream, route.tls.as_ref())),
        );
        let metrics = Arc::clone(route.bindings.metrics.get_or_init(|| self.metrics.route(&route.route.name)));
        let RequestCtx { parts, conn, client_ip, peer_trusted, xff, host, upstream_path, .. } = ctx;
        let upgrade = parts.version == Version::HTTP_11 && !route.upstream.http2 && forward::is_upgrade(&parts.headers);
        // `TE: trailers` is the one TE that HTTP/2 carries (gRPC needs it end to end).
        let te_trailers = route.upstream.http2
            && parts.headers.get(TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        let present = forward::scan(&parts.headers);
        forward::remove_hop_by_hop_scanned(&mut parts.headers, present, upgrade);
        // The proxy answers `Expect: 100-continue` itself (hyper, or the HTTP/1 engine).
        if parts.headers.contains_key(EXPECT) {
            parts.headers.remove(EXPECT);
        }
        if te_trailers {
            parts.headers.insert(TE, HeaderValue::from_static("trailers"));
        }
        let origin = Origin {
            client: *client_ip,
            peer: conn.peer,
            peer_element: &conn.peer_element,
            peer_trusted: *peer_trusted,
            xff,
            tls: conn.tls,
            host: host.as_ref(),
        };
        let forwarding = forward::forwarding_fields(&mut parts.headers, present, &origin, Some(ctx.request_id.clone()));
        let path_and_query = upstream_path
            .take()
            .or_else(|| parts.uri.path_and_query().cloned())
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Ok(Outbound {
            deadline: tokio::time::Instant::from_std(ctx.start) + route.plan.timeout,
            method: parts.method.clone(),
            path_and_query,
            headers: std::mem::take(&mut parts.headers),
            forwarding,
            upgrade,
            body_limit: ctx.body_limit,
            route,
            state,
            metrics,
        })
    }

    /// Counts and logs a request that could not be forwarded (its answer is `denial`'s problem).
    pub fn record_upstream_failure(&self, ctx: &RequestCtx, out: &Outbound, denial: &Denial) {
        let elapsed = ctx.start.elapsed();
        out.metrics.record_denied(denial.reason_code(), elapsed);
        debug!(
            route.name = %out.route.route.name,
            upstream.name = %out.route.upstream.name,
            reason = denial.reason(),
            http.method = %out.method,
            http.status = denial.status().as_u16(),
            client.ip = %ctx.client_ip,
            request.id = ?ctx.request_id,
            elapsed = ?elapsed,
            "request failed upstream"
        );
    }

    /// Counts and logs a response relayed from the upstream (at its head).
    pub fn record_forwarded(&self, ctx: &RequestCtx, out: &Outbound, status: StatusCode) {
        let elapsed = ctx.start.elapsed();
        out.metrics.record_forwarded(status, elapsed);
        debug!(
            route.name = %out.route.route.name,
            upstream.name = %out.route.upstream.name,
            http.method = %out.method,
            http.status = status.as_u16(),
            client.ip = %ctx.client_ip,
            request.id = ?ctx.request_id,
            elapsed = ?elapsed,
            "request forwarded"
        );
    }

    /// A new request id (for a request refused before its head could be read).
    pub fn next_request_id(&self) -> HeaderValue {
        self.ids.next()
    }

    /// The hyper client through which [`Outbound`]s to HTTP/2 upstreams go.
    pub fn forwarder(&self) -> &Forwarder {
        &self.forwarder
    }

    /// Forwards through hyper's clients (requests of HTTP/2 clients).
    async fn forward(&self, ctx: &mut RequestCtx, body: Incoming) -> Response<ResponseBody> {
        let mut out = match self.outbound(ctx) {
            Ok(out) => out,
            Err(denial) => {
                self.record_denial(ctx, "forward", &denial);
                return problem(&denial, ctx.request_id.clone());
            }
        };
        let client_upgrade = if out.upgrade { ctx.parts.extensions.remove::<OnUpgrade>() } else { None };
        let outgoing = Outgoing {
            method: out.method.clone(),
            path_and_query: out.path_and_query.clone(),
            headers: out.take_headers(),
            body: RequestBody::new(body, out.body_limit),
        };
        let result = self.forwarder.send(&out.route.upstream, &out.state, out.deadline, outgoing).await;
        let result = match result {
            Ok(response) if response.status() == StatusCode::SWITCHING_PROTOCOLS && client_upgrade.is_none() => {
                // A switch nobody asked for cannot be relayed.
                Err(Denial::BadGateway(crate::denial::BadGateway::Reset))
            }
            other => other,
        };
        let mut response = match result {
            Ok(response) => response,
            Err(denial) => {
                self.record_upstream_failure(ctx, &out, &denial);
                return problem(&denial, ctx.request_id.clone());
            }
        };
        let status = response.status();
        let switching = status == StatusCode::SWITCHING_PROTOCOLS;
        if let (true, Some(client)) = (switching, client_upgrade) {
            let upstream = hyper::upgrade::on(&mut response);
            forward::tunnel(client, upstream, Arc::clone(&out.route.plan.name));
        }
        forward::remove_hop_by_hop(response.headers_mut(), switching);
        self.record_forwarded(ctx, &out, status);
        response.headers_mut().insert(&X_REQUEST_ID, ctx.request_id.clone());
        response.map(Either::Left)
    }
}

impl Outbound {
    /// The headers to send, the proxy's fields included (for hyper's clients).
    pub fn take_headers(&mut self) -> HeaderMap {
        let mut headers = std::mem::take(&mut self.headers);
        self.forwarding.apply(&mut headers);
        headers
    }
}

/// A request ready to go upstream ([`Pipeline::outbound`]).
#[derive(Debug)]
pub struct Outbound {
    pub route: Arc<CompiledRoute>,
    pub state: Arc<UpstreamState>,
    pub metrics: Arc<RouteMetrics>,
    pub method: http::Method,
    /// The normalized, rewritten path with the original query.
    pub path_and_query: PathAndQuery,
    /// The client's fields as they go on (hop-by-hop ones removed)...
    pub headers: HeaderMap,
    /// ...and the ones the proxy sets, written after them.
    pub forwarding: ForwardingFields,
    /// The client asks to switch protocols and the upstream speaks HTTP/1.1: `Upgrade` and
    /// `Connection: upgrade` are kept.
    pub upgrade: bool,
    /// Until the response head: the route's timeout from the request's arrival.
    pub deadline: tokio::time::Instant,
    pub body_limit: u64,
}

/// The problem response of `denial`, with the request id header.
/// A compact JWS has exactly three segments; anything else is an opaque token.
fn looks_like_jwt(token: &str) -> bool {
    token.bytes().filter(|b| *b == b'.').count() == 2
}

/// An active opaque token: its claims for authorization, and the JWT (or nothing) in place of
/// the opaque token in `Authorization`.
fn accept_phantom(parts: &mut Parts, token: &mut Option<Arc<VerifiedToken>>, phantom: &Phantom) {
    *token = Some(Arc::clone(&phantom.token));
    match &phantom.authorization {
        Some(jwt) => parts.headers.insert(AUTHORIZATION, jwt.clone()),
        None => parts.headers.remove(AUTHORIZATION),
    };
}

fn problem(denial: &Denial, request_id: HeaderValue) -> Response<ResponseBody> {
    let mut response = denial.to_response(Some(&request_id));
    response.headers_mut().insert(&X_REQUEST_ID, request_id);
    response.map(Either::Right)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    /// (peer, X-Forwarded-For values, trusted CIDRs) → (client, XFF sent on, peer trusted)
    fn check_client(peer: &str, xff: &[&str], trusted: &[&str], client: &str, sent: &str, peer_trusted: bool) {
        let conn = ConnInfo::new(SocketAddr::new(peer.parse().unwrap(), 1234), false);
        let mut headers = http::HeaderMap::new();
        for v in xff {
            headers.append(&X_FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
        }
        let (ip, chain, t) = resolve_client(conn.peer, &conn.peer_header, &headers, &nets(trusted));
        assert_eq!(
            (ip.to_string().as_str(), chain.to_str().unwrap(), t),
            (client, sent, peer_trusted),
            "{peer} {xff:?}"
        );
    }

    #[test]
    fn client_ip_through_trusted_proxies() {
        // untrusted peer: XFF ignored and replaced
        check_client("198.51.100.1", &["1.2.3.4"], &[], "198.51.100.1", "198.51.100.1", false);
        check_client("198.51.100.1", &["1.2.3.4"], &["10.0.0.0/8"], "198.51.100.1", "198.51.100.1", false);
        // trusted peer: the right-most untrusted hop; spoofed hops left of it are dropped
        check_client("10.0.0.1", &["6.6.6.6, 1.2.3.4"], &["10.0.0.0/8"], "1.2.3.4", "1.2.3.4, 10.0.0.1", true);
        check_client(
            "10.0.0.1",
            &["6.6.6.6, 1.2.3.4", "10.0.0.9"],
            &["10.0.0.0/8"],
            "1.2.3.4",
            "1.2.3.4, 10.0.0.9, 10.0.0.1",
            true,
        );
        // all hops trusted: the left-most
        check_client(
            "10.0.0.1",
            &["10.0.0.7,10.0.0.8"],
            &["10.0.0.0/8"],
            "10.0.0.7",
            "10.0.0.7, 10.0.0.8, 10.0.0.1",
            true,
        );
        // no XFF from a trusted peer: the peer
        check_client("10.0.0.1", &[], &["10.0.0.0/8"], "10.0.0.1", "10.0.0.1", true);
        // garbage stops the walk: the hop right of it
        check_client(
            "10.0.0.1",
            &["1.2.3.4, garbage, 10.0.0.3"],
            &["10.0.0.0/8"],
            "10.0.0.3",
            "10.0.0.3, 10.0.0.1",
            true,
        );
        check_client("10.0.0.1", &["garbage"], &["10.0.0.0/8"], "10.0.0.1", "10.0.0.1", true);
        // IPv6 and mapped addresses
        check_client(
            "::ffff:10.0.0.1",
            &["[2001:db8::1]"],
            &["10.0.0.0/8"],
            "2001:db8::1",
            "[2001:db8::1], 10.0.0.1",
            true,
        );
        check_client("2001:db8::5", &["1.2.3.4"], &["2001:db8::/32"], "1.2.3.4", "1.2.3.4, 2001:db8::5", true);
    }

    fn check_rewrite(rw: PathRewrite, path: &str, expected: &str) {
        assert_eq!(rewrite_path(&rw, path), expected, "{rw:?} {path}");
    }

    #[test]
    fn rewrites() {
        let strip = |p: &str| PathRewrite::StripPrefix(p.into());
        let replace = |p: &str, r: &str| PathRewrite::ReplacePrefix { prefix: p.into(), replacement: r.into() };
        check_rewrite(PathRewrite::None, "/a/b", "/a/b");
        check_rewrite(strip("/api"), "/api/users", "/users");
        check_rewrite(strip("/api/"), "/api/users", "/users");
        check_rewrite(strip("/api"), "/api", "/");
        check_rewrite(strip("/api"), "/api/", "/");
        check_rewrite(strip("/api"), "/apix", "/apix");
        check_rewrite(strip("/"), "/users", "/users");
        check_rewrite(replace("/v1", "/api/v2"), "/v1/users", "/api/v2/users");
        check_rewrite(replace("/v1", "/api/v2/"), "/v1/users/", "/api/v2/users/");
        check_rewrite(replace("/v1", "/api"), "/v1", "/api");
        check_rewrite(replace("/v1", "/"), "/v1", "/");
        check_rewrite(replace("/v1", "/"), "/v1/x", "/x");
        check_rewrite(replace("/", "/base"), "/x", "/base/x");
        check_rewrite(replace("/", "/base"), "/", "/base/");
    }

    fn check_id(value: &[u8], valid: bool) {
        assert_eq!(valid_request_id(&HeaderValue::from_bytes(value).unwrap()), valid, "{value:?}");
    }

    #[test]
    fn request_ids() {
        check_id(b"abc-123", true);
        check_id(&[b'a'; 128], true);
        check_id(&[b'a'; 129], false);
        check_id(b"", false);
        check_id(b"has space", false);
        check_id(b"tab\there", false);
        check_id("caf\u{e9}".as_bytes(), false);
        let ids = RequestIds::default();
        let (a, b) = (ids.next(), ids.next());
        assert_ne!(a, b);
        assert!(valid_request_id(&a));
        assert_eq!(a.len(), 10, "{a:?}"); // 8 hex + '-' + '1'
        ids.counter.store(u64::MAX, Relaxed);
        assert!(ids.next().to_str().unwrap().ends_with("-ffffffffffffffff"));
    }

    #[test]
    fn hosts_lose_their_port() {
        for (host, expected) in [
            ("example.com", "example.com"),
            ("example.com:8080", "example.com"),
            ("[::1]:80", "[::1]"),
            ("[::1]", "[::1]"),
            ("user@example.com:1", "example.com"),
        ] {
            assert_eq!(host_without_port(host), expected);
        }
    }
}

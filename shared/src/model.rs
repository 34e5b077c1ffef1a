//! The validated domain model. Each type is built from its protobuf message by `TryFrom`, which
//! checks every field and reports every problem with the resource and field named. Whole-config
//! rules (references, conflicts) live in [`crate::config`].
//!
//! Nothing here trusts its input: a value of these types is valid by construction.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use portcullis_proto::config::v1 as pb;

use crate::validate::{self, Checker, Violations};
use crate::{Kind, duration};

const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// Reads an optional proto duration: `None` when unset, a violation when negative.
fn opt_duration(c: &mut Checker, field: &str, d: Option<&prost_types::Duration>) -> Option<Duration> {
    let d = d?;
    let v = duration::from_proto(d);
    if v.is_none() {
        c.fail(field, "duration must not be negative");
    }
    v
}

/// A duration bounded to (0, max]; the default applies when unset.
fn bounded_duration(
    c: &mut Checker,
    field: &str,
    d: Option<&prost_types::Duration>,
    default: Duration,
    max: Duration,
) -> Duration {
    match opt_duration(c, field, d) {
        None => default,
        Some(v) if v.is_zero() => {
            c.fail(field, "duration must be greater than zero");
            default
        }
        Some(v) if v > max => {
            c.fail(field, format!("duration {} exceeds the maximum of {}", duration::format(v), duration::format(max)));
            default
        }
        Some(v) => v,
    }
}

fn check_name(c: &mut Checker, name: &str) {
    if let Err(e) = validate::name(name) {
        c.fail("name", e);
    }
}

/// Rejects an `UNSPECIFIED`-or-unknown enum value that the resource must set.
fn enum_value<T: TryFrom<i32>>(c: &mut Checker, field: &str, v: i32) -> Option<T> {
    let r = T::try_from(v).ok();
    if r.is_none() {
        c.fail(field, format!("unknown value {v}"));
    }
    r
}

fn unique<'a>(c: &mut Checker, field: &str, items: impl IntoIterator<Item = &'a String>) {
    let mut seen = HashSet::new();
    for item in items {
        if !seen.insert(item.as_str()) {
            c.fail(field, format!("{item:?} is listed twice"));
        }
    }
}

// ---------------------------------------------------------------- Upstream

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadBalancing {
    RoundRobin,
    LeastRequest,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub consecutive_failures: u32,
    pub ejection_time: Duration,
    pub path: Option<String>,
    pub interval: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamTls {
    pub server_name: Option<String>,
    pub ca_file: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    pub endpoints: Vec<String>,
    pub load_balancing: LoadBalancing,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub health: HealthCheck,
    pub tls: Option<UpstreamTls>,
    pub http2: bool,
}

impl TryFrom<&pb::Upstream> for Upstream {
    type Error = Violations;

    fn try_from(p: &pb::Upstream) -> Result<Self, Violations> {
        let mut c = Checker::new(Kind::Upstream, &p.name);
        check_name(&mut c, &p.name);
        if p.endpoints.is_empty() {
            c.fail("endpoints", "at least one endpoint (host:port) is required");
        }
        for (i, e) in p.endpoints.iter().enumerate() {
            c.check(format!("endpoints[{i}]"), validate::endpoint(e));
        }
        unique(&mut c, "endpoints", &p.endpoints);
        let load_balancing = match enum_value(&mut c, "load_balancing", p.load_balancing) {
            Some(pb::LoadBalancing::LeastRequest) => LoadBalancing::LeastRequest,
            _ => LoadBalancing::RoundRobin,
        };
        let connect_timeout = bounded_duration(
            &mut c,
            "connect_timeout",
            p.connect_timeout.as_ref(),
            Duration::from_secs(5),
            MAX_TIMEOUT,
        );
        let request_timeout = bounded_duration(
            &mut c,
            "request_timeout",
            p.request_timeout.as_ref(),
            Duration::from_secs(30),
            MAX_TIMEOUT,
        );
        let hc = p.health_check.clone().unwrap_or_default();
        if hc.consecutive_failures > 1000 {
            c.fail("health_check.consecutive_failures", "must be at most 1000");
        }
        let path = (!hc.path.is_empty()).then(|| hc.path.clone());
        if let Some(path) = &path {
            c.check("health_check.path", validate::route_path(path));
        }
        let health = HealthCheck {
            consecutive_failures: if hc.consecutive_failures == 0 { 5 } else { hc.consecutive_failures },
            ejection_time: bounded_duration(
                &mut c,
                "health_check.ejection_time",
                hc.ejection_time.as_ref(),
                Duration::from_secs(10),
                MAX_TIMEOUT,
            ),
            path,
            interval: bounded_duration(
                &mut c,
                "health_check.interval",
                hc.interval.as_ref(),
                Duration::from_secs(5),
                MAX_TIMEOUT,
            ),
        };
        let tls = match &p.tls {
            Some(t) if t.enabled => {
                if !t.server_name.is_empty() {
                    c.check("tls.server_name", validate::hostname(&t.server_name));
                }
                Some(UpstreamTls {
                    server_name: (!t.server_name.is_empty()).then(|| t.server_name.clone()),
                    ca_file: (!t.ca_file.is_empty()).then(|| t.ca_file.clone()),
                })
            }
            Some(t) if !t.server_name.is_empty() || !t.ca_file.is_empty() => {
                c.fail("tls.enabled", "server_name or ca_file is set but TLS is not enabled");
                None
            }
            _ => None,
        };
        c.finish(Upstream {
            name: p.name.clone(),
            endpoints: p.endpoints.clone(),
            load_balancing,
            connect_timeout,
            request_timeout,
            health,
            tls,
            http2: p.http2,
        })
    }
}

// ---------------------------------------------------------------- Issuer

/// JWS algorithms Portcullis verifies. `none` is not one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
    HS256,
    HS384,
    HS512,
}

impl Algorithm {
    pub fn parse(s: &str) -> Option<Algorithm> {
        use Algorithm::*;
        Some(match s {
            "RS256" => RS256,
            "RS384" => RS384,
            "RS512" => RS512,
            "PS256" => PS256,
            "PS384" => PS384,
            "PS512" => PS512,
            "ES256" => ES256,
            "ES384" => ES384,
            "EdDSA" => EdDSA,
            "HS256" => HS256,
            "HS384" => HS384,
            "HS512" => HS512,
            _ => return None,
        })
    }

    pub fn is_symmetric(self) -> bool {
        matches!(self, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySourceKind {
    JwksUri(String),
    Discovery(String),
    /// A JWK Set document with public keys only.
    Inline(String),
    SharedSecretFile(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySource {
    pub kind: KeySourceKind,
    pub refresh_interval: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Introspection {
    pub endpoint: String,
    pub client_id: String,
    pub client_secret_file: Option<String>,
    pub cache_ttl: Duration,
    pub negative_cache_ttl: Duration,
    pub timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issuer {
    pub name: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub clock_skew: Duration,
    pub max_token_age: Option<Duration>,
    pub keys: KeySource,
    pub introspection: Option<Introspection>,
    pub require_at_jwt: bool,
}

/// JWK members that only a private (or symmetric) key has. Public keys are all we accept.
const PRIVATE_JWK_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// Checks one public JWK; returns its `kid` (may be empty).
pub fn check_public_jwk(jwk: &serde_json::Value) -> Result<String, String> {
    let obj = jwk.as_object().ok_or("a JWK must be a JSON object")?;
    let kty = obj.get("kty").and_then(|v| v.as_str()).ok_or("JWK has no \"kty\"")?;
    match kty {
        "RSA" | "EC" | "OKP" => {}
        "oct" => return Err("symmetric (\"oct\") keys are not accepted in a key set: use shared_secret_file".into()),
        other => return Err(format!("unsupported JWK kty {other:?}")),
    }
    if let Some(m) = PRIVATE_JWK_MEMBERS.iter().find(|m| obj.contains_key(**m)) {
        return Err(format!("JWK contains private key member {m:?}: publish public keys only"));
    }
    if kty == "RSA" {
        let n = obj.get("n").and_then(|v| v.as_str()).ok_or("RSA JWK has no \"n\"")?;
        // base64url without padding: 4 chars per 3 bytes
        let bits = n.trim_end_matches('=').len() * 6;
        if bits < 2048 - 8 {
            return Err(format!("RSA key is about {bits} bits; at least 2048 are required"));
        }
    }
    Ok(obj.get("kid").and_then(|v| v.as_str()).unwrap_or_default().to_owned())
}

impl TryFrom<&pb::Issuer> for Issuer {
    type Error = Violations;

    fn try_from(p: &pb::Issuer) -> Result<Self, Violations> {
        let mut c = Checker::new(Kind::Issuer, &p.name);
        check_name(&mut c, &p.name);
        if p.issuer.is_empty() {
            c.fail("issuer", "the iss value is required");
        } else if p.issuer.trim() != p.issuer || p.issuer.bytes().any(|b| b < b' ') {
            c.fail("issuer", "must not have surrounding whitespace or control characters");
        }
        if p.audiences.is_empty() {
            c.fail("audiences", "at least one audience is required");
        }
        for (i, a) in p.audiences.iter().enumerate() {
            if a.trim().is_empty() {
                c.fail(format!("audiences[{i}]"), "audience is empty");
            }
        }
        unique(&mut c, "audiences", &p.audiences);
        let mut algorithms = Vec::new();
        for (i, a) in p.algorithms.iter().enumerate() {
            match Algorithm::parse(a) {
                Some(alg) => algorithms.push(alg),
                None => c.fail(
                    format!("algorithms[{i}]"),
                    format!("unsupported algorithm {a:?}: expected RS256/384/512, PS256/384/512, ES256/384, EdDSA or HS256/384/512"),
                ),
            }
        }
        unique(&mut c, "algorithms", &p.algorithms);
        let source = p.keys.as_ref().and_then(|k| k.source.as_ref());
        let refresh_interval = bounded_duration(
            &mut c,
            "keys.refresh_interval",
            p.keys.as_ref().and_then(|k| k.refresh_interval.as_ref()),
            Duration::from_secs(300),
            Duration::from_secs(86_400),
        );
        use pb::key_source::Source;
        let kind = match source {
            None => {
                c.fail("keys", "a key source is required: jwks_uri, discovery, inline or shared_secret_file");
                KeySourceKind::Inline(String::new())
            }
            Some(Source::JwksUri(u)) => {
                c.check("keys.jwks_uri", validate::http_url(u));
                KeySourceKind::JwksUri(u.clone())
            }
            Some(Source::Discovery(u)) => {
                c.check("keys.discovery", validate::http_url(u));
                KeySourceKind::Discovery(u.clone())
            }
            Some(Source::InlineJwks(doc)) => {
                match serde_json::from_str::<serde_json::Value>(doc) {
                    Err(e) => c.fail("keys.inline", format!("not valid JSON: {e}")),
                    Ok(v) => match v.get("keys").and_then(|k| k.as_array()) {
                        None => c.fail("keys.inline", "a JWK Set needs a \"keys\" array"),
                        Some(keys) if keys.is_empty() => c.fail("keys.inline", "the key set is empty"),
                        Some(keys) => {
                            for (i, k) in keys.iter().enumerate() {
                                c.check(format!("keys.inline.keys[{i}]"), check_public_jwk(k));
                            }
                        }
                    },
                }
                KeySourceKind::Inline(doc.clone())
            }
            Some(Source::SharedSecretFile(f)) => {
                if f.is_empty() {
                    c.fail("keys.shared_secret_file", "path is empty");
                }
                KeySourceKind::SharedSecretFile(f.clone())
            }
        };
        let shared = matches!(kind, KeySourceKind::SharedSecretFile(_));
        if algorithms.is_empty() && p.algorithms.is_empty() {
            c.fail("algorithms", "at least one algorithm is required (e.g. RS256, ES256)");
        }
        for (i, alg) in algorithms.iter().enumerate() {
            if alg.is_symmetric() && !shared {
                c.fail(
                    format!("algorithms[{i}]"),
                    "HS* algorithms are only allowed with keys.shared_secret_file (an asymmetric issuer never accepts HMAC)",
                );
            }
            if !alg.is_symmetric() && shared {
                c.fail(format!("algorithms[{i}]"), "a shared-secret issuer accepts only HS256/384/512");
            }
        }
        let clock_skew = match opt_duration(&mut c, "clock_skew", p.clock_skew.as_ref()) {
            None => Duration::from_secs(60),
            Some(d) if d > Duration::from_secs(600) => {
                c.fail("clock_skew", "must be at most 10m");
                d
            }
            Some(d) => d,
        };
        let max_token_age = opt_duration(&mut c, "max_token_age", p.max_token_age.as_ref()).filter(|d| !d.is_zero());
        let introspection = match &p.introspection {
            Some(i) if !i.endpoint.is_empty() => {
                c.check("introspection.endpoint", validate::http_url(&i.endpoint));
                if i.client_id.is_empty() {
                    c.fail("introspection.client_id", "required with an introspection endpoint");
                }
                Some(Introspection {
                    endpoint: i.endpoint.clone(),
                    client_id: i.client_id.clone(),
                    client_secret_file: (!i.client_secret_file.is_empty()).then(|| i.client_secret_file.clone()),
                    cache_ttl: bounded_duration(
                        &mut c,
                        "introspection.cache_ttl",
                        i.cache_ttl.as_ref(),
                        Duration::from_secs(300),
                        Duration::from_secs(86_400),
                    ),
                    negative_cache_ttl: bounded_duration(
                        &mut c,
                        "introspection.negative_cache_ttl",
                        i.negative_cache_ttl.as_ref(),
                        Duration::from_secs(5),
                        Duration::from_secs(3600),
                    ),
                    timeout: bounded_duration(
                        &mut c,
                        "introspection.timeout",
                        i.timeout.as_ref(),
                        Duration::from_secs(3),
                        Duration::from_secs(60),
                    ),
                })
            }
            Some(i) if !i.client_id.is_empty() || !i.client_secret_file.is_empty() => {
                c.fail("introspection.endpoint", "required when client credentials are set");
                None
            }
            _ => None,
        };
        c.finish(Issuer {
            name: p.name.clone(),
            issuer: p.issuer.clone(),
            audiences: p.audiences.clone(),
            algorithms,
            clock_skew,
            max_token_age,
            keys: KeySource { kind, refresh_interval },
            introspection,
            require_at_jwt: p.require_at_jwt,
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    pub name: String,
    pub issuer: String,
    pub kid: String,
    pub jwk: serde_json::Value,
    pub retire_at: Option<SystemTime>,
}

fn timestamp(t: &prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

impl TryFrom<&pb::Key> for Key {
    type Error = Violations;

    fn try_from(p: &pb::Key) -> Result<Self, Violations> {
        let mut c = Checker::new(Kind::Key, &p.name);
        check_name(&mut c, &p.name);
        if p.issuer.is_empty() {
            c.fail("issuer", "the issuer this key belongs to is required");
        }
        if p.kid.is_empty() {
            c.fail("kid", "kid is required");
        }
        let jwk = match serde_json::from_str::<serde_json::Value>(&p.jwk) {
            Ok(v) => {
                if let Some(kid) = c.check("jwk", check_public_jwk(&v))
                    && !kid.is_empty()
                    && kid != p.kid
                {
                    c.fail("jwk", format!("the JWK's kid {kid:?} differs from the resource's kid {:?}", p.kid));
                }
                v
            }
            Err(e) => {
                c.fail("jwk", format!("not valid JSON: {e}"));
                serde_json::Value::Null
            }
        };
        let retire_at = match &p.retire_at {
            None => None,
            Some(t) => {
                let v = timestamp(t);
                if v.is_none() {
                    c.fail("retire_at", "invalid timestamp");
                }
                v
            }
        };
        c.finish(Key { name: p.name.clone(), issuer: p.issuer.clone(), kid: p.kid.clone(), jwk, retire_at })
    }
}

// ---------------------------------------------------------------- Policy

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    Jwt,
    Opaque,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authentication {
    /// No authentication, on purpose; the reason is shown in governance reports.
    Public {
        reason: String,
    },
    Required(Authenticated),
    /// Verify a token when one is sent; anonymous requests pass.
    Optional(Authenticated),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authenticated {
    pub issuers: Vec<String>,
    pub tokens: Vec<TokenKind>,
    pub strip_headers: Vec<String>,
}

#[derive(Clone, Debug)]
pub enum ClaimOp {
    Equals(String),
    In(Vec<String>),
    Contains(String),
    Exists(bool),
    Regex(regex::Regex),
}

impl PartialEq for ClaimOp {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ClaimOp::Equals(a), ClaimOp::Equals(b)) | (ClaimOp::Contains(a), ClaimOp::Contains(b)) => a == b,
            (ClaimOp::In(a), ClaimOp::In(b)) => a == b,
            (ClaimOp::Exists(a), ClaimOp::Exists(b)) => a == b,
            (ClaimOp::Regex(a), ClaimOp::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClaimRule {
    /// Dotted path into the claims object.
    pub claim: Vec<String>,
    pub op: ClaimOp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RateLimitKey {
    ClientId,
    Sub,
    Ip,
    Header(String),
    Route,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateLimitScope {
    Local,
    Global,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub key: RateLimitKey,
    pub limit: u64,
    pub window: Duration,
    pub burst: u64,
    pub scope: RateLimitScope,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyMode {
    Enforce,
    ReportOnly,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub name: String,
    pub authentication: Authentication,
    pub required_scopes: Vec<String>,
    pub claims: Vec<ClaimRule>,
    pub rate_limits: Vec<RateLimit>,
    pub allow: Vec<ipnet::IpNet>,
    pub deny: Vec<ipnet::IpNet>,
    pub forward_token: bool,
    pub claim_headers: BTreeMap<String, String>,
    pub mode: PolicyMode,
}

/// Regexes in claim rules are compiled with a size limit so a policy cannot blow up memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl TryFrom<&pb::Policy> for Policy {
    type Error = Violations;

    fn try_from(p: &pb::Policy) -> Result<Self, Violations> {
        let mut c = Checker::new(Kind::Policy, &p.name);
        check_name(&mut c, &p.name);
        let authentication = policy_authentication(&mut c, p.authentication.as_ref());
        let is_public = matches!(authentication, Authentication::Public { .. });

        let authz = p.authorization.clone().unwrap_or_default();
        for (i, s) in authz.required_scopes.iter().enumerate() {
            if s.is_empty() || s.bytes().any(|b| b <= b' ' || b == b'"' || b == b'\\' || b >= 0x7f) {
                c.fail(format!("authorization.required_scopes[{i}]"), format!("invalid scope {s:?}"));
            }
        }
        unique(&mut c, "authorization.required_scopes", &authz.required_scopes);
        let mut claims = Vec::new();
        for (i, rule) in authz.claims.iter().enumerate() {
            let field = format!("authorization.claims[{i}]");
            if let Some(r) = claim_rule(&mut c, &field, rule) {
                claims.push(r);
            }
        }
        if is_public && (!authz.required_scopes.is_empty() || !authz.claims.is_empty()) {
            c.fail("authorization", "a public policy cannot require scopes or claims: there is no token to check");
        }

        let mut rate_limits = Vec::new();
        for (i, rl) in p.rate_limits.iter().enumerate() {
            let field = format!("rate_limits[{i}]");
            let key = match enum_value(&mut c, &format!("{field}.key"), rl.key) {
                Some(pb::RateLimitKey::ClientId) => Some(RateLimitKey::ClientId),
                Some(pb::RateLimitKey::Sub) => Some(RateLimitKey::Sub),
                Some(pb::RateLimitKey::Ip) => Some(RateLimitKey::Ip),
                Some(pb::RateLimitKey::Route) => Some(RateLimitKey::Route),
                Some(pb::RateLimitKey::Header) => {
                    c.check(format!("{field}.header"), validate::header_name(&rl.header));
                    Some(RateLimitKey::Header(rl.header.to_ascii_lowercase()))
                }
                Some(pb::RateLimitKey::Unspecified) => {
                    c.fail(format!("{field}.key"), "required: client_id, sub, ip, header or route");
                    None
                }
                None => None,
            };
            if is_public && matches!(key, Some(RateLimitKey::ClientId | RateLimitKey::Sub)) {
                c.fail(format!("{field}.key"), "a public policy has no token: key by ip, header or route");
            }
            if rl.key != pb::RateLimitKey::Header as i32 && !rl.header.is_empty() {
                c.fail(format!("{field}.header"), "only used with key: header");
            }
            if rl.limit == 0 {
                c.fail(format!("{field}.limit"), "must be greater than zero");
            }
            let window = bounded_duration(
                &mut c,
                &format!("{field}.window"),
                rl.window.as_ref(),
                Duration::from_secs(1),
                Duration::from_secs(86_400),
            );
            if rl.window.is_none() {
                c.fail(format!("{field}.window"), "required, e.g. 1s or 1m");
            }
            let scope = match enum_value(&mut c, &format!("{field}.scope"), rl.scope) {
                Some(pb::RateLimitScope::Global) => RateLimitScope::Global,
                _ => RateLimitScope::Local,
            };
            if let Some(key) = key {
                rate_limits.push(RateLimit { key, limit: rl.limit, window, burst: rl.burst, scope });
            }
        }

        let ipf = p.ip_filter.clone().unwrap_or_default();
        let allow = ipf
            .allow
            .iter()
            .enumerate()
            .filter_map(|(i, s)| c.check(format!("ip_filter.allow[{i}]"), validate::cidr(s)))
            .collect();
        let deny = ipf
            .deny
            .iter()
            .enumerate()
            .filter_map(|(i, s)| c.check(format!("ip_filter.deny[{i}]"), validate::cidr(s)))
            .collect();

        let fwd = p.forwarding.clone().unwrap_or_default();
        for (claim, header) in &fwd.claim_headers {
            if claim.is_empty() {
                c.fail("forwarding.claim_headers", "claim name is empty");
            }
            c.check(format!("forwarding.claim_headers.{claim}"), validate::header_name(header));
        }
        if is_public && (fwd.forward_token || !fwd.claim_headers.is_empty()) {
            c.fail("forwarding", "a public policy has no verified token to forward");
        }
        let mode = match enum_value(&mut c, "mode", p.mode) {
            Some(pb::PolicyMode::ReportOnly) => PolicyMode::ReportOnly,
            _ => PolicyMode::Enforce,
        };
        c.finish(Policy {
            name: p.name.clone(),
            authentication,
            required_scopes: authz.required_scopes,
            claims,
            rate_limits,
            allow,
            deny,
            forward_token: fwd.forward_token,
            claim_headers: fwd.claim_headers.into_iter().map(|(k, v)| (k, v.to_ascii_lowercase())).collect(),
            mode,
        })
    }
}

fn policy_authentication(c: &mut Checker, a: Option<&pb::Authentication>) -> Authentication {
    let placeholder = Authentication::Public { reason: String::new() };
    let Some(a) = a else {
        c.fail("authentication", "required: mode required, optional, or public with a reason (default deny)");
        return placeholder;
    };
    for (i, h) in a.strip_headers.iter().enumerate() {
        c.check(format!("authentication.strip_headers[{i}]"), validate::header_name(h));
    }
    let mode = enum_value::<pb::AuthMode>(c, "authentication.mode", a.mode);
    match mode {
        None => placeholder,
        Some(pb::AuthMode::Unspecified) => {
            c.fail("authentication.mode", "required: required, optional or public (default deny)");
            placeholder
        }
        Some(pb::AuthMode::Public) => {
            if a.reason.trim().is_empty() {
                c.fail(
                    "authentication.reason",
                    "a public policy needs a non-empty reason (it is shown in the governance report)",
                );
            }
            if !a.issuers.is_empty() || !a.tokens.is_empty() {
                c.fail("authentication.issuers", "a public policy accepts no tokens: remove issuers and tokens");
            }
            Authentication::Public { reason: a.reason.trim().to_owned() }
        }
        Some(mode @ (pb::AuthMode::Required | pb::AuthMode::Optional)) => {
            if a.issuers.is_empty() {
                c.fail("authentication.issuers", "at least one issuer is required");
            }
            for (i, name) in a.issuers.iter().enumerate() {
                c.check(format!("authentication.issuers[{i}]"), validate::name(name));
            }
            unique(c, "authentication.issuers", &a.issuers);
            let mut tokens = Vec::new();
            for (i, t) in a.tokens.iter().enumerate() {
                match enum_value(c, &format!("authentication.tokens[{i}]"), *t) {
                    Some(pb::TokenKind::Jwt) => tokens.push(TokenKind::Jwt),
                    Some(pb::TokenKind::Opaque) => tokens.push(TokenKind::Opaque),
                    Some(pb::TokenKind::Unspecified) => {
                        c.fail(format!("authentication.tokens[{i}]"), "expected jwt or opaque");
                    }
                    None => {}
                }
            }
            if tokens.is_empty() {
                tokens.push(TokenKind::Jwt);
            }
            if !a.reason.is_empty() {
                c.fail("authentication.reason", "only a public policy takes a reason");
            }
            let auth = Authenticated {
                issuers: a.issuers.clone(),
                tokens,
                strip_headers: a.strip_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
            };
            if mode == pb::AuthMode::Required { Authentication::Required(auth) } else { Authentication::Optional(auth) }
        }
    }
}

fn claim_rule(c: &mut Checker, field: &str, rule: &pb::ClaimRule) -> Option<ClaimRule> {
    if rule.claim.is_empty() {
        c.fail(format!("{field}.claim"), "claim name is required");
        return None;
    }
    let path: Vec<String> = rule.claim.split('.').map(str::to_owned).collect();
    if path.iter().any(String::is_empty) {
        c.fail(format!("{field}.claim"), format!("invalid claim path {:?}", rule.claim));
        return None;
    }
    use pb::claim_rule::Op;
    let op = match &rule.op {
        None => {
            c.fail(field, "an operator is required: equals, in, contains, exists or regex");
            return None;
        }
        Some(Op::Equals(v)) => ClaimOp::Equals(v.clone()),
        Some(Op::In(list)) => {
            if list.values.is_empty() {
                c.fail(format!("{field}.in"), "the list is empty: the rule could never match");
                return None;
            }
            ClaimOp::In(list.values.clone())
        }
        Some(Op::Contains(v)) => ClaimOp::Contains(v.clone()),
        Some(Op::Exists(v)) => ClaimOp::Exists(*v),
        Some(Op::Regex(re)) => {
            // anchored: a claim rule matches the whole value, never a substring by accident
            let built = regex::RegexBuilder::new(&format!("^(?:{re})$")).size_limit(REGEX_SIZE_LIMIT).build();
            match built {
                Ok(r) => ClaimOp::Regex(r),
                Err(e) => {
                    c.fail(format!("{field}.regex"), format!("invalid regex: {e}"));
                    return None;
                }
            }
        }
    };
    Some(ClaimRule { claim: path, op })
}

// ---------------------------------------------------------------- Route

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Segment {
    Literal(String),
    Param(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    /// Matches on segment boundaries: `/api` matches `/api` and `/api/x`, not `/apix`.
    Prefix(String),
    Template {
        raw: String,
        segments: Vec<Segment>,
    },
}

impl PathMatch {
    /// A key that is equal for two path matches that would match exactly the same paths.
    pub fn identity(&self) -> String {
        match self {
            PathMatch::Exact(p) => format!("exact:{p}"),
            PathMatch::Prefix(p) => format!("prefix:{}", p.trim_end_matches('/')),
            PathMatch::Template { segments, .. } => {
                let mut s = String::from("template:");
                for seg in segments {
                    s.push('/');
                    match seg {
                        Segment::Literal(l) => s.push_str(l),
                        Segment::Param(_) => s.push_str("{}"),
                    }
                }
                s
            }
        }
    }
}

fn parse_template(t: &str) -> Result<Vec<Segment>, String> {
    if !t.starts_with('/') {
        return Err(format!("template {t:?} must start with '/'"));
    }
    let mut names = HashSet::new();
    let mut segments = Vec::new();
    for seg in t[1..].split('/') {
        if let Some(inner) = seg.strip_prefix('{') {
            let name = inner
                .strip_suffix('}')
                .ok_or_else(|| format!("template {t:?}: segment {seg:?} opens '{{' without closing it"))?;
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!("template {t:?}: parameter name {name:?} must be letters, digits or '_'"));
            }
            if !names.insert(name) {
                return Err(format!("template {t:?}: parameter {name:?} appears twice"));
            }
            segments.push(Segment::Param(name.to_owned()));
        } else {
            if seg.contains(['{', '}']) {
                return Err(format!("template {t:?}: a parameter must be a whole segment, as in /users/{{id}}"));
            }
            segments.push(Segment::Literal(seg.to_owned()));
        }
    }
    let literal: String = segments
        .iter()
        .map(|s| match s {
            Segment::Literal(l) => format!("/{l}"),
            Segment::Param(_) => "/p".to_owned(),
        })
        .collect();
    validate::route_path(&literal).map_err(|e| format!("template {t:?}: {e}"))?;
    Ok(segments)
}

const METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathRewrite {
    None,
    StripPrefix(String),
    ReplacePrefix { prefix: String, replacement: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    /// Empty = any host.
    pub hosts: Vec<String>,
    /// Empty = any method.
    pub methods: Vec<String>,
    pub path: PathMatch,
    pub upstream: String,
    pub policy: String,
    pub rewrite_path: PathRewrite,
    pub set_headers: BTreeMap<String, String>,
    pub remove_headers: Vec<String>,
    pub max_body_bytes: Option<u64>,
    pub timeout: Option<Duration>,
}

impl TryFrom<&pb::Route> for Route {
    type Error = Violations;

    fn try_from(p: &pb::Route) -> Result<Self, Violations> {
        let mut c = Checker::new(Kind::Route, &p.name);
        check_name(&mut c, &p.name);
        let m = p.r#match.clone().unwrap_or_default();
        if p.r#match.is_none() {
            c.fail("match", "required: hosts, methods and path");
        }
        let mut hosts = Vec::new();
        for (i, h) in m.hosts.iter().enumerate() {
            if c.check(format!("match.hosts[{i}]"), validate::route_host(h)).is_some() && h != "*" {
                hosts.push(h.to_ascii_lowercase());
            }
        }
        if m.hosts.iter().any(|h| h == "*") {
            hosts.clear(); // any host
        }
        unique(&mut c, "match.hosts", &m.hosts);
        for (i, method) in m.methods.iter().enumerate() {
            if !METHODS.contains(&method.as_str()) {
                c.fail(
                    format!("match.methods[{i}]"),
                    format!("unknown method {method:?}: expected one of {}", METHODS.join(", ")),
                );
            }
        }
        unique(&mut c, "match.methods", &m.methods);
        use pb::path_match::Kind as PK;
        // `path_ok` is false when the path was rejected: checks that depend on it (rewrites) are
        // skipped then, so one mistake is reported once.
        let (path, path_ok) = match m.path.as_ref().and_then(|p| p.kind.as_ref()) {
            None => {
                c.fail("match.path", "required: exact, prefix or template");
                (PathMatch::Exact("/".into()), false)
            }
            Some(PK::Exact(s)) => {
                let ok = c.check("match.path.exact", validate::route_path(s)).is_some();
                (PathMatch::Exact(s.clone()), ok)
            }
            Some(PK::Prefix(s)) => {
                let ok = c.check("match.path.prefix", validate::route_path(s)).is_some();
                (PathMatch::Prefix(s.clone()), ok)
            }
            Some(PK::Template(s)) => match c.check("match.path.template", parse_template(s)) {
                Some(segments) => (PathMatch::Template { raw: s.clone(), segments }, true),
                None => (PathMatch::Exact("/".into()), false),
            },
        };
        if p.upstream.is_empty() {
            c.fail("upstream", "required: the name of an Upstream");
        }
        if p.policy.is_empty() {
            c.fail(
                "policy",
                "required: every route needs a policy (default deny); to expose it without authentication, use a policy with authentication mode public and a reason",
            );
        }
        let rw = p.rewrite.clone().unwrap_or_default();
        use pb::rewrite::Path as RP;
        let rewrite_path = match &rw.path {
            None => PathRewrite::None,
            Some(RP::StripPrefix(s)) => {
                c.check("rewrite.strip_prefix", validate::route_path(s));
                if path_ok {
                    check_rewrite_prefix(&mut c, "rewrite.strip_prefix", s, &path);
                }
                PathRewrite::StripPrefix(s.clone())
            }
            Some(RP::ReplacePrefix(r)) => {
                c.check("rewrite.replace_prefix.prefix", validate::route_path(&r.prefix));
                c.check("rewrite.replace_prefix.replacement", validate::route_path(&r.replacement));
                if path_ok {
                    check_rewrite_prefix(&mut c, "rewrite.replace_prefix.prefix", &r.prefix, &path);
                }
                PathRewrite::ReplacePrefix { prefix: r.prefix.clone(), replacement: r.replacement.clone() }
            }
        };
        for (name, value) in &rw.set_headers {
            c.check(format!("rewrite.set_headers.{name}"), validate::header_name(name));
            c.check(format!("rewrite.set_headers.{name}"), validate::header_value(value));
        }
        for (i, name) in rw.remove_headers.iter().enumerate() {
            c.check(format!("rewrite.remove_headers[{i}]"), validate::header_name(name));
        }
        let limits = p.limits.unwrap_or_default();
        let timeout = opt_duration(&mut c, "limits.timeout", limits.timeout.as_ref()).filter(|d| !d.is_zero());
        if timeout.is_some_and(|t| t > MAX_TIMEOUT) {
            c.fail("limits.timeout", "must be at most 1h");
        }
        c.finish(Route {
            name: p.name.clone(),
            hosts,
            methods: m.methods.clone(),
            path,
            upstream: p.upstream.clone(),
            policy: p.policy.clone(),
            rewrite_path,
            set_headers: rw.set_headers.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect(),
            remove_headers: rw.remove_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
            max_body_bytes: (limits.max_body_bytes > 0).then_some(limits.max_body_bytes),
            timeout,
        })
    }
}

/// A prefix rewrite must apply to every path the route matches, or it would silently not happen.
fn check_rewrite_prefix(c: &mut Checker, field: &str, prefix: &str, path: &PathMatch) {
    let matched = match path {
        PathMatch::Exact(p) | PathMatch::Prefix(p) => p.as_str(),
        PathMatch::Template { raw, .. } => raw.as_str(),
    };
    let p = prefix.trim_end_matches('/');
    let on_boundary = matched == p || matched.starts_with(&format!("{p}/")) || p.is_empty();
    if !on_boundary {
        c.fail(field, format!("{prefix:?} is not a prefix of the matched path {matched:?}"));
    }
}

// ---------------------------------------------------------------- Block

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockTarget {
    ClientId(String),
    Sub(String),
    Jti(String),
    Cidr(ipnet::IpNet),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub name: String,
    pub target: BlockTarget,
    pub reason: String,
    pub expires_at: Option<SystemTime>,
}

impl TryFrom<&pb::Block> for Block {
    type Error = Violations;

    fn try_from(p: &pb::Block) -> Result<Self, Violations> {
        let mut c = Checker::new(Kind::Block, &p.name);
        check_name(&mut c, &p.name);
        use pb::block::Target;
        let nonempty = |c: &mut Checker, field: &str, v: &str| {
            if v.is_empty() {
                c.fail(field, "value is empty");
            }
            v.to_owned()
        };
        let target = match &p.target {
            None => {
                c.fail("target", "required: client_id, sub, jti or cidr");
                BlockTarget::Jti(String::new())
            }
            Some(Target::ClientId(v)) => BlockTarget::ClientId(nonempty(&mut c, "client_id", v)),
            Some(Target::Sub(v)) => BlockTarget::Sub(nonempty(&mut c, "sub", v)),
            Some(Target::Jti(v)) => BlockTarget::Jti(nonempty(&mut c, "jti", v)),
            Some(Target::Cidr(v)) => match c.check("cidr", validate::cidr(v)) {
                Some(net) => BlockTarget::Cidr(net),
                None => BlockTarget::Jti(String::new()),
            },
        };
        if p.reason.trim().is_empty() {
            c.fail("reason", "a block needs a reason (it is audited and reviewed)");
        }
        let expires_at = match &p.expires_at {
            None => None,
            Some(t) => {
                let v = timestamp(t);
                if v.is_none() {
                    c.fail("expires_at", "invalid timestamp");
                }
                v
            }
        };
        c.finish(Block { name: p.name.clone(), target, reason: p.reason.clone(), expires_at })
    }
}

// ---------------------------------------------------------------- any

#[derive(Clone, Debug, PartialEq)]
pub enum Resource {
    Upstream(Upstream),
    Issuer(Issuer),
    Key(Key),
    Policy(Policy),
    Route(Route),
    Block(Block),
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Upstream(_) => Kind::Upstream,
            Resource::Issuer(_) => Kind::Issuer,
            Resource::Key(_) => Kind::Key,
            Resource::Policy(_) => Kind::Policy,
            Resource::Route(_) => Kind::Route,
            Resource::Block(_) => Kind::Block,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Resource::Upstream(r) => &r.name,
            Resource::Issuer(r) => &r.name,
            Resource::Key(r) => &r.name,
            Resource::Policy(r) => &r.name,
            Resource::Route(r) => &r.name,
            Resource::Block(r) => &r.name,
        }
    }
}

impl TryFrom<&pb::Resource> for Resource {
    type Error = Violations;

    fn try_from(p: &pb::Resource) -> Result<Self, Violations> {
        use pb::resource::Kind as K;
        match &p.kind {
            Some(K::Upstream(r)) => Upstream::try_from(r).map(Resource::Upstream),
            Some(K::Issuer(r)) => Issuer::try_from(r).map(Resource::Issuer),
            Some(K::Key(r)) => Key::try_from(r).map(Resource::Key),
            Some(K::Policy(r)) => Policy::try_from(r).map(Resource::Policy),
            Some(K::Route(r)) => Route::try_from(r).map(Resource::Route),
            Some(K::Block(r)) => Block::try_from(r).map(Resource::Block),
            None => Err(Violations(vec![crate::Violation {
                kind: Kind::Route,
                name: String::new(),
                field: "kind".into(),
                message: "the resource has no kind set".into(),
            }])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::parse_documents;

    /// Parses one YAML document and validates it: the fields named by the violations (empty
    /// when valid), each with a fragment its message must contain.
    fn check(yaml: &str, want: &[(&str, &str)]) {
        let docs = parse_documents(yaml, "test").unwrap_or_else(|e| panic!("bad test document: {e:?}"));
        let got = match Resource::try_from(&docs[0]) {
            Ok(_) => Vec::new(),
            Err(v) => v.0,
        };
        let fields: Vec<&str> = got.iter().map(|v| v.field.as_str()).collect();
        let want_fields: Vec<&str> = want.iter().map(|(f, _)| *f).collect();
        assert_eq!(fields, want_fields, "{yaml}\n{got:?}");
        for (v, (_, fragment)) in got.iter().zip(want) {
            assert!(v.message.contains(fragment), "{}: {:?} lacks {fragment:?}", v.field, v.message);
        }
    }

    const RSA_N: &str = "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw";

    #[test]
    fn upstreams() {
        check("kind: Upstream\nname: u\nspec: {endpoints: ['127.0.0.1:80', 'svc.internal:8080', '[::1]:443']}", &[]);
        check("kind: Upstream\nname: u\nspec: {}", &[("endpoints", "at least one")]);
        check("kind: Upstream\nname: u\nspec: {endpoints: ['a:1', 'a:1']}", &[("endpoints", "listed twice")]);
        check(
            "kind: Upstream\nname: u\nspec: {endpoints: ['a:1'], connect_timeout: 2h}",
            &[("connect_timeout", "exceeds the maximum of 1h")],
        );
        check(
            "kind: Upstream\nname: u\nspec: {endpoints: ['a:1'], request_timeout: 0s}",
            &[("request_timeout", "greater than zero")],
        );
        check(
            "kind: Upstream\nname: u\nspec: {endpoints: ['a:1'], tls: {ca_file: /ca.pem}}",
            &[("tls.enabled", "not enabled")],
        );
        check(
            "kind: Upstream\nname: u\nspec: {endpoints: ['a:1'], health_check: {path: health}}",
            &[("health_check.path", "must start with '/'")],
        );
    }

    #[test]
    fn issuers() {
        let ok = "kind: Issuer\nname: idp\nspec: {issuer: 'https://idp/', audiences: [api], algorithms: [RS256], keys: {jwks_uri: 'https://idp/jwks'}}";
        check(ok, &[]);
        check(
            "kind: Issuer\nname: idp\nspec: {issuer: 'https://idp/', audiences: [api], algorithms: [none], keys: {jwks_uri: 'https://idp/jwks'}}",
            &[("algorithms[0]", "unsupported algorithm \"none\"")],
        );
        check(
            "kind: Issuer\nname: idp\nspec: {issuer: 'https://idp/', audiences: [api], algorithms: [RS256, HS256], keys: {jwks_uri: 'https://idp/jwks'}}",
            &[("algorithms[1]", "only allowed with keys.shared_secret_file")],
        );
        check(
            "kind: Issuer\nname: idp\nspec: {issuer: 'https://idp/', audiences: [api], algorithms: [RS256], keys: {shared_secret_file: /s}}",
            &[("algorithms[0]", "accepts only HS256")],
        );
        check(
            "kind: Issuer\nname: idp\nspec: {issuer: 'https://idp/', audiences: [], algorithms: [RS256], keys: {discovery: 'ftp://x'}}",
            &[("audiences", "at least one"), ("keys.discovery", "expected http")],
        );
        check(
            "kind: Issuer\nname: idp\nspec: {issuer: 'https://idp/', audiences: [api], algorithms: [RS256], keys: {jwks_uri: 'https://idp/jwks'}, clock_skew: 1h}",
            &[("clock_skew", "at most 10m")],
        );
        check(
            "kind: Issuer\nname: idp\nspec: {issuer: 'https://idp/', audiences: [api], algorithms: [RS256], keys: {jwks_uri: 'https://idp/jwks'}, introspection: {endpoint: 'https://idp/i'}}",
            &[("introspection.client_id", "required")],
        );
        let inline = |jwk: &str| {
            format!(
                "kind: Issuer\nname: idp\nspec: {{issuer: 'https://idp/', audiences: [api], algorithms: [RS256], keys: {{inline: {{keys: [{jwk}]}}}}}}"
            )
        };
        check(&inline(&format!("{{kty: RSA, n: '{RSA_N}', e: AQAB, kid: k1}}")), &[]);
        check(&inline("{kty: RSA, n: 'AQAB', e: AQAB}"), &[("keys.inline.keys[0]", "at least 2048 are required")]);
        check(&inline("{kty: oct, k: c2VjcmV0}"), &[("keys.inline.keys[0]", "symmetric")]);
        check(
            &inline(&format!("{{kty: RSA, n: '{RSA_N}', e: AQAB, d: AQAB}}")),
            &[("keys.inline.keys[0]", "private key member \"d\"")],
        );
    }

    #[test]
    fn keys() {
        check(
            &format!(
                "kind: Key\nname: k\nspec: {{issuer: idp, kid: k1, jwk: {{kty: RSA, n: '{RSA_N}', e: AQAB, kid: k1}}}}"
            ),
            &[],
        );
        check(
            &format!(
                "kind: Key\nname: k\nspec: {{issuer: idp, kid: k1, jwk: {{kty: RSA, n: '{RSA_N}', e: AQAB, kid: k2}}}}"
            ),
            &[("jwk", "differs from the resource's kid")],
        );
        check(
            "kind: Key\nname: k\nspec: {issuer: '', kid: '', jwk: {kty: EC}}",
            &[("issuer", "required"), ("kid", "required")],
        );
    }

    #[test]
    fn policies() {
        check("kind: Policy\nname: p\nspec: {authentication: {mode: public, reason: probe}}", &[]);
        check("kind: Policy\nname: p\nspec: {}", &[("authentication", "default deny")]);
        check(
            "kind: Policy\nname: p\nspec: {authentication: {mode: public}}",
            &[("authentication.reason", "non-empty reason")],
        );
        check(
            "kind: Policy\nname: p\nspec: {authentication: {mode: public, reason: x}, authorization: {required_scopes: [a]}}",
            &[("authorization", "cannot require scopes")],
        );
        check(
            "kind: Policy\nname: p\nspec: {authentication: {mode: required}}",
            &[("authentication.issuers", "at least one issuer")],
        );
        check(
            "kind: Policy\nname: p\nspec: {authentication: {mode: required, issuers: [idp]}, authorization: {claims: [{claim: roles, in: []}, {claim: 'a..b', equals: x}, {claim: sub, regex: '('}]}}",
            &[
                ("authorization.claims[0].in", "list is empty"),
                ("authorization.claims[1].claim", "invalid claim path"),
                ("authorization.claims[2].regex", "invalid regex"),
            ],
        );
        check(
            "kind: Policy\nname: p\nspec: {authentication: {mode: required, issuers: [idp]}, rate_limits: [{key: header, limit: 0, window: 1s}, {key: ip, limit: 5}]}",
            &[
                ("rate_limits[0].header", "invalid header name"),
                ("rate_limits[0].limit", "greater than zero"),
                ("rate_limits[1].window", "required"),
            ],
        );
        check(
            "kind: Policy\nname: p\nspec: {authentication: {mode: public, reason: x}, rate_limits: [{key: sub, limit: 5, window: 1s}]}",
            &[("rate_limits[0].key", "key by ip, header or route")],
        );
        check(
            "kind: Policy\nname: p\nspec: {authentication: {mode: required, issuers: [idp]}, ip_filter: {allow: ['10.0.0.1/8'], deny: [nope]}}",
            &[("ip_filter.allow[0]", "did you mean 10.0.0.0/8"), ("ip_filter.deny[0]", "invalid CIDR")],
        );
    }

    #[test]
    fn routes() {
        let route = |spec: &str| format!("kind: Route\nname: r\nspec: {{upstream: u, policy: p, {spec}}}");
        check(&route("match: {path: {prefix: /api}}, rewrite: {strip_prefix: /api}"), &[]);
        check(&route("match: {path: {template: '/users/{id}/orders/{order_id}'}}"), &[]);
        check(
            "kind: Route\nname: r\nspec: {upstream: u, match: {path: {exact: /x}}}",
            &[("policy", "every route needs a policy")],
        );
        check(&route("match: {path: {template: '/users/{id}/{id}'}}"), &[("match.path.template", "appears twice")]);
        check(&route("match: {path: {template: '/users/x{id}'}}"), &[("match.path.template", "whole segment")]);
        // one mistake, one error: a broken path does not also fail the rewrite check
        check(
            &route("match: {path: {template: '/api/{id'}}, rewrite: {strip_prefix: /api}"),
            &[("match.path.template", "without closing")],
        );
        check(
            &route("match: {path: {prefix: /api}}, rewrite: {strip_prefix: /apix}"),
            &[("rewrite.strip_prefix", "not a prefix")],
        );
        check(
            &route("match: {hosts: ['a*.example.com'], methods: [get], path: {exact: /}}"),
            &[("match.hosts[0]", "wildcard"), ("match.methods[0]", "unknown method")],
        );
        check(
            &route("match: {path: {exact: /x}}, rewrite: {set_headers: {'bad name': v}}"),
            &[("rewrite.set_headers.bad name", "invalid header name")],
        );
        check(&route("match: {path: {exact: /x}}, limits: {timeout: 2h}"), &[("limits.timeout", "at most 1h")]);
    }

    #[test]
    fn blocks() {
        check("kind: Block\nname: b\nspec: {cidr: 203.0.113.0/24, reason: abuse}", &[]);
        check("kind: Block\nname: b\nspec: {reason: abuse}", &[("target", "required")]);
        check("kind: Block\nname: b\nspec: {sub: '', reason: ' '}", &[("sub", "empty"), ("reason", "needs a reason")]);
    }
}

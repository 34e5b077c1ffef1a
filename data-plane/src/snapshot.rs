//! The compiled configuration a proxy serves from: built once per config version, off the
//! request path, from the resources the control plane streamed (or the last-known-good file),
//! then published with one pointer swap. A request loads the current snapshot once and uses it
//! to the end, so it never sees half of two versions.
//!
//! Compilation re-validates everything (the proxy does not trust its input either): a resource
//! that does not convert, or a reference that does not resolve, fails the whole version, which
//! the config client NACKs while the previous snapshot keeps serving.
//!
//! Authentication is compiled here too: one [`Verifier`] per Issuer, its key set built from the
//! issuer's inline JWKS (`keys.inline`) plus every Key resource naming it (the control plane
//! streams the keys it fetched from a `jwks_uri` or discovery document as Key resources). Keys are
//! parsed once, here, never per request. Decisions:
//! - a key that cannot be used (bad JWK, duplicate kid, a Key resource for a shared-secret issuer)
//!   is a violation of the whole version (NACK): a half-applied key set would refuse tokens the
//!   operator expects to pass. Retired keys (`retire_at` ≤ compile time) are left out silently.
//!   A Key naming an issuer that does not exist is ignored (no verifier uses it).
//! - an inline JWK without a `kid` gets the synthetic kid `#<index>` (so a single kid-less key
//!   still verifies kid-less tokens, see [`jwt`]).
//! - a `shared_secret_file` issuer (HS*): the proxy reads the secret from that path on its own
//!   file system (mount the same secret into the proxies); a missing, empty or too short secret
//!   is a violation (NACK), never an issuer that accepts anything.
//! - an issuer with an introspection endpoint gets an [`Introspector`] (opaque tokens), whose
//!   client secret the proxy reads from `introspection.client_secret_file` likewise; an
//!   unreadable one is a violation.
//! - an issuer with no usable key yet (its JWKS not fetched) is not an error: its tokens are
//!   refused with `token_kid_unknown` until its keys arrive.
//!
//! Each route gets the verifiers of its policy's issuers ([`Snapshot::route_verifiers`]), so the
//! request path picks them by route index without a lookup.
//!
//! Upstream TLS is compiled here too: each Upstream with `tls.enabled` gets [`TlsSettings`] (a
//! rustls client configuration with the roots of its `ca_file`, or the system roots, and ALPN
//! `h2` or `http/1.1`, plus its `server_name`). Configurations are cached by (`ca_file`, ALPN)
//! and carried to the next version: a push re-reads a CA file only when its modification time
//! or size changed, so unchanged upstreams keep the very same settings (and with them their
//! pooled connections, see `upstream.rs`). A `ca_file` (or system bundle) that cannot be read or
//! holds no usable certificate is a violation of `tls.ca_file`: the version is NACKed.
//!
//! A delta that only upserts or removes routes (the common change) is compiled from the
//! previous snapshot in time proportional to the change ([`compile_changes`]): the route list
//! and the route table are shared with the previous version ([`crate::cow`]), only the changed
//! routes are converted and validated, and a removed route's index goes to the last route.
//! Route indexes are therefore not in any particular order; nothing depends on it (the route
//! table breaks ties by name, not index). Any other change compiles the whole version, reusing
//! what is unchanged by revision ([`compile_from`]).
//!
//! State that must outlive a swap (upstream connection pools, rate-limit buckets, token
//! caches) is not in here: it lives beside the snapshot, keyed by stable identity.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use portcullis_proto::config::v1 as pb;
use portcullis_shared::http_client::{self, tls_client_config};
use portcullis_shared::jwt::{self, KeySet, Verifier};
use portcullis_shared::kind::ResourceExt;
use portcullis_shared::model::{self, Resource};
use portcullis_shared::{Kind, Violation, Violations};

use crate::cow::{CowMap, CowVec};
use crate::introspect::Introspector;
use crate::pipeline::{RouteBindings, RoutePlan};
use crate::router::RouteTable;
use crate::upstream::TlsSettings;

/// The resources of one config version, by kind and name.
pub type ResourceMap = BTreeMap<(Kind, String), pb::Resource>;

/// Where the current snapshot is published; `None` until the first one is applied (the proxy
/// is not ready before that).
pub type SnapshotHandle = Arc<ArcSwapOption<Snapshot>>;

pub fn new_handle() -> SnapshotHandle {
    Arc::new(ArcSwapOption::empty())
}

/// A route with everything it refers to resolved.
#[derive(Debug)]
pub struct CompiledRoute {
    pub route: model::Route,
    pub upstream: Arc<model::Upstream>,
    pub policy: Arc<model::Policy>,
    /// The upstream's TLS settings (`None`: plain HTTP).
    pub tls: Option<Arc<TlsSettings>>,
    /// What the request path needs, parsed once here (header names and values, the timeout).
    pub plan: RoutePlan,
    /// Handles to state outside the snapshot (metrics, endpoint state), resolved on first use.
    pub bindings: RouteBindings,
}

/// Cloning one is cheap apart from the upstream, policy, issuer and key maps (one entry per
/// resource of those kinds, not per route): that is how [`compile_changes`] starts.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The control plane's config version (store revision) this snapshot is.
    pub version: i64,
    pub table: RouteTable,
    /// Indexed by the route index the table returns.
    pub routes: CowVec<Arc<CompiledRoute>>,
    pub upstreams: HashMap<String, Arc<model::Upstream>>,
    /// The TLS settings of the upstreams with TLS enabled, by upstream name.
    pub upstream_tls: HashMap<String, Arc<TlsSettings>>,
    pub policies: HashMap<String, Arc<model::Policy>>,
    pub issuers: HashMap<String, Arc<model::Issuer>>,
    pub keys: Vec<model::Key>,
    /// One verifier per Issuer, by the Issuer resource's name.
    pub verifiers: HashMap<String, Arc<Verifier>>,
    /// Indexed like `routes`: the verifiers of the route's policy's issuers, in the policy's
    /// order (empty for a public policy).
    pub route_verifiers: CowVec<Arc<[Arc<Verifier>]>>,
    /// One introspector per Issuer with an introspection endpoint, by the Issuer's name.
    pub introspectors: HashMap<String, Arc<Introspector>>,
    pub blocks: Vec<model::Block>,
    /// How many resources the version holds (for `/config`).
    pub resource_count: usize,
    /// What the next compile may reuse: the store revision each converted upstream, policy and
    /// route had (see [`compile_from`]).
    reuse: Reuse,
    /// The earliest `retire_at` still ahead at compile time: from then on the key sets are
    /// stale, and [`compile_changes`] compiles the whole version to drop the retired key.
    keys_valid_until: Option<SystemTime>,
}

/// Converted resources by name with the revision they were converted from. Revisions are store
/// revisions, set by the control plane: an unchanged revision means unchanged content.
#[derive(Debug, Default, Clone)]
struct Reuse {
    upstreams: HashMap<String, i64>,
    policies: HashMap<String, i64>,
    /// Route name → (revision, index in [`Snapshot::routes`]).
    routes: CowMap<Box<[u8]>, (i64, usize)>,
    /// TLS client configurations by (CA file, `None` = system roots; HTTP/2), with the CA file's
    /// stamp when it was read.
    tls_configs: HashMap<(Option<String>, bool), (FileStamp, Arc<rustls::ClientConfig>)>,
}

/// What tells a changed CA file from an unchanged one without reading it.
type FileStamp = (Option<SystemTime>, u64);

fn file_stamp(path: &Path) -> FileStamp {
    std::fs::metadata(path).map_or((None, 0), |m| (m.modified().ok(), m.len()))
}

#[derive(Debug, thiserror::Error)]
#[error("config version {version} rejected: {violations}")]
pub struct CompileError {
    pub version: i64,
    pub violations: Violations,
}

/// Validates and compiles `resources` as config `version`.
pub fn compile(version: i64, resources: &ResourceMap) -> Result<Snapshot, CompileError> {
    compile_from(version, resources, None)
}

/// Like [`compile`], reusing what `previous` already converted and compiled: an upstream,
/// policy or route whose revision is unchanged (and, for a route, whose upstream and policy
/// are the very same ones) is not converted again. A one-route change to a 10k-route config
/// then costs one conversion and the route-table build, not ten thousand conversions.
pub fn compile_from(
    version: i64,
    resources: &ResourceMap,
    previous: Option<&Snapshot>,
) -> Result<Snapshot, CompileError> {
    let empty = Reuse::default();
    let prev = previous.map_or(&empty, |p| &p.reuse);
    let prev_upstreams = previous.map(|p| &p.upstreams);
    let prev_policies = previous.map(|p| &p.policies);
    let mut reuse = Reuse::default();
    let mut violations = Vec::new();
    let mut upstreams = HashMap::new();
    let mut policies = HashMap::new();
    let mut issuers = HashMap::new();
    let mut keys = Vec::new();
    let mut blocks = Vec::new();
    let mut routes = Vec::new();
    let mut reusable_routes = Vec::new();
    let mut kept: Vec<(i64, Arc<CompiledRoute>)> = Vec::new();
    for ((kind, name), resource) in resources {
        let revision = resource.revision();
        // Reuse needs a real store revision: 0 means "unknown" (hand-built maps in tests).
        let same = |seen: Option<&i64>| revision > 0 && seen == Some(&revision);
        match kind {
            Kind::Upstream if same(prev.upstreams.get(name)) => {
                if let Some(u) = prev_upstreams.and_then(|m| m.get(name)) {
                    upstreams.insert(name.clone(), Arc::clone(u));
                    reuse.upstreams.insert(name.clone(), revision);
                    continue;
                }
            }
            Kind::Policy if same(prev.policies.get(name)) => {
                if let Some(p) = prev_policies.and_then(|m| m.get(name)) {
                    policies.insert(name.clone(), Arc::clone(p));
                    reuse.policies.insert(name.clone(), revision);
                    continue;
                }
            }
            Kind::Route if same(prev.routes.get(name.as_bytes()).map(|(r, _)| r)) => {
                let compiled = prev.routes.get(name.as_bytes()).and_then(|(_, at)| previous?.routes.get(*at));
                if let Some(compiled) = compiled {
                    reusable_routes.push((revision, Arc::clone(compiled)));
                    continue;
                }
            }
            _ => {}
        }
        match Resource::try_from(resource) {
            Err(v) => violations.extend(v.0),
            Ok(r) if r.kind() != *kind || r.name() != name => violations.push(Violation {
                kind: *kind,
                name: name.clone(),
                field: "name".into(),
                message: format!("stored under {kind} {name} but is {} {}", r.kind(), r.name()),
            }),
            Ok(Resource::Upstream(u)) => {
                reuse.upstreams.insert(u.name.clone(), revision);
                upstreams.insert(u.name.clone(), Arc::new(u));
            }
            Ok(Resource::Policy(p)) => {
                reuse.policies.insert(p.name.clone(), revision);
                policies.insert(p.name.clone(), Arc::new(p));
            }
            Ok(Resource::Issuer(i)) => {
                issuers.insert(i.name.clone(), Arc::new(i));
            }
            Ok(Resource::Key(k)) => keys.push(k),
            Ok(Resource::Block(b)) => blocks.push(b),
            Ok(Resource::Route(r)) => routes.push((revision, r)),
        }
    }
    let upstream_tls = compile_tls(&upstreams, previous, &mut reuse, &mut violations);
    // A reused route keeps its compiled form only if its upstream, policy and TLS settings are
    // the very same objects as before; otherwise it is compiled again against the new ones.
    for (revision, compiled) in reusable_routes {
        let unchanged = upstreams.get(&compiled.route.upstream).is_some_and(|u| Arc::ptr_eq(u, &compiled.upstream))
            && policies.get(&compiled.route.policy).is_some_and(|p| Arc::ptr_eq(p, &compiled.policy))
            && same_tls(upstream_tls.get(&compiled.route.upstream), compiled.tls.as_ref());
        if unchanged {
            kept.push((revision, compiled));
        } else {
            routes.push((revision, compiled.route.clone()));
        }
    }
    for p in policies.values() {
        if let model::Authentication::Required(a) | model::Authentication::Optional(a) = &p.authentication {
            for i in &a.issuers {
                if !issuers.contains_key(i) {
                    violations.push(missing(Kind::Policy, &p.name, "authentication.issuers", Kind::Issuer, i));
                }
            }
        }
    }
    let now = SystemTime::now();
    let verifiers = compile_verifiers(&issuers, &keys, now, &mut violations);
    let introspectors = compile_introspectors(&issuers, &verifiers, &mut violations);
    let mut compiled = kept;
    compiled.reserve(routes.len());
    for (revision, route) in routes {
        let upstream = upstreams.get(&route.upstream).cloned();
        let policy = policies.get(&route.policy).cloned();
        match (upstream, policy) {
            (Some(upstream), Some(policy)) => match RoutePlan::compile(&route, &upstream, &policy) {
                Ok(plan) => {
                    let tls = upstream_tls.get(&route.upstream).cloned();
                    let bindings = RouteBindings::default();
                    let c = Arc::new(CompiledRoute { route, upstream, policy, tls, plan, bindings });
                    compiled.push((revision, c));
                }
                Err(v) => violations.push(v),
            },
            (u, p) => {
                if u.is_none() {
                    violations.push(missing(Kind::Route, &route.name, "upstream", Kind::Upstream, &route.upstream));
                }
                if p.is_none() {
                    violations.push(missing(Kind::Route, &route.name, "policy", Kind::Policy, &route.policy));
                }
            }
        }
    }
    // A whole compile orders routes by name, as the map is, whichever were reused.
    compiled.sort_unstable_by(|(_, a), (_, b)| a.route.name.cmp(&b.route.name));
    if !violations.is_empty() {
        return Err(CompileError { version, violations: Violations(violations) });
    }
    let mut by_policy: HashMap<&str, Arc<[Arc<Verifier>]>> = HashMap::new();
    let route_verifiers = compiled
        .iter()
        .map(|(_, c)| {
            let p = &c.policy;
            Arc::clone(by_policy.entry(p.name.as_str()).or_insert_with(|| policy_verifiers(p, &verifiers)))
        })
        .collect();
    let table = RouteTable::build(compiled.iter().map(|(_, c)| &c.route));
    for (at, (revision, c)) in compiled.iter().enumerate() {
        *reuse.routes.get_or_insert_with(c.route.name.as_bytes(), || c.route.name.as_bytes().into(), || (0, 0)) =
            (*revision, at);
    }
    let keys_valid_until = keys.iter().filter_map(|k| k.retire_at).filter(|t| *t > now).min();
    Ok(Snapshot {
        version,
        table,
        routes: compiled.into_iter().map(|(_, c)| c).collect(),
        upstreams,
        upstream_tls,
        policies,
        issuers,
        keys,
        verifiers,
        route_verifiers,
        introspectors,
        blocks,
        resource_count: resources.len(),
        reuse,
        keys_valid_until,
    })
}

fn same_tls(a: Option<&Arc<TlsSettings>>, b: Option<&Arc<TlsSettings>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

/// The TLS settings of every upstream with TLS enabled (see the module docs). The client
/// configurations built or kept go into `reuse` for the next version.
fn compile_tls(
    upstreams: &HashMap<String, Arc<model::Upstream>>,
    previous: Option<&Snapshot>,
    reuse: &mut Reuse,
    violations: &mut Vec<Violation>,
) -> HashMap<String, Arc<TlsSettings>> {
    let mut out = HashMap::new();
    let violation = |name: &str, field: &str, message: String| Violation {
        kind: Kind::Upstream,
        name: name.to_owned(),
        field: field.into(),
        message,
    };
    for (name, upstream) in upstreams {
        let Some(tls) = &upstream.tls else { continue };
        let key = (tls.ca_file.clone(), upstream.http2);
        let config = match reuse.tls_configs.get(&key) {
            Some((_, config)) => Arc::clone(config),
            None => {
                let path = tls.ca_file.as_ref().map_or_else(http_client::system_roots_path, PathBuf::from);
                let stamp = file_stamp(&path);
                let cached = previous
                    .and_then(|p| p.reuse.tls_configs.get(&key))
                    .filter(|(seen, _)| stamp.0.is_some() && *seen == stamp);
                let config = match cached {
                    Some((_, config)) => Arc::clone(config),
                    None => {
                        let alpn: &[&[u8]] = if upstream.http2 { &[b"h2"] } else { &[b"http/1.1"] };
                        match tls_client_config(tls.ca_file.as_deref().map(Path::new), alpn) {
                            Ok(config) => config,
                            Err(e) => {
                                let message = match tls.ca_file {
                                    Some(_) => e.to_string(),
                                    None => format!("system roots: {e}"),
                                };
                                violations.push(violation(name, "tls.ca_file", message));
                                continue;
                            }
                        }
                    }
                };
                reuse.tls_configs.insert(key, (stamp, Arc::clone(&config)));
                config
            }
        };
        let server_name = match &tls.server_name {
            None => None,
            Some(n) => match http_client::server_name(n) {
                Ok(n) => Some(n),
                Err(e) => {
                    violations.push(violation(name, "tls.server_name", e.to_string()));
                    continue;
                }
            },
        };
        // Unchanged settings stay the very same object: routes and pooled connections keep.
        let kept = previous
            .and_then(|p| p.upstream_tls.get(name))
            .filter(|t| Arc::ptr_eq(t.config(), &config) && t.server_name == server_name);
        let settings = match kept {
            Some(t) => Arc::clone(t),
            None => Arc::new(TlsSettings::new(config, server_name)),
        };
        out.insert(name.clone(), settings);
    }
    out
}

/// The verifiers of a policy's issuers, in the policy's order (none for a public policy).
fn policy_verifiers(policy: &model::Policy, verifiers: &HashMap<String, Arc<Verifier>>) -> Arc<[Arc<Verifier>]> {
    match &policy.authentication {
        model::Authentication::Required(a) | model::Authentication::Optional(a) => {
            a.issuers.iter().filter_map(|i| verifiers.get(i).cloned()).collect()
        }
        model::Authentication::Public { .. } => Arc::from([]),
    }
}

/// Compiles `resources` as config `version`, which differs from `previous` (the snapshot of the
/// resources before the change) in the keys `changed` only. When those are all routes and the
/// key sets are not due to change (a key retiring), the new snapshot is `previous` with those
/// routes taken out, converted, validated and put back in: the cost of the change, not of the
/// configuration. Otherwise, and without a previous snapshot, it is [`compile_from`].
///
/// The result is what [`compile`] would make of `resources`, route indexes aside: each route
/// compiled against the same upstream and policy, every lookup answered alike.
pub fn compile_changes(
    version: i64,
    resources: &ResourceMap,
    previous: Option<&Snapshot>,
    changed: &[(Kind, String)],
) -> Result<Snapshot, CompileError> {
    let now = SystemTime::now();
    let Some(previous) = previous
        .filter(|p| changed.iter().all(|(kind, _)| *kind == Kind::Route) && p.keys_valid_until.is_none_or(|t| now < t))
    else {
        return compile_from(version, resources, previous);
    };
    // Everything but the routes carries over as it is. (A field indexed by route must be
    // kept in step below, like `routes` and `route_verifiers`.)
    let mut next = previous.clone();
    next.version = version;
    next.resource_count = resources.len();
    let mut violations = Vec::new();
    let mut names: Vec<&str> = changed.iter().map(|(_, name)| name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        next.take_route(name);
        let key = (Kind::Route, name.to_owned());
        let Some(resource) = resources.get(&key) else {
            continue;
        };
        let route = match Resource::try_from(resource) {
            Err(v) => {
                violations.extend(v.0);
                continue;
            }
            Ok(Resource::Route(r)) if r.name == name => r,
            Ok(r) => {
                violations.push(Violation {
                    kind: Kind::Route,
                    name: name.to_owned(),
                    field: "name".into(),
                    message: format!("stored under {} {name} but is {} {}", Kind::Route, r.kind(), r.name()),
                });
                continue;
            }
        };
        let upstream = next.upstreams.get(&route.upstream).cloned();
        let policy = next.policies.get(&route.policy).cloned();
        let (Some(upstream), Some(policy)) = (upstream, policy) else {
            if !next.upstreams.contains_key(&route.upstream) {
                violations.push(missing(Kind::Route, name, "upstream", Kind::Upstream, &route.upstream));
            }
            if !next.policies.contains_key(&route.policy) {
                violations.push(missing(Kind::Route, name, "policy", Kind::Policy, &route.policy));
            }
            continue;
        };
        match RoutePlan::compile(&route, &upstream, &policy) {
            Ok(plan) => {
                let verifiers = policy_verifiers(&policy, &next.verifiers);
                let tls = next.upstream_tls.get(&route.upstream).cloned();
                let c = CompiledRoute { route, upstream, policy, tls, plan, bindings: RouteBindings::default() };
                next.put_route(resource.revision(), Arc::new(c), verifiers);
            }
            Err(v) => violations.push(v),
        }
    }
    if !violations.is_empty() {
        return Err(CompileError { version, violations: Violations(violations) });
    }
    Ok(next)
}

fn missing(kind: Kind, name: &str, field: &str, target: Kind, target_name: &str) -> Violation {
    Violation {
        kind,
        name: name.to_owned(),
        field: field.to_owned(),
        message: format!("{target} {target_name:?} does not exist"),
    }
}

impl Snapshot {
    /// Takes the route named `name` out, if it is in; the last route takes its index.
    fn take_route(&mut self, name: &str) {
        let Some(at) = self.reuse.routes.remove(name.as_bytes()).map(|(_, at)| at) else {
            return;
        };
        if let Some(gone) = self.routes.get(at) {
            self.table.remove(at, &gone.route);
        }
        let last = self.routes.len().saturating_sub(1);
        if at != last
            && let Some(moved) = self.routes.get(last).cloned()
        {
            self.table.remove(last, &moved.route);
            self.table.insert(at, &moved.route);
            if let Some(entry) = self.reuse.routes.get_mut(moved.route.name.as_bytes()) {
                entry.1 = at;
            }
        }
        self.routes.swap_remove(at);
        self.route_verifiers.swap_remove(at);
    }

    /// Adds a route (not in) as the last index.
    fn put_route(&mut self, revision: i64, route: Arc<CompiledRoute>, verifiers: Arc<[Arc<Verifier>]>) {
        let at = self.routes.len();
        self.table.insert(at, &route.route);
        let name = route.route.name.as_bytes();
        *self.reuse.routes.get_or_insert_with(name, || name.into(), || (0, 0)) = (revision, at);
        self.routes.push(route);
        self.route_verifiers.push(verifiers);
    }
}

/// One verifier per issuer (see the module docs for what makes a key a violation).
fn compile_verifiers(
    issuers: &HashMap<String, Arc<model::Issuer>>,
    keys: &[model::Key],
    now: SystemTime,
    violations: &mut Vec<Violation>,
) -> HashMap<String, Arc<Verifier>> {
    let mut out = HashMap::with_capacity(issuers.len());
    for (name, issuer) in issuers {
        let inline = match &issuer.keys.kind {
            model::KeySourceKind::Inline(doc) => match inline_keys(issuer, doc) {
                Ok(k) => k,
                Err(message) => {
                    violations.push(Violation {
                        kind: Kind::Issuer,
                        name: name.clone(),
                        field: "keys.inline".into(),
                        message,
                    });
                    continue;
                }
            },
            _ => Vec::new(),
        };
        if let model::KeySourceKind::SharedSecretFile(path) = &issuer.keys.kind {
            let set = read_secret(path)
                .and_then(|secret| KeySet::from_secret(issuer, secret.as_bytes()).map_err(|e| e.problem));
            match set {
                Ok(set) => {
                    out.insert(name.clone(), Arc::new(Verifier::new(issuer, set)));
                }
                Err(message) => violations.push(Violation {
                    kind: Kind::Issuer,
                    name: name.clone(),
                    field: "keys.shared_secret_file".into(),
                    message,
                }),
            }
            if let Some(key) = keys.iter().find(|k| &k.issuer == name) {
                violations.push(Violation {
                    kind: Kind::Key,
                    name: key.name.clone(),
                    field: "issuer".into(),
                    message: format!("issuer {name} verifies with a shared secret and takes no keys"),
                });
            }
            continue;
        }
        let refs: Vec<&model::Key> = inline.iter().chain(keys.iter().filter(|k| &k.issuer == name)).collect();
        let (set, errors) = KeySet::from_jwks(issuer, &refs, now);
        for e in errors {
            let (kind, name, field) = if inline.iter().any(|k| k.name == e.key) {
                (Kind::Issuer, e.issuer.clone(), "keys.inline")
            } else {
                (Kind::Key, e.key.clone(), "jwk")
            };
            violations.push(Violation { kind, name, field: field.into(), message: e.to_string() });
        }
        out.insert(name.clone(), Arc::new(Verifier::new(issuer, set)));
    }
    out
}

/// Reads a secret file on this proxy (`shared_secret_file`, `client_secret_file`): its content
/// without trailing line breaks, which must not be empty. The only place secret files are read.
fn read_secret(path: &str) -> Result<String, String> {
    let raw = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let secret = raw.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err(format!("{path} is empty"));
    }
    Ok(secret.to_owned())
}

/// One introspector per issuer with an introspection endpoint (client secrets read here).
fn compile_introspectors(
    issuers: &HashMap<String, Arc<model::Issuer>>,
    verifiers: &HashMap<String, Arc<Verifier>>,
    violations: &mut Vec<Violation>,
) -> HashMap<String, Arc<Introspector>> {
    let mut out = HashMap::new();
    for (name, issuer) in issuers {
        let (Some(config), Some(verifier)) = (&issuer.introspection, verifiers.get(name)) else { continue };
        let secret = match config.client_secret_file.as_deref().map(read_secret).transpose() {
            Ok(secret) => secret,
            Err(message) => {
                violations.push(Violation {
                    kind: Kind::Issuer,
                    name: name.clone(),
                    field: "introspection.client_secret_file".into(),
                    message,
                });
                continue;
            }
        };
        match Introspector::compile(issuer, config, secret, Arc::clone(verifier)) {
            Ok(i) => {
                out.insert(name.clone(), Arc::new(i));
            }
            Err(e) => violations.push(Violation {
                kind: Kind::Issuer,
                name: name.clone(),
                field: e.field.into(),
                message: e.message,
            }),
        }
    }
    out
}

/// The keys of an inline JWK Set document, as Key resources of `issuer`.
fn inline_keys(issuer: &model::Issuer, doc: &str) -> Result<Vec<model::Key>, String> {
    if doc.trim().is_empty() {
        return Ok(Vec::new());
    }
    let set: serde_json::Value = serde_json::from_str(doc).map_err(|e| format!("not a JWK Set: {e}"))?;
    let jwks = set.get("keys").and_then(|k| k.as_array()).ok_or("a JWK Set needs a \"keys\" array")?;
    let mut out = Vec::with_capacity(jwks.len());
    for (i, jwk) in jwks.iter().enumerate() {
        let kid = match jwk.get("kid") {
            None => format!("#{i}"),
            Some(serde_json::Value::String(k)) if !k.is_empty() && k.len() <= jwt::MAX_KID_LEN => k.clone(),
            Some(_) => return Err(format!("keys[{i}].kid must be a string of 1 to {} bytes", jwt::MAX_KID_LEN)),
        };
        out.push(model::Key {
            name: format!("{}#inline[{i}]", issuer.name),
            issuer: issuer.name.clone(),
            kid,
            jwk: jwk.clone(),
            retire_at: None,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::Lookup;

    fn insert(map: &mut ResourceMap, r: pb::Resource) {
        let (k, n) = Kind::of(&r).map(|(k, n)| (k, n.to_owned())).unwrap();
        map.insert((k, n), r);
    }

    fn base() -> ResourceMap {
        use pb::resource::Kind as K;
        let mut m = ResourceMap::new();
        insert(
            &mut m,
            pb::Resource {
                kind: Some(K::Upstream(pb::Upstream {
                    name: "u".into(),
                    endpoints: vec!["127.0.0.1:9".into()],
                    ..Default::default()
                })),
            },
        );
        insert(
            &mut m,
            pb::Resource {
                kind: Some(K::Policy(pb::Policy {
                    name: "p".into(),
                    authentication: Some(pb::Authentication {
                        mode: pb::AuthMode::Public as i32,
                        reason: "test".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })),
            },
        );
        insert(&mut m, route("r", "/x", "u", "p"));
        m
    }

    fn route(name: &str, path: &str, upstream: &str, policy: &str) -> pb::Resource {
        pb::Resource {
            kind: Some(pb::resource::Kind::Route(pb::Route {
                name: name.into(),
                r#match: Some(pb::RouteMatch {
                    path: Some(pb::PathMatch { kind: Some(pb::path_match::Kind::Exact(path.into())) }),
                    ..Default::default()
                }),
                upstream: upstream.into(),
                policy: policy.into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn compiles_and_resolves() {
        let snap = compile(7, &base()).unwrap();
        assert_eq!(snap.version, 7);
        assert_eq!(snap.resource_count, 3);
        match snap.table.lookup("any.host", "GET", "/x") {
            Lookup::Found(m) => assert_eq!(snap.routes[m.route].route.name, "r"),
            other => panic!("expected a match, got {other:?}"),
        }
    }

    fn with_revision(mut r: pb::Resource, revision: i64) -> pb::Resource {
        r.set_revision(revision);
        r
    }

    #[test]
    fn unchanged_routes_are_reused_and_changed_ones_recompiled() {
        let mut m = ResourceMap::new();
        for (k, r) in base() {
            m.insert(k, with_revision(r, 1));
        }
        insert(&mut m, with_revision(route("r2", "/y", "u", "p"), 2));
        let first = compile_from(2, &m, None).unwrap();
        // r2 changes; r stays
        insert(&mut m, with_revision(route("r2", "/z", "u", "p"), 3));
        let second = compile_from(3, &m, Some(&first)).unwrap();
        let by_name = |s: &Snapshot, n: &str| Arc::clone(s.routes.iter().find(|c| c.route.name == n).unwrap());
        assert!(Arc::ptr_eq(&by_name(&first, "r"), &by_name(&second, "r")), "unchanged route reused");
        assert!(!Arc::ptr_eq(&by_name(&first, "r2"), &by_name(&second, "r2")), "changed route recompiled");
        assert!(matches!(second.table.lookup("h", "GET", "/z"), Lookup::Found(_)));
        assert!(matches!(second.table.lookup("h", "GET", "/y"), Lookup::NotFound));
        // the upstream changes: every route using it is compiled again against the new one
        let mut u = m[&(Kind::Upstream, "u".to_owned())].clone();
        if let Some(pb::resource::Kind::Upstream(x)) = &mut u.kind {
            x.endpoints = vec!["127.0.0.1:10".into()];
        }
        insert(&mut m, with_revision(u, 4));
        let third = compile_from(4, &m, Some(&second)).unwrap();
        assert_eq!(by_name(&third, "r").upstream.endpoints, ["127.0.0.1:10"]);
        assert!(!Arc::ptr_eq(&by_name(&second, "r"), &by_name(&third, "r")));
        // the same routes in the same order whether reused or not
        let fresh = compile(4, &m).unwrap();
        let names = |s: &Snapshot| s.routes.iter().map(|c| c.route.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&third), names(&fresh));
    }

    /// The name of the route each path finds, per snapshot.
    fn found(s: &Snapshot, path: &str) -> Option<String> {
        match s.table.lookup("h", "GET", path) {
            Lookup::Found(m) => Some(s.routes[m.route].route.name.clone()),
            _ => None,
        }
    }

    #[track_caller]
    fn same_as_fresh(s: &Snapshot, m: &ResourceMap, paths: &[String]) {
        let fresh = compile(s.version, m).unwrap();
        let names = |s: &Snapshot| {
            let mut n: Vec<String> = s.routes.iter().map(|c| c.route.name.clone()).collect();
            n.sort();
            n
        };
        assert_eq!(names(s), names(&fresh));
        assert_eq!(
            (s.routes.len(), s.route_verifiers.len(), s.table.len()),
            (fresh.routes.len(), fresh.routes.len(), fresh.routes.len())
        );
        assert_eq!(s.resource_count, m.len());
        for p in paths {
            assert_eq!(found(s, p), found(&fresh, p), "{p}");
        }
        for (i, c) in s.routes.iter().enumerate() {
            assert_eq!(s.reuse.routes.get(c.route.name.as_bytes()).map(|(_, at)| *at), Some(i));
        }
    }

    #[test]
    fn route_changes_compile_from_the_previous_snapshot_like_a_whole_compile() {
        let mut m = ResourceMap::new();
        for (k, r) in base() {
            m.insert(k, with_revision(r, 1));
        }
        for i in 0..300 {
            insert(&mut m, with_revision(route(&format!("r{i:03}"), &format!("/p/{i}"), "u", "p"), 2));
        }
        let paths: Vec<String> = (0..320).map(|i| format!("/p/{i}")).chain(["/x".into(), "/q".into()]).collect();
        let first = compile_from(2, &m, None).unwrap();
        let original = m.clone();
        let mut snap = compile_from(2, &m, Some(&first)).unwrap();
        let route_key = |n: &str| (Kind::Route, n.to_owned());
        // (upserts as (name, path), removals)
        type Step<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let steps: &[Step<'_>] = &[
            (&[("new1", "/p/310")], &[]),
            (&[("r005", "/p/311")], &[]),
            (&[], &["r000"]),
            (&[], &["new1"]),
            (&[], &["r150", "r299", "nope"]),
            (&[("r150", "/p/150"), ("new2", "/q")], &["r001"]),
            // the same path twice: the name decides, as in a whole compile
            (&[("a-first", "/p/7")], &[]),
            (&[("r002", "/p/312")], &["r002"]),
        ];
        for (v, (upserts, removals)) in (3..).zip(steps) {
            let mut changed = Vec::new();
            for (name, path) in *upserts {
                insert(&mut m, with_revision(route(name, path, "u", "p"), v));
                changed.push(route_key(name));
            }
            for name in *removals {
                m.remove(&route_key(name));
                changed.push(route_key(name));
            }
            let next = compile_changes(v, &m, Some(&snap), &changed).unwrap();
            same_as_fresh(&next, &m, &paths);
            let shared = next.routes.iter().filter(|c| snap.routes.iter().any(|o| Arc::ptr_eq(c, o))).count();
            assert!(shared + upserts.len() >= next.routes.len(), "unchanged routes are not compiled again");
            snap = next;
        }
        assert_eq!(found(&snap, "/p/7").as_deref(), Some("a-first"));
        // The first snapshot is untouched by all of it.
        same_as_fresh(&first, &original, &paths);
    }

    #[test]
    fn a_bad_route_change_fails_and_other_changes_compile_everything() {
        let mut m = ResourceMap::new();
        for (k, r) in base() {
            m.insert(k, with_revision(r, 1));
        }
        let snap = compile_from(1, &m, None).unwrap();
        let key = (Kind::Route, "r2".to_owned());
        insert(&mut m, with_revision(route("r2", "/y", "nope", "p"), 2));
        let err = compile_changes(2, &m, Some(&snap), std::slice::from_ref(&key)).unwrap_err();
        assert_eq!(err.violations.to_string(), "route r2: upstream: upstream \"nope\" does not exist");
        insert(&mut m, with_revision(route("r2", "no-slash", "u", "p"), 2));
        let err = compile_changes(2, &m, Some(&snap), std::slice::from_ref(&key)).unwrap_err();
        assert!(err.to_string().contains("route r2: match.path.exact"), "{err}");
        assert_eq!(found(&snap, "/x").as_deref(), Some("r"));
        // An upstream change compiles the whole version: the routes get the new upstream.
        let mut u = m[&(Kind::Upstream, "u".to_owned())].clone();
        if let Some(pb::resource::Kind::Upstream(x)) = &mut u.kind {
            x.endpoints = vec!["127.0.0.1:10".into()];
        }
        insert(&mut m, with_revision(u, 3));
        insert(&mut m, with_revision(route("r2", "/y", "u", "p"), 3));
        let next = compile_changes(3, &m, Some(&snap), &[key, (Kind::Upstream, "u".to_owned())]).unwrap();
        assert!(next.routes.iter().all(|c| c.upstream.endpoints == ["127.0.0.1:10"]));
        same_as_fresh(&next, &m, &["/x".into(), "/y".into()]);
    }

    #[test]
    fn a_dangling_reference_fails_the_whole_version() {
        let mut m = base();
        insert(&mut m, route("r2", "/y", "nope", "p"));
        let err = compile(8, &m).unwrap_err();
        assert_eq!(err.version, 8);
        assert_eq!(err.violations.to_string(), "route r2: upstream: upstream \"nope\" does not exist");
    }

    fn tls_upstream(name: &str, ca_file: &str, server_name: &str, http2: bool) -> pb::Resource {
        pb::Resource {
            kind: Some(pb::resource::Kind::Upstream(pb::Upstream {
                name: name.into(),
                endpoints: vec!["127.0.0.1:9".into()],
                tls: Some(pb::UpstreamTls { enabled: true, server_name: server_name.into(), ca_file: ca_file.into() }),
                http2,
                ..Default::default()
            })),
        }
    }

    fn test_ca() -> String {
        format!("{}/../tests/keys/tls/test_ca.pem", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn an_unusable_ca_file_fails_the_whole_version() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        for (ca_file, expected) in [
            ("/nonexistent/ca.pem", "reading CA certificates from /nonexistent/ca.pem"),
            (empty.to_str().unwrap(), "holds no usable PEM CA certificate"),
        ] {
            let mut m = base();
            insert(&mut m, tls_upstream("u", ca_file, "", false));
            let err = compile(10, &m).unwrap_err().to_string();
            assert!(err.starts_with("config version 10 rejected: upstream u: tls.ca_file: "), "{err}");
            assert!(err.contains(ca_file) && err.contains(expected), "{err}");
        }
    }

    #[test]
    fn tls_settings_are_built_once_and_kept_while_unchanged() {
        let mut m = ResourceMap::new();
        for (k, r) in base() {
            m.insert(k, with_revision(r, 1));
        }
        insert(&mut m, with_revision(tls_upstream("u", &test_ca(), "", false), 2));
        insert(&mut m, with_revision(tls_upstream("u2", &test_ca(), "api.internal", false), 2));
        insert(&mut m, with_revision(tls_upstream("u3", &test_ca(), "", true), 2));
        let first = compile_from(2, &m, None).unwrap();
        let tls = |s: &Snapshot, n: &str| Arc::clone(&s.upstream_tls[n]);
        assert!(Arc::ptr_eq(first.routes[0].tls.as_ref().unwrap(), &tls(&first, "u")));
        // one configuration per (ca_file, ALPN), shared by upstreams
        assert!(Arc::ptr_eq(tls(&first, "u").config(), tls(&first, "u2").config()));
        assert!(!Arc::ptr_eq(tls(&first, "u").config(), tls(&first, "u3").config()));
        assert_eq!(tls(&first, "u").config().alpn_protocols, [b"http/1.1".to_vec()]);
        assert_eq!(tls(&first, "u3").config().alpn_protocols, [b"h2".to_vec()]);
        assert_eq!(tls(&first, "u2").server_name, http_client::server_name("api.internal").ok());
        assert_eq!(tls(&first, "u").server_name, None);

        // u is stored again with the same TLS fields: the same settings (so the same upstream
        // state and connection pools once the recompiled route resolves it)
        insert(&mut m, with_revision(tls_upstream("u", &test_ca(), "", false), 3));
        let second = compile_from(3, &m, Some(&first)).unwrap();
        assert!(Arc::ptr_eq(&tls(&first, "u"), &tls(&second, "u")));
        assert!(Arc::ptr_eq(second.routes[0].tls.as_ref().unwrap(), &tls(&first, "u")));
        // nothing changed: the route itself is kept
        let again = compile_from(3, &m, Some(&second)).unwrap();
        assert!(Arc::ptr_eq(&second.routes[0], &again.routes[0]));

        // a new server name: new settings, the route is compiled again
        insert(&mut m, with_revision(tls_upstream("u", &test_ca(), "other.internal", false), 4));
        let third = compile_from(4, &m, Some(&second)).unwrap();
        assert!(!Arc::ptr_eq(&tls(&second, "u"), &tls(&third, "u")));
        assert!(Arc::ptr_eq(tls(&second, "u").config(), tls(&third, "u").config()), "the file was not re-read");
        assert!(!Arc::ptr_eq(&second.routes[0], &third.routes[0]));
        assert!(Arc::ptr_eq(third.routes[0].tls.as_ref().unwrap(), &tls(&third, "u")));

        // TLS off: no settings
        insert(&mut m, with_revision(base()[&(Kind::Upstream, "u".to_owned())].clone(), 5));
        let fourth = compile_from(5, &m, Some(&third)).unwrap();
        assert!(!fourth.upstream_tls.contains_key("u"));
        assert!(fourth.routes[0].tls.is_none());
    }

    #[test]
    fn a_changed_ca_file_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::copy(test_ca(), &ca).unwrap();
        let mut m = base();
        insert(&mut m, with_revision(tls_upstream("u", ca.to_str().unwrap(), "", false), 1));
        let first = compile_from(1, &m, None).unwrap();
        let again = compile_from(2, &m, Some(&first)).unwrap();
        assert!(Arc::ptr_eq(&first.upstream_tls["u"], &again.upstream_tls["u"]));
        // another bundle (other size): read again
        let other = format!("{}/../tests/keys/tls/other_ca.pem", env!("CARGO_MANIFEST_DIR"));
        let bundle =
            format!("{}{}", std::fs::read_to_string(test_ca()).unwrap(), std::fs::read_to_string(other).unwrap());
        std::fs::write(&ca, bundle).unwrap();
        let third = compile_from(3, &m, Some(&again)).unwrap();
        assert!(!Arc::ptr_eq(again.upstream_tls["u"].config(), third.upstream_tls["u"].config()));
        // and a file that went away fails the version
        std::fs::remove_file(&ca).unwrap();
        let err = compile_from(4, &m, Some(&third)).unwrap_err().to_string();
        assert!(err.contains("tls.ca_file") && err.contains("ca.pem"), "{err}");
    }

    #[test]
    fn an_invalid_resource_fails_the_whole_version() {
        let mut m = base();
        insert(&mut m, route("bad", "no-slash", "u", "p"));
        let err = compile(9, &m).unwrap_err();
        assert!(err.to_string().contains("route bad: match.path.exact"), "{err}");
    }

    fn secret_issuer(name: &str, keys: pb::key_source::Source, secret_file: &str) -> pb::Resource {
        let hs = matches!(keys, pb::key_source::Source::SharedSecretFile(_));
        pb::Resource {
            kind: Some(pb::resource::Kind::Issuer(pb::Issuer {
                name: name.into(),
                issuer: "https://idp.test/".into(),
                audiences: vec!["api".into()],
                algorithms: vec![if hs { "HS256" } else { "RS256" }.into()],
                keys: Some(pb::KeySource { source: Some(keys), ..Default::default() }),
                introspection: (!secret_file.is_empty()).then(|| pb::Introspection {
                    endpoint: "http://127.0.0.1:9/introspect".into(),
                    client_id: "gw".into(),
                    client_secret_file: secret_file.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn secret_files_are_read_by_the_proxy_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("secret");
        std::fs::write(&good, "s3cr3t-value-that-is-long-enough-for-hs256!\n").unwrap();
        let good = good.display().to_string();
        let missing = dir.path().join("missing").display().to_string();
        let inline = pb::key_source::Source::JwksUri("http://127.0.0.1:9/jwks".into());

        let mut m = base();
        insert(&mut m, secret_issuer("opaque", inline.clone(), &good));
        insert(&mut m, secret_issuer("hmac", pb::key_source::Source::SharedSecretFile(good.clone()), ""));
        let snap = compile(1, &m).unwrap();
        let introspector = &snap.introspectors["opaque"];
        let shown = format!("{introspector:?}");
        assert!(shown.contains("<redacted>") && !shown.contains("s3cr3t"), "{shown}");
        assert_eq!(snap.verifiers["hmac"].keys().len(), 1, "the secret file is the key set");
        assert!(!snap.introspectors.contains_key("hmac"));

        // An unreadable client secret or shared secret fails the version, naming the field.
        let mut m = base();
        insert(&mut m, secret_issuer("opaque", inline, &missing));
        let err = compile(2, &m).unwrap_err().to_string();
        assert!(err.contains("issuer opaque: introspection.client_secret_file: cannot read"), "{err}");
        let mut m = base();
        insert(&mut m, secret_issuer("hmac", pb::key_source::Source::SharedSecretFile(missing), ""));
        let err = compile(3, &m).unwrap_err().to_string();
        assert!(err.contains("issuer hmac: keys.shared_secret_file: cannot read"), "{err}");
        let short = dir.path().join("short");
        std::fs::write(&short, "tiny").unwrap();
        let mut m = base();
        insert(
            &mut m,
            secret_issuer("hmac", pb::key_source::Source::SharedSecretFile(short.display().to_string()), ""),
        );
        let err = compile(4, &m).unwrap_err().to_string();
        assert!(err.contains("keys.shared_secret_file: the shared secret is 4 bytes"), "{err}");
    }
}

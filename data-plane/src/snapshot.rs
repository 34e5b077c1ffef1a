//! The compiled configuration a proxy serves from: built once per config version, off the
//! request path, from the resources the control plane streamed (or the last-known-good file),
//! then published with one pointer swap. A request loads the current snapshot once and uses it
//! to the end, so it never sees half of two versions.
//!
//! Compilation re-validates everything (the proxy does not trust its input either): a resource
//! that does not convert, or a reference that does not resolve, fails the whole version, which
//! the config client NACKs while the previous snapshot keeps serving.
//!
//! State that must outlive a swap (upstream connection pools, rate-limit buckets, token
//! caches) is not in here: it lives beside the snapshot, keyed by stable identity.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use portcullis_proto::config::v1 as pb;
use portcullis_shared::model::{self, Resource};
use portcullis_shared::{Kind, Violation, Violations};

use crate::pipeline::{RouteBindings, RoutePlan};
use crate::router::RouteTable;

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
    /// What the request path needs, parsed once here (header names and values, the timeout).
    pub plan: RoutePlan,
    /// Handles to state outside the snapshot (metrics, endpoint state), resolved on first use.
    pub bindings: RouteBindings,
}

#[derive(Debug)]
pub struct Snapshot {
    /// The control plane's config version (store revision) this snapshot is.
    pub version: i64,
    pub table: RouteTable,
    /// Indexed by the route index the table returns.
    pub routes: Vec<CompiledRoute>,
    pub upstreams: HashMap<String, Arc<model::Upstream>>,
    pub policies: HashMap<String, Arc<model::Policy>>,
    pub issuers: HashMap<String, Arc<model::Issuer>>,
    pub keys: Vec<model::Key>,
    pub blocks: Vec<model::Block>,
    /// How many resources the version holds (for `/config`).
    pub resource_count: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("config version {version} rejected: {violations}")]
pub struct CompileError {
    pub version: i64,
    pub violations: Violations,
}

/// Validates and compiles `resources` as config `version`.
pub fn compile(version: i64, resources: &ResourceMap) -> Result<Snapshot, CompileError> {
    let mut violations = Vec::new();
    let mut upstreams = HashMap::new();
    let mut policies = HashMap::new();
    let mut issuers = HashMap::new();
    let mut keys = Vec::new();
    let mut blocks = Vec::new();
    let mut routes = Vec::new();
    for ((kind, name), resource) in resources {
        match Resource::try_from(resource) {
            Err(v) => violations.extend(v.0),
            Ok(r) if r.kind() != *kind || r.name() != name => violations.push(Violation {
                kind: *kind,
                name: name.clone(),
                field: "name".into(),
                message: format!("stored under {kind} {name} but is {} {}", r.kind(), r.name()),
            }),
            Ok(Resource::Upstream(u)) => {
                upstreams.insert(u.name.clone(), Arc::new(u));
            }
            Ok(Resource::Policy(p)) => {
                policies.insert(p.name.clone(), Arc::new(p));
            }
            Ok(Resource::Issuer(i)) => {
                issuers.insert(i.name.clone(), Arc::new(i));
            }
            Ok(Resource::Key(k)) => keys.push(k),
            Ok(Resource::Block(b)) => blocks.push(b),
            Ok(Resource::Route(r)) => routes.push(r),
        }
    }
    let missing = |kind: Kind, name: &str, field: &str, target: Kind, target_name: &str| Violation {
        kind,
        name: name.to_owned(),
        field: field.to_owned(),
        message: format!("{target} {target_name:?} does not exist"),
    };
    for p in policies.values() {
        if let model::Authentication::Required(a) | model::Authentication::Optional(a) = &p.authentication {
            for i in &a.issuers {
                if !issuers.contains_key(i) {
                    violations.push(missing(Kind::Policy, &p.name, "authentication.issuers", Kind::Issuer, i));
                }
            }
        }
    }
    let mut compiled = Vec::with_capacity(routes.len());
    for route in routes {
        let upstream = upstreams.get(&route.upstream).cloned();
        let policy = policies.get(&route.policy).cloned();
        match (upstream, policy) {
            (Some(upstream), Some(policy)) => match RoutePlan::compile(&route, &upstream, &policy) {
                Ok(plan) => {
                    compiled.push(CompiledRoute { route, upstream, policy, plan, bindings: RouteBindings::default() })
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
    if !violations.is_empty() {
        return Err(CompileError { version, violations: Violations(violations) });
    }
    let table = RouteTable::build(compiled.iter().map(|c| &c.route));
    Ok(Snapshot {
        version,
        table,
        routes: compiled,
        upstreams,
        policies,
        issuers,
        keys,
        blocks,
        resource_count: resources.len(),
    })
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

    #[test]
    fn a_dangling_reference_fails_the_whole_version() {
        let mut m = base();
        insert(&mut m, route("r2", "/y", "nope", "p"));
        let err = compile(8, &m).unwrap_err();
        assert_eq!(err.version, 8);
        assert_eq!(err.violations.to_string(), "route r2: upstream: upstream \"nope\" does not exist");
    }

    #[test]
    fn an_invalid_resource_fails_the_whole_version() {
        let mut m = base();
        insert(&mut m, route("bad", "no-slash", "u", "p"));
        let err = compile(9, &m).unwrap_err();
        assert!(err.to_string().contains("route bad: match.path.exact"), "{err}");
    }
}

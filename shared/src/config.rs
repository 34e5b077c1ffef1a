//! Whole-configuration rules that no single resource can check alone: references between
//! resources, and routes that would match exactly the same requests.

use crate::Kind;
use crate::model::{Authentication, PathMatch, Resource, Route};

/// A reference from one resource to another, with the field that holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    pub field: String,
    pub kind: Kind,
    pub name: String,
}

/// Every resource that `r` refers to. These must exist, and cannot be deleted while referred to.
pub fn references(r: &Resource) -> Vec<Reference> {
    let mut out = Vec::new();
    let mut push = |field: String, kind, name: &str| out.push(Reference { field, kind, name: name.to_owned() });
    match r {
        Resource::Route(route) => {
            push("upstream".into(), Kind::Upstream, &route.upstream);
            push("policy".into(), Kind::Policy, &route.policy);
        }
        Resource::Policy(p) => {
            if let Authentication::Required(a) | Authentication::Optional(a) = &p.authentication {
                for (i, issuer) in a.issuers.iter().enumerate() {
                    push(format!("authentication.issuers[{i}]"), Kind::Issuer, issuer);
                }
            }
        }
        Resource::Key(k) => push("issuer".into(), Kind::Issuer, &k.issuer),
        Resource::Upstream(_) | Resource::Issuer(_) | Resource::Block(_) => {}
    }
    out
}

/// Keys under which two routes conflict: equal keys mean both routes would match the very same
/// requests (same host, same method, same path pattern), so which one wins would be arbitrary.
/// Routes that merely overlap (a prefix and a longer exact path) are fine: the most specific wins.
pub fn route_keys(route: &Route) -> Vec<String> {
    let path = route.path.identity();
    let any = String::from("*");
    let hosts = if route.hosts.is_empty() { std::slice::from_ref(&any) } else { &route.hosts[..] };
    let methods = if route.methods.is_empty() { std::slice::from_ref(&any) } else { &route.methods[..] };
    let mut keys = Vec::with_capacity(hosts.len() * methods.len());
    for h in hosts {
        for m in methods {
            keys.push(format!("{h} {m} {path}"));
        }
    }
    keys
}

/// Human form of a route's match, for conflict messages.
pub fn describe_match(route: &Route) -> String {
    let path = match &route.path {
        PathMatch::Exact(p) => format!("exact {p}"),
        PathMatch::Prefix(p) => format!("prefix {p}"),
        PathMatch::Template { raw, .. } => format!("template {raw}"),
    };
    let hosts = if route.hosts.is_empty() { "*".to_owned() } else { route.hosts.join(",") };
    let methods = if route.methods.is_empty() { "*".to_owned() } else { route.methods.join(",") };
    format!("{methods} {hosts} {path}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_proto::config::v1 as pb;

    fn route(hosts: &[&str], methods: &[&str], path: pb::path_match::Kind) -> Route {
        let p = pb::Route {
            name: "r".into(),
            r#match: Some(pb::RouteMatch {
                hosts: hosts.iter().map(|s| s.to_string()).collect(),
                methods: methods.iter().map(|s| s.to_string()).collect(),
                path: Some(pb::PathMatch { kind: Some(path) }),
            }),
            upstream: "u".into(),
            policy: "p".into(),
            ..Default::default()
        };
        Route::try_from(&p).unwrap()
    }

    #[test]
    fn same_requests_give_equal_keys() {
        use pb::path_match::Kind::*;
        let a = route_keys(&route(&["*"], &[], Template("/users/{id}".into())));
        let b = route_keys(&route(&[], &[], Template("/users/{name}".into())));
        assert_eq!(a, b, "parameter names do not change what matches");
        let c = route_keys(&route(&[], &[], Prefix("/api/".into())));
        let d = route_keys(&route(&[], &[], Prefix("/api".into())));
        assert_eq!(c, d, "a prefix matches on segment boundaries with or without the slash");
        let e = route_keys(&route(&[], &["GET"], Exact("/api".into())));
        assert!(e.iter().all(|k| !d.contains(k)), "exact and prefix differ: most specific wins");
        let f = route_keys(&route(&["a.example.com", "b.example.com"], &["GET", "POST"], Exact("/x".into())));
        assert_eq!(f.len(), 4);
    }

    #[test]
    fn references_name_fields() {
        use pb::path_match::Kind::*;
        let r = Resource::Route(route(&[], &[], Exact("/x".into())));
        let refs = references(&r);
        assert_eq!(refs[0], Reference { field: "upstream".into(), kind: Kind::Upstream, name: "u".into() });
        assert_eq!(refs[1], Reference { field: "policy".into(), kind: Kind::Policy, name: "p".into() });
    }
}

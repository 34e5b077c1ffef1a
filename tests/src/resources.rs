//! Builders for valid resources, so scenarios read as what they change rather than as protobuf.

use pb::resource::Kind as K;
use portcullis_proto::config::v1 as pb;

pub fn upstream(name: &str, endpoint: &str) -> pb::Resource {
    pb::Resource {
        kind: Some(K::Upstream(pb::Upstream {
            name: name.into(),
            endpoints: vec![endpoint.into()],
            ..Default::default()
        })),
    }
}

/// An upstream with TLS enabled: `ca_file` and `server_name` as given (empty: system roots, the
/// endpoint host), HTTP/2 (ALPN `h2`) when `http2`.
pub fn tls_upstream(name: &str, endpoint: &str, ca_file: &str, server_name: &str, http2: bool) -> pb::Resource {
    pb::Resource {
        kind: Some(K::Upstream(pb::Upstream {
            name: name.into(),
            endpoints: vec![endpoint.into()],
            tls: Some(pb::UpstreamTls { enabled: true, server_name: server_name.into(), ca_file: ca_file.into() }),
            http2,
            ..Default::default()
        })),
    }
}

pub fn public_policy(name: &str, reason: &str) -> pb::Resource {
    pb::Resource {
        kind: Some(K::Policy(pb::Policy {
            name: name.into(),
            authentication: Some(pb::Authentication {
                mode: pb::AuthMode::Public as i32,
                reason: reason.into(),
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

pub fn required_policy(name: &str, issuer: &str) -> pb::Resource {
    pb::Resource {
        kind: Some(K::Policy(pb::Policy {
            name: name.into(),
            authentication: Some(pb::Authentication {
                mode: pb::AuthMode::Required as i32,
                issuers: vec![issuer.into()],
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

pub fn issuer(name: &str) -> pb::Resource {
    pb::Resource {
        kind: Some(K::Issuer(pb::Issuer {
            name: name.into(),
            issuer: format!("https://{name}.example.com/"),
            audiences: vec!["api://test".into()],
            algorithms: vec!["ES256".into()],
            keys: Some(pb::KeySource {
                source: Some(pb::key_source::Source::JwksUri(format!("https://{name}.example.com/jwks"))),
                refresh_interval: None,
            }),
            ..Default::default()
        })),
    }
}

pub fn route(name: &str, path: pb::path_match::Kind, upstream: &str, policy: &str) -> pb::Resource {
    pb::Resource {
        kind: Some(K::Route(pb::Route {
            name: name.into(),
            r#match: Some(pb::RouteMatch {
                hosts: vec![],
                methods: vec!["GET".into()],
                path: Some(pb::PathMatch { kind: Some(path) }),
            }),
            upstream: upstream.into(),
            policy: policy.into(),
            ..Default::default()
        })),
    }
}

pub fn exact_route(name: &str, path: &str, upstream: &str, policy: &str) -> pb::Resource {
    route(name, pb::path_match::Kind::Exact(path.into()), upstream, policy)
}

/// Mutable access to the route inside a resource built by [`route`].
pub fn as_route(r: &mut pb::Resource) -> &mut pb::Route {
    match &mut r.kind {
        Some(K::Route(route)) => route,
        _ => panic!("not a route"),
    }
}

/// An upstream, a public policy and `n` routes `/r/0 … /r/{n-1}`: the shape of a big config.
pub fn many_routes(n: usize) -> Vec<pb::Resource> {
    let mut out = vec![upstream("bench-upstream", "127.0.0.1:9000"), public_policy("bench-public", "benchmark")];
    out.extend(
        (0..n).map(|i| exact_route(&format!("route-{i}"), &format!("/r/{i}"), "bench-upstream", "bench-public")),
    );
    out
}

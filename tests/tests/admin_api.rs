//! The admin gRPC API through a real gRPC client, against a control plane on the embedded store
//! and on a real etcd: CRUD with revisions, optimistic concurrency, every class of validation
//! error (rejected with the field named, nothing stored), Apply all-or-nothing and dry-run,
//! Export round trips, and two control-plane replicas sharing one etcd.

use std::time::Duration;

use portcullis_proto::admin::v1 as api;
use portcullis_proto::config::v1 as pb;
use portcullis_tests::control_plane::TestControlPlane;
use portcullis_tests::etcd::EtcdServer;
use portcullis_tests::resources::*;
use prost::Message;
use tonic::Code;

/// Runs one scenario against the embedded store and against etcd.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let cp = super::TestControlPlane::embedded().await;
                    super::$name(&cp).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let etcd = super::EtcdServer::start().await.expect("start etcd");
                    let cp = super::TestControlPlane::etcd(&etcd).await;
                    super::$name(&cp).await;
                }
            )*
        }
    };
}

on_both_stores!(
    crud_with_revisions,
    stale_revisions_are_aborted,
    invalid_resources_are_rejected_with_the_field_and_nothing_is_stored,
    references_are_enforced,
    apply_is_all_or_nothing_and_dry_run_stores_nothing,
    export_then_apply_is_a_no_op,
);

fn put_req(resource: pb::Resource, expected_revision: i64) -> api::PutRequest {
    api::PutRequest { resource: Some(resource), expected_revision }
}

fn apply_req(resources: Vec<pb::Resource>) -> api::ApplyRequest {
    api::ApplyRequest { resources, ..Default::default() }
}

async fn export(cp: &TestControlPlane) -> api::ExportResponse {
    cp.client().await.export(api::ExportRequest {}).await.unwrap().into_inner()
}

fn violations(status: &tonic::Status) -> Vec<api::FieldViolation> {
    api::ValidationErrors::decode(status.details()).expect("details decode").violations
}

async fn base_config(cp: &TestControlPlane) -> i64 {
    let resp = cp
        .client()
        .await
        .apply(apply_req(vec![upstream("orders", "127.0.0.1:9000"), public_policy("health", "liveness probe")]))
        .await
        .unwrap()
        .into_inner();
    resp.revision
}

async fn crud_with_revisions(cp: &TestControlPlane) {
    let mut c = cp.client().await;
    base_config(cp).await;
    let put = c.put(put_req(exact_route("health", "/health", "orders", "health"), -1)).await.unwrap().into_inner();
    assert!(put.revision > 0 && !put.unchanged);

    let got = c
        .get(api::GetRequest { kind: api::Kind::Route as i32, name: "health".into() })
        .await
        .unwrap()
        .into_inner()
        .resource
        .unwrap();
    let Some(pb::resource::Kind::Route(route)) = &got.kind else { panic!("not a route: {got:?}") };
    assert_eq!(route.revision, put.revision, "revision is the store revision of the write");
    assert_eq!(route.upstream, "orders");

    // the same content again is unchanged and keeps its revision
    let again = c.put(put_req(exact_route("health", "/health", "orders", "health"), put.revision)).await.unwrap();
    assert!(again.get_ref().unchanged);
    assert_eq!(again.get_ref().revision, put.revision);

    // an update moves the revision forward
    let updated =
        c.put(put_req(exact_route("health", "/healthz", "orders", "health"), put.revision)).await.unwrap().into_inner();
    assert!(updated.revision > put.revision);

    let list = c.list(api::ListRequest { kind: api::Kind::Route as i32 }).await.unwrap().into_inner();
    assert_eq!(list.resources.len(), 1);
    assert!(list.revision >= updated.revision);
    let all = c.list(api::ListRequest { kind: 0 }).await.unwrap().into_inner();
    assert_eq!(all.resources.len(), 3);

    c.delete(api::DeleteRequest { kind: api::Kind::Route as i32, name: "health".into(), expected_revision: 0 })
        .await
        .unwrap();
    let gone = c.get(api::GetRequest { kind: api::Kind::Route as i32, name: "health".into() }).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let gone = c
        .delete(api::DeleteRequest { kind: api::Kind::Route as i32, name: "health".into(), expected_revision: 0 })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let no_kind = c.get(api::GetRequest { kind: 0, name: "x".into() }).await.unwrap_err();
    assert_eq!(no_kind.code(), Code::InvalidArgument);
}

async fn stale_revisions_are_aborted(cp: &TestControlPlane) {
    let mut c = cp.client().await;
    let first = c.put(put_req(upstream("orders", "127.0.0.1:9000"), 0)).await.unwrap().into_inner().revision;
    let second = c.put(put_req(upstream("orders", "127.0.0.1:9001"), first)).await.unwrap().into_inner().revision;

    // a writer that read `first` loses
    let err = c.put(put_req(upstream("orders", "127.0.0.1:9002"), first)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert!(err.message().contains(&format!("stored revision is {second}")), "{}", err.message());
    // create-only on an existing resource
    let err = c.put(put_req(upstream("orders", "127.0.0.1:9003"), -1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert!(err.message().contains("already exists"), "{}", err.message());
    // a stale delete
    let err = c
        .delete(api::DeleteRequest {
            kind: api::Kind::Upstream as i32,
            name: "orders".into(),
            expected_revision: first,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);

    let stored = c.get(api::GetRequest { kind: api::Kind::Upstream as i32, name: "orders".into() }).await.unwrap();
    let Some(pb::resource::Kind::Upstream(u)) = &stored.get_ref().resource.as_ref().unwrap().kind else { panic!() };
    assert_eq!(u.endpoints, ["127.0.0.1:9001"], "the losing writes changed nothing");
}

/// One bad resource per class, with the field the error must name.
fn invalid_cases() -> Vec<(&'static str, pb::Resource, &'static str, &'static str)> {
    use pb::path_match::Kind::*;
    let mut cases = vec![
        ("bad name", upstream("Orders!", "127.0.0.1:1"), "name", "invalid name"),
        ("bad endpoint", upstream("u2", "127.0.0.1"), "endpoints[0]", "expected host:port"),
        ("no policy", exact_route("r-nopol", "/x", "orders", ""), "policy", "every route needs a policy"),
        (
            "bad template",
            route("r-tpl", Template("/users/{id".into()), "orders", "health"),
            "match.path.template",
            "without closing",
        ),
        (
            "relative path",
            route("r-rel", Prefix("api".into()), "orders", "health"),
            "match.path.prefix",
            "must start with '/'",
        ),
        ("dot segment", route("r-dot", Exact("/a/../b".into()), "orders", "health"), "match.path.exact", "dot segment"),
        ("public without reason", public_policy("p-noreason", "  "), "authentication.reason", "non-empty reason"),
    ];
    // a negative duration
    let mut neg = upstream("u-neg", "127.0.0.1:1");
    if let Some(pb::resource::Kind::Upstream(u)) = &mut neg.kind {
        u.connect_timeout = Some(prost_types_duration(-1));
    }
    cases.push(("negative duration", neg, "connect_timeout", "negative"));
    // a bad CIDR and a bad regex in a policy
    let mut pol = required_policy("p-bad", "idp");
    if let Some(pb::resource::Kind::Policy(p)) = &mut pol.kind {
        p.ip_filter = Some(pb::IpFilter { allow: vec!["10.0.0.0/33".into()], deny: vec![] });
    }
    cases.push(("bad cidr", pol, "ip_filter.allow[0]", "invalid CIDR"));
    let mut pol = required_policy("p-re", "idp");
    if let Some(pb::resource::Kind::Policy(p)) = &mut pol.kind {
        p.authorization = Some(pb::Authorization {
            required_scopes: vec![],
            claims: vec![pb::ClaimRule {
                claim: "sub".into(),
                op: Some(pb::claim_rule::Op::Regex("(unclosed".into())),
            }],
        });
    }
    cases.push(("bad regex", pol, "authorization.claims[0].regex", "invalid regex"));
    // HMAC on an asymmetric issuer (algorithm confusion by configuration)
    let mut iss = issuer("idp-hs");
    if let Some(pb::resource::Kind::Issuer(i)) = &mut iss.kind {
        i.algorithms = vec!["HS256".into()];
    }
    cases.push(("hs256 on asymmetric issuer", iss, "algorithms[0]", "only allowed with keys.shared_secret_file"));
    // a private key in an inline JWKS
    let mut iss = issuer("idp-priv");
    if let Some(pb::resource::Kind::Issuer(i)) = &mut iss.kind {
        i.keys = Some(pb::KeySource {
            source: Some(pb::key_source::Source::InlineJwks(
                r#"{"keys":[{"kty":"EC","crv":"P-256","x":"a","y":"b","d":"secret"}]}"#.into(),
            )),
            refresh_interval: None,
        });
    }
    cases.push(("private jwk", iss, "keys.inline.keys[0]", "private key member"));
    cases
}

fn prost_types_duration(seconds: i64) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos: 0 }
}

async fn invalid_resources_are_rejected_with_the_field_and_nothing_is_stored(cp: &TestControlPlane) {
    let mut c = cp.client().await;
    base_config(cp).await;
    let before = export(cp).await;
    for (case, resource, field, message) in invalid_cases() {
        let (kind, name) = portcullis_shared::Kind::of(&resource).map(|(k, n)| (k, n.to_owned())).unwrap();
        for via_apply in [false, true] {
            let err = if via_apply {
                c.apply(apply_req(vec![resource.clone()])).await.unwrap_err()
            } else {
                c.put(put_req(resource.clone(), 0)).await.unwrap_err()
            };
            assert_eq!(err.code(), Code::InvalidArgument, "{case}: {err:?}");
            let v = violations(&err);
            let hit = v.iter().find(|v| v.field == field);
            let hit = hit.unwrap_or_else(|| panic!("{case}: no violation of {field}: {v:?}"));
            assert_eq!(hit.kind, kind.to_proto() as i32, "{case}");
            assert_eq!(hit.name, name, "{case}");
            assert!(hit.description.contains(message), "{case}: {:?} lacks {message:?}", hit.description);
            assert!(err.message().contains(field), "{case}: summary names the field: {}", err.message());
        }
    }
    let after = export(cp).await;
    assert_eq!(before.resources, after.resources, "rejected writes stored nothing");
    assert_eq!(before.revision, after.revision);
}

async fn references_are_enforced(cp: &TestControlPlane) {
    let mut c = cp.client().await;
    base_config(cp).await;
    // a route to a missing upstream
    let err = c.put(put_req(exact_route("r1", "/x", "missing", "health"), 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("route r1: upstream: upstream \"missing\" does not exist"), "{}", err.message());
    // a policy naming a missing issuer
    let err = c.put(put_req(required_policy("p", "nobody"), 0)).await.unwrap_err();
    assert!(err.message().contains("issuer \"nobody\" does not exist"), "{}", err.message());

    c.put(put_req(exact_route("r1", "/x", "orders", "health"), 0)).await.unwrap();
    // a policy in use cannot be deleted; the error names the user
    let err = c
        .delete(api::DeleteRequest { kind: api::Kind::Policy as i32, name: "health".into(), expected_revision: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("still used by route r1"), "{}", err.message());
    // two routes matching the very same requests
    let err = c.put(put_req(exact_route("r2", "/x", "orders", "health"), 0)).await.unwrap_err();
    assert!(err.message().contains("same requests as route r1"), "{}", err.message());
    // deleting the route and the policy together is fine
    let resp = c
        .apply(api::ApplyRequest {
            deletes: vec![
                api::ResourceRef { kind: api::Kind::Route as i32, name: "r1".into() },
                api::ResourceRef { kind: api::Kind::Policy as i32, name: "health".into() },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.changes.len(), 2);
}

async fn apply_is_all_or_nothing_and_dry_run_stores_nothing(cp: &TestControlPlane) {
    let mut c = cp.client().await;
    base_config(cp).await;
    let before = export(cp).await;

    // 50 good routes and one bad one: nothing lands
    let mut batch: Vec<pb::Resource> =
        (0..50).map(|i| exact_route(&format!("r{i}"), &format!("/r/{i}"), "orders", "health")).collect();
    batch.push(route("bad", pb::path_match::Kind::Template("/x/{".into()), "orders", "health"));
    let err = c.apply(apply_req(batch.clone())).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err).len(), 1, "only the bad route is reported");
    assert_eq!(export(cp).await.resources, before.resources);

    // dry run: the diff, nothing stored
    batch.pop();
    let dry = c
        .apply(api::ApplyRequest { resources: batch.clone(), dry_run: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dry.changes.len(), 50);
    assert!(dry.changes.iter().all(|ch| ch.action == api::change::Action::Create as i32));
    assert_eq!(export(cp).await.resources, before.resources);

    let applied = c.apply(apply_req(batch.clone())).await.unwrap().into_inner();
    assert!(applied.revision > before.revision);
    assert_eq!(export(cp).await.resources.len(), before.resources.len() + 50);
    // every resource of one Apply carries the same revision: it was one transaction
    let list = c.list(api::ListRequest { kind: api::Kind::Route as i32 }).await.unwrap().into_inner();
    for r in &list.resources {
        let Some(pb::resource::Kind::Route(route)) = &r.kind else { panic!() };
        assert_eq!(route.revision, applied.revision);
    }

    // an update dry run names the changed fields
    let mut changed = batch[0].clone();
    as_route(&mut changed).r#match.as_mut().unwrap().methods = vec!["POST".into()];
    let dry = c
        .apply(api::ApplyRequest { resources: vec![changed], dry_run: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dry.changes[0].action, api::change::Action::Update as i32);
    assert_eq!(dry.changes[0].fields, ["match.methods"]);

    // prune deletes what the set no longer has, of the kinds it has
    let keep: Vec<pb::Resource> = batch[..10].to_vec();
    let pruned =
        c.apply(api::ApplyRequest { resources: keep, prune: true, ..Default::default() }).await.unwrap().into_inner();
    let deletes = pruned.changes.iter().filter(|ch| ch.action == api::change::Action::Delete as i32).count();
    assert_eq!(deletes, 40);
    let list = c.list(api::ListRequest { kind: api::Kind::Route as i32 }).await.unwrap().into_inner();
    assert_eq!(list.resources.len(), 10);
    assert_eq!(
        c.list(api::ListRequest { kind: api::Kind::Upstream as i32 }).await.unwrap().get_ref().resources.len(),
        1
    );
}

async fn export_then_apply_is_a_no_op(cp: &TestControlPlane) {
    let mut c = cp.client().await;
    base_config(cp).await;
    let mut routes: Vec<pb::Resource> =
        (0..20).map(|i| exact_route(&format!("r{i}"), &format!("/r/{i}"), "orders", "health")).collect();
    // maps must encode deterministically, or equal resources would look changed
    as_route(&mut routes[0]).rewrite = Some(pb::Rewrite {
        set_headers: (0..8).map(|i| (format!("x-h{i}"), format!("v{i}"))).collect(),
        ..Default::default()
    });
    c.apply(apply_req(routes)).await.unwrap();
    let exported = export(cp).await;
    let again = c.apply(apply_req(exported.resources.clone())).await.unwrap().into_inner();
    assert!(again.changes.iter().all(|ch| ch.action == api::change::Action::Unchanged as i32));
    assert_eq!(again.revision, exported.revision);
    assert_eq!(export(cp).await.revision, exported.revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving() {
    let cp = TestControlPlane::embedded().await;
    let channel = tonic::transport::Endpoint::from_shared(cp.admin_url()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest { service: "portcullis.admin.v1.AdminService".into() })
        .await
        .unwrap();
    assert_eq!(resp.get_ref().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_config_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let revision = {
        let cp = TestControlPlane::embedded_in(dir.path()).await;
        let rev = base_config(&cp).await;
        cp.stop().await;
        rev
    };
    let cp = TestControlPlane::embedded_in(dir.path()).await;
    let exported = export(&cp).await;
    assert_eq!(exported.revision, revision);
    assert_eq!(exported.resources.len(), 2);
    // and it keeps counting up from there
    let next = cp.client().await.put(put_req(upstream("u2", "127.0.0.1:1"), 0)).await.unwrap().into_inner();
    assert!(next.revision > revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_etcd_converge() {
    let etcd = EtcdServer::start().await.expect("start etcd");
    let a = TestControlPlane::etcd(&etcd).await;
    let b = TestControlPlane::etcd(&etcd).await;
    let rev = base_config(&a).await;
    // b learns of a's write through its etcd watch
    let mut rx = b.state().subscribe();
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|r| *r >= rev)).await.unwrap().unwrap();
    let got = b.client().await.get(api::GetRequest { kind: api::Kind::Upstream as i32, name: "orders".into() }).await;
    assert!(got.is_ok(), "{got:?}");

    // concurrent writers on both replicas: every write lands once, references stay valid
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let wa = tokio::spawn(async move {
        for i in 0..20 {
            ca.put(put_req(exact_route(&format!("a{i}"), &format!("/a/{i}"), "orders", "health"), 0)).await.unwrap();
        }
    });
    let wb = tokio::spawn(async move {
        for i in 0..20 {
            cb.put(put_req(exact_route(&format!("b{i}"), &format!("/b/{i}"), "orders", "health"), 0)).await.unwrap();
        }
    });
    wa.await.unwrap();
    wb.await.unwrap();
    let (ea, eb) = (export(&a).await, export(&b).await);
    let target = ea.revision.max(eb.revision);
    for cp in [&a, &b] {
        let mut rx = cp.state().subscribe();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|r| *r >= target)).await.unwrap().unwrap();
    }
    let (ea, eb) = (export(&a).await, export(&b).await);
    assert_eq!(ea.resources.len(), 42);
    assert_eq!(ea.resources, eb.resources, "both replicas hold the same config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_rides_out_an_etcd_restart() {
    let mut etcd = EtcdServer::start().await.expect("start etcd");
    let cp = TestControlPlane::etcd(&etcd).await;
    base_config(&cp).await;
    etcd.stop().await.expect("stop etcd");
    // reads keep working from the index while etcd is away
    let got = cp.client().await.get(api::GetRequest { kind: api::Kind::Upstream as i32, name: "orders".into() }).await;
    assert!(got.is_ok());
    etcd.start_again().await.expect("restart etcd");
    // writes work again once etcd is back (the client reconnects)
    let mut c = cp.client().await;
    let mut last = None;
    for _ in 0..50 {
        match c.put(put_req(upstream("after-restart", "127.0.0.1:2"), 0)).await {
            Ok(r) => {
                last = Some(r.into_inner().revision);
                break;
            }
            Err(e) => {
                assert!(matches!(e.code(), Code::Unavailable | Code::Aborted), "{e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let rev = last.expect("a write succeeds after etcd restarts");
    assert_eq!(export(&cp).await.resources.len(), 3);
    assert!(cp.state().revision() >= rev);
}

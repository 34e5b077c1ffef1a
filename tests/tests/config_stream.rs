//! The config stream end to end: an in-process control plane (embedded store and a real etcd)
//! serving real gRPC streams to three in-process `ConfigClient`s, observed through their
//! snapshot handles and the admin API's `ListProxies`. Changes reach every proxy and are
//! acknowledged; wrong tokens are refused; a proxy cut off catches up; a version one proxy
//! cannot apply is NACKed while the others move on; a restarted proxy serves its
//! last-known-good file with the control plane gone; a control-plane restart is ridden out.
//!
//! Waiting is bounded polling (`eventually`), never a bare sleep.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use portcullis_data_plane::config_client::{ConfigClient, ConfigClientOptions};
use portcullis_data_plane::router::Lookup;
use portcullis_data_plane::snapshot::{Snapshot, SnapshotHandle, new_handle};
use portcullis_proto::admin::v1 as api;
use portcullis_proto::config::v1 as pb;
use portcullis_proto::discovery::v1 as ds;
use portcullis_tests::control_plane::TestControlPlane;
use portcullis_tests::etcd::EtcdServer;
use portcullis_tests::resources::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(5);

/// Runs one scenario against the embedded store and against etcd.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let cp = super::TestControlPlane::embedded().await;
                    super::$name(cp).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let etcd = super::EtcdServer::start().await.expect("start etcd");
                    let cp = super::TestControlPlane::etcd(&etcd).await;
                    super::$name(cp).await;
                }
            )*
        }
    };
}

on_both_stores!(
    changes_reach_every_proxy_and_are_acknowledged,
    a_proxy_cut_off_catches_up_when_it_reconnects,
    a_version_one_proxy_cannot_apply_is_nacked_and_the_others_move_on,
    proxies_ride_out_a_control_plane_restart,
);

// ---------------------------------------------------------------- support

/// Polls `probe` every few milliseconds until it yields a value; panics after [`WAIT`].
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let polled = async {
        loop {
            if let Some(v) = probe().await {
                return v;
            }
            tokio::time::sleep(POLL).await;
        }
    };
    tokio::time::timeout(WAIT, polled).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A `ConfigClient` running in-process, as a proxy would run it.
struct Proxy {
    id: String,
    handle: SnapshotHandle,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Proxy {
    fn options(id: &str, endpoint: String, token: &str, cache_dir: Option<PathBuf>) -> ConfigClientOptions {
        ConfigClientOptions {
            endpoints: vec![endpoint],
            proxy_id: id.into(),
            zone: "zone-a".into(),
            token: Some(token.into()),
            cache_dir,
        }
    }

    fn spawn(id: &str, client: ConfigClient, handle: SnapshotHandle) -> Proxy {
        let stop = CancellationToken::new();
        let task = tokio::spawn(client.run(stop.clone()));
        Proxy { id: id.into(), handle, stop, task }
    }

    /// A proxy connected straight to `cp`.
    fn start(cp: &TestControlPlane, id: &str) -> Proxy {
        let handle = new_handle();
        let client = ConfigClient::new(Self::options(id, cp.proxy_url(), cp.token(), None), handle.clone());
        Self::spawn(id, client, handle)
    }

    fn version(&self) -> Option<i64> {
        self.handle.load_full().map(|s| s.version)
    }

    /// Waits until the published snapshot is exactly `version`.
    async fn at(&self, version: i64) -> Arc<Snapshot> {
        eventually(&format!("{} to publish version {version} (has {:?})", self.id, self.version()), || async {
            self.handle.load_full().filter(|s| s.version == version)
        })
        .await
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("config client task");
    }
}

fn route_names(s: &Arc<Snapshot>) -> Vec<String> {
    let mut names: Vec<String> = s.routes.iter().map(|r| r.route.name.clone()).collect();
    names.sort();
    names
}

async fn apply(cp: &TestControlPlane, resources: Vec<pb::Resource>) -> i64 {
    let req = api::ApplyRequest { resources, ..Default::default() };
    cp.client().await.apply(req).await.expect("apply").into_inner().revision
}

async fn put(cp: &TestControlPlane, resource: pb::Resource) -> i64 {
    let req = api::PutRequest { resource: Some(resource), expected_revision: 0 };
    cp.client().await.put(req).await.expect("put").into_inner().revision
}

async fn delete_route(cp: &TestControlPlane, name: &str) -> i64 {
    let req = api::DeleteRequest { kind: api::Kind::Route as i32, name: name.into(), expected_revision: 0 };
    cp.client().await.delete(req).await.expect("delete").into_inner().revision
}

/// An upstream, a public policy and route `r1` at `/one`.
async fn base_config(cp: &TestControlPlane) -> i64 {
    apply(
        cp,
        vec![
            upstream("orders", "127.0.0.1:9000"),
            public_policy("open", "test traffic"),
            exact_route("r1", "/one", "orders", "open"),
        ],
    )
    .await
}

async fn list_proxies(cp: &TestControlPlane) -> api::ListProxiesResponse {
    cp.client().await.list_proxies(api::ListProxiesRequest {}).await.expect("list proxies").into_inner()
}

/// Waits until `ListProxies` satisfies `pred`; returns that answer.
async fn proxies_where(
    cp: &TestControlPlane,
    what: &str,
    pred: impl Fn(&api::ListProxiesResponse) -> bool,
) -> api::ListProxiesResponse {
    eventually(what, || async {
        let list = list_proxies(cp).await;
        pred(&list).then_some(list)
    })
    .await
}

fn status<'a>(list: &'a api::ListProxiesResponse, id: &str) -> &'a api::ProxyStatus {
    list.proxies.iter().find(|p| p.id == id).unwrap_or_else(|| panic!("{id} not listed: {list:?}"))
}

/// All of `ids` connected and acknowledged `version`, which is the current config version.
async fn all_current(cp: &TestControlPlane, ids: &[&str], version: i64) -> api::ListProxiesResponse {
    let list = proxies_where(cp, &format!("{ids:?} to acknowledge {version}"), |l| {
        ids.iter().all(|id| l.proxies.iter().any(|p| p.id == *id && p.connected && p.acked_version == version))
    })
    .await;
    assert_eq!(list.config_version, version);
    for id in ids {
        let p = status(&list, id);
        assert_eq!(p.lag, 0, "{p:?}");
        assert!(p.last_nack_error.is_empty(), "{p:?}");
    }
    list
}

/// A TCP relay in front of the control plane's proxy port that can cut every connection through
/// it (and refuse new ones) until restored: a network partition, in-process.
struct Partition {
    addr: SocketAddr,
    cut: Arc<watch::Sender<bool>>,
    task: JoinHandle<()>,
}

impl Partition {
    async fn start(target: &str) -> Partition {
        let target: SocketAddr = target.trim_start_matches("http://").parse().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(watch::channel(false).0);
        let task = tokio::spawn({
            let cut = Arc::clone(&cut);
            async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else { return };
                    let mut cut_rx = cut.subscribe();
                    if *cut_rx.borrow_and_update() {
                        continue; // dropped: the connection is refused
                    }
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(target).await else { return };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = cut_rx.wait_for(|c| *c) => {}
                        }
                    });
                }
            }
        });
        Partition { addr, cut, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn cut(&self) {
        self.cut.send_replace(true);
    }

    fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------- scenarios on both stores

async fn changes_reach_every_proxy_and_are_acknowledged(cp: TestControlPlane) {
    let v1 = base_config(&cp).await;
    let proxies = [Proxy::start(&cp, "proxy-a"), Proxy::start(&cp, "proxy-b"), Proxy::start(&cp, "proxy-c")];
    for p in &proxies {
        assert_eq!(route_names(&p.at(v1).await), ["r1"]);
    }
    let list = all_current(&cp, &["proxy-a", "proxy-b", "proxy-c"], v1).await;
    assert_eq!(list.proxies.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(), ["proxy-a", "proxy-b", "proxy-c"]);
    for p in &list.proxies {
        assert_eq!(p.zone, "zone-a");
        assert!(p.address.starts_with("127.0.0.1:"), "{p:?}");
        assert!(!p.build.is_empty());
        assert!(p.connected_since.is_some());
    }

    // a route added through the admin API reaches all three, which acknowledge it
    let v2 = put(&cp, exact_route("r2", "/two", "orders", "open")).await;
    assert!(v2 > v1);
    for p in &proxies {
        let snap = p.at(v2).await;
        assert_eq!(route_names(&snap), ["r1", "r2"]);
        assert!(matches!(snap.table.lookup("api.example.com", "GET", "/two"), Lookup::Found(_)));
    }
    all_current(&cp, &["proxy-a", "proxy-b", "proxy-c"], v2).await;

    // a deletion is gone everywhere
    let v3 = delete_route(&cp, "r2").await;
    for p in &proxies {
        let snap = p.at(v3).await;
        assert_eq!(route_names(&snap), ["r1"]);
        assert!(matches!(snap.table.lookup("api.example.com", "GET", "/two"), Lookup::NotFound));
    }
    all_current(&cp, &["proxy-a", "proxy-b", "proxy-c"], v3).await;

    // proxies that leave stay listed, disconnected
    for p in proxies {
        p.stop().await;
    }
    let list = proxies_where(&cp, "all three to be disconnected", |l| l.proxies.iter().all(|p| !p.connected)).await;
    assert_eq!(list.proxies.len(), 3);
    assert!(list.proxies.iter().all(|p| p.acked_version == v3));
    cp.stop().await;
}

async fn a_proxy_cut_off_catches_up_when_it_reconnects(cp: TestControlPlane) {
    let v1 = base_config(&cp).await;
    let partition = Partition::start(&cp.proxy_url()).await;
    let a = Proxy::start(&cp, "proxy-a");
    let b = Proxy::start(&cp, "proxy-b");
    let c = {
        let handle = new_handle();
        let options = Proxy::options("proxy-c", partition.url(), cp.token(), None);
        Proxy::spawn("proxy-c", ConfigClient::new(options, handle.clone()), handle)
    };
    for p in [&a, &b, &c] {
        p.at(v1).await;
    }
    all_current(&cp, &["proxy-a", "proxy-b", "proxy-c"], v1).await;

    partition.cut();
    proxies_where(&cp, "proxy-c to be seen disconnected", |l| !status(l, "proxy-c").connected).await;
    let v2 = put(&cp, exact_route("r2", "/two", "orders", "open")).await;
    let v3 = put(&cp, upstream("billing", "127.0.0.1:9001")).await;
    a.at(v3).await;
    b.at(v3).await;
    assert_eq!(c.version(), Some(v1), "cut off, proxy-c keeps serving what it has");
    let list = list_proxies(&cp).await;
    let pc = status(&list, "proxy-c");
    assert!(!pc.connected);
    assert_eq!((pc.acked_version, pc.lag), (v1, v3 - v1));
    assert!(v2 < v3);

    partition.heal();
    let snap = c.at(v3).await;
    assert_eq!(route_names(&snap), ["r1", "r2"]);
    assert!(snap.upstreams.contains_key("billing"));
    all_current(&cp, &["proxy-a", "proxy-b", "proxy-c"], v3).await;
    for p in [a, b, c] {
        p.stop().await;
    }
    cp.stop().await;
}

async fn a_version_one_proxy_cannot_apply_is_nacked_and_the_others_move_on(cp: TestControlPlane) {
    let v1 = base_config(&cp).await;
    let a = Proxy::start(&cp, "proxy-a");
    let b = Proxy::start(&cp, "proxy-b");
    // proxy-c cannot apply any version holding route "poison" (valid for the control plane)
    let c = {
        let handle = new_handle();
        let options = Proxy::options("proxy-c", cp.proxy_url(), cp.token(), None);
        let client = ConfigClient::new(options, handle.clone()).reject_config_for_test(|resources| {
            resources
                .keys()
                .any(|(_, name)| name == "poison")
                .then(|| "route poison is not supported by this proxy".to_owned())
        });
        Proxy::spawn("proxy-c", client, handle)
    };
    for p in [&a, &b, &c] {
        p.at(v1).await;
    }

    let v2 = put(&cp, exact_route("poison", "/poison", "orders", "open")).await;
    assert_eq!(route_names(&a.at(v2).await), ["poison", "r1"]);
    assert_eq!(route_names(&b.at(v2).await), ["poison", "r1"]);
    // A proxy's ACK follows its publish: wait for those too, not only for the NACK.
    let list = proxies_where(&cp, "proxy-c to NACK, the others to ACK", |l| {
        status(l, "proxy-c").last_nack_version == v2
            && ["proxy-a", "proxy-b"].iter().all(|id| status(l, id).acked_version == v2)
    })
    .await;
    let pc = status(&list, "proxy-c");
    assert!(pc.last_nack_error.contains("route poison is not supported"), "{pc:?}");
    assert!(pc.last_nack_error.contains(&v2.to_string()), "names the version: {pc:?}");
    assert_eq!((pc.acked_version, pc.lag, pc.connected), (v1, v2 - v1, true));
    for id in ["proxy-a", "proxy-b"] {
        let p = status(&list, id);
        assert_eq!((p.acked_version, p.lag, p.last_nack_error.as_str()), (v2, 0, ""), "others unaffected");
    }
    assert_eq!(route_names(&c.handle.load_full().unwrap()), ["r1"], "proxy-c keeps serving the previous version");
    assert_eq!(c.version(), Some(v1));

    // a later change that removes the problem is applied; the NACK is then history
    let v3 = delete_route(&cp, "poison").await;
    for p in [&a, &b, &c] {
        assert_eq!(route_names(&p.at(v3).await), ["r1"]);
    }
    all_current(&cp, &["proxy-a", "proxy-b", "proxy-c"], v3).await;
    for p in [a, b, c] {
        p.stop().await;
    }
    cp.stop().await;
}

async fn proxies_ride_out_a_control_plane_restart(cp: TestControlPlane) {
    let v1 = base_config(&cp).await;
    let proxies = [Proxy::start(&cp, "proxy-a"), Proxy::start(&cp, "proxy-b"), Proxy::start(&cp, "proxy-c")];
    for p in &proxies {
        p.at(v1).await;
    }
    all_current(&cp, &["proxy-a", "proxy-b", "proxy-c"], v1).await;

    let cp = cp.restart().await;
    // the new process knows nobody until they reconnect
    let list = all_current(&cp, &["proxy-a", "proxy-b", "proxy-c"], v1).await;
    assert_eq!(list.proxies.len(), 3);
    for p in &proxies {
        assert_eq!(p.version(), Some(v1), "served throughout");
    }
    let v2 = put(&cp, exact_route("r2", "/two", "orders", "open")).await;
    for p in &proxies {
        assert_eq!(route_names(&p.at(v2).await), ["r1", "r2"]);
    }
    all_current(&cp, &["proxy-a", "proxy-b", "proxy-c"], v2).await;
    for p in proxies {
        p.stop().await;
    }
    cp.stop().await;
}

// ---------------------------------------------------------------- embedded only

/// A raw stream with `token` (or none); returns the status the control plane answered with.
async fn raw_stream(url: String, token: Option<&str>, first: ds::config_request::Msg) -> Result<(), tonic::Status> {
    let mut client = ds::discovery_service_client::DiscoveryServiceClient::connect(url).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(ds::ConfigRequest { msg: Some(first) }).await.unwrap();
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(t) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let mut inbound = client.stream_config(request).await?.into_inner();
    // accepted: the first response comes without being asked for
    let first = inbound.message().await?.expect("a first response");
    assert!(first.version >= 0);
    drop(tx);
    Ok(())
}

fn hello(id: &str) -> ds::config_request::Msg {
    ds::config_request::Msg::Hello(ds::ProxyHello { id: id.into(), zone: "z".into(), build: "raw".into(), version: 0 })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_without_the_token_are_refused_and_never_registered() {
    let cp = TestControlPlane::embedded().await;
    let v1 = base_config(&cp).await;

    let wrong = raw_stream(cp.proxy_url(), Some("not-the-token"), hello("intruder")).await.unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    let missing = raw_stream(cp.proxy_url(), None, hello("intruder")).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated, "{missing:?}");
    let not_hello = raw_stream(cp.proxy_url(), Some(cp.token()), ds::config_request::Msg::Ack(ds::Ack { version: 1 }))
        .await
        .unwrap_err();
    assert_eq!(not_hello.code(), Code::InvalidArgument, "{not_hello:?}");
    raw_stream(cp.proxy_url(), Some(cp.token()), hello("raw-ok")).await.expect("the right token is accepted");

    // a ConfigClient with a wrong token keeps being refused while a good one converges
    let bad_handle = new_handle();
    let bad_options = Proxy::options("proxy-bad", cp.proxy_url(), "wrong", None);
    let bad = Proxy::spawn("proxy-bad", ConfigClient::new(bad_options, bad_handle.clone()), bad_handle);
    let good = Proxy::start(&cp, "proxy-good");
    good.at(v1).await;
    let list = all_current(&cp, &["proxy-good"], v1).await;
    let ids: Vec<&str> = list.proxies.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["proxy-good", "raw-ok"], "refused proxies are never registered");
    assert!(bad.version().is_none(), "a refused proxy gets no configuration");

    // a control plane without a token accepts nobody
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let registry = Arc::new(portcullis_control_plane::discovery::ProxyRegistry::new());
    let stop = CancellationToken::new();
    let server = tokio::spawn(portcullis_control_plane::discovery::serve(
        Arc::clone(cp.state()),
        Arc::clone(&registry),
        None,
        None,
        listener,
        stop.clone(),
    ));
    let refused = raw_stream(url.clone(), Some(cp.token()), hello("anyone")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(registry.list().is_empty());
    stop.cancel();
    server.await.unwrap().unwrap();

    bad.stop().await;
    good.stop().await;
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_proxy_serves_its_last_known_good_config_without_the_control_plane() {
    let cp = TestControlPlane::embedded().await;
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().join("proxy-a");
    base_config(&cp).await;
    let v2 = put(&cp, exact_route("r2", "/two", "orders", "open")).await;

    let handle = new_handle();
    let options = Proxy::options("proxy-a", cp.proxy_url(), cp.token(), Some(cache_dir.clone()));
    let mut client = ConfigClient::new(options, handle.clone());
    assert_eq!(client.load_last_known_good(), None, "nothing saved yet");
    let proxy = Proxy::spawn("proxy-a", client, handle);
    proxy.at(v2).await;
    all_current(&cp, &["proxy-a"], v2).await;
    proxy.stop().await;
    let unreachable = cp.proxy_url();
    cp.stop().await;

    // a new proxy process: same cache dir, control plane gone
    let handle = new_handle();
    let options = Proxy::options("proxy-a", unreachable, "token", Some(cache_dir));
    let mut client = ConfigClient::new(options, handle.clone());
    assert_eq!(client.load_last_known_good(), Some(v2));
    let snap = handle.load_full().expect("published before run");
    assert_eq!(snap.version, v2);
    assert_eq!(route_names(&snap), ["r1", "r2"]);
    assert!(matches!(snap.table.lookup("api.example.com", "GET", "/two"), Lookup::Found(_)));
    // running against the unreachable control plane (refused connections, backoff) and
    // shutting down leaves what is served alone
    let proxy = Proxy::spawn("proxy-a", client, handle);
    let handle = proxy.handle.clone();
    proxy.stop().await;
    assert_eq!(handle.load_full().map(|s| s.version), Some(v2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_restarted_with_its_cache_catches_up_from_the_version_it_holds() {
    let cp = TestControlPlane::embedded().await;
    let cache = tempfile::tempdir().unwrap();
    let v1 = base_config(&cp).await;
    let options = Proxy::options("proxy-a", cp.proxy_url(), cp.token(), Some(cache.path().to_owned()));
    let handle = new_handle();
    let proxy = Proxy::spawn("proxy-a", ConfigClient::new(options.clone(), handle.clone()), handle);
    proxy.at(v1).await;
    proxy.stop().await;

    let v2 = put(&cp, exact_route("r2", "/two", "orders", "open")).await;
    let handle = new_handle();
    let mut client = ConfigClient::new(options, handle.clone());
    assert_eq!(client.load_last_known_good(), Some(v1));
    let proxy = Proxy::spawn("proxy-a", client, handle);
    assert_eq!(route_names(&proxy.at(v2).await), ["r1", "r2"]);
    all_current(&cp, &["proxy-a"], v2).await;
    proxy.stop().await;
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_response_in_flight_deltas_from_the_acked_version_and_no_resend_after_a_nack() {
    use ds::config_request::Msg;
    let cp = TestControlPlane::embedded().await;
    let v1 = base_config(&cp).await;
    let v2 = put(&cp, exact_route("r2", "/two", "orders", "open")).await;

    let mut client = ds::discovery_service_client::DiscoveryServiceClient::connect(cp.proxy_url()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let hello = ds::ProxyHello { id: "raw".into(), zone: "z".into(), build: "raw".into(), version: v1 };
    tx.send(ds::ConfigRequest { msg: Some(Msg::Hello(hello)) }).await.unwrap();
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert("authorization", format!("Bearer {}", cp.token()).parse().unwrap());
    let mut inbound = client.stream_config(request).await.unwrap().into_inner();
    let names = |r: &ds::ConfigResponse| -> Vec<String> {
        r.upserts.iter().map(|u| portcullis_shared::Kind::of(u).unwrap().1.to_owned()).collect()
    };
    let quiet = Duration::from_millis(300);

    // the proxy holds v1: it gets the delta v1 -> v2, not everything
    let first = inbound.message().await.unwrap().unwrap();
    assert_eq!((first.full, first.base_version, first.version), (false, v1, v2));
    assert_eq!(names(&first), ["r2"]);

    // nothing more while that one is unacknowledged, even though the index moves
    let v3 = put(&cp, exact_route("r3", "/three", "orders", "open")).await;
    assert!(tokio::time::timeout(quiet, inbound.message()).await.is_err(), "a second response before the ack");
    tx.send(ds::ConfigRequest { msg: Some(Msg::Ack(ds::Ack { version: v2 })) }).await.unwrap();
    let second = inbound.message().await.unwrap().unwrap();
    assert_eq!((second.full, second.base_version, second.version), (false, v2, v3));
    assert_eq!(names(&second), ["r3"]);

    // a NACK is recorded and the version is not sent again
    tx.send(ds::ConfigRequest { msg: Some(Msg::Nack(ds::Nack { version: v3, error: "no r3 here".into() })) })
        .await
        .unwrap();
    let list = proxies_where(&cp, "the NACK to be recorded", |l| status(l, "raw").last_nack_version == v3).await;
    let raw = status(&list, "raw");
    assert_eq!((raw.acked_version, raw.last_nack_error.as_str(), raw.lag), (v2, "no r3 here", v3 - v2));
    assert!(tokio::time::timeout(quiet, inbound.message()).await.is_err(), "a NACKed version was resent");

    // the next change comes as a delta from the last ACKed version, carrying both
    let v4 = delete_route(&cp, "r2").await;
    let third = inbound.message().await.unwrap().unwrap();
    assert_eq!((third.full, third.base_version, third.version), (false, v2, v4));
    assert_eq!(names(&third), ["r3"]);
    assert_eq!(third.removals, [ds::Removal { kind: "route".into(), name: "r2".into() }]);

    // a version that was never sent cannot be acknowledged: the stream is closed
    tx.send(ds::ConfigRequest { msg: Some(Msg::Ack(ds::Ack { version: v4 + 100 })) }).await.unwrap();
    let err = inbound.message().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    proxies_where(&cp, "the raw proxy to be disconnected", |l| !status(l, "raw").connected).await;
    cp.stop().await;
}

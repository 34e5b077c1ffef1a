//! Config propagation, measured end to end through real gRPC: an in-process control plane on the
//! embedded store holding 10,000 routes, 8 in-process `ConfigClient`s connected and current;
//! - 200 single-route `Put`s, each timed from the admin API's OK to the moment the last of the
//!   8 snapshot handles publishes that version (target: p99 <= 50 ms);
//! - a new `ConfigClient` receiving and applying the whole configuration, timed from the start
//!   of its `run` (connect + hello) to its handle publishing it (target: <= 500 ms).
//!
//! Both are run with the proxies persisting last-known-good files (what a proxy does), without,
//! and with a single proxy (what one proxy on its own machine sees). First, the cost of one
//! version on one thread (compile, last-known-good write), which bounds the rest: 8 proxies
//! sharing 2 cores compile 8 times per change. Handles are polled every millisecond, so figures
//! carry up to ~1 ms of polling error.
//!
//! Run: `cargo bench -p portcullis-tests --bench propagation`. Prints numbers; asserts nothing
//! about speed.

use std::time::{Duration, Instant};

use portcullis_data_plane::config_client::{ConfigClient, ConfigClientOptions};
use portcullis_data_plane::lkg;
use portcullis_data_plane::snapshot::{self, SnapshotHandle, new_handle};
use portcullis_proto::admin::v1 as api;
use portcullis_tests::control_plane::TestControlPlane;
use portcullis_tests::resources::{exact_route, many_routes};
use tokio_util::sync::CancellationToken;

const ROUTES: usize = 10_000;
const PROXIES: usize = 8;
const PUTS: usize = 200;
const NEW_PROXY_RUNS: usize = 5;
const POLL: Duration = Duration::from_millis(1);
const WAIT: Duration = Duration::from_secs(30);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Waits until every handle publishes at least `version`; returns when the first and when the
/// last one did, measured from `start`.
async fn all_at(handles: &[SnapshotHandle], version: i64, start: Instant) -> (Duration, Duration) {
    let polled = async {
        let mut first = None;
        loop {
            let done = handles.iter().filter(|h| h.load().as_ref().is_some_and(|s| s.version >= version)).count();
            if done > 0 && first.is_none() {
                first = Some(start.elapsed());
            }
            if done == handles.len() {
                let last = start.elapsed();
                return (first.unwrap_or(last), last);
            }
            tokio::time::sleep(POLL).await;
        }
    };
    tokio::time::timeout(WAIT, polled).await.expect("proxies to converge")
}

fn options(cp: &TestControlPlane, id: String, cache: Option<&tempfile::TempDir>) -> ConfigClientOptions {
    ConfigClientOptions {
        endpoints: vec![cp.proxy_url()],
        cache_dir: cache.map(|c| c.path().join(&id)),
        proxy_id: id,
        zone: "bench".into(),
        token: Some(cp.token().into()),
    }
}

async fn run(proxies: usize, persist: bool) {
    let cp = TestControlPlane::embedded().await;
    let cache = persist.then(|| tempfile::tempdir().expect("cache dir"));
    let mut admin = cp.client().await;
    let applied = admin
        .apply(api::ApplyRequest { resources: many_routes(ROUTES), ..Default::default() })
        .await
        .expect("apply")
        .into_inner()
        .revision;

    let stop = CancellationToken::new();
    let mut handles = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..proxies {
        let handle = new_handle();
        let client = ConfigClient::new(options(&cp, format!("proxy-{i}"), cache.as_ref()), handle.clone());
        tasks.push(tokio::spawn(client.run(stop.clone())));
        handles.push(handle);
    }
    all_at(&handles, applied, Instant::now()).await;
    let mut deliveries = raw_stream(&cp, applied).await;

    let mut last = Vec::with_capacity(PUTS);
    let mut first = Vec::with_capacity(PUTS);
    let mut delivered = Vec::with_capacity(PUTS);
    for i in 0..PUTS {
        let route = exact_route(&format!("put-{i}"), &format!("/p/{i}"), "bench-upstream", "bench-public");
        let revision = admin
            .put(api::PutRequest { resource: Some(route), expected_revision: 0 })
            .await
            .expect("put")
            .into_inner()
            .revision;
        let ok = Instant::now();
        let (f, l) = all_at(&handles, revision, ok).await;
        first.push(f);
        last.push(l);
        loop {
            let (version, at) = deliveries.recv().await.expect("raw stream open");
            if version >= revision {
                delivered.push(at.saturating_duration_since(ok));
                break;
            }
        }
    }
    last.sort();
    first.sort();
    delivered.sort();

    let mut full = Vec::with_capacity(NEW_PROXY_RUNS);
    let current = cp.state().revision();
    for i in 0..NEW_PROXY_RUNS {
        let handle = new_handle();
        let new_stop = CancellationToken::new();
        let client = ConfigClient::new(options(&cp, format!("new-{i}"), cache.as_ref()), handle.clone());
        let t = Instant::now();
        let task = tokio::spawn(client.run(new_stop.clone()));
        full.push(all_at(std::slice::from_ref(&handle), current, t).await.1);
        new_stop.cancel();
        task.await.expect("client task");
    }
    full.sort();

    println!(
        "{:<22} | control plane only: put OK -> delta received by a bare stream that ACKs at once: p50 {:>6.2} ms  p99 {:>6.2} ms",
        "",
        ms(percentile(&delivered, 0.50)),
        ms(percentile(&delivered, 0.99)),
    );
    let label = format!(
        "{proxies} prox{}, {}",
        if proxies == 1 { "y" } else { "ies" },
        if persist { "persisting" } else { "no lkg" }
    );
    println!(
        "{label:<22} | {PUTS} puts, OK -> last proxy published: p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>6.2} ms  (first proxy p50 {:>6.2} ms) | new proxy, whole config: median {:>6.1} ms  max {:>6.1} ms",
        ms(percentile(&last, 0.50)),
        ms(percentile(&last, 0.99)),
        ms(last[last.len() - 1]),
        ms(percentile(&first, 0.50)),
        ms(percentile(&full, 0.50)),
        ms(full[full.len() - 1]),
    );

    stop.cancel();
    for t in tasks {
        t.await.expect("client task");
    }
    cp.stop().await;
}

/// A bare config stream that holds `version` and ACKs every response on receipt, reporting
/// (version, when received): what the control plane and the transport cost without a proxy's
/// compile.
async fn raw_stream(cp: &TestControlPlane, version: i64) -> tokio::sync::mpsc::UnboundedReceiver<(i64, Instant)> {
    use portcullis_proto::discovery::v1 as ds;
    let mut client = ds::discovery_service_client::DiscoveryServiceClient::connect(cp.proxy_url())
        .await
        .expect("connect")
        .max_decoding_message_size(64 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let hello = ds::ProxyHello { id: "bare".into(), zone: "bench".into(), build: "bench".into(), version };
    tx.send(ds::ConfigRequest { msg: Some(ds::config_request::Msg::Hello(hello)) }).await.expect("hello");
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert("authorization", format!("Bearer {}", cp.token()).parse().expect("header"));
    let mut inbound = client.stream_config(request).await.expect("stream").into_inner();
    let (report, reports) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(response)) = inbound.message().await {
            let _ = report.send((response.version, Instant::now()));
            let ack = ds::config_request::Msg::Ack(ds::Ack { version: response.version });
            if tx.send(ds::ConfigRequest { msg: Some(ack) }).await.is_err() {
                return;
            }
        }
    });
    reports
}

/// Where a proxy's time goes per version: one compilation and one last-known-good write of the
/// whole configuration, on one thread.
fn breakdown() {
    let map = lkg::resource_map(many_routes(ROUTES)).expect("resource map");
    let runs = 10;
    let t = Instant::now();
    for _ in 0..runs {
        std::hint::black_box(snapshot::compile(1, &map).expect("compiles"));
    }
    let compile = t.elapsed() / runs;
    let t = Instant::now();
    for _ in 0..runs {
        for r in map.values() {
            let _ = std::hint::black_box(portcullis_shared::model::Resource::try_from(r));
        }
    }
    let convert = t.elapsed() / runs;
    let t = Instant::now();
    for _ in 0..runs {
        std::hint::black_box(lkg::encode(1, &map));
    }
    let encode = t.elapsed() / runs;
    let dir = tempfile::tempdir().expect("temp dir");
    let t = Instant::now();
    for _ in 0..runs {
        lkg::save(dir.path(), 1, &map).expect("save");
    }
    let save = t.elapsed() / runs;
    println!(
        "one version of {ROUTES} routes, one thread: compile {:>6.2} ms (converting resources {:>6.2} ms) | last-known-good save {:>6.2} ms (encoding {:>5.2} ms, {} KiB)",
        ms(compile),
        ms(convert),
        ms(save),
        ms(encode),
        lkg::encode(1, &map).len() / 1024
    );

    // What a proxy does per one-route change instead: compile from the previous snapshot and
    // append one record to the last-known-good log.
    let mut previous = snapshot::compile(1, &map).expect("compiles");
    let mut files = lkg::LastKnownGood::new(dir.path().join("log"));
    files.save_full(1, &map).expect("save");
    let mut map = map;
    let changes: u32 = 200;
    let (mut compile_one, mut append) = (Duration::ZERO, Duration::ZERO);
    for (i, version) in (0..changes).zip(2_i64..) {
        let key = (portcullis_shared::Kind::Route, format!("put-{i}"));
        map.insert(key.clone(), exact_route(&key.1, &format!("/p/{i}"), "bench-upstream", "bench-public"));
        let t = Instant::now();
        let next =
            snapshot::compile_changes(version, &map, Some(&previous), std::slice::from_ref(&key)).expect("compiles");
        compile_one += t.elapsed();
        let t = Instant::now();
        files.save_delta(version - 1, version, &map, &[key]).expect("append");
        append += t.elapsed();
        previous = next;
    }
    println!(
        "one route change on {ROUTES} routes, one thread: compile from the previous snapshot {:>6.3} ms | last-known-good log append {:>6.3} ms",
        ms(compile_one / changes),
        ms(append / changes),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    breakdown();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        run(PROXIES, true).await;
        run(PROXIES, false).await;
        run(1, true).await;
    });
}

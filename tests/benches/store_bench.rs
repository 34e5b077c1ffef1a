//! Admin write throughput, measured through the real gRPC admin API of an in-process control
//! plane, on a real etcd and on the embedded store:
//! - one `Apply` of 10,000 routes (target on etcd: <= 2 s);
//! - 1,000 single-route `Put`s against a config that already holds those 10,000 routes
//!   (target on etcd: p99 <= 20 ms).
//!
//! Run: `cargo bench -p portcullis-tests --bench store_bench` (needs /usr/bin/etcd).
//! Prints numbers; asserts nothing about speed.

use std::time::{Duration, Instant};

use portcullis_proto::admin::v1 as api;
use portcullis_tests::control_plane::TestControlPlane;
use portcullis_tests::etcd::EtcdServer;
use portcullis_tests::resources::{exact_route, many_routes};

const ROUTES: usize = 10_000;
const PUTS: usize = 1_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn run(label: &str, cp: &TestControlPlane) {
    let mut c = cp.client().await;
    let resources = many_routes(ROUTES);
    let t = Instant::now();
    let resp = c.apply(api::ApplyRequest { resources, ..Default::default() }).await.expect("apply");
    let apply = t.elapsed();
    assert_eq!(resp.get_ref().changes.len(), ROUTES + 2);

    let mut lat = Vec::with_capacity(PUTS);
    let t_all = Instant::now();
    for i in 0..PUTS {
        let route = exact_route(&format!("put-{i}"), &format!("/p/{i}"), "bench-upstream", "bench-public");
        let t = Instant::now();
        c.put(api::PutRequest { resource: Some(route), expected_revision: 0 }).await.expect("put");
        lat.push(t.elapsed());
    }
    let total = t_all.elapsed();
    lat.sort();
    println!(
        "{label:<9} apply {ROUTES} routes: {:>8.1} ms | {PUTS} puts: p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>6.2} ms  ({:.0} puts/s)",
        apply.as_secs_f64() * 1e3,
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat[lat.len() - 1].as_secs_f64() * 1e3,
        PUTS as f64 / total.as_secs_f64(),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let etcd = EtcdServer::start().await.expect("start etcd");
        let cp = TestControlPlane::etcd(&etcd).await;
        run("etcd", &cp).await;
        cp.stop().await;
        let cp = TestControlPlane::embedded().await;
        run("embedded", &cp).await;
        cp.stop().await;
    });
}

//! The proxy's resident memory, idle and with a big configuration: the release control plane
//! (embedded store) and one release proxy (one worker thread) in a [`Sandbox`]; `VmRSS` and
//! `VmHWM` (the peak) of the proxy process from `/proc/PID/status`, once ready with a one-route
//! configuration and again once it has acknowledged 10,000 routes. The target is at most
//! 64 MiB with 10k routes. It prints figures; it is not a test.
//!
//! Run: `cargo build --release --bins && cargo bench -p portcullis-tests --bench proxy_memory`

use std::time::Instant;

use portcullis_tests::resources::{exact_route, many_routes, public_policy, upstream};
use portcullis_tests::sandbox::{Sandbox, SandboxOptions, SandboxStore};

const ROUTES: usize = 10_000;
const TARGET_KIB: u64 = 64 * 1024;

/// `(VmRSS, VmHWM)` of `pid`, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

async fn run() {
    let options = SandboxOptions { proxies: 1, worker_threads: 1, store: SandboxStore::Embedded, ..Default::default() };
    let sb = Sandbox::with(options).await;
    let pid = sb.proxy_pid(0).expect("the proxy runs");

    let one = vec![
        upstream("one-upstream", &sb.upstream().endpoint()),
        public_policy("one-public", "memory benchmark"),
        exact_route("one", "/one", "one-upstream", "one-public"),
    ];
    let v1 = sb.apply(one).await;
    sb.wait_all_acked(v1).await;
    let (idle_rss, idle_hwm) = memory_kib(pid);

    let started = Instant::now();
    let v2 = sb.apply(many_routes(ROUTES)).await;
    sb.wait_all_acked(v2).await;
    let propagated = started.elapsed();
    let (acked_rss, _) = memory_kib(pid);
    // What the proxy keeps, once the allocator has had a moment to return the compile's peak.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (rss, hwm) = memory_kib(pid);
    let config = sb.proxy_config(0).await.expect("the proxy's /config");
    assert_eq!(config["routes"].as_u64(), Some(ROUTES as u64 + 1), "{config}");

    println!("proxy_memory: portcullis-proxy (release, --worker-threads 1), from /proc/{pid}/status");
    let rows = [
        (format!("idle, 1 route (v{v1})"), idle_rss, idle_hwm),
        (format!("{ROUTES} routes (v{v2}, apply→ack {:.2} s)", propagated.as_secs_f64()), acked_rss, hwm),
        (format!("{ROUTES} routes, 2 s later"), rss, hwm),
    ];
    for (label, rss, hwm) in rows {
        println!("  {label:<36} VmRSS {:>10}   VmHWM {:>10}", mib(rss), mib(hwm));
    }
    println!(
        "  target ≤ {} with {ROUTES} routes: {}",
        mib(TARGET_KIB),
        if rss <= TARGET_KIB { "met" } else { "MISSED" }
    );
}

fn main() {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    runtime.block_on(run());
}

//! Benchmarks of the request path's first two steps: `RouteTable::lookup` at 1k, 10k and 100k
//! routes (a realistic mix of exact, template and prefix routes over a few hosts, looked up with
//! requests cycling through thousands of different routes, so caches stay cold as in a real
//! proxy), and `path::normalize` on typical and adversarial paths; plus what a one-route config
//! change costs the table (`update`: clone, insert, remove).
//!
//! It prints figures; it asserts nothing (that is what the tests are for). Target: at most 1 µs
//! per lookup at 100k routes, and flat as the table grows.
//!
//! Wall-clock figures on a shared machine move with its neighbours' load; for a figure that
//! does not, `ROUTE_MATCH_COUNT="N K"` runs K lookups on the N-route table without criterion,
//! to be counted under valgrind (instructions, cache misses), K against 0:
//! `scripts/cachegrind-route-match.sh` does that and prints the figures per lookup.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group};
use portcullis_data_plane::router::{Lookup, RouteTable};
use portcullis_shared::model::{PathMatch, PathRewrite, Route, Segment};
use portcullis_shared::path::normalize;

/// The proxy's allocator (see `main.rs`): where the table's nodes land, and so how many cache
/// lines a lookup touches, depends on it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Requests per table: far more distinct routes than a CPU cache line set can keep warm.
const REQUESTS: usize = 16_384;

const EXACT_HOSTS: [&str; 6] =
    ["api.example.com", "auth.example.com", "billing.example.com", "shop.example.net", "admin.internal", "10.0.0.7"];
const WILDCARDS: [&str; 2] = ["tenants.example.com", "example.org"];

/// A small deterministic generator (xorshift64*): the same routes and requests on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn route(i: usize, rng: &mut Rng) -> Route {
    // Roughly what a gateway in front of many services carries: most routes on any host, a
    // quarter pinned to a few API hosts, some on tenant wildcards.
    let hosts = match rng.below(20) {
        0..=11 => vec![],
        12..=16 => vec![EXACT_HOSTS[rng.below(EXACT_HOSTS.len())].to_string()],
        _ => vec![format!("*.{}", WILDCARDS[rng.below(WILDCARDS.len())])],
    };
    let methods: Vec<String> = match rng.below(4) {
        0 => vec![],
        1 => vec!["GET".into(), "POST".into()],
        _ => vec!["GET".into()],
    };
    let service = i / 16;
    let version = 1 + rng.below(3);
    let lit = |s: &str| Segment::Literal(s.to_string());
    let param = |s: &str| Segment::Param(s.to_string());
    let path = match rng.below(20) {
        0..=7 => PathMatch::Exact(format!("/api/v{version}/svc{service}/resource{i}")),
        8..=11 => {
            let segments = vec![
                lit("api"),
                lit(&format!("v{version}")),
                lit(&format!("svc{service}")),
                lit(&format!("items{i}")),
                param("id"),
            ];
            template(segments)
        }
        12..=14 => {
            let segments = vec![
                lit(&format!("svc{service}")),
                lit("users"),
                param("user"),
                lit(&format!("orders{i}")),
                param("order"),
                lit("lines"),
            ];
            template(segments)
        }
        15..=16 => template(vec![lit(&format!("t{service}")), param("tenant"), lit(&format!("doc{i}")), param("doc")]),
        _ => PathMatch::Prefix(format!("/static/svc{service}/bundle{i}")),
    };
    Route {
        name: format!("route-{i}"),
        hosts,
        methods,
        path,
        upstream: format!("svc{service}"),
        policy: "default".into(),
        rewrite_path: PathRewrite::None,
        set_headers: Default::default(),
        remove_headers: vec![],
        max_body_bytes: None,
        timeout: None,
    }
}

fn template(segments: Vec<Segment>) -> PathMatch {
    let raw = segments
        .iter()
        .map(|s| match s {
            Segment::Literal(l) => format!("/{l}"),
            Segment::Param(p) => format!("/{{{p}}}"),
        })
        .collect();
    PathMatch::Template { raw, segments }
}

/// A request that route `r` matches (its host, a method it allows, a concrete path).
fn request_for(r: &Route, rng: &mut Rng) -> (String, &'static str, String) {
    let host = match r.hosts.first() {
        Some(h) => h.replace('*', &format!("t{}", rng.below(1000))),
        None => EXACT_HOSTS[rng.below(EXACT_HOSTS.len())].to_uppercase(),
    };
    let method = if r.methods.is_empty() { "DELETE" } else { "GET" };
    let path = match &r.path {
        PathMatch::Exact(p) => p.clone(),
        PathMatch::Prefix(p) => format!("{p}/js/app.{}.js", rng.below(100_000)),
        PathMatch::Template { segments, .. } => segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => format!("/{l}"),
                Segment::Param(_) => format!("/{}", rng.next() % 10_000_000),
            })
            .collect(),
    };
    (host, method, path)
}

/// The requests a table of `routes` is looked up with: nine in ten aim at a random route, one
/// in ten misses (404).
fn requests(routes: &[Route], rng: &mut Rng) -> Vec<(String, &'static str, String)> {
    let n = routes.len();
    (0..REQUESTS)
        .map(|i| {
            if i % 10 == 9 {
                ("api.example.com".into(), "GET", format!("/api/v1/svc{}/missing{i}", rng.below(n / 16 + 1)))
            } else {
                request_for(&routes[rng.below(n)], rng)
            }
        })
        .collect()
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn bench_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup");
    for n in [1_000, 10_000, 100_000] {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ n as u64);
        let routes: Vec<Route> = (0..n).map(|i| route(i, &mut rng)).collect();
        let before = rss_kib();
        let start = Instant::now();
        let table = RouteTable::build(&routes);
        let built = start.elapsed();
        let grown = before.zip(rss_kib()).map(|(b, a)| a.saturating_sub(b) * 1024 / n as u64);
        let requests = requests(&routes, &mut rng);
        let found = requests.iter().filter(|(h, m, p)| matches!(table.lookup(h, m, p), Lookup::Found(_))).count();
        println!(
            "lookup/{n}: build {built:?}, ~{} B/route resident, {found}/{REQUESTS} requests found",
            grown.map_or("?".into(), |g| g.to_string()),
        );
        let mut i = 0;
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let (host, method, path) = &requests[i % REQUESTS];
                i += 1;
                black_box(table.lookup(black_box(host), black_box(method), black_box(path)));
            })
        });
    }
    group.finish();
}

/// What a one-route config change costs the table: a clone of the current version, one route
/// added and one taken out (the new version shares everything else with the old one).
fn bench_update(c: &mut Criterion) {
    let mut group = c.benchmark_group("update");
    for n in [10_000, 100_000] {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ n as u64);
        let routes: Vec<Route> = (0..n).map(|i| route(i, &mut rng)).collect();
        let table = RouteTable::build(&routes);
        let extra: Vec<Route> = (n..n + 64).map(|i| route(i, &mut rng)).collect();
        let mut i = 0;
        group.bench_function(BenchmarkId::new("clone_insert_remove", n), |b| {
            b.iter(|| {
                let mut next = table.clone();
                next.insert(n, &extra[i % extra.len()]);
                let at = (i * 7919) % n;
                next.remove(at, &routes[at]);
                i += 1;
                black_box(next)
            })
        });
    }
    group.finish();
}

fn bench_normalize(c: &mut Criterion) {
    let mut group = c.benchmark_group("normalize");
    let long_normal = format!("/{}", "segment/".repeat(1000));
    let dots = format!("/{}", "a/%2e%2e/".repeat(900));
    let escapes = format!("/{}", "%41%c3%a9".repeat(900));
    let slashes = "/".repeat(8000);
    let late_reject = format!("/{}%2f", "a".repeat(8000));
    let cases: [(&str, &str); 9] = [
        ("typical", "/api/v1/users/12345/orders"),
        ("typical_escaped", "/api/v1/search/caf%C3%A9/r%C3%A9sum%C3%A9"),
        ("rewrite", "/api//v1/./users/%7ealice/../bob/"),
        ("attack_encoded_dots", "/api/%2e%2e/%2E%2e/admin"),
        ("long_normal_8k", &long_normal),
        ("adversarial_dots_8k", &dots),
        ("adversarial_escapes_8k", &escapes),
        ("adversarial_slashes_8k", &slashes),
        ("reject_at_end_8k", &late_reject),
    ];
    for (name, path) in cases {
        group.bench_function(name, |b| b.iter(|| black_box(normalize(black_box(path)).is_ok())));
    }
    group.finish();
}

fn config() -> Criterion {
    // Short by default: the benchmark machine has two cores, shared.
    Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3)).sample_size(50)
}

criterion_group! { name = benches; config = config(); targets = bench_lookup, bench_update, bench_normalize }
/// `ROUTE_MATCH_COUNT="N K"`: build the N-route table, do K of the bench's lookups and exit,
/// without criterion. For counting instructions and cache misses under valgrind (a figure the
/// shared machine's load does not move): run it with K and with 0 and subtract.
fn count(spec: &str) {
    let mut words = spec.split_whitespace().map(|w| w.parse::<usize>().unwrap_or(0));
    let (n, k) = (words.next().unwrap_or(0).max(1), words.next().unwrap_or(0));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ n as u64);
    let routes: Vec<Route> = (0..n).map(|i| route(i, &mut rng)).collect();
    let table = RouteTable::build(&routes);
    let requests = requests(&routes, &mut rng);
    let found = (0..k)
        .filter(|i| {
            let (host, method, path) = &requests[i % REQUESTS];
            matches!(table.lookup(black_box(host), method, path), Lookup::Found(_))
        })
        .count();
    println!("{n} routes, {k} lookups: {found} found");
}

fn main() {
    if let Ok(spec) = std::env::var("ROUTE_MATCH_COUNT") {
        count(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}

//! The proxy's metrics: a tiny registry of atomics, passed down (no global statics), rendered
//! in the Prometheus text format by the admin server.
//!
//! Handles are resolved off the hot path: a route's [`RouteMetrics`] is looked up by name once
//! per config version (cached in the snapshot's route bindings) and then only incremented, so
//! the request path does no string formatting, hashing or locking for metrics. Counters live
//! here, outside the snapshot, so a config push does not reset them.
//!
//! What it must not do: take unbounded labels. Labels are the route name, the upstream name, a
//! status class, a [`Reason`] and an unknown-kid report's outcome; never paths, addresses,
//! subjects, issuers' kids or request ids.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::StatusCode;

use crate::denial::Reason;
use crate::snapshot::Snapshot;

/// The `route` label of requests that matched no route (route names cannot start with `_`).
pub const UNMATCHED_ROUTE: &str = "_unmatched";

/// Histogram bucket upper bounds, in seconds.
const BUCKETS: [f64; 13] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
const BUCKET_LABELS: [&str; 13] =
    ["0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "10"];
const REASONS: usize = Reason::ALL.len();
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// A fixed-bucket histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket; the last slot is `+Inf`.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS.iter().position(|b| secs <= *b).unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }
}

/// The counters of one route (or of the unmatched requests).
#[derive(Debug)]
pub struct RouteMetrics {
    name: Box<str>,
    /// Answers the proxy gave itself, by [`Reason`] (each reason has one status).
    denied: [AtomicU64; REASONS],
    /// Responses relayed from the upstream, by status class.
    forwarded: [AtomicU64; 5],
    /// Denials a `report_only` policy decided but did not enforce, by [`Reason`]. Kept apart so
    /// `portcullis_proxy_requests_total` counts every request once (as what it really got).
    would_deny: [AtomicU64; REASONS],
    duration: Histogram,
}

impl RouteMetrics {
    fn new(name: &str) -> RouteMetrics {
        RouteMetrics {
            name: name.into(),
            denied: std::array::from_fn(|_| AtomicU64::new(0)),
            forwarded: std::array::from_fn(|_| AtomicU64::new(0)),
            would_deny: std::array::from_fn(|_| AtomicU64::new(0)),
            duration: Histogram::default(),
        }
    }

    pub fn record_denied(&self, reason: Reason, elapsed: Duration) {
        self.denied[reason as usize].fetch_add(1, Relaxed);
        self.duration.observe(elapsed);
    }

    /// A response relayed from the upstream; `elapsed` runs to its head (time to first byte).
    pub fn record_forwarded(&self, status: StatusCode, elapsed: Duration) {
        self.forwarded[status_class(status)].fetch_add(1, Relaxed);
        self.duration.observe(elapsed);
    }

    /// A denial of a `report_only` policy: decided, logged, not enforced.
    pub fn record_would_deny(&self, reason: Reason) {
        self.would_deny[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn would_deny(&self, reason: Reason) -> u64 {
        self.would_deny[reason as usize].load(Relaxed)
    }

    pub fn denied(&self, reason: Reason) -> u64 {
        self.denied[reason as usize].load(Relaxed)
    }

    pub fn forwarded(&self, status: StatusCode) -> u64 {
        self.forwarded[status_class(status)].load(Relaxed)
    }
}

fn status_class(status: StatusCode) -> usize {
    usize::from(status.as_u16() / 100).clamp(1, 5) - 1
}

/// Errors talking to one upstream, by reason.
#[derive(Debug)]
pub struct UpstreamMetrics {
    name: Box<str>,
    errors: [AtomicU64; REASONS],
    /// Connections opened by the HTTP/1 engine (a pooled connection reused is not counted):
    /// next to the request count, it tells how well keep-alive to the upstream works.
    connects: AtomicU64,
}

impl UpstreamMetrics {
    pub fn record_connect(&self) {
        self.connects.fetch_add(1, Relaxed);
    }

    pub fn connects(&self) -> u64 {
        self.connects.load(Relaxed)
    }

    pub fn record_error(&self, reason: Reason) {
        self.errors[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn errors(&self, reason: Reason) -> u64 {
        self.errors[reason as usize].load(Relaxed)
    }
}

/// Token introspection (opaque tokens, see `introspect.rs`): calls to the authorization
/// servers by outcome, cache use, and call durations.
#[derive(Debug, Default)]
pub struct IntrospectionMetrics {
    /// Answers served from the cache (positive or negative).
    pub cache_hits: AtomicU64,
    /// Requests that waited for a call another request had started (single flight).
    pub coalesced: AtomicU64,
    /// Calls whose answer was an active token.
    pub active: AtomicU64,
    /// Calls whose answer refused the token (inactive, expired, wrong audience...).
    pub refused: AtomicU64,
    /// Calls that failed (unreachable, timeout, bad status, an answer that could not be trusted).
    pub failed: AtomicU64,
    pub duration: Histogram,
}

/// Unknown-kid reports to the control plane (see [`crate::kid_reports`]), by outcome.
#[derive(Debug, Default)]
pub struct KidReportMetrics {
    /// Handed to the open config stream.
    sent: AtomicU64,
    /// Not made: the issuer was reported within the de-duplication interval.
    deduplicated: AtomicU64,
    /// Made but lost: the queue was full, or no config stream was open.
    dropped: AtomicU64,
}

impl KidReportMetrics {
    pub fn record_sent(&self) {
        self.sent.fetch_add(1, Relaxed);
    }

    pub fn record_deduplicated(&self) {
        self.deduplicated.fetch_add(1, Relaxed);
    }

    pub fn record_dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Relaxed);
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Relaxed)
    }

    pub fn deduplicated(&self) -> u64 {
        self.deduplicated.load(Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}

/// Client connections (see `server.rs` and `http1/conn.rs`).
#[derive(Debug, Default)]
pub struct ConnectionMetrics {
    /// Accepted connections that spoke HTTP/1.x.
    pub http1: AtomicU64,
    /// Accepted connections that spoke HTTP/2 (h2c prior knowledge or ALPN).
    pub http2: AtomicU64,
    /// Open now (a gauge).
    pub open: AtomicU64,
    /// Closed because a request head did not arrive within the header read timeout.
    pub header_timeouts: AtomicU64,
    /// Closed because no request came within the keep-alive timeout.
    pub idle_timeouts: AtomicU64,
}

/// The registry. One per proxy, shared by `Arc`.
#[derive(Debug)]
pub struct Metrics {
    routes: Mutex<BTreeMap<String, Arc<RouteMetrics>>>,
    upstreams: Mutex<BTreeMap<String, Arc<UpstreamMetrics>>>,
    unmatched: Arc<RouteMetrics>,
    pub introspection: IntrospectionMetrics,
    unknown_kid_reports: KidReportMetrics,
    pub connections: ConnectionMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            routes: Mutex::default(),
            upstreams: Mutex::default(),
            unmatched: Arc::new(RouteMetrics::new(UNMATCHED_ROUTE)),
            introspection: IntrospectionMetrics::default(),
            unknown_kid_reports: KidReportMetrics::default(),
            connections: ConnectionMetrics::default(),
        }
    }

    /// The counters of unknown-kid reports.
    pub fn unknown_kid_reports(&self) -> &KidReportMetrics {
        &self.unknown_kid_reports
    }

    /// The counters of requests that matched no route.
    pub fn unmatched(&self) -> &Arc<RouteMetrics> {
        &self.unmatched
    }

    /// The counters of route `name`, created on first use. Called once per route and config
    /// version (the result is cached in the snapshot), not per request.
    pub fn route(&self, name: &str) -> Arc<RouteMetrics> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = routes.get(name) {
            return Arc::clone(m);
        }
        let m = Arc::new(RouteMetrics::new(name));
        routes.insert(name.to_owned(), Arc::clone(&m));
        m
    }

    /// The error counters of upstream `name`, created on first use.
    pub fn upstream(&self, name: &str) -> Arc<UpstreamMetrics> {
        let mut upstreams = self.upstreams.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = upstreams.get(name) {
            return Arc::clone(m);
        }
        let m = Arc::new(UpstreamMetrics {
            name: name.into(),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            connects: AtomicU64::new(0),
        });
        upstreams.insert(name.to_owned(), Arc::clone(&m));
        m
    }

    /// The Prometheus text exposition (format 0.0.4). Series whose counters are zero are left
    /// out, so a large configuration does not produce a mostly-zero page.
    pub fn render(&self, snapshot: Option<&Snapshot>) -> String {
        let routes: Vec<Arc<RouteMetrics>> = {
            let map = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
            std::iter::once(Arc::clone(&self.unmatched)).chain(map.values().cloned()).collect()
        };
        let upstreams: Vec<Arc<UpstreamMetrics>> =
            self.upstreams.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        let mut out = String::with_capacity(4096);

        out.push_str("# HELP portcullis_proxy_requests_total Requests answered, by route, status class and reason.\n");
        out.push_str("# TYPE portcullis_proxy_requests_total counter\n");
        for r in &routes {
            for (i, c) in r.forwarded.iter().enumerate() {
                let n = c.load(Relaxed);
                if n > 0 {
                    series(&mut out, "portcullis_proxy_requests_total", &r.name, STATUS_CLASSES[i], "forwarded", n);
                }
            }
            for reason in Reason::ALL {
                let n = r.denied(reason);
                if n > 0 {
                    let class = STATUS_CLASSES[status_class(reason.status())];
                    series(&mut out, "portcullis_proxy_requests_total", &r.name, class, reason.as_str(), n);
                }
            }
        }

        out.push_str("# HELP portcullis_proxy_report_only_denials_total Requests a report_only policy would have refused, by route and reason (they were let through).\n");
        out.push_str("# TYPE portcullis_proxy_report_only_denials_total counter\n");
        for r in &routes {
            for reason in Reason::ALL {
                let n = r.would_deny(reason);
                if n > 0 {
                    out.push_str("portcullis_proxy_report_only_denials_total{route=\"");
                    push_label(&mut out, &r.name);
                    let _ = writeln!(out, "\",reason=\"{}\"}} {n}", reason.as_str());
                }
            }
        }

        out.push_str("# HELP portcullis_proxy_request_duration_seconds Time from request head to response head.\n");
        out.push_str("# TYPE portcullis_proxy_request_duration_seconds histogram\n");
        for r in &routes {
            let h = &r.duration;
            let count = h.count();
            if count == 0 {
                continue;
            }
            let mut cumulative = 0;
            for (i, b) in h.buckets.iter().enumerate() {
                cumulative += b.load(Relaxed);
                let le = BUCKET_LABELS.get(i).copied().unwrap_or("+Inf");
                out.push_str("portcullis_proxy_request_duration_seconds_bucket{route=\"");
                push_label(&mut out, &r.name);
                let _ = writeln!(out, "\",le=\"{le}\"}} {cumulative}");
            }
            out.push_str("portcullis_proxy_request_duration_seconds_sum{route=\"");
            push_label(&mut out, &r.name);
            let _ = writeln!(out, "\"}} {}", h.sum_nanos.load(Relaxed) as f64 / 1e9);
            out.push_str("portcullis_proxy_request_duration_seconds_count{route=\"");
            push_label(&mut out, &r.name);
            let _ = writeln!(out, "\"}} {count}");
        }

        out.push_str(
            "# HELP portcullis_proxy_upstream_errors_total Failed attempts to reach an upstream, by reason.\n",
        );
        out.push_str("# TYPE portcullis_proxy_upstream_errors_total counter\n");
        for u in &upstreams {
            for reason in Reason::ALL {
                let n = u.errors(reason);
                if n > 0 {
                    out.push_str("portcullis_proxy_upstream_errors_total{upstream=\"");
                    push_label(&mut out, &u.name);
                    let _ = writeln!(out, "\",reason=\"{}\"}} {n}", reason.as_str());
                }
            }
        }

        out.push_str("# HELP portcullis_proxy_upstream_connections_opened_total Connections opened to an upstream by the HTTP/1 engine.\n");
        out.push_str("# TYPE portcullis_proxy_upstream_connections_opened_total counter\n");
        for u in &upstreams {
            out.push_str("portcullis_proxy_upstream_connections_opened_total{upstream=\"");
            push_label(&mut out, &u.name);
            let _ = writeln!(out, "\"}} {}", u.connects());
        }

        let c = &self.connections;
        out.push_str("# HELP portcullis_proxy_connections_total Client connections accepted, by protocol.\n");
        out.push_str("# TYPE portcullis_proxy_connections_total counter\n");
        for (protocol, n) in [("http1", &c.http1), ("http2", &c.http2)] {
            let _ = writeln!(out, "portcullis_proxy_connections_total{{protocol=\"{protocol}\"}} {}", n.load(Relaxed));
        }
        out.push_str("# HELP portcullis_proxy_connections_open Client connections open now.\n");
        out.push_str("# TYPE portcullis_proxy_connections_open gauge\n");
        let _ = writeln!(out, "portcullis_proxy_connections_open {}", c.open.load(Relaxed));
        out.push_str("# HELP portcullis_proxy_connections_timed_out_total Client connections closed for a timeout: a request head not sent within --header-read-timeout, or no new request within --keep-alive-timeout.\n");
        out.push_str("# TYPE portcullis_proxy_connections_timed_out_total counter\n");
        for (reason, n) in [("header_read", &c.header_timeouts), ("keep_alive", &c.idle_timeouts)] {
            let _ = writeln!(
                out,
                "portcullis_proxy_connections_timed_out_total{{reason=\"{reason}\"}} {}",
                n.load(Relaxed)
            );
        }

        let i = &self.introspection;
        out.push_str("# HELP portcullis_proxy_introspection_requests_total Token introspection calls, by outcome.\n");
        out.push_str("# TYPE portcullis_proxy_introspection_requests_total counter\n");
        for (outcome, n) in [("active", &i.active), ("refused", &i.refused), ("failed", &i.failed)] {
            let _ = writeln!(
                out,
                "portcullis_proxy_introspection_requests_total{{outcome=\"{outcome}\"}} {}",
                n.load(Relaxed)
            );
        }
        out.push_str("# HELP portcullis_proxy_introspection_cache_hits_total Opaque tokens answered from the introspection cache.\n");
        out.push_str("# TYPE portcullis_proxy_introspection_cache_hits_total counter\n");
        let _ = writeln!(out, "portcullis_proxy_introspection_cache_hits_total {}", i.cache_hits.load(Relaxed));
        out.push_str("# HELP portcullis_proxy_introspection_coalesced_total Requests that shared another request's introspection call.\n");
        out.push_str("# TYPE portcullis_proxy_introspection_coalesced_total counter\n");
        let _ = writeln!(out, "portcullis_proxy_introspection_coalesced_total {}", i.coalesced.load(Relaxed));
        out.push_str("# HELP portcullis_proxy_introspection_duration_seconds Duration of token introspection calls.\n");
        out.push_str("# TYPE portcullis_proxy_introspection_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (n, b) in i.duration.buckets.iter().enumerate() {
            cumulative += b.load(Relaxed);
            let le = BUCKET_LABELS.get(n).copied().unwrap_or("+Inf");
            let _ = writeln!(out, "portcullis_proxy_introspection_duration_seconds_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(
            out,
            "portcullis_proxy_introspection_duration_seconds_sum {}",
            i.duration.sum_nanos.load(Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "portcullis_proxy_introspection_duration_seconds_count {}", i.duration.count());
        out.push_str(
            "# HELP portcullis_proxy_unknown_kid_reports_total Reports to the control plane of a token kid missing from a fetched issuer's keys, by outcome.\n",
        );
        out.push_str("# TYPE portcullis_proxy_unknown_kid_reports_total counter\n");
        let k = &self.unknown_kid_reports;
        for (outcome, n) in [("sent", k.sent()), ("deduplicated", k.deduplicated()), ("dropped", k.dropped())] {
            let _ = writeln!(out, "portcullis_proxy_unknown_kid_reports_total{{outcome=\"{outcome}\"}} {n}");
        }

        out.push_str("# HELP portcullis_proxy_config_version The config version (store revision) being served; 0 before the first.\n");
        out.push_str("# TYPE portcullis_proxy_config_version gauge\n");
        let _ = writeln!(out, "portcullis_proxy_config_version {}", snapshot.map_or(0, |s| s.version));
        out.push_str("# HELP portcullis_proxy_routes Routes in the config being served.\n");
        out.push_str("# TYPE portcullis_proxy_routes gauge\n");
        let _ = writeln!(out, "portcullis_proxy_routes {}", snapshot.map_or(0, |s| s.routes.len()));
        out
    }
}

fn series(out: &mut String, name: &str, route: &str, class: &str, reason: &str, n: u64) {
    out.push_str(name);
    out.push_str("{route=\"");
    push_label(out, route);
    let _ = writeln!(out, "\",status_class=\"{class}\",reason=\"{reason}\"}} {n}");
}

/// Escapes a label value (names are validated, but the exposition must never break).
fn push_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(metrics: &Metrics, expected_lines: &[&str], absent: &[&str]) {
        let text = metrics.render(None);
        for line in expected_lines {
            assert!(text.lines().any(|l| l == *line), "missing {line:?} in\n{text}");
        }
        for s in absent {
            assert!(!text.contains(s), "unexpected {s:?} in\n{text}");
        }
    }

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::new();
        let r = m.route("users");
        assert!(Arc::ptr_eq(&r, &m.route("users")), "one handle per route name");
        r.record_forwarded(StatusCode::OK, Duration::from_millis(3));
        r.record_forwarded(StatusCode::NO_CONTENT, Duration::from_millis(30));
        r.record_denied(Reason::TokenMissing, Duration::from_micros(100));
        m.unmatched().record_denied(Reason::RouteNotFound, Duration::from_micros(50));
        m.upstream("users-svc").record_error(Reason::UpstreamConnectFailed);
        m.unknown_kid_reports().record_sent();
        m.unknown_kid_reports().record_dropped(2);
        check(
            &m,
            &[
                r#"portcullis_proxy_requests_total{route="users",status_class="2xx",reason="forwarded"} 2"#,
                r#"portcullis_proxy_requests_total{route="users",status_class="4xx",reason="token_missing"} 1"#,
                r#"portcullis_proxy_requests_total{route="_unmatched",status_class="4xx",reason="route_not_found"} 1"#,
                r#"portcullis_proxy_request_duration_seconds_bucket{route="users",le="0.0005"} 1"#,
                r#"portcullis_proxy_request_duration_seconds_bucket{route="users",le="0.005"} 2"#,
                r#"portcullis_proxy_request_duration_seconds_bucket{route="users",le="0.05"} 3"#,
                r#"portcullis_proxy_request_duration_seconds_bucket{route="users",le="+Inf"} 3"#,
                r#"portcullis_proxy_request_duration_seconds_count{route="users"} 3"#,
                r#"portcullis_proxy_upstream_errors_total{upstream="users-svc",reason="upstream_connect_failed"} 1"#,
                r#"portcullis_proxy_unknown_kid_reports_total{outcome="sent"} 1"#,
                r#"portcullis_proxy_unknown_kid_reports_total{outcome="deduplicated"} 0"#,
                r#"portcullis_proxy_unknown_kid_reports_total{outcome="dropped"} 2"#,
                "portcullis_proxy_config_version 0",
                "portcullis_proxy_routes 0",
                "# TYPE portcullis_proxy_request_duration_seconds histogram",
            ],
            &["status_class=\"5xx\"", "reason=\"ip_denied\""],
        );
    }

    #[test]
    fn status_classes() {
        for (status, class) in [(101, 0), (200, 1), (302, 2), (404, 3), (503, 4), (599, 4)] {
            assert_eq!(status_class(StatusCode::from_u16(status).unwrap()), class, "{status}");
        }
    }
}

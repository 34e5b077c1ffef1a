//! Upstream endpoint state that must outlive config swaps: per endpoint, the in-flight count
//! (least-request), the consecutive-failure count and the ejection deadline (passive health),
//! and per upstream the round-robin cursor. [`UpstreamRegistry`] keys it by upstream name and
//! endpoint list, so a config push that leaves an upstream's endpoints alone keeps its state;
//! a changed endpoint list starts fresh.
//!
//! Selection: round robin or least request (in-flight counters, scanned from a rotating start so
//! ties spread), skipping ejected endpoints and the ones a retry already tried. When every
//! candidate is ejected the balancer tries an ejected one anyway ("panic mode", as in Envoy):
//! passive ejection is a guess from past failures, and one more attempt that fails fast costs less
//! than refusing all traffic until the ejection ends.
//!
//! An upstream with TLS enabled carries its compiled [`TlsSettings`] (built with the snapshot)
//! in its state, and the settings' identity is part of the registry key: connections made (and
//! pooled) under one trust configuration are never reused under another, and a plain upstream
//! never gets a TLS connection or the other way round.
//!
//! What it must not do: lock on the request path (everything per request is atomics), read the
//! clock unless some endpoint is ejected, or hold the policy knobs (balancing mode, thresholds):
//! those come from the snapshot's `Upstream` at each call, so a push changes them at once.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use http::uri::Authority;
use portcullis_shared::model::{LoadBalancing, Upstream};
use rustls::pki_types::ServerName;
use tokio::time::Instant;

use crate::metrics::{Metrics, UpstreamMetrics};

/// How long a registry entry no snapshot refers to is kept before it is dropped (covers the
/// moment between a swap dropping the old snapshot and the new one resolving its routes).
const ORPHAN_GRACE: Duration = Duration::from_secs(600);

/// How to speak TLS to an upstream: its client configuration (trust roots and ALPN, shared by
/// every upstream with the same `ca_file` and protocol) and the `tls.server_name` override.
/// Compiled once per config version in `snapshot.rs`, reused while unchanged.
pub struct TlsSettings {
    pub connector: tokio_rustls::TlsConnector,
    /// `tls.server_name`; `None`: each endpoint's host (an IP verifies against an IP SAN).
    pub server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("alpn", &self.config().alpn_protocols)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsSettings {
    pub fn new(config: Arc<rustls::ClientConfig>, server_name: Option<ServerName<'static>>) -> TlsSettings {
        TlsSettings { connector: tokio_rustls::TlsConnector::from(config), server_name }
    }

    pub fn config(&self) -> &Arc<rustls::ClientConfig> {
        self.connector.config()
    }

    /// The name to send (SNI) and verify for a connection to `authority`; `None` when neither
    /// the override nor the host is a valid name.
    pub fn server_name_for(&self, authority: &Authority) -> Option<ServerName<'static>> {
        match &self.server_name {
            Some(name) => Some(name.clone()),
            None => portcullis_shared::http_client::server_name(authority.host()).ok(),
        }
    }
}

/// One endpoint (`host:port`) of an upstream.
#[derive(Debug)]
pub struct Endpoint {
    pub authority: Authority,
    /// With TLS: the name to send and verify (computed once, not per connection).
    pub server_name: Option<ServerName<'static>>,
    /// Idle HTTP/1.1 connections to this endpoint.
    pub idle: crate::http1::client::IdlePool,
    in_flight: AtomicUsize,
    failures: AtomicU32,
    /// Nanoseconds after the state's `base` until which the endpoint is ejected; 0 = not.
    ejected_until: AtomicU64,
}

impl Endpoint {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }
}

/// The state of one upstream (name + endpoint list).
#[derive(Debug)]
pub struct UpstreamState {
    pub name: Arc<str>,
    pub endpoints: Box<[Endpoint]>,
    pub metrics: Arc<UpstreamMetrics>,
    /// `Some` for an upstream with TLS enabled.
    pub tls: Option<Arc<TlsSettings>>,
    /// With TLS: this upstream's own HTTP/2 and protocol-switch clients (their connector
    /// carries the TLS settings), built on first use.
    pub tls_clients: OnceLock<crate::forward::TlsClients>,
    cursor: AtomicUsize,
    /// How many endpoints have an ejection deadline set (expired or not): 0 skips the clock.
    ejected: AtomicUsize,
    base: Instant,
}

/// Counts a request in flight on an endpoint until dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Endpoint);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

impl UpstreamState {
    /// A state for `endpoints`; endpoints that are not valid authorities are left out (the model
    /// validated them, so none is).
    pub fn new(
        name: &str,
        endpoints: &[String],
        metrics: Arc<UpstreamMetrics>,
        tls: Option<Arc<TlsSettings>>,
    ) -> UpstreamState {
        let endpoints = endpoints
            .iter()
            .filter_map(|e| Authority::from_str(e).ok())
            .map(|authority| Endpoint {
                server_name: tls.as_ref().and_then(|t| t.server_name_for(&authority)),
                authority,
                idle: crate::http1::client::IdlePool::default(),
                in_flight: AtomicUsize::new(0),
                failures: AtomicU32::new(0),
                ejected_until: AtomicU64::new(0),
            })
            .collect();
        UpstreamState {
            name: name.into(),
            endpoints,
            metrics,
            tls,
            tls_clients: OnceLock::new(),
            cursor: AtomicUsize::new(0),
            ejected: AtomicUsize::new(0),
            base: Instant::now(),
        }
    }

    fn now_nanos(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1)
    }

    /// Whether endpoint `i` may take traffic at `now` (`None`: nothing is ejected). An expired
    /// ejection is cleared here, by whoever sees it first.
    fn available(&self, i: usize, now: Option<u64>) -> bool {
        let Some(now) = now else { return true };
        let until = self.endpoints[i].ejected_until.load(Relaxed);
        if until == 0 {
            return true;
        }
        if now < until {
            return false;
        }
        if self.endpoints[i].ejected_until.compare_exchange(until, 0, Relaxed, Relaxed).is_ok() {
            self.ejected.fetch_sub(1, Relaxed);
        }
        true
    }

    /// Picks an endpoint for the next attempt, never one in `tried`; `None` once every endpoint
    /// has been tried.
    pub fn pick(&self, lb: LoadBalancing, tried: &[usize]) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Relaxed) % n;
        let now = (self.ejected.load(Relaxed) > 0).then(|| self.now_nanos());
        let candidates = || (0..n).map(|k| (start + k) % n).filter(|i| !tried.contains(i));
        let choose = |healthy_only: bool| -> Option<usize> {
            let mut eligible = candidates().filter(|&i| !healthy_only || self.available(i, now));
            match lb {
                LoadBalancing::RoundRobin => eligible.next(),
                LoadBalancing::LeastRequest => eligible.min_by_key(|&i| self.endpoints[i].in_flight()),
            }
        };
        // All candidates ejected: panic mode, try one anyway.
        choose(true).or_else(|| choose(false))
    }

    /// Marks a request in flight on endpoint `i` (least-request counts these).
    pub fn start(&self, i: usize) -> InFlight<'_> {
        let e = &self.endpoints[i];
        e.in_flight.fetch_add(1, Relaxed);
        InFlight(e)
    }

    /// The endpoint answered: its failure streak ends.
    pub fn report_success(&self, i: usize) {
        let e = &self.endpoints[i];
        if e.failures.load(Relaxed) != 0 {
            e.failures.store(0, Relaxed);
        }
    }

    /// The endpoint could not be reached. After `upstream.health.consecutive_failures` in a row
    /// it is ejected for `upstream.health.ejection_time`. Returns whether this call ejected it.
    pub fn report_failure(&self, i: usize, upstream: &Upstream) -> bool {
        let e = &self.endpoints[i];
        let failures = e.failures.fetch_add(1, Relaxed) + 1;
        if failures < upstream.health.consecutive_failures.max(1) {
            return false;
        }
        e.failures.store(0, Relaxed);
        let until = self
            .now_nanos()
            .saturating_add(u64::try_from(upstream.health.ejection_time.as_nanos()).unwrap_or(u64::MAX));
        if e.ejected_until.swap(until, Relaxed) == 0 {
            self.ejected.fetch_add(1, Relaxed);
        }
        true
    }

    /// Whether endpoint `i` is ejected now.
    pub fn is_ejected(&self, i: usize) -> bool {
        let until = self.endpoints[i].ejected_until.load(Relaxed);
        until != 0 && self.now_nanos() < until
    }
}

/// Connect timeouts by endpoint authority, read by the connector once per new connection.
#[derive(Debug)]
pub struct ConnectTimeouts {
    by_authority: RwLock<HashMap<String, Duration>>,
    default: Duration,
}

impl ConnectTimeouts {
    pub fn new(default: Duration) -> ConnectTimeouts {
        ConnectTimeouts { by_authority: RwLock::default(), default }
    }

    pub fn get(&self, authority: &str) -> Duration {
        let map = self.by_authority.read().unwrap_or_else(PoisonError::into_inner);
        map.get(authority).copied().unwrap_or(self.default)
    }

    fn set(&self, upstream: &Upstream) {
        let stale = {
            let map = self.by_authority.read().unwrap_or_else(PoisonError::into_inner);
            upstream.endpoints.iter().any(|e| map.get(e) != Some(&upstream.connect_timeout))
        };
        if stale {
            let mut map = self.by_authority.write().unwrap_or_else(PoisonError::into_inner);
            for e in &upstream.endpoints {
                map.insert(e.clone(), upstream.connect_timeout);
            }
        }
    }
}

struct Entry {
    state: Arc<UpstreamState>,
    /// Since when no one but the registry holds the state.
    orphaned_since: Option<std::time::Instant>,
}

/// What identifies an upstream's state: name, endpoints, and the address of its TLS settings
/// (the state holds them, so the address stays theirs while the entry lives).
type Key = (String, Vec<String>, Option<usize>);

/// Upstream states by (name, endpoints, TLS settings), outside any snapshot.
pub struct UpstreamRegistry {
    entries: Mutex<HashMap<Key, Entry>>,
    metrics: Arc<Metrics>,
    connect_timeouts: Arc<ConnectTimeouts>,
}

impl std::fmt::Debug for UpstreamRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamRegistry").finish_non_exhaustive()
    }
}

impl UpstreamRegistry {
    pub fn new(metrics: Arc<Metrics>, connect_timeouts: Arc<ConnectTimeouts>) -> UpstreamRegistry {
        UpstreamRegistry { entries: Mutex::default(), metrics, connect_timeouts }
    }

    /// The state of `upstream` with its compiled `tls` settings, created on first use. Called
    /// once per route and config version (the snapshot caches the result), so the lock is off
    /// the per-request path.
    pub fn resolve(&self, upstream: &Upstream, tls: Option<&Arc<TlsSettings>>) -> Arc<UpstreamState> {
        self.connect_timeouts.set(upstream);
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let tls_id = tls.map(|t| Arc::as_ptr(t) as usize);
        let key = (upstream.name.clone(), upstream.endpoints.clone(), tls_id);
        if let Some(entry) = entries.get_mut(&key) {
            entry.orphaned_since = None;
            return Arc::clone(&entry.state);
        }
        // A new key is rare (a config change): sweep states no snapshot has used for a while.
        let now = std::time::Instant::now();
        entries.retain(|_, e| {
            if Arc::strong_count(&e.state) > 1 {
                e.orphaned_since = None;
                return true;
            }
            let since = *e.orphaned_since.get_or_insert(now);
            now.duration_since(since) < ORPHAN_GRACE
        });
        let state = Arc::new(UpstreamState::new(
            &upstream.name,
            &upstream.endpoints,
            self.metrics.upstream(&upstream.name),
            tls.cloned(),
        ));
        entries.insert(key, Entry { state: Arc::clone(&state), orphaned_since: None });
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_shared::model::HealthCheck;

    fn upstream(endpoints: &[&str], lb: LoadBalancing, failures: u32, ejection: Duration) -> Upstream {
        Upstream {
            name: "u".into(),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            load_balancing: lb,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            health: HealthCheck {
                consecutive_failures: failures,
                ejection_time: ejection,
                path: None,
                interval: Duration::from_secs(5),
            },
            tls: None,
            http2: false,
        }
    }

    fn state(u: &Upstream) -> UpstreamState {
        UpstreamState::new(&u.name, &u.endpoints, Metrics::new().upstream("u"), None)
    }

    /// Picks `n` times (no retries) and returns the endpoint indices.
    fn check(s: &UpstreamState, lb: LoadBalancing, n: usize, expected: &[usize]) {
        let got: Vec<usize> = (0..n).map(|_| s.pick(lb, &[]).unwrap()).collect();
        assert_eq!(got, expected);
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_cycles_and_skips_tried() {
        let u = upstream(&["a:1", "b:1", "c:1"], LoadBalancing::RoundRobin, 5, Duration::from_secs(10));
        let s = state(&u);
        check(&s, u.load_balancing, 4, &[0, 1, 2, 0]);
        // a retry never goes back to an endpoint it tried
        assert_eq!(s.pick(u.load_balancing, &[1, 2]), Some(0));
        assert_eq!(s.pick(u.load_balancing, &[0, 1, 2]), None);
    }

    #[tokio::test(start_paused = true)]
    async fn least_request_prefers_the_idlest() {
        let u = upstream(&["a:1", "b:1", "c:1"], LoadBalancing::LeastRequest, 5, Duration::from_secs(10));
        let s = state(&u);
        let _a = s.start(0);
        let _a2 = s.start(0);
        let b = s.start(1);
        check(&s, u.load_balancing, 2, &[2, 2]);
        let _c = s.start(2);
        let _c2 = s.start(2);
        drop(b);
        check(&s, u.load_balancing, 1, &[1]);
        assert_eq!(s.endpoints[0].in_flight(), 2);
        assert_eq!(s.pick(u.load_balancing, &[1]), Some(0), "ties and tried ones are skipped");
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_for_the_ejection_time() {
        let u = upstream(&["a:1", "b:1"], LoadBalancing::RoundRobin, 3, Duration::from_secs(10));
        let s = state(&u);
        assert!(!s.report_failure(0, &u));
        assert!(!s.report_failure(0, &u));
        s.report_success(0); // a success ends the streak
        assert!(!s.report_failure(0, &u));
        assert!(!s.report_failure(0, &u));
        assert!(s.report_failure(0, &u), "third failure in a row ejects");
        assert!(s.is_ejected(0));
        check(&s, u.load_balancing, 3, &[1, 1, 1]);

        tokio::time::advance(Duration::from_secs(9)).await;
        check(&s, u.load_balancing, 2, &[1, 1]);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!s.is_ejected(0));
        let mut back: Vec<usize> = (0..2).map(|_| s.pick(u.load_balancing, &[]).unwrap()).collect();
        back.sort();
        assert_eq!(back, [0, 1], "back in rotation");
        assert_eq!(s.ejected.load(Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn all_ejected_means_panic_mode() {
        let u = upstream(&["a:1", "b:1"], LoadBalancing::LeastRequest, 1, Duration::from_secs(10));
        let s = state(&u);
        assert!(s.report_failure(0, &u));
        assert!(s.report_failure(1, &u));
        assert!(s.pick(u.load_balancing, &[]).is_some(), "still tries an endpoint");
        assert_eq!(s.pick(u.load_balancing, &[0]), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_registry_keeps_state_across_pushes_and_resets_on_new_endpoints() {
        let metrics = Arc::new(Metrics::new());
        let timeouts = Arc::new(ConnectTimeouts::new(Duration::from_secs(5)));
        let reg = UpstreamRegistry::new(metrics, Arc::clone(&timeouts));
        let mut u = upstream(&["a:1", "b:1"], LoadBalancing::RoundRobin, 1, Duration::from_secs(10));
        let first = reg.resolve(&u, None);
        first.report_failure(0, &u);
        // same name and endpoints, other knobs changed: same state
        u.request_timeout = Duration::from_secs(7);
        u.connect_timeout = Duration::from_millis(250);
        let second = reg.resolve(&u, None);
        assert!(Arc::ptr_eq(&first, &second));
        assert!(second.is_ejected(0));
        assert_eq!(timeouts.get("a:1"), Duration::from_millis(250));
        assert_eq!(timeouts.get("other:1"), Duration::from_secs(5));
        // new endpoint list: fresh state
        u.endpoints.push("c:1".into());
        let third = reg.resolve(&u, None);
        assert!(!Arc::ptr_eq(&first, &third));
        assert!(!third.is_ejected(0));
        assert!(third.endpoints[0].server_name.is_none(), "no TLS, no name");

        // TLS settings are part of the identity: plain and TLS connections never share a pool
        let ca = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/keys/tls/test_ca.pem");
        let config = portcullis_shared::http_client::tls_client_config(Some(&ca), &[b"http/1.1"]).unwrap();
        let tls = Arc::new(TlsSettings::new(Arc::clone(&config), None));
        let with_tls = reg.resolve(&u, Some(&tls));
        assert!(!Arc::ptr_eq(&third, &with_tls));
        assert!(Arc::ptr_eq(&with_tls, &reg.resolve(&u, Some(&tls))), "same settings, same state");
        assert_eq!(with_tls.endpoints[2].server_name, ServerName::try_from("c").ok(), "the endpoint host");
        let renamed = Arc::new(TlsSettings::new(config, ServerName::try_from("api.internal").ok()));
        let with_name = reg.resolve(&u, Some(&renamed));
        assert!(!Arc::ptr_eq(&with_tls, &with_name));
        assert_eq!(with_name.endpoints[0].server_name, ServerName::try_from("api.internal").ok());
    }
}

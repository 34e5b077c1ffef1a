//! Unknown-kid reports: when a token names a `kid` that is not in the key set of an issuer whose
//! keys the control plane fetches (`jwks_uri` or OIDC discovery), the issuer has probably rotated
//! its keys since the last refresh. The request still gets its 401; the proxy tells the control
//! plane `(issuer, kid)` on the config stream, the control plane refetches that issuer's keys
//! (rate-limited per issuer) and a new config version brings the new key. The proxy never calls
//! the issuer itself.
//!
//! Two halves: a [`KidReporter`] on the request path and a [`KidReportReceiver`] drained by the
//! config client ([`channel`] makes the pair). The request path never blocks and does little:
//! - de-duplication first: at most one report per issuer per interval (1 s by default) is made,
//!   however many random kids arrive; later ones are counted as `deduplicated`, before the token
//!   is parsed a second time to read its `iss`;
//! - a bounded queue with `try_send`: when it is full (the config stream is away or slow), the
//!   report is counted as `dropped`, never waited for.
//!
//! What it must not do: report issuers with inline or shared-secret keys (nothing to refetch),
//! report a token whose `iss` names none of the route's issuers, or keep anything of the token
//! but the issuer's name and the (bounded) kid.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use portcullis_shared::jwt::{self, JwtError, Verifier};
use portcullis_shared::model::{Issuer, KeySourceKind};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::snapshot::Snapshot;

/// At most one report per issuer per this interval leaves the proxy.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Reports waiting for the config stream. A few issuers at once is the most there ever is; more
/// than this means the stream is away, and then the reports are moot.
pub const QUEUE_CAPACITY: usize = 16;

/// One report: the Issuer resource's name and the unknown kid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownKidReport {
    pub issuer: String,
    pub kid: String,
}

/// What [`KidReporter::report_at`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportOutcome {
    Queued,
    Deduplicated,
    Dropped,
}

/// The request path's half. Cheap to keep in the pipeline; [`KidReporter::disabled`] reports
/// nothing (a pipeline without a config stream, as in tests).
#[derive(Debug)]
pub struct KidReporter {
    inner: Option<Inner>,
}

#[derive(Debug)]
struct Inner {
    tx: mpsc::Sender<UnknownKidReport>,
    interval: Duration,
    /// Issuer name → when a report was last attempted. Never held across an `.await`; one entry
    /// per issuer that ever had an unknown kid (bounded by the configuration, pruned on insert).
    last: Mutex<HashMap<String, Instant>>,
    metrics: Arc<Metrics>,
}

/// The config client's half.
#[derive(Debug)]
pub struct KidReportReceiver {
    rx: mpsc::Receiver<UnknownKidReport>,
    metrics: Arc<Metrics>,
}

/// A connected reporter and receiver, counting into `metrics`; at most one report per issuer per
/// `interval`.
pub fn channel(metrics: Arc<Metrics>, interval: Duration) -> (KidReporter, KidReportReceiver) {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let inner = Inner { tx, interval, last: Mutex::new(HashMap::new()), metrics: Arc::clone(&metrics) };
    (KidReporter { inner: Some(inner) }, KidReportReceiver { rx, metrics })
}

/// Whether the control plane fetches this issuer's keys (so a refetch may find a new kid).
fn keys_are_fetched(issuer: &Issuer) -> bool {
    matches!(issuer.keys.kind, KeySourceKind::JwksUri(_) | KeySourceKind::Discovery(_))
}

impl KidReporter {
    pub fn disabled() -> KidReporter {
        KidReporter { inner: None }
    }

    /// The request path's hook after `verifiers` (a route's) refused `token` with `error`: when
    /// that is an unknown kid and the token's `iss` is one of those issuers whose keys the
    /// control plane fetches, report it (de-duplicated, never blocking). Anything else: nothing.
    pub fn on_verify_error(&self, snapshot: &Snapshot, verifiers: &[Arc<Verifier>], token: &str, error: &JwtError) {
        let (Some(inner), JwtError::KidUnknown { kid: Some(kid) }) = (&self.inner, error) else { return };
        let fetched = |v: &&Arc<Verifier>| snapshot.issuers.get(v.name()).is_some_and(|i| keys_are_fetched(i));
        let now = Instant::now();
        let mut candidates = verifiers.iter().filter(fetched).peekable();
        if candidates.peek().is_none() {
            return;
        }
        // A flood of random kids stops here, before the token is parsed again.
        if !candidates.any(|v| inner.due(v.name(), now)) {
            inner.metrics.unknown_kid_reports().record_deduplicated();
            return;
        }
        // The verifier that answered is one whose `iss` the token names (see `TokenCache::verify`).
        let Some(iss) = jwt::parse(token).ok().and_then(|t| t.issuer().map(str::to_owned)) else { return };
        for v in verifiers.iter().filter(fetched).filter(|v| v.iss() == iss) {
            self.report_at(v.name(), kid, now);
        }
    }

    /// Reports `(issuer, kid)` unless `issuer` was reported less than the interval before `now`.
    pub fn report_at(&self, issuer: &str, kid: &str, now: Instant) -> ReportOutcome {
        let Some(inner) = &self.inner else { return ReportOutcome::Dropped };
        let outcome = inner.report_at(issuer, kid, now);
        let metrics = inner.metrics.unknown_kid_reports();
        match outcome {
            ReportOutcome::Queued => {} // counted as sent (or dropped) by the receiver
            ReportOutcome::Deduplicated => metrics.record_deduplicated(),
            ReportOutcome::Dropped => metrics.record_dropped(1),
        }
        outcome
    }
}

impl Inner {
    /// Whether a report for `issuer` would be made at `now`.
    fn due(&self, issuer: &str, now: Instant) -> bool {
        let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        last.get(issuer).is_none_or(|at| now.saturating_duration_since(*at) >= self.interval)
    }

    fn report_at(&self, issuer: &str, kid: &str, now: Instant) -> ReportOutcome {
        {
            let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
            match last.get_mut(issuer) {
                Some(at) if now.saturating_duration_since(*at) < self.interval => return ReportOutcome::Deduplicated,
                Some(at) => *at = now,
                None => {
                    // Issuers removed from the configuration leave stale entries: drop them here.
                    let interval = self.interval;
                    last.retain(|_, at| now.saturating_duration_since(*at) < interval);
                    last.insert(issuer.to_owned(), now);
                }
            }
        }
        // The slot is taken even when the queue is full: a full queue must not turn every
        // request of a flood into another attempt.
        let report = UnknownKidReport { issuer: issuer.to_owned(), kid: kid.to_owned() };
        match self.tx.try_send(report) {
            Ok(()) => ReportOutcome::Queued,
            Err(_) => ReportOutcome::Dropped,
        }
    }
}

impl KidReportReceiver {
    /// The next report; `None` once every reporter is gone.
    pub async fn recv(&mut self) -> Option<UnknownKidReport> {
        self.rx.recv().await
    }

    /// Drops what is queued (reports made while no config stream was open); returns how many.
    pub fn discard_queued(&mut self) -> u64 {
        let mut n = 0;
        while self.rx.try_recv().is_ok() {
            n += 1;
        }
        self.record_dropped(n);
        n
    }

    /// A report went onto the config stream.
    pub fn record_sent(&self) {
        self.metrics.unknown_kid_reports().record_sent();
    }

    /// Reports that could not go onto the config stream.
    pub fn record_dropped(&self, n: u64) {
        if n > 0 {
            self.metrics.unknown_kid_reports().record_dropped(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{self, ResourceMap};
    use base64::Engine as _;
    use portcullis_proto::config::v1 as pb;
    use portcullis_shared::Kind;
    use portcullis_shared::jwt::TokenCache;
    use std::time::SystemTime;

    const SECOND: Duration = Duration::from_secs(1);

    fn queued(rx: &mut KidReportReceiver) -> Vec<(String, String)> {
        std::iter::from_fn(|| rx.rx.try_recv().ok()).map(|r| (r.issuer, r.kid)).collect()
    }

    /// (issuer, kid, seconds after the start) in order → the outcome of each.
    fn check(capacity_left: usize, reports: &[(&str, &str, f64)], expected: &[ReportOutcome]) {
        let metrics = Arc::new(Metrics::new());
        let (reporter, mut rx) = channel(Arc::clone(&metrics), SECOND);
        let inner = reporter.inner.as_ref().unwrap();
        for _ in capacity_left..QUEUE_CAPACITY {
            inner.tx.try_send(UnknownKidReport { issuer: "filler".into(), kid: String::new() }).unwrap();
        }
        let start = Instant::now();
        let outcomes: Vec<ReportOutcome> = reports
            .iter()
            .map(|(issuer, kid, at)| reporter.report_at(issuer, kid, start + Duration::from_secs_f64(*at)))
            .collect();
        assert_eq!(outcomes, expected, "{reports:?}");
        let count = |o| expected.iter().filter(|e| **e == o).count() as u64;
        let k = metrics.unknown_kid_reports();
        assert_eq!(
            (k.deduplicated(), k.dropped()),
            (count(ReportOutcome::Deduplicated), count(ReportOutcome::Dropped))
        );
        let sent: Vec<_> = queued(&mut rx).into_iter().filter(|(i, _)| i != "filler").collect();
        let wanted: Vec<_> = reports
            .iter()
            .zip(expected)
            .filter(|(_, o)| **o == ReportOutcome::Queued)
            .map(|((i, k, _), _)| ((*i).to_owned(), (*k).to_owned()))
            .collect();
        assert_eq!(sent, wanted);
    }

    #[test]
    fn one_report_per_issuer_per_interval() {
        use ReportOutcome::{Deduplicated as D, Dropped as X, Queued as Q};
        // a flood of random kids: one report a second
        check(
            QUEUE_CAPACITY,
            &[("idp", "k1", 0.0), ("idp", "k2", 0.1), ("idp", "k3", 0.99), ("idp", "k4", 1.0), ("idp", "k5", 1.5)],
            &[Q, D, D, Q, D],
        );
        // issuers are de-duplicated separately
        check(QUEUE_CAPACITY, &[("a", "k", 0.0), ("b", "k", 0.0), ("a", "k", 0.5), ("b", "k", 2.0)], &[Q, Q, D, Q]);
        // a full queue drops, and the drop takes the slot: no retry on every request
        check(1, &[("a", "k", 0.0), ("b", "k", 0.0), ("b", "k", 0.5), ("c", "k", 0.6)], &[Q, X, D, X]);
        check(0, &[("a", "k", 0.0), ("a", "k", 0.2), ("a", "k", 1.2)], &[X, D, X]);
    }

    #[test]
    fn a_disabled_reporter_reports_nothing() {
        let r = KidReporter::disabled();
        assert_eq!(r.report_at("idp", "k", Instant::now()), ReportOutcome::Dropped);
    }

    #[test]
    fn queued_reports_are_discarded_as_dropped() {
        let metrics = Arc::new(Metrics::new());
        let (reporter, mut rx) = channel(Arc::clone(&metrics), SECOND);
        let now = Instant::now();
        reporter.report_at("a", "k", now);
        reporter.report_at("b", "k", now);
        assert_eq!(rx.discard_queued(), 2);
        assert_eq!(metrics.unknown_kid_reports().dropped(), 2);
        assert_eq!(rx.discard_queued(), 0);
        assert_eq!(metrics.unknown_kid_reports().dropped(), 2);
    }

    #[test]
    fn stale_issuers_are_forgotten() {
        let (reporter, _rx) = channel(Arc::new(Metrics::new()), SECOND);
        let now = Instant::now();
        for i in 0..10 {
            reporter.report_at(&format!("gone-{i}"), "k", now);
        }
        reporter.report_at("idp", "k", now + 2 * SECOND);
        let last = reporter.inner.as_ref().unwrap().last.lock().unwrap();
        assert_eq!(last.keys().collect::<Vec<_>>(), ["idp"]);
    }

    // ---------------------------------------------------------------- which issuer is reported

    fn issuer(name: &str, source: pb::key_source::Source) -> pb::Resource {
        pb::Resource {
            kind: Some(pb::resource::Kind::Issuer(pb::Issuer {
                name: name.into(),
                issuer: format!("https://{name}.test/"),
                audiences: vec!["api://test".into()],
                algorithms: vec!["ES256".into()],
                keys: Some(pb::KeySource { source: Some(source), refresh_interval: None }),
                ..Default::default()
            })),
        }
    }

    /// The P-256 public key of RFC 7515 appendix A.3.
    const INLINE_JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"static-1",
        "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

    /// A route `/` whose policy accepts the issuers `inline` (one inline key) and `fetched` (keys
    /// from a jwks_uri, none fetched yet).
    fn snapshot() -> Snapshot {
        use pb::resource::Kind as K;
        let resources = vec![
            issuer("fetched", pb::key_source::Source::JwksUri("http://fetched.test/jwks".into())),
            issuer("inline", pb::key_source::Source::InlineJwks(INLINE_JWKS.into())),
            pb::Resource {
                kind: Some(K::Upstream(pb::Upstream {
                    name: "up".into(),
                    endpoints: vec!["127.0.0.1:9".into()],
                    ..Default::default()
                })),
            },
            pb::Resource {
                kind: Some(K::Policy(pb::Policy {
                    name: "p".into(),
                    authentication: Some(pb::Authentication {
                        mode: pb::AuthMode::Required as i32,
                        issuers: vec!["inline".into(), "fetched".into()],
                        ..Default::default()
                    }),
                    ..Default::default()
                })),
            },
            pb::Resource {
                kind: Some(K::Route(pb::Route {
                    name: "r".into(),
                    r#match: Some(pb::RouteMatch {
                        hosts: vec![],
                        methods: vec![],
                        path: Some(pb::PathMatch { kind: Some(pb::path_match::Kind::Prefix("/".into())) }),
                    }),
                    upstream: "up".into(),
                    policy: "p".into(),
                    ..Default::default()
                })),
            },
        ];
        let map: ResourceMap =
            resources.into_iter().map(|r| (Kind::of(&r).map(|(k, n)| (k, n.to_owned())).unwrap(), r)).collect();
        snapshot::compile(1, &map).unwrap()
    }

    /// A token that parses (the signature is never reached: no key has its kid).
    fn token(iss: &str, kid: Option<&str>) -> String {
        let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let mut header = serde_json::json!({"alg": "ES256", "typ": "JWT"});
        if let Some(kid) = kid {
            header["kid"] = kid.into();
        }
        let exp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 600;
        format!("{}.{}.c2ln", b64(header), b64(serde_json::json!({"iss": iss, "aud": "api://test", "exp": exp})))
    }

    /// What the pipeline does: verify through the cache, hand the error to the reporter.
    fn verify_and_report(reporter: &KidReporter, snapshot: &Snapshot, token: &str) -> JwtError {
        let verifiers = &snapshot.route_verifiers[0];
        let error = TokenCache::new(16).verify(verifiers, token, SystemTime::now()).unwrap_err();
        reporter.on_verify_error(snapshot, verifiers, token, &error);
        error
    }

    #[test]
    fn only_fetched_issuers_named_by_the_token_are_reported() {
        let snapshot = snapshot();
        let metrics = Arc::new(Metrics::new());
        let (reporter, mut rx) = channel(Arc::clone(&metrics), SECOND);

        // the inline issuer's token: nothing to refetch
        let e = verify_and_report(&reporter, &snapshot, &token("https://inline.test/", Some("new")));
        assert_eq!(e, JwtError::KidUnknown { kid: Some("new".into()) });
        // no kid, or another error: nothing
        verify_and_report(&reporter, &snapshot, &token("https://fetched.test/", None));
        verify_and_report(&reporter, &snapshot, &token("https://elsewhere.test/", Some("k")));
        assert!(queued(&mut rx).is_empty());

        // the fetched issuer's token: one report, by the Issuer resource's name
        let e = verify_and_report(&reporter, &snapshot, &token("https://fetched.test/", Some("new")));
        assert_eq!(e, JwtError::KidUnknown { kid: Some("new".into()) });
        assert_eq!(queued(&mut rx), [("fetched".to_owned(), "new".to_owned())]);
        // then a flood of other kids within the interval: de-duplicated, nothing queued
        for i in 0..100 {
            verify_and_report(&reporter, &snapshot, &token("https://fetched.test/", Some(&format!("random-{i}"))));
        }
        assert!(queued(&mut rx).is_empty());
        assert_eq!(metrics.unknown_kid_reports().deduplicated(), 100);
        assert_eq!(metrics.unknown_kid_reports().dropped(), 0);

        // disabled: nothing, and no panic
        let e = JwtError::KidUnknown { kid: Some("x".into()) };
        KidReporter::disabled().on_verify_error(&snapshot, &snapshot.route_verifiers[0], "not a token", &e);
    }
}

//! The control plane's view of the configuration: an in-memory [`Index`] kept in step with the
//! store (list at revision R, watch from R+1, re-list after compaction or a lost watch), and the
//! write path that validates every change against the whole configuration before committing it.
//!
//! **Invariant:** nothing invalid is stored. Each write is checked against the index at
//! revision R (field rules, references, route conflicts) and committed with the store's guard
//! "nothing was committed after R", so the check still holds when the write lands; a lost race
//! re-validates against the newer index and tries again.
//!
//! The index is only ever mutated by the sync task; readers take a short, synchronous read
//! lock and never hold it across an `.await`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use portcullis_proto::config::v1 as pb;
use portcullis_shared::config::{self, Reference};
use portcullis_shared::kind::ResourceExt;
use portcullis_shared::model::Resource;
use portcullis_shared::{Kind, Violation, Violations, document};
use prost::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::{AnyStore, CommitError, Entry, Expect, Listing, Op, Store, StoreError, Txn, WatchBatch};

/// How long a writer waits for the index to catch up with the store before giving up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts of one write when other writers keep winning the race. Replicas writing flat out
/// at the same time can starve each other for a few rounds; a jittered pause after each lost
/// race breaks the lockstep.
const WRITE_ATTEMPTS: usize = 32;

// ---------------------------------------------------------------- codec

/// The stored form: the kind's own message, without its revision (that is the store's).
pub fn encode(resource: &pb::Resource) -> Vec<u8> {
    use pb::resource::Kind as K;
    let mut r = resource.clone();
    r.set_revision(0);
    match &r.kind {
        Some(K::Upstream(m)) => m.encode_to_vec(),
        Some(K::Issuer(m)) => m.encode_to_vec(),
        Some(K::Key(m)) => m.encode_to_vec(),
        Some(K::Policy(m)) => m.encode_to_vec(),
        Some(K::Route(m)) => m.encode_to_vec(),
        Some(K::Block(m)) => m.encode_to_vec(),
        None => Vec::new(),
    }
}

pub fn decode(kind: Kind, bytes: &[u8], revision: i64) -> Result<pb::Resource, prost::DecodeError> {
    use pb::resource::Kind as K;
    let kind = match kind {
        Kind::Upstream => K::Upstream(pb::Upstream::decode(bytes)?),
        Kind::Issuer => K::Issuer(pb::Issuer::decode(bytes)?),
        Kind::Key => K::Key(pb::Key::decode(bytes)?),
        Kind::Policy => K::Policy(pb::Policy::decode(bytes)?),
        Kind::Route => K::Route(pb::Route::decode(bytes)?),
        Kind::Block => K::Block(pb::Block::decode(bytes)?),
    };
    let mut r = pb::Resource { kind: Some(kind) };
    r.set_revision(revision);
    Ok(r)
}

// ---------------------------------------------------------------- index

/// One resource as the index holds it.
#[derive(Clone, Debug)]
pub struct IndexEntry {
    /// With `revision` set.
    pub resource: pb::Resource,
    pub revision: i64,
    /// The stored bytes: equal bytes mean an unchanged resource.
    pub value: Vec<u8>,
    pub refs: Vec<Reference>,
    pub route_keys: Vec<String>,
}

impl IndexEntry {
    fn new(kind: Kind, name: &str, value: Vec<u8>, revision: i64) -> Option<IndexEntry> {
        let resource = match decode(kind, &value, revision) {
            Ok(r) => r,
            Err(e) => {
                warn!(resource.kind = %kind, resource.name = name, error = %e, "undecodable value in store; ignored");
                return None;
            }
        };
        let (refs, route_keys) = match Resource::try_from(&resource) {
            Ok(domain) => {
                let keys = match &domain {
                    Resource::Route(r) => config::route_keys(r),
                    _ => Vec::new(),
                };
                (config::references(&domain), keys)
            }
            Err(e) => {
                // Written behind the admin API's back (e.g. etcdctl): keep it visible, flag it.
                warn!(resource.kind = %kind, resource.name = name, error = %e, "invalid resource in store");
                (Vec::new(), Vec::new())
            }
        };
        Some(IndexEntry { resource, revision, value, refs, route_keys })
    }
}

/// The configuration at one store revision. Pure and synchronous: built by `reset` from a
/// listing and moved forward by `apply` for each watched transaction.
#[derive(Debug, Default)]
pub struct Index {
    revision: i64,
    entries: BTreeMap<(Kind, String), IndexEntry>,
    /// Route conflict key (see [`config::route_keys`]) → route name.
    route_keys: HashMap<String, String>,
    /// The keys each recent transaction touched, oldest first: what a proxy at version V needs
    /// is the current value (or removal) of every key touched after V — a delta, O(changes).
    history: VecDeque<(i64, Vec<(Kind, String)>)>,
    /// Deltas can be computed only from versions at or after this one (older: full snapshot).
    history_floor: i64,
}

/// Transactions remembered for deltas; a proxy further behind gets a full snapshot.
const HISTORY_LEN: usize = 4096;

impl Index {
    pub fn revision(&self) -> i64 {
        self.revision
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, kind: Kind, name: &str) -> Option<&IndexEntry> {
        self.entries.get(&(kind, name.to_owned()))
    }

    /// Entries in (kind, name) order; one kind, or all when `kind` is `None`.
    pub fn iter(&self, kind: Option<Kind>) -> impl Iterator<Item = &IndexEntry> {
        self.entries.iter().filter(move |((k, _), _)| kind.is_none_or(|want| *k == want)).map(|(_, e)| e)
    }

    pub fn reset(&mut self, listing: Listing) {
        self.entries.clear();
        self.route_keys.clear();
        for Entry { kind, name, value, revision } in listing.entries {
            self.upsert(kind, name, value, revision);
        }
        self.revision = listing.revision;
        // What changed between the old and the new listing is unknown: everyone re-syncs.
        self.history.clear();
        self.history_floor = listing.revision;
    }

    /// The keys touched after `version` up to the index's revision, deduplicated; `None` when
    /// history no longer reaches back to `version` (the caller sends a full snapshot).
    pub fn touched_since(&self, version: i64) -> Option<Vec<(Kind, String)>> {
        if version < self.history_floor || version > self.revision {
            return None;
        }
        let mut keys: Vec<(Kind, String)> =
            self.history.iter().filter(|(rev, _)| *rev > version).flat_map(|(_, keys)| keys.iter().cloned()).collect();
        keys.sort();
        keys.dedup();
        Some(keys)
    }

    pub fn apply(&mut self, batch: WatchBatch) {
        if batch.revision <= self.revision {
            return; // already seen (a re-list raced with the watch)
        }
        let mut touched = Vec::with_capacity(batch.events.len());
        for ev in batch.events {
            touched.push((ev.kind, ev.name.clone()));
            match ev.value {
                Some(value) => self.upsert(ev.kind, ev.name, value, ev.revision),
                None => self.remove(ev.kind, &ev.name),
            }
        }
        if self.history.len() == HISTORY_LEN
            && let Some((oldest, _)) = self.history.pop_front()
        {
            self.history_floor = oldest;
        }
        self.history.push_back((batch.revision, touched));
        self.revision = batch.revision;
    }

    fn upsert(&mut self, kind: Kind, name: String, value: Vec<u8>, revision: i64) {
        self.remove(kind, &name);
        if let Some(entry) = IndexEntry::new(kind, &name, value, revision) {
            for k in &entry.route_keys {
                self.route_keys.insert(k.clone(), name.clone());
            }
            self.entries.insert((kind, name), entry);
        }
    }

    fn remove(&mut self, kind: Kind, name: &str) {
        if let Some(old) = self.entries.remove(&(kind, name.to_owned())) {
            for k in &old.route_keys {
                if self.route_keys.get(k).is_some_and(|n| n == name) {
                    self.route_keys.remove(k);
                }
            }
        }
    }
}

// ---------------------------------------------------------------- changes

/// One change requested by an operator.
#[derive(Clone, Debug)]
pub enum Change {
    Upsert { resource: Box<pb::Resource>, expected_revision: i64 },
    Delete { kind: Kind, name: String, expected_revision: i64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Create,
    Update,
    Delete,
    Unchanged,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::Unchanged => "unchanged",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub kind: Kind,
    pub name: String,
    pub action: Action,
    /// Dotted spec fields that differ (updates only).
    pub fields: Vec<String>,
}

#[derive(Debug)]
pub struct WriteResult {
    /// The store revision that holds the change (the current one when nothing changed).
    pub revision: i64,
    pub outcomes: Vec<Outcome>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("invalid configuration: {0}")]
    Invalid(Violations),
    #[error("{kind} {name}: {message}")]
    Conflict { kind: Kind, name: String, message: String, current_revision: i64 },
    #[error("{kind} {name} not found")]
    NotFound { kind: Kind, name: String },
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("the configuration is being changed concurrently; retry")]
    Contended,
    /// A transaction the store refused as malformed: a bug here, not bad input.
    #[error("internal error: {0}")]
    Internal(String),
}

/// 0 = any; -1 = must not exist; >0 = must be stored at exactly this revision.
fn check_expected(idx: &Index, kind: Kind, name: &str, expected: i64) -> Result<(), StateError> {
    let current = idx.get(kind, name).map(|e| e.revision);
    let conflict = |message: String| StateError::Conflict {
        kind,
        name: name.to_owned(),
        message,
        current_revision: current.unwrap_or(0),
    };
    match (expected, current) {
        (0, _) => Ok(()),
        (-1, Some(rev)) => Err(conflict(format!("already exists (revision {rev})"))),
        (-1, None) => Ok(()),
        (e, Some(rev)) if e == rev => Ok(()),
        (e, Some(rev)) => Err(conflict(format!("expected revision {e}, stored revision is {rev}"))),
        (e, None) if e > 0 => Err(conflict(format!("expected revision {e}, but it does not exist"))),
        (e, None) => Err(conflict(format!("invalid expected revision {e}"))),
    }
}

/// Dotted paths of the leaves that differ between two JSON documents.
pub fn diff_fields(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    fn walk(a: Option<&serde_json::Value>, b: Option<&serde_json::Value>, path: &str, out: &mut Vec<String>) {
        use serde_json::Value::Object;
        match (a, b) {
            (Some(Object(x)), Some(Object(y))) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    walk(x.get(k), y.get(k), &p, out);
                }
            }
            (x, y) if x != y => out.push(path.to_owned()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(Some(a), Some(b), "", &mut out);
    out
}

/// What a change leaves behind for the whole-configuration checks; `None` in the overlay = deleted.
struct Planned {
    refs: Vec<Reference>,
    route_keys: Vec<String>,
}

struct Plan {
    guard: i64,
    txn: Txn,
    outcomes: Vec<Outcome>,
}

/// Validates `changes` against `idx` and turns them into one transaction.
fn prepare(idx: &Index, changes: &[Change]) -> Result<Plan, StateError> {
    let mut violations = Vec::new();
    // (kind, name) -> new entry, or None when deleted by this plan
    let mut overlay: HashMap<(Kind, String), Option<Planned>> = HashMap::new();
    let mut txn = Txn { guard: Some(idx.revision), ..Txn::default() };
    let mut outcomes = Vec::new();
    let mut seen = HashSet::new();

    for change in changes {
        match change {
            Change::Upsert { resource, expected_revision } => {
                let Some((kind, name)) = resource.kind_name() else {
                    violations.push(Violation {
                        kind: Kind::Route,
                        name: String::new(),
                        field: "kind".into(),
                        message: "a resource must set one of upstream, issuer, key, policy, route, block".into(),
                    });
                    continue;
                };
                let name = name.to_owned();
                if !seen.insert((kind, name.clone())) {
                    violations.push(Violation {
                        kind,
                        name,
                        field: String::new(),
                        message: "appears twice in one request".into(),
                    });
                    continue;
                }
                let domain = match Resource::try_from(resource.as_ref()) {
                    Ok(d) => d,
                    Err(v) => {
                        violations.extend(v.0);
                        continue;
                    }
                };
                check_expected(idx, kind, &name, *expected_revision)?;
                let value = encode(resource);
                let old = idx.get(kind, &name);
                let action = match old {
                    None => Action::Create,
                    Some(e) if e.value == value => Action::Unchanged,
                    Some(_) => Action::Update,
                };
                let fields = match (action, old) {
                    (Action::Update, Some(e)) => {
                        diff_fields(&document::spec_json(&e.resource), &document::spec_json(resource))
                    }
                    _ => Vec::new(),
                };
                let keys = match &domain {
                    Resource::Route(r) => config::route_keys(r),
                    _ => Vec::new(),
                };
                overlay.insert(
                    (kind, name.clone()),
                    Some(Planned { refs: config::references(&domain), route_keys: keys }),
                );
                if action != Action::Unchanged {
                    if let Some(e) = old {
                        txn.expect.push((kind, name.clone(), Expect::Revision(e.revision)));
                    } else {
                        txn.expect.push((kind, name.clone(), Expect::Absent));
                    }
                    txn.ops.push(Op::Put { kind, name: name.clone(), value });
                }
                outcomes.push(Outcome { kind, name, action, fields });
            }
            Change::Delete { kind, name, expected_revision } => {
                let (kind, name) = (*kind, name.clone());
                if !seen.insert((kind, name.clone())) {
                    violations.push(Violation {
                        kind,
                        name,
                        field: String::new(),
                        message: "appears twice in one request".into(),
                    });
                    continue;
                }
                check_expected(idx, kind, &name, *expected_revision)?;
                let Some(e) = idx.get(kind, &name) else {
                    return Err(StateError::NotFound { kind, name });
                };
                txn.expect.push((kind, name.clone(), Expect::Revision(e.revision)));
                txn.ops.push(Op::Delete { kind, name: name.clone() });
                overlay.insert((kind, name.clone()), None);
                outcomes.push(Outcome { kind, name, action: Action::Delete, fields: Vec::new() });
            }
        }
    }

    let exists = |kind: Kind, name: &str| match overlay.get(&(kind, name.to_owned())) {
        Some(state) => state.is_some(),
        None => idx.get(kind, name).is_some(),
    };

    // outgoing references of everything written
    for ((kind, name), state) in &overlay {
        let Some(Planned { refs, .. }) = state else { continue };
        for r in refs {
            if !exists(r.kind, &r.name) {
                violations.push(Violation {
                    kind: *kind,
                    name: name.clone(),
                    field: r.field.clone(),
                    message: format!("{} {:?} does not exist", r.kind, r.name),
                });
            }
        }
    }

    // incoming references of everything deleted
    let deleted: HashSet<(Kind, String)> =
        overlay.iter().filter(|(_, s)| s.is_none()).map(|(key, _)| key.clone()).collect();
    if !deleted.is_empty() {
        let mut users: BTreeMap<(Kind, String), Vec<String>> = BTreeMap::new();
        let mut note = |refs: &[Reference], by_kind: Kind, by_name: &str| {
            for r in refs {
                let target = (r.kind, r.name.clone());
                if deleted.contains(&target) {
                    users.entry(target).or_default().push(format!("{by_kind} {by_name}"));
                }
            }
        };
        for e in idx.iter(None) {
            let Some((k, n)) = e.resource.kind_name() else { continue };
            if !overlay.contains_key(&(k, n.to_owned())) {
                note(&e.refs, k, n);
            }
        }
        for ((k, n), state) in &overlay {
            if let Some(Planned { refs, .. }) = state {
                note(refs, *k, n);
            }
        }
        for ((kind, name), mut by) in users {
            by.sort();
            let more = by.len().saturating_sub(5);
            by.truncate(5);
            let tail = if more > 0 { format!(" and {more} more") } else { String::new() };
            violations.push(Violation {
                kind,
                name,
                field: String::new(),
                message: format!("cannot be deleted: still used by {}{tail}", by.join(", ")),
            });
        }
    }

    // routes that would match exactly the same requests
    let mut planned_keys: HashMap<&str, &str> = HashMap::new();
    for ((kind, name), state) in &overlay {
        let (Kind::Route, Some(Planned { route_keys: keys, .. })) = (kind, state) else { continue };
        for key in keys {
            let other = match idx.route_keys.get(key) {
                Some(other) if other != name && !overlay.contains_key(&(Kind::Route, other.clone())) => {
                    Some(other.as_str())
                }
                _ => planned_keys.insert(key.as_str(), name.as_str()).filter(|o| *o != name),
            };
            if let Some(other) = other {
                violations.push(Violation {
                    kind: Kind::Route,
                    name: name.clone(),
                    field: "match".into(),
                    message: format!("matches exactly the same requests as route {other} ({key})"),
                });
                break;
            }
        }
    }

    if !violations.is_empty() {
        violations.sort_by(|a, b| (a.kind, &a.name, &a.field).cmp(&(b.kind, &b.name, &b.field)));
        violations.dedup();
        return Err(StateError::Invalid(Violations(violations)));
    }
    outcomes.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
    Ok(Plan { guard: idx.revision, txn, outcomes })
}

// ---------------------------------------------------------------- state

/// The configuration as this control-plane replica sees it, and the way to change it.
pub struct ConfigState {
    store: AnyStore,
    index: RwLock<Index>,
    revision_tx: watch::Sender<i64>,
}

impl ConfigState {
    /// Lists the store, builds the index and starts the task that keeps it in step.
    pub async fn start(store: AnyStore, shutdown: CancellationToken) -> Result<Arc<ConfigState>, StoreError> {
        let listing = store.list().await?;
        let from = listing.revision + 1;
        let mut index = Index::default();
        index.reset(listing);
        info!(config.version = index.revision(), resources = index.len(), "configuration loaded");
        let (revision_tx, _) = watch::channel(index.revision());
        let state = Arc::new(ConfigState { store, index: RwLock::new(index), revision_tx });
        let sync = IndexSync { state: Arc::clone(&state) };
        tokio::spawn(sync.run(from, shutdown));
        Ok(state)
    }

    /// A read view of the index. Do not hold it across an `.await`.
    pub fn index(&self) -> RwLockReadGuard<'_, Index> {
        // A poisoned lock means a panic while mutating the index; its data is still the last
        // consistent state we wrote (mutations do not unwind halfway in practice), so read on.
        self.index.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn revision(&self) -> i64 {
        *self.revision_tx.borrow()
    }

    /// Notified with the index revision each time it moves.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.revision_tx.subscribe()
    }

    /// Validates and commits `changes` as one transaction (or, with `dry_run`, only validates
    /// and reports what would change). Returns once this replica's index includes the change.
    pub async fn write(&self, changes: Vec<Change>, dry_run: bool) -> Result<WriteResult, StateError> {
        for attempt in 0..WRITE_ATTEMPTS {
            let plan = prepare(&self.index(), &changes)?;
            if dry_run || plan.txn.ops.is_empty() {
                return Ok(WriteResult { revision: plan.guard, outcomes: plan.outcomes });
            }
            match self.store.commit(plan.txn).await {
                Ok(revision) => {
                    self.wait_for(|r| r >= revision).await?;
                    for o in plan.outcomes.iter().filter(|o| o.action != Action::Unchanged) {
                        info!(resource.kind = %o.kind, resource.name = %o.name, action = o.action.as_str(), config.version = revision, "configuration changed");
                    }
                    return Ok(WriteResult { revision, outcomes: plan.outcomes });
                }
                Err(CommitError::Conflict { current_revision }) => {
                    debug!(attempt, guard = plan.guard, current_revision, "write lost a race; re-validating");
                    // Someone committed after our guard: their batch reaches the index soon.
                    self.wait_for(|r| r > plan.guard).await?;
                    tokio::time::sleep(retry_jitter(attempt)).await;
                }
                Err(CommitError::Store(e)) => return Err(e.into()),
                Err(CommitError::Invalid(m)) => return Err(StateError::Internal(m)),
            }
        }
        Err(StateError::Contended)
    }

    async fn wait_for(&self, pred: impl Fn(i64) -> bool) -> Result<(), StateError> {
        let mut rx = self.revision_tx.subscribe();
        match tokio::time::timeout(CATCH_UP_TIMEOUT, rx.wait_for(|r| pred(*r))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(StateError::Store(StoreError::Unavailable(
                "the configuration index did not catch up with the store in time".into(),
            ))),
        }
    }
}

/// Up to `attempt` ms (capped at 20), from the clock's nanoseconds: enough to desynchronize
/// competing writers without a random-number dependency.
fn retry_jitter(attempt: usize) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let cap_us = (attempt as u64 + 1).min(20) * 1000;
    Duration::from_micros(u64::from(nanos) % cap_us)
}

/// Keeps the index in step with the store: watch from R+1; re-list on compaction or a lost
/// watch. The only writer of the index.
struct IndexSync {
    state: Arc<ConfigState>,
}

impl IndexSync {
    async fn run(self, mut from: i64, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let watched = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.state.store.watch(from) => r,
            };
            match watched {
                Ok(mut rx) => loop {
                    let item = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        item = rx.recv() => item,
                    };
                    match item {
                        Some(Ok(batch)) => {
                            backoff = Duration::from_millis(50);
                            let revision = batch.revision;
                            {
                                let mut idx =
                                    self.state.index.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                                idx.apply(batch);
                            }
                            self.state.revision_tx.send_replace(revision);
                        }
                        Some(Err(e)) => {
                            warn!(error = %e, "config watch ended; re-listing");
                            break;
                        }
                        None => {
                            warn!("config watch closed; re-listing");
                            break;
                        }
                    }
                },
                Err(e) => warn!(error = %e, "config watch failed; re-listing"),
            }
            // Re-list (after compaction, or to be safe after any lost watch) and reset.
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                match self.state.store.list().await {
                    Ok(listing) => {
                        let revision = listing.revision;
                        {
                            let mut idx = self.state.index.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                            idx.reset(listing);
                        }
                        from = revision + 1;
                        self.state.revision_tx.send_replace(revision);
                        info!(config.version = revision, "configuration re-listed");
                        break;
                    }
                    Err(e) => warn!(error = %e, "re-listing the configuration failed; retrying"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Event;
    use portcullis_proto::config::v1 as pb;

    fn upstream(name: &str) -> pb::Resource {
        pb::Resource {
            kind: Some(pb::resource::Kind::Upstream(pb::Upstream {
                name: name.into(),
                endpoints: vec!["127.0.0.1:9000".into()],
                ..Default::default()
            })),
        }
    }

    fn policy(name: &str) -> pb::Resource {
        pb::Resource {
            kind: Some(pb::resource::Kind::Policy(pb::Policy {
                name: name.into(),
                authentication: Some(pb::Authentication {
                    mode: pb::AuthMode::Public as i32,
                    reason: "probe".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })),
        }
    }

    fn route(name: &str, path: &str, upstream: &str, policy: &str) -> pb::Resource {
        pb::Resource {
            kind: Some(pb::resource::Kind::Route(pb::Route {
                name: name.into(),
                r#match: Some(pb::RouteMatch {
                    path: Some(pb::PathMatch { kind: Some(pb::path_match::Kind::Exact(path.into())) }),
                    ..Default::default()
                }),
                upstream: upstream.into(),
                policy: policy.into(),
                ..Default::default()
            })),
        }
    }

    /// An index holding `resources`, each written at its own revision.
    fn index_of(resources: &[pb::Resource]) -> Index {
        let mut idx = Index::default();
        for (i, r) in resources.iter().enumerate() {
            let (kind, name) = r.kind_name().unwrap();
            let rev = i as i64 + 1;
            idx.apply(WatchBatch {
                revision: rev,
                events: vec![Event { kind, name: name.into(), value: Some(encode(r)), revision: rev }],
            });
        }
        idx
    }

    fn up(r: pb::Resource) -> Change {
        Change::Upsert { resource: Box::new(r), expected_revision: 0 }
    }

    /// Runs `prepare` and returns the violations as display strings (empty when accepted).
    fn check(idx: &Index, changes: Vec<Change>) -> Vec<String> {
        match prepare(idx, &changes) {
            Ok(_) => Vec::new(),
            Err(StateError::Invalid(v)) => v.0.iter().map(ToString::to_string).collect(),
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn references_must_resolve() {
        let idx = index_of(&[upstream("orders")]);
        assert_eq!(
            check(&idx, vec![up(route("r1", "/x", "orders", "missing"))]),
            ["route r1: policy: policy \"missing\" does not exist"]
        );
        // the same request may bring what it refers to
        assert!(check(&idx, vec![up(policy("p")), up(route("r1", "/x", "orders", "p"))]).is_empty());
    }

    #[test]
    fn used_resources_cannot_be_deleted() {
        let idx = index_of(&[upstream("orders"), policy("p"), route("r1", "/x", "orders", "p")]);
        let del = |kind, name: &str| Change::Delete { kind, name: name.into(), expected_revision: 0 };
        assert_eq!(check(&idx, vec![del(Kind::Policy, "p")]), ["policy p: cannot be deleted: still used by route r1"]);
        // deleting the user in the same request is fine
        assert!(check(&idx, vec![del(Kind::Policy, "p"), del(Kind::Route, "r1")]).is_empty());
        // re-pointing the user away in the same request is fine
        assert!(
            check(&idx, vec![del(Kind::Policy, "p"), up(policy("q")), up(route("r1", "/x", "orders", "q"))]).is_empty()
        );
    }

    #[test]
    fn identical_routes_conflict() {
        let idx = index_of(&[upstream("orders"), policy("p"), route("r1", "/x", "orders", "p")]);
        assert_eq!(
            check(&idx, vec![up(route("r2", "/x", "orders", "p"))]),
            ["route r2: match: matches exactly the same requests as route r1 (* * exact:/x)"]
        );
        // moving r1 away in the same request frees the path
        assert!(
            check(&idx, vec![up(route("r1", "/y", "orders", "p")), up(route("r2", "/x", "orders", "p"))]).is_empty()
        );
        // updating r1 itself does not conflict with its old self
        assert!(check(&idx, vec![up(route("r1", "/x", "orders", "p"))]).is_empty());
    }

    #[test]
    fn expected_revisions() {
        let idx = index_of(&[upstream("orders")]);
        let put = |rev| Change::Upsert { resource: Box::new(upstream("orders")), expected_revision: rev };
        assert!(prepare(&idx, &[put(1)]).is_ok());
        assert!(matches!(prepare(&idx, &[put(2)]), Err(StateError::Conflict { current_revision: 1, .. })));
        assert!(matches!(prepare(&idx, &[put(-1)]), Err(StateError::Conflict { .. })));
    }

    #[test]
    fn unchanged_resources_are_not_written() {
        let idx = index_of(&[upstream("orders")]);
        let plan = prepare(&idx, &[up(upstream("orders"))]).unwrap();
        assert!(plan.txn.ops.is_empty());
        assert_eq!(plan.outcomes[0].action, Action::Unchanged);
        assert_eq!(plan.txn.guard, Some(1));
    }

    #[test]
    fn deltas_come_from_history_until_it_runs_out() {
        let mut idx = index_of(&[upstream("a"), upstream("b"), upstream("c")]);
        assert_eq!(idx.touched_since(3), Some(vec![]));
        assert_eq!(idx.touched_since(1), Some(vec![(Kind::Upstream, "b".into()), (Kind::Upstream, "c".into())]));
        assert_eq!(
            idx.touched_since(0),
            Some(vec![(Kind::Upstream, "a".into()), (Kind::Upstream, "b".into()), (Kind::Upstream, "c".into())])
        );
        assert_eq!(idx.touched_since(4), None, "a version from the future needs a full snapshot");
        for rev in 4..(4 + HISTORY_LEN as i64) {
            idx.apply(WatchBatch {
                revision: rev,
                events: vec![Event { kind: Kind::Upstream, name: "a".into(), value: None, revision: rev }],
            });
        }
        assert_eq!(idx.touched_since(1), None, "history no longer reaches version 1");
        assert_eq!(idx.touched_since(idx.revision() - 1), Some(vec![(Kind::Upstream, "a".into())]));
        idx.reset(Listing { revision: 100_000, entries: vec![] });
        assert_eq!(idx.touched_since(idx.revision() - 1), None, "after a re-list only full snapshots");
        assert_eq!(idx.touched_since(100_000), Some(vec![]));
    }

    #[test]
    fn diff_names_leaf_fields() {
        let a = serde_json::json!({"match": {"path": {"exact": "/a"}, "methods": ["GET"]}, "upstream": "u"});
        let b =
            serde_json::json!({"match": {"path": {"exact": "/b"}, "methods": ["GET"]}, "policy": "p", "upstream": "u"});
        assert_eq!(diff_fields(&a, &b), ["match.path.exact", "policy"]);
    }

    #[test]
    fn index_tracks_route_keys_through_updates_and_deletes() {
        let mut idx = index_of(&[upstream("orders"), policy("p"), route("r1", "/x", "orders", "p")]);
        assert_eq!(idx.route_keys.get("* * exact:/x").map(String::as_str), Some("r1"));
        let r1 = route("r1", "/y", "orders", "p");
        idx.apply(WatchBatch {
            revision: 10,
            events: vec![Event { kind: Kind::Route, name: "r1".into(), value: Some(encode(&r1)), revision: 10 }],
        });
        assert!(!idx.route_keys.contains_key("* * exact:/x"));
        idx.apply(WatchBatch {
            revision: 11,
            events: vec![Event { kind: Kind::Route, name: "r1".into(), value: None, revision: 11 }],
        });
        assert!(idx.route_keys.is_empty());
        assert_eq!(idx.revision(), 11);
        // a stale batch is ignored
        idx.apply(WatchBatch { revision: 5, events: vec![] });
        assert_eq!(idx.revision(), 11);
    }
}

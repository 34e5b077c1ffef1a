//! The `Store` contract: one set of scenarios, generic over `S: Store`, run against the embedded
//! store (a temp dir) and against a real etcd (a fresh `EtcdServer` per test), plus the
//! behaviours only one of them has: the embedded store's durability across reopen and its
//! bounded history, etcd restarts under an open watch, two replicas on one etcd, and etcd's
//! size limits.
//!
//! Watch receipts are awaited under a timeout; nothing here sleeps to synchronise.

use std::time::Duration;

use portcullis_control_plane::store::embedded::{EmbeddedOptions, EmbeddedStore};
use portcullis_control_plane::store::etcd::EtcdStore;
use portcullis_control_plane::store::{
    CommitError, Entry, Event, Expect, Op, Store, StoreError, Txn, WatchBatch, WatchReceiver,
};
use portcullis_shared::Kind;
use portcullis_tests::etcd::EtcdServer;
use tempfile::TempDir;

const RECV_TIMEOUT: Duration = Duration::from_secs(20);

// ---- helpers ------------------------------------------------------------------------------------

fn put(kind: Kind, name: &str, value: &[u8]) -> Op {
    Op::Put { kind, name: name.to_owned(), value: value.to_vec() }
}

fn del(kind: Kind, name: &str) -> Op {
    Op::Delete { kind, name: name.to_owned() }
}

fn ops(ops: Vec<Op>) -> Txn {
    Txn { ops, ..Txn::default() }
}

fn entry(kind: Kind, name: &str, value: &[u8], revision: i64) -> Entry {
    Entry { kind, name: name.to_owned(), value: value.to_vec(), revision }
}

fn event(kind: Kind, name: &str, value: Option<&[u8]>, revision: i64) -> Event {
    Event { kind, name: name.to_owned(), value: value.map(<[u8]>::to_vec), revision }
}

async fn commit<S: Store>(store: &S, txn: Txn) -> i64 {
    store.commit(txn).await.expect("commit")
}

async fn next_batch(rx: &mut WatchReceiver) -> WatchBatch {
    match tokio::time::timeout(RECV_TIMEOUT, rx.recv()).await {
        Ok(Some(Ok(batch))) => batch,
        other => panic!("expected a watch batch, got {other:?}"),
    }
}

fn assert_conflict(result: Result<i64, CommitError>, current: i64) {
    match result {
        Err(CommitError::Conflict { current_revision }) => assert_eq!(current_revision, current),
        other => panic!("expected a conflict at revision {current}, got {other:?}"),
    }
}

/// A compacted start is either refused by `watch` or reported as the first (and last) message.
async fn assert_watch_compacted<S: Store>(store: &S, from: i64) {
    match store.watch(from).await {
        Err(StoreError::Compacted { requested, compact_revision }) => {
            assert_eq!(requested, from);
            assert!(compact_revision > from, "compact revision {compact_revision} <= {from}");
        }
        Err(e) => panic!("expected compacted, got {e}"),
        Ok(mut rx) => {
            match tokio::time::timeout(RECV_TIMEOUT, rx.recv()).await {
                Ok(Some(Err(StoreError::Compacted { requested, compact_revision }))) => {
                    assert_eq!(requested, from);
                    assert!(compact_revision > from, "compact revision {compact_revision} <= {from}");
                }
                other => panic!("expected compacted, got {other:?}"),
            }
            let end = tokio::time::timeout(RECV_TIMEOUT, rx.recv()).await;
            assert!(matches!(end, Ok(None)), "nothing may follow the error, got {end:?}");
        }
    }
}

// ---- backends -----------------------------------------------------------------------------------

struct Embedded {
    _dir: TempDir,
    store: EmbeddedStore,
}

fn embedded() -> Embedded {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(dir.path()).expect("open embedded store");
    Embedded { _dir: dir, store }
}

struct Etcd {
    server: EtcdServer,
    store: EtcdStore,
}

async fn etcd() -> Etcd {
    let server = EtcdServer::start().await.expect("start etcd");
    let store = EtcdStore::connect(&[server.endpoint()]).await.expect("connect to etcd");
    Etcd { server, store }
}

/// Runs each generic scenario once per backend.
macro_rules! contract {
    ($($scenario:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let backend = super::embedded();
                    super::$scenario(&backend.store).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let backend = super::etcd().await;
                    super::$scenario(&backend.store).await;
                }
            )*
        }
    };
}

contract!(
    round_trip,
    revisions_increase,
    expect_absent_and_revision,
    guard,
    txn_is_all_or_nothing,
    delete,
    duplicate_keys_are_refused,
    list_then_watch,
    watch_replays_from_an_earlier_revision,
    large_txn,
    big_values,
);

// ---- generic scenarios --------------------------------------------------------------------------

async fn round_trip<S: Store>(store: &S) {
    let empty = store.list().await.unwrap();
    assert!(empty.entries.is_empty());

    let r1 = commit(store, ops(vec![put(Kind::Route, "orders", b"v1"), put(Kind::Upstream, "backend", b"u1")])).await;
    assert!(r1 > empty.revision);
    assert_eq!(store.get(Kind::Route, "orders").await.unwrap(), Some(entry(Kind::Route, "orders", b"v1", r1)));
    assert_eq!(store.get(Kind::Route, "missing").await.unwrap(), None);
    assert_eq!(store.get(Kind::Policy, "orders").await.unwrap(), None);

    let listing = store.list().await.unwrap();
    assert_eq!(listing.revision, r1);
    // Ordered by kind (dependency order), then name.
    assert_eq!(listing.entries, [entry(Kind::Upstream, "backend", b"u1", r1), entry(Kind::Route, "orders", b"v1", r1)]);

    let r2 = commit(store, ops(vec![put(Kind::Route, "orders", b"v2")])).await;
    assert!(r2 > r1);
    assert_eq!(store.get(Kind::Route, "orders").await.unwrap(), Some(entry(Kind::Route, "orders", b"v2", r2)));
    let listing = store.list().await.unwrap();
    assert_eq!(listing.revision, r2);
    assert_eq!(listing.entries, [entry(Kind::Upstream, "backend", b"u1", r1), entry(Kind::Route, "orders", b"v2", r2)]);
}

async fn revisions_increase<S: Store>(store: &S) {
    let mut last = store.list().await.unwrap().revision;
    for i in 0..10 {
        let name = format!("r{}", i % 3);
        let revision = commit(store, ops(vec![put(Kind::Route, &name, format!("{i}").as_bytes())])).await;
        assert!(revision > last, "revision {revision} after {last}");
        last = revision;
    }
    assert_eq!(store.list().await.unwrap().revision, last);
}

async fn expect_absent_and_revision<S: Store>(store: &S) {
    let create = |value: &[u8]| Txn {
        expect: vec![(Kind::Route, "a".into(), Expect::Absent)],
        ops: vec![put(Kind::Route, "a", value)],
        ..Txn::default()
    };
    let update = |revision: i64, value: &[u8]| Txn {
        expect: vec![(Kind::Route, "a".into(), Expect::Revision(revision))],
        ops: vec![put(Kind::Route, "a", value)],
        ..Txn::default()
    };

    let r1 = commit(store, create(b"v1")).await;
    assert_conflict(store.commit(create(b"v2")).await, r1);
    assert_eq!(store.get(Kind::Route, "a").await.unwrap(), Some(entry(Kind::Route, "a", b"v1", r1)));

    assert_conflict(store.commit(update(r1 + 100, b"v2")).await, r1);
    assert_conflict(store.commit(update(r1 - 1, b"v2")).await, r1);
    assert_eq!(store.get(Kind::Route, "a").await.unwrap(), Some(entry(Kind::Route, "a", b"v1", r1)));

    let r2 = commit(store, update(r1, b"v2")).await;
    assert_eq!(store.get(Kind::Route, "a").await.unwrap(), Some(entry(Kind::Route, "a", b"v2", r2)));
    // The stale etag no longer matches.
    assert_conflict(store.commit(update(r1, b"v3")).await, r2);

    // A revision precondition on a missing key fails; an absent one on it passes.
    let missing = Txn {
        expect: vec![(Kind::Route, "b".into(), Expect::Revision(r1))],
        ops: vec![put(Kind::Route, "b", b"b1")],
        ..Txn::default()
    };
    assert_conflict(store.commit(missing).await, r2);
    assert_eq!(store.get(Kind::Route, "b").await.unwrap(), None);
    assert_eq!(store.list().await.unwrap().revision, r2, "a conflict writes nothing");

    // The same name under another kind is another key.
    let other_kind = Txn {
        expect: vec![(Kind::Policy, "a".into(), Expect::Absent)],
        ops: vec![put(Kind::Policy, "a", b"p")],
        ..Txn::default()
    };
    assert!(commit(store, other_kind).await > r2);
}

async fn guard<S: Store>(store: &S) {
    let base = store.list().await.unwrap().revision;
    let guarded =
        |guard: i64, name: &str| Txn { guard: Some(guard), ops: vec![put(Kind::Route, name, b"v")], ..Txn::default() };

    let r1 = commit(store, guarded(base, "a")).await;
    // Validated as of `base`, but r1 was committed since.
    assert_conflict(store.commit(guarded(base, "b")).await, r1);
    assert_eq!(store.get(Kind::Route, "b").await.unwrap(), None);
    assert_eq!(store.list().await.unwrap().revision, r1);

    let r2 = commit(store, guarded(r1, "b")).await;
    assert!(r2 > r1);
    assert_eq!(store.get(Kind::Route, "b").await.unwrap(), Some(entry(Kind::Route, "b", b"v", r2)));

    // An unguarded commit moves the guard too.
    let r3 = commit(store, ops(vec![put(Kind::Upstream, "u", b"u")])).await;
    assert_conflict(store.commit(guarded(r2, "c")).await, r3);
    assert!(commit(store, guarded(r3, "c")).await > r3);
}

async fn txn_is_all_or_nothing<S: Store>(store: &S) {
    let r1 = commit(store, ops(vec![put(Kind::Route, "a", b"a1")])).await;
    let writes = || vec![put(Kind::Route, "x", b"x1"), put(Kind::Upstream, "y", b"y1"), del(Kind::Route, "a")];

    // One failing precondition among passing ones.
    let failing = Txn {
        expect: vec![(Kind::Upstream, "y".into(), Expect::Absent), (Kind::Route, "a".into(), Expect::Revision(r1 + 7))],
        ops: writes(),
        ..Txn::default()
    };
    assert_conflict(store.commit(failing).await, r1);
    // A failing guard with passing preconditions.
    let stale_guard =
        Txn { guard: Some(r1 - 1), expect: vec![(Kind::Route, "a".into(), Expect::Revision(r1))], ops: writes() };
    assert_conflict(store.commit(stale_guard).await, r1);

    let listing = store.list().await.unwrap();
    assert_eq!(listing.revision, r1);
    assert_eq!(listing.entries, [entry(Kind::Route, "a", b"a1", r1)]);

    let passing = Txn {
        guard: Some(r1),
        expect: vec![(Kind::Upstream, "y".into(), Expect::Absent), (Kind::Route, "a".into(), Expect::Revision(r1))],
        ops: writes(),
    };
    let r2 = commit(store, passing).await;
    let listing = store.list().await.unwrap();
    assert_eq!(listing.revision, r2);
    assert_eq!(listing.entries, [entry(Kind::Upstream, "y", b"y1", r2), entry(Kind::Route, "x", b"x1", r2)]);
}

async fn delete<S: Store>(store: &S) {
    let r1 = commit(store, ops(vec![put(Kind::Route, "a", b"a"), put(Kind::Route, "b", b"b")])).await;
    let r2 = commit(store, ops(vec![del(Kind::Route, "a")])).await;
    assert!(r2 > r1);
    assert_eq!(store.get(Kind::Route, "a").await.unwrap(), None);
    let listing = store.list().await.unwrap();
    assert_eq!(listing.revision, r2);
    assert_eq!(listing.entries, [entry(Kind::Route, "b", b"b", r1)]);

    // Deleting what is not there is a committed no-op.
    let r3 = commit(store, ops(vec![del(Kind::Route, "never")])).await;
    assert!(r3 > r2);
    let listing = store.list().await.unwrap();
    assert_eq!(listing.revision, r3);
    assert_eq!(listing.entries, [entry(Kind::Route, "b", b"b", r1)]);

    // Delete with a precondition.
    let stale = Txn {
        expect: vec![(Kind::Route, "b".into(), Expect::Revision(r2))],
        ops: vec![del(Kind::Route, "b")],
        ..Txn::default()
    };
    assert_conflict(store.commit(stale).await, r3);
    let current = Txn {
        expect: vec![(Kind::Route, "b".into(), Expect::Revision(r1))],
        ops: vec![del(Kind::Route, "b")],
        ..Txn::default()
    };
    let r4 = commit(store, current).await;
    let listing = store.list().await.unwrap();
    assert_eq!(listing.revision, r4);
    assert!(listing.entries.is_empty());
}

async fn duplicate_keys_are_refused<S: Store>(store: &S) {
    let before = store.list().await.unwrap().revision;
    let twice = ops(vec![put(Kind::Route, "a", b"1"), del(Kind::Route, "a")]);
    match store.commit(twice).await {
        Err(CommitError::Invalid(message)) => assert!(message.contains("route/a"), "{message}"),
        other => panic!("expected an invalid transaction, got {other:?}"),
    }
    assert_eq!(store.list().await.unwrap().revision, before);
    // The same name under two kinds is fine.
    commit(store, ops(vec![put(Kind::Route, "a", b"1"), put(Kind::Policy, "a", b"2")])).await;
}

async fn list_then_watch<S: Store>(store: &S) {
    commit(store, ops(vec![put(Kind::Route, "a", b"a1"), put(Kind::Route, "b", b"b1")])).await;
    let listing = store.list().await.unwrap();
    let mut rx = store.watch(listing.revision + 1).await.unwrap();

    let c1 = commit(store, ops(vec![put(Kind::Route, "c", b"c1"), put(Kind::Upstream, "u", b"u1")])).await;
    let c2 = commit(store, ops(vec![del(Kind::Route, "a")])).await;
    // Changes no resource: it takes a revision but yields no batch.
    let empty = commit(store, ops(vec![del(Kind::Route, "never")])).await;
    let c3 = commit(store, ops(vec![put(Kind::Route, "b", b"b2"), del(Kind::Upstream, "u")])).await;
    assert!(listing.revision < c1 && c1 < c2 && c2 < empty && empty < c3);

    assert_eq!(
        next_batch(&mut rx).await,
        WatchBatch {
            revision: c1,
            events: vec![event(Kind::Route, "c", Some(b"c1"), c1), event(Kind::Upstream, "u", Some(b"u1"), c1)],
        }
    );
    assert_eq!(next_batch(&mut rx).await, WatchBatch { revision: c2, events: vec![event(Kind::Route, "a", None, c2)] });
    assert_eq!(
        next_batch(&mut rx).await,
        WatchBatch {
            revision: c3,
            events: vec![event(Kind::Route, "b", Some(b"b2"), c3), event(Kind::Upstream, "u", None, c3)],
        }
    );
    // Nothing else was queued: the next batch is the next commit.
    let c4 = commit(store, ops(vec![put(Kind::Block, "z", b"z1")])).await;
    assert_eq!(
        next_batch(&mut rx).await,
        WatchBatch { revision: c4, events: vec![event(Kind::Block, "z", Some(b"z1"), c4)] }
    );

    // Applying the batches to the listing gives the state at c4.
    let now = store.list().await.unwrap();
    assert_eq!(now.revision, c4);
    assert_eq!(
        now.entries,
        [entry(Kind::Route, "b", b"b2", c3), entry(Kind::Route, "c", b"c1", c1), entry(Kind::Block, "z", b"z1", c4)]
    );
}

async fn watch_replays_from_an_earlier_revision<S: Store>(store: &S) {
    let r1 = commit(store, ops(vec![put(Kind::Route, "a", b"1")])).await;
    let r2 = commit(store, ops(vec![put(Kind::Route, "a", b"2")])).await;
    let r3 = commit(store, ops(vec![del(Kind::Route, "a")])).await;

    let mut rx = store.watch(r2).await.unwrap();
    assert_eq!(
        next_batch(&mut rx).await,
        WatchBatch { revision: r2, events: vec![event(Kind::Route, "a", Some(b"2"), r2)] }
    );
    assert_eq!(next_batch(&mut rx).await, WatchBatch { revision: r3, events: vec![event(Kind::Route, "a", None, r3)] });

    let mut from_start = store.watch(r1).await.unwrap();
    for (revision, value) in [(r1, Some(&b"1"[..])), (r2, Some(b"2")), (r3, None)] {
        assert_eq!(
            next_batch(&mut from_start).await,
            WatchBatch { revision, events: vec![event(Kind::Route, "a", value, revision)] }
        );
    }

    // A watch from the future waits for it.
    let mut ahead = store.watch(r3 + 2).await.unwrap();
    let r4 = commit(store, ops(vec![put(Kind::Route, "b", b"1")])).await;
    let r5 = commit(store, ops(vec![put(Kind::Route, "c", b"1")])).await;
    assert_eq!(r5, r3 + 2, "one revision per commit");
    assert_eq!(next_batch(&mut ahead).await.revision, r5);
    assert_eq!(next_batch(&mut rx).await.revision, r4);
    assert_eq!(next_batch(&mut rx).await.revision, r5);
}

async fn large_txn<S: Store>(store: &S) {
    const N: usize = 10_000;
    let value = |i: usize| -> Vec<u8> { format!("{i:05}").bytes().cycle().take(200).collect() };
    let name = |i: usize| format!("route-{i:05}");

    let before = store.list().await.unwrap().revision;
    let mut rx = store.watch(before + 1).await.unwrap();
    let revision = commit(store, ops((0..N).map(|i| put(Kind::Route, &name(i), &value(i))).collect())).await;

    let batch = next_batch(&mut rx).await;
    assert_eq!(batch.revision, revision);
    assert_eq!(batch.events.len(), N, "one transaction, one batch");
    for (i, e) in batch.events.iter().enumerate() {
        assert_eq!(*e, Event { kind: Kind::Route, name: name(i), value: Some(value(i)), revision });
    }

    let listing = store.list().await.unwrap();
    assert_eq!(listing.revision, revision);
    assert_eq!(listing.entries.len(), N);
    for (i, e) in listing.entries.iter().enumerate() {
        assert_eq!(*e, Entry { kind: Kind::Route, name: name(i), value: value(i), revision });
    }

    // And all of it deleted in one transaction is one batch of deletes.
    let deleted = commit(store, ops((0..N).map(|i| del(Kind::Route, &name(i))).collect())).await;
    let batch = next_batch(&mut rx).await;
    assert_eq!(batch.revision, deleted);
    assert_eq!(batch.events.len(), N);
    assert!(batch.events.iter().all(|e| e.value.is_none()));
    assert!(store.list().await.unwrap().entries.is_empty());
}

/// 2,000 values of 4 KiB: one watch response and one list page are each over tonic's default
/// 4 MiB decode limit.
async fn big_values<S: Store>(store: &S) {
    const N: usize = 2_000;
    let value = |i: usize| -> Vec<u8> { format!("{i:04}").bytes().cycle().take(4096).collect() };
    let name = |i: usize| format!("key-{i:04}");

    let before = store.list().await.unwrap().revision;
    let mut rx = store.watch(before + 1).await.unwrap();
    let revision = commit(store, ops((0..N).map(|i| put(Kind::Key, &name(i), &value(i))).collect())).await;

    let batch = next_batch(&mut rx).await;
    assert_eq!(batch.revision, revision);
    assert_eq!(batch.events.len(), N);
    assert!(
        batch.events.iter().enumerate().all(|(i, e)| e.name == name(i) && e.value.as_deref() == Some(&value(i)[..]))
    );

    let listing = store.list().await.unwrap();
    assert_eq!(listing.revision, revision);
    assert_eq!(listing.entries.len(), N);
    assert!(listing.entries.iter().enumerate().all(|(i, e)| e.name == name(i) && e.value == value(i)));
}

// ---- embedded only ------------------------------------------------------------------------------

#[tokio::test]
async fn embedded_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let r1 = commit(&store, ops(vec![put(Kind::Route, "a", b"a1"), put(Kind::Upstream, "u", b"u1")])).await;
    assert_eq!(r1, 1, "the first commit is revision 1");
    let r2 = commit(&store, ops(vec![del(Kind::Route, "a"), put(Kind::Route, "b", b"b1")])).await;
    let before = store.list().await.unwrap();
    drop(store);

    let store = EmbeddedStore::open(dir.path()).unwrap();
    let after = store.list().await.unwrap();
    assert_eq!(after.revision, r2);
    assert_eq!(after.entries, before.entries);

    // The history is rebuilt from the log: a watcher can still start at r1.
    let mut rx = store.watch(r1).await.unwrap();
    assert_eq!(
        next_batch(&mut rx).await,
        WatchBatch {
            revision: r1,
            events: vec![event(Kind::Route, "a", Some(b"a1"), r1), event(Kind::Upstream, "u", Some(b"u1"), r1)],
        }
    );
    assert_eq!(
        next_batch(&mut rx).await,
        WatchBatch {
            revision: r2,
            events: vec![event(Kind::Route, "a", None, r2), event(Kind::Route, "b", Some(b"b1"), r2)],
        }
    );

    let r3 = commit(&store, ops(vec![put(Kind::Route, "c", b"c1")])).await;
    assert_eq!(r3, r2 + 1, "revisions continue above the reopened one");
    assert_eq!(next_batch(&mut rx).await.revision, r3);
    drop(rx);
    drop(store);

    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(store.list().await.unwrap().revision, r3);
    assert_eq!(store.get(Kind::Route, "c").await.unwrap(), Some(entry(Kind::Route, "c", b"c1", r3)));
}

#[tokio::test]
async fn embedded_watch_before_history_is_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions { history: 3, ..EmbeddedOptions::default() };
    let store = EmbeddedStore::open_with(dir.path(), options).unwrap();
    let mut revisions = Vec::new();
    for i in 0..6 {
        revisions.push(commit(&store, ops(vec![put(Kind::Route, &format!("r{i}"), b"v")])).await);
    }
    assert_watch_compacted(&store, revisions[0]).await;
    assert_watch_compacted(&store, revisions[2]).await;

    let mut rx = store.watch(revisions[3]).await.unwrap();
    for &revision in &revisions[3..] {
        assert_eq!(next_batch(&mut rx).await.revision, revision);
    }
}

#[tokio::test]
async fn embedded_slow_watcher_is_told_it_lagged() {
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions { history: 3, ..EmbeddedOptions::default() };
    let store = EmbeddedStore::open_with(dir.path(), options).unwrap();
    let mut rx = store.watch(1).await.unwrap();
    // Far more commits than the channel plus the history hold, while nobody reads.
    let mut last = 0;
    for i in 0..200 {
        last = commit(&store, ops(vec![put(Kind::Route, &format!("r{i}"), b"v")])).await;
    }

    // Every batch received is the next one, then the lag is reported, then nothing.
    let mut expected = 1;
    loop {
        match tokio::time::timeout(RECV_TIMEOUT, rx.recv()).await {
            Ok(Some(Ok(batch))) => {
                assert_eq!(batch.revision, expected);
                expected += 1;
            }
            Ok(Some(Err(StoreError::Compacted { requested, compact_revision }))) => {
                assert_eq!(requested, expected);
                assert!(compact_revision > expected && compact_revision <= last);
                break;
            }
            other => panic!("expected a batch or compacted, got {other:?}"),
        }
    }
    assert!(expected < last, "the watcher must have lagged");
    assert!(matches!(tokio::time::timeout(RECV_TIMEOUT, rx.recv()).await, Ok(None)));
}

// ---- etcd only ----------------------------------------------------------------------------------

async fn etcd_client(server: &EtcdServer) -> etcd_client::Client {
    etcd_client::Client::connect([server.endpoint()], None).await.expect("etcd client")
}

#[tokio::test]
async fn etcd_watch_from_compacted_revision() {
    let Etcd { server, store } = etcd().await;
    let mut revisions = Vec::new();
    for i in 0..6 {
        revisions.push(commit(&store, ops(vec![put(Kind::Route, &format!("r{i}"), b"v")])).await);
    }
    etcd_client(&server).await.compact(revisions[3], None).await.expect("compact");

    assert_watch_compacted(&store, revisions[0]).await;
    assert_watch_compacted(&store, revisions[2]).await;
    let mut rx = store.watch(revisions[3]).await.unwrap();
    for &revision in &revisions[3..] {
        assert_eq!(next_batch(&mut rx).await.revision, revision);
    }
    // The listing is unaffected by compaction.
    assert_eq!(store.list().await.unwrap().entries.len(), 6);
}

/// Commits, retrying while the client reconnects after an etcd restart. `Expect::Absent` makes
/// a retry after a lost-but-applied attempt fail loudly instead of committing twice.
async fn commit_after_restart(store: &EtcdStore, name: &str) -> i64 {
    let txn = Txn {
        expect: vec![(Kind::Route, name.into(), Expect::Absent)],
        ops: vec![put(Kind::Route, name, b"v")],
        ..Txn::default()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match store.commit(txn.clone()).await {
            Ok(revision) => return revision,
            Err(CommitError::Store(StoreError::Unavailable(e))) if tokio::time::Instant::now() < deadline => {
                eprintln!("commit after restart: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("commit after restart: {e}"),
        }
    }
}

#[tokio::test]
async fn etcd_restart_under_an_open_watch() {
    let Etcd { mut server, store } = etcd().await;
    commit(&store, ops(vec![put(Kind::Route, "before", b"v")])).await;
    let listing = store.list().await.unwrap();
    let mut rx = store.watch(listing.revision + 1).await.unwrap();
    let c1 = commit(&store, ops(vec![put(Kind::Route, "c1", b"v")])).await;
    assert_eq!(next_batch(&mut rx).await.revision, c1);

    for round in 0..2 {
        server.stop().await.unwrap();
        match store.commit(ops(vec![put(Kind::Route, "while-down", b"v")])).await {
            Err(CommitError::Store(StoreError::Unavailable(_))) => {}
            other => panic!("expected unavailable while etcd is down, got {other:?}"),
        }
        server.start_again().await.unwrap();

        let c2 = commit_after_restart(&store, &format!("after-{round}")).await;
        let c3 = commit(&store, ops(vec![put(Kind::Route, &format!("next-{round}"), b"v")])).await;
        // Resumed after the last delivered batch: nothing repeated, nothing missed.
        let batch = next_batch(&mut rx).await;
        assert_eq!(batch.revision, c2, "{batch:?}");
        assert_eq!(batch.events, [event(Kind::Route, &format!("after-{round}"), Some(b"v"), c2)]);
        assert_eq!(next_batch(&mut rx).await.revision, c3);
    }
    assert_eq!(store.get(Kind::Route, "while-down").await.unwrap(), None);
}

#[tokio::test]
async fn etcd_two_replicas_see_each_other() {
    let Etcd { server, store: a } = etcd().await;
    let b = EtcdStore::connect(&[server.endpoint()]).await.unwrap();

    let view = b.list().await.unwrap().revision;
    let mut rx = b.watch(view + 1).await.unwrap();
    let r1 = commit(&a, ops(vec![put(Kind::Route, "from-a", b"a")])).await;
    assert_eq!(
        next_batch(&mut rx).await,
        WatchBatch { revision: r1, events: vec![event(Kind::Route, "from-a", Some(b"a"), r1)] }
    );
    assert_eq!(b.get(Kind::Route, "from-a").await.unwrap(), Some(entry(Kind::Route, "from-a", b"a", r1)));

    // b validated as of r1; a commits in between; b's guarded commit must fail.
    let r2 = commit(&a, ops(vec![put(Kind::Route, "again-a", b"a")])).await;
    let guarded = Txn { guard: Some(r1), ops: vec![put(Kind::Route, "from-b", b"b")], ..Txn::default() };
    assert_conflict(b.commit(guarded).await, r2);
    assert_eq!(next_batch(&mut rx).await.revision, r2);
    let guarded = Txn { guard: Some(r2), ops: vec![put(Kind::Route, "from-b", b"b")], ..Txn::default() };
    let r3 = commit(&b, guarded).await;
    assert_eq!(next_batch(&mut rx).await.revision, r3);
    assert_eq!(a.list().await.unwrap().entries.len(), 3);
}

#[tokio::test]
async fn etcd_limits_are_reported_as_too_large() {
    let Etcd { server: _server, store } = etcd().await;
    let before = store.list().await.unwrap().revision;

    // More operations than --max-txn-ops=100000 allows.
    let many = ops((0..100_000).map(|i| put(Kind::Route, &format!("r{i}"), b"")).collect());
    match store.commit(many).await {
        Err(CommitError::Store(StoreError::TooLarge(message))) => {
            assert!(message.contains("--max-txn-ops"), "{message}")
        }
        other => panic!("expected too large, got {other:?}"),
    }

    // A request over --max-request-bytes=64 MiB.
    let big = ops(vec![put(Kind::Key, "huge", &vec![7u8; 65 << 20])]);
    match store.commit(big).await {
        Err(CommitError::Store(StoreError::TooLarge(message))) => {
            assert!(message.contains("--max-request-bytes"), "{message}")
        }
        other => panic!("expected too large, got {other:?}"),
    }
    assert_eq!(store.list().await.unwrap().revision, before, "nothing was written");
}

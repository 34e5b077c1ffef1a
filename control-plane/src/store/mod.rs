//! The configuration store: where resources live, versioned by one monotonically increasing
//! revision. Two implementations pass the same contract suite (`tests/tests/store_contract.rs`):
//! [`etcd::EtcdStore`] (production; the revision is etcd's) and [`embedded::EmbeddedStore`]
//! (the all-in-one default: one node, durable on disk, no etcd).
//!
//! The store knows nothing of validation: it stores what the [`crate::state`] layer hands it,
//! as protobuf bytes under `/portcullis/v1/<kind>/<name>`, and reports every committed
//! transaction to watchers as one [`WatchBatch`], in revision order, none missed or repeated.
//!
//! **Invariant:** a [`Txn`] is applied whole or not at all, and watchers see it as one batch.

pub mod embedded;
pub mod etcd;

use std::future::Future;

use portcullis_shared::Kind;
use tokio::sync::mpsc;

/// Root of every key: `/portcullis/v1/<kind>/<name>`.
pub const PREFIX: &str = "/portcullis/v1/";

pub fn key(kind: Kind, name: &str) -> String {
    format!("{PREFIX}{}/{name}", kind.as_str())
}

/// Splits a key back into kind and name; `None` for keys that are not resources (e.g. `_meta`).
pub fn parse_key(key: &[u8]) -> Option<(Kind, String)> {
    let key = std::str::from_utf8(key).ok()?;
    let rest = key.strip_prefix(PREFIX)?;
    let (kind, name) = rest.split_once('/')?;
    let kind = Kind::ALL.into_iter().find(|k| k.as_str() == kind)?;
    (!name.is_empty()).then(|| (kind, name.to_owned()))
}

/// One stored resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub name: String,
    /// The protobuf-encoded resource message of `kind` (its `revision` field is 0 when stored).
    pub value: Vec<u8>,
    /// The store revision of the last write of this key (etcd `mod_revision`).
    pub revision: i64,
}

/// Everything, read at one revision.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    pub revision: i64,
    pub entries: Vec<Entry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put { kind: Kind, name: String, value: Vec<u8> },
    Delete { kind: Kind, name: String },
}

/// A per-key precondition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must exist with this revision.
    Revision(i64),
}

/// An all-or-nothing write.
#[derive(Clone, Debug, Default)]
pub struct Txn {
    /// Commit only if no transaction has been committed after this store revision: the caller
    /// validated the whole configuration as of `guard` (references, conflicts), and this keeps
    /// that validation true at commit time. `None` = no global guard.
    pub guard: Option<i64>,
    pub expect: Vec<(Kind, String, Expect)>,
    pub ops: Vec<Op>,
}

/// What a watcher receives for one committed transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchBatch {
    pub revision: i64,
    pub events: Vec<Event>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: Kind,
    pub name: String,
    /// `None` = deleted.
    pub value: Option<Vec<u8>>,
    pub revision: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The requested watch start has been compacted away: re-list and watch from there.
    #[error("revision {requested} is compacted (oldest available: {compact_revision})")]
    Compacted { requested: i64, compact_revision: i64 },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The transaction is larger than the store accepts (etcd `--max-txn-ops` /
    /// `--max-request-bytes`); nothing was written.
    #[error("transaction too large: {0}")]
    TooLarge(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("store i/o error: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The guard or a per-key precondition failed; nothing was written.
    #[error("conflict: the configuration changed (now at revision {current_revision})")]
    Conflict { current_revision: i64 },
    /// The transaction is malformed (a key written twice, which etcd refuses); nothing was
    /// written.
    #[error("invalid transaction: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Watch events flow through a bounded channel; the store's watch task stops when it is dropped.
/// After an `Err` nothing more is sent: the caller re-lists and watches again.
pub type WatchReceiver = mpsc::Receiver<Result<WatchBatch, StoreError>>;

pub trait Store: Send + Sync + 'static {
    /// Every resource, at one consistent revision.
    fn list(&self) -> impl Future<Output = Result<Listing, StoreError>> + Send;

    fn get(&self, kind: Kind, name: &str) -> impl Future<Output = Result<Option<Entry>, StoreError>> + Send;

    /// Applies `txn` atomically; returns the new store revision.
    fn commit(&self, txn: Txn) -> impl Future<Output = Result<i64, CommitError>> + Send;

    /// Every transaction committed at or after `from_revision`, in order, one batch each.
    /// Transient failures (an etcd restart) are retried inside, resuming after the last batch
    /// delivered; a compacted start is reported as [`StoreError::Compacted`].
    fn watch(&self, from_revision: i64) -> impl Future<Output = Result<WatchReceiver, StoreError>> + Send;
}

/// The store chosen at start-up.
pub enum AnyStore {
    Etcd(etcd::EtcdStore),
    Embedded(embedded::EmbeddedStore),
}

impl Store for AnyStore {
    async fn list(&self) -> Result<Listing, StoreError> {
        match self {
            AnyStore::Etcd(s) => s.list().await,
            AnyStore::Embedded(s) => s.list().await,
        }
    }

    async fn get(&self, kind: Kind, name: &str) -> Result<Option<Entry>, StoreError> {
        match self {
            AnyStore::Etcd(s) => s.get(kind, name).await,
            AnyStore::Embedded(s) => s.get(kind, name).await,
        }
    }

    async fn commit(&self, txn: Txn) -> Result<i64, CommitError> {
        match self {
            AnyStore::Etcd(s) => s.commit(txn).await,
            AnyStore::Embedded(s) => s.commit(txn).await,
        }
    }

    async fn watch(&self, from_revision: i64) -> Result<WatchReceiver, StoreError> {
        match self {
            AnyStore::Etcd(s) => s.watch(from_revision).await,
            AnyStore::Embedded(s) => s.watch(from_revision).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        assert_eq!(key(Kind::Route, "orders"), "/portcullis/v1/route/orders");
        assert_eq!(parse_key(b"/portcullis/v1/route/orders"), Some((Kind::Route, "orders".into())));
        assert_eq!(parse_key(b"/portcullis/v1/_meta/commit"), None);
        assert_eq!(parse_key(b"/portcullis/v1/route/"), None);
        assert_eq!(parse_key(b"/other/route/x"), None);
    }
}

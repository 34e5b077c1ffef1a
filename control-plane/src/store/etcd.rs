//! The etcd store: resources live under `/portcullis/v1/<kind>/<name>` and the store revision is
//! etcd's. Every commit is one etcd transaction that also writes the meta key
//! `/portcullis/v1/_meta/commit`, whose mod_revision is therefore the revision of the last
//! commit: the [`Txn::guard`] compares against it, so a commit fails if any other control-plane
//! replica committed after the caller's view. `list` pages through the prefix at one revision;
//! `watch` runs in a task that groups etcd events by revision (one batch per transaction),
//! drops the meta key's events, and re-watches from the last delivered revision + 1 after a
//! lost stream (an etcd restart), with jittered backoff.
//!
//! It must not interpret the stored bytes, nor write anything outside the prefix. etcd must
//! run with `--max-txn-ops` and `--max-request-bytes` raised for large applies; when they are
//! not, commits fail with [`StoreError::TooLarge`] naming the flag.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KvClient, TxnOp, WatchClient, WatchOptions,
    WatchResponse, WatchStream,
};
use portcullis_shared::Kind;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{
    CommitError, Entry, Event, Expect, Listing, Op, PREFIX, Store, StoreError, Txn, WatchBatch, WatchReceiver, key,
    parse_key,
};

/// Written by every commit; its mod_revision is the revision of the last commit.
const META_KEY: &str = "/portcullis/v1/_meta/commit";

/// Keys per range request in `list`; pages are read at one revision.
const LIST_PAGE: i64 = 1_000;

/// tonic's default (4 MiB) is too small for a large transaction's watch response or a page of
/// big values. etcd itself bounds a transaction by `--max-request-bytes`.
const MAX_DECODE_BYTES: usize = 1 << 30;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A large commit is fsynced by a quorum; allow it longer than a read.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Capacity of each watcher's channel.
const WATCH_CHANNEL: usize = 64;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A connection to an etcd cluster. Cheap to clone: clones share the gRPC channel.
#[derive(Clone)]
pub struct EtcdStore {
    clients: Arc<Clients>,
}

/// Each call clones the client it uses (their methods take `&mut self`); the clones share one
/// balanced channel.
struct Clients {
    kv: KvClient,
    watch: WatchClient,
}

impl EtcdStore {
    /// Connects to `endpoints` (like `http://127.0.0.1:2379`) and checks with one read that
    /// etcd answers.
    pub async fn connect(endpoints: &[String]) -> Result<EtcdStore, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            // etcd refuses pings more often than every 5 s (`--grpc-keepalive-min-time`).
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let client = Client::connect(endpoints, Some(options)).await.map_err(unavailable)?;
        let store = EtcdStore {
            clients: Arc::new(Clients {
                kv: client.kv_client().max_decoding_message_size(MAX_DECODE_BYTES),
                watch: client.watch_client().max_decoding_message_size(MAX_DECODE_BYTES),
            }),
        };
        let mut kv = store.clients.kv.clone();
        timed(REQUEST_TIMEOUT, kv.get(META_KEY, None)).await?;
        Ok(store)
    }

    /// One attempt at a consistent listing; `Err(None)` when the first page's revision was
    /// compacted while paging (try again).
    async fn list_once(&self) -> Result<Listing, Option<StoreError>> {
        let end = prefix_end(PREFIX.as_bytes());
        let mut kv = self.clients.kv.clone();
        let mut entries = Vec::new();
        let mut revision = 0;
        let mut start = PREFIX.as_bytes().to_vec();
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(LIST_PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let mut page = match timed(REQUEST_TIMEOUT, kv.get(start.clone(), Some(options))).await {
                Ok(page) => page,
                Err(e) if revision > 0 && e.to_string().contains("required revision has been compacted") => {
                    return Err(None);
                }
                Err(e) => return Err(Some(e)),
            };
            if revision == 0 {
                revision = header_revision(page.header()).map_err(Some)?;
            }
            let more = page.more();
            let kvs = page.take_kvs();
            let Some(last) = kvs.last() else { break };
            start = [last.key(), b"\0"].concat();
            for kv in kvs {
                if let Some((kind, name)) = parse_key(kv.key()) {
                    let revision = kv.mod_revision();
                    let (_, value) = kv.into_key_value();
                    entries.push(Entry { kind, name, value, revision });
                }
            }
            if !more {
                break;
            }
        }
        // etcd orders by key; order like the embedded store: by kind (dependency order), name.
        entries.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        Ok(Listing { revision, entries })
    }
}

impl Store for EtcdStore {
    async fn list(&self) -> Result<Listing, StoreError> {
        let mut attempts = 0;
        loop {
            match self.list_once().await {
                Ok(listing) => return Ok(listing),
                Err(Some(e)) => return Err(e),
                Err(None) if attempts < 3 => attempts += 1,
                Err(None) => {
                    return Err(StoreError::Unavailable(
                        "etcd compacted the listing's revision while it was read, three times in a row".into(),
                    ));
                }
            }
        }
    }

    async fn get(&self, kind: Kind, name: &str) -> Result<Option<Entry>, StoreError> {
        let mut kv = self.clients.kv.clone();
        let mut response = timed(REQUEST_TIMEOUT, kv.get(key(kind, name), None)).await?;
        Ok(response.take_kvs().into_iter().next().map(|kv| {
            let revision = kv.mod_revision();
            let (_, value) = kv.into_key_value();
            Entry { kind, name: name.to_owned(), value, revision }
        }))
    }

    async fn commit(&self, txn: Txn) -> Result<i64, CommitError> {
        check_unique_keys(&txn.ops)?;
        let mut compares = Vec::with_capacity(txn.expect.len() + 1);
        if let Some(guard) = txn.guard {
            // An absent meta key has mod_revision 0, so a first commit passes any guard.
            compares.push(Compare::mod_revision(META_KEY, CompareOp::Less, guard.saturating_add(1)));
        }
        for (kind, name, expect) in &txn.expect {
            compares.push(match expect {
                Expect::Absent => Compare::version(key(*kind, name), CompareOp::Equal, 0),
                Expect::Revision(r) => Compare::mod_revision(key(*kind, name), CompareOp::Equal, *r),
            });
        }
        let mut ops = Vec::with_capacity(txn.ops.len() + 1);
        for op in txn.ops {
            ops.push(match op {
                Op::Put { kind, name, value } => TxnOp::put(key(kind, &name), value, None),
                Op::Delete { kind, name } => TxnOp::delete(key(kind, &name), None),
            });
        }
        ops.push(TxnOp::put(META_KEY, Vec::new(), None));

        let mut kv = self.clients.kv.clone();
        let request = etcd_client::Txn::new().when(compares).and_then(ops);
        let response = timed(COMMIT_TIMEOUT, kv.txn(request)).await?;
        let revision = header_revision(response.header())?;
        if response.succeeded() { Ok(revision) } else { Err(CommitError::Conflict { current_revision: revision }) }
    }

    async fn watch(&self, from_revision: i64) -> Result<WatchReceiver, StoreError> {
        let next = from_revision.max(1);
        let stream = open_watch(&self.clients.watch, next).await?;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
        let task = WatchTask { client: self.clients.watch.clone(), next, tx };
        tokio::spawn(task.run(stream));
        Ok(rx)
    }
}

/// Feeds one watcher: owns the etcd watch stream and replaces it when it is lost.
struct WatchTask {
    client: WatchClient,
    /// The first revision not yet delivered.
    next: i64,
    tx: mpsc::Sender<Result<WatchBatch, StoreError>>,
}

/// Why a watch stream stopped being read.
enum Stop {
    /// The receiver is gone or has been sent its final error.
    Done,
    /// The stream broke; watch again from `next`.
    Lost(String),
}

impl WatchTask {
    async fn run(mut self, mut stream: WatchStream) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.pump(&mut stream).await {
                Stop::Done => return,
                Stop::Lost(error) => {
                    warn!(error = %error, next_revision = self.next, "etcd watch lost; reconnecting");
                }
            }
            stream = loop {
                tokio::select! {
                    () = tokio::time::sleep(jitter(backoff)) => {}
                    () = self.tx.closed() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                let opened = tokio::select! {
                    opened = open_watch(&self.client, self.next) => opened,
                    () = self.tx.closed() => return,
                };
                match opened {
                    Ok(stream) => break stream,
                    Err(e @ StoreError::Compacted { .. }) => {
                        let _ = self.tx.send(Err(e)).await;
                        return;
                    }
                    Err(e) => {
                        debug!(error = %e, next_revision = self.next, "etcd watch not re-established yet")
                    }
                }
            };
            backoff = BACKOFF_MIN;
        }
    }

    /// Reads responses until the stream breaks or the watcher is done.
    async fn pump(&mut self, stream: &mut WatchStream) -> Stop {
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                () = self.tx.closed() => return Stop::Done,
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => return Stop::Lost("etcd closed the watch stream".into()),
                Err(e) => return Stop::Lost(e.to_string()),
            };
            if response.canceled() {
                if response.compact_revision() > 0 {
                    let compacted =
                        StoreError::Compacted { requested: self.next, compact_revision: response.compact_revision() };
                    let _ = self.tx.send(Err(compacted)).await;
                    return Stop::Done;
                }
                return Stop::Lost(format!("etcd canceled the watch: {}", response.cancel_reason()));
            }
            for batch in batches(&response, self.next) {
                self.next = batch.revision + 1;
                // The meta key's event is dropped, so a commit that changed no resource (only
                // deletes of absent keys, or no ops) leaves an empty batch: it is not sent. The
                // embedded store does the same.
                if batch.events.is_empty() {
                    continue;
                }
                if self.tx.send(Ok(batch)).await.is_err() {
                    return Stop::Done;
                }
            }
        }
    }
}

/// Splits one watch response into one batch per revision (one per transaction), skipping
/// revisions before `next`. Without `fragment`, etcd never splits a revision's events across
/// responses, so a batch is complete when the response ends.
fn batches(response: &WatchResponse, next: i64) -> Vec<WatchBatch> {
    let mut out: Vec<WatchBatch> = Vec::new();
    for event in response.events() {
        let Some(kv) = event.kv() else { continue };
        let revision = kv.mod_revision();
        if revision < next {
            continue;
        }
        if out.last().is_none_or(|b| b.revision != revision) {
            out.push(WatchBatch { revision, events: Vec::new() });
        }
        let Some((kind, name)) = parse_key(kv.key()) else {
            continue;
        };
        let value = match event.event_type() {
            EventType::Put => Some(kv.value().to_vec()),
            EventType::Delete => None,
        };
        if let Some(batch) = out.last_mut() {
            batch.events.push(Event { kind, name, value, revision });
        }
    }
    out
}

/// Starts a prefix watch at `from` and waits for etcd to confirm it.
async fn open_watch(client: &WatchClient, from: i64) -> Result<WatchStream, StoreError> {
    let mut client = client.clone();
    let options = WatchOptions::new().with_prefix().with_start_revision(from);
    let mut stream = timed(REQUEST_TIMEOUT, client.watch(PREFIX, Some(options))).await?;
    let first = timed(REQUEST_TIMEOUT, stream.message())
        .await?
        .ok_or_else(|| StoreError::Unavailable("etcd closed the watch stream before confirming it".into()))?;
    if first.canceled() {
        if first.compact_revision() > 0 {
            return Err(StoreError::Compacted { requested: from, compact_revision: first.compact_revision() });
        }
        return Err(StoreError::Unavailable(format!("etcd refused the watch: {}", first.cancel_reason())));
    }
    if !first.created() {
        return Err(StoreError::Unavailable("etcd did not confirm the watch".into()));
    }
    Ok(stream)
}

async fn timed<T>(limit: Duration, call: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(store_error(e)),
        Err(_) => Err(StoreError::Unavailable(format!("etcd did not answer within {limit:?}"))),
    }
}

/// Maps etcd's size refusals to [`StoreError::TooLarge`]; everything else means "try later".
fn store_error(e: etcd_client::Error) -> StoreError {
    if let etcd_client::Error::GRpcStatus(status) = &e {
        let message = status.message();
        if message.contains("too many operations in txn request") {
            return StoreError::TooLarge(format!("etcd refused the transaction: {message} (raise etcd --max-txn-ops)"));
        }
        if message.contains("request is too large")
            || (status.code() == tonic::Code::ResourceExhausted && message.contains("larger than max"))
        {
            return StoreError::TooLarge(format!(
                "etcd refused the transaction: {message} (raise etcd --max-request-bytes)"
            ));
        }
    }
    unavailable(e)
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(format!("etcd: {e}"))
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<i64, StoreError> {
    header.map(|h| h.revision()).ok_or_else(|| StoreError::Unavailable("etcd response without a header".into()))
}

/// The end of the range of keys starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// etcd refuses a transaction that writes a key twice; say so before sending it.
fn check_unique_keys(ops: &[Op]) -> Result<(), CommitError> {
    let mut seen = std::collections::HashSet::with_capacity(ops.len());
    for op in ops {
        let (kind, name) = match op {
            Op::Put { kind, name, .. } | Op::Delete { kind, name } => (*kind, name.as_str()),
        };
        if !seen.insert((kind, name)) {
            return Err(CommitError::Invalid(format!("{}/{name} is written twice", kind.as_str())));
        }
    }
    Ok(())
}

/// A random duration in `[d/2, d]`, so that replicas do not reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    let random = RandomState::new().hash_one(std::time::Instant::now());
    let half = d / 2;
    let millis = u64::try_from(half.as_millis()).unwrap_or(u64::MAX).max(1);
    half + Duration::from_millis(random % (millis + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_cases() {
        assert_eq!(prefix_end(b"/portcullis/v1/"), b"/portcullis/v10".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(100));
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(100), "{d:?}");
        }
    }

    #[test]
    fn meta_key_is_not_a_resource() {
        assert_eq!(parse_key(META_KEY.as_bytes()), None);
        assert!(META_KEY.starts_with(PREFIX));
    }
}

//! The embedded store: the all-in-one default, one node, durable under a data directory, no etcd.
//!
//! Every committed transaction is appended to `store.log` as one framed record (magic, crc32,
//! length, protobuf payload) and fsynced before [`Store::commit`] returns. The live state is a
//! map in memory; when the log grows large relative to it, the state is written to
//! `store.snapshot` (temp file, fsync, rename) and the log starts again. On open, the snapshot is
//! loaded and the log replayed; a torn record at the end of the log (a crash mid-append) is cut
//! off with a warning, while damage followed by valid records is [`StoreError::Corrupt`].
//! Revisions count commits from 1 and never go backwards across reopen.
//!
//! Watchers are fed from an in-memory history of the last [`EmbeddedOptions::history`] batches
//! (rebuilt from the log on open), so `watch(from)` can replay from `from`; a watcher that falls
//! further behind than the history is told [`StoreError::Compacted`] rather than silently
//! skipped.
//!
//! It must not be opened by two processes (or two instances) on one directory at a time, and it
//! must not hold a lock across an `.await`: file I/O runs on the blocking pool, under a writer
//! mutex that only commits take.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use portcullis_shared::Kind;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tracing::warn;

use super::{CommitError, Entry, Event, Expect, Listing, Op, Store, StoreError, Txn, WatchBatch, WatchReceiver};

const LOG_FILE: &str = "store.log";
const SNAPSHOT_FILE: &str = "store.snapshot";
const SNAPSHOT_TEMP: &str = "store.snapshot.tmp";

/// Record magics: "PCL1" for log records, "PCS1" for the snapshot.
const LOG_MAGIC: u32 = 0x5043_4c31;
const SNAPSHOT_MAGIC: u32 = 0x5043_5331;
/// magic (4) + crc32 (4) + payload length (8).
const HEADER_LEN: usize = 16;

/// Capacity of each watcher's channel.
const WATCH_CHANNEL: usize = 64;

/// Tuning for [`EmbeddedStore::open_with`].
#[derive(Clone, Debug)]
pub struct EmbeddedOptions {
    /// How many committed transactions are kept in memory for `watch(from)` replays and for
    /// watchers that lag. Older starts are reported as [`StoreError::Compacted`].
    pub history: usize,
    /// The log is rewritten into a snapshot once it is at least this large *and* twice the
    /// size of the live data.
    pub snapshot_min_log_bytes: u64,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions { history: 10_000, snapshot_min_log_bytes: 8 << 20 }
    }
}

/// A single-node store on local disk. Cheap to clone: clones share one state.
#[derive(Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    options: EmbeddedOptions,
    /// Serialises commits. Taken only on the blocking pool (inside `spawn_blocking`).
    writer: Mutex<Writer>,
    /// Read by `list`/`get`/watchers, written once per commit after the log is durable.
    state: RwLock<State>,
    /// The last committed revision; wakes the watch tasks.
    committed: watch::Sender<i64>,
}

struct Writer {
    log: File,
    /// Bytes of valid records in the log.
    len: u64,
    /// Set after a failed append: the log's tail is unknown, so no further commit is accepted
    /// until a restart replays (and if need be truncates) the log.
    broken: Option<String>,
}

#[derive(Default)]
struct State {
    entries: BTreeMap<Kind, BTreeMap<String, Entry>>,
    revision: i64,
    /// The last committed batches, contiguous, ending at `revision` (empty batches included).
    history: VecDeque<Arc<WatchBatch>>,
    /// Approximate size of the live data, to decide when to snapshot.
    live_bytes: u64,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `data_dir` with default options. Blocking: call it at
    /// start-up or on the blocking pool.
    pub fn open(data_dir: &Path) -> Result<EmbeddedStore, StoreError> {
        Self::open_with(data_dir, EmbeddedOptions::default())
    }

    /// Opens (or creates) the store in `data_dir`. Blocking, like [`EmbeddedStore::open`].
    pub fn open_with(data_dir: &Path, options: EmbeddedOptions) -> Result<EmbeddedStore, StoreError> {
        let options = EmbeddedOptions { history: options.history.max(1), ..options };
        fs::create_dir_all(data_dir)?;
        remove_if_exists(&data_dir.join(SNAPSHOT_TEMP))?;

        let mut state = State::default();
        let snapshot_path = data_dir.join(SNAPSHOT_FILE);
        if let Some(bytes) = read_if_exists(&snapshot_path)? {
            load_snapshot(&mut state, &bytes)
                .map_err(|e| StoreError::Corrupt(format!("snapshot {}: {e}", snapshot_path.display())))?;
        }
        let snapshot_revision = state.revision;

        let log_path = data_dir.join(LOG_FILE);
        let created = !log_path.exists();
        let mut log = OpenOptions::new().read(true).append(true).create(true).open(&log_path)?;
        if created {
            sync_dir(data_dir)?;
        }
        let mut bytes = Vec::new();
        log.read_to_end(&mut bytes)?;
        let scan = scan_frames(&bytes, LOG_MAGIC)
            .map_err(|e| StoreError::Corrupt(format!("log {}: {e}", log_path.display())))?;
        if scan.valid_len < bytes.len() {
            warn!(
                path = %log_path.display(),
                dropped_bytes = bytes.len() - scan.valid_len,
                "store log ends in a torn record; truncating it"
            );
            log.set_len(scan.valid_len as u64)?;
            log.sync_data()?;
        }
        for range in scan.records {
            let record = LogTxn::decode(&bytes[range.clone()])
                .map_err(|e| StoreError::Corrupt(format!("log {} at byte {}: {e}", log_path.display(), range.start)))?;
            if record.revision <= snapshot_revision {
                // Already in the snapshot: a crash came between the snapshot and the log reset.
                continue;
            }
            if record.revision != state.revision + 1 {
                return Err(StoreError::Corrupt(format!(
                    "log {}: revision {} follows revision {}",
                    log_path.display(),
                    record.revision,
                    state.revision
                )));
            }
            let ops = record.ops.into_iter().map(LogOp::into_op).collect::<Result<Vec<_>, _>>()?;
            let batch = state.apply(record.revision, ops);
            state.remember(batch, options.history);
        }

        let revision = state.revision;
        let (committed, _) = watch::channel(revision);
        let writer = Writer { log, len: scan.valid_len as u64, broken: None };
        Ok(EmbeddedStore {
            shared: Arc::new(Shared {
                dir: data_dir.to_owned(),
                options,
                writer: Mutex::new(writer),
                state: RwLock::new(state),
                committed,
            }),
        })
    }
}

impl Store for EmbeddedStore {
    async fn list(&self) -> Result<Listing, StoreError> {
        let state = self.shared.read();
        let entries = state.entries.values().flat_map(|names| names.values().cloned()).collect();
        Ok(Listing { revision: state.revision, entries })
    }

    async fn get(&self, kind: Kind, name: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self.shared.read().get(kind, name).cloned())
    }

    async fn commit(&self, txn: Txn) -> Result<i64, CommitError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.commit_blocking(txn))
            .await
            .map_err(|e| StoreError::Unavailable(format!("commit task failed: {e}")))?
    }

    async fn watch(&self, from_revision: i64) -> Result<WatchReceiver, StoreError> {
        let from = from_revision.max(1);
        self.shared.read().check_available(from)?;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
        let committed = self.shared.committed.subscribe();
        tokio::spawn(feed_watcher(Arc::downgrade(&self.shared), from, tx, committed));
        Ok(rx)
    }
}

/// Sends every batch from `next` on, then follows new commits. Holds only a weak reference so
/// that dropping the store ends its watchers (their receivers then see the channel close).
async fn feed_watcher(
    shared: Weak<Shared>,
    mut next: i64,
    tx: mpsc::Sender<Result<WatchBatch, StoreError>>,
    mut committed: watch::Receiver<i64>,
) {
    loop {
        // Mark the current revision seen before reading the history, so a commit that lands
        // after the read wakes the `changed()` below.
        committed.borrow_and_update();
        let pending = match shared.upgrade() {
            Some(shared) => shared.read().batches_from(next),
            None => return,
        };
        match pending {
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            Ok(batches) if !batches.is_empty() => {
                for batch in batches {
                    next = batch.revision + 1;
                    // A transaction that changed no resource (only deletes of absent keys, or no
                    // ops) takes a revision but is not sent: etcd reports no event for it either.
                    if batch.events.is_empty() {
                        continue;
                    }
                    if tx.send(Ok(WatchBatch::clone(&batch))).await.is_err() {
                        return;
                    }
                }
            }
            Ok(_) => {
                tokio::select! {
                    changed = committed.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    () = tx.closed() => return,
                }
            }
        }
    }
}

impl Shared {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs on the blocking pool: check, append + fsync, apply, wake watchers, maybe snapshot.
    fn commit_blocking(&self, txn: Txn) -> Result<i64, CommitError> {
        let mut writer = self.lock_writer();
        if let Some(reason) = &writer.broken {
            return Err(StoreError::Unavailable(format!(
                "store log in {} is unusable after a failed write ({reason}); restart to recover",
                self.dir.display()
            ))
            .into());
        }
        check_unique_keys(&txn.ops)?;

        // Only commits change the state and they are serialised by `writer`, so what is checked
        // here still holds when the record is applied below.
        let revision = {
            let state = self.read();
            state.check_preconditions(&txn)?;
            state.revision + 1
        };

        let record = LogTxn { revision, ops: txn.ops.iter().map(LogOp::from_op).collect() };
        if let Err(e) = writer.append(&frame(LOG_MAGIC, &record.encode_to_vec())) {
            writer.broken = Some(e.to_string());
            return Err(StoreError::Io(e).into());
        }
        drop(record);

        {
            let mut state = self.write();
            let batch = state.apply(revision, txn.ops);
            state.remember(batch, self.options.history);
        }
        self.committed.send_replace(revision);

        self.maybe_snapshot(&mut writer);
        Ok(revision)
    }

    /// Rewrites the state into a snapshot and empties the log once the log is large relative
    /// to the live data. Failures are logged, not returned: the commit is already durable.
    fn maybe_snapshot(&self, writer: &mut Writer) {
        let live_bytes = self.read().live_bytes;
        if writer.len < self.options.snapshot_min_log_bytes.max(live_bytes.saturating_mul(2)) {
            return;
        }
        if let Err(e) = self.write_snapshot() {
            warn!(path = %self.dir.display(), error = %e, "store snapshot failed; keeping the log");
            return;
        }
        // The snapshot now holds every record of the log; replay skips them if this fails.
        match writer.log.set_len(0).and_then(|()| writer.log.sync_data()) {
            Ok(()) => writer.len = 0,
            Err(e) => {
                warn!(path = %self.dir.display(), error = %e, "store log reset failed after a snapshot")
            }
        }
    }

    fn write_snapshot(&self) -> io::Result<()> {
        let payload = {
            let state = self.read();
            SnapshotFile {
                revision: state.revision,
                entries: state
                    .entries
                    .values()
                    .flat_map(|names| names.values())
                    .map(|e| SnapshotEntry {
                        kind: e.kind.as_str().to_owned(),
                        name: e.name.clone(),
                        value: e.value.clone(),
                        revision: e.revision,
                    })
                    .collect(),
            }
            .encode_to_vec()
        };
        let temp = self.dir.join(SNAPSHOT_TEMP);
        let mut file = File::create(&temp)?;
        file.write_all(&frame(SNAPSHOT_MAGIC, &payload))?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temp, self.dir.join(SNAPSHOT_FILE))?;
        sync_dir(&self.dir)
    }
}

impl Writer {
    fn append(&mut self, record: &[u8]) -> io::Result<()> {
        self.log.write_all(record)?;
        self.log.sync_data()?;
        self.len += record.len() as u64;
        Ok(())
    }
}

impl State {
    fn get(&self, kind: Kind, name: &str) -> Option<&Entry> {
        self.entries.get(&kind)?.get(name)
    }

    fn check_preconditions(&self, txn: &Txn) -> Result<(), CommitError> {
        let conflict = CommitError::Conflict { current_revision: self.revision };
        if let Some(guard) = txn.guard
            && self.revision > guard
        {
            return Err(conflict);
        }
        for (kind, name, expect) in &txn.expect {
            let current = self.get(*kind, name).map(|e| e.revision);
            let holds = match expect {
                Expect::Absent => current.is_none(),
                Expect::Revision(r) => current == Some(*r),
            };
            if !holds {
                return Err(conflict);
            }
        }
        Ok(())
    }

    /// Applies checked ops as revision `revision`; returns what watchers see.
    fn apply(&mut self, revision: i64, ops: Vec<Op>) -> WatchBatch {
        let mut events = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Put { kind, name, value } => {
                    events.push(Event { kind, name: name.clone(), value: Some(value.clone()), revision });
                    self.live_bytes += entry_size(&name, &value);
                    let entry = Entry { kind, name: name.clone(), value, revision };
                    if let Some(old) = self.entries.entry(kind).or_default().insert(name, entry) {
                        self.live_bytes = self.live_bytes.saturating_sub(entry_size(&old.name, &old.value));
                    }
                }
                Op::Delete { kind, name } => {
                    let removed = self.entries.get_mut(&kind).and_then(|names| names.remove(&name));
                    if let Some(old) = removed {
                        self.live_bytes = self.live_bytes.saturating_sub(entry_size(&old.name, &old.value));
                        events.push(Event { kind, name, value: None, revision });
                    }
                }
            }
        }
        self.revision = revision;
        WatchBatch { revision, events }
    }

    fn remember(&mut self, batch: WatchBatch, history: usize) {
        self.history.push_back(Arc::new(batch));
        while self.history.len() > history {
            self.history.pop_front();
        }
    }

    /// The oldest revision a watcher can start from.
    fn first_available(&self) -> i64 {
        self.history.front().map_or(self.revision + 1, |b| b.revision)
    }

    fn check_available(&self, from: i64) -> Result<(), StoreError> {
        let compact_revision = self.first_available();
        if from < compact_revision {
            return Err(StoreError::Compacted { requested: from, compact_revision });
        }
        Ok(())
    }

    /// The remembered batches at or after `from` (none yet if `from` is in the future).
    fn batches_from(&self, from: i64) -> Result<Vec<Arc<WatchBatch>>, StoreError> {
        self.check_available(from)?;
        let skip = usize::try_from(from - self.first_available()).unwrap_or(usize::MAX);
        Ok(self.history.iter().skip(skip).cloned().collect())
    }
}

fn entry_size(name: &str, value: &[u8]) -> u64 {
    // Plus a rough per-entry overhead, so that many tiny entries still count.
    (name.len() + value.len() + 32) as u64
}

fn check_unique_keys(ops: &[Op]) -> Result<(), CommitError> {
    let mut seen = HashSet::with_capacity(ops.len());
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

fn load_snapshot(state: &mut State, bytes: &[u8]) -> Result<(), String> {
    let scan = scan_frames(bytes, SNAPSHOT_MAGIC)?;
    let [range] = scan.records.as_slice() else {
        return Err(format!("expected one record, found {}", scan.records.len()));
    };
    if scan.valid_len != bytes.len() {
        return Err("damaged record".to_owned());
    }
    let snapshot = SnapshotFile::decode(&bytes[range.clone()]).map_err(|e| e.to_string())?;
    for e in snapshot.entries {
        let kind = parse_kind(&e.kind).map_err(|e| e.to_string())?;
        state.live_bytes += entry_size(&e.name, &e.value);
        let entry = Entry { kind, name: e.name.clone(), value: e.value, revision: e.revision };
        state.entries.entry(kind).or_default().insert(e.name, entry);
    }
    state.revision = snapshot.revision;
    Ok(())
}

// ---- framing ----------------------------------------------------------------------------------

fn frame(magic: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len);
    crc.update(payload);
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&magic.to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&len);
    out.extend_from_slice(payload);
    out
}

/// The payload range and the end of a valid frame at `at`, if there is one.
fn frame_at(buf: &[u8], at: usize, magic: u32) -> Option<(std::ops::Range<usize>, usize)> {
    let header = buf.get(at..at.checked_add(HEADER_LEN)?)?;
    let word = |i: usize| header.get(i..i + 4).and_then(|b| <[u8; 4]>::try_from(b).ok()).map(u32::from_le_bytes);
    if word(0)? != magic {
        return None;
    }
    let crc = word(4)?;
    let len_bytes = header.get(8..16)?;
    let len = usize::try_from(u64::from_le_bytes(<[u8; 8]>::try_from(len_bytes).ok()?)).ok()?;
    let start = at + HEADER_LEN;
    let end = start.checked_add(len)?;
    let payload = buf.get(start..end)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(len_bytes);
    hasher.update(payload);
    (hasher.finalize() == crc).then_some((start..end, end))
}

struct Scan {
    records: Vec<std::ops::Range<usize>>,
    /// Where the valid records end; anything after is a torn tail.
    valid_len: usize,
}

/// Splits `buf` into frames. A bad frame with no valid frame anywhere after it is a torn tail
/// (the last append did not finish); a bad frame followed by a valid one is corruption.
fn scan_frames(buf: &[u8], magic: u32) -> Result<Scan, String> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        match frame_at(buf, at, magic) {
            Some((payload, end)) => {
                records.push(payload);
                at = end;
            }
            None => {
                if let Some(next) = (at + 1..buf.len()).find(|&p| frame_at(buf, p, magic).is_some()) {
                    return Err(format!("damaged record at byte {at}, followed by a valid record at byte {next}"));
                }
                break;
            }
        }
    }
    Ok(Scan { records, valid_len: at })
}

// ---- files ------------------------------------------------------------------------------------

fn read_if_exists(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes a create or rename in `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parse_kind(s: &str) -> Result<Kind, StoreError> {
    Kind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| StoreError::Corrupt(format!("unknown kind {s:?}")))
}

// ---- on-disk messages -------------------------------------------------------------------------

/// One committed transaction in the log.
#[derive(Clone, PartialEq, prost::Message)]
struct LogTxn {
    #[prost(int64, tag = "1")]
    revision: i64,
    #[prost(message, repeated, tag = "2")]
    ops: Vec<LogOp>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LogOp {
    #[prost(string, tag = "1")]
    kind: String,
    #[prost(string, tag = "2")]
    name: String,
    /// Absent for a delete.
    #[prost(bytes = "vec", optional, tag = "3")]
    value: Option<Vec<u8>>,
}

impl LogOp {
    fn from_op(op: &Op) -> LogOp {
        match op {
            Op::Put { kind, name, value } => {
                LogOp { kind: kind.as_str().to_owned(), name: name.clone(), value: Some(value.clone()) }
            }
            Op::Delete { kind, name } => LogOp { kind: kind.as_str().to_owned(), name: name.clone(), value: None },
        }
    }

    fn into_op(self) -> Result<Op, StoreError> {
        let kind = parse_kind(&self.kind)?;
        Ok(match self.value {
            Some(value) => Op::Put { kind, name: self.name, value },
            None => Op::Delete { kind, name: self.name },
        })
    }
}

#[derive(Clone, PartialEq, prost::Message)]
struct SnapshotFile {
    #[prost(int64, tag = "1")]
    revision: i64,
    #[prost(message, repeated, tag = "2")]
    entries: Vec<SnapshotEntry>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SnapshotEntry {
    #[prost(string, tag = "1")]
    kind: String,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(bytes = "vec", tag = "3")]
    value: Vec<u8>,
    #[prost(int64, tag = "4")]
    revision: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(name: &str, value: &str) -> Op {
        Op::Put { kind: Kind::Route, name: name.into(), value: value.as_bytes().to_vec() }
    }

    fn txn(ops: Vec<Op>) -> Txn {
        Txn { ops, ..Txn::default() }
    }

    #[test]
    fn scan_frames_cases() {
        let a = frame(LOG_MAGIC, b"first");
        let b = frame(LOG_MAGIC, b"second");
        let both = [a.clone(), b.clone()].concat();

        fn check(buf: &[u8], want: Result<(usize, usize), ()>) {
            let got = scan_frames(buf, LOG_MAGIC).map(|s| (s.records.len(), s.valid_len)).map_err(|_| ());
            assert_eq!(got, want);
        }
        check(&[], Ok((0, 0)));
        check(&both, Ok((2, both.len())));
        // Torn tails: a partial header, a partial payload, a garbled last payload.
        check(&both[..a.len() + 3], Ok((1, a.len())));
        check(&both[..both.len() - 1], Ok((1, a.len())));
        let mut garbled_tail = both.clone();
        *garbled_tail.last_mut().unwrap() ^= 0xff;
        check(&garbled_tail, Ok((1, a.len())));
        // Damage in the first record with a valid one after it.
        let mut garbled_middle = both.clone();
        garbled_middle[HEADER_LEN] ^= 0xff;
        check(&garbled_middle, Err(()));
        let mut bad_len = both.clone();
        bad_len[8] = 0xff;
        check(&bad_len, Err(()));
    }

    #[tokio::test]
    async fn torn_tail_is_truncated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.commit(txn(vec![put("a", "1")])).await.unwrap();
        store.commit(txn(vec![put("b", "2")])).await.unwrap();
        drop(store);

        let log = dir.path().join(LOG_FILE);
        let len = fs::metadata(&log).unwrap().len();
        OpenOptions::new().write(true).open(&log).unwrap().set_len(len - 3).unwrap();

        let store = EmbeddedStore::open(dir.path()).unwrap();
        let listing = store.list().await.unwrap();
        assert_eq!(listing.revision, 1);
        assert_eq!(listing.entries.len(), 1);
        // The next commit takes revision 2 again and survives another reopen.
        assert_eq!(store.commit(txn(vec![put("c", "3")])).await.unwrap(), 2);
        drop(store);
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let names: Vec<_> = store.list().await.unwrap().entries.into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["a", "c"]);
    }

    #[tokio::test]
    async fn damage_in_the_middle_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.commit(txn(vec![put("a", "1")])).await.unwrap();
        store.commit(txn(vec![put("b", "2")])).await.unwrap();
        drop(store);

        let log = dir.path().join(LOG_FILE);
        let mut bytes = fs::read(&log).unwrap();
        bytes[HEADER_LEN + 1] ^= 0xff;
        fs::write(&log, bytes).unwrap();
        assert!(matches!(EmbeddedStore::open(dir.path()), Err(StoreError::Corrupt(_))));
    }

    #[tokio::test]
    async fn snapshot_replaces_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let options = EmbeddedOptions { history: 4, snapshot_min_log_bytes: 1024 };
        let store = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
        let mut last = 0;
        for i in 0..100 {
            // Rewrite the same few keys so that the log outgrows the live data.
            let value = format!("value-{i}-{}", "x".repeat(100));
            last = store.commit(txn(vec![put(&format!("r{}", i % 3), &value)])).await.unwrap();
        }
        let before = store.list().await.unwrap();
        drop(store);

        assert!(dir.path().join(SNAPSHOT_FILE).exists());
        assert!(fs::metadata(dir.path().join(LOG_FILE)).unwrap().len() < 1024);
        let store = EmbeddedStore::open_with(dir.path(), options).unwrap();
        let after = store.list().await.unwrap();
        assert_eq!(after.revision, last);
        assert_eq!(after.entries, before.entries);
        assert_eq!(store.commit(txn(vec![put("r9", "v")])).await.unwrap(), last + 1);
    }

    #[tokio::test]
    async fn duplicate_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let ops = vec![put("a", "1"), Op::Delete { kind: Kind::Route, name: "a".into() }];
        assert!(matches!(store.commit(txn(ops)).await, Err(CommitError::Invalid(_))));
        assert_eq!(store.list().await.unwrap().revision, 0);
    }
}

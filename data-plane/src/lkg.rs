//! The last-known-good configuration on disk: the resources of the newest version this proxy
//! compiled and served, so that a proxy restarted while the control plane is away still serves
//! (DESIGN.md §5). Two files, in the messages the control plane streams, so there is one format
//! to decode:
//! - `config.pb`: a whole version, a `portcullis.discovery.v1.ConfigResponse` with
//!   `full = true`. Written atomically: temp file, fsync, rename, fsync of the directory; a
//!   crash leaves either the old file or the new one.
//! - `config.log`: the deltas applied since, each a `ConfigResponse` with `full = false` in a
//!   record `[payload length: u32 LE][CRC-32 of payload: u32 LE][payload]`, appended and
//!   fdatasynced before the version is acknowledged. A one-route change then writes one small
//!   record, not the whole configuration. Loading replays the records that chain on from the
//!   snapshot's version and stops at the first torn, corrupt or unchained one (a crash mid-append
//!   leaves a torn tail, which [`LastKnownGood::load`] cuts off before appending again). Once
//!   the log outgrows the snapshot it is compacted: a new `config.pb`, then the log removed
//!   (records at or below the snapshot's version, left by a crash in between, are skipped).
//!
//! The files may hold secrets (introspection client credentials), so they are created readable
//! by the owner only. They must only ever be written with a version that compiled; loading them
//! still compiles the result again (the caller does) rather than trusting it.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use portcullis_proto::config::v1 as pb;
use portcullis_proto::discovery::v1::{ConfigResponse, Removal};
use portcullis_shared::Kind;
use prost::Message;

use crate::snapshot::ResourceMap;

pub const FILE_NAME: &str = "config.pb";
const TEMP_NAME: &str = "config.pb.tmp";
pub const LOG_NAME: &str = "config.log";
const HEADER_LEN: usize = 8;
/// The log is compacted into a new snapshot once it is this big, or as big as the snapshot,
/// whichever is more: replaying it then costs at most about as much as reading the snapshot.
const COMPACT_AT_LEAST: u64 = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LkgError {
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("decoding {path}: {source}")]
    Decode { path: PathBuf, source: prost::DecodeError },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The resources of a full snapshot by (kind, name); an error names the first resource without a
/// kind or listed twice.
pub fn resource_map(resources: Vec<pb::Resource>) -> Result<ResourceMap, String> {
    let mut map = ResourceMap::new();
    for resource in resources {
        let Some((kind, name)) = Kind::of(&resource).map(|(k, n)| (k, n.to_owned())) else {
            return Err("a resource sets none of upstream, issuer, key, policy, route, block".into());
        };
        if map.contains_key(&(kind, name.clone())) {
            return Err(format!("{kind} {name} appears twice"));
        }
        map.insert((kind, name), resource);
    }
    Ok(map)
}

/// `resources` as version `version`, encoded as a full `ConfigResponse` without copying them
/// into one first (the map can hold tens of thousands of resources).
pub fn encode(version: i64, resources: &ResourceMap) -> Vec<u8> {
    use prost::encoding;
    // Field numbers of ConfigResponse: version = 1, full = 2, upserts = 4.
    let len = encoding::int64::encoded_len(1, &version)
        + encoding::bool::encoded_len(2, &true)
        + resources.values().map(|r| encoding::message::encoded_len(4, r)).sum::<usize>();
    let mut buf = Vec::with_capacity(len);
    encoding::int64::encode(1, &version, &mut buf);
    encoding::bool::encode(2, &true, &mut buf);
    for r in resources.values() {
        encoding::message::encode(4, r, &mut buf);
    }
    buf
}

/// The version and resources of the encoded full snapshot read from `path`.
fn decode(path: &Path, bytes: &[u8]) -> Result<(i64, ResourceMap), LkgError> {
    let invalid = |message: String| LkgError::Invalid { path: path.to_owned(), message };
    let response =
        ConfigResponse::decode(bytes).map_err(|source| LkgError::Decode { path: path.to_owned(), source })?;
    if !response.full {
        return Err(invalid("not a full snapshot".into()));
    }
    if !response.removals.is_empty() {
        return Err(invalid("a full snapshot must not carry removals".into()));
    }
    let map = resource_map(response.upserts).map_err(invalid)?;
    Ok((response.version, map))
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LkgError {
    let path = path.to_owned();
    move |source| LkgError::Io { action, path, source }
}

fn owner_only(options: &mut OpenOptions) -> &mut OpenOptions {
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(options, 0o600);
    options
}

/// Makes a rename or a new file's directory entry durable.
fn sync_dir(dir: &Path) -> Result<(), LkgError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("syncing", dir))
}

/// Atomically replaces `dir/config.pb` with `resources` at `version`; creates `dir` if needed.
/// Returns the size written. Leaves `config.log` alone: [`LastKnownGood`] manages both.
/// Blocking: call it on the blocking pool.
pub fn save(dir: &Path, version: i64, resources: &ResourceMap) -> Result<u64, LkgError> {
    fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let temp = dir.join(TEMP_NAME);
    let target = dir.join(FILE_NAME);
    let bytes = encode(version, resources);
    let mut file = owner_only(OpenOptions::new().write(true).create(true).truncate(true))
        .open(&temp)
        .map_err(io("creating", &temp))?;
    file.write_all(&bytes).map_err(io("writing", &temp))?;
    file.sync_all().map_err(io("syncing", &temp))?;
    drop(file);
    fs::rename(&temp, &target).map_err(io("renaming into", &target))?;
    // The rename is durable only once the directory entry is.
    sync_dir(dir)?;
    Ok(u64::try_from(bytes.len()).unwrap_or(u64::MAX))
}

/// The saved version and resources: the snapshot file with the log replayed on top; `Ok(None)`
/// when there is no snapshot file yet. Reads only (a torn log tail is ignored, not cut off).
pub fn load(dir: &Path) -> Result<Option<(i64, ResourceMap)>, LkgError> {
    Ok(read(dir)?.map(|r| (r.version, r.resources)))
}

/// What [`read`] found.
struct Read {
    version: i64,
    resources: ResourceMap,
    snapshot_bytes: u64,
    /// The length of the log's valid prefix (0 without a log).
    log_good: u64,
    log_exists: bool,
}

fn read(dir: &Path) -> Result<Option<Read>, LkgError> {
    let path = dir.join(FILE_NAME);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LkgError::Io { action: "reading", path, source }),
    };
    let (mut version, mut resources) = decode(&path, &bytes)?;
    let snapshot_bytes = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    let log_path = dir.join(LOG_NAME);
    let log = match fs::read(&log_path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(LkgError::Io { action: "reading", path: log_path, source }),
    };
    let log_exists = log.is_some();
    let log = log.unwrap_or_default();
    let mut good = 0;
    for (end, record) in records(&log) {
        if record.version > version {
            if record.base_version != version || apply_record(&mut resources, record).is_err() {
                // A gap or a record that does not apply: what follows cannot be trusted either.
                // (`apply_record` checks every key before changing anything.)
                break;
            }
            version = end.1;
        }
        good = end.0;
    }
    let log_good = u64::try_from(good).unwrap_or(u64::MAX);
    Ok(Some(Read { version, resources, snapshot_bytes, log_good, log_exists }))
}

/// The log's whole, checksummed delta records in order, each with (offset after it, its
/// version); stops at the first torn or corrupt one.
fn records(log: &[u8]) -> impl Iterator<Item = ((usize, i64), ConfigResponse)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let header = log.get(at..at + HEADER_LEN)?;
        let len = u32::from_le_bytes(header.get(..4)?.try_into().ok()?);
        let crc = u32::from_le_bytes(header.get(4..)?.try_into().ok()?);
        let start = at + HEADER_LEN;
        let payload = log.get(start..start + usize::try_from(len).ok()?)?;
        if crc32fast::hash(payload) != crc {
            return None;
        }
        let record = ConfigResponse::decode(payload).ok().filter(|r| !r.full)?;
        at = start + payload.len();
        Some(((at, record.version), record))
    })
}

/// Applies a delta record; checks every key first, so an error changes nothing.
fn apply_record(resources: &mut ResourceMap, record: ConfigResponse) -> Result<(), String> {
    let mut puts = Vec::with_capacity(record.upserts.len());
    for r in record.upserts {
        let (kind, name) = Kind::of(&r).map(|(k, n)| (k, n.to_owned())).ok_or("an upsert without a kind")?;
        puts.push(((kind, name), r));
    }
    let mut removals = Vec::with_capacity(record.removals.len());
    for r in record.removals {
        let kind = Kind::ALL.into_iter().find(|k| k.as_str() == r.kind).ok_or("a removal of an unknown kind")?;
        removals.push((kind, r.name));
    }
    for (key, r) in puts {
        resources.insert(key, r);
    }
    for key in removals {
        resources.remove(&key);
    }
    Ok(())
}

/// One proxy's last-known-good files, kept current version by version: a whole snapshot for a
/// full configuration (and the first save after start-up), an appended log record for a delta.
/// Blocking: use it on the blocking pool.
#[derive(Debug)]
pub struct LastKnownGood {
    dir: PathBuf,
    /// The log, open at its end on top of the current snapshot file; `None`: the next save
    /// writes a whole snapshot (nothing saved yet by this process, or an append failed).
    log: Option<File>,
    log_bytes: u64,
    snapshot_bytes: u64,
}

impl LastKnownGood {
    pub fn new(dir: PathBuf) -> LastKnownGood {
        LastKnownGood { dir, log: None, log_bytes: 0, snapshot_bytes: 0 }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The saved version and resources, as [`load`]; also cuts a torn or corrupt log tail off
    /// and opens the log for the next appends.
    pub fn load(&mut self) -> Result<Option<(i64, ResourceMap)>, LkgError> {
        self.log = None;
        let Some(read) = read(&self.dir)? else {
            return Ok(None);
        };
        if read.log_exists {
            let path = self.dir.join(LOG_NAME);
            let mut file = OpenOptions::new().write(true).open(&path).map_err(io("opening", &path))?;
            file.set_len(read.log_good).map_err(io("truncating", &path))?;
            file.sync_all().map_err(io("syncing", &path))?;
            file.seek(SeekFrom::End(0)).map_err(io("seeking", &path))?;
            self.log = Some(file);
        }
        self.log_bytes = read.log_good;
        self.snapshot_bytes = read.snapshot_bytes;
        Ok(Some((read.version, read.resources)))
    }

    /// Saves `resources` as a whole snapshot at `version` and drops the log.
    pub fn save_full(&mut self, version: i64, resources: &ResourceMap) -> Result<(), LkgError> {
        self.log = None;
        self.snapshot_bytes = save(&self.dir, version, resources)?;
        let path = self.dir.join(LOG_NAME);
        // Records left behind would be skipped (they are at or below `version`), but a new
        // log must start empty, and this is when it is cheapest to say so.
        let file = owner_only(OpenOptions::new().write(true).create(true).truncate(true))
            .open(&path)
            .map_err(io("creating", &path))?;
        file.sync_all().map_err(io("syncing", &path))?;
        sync_dir(&self.dir)?;
        self.log = Some(file);
        self.log_bytes = 0;
        Ok(())
    }

    /// Saves version `version`, which is version `base` (the last one saved) with the keys
    /// `changed` set as in `resources` (or removed, when `resources` lacks them): one appended
    /// record, or a whole snapshot when the log is due for compaction or unusable.
    pub fn save_delta(
        &mut self,
        base: i64,
        version: i64,
        resources: &ResourceMap,
        changed: &[(Kind, String)],
    ) -> Result<(), LkgError> {
        let Some(log) = self.log.as_mut().filter(|_| self.log_bytes < self.snapshot_bytes.max(COMPACT_AT_LEAST)) else {
            return self.save_full(version, resources);
        };
        let mut record = ConfigResponse { version, full: false, base_version: base, ..Default::default() };
        for key in changed {
            match resources.get(key) {
                Some(r) => record.upserts.push(r.clone()),
                None => record.removals.push(Removal { kind: key.0.as_str().to_owned(), name: key.1.clone() }),
            }
        }
        let payload = record.encode_to_vec();
        let len = u32::try_from(payload.len()).map_err(|_| LkgError::Invalid {
            path: self.dir.join(LOG_NAME),
            message: format!("a delta of {} bytes is too big for a log record", payload.len()),
        })?;
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        let path = self.dir.join(LOG_NAME);
        let written = log.write_all(&bytes).and_then(|()| log.sync_data());
        if let Err(source) = written {
            // The tail may be torn now: never append after it; the next save starts afresh.
            self.log = None;
            return Err(LkgError::Io { action: "appending to", path, source });
        }
        self.log_bytes += u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(name: &str) -> pb::Resource {
        pb::Resource {
            kind: Some(pb::resource::Kind::Upstream(pb::Upstream {
                name: name.into(),
                endpoints: vec!["127.0.0.1:9".into()],
                revision: 3,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none(), "no file yet");
        let map = resource_map(vec![upstream("a"), upstream("b")]).unwrap();
        let nested = dir.path().join("cache");
        save(&nested, 42, &map).unwrap();
        let (version, loaded) = load(&nested).unwrap().unwrap();
        assert_eq!((version, &loaded), (42, &map));
        assert!(!nested.join(TEMP_NAME).exists());
        // the file is a plain ConfigResponse
        let decoded = ConfigResponse::decode(fs::read(nested.join(FILE_NAME)).unwrap().as_slice()).unwrap();
        assert_eq!((decoded.version, decoded.full, decoded.upserts.len()), (42, true, 2));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(nested.join(FILE_NAME)).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "owner-only: {mode:o}");
        }
        // a newer save replaces it
        save(&nested, 43, &ResourceMap::new()).unwrap();
        assert_eq!(load(&nested).unwrap().unwrap(), (43, ResourceMap::new()));
    }

    fn key(name: &str) -> (Kind, String) {
        (Kind::Upstream, name.to_owned())
    }

    /// Saves version 1 whole, then versions 2..=n as deltas (each adds an upstream, and some
    /// change or remove one); returns the map of each version.
    fn history(files: &mut LastKnownGood, n: i64) -> Vec<ResourceMap> {
        let mut map = resource_map(vec![upstream("a"), upstream("b")]).unwrap();
        files.save_delta(0, 1, &map, &[]).unwrap();
        let mut maps = vec![ResourceMap::new(), map.clone()];
        for v in 2..=n {
            let mut changed = vec![key(&format!("n{v}"))];
            map.insert(key(&format!("n{v}")), upstream(&format!("n{v}")));
            if v == 3 {
                map.remove(&key("a"));
                changed.push(key("a"));
            }
            if v == 4 {
                let mut b = upstream("b");
                if let Some(pb::resource::Kind::Upstream(u)) = &mut b.kind {
                    u.endpoints = vec!["127.0.0.1:4".into()];
                }
                map.insert(key("b"), b);
                changed.push(key("b"));
            }
            files.save_delta(v - 1, v, &map, &changed).unwrap();
            maps.push(map.clone());
        }
        maps
    }

    fn snapshot_version(dir: &Path) -> i64 {
        ConfigResponse::decode(fs::read(dir.join(FILE_NAME)).unwrap().as_slice()).unwrap().version
    }

    #[test]
    fn deltas_are_appended_and_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let mut files = LastKnownGood::new(path.clone());
        let maps = history(&mut files, 6);
        // One whole snapshot (the first save), then log records only.
        assert_eq!(snapshot_version(&path), 1);
        assert_eq!(load(&path).unwrap().unwrap(), (6, maps[6].clone()));
        // A restarted proxy picks up where it was and appends on.
        let mut files = LastKnownGood::new(path.clone());
        assert_eq!(files.load().unwrap().unwrap(), (6, maps[6].clone()));
        let mut next = maps[6].clone();
        next.remove(&key("b"));
        files.save_delta(6, 7, &next, &[key("b")]).unwrap();
        assert_eq!(load(&path).unwrap().unwrap(), (7, next.clone()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(path.join(LOG_NAME)).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "owner-only: {mode:o}");
        }
        // A full configuration replaces both files.
        files.save_full(8, &maps[2]).unwrap();
        assert_eq!(fs::metadata(path.join(LOG_NAME)).unwrap().len(), 0);
        assert_eq!(load(&path).unwrap().unwrap(), (8, maps[2].clone()));
    }

    #[test]
    fn a_torn_or_corrupt_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = LastKnownGood::new(dir.path().to_owned());
        let maps = history(&mut files, 5);
        let log = dir.path().join(LOG_NAME);
        let whole = fs::read(&log).unwrap();
        // A crash mid-append: every cut short of the last record's end restores version 4.
        let last = records(&whole).map(|((end, _), _)| end).collect::<Vec<_>>();
        let (v4_end, v5_end) = (last[last.len() - 2], last[last.len() - 1]);
        assert_eq!(v5_end, whole.len());
        for cut in [v4_end + 1, v4_end + HEADER_LEN, v5_end - 1] {
            fs::write(&log, &whole[..cut]).unwrap();
            assert_eq!(load(dir.path()).unwrap().unwrap(), (4, maps[4].clone()), "cut at {cut}");
        }
        // A flipped bit in the last record: its checksum fails.
        let mut flipped = whole.clone();
        flipped[v5_end - 2] ^= 0x10;
        fs::write(&log, &flipped).unwrap();
        assert_eq!(load(dir.path()).unwrap().unwrap(), (4, maps[4].clone()));
        // Loading for appends cuts the bad tail off, so the next record is readable.
        let mut files = LastKnownGood::new(dir.path().to_owned());
        assert_eq!(files.load().unwrap().unwrap().0, 4);
        assert_eq!(fs::metadata(&log).unwrap().len(), u64::try_from(v4_end).unwrap());
        files.save_delta(4, 9, &maps[2], &[key("a"), key("n3"), key("n4"), key("b")]).unwrap();
        assert_eq!(load(dir.path()).unwrap().unwrap(), (9, maps[2].clone()));
        // A record that does not chain on (a gap) ends the replay too.
        let mut gap = fs::read(&log).unwrap();
        let mut record = ConfigResponse { version: 11, base_version: 10, ..Default::default() }.encode_to_vec();
        let mut framed = u32::try_from(record.len()).unwrap().to_le_bytes().to_vec();
        framed.extend_from_slice(&crc32fast::hash(&record).to_le_bytes());
        framed.append(&mut record);
        gap.extend_from_slice(&framed);
        fs::write(&log, &gap).unwrap();
        assert_eq!(load(dir.path()).unwrap().unwrap().0, 9);
    }

    #[test]
    fn a_grown_log_is_compacted_and_stale_records_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = LastKnownGood::new(dir.path().to_owned());
        let maps = history(&mut files, 3);
        let old_log = fs::read(dir.path().join(LOG_NAME)).unwrap();
        files.log_bytes = COMPACT_AT_LEAST;
        let mut next = maps[3].clone();
        next.insert(key("z"), upstream("z"));
        files.save_delta(3, 4, &next, &[key("z")]).unwrap();
        assert_eq!(snapshot_version(dir.path()), 4);
        assert_eq!(fs::metadata(dir.path().join(LOG_NAME)).unwrap().len(), 0);
        assert_eq!(load(dir.path()).unwrap().unwrap(), (4, next.clone()));
        // A crash between the new snapshot and emptying the log: the old records (versions
        // 2 and 3, below the snapshot's) are skipped, and appends go on after them.
        fs::write(dir.path().join(LOG_NAME), &old_log).unwrap();
        let mut files = LastKnownGood::new(dir.path().to_owned());
        assert_eq!(files.load().unwrap().unwrap(), (4, next.clone()));
        next.remove(&key("z"));
        files.save_delta(4, 5, &next, &[key("z")]).unwrap();
        assert_eq!(load(dir.path()).unwrap().unwrap(), (5, next));
    }

    #[test]
    fn damaged_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), b"\xff\xff\xff").unwrap();
        assert!(matches!(load(dir.path()), Err(LkgError::Decode { .. })));
        let delta = ConfigResponse { version: 3, full: false, ..Default::default() };
        fs::write(dir.path().join(FILE_NAME), delta.encode_to_vec()).unwrap();
        assert!(matches!(load(dir.path()), Err(LkgError::Invalid { .. })));
        let twice = ConfigResponse {
            version: 3,
            full: true,
            upserts: vec![upstream("a"), upstream("a")],
            ..Default::default()
        };
        fs::write(dir.path().join(FILE_NAME), twice.encode_to_vec()).unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.ends_with("upstream a appears twice"), "{err}");
    }
}

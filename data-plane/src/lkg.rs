//! The last-known-good configuration on disk: the resources of the newest version this proxy
//! compiled and served, so that a proxy restarted while the control plane is away still serves
//! (DESIGN.md §5). One file, `config.pb`: a `portcullis.discovery.v1.ConfigResponse` with
//! `full = true` — the same message the control plane streams, so there is one format to decode.
//!
//! Writes are atomic: temp file, fsync, rename, fsync of the directory; a crash leaves either
//! the old file or the new one. The file may hold secrets (introspection client credentials),
//! so it is created readable by the owner only. It must only ever be written with a version
//! that compiled; loading it still compiles it again (the caller does) rather than trusting it.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use portcullis_proto::config::v1 as pb;
use portcullis_proto::discovery::v1::ConfigResponse;
use portcullis_shared::Kind;
use prost::Message;

use crate::snapshot::ResourceMap;

pub const FILE_NAME: &str = "config.pb";
const TEMP_NAME: &str = "config.pb.tmp";

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

/// Atomically replaces `dir/config.pb` with `resources` at `version`; creates `dir` if needed.
/// Blocking: call it on the blocking pool.
pub fn save(dir: &Path, version: i64, resources: &ResourceMap) -> Result<(), LkgError> {
    let io = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| LkgError::Io { action, path, source }
    };
    fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let temp = dir.join(TEMP_NAME);
    let target = dir.join(FILE_NAME);
    let bytes = encode(version, resources);
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&temp).map_err(io("creating", &temp))?;
    file.write_all(&bytes).map_err(io("writing", &temp))?;
    file.sync_all().map_err(io("syncing", &temp))?;
    drop(file);
    fs::rename(&temp, &target).map_err(io("renaming into", &target))?;
    // The rename is durable only once the directory entry is.
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("syncing", dir))?;
    Ok(())
}

/// The saved version and resources; `Ok(None)` when there is no file yet.
pub fn load(dir: &Path) -> Result<Option<(i64, ResourceMap)>, LkgError> {
    let path = dir.join(FILE_NAME);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LkgError::Io { action: "reading", path, source }),
    };
    decode(&path, &bytes).map(Some)
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

//! Imports into the filesystem store, and how they become visible.
//!
//! `pullgate import` runs beside a server that holds the store. It stages
//! the bundle in a store of its own under `imports/<id>/`, verifies it
//! there, and only then writes a commit record, `imports/<id>.json`, which
//! lists the blobs and tags it brings. That record is the commit point:
//!
//! - before it, nothing of the import is under `blobs/` or `tags/`; a crash
//!   leaves a staging directory, removed by the next import or start-up;
//! - after it, applying the record (moving the staged blobs into place,
//!   then writing the tags) can be repeated any number of times with the
//!   same result, so whoever finds a record applies it: the running server
//!   (within a second, updating its index and tag cache), the next start-up,
//!   or the import itself when no server runs.
//!
//! ```text
//! imports/lock          held (flock) by the import running, one at a time
//! imports/<id>/         the staging store of an import (an FsStore root)
//! imports/<id>.json     its commit record: everything verified, to be applied
//! ```

use std::fs::{self, File};
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::fs::{FsStore, Inner};
use super::{TagKey, TagRecord};
use crate::fsutil::sync_dir;
use crate::oci::names::{Digest, RepoName, Tag};

/// What an import brings, once all of it verified.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Commit {
    pub id: String,
    /// When the bundle was made (unix seconds): the time of its tag records.
    pub created: u64,
    pub blobs: Vec<CommitBlob>,
    pub tags: Vec<CommitTag>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitBlob {
    pub digest: Digest,
    pub size: u64,
    /// The media type, for a manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitTag {
    pub upstream: String,
    pub repo: RepoName,
    pub tag: Tag,
    pub digest: Digest,
}

/// What applying a record did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub imports: usize,
    pub blobs: usize,
    pub tags: usize,
}

fn imports_dir(root: &Path) -> PathBuf {
    root.join("imports")
}

/// The import lock of the store at `root`, held for the life of the file;
/// `WouldBlock` when another import holds it.
pub fn lock_imports(root: &Path) -> io::Result<File> {
    let dir = imports_dir(root);
    fs::create_dir_all(&dir)?;
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(fs::TryLockError::WouldBlock) => Err(io::Error::new(
            ErrorKind::WouldBlock,
            "another import is running on this store (imports/lock is held)",
        )),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Whether a server holds the store at `root` (its lock file is locked).
pub fn server_running(root: &Path) -> bool {
    let Ok(f) = fs::OpenOptions::new().write(true).open(root.join("lock")) else {
        return false;
    };
    matches!(f.try_lock(), Err(fs::TryLockError::WouldBlock))
}

/// Where an import stages its bundle.
pub fn staging_dir(root: &Path, id: &str) -> PathBuf {
    imports_dir(root).join(id)
}

/// A fresh import id: time and process, sortable.
pub fn new_id() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}-{}", now.as_secs(), std::process::id())
}

fn record_path(root: &Path, id: &str) -> PathBuf {
    imports_dir(root).join(format!("{id}.json"))
}

/// Writes the commit record: from here on the import happens.
pub fn write_commit(root: &Path, commit: &Commit) -> io::Result<PathBuf> {
    let path = record_path(root, &commit.id);
    let bytes = serde_json::to_vec_pretty(commit).map_err(io::Error::other)?;
    crate::fsutil::replace_file(&path, &bytes)?;
    Ok(path)
}

/// Whether the commit record of `id` is still waiting to be applied.
pub fn pending(root: &Path, id: &str) -> bool {
    record_path(root, id).exists()
}

/// Removes staging directories that no commit record names. Only call with
/// the import lock held (no import is staging).
pub fn remove_stale_staging(root: &Path) -> io::Result<usize> {
    let dir = imports_dir(root);
    let mut removed = 0;
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if pending(root, &name) {
            continue;
        }
        fs::remove_dir_all(entry.path())?;
        tracing::info!(import = %name, "removed what an unfinished import had staged");
        removed += 1;
    }
    Ok(removed)
}

impl Inner {
    /// Applies every commit record found; a record that cannot be read is
    /// moved aside (`.unreadable`), never half applied.
    pub(super) fn apply_pending(&self) -> io::Result<Applied> {
        let dir = imports_dir(&self.root);
        let mut done = Applied::default();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(done),
            Err(e) => return Err(e),
        };
        let mut records: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        records.sort();
        for path in records {
            let commit: Commit = match fs::read(&path) {
                Ok(b) => match serde_json::from_slice(&b) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(path = %path.display(), "unreadable import record, set aside: {e}");
                        let _ = fs::rename(&path, path.with_extension("unreadable"));
                        continue;
                    }
                },
                // Applied and removed by someone else meanwhile.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let n = match self.apply(&commit) {
                Ok(n) => n,
                // A staged blob is gone (removed by hand): the record can
                // never be applied; set aside so that it does not block
                // every start-up, and said loudly.
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    tracing::error!(import = %commit.id, "import record cannot be applied, set aside: {e}");
                    let _ = fs::rename(&path, path.with_extension("failed"));
                    continue;
                }
                Err(e) => return Err(e),
            };
            done.imports += 1;
            done.blobs += n.blobs;
            done.tags += n.tags;
            tracing::info!(import = %commit.id, blobs = n.blobs, tags = n.tags, "import applied");
        }
        Ok(done)
    }

    /// Moves an import's staged blobs into place, then writes its tags.
    /// Repeatable: what is already in place stays.
    fn apply(&self, c: &Commit) -> io::Result<Applied> {
        let staged = staging_dir(&self.root, &c.id);
        for b in &c.blobs {
            let dest = self.blob_path(&b.digest);
            let hex = b.digest.hex();
            let from = staged.join("blobs/sha256").join(&hex[..2]).join(&hex);
            let dir = dest.parent().unwrap_or(&self.root).to_path_buf();
            fs::create_dir_all(&dir)?;
            if !dest.exists() {
                match fs::rename(&from, &dest) {
                    Ok(()) => sync_dir(&dir),
                    Err(e) if e.kind() == ErrorKind::NotFound && dest.exists() => {}
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!(
                                "import {}: cannot move blob {} into place: {e}",
                                c.id, b.digest
                            ),
                        ))
                    }
                }
            }
            if let Some(media_type) = &b.manifest {
                let marker = self.root.join(super::fs::manifest_type_rel(&b.digest));
                if !marker.exists() {
                    self.write_atomic(&marker, media_type.as_bytes())?;
                }
            }
            let size = fs::metadata(&dest).map(|m| m.len()).unwrap_or(b.size);
            self.index.record(&b.digest, size, b.manifest.is_some());
        }
        let checked = UNIX_EPOCH
            .checked_add(Duration::from_secs(c.created))
            .unwrap_or(UNIX_EPOCH);
        for t in &c.tags {
            let key = TagKey {
                upstream: Arc::from(t.upstream.as_str()),
                repo: t.repo.clone(),
                tag: t.tag.clone(),
            };
            let digest = t.digest;
            self.update_tag(
                &key,
                Box::new(move |_| {
                    Some(TagRecord {
                        digest,
                        checked,
                        approved: Some(digest),
                    })
                }),
            )?;
        }
        match fs::remove_file(record_path(&self.root, &c.id)) {
            Ok(()) => sync_dir(&imports_dir(&self.root)),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // What is left staged (copies of blobs the store had) goes.
        if let Err(e) = fs::remove_dir_all(&staged) {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!(import = %c.id, "cannot remove the staging directory: {e}");
            }
        }
        Ok(Applied {
            imports: 1,
            blobs: c.blobs.len(),
            tags: c.tags.len(),
        })
    }
}

impl FsStore {
    /// Applies the commit records waiting in this store (see the module).
    pub fn apply_imports(&self) -> io::Result<Applied> {
        self.inner().apply_pending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::store::{put_blob, Store};
    use bytes::Bytes;

    fn commit(id: &str, d: Digest, size: u64) -> Commit {
        Commit {
            id: id.to_owned(),
            created: 1_700_000_000,
            blobs: vec![CommitBlob {
                digest: d,
                size,
                manifest: None,
            }],
            tags: vec![CommitTag {
                upstream: "docker.io".into(),
                repo: "library/app".parse().unwrap(),
                tag: "1".parse().unwrap(),
                digest: d,
            }],
        }
    }

    #[tokio::test]
    async fn a_commit_applies_once_however_often_it_is_applied_and_a_broken_one_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let bytes = Bytes::from_static(b"imported");
        let d = Digest::of(&bytes);
        {
            let staged =
                FsStore::open(&staging_dir(root, "a"), None, Arc::new(Metrics::new())).unwrap();
            put_blob(&staged, d, bytes.clone()).await.unwrap();
        }
        write_commit(root, &commit("a", d, 8)).unwrap();
        // A record whose staged blob is gone can never be applied.
        let gone = Digest::of(b"gone");
        write_commit(root, &commit("b", gone, 4)).unwrap();
        let store = FsStore::open(root, None, Arc::new(Metrics::new())).unwrap();
        assert!(store.has_blob(&d), "applied before the index was built");
        assert!(!pending(root, "a") && !staging_dir(root, "a").exists());
        assert!(!pending(root, "b") && root.join("imports/b.failed").exists());
        let key = TagKey {
            upstream: "docker.io".into(),
            repo: "library/app".parse().unwrap(),
            tag: "1".parse().unwrap(),
        };
        let rec = store.tag(&key).await.unwrap().unwrap();
        assert_eq!((rec.digest, rec.approved), (d, Some(d)));
        assert_eq!(rec.checked, UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        // Applying the same record again (a second applier) changes nothing.
        write_commit(root, &commit("a", d, 8)).unwrap();
        assert_eq!(store.apply_imports().unwrap().imports, 1);
        assert!(store.open(&d).await.unwrap().is_some());
    }
}

//! The content store on disk: blobs and manifests by digest, tags by name.
//!
//! Layout under the data directory:
//!
//! ```text
//! blobs/sha256/<2 hex>/<64 hex>        blob and manifest bytes, by digest
//! manifests/sha256/<2 hex>/<64 hex>    a manifest's media type
//! tags/<upstream>/<repo>/_tags/<tag>   {"digest": ..., "checked": unix secs,
//!                                       "approved": the last digest policy approved}
//! bases/history.json                   every digest each base tag has had
//! tmp/                                 files being written; emptied at start-up
//! ```
//!
//! A file appears under a digest only after its bytes were hashed and matched
//! (by the caller), synced, and atomically renamed into place; tag records are
//! written the same way. A crash therefore leaves at worst temp files, which
//! [`Store::open`] removes. Blobs beyond `max_size` are evicted least recently
//! used first, never while a reader holds them. Depends on `names`, `metrics`.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::metrics::Metrics;
use crate::names::{Digest, RepoName, Tag};

/// A manifest held in the store.
#[derive(Debug, Clone)]
pub struct StoredManifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// What a tag last resolved to, and when that was checked upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagRecord {
    pub digest: Digest,
    pub checked: SystemTime,
    /// The last digest policy approved for this tag (tag-drift protection).
    pub approved: Option<Digest>,
}

/// Identifies a tag: upstream, repository, tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TagKey {
    pub upstream: Arc<str>,
    pub repo: RepoName,
    pub tag: Tag,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TagFile {
    digest: Digest,
    checked: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    approved: Option<Digest>,
}

struct BlobInfo {
    size: u64,
    /// Unix seconds of the last read; persisted as the file's mtime.
    last_access: u64,
    /// Manifests are small and needed to answer tags: never evicted.
    manifest: bool,
}

#[derive(Default)]
struct Index {
    blobs: HashMap<Digest, BlobInfo>,
    total: u64,
    /// Blobs being read right now, with their reader counts.
    readers: HashMap<Digest, usize>,
}

/// Keeps a blob from eviction while it is being served.
pub struct ReadGuard {
    index: Arc<Mutex<Index>>,
    digest: Digest,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut idx = self.index.lock().expect("store index lock");
        if let Some(n) = idx.readers.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                idx.readers.remove(&self.digest);
            }
        }
    }
}

/// An open blob ready to serve.
pub struct OpenBlob {
    pub file: File,
    pub size: u64,
    pub guard: ReadGuard,
}

/// The store. Cheap to share behind an `Arc`.
pub struct Store {
    /// Held (flock) for the life of the store.
    _lock: File,
    root: PathBuf,
    max_size: Option<u64>,
    index: Arc<Mutex<Index>>,
    /// Recently used manifests, so a cached pull touches no disk.
    manifests: moka::sync::Cache<Digest, Arc<StoredManifest>>,
    /// Tag records read or written since start-up.
    tags: moka::sync::Cache<TagKey, TagRecord>,
    /// Serialises read-modify-write updates of tag records.
    tag_updates: Mutex<()>,
    temp_seq: AtomicU64,
    metrics: Arc<Metrics>,
}

/// Only re-stamp a blob's access time when it is older than this.
const ACCESS_GRANULARITY: u64 = 60;

impl Store {
    /// Opens (creating) the store at `root`, removes leftover temp files and
    /// indexes the blobs on disk.
    pub fn open(root: &Path, max_size: Option<u64>, metrics: Arc<Metrics>) -> io::Result<Store> {
        for dir in ["blobs/sha256", "manifests/sha256", "tags", "tmp"] {
            fs::create_dir_all(root.join(dir))?;
        }
        // One pullgate per store: a second one would delete the first one's
        // temp files below and race it on evictions.
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("lock"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    ErrorKind::WouldBlock,
                    "another pullgate process is using this store (its lock file is held)",
                ))
            }
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        let mut removed = 0;
        for entry in fs::read_dir(root.join("tmp"))? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                fs::remove_dir_all(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(removed, "removed temp files left by an earlier run");
        }
        let mut index = Index::default();
        let blobs = root.join("blobs/sha256");
        for prefix in fs::read_dir(&blobs)? {
            let prefix = prefix?;
            if !prefix.file_type()?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(prefix.path())? {
                let entry = entry?;
                let name = entry.file_name();
                let Some(digest) = name
                    .to_str()
                    .and_then(|n| format!("sha256:{n}").parse::<Digest>().ok())
                else {
                    tracing::warn!(path = %entry.path().display(), "ignoring a file that is not named by a digest");
                    continue;
                };
                let meta = entry.metadata()?;
                let manifest = root.join(manifest_type_rel(&digest)).exists();
                index.total += meta.len();
                index.blobs.insert(
                    digest,
                    BlobInfo {
                        size: meta.len(),
                        last_access: unix(meta.modified().unwrap_or(UNIX_EPOCH)),
                        manifest,
                    },
                );
            }
        }
        metrics.store_size.set(index.total as i64);
        tracing::info!(
            path = %root.display(),
            blobs = index.blobs.len(),
            bytes = index.total,
            "store opened"
        );
        let store = Store {
            _lock: lock,
            root: root.to_path_buf(),
            max_size,
            index: Arc::new(Mutex::new(index)),
            manifests: moka::sync::Cache::builder()
                .max_capacity(64 * 1024 * 1024)
                .weigher(|_, m: &Arc<StoredManifest>| m.bytes.len().try_into().unwrap_or(u32::MAX))
                .build(),
            tags: moka::sync::Cache::builder().max_capacity(100_000).build(),
            tag_updates: Mutex::new(()),
            temp_seq: AtomicU64::new(0),
            metrics,
        };
        store.evict();
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob (or manifest) with this digest lives.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root.join("blobs/sha256").join(&hex[..2]).join(hex)
    }

    /// Total bytes held.
    pub fn size(&self) -> u64 {
        self.index.lock().expect("store index lock").total
    }

    /// Whether a blob is in the store.
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.index
            .lock()
            .expect("store index lock")
            .blobs
            .contains_key(d)
    }

    /// Opens a stored blob for reading and pins it against eviction.
    pub fn open_blob(&self, d: &Digest) -> io::Result<Option<OpenBlob>> {
        let guard = {
            let mut idx = self.index.lock().expect("store index lock");
            if !idx.blobs.contains_key(d) {
                return Ok(None);
            }
            *idx.readers.entry(*d).or_insert(0) += 1;
            ReadGuard {
                index: self.index.clone(),
                digest: *d,
            }
        };
        let path = self.blob_path(d);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                // Removed behind our back: forget it, it will be fetched again.
                tracing::warn!(digest = %d, "blob missing from disk; dropping it from the index");
                self.forget(d);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let size = file.metadata()?.len();
        self.touch(d, &file);
        Ok(Some(OpenBlob { file, size, guard }))
    }

    /// Pins a blob that is being committed by a fetch, for its followers.
    pub fn pin(&self, d: &Digest) -> ReadGuard {
        let mut idx = self.index.lock().expect("store index lock");
        *idx.readers.entry(*d).or_insert(0) += 1;
        ReadGuard {
            index: self.index.clone(),
            digest: *d,
        }
    }

    fn touch(&self, d: &Digest, file: &File) {
        let now = unix(SystemTime::now());
        let stale = {
            let mut idx = self.index.lock().expect("store index lock");
            match idx.blobs.get_mut(d) {
                Some(info) if now.saturating_sub(info.last_access) >= ACCESS_GRANULARITY => {
                    info.last_access = now;
                    true
                }
                _ => false,
            }
        };
        if stale {
            // Persist the access time so LRU order survives restarts; best effort.
            let _ = file.set_modified(SystemTime::now());
        }
    }

    fn forget(&self, d: &Digest) {
        let mut idx = self.index.lock().expect("store index lock");
        if let Some(info) = idx.blobs.remove(d) {
            idx.total -= info.size;
            self.metrics.store_size.set(idx.total as i64);
        }
    }

    /// Creates a new empty temp file for content being fetched.
    pub fn temp_file(&self) -> io::Result<(PathBuf, File)> {
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let path = self
            .root
            .join("tmp")
            .join(format!("{}-{seq}-{nanos}", std::process::id()));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((path, file))
    }

    /// Moves a fully written, synced and digest-checked temp file into place.
    /// Blocking: call from a blocking context.
    pub fn commit_blob(&self, temp: &Path, d: &Digest, size: u64) -> io::Result<()> {
        let dest = self.blob_path(d);
        let dir = dest.parent().expect("blob path has a parent");
        fs::create_dir_all(dir)?;
        fs::rename(temp, &dest)?;
        sync_dir(dir);
        self.record(d, size, false);
        self.evict();
        Ok(())
    }

    fn record(&self, d: &Digest, size: u64, manifest: bool) {
        let mut idx = self.index.lock().expect("store index lock");
        let now = unix(SystemTime::now());
        if let Some(old) = idx.blobs.insert(
            *d,
            BlobInfo {
                size,
                last_access: now,
                manifest,
            },
        ) {
            idx.total -= old.size;
        }
        idx.total += size;
        self.metrics.store_size.set(idx.total as i64);
    }

    /// Stores a manifest whose bytes the caller has checked against `digest`.
    /// Blocking: call from a blocking context.
    pub fn put_manifest(&self, m: Arc<StoredManifest>) -> io::Result<()> {
        let type_path = self.root.join(manifest_type_rel(&m.digest));
        write_atomic(self, &type_path, m.media_type.as_bytes())?;
        let dest = self.blob_path(&m.digest);
        write_atomic(self, &dest, &m.bytes)?;
        self.record(&m.digest, m.bytes.len() as u64, true);
        self.manifests.insert(m.digest, m);
        Ok(())
    }

    /// A stored manifest, from memory or disk. Bytes read from disk are
    /// hashed again; a corrupt file is treated as absent.
    pub fn get_manifest(&self, d: &Digest) -> io::Result<Option<Arc<StoredManifest>>> {
        if let Some(m) = self.manifests.get(d) {
            return Ok(Some(m));
        }
        let media_type = match fs::read_to_string(self.root.join(manifest_type_rel(d))) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let bytes = match fs::read(self.blob_path(d)) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if Digest::of(&bytes) != *d {
            tracing::error!(digest = %d, "stored manifest does not match its digest; ignoring it");
            return Ok(None);
        }
        let m = Arc::new(StoredManifest {
            digest: *d,
            media_type,
            bytes: Bytes::from(bytes),
        });
        self.manifests.insert(*d, m.clone());
        Ok(Some(m))
    }

    /// What a tag last resolved to.
    pub fn get_tag(&self, key: &TagKey) -> Option<TagRecord> {
        if let Some(r) = self.tags.get(key) {
            return Some(r);
        }
        let rec = read_tag_record(&self.root, key)?;
        self.tags.insert(key.clone(), rec);
        Some(rec)
    }

    /// Records what a tag resolves to. Blocking: call from a blocking context.
    pub fn put_tag(&self, key: &TagKey, rec: TagRecord) -> io::Result<()> {
        let file = TagFile {
            digest: rec.digest,
            checked: unix(rec.checked),
            approved: rec.approved,
        };
        let bytes = serde_json::to_vec(&file).expect("tag record to JSON");
        write_atomic(self, &self.tag_path(key), &bytes)?;
        self.tags.insert(key.clone(), rec);
        Ok(())
    }

    /// Remembers a tag in memory only, as checked at `checked`: used after an
    /// upstream failure so the next re-check waits a little.
    pub fn defer_tag(&self, key: &TagKey, rec: TagRecord, checked: SystemTime) {
        self.tags.insert(key.clone(), TagRecord { checked, ..rec });
    }

    /// Forgets a tag (the upstream says it no longer exists).
    pub fn remove_tag(&self, key: &TagKey) {
        self.tags.invalidate(key);
        let _ = fs::remove_file(self.tag_path(key));
    }

    /// Records the digest policy approved for a tag, keeping what the tag
    /// resolves to. Blocking: call from a blocking context.
    pub fn set_tag_approved(&self, key: &TagKey, digest: Digest) -> io::Result<()> {
        self.update_tag(key, |old| {
            let rec = old.unwrap_or(TagRecord {
                digest,
                checked: SystemTime::now(),
                approved: None,
            });
            TagRecord {
                approved: Some(digest),
                ..rec
            }
        })
    }

    /// Replaces a tag record with `f(current record)`, one update at a time,
    /// so concurrent updates of different fields do not undo each other.
    /// Blocking: call from a blocking context.
    pub fn update_tag(
        &self,
        key: &TagKey,
        f: impl FnOnce(Option<TagRecord>) -> TagRecord,
    ) -> io::Result<()> {
        let _one_at_a_time = self.tag_updates.lock().expect("tag update lock");
        let rec = f(self.get_tag(key));
        self.put_tag(key, rec)
    }

    /// Writes a metadata file under the store root (`rel` is a fixed,
    /// trusted path) through a temp file and a rename.
    pub fn write_meta(&self, rel: &str, bytes: &[u8]) -> io::Result<()> {
        write_atomic(self, &self.root.join(rel), bytes)
    }

    /// Reads a metadata file written by [`Store::write_meta`]; `None` when absent.
    pub fn read_meta(&self, rel: &str) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.root.join(rel)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn tag_path(&self, key: &TagKey) -> PathBuf {
        tag_path(&self.root, key)
    }

    /// Removes least recently used blobs until the store fits `max_size`.
    pub fn evict(&self) {
        let Some(max) = self.max_size else { return };
        let victims: Vec<(Digest, u64)> = {
            let idx = self.index.lock().expect("store index lock");
            if idx.total <= max {
                return;
            }
            let mut candidates: Vec<(&Digest, &BlobInfo)> = idx
                .blobs
                .iter()
                .filter(|(d, info)| !info.manifest && !idx.readers.contains_key(*d))
                .collect();
            candidates.sort_by_key(|(_, info)| info.last_access);
            let mut excess = idx.total - max;
            let mut out = Vec::new();
            for (d, info) in candidates {
                if excess == 0 {
                    break;
                }
                out.push((*d, info.size));
                excess = excess.saturating_sub(info.size);
            }
            out
        };
        for (d, size) in victims {
            // Re-check under the lock: a reader may have arrived meanwhile.
            let mut idx = self.index.lock().expect("store index lock");
            if idx.readers.contains_key(&d) || !idx.blobs.contains_key(&d) {
                continue;
            }
            match fs::remove_file(self.blob_path(&d)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(digest = %d, error = %e, "could not evict blob");
                    continue;
                }
            }
            idx.blobs.remove(&d);
            idx.total -= size;
            self.metrics.store_size.set(idx.total as i64);
            self.metrics
                .evictions
                .with_label_values(&["max_size"])
                .inc();
            tracing::info!(digest = %d, size, "evicted blob (store over max_size)");
        }
    }

    /// Checks that the store is writable (for `/readyz`).
    pub fn probe(&self) -> io::Result<()> {
        let (path, _file) = self.temp_file()?;
        fs::remove_file(path)
    }
}

fn tag_path(root: &Path, key: &TagKey) -> PathBuf {
    // Names and tags are validated: no `..`, no `/` in a tag, and `_tags`
    // cannot be a repository component (components start alphanumeric).
    root.join("tags")
        .join(&*key.upstream)
        .join(key.repo.as_str())
        .join("_tags")
        .join(key.tag.as_str())
}

/// A tag record as the store at `root` holds it on disk. Reads only, so
/// it works next to a running server (which holds the store's lock).
pub fn read_tag_record(root: &Path, key: &TagKey) -> Option<TagRecord> {
    let file: TagFile = serde_json::from_slice(&fs::read(tag_path(root, key)).ok()?).ok()?;
    Some(TagRecord {
        digest: file.digest,
        checked: UNIX_EPOCH + Duration::from_secs(file.checked),
        approved: file.approved,
    })
}

/// Writes `bytes` to `dest` through a synced temp file and a rename.
fn write_atomic(store: &Store, dest: &Path, bytes: &[u8]) -> io::Result<()> {
    fs::create_dir_all(dest.parent().expect("destination has a parent"))?;
    let (temp, file) = store.temp_file()?;
    finish_replace(&temp, file, dest, bytes)
}

/// Replaces `dest` with `bytes` through a synced temp file next to it and a
/// rename: a failure (read-only directory, full disk) leaves `dest` as it
/// was. For files outside the content store's own layout (approvals, the
/// pins file); the store's files go through its `tmp/`.
pub fn replace_file(dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let file = File::create(&temp)?;
    finish_replace(&temp, file, dest, bytes)
}

fn finish_replace(temp: &Path, mut file: File, dest: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let result = file
        .write_all(bytes)
        .and_then(|()| file.sync_data())
        .and_then(|()| fs::rename(temp, dest));
    if result.is_err() {
        let _ = fs::remove_file(temp);
    }
    result?;
    if let Some(dir) = dest.parent() {
        sync_dir(dir);
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn manifest_type_rel(d: &Digest) -> PathBuf {
    let hex = d.hex();
    Path::new("manifests/sha256").join(&hex[..2]).join(hex)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn store(dir: &Path, max: Option<u64>) -> Store {
        Store::open(dir, max, Arc::new(Metrics::new())).unwrap()
    }

    fn put_blob(s: &Store, bytes: &[u8]) -> Digest {
        let d = Digest::of(bytes);
        let (temp, mut f) = s.temp_file().unwrap();
        f.write_all(bytes).unwrap();
        s.commit_blob(&temp, &d, bytes.len() as u64).unwrap();
        d
    }

    #[test]
    fn startup_removes_temp_files_and_indexes_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let d = {
            let s = store(dir.path(), None);
            let d = put_blob(&s, b"hello");
            let (_temp, mut f) = s.temp_file().unwrap();
            f.write_all(b"half a blo").unwrap();
            d
        };
        let s = store(dir.path(), None);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert!(s.has_blob(&d));
        assert_eq!(s.size(), 5);
        let open = s.open_blob(&d).unwrap().unwrap();
        assert_eq!(open.size, 5);
    }

    #[test]
    fn a_store_is_used_by_one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = store(dir.path(), None);
        let second = Store::open(dir.path(), None, Arc::new(Metrics::new()));
        assert_eq!(second.err().map(|e| e.kind()), Some(ErrorKind::WouldBlock));
        drop(first);
        assert!(Store::open(dir.path(), None, Arc::new(Metrics::new())).is_ok());
    }

    #[test]
    fn manifests_and_tags_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = Bytes::from_static(br#"{"schemaVersion":2}"#);
        let d = Digest::of(&bytes);
        let key = TagKey {
            upstream: Arc::from("docker.io"),
            repo: "library/alpine".parse().unwrap(),
            tag: "3".parse().unwrap(),
        };
        let when = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        {
            let s = store(dir.path(), None);
            s.put_manifest(Arc::new(StoredManifest {
                digest: d,
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                bytes: bytes.clone(),
            }))
            .unwrap();
            s.put_tag(
                &key,
                TagRecord {
                    digest: d,
                    checked: when,
                    approved: Some(d),
                },
            )
            .unwrap();
        }
        let s = store(dir.path(), None);
        let m = s.get_manifest(&d).unwrap().unwrap();
        assert_eq!(m.bytes, bytes);
        assert_eq!(m.media_type, "application/vnd.oci.image.manifest.v1+json");
        assert_eq!(
            s.get_tag(&key),
            Some(TagRecord {
                digest: d,
                checked: when,
                approved: Some(d),
            })
        );
    }

    #[test]
    fn corrupt_manifest_on_disk_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = Bytes::from_static(b"{}");
        let d = Digest::of(&bytes);
        {
            let s = store(dir.path(), None);
            s.put_manifest(Arc::new(StoredManifest {
                digest: d,
                media_type: "application/json".into(),
                bytes,
            }))
            .unwrap();
            fs::write(s.blob_path(&d), b"{ }").unwrap();
        }
        let s = store(dir.path(), None);
        assert!(s.get_manifest(&d).unwrap().is_none());
    }

    #[test]
    fn eviction_removes_least_recently_used_but_not_blobs_being_read() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), Some(25));
        let a = put_blob(&s, &[b'a'; 10]);
        let reader = s.open_blob(&a).unwrap().unwrap();
        // Make `a` the oldest.
        s.index
            .lock()
            .unwrap()
            .blobs
            .get_mut(&a)
            .unwrap()
            .last_access = 1;
        let b = put_blob(&s, &[b'b'; 10]);
        s.index
            .lock()
            .unwrap()
            .blobs
            .get_mut(&b)
            .unwrap()
            .last_access = 2;
        let c = put_blob(&s, &[b'c'; 10]);
        // 30 > 25: `a` is the LRU but is being read, so `b` goes.
        assert!(s.has_blob(&a));
        assert!(!s.has_blob(&b));
        assert!(s.has_blob(&c));
        assert!(!s.blob_path(&b).exists());
        drop(reader);
        let d = put_blob(&s, &[b'd'; 10]);
        assert!(!s.has_blob(&a), "a is evicted once its reader is gone");
        assert!(s.has_blob(&c) && s.has_blob(&d));
        assert_eq!(s.size(), 20);
    }
}

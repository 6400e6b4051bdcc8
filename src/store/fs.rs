//! The store on disk.
//!
//! Layout under the data directory:
//!
//! ```text
//! blobs/sha256/<2 hex>/<64 hex>        blob and manifest bytes, by digest
//! manifests/sha256/<2 hex>/<64 hex>    marks a blob as a manifest (holds its media
//!                                       type for people; a manifest's type is read
//!                                       from its bytes, never from here)
//! tags/<upstream>/<repo>/_tags/<tag>   {"digest": ..., "checked": unix secs,
//!                                       "approved": the last digest policy approved}
//! approvals/sha256/<hex>/<id>.json     approvals recorded by `pullgate approve`
//! bases/history.json                   every digest each base tag has had
//! imports/                             bundles being imported ([`super::imports`])
//! tmp/                                 files being written; emptied at start-up
//! ```
//!
//! A file appears under a digest only after its bytes were hashed and
//! matched, synced, and atomically renamed into place; every other file is
//! replaced the same way. A crash therefore leaves at worst temp files, which
//! [`FsStore::open`] removes. Blocking work runs on tokio's blocking pool.

use std::fs::{self, File};
use std::io::{self, ErrorKind};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use super::index::{unix, Entry, Index, ReadGuard};
use super::{
    BlobHandle, BlobWriter, Source, Store, StoreFuture, TagKey, TagRecord, TagUpdate, WriteError,
};
use crate::fsutil::{finish_replace, sync_dir};
use crate::metrics::Metrics;
use crate::oci::names::{Digest, Hasher};
use crate::oci::Manifest;

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct TagFile {
    digest: Digest,
    checked: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    approved: Option<Digest>,
}

impl TagFile {
    /// A tag record as stored (on disk and in a shared bucket).
    pub(super) fn encode(rec: &TagRecord) -> Vec<u8> {
        let file = TagFile {
            digest: rec.digest,
            checked: unix(rec.checked),
            approved: rec.approved,
        };
        serde_json::to_vec(&file).expect("JSON of plain values")
    }

    /// A stored tag record; `None` when it cannot be read.
    pub(super) fn decode(bytes: &[u8]) -> Option<TagRecord> {
        let file: TagFile = serde_json::from_slice(bytes).ok()?;
        Some(TagRecord {
            digest: file.digest,
            // A damaged record's time is no reason to fail: long ago.
            checked: UNIX_EPOCH
                .checked_add(Duration::from_secs(file.checked))
                .unwrap_or(UNIX_EPOCH),
            approved: file.approved,
        })
    }
}

/// At most this many approvals are read for one digest.
const MAX_APPROVALS: usize = 32;

/// The filesystem store. Cheap to clone.
#[derive(Clone)]
pub struct FsStore(Arc<Inner>);

pub(super) struct Inner {
    /// Held (flock) for the life of the store; `None` when attached.
    _lock: Option<File>,
    /// Names this store across restarts (`tier-id` in its root); `None`
    /// when attached.
    id: Option<String>,
    pub(super) root: PathBuf,
    /// Attached beside a running server: no index, so blobs are looked up
    /// on disk.
    attached: bool,
    pub(super) index: Index,
    /// Recently used manifests, so a cached pull touches no disk.
    manifests: moka::sync::Cache<Digest, Arc<Manifest>>,
    /// Tag records read or written since start-up.
    tags: moka::sync::Cache<TagKey, TagRecord>,
    /// Serialises read-modify-write updates of tag records.
    tag_updates: Mutex<()>,
    temp_seq: AtomicU64,
}

/// The store's name, from `tier-id` in its root, made at its first open.
/// Only its server (holding the lock) writes it.
fn tier_id(root: &Path) -> io::Result<String> {
    let path = root.join("tier-id");
    match fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let seed = format!(
        "{}:{}:{:?}",
        root.display(),
        std::process::id(),
        SystemTime::now()
    );
    let id = Digest::of(seed.as_bytes()).hex()[..16].to_owned();
    let temp = root.join("tmp/tier-id");
    fs::write(&temp, format!("{id}\n"))?;
    fs::rename(&temp, &path)?;
    sync_dir(root);
    Ok(id)
}

/// Runs blocking store work off the async worker threads.
fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> StoreFuture<'static, T> {
    async move {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(io::Error::other)?
    }
    .boxed()
}

impl FsStore {
    /// Opens (creating) the store at `root` for a server: takes its lock,
    /// removes leftover temp files and indexes the blobs on disk.
    pub fn open(root: &Path, max_size: Option<u64>, metrics: Arc<Metrics>) -> io::Result<FsStore> {
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
        // Imports committed but not yet applied (a crash, or no server ran)
        // are applied before the scan, so the index sees their blobs; what
        // unfinished imports staged goes, unless one is staging now.
        let index = Index::new(max_size, metrics);
        let early = FsStore::new(root, None, true, Index::new(None, Arc::new(Metrics::new())));
        let applied = early.0.apply_pending()?;
        if applied.imports > 0 {
            tracing::info!(
                imports = applied.imports,
                "applied imports committed before start-up"
            );
        }
        if let Ok(_import_lock) = super::imports::lock_imports(root) {
            super::imports::remove_stale_staging(root)?;
        }
        index.load(scan(root)?);
        tracing::info!(
            path = %root.display(),
            blobs = index.len(),
            bytes = index.total(),
            "store opened"
        );
        let id = tier_id(root)?;
        let mut store = FsStore::new(root, Some(lock), false, index);
        if let Some(inner) = Arc::get_mut(&mut store.0) {
            inner.id = Some(id);
        }
        store.0.evict();
        Ok(store)
    }

    /// The store at `root` as a command running beside a server sees it:
    /// no lock, no clean-up, no index. Writes (approvals) are atomic, so
    /// they are safe next to the server.
    pub fn attach(root: &Path) -> FsStore {
        let index = Index::new(None, Arc::new(Metrics::new()));
        FsStore::new(root, None, true, index)
    }

    fn new(root: &Path, lock: Option<File>, attached: bool, index: Index) -> FsStore {
        FsStore(Arc::new(Inner {
            _lock: lock,
            id: None,
            root: root.to_path_buf(),
            attached,
            index,
            manifests: moka::sync::Cache::builder()
                .max_capacity(64 * 1024 * 1024)
                .weigher(|_, m: &Arc<Manifest>| m.weight().try_into().unwrap_or(u32::MAX))
                .build(),
            tags: moka::sync::Cache::builder().max_capacity(100_000).build(),
            tag_updates: Mutex::new(()),
            temp_seq: AtomicU64::new(0),
        }))
    }

    pub fn root(&self) -> &Path {
        &self.0.root
    }

    /// The blobs held, from the index.
    pub fn digests(&self) -> Vec<Digest> {
        self.0.index.digests()
    }

    /// What names this store across restarts of its server (`None` when
    /// attached): a replica knows the leases its predecessor held by it.
    pub fn id(&self) -> Option<&str> {
        self.0.id.as_deref()
    }

    /// Whether the blob `d` is a manifest (kept from eviction).
    pub fn is_manifest(&self, d: &Digest) -> bool {
        self.0.index.is_manifest(d)
    }

    pub(super) fn inner(&self) -> &Inner {
        &self.0
    }

    #[cfg(test)]
    pub(super) fn index(&self) -> &Index {
        &self.0.index
    }
}

/// The blobs on disk, for the index.
fn scan(root: &Path) -> io::Result<Vec<(Digest, Entry)>> {
    let mut out = Vec::new();
    for prefix in fs::read_dir(root.join("blobs/sha256"))? {
        let prefix = prefix?;
        if !prefix.file_type()?.is_dir() {
            continue;
        }
        for entry in fs::read_dir(prefix.path())? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(digest) = name.to_str().and_then(Digest::from_hex) else {
                tracing::warn!(path = %entry.path().display(), "ignoring a file that is not named by a digest");
                continue;
            };
            let meta = entry.metadata()?;
            out.push((
                digest,
                Entry {
                    size: meta.len(),
                    last_access: unix(meta.modified().unwrap_or(UNIX_EPOCH)),
                    manifest: root.join(manifest_type_rel(&digest)).exists(),
                },
            ));
        }
    }
    Ok(out)
}

impl Inner {
    /// Where a blob (or manifest) with this digest lives.
    pub(super) fn blob_path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root.join("blobs/sha256").join(&hex[..2]).join(hex)
    }

    fn tag_path(&self, key: &TagKey) -> PathBuf {
        // Names and tags are validated: no `..`, no `/` in a tag, and
        // `_tags` cannot be a repository component (components start
        // alphanumeric).
        self.root
            .join("tags")
            .join(&*key.upstream)
            .join(key.repo.as_str())
            .join("_tags")
            .join(key.tag.as_str())
    }

    fn approvals_dir(&self, d: &Digest) -> PathBuf {
        self.root.join("approvals/sha256").join(d.hex())
    }

    /// A new empty temp file for content being written.
    fn temp_file(&self) -> io::Result<(PathBuf, File)> {
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let dir = self.root.join("tmp");
        if self.attached {
            fs::create_dir_all(&dir)?;
        }
        let path = dir.join(format!("{}-{seq}-{nanos}", std::process::id()));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((path, file))
    }

    /// Writes `bytes` to `dest` through a synced temp file and a rename.
    pub(super) fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> io::Result<()> {
        fs::create_dir_all(dest.parent().unwrap_or(&self.root))?;
        let (temp, file) = self.temp_file()?;
        finish_replace(&temp, file, dest, bytes)
    }

    fn open_blob(&self, d: &Digest) -> io::Result<Option<BlobHandle>> {
        let Some(guard) = self.index.pin(d, self.attached) else {
            return Ok(None);
        };
        let file = match File::open(self.blob_path(d)) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if !self.attached {
                    // Removed behind our back: forget it, it is fetched again.
                    tracing::warn!(digest = %d, "blob missing from disk; dropping it from the index");
                    self.index.forget(d);
                }
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let size = file.metadata()?.len();
        if self.index.touch(d) {
            // Persist the access time so LRU order survives restarts; best effort.
            let _ = file.set_modified(SystemTime::now());
        }
        Ok(Some(BlobHandle {
            size,
            source: Source::File(Arc::new(file)),
            guard,
        }))
    }

    fn commit(&self, temp: &Path, d: &Digest, size: u64, manifest: bool) -> io::Result<()> {
        let dest = self.blob_path(d);
        let dir = dest.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir)?;
        fs::rename(temp, &dest)?;
        sync_dir(dir);
        self.index.record(d, size, manifest);
        self.evict();
        Ok(())
    }

    fn evict(&self) {
        self.index
            .evict(|d| match fs::remove_file(self.blob_path(d)) {
                Ok(()) => true,
                Err(e) if e.kind() == ErrorKind::NotFound => true,
                Err(e) => {
                    tracing::error!(digest = %d, error = %e, "could not evict blob");
                    false
                }
            });
    }

    fn read_manifest(&self, d: &Digest) -> io::Result<Option<Arc<Manifest>>> {
        if let Some(m) = self.manifests.get(d) {
            return Ok(Some(m));
        }
        // The marker says the blob is a manifest; what it holds (the media
        // type, as earlier versions wrote and read it) is not read: a
        // manifest's type comes from its bytes.
        match fs::metadata(self.root.join(manifest_type_rel(d))) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
        let bytes = match fs::read(self.blob_path(d)) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if Digest::of(&bytes) != *d {
            tracing::error!(digest = %d, "stored manifest does not match its digest; ignoring it");
            return Ok(None);
        }
        let m = match Manifest::stored(*d, Bytes::from(bytes)) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                tracing::error!(digest = %d, "stored manifest is unusable ({e}); ignoring it");
                return Ok(None);
            }
        };
        self.manifests.insert(*d, m.clone());
        Ok(Some(m))
    }

    fn write_manifest(&self, m: &Manifest) -> io::Result<()> {
        // The bytes first: a crash in between leaves a blob that is not yet
        // marked as a manifest (fetched again when asked for as one), never
        // a marker without its bytes.
        self.write_atomic(&self.blob_path(&m.digest), &m.bytes)?;
        let type_path = self.root.join(manifest_type_rel(&m.digest));
        self.write_atomic(&type_path, m.media_type.as_bytes())?;
        self.index.record(&m.digest, m.bytes.len() as u64, true);
        Ok(())
    }

    fn read_tag(&self, key: &TagKey) -> Option<TagRecord> {
        if let Some(r) = self.tags.get(key) {
            return Some(r);
        }
        let rec = TagFile::decode(&fs::read(self.tag_path(key)).ok()?)?;
        self.tags.insert(key.clone(), rec);
        Some(rec)
    }

    pub(super) fn update_tag(&self, key: &TagKey, mut f: TagUpdate) -> io::Result<()> {
        let _one_at_a_time = self.tag_updates.lock().unwrap_or_else(|e| e.into_inner());
        match f(self.read_tag(key)) {
            Some(rec) => {
                let bytes = TagFile::encode(&rec);
                self.write_atomic(&self.tag_path(key), &bytes)?;
                self.tags.insert(key.clone(), rec);
            }
            None => {
                self.tags.invalidate(key);
                match fs::remove_file(self.tag_path(key)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    fn read_approvals(&self, d: &Digest) -> Vec<Vec<u8>> {
        let Ok(entries) = fs::read_dir(self.approvals_dir(d)) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .take(MAX_APPROVALS)
            .filter_map(|e| fs::read(e.path()).ok())
            .collect()
    }
}

impl Store for FsStore {
    fn location(&self) -> String {
        self.0.root.display().to_string()
    }

    fn has_blob(&self, d: &Digest) -> bool {
        self.0.index.contains(d)
    }

    fn open<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, Option<BlobHandle>> {
        let inner = self.0.clone();
        let d = *d;
        blocking(move || inner.open_blob(&d))
    }

    fn writer(&self, d: Digest) -> StoreFuture<'_, Box<dyn BlobWriter>> {
        let inner = self.0.clone();
        blocking(move || {
            let (temp, file) = inner.temp_file()?;
            Ok(Box::new(FsWriter {
                store: inner,
                digest: d,
                temp,
                file: Arc::new(file),
                hasher: Some(Hasher::new()),
                written: 0,
                done: false,
            }) as Box<dyn BlobWriter>)
        })
    }

    fn discard<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, ()> {
        let inner = self.0.clone();
        let d = *d;
        blocking(move || {
            let from = inner.blob_path(&d);
            let rel = from
                .strip_prefix(&inner.root)
                .unwrap_or(&from)
                .to_path_buf();
            let to = super::fsck::quarantine_dir(&inner.root).join(rel);
            if let Some(dir) = to.parent() {
                fs::create_dir_all(dir)?;
            }
            match fs::rename(&from, &to) {
                Ok(()) => {
                    tracing::warn!(digest = %d, to = %to.display(), "damaged blob moved aside");
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            inner.index.forget(&d);
            Ok(())
        })
    }

    fn pin(&self, d: &Digest) -> ReadGuard {
        self.0.index.pin(d, true).expect("an unconditional pin")
    }

    fn size(&self) -> u64 {
        self.0.index.total()
    }

    fn cached_manifest(&self, d: &Digest) -> Option<Arc<Manifest>> {
        self.0.manifests.get(d)
    }

    fn manifest<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, Option<Arc<Manifest>>> {
        if let Some(m) = self.0.manifests.get(d) {
            return futures_util::future::ready(Ok(Some(m))).boxed();
        }
        let inner = self.0.clone();
        let d = *d;
        blocking(move || inner.read_manifest(&d))
    }

    fn put_manifest(&self, m: Arc<Manifest>) -> StoreFuture<'_, ()> {
        let inner = self.0.clone();
        blocking(move || {
            inner.write_manifest(&m)?;
            inner.manifests.insert(m.digest, m);
            Ok(())
        })
    }

    fn cached_tag(&self, key: &TagKey) -> Option<TagRecord> {
        self.0.tags.get(key)
    }

    fn tag<'a>(&'a self, key: &'a TagKey) -> StoreFuture<'a, Option<TagRecord>> {
        if let Some(r) = self.0.tags.get(key) {
            return futures_util::future::ready(Ok(Some(r))).boxed();
        }
        let inner = self.0.clone();
        let key = key.clone();
        blocking(move || Ok(inner.read_tag(&key)))
    }

    fn update_tag<'a>(&'a self, key: &'a TagKey, f: TagUpdate) -> StoreFuture<'a, ()> {
        let inner = self.0.clone();
        let key = key.clone();
        blocking(move || inner.update_tag(&key, f))
    }

    fn list_tags<'a>(
        &'a self,
        upstream: &'a str,
        repo: &'a crate::oci::names::RepoName,
    ) -> StoreFuture<'a, Vec<crate::oci::names::Tag>> {
        let dir = self
            .0
            .root
            .join("tags")
            .join(upstream)
            .join(repo.as_str())
            .join("_tags");
        blocking(move || {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            let mut tags: Vec<crate::oci::names::Tag> = entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect();
            tags.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            Ok(tags)
        })
    }

    fn defer_tag(&self, key: &TagKey, rec: TagRecord, checked: SystemTime) {
        self.0
            .tags
            .insert(key.clone(), TagRecord { checked, ..rec });
    }

    fn approvals<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, Vec<Vec<u8>>> {
        let inner = self.0.clone();
        let d = *d;
        blocking(move || Ok(inner.read_approvals(&d)))
    }

    fn add_approval(&self, d: Digest, id: String, bytes: Vec<u8>) -> StoreFuture<'_, String> {
        let inner = self.0.clone();
        blocking(move || {
            let dir = inner.approvals_dir(&d);
            fs::create_dir_all(&dir)?;
            let dest = dir.join(format!("{id}.json"));
            // Next to its destination, not in tmp/: a running server
            // removes only its own temp files, but a command's must not
            // depend on that.
            crate::fsutil::replace_file(&dest, &bytes)?;
            Ok(dest.display().to_string())
        })
    }

    fn read_meta<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        let path = self.0.root.join(name);
        blocking(move || match fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
    }

    fn write_meta<'a>(&'a self, name: &'a str, bytes: Vec<u8>) -> StoreFuture<'a, ()> {
        let inner = self.0.clone();
        let path = inner.root.join(name);
        blocking(move || inner.write_atomic(&path, &bytes))
    }

    fn set_aside_meta<'a>(&'a self, name: &'a str) -> StoreFuture<'a, String> {
        let path = self.0.root.join(name);
        blocking(move || {
            let aside = path.with_extension(format!("unreadable-{}", unix(SystemTime::now())));
            fs::rename(&path, &aside)?;
            Ok(aside.display().to_string())
        })
    }

    fn apply_imports(&self) -> StoreFuture<'_, usize> {
        let inner = self.0.clone();
        blocking(move || Ok(inner.apply_pending()?.imports))
    }

    fn probe(&self) -> StoreFuture<'_, ()> {
        let inner = self.0.clone();
        blocking(move || {
            let (path, _file) = inner.temp_file()?;
            fs::remove_file(path)
        })
    }
}

/// A blob being written to a temp file under `tmp/`.
struct FsWriter {
    store: Arc<Inner>,
    digest: Digest,
    temp: PathBuf,
    file: Arc<File>,
    /// Taken while a write runs on the blocking pool.
    hasher: Option<Hasher>,
    written: u64,
    /// Committed: nothing to remove on drop.
    done: bool,
}

impl BlobWriter for FsWriter {
    fn write(&mut self, chunk: Bytes) -> StoreFuture<'_, ()> {
        let file = self.file.clone();
        let offset = self.written;
        let hasher = self.hasher.take();
        async move {
            let mut hasher =
                hasher.ok_or_else(|| io::Error::other("an earlier write of this blob failed"))?;
            let len = chunk.len() as u64;
            let (hasher, result) = tokio::task::spawn_blocking(move || {
                hasher.update(&chunk);
                let r = file.write_all_at(&chunk, offset);
                (hasher, r)
            })
            .await
            .map_err(io::Error::other)?;
            result?;
            self.hasher = Some(hasher);
            self.written += len;
            Ok(())
        }
        .boxed()
    }

    fn written(&self) -> u64 {
        self.written
    }

    fn source(&self) -> Source {
        Source::File(self.file.clone())
    }

    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        self.abort_now()
    }

    fn finish(mut self: Box<Self>) -> BoxFuture<'static, Result<u64, WriteError>> {
        async move {
            let hasher = self
                .hasher
                .take()
                .ok_or_else(|| io::Error::other("an earlier write of this blob failed"))?;
            let got = hasher.finish();
            if got != self.digest {
                self.abort_now().await;
                return Err(WriteError::Mismatch { got });
            }
            let size = self.written;
            let (store, file, temp, digest) = (
                self.store.clone(),
                self.file.clone(),
                self.temp.clone(),
                self.digest,
            );
            tokio::task::spawn_blocking(move || {
                file.sync_data()?;
                store.commit(&temp, &digest, size, false)
            })
            .await
            .map_err(io::Error::other)??;
            self.done = true;
            Ok(size)
        }
        .boxed()
    }
}

impl FsWriter {
    /// What `abort` does, on the blocking pool.
    fn abort_now(mut self: Box<Self>) -> BoxFuture<'static, ()> {
        self.done = true;
        let temp = std::mem::take(&mut self.temp);
        async move {
            let _ = tokio::task::spawn_blocking(move || remove_temp(&temp)).await;
        }
        .boxed()
    }
}

impl Drop for FsWriter {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        remove_temp(&self.temp);
    }
}

fn remove_temp(temp: &Path) {
    if let Err(e) = fs::remove_file(temp) {
        if e.kind() != ErrorKind::NotFound {
            tracing::error!(path = %temp.display(), error = %e, "cannot remove temp file");
        }
    }
}

pub(super) fn manifest_type_rel(d: &Digest) -> PathBuf {
    let hex = d.hex();
    Path::new("manifests/sha256").join(&hex[..2]).join(hex)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn store(dir: &Path, max: Option<u64>) -> FsStore {
        FsStore::open(dir, max, Arc::new(Metrics::new())).unwrap()
    }

    #[tokio::test]
    async fn startup_removes_temp_files_and_indexes_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let d = {
            let s = store(dir.path(), None);
            let d = Digest::of(b"hello");
            crate::store::put_blob(&s, d, Bytes::from_static(b"hello"))
                .await
                .unwrap();
            let (_temp, mut f) = s.0.temp_file().unwrap();
            f.write_all(b"half a blo").unwrap();
            d
        };
        let s = store(dir.path(), None);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert!(s.has_blob(&d));
        assert_eq!(s.size(), 5);
        let open = s.open(&d).await.unwrap().unwrap();
        assert_eq!(open.size, 5);
    }

    #[test]
    fn a_store_is_used_by_one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = store(dir.path(), None);
        let second = FsStore::open(dir.path(), None, Arc::new(Metrics::new()));
        assert_eq!(second.err().map(|e| e.kind()), Some(ErrorKind::WouldBlock));
        drop(first);
        assert!(FsStore::open(dir.path(), None, Arc::new(Metrics::new())).is_ok());
    }

    #[tokio::test]
    async fn corrupt_manifest_on_disk_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = Bytes::from_static(br#"{"schemaVersion":2,"manifests":[]}"#);
        let d = Digest::of(&bytes);
        {
            let s = store(dir.path(), None);
            let m = Manifest::parse(d, Some("application/json"), bytes).unwrap();
            s.put_manifest(Arc::new(m)).await.unwrap();
            fs::write(s.0.blob_path(&d), br#"{"schemaVersion":2 ,"manifests":[]}"#).unwrap();
        }
        let s = store(dir.path(), None);
        assert!(s.manifest(&d).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn an_attached_store_reads_and_records_approvals_beside_a_server() {
        let dir = tempfile::tempdir().unwrap();
        let server = store(dir.path(), None);
        let d = Digest::of(b"image");
        let attached = FsStore::attach(dir.path());
        attached
            .add_approval(d, "one".into(), b"{}".to_vec())
            .await
            .unwrap();
        assert_eq!(server.approvals(&d).await.unwrap(), [b"{}".to_vec()]);
        let blob = Bytes::from_static(b"blob");
        crate::store::put_blob(&server, Digest::of(&blob), blob.clone())
            .await
            .unwrap();
        assert!(attached.open(&Digest::of(&blob)).await.unwrap().is_some());
    }
}

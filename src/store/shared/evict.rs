//! Least-recently-used eviction in the shared bucket
//! (`storage.s3.max_size`), without removing a blob under a replica that
//! streams it.
//!
//! The bucket has no access times of its own, so replicas leave marks:
//!
//! - `access/sha256/<hex>`, an empty object rewritten when a replica reads
//!   the blob (at once before it streams it from the bucket, and again every
//!   fifth of `min_idle` while it does; in batches for reads from its local
//!   tier). Its write time, by the engine's clock, is the blob's last use.
//! - `manifests/sha256/<hex>`: the blob is a manifest. Manifests answer
//!   tags and are never evicted, as in the local tier.
//! - `evicting/sha256/<hex>`: an evictor is about to remove the blob.
//!
//! One replica at a time runs a pass (under the `leases/evict` lease).
//! It takes the engine's time `now`, marks its victims (blobs not used
//! since `now - min_idle`, oldest first, until the bucket is back under
//! 95% of `max_size`), then looks at each victim's access mark once more
//! and removes the blob only if it is still older than `now - min_idle`.
//!
//! A reader writes its access mark *before* it looks for an eviction mark,
//! and streams only when there is none. So either the evictor's second look
//! sees the reader's mark and keeps the blob, or the reader sees the
//! eviction mark (written before that second look) and goes elsewhere; a
//! blob that streams for longer is marked again every `min_idle / 5`.
//! Every time compared is the engine's, so the replicas' clocks do not
//! matter; `min_idle` must be the same on every replica.

use std::collections::{HashMap, HashSet};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::stream::{BoxStream, Stream, StreamExt};

use super::Inner;
use crate::oci::names::Digest;

/// How often every replica offers to run a pass (one runs it), besides
/// the passes its own uploads call for.
const PASS_EVERY: Duration = Duration::from_secs(300);

/// A pass removes blobs until the bucket holds at most this share of
/// `max_size` (in per mille), so that not every upload calls for a pass.
const LOW_WATER: u64 = 950;

/// Victims removed at once.
const AT_ONCE: usize = 8;

/// Reads from the local tier are marked in the bucket at most this often
/// per blob (they only order the eviction: the local copy needs nothing
/// from the bucket).
const LOCAL_MARK_AGAIN: Duration = Duration::from_secs(600);

/// The one lease on running a pass.
const EVICT_LEASE: &str = "leases/evict";

/// Eviction in the bucket: beyond `max_size`, blobs no replica read for
/// `min_idle` go, least recently used first. A replica without `max_size`
/// evicts nothing, but marks what it streams by `min_idle` all the same,
/// for the replicas that do.
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    pub max_size: Option<u64>,
    pub min_idle: Duration,
}

impl Default for Limit {
    fn default() -> Limit {
        Limit {
            max_size: None,
            min_idle: crate::config::S3Config::MIN_IDLE,
        }
    }
}

impl Limit {
    /// How often a replica marks a blob it is still streaming.
    fn remark(&self) -> Duration {
        (self.min_idle / 5).min(Duration::from_secs(60))
    }
}

/// What eviction keeps in each replica.
pub(super) struct State {
    pub(super) limit: Limit,
    /// A pass of this replica is running.
    running: AtomicBool,
    /// The bucket's size at the last pass, and what this replica added since.
    known: AtomicU64,
    added: AtomicU64,
    /// When this replica's uploads last called for a pass (unix ms).
    called: AtomicU64,
    /// Blobs read from the local tier, to mark in the bucket.
    used: Mutex<HashSet<Digest>>,
    /// When each blob was last marked for a local read.
    marked: moka::sync::Cache<Digest, ()>,
    /// Blobs this replica found being evicted: fetched again elsewhere,
    /// their upload is tried again once the eviction is over.
    evicting: Mutex<HashSet<Digest>>,
}

impl State {
    pub(super) fn new(limit: Limit) -> State {
        let again = limit.min_idle.min(LOCAL_MARK_AGAIN);
        State {
            limit,
            running: AtomicBool::new(false),
            known: AtomicU64::new(0),
            added: AtomicU64::new(0),
            called: AtomicU64::new(0),
            used: Mutex::new(HashSet::new()),
            marked: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(again)
                .build(),
            evicting: Mutex::new(HashSet::new()),
        }
    }

    /// Forgets that `d` was found being evicted; whether it was.
    pub(super) fn was_evicting(&self, d: &Digest) -> bool {
        self.evicting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(d)
    }
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// The bucket's size before the pass.
    pub size: u64,
    pub removed: usize,
    pub removed_bytes: u64,
    /// Victims kept because a replica read them meanwhile.
    pub kept: usize,
}

pub(super) fn access_rel(d: &Digest) -> String {
    format!("access/sha256/{}", d.hex())
}

pub(super) fn evicting_rel(d: &Digest) -> String {
    format!("evicting/sha256/{}", d.hex())
}

pub(super) fn manifest_rel(d: &Digest) -> String {
    format!("manifests/sha256/{}", d.hex())
}

fn hex_digest(rel: &str) -> Option<Digest> {
    Digest::from_hex(rel.rsplit('/').next()?)
}

/// Aborts a task when dropped.
pub(super) struct Aborts(pub(super) tokio::task::AbortHandle);

impl Drop for Aborts {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A body streaming from the bucket, with the task that keeps its blob's
/// access mark fresh until the body is dropped.
struct Marked {
    body: BoxStream<'static, io::Result<Bytes>>,
    _remark: Option<Aborts>,
}

impl Stream for Marked {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.body.poll_next_unpin(cx)
    }
}

impl Inner {
    /// Before `d` streams from the bucket: marks it read, and looks for an
    /// eviction of it underway. `false`: it is being removed, not to be read.
    pub(super) async fn mark_read(&self, d: &Digest) -> io::Result<bool> {
        self.bucket.write_doc(&access_rel(d), Vec::new()).await?;
        if self.bucket.written(&evicting_rel(d)).await?.is_some() {
            self.count("read_blob", "evicting");
            self.evict
                .evicting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(*d);
            return Ok(false);
        }
        Ok(true)
    }

    /// `body` of `d`, marked again while it streams.
    pub(super) fn marked(
        self: &Arc<Self>,
        d: Digest,
        body: BoxStream<'static, io::Result<Bytes>>,
    ) -> BoxStream<'static, io::Result<Bytes>> {
        let every = self.evict.limit.remark();
        let weak: Weak<Inner> = Arc::downgrade(self);
        let remark = tokio::runtime::Handle::try_current().ok().map(|rt| {
            let task = rt.spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(inner) = weak.upgrade() else { return };
                    if let Err(e) = inner.bucket.write_doc(&access_rel(&d), Vec::new()).await {
                        tracing::debug!(digest = %d, "cannot mark a blob read: {e}");
                    }
                }
            });
            Aborts(task.abort_handle())
        });
        Box::pin(Marked {
            body,
            _remark: remark,
        })
    }

    /// Notes a read of `d` served without the bucket (marked in a batch).
    pub(super) fn note_used(&self, d: &Digest) {
        if self.evict.limit.max_size.is_none() || self.evict.marked.contains_key(d) {
            return;
        }
        self.evict
            .used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(*d);
    }

    /// Notes bytes this replica put in the bucket; a pass when they take it
    /// over `max_size`.
    pub(super) fn note_added(self: &Arc<Self>, bytes: u64) {
        let Some(max_size) = self.evict.limit.max_size else {
            return;
        };
        let added = self.evict.added.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if self.evict.known.load(Ordering::Relaxed) + added <= max_size {
            return;
        }
        // A bucket that stays over (everything in it read lately) is not
        // listed again at every upload.
        let now = super::unix_ms();
        let last = self.evict.called.load(Ordering::Relaxed);
        let every = self.evict.limit.remark().as_millis() as u64;
        if now.saturating_sub(last) >= every
            && self
                .evict
                .called
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.spawn_pass();
        }
    }

    /// Runs a pass in the background unless one of this replica is running.
    pub(super) fn spawn_pass(self: &Arc<Self>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.evict.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        rt.spawn(async move {
            let result = this.pass().await;
            this.evict.running.store(false, Ordering::Release);
            match result {
                Ok(Some(p)) if p.removed > 0 || p.kept > 0 => tracing::info!(
                    size = p.size,
                    removed = p.removed,
                    removed_bytes = p.removed_bytes,
                    kept_in_use = p.kept,
                    "evicted least recently used blobs from the shared bucket (over storage.s3.max_size)"
                ),
                Ok(_) => {}
                Err(e) => this.failed("evict", &e),
            }
        });
    }

    /// Marks in the bucket what the local tier served lately, and offers a
    /// pass every few minutes, for as long as the store lives.
    pub(super) fn spawn_eviction(self: &Arc<Self>) {
        let limit = self.evict.limit;
        if limit.max_size.is_none() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.spawn_pass();
        let weak = Arc::downgrade(self);
        rt.spawn(async move {
            let mut since_pass = Duration::ZERO;
            loop {
                tokio::time::sleep(limit.remark()).await;
                let Some(inner) = weak.upgrade() else { return };
                inner.mark_used().await;
                since_pass += limit.remark();
                if since_pass >= PASS_EVERY.min(limit.min_idle) {
                    since_pass = Duration::ZERO;
                    inner.spawn_pass();
                }
            }
        });
    }

    async fn mark_used(&self) {
        let used: Vec<Digest> =
            std::mem::take(&mut *self.evict.used.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .collect();
        for d in used {
            // A blob the bucket no longer holds (evicted; the local tier
            // keeps its copy) gets no mark: it would never be cleared.
            let marked = match self.bucket.blob_size(&d).await {
                Ok(Some(_)) => self.bucket.write_doc(&access_rel(&d), Vec::new()).await,
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            match marked {
                Ok(()) => self.evict.marked.insert(d, ()),
                Err(e) => {
                    self.failed("mark", &e);
                    return;
                }
            }
        }
    }

    /// One pass, if this replica gets the lease on it (`None`: another
    /// replica's pass is running).
    pub(super) async fn pass(self: &Arc<Self>) -> io::Result<Option<Pass>> {
        let Some(max_size) = self.evict.limit.max_size else {
            return Ok(None);
        };
        if !self.take_lease(EVICT_LEASE).await? {
            return Ok(None);
        }
        let _renew = self.renewing(EVICT_LEASE.to_owned());
        let result = self.pass_held(max_size, self.evict.limit.min_idle).await;
        if let Err(e) = self.end_lease(EVICT_LEASE).await {
            tracing::debug!("cannot end the eviction lease (it lapses): {e}");
        }
        result.map(Some)
    }

    async fn pass_held(&self, max_size: u64, min_idle: Duration) -> io::Result<Pass> {
        let now = self.bucket.now().await?;
        // Marks of a pass whose replica died: its victims are chosen again.
        for stale in self.bucket.list("evicting/sha256").await? {
            self.bucket.delete(&stale.0).await?;
        }
        let added = self.evict.added.swap(0, Ordering::Relaxed);
        let blobs = self.bucket.list_dated("blobs/sha256").await?;
        let size: u64 = blobs.iter().map(|b| b.size).sum();
        self.evict.known.store(size, Ordering::Relaxed);
        self.metrics
            .bucket_size
            .set(i64::try_from(size).unwrap_or(i64::MAX));
        let mut pass = Pass {
            size,
            ..Pass::default()
        };
        tracing::debug!(size, added, "eviction pass over the shared bucket");
        if size <= max_size {
            return Ok(pass);
        }
        let manifests: HashSet<Digest> = self
            .bucket
            .list("manifests/sha256")
            .await?
            .iter()
            .filter_map(|(rel, _)| hex_digest(rel))
            .collect();
        let idle_since = now.checked_sub(min_idle).unwrap_or(now);
        let held: HashSet<Digest> = blobs.iter().filter_map(|b| hex_digest(&b.rel)).collect();
        let mut used: HashMap<Digest, SystemTime> = HashMap::new();
        for a in self.bucket.list_dated("access/sha256").await? {
            match hex_digest(&a.rel) {
                Some(d) if held.contains(&d) => {
                    used.insert(d, a.written);
                }
                // The mark of a blob gone (one a reader marked as a pass
                // removed it), once it is old: nobody reads it from here.
                _ if a.written < idle_since => self.bucket.delete(&a.rel).await?,
                _ => {}
            }
        }
        let mut candidates: Vec<(Digest, u64, SystemTime)> = blobs
            .iter()
            .filter_map(|b| {
                let d = hex_digest(&b.rel)?;
                let last = used.get(&d).map_or(b.written, |u| (*u).max(b.written));
                (!manifests.contains(&d) && last < idle_since).then_some((d, b.size, last))
            })
            .collect();
        candidates.sort_by_key(|c| c.2);
        let target = max_size / 1000 * LOW_WATER;
        let mut over = size.saturating_sub(target);
        let mut victims = Vec::new();
        for (d, size, _) in candidates {
            if over == 0 {
                break;
            }
            over = over.saturating_sub(size);
            victims.push((d, size));
        }
        if victims.is_empty() {
            tracing::warn!(
                size,
                max_size,
                "the shared bucket is over storage.s3.max_size, but every blob in it was read within storage.s3.min_idle or is a manifest"
            );
            return Ok(pass);
        }
        // Marked first, all of them; each looked at again after.
        let rels: Vec<String> = victims.iter().map(|(d, _)| evicting_rel(d)).collect();
        let marks = futures_util::stream::iter(rels)
            .map(|rel| async move { self.bucket.write_doc(&rel, Vec::new()).await })
            .buffer_unordered(AT_ONCE)
            .collect::<Vec<_>>()
            .await;
        if let Some(Err(e)) = marks.into_iter().find(|r| r.is_err()) {
            return Err(e);
        }
        let outcomes = futures_util::stream::iter(victims)
            .map(|(d, size)| async move {
                let removed = self.remove_victim(&d, idle_since).await;
                (d, size, removed)
            })
            .buffer_unordered(AT_ONCE)
            .collect::<Vec<_>>()
            .await;
        let mut failed = None;
        for (d, size, removed) in outcomes {
            match removed {
                Ok(true) => {
                    pass.removed += 1;
                    pass.removed_bytes += size;
                    self.metrics
                        .evictions
                        .with_label_values(&["bucket_max_size"])
                        .inc();
                    tracing::debug!(digest = %d, size, "evicted blob from the shared bucket");
                }
                Ok(false) => pass.kept += 1,
                Err(e) => failed = Some(e),
            }
        }
        let left = size - pass.removed_bytes;
        self.evict.known.store(left, Ordering::Relaxed);
        self.metrics
            .bucket_size
            .set(i64::try_from(left).unwrap_or(i64::MAX));
        match failed {
            Some(e) => Err(e),
            None => Ok(pass),
        }
    }

    /// Removes a victim marked for eviction unless it was read since
    /// `idle_since`; whether it was removed. The mark goes either way.
    async fn remove_victim(&self, d: &Digest, idle_since: SystemTime) -> io::Result<bool> {
        let read = self.bucket.written(&access_rel(d)).await?;
        let remove = read.is_none_or(|t| t < idle_since);
        if remove {
            // The blob first: a reader that finds no eviction mark then
            // finds no blob either.
            self.bucket.delete_blob(d).await?;
            self.bucket.delete(&access_rel(d)).await?;
        }
        self.bucket.delete(&evicting_rel(d)).await?;
        Ok(remove)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::TryStreamExt;
    use object_store::memory::InMemory;

    use super::super::super::tests::{shared_store, shared_store_limited};
    use super::super::tests::uploaded;
    use super::super::SharedStore;
    use super::*;
    use crate::oci::Manifest;
    use crate::store::{put_blob, Store};

    const IDLE: Duration = Duration::from_secs(1);

    fn limited(
        dir: &std::path::Path,
        bucket: &Arc<InMemory>,
        max_size: Option<u64>,
    ) -> SharedStore {
        let limit = Limit {
            max_size,
            min_idle: IDLE,
        };
        shared_store_limited(dir, Some(bucket.clone()), limit)
    }

    /// A pass of `s`, once a pass its uploads started is over.
    async fn pass(s: &SharedStore) -> Pass {
        for _ in 0..200 {
            if let Some(p) = s.evict_pass().await.unwrap() {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the eviction lease stayed taken for 4 s");
    }

    async fn blob(s: &SharedStore, seed: u8, len: usize) -> Digest {
        let bytes = Bytes::from(vec![seed; len]);
        let d = Digest::of(&bytes);
        put_blob(s, d, bytes).await.unwrap();
        d
    }

    async fn in_bucket(s: &SharedStore, d: &Digest) -> bool {
        s.bucket().blob_size(d).await.unwrap().is_some()
    }

    /// Idle by the engine's clock for longer than `min_idle`.
    async fn idle() {
        tokio::time::sleep(IDLE + Duration::from_millis(300)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn beyond_max_size_the_least_recently_used_blobs_go_and_manifests_stay() {
        let bucket = Arc::new(InMemory::new());
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = limited(dirs.0.path(), &bucket, Some(250_000));
        let b = limited(dirs.1.path(), &bucket, None);
        // Uploaded one after the other: b1 is the least recently used.
        let mut put = Vec::new();
        for seed in 1..=3 {
            put.push(blob(&a, seed, 100_000).await);
            uploaded(&a).await;
        }
        let (b1, b2, b3) = (put[0], put[1], put[2]);
        let text = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
        let m =
            Arc::new(Manifest::parse(Digest::of(text), None, Bytes::from_static(text)).unwrap());
        a.put_manifest(m.clone()).await.unwrap();
        uploaded(&a).await;
        // The mark of a blob the bucket no longer holds.
        let orphan = access_rel(&Digest::of(b"evicted long ago"));
        a.bucket().write_doc(&orphan, Vec::new()).await.unwrap();
        idle().await;
        let first = pass(&a).await;
        assert!(
            a.bucket().read_doc(&orphan).await.unwrap().is_none(),
            "cleared"
        );
        assert!(first.size >= 300_000, "{first:?}");
        assert_eq!(
            (first.removed, first.removed_bytes),
            (1, 100_000),
            "{first:?}"
        );
        assert!(!in_bucket(&a, &b1).await, "the oldest went");
        assert!(in_bucket(&a, &b2).await && in_bucket(&a, &b3).await);
        assert!(
            in_bucket(&a, &m.digest).await,
            "manifests are never evicted"
        );
        assert!(a.local().has_blob(&b1), "the local tier keeps its own copy");
        assert_eq!(
            a.0.metrics
                .evictions
                .with_label_values(&["bucket_max_size"])
                .get(),
            1
        );

        // A read through another replica makes b2 recent: b3 goes next.
        let read = b.shared_blob(&b2).await.unwrap().expect("b2 in the bucket");
        let got: Vec<Bytes> = read.body.try_collect().await.unwrap();
        assert_eq!(got.concat().len(), 100_000);
        // b4's upload takes the bucket over max_size: a pass of its own
        // may run before ours.
        let b4 = blob(&a, 4, 100_000).await;
        uploaded(&a).await;
        let second = pass(&a).await;
        assert!(!in_bucket(&a, &b3).await, "b3 was the least recently used");
        assert!(in_bucket(&a, &b2).await && in_bucket(&a, &b4).await);
        let evicted =
            a.0.metrics
                .evictions
                .with_label_values(&["bucket_max_size"]);
        assert_eq!(evicted.get(), 2, "{second:?}");
        assert_eq!(
            a.0.metrics.bucket_size.get(),
            (second.size - second.removed_bytes) as i64
        );
        let left = a.bucket().list("evicting").await.unwrap();
        assert!(left.is_empty(), "no eviction marks left: {left:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blob_streaming_from_the_bucket_is_not_evicted_under_its_reader() {
        let bucket = Arc::new(InMemory::new());
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = limited(dirs.0.path(), &bucket, Some(1));
        let b = limited(dirs.1.path(), &bucket, None);
        let x = blob(&a, 7, 300_000).await;
        uploaded(&a).await;
        idle().await;
        // b starts streaming x, and takes its time.
        let reading = b.shared_blob(&x).await.unwrap().expect("x in the bucket");
        for _ in 0..3 {
            idle().await;
            let p = pass(&a).await;
            assert_eq!(p.removed, 0, "{p:?}");
            assert!(in_bucket(&a, &x).await, "kept while b streams it");
        }
        let got: Vec<Bytes> = reading.body.try_collect().await.unwrap();
        assert_eq!(got.concat(), vec![7u8; 300_000]);
        // Done and idle: it goes.
        idle().await;
        assert_eq!(pass(&a).await.removed, 1);
        assert!(!in_bucket(&a, &x).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_that_finds_an_eviction_underway_does_not_stream_and_uploads_again() {
        let bucket = Arc::new(InMemory::new());
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = shared_store(dirs.0.path(), Some(bucket.clone()));
        let b = shared_store(dirs.1.path(), Some(bucket.clone()));
        let x = blob(&a, 9, 200_000).await;
        uploaded(&a).await;
        // An evictor has marked x (between its two looks).
        a.bucket()
            .write_doc(&evicting_rel(&x), Vec::new())
            .await
            .unwrap();
        assert!(b.shared_blob(&x).await.unwrap().is_none());
        // Nor is it copied whole.
        assert!(b.open(&x).await.unwrap().is_none());
        assert_eq!(
            b.0.metrics
                .bucket_requests
                .with_label_values(&["read_blob", "evicting"])
                .get(),
            2
        );
        // b fetches it elsewhere; its upload finds x still there, and is
        // tried again later rather than counted as shared.
        let again = blob(&b, 9, 200_000).await;
        assert_eq!(again, x);
        for _ in 0..200 {
            if b.0.retry.lock().unwrap().contains(&x) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(b.0.retry.lock().unwrap().contains(&x), "queued again");
    }

    #[tokio::test]
    async fn one_pass_at_a_time_among_replicas() {
        let bucket = Arc::new(InMemory::new());
        let dir = tempfile::tempdir().unwrap();
        let a = limited(dir.path(), &bucket, Some(1));
        // Another replica's pass holds the lease.
        let held = serde_json::to_vec(&super::super::LeaseDoc {
            holder: "other".into(),
            until: super::super::unix_ms() + 30_000,
        })
        .unwrap();
        a.bucket().write_doc(EVICT_LEASE, held).await.unwrap();
        assert_eq!(a.evict_pass().await.unwrap(), None);
        // Once it lapses, this one takes it.
        let lapsed = serde_json::to_vec(&super::super::LeaseDoc {
            holder: "other".into(),
            until: super::super::unix_ms() - 1,
        })
        .unwrap();
        a.bucket().write_doc(EVICT_LEASE, lapsed).await.unwrap();
        assert!(a.evict_pass().await.unwrap().is_some());
        assert!(
            a.bucket().read_doc(EVICT_LEASE).await.unwrap().is_none(),
            "released after the pass"
        );
    }
}

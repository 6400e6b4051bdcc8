//! The store of gateway replicas: a local tier on disk ([`FsStore`], with
//! its own LRU `max_size`) in front of the bucket every replica shares
//! ([`Bucket`]).
//!
//! - Blobs and manifests are content: read from the local tier, else from
//!   the bucket (a small one fetched whole into the local tier; a large one
//!   streamed by the blob fetch, see [`Store::shared_blob`]), else the
//!   upstream. What is committed locally goes up to the bucket in the
//!   background (hashed again on the way), so every replica serves it.
//! - Tag records, approvals and the base history are the replicas' shared
//!   decisions: the bucket holds them, updated by compare-and-swap; each
//!   replica trusts what it read for `tag_ttl` and keeps a copy in its
//!   local tier to serve from while the bucket cannot be reached.
//!
//! The bucket unreachable: content and tags are served from the local
//! tier, a miss goes to the upstream, and what needs the bucket's answer
//! (approvals) fails, so verdicts fail closed.

use std::collections::HashSet;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use super::bucket::{Bucket, StreamingUpload, Uploaded, PART_SIZE};
use super::fs::TagFile;
use super::{
    BlobHandle, BlobWriter, FsStore, ReadGuard, SharedBlob, Source, Store, StoreFuture, TagKey,
    TagRecord, TagUpdate, WriteError,
};
use crate::metrics::Metrics;
use crate::oci::names::{Digest, RepoName, Tag};
use crate::oci::Manifest;

mod evict;
pub mod fsck;
pub use evict::{Limit, Pass};

/// Blobs up to this size found only in the bucket are copied whole into
/// the local tier when opened (configs, signature payloads); larger ones
/// stream through the blob fetch.
const SMALL_BLOB: u64 = 4 * 1024 * 1024;

/// Largest manifest read back from the bucket.
const MAX_MANIFEST: u64 = 16 * 1024 * 1024;

/// Uploads to the bucket running at once.
const UPLOADS: usize = 4;

/// At most this many approvals are read for one digest (as on disk).
const MAX_APPROVALS: usize = 32;

/// The local tier in front of the shared bucket. Cheap to clone.
#[derive(Clone)]
pub struct SharedStore(Arc<Inner>);

struct Inner {
    local: FsStore,
    bucket: Bucket,
    metrics: Arc<Metrics>,
    /// Tag records as the bucket had them, trusted for `tag_ttl`.
    tags: moka::sync::Cache<TagKey, TagRecord>,
    /// Tag records the content layer deferred after an upstream failure
    /// ([`Store::defer_tag`]): kept apart and briefly, so that they never
    /// keep a newer record of another replica out beyond `tag_ttl`.
    deferred: moka::sync::Cache<TagKey, TagRecord>,
    uploads: Arc<tokio::sync::Semaphore>,
    /// Slots for blobs streamed to the bucket while they are fetched.
    streaming: Arc<tokio::sync::Semaphore>,
    /// Blobs being uploaded now (one upload per blob).
    uploading: Mutex<HashSet<Digest>>,
    /// Blobs whose upload failed (the engine away), tried again later.
    retry: Mutex<HashSet<Digest>>,
    /// Fetch leases this replica holds, with the tasks that renew them.
    leases: Mutex<std::collections::HashMap<Digest, evict::Aborts>>,
    /// Names this replica in its leases: `<tier id>/<process>`, so that a
    /// replica restarted on the same local tier knows its predecessor's.
    holder: String,
    /// The local tier's id (`None`: attached, for a command).
    tier: Option<String>,
    /// Least-recently-used eviction in the bucket.
    evict: evict::State,
}

/// A fetch lease as stored: who holds it, until when (unix ms).
#[derive(serde::Serialize, serde::Deserialize)]
struct LeaseDoc {
    holder: String,
    until: u64,
}

/// What looking for a blob to stream from the bucket found.
enum Streamed {
    Blob(SharedBlob),
    Absent,
    /// An evictor is removing it (see [`evict`]).
    Evicting,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fetch lease lapses this long after it was last renewed; its holder
/// renews it every [`LEASE_RENEW`] while it fetches and uploads.
const LEASE: Duration = Duration::from_secs(30);
const LEASE_RENEW: Duration = Duration::from_secs(10);

/// How often a replica waiting on another's fetch looks for the blob.
const LEASE_POLL: Duration = Duration::from_millis(250);

/// A replica waits on another's fetch at most this long, renewed or not.
const LEASE_WAIT_MAX: Duration = Duration::from_secs(600);

/// How long a deferred tag record is kept (the content layer re-checks a
/// failing upstream after 10 s).
const DEFERRED: Duration = Duration::from_secs(15);

/// How often failed uploads are tried again.
const RETRY_EVERY: Duration = Duration::from_secs(15);

impl SharedStore {
    /// The local tier `local` in front of `bucket`; the bucket's records are
    /// trusted for `fresh` (the tag TTL). With a `limit.max_size`, this
    /// replica evicts from the bucket too (see [`SharedStore::spawn_eviction`]).
    pub fn new(
        local: FsStore,
        bucket: Bucket,
        fresh: Duration,
        limit: Limit,
        metrics: Arc<Metrics>,
    ) -> Self {
        let tier = local.id().map(str::to_owned);
        SharedStore(Arc::new(Inner {
            local,
            bucket,
            metrics,
            tags: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(fresh.max(Duration::from_secs(1)))
                .build(),
            deferred: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(DEFERRED)
                .build(),
            uploads: Arc::new(tokio::sync::Semaphore::new(UPLOADS)),
            streaming: Arc::new(tokio::sync::Semaphore::new(STREAMING)),
            uploading: Mutex::new(HashSet::new()),
            retry: Mutex::new(HashSet::new()),
            leases: Mutex::new(std::collections::HashMap::new()),
            holder: format!(
                "{}{}-{}",
                tier.as_deref().map_or(String::new(), |t| format!("{t}/")),
                std::process::id(),
                SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ),
            tier,
            evict: evict::State::new(limit),
        }))
    }

    /// Tries failed uploads again every few seconds, for as long as the
    /// store lives (in the server's runtime).
    pub fn spawn_retries(&self) {
        let weak = Arc::downgrade(&self.0);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RETRY_EVERY).await;
                let Some(inner) = weak.upgrade() else { return };
                let again: Vec<Digest> = inner
                    .retry
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .copied()
                    .collect();
                for d in again {
                    if inner.local.has_blob(&d) {
                        inner.clone().spawn_upload(d);
                    } else {
                        inner
                            .retry
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&d);
                        inner.pending_changed();
                    }
                }
            }
        });
    }

    /// Runs eviction in the bucket (with [`Limit::max_size`]): a pass now, one every
    /// few minutes and whenever this replica's uploads take the bucket over
    /// `max_size`, and marks of what the local tier serves.
    pub fn spawn_eviction(&self) {
        self.0.spawn_eviction();
    }

    /// One eviction pass now (`None`: another replica is running one).
    pub async fn evict_pass(&self) -> io::Result<Option<Pass>> {
        self.0.pass().await
    }

    pub fn bucket(&self) -> &Bucket {
        &self.0.bucket
    }

    pub fn local(&self) -> &FsStore {
        &self.0.local
    }

    /// Uploads every blob of the local tier the bucket does not hold (a
    /// replica killed before its uploads ran); how many were queued.
    pub async fn upload_missing(&self) -> io::Result<usize> {
        let held: HashSet<Digest> = self
            .0
            .bucket
            .list_blobs()
            .await?
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        let marked: HashSet<Digest> = self
            .0
            .bucket
            .list("manifests/sha256")
            .await?
            .iter()
            .filter_map(|(rel, _)| Digest::from_hex(rel.rsplit('/').next()?))
            .collect();
        let mut queued = 0;
        for d in self.0.local.digests() {
            if !held.contains(&d) {
                self.0.clone().spawn_upload(d);
                queued += 1;
            } else if self.0.local.is_manifest(&d) && !marked.contains(&d) {
                self.0.mark_manifest(&d).await?;
            }
        }
        Ok(queued)
    }
}

impl Inner {
    fn count(&self, op: &str, result: &str) {
        self.metrics
            .bucket_requests
            .with_label_values(&[op, result])
            .inc();
    }

    fn failed(&self, op: &str, e: &io::Error) {
        self.count(op, "error");
        // The failure that started a skip was logged; the skipped ones are not news.
        if e.kind() == super::bucket::SKIPPED {
            tracing::debug!(op, "shared bucket: {e}");
        } else {
            tracing::warn!(op, "shared bucket: {e}");
        }
    }

    /// Sets the gauge: uploads running or queued, and failed ones waiting
    /// to be tried again.
    fn pending_changed(&self) {
        let up = self
            .uploading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        let again = self.retry.lock().unwrap_or_else(|e| e.into_inner()).len();
        self.metrics.bucket_uploads_pending.set((up + again) as i64);
    }

    /// Notes a blob whose upload must be tried again.
    fn again(&self, d: Digest) {
        self.retry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(d);
        self.pending_changed();
    }

    fn lease_rel(d: &Digest) -> String {
        format!("leases/sha256/{}", d.hex())
    }

    fn lease_doc(&self) -> Vec<u8> {
        serde_json::to_vec(&LeaseDoc {
            holder: self.holder.clone(),
            until: unix_ms() + LEASE.as_millis() as u64,
        })
        .expect("JSON of plain values")
    }

    /// Notes a lease taken and keeps it renewed until it is released.
    fn hold(self: &Arc<Self>, d: Digest) {
        let Some(renew) = self.renewing(Inner::lease_rel(&d)) else {
            return;
        };
        // The old renewal, if any, stops as it is dropped.
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(d, renew);
    }

    /// Ends a lease this replica holds (none: nothing happens).
    fn release(self: &Arc<Self>, d: &Digest) {
        let Some(renew) = self
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(d)
        else {
            return;
        };
        drop(renew);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.clone();
        let d = *d;
        rt.spawn(async move {
            if let Err(e) = this.end_lease(&Inner::lease_rel(&d)).await {
                tracing::debug!(digest = %d, "cannot end a fetch lease (it lapses): {e}");
            }
        });
    }

    /// Removes the lease at `rel` if this replica still holds it: one that
    /// lapsed (renewals failed) and was taken over is the new holder's.
    async fn end_lease(&self, rel: &str) -> io::Result<()> {
        let Some(doc) = self.bucket.read_doc(rel).await? else {
            return Ok(());
        };
        let ours =
            serde_json::from_slice::<LeaseDoc>(&doc.bytes).is_ok_and(|l| l.holder == self.holder);
        if ours {
            self.bucket.delete(rel).await?;
        }
        Ok(())
    }

    /// Takes over the lease at `rel`, which held `held`, if its holder let
    /// it lapse: by compare-and-swap, so that of several replicas one does.
    /// Whether this one did.
    async fn take_lapsed(&self, rel: &str, held: &[u8]) -> io::Result<bool> {
        let lapsed = serde_json::from_slice::<LeaseDoc>(held)
            .map_or(true, |l| l.until < unix_ms() || self.predecessor(&l.holder));
        if !lapsed {
            return Ok(false);
        }
        let mut took = false;
        let ours = self.lease_doc();
        let mut take = |cur: Option<&[u8]>| match cur {
            Some(c) if c == held => {
                took = true;
                Some(ours.clone())
            }
            Some(c) => Some(c.to_vec()),
            None => {
                took = true;
                Some(ours.clone())
            }
        };
        self.bucket.update_doc(rel, &mut take).await?;
        Ok(took)
    }

    /// Whether `holder` is an earlier process on this replica's local tier:
    /// one that died (the tier's lock allows one server at a time), whose
    /// leases need not be waited out.
    fn predecessor(&self, holder: &str) -> bool {
        let Some(tier) = &self.tier else { return false };
        holder != self.holder
            && holder
                .strip_prefix(tier.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
    }

    /// Takes the lease at `rel`, free or lapsed; whether this replica holds
    /// it now.
    async fn take_lease(&self, rel: &str) -> io::Result<bool> {
        if self.bucket.create_doc(rel, self.lease_doc()).await? {
            return Ok(true);
        }
        match self.bucket.read_doc(rel).await? {
            Some(doc) => self.take_lapsed(rel, &doc.bytes).await,
            // Released in between.
            None => self.bucket.create_doc(rel, self.lease_doc()).await,
        }
    }

    /// Keeps the lease at `rel` renewed until what it returns is dropped.
    fn renewing(self: &Arc<Self>, rel: String) -> Option<evict::Aborts> {
        let rt = tokio::runtime::Handle::try_current().ok()?;
        let weak = Arc::downgrade(self);
        let task = rt.spawn(async move {
            loop {
                tokio::time::sleep(LEASE_RENEW).await;
                let Some(inner) = weak.upgrade() else { return };
                if let Err(e) = inner.bucket.write_doc(&rel, inner.lease_doc()).await {
                    tracing::debug!("cannot renew the lease {rel}: {e}");
                }
            }
        });
        Some(evict::Aborts(task.abort_handle()))
    }

    /// Takes the lease on fetching `d`, or waits for the replica that holds
    /// it to put the blob in the bucket.
    async fn lease_fetch(self: &Arc<Self>, d: &Digest) -> io::Result<Option<SharedBlob>> {
        let rel = Inner::lease_rel(d);
        let give_up = std::time::Instant::now() + LEASE_WAIT_MAX;
        loop {
            if self.bucket.create_doc(&rel, self.lease_doc()).await? {
                self.count("lease", "ok");
                self.hold(*d);
                return Ok(None);
            }
            // Held by another replica: its blob, or the lease once it lapses.
            loop {
                if self.bucket.blob_size(d).await?.is_some() {
                    match self.stream_marked(d).await? {
                        Streamed::Blob(b) => {
                            self.count("lease", "waited");
                            return Ok(Some(b));
                        }
                        // Going as it came: fetched here, without the lease.
                        Streamed::Evicting => return Ok(None),
                        Streamed::Absent => {}
                    }
                }
                let Some(doc) = self.bucket.read_doc(&rel).await? else {
                    break; // released without the blob (its fetch failed): ours to try
                };
                if self.take_lapsed(&rel, &doc.bytes).await? {
                    self.count("lease", "ok");
                    self.hold(*d);
                    return Ok(None);
                }
                if std::time::Instant::now() > give_up {
                    return Ok(None);
                }
                tokio::time::sleep(LEASE_POLL).await;
            }
        }
    }

    /// `d` streaming from the bucket, marked read while it does (see
    /// [`evict`]).
    async fn stream_marked(self: &Arc<Self>, d: &Digest) -> io::Result<Streamed> {
        if !self.mark_read(d).await? {
            return Ok(Streamed::Evicting);
        }
        Ok(match self.bucket.blob_stream(d).await? {
            Some((size, body)) => Streamed::Blob(SharedBlob {
                size,
                body: self.marked(*d, body),
                from: self.bucket.describe().into(),
            }),
            None => Streamed::Absent,
        })
    }

    /// Notes in the bucket that `d` is a manifest (never evicted).
    async fn mark_manifest(&self, d: &Digest) -> io::Result<()> {
        self.bucket
            .write_doc(&evict::manifest_rel(d), Vec::new())
            .await
    }

    /// Completes a streaming upload of a blob just committed locally; on
    /// failure the blob goes up from the local tier instead.
    fn complete_streaming(
        self: Arc<Self>,
        d: Digest,
        size: u64,
        s: StreamingUpload,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.uploading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(d);
        self.pending_changed();
        let pin = self.local.pin(&d);
        rt.spawn(async move {
            let result = s.complete().await;
            drop(permit);
            drop(pin);
            self.uploading
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&d);
            match result {
                Ok(()) => {
                    self.count("upload", "ok");
                    self.pending_changed();
                    self.release(&d);
                    self.note_added(size);
                }
                Err(e) => {
                    self.failed("upload", &e);
                    self.spawn_upload(d);
                }
            }
        });
    }

    /// Queues the upload of a committed local blob to the bucket.
    fn spawn_upload(self: Arc<Self>, d: Digest) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        {
            let mut up = self.uploading.lock().unwrap_or_else(|e| e.into_inner());
            if !up.insert(d) {
                return;
            }
        }
        self.retry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&d);
        self.pending_changed();
        // Kept from eviction while it waits for its turn, too.
        let pin = self.local.pin(&d);
        rt.spawn(async move {
            let result = self.upload(&d).await;
            drop(pin);
            self.uploading
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&d);
            match result {
                Ok(Uploaded::Written) => {
                    self.count("upload", "ok");
                    tracing::debug!(digest = %d, "blob uploaded to the shared bucket");
                }
                Ok(Uploaded::Present) => {
                    self.count("upload", "present");
                    // Present, but maybe not for long: again once the
                    // eviction that sent us elsewhere is over.
                    if self.evict.was_evicting(&d) {
                        self.again(d);
                    }
                }
                Err(e) => {
                    self.failed("upload", &e);
                    // A local copy that no longer matches is fsck's, not ours.
                    if e.kind() != io::ErrorKind::InvalidData {
                        self.again(d);
                    }
                }
            }
            self.pending_changed();
            // Shared or not, waiting replicas may go on (to the bucket, or
            // to the upstream once the lease is gone).
            self.release(&d);
        });
    }

    async fn upload(self: &Arc<Self>, d: &Digest) -> io::Result<Uploaded> {
        let _permit = self.uploads.acquire().await.map_err(io::Error::other)?;
        // Open: pinned against eviction while it goes up.
        let Some(h) = self.local.open(d).await? else {
            return Err(io::Error::other(format!(
                "blob {d} left the local tier before it was uploaded"
            )));
        };
        let uploaded = match h.source {
            Source::File(file) => self.bucket.upload_file(d, file, h.size).await?,
            Source::Memory(_) => return Err(io::Error::other("the local tier holds files")),
        };
        if self.local.is_manifest(d) {
            self.mark_manifest(d).await?;
        }
        if uploaded == Uploaded::Written {
            self.note_added(h.size);
        }
        Ok(uploaded)
    }

    /// A blob the bucket holds, copied whole into the local tier.
    async fn fetch_small(&self, d: &Digest) -> io::Result<Option<BlobHandle>> {
        match self.bucket.blob_size(d).await? {
            Some(size) if size <= SMALL_BLOB => {}
            _ => return Ok(None),
        }
        // Marked read first, as a stream is, so that no pass removes it
        // under this read (see [`evict`]).
        if !self.mark_read(d).await? {
            return Ok(None);
        }
        let Some(bytes) = self.bucket.read_blob(d, SMALL_BLOB).await? else {
            return Ok(None);
        };
        let mut w = self.local.writer(*d).await?;
        w.write(bytes).await?;
        match w.finish().await {
            Ok(_) => self.local.open(d).await,
            Err(WriteError::Mismatch { got }) => {
                tracing::error!(digest = %d, %got, "the shared bucket's copy of a blob does not match its digest; removing it");
                self.bucket.delete_blob(d).await?;
                Ok(None)
            }
            Err(WriteError::Io(e)) => Err(e),
        }
    }

    fn tag_rel(key: &TagKey) -> String {
        format!(
            "tags/{}/{}/_tags/{}",
            key.upstream,
            key.repo.as_str(),
            key.tag.as_str()
        )
    }

    /// Writes what the bucket said of a tag to the local tier (for when
    /// the bucket cannot be reached) and to memory.
    async fn mirror_tag(&self, key: &TagKey, rec: Option<TagRecord>) {
        self.deferred.invalidate(key);
        match rec {
            Some(r) => self.tags.insert(key.clone(), r),
            None => self.tags.invalidate(key),
        }
        let local = self.local.cached_tag(key);
        if local != rec {
            if let Err(e) = self.local.update_tag(key, Box::new(move |_| rec)).await {
                tracing::warn!(tag = %key.tag, "cannot copy a tag record to the local tier: {e}");
            }
        }
    }
}

impl Store for SharedStore {
    fn location(&self) -> String {
        format!(
            "{} (local tier) and {}",
            self.0.local.location(),
            self.0.bucket.describe()
        )
    }

    fn has_blob(&self, d: &Digest) -> bool {
        self.0.local.has_blob(d)
    }

    fn open<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, Option<BlobHandle>> {
        async move {
            if let Some(h) = self.0.local.open(d).await? {
                self.0.note_used(d);
                return Ok(Some(h));
            }
            match self.0.fetch_small(d).await {
                Ok(Some(h)) => {
                    self.0.count("read_blob", "ok");
                    Ok(Some(h))
                }
                Ok(None) => Ok(None),
                // Not there for now: the upstream it is.
                Err(e) => {
                    self.0.failed("read_blob", &e);
                    Ok(None)
                }
            }
        }
        .boxed()
    }

    fn shared_blob<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, Option<SharedBlob>> {
        async move {
            let found = match self.0.bucket.blob_size(d).await {
                Ok(Some(_)) => self.0.stream_marked(d).await,
                Ok(None) => Ok(Streamed::Absent),
                Err(e) => Err(e),
            };
            match found {
                Ok(Streamed::Blob(b)) => {
                    self.0.count("read_blob", "ok");
                    Ok(Some(b))
                }
                Ok(Streamed::Absent) => {
                    self.0.count("read_blob", "absent");
                    Ok(None)
                }
                // Counted where it was found.
                Ok(Streamed::Evicting) => Ok(None),
                Err(e) => {
                    self.0.failed("read_blob", &e);
                    Ok(None)
                }
            }
        }
        .boxed()
    }

    fn writer(&self, d: Digest) -> StoreFuture<'_, Box<dyn BlobWriter>> {
        async move {
            let inner = self.0.local.writer(d).await?;
            // Buffer for a streaming upload only when one of the few
            // streaming slots is free.
            let permit = self.0.streaming.clone().try_acquire_owned().ok();
            Ok(Box::new(SharedWriter {
                inner: Some(inner),
                digest: d,
                store: self.0.clone(),
                head: permit.as_ref().map(|_| bytes::BytesMut::new()),
                stream: None,
                permit,
            }) as Box<dyn BlobWriter>)
        }
        .boxed()
    }

    fn discard<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, ()> {
        // A damaged local copy says nothing of the bucket's.
        self.0.local.discard(d)
    }

    fn lease_fetch<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, Option<SharedBlob>> {
        async move {
            match self.0.lease_fetch(d).await {
                Ok(found) => Ok(found),
                // No lease to be had: fetch it here, as without a bucket.
                Err(e) => {
                    self.0.failed("lease", &e);
                    Ok(None)
                }
            }
        }
        .boxed()
    }

    fn release_fetch(&self, d: &Digest) {
        self.0.release(d);
    }

    fn discard_shared<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, ()> {
        async move {
            self.0.bucket.delete_blob(d).await.inspect_err(|e| {
                self.0.failed("discard", e);
            })?;
            self.0.count("discard", "ok");
            Ok(())
        }
        .boxed()
    }

    fn shared_size<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, Option<u64>> {
        async move {
            match self.0.bucket.blob_size(d).await {
                Ok(size) => Ok(size),
                Err(e) => {
                    self.0.failed("read_blob", &e);
                    Ok(None)
                }
            }
        }
        .boxed()
    }

    fn pin(&self, d: &Digest) -> ReadGuard {
        self.0.local.pin(d)
    }

    fn size(&self) -> u64 {
        self.0.local.size()
    }

    fn cached_manifest(&self, d: &Digest) -> Option<Arc<Manifest>> {
        self.0.local.cached_manifest(d)
    }

    fn manifest<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, Option<Arc<Manifest>>> {
        async move {
            if let Some(m) = self.0.local.manifest(d).await? {
                return Ok(Some(m));
            }
            let bytes = match self.0.bucket.blob_bytes(d, MAX_MANIFEST).await {
                Ok(Some(b)) => b,
                Ok(None) => return Ok(None),
                Err(e) => {
                    self.0.failed("read_manifest", &e);
                    return Ok(None);
                }
            };
            let got = Digest::of(&bytes);
            if got != *d {
                tracing::error!(digest = %d, %got, "the shared bucket's copy of a manifest does not match its digest; removing it");
                self.0.count("read_manifest", "error");
                let _ = self.0.bucket.delete_blob(d).await;
                return Ok(None);
            }
            let m = match Manifest::parse(*d, None, bytes) {
                Ok(m) => Arc::new(m),
                Err(e) => {
                    tracing::error!(digest = %d, "the shared bucket holds a blob under a manifest's digest that is no manifest: {e}");
                    return Ok(None);
                }
            };
            self.0.count("read_manifest", "ok");
            self.0.local.put_manifest(m.clone()).await?;
            Ok(Some(m))
        }
        .boxed()
    }

    fn put_manifest(&self, m: Arc<Manifest>) -> StoreFuture<'_, ()> {
        async move {
            self.0.local.put_manifest(m.clone()).await?;
            match self
                .0
                .bucket
                .put_blob_bytes(&m.digest, m.bytes.clone())
                .await
            {
                Ok(written) => {
                    let result = match written {
                        Uploaded::Written => "ok",
                        Uploaded::Present => "present",
                    };
                    match self.0.mark_manifest(&m.digest).await {
                        Ok(()) => self.0.count("write_manifest", result),
                        Err(e) => {
                            self.0.failed("write_manifest", &e);
                            self.0.again(m.digest);
                        }
                    }
                }
                Err(e) => {
                    self.0.failed("write_manifest", &e);
                    // Goes up with the failed blob uploads.
                    self.0.again(m.digest);
                }
            }
            Ok(())
        }
        .boxed()
    }

    fn cached_tag(&self, key: &TagKey) -> Option<TagRecord> {
        self.0.deferred.get(key).or_else(|| self.0.tags.get(key))
    }

    fn tag<'a>(&'a self, key: &'a TagKey) -> StoreFuture<'a, Option<TagRecord>> {
        async move {
            if let Some(r) = self.cached_tag(key) {
                return Ok(Some(r));
            }
            match self.0.bucket.read_doc(&Inner::tag_rel(key)).await {
                Ok(doc) => {
                    self.0.count("tag", "ok");
                    let rec = doc.and_then(|d| TagFile::decode(&d.bytes));
                    self.0.mirror_tag(key, rec).await;
                    Ok(rec)
                }
                Err(e) => {
                    // Served from this replica's copy until the bucket is back.
                    self.0.failed("tag", &e);
                    self.0.local.tag(key).await
                }
            }
        }
        .boxed()
    }

    fn update_tag<'a>(&'a self, key: &'a TagKey, mut f: TagUpdate) -> StoreFuture<'a, ()> {
        async move {
            let rel = Inner::tag_rel(key);
            let mut apply = |cur: Option<&[u8]>| {
                let rec = f(cur.and_then(TagFile::decode));
                rec.map(|r| TagFile::encode(&r))
            };
            match self.0.bucket.update_doc(&rel, &mut apply).await {
                Ok(written) => {
                    self.0.count("tag", "ok");
                    let rec = written.and_then(|b| TagFile::decode(&b));
                    self.0.mirror_tag(key, rec).await;
                    Ok(())
                }
                Err(e) => {
                    // This replica goes on with its own record until the
                    // bucket is back; the bucket's record then wins.
                    self.0.failed("tag", &e);
                    self.0.tags.invalidate(key);
                    self.0.deferred.invalidate(key);
                    self.0.local.update_tag(key, f).await
                }
            }
        }
        .boxed()
    }

    fn list_tags<'a>(&'a self, upstream: &'a str, repo: &'a RepoName) -> StoreFuture<'a, Vec<Tag>> {
        async move {
            let prefix = format!("tags/{upstream}/{}/_tags", repo.as_str());
            match self.0.bucket.list(&prefix).await {
                Ok(objects) => {
                    let mut tags: Vec<Tag> = objects
                        .iter()
                        // Empty: a removed record.
                        .filter(|(_, size)| *size > 0)
                        .filter_map(|(rel, _)| rel.strip_prefix(&prefix)?.strip_prefix('/'))
                        .filter_map(|t| t.parse().ok())
                        .collect();
                    tags.sort_by(|a, b| a.as_str().cmp(b.as_str()));
                    Ok(tags)
                }
                Err(e) => {
                    self.0.failed("tag", &e);
                    self.0.local.list_tags(upstream, repo).await
                }
            }
        }
        .boxed()
    }

    fn defer_tag(&self, key: &TagKey, rec: TagRecord, checked: SystemTime) {
        self.0
            .deferred
            .insert(key.clone(), TagRecord { checked, ..rec });
        self.0.local.defer_tag(key, rec, checked);
    }

    fn approvals<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, Vec<Vec<u8>>> {
        async move {
            // No fallback: an approval this replica cannot see is no
            // approval, and the verdict fails closed.
            let prefix = format!("approvals/sha256/{}", d.hex());
            let listed = self.0.bucket.list(&prefix).await.inspect_err(|e| {
                self.0.failed("approval", e);
            })?;
            let mut out = Vec::new();
            for (rel, _) in listed
                .iter()
                .filter(|(rel, _)| rel.ends_with(".json"))
                .take(MAX_APPROVALS)
            {
                if let Some(doc) = self.0.bucket.read_doc(rel).await? {
                    out.push(doc.bytes.to_vec());
                }
            }
            self.0.count("approval", "ok");
            Ok(out)
        }
        .boxed()
    }

    fn add_approval(&self, d: Digest, id: String, bytes: Vec<u8>) -> StoreFuture<'_, String> {
        async move {
            let rel = format!("approvals/sha256/{}/{id}.json", d.hex());
            self.0.bucket.write_doc(&rel, bytes.clone()).await?;
            self.0.count("approval", "ok");
            // A copy in the local tier, for `pullgate export` and `fsck`.
            if let Err(e) = self.0.local.add_approval(d, id, bytes).await {
                tracing::warn!("cannot copy an approval to the local tier: {e}");
            }
            Ok(format!("{}/{rel}", self.0.bucket.describe()))
        }
        .boxed()
    }

    fn read_meta<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        async move {
            match self.0.bucket.read_doc(name).await {
                Ok(doc) => {
                    self.0.count("meta", "ok");
                    Ok(doc.map(|d| d.bytes.to_vec()).filter(|b| !b.is_empty()))
                }
                Err(e) => {
                    self.0.failed("meta", &e);
                    self.0.local.read_meta(name).await
                }
            }
        }
        .boxed()
    }

    fn write_meta<'a>(&'a self, name: &'a str, bytes: Vec<u8>) -> StoreFuture<'a, ()> {
        async move {
            self.0.local.write_meta(name, bytes.clone()).await?;
            self.0.bucket.write_doc(name, bytes).await?;
            self.0.count("meta", "ok");
            Ok(())
        }
        .boxed()
    }

    fn update_meta<'a>(
        &'a self,
        name: &'a str,
        mut f: super::MetaUpdate,
    ) -> StoreFuture<'a, Option<Vec<u8>>> {
        async move {
            match self.0.bucket.update_doc(name, &mut *f).await {
                Ok(written) => {
                    self.0.count("meta", "ok");
                    if let Some(b) = &written {
                        self.0.local.write_meta(name, b.clone()).await?;
                    }
                    Ok(written)
                }
                Err(e) => {
                    self.0.failed("meta", &e);
                    Err(e)
                }
            }
        }
        .boxed()
    }

    fn set_aside_meta<'a>(&'a self, name: &'a str) -> StoreFuture<'a, String> {
        async move {
            let aside = format!(
                "{name}.unreadable-{}",
                super::index::unix(SystemTime::now())
            );
            self.0.bucket.copy(name, &aside).await?;
            self.0.bucket.delete(name).await?;
            Ok(format!("{}/{aside}", self.0.bucket.describe()))
        }
        .boxed()
    }

    fn probe(&self) -> StoreFuture<'_, ()> {
        async move {
            self.0.local.probe().await?;
            self.0.bucket.check().await
        }
        .boxed()
    }
}

/// Writes to the local tier. A blob larger than one part goes up to the
/// bucket as it is written (a multipart upload completed only once the
/// local commit found the digest matching); a smaller one, or one whose
/// streaming upload fell behind, goes up from the local tier after its
/// commit.
struct SharedWriter {
    inner: Option<Box<dyn BlobWriter>>,
    digest: Digest,
    store: Arc<Inner>,
    /// The first part's bytes, until the blob turns out larger than a part.
    head: Option<bytes::BytesMut>,
    stream: Option<StreamingUpload>,
    /// Held while bytes are buffered for the bucket (bounds their memory).
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Blobs streamed to the bucket while they are fetched, at most.
const STREAMING: usize = 4;

impl SharedWriter {
    /// Feeds what was just written to the bucket's upload, starting it
    /// when the blob outgrows one part; gives up without failing the write.
    async fn feed(&mut self, chunk: &[u8]) {
        if let Some(s) = &mut self.stream {
            if !s.push(chunk) {
                self.give_up("the bucket fell behind the fetch");
            }
            return;
        }
        let Some(head) = &mut self.head else { return };
        head.extend_from_slice(chunk);
        if head.len() <= PART_SIZE {
            return;
        }
        let head = self.head.take().unwrap_or_default();
        match self.store.bucket.start_upload(&self.digest).await {
            Ok(mut s) => {
                if s.push(&head) {
                    self.stream = Some(s);
                } else {
                    spawn_abort(s);
                }
            }
            Err(e) => {
                tracing::debug!(digest = %self.digest, "no streaming upload: {e}");
                self.permit = None;
            }
        }
    }

    fn give_up(&mut self, why: &str) {
        tracing::debug!(digest = %self.digest, "streaming upload given up: {why}");
        if let Some(s) = self.stream.take() {
            spawn_abort(s);
        }
        self.head = None;
        self.permit = None;
    }
}

fn spawn_abort(s: StreamingUpload) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(s.abort());
    }
}

impl Drop for SharedWriter {
    fn drop(&mut self) {
        if let Some(s) = self.stream.take() {
            spawn_abort(s);
        }
    }
}

impl BlobWriter for SharedWriter {
    fn write(&mut self, chunk: Bytes) -> StoreFuture<'_, ()> {
        async move {
            let Some(inner) = self.inner.as_mut() else {
                return Err(io::Error::other("write after finish"));
            };
            inner.write(chunk.clone()).await?;
            self.feed(&chunk).await;
            Ok(())
        }
        .boxed()
    }

    fn written(&self) -> u64 {
        self.inner.as_ref().map_or(0, |w| w.written())
    }

    fn source(&self) -> Source {
        self.inner
            .as_ref()
            .expect("a writer has its inner writer until finish")
            .source()
    }

    fn finish(mut self: Box<Self>) -> BoxFuture<'static, Result<u64, WriteError>> {
        let inner = self.inner.take();
        let stream = self.stream.take();
        let permit = self.permit.take();
        let (digest, store) = (self.digest, self.store.clone());
        async move {
            let Some(inner) = inner else {
                return Err(WriteError::Io(io::Error::other("finished twice")));
            };
            let size = match inner.finish().await {
                Ok(size) => size,
                Err(e) => {
                    // The digest did not match: the parts never become an object.
                    if let Some(s) = stream {
                        spawn_abort(s);
                    }
                    return Err(e);
                }
            };
            match stream {
                Some(s) => store.complete_streaming(digest, size, s, permit),
                None => store.spawn_upload(digest),
            }
            Ok(size)
        }
        .boxed()
    }

    fn abort(mut self: Box<Self>) -> BoxFuture<'static, ()> {
        if let Some(s) = self.stream.take() {
            spawn_abort(s);
        }
        match self.inner.take() {
            Some(inner) => inner.abort(),
            None => futures_util::future::ready(()).boxed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    use bytes::Bytes;
    use futures_util::TryStreamExt;
    use object_store::memory::InMemory;
    use object_store::ObjectStore;

    use super::super::tests::shared_store;
    use super::*;

    /// Waits until a replica's background uploads are done.
    pub(super) async fn uploaded(s: &SharedStore) {
        for _ in 0..500 {
            if s.0.metrics.bucket_uploads_pending.get() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("uploads still pending after 5 s");
    }

    fn key() -> TagKey {
        TagKey {
            upstream: Arc::from("docker.io"),
            repo: "library/alpine".parse().unwrap(),
            tag: "3".parse().unwrap(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_one_replica_stores_every_replica_reads() {
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let bucket = Arc::new(InMemory::new());
        let a = shared_store(dirs.0.path(), Some(bucket.clone()));
        let b = shared_store(dirs.1.path(), Some(bucket.clone()));

        // A small blob is copied whole into the other's local tier.
        let small = Bytes::from_static(b"a config");
        let ds = Digest::of(&small);
        crate::store::put_blob(&a, ds, small.clone()).await.unwrap();
        // A large one goes up in parts and streams to the other.
        let large = Bytes::from(
            (0..20 * 1024 * 1024u32)
                .map(|i| (i % 251) as u8)
                .collect::<Vec<u8>>(),
        );
        let dl = Digest::of(&large);
        crate::store::put_blob(&a, dl, large.clone()).await.unwrap();
        uploaded(&a).await;
        assert_eq!(
            a.0.metrics
                .bucket_requests
                .with_label_values(&["upload", "ok"])
                .get(),
            2
        );
        let h = b
            .open(&ds)
            .await
            .unwrap()
            .expect("small blob from the bucket");
        assert_eq!(h.size, small.len() as u64);
        assert!(b.has_blob(&ds), "now in the local tier");
        assert!(
            b.open(&dl).await.unwrap().is_none(),
            "large: not copied whole"
        );
        let shared = b.shared_blob(&dl).await.unwrap().expect("in the bucket");
        assert_eq!(shared.size, large.len() as u64);
        let got: Vec<Bytes> = shared.body.try_collect().await.unwrap();
        assert_eq!(got.concat(), large);

        // Manifests, tags, approvals, documents.
        let mb = Bytes::from_static(br#"{"schemaVersion":2,"manifests":[]}"#);
        let dm = Digest::of(&mb);
        a.put_manifest(Arc::new(Manifest::parse(dm, None, mb.clone()).unwrap()))
            .await
            .unwrap();
        assert_eq!(b.manifest(&dm).await.unwrap().unwrap().bytes, mb);
        let when = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        a.update_tag(
            &key(),
            Box::new(move |_| {
                Some(TagRecord {
                    digest: dm,
                    checked: when,
                    approved: Some(dm),
                })
            }),
        )
        .await
        .unwrap();
        let rec = b.tag(&key()).await.unwrap().unwrap();
        assert_eq!(
            (rec.digest, rec.checked, rec.approved),
            (dm, when, Some(dm))
        );
        assert_eq!(
            b.list_tags("docker.io", &key().repo).await.unwrap(),
            [key().tag]
        );
        // A record removed by one replica (its upstream says the tag is
        // gone) is gone for the other, and can be written again.
        a.update_tag(&key(), Box::new(|_| None)).await.unwrap();
        let fresh = tempfile::tempdir().unwrap();
        let c = shared_store(fresh.path(), Some(bucket.clone()));
        assert!(c.tag(&key()).await.unwrap().is_none());
        assert!(c
            .list_tags("docker.io", &key().repo)
            .await
            .unwrap()
            .is_empty());
        c.update_tag(
            &key(),
            Box::new(move |old| {
                assert!(old.is_none(), "a removed record reads as none");
                Some(TagRecord {
                    digest: dm,
                    checked: when,
                    approved: None,
                })
            }),
        )
        .await
        .unwrap();
        assert_eq!(
            c.list_tags("docker.io", &key().repo).await.unwrap(),
            [key().tag]
        );
        let at = a
            .add_approval(dm, "k1".into(), b"{}".to_vec())
            .await
            .unwrap();
        assert!(at.starts_with("memory://test/approvals/sha256/"), "{at}");
        assert_eq!(b.approvals(&dm).await.unwrap(), [b"{}".to_vec()]);

        // Nothing sits in the bucket outside the prefix.
        let keys: Vec<_> = bucket.list(None).try_collect().await.unwrap();
        assert!(keys
            .iter()
            .all(|m| m.location.as_ref().starts_with("site/")));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_updates_of_one_tag_by_replicas_lose_nothing() {
        let bucket = Arc::new(InMemory::new());
        let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
        let replicas: Vec<_> = dirs
            .iter()
            .map(|d| shared_store(d.path(), Some(bucket.clone())))
            .collect();
        let digest = Digest::of(b"tag target");
        let approved = Digest::of(b"approved");
        // Half the replicas move the tag (keeping what was approved), the
        // other half record approvals (keeping the digest): as the content
        // layer does. Every write must survive the others.
        let mut tasks = Vec::new();
        for (i, r) in replicas.iter().enumerate() {
            let r = r.clone();
            tasks.push(tokio::spawn(async move {
                for round in 0..10u64 {
                    let f: TagUpdate = if i % 2 == 0 {
                        Box::new(move |old: Option<TagRecord>| {
                            Some(TagRecord {
                                digest,
                                checked: UNIX_EPOCH + Duration::from_secs(round + 1),
                                approved: old.and_then(|o| o.approved),
                            })
                        })
                    } else {
                        Box::new(move |old: Option<TagRecord>| {
                            let base = old.unwrap_or(TagRecord {
                                digest: approved,
                                checked: UNIX_EPOCH,
                                approved: None,
                            });
                            Some(TagRecord {
                                approved: Some(approved),
                                ..base
                            })
                        })
                    };
                    r.update_tag(&key(), f).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let fresh = tempfile::tempdir().unwrap();
        let reader = shared_store(fresh.path(), Some(bucket));
        let rec = reader.tag(&key()).await.unwrap().unwrap();
        assert_eq!(rec.approved, Some(approved), "an approval was lost");
        assert_eq!(rec.digest, digest, "a move was lost");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn base_history_of_replicas_is_merged_not_overwritten() {
        let bucket = Arc::new(InMemory::new());
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = shared_store(dirs.0.path(), Some(bucket.clone()));
        let b = shared_store(dirs.1.path(), Some(bucket.clone()));
        let add = |item: &'static str| -> crate::store::MetaUpdate {
            Box::new(move |cur: Option<&[u8]>| {
                let mut list: Vec<String> =
                    cur.map_or_else(Vec::new, |c| serde_json::from_slice(c).unwrap());
                list.push(item.to_owned());
                Some(serde_json::to_vec(&list).unwrap())
            })
        };
        let (x, y) = tokio::join!(
            a.update_meta("bases/history.json", add("a")),
            b.update_meta("bases/history.json", add("b"))
        );
        x.unwrap();
        y.unwrap();
        let stored = a.read_meta("bases/history.json").await.unwrap().unwrap();
        let mut list: Vec<String> = serde_json::from_slice(&stored).unwrap();
        list.sort();
        assert_eq!(list, ["a", "b"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_copy_in_the_bucket_is_never_served_and_is_removed() {
        let bucket = Arc::new(InMemory::new());
        let dir = tempfile::tempdir().unwrap();
        let s = shared_store(dir.path(), Some(bucket.clone()));
        let d = Digest::of(b"the real bytes");
        let key = object_store::path::Path::from(format!("site/{}", Bucket::blob_rel(&d)));
        bucket
            .put(&key, Bytes::from_static(b"other bytes").into())
            .await
            .unwrap();
        assert!(s.open(&d).await.unwrap().is_none());
        assert!(!s.has_blob(&d));
        assert!(bucket.head(&key).await.is_err(), "the bad copy is gone");
        // A manifest too.
        bucket
            .put(&key, Bytes::from_static(br#"{"schemaVersion":2}"#).into())
            .await
            .unwrap();
        assert!(s.manifest(&d).await.unwrap().is_none());
        assert!(bucket.head(&key).await.is_err(), "the bad copy is gone");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_local_copy_leaves_the_bucket_alone_and_a_head_needs_no_upstream() {
        let bucket = Arc::new(InMemory::new());
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = shared_store(dirs.0.path(), Some(bucket.clone()));
        let b = shared_store(dirs.1.path(), Some(bucket.clone()));
        let bytes = Bytes::from(vec![5u8; 5 << 20]);
        let d = Digest::of(&bytes);
        crate::store::put_blob(&a, d, bytes.clone()).await.unwrap();
        uploaded(&a).await;
        assert_eq!(b.shared_size(&d).await.unwrap(), Some(bytes.len() as u64));
        a.discard(&d).await.unwrap();
        assert!(!a.has_blob(&d));
        assert_eq!(
            b.shared_size(&d).await.unwrap(),
            Some(bytes.len() as u64),
            "a local discard removed the bucket's copy"
        );
        b.discard_shared(&d).await.unwrap();
        assert_eq!(b.shared_size(&d).await.unwrap(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_holder_ends_its_own_lease_not_the_one_that_took_it_over() {
        let bucket = Arc::new(InMemory::new());
        let dir = tempfile::tempdir().unwrap();
        let a = shared_store(dir.path(), Some(bucket.clone()));
        let (mine, theirs) = (Digest::of(b"mine"), Digest::of(b"theirs"));
        for d in [&mine, &theirs] {
            assert!(a.lease_fetch(d).await.unwrap().is_none(), "taken");
        }
        // One lapsed (renewals failed) and another replica took it over.
        let other = serde_json::to_vec(&LeaseDoc {
            holder: "other".into(),
            until: unix_ms() + 30_000,
        })
        .unwrap();
        let rel = Inner::lease_rel(&theirs);
        a.bucket().write_doc(&rel, other.clone()).await.unwrap();
        a.release_fetch(&mine);
        a.0.end_lease(&rel).await.unwrap();
        for _ in 0..100 {
            if a.bucket()
                .read_doc(&Inner::lease_rel(&mine))
                .await
                .unwrap()
                .is_none()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            a.bucket()
                .read_doc(&Inner::lease_rel(&mine))
                .await
                .unwrap()
                .is_none(),
            "its own lease ended"
        );
        let held = a.bucket().read_doc(&rel).await.unwrap().expect("kept");
        assert_eq!(held.bytes, other, "the new holder's lease stays");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_restarted_on_its_tier_takes_its_predecessors_leases_at_once() {
        let bucket = Arc::new(InMemory::new());
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let d = Digest::of(b"being fetched when the replica died");
        let first = shared_store(dirs.0.path(), Some(bucket.clone()));
        assert!(first.lease_fetch(&d).await.unwrap().is_none(), "taken");
        let id = first.local().id().unwrap().to_owned();
        // Killed: its lease stays in the bucket, fresh for 30 s.
        drop(first);
        let other = shared_store(dirs.1.path(), Some(bucket.clone()));
        let waits = tokio::time::timeout(Duration::from_secs(2), other.lease_fetch(&d)).await;
        assert!(
            waits.is_err(),
            "another replica waits for the lease to lapse"
        );
        let again = shared_store(dirs.0.path(), Some(bucket.clone()));
        assert_eq!(
            again.local().id(),
            Some(id.as_str()),
            "the tier keeps its id"
        );
        let took = tokio::time::timeout(Duration::from_secs(2), again.lease_fetch(&d))
            .await
            .expect("its successor does not wait")
            .unwrap();
        assert!(took.is_none(), "and fetches itself");
        let held: LeaseDoc = serde_json::from_slice(
            &again
                .bucket()
                .read_doc(&Inner::lease_rel(&d))
                .await
                .unwrap()
                .unwrap()
                .bytes,
        )
        .unwrap();
        assert_eq!(held.holder, again.0.holder);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_replica_fetches_under_the_lease_the_other_waits_for_its_copy() {
        let bucket = Arc::new(InMemory::new());
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = shared_store(dirs.0.path(), Some(bucket.clone()));
        let b = shared_store(dirs.1.path(), Some(bucket.clone()));
        let bytes = Bytes::from(vec![3u8; 1 << 20]);
        let d = Digest::of(&bytes);
        assert!(
            a.lease_fetch(&d).await.unwrap().is_none(),
            "a takes the lease"
        );
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.lease_fetch(&d).await.unwrap() })
        };
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!waiter.is_finished(), "b waits while a holds the lease");
        crate::store::put_blob(&a, d, bytes.clone()).await.unwrap();
        let shared = waiter.await.unwrap().expect("a's copy");
        let got: Vec<Bytes> = shared.body.try_collect().await.unwrap();
        assert_eq!(got.concat(), bytes);
        uploaded(&a).await;
        for _ in 0..100 {
            if a.0.leases.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            a.0.leases.lock().unwrap().is_empty(),
            "released after the upload"
        );

        // A lease whose holder died lapses, and a waiter takes it over.
        let other = Digest::of(b"other");
        let lapsed = serde_json::to_vec(&LeaseDoc {
            holder: "gone".into(),
            until: unix_ms() - 1,
        })
        .unwrap();
        a.0.bucket
            .write_doc(&Inner::lease_rel(&other), lapsed)
            .await
            .unwrap();
        assert!(b.lease_fetch(&other).await.unwrap().is_none(), "taken over");
        // A fetch that fails releases it: the next one takes it at once.
        b.release_fetch(&other);
        for _ in 0..100 {
            if a.0
                .bucket
                .read_doc(&Inner::lease_rel(&other))
                .await
                .unwrap()
                .is_none()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(a.lease_fetch(&other).await.unwrap().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_local_copy_that_no_longer_matches_is_not_uploaded() {
        let bucket = Arc::new(InMemory::new());
        let b = Bucket::new(bucket.clone(), "", "memory://test".into());
        let dir = tempfile::tempdir().unwrap();
        for len in [1000usize, super::super::bucket::PART_SIZE + 1000] {
            let bytes = vec![7u8; len];
            let d = Digest::of(&bytes);
            let path = dir.path().join(format!("blob-{len}"));
            let mut changed = bytes.clone();
            changed[len / 2] = 8;
            std::fs::write(&path, &changed).unwrap();
            let file = Arc::new(std::fs::File::open(&path).unwrap());
            let e = b.upload_file(&d, file, len as u64).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
            assert!(
                b.blob_size(&d).await.unwrap().is_none(),
                "nothing under {d}"
            );
        }
    }
}

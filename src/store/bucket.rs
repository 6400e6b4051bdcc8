//! The bucket gateway replicas share (`[storage.s3]`), through the
//! `object_store` crate: S3 in service, its in-memory store in unit tests.
//!
//! Keys mirror the layout on disk (see [`super::FsStore`]) under the
//! configured prefix. Blobs go in only after their bytes were hashed again
//! on the way up and matched their digest: small ones in one `PUT` with
//! `If-None-Match: *`, large ones as a multipart upload that is completed
//! only then (an upload that is never completed is never visible).
//! Documents that replicas change (tag records, base history) are updated
//! by compare-and-swap on their ETag (`If-Match`), so two replicas never
//! lose each other's writes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    GetOptions, ObjectStore, PutMode, PutOptions, PutPayload, UpdateVersion, WriteMultipart,
};

use crate::config::S3Config;
use crate::oci::names::{Digest, Hasher};

/// Blobs up to this size go up in one `PUT`; larger ones in parts of it.
pub const PART_SIZE: usize = 16 * 1024 * 1024;

/// Parts of one multipart upload in flight at once.
const PARTS_IN_FLIGHT: usize = 2;

/// A compare-and-swap lost this many times in a row is given up.
const CAS_ATTEMPTS: usize = 32;

/// Bytes read from a local file per step of an upload.
const READ_STEP: usize = 4 * 1024 * 1024;

/// After a request the engine did not answer, the bucket is skipped for
/// this long (the local tier and the upstream serve meanwhile), so that a
/// dead or black-holed engine costs clients one timeout, not one each.
const SKIP_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// The kind of the error a skipped request fails with.
pub const SKIPPED: io::ErrorKind = io::ErrorKind::ConnectionAborted;

/// A metadata request (a document, a HEAD, a listing, a manifest) that
/// takes longer than this has failed: clients wait on them.
const META_TIMEOUT: Duration = Duration::from_secs(10);

/// The shared bucket.
pub struct Bucket {
    /// For documents, HEADs, listings and small objects: a short timeout.
    store: Arc<dyn ObjectStore>,
    /// For blob bodies, up and down: as long as they take.
    data: Arc<dyn ObjectStore>,
    prefix: String,
    /// `s3://bucket/prefix at http://endpoint`, for messages.
    describe: String,
    /// Unix milliseconds until which the bucket is skipped.
    skip_until: AtomicU64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An object of a listing.
pub struct Listed {
    /// Its key, relative to the prefix.
    pub rel: String,
    pub size: u64,
    /// When it was written, by the engine's clock.
    pub written: SystemTime,
}

/// The new content of a document given its current one; `None` removes it.
pub type DocUpdate<'a> = dyn FnMut(Option<&[u8]>) -> Option<Vec<u8>> + Send + 'a;

/// A document as read, with what a compare-and-swap of it needs.
pub struct Doc {
    pub bytes: Bytes,
    version: UpdateVersion,
}

/// How an upload of a blob ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uploaded {
    /// Its bytes are in the bucket now.
    Written,
    /// The bucket held it already (another replica put it there).
    Present,
}

impl Bucket {
    /// The bucket of `config`. Nothing is asked of the engine yet: see
    /// [`Bucket::check`].
    pub fn s3(config: &S3Config) -> io::Result<Bucket> {
        use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
        use object_store::{BackoffConfig, ClientOptions, RetryConfig};
        let mut options = ClientOptions::new()
            .with_allow_http(config.endpoint.scheme() == "http")
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(META_TIMEOUT)
            .with_pool_idle_timeout(Duration::from_secs(30));
        if let Some(pem) = &config.ca_pem {
            for cert in object_store::Certificate::from_pem_bundle(pem)
                .map_err(|e| io::Error::other(format!("storage.s3.ca: {e}")))?
            {
                options = options.with_root_certificate(cert);
            }
        }
        // Replicas serve from their local tiers while the engine is away;
        // minutes of retries would only hold clients up.
        let retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 2,
            retry_timeout: Duration::from_secs(10),
        };
        let build = |options: ClientOptions| {
            AmazonS3Builder::new()
                .with_endpoint(config.endpoint.as_str().trim_end_matches('/'))
                .with_bucket_name(&config.bucket)
                .with_region(&config.region)
                .with_access_key_id(&config.access_key)
                .with_secret_access_key(&config.secret_key)
                .with_virtual_hosted_style_request(false)
                .with_conditional_put(S3ConditionalPut::ETagMatch)
                .with_client_options(options)
                .with_retry(retry.clone())
                .build()
                .map_err(|e| io::Error::other(format!("[storage.s3]: {e}")))
        };
        let store = build(options.clone())?;
        // A blob streams for as long as it takes; a dead engine is found by
        // the connect timeout and the retry deadline.
        let data = build(options.with_timeout(Duration::from_secs(3600)))?;
        let mut b = Bucket::new(Arc::new(store), &config.prefix, config.describe());
        b.data = Arc::new(data);
        Ok(b)
    }

    /// A bucket over any object store (the in-memory one in tests).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, describe: String) -> Bucket {
        Bucket {
            data: store.clone(),
            store,
            prefix: prefix.trim_matches('/').to_owned(),
            describe,
            skip_until: AtomicU64::new(0),
        }
    }

    /// Fails at once while the bucket is skipped after a failure.
    fn guard(&self) -> io::Result<()> {
        if now_ms() < self.skip_until.load(Ordering::Relaxed) {
            return Err(io::Error::new(
                SKIPPED,
                format!(
                    "{} is skipped for a few seconds: it did not answer a moment ago",
                    self.describe
                ),
            ));
        }
        Ok(())
    }

    /// `s3://bucket/prefix at http://endpoint`.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    fn key(&self, rel: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(rel)
        } else {
            Path::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// A key relative to the prefix again.
    fn rel<'a>(&self, key: &'a Path) -> &'a str {
        let k = key.as_ref();
        if self.prefix.is_empty() {
            k
        } else {
            k.strip_prefix(self.prefix.as_str())
                .and_then(|r| r.strip_prefix('/'))
                .unwrap_or(k)
        }
    }

    fn error(&self, what: &str, e: object_store::Error) -> io::Error {
        let kind = match e {
            object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => io::ErrorKind::PermissionDenied,
            _ => io::ErrorKind::Other,
        };
        if kind == io::ErrorKind::Other {
            // No answer, a timeout, a 5xx: give the engine a moment.
            self.skip_until.store(
                now_ms() + SKIP_AFTER_FAILURE.as_millis() as u64,
                Ordering::Relaxed,
            );
        }
        io::Error::new(
            kind,
            format!("{} {what}: {}", self.describe, plain(&e.to_string())),
        )
    }

    /// Where a blob's bytes are in the bucket.
    pub fn blob_rel(d: &Digest) -> String {
        let hex = d.hex();
        format!("blobs/sha256/{}/{hex}", &hex[..2])
    }

    /// Start-up: the engine answers, the bucket exists and the credentials
    /// may read and write it. The message says which of these failed.
    pub async fn check(&self) -> io::Result<()> {
        // A list first: some engines make a missing bucket on a write.
        let mut listing = self.store.list(Some(&self.key("_pullgate")));
        if let Some(Err(e)) = listing.next().await {
            return Err(self.error("cannot be listed", e));
        }
        drop(listing);
        let key = self.key("_pullgate/ready");
        self.store
            .put(&key, PutPayload::from_static(b"ok\n"))
            .await
            .map_err(|e| self.error("does not take writes", e))?;
        self.store
            .get(&key)
            .await
            .map_err(|e| self.error("cannot be read", e))?;
        // It answers: no more skipping.
        self.skip_until.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Start-up: the engine honours conditional writes, as the replicas'
    /// leases and compare-and-swap need. Some engines accept
    /// `If-None-Match` and `If-Match` and ignore them (Garage 2.5), which
    /// would let replicas lose each other's writes without a word.
    pub async fn check_conditional_writes(&self) -> io::Result<()> {
        // A key of this check alone: replicas start at the same time.
        let rel = format!("_pullgate/conditional-{}-{}", std::process::id(), now_ms());
        let key = self.key(&rel);
        let put = |mode: PutMode, body: &'static [u8]| {
            let opts = PutOptions {
                mode,
                ..Default::default()
            };
            self.store
                .put_opts(&key, PutPayload::from_static(body), opts)
        };
        // Whether the engine refused a write it had to refuse.
        let refused = |r: object_store::Result<object_store::PutResult>| match r {
            Ok(_) => Ok(false),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(true),
            Err(e) => Err(self.error("cannot be checked for conditional writes", e)),
        };
        let ignores = |what: &str| {
            io::Error::other(format!(
                "{} ignores conditional writes ({what}): replicas need them so as not to lose each other's leases and tag records; use an engine that honours them (SeaweedFS does; AWS S3 has since 2024)",
                self.describe
            ))
        };
        let stale = UpdateVersion {
            e_tag: Some("\"00000000000000000000000000000000\"".into()),
            version: None,
        };
        let result = async {
            put(PutMode::Create, b"1")
                .await
                .map_err(|e| self.error("does not take writes", e))?;
            if !refused(put(PutMode::Create, b"2").await)? {
                return Err(ignores("a PUT with If-None-Match: * replaced an object"));
            }
            if !refused(put(PutMode::Update(stale), b"3").await)? {
                return Err(ignores(
                    "a PUT with If-Match of another version went through",
                ));
            }
            Ok(())
        }
        .await;
        let _ = self.store.delete(&key).await;
        result
    }

    // ---- blobs ---------------------------------------------------------------

    /// A blob's size in the bucket, `None` when it is not there.
    pub async fn blob_size(&self, d: &Digest) -> io::Result<Option<u64>> {
        self.guard()?;
        match self.store.head(&self.key(&Self::blob_rel(d))).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(&format!("cannot look up blob {d}"), e)),
        }
    }

    /// A blob's bytes as they stream from the bucket, with its size.
    pub async fn blob_stream(
        &self,
        d: &Digest,
    ) -> io::Result<Option<(u64, BoxStream<'static, io::Result<Bytes>>)>> {
        self.guard()?;
        match self.data.get(&self.key(&Self::blob_rel(d))).await {
            Ok(r) => {
                let size = r.meta.size;
                let describe = self.describe.clone();
                let stream = r
                    .into_stream()
                    .map_err(move |e| io::Error::other(format!("{describe}: {e}")))
                    .boxed();
                Ok(Some((size, stream)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(&format!("cannot read blob {d}"), e)),
        }
    }

    /// A small blob whole (a manifest, a config), `None` when absent or
    /// larger than `max`. The caller checks the digest.
    pub async fn blob_bytes(&self, d: &Digest, max: u64) -> io::Result<Option<Bytes>> {
        self.guard()?;
        let key = self.key(&Self::blob_rel(d));
        match self.store.head(&key).await {
            Ok(meta) if meta.size > max => return Ok(None),
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.error(&format!("cannot look up blob {d}"), e)),
        }
        self.read_blob(d, max).await
    }

    /// A blob's bytes, read whole without looking first; `None` when it is
    /// absent or larger than `max` (then not read).
    pub async fn read_blob(&self, d: &Digest, max: u64) -> io::Result<Option<Bytes>> {
        self.guard()?;
        let key = self.key(&Self::blob_rel(d));
        match self.store.get(&key).await {
            Ok(r) if r.meta.size > max => Ok(None),
            Ok(r) => r
                .bytes()
                .await
                .map(Some)
                .map_err(|e| self.error(&format!("cannot read blob {d}"), e)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(&format!("cannot read blob {d}"), e)),
        }
    }

    /// Puts bytes already checked against `d` (a manifest) under `d`,
    /// unless the bucket holds it.
    pub async fn put_blob_bytes(&self, d: &Digest, bytes: Bytes) -> io::Result<Uploaded> {
        self.put_checked(d, bytes, PutMode::Create, &*self.store)
            .await
    }

    async fn put_checked(
        &self,
        d: &Digest,
        bytes: Bytes,
        mode: PutMode,
        via: &dyn ObjectStore,
    ) -> io::Result<Uploaded> {
        self.guard()?;
        let key = self.key(&Self::blob_rel(d));
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        match via.put_opts(&key, bytes.into(), opts).await {
            Ok(_) => Ok(Uploaded::Written),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(Uploaded::Present),
            Err(e) => Err(self.error(&format!("cannot write blob {d}"), e)),
        }
    }

    /// Uploads the committed local copy of blob `d` (`size` bytes of
    /// `file`), hashing it again on the way: a copy that no longer matches
    /// its digest is not uploaded, and a multipart upload is completed only
    /// after the last part matched.
    pub async fn upload_file(
        &self,
        d: &Digest,
        file: Arc<File>,
        size: u64,
    ) -> io::Result<Uploaded> {
        self.guard()?;
        let key = self.key(&Self::blob_rel(d));
        // An object of another size under the digest is not the blob: the
        // checked bytes replace it.
        let mode = match self.store.head(&key).await {
            Ok(meta) if meta.size == size => return Ok(Uploaded::Present),
            Ok(_) => PutMode::Overwrite,
            Err(object_store::Error::NotFound { .. }) => PutMode::Create,
            Err(e) => return Err(self.error(&format!("cannot look up blob {d}"), e)),
        };
        if size <= PART_SIZE as u64 {
            let bytes = read_at(file, 0, size as usize).await?;
            check_digest(d, &bytes)?;
            return self.put_checked(d, bytes, mode, &*self.data).await;
        }
        let upload = self
            .data
            .put_multipart(&key)
            .await
            .map_err(|e| self.error(&format!("cannot start the upload of blob {d}"), e))?;
        let mut parts = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut hasher = Hasher::new();
        let mut at = 0u64;
        while at < size {
            let len = (size - at).min(READ_STEP as u64) as usize;
            let chunk = match read_at(file.clone(), at, len).await {
                Ok(c) => c,
                Err(e) => {
                    let _ = parts.abort().await;
                    return Err(e);
                }
            };
            hasher.update(&chunk);
            at += len as u64;
            if let Err(e) = parts.wait_for_capacity(PARTS_IN_FLIGHT).await {
                let _ = parts.abort().await;
                return Err(self.error(&format!("cannot upload blob {d}"), e));
            }
            parts.put(chunk);
        }
        let got = hasher.finish();
        if got != *d {
            let _ = parts.abort().await;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the local copy of blob {d} hashes to {got}; not uploaded"),
            ));
        }
        parts
            .finish()
            .await
            .map_err(|e| self.error(&format!("cannot complete the upload of blob {d}"), e))?;
        Ok(Uploaded::Written)
    }

    /// Removes a blob (found damaged).
    pub async fn delete_blob(&self, d: &Digest) -> io::Result<()> {
        self.delete(&Self::blob_rel(d)).await
    }

    /// Every blob in the bucket, with its size.
    pub async fn list_blobs(&self) -> io::Result<Vec<(Digest, u64)>> {
        let objects = self.list("blobs/sha256").await?;
        Ok(objects
            .into_iter()
            .filter_map(|(rel, size)| {
                let hex = rel.rsplit('/').next()?;
                Some((Digest::from_hex(hex)?, size))
            })
            .collect())
    }

    // ---- documents -----------------------------------------------------------

    /// A document and its version, `None` when absent.
    pub async fn read_doc(&self, rel: &str) -> io::Result<Option<Doc>> {
        self.guard()?;
        match self
            .store
            .get_opts(&self.key(rel), GetOptions::default())
            .await
        {
            Ok(r) => {
                let version = UpdateVersion {
                    e_tag: r.meta.e_tag.clone(),
                    version: r.meta.version.clone(),
                };
                let bytes = r
                    .bytes()
                    .await
                    .map_err(|e| self.error(&format!("cannot read {rel}"), e))?;
                Ok(Some(Doc { bytes, version }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(&format!("cannot read {rel}"), e)),
        }
    }

    /// Replaces a document whole, whatever it held.
    pub async fn write_doc(&self, rel: &str, bytes: Vec<u8>) -> io::Result<()> {
        self.guard()?;
        self.store
            .put(&self.key(rel), bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| self.error(&format!("cannot write {rel}"), e))
    }

    /// Writes a document only if none is there; `false` when one was.
    pub async fn create_doc(&self, rel: &str, bytes: Vec<u8>) -> io::Result<bool> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.key(rel), bytes.into(), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(false),
            Err(e) => Err(self.error(&format!("cannot write {rel}"), e)),
        }
    }

    /// Replaces a document with `f(current)` by compare-and-swap: when
    /// another writer got in between, `f` runs again on what it wrote.
    /// `None` from `f` removes the document (leaves it empty: an empty
    /// document reads as absent everywhere). What was written.
    pub async fn update_doc(
        &self,
        rel: &str,
        f: &mut DocUpdate<'_>,
    ) -> io::Result<Option<Vec<u8>>> {
        let key = self.key(rel);
        for _ in 0..CAS_ATTEMPTS {
            let current = self.read_doc(rel).await?;
            // An empty document is a removed one (a tombstone, below).
            let held = current
                .as_ref()
                .map(|d| &d.bytes[..])
                .filter(|b| !b.is_empty());
            let next = f(held);
            if next.is_none() && held.is_none() {
                return Ok(None);
            }
            // Removal is a compare-and-swap too: an empty document in its
            // place, so that a record another replica wrote in between is
            // never deleted unseen.
            let body = next.clone().unwrap_or_default();
            let mode = match current {
                None => PutMode::Create,
                Some(doc) => PutMode::Update(doc.version),
            };
            let opts = PutOptions {
                mode,
                ..Default::default()
            };
            match self
                .store
                .put_opts(&key, Bytes::from(body).into(), opts)
                .await
            {
                Ok(_) => return Ok(next),
                // Another replica wrote it since we read it: again, on theirs.
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) => tokio::task::yield_now().await,
                Err(e) => return Err(self.error(&format!("cannot write {rel}"), e)),
            }
        }
        Err(io::Error::other(format!(
            "{}: {rel} kept changing under {CAS_ATTEMPTS} attempts to update it",
            self.describe
        )))
    }

    pub async fn delete(&self, rel: &str) -> io::Result<()> {
        self.guard()?;
        match self.store.delete(&self.key(rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(&format!("cannot delete {rel}"), e)),
        }
    }

    /// Copies a document to another key.
    pub async fn copy(&self, from: &str, to: &str) -> io::Result<()> {
        self.store
            .copy(&self.key(from), &self.key(to))
            .await
            .map_err(|e| self.error(&format!("cannot copy {from} to {to}"), e))
    }

    /// Every object under `prefix` (relative keys), with its size.
    pub async fn list(&self, prefix: &str) -> io::Result<Vec<(String, u64)>> {
        Ok(self
            .list_dated(prefix)
            .await?
            .into_iter()
            .map(|o| (o.rel, o.size))
            .collect())
    }

    /// Every object under `prefix`, with its size and when it was written.
    pub async fn list_dated(&self, prefix: &str) -> io::Result<Vec<Listed>> {
        self.guard()?;
        let key = self.key(prefix);
        let mut out = Vec::new();
        let mut objects = self.store.list(Some(&key));
        while let Some(meta) = objects.next().await {
            let meta = meta.map_err(|e| self.error(&format!("cannot list {prefix}"), e))?;
            out.push(Listed {
                rel: self.rel(&meta.location).to_owned(),
                size: meta.size,
                written: meta.last_modified.into(),
            });
        }
        out.sort_by(|a, b| a.rel.cmp(&b.rel));
        Ok(out)
    }

    /// When the object at `rel` was last written (by the engine's clock),
    /// `None` when it is absent.
    pub async fn written(&self, rel: &str) -> io::Result<Option<SystemTime>> {
        self.guard()?;
        match self.store.head(&self.key(rel)).await {
            Ok(meta) => Ok(Some(meta.last_modified.into())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(&format!("cannot look up {rel}"), e)),
        }
    }

    /// The engine's clock now: what a write made now is stamped with.
    /// Replicas compare times only by this clock, never by their own.
    pub async fn now(&self) -> io::Result<SystemTime> {
        const CLOCK: &str = "_pullgate/clock";
        self.write_doc(CLOCK, Vec::new()).await?;
        self.written(CLOCK)
            .await?
            .ok_or_else(|| io::Error::other(format!("{}: {CLOCK} vanished", self.describe)))
    }
}

/// What an engine's error says, in a line: the S3 error code it sent and
/// what that means for the operator, else the client's own message.
fn plain(message: &str) -> String {
    let code = message
        .split("<Code>")
        .nth(1)
        .and_then(|rest| rest.split("</Code>").next());
    let meaning = match code {
        Some("NoSuchBucket") => "the bucket does not exist (create it, or fix storage.s3.bucket)",
        Some("InvalidAccessKeyId") => "the engine does not know the access key",
        Some("SignatureDoesNotMatch") => "the engine refused the secret key",
        Some("AccessDenied") => "the credentials may not do this",
        Some(_) => "",
        None if message.contains("error sending request") => {
            "the engine does not answer (storage.s3.endpoint)"
        }
        None => return message.to_owned(),
    };
    // The client's message without the engine's XML body.
    let head = message.split('<').next().unwrap_or(message).trim_end();
    match (code, meaning.is_empty()) {
        (Some(c), false) => format!("{meaning} ({c}; {head})"),
        (Some(c), true) => format!("{c} ({head})"),
        (None, _) => format!("{meaning} ({head})"),
    }
}

/// Parts of a streaming upload sent and not yet acknowledged: past this
/// the engine is slower than the fetch, and the upload is given up (the
/// blob goes up after its commit instead), so the fetch never waits on it.
const PARTS_BEHIND: usize = 2;

/// A multipart upload fed while its blob is fetched, so that it is in the
/// bucket moments after the fetch ends. Completed only by
/// [`StreamingUpload::complete`], which the writer calls after the blob's
/// digest matched; anything else aborts it.
pub struct StreamingUpload {
    upload: Box<dyn object_store::MultipartUpload>,
    buf: bytes::BytesMut,
    parts: tokio::task::JoinSet<object_store::Result<()>>,
    describe: String,
}

impl Bucket {
    /// Starts a multipart upload of `d`.
    pub async fn start_upload(&self, d: &Digest) -> io::Result<StreamingUpload> {
        self.guard()?;
        let upload = self
            .store
            .put_multipart(&self.key(&Self::blob_rel(d)))
            .await
            .map_err(|e| self.error(&format!("cannot start the upload of blob {d}"), e))?;
        Ok(StreamingUpload {
            upload,
            buf: bytes::BytesMut::new(),
            parts: tokio::task::JoinSet::new(),
            describe: self.describe.clone(),
        })
    }
}

impl StreamingUpload {
    /// Adds the next bytes of the blob; `false` when the upload fell
    /// behind or a part failed (abort it then).
    pub fn push(&mut self, chunk: &[u8]) -> bool {
        self.buf.extend_from_slice(chunk);
        while self.buf.len() >= PART_SIZE {
            while let Some(done) = self.parts.try_join_next() {
                if !matches!(done, Ok(Ok(()))) {
                    return false;
                }
            }
            if self.parts.len() >= PARTS_BEHIND {
                return false;
            }
            let part = self.buf.split_to(PART_SIZE).freeze();
            self.parts.spawn(self.upload.put_part(part.into()));
        }
        true
    }

    /// Sends the rest and completes the upload: the object appears.
    pub async fn complete(mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let part = std::mem::take(&mut self.buf).freeze();
            self.parts.spawn(self.upload.put_part(part.into()));
        }
        while let Some(done) = self.parts.join_next().await {
            let failed = match done {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(why) = failed {
                let describe = self.describe.clone();
                self.abort().await;
                return Err(io::Error::other(format!(
                    "{describe}: a part failed: {why}"
                )));
            }
        }
        self.upload.complete().await.map(|_| ()).map_err(|e| {
            io::Error::other(format!("{}: cannot complete an upload: {e}", self.describe))
        })
    }

    /// Gives up: nothing becomes visible.
    pub async fn abort(mut self) {
        self.parts.abort_all();
        let _ = self.upload.abort().await;
    }
}

/// Reads `len` bytes at `at` of a local file, on the blocking pool.
async fn read_at(file: Arc<File>, at: u64, len: usize) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, at)?;
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(io::Error::other)?
}

fn check_digest(d: &Digest, bytes: &[u8]) -> io::Result<()> {
    let got = Digest::of(bytes);
    if got == *d {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the local copy of blob {d} hashes to {got}; not uploaded"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use object_store::memory::InMemory;
    use object_store::{
        GetResult, ListResult, MultipartUpload, ObjectMeta, PutMultipartOptions, PutResult,
    };

    /// An engine that takes `If-None-Match` and `If-Match` and ignores them.
    #[derive(Debug, Default)]
    struct Unconditional(InMemory);

    impl std::fmt::Display for Unconditional {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Unconditional")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Unconditional {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            _: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.0.put(location, payload).await
        }
        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.0.put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &Path,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            self.0.get_opts(location, options).await
        }
        async fn delete(&self, location: &Path) -> object_store::Result<()> {
            self.0.delete(location).await
        }
        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.0.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<ListResult> {
            self.0.list_with_delimiter(prefix).await
        }
        async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
            self.0.copy(from, to).await
        }
        async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
            self.0.copy_if_not_exists(from, to).await
        }
    }

    #[tokio::test]
    async fn an_engine_that_ignores_conditional_writes_is_refused_at_start_up() {
        let honest = Bucket::new(Arc::new(InMemory::new()), "site", "memory://a".into());
        honest.check_conditional_writes().await.unwrap();
        assert!(
            honest.list("_pullgate").await.unwrap().is_empty(),
            "cleaned up"
        );
        let lax = Bucket::new(Arc::new(Unconditional::default()), "", "memory://b".into());
        let e = lax.check_conditional_writes().await.unwrap_err();
        let said = e.to_string();
        assert!(
            said.contains("memory://b ignores conditional writes"),
            "{said}"
        );
        assert!(said.contains("If-None-Match"), "{said}");
    }

    #[tokio::test]
    async fn an_engine_that_does_not_answer_is_skipped_for_a_while_then_asked_again() {
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = S3Config {
            endpoint: format!("http://127.0.0.1:{port}").parse().unwrap(),
            bucket: "pullgate".into(),
            region: "us-east-1".into(),
            prefix: String::new(),
            access_key: "a".into(),
            secret_key: "s".into(),
            ca_pem: None,
            max_size: None,
            min_idle: S3Config::MIN_IDLE,
        };
        let b = Bucket::s3(&config).unwrap();
        let first = b.read_doc("tags/x").await.err().expect("no engine");
        assert_ne!(first.kind(), SKIPPED, "{first}");
        assert!(first.to_string().contains("does not answer"), "{first}");
        let then = b.read_doc("tags/x").await.err().expect("skipped");
        assert_eq!(then.kind(), SKIPPED, "{then}");
        // The readiness check always asks.
        let probe = b.check().await.unwrap_err();
        assert_ne!(probe.kind(), SKIPPED, "{probe}");
    }
}

//! The content layer: the store first, then a [`Remote`].
//!
//! Everything pullgate reads of registry content goes through here, for
//! clients and for its own checks alike (signatures, bases, `verify`):
//!
//! - manifests by digest: the store, else one shared fetch per digest,
//!   checked against its digest and parsed before it is stored;
//! - tags: fresh within `tag_ttl` from the store, else one shared resolve
//!   (HEAD when a digest is known, GET otherwise), served stale when the
//!   remote fails ([`STALE_RETRY`]);
//! - blobs: the store, else one shared fetch that every reader follows
//!   ([`fetch`]);
//! - small reads for checks (signature manifests, payloads, configs) and
//!   the pass-through lists (tags, referrers).
//!
//! Errors are typed ([`ContentError`]); the pipeline turns them into
//! responses. Depends on `store`, `remote`, `oci`, `metrics`.

pub mod fetch;
pub mod flight;

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};

use crate::metrics::Metrics;
use crate::oci::manifest::{ManifestError, DEFAULT_ACCEPT};
use crate::oci::names::{Digest, Reference, RepoName, Tag};
use crate::oci::Manifest;
use crate::remote::{BodyError, Endpoint, Remote, RemoteError, Request, Response};
use crate::store::{BlobHandle, ReadGuard, Source, Store, TagKey, TagRecord};

use fetch::{BlobFetches, Progress};
use flight::SingleFlight;

/// After a remote failure, a stale tag is retried upstream after this.
pub const STALE_RETRY: Duration = Duration::from_secs(10);

/// Largest tags/list or referrers answer passed through.
pub const MAX_PASSTHROUGH_BODY: u64 = 16 * 1024 * 1024;

/// What went wrong reading a body, for [`ContentError::Body`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyProblem {
    TooLarge { len: Option<u64>, max: u64 },
    Stalled,
    Broken { after: Option<u64>, message: String },
    Short { got: u64, announced: u64 },
    Long { announced: u64 },
}

impl std::fmt::Display for BodyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyProblem::TooLarge { len: Some(l), max } => {
                write!(f, "of {l} bytes, over the {max}-byte limit")
            }
            BodyProblem::TooLarge { len: None, max } => write!(f, "over the {max}-byte limit"),
            BodyProblem::Stalled => f.write_str("stalled"),
            BodyProblem::Broken { after, message } => match after {
                Some(n) => write!(f, "broke off after {n} bytes: {message}"),
                None => write!(f, "broke off: {message}"),
            },
            BodyProblem::Short { got, announced } => {
                write!(f, "ended after {got} of the {announced} bytes announced")
            }
            BodyProblem::Long { announced } => {
                write!(f, "went on past its Content-Length ({announced})")
            }
        }
    }
}

/// Why content could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ContentError {
    /// The remote gave no answer.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The remote answered with a status that is neither success nor "not
    /// found" (429, 401/403, 5xx...).
    #[error("{}", status_words(upstream, *status))]
    Status {
        upstream: Arc<str>,
        status: StatusCode,
        retry_after: Option<HeaderValue>,
    },
    #[error("manifest {reference} is not in {upstream}/{repo}")]
    ManifestUnknown {
        upstream: Arc<str>,
        repo: RepoName,
        reference: String,
    },
    /// Asked of an offline upstream, which has only what was imported.
    #[error("manifest {reference} of {upstream}/{repo} was never imported (upstream {upstream} is offline: it serves only what `pullgate import` brought in)")]
    NeverImported {
        upstream: Arc<str>,
        repo: RepoName,
        reference: String,
    },
    #[error("tag {tag} is no longer in {upstream}/{repo}")]
    TagGone {
        upstream: Arc<str>,
        repo: RepoName,
        tag: Tag,
    },
    /// `fetched`: the remote said so during a fetch (else on a HEAD).
    #[error("blob {digest} is not in {upstream}/{repo}")]
    BlobUnknown {
        upstream: Arc<str>,
        repo: RepoName,
        digest: Digest,
        fetched: bool,
    },
    #[error("repository {repo} is not known to upstream {upstream}")]
    NameUnknown { upstream: Arc<str>, repo: RepoName },
    #[error("upstream {upstream} has no referrers API answer for {digest}")]
    NoReferrers { upstream: Arc<str>, digest: Digest },
    /// A body that did not arrive whole, or was too large.
    #[error("upstream {upstream} sent a {what} that {problem}")]
    Body {
        upstream: Arc<str>,
        what: String,
        problem: BodyProblem,
    },
    /// Bytes that do not hash to the digest they were asked for (or said
    /// to be); discarded.
    #[error("upstream {upstream} sent bytes for {what} that hash to {got}; discarded")]
    Mismatch {
        upstream: Arc<str>,
        what: String,
        got: Digest,
    },
    #[error("upstream {upstream} sent an unusable manifest for {repo}:{reference}: {why}")]
    Unusable {
        upstream: Arc<str>,
        repo: RepoName,
        reference: String,
        why: ManifestError,
    },
    /// pullgate's own failure (the store, a task); the text is for logs.
    #[error("{0}")]
    Internal(String),
    /// The store's disk (or quota) is full: `what` could not be cached.
    #[error(
        "pullgate's store is full, so {0} cannot be cached now; what is cached is still served"
    )]
    StoreFull(String),
    /// The remote failed and the store has nothing to serve instead.
    #[error("{cause}; {what} is not cached here, so there is nothing to serve until the upstream answers")]
    NotCached {
        what: String,
        cause: Box<ContentError>,
    },
}

fn status_words(upstream: &str, status: StatusCode) -> String {
    match status {
        StatusCode::TOO_MANY_REQUESTS => {
            format!("upstream {upstream} is rate limiting pullgate (429)")
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => format!(
            "upstream {upstream} refused access ({status}): the repository does not exist or needs credentials"
        ),
        s => format!("upstream {upstream} answered {s}"),
    }
}

impl ContentError {
    /// Worth serving a stale tag for: any failure but the remote saying
    /// the content is not there or not ours (404, 401/403). That is every
    /// failure clients see as a 5xx or 429: no answer, a 5xx or odd
    /// status, a broken or unusable body, a wrong digest, a store that
    /// cannot take the new manifest.
    pub fn is_transient(&self) -> bool {
        match self {
            ContentError::Status { status, .. } => {
                *status != StatusCode::UNAUTHORIZED && *status != StatusCode::FORBIDDEN
            }
            ContentError::ManifestUnknown { .. }
            | ContentError::NeverImported { .. }
            | ContentError::TagGone { .. }
            | ContentError::BlobUnknown { .. }
            | ContentError::NameUnknown { .. }
            | ContentError::NoReferrers { .. } => false,
            ContentError::Remote(_)
            | ContentError::Body { .. }
            | ContentError::Mismatch { .. }
            | ContentError::Unusable { .. }
            | ContentError::Internal(_)
            | ContentError::StoreFull(_) => true,
            ContentError::NotCached { cause, .. } => cause.is_transient(),
        }
    }

    /// Says that nothing stored could stand in, for a failure of the
    /// remote (not for "it does not exist there").
    pub fn not_cached(self, what: impl FnOnce() -> String) -> ContentError {
        match self {
            ContentError::Remote(_) | ContentError::Status { .. } | ContentError::Body { .. }
                if self.is_transient() =>
            {
                ContentError::NotCached {
                    what: what(),
                    cause: Box::new(self),
                }
            }
            e => e,
        }
    }
}

fn is_transient(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// A remote status that is neither success nor "not found".
pub fn status_error(upstream: &Arc<str>, status: StatusCode, headers: &HeaderMap) -> ContentError {
    ContentError::Status {
        upstream: upstream.clone(),
        status,
        retry_after: (status == StatusCode::TOO_MANY_REQUESTS)
            .then(|| headers.get(header::RETRY_AFTER).cloned())
            .flatten(),
    }
}

/// Whose lookup this is: a client's hit counts in the cache metrics,
/// pullgate's own (the base check reading a manifest it holds) does not; a
/// miss, which makes an upstream request, counts either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Client,
    Internal,
}

/// The manifest types to ask a remote for: the client's `Accept`, or every
/// type when it names none. Computed only when a remote is asked.
#[derive(Clone, Copy)]
pub enum Accept<'a> {
    Client(&'a HeaderMap),
    Any,
}

impl Accept<'_> {
    /// The client's `Accept` headers joined, or the default list.
    pub fn value(&self) -> HeaderValue {
        let Accept::Client(headers) = self else {
            return HeaderValue::from_static(DEFAULT_ACCEPT);
        };
        let values: Vec<&str> = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        // `*/*` (curl's default) or no manifest type at all: registries
        // answer OCI content only to clients that name it, so ask for
        // every type.
        let names_a_manifest = values.iter().any(|v| {
            v.contains("application/vnd.oci.image.")
                || v.contains("application/vnd.docker.distribution.manifest.")
        });
        if !names_a_manifest {
            return HeaderValue::from_static(DEFAULT_ACCEPT);
        }
        HeaderValue::from_str(&values.join(", "))
            .unwrap_or(HeaderValue::from_static(DEFAULT_ACCEPT))
    }
}

/// What a tag resolved to.
#[derive(Debug)]
pub struct ResolvedTag {
    pub manifest: Arc<Manifest>,
    /// The digest policy last approved for the tag (tag drift).
    pub approved: Option<Digest>,
}

/// A blob as a request gets it.
pub enum BlobAnswer {
    /// In the store.
    Stored(BlobHandle),
    /// Being fetched: follow the progress. `started`: this request started
    /// the fetch.
    Following {
        progress: tokio::sync::watch::Receiver<Progress>,
        guard: ReadGuard,
        started: bool,
    },
}

/// What a small read for a check found.
#[derive(Debug)]
pub enum Small {
    Body(Bytes),
    /// Any status but 200.
    Status(StatusCode),
    /// A 200 whose body was over the limit.
    TooLarge,
}

/// The content layer of one running pullgate.
pub struct Content {
    pub store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    blobs: Arc<BlobFetches>,
    manifests: SingleFlight<(Arc<str>, Digest), Arc<Manifest>>,
    tags: SingleFlight<TagKey, Arc<Manifest>>,
    /// The last tag list per (name, query), served when the remote fails.
    tag_lists: moka::sync::Cache<(String, Option<String>), (Bytes, Option<String>)>,
    /// Blobs already fetched again for looking damaged: a second look is
    /// not taken (a manifest that lies about a size would loop).
    refetched: moka::sync::Cache<Digest, ()>,
    /// `pullgate_cache_requests_total{kind="manifest",result="hit"}`,
    /// resolved once for the cached path.
    manifest_hits: prometheus::IntCounter,
    /// Serve a tag's last digest when the remote fails (off for `pullgate
    /// verify` and `pin`, which must say that they could not ask).
    stale_if_error: std::sync::atomic::AtomicBool,
}

impl Content {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Arc<Content> {
        Arc::new(Content {
            blobs: BlobFetches::new(store.clone(), metrics.clone()),
            manifest_hits: metrics
                .cache_requests
                .with_label_values(&["manifest", "hit"]),
            store,
            metrics,
            manifests: SingleFlight::default(),
            tags: SingleFlight::default(),
            refetched: moka::sync::Cache::new(10_000),
            tag_lists: moka::sync::Cache::builder()
                .max_capacity(64 * 1024 * 1024)
                // Key, body, Link and the entry itself: many tiny answers
                // under long keys must count too.
                .weigher(
                    |k: &(String, Option<String>), v: &(Bytes, Option<String>)| {
                        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
                        let weight = 64 + k.0.len() + text(&k.1) + v.0.len() + text(&v.1);
                        u32::try_from(weight).unwrap_or(u32::MAX)
                    },
                )
                .build(),
            stale_if_error: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Turns stale-if-error for tags and tag lists on or off.
    pub fn set_stale_if_error(&self, on: bool) {
        self.stale_if_error
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn stale_allowed(&self) -> bool {
        self.stale_if_error
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn cache_result(&self, kind: &str, result: &str) {
        self.metrics
            .cache_requests
            .with_label_values(&[kind, result])
            .inc();
    }

    fn hit(&self, lookup: Lookup) {
        if lookup == Lookup::Client {
            self.manifest_hits.inc();
        }
    }

    fn miss(&self) {
        self.cache_result("manifest", "miss");
    }

    /// A stored manifest, from memory when it is there.
    pub async fn stored_manifest(&self, d: &Digest) -> Result<Option<Arc<Manifest>>, ContentError> {
        if let Some(m) = self.store.cached_manifest(d) {
            return Ok(Some(m));
        }
        self.store.manifest(d).await.map_err(|e| {
            ContentError::Internal(format!("cannot read manifest {d} from the store: {e}"))
        })
    }

    // ---- manifests ---------------------------------------------------------

    /// A manifest of `repo` by digest: the store, else one shared fetch.
    pub async fn manifest(
        self: &Arc<Self>,
        remote: &Arc<dyn Remote>,
        repo: &RepoName,
        digest: Digest,
        accept: Accept<'_>,
        max: u64,
        lookup: Lookup,
    ) -> Result<Arc<Manifest>, ContentError> {
        if let Some(m) = self.stored_manifest(&digest).await? {
            self.hit(lookup);
            return Ok(m);
        }
        self.miss();
        let this = self.clone();
        let remote = remote.clone();
        let repo = repo.clone();
        let accept = accept.value();
        let key = (remote.name().clone(), digest);
        // Boxed: a cached pull should not carry (and move) the miss path.
        let upstream = remote.name().clone();
        let flight = self.manifests.run(key, move || async move {
            this.fetch_manifest(&*remote, &repo, &Reference::Digest(digest), accept, max)
                .await
        });
        Box::pin(flight)
            .await
            .0
            .map_err(|e| e.not_cached(|| format!("manifest {digest} (from {upstream})")))
    }

    /// What a tag names now: from the store within `ttl`, else resolved
    /// with the remote (one resolve per tag however many ask).
    pub async fn tag(
        self: &Arc<Self>,
        remote: &Arc<dyn Remote>,
        key: &TagKey,
        accept: Accept<'_>,
        max: u64,
        ttl: Duration,
    ) -> Result<ResolvedTag, ContentError> {
        let rec = match self.store.cached_tag(key) {
            Some(r) => Some(r),
            None => self.store.tag(key).await.map_err(|e| {
                ContentError::Internal(format!("cannot read tag {} from the store: {e}", key.tag))
            })?,
        };
        if let Some(rec) = rec {
            let age = SystemTime::now()
                .duration_since(rec.checked)
                .unwrap_or(Duration::MAX);
            if age < ttl {
                if let Some(m) = self.stored_manifest(&rec.digest).await? {
                    self.manifest_hits.inc();
                    return Ok(ResolvedTag {
                        manifest: m,
                        approved: rec.approved,
                    });
                }
            }
        }
        self.cache_result("manifest", "miss");
        // Boxed: a cached pull should not carry (and move) the miss path.
        let manifest = Box::pin(self.resolve_tag(remote, key, accept, max, ttl))
            .await
            .map_err(|e| e.not_cached(|| format!("{}/{}:{}", key.upstream, key.repo, key.tag)))?;
        let approved = self.approved_digest(key).await;
        Ok(ResolvedTag { manifest, approved })
    }

    /// Resolves a tag with the remote now, one resolve per tag however many
    /// ask (stale-if-error as for pulls).
    pub async fn resolve_tag(
        self: &Arc<Self>,
        remote: &Arc<dyn Remote>,
        key: &TagKey,
        accept: Accept<'_>,
        max: u64,
        ttl: Duration,
    ) -> Result<Arc<Manifest>, ContentError> {
        let this = self.clone();
        let remote = remote.clone();
        let accept = accept.value();
        let flight_key = key.clone();
        let flight = self.tags.run(key.clone(), move || async move {
            this.refresh_tag(&*remote, flight_key, accept, max, ttl)
                .await
        });
        flight.await.0
    }

    /// Resolves a tag with the remote: HEAD when a digest is known (cheap,
    /// and it does not count against Docker Hub's pull limit), GET
    /// otherwise. When the remote fails, the last known digest is served.
    async fn refresh_tag(
        &self,
        remote: &dyn Remote,
        key: TagKey,
        accept: HeaderValue,
        max: u64,
        ttl: Duration,
    ) -> Result<Arc<Manifest>, ContentError> {
        let known = self.store.tag(&key).await.map_err(|e| {
            ContentError::Internal(format!("cannot read tag {} from the store: {e}", key.tag))
        })?;
        let upstream = remote.name();
        let reference = Reference::Tag(key.tag.clone());
        if let Some(rec) = known {
            let req =
                Request::head(&key.repo, Endpoint::Manifest(&reference)).accept(accept.clone());
            match remote.send(req).await {
                Ok(resp) if resp.status == StatusCode::OK => {
                    if header_digest(&resp.headers) == Some(rec.digest) {
                        if let Some(m) = self.stored_manifest(&rec.digest).await? {
                            // An offline upstream's records are the
                            // import's: their time is the bundle's.
                            if !remote.offline() {
                                self.save_tag(&key, rec.digest).await?;
                            }
                            return Ok(m);
                        }
                    }
                    // Moved, or the remote did not say: fetch it.
                }
                Ok(resp) if resp.status == StatusCode::NOT_FOUND => {
                    if let Err(e) = self.store.update_tag(&key, Box::new(|_| None)).await {
                        tracing::warn!(tag = %key.tag, "cannot forget a tag record: {e}");
                    }
                    return Err(ContentError::TagGone {
                        upstream: upstream.clone(),
                        repo: key.repo.clone(),
                        tag: key.tag.clone(),
                    });
                }
                Ok(resp) if is_transient(resp.status) => {
                    let err = status_error(upstream, resp.status, &resp.headers);
                    return self.serve_stale(upstream, &key, rec, err, ttl).await;
                }
                Ok(resp) => return Err(status_error(upstream, resp.status, &resp.headers)),
                Err(e) => return self.serve_stale(upstream, &key, rec, e.into(), ttl).await,
            }
        }
        match self
            .fetch_manifest(remote, &key.repo, &reference, accept, max)
            .await
        {
            Ok(m) => {
                self.save_tag(&key, m.digest).await?;
                Ok(m)
            }
            Err(e) => match known {
                Some(rec) if e.is_transient() => {
                    self.serve_stale(upstream, &key, rec, e, ttl).await
                }
                _ => Err(e),
            },
        }
    }

    async fn serve_stale(
        &self,
        upstream: &Arc<str>,
        key: &TagKey,
        rec: TagRecord,
        err: ContentError,
        ttl: Duration,
    ) -> Result<Arc<Manifest>, ContentError> {
        if !self.stale_allowed() {
            return Err(err);
        }
        let Some(m) = self.stored_manifest(&rec.digest).await? else {
            return Err(err);
        };
        self.metrics
            .stale_serves
            .with_label_values(&[upstream])
            .inc();
        self.cache_result("manifest", "stale");
        tracing::warn!(
            %upstream,
            repo = %key.repo,
            tag = %key.tag,
            digest = %rec.digest,
            "serving last known digest: {err}"
        );
        // Try the remote again soon, not on every request.
        let checked = SystemTime::now()
            .checked_sub(ttl.saturating_sub(STALE_RETRY))
            .unwrap_or(rec.checked);
        self.store.defer_tag(key, rec, checked);
        Ok(m)
    }

    async fn save_tag(&self, key: &TagKey, digest: Digest) -> Result<(), ContentError> {
        // What policy approved last stays, whatever the tag says now.
        let update = Box::new(move |old: Option<TagRecord>| {
            Some(TagRecord {
                digest,
                checked: SystemTime::now(),
                approved: old.and_then(|r| r.approved),
            })
        });
        self.store
            .update_tag(key, update)
            .await
            .map_err(|e| store_write_error(&self.metrics, e, format!("tag {}", key.tag)))
    }

    /// Remembers the digest a tag was last approved at (tag drift).
    pub async fn note_approved(&self, key: &TagKey, digest: Digest) {
        let update = Box::new(move |old: Option<TagRecord>| {
            let rec = old.unwrap_or(TagRecord {
                digest,
                checked: SystemTime::now(),
                approved: None,
            });
            Some(TagRecord {
                approved: Some(digest),
                ..rec
            })
        });
        if let Err(e) = self.store.update_tag(key, update).await {
            tracing::warn!(%digest, "cannot record the approved digest of a tag: {e}");
        }
    }

    /// The digest policy last approved for a tag, as the store has it.
    pub async fn approved_digest(&self, key: &TagKey) -> Option<Digest> {
        match self.store.cached_tag(key) {
            Some(r) => r.approved,
            None => self.store.tag(key).await.ok().flatten()?.approved,
        }
    }

    /// GETs a manifest from the remote, checks it and stores it.
    async fn fetch_manifest(
        &self,
        remote: &dyn Remote,
        repo: &RepoName,
        reference: &Reference,
        accept: HeaderValue,
        max: u64,
    ) -> Result<Arc<Manifest>, ContentError> {
        let upstream = remote.name();
        let resp = remote
            .send(Request::get(repo, Endpoint::Manifest(reference)).accept(accept))
            .await?;
        match resp.status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND if remote.offline() => {
                return Err(ContentError::NeverImported {
                    upstream: upstream.clone(),
                    repo: repo.clone(),
                    reference: reference.to_string(),
                })
            }
            StatusCode::NOT_FOUND => {
                return Err(ContentError::ManifestUnknown {
                    upstream: upstream.clone(),
                    repo: repo.clone(),
                    reference: reference.to_string(),
                })
            }
            s => return Err(status_error(upstream, s, &resp.headers)),
        }
        let content_type = resp
            .header(header::CONTENT_TYPE.as_str())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_owned());
        let claimed = header_digest(&resp.headers);
        let bytes = read_capped(upstream, resp, max, "manifest").await?;
        let digest = Digest::of(&bytes);
        let mismatch = match reference {
            Reference::Digest(want) if *want != digest => Some(format!("manifest {want}")),
            _ => claimed
                .filter(|c| *c != digest)
                .map(|c| format!("manifest {reference} (said to be {c})")),
        };
        if let Some(what) = mismatch {
            self.metrics
                .digest_mismatches
                .with_label_values(&[upstream])
                .inc();
            return Err(ContentError::Mismatch {
                upstream: upstream.clone(),
                what,
                got: digest,
            });
        }
        let m = Manifest::parse(digest, content_type.as_deref(), bytes).map_err(|why| {
            ContentError::Unusable {
                upstream: upstream.clone(),
                repo: repo.clone(),
                reference: reference.to_string(),
                why,
            }
        })?;
        let m = Arc::new(m);
        self.store
            .put_manifest(m.clone())
            .await
            .map_err(|e| store_write_error(&self.metrics, e, format!("manifest {digest}")))?;
        tracing::info!(%upstream, %repo, %reference, %digest, "manifest fetched and stored");
        Ok(m)
    }

    // ---- blobs -------------------------------------------------------------

    /// A blob: the store, else the shared fetch from the remote (started
    /// when none runs).
    pub async fn blob(
        &self,
        remote: &Arc<dyn Remote>,
        repo: &RepoName,
        digest: Digest,
    ) -> Result<BlobAnswer, ContentError> {
        for _ in 0..2 {
            if let Some(h) = self.open_blob(&digest).await? {
                self.cache_result("blob", "hit");
                return Ok(BlobAnswer::Stored(h));
            }
            if let Some((progress, started)) = self.blobs.join(remote.clone(), repo.clone(), digest)
            {
                // `miss`: this request made the upstream fetch; `joined`: it
                // follows a fetch another request started.
                self.cache_result("blob", if started { "miss" } else { "joined" });
                return Ok(BlobAnswer::Following {
                    progress,
                    guard: self.store.pin(&digest),
                    started,
                });
            }
            // Committed between our look and the join: read the store again.
        }
        Err(ContentError::Internal(format!(
            "blob {digest} vanished from the store"
        )))
    }

    /// A stored blob, or `None`.
    pub async fn open_blob(&self, digest: &Digest) -> Result<Option<BlobHandle>, ContentError> {
        self.store.open(digest).await.map_err(|e| {
            ContentError::Internal(format!("cannot read blob {digest} from the store: {e}"))
        })
    }

    /// Takes a stored blob whose size is not the `expected` one out of the
    /// store, so that the next lookup fetches it again; once per blob, so
    /// a manifest that lies about a size cannot make it loop. True when it
    /// was taken out.
    pub async fn discard_if_damaged(
        &self,
        digest: &Digest,
        stored: u64,
        expected: u64,
    ) -> Result<bool, ContentError> {
        if stored == expected || self.refetched.contains_key(digest) {
            return Ok(false);
        }
        self.refetched.insert(*digest, ());
        tracing::warn!(
            %digest,
            stored,
            expected,
            "a stored blob's size is not the one its manifest gives: moving it aside and fetching it again"
        );
        self.metrics.evictions.with_label_values(&["damaged"]).inc();
        self.store.discard(digest).await.map_err(|e| {
            ContentError::Internal(format!("cannot move damaged blob {digest} aside: {e}"))
        })?;
        Ok(true)
    }

    /// Counts a blob HEAD that the store answered.
    pub fn blob_hit(&self) {
        self.cache_result("blob", "hit");
    }

    /// Counts a blob HEAD that the store could not answer.
    pub fn blob_head_miss(&self) {
        self.cache_result("blob", "miss");
    }

    /// The size of a blob the remote has (HEAD), for a HEAD the store
    /// could not answer.
    pub async fn remote_blob_size(
        &self,
        remote: &Arc<dyn Remote>,
        repo: &RepoName,
        digest: Digest,
    ) -> Result<Option<u64>, ContentError> {
        // A blob another replica put in the shared bucket.
        if let Ok(Some(size)) = self.store.shared_size(&digest).await {
            return Ok(Some(size));
        }
        let upstream = remote.name();
        let resp = remote
            .send(Request::head(repo, Endpoint::Blob(&digest)))
            .await?;
        match resp.status {
            StatusCode::OK => Ok(resp.content_length),
            StatusCode::NOT_FOUND => Err(ContentError::BlobUnknown {
                upstream: upstream.clone(),
                repo: repo.clone(),
                digest,
                fetched: false,
            }),
            s => Err(status_error(upstream, s, &resp.headers)),
        }
    }

    // ---- small reads for checks -----------------------------------------------

    /// GETs a small document from the remote (signature manifests,
    /// referrers lists), reading at most `max` bytes of a 200. `Err` only
    /// when the remote could not be asked.
    pub async fn small(
        &self,
        remote: &dyn Remote,
        repo: &RepoName,
        endpoint: Endpoint<'_>,
        accept: Option<&'static str>,
        query: Option<String>,
        max: u64,
    ) -> Result<Small, ContentError> {
        let mut req = Request::get(repo, endpoint).query(query);
        if let Some(a) = accept {
            req = req.accept(HeaderValue::from_static(a));
        }
        let resp = remote.send(req).await?;
        if resp.status != StatusCode::OK {
            return Ok(Small::Status(resp.status));
        }
        let upstream = remote.name().clone();
        match resp.bytes(max).await {
            Ok(b) => Ok(Small::Body(b)),
            Err(BodyError::TooLarge) => Ok(Small::TooLarge),
            Err(e) => Err(body_error(&upstream, &endpoint.to_string(), e, max)),
        }
    }

    /// A small blob (a signature payload, an image config): the store when
    /// it holds it, else the remote (not stored: a client fetching it stores
    /// it the usual way). Bytes from the remote are not checked here.
    pub async fn small_blob(
        &self,
        remote: &dyn Remote,
        repo: &RepoName,
        digest: Digest,
        max: u64,
    ) -> Result<Small, ContentError> {
        if let Some(h) = self.open_blob(&digest).await? {
            if h.size <= max {
                match read_whole(&h).await {
                    Ok(b) => return Ok(Small::Body(b)),
                    Err(e) => tracing::warn!(%digest, "cannot read a stored blob: {e}"),
                }
            }
        }
        self.small(remote, repo, Endpoint::Blob(&digest), None, None, max)
            .await
    }

    // ---- pass-through lists -----------------------------------------------------

    /// A tag list from the remote, its `Link` as the remote sent it; the
    /// last good answer when the remote fails.
    pub async fn tag_list(
        &self,
        remote: &dyn Remote,
        repo: &RepoName,
        canonical: &str,
        query: Option<String>,
    ) -> Result<(Bytes, Option<String>), ContentError> {
        let key = (canonical.to_owned(), query.clone());
        match self.fetch_tag_list(remote, repo, query).await {
            Ok(list) => {
                self.tag_lists.insert(key, list.clone());
                Ok(list)
            }
            // Stale-if-error, as for tags: the last answer, when there is one.
            Err(e) if e.is_transient() && self.stale_allowed() => {
                let Some(list) = self.tag_lists.get(&key) else {
                    return Err(e);
                };
                tracing::warn!(upstream = %remote.name(), %repo, "serving the last tag list: {e}");
                self.metrics
                    .stale_serves
                    .with_label_values(&[remote.name()])
                    .inc();
                self.cache_result("tags", "stale");
                Ok(list)
            }
            Err(e) => Err(e),
        }
    }

    async fn fetch_tag_list(
        &self,
        remote: &dyn Remote,
        repo: &RepoName,
        query: Option<String>,
    ) -> Result<(Bytes, Option<String>), ContentError> {
        let upstream = remote.name();
        let resp = remote
            .send(Request::get(repo, Endpoint::TagsList).query(query))
            .await?;
        match resp.status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return Err(ContentError::NameUnknown {
                    upstream: upstream.clone(),
                    repo: repo.clone(),
                })
            }
            s => return Err(status_error(upstream, s, &resp.headers)),
        }
        let link = resp.header(header::LINK.as_str()).map(str::to_owned);
        let bytes = read_capped(upstream, resp, MAX_PASSTHROUGH_BODY, "tag list").await?;
        Ok((bytes, link))
    }

    /// A referrers list from the remote, with its `OCI-Filters-Applied`.
    pub async fn referrers(
        &self,
        remote: &dyn Remote,
        repo: &RepoName,
        digest: Digest,
        query: Option<String>,
    ) -> Result<(Bytes, Option<HeaderValue>), ContentError> {
        let upstream = remote.name();
        let resp = remote
            .send(Request::get(repo, Endpoint::Referrers(&digest)).query(query))
            .await?;
        match resp.status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return Err(ContentError::NoReferrers {
                    upstream: upstream.clone(),
                    digest,
                })
            }
            s => return Err(status_error(upstream, s, &resp.headers)),
        }
        let filters = resp.headers.get("OCI-Filters-Applied").cloned();
        let bytes = read_capped(upstream, resp, MAX_PASSTHROUGH_BODY, "referrers list").await?;
        Ok((bytes, filters))
    }
}

/// A stored blob's bytes, whole.
pub async fn read_whole(h: &BlobHandle) -> std::io::Result<Bytes> {
    match &h.source {
        Source::Memory(c) => {
            let mut out = Vec::with_capacity(usize::try_from(h.size).unwrap_or(0));
            let mut at = 0;
            while at < h.size {
                let b = c.slice(at, usize::MAX);
                if b.is_empty() {
                    break;
                }
                at += b.len() as u64;
                out.extend_from_slice(&b);
            }
            Ok(Bytes::from(out))
        }
        Source::File(f) => {
            let f = f.clone();
            let size = usize::try_from(h.size).map_err(std::io::Error::other)?;
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0; size];
                std::os::unix::fs::FileExt::read_exact_at(&*f, &mut buf, 0)?;
                Ok(Bytes::from(buf))
            })
            .await
            .map_err(std::io::Error::other)?
        }
    }
}

fn header_digest(headers: &HeaderMap) -> Option<Digest> {
    headers
        .get("Docker-Content-Digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
}

fn body_error(upstream: &Arc<str>, what: &str, e: BodyError, max: u64) -> ContentError {
    ContentError::Body {
        upstream: upstream.clone(),
        what: what.to_owned(),
        problem: match e {
            BodyError::TooLarge => BodyProblem::TooLarge { len: None, max },
            BodyError::Stalled => BodyProblem::Stalled,
            BodyError::Broken(m) => BodyProblem::Broken {
                after: None,
                message: m,
            },
        },
    }
}

/// Reads a remote body into memory, refusing more than `max` bytes and a
/// body shorter than announced.
async fn read_capped(
    upstream: &Arc<str>,
    resp: Response,
    max: u64,
    what: &str,
) -> Result<Bytes, ContentError> {
    let announced = resp.content_length;
    let too_large = |len| ContentError::Body {
        upstream: upstream.clone(),
        what: what.to_owned(),
        problem: BodyProblem::TooLarge { len, max },
    };
    if let Some(len) = announced.filter(|l| *l > max) {
        return Err(too_large(Some(len)));
    }
    let buf = resp
        .bytes(max)
        .await
        .map_err(|e| body_error(upstream, what, e, max))?;
    if let Some(len) = announced.filter(|l| buf.len() as u64 != *l) {
        return Err(ContentError::Body {
            upstream: upstream.clone(),
            what: what.to_owned(),
            problem: BodyProblem::Short {
                got: buf.len() as u64,
                announced: len,
            },
        });
    }
    Ok(buf)
}

/// Whether a write failed for want of space (the disk, or a quota).
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// A failed store write, counted by kind; a full disk is said plainly in
/// the log, with what to do, and is no internal error for the client.
pub fn store_write_error(metrics: &Metrics, e: io::Error, what: String) -> ContentError {
    if is_no_space(&e) {
        metrics
            .store_write_errors
            .with_label_values(&["no-space"])
            .inc();
        tracing::error!(
            "the store's disk is full: cannot write {what} ({e}); free space on the volume or lower storage.max_size below its size; caching resumes by itself once there is room"
        );
        ContentError::StoreFull(what)
    } else {
        metrics
            .store_write_errors
            .with_label_values(&["other"])
            .inc();
        ContentError::Internal(format!("cannot write {what} to the store: {e}"))
    }
}

#[cfg(test)]
mod tests;

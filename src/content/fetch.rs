//! One upstream fetch of a blob, many readers.
//!
//! The first request for an uncached blob starts a fetch as a task of its
//! own, so no client's disconnect cancels it. The task streams the remote's
//! body into a store writer (which hashes as it goes) and publishes the
//! length written after every write on a `watch` channel. Every client, the
//! first one too, reads what was written from its own offset up to the
//! published length and waits for more. Only when the writer's `finish`
//! found the digest matching does a reader end cleanly; on a mismatch or an
//! upstream error every reader's body ends with an error, so clients see a
//! broken transfer, never a short clean one. Until then the last byte is
//! held back, so a client counting `Content-Length` cannot take bad bytes
//! for a complete transfer.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use http::StatusCode;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::watch;

use super::{status_error, store_write_error, BodyProblem, ContentError};
use crate::body::Body;
use crate::metrics::Metrics;
use crate::oci::names::{Digest, RepoName};
use crate::remote::{BodyError, Endpoint, Remote, Request};
use crate::store::{ReadGuard, Source, Store, WriteError};

/// Largest body frame read from a file: big frames mean fewer syscalls and
/// thread hand-offs per GiB.
pub const READ_CHUNK_MAX: usize = 1024 * 1024;

/// Smallest body frame, whatever the number of readers.
const READ_CHUNK_MIN: usize = 64 * 1024;

/// Frame bytes that all blob readers together aim to hold at once: with
/// many concurrent readers each reads smaller frames, bounding memory.
const READ_BUDGET: usize = 8 * 1024 * 1024;

/// Frame buffers each reader keeps for reuse. The HTTP layer holds about one
/// frame while it writes, so a few buffers let a reader recycle instead of
/// allocating (and page-faulting) a fresh one per frame.
const POOL_BUFFERS: usize = 3;

/// Blob readers alive now, for frame sizing.
static ACTIVE_READERS: AtomicUsize = AtomicUsize::new(0);

/// The frame size for the next read, given how many readers share the budget.
fn chunk_size() -> usize {
    let readers = ACTIVE_READERS.load(Ordering::Relaxed).max(1);
    (READ_BUDGET / readers).clamp(READ_CHUNK_MIN, READ_CHUNK_MAX) / READ_CHUNK_MIN * READ_CHUNK_MIN
}

/// Remote bytes gathered before one write to the store.
const WRITE_BATCH: usize = 1024 * 1024;

/// How far a blob fetch has got.
#[derive(Clone)]
pub struct Progress {
    /// What is written so far (after commit, the blob itself).
    pub source: Option<Source>,
    /// Bytes written and readable so far.
    pub written: u64,
    /// The remote's Content-Length, once its headers arrived.
    pub total: Option<u64>,
    pub state: FlightState,
}

#[derive(Clone)]
pub enum FlightState {
    /// Waiting for the remote's headers.
    Connecting,
    /// Body bytes are arriving.
    Streaming,
    /// Digest matched; the blob is in the store.
    Committed,
    /// Nothing was stored; every reader fails with this.
    Failed(ContentError),
}

/// The blob fetches running now, by digest.
pub struct BlobFetches {
    running: Mutex<HashMap<Digest, watch::Receiver<Progress>>>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl BlobFetches {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Arc<BlobFetches> {
        Arc::new(BlobFetches {
            running: Mutex::new(HashMap::new()),
            store,
            metrics,
        })
    }

    /// Joins the fetch of `digest`, starting it if none runs. Returns its
    /// progress and whether this call started it, or `None` when the blob
    /// is already in the store (a fetch committed since the caller looked).
    pub fn join(
        self: &Arc<Self>,
        remote: Arc<dyn Remote>,
        repo: RepoName,
        digest: Digest,
    ) -> Option<(watch::Receiver<Progress>, bool)> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = running.get(&digest) {
            return Some((rx.clone(), false));
        }
        // A fetch records its blob in the store before leaving this table.
        if self.store.has_blob(&digest) {
            return None;
        }
        let (tx, rx) = watch::channel(Progress {
            source: None,
            written: 0,
            total: None,
            state: FlightState::Connecting,
        });
        running.insert(digest, rx.clone());
        let this = self.clone();
        self.metrics.inflight_fetches.inc();
        tokio::spawn(async move {
            let upstream = remote.name().clone();
            // Leaves the table however the run ends; a panic fails the
            // followers instead of leaving them on a dead fetch.
            let leave = Leave {
                fetches: this.clone(),
                digest,
                tx: Some(tx),
            };
            let tx = leave.tx.as_ref().expect("set above");
            let result = this.run(&*remote, &repo, digest, tx).await;
            let tx = leave.finish();
            match result {
                Ok(size) => {
                    tracing::info!(%upstream, repo = %repo, %digest, size, "blob fetched and committed");
                    tx.send_modify(|p| p.state = FlightState::Committed);
                }
                Err(e) => {
                    tracing::warn!(%upstream, repo = %repo, %digest, error = %e, "blob fetch failed; nothing stored");
                    tx.send_modify(|p| p.state = FlightState::Failed(e));
                }
            }
        });
        Some((rx, true))
    }
}

/// A running fetch's place in the table, given up when the fetch ends.
struct Leave {
    fetches: Arc<BlobFetches>,
    digest: Digest,
    /// Taken by `finish`; still here on drop when the fetch panicked.
    tx: Option<watch::Sender<Progress>>,
}

impl Leave {
    fn leave(&self) {
        self.fetches
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.digest);
        self.fetches.metrics.inflight_fetches.dec();
    }

    /// The fetch returned: out of the table, its sender back to report.
    fn finish(mut self) -> watch::Sender<Progress> {
        self.leave();
        self.tx.take().expect("finish runs once")
    }
}

impl Drop for Leave {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            self.leave();
            tx.send_modify(|p| {
                p.state = FlightState::Failed(ContentError::Internal(format!(
                    "the fetch of blob {} panicked",
                    self.digest
                )))
            });
        }
    }
}

impl BlobFetches {
    async fn run(
        &self,
        remote: &dyn Remote,
        repo: &RepoName,
        digest: Digest,
        tx: &watch::Sender<Progress>,
    ) -> Result<u64, ContentError> {
        if let Some(shared) = self.store.shared_blob(&digest).await.ok().flatten() {
            return self.run_shared(shared, digest, tx).await;
        }
        // Another replica may be fetching it: then its copy, once shared.
        if let Some(shared) = self.store.lease_fetch(&digest).await.ok().flatten() {
            return self.run_shared(shared, digest, tx).await;
        }
        let result = self.run_upstream(remote, repo, digest, tx).await;
        if result.is_err() {
            self.store.release_fetch(&digest);
        }
        result
    }

    /// The blob from the upstream.
    async fn run_upstream(
        &self,
        remote: &dyn Remote,
        repo: &RepoName,
        digest: Digest,
        tx: &watch::Sender<Progress>,
    ) -> Result<u64, ContentError> {
        let upstream = remote.name();
        let not_cached = |e: ContentError| e.not_cached(|| format!("blob {digest}"));
        let resp = remote
            .send(Request::get(repo, Endpoint::Blob(&digest)))
            .await
            .map_err(|e| not_cached(e.into()))?;
        match resp.status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return Err(ContentError::BlobUnknown {
                    upstream: upstream.clone(),
                    repo: repo.clone(),
                    digest,
                    fetched: true,
                })
            }
            s => return Err(not_cached(status_error(upstream, s, &resp.headers))),
        }
        match self
            .commit(upstream, resp.body, resp.content_length, digest, tx)
            .await?
        {
            Ok(size) => Ok(size),
            Err(got) => {
                self.metrics
                    .digest_mismatches
                    .with_label_values(&[upstream])
                    .inc();
                Err(ContentError::Mismatch {
                    upstream: upstream.clone(),
                    what: format!("blob {digest}"),
                    got,
                })
            }
        }
    }

    /// Writes `body` from `from` into the store under `digest`, for the
    /// followers to read as it arrives; the size committed, or (inside)
    /// the digest the bytes had instead.
    async fn commit(
        &self,
        from: &Arc<str>,
        body: crate::remote::BodyStream,
        total: Option<u64>,
        digest: Digest,
        tx: &watch::Sender<Progress>,
    ) -> Result<Result<u64, Digest>, ContentError> {
        let mut writer = self
            .store
            .writer(digest)
            .await
            .map_err(|e| store_write_error(&self.metrics, e, format!("blob {digest}")))?;
        tx.send_modify(|p| {
            p.source = Some(writer.source());
            p.total = total;
            p.state = FlightState::Streaming;
        });
        if let Err(e) = self
            .stream(&mut *writer, from, body, total, digest, tx)
            .await
        {
            writer.abort().await;
            return Err(e);
        }
        match writer.finish().await {
            Ok(size) => Ok(Ok(size)),
            Err(WriteError::Mismatch { got }) => Ok(Err(got)),
            Err(WriteError::Io(e)) => Err(store_write_error(
                &self.metrics,
                e,
                format!("blob {digest}"),
            )),
        }
    }

    /// The blob from the tier other replicas share instead of the upstream:
    /// the same writer, the same checks.
    async fn run_shared(
        &self,
        shared: crate::store::SharedBlob,
        digest: Digest,
        tx: &watch::Sender<Progress>,
    ) -> Result<u64, ContentError> {
        let from = shared.from;
        let body = shared
            .body
            .map(|r| r.map_err(|e| BodyError::Broken(e.to_string())))
            .boxed();
        match self
            .commit(&from, body, Some(shared.size), digest, tx)
            .await?
        {
            Ok(size) => Ok(size),
            Err(got) => {
                // Not served again: the next fetch goes to the upstream.
                tracing::error!(%digest, %got, %from, "a shared copy of a blob does not match its digest; removing it");
                if let Err(e) = self.store.discard_shared(&digest).await {
                    tracing::error!(%digest, "cannot remove the damaged shared copy: {e}");
                }
                Err(ContentError::Mismatch {
                    upstream: from.clone(),
                    what: format!("blob {digest}"),
                    got,
                })
            }
        }
    }

    /// Streams the remote's body into `writer`, checking its length.
    async fn stream(
        &self,
        writer: &mut dyn crate::store::BlobWriter,
        upstream: &Arc<str>,
        mut body: crate::remote::BodyStream,
        total: Option<u64>,
        digest: Digest,
        tx: &watch::Sender<Progress>,
    ) -> Result<(), ContentError> {
        let what = || format!("blob {digest}");
        let body_error = |e: BodyError, written: u64| ContentError::Body {
            upstream: upstream.clone(),
            what: what(),
            problem: match e {
                BodyError::Stalled => BodyProblem::Stalled,
                BodyError::Broken(m) => BodyProblem::Broken {
                    after: Some(written),
                    message: m,
                },
                BodyError::TooLarge => BodyProblem::TooLarge { len: None, max: 0 },
            },
        };
        let mut written: u64 = 0;
        let mut ended = false;
        let mut batches = 0u64;
        while !ended {
            batches += 1;
            let first = match body.next().await {
                None => break,
                Some(Ok(c)) => c,
                Some(Err(e)) => return Err(body_error(e, written)),
            };
            let mut batch = BytesMut::with_capacity(WRITE_BATCH.max(first.len()));
            batch.extend_from_slice(&first);
            // Gather whatever else is already here, up to a batch, then write.
            while batch.len() < WRITE_BATCH {
                match body.next().now_or_never() {
                    Some(Some(Ok(c))) => batch.extend_from_slice(&c),
                    Some(Some(Err(e))) => return Err(body_error(e, written)),
                    Some(None) => {
                        ended = true;
                        break;
                    }
                    None => break,
                }
            }
            let n = batch.len() as u64;
            if let Some(t) = total {
                if written + n > t {
                    return Err(ContentError::Body {
                        upstream: upstream.clone(),
                        what: what(),
                        problem: BodyProblem::Long { announced: t },
                    });
                }
            }
            writer
                .write(batch.freeze())
                .await
                .map_err(|e| store_write_error(&self.metrics, e, format!("blob {digest}")))?;
            written += n;
            tx.send_modify(|p| p.written = written);
        }
        tracing::debug!(%digest, %upstream, written, batches, "blob streamed into the store");
        if let Some(t) = total {
            if written != t {
                return Err(ContentError::Body {
                    upstream: upstream.clone(),
                    what: what(),
                    problem: BodyProblem::Short {
                        got: written,
                        announced: t,
                    },
                });
            }
        }
        Ok(())
    }
}

/// Waits for a fetch's next progress. When the fetch task is gone, only a
/// final state lets a reader go on.
async fn changed(rx: &mut watch::Receiver<Progress>) -> io::Result<()> {
    if rx.changed().await.is_err() {
        let finished = matches!(
            rx.borrow().state,
            FlightState::Committed | FlightState::Failed(_)
        );
        if !finished {
            return Err(io::Error::other("blob fetch ended unexpectedly"));
        }
    }
    Ok(())
}

/// Reads a blob, stored or still being written.
pub struct BlobReader {
    source: Option<Source>,
    pos: u64,
    /// Where to stop (exclusive); `None` reads until the fetch commits.
    end: Option<u64>,
    /// Progress of the fetch, or `None` for a committed blob.
    progress: Option<watch::Receiver<Progress>>,
    /// Keeps the blob from eviction while this reader lives.
    _guard: ReadGuard,
    metrics: Arc<Metrics>,
    source_label: &'static str,
    /// Frame buffers to recycle once the HTTP layer has let go of them.
    pool: Vec<BytesMut>,
}

impl Drop for BlobReader {
    fn drop(&mut self) {
        ACTIVE_READERS.fetch_sub(1, Ordering::Relaxed);
    }
}

impl BlobReader {
    fn new(
        source: Option<Source>,
        pos: u64,
        end: Option<u64>,
        progress: Option<watch::Receiver<Progress>>,
        guard: ReadGuard,
        metrics: Arc<Metrics>,
        source_label: &'static str,
    ) -> BlobReader {
        ACTIVE_READERS.fetch_add(1, Ordering::Relaxed);
        BlobReader {
            source,
            pos,
            end,
            progress,
            _guard: guard,
            metrics,
            source_label,
            pool: Vec::with_capacity(POOL_BUFFERS),
        }
    }

    /// A buffer of `len` bytes, recycled from the pool when one is free.
    fn buffer(&mut self, len: usize) -> BytesMut {
        let reusable = self.pool.iter_mut().position(|b| b.try_reclaim(len));
        let mut buf = match reusable {
            Some(i) => self.pool.swap_remove(i),
            None => BytesMut::with_capacity(len.max(chunk_size())),
        };
        buf.resize(len, 0);
        buf
    }

    /// A reader over a stored, complete blob.
    pub fn stored(
        source: Source,
        start: u64,
        end: u64,
        guard: ReadGuard,
        metrics: Arc<Metrics>,
    ) -> BlobReader {
        BlobReader::new(
            Some(source),
            start,
            Some(end),
            None,
            guard,
            metrics,
            "cache",
        )
    }

    /// A reader that follows a running fetch.
    pub fn following(
        progress: watch::Receiver<Progress>,
        start: u64,
        end: Option<u64>,
        guard: ReadGuard,
        metrics: Arc<Metrics>,
    ) -> BlobReader {
        BlobReader::new(None, start, end, Some(progress), guard, metrics, "upstream")
    }

    /// Up to `len` bytes at the current position.
    async fn read(&mut self, len: usize) -> io::Result<Bytes> {
        match self.source.clone() {
            None => Err(io::Error::other("blob fetch has no data yet")),
            Some(Source::Memory(chunks)) => {
                let b = chunks.slice(self.pos, len);
                if b.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "stored blob is shorter than expected",
                    ));
                }
                Ok(b)
            }
            Some(Source::File(file)) => {
                let pos = self.pos;
                let mut buf = self.buffer(len);
                let (mut buf, r) = tokio::task::spawn_blocking(move || {
                    let r = file.read_exact_at(&mut buf, pos);
                    (buf, r)
                })
                .await
                .map_err(io::Error::other)?;
                r?;
                let frame = buf.split().freeze();
                if self.pool.len() < POOL_BUFFERS {
                    self.pool.push(buf);
                }
                Ok(frame)
            }
        }
    }

    /// The next chunk, `None` at a clean end, an error if the fetch failed.
    async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        if self.end.is_some_and(|e| self.pos >= e) {
            // A follower ends cleanly only once the digest matched.
            return self.finish().await;
        }
        loop {
            let available = match &mut self.progress {
                None => self.end.unwrap_or(self.pos),
                Some(rx) => {
                    let p = rx.borrow_and_update().clone();
                    if self.source.is_none() {
                        self.source = p.source.clone();
                    }
                    match p.state {
                        FlightState::Failed(e) => {
                            return Some(Err(io::Error::other(e.to_string())))
                        }
                        FlightState::Committed if p.written <= self.pos => {
                            return match self.end {
                                Some(end) if self.pos < end => Some(Err(io::Error::new(
                                    io::ErrorKind::UnexpectedEof,
                                    "blob ended before the requested range",
                                ))),
                                _ => None,
                            };
                        }
                        FlightState::Committed => p.written,
                        // Hold back the last byte until the digest matched, so
                        // a client that counts Content-Length never sees a
                        // complete transfer of bad bytes.
                        _ => p
                            .written
                            .min(p.total.map_or(u64::MAX, |t| t.saturating_sub(1))),
                    }
                }
            };
            let limit = self.end.map_or(available, |e| e.min(available));
            if limit > self.pos {
                let len = usize::try_from(limit - self.pos)
                    .unwrap_or(usize::MAX)
                    .min(chunk_size());
                let read = self.read(len).await;
                return Some(read.inspect(|b| {
                    self.pos += b.len() as u64;
                    self.metrics
                        .bytes_served
                        .with_label_values(&[self.source_label])
                        .inc_by(b.len() as u64);
                }));
            }
            match &mut self.progress {
                Some(rx) => {
                    if let Err(e) = changed(rx).await {
                        return Some(Err(e));
                    }
                }
                None => {
                    return Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "stored blob is shorter than expected",
                    )))
                }
            }
        }
    }

    /// At the end of the requested bytes: `None` (clean end) once the fetch
    /// committed, an error if it failed.
    async fn finish(&mut self) -> Option<io::Result<Bytes>> {
        let rx = self.progress.as_mut()?;
        loop {
            let state = rx.borrow_and_update().state.clone();
            match state {
                FlightState::Committed => return None,
                FlightState::Failed(e) => return Some(Err(io::Error::other(e.to_string()))),
                FlightState::Connecting | FlightState::Streaming => {
                    if let Err(e) = changed(rx).await {
                        return Some(Err(e));
                    }
                }
            }
        }
    }

    /// The reader as a response body.
    pub fn into_body(self) -> Body {
        let stream = futures_util::stream::unfold(self, |mut r| async move {
            let item = r.next_chunk().await?;
            Some((item.map(Frame::data), r))
        });
        BodyExt::boxed(StreamBody::new(stream))
    }
}

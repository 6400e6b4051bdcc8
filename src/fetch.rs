//! One upstream fetch, many readers.
//!
//! The first request for an uncached blob starts a fetch as a task of its
//! own, so no client's disconnect cancels it. The task streams the upstream
//! body into a temp file, hashing as it goes, and publishes the length
//! written after every write on a `watch` channel. Every client, the first
//! one too, reads that file from its own offset up to the published length
//! and waits for more. Only when the digest matched and the file was renamed
//! into place does a reader end cleanly; on a mismatch or an upstream error
//! every reader's body ends with an error, so clients see a broken transfer,
//! never a short clean one.
//!
//! Manifests are small and go through [`SingleFlight`]: one upstream request
//! per key however many clients wait. Depends on `store`, `upstream`,
//! `names`, `error`, `metrics`, `body`.

use std::collections::HashMap;
use std::fs::File;
use std::hash::Hash;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::StreamExt;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::watch;

use crate::body::Body;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::names::{Digest, Hasher, RepoName};
use crate::store::{ReadGuard, Store};
use crate::upstream::{RequestOptions, UpstreamClient};

/// Largest body frame read from disk: big frames mean fewer syscalls and
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

/// Upstream bytes gathered before one write to the temp file.
const WRITE_BATCH: usize = 1024 * 1024;

/// How far a blob fetch has got.
#[derive(Clone)]
pub struct Progress {
    /// The temp file (after commit, the same inode under its digest).
    pub file: Option<Arc<File>>,
    /// Bytes written and readable so far.
    pub written: u64,
    /// The upstream's Content-Length, once its headers arrived.
    pub total: Option<u64>,
    pub state: FlightState,
}

#[derive(Clone)]
pub enum FlightState {
    /// Waiting for the upstream's headers.
    Connecting,
    /// Body bytes are arriving.
    Streaming,
    /// Digest matched; the blob is in the store.
    Committed,
    /// Nothing was stored; every reader fails with this.
    Failed(ApiError),
}

/// A running blob fetch that readers attach to.
pub struct BlobFlight {
    rx: watch::Receiver<Progress>,
}

impl BlobFlight {
    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.rx.clone()
    }
}

/// The blob fetches running now, by digest.
pub struct BlobFetches {
    running: Mutex<HashMap<Digest, Arc<BlobFlight>>>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
}

impl BlobFetches {
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>) -> Arc<BlobFetches> {
        Arc::new(BlobFetches {
            running: Mutex::new(HashMap::new()),
            store,
            metrics,
        })
    }

    /// Joins the fetch of `digest`, starting it if none runs. Returns the
    /// flight and whether this call started it, or `None` when the blob is
    /// already in the store (a fetch committed since the caller looked).
    pub fn join(
        self: &Arc<Self>,
        upstream: Arc<UpstreamClient>,
        repo: RepoName,
        digest: Digest,
    ) -> Option<(Arc<BlobFlight>, bool)> {
        let mut running = self.running.lock().expect("fetch table lock");
        if let Some(f) = running.get(&digest) {
            return Some((f.clone(), false));
        }
        // A fetch records its blob in the store before leaving this table.
        if self.store.has_blob(&digest) {
            return None;
        }
        let (tx, rx) = watch::channel(Progress {
            file: None,
            written: 0,
            total: None,
            state: FlightState::Connecting,
        });
        let flight = Arc::new(BlobFlight { rx });
        running.insert(digest, flight.clone());
        let this = self.clone();
        self.metrics.inflight_fetches.inc();
        tokio::spawn(async move {
            let upstream_name = upstream.name.clone();
            let result = this.run(&upstream, &repo, digest, &tx).await;
            this.running
                .lock()
                .expect("fetch table lock")
                .remove(&digest);
            this.metrics.inflight_fetches.dec();
            match result {
                Ok(size) => {
                    tracing::info!(upstream = %upstream_name, repo = %repo, %digest, size, "blob fetched and committed");
                    tx.send_modify(|p| p.state = FlightState::Committed);
                }
                Err(e) => {
                    tracing::warn!(upstream = %upstream_name, repo = %repo, %digest, error = %e.message, "blob fetch failed; nothing stored");
                    tx.send_modify(|p| p.state = FlightState::Failed(e));
                }
            }
        });
        Some((flight, true))
    }

    async fn run(
        &self,
        upstream: &UpstreamClient,
        repo: &RepoName,
        digest: Digest,
        tx: &watch::Sender<Progress>,
    ) -> Result<u64, ApiError> {
        let resp = upstream
            .send(
                Method::GET,
                repo,
                &format!("blobs/{digest}"),
                &RequestOptions::default(),
            )
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return Err(ApiError::blob_unknown(format!(
                    "blob {digest} is not in {}/{repo}",
                    upstream.name
                ))
                .from_upstream())
            }
            s => return Err(status_error(upstream, s, resp.headers())),
        }
        let total = resp.content_length();
        let (temp, file) = self
            .store
            .temp_file()
            .map_err(|e| ApiError::internal(format!("cannot create temp file: {e}")))?;
        let file = Arc::new(file);
        tx.send_modify(|p| {
            p.file = Some(file.clone());
            p.total = total;
            p.state = FlightState::Streaming;
        });
        let outcome = self
            .stream_to_file(upstream, resp, &file, total, digest, tx)
            .await;
        let outcome = match outcome {
            Ok(size) => {
                let store = self.store.clone();
                let f = file.clone();
                let t = temp.clone();
                tokio::task::spawn_blocking(move || {
                    f.sync_data()?;
                    store.commit_blob(&t, &digest, size)
                })
                .await
                .map_err(io::Error::other)
                .and_then(|r| r)
                .map(|()| size)
                .map_err(|e| ApiError::internal(format!("cannot commit blob {digest}: {e}")))
            }
            Err(e) => Err(e),
        };
        if outcome.is_err() {
            remove_quietly(temp);
        }
        outcome
    }

    async fn stream_to_file(
        &self,
        upstream: &UpstreamClient,
        resp: reqwest::Response,
        file: &Arc<File>,
        total: Option<u64>,
        digest: Digest,
        tx: &watch::Sender<Progress>,
    ) -> Result<u64, ApiError> {
        let mut stream = resp.bytes_stream();
        let mut hasher = Hasher::new();
        let mut written: u64 = 0;
        let mut batch = BytesMut::with_capacity(WRITE_BATCH);
        loop {
            let next = tokio::time::timeout(upstream.idle_timeout, stream.next())
                .await
                .map_err(|_| {
                    ApiError::unavailable(format!(
                        "upstream {} stalled for {}s sending blob {digest}",
                        upstream.name,
                        upstream.idle_timeout.as_secs()
                    ))
                })?;
            let chunk = match next {
                None => break,
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    return Err(ApiError::unavailable(format!(
                        "upstream {} broke off blob {digest} after {written} bytes: {e}",
                        upstream.name
                    )))
                }
            };
            batch.extend_from_slice(&chunk);
            // Gather whatever else is already here, up to a batch, then write.
            while batch.len() < WRITE_BATCH {
                match stream.next().now_or_never() {
                    Some(Some(Ok(c))) => batch.extend_from_slice(&c),
                    Some(Some(Err(e))) => {
                        return Err(ApiError::unavailable(format!(
                            "upstream {} broke off blob {digest}: {e}",
                            upstream.name
                        )))
                    }
                    _ => break,
                }
            }
            let n = batch.len() as u64;
            if let Some(t) = total {
                if written + n > t {
                    return Err(ApiError::bad_upstream(format!(
                        "upstream {} sent more than its Content-Length ({t}) for blob {digest}",
                        upstream.name
                    )));
                }
            }
            let f = file.clone();
            let buf = std::mem::take(&mut batch);
            let offset = written;
            let (h, buf, res) = tokio::task::spawn_blocking(move || {
                hasher.update(&buf);
                let res = f.write_all_at(&buf, offset);
                (hasher, buf, res)
            })
            .await
            .map_err(|e| ApiError::internal(format!("writer task failed: {e}")))?;
            hasher = h;
            res.map_err(|e| ApiError::internal(format!("cannot write blob {digest}: {e}")))?;
            written += n;
            tx.send_modify(|p| p.written = written);
            batch = buf;
            batch.clear();
        }
        if let Some(t) = total {
            if written != t {
                return Err(ApiError::bad_upstream(format!(
                    "upstream {} sent {written} of {t} bytes of blob {digest}",
                    upstream.name
                )));
            }
        }
        let got = hasher.finish();
        if got != digest {
            self.metrics
                .digest_mismatches
                .with_label_values(&[&*upstream.name])
                .inc();
            return Err(ApiError::bad_upstream(format!(
                "upstream {} sent bytes for blob {digest} that hash to {got}; discarded",
                upstream.name
            )));
        }
        Ok(written)
    }
}

/// An upstream status that is neither success nor "not found".
pub fn status_error(
    upstream: &UpstreamClient,
    status: StatusCode,
    headers: &http::HeaderMap,
) -> ApiError {
    if status == StatusCode::TOO_MANY_REQUESTS {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "TOOMANYREQUESTS",
            format!("upstream {} is rate limiting pullgate (429)", upstream.name),
        )
        .from_upstream();
        e.retry_after = headers.get(http::header::RETRY_AFTER).cloned();
        return e;
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return ApiError::name_unknown(format!(
            "upstream {} refused access ({status}): the repository does not exist or needs credentials",
            upstream.name
        ))
        .from_upstream();
    }
    ApiError::unavailable(format!("upstream {} answered {status}", upstream.name))
}

fn remove_quietly(path: PathBuf) {
    if let Err(e) = std::fs::remove_file(&path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::error!(path = %path.display(), error = %e, "cannot remove temp file");
        }
    }
}

/// Reads a blob from a file that may still be growing.
pub struct BlobReader {
    file: Option<Arc<File>>,
    pos: u64,
    /// Where to stop (exclusive); `None` reads until the fetch commits.
    end: Option<u64>,
    /// Progress of the fetch, or `None` for a committed file.
    progress: Option<watch::Receiver<Progress>>,
    /// Keeps the blob from eviction while this reader lives.
    _guard: Option<ReadGuard>,
    metrics: Arc<Metrics>,
    source: &'static str,
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
        file: Option<Arc<File>>,
        pos: u64,
        end: Option<u64>,
        progress: Option<watch::Receiver<Progress>>,
        guard: ReadGuard,
        metrics: Arc<Metrics>,
        source: &'static str,
    ) -> BlobReader {
        ACTIVE_READERS.fetch_add(1, Ordering::Relaxed);
        BlobReader {
            file,
            pos,
            end,
            progress,
            _guard: Some(guard),
            metrics,
            source,
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
    /// A reader over a stored, complete file.
    pub fn stored(
        file: File,
        start: u64,
        end: u64,
        guard: ReadGuard,
        metrics: Arc<Metrics>,
    ) -> BlobReader {
        BlobReader::new(
            Some(Arc::new(file)),
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
                    if self.file.is_none() {
                        self.file = p.file.clone();
                    }
                    match p.state {
                        FlightState::Failed(e) => return Some(Err(io::Error::other(e.message))),
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
                let Some(file) = self.file.clone() else {
                    return Some(Err(io::Error::other("blob fetch has no file")));
                };
                let len = ((limit - self.pos) as usize).min(chunk_size());
                let pos = self.pos;
                let mut buf = self.buffer(len);
                let read = tokio::task::spawn_blocking(move || {
                    let r = file.read_exact_at(&mut buf, pos);
                    (buf, r)
                })
                .await
                .map_err(io::Error::other)
                .and_then(|(mut buf, r)| {
                    r?;
                    let frame = buf.split().freeze();
                    if self.pool.len() < POOL_BUFFERS {
                        self.pool.push(buf);
                    }
                    Ok(frame)
                });
                return Some(read.inspect(|b| {
                    self.pos += b.len() as u64;
                    self.metrics
                        .bytes_served
                        .with_label_values(&[self.source])
                        .inc_by(b.len() as u64);
                }));
            }
            match &mut self.progress {
                Some(rx) => {
                    if rx.changed().await.is_err() {
                        // The fetch task is gone: only a final state lets us go on.
                        let finished = matches!(
                            rx.borrow().state,
                            FlightState::Committed | FlightState::Failed(_)
                        );
                        if !finished {
                            return Some(Err(io::Error::other("blob fetch ended unexpectedly")));
                        }
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
                FlightState::Failed(e) => return Some(Err(io::Error::other(e.message))),
                FlightState::Connecting | FlightState::Streaming => {
                    if rx.changed().await.is_err() {
                        let finished = matches!(
                            rx.borrow().state,
                            FlightState::Committed | FlightState::Failed(_)
                        );
                        if !finished {
                            return Some(Err(io::Error::other("blob fetch ended unexpectedly")));
                        }
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

/// The result of a shared manifest (or other small) fetch.
pub type FlightResult<V> = Result<V, ApiError>;

type SharedFlight<V> = Shared<BoxFuture<'static, FlightResult<V>>>;

/// Runs one future per key; concurrent callers with the same key share it.
/// The future runs as its own task, so a caller's disconnect does not cancel
/// it for the others.
pub struct SingleFlight<K, V> {
    running: Arc<Mutex<HashMap<K, SharedFlight<V>>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            running: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `make()` for `key` unless it is already running; returns its
    /// result and whether this call started it.
    pub async fn run<F>(&self, key: K, make: impl FnOnce() -> F) -> (FlightResult<V>, bool)
    where
        F: std::future::Future<Output = FlightResult<V>> + Send + 'static,
    {
        let (fut, leader) = {
            let mut running = self.running.lock().expect("single flight lock");
            if let Some(f) = running.get(&key) {
                (f.clone(), false)
            } else {
                let work = make();
                let table = self.running.clone();
                let k = key.clone();
                let handle = tokio::spawn(async move {
                    let r = work.await;
                    table.lock().expect("single flight lock").remove(&k);
                    r
                });
                let fut = async move {
                    handle.await.unwrap_or_else(|e| {
                        Err(ApiError::internal(format!("fetch task failed: {e}")))
                    })
                }
                .boxed()
                .shared();
                running.insert(key, fut.clone());
                (fut, true)
            }
        };
        (fut.await, leader)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn single_flight_runs_once_for_concurrent_callers() {
        let sf: Arc<SingleFlight<&'static str, u32>> = Arc::new(SingleFlight::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let sf = sf.clone();
            let calls = calls.clone();
            tasks.push(tokio::spawn(async move {
                sf.run("k", || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(7)
                })
                .await
            }));
        }
        let mut leaders = 0;
        for t in tasks {
            let (r, leader) = t.await.unwrap();
            assert_eq!(r.unwrap(), 7);
            leaders += usize::from(leader);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(leaders, 1);
        // Finished work is forgotten: the next call runs again.
        let (r, leader) = sf.run("k", || async { Ok(8) }).await;
        assert_eq!((r.unwrap(), leader), (8, true));
    }

    #[tokio::test]
    async fn single_flight_survives_the_leader_going_away() {
        let sf: Arc<SingleFlight<u8, u8>> = Arc::new(SingleFlight::default());
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        let leader = {
            let sf = sf.clone();
            tokio::spawn(async move {
                sf.run(1, || async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    d.fetch_add(1, Ordering::SeqCst);
                    Ok(1)
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        leader.abort();
        let (r, started) = sf.run(1, || async { Ok(2) }).await;
        assert_eq!((r.unwrap(), started), (1, false));
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }
}

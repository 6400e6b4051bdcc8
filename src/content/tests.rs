//! The content layer over a fake remote: what it asks the remote, and what
//! it keeps.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::BodyExt;

use super::*;
use crate::metrics::Metrics;
use crate::oci::manifest::OCI_MANIFEST;
use crate::remote::{BodyStream, Endpoint, Remote, RemoteError, Request, Response};
use crate::store::MemoryStore;

/// A remote that serves what a test put in it, counting requests.
#[derive(Default)]
struct Fake {
    name: Arc<str>,
    /// "manifests/<ref>" or "blobs/<digest>" -> bytes.
    content: Mutex<HashMap<String, Bytes>>,
    requests: Mutex<Vec<String>>,
    /// Every answer is this status (when set).
    failing: Mutex<Option<StatusCode>>,
    /// Serve other bytes than those stored (same length).
    corrupt: Mutex<bool>,
    /// Answers wait for this many milliseconds, so callers overlap.
    delay_ms: u64,
}

impl Fake {
    fn new(delay_ms: u64) -> Arc<Fake> {
        Arc::new(Fake {
            name: Arc::from("fake.io"),
            delay_ms,
            ..Fake::default()
        })
    }

    fn put(&self, key: String, bytes: &Bytes) {
        self.content.lock().unwrap().insert(key, bytes.clone());
    }

    fn count(&self, prefix: &str) -> usize {
        let r = self.requests.lock().unwrap();
        r.iter().filter(|k| k.starts_with(prefix)).count()
    }
}

impl Remote for Fake {
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn send<'a>(&'a self, req: Request<'a>) -> BoxFuture<'a, Result<Response, RemoteError>> {
        async move {
            let key = req.endpoint.to_string();
            self.requests
                .lock()
                .unwrap()
                .push(format!("{} {key}", req.method));
            tokio::time::sleep(Duration::from_millis(self.delay_ms)).await;
            let failing = *self.failing.lock().unwrap();
            let found = self.content.lock().unwrap().get(&key).cloned();
            let (status, body) = match (failing, found) {
                (Some(s), _) => (s, Bytes::new()),
                (None, Some(b)) => (StatusCode::OK, b),
                (None, None) => (StatusCode::NOT_FOUND, Bytes::new()),
            };
            let body = if *self.corrupt.lock().unwrap() && !body.is_empty() {
                let mut v = body.to_vec();
                v[0] ^= 0xff;
                Bytes::from(v)
            } else {
                body
            };
            let mut headers = HeaderMap::new();
            if matches!(req.endpoint, Endpoint::Manifest(_)) && status == StatusCode::OK {
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static(OCI_MANIFEST),
                );
            }
            let len = body.len() as u64;
            let is_head = req.method == http::Method::HEAD;
            let stream: BodyStream = if is_head {
                Box::pin(futures_util::stream::empty())
            } else {
                Box::pin(futures_util::stream::iter([Ok(body)]))
            };
            Ok(Response {
                status,
                headers,
                content_length: Some(len),
                body: stream,
            })
        }
        .boxed()
    }
}

fn setup(delay_ms: u64) -> (Arc<Fake>, Arc<dyn Remote>, Arc<Content>, MemoryStore) {
    let fake = Fake::new(delay_ms);
    let remote: Arc<dyn Remote> = fake.clone();
    let metrics = Arc::new(Metrics::new());
    let store = MemoryStore::new(None, metrics.clone());
    let content = Content::new(Arc::new(store.clone()), metrics);
    (fake, remote, content, store)
}

fn manifest_bytes(n: u8) -> Bytes {
    let layer = Digest::of(&[n]);
    Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{layer}","size":1}},"layers":[]}}"#
    ))
}

fn repo() -> RepoName {
    "acme/app".parse().unwrap()
}

#[tokio::test(start_paused = true)]
async fn concurrent_manifest_lookups_make_one_remote_request_and_keep_the_result() {
    let (fake, remote, content, store) = setup(50);
    let bytes = manifest_bytes(1);
    let d = Digest::of(&bytes);
    fake.put(format!("manifests/{d}"), &bytes);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (content, remote) = (content.clone(), remote.clone());
        tasks.push(tokio::spawn(async move {
            content
                .manifest(&remote, &repo(), d, Accept::Any, 1 << 20, Lookup::Client)
                .await
                .map(|m| m.digest)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), d);
    }
    assert_eq!(fake.count("GET manifests/"), 1);
    assert!(store.has_blob(&d));
    content
        .manifest(&remote, &repo(), d, Accept::Any, 1 << 20, Lookup::Client)
        .await
        .unwrap();
    assert_eq!(
        fake.count("GET manifests/"),
        1,
        "the second lookup is a store hit"
    );
}

#[tokio::test(start_paused = true)]
async fn bytes_that_do_not_match_are_refused_and_not_kept() {
    let (fake, remote, content, store) = setup(0);
    let bytes = manifest_bytes(2);
    let d = Digest::of(&bytes);
    fake.put(format!("manifests/{d}"), &bytes);
    *fake.corrupt.lock().unwrap() = true;
    let err = content
        .manifest(&remote, &repo(), d, Accept::Any, 1 << 20, Lookup::Client)
        .await
        .unwrap_err();
    assert!(matches!(err, ContentError::Mismatch { .. }), "{err}");
    assert!(!store.has_blob(&d));
    assert!(store.manifest(&d).await.unwrap().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_tag_is_served_from_its_last_digest_when_the_remote_fails() {
    let (fake, remote, content, _store) = setup(0);
    let bytes = manifest_bytes(3);
    let d = Digest::of(&bytes);
    fake.put("manifests/v1".into(), &bytes);
    let key = TagKey {
        upstream: remote.name().clone(),
        repo: repo(),
        tag: "v1".parse().unwrap(),
    };
    let ttl = Duration::ZERO;
    let t = content
        .tag(&remote, &key, Accept::Any, 1 << 20, ttl)
        .await
        .unwrap();
    assert_eq!(t.manifest.digest, d);
    *fake.failing.lock().unwrap() = Some(StatusCode::SERVICE_UNAVAILABLE);
    let t = content
        .tag(&remote, &key, Accept::Any, 1 << 20, ttl)
        .await
        .unwrap();
    assert_eq!(t.manifest.digest, d, "stale, but served");
    assert_eq!(fake.count("HEAD manifests/v1"), 1);
    // A tag the remote no longer has is forgotten.
    *fake.failing.lock().unwrap() = Some(StatusCode::NOT_FOUND);
    let err = content
        .tag(&remote, &key, Accept::Any, 1 << 20, ttl)
        .await
        .unwrap_err();
    assert!(matches!(err, ContentError::TagGone { .. }), "{err}");
}

async fn read_body(b: crate::body::Body) -> Result<Vec<u8>, std::io::Error> {
    let collected = b.collect().await?;
    Ok(collected.to_bytes().to_vec())
}

#[tokio::test(start_paused = true)]
async fn every_reader_of_a_cold_blob_follows_one_fetch() {
    let (fake, remote, content, store) = setup(50);
    let blob = Bytes::from(vec![7u8; 300_000]);
    let d = Digest::of(&blob);
    fake.put(format!("blobs/{d}"), &blob);
    let mut bodies = Vec::new();
    for _ in 0..8 {
        match content.blob(&remote, &repo(), d).await.unwrap() {
            BlobAnswer::Following {
                progress, guard, ..
            } => bodies.push(
                fetch::BlobReader::following(
                    progress,
                    0,
                    Some(300_000),
                    guard,
                    content.metrics.clone(),
                )
                .into_body(),
            ),
            BlobAnswer::Stored(_) => panic!("not stored yet"),
        }
    }
    for b in bodies {
        assert_eq!(read_body(b).await.unwrap(), blob);
    }
    assert_eq!(fake.count("GET blobs/"), 1);
    assert!(store.has_blob(&d));
    assert!(matches!(
        content.blob(&remote, &repo(), d).await.unwrap(),
        BlobAnswer::Stored(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_blob_with_wrong_bytes_fails_every_reader_and_is_not_kept() {
    let (fake, remote, content, store) = setup(10);
    let blob = Bytes::from(vec![9u8; 1000]);
    let d = Digest::of(&blob);
    fake.put(format!("blobs/{d}"), &blob);
    *fake.corrupt.lock().unwrap() = true;
    let BlobAnswer::Following {
        progress, guard, ..
    } = content.blob(&remote, &repo(), d).await.unwrap()
    else {
        panic!("not stored yet")
    };
    let body =
        fetch::BlobReader::following(progress, 0, Some(1000), guard, content.metrics.clone())
            .into_body();
    assert!(
        read_body(body).await.is_err(),
        "a broken transfer, not a clean one"
    );
    assert!(!store.has_blob(&d));
}

#[tokio::test(start_paused = true)]
async fn small_reads_use_the_store_before_the_remote() {
    let (fake, remote, content, store) = setup(0);
    let payload = Bytes::from_static(b"a signature payload");
    let d = Digest::of(&payload);
    crate::store::put_blob(&store, d, payload.clone())
        .await
        .unwrap();
    let got = content
        .small_blob(&*remote, &repo(), d, 1024)
        .await
        .unwrap();
    assert!(matches!(got, Small::Body(b) if b == payload));
    assert_eq!(fake.count("GET"), 0);
    let other = Digest::of(b"elsewhere");
    let got = content
        .small_blob(&*remote, &repo(), other, 1024)
        .await
        .unwrap();
    assert!(matches!(got, Small::Status(StatusCode::NOT_FOUND)));
    assert_eq!(fake.count("GET blobs/"), 1);
}

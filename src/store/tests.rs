//! The rules every store keeps, checked on each implementation.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;

use super::*;
use crate::metrics::Metrics;

/// Each store under test, with a way to make another like it.
fn stores(dir: &Path, max: Option<u64>) -> Vec<(&'static str, Arc<dyn Store>)> {
    let mut all: Vec<(&'static str, Arc<dyn Store>)> = vec![
        (
            "fs",
            Arc::new(FsStore::open(dir, max, Arc::new(Metrics::new())).unwrap()),
        ),
        (
            "memory",
            Arc::new(MemoryStore::new(max, Arc::new(Metrics::new()))),
        ),
    ];
    // Eviction is the local tier's own; what it evicts the bucket still has.
    if max.is_none() {
        all.push(("shared", Arc::new(shared_store(&dir.join("shared"), None))));
    }
    all
}

/// A local tier at `dir` in front of an in-memory bucket (a new one, or
/// `bucket` to share it with other replicas).
pub(super) fn shared_store(
    dir: &Path,
    bucket: Option<Arc<object_store::memory::InMemory>>,
) -> SharedStore {
    shared_store_limited(dir, bucket, BucketLimit::default())
}

/// The same, evicting from the bucket beyond `limit`.
pub(super) fn shared_store_limited(
    dir: &Path,
    bucket: Option<Arc<object_store::memory::InMemory>>,
    limit: BucketLimit,
) -> SharedStore {
    let metrics = Arc::new(Metrics::new());
    let bucket = bucket.unwrap_or_default();
    SharedStore::new(
        FsStore::open(dir, None, metrics.clone()).unwrap(),
        Bucket::new(bucket, "site", "memory://test".into()),
        Duration::from_secs(60),
        limit,
        metrics,
    )
}

async fn put(s: &dyn Store, bytes: &[u8]) -> Digest {
    let d = Digest::of(bytes);
    put_blob(s, d, Bytes::copy_from_slice(bytes)).await.unwrap();
    d
}

async fn read_all(h: &BlobHandle) -> Vec<u8> {
    match &h.source {
        Source::File(f) => {
            let mut buf = vec![0; h.size as usize];
            std::os::unix::fs::FileExt::read_exact_at(&**f, &mut buf, 0).unwrap();
            buf
        }
        Source::Memory(c) => {
            let mut out = Vec::new();
            while (out.len() as u64) < h.size {
                out.extend_from_slice(&c.slice(out.len() as u64, usize::MAX));
            }
            out
        }
    }
}

#[tokio::test]
async fn a_writer_dropped_before_finish_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for (name, s) in stores(dir.path(), None) {
        let d = Digest::of(b"whole blob");
        let mut w = s.writer(d).await.unwrap();
        w.write(Bytes::from_static(b"whole")).await.unwrap();
        assert_eq!(w.written(), 5, "{name}");
        drop(w);
        assert!(!s.has_blob(&d), "{name}");
        assert!(s.open(&d).await.unwrap().is_none(), "{name}");
        assert_eq!(s.size(), 0, "{name}");
    }
    // Nothing is left in the filesystem store's temp directory either.
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
}

#[tokio::test]
async fn bytes_that_do_not_match_their_digest_are_never_visible() {
    let dir = tempfile::tempdir().unwrap();
    for (name, s) in stores(dir.path(), None) {
        let d = Digest::of(b"the real bytes");
        let mut w = s.writer(d).await.unwrap();
        w.write(Bytes::from_static(b"other bytes")).await.unwrap();
        let err = w.finish().await.unwrap_err();
        assert!(
            matches!(err, WriteError::Mismatch { got } if got == Digest::of(b"other bytes")),
            "{name}: {err}"
        );
        assert!(!s.has_blob(&d), "{name}");
        assert!(s.open(&d).await.unwrap().is_none(), "{name}");
    }
}

#[tokio::test]
async fn followers_read_what_is_written_before_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    for (name, s) in stores(dir.path(), None) {
        let d = Digest::of(b"first second");
        let mut w = s.writer(d).await.unwrap();
        let source = w.source();
        w.write(Bytes::from_static(b"first ")).await.unwrap();
        let seen = match &source {
            Source::File(f) => {
                let mut buf = vec![0; 6];
                std::os::unix::fs::FileExt::read_exact_at(&**f, &mut buf, 0).unwrap();
                buf
            }
            Source::Memory(c) => c.slice(0, 100).to_vec(),
        };
        assert_eq!(seen, b"first ", "{name}");
        w.write(Bytes::from_static(b"second")).await.unwrap();
        assert_eq!(w.finish().await.unwrap(), 12, "{name}");
        let h = s.open(&d).await.unwrap().unwrap();
        assert_eq!(read_all(&h).await, b"first second", "{name}");
    }
}

#[tokio::test]
async fn eviction_removes_least_recently_used_but_not_blobs_being_read() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FsStore::open(dir.path(), Some(25), Arc::new(Metrics::new())).unwrap();
    let mem = MemoryStore::new(Some(25), Arc::new(Metrics::new()));
    let indexes: [(&str, &dyn Store, &index::Index); 2] =
        [("fs", &fs, fs.index()), ("memory", &mem, mem.index())];
    for (name, s, index) in indexes {
        let a = put(s, &[b'a'; 10]).await;
        let reader = s.open(&a).await.unwrap().unwrap();
        // Make `a` the oldest.
        index.set_last_access(&a, 1);
        let b = put(s, &[b'b'; 10]).await;
        index.set_last_access(&b, 2);
        let c = put(s, &[b'c'; 10]).await;
        // 30 > 25: `a` is the LRU but is being read, so `b` goes.
        assert!(s.has_blob(&a), "{name}");
        assert!(!s.has_blob(&b), "{name}");
        assert!(s.has_blob(&c), "{name}");
        assert!(s.open(&b).await.unwrap().is_none(), "{name}");
        drop(reader);
        let d = put(s, &[b'd'; 10]).await;
        assert!(
            !s.has_blob(&a),
            "{name}: a is evicted once its reader is gone"
        );
        assert!(s.has_blob(&c) && s.has_blob(&d), "{name}");
        assert_eq!(s.size(), 20, "{name}");
    }
}

fn tag_key() -> TagKey {
    TagKey {
        upstream: Arc::from("docker.io"),
        repo: "library/alpine".parse().unwrap(),
        tag: "3".parse().unwrap(),
    }
}

#[tokio::test]
async fn manifests_tags_approvals_and_documents_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    for (name, s) in stores(dir.path(), None) {
        let bytes = Bytes::from_static(br#"{"schemaVersion":2,"manifests":[]}"#);
        let d = Digest::of(&bytes);
        let m = Manifest::parse(d, None, bytes.clone()).unwrap();
        s.put_manifest(Arc::new(m)).await.unwrap();
        assert_eq!(
            s.manifest(&d).await.unwrap().unwrap().bytes,
            bytes,
            "{name}"
        );
        // A manifest is a blob too.
        let h = s.open(&d).await.unwrap().unwrap();
        assert_eq!(read_all(&h).await, bytes, "{name}");
        let key = tag_key();
        let when = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        s.update_tag(
            &key,
            Box::new(move |old| {
                assert!(old.is_none());
                Some(TagRecord {
                    digest: d,
                    checked: when,
                    approved: None,
                })
            }),
        )
        .await
        .unwrap();
        s.update_tag(
            &key,
            Box::new(move |old| {
                Some(TagRecord {
                    approved: Some(d),
                    ..old.unwrap()
                })
            }),
        )
        .await
        .unwrap();
        let rec = s.tag(&key).await.unwrap().unwrap();
        assert_eq!((rec.checked, rec.approved), (when, Some(d)), "{name}");
        s.update_tag(&key, Box::new(|_| None)).await.unwrap();
        assert!(s.tag(&key).await.unwrap().is_none(), "{name}");
        s.add_approval(d, "x".into(), b"{}".to_vec()).await.unwrap();
        assert_eq!(s.approvals(&d).await.unwrap(), [b"{}".to_vec()], "{name}");
        assert!(s.read_meta("bases/history.json").await.unwrap().is_none());
        s.write_meta("bases/history.json", b"[]".to_vec())
            .await
            .unwrap();
        assert_eq!(
            s.read_meta("bases/history.json").await.unwrap().unwrap(),
            b"[]",
            "{name}"
        );
        s.set_aside_meta("bases/history.json").await.unwrap();
        assert!(s.read_meta("bases/history.json").await.unwrap().is_none());
    }
}

#[tokio::test]
async fn manifests_and_tags_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = Bytes::from_static(br#"{"schemaVersion":2,"manifests":[]}"#);
    let d = Digest::of(&bytes);
    let key = tag_key();
    let when = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let record = TagRecord {
        digest: d,
        checked: when,
        approved: Some(d),
    };
    {
        let s = FsStore::open(dir.path(), None, Arc::new(Metrics::new())).unwrap();
        let m = Manifest::parse(d, Some(manifest::OCI_INDEX), bytes.clone()).unwrap();
        s.put_manifest(Arc::new(m)).await.unwrap();
        s.update_tag(&key, Box::new(move |_| Some(record)))
            .await
            .unwrap();
    }
    let s = FsStore::open(dir.path(), None, Arc::new(Metrics::new())).unwrap();
    let m = s.manifest(&d).await.unwrap().unwrap();
    assert_eq!(m.bytes, bytes);
    assert_eq!(m.media_type, manifest::OCI_INDEX);
    assert_eq!(s.tag(&key).await.unwrap(), Some(record));
}

#[tokio::test]
async fn an_overlay_reads_through_and_writes_only_above() {
    let dir = tempfile::tempdir().unwrap();
    let lower = FsStore::open(dir.path(), None, Arc::new(Metrics::new())).unwrap();
    let kept = put(&lower, b"kept").await;
    lower
        .write_meta("bases/history.json", b"lower".to_vec())
        .await
        .unwrap();
    let overlay = Overlay::new(
        Arc::new(lower.clone()),
        MemoryStore::new(None, Arc::new(Metrics::new())),
    );
    assert!(overlay.open(&kept).await.unwrap().is_some());
    let new = put(&overlay, b"new").await;
    overlay
        .write_meta("bases/history.json", b"upper".to_vec())
        .await
        .unwrap();
    assert_eq!(
        overlay
            .read_meta("bases/history.json")
            .await
            .unwrap()
            .unwrap(),
        b"upper"
    );
    assert!(!lower.has_blob(&new));
    assert_eq!(
        lower
            .read_meta("bases/history.json")
            .await
            .unwrap()
            .unwrap(),
        b"lower"
    );
}

use crate::oci::manifest;

//! A store that reads through to another and never writes to it: what
//! `pullgate verify` and `pullgate pin` run the pipeline on, so that they
//! see the server's tags, approvals and base history while everything they
//! fetch stays in memory and the server's store is left as it was.

use std::sync::Arc;
use std::time::SystemTime;

use futures_util::FutureExt;

use super::index::ReadGuard;
use super::{
    BlobHandle, BlobWriter, MemoryStore, Store, StoreFuture, TagKey, TagRecord, TagUpdate,
};
use crate::oci::names::Digest;
use crate::oci::Manifest;

/// What the lower store could not read counts as absent: a command run by
/// a user who may not read all of the server's store still reaches a
/// verdict, from the upstream.
fn ignore<T>(r: std::io::Result<Option<T>>) -> Option<T> {
    r.unwrap_or_else(|e| {
        tracing::debug!("the server's store could not be read: {e}");
        None
    })
}

/// `upper` (written) over `lower` (only read).
pub struct Overlay {
    lower: Arc<dyn Store>,
    upper: MemoryStore,
}

impl Overlay {
    pub fn new(lower: Arc<dyn Store>, upper: MemoryStore) -> Overlay {
        Overlay { lower, upper }
    }
}

impl Store for Overlay {
    fn location(&self) -> String {
        format!("{} (read only)", self.lower.location())
    }

    fn has_blob(&self, d: &Digest) -> bool {
        self.upper.has_blob(d) || self.lower.has_blob(d)
    }

    fn open<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, Option<BlobHandle>> {
        async move {
            match self.upper.open(d).await? {
                Some(h) => Ok(Some(h)),
                None => Ok(ignore(self.lower.open(d).await)),
            }
        }
        .boxed()
    }

    fn shared_blob<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, Option<super::SharedBlob>> {
        async move { Ok(ignore(self.lower.shared_blob(d).await)) }.boxed()
    }

    fn writer(&self, d: Digest) -> StoreFuture<'_, Box<dyn BlobWriter>> {
        self.upper.writer(d)
    }

    fn discard<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, ()> {
        // The lower store is read only: what is above goes.
        self.upper.discard(d)
    }

    fn pin(&self, d: &Digest) -> ReadGuard {
        self.upper.pin(d)
    }

    fn size(&self) -> u64 {
        self.upper.size()
    }

    fn cached_manifest(&self, d: &Digest) -> Option<Arc<Manifest>> {
        self.upper
            .cached_manifest(d)
            .or_else(|| self.lower.cached_manifest(d))
    }

    fn manifest<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, Option<Arc<Manifest>>> {
        async move {
            match self.upper.manifest(d).await? {
                Some(m) => Ok(Some(m)),
                None => Ok(ignore(self.lower.manifest(d).await)),
            }
        }
        .boxed()
    }

    fn put_manifest(&self, m: Arc<Manifest>) -> StoreFuture<'_, ()> {
        self.upper.put_manifest(m)
    }

    fn cached_tag(&self, key: &TagKey) -> Option<TagRecord> {
        self.upper
            .cached_tag(key)
            .or_else(|| self.lower.cached_tag(key))
    }

    fn tag<'a>(&'a self, key: &'a TagKey) -> StoreFuture<'a, Option<TagRecord>> {
        async move {
            match self.upper.tag(key).await? {
                Some(r) => Ok(Some(r)),
                None => Ok(ignore(self.lower.tag(key).await)),
            }
        }
        .boxed()
    }

    fn update_tag<'a>(&'a self, key: &'a TagKey, mut f: TagUpdate) -> StoreFuture<'a, ()> {
        async move {
            let current = self.tag(key).await?;
            let next = f(current);
            self.upper.update_tag(key, Box::new(move |_| next)).await
        }
        .boxed()
    }

    fn list_tags<'a>(
        &'a self,
        upstream: &'a str,
        repo: &'a crate::oci::names::RepoName,
    ) -> StoreFuture<'a, Vec<crate::oci::names::Tag>> {
        async move {
            let mut all = self.upper.list_tags(upstream, repo).await?;
            all.extend(
                self.lower
                    .list_tags(upstream, repo)
                    .await
                    .unwrap_or_default(),
            );
            all.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            all.dedup();
            Ok(all)
        }
        .boxed()
    }

    fn defer_tag(&self, key: &TagKey, rec: TagRecord, checked: SystemTime) {
        self.upper.defer_tag(key, rec, checked);
    }

    fn approvals<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, Vec<Vec<u8>>> {
        async move {
            let mut all = self.upper.approvals(d).await?;
            all.extend(self.lower.approvals(d).await.unwrap_or_default());
            Ok(all)
        }
        .boxed()
    }

    fn add_approval(&self, d: Digest, id: String, bytes: Vec<u8>) -> StoreFuture<'_, String> {
        self.upper.add_approval(d, id, bytes)
    }

    fn read_meta<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        async move {
            match self.upper.read_meta(name).await? {
                Some(b) => Ok(Some(b)),
                None => Ok(ignore(self.lower.read_meta(name).await)),
            }
        }
        .boxed()
    }

    fn write_meta<'a>(&'a self, name: &'a str, bytes: Vec<u8>) -> StoreFuture<'a, ()> {
        self.upper.write_meta(name, bytes)
    }

    fn set_aside_meta<'a>(&'a self, name: &'a str) -> StoreFuture<'a, String> {
        // The lower store is not ours to change: its unreadable document is
        // shadowed by an empty one instead.
        async move {
            self.upper.write_meta(name, b"{}".to_vec()).await?;
            Ok(format!("{name} (left as it is; read only)"))
        }
        .boxed()
    }

    fn probe(&self) -> StoreFuture<'_, ()> {
        self.upper.probe()
    }
}

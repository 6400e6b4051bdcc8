//! A store held in memory: for tests (the proxy suite runs on it as well as
//! on the filesystem) and as the writable layer of [`super::Overlay`]. It
//! keeps the filesystem store's rules: digests checked before a blob is
//! visible, writers that abort on drop, LRU eviction that spares readers.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::future::{ready, BoxFuture};
use futures_util::FutureExt;

use super::index::{Index, ReadGuard};
use super::{
    BlobHandle, BlobWriter, Source, Store, StoreFuture, TagKey, TagRecord, TagUpdate, WriteError,
};
use crate::metrics::Metrics;
use crate::oci::names::{Digest, Hasher};
use crate::oci::Manifest;

/// Bytes as a list of chunks, appended while a blob is written and read
/// from any offset without copying.
#[derive(Default)]
pub struct Chunks {
    /// (offset of the chunk, chunk).
    list: RwLock<Vec<(u64, Bytes)>>,
}

impl Chunks {
    pub fn from_bytes(b: Bytes) -> Chunks {
        let c = Chunks::default();
        c.push(b);
        c
    }

    fn push(&self, b: Bytes) {
        let mut list = self.list.write().unwrap_or_else(|e| e.into_inner());
        let at = list.last().map_or(0, |(o, c)| o + c.len() as u64);
        if !b.is_empty() {
            list.push((at, b));
        }
    }

    /// Up to `max` bytes at `offset`, without copying; empty past the end.
    pub fn slice(&self, offset: u64, max: usize) -> Bytes {
        let list = self.list.read().unwrap_or_else(|e| e.into_inner());
        let i = list.partition_point(|(o, c)| o + c.len() as u64 <= offset);
        let Some((start, chunk)) = list.get(i) else {
            return Bytes::new();
        };
        let from = usize::try_from(offset - start).unwrap_or(usize::MAX);
        let to = from.saturating_add(max).min(chunk.len());
        chunk.slice(from.min(to)..to)
    }

    pub fn len(&self) -> u64 {
        let list = self.list.read().unwrap_or_else(|e| e.into_inner());
        list.last().map_or(0, |(o, c)| o + c.len() as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Default)]
struct State {
    blobs: HashMap<Digest, Arc<Chunks>>,
    manifests: HashMap<Digest, Arc<Manifest>>,
    tags: HashMap<TagKey, TagRecord>,
    approvals: HashMap<Digest, Vec<(String, Vec<u8>)>>,
    meta: HashMap<String, Vec<u8>>,
}

/// The memory store. Cheap to clone; clones share their contents, so a
/// test can "restart" a proxy on the same store.
#[derive(Clone)]
pub struct MemoryStore(Arc<Inner>);

struct Inner {
    /// Shared with the store's restarts.
    state: Arc<Mutex<State>>,
    index: Index,
}

impl MemoryStore {
    pub fn new(max_size: Option<u64>, metrics: Arc<Metrics>) -> MemoryStore {
        MemoryStore(Arc::new(Inner {
            state: Arc::new(Mutex::new(State::default())),
            index: Index::new(max_size, metrics),
        }))
    }

    /// The same contents as a new process would find them: committed blobs,
    /// manifests and metadata; nothing being written, no readers; indexed
    /// anew, counted in `metrics`. Tests restart proxies with it.
    pub fn restart(&self, max_size: Option<u64>, metrics: Arc<Metrics>) -> MemoryStore {
        let index = Index::new(max_size, metrics);
        {
            let s = self.0.state();
            index.load(s.blobs.iter().map(|(d, c)| {
                (
                    *d,
                    super::index::Entry {
                        size: c.len(),
                        last_access: super::index::unix(SystemTime::now()),
                        manifest: s.manifests.contains_key(d),
                    },
                )
            }));
        }
        MemoryStore(Arc::new(Inner {
            state: self.0.state.clone(),
            index,
        }))
    }

    #[cfg(test)]
    pub(super) fn index(&self) -> &Index {
        &self.0.index
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn evict(&self) {
        self.index.evict(|d| {
            self.state().blobs.remove(d);
            true
        });
    }
}

fn done<'a, T: Send + 'a>(v: T) -> StoreFuture<'a, T> {
    ready(Ok(v)).boxed()
}

impl Store for MemoryStore {
    fn location(&self) -> String {
        "memory".into()
    }

    fn has_blob(&self, d: &Digest) -> bool {
        self.0.index.contains(d)
    }

    fn open<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, Option<BlobHandle>> {
        let Some(guard) = self.0.index.pin(d, false) else {
            return done(None);
        };
        let Some(chunks) = self.0.state().blobs.get(d).cloned() else {
            return done(None);
        };
        self.0.index.touch(d);
        done(Some(BlobHandle {
            size: chunks.len(),
            source: Source::Memory(chunks),
            guard,
        }))
    }

    fn writer(&self, d: Digest) -> StoreFuture<'_, Box<dyn BlobWriter>> {
        done(Box::new(MemoryWriter {
            store: self.0.clone(),
            digest: d,
            chunks: Arc::new(Chunks::default()),
            hasher: Hasher::new(),
            written: 0,
        }) as Box<dyn BlobWriter>)
    }

    fn discard<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, ()> {
        self.0.state().blobs.remove(d);
        self.0.index.forget(d);
        done(())
    }

    fn pin(&self, d: &Digest) -> ReadGuard {
        self.0.index.pin(d, true).expect("an unconditional pin")
    }

    fn size(&self) -> u64 {
        self.0.index.total()
    }

    fn cached_manifest(&self, d: &Digest) -> Option<Arc<Manifest>> {
        self.0.state().manifests.get(d).cloned()
    }

    fn manifest<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, Option<Arc<Manifest>>> {
        done(self.cached_manifest(d))
    }

    fn put_manifest(&self, m: Arc<Manifest>) -> StoreFuture<'_, ()> {
        {
            let mut s = self.0.state();
            s.blobs
                .insert(m.digest, Arc::new(Chunks::from_bytes(m.bytes.clone())));
            s.manifests.insert(m.digest, m.clone());
        }
        self.0.index.record(&m.digest, m.bytes.len() as u64, true);
        done(())
    }

    fn cached_tag(&self, key: &TagKey) -> Option<TagRecord> {
        self.0.state().tags.get(key).copied()
    }

    fn tag<'a>(&'a self, key: &'a TagKey) -> StoreFuture<'a, Option<TagRecord>> {
        done(self.cached_tag(key))
    }

    fn update_tag<'a>(&'a self, key: &'a TagKey, mut f: TagUpdate) -> StoreFuture<'a, ()> {
        let mut s = self.0.state();
        match f(s.tags.get(key).copied()) {
            Some(rec) => s.tags.insert(key.clone(), rec),
            None => s.tags.remove(key),
        };
        done(())
    }

    fn list_tags<'a>(
        &'a self,
        upstream: &'a str,
        repo: &'a crate::oci::names::RepoName,
    ) -> StoreFuture<'a, Vec<crate::oci::names::Tag>> {
        let s = self.0.state();
        let mut tags: Vec<_> = s
            .tags
            .keys()
            .filter(|k| &*k.upstream == upstream && &k.repo == repo)
            .map(|k| k.tag.clone())
            .collect();
        tags.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        done(tags)
    }

    fn defer_tag(&self, key: &TagKey, rec: TagRecord, checked: SystemTime) {
        self.0
            .state()
            .tags
            .insert(key.clone(), TagRecord { checked, ..rec });
    }

    fn approvals<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, Vec<Vec<u8>>> {
        let s = self.0.state();
        let list = s.approvals.get(d).into_iter().flatten();
        done(list.map(|(_, b)| b.clone()).collect())
    }

    fn add_approval(&self, d: Digest, id: String, bytes: Vec<u8>) -> StoreFuture<'_, String> {
        let mut s = self.0.state();
        let list = s.approvals.entry(d).or_default();
        let at = format!("memory: approvals of {d}, {id}");
        match list.iter_mut().find(|(i, _)| *i == id) {
            Some(slot) => slot.1 = bytes,
            None => list.push((id, bytes)),
        }
        done(at)
    }

    fn read_meta<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        done(self.0.state().meta.get(name).cloned())
    }

    fn write_meta<'a>(&'a self, name: &'a str, bytes: Vec<u8>) -> StoreFuture<'a, ()> {
        self.0.state().meta.insert(name.to_owned(), bytes);
        done(())
    }

    fn set_aside_meta<'a>(&'a self, name: &'a str) -> StoreFuture<'a, String> {
        let mut s = self.0.state();
        match s.meta.remove(name) {
            Some(b) => {
                let aside = format!("{name}.unreadable");
                s.meta.insert(aside.clone(), b);
                done(aside)
            }
            None => ready(Err(io::Error::from(io::ErrorKind::NotFound))).boxed(),
        }
    }

    fn probe(&self) -> StoreFuture<'_, ()> {
        done(())
    }
}

struct MemoryWriter {
    store: Arc<Inner>,
    digest: Digest,
    chunks: Arc<Chunks>,
    hasher: Hasher,
    written: u64,
}

impl BlobWriter for MemoryWriter {
    fn write(&mut self, chunk: Bytes) -> StoreFuture<'_, ()> {
        self.hasher.update(&chunk);
        self.written += chunk.len() as u64;
        self.chunks.push(chunk);
        done(())
    }

    fn written(&self) -> u64 {
        self.written
    }

    fn source(&self) -> Source {
        Source::Memory(self.chunks.clone())
    }

    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        ready(()).boxed()
    }

    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<u64, WriteError>> {
        let got = self.hasher.clone().finish();
        let result = if got == self.digest {
            self.store
                .state()
                .blobs
                .insert(self.digest, self.chunks.clone());
            self.store.index.record(&self.digest, self.written, false);
            self.store.evict();
            Ok(self.written)
        } else {
            Err(WriteError::Mismatch { got })
        };
        ready(result).boxed()
    }
}

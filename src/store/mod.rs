//! The store: content by digest, and what pullgate keeps about it (tags,
//! local approvals, base history). A trait, so that the filesystem
//! ([`FsStore`]), memory ([`MemoryStore`], for tests and for commands that
//! must not write) and, later, object storage serve alike.
//!
//! The shape follows pingora's cache storage: a lookup hands out a
//! [`BlobHandle`] (the filesystem's open file, so cached blobs go out with
//! `sendfile`, or bytes in memory); a write goes through a [`BlobWriter`]
//! that must [`finish`](BlobWriter::finish), which checks the digest and only
//! then makes the blob visible under it; a writer dropped before that
//! removes what it wrote. Nothing appears under a digest its bytes do not
//! hash to.
//!
//! Every method that may touch a disk (or, later, a network) is async, and
//! the filesystem runs those on tokio's blocking pool, never on a worker
//! thread. What a cached pull needs (`cached_manifest`, `cached_tag`,
//! `has_blob`) is answered from memory without blocking. Depends on `oci`,
//! `metrics`, `fsutil`.

pub mod bucket;
mod fs;
pub mod fsck;
pub mod imports;
mod index;
mod memory;
mod overlay;
mod shared;

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::oci::names::{Digest, RepoName, Tag};
use crate::oci::Manifest;

pub use bucket::Bucket;
pub use fs::FsStore;
pub use index::ReadGuard;
pub use memory::{Chunks, MemoryStore};
pub use overlay::Overlay;
pub use shared::fsck::{fsck_bucket, BucketReport};
pub use shared::{Limit as BucketLimit, SharedStore};

/// A store operation that may wait for a disk.
pub type StoreFuture<'a, T> = BoxFuture<'a, io::Result<T>>;

/// What a tag last resolved to, and when that was checked upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagRecord {
    pub digest: Digest,
    pub checked: SystemTime,
    /// The last digest policy approved for this tag (tag-drift protection).
    pub approved: Option<Digest>,
}

/// Identifies a tag: upstream, repository, tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TagKey {
    pub upstream: Arc<str>,
    pub repo: RepoName,
    pub tag: Tag,
}

/// A change to a tag record: the new record given the current one; `None`
/// removes it. It may run more than once (a shared store runs it again on
/// what another replica wrote in between).
pub type TagUpdate = Box<dyn FnMut(Option<TagRecord>) -> Option<TagRecord> + Send>;

/// A change to a metadata document, as [`TagUpdate`] is to a tag record.
pub type MetaUpdate = Box<dyn FnMut(Option<&[u8]>) -> Option<Vec<u8>> + Send>;

/// A blob held in a tier shared with other processes (the bucket of
/// gateway replicas) and not here: what a blob fetch reads instead of the
/// upstream.
pub struct SharedBlob {
    pub size: u64,
    pub body: futures_util::stream::BoxStream<'static, io::Result<Bytes>>,
    /// Where it comes from, for messages and metrics.
    pub from: Arc<str>,
}

/// Where a blob's bytes are, for reading.
#[derive(Clone)]
pub enum Source {
    /// An open file (committed, or a temp file being written): read with
    /// positioned reads on the blocking pool, or sent by the connection
    /// (`zerocopy`: `sendfile`, or a copy to a loopback peer).
    File(Arc<File>),
    /// Bytes in memory.
    Memory(Arc<Chunks>),
}

/// A stored blob, open for reading and kept from eviction while it lives.
pub struct BlobHandle {
    pub size: u64,
    pub source: Source,
    pub guard: ReadGuard,
}

/// Why a blob write did not commit.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the bytes hash to {got}, not to the digest they were written for")]
    Mismatch { got: Digest },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Writes one blob. Bytes are hashed as they are written; [`finish`]
/// commits them under their digest only when the hash matches. Dropping a
/// writer before `finish` aborts it and removes what was written.
///
/// [`finish`]: BlobWriter::finish
pub trait BlobWriter: Send {
    /// Appends `chunk`.
    fn write(&mut self, chunk: Bytes) -> StoreFuture<'_, ()>;
    /// Bytes written so far.
    fn written(&self) -> u64;
    /// Where readers find the bytes written so far (followers of a fetch).
    fn source(&self) -> Source;
    /// Checks the digest, makes the blob durable and visible; its size. On
    /// a mismatch nothing is kept.
    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<u64, WriteError>>;
    /// Gives up and removes what was written, off the async worker threads
    /// (dropping the writer does the same, wherever it is dropped).
    fn abort(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// Content by digest and the metadata kept with it.
pub trait Store: Send + Sync {
    /// Where the store is, for messages (`/var/lib/pullgate`, `memory`).
    fn location(&self) -> String;

    // ---- blobs (manifests are blobs too) -----------------------------------

    /// Whether a blob is held. From memory; never blocks.
    fn has_blob(&self, d: &Digest) -> bool;
    /// Opens a blob for reading, pinned against eviction.
    fn open<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, Option<BlobHandle>>;
    /// A blob that a shared tier holds (the bucket of gateway replicas),
    /// streamed; `None` when there is none or it does not hold it.
    fn shared_blob<'a>(&'a self, _d: &'a Digest) -> StoreFuture<'a, Option<SharedBlob>> {
        Box::pin(futures_util::future::ready(Ok(None)))
    }
    /// A writer for bytes that must hash to `d`.
    fn writer(&self, d: Digest) -> StoreFuture<'_, Box<dyn BlobWriter>>;
    /// Takes a blob found damaged out of the store, so that it is fetched
    /// again; the filesystem keeps its bytes under `quarantine/`.
    fn discard<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, ()>;
    /// Before a fetch from the upstream, in a store shared with other
    /// processes: takes the lease on fetching `d`, or, while another
    /// process holds it, waits for the blob it puts in the shared tier and
    /// returns that. `None`: fetch it here (the lease, when there is one,
    /// ends with the upload of what is fetched, or [`Store::release_fetch`]).
    fn lease_fetch<'a>(&'a self, _d: &'a Digest) -> StoreFuture<'a, Option<SharedBlob>> {
        Box::pin(futures_util::future::ready(Ok(None)))
    }
    /// Ends the lease of a fetch that failed.
    fn release_fetch(&self, _d: &Digest) {}
    /// Removes the shared tier's copy of `d` (it did not match its digest).
    fn discard_shared<'a>(&'a self, _d: &'a Digest) -> StoreFuture<'a, ()> {
        Box::pin(futures_util::future::ready(Ok(())))
    }
    /// The size of `d` in a shared tier, `None` when there is none or it
    /// does not hold it (a HEAD answered without the upstream).
    fn shared_size<'a>(&'a self, _d: &'a Digest) -> StoreFuture<'a, Option<u64>> {
        Box::pin(futures_util::future::ready(Ok(None)))
    }
    /// Keeps `d` from eviction (followers of a fetch being committed).
    fn pin(&self, d: &Digest) -> ReadGuard;
    /// Bytes held.
    fn size(&self) -> u64;

    // ---- manifests -----------------------------------------------------------

    /// A manifest from memory, if it is there.
    fn cached_manifest(&self, d: &Digest) -> Option<Arc<Manifest>>;
    /// A stored manifest. Bytes read back are hashed again; a corrupt copy
    /// is treated as absent.
    fn manifest<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, Option<Arc<Manifest>>>;
    /// Stores a manifest whose bytes the caller checked against its digest.
    fn put_manifest(&self, m: Arc<Manifest>) -> StoreFuture<'_, ()>;

    // ---- tags ----------------------------------------------------------------

    /// A tag record from memory, if it is there.
    fn cached_tag(&self, key: &TagKey) -> Option<TagRecord>;
    /// What a tag last resolved to.
    fn tag<'a>(&'a self, key: &'a TagKey) -> StoreFuture<'a, Option<TagRecord>>;
    /// Replaces a tag record with `f(current)`, one update at a time, so
    /// concurrent updates of different fields do not undo each other.
    fn update_tag<'a>(&'a self, key: &'a TagKey, f: TagUpdate) -> StoreFuture<'a, ()>;
    /// The tags held for a repository of an upstream, sorted (what an
    /// offline upstream's tag list answers).
    fn list_tags<'a>(&'a self, upstream: &'a str, repo: &'a RepoName) -> StoreFuture<'a, Vec<Tag>>;
    /// Remembers a tag in memory only, as checked at `checked`: used after
    /// an upstream failure so the next re-check waits a little.
    fn defer_tag(&self, key: &TagKey, rec: TagRecord, checked: SystemTime);

    // ---- approvals -----------------------------------------------------------

    /// The approvals recorded for `d` (`pullgate approve`), as written.
    fn approvals<'a>(&'a self, d: &'a Digest) -> StoreFuture<'a, Vec<Vec<u8>>>;
    /// Records an approval of `d` under `id`; says where it went.
    fn add_approval(&self, d: Digest, id: String, bytes: Vec<u8>) -> StoreFuture<'_, String>;

    // ---- metadata documents ------------------------------------------------

    /// A metadata document (`bases/history.json`), `None` when absent.
    fn read_meta<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Option<Vec<u8>>>;
    /// Replaces a metadata document whole.
    fn write_meta<'a>(&'a self, name: &'a str, bytes: Vec<u8>) -> StoreFuture<'a, ()>;
    /// Replaces a metadata document with `f(current)`, so that writers of
    /// a shared store merge instead of overwriting each other; what was
    /// written. Here: read, then write (one process per store).
    fn update_meta<'a>(
        &'a self,
        name: &'a str,
        mut f: MetaUpdate,
    ) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            let current = self.read_meta(name).await?;
            match f(current.as_deref()) {
                Some(next) => {
                    self.write_meta(name, next.clone()).await?;
                    Ok(Some(next))
                }
                None => Ok(None),
            }
        })
    }
    /// Moves an unreadable metadata document aside (never overwritten);
    /// says where it went.
    fn set_aside_meta<'a>(&'a self, name: &'a str) -> StoreFuture<'a, String>;

    /// Applies imports another process committed to this store (see
    /// [`imports`]); how many. Stores that nobody imports into have none.
    fn apply_imports(&self) -> StoreFuture<'_, usize> {
        Box::pin(futures_util::future::ready(Ok(0)))
    }

    /// Checks that the store takes writes (for `/readyz`).
    fn probe(&self) -> StoreFuture<'_, ()>;
}

/// The server's store as a command running beside it sees it: the
/// directory attached (no lock, no clean-up), in front of the shared
/// bucket when `[storage.s3]` names one (so an approval is seen by every
/// replica).
pub fn attach(storage: &crate::config::StorageConfig) -> io::Result<Arc<dyn Store>> {
    let local = FsStore::attach(&storage.path);
    Ok(match &storage.s3 {
        None => Arc::new(local),
        Some(s3) => Arc::new(SharedStore::new(
            local,
            Bucket::s3(s3)?,
            storage.tag_ttl,
            // Commands leave eviction to the servers.
            BucketLimit {
                max_size: None,
                min_idle: s3.min_idle,
            },
            Arc::new(crate::metrics::Metrics::new()),
        )),
    })
}

/// Writes a whole blob through a writer: a small helper for tests, bundles
/// and manifests-as-blobs.
pub async fn put_blob(store: &dyn Store, d: Digest, bytes: Bytes) -> Result<u64, WriteError> {
    let mut w = store.writer(d).await?;
    w.write(bytes).await?;
    w.finish().await
}

#[cfg(test)]
mod tests;

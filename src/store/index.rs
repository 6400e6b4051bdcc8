//! What every store keeps in memory about its blobs: sizes, last access,
//! and who is reading them, so that eviction (least recently used first,
//! beyond `max_size`) never removes a blob under a reader.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::metrics::Metrics;
use crate::oci::names::Digest;

/// Only re-stamp a blob's access time when it is older than this (seconds).
pub const ACCESS_GRANULARITY: u64 = 60;

pub struct Entry {
    pub size: u64,
    /// Unix seconds of the last read.
    pub last_access: u64,
    /// Manifests are small and needed to answer tags: never evicted.
    pub manifest: bool,
}

#[derive(Default)]
pub struct Inner {
    pub blobs: HashMap<Digest, Entry>,
    pub total: u64,
    /// Blobs being read right now, with their reader counts.
    readers: HashMap<Digest, usize>,
}

/// The blob index of one store.
pub struct Index {
    inner: Arc<Mutex<Inner>>,
    max_size: Option<u64>,
    metrics: Arc<Metrics>,
}

/// Keeps a blob from eviction while it is being served.
pub struct ReadGuard {
    index: Arc<Mutex<Inner>>,
    digest: Digest,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut idx = lock(&self.index);
        if let Some(n) = idx.readers.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                idx.readers.remove(&self.digest);
            }
        }
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // The index holds plain numbers: a panic elsewhere leaves it usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl Index {
    pub fn new(max_size: Option<u64>, metrics: Arc<Metrics>) -> Index {
        metrics
            .store_max_size
            .set(max_size.map_or(0, |m| i64::try_from(m).unwrap_or(i64::MAX)));
        Index {
            inner: Arc::new(Mutex::new(Inner::default())),
            max_size,
            metrics,
        }
    }

    /// Adds what a store found at start-up.
    pub fn load(&self, blobs: impl IntoIterator<Item = (Digest, Entry)>) {
        let mut idx = lock(&self.inner);
        for (d, e) in blobs {
            idx.total = idx.total.saturating_add(e.size);
            idx.blobs.insert(d, e);
        }
        self.metrics.store_size.set(idx.total as i64);
    }

    pub fn contains(&self, d: &Digest) -> bool {
        lock(&self.inner).blobs.contains_key(d)
    }

    /// Whether `d` is indexed as a manifest.
    pub fn is_manifest(&self, d: &Digest) -> bool {
        lock(&self.inner).blobs.get(d).is_some_and(|e| e.manifest)
    }

    pub fn total(&self) -> u64 {
        lock(&self.inner).total
    }

    pub fn digests(&self) -> Vec<Digest> {
        lock(&self.inner).blobs.keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        lock(&self.inner).blobs.len()
    }

    /// Pins `d` if it is indexed (or whatever it is, with `always`).
    pub fn pin(&self, d: &Digest, always: bool) -> Option<ReadGuard> {
        let mut idx = lock(&self.inner);
        if !always && !idx.blobs.contains_key(d) {
            return None;
        }
        *idx.readers.entry(*d).or_insert(0) += 1;
        Some(ReadGuard {
            index: self.inner.clone(),
            digest: *d,
        })
    }

    /// Notes a read; true when the access time moved enough to persist.
    pub fn touch(&self, d: &Digest) -> bool {
        let now = unix(SystemTime::now());
        let mut idx = lock(&self.inner);
        match idx.blobs.get_mut(d) {
            Some(e) if now.saturating_sub(e.last_access) >= ACCESS_GRANULARITY => {
                e.last_access = now;
                true
            }
            _ => false,
        }
    }

    /// Records a blob just committed.
    pub fn record(&self, d: &Digest, size: u64, manifest: bool) {
        let mut idx = lock(&self.inner);
        let now = unix(SystemTime::now());
        let old = idx.blobs.insert(
            *d,
            Entry {
                size,
                last_access: now,
                manifest,
            },
        );
        if let Some(old) = old {
            idx.total = idx.total.saturating_sub(old.size);
        }
        idx.total = idx.total.saturating_add(size);
        self.metrics.store_size.set(idx.total as i64);
    }

    /// Forgets a blob (removed behind the store's back).
    pub fn forget(&self, d: &Digest) {
        let mut idx = lock(&self.inner);
        if let Some(e) = idx.blobs.remove(d) {
            idx.total = idx.total.saturating_sub(e.size);
            self.metrics.store_size.set(idx.total as i64);
        }
    }

    /// Evicts least recently used blobs until the store fits `max_size`:
    /// `remove` deletes one blob's bytes (false: it could not). Blobs being
    /// read are skipped, and each is checked again under the lock.
    pub fn evict(&self, mut remove: impl FnMut(&Digest) -> bool) {
        let Some(max) = self.max_size else { return };
        let victims: Vec<(Digest, u64)> = {
            let idx = lock(&self.inner);
            if idx.total <= max {
                return;
            }
            let mut candidates: Vec<(&Digest, &Entry)> = idx
                .blobs
                .iter()
                .filter(|(d, e)| !e.manifest && !idx.readers.contains_key(*d))
                .collect();
            candidates.sort_by_key(|(_, e)| e.last_access);
            let mut excess = idx.total - max;
            let mut out = Vec::new();
            for (d, e) in candidates {
                if excess == 0 {
                    break;
                }
                out.push((*d, e.size));
                excess = excess.saturating_sub(e.size);
            }
            out
        };
        for (d, size) in victims {
            let mut idx = lock(&self.inner);
            if idx.readers.contains_key(&d) || !idx.blobs.contains_key(&d) {
                continue;
            }
            if !remove(&d) {
                continue;
            }
            // The entry's own size: it may have been recorded again since
            // the victims were chosen.
            let removed = idx.blobs.remove(&d).map_or(size, |e| e.size);
            idx.total = idx.total.saturating_sub(removed);
            self.metrics.store_size.set(idx.total as i64);
            self.metrics
                .evictions
                .with_label_values(&["max_size"])
                .inc();
            tracing::info!(digest = %d, size, "evicted blob (store over max_size)");
        }
    }

    /// Sets a blob's last access (tests of eviction order).
    #[cfg(test)]
    pub fn set_last_access(&self, d: &Digest, at: u64) {
        if let Some(e) = lock(&self.inner).blobs.get_mut(d) {
            e.last_access = at;
        }
    }
}

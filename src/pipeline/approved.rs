//! The blobs that approved manifests reference, per name and generation:
//! what the blob gate lets through under policies that check content.

use super::context::Generation;
use crate::oci::names::Digest;
use crate::oci::Manifest;
use crate::verify::Memo;

pub struct Approved {
    /// Each blob with the size its approved manifest gives it.
    blobs: Memo<Option<u64>>,
    /// Manifests whose blobs are in `blobs`; emptied with it.
    manifests: Memo<()>,
}

impl Default for Approved {
    fn default() -> Approved {
        Approved {
            blobs: Memo::new(1_000_000),
            manifests: Memo::new(1_000_000),
        }
    }
}

impl Approved {
    /// Notes the blobs an approved manifest references (config and layers;
    /// for a signature manifest, its payloads), once per manifest and name.
    pub fn record(&self, gen: &Generation, name: &str, m: &Manifest) {
        if self.manifests.get(&m.digest, gen.id, name).is_some() {
            return;
        }
        for (blob, size) in m.referenced_blob_sizes() {
            if self.blobs.insert(blob, gen.id, name, size) {
                // Emptied for size: the manifests recorded so far must be
                // recorded again at their next pull.
                self.manifests.clear();
            }
        }
        self.manifests.insert(m.digest, gen.id, name, ());
    }

    /// Whether an approved manifest of `name` references `blob`, and the
    /// size it gives it (`Some(None)`: approved, no size known).
    pub fn lookup(&self, blob: &Digest, gen: &Generation, name: &str) -> Option<Option<u64>> {
        self.blobs.get(blob, gen.id, name)
    }

    /// Forgets everything: approvals are reached again with new bases.
    pub fn clear(&self) {
        self.blobs.clear();
        self.manifests.clear();
    }
}

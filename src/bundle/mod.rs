//! Bundles: what carries approved images across an air gap.
//!
//! A bundle is a tar of one OCI image layout (so `skopeo copy
//! oci-archive:BUNDLE.tar:<reference>` reads it) with two files in front:
//!
//! ```text
//! pullgate-bundle.json    the bundle manifest: references, digests, sizes, time, exporter
//! pullgate-bundle.sig     its signature (cosign simple-signing), when signed
//! oci-layout              {"imageLayoutVersion": "1.0.0"}
//! index.json              one entry per reference, org.opencontainers.image.ref.name = the full reference
//! blobs/sha256/<hex>      every manifest and blob, once
//! ```
//!
//! The bundle manifest comes first so that an import checks the signature
//! before it reads anything else, and knows every entry that may follow
//! (its digest and size) before it arrives. The format is pullgate's own:
//! nothing in the field carries verified signatures with the images, so
//! there is no format to follow. Depends on `oci`, `keys`, `verify`
//! (cosign formats), `store`, `pipeline` (the policy both ends apply).

pub mod export;
pub mod import;
mod progress;

use base64::Engine as _;

use crate::keys::{PrivateKey, PublicKey};
use crate::oci::names::Digest;
use crate::verify::cosign;

/// The bundle manifest's name in the tar.
pub const MANIFEST_FILE: &str = "pullgate-bundle.json";
/// The signature's name in the tar.
pub const SIGNATURE_FILE: &str = "pullgate-bundle.sig";
/// The version of the format this pullgate writes and reads.
pub const FORMAT: u32 = 1;
/// What the bundle signature's payload names as its `docker-reference`.
pub const SIGNED_REFERENCE: &str = "pullgate-bundle";

/// Largest bundle manifest read.
pub const MAX_MANIFEST_FILE: u64 = 16 * 1024 * 1024;
/// Largest `index.json` read.
pub const MAX_INDEX: u64 = 4 * 1024 * 1024;
/// Largest signature file read.
pub const MAX_SIGNATURE: u64 = 64 * 1024;

/// The bundle manifest (`pullgate-bundle.json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BundleManifest {
    /// [`FORMAT`].
    pub pullgate_bundle: u32,
    /// When it was made (RFC 3339, UTC).
    pub created: String,
    /// Who made it: the pullgate version and host.
    pub exporter: String,
    /// The images asked for, each as approved by the exporting site.
    pub images: Vec<Entry>,
    /// Signature artifacts by tag: legacy `.sig` manifests, referrers
    /// fallback indexes (`sha256-<hex>`).
    pub artifacts: Vec<Entry>,
    /// Every blob in the tar (manifests too), once.
    pub blobs: Vec<Blob>,
}

/// A full reference and the manifest it names.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Entry {
    /// `docker.io/library/alpine:3.20`, or `...@sha256:...` for one asked
    /// for by digest.
    pub reference: String,
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
}

/// One blob of the tar.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Blob {
    pub digest: Digest,
    pub size: u64,
    /// The media type, when the blob is a manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
}

/// The signature file (`pullgate-bundle.sig`): a simple-signing payload
/// naming the bundle manifest's digest, and the signature over it, base64
/// (the shape of a local approval).
pub type Signature = crate::verify::approvals::Approval;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Signs the bundle manifest's bytes.
pub fn sign(manifest: &[u8], key: &PrivateKey) -> Vec<u8> {
    let payload = cosign::payload(SIGNED_REFERENCE, &Digest::of(manifest));
    let sig = key.sign(&payload);
    let s = Signature {
        payload: B64.encode(&payload),
        signature: B64.encode(sig),
    };
    serde_json::to_vec_pretty(&s).expect("JSON of strings")
}

/// Checks a signature file against the bundle manifest's bytes: the index
/// of the key in `keys` that verifies it, or why none does.
pub fn check_signature(
    manifest: &[u8],
    signature: &[u8],
    keys: &[&PublicKey],
) -> Result<usize, String> {
    let s: Signature = serde_json::from_slice(signature)
        .map_err(|e| format!("{SIGNATURE_FILE} is not a pullgate bundle signature: {e}"))?;
    let payload = B64
        .decode(s.payload.trim())
        .map_err(|_| format!("{SIGNATURE_FILE}: the payload is not base64"))?;
    let layer = cosign::SignatureLayer {
        payload: Digest::of(&payload),
        size: payload.len() as u64,
        signature: s.signature,
        keyless: None,
    };
    let identity = serde_json::from_slice::<serde_json::Value>(&payload)
        .ok()
        .and_then(|v| {
            v["critical"]["identity"]["docker-reference"]
                .as_str()
                .map(str::to_owned)
        });
    if identity.as_deref() != Some(SIGNED_REFERENCE) {
        return Err(format!(
            "{SIGNATURE_FILE} does not sign a pullgate bundle (its payload names {identity:?})"
        ));
    }
    cosign::check(&layer, &payload, &Digest::of(manifest), keys).map_err(|e| match e {
        cosign::Rejected::OtherDigest(d) => format!(
            "{SIGNATURE_FILE} signs another bundle manifest ({d}), not this one ({}): a swapped or replayed signature",
            Digest::of(manifest)
        ),
        cosign::Rejected::NoKey => {
            format!("{SIGNATURE_FILE} does not verify with any key [bundles] signed_by names")
        }
        e => format!("{SIGNATURE_FILE}: {e}"),
    })
}

/// The path of a blob in the layout.
pub fn blob_path(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// `created` as unix seconds.
pub fn created_secs(m: &BundleManifest) -> Result<u64, String> {
    let t = humantime::parse_rfc3339(&m.created).map_err(|e| {
        format!(
            "{MANIFEST_FILE}: created {:?} is not an RFC 3339 time: {e}",
            m.created
        )
    })?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0))
}

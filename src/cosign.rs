//! The cosign signature wire format, in one place.
//!
//! A legacy cosign signature of image digest `sha256:<hex>` lives in the same
//! repository under the tag `sha256-<hex>.sig`: an OCI image manifest whose
//! layers are simple-signing payload blobs
//! (`application/vnd.dev.cosign.simplesigning.v1+json`), each carrying the
//! base64 signature over the exact payload bytes in the annotation
//! `dev.cosignproject.cosign/signature`. The payload names the digest it
//! signs in `critical.image.docker-manifest-digest`.
//!
//! This module parses and checks that format (and writes it, for tests and
//! for signatures pullgate makes itself). Fetching is the caller's job.
//! Depends on `names`, `keys`.

use base64::Engine as _;
use serde_json::json;

use crate::keys::PublicKey;
use crate::names::Digest;

pub const SIMPLESIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
pub const SIGNATURE_TYPE: &str = "cosign container image signature";

/// At most this many signature layers are looked at per verdict.
pub const MAX_SIGNATURE_LAYERS: usize = 32;

/// Payloads larger than this are not fetched.
pub const MAX_PAYLOAD_SIZE: u64 = 64 * 1024;

/// The tag holding legacy signatures of `digest`.
pub fn signature_tag(digest: &Digest) -> String {
    format!("sha256-{}.sig", digest.hex())
}

/// One signature layer of a signature manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureLayer {
    /// The payload blob.
    pub payload: Digest,
    pub size: u64,
    /// The signature annotation as written (base64).
    pub signature: String,
}

/// Reads the signature layers of a `.sig` manifest. Layers of other media
/// types, without a signature annotation or with a bad descriptor are
/// skipped; more than [`MAX_SIGNATURE_LAYERS`] are ignored.
pub fn parse_signature_manifest(bytes: &[u8]) -> Result<Vec<SignatureLayer>, String> {
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| format!("signature manifest is not JSON: {e}"))?;
    let layers = v["layers"]
        .as_array()
        .ok_or("signature manifest has no layers")?;
    let mut out = Vec::new();
    for l in layers.iter().take(MAX_SIGNATURE_LAYERS) {
        if l["mediaType"] != SIMPLESIGNING_MEDIA_TYPE {
            continue;
        }
        let (Some(digest), Some(size), Some(sig)) = (
            l["digest"].as_str().and_then(|d| d.parse().ok()),
            l["size"].as_u64(),
            l["annotations"][SIGNATURE_ANNOTATION].as_str(),
        ) else {
            continue;
        };
        out.push(SignatureLayer {
            payload: digest,
            size,
            signature: sig.to_owned(),
        });
    }
    Ok(out)
}

/// Why one signature layer does not count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("payload is {0} bytes, over the {MAX_PAYLOAD_SIZE}-byte limit")]
    PayloadTooLarge(u64),
    #[error("payload bytes do not match their descriptor's digest")]
    PayloadMismatch,
    #[error("payload is not a simple-signing JSON document")]
    NotSimpleSigning,
    #[error("payload signs {0}, not this image")]
    OtherDigest(Digest),
    #[error("signature annotation is not valid base64")]
    BadBase64,
    #[error("no trusted key verifies the signature")]
    NoKey,
}

/// The digest a simple-signing payload signs.
pub fn signed_digest(payload: &[u8]) -> Result<Digest, Rejected> {
    let v: serde_json::Value =
        serde_json::from_slice(payload).map_err(|_| Rejected::NotSimpleSigning)?;
    v["critical"]["image"]["docker-manifest-digest"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .ok_or(Rejected::NotSimpleSigning)
}

/// Checks one signature layer whose payload bytes were fetched: the bytes
/// match the descriptor, the payload signs `image`, and one of `keys`
/// verifies the signature. Returns the index of that key.
pub fn check(
    layer: &SignatureLayer,
    payload: &[u8],
    image: &Digest,
    keys: &[&PublicKey],
) -> Result<usize, Rejected> {
    if layer.size > MAX_PAYLOAD_SIZE {
        return Err(Rejected::PayloadTooLarge(layer.size));
    }
    if Digest::of(payload) != layer.payload || payload.len() as u64 != layer.size {
        return Err(Rejected::PayloadMismatch);
    }
    let signed = signed_digest(payload)?;
    if signed != *image {
        return Err(Rejected::OtherDigest(signed));
    }
    let sig = base64::engine::general_purpose::STANDARD
        .decode(layer.signature.trim())
        .map_err(|_| Rejected::BadBase64)?;
    keys.iter()
        .position(|k| k.verify(payload, &sig).is_ok())
        .ok_or(Rejected::NoKey)
}

/// A simple-signing payload for `image`, as cosign writes it.
pub fn payload(docker_reference: &str, image: &Digest) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": image.to_string()},
            "type": SIGNATURE_TYPE,
        },
        "optional": null,
    }))
    .expect("JSON of plain values")
}

/// A `.sig` manifest over `(payload, signature)` pairs, plus the config blob
/// it references. Returns (manifest, config).
pub fn signature_manifest(signatures: &[(Vec<u8>, Vec<u8>)]) -> (Vec<u8>, Vec<u8>) {
    let config = serde_json::to_vec(&json!({
        "architecture": "", "os": "", "config": {},
        "rootfs": {"type": "layers", "diff_ids": signatures.iter().map(|(p, _)| Digest::of(p).to_string()).collect::<Vec<_>>()},
    }))
    .expect("JSON of plain values");
    let layers: Vec<_> = signatures
        .iter()
        .map(|(p, s)| {
            json!({
                "mediaType": SIMPLESIGNING_MEDIA_TYPE,
                "size": p.len(),
                "digest": Digest::of(p).to_string(),
                "annotations": {SIGNATURE_ANNOTATION: base64::engine::general_purpose::STANDARD.encode(s)},
            })
        })
        .collect();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": config.len(), "digest": Digest::of(&config).to_string()},
        "layers": layers,
    }))
    .expect("JSON of plain values");
    (manifest, config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::tests::{ecdsa_key, ecdsa_pem, ed25519_key, ed25519_pem};
    use signature::Signer as _;

    fn image() -> Digest {
        Digest::of(b"an image manifest")
    }

    fn layer_for(payload: &[u8], sig: &[u8]) -> SignatureLayer {
        let (manifest, _) = signature_manifest(&[(payload.to_vec(), sig.to_vec())]);
        parse_signature_manifest(&manifest).unwrap().remove(0)
    }

    #[test]
    fn a_good_signature_checks_with_either_scheme() {
        let p = payload("registry.example/app", &image());
        let ec = ecdsa_key(1);
        let ed = ed25519_key(2);
        let keys = [
            PublicKey::from_pem(&ed25519_pem(&ed)).unwrap(),
            PublicKey::from_pem(&ecdsa_pem(&ec)).unwrap(),
        ];
        let key_refs: Vec<&PublicKey> = keys.iter().collect();
        let ec_sig: p256::ecdsa::Signature = ec.sign(&p);
        let layer = layer_for(&p, ec_sig.to_der().as_bytes());
        assert_eq!(check(&layer, &p, &image(), &key_refs), Ok(1));
        let ed_sig = ed.sign(&p);
        let layer = layer_for(&p, &ed_sig.to_bytes());
        assert_eq!(check(&layer, &p, &image(), &key_refs), Ok(0));
    }

    #[test]
    fn payload_format_matches_cosign() {
        let p = payload("ghcr.io/acme/app", &image());
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["critical"]["type"], SIGNATURE_TYPE);
        assert_eq!(
            v["critical"]["image"]["docker-manifest-digest"],
            image().to_string()
        );
        assert_eq!(
            v["critical"]["identity"]["docker-reference"],
            "ghcr.io/acme/app"
        );
        assert!(v["optional"].is_null());
        assert_eq!(signed_digest(&p), Ok(image()));
        assert_eq!(
            signature_tag(&image()),
            format!("sha256-{}.sig", image().hex())
        );
    }

    #[test]
    fn forged_and_replayed_signatures_are_rejected() {
        let k = ecdsa_key(5);
        let keys = [PublicKey::from_pem(&ecdsa_pem(&k)).unwrap()];
        let key_refs: Vec<&PublicKey> = keys.iter().collect();
        let p = payload("r/app", &image());
        let sig: p256::ecdsa::Signature = k.sign(&p);
        let good = layer_for(&p, &sig.to_bytes());

        // Payload bytes that do not match the descriptor.
        let mut tampered = p.clone();
        tampered[5] ^= 1;
        assert_eq!(
            check(&good, &tampered, &image(), &key_refs),
            Err(Rejected::PayloadMismatch)
        );
        // A signature of another image, replayed under this image's tag.
        let other = Digest::of(b"another image");
        let other_payload = payload("r/app", &other);
        let other_sig: p256::ecdsa::Signature = k.sign(&other_payload);
        let replayed = layer_for(&other_payload, &other_sig.to_bytes());
        assert_eq!(
            check(&replayed, &other_payload, &image(), &key_refs),
            Err(Rejected::OtherDigest(other))
        );
        // Another key.
        let stranger = [PublicKey::from_pem(&ecdsa_pem(&ecdsa_key(6))).unwrap()];
        let s: Vec<&PublicKey> = stranger.iter().collect();
        assert_eq!(check(&good, &p, &image(), &s), Err(Rejected::NoKey));
        // Truncated base64.
        let mut cut = good.clone();
        cut.signature.truncate(cut.signature.len() - 3);
        assert_eq!(
            check(&cut, &p, &image(), &key_refs),
            Err(Rejected::BadBase64)
        );
        // Not simple signing at all.
        let junk = b"not json".to_vec();
        let junk_layer = layer_for(&junk, &sig.to_bytes());
        assert_eq!(
            check(&junk_layer, &junk, &image(), &key_refs),
            Err(Rejected::NotSimpleSigning)
        );
        // Oversized payload descriptors are not even looked at.
        let mut big = good.clone();
        big.size = MAX_PAYLOAD_SIZE + 1;
        assert_eq!(
            check(&big, &p, &image(), &key_refs),
            Err(Rejected::PayloadTooLarge(MAX_PAYLOAD_SIZE + 1))
        );
    }

    #[test]
    fn malformed_signature_manifests_are_errors_or_skipped_layers() {
        assert!(parse_signature_manifest(b"<html>").is_err());
        assert!(parse_signature_manifest(b"{}").is_err());
        let m = serde_json::to_vec(&json!({"layers": [
            {"mediaType": "application/octet-stream", "digest": Digest::of(b"x").to_string(), "size": 1},
            {"mediaType": SIMPLESIGNING_MEDIA_TYPE, "digest": "sha256:bad", "size": 1,
             "annotations": {SIGNATURE_ANNOTATION: "AAAA"}},
            {"mediaType": SIMPLESIGNING_MEDIA_TYPE, "digest": Digest::of(b"x").to_string(), "size": 1},
        ]}))
        .unwrap();
        assert_eq!(parse_signature_manifest(&m).unwrap(), vec![]);
        let many: Vec<_> = (0..500)
            .map(|i| json!({"mediaType": SIMPLESIGNING_MEDIA_TYPE, "digest": Digest::of(&[i as u8]).to_string(), "size": 1, "annotations": {SIGNATURE_ANNOTATION: "AAAA"}}))
            .collect();
        let m = serde_json::to_vec(&json!({"layers": many})).unwrap();
        assert_eq!(
            parse_signature_manifest(&m).unwrap().len(),
            MAX_SIGNATURE_LAYERS
        );
    }
}

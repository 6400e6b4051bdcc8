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
//! cosign v3 attaches a sigstore bundle instead, as an OCI 1.1 referrer of
//! the image (found through the referrers API, or the `sha256-<hex>` tag on
//! registries without it): a DSSE envelope whose signature covers the DSSE
//! pre-authentication encoding of an in-toto statement naming the image's
//! digest as its subject.
//!
//! This module parses and checks both formats (and writes them, for tests
//! and for signatures pullgate makes itself). Fetching is the caller's job.
//! Depends on `oci`, `keys`.

use base64::Engine as _;
use serde_json::json;

use crate::keys::PublicKey;
use crate::oci::names::Digest;

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
    /// A keyless signature's certificate annotations, when it has them.
    pub keyless: Option<KeylessAnnotations>,
}

/// What cosign writes on a layer signed keyless.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeylessAnnotations {
    /// `dev.sigstore.cosign/certificate` (PEM).
    pub certificate: String,
    /// `dev.sigstore.cosign/chain` (PEM).
    pub chain: Option<String>,
    /// `dev.sigstore.cosign/bundle`: the log's SET and entry (JSON).
    pub rekor_bundle: Option<String>,
}

/// What the cosign formats read of a manifest (a `.sig` manifest, a bundle
/// referrer, a referrers index). Lenient where cosign is: a descriptor that
/// cannot be read is skipped, not fatal to the others.
#[derive(serde::Deserialize)]
struct View<'a> {
    #[serde(rename = "artifactType", default)]
    artifact_type: Option<String>,
    #[serde(borrow, default)]
    layers: Option<Vec<&'a serde_json::value::RawValue>>,
    #[serde(borrow, default)]
    manifests: Option<Vec<&'a serde_json::value::RawValue>>,
    #[serde(default)]
    config: Option<serde::de::IgnoredAny>,
}

/// One descriptor of a [`View`].
#[derive(serde::Deserialize)]
struct Desc {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(rename = "artifactType", default)]
    artifact_type: Option<String>,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    annotations: Option<std::collections::HashMap<String, String>>,
}

impl Desc {
    fn digest(&self) -> Option<Digest> {
        self.digest.as_deref()?.parse().ok()
    }
}

fn view(bytes: &[u8]) -> Option<View<'_>> {
    serde_json::from_slice(bytes).ok()
}

/// The descriptors of a list, those that can be read.
fn descs<'a>(list: &'a [&'a serde_json::value::RawValue]) -> impl Iterator<Item = Desc> + 'a {
    list.iter()
        .filter_map(|raw| serde_json::from_str::<Desc>(raw.get()).ok())
}

/// Reads the signature layers of a `.sig` manifest. Layers of other media
/// types, without a signature annotation or with a bad descriptor are
/// skipped; more than [`MAX_SIGNATURE_LAYERS`] are ignored.
pub fn parse_signature_manifest(bytes: &[u8]) -> Result<Vec<SignatureLayer>, String> {
    let v: View = serde_json::from_slice(bytes)
        .map_err(|e| format!("signature manifest is not JSON: {e}"))?;
    let layers = v.layers.ok_or("signature manifest has no layers")?;
    let mut out = Vec::new();
    for l in descs(&layers[..layers.len().min(MAX_SIGNATURE_LAYERS)]) {
        if l.media_type.as_deref() != Some(SIMPLESIGNING_MEDIA_TYPE) {
            continue;
        }
        let sig = l
            .annotations
            .as_ref()
            .and_then(|a| a.get(SIGNATURE_ANNOTATION));
        let (Some(digest), Some(size), Some(sig)) = (l.digest(), l.size, sig) else {
            continue;
        };
        let a = l.annotations.as_ref();
        let get = |k: &str| a.and_then(|a| a.get(k)).cloned();
        out.push(SignatureLayer {
            payload: digest,
            size,
            signature: sig.clone(),
            keyless: get("dev.sigstore.cosign/certificate").map(|certificate| KeylessAnnotations {
                certificate,
                chain: get("dev.sigstore.cosign/chain"),
                rekor_bundle: get("dev.sigstore.cosign/bundle"),
            }),
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

// ---- cosign v3: sigstore bundles attached as OCI referrers ------------------

/// The artifact type (and layer media type) of a sigstore bundle.
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";

/// The payload type of a DSSE envelope holding an in-toto statement.
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

/// Largest bundle read.
pub const MAX_BUNDLE_SIZE: u64 = 256 * 1024;

/// The tag that lists referrers when a registry has no referrers API.
pub fn referrers_tag(digest: &Digest) -> String {
    format!("sha256-{}", digest.hex())
}

/// DSSE's pre-authentication encoding: what a DSSE signature signs.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Checks a sigstore bundle: a DSSE envelope over an in-toto statement whose
/// subject is `image`, signed by one of `keys`. Returns that key's index.
pub fn check_bundle(bundle: &[u8], image: &Digest, keys: &[&PublicKey]) -> Result<usize, Rejected> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let v: serde_json::Value =
        serde_json::from_slice(bundle).map_err(|_| Rejected::NotSimpleSigning)?;
    let env = &v["dsseEnvelope"];
    let payload_type = env["payloadType"]
        .as_str()
        .ok_or(Rejected::NotSimpleSigning)?;
    if payload_type != IN_TOTO_PAYLOAD_TYPE {
        return Err(Rejected::NotSimpleSigning);
    }
    let payload = env["payload"]
        .as_str()
        .and_then(|p| b64.decode(p).ok())
        .ok_or(Rejected::BadBase64)?;
    let statement: serde_json::Value =
        serde_json::from_slice(&payload).map_err(|_| Rejected::NotSimpleSigning)?;
    let subjects: Vec<&str> = statement["subject"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["digest"]["sha256"].as_str())
        .collect();
    if !subjects.iter().any(|h| *h == image.hex()) {
        let other = subjects
            .first()
            .and_then(|h| format!("sha256:{h}").parse().ok())
            .ok_or(Rejected::NotSimpleSigning)?;
        return Err(Rejected::OtherDigest(other));
    }
    let signed = pae(payload_type, &payload);
    let mut saw_signature = false;
    for sig in env["signatures"]
        .as_array()
        .into_iter()
        .flatten()
        .take(MAX_SIGNATURE_LAYERS)
    {
        let Some(sig) = sig["sig"].as_str().and_then(|s| b64.decode(s).ok()) else {
            continue;
        };
        saw_signature = true;
        if let Some(i) = keys.iter().position(|k| k.verify(&signed, &sig).is_ok()) {
            return Ok(i);
        }
    }
    Err(if saw_signature {
        Rejected::NoKey
    } else {
        Rejected::BadBase64
    })
}

/// Whether a sigstore bundle carries a certificate (a keyless signature)
/// rather than a public-key hint.
pub fn bundle_has_certificate(bundle: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bundle) else {
        return false;
    };
    let m = &v["verificationMaterial"];
    m.get("certificate").is_some() || m.get("x509CertificateChain").is_some()
}

/// A sigstore bundle signing `image` with `sign` (tests and tools).
pub fn bundle(image: &Digest, name: &str, sign: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let statement = serde_json::to_vec(&json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": name, "digest": {"sha256": image.hex()}}],
        "predicateType": "https://sigstore.dev/cosign/sign/v1",
        "predicate": {},
    }))
    .expect("JSON of plain values");
    let sig = sign(&pae(IN_TOTO_PAYLOAD_TYPE, &statement));
    serde_json::to_vec(&json!({
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": ""}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": b64.encode(&statement),
            "payloadType": IN_TOTO_PAYLOAD_TYPE,
            "signatures": [{"sig": b64.encode(sig), "keyid": ""}],
        },
    }))
    .expect("JSON of plain values")
}

/// An OCI 1.1 referrer manifest carrying `bundle` for the subject. Returns
/// (manifest, config); the config is the empty descriptor's `{}`.
pub fn bundle_manifest(
    subject: &Digest,
    subject_size: usize,
    subject_type: &str,
    bundle: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let config = b"{}".to_vec();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": BUNDLE_MEDIA_TYPE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "size": 2, "digest": Digest::of(&config).to_string()},
        "layers": [{"mediaType": BUNDLE_MEDIA_TYPE, "size": bundle.len(), "digest": Digest::of(bundle).to_string()}],
        "subject": {"mediaType": subject_type, "size": subject_size, "digest": subject.to_string()},
    }))
    .expect("JSON of plain values");
    (manifest, config)
}

/// Whether a manifest is a signature artifact (a sigstore bundle referrer),
/// which is served whenever its name is allowed.
pub fn is_bundle_manifest(manifest: &[u8]) -> bool {
    view(manifest).is_some_and(|v| v.artifact_type.as_deref() == Some(BUNDLE_MEDIA_TYPE))
}

/// Whether a manifest is content that cannot run by itself: an image
/// manifest none of whose layers is a filesystem layer, or an index (the
/// referrers list of a registry without the referrers API), whose
/// manifests are checked on their own when fetched. Signature, attestation
/// and SBOM manifests are served without a signature of their own;
/// anything runnable has to pass the policy.
pub fn is_signature_artifact(manifest: &[u8]) -> bool {
    let Some(v) = view(manifest) else {
        return false;
    };
    if v.manifests.is_some() {
        return v.layers.is_none() && v.config.is_none();
    }
    let Some(layers) = v.layers else {
        return false;
    };
    let types: Vec<Option<String>> = layers
        .iter()
        .map(|raw| {
            serde_json::from_str::<Desc>(raw.get())
                .ok()
                .and_then(|d| d.media_type)
        })
        .collect();
    !types.is_empty()
        && types.iter().all(|t| {
            let t = t.as_deref().unwrap_or("");
            !t.is_empty()
                && !t.starts_with("application/vnd.oci.image.layer.")
                && !t.starts_with("application/vnd.docker.image.rootfs.")
        })
}

/// The bundle layer of a referrer manifest: (digest, size).
pub fn bundle_layer(manifest: &[u8]) -> Option<(Digest, u64)> {
    let layers = view(manifest)?.layers?;
    let l = descs(&layers).find(|l| l.media_type.as_deref() == Some(BUNDLE_MEDIA_TYPE))?;
    Some((l.digest()?, l.size?))
}

/// Bundle referrers listed in a referrers index: manifest digests.
pub fn bundle_referrers(index: &[u8]) -> Vec<Digest> {
    let Some(list) = view(index).and_then(|v| v.manifests) else {
        return Vec::new();
    };
    descs(&list)
        .filter(|m| m.artifact_type.as_deref() == Some(BUNDLE_MEDIA_TYPE))
        .filter_map(|m| m.digest())
        .take(MAX_SIGNATURE_LAYERS)
        .collect()
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

    /// Written once by this module's tests (fixed-seed keys) and pinned
    /// here, so a change to the format or the checks cannot go unnoticed.
    mod vectors {
        pub const ECDSA_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEb/A7lJJBzh2t1DUZ5pYOCoW0Gmmg\nXDKBA6orzhWUyhY8T3U6Vb8B3FP2wLDH7ueLQMb/fSWpbiKCuYnO9xwUSg==\n-----END PUBLIC KEY-----\n";
        pub const ED25519_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAgTl3Dqh9F19Wo1Rmw0x+zMuNipG07jeiXfYPW4/Js5Q=\n-----END PUBLIC KEY-----\n";
        pub const PAYLOAD: &str = "{\"critical\":{\"identity\":{\"docker-reference\":\"registry.example/app\"},\"image\":{\"docker-manifest-digest\":\"sha256:036f7e8d5057764d9232a53b0014d766076eb9ecb8189d62679121b43b57f2ac\"},\"type\":\"cosign container image signature\"},\"optional\":null}";
        pub const ECDSA_DER: &str = "3044022067b9abb886bf7f7daf134238a1b0710e7bbe254853c19e2526f1e4e0f641b82f02207efbafdf2c30a17691e57b4220ee73b50c51ff6222e0e96c5fa8df40dccd837c";
        pub const ED25519_PURE: &str = "5be3fe61956f897c8ea45e9681fd991f33a7102f5f98a37f5464ec8df5722d2c6d6705e34595cd52f96698e227074f399a7c239994ecce6e717865790d806801";
        pub const ED25519_PH: &str = "47f2ff7ca05593b1179b3443732105600ae1350ef262da2b8000e09886042ea9a0a6d7b04ea7f841445f67bcb6a4e6188c5e220085b9d47f4535d7082c22fe07";
    }

    #[test]
    fn fixed_vectors_verify_and_their_variants_do_not() {
        use vectors::*;
        let ec = PublicKey::from_pem(ECDSA_PEM).unwrap();
        let ed = PublicKey::from_pem(ED25519_PEM).unwrap();
        let payload = PAYLOAD.as_bytes();
        assert_eq!(
            payload,
            self::payload("registry.example/app", &image()).as_slice()
        );
        let der = hex::decode(ECDSA_DER).unwrap();
        let fixed = p256::ecdsa::Signature::from_der(&der)
            .unwrap()
            .to_bytes()
            .to_vec();
        for (sig, key, want) in [
            (der.clone(), &ec, Ok(0)),
            (fixed, &ec, Ok(0)),
            (hex::decode(ED25519_PURE).unwrap(), &ed, Ok(0)),
            (hex::decode(ED25519_PH).unwrap(), &ed, Ok(0)),
            (der.clone(), &ed, Err(Rejected::NoKey)),
            (
                hex::decode(ED25519_PURE).unwrap(),
                &ec,
                Err(Rejected::NoKey),
            ),
        ] {
            let layer = layer_for(payload, &sig);
            assert_eq!(check(&layer, payload, &image(), &[key]), want);
        }
        // One changed byte in the payload, re-described so the digest matches:
        // the signature no longer covers it.
        let mut changed = payload.to_vec();
        changed[10] = b'X';
        let layer = layer_for(&changed, &der);
        assert!(check(&layer, &changed, &image(), &[&ec]).is_err());
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
    fn dsse_bundles_check_subject_and_signature() {
        let k = ecdsa_key(7);
        let ed = ed25519_key(8);
        let keys = [
            PublicKey::from_pem(&ecdsa_pem(&k)).unwrap(),
            PublicKey::from_pem(&ed25519_pem(&ed)).unwrap(),
        ];
        let key_refs: Vec<&PublicKey> = keys.iter().collect();
        let sign_ec = |m: &[u8]| {
            let s: p256::ecdsa::Signature = k.sign(m);
            s.to_der().as_bytes().to_vec()
        };
        let b = bundle(&image(), "r/app", sign_ec);
        assert_eq!(check_bundle(&b, &image(), &key_refs), Ok(0));
        let b = bundle(&image(), "r/app", |m: &[u8]| ed.sign(m).to_bytes().to_vec());
        assert_eq!(check_bundle(&b, &image(), &key_refs), Ok(1));
        // Another image's bundle does not count for this one.
        let other = Digest::of(b"other");
        assert_eq!(
            check_bundle(&b, &other, &key_refs),
            Err(Rejected::OtherDigest(image()))
        );
        // A signature over the bare statement (no PAE) does not verify.
        let b = bundle(&image(), "r/app", |m: &[u8]| {
            let body = &m[m.len() - (m.len() - m.iter().rposition(|&c| c == b' ').unwrap() - 1)..];
            let s: p256::ecdsa::Signature = k.sign(body);
            s.to_der().as_bytes().to_vec()
        });
        assert_eq!(check_bundle(&b, &image(), &key_refs), Err(Rejected::NoKey));
        assert!(check_bundle(b"{}", &image(), &key_refs).is_err());
        assert_eq!(pae("t", b"ab"), b"DSSEv1 1 t 2 ab".to_vec());
        let (m, _) = bundle_manifest(
            &image(),
            10,
            "application/vnd.oci.image.manifest.v1+json",
            b"x",
        );
        assert!(is_bundle_manifest(&m));
        assert_eq!(bundle_layer(&m), Some((Digest::of(b"x"), 1)));
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

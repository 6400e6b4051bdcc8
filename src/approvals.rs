//! Approvals held by pullgate itself.
//!
//! `pullgate approve IMAGE@DIGEST --key KEY` signs a cosign simple-signing
//! payload for the digest and stores it under
//! `<store>/approvals/sha256/<hex>/<signature digest>.json`, written
//! atomically (temp file in the same directory, then rename), so it can be
//! recorded while a server runs. The verify step reads these files on every
//! fresh verdict and checks them exactly like signatures found upstream: the
//! payload must name the digest and verify with one of the policy's keys.
//! Because the payload is cosign's format, an approval can be exported and
//! checked by cosign. Depends on `cosign`, `keys`, `names`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::cosign;
use crate::keys::{PrivateKey, PublicKey};
use crate::names::Digest;

/// One stored approval.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Approval {
    /// The simple-signing payload, base64.
    pub payload: String,
    /// The signature over the payload bytes, base64.
    pub signature: String,
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// At most this many approvals are read for one digest.
const MAX_APPROVALS: usize = 32;

fn dir(store: &Path, digest: &Digest) -> PathBuf {
    store.join("approvals/sha256").join(digest.hex())
}

/// Whether any approval exists for `digest` (a cheap check).
pub fn exists(store: &Path, digest: &Digest) -> bool {
    dir(store, digest).is_dir()
}

/// Signs and stores an approval of `digest` as `docker_reference`.
pub fn record(
    store: &Path,
    docker_reference: &str,
    digest: &Digest,
    key: &PrivateKey,
) -> io::Result<PathBuf> {
    let payload = cosign::payload(docker_reference, digest);
    let signature = key.sign(&payload);
    let approval = Approval {
        payload: B64.encode(&payload),
        signature: B64.encode(&signature),
    };
    let d = dir(store, digest);
    fs::create_dir_all(&d)?;
    let name = format!("{}.json", Digest::of(&signature).hex());
    let dest = d.join(&name);
    crate::store::replace_file(
        &dest,
        &serde_json::to_vec_pretty(&approval).expect("JSON of strings"),
    )?;
    Ok(dest)
}

/// The approvals stored for `digest`; unreadable files are skipped.
pub fn load(store: &Path, digest: &Digest) -> Vec<Approval> {
    let Ok(entries) = fs::read_dir(dir(store, digest)) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .take(MAX_APPROVALS)
        .filter_map(|e| serde_json::from_slice(&fs::read(e.path()).ok()?).ok())
        .collect()
}

/// The index of the first key that verifies one of the approvals of
/// `digest`, or the reasons none does.
pub fn check(store: &Path, digest: &Digest, keys: &[&PublicKey]) -> Result<usize, Vec<String>> {
    let mut why = Vec::new();
    for a in load(store, digest) {
        let Ok(payload) = B64.decode(a.payload.trim()) else {
            why.push("local approval payload is not base64".to_owned());
            continue;
        };
        let layer = cosign::SignatureLayer {
            payload: Digest::of(&payload),
            size: payload.len() as u64,
            signature: a.signature.clone(),
        };
        match cosign::check(&layer, &payload, digest, keys) {
            Ok(i) => return Ok(i),
            Err(e) => why.push(format!("local approval: {e}")),
        }
    }
    Err(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_approvals_verify_with_the_matching_public_key_only() {
        let store = tempfile::tempdir().unwrap();
        let key = PrivateKey::generate("ed25519").unwrap();
        let public = PublicKey::from_pem(&key.public_pem()).unwrap();
        let other =
            PublicKey::from_pem(&PrivateKey::generate("ecdsa-p256").unwrap().public_pem()).unwrap();
        let d = Digest::of(b"image");
        assert!(!exists(store.path(), &d));
        assert!(check(store.path(), &d, &[&public]).is_err());
        record(store.path(), "docker.io/library/app", &d, &key).unwrap();
        assert!(exists(store.path(), &d));
        assert_eq!(check(store.path(), &d, &[&other, &public]), Ok(1));
        assert!(check(store.path(), &d, &[&other]).is_err());
        // An approval of one digest does not approve another.
        assert!(check(store.path(), &Digest::of(b"other"), &[&public]).is_err());
        // A payload rewritten to another digest no longer verifies.
        let file = fs::read_dir(dir(store.path(), &d))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut a: Approval = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
        let forged = cosign::payload("docker.io/library/app", &d);
        let mut forged = forged.clone();
        forged.push(b' ');
        a.payload = B64.encode(&forged);
        fs::write(&file, serde_json::to_vec(&a).unwrap()).unwrap();
        assert!(check(store.path(), &d, &[&public]).is_err());
    }
}

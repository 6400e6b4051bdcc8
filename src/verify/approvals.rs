//! Approvals held by pullgate itself.
//!
//! `pullgate approve IMAGE@DIGEST --key KEY` signs a cosign simple-signing
//! payload for the digest and records it in the store (on disk:
//! `approvals/sha256/<hex>/<signature digest>.json`, written atomically, so
//! it can be recorded while a server runs). The verify step reads them on
//! every fresh verdict and checks them exactly like signatures found
//! upstream: the payload must name the digest and verify with one of the
//! policy's keys. Because the payload is cosign's format, an approval can
//! be exported and checked by cosign. Depends on `cosign`, `keys`, `store`.

use base64::Engine as _;

use crate::keys::{PrivateKey, PublicKey};
use crate::oci::names::Digest;
use crate::store::Store;
use crate::verify::cosign;

/// One stored approval.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Approval {
    /// The simple-signing payload, base64.
    pub payload: String,
    /// The signature over the payload bytes, base64.
    pub signature: String,
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Signs and records an approval of `digest` as `docker_reference`; says
/// where it went.
pub async fn record(
    store: &dyn Store,
    docker_reference: &str,
    digest: &Digest,
    key: &PrivateKey,
) -> std::io::Result<String> {
    let payload = cosign::payload(docker_reference, digest);
    let signature = key.sign(&payload);
    let approval = Approval {
        payload: B64.encode(&payload),
        signature: B64.encode(&signature),
    };
    let bytes = serde_json::to_vec_pretty(&approval).map_err(std::io::Error::other)?;
    let id = Digest::of(&signature).hex();
    store.add_approval(*digest, id, bytes).await
}

/// The index of the first key that verifies one of `approvals` (as the
/// store holds them) of `digest`, or the reasons none does.
pub fn check(
    approvals: &[Vec<u8>],
    digest: &Digest,
    keys: &[&PublicKey],
) -> Result<usize, Vec<String>> {
    let mut why = Vec::new();
    for bytes in approvals {
        let Ok(a) = serde_json::from_slice::<Approval>(bytes) else {
            why.push("local approval is not readable".to_owned());
            continue;
        };
        let Ok(payload) = B64.decode(a.payload.trim()) else {
            why.push("local approval payload is not base64".to_owned());
            continue;
        };
        let layer = cosign::SignatureLayer {
            payload: Digest::of(&payload),
            size: payload.len() as u64,
            signature: a.signature.clone(),
            keyless: None,
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
    use crate::metrics::Metrics;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn recorded_approvals_verify_with_the_matching_public_key_only() {
        let store = MemoryStore::new(None, std::sync::Arc::new(Metrics::new()));
        let key = PrivateKey::generate("ed25519").unwrap();
        let public = PublicKey::from_pem(&key.public_pem()).unwrap();
        let other =
            PublicKey::from_pem(&PrivateKey::generate("ecdsa-p256").unwrap().public_pem()).unwrap();
        let d = Digest::of(b"image");
        let held = |d: Digest| {
            let store = store.clone();
            async move { store.approvals(&d).await.unwrap() }
        };
        assert!(held(d).await.is_empty());
        assert!(check(&held(d).await, &d, &[&public]).is_err());
        record(&store, "docker.io/library/app", &d, &key)
            .await
            .unwrap();
        assert!(!held(d).await.is_empty());
        assert_eq!(check(&held(d).await, &d, &[&other, &public]), Ok(1));
        assert!(check(&held(d).await, &d, &[&other]).is_err());
        // An approval of one digest does not approve another.
        let o = Digest::of(b"other");
        assert!(check(&held(o).await, &o, &[&public]).is_err());
        assert!(check(&held(d).await, &o, &[&public]).is_err());
        // A payload rewritten to another digest no longer verifies.
        let mut a: Approval = serde_json::from_slice(&held(d).await[0]).unwrap();
        let mut forged = cosign::payload("docker.io/library/app", &d);
        forged.push(b' ');
        a.payload = B64.encode(&forged);
        let forged = vec![serde_json::to_vec(&a).unwrap()];
        assert!(check(&forged, &d, &[&public]).is_err());
    }
}

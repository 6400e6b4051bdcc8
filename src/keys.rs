//! Public keys that signatures are checked against.
//!
//! Keys are PEM `PUBLIC KEY` blocks (PKIX SubjectPublicKeyInfo), exactly as
//! `cosign generate-key-pair` and `cosign public-key` write them: ECDSA P-256
//! or Ed25519. Depends on nothing else in the crate.

use std::fmt;

use ed25519_dalek::Sha512;
use p256::pkcs8::DecodePublicKey;
use sha2::Digest as _;

/// A trusted public key.
#[derive(Clone)]
pub enum PublicKey {
    /// ECDSA over P-256 with SHA-256.
    EcdsaP256(p256::ecdsa::VerifyingKey),
    /// Ed25519, pure or pre-hashed (Ed25519ph, SHA-512).
    Ed25519(ed25519_dalek::VerifyingKey),
}

/// Why a signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature is not an ECDSA signature in DER or r||s form")]
    MalformedEcdsa,
    #[error("the signature is not 64 bytes, as Ed25519 signatures are")]
    MalformedEd25519,
    #[error("the signature does not match the payload under this key")]
    Mismatch,
}

impl PublicKey {
    /// Parses a PEM `PUBLIC KEY` block.
    pub fn from_pem(pem: &str) -> Result<PublicKey, String> {
        if !pem.contains("-----BEGIN PUBLIC KEY-----") {
            return Err(
                "not a PEM \"PUBLIC KEY\" block (PKIX), as cosign writes public keys".into(),
            );
        }
        if let Ok(k) = p256::ecdsa::VerifyingKey::from_public_key_pem(pem.trim()) {
            return Ok(PublicKey::EcdsaP256(k));
        }
        if let Ok(k) = ed25519_dalek::VerifyingKey::from_public_key_pem(pem.trim()) {
            return Ok(PublicKey::Ed25519(k));
        }
        Err("unsupported or malformed public key (supported: ECDSA P-256, Ed25519)".into())
    }

    /// `ecdsa-p256` or `ed25519`.
    pub fn scheme(&self) -> &'static str {
        match self {
            PublicKey::EcdsaP256(_) => "ecdsa-p256",
            PublicKey::Ed25519(_) => "ed25519",
        }
    }

    /// Whether two keys are the same key.
    pub fn same_key(&self, other: &PublicKey) -> bool {
        match (self, other) {
            (PublicKey::EcdsaP256(a), PublicKey::EcdsaP256(b)) => a == b,
            (PublicKey::Ed25519(a), PublicKey::Ed25519(b)) => a == b,
            _ => false,
        }
    }

    /// Checks `sig` over the exact `payload` bytes.
    pub fn verify(&self, payload: &[u8], sig: &[u8]) -> Result<(), SignatureError> {
        match self {
            PublicKey::EcdsaP256(key) => {
                // Parsed with the p256 crate (strict DER or r||s), verified
                // with ring, whose P-256 is several times faster.
                let sig = p256::ecdsa::Signature::from_der(sig)
                    .or_else(|_| p256::ecdsa::Signature::from_slice(sig))
                    .map_err(|_| SignatureError::MalformedEcdsa)?;
                let point = key.to_encoded_point(false);
                ring::signature::UnparsedPublicKey::new(
                    &ring::signature::ECDSA_P256_SHA256_FIXED,
                    point.as_bytes(),
                )
                .verify(payload, &sig.to_bytes())
                .map_err(|_| SignatureError::Mismatch)
            }
            PublicKey::Ed25519(key) => {
                let sig = ed25519_dalek::Signature::from_slice(sig)
                    .map_err(|_| SignatureError::MalformedEd25519)?;
                if key.verify_strict(payload, &sig).is_ok() {
                    return Ok(());
                }
                let prehash = Sha512::new_with_prefix(payload);
                key.verify_prehashed_strict(prehash, None, &sig)
                    .map_err(|_| SignatureError::Mismatch)
            }
        }
    }
}

/// A signing key pullgate uses for its own approvals (`pullgate approve`).
pub enum PrivateKey {
    EcdsaP256(p256::ecdsa::SigningKey),
    Ed25519(ed25519_dalek::SigningKey),
}

impl PrivateKey {
    /// A new random key: `ecdsa-p256` or `ed25519`.
    pub fn generate(scheme: &str) -> Result<PrivateKey, String> {
        let mut rng = rand_core::OsRng;
        match scheme {
            "ecdsa-p256" => Ok(PrivateKey::EcdsaP256(p256::ecdsa::SigningKey::random(
                &mut rng,
            ))),
            "ed25519" => Ok(PrivateKey::Ed25519(ed25519_dalek::SigningKey::generate(
                &mut rng,
            ))),
            other => Err(format!("unknown scheme {other:?} (ecdsa-p256 or ed25519)")),
        }
    }

    /// Parses a PEM `PRIVATE KEY` block (PKCS#8, unencrypted).
    pub fn from_pem(pem: &str) -> Result<PrivateKey, String> {
        use p256::pkcs8::DecodePrivateKey;
        if let Ok(k) = p256::ecdsa::SigningKey::from_pkcs8_pem(pem.trim()) {
            return Ok(PrivateKey::EcdsaP256(k));
        }
        if let Ok(k) = ed25519_dalek::SigningKey::from_pkcs8_pem(pem.trim()) {
            return Ok(PrivateKey::Ed25519(k));
        }
        Err("not an unencrypted PKCS#8 \"PRIVATE KEY\" for ECDSA P-256 or Ed25519 (as `pullgate keygen` writes)".into())
    }

    /// The PKCS#8 PEM of this key.
    pub fn to_pem(&self) -> String {
        use p256::pkcs8::{EncodePrivateKey, LineEnding};
        let pem = match self {
            PrivateKey::EcdsaP256(k) => k.to_pkcs8_pem(LineEnding::LF),
            PrivateKey::Ed25519(k) => k.to_pkcs8_pem(LineEnding::LF),
        };
        pem.expect("encoding a valid key").to_string()
    }

    /// The PKIX PEM of the matching public key, as cosign writes it.
    pub fn public_pem(&self) -> String {
        use p256::pkcs8::{EncodePublicKey, LineEnding};
        match self {
            PrivateKey::EcdsaP256(k) => k.verifying_key().to_public_key_pem(LineEnding::LF),
            PrivateKey::Ed25519(k) => k.verifying_key().to_public_key_pem(LineEnding::LF),
        }
        .expect("encoding a valid key")
    }

    /// Signs `payload` (ECDSA: DER over SHA-256; Ed25519: pure).
    pub fn sign(&self, payload: &[u8]) -> Vec<u8> {
        use signature::Signer;
        match self {
            PrivateKey::EcdsaP256(k) => {
                let s: p256::ecdsa::Signature = k.sign(payload);
                s.to_der().as_bytes().to_vec()
            }
            PrivateKey::Ed25519(k) => k.sign(payload).to_bytes().to_vec(),
        }
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.scheme())
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use ed25519_dalek::pkcs8::EncodePublicKey as _;
    use p256::pkcs8::LineEnding;
    use signature::Signer as _;

    /// Fixed test keys: the same bytes every run.
    pub fn ecdsa_key(seed: u8) -> p256::ecdsa::SigningKey {
        p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap()
    }

    pub fn ed25519_key(seed: u8) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
    }

    pub fn ecdsa_pem(k: &p256::ecdsa::SigningKey) -> String {
        k.verifying_key().to_public_key_pem(LineEnding::LF).unwrap()
    }

    pub fn ed25519_pem(k: &ed25519_dalek::SigningKey) -> String {
        k.verifying_key().to_public_key_pem(LineEnding::LF).unwrap()
    }

    #[test]
    fn ecdsa_signatures_verify_in_der_and_fixed_form() {
        let k = ecdsa_key(1);
        let public = PublicKey::from_pem(&ecdsa_pem(&k)).unwrap();
        assert_eq!(public.scheme(), "ecdsa-p256");
        let sig: p256::ecdsa::Signature = k.sign(b"payload");
        assert_eq!(public.verify(b"payload", sig.to_der().as_bytes()), Ok(()));
        assert_eq!(public.verify(b"payload", &sig.to_bytes()), Ok(()));
        assert_eq!(
            public.verify(b"payloaD", &sig.to_bytes()),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            public.verify(b"payload", b"junk"),
            Err(SignatureError::MalformedEcdsa)
        );
        let other = PublicKey::from_pem(&ecdsa_pem(&ecdsa_key(2))).unwrap();
        assert_eq!(
            other.verify(b"payload", &sig.to_bytes()),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn ed25519_pure_and_prehashed_signatures_verify() {
        let k = ed25519_key(3);
        let public = PublicKey::from_pem(&ed25519_pem(&k)).unwrap();
        assert_eq!(public.scheme(), "ed25519");
        let pure = k.sign(b"payload");
        assert_eq!(public.verify(b"payload", &pure.to_bytes()), Ok(()));
        let ph = k
            .sign_prehashed(Sha512::new_with_prefix(b"payload"), None)
            .unwrap();
        assert_eq!(public.verify(b"payload", &ph.to_bytes()), Ok(()));
        assert_eq!(
            public.verify(b"other", &ph.to_bytes()),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            public.verify(b"payload", &[0; 10]),
            Err(SignatureError::MalformedEd25519)
        );
    }

    #[test]
    fn generated_keys_round_trip_and_sign_verifiably() {
        for scheme in ["ecdsa-p256", "ed25519"] {
            let k = PrivateKey::generate(scheme).unwrap();
            let again = PrivateKey::from_pem(&k.to_pem()).unwrap();
            let public = PublicKey::from_pem(&k.public_pem()).unwrap();
            assert_eq!(public.scheme(), scheme);
            assert_eq!(public.verify(b"p", &again.sign(b"p")), Ok(()));
            assert!(k.to_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
        }
        assert!(PrivateKey::generate("rsa").is_err());
        assert!(PrivateKey::from_pem(
            "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----"
        )
        .is_err());
    }

    #[test]
    fn unsupported_and_malformed_keys_are_refused() {
        assert!(PublicKey::from_pem("hello").is_err());
        let bad = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        assert!(PublicKey::from_pem(bad)
            .unwrap_err()
            .contains("unsupported"));
    }
}

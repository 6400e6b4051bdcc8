//! Sigstore bundles verified offline against a trusted root, through the
//! sigstore project's own crate (`sigstore-verify`, no HTTP client, no
//! TUF). The crate does the cryptography and the transparency-log and
//! certificate checks; this module chooses the trusted root, builds the
//! policy from what pullgate was asked to require, and names each failure.
//!
//! Nothing here opens a socket: the trusted root is the production root
//! embedded in the crate or a file the operator supplies.

use std::path::Path;

use sigstore_verify::trust_root::{SigstoreInstance, TrustedRoot};
use sigstore_verify::types::{Artifact, Bundle, DerPublicKey, Sha256Hash};
use sigstore_verify::{PublicKeyVerificationPolicy, VerificationPolicy, Verifier};

/// What a bundle must show to be valid.
#[derive(Debug, Clone)]
pub enum Expect {
    /// A Fulcio certificate for this identity (the SAN, exactly) from this
    /// OIDC issuer (exactly).
    Identity { identity: String, issuer: String },
    /// A signature by this public key (PEM, as cosign writes it).
    Key(String),
}

/// What was signed: the bytes, or their SHA-256 when only that is known.
#[derive(Debug, Clone, Copy)]
pub enum Signed<'a> {
    Bytes(&'a [u8]),
    Sha256([u8; 32]),
}

/// What a valid bundle showed.
#[derive(Debug, Clone, Default)]
pub struct Verified {
    /// The certificate's identity (its SAN), for a keyless bundle.
    pub identity: Option<String>,
    /// The certificate's OIDC issuer, for a keyless bundle.
    pub issuer: Option<String>,
    /// The transparency log's time for the entry (seconds since the epoch).
    pub integrated_time: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeylessError {
    #[error("trusted root {source_name}: {reason}")]
    TrustedRoot { source_name: String, reason: String },
    #[error("the bundle is not a sigstore bundle: {0}")]
    Bundle(String),
    #[error("the public key: {0}")]
    Key(String),
    /// The bundle was read and rejected: the crate's reason.
    #[error("{0}")]
    Rejected(#[from] sigstore_verify::Error),
}

/// Which trusted root to verify against.
#[derive(Debug, Clone, Copy)]
pub enum Root<'a> {
    /// The sigstore production root embedded in the binary (a snapshot:
    /// docs/keyless.md says how to use a newer one).
    Production,
    /// The sigstore staging root embedded in the binary.
    Staging,
    /// A `trusted_root.json` the operator supplies.
    File(&'a Path),
}

/// A verifier over one trusted root, built once and used for many bundles.
pub struct Keyless {
    verifier: Verifier,
}

impl Keyless {
    pub fn new(root: Root) -> Result<Keyless, KeylessError> {
        let (name, root) = match root {
            Root::Production => (
                "(embedded production root)".to_string(),
                TrustedRoot::from_embedded(SigstoreInstance::PublicGood),
            ),
            Root::Staging => (
                "(embedded staging root)".to_string(),
                TrustedRoot::from_embedded(SigstoreInstance::Staging),
            ),
            Root::File(p) => {
                let name = p.display().to_string();
                let text = std::fs::read_to_string(p).map_err(|e| KeylessError::TrustedRoot {
                    source_name: name.clone(),
                    reason: e.to_string(),
                })?;
                (name, TrustedRoot::from_json(&text))
            }
        };
        let root = root.map_err(|e| KeylessError::TrustedRoot {
            source_name: name.clone(),
            reason: e.to_string(),
        })?;
        let verifier = Verifier::new(&root).map_err(|e| KeylessError::TrustedRoot {
            source_name: name,
            reason: e.to_string(),
        })?;
        Ok(Keyless { verifier })
    }

    /// Verifies one bundle (JSON) for `signed` under `expect`.
    pub fn verify(
        &self,
        bundle_json: &str,
        signed: Signed,
        expect: &Expect,
    ) -> Result<Verified, KeylessError> {
        let bundle =
            Bundle::from_json(bundle_json).map_err(|e| KeylessError::Bundle(e.to_string()))?;
        let artifact = match signed {
            Signed::Bytes(b) => Artifact::from_blob(b),
            Signed::Sha256(d) => Artifact::from_digest(Sha256Hash::new(d)),
        };
        let result = match expect {
            Expect::Identity { identity, issuer } => {
                let policy = VerificationPolicy::new(identity.as_str(), issuer.as_str());
                self.verifier.verify(artifact, &bundle, &policy)?
            }
            Expect::Key(pem) => {
                let key =
                    DerPublicKey::from_pem(pem).map_err(|e| KeylessError::Key(e.to_string()))?;
                let policy = PublicKeyVerificationPolicy::new(key);
                self.verifier.verify(artifact, &bundle, &policy)?
            }
        };
        Ok(Verified {
            identity: result.identity().map(|i| i.as_str().to_string()),
            issuer: result.issuer().map(str::to_string),
            integrated_time: result.integrated_time().map(|t| t.as_second()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_production_root_loads() {
        Keyless::new(Root::Production).unwrap();
        Keyless::new(Root::Staging).unwrap();
    }

    #[test]
    fn a_root_that_is_not_one_is_named_in_the_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("trusted_root.json");
        std::fs::write(&p, "{\"mediaType\": 7}").unwrap();
        let e = Keyless::new(Root::File(&p)).err().unwrap().to_string();
        assert!(e.contains("trusted_root.json"), "{e}");
    }

    #[test]
    fn garbage_is_not_a_bundle() {
        let k = Keyless::new(Root::Production).unwrap();
        let e = k
            .verify(
                "not json",
                Signed::Bytes(b"x"),
                &Expect::Identity {
                    identity: "a@b".into(),
                    issuer: "https://accounts.google.com".into(),
                },
            )
            .unwrap_err();
        assert!(matches!(e, KeylessError::Bundle(_)), "{e}");
    }
}

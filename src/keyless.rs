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
    /// A signature by this public key (see [`Expect::key`]).
    Key(DerPublicKey),
}

impl Expect {
    /// A public key in PEM (as cosign writes it), checked now so that a bad
    /// key is told apart from a bad bundle.
    pub fn key(pem: &str) -> Result<Expect, KeylessError> {
        use x509_cert::der::Decode as _;
        let key = DerPublicKey::from_pem(pem).map_err(|e| KeylessError::Key(e.to_string()))?;
        // The crate takes any PEM body; make sure it is a public key.
        x509_cert::spki::SubjectPublicKeyInfoRef::from_der(key.as_bytes()).map_err(|e| {
            KeylessError::Key(format!("not a public key (SubjectPublicKeyInfo): {e}"))
        })?;
        Ok(Expect::Key(key))
    }
}

/// A keyless signer a policy trusts: `[identities] NAME = { issuer,
/// subject | subject_regex }`.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    /// The OIDC issuer, exactly.
    pub issuer: String,
    pub subject: Subject,
}

/// How an identity's subject (the certificate's SAN) is matched.
#[derive(Debug, Clone)]
pub enum Subject {
    Exact(String),
    /// Anchored at the start: the SAN must begin with a match (add `$` to
    /// pin the end too).
    Regex(regex::Regex),
}

impl Subject {
    /// `pattern`, anchored at the start whether or not it says `^`, so
    /// that no SAN passes by carrying a match somewhere inside it
    /// (`https://evil.example/?https://github.com/acme/...`); the end is
    /// the pattern's to pin with `$`, so a prefix such as
    /// `^https://github.com/acme/app/` allows every workflow of that
    /// repository (DESIGN.md's example).
    pub fn regex(pattern: &str) -> Result<Subject, String> {
        // Alone first: a pattern that only compiles inside the wrapping
        // group (`a)|(.*`) would escape the anchor.
        regex::Regex::new(pattern).map_err(|e| e.to_string())?;
        let r = regex::Regex::new(&format!("^(?:{pattern})")).map_err(|e| e.to_string())?;
        // Anchored at the start only, a pattern that matches nothing
        // matches every SAN (`x|`, `(x)?`).
        if r.is_match("") {
            return Err(
                "it matches the empty string, so it would allow every subject of the issuer".into(),
            );
        }
        Ok(Subject::Regex(r))
    }

    pub fn matches(&self, san: &str) -> bool {
        match self {
            Subject::Exact(s) => s == san,
            Subject::Regex(r) => r.is_match(san),
        }
    }
}

impl Identity {
    /// Whether a verified certificate's SAN and issuer are this identity's.
    pub fn matches(&self, san: Option<&str>, issuer: Option<&str>) -> bool {
        issuer == Some(self.issuer.as_str()) && san.is_some_and(|s| self.subject.matches(s))
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Exact(s) => write!(f, "{s:?}"),
            Subject::Regex(r) => write!(f, "/{}/", r.as_str()),
        }
    }
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
    /// A valid certificate of someone the policy does not trust.
    #[error("signed by {san} (issuer {issuer}), an identity no signed_by name allows")]
    NoIdentity { san: String, issuer: String },
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
    /// Where the root came from, for messages.
    pub source: String,
}

impl std::fmt::Debug for Keyless {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyless")
            .field("source", &self.source)
            .finish()
    }
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
            source_name: name.clone(),
            reason: e.to_string(),
        })?;
        Ok(Keyless {
            verifier,
            source: name,
        })
    }

    /// Verifies a keyless bundle (JSON) for `signed` and returns the first of
    /// `identities` whose issuer and subject the certificate names. The
    /// crate checks everything but the identity (chain, SCT, log, signature,
    /// the artifact); the identity is matched here, where regexes are.
    pub fn verify_identities<'i>(
        &self,
        bundle_json: &str,
        signed: Signed,
        identities: &[&'i Identity],
    ) -> Result<&'i Identity, KeylessError> {
        let (bundle, artifact) = read(bundle_json, signed)?;
        let result =
            self.verifier
                .verify(artifact, &bundle, &VerificationPolicy::any_identity())?;
        let san = result.identity().map(|i| i.as_str().to_string());
        let issuer = result.issuer().map(str::to_string);
        identities
            .iter()
            .find(|i| i.matches(san.as_deref(), issuer.as_deref()))
            .copied()
            .ok_or(KeylessError::NoIdentity {
                san: san.unwrap_or_else(|| "(none)".into()),
                issuer: issuer.unwrap_or_else(|| "(none)".into()),
            })
    }

    /// Verifies one bundle (JSON) for `signed` under `expect`.
    pub fn verify(
        &self,
        bundle_json: &str,
        signed: Signed,
        expect: &Expect,
    ) -> Result<Verified, KeylessError> {
        let (bundle, artifact) = read(bundle_json, signed)?;
        let result = match expect {
            Expect::Identity { identity, issuer } => {
                let policy = VerificationPolicy::new(identity.as_str(), issuer.as_str());
                self.verifier.verify(artifact, &bundle, &policy)?
            }
            Expect::Key(key) => {
                let policy = PublicKeyVerificationPolicy::new(key.clone());
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

/// The bundle and what it signs, as the crate takes them.
fn read<'a>(bundle_json: &str, signed: Signed<'a>) -> Result<(Bundle, Artifact<'a>), KeylessError> {
    let bundle = Bundle::from_json(bundle_json).map_err(|e| KeylessError::Bundle(e.to_string()))?;
    let artifact = match signed {
        Signed::Bytes(b) => Artifact::from_blob(b),
        Signed::Sha256(d) => Artifact::from_digest(Sha256Hash::new(d)),
    };
    Ok((bundle, artifact))
}

/// A legacy cosign signature (a layer of a `.sig` manifest) as cosign
/// writes it for a keyless signing: its annotations.
#[derive(Debug, Clone, Copy)]
pub struct LegacySignature<'a> {
    /// The simple-signing payload (the layer's bytes).
    pub payload: &'a [u8],
    /// `dev.cosignproject.cosign/signature`: base64 of the signature.
    pub signature: &'a str,
    /// `dev.sigstore.cosign/certificate`: the leaf certificate, PEM.
    pub certificate: &'a str,
    /// `dev.sigstore.cosign/chain`: intermediates and root, PEM.
    pub chain: Option<&'a str>,
    /// `dev.sigstore.cosign/bundle`: the transparency log's signed entry
    /// timestamp and entry, JSON.
    pub rekor_bundle: &'a str,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RekorBundle {
    signed_entry_timestamp: String,
    payload: RekorPayload,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RekorPayload {
    body: String,
    integrated_time: i64,
    log_index: i64,
    #[serde(rename = "logID")]
    log_id: String,
}

/// The sigstore bundle (v0.1: a certificate chain and a signed entry
/// timestamp, no inclusion proof) that says what a legacy keyless signature
/// says, so that the crate verifies it like any other.
///
/// Hand-written because the crate reads bundles only and cosign's legacy
/// annotations are the one other form keyless signatures take in
/// registries; it maps fields and decides nothing: the crate then checks
/// that the log entry matches the certificate, signature and payload.
pub fn bundle_from_legacy(sig: &LegacySignature) -> Result<String, KeylessError> {
    use base64::Engine as _;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::CertificateDer;
    use sha2::Digest as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let bad = |m: String| KeylessError::Bundle(m);
    let mut certs = Vec::new();
    for (what, pem) in [("certificate", Some(sig.certificate)), ("chain", sig.chain)] {
        let Some(pem) = pem else { continue };
        let before = certs.len();
        for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let c = c.map_err(|e| bad(format!("the {what} annotation: {e}")))?;
            certs.push(c.as_ref().to_vec());
        }
        // The leaf comes from the certificate annotation alone, never from
        // the chain.
        if what == "certificate" && certs.len() != before + 1 {
            return Err(bad(format!(
                "the certificate annotation holds {} certificates, not one",
                certs.len() - before
            )));
        }
    }
    // The chain annotation usually ends with the root, which the trusted
    // root holds and a bundle must not repeat.
    if certs.len() > 1 {
        if let Some(last) = certs.last() {
            if x509_is_self_signed(last) {
                certs.pop();
            }
        }
    }
    let rekor: RekorBundle = serde_json::from_str(sig.rekor_bundle)
        .map_err(|e| bad(format!("the bundle annotation: {e}")))?;
    let body = b64
        .decode(&rekor.payload.body)
        .map_err(|e| bad(format!("the log entry's body: {e}")))?;
    let entry: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| bad(format!("the log entry's body: {e}")))?;
    let (kind, version) = match (entry["kind"].as_str(), entry["apiVersion"].as_str()) {
        (Some(k), Some(v)) => (k.to_string(), v.to_string()),
        _ => {
            return Err(bad(
                "the log entry's body names no kind and apiVersion".into()
            ))
        }
    };
    let log_id = hex::decode(&rekor.payload.log_id).map_err(|e| bad(format!("the log ID: {e}")))?;
    let bundle = serde_json::json!({
        "mediaType": "application/vnd.dev.sigstore.bundle+json;version=0.1",
        "verificationMaterial": {
            "x509CertificateChain": {
                "certificates": certs.iter().map(|c| serde_json::json!({ "rawBytes": b64.encode(c) })).collect::<Vec<_>>()
            },
            "tlogEntries": [{
                "logIndex": rekor.payload.log_index.to_string(),
                "logId": { "keyId": b64.encode(log_id) },
                "kindVersion": { "kind": kind, "version": version },
                "integratedTime": rekor.payload.integrated_time.to_string(),
                "inclusionPromise": { "signedEntryTimestamp": rekor.signed_entry_timestamp },
                "canonicalizedBody": rekor.payload.body,
            }]
        },
        "messageSignature": {
            "messageDigest": { "algorithm": "SHA2_256", "digest": b64.encode(sha2::Sha256::digest(sig.payload)) },
            "signature": sig.signature,
        }
    });
    Ok(bundle.to_string())
}

/// Whether a DER certificate names itself as its issuer.
fn x509_is_self_signed(der: &[u8]) -> bool {
    use x509_cert::der::Decode as _;
    x509_cert::Certificate::from_der(der)
        .map(|c| c.tbs_certificate.issuer == c.tbs_certificate.subject)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_exactly_or_from_the_start() {
        let id = |subject| Identity {
            name: "x".into(),
            issuer: "https://accounts.google.com".into(),
            subject,
        };
        let exact = id(Subject::Exact(
            "keyless@distroless.iam.gserviceaccount.com".into(),
        ));
        let iss = Some("https://accounts.google.com");
        assert!(exact.matches(Some("keyless@distroless.iam.gserviceaccount.com"), iss));
        assert!(!exact.matches(Some("keyless@distroless.iam.gserviceaccount.com.evil"), iss));
        assert!(!exact.matches(
            Some("keyless@distroless.iam.gserviceaccount.com"),
            Some("https://evil")
        ));
        assert!(!exact.matches(None, iss));
        let re = id(Subject::regex(
            r"https://github\.com/acme/[^/]+/\.github/workflows/release\.yml@refs/tags/v.*",
        )
        .unwrap());
        assert!(re.matches(
            Some("https://github.com/acme/app/.github/workflows/release.yml@refs/tags/v1.2"),
            iss
        ));
        // Anchored at the start: a match inside the SAN does not pass.
        assert!(!re.matches(Some("https://evil.example/?https://github.com/acme/app/.github/workflows/release.yml@refs/tags/v1"), iss));
        assert!(!re.matches(
            Some("https://github.com/acme/app/.github/workflows/release.yml@refs/heads/main"),
            iss
        ));
        // A prefix, as DESIGN.md's example writes one, allows what follows.
        let prefix = id(Subject::regex("^https://github.com/chainguard-images/images/").unwrap());
        assert!(prefix.matches(
            Some("https://github.com/chainguard-images/images/.github/workflows/release.yaml@refs/heads/main"),
            iss
        ));
        assert!(!prefix.matches(
            Some("https://github.com/evil/https://github.com/chainguard-images/images/"),
            iss
        ));
        // An alternation cannot escape the start anchor; `$` pins the end.
        let alt = id(Subject::regex("a@x|b@x").unwrap());
        assert!(alt.matches(Some("b@x"), iss));
        assert!(!alt.matches(Some("evil b@x"), iss));
        let pinned = id(Subject::regex(r"b@x\.example$").unwrap());
        assert!(pinned.matches(Some("b@x.example"), iss));
        assert!(!pinned.matches(Some("b@x.example.evil"), iss));
        assert!(Subject::regex("(").is_err());
        // No escaping the anchor through the wrapping group, no empty match.
        assert!(Subject::regex("a@x)|(.*").is_err());
        assert!(Subject::regex(r"release@acme\.example|").is_err());
        assert!(Subject::regex("(x)?").is_err());
    }

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

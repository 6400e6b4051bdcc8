//! Where signatures of a digest are found, and whether one verifies: local
//! approvals, the legacy `sha256-<hex>.sig` tag, and sigstore bundles
//! attached as referrers (or listed by the `sha256-<hex>` tag on registries
//! without the referrers API). Everything is read through the content
//! layer, on every fresh verdict.

use bytes::Bytes;
use http::StatusCode;

use super::approvals;
use super::cosign::{self, Rejected};
use crate::content::{Content, ContentError, Small};
use crate::keyless::{Identity, Keyless, Signed};
use crate::keys::PublicKey;
use crate::oci::manifest::{OCI_INDEX, OCI_MANIFEST};
use crate::oci::names::{Digest, RepoName};
use crate::remote::{Endpoint, Remote};
use crate::trace::Trace;
use crate::trace_line;

/// Largest signature manifest read.
const MAX_SIGNATURE_MANIFEST: u64 = 1024 * 1024;

/// What one signature check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Signed by the named key.
    Signed(String),
    /// No signature manifest, or no signature layers in it.
    Unsigned,
    /// Signature layers exist; none counts. The reasons, one per layer.
    BadSignatures(Vec<String>),
}

/// The trusted signers of a policy: keys with their names, and keyless
/// identities with the verifier of their certificates.
pub struct Keys<'a> {
    pub keys: Vec<&'a PublicKey>,
    pub names: Vec<&'a str>,
    pub identities: Vec<&'a Identity>,
    pub keyless: Option<&'a Keyless>,
}

impl Keys<'_> {
    /// The keyless verifier, when the policy names identities.
    fn keyless(&self) -> Option<&Keyless> {
        self.keyless.filter(|_| !self.identities.is_empty())
    }
}

/// The signature sources of one repository.
pub struct Sources<'a> {
    pub content: &'a Content,
    pub remote: &'a dyn Remote,
    pub repo: &'a RepoName,
}

impl Sources<'_> {
    /// Checks every source of `digest` in turn, stopping at the first that
    /// verifies; each finding goes to the trace under `label`. `Err` when a
    /// source could not be read (remote down, 5xx, 429).
    pub async fn check(
        &self,
        digest: &Digest,
        keys: &Keys<'_>,
        label: &str,
        trace: Option<&Trace>,
    ) -> Result<Finding, ContentError> {
        let held = self.content.store.approvals(digest).await.map_err(|e| {
            // Clients get the verdict, not where the store is: the
            // shared bucket's address stays in the log.
            tracing::warn!(%digest, "cannot read approvals: {e}");
            ContentError::Internal(format!(
                "the approvals of {digest} could not be read from pullgate's store (its log has why)"
            ))
        })?;
        match approvals::check(&held, digest, &keys.keys) {
            Ok(i) => {
                tracing::debug!(repo = %self.repo, %digest, key = keys.names[i], "approved locally");
                trace_line!(
                    trace,
                    "  {label}: approved locally, verified with key {:?}",
                    keys.names[i]
                );
                return Ok(Finding::Signed(keys.names[i].to_owned()));
            }
            Err(why) if !why.is_empty() => {
                for w in why {
                    trace_line!(trace, "  {label}: {w}");
                }
            }
            Err(_) => trace_line!(trace, "  {label}: no local approvals"),
        }
        let found = self.upstream(digest, keys).await?;
        log_finding(self.repo, digest, &found);
        let tag = cosign::signature_tag(digest);
        match &found {
            Finding::Signed(k) => match keys.identities.iter().find(|i| i.name == *k) {
                Some(id) => trace_line!(
                    trace,
                    "  {label}: keyless signature verified: identity {k:?} (subject {}, issuer {}, root {})",
                    id.subject,
                    id.issuer,
                    keys.keyless.map_or("?", |v| v.source.as_str())
                ),
                None => trace_line!(
                    trace,
                    "  {label}: signature in {tag} verified with key {k:?}"
                ),
            },
            Finding::Unsigned => {
                trace_line!(trace, "  {label}: no signatures ({tag} is absent or empty)")
            }
            Finding::BadSignatures(why) => {
                for w in why {
                    trace_line!(trace, "  {label}: signature rejected: {w}");
                }
            }
        }
        Ok(found)
    }

    /// The legacy `.sig` tag, then sigstore bundles.
    async fn upstream(&self, digest: &Digest, keys: &Keys<'_>) -> Result<Finding, ContentError> {
        let legacy = self.legacy(digest, keys).await?;
        if let Finding::Signed(_) = legacy {
            return Ok(legacy);
        }
        let bundles = self.bundles(digest, keys).await?;
        Ok(match (legacy, bundles) {
            (_, f @ Finding::Signed(_)) => f,
            (Finding::BadSignatures(mut a), Finding::BadSignatures(b)) => {
                a.extend(b);
                Finding::BadSignatures(a)
            }
            (f @ Finding::BadSignatures(_), _) | (_, f @ Finding::BadSignatures(_)) => f,
            _ => Finding::Unsigned,
        })
    }

    async fn small(
        &self,
        endpoint: Endpoint<'_>,
        accept: Option<&'static str>,
        query: Option<String>,
        max: u64,
    ) -> Result<Small, ContentError> {
        self.content
            .small(self.remote, self.repo, endpoint, accept, query, max)
            .await
    }

    /// Reads the `.sig` tag of `digest` and checks each signature layer.
    async fn legacy(&self, digest: &Digest, keys: &Keys<'_>) -> Result<Finding, ContentError> {
        let tag = cosign::signature_tag(digest);
        let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
        let bytes = match self
            .small(
                Endpoint::ManifestTag(&tag),
                Some(accept),
                None,
                MAX_SIGNATURE_MANIFEST,
            )
            .await?
        {
            Small::Body(b) => b,
            Small::Status(StatusCode::NOT_FOUND) => return Ok(Finding::Unsigned),
            Small::Status(s) => return Err(self.unexpected(s)),
            Small::TooLarge => {
                return Ok(Finding::BadSignatures(vec![
                    "signature manifest too large".into()
                ]))
            }
        };
        let layers = match cosign::parse_signature_manifest(&bytes) {
            Ok(l) => l,
            Err(e) => return Ok(Finding::BadSignatures(vec![e])),
        };
        if layers.is_empty() {
            return Ok(Finding::Unsigned);
        }
        let mut problems = Vec::new();
        for layer in &layers {
            if layer.size > cosign::MAX_PAYLOAD_SIZE {
                problems.push(Rejected::PayloadTooLarge(layer.size).to_string());
                continue;
            }
            let payload = match self
                .content
                .small_blob(
                    self.remote,
                    self.repo,
                    layer.payload,
                    cosign::MAX_PAYLOAD_SIZE,
                )
                .await?
            {
                Small::Body(b) => b,
                // An oversized payload cannot match its (small) descriptor.
                Small::TooLarge => Bytes::new(),
                Small::Status(StatusCode::NOT_FOUND) => {
                    problems.push(format!("payload {} is missing upstream", layer.payload));
                    continue;
                }
                Small::Status(s) => return Err(self.unexpected(s)),
            };
            match cosign::check(layer, &payload, digest, &keys.keys) {
                Ok(i) => return Ok(Finding::Signed(keys.names[i].to_owned())),
                // A keyless signature: its certificate, not a key, says who.
                Err(Rejected::NoKey) if layer.keyless.is_some() && keys.keyless().is_some() => {
                    match keyless_layer(layer, &payload, keys) {
                        Ok(name) => return Ok(Finding::Signed(name)),
                        Err(e) => problems.push(e),
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        Ok(Finding::BadSignatures(problems))
    }

    /// Finds sigstore bundles referring to `digest` (referrers API, else the
    /// `sha256-<hex>` tag) and checks each.
    async fn bundles(&self, digest: &Digest, keys: &Keys<'_>) -> Result<Finding, ContentError> {
        let query = format!(
            "artifactType={}",
            cosign::BUNDLE_MEDIA_TYPE.replace('+', "%2B")
        );
        let mut listed = self
            .small(
                Endpoint::Referrers(digest),
                Some(OCI_INDEX),
                Some(query),
                MAX_SIGNATURE_MANIFEST,
            )
            .await?;
        // No referrers API (404, or 400/405/501 from registries that do not
        // know the endpoint): the fallback tag lists them.
        let no_api = [
            StatusCode::NOT_FOUND,
            StatusCode::BAD_REQUEST,
            StatusCode::METHOD_NOT_ALLOWED,
            StatusCode::NOT_IMPLEMENTED,
        ];
        if matches!(listed, Small::Status(s) if no_api.contains(&s)) {
            let tag = cosign::referrers_tag(digest);
            listed = self
                .small(
                    Endpoint::ManifestTag(&tag),
                    Some(OCI_INDEX),
                    None,
                    MAX_SIGNATURE_MANIFEST,
                )
                .await?;
        }
        let index = match listed {
            Small::Body(b) => b,
            Small::Status(StatusCode::NOT_FOUND) => return Ok(Finding::Unsigned),
            Small::Status(s) => return Err(self.unexpected(s)),
            Small::TooLarge => {
                return Ok(Finding::BadSignatures(vec![
                    "referrers list too large".into()
                ]))
            }
        };
        let referrers = cosign::bundle_referrers(&index);
        if referrers.is_empty() {
            return Ok(Finding::Unsigned);
        }
        let mut problems = Vec::new();
        for r in referrers {
            let m = match self
                .small(
                    Endpoint::Manifest(&crate::oci::Reference::Digest(r)),
                    Some(OCI_MANIFEST),
                    None,
                    MAX_SIGNATURE_MANIFEST,
                )
                .await?
            {
                Small::Body(m) if Digest::of(&m) == r => m,
                Small::Body(_) => {
                    problems.push(format!(
                        "bundle manifest {r}: bytes do not match the digest"
                    ));
                    continue;
                }
                Small::Status(s) => {
                    problems.push(format!("bundle manifest {r}: upstream answered {s}"));
                    continue;
                }
                Small::TooLarge => {
                    problems.push(format!("bundle manifest {r} too large"));
                    continue;
                }
            };
            let Some((layer, size)) = cosign::bundle_layer(&m) else {
                problems.push(format!("bundle manifest {r} has no bundle layer"));
                continue;
            };
            if size > cosign::MAX_BUNDLE_SIZE {
                problems.push(format!("bundle {layer} is {size} bytes, over the limit"));
                continue;
            }
            let bundle = match self
                .content
                .small_blob(self.remote, self.repo, layer, cosign::MAX_BUNDLE_SIZE)
                .await?
            {
                Small::Body(b) if Digest::of(&b) == layer => b,
                Small::Status(s) => {
                    problems.push(format!("bundle {layer}: upstream answered {s}"));
                    continue;
                }
                _ => {
                    problems.push(format!("bundle {layer}: {}", Rejected::PayloadMismatch));
                    continue;
                }
            };
            if let Some(verifier) = keys
                .keyless()
                .filter(|_| cosign::bundle_has_certificate(&bundle))
            {
                let json = String::from_utf8_lossy(&bundle);
                match verifier.verify_identities(
                    &json,
                    Signed::Sha256(*digest.as_bytes()),
                    &keys.identities,
                ) {
                    Ok(id) => return Ok(Finding::Signed(id.name.clone())),
                    Err(e) => {
                        problems.push(format!("bundle {layer}: {e}"));
                        continue;
                    }
                }
            }
            match cosign::check_bundle(&bundle, digest, &keys.keys) {
                Ok(i) => return Ok(Finding::Signed(keys.names[i].to_owned())),
                Err(e) => problems.push(format!("bundle {layer}: {e}")),
            }
        }
        Ok(Finding::BadSignatures(problems))
    }

    /// A status that says nothing about signatures (5xx, 429, 401...): no
    /// verdict can be reached.
    fn unexpected(&self, status: StatusCode) -> ContentError {
        crate::content::status_error(self.remote.name(), status, &http::HeaderMap::new())
    }
}

/// A legacy keyless signature layer: the annotations as the bundle they
/// amount to, verified over the payload (which was checked to match its
/// descriptor and to sign this image), then matched against the policy's
/// identities. The identity's name, or why not.
fn keyless_layer(
    layer: &cosign::SignatureLayer,
    payload: &[u8],
    keys: &Keys<'_>,
) -> Result<String, String> {
    let (Some(k), Some(verifier)) = (&layer.keyless, keys.keyless()) else {
        return Err(Rejected::NoKey.to_string());
    };
    let Some(rekor_bundle) = k.rekor_bundle.as_deref() else {
        return Err("keyless signature without a transparency-log entry (no dev.sigstore.cosign/bundle annotation)".into());
    };
    let legacy = crate::keyless::LegacySignature {
        payload,
        signature: &layer.signature,
        certificate: &k.certificate,
        chain: k.chain.as_deref(),
        rekor_bundle,
    };
    let bundle = crate::keyless::bundle_from_legacy(&legacy).map_err(|e| e.to_string())?;
    verifier
        .verify_identities(&bundle, Signed::Bytes(payload), &keys.identities)
        .map(|id| id.name.clone())
        .map_err(|e| e.to_string())
}

fn log_finding(repo: &RepoName, digest: &Digest, f: &Finding) {
    match f {
        Finding::Signed(key) => tracing::debug!(%repo, %digest, key, "signature verified"),
        Finding::Unsigned => tracing::debug!(%repo, %digest, "no signatures"),
        Finding::BadSignatures(why) => {
            tracing::info!(%repo, %digest, ?why, "signatures found, none valid")
        }
    }
}

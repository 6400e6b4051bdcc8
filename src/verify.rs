//! The verify step: does a fetched manifest meet its policy's signature
//! requirement?
//!
//! Runs between "manifest fetched" and "response". Signatures are read from
//! approvals pullgate holds locally and from the legacy cosign tag
//! `sha256-<hex>.sig` in the same upstream repository on every fresh
//! verdict. Verdicts are cached per (digest, name, config
//! generation), so a cached pull costs no signature work; denials are looked
//! at again after [`DENIAL_RECHECK`], since a signature may be added
//! upstream later. When signatures cannot be fetched, the last verdict for
//! the same digest and generation is used, else the pull is denied with
//! `verification-unavailable` (fail closed).
//!
//! Multi-arch: an index passes when it is signed, or when every manifest it
//! lists is signed; the manifests of a passed index then pass too.
//! Depends on `cosign`, `policy`, `upstream`, `store`, `names`, `metrics`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};

use crate::approvals;
use crate::config::PolicyConfig;
use crate::cosign::{self, Rejected};
use crate::keys::PublicKey;
use crate::metrics::Metrics;
use crate::names::{Digest, RepoName};
use crate::policy::{reason, Verdict};
use crate::store::StoredManifest;
use crate::upstream::{BodyError, RequestOptions, UpstreamClient};

/// A denial is re-evaluated after this long.
pub const DENIAL_RECHECK: Duration = Duration::from_secs(60);

/// At most this many manifests of an index are checked one by one.
const MAX_INDEX_CHILDREN: usize = 64;

/// Largest signature manifest read.
const MAX_SIGNATURE_MANIFEST: usize = 1024 * 1024;

#[derive(Clone)]
struct Cached {
    verdict: Verdict,
    at: Instant,
}

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

type MemoMap<V> = std::collections::HashMap<(Digest, u64), Vec<(Box<str>, V)>>;

/// A read-mostly map from (digest, config generation, name) to a value,
/// cheap to consult on every cached pull: one read lock and one hash of the
/// digest, no allocation. It is emptied whole when it outgrows its bound
/// (what it holds can always be worked out again).
pub struct Memo<V> {
    map: std::sync::RwLock<MemoMap<V>>,
    bound: usize,
}

impl<V: Clone> Memo<V> {
    pub fn new(bound: usize) -> Memo<V> {
        Memo {
            map: std::sync::RwLock::new(std::collections::HashMap::new()),
            bound,
        }
    }

    pub fn get(&self, digest: &Digest, generation: u64, name: &str) -> Option<V> {
        let map = self.map.read().expect("memo lock");
        map.get(&(*digest, generation))?
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, v)| v.clone())
    }

    /// Inserts or replaces; returns true when the memo was emptied first.
    pub fn insert(&self, digest: Digest, generation: u64, name: &str, value: V) -> bool {
        let mut map = self.map.write().expect("memo lock");
        let cleared = map.len() >= self.bound;
        if cleared {
            map.clear();
        }
        let names = map.entry((digest, generation)).or_default();
        match names.iter_mut().find(|(n, _)| &**n == name) {
            Some(slot) => slot.1 = value,
            None => names.push((name.into(), value)),
        }
        cleared
    }

    pub fn clear(&self) {
        self.map.write().expect("memo lock").clear();
    }
}

/// Verdict cache and signature checks.
pub struct Verifier {
    /// The store root, where local approvals live.
    store: PathBuf,
    verdicts: Memo<Cached>,
    /// `pullgate_verifications_total{result="cached"}`, resolved once.
    cached: prometheus::IntCounter,
    metrics: Arc<Metrics>,
}

impl Verifier {
    pub fn new(store: &Path, metrics: Arc<Metrics>) -> Verifier {
        Verifier {
            store: store.to_path_buf(),
            verdicts: Memo::new(100_000),
            cached: metrics.verifications.with_label_values(&["cached"]),
            metrics,
        }
    }

    /// The verdict for `manifest` under `policy` (already known to match and
    /// not to deny by name).
    pub async fn verdict(
        &self,
        generation: u64,
        policy: &PolicyConfig,
        upstream: &UpstreamClient,
        repo: &RepoName,
        canonical: &str,
        manifest: &StoredManifest,
    ) -> Verdict {
        let pass = Verdict {
            policy: Some(policy.name.clone()),
            mode: policy.mode,
            reasons: Vec::new(),
        };
        if policy.signed_by.is_empty() {
            return pass;
        }
        let known = self.verdicts.get(&manifest.digest, generation, canonical);
        if let Some(c) = &known {
            // A denial is looked at again after a while, or at once when an
            // approval was recorded locally since.
            let approved_since =
                !c.verdict.passes() && approvals::exists(&self.store, &manifest.digest);
            if c.verdict.passes() || (c.at.elapsed() < DENIAL_RECHECK && !approved_since) {
                self.cached.inc();
                return c.verdict.clone();
            }
        }
        let started = Instant::now();
        let keys: Vec<&PublicKey> = policy.signed_by.iter().map(|k| &k.key).collect();
        let names: Vec<&str> = policy.signed_by.iter().map(|k| k.name.as_str()).collect();
        let result = self.evaluate(upstream, repo, manifest, &keys, &names).await;
        self.metrics
            .verify_duration
            .observe(started.elapsed().as_secs_f64());
        let verdict = match result {
            Ok((reasons, children)) => {
                // The manifests of an index that passed pass too, even if
                // one was denied when asked for alone before.
                if reasons.is_empty() {
                    for child in children {
                        let cached = Cached {
                            verdict: pass.clone(),
                            at: Instant::now(),
                        };
                        self.verdicts.insert(child, generation, canonical, cached);
                    }
                }
                Verdict { reasons, ..pass }
            }
            Err(why) => {
                self.metrics
                    .verifications
                    .with_label_values(&["unavailable"])
                    .inc();
                tracing::warn!(%canonical, digest = %manifest.digest, "cannot fetch signatures: {why}");
                if let Some(c) = known {
                    // Fail closed, unless this digest already has a verdict.
                    return c.verdict;
                }
                return Verdict {
                    reasons: vec![reason::VERIFICATION_UNAVAILABLE],
                    ..pass
                };
            }
        };
        let label = if verdict.passes() { "pass" } else { "fail" };
        self.metrics.verifications.with_label_values(&[label]).inc();
        let cached = Cached {
            verdict: verdict.clone(),
            at: Instant::now(),
        };
        self.verdicts
            .insert(manifest.digest, generation, canonical, cached);
        verdict
    }

    /// Reasons the manifest fails (empty: it passes), and the manifests it
    /// approves when it is an index that passed.
    async fn evaluate(
        &self,
        upstream: &UpstreamClient,
        repo: &RepoName,
        manifest: &StoredManifest,
        keys: &[&PublicKey],
        names: &[&str],
    ) -> Result<(Vec<&'static str>, Vec<Digest>), String> {
        let children = index_children(manifest);
        // Approvals held locally first: no upstream needed.
        if let Ok(i) = approvals::check(&self.store, &manifest.digest, keys) {
            tracing::debug!(%repo, digest = %manifest.digest, key = names[i], "approved locally");
            return Ok((Vec::new(), children.unwrap_or_default()));
        }
        let own = check_signatures(upstream, repo, &manifest.digest, keys, names).await?;
        log_finding(repo, &manifest.digest, &own);
        if let Finding::Signed(_) = own {
            return Ok((Vec::new(), children.unwrap_or_default()));
        }
        // An unsigned index passes when every manifest it lists is signed.
        if let Some(children) = children.filter(|c| !c.is_empty() && c.len() <= MAX_INDEX_CHILDREN)
        {
            let mut all = true;
            for child in &children {
                if approvals::check(&self.store, child, keys).is_ok() {
                    continue;
                }
                let f = check_signatures(upstream, repo, child, keys, names).await?;
                log_finding(repo, child, &f);
                if !matches!(f, Finding::Signed(_)) {
                    all = false;
                    break;
                }
            }
            if all {
                return Ok((Vec::new(), children));
            }
        }
        let why = match own {
            Finding::BadSignatures(_) => reason::BAD_SIGNATURE,
            _ => reason::UNSIGNED,
        };
        Ok((vec![why], Vec::new()))
    }
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

/// The manifests an index lists, or `None` when `m` is not an index.
fn index_children(m: &StoredManifest) -> Option<Vec<Digest>> {
    let v: serde_json::Value = serde_json::from_slice(&m.bytes).ok()?;
    let list = v["manifests"].as_array()?;
    Some(
        list.iter()
            .filter_map(|d| d["digest"].as_str()?.parse().ok())
            .collect(),
    )
}

/// Checks every upstream signature source of `digest`: the legacy `.sig`
/// tag, then sigstore bundles attached as referrers.
/// `Err` when the upstream could not be asked (network, 5xx, 429).
pub async fn check_signatures(
    upstream: &UpstreamClient,
    repo: &RepoName,
    digest: &Digest,
    keys: &[&PublicKey],
    names: &[&str],
) -> Result<Finding, String> {
    let legacy = check_legacy(upstream, repo, digest, keys, names).await?;
    if let Finding::Signed(_) = legacy {
        return Ok(legacy);
    }
    let bundles = check_bundles(upstream, repo, digest, keys, names).await?;
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

/// What a small upstream GET returned.
enum Got {
    Body(Bytes),
    /// Any status but 200.
    Status(StatusCode),
    /// A 200 whose body was over the limit.
    TooLarge,
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// GETs `/v2/<repo>/<path>` and reads at most `max` bytes of a 200 answer.
/// `Err` only when the upstream could not be asked.
async fn get_small(
    upstream: &UpstreamClient,
    repo: &RepoName,
    path: &str,
    accept: Option<&'static str>,
    query: Option<String>,
    max: usize,
) -> Result<Got, String> {
    let opts = RequestOptions {
        accept: accept.map(HeaderValue::from_static),
        query,
        ..RequestOptions::default()
    };
    let resp = upstream
        .send(Method::GET, repo, path, &opts)
        .await
        .map_err(|e| e.to_string())?;
    if resp.status() != StatusCode::OK {
        return Ok(Got::Status(resp.status()));
    }
    Ok(match read_limited(upstream, resp, max).await? {
        Some(b) => Got::Body(b),
        None => Got::TooLarge,
    })
}

/// Finds sigstore bundles referring to `digest` (referrers API, else the
/// `sha256-<hex>` tag) and checks each.
async fn check_bundles(
    upstream: &UpstreamClient,
    repo: &RepoName,
    digest: &Digest,
    keys: &[&PublicKey],
    names: &[&str],
) -> Result<Finding, String> {
    let query = format!(
        "artifactType={}",
        cosign::BUNDLE_MEDIA_TYPE.replace('+', "%2B")
    );
    let path = format!("referrers/{digest}");
    let mut listed = get_small(
        upstream,
        repo,
        &path,
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
    if matches!(listed, Got::Status(s) if no_api.contains(&s)) {
        let path = format!("manifests/{}", cosign::referrers_tag(digest));
        listed = get_small(
            upstream,
            repo,
            &path,
            Some(OCI_INDEX),
            None,
            MAX_SIGNATURE_MANIFEST,
        )
        .await?;
    }
    let index = match listed {
        Got::Body(b) => b,
        Got::Status(StatusCode::NOT_FOUND) => return Ok(Finding::Unsigned),
        Got::Status(s) => {
            return Err(format!(
                "upstream {} answered {s} listing referrers of {digest}",
                upstream.name
            ))
        }
        Got::TooLarge => {
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
        let path = format!("manifests/{r}");
        let m = match get_small(
            upstream,
            repo,
            &path,
            Some(OCI_MANIFEST),
            None,
            MAX_SIGNATURE_MANIFEST,
        )
        .await?
        {
            Got::Body(m) if Digest::of(&m) == r => m,
            Got::Body(_) => {
                problems.push(format!(
                    "bundle manifest {r}: bytes do not match the digest"
                ));
                continue;
            }
            Got::Status(s) => {
                problems.push(format!("bundle manifest {r}: upstream answered {s}"));
                continue;
            }
            Got::TooLarge => {
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
        let path = format!("blobs/{layer}");
        let bundle = match get_small(
            upstream,
            repo,
            &path,
            None,
            None,
            cosign::MAX_BUNDLE_SIZE as usize,
        )
        .await?
        {
            Got::Body(b) if Digest::of(&b) == layer => b,
            Got::Status(s) => {
                problems.push(format!("bundle {layer}: upstream answered {s}"));
                continue;
            }
            _ => {
                problems.push(format!("bundle {layer}: {}", Rejected::PayloadMismatch));
                continue;
            }
        };
        match cosign::check_bundle(&bundle, digest, keys) {
            Ok(i) => return Ok(Finding::Signed(names[i].to_owned())),
            Err(e) => problems.push(format!("bundle {layer}: {e}")),
        }
    }
    Ok(Finding::BadSignatures(problems))
}

/// Reads the `.sig` tag of `digest` and checks each signature layer.
async fn check_legacy(
    upstream: &UpstreamClient,
    repo: &RepoName,
    digest: &Digest,
    keys: &[&PublicKey],
    names: &[&str],
) -> Result<Finding, String> {
    let tag = cosign::signature_tag(digest);
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
    let path = format!("manifests/{tag}");
    let bytes = match get_small(
        upstream,
        repo,
        &path,
        Some(accept),
        None,
        MAX_SIGNATURE_MANIFEST,
    )
    .await?
    {
        Got::Body(b) => b,
        Got::Status(StatusCode::NOT_FOUND) => return Ok(Finding::Unsigned),
        Got::Status(s) => return Err(format!("upstream {} answered {s} for {tag}", upstream.name)),
        Got::TooLarge => {
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
        let path = format!("blobs/{}", layer.payload);
        let payload = match get_small(
            upstream,
            repo,
            &path,
            None,
            None,
            cosign::MAX_PAYLOAD_SIZE as usize,
        )
        .await?
        {
            Got::Body(b) => b,
            // An oversized payload cannot match its (small) descriptor.
            Got::TooLarge => Bytes::new(),
            Got::Status(StatusCode::NOT_FOUND) => {
                problems.push(format!("payload {} is missing upstream", layer.payload));
                continue;
            }
            Got::Status(s) => {
                return Err(format!(
                    "upstream {} answered {s} for payload {}",
                    upstream.name, layer.payload
                ))
            }
        };
        match cosign::check(layer, &payload, digest, keys) {
            Ok(i) => return Ok(Finding::Signed(names[i].to_owned())),
            Err(e) => problems.push(e.to_string()),
        }
    }
    Ok(Finding::BadSignatures(problems))
}

/// Reads at most `max` bytes; `None` when the body is longer.
async fn read_limited(
    upstream: &UpstreamClient,
    resp: reqwest::Response,
    max: usize,
) -> Result<Option<Bytes>, String> {
    match upstream.read_body(resp, max as u64).await {
        Ok(b) => Ok(Some(b)),
        Err(BodyError::TooLarge) => Ok(None),
        Err(BodyError::Stalled) => Err(format!("upstream {} stalled", upstream.name)),
        Err(BodyError::Broken(e)) => Err(format!("upstream {}: {e}", upstream.name)),
    }
}

/// How `pullgate verify` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
}

/// Evaluates policy for `image` (`NAME[:TAG]` or `NAME@DIGEST`) without
/// serving it, writing each step as a line of `out`. Nothing is stored.
/// `Err` when the image or its signatures cannot be fetched.
pub async fn explain(
    config: &crate::config::Config,
    image: &str,
    out: &mut Vec<String>,
) -> Result<Outcome, String> {
    use crate::names::Reference;
    let (name, reference) = split_image(image)?;
    let router = crate::route::Router::for_upstreams(&config.upstreams);
    let route = router.route(&name, None).map_err(|e| e.message)?;
    out.push(format!(
        "name: {} (upstream {}, repository {})",
        route.canonical, route.upstream_name, route.repo
    ));
    let policies = crate::policy::Policies::new(config.policies.clone());
    let Some(policy) = policies.matching(&route.canonical) else {
        out.push("policy: none matches this name; unmatched names are denied (no-policy)".into());
        return Ok(Outcome::Denied);
    };
    let keys: Vec<&PublicKey> = policy.signed_by.iter().map(|k| &k.key).collect();
    let names: Vec<&str> = policy.signed_by.iter().map(|k| k.name.as_str()).collect();
    out.push(format!(
        "policy: {:?} (mode {}, patterns {:?}){}",
        policy.name,
        policy.mode.as_str(),
        policy.patterns,
        if policy.deny {
            ", deny = true".to_owned()
        } else if names.is_empty() {
            ", no requirements".to_owned()
        } else {
            format!(", signed_by {names:?}")
        }
    ));
    if policy.deny {
        out.push("verdict: denied (denied-by-policy)".into());
        return Ok(Outcome::Denied);
    }
    let metrics = Arc::new(Metrics::new());
    let upstream_cfg = config
        .upstream(&route.upstream_name)
        .expect("routed to a configured upstream");
    let upstream = UpstreamClient::new(upstream_cfg, metrics)?;
    let opts = RequestOptions {
        accept: Some(HeaderValue::from_static(crate::handler::DEFAULT_ACCEPT)),
        ..RequestOptions::default()
    };
    let resp = upstream
        .send(
            Method::GET,
            &route.repo,
            &format!("manifests/{reference}"),
            &opts,
        )
        .await
        .map_err(|e| e.to_string())?;
    if resp.status() != StatusCode::OK {
        return Err(format!(
            "upstream {} answered {} for {}:{reference}",
            upstream.name,
            resp.status(),
            route.repo
        ));
    }
    let bytes = read_limited(&upstream, resp, config.server.max_manifest_size as usize)
        .await?
        .ok_or("manifest over server.max_manifest_size")?;
    let digest = Digest::of(&bytes);
    if let Reference::Digest(want) = &reference {
        if *want != digest {
            return Err(format!(
                "upstream sent bytes for {want} that hash to {digest}"
            ));
        }
    }
    let manifest = StoredManifest {
        digest,
        media_type: String::new(),
        bytes,
    };
    let children = index_children(&manifest);
    out.push(format!(
        "manifest: {digest}{}",
        match &children {
            Some(c) => format!(" (an index of {} manifests)", c.len()),
            None => String::new(),
        }
    ));
    if keys.is_empty() {
        out.push("verdict: allowed (the policy has no requirements)".into());
        return Ok(Outcome::Allowed);
    }
    let store = &config.storage.path;
    let signed = |finding: &Finding| matches!(finding, Finding::Signed(_));
    let explain_one =
        async |d: &Digest, label: &str, out: &mut Vec<String>| -> Result<bool, String> {
            match approvals::check(store, d, &keys) {
                Ok(i) => {
                    out.push(format!(
                        "  {label}: approved locally, verified with key {:?}",
                        names[i]
                    ));
                    return Ok(true);
                }
                Err(why) if !why.is_empty() => {
                    for w in why {
                        out.push(format!("  {label}: {w}"));
                    }
                }
                Err(_) => out.push(format!("  {label}: no local approvals")),
            }
            let f = check_signatures(&upstream, &route.repo, d, &keys, &names).await?;
            match &f {
                Finding::Signed(k) => out.push(format!(
                    "  {label}: signature in {} verified with key {k:?}",
                    cosign::signature_tag(d)
                )),
                Finding::Unsigned => out.push(format!(
                    "  {label}: no signatures ({} is absent or empty)",
                    cosign::signature_tag(d)
                )),
                Finding::BadSignatures(why) => {
                    for w in why {
                        out.push(format!("  {label}: signature rejected: {w}"));
                    }
                }
            }
            Ok(signed(&f))
        };
    out.push("signatures:".into());
    if explain_one(&digest, "manifest", out).await? {
        out.push("verdict: allowed (signed)".into());
        return Ok(Outcome::Allowed);
    }
    if let Some(children) = children.filter(|c| !c.is_empty() && c.len() <= MAX_INDEX_CHILDREN) {
        out.push("the index is not signed itself; checking every manifest it lists:".into());
        let mut all = true;
        for c in &children {
            all &= explain_one(c, &c.to_string(), out).await?;
        }
        if all {
            out.push("verdict: allowed (every manifest of the index is signed)".into());
            return Ok(Outcome::Allowed);
        }
    }
    out.push(format!(
        "verdict: {} (unsigned or bad-signature)",
        if policy.mode == crate::config::Mode::Audit {
            "would be denied; served with a warning in audit mode"
        } else {
            "denied"
        }
    ));
    Ok(Outcome::Denied)
}

/// Splits `NAME[:TAG]` or `NAME@DIGEST`.
fn split_image(image: &str) -> Result<(RepoName, crate::names::Reference), String> {
    use crate::names::Reference;
    if let Some((name, digest)) = image.rsplit_once('@') {
        let d: Digest = digest.parse().map_err(|e| format!("{e}"))?;
        return Ok((
            name.parse().map_err(|e| format!("{e}"))?,
            Reference::Digest(d),
        ));
    }
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match image[last_slash..].rfind(':') {
        Some(i) => (&image[..last_slash + i], &image[last_slash + i + 1..]),
        None => (image, "latest"),
    };
    Ok((
        name.parse().map_err(|e| format!("{e}"))?,
        Reference::Tag(tag.parse().map_err(|e| format!("{e}"))?),
    ))
}

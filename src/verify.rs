//! The verify step: does a fetched manifest meet its policy's content
//! requirements, signatures (`signed_by`) and bases (`bases`)?
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
//! The base check (`bases`) reads the [`BaseTable`] the base refresher
//! publishes here; a new table empties the verdict cache.
//! Depends on `bases`, `cosign`, `policy`, `upstream`, `store`, `names`,
//! `metrics`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};

use crate::approvals;
use crate::bases::{self, BaseTable};
use crate::config::PolicyConfig;
use crate::cosign::{self, Rejected};
use crate::keys::PublicKey;
use crate::metrics::Metrics;
use crate::names::{Digest, RepoName};
use crate::policy::{reason, Verdict};
use crate::store::StoredManifest;
use crate::upstream::{BodyError, RequestOptions, UpstreamClient};

/// How long a fresh verdict waits for the first resolution of its bases.
pub const BASE_WAIT: Duration = Duration::from_secs(30);

/// Reasons (empty: passes), words of the base check, and the manifests of
/// an index the base check approved.
type Evaluated = (Vec<&'static str>, Option<String>, Option<Vec<Digest>>);

/// A denial is re-evaluated after this long.
pub const DENIAL_RECHECK: Duration = Duration::from_secs(60);

/// At most this many manifests of an index are checked one by one.
pub(crate) const MAX_INDEX_CHILDREN: usize = 64;

/// Largest signature manifest read.
const MAX_SIGNATURE_MANIFEST: usize = 1024 * 1024;

#[derive(Clone)]
struct Cached {
    verdict: Verdict,
    at: Instant,
    /// The base table it was reached with (see [`Verifier::set_bases`]).
    bases: u64,
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
    /// The base images, as last resolved.
    bases: arc_swap::ArcSwap<BaseTable>,
    /// Bumped whenever `bases` is replaced.
    bases_version: tokio::sync::watch::Sender<u64>,
    /// The same number, read on every cached pull without a lock.
    bases_current: std::sync::atomic::AtomicU64,
}

impl Verifier {
    pub fn new(store: &Path, metrics: Arc<Metrics>) -> Verifier {
        Verifier {
            store: store.to_path_buf(),
            verdicts: Memo::new(100_000),
            cached: metrics.verifications.with_label_values(&["cached"]),
            metrics,
            bases: arc_swap::ArcSwap::from_pointee(BaseTable::default()),
            bases_version: tokio::sync::watch::Sender::new(0),
            bases_current: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Publishes newly resolved base images. Verdicts reached with the old
    /// table are forgotten, so a denied image is looked at again.
    pub fn set_bases(&self, table: BaseTable) {
        // Bump first: a verdict still being reached with the old table is
        // stamped with the old number and not used once stored.
        self.bases_current
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.bases_version.send_modify(|v| *v += 1);
        self.bases.store(Arc::new(table));
        self.verdicts.clear();
    }

    fn bases_version(&self) -> u64 {
        self.bases_current.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn bases(&self) -> Arc<BaseTable> {
        self.bases.load_full()
    }

    /// Waits (at most [`BASE_WAIT`]) until a refresh has resolved `sets`
    /// as the current config (`wanted`) defines them: pulls right after
    /// start-up or a reload wait for their bases instead of being judged
    /// against missing or outdated ones. After the wait, sets still not
    /// resolved give no verdict (`verification-unavailable`).
    async fn wait_for_bases(&self, wanted: &[crate::config::BaseSet], sets: &[String]) {
        if self.bases.load().built_from(wanted, sets) {
            return;
        }
        let mut rx = self.bases_version.subscribe();
        let _ = tokio::time::timeout(BASE_WAIT, async {
            while !self.bases.load().built_from(wanted, sets) {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// The verdict for `manifest` under `policy` (already known to match and
    /// not to deny by name). `wanted` is the config's `[bases]`; `source`
    /// fetches what the base check needs.
    #[allow(clippy::too_many_arguments)]
    pub async fn verdict<S: bases::Source>(
        &self,
        generation: u64,
        wanted: &[crate::config::BaseSet],
        policy: &PolicyConfig,
        upstream: &UpstreamClient,
        repo: &RepoName,
        canonical: &str,
        manifest: &StoredManifest,
        source: &S,
    ) -> Verdict {
        let pass = Verdict::of(policy, Vec::new());
        if !policy.checks_content() {
            return pass;
        }
        let known = self.verdicts.get(&manifest.digest, generation, canonical);
        // Under `bases`, only a verdict reached with the current table counts.
        let current = |c: &Cached| policy.bases.is_empty() || c.bases == self.bases_version();
        if let Some(c) = known.as_ref().filter(|c| current(c)) {
            // A denial is looked at again after a while, or at once when an
            // approval was recorded locally since.
            let approved_since =
                !c.verdict.passes() && approvals::exists(&self.store, &manifest.digest);
            if c.verdict.passes() || (c.at.elapsed() < DENIAL_RECHECK && !approved_since) {
                self.cached.inc();
                return c.verdict.clone();
            }
        }
        if !policy.bases.is_empty() {
            self.wait_for_bases(wanted, &policy.bases).await;
        }
        let table_version = self.bases_version();
        let started = Instant::now();
        // Boxed: the fresh-verdict future is large, and keeping it inline
        // would make every cached pull carry (and move) it.
        let result = Box::pin(self.evaluate(upstream, repo, manifest, policy, source)).await;
        self.metrics
            .verify_duration
            .observe(started.elapsed().as_secs_f64());
        let verdict = match result {
            Ok((reasons, detail, checked)) => {
                // The manifests of an index that passed pass too, even if
                // one was denied when asked for alone before; under `bases`
                // only those the base check looked at.
                if reasons.is_empty() {
                    let by_index: Arc<str> =
                        Arc::from(format!("listed by index {} that passed", manifest.digest));
                    let children = checked.or_else(|| index_children(manifest));
                    for child in children.unwrap_or_default() {
                        let cached = Cached {
                            verdict: Verdict {
                                detail: Some(by_index.clone()),
                                ..pass.clone()
                            },
                            at: Instant::now(),
                            bases: table_version,
                        };
                        self.verdicts.insert(child, generation, canonical, cached);
                    }
                }
                Verdict {
                    reasons,
                    detail: detail.map(Arc::from),
                    ..pass
                }
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
                    detail: Some(Arc::from(why)),
                    ..pass
                };
            }
        };
        let label = if verdict.passes() { "pass" } else { "fail" };
        self.metrics.verifications.with_label_values(&[label]).inc();
        let cached = Cached {
            verdict: verdict.clone(),
            at: Instant::now(),
            bases: table_version,
        };
        self.verdicts
            .insert(manifest.digest, generation, canonical, cached);
        verdict
    }

    /// Reasons the manifest fails (empty: it passes), with the base check's
    /// words and, for an index, the manifests it checked, when the policy
    /// has bases.
    async fn evaluate<S: bases::Source>(
        &self,
        upstream: &UpstreamClient,
        repo: &RepoName,
        manifest: &StoredManifest,
        policy: &PolicyConfig,
        source: &S,
    ) -> Result<Evaluated, String> {
        let mut reasons = Vec::new();
        if !policy.signed_by.is_empty() {
            let keys: Vec<&PublicKey> = policy.signed_by.iter().map(|k| &k.key).collect();
            let names: Vec<&str> = policy.signed_by.iter().map(|k| k.name.as_str()).collect();
            if let Some(why) = self
                .signatures(upstream, repo, manifest, &keys, &names)
                .await?
            {
                reasons.push(why);
            }
        }
        let mut detail = None;
        let mut checked = None;
        if !policy.bases.is_empty() {
            let table = self.bases.load_full();
            let out = bases::check_manifest(&table, &policy.bases, manifest, source).await?;
            tracing::debug!(%repo, digest = %manifest.digest, passes = out.passes, "base check: {}", out.detail);
            if !out.passes {
                reasons.push(reason::BASE_NOT_ALLOWED);
            }
            detail = Some(out.detail);
            checked = Some(out.checked);
        }
        Ok((reasons, detail, checked))
    }

    /// Why the manifest fails the signature requirement (`None`: it passes).
    async fn signatures(
        &self,
        upstream: &UpstreamClient,
        repo: &RepoName,
        manifest: &StoredManifest,
        keys: &[&PublicKey],
        names: &[&str],
    ) -> Result<Option<&'static str>, String> {
        let children = index_children(manifest);
        // Approvals held locally first: no upstream needed.
        if let Ok(i) = approvals::check(&self.store, &manifest.digest, keys) {
            tracing::debug!(%repo, digest = %manifest.digest, key = names[i], "approved locally");
            return Ok(None);
        }
        let own = check_signatures(upstream, repo, &manifest.digest, keys, names).await?;
        log_finding(repo, &manifest.digest, &own);
        if let Finding::Signed(_) = own {
            return Ok(None);
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
                return Ok(None);
            }
        }
        Ok(Some(match own {
            Finding::BadSignatures(_) => reason::BAD_SIGNATURE,
            _ => reason::UNSIGNED,
        }))
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
pub(crate) fn index_children(m: &StoredManifest) -> Option<Vec<Digest>> {
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

/// A blob of at most `max` bytes from the upstream, checked against its
/// digest; `None` when it cannot be had.
pub(crate) async fn get_blob(
    upstream: &UpstreamClient,
    repo: &RepoName,
    digest: Digest,
    max: usize,
) -> Option<Bytes> {
    let path = format!("blobs/{digest}");
    match get_small(upstream, repo, &path, None, None, max).await {
        Ok(Got::Body(b)) if Digest::of(&b) == digest => Some(b),
        _ => None,
    }
}

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
pub(crate) async fn read_limited(
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

//! The verify step: does a fetched manifest meet its policy's content
//! requirements, signatures (`signed_by`) and bases (`bases`)?
//!
//! Runs between "manifest fetched" and "response". Signatures are read
//! through the content layer on every fresh verdict ([`signatures`]): local
//! approvals, the legacy cosign tag `sha256-<hex>.sig` in the same
//! repository, and sigstore bundles attached as referrers. Verdicts are
//! cached per (digest, name, config
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
//! A trace, when the request carries one, gets every finding in words.
//! Depends on `content`, `remote`, `policy`, `config`, `oci`, `metrics`.

pub mod approvals;
pub mod bases;
pub mod cosign;
pub mod signatures;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::PolicyConfig;
use crate::content::ContentError;
use crate::metrics::Metrics;
use crate::oci::names::Digest;
use crate::oci::Manifest;
use crate::policy::{Reason, Verdict};
use crate::trace::Trace;
use crate::trace_line;
use bases::BaseTable;
use signatures::{Finding, Keys, Sources};

/// How long a fresh verdict waits for the first resolution of its bases.
pub const BASE_WAIT: Duration = Duration::from_secs(30);

/// Reasons (empty: passes), words of the base check, and the manifests of
/// an index the base check approved.
type Evaluated = (Vec<Reason>, Option<String>, Option<Vec<Digest>>);

/// A denial is re-evaluated after this long.
pub const DENIAL_RECHECK: Duration = Duration::from_secs(60);

/// At most this many manifests of an index are checked one by one.
pub(crate) const MAX_INDEX_CHILDREN: usize = 64;

#[derive(Clone)]
struct Cached {
    verdict: Verdict,
    at: Instant,
    /// The base table it was reached with (see [`Verifier::set_bases`]).
    bases: u64,
}

/// Names one digest is remembered under; the oldest goes first.
pub const NAMES_PER_DIGEST: usize = 16;

type MemoMap<V> = std::collections::HashMap<(Digest, u64), Vec<(Box<str>, V)>>;

/// A read-mostly map from (digest, config generation, name) to a value,
/// cheap to consult on every cached pull: one read lock and one hash of the
/// digest, no allocation. It is emptied whole when it outgrows its bound
/// (what it holds can always be worked out again). One digest keeps at
/// most [`NAMES_PER_DIGEST`] names: a client asking for one stored digest
/// under ever new names cannot grow it, nor slow its lookups.
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
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.get(&(*digest, generation))?
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, v)| v.clone())
    }

    /// Inserts or replaces; returns true when the memo was emptied first.
    pub fn insert(&self, digest: Digest, generation: u64, name: &str, value: V) -> bool {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let cleared = map.len() >= self.bound;
        if cleared {
            map.clear();
        }
        let names = map.entry((digest, generation)).or_default();
        match names.iter_mut().find(|(n, _)| &**n == name) {
            Some(slot) => slot.1 = value,
            None => {
                if names.len() >= NAMES_PER_DIGEST {
                    names.remove(0);
                }
                names.push((name.into(), value));
            }
        }
        cleared
    }

    pub fn clear(&self) {
        self.map.write().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// What a verdict is reached for, and with what.
pub struct Ask<'a, S> {
    /// The config generation: verdicts are cached per generation.
    pub generation: u64,
    /// The config's `[bases]`.
    pub wanted: &'a [crate::config::BaseSet],
    pub policy: &'a PolicyConfig,
    /// `<upstream>/<repository>`: verdicts are cached per name too.
    pub canonical: &'a str,
    /// Where signatures are read.
    pub sources: Sources<'a>,
    /// What the base check fetches.
    pub bases: &'a S,
    /// Each step in words, for `pullgate verify`.
    pub trace: Option<&'a Trace>,
}

/// Verdict cache and signature checks.
pub struct Verifier {
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
    /// What the last refresh could not resolve, for traces.
    base_failures: std::sync::Mutex<Vec<bases::Failure>>,
}

impl Verifier {
    pub fn new(metrics: Arc<Metrics>) -> Verifier {
        Verifier {
            verdicts: Memo::new(100_000),
            cached: metrics.verifications.with_label_values(&["cached"]),
            metrics,
            bases: arc_swap::ArcSwap::from_pointee(BaseTable::default()),
            bases_version: tokio::sync::watch::Sender::new(0),
            bases_current: std::sync::atomic::AtomicU64::new(0),
            base_failures: std::sync::Mutex::new(Vec::new()),
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

    /// Notes what the last refresh could not resolve.
    pub fn set_base_failures(&self, failures: Vec<bases::Failure>) {
        *self.base_failures.lock().unwrap_or_else(|e| e.into_inner()) = failures;
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

    /// The verdict for `manifest` under `ask.policy` (already known to
    /// match and not to deny by name).
    pub async fn verdict<S: bases::Source>(
        &self,
        ask: &Ask<'_, S>,
        manifest: &Manifest,
    ) -> Verdict {
        let Ask {
            generation,
            wanted,
            policy,
            canonical,
            ref sources,
            bases: source,
            trace,
        } = *ask;
        let from = sources;
        let pass = Verdict::of(policy, Vec::new());
        if !policy.checks_content() {
            return pass;
        }
        let known = self.verdicts.get(&manifest.digest, generation, canonical);
        // Under `bases`, only a verdict reached with the current table counts.
        let current = |c: &Cached| policy.bases.is_empty() || c.bases == self.bases_version();
        if let Some(c) = known.as_ref().filter(|c| current(c) && trace.is_none()) {
            if c.verdict.passes() {
                self.cached.inc();
                return c.verdict.clone();
            }
            // A denial is looked at again after a while, or at once when an
            // approval was recorded locally since.
            if c.at.elapsed() < DENIAL_RECHECK && !Box::pin(approved_since(from, manifest)).await {
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
        let result = Box::pin(self.evaluate(from, manifest, policy, source, trace)).await;
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
                    let children = checked.or_else(|| manifest.index_children());
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
                trace_line!(trace, "  no verdict: {why}");
                if let Some(c) = known {
                    // Fail closed, unless this digest already has a verdict.
                    return c.verdict;
                }
                return Verdict {
                    reasons: vec![Reason::VerificationUnavailable],
                    detail: Some(Arc::from(why.to_string())),
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
        from: &Sources<'_>,
        manifest: &Manifest,
        policy: &PolicyConfig,
        source: &S,
        trace: Option<&Trace>,
    ) -> Result<Evaluated, Unavailable> {
        let mut reasons = Vec::new();
        if policy.requires_signature() {
            let keys = Keys {
                keys: policy.signed_by.iter().map(|k| &k.key).collect(),
                names: policy.signed_by.iter().map(|k| k.name.as_str()).collect(),
                identities: policy.signed_by_identities.iter().collect(),
                keyless: policy.keyless.as_deref(),
            };
            trace_line!(trace, "signatures:");
            if let Some(why) = signatures(from, manifest, &keys, trace).await? {
                reasons.push(why);
            }
        }
        let mut detail = None;
        let mut checked = None;
        if !policy.bases.is_empty() {
            let table = self.bases.load_full();
            if let Some(t) = trace {
                self.trace_bases(t, &table, &policy.bases);
            }
            let out = bases::check_manifest(&table, &policy.bases, manifest, source).await?;
            tracing::debug!(repo = %from.repo, digest = %manifest.digest, passes = out.passes, "base check: {}", out.detail);
            trace_line!(trace, "  image: {}", out.detail);
            if !out.passes {
                reasons.push(Reason::BaseNotAllowed);
            }
            detail = Some(out.detail);
            checked = Some(out.checked);
        }
        Ok((reasons, detail, checked))
    }
}

impl Verifier {
    /// The base sets a policy allows, as resolved, in words.
    fn trace_bases(&self, t: &Trace, table: &BaseTable, sets: &[String]) {
        t.line("bases:");
        for set in table.source.iter().filter(|s| sets.contains(&s.name)) {
            let n = table.images.iter().filter(|b| *b.set == *set.name).count();
            let images: Vec<&str> = set.images.iter().map(|i| i.image.as_str()).collect();
            t.line(format!(
                "  base {:?}: {} ({n} manifests, current and earlier digests)",
                set.name,
                images.join(", ")
            ));
        }
        let failures = self.base_failures.lock().unwrap_or_else(|e| e.into_inner());
        for f in failures.iter().filter(|f| sets.contains(&f.set)) {
            t.line(format!("  base not resolved: {f}"));
        }
    }
}

/// Why no verdict could be reached: a signature source or a base could not
/// be read (fail closed).
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error(transparent)]
    Signatures(#[from] ContentError),
    #[error(transparent)]
    Bases(#[from] bases::BaseError),
}

/// Whether an approval of the manifest has been recorded (a cached denial
/// is then looked at again at once).
async fn approved_since(from: &Sources<'_>, manifest: &Manifest) -> bool {
    from.content
        .store
        .approvals(&manifest.digest)
        .await
        .is_ok_and(|a| !a.is_empty())
}

/// Why the manifest fails the signature requirement (`None`: it passes).
async fn signatures(
    from: &Sources<'_>,
    manifest: &Manifest,
    keys: &Keys<'_>,
    trace: Option<&Trace>,
) -> Result<Option<Reason>, ContentError> {
    let own = from
        .check(&manifest.digest, keys, "manifest", trace)
        .await?;
    if let Finding::Signed(_) = own {
        return Ok(None);
    }
    // An unsigned index passes when every manifest it lists is signed.
    let children = manifest
        .index_children()
        .filter(|c| !c.is_empty() && c.len() <= MAX_INDEX_CHILDREN);
    if let Some(children) = children {
        trace_line!(
            trace,
            "  the index is not signed itself; checking every manifest it lists:"
        );
        let mut all = true;
        for child in &children {
            let f = from.check(child, keys, &child.to_string(), trace).await?;
            if !matches!(f, Finding::Signed(_)) {
                all = false;
                // A trace explains every one; a pull needs only the first.
                if trace.is_none() {
                    break;
                }
            }
        }
        if all {
            trace_line!(trace, "  every manifest of the index is signed");
            return Ok(None);
        }
    }
    Ok(Some(match own {
        Finding::BadSignatures(_) => Reason::BadSignature,
        _ => Reason::Unsigned,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_is_remembered_under_a_bounded_number_of_names() {
        let memo = Memo::new(100);
        let d = Digest::of(b"x");
        for i in 0..1000 {
            memo.insert(d, 1, &format!("docker.io/n{i}"), i);
        }
        let map = memo.map.read().unwrap();
        assert_eq!(map[&(d, 1)].len(), NAMES_PER_DIGEST);
        drop(map);
        assert_eq!(memo.get(&d, 1, "docker.io/n999"), Some(999));
        assert_eq!(memo.get(&d, 1, "docker.io/n0"), None);
    }
}

//! The base-image allow-list: is an image built on a vetted base?
//!
//! An image manifest is on a base when its layer list begins with the base
//! manifest's complete layer list (for a multi-arch base, the manifest of
//! the same platform). Only layer digests count, which pullgate can verify;
//! what an image says about itself (config `rootfs.diff_ids`, the
//! `org.opencontainers.image.base.*` annotations) is never read. An index
//! is on a base when every platform manifest it lists is.
//!
//! Bases given by tag move: [`refresh`] resolves them at start-up and every
//! `storage.base_refresh`, and every digest a base tag has had stays allowed
//! ([`History`], persisted in the store, bounded by `storage.base_keep`).
//! The result is a [`BaseTable`] held in memory, so a check is a prefix
//! compare. [`Refresher`] runs the refreshes. Depends on `config`, `oci`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::{BaseRef, BaseSet};
use crate::oci::names::{Digest, Reference};
use crate::oci::{Manifest, Platform};

/// At most this many manifests of one index are looked at.
pub const MAX_INDEX_MANIFESTS: usize = 64;

/// Where base history lives under the store root.
pub const HISTORY_FILE: &str = "bases/history.json";

/// One base image manifest (one platform of a multi-arch base).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseImage {
    /// The `[bases]` set it belongs to.
    pub set: Arc<str>,
    /// The reference as configured, e.g. `gcr.io/distroless/static:nonroot`.
    pub image: Arc<str>,
    /// The image manifest's digest.
    pub digest: Digest,
    /// `None` when the base is a single image manifest (any platform).
    pub platform: Option<Platform>,
    pub layers: Vec<Digest>,
}

/// Every base image manifest images may be built on, per set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BaseTable {
    pub images: Vec<BaseImage>,
    /// Sets with a reference that could not be resolved at all.
    pub unresolved: HashSet<String>,
    /// The `[bases]` the table was built from: the sets a refresh has
    /// looked at (resolved or not).
    pub source: Vec<BaseSet>,
}

/// What the base check found for one image manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Built on this base.
    Base {
        set: String,
        image: String,
        digest: Digest,
    },
    /// On no allowed base; the closest: (set, image, layers matched, base
    /// layers).
    NoBase {
        closest: Option<(String, String, usize, usize)>,
    },
    /// No verdict: an allowed set has no resolved image yet.
    Unresolved(String),
}

impl BaseTable {
    /// Checks an image manifest's layer list against the bases of `sets`.
    /// `platform` is the image's platform when known; a base of another
    /// platform is not compared.
    pub fn check(&self, sets: &[String], layers: &[Digest], platform: Option<&Platform>) -> Found {
        let mut closest: Option<(&BaseImage, usize)> = None;
        for base in self
            .images
            .iter()
            .filter(|b| sets.iter().any(|s| **s == *b.set))
        {
            if base.layers.is_empty() {
                continue;
            }
            if let (Some(p), Some(bp)) = (platform, &base.platform) {
                if !p.matches(bp) {
                    continue;
                }
            }
            let common = layers
                .iter()
                .zip(&base.layers)
                .take_while(|(a, b)| a == b)
                .count();
            if common == base.layers.len() {
                return Found::Base {
                    set: base.set.to_string(),
                    image: base.image.to_string(),
                    digest: base.digest,
                };
            }
            if closest.is_none_or(|(_, c)| common > c) {
                closest = Some((base, common));
            }
        }
        if let Some(s) = sets
            .iter()
            .find(|s| self.unresolved.contains(*s) || self.set(s).is_none())
        {
            return Found::Unresolved(s.clone());
        }
        Found::NoBase {
            closest: closest
                .map(|(b, c)| (b.set.to_string(), b.image.to_string(), c, b.layers.len())),
        }
    }

    /// Whether the table was built from `wanted` (the current config's
    /// `[bases]`) as far as `sets` go: a refresh has looked at each of them
    /// as configured now.
    pub fn built_from(&self, wanted: &[BaseSet], sets: &[String]) -> bool {
        sets.iter().all(|name| {
            self.set(name)
                .is_some_and(|s| wanted.iter().any(|w| w == s))
        })
    }

    /// The set named `name` as the table was built from it.
    fn set(&self, name: &str) -> Option<&BaseSet> {
        self.source.iter().find(|s| s.name == name)
    }

    /// Whether any base of `sets` is per platform (so an image's platform
    /// matters).
    pub fn needs_platform(&self, sets: &[String]) -> bool {
        self.images
            .iter()
            .any(|b| b.platform.is_some() && sets.iter().any(|s| **s == *b.set))
    }
}

/// What the base check reads of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Image {
        layers: Vec<Digest>,
        config: Option<Digest>,
    },
    /// The platform manifests an index lists. Entries that are not images
    /// (buildx attestations, `unknown/unknown`) are left out.
    Index(Vec<(Digest, Option<Platform>)>),
}

/// Reads the layers (image) or platform manifests (index) of a manifest.
pub fn parse(m: &Manifest) -> Result<Parsed, String> {
    if m.is_index() {
        return Ok(Parsed::Index(m.platform_manifests()?));
    }
    Ok(Parsed::Image {
        layers: m.layers()?,
        config: m.config(),
    })
}

/// Why no base verdict could be reached.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BaseError {
    #[error("base {0:?} has not been resolved (its upstream has not answered yet)")]
    Unresolved(String),
    /// A manifest or tag the check needs could not be had.
    #[error(transparent)]
    Content(#[from] crate::content::ContentError),
    /// A base reference that does not route (config was checked; a reload
    /// may have removed its upstream).
    #[error("{0}")]
    Route(String),
    /// A base manifest the table cannot use.
    #[error("{0}")]
    Unreadable(String),
}

/// Fetches what a base check needs. The server fetches through its store
/// and single-flight machinery; `pullgate verify` asks the upstream.
pub trait Source {
    /// A manifest of the image's repository, by digest.
    fn manifest(
        &self,
        digest: Digest,
    ) -> impl std::future::Future<Output = Result<Arc<Manifest>, BaseError>> + Send;
    /// The platform an image config blob states (`None` when unreadable).
    fn platform(
        &self,
        config: Digest,
    ) -> impl std::future::Future<Output = Option<Platform>> + Send;
}

/// The outcome of the base check on a fetched manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub passes: bool,
    /// "built on X (image@digest)", or why not: "first 0 of 3 layers match X".
    pub detail: String,
    /// For an index that passed: the manifests checked and found on a base.
    /// Entries left out of the check (attestations) are not among them.
    pub checked: Vec<Digest>,
}

/// Checks a manifest (image or index) against `sets`. `Err` when no
/// verdict can be reached (a base not resolved, a child not fetched).
pub async fn check_manifest<S: Source>(
    table: &BaseTable,
    sets: &[String],
    m: &Manifest,
    source: &S,
) -> Result<Outcome, BaseError> {
    let (layers, config) = match parse(m) {
        Ok(Parsed::Image { layers, config }) => (layers, config),
        Ok(Parsed::Index(children)) => return check_index(table, sets, children, source).await,
        Err(e) => return Ok(unreadable(m.digest, e)),
    };
    let platform = match config {
        Some(config) if table.needs_platform(sets) => source.platform(config).await,
        _ => None,
    };
    describe(table.check(sets, &layers, platform.as_ref()), sets)
}

/// An index passes when every platform manifest it lists does.
async fn check_index<S: Source>(
    table: &BaseTable,
    sets: &[String],
    children: Vec<(Digest, Option<Platform>)>,
    source: &S,
) -> Result<Outcome, BaseError> {
    if children.is_empty() {
        return Ok(Outcome::fail("the index lists no image manifests".into()));
    }
    if children.len() > MAX_INDEX_MANIFESTS {
        return Ok(Outcome::fail(format!(
            "the index lists {} manifests, over the limit of {MAX_INDEX_MANIFESTS}",
            children.len()
        )));
    }
    let mut on = Vec::new();
    let mut checked = Vec::new();
    for (digest, platform) in children {
        let child = source.manifest(digest).await?;
        let layers = match parse(&child) {
            Ok(Parsed::Image { layers, .. }) => layers,
            Ok(Parsed::Index(_)) => {
                return Ok(Outcome::fail(format!(
                    "{digest} is an index inside an index"
                )))
            }
            Err(e) => return Ok(unreadable(digest, e)),
        };
        let label = platform
            .as_ref()
            .map_or_else(|| digest.to_string(), |p| format!("{p} ({digest})"));
        let one = describe(table.check(sets, &layers, platform.as_ref()), sets)?;
        if !one.passes {
            return Ok(Outcome::fail(format!("platform {label}: {}", one.detail)));
        }
        on.push(one.detail);
        checked.push(digest);
    }
    on.sort();
    on.dedup();
    Ok(Outcome {
        passes: true,
        detail: format!("every platform is {}", on.join("; ")),
        checked,
    })
}

impl Outcome {
    fn fail(detail: String) -> Outcome {
        Outcome {
            passes: false,
            detail,
            checked: Vec::new(),
        }
    }
}

/// A manifest whose layer list cannot be read is on no base.
fn unreadable(digest: Digest, why: String) -> Outcome {
    Outcome::fail(format!("manifest {digest} cannot be read ({why})"))
}

fn describe(found: Found, sets: &[String]) -> Result<Outcome, BaseError> {
    match found {
        Found::Base { set, image, digest } => Ok(Outcome {
            passes: true,
            detail: format!("built on {set} ({image}, {digest})"),
            checked: Vec::new(),
        }),
        Found::NoBase { closest } => {
            let closest = match closest {
                Some((set, image, n, of)) => {
                    format!("first {n} of {of} layers match {set} ({image})")
                }
                None => "no base image to compare with".to_owned(),
            };
            Ok(Outcome::fail(format!(
                "{closest}; allowed bases: {}",
                sets.join(", ")
            )))
        }
        Found::Unresolved(set) => Err(BaseError::Unresolved(set)),
    }
}

// ---- history ----------------------------------------------------------------

/// Every digest each base tag has resolved to, newest last, keyed by the
/// canonical `name:tag`. Persisted as JSON in the store.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct History {
    #[serde(default)]
    tags: BTreeMap<String, Vec<Seen>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Seen {
    digest: Digest,
    /// Unix seconds when pullgate first saw the tag at this digest.
    first_seen: u64,
}

impl History {
    pub fn from_json(bytes: &[u8]) -> Result<History, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("history to JSON")
    }

    /// Notes that `tag` resolves to `digest` now; keeps the newest `keep`.
    /// Returns whether anything changed.
    pub fn record(&mut self, tag: &str, digest: Digest, keep: Option<usize>) -> bool {
        let seen = self.tags.entry(tag.to_owned()).or_default();
        let mut changed = false;
        if seen.last().map(|s| s.digest) != Some(digest) {
            // A tag that moves back to an older digest makes it the newest.
            seen.retain(|s| s.digest != digest);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            seen.push(Seen {
                digest,
                first_seen: now,
            });
            changed = true;
        }
        if let Some(keep) = keep {
            if seen.len() > keep {
                let drop = seen.len() - keep;
                seen.drain(..drop);
                changed = true;
            }
        }
        changed
    }

    /// Takes in what another writer recorded (a replica sharing the
    /// store): every digest either saw, each at the later time it became
    /// the tag's, the newest `keep`. Whether anything changed.
    pub fn merge(&mut self, other: &History, keep: Option<usize>) -> bool {
        let before = self.clone();
        for (tag, theirs) in &other.tags {
            let seen = self.tags.entry(tag.clone()).or_default();
            for t in theirs {
                match seen.iter_mut().find(|s| s.digest == t.digest) {
                    Some(s) => s.first_seen = s.first_seen.max(t.first_seen),
                    None => seen.push(t.clone()),
                }
            }
        }
        for seen in self.tags.values_mut() {
            // Stable: equal times keep their order.
            seen.sort_by_key(|s| s.first_seen);
            if let Some(keep) = keep {
                if seen.len() > keep {
                    let drop = seen.len() - keep;
                    seen.drain(..drop);
                }
            }
        }
        *self != before
    }

    /// The digests `tag` has had, newest first.
    pub fn digests(&self, tag: &str) -> Vec<Digest> {
        self.tags
            .get(tag)
            .map(|s| s.iter().rev().map(|s| s.digest).collect())
            .unwrap_or_default()
    }
}

/// Resolves base references for [`resolve`].
pub trait Resolver {
    /// What a base tag points at now; `Err` when neither the upstream nor
    /// the store can say.
    fn resolve(
        &self,
        base: &BaseRef,
    ) -> impl std::future::Future<Output = Result<Digest, BaseError>> + Send;
    /// A manifest of the base's repository, by digest (stored once fetched).
    fn manifest(
        &self,
        base: &BaseRef,
        digest: Digest,
    ) -> impl std::future::Future<Output = Result<Arc<Manifest>, BaseError>> + Send;
}

/// A base reference a refresh could not resolve or fetch.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The `[bases]` set it belongs to.
    pub set: String,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What a refresh did, for logs and metrics.
#[derive(Debug, Default)]
pub struct Refreshed {
    pub table: BaseTable,
    /// What could not be resolved or fetched (one message each).
    pub failures: Vec<Failure>,
    /// References that gave at least one base image.
    pub resolved: usize,
}

/// Runs base refreshes: at start-up, every `storage.base_refresh`, and at
/// once after a reload that changed `[bases]`; one at a time.
#[derive(Default)]
pub struct Refresher {
    /// Wakes the loop early (a reload changed `[bases]`).
    wake: tokio::sync::Notify,
    /// Every digest each base tag has had; loaded at the first refresh.
    /// The lock also keeps refreshes one at a time.
    history: tokio::sync::Mutex<Option<History>>,
}

/// What runs the refreshes: the pipeline, which knows how to resolve.
pub trait Host: Send + Sync + 'static {
    fn refresher(&self) -> &Arc<Refresher>;
    /// How long until the next refresh.
    fn every(&self) -> std::time::Duration;
    /// One refresh, published.
    fn refresh(self: Arc<Self>) -> impl std::future::Future<Output = ()> + Send;
}

impl Refresher {
    /// Refreshes now and then on schedule; stops when `host` is dropped.
    pub fn spawn<H: Host>(host: &Arc<H>) {
        let weak = Arc::downgrade(host);
        tokio::spawn(async move {
            loop {
                let Some(host) = weak.upgrade() else { return };
                let every = host.every();
                let refresher = host.refresher().clone();
                host.refresh().await;
                // A wake-up while refreshing is kept (`notify_one` leaves a
                // permit), so a change is never missed.
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = refresher.wake.notified() => {}
                }
            }
        });
    }

    /// Asks for a refresh now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Resolves `sets` now, with the history the store holds (loaded once;
    /// an unreadable one is set aside, never overwritten), and persists the
    /// history when it changed.
    pub async fn run<R: Resolver>(
        &self,
        store: &dyn crate::store::Store,
        sets: &[BaseSet],
        keep: Option<usize>,
        resolver: &R,
    ) -> Refreshed {
        let mut guard = self.history.lock().await;
        if guard.is_none() {
            *guard = Some(load_history(store).await);
        }
        let Some(history) = guard.as_mut() else {
            unreachable!("loaded above")
        };
        // What other replicas of a shared store recorded since.
        if let Ok(Some(bytes)) = store.read_meta(HISTORY_FILE).await {
            if let Ok(stored) = History::from_json(&bytes) {
                history.merge(&stored, keep);
            }
        }
        let before = history.clone();
        let done = resolve(sets, history, keep, resolver).await;
        if *history != before {
            let ours = history.clone();
            let merge = Box::new(move |current: Option<&[u8]>| {
                let mut next = ours.clone();
                if let Some(stored) = current.and_then(|b| History::from_json(b).ok()) {
                    next.merge(&stored, keep);
                }
                Some(next.to_json())
            });
            match store.update_meta(HISTORY_FILE, merge).await {
                Ok(Some(written)) => {
                    if let Ok(merged) = History::from_json(&written) {
                        *history = merged;
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::error!("cannot persist base history: {e}"),
            }
        }
        done
    }
}

/// The base history in the store. One that cannot be read is moved aside
/// (never overwritten), and base tags start without their earlier digests.
async fn load_history(store: &dyn crate::store::Store) -> History {
    let why = match store.read_meta(HISTORY_FILE).await {
        Ok(None) => return History::default(),
        Ok(Some(bytes)) => match History::from_json(&bytes) {
            Ok(h) => return h,
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    };
    let at = store.location();
    match store.set_aside_meta(HISTORY_FILE).await {
        Ok(aside) => tracing::error!(
            "{HISTORY_FILE} in {at} is unreadable ({why}); moved to {aside}; base tags start without their earlier digests"
        ),
        Err(e) => tracing::error!(
            "{HISTORY_FILE} in {at} is unreadable ({why}) and cannot be moved aside ({e}); base tags start without their earlier digests"
        ),
    }
    History::default()
}

/// Resolves every base reference and builds the table. `history` gains the
/// digests tags resolve to now; digests it already holds stay allowed.
pub async fn resolve<R: Resolver>(
    sets: &[BaseSet],
    history: &mut History,
    keep: Option<usize>,
    resolver: &R,
) -> Refreshed {
    let mut out = Refreshed::default();
    // Manifests already turned into base images, per reference digest.
    let mut done: HashMap<Digest, Vec<Expanded>> = HashMap::new();
    for set in sets {
        out.table.source.push(set.clone());
        for base in &set.images {
            let digests = match &base.reference {
                Reference::Digest(d) => vec![*d],
                Reference::Tag(tag) => {
                    let key = format!("{}:{tag}", base.canonical);
                    match resolver.resolve(base).await {
                        Ok(d) => {
                            history.record(&key, d, keep);
                        }
                        Err(e) => out.failures.push(Failure {
                            set: set.name.clone(),
                            message: format!("{}: {e}", base.image),
                        }),
                    }
                    history.digests(&key)
                }
            };
            let mut any = false;
            for digest in digests {
                if let std::collections::hash_map::Entry::Vacant(slot) = done.entry(digest) {
                    match expand(resolver, base, digest).await {
                        Ok(images) => {
                            slot.insert(images);
                        }
                        Err(e) => {
                            out.failures.push(Failure {
                                set: set.name.clone(),
                                message: format!("{}@{digest}: {e}", base.image),
                            });
                            continue;
                        }
                    }
                }
                for (platform, d, layers) in &done[&digest] {
                    any = true;
                    out.table.images.push(BaseImage {
                        set: Arc::from(set.name.as_str()),
                        image: Arc::from(base.image.as_str()),
                        digest: *d,
                        platform: platform.clone(),
                        layers: layers.clone(),
                    });
                }
            }
            if any {
                out.resolved += 1;
            } else {
                out.table.unresolved.insert(set.name.clone());
            }
        }
    }
    out
}

/// One image manifest of a base: platform, digest, layers.
type Expanded = (Option<Platform>, Digest, Vec<Digest>);

/// The image manifests behind one base digest: itself, or every platform
/// of an index.
async fn expand<R: Resolver>(
    resolver: &R,
    base: &BaseRef,
    digest: Digest,
) -> Result<Vec<Expanded>, BaseError> {
    let m = resolver.manifest(base, digest).await?;
    let children = match parse(&m).map_err(BaseError::Unreadable)? {
        Parsed::Image { layers, .. } => return Ok(vec![(None, digest, layers)]),
        Parsed::Index(children) => children,
    };
    let mut out = Vec::new();
    for (child, platform) in children.into_iter().take(MAX_INDEX_MANIFESTS) {
        let cm = resolver.manifest(base, child).await?;
        if let Parsed::Image { layers, .. } = parse(&cm).map_err(BaseError::Unreadable)? {
            out.push((platform, child, layers));
        }
    }
    Ok(out)
}

#[cfg(test)]
pub mod tests {
    use super::*;

    pub fn layer(n: u32) -> Digest {
        Digest::of(format!("layer {n}").as_bytes())
    }

    fn base(set: &str, platform: Option<(&str, &str)>, layers: &[u32]) -> BaseImage {
        BaseImage {
            set: Arc::from(set),
            image: Arc::from(format!("gcr.io/distroless/{set}:nonroot").as_str()),
            digest: Digest::of(format!("{set}{platform:?}{layers:?}").as_bytes()),
            platform: platform.map(|(os, arch)| Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: None,
            }),
            layers: layers.iter().map(|&n| layer(n)).collect(),
        }
    }

    fn table(images: Vec<BaseImage>) -> BaseTable {
        let mut source: Vec<BaseSet> = Vec::new();
        for b in &images {
            if !source.iter().any(|s| *s.name == *b.set) {
                source.push(set_named(&b.set));
            }
        }
        BaseTable {
            images,
            unresolved: HashSet::new(),
            source,
        }
    }

    fn set_named(name: &str) -> BaseSet {
        BaseSet {
            name: name.into(),
            images: Vec::new(),
        }
    }

    fn layers(ns: &[u32]) -> Vec<Digest> {
        ns.iter().map(|&n| layer(n)).collect()
    }

    fn sets(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_prefix_decides() {
        let t = table(vec![
            base("static", None, &[1, 2, 3]),
            base("base", None, &[7, 8]),
        ]);
        let allowed = sets(&["static"]);
        // The base itself, and the base plus the image's own layers.
        assert!(
            matches!(t.check(&allowed, &layers(&[1, 2, 3]), None), Found::Base { set, .. } if set == "static")
        );
        assert!(matches!(
            t.check(&allowed, &layers(&[1, 2, 3, 10, 11]), None),
            Found::Base { .. }
        ));
        // Another base, allowed elsewhere but not by this policy.
        assert_eq!(
            t.check(&allowed, &layers(&[7, 8, 9]), None),
            Found::NoBase {
                closest: Some((
                    "static".into(),
                    "gcr.io/distroless/static:nonroot".into(),
                    0,
                    3
                ))
            }
        );
        // A partial prefix, the base's layers out of order, and layers
        // inserted before the base's.
        assert_eq!(
            t.check(&allowed, &layers(&[1, 2, 9]), None),
            Found::NoBase {
                closest: Some((
                    "static".into(),
                    "gcr.io/distroless/static:nonroot".into(),
                    2,
                    3
                ))
            }
        );
        assert!(matches!(
            t.check(&allowed, &layers(&[2, 1, 3]), None),
            Found::NoBase { .. }
        ));
        assert!(matches!(
            t.check(&allowed, &layers(&[0, 1, 2, 3]), None),
            Found::NoBase { .. }
        ));
        // Fewer layers than the base: not on it.
        assert!(matches!(
            t.check(&allowed, &layers(&[1, 2]), None),
            Found::NoBase { .. }
        ));
        assert!(matches!(
            t.check(&sets(&["static", "base"]), &layers(&[7, 8, 9]), None),
            Found::Base { set, .. } if set == "base"
        ));
    }

    #[test]
    fn empty_layer_lists_match_nothing() {
        // A base without layers would make every image "built on" it.
        let t = table(vec![base("scratch", None, &[]), base("static", None, &[1])]);
        assert!(matches!(
            t.check(&sets(&["scratch"]), &layers(&[5]), None),
            Found::NoBase { closest: None }
        ));
        assert!(matches!(
            t.check(&sets(&["static"]), &[], None),
            Found::NoBase {
                closest: Some((_, _, 0, 1))
            }
        ));
        assert!(matches!(
            t.check(&sets(&["scratch"]), &[], None),
            Found::NoBase { .. }
        ));
    }

    #[test]
    fn index_bases_compare_the_same_platform() {
        let t = table(vec![
            base("static", Some(("linux", "amd64")), &[1, 2]),
            base("static", Some(("linux", "arm64")), &[3, 4]),
        ]);
        let amd64 = Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        };
        let arm64 = Platform {
            architecture: "arm64".into(),
            variant: Some("v8".into()),
            ..amd64.clone()
        };
        let allowed = sets(&["static"]);
        assert!(matches!(
            t.check(&allowed, &layers(&[1, 2, 9]), Some(&amd64)),
            Found::Base { .. }
        ));
        assert!(matches!(
            t.check(&allowed, &layers(&[3, 4, 9]), Some(&arm64)),
            Found::Base { .. }
        ));
        // amd64 layers under an arm64 platform: not that platform's base.
        assert!(matches!(
            t.check(&allowed, &layers(&[1, 2, 9]), Some(&arm64)),
            Found::NoBase { .. }
        ));
        // Unknown platform: compared with every platform of the base.
        assert!(matches!(
            t.check(&allowed, &layers(&[3, 4]), None),
            Found::Base { .. }
        ));
        let v7 = Platform {
            architecture: "arm".into(),
            variant: Some("v7".into()),
            ..amd64.clone()
        };
        let v6 = Platform {
            variant: Some("v6".into()),
            ..v7.clone()
        };
        assert!(!v7.matches(&v6));
        assert!(v7.matches(&Platform {
            variant: None,
            ..v7.clone()
        }));
    }

    #[test]
    fn unresolved_sets_give_no_verdict_instead_of_a_denial() {
        let mut t = table(vec![base("static", None, &[1])]);
        t.unresolved.insert("other".into());
        t.source.push(set_named("other"));
        assert!(matches!(
            t.check(&sets(&["static", "other"]), &layers(&[1]), None),
            Found::Base { .. }
        ));
        assert_eq!(
            t.check(&sets(&["static", "other"]), &layers(&[9]), None),
            Found::Unresolved("other".into())
        );
        assert!(!t.built_from(&[], &sets(&["new"])));
        assert!(t.built_from(&[set_named("static")], &sets(&["static"])));
        // Built from another definition of the set (a reload changed it).
        let changed = BaseSet {
            images: vec![crate::config::BaseRef {
                image: "x:1".into(),
                upstream: "docker.io".into(),
                repo: "library/x".parse().unwrap(),
                canonical: "docker.io/library/x".into(),
                reference: crate::oci::names::Reference::Tag("1".parse().unwrap()),
            }],
            ..set_named("static")
        };
        assert!(!t.built_from(&[changed], &sets(&["static"])));
        // A set no refresh has looked at yet: no verdict either.
        assert_eq!(
            t.check(&sets(&["never"]), &layers(&[9]), None),
            Found::Unresolved("never".into())
        );
    }

    /// A source holding manifests by digest.
    struct Manifests(HashMap<Digest, Arc<Manifest>>, Option<Platform>);

    impl Source for Manifests {
        async fn manifest(&self, d: Digest) -> Result<Arc<Manifest>, BaseError> {
            self.0
                .get(&d)
                .cloned()
                .ok_or(BaseError::Unreadable(format!("{d} missing")))
        }
        async fn platform(&self, _: Digest) -> Option<Platform> {
            self.1.clone()
        }
    }

    pub fn image_manifest(
        config: &[u8],
        layers: &[Digest],
        annotations: serde_json::Value,
    ) -> Manifest {
        let layers: Vec<_> = layers
            .iter()
            .map(|d| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d.to_string(), "size": 1}))
            .collect();
        let bytes = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": Digest::of(config).to_string(), "size": config.len()},
            "layers": layers,
            "annotations": annotations,
        }))
        .unwrap();
        Manifest::parse(Digest::of(&bytes), None, bytes.into()).unwrap()
    }

    #[test]
    fn claims_inside_the_image_are_not_evidence() {
        // The image's config names the base's diff_ids and the annotations
        // name the base, but its layers are different.
        let t = table(vec![base("static", None, &[1, 2])]);
        let config = serde_json::to_vec(&serde_json::json!({
            "rootfs": {"type": "layers", "diff_ids": [layer(1).to_string(), layer(2).to_string()]},
        }))
        .unwrap();
        let forged = image_manifest(
            &config,
            &layers(&[8, 9]),
            serde_json::json!({
                "org.opencontainers.image.base.name": "gcr.io/distroless/static:nonroot",
                "org.opencontainers.image.base.digest": t.images[0].digest.to_string(),
            }),
        );
        let src = Manifests(HashMap::new(), None);
        let out = futures_lite(check_manifest(&t, &sets(&["static"]), &forged, &src)).unwrap();
        assert!(!out.passes);
        assert_eq!(
            out.detail,
            "first 0 of 2 layers match static (gcr.io/distroless/static:nonroot); allowed bases: static"
        );
        let honest = image_manifest(&config, &layers(&[1, 2, 3]), serde_json::json!({}));
        let out = futures_lite(check_manifest(&t, &sets(&["static"]), &honest, &src)).unwrap();
        assert!(out.passes, "{out:?}");
    }

    #[test]
    fn an_index_passes_when_every_platform_does() {
        let t = table(vec![
            base("static", Some(("linux", "amd64")), &[1]),
            base("static", Some(("linux", "arm64")), &[2]),
        ]);
        let amd = image_manifest(b"a", &layers(&[1, 5]), serde_json::json!({}));
        let arm = image_manifest(b"b", &layers(&[2, 6]), serde_json::json!({}));
        let bad = image_manifest(b"c", &layers(&[9]), serde_json::json!({}));
        let attestation = image_manifest(b"d", &layers(&[42]), serde_json::json!({}));
        let index = |entries: &[(&Manifest, &str)]| {
            let list: Vec<_> = entries
                .iter()
                .map(|(m, arch)| {
                    let (t, size) = (&m.media_type, m.bytes.len());
                    if *arch == "attestation" {
                        serde_json::json!({"mediaType": t, "size": size, "digest": m.digest.to_string(), "platform": {"os": "unknown", "architecture": "unknown"},
                            "annotations": {"vnd.docker.reference.type": "attestation-manifest"}})
                    } else {
                        serde_json::json!({"mediaType": t, "size": size, "digest": m.digest.to_string(), "platform": {"os": "linux", "architecture": arch}})
                    }
                })
                .collect();
            let bytes =
                serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": list}))
                    .unwrap();
            Manifest::parse(Digest::of(&bytes), None, bytes.into()).unwrap()
        };
        let src = Manifests(
            [&amd, &arm, &bad, &attestation]
                .iter()
                .map(|m| (m.digest, Arc::new((*m).clone())))
                .collect(),
            None,
        );
        let good = index(&[
            (&amd, "amd64"),
            (&arm, "arm64"),
            (&attestation, "attestation"),
        ]);
        let out = futures_lite(check_manifest(&t, &sets(&["static"]), &good, &src)).unwrap();
        assert!(out.passes, "{out:?}");
        // The arm64 image listed as amd64: compared with the amd64 base.
        let swapped = index(&[(&amd, "amd64"), (&arm, "amd64")]);
        let out = futures_lite(check_manifest(&t, &sets(&["static"]), &swapped, &src)).unwrap();
        assert!(!out.passes);
        assert!(
            out.detail.starts_with("platform linux/amd64"),
            "{}",
            out.detail
        );
        let mixed = index(&[(&amd, "amd64"), (&bad, "arm64")]);
        let out = futures_lite(check_manifest(&t, &sets(&["static"]), &mixed, &src)).unwrap();
        assert!(!out.passes);
        assert!(
            out.detail.contains("first 0 of 1 layers match static"),
            "{}",
            out.detail
        );
        // A child that cannot be fetched: no verdict.
        let lonely = index(&[(&amd, "amd64")]);
        let empty = Manifests(HashMap::new(), None);
        assert!(futures_lite(check_manifest(&t, &sets(&["static"]), &lonely, &empty)).is_err());
    }

    #[test]
    fn a_standalone_image_is_compared_with_its_configs_platform() {
        let t = table(vec![
            base("static", Some(("linux", "amd64")), &[1]),
            base("static", Some(("linux", "arm64")), &[2]),
        ]);
        let arm_layers_claiming_amd = image_manifest(b"x", &layers(&[2, 3]), serde_json::json!({}));
        let amd = Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        };
        let src = Manifests(HashMap::new(), Some(amd));
        let out = futures_lite(check_manifest(
            &t,
            &sets(&["static"]),
            &arm_layers_claiming_amd,
            &src,
        ))
        .unwrap();
        assert!(!out.passes);
    }

    #[test]
    fn histories_of_two_replicas_merge_into_every_digest_either_saw() {
        let (x, y, z) = (Digest::of(b"x"), Digest::of(b"y"), Digest::of(b"z"));
        let mut a = History::default();
        a.record("docker.io/library/debian:12", x, None);
        let mut b = History::default();
        b.record("docker.io/library/debian:12", y, None);
        b.record("docker.io/library/alpine:3", z, None);
        assert!(a.merge(&b, None));
        let mut got = a.digests("docker.io/library/debian:12");
        got.sort();
        let mut want = vec![x, y];
        want.sort();
        assert_eq!(got, want);
        assert_eq!(a.digests("docker.io/library/alpine:3"), [z]);
        // Merging again changes nothing; `keep` bounds the merged list.
        assert!(!a.merge(&b, None));
        assert!(a.merge(&History::default(), Some(1)));
        assert_eq!(a.digests("docker.io/library/debian:12").len(), 1);
    }

    #[test]
    fn history_keeps_every_digest_a_tag_had_up_to_keep() {
        let (a, b, c) = (layer(1), layer(2), layer(3));
        let mut h = History::default();
        assert!(h.record("gcr.io/d/s:nonroot", a, None));
        assert!(!h.record("gcr.io/d/s:nonroot", a, None));
        assert!(h.record("gcr.io/d/s:nonroot", b, None));
        assert_eq!(h.digests("gcr.io/d/s:nonroot"), [b, a]);
        let back = History::from_json(&h.to_json()).unwrap();
        assert_eq!(back, h);
        assert!(h.record("gcr.io/d/s:nonroot", c, Some(2)));
        assert_eq!(h.digests("gcr.io/d/s:nonroot"), [c, b]);
        // Moving back to an old digest makes it the newest.
        h.record("gcr.io/d/s:nonroot", b, Some(2));
        assert_eq!(h.digests("gcr.io/d/s:nonroot"), [b, c]);
        assert!(h.digests("other:tag").is_empty());
    }

    /// Runs a future that never waits on I/O.
    fn futures_lite<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }
}

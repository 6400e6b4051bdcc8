//! The request pipeline: the one place that spells out the whole flow.
//!
//! ```text
//! parse path ─▶ route ─▶ policy (name) ─▶ manifest: resolve tag ─▶ fetch by digest
//!                                          (store, else upstream; single flight)
//!                                       ─▶ policy (manifest) ─▶ 200 | 403 DENIED
//!                                     ─▶ blob: store hit (Range) or one shared
//!                                          upstream fetch streamed to every client
//!                                     ─▶ tags/list, referrers: passed through
//! ```
//!
//! Each step lives in its own module; this one only wires them together and
//! turns outcomes into responses. Depends on every other module but `server`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use tracing::{field, Instrument};

use crate::body::{self, Body};
use crate::config::Config;
use crate::error::{ApiError, Origin};
use crate::fetch::{status_error, BlobFetches, BlobReader, FlightState, SingleFlight};
use crate::metrics::Metrics;
use crate::names::{Digest, Reference, Tag};
use crate::policy::{Policies, TagStep, Verdict};
use crate::route::{parse_path, PathKind, Route, Router, Target};
use crate::store::{Store, StoredManifest, TagKey, TagRecord};
use crate::upstream::{BodyError, RequestOptions, UpstreamClient};
use crate::verify::Verifier;
use crate::zerocopy;

/// Manifest media types asked for when the client sends no `Accept`.
pub const DEFAULT_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Largest tags/list or referrers answer passed through.
const MAX_PASSTHROUGH_BODY: u64 = 16 * 1024 * 1024;

/// Largest total of request header bytes accepted.
const MAX_HEADER_BYTES: usize = 32 * 1024;

/// After an upstream failure, a stale tag is retried upstream after this.
const STALE_RETRY: Duration = Duration::from_secs(10);

/// Numbers config generations; verdicts are cached per generation.
static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Everything that changes together on a config reload.
pub struct Generation {
    /// Unique per load of the config.
    pub id: u64,
    pub config: Arc<Config>,
    router: Router,
    rewrites: crate::rewrite::Rewrites,
    policies: Policies,
    upstreams: Vec<Arc<UpstreamClient>>,
}

impl Generation {
    pub fn build(config: Config, metrics: &Arc<Metrics>) -> Result<Generation, String> {
        let router = Router::for_upstreams(&config.upstreams);
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| UpstreamClient::new(u, metrics.clone()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Generation {
            id: GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            policies: Policies::new(config.policies.clone()),
            rewrites: crate::rewrite::Rewrites::new(&config.rewrites),
            config: Arc::new(config),
            router,
            upstreams,
        })
    }
}

/// The running proxy: store, fetches in flight, and the current config.
pub struct App {
    generation: ArcSwap<Generation>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    blobs: Arc<BlobFetches>,
    manifests: SingleFlight<(Arc<str>, Digest), Arc<StoredManifest>>,
    tags: SingleFlight<TagKey, Arc<StoredManifest>>,
    verifier: Verifier,
    /// The audit log and the recent decisions behind the dashboard.
    pub audit: crate::audit::Audit,
    /// The last tag list per (name, query), served when the upstream fails.
    tag_lists: moka::sync::Cache<(String, Option<String>), (Bytes, Option<String>)>,
    /// Blobs that approved manifests reference, per name and generation.
    approved_blobs: crate::verify::Memo<()>,
    /// Manifests whose blobs are in `approved_blobs`; emptied with it.
    approved_manifests: crate::verify::Memo<()>,
    /// Wakes the base refresher early (a reload changed `[bases]`).
    bases_changed: Arc<tokio::sync::Notify>,
    /// Every digest each base tag has had; loaded at the first refresh.
    /// The lock also keeps refreshes one at a time.
    base_history: tokio::sync::Mutex<Option<crate::bases::History>>,
}

impl App {
    /// Opens the store and builds the first generation.
    pub fn new(config: Config) -> Result<Arc<App>, String> {
        let metrics = Arc::new(Metrics::new());
        let store = Store::open(
            &config.storage.path,
            config.storage.max_size,
            metrics.clone(),
        )
        .map_err(|e| {
            format!(
                "cannot open the store at {}: {e}",
                config.storage.path.display()
            )
        })?;
        let store = Arc::new(store);
        let config_store_path = config.storage.path.clone();
        let audit = crate::audit::Audit::new(
            config.audit.path.as_deref(),
            config.audit.approvals,
            metrics.clone(),
        )?;
        let generation = Generation::build(config, &metrics)?;
        let app = Arc::new(App {
            generation: ArcSwap::from_pointee(generation),
            blobs: BlobFetches::new(store.clone(), metrics.clone()),
            verifier: Verifier::new(&config_store_path, metrics.clone()),
            audit,
            tag_lists: moka::sync::Cache::builder()
                .max_capacity(64 * 1024 * 1024)
                .weigher(|_, v: &(Bytes, Option<String>)| {
                    u32::try_from(v.0.len()).unwrap_or(u32::MAX)
                })
                .build(),
            approved_blobs: crate::verify::Memo::new(1_000_000),
            approved_manifests: crate::verify::Memo::new(1_000_000),
            store,
            metrics,
            manifests: SingleFlight::default(),
            tags: SingleFlight::default(),
            bases_changed: Arc::new(tokio::sync::Notify::new()),
            base_history: tokio::sync::Mutex::new(None),
        });
        // Outside a runtime (benchmarks, unit tests) nothing runs in the
        // background; the server always has one.
        if tokio::runtime::Handle::try_current().is_ok() {
            app.start_base_refresh();
        }
        Ok(app)
    }

    pub fn config(&self) -> Arc<Config> {
        self.generation.load().config.clone()
    }

    /// Swaps in a new config atomically. Listen addresses and the store
    /// location need a restart; a change to them is reported, not applied.
    pub fn reload(&self, config: Config) -> Result<Vec<String>, String> {
        let old = self.config();
        let mut notes = Vec::new();
        if old.server.listen != config.server.listen {
            notes.push("server.listen changed: restart to apply".to_owned());
        }
        if old.storage.path != config.storage.path {
            notes.push("storage.path changed: restart to apply".to_owned());
        }
        if old.storage.max_size != config.storage.max_size {
            notes.push("storage.max_size changed: restart to apply".to_owned());
        }
        if old.admin.as_ref().map(|a| a.listen) != config.admin.as_ref().map(|a| a.listen) {
            notes.push("admin.listen changed: restart to apply".to_owned());
        }
        if old.audit.path != config.audit.path || old.audit.approvals != config.audit.approvals {
            notes.push(
                "[audit] changed: restart to apply (the log file itself is reopened)".to_owned(),
            );
        }
        if old.server.shutdown_timeout != config.server.shutdown_timeout {
            notes.push("server.shutdown_timeout changed: restart to apply".to_owned());
        }
        let bases_changed = old.bases != config.bases
            || old.storage.base_keep != config.storage.base_keep
            || old.storage.base_refresh != config.storage.base_refresh;
        let generation = Generation::build(config, &self.metrics)?;
        self.generation.store(Arc::new(generation));
        if bases_changed {
            self.bases_changed.notify_one();
        }
        Ok(notes)
    }

    // ---- base images ---------------------------------------------------------

    /// Resolves `[bases]` now and every `storage.base_refresh`, and at once
    /// after a reload that changed them. Stops when the app is dropped.
    fn start_base_refresh(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let wake = self.bases_changed.clone();
        tokio::spawn(async move {
            loop {
                let Some(app) = weak.upgrade() else { return };
                let every = app.config().storage.base_refresh;
                app.refresh_bases().await;
                drop(app);
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = wake.notified() => {}
                }
            }
        });
    }

    /// The base history in the store. One that cannot be read is moved
    /// aside (never overwritten), and base tags start without their earlier
    /// digests.
    fn load_base_history(&self) -> crate::bases::History {
        let why = match self.store.read_meta(crate::bases::HISTORY_FILE) {
            Ok(None) => return crate::bases::History::default(),
            Ok(Some(bytes)) => match crate::bases::History::from_json(&bytes) {
                Ok(h) => return h,
                Err(e) => e,
            },
            Err(e) => e.to_string(),
        };
        let path = self.store.root().join(crate::bases::HISTORY_FILE);
        let aside = path.with_extension(format!(
            "unreadable-{}",
            SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
        ));
        match std::fs::rename(&path, &aside) {
            Ok(()) => tracing::error!(
                "{} is unreadable ({why}); moved to {}; base tags start without their earlier digests",
                path.display(),
                aside.display()
            ),
            Err(e) => tracing::error!(
                "{} is unreadable ({why}) and cannot be moved aside ({e}); base tags start without their earlier digests",
                path.display()
            ),
        }
        crate::bases::History::default()
    }

    /// Resolves every base now: persists the tags' history and publishes
    /// the table to the verifier. Also runs at start-up, every
    /// `storage.base_refresh`, and after a reload that changed `[bases]`.
    pub async fn refresh_bases(self: &Arc<Self>) {
        let mut guard = self.base_history.lock().await;
        let history = guard.get_or_insert_with(|| self.load_base_history());
        let gen = &self.generation.load_full();
        let sets = &gen.config.bases;
        if sets.is_empty() {
            if !self.verifier.bases().images.is_empty() {
                self.verifier.set_bases(crate::bases::BaseTable::default());
            }
            self.metrics.base_images.set(0);
            return;
        }
        let started = Instant::now();
        let before = history.clone();
        let resolver = AppResolver { app: self, gen };
        let done =
            crate::bases::refresh(sets, history, gen.config.storage.base_keep, &resolver).await;
        if *history != before {
            let store = self.store.clone();
            let bytes = history.to_json();
            let written = tokio::task::spawn_blocking(move || {
                store.write_meta(crate::bases::HISTORY_FILE, &bytes)
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
            if let Err(e) = written {
                tracing::error!("cannot persist base history: {e}");
            }
        }
        let refs: usize = sets.iter().map(|s| s.images.len()).sum();
        self.metrics
            .base_refreshes
            .with_label_values(&["ok"])
            .inc_by(done.resolved as u64);
        self.metrics
            .base_refreshes
            .with_label_values(&["error"])
            .inc_by(refs.saturating_sub(done.resolved) as u64);
        for f in &done.failures {
            tracing::warn!("base image: {f}");
        }
        self.metrics.base_images.set(done.table.images.len() as i64);
        tracing::info!(
            sets = sets.len(),
            references = refs,
            manifests = done.table.images.len(),
            unresolved = ?done.table.unresolved,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "base images resolved"
        );
        let current = self.verifier.bases();
        if *current != done.table || current.source.is_empty() {
            self.verifier.set_bases(done.table);
            // Blobs approved through the old table are approved again
            // with their manifests.
            self.approved_blobs.clear();
            self.approved_manifests.clear();
        }
    }

    /// Answers one client request. Never fails: errors become spec JSON.
    pub async fn handle<B>(self: Arc<Self>, req: Request<B>, peer: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        let head = req.method() == Method::HEAD;
        let span = tracing::info_span!(
            "request",
            method = %req.method(),
            path = %req.uri().path(),
            %peer,
            upstream = field::Empty,
            repo = field::Empty,
            reference = field::Empty,
        );
        let header_bytes: usize = req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        let (kind, result) = if header_bytes > MAX_HEADER_BYTES {
            let e = ApiError::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "SIZE_INVALID",
                format!("request headers are {header_bytes} bytes, over the {MAX_HEADER_BYTES}-byte limit"),
            );
            ("other", Err(e))
        } else {
            self.dispatch(&req, peer).instrument(span.clone()).await
        };
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => {
                let _enter = span.enter();
                match e.origin {
                    Origin::Client => {
                        tracing::debug!(status = e.status.as_u16(), code = e.code, "{}", e.message)
                    }
                    Origin::Upstream => {
                        tracing::warn!(status = e.status.as_u16(), code = e.code, "{}", e.message)
                    }
                    Origin::Internal => {
                        tracing::error!(status = e.status.as_u16(), code = e.code, "{}", e.message)
                    }
                }
                e.into_response(head)
            }
        };
        resp.headers_mut().insert(
            "Docker-Distribution-API-Version",
            HeaderValue::from_static("registry/2.0"),
        );
        let status = resp.status();
        self.metrics
            .requests
            .with_label_values(&[kind, status.as_str()])
            .inc();
        if kind == "manifest" {
            self.metrics
                .manifest_duration
                .observe(started.elapsed().as_secs_f64());
        }
        let _enter = span.enter();
        tracing::debug!(
            status = status.as_u16(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "answered"
        );
        resp
    }

    async fn dispatch<B>(
        self: &Arc<Self>,
        req: &Request<B>,
        peer: SocketAddr,
    ) -> (&'static str, Result<Response<Body>, ApiError>) {
        let method = req.method();
        let readonly = method == Method::GET || method == Method::HEAD;
        let head = method == Method::HEAD;
        let parsed = match parse_path(req.uri().path()) {
            Ok(p) => p,
            Err(e) => return ("other", Err(e)),
        };
        let (name, target) = match parsed {
            PathKind::Base if readonly => {
                let b = if head {
                    body::empty()
                } else {
                    body::full("{}")
                };
                let r = Response::builder()
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(header::CONTENT_LENGTH, 2)
                    .body(b)
                    .expect("valid response");
                return ("base", Ok(r));
            }
            PathKind::Base => return ("base", Err(read_only())),
            PathKind::Push => return ("push", Err(read_only())),
            PathKind::Repo { name, target } => (name, target),
        };
        let kind = target.kind();
        if !readonly {
            return (kind, Err(read_only()));
        }
        let gen = self.generation.load_full();
        let query = req.uri().query();
        let mut route = match gen.router.route(&name, query_param(query, "ns")) {
            Ok(r) => r,
            Err(e) => return (kind, Err(e)),
        };
        route.client = Some(peer);
        if !gen.rewrites.is_empty() {
            if let Some(to) = gen.rewrites.apply(&route.canonical) {
                route = match gen.router.rewritten(route, &to) {
                    Ok(r) => r,
                    Err(e) => return (kind, Err(e)),
                };
            }
        }
        let span = tracing::Span::current();
        span.record("upstream", &*route.upstream_name);
        span.record("repo", route.repo.as_str());
        let upstream = gen.upstreams[route.upstream].clone();
        let result = match target {
            Target::Manifest(reference) => {
                span.record("reference", reference.to_string());
                self.manifest(&gen, &upstream, &route, reference, req.headers(), head)
                    .await
            }
            Target::Blob(digest) => {
                span.record("reference", digest.to_string());
                self.blob(&gen, &upstream, &route, digest, req).await
            }
            Target::TagsList => self.tags_list(&gen, &upstream, &route, query, head).await,
            Target::Referrers(digest) => {
                span.record("reference", digest.to_string());
                self.referrers(&gen, &upstream, &route, digest, query, head)
                    .await
            }
        };
        (kind, result)
    }

    // ---- policy ------------------------------------------------------------

    /// Applies a verdict: `Err` with 403 when it blocks, the audit warning
    /// (if any) otherwise.
    /// Only manifest verdicts are counted as blocked pulls: a pull starts
    /// with its manifest, and its blobs would count it again.
    fn apply(
        &self,
        route: &Route,
        reference: &str,
        verdict: &Verdict,
        digest: Option<&Digest>,
        count: bool,
    ) -> Result<Option<HeaderValue>, ApiError> {
        if verdict.passes() {
            if count && self.audit.records_approvals() {
                self.audit.record(self.audit_record(
                    route,
                    reference,
                    verdict,
                    digest,
                    String::new(),
                ));
            }
            return Ok(None);
        }
        // Under a rewrite, say what the client asked for too.
        let shown = match &route.rewritten_from {
            Some(asked) => std::borrow::Cow::Owned(format!(
                "{}, served for {asked} by a rewrite",
                route.canonical
            )),
            None => std::borrow::Cow::Borrowed(route.canonical.as_str()),
        };
        let message = verdict.message(&shown);
        self.audit
            .record(self.audit_record(route, reference, verdict, digest, message));
        for reason in verdict.reasons.iter().filter(|_| count) {
            self.metrics
                .blocked_pulls
                .with_label_values(&[&*route.upstream_name, reason, verdict.mode.as_str()])
                .inc();
        }
        if verdict.blocks() {
            tracing::info!(
                canonical = %route.canonical,
                policy = verdict.policy.as_deref().unwrap_or("-"),
                reasons = ?verdict.reasons,
                "pull denied"
            );
            return Err(verdict.denial(&shown, digest));
        }
        tracing::info!(
            canonical = %route.canonical,
            policy = verdict.policy.as_deref().unwrap_or("-"),
            reasons = ?verdict.reasons,
            "pull would be denied (audit mode): served"
        );
        Ok(HeaderValue::from_str(&verdict.warning(&shown)).ok())
    }

    fn audit_record(
        &self,
        route: &Route,
        reference: &str,
        verdict: &Verdict,
        digest: Option<&Digest>,
        message: String,
    ) -> crate::audit::Record {
        let mut r = crate::audit::Record::new(
            route.client.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
            &route.canonical,
            reference,
            digest,
            verdict.policy.as_deref(),
            verdict.mode,
            &verdict.reasons,
            message,
        );
        r.rewritten_from = route.rewritten_from.clone();
        r.detail = verdict.detail.as_deref().map(str::to_owned);
        r
    }

    // ---- manifests ---------------------------------------------------------

    async fn manifest(
        self: &Arc<Self>,
        gen: &Arc<Generation>,
        upstream: &Arc<UpstreamClient>,
        route: &Route,
        reference: Reference,
        headers: &HeaderMap,
        head: bool,
    ) -> Result<Response<Body>, ApiError> {
        // One policy match serves every check of this request.
        let policy = gen.policies.matching(&route.canonical);
        // A name its policy denies outright costs no upstream work.
        let early = Policies::by_name(policy);
        if early.blocks() {
            self.apply(route, &reference.to_string(), &early, None, true)?;
        }
        // Tag rules (require_digest, deny_tags) need no manifest either.
        let mut tag_warning = None;
        if let (Reference::Tag(tag), Some(policy)) = (&reference, policy) {
            let refused = policy.require_digest
                || policy
                    .deny_tags
                    .as_ref()
                    .is_some_and(|g| g.is_match(tag.as_str()));
            if refused && !policy.deny && !is_signature_tag(tag) {
                let verdict = Verdict::of(policy, vec![crate::policy::reason::TAG_NOT_ALLOWED]);
                tag_warning = self.apply(route, tag.as_str(), &verdict, None, true)?;
            }
        }
        let accept = accept_header(headers);
        // Pins: a pinned tag resolves to its digest with no upstream call;
        // the digest still goes through policy below.
        let pinned = match &reference {
            Reference::Tag(tag) if !gen.config.pins.is_empty() => route
                .rewritten_from
                .as_deref()
                .and_then(|asked| gen.config.pins.get(asked, tag.as_str()))
                .or_else(|| gen.config.pins.get(&route.canonical, tag.as_str())),
            _ => None,
        };
        // For a tag: its key and the digest policy last approved for it.
        let mut tag_state = None;
        let m = match (&reference, pinned) {
            (_, Some(d)) => {
                tracing::debug!(%reference, digest = %d, "pinned tag");
                self.manifest_by_digest(gen, upstream, route, d, accept)
                    .await?
            }
            (Reference::Tag(tag), None) => {
                let (m, key, approved) =
                    self.resolve_tag(gen, upstream, route, tag, accept).await?;
                tag_state = Some((key, approved));
                m
            }
            (Reference::Digest(d), None) => {
                self.manifest_by_digest(gen, upstream, route, *d, accept)
                    .await?
            }
        };
        // The verify step: the manifest is known, nothing has been sent yet.
        let sig_tag = matches!(&reference, Reference::Tag(t) if is_signature_tag(t));
        let mut verdict = self
            .verdict(gen, upstream, route, policy, &m, sig_tag, early)
            .await;
        let mut m = m;
        // Tag drift: the tag moved to content policy denies.
        let mut drift_warning = None;
        if let (Some((key, approved)), Some(p)) = (tag_state, policy) {
            if p.checks_content() && !sig_tag {
                match crate::policy::tag_step(p, &verdict, approved, m.digest) {
                    TagStep::Nothing => {}
                    TagStep::RecordApproved => {
                        Box::pin(self.note_approved_tag(key, m.digest)).await;
                    }
                    TagStep::KeepApproved(prev) => {
                        let last = self.last_approved(gen, upstream, route, p, prev);
                        if let Some((kept, kept_verdict)) = Box::pin(last).await? {
                            let tag = &key.tag;
                            drift_warning =
                                Some(self.record_drift(route, p, tag, &m, &verdict, &kept));
                            m = kept;
                            verdict = kept_verdict;
                        }
                    }
                }
            }
        }
        let warning = self.apply(
            route,
            &reference.to_string(),
            &verdict,
            Some(&m.digest),
            true,
        )?;
        if verdict.passes() && policy.is_some_and(|p| p.checks_content()) {
            self.record_approved_blobs(gen, route, &m);
        }
        let mut r = Response::builder()
            .header(header::CONTENT_TYPE, m.media_type.as_str())
            .header(header::CONTENT_LENGTH, m.bytes.len())
            .header("Docker-Content-Digest", m.digest.to_string())
            .header(header::ETAG, format!("\"{}\"", m.digest));
        if let Some(w) = drift_warning.or(warning).or(tag_warning) {
            r = r.header(header::WARNING, w);
        }
        let b = if head {
            body::empty()
        } else {
            self.metrics
                .bytes_served
                .with_label_values(&["cache"])
                .inc_by(m.bytes.len() as u64);
            body::full(m.bytes.clone())
        };
        Ok(r.body(b).expect("valid response"))
    }

    /// The content verdict of a fetched manifest under its policy.
    #[allow(clippy::too_many_arguments)]
    async fn verdict(
        self: &Arc<Self>,
        gen: &Arc<Generation>,
        upstream: &Arc<UpstreamClient>,
        route: &Route,
        policy: Option<&crate::config::PolicyConfig>,
        m: &StoredManifest,
        sig_tag: bool,
        early: Verdict,
    ) -> Verdict {
        let Some(policy) = policy.filter(|p| p.checks_content()) else {
            return early;
        };
        // A signature artifact cannot be signed itself; it is served
        // whenever the name is allowed, so clients can verify through
        // us. Only content that cannot run as an image counts as one.
        if sig_tag && crate::cosign::is_signature_artifact(&m.bytes) {
            return early;
        }
        let source = RouteSource {
            app: self,
            gen,
            upstream,
            route,
        };
        let v = self
            .verifier
            .verdict(
                gen.id,
                &gen.config.bases,
                policy,
                upstream,
                &route.repo,
                &route.canonical,
                m,
                &source,
            )
            .await;
        // (The body is only parsed when the verdict fails.)
        let bundle = !v.passes()
            && crate::cosign::is_bundle_manifest(&m.bytes)
            && crate::cosign::is_signature_artifact(&m.bytes);
        if bundle {
            early
        } else {
            v
        }
    }

    /// Remembers the digest a tag was last approved at (tag drift); called
    /// when it changed.
    async fn note_approved_tag(&self, key: TagKey, digest: Digest) {
        let store = self.store.clone();
        let written =
            tokio::task::spawn_blocking(move || store.set_tag_approved(&key, digest)).await;
        if let Ok(Err(e)) | Err(e) = written.map_err(std::io::Error::other) {
            tracing::warn!(%digest, "cannot record the approved digest of a tag: {e}");
        }
    }

    /// The tag's last approved manifest (`prev`) and its verdict, when it
    /// still passes.
    async fn last_approved(
        self: &Arc<Self>,
        gen: &Arc<Generation>,
        upstream: &Arc<UpstreamClient>,
        route: &Route,
        policy: &crate::config::PolicyConfig,
        prev: Digest,
    ) -> Result<Option<(Arc<StoredManifest>, Verdict)>, ApiError> {
        let Some(kept) = self.stored_manifest(&prev)? else {
            return Ok(None);
        };
        let v = self
            .verdict(
                gen,
                upstream,
                route,
                Some(policy),
                &kept,
                false,
                Verdict::of(policy, Vec::new()),
            )
            .await;
        Ok(v.passes().then_some((kept, v)))
    }

    /// Counts and records a drift kept on the last approved digest; returns
    /// the `Warning` for the response.
    fn record_drift(
        &self,
        route: &Route,
        policy: &crate::config::PolicyConfig,
        tag: &Tag,
        moved_to: &StoredManifest,
        denied: &Verdict,
        kept: &StoredManifest,
    ) -> HeaderValue {
        self.metrics
            .tag_drift
            .with_label_values(&[&*route.upstream_name, &policy.name])
            .inc();
        let message = format!(
            "tag {tag} moved to {}, which is denied ({}); serving its last approved digest {}",
            moved_to.digest,
            denied.message(&route.canonical),
            kept.digest
        );
        tracing::warn!(canonical = %route.canonical, %tag, from = %kept.digest, to = %moved_to.digest, policy = %policy.name, "tag drift: kept the last approved digest");
        let record = self
            .audit_record(
                route,
                tag.as_str(),
                denied,
                Some(&moved_to.digest),
                message.clone(),
            )
            .kept(kept.digest);
        self.audit.record(record);
        HeaderValue::from_str(&format!(
            "299 - \"pullgate: tag drift: {}\"",
            message.replace('"', "'")
        ))
        .unwrap_or(HeaderValue::from_static("299 - \"pullgate: tag drift\""))
    }

    /// The manifest a tag names now, with the tag's key and the digest
    /// policy last approved for it.
    async fn resolve_tag(
        self: &Arc<Self>,
        gen: &Arc<Generation>,
        upstream: &Arc<UpstreamClient>,
        route: &Route,
        tag: &Tag,
        accept: HeaderValue,
    ) -> Result<(Arc<StoredManifest>, TagKey, Option<Digest>), ApiError> {
        let key = TagKey {
            upstream: route.upstream_name.clone(),
            repo: route.repo.clone(),
            tag: tag.clone(),
        };
        let ttl = gen.config.storage.tag_ttl;
        if let Some(rec) = self.store.get_tag(&key) {
            let age = SystemTime::now()
                .duration_since(rec.checked)
                .unwrap_or(Duration::MAX);
            if age < ttl {
                if let Some(m) = self.stored_manifest(&rec.digest)? {
                    self.cache_result("manifest", "hit");
                    return Ok((m, key, rec.approved));
                }
            }
        }
        self.cache_result("manifest", "miss");
        let this = self.clone();
        let upstream = upstream.clone();
        let max = gen.config.server.max_manifest_size;
        let flight_key = key.clone();
        let (result, _) = self
            .tags
            .run(key.clone(), move || async move {
                this.refresh_tag(&upstream, flight_key, accept, max, ttl)
                    .await
            })
            .await;
        let approved = self.store.get_tag(&key).and_then(|r| r.approved);
        Ok((result?, key, approved))
    }

    /// Resolves a tag upstream: HEAD when a digest is known (cheap, and it
    /// does not count against Docker Hub's pull limit), GET otherwise. When
    /// the upstream fails, the last known digest is served.
    async fn refresh_tag(
        self: &Arc<Self>,
        upstream: &Arc<UpstreamClient>,
        key: TagKey,
        accept: HeaderValue,
        max: u64,
        ttl: Duration,
    ) -> Result<Arc<StoredManifest>, ApiError> {
        let known = self.store.get_tag(&key);
        let path = format!("manifests/{}", key.tag);
        let opts = RequestOptions {
            accept: Some(accept),
            ..RequestOptions::default()
        };
        if let Some(rec) = known {
            match upstream.send(Method::HEAD, &key.repo, &path, &opts).await {
                Ok(resp) if resp.status() == StatusCode::OK => {
                    let same = header_digest(resp.headers()) == Some(rec.digest);
                    if same {
                        if let Some(m) = self.stored_manifest(&rec.digest)? {
                            self.save_tag(&key, rec.digest).await?;
                            return Ok(m);
                        }
                    }
                    // Moved, or the upstream did not say: fetch it.
                }
                Ok(resp) if resp.status() == StatusCode::NOT_FOUND => {
                    self.store.remove_tag(&key);
                    return Err(ApiError::manifest_unknown(format!(
                        "tag {} is no longer in {}/{}",
                        key.tag, upstream.name, key.repo
                    )));
                }
                Ok(resp) if is_transient(resp.status()) => {
                    let why = format!("upstream answered {}", resp.status());
                    let err = status_error(upstream, resp.status(), resp.headers());
                    return self.serve_stale(upstream, &key, rec, &why, err, ttl);
                }
                Ok(resp) => return Err(status_error(upstream, resp.status(), resp.headers())),
                Err(e) => {
                    let why = e.to_string();
                    return self.serve_stale(
                        upstream,
                        &key,
                        rec,
                        &why,
                        ApiError::unavailable(why.clone()),
                        ttl,
                    );
                }
            }
        }
        match self
            .fetch_manifest(upstream, &key, &Reference::Tag(key.tag.clone()), &opts, max)
            .await
        {
            Ok(m) => {
                self.save_tag(&key, m.digest).await?;
                Ok(m)
            }
            Err(e) => match known {
                Some(rec)
                    if is_transient(e.status) || e.status == StatusCode::SERVICE_UNAVAILABLE =>
                {
                    let why = e.message.clone();
                    self.serve_stale(upstream, &key, rec, &why, e, ttl)
                }
                _ => Err(e),
            },
        }
    }

    fn serve_stale(
        &self,
        upstream: &UpstreamClient,
        key: &TagKey,
        rec: TagRecord,
        why: &str,
        err: ApiError,
        ttl: Duration,
    ) -> Result<Arc<StoredManifest>, ApiError> {
        let Some(m) = self.stored_manifest(&rec.digest)? else {
            return Err(err);
        };
        self.metrics
            .stale_serves
            .with_label_values(&[&*upstream.name])
            .inc();
        self.cache_result("manifest", "stale");
        tracing::warn!(
            upstream = %upstream.name,
            repo = %key.repo,
            tag = %key.tag,
            digest = %rec.digest,
            "serving last known digest: {why}"
        );
        // Try the upstream again soon, not on every request.
        let checked = SystemTime::now()
            .checked_sub(ttl.saturating_sub(STALE_RETRY))
            .unwrap_or(rec.checked);
        self.store.defer_tag(key, rec, checked);
        Ok(m)
    }

    async fn save_tag(&self, key: &TagKey, digest: Digest) -> Result<(), ApiError> {
        let store = self.store.clone();
        let key = key.clone();
        tokio::task::spawn_blocking(move || {
            // What policy approved last stays, whatever the tag says now.
            store.update_tag(&key, |old| TagRecord {
                digest,
                checked: SystemTime::now(),
                approved: old.and_then(|r| r.approved),
            })
        })
        .await
        .map_err(|e| ApiError::internal(format!("tag writer failed: {e}")))?
        .map_err(|e| ApiError::internal(format!("cannot record tag: {e}")))
    }

    async fn manifest_by_digest(
        self: &Arc<Self>,
        gen: &Arc<Generation>,
        upstream: &Arc<UpstreamClient>,
        route: &Route,
        digest: Digest,
        accept: HeaderValue,
    ) -> Result<Arc<StoredManifest>, ApiError> {
        if let Some(m) = self.stored_manifest(&digest)? {
            self.cache_result("manifest", "hit");
            return Ok(m);
        }
        self.cache_result("manifest", "miss");
        let this = self.clone();
        let upstream = upstream.clone();
        let max = gen.config.server.max_manifest_size;
        let key = TagKey {
            upstream: route.upstream_name.clone(),
            repo: route.repo.clone(),
            tag: "digest".parse().expect("valid tag"),
        };
        let (result, _) = self
            .manifests
            .run((route.upstream_name.clone(), digest), move || async move {
                let opts = RequestOptions {
                    accept: Some(accept),
                    ..RequestOptions::default()
                };
                this.fetch_manifest(&upstream, &key, &Reference::Digest(digest), &opts, max)
                    .await
            })
            .await;
        result
    }

    /// GETs a manifest upstream, checks it and stores it.
    async fn fetch_manifest(
        &self,
        upstream: &UpstreamClient,
        key: &TagKey,
        reference: &Reference,
        opts: &RequestOptions,
        max: u64,
    ) -> Result<Arc<StoredManifest>, ApiError> {
        let resp = upstream
            .send(
                Method::GET,
                &key.repo,
                &format!("manifests/{reference}"),
                opts,
            )
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return Err(ApiError::manifest_unknown(format!(
                    "manifest {reference} is not in {}/{}",
                    upstream.name, key.repo
                )))
            }
            s => return Err(status_error(upstream, s, resp.headers())),
        }
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_owned());
        let claimed = header_digest(resp.headers());
        let bytes = read_capped(upstream, resp, max, "manifest").await?;
        let digest = Digest::of(&bytes);
        if let Reference::Digest(want) = reference {
            if *want != digest {
                self.metrics
                    .digest_mismatches
                    .with_label_values(&[&*upstream.name])
                    .inc();
                return Err(ApiError::bad_upstream(format!(
                    "upstream {} sent a manifest for {want} whose bytes hash to {digest}; discarded",
                    upstream.name
                )));
            }
        }
        if let Some(c) = claimed {
            if c != digest {
                self.metrics
                    .digest_mismatches
                    .with_label_values(&[&*upstream.name])
                    .inc();
                return Err(ApiError::bad_upstream(format!(
                    "upstream {} said manifest {reference} is {c} but its bytes hash to {digest}; discarded",
                    upstream.name
                )));
            }
        }
        let media_type = manifest_media_type(content_type.as_deref(), &bytes).map_err(|why| {
            ApiError::bad_upstream(format!(
                "upstream {} sent an unusable manifest for {}/{}:{reference}: {why}",
                upstream.name, key.repo, ""
            ))
        })?;
        let m = Arc::new(StoredManifest {
            digest,
            media_type,
            bytes,
        });
        let store = self.store.clone();
        let to_store = m.clone();
        tokio::task::spawn_blocking(move || store.put_manifest(to_store))
            .await
            .map_err(|e| ApiError::internal(format!("manifest writer failed: {e}")))?
            .map_err(|e| ApiError::internal(format!("cannot store manifest {digest}: {e}")))?;
        tracing::info!(upstream = %upstream.name, repo = %key.repo, %reference, %digest, "manifest fetched and stored");
        Ok(m)
    }

    /// Notes the blobs an approved manifest references (config and layers;
    /// for a signature manifest, its payloads), once per manifest and name.
    /// Only called under policies that gate blobs (`signed_by`).
    fn record_approved_blobs(&self, gen: &Generation, route: &Route, m: &StoredManifest) {
        let name = route.canonical.as_str();
        if self
            .approved_manifests
            .get(&m.digest, gen.id, name)
            .is_some()
        {
            return;
        }
        for blob in referenced_blobs(&m.bytes) {
            if self.approved_blobs.insert(blob, gen.id, name, ()) {
                // Emptied for size: the manifests recorded so far must be
                // recorded again at their next pull.
                self.approved_manifests.clear();
            }
        }
        self.approved_manifests.insert(m.digest, gen.id, name, ());
    }

    fn stored_manifest(&self, d: &Digest) -> Result<Option<Arc<StoredManifest>>, ApiError> {
        self.store.get_manifest(d).map_err(|e| {
            ApiError::internal(format!("cannot read manifest {d} from the store: {e}"))
        })
    }

    fn cache_result(&self, kind: &str, result: &str) {
        self.metrics
            .cache_requests
            .with_label_values(&[kind, result])
            .inc();
    }

    // ---- blobs -------------------------------------------------------------

    async fn blob<B>(
        self: &Arc<Self>,
        gen: &Arc<Generation>,
        upstream: &Arc<UpstreamClient>,
        route: &Route,
        digest: Digest,
        req: &Request<B>,
    ) -> Result<Response<Body>, ApiError> {
        let head = req.method() == Method::HEAD;
        let headers = req.headers();
        // Set by the server on real connections: cached bytes go out with sendfile.
        let zero_copy = req.extensions().get::<zerocopy::Queue>().cloned();
        let policy = gen.policies.matching(&route.canonical);
        let verdict = Policies::by_name(policy);
        if verdict.blocks() {
            self.apply(route, &digest.to_string(), &verdict, None, false)?;
        }
        // Under a policy with requirements, only blobs of approved manifests
        // of this repository: a denied image's layers cannot be fetched by
        // digest. Clients fetch the manifest first, so this costs them nothing.
        if let Some(policy) = policy {
            let gated = policy.checks_content() && policy.mode == crate::config::Mode::Enforce;
            if gated
                && self
                    .approved_blobs
                    .get(&digest, gen.id, &route.canonical)
                    .is_none()
            {
                let verdict = Verdict::of(policy, vec![crate::policy::reason::NOT_APPROVED]);
                self.apply(route, &digest.to_string(), &verdict, Some(&digest), false)?;
            }
        }
        let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
        let mut attempts = 0;
        loop {
            if let Some(open) = self.open_blob(&digest)? {
                self.cache_result("blob", "hit");
                let size = open.size;
                let (status, start, end) = match parse_range(range, size) {
                    RangeSpec::Full => (StatusCode::OK, 0, size),
                    RangeSpec::Partial(s, e) => (StatusCode::PARTIAL_CONTENT, s, e),
                    RangeSpec::Unsatisfiable => return Ok(unsatisfiable(size)),
                };
                let metrics = self.metrics.clone();
                let body = match (head, zero_copy.clone()) {
                    (true, _) => body::empty(),
                    (false, Some(queue)) => {
                        zerocopy::body(queue, open.file, start, end, open.guard, metrics)
                    }
                    (false, None) => {
                        BlobReader::stored(open.file, start, end, open.guard, metrics).into_body()
                    }
                };
                return Ok(blob_response(status, digest, start, end, Some(size), body));
            }
            if head {
                self.cache_result("blob", "miss");
                return self.head_blob_upstream(upstream, route, digest).await;
            }
            match self
                .blobs
                .join(upstream.clone(), route.repo.clone(), digest)
            {
                Some((flight, started)) => {
                    // `miss`: this request made the upstream fetch; `joined`:
                    // it follows a fetch another request started.
                    self.cache_result("blob", if started { "miss" } else { "joined" });
                    return self.follow(flight.subscribe(), digest, range).await;
                }
                // Committed between our look and the join: read the store.
                None if attempts == 0 => attempts += 1,
                None => {
                    return Err(ApiError::internal(format!(
                        "blob {digest} vanished from the store"
                    )))
                }
            }
        }
    }

    fn open_blob(&self, d: &Digest) -> Result<Option<crate::store::OpenBlob>, ApiError> {
        self.store
            .open_blob(d)
            .map_err(|e| ApiError::internal(format!("cannot read blob {d} from the store: {e}")))
    }

    /// Answers from a running fetch, as bytes arrive.
    async fn follow(
        &self,
        mut rx: tokio::sync::watch::Receiver<crate::fetch::Progress>,
        digest: Digest,
        range: Option<&str>,
    ) -> Result<Response<Body>, ApiError> {
        let total = loop {
            let p = rx.borrow_and_update().clone();
            match p.state {
                FlightState::Failed(e) => return Err(e),
                FlightState::Connecting => {
                    if rx.changed().await.is_err() {
                        if let FlightState::Failed(e) = rx.borrow().state.clone() {
                            return Err(e);
                        }
                        return Err(ApiError::internal("blob fetch ended without an outcome"));
                    }
                }
                FlightState::Streaming | FlightState::Committed => break p.total,
            }
        };
        let guard = self.store.pin(&digest);
        let (status, start, end) = match total {
            Some(size) => match parse_range(range, size) {
                RangeSpec::Full => (StatusCode::OK, 0, Some(size)),
                RangeSpec::Partial(s, e) => (StatusCode::PARTIAL_CONTENT, s, Some(e)),
                RangeSpec::Unsatisfiable => return Ok(unsatisfiable(size)),
            },
            // Without a length, a range cannot be checked up front: send it all.
            None => (StatusCode::OK, 0, None),
        };
        let body = BlobReader::following(rx, start, end, guard, self.metrics.clone()).into_body();
        Ok(blob_response(
            status,
            digest,
            start,
            end.unwrap_or(0),
            total,
            body,
        ))
    }

    async fn head_blob_upstream(
        &self,
        upstream: &UpstreamClient,
        route: &Route,
        digest: Digest,
    ) -> Result<Response<Body>, ApiError> {
        let resp = upstream
            .send(
                Method::HEAD,
                &route.repo,
                &format!("blobs/{digest}"),
                &RequestOptions::default(),
            )
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        match resp.status() {
            StatusCode::OK => {
                let size = resp.content_length();
                Ok(blob_response(
                    StatusCode::OK,
                    digest,
                    0,
                    size.unwrap_or(0),
                    size,
                    body::empty(),
                ))
            }
            StatusCode::NOT_FOUND => Err(ApiError::blob_unknown(format!(
                "blob {digest} is not in {}/{}",
                upstream.name, route.repo
            ))),
            s => Err(status_error(upstream, s, resp.headers())),
        }
    }

    // ---- pass-through --------------------------------------------------------

    async fn tags_list(
        &self,
        gen: &Arc<Generation>,
        upstream: &UpstreamClient,
        route: &Route,
        query: Option<&str>,
        head: bool,
    ) -> Result<Response<Body>, ApiError> {
        let verdict = gen.policies.evaluate(&route.canonical);
        if verdict.blocks() {
            self.apply(route, "tags/list", &verdict, None, false)?;
        }
        let mut q = Vec::new();
        if let Some(n) = query_param(query, "n") {
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || n.len() > 9 {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "PAGINATION_NUMBER_INVALID",
                    format!("n={n:?} is not a number"),
                ));
            }
            q.push(format!("n={n}"));
        }
        if let Some(last) = query_param(query, "last") {
            if !last.is_empty() {
                last.parse::<Tag>()?;
                q.push(format!("last={last}"));
            }
        }
        let opts = RequestOptions {
            query: (!q.is_empty()).then(|| q.join("&")),
            ..RequestOptions::default()
        };
        let key = (route.canonical.clone(), opts.query.clone());
        let (bytes, link) = match self.fetch_tag_list(upstream, route, &opts).await {
            Ok(list) => {
                self.tag_lists.insert(key, list.clone());
                list
            }
            // Stale-if-error, as for tags: the last answer, when there is one.
            Err(e) if e.status.is_server_error() || e.status == StatusCode::TOO_MANY_REQUESTS => {
                let Some(list) = self.tag_lists.get(&key) else {
                    return Err(e);
                };
                tracing::warn!(upstream = %upstream.name, repo = %route.repo, "serving the last tag list: {}", e.message);
                self.metrics
                    .stale_serves
                    .with_label_values(&[&*upstream.name])
                    .inc();
                self.cache_result("tags", "stale");
                list
            }
            Err(e) => return Err(e),
        };
        let mut r = Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, bytes.len());
        if let Some(l) = link {
            r = r.header(header::LINK, l);
        }
        let b = if head {
            body::empty()
        } else {
            body::full(bytes)
        };
        Ok(r.body(b).expect("valid response"))
    }

    /// GETs a tag list upstream: the body and the `Link` header rewritten
    /// for the client's name.
    async fn fetch_tag_list(
        &self,
        upstream: &UpstreamClient,
        route: &Route,
        opts: &RequestOptions,
    ) -> Result<(Bytes, Option<String>), ApiError> {
        let resp = upstream
            .send(Method::GET, &route.repo, "tags/list", opts)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return Err(ApiError::name_unknown(format!(
                    "repository {} is not known to upstream {}",
                    route.repo, upstream.name
                )))
            }
            s => return Err(status_error(upstream, s, resp.headers())),
        }
        let link = resp
            .headers()
            .get(header::LINK)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| rewrite_link(l, route));
        let bytes = read_capped(upstream, resp, MAX_PASSTHROUGH_BODY, "tag list").await?;
        Ok((bytes, link))
    }

    async fn referrers(
        &self,
        gen: &Arc<Generation>,
        upstream: &UpstreamClient,
        route: &Route,
        digest: Digest,
        query: Option<&str>,
        head: bool,
    ) -> Result<Response<Body>, ApiError> {
        let verdict = gen.policies.evaluate(&route.canonical);
        if verdict.blocks() {
            self.apply(route, &digest.to_string(), &verdict, Some(&digest), false)?;
        }
        let mut opts = RequestOptions::default();
        if let Some(t) = query_param(query, "artifactType") {
            let ok = t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/.+-_%".contains(&b));
            if !ok || t.len() > 255 {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "UNSUPPORTED",
                    "artifactType is not a media type",
                ));
            }
            opts.query = Some(format!("artifactType={t}"));
        }
        let resp = upstream
            .send(
                Method::GET,
                &route.repo,
                &format!("referrers/{digest}"),
                &opts,
            )
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return Err(ApiError::manifest_unknown(format!(
                    "upstream {} has no referrers API answer for {digest}",
                    upstream.name
                )))
            }
            s => return Err(status_error(upstream, s, resp.headers())),
        }
        let filters = resp.headers().get("OCI-Filters-Applied").cloned();
        let bytes = read_capped(upstream, resp, MAX_PASSTHROUGH_BODY, "referrers list").await?;
        let mut r = Response::builder()
            .header(
                header::CONTENT_TYPE,
                "application/vnd.oci.image.index.v1+json",
            )
            .header(header::CONTENT_LENGTH, bytes.len());
        if let Some(f) = filters {
            r = r.header("OCI-Filters-Applied", f);
        }
        let b = if head {
            body::empty()
        } else {
            body::full(bytes)
        };
        Ok(r.body(b).expect("valid response"))
    }
}

/// The config and layer digests an image manifest references.
pub fn referenced_blobs(manifest: &[u8]) -> Vec<Digest> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(manifest) else {
        return Vec::new();
    };
    let config = v["config"]["digest"].as_str();
    let layers = v["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["digest"].as_str());
    config
        .into_iter()
        .chain(layers)
        .filter_map(|d| d.parse().ok())
        .collect()
}

/// Resolves base references through the same tag and manifest machinery
/// as client pulls (store, single flight, stale-if-error).
struct AppResolver<'a> {
    app: &'a Arc<App>,
    gen: &'a Arc<Generation>,
}

impl AppResolver<'_> {
    fn route(&self, base: &crate::config::BaseRef) -> Result<(Arc<UpstreamClient>, Route), String> {
        let name: crate::names::RepoName = base.canonical.parse().map_err(|e| format!("{e}"))?;
        let route = self.gen.router.route(&name, None).map_err(|e| e.message)?;
        Ok((self.gen.upstreams[route.upstream].clone(), route))
    }
}

impl crate::bases::Resolver for AppResolver<'_> {
    async fn resolve(&self, base: &crate::config::BaseRef) -> Result<Digest, String> {
        let Reference::Tag(tag) = &base.reference else {
            return Err("not a tag".into());
        };
        let (upstream, route) = self.route(base)?;
        let key = TagKey {
            upstream: route.upstream_name.clone(),
            repo: route.repo.clone(),
            tag: tag.clone(),
        };
        let app = self.app.clone();
        let accept = HeaderValue::from_static(DEFAULT_ACCEPT);
        let max = self.gen.config.server.max_manifest_size;
        let ttl = self.gen.config.storage.tag_ttl;
        let (result, _) = self
            .app
            .tags
            .run(key.clone(), move || async move {
                app.refresh_tag(&upstream, key, accept, max, ttl).await
            })
            .await;
        result.map(|m| m.digest).map_err(|e| e.message)
    }

    async fn manifest(
        &self,
        base: &crate::config::BaseRef,
        digest: Digest,
    ) -> Result<Arc<StoredManifest>, String> {
        let (upstream, route) = self.route(base)?;
        let source = RouteSource {
            app: self.app,
            gen: self.gen,
            upstream: &upstream,
            route: &route,
        };
        crate::bases::Source::manifest(&source, digest).await
    }
}

/// What the base check fetches for one request: manifests of the routed
/// repository through the store and its single flights, and image configs.
struct RouteSource<'a> {
    app: &'a Arc<App>,
    gen: &'a Arc<Generation>,
    upstream: &'a Arc<UpstreamClient>,
    route: &'a Route,
}

impl crate::bases::Source for RouteSource<'_> {
    async fn manifest(&self, digest: Digest) -> Result<Arc<StoredManifest>, String> {
        // Looked up here first so that the base check's own reads do not
        // count as client cache lookups in the metrics.
        if let Ok(Some(m)) = self.app.store.get_manifest(&digest) {
            return Ok(m);
        }
        let accept = HeaderValue::from_static(DEFAULT_ACCEPT);
        self.app
            .manifest_by_digest(self.gen, self.upstream, self.route, digest, accept)
            .await
            .map_err(|e| e.message)
    }

    /// From the config blob in the store, else from the upstream (not
    /// stored: the client fetching it next stores it the usual way).
    async fn platform(&self, config: Digest) -> Option<crate::bases::Platform> {
        const MAX: usize = 1024 * 1024;
        let path = self.app.store.blob_path(&config);
        let stored = std::fs::metadata(&path)
            .is_ok_and(|m| m.len() <= MAX as u64)
            .then(|| std::fs::read(&path).ok())
            .flatten();
        let bytes = match stored {
            Some(b) => Bytes::from(b),
            None => crate::verify::get_blob(self.upstream, &self.route.repo, config, MAX).await?,
        };
        crate::bases::Platform::from_config(&bytes)
    }
}

/// `sha256-<64 hex>.sig` (a legacy cosign signature; `.att` and `.sbom` are
/// cosign's attestations and SBOMs) or `sha256-<64 hex>` (the referrers list
/// of a registry without the referrers API).
fn is_signature_tag(tag: &Tag) -> bool {
    let t = tag.as_str();
    let rest = t.strip_prefix("sha256-").unwrap_or("");
    let hex = [".sig", ".att", ".sbom"]
        .iter()
        .find_map(|s| rest.strip_suffix(s))
        .unwrap_or(rest);
    hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

fn read_only() -> ApiError {
    ApiError::unsupported(
        "pullgate is a read-only pull-through proxy: pushes and deletes are not supported",
    )
}

fn is_transient(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// The client's `Accept` headers joined, or the default list.
fn accept_header(headers: &HeaderMap) -> HeaderValue {
    let values: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    // `*/*` (curl's default) or no manifest type at all: registries answer
    // OCI content only to clients that name it, so ask for every type.
    let names_a_manifest = values.iter().any(|v| {
        v.contains("application/vnd.oci.image.")
            || v.contains("application/vnd.docker.distribution.manifest.")
    });
    if !names_a_manifest {
        return HeaderValue::from_static(DEFAULT_ACCEPT);
    }
    HeaderValue::from_str(&values.join(", ")).unwrap_or(HeaderValue::from_static(DEFAULT_ACCEPT))
}

fn header_digest(headers: &HeaderMap) -> Option<Digest> {
    headers
        .get("Docker-Content-Digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
}

/// The value of `name` in a raw query string.
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Reads an upstream body into memory, refusing more than `max` bytes.
async fn read_capped(
    upstream: &UpstreamClient,
    resp: reqwest::Response,
    max: u64,
    what: &str,
) -> Result<Bytes, ApiError> {
    if let Some(len) = resp.content_length() {
        if len > max {
            return Err(ApiError::bad_upstream(format!(
                "upstream {} sent a {what} of {len} bytes, over the {max}-byte limit",
                upstream.name
            )));
        }
    }
    let expected = resp.content_length();
    let buf = upstream.read_body(resp, max).await.map_err(|e| match e {
        BodyError::TooLarge => ApiError::bad_upstream(format!(
            "upstream {} sent a {what} over the {max}-byte limit",
            upstream.name
        )),
        BodyError::Stalled => ApiError::unavailable(format!(
            "upstream {} stalled sending a {what}",
            upstream.name
        )),
        BodyError::Broken(e) => ApiError::unavailable(format!(
            "upstream {} broke off a {what}: {e}",
            upstream.name
        )),
    })?;
    if let Some(len) = expected {
        if buf.len() as u64 != len {
            return Err(ApiError::bad_upstream(format!(
                "upstream {} sent {} bytes of a {what} announced as {len}",
                upstream.name,
                buf.len()
            )));
        }
    }
    Ok(buf)
}

/// Decides a manifest's media type from the upstream's `Content-Type` and
/// the body, which must be a JSON object.
pub fn manifest_media_type(content_type: Option<&str>, bytes: &[u8]) -> Result<String, String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON ({e})"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    // A body that is both an index and an image would be checked as one
    // and used as the other (CVE-2021-41190): refused.
    if obj.contains_key("manifests") && (obj.contains_key("layers") || obj.contains_key("config")) {
        return Err(
            "it has both \"manifests\" (an index) and \"config\"/\"layers\" (an image): ambiguous, refused".into(),
        );
    }
    let declared = obj.get("mediaType").and_then(|m| m.as_str());
    let is_manifest_type = |t: &str| {
        t.starts_with("application/vnd.oci.image.")
            || t.starts_with("application/vnd.docker.distribution.manifest.")
            || t.starts_with("application/vnd.oci.artifact.")
    };
    if let Some(ct) = content_type.filter(|t| is_manifest_type(t)) {
        return Ok(ct.to_owned());
    }
    if let Some(d) = declared {
        return Ok(d.to_owned());
    }
    if obj.contains_key("manifests") {
        return Ok("application/vnd.oci.image.index.v1+json".into());
    }
    if obj.contains_key("layers") || obj.contains_key("config") {
        return Ok("application/vnd.oci.image.manifest.v1+json".into());
    }
    Err("no manifest media type in Content-Type or body".into())
}

/// A `Range` request resolved against a blob size.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeSpec {
    Full,
    /// `[start, end)`.
    Partial(u64, u64),
    Unsatisfiable,
}

/// Parses a single `bytes=` range; anything else is ignored (full answer),
/// as HTTP allows.
pub fn parse_range(range: Option<&str>, size: u64) -> RangeSpec {
    let Some(spec) = range.and_then(|r| r.trim().strip_prefix("bytes=")) else {
        return RangeSpec::Full;
    };
    if spec.contains(',') {
        return RangeSpec::Full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeSpec::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| s.parse::<u64>().ok();
    match (a.is_empty(), b.is_empty()) {
        (true, false) => match num(b) {
            Some(0) => RangeSpec::Unsatisfiable,
            Some(n) if size == 0 => {
                let _ = n;
                RangeSpec::Unsatisfiable
            }
            Some(n) => RangeSpec::Partial(size.saturating_sub(n), size),
            None => RangeSpec::Full,
        },
        (false, _) => {
            let Some(start) = num(a) else {
                return RangeSpec::Full;
            };
            let end = if b.is_empty() {
                size
            } else {
                match num(b) {
                    Some(e) if e >= start => (e + 1).min(size),
                    _ => return RangeSpec::Full,
                }
            };
            if start >= size {
                RangeSpec::Unsatisfiable
            } else {
                RangeSpec::Partial(start, end)
            }
        }
        (true, true) => RangeSpec::Full,
    }
}

fn unsatisfiable(size: u64) -> Response<Body> {
    let mut r = ApiError::new(
        StatusCode::RANGE_NOT_SATISFIABLE,
        "SIZE_INVALID",
        format!("requested range is outside the blob's {size} bytes"),
    )
    .into_response(false);
    r.headers_mut().insert(
        header::CONTENT_RANGE,
        HeaderValue::from_str(&format!("bytes */{size}")).expect("valid header"),
    );
    r
}

fn blob_response(
    status: StatusCode,
    digest: Digest,
    start: u64,
    end: u64,
    total: Option<u64>,
    body: Body,
) -> Response<Body> {
    let mut r = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("Docker-Content-Digest", digest.to_string())
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{digest}\""));
    if let Some(size) = total {
        r = r.header(header::CONTENT_LENGTH, end - start);
        if status == StatusCode::PARTIAL_CONTENT {
            r = r.header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{size}", end.saturating_sub(1)),
            );
        }
    }
    r.body(body).expect("valid response")
}

/// Points an upstream `Link: </v2/<repo>/tags/list?...>` at the client's name.
fn rewrite_link(link: &str, route: &Route) -> Option<String> {
    let start = link.find('<')? + 1;
    let end = link[start..].find('>')? + start;
    let target = &link[start..end];
    let path_start = target.find("/v2/")?;
    let path = &target[path_start..];
    let upstream_prefix = format!("/v2/{}/", route.repo);
    let rest = path.strip_prefix(&upstream_prefix)?;
    Some(format!(
        "</v2/{}/{rest}>{}",
        route.client_name,
        &link[end + 1..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_resolve_against_size() {
        assert_eq!(parse_range(None, 10), RangeSpec::Full);
        assert_eq!(parse_range(Some("bytes=0-4"), 10), RangeSpec::Partial(0, 5));
        assert_eq!(parse_range(Some("bytes=5-"), 10), RangeSpec::Partial(5, 10));
        assert_eq!(parse_range(Some("bytes=-3"), 10), RangeSpec::Partial(7, 10));
        assert_eq!(
            parse_range(Some("bytes=8-100"), 10),
            RangeSpec::Partial(8, 10)
        );
        assert_eq!(parse_range(Some("bytes=10-"), 10), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), RangeSpec::Full);
        assert_eq!(parse_range(Some("bytes=x-1"), 10), RangeSpec::Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), RangeSpec::Full);
        assert_eq!(parse_range(Some("bytes=5-2"), 10), RangeSpec::Full);
    }

    #[test]
    fn media_type_comes_from_header_or_body() {
        let oci = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;
        assert_eq!(
            manifest_media_type(
                Some("application/vnd.docker.distribution.manifest.v2+json"),
                oci
            )
            .unwrap(),
            "application/vnd.docker.distribution.manifest.v2+json"
        );
        assert_eq!(
            manifest_media_type(Some("text/plain"), oci).unwrap(),
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(
            manifest_media_type(None, br#"{"schemaVersion":2,"manifests":[]}"#).unwrap(),
            "application/vnd.oci.image.index.v1+json"
        );
        assert!(manifest_media_type(None, b"<html>").is_err());
        assert!(manifest_media_type(None, b"[1]").is_err());
        assert!(manifest_media_type(None, br#"{"a":1}"#).is_err());
    }

    #[test]
    fn query_params_are_found() {
        assert_eq!(
            query_param(Some("ns=docker.io&x=1"), "ns"),
            Some("docker.io")
        );
        assert_eq!(query_param(Some("n=10&last=v1"), "last"), Some("v1"));
        assert_eq!(query_param(Some("flag"), "flag"), Some(""));
        assert_eq!(query_param(None, "ns"), None);
    }

    #[test]
    fn link_headers_point_at_the_client_name() {
        let router = Router::new([("docker.io", true), ("ghcr.io", false)]);
        let route = router
            .route(&"ghcr.io/acme/app".parse().unwrap(), None)
            .unwrap();
        let l = rewrite_link("</v2/acme/app/tags/list?last=v2&n=2>; rel=\"next\"", &route).unwrap();
        assert_eq!(
            l,
            "</v2/ghcr.io/acme/app/tags/list?last=v2&n=2>; rel=\"next\""
        );
        let abs = rewrite_link(
            "<https://ghcr.io/v2/acme/app/tags/list?n=2&last=b>; rel=\"next\"",
            &route,
        )
        .unwrap();
        assert_eq!(
            abs,
            "</v2/ghcr.io/acme/app/tags/list?n=2&last=b>; rel=\"next\""
        );
    }
}

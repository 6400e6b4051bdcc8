//! The request pipeline: the one place that spells out the whole flow.
//!
//! ```text
//! request ─▶ route (path → upstream, repository; rewrites) ─▶ Ctx
//!   manifest ─▶ policy on the name ─▶ tag rules ─▶ pins
//!            ─▶ content: tag (store within tag_ttl, else the remote) or digest
//!            ─▶ verify (signatures, bases; cached verdict) ─▶ tag drift
//!            ─▶ decide: 200 | 403 DENIED (+ audit record + metric)
//!   blob     ─▶ policy on the name ─▶ approved-blob gate
//!            ─▶ content: store (Range, sendfile) or the shared fetch
//!   tags/list, referrers ─▶ policy on the name ─▶ passed through
//! ```
//!
//! Each step is a module of its own ([`manifests`], [`blobs`], [`lists`],
//! [`decide`]); this one holds the running state ([`App`]), builds the
//! request context ([`context::Ctx`]) and turns errors into responses
//! through [`errors`]. `pullgate verify` runs the same steps with a trace
//! ([`explain`]). Depends on everything below it: `route`, `policy`,
//! `verify`, `content`, `store`, `remote`, `audit`, `metrics`, `oci`.

pub mod approved;
mod blobs;
pub mod context;
mod decide;
pub mod errors;
pub mod explain;
mod lists;
mod manifests;
pub mod respond;
mod sources;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::{header, HeaderValue, Method, Request, Response};
use tracing::{field, Instrument};

use crate::audit::Audit;
use crate::body::{self, Body};
use crate::config::Config;
use crate::content::Content;
use crate::metrics::Metrics;
use crate::oci::error::Origin;
use crate::remote::registry::ClientError;
use crate::route::{parse_path, PathKind, Target};
use crate::store::{FsStore, SharedStore, Store};
use crate::verify::bases::{BaseTable, Refresher};
use crate::verify::Verifier;
use approved::Approved;
pub use context::Client;
use context::{Ctx, Generation};
use errors::Error;
use respond::query_param;

/// Largest total of request header bytes accepted.
pub(crate) const MAX_HEADER_BYTES: usize = 32 * 1024;

/// How often a server looks for imports to apply.
const IMPORT_WATCH: Duration = Duration::from_millis(500);

/// Why the proxy cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the store at {}: {source}", path.display())]
    Store {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot use the shared bucket ([storage.s3]): {0}")]
    Bucket(std::io::Error),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Upstream(#[from] ClientError),
}

/// The running proxy: content, verdicts, the current config.
pub struct App {
    generation: ArcSwap<Generation>,
    pub store: Arc<dyn Store>,
    pub content: Arc<Content>,
    pub metrics: Arc<Metrics>,
    pub verifier: Verifier,
    /// The audit log and the recent decisions behind the dashboard.
    pub audit: Audit,
    /// Blobs that approved manifests reference.
    approved: Approved,
    bases: Arc<Refresher>,
    /// What this pullgate calls itself in the hop header.
    pub instance: Arc<str>,
    /// Slows clients that keep failing to authenticate.
    throttle: crate::auth::Throttle,
    /// What offline upstreams answer from: the store, or (verifying an
    /// import) the bundle, then the site's store.
    offline: Vec<Arc<dyn Store>>,
}

impl App {
    /// Opens the store on disk and builds the first generation.
    pub fn new(config: Config) -> Result<Arc<App>, StartError> {
        let metrics = Arc::new(Metrics::new());
        let store = FsStore::open(
            &config.storage.path,
            config.storage.max_size,
            metrics.clone(),
        )
        .map_err(|source| StartError::Store {
            path: config.storage.path.clone(),
            source,
        })?;
        App::with_store(config, Arc::new(store), metrics)
    }

    /// Opens the store the config names (the local tier first, then the
    /// shared bucket, which must answer) and builds the first generation:
    /// what `serve` runs.
    pub async fn start(config: Config) -> Result<Arc<App>, StartError> {
        let Some(s3) = config.storage.s3.clone() else {
            return tokio::task::spawn_blocking(move || App::new(config))
                .await
                .map_err(|e| StartError::Bucket(std::io::Error::other(e)))?;
        };
        let metrics = Arc::new(Metrics::new());
        let (path, max) = (config.storage.path.clone(), config.storage.max_size);
        let m = metrics.clone();
        let local = tokio::task::spawn_blocking(move || FsStore::open(&path, max, m))
            .await
            .map_err(|e| StartError::Bucket(std::io::Error::other(e)))?
            .map_err(|source| StartError::Store {
                path: config.storage.path.clone(),
                source,
            })?;
        let bucket = crate::store::Bucket::s3(&s3).map_err(StartError::Bucket)?;
        bucket.check().await.map_err(StartError::Bucket)?;
        bucket
            .check_conditional_writes()
            .await
            .map_err(StartError::Bucket)?;
        tracing::info!(bucket = %bucket.describe(), "shared bucket ready");
        let limit = crate::store::BucketLimit {
            max_size: s3.max_size,
            min_idle: s3.min_idle,
        };
        let store = SharedStore::new(
            local,
            bucket,
            config.storage.tag_ttl,
            limit,
            metrics.clone(),
        );
        store.spawn_retries();
        store.spawn_eviction();
        let queue = store.clone();
        tokio::spawn(async move {
            match queue.upload_missing().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    blobs = n,
                    "uploading blobs of the local tier the shared bucket does not hold"
                ),
                Err(e) => tracing::warn!("cannot list the shared bucket's blobs: {e}"),
            }
        });
        App::with_store(config, Arc::new(store), metrics)
    }

    /// Builds the proxy over `store`, whose metrics are `metrics`.
    pub fn with_store(
        config: Config,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<App>, StartError> {
        let offline = vec![store.clone()];
        App::build(config, store, metrics, true, offline)
    }

    /// With `refresh`, base images are resolved in the background (in a
    /// runtime); commands resolve the ones they need themselves.
    fn build(
        config: Config,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        refresh: bool,
        offline: Vec<Arc<dyn Store>>,
    ) -> Result<Arc<App>, StartError> {
        let audit = Audit::new(
            config.audit.path.as_deref(),
            config.audit.approvals,
            metrics.clone(),
        )?;
        let instance = crate::remote::new_instance_id();
        let generation = Generation::build(config, &metrics, &instance, &offline)?;
        let app = Arc::new(App {
            offline,
            instance,
            throttle: crate::auth::Throttle::default(),
            generation: ArcSwap::from_pointee(generation),
            content: Content::new(store.clone(), metrics.clone()),
            store,
            verifier: Verifier::new(metrics.clone()),
            audit,
            approved: Approved::default(),
            metrics,
            bases: Arc::new(Refresher::default()),
        });
        // Outside a runtime (benchmarks, unit tests) nothing runs in the
        // background; the server always has one.
        if refresh && tokio::runtime::Handle::try_current().is_ok() {
            Refresher::spawn(&app);
            App::spawn_import_watch(&app);
        }
        Ok(app)
    }

    /// Applies what `pullgate import` commits to the store while the server
    /// runs, within a second (the import waits for it).
    fn spawn_import_watch(app: &Arc<App>) {
        let weak = Arc::downgrade(app);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IMPORT_WATCH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(app) = weak.upgrade() else { return };
                match app.store.apply_imports().await {
                    Ok(0) => {}
                    Ok(n) => {
                        app.metrics.imports_applied.inc_by(n as u64);
                        // Blobs are approved again with their manifests.
                        app.approved.clear();
                    }
                    Err(e) => tracing::error!("cannot apply an import to the store: {e}"),
                }
            }
        });
    }

    /// Where a name goes, and the remote its content comes from (for
    /// commands: export reads what the pipeline approved).
    pub fn route_remote(
        &self,
        name: &crate::oci::names::RepoName,
    ) -> Result<(crate::route::Route, Arc<dyn crate::remote::Remote>), String> {
        let gen = self.generation.load();
        let route = gen.router.route(name, None).map_err(|e| e.to_string())?;
        let remote = gen.remotes[route.upstream].clone();
        Ok((route, remote))
    }

    pub fn config(&self) -> Arc<Config> {
        self.generation.load().config.clone()
    }

    /// Swaps in a new config atomically. Listen addresses and the store
    /// location need a restart; a change to them is reported, not applied.
    pub fn reload(&self, config: Config) -> Result<Vec<String>, ClientError> {
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
        if old.server.workers != config.server.workers {
            notes.push("server.workers changed: restart to apply".to_owned());
        }
        for (key, changed) in [
            (
                "max_connections",
                old.server.max_connections != config.server.max_connections,
            ),
            (
                "header_timeout",
                old.server.header_timeout != config.server.header_timeout,
            ),
            (
                "send_timeout",
                old.server.send_timeout != config.server.send_timeout,
            ),
        ] {
            if changed {
                notes.push(format!("server.{key} changed: restart to apply"));
            }
        }
        let bases_changed = old.bases != config.bases
            || old.storage.base_keep != config.storage.base_keep
            || old.storage.base_refresh != config.storage.base_refresh;
        if old.server.tls.is_some() != config.server.tls.is_some() {
            notes.push(
                "server.tls added or removed: restart to apply (a changed certificate applies now)"
                    .to_owned(),
            );
        }
        let generation = Generation::build(config, &self.metrics, &self.instance, &self.offline)?;
        self.generation.store(Arc::new(generation));
        if bases_changed {
            self.bases.wake();
        }
        Ok(notes)
    }

    /// Resolves every base now and publishes the table to the verifier.
    /// Also runs at start-up, every `storage.base_refresh`, and after a
    /// reload that changed `[bases]`.
    pub async fn refresh_bases(self: &Arc<Self>) {
        let gen = self.generation.load_full();
        let sets = &gen.config.bases;
        if sets.is_empty() {
            if !self.verifier.bases().images.is_empty() {
                self.verifier.set_bases(BaseTable::default());
            }
            self.metrics.base_images.set(0);
            return;
        }
        let started = Instant::now();
        let resolver = sources::Resolver {
            app: self,
            gen: &gen,
        };
        let done = self
            .bases
            .run(&*self.store, sets, gen.config.storage.base_keep, &resolver)
            .await;
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
        self.verifier.set_base_failures(done.failures);
        let current = self.verifier.bases();
        if *current != done.table || current.source.is_empty() {
            self.verifier.set_bases(done.table);
            // Blobs approved through the old table are approved again with
            // their manifests.
            self.approved.clear();
        }
    }

    /// Answers one client request. Never fails: errors become spec JSON.
    pub async fn handle<B>(self: Arc<Self>, req: Request<B>, peer: SocketAddr) -> Response<Body> {
        self.serve(req, Client::anonymous(peer), None).await
    }

    /// [`App::handle`] on a connection whose cached blobs can go out beside
    /// hyper (`sendfile`, or a copy to a loopback peer) through `zero_copy`.
    pub async fn serve<B>(
        self: Arc<Self>,
        req: Request<B>,
        client: Client,
        zero_copy: Option<crate::zerocopy::Queue>,
    ) -> Response<Body> {
        let peer = client.addr;
        let started = Instant::now();
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
        let mut tenant = None;
        let (kind, result) = if header_bytes > MAX_HEADER_BYTES {
            let e = Error::HeadersTooLarge {
                bytes: header_bytes,
                limit: MAX_HEADER_BYTES,
            };
            ("other", Err(e))
        } else {
            self.dispatch(&req, &client, zero_copy, &mut tenant)
                .instrument(span.clone())
                .await
        };
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => {
                let e = e.into_api();
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
                e.into_response(req.method() == Method::HEAD)
            }
        };
        resp.headers_mut().insert(
            "Docker-Distribution-API-Version",
            HeaderValue::from_static("registry/2.0"),
        );
        let status = resp.status();
        self.metrics.request(kind, status);
        if let Some(t) = &tenant {
            self.metrics
                .tenant_requests
                .with_label_values(&[t, kind, status.as_str()])
                .inc();
        }
        if kind == "manifest" {
            self.metrics
                .manifest_duration
                .observe(started.elapsed().as_secs_f64());
        }
        if !span.is_disabled() {
            let _enter = span.enter();
            tracing::debug!(
                status = status.as_u16(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "answered"
            );
        }
        resp
    }

    /// Identifies the client, routes the request and runs its step;
    /// `tenant` is set to the client's tenant once known.
    async fn dispatch<B>(
        self: &Arc<Self>,
        req: &Request<B>,
        client: &Client,
        zero_copy: Option<crate::zerocopy::Queue>,
        tenant: &mut Option<Arc<str>>,
    ) -> (&'static str, Result<Response<Body>, Error>) {
        let peer = client.addr;
        let method = req.method();
        let readonly = method == Method::GET || method == Method::HEAD;
        let head = method == Method::HEAD;
        let gen = self.generation.load_full();
        // Boxed: a node mirror identifies nobody, and its requests should
        // not carry the state of a password check in their futures.
        let identity = if gen.gate.required() {
            match Box::pin(self.identify(&gen, req.headers(), client)).await {
                Ok(i) => i,
                Err(e) => return ("other", Err(e)),
            }
        } else {
            crate::auth::Identity::Anonymous
        };
        let hops = match self.hops(req.headers()) {
            Ok(h) => h,
            Err(e) => return ("other", Err(e)),
        };
        let tenant_config = gen.gate.tenant_of(&identity);
        *tenant = tenant_config.map(|t| t.name.clone());
        let (name, target) = match parse_path(req.uri().path()) {
            Ok(PathKind::Repo { name, target }) => (name, target),
            Ok(PathKind::Base) if readonly => return ("base", Ok(version_check(head))),
            Ok(PathKind::Base) => return ("base", Err(Error::ReadOnly)),
            Ok(PathKind::Push) => return ("push", Err(Error::ReadOnly)),
            Err(e) => return ("other", Err(e.into())),
        };
        let kind = target.kind();
        if !readonly {
            return (kind, Err(Error::ReadOnly));
        }
        let query = req.uri().query();
        let mut route = match gen.router.route(&name, query_param(query, "ns")) {
            Ok(r) => r,
            Err(e) => return (kind, Err(e.into())),
        };
        // The name the client asked for, before any rewrite, and before
        // anything else is done for it.
        if gen.gate.has_tenants() {
            let allowed = tenant_config.is_some_and(|t| t.repo_matcher.is_match(&route.canonical));
            if !allowed {
                return (
                    kind,
                    Err(self.not_in_tenant(&identity, tenant_config, &route, kind, peer)),
                );
            }
        }
        if !gen.rewrites.is_empty() {
            if let Some(to) = gen.rewrites.apply(&route.canonical) {
                route = match gen.router.rewritten(route, &to) {
                    Ok(r) => r,
                    Err(e) => return (kind, Err(e.into())),
                };
            }
        }
        let span = tracing::Span::current();
        if !span.is_disabled() {
            span.record("upstream", &*route.upstream_name);
            span.record("repo", route.repo.as_str());
            match &target {
                Target::Manifest(r) => span.record("reference", r.to_string()),
                Target::Blob(d) | Target::Referrers(d) => span.record("reference", d.to_string()),
                Target::TagsList => &span,
            };
        }
        let mut ctx = Ctx::new(gen, route, peer, head);
        if let Some(hops) = hops {
            ctx.remote = Arc::new(crate::remote::Hopped {
                inner: ctx.remote,
                hops,
            });
        }
        ctx.identity = identity;
        ctx.tenant = tenant.clone();
        let result = match target {
            Target::Manifest(reference) => {
                manifests::get(self, &ctx, reference, req.headers()).await
            }
            Target::Blob(digest) => blobs::get(self, &ctx, digest, req.headers(), zero_copy).await,
            Target::TagsList => lists::tags(self, &ctx, query).await,
            Target::Referrers(digest) => lists::referrers(self, &ctx, digest, query).await,
        };
        (kind, result)
    }
}

impl App {
    /// The client's identity, or the 401 it gets (slowed down when its
    /// address keeps failing).
    async fn identify(
        &self,
        gen: &Generation,
        headers: &http::HeaderMap,
        client: &Client,
    ) -> Result<crate::auth::Identity, Error> {
        match gen.gate.identify(headers, client.cert.as_ref()).await {
            Ok(identity) => {
                self.throttle.succeeded(client.addr.ip());
                Ok(identity)
            }
            Err(failure) => {
                self.metrics
                    .auth_failures
                    .with_label_values(&[failure.slug()])
                    .inc();
                if failure != crate::auth::AuthFailure::Missing {
                    let wait = self.throttle.failed(client.addr.ip());
                    tracing::info!(peer = %client.addr, reason = failure.slug(), wait_ms = wait.as_millis() as u64, "authentication failed");
                    tokio::time::sleep(wait).await;
                }
                Err(Error::Unauthenticated {
                    failure,
                    certs: gen.gate.accepts_certs(),
                    users: gen.gate.accepts_users(),
                })
            }
        }
    }

    /// The hops a request came through (its hop header), refused when
    /// this pullgate is among them or there are too many.
    fn hops(&self, headers: &http::HeaderMap) -> Result<Option<String>, Error> {
        if !headers.contains_key(&crate::remote::HOP_HEADER) {
            return Ok(None);
        }
        let mut seen = 0;
        let mut all = Vec::new();
        for v in headers.get_all(&crate::remote::HOP_HEADER) {
            let Ok(v) = v.to_str() else { continue };
            for hop in v.split(',').map(str::trim).filter(|h| !h.is_empty()) {
                seen += 1;
                if hop == &*self.instance {
                    self.metrics.loops_refused.inc();
                    return Err(Error::Loop(format!(
                        "this request came round to this pullgate ({}) again: its upstreams lead back to it (hops: {})",
                        self.instance,
                        v.trim()
                    )));
                }
                all.push(hop);
            }
        }
        if seen >= crate::remote::MAX_HOPS {
            self.metrics.loops_refused.inc();
            return Err(Error::Loop(format!(
                "this request passed {seen} pullgates already (at most {} are allowed): do the upstreams loop?",
                crate::remote::MAX_HOPS
            )));
        }
        Ok((!all.is_empty()).then(|| all.join(", ")))
    }

    /// Records and counts a name outside the client's tenant.
    fn not_in_tenant(
        &self,
        identity: &crate::auth::Identity,
        tenant: Option<&crate::config::TenantConfig>,
        route: &crate::route::Route,
        kind: &str,
        peer: SocketAddr,
    ) -> Error {
        let identity = identity
            .shown()
            .unwrap_or_else(|| "an anonymous client".into());
        let message =
            errors::not_in_tenant_message(&identity, tenant.map(|t| &*t.name), &route.canonical);
        if kind == "manifest" {
            self.metrics
                .blocked_pulls
                .with_label_values(&[
                    &*route.upstream_name,
                    crate::policy::Reason::NotInTenant.slug(),
                    "enforce",
                ])
                .inc();
        }
        let mut r = crate::audit::Record::new(
            peer,
            &route.canonical,
            "",
            None,
            None,
            crate::config::Mode::Enforce,
            &[crate::policy::Reason::NotInTenant],
            message.clone(),
        );
        r.identity = Some(identity);
        r.tenant = tenant.map(|t| t.name.to_string());
        self.audit.record(r);
        tracing::info!(canonical = %route.canonical, "pull denied: not in the client's tenant");
        Error::NotInTenant {
            message,
            tenant: tenant.map(|t| t.name.to_string()),
        }
    }
}

impl crate::verify::bases::Host for App {
    fn refresher(&self) -> &Arc<Refresher> {
        &self.bases
    }

    fn every(&self) -> std::time::Duration {
        self.config().storage.base_refresh
    }

    async fn refresh(self: Arc<Self>) {
        self.refresh_bases().await;
    }
}

/// `GET /v2/`: the API version check.
fn version_check(head: bool) -> Response<Body> {
    let b = if head {
        body::empty()
    } else {
        body::full("{}")
    };
    let mut r = Response::new(b);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(2));
    r
}

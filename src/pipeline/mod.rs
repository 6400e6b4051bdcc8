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
use std::time::Instant;

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
use crate::store::{FsStore, Store};
use crate::verify::bases::{BaseTable, Refresher};
use crate::verify::Verifier;
use approved::Approved;
use context::{Ctx, Generation};
use errors::Error;
use respond::query_param;

/// Largest total of request header bytes accepted.
pub(crate) const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Why the proxy cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the store at {}: {source}", path.display())]
    Store {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
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

    /// Builds the proxy over `store`, whose metrics are `metrics`.
    pub fn with_store(
        config: Config,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<App>, StartError> {
        App::build(config, store, metrics, true)
    }

    /// With `refresh`, base images are resolved in the background (in a
    /// runtime); commands resolve the ones they need themselves.
    fn build(
        config: Config,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        refresh: bool,
    ) -> Result<Arc<App>, StartError> {
        let audit = Audit::new(
            config.audit.path.as_deref(),
            config.audit.approvals,
            metrics.clone(),
        )?;
        let generation = Generation::build(config, &metrics)?;
        let app = Arc::new(App {
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
        }
        Ok(app)
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
        let generation = Generation::build(config, &self.metrics)?;
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
        self.serve(req, peer, None).await
    }

    /// [`App::handle`] on a connection whose cached blobs can go out with
    /// `sendfile` through `zero_copy`.
    pub async fn serve<B>(
        self: Arc<Self>,
        req: Request<B>,
        peer: SocketAddr,
        zero_copy: Option<crate::zerocopy::Queue>,
    ) -> Response<Body> {
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
        let (kind, result) = if header_bytes > MAX_HEADER_BYTES {
            let e = Error::HeadersTooLarge {
                bytes: header_bytes,
                limit: MAX_HEADER_BYTES,
            };
            ("other", Err(e))
        } else {
            self.dispatch(&req, peer, zero_copy)
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

    /// Routes a request and runs its step.
    async fn dispatch<B>(
        self: &Arc<Self>,
        req: &Request<B>,
        peer: SocketAddr,
        zero_copy: Option<crate::zerocopy::Queue>,
    ) -> (&'static str, Result<Response<Body>, Error>) {
        let method = req.method();
        let readonly = method == Method::GET || method == Method::HEAD;
        let head = method == Method::HEAD;
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
        let gen = self.generation.load_full();
        let query = req.uri().query();
        let mut route = match gen.router.route(&name, query_param(query, "ns")) {
            Ok(r) => r,
            Err(e) => return (kind, Err(e.into())),
        };
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
        let ctx = Ctx::new(gen, route, peer, head);
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

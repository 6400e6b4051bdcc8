//! `pullgate verify` and `pullgate pin`: the pipeline's own decision on an
//! image, step by step, without serving it.
//!
//! The command runs the same manifest step as a pull, with a trace. It runs
//! on an [`Overlay`] of the server's store: tags, manifests, local approvals
//! and base history are read from it, everything fetched stays in memory,
//! and nothing in the store changes, so it runs next to a live server. A
//! tag is always asked of the upstream (as after its `tag_ttl`).

use std::sync::Arc;
use std::time::Duration;

use super::context::Ctx;
use super::errors::Error;
use super::manifests;
use super::App;
use crate::config::{Config, TagDrift};
use crate::content::Accept;
use crate::metrics::Metrics;
use crate::oci::names::{Digest, Reference};
use crate::policy::Reason;
use crate::store::{MemoryStore, Overlay};
use crate::trace::Trace;

/// How the evaluation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
}

/// The verdict and what it was about.
#[derive(Debug, Clone)]
pub struct Explained {
    pub outcome: Outcome,
    /// The canonical name asked for.
    pub asked: String,
    /// The canonical name served (differs under a `[[rewrite]]`).
    pub served: String,
    pub reference: Reference,
    /// The manifest a pull gets; `None` when the name alone decided.
    pub digest: Option<Digest>,
    /// Why it is denied (empty when allowed).
    pub reasons: Vec<Reason>,
    /// Each step, in words.
    pub lines: Vec<String>,
}

/// Whether tag pins are honoured: `verify` shows what a pull gets; `pin`
/// asks the upstream what the tag is now, and takes it only if it passes
/// itself (no tag-drift fallback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pins {
    Honour,
    Ignore,
}

impl App {
    /// A pipeline for a command: on the server's store, read only.
    pub fn for_command(mut config: Config, pins: Pins) -> Result<Arc<App>, super::StartError> {
        config.storage.tag_ttl = Duration::ZERO;
        config.audit = Default::default();
        if pins == Pins::Ignore {
            config.pins = Default::default();
            for p in &mut config.policies {
                p.tag_drift = TagDrift::Deny;
            }
        }
        let metrics = Arc::new(Metrics::new());
        let server = crate::store::attach(&config.storage).map_err(super::StartError::Bucket)?;
        let store = Overlay::new(server, MemoryStore::new(None, metrics.clone()));
        let store: Arc<dyn crate::store::Store> = Arc::new(store);
        let app = App::build(config, store.clone(), metrics, false, vec![store])?;
        // A command says when it cannot ask the upstream, rather than
        // answer from what the server last knew.
        app.content.set_stale_if_error(false);
        Ok(app)
    }

    /// A pipeline that decides what an import brings: on the staged
    /// `bundle`, every upstream offline (answering from the bundle, then
    /// from what the `site` holds), no rewrites or pins (the bundle names
    /// the digests), nothing recorded.
    pub fn for_import(
        mut config: Config,
        bundle: Arc<dyn crate::store::Store>,
        site: Arc<dyn crate::store::Store>,
    ) -> Result<Arc<App>, super::StartError> {
        for u in &mut config.upstreams {
            u.url = None;
        }
        config.rewrites.clear();
        config.pins = Default::default();
        config.audit = Default::default();
        let metrics = Arc::new(Metrics::new());
        let app = App::build(config, bundle.clone(), metrics, false, vec![bundle, site])?;
        app.content.set_stale_if_error(false);
        Ok(app)
    }

    /// Evaluates policy for `image` (`NAME[:TAG]` or `NAME@DIGEST`) the way
    /// a pull of it would be. `Err` when no verdict can be reached (the
    /// image, its signatures or its bases cannot be fetched), with the
    /// steps so far.
    pub async fn explain(
        self: &Arc<Self>,
        image: &str,
    ) -> Result<Explained, (String, Vec<String>)> {
        let trace = Arc::new(Trace::new());
        let fail = |why: String, trace: &Trace| Err((why, trace.lines()));
        let (name, reference) = match crate::oci::names::split_image(image) {
            Ok(x) => x,
            Err(e) => return fail(e, &trace),
        };
        let gen = self.generation.load_full();
        let asked = match gen.router.route(&name, None) {
            Ok(r) => r,
            Err(e) => return fail(e.to_string(), &trace),
        };
        trace.line(format!(
            "name: {} (upstream {}, repository {})",
            asked.canonical, asked.upstream_name, asked.repo
        ));
        let asked_name = asked.canonical.clone();
        let route = match gen.rewrites.apply(&asked.canonical) {
            Some(to) => match gen.router.rewritten(asked, &to) {
                Ok(r) => {
                    trace.line(format!(
                        "rewrite: served from {} (upstream {}, repository {})",
                        r.canonical, r.upstream_name, r.repo
                    ));
                    r
                }
                Err(e) => return fail(e.to_string(), &trace),
            },
            None => asked,
        };
        let served_name = route.canonical.clone();
        // The bases a verdict needs, resolved now.
        let policy = gen.policies.matching(&route.canonical);
        if policy.is_some_and(|p| !p.bases.is_empty()) {
            self.refresh_bases().await;
        }
        let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let mut ctx = Ctx::new(gen, route, peer, true);
        ctx.trace = Some(trace.clone());
        let mut explained = Explained {
            outcome: Outcome::Denied,
            asked: asked_name,
            served: served_name,
            reference: reference.clone(),
            digest: None,
            reasons: Vec::new(),
            lines: Vec::new(),
        };
        match manifests::decide_manifest(self, &ctx, &reference, Accept::Any).await {
            Ok(served) => {
                if served
                    .verdict
                    .reasons
                    .contains(&Reason::VerificationUnavailable)
                {
                    let why = served
                        .verdict
                        .detail
                        .as_deref()
                        .unwrap_or("signatures could not be fetched")
                        .to_owned();
                    return fail(why, &trace);
                }
                explained.digest = Some(served.manifest.digest);
                explained.reasons = served.verdict.reasons.clone();
                if served.tag_refused {
                    explained.reasons.push(Reason::TagNotAllowed);
                }
                if explained.reasons.is_empty() {
                    explained.outcome = Outcome::Allowed;
                }
            }
            Err(Error::Denied {
                digest, verdict, ..
            }) => {
                explained.digest = digest;
                explained.reasons = verdict.reasons;
            }
            // The cause itself: a command's user is the operator.
            Err(Error::Content(e)) => return fail(e.to_string(), &trace),
            Err(e) => return fail(e.into_api().message, &trace),
        }
        explained.lines = trace.lines();
        Ok(explained)
    }
}

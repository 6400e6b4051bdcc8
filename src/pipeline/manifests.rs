//! The manifest step: policy on the name, tag rules, pins, the manifest
//! (by tag or digest), the verdict on its content, tag drift, and the
//! answer. Each part is a call into the module that owns it.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Response};

use super::context::Ctx;
use super::errors::Error;
use super::sources::RouteSource;
use super::{decide, respond, App};
use crate::body::Body;
use crate::config::{Mode, PolicyConfig};
use crate::content::{Accept, Lookup};
use crate::oci::names::{Digest, Reference};
use crate::oci::Manifest;
use crate::policy::{tag_step, Policies, Reason, TagStep, Verdict};
use crate::store::TagKey;
use crate::trace_line;
use crate::verify::cosign;
use crate::verify::signatures::Sources;
use crate::verify::Ask;

/// Answers a manifest request.
pub async fn get(
    app: &Arc<App>,
    ctx: &Ctx,
    reference: Reference,
    headers: &HeaderMap,
) -> Result<Response<Body>, Error> {
    let served = decide_manifest(app, ctx, &reference, Accept::Client(headers)).await?;
    if !ctx.head {
        app.metrics
            .served_from_cache(served.manifest.bytes.len() as u64);
    }
    Ok(respond::manifest(
        &served.manifest,
        served.warning,
        ctx.head,
    ))
}

/// What a manifest request is answered with.
pub struct Served {
    pub manifest: Arc<Manifest>,
    pub verdict: Verdict,
    /// `Warning`: audit mode, a tag rule in audit mode, or tag drift.
    pub warning: Option<HeaderValue>,
    /// A tag rule refused the tag (served anyway: audit mode).
    pub tag_refused: bool,
}

/// Every step of a manifest request up to the answer; `Err` for a denial.
pub async fn decide_manifest(
    app: &Arc<App>,
    ctx: &Ctx,
    reference: &Reference,
    accept: Accept<'_>,
) -> Result<Served, Error> {
    let route = &ctx.route;
    let config = &ctx.gen.config;
    // One policy match serves every check of this request.
    let policy = ctx.gen.policies.matching(&route.canonical);
    if ctx.trace.is_some() {
        trace_policy(ctx, policy);
    }
    // A name its policy denies outright costs no upstream work.
    let early = Policies::by_name(policy);
    if early.blocks() {
        trace_line!(ctx.trace(), "verdict: denied ({})", early.reasons[0]);
        decide::apply(app, ctx, &reference.to_string(), &early, None, true)?;
    }
    // Tag rules (require_digest, deny_tags) need no manifest either.
    let mut tag_warning = None;
    let mut tag_refused = false;
    if let (Reference::Tag(tag), Some(policy)) = (reference, policy) {
        let refused = policy.require_digest
            || policy
                .deny_tags
                .as_ref()
                .is_some_and(|g| g.is_match(tag.as_str()));
        if refused && !policy.deny && !respond::is_signature_tag(tag) {
            match policy.mode {
                Mode::Enforce => trace_line!(
                    ctx.trace(),
                    "verdict: denied (tag-not-allowed: pull {} by digest)",
                    route.canonical
                ),
                Mode::Audit => trace_line!(
                    ctx.trace(),
                    "tag rule: tag-not-allowed (pull {} by digest); audit mode, so the pull goes on",
                    route.canonical
                ),
            }
            let verdict = Verdict::of(policy, vec![Reason::TagNotAllowed]);
            tag_refused = true;
            tag_warning = decide::apply(app, ctx, tag.as_str(), &verdict, None, true)?;
        }
    }
    let max = config.server.max_manifest_size;
    // Pins: a pinned tag resolves to its digest with no upstream call; the
    // digest still goes through policy below.
    let pinned = match reference {
        Reference::Tag(tag) if !config.pins.is_empty() => route
            .rewritten_from
            .as_deref()
            .and_then(|asked| config.pins.get(asked, tag.as_str()))
            .or_else(|| config.pins.get(&route.canonical, tag.as_str())),
        _ => None,
    };
    // For a tag: its key and the digest policy last approved for it.
    let mut tag_state = None;
    let fetched = match (reference, pinned) {
        (_, Some(d)) => {
            tracing::debug!(%reference, digest = %d, "pinned tag");
            trace_line!(ctx.trace(), "pin: tag {reference} is pinned to {d}");
            let m = app
                .content
                .manifest(&ctx.remote, &route.repo, d, accept, max, Lookup::Client)
                .await;
            m.map_err(pinned_missing)?
        }
        (Reference::Tag(tag), None) => {
            let key = TagKey {
                upstream: route.upstream_name.clone(),
                repo: route.repo.clone(),
                tag: tag.clone(),
            };
            // An offline upstream's tags change only by import.
            let ttl = if ctx.remote.offline() {
                std::time::Duration::MAX
            } else {
                config.storage.tag_ttl
            };
            let t = app.content.tag(&ctx.remote, &key, accept, max, ttl).await?;
            tag_state = Some((key, t.approved));
            t.manifest
        }
        (Reference::Digest(d), None) => {
            app.content
                .manifest(&ctx.remote, &route.repo, *d, accept, max, Lookup::Client)
                .await?
        }
    };
    let mut m = fetched;
    if let Some(t) = ctx.trace() {
        t.line(format!(
            "manifest: {}{}",
            m.digest,
            match m.index_children() {
                Some(c) => format!(" (an index of {} manifests)", c.len()),
                None => String::new(),
            }
        ));
    }
    // The verify step: the manifest is known, nothing has been sent yet.
    let sig_tag = matches!(reference, Reference::Tag(t) if respond::is_signature_tag(t));
    let mut verdict = verdict(app, ctx, policy, &m, sig_tag, early).await;
    if ctx.trace.is_some() {
        trace_verdict(ctx, policy, &verdict, tag_refused);
    }
    // Tag drift: the tag moved to content policy denies.
    let mut drift_warning = None;
    if let (Some((key, approved)), Some(p)) = (tag_state, policy) {
        if p.checks_content() && !sig_tag {
            match tag_step(p, &verdict, approved, m.digest) {
                TagStep::Nothing => {}
                TagStep::RecordApproved => {
                    Box::pin(app.content.note_approved(&key, m.digest)).await;
                }
                TagStep::KeepApproved(prev) => {
                    trace_line!(
                        ctx.trace(),
                        "tag drift: the tag was last approved at {prev}; pulls get that digest (tag_drift = \"keep-approved\") if it still passes:"
                    );
                    let last = last_approved(app, ctx, p, prev);
                    if let Some((kept, kept_verdict)) = Box::pin(last).await? {
                        trace_line!(
                            ctx.trace(),
                            "verdict: allowed: pulls of the tag are served {prev}, with a tag-drift warning"
                        );
                        drift_warning =
                            Some(decide::drift(app, ctx, p, &key.tag, &m, &verdict, &kept));
                        m = kept;
                        verdict = kept_verdict;
                    }
                }
            }
        }
    }
    let warning = decide::apply(
        app,
        ctx,
        &reference.to_string(),
        &verdict,
        Some(&m.digest),
        true,
    )?;
    if verdict.passes() && policy.is_some_and(|p| p.checks_content()) {
        app.approved.record(&ctx.gen, &ctx.route.canonical, &m);
    }
    Ok(Served {
        manifest: m,
        verdict,
        warning: drift_warning.or(warning).or(tag_warning),
        tag_refused,
    })
}

/// The content verdict of a fetched manifest under its policy.
async fn verdict(
    app: &Arc<App>,
    ctx: &Ctx,
    policy: Option<&PolicyConfig>,
    m: &Manifest,
    sig_tag: bool,
    early: Verdict,
) -> Verdict {
    let Some(policy) = policy.filter(|p| p.checks_content()) else {
        return early;
    };
    // A signature artifact cannot be signed itself; it is served whenever
    // the name is allowed, so clients can verify through us. Only content
    // that cannot run as an image counts as one.
    if sig_tag && cosign::is_signature_artifact(&m.bytes) {
        return early;
    }
    let source = RouteSource::of(app, ctx);
    let ask = Ask {
        generation: ctx.gen.id,
        wanted: &ctx.gen.config.bases,
        policy,
        canonical: &ctx.route.canonical,
        sources: Sources {
            content: &app.content,
            remote: &*ctx.remote,
            repo: &ctx.route.repo,
        },
        bases: &source,
        trace: ctx.trace(),
    };
    let v = app.verifier.verdict(&ask, m).await;
    // (The body is only parsed when the verdict fails.)
    let bundle = !v.passes()
        && cosign::is_bundle_manifest(&m.bytes)
        && cosign::is_signature_artifact(&m.bytes);
    if bundle {
        early
    } else {
        v
    }
}

/// The tag's last approved manifest (`prev`) and its verdict, when it
/// still passes.
async fn last_approved(
    app: &Arc<App>,
    ctx: &Ctx,
    policy: &PolicyConfig,
    prev: Digest,
) -> Result<Option<(Arc<Manifest>, Verdict)>, Error> {
    let Some(kept) = app.content.stored_manifest(&prev).await? else {
        return Ok(None);
    };
    let early = Verdict::of(policy, Vec::new());
    let v = verdict(app, ctx, Some(policy), &kept, false, early).await;
    Ok(v.passes().then_some((kept, v)))
}

/// A pinned digest the upstream does not have: say so.
fn pinned_missing(e: crate::content::ContentError) -> Error {
    Error::Content(match e {
        crate::content::ContentError::ManifestUnknown {
            upstream,
            repo,
            reference,
        } => crate::content::ContentError::ManifestUnknown {
            upstream,
            repo,
            reference: format!(
                "{reference} (the digest the tag is pinned to; check [pins] and pins_file)"
            ),
        },
        e => e,
    })
}

fn denied_word(mode: Mode) -> &'static str {
    match mode {
        Mode::Audit => "would be denied; served with a warning in audit mode",
        Mode::Enforce => "denied",
    }
}

/// The policy step, in words.
fn trace_policy(ctx: &Ctx, policy: Option<&PolicyConfig>) {
    let Some(policy) = policy else {
        trace_line!(
            ctx.trace(),
            "policy: none matches this name; unmatched names are denied (no-policy)"
        );
        return;
    };
    let mut requirements = Vec::new();
    let names: Vec<&str> = policy
        .signed_by
        .iter()
        .map(|k| k.name.as_str())
        .chain(policy.signed_by_identities.iter().map(|i| i.name.as_str()))
        .collect();
    if !names.is_empty() {
        requirements.push(format!("signed_by {names:?}"));
    }
    if !policy.bases.is_empty() {
        requirements.push(format!("bases {:?}", policy.bases));
    }
    if policy.require_digest {
        requirements.push("require_digest".into());
    }
    trace_line!(
        ctx.trace(),
        "policy: {:?} (mode {}, patterns {:?}){}",
        policy.name,
        policy.mode.as_str(),
        policy.patterns,
        if policy.deny {
            ", deny = true".to_owned()
        } else if requirements.is_empty() {
            ", no requirements".to_owned()
        } else {
            format!(", {}", requirements.join(", "))
        }
    );
}

/// The verdict on the content (and the tag rule), in words.
fn trace_verdict(ctx: &Ctx, policy: Option<&PolicyConfig>, verdict: &Verdict, tag_refused: bool) {
    let mut reasons: Vec<&str> = verdict.reasons.iter().map(|r| r.slug()).collect();
    if tag_refused {
        reasons.push(Reason::TagNotAllowed.slug());
    }
    let checks = policy.is_some_and(|p| p.checks_content());
    if reasons.is_empty() {
        let why = if checks {
            ""
        } else {
            " (the policy has no requirements)"
        };
        trace_line!(ctx.trace(), "verdict: allowed{why}");
    } else {
        trace_line!(
            ctx.trace(),
            "verdict: {} ({})",
            denied_word(verdict.mode),
            reasons.join(", ")
        );
    }
}

//! From a verdict to what happens: the audit record, the blocked-pulls
//! metric, and either a `403` ([`Error::Denied`]) or, in audit mode, the
//! `Warning` the content is served with.

use http::HeaderValue;

use super::context::Ctx;
use super::errors::Error;
use super::App;
use crate::audit::Record;
use crate::config::PolicyConfig;
use crate::oci::names::{Digest, Tag};
use crate::oci::Manifest;
use crate::policy::Verdict;

/// Applies a verdict: `Err` with 403 when it blocks, the audit warning (if
/// any) otherwise. Only manifest verdicts are counted as blocked pulls
/// (`count`): a pull starts with its manifest, and its blobs would count it
/// again.
pub fn apply(
    app: &App,
    ctx: &Ctx,
    reference: &str,
    verdict: &Verdict,
    digest: Option<&Digest>,
    count: bool,
) -> Result<Option<HeaderValue>, Error> {
    let route = &ctx.route;
    if verdict.passes() {
        if count {
            app.audit.note_allowed(&route.canonical);
        }
        if count && app.audit.records_approvals() {
            app.audit
                .record(record(ctx, reference, verdict, digest, String::new()));
        }
        return Ok(None);
    }
    let shown = ctx.shown_name();
    let message = verdict.message(&shown, digest);
    app.audit
        .record(record(ctx, reference, verdict, digest, message));
    for reason in verdict.reasons.iter().filter(|_| count) {
        app.metrics
            .blocked_pulls
            .with_label_values(&[&*route.upstream_name, reason.slug(), verdict.mode.as_str()])
            .inc();
    }
    if verdict.blocks() {
        tracing::info!(
            canonical = %route.canonical,
            policy = verdict.policy.as_deref().unwrap_or("-"),
            reasons = ?verdict.reasons,
            "pull denied"
        );
        return Err(Error::Denied {
            verdict: verdict.clone(),
            shown: shown.into_owned(),
            digest: digest.copied(),
        });
    }
    tracing::info!(
        canonical = %route.canonical,
        policy = verdict.policy.as_deref().unwrap_or("-"),
        reasons = ?verdict.reasons,
        "pull would be denied (audit mode): served"
    );
    Ok(HeaderValue::from_str(&verdict.warning(&shown, digest)).ok())
}

fn record(
    ctx: &Ctx,
    reference: &str,
    verdict: &Verdict,
    digest: Option<&Digest>,
    message: String,
) -> Record {
    let mut r = Record::new(
        ctx.peer,
        &ctx.route.canonical,
        reference,
        digest,
        verdict.policy.as_deref(),
        verdict.mode,
        &verdict.reasons,
        message,
    );
    r.rewritten_from = ctx.route.rewritten_from.clone();
    r.detail = verdict.detail.as_deref().map(str::to_owned);
    r.identity = ctx.identity.shown();
    r.tenant = ctx.tenant.as_deref().map(str::to_owned);
    r
}

/// Counts and records a drift kept on the last approved digest; returns
/// the `Warning` for the response.
pub fn drift(
    app: &App,
    ctx: &Ctx,
    policy: &PolicyConfig,
    tag: &Tag,
    moved_to: &Manifest,
    denied: &Verdict,
    kept: &Manifest,
) -> HeaderValue {
    let route = &ctx.route;
    app.metrics
        .tag_drift
        .with_label_values(&[&*route.upstream_name, &policy.name])
        .inc();
    let message = format!(
        "tag {tag} moved to {}, which is denied ({}); serving its last approved digest {}",
        moved_to.digest,
        denied.message(&route.canonical, Some(&moved_to.digest)),
        kept.digest
    );
    tracing::warn!(canonical = %route.canonical, %tag, from = %kept.digest, to = %moved_to.digest, policy = %policy.name, "tag drift: kept the last approved digest");
    let r = record(
        ctx,
        tag.as_str(),
        denied,
        Some(&moved_to.digest),
        message.clone(),
    )
    .kept(kept.digest);
    app.audit.record(r);
    HeaderValue::from_str(&format!(
        "299 - \"pullgate: tag drift: {}\"",
        message.replace('"', "'")
    ))
    .unwrap_or(HeaderValue::from_static("299 - \"pullgate: tag drift\""))
}

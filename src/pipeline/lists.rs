//! Tag lists and referrers: policy on the name, then passed through from
//! the remote (the last tag list served when the remote fails).

use std::sync::Arc;

use http::{header, HeaderValue, Response};

use super::context::Ctx;
use super::errors::Error;
use super::respond::{self, query_param};
use super::{decide, App};
use crate::body::Body;
use crate::oci::names::{Digest, Tag};

pub async fn tags(app: &Arc<App>, ctx: &Ctx, query: Option<&str>) -> Result<Response<Body>, Error> {
    let verdict = ctx.gen.policies.evaluate(&ctx.route.canonical);
    if verdict.blocks() {
        decide::apply(app, ctx, "tags/list", &verdict, None, false)?;
    }
    let mut q = Vec::new();
    if let Some(n) = query_param(query, "n") {
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || n.len() > 9 {
            return Err(Error::BadPageSize(n.chars().take(20).collect()));
        }
        q.push(format!("n={n}"));
    }
    if let Some(last) = query_param(query, "last") {
        if !last.is_empty() {
            last.parse::<Tag>()?;
            q.push(format!("last={last}"));
        }
    }
    let query = (!q.is_empty()).then(|| q.join("&"));
    let (bytes, link) = app
        .content
        .tag_list(&*ctx.remote, &ctx.route.repo, &ctx.route.canonical, query)
        .await?;
    let link = link
        .and_then(|l| {
            let prefix = &ctx.gen.config.upstreams[ctx.route.upstream].prefix;
            respond::rewrite_link_behind(&l, &ctx.route, prefix)
        })
        .and_then(|l| HeaderValue::from_str(&l).ok())
        .map(|l| (header::LINK, l));
    Ok(respond::json("application/json", bytes, link, ctx.head))
}

pub async fn referrers(
    app: &Arc<App>,
    ctx: &Ctx,
    digest: Digest,
    query: Option<&str>,
) -> Result<Response<Body>, Error> {
    let verdict = ctx.gen.policies.evaluate(&ctx.route.canonical);
    if verdict.blocks() {
        decide::apply(
            app,
            ctx,
            &digest.to_string(),
            &verdict,
            Some(&digest),
            false,
        )?;
    }
    let mut forwarded = None;
    if let Some(t) = query_param(query, "artifactType") {
        let ok = t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/.+-_%".contains(&b));
        if !ok || t.len() > 255 {
            return Err(Error::BadArtifactType);
        }
        forwarded = Some(format!("artifactType={t}"));
    }
    let (bytes, filters) = app
        .content
        .referrers(&*ctx.remote, &ctx.route.repo, digest, forwarded)
        .await?;
    let filters = filters.map(|f| (header::HeaderName::from_static("oci-filters-applied"), f));
    Ok(respond::json(
        "application/vnd.oci.image.index.v1+json",
        bytes,
        filters,
        ctx.head,
    ))
}

//! The blob step: policy on the name, the approved-blob gate, then the
//! store (with `Range`, and sent beside hyper on plain HTTP/1.1
//! connections, see `zerocopy`) or the shared fetch every waiting client
//! follows.

use std::sync::Arc;

use http::{header, HeaderMap, Response, StatusCode};
use tokio::sync::watch;

use super::context::Ctx;
use super::errors::Error;
use super::respond::{self, parse_range, RangeSpec};
use super::{decide, App};
use crate::body::{self, Body};
use crate::config::Mode;
use crate::content::fetch::{BlobReader, FlightState, Progress};
use crate::content::BlobAnswer;
use crate::oci::names::Digest;
use crate::policy::{Policies, Reason, Verdict};
use crate::store::{ReadGuard, Source};
use crate::zerocopy;

/// Answers a blob request. `zero_copy` is the connection's queue of file
/// ranges (`zerocopy`), when it has one.
pub async fn get(
    app: &Arc<App>,
    ctx: &Ctx,
    digest: Digest,
    headers: &HeaderMap,
    zero_copy: Option<zerocopy::Queue>,
) -> Result<Response<Body>, Error> {
    let route = &ctx.route;
    let policy = ctx.gen.policies.matching(&route.canonical);
    let verdict = Policies::by_name(policy);
    if verdict.blocks() {
        decide::apply(app, ctx, &digest.to_string(), &verdict, None, false)?;
    }
    // Under a policy with requirements, only blobs of approved manifests of
    // this repository: a denied image's layers cannot be fetched by digest.
    // Clients fetch the manifest first, so this costs them nothing. The
    // size such a manifest gives the blob tells a damaged stored copy (a
    // disk that lied, a truncated file).
    let mut expected = None;
    if let Some(policy) = policy.filter(|p| p.checks_content()) {
        let approved = app.approved.lookup(&digest, &ctx.gen, &route.canonical);
        if approved.is_none() && policy.mode == Mode::Enforce {
            let verdict = Verdict::of(policy, vec![Reason::NotApproved]);
            decide::apply(
                app,
                ctx,
                &digest.to_string(),
                &verdict,
                Some(&digest),
                false,
            )?;
        }
        expected = approved.flatten();
    }
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    if ctx.head {
        if let Some(h) = app.content.open_blob(&digest).await? {
            app.content.blob_hit();
            return Ok(stored(app, digest, h, range, true, None));
        }
        app.content.blob_head_miss();
        let size = app
            .content
            .remote_blob_size(&ctx.remote, &route.repo, digest)
            .await?;
        return Ok(respond::blob(
            StatusCode::OK,
            digest,
            0,
            size.unwrap_or(0),
            size,
            body::empty(),
        ));
    }
    let mut answer = app.content.blob(&ctx.remote, &route.repo, digest).await?;
    let check = match (&answer, expected) {
        (BlobAnswer::Stored(h), Some(want)) => Some((h.size, want)),
        _ => None,
    };
    if let Some((size, want)) = check {
        if app.content.discard_if_damaged(&digest, size, want).await? {
            answer = app.content.blob(&ctx.remote, &route.repo, digest).await?;
        }
    }
    match answer {
        BlobAnswer::Stored(h) => Ok(stored(app, digest, h, range, false, zero_copy)),
        BlobAnswer::Following {
            progress, guard, ..
        } => follow(app, progress, guard, digest, range).await,
    }
}

/// A response from the store.
fn stored(
    app: &App,
    digest: Digest,
    h: crate::store::BlobHandle,
    range: Option<&str>,
    head: bool,
    zero_copy: Option<zerocopy::Queue>,
) -> Response<Body> {
    let size = h.size;
    let (status, start, end) = match parse_range(range, size) {
        RangeSpec::Full => (StatusCode::OK, 0, size),
        RangeSpec::Partial(s, e) => (StatusCode::PARTIAL_CONTENT, s, e),
        RangeSpec::Unsatisfiable => return respond::unsatisfiable(size),
    };
    let metrics = app.metrics.clone();
    let body = match (head, zero_copy, h.source) {
        (true, _, _) => body::empty(),
        (false, Some(queue), Source::File(file)) => {
            zerocopy::body(queue, file, start, end, h.guard, metrics)
        }
        (false, _, source) => BlobReader::stored(source, start, end, h.guard, metrics).into_body(),
    };
    respond::blob(status, digest, start, end, Some(size), body)
}

/// Answers from a running fetch, as bytes arrive.
async fn follow(
    app: &App,
    mut rx: watch::Receiver<Progress>,
    guard: ReadGuard,
    digest: Digest,
    range: Option<&str>,
) -> Result<Response<Body>, Error> {
    let total = loop {
        let p = rx.borrow_and_update().clone();
        match p.state {
            FlightState::Failed(e) => return Err(e.into()),
            FlightState::Connecting => {
                if rx.changed().await.is_err() {
                    if let FlightState::Failed(e) = rx.borrow().state.clone() {
                        return Err(e.into());
                    }
                    return Err(crate::content::ContentError::Internal(
                        "blob fetch ended without an outcome".into(),
                    )
                    .into());
                }
            }
            FlightState::Streaming | FlightState::Committed => break p.total,
        }
    };
    let (status, start, end) = match total {
        Some(size) => match parse_range(range, size) {
            RangeSpec::Full => (StatusCode::OK, 0, Some(size)),
            RangeSpec::Partial(s, e) => (StatusCode::PARTIAL_CONTENT, s, Some(e)),
            RangeSpec::Unsatisfiable => return Ok(respond::unsatisfiable(size)),
        },
        // Without a length, a range cannot be checked up front: send it all.
        None => (StatusCode::OK, 0, None),
    };
    let body = BlobReader::following(rx, start, end, guard, app.metrics.clone()).into_body();
    Ok(respond::blob(
        status,
        digest,
        start,
        end.unwrap_or(0),
        total,
        body,
    ))
}

//! An offline upstream (`offline = true`): a [`Remote`] that answers from
//! stores only, never from a network. On a site behind an air gap its
//! content is what `pullgate import` brought in; while an import is
//! verified, it is the bundle being imported (and what the site already
//! holds).
//!
//! Because it speaks the same pull endpoints as a registry, everything that
//! reads through a remote works unchanged: tags resolve from stored tag
//! records, signatures are found under their `.sig` tag, and sigstore
//! bundles through the referrers fallback tag (`sha256-<hex>`), which also
//! answers the referrers API; a tag list lists the stored tags. What no
//! store holds is a 404.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use super::{BodyError, BodyStream, Endpoint, Remote, RemoteError, Request, Response};
use crate::oci::names::{Digest, Reference, Tag};
use crate::oci::Manifest;
use crate::store::{Source, Store, TagKey};

/// Bytes read from a stored blob per piece of a response body.
const PIECE: usize = 1 << 20;

/// Answers pull requests from `stores`, the first that holds an answer.
pub struct Offline {
    name: Arc<str>,
    stores: Vec<Arc<dyn Store>>,
}

impl Offline {
    pub fn new(name: Arc<str>, stores: Vec<Arc<dyn Store>>) -> Offline {
        Offline { name, stores }
    }

    async fn manifest(&self, d: &Digest) -> Option<Arc<Manifest>> {
        for s in &self.stores {
            if let Some(m) = s.cached_manifest(d) {
                return Some(m);
            }
            match s.manifest(d).await {
                Ok(Some(m)) => return Some(m),
                Ok(None) => {}
                Err(e) => tracing::warn!(digest = %d, "cannot read a stored manifest: {e}"),
            }
        }
        None
    }

    async fn tagged(&self, req: &Request<'_>, tag: &str) -> Option<Arc<Manifest>> {
        let tag: Tag = tag.parse().ok()?;
        let key = TagKey {
            upstream: self.name.clone(),
            repo: req.repo.clone(),
            tag,
        };
        for s in &self.stores {
            let rec = match s.cached_tag(&key) {
                Some(r) => Some(r),
                None => s.tag(&key).await.ok().flatten(),
            };
            if let Some(rec) = rec {
                return self.manifest(&rec.digest).await;
            }
        }
        None
    }

    async fn answer(&self, req: Request<'_>) -> Response {
        let head = req.method == Method::HEAD;
        let manifest = match req.endpoint {
            Endpoint::Manifest(Reference::Digest(d)) => self.manifest(d).await,
            Endpoint::Manifest(Reference::Tag(t)) => self.tagged(&req, t.as_str()).await,
            Endpoint::ManifestTag(t) => self.tagged(&req, t).await,
            // The fallback tag lists the referrers as the API would
            // (without applying filters, which the answer then does not
            // claim to have applied).
            Endpoint::Referrers(d) => {
                self.tagged(&req, &crate::verify::cosign::referrers_tag(d))
                    .await
            }
            Endpoint::Blob(d) => return self.blob(d, head).await,
            Endpoint::TagsList => return self.tag_list(&req).await,
        };
        match manifest {
            Some(m) => {
                let mut headers = HeaderMap::new();
                if let Ok(v) = HeaderValue::from_str(&m.media_type) {
                    headers.insert(http::header::CONTENT_TYPE, v);
                }
                if let Ok(v) = HeaderValue::from_str(&m.digest.to_string()) {
                    headers.insert("Docker-Content-Digest", v);
                }
                let len = m.bytes.len() as u64;
                let body = if head { Bytes::new() } else { m.bytes.clone() };
                respond(StatusCode::OK, headers, Some(len), one(body))
            }
            None => not_found(),
        }
    }

    /// The tags imported for the repository, sorted, paginated with `n`
    /// and `last` as the distribution spec has it.
    async fn tag_list(&self, req: &Request<'_>) -> Response {
        let mut tags: Vec<String> = Vec::new();
        for s in &self.stores {
            match s.list_tags(&self.name, req.repo).await {
                Ok(t) => tags.extend(t.iter().map(|t| t.as_str().to_owned())),
                Err(e) => tracing::warn!(repo = %req.repo, "cannot list stored tags: {e}"),
            }
        }
        tags.sort();
        tags.dedup();
        if tags.is_empty() {
            return not_found();
        }
        let (mut n, mut last) = (None, None);
        for (k, v) in form_urlencoded::parse(req.query.as_deref().unwrap_or("").as_bytes()) {
            match &*k {
                "n" => n = v.parse::<usize>().ok(),
                "last" => last = Some(v.into_owned()),
                _ => {}
            }
        }
        if let Some(last) = &last {
            tags.retain(|t| t > last);
        }
        let mut headers = HeaderMap::new();
        if let Some(n) = n {
            if tags.len() > n {
                tags.truncate(n);
                if let Some(l) = tags.last() {
                    let link = format!("</v2/{}/tags/list?n={n}&last={l}>; rel=\"next\"", req.repo);
                    if let Ok(v) = HeaderValue::from_str(&link) {
                        headers.insert(http::header::LINK, v);
                    }
                }
            }
        }
        let body =
            serde_json::to_vec(&serde_json::json!({"name": req.repo.as_str(), "tags": tags}))
                .unwrap_or_default();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let len = body.len() as u64;
        let body = if req.method == Method::HEAD {
            Bytes::new()
        } else {
            Bytes::from(body)
        };
        respond(StatusCode::OK, headers, Some(len), one(body))
    }

    async fn blob(&self, d: &Digest, head: bool) -> Response {
        for s in &self.stores {
            let h = match s.open(d).await {
                Ok(Some(h)) => h,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(digest = %d, "cannot read a stored blob: {e}");
                    continue;
                }
            };
            let size = h.size;
            if head {
                return respond(
                    StatusCode::OK,
                    HeaderMap::new(),
                    Some(size),
                    one(Bytes::new()),
                );
            }
            let body: BodyStream = match h.source.clone() {
                Source::Memory(c) => {
                    let c = c.clone();
                    Box::pin(futures_util::stream::unfold(0u64, move |at| {
                        let piece = c.slice(at, PIECE);
                        async move {
                            (!piece.is_empty())
                                .then(|| (Ok(piece.clone()), at + piece.len() as u64))
                        }
                    }))
                }
                Source::File(f) => {
                    // The handle keeps the blob from eviction while it is read.
                    let guard = Arc::new(h.guard);
                    Box::pin(futures_util::stream::unfold(0u64, move |at| {
                        let (f, guard) = (f.clone(), guard.clone());
                        async move {
                            if at >= size {
                                return None;
                            }
                            let len = usize::try_from((size - at).min(PIECE as u64)).ok()?;
                            let read = tokio::task::spawn_blocking(move || {
                                let _pinned = guard;
                                let mut buf = vec![0; len];
                                std::os::unix::fs::FileExt::read_exact_at(&*f, &mut buf, at)
                                    .map(|()| Bytes::from(buf))
                            })
                            .await;
                            match read {
                                Ok(Ok(b)) => Some((Ok(b), at + len as u64)),
                                Ok(Err(e)) => Some((Err(BodyError::Broken(e.to_string())), size)),
                                Err(e) => Some((Err(BodyError::Broken(e.to_string())), size)),
                            }
                        }
                    }))
                }
            };
            return respond(StatusCode::OK, HeaderMap::new(), Some(size), body);
        }
        not_found()
    }
}

fn one(b: Bytes) -> BodyStream {
    Box::pin(futures_util::stream::iter((!b.is_empty()).then_some(Ok(b))))
}

fn respond(
    status: StatusCode,
    headers: HeaderMap,
    content_length: Option<u64>,
    body: BodyStream,
) -> Response {
    Response {
        status,
        headers,
        content_length,
        body,
    }
}

fn not_found() -> Response {
    respond(
        StatusCode::NOT_FOUND,
        HeaderMap::new(),
        Some(0),
        one(Bytes::new()),
    )
}

impl Remote for Offline {
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn offline(&self) -> bool {
        true
    }

    fn send<'a>(&'a self, req: Request<'a>) -> BoxFuture<'a, Result<Response, RemoteError>> {
        async move { Ok(self.answer(req).await) }.boxed()
    }
}

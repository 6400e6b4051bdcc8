//! Where content comes from when the store does not have it: a [`Remote`].
//!
//! A remote is an upstream registry ([`registry::UpstreamClient`]: HTTP,
//! token auth, redirects, a path prefix for a gateway in front), or an
//! offline upstream ([`offline::Offline`]: nothing but what was imported). A
//! remote only speaks the registry API's pull endpoints and hands back what
//! it was told; deciding what an answer means (a missing tag, a wrong
//! digest, stale-if-error) is the content layer's job. Depends on `oci`,
//! `config`, `metrics`.

pub mod offline;
pub mod registry;

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use crate::oci::names::{Digest, Reference, RepoName};

pub use registry::UpstreamClient;

/// A pull endpoint of one repository.
#[derive(Debug, Clone, Copy)]
pub enum Endpoint<'a> {
    Manifest(&'a Reference),
    /// A manifest by a tag name that is not a client's tag (signature tags).
    ManifestTag(&'a str),
    Blob(&'a Digest),
    TagsList,
    Referrers(&'a Digest),
}

impl std::fmt::Display for Endpoint<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Manifest(r) => write!(f, "manifests/{r}"),
            Endpoint::ManifestTag(t) => write!(f, "manifests/{t}"),
            Endpoint::Blob(d) => write!(f, "blobs/{d}"),
            Endpoint::TagsList => f.write_str("tags/list"),
            Endpoint::Referrers(d) => write!(f, "referrers/{d}"),
        }
    }
}

/// The header in which each pullgate names itself to its upstream, after
/// the names its own client's request came with: `node-a1b2, gw-c3d4`.
pub static HOP_HEADER: http::HeaderName = http::HeaderName::from_static("pullgate-hop");

/// Most pullgates a request may have passed through.
pub const MAX_HOPS: usize = 8;

/// A name for this pullgate in hop headers: random, so that two
/// processes (or two in one test) never share one.
pub fn new_instance_id() -> Arc<str> {
    let mut b = [0u8; 6];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    format!("pullgate-{}", hex::encode(b)).into()
}

/// One request to a remote.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub method: Method,
    pub repo: &'a RepoName,
    pub endpoint: Endpoint<'a>,
    pub accept: Option<HeaderValue>,
    /// A query string the caller built from validated parts.
    pub query: Option<String>,
    /// The hops the client's request came through (its hop header).
    pub hops: Option<&'a str>,
}

impl<'a> Request<'a> {
    pub fn get(repo: &'a RepoName, endpoint: Endpoint<'a>) -> Request<'a> {
        Request {
            method: Method::GET,
            repo,
            endpoint,
            accept: None,
            query: None,
            hops: None,
        }
    }

    pub fn head(repo: &'a RepoName, endpoint: Endpoint<'a>) -> Request<'a> {
        Request {
            method: Method::HEAD,
            ..Request::get(repo, endpoint)
        }
    }

    pub fn accept(mut self, accept: HeaderValue) -> Request<'a> {
        self.accept = Some(accept);
        self
    }

    pub fn query(mut self, query: Option<String>) -> Request<'a> {
        self.query = query;
        self
    }
}

/// A body arriving from a remote; each piece within the remote's idle
/// timeout, or an error.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, BodyError>> + Send>>;

/// What a remote answered.
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub content_length: Option<u64>,
    pub body: BodyStream,
}

/// Why a remote gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteError {
    #[error("upstream {upstream} is unreachable: {message}")]
    Unreachable { upstream: String, message: String },
    #[error("upstream {upstream} did not answer within {secs}s")]
    Timeout { upstream: String, secs: u64 },
    #[error("upstream {upstream}: {message}")]
    Auth { upstream: String, message: String },
    #[error("upstream {upstream} redirected more than {max} times")]
    TooManyRedirects { upstream: String, max: usize },
}

/// Why a body did not arrive whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Nothing arrived for the idle timeout.
    #[error("stalled")]
    Stalled,
    /// The connection broke.
    #[error("{0}")]
    Broken(String),
    /// More than the limit.
    #[error("over the limit")]
    TooLarge,
}

/// A remote reached for a request that came through other pullgates:
/// their hops go upstream ahead of this one's, so a loop of chained
/// pullgates is seen by the first of them when the request comes round.
pub struct Hopped {
    pub inner: Arc<dyn Remote>,
    pub hops: String,
}

impl Remote for Hopped {
    fn name(&self) -> &Arc<str> {
        self.inner.name()
    }

    fn offline(&self) -> bool {
        self.inner.offline()
    }

    fn send<'a>(&'a self, mut req: Request<'a>) -> BoxFuture<'a, Result<Response, RemoteError>> {
        req.hops = Some(&self.hops);
        self.inner.send(req)
    }
}

/// A source of registry content.
pub trait Remote: Send + Sync {
    /// The upstream's configured name (`docker.io`).
    fn name(&self) -> &Arc<str>;
    /// Answers only from stores (an offline upstream): a 404 means the
    /// content was never imported.
    fn offline(&self) -> bool {
        false
    }
    /// Sends one request. Any status comes back as a response; `Err` only
    /// when there was no usable answer.
    fn send<'a>(&'a self, req: Request<'a>) -> BoxFuture<'a, Result<Response, RemoteError>>;
}

impl Response {
    /// Reads the body whole, refusing more than `max` bytes.
    pub async fn bytes(mut self, max: u64) -> Result<Bytes, BodyError> {
        if self.content_length.is_some_and(|l| l > max) {
            return Err(BodyError::TooLarge);
        }
        let mut buf = Vec::new();
        while let Some(chunk) = self.body.next().await {
            let chunk = chunk?;
            if (buf.len() + chunk.len()) as u64 > max {
                return Err(BodyError::TooLarge);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(buf))
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

//! A [`Remote`] that is an upstream registry: requests, token auth,
//! redirects.
//!
//! One [`UpstreamClient`] per configured upstream. It speaks the Docker token
//! flow (`WWW-Authenticate: Bearer realm,service,scope`, tokens cached per
//! scope until they expire and refreshed on 401) and Basic auth, follows
//! redirects itself so that credentials never leave the upstream's origin,
//! and sends credentials to a token realm only on the same registrable
//! domain. Proxies come from `HTTPS_PROXY` / `NO_PROXY`. Every body piece
//! must arrive within the upstream's `idle_timeout`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use reqwest::Url;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};

use super::{BodyError, Remote, RemoteError as UpstreamError, Request, Response};
use crate::config::{Credentials, UpstreamConfig};
use crate::metrics::Metrics;
use crate::oci::names::RepoName;

const MAX_REDIRECTS: usize = 5;

/// How long a token is used when the realm does not say.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

#[derive(Clone)]
struct Token {
    value: String,
    expires: Instant,
}

/// A client for one upstream registry.
pub struct UpstreamClient {
    pub name: Arc<str>,
    base: Url,
    credentials: Option<Credentials>,
    http: reqwest::Client,
    /// Bearer tokens by scope.
    tokens: Mutex<HashMap<String, Token>>,
    /// The last challenge seen, so new scopes get a token before the first try.
    challenge: Mutex<Option<Challenge>>,
    pub idle_timeout: Duration,
    metrics: Arc<Metrics>,
    /// The repository path the upstream serves under (`docker.io` for a
    /// gateway pullgate's `/v2/docker.io/...`); empty for a registry.
    prefix: String,
    /// What this pullgate calls itself in the hop header.
    instance: Arc<str>,
}

/// What to send along with a request.
#[derive(Default, Clone)]
struct RequestOptions {
    accept: Option<HeaderValue>,
    query: Option<String>,
    /// The hop header: the hops the client's request came through, and
    /// this pullgate.
    hops: Option<HeaderValue>,
}

/// Why a client for an upstream cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("upstream {upstream}: bad CA bundle: {message}")]
    BadCa { upstream: String, message: String },
    #[error("upstream {upstream}: cannot build HTTP client: {message}")]
    Build { upstream: String, message: String },
}

impl UpstreamClient {
    pub fn new(
        cfg: &UpstreamConfig,
        metrics: Arc<Metrics>,
        instance: Arc<str>,
    ) -> Result<UpstreamClient, ClientError> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("pullgate/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &cfg.ca_pem {
            let certs =
                reqwest::Certificate::from_pem_bundle(pem).map_err(|e| ClientError::BadCa {
                    upstream: cfg.name.clone(),
                    message: e.to_string(),
                })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let Some(pem) = &cfg.client_identity {
            let identity = reqwest::Identity::from_pem(pem).map_err(|e| ClientError::Build {
                upstream: cfg.name.clone(),
                message: format!("client_cert/client_key: {}", error_chain(&e)),
            })?;
            builder = builder.identity(identity);
        }
        let http = builder.build().map_err(|e| ClientError::Build {
            upstream: cfg.name.clone(),
            message: error_chain(&e),
        })?;
        Ok(UpstreamClient {
            name: Arc::from(cfg.name.as_str()),
            base: cfg.url.clone().ok_or_else(|| ClientError::Build {
                upstream: cfg.name.clone(),
                message: "an offline upstream has no url to dial".to_owned(),
            })?,
            credentials: cfg.credentials.clone(),
            http,
            tokens: Mutex::new(HashMap::new()),
            challenge: Mutex::new(None),
            idle_timeout: cfg.idle_timeout,
            metrics,
            prefix: cfg.prefix.clone(),
            instance,
        })
    }

    /// Sends `method /v2/<repo>/<path>` with auth and redirect handling.
    /// Any status comes back as a response, except a 401 that survives one
    /// round of authentication with configured credentials, which is an
    /// [`UpstreamError::Auth`].
    async fn send_raw(
        &self,
        method: Method,
        repo: &RepoName,
        path: &str,
        opts: &RequestOptions,
    ) -> Result<reqwest::Response, UpstreamError> {
        // Behind a prefix, the repository is the prefix's: in the path
        // and in the token scope alike.
        let there = if self.prefix.is_empty() {
            repo.to_string()
        } else {
            format!("{}/{repo}", self.prefix)
        };
        let mut url = self
            .base
            .join(&format!("/v2/{there}/{path}"))
            .map_err(|e| self.unreachable(e.to_string()))?;
        if let Some(q) = &opts.query {
            url.set_query(Some(q));
        }
        let scope = format!("repository:{there}:pull");
        let mut auth = self.auth_for(&scope).await?;
        let mut retried = false;
        loop {
            let resp = self
                .send_following(&method, url.clone(), opts, auth.as_ref())
                .await?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            if retried && self.credentials.is_none() {
                // Anonymous and still refused: to clients this is a
                // repository that does not exist (Docker Hub answers so).
                return Ok(resp);
            }
            if retried {
                return Err(UpstreamError::Auth {
                    upstream: self.name.to_string(),
                    message: format!(
                        "401 Unauthorized for {repo} with the configured credentials (check username and password)"
                    ),
                });
            }
            retried = true;
            let challenge = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_challenge);
            let Some(challenge) = challenge else {
                return Err(UpstreamError::Auth {
                    upstream: self.name.to_string(),
                    message: "401 Unauthorized without a usable WWW-Authenticate challenge".into(),
                });
            };
            *lock(&self.challenge) = Some(challenge.clone());
            lock(&self.tokens).remove(&scope);
            auth = self.authorize(&challenge, &scope).await?;
        }
    }

    /// The Authorization header for a scope, from cache or a known challenge.
    async fn auth_for(&self, scope: &str) -> Result<Option<HeaderValue>, UpstreamError> {
        let cached = lock(&self.tokens)
            .get(scope)
            .filter(|t| t.expires > Instant::now())
            .map(|t| t.value.clone());
        if let Some(token) = cached {
            return Ok(Some(bearer(&token)));
        }
        let known = lock(&self.challenge).clone();
        match known {
            Some(c) => self.authorize(&c, scope).await,
            None => Ok(None),
        }
    }

    async fn authorize(
        &self,
        challenge: &Challenge,
        scope: &str,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        match challenge {
            Challenge::Basic => match &self.credentials {
                Some(c) => Ok(Some(basic(c))),
                None => Err(UpstreamError::Auth {
                    upstream: self.name.to_string(),
                    message: "asks for Basic credentials and none are configured (username, password_file)".into(),
                }),
            },
            Challenge::Bearer { realm, service, .. } => {
                let token = self.fetch_token(realm, service.as_deref(), scope).await?;
                Ok(Some(bearer(&token)))
            }
        }
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String, UpstreamError> {
        let auth_err = |message: String| UpstreamError::Auth {
            upstream: self.name.to_string(),
            message,
        };
        let mut url = Url::parse(realm)
            .map_err(|e| auth_err(format!("token realm {realm:?} is not a URL: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let mut req = self.http.get(url.clone());
        if let Some(c) = &self.credentials {
            if realm_may_get_credentials(&self.base, &url) {
                req = req.basic_auth(&c.username, Some(&c.password));
            } else {
                tracing::warn!(
                    upstream = %self.name,
                    realm = %url.host_str().unwrap_or(""),
                    "token realm is on another domain: asking for an anonymous token, credentials withheld"
                );
            }
        }
        let started = Instant::now();
        let resp = tokio::time::timeout(self.idle_timeout, req.send())
            .await
            .map_err(|_| self.timeout())?
            .map_err(|e| self.unreachable(format!("token realm: {e}")))?;
        self.observe(resp.status().as_str(), started);
        if !resp.status().is_success() {
            return Err(auth_err(format!(
                "token realm answered {} for scope {scope}",
                resp.status()
            )));
        }
        let body = tokio::time::timeout(self.idle_timeout, capped_body(resp, MAX_TOKEN_BODY))
            .await
            .map_err(|_| self.timeout())?
            .map_err(|e| self.unreachable(format!("token realm: {e}")))?;
        let (value, lifetime) = parse_token(&body).map_err(auth_err)?;
        // Renew a little early so a token does not expire mid-request.
        let margin = (lifetime / 10).min(Duration::from_secs(30));
        let expires = Instant::now() + (lifetime - margin);
        lock(&self.tokens).insert(
            scope.to_owned(),
            Token {
                value: value.clone(),
                expires,
            },
        );
        Ok(value)
    }

    /// Sends one request, following redirects; `auth` goes only to the
    /// upstream's own origin.
    async fn send_following(
        &self,
        method: &Method,
        mut url: Url,
        opts: &RequestOptions,
        auth: Option<&HeaderValue>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut method = method.clone();
        for _ in 0..=MAX_REDIRECTS {
            let mut headers = HeaderMap::new();
            if let Some(a) = &opts.accept {
                headers.insert(header::ACCEPT, a.clone());
            }
            if same_origin(&self.base, &url) {
                if let Some(a) = auth {
                    headers.insert(header::AUTHORIZATION, a.clone());
                }
                if let Some(h) = &opts.hops {
                    headers.insert(&super::HOP_HEADER, h.clone());
                }
            }
            let started = Instant::now();
            let sent = self
                .http
                .request(method.clone(), url.clone())
                .headers(headers)
                .send();
            let resp = match tokio::time::timeout(self.idle_timeout, sent).await {
                Err(_) => {
                    self.observe("timeout", started);
                    return Err(self.timeout());
                }
                Ok(Err(e)) => {
                    self.observe("error", started);
                    return Err(self.unreachable(error_chain(&e)));
                }
                Ok(Ok(r)) => r,
            };
            self.observe(resp.status().as_str(), started);
            // Docker Hub: `ratelimit-remaining: 76;w=21600`.
            if let Some(left) = resp
                .headers()
                .get("ratelimit-remaining")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').next()?.trim().parse::<i64>().ok())
            {
                self.metrics
                    .upstream_ratelimit_remaining
                    .with_label_values(&[&*self.name])
                    .set(left);
            }
            if !resp.status().is_redirection() {
                return Ok(resp);
            }
            let Some(location) = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
            else {
                return Ok(resp);
            };
            url = url
                .join(location)
                .map_err(|e| self.unreachable(format!("bad redirect location: {e}")))?;
            if resp.status() == StatusCode::SEE_OTHER {
                method = Method::GET;
            }
            tracing::debug!(upstream = %self.name, to = %url.host_str().unwrap_or(""), "following redirect");
        }
        Err(UpstreamError::TooManyRedirects {
            upstream: self.name.to_string(),
            max: MAX_REDIRECTS,
        })
    }

    fn observe(&self, status: &str, started: Instant) {
        self.metrics
            .upstream_requests
            .with_label_values(&[&*self.name, status])
            .inc();
        self.metrics
            .upstream_duration
            .with_label_values(&[&*self.name])
            .observe(started.elapsed().as_secs_f64());
    }

    fn unreachable(&self, message: String) -> UpstreamError {
        UpstreamError::Unreachable {
            upstream: self.name.to_string(),
            message,
        }
    }

    fn timeout(&self) -> UpstreamError {
        UpstreamError::Timeout {
            upstream: self.name.to_string(),
            secs: self.idle_timeout.as_secs(),
        }
    }
}

impl Remote for UpstreamClient {
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn send<'a>(&'a self, req: Request<'a>) -> BoxFuture<'a, Result<Response, UpstreamError>> {
        async move {
            let hops = match req.hops {
                Some(before) => format!("{before}, {}", self.instance),
                None => self.instance.to_string(),
            };
            let opts = RequestOptions {
                accept: req.accept,
                query: req.query,
                hops: HeaderValue::from_str(&hops).ok(),
            };
            let path = req.endpoint.to_string();
            let resp = self.send_raw(req.method, req.repo, &path, &opts).await?;
            let idle = self.idle_timeout;
            let status = resp.status();
            let headers = resp.headers().clone();
            // The header, not reqwest's body length: for a HEAD answer that
            // is 0, and the length announced is what a HEAD asks for.
            let content_length = headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            // Each piece within the idle timeout; a stall ends the body.
            let body =
                futures_util::stream::unfold(Some(resp.bytes_stream()), move |stream| async move {
                    let mut stream = stream?;
                    match tokio::time::timeout(idle, stream.next()).await {
                        Err(_) => Some((Err(BodyError::Stalled), None)),
                        Ok(None) => None,
                        Ok(Some(Ok(b))) => Some((Ok(b), Some(stream))),
                        Ok(Some(Err(e))) => Some((Err(BodyError::Broken(error_chain(&e))), None)),
                    }
                });
            Ok(Response {
                status,
                headers,
                content_length,
                // Fused: a body may be polled once more after its end.
                body: Box::pin(body.fuse()),
            })
        }
        .boxed()
    }
}

fn bearer(token: &str) -> HeaderValue {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid"));
    v.set_sensitive(true);
    v
}

fn basic(c: &Credentials) -> HeaderValue {
    use base64::Engine as _;
    let encode = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut v = HeaderValue::from_str(&format!(
        "Basic {}",
        encode(format!("{}:{}", c.username, c.password).as_bytes())
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("Basic invalid"));
    v.set_sensitive(true);
    v
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let m = inner.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = inner.source();
    }
    s
}

/// Same scheme, host and port.
pub fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// Credentials go to a token realm only on the upstream's own host or, over
/// HTTPS, on the same registrable domain (`auth.docker.io` for
/// `registry-1.docker.io`).
pub fn realm_may_get_credentials(upstream: &Url, realm: &Url) -> bool {
    let (Some(uh), Some(rh)) = (upstream.host_str(), realm.host_str()) else {
        return false;
    };
    if uh == rh {
        return realm.scheme() == "https" || upstream.scheme() == realm.scheme();
    }
    if realm.scheme() != "https" {
        return false;
    }
    match (psl::domain_str(uh), psl::domain_str(rh)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Largest token answer read: tokens are a few KiB.
const MAX_TOKEN_BODY: usize = 64 * 1024;

/// Longest a token is kept, whatever its `expires_in` says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A lock whose holder panicked still guards plain data: take it.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads at most `max` bytes of a body; more is an error.
async fn capped_body(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > max {
            return Err(format!("answer over {max} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A token realm's answer: the token and how long to keep it (its
/// `expires_in`, at most a day; five minutes when it says nothing).
pub fn parse_token(body: &[u8]) -> Result<(String, Duration), String> {
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let t: TokenResponse =
        serde_json::from_slice(body).map_err(|e| format!("token realm sent no JSON token: {e}"))?;
    let value = t
        .token
        .or(t.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| "token realm sent an empty token".to_owned())?;
    let lifetime = t
        .expires_in
        .map(|s| Duration::from_secs(s).min(MAX_TOKEN_LIFETIME))
        .unwrap_or(DEFAULT_TOKEN_LIFETIME);
    Ok((value, lifetime))
}

/// Parses `Bearer realm="...",service="...",scope="..."` or `Basic realm="..."`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    Some(Challenge::Bearer {
        realm: get("realm")?,
        service: get("service"),
        scope: get("scope"),
    })
}

fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_owned();
        rest = rest[eq + 1..].trim_start();
        let value;
        if let Some(stripped) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = stripped.char_indices();
            let mut end = stripped.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            value = v;
            rest = stripped[end.min(stripped.len())..].trim_start();
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_owned();
            rest = &rest[end..];
        }
        rest = rest.trim_start_matches(',').trim_start();
        out.push((key, value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            }
        );
        assert_eq!(
            parse_challenge("Basic realm=\"Registry\""),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge("Bearer service=\"x\""), None);
    }

    #[test]
    fn credentials_stay_on_the_registrable_domain() {
        let hub = Url::parse("https://registry-1.docker.io").unwrap();
        let ok = |r: &str| realm_may_get_credentials(&hub, &Url::parse(r).unwrap());
        assert!(ok("https://auth.docker.io/token"));
        assert!(!ok("https://auth.evil.io/token"));
        assert!(!ok("http://auth.docker.io/token"));
        assert!(!ok("https://docker.io.evil.com/token"));
        let local = Url::parse("http://127.0.0.1:5000").unwrap();
        assert!(realm_may_get_credentials(
            &local,
            &Url::parse("http://127.0.0.1:5001/token").unwrap()
        ));
        assert!(!realm_may_get_credentials(
            &local,
            &Url::parse("https://127.0.0.2/token").unwrap()
        ));
        // Two different hosts under a public suffix are different sites.
        let gh = Url::parse("https://a.github.io").unwrap();
        assert!(!realm_may_get_credentials(
            &gh,
            &Url::parse("https://b.github.io/token").unwrap()
        ));
    }

    #[test]
    fn token_lifetimes_are_bounded_whatever_the_realm_says() {
        let (t, life) =
            parse_token(br#"{"token":"abc","expires_in":18446744073709551615}"#).unwrap();
        assert_eq!((t.as_str(), life), ("abc", MAX_TOKEN_LIFETIME));
        // What the cache then computes cannot overflow.
        let _ = Instant::now() + (life - (life / 10).min(Duration::from_secs(30)));
        let (_, life) = parse_token(br#"{"access_token":"x"}"#).unwrap();
        assert_eq!(life, DEFAULT_TOKEN_LIFETIME);
        assert!(parse_token(br#"{"token":""}"#).is_err());
        assert!(parse_token(b"<html>").is_err());
    }

    #[test]
    fn basic_auth_is_base64() {
        let v = basic(&Credentials {
            username: "Aladdin".into(),
            password: "open sesame".into(),
        });
        assert_eq!(v.to_str().unwrap(), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
    }

    #[test]
    fn origin_check_includes_port_and_scheme() {
        let a = Url::parse("https://r.example").unwrap();
        assert!(same_origin(
            &a,
            &Url::parse("https://r.example:443/v2/x").unwrap()
        ));
        assert!(!same_origin(
            &a,
            &Url::parse("http://r.example/v2/x").unwrap()
        ));
        assert!(!same_origin(
            &a,
            &Url::parse("https://cdn.example/blob").unwrap()
        ));
    }
}

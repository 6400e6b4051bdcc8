//! Test harness: an in-process fake upstream registry that counts requests
//! and injects faults, and pullgate started in-process in front of it.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use pullgate::{App, Config, Shutdown};

type FakeBody = BoxBody<Bytes, std::io::Error>;

pub fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// What the fake does to a request that matches.
#[derive(Clone)]
pub enum FaultKind {
    /// Answer with this status (and `Retry-After` for 429).
    Status(u16),
    /// Send other bytes of the right length.
    WrongBytes,
    /// Announce the full length, send half, then break the connection.
    Truncate,
    /// Send `n` bytes, then wait for a permit before sending the rest.
    GateAfter(usize, Arc<Semaphore>),
    /// Send `n` bytes, then nothing, forever.
    StallAfter(usize),
    /// Redirect (307) to the same path on another server.
    RedirectTo(String),
    /// A body over the manifest size limit.
    Huge(usize),
    /// A 200 whose body is not JSON.
    NotJson,
    /// The body in chunks of `n` bytes, with a pause after each.
    Trickle(usize, Duration),
}

#[derive(Clone)]
pub struct Fault {
    pub method: Option<Method>,
    pub path_contains: String,
    pub kind: FaultKind,
    /// How many more requests it applies to (`None`: all).
    pub times: Option<usize>,
}

#[derive(Clone)]
pub enum Auth {
    /// Docker token flow: realm on this server at /token, Basic creds to get a token.
    Token { user: String, pass: String },
    /// Plain Basic auth on every request.
    Basic { user: String, pass: String },
}

#[derive(Default)]
pub struct FakeState {
    /// (repo, reference) -> (content type, bytes); references are tags and digests.
    pub manifests: Mutex<HashMap<(String, String), (String, Bytes)>>,
    pub blobs: Mutex<HashMap<String, Bytes>>,
    /// "METHOD /path" -> count (query excluded).
    pub hits: Mutex<HashMap<String, usize>>,
    pub faults: Mutex<Vec<Fault>>,
    pub auth: Mutex<Option<Auth>>,
    /// Tokens handed out; bumping `token_epoch` invalidates all older ones.
    pub tokens_issued: AtomicU64,
    pub token_epoch: AtomicU64,
    /// Authorization headers seen, by path.
    pub seen_auth: Mutex<Vec<(String, Option<String>)>>,
    /// The `scope` of every token request.
    pub token_scopes: Mutex<Vec<String>>,
    /// Every query string seen, by path.
    pub seen_query: Mutex<Vec<(String, String)>>,
    pub addr: Mutex<Option<SocketAddr>>,
}

#[derive(Clone)]
pub struct Fake {
    pub addr: SocketAddr,
    pub state: Arc<FakeState>,
}

impl Fake {
    pub async fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(FakeState::default());
        *state.addr.lock().unwrap() = Some(addr);
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(s.handle(req).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Fake { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self, method: &str, path: &str) -> usize {
        *self
            .state
            .hits
            .lock()
            .unwrap()
            .get(&format!("{method} {path}"))
            .unwrap_or(&0)
    }

    pub fn total_hits(&self, path_contains: &str) -> usize {
        self.state
            .hits
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.contains(path_contains))
            .map(|(_, v)| v)
            .sum()
    }

    pub fn fault(
        &self,
        method: Option<Method>,
        path_contains: &str,
        kind: FaultKind,
        times: Option<usize>,
    ) {
        self.state.faults.lock().unwrap().push(Fault {
            method,
            path_contains: path_contains.to_owned(),
            kind,
            times,
        });
    }

    pub fn clear_faults(&self) {
        self.state.faults.lock().unwrap().clear();
    }

    pub fn set_auth(&self, auth: Option<Auth>) {
        *self.state.auth.lock().unwrap() = auth;
    }

    pub fn put_blob(&self, bytes: impl Into<Bytes>) -> String {
        let bytes = bytes.into();
        let d = sha(&bytes);
        self.state.blobs.lock().unwrap().insert(d.clone(), bytes);
        d
    }

    pub fn put_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        ctype: &str,
        bytes: impl Into<Bytes>,
    ) -> String {
        let bytes = bytes.into();
        let d = sha(&bytes);
        let mut m = self.state.manifests.lock().unwrap();
        m.insert(
            (repo.to_owned(), d.clone()),
            (ctype.to_owned(), bytes.clone()),
        );
        if let Some(t) = tag {
            m.insert((repo.to_owned(), t.to_owned()), (ctype.to_owned(), bytes));
        }
        d
    }

    /// Publishes a sigstore `bundle` as a cosign v3 referrer of `image`
    /// (an OCI image manifest) in `repo`, listed by the referrers API
    /// (`api`) or by the `sha256-<hex>` fallback tag.
    pub fn attach_bundle_referrer(&self, repo: &str, image: &str, bundle: Vec<u8>, api: bool) {
        const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
        const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
        let d: pullgate::names::Digest = image.parse().unwrap();
        self.put_blob(Bytes::from(bundle.clone()));
        let (manifest, config) = pullgate::cosign::bundle_manifest(&d, 100, OCI_MANIFEST, &bundle);
        self.put_blob(Bytes::from(config));
        let m = self.put_manifest(repo, None, OCI_MANIFEST, manifest.clone());
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": m, "size": manifest.len(),
                           "artifactType": pullgate::cosign::BUNDLE_MEDIA_TYPE}],
        }))
        .unwrap();
        if api {
            self.state.manifests.lock().unwrap().insert(
                (repo.to_owned(), format!("referrers/{image}")),
                (OCI_INDEX.to_owned(), Bytes::from(index)),
            );
        } else {
            self.put_manifest(
                repo,
                Some(&pullgate::cosign::referrers_tag(&d)),
                OCI_INDEX,
                index,
            );
        }
    }

    /// Pushes an image with the given layers; returns (manifest digest, layer digests).
    pub fn put_image(&self, repo: &str, tag: &str, layers: &[Bytes]) -> (String, Vec<String>) {
        let layer_digests: Vec<String> = layers.iter().map(|l| self.put_blob(l.clone())).collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": layer_digests},
        }))
        .unwrap();
        let config_digest = self.put_blob(config.clone());
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": layers.iter().zip(&layer_digests).map(|(l, d)| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": l.len()
            })).collect::<Vec<_>>(),
        }))
        .unwrap();
        let d = self.put_manifest(
            repo,
            Some(tag),
            "application/vnd.oci.image.manifest.v1+json",
            manifest,
        );
        (d, layer_digests)
    }
}

fn full(status: StatusCode, bytes: impl Into<Bytes>) -> Response<FakeBody> {
    Response::builder()
        .status(status)
        .body(Full::new(bytes.into()).map_err(|n| match n {}).boxed())
        .unwrap()
}

impl FakeState {
    fn take_fault(&self, method: &Method, path: &str) -> Option<FaultKind> {
        let mut faults = self.faults.lock().unwrap();
        let i = faults.iter().position(|f| {
            f.method.as_ref().is_none_or(|m| m == method) && path.contains(&f.path_contains)
        })?;
        let kind = faults[i].kind.clone();
        if let Some(n) = &mut faults[i].times {
            *n -= 1;
            if *n == 0 {
                faults.remove(i);
            }
        }
        Some(kind)
    }

    fn check_auth(&self, req: &Request<Incoming>) -> Option<Response<FakeBody>> {
        let auth = self.auth.lock().unwrap().clone()?;
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let addr = self.addr.lock().unwrap().unwrap();
        match auth {
            Auth::Basic { user, pass } => {
                let want = format!("Basic {}", b64(&format!("{user}:{pass}")));
                if given == want {
                    None
                } else {
                    Some(
                        Response::builder()
                            .status(401)
                            .header(header::WWW_AUTHENTICATE, "Basic realm=\"fake\"")
                            .body(Full::new(Bytes::new()).map_err(|n| match n {}).boxed())
                            .unwrap(),
                    )
                }
            }
            Auth::Token { .. } => {
                let epoch = self.token_epoch.load(Ordering::SeqCst);
                let ok = given
                    .strip_prefix("Bearer tok-")
                    .and_then(|t| t.split_once('-'))
                    .is_some_and(|(e, _)| e == epoch.to_string());
                if ok {
                    None
                } else {
                    Some(
                        Response::builder()
                            .status(401)
                            .header(
                                header::WWW_AUTHENTICATE,
                                format!("Bearer realm=\"http://{addr}/token\",service=\"fake\",scope=\"repository:x:pull\""),
                            )
                            .body(Full::new(Bytes::new()).map_err(|n| match n {}).boxed())
                            .unwrap(),
                    )
                }
            }
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<FakeBody> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        *self
            .hits
            .lock()
            .unwrap()
            .entry(format!("{method} {path}"))
            .or_insert(0) += 1;
        self.seen_auth.lock().unwrap().push((
            path.clone(),
            req.headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        ));
        if let Some(q) = req.uri().query() {
            self.seen_query
                .lock()
                .unwrap()
                .push((path.clone(), q.to_owned()));
        }
        if path == "/token" {
            let Some(Auth::Token { user, pass }) = self.auth.lock().unwrap().clone() else {
                return full(StatusCode::NOT_FOUND, "");
            };
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if given != Some(&format!("Basic {}", b64(&format!("{user}:{pass}")))) {
                return full(StatusCode::UNAUTHORIZED, "bad credentials");
            }
            let scope = req
                .uri()
                .query()
                .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "scope"))
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            self.token_scopes.lock().unwrap().push(scope);
            let n = self.tokens_issued.fetch_add(1, Ordering::SeqCst);
            let epoch = self.token_epoch.load(Ordering::SeqCst);
            return full(
                StatusCode::OK,
                serde_json::to_vec(
                    &serde_json::json!({"token": format!("tok-{epoch}-{n}"), "expires_in": 300}),
                )
                .unwrap(),
            );
        }
        let fault = self.take_fault(&method, &path);
        if let Some(FaultKind::RedirectTo(base)) = &fault {
            return Response::builder()
                .status(307)
                .header(header::LOCATION, format!("{base}{path}"))
                .body(Full::new(Bytes::new()).map_err(|n| match n {}).boxed())
                .unwrap();
        }
        // A redirect target (CDN) serves blobs without auth.
        if !path.starts_with("/cdn") {
            if let Some(r) = self.check_auth(&req) {
                return r;
            }
        }
        if let Some(FaultKind::Status(code)) = fault {
            let mut r = full(
                StatusCode::from_u16(code).unwrap(),
                "{\"errors\":[{\"code\":\"UNKNOWN\",\"message\":\"injected\"}]}",
            );
            if code == 429 {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, "7".parse().unwrap());
            }
            return r;
        }
        let path = path.strip_prefix("/cdn").unwrap_or(&path).to_owned();
        if path == "/v2/" {
            return full(StatusCode::OK, "{}");
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            return full(StatusCode::NOT_FOUND, "");
        };
        let segs: Vec<&str> = rest.split('/').collect();
        let n = segs.len();
        if n < 3 {
            return full(StatusCode::NOT_FOUND, "");
        }
        let repo = segs[..n - 2].join("/");
        let (kind, reference) = (segs[n - 2], segs[n - 1]);
        let found = match kind {
            "manifests" => self
                .manifests
                .lock()
                .unwrap()
                .get(&(repo.clone(), reference.to_owned()))
                .cloned(),
            "referrers" => self
                .manifests
                .lock()
                .unwrap()
                .get(&(repo.clone(), format!("referrers/{reference}")))
                .cloned(),
            "blobs" => self
                .blobs
                .lock()
                .unwrap()
                .get(reference)
                .cloned()
                .map(|b| ("application/octet-stream".to_owned(), b)),
            "tags" if reference == "list" => {
                let tags: Vec<String> = self
                    .manifests
                    .lock()
                    .unwrap()
                    .keys()
                    .filter(|(r, t)| *r == repo && !t.starts_with("sha256:"))
                    .map(|(_, t)| t.clone())
                    .collect();
                let mut r = full(
                    StatusCode::OK,
                    serde_json::to_vec(&serde_json::json!({"name": repo, "tags": tags})).unwrap(),
                );
                r.headers_mut().insert(
                    header::LINK,
                    format!("</v2/{repo}/tags/list?last=zzz&n=1>; rel=\"next\"")
                        .parse()
                        .unwrap(),
                );
                return r;
            }
            _ => None,
        };
        // Like distribution: an OCI manifest only for clients that name its type.
        if kind == "manifests" {
            if let (Some((ctype, _)), Some(accept)) = (&found, req.headers().get(header::ACCEPT)) {
                if !accept.to_str().unwrap_or("").contains(ctype.as_str()) {
                    return full(
                        StatusCode::NOT_FOUND,
                        "{\"errors\":[{\"code\":\"MANIFEST_UNKNOWN\",\"message\":\"accept header does not support this manifest\"}]}",
                    );
                }
            }
        }
        let Some((ctype, bytes)) = found else {
            return full(
                StatusCode::NOT_FOUND,
                "{\"errors\":[{\"code\":\"MANIFEST_UNKNOWN\",\"message\":\"not here\"}]}",
            );
        };
        let digest = sha(&bytes);
        let builder = Response::builder()
            .header(header::CONTENT_TYPE, ctype)
            .header("Docker-Content-Digest", &digest);
        match fault {
            Some(FaultKind::Huge(n)) => {
                return builder
                    .body(
                        Full::new(Bytes::from(vec![b' '; n]))
                            .map_err(|n| match n {})
                            .boxed(),
                    )
                    .unwrap()
            }
            Some(FaultKind::NotJson) => {
                let b = Bytes::from_static(b"<html>not a manifest</html>");
                return Response::builder()
                    .header(header::CONTENT_TYPE, "text/html")
                    .body(Full::new(b).map_err(|n| match n {}).boxed())
                    .unwrap();
            }
            _ => {}
        }
        let builder = builder.header(header::CONTENT_LENGTH, bytes.len());
        if method == Method::HEAD {
            return builder
                .body(Full::new(Bytes::new()).map_err(|n| match n {}).boxed())
                .unwrap();
        }
        match fault {
            Some(FaultKind::WrongBytes) => {
                let mut wrong = bytes.to_vec();
                wrong[0] ^= 0xff;
                builder
                    .body(
                        Full::new(Bytes::from(wrong))
                            .map_err(|n| match n {})
                            .boxed(),
                    )
                    .unwrap()
            }
            Some(FaultKind::Truncate) => {
                let half = bytes.slice(..bytes.len() / 2);
                let stream = futures_util::stream::iter(vec![
                    Ok(Frame::data(half)),
                    Err(std::io::Error::other("injected truncation")),
                ]);
                builder
                    .body(BodyExt::boxed(StreamBody::new(stream)))
                    .unwrap()
            }
            Some(FaultKind::GateAfter(n, gate)) => {
                builder.body(gated(bytes, n, Some(gate))).unwrap()
            }
            Some(FaultKind::StallAfter(n)) => builder.body(gated(bytes, n, None)).unwrap(),
            Some(FaultKind::Trickle(n, pause)) => {
                let stream = futures_util::stream::unfold(bytes, move |mut rest| async move {
                    if rest.is_empty() {
                        return None;
                    }
                    let chunk = rest.split_to(n.min(rest.len()));
                    tokio::time::sleep(pause).await;
                    Some((Ok::<_, std::io::Error>(Frame::data(chunk)), rest))
                });
                builder
                    .body(BodyExt::boxed(StreamBody::new(stream)))
                    .unwrap()
            }
            _ => builder
                .body(Full::new(bytes).map_err(|n| match n {}).boxed())
                .unwrap(),
        }
    }
}

/// Sends the first `n` bytes, then the rest once `gate` gives a permit
/// (never, without a gate).
fn gated(bytes: Bytes, n: usize, gate: Option<Arc<Semaphore>>) -> FakeBody {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    let first = bytes.slice(..n);
    let rest = bytes.slice(n..);
    tokio::spawn(async move {
        let _ = tx.send(Ok(Frame::data(first))).await;
        match gate {
            Some(g) => {
                let _permit = g.acquire().await;
                let _ = tx.send(Ok(Frame::data(rest))).await;
            }
            None => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                drop(tx);
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Which store the pullgate under test keeps its content in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Fs,
    Memory,
}

tokio::task_local! {
    /// The store of the proxies a test starts (the filesystem when unset).
    static STORE: StoreKind;
}

/// Runs a test with its proxies on `kind`.
pub async fn on_store<F: std::future::Future>(kind: StoreKind, test: F) -> F::Output {
    STORE.scope(kind, test).await
}

/// The store of the proxies this test starts.
pub fn store_kind() -> StoreKind {
    current_store()
}

fn current_store() -> StoreKind {
    STORE.try_with(|k| *k).unwrap_or(StoreKind::Fs)
}

/// Memory stores by data directory, so that a restarted proxy finds what
/// the one before it stored.
static MEMORY_STORES: std::sync::LazyLock<
    Mutex<HashMap<std::path::PathBuf, pullgate::store::MemoryStore>>,
> = std::sync::LazyLock::new(Default::default);

/// How to configure the pullgate under test.
#[derive(Clone)]
pub struct Options {
    pub tag_ttl: String,
    pub max_size: Option<String>,
    pub idle_timeout: String,
    /// Extra TOML for the docker.io upstream (credentials...).
    pub upstream_extra: String,
    /// Extra `[[upstream]]` tables.
    pub more_upstreams: String,
    /// `[[policy]]` tables; default allows everything.
    pub policies: String,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            tag_ttl: "5m".into(),
            max_size: None,
            idle_timeout: "5s".into(),
            upstream_extra: String::new(),
            more_upstreams: String::new(),
            policies: "[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n".into(),
        }
    }
}

/// pullgate running in-process on 127.0.0.1:0.
pub struct Proxy {
    pub addr: SocketAddr,
    /// The admin listener (/metrics, /dashboard, /api/...).
    pub admin: SocketAddr,
    pub app: Arc<App>,
    pub dir: Arc<tempfile::TempDir>,
    pub client: reqwest::Client,
    trigger: pullgate::server::ShutdownTrigger,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(fake: &Fake, opts: Options) -> Proxy {
        Proxy::start_in(Arc::new(tempfile::tempdir().unwrap()), fake, opts).await
    }

    /// Starts on an existing data directory (a restart).
    pub async fn start_in(dir: Arc<tempfile::TempDir>, fake: &Fake, opts: Options) -> Proxy {
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
shutdown_timeout = "5s"

[storage]
path = "{path}"
tag_ttl = "{ttl}"
{max}

[[upstream]]
name = "docker.io"
url = "{url}"
default = true
idle_timeout = "{idle}"
{extra}

{more}

{policies}
"#,
            path = dir.path().join("data").display(),
            ttl = opts.tag_ttl,
            max = opts
                .max_size
                .map(|m| format!("max_size = \"{m}\""))
                .unwrap_or_default(),
            url = fake.url(),
            idle = opts.idle_timeout,
            extra = opts.upstream_extra,
            more = opts.more_upstreams,
            policies = opts.policies,
        );
        Proxy::with_config(dir, &text).await
    }

    /// Starts with a whole config text (its `server.listen` is ignored).
    pub async fn with_config(dir: Arc<tempfile::TempDir>, text: &str) -> Proxy {
        let config =
            Config::parse(text, "test config", dir.path()).unwrap_or_else(|e| panic!("{e}"));
        // A stopped proxy's store is released when its last task ends.
        let mut tries = 0;
        let app = loop {
            let started = match current_store() {
                StoreKind::Fs => App::new(config.clone()),
                StoreKind::Memory => {
                    let metrics = Arc::new(pullgate::metrics::Metrics::new());
                    let max = config.storage.max_size;
                    let store = MEMORY_STORES
                        .lock()
                        .unwrap()
                        .entry(dir.path().to_path_buf())
                        .or_insert_with(|| {
                            pullgate::store::MemoryStore::new(max, Arc::new(Default::default()))
                        })
                        .restart(max, metrics.clone());
                    App::with_store(config.clone(), Arc::new(store), metrics)
                }
            };
            match started {
                Ok(app) => break app,
                Err(e) if e.to_string().contains("another pullgate") && tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        let listener = pullgate::server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (trigger, shutdown) = Shutdown::new();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = admin_listener.local_addr().unwrap();
        tokio::spawn(pullgate::serve_admin(
            admin_listener,
            app.clone(),
            shutdown.clone(),
        ));
        let task = tokio::spawn(pullgate::serve(
            listener,
            app.clone(),
            shutdown,
            Duration::from_secs(5),
        ));
        Proxy {
            addr,
            admin,
            app,
            dir,
            client: reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            trigger,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// Stops serving and waits for the listener task.
    pub async fn stop(self) -> Arc<tempfile::TempDir> {
        self.trigger.trigger();
        let _ = self.task.await;
        self.dir
    }

    pub fn metrics(&self) -> String {
        String::from_utf8(self.app.metrics.render()).unwrap()
    }

    /// The value of one metric line (exact label set), or 0 when that
    /// label set has not been counted yet. Panics for a metric pullgate
    /// does not export, so a misspelt name cannot pass as zero.
    pub fn metric(&self, line_prefix: &str) -> f64 {
        let text = self.metrics();
        let family = line_prefix.split(['{', ' ']).next().unwrap_or(line_prefix);
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| family.strip_suffix(s))
            .unwrap_or(family);
        assert!(
            self.app.metrics.names.contains(&family),
            "pullgate exports no metric {family:?}"
        );
        text.lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

/// The JSON error code of a response body.
pub async fn error_code(resp: reqwest::Response) -> (u16, String, serde_json::Value) {
    let status = resp.status().as_u16();
    let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap_or_default())
        .unwrap_or(serde_json::Value::Null);
    (
        status,
        v["errors"][0]["code"].as_str().unwrap_or("").to_owned(),
        v,
    )
}

/// Pseudo-random bytes (deterministic).
pub fn noise(len: usize, seed: u64) -> Bytes {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

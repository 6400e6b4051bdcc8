//! Listeners: the registry API and the admin endpoints, with graceful
//! shutdown.
//!
//! [`serve`] takes an already bound listener, so tests bind `127.0.0.1:0`.
//! On shutdown it stops accepting, lets requests in flight finish for up to
//! the configured grace period, then closes what is left. Connections are
//! wrapped so that cached blobs can be sent with `sendfile` (see
//! `zerocopy`). Depends on `handler`, `zerocopy`, `body`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::{self, Body};
use crate::handler::App;
use crate::zerocopy::{self, Queue};

/// Largest request head (request line and headers) accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A shutdown signal shared by every listener.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// Triggers a [`Shutdown`].
pub struct ShutdownTrigger(watch::Sender<bool>);

impl Shutdown {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger(tx), Shutdown(rx))
    }

    /// Resolves once shutdown was triggered (or its trigger dropped).
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|&stop| stop).await;
    }
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }
}

/// Serves the registry API on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: Shutdown, grace: Duration) {
    let handler = move |mut req: Request<Incoming>, peer: SocketAddr, queue: Queue| {
        let app = app.clone();
        // Cached blobs go out with sendfile through this connection's queue.
        req.extensions_mut().insert(queue);
        async move { Ok::<_, Infallible>(app.handle(req, peer).await) }
    };
    accept_loop(listener, handler, shutdown, grace).await;
}

/// Serves `/healthz`, `/readyz` and `/metrics` until `shutdown`.
pub async fn serve_admin(listener: TcpListener, app: Arc<App>, shutdown: Shutdown) {
    let handler = move |req: Request<Incoming>, _peer: SocketAddr, _queue: Queue| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(admin(&app, req)) }
    };
    accept_loop(listener, handler, shutdown, Duration::from_secs(1)).await;
}

/// The dashboard: one self-contained page reading /api/denials and /api/stats.
const DASHBOARD: &str = include_str!("dashboard.html");

fn json(v: serde_json::Value) -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::CACHE_CONTROL, "no-store")
        .body(body::full(
            serde_json::to_vec(&v).expect("JSON of plain values"),
        ))
        .expect("valid response")
}

fn admin(app: &App, req: Request<Incoming>) -> Response<Body> {
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .header(header::ALLOW, "GET, HEAD")
            .body(body::full("the admin endpoints are read-only\n"))
            .expect("valid response");
    }
    let text = |status: StatusCode, s: String| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(body::full(s))
            .expect("valid response")
    };
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match app.store.probe() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(e) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "store at {} is not writable: {e}\n",
                    app.store.root().display()
                ),
            ),
        },
        "/metrics" => Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(body::full(app.metrics.render()))
            .expect("valid response"),
        "/dashboard" => Response::builder()
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            // Everything the page shows comes from /api/*; nothing else loads.
            .header(
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            )
            .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
            .body(body::full(DASHBOARD))
            .expect("valid response"),
        "/api/denials" => {
            let limit = crate::handler::query_param(req.uri().query(), "limit")
                .and_then(|n| n.parse().ok())
                .unwrap_or(100usize)
                .min(1000);
            json(app.audit.denials(limit))
        }
        "/api/stats" => json(app.audit.stats()),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /metrics, /dashboard, /api/denials or /api/stats\n".into(),
        ),
    }
}

async fn accept_loop<H, F>(listener: TcpListener, handler: H, shutdown: Shutdown, grace: Duration)
where
    H: Fn(Request<Incoming>, SocketAddr, Queue) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let (stream, queue) = zerocopy::Stream::new(stream);
        let handler = handler.clone();
        let service = service_fn(move |req| handler(req, peer, queue.clone()));
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(grace_secs = grace.as_secs(), "closing connections still busy after the grace period");
        }
    }
}

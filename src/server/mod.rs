//! Listeners: the registry API and the admin endpoints, with graceful
//! shutdown.
//!
//! [`serve`] takes an already bound listener, so tests bind `127.0.0.1:0`.
//! On shutdown it stops accepting, lets requests in flight finish for up to
//! the configured grace period, then closes what is left. Connections are
//! wrapped so that cached blobs can be sent with `sendfile` (see
//! `zerocopy`). The admin endpoints are in [`admin`]. Depends on
//! `pipeline`, `zerocopy`, `body`.

mod admin;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::Body;
use crate::pipeline::App;
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
    let handler = move |req: Request<Incoming>, peer: SocketAddr, queue: Queue| {
        let app = app.clone();
        // Cached blobs go out with sendfile through this connection's queue.
        async move { Ok::<_, Infallible>(app.serve(req, peer, Some(queue)).await) }
    };
    accept_loop(listener, handler, shutdown, grace).await;
}

/// Serves `/healthz`, `/readyz` and `/metrics` until `shutdown`.
pub async fn serve_admin(listener: TcpListener, app: Arc<App>, shutdown: Shutdown) {
    let handler = move |req: Request<Incoming>, _peer: SocketAddr, _queue: Queue| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(admin::answer(&app, req).await) }
    };
    accept_loop(listener, handler, shutdown, Duration::from_secs(1)).await;
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

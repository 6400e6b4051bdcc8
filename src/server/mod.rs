//! Listeners: the registry API and the admin endpoints, with graceful
//! shutdown.
//!
//! [`serve`] takes an already bound listener, so tests bind `127.0.0.1:0`.
//! On shutdown it stops accepting, lets requests in flight finish for up to
//! the configured grace period, then closes what is left. Connections are
//! bounded (`server.max_connections`, `header_timeout`, `send_timeout`;
//! see [`conn`]). A plain listener speaks HTTP/1.1, and HTTP/2 to a client
//! that opens with its preface (h2c with prior knowledge); its HTTP/1.1
//! connections send cached blobs beside hyper, with `sendfile` or, to a
//! loopback peer, through a small copy buffer (see `zerocopy`). With
//! `server.tls` every connection is TLS 1.2/1.3 (rustls), HTTP/2 or
//! HTTP/1.1 as ALPN agrees, with the client certificate's names passed on
//! to the pipeline; each handshake uses the TLS setup of the config in
//! force, so a certificate reloaded on SIGHUP serves new connections while
//! open ones go on. A handler that panics is answered 500 and counted;
//! the process and its other connections go on. The admin endpoints are
//! in [`admin`]. Depends on `pipeline`, `tls`, `zerocopy`, `body`,
//! `metrics`.

mod admin;
pub mod conn;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Semaphore};

use crate::body::Body;
use crate::metrics::Metrics;
use crate::oci::ApiError;
use crate::pipeline::{App, Client};
use crate::zerocopy::{self, Queue};

/// The HTTP/2 connection preface, which an h2c client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Streams one HTTP/2 connection may have open at once.
const H2_MAX_STREAMS: u32 = 256;

/// Largest request head (request line and headers) accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Connections the kernel queues before pullgate accepts them. Linux's
/// default of 128 (what `TcpListener::bind` asks for) left connections of
/// a burst waiting for a minute; the kernel caps it at `net.core.somaxconn`.
pub const BACKLOG: u32 = 4096;

/// Connections the admin listener holds at once.
const ADMIN_MAX_CONNECTIONS: usize = 256;

/// Binds a listener with a backlog of [`BACKLOG`].
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// What every connection of a listener is held to.
#[derive(Clone)]
struct Limits {
    slots: Arc<Semaphore>,
    max: usize,
    header_timeout: Duration,
    send_timeout: Duration,
    metrics: Arc<Metrics>,
}

/// Where a connection's TLS setup comes from: the config in force when
/// it connects.
type TlsSource = Arc<dyn Fn() -> Arc<rustls::ServerConfig> + Send + Sync>;

impl Limits {
    fn new(app: &App, max: usize) -> Limits {
        let server = &app.config().server;
        Limits {
            slots: Arc::new(Semaphore::new(max)),
            max,
            header_timeout: server.header_timeout,
            send_timeout: server.send_timeout,
            metrics: app.metrics.clone(),
        }
    }
}

/// An open connection's slot, and its count in `pullgate_connections`.
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.connections.dec();
    }
}

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
/// Its connections are bounded as `[server]` says when it starts.
/// With `server.tls` at start, every connection is TLS.
pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: Shutdown, grace: Duration) {
    let limits = Limits::new(&app, app.config().server.max_connections);
    let tls: Option<TlsSource> = app.config().server.tls.as_ref().map(|first| {
        let first = first.rustls.clone();
        let app = app.clone();
        Arc::new(move || {
            // A reload that dropped server.tls needs a restart: until
            // then the listener stays TLS with the setup it had.
            app.config()
                .server
                .tls
                .as_ref()
                .map_or_else(|| first.clone(), |t| t.rustls.clone())
        }) as TlsSource
    });
    let handler = move |req: Request<Incoming>, client: Client, queue: Option<Queue>| {
        let app = app.clone();
        // Cached blobs go out beside hyper (sendfile, or a copy to a
        // loopback peer) through an HTTP/1.1 connection's queue; HTTP/2
        // frames its bodies itself.
        let queue = queue.filter(|_| req.version() != http::Version::HTTP_2);
        app.serve(req, client, queue)
    };
    accept_loop(listener, handler, limits, tls, shutdown, grace).await;
}

/// Serves `/healthz`, `/readyz` and `/metrics` until `shutdown`.
pub async fn serve_admin(listener: TcpListener, app: Arc<App>, shutdown: Shutdown) {
    let limits = Limits::new(&app, ADMIN_MAX_CONNECTIONS);
    let handler = move |req: Request<Incoming>, _client: Client, _queue: Option<Queue>| {
        let app = app.clone();
        async move { admin::answer(&app, req).await }
    };
    accept_loop(
        listener,
        handler,
        limits,
        None,
        shutdown,
        Duration::from_secs(1),
    )
    .await;
}

/// Runs a handler; a panic in it becomes a 500 (and a count and a log
/// line) instead of a dropped connection.
async fn guarded<F>(handler: F, metrics: Arc<Metrics>) -> Result<Response<Body>, Infallible>
where
    F: Future<Output = Response<Body>>,
{
    match AssertUnwindSafe(handler).catch_unwind().await {
        Ok(r) => Ok(r),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            metrics.panics.inc();
            tracing::error!(panic = %what, "a request handler panicked (a bug in pullgate; please report it); answered 500");
            Ok(ApiError::internal(
                "pullgate hit an internal error (a bug) while answering; its log has the details",
            )
            .into_response(false))
        }
    }
}

async fn accept_loop<H, F>(
    listener: TcpListener,
    handler: H,
    limits: Limits,
    tls: Option<TlsSource>,
    shutdown: Shutdown,
    grace: Duration,
) where
    H: Fn(Request<Incoming>, Client, Option<Queue>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
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
        let Ok(permit) = limits.slots.clone().try_acquire_owned() else {
            limits.metrics.connections_refused.inc();
            tracing::warn!(%peer, max = limits.max, "connection refused: server.max_connections are open");
            tokio::spawn(conn::refuse(stream, limits.max));
            continue;
        };
        limits.metrics.connections.inc();
        let slot = Slot {
            _permit: permit,
            metrics: limits.metrics.clone(),
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let limits = limits.clone();
        let watcher = graceful.watcher();
        let tls = tls.as_ref().map(|source| source());
        tokio::spawn(async move {
            let _slot = slot;
            let client = Client {
                addr: peer,
                cert: None,
            };
            match tls {
                None => {
                    let h2 = match opening(&stream, limits.header_timeout).await {
                        Opening::H2 => true,
                        Opening::Http1 => false,
                        Opening::Closed => return,
                        Opening::Silent => {
                            // hyper's own header timeout, earlier.
                            limits
                                .metrics
                                .connection_timeouts
                                .with_label_values(&["header"])
                                .inc();
                            return;
                        }
                    };
                    let send = zerocopy::Send::for_peer(peer.ip());
                    let (stream, queue) = zerocopy::Stream::new(stream, send);
                    let io =
                        conn::Guarded::new(stream, limits.send_timeout, limits.metrics.clone());
                    connection(io, h2, client, Some(queue), handler, &limits, watcher).await;
                }
                Some(config) => {
                    let accept = tokio_rustls::TlsAcceptor::from(config).accept(stream);
                    let stream = match tokio::time::timeout(limits.header_timeout, accept).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            limits.metrics.tls_handshake_failures.inc();
                            tracing::info!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            limits.metrics.tls_handshake_failures.inc();
                            tracing::info!(%peer, "TLS handshake failed: not done within server.header_timeout");
                            return;
                        }
                    };
                    let (_, session) = stream.get_ref();
                    let h2 = session.alpn_protocol() == Some(b"h2");
                    let cert = session
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|der| match crate::tls::client_cert(der) {
                            Ok(c) => Some(Arc::new(c)),
                            Err(e) => {
                                tracing::warn!(%peer, error = %e, "a verified client certificate could not be read: treated as none");
                                None
                            }
                        });
                    let client = Client { addr: peer, cert };
                    let io =
                        conn::Guarded::new(stream, limits.send_timeout, limits.metrics.clone());
                    connection(io, h2, client, None, handler, &limits, watcher).await;
                }
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

/// How a plain connection opens.
enum Opening {
    /// With the HTTP/2 preface: h2c with prior knowledge.
    H2,
    Http1,
    /// The client closed before sending a byte.
    Closed,
    /// Nothing that decides it arrived within the header timeout.
    Silent,
}

/// Peeks at a plain connection's first bytes, so nothing is consumed. An
/// HTTP/1.1 request differs from the preface within its first two bytes.
async fn opening(stream: &tokio::net::TcpStream, within: Duration) -> Opening {
    let mut buf = [0u8; H2_PREFACE.len()];
    let look = async {
        loop {
            let n = match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return Opening::Closed,
                Ok(n) => n,
            };
            if buf[..n] != H2_PREFACE[..n] {
                return Opening::Http1;
            }
            if n == H2_PREFACE.len() {
                return Opening::H2;
            }
            // A preface split across packets: wait for the rest.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(within, look)
        .await
        .unwrap_or(Opening::Silent)
}

/// Serves one connection (HTTP/2 when `h2`, else HTTP/1.1) until it
/// closes, and counts how it ended.
async fn connection<I, H, F>(
    io: I,
    h2: bool,
    client: Client,
    queue: Option<Queue>,
    handler: H,
    limits: &Limits,
    graceful: hyper_util::server::graceful::Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, Client, Option<Queue>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let metrics = limits.metrics.clone();
    let peer = client.addr;
    let service = service_fn(move |req| {
        guarded(handler(req, client.clone(), queue.clone()), metrics.clone())
    });
    let io = TokioIo::new(io);
    let result = if h2 {
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEAD_BYTES as u32)
            .max_concurrent_streams(H2_MAX_STREAMS)
            .keep_alive_interval(Some(limits.header_timeout))
            .keep_alive_timeout(limits.send_timeout)
            .serve_connection(io, service);
        graceful.watch(conn).await
    } else {
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(MAX_HEAD_BYTES)
            .max_headers(conn::MAX_HEADERS)
            .serve_connection(io, service);
        graceful.watch(conn).await
    };
    if let Err(e) = result {
        let metrics = &limits.metrics;
        if e.is_timeout() {
            metrics
                .connection_timeouts
                .with_label_values(&["header"])
                .inc();
        } else if e.is_parse_too_large() {
            // Answered 431 by hyper (in pullgate's words, see `conn`).
            metrics.request("other", http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        } else if e.is_parse() && !e.is_parse_version_h2() {
            // Answered 400 (414 for a long path).
            metrics.request("other", http::StatusCode::BAD_REQUEST);
        }
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn ask(addr: SocketAddr, path: &str) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn a_panicking_handler_is_answered_500_and_the_server_goes_on() {
        let metrics = Arc::new(Metrics::new());
        let limits = Limits {
            slots: Arc::new(Semaphore::new(8)),
            max: 8,
            header_timeout: Duration::from_secs(5),
            send_timeout: Duration::from_secs(5),
            metrics: metrics.clone(),
        };
        let handler = |req: Request<Incoming>, _: Client, _: Option<Queue>| async move {
            if req.uri().path() == "/panic" {
                panic!("a bug, on purpose");
            }
            Response::new(crate::body::full(b"fine".to_vec()))
        };
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (trigger, shutdown) = Shutdown::new();
        let server = tokio::spawn(accept_loop(
            listener,
            handler,
            limits,
            None,
            shutdown,
            Duration::from_secs(1),
        ));
        for _ in 0..3 {
            let answer = ask(addr, "/panic").await;
            assert!(answer.starts_with("HTTP/1.1 500 "), "{answer}");
            assert!(answer.contains("internal error"), "{answer}");
            assert!(ask(addr, "/").await.ends_with("fine"));
        }
        assert_eq!(metrics.panics.get(), 3);
        trigger.trigger();
        server.await.unwrap();
    }
}

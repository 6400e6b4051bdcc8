//! The admin listener: `/healthz`, `/readyz`, `/metrics`, the blocked-pulls
//! dashboard and its JSON API.

use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::{self, Body};
use crate::pipeline::App;

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

pub async fn answer(app: &App, req: Request<Incoming>) -> Response<Body> {
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
        "/readyz" => match app.store.probe().await {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(e) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("store at {} is not writable: {e}\n", app.store.location()),
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
            let limit = crate::pipeline::respond::query_param(req.uri().query(), "limit")
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

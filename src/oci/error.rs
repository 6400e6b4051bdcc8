//! Errors as clients see them: distribution-spec codes, statuses and JSON.
//!
//! The JSON body is built here and nowhere else; which module error becomes
//! which [`ApiError`] is decided in one place, `pipeline::errors`. Depends
//! on `body`.

use http::{header, HeaderValue, Response, StatusCode};
use serde_json::json;

use crate::body::{self, Body};

/// Where a failure came from, which decides how it is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client asked for something wrong or forbidden: debug log.
    Client,
    /// An upstream failed or misbehaved: warn log.
    Upstream,
    /// pullgate itself failed (disk, bug): error log.
    Internal,
}

/// An error response in the distribution-spec format.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// A distribution-spec error code (`MANIFEST_UNKNOWN`, `DENIED`, ...).
    pub code: &'static str,
    pub message: String,
    pub detail: Option<serde_json::Value>,
    pub origin: Origin,
    /// A header the answer carries: `Retry-After` passed on with a 429,
    /// the `WWW-Authenticate` challenge of a 401.
    pub header: Option<Box<(http::HeaderName, HeaderValue)>>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        let origin = if status.is_server_error() {
            Origin::Internal
        } else {
            Origin::Client
        };
        ApiError {
            status,
            code,
            message: message.into(),
            detail: None,
            origin,
            header: None,
        }
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> ApiError {
        self.detail = Some(detail);
        self
    }

    pub fn from_upstream(mut self) -> ApiError {
        self.origin = Origin::Upstream;
        self
    }

    pub fn name_invalid(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "NAME_INVALID", msg)
    }

    pub fn name_unknown(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "NAME_UNKNOWN", msg)
    }

    pub fn digest_invalid(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", msg)
    }

    pub fn manifest_unknown(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", msg)
    }

    pub fn blob_unknown(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", msg)
    }

    pub fn unsupported(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", msg)
    }

    pub fn denied(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "DENIED", msg)
    }

    /// The upstream could not be reached or failed.
    pub fn unavailable(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", msg).from_upstream()
    }

    /// The upstream answered with something unusable (wrong digest, not JSON...).
    pub fn bad_upstream(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_GATEWAY, "UNKNOWN", msg).from_upstream()
    }

    pub fn internal(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", msg)
    }

    /// The `{"errors":[...]}` body.
    pub fn body_json(&self) -> Vec<u8> {
        let mut e = json!({ "code": self.code, "message": self.message });
        if let Some(d) = &self.detail {
            e["detail"] = d.clone();
        }
        serde_json::to_vec(&json!({ "errors": [e] })).expect("JSON of plain values")
    }

    pub fn into_response(self, head: bool) -> Response<Body> {
        let bytes = self.body_json();
        let mut r = Response::builder()
            .status(self.status)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, bytes.len())
            .header("Docker-Distribution-API-Version", "registry/2.0");
        if let Some(h) = self.header {
            let (name, value) = *h;
            r = r.header(name, value);
        }
        let b = if head {
            body::empty()
        } else {
            body::full(bytes)
        };
        r.body(b).expect("valid response parts")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_distribution_spec_json() {
        let e = ApiError::denied("blocked by policy \"p\": denied by policy")
            .with_detail(json!({"policy": "p", "reasons": ["denied-by-policy"]}));
        let v: serde_json::Value = serde_json::from_slice(&e.body_json()).unwrap();
        assert_eq!(v["errors"][0]["code"], "DENIED");
        assert_eq!(v["errors"][0]["detail"]["reasons"][0], "denied-by-policy");
        assert_eq!(e.into_response(false).status(), StatusCode::FORBIDDEN);
    }
}

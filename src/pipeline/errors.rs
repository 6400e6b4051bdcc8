//! The one place where failures become what clients see: each module's
//! typed error turned into a distribution-spec [`ApiError`] (status, code,
//! message), and how it is logged. pullgate's own failures (the store, a
//! task) reach clients as a plain "internal error"; their details go to the
//! log only.

use http::StatusCode;
use serde_json::json;

use crate::content::{BodyProblem, ContentError};
use crate::oci::error::Origin;
use crate::oci::names::{Digest, NameError};
use crate::oci::ApiError;
use crate::policy::Verdict;
use crate::route::RouteError;

/// Why a request was not answered with content.
#[derive(Debug)]
pub enum Error {
    Route(RouteError),
    Name(NameError),
    Content(ContentError),
    /// Refused by policy: the verdict, the name as shown, and the digest.
    Denied {
        verdict: Verdict,
        shown: String,
        digest: Option<Digest>,
    },
    /// A push, delete or other write.
    ReadOnly,
    HeadersTooLarge {
        bytes: usize,
        limit: usize,
    },
    /// `n` in a tag list query that is not a number.
    BadPageSize(String),
    /// `artifactType` that is not a media type.
    BadArtifactType,
    /// No identity where one is required: 401 with a Basic challenge.
    Unauthenticated {
        failure: crate::auth::AuthFailure,
        certs: bool,
        users: bool,
    },
    /// A name outside the tenant's repositories (or an identity of no
    /// tenant): 403 `not-in-tenant`.
    NotInTenant {
        message: String,
        tenant: Option<String>,
    },
    /// The request came round to this pullgate again, or passed too many.
    Loop(String),
}

impl From<RouteError> for Error {
    fn from(e: RouteError) -> Error {
        Error::Route(e)
    }
}

impl From<NameError> for Error {
    fn from(e: NameError) -> Error {
        Error::Name(e)
    }
}

impl From<ContentError> for Error {
    fn from(e: ContentError) -> Error {
        Error::Content(e)
    }
}

impl Error {
    /// The response a client gets, with how to log it.
    pub fn into_api(self) -> ApiError {
        match self {
            Error::Route(e) => route(e),
            Error::Name(e) => name(e),
            Error::Content(e) => content(e),
            Error::Denied {
                verdict,
                shown,
                digest,
            } => denial(&verdict, &shown, digest.as_ref()),
            Error::ReadOnly => ApiError::unsupported(
                "pullgate is a read-only pull-through proxy: pushes and deletes are not supported",
            ),
            Error::HeadersTooLarge { bytes, limit } => ApiError::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "SIZE_INVALID",
                format!("request headers are {bytes} bytes, over the {limit}-byte limit"),
            ),
            Error::BadPageSize(n) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "PAGINATION_NUMBER_INVALID",
                format!("n={n:?} is not a number"),
            ),
            Error::BadArtifactType => ApiError::new(
                StatusCode::BAD_REQUEST,
                "UNSUPPORTED",
                "artifactType is not a media type",
            ),
            Error::Unauthenticated {
                failure,
                certs,
                users,
            } => {
                let mut e = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    failure.message(certs, users),
                );
                e.header = Some(Box::new((
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Basic realm=\"pullgate\""),
                )));
                e
            }
            Error::NotInTenant { message, tenant } => {
                ApiError::denied(message).with_detail(json!({
                    "reasons": [crate::policy::Reason::NotInTenant.slug()],
                    "tenant": tenant,
                }))
            }
            Error::Loop(message) => {
                ApiError::new(StatusCode::LOOP_DETECTED, "UNSUPPORTED", message)
            }
        }
    }
}

/// What a client outside its tenant is told.
pub fn not_in_tenant_message(identity: &str, tenant: Option<&str>, canonical: &str) -> String {
    let why = match tenant {
        Some(t) => format!(
            "{canonical:?} is not among the repositories of tenant {t:?}, to which {identity} belongs"
        ),
        None => format!("{identity} belongs to no tenant, so it may pull nothing"),
    };
    format!("blocked: {why} [{}]", crate::policy::Reason::NotInTenant)
}

/// The `403 DENIED` answer (see docs/configuration.md).
pub fn denial(verdict: &Verdict, shown: &str, digest: Option<&Digest>) -> ApiError {
    let mut detail = json!({
        "policy": verdict.policy,
        "reasons": verdict.reasons,
    });
    if let Some(d) = digest {
        detail["digest"] = json!(d.to_string());
    }
    ApiError::denied(verdict.message(shown, digest)).with_detail(detail)
}

fn name(e: NameError) -> ApiError {
    match e {
        NameError::BadDigest(_) | NameError::UnsupportedAlgorithm(_) => {
            ApiError::digest_invalid(e.to_string())
        }
        NameError::BadTag(_) => {
            ApiError::new(StatusCode::BAD_REQUEST, "MANIFEST_UNKNOWN", e.to_string())
        }
        _ => ApiError::name_invalid(e.to_string()),
    }
}

fn route(e: RouteError) -> ApiError {
    match e {
        RouteError::Name(e) => name(e),
        RouteError::Host(crate::oci::names::HostError::Name(e)) => name(e),
        RouteError::PercentEncoded => ApiError::name_invalid(e.to_string()),
        RouteError::NotRegistryApi | RouteError::NoEndpoint(_) | RouteError::Host(_) => {
            ApiError::name_unknown(e.to_string())
        }
    }
}

fn content(e: ContentError) -> ApiError {
    let message = e.to_string();
    match e {
        // Answered as the cause is, in words that say why nothing is served.
        ContentError::NotCached { cause, .. } => {
            let mut api = content(*cause);
            api.message = message;
            api
        }
        ContentError::Remote(_) => ApiError::unavailable(message),
        ContentError::Status {
            status,
            retry_after,
            ..
        } => match status {
            StatusCode::TOO_MANY_REQUESTS => {
                let mut e = ApiError::new(status, "TOOMANYREQUESTS", message).from_upstream();
                e.header = retry_after.map(|v| Box::new((http::header::RETRY_AFTER, v)));
                e
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                ApiError::name_unknown(message).from_upstream()
            }
            _ => ApiError::unavailable(message),
        },
        ContentError::ManifestUnknown { .. }
        | ContentError::NeverImported { .. }
        | ContentError::TagGone { .. }
        | ContentError::NoReferrers { .. } => ApiError::manifest_unknown(message),
        ContentError::BlobUnknown { fetched, .. } => {
            let e = ApiError::blob_unknown(message);
            if fetched {
                e.from_upstream()
            } else {
                e
            }
        }
        ContentError::NameUnknown { .. } => ApiError::name_unknown(message),
        ContentError::Body { ref problem, .. } => match problem {
            BodyProblem::Stalled | BodyProblem::Broken { .. } => ApiError::unavailable(message),
            _ => ApiError::bad_upstream(message),
        },
        ContentError::Mismatch { .. } | ContentError::Unusable { .. } => {
            ApiError::bad_upstream(message)
        }
        ContentError::StoreFull(_) => {
            let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", message);
            e.origin = Origin::Internal;
            e
        }
        ContentError::Internal(why) => {
            tracing::error!("internal error: {why}");
            let mut e = ApiError::internal("internal error in pullgate; its log has the details");
            e.origin = Origin::Internal;
            e
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denial_body_names_policy_reasons_and_digest() {
        let c = crate::config::Config::parse(
            "[[upstream]]\nname = \"ghcr.io\"\nurl = \"https://ghcr.io\"\n[[policy]]\nname = \"no\"\nmatch = [\"**\"]\ndeny = true\n",
            "t",
            std::path::Path::new("."),
        )
        .unwrap();
        let p = crate::policy::Policies::new(c.policies);
        let d = Digest::of(b"m");
        let e = denial(&p.evaluate("ghcr.io/a/b"), "ghcr.io/a/b", Some(&d));
        let v: serde_json::Value = serde_json::from_slice(&e.body_json()).unwrap();
        let err = &v["errors"][0];
        assert_eq!(err["code"], "DENIED");
        assert_eq!(err["detail"]["policy"], "no");
        assert_eq!(err["detail"]["reasons"][0], "denied-by-policy");
        assert_eq!(err["detail"]["digest"], d.to_string());
        assert!(err["message"]
            .as_str()
            .unwrap()
            .starts_with("blocked by policy \"no\""));
    }

    #[test]
    fn name_errors_map_to_spec_codes() {
        let e = name("sha256:zz".parse::<Digest>().unwrap_err());
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
        );
        let e = name("A".parse::<crate::oci::RepoName>().unwrap_err());
        assert_eq!(e.code, "NAME_INVALID");
    }

    #[test]
    fn internal_failures_keep_their_details_out_of_responses() {
        let e = content(ContentError::Internal(
            "cannot read blob from /var/lib/pullgate/blobs: EIO".into(),
        ));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.message.contains("/var/lib"), "{}", e.message);
    }
}

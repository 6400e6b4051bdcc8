//! HTTP helpers of the pipeline: queries, ranges, `Link` headers and the
//! shape of blob and manifest responses. No decisions here.

use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};
use crate::oci::names::{Digest, Tag};
use crate::oci::{ApiError, Manifest};
use crate::route::Route;

/// The value of `name` in a raw query string.
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A `Range` request resolved against a blob size.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeSpec {
    Full,
    /// `[start, end)`.
    Partial(u64, u64),
    Unsatisfiable,
}

/// Parses a single `bytes=` range; anything else is ignored (full answer),
/// as HTTP allows.
pub fn parse_range(range: Option<&str>, size: u64) -> RangeSpec {
    let Some(spec) = range.and_then(|r| r.trim().strip_prefix("bytes=")) else {
        return RangeSpec::Full;
    };
    if spec.contains(',') {
        return RangeSpec::Full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeSpec::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| s.parse::<u64>().ok();
    match (a.is_empty(), b.is_empty()) {
        (true, false) => match num(b) {
            Some(0) => RangeSpec::Unsatisfiable,
            Some(_) if size == 0 => RangeSpec::Unsatisfiable,
            Some(n) => RangeSpec::Partial(size.saturating_sub(n), size),
            None => RangeSpec::Full,
        },
        (false, _) => {
            let Some(start) = num(a) else {
                return RangeSpec::Full;
            };
            let end = if b.is_empty() {
                size
            } else {
                match num(b) {
                    Some(e) if e >= start => e.saturating_add(1).min(size),
                    _ => return RangeSpec::Full,
                }
            };
            if start >= size {
                RangeSpec::Unsatisfiable
            } else {
                RangeSpec::Partial(start, end)
            }
        }
        (true, true) => RangeSpec::Full,
    }
}

/// `416` for a range outside a blob of `size` bytes.
pub fn unsatisfiable(size: u64) -> Response<Body> {
    let mut r = ApiError::new(
        StatusCode::RANGE_NOT_SATISFIABLE,
        "SIZE_INVALID",
        format!("requested range is outside the blob's {size} bytes"),
    )
    .into_response(false);
    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
        r.headers_mut().insert(header::CONTENT_RANGE, v);
    }
    r
}

/// A blob response: `[start, end)` of `total` bytes (`None`: not known yet).
pub fn blob(
    status: StatusCode,
    digest: Digest,
    start: u64,
    end: u64,
    total: Option<u64>,
    body: Body,
) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    let digest_text = digest.to_string();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest_text}\"")) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&digest_text) {
        h.insert("Docker-Content-Digest", v);
    }
    if let Some(size) = total {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
        if status == StatusCode::PARTIAL_CONTENT {
            if let Ok(v) =
                HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end.saturating_sub(1)))
            {
                h.insert(header::CONTENT_RANGE, v);
            }
        }
    }
    r
}

/// A manifest response, with the headers prepared when it was parsed.
pub fn manifest(m: &Manifest, warning: Option<HeaderValue>, head: bool) -> Response<Body> {
    let b = if head {
        body::empty()
    } else {
        body::full(m.bytes.clone())
    };
    let mut r = Response::new(b);
    let h = r.headers_mut();
    let [content_type, digest, etag, length] = &m.headers;
    h.insert(header::CONTENT_TYPE, content_type.clone());
    h.insert(header::CONTENT_LENGTH, length.clone());
    h.insert("Docker-Content-Digest", digest.clone());
    h.insert(header::ETAG, etag.clone());
    if let Some(w) = warning {
        h.insert(header::WARNING, w);
    }
    r
}

/// A small JSON document (a tag list, a referrers index).
pub fn json(
    content_type: &'static str,
    bytes: bytes::Bytes,
    extra: Option<(header::HeaderName, HeaderValue)>,
    head: bool,
) -> Response<Body> {
    let len = bytes.len();
    let b = if head {
        body::empty()
    } else {
        body::full(bytes)
    };
    let mut r = Response::new(b);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Some((k, v)) = extra {
        h.insert(k, v);
    }
    r
}

/// Points an upstream `Link: </v2/<repo>/tags/list?...>` at the client's
/// name, routed as the client's request was: its `?ns=` goes back in, and
/// any `ns` the upstream put there is dropped, so that no upstream can send
/// a client's next page to another upstream.
pub fn rewrite_link(link: &str, route: &Route) -> Option<String> {
    rewrite_link_behind(link, route, "")
}

/// [`rewrite_link`] for an upstream that serves the repository under
/// `prefix` (a gateway pullgate, a Harbor proxy project).
pub fn rewrite_link_behind(link: &str, route: &Route, prefix: &str) -> Option<String> {
    let start = link.find('<')? + 1;
    let end = link[start..].find('>')? + start;
    let target = &link[start..end];
    let path_start = target.find("/v2/")?;
    let path = &target[path_start..];
    let upstream_prefix = if prefix.is_empty() {
        format!("/v2/{}/", route.repo)
    } else {
        format!("/v2/{prefix}/{}/", route.repo)
    };
    let rest = path.strip_prefix(&upstream_prefix)?;
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    // The next page of a tag list, and nothing else of the repository.
    if rest != "tags/list" {
        return None;
    }
    // Keys as clients decode them (`%6Es` is `ns` too).
    let is_ns = |p: &str| form_urlencoded::parse(p.as_bytes()).any(|(k, _)| k == "ns");
    let mut params: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !is_ns(p))
        .collect();
    let ns = route.ns.as_ref().map(|ns| format!("ns={ns}"));
    params.extend(ns.as_deref());
    let query = if params.is_empty() {
        String::new()
    } else {
        format!("?{}", params.join("&"))
    };
    Some(format!(
        "</v2/{}/{rest}{query}>{}",
        route.client_name,
        &link[end + 1..]
    ))
}

/// `sha256-<64 hex>.sig` (a legacy cosign signature; `.att` and `.sbom` are
/// cosign's attestations and SBOMs) or `sha256-<64 hex>` (the referrers list
/// of a registry without the referrers API).
pub fn is_signature_tag(tag: &Tag) -> bool {
    let t = tag.as_str();
    let rest = t.strip_prefix("sha256-").unwrap_or("");
    let hex = [".sig", ".att", ".sbom"]
        .iter()
        .find_map(|s| rest.strip_suffix(s))
        .unwrap_or(rest);
    hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Router;

    #[test]
    fn ranges_resolve_against_size() {
        assert_eq!(parse_range(None, 10), RangeSpec::Full);
        assert_eq!(parse_range(Some("bytes=0-4"), 10), RangeSpec::Partial(0, 5));
        assert_eq!(parse_range(Some("bytes=5-"), 10), RangeSpec::Partial(5, 10));
        assert_eq!(parse_range(Some("bytes=-3"), 10), RangeSpec::Partial(7, 10));
        assert_eq!(
            parse_range(Some("bytes=8-100"), 10),
            RangeSpec::Partial(8, 10)
        );
        assert_eq!(parse_range(Some("bytes=10-"), 10), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), RangeSpec::Full);
        assert_eq!(parse_range(Some("bytes=x-1"), 10), RangeSpec::Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), RangeSpec::Full);
        assert_eq!(parse_range(Some("bytes=5-2"), 10), RangeSpec::Full);
    }

    #[test]
    fn query_params_are_found() {
        assert_eq!(
            query_param(Some("ns=docker.io&x=1"), "ns"),
            Some("docker.io")
        );
        assert_eq!(query_param(Some("n=10&last=v1"), "last"), Some("v1"));
        assert_eq!(query_param(Some("flag"), "flag"), Some(""));
        assert_eq!(query_param(None, "ns"), None);
    }

    #[test]
    fn link_headers_point_at_the_client_name() {
        let router = Router::new([("docker.io", true), ("ghcr.io", false)]);
        let route = router
            .route(&"ghcr.io/acme/app".parse().unwrap(), None)
            .unwrap();
        let l = rewrite_link("</v2/acme/app/tags/list?last=v2&n=2>; rel=\"next\"", &route).unwrap();
        assert_eq!(
            l,
            "</v2/ghcr.io/acme/app/tags/list?last=v2&n=2>; rel=\"next\""
        );
        let abs = rewrite_link(
            "<https://ghcr.io/v2/acme/app/tags/list?n=2&last=b>; rel=\"next\"",
            &route,
        )
        .unwrap();
        assert_eq!(
            abs,
            "</v2/ghcr.io/acme/app/tags/list?n=2&last=b>; rel=\"next\""
        );
    }

    #[test]
    fn link_headers_keep_the_clients_ns_and_drop_the_upstreams() {
        let router = Router::new([("docker.io", true), ("ghcr.io", false)]);
        let route = router
            .route(&"acme/app".parse().unwrap(), Some("ghcr.io"))
            .unwrap();
        let l = rewrite_link("</v2/acme/app/tags/list?last=v2&n=2>; rel=\"next\"", &route).unwrap();
        assert_eq!(
            l,
            "</v2/acme/app/tags/list?last=v2&n=2&ns=ghcr.io>; rel=\"next\""
        );
        let hostile = rewrite_link(
            "</v2/acme/app/tags/list?ns=docker.io&%6Es=quay.io&last=v2>; rel=\"next\"",
            &route,
        )
        .unwrap();
        assert_eq!(
            hostile,
            "</v2/acme/app/tags/list?last=v2&ns=ghcr.io>; rel=\"next\""
        );
        assert_eq!(
            rewrite_link("</v2/acme/app/manifests/x?n=1>; rel=\"next\"", &route),
            None,
            "a Link elsewhere is dropped"
        );
        let plain = router.route(&"acme/app".parse().unwrap(), None).unwrap();
        let behind = rewrite_link_behind(
            "</v2/ghcr.io/acme/app/tags/list?n=1&last=a>; rel=\"next\"",
            &route,
            "ghcr.io",
        )
        .unwrap();
        assert!(behind.starts_with("</v2/"), "{behind}");
        assert!(!behind.contains("ghcr.io/ghcr.io"), "{behind}");
        assert!(rewrite_link_behind("</v2/acme/app/tags/list?n=1>", &route, "ghcr.io").is_none());
        let l = rewrite_link("</v2/acme/app/tags/list?ns=ghcr.io>; rel=\"next\"", &plain);
        assert_eq!(l.unwrap(), "</v2/acme/app/tags/list>; rel=\"next\"");
    }
}

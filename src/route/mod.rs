//! Routing: from a request path to an upstream, a repository and a target.
//!
//! Implements the routing contract (docs/configuration.md, "Routing"): `?ns=<host>` first, then a
//! leading path component naming a configured upstream, then the default
//! upstream; Docker Hub's one-component names get `library/`. Everything is
//! validated here, before any other module sees it. Name rewrites and tag
//! pins are in [`rewrite`]. Depends on `oci`, `config`.

pub mod rewrite;

use std::sync::Arc;

use crate::oci::names::{Digest, HostError, Hosts, NameError, Reference, RepoName};

/// Why a request path cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("not a registry API path (expected /v2/...)")]
    NotRegistryApi,
    #[error("no registry endpoint at {0:?}")]
    NoEndpoint(String),
    #[error("percent-encoded characters are not allowed in repository names or references")]
    PercentEncoded,
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Host(#[from] HostError),
}

/// What a `/v2/<name>/...` request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Manifest(Reference),
    Blob(Digest),
    TagsList,
    Referrers(Digest),
}

impl Target {
    /// A bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Manifest(_) => "manifest",
            Target::Blob(_) => "blob",
            Target::TagsList => "tags",
            Target::Referrers(_) => "referrers",
        }
    }
}

/// A parsed request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathKind {
    /// `/v2/`: the API version check.
    Base,
    /// `/v2/<name>/<target>` with the name as the client wrote it.
    Repo { name: RepoName, target: Target },
    /// An upload or other push endpoint.
    Push,
}

/// Parses the path of a `/v2/` request.
pub fn parse_path(path: &str) -> Result<PathKind, RouteError> {
    let Some(rest) = path.strip_prefix("/v2") else {
        return Err(RouteError::NotRegistryApi);
    };
    if rest.is_empty() || rest == "/" {
        return Ok(PathKind::Base);
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return Err(RouteError::NotRegistryApi);
    };
    // `<name>/<kind>/<last>`, split from the right without allocating.
    let mut parts = rest.rsplitn(3, '/');
    let last = parts.next().unwrap_or("");
    let (Some(kind), Some(name_part)) = (parts.next(), parts.next()) else {
        return Err(RouteError::NoEndpoint(shorten(path).to_owned()));
    };
    // Uploads: /v2/<name>/blobs/uploads/ and /v2/<name>/blobs/uploads/<id>.
    if kind == "uploads" && (name_part == "blobs" || name_part.ends_with("/blobs")) {
        return Ok(PathKind::Push);
    }
    // Some clients encode the digest's `:`; nothing else may be encoded.
    let last_decoded;
    let last = if last.contains('%') {
        last_decoded = last.replace("%3A", ":").replace("%3a", ":");
        last_decoded.as_str()
    } else {
        last
    };
    if name_part.contains('%') || last.contains('%') {
        return Err(RouteError::PercentEncoded);
    }
    let target = match (kind, last) {
        ("manifests", r) => Target::Manifest(Reference::parse(r)?),
        ("blobs", d) => Target::Blob(d.parse()?),
        ("tags", "list") => Target::TagsList,
        ("referrers", d) => Target::Referrers(d.parse()?),
        _ => return Err(RouteError::NoEndpoint(shorten(path).to_owned())),
    };
    let name: RepoName = name_part.parse()?;
    Ok(PathKind::Repo { name, target })
}

/// A routed request: which upstream, which repository on it.
#[derive(Debug, Clone)]
pub struct Route {
    /// Index of the upstream in the config's list.
    pub upstream: usize,
    /// The upstream's configured name (`docker.io`).
    pub upstream_name: Arc<str>,
    /// The repository on the upstream (`library/alpine`).
    pub repo: RepoName,
    /// `<upstream name>/<repository>`, what policy and logs see.
    pub canonical: String,
    /// The name as the client wrote it (for rewriting `Link` headers).
    pub client_name: RepoName,
    /// The canonical name the client asked for, when a `[[rewrite]]` serves
    /// it from `canonical` instead.
    pub rewritten_from: Option<String>,
    /// The upstream a client's `?ns=` named, to be named again in the
    /// `Link` of a paginated answer (its next page must route the same).
    pub ns: Option<Arc<str>>,
}

/// Picks upstreams for names; built from the config's upstream list.
#[derive(Debug, Clone)]
pub struct Router {
    hosts: Hosts,
}

impl Router {
    pub fn new<'a>(upstreams: impl IntoIterator<Item = (&'a str, bool)>) -> Router {
        Router {
            hosts: Hosts::new(upstreams),
        }
    }

    /// The router of a config's upstreams, aliases included.
    pub fn for_upstreams(upstreams: &[crate::config::UpstreamConfig]) -> Router {
        Router {
            hosts: crate::config::hosts(upstreams),
        }
    }

    /// Adds other spellings of upstream `index`'s host.
    pub fn with_aliases(self, index: usize, aliases: &[String]) -> Router {
        Router {
            hosts: self.hosts.with_aliases(index, aliases),
        }
    }

    /// Routes a client name, with containerd's `ns` query parameter if sent.
    pub fn route(&self, name: &RepoName, ns: Option<&str>) -> Result<Route, RouteError> {
        let r = self.hosts.resolve(name, ns)?;
        let upstream_name = self.hosts.name(r.index).clone();
        let canonical = self.hosts.canonical(&r);
        Ok(Route {
            upstream: r.index,
            repo: r.repo,
            canonical,
            client_name: name.clone(),
            rewritten_from: None,
            ns: ns.map(|_| upstream_name.clone()),
            upstream_name,
        })
    }

    /// Applies a rewrite: the route of `to` (a canonical name), remembering
    /// what the client asked for.
    pub fn rewritten(&self, from: Route, to: &str) -> Result<Route, RouteError> {
        let name: RepoName = to.parse()?;
        let mut route = self.route(&name, None)?;
        route.client_name = from.client_name;
        route.rewritten_from = Some(from.canonical);
        route.ns = from.ns;
        Ok(route)
    }
}

fn shorten(s: &str) -> &str {
    let mut end = s.len().min(100);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::ApiError;

    /// What a client gets for a routing error.
    fn api(e: RouteError) -> ApiError {
        crate::pipeline::errors::Error::from(e).into_api()
    }

    fn router() -> Router {
        Router::new([("docker.io", true), ("ghcr.io", false), ("quay.io", false)])
    }

    fn route(path: &str, ns: Option<&str>) -> Result<(String, String, Target), ApiError> {
        match parse_path(path).map_err(api)? {
            PathKind::Repo { name, target } => {
                let r = router().route(&name, ns).map_err(api)?;
                Ok((r.upstream_name.to_string(), r.repo.to_string(), target))
            }
            other => panic!("not a repo path: {other:?}"),
        }
    }

    #[test]
    fn ns_parameter_wins() {
        let (u, repo, _) = route("/v2/acme/app/manifests/v1", Some("ghcr.io")).unwrap();
        assert_eq!((u.as_str(), repo.as_str()), ("ghcr.io", "acme/app"));
        // containerd sends Docker Hub names without library/ sometimes.
        let (u, repo, _) = route("/v2/alpine/manifests/3", Some("docker.io")).unwrap();
        assert_eq!((u.as_str(), repo.as_str()), ("docker.io", "library/alpine"));
    }

    #[test]
    fn host_prefix_selects_upstream() {
        let d = crate::names::Digest::of(b"x");
        let (u, repo, _) = route(&format!("/v2/ghcr.io/acme/app/blobs/{d}"), None).unwrap();
        assert_eq!((u.as_str(), repo.as_str()), ("ghcr.io", "acme/app"));
        let (u, repo, _) = route("/v2/docker.io/library/alpine/manifests/latest", None).unwrap();
        assert_eq!((u.as_str(), repo.as_str()), ("docker.io", "library/alpine"));
        let (u, repo, _) = route("/v2/docker.io/alpine/manifests/latest", None).unwrap();
        assert_eq!((u.as_str(), repo.as_str()), ("docker.io", "library/alpine"));
    }

    #[test]
    fn default_upstream_and_library_prefix() {
        let (u, repo, _) = route("/v2/alpine/manifests/latest", None).unwrap();
        assert_eq!((u.as_str(), repo.as_str()), ("docker.io", "library/alpine"));
        let (u, repo, _) = route("/v2/bitnami/redis/tags/list", None).unwrap();
        assert_eq!((u.as_str(), repo.as_str()), ("docker.io", "bitnami/redis"));
    }

    #[test]
    fn aliases_route_to_one_upstream_and_one_name() {
        let r = router().with_aliases(
            0,
            &["index.docker.io".into(), "registry-1.docker.io".into()],
        );
        for (name, ns) in [
            ("index.docker.io/library/alpine", None),
            ("registry-1.docker.io/alpine", None),
            ("alpine", Some("index.docker.io")),
        ] {
            let route = r.route(&name.parse().unwrap(), ns).unwrap();
            assert_eq!(route.canonical, "docker.io/library/alpine", "{name} {ns:?}");
        }
    }

    #[test]
    fn unknown_upstream_is_name_unknown_listing_upstreams() {
        let e = route("/v2/x/manifests/latest", Some("example.com")).unwrap_err();
        assert_eq!(e.code, "NAME_UNKNOWN");
        assert!(
            e.message.contains("docker.io, ghcr.io, quay.io"),
            "{}",
            e.message
        );
        // An unconfigured registry as a prefix is not a Docker Hub repository.
        let e = api(router()
            .route(&"gcr.io/distroless/static".parse().unwrap(), None)
            .unwrap_err());
        assert_eq!(e.code, "NAME_UNKNOWN");
        assert!(e.message.contains("\"gcr.io\""), "{}", e.message);
        let no_default = Router::new([("ghcr.io", false)]);
        let e = api(no_default
            .route(&"foo/bar".parse().unwrap(), None)
            .unwrap_err());
        assert_eq!(e.code, "NAME_UNKNOWN");
    }

    #[test]
    fn bad_paths_get_precise_errors() {
        assert_eq!(parse_path("/v2/").unwrap(), PathKind::Base);
        assert_eq!(parse_path("/v2").unwrap(), PathKind::Base);
        assert_eq!(parse_path("/v2/a/blobs/uploads/").unwrap(), PathKind::Push);
        assert_eq!(
            parse_path("/v2/a/blobs/uploads/123").unwrap(),
            PathKind::Push
        );
        assert_eq!(
            api(parse_path("/v2/../etc/manifests/x").unwrap_err()).code,
            "NAME_INVALID"
        );
        assert_eq!(
            api(parse_path("/v2/a%2fb/manifests/x").unwrap_err()).code,
            "NAME_INVALID"
        );
        assert_eq!(
            api(parse_path("/v2/a/blobs/sha256:xyz").unwrap_err()).code,
            "DIGEST_INVALID"
        );
        assert_eq!(
            api(parse_path("/v2/a/manifests/-bad").unwrap_err()).code,
            "MANIFEST_UNKNOWN"
        );
        assert_eq!(
            api(parse_path("/v2/a/whatever/x").unwrap_err()).code,
            "NAME_UNKNOWN"
        );
        let long = format!("/v2/{}/manifests/x", vec!["abcdefgh"; 40].join("/"));
        assert_eq!(api(parse_path(&long).unwrap_err()).code, "NAME_INVALID");
    }

    #[test]
    fn encoded_colon_in_digest_is_accepted() {
        let d = crate::names::Digest::of(b"x");
        let p = format!("/v2/a/blobs/sha256%3A{}", d.hex());
        assert!(
            matches!(parse_path(&p).unwrap(), PathKind::Repo { target: Target::Blob(x), .. } if x == d)
        );
    }
}

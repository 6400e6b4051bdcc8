//! Routing: from a request path to an upstream, a repository and a target.
//!
//! Implements the routing contract (docs/configuration.md, "Routing"): `?ns=<host>` first, then a
//! leading path component naming a configured upstream, then the default
//! upstream; Docker Hub's one-component names get `library/`. Everything is
//! validated here, before any other module sees it. Depends on `names`,
//! `error`.

use std::sync::Arc;

use crate::error::ApiError;
use crate::names::{Digest, Reference, RepoName};

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
pub fn parse_path(path: &str) -> Result<PathKind, ApiError> {
    let Some(rest) = path.strip_prefix("/v2") else {
        return Err(ApiError::name_unknown(
            "not a registry API path (expected /v2/...)",
        ));
    };
    if rest.is_empty() || rest == "/" {
        return Ok(PathKind::Base);
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return Err(ApiError::name_unknown(
            "not a registry API path (expected /v2/...)",
        ));
    };
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    // Uploads: /v2/<name>/blobs/uploads/ and /v2/<name>/blobs/uploads/<id>.
    if n >= 3 && segs[n - 3] == "blobs" && segs[n - 2] == "uploads" {
        return Ok(PathKind::Push);
    }
    if n < 3 {
        return Err(ApiError::name_unknown(format!(
            "no registry endpoint at {:?}",
            shorten(path)
        )));
    }
    let last = segs[n - 1];
    // Some clients encode the digest's `:`; nothing else may be encoded.
    let last_decoded;
    let last = if last.contains('%') {
        last_decoded = last.replace("%3A", ":").replace("%3a", ":");
        last_decoded.as_str()
    } else {
        last
    };
    let name_part = segs[..n - 2].join("/");
    if name_part.contains('%') || last.contains('%') {
        return Err(ApiError::name_invalid(
            "percent-encoded characters are not allowed in repository names or references",
        ));
    }
    let target = match (segs[n - 2], last) {
        ("manifests", r) => Target::Manifest(Reference::parse(r)?),
        ("blobs", d) => Target::Blob(d.parse()?),
        ("tags", "list") => Target::TagsList,
        ("referrers", d) => Target::Referrers(d.parse()?),
        _ => {
            return Err(ApiError::name_unknown(format!(
                "no registry endpoint at {:?}",
                shorten(path)
            )))
        }
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
    /// Who asked, for the audit log (set by the handler).
    pub client: Option<std::net::SocketAddr>,
    /// The canonical name the client asked for, when a `[[rewrite]]` serves
    /// it from `canonical` instead.
    pub rewritten_from: Option<String>,
}

/// Picks upstreams for names; built from the config's upstream list.
#[derive(Debug, Clone)]
pub struct Router {
    names: Vec<Arc<str>>,
    /// Other spellings: (alias, upstream index).
    aliases: Vec<(String, usize)>,
    default: Option<usize>,
}

impl Router {
    pub fn new<'a>(upstreams: impl IntoIterator<Item = (&'a str, bool)>) -> Router {
        let mut names = Vec::new();
        let mut default = None;
        for (i, (name, is_default)) in upstreams.into_iter().enumerate() {
            names.push(Arc::from(name));
            if is_default && default.is_none() {
                default = Some(i);
            }
        }
        Router {
            names,
            aliases: Vec::new(),
            default,
        }
    }

    /// The router of a config's upstreams, aliases included.
    pub fn for_upstreams(upstreams: &[crate::config::UpstreamConfig]) -> Router {
        let mut r = Router::new(upstreams.iter().map(|u| (u.name.as_str(), u.default)));
        for (i, u) in upstreams.iter().enumerate() {
            r = r.with_aliases(i, &u.aliases);
        }
        r
    }

    /// Adds other spellings of upstream `index`'s host.
    pub fn with_aliases(mut self, index: usize, aliases: &[String]) -> Router {
        self.aliases
            .extend(aliases.iter().map(|a| (a.clone(), index)));
        self
    }

    /// Routes a client name, with containerd's `ns` query parameter if sent.
    pub fn route(&self, name: &RepoName, ns: Option<&str>) -> Result<Route, ApiError> {
        let (upstream, repo) = if let Some(ns) = ns {
            let Some(i) = self.find(ns) else {
                return Err(self.unknown(ns));
            };
            (i, name.clone())
        } else {
            let s = name.as_str();
            match s
                .split_once('/')
                .and_then(|(first, rest)| Some((self.find(first)?, rest)))
            {
                Some((i, rest)) => (i, rest.parse()?),
                // A first component that looks like a registry host (Docker's
                // rule: it has a `.` or `:`, or is `localhost`) names a
                // registry, which must be configured; it is never a
                // repository on the default upstream.
                None if looks_like_host(s.split('/').next().unwrap_or(s)) && s.contains('/') => {
                    return Err(self.unknown(s.split('/').next().unwrap_or(s)));
                }
                None => match self.default {
                    Some(i) => (i, name.clone()),
                    None => {
                        let first = s.split('/').next().unwrap_or(s);
                        return Err(self.unknown(first));
                    }
                },
            }
        };
        let upstream_name = self.names[upstream].clone();
        let repo = if &*upstream_name == "docker.io" && repo.depth() == 1 {
            repo.prefixed("library")?
        } else {
            repo
        };
        let canonical = format!("{upstream_name}/{repo}");
        Ok(Route {
            upstream,
            upstream_name,
            repo,
            canonical,
            client_name: name.clone(),
            client: None,
            rewritten_from: None,
        })
    }

    /// Applies a rewrite: the route of `to` (a canonical name), remembering
    /// what the client asked for.
    pub fn rewritten(&self, from: Route, to: &str) -> Result<Route, ApiError> {
        let name: RepoName = to.parse()?;
        let mut route = self.route(&name, None)?;
        route.client_name = from.client_name;
        route.client = from.client;
        route.rewritten_from = Some(from.canonical);
        Ok(route)
    }

    fn find(&self, host: &str) -> Option<usize> {
        self.names.iter().position(|n| &**n == host).or_else(|| {
            self.aliases
                .iter()
                .find(|(a, _)| a == host)
                .map(|(_, i)| *i)
        })
    }

    fn unknown(&self, host: &str) -> ApiError {
        let list: Vec<&str> = self.names.iter().map(|n| &**n).collect();
        ApiError::name_unknown(format!(
            "registry {:?} is not configured as an upstream of this pullgate (configured: {})",
            shorten(host),
            list.join(", ")
        ))
    }
}

fn looks_like_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
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

    fn router() -> Router {
        Router::new([("docker.io", true), ("ghcr.io", false), ("quay.io", false)])
    }

    fn route(path: &str, ns: Option<&str>) -> Result<(String, String, Target), ApiError> {
        match parse_path(path)? {
            PathKind::Repo { name, target } => {
                let r = router().route(&name, ns)?;
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
        let e = router()
            .route(&"gcr.io/distroless/static".parse().unwrap(), None)
            .unwrap_err();
        assert_eq!(e.code, "NAME_UNKNOWN");
        assert!(e.message.contains("\"gcr.io\""), "{}", e.message);
        let no_default = Router::new([("ghcr.io", false)]);
        let e = no_default
            .route(&"foo/bar".parse().unwrap(), None)
            .unwrap_err();
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
            parse_path("/v2/../etc/manifests/x").unwrap_err().code,
            "NAME_INVALID"
        );
        assert_eq!(
            parse_path("/v2/a%2fb/manifests/x").unwrap_err().code,
            "NAME_INVALID"
        );
        assert_eq!(
            parse_path("/v2/a/blobs/sha256:xyz").unwrap_err().code,
            "DIGEST_INVALID"
        );
        assert_eq!(
            parse_path("/v2/a/manifests/-bad").unwrap_err().code,
            "MANIFEST_UNKNOWN"
        );
        assert_eq!(
            parse_path("/v2/a/whatever/x").unwrap_err().code,
            "NAME_UNKNOWN"
        );
        let long = format!("/v2/{}/manifests/x", vec!["abcdefgh"; 40].join("/"));
        assert_eq!(parse_path(&long).unwrap_err().code, "NAME_INVALID");
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

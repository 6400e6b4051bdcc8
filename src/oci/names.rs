//! Parsed names: repository names, tags, digests and references, and the
//! canonical form of a name (`<registry>/<repository>`, Docker Hub's
//! `library/` filled in).
//!
//! Everything that arrives from a client, an upstream or a config file is
//! parsed into these types once, at the edge, following the grammar of the
//! OCI distribution spec. The rest of pullgate never handles a raw string
//! where one of these is meant. Depends on nothing else in the crate.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// Longest repository name we accept (the distribution spec's practical limit
/// for `<host>/<name>` is 255 characters).
pub const MAX_NAME_LEN: usize = 255;

/// Longest tag the spec allows.
pub const MAX_TAG_LEN: usize = 128;

/// Why a name, tag or digest was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("repository name is empty")]
    EmptyName,
    #[error("repository name is longer than {MAX_NAME_LEN} characters")]
    NameTooLong,
    #[error("repository name component {0:?} is not valid (lowercase letters, digits and single separators `.`, `_`, `__`, `-` between them)")]
    BadComponent(String),
    #[error("tag {0:?} is not valid (letters, digits, `_`, `.`, `-`; at most 128, not starting with `.` or `-`)")]
    BadTag(String),
    #[error("digest {0:?} is not valid (expected sha256:<64 lowercase hex>)")]
    BadDigest(String),
    #[error("digest algorithm in {0:?} is not supported (only sha256)")]
    UnsupportedAlgorithm(String),
}

/// A content address: the SHA-256 of some bytes.
///
/// Only sha256 is supported; it is what every registry in use produces.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Hashes `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    /// Wraps a finished SHA-256 hash.
    pub fn from_sha256(hash: [u8; 32]) -> Digest {
        Digest(hash)
    }

    /// A digest from its 64 lowercase hex characters.
    pub fn from_hex(hex: &str) -> Option<Digest> {
        let lower = hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let mut out = [0u8; 32];
        (lower && hex::decode_to_slice(hex, &mut out).is_ok()).then_some(Digest(out))
    }

    /// The 64 lowercase hex characters, without the algorithm.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl FromStr for Digest {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Digest, NameError> {
        let Some((algo, encoded)) = s.split_once(':') else {
            return Err(NameError::BadDigest(truncate(s)));
        };
        let algo_ok = !algo.is_empty()
            && algo
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
        if !algo_ok || encoded.is_empty() {
            return Err(NameError::BadDigest(truncate(s)));
        }
        if algo != "sha256" {
            return Err(NameError::UnsupportedAlgorithm(truncate(s)));
        }
        if encoded.len() != 64
            || !encoded
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(NameError::BadDigest(truncate(s)));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(encoded, &mut out).map_err(|_| NameError::BadDigest(truncate(s)))?;
        Ok(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Names and tags as JSON strings, validated when read (import records).
macro_rules! serde_as_text {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_as_text!(RepoName);
serde_as_text!(Tag);

/// Incremental SHA-256 for content streamed through pullgate.
#[derive(Default, Clone)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn new() -> Hasher {
        Hasher(Sha256::new())
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

/// A repository name as the distribution spec defines it:
/// lowercase components separated by `/`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Path components.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// Number of path components.
    pub fn depth(&self) -> usize {
        self.0.split('/').count()
    }

    /// `prefix/self`, validated again.
    pub fn prefixed(&self, prefix: &str) -> Result<RepoName, NameError> {
        format!("{prefix}/{}", self.0).parse()
    }
}

impl FromStr for RepoName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<RepoName, NameError> {
        if s.is_empty() {
            return Err(NameError::EmptyName);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::NameTooLong);
        }
        for component in s.split('/') {
            if !valid_component(component) {
                return Err(NameError::BadComponent(truncate(component)));
            }
        }
        Ok(RepoName(s.to_owned()))
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
pub fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: `.`, `_`, `__` or one or more `-`.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Tag, NameError> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_TAG_LEN
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..]
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-');
        if ok {
            Ok(Tag(s.to_owned()))
        } else {
            Err(NameError::BadTag(truncate(s)))
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// What a manifest request names: a tag or a digest.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    /// Parses the `<reference>` path segment: a digest when it contains `:`.
    pub fn parse(s: &str) -> Result<Reference, NameError> {
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => fmt::Display::fmt(t, f),
            Reference::Digest(d) => fmt::Display::fmt(d, f),
        }
    }
}

/// Splits an image reference, `NAME[:TAG]` (tag `latest` when absent) or
/// `NAME@DIGEST`.
pub fn split_image(image: &str) -> Result<(RepoName, Reference), String> {
    if let Some((name, digest)) = image.rsplit_once('@') {
        let d: Digest = digest.parse().map_err(|e| format!("{e}"))?;
        return Ok((
            name.parse().map_err(|e| format!("{e}"))?,
            Reference::Digest(d),
        ));
    }
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match image[last_slash..].rfind(':') {
        Some(i) => (&image[..last_slash + i], &image[last_slash + i + 1..]),
        None => (image, "latest"),
    };
    Ok((
        name.parse().map_err(|e| format!("{e}"))?,
        Reference::Tag(tag.parse().map_err(|e| format!("{e}"))?),
    ))
}

/// The registries a pullgate knows, by the host names clients use for
/// them, and the one names without a registry go to. Names are resolved
/// here, the same way for pulls, config entries and commands.
#[derive(Debug, Clone, Default)]
pub struct Hosts {
    names: Vec<std::sync::Arc<str>>,
    /// Other spellings: (alias, index into `names`).
    aliases: Vec<(String, usize)>,
    default: Option<usize>,
}

/// Why a name could not be resolved to a registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("registry {host:?} is not configured as an upstream of this pullgate (configured: {configured})")]
    Unknown { host: String, configured: String },
    #[error(transparent)]
    Name(#[from] NameError),
}

/// A name resolved to a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Index of the registry, in configuration order.
    pub index: usize,
    /// The repository on it, `library/` filled in for Docker Hub.
    pub repo: RepoName,
}

impl Hosts {
    /// Registries in order, with whether each is the default one.
    pub fn new<'a>(hosts: impl IntoIterator<Item = (&'a str, bool)>) -> Hosts {
        let mut h = Hosts::default();
        for (i, (name, is_default)) in hosts.into_iter().enumerate() {
            h.names.push(std::sync::Arc::from(name));
            if is_default && h.default.is_none() {
                h.default = Some(i);
            }
        }
        h
    }

    /// Adds other spellings of registry `index`'s host.
    pub fn with_aliases(mut self, index: usize, aliases: &[String]) -> Hosts {
        self.aliases
            .extend(aliases.iter().map(|a| (a.clone(), index)));
        self
    }

    /// The registry's configured name.
    pub fn name(&self, index: usize) -> &std::sync::Arc<str> {
        &self.names[index]
    }

    /// Resolves a client name, with containerd's `ns` query parameter if
    /// sent: `ns` first, then a first component naming a registry, then the
    /// default registry.
    pub fn resolve(&self, name: &RepoName, ns: Option<&str>) -> Result<Resolved, HostError> {
        let (index, repo) = if let Some(ns) = ns {
            let Some(i) = self.find(ns) else {
                return Err(self.unknown(ns));
            };
            (i, name.clone())
        } else {
            let s = name.as_str();
            let first = s.split('/').next().unwrap_or(s);
            match s
                .split_once('/')
                .and_then(|(first, rest)| Some((self.find(first)?, rest)))
            {
                Some((i, rest)) => (i, rest.parse()?),
                // A first component that looks like a registry host (Docker's
                // rule: it has a `.` or `:`, or is `localhost`) names a
                // registry, which must be configured; it is never a
                // repository on the default registry.
                None if looks_like_host(first) && s.contains('/') => {
                    return Err(self.unknown(first));
                }
                None => match self.default {
                    Some(i) => (i, name.clone()),
                    None => return Err(self.unknown(first)),
                },
            }
        };
        let repo = canonical_repo(&self.names[index], repo)?;
        Ok(Resolved { index, repo })
    }

    /// `<registry>/<repository>`, the name policy, logs and metrics see.
    pub fn canonical(&self, r: &Resolved) -> String {
        format!("{}/{}", self.names[r.index], r.repo)
    }

    fn find(&self, host: &str) -> Option<usize> {
        self.names.iter().position(|n| &**n == host).or_else(|| {
            self.aliases
                .iter()
                .find(|(a, _)| a == host)
                .map(|(_, i)| *i)
        })
    }

    fn unknown(&self, host: &str) -> HostError {
        let list: Vec<&str> = self.names.iter().map(|n| &**n).collect();
        HostError::Unknown {
            host: truncate(host),
            configured: list.join(", "),
        }
    }
}

/// Docker Hub's one-component repositories live under `library/`.
pub fn canonical_repo(registry: &str, repo: RepoName) -> Result<RepoName, NameError> {
    if registry == "docker.io" && repo.depth() == 1 {
        repo.prefixed("library")
    } else {
        Ok(repo)
    }
}

fn looks_like_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// Keeps client-supplied junk out of error messages and logs.
fn truncate(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        s.to_owned()
    } else {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_follow_the_spec_grammar() {
        for ok in [
            "a", "alpine", "a.b", "a_b", "a__b", "a-b", "a---b", "ghcr.io", "x9",
        ] {
            assert!(valid_component(ok), "{ok} should be valid");
        }
        for bad in [
            "", "A", "-a", "a-", ".a", "a.", "a..b", "a___b", "a_.b", "..", "a b", "a%2fb",
        ] {
            assert!(!valid_component(bad), "{bad} should be invalid");
        }
    }

    #[test]
    fn repo_names_reject_path_tricks_and_long_names() {
        assert!("library/alpine".parse::<RepoName>().is_ok());
        assert!("a/../b".parse::<RepoName>().is_err());
        assert!("a//b".parse::<RepoName>().is_err());
        assert!("/a".parse::<RepoName>().is_err());
        assert!("a/".parse::<RepoName>().is_err());
        assert_eq!("".parse::<RepoName>(), Err(NameError::EmptyName));
        let long = vec!["abcdefghij"; 30].join("/");
        assert_eq!(long.parse::<RepoName>(), Err(NameError::NameTooLong));
    }

    #[test]
    fn tags_follow_the_spec_grammar() {
        assert!("latest".parse::<Tag>().is_ok());
        assert!("_x.Y-1".parse::<Tag>().is_ok());
        assert!("-x".parse::<Tag>().is_err());
        assert!(".x".parse::<Tag>().is_err());
        assert!("a/b".parse::<Tag>().is_err());
        assert!("a".repeat(128).parse::<Tag>().is_ok());
        assert!("a".repeat(129).parse::<Tag>().is_err());
    }

    #[test]
    fn digests_round_trip_and_reject_bad_input() {
        let d = Digest::of(b"hello");
        let s = d.to_string();
        assert_eq!(
            s,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(s.parse::<Digest>().unwrap(), d);
        assert!(matches!(
            "sha512:abcd".parse::<Digest>(),
            Err(NameError::UnsupportedAlgorithm(_))
        ));
        assert!("sha256:ABCD".parse::<Digest>().is_err());
        assert!(s.to_uppercase().parse::<Digest>().is_err());
        assert!("sha256:".parse::<Digest>().is_err());
        assert!("nocolon".parse::<Digest>().is_err());
        assert!(format!("{s}0").parse::<Digest>().is_err());
    }

    #[test]
    fn references_are_tags_or_digests() {
        assert!(matches!(Reference::parse("v1"), Ok(Reference::Tag(_))));
        let d = Digest::of(b"x").to_string();
        assert!(matches!(Reference::parse(&d), Ok(Reference::Digest(_))));
        assert!(Reference::parse("sha256:zz").is_err());
    }

    #[test]
    fn hasher_matches_one_shot() {
        let mut h = Hasher::new();
        h.update(b"hel");
        h.update(b"lo");
        assert_eq!(h.finish(), Digest::of(b"hello"));
    }
}

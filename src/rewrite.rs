//! The rewrite step: what a pull resolves to before anything is fetched.
//!
//! Name rewrites (`[[rewrite]]`) serve one repository's pulls from another,
//! and tag pins (`[pins]`, `pins_file`) fix a tag to a digest with no
//! upstream call. Both are tables built once per config load; a request
//! costs a hash lookup, and nothing at all when none are configured.
//! Depends on `names`, and on `store` for writing the pins file.

use std::collections::HashMap;

use crate::names::Digest;

/// One `[[rewrite]]`, with canonical names (`<upstream>/<repository>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    /// The name pulls ask for, or the prefix of the names under it.
    pub from: String,
    /// The name served instead, or the prefix the rest is carried over to.
    pub to: String,
    /// Written with a trailing `/**`: every name under `from`.
    pub prefix: bool,
}

/// The rewrite rules of one config generation.
///
/// Precedence does not depend on file order: an exact rule wins over a
/// prefix rule, and the longest matching prefix wins among prefix rules.
/// Rules do not chain (config validation refuses a `to` that another rule
/// would rewrite again), so one lookup gives the final name.
#[derive(Debug, Clone, Default)]
pub struct Rewrites {
    exact: HashMap<String, String>,
    /// `/**` rules by their `from`.
    prefixes: HashMap<String, String>,
    /// How many segments the `from`s of `prefixes` have, most first: a name
    /// is looked up once per distinct depth, however many rules there are.
    depths: Vec<usize>,
}

impl Rewrites {
    pub fn new(rules: &[Rewrite]) -> Rewrites {
        let mut r = Rewrites::default();
        for rule in rules {
            if rule.prefix {
                r.prefixes.insert(rule.from.clone(), rule.to.clone());
                r.depths.push(rule.from.split('/').count());
            } else {
                r.exact.insert(rule.from.clone(), rule.to.clone());
            }
        }
        r.depths.sort_unstable_by(|a, b| b.cmp(a));
        r.depths.dedup();
        r
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }

    /// The canonical name pulls of `canonical` are served from, when a rule
    /// rewrites it.
    pub fn apply(&self, canonical: &str) -> Option<String> {
        if let Some(to) = self.exact.get(canonical) {
            return Some(to.clone());
        }
        for &depth in &self.depths {
            // The first `depth` segments, when more follow.
            let Some((end, _)) = canonical.match_indices('/').nth(depth - 1) else {
                continue;
            };
            if let Some(to) = self.prefixes.get(&canonical[..end]) {
                return Some(format!("{to}{}", &canonical[end..]));
            }
        }
        None
    }
}

/// Tag pins: (canonical name, tag) to digest.
#[derive(Debug, Clone, Default)]
pub struct Pins {
    by_name: HashMap<String, Vec<(String, Digest)>>,
}

impl Pins {
    /// Adds a pin; `Err` with the digest already pinned when the same tag is
    /// pinned to another digest.
    pub fn insert(&mut self, canonical: &str, tag: &str, digest: Digest) -> Result<(), Digest> {
        let tags = self.by_name.entry(canonical.to_owned()).or_default();
        match tags.iter().find(|(t, _)| t == tag) {
            Some((_, d)) if *d != digest => Err(*d),
            Some(_) => Ok(()),
            None => {
                tags.push((tag.to_owned(), digest));
                Ok(())
            }
        }
    }

    /// The digest `canonical:tag` is pinned to.
    pub fn get(&self, canonical: &str, tag: &str) -> Option<Digest> {
        self.by_name
            .get(canonical)?
            .iter()
            .find(|(t, _)| t == tag)
            .map(|(_, d)| *d)
    }

    pub fn len(&self) -> usize {
        self.by_name.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// Writes a pins file holding `pins` (`"name:tag" = "sha256:..."` under
/// `[pins]`), sorted, through a temp file and a rename: a failure leaves
/// the old file as it was.
pub fn write_pins_file(
    path: &std::path::Path,
    pins: &std::collections::BTreeMap<String, String>,
) -> std::io::Result<()> {
    let mut text = String::from(
        "# Tag pins: each tag resolves to its digest, with no upstream call.\n\
         # Written by `pullgate pin`; loaded through `pins_file` and reloaded on SIGHUP.\n\n[pins]\n",
    );
    for (image, digest) in pins {
        text.push_str(&format!(
            "{} = {}\n",
            toml::Value::String(image.clone()),
            toml::Value::String(digest.clone())
        ));
    }
    crate::store::replace_file(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(from: &str, to: &str) -> Rewrite {
        let prefix = from.ends_with("/**");
        Rewrite {
            from: from.trim_end_matches("/**").to_owned(),
            to: to.trim_end_matches("/**").to_owned(),
            prefix,
        }
    }

    #[test]
    fn exact_beats_prefix_and_longest_prefix_wins_whatever_the_order() {
        let r = Rewrites::new(&[
            rule("docker.io/**", "mirror.internal/hub/**"),
            rule("docker.io/bitnami/**", "registry.internal/bitnami/**"),
            rule(
                "docker.io/bitnami/redis",
                "registry.internal/hardened/redis",
            ),
        ]);
        assert_eq!(
            r.apply("docker.io/bitnami/redis").as_deref(),
            Some("registry.internal/hardened/redis")
        );
        assert_eq!(
            r.apply("docker.io/bitnami/nginx").as_deref(),
            Some("registry.internal/bitnami/nginx")
        );
        assert_eq!(
            r.apply("docker.io/bitnami/a/b").as_deref(),
            Some("registry.internal/bitnami/a/b")
        );
        assert_eq!(
            r.apply("docker.io/library/alpine").as_deref(),
            Some("mirror.internal/hub/library/alpine")
        );
        // `/**` is what is under the prefix, not the prefix itself, and a
        // prefix matches whole path segments only.
        assert_eq!(
            r.apply("docker.io/bitnami").as_deref(),
            Some("mirror.internal/hub/bitnami")
        );
        let only = Rewrites::new(&[rule("docker.io/bitnami/**", "r.internal/b/**")]);
        assert_eq!(only.apply("docker.io/bitnami"), None);
        assert_eq!(only.apply("docker.io/bitnamix/redis"), None);
        assert_eq!(only.apply("ghcr.io/bitnami/redis"), None);
        assert!(Rewrites::new(&[]).is_empty());
    }

    #[test]
    fn pins_resolve_per_name_and_tag_and_refuse_a_second_digest() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let mut p = Pins::default();
        p.insert("docker.io/library/alpine", "3.20", a).unwrap();
        p.insert("docker.io/library/alpine", "3.20", a).unwrap();
        assert_eq!(p.insert("docker.io/library/alpine", "3.20", b), Err(a));
        p.insert("docker.io/library/alpine", "3.19", b).unwrap();
        assert_eq!(p.get("docker.io/library/alpine", "3.20"), Some(a));
        assert_eq!(p.get("docker.io/library/alpine", "3.19"), Some(b));
        assert_eq!(p.get("docker.io/library/alpine", "latest"), None);
        assert_eq!(p.get("docker.io/library/busybox", "3.20"), None);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn pins_file_is_replaced_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pins.toml");
        std::fs::write(&path, "old").unwrap();
        let mut pins = std::collections::BTreeMap::new();
        pins.insert(
            "docker.io/library/alpine:3.20".to_owned(),
            Digest::of(b"x").to_string(),
        );
        write_pins_file(&path, &pins).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let table: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(
            table["pins"]["docker.io/library/alpine:3.20"].as_str(),
            Some(Digest::of(b"x").to_string().as_str())
        );
        // A directory that cannot be written: the old file stays.
        let missing = dir.path().join("no-such-dir").join("pins.toml");
        assert!(write_pins_file(&missing, &pins).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
}

//! The rewrite step: what a pull resolves to before anything is fetched.
//!
//! Name rewrites (`[[rewrite]]`) serve one repository's pulls from another;
//! tag pins (`[pins]`, `pins_file`) fix a tag to a digest with no upstream
//! call (the table is the config's, [`crate::config::Pins`]). The rewrite
//! table is built once per config load; a request costs a hash lookup, and
//! nothing at all when none are configured. Depends on `config`.

use std::collections::HashMap;

use crate::config::Rewrite;

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
}

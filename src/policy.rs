//! Policy: which rule governs a name, and the verdict it gives.
//!
//! First matching `[[policy]]` wins; a name that matches none is denied.
//! What the name alone decides (no policy, `deny = true`) is settled here;
//! signature and base checks (`verify`) start from this verdict. Depends on
//! `config`, `oci`.

use std::sync::Arc;

use crate::config::{Mode, PolicyConfig};
use crate::oci::names::Digest;

/// The ordered policy list of one config generation.
#[derive(Debug, Clone)]
pub struct Policies {
    list: Vec<PolicyConfig>,
}

/// Why something was (or would be) blocked: a stable slug in responses,
/// metrics and logs, and words for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    NoPolicy,
    DeniedByPolicy,
    Unsigned,
    BadSignature,
    VerificationUnavailable,
    NotApproved,
    TagNotAllowed,
    BaseNotAllowed,
    /// The identity's tenant does not hold this name.
    NotInTenant,
}

impl Reason {
    /// Every reason, for docs and for metrics that start at zero.
    pub const ALL: [Reason; 9] = [
        Reason::NoPolicy,
        Reason::DeniedByPolicy,
        Reason::Unsigned,
        Reason::BadSignature,
        Reason::VerificationUnavailable,
        Reason::NotApproved,
        Reason::TagNotAllowed,
        Reason::BaseNotAllowed,
        Reason::NotInTenant,
    ];

    /// The stable slug (`unsigned`, `base-not-allowed`, ...).
    pub fn slug(self) -> &'static str {
        match self {
            Reason::NoPolicy => "no-policy",
            Reason::DeniedByPolicy => "denied-by-policy",
            Reason::Unsigned => "unsigned",
            Reason::BadSignature => "bad-signature",
            Reason::VerificationUnavailable => "verification-unavailable",
            Reason::NotApproved => "not-approved",
            Reason::TagNotAllowed => "tag-not-allowed",
            Reason::BaseNotAllowed => "base-not-allowed",
            Reason::NotInTenant => "not-in-tenant",
        }
    }

    /// The reason in words, as sent to clients.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::NoPolicy => "no policy matches this name",
            Reason::DeniedByPolicy => "the policy denies everything it matches",
            Reason::Unsigned => "no signature by a trusted key was found",
            Reason::BadSignature => "signatures were found but none verifies with a trusted key",
            Reason::TagNotAllowed => {
                "the policy does not allow pulling this tag (require_digest or deny_tags); pull by digest"
            }
            Reason::BaseNotAllowed => "the image is not built on an allowed base image",
            Reason::NotInTenant => "the name is not among the repositories of the client's tenant",
            Reason::NotApproved => {
                "the blob is not part of an approved manifest of this repository"
            }
            Reason::VerificationUnavailable => {
                "signatures, approvals or base images could not be read (from the upstream or pullgate's store), and no earlier verdict is known"
            }
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.slug())
    }
}

/// A reason equals its slug.
impl PartialEq<&str> for Reason {
    fn eq(&self, slug: &&str) -> bool {
        self.slug() == *slug
    }
}

impl serde::Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.slug())
    }
}

/// The outcome of evaluating one name (and, for manifests, one digest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The policy that matched, if any.
    pub policy: Option<Arc<str>>,
    pub mode: Mode,
    /// Empty when the content passes.
    pub reasons: Vec<Reason>,
    /// Specifics in words: which base matched, or how close the image came.
    pub detail: Option<std::sync::Arc<str>>,
}

impl Verdict {
    /// A verdict of `policy`; it passes when `reasons` is empty.
    pub fn of(policy: &PolicyConfig, reasons: Vec<Reason>) -> Verdict {
        Verdict {
            policy: Some(policy.name.clone()),
            mode: policy.mode,
            reasons,
            detail: None,
        }
    }

    pub fn passes(&self) -> bool {
        self.reasons.is_empty()
    }

    /// Denied and enforced: the client gets 403.
    pub fn blocks(&self) -> bool {
        !self.passes() && self.mode == Mode::Enforce
    }

    /// Denied in audit mode: served with a warning.
    pub fn would_block(&self) -> bool {
        !self.passes() && self.mode == Mode::Audit
    }

    /// The reason in words, as sent to clients, naming the manifest by its
    /// short digest when there is one: clients print only the message, so
    /// the digest in the JSON detail is lost to a person otherwise.
    pub fn message(&self, canonical: &str, digest: Option<&Digest>) -> String {
        // The slug goes with the words: clients show only the message.
        let words: Vec<String> = self
            .reasons
            .iter()
            .map(|r| format!("{} [{r}]", r.describe()))
            .collect();
        let what = match digest {
            Some(d) => format!("{canonical}, {}", short(d)),
            None => canonical.to_owned(),
        };
        match &self.policy {
            Some(p) => match &self.detail {
                Some(d) => format!(
                    "blocked by policy {p:?}: {} ({what}: {d})",
                    words.join("; ")
                ),
                None => format!("blocked by policy {p:?}: {} ({what})", words.join("; ")),
            },
            None => {
                format!("blocked: no policy matches {canonical:?}, and unmatched names are denied [no-policy]")
            }
        }
    }

    /// The `Warning` header value for audit mode.
    pub fn warning(&self, canonical: &str, digest: Option<&Digest>) -> String {
        let msg = self.message(canonical, digest).replace('"', "'");
        format!("299 - \"pullgate: would block: {msg}\"")
    }
}

/// A digest as people read it: the algorithm and the first 12 hex digits.
pub fn short(d: &Digest) -> String {
    let hex = d.hex();
    format!("sha256:{}", &hex[..12])
}

/// What a tag pull under a content policy does about the tag's approved
/// digest (tag-drift protection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagStep {
    Nothing,
    /// The digest passed and is not the one recorded: record it.
    RecordApproved,
    /// The digest is denied and `tag_drift = "keep-approved"`: serve this
    /// last approved digest instead, if it still passes.
    KeepApproved(Digest),
}

/// Decides [`TagStep`] from the verdict on the digest the tag names now
/// (`now`) and the digest last approved for the tag.
pub fn tag_step(
    policy: &PolicyConfig,
    verdict: &Verdict,
    approved: Option<Digest>,
    now: Digest,
) -> TagStep {
    if verdict.passes() {
        return if approved == Some(now) {
            TagStep::Nothing
        } else {
            TagStep::RecordApproved
        };
    }
    // Audit mode serves the content anyway: nothing to keep.
    if !verdict.blocks() || policy.tag_drift != crate::config::TagDrift::KeepApproved {
        return TagStep::Nothing;
    }
    match approved {
        Some(prev) if prev != now => TagStep::KeepApproved(prev),
        _ => TagStep::Nothing,
    }
}

impl Policies {
    pub fn new(list: Vec<PolicyConfig>) -> Policies {
        Policies { list }
    }

    /// The policy governing a canonical name.
    pub fn matching(&self, canonical: &str) -> Option<&PolicyConfig> {
        self.list.iter().find(|p| p.matcher.is_match(canonical))
    }

    /// Evaluates what the name alone decides: no policy, or `deny = true`.
    /// Signature requirements are checked by `verify`, which starts from
    /// this verdict.
    pub fn evaluate(&self, canonical: &str) -> Verdict {
        Policies::by_name(self.matching(canonical))
    }

    /// The verdict of an already matched policy (or none) on the name alone.
    pub fn by_name(policy: Option<&PolicyConfig>) -> Verdict {
        match policy {
            None => Verdict {
                policy: None,
                mode: Mode::Enforce,
                reasons: vec![Reason::NoPolicy],
                detail: None,
            },
            Some(p) if p.deny => Verdict::of(p, vec![Reason::DeniedByPolicy]),
            Some(p) => Verdict::of(p, Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn policies(text: &str) -> Policies {
        let c = Config::parse(
            &format!("[[upstream]]\nname = \"ghcr.io\"\nurl = \"https://ghcr.io\"\n{text}"),
            "t",
            std::path::Path::new("."),
        )
        .unwrap();
        Policies::new(c.policies)
    }

    #[test]
    fn first_match_wins_and_unmatched_is_denied() {
        let p = policies(
            r#"
[[policy]]
name = "blocked"
match = ["ghcr.io/evil/**"]
deny = true
[[policy]]
name = "acme"
match = ["ghcr.io/acme/**", "ghcr.io/evil/ok"]
"#,
        );
        assert!(p.evaluate("ghcr.io/acme/app").passes());
        let v = p.evaluate("ghcr.io/evil/ok");
        assert!(v.blocks());
        assert_eq!(v.reasons, ["denied-by-policy"]);
        let v = p.evaluate("ghcr.io/other/app");
        assert_eq!(
            (v.policy.as_deref(), v.reasons.as_slice()),
            (None, &[Reason::NoPolicy][..])
        );
        assert!(v.blocks());
    }

    #[test]
    fn tag_drift_keeps_the_last_approved_digest_only_when_it_should() {
        let mut keep = policies("[[policy]]\nname = \"p\"\nmatch = [\"**\"]\n").list[0].clone();
        let (old, new) = (Digest::of(b"old"), Digest::of(b"new"));
        let pass = Verdict::of(&keep, Vec::new());
        let deny = Verdict::of(&keep, vec![Reason::Unsigned]);
        // Passing content is recorded once.
        assert_eq!(tag_step(&keep, &pass, None, new), TagStep::RecordApproved);
        assert_eq!(
            tag_step(&keep, &pass, Some(old), new),
            TagStep::RecordApproved
        );
        assert_eq!(tag_step(&keep, &pass, Some(new), new), TagStep::Nothing);
        // Denied content: the last approved digest is kept (the default).
        assert_eq!(
            tag_step(&keep, &deny, Some(old), new),
            TagStep::KeepApproved(old)
        );
        // Nothing approved before, or the approved digest itself now denied
        // (a key was removed): nothing to fall back to.
        assert_eq!(tag_step(&keep, &deny, None, new), TagStep::Nothing);
        assert_eq!(tag_step(&keep, &deny, Some(new), new), TagStep::Nothing);
        // Audit mode serves anyway; tag_drift = "deny" denies.
        let audit = Verdict {
            mode: Mode::Audit,
            ..deny.clone()
        };
        assert_eq!(tag_step(&keep, &audit, Some(old), new), TagStep::Nothing);
        keep.tag_drift = crate::config::TagDrift::Deny;
        assert_eq!(tag_step(&keep, &deny, Some(old), new), TagStep::Nothing);
    }

    #[test]
    fn a_denial_names_the_manifest_by_its_short_digest() {
        let p = policies("[[policy]]\nname = \"no\"\nmatch = [\"**\"]\ndeny = true\n");
        let d = Digest::of(b"m");
        let msg = p.evaluate("ghcr.io/a/b").message("ghcr.io/a/b", Some(&d));
        assert!(
            msg.ends_with(&format!("(ghcr.io/a/b, sha256:{})", &d.hex()[..12])),
            "{msg}"
        );
    }

    #[test]
    fn audit_mode_would_block_with_a_warning() {
        let p = policies(
            "[[policy]]\nname = \"watch\"\nmatch = [\"**\"]\nmode = \"audit\"\ndeny = true\n",
        );
        let v = p.evaluate("ghcr.io/a/b");
        assert!(!v.blocks());
        assert!(v.would_block());
        let w = v.warning("ghcr.io/a/b", None);
        assert!(
            w.starts_with("299 - \"pullgate: would block: blocked by policy 'watch'"),
            "{w}"
        );
    }
}

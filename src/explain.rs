//! `pullgate verify` and `pullgate pin`: a verdict reached step by step,
//! without serving anything.
//!
//! Each step of the pipeline (route, rewrite, pin, policy, signatures,
//! bases) becomes a line of the explanation. Everything is fetched from the
//! upstreams directly; the store is only read (local approvals, base
//! history), never written, so this runs next to a live server. Depends on
//! `bases`, `config`, `route`, `rewrite`, `policy`, `verify`, `upstream`.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};

use crate::approvals;
use crate::bases::{self, BaseTable};
use crate::config::{BaseRef, Config, Mode};
use crate::cosign;
use crate::keys::PublicKey;
use crate::metrics::Metrics;
use crate::names::{Digest, Reference, RepoName};
use crate::store::StoredManifest;
use crate::upstream::{RequestOptions, UpstreamClient};
use crate::verify::{check_signatures, index_children, read_limited, Finding, MAX_INDEX_CHILDREN};

/// How the evaluation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
}

/// The verdict and what it was about.
#[derive(Debug, Clone)]
pub struct Explained {
    pub outcome: Outcome,
    /// The canonical name asked for.
    pub asked: String,
    /// The canonical name served (differs under a `[[rewrite]]`).
    pub served: String,
    pub reference: Reference,
    /// The manifest evaluated; `None` when the name alone decided.
    pub digest: Option<Digest>,
}

/// Whether tag pins are honoured: `verify` shows what a pull gets;
/// `pin` asks the upstream what the tag is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pins {
    Honour,
    Ignore,
}

/// Evaluates policy for `image` (`NAME[:TAG]` or `NAME@DIGEST`), writing
/// each step as a line of `out`. `Err` when the image, its signatures or
/// its bases cannot be fetched.
pub async fn explain(
    config: &Config,
    image: &str,
    pins: Pins,
    out: &mut Vec<String>,
) -> Result<Explained, String> {
    let (name, reference) = crate::names::split_image(image)?;
    let router = crate::route::Router::for_upstreams(&config.upstreams);
    let asked = router.route(&name, None).map_err(|e| e.message)?;
    out.push(format!(
        "name: {} (upstream {}, repository {})",
        asked.canonical, asked.upstream_name, asked.repo
    ));
    let asked_name = asked.canonical.clone();
    let rewrites = crate::rewrite::Rewrites::new(&config.rewrites);
    let route = match rewrites.apply(&asked.canonical) {
        Some(to) => {
            let r = router.rewritten(asked, &to).map_err(|e| e.message)?;
            out.push(format!(
                "rewrite: served from {} (upstream {}, repository {})",
                r.canonical, r.upstream_name, r.repo
            ));
            r
        }
        None => asked,
    };
    let mut explained = Explained {
        outcome: Outcome::Denied,
        asked: asked_name.clone(),
        served: route.canonical.clone(),
        reference: reference.clone(),
        digest: None,
    };
    let policies = crate::policy::Policies::new(config.policies.clone());
    let Some(policy) = policies.matching(&route.canonical) else {
        out.push("policy: none matches this name; unmatched names are denied (no-policy)".into());
        return Ok(explained);
    };
    let keys: Vec<&PublicKey> = policy.signed_by.iter().map(|k| &k.key).collect();
    let names: Vec<&str> = policy.signed_by.iter().map(|k| k.name.as_str()).collect();
    let mut requirements = Vec::new();
    if !names.is_empty() {
        requirements.push(format!("signed_by {names:?}"));
    }
    if !policy.bases.is_empty() {
        requirements.push(format!("bases {:?}", policy.bases));
    }
    if policy.require_digest {
        requirements.push("require_digest".into());
    }
    out.push(format!(
        "policy: {:?} (mode {}, patterns {:?}){}",
        policy.name,
        policy.mode.as_str(),
        policy.patterns,
        if policy.deny {
            ", deny = true".to_owned()
        } else if requirements.is_empty() {
            ", no requirements".to_owned()
        } else {
            format!(", {}", requirements.join(", "))
        }
    ));
    if policy.deny {
        out.push("verdict: denied (denied-by-policy)".into());
        return Ok(explained);
    }
    let denied_word = if policy.mode == Mode::Audit {
        "would be denied; served with a warning in audit mode"
    } else {
        "denied"
    };
    if let Reference::Tag(tag) = &reference {
        let refused = policy.require_digest
            || policy
                .deny_tags
                .as_ref()
                .is_some_and(|g| g.is_match(tag.as_str()));
        if refused {
            out.push(format!(
                "verdict: {denied_word} (tag-not-allowed: pull {} by digest)",
                route.canonical
            ));
            return Ok(explained);
        }
    }
    let metrics = Arc::new(Metrics::new());
    let clients = config
        .upstreams
        .iter()
        .map(|u| UpstreamClient::new(u, metrics.clone()).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let upstream = clients[route.upstream].clone();
    let max = config.server.max_manifest_size as usize;
    let pinned = match (&reference, pins) {
        (Reference::Tag(tag), Pins::Honour) => config
            .pins
            .get(&asked_name, tag.as_str())
            .or_else(|| config.pins.get(&route.canonical, tag.as_str())),
        _ => None,
    };
    let fetch_ref = match pinned {
        Some(d) => {
            out.push(format!("pin: tag {reference} is pinned to {d}"));
            Reference::Digest(d)
        }
        None => reference.clone(),
    };
    let (digest, bytes) = get_manifest(&upstream, &route.repo, &fetch_ref, max)
        .await
        .map_err(|e| match pinned {
            Some(d) => {
                format!("{e} (the digest the tag is pinned to: {d}; check [pins] and pins_file)")
            }
            None => e,
        })?;
    explained.digest = Some(digest);
    let manifest = StoredManifest {
        digest,
        media_type: String::new(),
        bytes,
    };
    let children = index_children(&manifest);
    out.push(format!(
        "manifest: {digest}{}",
        match &children {
            Some(c) => format!(" (an index of {} manifests)", c.len()),
            None => String::new(),
        }
    ));
    if !policy.checks_content() {
        out.push("verdict: allowed (the policy has no requirements)".into());
        explained.outcome = Outcome::Allowed;
        return Ok(explained);
    }
    let mut failed = Vec::new();
    if !keys.is_empty() {
        out.push("signatures:".into());
        let store = &config.storage.path;
        let explain_one =
            async |d: &Digest, label: &str, out: &mut Vec<String>| -> Result<bool, String> {
                match approvals::check(store, d, &keys) {
                    Ok(i) => {
                        out.push(format!(
                            "  {label}: approved locally, verified with key {:?}",
                            names[i]
                        ));
                        return Ok(true);
                    }
                    Err(why) if !why.is_empty() => {
                        for w in why {
                            out.push(format!("  {label}: {w}"));
                        }
                    }
                    Err(_) => out.push(format!("  {label}: no local approvals")),
                }
                let f = check_signatures(&upstream, &route.repo, d, &keys, &names).await?;
                match &f {
                    Finding::Signed(k) => out.push(format!(
                        "  {label}: signature in {} verified with key {k:?}",
                        cosign::signature_tag(d)
                    )),
                    Finding::Unsigned => out.push(format!(
                        "  {label}: no signatures ({} is absent or empty)",
                        cosign::signature_tag(d)
                    )),
                    Finding::BadSignatures(why) => {
                        for w in why {
                            out.push(format!("  {label}: signature rejected: {w}"));
                        }
                    }
                }
                Ok(matches!(f, Finding::Signed(_)))
            };
        let mut signed = explain_one(&digest, "manifest", out).await?;
        if !signed {
            if let Some(children) = children
                .clone()
                .filter(|c| !c.is_empty() && c.len() <= MAX_INDEX_CHILDREN)
            {
                out.push(
                    "  the index is not signed itself; checking every manifest it lists:".into(),
                );
                let mut all = true;
                for c in &children {
                    all &= explain_one(c, &c.to_string(), out).await?;
                }
                signed = all;
                if all {
                    out.push("  every manifest of the index is signed".into());
                }
            }
        }
        if !signed {
            failed.push("unsigned or bad-signature");
        }
    }
    if !policy.bases.is_empty() {
        out.push("bases:".into());
        let table = base_table(config, &policy.bases, &clients, &router, out).await;
        let source = Direct {
            upstream: upstream.clone(),
            repo: route.repo.clone(),
            max,
        };
        let o = bases::check_manifest(&table, &policy.bases, &manifest, &source).await?;
        out.push(format!("  image: {}", o.detail));
        if !o.passes {
            failed.push("base-not-allowed");
        }
    }
    if failed.is_empty() {
        out.push("verdict: allowed".into());
        explained.outcome = Outcome::Allowed;
        return Ok(explained);
    }
    out.push(format!("verdict: {denied_word} ({})", failed.join(", ")));
    // Tag drift: a pull of the tag gets the digest policy approved last,
    // as the server's store records it.
    let drift = matches!(&reference, Reference::Tag(_))
        && pinned.is_none()
        && pins == Pins::Honour
        && policy.mode == Mode::Enforce
        && policy.tag_drift == crate::config::TagDrift::KeepApproved;
    if let (true, Reference::Tag(tag)) = (drift, &reference) {
        if let Some(prev) = approved_digest(config, &route, tag).filter(|d| *d != digest) {
            out.push(format!(
                "tag drift: the tag was last approved at {prev}; pulls get that digest (tag_drift = \"keep-approved\") if it still passes:"
            ));
            let mut inner = Vec::new();
            let again = Box::pin(explain(
                config,
                &format!("{asked_name}@{prev}"),
                Pins::Honour,
                &mut inner,
            ))
            .await?;
            out.extend(inner.into_iter().map(|l| format!("  {l}")));
            if again.outcome == Outcome::Allowed {
                out.push(format!("verdict: allowed: pulls of the tag are served {prev}, with a tag-drift warning"));
                explained.outcome = Outcome::Allowed;
                explained.digest = Some(prev);
            }
        }
    }
    Ok(explained)
}

/// The digest policy last approved for a tag, from the tag's record in the
/// server's store (read only).
fn approved_digest(
    config: &Config,
    route: &crate::route::Route,
    tag: &crate::names::Tag,
) -> Option<Digest> {
    let key = crate::store::TagKey {
        upstream: route.upstream_name.clone(),
        repo: route.repo.clone(),
        tag: tag.clone(),
    };
    crate::store::read_tag_record(&config.storage.path, &key)?.approved
}

/// GETs a manifest and checks it against its digest when asked by digest.
async fn get_manifest(
    upstream: &UpstreamClient,
    repo: &RepoName,
    reference: &Reference,
    max: usize,
) -> Result<(Digest, Bytes), String> {
    let opts = RequestOptions {
        accept: Some(HeaderValue::from_static(crate::handler::DEFAULT_ACCEPT)),
        ..RequestOptions::default()
    };
    let resp = upstream
        .send(Method::GET, repo, &format!("manifests/{reference}"), &opts)
        .await
        .map_err(|e| e.to_string())?;
    if resp.status() != StatusCode::OK {
        let sep = match reference {
            Reference::Digest(_) => '@',
            Reference::Tag(_) => ':',
        };
        return Err(format!(
            "upstream {} answered {} for {repo}{sep}{reference}",
            upstream.name,
            resp.status(),
        ));
    }
    let bytes = read_limited(upstream, resp, max)
        .await?
        .ok_or("manifest over server.max_manifest_size")?;
    let digest = Digest::of(&bytes);
    if let Reference::Digest(want) = reference {
        if *want != digest {
            return Err(format!(
                "upstream sent bytes for {want} that hash to {digest}"
            ));
        }
    }
    Ok((digest, bytes))
}

/// Resolves the bases of `sets` from the upstreams, with the digests the
/// server's base history holds, and lists them.
async fn base_table(
    config: &Config,
    sets: &[String],
    clients: &[Arc<UpstreamClient>],
    router: &crate::route::Router,
    out: &mut Vec<String>,
) -> BaseTable {
    let path = config.storage.path.join(bases::HISTORY_FILE);
    let mut history = match std::fs::read(&path) {
        Ok(b) => bases::History::from_json(&b).unwrap_or_default(),
        Err(_) => bases::History::default(),
    };
    let wanted: Vec<_> = config
        .bases
        .iter()
        .filter(|s| sets.contains(&s.name))
        .cloned()
        .collect();
    let resolver = DirectResolver {
        clients,
        router,
        max: config.server.max_manifest_size as usize,
    };
    let done = bases::refresh(&wanted, &mut history, config.storage.base_keep, &resolver).await;
    for set in &wanted {
        let n = done
            .table
            .images
            .iter()
            .filter(|b| *b.set == *set.name)
            .count();
        out.push(format!(
            "  base {:?}: {} ({n} manifests, current and earlier digests)",
            set.name,
            set.images
                .iter()
                .map(|i| i.image.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for f in &done.failures {
        out.push(format!("  base not resolved: {f}"));
    }
    done.table
}

/// Fetches straight from one repository's upstream.
struct Direct {
    upstream: Arc<UpstreamClient>,
    repo: RepoName,
    max: usize,
}

impl bases::Source for Direct {
    async fn manifest(&self, digest: Digest) -> Result<Arc<StoredManifest>, String> {
        let (digest, bytes) = get_manifest(
            &self.upstream,
            &self.repo,
            &Reference::Digest(digest),
            self.max,
        )
        .await?;
        Ok(Arc::new(StoredManifest {
            digest,
            media_type: String::new(),
            bytes,
        }))
    }

    async fn platform(&self, config: Digest) -> Option<bases::Platform> {
        let b = crate::verify::get_blob(&self.upstream, &self.repo, config, 1024 * 1024).await?;
        bases::Platform::from_config(&b)
    }
}

struct DirectResolver<'a> {
    clients: &'a [Arc<UpstreamClient>],
    router: &'a crate::route::Router,
    max: usize,
}

impl DirectResolver<'_> {
    fn source(&self, base: &BaseRef) -> Result<Direct, String> {
        let name: RepoName = base.canonical.parse().map_err(|e| format!("{e}"))?;
        let route = self.router.route(&name, None).map_err(|e| e.message)?;
        Ok(Direct {
            upstream: self.clients[route.upstream].clone(),
            repo: route.repo,
            max: self.max,
        })
    }
}

impl bases::Resolver for DirectResolver<'_> {
    async fn resolve(&self, base: &BaseRef) -> Result<Digest, String> {
        let s = self.source(base)?;
        let (d, _) = get_manifest(&s.upstream, &s.repo, &base.reference, s.max).await?;
        Ok(d)
    }

    async fn manifest(
        &self,
        base: &BaseRef,
        digest: Digest,
    ) -> Result<Arc<StoredManifest>, String> {
        bases::Source::manifest(&self.source(base)?, digest).await
    }
}

//! Manifests as typed values: what pullgate reads of an image manifest or an
//! index, in one place.
//!
//! A manifest is parsed once, when it arrives (from an upstream, the store
//! or a bundle), into [`oci_spec`]'s types; every later step (the base
//! check, blob approval, signature artifacts, index children) reads the
//! typed value, and a cached pull reads nothing at all: the response headers
//! are prepared here too. A body that is both an index and an image
//! manifest is refused (CVE-2021-41190); one that is neither (Docker schema
//! 1, or descriptors the spec would not accept) is kept as [`Kind::Other`]:
//! served where policy allows it, never taken for an image. Depends on
//! `names`.

use bytes::Bytes;
use http::HeaderValue;
use oci_spec::image::{Descriptor, DigestAlgorithm, ImageIndex, ImageManifest};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::oci::names::Digest;

/// Manifest media types asked for when the client names none.
pub const DEFAULT_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 1, unsigned and signed: the only manifests without a
/// `mediaType` that are not OCI.
pub const DOCKER_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_V1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// Deepest nesting of arrays and objects accepted in a manifest. Real ones
/// nest four or five levels (an index entry's platform); clients give up
/// at depths far below what a hostile body can reach within the size cap.
pub const MAX_DEPTH: usize = 64;

/// Whether JSON text nests arrays and objects deeper than `max`: one pass
/// over the bytes, strings skipped, before any parser recurses into them.
/// The JSON itself is checked by the parse that follows.
fn nests_deeper_than(bytes: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Why bytes are not a usable manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("not JSON ({0})")]
    NotJson(String),
    #[error("it has both \"manifests\" (an index) and \"config\"/\"layers\" (an image): ambiguous, refused")]
    Ambiguous,
    #[error("no mediaType in the body, and it is neither an image manifest, an index nor Docker schema 1")]
    NoMediaType,
    #[error("media type {0:?} cannot be sent as a header")]
    BadMediaType(String),
    #[error("its JSON nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// The body's own `mediaType` says one thing and its keys another.
    #[error("its mediaType is {declared:?}, but its content is {shape}")]
    Mislabelled {
        declared: String,
        shape: &'static str,
    },
    /// The upstream's `Content-Type` names another manifest type than the
    /// bytes are: refused, so that no upstream can relabel content.
    #[error("it was sent as {sent:?}, but its bytes are {is:?}")]
    ContentTypeMismatch { sent: String, is: String },
}

/// What a manifest is.
#[derive(Debug, Clone)]
pub enum Kind {
    Image(Box<ImageManifest>),
    Index(Box<ImageIndex>),
    /// Neither, or not as the spec writes them: the reason, and what could
    /// be read of its descriptors anyway.
    Other(String, Box<Loose>),
}

/// The descriptors of a manifest the spec's types do not accept (a missing
/// `size` or `mediaType`, no `schemaVersion`): their digests and platforms,
/// read as leniently as registries and clients do, so that such an image
/// is judged, and its blobs served, like any other.
#[derive(Debug, Clone, Default)]
pub struct Loose {
    config: Option<Digest>,
    /// Each layer's digest; `None` for one that cannot be read.
    layers: Vec<Option<Digest>>,
    /// Each entry of an index; `None` for one that cannot be read.
    manifests: Vec<Option<LooseEntry>>,
}

#[derive(Debug, Clone)]
struct LooseEntry {
    digest: Digest,
    platform: Option<Platform>,
    attestation: bool,
}

#[derive(Deserialize)]
struct LooseDesc {
    digest: String,
    #[serde(default)]
    platform: Option<LoosePlatform>,
    #[serde(default)]
    annotations: Option<std::collections::HashMap<String, String>>,
}

#[derive(Deserialize)]
struct LoosePlatform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

impl Loose {
    fn read(shape: &Shape<'_>) -> Loose {
        let desc = |raw: &RawValue| serde_json::from_str::<LooseDesc>(raw.get()).ok();
        let list = |key: &str| -> Vec<&RawValue> {
            shape
                .0
                .get(key)
                .and_then(|v| serde_json::from_str::<Vec<&RawValue>>(v.get()).ok())
                .unwrap_or_default()
        };
        Loose {
            config: shape
                .0
                .get("config")
                .and_then(|v| desc(v))
                .and_then(|d| d.digest.parse().ok()),
            layers: list("layers")
                .into_iter()
                .map(|l| desc(l).and_then(|d| d.digest.parse().ok()))
                .collect(),
            manifests: list("manifests")
                .into_iter()
                .map(|e| {
                    let d = desc(e)?;
                    let platform = d.platform.map(|p| Platform {
                        os: p.os,
                        architecture: p.architecture,
                        variant: p.variant,
                    });
                    Some(LooseEntry {
                        digest: d.digest.parse().ok()?,
                        attestation: d
                            .annotations
                            .is_some_and(|a| a.contains_key("vnd.docker.reference.type"))
                            || platform.as_ref().is_some_and(|p| p.os == "unknown"),
                        platform,
                    })
                })
                .collect(),
        }
    }
}

/// A manifest: its bytes, their digest, what it is, and the headers it is
/// served with.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
    pub kind: Kind,
    /// `Content-Type`, `Docker-Content-Digest`, `ETag`, `Content-Length`.
    pub headers: [HeaderValue; 4],
}

/// The top-level keys of a JSON object, their values not yet read: which
/// keys are present tells an index from an image.
#[derive(Deserialize)]
struct Shape<'a>(
    #[serde(borrow)] std::collections::HashMap<std::borrow::Cow<'a, str>, &'a RawValue>,
);

fn is_manifest_type(t: &str) -> bool {
    t.starts_with("application/vnd.oci.image.")
        || t.starts_with("application/vnd.docker.distribution.manifest.")
        || t.starts_with("application/vnd.oci.artifact.")
}

/// A manifest's media type, from its own bytes alone: the body's
/// `mediaType` when it has one (which must fit its keys: an index type for
/// a body with `manifests`, an image type for one with `config`/`layers`),
/// else what its keys make it. Nothing an upstream says about the bytes
/// enters here, so every upstream serving the same digest serves it with
/// the same type.
fn media_type_of(shape: &Shape<'_>, index: bool, image: bool) -> Result<String, ManifestError> {
    let declared = match shape.0.get("mediaType") {
        None => None,
        Some(v) => Some(
            serde_json::from_str::<String>(v.get())
                .map_err(|_| ManifestError::BadMediaType(v.get().escape_debug().to_string()))?,
        ),
    };
    let Some(declared) = declared else {
        return Ok(if index {
            OCI_INDEX
        } else if image {
            OCI_MANIFEST
        } else if shape.0.get("schemaVersion").is_some_and(|v| v.get() == "1") {
            if shape.0.contains_key("signatures") {
                DOCKER_V1_SIGNED
            } else {
                DOCKER_V1
            }
        } else {
            return Err(ManifestError::NoMediaType);
        }
        .to_owned());
    };
    // Visible ASCII only: what goes into a Content-Type header.
    if declared.is_empty() || !declared.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(ManifestError::BadMediaType(
            declared.escape_debug().to_string(),
        ));
    }
    let fits = if index {
        declared == OCI_INDEX || declared == DOCKER_LIST
    } else if image {
        declared == OCI_MANIFEST || declared == DOCKER_MANIFEST
    } else {
        true
    };
    if !fits {
        return Err(ManifestError::Mislabelled {
            declared,
            shape: if index {
                "an index (it lists \"manifests\")"
            } else {
                "an image manifest (it has \"config\"/\"layers\")"
            },
        });
    }
    Ok(declared)
}

impl Manifest {
    /// A manifest whose bytes hash to `digest` (the caller checked): a
    /// JSON object whose media type comes from its own bytes. A
    /// `content_type` that names another manifest type is refused; one
    /// that names none (`application/json`) is ignored.
    pub fn parse(
        digest: Digest,
        content_type: Option<&str>,
        bytes: Bytes,
    ) -> Result<Manifest, ManifestError> {
        if nests_deeper_than(&bytes, MAX_DEPTH) {
            return Err(ManifestError::TooDeep);
        }
        let shape: Shape = serde_json::from_slice(&bytes).map_err(|e| {
            ManifestError::NotJson(if e.is_data() {
                "not a JSON object".to_owned()
            } else {
                e.to_string()
            })
        })?;
        let has = |k: &str| shape.0.contains_key(k);
        let index = has("manifests");
        let image = has("config") || has("layers");
        if index && image {
            return Err(ManifestError::Ambiguous);
        }
        let media_type = media_type_of(&shape, index, image)?;
        if let Some(sent) = content_type.filter(|t| is_manifest_type(t)) {
            if sent != media_type {
                return Err(ManifestError::ContentTypeMismatch {
                    sent: sent.to_owned(),
                    is: media_type,
                });
            }
        }
        let other = |why: String| Kind::Other(why, Box::new(Loose::read(&shape)));
        let kind = if index {
            match serde_json::from_slice::<ImageIndex>(&bytes) {
                Ok(i) => Kind::Index(Box::new(i)),
                Err(e) => other(format!("not an index as the spec writes it: {e}")),
            }
        } else if image {
            match serde_json::from_slice::<ImageManifest>(&bytes) {
                Ok(m) => Kind::Image(Box::new(m)),
                Err(e) => other(format!("not an image manifest as the spec writes it: {e}")),
            }
        } else {
            other("neither an image manifest nor an index".into())
        };
        // `media_type_of` let only header-safe text through.
        let content_type = HeaderValue::from_str(&media_type)
            .map_err(|_| ManifestError::BadMediaType(media_type.escape_debug().to_string()))?;
        let digest_text = digest.to_string();
        let headers = [
            content_type,
            HeaderValue::from_str(&digest_text).expect("a digest is a header value"),
            HeaderValue::from_str(&format!("\"{digest_text}\"")).expect("a quoted digest too"),
            HeaderValue::from(bytes.len()),
        ];
        Ok(Manifest {
            digest,
            media_type,
            bytes,
            kind,
            headers,
        })
    }

    /// A manifest read back from the store (or a bundle): its bytes are
    /// all there is to it.
    pub fn stored(digest: Digest, bytes: Bytes) -> Result<Manifest, ManifestError> {
        Manifest::parse(digest, None, bytes)
    }

    pub fn image(&self) -> Option<&ImageManifest> {
        match &self.kind {
            Kind::Image(m) => Some(m),
            _ => None,
        }
    }

    pub fn index(&self) -> Option<&ImageIndex> {
        match &self.kind {
            Kind::Index(i) => Some(i),
            _ => None,
        }
    }

    /// The config and layer digests an image manifest references.
    pub fn referenced_blobs(&self) -> Vec<Digest> {
        match &self.kind {
            Kind::Image(m) => std::iter::once(m.config())
                .chain(m.layers())
                .filter_map(digest_of)
                .collect(),
            Kind::Index(_) => Vec::new(),
            Kind::Other(_, l) => l
                .config
                .iter()
                .chain(l.layers.iter().flatten())
                .copied()
                .collect(),
        }
    }

    /// [`Manifest::referenced_blobs`] with the size each descriptor gives
    /// (none for descriptors read leniently).
    pub fn referenced_blob_sizes(&self) -> Vec<(Digest, Option<u64>)> {
        match &self.kind {
            Kind::Image(m) => std::iter::once(m.config())
                .chain(m.layers())
                .filter_map(|d| Some((digest_of(d)?, Some(d.size()))))
                .collect(),
            _ => self
                .referenced_blobs()
                .into_iter()
                .map(|d| (d, None))
                .collect(),
        }
    }

    /// The manifests an index lists, or `None` when this is not an index.
    pub fn index_children(&self) -> Option<Vec<Digest>> {
        match &self.kind {
            Kind::Index(i) => Some(i.manifests().iter().filter_map(digest_of).collect()),
            Kind::Other(_, l) if !l.manifests.is_empty() => {
                Some(l.manifests.iter().flatten().map(|e| e.digest).collect())
            }
            _ => None,
        }
    }

    /// Whether the manifest lists manifests (an index, or what reads as one).
    pub fn is_index(&self) -> bool {
        match &self.kind {
            Kind::Index(_) => true,
            Kind::Other(_, l) => !l.manifests.is_empty(),
            Kind::Image(_) => false,
        }
    }

    /// The layer digests of an image manifest, in order.
    pub fn layers(&self) -> Result<Vec<Digest>, String> {
        match &self.kind {
            Kind::Image(m) => m
                .layers()
                .iter()
                .map(|l| {
                    digest_of(l).ok_or_else(|| format!("bad digest {:?}", l.digest().to_string()))
                })
                .collect(),
            Kind::Index(_) => Err("an index, not an image manifest".into()),
            Kind::Other(why, l) if l.layers.is_empty() && l.config.is_none() => Err(why.clone()),
            Kind::Other(_, l) => l
                .layers
                .iter()
                .map(|d| d.ok_or_else(|| "a layer without a readable digest".to_owned()))
                .collect(),
        }
    }

    /// The config blob of an image manifest.
    pub fn config(&self) -> Option<Digest> {
        match &self.kind {
            Kind::Image(m) => digest_of(m.config()),
            Kind::Other(_, l) => l.config,
            Kind::Index(_) => None,
        }
    }

    /// The image manifests an index lists, with the platform it gives each.
    /// Entries that are not images (buildx attestations, `unknown/unknown`)
    /// are left out.
    pub fn platform_manifests(&self) -> Result<Vec<(Digest, Option<Platform>)>, String> {
        if let Kind::Other(_, l) = &self.kind {
            return l
                .manifests
                .iter()
                .filter(|e| !e.as_ref().is_some_and(|e| e.attestation))
                .map(|e| {
                    e.as_ref()
                        .map(|e| (e.digest, e.platform.clone()))
                        .ok_or_else(|| "an index entry without a readable digest".to_owned())
                })
                .collect();
        }
        let Some(index) = self.index() else {
            return Err("not an index".into());
        };
        let mut out = Vec::new();
        for e in index.manifests() {
            let platform = e.platform().as_ref().map(Platform::of);
            let attestation = e
                .annotations()
                .as_ref()
                .is_some_and(|a| a.contains_key("vnd.docker.reference.type"))
                || platform.as_ref().is_some_and(|p| p.os == "unknown");
            if !attestation {
                let d = digest_of(e)
                    .ok_or_else(|| format!("bad digest {:?}", e.digest().to_string()))?;
                out.push((d, platform));
            }
        }
        Ok(out)
    }

    /// The layers of an image manifest, as (media type, digest, size).
    pub fn layer_descriptors(&self) -> impl Iterator<Item = &Descriptor> {
        self.image().into_iter().flat_map(|m| m.layers().iter())
    }

    /// The artifact type the manifest declares, if any.
    pub fn artifact_type(&self) -> Option<String> {
        let t = match &self.kind {
            Kind::Image(m) => m.artifact_type().as_ref(),
            Kind::Index(i) => i.artifact_type().as_ref(),
            Kind::Other(..) => None,
        };
        t.map(|t| t.to_string())
    }

    /// Approximate bytes held in memory, for cache weights.
    pub fn weight(&self) -> usize {
        // The typed value takes a few times the JSON it came from.
        self.bytes.len() * 4 + 256
    }
}

/// Our digest of a descriptor's, when it is a well-formed sha256.
pub fn digest_of(d: &Descriptor) -> Option<Digest> {
    let digest = d.digest();
    if *digest.algorithm() != DigestAlgorithm::Sha256 {
        return None;
    }
    Digest::from_hex(digest.digest())
}

/// An image's platform, as an index lists it or a config states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    fn of(p: &oci_spec::image::Platform) -> Platform {
        Platform {
            os: p.os().to_string(),
            architecture: p.architecture().to_string(),
            variant: p.variant().clone(),
        }
    }

    /// The platform an image config blob states (`os`, `architecture`,
    /// `variant`; the rest of the config is not read).
    pub fn from_config(config: &[u8]) -> Option<Platform> {
        #[derive(Deserialize)]
        struct View {
            os: String,
            architecture: String,
            #[serde(default)]
            variant: Option<String>,
        }
        let v: View = serde_json::from_slice(config).ok()?;
        Some(Platform {
            os: v.os,
            architecture: v.architecture,
            variant: v.variant,
        })
    }

    /// Same OS and architecture, and the same variant when both name one.
    pub fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && match (&self.variant, &other.variant) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(ct: Option<&str>, bytes: &'static [u8]) -> Result<Manifest, ManifestError> {
        Manifest::parse(Digest::of(bytes), ct, Bytes::from_static(bytes))
    }

    #[test]
    fn media_type_comes_from_the_bytes_and_a_content_type_must_agree() {
        let oci = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;
        assert_eq!(
            parse(Some(OCI_MANIFEST), oci).unwrap().media_type,
            OCI_MANIFEST
        );
        // A generic Content-Type says nothing about the manifest: ignored.
        assert_eq!(
            parse(Some("text/plain"), oci).unwrap().media_type,
            OCI_MANIFEST
        );
        assert_eq!(parse(None, oci).unwrap().media_type, OCI_MANIFEST);
        // Another manifest type is a relabelling: refused.
        assert_eq!(
            parse(Some(DOCKER_MANIFEST), oci).unwrap_err(),
            ManifestError::ContentTypeMismatch {
                sent: DOCKER_MANIFEST.into(),
                is: OCI_MANIFEST.into()
            }
        );
        assert!(matches!(
            parse(Some(OCI_INDEX), oci),
            Err(ManifestError::ContentTypeMismatch { .. })
        ));
        // Without a mediaType, the keys decide.
        let index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert_eq!(parse(None, index).unwrap().media_type, OCI_INDEX);
        assert!(parse(Some(OCI_MANIFEST), index).is_err());
        let v1 = br#"{"schemaVersion":1,"name":"a","tag":"1","fsLayers":[],"signatures":[]}"#;
        assert_eq!(parse(None, v1).unwrap().media_type, DOCKER_V1_SIGNED);
        assert!(parse(None, b"<html>").is_err());
        assert!(parse(None, b"[1]").is_err());
        assert_eq!(
            parse(None, br#"{"a":1}"#).unwrap_err(),
            ManifestError::NoMediaType
        );
    }

    #[test]
    fn json_nested_too_deep_is_refused_before_it_is_parsed() {
        let at = |depth: usize| {
            format!(
                r#"{{"schemaVersion":2,"config":{{}},"layers":[],"x":{}1{}}}"#,
                "[".repeat(depth - 1),
                "]".repeat(depth - 1)
            )
        };
        let ok = Bytes::from(at(MAX_DEPTH));
        assert!(Manifest::parse(Digest::of(&ok), None, ok).is_ok());
        let deep = Bytes::from(at(MAX_DEPTH + 1));
        assert_eq!(
            Manifest::parse(Digest::of(&deep), None, deep).unwrap_err(),
            ManifestError::TooDeep
        );
        // Brackets inside strings, escaped quotes included, are text.
        let text = format!(r#"{{"a":"\"{}","layers":[]}}"#, "[".repeat(500));
        assert!(!nests_deeper_than(text.as_bytes(), MAX_DEPTH));
    }

    #[test]
    fn a_body_whose_media_type_contradicts_its_keys_is_refused() {
        let image_as_index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","config":{},"layers":[]}"#;
        assert!(matches!(
            parse(None, image_as_index),
            Err(ManifestError::Mislabelled { .. })
        ));
        let index_as_image = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","manifests":[]}"#;
        assert!(matches!(
            parse(None, index_as_image),
            Err(ManifestError::Mislabelled { .. })
        ));
        let list = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}"#;
        assert_eq!(
            parse(Some(DOCKER_LIST), list).unwrap().media_type,
            DOCKER_LIST
        );
        assert!(matches!(
            parse(None, br#"{"mediaType":7,"layers":[]}"#),
            Err(ManifestError::BadMediaType(_))
        ));
    }

    #[test]
    fn an_index_that_is_also_an_image_is_refused() {
        let both = br#"{"schemaVersion":2,"manifests":[],"layers":[]}"#;
        assert_eq!(parse(None, both).unwrap_err(), ManifestError::Ambiguous);
    }

    #[test]
    fn only_json_objects_are_manifests_and_a_null_key_is_still_a_key() {
        assert!(parse(Some(OCI_MANIFEST), b"[]").is_err());
        let sneaky = br#"{"schemaVersion":2,"manifests":null,"layers":[]}"#;
        assert_eq!(parse(None, sneaky).unwrap_err(), ManifestError::Ambiguous);
    }

    #[test]
    fn descriptors_the_spec_types_refuse_are_still_read() {
        // No `size`, no `mediaType`: oci-spec refuses the descriptors, and
        // the image is still judged and its blobs served like any other.
        let layer = Digest::of(b"layer");
        let config = Digest::of(b"config");
        let text = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{config}"}},"layers":[{{"digest":"{layer}"}}]}}"#
        );
        let bytes = Bytes::from(text);
        let m = Manifest::parse(Digest::of(&bytes), Some(OCI_MANIFEST), bytes).unwrap();
        assert!(matches!(m.kind, Kind::Other(..)));
        assert_eq!(m.referenced_blobs(), [config, layer]);
        assert_eq!(m.layers().unwrap(), [layer]);
        let child = Digest::of(b"child");
        let text = format!(
            r#"{{"manifests":[{{"digest":"{child}","platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        let bytes = Bytes::from(text);
        let i = Manifest::parse(Digest::of(&bytes), None, bytes).unwrap();
        assert!(i.is_index());
        assert_eq!(i.index_children().unwrap(), [child]);
        assert_eq!(i.platform_manifests().unwrap()[0].0, child);
    }

    #[test]
    fn a_media_type_that_is_no_header_is_refused() {
        let bad = b"{\"schemaVersion\":2,\"mediaType\":\"application/x\\u0001\",\"layers\":[]}";
        assert!(matches!(
            parse(None, bad),
            Err(ManifestError::BadMediaType(_))
        ));
        // Neither an index nor an image, so any type would fit its keys.
        let other = b"{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\\r\\nX-A: b\",\"blobs\":[]}";
        assert!(matches!(
            parse(None, other),
            Err(ManifestError::BadMediaType(_))
        ));
    }

    #[test]
    fn images_list_their_blobs_and_indexes_their_platforms() {
        let layer = Digest::of(b"layer");
        let config = Digest::of(b"config");
        let image = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":6}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":5}}]}}"#
        );
        let bytes = Bytes::from(image);
        let m = Manifest::parse(Digest::of(&bytes), None, bytes).unwrap();
        assert_eq!(m.referenced_blobs(), [config, layer]);
        assert_eq!(m.layers().unwrap(), [layer]);
        assert_eq!(m.config(), Some(config));
        assert!(m.index_children().is_none());
        let child = Digest::of(b"child");
        let att = Digest::of(b"attestation");
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[
            {{"mediaType":"{OCI_MANIFEST}","digest":"{child}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{att}","size":1,"platform":{{"os":"unknown","architecture":"unknown"}}}}]}}"#
        );
        let bytes = Bytes::from(index);
        let i = Manifest::parse(Digest::of(&bytes), None, bytes).unwrap();
        assert_eq!(i.index_children().unwrap(), [child, att]);
        let p = i.platform_manifests().unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, child);
        assert_eq!(p[0].1.as_ref().unwrap().to_string(), "linux/arm64/v8");
    }
}

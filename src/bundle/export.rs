//! `pullgate export`: approved images, with everything their signatures
//! need, into one bundle.
//!
//! Each reference is decided by the exporting site's own pipeline (the one
//! `pullgate verify` runs, on the server's store, read only): only what it
//! approves leaves. Then every manifest (all platforms), every blob, and
//! the signature artifacts of each manifest (the `.sig` tag, referrers, and
//! the site's local approvals, which travel as cosign signatures in the
//! `.sig` manifest) are gathered. Manifests and signature documents are
//! small and held in memory; blobs are streamed into the tar from the
//! store, or from the upstream, hashed on the way, so memory stays flat
//! whatever their size. The tar is written beside its destination and
//! renamed into place only when complete.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::StreamExt;
use http::StatusCode;
use serde_json::json;

use super::progress::Progress;
use super::{Blob, BundleManifest, Entry, FORMAT, MANIFEST_FILE, SIGNATURE_FILE};
use crate::content::{Accept, Lookup, Small};
use crate::keys::PrivateKey;
use crate::oci::manifest::{OCI_INDEX, OCI_MANIFEST};
use crate::oci::names::{Digest, Reference, RepoName};
use crate::oci::Manifest;
use crate::pipeline::explain::{Outcome, Pins};
use crate::remote::{BodyStream, Endpoint, Remote, Request};
use crate::store::Source;
use crate::verify::cosign;
use crate::{App, Config};

/// Largest signature document (manifest, referrers list) exported.
const MAX_SMALL: u64 = 1024 * 1024;

/// Why an export did not write a bundle.
#[derive(Debug)]
pub enum ExportError {
    /// References the policy does not approve, each with why.
    Denied(Vec<(String, String)>),
    /// Anything else: an upstream, the store, the output file.
    Failed(String),
}

impl std::fmt::Display for ExportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExportError::Denied(d) => {
                write!(
                    f,
                    "{} of the references may not leave this site; nothing was written:",
                    d.len()
                )?;
                for (r, why) in d {
                    write!(f, "\n  {r}: {why}")?;
                }
                Ok(())
            }
            ExportError::Failed(why) => f.write_str(why),
        }
    }
}

fn failed(e: impl std::fmt::Display) -> ExportError {
    ExportError::Failed(e.to_string())
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub images: usize,
    pub artifacts: usize,
    pub blobs: usize,
    pub bytes: u64,
    pub signed: bool,
}

/// A blob to stream: where it is fetched from when the store lacks it.
struct Streamed {
    digest: Digest,
    size: u64,
    remote: Arc<dyn Remote>,
    repo: RepoName,
}

/// Everything the bundle will hold.
#[derive(Default)]
struct Plan {
    images: Vec<Entry>,
    artifacts: Vec<Entry>,
    /// Manifests and signature payloads, in memory: (bytes, media type of a manifest).
    small: BTreeMap<Digest, (Bytes, Option<String>)>,
    streamed: Vec<Streamed>,
    seen: HashSet<Digest>,
}

impl Plan {
    fn add_manifest(&mut self, m: &Manifest) {
        if self.seen.insert(m.digest) {
            self.small
                .insert(m.digest, (m.bytes.clone(), Some(m.media_type.clone())));
        }
    }

    fn add_small(&mut self, bytes: Bytes) {
        let d = Digest::of(&bytes);
        if self.seen.insert(d) {
            self.small.insert(d, (bytes, None));
        }
    }

    fn add_streamed(&mut self, s: Streamed) {
        if self.seen.insert(s.digest) {
            self.streamed.push(s);
        }
    }

    fn blobs(&self) -> Vec<Blob> {
        let mut out: Vec<Blob> = self
            .small
            .iter()
            .map(|(d, (b, mt))| Blob {
                digest: *d,
                size: b.len() as u64,
                manifest: mt.clone(),
            })
            .collect();
        out.extend(self.streamed.iter().map(|s| Blob {
            digest: s.digest,
            size: s.size,
            manifest: None,
        }));
        out
    }
}

/// Exports `refs` (`NAME[:TAG]` or `NAME@DIGEST`) into a bundle at `out`,
/// signed with `key` when given.
pub async fn export(
    config: Config,
    refs: &[String],
    out: &Path,
    key: Option<&PrivateKey>,
) -> Result<Exported, ExportError> {
    let max = config.server.max_manifest_size;
    let app = App::for_command(config, Pins::Honour).map_err(failed)?;
    // The policy first, for every reference: a denial writes nothing.
    let mut approved = Vec::new();
    let mut denied = Vec::new();
    for r in refs {
        match app.explain(r).await {
            Ok(e) if e.outcome == Outcome::Allowed => match e.digest {
                Some(d) => approved.push((e.served, e.reference, d)),
                None => denied.push((r.clone(), "no manifest was decided".to_owned())),
            },
            Ok(e) => {
                let reasons: Vec<String> = e.reasons.iter().map(|r| r.to_string()).collect();
                denied.push((
                    r.clone(),
                    format!("denied by policy ({})", reasons.join(", ")),
                ));
            }
            Err((why, _)) => denied.push((r.clone(), format!("no verdict: {why}"))),
        }
    }
    if !denied.is_empty() {
        return Err(ExportError::Denied(denied));
    }

    let mut plan = Plan::default();
    for (served, reference, digest) in &approved {
        let name: RepoName = served.parse().map_err(failed)?;
        let (route, remote) = app.route_remote(&name).map_err(ExportError::Failed)?;
        let repo = route.repo.clone();
        let top = app
            .content
            .manifest(&remote, &repo, *digest, Accept::Any, max, Lookup::Internal)
            .await
            .map_err(failed)?;
        let shown = match reference {
            Reference::Tag(t) => format!("{served}:{t}"),
            Reference::Digest(d) => format!("{served}@{d}"),
        };
        plan.images.push(Entry {
            reference: shown,
            digest: *digest,
            media_type: top.media_type.clone(),
            size: top.bytes.len() as u64,
        });
        let mut todo = vec![top];
        while let Some(m) = todo.pop() {
            plan.add_manifest(&m);
            artifacts(&app, &remote, &repo, served, &m.digest, &mut plan).await?;
            if let Some(children) = m.index_children() {
                for c in children {
                    if plan.seen.contains(&c) {
                        continue;
                    }
                    let child = app
                        .content
                        .manifest(&remote, &repo, c, Accept::Any, max, Lookup::Internal)
                        .await
                        .map_err(failed)?;
                    todo.push(child);
                }
            } else {
                blobs_of(&app, &remote, &repo, &m, &mut plan).await?;
            }
        }
    }
    write(&app, plan, out, key).await
}

/// The config and layers of an image manifest, to be streamed.
async fn blobs_of(
    app: &Arc<App>,
    remote: &Arc<dyn Remote>,
    repo: &RepoName,
    m: &Manifest,
    plan: &mut Plan,
) -> Result<(), ExportError> {
    for (d, size) in m.referenced_blob_sizes() {
        let size = match size {
            Some(s) => s,
            None => blob_size(app, remote, repo, d).await?,
        };
        plan.add_streamed(Streamed {
            digest: d,
            size,
            remote: remote.clone(),
            repo: repo.clone(),
        });
    }
    Ok(())
}

async fn blob_size(
    app: &Arc<App>,
    remote: &Arc<dyn Remote>,
    repo: &RepoName,
    d: Digest,
) -> Result<u64, ExportError> {
    if let Some(h) = app.content.open_blob(&d).await.map_err(failed)? {
        return Ok(h.size);
    }
    app.content
        .remote_blob_size(remote, repo, d)
        .await
        .map_err(failed)?
        .ok_or_else(|| {
            failed(format!(
                "upstream {} gives no size for blob {d}",
                remote.name()
            ))
        })
}

/// A signature document of `repo` by tag or digest: its bytes, or `None`
/// when the remote has none.
async fn small(
    app: &Arc<App>,
    remote: &Arc<dyn Remote>,
    repo: &RepoName,
    endpoint: Endpoint<'_>,
    accept: &'static str,
) -> Result<Option<Bytes>, ExportError> {
    let what = endpoint.to_string();
    match app
        .content
        .small(&**remote, repo, endpoint, Some(accept), None, MAX_SMALL)
        .await
        .map_err(failed)?
    {
        Small::Body(b) => Ok(Some(b)),
        Small::Status(StatusCode::NOT_FOUND) => Ok(None),
        Small::Status(
            s @ (StatusCode::BAD_REQUEST
            | StatusCode::METHOD_NOT_ALLOWED
            | StatusCode::NOT_IMPLEMENTED),
        ) if what.starts_with("referrers/") => {
            tracing::debug!(%repo, "no referrers API ({s})");
            Ok(None)
        }
        Small::Status(s) => Err(failed(format!(
            "upstream {} answered {s} for {repo} {what}",
            remote.name()
        ))),
        Small::TooLarge => Err(failed(format!("{repo} {what} is over {MAX_SMALL} bytes"))),
    }
}

fn parse(bytes: Bytes, what: &str) -> Result<Manifest, ExportError> {
    Manifest::parse(Digest::of(&bytes), None, bytes)
        .map_err(|e| failed(format!("{what} is not a usable manifest: {e}")))
}

/// The signature artifacts of `digest`: its `.sig` manifest (with the
/// site's local approvals added as signature layers), and its referrers
/// with the index that lists them (as the `sha256-<hex>` fallback tag).
async fn artifacts(
    app: &Arc<App>,
    remote: &Arc<dyn Remote>,
    repo: &RepoName,
    served: &str,
    digest: &Digest,
    plan: &mut Plan,
) -> Result<(), ExportError> {
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
    let sig_tag = cosign::signature_tag(digest);
    let legacy = small(app, remote, repo, Endpoint::ManifestTag(&sig_tag), accept).await?;
    let approvals = app
        .store
        .approvals(digest)
        .await
        .map_err(|e| failed(format!("cannot read the approvals of {digest}: {e}")))?;
    let mut approved = Vec::new();
    for a in &approvals {
        let Ok(a) = serde_json::from_slice::<crate::verify::approvals::Approval>(a) else {
            continue;
        };
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        if let (Ok(p), Ok(s)) = (b64.decode(a.payload.trim()), b64.decode(a.signature.trim())) {
            approved.push((p, s));
        }
    }
    let sig_manifest = match (legacy, approved.is_empty()) {
        (None, true) => None,
        (Some(b), true) => Some(parse(b, &format!("{served}:{sig_tag}"))?),
        (None, false) => {
            let (m, config) = cosign::signature_manifest(&approved);
            plan.add_small(Bytes::from(config));
            Some(parse(Bytes::from(m), "the approvals' signature manifest")?)
        }
        (Some(b), false) => {
            // The upstream's layers stay as they are (annotations and all);
            // the approvals are appended.
            let mut v: serde_json::Value = serde_json::from_slice(&b)
                .map_err(|e| failed(format!("{served}:{sig_tag} is not JSON: {e}")))?;
            let (extra, _) = cosign::signature_manifest(&approved);
            let extra: serde_json::Value = serde_json::from_slice(&extra).map_err(failed)?;
            if let (Some(layers), Some(more)) =
                (v["layers"].as_array_mut(), extra["layers"].as_array())
            {
                layers.extend(more.iter().cloned());
            }
            Some(parse(
                Bytes::from(serde_json::to_vec(&v).map_err(failed)?),
                &format!("{served}:{sig_tag}"),
            )?)
        }
    };
    for (p, _) in &approved {
        plan.add_small(Bytes::from(p.clone()));
    }
    if let Some(m) = sig_manifest {
        plan.artifacts.push(Entry {
            reference: format!("{served}:{sig_tag}"),
            digest: m.digest,
            media_type: m.media_type.clone(),
            size: m.bytes.len() as u64,
        });
        plan.add_manifest(&m);
        blobs_of(app, remote, repo, &m, plan).await?;
    }

    // Referrers: the API, else the fallback tag.
    let listed = match small(app, remote, repo, Endpoint::Referrers(digest), OCI_INDEX).await? {
        Some(b) => Some(b),
        None => {
            let tag = cosign::referrers_tag(digest);
            small(app, remote, repo, Endpoint::ManifestTag(&tag), OCI_INDEX).await?
        }
    };
    let Some(listed) = listed else { return Ok(()) };
    let index = parse(listed, &format!("the referrers of {served}@{digest}"))?;
    let Some(referrers) = index.index_children() else {
        return Ok(());
    };
    if referrers.is_empty() {
        return Ok(());
    }
    for r in referrers {
        let Some(b) = small(
            app,
            remote,
            repo,
            Endpoint::Manifest(&Reference::Digest(r)),
            OCI_MANIFEST,
        )
        .await?
        else {
            return Err(failed(format!(
                "referrer {r} of {served}@{digest} is listed but missing"
            )));
        };
        if Digest::of(&b) != r {
            return Err(failed(format!(
                "upstream {} sent bytes for referrer {r} that do not hash to it",
                remote.name()
            )));
        }
        let m = parse(b, &format!("referrer {r}"))?;
        plan.add_manifest(&m);
        blobs_of(app, remote, repo, &m, plan).await?;
    }
    plan.artifacts.push(Entry {
        reference: format!("{served}:{}", cosign::referrers_tag(digest)),
        digest: index.digest,
        media_type: index.media_type.clone(),
        size: index.bytes.len() as u64,
    });
    plan.add_manifest(&index);
    Ok(())
}

/// Writes the tar: bundle manifest, signature, layout, blobs.
async fn write(
    app: &Arc<App>,
    plan: Plan,
    out: &Path,
    key: Option<&PrivateKey>,
) -> Result<Exported, ExportError> {
    let now = SystemTime::now();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let manifest = BundleManifest {
        pullgate_bundle: FORMAT,
        created: humantime::format_rfc3339_seconds(now).to_string(),
        exporter: format!("pullgate {} on {}", env!("CARGO_PKG_VERSION"), host.trim()),
        images: plan.images.clone(),
        artifacts: plan.artifacts.clone(),
        blobs: plan.blobs(),
    };
    let manifest_bytes = serde_json::to_vec_pretty(&manifest).map_err(failed)?;
    let signature = key.map(|k| super::sign(&manifest_bytes, k));
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifest.images.iter().chain(&manifest.artifacts).map(|e| json!({
            "mediaType": e.media_type,
            "digest": e.digest.to_string(),
            "size": e.size,
            "annotations": {"org.opencontainers.image.ref.name": e.reference},
        })).collect::<Vec<_>>(),
    });
    let index_bytes = serde_json::to_vec(&index).map_err(failed)?;
    let total: u64 = manifest.blobs.iter().map(|b| b.size).sum();
    let mtime = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);

    // The streamed blobs' readers, opened here (async) and read on the
    // blocking thread that writes the tar.
    let handle = tokio::runtime::Handle::current();
    let partial = partial_path(out);
    let app = app.clone();
    let out_owned = out.to_path_buf();
    let counts = (
        plan.images.len(),
        plan.artifacts.len(),
        manifest.blobs.len(),
    );
    let signed = signature.is_some();
    let result = tokio::task::spawn_blocking(move || -> Result<(), ExportError> {
        let file = File::create(&partial)
            .map_err(|e| failed(format!("cannot create {}: {e}", partial.display())))?;
        let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
        let mut progress = Progress::new("exporting", manifest.blobs.len(), total);
        let put =
            |tar: &mut tar::Builder<BufWriter<File>>, name: &str, size: u64, r: &mut dyn Read| {
                let mut h = tar::Header::new_gnu();
                h.set_size(size);
                h.set_mode(0o644);
                h.set_mtime(mtime);
                h.set_entry_type(tar::EntryType::Regular);
                tar.append_data(&mut h, name, r).map_err(|e| {
                    failed(format!("cannot write {name} to {}: {e}", partial.display()))
                })
            };
        put(
            &mut tar,
            MANIFEST_FILE,
            manifest_bytes.len() as u64,
            &mut &manifest_bytes[..],
        )?;
        if let Some(s) = &signature {
            put(&mut tar, SIGNATURE_FILE, s.len() as u64, &mut &s[..])?;
        }
        let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
        put(
            &mut tar,
            "oci-layout",
            layout.len() as u64,
            &mut &layout[..],
        )?;
        put(
            &mut tar,
            "index.json",
            index_bytes.len() as u64,
            &mut &index_bytes[..],
        )?;
        for (d, (b, _)) in &plan.small {
            put(&mut tar, &super::blob_path(d), b.len() as u64, &mut &b[..])?;
            progress.bytes(b.len() as u64);
            progress.item();
        }
        for s in &plan.streamed {
            let source = handle.block_on(open(&app, s))?;
            let mut r = Checked {
                inner: source,
                hasher: crate::oci::names::Hasher::new(),
                left: s.size,
                progress: &mut progress,
            };
            put(&mut tar, &super::blob_path(&s.digest), s.size, &mut r)?;
            let (left, got) = (r.left, std::mem::take(&mut r.hasher).finish());
            if left != 0 {
                return Err(failed(format!(
                    "blob {} ended {left} bytes short of its {} bytes",
                    s.digest, s.size
                )));
            }
            if got != s.digest {
                return Err(failed(format!(
                    "blob {} from upstream {} hashes to {got}: not exported",
                    s.digest,
                    s.remote.name()
                )));
            }
            progress.item();
        }
        progress.finish();
        let file = tar
            .into_inner()
            .map_err(failed)?
            .into_inner()
            .map_err(|e| failed(e.error().to_string()))?;
        file.sync_all().map_err(failed)?;
        std::fs::rename(&partial, &out_owned).map_err(|e| {
            failed(format!(
                "cannot rename {} to {}: {e}",
                partial.display(),
                out_owned.display()
            ))
        })?;
        Ok(())
    })
    .await
    .map_err(failed)?;
    if let Err(e) = result {
        let _ = std::fs::remove_file(partial_path(out));
        return Err(e);
    }
    Ok(Exported {
        images: counts.0,
        artifacts: counts.1,
        blobs: counts.2,
        bytes: total,
        signed,
    })
}

fn partial_path(out: &Path) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// A blob's bytes: the store's file, else the upstream's body.
async fn open(app: &Arc<App>, s: &Streamed) -> Result<Box<dyn Read + Send>, ExportError> {
    if let Some(h) = app.content.open_blob(&s.digest).await.map_err(failed)? {
        return Ok(match h.source {
            Source::File(f) => Box::new(FileAt {
                f,
                at: 0,
                _guard: h.guard,
            }),
            Source::Memory(_) => {
                let b = crate::content::read_whole(&h).await.map_err(failed)?;
                Box::new(io::Cursor::new(b))
            }
        });
    }
    let resp = s
        .remote
        .send(Request::get(&s.repo, Endpoint::Blob(&s.digest)))
        .await
        .map_err(failed)?;
    if resp.status != StatusCode::OK {
        return Err(failed(format!(
            "upstream {} answered {} for blob {} of {}",
            s.remote.name(),
            resp.status,
            s.digest,
            s.repo
        )));
    }
    Ok(Box::new(BodyRead {
        handle: tokio::runtime::Handle::current(),
        body: resp.body,
        piece: Bytes::new(),
    }))
}

/// A stored file read from the start with positioned reads.
struct FileAt {
    f: Arc<File>,
    at: u64,
    _guard: crate::store::ReadGuard,
}

impl Read for FileAt {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(&*self.f, buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// An upstream body read on a blocking thread.
struct BodyRead {
    handle: tokio::runtime::Handle,
    body: BodyStream,
    piece: Bytes,
}

impl Read for BodyRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.piece.is_empty() {
            match self.handle.block_on(self.body.next()) {
                Some(Ok(b)) => self.piece = b,
                Some(Err(e)) => return Err(io::Error::other(format!("upstream body: {e}"))),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.piece.len());
        buf[..n].copy_from_slice(&self.piece.split_to(n));
        Ok(n)
    }
}

/// Reads exactly the announced size (never more: the tar header is
/// written), hashing what passes.
struct Checked<'p> {
    inner: Box<dyn Read + Send>,
    hasher: crate::oci::names::Hasher,
    left: u64,
    progress: &'p mut Progress,
}

impl Read for Checked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let max = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the blob ended {} bytes early", self.left),
            ));
        }
        self.hasher.update(&buf[..n]);
        self.left -= n as u64;
        self.progress.bytes(n as u64);
        Ok(n)
    }
}

//! `pullgate import`: a bundle into the store, verified again here.
//!
//! The tar is read once, front to back, and trusted for nothing:
//!
//! 1. the bundle manifest comes first, and its signature is checked against
//!    `[bundles] signed_by` before anything else is read;
//! 2. every other entry must be one the bundle manifest lists (a plain file
//!    at `oci-layout`, `index.json` or `blobs/sha256/<hex>`, at the size
//!    listed, once): links, devices, paths that climb out and duplicates
//!    are refused by name;
//! 3. each blob is hashed as it is staged (into a store of its own under
//!    `imports/<id>/`), so a tampered one is refused;
//! 4. every image is decided again by THIS site's pipeline, on the staged
//!    content alone (its upstreams all offline), never on the exporter's
//!    verdict; tags that would move back to an older bundle's digest are
//!    refused unless `--allow-rollback`;
//! 5. only when all of it passed is the commit record written, and the
//!    import applied (see [`crate::store::imports`]): by the running server,
//!    or here when none runs.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;

use super::progress::Progress;
use super::{
    BundleManifest, FORMAT, MANIFEST_FILE, MAX_INDEX, MAX_MANIFEST_FILE, MAX_SIGNATURE,
    SIGNATURE_FILE,
};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::oci::names::{Digest, Reference};
use crate::oci::Manifest;
use crate::pipeline::explain::Outcome;
use crate::route::Router;
use crate::store::imports::{self, Commit, CommitBlob, CommitTag};
use crate::store::{FsStore, Store, TagKey, TagRecord, WriteError};
use crate::App;

/// How long an import waits for the running server to apply it.
const SERVER_WAIT: Duration = Duration::from_secs(60);

/// Why an import made nothing visible.
#[derive(Debug)]
pub enum ImportError {
    /// The bundle itself is bad (signature, tar, entries, hashes).
    Bad(String),
    /// Images this site's policy refuses, each with why.
    Refused(Vec<(String, String)>),
    /// Anything else (the store, another import running).
    Failed(String),
}

impl std::fmt::Display for ImportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImportError::Bad(why) => write!(f, "bad bundle, nothing imported: {why}"),
            ImportError::Refused(r) => {
                write!(
                    f,
                    "{} of the bundle's images are refused here; nothing imported:",
                    r.len()
                )?;
                for (image, why) in r {
                    write!(f, "\n  {image}: {why}")?;
                }
                Ok(())
            }
            ImportError::Failed(why) => f.write_str(why),
        }
    }
}

fn bad(why: impl Into<String>) -> ImportError {
    ImportError::Bad(why.into())
}

fn failed(e: impl std::fmt::Display) -> ImportError {
    ImportError::Failed(e.to_string())
}

/// Who made the import visible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppliedBy {
    /// The server running on the store, which serves it now.
    Server,
    /// This command: no server was running.
    Import,
    /// Committed, but the running server did not apply it in time; it will.
    Pending,
}

/// What an import brought.
#[derive(Debug, Clone)]
pub struct Imported {
    pub images: Vec<String>,
    pub blobs: usize,
    pub bytes: u64,
    /// The `[bundles]` key that signed it; `None` for an unsigned bundle
    /// (accepted only without `[bundles]`).
    pub signed_by: Option<String>,
    pub applied_by: AppliedBy,
}

/// Removes an import's staging directory unless it was committed.
struct Staging {
    dir: PathBuf,
    committed: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Imports the bundle at `path` into the store of `config`.
pub async fn import(
    config: Config,
    path: &Path,
    allow_rollback: bool,
) -> Result<Imported, ImportError> {
    if let Some(s3) = &config.storage.s3 {
        // Its commit records and renames are the local directory's; the
        // bucket has neither yet.
        return Err(failed(format!(
            "importing into replicas that share a bucket ({}) is not supported yet; import into a pullgate without [storage.s3]",
            s3.describe()
        )));
    }
    let root = config.storage.path.clone();
    // A store that does not exist yet is made, as a server would make it.
    for dir in ["blobs/sha256", "manifests/sha256", "tags", "tmp"] {
        std::fs::create_dir_all(root.join(dir))
            .map_err(|e| failed(format!("cannot create the store {}: {e}", root.display())))?;
    }
    let _lock =
        imports::lock_imports(&root).map_err(|e| failed(format!("{}: {e}", root.display())))?;
    // What crashed imports left: committed ones are finished, the rest goes.
    let site = FsStore::attach(&root);
    site.apply_imports()
        .map_err(|e| failed(format!("cannot finish an earlier import: {e}")))?;
    imports::remove_stale_staging(&root).map_err(failed)?;

    let id = imports::new_id();
    let mut staging = Staging {
        dir: imports::staging_dir(&root, &id),
        committed: false,
    };
    let staged = FsStore::open(&staging.dir, None, Arc::new(Metrics::new()))
        .map_err(|e| failed(format!("cannot create {}: {e}", staging.dir.display())))?;

    let keys: Vec<(String, crate::keys::PublicKey)> = config
        .bundles
        .iter()
        .flat_map(|b| &b.signed_by)
        .map(|k| (k.name.clone(), k.key.clone()))
        .collect();
    let required = config.bundles.is_some();
    let max_manifest = config.server.max_manifest_size;
    let read = {
        let (path, staged) = (path.to_path_buf(), staged.clone());
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            read_tar(&path, &staged, &keys, required, max_manifest, &handle)
        })
        .await
        .map_err(failed)??
    };
    let created = super::created_secs(&read.manifest).map_err(bad)?;
    let checked = UNIX_EPOCH + Duration::from_secs(created);

    // The bundle's tags, in the staging store, as the import will write them.
    let router = Router::for_upstreams(&config.upstreams);
    let mut tags = Vec::new();
    let mut images = Vec::new();
    for (e, is_image) in read
        .manifest
        .images
        .iter()
        .map(|e| (e, true))
        .chain(read.manifest.artifacts.iter().map(|e| (e, false)))
    {
        let (name, reference) = crate::oci::names::split_image(&e.reference).map_err(|why| {
            bad(format!(
                "{MANIFEST_FILE}: reference {:?}: {why}",
                e.reference
            ))
        })?;
        let route = router.route(&name, None).map_err(|why| {
            bad(format!(
                "{}: {why} (add an [[upstream]] named after its registry, offline = true, to import it)",
                e.reference
            ))
        })?;
        if let Reference::Tag(tag) = reference {
            let key = TagKey {
                upstream: route.upstream_name.clone(),
                repo: route.repo.clone(),
                tag: tag.clone(),
            };
            let digest = e.digest;
            staged
                .update_tag(
                    &key,
                    Box::new(move |_| {
                        Some(TagRecord {
                            digest,
                            checked,
                            approved: None,
                        })
                    }),
                )
                .await
                .map_err(failed)?;
            tags.push((key, digest, is_image, e.reference.clone()));
        }
        if is_image {
            images.push((e.reference.clone(), route.canonical.clone(), e.digest));
        }
    }

    // This site's verdict on each image, from the bundle (and what the site
    // already holds): nothing is fetched from anywhere.
    let site_store: Arc<dyn Store> = Arc::new(site.clone());
    let app = App::for_import(config.clone(), Arc::new(staged.clone()), site_store.clone())
        .map_err(failed)?;
    let mut refused = Vec::new();
    for (reference, canonical, digest) in &images {
        match app.explain(&format!("{canonical}@{digest}")).await {
            Ok(e) if e.outcome == Outcome::Allowed => {
                if let Some(missing) = missing_blob(&app, &staged, &site, *digest).await {
                    refused.push((reference.clone(), missing));
                }
            }
            Ok(e) => {
                let reasons: Vec<String> = e.reasons.iter().map(|r| r.to_string()).collect();
                let detail = e
                    .lines
                    .iter()
                    .filter(|l| {
                        l.contains("rejected") || l.contains("no signatures") || l.contains("base")
                    })
                    .map(|l| l.trim().to_owned())
                    .collect::<Vec<_>>();
                let mut why = format!("denied by this site's policy ({})", reasons.join(", "));
                if !detail.is_empty() {
                    why.push_str(&format!(": {}", detail.join("; ")));
                }
                refused.push((reference.clone(), why));
            }
            Err((why, _)) => refused.push((
                reference.clone(),
                format!("no verdict from the bundle's content: {why}"),
            )),
        }
    }
    drop(app);

    // Tags that would go back to what an older bundle (or pull) had.
    if !allow_rollback {
        for (key, digest, is_image, reference) in &tags {
            if !is_image {
                continue;
            }
            if let Ok(Some(rec)) = site.tag(key).await {
                if rec.digest != *digest && rec.checked > checked {
                    refused.push((
                        reference.clone(),
                        format!(
                            "would move the tag back from {} (as of {}) to {digest} from a bundle of {}; pass --allow-rollback to do it",
                            rec.digest,
                            humantime::format_rfc3339_seconds(rec.checked),
                            read.manifest.created
                        ),
                    ));
                }
            }
        }
    }
    if !refused.is_empty() {
        return Err(ImportError::Refused(refused));
    }

    // Commit: from here the import happens, whatever stops this process.
    drop(staged);
    let commit = Commit {
        id: id.clone(),
        created,
        blobs: read
            .manifest
            .blobs
            .iter()
            .map(|b| CommitBlob {
                digest: b.digest,
                size: b.size,
                manifest: b.manifest.clone(),
            })
            .collect(),
        tags: tags
            .iter()
            .map(|(k, d, _, _)| CommitTag {
                upstream: k.upstream.to_string(),
                repo: k.repo.clone(),
                tag: k.tag.clone(),
                digest: *d,
            })
            .collect(),
    };
    imports::write_commit(&root, &commit)
        .map_err(|e| failed(format!("cannot write the commit record: {e}")))?;
    staging.committed = true;
    let applied_by = if imports::server_running(&root) {
        let started = Instant::now();
        while imports::pending(&root, &id) && started.elapsed() < SERVER_WAIT {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if imports::pending(&root, &id) {
            AppliedBy::Pending
        } else {
            AppliedBy::Server
        }
    } else {
        site.apply_imports().map_err(|e| {
            failed(format!(
                "committed, but cannot apply it yet ({e}); the next import or server start finishes it"
            ))
        })?;
        AppliedBy::Import
    };
    Ok(Imported {
        images: images.into_iter().map(|(r, _, _)| r).collect(),
        blobs: read.manifest.blobs.len(),
        bytes: read.manifest.blobs.iter().map(|b| b.size).sum(),
        signed_by: read.signed_by,
        applied_by,
    })
}

/// A blob an approved image needs that neither the bundle nor the site has.
async fn missing_blob(
    app: &Arc<App>,
    staged: &FsStore,
    site: &FsStore,
    top: Digest,
) -> Option<String> {
    let mut todo = vec![top];
    let mut seen = HashSet::new();
    while let Some(d) = todo.pop() {
        if !seen.insert(d) {
            continue;
        }
        let m = match app.content.stored_manifest(&d).await {
            Ok(Some(m)) => m,
            _ => return Some(format!("manifest {d} is not in the bundle")),
        };
        if let Some(children) = m.index_children() {
            todo.extend(children);
            continue;
        }
        for b in m.referenced_blobs() {
            let here = staged.has_blob(&b) || matches!(site.open(&b).await, Ok(Some(_)));
            if !here {
                return Some(format!("blob {b} of manifest {d} is not in the bundle"));
            }
        }
    }
    None
}

/// What reading the tar found.
pub(crate) struct ReadBundle {
    pub(crate) manifest: BundleManifest,
    pub(crate) signed_by: Option<String>,
}

/// Reads and stages the tar; every check of the bundle's form is here.
pub(crate) fn read_tar(
    path: &Path,
    staged: &FsStore,
    keys: &[(String, crate::keys::PublicKey)],
    required: bool,
    max_manifest: u64,
    rt: &tokio::runtime::Handle,
) -> Result<ReadBundle, ImportError> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|e| failed(format!("cannot open {shown}: {e}")))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    let broken = |e: std::io::Error| bad(format!("{shown} is truncated or not a tar: {e}"));
    let mut manifest: Option<BundleManifest> = None;
    let mut listed: HashMap<Digest, (u64, Option<String>)> = HashMap::new();
    let mut signed_by: Option<String> = None;
    let mut manifest_bytes = Vec::new();
    let mut signature_checked = false;
    let mut seen: HashSet<String> = HashSet::new();
    let mut have_layout = false;
    let mut have_index = false;
    let mut blobs_seen = 0usize;
    let mut progress = Progress::new("importing", 0, size);
    for (i, entry) in archive.entries().map_err(broken)?.enumerate() {
        let mut entry = entry.map_err(broken)?;
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        check_name(&name, entry.header().entry_type())?;
        if entry.header().entry_type().is_dir() {
            continue;
        }
        if !seen.insert(name.clone()) {
            return Err(bad(format!("{name} appears twice in the tar")));
        }
        let len = entry.size();
        if i == 0 {
            if name != MANIFEST_FILE {
                return Err(bad(format!(
                    "the first entry is {name:?}, not {MANIFEST_FILE}: not a pullgate bundle (skopeo's oci-archive files are not bundles; make one with `pullgate export`)"
                )));
            }
            let bytes = read_capped(&mut entry, len, MAX_MANIFEST_FILE, &name)?;
            let m: BundleManifest = serde_json::from_slice(&bytes)
                .map_err(|e| bad(format!("{MANIFEST_FILE} is not a bundle manifest: {e}")))?;
            if m.pullgate_bundle != FORMAT {
                return Err(bad(format!(
                    "{MANIFEST_FILE}: format {} is not the one this pullgate reads ({FORMAT})",
                    m.pullgate_bundle
                )));
            }
            for b in &m.blobs {
                if listed
                    .insert(b.digest, (b.size, b.manifest.clone()))
                    .is_some()
                {
                    return Err(bad(format!(
                        "{MANIFEST_FILE} lists blob {} twice",
                        b.digest
                    )));
                }
            }
            for e in m.images.iter().chain(&m.artifacts) {
                if !listed.get(&e.digest).is_some_and(|(_, mt)| mt.is_some()) {
                    return Err(bad(format!(
                        "{MANIFEST_FILE}: {} names {}, which it does not list as a manifest",
                        e.reference, e.digest
                    )));
                }
            }
            progress = Progress::new(
                "importing",
                m.blobs.len(),
                m.blobs.iter().map(|b| b.size).sum(),
            );
            manifest = Some(m);
            manifest_bytes = bytes;
            continue;
        }
        let m = manifest.as_ref().expect("the first entry is the manifest");
        if !signature_checked {
            signature_checked = true;
            if name == SIGNATURE_FILE {
                let sig = read_capped(&mut entry, len, MAX_SIGNATURE, &name)?;
                if keys.is_empty() {
                    tracing::warn!("the bundle is signed, but [bundles] names no keys: its signature is not checked");
                } else {
                    let refs: Vec<&crate::keys::PublicKey> = keys.iter().map(|(_, k)| k).collect();
                    let i = super::check_signature(&manifest_bytes, &sig, &refs).map_err(bad)?;
                    signed_by = Some(keys[i].0.clone());
                }
                continue;
            }
            if required {
                return Err(bad(format!(
                    "the bundle is not signed, and [bundles] signed_by asks for a signature by one of: {}",
                    keys.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
                )));
            }
        }
        match name.as_str() {
            "oci-layout" => {
                let b = read_capped(&mut entry, len, 1024, &name)?;
                let v: serde_json::Value = serde_json::from_slice(&b)
                    .map_err(|e| bad(format!("oci-layout is not JSON: {e}")))?;
                if v["imageLayoutVersion"] != "1.0.0" {
                    return Err(bad("oci-layout does not say imageLayoutVersion 1.0.0"));
                }
                have_layout = true;
            }
            "index.json" => {
                let b = read_capped(&mut entry, len, MAX_INDEX, &name)?;
                check_index(&b, m)?;
                have_index = true;
            }
            SIGNATURE_FILE => {
                return Err(bad(format!(
                    "{SIGNATURE_FILE} must come right after {MANIFEST_FILE}"
                )))
            }
            _ => {
                let hex = name.strip_prefix("blobs/sha256/").unwrap_or_default();
                let d = Digest::from_hex(hex)
                    .ok_or_else(|| bad(format!("{name:?} is not a blob path")))?;
                let Some((want, media_type)) = listed.get(&d) else {
                    return Err(bad(format!("{name} is not listed in {MANIFEST_FILE}")));
                };
                if len != *want {
                    return Err(bad(format!(
                        "{name} is {len} bytes; {MANIFEST_FILE} says {want}"
                    )));
                }
                if media_type.is_some() {
                    let b = read_capped(&mut entry, len, max_manifest, &name)?;
                    if Digest::of(&b) != d {
                        return Err(bad(format!(
                            "manifest {d} is damaged or tampered: its bytes hash to {}",
                            Digest::of(&b)
                        )));
                    }
                    let parsed = Manifest::parse(d, None, Bytes::from(b))
                        .map_err(|e| bad(format!("manifest {d}: {e}")))?;
                    rt.block_on(staged.put_manifest(Arc::new(parsed)))
                        .map_err(failed)?;
                    progress.bytes(len);
                } else {
                    stage_blob(&mut entry, d, len, staged, rt, &mut progress)?;
                }
                blobs_seen += 1;
                progress.item();
            }
        }
    }
    progress.finish();
    let Some(m) = manifest else {
        return Err(bad(format!("{shown} is empty")));
    };
    if !signature_checked && required {
        return Err(bad(
            "the bundle is not signed, and [bundles] signed_by asks for a signature",
        ));
    }
    if !have_layout || !have_index {
        return Err(bad(
            "the bundle has no oci-layout or index.json: truncated?",
        ));
    }
    if blobs_seen != m.blobs.len() {
        let missing = m
            .blobs
            .iter()
            .find(|b| !seen.contains(&super::blob_path(&b.digest)))
            .map(|b| b.digest.to_string())
            .unwrap_or_default();
        return Err(bad(format!(
            "the bundle is truncated: {} of its {} blobs are missing (first: {missing})",
            m.blobs.len() - blobs_seen,
            m.blobs.len()
        )));
    }
    Ok(ReadBundle {
        manifest: m,
        signed_by,
    })
}

/// Refuses any entry but a plain file (or the two blob directories) at a
/// plain relative path.
fn check_name(name: &str, kind: tar::EntryType) -> Result<(), ImportError> {
    if name.starts_with('/') {
        return Err(bad(format!("{name:?} is an absolute path")));
    }
    if name.split('/').any(|c| c == "..") {
        return Err(bad(format!("{name:?} climbs out of the bundle (..)")));
    }
    match kind {
        tar::EntryType::Regular | tar::EntryType::Continuous => Ok(()),
        tar::EntryType::Directory
            if matches!(name, "blobs/" | "blobs/sha256/" | "blobs" | "blobs/sha256") =>
        {
            Ok(())
        }
        tar::EntryType::Directory => Err(bad(format!(
            "{name:?} is a directory the layout does not have"
        ))),
        tar::EntryType::Symlink | tar::EntryType::Link => Err(bad(format!(
            "{name:?} is a link; a bundle holds plain files only"
        ))),
        tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => Err(bad(format!(
            "{name:?} is a device or fifo; a bundle holds plain files only"
        ))),
        other => Err(bad(format!(
            "{name:?} is a tar entry of type {other:?}; a bundle holds plain files only"
        ))),
    }
}

fn read_capped(r: &mut impl Read, len: u64, max: u64, name: &str) -> Result<Vec<u8>, ImportError> {
    if len > max {
        return Err(bad(format!(
            "{name} is {len} bytes, over the {max}-byte cap"
        )));
    }
    let mut b = Vec::with_capacity(len as usize);
    r.take(max)
        .read_to_end(&mut b)
        .map_err(|e| bad(format!("{name}: cannot read it: {e} (truncated?)")))?;
    if b.len() as u64 != len {
        return Err(bad(format!(
            "{name} is truncated: {} of {len} bytes",
            b.len()
        )));
    }
    Ok(b)
}

/// The layout's index must name what the bundle manifest names.
fn check_index(bytes: &[u8], m: &BundleManifest) -> Result<(), ImportError> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("index.json is not JSON: {e}")))?;
    let entries = v["manifests"]
        .as_array()
        .ok_or_else(|| bad("index.json has no manifests list"))?;
    let named: HashMap<&str, &str> = entries
        .iter()
        .filter_map(|e| {
            Some((
                e["annotations"]["org.opencontainers.image.ref.name"].as_str()?,
                e["digest"].as_str()?,
            ))
        })
        .collect();
    for e in m.images.iter().chain(&m.artifacts) {
        match named.get(e.reference.as_str()) {
            Some(d) if *d == e.digest.to_string() => {}
            Some(d) => {
                return Err(bad(format!(
                    "index.json names {d} for {}, the bundle manifest {}",
                    e.reference, e.digest
                )))
            }
            None => return Err(bad(format!("index.json does not list {}", e.reference))),
        }
    }
    if named.len() != entries.len() || entries.len() != m.images.len() + m.artifacts.len() {
        return Err(bad(
            "index.json lists references the bundle manifest does not",
        ));
    }
    Ok(())
}

/// Streams one blob into the staging store, hashed on the way.
fn stage_blob(
    r: &mut impl Read,
    d: Digest,
    len: u64,
    staged: &FsStore,
    rt: &tokio::runtime::Handle,
    progress: &mut Progress,
) -> Result<(), ImportError> {
    let mut w = rt.block_on(staged.writer(d)).map_err(failed)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = r
            .read(&mut buf)
            .map_err(|e| bad(format!("blob {d}: cannot read it: {e} (truncated?)")))?;
        if n == 0 {
            break;
        }
        rt.block_on(w.write(Bytes::copy_from_slice(&buf[..n])))
            .map_err(failed)?;
        got += n as u64;
        progress.bytes(n as u64);
    }
    if got != len {
        return Err(bad(format!(
            "the bundle is truncated: blob {d} ends after {got} of its {len} bytes"
        )));
    }
    match rt.block_on(w.finish()) {
        Ok(_) => Ok(()),
        Err(WriteError::Mismatch { got }) => Err(bad(format!(
            "blob {d} is damaged or tampered: its bytes hash to {got}"
        ))),
        Err(WriteError::Io(e)) => Err(failed(format!("cannot stage blob {d}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(name: &str, required: bool) -> Result<ReadBundle, ImportError> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus/bundle")
            .join(format!("seed-{name}"));
        let dir = tempfile::tempdir().unwrap();
        let staged = FsStore::open(dir.path(), None, Arc::new(Metrics::new())).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        read_tar(&path, &staged, &[], required, 1 << 20, rt.handle())
    }

    #[test]
    fn the_seed_bundles_read_as_they_should() {
        // A tar written by Python's tarfile (GNU and PAX headers, a
        // directory entry), not by pullgate: the form is what counts.
        for ok in ["valid", "pax", "with-dirs"] {
            let r = read(ok, false).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(r.manifest.blobs.len(), 3, "{ok}");
            assert_eq!(r.signed_by, None);
        }
        let refused = |name: &str, required: bool, want: &str| match read(name, required) {
            Err(e @ ImportError::Bad(_)) => assert!(e.to_string().contains(want), "{name}: {e}"),
            Err(e) => panic!("{name}: {e}"),
            Ok(_) => panic!("{name} was accepted"),
        };
        refused("valid", true, "not signed");
        refused("link", false, "is a link");
        refused("truncated", false, "truncated");
    }
}

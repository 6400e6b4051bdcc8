//! `pullgate fsck`: every file of a filesystem store checked against what
//! it claims to be, and what is wrong moved aside.
//!
//! A blob must hash to its name; a manifest marker must have its bytes,
//! which must read as a manifest; a tag record must parse and point at a
//! stored manifest; approvals and the base history must parse. What fails
//! is moved under `quarantine/<time>/`, at the same relative path, so a
//! person can look at it and nothing is lost. Safe beside a running
//! server: every move is a rename, a server that then misses a blob
//! fetches it again, and a blob that a server committed afresh while it
//! was being checked is put back. Hand-written: this is the store's own
//! layout. Depends on `oci`.

use std::fs::{self, File};
use std::io::{self, ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use crate::oci::names::{Digest, Hasher};
use crate::oci::Manifest;

/// One thing found wrong, and what was done about it.
#[derive(Debug, Clone)]
pub struct Finding {
    /// Relative to the store's root.
    pub path: PathBuf,
    pub problem: String,
    pub action: String,
}

/// What a check looked at and found.
#[derive(Debug, Default)]
pub struct Report {
    pub blobs: u64,
    pub bytes: u64,
    pub manifests: u64,
    pub tags: u64,
    pub approvals: u64,
    /// Temp files of a process that is gone, removed (none when a server
    /// holds the store: they may be its transfers in flight).
    pub temp_removed: u64,
    /// A server was running on the store during the check.
    pub live: bool,
    pub findings: Vec<Finding>,
    /// Where findings were moved, when there were any.
    pub quarantine: Option<PathBuf>,
}

/// How far a check is, for a progress line.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub blobs: u64,
    pub bytes: u64,
}

struct Check<'a> {
    root: &'a Path,
    quarantine: PathBuf,
    report: Report,
    progress: &'a mut dyn FnMut(Progress),
    last_progress: Instant,
}

/// Checks the store at `root`; `progress` is called now and then during the
/// blob pass (the long part).
pub fn fsck(root: &Path, progress: &mut dyn FnMut(Progress)) -> io::Result<Report> {
    if !root.join("blobs/sha256").is_dir() {
        return Err(io::Error::new(
            ErrorKind::NotFound,
            format!(
                "{} is not a pullgate store (it has no blobs/sha256)",
                root.display()
            ),
        ));
    }
    let mut check = Check {
        root,
        quarantine: quarantine_dir(root),
        report: Report::default(),
        progress,
        last_progress: Instant::now(),
    };
    check.report.live = held_by_a_server(root)?;
    if !check.report.live {
        check.temp_files()?;
    }
    check.blobs()?;
    check.manifests()?;
    check.tags()?;
    check.approvals()?;
    check.base_history()?;
    if !check.report.findings.is_empty() {
        check.report.quarantine = Some(check.quarantine.clone());
    }
    Ok(check.report)
}

/// `quarantine/<UTC time>` under a store's root: where what is found wrong
/// now goes.
pub fn quarantine_dir(root: &Path) -> PathBuf {
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    root.join("quarantine").join(stamp)
}

/// Whether a server holds the store's lock now.
fn held_by_a_server(root: &Path) -> io::Result<bool> {
    let file = match File::open(root.join("lock")) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    match file.try_lock() {
        Ok(()) => Ok(false),
        Err(fs::TryLockError::WouldBlock) => Ok(true),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The entries of a directory, sorted; none when it does not exist.
fn entries(dir: &Path) -> io::Result<Vec<fs::DirEntry>> {
    let mut out = match fs::read_dir(dir) {
        Ok(rd) => rd.collect::<io::Result<Vec<_>>>()?,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    out.sort_by_key(|e| e.file_name());
    Ok(out)
}

/// The digest and size of a file's bytes.
fn hash_file(path: &Path) -> io::Result<(Digest, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                len += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((hasher.finish(), len))
}

impl Check<'_> {
    fn rel(&self, path: &Path) -> PathBuf {
        path.strip_prefix(self.root).unwrap_or(path).to_path_buf()
    }

    /// Moves `path` under the quarantine directory, at its relative path.
    fn quarantine(&mut self, path: &Path, problem: String) -> io::Result<()> {
        let rel = self.rel(path);
        let dest = self.quarantine.join(&rel);
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir)?;
        }
        let action = match fs::rename(path, &dest) {
            Ok(()) => format!("moved to {}", self.rel(&dest).display()),
            // Gone meanwhile (a server replaced or evicted it): nothing to move.
            Err(e) if e.kind() == ErrorKind::NotFound => "gone meanwhile".to_owned(),
            Err(e) => return Err(e),
        };
        self.report.findings.push(Finding {
            path: rel,
            problem,
            action,
        });
        Ok(())
    }

    fn temp_files(&mut self) -> io::Result<()> {
        for entry in entries(&self.root.join("tmp"))? {
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                fs::remove_dir_all(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
            self.report.temp_removed += 1;
        }
        Ok(())
    }

    fn blobs(&mut self) -> io::Result<()> {
        for prefix in entries(&self.root.join("blobs/sha256"))? {
            let dir = prefix.path();
            let name = prefix.file_name().to_string_lossy().into_owned();
            let is_prefix =
                name.len() == 2 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            if !prefix.file_type()?.is_dir() || !is_prefix {
                self.quarantine(&dir, "not a digest prefix directory".into())?;
                continue;
            }
            for entry in entries(&dir)? {
                let path = entry.path();
                let file_name = entry.file_name().to_string_lossy().into_owned();
                let digest = Digest::from_hex(&file_name).filter(|_| file_name.starts_with(&name));
                let Some(digest) = digest.filter(|_| entry.file_type().is_ok_and(|t| t.is_file()))
                else {
                    self.quarantine(&path, "not named by a digest".into())?;
                    continue;
                };
                self.blob(&path, digest)?;
            }
        }
        Ok(())
    }

    fn blob(&mut self, path: &Path, digest: Digest) -> io::Result<()> {
        let (got, len) = match hash_file(path) {
            Ok(h) => h,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()), // evicted meanwhile
            Err(e) => {
                return self.quarantine(path, format!("cannot be read ({e})"));
            }
        };
        self.report.blobs += 1;
        self.report.bytes += len;
        if self.last_progress.elapsed() >= Duration::from_secs(2) {
            self.last_progress = Instant::now();
            (self.progress)(Progress {
                blobs: self.report.blobs,
                bytes: self.report.bytes,
            });
        }
        if got == digest {
            return Ok(());
        }
        self.quarantine(
            path,
            format!("its {len} bytes hash to {got}, not to its name"),
        )?;
        // A server may have committed the right bytes under this name
        // between the read and the move: if what was moved now matches, it
        // was theirs, and it goes back.
        let moved = self.quarantine.join(self.rel(path));
        if hash_file(&moved).is_ok_and(|(d, _)| d == digest) && !path.exists() {
            fs::rename(&moved, path)?;
            self.report.findings.pop();
        }
        Ok(())
    }

    fn manifests(&mut self) -> io::Result<()> {
        for prefix in entries(&self.root.join("manifests/sha256"))? {
            for entry in entries(&prefix.path())? {
                let marker = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(digest) = Digest::from_hex(&name) else {
                    self.quarantine(&marker, "a manifest marker not named by a digest".into())?;
                    continue;
                };
                let blob = self.root.join("blobs/sha256").join(&name[..2]).join(&name);
                let bytes = match fs::read(&blob) {
                    Ok(b) => b,
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        self.quarantine(
                            &marker,
                            "marks a manifest whose bytes are not in blobs/".into(),
                        )?;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                self.report.manifests += 1;
                if Digest::of(&bytes) != digest {
                    // The blob pass moved it, or it changed since: checked there.
                    continue;
                }
                if let Err(e) = Manifest::stored(digest, Bytes::from(bytes)) {
                    self.quarantine(
                        &blob,
                        format!("marked as a manifest, but unusable as one: {e}"),
                    )?;
                    self.quarantine(&marker, "marks the unusable manifest above".into())?;
                }
            }
        }
        Ok(())
    }

    fn tags(&mut self) -> io::Result<()> {
        let mut files = Vec::new();
        collect_tag_files(&self.root.join("tags"), &mut files)?;
        for path in files {
            self.report.tags += 1;
            #[derive(serde::Deserialize)]
            struct TagFile {
                digest: Digest,
            }
            let parsed = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<TagFile>(&b).map_err(|e| e.to_string()));
            match parsed {
                Err(e) => self.quarantine(&path, format!("not a tag record ({e})"))?,
                Ok(t) => {
                    let hex = t.digest.hex();
                    let marker = self
                        .root
                        .join("manifests/sha256")
                        .join(&hex[..2])
                        .join(&hex);
                    let blob = self.root.join("blobs/sha256").join(&hex[..2]).join(&hex);
                    if !(marker.exists() && blob.exists()) {
                        self.quarantine(
                            &path,
                            format!("points at {}, which is not a stored manifest (the tag is resolved again at its next pull)", t.digest),
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    fn approvals(&mut self) -> io::Result<()> {
        for dir in entries(&self.root.join("approvals/sha256"))? {
            let name = dir.file_name().to_string_lossy().into_owned();
            if Digest::from_hex(&name).is_none() || !dir.file_type()?.is_dir() {
                self.quarantine(&dir.path(), "not named by a digest".into())?;
                continue;
            }
            for entry in entries(&dir.path())? {
                self.report.approvals += 1;
                let path = entry.path();
                let ok = fs::read(&path)
                    .ok()
                    .is_some_and(|b| serde_json::from_slice::<serde_json::Value>(&b).is_ok());
                if !ok {
                    self.quarantine(&path, "an approval that is not JSON".into())?;
                }
            }
        }
        Ok(())
    }

    fn base_history(&mut self) -> io::Result<()> {
        let path = self.root.join("bases/history.json");
        match fs::read(&path) {
            Ok(b) if serde_json::from_slice::<serde_json::Value>(&b).is_ok() => Ok(()),
            Ok(_) => self.quarantine(
                &path,
                "not JSON (images on earlier base digests are judged without them until the bases are resolved again)".into(),
            ),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Every file under a `_tags` directory below `dir`.
fn collect_tag_files(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in entries(dir)? {
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_tag_files(&path, out)?;
        } else if dir.file_name().is_some_and(|n| n == "_tags") {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::store::{FsStore, Store, TagKey, TagRecord};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_sound_store_passes_and_every_kind_of_damage_is_found_and_moved() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let blob = Bytes::from_static(b"layer bytes");
        let manifest = Bytes::from_static(br#"{"schemaVersion":2,"manifests":[]}"#);
        let md = Digest::of(&manifest);
        {
            let s = FsStore::open(root, None, Arc::new(Metrics::new())).unwrap();
            crate::store::put_blob(&s, Digest::of(&blob), blob.clone())
                .await
                .unwrap();
            let m = Manifest::parse(md, None, manifest.clone()).unwrap();
            s.put_manifest(Arc::new(m)).await.unwrap();
            let key = TagKey {
                upstream: "docker.io".into(),
                repo: "library/a".parse().unwrap(),
                tag: "1".parse().unwrap(),
            };
            let rec = TagRecord {
                digest: md,
                checked: SystemTime::now(),
                approved: None,
            };
            s.update_tag(&key, Box::new(move |_| Some(rec)))
                .await
                .unwrap();
            let clean = fsck(root, &mut |_| {}).unwrap();
            assert!(clean.live, "the open store holds the lock");
            assert!(clean.findings.is_empty(), "{:?}", clean.findings);
            assert_eq!((clean.blobs, clean.manifests, clean.tags), (2, 1, 1));
        }
        // Bit rot in a blob, a tag pointing nowhere, a stray file, a
        // broken approval.
        let hex = Digest::of(&blob).hex().to_owned();
        let blob_path = root.join("blobs/sha256").join(&hex[..2]).join(&hex);
        fs::write(&blob_path, b"layer bytez").unwrap();
        let other = Digest::of(b"gone");
        fs::write(
            root.join("tags/docker.io/library/a/_tags/2"),
            format!(r#"{{"digest":"{other}","checked":1}}"#),
        )
        .unwrap();
        fs::write(root.join("blobs/sha256/zz"), b"x").unwrap();
        let approvals = root.join("approvals/sha256").join(md.hex());
        fs::create_dir_all(&approvals).unwrap();
        fs::write(approvals.join("k.json"), b"{not json").unwrap();
        fs::write(root.join("tmp/123-0-0"), b"half").unwrap();

        let report = fsck(root, &mut |_| {}).unwrap();
        assert!(!report.live);
        assert_eq!(report.temp_removed, 1);
        let problems: Vec<String> = report
            .findings
            .iter()
            .map(|f| format!("{}: {}", f.path.display(), f.problem))
            .collect();
        assert_eq!(report.findings.len(), 4, "{problems:#?}");
        assert!(problems
            .iter()
            .any(|p| p.contains(&hex) && p.contains("hash to")));
        assert!(problems
            .iter()
            .any(|p| p.contains("_tags/2") && p.contains("not a stored manifest")));
        assert!(!blob_path.exists());
        let q = report.quarantine.unwrap();
        assert!(q.join("blobs/sha256").join(&hex[..2]).join(&hex).exists());
        // The good tag and manifest stay; a second run finds nothing.
        assert!(root.join("tags/docker.io/library/a/_tags/1").exists());
        let again = fsck(root, &mut |_| {}).unwrap();
        assert!(again.findings.is_empty(), "{:?}", again.findings);

        // A server opening the store afterwards fetches the blob again
        // instead of serving the moved one.
        let s = FsStore::open(root, None, Arc::new(Metrics::new())).unwrap();
        assert!(s.open(&Digest::of(&blob)).await.unwrap().is_none());
        assert!(s.manifest(&md).await.unwrap().is_some());
    }
}

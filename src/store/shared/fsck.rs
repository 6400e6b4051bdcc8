//! `pullgate fsck` of the shared bucket: every blob hashed against its
//! name, every tag record and approval parsed, what is wrong moved under
//! `quarantine/<time>/` in the bucket (at the same key), so nothing is lost.
//!
//! Safe beside running replicas: blobs are written once, under their digest,
//! only after they matched, so a blob that changes under the check is a
//! finding, not a race; one evicted meanwhile is skipped; a replica that
//! then misses a quarantined blob fetches it again. Hand-written: this is
//! the bucket layout of pullgate's own.

use std::collections::HashSet;
use std::io;
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;

use super::super::bucket::Bucket;
use super::super::fs::TagFile;
use super::super::fsck::{Finding, Progress};
use crate::oci::names::{Digest, Hasher};

/// What a check of the bucket looked at and found.
#[derive(Debug, Default)]
pub struct BucketReport {
    pub blobs: u64,
    pub bytes: u64,
    pub tags: u64,
    pub approvals: u64,
    pub findings: Vec<Finding>,
    /// The key prefix findings were moved under, when there were any.
    pub quarantine: Option<String>,
}

struct Check<'a> {
    bucket: &'a Bucket,
    quarantine: String,
    report: BucketReport,
    progress: &'a mut dyn FnMut(Progress),
    last_progress: Instant,
}

/// Checks `bucket`; `progress` is called now and then while blobs are hashed.
pub async fn fsck_bucket(
    bucket: &Bucket,
    progress: &mut dyn FnMut(Progress),
) -> io::Result<BucketReport> {
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let mut check = Check {
        bucket,
        quarantine: format!("quarantine/{stamp}"),
        report: BucketReport::default(),
        progress,
        last_progress: Instant::now(),
    };
    let held = check.blobs().await?;
    check.tags(&held).await?;
    check.approvals().await?;
    if !check.report.findings.is_empty() {
        check.report.quarantine = Some(check.quarantine.clone());
    }
    Ok(check.report)
}

impl Check<'_> {
    /// Moves the object at `rel` aside, noting why.
    async fn quarantine(&mut self, rel: &str, problem: String) -> io::Result<()> {
        let to = format!("{}/{rel}", self.quarantine);
        self.bucket.copy(rel, &to).await?;
        self.bucket.delete(rel).await?;
        self.report.findings.push(Finding {
            path: rel.into(),
            problem,
            action: format!("moved to {to} in the bucket"),
        });
        Ok(())
    }

    /// Hashes every blob; the digests of those that matched.
    async fn blobs(&mut self) -> io::Result<HashSet<Digest>> {
        let mut held = HashSet::new();
        for b in self.bucket.list_dated("blobs/sha256").await? {
            let named = b.rel.rsplit('/').next().and_then(Digest::from_hex);
            let Some(d) = named.filter(|d| b.rel == Bucket::blob_rel(d)) else {
                self.quarantine(&b.rel, "not named by a sha256 digest".into())
                    .await?;
                continue;
            };
            self.report.blobs += 1;
            let Some((_, mut body)) = self.bucket.blob_stream(&d).await? else {
                continue; // evicted since the listing
            };
            let mut hasher = Hasher::new();
            let mut size = 0u64;
            let mut broken = None;
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(c) => {
                        hasher.update(&c);
                        size += c.len() as u64;
                        self.report.bytes += c.len() as u64;
                    }
                    Err(e) => {
                        broken = Some(e);
                        break;
                    }
                }
                if self.last_progress.elapsed() > Duration::from_secs(1) {
                    (self.progress)(Progress {
                        blobs: self.report.blobs,
                        bytes: self.report.bytes,
                    });
                    self.last_progress = Instant::now();
                }
            }
            if let Some(e) = broken {
                // Removed mid-read (evicted) is no finding; anything else is
                // the engine failing, and the check cannot go on.
                if self.bucket.blob_size(&d).await?.is_none() {
                    continue;
                }
                return Err(e);
            }
            let got = hasher.finish();
            if got == d {
                held.insert(d);
            } else {
                self.quarantine(
                    &b.rel,
                    format!("its {size} bytes hash to {got}, not to its name"),
                )
                .await?;
            }
        }
        Ok(held)
    }

    /// Every tag record parses and points at a manifest the bucket holds.
    async fn tags(&mut self, held: &HashSet<Digest>) -> io::Result<()> {
        for (rel, _) in self.bucket.list("tags").await? {
            if !rel.contains("/_tags/") {
                continue;
            }
            self.report.tags += 1;
            let Some(doc) = self.bucket.read_doc(&rel).await? else {
                continue;
            };
            if doc.bytes.is_empty() {
                continue; // a removed record
            }
            match TagFile::decode(&doc.bytes) {
                None => {
                    self.quarantine(&rel, "not a tag record".into()).await?;
                }
                Some(r) if !held.contains(&r.digest) => {
                    self.quarantine(
                        &rel,
                        format!("points at {}, which the bucket does not hold (the tag is resolved again at its next pull)", r.digest),
                    )
                    .await?;
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Every approval is JSON (its signature is checked where it is used).
    async fn approvals(&mut self) -> io::Result<()> {
        for (rel, _) in self.bucket.list("approvals/sha256").await? {
            if !rel.ends_with(".json") {
                continue;
            }
            self.report.approvals += 1;
            let Some(doc) = self.bucket.read_doc(&rel).await? else {
                continue;
            };
            if serde_json::from_slice::<serde_json::Value>(&doc.bytes).is_err() {
                self.quarantine(&rel, "not an approval (not JSON)".into())
                    .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use object_store::memory::InMemory;

    use super::*;
    use crate::store::bucket::Uploaded;

    #[tokio::test]
    async fn wrong_bytes_and_records_go_to_quarantine_and_good_ones_stay() {
        let b = Bucket::new(Arc::new(InMemory::new()), "site", "memory://test".into());
        let good = Bytes::from_static(b"good blob");
        let d = Digest::of(&good);
        assert_eq!(
            b.put_blob_bytes(&d, good.clone()).await.unwrap(),
            Uploaded::Written
        );
        // Bit rot: bytes under a name they do not hash to.
        let rotten = Digest::of(b"what it was");
        b.write_doc(&Bucket::blob_rel(&rotten), b"what it is now".to_vec())
            .await
            .unwrap();
        let tag = "tags/docker.io/library/app/_tags/1";
        let rec = format!(r#"{{"digest":"{d}","checked":1}}"#);
        b.write_doc(tag, rec.into_bytes()).await.unwrap();
        let dangling = "tags/docker.io/library/app/_tags/2";
        let rec = format!(r#"{{"digest":"{rotten}","checked":1}}"#);
        b.write_doc(dangling, rec.into_bytes()).await.unwrap();
        b.write_doc("tags/docker.io/library/app/_tags/3", b"{not json".to_vec())
            .await
            .unwrap();
        b.write_doc("tags/docker.io/library/app/_tags/4", Vec::new())
            .await
            .unwrap();
        let approval = format!("approvals/sha256/{}/x.json", d.hex());
        b.write_doc(&approval, b"\xff".to_vec()).await.unwrap();

        let mut calls = 0;
        let report = fsck_bucket(&b, &mut |_| calls += 1).await.unwrap();
        let found: Vec<String> = report
            .findings
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        assert_eq!(
            found,
            [
                Bucket::blob_rel(&rotten),
                dangling.to_owned(),
                "tags/docker.io/library/app/_tags/3".to_owned(),
                approval.clone(),
            ],
            "{report:?}"
        );
        assert_eq!((report.blobs, report.tags, report.approvals), (2, 4, 1));
        let q = report.quarantine.clone().unwrap();
        assert!(b.blob_size(&rotten).await.unwrap().is_none(), "moved");
        let kept = b
            .read_doc(&format!("{q}/{}", Bucket::blob_rel(&rotten)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&kept.bytes[..], b"what it is now", "nothing is lost");
        assert!(
            b.blob_size(&d).await.unwrap().is_some(),
            "the good blob stays"
        );
        assert!(b.read_doc(tag).await.unwrap().is_some());

        // Checked again: clean.
        let again = fsck_bucket(&b, &mut |_| {}).await.unwrap();
        assert!(again.findings.is_empty(), "{again:?}");
        assert!(again.quarantine.is_none());
    }
}

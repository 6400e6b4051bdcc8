//! Decisions worth keeping: the audit log, and the recent decisions behind
//! the dashboard.
//!
//! Every deny or would-deny (and, with `[audit] approvals = true`, every
//! approval) becomes one JSON line. Lines are appended to a bounded buffer
//! that a writer thread writes out every 100 ms, so serving never waits for
//! the disk; a full buffer or a failed write is counted and logged, never an
//! error for the client. The
//! file is reopened on SIGHUP, for logrotate. Without `[audit] path`, the
//! same records go to the structured log. Denials also go to an in-memory
//! ring and hourly counters that `/api/denials` and `/api/stats` read.
//! [`probe`] checks at start-up that the file can be opened. Depends on
//! `config`, `policy`, `oci`, `metrics`.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::{Config, ConfigError, Mode, Problem};
use crate::metrics::Metrics;
use crate::oci::names::Digest;
use crate::policy::Reason;

/// Recent denials kept for the dashboard.
const RING: usize = 1000;

/// One decision, as written to the audit log and listed by `/api/denials`.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// RFC 3339, UTC.
    pub time: String,
    pub client: String,
    /// Canonical name, `<upstream>/<repository>`.
    pub name: String,
    /// Tag or digest as asked for.
    pub reference: String,
    pub digest: Option<String>,
    pub policy: Option<String>,
    pub mode: &'static str,
    /// Empty for an approval.
    pub reasons: Vec<Reason>,
    /// `deny`, `would-deny` or `allow`.
    pub decision: &'static str,
    /// What the client was told.
    pub message: String,
    /// The name the client asked for, when a `[[rewrite]]` served `name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewritten_from: Option<String>,
    /// Specifics: the base an approved image is built on, or how close a
    /// denied one came.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Tag drift: the last approved digest served instead of `digest`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_digest: Option<String>,
    /// Who asked (`user:alice`, `cert:node-1.team-a.example`), when the
    /// client had to identify itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The tenant of `identity`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip)]
    at: u64,
}

impl Record {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: SocketAddr,
        name: &str,
        reference: &str,
        digest: Option<&Digest>,
        policy: Option<&str>,
        mode: Mode,
        reasons: &[Reason],
        message: String,
    ) -> Record {
        let now = SystemTime::now();
        let decision = match (reasons.is_empty(), mode) {
            (true, _) => "allow",
            (false, Mode::Enforce) => "deny",
            (false, Mode::Audit) => "would-deny",
        };
        Record {
            time: humantime::format_rfc3339_seconds(now).to_string(),
            client: client.to_string(),
            name: name.to_owned(),
            reference: reference.to_owned(),
            digest: digest.map(|d| d.to_string()),
            policy: policy.map(str::to_owned),
            mode: mode.as_str(),
            reasons: reasons.to_vec(),
            decision,
            message,
            rewritten_from: None,
            detail: None,
            served_digest: None,
            identity: None,
            tenant: None,
            at: now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs(),
        }
    }
}

impl Record {
    /// Tag drift: the denied digest was not served; `served` was.
    pub fn kept(mut self, served: Digest) -> Record {
        self.decision = "kept-approved";
        self.served_digest = Some(served.to_string());
        self
    }
}

/// Lines waiting for the writer thread, which takes them all every
/// [`FLUSH_EVERY`]: appending costs a lock and a copy, no syscall, no wakeup.
struct Pending {
    lines: Mutex<Vec<u8>>,
    /// Set by SIGHUP; the writer reopens the file before its next write.
    reopen: AtomicBool,
}

/// How often queued lines are written out.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Bytes of lines that may wait before new ones are dropped (and counted).
const MAX_PENDING: usize = 16 * 1024 * 1024;

/// Blocked pulls in one hour.
#[derive(Clone, Copy, Default)]
struct Hour {
    start: u64,
    enforce: u64,
    audit: u64,
}

struct Recent {
    ring: VecDeque<Arc<Record>>,
    /// The last 24 hours, by hour start.
    hours: VecDeque<Hour>,
}

/// Why the audit log cannot be started.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the audit writer: {0}")]
    Thread(std::io::Error),
}

/// The audit log and recent decisions.
pub struct Audit {
    writer: Option<Arc<Pending>>,
    approvals: bool,
    recent: Mutex<Recent>,
    /// Names denied recently, with when a pull of them passed after their
    /// last denial: the dashboard marks a repository that passes now. Read
    /// (not written) on every pull that passes, only once anything has been
    /// denied.
    denied: std::sync::RwLock<HashMap<String, Option<u64>>>,
    any_denied: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Audit {
    /// Starts the writer thread when `path` is set.
    pub fn new(
        path: Option<&Path>,
        approvals: bool,
        metrics: Arc<Metrics>,
    ) -> Result<Audit, AuditError> {
        let writer = match path {
            None => None,
            Some(path) => {
                let file = open(path).map_err(|source| AuditError::Open {
                    path: path.to_path_buf(),
                    source,
                })?;
                let pending = Arc::new(Pending {
                    lines: Mutex::new(Vec::with_capacity(64 * 1024)),
                    reopen: AtomicBool::new(false),
                });
                let path = path.to_path_buf();
                let m = metrics.clone();
                let p = pending.clone();
                std::thread::Builder::new()
                    .name("pullgate-audit".into())
                    .spawn(move || write_loop(path, file, p, m))
                    .map_err(AuditError::Thread)?;
                Some(pending)
            }
        };
        Ok(Audit {
            writer,
            approvals,
            recent: Mutex::new(Recent {
                ring: VecDeque::with_capacity(RING),
                hours: VecDeque::with_capacity(25),
            }),
            denied: std::sync::RwLock::new(HashMap::new()),
            any_denied: AtomicBool::new(false),
            metrics,
        })
    }

    /// Whether approvals are recorded too.
    pub fn records_approvals(&self) -> bool {
        self.approvals
    }

    /// Records one decision. Never blocks.
    pub fn record(&self, r: Record) {
        let line = serde_json::to_string(&r).expect("JSON of plain values");
        match &self.writer {
            Some(pending) => {
                let mut lines = pending.lines.lock().unwrap_or_else(|e| e.into_inner());
                if lines.len() + line.len() < MAX_PENDING {
                    lines.extend_from_slice(line.as_bytes());
                    lines.push(b'\n');
                } else {
                    self.metrics
                        .audit_errors
                        .with_label_values(&["dropped"])
                        .inc();
                }
            }
            None => tracing::info!(target: "pullgate::audit", record = %line, "audit"),
        }
        if r.reasons.is_empty() {
            return;
        }
        {
            let mut denied = self.denied.write().unwrap_or_else(|e| e.into_inner());
            if denied.len() >= 4 * RING {
                // Bounded: names that left the ring go (their counts did).
                let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
                denied.retain(|n, _| recent.ring.iter().any(|r| r.name == *n));
            }
            denied.insert(r.name.clone(), None);
            self.any_denied.store(true, Ordering::Relaxed);
        }
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let hour = r.at / 3600 * 3600;
        if recent.hours.back().is_none_or(|h| h.start != hour) {
            recent.hours.push_back(Hour {
                start: hour,
                ..Hour::default()
            });
            while recent.hours.len() > 24 {
                recent.hours.pop_front();
            }
        }
        let h = recent.hours.back_mut().expect("just pushed");
        match r.mode {
            "audit" => h.audit += 1,
            _ => h.enforce += 1,
        }
        if recent.ring.len() == RING {
            recent.ring.pop_front();
        }
        recent.ring.push_back(Arc::new(r));
    }

    /// Notes that a pull of `name` passed policy: a repository denied
    /// before is marked as passing now.
    pub fn note_allowed(&self, name: &str) {
        if !self.any_denied.load(Ordering::Relaxed) {
            return;
        }
        let waiting = {
            let denied = self.denied.read().unwrap_or_else(|e| e.into_inner());
            matches!(denied.get(name), Some(None))
        };
        if waiting {
            let mut denied = self.denied.write().unwrap_or_else(|e| e.into_inner());
            if let Some(slot @ None) = denied.get_mut(name) {
                *slot = Some(unix_now());
            }
        }
    }

    /// Reopens the log file (SIGHUP, after logrotate moved it).
    pub fn reopen(&self) {
        if let Some(pending) = &self.writer {
            pending.reopen.store(true, Ordering::Relaxed);
        }
    }

    /// The latest denials and would-denials, newest first.
    pub fn denials(&self, limit: usize) -> serde_json::Value {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let list: Vec<&Record> = recent.ring.iter().rev().take(limit).map(|r| &**r).collect();
        serde_json::json!({ "denials": list, "total": recent.ring.len() })
    }

    /// Counts for the dashboard.
    pub fn stats(&self) -> serde_json::Value {
        // Taken before `recent`, as `record` takes them (in that order).
        let passes: HashMap<String, u64> = self
            .denied
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(n, at)| Some((n.clone(), (*at)?)))
            .collect();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let this_hour = now / 3600 * 3600;
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let count = |since: u64, mode: &str| -> u64 {
            recent
                .hours
                .iter()
                .filter(|h| h.start >= since)
                .map(|h| if mode == "audit" { h.audit } else { h.enforce })
                .sum()
        };
        // Hours before 1970 (a clock not yet set) are left out.
        let by_hour: Vec<_> = (0..24u64)
            .rev()
            .filter_map(|i| this_hour.checked_sub(i * 3600))
            .map(|start| {
                let h = recent
                    .hours
                    .iter()
                    .find(|h| h.start == start)
                    .copied()
                    .unwrap_or_default();
                serde_json::json!({
                    "hour": humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(start)).to_string(),
                    "enforce": h.enforce,
                    "audit": h.audit,
                })
            })
            .collect();
        let mut names: HashMap<&str, u64> = HashMap::new();
        let mut reasons: HashMap<&str, u64> = HashMap::new();
        for r in &recent.ring {
            *names.entry(&r.name).or_default() += 1;
            for reason in &r.reasons {
                *reasons.entry(reason.slug()).or_default() += 1;
            }
        }
        let top = |m: HashMap<&str, u64>, key: &str| {
            let mut v: Vec<_> = m.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            v.into_iter()
                .take(10)
                .map(|(k, n)| {
                    let mut e = serde_json::json!({ key: k, "count": n });
                    // A repository a pull passed for since its last denial.
                    if let Some(at) = (key == "name").then(|| passes.get(k)).flatten() {
                        e["passes_since"] = serde_json::json!(humantime::format_rfc3339_seconds(
                            UNIX_EPOCH + Duration::from_secs(*at)
                        )
                        .to_string());
                    }
                    e
                })
                .collect::<Vec<_>>()
        };
        let c = |kind: &str, result: &str| {
            self.metrics
                .cache_requests
                .with_label_values(&[kind, result])
                .get()
        };
        let hits = c("manifest", "hit") + c("blob", "hit");
        let misses = c("manifest", "miss") + c("blob", "miss") + c("blob", "joined");
        let hit_ratio = (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64);
        let bytes = |source: &str| self.metrics.bytes_served.with_label_values(&[source]).get();
        serde_json::json!({
            "blocked": {"last_hour": count(this_hour, "enforce"), "last_day": count(0, "enforce")},
            "would_block": {"last_hour": count(this_hour, "audit"), "last_day": count(0, "audit")},
            "by_hour": by_hour,
            "top_repositories": top(names, "name"),
            "reasons": top(reasons, "reason"),
            "cache": {"hits": hits, "misses": misses, "hit_ratio": hit_ratio},
            "bytes_served": {"cache": bytes("cache"), "upstream": bytes("upstream")},
        })
    }
}

/// Checks at start-up that the audit log can be opened for appending
/// (creating it), reported like a config problem: `audit.path` and its line.
pub fn probe(config: &Config) -> Result<(), ConfigError> {
    let Some(path) = &config.audit.path else {
        return Ok(());
    };
    open(path).map(drop).map_err(|e| ConfigError {
        source: config.source.clone(),
        problems: vec![Problem {
            key: "audit.path".into(),
            line: config.audit.path_line,
            message: format!("cannot open {:?} for appending: {e}", path.display()),
        }],
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Opens (creating) a log file for appending.
pub fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Every [`FLUSH_EVERY`], takes the queued lines and writes them in one go.
fn write_loop(path: PathBuf, mut file: File, pending: Arc<Pending>, metrics: Arc<Metrics>) {
    let mut batch = Vec::with_capacity(64 * 1024);
    loop {
        std::thread::sleep(FLUSH_EVERY);
        if pending.reopen.swap(false, Ordering::Relaxed) {
            match open(&path) {
                Ok(f) => {
                    file = f;
                    tracing::info!(path = %path.display(), "audit log reopened");
                }
                Err(e) => {
                    metrics.audit_errors.with_label_values(&["reopen"]).inc();
                    tracing::error!(path = %path.display(), error = %e, "cannot reopen the audit log; writing to the old file");
                }
            }
        }
        std::mem::swap(
            &mut batch,
            &mut *pending.lines.lock().unwrap_or_else(|e| e.into_inner()),
        );
        if batch.is_empty() {
            continue;
        }
        if let Err(e) = file.write_all(&batch) {
            let lost = batch.iter().filter(|&&b| b == b'\n').count() as u64;
            metrics
                .audit_errors
                .with_label_values(&["write"])
                .inc_by(lost);
            tracing::error!(path = %path.display(), error = %e, lost, "cannot write the audit log; records lost");
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unwritable_audit_path_is_a_config_error() {
        let config = Config::parse("[audit]\npath = \"/proc/no-such-dir/audit.jsonl\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"https://r\"\n[[policy]]\nname = \"p\"\nmatch = [\"**\"]\n", "test.toml", Path::new("/etc/pullgate")).unwrap();
        let err = probe(&config).unwrap_err();
        assert_eq!(err.problems[0].key, "audit.path");
        assert_eq!(err.problems[0].line, Some(2));
        assert!(err.problems[0].message.contains("cannot open"), "{err}");
    }

    fn record(name: &str, mode: Mode, reasons: &[&'static str]) -> Record {
        let reasons: Vec<Reason> = reasons
            .iter()
            .map(|s| Reason::ALL.into_iter().find(|r| r.slug() == *s).unwrap())
            .collect();
        let reasons = &reasons[..];
        Record::new(
            "127.0.0.1:40000".parse().unwrap(),
            name,
            "v1",
            Some(&Digest::of(b"m")),
            Some("p"),
            mode,
            reasons,
            "blocked by policy \"p\"".into(),
        )
    }

    #[test]
    fn lines_carry_every_field_and_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::new(Some(&path), false, Arc::new(Metrics::new())).unwrap();
        audit.record(record("docker.io/library/a", Mode::Enforce, &["unsigned"]));
        audit.record(record("docker.io/library/b", Mode::Audit, &["no-policy"]));
        let mut text = String::new();
        for _ in 0..200 {
            text = std::fs::read_to_string(&path).unwrap();
            if text.lines().count() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let l = &lines[0];
        for key in [
            "time",
            "client",
            "name",
            "reference",
            "digest",
            "policy",
            "mode",
            "reasons",
            "message",
            "decision",
        ] {
            assert!(!l[key].is_null(), "{key} missing in {l}");
        }
        assert_eq!(l["decision"], "deny");
        assert_eq!(lines[1]["decision"], "would-deny");
        assert!(humantime::parse_rfc3339(l["time"].as_str().unwrap()).is_ok());
        // logrotate: the file is moved away, SIGHUP reopens a new one.
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        audit.reopen();
        audit.record(record("docker.io/library/c", Mode::Enforce, &["unsigned"]));
        for _ in 0..200 {
            if std::fs::read_to_string(&path)
                .map(|t| t.lines().count())
                .unwrap_or(0)
                == 1
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }

    #[test]
    fn a_full_disk_loses_records_counted_and_never_blocks() {
        // /dev/full opens for appending, and every write fails with ENOSPC.
        let metrics = Arc::new(Metrics::new());
        let audit = Audit::new(Some(Path::new("/dev/full")), false, metrics.clone()).unwrap();
        for _ in 0..3 {
            audit.record(record("docker.io/library/a", Mode::Enforce, &["unsigned"]));
        }
        let lost = || metrics.audit_errors.with_label_values(&["write"]).get();
        for _ in 0..100 {
            if lost() == 3 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(lost(), 3);
        // The dashboard still sees them.
        assert_eq!(audit.denials(10)["total"], 3);
    }

    #[test]
    fn stats_count_by_hour_mode_name_and_reason() {
        let audit = Audit::new(None, false, Arc::new(Metrics::new())).unwrap();
        for _ in 0..3 {
            audit.record(record("docker.io/library/a", Mode::Enforce, &["unsigned"]));
        }
        audit.record(record("docker.io/library/b", Mode::Audit, &["no-policy"]));
        audit.record(record("docker.io/library/ok", Mode::Enforce, &[]));
        let s = audit.stats();
        assert_eq!(s["blocked"]["last_hour"], 3);
        assert_eq!(s["would_block"]["last_day"], 1);
        assert_eq!(s["by_hour"].as_array().unwrap().len(), 24);
        assert_eq!(s["by_hour"][23]["enforce"], 3);
        assert_eq!(s["top_repositories"][0]["name"], "docker.io/library/a");
        assert_eq!(
            s["reasons"][0],
            serde_json::json!({"reason": "unsigned", "count": 3})
        );
        let d = audit.denials(2);
        assert_eq!(d["total"], 4);
        assert_eq!(
            d["denials"][0]["name"], "docker.io/library/b",
            "newest first"
        );
    }
}

//! An htpasswd file of bcrypt entries (`htpasswd -B`), read again when it
//! changes, and checked without telling a wrong password from an unknown
//! user by its timing.
//!
//! bcrypt is slow on purpose (a cost-10 check takes tens of milliseconds of
//! CPU), and a registry client sends its credentials on every request: a
//! pair that verified is remembered (by its SHA-256, never in clear) until
//! the file changes, so only the first request of a client pays. Checks run
//! on the blocking pool, never on a worker thread. The file format is
//! pullgate's to read (a line `user:hash`); the hashing is the `bcrypt`
//! crate's, whose comparison is constant-time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use sha2::{Digest as _, Sha256};

/// How often the file is looked at for a change, at most.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What identifies one version of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Stamp> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(path)?;
        Ok(Stamp {
            modified: m.modified().ok(),
            len: m.len(),
            inode: m.ino(),
        })
    }
}

/// The users of one version of the file.
#[derive(Default)]
pub struct Entries {
    users: HashMap<String, String>,
    stamp: Stamp,
    /// A hash of the file's usual cost, checked for users it does not
    /// have, so that they take as long as a wrong password.
    dummy: OnceLock<String>,
}

impl std::fmt::Debug for Entries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entries")
            .field("users", &self.users.len())
            .finish()
    }
}

impl Entries {
    /// Reads and parses the file; every bad line is named in the error.
    pub fn read(path: &Path) -> Result<Entries, String> {
        let stamp = Stamp::of(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let users = parse(&text).map_err(|p| format!("{}: {}", path.display(), p.join("; ")))?;
        Ok(Entries {
            users,
            stamp,
            dummy: OnceLock::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Whether `password` is `user`'s. Slow (bcrypt): call it off the
    /// async workers.
    fn check(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                let dummy = self.dummy.get_or_init(|| {
                    let cost = self
                        .users
                        .values()
                        .find_map(|h| h.get(4..6)?.parse().ok())
                        .unwrap_or(bcrypt::DEFAULT_COST);
                    bcrypt::hash("pullgate: no such user", cost).unwrap_or_default()
                });
                let _ = bcrypt::verify(password, dummy);
                false
            }
        }
    }
}

/// Parses htpasswd text: `user:hash` lines, `#` comments and blank lines
/// ignored. Only bcrypt hashes (`$2y$`, `$2b$`, `$2a$`) are accepted: the
/// others htpasswd can write (MD5-crypt, SHA-1, crypt, plain) are too weak
/// to guard a registry.
pub fn parse(text: &str) -> Result<HashMap<String, String>, Vec<String>> {
    let mut users = HashMap::new();
    let mut problems = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            problems.push(format!("line {n}: not \"user:hash\""));
            continue;
        };
        if user.is_empty() {
            problems.push(format!("line {n}: no user name before ':'"));
            continue;
        }
        // Bytes, not text: the file may hold any character where the
        // cost's digits go.
        let h = hash.as_bytes();
        let bcrypt = ["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p))
            && h.len() == 60
            && h[4..6].iter().all(u8::is_ascii_digit)
            && h[6] == b'$';
        if !bcrypt {
            problems.push(format!(
                "line {n}: user {user:?} does not have a bcrypt hash (only bcrypt entries are accepted: htpasswd -B)"
            ));
            continue;
        }
        if users.insert(user.to_owned(), hash.to_owned()).is_some() {
            problems.push(format!("line {n}: user {user:?} is listed twice"));
        }
    }
    if problems.is_empty() {
        Ok(users)
    } else {
        Err(problems)
    }
}

/// The file as the server uses it: its current entries, re-read when it
/// changes, and the credentials that verified.
pub struct Htpasswd {
    path: PathBuf,
    entries: ArcSwap<Entries>,
    /// The version of the file last looked at, read or not: a file that
    /// did not parse is not read again until it changes once more.
    seen: Mutex<Stamp>,
    checked: Mutex<Instant>,
    checking: AtomicBool,
    /// SHA-256 of `user \0 password` for pairs that verified.
    verified: moka::sync::Cache<[u8; 32], ()>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Htpasswd {
    pub fn new(
        path: PathBuf,
        entries: Arc<Entries>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Htpasswd {
        Htpasswd {
            path,
            seen: Mutex::new(entries.stamp),
            entries: ArcSwap::new(entries),
            checked: Mutex::new(Instant::now()),
            checking: AtomicBool::new(false),
            verified: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(600))
                .build(),
            metrics,
        }
    }

    /// Whether `password` is `user`'s, as the file says now.
    pub async fn verify(self: &Arc<Self>, user: &str, password: &str) -> bool {
        self.look_for_changes();
        let key: [u8; 32] = Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0])
            .chain_update(password.as_bytes())
            .finalize()
            .into();
        if self.verified.contains_key(&key) {
            return true;
        }
        let entries = self.entries.load_full();
        let (user, password) = (user.to_owned(), password.to_owned());
        let ok = tokio::task::spawn_blocking(move || entries.check(&user, &password))
            .await
            .unwrap_or(false);
        if ok {
            self.verified.insert(key, ());
        }
        ok
    }

    /// At most once per [`CHECK_EVERY`], looks (on the blocking pool)
    /// whether the file changed, and reads it again if so. A file that no
    /// longer parses keeps the entries in force, logged and counted.
    fn look_for_changes(self: &Arc<Self>) {
        {
            let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
            if checked.elapsed() < CHECK_EVERY {
                return;
            }
            *checked = Instant::now();
        }
        if self.checking.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            this.reload_if_changed();
            this.checking.store(false, Ordering::Release);
        });
    }

    fn reload_if_changed(&self) {
        let Ok(now) = Stamp::of(&self.path) else {
            return;
        };
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == now {
                return;
            }
            *seen = now;
        }
        match Entries::read(&self.path) {
            Ok(e) => {
                tracing::info!(path = %self.path.display(), users = e.len(), "htpasswd file changed: read again");
                self.entries.store(Arc::new(e));
                self.verified.invalidate_all();
                self.metrics.auth_reloads.with_label_values(&["ok"]).inc();
            }
            Err(message) => {
                tracing::error!(%message, "htpasswd file changed but cannot be used: the users read before stay in force");
                self.metrics
                    .auth_reloads
                    .with_label_values(&["error"])
                    .inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bcrypt_entries_are_accepted_and_each_bad_line_is_named() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let text = format!(
            "# users\nalice:{hash}\n\nbob:$apr1$abc$def\ncarol:{{SHA}}xyz\nnocolon\nalice:{hash}\n"
        );
        let problems = parse(&text).unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(
            problems[0].starts_with("line 4: user \"bob\""),
            "{problems:?}"
        );
        assert!(problems[0].contains("htpasswd -B"));
        assert!(problems[2].starts_with("line 6"));
        assert!(problems[3].contains("twice"));
        let users = parse(&format!("alice:{hash}\r\n")).unwrap();
        assert!(bcrypt::verify("s3cret", &users["alice"]).unwrap());
    }

    #[test]
    fn a_hash_with_a_wide_character_where_the_cost_goes_is_refused() {
        // 60 bytes, with a three-byte character across bytes 4..7, where
        // the two digits of the cost go: once a panic slicing the text.
        let hash = format!("$2b$\u{20ac}{}", "a".repeat(53));
        assert_eq!(hash.len(), 60);
        let problems = parse(&format!("alice:{hash}\n")).unwrap_err();
        assert!(problems[0].contains("bcrypt hash"), "{problems:?}");
    }

    #[test]
    fn a_wrong_password_and_an_unknown_user_both_fail() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let e = Entries {
            users: parse(&format!("alice:{hash}")).unwrap(),
            ..Entries::default()
        };
        assert!(e.check("alice", "s3cret"));
        assert!(!e.check("alice", "S3cret"));
        assert!(!e.check("mallory", "s3cret"));
        // The unknown user was checked against a hash of the file's cost.
        assert!(e.dummy.get().unwrap().starts_with("$2b$04$"));
    }

    #[tokio::test]
    async fn a_changed_file_is_read_again_and_a_broken_one_keeps_the_old_users() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        let write = |user: &str, pw: &str| {
            let h = bcrypt::hash(pw, 4).unwrap();
            std::fs::write(&path, format!("{user}:{h}\n")).unwrap();
        };
        write("alice", "one");
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let h = Arc::new(Htpasswd::new(
            path.clone(),
            Arc::new(Entries::read(&path).unwrap()),
            metrics.clone(),
        ));
        assert!(h.verify("alice", "one").await);
        write("bob", "two-and-longer");
        h.reload_if_changed();
        assert!(h.verify("bob", "two-and-longer").await);
        // The remembered pair went with the old file.
        assert!(!h.verify("alice", "one").await);
        std::fs::write(&path, "bob:plaintext-is-refused-here\n").unwrap();
        h.reload_if_changed();
        assert!(h.verify("bob", "two-and-longer").await);
        assert_eq!(metrics.auth_reloads.with_label_values(&["error"]).get(), 1);
        assert_eq!(metrics.auth_reloads.with_label_values(&["ok"]).get(), 1);
    }
}

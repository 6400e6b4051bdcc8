//! `[storage.s3]`: the shared bucket of gateway replicas.

use serde::Deserialize;
use toml::Spanned;

use super::Validator;

/// Where the replicas' shared bucket is and how to reach it.
#[derive(Clone)]
pub struct S3Config {
    /// `http://s3.internal:8333`: the engine's S3 endpoint (path-style).
    pub endpoint: reqwest::Url,
    pub bucket: String,
    pub region: String,
    /// Keys go under this (`pullgate/site-a`), without slashes at its ends;
    /// empty for the bucket's root.
    pub prefix: String,
    pub access_key: String,
    pub secret_key: String,
    /// Extra trusted roots (PEM) for an `https` endpoint.
    pub ca_pem: Option<Vec<u8>>,
    /// Least recently used blobs are removed from the bucket beyond this.
    pub max_size: Option<u64>,
    /// A blob some replica read within this long is never removed.
    pub min_idle: std::time::Duration,
}

impl std::fmt::Debug for S3Config {
    // The secret never goes into a log or a panic message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint.as_str())
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("max_size", &self.max_size)
            .field("min_idle", &self.min_idle)
            .finish_non_exhaustive()
    }
}

impl S3Config {
    /// `storage.s3.min_idle` when not given.
    pub const MIN_IDLE: std::time::Duration = std::time::Duration::from_secs(600);

    /// `s3://bucket/prefix at endpoint`, for logs and `/readyz`.
    pub fn describe(&self) -> String {
        let mut at = format!("s3://{}", self.bucket);
        if !self.prefix.is_empty() {
            at.push('/');
            at.push_str(&self.prefix);
        }
        format!("{at} at {}", self.endpoint.as_str().trim_end_matches('/'))
    }
}

#[derive(Deserialize)]
pub(super) struct RawS3 {
    endpoint: Option<Spanned<String>>,
    bucket: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    prefix: Option<Spanned<String>>,
    access_key_env: Option<Spanned<String>>,
    access_key_file: Option<Spanned<String>>,
    secret_key_env: Option<Spanned<String>>,
    secret_key_file: Option<Spanned<String>>,
    ca: Option<Spanned<String>>,
    max_size: Option<Spanned<String>>,
    min_idle: Option<Spanned<String>>,
}

impl Validator<'_> {
    pub(super) fn s3(&mut self, raw: &Spanned<RawS3>) -> Option<S3Config> {
        let at = raw;
        let raw = raw.get_ref();
        let endpoint = match &raw.endpoint {
            None => {
                self.problem(
                    "storage.s3.endpoint",
                    at,
                    "is missing: the engine's S3 URL, e.g. \"http://s3.internal:8333\"",
                );
                None
            }
            Some(e) => match reqwest::Url::parse(e.get_ref()) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                    if u.path() != "/" || u.query().is_some() {
                        self.problem(
                            "storage.s3.endpoint",
                            e,
                            "must be the engine's base URL, without a path (the bucket is `bucket`, key prefixes are `prefix`)",
                        );
                        None
                    } else {
                        Some(u)
                    }
                }
                _ => {
                    self.problem(
                        "storage.s3.endpoint",
                        e,
                        format!("{:?} is not an http:// or https:// URL", e.get_ref()),
                    );
                    None
                }
            },
        };
        let bucket = match &raw.bucket {
            None => {
                self.problem("storage.s3.bucket", at, "is missing: the bucket's name");
                None
            }
            Some(b) if !valid_bucket(b.get_ref()) => {
                self.problem(
                    "storage.s3.bucket",
                    b,
                    format!(
                        "{:?} is not a bucket name (3 to 63 lowercase letters, digits, '.' and '-', starting and ending with a letter or digit)",
                        b.get_ref()
                    ),
                );
                None
            }
            Some(b) => Some(b.get_ref().clone()),
        };
        let region = raw
            .region
            .as_ref()
            .map_or_else(|| "us-east-1".to_owned(), |r| r.get_ref().clone());
        let prefix = match &raw.prefix {
            None => Some(String::new()),
            Some(p) => {
                let trimmed = p.get_ref().trim_matches('/');
                let bad = trimmed
                    .split('/')
                    .any(|c| c.is_empty() || c == "." || c == "..")
                    && !trimmed.is_empty();
                if bad || trimmed.chars().any(|c| c.is_control()) {
                    self.problem(
                        "storage.s3.prefix",
                        p,
                        "must be key components separated by '/', without empty, '.' or '..' ones",
                    );
                    None
                } else {
                    Some(trimmed.to_owned())
                }
            }
        };
        let access_key = self.secret(
            "access_key",
            at,
            raw.access_key_env.as_ref(),
            raw.access_key_file.as_ref(),
        );
        let secret_key = self.secret(
            "secret_key",
            at,
            raw.secret_key_env.as_ref(),
            raw.secret_key_file.as_ref(),
        );
        let ca_pem = match &raw.ca {
            None => Some(None),
            Some(c) => match std::fs::read(self.path(c.get_ref())) {
                Ok(b) => Some(Some(b)),
                Err(e) => {
                    self.problem(
                        "storage.s3.ca",
                        c,
                        format!("cannot read {:?}: {e}", c.get_ref()),
                    );
                    None
                }
            },
        };
        let max_size = match &raw.max_size {
            None => Some(None),
            Some(m) => self.size("storage.s3.max_size", m).map(Some),
        };
        let min_idle = match &raw.min_idle {
            None => Some(S3Config::MIN_IDLE),
            Some(m) => match self.duration("storage.s3.min_idle", m) {
                // Replicas mark what they read every fifth of it.
                Some(d) if d < std::time::Duration::from_secs(1) => {
                    self.problem(
                        "storage.s3.min_idle",
                        m,
                        "must be at least 1s: replicas mark the blobs they stream every fifth of it",
                    );
                    None
                }
                d => d,
            },
        };
        Some(S3Config {
            max_size: max_size?,
            min_idle: min_idle?,
            endpoint: endpoint?,
            bucket: bucket?,
            region,
            prefix: prefix?,
            access_key: access_key?,
            secret_key: secret_key?,
            ca_pem: ca_pem?,
        })
    }

    /// `<name>_env` or `<name>_file`, exactly one: secrets are never inline.
    fn secret(
        &mut self,
        name: &str,
        at: &Spanned<RawS3>,
        env: Option<&Spanned<String>>,
        file: Option<&Spanned<String>>,
    ) -> Option<String> {
        let key = |k: &str| format!("storage.s3.{name}_{k}");
        match (env, file) {
            (Some(var), None) => match std::env::var(var.get_ref()) {
                Ok(v) if !v.is_empty() => Some(v),
                _ => {
                    self.problem(
                        key("env"),
                        var,
                        format!("environment variable {:?} is not set", var.get_ref()),
                    );
                    None
                }
            },
            (None, Some(f)) => match std::fs::read_to_string(self.path(f.get_ref())) {
                Ok(v) if !v.trim().is_empty() => Some(v.trim().to_owned()),
                Ok(_) => {
                    self.problem(key("file"), f, format!("{:?} is empty", f.get_ref()));
                    None
                }
                Err(e) => {
                    self.problem(
                        key("file"),
                        f,
                        format!("cannot read {:?}: {e}", f.get_ref()),
                    );
                    None
                }
            },
            (Some(var), Some(_)) => {
                self.problem(
                    key("env"),
                    var,
                    format!("give {name}_env or {name}_file, not both"),
                );
                None
            }
            (None, None) => {
                self.problem(
                    format!("storage.s3.{name}_env"),
                    at,
                    format!("is missing: give {name}_env or {name}_file (credentials are never written inline)"),
                );
                None
            }
        }
    }
}

/// S3's bucket naming rules, as far as a config check needs them.
fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        && b.as_bytes()[0].is_ascii_alphanumeric()
        && b.as_bytes()[b.len() - 1].is_ascii_alphanumeric()
}

//! Configuration: the TOML file, parsed and validated before anything starts.
//!
//! Every problem is collected and reported at once, each with its key path
//! and line, so a bad file is fixed in one round. Relative paths in a file
//! are taken relative to the file's directory. Validation only reads: it
//! opens no log and builds nothing of the running proxy (start-up probes
//! such as the audit file are `audit::probe`'s). A leaf: depends on
//! `oci::names` and `keys` only.

mod gateway;
mod keys_known;
mod pins;
mod s3;

pub use gateway::{dns_as_path, AuthConfig, TenantConfig, TlsConfig};

pub use pins::{write_pins_file, Pins};
pub use s3::S3Config;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::oci::names::Hosts;
use serde::Deserialize;
use toml::Spanned;

/// The configuration `pullgate serve` runs without `--config`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/default.toml");

/// Default cap on a manifest body.
pub const DEFAULT_MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from, for messages.
    pub source: String,
    pub server: ServerConfig,
    pub admin: Option<AdminConfig>,
    pub storage: StorageConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub policies: Vec<PolicyConfig>,
    pub audit: AuditConfig,
    /// `[[rewrite]]`, names canonical.
    pub rewrites: Vec<Rewrite>,
    /// `[pins]` and the pins file together.
    pub pins: Pins,
    /// Where `pullgate pin` writes, and where more pins are read from.
    pub pins_file: Option<PathBuf>,
    /// `[bases]`, in file order.
    pub bases: Vec<BaseSet>,
    /// `[auth]`: HTTP Basic users.
    pub auth: Option<AuthConfig>,
    /// `[[tenant]]`, in file order.
    pub tenants: Vec<TenantConfig>,
    /// `[bundles]`: whose bundle signatures `pullgate import` accepts.
    pub bundles: Option<BundlesConfig>,
    /// `[identities]`: keyless signers, in file order.
    pub identities: Vec<crate::keyless::Identity>,
    /// The verifier of keyless signatures over `[sigstore] trusted_root`
    /// (the embedded production root by default); built when
    /// `[identities]` has an entry.
    pub keyless: Option<std::sync::Arc<crate::keyless::Keyless>>,
}

/// `[bundles]`.
#[derive(Debug, Clone)]
pub struct BundlesConfig {
    /// A bundle must be signed by one of these keys.
    pub signed_by: Vec<TrustedKey>,
}

/// One `[[rewrite]]`, with canonical names (`<upstream>/<repository>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    /// The name pulls ask for, or the prefix of the names under it.
    pub from: String,
    /// The name served instead, or the prefix the rest is carried over to.
    pub to: String,
    /// Written with a trailing `/**`: every name under `from`.
    pub prefix: bool,
}

/// A named set of base images (`[bases]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseSet {
    pub name: String,
    pub images: Vec<BaseRef>,
}

/// One base image reference, routed like a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseRef {
    /// As written in the config.
    pub image: String,
    /// The upstream's configured name.
    pub upstream: String,
    pub repo: crate::oci::names::RepoName,
    /// `<upstream>/<repository>`.
    pub canonical: String,
    pub reference: crate::oci::names::Reference,
}

/// What `tag_drift` says to do when a tag moves to content policy denies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagDrift {
    /// Keep serving the tag's last approved digest, with a warning.
    KeepApproved,
    /// Deny the pull like any other.
    Deny,
}

/// `[audit]`: where decisions are recorded.
#[derive(Debug, Clone, Default)]
pub struct AuditConfig {
    /// One JSON line per deny or would-deny; `None`: the structured log.
    pub path: Option<PathBuf>,
    /// Where `path` is written in the file, for start-up problems.
    pub path_line: Option<usize>,
    /// Also one line per approval (every manifest served under a policy).
    pub approvals: bool,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Manifests larger than this are refused, from clients' upstreams alike.
    pub max_manifest_size: u64,
    /// How long SIGTERM waits for in-flight requests before closing them.
    pub shutdown_timeout: Duration,
    /// Threads that serve connections; `None`: one per CPU.
    pub workers: Option<usize>,
    /// Connections beyond this many are answered 503 and closed.
    pub max_connections: usize,
    /// How long a connection may take to send a whole request head, from
    /// when it is ready for one (idle keep-alive connections included).
    pub header_timeout: Duration,
    /// How long a response may wait on a client that does not read it.
    pub send_timeout: Duration,
    /// `server.tls`: the listener speaks TLS.
    pub tls: Option<TlsConfig>,
}

pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Longest duration any key takes.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub path: PathBuf,
    /// Blobs beyond this total are evicted, least recently used first.
    pub max_size: Option<u64>,
    /// How long a tag's digest is trusted before it is re-checked upstream.
    pub tag_ttl: Duration,
    /// How often base images given by tag are resolved again.
    pub base_refresh: Duration,
    /// How many digests of one base tag stay allowed (newest first); all when `None`.
    pub base_keep: Option<usize>,
    /// `[storage.s3]`: the bucket gateway replicas share; `path` is then
    /// each replica's local tier.
    pub s3: Option<S3Config>,
}

#[derive(Clone)]
pub struct UpstreamConfig {
    /// The registry host as clients name it (`docker.io`).
    pub name: String,
    /// `None` for an offline upstream (`offline = true`): served only from
    /// what `pullgate import` brought in; nothing dials out.
    pub url: Option<reqwest::Url>,
    pub default: bool,
    /// Other spellings of the registry host (`index.docker.io`), routed here.
    pub aliases: Vec<String>,
    pub credentials: Option<Credentials>,
    /// Extra trusted roots (PEM) for this upstream's TLS.
    pub ca_pem: Option<Vec<u8>>,
    /// An upstream body that sends nothing for this long is abandoned.
    pub idle_timeout: Duration,
    /// The repository path this upstream serves under (`docker.io` for
    /// `https://gateway:5443/docker.io`): another pullgate, a Harbor proxy
    /// project, an Artifactory remote. Empty for a plain registry.
    pub prefix: String,
    /// `client_cert` and `client_key` (PEM, concatenated): mTLS to the upstream.
    pub client_identity: Option<Vec<u8>>,
}

impl UpstreamConfig {
    /// Served only from imported bundles.
    pub fn offline(&self) -> bool {
        self.url.is_none()
    }
}

impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("name", &self.name)
            .field("url", &self.url.as_ref().map(|u| u.as_str()))
            .field("default", &self.default)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|c| &c.username),
            )
            .field("ca", &self.ca_pem.is_some())
            .field("prefix", &self.prefix)
            .field("client_cert", &self.client_identity.is_some())
            .finish()
    }
}

#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Audit,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// Shared with every verdict it gives.
    pub name: std::sync::Arc<str>,
    pub patterns: Vec<String>,
    pub matcher: GlobSet,
    pub mode: Mode,
    /// Everything this policy matches is denied.
    pub deny: bool,
    /// A valid signature by any one of these keys, or of
    /// `signed_by_identities`, is required.
    pub signed_by: Vec<TrustedKey>,
    /// The keyless signers `signed_by` names.
    pub signed_by_identities: Vec<crate::keyless::Identity>,
    /// Their verifier (the config's), when there are any.
    pub keyless: Option<std::sync::Arc<crate::keyless::Keyless>>,
    /// Only digest references pass; tags are denied (`tag-not-allowed`).
    pub require_digest: bool,
    /// Tags matching these globs are denied (`tag-not-allowed`).
    pub deny_tags: Option<GlobSet>,
    /// Names of `[bases]` sets; the image must be built on one of them.
    pub bases: Vec<String>,
    pub tag_drift: TagDrift,
}

impl PolicyConfig {
    /// Whether content is checked beyond the name: signatures or bases.
    /// Such policies gate blobs and remember approved tags.
    pub fn checks_content(&self) -> bool {
        !self.deny && (self.requires_signature() || !self.bases.is_empty())
    }

    /// Whether a signature (by a key or a keyless identity) is required.
    pub fn requires_signature(&self) -> bool {
        !self.signed_by.is_empty() || !self.signed_by_identities.is_empty()
    }
}

/// A key named in `[keys]`.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    pub name: String,
    pub key: crate::keys::PublicKey,
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

/// Every problem found in a config file.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub source: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {n} problem{}",
            self.source,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            match p.line {
                Some(line) => write!(f, "\n  line {line}: {}: {}", p.key, p.message)?,
                None => write!(f, "\n  {}: {}", p.key, p.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// ---- the file as written --------------------------------------------------

#[derive(Deserialize, Default)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    admin: Option<RawAdmin>,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    upstream: Vec<RawUpstream>,
    #[serde(default)]
    policy: Vec<RawPolicy>,
    keys: Option<Spanned<toml::Table>>,
    bases: Option<Spanned<toml::Table>>,
    audit: Option<RawAudit>,
    #[serde(default)]
    rewrite: Vec<RawRewrite>,
    pins: Option<Spanned<toml::Table>>,
    pins_file: Option<Spanned<String>>,
    auth: Option<gateway::RawAuth>,
    #[serde(default)]
    tenant: Vec<gateway::RawTenant>,
    bundles: Option<RawBundles>,
    identities: Option<Spanned<toml::Table>>,
    sigstore: Option<RawSigstore>,
}

#[derive(Deserialize)]
struct RawSigstore {
    trusted_root: Option<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawBundles {
    signed_by: Spanned<Vec<String>>,
}

#[derive(Deserialize)]
struct RawRewrite {
    from: Spanned<String>,
    to: Spanned<String>,
}

#[derive(Deserialize)]
struct RawAudit {
    path: Option<Spanned<String>>,
    #[serde(default)]
    approvals: bool,
}

#[derive(Deserialize, Default)]
struct RawServer {
    listen: Option<Spanned<String>>,
    max_manifest_size: Option<Spanned<String>>,
    shutdown_timeout: Option<Spanned<String>>,
    workers: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
    header_timeout: Option<Spanned<String>>,
    send_timeout: Option<Spanned<String>>,
    tls: Option<Spanned<gateway::RawTls>>,
}

#[derive(Deserialize)]
struct RawAdmin {
    listen: Spanned<String>,
}

#[derive(Deserialize, Default)]
struct RawStorage {
    path: Option<Spanned<String>>,
    max_size: Option<Spanned<String>>,
    tag_ttl: Option<Spanned<String>>,
    base_refresh: Option<Spanned<String>>,
    base_keep: Option<Spanned<i64>>,
    s3: Option<Spanned<s3::RawS3>>,
}

#[derive(Deserialize)]
struct RawUpstream {
    name: Spanned<String>,
    url: Option<Spanned<String>>,
    #[serde(default)]
    offline: bool,
    #[serde(default)]
    default: bool,
    username: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    password_env: Option<Spanned<String>>,
    ca: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    #[serde(default)]
    aliases: Vec<Spanned<String>>,
    client_cert: Option<Spanned<String>>,
    client_key: Option<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawPolicy {
    name: Spanned<String>,
    #[serde(rename = "match")]
    patterns: Spanned<Vec<Spanned<String>>>,
    mode: Option<Spanned<String>>,
    #[serde(default)]
    deny: bool,
    signed_by: Option<Spanned<Vec<String>>>,
    bases: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    require_digest: bool,
    deny_tags: Option<Spanned<Vec<Spanned<String>>>>,
    tag_drift: Option<Spanned<String>>,
}

// ---- loading and validation -----------------------------------------------

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source: source.clone(),
            problems: vec![Problem {
                key: "(file)".into(),
                line: None,
                message: format!("cannot read: {e}"),
            }],
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Config::parse(&text, &source, &base)
    }

    /// The embedded default: a plain caching mirror of the big public registries.
    pub fn embedded() -> Config {
        Config::parse(
            EMBEDDED_DEFAULT,
            "(embedded default config)",
            Path::new("."),
        )
        .expect("the embedded default config is valid")
    }

    /// Parses and validates config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, source: &str, base: &Path) -> Result<Config, ConfigError> {
        let mut v = Validator {
            text,
            base,
            problems: Vec::new(),
            unusable_keys: Vec::new(),
            unusable_identities: Vec::new(),
        };
        // Unknown keys first: they are problems like the others, not an
        // error that hides them (the typed parse below ignores them).
        for u in keys_known::unknown_keys(text).unwrap_or_default() {
            v.problems.push(Problem {
                key: u.key,
                line: u.offset.map(|o| line_of(text, o)),
                message: u.message,
            });
        }
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let line = e.span().map(|s| line_of(text, s.start));
                v.problems.push(Problem {
                    key: "(syntax)".into(),
                    line,
                    message: e.message().trim().to_owned(),
                });
                v.problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
                return Err(v.into_error(source));
            }
        };
        let config = v.validate(raw, source);
        // In file order; problems without a line last.
        v.problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
        if v.problems.is_empty() {
            Ok(config)
        } else {
            Err(v.into_error(source))
        }
    }

    /// The upstream named `name`.
    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

struct Validator<'a> {
    text: &'a str,
    base: &'a Path,
    problems: Vec<Problem>,
    /// `[keys]` entries whose file could not be read or used: already
    /// reported, so a policy naming them is not told they are undefined.
    unusable_keys: Vec<String>,
    /// `[identities]` entries reported as problems, so that `signed_by`
    /// naming them does not report them again as undefined.
    unusable_identities: Vec<String>,
}

impl Validator<'_> {
    fn into_error(self, source: &str) -> ConfigError {
        ConfigError {
            source: source.to_owned(),
            problems: self.problems,
        }
    }

    fn problem<T>(&mut self, key: impl Into<String>, at: &Spanned<T>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            line: Some(line_of(self.text, at.span().start)),
            message: message.into(),
        });
    }

    /// A problem with one entry of a table: reported at the entry's own
    /// line when it can be found, else at the table's.
    fn entry_problem(
        &mut self,
        key: impl Into<String>,
        table: &Spanned<toml::Table>,
        entry: &str,
        message: impl Into<String>,
    ) {
        let start = table.span().start.min(self.text.len());
        let quoted = format!("\"{entry}\"");
        let offset = self.text[start..]
            .split_inclusive('\n')
            .scan(start, |at, l| {
                let here = *at;
                *at += l.len();
                Some((here, l))
            })
            .find(|(_, l)| {
                let t = l.trim_start();
                [entry, quoted.as_str()].iter().any(|k| {
                    t.strip_prefix(k)
                        .is_some_and(|rest| rest.trim_start().starts_with('='))
                })
            })
            .map_or(start, |(at, _)| at);
        self.problems.push(Problem {
            key: key.into(),
            line: Some(line_of(self.text, offset)),
            message: message.into(),
        });
    }

    fn problem_nowhere(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            line: None,
            message: message.into(),
        });
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn addr(&mut self, key: &str, s: &Spanned<String>) -> Option<SocketAddr> {
        match s.get_ref().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    key,
                    s,
                    format!(
                        "{:?} is not an address:port (e.g. \"127.0.0.1:5000\")",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn duration(&mut self, key: &str, s: &Spanned<String>) -> Option<Duration> {
        match humantime::parse_duration(s.get_ref()) {
            // Deadlines are computed from these; a value past any clock's
            // range would overflow them.
            Ok(d) if d > MAX_DURATION => {
                self.problem(
                    key,
                    s,
                    format!("{:?} is too long: at most 100 years", s.get_ref()),
                );
                None
            }
            Ok(d) => Some(d),
            Err(_) => {
                self.problem(
                    key,
                    s,
                    format!(
                        "{:?} is not a duration: a duration is a positive number and a unit (ms, s, m, h, d), e.g. \"30s\", \"5m\", \"1h\", \"1h30m\"",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn size(&mut self, key: &str, s: &Spanned<String>) -> Option<u64> {
        match s.get_ref().parse::<bytesize::ByteSize>() {
            Ok(b) => Some(b.as_u64()),
            Err(e) => {
                self.problem(
                    key,
                    s,
                    format!(
                        "{:?} is not a size ({e}; e.g. \"512MiB\", \"100GiB\")",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn validate(&mut self, raw: RawConfig, source: &str) -> Config {
        let tls = self.tls(raw.server.tls.as_ref());
        let auth = self.auth(raw.auth.as_ref());

        let listen = match &raw.server.listen {
            Some(s) => self.addr("server.listen", s),
            None => Some(SocketAddr::from(([127, 0, 0, 1], 5000))),
        };
        let max_manifest_size = match &raw.server.max_manifest_size {
            Some(s) => self.size("server.max_manifest_size", s),
            None => Some(DEFAULT_MAX_MANIFEST_SIZE),
        };
        let shutdown_timeout = match &raw.server.shutdown_timeout {
            Some(s) => self.duration("server.shutdown_timeout", s),
            None => Some(Duration::from_secs(30)),
        };
        let workers = match &raw.server.workers {
            Some(w) if !(1..=1024).contains(w.get_ref()) => {
                self.problem(
                    "server.workers",
                    w,
                    "must be between 1 and 1024 (leave it out for one per CPU)",
                );
                None
            }
            Some(w) => usize::try_from(*w.get_ref()).ok(),
            None => None,
        };
        let max_connections = match &raw.server.max_connections {
            Some(m) if !(1..=1_000_000).contains(m.get_ref()) => {
                self.problem(
                    "server.max_connections",
                    m,
                    format!("must be between 1 and 1000000 (default {DEFAULT_MAX_CONNECTIONS})"),
                );
                None
            }
            Some(m) => usize::try_from(*m.get_ref()).ok(),
            None => None,
        };
        let mut timeout = |key: &str, s: &Option<Spanned<String>>| {
            let d = self.duration(key, s.as_ref()?)?;
            if d.is_zero() {
                self.problem(
                    key,
                    s.as_ref()?,
                    "must be more than zero: a connection with no deadline can be held forever",
                );
                return None;
            }
            Some(d)
        };
        let header_timeout = timeout("server.header_timeout", &raw.server.header_timeout);
        let send_timeout = timeout("server.send_timeout", &raw.server.send_timeout);
        let admin = raw
            .admin
            .as_ref()
            .and_then(|a| self.addr("admin.listen", &a.listen))
            .map(|listen| AdminConfig { listen });

        let path = match &raw.storage.path {
            Some(p) if p.get_ref().is_empty() => {
                self.problem("storage.path", p, "must not be empty");
                None
            }
            Some(p) => Some(self.path(p.get_ref())),
            None => Some(self.path("pullgate-data")),
        };
        let max_size = match &raw.storage.max_size {
            Some(s) => self.size("storage.max_size", s).map(Some),
            None => Some(None),
        };
        let tag_ttl = match &raw.storage.tag_ttl {
            Some(s) => self.duration("storage.tag_ttl", s),
            None => Some(Duration::from_secs(300)),
        };

        if let (Some(l), Some(a)) = (listen, admin.as_ref()) {
            if l == a.listen {
                let at = &raw.admin.as_ref().expect("admin parsed").listen;
                self.problem("admin.listen", at, "must differ from server.listen");
            }
        }
        if let (Some(0), Some(s)) = (max_manifest_size, &raw.server.max_manifest_size) {
            self.problem("server.max_manifest_size", s, "must be more than 0 bytes");
        }

        let base_refresh = match &raw.storage.base_refresh {
            Some(s) => match self.duration("storage.base_refresh", s) {
                Some(d) if d < Duration::from_secs(1) => {
                    self.problem("storage.base_refresh", s, "must be at least 1s");
                    None
                }
                d => d,
            },
            None => Some(Duration::from_secs(3600)),
        };
        let base_keep = match &raw.storage.base_keep {
            Some(k) if *k.get_ref() < 1 => {
                self.problem(
                    "storage.base_keep",
                    k,
                    "must be at least 1 (leave it out to keep every digest)",
                );
                None
            }
            Some(k) => Some(*k.get_ref() as usize),
            None => None,
        };

        let s3 = raw.storage.s3.as_ref().and_then(|r| self.s3(r));

        let upstreams = self.upstreams(&raw.upstream);
        let router = hosts(&upstreams);
        let keys = self.keys(raw.keys.as_ref());
        let identities = self.identities(raw.identities.as_ref(), &keys);
        let keyless = self.keyless(&identities, raw.sigstore.as_ref());
        let bases = self.bases(raw.bases.as_ref(), &router);
        let upstream_names: Vec<&str> = raw
            .upstream
            .iter()
            .map(|u| u.name.get_ref().as_str())
            .collect();
        let policies = self.policies(
            &raw.policy,
            (&keys, &identities, keyless.as_ref()),
            &bases,
            &upstream_names,
        );
        let tenants = self.tenants(&raw.tenant, tls.as_ref(), auth.as_ref(), &upstream_names);
        let bundles = raw.bundles.as_ref().map(|b| BundlesConfig {
            signed_by: self.bundle_keys(&b.signed_by, &keys),
        });
        let rewrites = self.rewrites(&raw.rewrite, &upstreams);
        let mut pins = Pins::default();
        if let Some(table) = &raw.pins {
            self.pins(&mut pins, table, "pins", &router);
        }
        let pins_file = raw.pins_file.as_ref().map(|f| {
            let path = self.path(f.get_ref());
            self.pins_file(&mut pins, &path, f, &router);
            path
        });

        let audit = match &raw.audit {
            None => AuditConfig::default(),
            Some(a) => AuditConfig {
                path: a.path.as_ref().map(|p| self.path(p.get_ref())),
                path_line: a.path.as_ref().map(|p| line_of(self.text, p.span().start)),
                approvals: a.approvals,
            },
        };
        Config {
            source: source.to_owned(),
            audit,
            server: ServerConfig {
                listen: listen.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 5000))),
                max_manifest_size: max_manifest_size.unwrap_or(DEFAULT_MAX_MANIFEST_SIZE),
                shutdown_timeout: shutdown_timeout.unwrap_or(Duration::from_secs(30)),
                workers,
                max_connections: max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
                header_timeout: header_timeout.unwrap_or(DEFAULT_HEADER_TIMEOUT),
                send_timeout: send_timeout.unwrap_or(DEFAULT_SEND_TIMEOUT),
                tls,
            },
            admin,
            storage: StorageConfig {
                path: path.unwrap_or_default(),
                max_size: max_size.flatten(),
                tag_ttl: tag_ttl.unwrap_or(Duration::from_secs(300)),
                base_refresh: base_refresh.unwrap_or(Duration::from_secs(3600)),
                base_keep,
                s3,
            },
            upstreams,
            policies,
            rewrites,
            pins,
            pins_file,
            bases,
            auth,
            tenants,
            bundles,
            identities,
            keyless,
        }
    }

    /// `[identities]`: each `NAME = { issuer, subject | subject_regex }`; a
    /// name that is also a key is refused (signed_by names both).
    fn identities(
        &mut self,
        raw: Option<&Spanned<toml::Table>>,
        keys: &[TrustedKey],
    ) -> Vec<crate::keyless::Identity> {
        use crate::keyless::{Identity, Subject};
        let Some(table) = raw else { return Vec::new() };
        let mut out = Vec::new();
        for (name, value) in table.get_ref() {
            let key = format!("identities.{name}");
            // Unusable until it is read whole (then taken off again).
            self.unusable_identities.push(name.clone());
            let Some(t) = value.as_table() else {
                self.entry_problem(
                    key,
                    table,
                    name,
                    "must be a table: { issuer = \"https://...\", subject = \"...\" } (or subject_regex)",
                );
                continue;
            };
            if keys.iter().any(|k| &k.name == name) {
                self.entry_problem(
                    key.clone(),
                    table,
                    name,
                    format!("{name:?} is also a key in [keys]: signed_by names both, so a name means one signer"),
                );
            }
            for k in t.keys() {
                if !["issuer", "subject", "subject_regex"].contains(&k.as_str()) {
                    self.entry_problem(
                        format!("{key}.{k}"),
                        table,
                        name,
                        format!(
                            "unknown key {k:?}: expected one of issuer, subject, subject_regex"
                        ),
                    );
                }
            }
            let issuer = match t.get("issuer").map(|v| v.as_str()) {
                Some(None) => {
                    self.entry_problem(
                        format!("{key}.issuer"),
                        table,
                        name,
                        "must be a string: the OIDC issuer URL",
                    );
                    continue;
                }
                Some(Some(i)) => Some(i),
                None => None,
            };
            let issuer = match issuer {
                Some(i)
                    if reqwest::Url::parse(i)
                        .is_ok_and(|u| matches!(u.scheme(), "https" | "http")) =>
                {
                    i.to_string()
                }
                Some(i) => {
                    self.entry_problem(
                        format!("{key}.issuer"),
                        table,
                        name,
                        format!(
                            "{i:?} is not an OIDC issuer URL (like https://accounts.google.com)"
                        ),
                    );
                    continue;
                }
                None => {
                    self.entry_problem(format!("{key}.issuer"), table, name, "missing: the OIDC issuer the certificate must name (like https://accounts.google.com)");
                    continue;
                }
            };
            let subject = match (
                t.get("subject").map(|v| v.as_str()),
                t.get("subject_regex").map(|v| v.as_str()),
            ) {
                (Some(Some(s)), None) if !s.is_empty() => Subject::Exact(s.to_string()),
                (None, Some(Some(r))) if !r.is_empty() => match Subject::regex(r) {
                    Ok(s) => s,
                    Err(e) => {
                        self.entry_problem(
                            format!("{key}.subject_regex"),
                            table,
                            name,
                            format!("not a regex: {e}"),
                        );
                        continue;
                    }
                },
                (Some(_), Some(_)) => {
                    self.entry_problem(key, table, name, "give subject or subject_regex, not both");
                    continue;
                }
                _ => {
                    self.entry_problem(key, table, name, "needs subject (the certificate's SAN, exactly) or subject_regex (the whole SAN must match), a non-empty string");
                    continue;
                }
            };
            self.unusable_identities.retain(|n| n != name);
            out.push(Identity {
                name: name.clone(),
                issuer,
                subject,
            });
        }
        out
    }

    /// The keyless verifier, when identities need one: over `[sigstore]
    /// trusted_root`, else the embedded production root.
    fn keyless(
        &mut self,
        identities: &[crate::keyless::Identity],
        raw: Option<&RawSigstore>,
    ) -> Option<std::sync::Arc<crate::keyless::Keyless>> {
        use crate::keyless::{Keyless, Root};
        let file = raw.and_then(|r| r.trusted_root.as_ref());
        let path = file.map(|f| self.path(f.get_ref()));
        // A root given is checked even when no identity uses it yet.
        if identities.is_empty() && path.is_none() {
            return None;
        }
        let root = match &path {
            Some(p) => Root::File(p),
            None => Root::Production,
        };
        match Keyless::new(root) {
            Ok(k) => Some(std::sync::Arc::new(k)),
            Err(e) => {
                match file {
                    Some(f) => self.problem("sigstore.trusted_root", f, e.to_string()),
                    None => self.problem_nowhere("sigstore", e.to_string()),
                }
                None
            }
        }
    }

    fn bundle_keys(
        &mut self,
        names: &Spanned<Vec<String>>,
        keys: &[TrustedKey],
    ) -> Vec<TrustedKey> {
        if names.get_ref().is_empty() {
            self.problem(
                "bundles.signed_by",
                names,
                "names no key: list the [keys] whose bundle signatures `pullgate import` accepts, or leave [bundles] out to accept unsigned bundles",
            );
        }
        let mut out = Vec::new();
        for name in names.get_ref() {
            match keys.iter().find(|k| &k.name == name) {
                Some(k) => out.push(k.clone()),
                None if self.unusable_keys.contains(name) => {}
                None => self.problem(
                    "bundles.signed_by",
                    names,
                    format!("key {name:?} is not defined in [keys]"),
                ),
            }
        }
        out
    }

    fn upstreams(&mut self, raw: &[RawUpstream]) -> Vec<UpstreamConfig> {
        if raw.is_empty() {
            self.problem_nowhere("upstream", "at least one [[upstream]] is needed");
        }
        let mut out = Vec::new();
        let mut defaults = 0;
        for (i, u) in raw.iter().enumerate() {
            let key = |k: &str| format!("upstream[{i}].{k}");
            let name = u.name.get_ref();
            let name_ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-:".contains(&b));
            if !name_ok {
                self.problem(
                    key("name"),
                    &u.name,
                    format!(
                        "{name:?} is not a registry host name (lowercase host, optional :port)"
                    ),
                );
            }
            if raw[..i].iter().any(|o| o.name.get_ref() == name) {
                self.problem(
                    key("name"),
                    &u.name,
                    format!("upstream {name:?} is configured twice"),
                );
            }
            if u.default {
                defaults += 1;
                if defaults > 1 {
                    self.problem(
                        key("default"),
                        &u.name,
                        "only one upstream can be the default",
                    );
                }
            }
            let url = match (&u.url, u.offline) {
                (None, true) => Some(None),
                (Some(url), true) => {
                    self.problem(
                        key("url"),
                        url,
                        "an offline upstream has no url: it is served only from what `pullgate import` brought in, and never dials out",
                    );
                    None
                }
                (None, false) => {
                    self.problem(
                        key("url"),
                        &u.name,
                        "missing: an upstream needs a url, or offline = true (served only from imported bundles)",
                    );
                    None
                }
                (Some(url), false) => self.upstream_url(&key("url"), url).map(Some),
            };
            if u.offline {
                for (k, given) in [
                    ("username", u.username.is_some()),
                    ("password_file", u.password_file.is_some()),
                    ("password_env", u.password_env.is_some()),
                    ("ca", u.ca.is_some()),
                    ("client_cert", u.client_cert.is_some()),
                    ("client_key", u.client_key.is_some()),
                    ("idle_timeout", u.idle_timeout.is_some()),
                ] {
                    if given {
                        self.problem(
                            key(k),
                            &u.name,
                            format!("{k} is for a registry that is dialled; an offline upstream never dials out"),
                        );
                    }
                }
            }
            let client_identity = match (&u.client_cert, &u.client_key) {
                (None, None) => None,
                (Some(cert), Some(k)) => {
                    let (cp, kp) = (self.path(cert.get_ref()), self.path(k.get_ref()));
                    match crate::tls::certified_key(&cp, &kp) {
                        Ok(_) => match (std::fs::read(&cp), std::fs::read(&kp)) {
                            (Ok(mut pem), Ok(key_pem)) => {
                                pem.push(b'\n');
                                pem.extend_from_slice(&key_pem);
                                Some(pem)
                            }
                            (Err(e), _) | (_, Err(e)) => {
                                self.problem(key("client_cert"), cert, format!("cannot read: {e}"));
                                None
                            }
                        },
                        Err(e) => {
                            let (k2, at) = match e.file {
                                crate::tls::File::Key => (key("client_key"), k),
                                _ => (key("client_cert"), cert),
                            };
                            self.problem(k2, at, e.message);
                            None
                        }
                    }
                }
                (Some(at), None) | (None, Some(at)) => {
                    self.problem(
                        key("client_cert"),
                        at,
                        "client_cert and client_key go together (mTLS to the upstream)",
                    );
                    None
                }
            };
            let password = match (&u.password_file, &u.password_env) {
                (Some(f), None) => match std::fs::read_to_string(self.path(f.get_ref())) {
                    Ok(p) => Some(p.trim_end_matches(['\r', '\n']).to_owned()),
                    Err(e) => {
                        self.problem(
                            key("password_file"),
                            f,
                            format!("cannot read {:?}: {e}", f.get_ref()),
                        );
                        None
                    }
                },
                (None, Some(var)) => match std::env::var(var.get_ref()) {
                    Ok(p) => Some(p),
                    Err(_) => {
                        self.problem(
                            key("password_env"),
                            var,
                            format!("environment variable {:?} is not set", var.get_ref()),
                        );
                        None
                    }
                },
                (Some(f), Some(_)) => {
                    self.problem(
                        key("password_file"),
                        f,
                        "give password_file or password_env, not both",
                    );
                    None
                }
                (None, None) => None,
            };
            let credentials = match (&u.username, password) {
                (Some(user), Some(password)) => Some(Credentials {
                    username: user.get_ref().clone(),
                    password,
                }),
                (Some(user), None) if u.password_file.is_none() && u.password_env.is_none() => {
                    self.problem(
                        key("username"),
                        user,
                        "a username needs password_file or password_env (passwords are never written inline)",
                    );
                    None
                }
                (None, Some(_)) => {
                    self.problem(
                        key("name"),
                        &u.name,
                        "a password is given without a username",
                    );
                    None
                }
                _ => None,
            };
            let ca_pem =
                u.ca.as_ref()
                    .and_then(|ca| match std::fs::read(self.path(ca.get_ref())) {
                        Ok(pem) => match reqwest::Certificate::from_pem_bundle(&pem) {
                            Ok(certs) if !certs.is_empty() => Some(pem),
                            _ => {
                                self.problem(
                                    key("ca"),
                                    ca,
                                    format!("{:?} holds no PEM certificate", ca.get_ref()),
                                );
                                None
                            }
                        },
                        Err(e) => {
                            self.problem(
                                key("ca"),
                                ca,
                                format!("cannot read {:?}: {e}", ca.get_ref()),
                            );
                            None
                        }
                    });
            let mut aliases = Vec::new();
            for (j, a) in u.aliases.iter().enumerate() {
                let alias = a.get_ref();
                let valid = !alias.is_empty()
                    && alias.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b".-:".contains(&b)
                    });
                let taken = raw.iter().enumerate().any(|(k, o)| {
                    o.name.get_ref() == alias
                        || (k != i && o.aliases.iter().any(|x| x.get_ref() == alias))
                }) || u.aliases[..j].iter().any(|x| x.get_ref() == alias);
                if !valid {
                    self.problem(
                        format!("upstream[{i}].aliases[{j}]"),
                        a,
                        format!("{alias:?} is not a registry host name"),
                    );
                } else if taken {
                    self.problem(
                        format!("upstream[{i}].aliases[{j}]"),
                        a,
                        format!("{alias:?} already names an upstream; each spelling routes to one upstream"),
                    );
                } else {
                    aliases.push(alias.clone());
                }
            }
            let idle_timeout = match &u.idle_timeout {
                Some(s) => self.duration(&key("idle_timeout"), s),
                None => Some(Duration::from_secs(60)),
            };
            if let (Some(url), Some(idle_timeout)) = (url, idle_timeout) {
                let (url, prefix) = match url {
                    Some((url, prefix)) => (Some(url), prefix),
                    None => (None, String::new()),
                };
                out.push(UpstreamConfig {
                    name: name.clone(),
                    url,
                    prefix,
                    client_identity,
                    default: u.default,
                    aliases,
                    credentials,
                    ca_pem,
                    idle_timeout,
                });
            }
        }
        out
    }

    /// An upstream's `url`: its base and the repository prefix under it.
    fn upstream_url(&mut self, key: &str, raw: &Spanned<String>) -> Option<(reqwest::Url, String)> {
        match reqwest::Url::parse(raw.get_ref()) {
            Ok(url)
                if (url.scheme() == "http" || url.scheme() == "https")
                    && url.host().is_some()
                    && url.query().is_none()
                    && url.fragment().is_none()
                    && url.username().is_empty()
                    && url.password().is_none() =>
            {
                let prefix = url.path().trim_matches('/').to_owned();
                let prefix_ok = prefix.is_empty()
                    || (!prefix.contains("//")
                        && format!("{prefix}/x")
                            .parse::<crate::oci::names::RepoName>()
                            .is_ok()
                        && prefix.split('/').next() != Some("v2"));
                if prefix_ok {
                    let mut base = url.clone();
                    base.set_path("/");
                    Some((base, prefix))
                } else {
                    self.problem(
                            key.to_owned(),
                            raw,
                            format!(
                                "{:?}: the path must be a repository prefix (lowercase, e.g. \"https://gateway.corp:5443/docker.io\"), without /v2",
                                raw.get_ref()
                            ),
                        );
                    None
                }
            }
            Ok(_) => {
                self.problem(
                        key.to_owned(),
                        raw,
                        format!(
                            "{:?} must be an http:// or https:// URL with a host, and no query or credentials",
                            raw.get_ref()
                        ),
                    );
                None
            }
            Err(e) => {
                self.problem(
                    key.to_owned(),
                    raw,
                    format!("{:?} is not a URL: {e}", raw.get_ref()),
                );
                None
            }
        }
    }

    fn keys(&mut self, raw: Option<&Spanned<toml::Table>>) -> Vec<TrustedKey> {
        let Some(table) = raw else { return Vec::new() };
        let mut out = Vec::new();
        for (name, value) in table.get_ref() {
            let key = format!("keys.{name}");
            let Some(path) = value.as_str() else {
                self.entry_problem(
                    key,
                    table,
                    name,
                    "must be the path of a PEM public key file",
                );
                continue;
            };
            let resolved = self.path(path);
            // Relative paths are the config directory's: say where that is.
            let shown = if Path::new(path).is_absolute() {
                format!("{path:?}")
            } else {
                format!("{path:?} ({})", resolved.display())
            };
            let text = match std::fs::read_to_string(&resolved) {
                Ok(t) => t,
                Err(e) => {
                    self.entry_problem(key, table, name, format!("cannot read {shown}: {e}"));
                    self.unusable_keys.push(name.clone());
                    continue;
                }
            };
            match crate::keys::PublicKey::from_pem(&text) {
                Ok(k) => out.push(TrustedKey {
                    name: name.clone(),
                    key: k,
                }),
                Err(e) => {
                    self.entry_problem(key, table, name, format!("{shown}: {e}"));
                    self.unusable_keys.push(name.clone());
                }
            }
        }
        out
    }

    /// Canonical-name patterns (`policy.match`, `tenant.repositories`):
    /// each compiled, and one whose first segment names no upstream
    /// refused (it could never match).
    fn name_patterns(
        &mut self,
        key: &str,
        list: &[Spanned<String>],
        upstreams: &[&str],
    ) -> (Vec<String>, GlobSetBuilder) {
        let mut set = GlobSetBuilder::new();
        let mut patterns = Vec::new();
        for (j, pat) in list.iter().enumerate() {
            // Names are `<upstream>/<repository>`: a pattern whose first
            // segment is a plain word that names no upstream can never
            // match, and a deny rule written so would silently do nothing.
            let first = pat.get_ref().split('/').next().unwrap_or("");
            let literal = !first.contains(['*', '?', '[', '{']);
            if literal && !upstreams.contains(&first) {
                self.problem(
                    format!("{key}[{j}]"),
                    pat,
                    format!(
                        "{:?} can never match: names start with the upstream ({}), e.g. \"{}/{}\"",
                        pat.get_ref(),
                        upstreams.join(", "),
                        upstreams.first().copied().unwrap_or("docker.io"),
                        pat.get_ref()
                    ),
                );
                continue;
            }
            match compile_pattern(pat.get_ref()) {
                Ok(g) => {
                    set.add(g);
                    patterns.push(pat.get_ref().clone());
                }
                Err(msg) => self.problem(format!("{key}[{j}]"), pat, msg),
            }
        }
        (patterns, set)
    }

    fn policies(
        &mut self,
        raw: &[RawPolicy],
        (keys, identities, keyless): (
            &[TrustedKey],
            &[crate::keyless::Identity],
            Option<&std::sync::Arc<crate::keyless::Keyless>>,
        ),
        bases: &[BaseSet],
        upstreams: &[&str],
    ) -> Vec<PolicyConfig> {
        if raw.is_empty() {
            self.problem_nowhere(
                "policy",
                "no [[policy]]: every pull would be denied (add one with match = [\"**\"] to allow everything)",
            );
        }
        let mut out = Vec::new();
        for (i, p) in raw.iter().enumerate() {
            let key = |k: &str| format!("policy[{i}].{k}");
            if p.name.get_ref().trim().is_empty() {
                self.problem(key("name"), &p.name, "must not be empty");
            }
            if raw[..i]
                .iter()
                .any(|o| o.name.get_ref() == p.name.get_ref())
            {
                self.problem(
                    key("name"),
                    &p.name,
                    format!("policy {:?} is defined twice", p.name.get_ref()),
                );
            }
            let mode = match p.mode.as_ref().map(|m| (m, m.get_ref().as_str())) {
                None => Mode::Enforce,
                Some((_, "enforce")) => Mode::Enforce,
                Some((_, "audit")) => Mode::Audit,
                Some((m, other)) => {
                    self.problem(
                        key("mode"),
                        m,
                        format!("{other:?} is not a mode (enforce | audit)"),
                    );
                    Mode::Enforce
                }
            };
            if p.patterns.get_ref().is_empty() {
                self.problem(key("match"), &p.patterns, "needs at least one pattern");
            }
            let (patterns, set) = self.name_patterns(
                &format!("policy[{i}].match"),
                p.patterns.get_ref(),
                upstreams,
            );
            let mut signed_by = Vec::new();
            let mut signed_by_identities = Vec::new();
            if let Some(s) = &p.signed_by {
                for name in s.get_ref() {
                    if let Some(id) = identities.iter().find(|i| &i.name == name) {
                        signed_by_identities.push(id.clone());
                        continue;
                    }
                    // Defined, but reported unusable above.
                    if self.unusable_identities.contains(name) {
                        continue;
                    }
                    match keys.iter().find(|k| &k.name == name) {
                        Some(k) => signed_by.push(k.clone()),
                        // Defined, but its file was reported unusable above.
                        None if self.unusable_keys.contains(name) => {}
                        None => {
                            let mut defined: Vec<&str> =
                                keys.iter().map(|k| k.name.as_str()).collect();
                            defined.extend(identities.iter().map(|i| i.name.as_str()));
                            self.problem(
                                key("signed_by"),
                                s,
                                format!(
                                    "key {name:?} is not defined in [keys] or [identities] (defined: {})",
                                    if defined.is_empty() {
                                        "none".to_owned()
                                    } else {
                                        defined.join(", ")
                                    }
                                ),
                            )
                        }
                    }
                }
            }
            let mut base_names = Vec::new();
            if let Some(b) = &p.bases {
                for name in b.get_ref() {
                    if bases.iter().any(|s| &s.name == name) {
                        base_names.push(name.clone());
                    } else {
                        self.problem(
                            key("bases"),
                            b,
                            format!(
                                "base {name:?} is not defined in [bases] (defined: {})",
                                if bases.is_empty() {
                                    "none".to_owned()
                                } else {
                                    bases
                                        .iter()
                                        .map(|s| s.name.as_str())
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                }
                            ),
                        );
                    }
                }
            }
            let tag_drift = match p.tag_drift.as_ref().map(|t| (t, t.get_ref().as_str())) {
                None | Some((_, "keep-approved")) => TagDrift::KeepApproved,
                Some((_, "deny")) => TagDrift::Deny,
                Some((t, other)) => {
                    self.problem(
                        key("tag_drift"),
                        t,
                        format!("{other:?} is not a tag_drift setting (keep-approved | deny)"),
                    );
                    TagDrift::KeepApproved
                }
            };
            let deny_tags = p.deny_tags.as_ref().and_then(|tags| {
                let mut b = GlobSetBuilder::new();
                for (j, t) in tags.get_ref().iter().enumerate() {
                    match GlobBuilder::new(t.get_ref()).build() {
                        Ok(g) => {
                            b.add(g);
                        }
                        Err(e) => self.problem(
                            format!("policy[{i}].deny_tags[{j}]"),
                            t,
                            format!("{:?} is not a valid pattern: {e}", t.get_ref()),
                        ),
                    }
                }
                b.build().ok()
            });
            match set.build() {
                Ok(matcher) => out.push(PolicyConfig {
                    name: p.name.get_ref().as_str().into(),
                    patterns,
                    matcher,
                    mode,
                    deny: p.deny,
                    signed_by,
                    keyless: (!signed_by_identities.is_empty())
                        .then(|| keyless.cloned())
                        .flatten(),
                    signed_by_identities,
                    require_digest: p.require_digest,
                    deny_tags,
                    bases: base_names,
                    tag_drift,
                }),
                Err(e) => self.problem(key("match"), &p.patterns, e.to_string()),
            }
        }
        out
    }
}

impl Validator<'_> {
    fn bases(&mut self, raw: Option<&Spanned<toml::Table>>, router: &Hosts) -> Vec<BaseSet> {
        let Some(table) = raw else { return Vec::new() };
        let mut out = Vec::new();
        for (name, value) in table.get_ref() {
            let key = format!("bases.{name}");
            let Some(list) = value.as_array().filter(|l| !l.is_empty()) else {
                self.entry_problem(
                    key,
                    table,
                    name,
                    "must be a non-empty list of image references, e.g. [\"gcr.io/distroless/static-debian12:nonroot\"]",
                );
                continue;
            };
            let mut images = Vec::new();
            for (j, v) in list.iter().enumerate() {
                let Some(text) = v.as_str() else {
                    self.entry_problem(format!("{key}[{j}]"), table, name, "must be a string");
                    continue;
                };
                match image_ref(text, router) {
                    Ok(r) => images.push(r),
                    Err(e) => self.entry_problem(
                        format!("{key}[{j}]"),
                        table,
                        name,
                        format!("{text:?}: {e}"),
                    ),
                }
            }
            out.push(BaseSet {
                name: name.clone(),
                images,
            });
        }
        out
    }

    fn rewrites(&mut self, raw: &[RawRewrite], upstreams: &[UpstreamConfig]) -> Vec<Rewrite> {
        let mut out: Vec<(usize, Rewrite)> = Vec::new();
        for (i, r) in raw.iter().enumerate() {
            let from = rewrite_name(r.from.get_ref(), upstreams);
            let to = rewrite_name(r.to.get_ref(), upstreams);
            let (from, to) = match (from, to) {
                (Ok(f), Ok(t)) => (f, t),
                (f, t) => {
                    if let Err(e) = f {
                        self.problem(format!("rewrite[{i}].from"), &r.from, e);
                    }
                    if let Err(e) = t {
                        self.problem(format!("rewrite[{i}].to"), &r.to, e);
                    }
                    continue;
                }
            };
            if from.1 != to.1 {
                self.problem(
                    format!("rewrite[{i}].to"),
                    &r.to,
                    "from and to must both end in /** (a subtree) or both be exact names",
                );
                continue;
            }
            let rule = Rewrite {
                from: from.0,
                to: to.0,
                prefix: from.1,
            };
            if let Some((k, _)) = out
                .iter()
                .find(|(_, o)| o.from == rule.from && o.prefix == rule.prefix)
            {
                self.problem(
                    format!("rewrite[{i}].from"),
                    &r.from,
                    format!("conflicts with rewrite[{k}], which rewrites the same name"),
                );
                continue;
            }
            out.push((i, rule));
        }
        // Rules do not chain: a target that a rule would rewrite again is a
        // loop or a chain, and either is refused.
        let rules: Vec<Rewrite> = out.iter().map(|(_, r)| r.clone()).collect();
        for (i, rule) in &out {
            if let Some(k) = rules.iter().position(|o| overlaps(rule, o)) {
                let what = if rules[k] == *rule {
                    "a rewrite loop: the target is rewritten by the same rule".to_owned()
                } else {
                    format!(
                        "a rewrite chain or loop: the target is rewritten again by rewrite[{}] (from {:?})",
                        out[k].0,
                        raw[out[k].0].from.get_ref()
                    )
                };
                self.problem(format!("rewrite[{i}].to"), &raw[*i].to, what);
            }
        }
        rules
    }

    /// Adds the pins of one table, reporting problems under `key`.
    fn pins(&mut self, pins: &mut Pins, table: &Spanned<toml::Table>, key: &str, router: &Hosts) {
        for (image, value) in table.get_ref() {
            if let Err(e) = pin_entry(pins, image, value, router) {
                self.entry_problem(format!("{key}.{image:?}"), table, image, e);
            }
        }
    }

    fn pins_file(&mut self, pins: &mut Pins, path: &Path, at: &Spanned<String>, router: &Hosts) {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            // `pullgate pin` creates it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                self.problem(
                    "pins_file",
                    at,
                    format!("cannot read {:?}: {e}", at.get_ref()),
                );
                return;
            }
        };
        let table: toml::Table = match toml::from_str(&text) {
            Ok(t) => t,
            Err(e) => {
                let line = e.span().map(|s| line_of(&text, s.start)).unwrap_or(0);
                self.problem(
                    "pins_file",
                    at,
                    format!("{:?} line {line}: {}", at.get_ref(), e.message().trim()),
                );
                return;
            }
        };
        for (k, v) in &table {
            let Some(entries) = v.as_table().filter(|_| k == "pins") else {
                self.problem(
                    "pins_file",
                    at,
                    format!(
                        "{:?}: only a [pins] table belongs in a pins file, found {k:?}",
                        at.get_ref()
                    ),
                );
                continue;
            };
            for (image, value) in entries {
                if let Err(e) = pin_entry(pins, image, value, router) {
                    self.problem(
                        "pins_file",
                        at,
                        format!("{:?}: pins.{image:?}: {e}", at.get_ref()),
                    );
                }
            }
        }
    }
}

/// Routes an image reference (`NAME[:TAG]`, `NAME@DIGEST`) the way a pull of
/// it would be routed.
pub fn image_ref(text: &str, hosts: &Hosts) -> Result<BaseRef, String> {
    let (name, reference) = crate::oci::names::split_image(text)?;
    let r = hosts.resolve(&name, None).map_err(|e| e.to_string())?;
    Ok(BaseRef {
        image: text.to_owned(),
        upstream: hosts.name(r.index).to_string(),
        canonical: hosts.canonical(&r),
        repo: r.repo,
        reference,
    })
}

/// The registry hosts of a config's upstreams, aliases included.
pub fn hosts(upstreams: &[UpstreamConfig]) -> Hosts {
    let mut h = Hosts::new(upstreams.iter().map(|u| (u.name.as_str(), u.default)));
    for (i, u) in upstreams.iter().enumerate() {
        h = h.with_aliases(i, &u.aliases);
    }
    h
}

/// Checks one pin, `"NAME:TAG" = "sha256:..."`, and adds it.
fn pin_entry(
    pins: &mut Pins,
    image: &str,
    value: &toml::Value,
    router: &Hosts,
) -> Result<(), String> {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || !last.contains(':') {
        return Err("a pin is NAME:TAG (e.g. \"docker.io/library/alpine:3.20\")".into());
    }
    let r = image_ref(image, router)?;
    let crate::oci::names::Reference::Tag(tag) = &r.reference else {
        return Err("a pin is NAME:TAG".into());
    };
    let Some(text) = value.as_str() else {
        return Err("the value must be a digest string (\"sha256:<64 hex>\")".into());
    };
    let digest: crate::oci::names::Digest = text
        .parse()
        .map_err(|e| format!("{text:?} is not a digest: {e}"))?;
    pins.insert(&r.canonical, tag.as_str(), digest)
        .map_err(|old| {
            format!(
                "{}:{tag} is pinned twice, to {old} and to {digest}",
                r.canonical
            )
        })
}

/// A rewrite side, canonical and without `/**`, and whether it had `/**`.
fn rewrite_name(text: &str, upstreams: &[UpstreamConfig]) -> Result<(String, bool), String> {
    let (name, prefix) = match text.strip_suffix("/**") {
        Some(n) => (n, true),
        None => (text, false),
    };
    if name.contains(['*', '?', '[', '{']) {
        return Err(format!(
            "{text:?}: only a trailing /** is allowed (e.g. \"docker.io/bitnami/**\")"
        ));
    }
    let (host, rest) = name.split_once('/').unwrap_or((name, ""));
    let Some(upstream) = upstreams
        .iter()
        .find(|u| u.name == host || u.aliases.iter().any(|a| a == host))
    else {
        return Err(format!(
            "{text:?} does not start with a configured upstream ({})",
            upstreams
                .iter()
                .map(|u| u.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    if rest.is_empty() {
        if prefix {
            return Ok((upstream.name.clone(), true));
        }
        return Err(format!("{text:?} names no repository"));
    }
    let repo: crate::oci::names::RepoName = rest
        .parse()
        .map_err(|e| format!("{text:?} is not a valid name: {e}"))?;
    let repo = if upstream.name == "docker.io" && repo.depth() == 1 && !prefix {
        repo.prefixed("library").map_err(|e| e.to_string())?
    } else {
        repo
    };
    Ok((format!("{}/{repo}", upstream.name), prefix))
}

/// Whether names `rule` produces are rewritten again by `other`.
fn overlaps(rule: &Rewrite, other: &Rewrite) -> bool {
    let under = |name: &str, prefix: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|r| r.starts_with('/'))
    };
    match (rule.prefix, other.prefix) {
        (false, false) => rule.to == other.from,
        (false, true) => under(&rule.to, &other.from),
        (true, false) => under(&other.from, &rule.to),
        (true, true) => {
            rule.to == other.from || under(&rule.to, &other.from) || under(&other.from, &rule.to)
        }
    }
}

/// Compiles a policy pattern: `*` is one path segment, `**` any number.
pub fn compile_pattern(pattern: &str) -> Result<globset::Glob, String> {
    if pattern.is_empty() {
        return Err("empty pattern".into());
    }
    if pattern.starts_with('/') || pattern.ends_with('/') || pattern.contains("//") {
        return Err(format!("{pattern:?}: patterns are names like \"ghcr.io/acme/**\", without leading, trailing or double `/`"));
    }
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map_err(|e| format!("{pattern:?} is not a valid pattern: {e}"))
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::names::Digest;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml", Path::new("/etc/pullgate"))
    }

    #[test]
    fn embedded_default_is_a_plain_mirror() {
        let c = Config::embedded();
        assert_eq!(c.server.listen, "127.0.0.1:5000".parse().unwrap());
        let names: Vec<_> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "docker.io",
                "ghcr.io",
                "quay.io",
                "gcr.io",
                "registry.k8s.io"
            ]
        );
        assert!(c.upstream("docker.io").unwrap().default);
        assert_eq!(c.policies.len(), 1);
        assert!(!c.policies[0].deny);
        assert!(c.policies[0].matcher.is_match("docker.io/library/alpine"));
    }

    #[test]
    fn all_problems_are_reported_with_key_and_line() {
        let err = parse(
            r#"
[server]
listen = "nowhere"

[storage]
tag_ttl = "soon"
max_size = "lots"

[[upstream]]
name = "Docker.io"
url = "ftp://x"

[[policy]]
name = "p"
match = ["Docker.io//b"]
mode = "maybe"
"#,
        )
        .unwrap_err();
        let keys: Vec<_> = err
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.line))
            .collect();
        assert_eq!(
            keys,
            [
                ("server.listen", Some(3)),
                ("storage.tag_ttl", Some(6)),
                ("storage.max_size", Some(7)),
                ("upstream[0].name", Some(10)),
                ("upstream[0].url", Some(11)),
                ("policy[0].match[0]", Some(15)),
                ("policy[0].mode", Some(16)),
            ]
        );
        let text = err.to_string();
        assert!(text.contains("7 problems"), "{text}");
        assert!(text.contains("line 3: server.listen"), "{text}");
    }

    #[test]
    fn the_buckets_eviction_limits_parse_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), "key").unwrap();
        let text = |limits: &str| {
            format!(
                "[storage]\npath = \"/tmp/x\"\n[storage.s3]\nendpoint = \"http://127.0.0.1:8333\"\nbucket = \"pullgate\"\naccess_key_file = \"{k}\"\nsecret_key_file = \"{k}\"\n{limits}\n[[upstream]]\nname = \"docker.io\"\nurl = \"https://r\"\n[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n",
                k = dir.path().join("k").display()
            )
        };
        let c = parse(&text("")).unwrap();
        let s3 = c.storage.s3.unwrap();
        assert_eq!((s3.max_size, s3.min_idle), (None, S3Config::MIN_IDLE));
        let c = parse(&text("max_size = \"2GiB\"\nmin_idle = \"90s\"")).unwrap();
        let s3 = c.storage.s3.unwrap();
        assert_eq!(s3.max_size, Some(2 << 30));
        assert_eq!(s3.min_idle, Duration::from_secs(90));
        let err = parse(&text("max_size = \"lots\"\nmin_idle = \"200ms\"")).unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["storage.s3.max_size", "storage.s3.min_idle"],
            "{err}"
        );
        assert!(err.to_string().contains("at least 1s"), "{err}");
    }

    #[test]
    fn patterns_that_can_never_match_are_refused() {
        let err = parse(
            "[[upstream]]\nname = \"docker.io\"\nurl = \"https://r\"\n[[policy]]\nname = \"p\"\nmatch = [\"library/centos\", \"docker.io/**\", \"*/x\"]\ndeny = true\n",
        )
        .unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].key, "policy[0].match[0]");
        assert!(
            err.problems[0].message.contains("docker.io/library/centos"),
            "{err}"
        );
    }

    #[test]
    fn aliases_are_unique_spellings_and_tag_rules_parse() {
        let text = r#"
[[upstream]]
name = "docker.io"
url = "https://registry-1.docker.io"
aliases = ["index.docker.io", "registry-1.docker.io"]
[[upstream]]
name = "ghcr.io"
url = "https://ghcr.io"
aliases = ["docker.io"]
[[policy]]
name = "p"
match = ["**"]
require_digest = true
deny_tags = ["latest", "*-rc*", "[bad"]
"#;
        let err = parse(text).unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["upstream[1].aliases[0]", "policy[0].deny_tags[2]"],
            "{err}"
        );
        let ok = parse(
            &text
                .replace("aliases = [\"docker.io\"]", "")
                .replace(", \"[bad\"", ""),
        )
        .unwrap();
        assert_eq!(
            ok.upstreams[0].aliases,
            ["index.docker.io", "registry-1.docker.io"]
        );
        let p = &ok.policies[0];
        assert!(p.require_digest);
        let tags = p.deny_tags.as_ref().unwrap();
        assert!(tags.is_match("latest") && tags.is_match("1.2-rc3") && !tags.is_match("1.2"));
    }

    #[test]
    fn listeners_must_differ_and_manifest_cap_must_be_positive() {
        let err = parse("[server]\nlisten = \"127.0.0.1:1\"\nmax_manifest_size = \"0\"\n[admin]\nlisten = \"127.0.0.1:1\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"https://r\"\n[[policy]]\nname = \"p\"\nmatch = [\"**\"]\n").unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["server.max_manifest_size", "admin.listen"], "{err}");
    }

    #[test]
    fn a_misplaced_pins_file_says_where_it_belongs() {
        let err = parse("[storage]\npins_file = \"pins.toml\"\n").unwrap_err();
        assert!(err.problems[0].message.contains("top-level key"), "{err}");
    }

    #[test]
    fn unknown_keys_are_reported_with_every_other_problem() {
        let dir = tempfile::tempdir().unwrap();
        let text = r#"
[keys]
approver = "missing.pub"

[storage]
tag_ttl = "soon"

[[upstream]]
name = "docker.io"
url = "https://r"
retries = 3

[[policy]]
name = "p"
match = ["**"]
"#;
        let err = Config::parse(text, "t", dir.path()).unwrap_err();
        let keys: Vec<_> = err
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.line))
            .collect();
        assert_eq!(
            keys,
            [
                ("keys.approver", Some(3)),
                ("storage.tag_ttl", Some(6)),
                ("upstream[0].retries", Some(11)),
            ],
            "{err}"
        );
        assert!(
            err.to_string().contains("expected one of name, url"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_line() {
        let err = parse("[server]\nlisten = \"127.0.0.1:1\"\nlissten = 1\n").unwrap_err();
        assert_eq!(err.problems[0].line, Some(3));
        assert!(err.problems[0].message.contains("lissten"), "{err}");
    }

    #[test]
    fn tls_files_are_read_when_the_config_loads() {
        let err = parse(
            r#"
[server]
tls = { cert = "no-such.crt", key = "tls.key" }
[[upstream]]
name = "ghcr.io"
url = "https://ghcr.io"
[[policy]]
name = "acme"
match = ["**"]
"#,
        )
        .unwrap_err();
        assert_eq!(err.problems[0].key, "server.tls.cert");
        assert!(err.problems[0].message.contains("cannot read"), "{err}");
        assert!(err.problems[0].message.contains("no-such.crt"), "{err}");
    }

    const TWO_UPSTREAMS: &str = r#"
[[upstream]]
name = "docker.io"
url = "https://registry-1.docker.io"
default = true
aliases = ["index.docker.io"]
[[upstream]]
name = "registry.internal"
url = "https://registry.internal"
"#;

    #[test]
    fn bases_are_routed_and_policies_must_name_defined_ones() {
        let c = parse(&format!(
            r#"{TWO_UPSTREAMS}
[storage]
base_refresh = "10m"
base_keep = 5
[bases]
distroless = ["registry.internal/distroless/static:nonroot", "debian@sha256:{}"]
[[policy]]
name = "acme"
match = ["**"]
bases = ["distroless"]
tag_drift = "deny"
"#,
            "a".repeat(64)
        ))
        .unwrap();
        let set = &c.bases[0];
        assert_eq!(set.name, "distroless");
        assert_eq!(
            set.images[0].canonical,
            "registry.internal/distroless/static"
        );
        assert_eq!(set.images[0].reference.to_string(), "nonroot");
        assert_eq!(set.images[1].canonical, "docker.io/library/debian");
        assert!(matches!(
            set.images[1].reference,
            crate::oci::names::Reference::Digest(_)
        ));
        assert_eq!(c.storage.base_refresh, Duration::from_secs(600));
        assert_eq!(c.storage.base_keep, Some(5));
        assert_eq!(c.policies[0].bases, ["distroless"]);
        assert_eq!(c.policies[0].tag_drift, TagDrift::Deny);
        assert!(c.policies[0].checks_content());

        let err = parse(&format!(
            r#"{TWO_UPSTREAMS}
[storage]
base_keep = 0
[bases]
broken = ["quay.io/x/y:1"]
empty = []
[[policy]]
name = "acme"
match = ["**"]
bases = ["distroless"]
tag_drift = "sometimes"
"#
        ))
        .unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "storage.base_keep",
                "bases.broken[0]",
                "bases.empty",
                "policy[0].bases",
                "policy[0].tag_drift"
            ],
            "{err}"
        );
        // Entries are reported at their own lines, not the [bases] header's.
        let lines: Vec<_> = err.problems.iter().map(|p| p.line.unwrap()).collect();
        assert_eq!(lines[1] + 1, lines[2], "{err}");
        let text = err.to_string();
        assert!(text.contains("\"quay.io\" is not configured"), "{text}");
        assert!(
            text.contains("base \"distroless\" is not defined in [bases] (defined: broken)"),
            "{text}"
        );
    }

    #[test]
    fn rewrites_are_canonical_and_loops_chains_and_conflicts_are_refused() {
        let c = parse(&format!(
            r#"{TWO_UPSTREAMS}
[[rewrite]]
from = "index.docker.io/bitnami/**"
to = "registry.internal/bitnami/**"
[[rewrite]]
from = "docker.io/alpine"
to = "registry.internal/base/alpine"
[[policy]]
name = "all"
match = ["**"]
"#
        ))
        .unwrap();
        let r = crate::route::rewrite::Rewrites::new(&c.rewrites);
        assert_eq!(
            r.apply("docker.io/bitnami/redis").as_deref(),
            Some("registry.internal/bitnami/redis")
        );
        assert_eq!(
            r.apply("docker.io/library/alpine").as_deref(),
            Some("registry.internal/base/alpine")
        );

        let err = parse(&format!(
            r#"{TWO_UPSTREAMS}
[[rewrite]]
from = "docker.io/a/**"
to = "docker.io/a/b/**"
[[rewrite]]
from = "docker.io/x"
to = "docker.io/y"
[[rewrite]]
from = "docker.io/y"
to = "docker.io/x"
[[rewrite]]
from = "docker.io/x"
to = "registry.internal/x"
[[rewrite]]
from = "ghcr.io/acme/**"
to = "registry.internal/acme/**"
[[rewrite]]
from = "docker.io/c/**"
to = "registry.internal/c"
[[rewrite]]
from = "docker.io/Bad/**"
to = "registry.internal/d/**"
[[rewrite]]
from = "docker.io/e"
to = "quay.io/e"
[[policy]]
name = "all"
match = ["**"]
"#
        ))
        .unwrap_err();
        let text = err.to_string();
        let lines: Vec<&str> = text.lines().skip(1).collect();
        assert!(
            lines[0].contains("rewrite[0].to") && lines[0].contains("loop"),
            "{text}"
        );
        assert!(
            lines[1].contains("rewrite[1].to") && lines[1].contains("rewrite[2]"),
            "{text}"
        );
        assert!(
            lines[2].contains("rewrite[2].to") && lines[2].contains("rewrite[1]"),
            "{text}"
        );
        assert!(
            lines[3].contains("rewrite[3].from") && lines[3].contains("conflicts with rewrite[1]"),
            "{text}"
        );
        assert!(
            lines[4].contains("rewrite[4].from") && lines[4].contains("configured upstream"),
            "{text}"
        );
        assert!(
            lines[5].contains("rewrite[5].to") && lines[5].contains("both end in /**"),
            "{text}"
        );
        assert!(
            lines[6].contains("rewrite[6].from") && lines[6].contains("not a valid name"),
            "{text}"
        );
        assert!(
            lines[7].contains("rewrite[7].to") && lines[7].contains("configured upstream"),
            "{text}"
        );
        assert_eq!(lines.len(), 8, "{text}");
    }

    #[test]
    fn pins_come_from_the_config_and_the_pins_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        std::fs::write(
            dir.path().join("pins.toml"),
            format!("[pins]\n\"registry.internal/app:1\" = \"{b}\"\n"),
        )
        .unwrap();
        let text = format!(
            "pins_file = \"pins.toml\"\n{TWO_UPSTREAMS}\n[pins]\n\"alpine:3.20\" = \"{a}\"\n[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n"
        );
        let c = Config::parse(&text, "t", dir.path()).unwrap();
        assert_eq!(c.pins.get("docker.io/library/alpine", "3.20"), Some(a));
        assert_eq!(c.pins.get("registry.internal/app", "1"), Some(b));
        assert_eq!(c.pins_file, Some(dir.path().join("pins.toml")));
        // A missing pins file is an empty one (`pullgate pin` creates it).
        let text2 = text.replace("pins.toml", "absent.toml");
        assert_eq!(
            Config::parse(&text2, "t", dir.path()).unwrap().pins.len(),
            1
        );

        std::fs::write(
            dir.path().join("pins.toml"),
            format!("[pins]\n\"docker.io/library/alpine:3.20\" = \"{b}\"\n\"x:1\" = \"sha256:nothex\"\n\"y@{a}\" = \"{a}\"\n"),
        )
        .unwrap();
        let err = Config::parse(&text, "t", dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("is pinned twice"), "{err}");
        assert!(err.contains("\"sha256:nothex\" is not a digest"), "{err}");
        assert!(err.contains("a pin is NAME:TAG"), "{err}");
        std::fs::write(dir.path().join("pins.toml"), "[pins\n").unwrap();
        let err = Config::parse(&text, "t", dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("pins_file") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn an_unreadable_key_file_is_one_problem_with_its_resolved_path() {
        let text = "[keys]\napprover = \"missing.pub\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"https://r\"\n[[policy]]\nname = \"p\"\nmatch = [\"**\"]\nsigned_by = [\"approver\"]\n";
        let err = parse(text).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].key, "keys.approver");
        assert!(
            err.problems[0]
                .message
                .contains("\"missing.pub\" (/etc/pullgate/missing.pub)"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_duration_says_what_a_duration_looks_like() {
        let err = parse("[storage]\ntag_ttl = \"-5s\"\n").unwrap_err();
        let p = err
            .problems
            .iter()
            .find(|p| p.key == "storage.tag_ttl")
            .unwrap();
        assert!(p.message.contains("a positive number and a unit"), "{err}");
        assert!(!p.message.contains("expected number"), "{err}");
    }

    #[test]
    fn connection_limits_are_checked_and_no_duration_overflows_a_deadline() {
        let err = parse(
            "[server]\nmax_connections = 0\nheader_timeout = \"0s\"\nsend_timeout = \"300000000000y\"\n",
        )
        .unwrap_err();
        for key in [
            "server.max_connections",
            "server.header_timeout",
            "server.send_timeout",
        ] {
            assert!(err.problems.iter().any(|p| p.key == key), "{key}: {err}");
        }
        let c = parse(concat!(
            "[server]\nmax_connections = 10\nsend_timeout = \"5s\"\n",
            "[[upstream]]\nname = \"docker.io\"\nurl = \"https://r\"\n",
            "[[policy]]\nname = \"p\"\nmatch = [\"**\"]\n",
        ))
        .unwrap();
        assert_eq!(c.server.max_connections, 10);
        assert_eq!(c.server.send_timeout, Duration::from_secs(5));
        assert_eq!(c.server.header_timeout, DEFAULT_HEADER_TIMEOUT);
    }

    #[test]
    fn keys_are_loaded_and_policies_name_them() {
        let dir = tempfile::tempdir().unwrap();
        let k = crate::keys::tests::ecdsa_key(9);
        std::fs::write(
            dir.path().join("release.pub"),
            crate::keys::tests::ecdsa_pem(&k),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("junk.pub"),
            "-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----\n",
        )
        .unwrap();
        let text = r#"
[keys]
release = "release.pub"

[[upstream]]
name = "ghcr.io"
url = "https://ghcr.io"
[[policy]]
name = "acme"
match = ["**"]
signed_by = ["release"]
"#;
        let c = Config::parse(text, "t", dir.path()).unwrap();
        assert_eq!(c.policies[0].signed_by[0].name, "release");
        assert_eq!(c.policies[0].signed_by[0].key.scheme(), "ecdsa-p256");
        let bad = text
            .replace(
                "release = \"release.pub\"",
                "release = \"release.pub\"\njunk = \"junk.pub\"\nmissing = \"nope.pub\"",
            )
            .replace(
                "signed_by = [\"release\"]",
                "signed_by = [\"release\", \"other\"]",
            );
        let err = Config::parse(&bad, "t", dir.path()).unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["keys.junk", "keys.missing", "policy[0].signed_by"],
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("\"other\" is not defined in [keys]"),
            "{err}"
        );
    }

    #[test]
    fn patterns_match_segments() {
        let set = |p: &str| {
            let mut b = GlobSetBuilder::new();
            b.add(compile_pattern(p).unwrap());
            b.build().unwrap()
        };
        let acme = set("ghcr.io/acme/**");
        assert!(acme.is_match("ghcr.io/acme/app"));
        assert!(acme.is_match("ghcr.io/acme/team/app"));
        assert!(!acme.is_match("ghcr.io/other/app"));
        let one = set("docker.io/library/*");
        assert!(one.is_match("docker.io/library/alpine"));
        assert!(!one.is_match("docker.io/library/a/b"));
        assert!(set("**").is_match("quay.io/a/b/c"));
    }

    #[test]
    fn credentials_come_from_files_and_never_inline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
        let text = r#"
[[upstream]]
name = "r.example"
url = "https://r.example"
username = "bot"
password_file = "pw"
[[policy]]
name = "all"
match = ["**"]
"#;
        let c = Config::parse(text, "t", dir.path()).unwrap();
        let cred = c.upstreams[0].credentials.as_ref().unwrap();
        assert_eq!(
            (cred.username.as_str(), cred.password.as_str()),
            ("bot", "s3cret")
        );
        let err = parse(&text.replace("password_file = \"pw\"", "password = \"x\"")).unwrap_err();
        assert!(err.problems[0].message.contains("password"), "{err}");
    }
}

//! Who is asking, and which repositories they may pull: a request's
//! [`Identity`] (a verified client certificate, or an htpasswd user sent
//! with HTTP Basic), the [`Tenant`](crate::config::TenantConfig) it maps
//! to, and the slowing of clients that keep failing to authenticate.
//!
//! With `[auth]` or `server.tls.client_ca` configured, a request without
//! an identity is answered `401` with a `WWW-Authenticate: Basic`
//! challenge (what `docker login` and `podman login` expect). A
//! certificate that does not verify never gets this far: its TLS handshake
//! fails. Depends on `config`, `htpasswd`, `tls`, `metrics`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use headers::authorization::{Authorization, Basic};
use headers::HeaderMapExt as _;
use http::HeaderMap;

use crate::config::{Config, TenantConfig};
use crate::htpasswd::Htpasswd;
use crate::metrics::Metrics;
use crate::tls::ClientCert;

/// Who is asking.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Identity {
    /// Nobody in particular: only when no identity is required.
    #[default]
    Anonymous,
    /// An htpasswd user whose password verified.
    User(Arc<str>),
    /// The holder of a client certificate that verified against `client_ca`.
    Client(Arc<ClientCert>),
}

impl Identity {
    /// As audit records and logs show it: `user:alice`,
    /// `cert:node-1.team-a.example`; `None` when anonymous.
    pub fn shown(&self) -> Option<String> {
        match self {
            Identity::Anonymous => None,
            Identity::User(u) => Some(format!("user:{u}")),
            Identity::Client(c) => Some(format!("cert:{}", c.shown())),
        }
    }
}

/// Why a request has no identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// Nothing was sent: the first request of `docker login`, or a client
    /// that was never given credentials. Not counted as a failure.
    Missing,
    /// An `Authorization` header that is not Basic with a user and password.
    Malformed,
    /// A user the file does not have, or a wrong password (not told apart).
    BadCredentials { user: String },
}

impl AuthFailure {
    /// The `reason` label of `pullgate_auth_failures_total`.
    pub fn slug(&self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed => "malformed",
            AuthFailure::BadCredentials { .. } => "bad-credentials",
        }
    }

    /// What the client is told with its 401.
    pub fn message(&self, certs: bool, users: bool) -> String {
        let how = match (certs, users) {
            (true, true) => "a client certificate or a user and password",
            (true, false) => "a client certificate (signed by server.tls.client_ca)",
            _ => "a user and password (docker login, podman login, skopeo --creds)",
        };
        match self {
            AuthFailure::Missing => format!("authentication required: this registry needs {how}"),
            AuthFailure::Malformed => {
                format!("the Authorization header is not HTTP Basic with a user and password; this registry needs {how}")
            }
            AuthFailure::BadCredentials { user } => {
                format!("user {user:?} is unknown or the password is wrong")
            }
        }
    }
}

/// What a config generation says about identities and tenants.
pub struct Gate {
    htpasswd: Option<Arc<Htpasswd>>,
    /// Client certificates identify (server.tls.client_ca).
    certs: bool,
    tenants: Vec<TenantConfig>,
}

impl Gate {
    pub fn new(config: &Config, metrics: &Arc<Metrics>) -> Gate {
        Gate {
            htpasswd: config.auth.as_ref().map(|a| {
                Arc::new(Htpasswd::new(
                    a.htpasswd.clone(),
                    a.users.clone(),
                    metrics.clone(),
                ))
            }),
            certs: config
                .server
                .tls
                .as_ref()
                .is_some_and(|t| t.client_ca.is_some()),
            tenants: config.tenants.clone(),
        }
    }

    /// Whether a request must carry an identity.
    pub fn required(&self) -> bool {
        self.htpasswd.is_some() || self.certs
    }

    pub fn accepts_users(&self) -> bool {
        self.htpasswd.is_some()
    }

    pub fn accepts_certs(&self) -> bool {
        self.certs
    }

    /// The request's identity: its verified certificate if it has one,
    /// else the Basic credentials it sent.
    pub async fn identify(
        &self,
        headers: &HeaderMap,
        cert: Option<&Arc<ClientCert>>,
    ) -> Result<Identity, AuthFailure> {
        if let (true, Some(c)) = (self.certs, cert) {
            return Ok(Identity::Client(c.clone()));
        }
        let Some(htpasswd) = &self.htpasswd else {
            return if self.required() {
                Err(AuthFailure::Missing)
            } else {
                Ok(Identity::Anonymous)
            };
        };
        let basic = basic_credentials(headers)?;
        if htpasswd.verify(basic.username(), basic.password()).await {
            Ok(Identity::User(basic.username().into()))
        } else {
            Err(AuthFailure::BadCredentials {
                user: basic.username().to_owned(),
            })
        }
    }

    pub fn has_tenants(&self) -> bool {
        !self.tenants.is_empty()
    }

    /// The tenant `identity` belongs to: its user listed, or its
    /// certificate's name matched (the first tenant in the file that does).
    pub fn tenant_of(&self, identity: &Identity) -> Option<&TenantConfig> {
        match identity {
            Identity::Anonymous => None,
            Identity::User(u) => self
                .tenants
                .iter()
                .find(|t| t.users.iter().any(|x| **x == **u)),
            Identity::Client(c) => self.tenants.iter().find(|t| {
                c.names
                    .iter()
                    .any(|n| t.client_matcher.is_match(crate::config::dns_as_path(n)))
            }),
        }
    }

    /// The tenants' names, for metrics that start at zero.
    pub fn tenant_names(&self) -> impl Iterator<Item = &str> {
        self.tenants.iter().map(|t| &*t.name)
    }
}

/// The HTTP Basic credentials a request carries: `Missing` without an
/// `Authorization` header, `Malformed` when it is not Basic with a user.
pub fn basic_credentials(headers: &HeaderMap) -> Result<Basic, AuthFailure> {
    if !headers.contains_key(http::header::AUTHORIZATION) {
        return Err(AuthFailure::Missing);
    }
    let Some(Authorization(basic)) = headers.typed_get::<Authorization<Basic>>() else {
        return Err(AuthFailure::Malformed);
    };
    if basic.username().is_empty() {
        return Err(AuthFailure::Malformed);
    }
    Ok(basic)
}

/// Slows clients that keep failing to authenticate: each failure from an
/// address doubles the wait before its next 401, up to [`MAX_DELAY`];
/// forgotten after a quiet quarter of an hour, or a success.
pub struct Throttle {
    failures: moka::sync::Cache<IpAddr, u32>,
}

/// The longest a failed attempt waits for its answer.
pub const MAX_DELAY: Duration = Duration::from_secs(5);
const FIRST_DELAY: Duration = Duration::from_millis(100);

impl Default for Throttle {
    fn default() -> Throttle {
        Throttle {
            failures: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(900))
                .build(),
        }
    }
}

impl Throttle {
    /// Counts a failure from `ip`; returns how long to wait before answering.
    pub fn failed(&self, ip: IpAddr) -> Duration {
        let n = self
            .failures
            .entry(ip)
            .and_upsert_with(|e| e.map_or(1, |e| e.into_value().saturating_add(1)))
            .into_value();
        delay_after(n)
    }

    pub fn succeeded(&self, ip: IpAddr) {
        if self.failures.contains_key(&ip) {
            self.failures.invalidate(&ip);
        }
    }
}

/// The wait after the `n`th failure in a row: none after the first (a typo
/// costs nothing), then 100 ms doubling up to [`MAX_DELAY`].
pub fn delay_after(n: u32) -> Duration {
    if n <= 1 {
        return Duration::ZERO;
    }
    FIRST_DELAY
        .saturating_mul(1u32 << (n - 2).min(16))
        .min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(text: &str, dir: &std::path::Path) -> Gate {
        let config = Config::parse(text, "test", dir).unwrap();
        Gate::new(&config, &Arc::new(Metrics::new()))
    }

    const UPSTREAMS: &str = "[[upstream]]\nname = \"docker.io\"\nurl = \"https://r\"\n[[upstream]]\nname = \"ghcr.io\"\nurl = \"https://g\"\n[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n";

    #[tokio::test]
    async fn users_map_to_their_tenant_and_wrong_passwords_fail() {
        let dir = tempfile::tempdir().unwrap();
        let hash = |pw: &str| bcrypt::hash(pw, 4).unwrap();
        std::fs::write(
            dir.path().join("users"),
            format!(
                "alice:{}\nbob:{}\ncarol:{}\n",
                hash("a"),
                hash("b"),
                hash("c")
            ),
        )
        .unwrap();
        let g = gate(
            &format!("{UPSTREAMS}[auth]\nhtpasswd = \"users\"\n[[tenant]]\nname = \"team-a\"\nusers = [\"alice\"]\nrepositories = [\"ghcr.io/acme/**\"]\n[[tenant]]\nname = \"team-b\"\nusers = [\"bob\"]\nrepositories = [\"docker.io/library/*\"]\n"),
            dir.path(),
        );
        assert!(g.required());
        let basic = |u: &str, p: &str| {
            let mut h = HeaderMap::new();
            h.typed_insert(Authorization::basic(u, p));
            h
        };
        let alice = g.identify(&basic("alice", "a"), None).await.unwrap();
        assert_eq!(alice, Identity::User("alice".into()));
        let t = g.tenant_of(&alice).unwrap();
        assert_eq!(&*t.name, "team-a");
        assert!(t.repo_matcher.is_match("ghcr.io/acme/app"));
        assert!(!t.repo_matcher.is_match("docker.io/library/alpine"));
        let bob = g.identify(&basic("bob", "b"), None).await.unwrap();
        assert_eq!(&*g.tenant_of(&bob).unwrap().name, "team-b");
        // carol is a user of the file but of no tenant.
        let carol = g.identify(&basic("carol", "c"), None).await.unwrap();
        assert!(g.tenant_of(&carol).is_none());
        assert_eq!(
            g.identify(&basic("alice", "b"), None).await,
            Err(AuthFailure::BadCredentials {
                user: "alice".into()
            })
        );
        assert_eq!(
            g.identify(&basic("mallory", "a"), None).await,
            Err(AuthFailure::BadCredentials {
                user: "mallory".into()
            })
        );
        assert_eq!(
            g.identify(&HeaderMap::new(), None).await,
            Err(AuthFailure::Missing)
        );
        let mut bearer = HeaderMap::new();
        bearer.insert(http::header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(g.identify(&bearer, None).await, Err(AuthFailure::Malformed));
    }

    #[test]
    fn certificate_names_match_by_dns_label() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        // Any certificate serves as a CA file for the config to load.
        write_self_signed(dir.path(), &ca);
        let g = gate(
            &format!("[server]\ntls = {{ cert = \"ca.pem\", key = \"ca.key\", client_ca = \"ca.pem\" }}\n{UPSTREAMS}[[tenant]]\nname = \"team-a\"\nclients = [\"*.team-a.example\"]\nrepositories = [\"ghcr.io/acme/**\"]\n[[tenant]]\nname = \"ops\"\nclients = [\"**.corp\"]\nrepositories = [\"**\"]\n"),
            dir.path(),
        );
        let client = |names: &[&str]| {
            Identity::Client(Arc::new(ClientCert {
                names: names.iter().map(|s| s.to_string()).collect(),
            }))
        };
        let name = |id: Identity| g.tenant_of(&id).map(|t| t.name.to_string());
        assert_eq!(
            name(client(&["node-1.team-a.example"])).as_deref(),
            Some("team-a")
        );
        // `*` is one label.
        assert_eq!(name(client(&["a.b.team-a.example"])), None);
        assert_eq!(name(client(&["team-a.example"])), None);
        assert_eq!(name(client(&["x.y.corp"])).as_deref(), Some("ops"));
        assert_eq!(
            name(client(&["other", "n.team-a.example"])).as_deref(),
            Some("team-a")
        );
    }

    /// A self-signed certificate and key by openssl, in `dir`.
    fn write_self_signed(dir: &std::path::Path, cert: &std::path::Path) {
        let ok = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=test-ca",
            ])
            .arg("-keyout")
            .arg(dir.join("ca.key"))
            .arg("-out")
            .arg(cert)
            .output()
            .expect("openssl is needed for this test (apt-get install openssl)");
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
    }

    #[test]
    fn failures_wait_longer_and_longer_up_to_the_cap() {
        assert_eq!(delay_after(1), Duration::ZERO);
        assert_eq!(delay_after(2), Duration::from_millis(100));
        assert_eq!(delay_after(3), Duration::from_millis(200));
        assert_eq!(delay_after(40), MAX_DELAY);
        let t = Throttle::default();
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        assert_eq!(t.failed(ip), Duration::ZERO);
        assert_eq!(t.failed(ip), Duration::from_millis(100));
        t.succeeded(ip);
        assert_eq!(t.failed(ip), Duration::ZERO);
    }
}

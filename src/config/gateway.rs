//! The site gateway's keys: `[server] tls`, `[auth]`, `[[tenant]]`, and an
//! upstream's `client_cert`/`client_key`. Files named here are read and
//! checked now (a key that is not its certificate's, an htpasswd entry
//! that is not bcrypt), so `check-config` finds what `serve` would.

use std::path::PathBuf;
use std::sync::Arc;

use globset::GlobSet;
use serde::Deserialize;
use toml::Spanned;

use super::Validator;

#[derive(Deserialize, Default)]
pub(super) struct RawTls {
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    client_ca: Option<Spanned<String>>,
}

#[derive(Deserialize)]
pub(super) struct RawAuth {
    htpasswd: Option<Spanned<String>>,
}

#[derive(Deserialize)]
pub(super) struct RawTenant {
    name: Spanned<String>,
    users: Option<Vec<Spanned<String>>>,
    clients: Option<Vec<Spanned<String>>>,
    repositories: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `[server] tls`: the listener speaks TLS (HTTP/2 and HTTP/1.1).
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates are verified against these roots and identify
    /// their holder.
    pub client_ca: Option<PathBuf>,
    /// Built from the files above when the config was loaded; a reload
    /// reads them again (a rotated certificate takes effect on SIGHUP).
    pub rustls: Arc<rustls::ServerConfig>,
}

/// `[auth]`: HTTP Basic users.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub htpasswd: PathBuf,
    /// The file as it was read at load.
    pub users: Arc<crate::htpasswd::Entries>,
}

/// One `[[tenant]]`: the identities it holds and what they may pull.
#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub name: Arc<str>,
    pub users: Vec<String>,
    /// As written, for messages.
    pub clients: Vec<String>,
    /// Certificate names (DNS SAN, else CN); `*` is one DNS label, `**` any.
    pub client_matcher: GlobSet,
    pub repositories: Vec<String>,
    pub repo_matcher: GlobSet,
}

impl Validator<'_> {
    pub(super) fn tls(&mut self, raw: Option<&Spanned<RawTls>>) -> Option<TlsConfig> {
        let raw = raw?;
        let t = raw.get_ref();
        let (Some(cert), Some(key)) = (&t.cert, &t.key) else {
            self.problem(
                "server.tls",
                raw,
                "needs cert and key (PEM files), e.g. tls = { cert = \"tls.crt\", key = \"tls.key\" }",
            );
            return None;
        };
        let cert_path = self.path(cert.get_ref());
        let key_path = self.path(key.get_ref());
        let ca_path = t.client_ca.as_ref().map(|c| self.path(c.get_ref()));
        match crate::tls::server_config(&cert_path, &key_path, ca_path.as_deref()) {
            Ok(rustls) => Some(TlsConfig {
                cert: cert_path,
                key: key_path,
                client_ca: ca_path,
                rustls,
            }),
            Err(e) => {
                let (k, at) = match e.file {
                    crate::tls::File::Cert => ("server.tls.cert", cert),
                    crate::tls::File::Key => ("server.tls.key", key),
                    crate::tls::File::ClientCa => {
                        ("server.tls.client_ca", t.client_ca.as_ref().unwrap_or(cert))
                    }
                };
                self.problem(k, at, e.message);
                None
            }
        }
    }

    pub(super) fn auth(&mut self, raw: Option<&RawAuth>) -> Option<AuthConfig> {
        let file = raw?.htpasswd.as_ref();
        let Some(file) = file else {
            self.problem_nowhere("auth.htpasswd", "[auth] needs htpasswd, the path of an htpasswd file with bcrypt entries (htpasswd -B)");
            return None;
        };
        let path = self.path(file.get_ref());
        match crate::htpasswd::Entries::read(&path) {
            Ok(users) => Some(AuthConfig {
                htpasswd: path,
                users: Arc::new(users),
            }),
            Err(message) => {
                self.problem("auth.htpasswd", file, message);
                None
            }
        }
    }

    pub(super) fn tenants(
        &mut self,
        raw: &[RawTenant],
        tls: Option<&TlsConfig>,
        auth: Option<&AuthConfig>,
        upstreams: &[&str],
    ) -> Vec<TenantConfig> {
        let mut out: Vec<TenantConfig> = Vec::new();
        let mut seen_users: Vec<(String, String)> = Vec::new();
        let client_certs = tls.is_some_and(|t| t.client_ca.is_some());
        for (i, t) in raw.iter().enumerate() {
            let key = |k: &str| format!("tenant[{i}].{k}");
            let name = t.name.get_ref();
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                self.problem(key("name"), &t.name, format!("{name:?} is not a tenant name (letters, digits, '-', '_', '.'): it labels metrics"));
            }
            if raw[..i].iter().any(|o| o.name.get_ref() == name) {
                self.problem(
                    key("name"),
                    &t.name,
                    format!("tenant {name:?} is defined twice"),
                );
            }
            let mut users = Vec::new();
            for (j, u) in t.users.iter().flatten().enumerate() {
                let user = u.get_ref();
                if auth.is_none() {
                    self.problem(
                        format!("tenant[{i}].users[{j}]"),
                        u,
                        "users are htpasswd users: this needs [auth] htpasswd",
                    );
                    continue;
                }
                if let Some((_, other)) = seen_users.iter().find(|(x, _)| x == user) {
                    self.problem(
                        format!("tenant[{i}].users[{j}]"),
                        u,
                        format!("user {user:?} is already in tenant {other:?}: an identity belongs to one tenant"),
                    );
                    continue;
                }
                seen_users.push((user.clone(), name.clone()));
                users.push(user.clone());
            }
            let mut clients = Vec::new();
            let mut client_set = globset::GlobSetBuilder::new();
            for (j, c) in t.clients.iter().flatten().enumerate() {
                let at = format!("tenant[{i}].clients[{j}]");
                if !client_certs {
                    self.problem(at, c, "clients are matched against client certificates: this needs [server] tls with client_ca");
                    continue;
                }
                match client_pattern(c.get_ref()) {
                    Ok(g) => {
                        client_set.add(g);
                        clients.push(c.get_ref().clone());
                    }
                    Err(message) => self.problem(at, c, message),
                }
            }
            let (repositories, repo_set) = match &t.repositories {
                Some(r) if !r.get_ref().is_empty() => {
                    self.name_patterns(&key("repositories"), r.get_ref(), upstreams)
                }
                Some(r) => {
                    self.problem(
                        key("repositories"),
                        r,
                        "needs at least one pattern, e.g. [\"ghcr.io/acme/**\"]",
                    );
                    (Vec::new(), globset::GlobSetBuilder::new())
                }
                None => {
                    self.problem(key("name"), &t.name, "needs repositories: the names this tenant may pull, e.g. [\"ghcr.io/acme/**\"]");
                    (Vec::new(), globset::GlobSetBuilder::new())
                }
            };
            if users.is_empty() && clients.is_empty() && t.users.is_none() && t.clients.is_none() {
                self.problem(key("name"), &t.name, "needs users (htpasswd users) or clients (certificate name patterns): who belongs to it");
            }
            if let (Ok(client_matcher), Ok(repo_matcher)) = (client_set.build(), repo_set.build()) {
                out.push(TenantConfig {
                    name: name.as_str().into(),
                    users,
                    clients,
                    client_matcher,
                    repositories,
                    repo_matcher,
                });
            }
        }
        out
    }
}

/// A certificate-name pattern: DNS labels take the place of path
/// segments, so `*` is one label and `**` any number of them.
pub fn client_pattern(pattern: &str) -> Result<globset::Glob, String> {
    if pattern.is_empty() || pattern.contains('/') {
        return Err(format!(
            "{pattern:?} is not a certificate name pattern (e.g. \"*.team-a.example\", \"node-*.corp\")"
        ));
    }
    globset::GlobBuilder::new(&dns_as_path(pattern))
        .literal_separator(true)
        .case_insensitive(true)
        .build()
        .map_err(|e| format!("{pattern:?} is not a valid pattern: {e}"))
}

/// `a.b.example` as `a/b/example`, the form `client_matcher` matches.
pub fn dns_as_path(name: &str) -> String {
    name.replace('.', "/")
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const UPSTREAM: &str = "[[upstream]]\nname = \"docker.io\"\nurl = \"https://r\"\n[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n";

    fn problems(text: &str, dir: &std::path::Path) -> Vec<(String, String)> {
        Config::parse(text, "test.toml", dir)
            .unwrap_err()
            .problems
            .into_iter()
            .map(|p| (p.key, p.message))
            .collect()
    }

    #[test]
    fn tenant_mistakes_are_config_problems_with_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let hash = bcrypt::hash("pw", 4).unwrap();
        std::fs::write(dir.path().join("users"), format!("alice:{hash}\n")).unwrap();
        let text = format!(
            "{UPSTREAM}[auth]\nhtpasswd = \"users\"\n\
             [[tenant]]\nname = \"a\"\nusers = [\"alice\"]\nrepositories = [\"docker.io/a/**\"]\n\
             [[tenant]]\nname = \"b\"\nusers = [\"alice\"]\nclients = [\"*.b.example\"]\nrepositories = [\"quay.io/b/**\", \"docker.io/[b\"]\n\
             [[tenant]]\nname = \"no one\"\nrepositories = [\"**\"]\n"
        );
        let p = problems(&text, dir.path());
        let has = |key: &str, words: &str| p.iter().any(|(k, m)| k == key && m.contains(words));
        assert!(
            has("tenant[1].users[0]", "already in tenant \"a\""),
            "{p:?}"
        );
        assert!(
            has("tenant[1].clients[0]", "needs [server] tls with client_ca"),
            "{p:?}"
        );
        assert!(has("tenant[1].repositories[0]", "can never match"), "{p:?}");
        assert!(
            has("tenant[1].repositories[1]", "not a valid pattern"),
            "{p:?}"
        );
        assert!(has("tenant[2].name", "not a tenant name"), "{p:?}");
        assert!(has("tenant[2].name", "needs users"), "{p:?}");
    }

    #[test]
    fn users_need_an_htpasswd_file_of_bcrypt_entries() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("users"), "alice:$apr1$x$y\n").unwrap();
        let p = problems(
            &format!("{UPSTREAM}[auth]\nhtpasswd = \"users\"\n"),
            dir.path(),
        );
        assert_eq!(p[0].0, "auth.htpasswd");
        assert!(p[0].1.contains("htpasswd -B"), "{p:?}");
        let p = problems(
            &format!("{UPSTREAM}[[tenant]]\nname = \"a\"\nusers = [\"alice\"]\nrepositories = [\"**\"]\n"),
            dir.path(),
        );
        assert!(p[0].1.contains("needs [auth] htpasswd"), "{p:?}");
    }

    #[test]
    fn tls_needs_both_files_and_a_key_that_is_the_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let p = problems(
            &format!("[server]\ntls = {{ cert = \"tls.crt\" }}\n{UPSTREAM}"),
            dir.path(),
        );
        assert_eq!(p[0].0, "server.tls");
        assert!(p[0].1.contains("needs cert and key"), "{p:?}");
        let p = problems(
            &format!("[server]\ntls = {{ cert = \"tls.crt\", key = \"tls.key\", client_ca = \"ca.pem\", ca = \"x\" }}\n{UPSTREAM}"),
            dir.path(),
        );
        assert!(
            p.iter().any(|(k, _)| k == "server.tls.ca"),
            "unknown key: {p:?}"
        );
        assert!(
            p.iter()
                .any(|(k, m)| k == "server.tls.cert" && m.contains("cannot read")),
            "{p:?}"
        );
    }

    #[test]
    fn an_upstream_path_is_a_repository_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config::parse(
            "[[upstream]]\nname = \"docker.io\"\nurl = \"https://gw.corp:5443/docker.io/\"\n[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n",
            "t",
            dir.path(),
        )
        .unwrap();
        assert_eq!(c.upstreams[0].prefix, "docker.io");
        assert_eq!(
            c.upstreams[0].url.as_ref().unwrap().as_str(),
            "https://gw.corp:5443/"
        );
        for bad in [
            "https://gw/v2/docker.io",
            "https://gw/Docker.io",
            "https://gw/a//b",
            "https://u:p@gw/",
        ] {
            let p = problems(
                &format!("[[upstream]]\nname = \"docker.io\"\nurl = \"{bad}\"\n[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n"),
                dir.path(),
            );
            assert_eq!(p[0].0, "upstream[0].url", "{bad}: {p:?}");
        }
    }
}

//! The site gateway: TLS with HTTP/2, client certificates and htpasswd
//! users mapped to tenants, node mirrors chained to a gateway, loops
//! refused. Real clients (curl, skopeo, containerd's ctr, openssl), the
//! real distribution registry upstream, certificates made by openssl.

mod common;
mod real;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::Proxy;
use real::{push, require, run, run_failing, Containerd, Layout, Registry, RegistryAuth};

/// The certificates of one test: a CA (which also signs the server's
/// certificate for 127.0.0.1), client certificates for two tenants, one of
/// another CA and an expired one.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let (_ca, _crt, _key) = real::make_tls(dir);
        let pki = Pki {
            dir: dir.to_path_buf(),
        };
        // Another CA, trusted by nobody.
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "30", "-subj", "/CN=untrusted-ca"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .arg("-keyout")
            .arg(dir.join("other-ca.key"))
            .arg("-out")
            .arg(dir.join("other-ca.crt")));
        pki.client(
            "team-a",
            "/CN=node-1",
            Some("DNS:node-1.team-a.example"),
            "ca",
            30,
        );
        pki.client("ops", "/CN=ops.corp", None, "ca", 30);
        pki.client(
            "stranger",
            "/CN=x",
            Some("DNS:node-9.team-a.example"),
            "other-ca",
            30,
        );
        pki.client(
            "expired",
            "/CN=x",
            Some("DNS:node-2.team-a.example"),
            "ca",
            -1,
        );
        pki
    }

    /// `<name>.crt` and `<name>.key`, signed by `<ca>.crt`.
    fn client(&self, name: &str, subject: &str, san: Option<&str>, ca: &str, days: i32) {
        let p = |f: &str| self.dir.join(f);
        run(Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
            ])
            .args(["-subj", subject])
            .arg("-keyout")
            .arg(p(&format!("{name}.key")))
            .arg("-out")
            .arg(p(&format!("{name}.csr"))));
        let mut ext = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n".to_owned();
        if let Some(san) = san {
            ext.push_str(&format!("subjectAltName={san}\n"));
        }
        std::fs::write(p(&format!("{name}.ext")), ext).unwrap();
        run(Command::new("openssl")
            .args([
                "x509",
                "-req",
                "-days",
                &days.to_string(),
                "-CAcreateserial",
            ])
            .arg("-in")
            .arg(p(&format!("{name}.csr")))
            .arg("-CA")
            .arg(p(&format!("{ca}.crt")))
            .arg("-CAkey")
            .arg(p(&format!("{ca}.key")))
            .arg("-extfile")
            .arg(p(&format!("{name}.ext")))
            .arg("-out")
            .arg(p(&format!("{name}.crt"))));
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }

    /// A directory as skopeo's `--src-cert-dir` reads it: the CA, and the
    /// client certificate `name` when given.
    fn cert_dir(&self, name: Option<&str>) -> PathBuf {
        let d = self.dir.join(format!("certs.d-{}", name.unwrap_or("none")));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(self.path("ca.crt"), d.join("ca.crt")).unwrap();
        if let Some(n) = name {
            std::fs::copy(self.path(&format!("{n}.crt")), d.join("client.cert")).unwrap();
            std::fs::copy(self.path(&format!("{n}.key")), d.join("client.key")).unwrap();
        }
        d
    }
}

/// An htpasswd file written by the real `htpasswd -B`.
fn htpasswd(path: &Path, users: &[(&str, &str)]) {
    require("htpasswd", "apache2-utils");
    for (i, (user, password)) in users.iter().enumerate() {
        let mut c = Command::new("htpasswd");
        c.arg("-B").arg("-b");
        if i == 0 {
            c.arg("-c");
        }
        run(c.arg(path).arg(user).arg(password));
    }
}

/// `curl` against the gateway: the status code and HTTP version, then the
/// body, or curl's failure.
fn curl(pki: &Pki, args: &[&str], url: &str) -> Result<(u16, String, String), String> {
    require("curl", "curl");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(pki.path("ca.crt"))
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(args)
        .arg(url)
        .env_remove("HTTPS_PROXY")
        .env_remove("HTTP_PROXY")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)));
    }
    let (body, last) = text.rsplit_once('\n').unwrap();
    let (code, version) = last.split_once(' ').unwrap();
    Ok((code.parse().unwrap(), version.to_owned(), body.to_owned()))
}

fn cert_args<'a>(pki: &'a Pki, name: &str, buf: &'a mut Vec<String>) -> Vec<&'a str> {
    buf.clear();
    buf.push(pki.path(&format!("{name}.crt")).display().to_string());
    buf.push(pki.path(&format!("{name}.key")).display().to_string());
    vec!["--cert", &buf[0], "--key", &buf[1]]
}

/// A registry with `team-a/app:v1`, `team-b/app:v1` and a multi-arch
/// `team-a/app:multi`; the layout they came from, and the digests of the
/// multi-arch image (index, manifests, layers).
fn registry_with_images(w: &Path) -> (Registry, Layout, Vec<String>) {
    let registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);
    let mut layout = Layout::new(&w.join("src"));
    let v1 = layout.image("amd64", &[("hello.txt", b"hello\n".to_vec())]);
    layout.tag("v1", &v1);
    let amd = layout.image("amd64", &[("arch.txt", b"amd64\n".to_vec())]);
    let arm = layout.image("arm64", &[("arch.txt", b"arm64\n".to_vec())]);
    let multi = layout.index(&[("amd64", &amd), ("arm64", &arm)]);
    layout.tag("multi", &multi);
    for (repo, tag) in [
        ("team-a/app", "v1"),
        ("team-b/app", "v1"),
        ("team-a/app", "multi"),
    ] {
        push(
            w,
            &layout.dir,
            tag,
            &format!("{}/{repo}:{tag}", registry.addr),
            &["--dest-tls-verify=false"],
        );
    }
    let digests = [
        vec![multi.digest.clone(), amd.digest.clone(), arm.digest.clone()],
        amd.layers.clone(),
        arm.layers.clone(),
    ]
    .concat();
    (registry, layout, digests)
}

fn gateway_config(registry: &Registry, pki: &Pki) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
tls = {{ cert = "{crt}", key = "{key}", client_ca = "{ca}" }}

[storage]
path = "data"

[audit]
path = "audit.jsonl"

[auth]
htpasswd = "users.htpasswd"

[[upstream]]
name = "docker.io"
url = "{url}"
default = true

[[tenant]]
name = "team-a"
users = ["alice"]
clients = ["*.team-a.example"]
repositories = ["docker.io/team-a/**"]

[[tenant]]
name = "team-b"
users = ["bob"]
clients = ["ops.corp"]
repositories = ["docker.io/team-b/**"]

[[policy]]
name = "all"
match = ["**"]
"#,
        crt = pki.path("server.crt").display(),
        key = pki.path("server.key").display(),
        ca = pki.path("ca.crt").display(),
        url = registry.url(),
    )
}

async fn start_gateway(w: &Path, registry: &Registry, pki: &Pki) -> Proxy {
    let dir = Arc::new(tempfile::tempdir_in(w).unwrap());
    htpasswd(
        &dir.path().join("users.htpasswd"),
        &[
            ("alice", "alice-pw"),
            ("bob", "bob-pw"),
            ("carol", "carol-pw"),
        ],
    );
    Proxy::with_config(dir, &gateway_config(registry, pki)).await
}

/// Audit records, once the writer has flushed at least `n` that `want`
/// (it flushes every 100 ms, so earlier records can land first).
async fn audit_lines(
    proxy: &Proxy,
    n: usize,
    want: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let path = proxy.dir.path().join("audit.jsonl");
    for _ in 0..100 {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.iter().filter(|l| want(l)).count() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} such audit records in {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_gateway_serves_http2_and_maps_users_and_certificates_to_tenants() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let pki = Pki::new(&w.join("pki"));
    let (registry, _layout, _) = registry_with_images(w);
    let gw = start_gateway(w, &registry, &pki).await;
    let base = format!("https://127.0.0.1:{}", gw.addr.port());
    let url = |p: &str| format!("{base}{p}");
    let manifest = |repo: &str| url(&format!("/v2/{repo}/manifests/v1"));
    let accept = ["-H", "Accept: application/vnd.oci.image.manifest.v1+json"];
    let mut buf = Vec::new();

    // No identity: 401 with a Basic challenge, in the registry's format.
    let (code, _, body) = curl(&pki, &["-D", "-"], &url("/v2/")).unwrap();
    assert_eq!(code, 401, "{body}");
    assert!(
        body.to_ascii_lowercase()
            .contains("www-authenticate: basic realm=\"pullgate\""),
        "{body}"
    );
    assert!(body.contains("\"UNAUTHORIZED\""), "{body}");

    // A user, over HTTP/2 and HTTP/1.1 (ALPN).
    let alice = ["-u", "alice:alice-pw"];
    let (code, version, _) =
        curl(&pki, &[&alice[..], &["--http2"]].concat(), &url("/v2/")).unwrap();
    assert_eq!((code, version.as_str()), (200, "2"));
    let (code, version, _) =
        curl(&pki, &[&alice[..], &["--http1.1"]].concat(), &url("/v2/")).unwrap();
    assert_eq!((code, version.as_str()), (200, "1.1"));
    let (code, _, _) = curl(
        &pki,
        &[&alice[..], &accept[..]].concat(),
        &manifest("team-a/app"),
    )
    .unwrap();
    assert_eq!(code, 200);
    // The other tenant's repository: refused before any upstream work.
    let upstream_before = real::count_lines(&registry.log(), "/v2/team-b/app/");
    let (code, _, body) = curl(
        &pki,
        &[&alice[..], &accept[..]].concat(),
        &manifest("team-b/app"),
    )
    .unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("not-in-tenant"), "{body}");
    assert!(body.contains("team-a"), "{body}");
    assert_eq!(
        real::count_lines(&registry.log(), "/v2/team-b/app/"),
        upstream_before
    );
    // A user of the file who is in no tenant.
    let (code, _, body) = curl(&pki, &["-u", "carol:carol-pw"], &manifest("team-a/app")).unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("belongs to no tenant"), "{body}");

    // A wrong password and an unknown user: 401, counted.
    for creds in ["alice:wrong", "mallory:alice-pw"] {
        let (code, _, body) = curl(&pki, &["-u", creds], &url("/v2/")).unwrap();
        assert_eq!(code, 401, "{body}");
        assert!(body.contains("unknown or the password is wrong"), "{body}");
    }
    assert_eq!(
        gw.metric("pullgate_auth_failures_total{reason=\"bad-credentials\"}"),
        2.0
    );

    // Client certificates: the DNS SAN of team-a's, the CN of ops's.
    let (code, version, _) = curl(
        &pki,
        &[
            &cert_args(&pki, "team-a", &mut buf)[..],
            &accept[..],
            &["--http2"],
        ]
        .concat(),
        &manifest("team-a/app"),
    )
    .unwrap();
    assert_eq!((code, version.as_str()), (200, "2"));
    let (code, _, _) = curl(
        &pki,
        &[&cert_args(&pki, "team-a", &mut buf)[..], &accept[..]].concat(),
        &manifest("team-b/app"),
    )
    .unwrap();
    assert_eq!(code, 403);
    let (code, _, _) = curl(
        &pki,
        &[&cert_args(&pki, "ops", &mut buf)[..], &accept[..]].concat(),
        &manifest("team-b/app"),
    )
    .unwrap();
    assert_eq!(code, 200);

    // A certificate of another CA, an expired one: no TLS session at all.
    let failures = gw.metric("pullgate_tls_handshake_failures_total");
    for name in ["stranger", "expired"] {
        let e = curl(&pki, &cert_args(&pki, name, &mut buf), &url("/v2/")).unwrap_err();
        assert!(!e.contains("200"), "{name}: {e}");
    }
    // The server counts a failed handshake after the client has given up
    // on it: wait (bounded) for both to be counted.
    for _ in 0..50 {
        if gw.metric("pullgate_tls_handshake_failures_total") >= failures + 2.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        gw.metric("pullgate_tls_handshake_failures_total"),
        failures + 2.0
    );

    // Plain HTTP to the TLS port gets nothing either.
    let plain = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{}/v2/", gw.addr.port()))
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("{}"));

    // Audit records and metrics carry identity and tenant.
    let lines = audit_lines(&gw, 3, |l| l["reasons"][0] == "not-in-tenant").await;
    let denied: Vec<_> = lines
        .iter()
        .filter(|l| l["reasons"][0] == "not-in-tenant")
        .collect();
    assert!(
        denied
            .iter()
            .any(|l| l["identity"] == "user:alice" && l["tenant"] == "team-a"),
        "{lines:?}"
    );
    assert!(denied
        .iter()
        .any(|l| l["identity"] == "cert:node-1.team-a.example" && l["tenant"] == "team-a"));
    assert!(denied
        .iter()
        .any(|l| l["identity"] == "user:carol" && l["tenant"].is_null()));
    assert!(
        gw.metric(
            "pullgate_tenant_requests_total{code=\"200\",kind=\"manifest\",tenant=\"team-a\"}"
        ) >= 2.0
    );
    assert_eq!(
        gw.metric("pullgate_blocked_pulls_total{mode=\"enforce\",reason=\"not-in-tenant\",upstream=\"docker.io\"}"),
        3.0
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skopeo_pulls_from_the_gateway_with_a_client_certificate_or_a_password() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let pki = Pki::new(&w.join("pki"));
    let (registry, layout, digests) = registry_with_images(w);
    let gw = start_gateway(w, &registry, &pki).await;
    let host = format!("127.0.0.1:{}", gw.addr.port());
    let copy = |src: &str, out: &Path, extra: &[&str]| {
        let mut c = real::skopeo(w);
        c.args(["copy", "--all", "--preserve-digests", "--retry-times", "0"])
            .args(extra)
            .arg(format!("docker://{host}/{src}"))
            .arg(format!("oci:{}:pulled", out.display()));
        c
    };
    let cert_dir = pki.cert_dir(Some("team-a"));
    let ca_only = pki.cert_dir(None);

    // A certificate, all platforms of a multi-arch image.
    let out = w.join("by-cert");
    run(&mut copy(
        "team-a/app:multi",
        &out,
        &["--src-cert-dir", cert_dir.to_str().unwrap()],
    ));
    let index = std::fs::read_to_string(out.join("index.json")).unwrap();
    assert!(index.contains("sha256:"), "{index}");
    real::assert_same_blobs(&layout, &out, &digests);

    // A password.
    run(&mut copy(
        "team-a/app:v1",
        &w.join("by-password"),
        &[
            "--src-cert-dir",
            ca_only.to_str().unwrap(),
            "--src-creds",
            "alice:alice-pw",
        ],
    ));
    // `skopeo login` (containers/image's login, which podman login uses):
    // refused with a wrong password, then stored and used by copy.
    let auth_file = w.join("auth.json");
    let login = |password: &str| {
        let mut c = real::skopeo(w);
        c.args([
            "login",
            "--cert-dir",
            ca_only.to_str().unwrap(),
            "-u",
            "bob",
            "-p",
            password,
        ])
        .arg("--authfile")
        .arg(&auth_file)
        .arg(&host);
        c
    };
    let e = run_failing(&mut login("wrong"));
    assert!(e.contains("invalid username/password"), "{e}");
    let said = run(&mut login("bob-pw"));
    assert!(said.contains("Login Succeeded"), "{said}");
    run(&mut copy(
        "team-b/app:v1",
        &w.join("after-login"),
        &[
            "--src-cert-dir",
            ca_only.to_str().unwrap(),
            "--src-authfile",
            auth_file.to_str().unwrap(),
        ],
    ));

    // The other tenant's image, a wrong password, no identity.
    let e = run_failing(&mut copy(
        "team-b/app:v1",
        &w.join("refused"),
        &["--src-cert-dir", cert_dir.to_str().unwrap()],
    ));
    assert!(e.contains("denied") || e.contains("403"), "{e}");
    let e = run_failing(&mut copy(
        "team-a/app:v1",
        &w.join("wrong"),
        &[
            "--src-cert-dir",
            ca_only.to_str().unwrap(),
            "--src-creds",
            "alice:nope",
        ],
    ));
    assert!(
        e.contains("401") || e.to_lowercase().contains("unauthorized"),
        "{e}"
    );
    let e = run_failing(&mut copy(
        "team-a/app:v1",
        &w.join("anonymous"),
        &["--src-cert-dir", ca_only.to_str().unwrap()],
    ));
    assert!(
        e.contains("401")
            || e.to_lowercase().contains("unauthorized")
            || e.contains("authentication required"),
        "{e}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_mirror_chained_to_the_gateway_serves_containerd() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let pki = Pki::new(&w.join("pki"));
    let (registry, _layout, _) = registry_with_images(w);
    let gw = start_gateway(w, &registry, &pki).await;

    // The node mirror: plain HTTP for containerd on the node, the gateway
    // (TLS, the node's certificate, a path prefix) as its upstream.
    let node_dir = Arc::new(tempfile::tempdir_in(w).unwrap());
    let node = Proxy::with_config(
        node_dir,
        &format!(
            r#"
[storage]
path = "data"

[[upstream]]
name = "docker.io"
url = "https://127.0.0.1:{port}/docker.io"
default = true
ca = "{ca}"
client_cert = "{crt}"
client_key = "{key}"

[[policy]]
name = "team-a only, on this node"
match = ["docker.io/team-a/**"]

[[policy]]
name = "nothing else"
match = ["**"]
deny = true
"#,
            port = gw.addr.port(),
            ca = pki.path("ca.crt").display(),
            crt = pki.path("team-a.crt").display(),
            key = pki.path("team-a.key").display(),
        ),
    )
    .await;

    let containerd = Containerd::start(&w.join("containerd"));
    let hosts = containerd.hosts_dir("docker.io", &format!("http://{}", node.addr));
    run(&mut containerd.pull("k8s.io", &hosts, "docker.io/team-a/app:multi"));
    run(&mut containerd.pull("k8s.io", &hosts, "docker.io/team-a/app:v1"));
    let images = run(containerd.ctr("k8s.io").args(["image", "ls", "-q"]));
    assert!(images.contains("docker.io/team-a/app:multi"), "{images}");

    // The gateway saw the node's certificate, as team-a.
    assert!(
        gw.metric(
            "pullgate_tenant_requests_total{code=\"200\",kind=\"manifest\",tenant=\"team-a\"}"
        ) >= 2.0,
        "{}",
        gw.metrics()
    );
    assert!(
        gw.metric("pullgate_tenant_requests_total{code=\"200\",kind=\"blob\",tenant=\"team-a\"}")
            >= 1.0
    );
    // Each layer enforces its own policy: the node denies team-b by name,
    // and the gateway would deny it to the node's tenant too.
    let e = run_failing(&mut containerd.pull("k8s.io", &hosts, "docker.io/team-b/app:v1"));
    assert!(e.contains("403") || e.contains("denied"), "{e}");
    assert_eq!(
        node.metric("pullgate_blocked_pulls_total{mode=\"enforce\",reason=\"denied-by-policy\",upstream=\"docker.io\"}"),
        1.0
    );

    // containerd straight to the gateway, with hosts.toml `ca` and `client`.
    let direct = containerd.dir.join("hosts-direct/docker.io");
    std::fs::create_dir_all(&direct).unwrap();
    std::fs::write(
        direct.join("hosts.toml"),
        format!(
            "server = \"https://127.0.0.1:{port}\"\nca = \"{ca}\"\nclient = [[\"{crt}\", \"{key}\"]]\n[host]\n",
            port = gw.addr.port(),
            ca = pki.path("ca.crt").display(),
            crt = pki.path("team-a.crt").display(),
            key = pki.path("team-a.key").display(),
        ),
    )
    .unwrap();
    run(&mut containerd.pull(
        "direct",
        &containerd.dir.join("hosts-direct"),
        "docker.io/team-a/app:v1",
    ));
    node.stop().await;
    gw.stop().await;
}

/// Starts pullgate on a listener bound before its config was written, so
/// the config can name its own address.
async fn start_on(
    listener: tokio::net::TcpListener,
    dir: &Path,
    text: &str,
) -> (
    Arc<pullgate::pipeline::App>,
    pullgate::server::ShutdownTrigger,
) {
    let config = pullgate::config::Config::parse(text, "test", dir).unwrap();
    let app = pullgate::pipeline::App::new(config).unwrap();
    let (trigger, shutdown) = pullgate::server::Shutdown::new();
    tokio::spawn(pullgate::serve(
        listener,
        app.clone(),
        shutdown,
        Duration::from_secs(1),
    ));
    (app, trigger)
}

fn mirror_of(upstream: std::net::SocketAddr) -> String {
    format!(
        "[storage]\npath = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"http://{upstream}/docker.io\"\ndefault = true\nidle_timeout = \"5s\"\n[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chained_pullgates_that_loop_fail_at_once() {
    // One pullgate whose upstream is itself.
    let dir = tempfile::tempdir().unwrap();
    let l = pullgate::server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = l.local_addr().unwrap();
    let (app, stop) = start_on(l, dir.path(), &mirror_of(addr)).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = client
        .get(format!("http://{addr}/v2/library/alpine/manifests/3.20"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    assert_eq!(app.metrics.loops_refused.get(), 1);
    stop.trigger();

    // Two that point at each other: the request comes round to the first.
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let l1 = pullgate::server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l2 = pullgate::server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let (a1, a2) = (l1.local_addr().unwrap(), l2.local_addr().unwrap());
    let (p1, s1) = start_on(l1, d1.path(), &mirror_of(a2)).await;
    let (p2, s2) = start_on(l2, d2.path(), &mirror_of(a1)).await;
    let r = client
        .get(format!("http://{a1}/v2/library/alpine/manifests/3.20"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    assert_eq!(
        p1.metrics.loops_refused.get() + p2.metrics.loops_refused.get(),
        1
    );
    // The refusal names the loop.
    let inner = client
        .get(format!("http://{a1}/v2/library/alpine/manifests/3.20"))
        .header("pullgate-hop", &*p1.instance)
        .send()
        .await
        .unwrap();
    assert_eq!(inner.status(), 508);
    let body = inner.text().await.unwrap();
    assert!(body.contains("came round"), "{body}");
    s1.trigger();
    s2.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_listener_answers_http2_with_prior_knowledge() {
    let fake = common::Fake::start().await;
    let proxy = Proxy::start(&fake, common::Options::default()).await;
    require("curl", "curl");
    let out = run(Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--http2-prior-knowledge",
            "-w",
            "\n%{http_code} %{http_version}",
        ])
        .arg(proxy.url("/v2/")));
    assert!(out.ends_with("\n200 2"), "{out}");
    // And HTTP/1.1 on the same port.
    let out = run(Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--http1.1",
            "-w",
            "\n%{http_code} %{http_version}",
        ])
        .arg(proxy.url("/v2/")));
    assert!(out.ends_with("\n200 1.1"), "{out}");
    proxy.stop().await;
}

/// The subject of the certificate a new TLS connection is served.
fn served_subject(pki: &Pki, port: u16) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -CAfile {} </dev/null 2>/dev/null | openssl x509 -noout -subject",
            pki.path("ca.crt").display()
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_a_new_certificate_and_a_bad_pair_keeps_the_old() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let pki = Pki::new(&w.join("pki"));
    let dir = Arc::new(tempfile::tempdir_in(w).unwrap());
    std::fs::copy(pki.path("server.crt"), dir.path().join("tls.crt")).unwrap();
    std::fs::copy(pki.path("server.key"), dir.path().join("tls.key")).unwrap();
    let text = "[server]\ntls = { cert = \"tls.crt\", key = \"tls.key\" }\n[storage]\npath = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\ndefault = true\n[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n";
    let gw = Proxy::with_config(dir.clone(), text).await;
    let port = gw.addr.port();
    assert!(served_subject(&pki, port).contains("CN = 127.0.0.1"));

    // An open connection, kept alive across the reload.
    let client = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(pki.path("ca.crt")).unwrap()).unwrap(),
        )
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let v2 = format!("https://127.0.0.1:{port}/v2/");
    assert_eq!(client.get(&v2).send().await.unwrap().status(), 200);

    // A new certificate (same key, new subject) under the same file names.
    run(Command::new("openssl")
        .args(["req", "-new", "-subj", "/CN=rotated", "-key"])
        .arg(dir.path().join("tls.key"))
        .arg("-out")
        .arg(dir.path().join("rotated.csr")));
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "5", "-CAcreateserial", "-extfile"])
        .arg(pki.path("server.ext"))
        .arg("-in")
        .arg(dir.path().join("rotated.csr"))
        .arg("-CA")
        .arg(pki.path("ca.crt"))
        .arg("-CAkey")
        .arg(pki.path("ca.key"))
        .arg("-out")
        .arg(dir.path().join("tls.crt")));
    let reload = || pullgate::config::Config::parse(text, "test", dir.path());
    gw.app.reload(reload().unwrap()).unwrap();
    assert!(served_subject(&pki, port).contains("CN = rotated"));
    assert_eq!(client.get(&v2).send().await.unwrap().status(), 200);

    // A key that is not the certificate's: the reload fails, the rotated
    // certificate stays.
    std::fs::copy(pki.path("ops.key"), dir.path().join("tls.key")).unwrap();
    let e = reload().unwrap_err().to_string();
    assert!(e.contains("is not the key of the certificate"), "{e}");
    assert!(served_subject(&pki, port).contains("CN = rotated"));
    gw.stop().await;
}

/// The bug found chaining: distribution's pull-through cache in front of
/// pullgate asks `HEAD` for a blob before fetching it, and pullgate, not
/// having the blob yet, said `Content-Length: 0`; distribution then kept
/// an empty blob. The pull through both must give every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_distribution_pull_through_cache_in_front_of_pullgate_gets_whole_blobs() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (registry, layout, digests) = registry_with_images(w);
    let dir = Arc::new(tempfile::tempdir_in(w).unwrap());
    let proxy = Proxy::with_config(
        dir,
        &format!(
            "[storage]\npath = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n",
            registry.url()
        ),
    )
    .await;
    let cache = Registry::start(
        &w.join("cache"),
        None,
        RegistryAuth::None,
        Some(&format!("http://{}", proxy.addr)),
    );
    let out = w.join("through-both");
    real::pull(w, &format!("{}/team-a/app:multi", cache.addr), &out, &[]).unwrap();
    real::assert_same_blobs(&layout, &out, &digests);
    // Pulled again, from distribution's own cache this time: still whole.
    let again = w.join("from-the-cache");
    real::pull(w, &format!("{}/team-a/app:multi", cache.addr), &again, &[]).unwrap();
    real::assert_same_blobs(&layout, &again, &digests);
    proxy.stop().await;
}

/// A Harbor proxy project, an Artifactory remote, a gateway pullgate: the
/// registry's repositories live under a path there, with token auth whose
/// scopes name that path too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_behind_a_path_prefix_gets_its_paths_and_token_scopes() {
    let fake = common::Fake::start().await;
    fake.set_auth(Some(common::Auth::Token {
        user: "robot".into(),
        pass: "secret".into(),
    }));
    let (digest, layers) = fake.put_image("proj/library/app", "1", &[common::noise(1000, 1)]);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    std::fs::write(dir.path().join("pw"), "secret\n").unwrap();
    let proxy = Proxy::with_config(
        dir,
        &format!(
            "[storage]\npath = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}/proj\"\ndefault = true\nusername = \"robot\"\npassword_file = \"pw\"\n[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n",
            fake.url()
        ),
    )
    .await;
    let r = proxy
        .client
        .get(proxy.url("/v2/docker.io/app/manifests/1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    let blob = proxy
        .get(&format!("/v2/docker.io/app/blobs/{}", layers[0]))
        .await;
    assert_eq!(blob.status(), 200);
    assert_eq!(blob.bytes().await.unwrap().len(), 1000);
    assert_eq!(
        fake.hits("GET", "/v2/proj/library/app/manifests/1"),
        2,
        "401, then with the token"
    );
    assert_eq!(fake.hits("GET", "/v2/library/app/manifests/1"), 0);
    let scopes = fake.state.token_scopes.lock().unwrap().clone();
    assert!(!scopes.is_empty());
    assert!(
        scopes
            .iter()
            .all(|s| s == "repository:proj/library/app:pull"),
        "{scopes:?}"
    );
    proxy.stop().await;
}

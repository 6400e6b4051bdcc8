//! The `pullgate` binary: config checking, serving, reload and shutdown.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{noise, Fake, FaultKind};
use http::Method;
use tokio::sync::Semaphore;

const BIN: &str = env!("CARGO_BIN_EXE_pullgate");

/// A port free now, below Linux's ephemeral range (32768 and up), so that
/// the tests' own client connections cannot take it before pullgate binds.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = 20_000 + (std::process::id() % 5_000) as u16;
    loop {
        let port = start + NEXT.fetch_add(1, Ordering::SeqCst) % 10_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

#[test]
fn every_example_config_passes_check_config() {
    let mut checked = 0;
    for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(BIN)
                .arg("check-config")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 2, "config/ should hold the example configs");
}

#[test]
fn a_bad_config_lists_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"nope\"\n\n[storage]\ntag_ttl = \"forever\"\n\n[[upstream]]\nname = \"docker.io\"\nurl = \"ftp://x\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "line 2: server.listen",
        "line 5: storage.tag_ttl",
        "line 9: upstream[0].url",
        "policy",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    // Given as for `serve`, the same answer.
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    // `serve` refuses it the same way, before binding anything.
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn help_explains_the_commands() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("serve") && text.contains("check-config"),
        "{text}"
    );
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("embedded default"), "{text}");
    assert!(text.contains("SIGHUP"), "{text}");
}

/// A `pullgate serve` child process, killed on drop.
struct Server {
    child: Child,
}

impl Server {
    fn start(config: &Path, admin: u16) -> Server {
        Server::start_with_env(config, admin, &[])
    }

    fn start_with_env(config: &Path, admin: u16, env: &[(&str, &str)]) -> Server {
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut s = Server { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", admin)).is_err() {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("pullgate exited while starting ({status})");
            }
            assert!(Instant::now() < deadline, "pullgate did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// Waits (bounded) for the process to exit: `None` if it is still
    /// running, else its exit code (`None` inside when killed by a signal).
    fn wait_exit(&mut self, within: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(
    dir: &Path,
    port: u16,
    admin: u16,
    upstream: &str,
    policy: &str,
) -> std::path::PathBuf {
    let path = dir.join("pullgate.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_timeout = \"10s\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[storage]\npath = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{upstream}\"\ndefault = true\n{policy}"
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reloads_on_sighup_and_drains_on_sigterm() {
    let fake = Fake::start().await;
    fake.put_image("library/app", "v1", &[noise(100, 1)]);
    let blob = noise(2 << 20, 2);
    let digest = fake.put_blob(blob.clone());
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let allow = "[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n";
    let config = write_config(dir.path(), port, admin, &fake.url(), allow);
    let mut server = Server::start(&config, admin);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |path: String| {
        let client = client.clone();
        async move {
            client
                .get(format!("http://127.0.0.1:{port}{path}"))
                .send()
                .await
                .unwrap()
        }
    };
    let admin_get = |path: &'static str| {
        let client = client.clone();
        async move {
            let r = client
                .get(format!("http://127.0.0.1:{admin}{path}"))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(admin_get("/healthz").await.0, 200);
    assert_eq!(admin_get("/readyz").await.0, 200);
    assert_eq!(
        get("/v2/library/app/manifests/v1".into()).await.status(),
        200
    );
    let (_, metrics) = admin_get("/metrics").await;
    assert!(
        metrics.contains("pullgate_requests_total{kind=\"manifest\",status=\"200\"} 1"),
        "{metrics}"
    );

    // Reload with a deny-all policy: it takes effect without a restart.
    write_config(
        dir.path(),
        port,
        admin,
        &fake.url(),
        "[[policy]]\nname = \"closed\"\nmatch = [\"**\"]\ndeny = true\n",
    );
    server.signal("HUP");
    let mut denied = false;
    for _ in 0..100 {
        if get("/v2/library/app/manifests/v1".into()).await.status() == 403 {
            denied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(denied, "the reloaded policy was not applied");

    // An invalid file is refused; the last good config stays in force.
    std::fs::write(&config, "this is not toml = [").unwrap();
    server.signal("HUP");
    let mut counted = false;
    for _ in 0..100 {
        if admin_get("/metrics")
            .await
            .1
            .contains("pullgate_config_reloads_total{result=\"error\"} 1")
        {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(counted);
    assert_eq!(
        get("/v2/library/app/manifests/v1".into()).await.status(),
        403
    );

    // Back to allow, then SIGTERM during a transfer: the transfer completes.
    write_config(dir.path(), port, admin, &fake.url(), allow);
    server.signal("HUP");
    for _ in 0..100 {
        if get("/v2/library/app/manifests/v1".into()).await.status() == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gate = Arc::new(Semaphore::new(0));
    fake.fault(
        Some(Method::GET),
        &digest,
        FaultKind::GateAfter(1000, gate.clone()),
        Some(1),
    );
    let mut r = get(format!("/v2/library/app/blobs/{digest}")).await;
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().unwrap();
    server.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "no new connections after SIGTERM"
    );
    gate.add_permits(1);
    let mut got = first.to_vec();
    while let Some(c) = r.chunk().await.unwrap() {
        got.extend_from_slice(&c);
    }
    assert!(got == blob, "the transfer in flight completed");
    let code = tokio::task::spawn_blocking(move || server.wait_exit(Duration::from_secs(15)))
        .await
        .unwrap();
    assert_eq!(code, Some(Some(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_fetch_leaves_a_consistent_store() {
    let fake = Fake::start().await;
    let (manifest, _) = fake.put_image("library/app", "v1", &[noise(100, 1)]);
    let blob = noise(2 << 20, 9);
    let digest = fake.put_blob(blob.clone());
    let gate = Arc::new(Semaphore::new(0));
    fake.fault(
        Some(Method::GET),
        &digest,
        FaultKind::GateAfter(1000, gate.clone()),
        Some(1),
    );
    let dir = tempfile::tempdir().unwrap();
    let allow = "[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n";
    let (port, admin) = (free_port(), free_port());
    let config = write_config(dir.path(), port, admin, &fake.url(), allow);
    let mut server = Server::start(&config, admin);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = |port: u16, path: &str| format!("http://127.0.0.1:{port}{path}");
    let r = client
        .get(url(port, "/v2/library/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut r = client
        .get(url(port, &format!("/v2/library/app/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    let _ = r.chunk().await.unwrap().unwrap();

    // Killed mid-fetch: only a temp file holds the partial blob.
    server.signal("KILL");
    assert_eq!(
        server.wait_exit(Duration::from_secs(10)),
        Some(None),
        "killed by the signal"
    );
    let data = dir.path().join("data");
    assert_eq!(std::fs::read_dir(data.join("tmp")).unwrap().count(), 1);
    let final_path = data
        .join("blobs/sha256")
        .join(&digest[7..9])
        .join(&digest[7..]);
    assert!(
        !final_path.exists(),
        "a partial blob never appears under its digest"
    );
    drop(server);
    gate.add_permits(1);

    // Restarted: temp files are gone, what was committed is served even
    // with the upstream failing, and the blob is fetched again whole.
    let (port, admin) = (free_port(), free_port());
    let config = write_config(dir.path(), port, admin, &fake.url(), allow);
    let _server = Server::start(&config, admin);
    assert_eq!(std::fs::read_dir(data.join("tmp")).unwrap().count(), 0);
    fake.fault(None, "/manifests/", FaultKind::Status(503), None);
    let r = client
        .get(url(port, "/v2/library/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], manifest.as_str());
    let r = client
        .get(url(port, &format!("/v2/library/app/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert!(r.bytes().await.unwrap() == blob);
    assert!(final_path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_traffic_uses_the_environment_proxy_unless_no_proxy_says_otherwise() {
    // The fake answers absolute-form proxy requests as the registry would,
    // so it stands for both the proxy and the registry behind it.
    let proxy = Fake::start().await;
    proxy.put_image("library/app", "v1", &[noise(100, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let allow = "[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n";
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let proxy_url = proxy.url();
    for (no_proxy, want) in [("", 200), ("registry.invalid", 503)] {
        let (port, admin) = (free_port(), free_port());
        let config = write_config(
            dir.path(),
            port,
            admin,
            "http://registry.invalid:5000",
            allow,
        );
        let env = [
            ("HTTP_PROXY", proxy_url.as_str()),
            ("HTTPS_PROXY", proxy_url.as_str()),
            ("NO_PROXY", no_proxy),
        ];
        let _server = Server::start_with_env(&config, admin, &env);
        let before = proxy.total_hits("/manifests/");
        let r = client
            .get(format!(
                "http://127.0.0.1:{port}/v2/library/app/manifests/v1"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want, "NO_PROXY={no_proxy:?}");
        let through_proxy = proxy.total_hits("/manifests/") - before;
        assert_eq!(
            through_proxy,
            usize::from(want == 200),
            "NO_PROXY={no_proxy:?}"
        );
        std::fs::remove_dir_all(dir.path().join("data")).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygen_and_approve_let_a_running_server_serve_an_unsigned_image() {
    let fake = Fake::start().await;
    let (digest, layers) = fake.put_image("library/app", "v1", &[noise(100, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["keygen", "--scheme", "ed25519", "--out"])
        .arg(dir.path().join("approver"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(dir.path().join("approver"))
        .output()
        .unwrap();
    assert!(!again.status.success(), "keygen never overwrites a key");

    let (port, admin) = (free_port(), free_port());
    let policy = "[keys]\napprover = \"approver.pub\"\n\n[[policy]]\nname = \"approved\"\nmatch = [\"docker.io/**\"]\nsigned_by = [\"approver\"]\n";
    // [keys] must come before the tables write_config adds: put it first.
    let config = write_config(dir.path(), port, admin, &fake.url(), "");
    let text = std::fs::read_to_string(&config).unwrap();
    let (keys, policies) = policy.split_once("\n\n").unwrap();
    std::fs::write(&config, format!("{keys}\n\n{text}\n{policies}")).unwrap();
    let _server = Server::start(&config, admin);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |path: String| {
        let client = client.clone();
        async move {
            client
                .get(format!("http://127.0.0.1:{port}{path}"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(get("/v2/library/app/manifests/v1".into()).await, 403);

    let out = Command::new(BIN)
        .arg("approve")
        .arg(format!("docker.io/library/app@{digest}"))
        .arg("--key")
        .arg(dir.path().join("approver.key"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("trusted as \"approver\""), "{text}");
    // No restart: the next pull finds the approval.
    assert_eq!(get("/v2/library/app/manifests/v1".into()).await, 200);
    assert_eq!(
        get(format!("/v2/library/app/blobs/{}", layers[0])).await,
        200
    );
    // A bad reference is a clear error.
    let out = Command::new(BIN)
        .args(["approve", "docker.io/library/app:v1", "--key"])
        .arg(dir.path().join("approver.key"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NAME@DIGEST"));
    // ...that says how to get the digest.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pullgate verify docker.io/library/app:v1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_explains_the_verdict_step_by_step() {
    use p256::pkcs8::{EncodePublicKey, LineEnding};
    use signature::Signer;
    let fake = Fake::start().await;
    let key = p256::ecdsa::SigningKey::from_slice(&[31; 32]).unwrap();
    let stranger = p256::ecdsa::SigningKey::from_slice(&[32; 32]).unwrap();
    let sign = |repo: &str, digest: &str, k: &p256::ecdsa::SigningKey| {
        let d: pullgate::names::Digest = digest.parse().unwrap();
        let payload = pullgate::cosign::payload(repo, &d);
        let sig: p256::ecdsa::Signature = k.sign(&payload);
        fake.put_blob(bytes::Bytes::from(payload.clone()));
        let (m, c) =
            pullgate::cosign::signature_manifest(&[(payload, sig.to_der().as_bytes().to_vec())]);
        fake.put_blob(bytes::Bytes::from(c));
        fake.put_manifest(
            repo,
            Some(&pullgate::cosign::signature_tag(&d)),
            "application/vnd.oci.image.manifest.v1+json",
            m,
        );
    };
    let (signed, _) = fake.put_image("library/signed", "v1", &[noise(10, 1)]);
    sign("library/signed", &signed, &key);
    fake.put_image("library/unsigned", "v1", &[noise(10, 2)]);
    let (wrong, _) = fake.put_image("library/wrong", "v1", &[noise(10, 3)]);
    sign("library/wrong", &wrong, &stranger);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("release.pub"),
        key.verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap(),
    )
    .unwrap();
    let config = write_config(dir.path(), free_port(), free_port(), &fake.url(), "");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("[keys]\nrelease = \"release.pub\"\n\n{text}\n[[policy]]\nname = \"signed\"\nmatch = [\"docker.io/**\"]\nsigned_by = [\"release\"]\n"),
    )
    .unwrap();
    let verify = move |image: &str| {
        let out = Command::new(BIN)
            .args(["verify", image, "--config"])
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (code, text) = tokio::task::spawn_blocking({
        let verify = verify.clone();
        move || verify("docker.io/library/signed:v1")
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{text}");
    for needle in [
        "policy: \"signed\"",
        "verified with key \"release\"",
        "verdict: allowed",
    ] {
        assert!(text.contains(needle), "missing {needle:?}:\n{text}");
    }
    let (code, text) = tokio::task::spawn_blocking({
        let verify = verify.clone();
        move || verify("library/unsigned:v1")
    })
    .await
    .unwrap();
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("no signatures") && text.contains("verdict: denied"),
        "{text}"
    );
    // The precise reason, and what would let the image through.
    assert!(text.contains("verdict: denied (unsigned)"), "{text}");
    assert!(
        text.contains("to let it through: sign it")
            && text.contains("pullgate approve docker.io/library/unsigned@sha256:"),
        "{text}"
    );
    let (code, text) = tokio::task::spawn_blocking({
        let verify = verify.clone();
        move || verify(&format!("docker.io/library/wrong@{wrong}"))
    })
    .await
    .unwrap();
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("signature rejected: no trusted key verifies the signature"),
        "{text}"
    );
    let (code, _) = tokio::task::spawn_blocking(move || verify("docker.io/library/nothing:v1"))
        .await
        .unwrap();
    assert_eq!(code, Some(69));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_writes_approved_digests_and_refuses_denied_ones() {
    let fake = Fake::start().await;
    let (app, _) = fake.put_image("library/app", "1", &[noise(10, 1)]);
    fake.put_image("library/evil", "1", &[noise(10, 2)]);
    let base_layer = noise(10, 3);
    fake.put_image(
        "distroless/static",
        "nonroot",
        std::slice::from_ref(&base_layer),
    );
    fake.put_image("acme/app", "good", &[base_layer.clone(), noise(10, 4)]);
    fake.put_image("acme/app", "bad", &[noise(10, 5)]);
    fake.put_image("mirror/redis", "7", &[noise(10, 6)]);
    let dir = tempfile::tempdir().unwrap();
    let policies = r#"
[bases]
distroless = ["docker.io/distroless/static:nonroot"]
[[rewrite]]
from = "docker.io/bitnami/redis"
to = "docker.io/mirror/redis"
[[policy]]
name = "no evil"
match = ["docker.io/library/evil"]
deny = true
[[policy]]
name = "acme"
match = ["docker.io/acme/**"]
bases = ["distroless"]
[[policy]]
name = "rest"
match = ["**"]
"#;
    let config = write_config(dir.path(), free_port(), free_port(), &fake.url(), policies);
    let text = std::fs::read_to_string(&config).unwrap();
    let without_pins = dir.path().join("no-pins.toml");
    std::fs::write(&without_pins, &text).unwrap();
    std::fs::write(&config, format!("pins_file = \"pins.toml\"\n{text}")).unwrap();
    let pins = dir.path().join("pins.toml");
    let run = move |args: Vec<String>| {
        let out = Command::new(BIN).args(&args).output().unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let cfg = config.display().to_string();
    let args = |cmd: &str, image: &str, cfg: &str| {
        vec![
            cmd.to_owned(),
            image.to_owned(),
            "--config".to_owned(),
            cfg.to_owned(),
        ]
    };
    let call = |a: Vec<String>| tokio::task::spawn_blocking(move || run(a));

    // An older pin of the same tag, written short: replaced, not doubled.
    let (older, _) = fake.put_image("library/app", "older", &[noise(10, 9)]);
    std::fs::write(&pins, format!("[pins]\n\"app:1\" = \"{older}\"\n")).unwrap();
    let (code, out) = call(args("pin", "app:1", &cfg)).await.unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!(
            "pinned docker.io/library/app:1 to {app} (was {older})"
        )),
        "{out}"
    );
    let written = std::fs::read_to_string(&pins).unwrap();
    assert!(
        written.contains(&format!("\"docker.io/library/app:1\" = \"{app}\"")),
        "{written}"
    );
    assert!(!written.contains("\"app:1\""), "{written}");
    let (code, out) = call(args("pin", "docker.io/library/app:1", &cfg))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("already pinned"), "{out}");
    // The config still loads with the file `pin` wrote, and verify honours it.
    let (code, out) = call(args("verify", "app:1", &cfg)).await.unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("pin: tag 1 is pinned to {app}")),
        "{out}"
    );

    // Denied: nothing is pinned, the file is untouched.
    let (code, out) = call(args("pin", "library/evil:1", &cfg)).await.unwrap();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("not allowed by policy; nothing pinned"),
        "{out}"
    );
    let (code, out) = call(args("pin", "acme/app:bad", &cfg)).await.unwrap();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("first 0 of 1 layers match distroless"),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&pins).unwrap(), written);
    let (code, out) = call(args("pin", "acme/app:good", &cfg)).await.unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("built on distroless (docker.io/distroless/static:nonroot"),
        "{out}"
    );

    // verify explains a rewrite.
    let (code, out) = call(args("verify", "docker.io/bitnami/redis:7", &cfg))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("rewrite: served from docker.io/mirror/redis"),
        "{out}"
    );

    // A tag pinned in the config itself is not `pin`'s to change.
    let inline = dir.path().join("inline.toml");
    std::fs::write(
        &inline,
        format!("pins_file = \"pins-inline.toml\"\n{text}\n[pins]\n\"app:1\" = \"{older}\"\n"),
    )
    .unwrap();
    let (code, out) = call(args("pin", "app:1", &inline.display().to_string()))
        .await
        .unwrap();
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("change it there"), "{out}");
    assert!(!dir.path().join("pins-inline.toml").exists());
    // ...and when it already names the digest, there is nothing to do.
    std::fs::write(
        &inline,
        format!("pins_file = \"pins-inline.toml\"\n{text}\n[pins]\n\"app:1\" = \"{app}\"\n"),
    )
    .unwrap();
    let (code, out) = call(args("pin", "app:1", &inline.display().to_string()))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("already pinned") && out.contains("in [pins]"),
        "{out}"
    );
    assert!(!dir.path().join("pins-inline.toml").exists());

    // No pins_file, a digest, and a pins file that cannot be written.
    let (code, out) = call(args("pin", "app:1", &without_pins.display().to_string()))
        .await
        .unwrap();
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("has no pins_file"), "{out}");
    let (code, out) = call(args("pin", &format!("app@{app}"), &cfg))
        .await
        .unwrap();
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("NAME:TAG"), "{out}");
    // Nothing can be created in /proc, not even by root.
    let blocked = dir.path().join("blocked.toml");
    std::fs::write(&blocked, format!("pins_file = \"/proc/pins.toml\"\n{text}")).unwrap();
    let (code, out) = call(args("pin", "app:1", &blocked.display().to_string()))
        .await
        .unwrap();
    assert!(
        code == Some(73) && out.contains("cannot write") && out.contains("old file is unchanged"),
        "{code:?} {out}"
    );
    let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    if !root {
        // A read-only directory (root would write anyway): the old file stays.
        use std::os::unix::fs::PermissionsExt;
        let before = std::fs::read_to_string(&pins).unwrap();
        std::fs::write(dir.path().join("pins.toml"), &before).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
        let (code, out) = call(args("pin", "acme/app:good", &cfg)).await.unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(code, Some(73), "{out}");
        assert_eq!(std::fs::read_to_string(&pins).unwrap(), before);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_and_verify_say_when_the_upstream_cannot_be_asked_beside_a_server() {
    let fake = Fake::start().await;
    let (app, _) = fake.put_image("library/app", "1", &[noise(10, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let allow = "[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n";
    let config = write_config(dir.path(), port, admin, &fake.url(), allow);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("pins_file = \"pins.toml\"\n{text}")).unwrap();
    // A running server has the tag in its store.
    let _server = tokio::task::spawn_blocking({
        let config = config.clone();
        move || Server::start(&config, admin)
    })
    .await
    .unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = client
        .get(format!(
            "http://127.0.0.1:{port}/v2/library/app/manifests/1"
        ))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], app.as_str());
    // The upstream fails: a pull is served the stored digest, but a command
    // must not take that for the tag's current digest.
    fake.fault(None, "/manifests/", FaultKind::Status(503), None);
    let run = |args: Vec<String>| {
        let out = Command::new(BIN).args(&args).output().unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let cfg = config.display().to_string();
    for cmd in ["pin", "verify"] {
        let args = vec![
            cmd.to_owned(),
            "app:1".to_owned(),
            "-c".to_owned(),
            cfg.clone(),
        ];
        let (code, out) = tokio::task::spawn_blocking(move || run(args))
            .await
            .unwrap();
        assert_eq!(code, Some(69), "{cmd}: {out}");
        assert!(out.contains("cannot reach a verdict"), "{cmd}: {out}");
    }
    assert!(!dir.path().join("pins.toml").exists(), "nothing was pinned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_and_approve_explain_what_the_name_alone_decides() {
    let fake = Fake::start().await;
    fake.put_image("library/app", "1", &[noise(10, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let policies = "[[policy]]\nname = \"no evil\"\nmatch = [\"docker.io/evil/**\"]\ndeny = true\n[[policy]]\nname = \"library\"\nmatch = [\"docker.io/library/**\"]\n";
    let config = write_config(dir.path(), free_port(), free_port(), &fake.url(), policies);
    let run = move |args: Vec<String>| {
        let out = Command::new(BIN).args(&args).output().unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let cfg = config.display().to_string();
    let call = |a: Vec<&str>| {
        let a: Vec<String> = a.into_iter().map(str::to_owned).collect();
        tokio::task::spawn_blocking(move || run(a))
    };
    // A name no policy matches: a verdict line, and what would change it.
    let (code, out) = call(vec!["verify", "docker.io/other/app:1", "-c", &cfg])
        .await
        .unwrap();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("verdict: denied (no-policy)"), "{out}");
    assert!(out.contains("to let it through: add a [[policy]]"), "{out}");
    // Under deny = true, an approval cannot help, and approve says so.
    let key = dir.path().join("k");
    let (code, out) = call(vec!["keygen", "--out", &key.display().to_string()])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{out}");
    let digest = format!("sha256:{}", "a".repeat(64));
    let (code, out) = call(vec![
        "approve",
        &format!("docker.io/evil/app@{digest}"),
        "--key",
        &format!("{}.key", key.display()),
        "-c",
        &cfg,
    ])
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("denies every name it matches") && !out.contains("until it does"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_during_cold_pulls_leaves_a_store_fsck_passes() {
    const ROUNDS: usize = 25;
    const CLIENTS: usize = 6;
    let fake = Fake::start().await;
    // Every round pulls images nobody pulled before, slowly enough that
    // the kill lands mid-transfer as often as between transfers.
    let mut images = Vec::new();
    for i in 0..ROUNDS * CLIENTS {
        let layers = [noise(1 << 20, i as u64), noise(300, 10_000 + i as u64)];
        let (manifest, digests) = fake.put_image("library/app", &format!("t{i}"), &layers);
        images.push((i, manifest, digests, layers));
    }
    fake.fault(
        Some(Method::GET),
        "/blobs/",
        FaultKind::Trickle(64 * 1024, Duration::from_millis(4)),
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let allow = "[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n";
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut interrupted = 0;
    for round in 0..ROUNDS {
        let (port, admin) = (free_port(), free_port());
        let config = write_config(dir.path(), port, admin, &fake.url(), allow);
        let mut server = Server::start(&config, admin);
        let mut pulls = Vec::new();
        for (i, _, digests, _) in &images[round * CLIENTS..(round + 1) * CLIENTS] {
            let (client, i, digests) = (client.clone(), *i, digests.clone());
            pulls.push(tokio::spawn(async move {
                let base = format!("http://127.0.0.1:{port}/v2/library/app");
                let _ = client.get(format!("{base}/manifests/t{i}")).send().await;
                for d in digests {
                    if let Ok(r) = client.get(format!("{base}/blobs/{d}")).send().await {
                        let _ = r.bytes().await;
                    }
                }
            }));
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(seed % 300)).await;
        server.signal("KILL");
        assert_eq!(server.wait_exit(Duration::from_secs(10)), Some(None));
        drop(server);
        for p in pulls {
            let _ = p.await;
        }
        let out = Command::new(BIN)
            .args(["fsck", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("no problems found"),
            "round {round}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if text.contains("temp files left") {
            interrupted += 1;
        }
    }
    // The kills did land mid-transfer (a temp file was left), in many rounds.
    assert!(
        interrupted >= ROUNDS / 3,
        "{interrupted} of {ROUNDS} rounds"
    );
    // Whatever each round left, a last server serves every image whole.
    let (port, admin) = (free_port(), free_port());
    let config = write_config(dir.path(), port, admin, &fake.url(), allow);
    let _server = Server::start(&config, admin);
    fake.clear_faults();
    for (i, manifest, digests, layers) in images.iter().step_by(7) {
        let base = format!("http://127.0.0.1:{port}/v2/library/app");
        let r = client
            .get(format!("{base}/manifests/t{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["docker-content-digest"], manifest.as_str());
        for (d, bytes) in digests.iter().zip(layers) {
            let got = client
                .get(format!("{base}/blobs/{d}"))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert!(got == *bytes, "blob {d} of t{i}");
        }
    }

    // Bit rot beside the running server: fsck finds it, moves it aside and
    // exits 1; the server fetches the blob again instead of serving it.
    let (_, _, digests, layers) = &images[0];
    let hex = &digests[0][7..];
    let path = dir
        .path()
        .join("data/blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    let mut rotten = std::fs::read(&path).unwrap();
    rotten[4096] ^= 1;
    std::fs::write(&path, rotten).unwrap();
    let out = Command::new(BIN)
        .args(["fsck", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(hex) && text.contains("not to its name"),
        "{text}"
    );
    assert!(text.contains("beside the running server"), "{text}");
    let fetched = fake.hits("GET", &format!("/v2/library/app/blobs/{}", digests[0]));
    let got = client
        .get(format!(
            "http://127.0.0.1:{port}/v2/library/app/blobs/{}",
            digests[0]
        ))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(got == layers[0]);
    assert_eq!(
        fake.hits("GET", &format!("/v2/library/app/blobs/{}", digests[0])),
        fetched + 1
    );
}

#[test]
fn verify_bundle_refuses_what_is_not_a_valid_bundle_and_names_why() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("a.txt"), b"hello\n").unwrap();
    std::fs::write(
        d.join("bundle.json"),
        b"{\"mediaType\": \"application/vnd.dev.sigstore.bundle.v0.3+json\"}",
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let o = Command::new(BIN)
            .arg("verify-bundle")
            .arg("--bundle")
            .arg(d.join("bundle.json"))
            .args(extra)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let a = d.join("a.txt");
    let a = a.to_str().unwrap();
    let id = [
        "--certificate-identity",
        "keyless@distroless.iam.gserviceaccount.com",
        "--certificate-oidc-issuer",
        "https://accounts.google.com",
    ];
    // An incomplete bundle: not verified, exit 1, with the reason.
    let (code, err) = run(&[&id[..], &[a]].concat());
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("not verified") || err.contains("not a sigstore bundle"),
        "{err}"
    );
    // A key that is not one is a configuration error, told apart from a
    // bundle that does not verify.
    std::fs::write(
        d.join("key.pub"),
        b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let key = d.join("key.pub");
    let (code, err) = run(&["--key", key.to_str().unwrap(), a]);
    assert_eq!(code, Some(64), "{err}");
    // A trusted root that is not one is a configuration error: 64.
    std::fs::write(d.join("root.json"), b"[]").unwrap();
    let root = d.join("root.json");
    let (code, err) = run(&[&id[..], &["--trusted-root", root.to_str().unwrap(), a]].concat());
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("root.json"), "{err}");
    // An identity needs its issuer (clap's usage error).
    let (code, _) = run(&["--certificate-identity", "x", a]);
    assert_eq!(code, Some(2));
}

//! Interop for what a pull resolves to: name rewrites, tag pins
//! (`pullgate pin`), tag drift, digest-only policies and the base-image
//! allow-list, with the real distribution registry upstream and real
//! skopeo and containerd clients.

mod common;
mod real;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::Proxy;
use real::{assert_same_blobs, noise, pull, push, Containerd, Layout, Registry, RegistryAuth};

/// The pullgate binary, with `args` and `--config CONFIG`.
fn pullgate(args: &[&str], config: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pullgate"));
    c.args(args)
        .arg("--config")
        .arg(config)
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY");
    c
}

/// The manifest digest a pulled layout holds under `pulled`.
fn pulled_digest(out: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_owned()
}

fn push_all(w: &Path, layout: &Layout, registry: &Registry, pushes: &[(&str, &str)]) {
    for (tag, dest) in pushes {
        push(
            w,
            &layout.dir,
            tag,
            &format!("{}/{dest}", registry.addr),
            &["--dest-tls-verify=false"],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rewrites_pins_tag_drift_and_digest_rules_with_skopeo_and_containerd() {
    use p256::pkcs8::{EncodePublicKey, LineEnding};
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);
    let key = p256::ecdsa::SigningKey::from_slice(&[31; 32]).unwrap();

    let mut layout = Layout::new(&w.join("src"));
    // The internal copy a rewrite serves, and a public image it hides.
    let internal = layout.image(
        "amd64",
        &[
            ("etc/os", b"internal\n".to_vec()),
            ("data", noise(1 << 20, 3)),
        ],
    );
    layout.tag("internal", &internal);
    let public = layout.image("amd64", &[("etc/os", b"public\n".to_vec())]);
    layout.tag("public", &public);
    // Two versions of a tag, for pins and drift; v1 signed, v2 not.
    let v1 = layout.image("amd64", &[("etc/version", b"1\n".to_vec())]);
    layout.tag("v1", &v1);
    let v2 = layout.image("amd64", &[("etc/version", b"2\n".to_vec())]);
    layout.tag("v2", &v2);
    // One signature of v1, pushed next to it in both signed repositories.
    let sig = real::sign_into(&mut layout, "docker.io/library/app", &v1.digest, &key);
    push_all(
        w,
        &layout,
        &registry,
        &[
            ("internal", "mirror/bitnami/redis:7"),
            ("public", "bitnami/redis:7"),
            ("v1", "library/pinned:1"),
            ("v1", "library/app:stable"),
            (&sig, &format!("library/app:{sig}")),
            ("v1", "library/strict:stable"),
            (&sig, &format!("library/strict:{sig}")),
            ("v1", "library/digests:v1"),
        ],
    );

    let dir = Arc::new(tempfile::tempdir().unwrap());
    std::fs::write(
        dir.path().join("release.pub"),
        key.verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap(),
    )
    .unwrap();
    let text = format!(
        r#"pins_file = "pins.toml"

[storage]
path = "data"
tag_ttl = "0s"

[audit]
path = "audit.jsonl"

[keys]
release = "release.pub"

[[upstream]]
name = "docker.io"
url = "{url}"
default = true

[[upstream]]
name = "registry.internal"
url = "{url}"

[[rewrite]]
from = "docker.io/bitnami/**"
to = "registry.internal/mirror/bitnami/**"

[[policy]]
name = "signed, keep approved"
match = ["docker.io/library/app"]
signed_by = ["release"]

[[policy]]
name = "signed, deny drift"
match = ["docker.io/library/strict"]
signed_by = ["release"]
tag_drift = "deny"

[[policy]]
name = "digests only"
match = ["docker.io/library/digests"]
require_digest = true

[[policy]]
name = "rest"
match = ["**"]
"#,
        url = registry.url()
    );
    let config_path = dir.path().join("pullgate.toml");
    std::fs::write(&config_path, &text).unwrap();

    // `pullgate pin` freezes library/pinned:1 at v1 through policy, then the
    // upstream tag moves to v2.
    let out = real::run(&mut pullgate(
        &["pin", "docker.io/library/pinned:1"],
        &config_path,
    ));
    assert!(
        out.contains(&format!(
            "pinned docker.io/library/pinned:1 to {}",
            v1.digest
        )),
        "{out}"
    );
    push_all(w, &layout, &registry, &[("v2", "library/pinned:1")]);

    let proxy = Proxy::with_config(dir.clone(), &text).await;
    let p = proxy.addr;

    // A rewritten name serves the target's content, byte for byte.
    let out = w.join("redis");
    pull(w, &format!("{p}/bitnami/redis:7"), &out, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pulled_digest(&out), internal.digest);
    assert_same_blobs(&layout, &out, &internal.layers);

    // The pinned tag serves the pinned digest although the tag moved.
    let out = w.join("pinned");
    pull(w, &format!("{p}/library/pinned:1"), &out, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pulled_digest(&out), v1.digest);

    // Tag drift: both tags were approved at v1, then move to unsigned v2.
    for repo in ["app", "strict"] {
        let out = w.join(format!("{repo}-v1"));
        pull(w, &format!("{p}/library/{repo}:stable"), &out, &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pulled_digest(&out), v1.digest);
    }
    push_all(
        w,
        &layout,
        &registry,
        &[
            ("v2", "library/app:stable"),
            ("v2", "library/strict:stable"),
        ],
    );
    let out = w.join("app-kept");
    pull(w, &format!("{p}/library/app:stable"), &out, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        pulled_digest(&out),
        v1.digest,
        "keep-approved serves the last signed digest"
    );
    let err = pull(
        w,
        &format!("{p}/library/strict:stable"),
        &w.join("strict-v2"),
        &[],
    )
    .unwrap_err();
    assert!(
        err.contains("denied") && err.contains("[unsigned]"),
        "{err}"
    );
    assert_eq!(
        proxy.metric(
            "pullgate_tag_drift_total{policy=\"signed, keep approved\",upstream=\"docker.io\"}"
        ),
        1.0
    );

    // `pullgate verify` explains what a pull of the drifted tag gets.
    let out = real::run(&mut pullgate(
        &["verify", "docker.io/library/app:stable"],
        &config_path,
    ));
    assert!(
        out.contains(&format!(
            "tag drift: the tag was last approved at {}",
            v1.digest
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("pulls of the tag are served {}", v1.digest)),
        "{out}"
    );

    // containerd gets the kept digest too.
    let ctrd = Containerd::start(&w.join("ctrd"));
    let hosts = ctrd.hosts_dir("docker.io", &format!("http://{p}"));
    let ctr_pull = |ns: &str, image: &str| ctrd.pull(ns, &hosts, image);
    real::run(&mut ctr_pull("drift", "docker.io/library/app:stable"));
    let listed = real::run(ctrd.ctr("drift").args(["image", "ls"]));
    assert!(listed.contains(&v1.digest), "{listed}");

    // require_digest: a tag pull is refused, a digest pull passes.
    let err = pull(w, &format!("{p}/library/digests:v1"), &w.join("d-tag"), &[]).unwrap_err();
    assert!(err.contains("[tag-not-allowed]"), "{err}");
    pull(
        w,
        &format!("{p}/library/digests@{}", v1.digest),
        &w.join("d-digest"),
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));

    // The audit log shows the drift and the rewrite's two names.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let kept: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["decision"] == "kept-approved")
        .collect();
    assert!(!kept.is_empty(), "{audit}");
    assert_eq!(kept[0]["digest"], v2.digest.as_str());
    assert_eq!(kept[0]["served_digest"], v1.digest.as_str());

    // A restart keeps the last approved digests.
    let dir = proxy.stop().await;
    let proxy = Proxy::with_config(dir.clone(), &text).await;
    let out = w.join("app-restarted");
    pull(w, &format!("{}/library/app:stable", proxy.addr), &out, &[])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pulled_digest(&out), v1.digest);
    ctrd.hosts_dir("docker.io", &format!("http://{}", proxy.addr));
    real::run(&mut ctr_pull("restarted", "docker.io/library/app:stable"));
    let listed = real::run(ctrd.ctr("restarted").args(["image", "ls"]));
    assert!(listed.contains(&v1.digest), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn base_allow_list_with_skopeo_and_containerd() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);

    let mut layout = Layout::new(&w.join("src"));
    // A multi-arch base, and an application built on it for both platforms.
    let base_files = |arch: &str, gen: &str| {
        vec![
            (
                "etc/os-release",
                format!("distroless {arch} {gen}\n").into_bytes(),
            ),
            (
                "etc/passwd",
                b"nonroot:x:65532:65532::/home/nonroot:/sbin/nologin\n".to_vec(),
            ),
        ]
    };
    let with_app = |mut files: Vec<(&'static str, Vec<u8>)>, app: &[u8]| {
        files.push(("app", app.to_vec()));
        files
    };
    let b_amd = layout.image("amd64", &base_files("amd64", "1"));
    let b_arm = layout.image("arm64", &base_files("arm64", "1"));
    let base1 = layout.index(&[("amd64", &b_amd), ("arm64", &b_arm)]);
    layout.tag("base1", &base1);
    let a_amd = layout.image("amd64", &with_app(base_files("amd64", "1"), b"app amd64"));
    let a_arm = layout.image("arm64", &with_app(base_files("arm64", "1"), b"app arm64"));
    let app1 = layout.index(&[("amd64", &a_amd), ("arm64", &a_arm)]);
    layout.tag("app1", &app1);
    // Built on another base.
    let other = layout.image(
        "amd64",
        &[
            ("etc/os-release", b"some other distro\n".to_vec()),
            ("app", b"app".to_vec()),
        ],
    );
    layout.tag("other", &other);
    // The base is rebuilt (new layers), and an application on the new one.
    let b2_amd = layout.image("amd64", &base_files("amd64", "2"));
    let b2_arm = layout.image("arm64", &base_files("arm64", "2"));
    let base2 = layout.index(&[("amd64", &b2_amd), ("arm64", &b2_arm)]);
    layout.tag("base2", &base2);
    let n_amd = layout.image(
        "amd64",
        &with_app(base_files("amd64", "2"), b"app amd64 v2"),
    );
    let n_arm = layout.image(
        "arm64",
        &with_app(base_files("arm64", "2"), b"app arm64 v2"),
    );
    let app2 = layout.index(&[("amd64", &n_amd), ("arm64", &n_arm)]);
    layout.tag("app2", &app2);
    push_all(
        w,
        &layout,
        &registry,
        &[
            ("base1", "distroless/static:nonroot"),
            ("app1", "acme/app:1"),
            ("other", "acme/app:other"),
            ("app2", "acme/app:2"),
        ],
    );

    let dir = Arc::new(tempfile::tempdir().unwrap());
    let text = format!(
        r#"
[storage]
path = "data"
tag_ttl = "0s"

[[upstream]]
name = "docker.io"
url = "{url}"
default = true

[bases]
distroless = ["docker.io/distroless/static:nonroot"]

[[policy]]
name = "acme"
match = ["docker.io/acme/**"]
bases = ["distroless"]

[[policy]]
name = "rest"
match = ["**"]
"#,
        url = registry.url()
    );
    let proxy = Proxy::with_config(dir.clone(), &text).await;
    let p = proxy.addr;

    // Built on the base: skopeo pulls every platform intact.
    let out = w.join("app1");
    pull(w, &format!("{p}/acme/app:1"), &out, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_same_blobs(
        &layout,
        &out,
        &[
            app1.digest.clone(),
            a_amd.digest.clone(),
            a_arm.digest.clone(),
        ],
    );
    assert_same_blobs(&layout, &out, &a_arm.layers);
    // Built on another base: denied, and skopeo shows why.
    let err = pull(w, &format!("{p}/acme/app:other"), &w.join("other"), &[]).unwrap_err();
    assert!(err.contains("[base-not-allowed]"), "{err}");
    assert!(
        err.contains("first 0 of 2 layers match distroless"),
        "{err}"
    );
    // Not yet on the (not yet refreshed) base.
    let err = pull(w, &format!("{p}/acme/app:2"), &w.join("early"), &[]).unwrap_err();
    assert!(err.contains("[base-not-allowed]"), "{err}");

    // containerd: index, then its platform's manifest by digest.
    let ctrd = Containerd::start(&w.join("ctrd"));
    let hosts = ctrd.hosts_dir("docker.io", &format!("http://{p}"));
    let ctr_pull = |ns: &str, image: &str| ctrd.pull(ns, &hosts, image);
    real::run(&mut ctr_pull("one", "docker.io/acme/app:1"));
    let out = real::run_failing(&mut ctr_pull("one", "docker.io/acme/app:other"));
    assert!(out.contains("403"), "{out}");

    // The base tag moves; after a refresh, images on either base pass.
    push_all(
        w,
        &layout,
        &registry,
        &[("base2", "distroless/static:nonroot")],
    );
    proxy.app.refresh_bases().await;
    for (tag, want) in [("2", &app2), ("1", &app1)] {
        let out = w.join(format!("after-refresh-{tag}"));
        pull(w, &format!("{p}/acme/app:{tag}"), &out, &[]).unwrap_or_else(|e| panic!("{tag}: {e}"));
        assert_eq!(pulled_digest(&out), want.digest);
    }

    // And after a restart (the tag now names only the new base).
    let dir = proxy.stop().await;
    let proxy = Proxy::with_config(dir.clone(), &text).await;
    // Same hosts directory, now naming the restarted proxy.
    ctrd.hosts_dir("docker.io", &format!("http://{}", proxy.addr));
    real::run(&mut ctr_pull("two", "docker.io/acme/app:1"));
    real::run(&mut ctr_pull("three", "docker.io/acme/app:2"));
    let history = std::fs::read_to_string(dir.path().join("data/bases/history.json")).unwrap();
    assert!(
        history.contains(&base1.digest) && history.contains(&base2.digest),
        "{history}"
    );
}

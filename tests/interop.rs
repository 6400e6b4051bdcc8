//! Interop: the real distribution registry upstream, real skopeo and real
//! containerd clients, pullgate in between.

mod common;
mod real;

use std::sync::Arc;

use common::Proxy;
use real::{assert_same_blobs, noise, pull, push, Containerd, Layout, Registry, RegistryAuth};

fn config(upstreams: &str, policies: &str) -> String {
    format!(
        "[storage]\npath = \"data\"\ntag_ttl = \"0s\"\n\n{upstreams}\n\n{}",
        if policies.is_empty() {
            "[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n"
        } else {
            policies
        }
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skopeo_pulls_through_every_routing_style_and_from_cache_when_upstream_is_down() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let mut registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);

    let mut layout = Layout::new(&w.join("src"));
    let single = layout.image("amd64", &[("hello.txt", b"hello\n".to_vec())]);
    layout.tag("v1", &single);
    let amd = layout.image("amd64", &[("arch.txt", b"amd64\n".to_vec())]);
    let arm = layout.image("arm64", &[("arch.txt", b"arm64\n".to_vec())]);
    let multi = layout.index(&[("amd64", &amd), ("arm64", &arm)]);
    layout.tag("multi", &multi);
    let big = layout.image("amd64", &[("big.bin", noise(64 * 1024 * 1024 + 5, 42))]);
    layout.tag("big", &big);
    for tag in ["v1", "multi", "big"] {
        push(
            w,
            &layout.dir,
            tag,
            &format!("{}/library/testimg:{tag}", registry.addr),
            &["--dest-tls-verify=false"],
        );
    }

    let dir = Arc::new(tempfile::tempdir().unwrap());
    let upstreams = format!(
        "[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n",
        registry.url()
    );
    let proxy = Proxy::with_config(dir, &config(&upstreams, "")).await;
    let p = proxy.addr;

    // Default upstream with Docker Hub's library/, host prefix, host prefix without library/.
    let cases = [
        (
            format!("{p}/testimg:v1"),
            vec![single.digest.clone()],
            single.layers.clone(),
        ),
        (
            format!("{p}/docker.io/library/testimg:multi"),
            vec![multi.digest.clone(), amd.digest.clone(), arm.digest.clone()],
            [amd.layers.clone(), arm.layers.clone()].concat(),
        ),
        (
            format!("{p}/docker.io/testimg:big"),
            vec![big.digest.clone()],
            big.layers.clone(),
        ),
    ];
    for (i, (src, manifests, layers)) in cases.iter().enumerate() {
        let out = w.join(format!("out{i}"));
        pull(w, src, &out, &[]).unwrap_or_else(|e| panic!("pull {src}: {e}"));
        assert_same_blobs(&layout, &out, manifests);
        assert_same_blobs(&layout, &out, layers);
    }
    let fetched_before = registry
        .log()
        .matches("GET /v2/library/testimg/blobs/")
        .count();

    // The upstream goes away: tags and content come from pullgate's store.
    registry.stop();
    for (i, (src, manifests, layers)) in cases.iter().enumerate() {
        let out = w.join(format!("offline{i}"));
        pull(w, src, &out, &[]).unwrap_or_else(|e| panic!("offline pull {src}: {e}"));
        assert_same_blobs(&layout, &out, manifests);
        assert_same_blobs(&layout, &out, layers);
    }
    assert!(proxy.metric("pullgate_stale_serves_total{upstream=\"docker.io\"}") >= 3.0);
    // Each blob crossed from the registry once (config and layers of 4 images).
    assert_eq!(fetched_before, 8, "{}", registry.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containerd_pulls_through_pullgate_as_its_only_server() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let mut registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);
    let mut layout = Layout::new(&w.join("src"));
    let amd = layout.image(
        "amd64",
        &[
            ("etc/arch", b"amd64\n".to_vec()),
            ("big.bin", noise(8 << 20, 7)),
        ],
    );
    let arm = layout.image("arm64", &[("etc/arch", b"arm64\n".to_vec())]);
    let multi = layout.index(&[("amd64", &amd), ("arm64", &arm)]);
    layout.tag("multi", &multi);
    let blocked = layout.image("amd64", &[("x", b"x".to_vec())]);
    layout.tag("blocked", &blocked);
    push(
        w,
        &layout.dir,
        "multi",
        &format!("{}/library/testimg:3.0", registry.addr),
        &["--dest-tls-verify=false"],
    );
    push(
        w,
        &layout.dir,
        "blocked",
        &format!("{}/evil/app:v1", registry.addr),
        &["--dest-tls-verify=false"],
    );

    // docker.io is not the default: only containerd's ?ns=docker.io routes there.
    let upstreams = format!(
        "[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\n\n[[upstream]]\nname = \"quay.io\"\nurl = \"http://127.0.0.1:9\"\ndefault = true\n",
        registry.url()
    );
    let policies = "[[policy]]\nname = \"no evil\"\nmatch = [\"docker.io/evil/**\"]\ndeny = true\n\n[[policy]]\nname = \"rest\"\nmatch = [\"**\"]\n";
    let proxy = Proxy::with_config(
        Arc::new(tempfile::tempdir().unwrap()),
        &config(&upstreams, policies),
    )
    .await;

    let ctrd = Containerd::start(&w.join("ctrd"));
    let hosts = ctrd.hosts_dir("docker.io", &format!("http://{}", proxy.addr));
    let pull = |ns: &str, image: &str| ctrd.pull(ns, &hosts, image);
    real::run(&mut pull("one", "docker.io/library/testimg:3.0"));
    let images = real::run(ctrd.ctr("one").args(["image", "ls", "-q"]));
    assert!(images.contains("docker.io/library/testimg:3.0"), "{images}");
    for layer in &amd.layers {
        let got = std::process::Command::new("ctr")
            .arg("-a")
            .arg(&ctrd.socket)
            .args(["-n", "one", "content", "get", layer])
            .output()
            .unwrap();
        let want = std::fs::read(layout.dir.join("blobs/sha256").join(&layer[7..])).unwrap();
        assert!(
            got.stdout == want,
            "layer {layer} differs in containerd's store"
        );
    }

    // A denied image: containerd shows the 403 and gets nothing.
    let out = real::run_failing(&mut pull("one", "docker.io/evil/app:v1"));
    assert!(out.contains("403"), "{out}");
    assert!(proxy.metric("pullgate_blocked_pulls_total{mode=\"enforce\",reason=\"denied-by-policy\",upstream=\"docker.io\"}") >= 1.0);

    // Upstream gone, a fresh namespace (isolated content store) still pulls.
    registry.stop();
    real::run(&mut pull("two", "docker.io/library/testimg:3.0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn https_upstream_with_its_own_ca_and_basic_auth_upstream() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (ca, cert, key) = real::make_tls(&w.join("tls"));
    let tls_registry = Registry::start(
        &w.join("tls-registry"),
        Some((&cert, &key)),
        RegistryAuth::None,
        None,
    );
    let auth_registry =
        Registry::start(&w.join("auth-registry"), None, RegistryAuth::Htpasswd, None);

    let mut layout = Layout::new(&w.join("src"));
    let img = layout.image("amd64", &[("f", noise(100_000, 3))]);
    layout.tag("v1", &img);
    let certs = w.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&ca, certs.join("ca.crt")).unwrap();
    push(
        w,
        &layout.dir,
        "v1",
        &format!("{}/team/app:v1", tls_registry.addr),
        &["--dest-cert-dir", certs.to_str().unwrap()],
    );
    push(
        w,
        &layout.dir,
        "v1",
        &format!("{}/team/app:v1", auth_registry.addr),
        &[
            "--dest-tls-verify=false",
            "--dest-creds",
            "testuser:testpass",
        ],
    );

    let dir = Arc::new(tempfile::tempdir().unwrap());
    std::fs::write(dir.path().join("registry-password"), "testpass\n").unwrap();
    let upstreams = format!(
        "[[upstream]]\nname = \"secure.test\"\nurl = \"{}\"\nca = \"{}\"\n\n[[upstream]]\nname = \"private.test\"\nurl = \"{}\"\nusername = \"testuser\"\npassword_file = \"registry-password\"\n",
        tls_registry.url(),
        ca.display(),
        auth_registry.url()
    );
    let proxy = Proxy::with_config(dir, &config(&upstreams, "")).await;
    for upstream in ["secure.test", "private.test"] {
        let out = w.join(format!("out-{upstream}"));
        pull(
            w,
            &format!("{}/{upstream}/team/app:v1", proxy.addr),
            &out,
            &[],
        )
        .unwrap_or_else(|e| panic!("pull via {upstream}: {e}"));
        assert_same_blobs(&layout, &out, &img.layers);
        assert_same_blobs(&layout, &out, std::slice::from_ref(&img.digest));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skopeo_shows_the_denial_reason() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);
    let mut layout = Layout::new(&w.join("src"));
    let img = layout.image("amd64", &[("f", b"f".to_vec())]);
    layout.tag("v1", &img);
    push(
        w,
        &layout.dir,
        "v1",
        &format!("{}/evil/app:v1", registry.addr),
        &["--dest-tls-verify=false"],
    );
    let upstreams = format!(
        "[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n",
        registry.url()
    );
    let policies = "[[policy]]\nname = \"only library\"\nmatch = [\"docker.io/library/**\"]\n";
    let proxy = Proxy::with_config(
        Arc::new(tempfile::tempdir().unwrap()),
        &config(&upstreams, policies),
    )
    .await;
    let err = pull(
        w,
        &format!("{}/evil/app:v1", proxy.addr),
        &w.join("out"),
        &[],
    )
    .unwrap_err();
    assert!(err.contains("denied"), "{err}");
    assert!(err.contains("no policy matches"), "{err}");

    // The same name under an audit-mode policy: served, with the warning.
    let audit =
        "[[policy]]\nname = \"watch\"\nmatch = [\"docker.io/**\"]\nmode = \"audit\"\ndeny = true\n";
    let proxy = Proxy::with_config(
        Arc::new(tempfile::tempdir().unwrap()),
        &config(&upstreams, audit),
    )
    .await;
    let r = proxy
        .client
        .get(proxy.url("/v2/evil/app/manifests/v1"))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let warning = r.headers()["warning"].to_str().unwrap().to_owned();
    assert!(
        warning.starts_with("299 - \"pullgate: would block:"),
        "{warning}"
    );
    pull(
        w,
        &format!("{}/evil/app:v1", proxy.addr),
        &w.join("audit"),
        &[],
    )
    .unwrap_or_else(|e| panic!("audit mode serves: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signed_images_pass_and_unsigned_ones_are_denied_for_skopeo_and_containerd() {
    use p256::pkcs8::{EncodePublicKey, LineEnding};
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);
    let key = p256::ecdsa::SigningKey::from_slice(&[21; 32]).unwrap();
    let stranger = p256::ecdsa::SigningKey::from_slice(&[22; 32]).unwrap();

    let mut layout = Layout::new(&w.join("src"));
    let amd = layout.image(
        "amd64",
        &[
            ("etc/arch", b"amd64\n".to_vec()),
            ("data", noise(1 << 20, 1)),
        ],
    );
    let arm = layout.image("arm64", &[("etc/arch", b"arm64\n".to_vec())]);
    let multi = layout.index(&[("amd64", &amd), ("arm64", &arm)]);
    layout.tag("signed", &multi);
    let sig_tag = real::sign_into(&mut layout, "docker.io/library/app", &multi.digest, &key);
    let unsigned = layout.image("amd64", &[("etc/os", b"unsigned\n".to_vec())]);
    layout.tag("unsigned", &unsigned);
    let wrong = layout.image("amd64", &[("etc/os", b"wrong key\n".to_vec())]);
    layout.tag("wrong", &wrong);
    let wrong_sig = real::sign_into(
        &mut layout,
        "docker.io/library/app",
        &wrong.digest,
        &stranger,
    );
    // A cosign v3 bundle, listed by the referrers fallback tag (this
    // registry has no referrers API).
    let bundled = layout.image("amd64", &[("etc/os", b"bundled\n".to_vec())]);
    layout.tag("bundled", &bundled);
    let (fallback_tag, fallback_index) =
        real::bundle_into(&mut layout, "docker.io/library/app", &bundled, &key);
    for tag in [
        "signed",
        sig_tag.as_str(),
        "unsigned",
        "wrong",
        wrong_sig.as_str(),
        "bundled",
        "bundle-referrer",
    ] {
        push(
            w,
            &layout.dir,
            tag,
            &format!("{}/library/app:{tag}", registry.addr),
            &["--dest-tls-verify=false"],
        );
    }

    real::put_index(&registry, "library/app", &fallback_tag, fallback_index).await;

    let dir = Arc::new(tempfile::tempdir().unwrap());
    std::fs::write(
        dir.path().join("release.pub"),
        key.verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap(),
    )
    .unwrap();
    let upstreams = format!(
        "[keys]\nrelease = \"release.pub\"\n\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n",
        registry.url()
    );
    let policies = "[[policy]]\nname = \"release-signed\"\nmatch = [\"docker.io/library/**\"]\nsigned_by = [\"release\"]\n";
    let proxy = Proxy::with_config(dir, &config(&upstreams, policies)).await;
    let p = proxy.addr;

    // skopeo: the signed index and both platforms come through intact.
    let out = w.join("signed");
    pull(w, &format!("{p}/library/app:signed"), &out, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_same_blobs(
        &layout,
        &out,
        &[multi.digest.clone(), amd.digest.clone(), arm.digest.clone()],
    );
    assert_same_blobs(&layout, &out, &amd.layers);
    // Unsigned and wrongly signed: denied, and skopeo shows why.
    let err = pull(w, &format!("{p}/library/app:unsigned"), &w.join("u"), &[]).unwrap_err();
    assert!(
        err.contains("denied") && err.contains("no signature by a trusted key"),
        "{err}"
    );
    let err = pull(w, &format!("{p}/library/app:wrong"), &w.join("x"), &[]).unwrap_err();
    assert!(err.contains("none verifies with a trusted key"), "{err}");
    // Signed by a cosign v3 bundle: passes.
    let out = w.join("bundled");
    pull(w, &format!("{p}/library/app:bundled"), &out, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_same_blobs(&layout, &out, &bundled.layers);
    // A denied image's layer, asked for by digest: refused.
    let r = proxy
        .get(&format!("/v2/library/app/blobs/{}", unsigned.layers[0]))
        .await;
    assert_eq!(r.status(), 403);

    // containerd: pulls the signed multi-arch image (index, then one child by digest).
    let ctrd = Containerd::start(&w.join("ctrd"));
    let hosts = ctrd.hosts_dir("docker.io", &format!("http://{p}"));
    let ctr_pull = |image: &str| ctrd.pull("sig", &hosts, image);
    real::run(&mut ctr_pull("docker.io/library/app:signed"));
    let out = real::run_failing(&mut ctr_pull("docker.io/library/app:unsigned"));
    assert!(out.contains("403"), "{out}");
}

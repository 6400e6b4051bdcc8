//! Keyless signatures with real components: images signed by the tests'
//! own sigstore (tests/sigstore_pki) on a real `docker-registry`, in both
//! formats (legacy `.sig` layers with certificate annotations, and a
//! sigstore bundle as a referrer), pulled through pullgate by skopeo and
//! containerd under an `[identities]` policy.

mod common;
mod real;
mod sigstore_pki;

use std::sync::Arc;

use common::Proxy;
use real::{assert_same_blobs, noise, pull, push, Containerd, Layout, Registry, RegistryAuth};
use sigstore_pki::Sigstore;

const ISSUER: &str = "https://accounts.acme.example";
const RELEASE: &str = "release@acme.example";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyless_signed_images_pass_for_their_identity_only_through_skopeo_and_containerd() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);
    let store = Sigstore::new();
    let repo = "docker.io/library/app";

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
    let mut tags = vec!["signed".to_string()];
    let mut legacy = |layout: &mut Layout, image: &str, identity: &str| {
        let (m, payload, config) = store.legacy_signature(repo, image, identity, ISSUER);
        let written = layout.raw_manifest(&m, &[&payload, &config]);
        let tag = pullgate::cosign::signature_tag(&image.parse().unwrap());
        layout.tag(&tag, &written);
        tags.push(tag);
    };
    legacy(&mut layout, &multi.digest, RELEASE);
    let other = layout.image("amd64", &[("etc/os", b"other signer\n".to_vec())]);
    layout.tag("other", &other);
    legacy(&mut layout, &other.digest, "mallory@acme.example");
    let unsigned = layout.image("amd64", &[("etc/os", b"unsigned\n".to_vec())]);
    layout.tag("unsigned", &unsigned);
    // A v0.3 bundle (inclusion proof, checkpoint) over the manifest, as a
    // referrer listed by the fallback tag (this registry has no referrers
    // API).
    let bundled = layout.image("amd64", &[("etc/os", b"bundled\n".to_vec())]);
    layout.tag("bundled", &bundled);
    let manifest_bytes =
        std::fs::read(layout.dir.join("blobs/sha256").join(&bundled.digest[7..])).unwrap();
    let mut s = store.signing(RELEASE, ISSUER);
    s.v03 = true;
    let bundle = store.bundle(&manifest_bytes, &s).into_bytes();
    let d: pullgate::names::Digest = bundled.digest.parse().unwrap();
    let (m, config) =
        pullgate::cosign::bundle_manifest(&d, bundled.size, bundled.media_type, &bundle);
    let referrer = layout.raw_manifest(&m, &[&bundle, &config]);
    layout.tag("bundle-referrer", &referrer);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": referrer.media_type, "digest": referrer.digest, "size": referrer.size,
                       "artifactType": pullgate::cosign::BUNDLE_MEDIA_TYPE}],
    }))
    .unwrap();
    tags.extend(["other", "unsigned", "bundled", "bundle-referrer"].map(String::from));
    for tag in &tags {
        push(
            w,
            &layout.dir,
            tag,
            &format!("{}/library/app:{tag}", registry.addr),
            &["--dest-tls-verify=false"],
        );
    }
    real::put_index(
        &registry,
        "library/app",
        &pullgate::cosign::referrers_tag(&d),
        index,
    )
    .await;

    let dir = Arc::new(tempfile::tempdir().unwrap());
    std::fs::write(dir.path().join("trusted_root.json"), store.trusted_root()).unwrap();
    let config = format!(
        r#"[storage]
path = "data"

[[upstream]]
name = "docker.io"
url = "{}"
default = true

[sigstore]
trusted_root = "trusted_root.json"

[identities]
release = {{ issuer = "{ISSUER}", subject = "{RELEASE}" }}

[[policy]]
name = "release-signed"
match = ["docker.io/library/**"]
signed_by = ["release"]
"#,
        registry.url()
    );
    let proxy = Proxy::with_config(dir, &config).await;
    let p = proxy.addr;

    // skopeo: the signed index and both platforms, and the bundled image.
    let out = w.join("signed");
    pull(w, &format!("{p}/library/app:signed"), &out, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_same_blobs(
        &layout,
        &out,
        &[multi.digest.clone(), amd.digest.clone(), arm.digest.clone()],
    );
    assert_same_blobs(&layout, &out, &amd.layers);
    let out = w.join("bundled");
    pull(w, &format!("{p}/library/app:bundled"), &out, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_same_blobs(&layout, &out, &bundled.layers);
    // Another identity's valid signature, and none: denied, with the reason.
    let err = pull(w, &format!("{p}/library/app:other"), &w.join("o"), &[]).unwrap_err();
    assert!(
        err.contains("denied") && err.contains("[bad-signature]"),
        "{err}"
    );
    let err = pull(w, &format!("{p}/library/app:unsigned"), &w.join("u"), &[]).unwrap_err();
    assert!(
        err.contains("denied") && err.contains("[unsigned]"),
        "{err}"
    );

    // containerd: the signed multi-arch image, and not the other signer's.
    let ctrd = Containerd::start(&w.join("ctrd"));
    let hosts = ctrd.hosts_dir("docker.io", &format!("http://{p}"));
    real::run(&mut ctrd.pull("k", &hosts, "docker.io/library/app:signed"));
    let out = real::run_failing(&mut ctrd.pull("k", &hosts, "docker.io/library/app:other"));
    assert!(out.contains("403"), "{out}");
}

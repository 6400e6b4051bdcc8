//! Signature verification against a fake upstream holding cosign `.sig`
//! signatures made by the test with keys it generates.

mod common;

use std::path::Path;

use bytes::Bytes;
use common::{error_code, noise, Fake, FaultKind, Options, Proxy};
use http::Method;
use p256::pkcs8::{EncodePublicKey, LineEnding};
use pullgate::cosign;
use pullgate::names::Digest;
use signature::Signer;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn release_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&[11; 32]).unwrap()
}

fn stranger_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&[12; 32]).unwrap()
}

fn ed_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[13; 32])
}

/// Writes the public keys and returns the `[keys]` table.
fn keys_toml(dir: &Path) -> String {
    let release = release_key()
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let ed = ed_key()
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    std::fs::write(dir.join("release.pub"), release).unwrap();
    std::fs::write(dir.join("ed.pub"), ed).unwrap();
    format!(
        "[keys]\nrelease = \"{}\"\ned = \"{}\"\n",
        dir.join("release.pub").display(),
        dir.join("ed.pub").display()
    )
}

enum Signer_ {
    Ecdsa(p256::ecdsa::SigningKey),
    Ed(ed25519_dalek::SigningKey),
}

/// Publishes a `.sig` for `signed` in `repo` (payload naming `claims`).
fn sign(fake: &Fake, repo: &str, signed: &str, claims: &str, key: Signer_) {
    let claimed: Digest = claims.parse().unwrap();
    let payload = cosign::payload(&format!("docker.io/{repo}"), &claimed);
    let sig = match key {
        Signer_::Ecdsa(k) => {
            let s: p256::ecdsa::Signature = k.sign(&payload);
            s.to_der().as_bytes().to_vec()
        }
        Signer_::Ed(k) => k.sign(&payload).to_bytes().to_vec(),
    };
    fake.put_blob(Bytes::from(payload.clone()));
    let (manifest, config) = cosign::signature_manifest(&[(payload, sig)]);
    fake.put_blob(Bytes::from(config));
    let d: Digest = signed.parse().unwrap();
    fake.put_manifest(
        repo,
        Some(&cosign::signature_tag(&d)),
        OCI_MANIFEST,
        manifest,
    );
}

fn policies(mode: &str) -> String {
    format!(
        "[[policy]]\nname = \"signed library\"\nmatch = [\"docker.io/library/**\"]\nmode = \"{mode}\"\nsigned_by = [\"release\", \"ed\"]\n"
    )
}

async fn start(fake: &Fake, dir: &Path, mode: &str) -> Proxy {
    Proxy::start(
        fake,
        Options {
            policies: format!("{}\n{}", keys_toml(dir), policies(mode)),
            ..Options::default()
        },
    )
    .await
}

#[tokio::test]
async fn signed_images_pass_and_the_others_are_denied_with_their_reason() {
    let fake = Fake::start().await;
    let keys = tempfile::tempdir().unwrap();
    let (signed, _) = fake.put_image("library/signed", "v1", &[noise(100, 1)]);
    sign(
        &fake,
        "library/signed",
        &signed,
        &signed,
        Signer_::Ecdsa(release_key()),
    );
    let (ed_signed, _) = fake.put_image("library/ed", "v1", &[noise(100, 2)]);
    sign(
        &fake,
        "library/ed",
        &ed_signed,
        &ed_signed,
        Signer_::Ed(ed_key()),
    );
    fake.put_image("library/unsigned", "v1", &[noise(100, 3)]);
    let (stranger, _) = fake.put_image("library/stranger", "v1", &[noise(100, 4)]);
    sign(
        &fake,
        "library/stranger",
        &stranger,
        &stranger,
        Signer_::Ecdsa(stranger_key()),
    );
    // A valid signature of another image, replayed under this image's tag.
    let (replayed, _) = fake.put_image("library/replayed", "v1", &[noise(100, 5)]);
    sign(
        &fake,
        "library/replayed",
        &replayed,
        &signed,
        Signer_::Ecdsa(release_key()),
    );

    let proxy = start(&fake, keys.path(), "enforce").await;
    for repo in ["signed", "ed"] {
        let r = proxy.get(&format!("/v2/library/{repo}/manifests/v1")).await;
        assert_eq!(r.status(), 200, "{repo}");
    }
    for (repo, why) in [
        ("unsigned", "unsigned"),
        ("stranger", "bad-signature"),
        ("replayed", "bad-signature"),
    ] {
        let (status, code, v) =
            error_code(proxy.get(&format!("/v2/library/{repo}/manifests/v1")).await).await;
        assert_eq!((status, code.as_str()), (403, "DENIED"), "{repo}: {v}");
        assert_eq!(v["errors"][0]["detail"]["reasons"][0], why, "{repo}");
        assert_eq!(v["errors"][0]["detail"]["policy"], "signed library");
        assert!(v["errors"][0]["detail"]["digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"));
    }

    // Verdicts are cached: pulling again reads no signature.
    let sig_path = format!(
        "/v2/library/signed/manifests/{}",
        cosign::signature_tag(&signed.parse().unwrap())
    );
    let before = fake.hits("GET", &sig_path);
    for _ in 0..3 {
        assert_eq!(
            proxy.get("/v2/library/signed/manifests/v1").await.status(),
            200
        );
    }
    assert_eq!(fake.hits("GET", &sig_path), before);
    // The signature artifact itself is served, so clients can verify through pullgate.
    assert_eq!(proxy.get(&sig_path).await.status(), 200);
    let m = proxy.metrics();
    assert!(m.contains("pullgate_blocked_pulls_total{mode=\"enforce\",reason=\"unsigned\",upstream=\"docker.io\"} 1"), "{m}");
    assert!(
        m.contains("pullgate_verifications_total{result=\"pass\"} 2"),
        "{m}"
    );
}

#[tokio::test]
async fn only_blobs_of_approved_manifests_are_served() {
    let fake = Fake::start().await;
    let keys = tempfile::tempdir().unwrap();
    let (signed, signed_layers) = fake.put_image("library/app", "good", &[noise(1000, 1)]);
    sign(
        &fake,
        "library/app",
        &signed,
        &signed,
        Signer_::Ecdsa(release_key()),
    );
    let (_, bad_layers) = fake.put_image("library/app", "bad", &[noise(1000, 2)]);
    let proxy = start(&fake, keys.path(), "enforce").await;

    // Before any manifest: nothing.
    let (s, code, v) = error_code(
        proxy
            .get(&format!("/v2/library/app/blobs/{}", signed_layers[0]))
            .await,
    )
    .await;
    assert_eq!((s, code.as_str()), (403, "DENIED"));
    assert_eq!(v["errors"][0]["detail"]["reasons"][0], "not-approved");
    // The signed image's manifest approves its blobs.
    assert_eq!(
        proxy.get("/v2/library/app/manifests/good").await.status(),
        200
    );
    let r = proxy
        .get(&format!("/v2/library/app/blobs/{}", signed_layers[0]))
        .await;
    assert_eq!(r.status(), 200);
    // The denied image's layer stays out of reach, even by digest.
    assert_eq!(
        proxy.get("/v2/library/app/manifests/bad").await.status(),
        403
    );
    let (s, _, _) = error_code(
        proxy
            .get(&format!("/v2/library/app/blobs/{}", bad_layers[0]))
            .await,
    )
    .await;
    assert_eq!(s, 403);
    assert_eq!(fake.total_hits(&bad_layers[0]), 0, "nothing fetched for it");
    // Approval is per repository: the same blob under another name is not.
    let (s, _, _) = error_code(
        proxy
            .get(&format!("/v2/library/other/blobs/{}", signed_layers[0]))
            .await,
    )
    .await;
    assert_eq!(s, 403);
    // The signature's payload can be fetched through pullgate, to verify it.
    let sig_tag = cosign::signature_tag(&signed.parse().unwrap());
    let r = proxy
        .get(&format!("/v2/library/app/manifests/{sig_tag}"))
        .await;
    let sig_manifest: serde_json::Value =
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let payload = sig_manifest["layers"][0]["digest"].as_str().unwrap();
    assert_eq!(
        proxy
            .get(&format!("/v2/library/app/blobs/{payload}"))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn fail_closed_when_signatures_cannot_be_fetched() {
    let fake = Fake::start().await;
    let keys = tempfile::tempdir().unwrap();
    let (known, _) = fake.put_image("library/known", "v1", &[noise(100, 1)]);
    sign(
        &fake,
        "library/known",
        &known,
        &known,
        Signer_::Ecdsa(release_key()),
    );
    let (fresh, _) = fake.put_image("library/fresh", "v1", &[noise(100, 2)]);
    sign(
        &fake,
        "library/fresh",
        &fresh,
        &fresh,
        Signer_::Ecdsa(release_key()),
    );
    let proxy = start(&fake, keys.path(), "enforce").await;
    assert_eq!(
        proxy.get("/v2/library/known/manifests/v1").await.status(),
        200
    );
    assert_eq!(
        proxy.get("/v2/library/fresh/manifests/v1").await.status(),
        200
    );

    // The signature store goes down. A digest with a verdict keeps it; one
    // without is denied as verification-unavailable.
    fake.fault(Some(Method::GET), ".sig", FaultKind::Status(503), None);
    let (status, _, v) = error_code(
        proxy
            .get(&format!("/v2/library/fresh/manifests/{fresh}"))
            .await,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (other, _) = fake.put_image("library/fresh", "v2", &[noise(100, 3)]);
    sign(
        &fake,
        "library/fresh",
        &other,
        &other,
        Signer_::Ecdsa(release_key()),
    );
    let (status, _, v) = error_code(proxy.get("/v2/library/fresh/manifests/v2").await).await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(
        v["errors"][0]["detail"]["reasons"][0],
        "verification-unavailable"
    );
    assert_eq!(
        proxy.metric("pullgate_verifications_total{result=\"unavailable\"}"),
        1.0
    );
    // Back up: the next pull verifies and passes.
    fake.clear_faults();
    assert_eq!(
        proxy.get("/v2/library/fresh/manifests/v2").await.status(),
        200
    );
}

#[tokio::test]
async fn multi_arch_indexes_pass_when_signed_or_when_every_child_is() {
    let fake = Fake::start().await;
    let keys = tempfile::tempdir().unwrap();
    let (amd, _) = fake.put_image("library/multi", "amd64", &[noise(100, 1)]);
    let (arm, _) = fake.put_image("library/multi", "arm64", &[noise(100, 2)]);
    let index = |children: &[&str]| {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": children.iter().map(|d| serde_json::json!({
                "mediaType": OCI_MANIFEST, "digest": d, "size": 1,
                "platform": {"os": "linux", "architecture": "amd64"}
            })).collect::<Vec<_>>()
        }))
        .unwrap()
    };
    // Signed index over unsigned children: the children pass through it.
    let signed_index = fake.put_manifest(
        "library/multi",
        Some("signed"),
        OCI_INDEX,
        index(&[&amd, &arm]),
    );
    sign(
        &fake,
        "library/multi",
        &signed_index,
        &signed_index,
        Signer_::Ecdsa(release_key()),
    );
    let proxy = start(&fake, keys.path(), "enforce").await;
    let (s, _, v) = error_code(
        proxy
            .get(&format!("/v2/library/multi/manifests/{amd}"))
            .await,
    )
    .await;
    assert_eq!(s, 403, "an unsigned child alone is denied: {v}");
    assert_eq!(
        proxy
            .get("/v2/library/multi/manifests/signed")
            .await
            .status(),
        200
    );
    for child in [&amd, &arm] {
        assert_eq!(
            proxy
                .get(&format!("/v2/library/multi/manifests/{child}"))
                .await
                .status(),
            200
        );
    }

    // Unsigned index whose children are all signed: passes.
    let (c1, _) = fake.put_image("library/multi2", "a", &[noise(100, 3)]);
    let (c2, _) = fake.put_image("library/multi2", "b", &[noise(100, 4)]);
    sign(
        &fake,
        "library/multi2",
        &c1,
        &c1,
        Signer_::Ecdsa(release_key()),
    );
    sign(&fake, "library/multi2", &c2, &c2, Signer_::Ed(ed_key()));
    fake.put_manifest("library/multi2", Some("all"), OCI_INDEX, index(&[&c1, &c2]));
    assert_eq!(
        proxy.get("/v2/library/multi2/manifests/all").await.status(),
        200
    );
    // One unsigned child: the unsigned index is denied.
    let (c3, _) = fake.put_image("library/multi2", "c", &[noise(100, 5)]);
    fake.put_manifest(
        "library/multi2",
        Some("some"),
        OCI_INDEX,
        index(&[&c1, &c3]),
    );
    let (s, _, v) = error_code(proxy.get("/v2/library/multi2/manifests/some").await).await;
    assert_eq!(s, 403);
    assert_eq!(v["errors"][0]["detail"]["reasons"][0], "unsigned");
}

#[tokio::test]
async fn audit_mode_serves_unsigned_images_with_a_warning() {
    let fake = Fake::start().await;
    let keys = tempfile::tempdir().unwrap();
    fake.put_image("library/unsigned", "v1", &[noise(100, 3)]);
    let proxy = start(&fake, keys.path(), "audit").await;
    let r = proxy.get("/v2/library/unsigned/manifests/v1").await;
    assert_eq!(r.status(), 200);
    let w = r.headers()["warning"].to_str().unwrap();
    assert!(
        w.contains("would block") && w.contains("no signature by a trusted key"),
        "{w}"
    );
    assert_eq!(
        proxy.metric("pullgate_blocked_pulls_total{mode=\"audit\",reason=\"unsigned\",upstream=\"docker.io\"}"),
        1.0
    );
}

/// Attaches a cosign v3 bundle to `image` as a referrer, listed through the
/// referrers API (`api`) or the `sha256-<hex>` fallback tag.
fn attach_bundle(fake: &Fake, repo: &str, image: &str, key: &p256::ecdsa::SigningKey, api: bool) {
    let d: Digest = image.parse().unwrap();
    let bundle = cosign::bundle(&d, &format!("docker.io/{repo}"), |m: &[u8]| {
        let s: p256::ecdsa::Signature = key.sign(m);
        s.to_der().as_bytes().to_vec()
    });
    fake.attach_bundle_referrer(repo, image, bundle, api);
}

#[tokio::test]
async fn cosign_v3_bundles_are_found_through_referrers_or_their_fallback_tag() {
    let fake = Fake::start().await;
    let keys = tempfile::tempdir().unwrap();
    let (api, _) = fake.put_image("library/api", "v1", &[noise(100, 1)]);
    attach_bundle(&fake, "library/api", &api, &release_key(), true);
    let (fallback, layers) = fake.put_image("library/fallback", "v1", &[noise(100, 2)]);
    attach_bundle(&fake, "library/fallback", &fallback, &release_key(), false);
    let (stranger, _) = fake.put_image("library/stranger", "v1", &[noise(100, 3)]);
    attach_bundle(&fake, "library/stranger", &stranger, &stranger_key(), true);
    let proxy = start(&fake, keys.path(), "enforce").await;

    assert_eq!(
        proxy.get("/v2/library/api/manifests/v1").await.status(),
        200
    );
    assert_eq!(
        proxy
            .get("/v2/library/fallback/manifests/v1")
            .await
            .status(),
        200
    );
    assert_eq!(
        proxy
            .get(&format!("/v2/library/fallback/blobs/{}", layers[0]))
            .await
            .status(),
        200
    );
    let (s, _, v) = error_code(proxy.get("/v2/library/stranger/manifests/v1").await).await;
    assert_eq!(s, 403);
    assert_eq!(v["errors"][0]["detail"]["reasons"][0], "bad-signature");
    // The signature artifacts come through for clients that verify themselves.
    let d: Digest = fallback.parse().unwrap();
    let r = proxy
        .get(&format!(
            "/v2/library/fallback/manifests/{}",
            cosign::referrers_tag(&d)
        ))
        .await;
    assert_eq!(r.status(), 200);
    let index: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let bundle_manifest = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    let r = proxy
        .get(&format!("/v2/library/fallback/manifests/{bundle_manifest}"))
        .await;
    assert_eq!(r.status(), 200);
    let m: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let bundle = m["layers"][0]["digest"].as_str().unwrap();
    assert_eq!(
        proxy
            .get(&format!("/v2/library/fallback/blobs/{bundle}"))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn a_tag_moved_to_unsigned_content_keeps_its_last_signed_digest() {
    let fake = Fake::start().await;
    let keys = tempfile::tempdir().unwrap();
    let (v1, _) = fake.put_image("library/app", "stable", &[noise(100, 40)]);
    sign(
        &fake,
        "library/app",
        &v1,
        &v1,
        Signer_::Ecdsa(release_key()),
    );
    let opts = |drift: &str| Options {
        tag_ttl: "0s".into(),
        policies: format!(
            "{}\n{}tag_drift = \"{drift}\"\n",
            keys_toml(keys.path()),
            policies("enforce")
        ),
        ..Options::default()
    };
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let proxy = Proxy::start_in(dir.clone(), &fake, opts("keep-approved")).await;
    let r = proxy.get("/v2/library/app/manifests/stable").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], v1.as_str());
    assert!(r.headers().get("warning").is_none());

    // The tag moves upstream to an unsigned image.
    let (v2, v2_layers) = fake.put_image("library/app", "stable", &[noise(100, 41)]);
    let drift = "pullgate_tag_drift_total{policy=\"signed library\",upstream=\"docker.io\"}";
    assert_eq!(proxy.metric(drift), 0.0);
    for n in 1..=2 {
        let r = proxy.get("/v2/library/app/manifests/stable").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], v1.as_str());
        let w = r.headers()["warning"].to_str().unwrap().to_owned();
        assert!(
            w.starts_with("299 - \"pullgate: tag drift: tag stable moved to"),
            "{w}"
        );
        assert!(w.contains(&v2) && w.contains(&v1), "{w}");
        assert_eq!(proxy.metric(drift), f64::from(n));
    }
    // The new content itself stays denied, blobs included.
    let (status, _, v) =
        error_code(proxy.get(&format!("/v2/library/app/manifests/{v2}")).await).await;
    assert_eq!(status, 403, "{v}");
    let r = proxy
        .get(&format!("/v2/library/app/blobs/{}", v2_layers[0]))
        .await;
    assert_eq!(r.status(), 403);

    // A restart keeps the last approved digest.
    let dir = proxy.stop().await;
    let proxy = Proxy::start_in(dir.clone(), &fake, opts("keep-approved")).await;
    let r = proxy.get("/v2/library/app/manifests/stable").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], v1.as_str());
    let dir = proxy.stop().await;

    // tag_drift = "deny": the pull is denied like any other.
    let proxy = Proxy::start_in(dir.clone(), &fake, opts("deny")).await;
    let (status, _, v) = error_code(proxy.get("/v2/library/app/manifests/stable").await).await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["errors"][0]["detail"]["reasons"][0], "unsigned");
    assert_eq!(v["errors"][0]["detail"]["digest"], v2.as_str());
    let dir = proxy.stop().await;

    // Once the new content is signed, it becomes the tag's approved digest.
    sign(
        &fake,
        "library/app",
        &v2,
        &v2,
        Signer_::Ecdsa(release_key()),
    );
    let proxy = Proxy::start_in(dir.clone(), &fake, opts("keep-approved")).await;
    let r = proxy.get("/v2/library/app/manifests/stable").await;
    assert_eq!(r.headers()["docker-content-digest"], v2.as_str());
    let (v3, _) = fake.put_image("library/app", "stable", &[noise(100, 42)]);
    let r = proxy.get("/v2/library/app/manifests/stable").await;
    assert_eq!(
        r.headers()["docker-content-digest"],
        v2.as_str(),
        "{v3} denied, {v2} kept"
    );
}

#[tokio::test]
async fn signed_by_and_bases_must_both_hold() {
    let fake = Fake::start().await;
    let keys = tempfile::tempdir().unwrap();
    let base_layer = noise(64, 50);
    fake.put_image("library/base", "1", std::slice::from_ref(&base_layer));
    let (both, _) = fake.put_image("library/both", "v1", &[base_layer.clone(), noise(64, 51)]);
    sign(
        &fake,
        "library/both",
        &both,
        &both,
        Signer_::Ecdsa(release_key()),
    );
    let (off_base, _) = fake.put_image("library/offbase", "v1", &[noise(64, 52)]);
    sign(
        &fake,
        "library/offbase",
        &off_base,
        &off_base,
        Signer_::Ecdsa(release_key()),
    );
    fake.put_image("library/unsigned", "v1", &[base_layer, noise(64, 53)]);
    let proxy = Proxy::start(
        &fake,
        Options {
            policies: format!(
                "{}\n[bases]\nmine = [\"library/base:1\"]\n\n{}bases = [\"mine\"]\n",
                keys_toml(keys.path()),
                policies("enforce")
            ),
            ..Options::default()
        },
    )
    .await;
    assert_eq!(
        proxy.get("/v2/library/both/manifests/v1").await.status(),
        200
    );
    for (repo, why) in [("offbase", "base-not-allowed"), ("unsigned", "unsigned")] {
        let (status, _, v) =
            error_code(proxy.get(&format!("/v2/library/{repo}/manifests/v1")).await).await;
        assert_eq!(status, 403, "{repo}: {v}");
        assert_eq!(
            v["errors"][0]["detail"]["reasons"],
            serde_json::json!([why]),
            "{repo}"
        );
    }
}

#[tokio::test]
async fn a_stored_blob_whose_size_is_not_its_manifests_is_fetched_again() {
    let fake = Fake::start().await;
    let keys = tempfile::tempdir().unwrap();
    let layer = noise(1000, 21);
    let (signed, layers) = fake.put_image("library/app", "v1", std::slice::from_ref(&layer));
    sign(
        &fake,
        "library/app",
        &signed,
        &signed,
        Signer_::Ecdsa(release_key()),
    );
    let proxy = start(&fake, keys.path(), "enforce").await;
    assert_eq!(
        proxy.get("/v2/library/app/manifests/v1").await.status(),
        200
    );
    let path = format!("/v2/library/app/blobs/{}", layers[0]);
    assert_eq!(proxy.get(&path).await.bytes().await.unwrap(), layer);
    assert_eq!(fake.hits("GET", &path), 1);

    // The disk loses the end of the file.
    let hex = &layers[0][7..];
    let file = proxy
        .dir
        .path()
        .join("data/blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    std::fs::write(&file, &layer[..500]).unwrap();
    let r = proxy.get(&path).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.bytes().await.unwrap(),
        layer,
        "the whole blob, fetched again"
    );
    assert_eq!(fake.hits("GET", &path), 2);
    assert_eq!(
        proxy.metric("pullgate_evictions_total{reason=\"damaged\"}"),
        1.0
    );
    // The damaged copy was kept aside, and the new one is served from now on.
    assert_eq!(proxy.get(&path).await.bytes().await.unwrap(), layer);
    assert_eq!(fake.hits("GET", &path), 2);
    let quarantine = proxy.dir.path().join("data/quarantine");
    assert_eq!(std::fs::read_dir(&quarantine).unwrap().count(), 1);
}
